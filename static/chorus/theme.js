// The theme the person picked with the toggle (light or dark), applied before the page is drawn; without a
// pick, the page follows the system's prefers-color-scheme (chat.css).
(function () {
  "use strict";
  try {
    const picked = localStorage.getItem("chorus-theme");
    if (picked === "light" || picked === "dark") document.documentElement.dataset.theme = picked;
  } catch (e) {
    // storage refused (a private window's policy): the system's theme applies
  }
})();
