// Every page: the theme toggle, the dismissible offline-model notice, and the sidebar's toggle on phones.
(function () {
  "use strict";

  const root = document.documentElement;

  // A small button: `text` is its label, or an icon's class ("i-copy") named for screen readers by `label`.
  function button(className, label, text) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = className;
    b.setAttribute("aria-label", label);
    b.title = label;
    if (text.startsWith("i-")) {
      const glyph = document.createElement("span"); // an icon (chat.css), named for screen readers by aria-label
      glyph.className = `glyph ${text}`;
      glyph.setAttribute("aria-hidden", "true");
      b.append(glyph);
    } else {
      b.textContent = text;
    }
    return b;
  }
  window.ChorusUi = { button };

  function store(key, value) {
    try {
      if (value === null) localStorage.removeItem(key);
      else localStorage.setItem(key, value);
    } catch (e) {
      // storage refused: the choice lasts for this page only
    }
  }

  function currentTheme() {
    if (root.dataset.theme) return root.dataset.theme;
    return window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  const toggle = document.getElementById("theme-toggle");
  function showTheme() {
    if (toggle) toggle.setAttribute("aria-pressed", String(currentTheme() === "dark"));
  }
  if (toggle) {
    toggle.addEventListener("click", () => {
      const next = currentTheme() === "dark" ? "light" : "dark";
      root.dataset.theme = next;
      store("chorus-theme", next);
      showTheme();
    });
    showTheme();
  }

  // The offline-model notice: dismissed once, it stays away (it says the same on every page).
  const banner = document.getElementById("offline-model-banner");
  const dismiss = document.getElementById("offline-model-dismiss");
  let dismissed = null;
  try {
    dismissed = localStorage.getItem("chorus-offline-notice");
  } catch (e) {
    dismissed = null;
  }
  if (banner && dismissed === "dismissed") banner.hidden = true;
  if (dismiss) {
    dismiss.addEventListener("click", () => {
      banner.hidden = true;
      store("chorus-offline-notice", "dismissed");
    });
  }

  // Phones: the sidebar slides over the page; the button in the top bar opens and closes it.
  const sidebarToggle = document.getElementById("sidebar-toggle");
  const sidebar = document.getElementById("sidebar");
  if (sidebarToggle && sidebar) {
    const setOpen = (open) => {
      document.body.classList.toggle("sidebar-open", open);
      sidebarToggle.setAttribute("aria-expanded", String(open));
    };
    sidebarToggle.addEventListener("click", () => setOpen(!document.body.classList.contains("sidebar-open")));
    document.getElementById("sidebar-close")?.addEventListener("click", () => setOpen(false));
    // A tap beside the open sidebar (on the dimmed page) closes it.
    document.addEventListener("click", (e) => {
      if (!document.body.classList.contains("sidebar-open")) return;
      if (!sidebar.contains(e.target) && !sidebarToggle.contains(e.target)) setOpen(false);
    });
    window.ChorusPage = { closeSidebar: () => setOpen(false) };
  }
})();
