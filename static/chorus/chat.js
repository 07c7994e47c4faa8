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

  let socket = null;
  let lastSeq = parseInt(chat.dataset.lastSeq || "0", 10);
  let activeRun = chat.dataset.activeRun || null;
  let retryDelay = 500;

  function setStatus(text, state) {
    statusEl.textContent = text;
    statusEl.dataset.state = state;
  }

  function updateComposer() {
    const open = socket && socket.readyState === WebSocket.OPEN;
    sendButton.disabled = !open || Boolean(activeRun);
    stopButton.hidden = !activeRun;
    stopButton.disabled = !open;
    offlineBanner.hidden = open;
  }

  function messageItem(id, role, source) {
    let item = list.querySelector(`li[data-message-id="${CSS.escape(id)}"]`);
    if (!item) {
      item = document.createElement("li");
      item.dataset.messageId = id;
      item.className = `message ${role}`;
      const sourceEl = document.createElement("div");
      sourceEl.className = "source";
      sourceEl.textContent = source;
      const content = document.createElement("div");
      content.className = "content";
      item.append(sourceEl, content);
      list.append(item);
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
      const item = messageItem(m.id, m.role, m.source);
      item.classList.remove("streaming");
      item.classList.toggle("step", m.role !== "user" && !m.is_final_answer);
      item.classList.toggle("incomplete", Boolean(m.incomplete));
      if (m.incomplete && !item.querySelector(".source .tag")) {
        const tag = document.createElement("span");
        tag.className = "tag";
        tag.textContent = "incomplete";
        item.querySelector(".source").append(" ", tag);
      }
      item.querySelector(".content").innerHTML = m.html; // sanitised on the server (agents_app/rendering.py)
    },
    "run.started"(event) {
      activeRun = event.run_id;
      runError.hidden = true;
      setStatus("Answering…", "open");
    },
    token(event) {
      const item = messageItem(event.stream_id, "assistant", event.source);
      item.classList.add("streaming");
      item.querySelector(".content").append(document.createTextNode(event.delta));
    },
    "tool.call"(event) {
      const item = messageItem(`call-${event.call_id}`, "tool", event.source);
      item.classList.add("step");
      item.querySelector(".content").textContent = `${event.name}(${event.arguments})`;
    },
    "tool.result"(event) {
      const item = messageItem(`call-${event.call_id}`, "tool", "tool");
      const result = document.createElement("pre");
      result.textContent = event.content;
      item.querySelector(".content").append(result);
    },
    "run.finished"(event) {
      activeRun = null;
      if (event.error) {
        runError.textContent = `The answer failed: ${event.error.detail} (${event.error.code})`;
        runError.hidden = false;
      }
      setStatus(event.status === "succeeded" ? "Connected" : `Run ${event.status}`, "open");
    },
    error(event) {
      runError.textContent = `${event.detail} (${event.code})`;
      runError.hidden = false;
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
    socket.addEventListener("close", () => {
      window.chorusConnected = false;
      setStatus("Offline: reconnecting…", "offline");
      updateComposer();
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 10000);
    });
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const content = input.value.trim();
    if (!content || !socket || socket.readyState !== WebSocket.OPEN) return;
    socket.send(JSON.stringify({ type: "send", content, client_id: crypto.randomUUID() }));
    input.value = "";
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
