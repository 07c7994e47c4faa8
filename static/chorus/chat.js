// Chorus chat page: speaks protocol v1 (docs/protocol.md) over one WebSocket.
// Tokens are rendered as they come (appendTokens); when the message completes, the server's sanitised HTML
// replaces them (showServerHtml). Drawing lives in chat-dom.js, copy/feedback/share in actions.js, the
// conversation list in sidebar.js. No inline script anywhere: these files are the page's only code.
(function () {
  "use strict";

  const chat = document.getElementById("chat");
  if (!chat) return;

  const dom = window.ChorusDom;
  const actions = window.ChorusActions;
  const list = dom.list;
  const form = document.getElementById("composer");
  const input = document.getElementById("composer-input");
  const note = document.getElementById("composer-note");
  const sendButton = document.getElementById("send-button");
  const statusEl = document.getElementById("connection-status");
  const runError = document.getElementById("run-error");
  const stopButton = document.getElementById("stop-button");
  const offlineBanner = document.getElementById("offline-banner");
  const titleEl = document.getElementById("conversation-title");
  const emptyChat = document.getElementById("empty-chat");

  let conversationId = chat.dataset.conversationId;
  let creating = null; // the POST that creates a new conversation with its first message
  let socket = null;
  let lastSeq = parseInt(chat.dataset.lastSeq || "0", 10);
  let activeRun = chat.dataset.activeRun || null;
  let waitingRequest = null; // the open question of a run that waits for the person
  let retryDelay = 500;
  let outbox = []; // frames to send once the socket opens (a new conversation's first message)
  // What the last send carried until the server echoes it: a refused send gives it back to the composer.
  let lastSent = null;

  function setStatus(text, state) {
    statusEl.textContent = text;
    statusEl.dataset.state = state;
  }

  function isOpen() {
    return Boolean(socket && socket.readyState === WebSocket.OPEN);
  }

  // A refused request or a failed upload: said next to the composer, until dismissed or the next send.
  function notice(text) {
    runError.querySelector(".text").textContent = text;
    runError.hidden = false;
  }

  function clearNotice() {
    runError.hidden = true;
  }

  function busy() {
    return Boolean(activeRun) && !waitingRequest; // a waiting run takes the next message as its answer
  }

  function updateComposer() {
    const uploading = files.uploading();
    const connected = isOpen() || !conversationId;
    sendButton.disabled = !connected || busy() || uploading;
    stopButton.hidden = !activeRun;
    stopButton.disabled = !isOpen();
    offlineBanner.hidden = connected;
    input.placeholder = waitingRequest ? "Answer the team's question…" : "Ask the team… (drop or paste files here)";
    if (!busy()) note.hidden = true;
    refreshTurnActions();
  }

  // Edit is offered on the person's last message, Regenerate (Retry after a failure) on the last run, and
  // neither while a run answers.
  function refreshTurnActions() {
    list.querySelectorAll(".edit-message").forEach((b) => (b.hidden = true));
    list.querySelectorAll(".run-actions").forEach((a) => (a.hidden = true));
    if (activeRun || !conversationId) return;
    const users = list.querySelectorAll(":scope > li.message.user");
    const last = users[users.length - 1];
    const runId = last && last.dataset.runId;
    if (!runId) return; // a message that started no run (an imported one): nothing to replace
    // The message that started its run (a later one with the same run answered the team's question).
    const started = Array.from(users).find((li) => li.dataset.runId === runId);
    const edit = started.querySelector(".edit-message");
    if (edit) edit.hidden = false;
    const run = dom.findRun(runId);
    const runActions = run && run.querySelector(".run-actions");
    if (runActions) runActions.hidden = false;
  }

  // --- Drawing what the protocol says --------------------------------------------------------------------

  // Tokens of a message being written, rendered as Markdown while they stream (static/chorus/markdown-live.js).
  function appendTokens(item, delta) {
    if (window.ChorusMarkdown) {
      window.ChorusMarkdown.append(item.querySelector(".content"), delta); // static/chorus/markdown-live.js
    } else {
      item.querySelector(".content").append(document.createTextNode(delta));
    }
  }

  // A completed message: the server's sanitised HTML replaces what streamed.
  function showServerHtml(item, html) {
    const content = item.querySelector(".content");
    content.innerHTML = html; // sanitised on the server (agents_app/domain/rendering.py)
    if (window.ChorusMarkdown) window.ChorusMarkdown.settle(content);
    actions.decorate(content);
  }

  function ensureActions(item, m) {
    if (item.classList.contains("step") || item.querySelector(".message-actions")) return;
    item.append(actions.messageActions(m.role, m.role !== "user" && m.is_final_answer));
  }

  function setTitle(title) {
    const text = title || "New conversation";
    titleEl.textContent = text;
    document.title = `${text} · Chorus`;
    if (window.ChorusSidebar) window.ChorusSidebar.setTitle(conversationId, title);
  }

  function scrollToEnd() {
    window.scrollTo(0, document.body.scrollHeight);
  }

  const handlers = {
    hello(event) {
      // The server has already replayed what we missed (the URL carries our last seq); live events follow.
      activeRun = event.active_run_id;
      setStatus(activeRun ? (waitingRequest ? "Waiting for you" : "Answering…") : "Connected", "open");
    },
    message(event) {
      const m = event.message;
      let item = dom.findMessage(m.id);
      if (!item) {
        item = dom.newMessageItem(m.id, m.role, m.source);
        const step = m.role !== "user" && !m.is_final_answer;
        item.classList.toggle("step", step);
        if (m.role === "user") list.append(item);
        else dom.placeItem(m.run_id, item, step);
      }
      item.dataset.seq = String(m.seq);
      if (m.run_id) item.dataset.runId = m.run_id;
      if (m.role === "user") item.dataset.content = m.content;
      item.classList.remove("streaming");
      item.removeAttribute("aria-busy");
      item.classList.toggle("incomplete", Boolean(m.incomplete));
      if (m.incomplete && !item.querySelector(".source .tag")) {
        const tag = document.createElement("span");
        tag.className = "tag";
        tag.textContent = "incomplete";
        item.querySelector(".source").append(" ", tag);
      }
      showServerHtml(item, m.html);
      if (item.parentElement) dom.insertBySeq(item.parentElement, item); // its final place among the steps
      dom.showAttachments(item, m.attachments);
      ensureActions(item, m);
      emptyChat.hidden = true;
      if (m.role === "user") lastSent = null;
    },
    "run.started"(event) {
      activeRun = event.run_id;
      dom.runItem(event);
      setStatus("Answering…", "open");
    },
    token(event) {
      const item = dom.agentItem(event.run_id, event.stream_id, "assistant", event.source, event.seq);
      item.classList.add("streaming");
      item.setAttribute("aria-busy", "true");
      appendTokens(item, event.delta);
      if (item.classList.contains("step")) dom.stepsActivity(event.run_id, `Steps · ${event.source} is writing…`);
    },
    "tool.call"(event) {
      const item = dom.agentItem(event.run_id, `call-${event.call_id}`, "tool", event.source, event.seq);
      const call = document.createElement("code");
      call.className = "tool-call";
      call.textContent = `${event.name}(${event.arguments})`;
      item.querySelector(".content").replaceChildren(call);
      dom.stepsActivity(event.run_id, `Steps · ${event.source} is calling ${event.name}…`);
    },
    "tool.result"(event) {
      const item = dom.agentItem(event.run_id, `call-${event.call_id}`, "tool", "tool");
      const result = document.createElement("pre");
      result.textContent = event.content;
      item.classList.toggle("tool-error", Boolean(event.is_error));
      item.querySelector(".content").append(result);
    },
    "message.updated"(event) {
      // A draft announced as the answer was replaced by a later one (a writer's revision): now a step.
      const m = event.message;
      const item = dom.findMessage(m.id);
      if (!item) return;
      showServerHtml(item, m.html);
      if (m.role !== "user" && !m.is_final_answer && !item.classList.contains("step")) {
        item.classList.add("step");
        item.querySelector(".message-actions")?.remove();
        item.querySelector(".feedback-form")?.remove();
        dom.placeItem(m.run_id, item, true);
      }
    },
    "run.finished"(event) {
      activeRun = null;
      waitingRequest = null;
      dom.stepsDone(event.run_id);
      dom.showTurnError(event.run_id, event.status, event.error);
      setStatus(event.status === "succeeded" ? "Connected" : `Run ${event.status}`, "open");
    },
    "conversation.updated"(event) {
      setTitle(event.title);
    },
    "turn.replaced"(event) {
      dom.removeTurn(event.message_id, event.run_id);
    },
    "input.request"(event) {
      activeRun = event.run_id;
      waitingRequest = event.request_id;
      dom.inputCard(event);
      setStatus("Waiting for you", "open");
      if (window.ChorusSidebar) window.ChorusSidebar.setWaiting(conversationId, true);
    },
    "input.answered"(event) {
      dom.closeInputCard(event.request_id);
      if (waitingRequest === event.request_id) waitingRequest = null;
      if (window.ChorusSidebar) window.ChorusSidebar.setWaiting(conversationId, false);
      setStatus("Answering…", "open");
    },
    error(event) {
      notice(`${event.detail} (${event.code})`);
      if (lastSent) {
        if (!input.value) input.value = lastSent.content;
        files.giveBack(lastSent.entries);
        lastSent = null;
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
      outbox.forEach((frame) => socket.send(JSON.stringify(frame)));
      outbox = [];
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

  // A new conversation is stored when its first message is sent (or its first file attached), not when the
  // page opens: "New conversation" leaves no empty rows behind.
  function ensureConversation() {
    if (conversationId) return Promise.resolve(conversationId);
    if (creating) return creating;
    const team = document.getElementById("team-select");
    creating = actions
      .api("POST", "/api/conversations/", team && team.value ? { team: team.value } : {})
      .then(({ body }) => {
        conversationId = body.id;
        chat.dataset.conversationId = body.id;
        lastSeq = body.last_seq;
        window.history.replaceState(null, "", `/conversations/${body.id}/`);
        if (team) team.disabled = true;
        if (window.ChorusSidebar) {
          window.ChorusSidebar.upsert(body);
          window.ChorusSidebar.setCurrent(body.id);
        }
        connect();
        return body.id;
      })
      .finally(() => {
        creating = null;
      });
    return creating;
  }

  // --- The composer ----------------------------------------------------------------------------------------

  // Files chosen for the next message (chat-files.js): uploaded at once, sent with it.
  const files = window.ChorusFiles.composer({
    ensureConversation,
    conversationId: () => conversationId,
    notice,
    changed: () => updateComposer(),
  });

  function send() {
    const content = input.value.trim();
    if (files.uploading()) return;
    const ready = files.ready();
    if (!content && !ready.length) return;
    if (busy()) {
      // Never lost: the text stays in the composer until the answer ends (or is stopped).
      note.textContent = "The team is still answering: your message stays here. Send it when the answer ends, or press Stop (Esc).";
      note.hidden = false;
      return;
    }
    if (conversationId && !isOpen()) return;
    const frame = { type: "send", content, client_id: crypto.randomUUID() };
    if (ready.length) frame.attachments = ready.map((p) => p.attachment.id);
    clearNotice();
    lastSent = { content, entries: ready };
    input.value = "";
    files.clear();
    ensureConversation().then(
      () => {
        if (isOpen()) socket.send(JSON.stringify(frame));
        else outbox.push(frame);
      },
      (err) => {
        notice(err.message);
        if (!input.value) input.value = content;
      },
    );
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  // Enter sends exactly as the Send button does (Shift+Enter: a new line).
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  function stop() {
    if (isOpen() && activeRun) socket.send(JSON.stringify({ type: "cancel", run_id: activeRun }));
  }
  stopButton.addEventListener("click", stop);
  document.getElementById("run-error-dismiss").addEventListener("click", clearNotice);
  // Esc stops the answer, wherever the focus is (a field that uses Esc itself marks the event as handled).
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !e.defaultPrevented && activeRun && !waitingRequest) stop();
  });

  // An open question in the history (the page was loaded while the run waits) gets its card back.
  if (chat.dataset.inputRequest) {
    const open = JSON.parse(chat.dataset.inputRequest);
    handlers["input.request"](open);
  }

  window.ChorusChat = {
    notice,
    clearNotice,
    conversationId: () => conversationId,
    // A frame for the socket, if it is open (a question's answer): true when sent.
    sendFrame(frame) {
      if (!isOpen()) return false;
      socket.send(JSON.stringify(frame));
      return true;
    },
  };
  if ("scrollRestoration" in window.history) window.history.scrollRestoration = "manual";
  updateComposer();
  if (conversationId) connect();
  // The page opens at the latest message, ready to type.
  scrollToEnd();
  input.focus({ preventScroll: true });
})();
