// What a person does with a message: copy it (or one of its code blocks), rate an answer (thumbs and an
// optional comment, PUT .../feedback/), and share the conversation read-only (.../share-links/). The chat page
// (chat.js) and a shared page use it; window.ChorusActions is how chat.js decorates the messages it draws.
(function () {
  "use strict";

  function csrfToken() {
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  // A JSON API call with the session's CSRF token: resolves to the parsed body, rejects with the error's detail.
  function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { "X-CSRFToken": csrfToken() } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then((answer) => {
      if (answer.status === 204) return { body: null, answer };
      return answer.json().then(
        (json) => {
          if (!answer.ok) {
            const error = new Error(json.error ? json.error.detail : `The server answered ${answer.status}.`);
            error.code = json.error ? json.error.code : "http_" + answer.status;
            throw error;
          }
          return { body: json, answer };
        },
        () => {
          throw new Error(`The server answered ${answer.status}.`);
        },
      );
    });
  }

  // Copies text; without the async clipboard (an insecure origin), through a hidden textarea.
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok ? Promise.resolve() : Promise.reject(new Error("copy refused"));
  }

  // A moment of "Copied" on the button, then its icon or label again.
  function flash(button, text) {
    if (button.classList.contains("done")) return;
    const before = Array.from(button.childNodes);
    button.textContent = text;
    button.classList.add("done");
    setTimeout(() => {
      button.replaceChildren(...before);
      button.classList.remove("done");
    }, 1500);
  }

  const button = window.ChorusUi.button; // page.js

  // Each code block of a rendered message gets a Copy button (the server's HTML already names its language).
  function decorate(root) {
    root.querySelectorAll("pre").forEach((pre) => {
      if (!pre.querySelector("code") || pre.closest(".step-list .tool")) return;
      let block = pre.parentElement;
      if (!block.classList.contains("highlight") && !block.classList.contains("code-block")) {
        block = document.createElement("div");
        pre.replaceWith(block);
        block.append(pre);
      }
      block.classList.add("code-block");
      if (!block.querySelector(":scope > .copy-code")) block.prepend(button("copy-code", "Copy code", "Copy"));
    });
  }

  // The row under a message: Copy, Edit (the person's, shown on their last turn only), thumbs (answers).
  function messageActions(role, isAnswer) {
    const row = document.createElement("div");
    row.className = "message-actions";
    row.append(button("icon copy-message", "Copy message", "i-copy"));
    if (role === "user") {
      const edit = button("icon edit-message", "Edit and resend", "i-edit");
      edit.hidden = true;
      row.append(edit);
    } else if (isAnswer) {
      const up = button("icon feedback", "Good answer", "i-up");
      up.dataset.rating = "1";
      const down = button("icon feedback", "Bad answer", "i-down");
      down.dataset.rating = "-1";
      [up, down].forEach((b) => b.setAttribute("aria-pressed", "false"));
      row.append(up, down);
    }
    return row;
  }

  function conversationId() {
    const chat = document.getElementById("chat");
    return chat ? chat.dataset.conversationId : "";
  }

  function feedbackUrl(item) {
    return `/api/conversations/${conversationId()}/messages/${item.dataset.messageId}/feedback/`;
  }

  // Thumbs: a press records the rating (pressing it again takes it back); a comment box then offers more.
  function rate(thumb) {
    const item = thumb.closest("li.message");
    const row = thumb.closest(".message-actions");
    const again = thumb.getAttribute("aria-pressed") === "true";
    const rating = parseInt(thumb.dataset.rating, 10);
    const done = again
      ? api("DELETE", feedbackUrl(item))
      : api("PUT", feedbackUrl(item), { rating, comment: "" });
    done.then(
      () => {
        row.querySelectorAll(".feedback").forEach((b) => b.setAttribute("aria-pressed", String(!again && b === thumb)));
        item.querySelector(".feedback-form")?.remove();
        if (!again) item.append(commentForm(item, rating));
      },
      (err) => window.ChorusChat?.notice(err.message),
    );
  }

  function commentForm(item, rating) {
    const form = document.createElement("form");
    form.className = "feedback-form";
    const area = document.createElement("textarea");
    area.rows = 2;
    area.maxLength = 2000;
    area.placeholder = rating > 0 ? "What was good? (optional)" : "What went wrong? (optional)";
    area.setAttribute("aria-label", "Comment on this answer");
    const save = document.createElement("button");
    save.type = "submit";
    save.className = "small";
    save.textContent = "Send feedback";
    const close = button("icon dismiss", "Close", "×");
    close.addEventListener("click", () => form.remove());
    form.append(area, save, close);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      api("PUT", feedbackUrl(item), { rating, comment: area.value }).then(
        () => {
          const thanks = document.createElement("p");
          thanks.className = "feedback-thanks meta";
          thanks.textContent = "Thanks for the feedback.";
          form.replaceWith(thanks);
        },
        (err) => window.ChorusChat?.notice(err.message),
      );
    });
    return form;
  }

  function copyOf(item) {
    if (item.dataset.content !== undefined) return item.dataset.content;
    return item.querySelector(".content").innerText.trim();
  }

  document.addEventListener("click", (e) => {
    const target = e.target.closest("button");
    if (!target) return;
    if (target.classList.contains("copy-message")) {
      copyText(copyOf(target.closest("li.message"))).then(() => flash(target, "Copied"));
    } else if (target.classList.contains("copy-code")) {
      copyText(target.closest(".code-block").querySelector("pre").textContent).then(() => flash(target, "Copied"));
    } else if (target.classList.contains("feedback")) {
      rate(target);
    }
  });

  // --- Share links (the chat page's Share panel) ---
  const shareButton = document.getElementById("share-button");
  const panel = document.getElementById("share-panel");

  function shareRow(link) {
    const li = document.createElement("li");
    li.dataset.linkId = link.id;
    const field = document.createElement("input");
    field.type = "text";
    field.readOnly = true;
    field.className = "share-url";
    field.value = new URL(link.url, window.location.origin).href;
    field.setAttribute("aria-label", "Share link");
    const copy = button("small secondary copy-link", "Copy link", "Copy");
    copy.addEventListener("click", () => copyText(field.value).then(() => flash(copy, "Copied")));
    const revoke = button("small secondary revoke-link", "Stop sharing this link", "Stop sharing");
    revoke.addEventListener("click", () =>
      api("DELETE", `/api/conversations/${conversationId()}/share-links/${link.id}/`).then(
        () => li.remove(),
        (err) => window.ChorusChat?.notice(err.message),
      ),
    );
    li.append(field, copy, revoke);
    return li;
  }

  function loadShares() {
    const list = document.getElementById("share-links");
    api("GET", `/api/conversations/${conversationId()}/share-links/`).then(
      ({ body }) => list.replaceChildren(...body.map(shareRow)),
      (err) => window.ChorusChat?.notice(err.message),
    );
  }

  if (shareButton && panel) {
    shareButton.addEventListener("click", () => {
      panel.hidden = !panel.hidden;
      shareButton.setAttribute("aria-expanded", String(!panel.hidden));
      if (!panel.hidden) loadShares();
    });
    document.getElementById("share-create").addEventListener("click", () =>
      api("POST", `/api/conversations/${conversationId()}/share-links/`).then(
        ({ body }) => document.getElementById("share-links").prepend(shareRow(body)),
        (err) => window.ChorusChat?.notice(err.message),
      ),
    );
  }

  const messages = document.getElementById("messages");
  if (messages) decorate(messages);

  window.ChorusActions = { api, csrfToken, copyText, decorate, messageActions };
})();
