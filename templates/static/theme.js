// Light/dark theme: follows the system unless the reader picks one (kept in localStorage).
(function () {
  "use strict";
  var KEY = "llava-interp-theme";
  var root = document.documentElement;
  function stored() {
    try { return window.localStorage.getItem(KEY); } catch (e) { return null; }
  }
  function apply(theme) {
    if (theme === "light" || theme === "dark") root.setAttribute("data-theme", theme);
    else root.removeAttribute("data-theme");
  }
  apply(stored());
  document.addEventListener("DOMContentLoaded", function () {
    var button = document.getElementById("theme-toggle");
    if (!button) return;
    var order = ["auto", "light", "dark"];
    var current = stored() || "auto";
    function label() { button.textContent = "Theme: " + current; }
    button.addEventListener("click", function () {
      var next = order[(order.indexOf(current) + 1) % order.length];
      current = next;
      try {
        if (next === "auto") window.localStorage.removeItem(KEY);
        else window.localStorage.setItem(KEY, next);
      } catch (e) { /* storage blocked: the choice lasts for this page only */ }
      apply(next);
      button.textContent = "Theme: " + next;
    });
    button.hidden = false;
    label();
  });
})();
