// The chat page's drawing: message items, runs with their steps and answers, errors on the turn that failed,
// and the questions a team asks (input.request cards). Drawn live exactly as the server draws the history
// (templates/agents_app/_run.html, _message.html, _tool_call.html), so a reload shows the same page.
// chat.js (the protocol) calls these through window.ChorusDom.
(function () {
  "use strict";

  const list = document.getElementById("messages");
  if (!list) return;

  const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];

  function formatSize(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  function findMessage(id) {
    return list.querySelector(`li[data-message-id="${CSS.escape(id)}"]`);
  }

  function findRun(runId) {
    return runId ? list.querySelector(`li.run[data-run-id="${CSS.escape(runId)}"]`) : null;
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
    item.querySelector(".content").after(ul);
  }

  // Each run is one <li class="run">: a header naming the team (and why a router picked it), a "steps"
  // block for inner agents and tools (open, folded or absent, as the team says), then the answer.
  function runItem(event) {
    let item = findRun(event.run_id);
    if (item) return item;
    item = document.createElement("li");
    item.className = "run";
    item.dataset.runId = event.run_id;
    item.dataset.status = "running";
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
    answers.setAttribute("aria-live", "polite");
    const actions = document.createElement("div");
    actions.className = "run-actions";
    actions.hidden = true;
    const again = document.createElement("button");
    again.type = "button";
    again.className = "secondary small regenerate";
    again.textContent = "Regenerate";
    actions.append(again);
    item.append(answers, actions);
    list.append(item);
    return item;
  }

  function isStep(run, source, role) {
    const finals = run.dataset.finalSpeakers ? run.dataset.finalSpeakers.split(",") : [];
    return role === "tool" || (finals.length > 0 && !finals.includes(source));
  }

  // Steps in seq order, as the history orders them: a writer's draft that turns out not to be the answer
  // moves back among the steps at its own place, not after the critique that followed it.
  function insertBySeq(container, item) {
    const seq = parseInt(item.dataset.seq || "", 10);
    if (!Number.isNaN(seq)) {
      for (const sibling of container.children) {
        const other = parseInt(sibling.dataset.seq || "", 10);
        if (sibling !== item && !Number.isNaN(other) && other > seq) {
          container.insertBefore(item, sibling);
          return;
        }
      }
    }
    container.append(item);
  }

  // Where an agent's message goes: its run's steps or its answers (a run we never saw: the main list).
  function placeItem(runId, item, step) {
    const run = findRun(runId);
    if (!run) {
      list.append(item);
      return;
    }
    const details = run.querySelector("details.steps");
    if (step && details) {
      details.hidden = false;
      insertBySeq(details.querySelector(".step-list"), item);
    } else {
      insertBySeq(run.querySelector(".answers"), item);
    }
  }

  // The folded "Steps" line says what the inner agents are doing while the answer is still to come.
  function stepsActivity(runId, text) {
    const summary = findRun(runId)?.querySelector("details.steps > summary");
    if (summary) summary.textContent = text;
  }

  function stepsDone(runId) {
    const details = findRun(runId)?.querySelector("details.steps");
    if (!details) return;
    details.querySelector("summary").textContent = `Steps (${details.querySelectorAll(".step-list > li").length})`;
  }

  function agentItem(runId, id, role, source, seq) {
    let item = findMessage(id);
    if (!item) {
      item = newMessageItem(id, role, source);
      if (seq !== undefined) item.dataset.seq = String(seq);
      const run = findRun(runId);
      const step = run ? isStep(run, source, role) : false;
      item.classList.toggle("step", step);
      placeItem(runId, item, step);
    }
    return item;
  }

  // The reason a turn failed, in words, on the turn itself (kept after a reload: _run.html draws the same).
  function showTurnError(runId, status, error) {
    const run = findRun(runId) || runItem({ run_id: runId });
    run.dataset.status = status;
    run.querySelector(".turn-error")?.remove();
    const again = run.querySelector(".run-actions .regenerate");
    if (again) again.textContent = status === "succeeded" ? "Regenerate" : "Retry";
    if (status === "succeeded") return;
    const box = document.createElement("div");
    box.className = "turn-error";
    box.setAttribute("role", "alert");
    box.dataset.code = error ? error.code : "";
    if (error && error.detail) box.textContent = error.detail;
    else box.textContent = status === "cancelled" ? "Stopped before the answer was complete." : "The answer failed.";
    run.querySelector(".run-actions").before(box);
  }

  // A question the team asks the person: the prompt, its options as buttons, and a box for any answer.
  function inputCard(event) {
    const run = findRun(event.run_id) || runItem({ run_id: event.run_id });
    let card = run.querySelector(`.input-request[data-request-id="${CSS.escape(event.request_id)}"]`);
    if (card) return card;
    card = document.createElement("form");
    card.className = "input-request";
    card.dataset.requestId = event.request_id;
    card.setAttribute("aria-label", `${event.source} asks you`);
    const who = document.createElement("div");
    who.className = "source";
    who.textContent = `${event.source} asks you`;
    const prompt = document.createElement("p");
    prompt.className = "prompt";
    prompt.textContent = event.prompt;
    card.append(who, prompt);
    if (event.options && event.options.length) {
      const options = document.createElement("div");
      options.className = "options";
      event.options.forEach((label) => {
        const option = document.createElement("button");
        option.type = "button";
        option.className = "small option";
        option.dataset.answer = label;
        option.textContent = label;
        options.append(option);
      });
      card.append(options);
    }
    const box = document.createElement("div");
    box.className = "answer-box";
    const field = document.createElement("textarea");
    field.rows = 2;
    field.className = "answer";
    field.setAttribute("aria-label", "Your answer");
    field.placeholder = event.options && event.options.length ? "Or write an answer…" : "Your answer…";
    const submit = document.createElement("button");
    submit.type = "submit";
    submit.className = "small";
    submit.textContent = "Answer";
    box.append(field, submit);
    card.append(box);
    run.querySelector(".run-actions").before(card);
    return card;
  }

  function closeInputCard(requestId) {
    list.querySelector(`.input-request[data-request-id="${CSS.escape(requestId)}"]`)?.remove();
  }

  // The person replaced their last turn: their message and its run are gone.
  function removeTurn(messageId, runId) {
    if (messageId) findMessage(messageId)?.remove();
    findRun(runId)?.remove();
    list.querySelectorAll(`li.message.user[data-run-id="${CSS.escape(runId || "")}"]`).forEach((li) => li.remove());
  }

  window.ChorusDom = {
    list, findMessage, findRun, newMessageItem, showAttachments, runItem, placeItem, agentItem, insertBySeq,
    stepsActivity, stepsDone, showTurnError, inputCard, closeInputCard, removeTurn,
  };
})();
