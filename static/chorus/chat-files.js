// Files for the next message: chosen with the paperclip, dropped on the composer or pasted into it, uploaded
// at once (POST .../attachments/) so that sending is quick, shown as chips with their state, sent by id with
// the message. chat.js makes one with window.ChorusFiles.composer({...}).
(function () {
  "use strict";

  function formatSize(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  // `ensureConversation()` resolves once the conversation exists (a new one is created by its first file or
  // message), `conversationId()` names it, `notice(text)` tells the person, `changed()` redraws the composer.
  function composer({ ensureConversation, conversationId, notice, changed }) {
    const form = document.getElementById("composer");
    const input = document.getElementById("composer-input");
    const list = document.getElementById("pending-attachments");
    const picker = document.getElementById("attach-input");
    // {file, chip, state: "uploading"|"ready"|"failed", attachment}
    let pending = [];

    function redraw() {
      list.hidden = pending.length === 0;
      changed();
    }

    // A removed chip's file, not sent: the server forgets it too (best effort; a sent file stays with its
    // message).
    function forget(attachmentId) {
      window.ChorusActions.api("DELETE", `/api/conversations/${conversationId()}/attachments/${attachmentId}/`).catch(
        () => {},
      );
    }

    function upload(entry) {
      const body = new FormData();
      body.append("file", entry.file, entry.file.name || "pasted");
      return ensureConversation()
        .then(() =>
          fetch(`/api/conversations/${conversationId()}/attachments/`, {
            method: "POST",
            body,
            credentials: "same-origin",
            headers: { "X-CSRFToken": window.ChorusActions.csrfToken() },
          }),
        )
        .then((answer) => answer.json().then((json) => ({ ok: answer.ok, json })))
        .then(({ ok, json }) => {
          if (!ok) throw new Error(json.error ? `${json.error.detail} (${json.error.code})` : "Upload failed.");
          return json;
        });
    }

    function chipFor(entry) {
      const file = entry.file;
      const chip = document.createElement("li");
      chip.className = "attachment pending-file";
      chip.dataset.state = "uploading";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = file.name || "pasted file";
      const size = document.createElement("span");
      size.className = "size";
      size.textContent = formatSize(file.size);
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove ${file.name || "file"}`);
      remove.addEventListener("click", () => {
        pending = pending.filter((p) => p !== entry);
        chip.remove();
        redraw();
        if (entry.attachment) forget(entry.attachment.id);
      });
      chip.append(name, " ", size, remove);
      return chip;
    }

    function add(files) {
      Array.from(files || []).forEach((file) => {
        const entry = { file, state: "uploading", attachment: null };
        entry.chip = chipFor(entry);
        pending.push(entry);
        list.append(entry.chip);
        redraw();
        upload(entry)
          .then((json) => {
            entry.attachment = json;
            if (!pending.includes(entry)) forget(json.id); // removed while it was uploading
            entry.state = "ready";
            entry.chip.dataset.state = "ready";
            entry.chip.dataset.attachmentId = json.id;
          })
          .catch((err) => {
            entry.state = "failed";
            entry.chip.dataset.state = "failed";
            notice(`${file.name || "The file"}: ${err.message}`);
          })
          .finally(redraw);
      });
    }

    document.getElementById("attach-button").addEventListener("click", () => picker.click());
    picker.addEventListener("change", () => {
      add(picker.files);
      picker.value = "";
    });
    form.addEventListener("dragover", (e) => {
      if (e.dataTransfer && Array.from(e.dataTransfer.types).includes("Files")) {
        e.preventDefault();
        form.classList.add("dragging");
      }
    });
    form.addEventListener("dragleave", () => form.classList.remove("dragging"));
    form.addEventListener("drop", (e) => {
      form.classList.remove("dragging");
      if (e.dataTransfer && e.dataTransfer.files.length) {
        e.preventDefault();
        add(e.dataTransfer.files);
      }
    });
    input.addEventListener("paste", (e) => {
      const files = e.clipboardData && e.clipboardData.files;
      if (files && files.length) {
        e.preventDefault();
        add(files);
      }
    });

    return {
      uploading: () => pending.some((p) => p.state === "uploading"),
      ready: () => pending.filter((p) => p.state === "ready"),
      // Sent: the chips go (a refused send gives them back).
      clear() {
        pending = [];
        list.replaceChildren();
        redraw();
      },
      giveBack(entries) {
        entries.forEach((entry) => {
          pending.push(entry);
          list.append(entry.chip);
        });
        redraw();
      },
    };
  }

  window.ChorusFiles = { composer };
})();
