// The sidebar: the person's conversations, most recently active first, from GET /api/conversations/ a page at
// a time as the list scrolls (its Link header says whether there is more), searched by title and message text
// (?q=), renamed in place (PATCH) and deleted after a confirmation (DELETE). `/` focuses the search.
// window.ChorusSidebar lets the chat page add the conversation it just created and show live titles.
(function () {
  "use strict";

  const list = document.getElementById("conversation-list");
  if (!list) return;
  const search = document.getElementById("conversation-search");
  const status = document.getElementById("conversation-list-status");
  const end = document.getElementById("conversation-list-end");
  const PAGE = 30;

  let query = "";
  let offset = 0;
  let more = true;
  let loading = null;
  let generation = 0; // a new search makes the answers of older ones stale

  function api(method, path, body) {
    return window.ChorusActions.api(method, path, body);
  }

  function titleOf(conversation) {
    return conversation.title || "New conversation";
  }

  function row(conversation) {
    const li = document.createElement("li");
    li.className = "conversation";
    li.dataset.id = conversation.id;
    const link = document.createElement("a");
    link.className = "conversation-link";
    link.href = `/conversations/${conversation.id}/`;
    const title = document.createElement("span");
    title.className = "conversation-title";
    title.textContent = titleOf(conversation);
    link.append(title);
    const badge = document.createElement("span");
    badge.className = "badge waiting";
    badge.textContent = "waiting for you";
    badge.hidden = !conversation.waiting_for_input;
    link.append(badge);
    if (conversation.id === list.dataset.current) link.setAttribute("aria-current", "page");
    const rename = button("icon rename", `Rename “${titleOf(conversation)}”`, "i-edit");
    const remove = button("icon delete", `Delete “${titleOf(conversation)}”`, "i-trash");
    li.append(link, rename, remove);
    return li;
  }

  const button = window.ChorusUi.button; // page.js

  function find(id) {
    return list.querySelector(`li.conversation[data-id="${CSS.escape(id)}"]`);
  }

  function load() {
    if (loading || !more) return loading;
    const mine = generation;
    const params = new URLSearchParams({ limit: String(PAGE), offset: String(offset) });
    if (query) params.set("q", query);
    status.textContent = "Loading…";
    loading = api("GET", `/api/conversations/?${params}`)
      .then(({ body, answer }) => {
        if (mine !== generation) return;
        body.forEach((conversation) => {
          if (!find(conversation.id)) list.append(row(conversation));
        });
        offset += body.length;
        more = /rel="next"/.test(answer.headers.get("Link") || "");
        if (list.children.length === 0) status.textContent = query ? "Nothing matches." : "No conversations yet.";
        else status.textContent = "";
      })
      .catch((err) => {
        if (mine === generation) status.textContent = err.message;
      })
      .finally(() => {
        if (mine !== generation) return;
        loading = null;
        // The list may not fill the sidebar yet: keep going while its end is in view.
        if (more && endInView()) load();
      });
    return loading;
  }

  function endInView() {
    const box = end.getBoundingClientRect();
    const sidebar = list.closest(".sidebar").getBoundingClientRect();
    return box.top <= sidebar.bottom + 200;
  }

  function restart() {
    generation += 1;
    loading = null;
    offset = 0;
    more = true;
    list.replaceChildren();
    load();
  }

  new IntersectionObserver((entries) => {
    if (entries.some((entry) => entry.isIntersecting)) load();
  }, { root: list.closest(".sidebar"), rootMargin: "200px" }).observe(end);

  let typing = 0;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      const next = search.value.trim();
      if (next === query) return;
      query = next;
      restart();
    }, 250);
  });
  search.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && search.value) {
      e.preventDefault(); // clears the search; does not stop an answer
      search.value = "";
      search.dispatchEvent(new Event("input"));
    }
  });

  // --- Rename in place ---
  function startRename(li) {
    const link = li.querySelector(".conversation-link");
    const title = li.querySelector(".conversation-title");
    const field = document.createElement("input");
    field.type = "text";
    field.className = "rename-field";
    field.maxLength = 200;
    field.value = title.textContent === "New conversation" ? "" : title.textContent;
    field.setAttribute("aria-label", "New title");
    link.hidden = true;
    li.prepend(field);
    field.focus();
    field.select();
    let finished = false;
    const finish = (save) => {
      if (finished) return;
      finished = true;
      const wanted = field.value.trim();
      field.remove();
      link.hidden = false;
      if (!save || wanted === field.defaultValue) return;
      api("PATCH", `/api/conversations/${li.dataset.id}/`, { title: wanted }).then(
        ({ body }) => setTitle(body.id, body.title),
        (err) => (status.textContent = err.message),
      );
    };
    field.addEventListener("keydown", (e) => {
      if (e.key === "Enter") {
        e.preventDefault();
        finish(true);
      } else if (e.key === "Escape") {
        e.preventDefault();
        finish(false);
      }
    });
    field.addEventListener("blur", () => finish(true));
  }

  // --- Delete, once confirmed ---
  function confirmDelete(li) {
    if (li.querySelector(".confirm-delete")) return;
    const box = document.createElement("div");
    box.className = "confirm-delete";
    box.setAttribute("role", "alertdialog");
    box.setAttribute("aria-label", "Delete this conversation?");
    const text = document.createElement("span");
    text.textContent = "Delete it for good?";
    const yes = button("small danger confirm", "Delete the conversation", "Delete");
    const no = button("small secondary cancel", "Keep it", "Cancel");
    box.append(text, yes, no);
    li.append(box);
    no.focus();
    no.addEventListener("click", () => box.remove());
    box.addEventListener("keydown", (e) => {
      if (e.key === "Escape") {
        e.preventDefault();
        box.remove();
      }
    });
    yes.addEventListener("click", () => {
      api("DELETE", `/api/conversations/${li.dataset.id}/`).then(
        () => {
          li.remove();
          if (li.dataset.id === list.dataset.current) window.location.assign("/");
        },
        (err) => {
          text.textContent = err.message;
          yes.remove();
        },
      );
    });
  }

  list.addEventListener("click", (e) => {
    const target = e.target.closest("button");
    const li = e.target.closest("li.conversation");
    if (!target || !li) return;
    if (target.classList.contains("rename")) startRename(li);
    else if (target.classList.contains("delete")) confirmDelete(li);
  });

  function setTitle(id, title) {
    const li = find(id);
    if (!li) return;
    const text = title || "New conversation";
    li.querySelector(".conversation-title").textContent = text;
    li.querySelector(".rename").setAttribute("aria-label", `Rename “${text}”`);
    li.querySelector(".delete").setAttribute("aria-label", `Delete “${text}”`);
  }

  // The conversation the page just created (or that just had activity) goes to the top.
  function upsert(conversation) {
    const li = find(conversation.id) || row(conversation);
    list.prepend(li);
    setTitle(conversation.id, conversation.title);
    status.textContent = "";
  }

  function setCurrent(id) {
    list.dataset.current = id;
    list.querySelectorAll("a[aria-current]").forEach((a) => a.removeAttribute("aria-current"));
    find(id)?.querySelector(".conversation-link").setAttribute("aria-current", "page");
  }

  function setWaiting(id, waiting) {
    const badge = find(id)?.querySelector(".badge.waiting");
    if (badge) badge.hidden = !waiting;
  }

  document.addEventListener("keydown", (e) => {
    if (e.key !== "/" || e.ctrlKey || e.metaKey || e.altKey) return;
    const active = document.activeElement;
    if (active && (active.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName))) return;
    e.preventDefault();
    document.body.classList.add("sidebar-open"); // on a phone, the list slides in
    search.focus();
  });

  window.ChorusSidebar = { upsert, setTitle, setCurrent, setWaiting };
  load();
})();
