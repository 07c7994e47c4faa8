// Chorus chat page: speaks protocol v1 (docs/protocol.md) over one WebSocket.
// Tokens are appended as plain text while a message streams; when the message completes, the server's
// sanitised HTML replaces it. No inline script anywhere: this file is the page's only code.
(function () {
  "use strict";

  const chat = document.getElementById("chat");
  if (!chat) return;

  const conversationId = chat.dataset.conversationId;
  const list = document.getElementById("messages");
  const form = document.getElementById("composer");
  const input = document.getElementById("composer-input");
  const sendButton = document.getElementById("send-button");
  const statusEl = document.getElementById("connection-status");
  const runError = document.getElementById("run-error");
  const stopButton = document.getElementById("stop-button");
  const offlineBanner = document.getElementById("offline-banner");
  const attachButton = document.getElementById("attach-button");
  const attachInput = document.getElementById("attach-input");
  const pendingList = document.getElementById("pending-attachments");

  let socket = null;
  let lastSeq = parseInt(chat.dataset.lastSeq || "0", 10);
  let activeRun = chat.dataset.activeRun || null;
  let retryDelay = 500;
  // Files chosen for the next message: {file, chip, state: "uploading"|"ready"|"failed", attachment}.
  let pending = [];
  // The files of the last send until the server echoes it: a refused send (an error frame) gives them back.
  let lastSent = null;

  function setStatus(text, state) {
    statusEl.textContent = text;
    statusEl.dataset.state = state;
  }

  function updateComposer() {
    const open = socket && socket.readyState === WebSocket.OPEN;
    const uploading = pending.some((p) => p.state === "uploading");
    sendButton.disabled = !open || Boolean(activeRun) || uploading;
    stopButton.hidden = !activeRun;
    stopButton.disabled = !open;
    offlineBanner.hidden = open;
  }

  function newMessageItem(id, role, source) {
    const item = document.createElement("li");
    item.dataset.messageId = id;
    item.className = `message ${role}`;
    const sourceEl = document.createElement("div");
    sourceEl.className = "source";
    sourceEl.textContent = source;
    const content = document.createElement("div");
    content.className = "content";
    item.append(sourceEl, content);
    return item;
  }

  function formatSize(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];

  // One attachment of a sent message: an image as a thumbnail, anything else as a chip that downloads it.
  function attachmentItem(a) {
    const li = document.createElement("li");
    const link = document.createElement("a");
    link.href = a.url;
    if (IMAGE_TYPES.includes(a.content_type)) {
      li.className = "attachment image";
      link.target = "_blank";
      link.rel = "noopener";
      const img = document.createElement("img");
      img.src = a.url;
      img.alt = a.name;
      img.title = a.name;
      link.append(img);
      li.append(link);
    } else {
      li.className = "attachment file";
      link.download = a.name;
      link.textContent = a.name;
      const size = document.createElement("span");
      size.className = "size";
      size.textContent = formatSize(a.size);
      li.append(link, " ", size);
    }
    return li;
  }

  function showAttachments(item, attachments) {
    if (!attachments || !attachments.length || item.querySelector("ul.attachments")) return;
    const ul = document.createElement("ul");
    ul.className = "attachments";
    attachments.forEach((a) => ul.append(attachmentItem(a)));
    item.append(ul);
  }

  function csrfToken() {
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  function renderPending() {
    pendingList.hidden = pending.length === 0;
    updateComposer();
  }

  // A removed chip's file, not sent: the server forgets it too (best effort; a sent file stays with its message).
  function forget(attachmentId) {
    fetch(`/api/conversations/${conversationId}/attachments/${attachmentId}/`, {
      method: "DELETE",
      credentials: "same-origin",
      headers: { "X-CSRFToken": csrfToken() },
    }).catch(() => {});
  }

  // Uploads at once (POST .../attachments/), so that sending is quick; the chip shows its state.
  function addFiles(files) {
    Array.from(files || []).forEach((file) => {
      const entry = { file, state: "uploading", attachment: null };
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
        renderPending();
        if (entry.attachment) forget(entry.attachment.id);
      });
      chip.append(name, " ", size, remove);
      entry.chip = chip;
      pending.push(entry);
      pendingList.append(chip);
      renderPending();
      const body = new FormData();
      body.append("file", file, file.name || "pasted");
      fetch(`/api/conversations/${conversationId}/attachments/`, {
        method: "POST",
        body,
        credentials: "same-origin",
        headers: { "X-CSRFToken": csrfToken() },
      })
        .then((answer) => answer.json().then((json) => ({ ok: answer.ok, json })))
        .then(({ ok, json }) => {
          if (!ok) throw new Error(json.error ? `${json.error.detail} (${json.error.code})` : "Upload failed.");
          entry.attachment = json;
          if (!pending.includes(entry)) forget(json.id); // removed while it was uploading
          entry.state = "ready";
          chip.dataset.state = "ready";
          chip.dataset.attachmentId = json.id;
        })
        .catch((err) => {
          entry.state = "failed";
          chip.dataset.state = "failed";
          runError.textContent = `${file.name || "The file"}: ${err.message}`;
          runError.hidden = false;
        })
        .finally(renderPending);
    });
  }

  function findMessage(id) {
    return list.querySelector(`li[data-message-id="${CSS.escape(id)}"]`);
  }

  // Each run is one <li class="run">: a header naming the team (and why a router picked it), a "steps"
  // block for inner agents and tools (open, folded or absent, as the team says), then the answer.
  function runItem(event) {
    let item = list.querySelector(`li.run[data-run-id="${CSS.escape(event.run_id)}"]`);
    if (item) return item;
    item = document.createElement("li");
    item.className = "run";
    item.dataset.runId = event.run_id;
    item.dataset.finalSpeakers = (event.final_speakers || []).join(",");
    item.dataset.steps = event.steps || "folded";
    const header = document.createElement("div");
    header.className = "run-header";
    header.textContent = event.team_name || event.team || "";
    if (event.route) {
      const route = document.createElement("span");
      route.className = "route";
      route.textContent = ` picked by ${event.route.router}: ${event.route.reason}`;
      header.append(route);
    }
    item.append(header);
    if (item.dataset.steps !== "hidden") {
      const details = document.createElement("details");
      details.className = "steps";
      details.open = item.dataset.steps === "open";
      details.hidden = true;
      const summary = document.createElement("summary");
      summary.textContent = "Steps";
      const steps = document.createElement("ol");
      steps.className = "step-list";
      details.append(summary, steps);
      item.append(details);
    }
    const answers = document.createElement("ol");
    answers.className = "answers";
    item.append(answers);
    list.append(item);
    return item;
  }

  function isStep(run, source, role) {
    const finals = run.dataset.finalSpeakers ? run.dataset.finalSpeakers.split(",") : [];
    return role === "tool" || (finals.length > 0 && !finals.includes(source));
  }

  // Where an agent's message goes: its run's steps or its answers (a run we never saw: the main list).
  function placeItem(runId, item, step) {
    const run = runId && list.querySelector(`li.run[data-run-id="${CSS.escape(runId)}"]`);
    if (!run) {
      list.append(item);
      return;
    }
    const details = run.querySelector("details.steps");
    if (step && details) {
      details.hidden = false;
      details.querySelector(".step-list").append(item);
    } else {
      run.querySelector(".answers").append(item);
    }
  }

  // The folded "Steps" line says what the inner agents are doing while the answer is still to come.
  function stepsActivity(runId, text) {
    const run = runId && list.querySelector(`li.run[data-run-id="${CSS.escape(runId)}"]`);
    const summary = run && run.querySelector("details.steps > summary");
    if (summary) summary.textContent = text;
  }

  function stepsDone(runId) {
    const run = runId && list.querySelector(`li.run[data-run-id="${CSS.escape(runId)}"]`);
    const details = run && run.querySelector("details.steps");
    if (!details) return;
    details.querySelector("summary").textContent = `Steps (${details.querySelectorAll(".step-list > li").length})`;
  }

  function agentItem(runId, id, role, source) {
    let item = findMessage(id);
    if (!item) {
      item = newMessageItem(id, role, source);
      const run = runId && list.querySelector(`li.run[data-run-id="${CSS.escape(runId)}"]`);
      const step = run ? isStep(run, source, role) : false;
      item.classList.toggle("step", step);
      placeItem(runId, item, step);
    }
    return item;
  }

  function scrollToEnd() {
    window.scrollTo(0, document.body.scrollHeight);
  }

  const handlers = {
    hello(event) {
      // The server has already replayed what we missed (the URL carries our last seq); live events follow.
      activeRun = event.active_run_id;
      setStatus(activeRun ? "Answering…" : "Connected", "open");
    },
    message(event) {
      const m = event.message;
      let item = findMessage(m.id);
      if (!item) {
        item = newMessageItem(m.id, m.role, m.source);
        const step = m.role !== "user" && !m.is_final_answer;
        item.classList.toggle("step", step);
        if (m.role === "user") list.append(item);
        else placeItem(m.run_id, item, step);
      }
      item.classList.remove("streaming");
      item.classList.toggle("incomplete", Boolean(m.incomplete));
      if (m.incomplete && !item.querySelector(".source .tag")) {
        const tag = document.createElement("span");
        tag.className = "tag";
        tag.textContent = "incomplete";
        item.querySelector(".source").append(" ", tag);
      }
      item.querySelector(".content").innerHTML = m.html; // sanitised on the server (agents_app/rendering.py)
      showAttachments(item, m.attachments);
      if (m.role === "user") lastSent = null;
    },
    "run.started"(event) {
      activeRun = event.run_id;
      runItem(event);
      runError.hidden = true;
      setStatus("Answering…", "open");
    },
    token(event) {
      const item = agentItem(event.run_id, event.stream_id, "assistant", event.source);
      item.classList.add("streaming");
      item.querySelector(".content").append(document.createTextNode(event.delta));
      if (item.classList.contains("step")) stepsActivity(event.run_id, `Steps · ${event.source} is writing…`);
    },
    "tool.call"(event) {
      const item = agentItem(event.run_id, `call-${event.call_id}`, "tool", event.source);
      item.querySelector(".content").textContent = `${event.name}(${event.arguments})`;
      stepsActivity(event.run_id, `Steps · ${event.source} is calling ${event.name}…`);
    },
    "tool.result"(event) {
      const item = agentItem(event.run_id, `call-${event.call_id}`, "tool", "tool");
      const result = document.createElement("pre");
      result.textContent = event.content;
      item.classList.toggle("tool-error", Boolean(event.is_error));
      item.querySelector(".content").append(result);
    },
    "message.updated"(event) {
      // A draft announced as the answer was replaced by a later one (a writer's revision): now a step.
      const m = event.message;
      const item = findMessage(m.id);
      if (!item) return;
      item.querySelector(".content").innerHTML = m.html; // sanitised on the server
      if (m.role !== "user" && !m.is_final_answer && !item.classList.contains("step")) {
        item.classList.add("step");
        placeItem(m.run_id, item, true);
      }
    },
    "run.finished"(event) {
      activeRun = null;
      stepsDone(event.run_id);
      if (event.error) {
        runError.textContent = `The answer failed: ${event.error.detail} (${event.error.code})`;
        runError.hidden = false;
      }
      setStatus(event.status === "succeeded" ? "Connected" : `Run ${event.status}`, "open");
    },
    error(event) {
      runError.textContent = `${event.detail} (${event.code})`;
      runError.hidden = false;
      if (lastSent) {
        if (!input.value) input.value = lastSent.content;
        lastSent.entries.forEach((entry) => {
          pending.push(entry);
          pendingList.append(entry.chip);
        });
        lastSent = null;
        renderPending();
      }
    },
  };

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    // after_seq: the server first sends every event after the last one this page has (none twice).
    const url = `${scheme}://${window.location.host}/ws/conversations/${conversationId}/?after_seq=${lastSeq}`;
    socket = new WebSocket(url);
    setStatus("Connecting…", "connecting");
    socket.addEventListener("open", () => {
      retryDelay = 500;
      window.chorusConnected = true;
      updateComposer();
    });
    socket.addEventListener("message", (frame) => {
      const event = JSON.parse(frame.data);
      if (typeof event.seq === "number" && event.type !== "hello") lastSeq = Math.max(lastSeq, event.seq);
      const handler = handlers[event.type];
      if (handler) handler(event);
      updateComposer();
      if (event.type === "token" || event.type === "message") scrollToEnd();
    });
    socket.addEventListener("close", (closed) => {
      window.chorusConnected = false;
      if (closed.code === 4401) {
        // The socket's session ended. Logged out (here or in another tab): go to the login form. Still logged
        // in with a newer session (the password was changed, which renews the session's key): reconnect.
        fetch("/api/teams/", { credentials: "same-origin" }).then(
          (answer) => {
            if (answer.status === 401) {
              window.location.assign(`/accounts/login/?next=${encodeURIComponent(window.location.pathname)}`);
            } else {
              setTimeout(connect, retryDelay);
            }
          },
          () => setTimeout(connect, retryDelay),
        );
        return;
      }
      setStatus("Offline: reconnecting…", "offline");
      updateComposer();
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 10000);
    });
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const content = input.value.trim();
    if (pending.some((p) => p.state === "uploading")) return;
    const attachments = pending.filter((p) => p.state === "ready").map((p) => p.attachment.id);
    if ((!content && !attachments.length) || !socket || socket.readyState !== WebSocket.OPEN) return;
    const frame = { type: "send", content, client_id: crypto.randomUUID() };
    if (attachments.length) frame.attachments = attachments;
    socket.send(JSON.stringify(frame));
    input.value = "";
    lastSent = attachments.length ? { content, entries: pending.filter((p) => p.state === "ready") } : null;
    pending = [];
    pendingList.replaceChildren();
    renderPending();
  });
  attachButton.addEventListener("click", () => attachInput.click());
  attachInput.addEventListener("change", () => {
    addFiles(attachInput.files);
    attachInput.value = "";
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
      addFiles(e.dataTransfer.files);
    }
  });
  input.addEventListener("paste", (e) => {
    const files = e.clipboardData && e.clipboardData.files;
    if (files && files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  stopButton.addEventListener("click", () => {
    if (socket && socket.readyState === WebSocket.OPEN && activeRun) {
      socket.send(JSON.stringify({ type: "cancel", run_id: activeRun }));
    }
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      form.requestSubmit();
    }
  });

  connect();
})();
