// The chat page's turn controls: edit-and-resend on the person's last message, Regenerate (Retry after a
// failure) on the last run, both through POST .../resend/ (the old turn is replaced: the team forgets it);
// and the answers to a team's questions (input.request cards), sent on the socket as input.response.
(function () {
  "use strict";

  const list = document.getElementById("messages");
  const chat = window.ChorusChat;
  if (!list || !chat) return;
  const actions = window.ChorusActions;

  // --- Replacing the last turn: edit and resend, regenerate, retry (POST .../resend/) ----------------------

  function resend(body) {
    chat.clearNotice();
    return actions.api("POST", `/api/conversations/${chat.conversationId()}/resend/`, body).catch((err) => {
      chat.notice(err.message);
      throw err;
    });
  }

  function openEditor(item) {
    if (item.querySelector(".message-editor")) return;
    const content = item.querySelector(".content");
    const editor = document.createElement("form");
    editor.className = "message-editor";
    const field = document.createElement("textarea");
    field.value = item.dataset.content || content.innerText;
    field.rows = Math.min(10, Math.max(2, field.value.split("\n").length));
    field.maxLength = document.getElementById("composer-input").maxLength;
    field.setAttribute("aria-label", "Edit your message");
    const save = document.createElement("button");
    save.type = "submit";
    save.className = "small";
    save.textContent = "Send again";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "small secondary";
    cancel.textContent = "Cancel";
    editor.append(field, save, cancel);
    content.hidden = true;
    content.after(editor);
    field.focus();
    const close = () => {
      editor.remove();
      content.hidden = false;
    };
    cancel.addEventListener("click", close);
    field.addEventListener("keydown", (e) => {
      if (e.key === "Escape") {
        e.preventDefault();
        close();
      } else if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        editor.requestSubmit();
      }
    });
    editor.addEventListener("submit", (e) => {
      e.preventDefault();
      save.disabled = true;
      resend({ content: field.value }).then(close, () => (save.disabled = false));
    });
  }

  list.addEventListener("click", (e) => {
    const target = e.target.closest("button");
    if (!target) return;
    if (target.classList.contains("edit-message")) {
      openEditor(target.closest("li.message"));
    } else if (target.classList.contains("regenerate")) {
      target.disabled = true;
      resend({}).finally(() => (target.disabled = false));
    } else if (target.classList.contains("option")) {
      answerQuestion(target.closest(".input-request"), target.dataset.answer);
    }
  });

  // --- Questions the team asks (input.request): answered on the socket -------------------------------------

  function answerQuestion(card, content) {
    if (!card || !content.trim()) return;
    if (!chat.sendFrame({ type: "input.response", request_id: card.dataset.requestId, content })) return;
    card.querySelectorAll("button, textarea").forEach((el) => (el.disabled = true));
  }

  list.addEventListener("submit", (e) => {
    const card = e.target.closest(".input-request");
    if (!card) return;
    e.preventDefault();
    answerQuestion(card, card.querySelector("textarea.answer").value);
  });
  list.addEventListener("keydown", (e) => {
    if (e.target.matches(".input-request textarea.answer") && e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      e.target.closest("form").requestSubmit();
    }
  });

})();
