// llava-interp report: the relative-depth comparison page (templates/depth.html.j2).
//
// Every run's marks (chart series, bars, rows of the n tables) carry data-run="run-N", a key
// the build generates; a cleared checkbox of #run-picker hides them. The hidden runs are kept
// in the URL hash (#hide=run-1,run-3) so a view can be linked. Works from file:// (no fetch),
// and reads no database string: only the generated keys.
(function () {
  "use strict";
  var picker = document.getElementById("run-picker");
  if (!picker) return;
  var boxes = Array.prototype.slice.call(picker.querySelectorAll("input[type=checkbox]"));
  var KEY = /^run-\d+$/;

  function apply() {
    var hidden = {};
    boxes.forEach(function (box) { if (!box.checked) hidden[box.value] = true; });
    var marks = document.querySelectorAll("[data-run]");
    for (var i = 0; i < marks.length; i++) {
      var mark = marks[i];
      if (mark.classList.contains("depth-run")) continue; // the picker's own labels stay
      if (hidden[mark.getAttribute("data-run")]) mark.setAttribute("display", "none");
      else mark.removeAttribute("display");
      if (mark.tagName.toLowerCase() === "tr") mark.hidden = !!hidden[mark.getAttribute("data-run")];
    }
    var keys = Object.keys(hidden).filter(function (k) { return KEY.test(k); });
    var hash = keys.length ? "#hide=" + keys.join(",") : "";
    if (location.hash !== hash) history.replaceState(null, "", hash || location.pathname + location.search);
  }

  function fromHash() {
    var match = /(?:^#|&)hide=([^&]*)/.exec(location.hash);
    var hide = {};
    if (match) match[1].split(",").forEach(function (k) { if (KEY.test(k)) hide[k] = true; });
    boxes.forEach(function (box) { box.checked = !hide[box.value]; });
  }

  boxes.forEach(function (box) { box.addEventListener("change", apply); });
  ["runs-all", "runs-none"].forEach(function (id) {
    var button = document.getElementById(id);
    if (!button) return;
    button.hidden = false;
    button.addEventListener("click", function () {
      boxes.forEach(function (box) { box.checked = id === "runs-all"; });
      apply();
    });
  });
  // A link to another selection on this page changes only the hash: no reload.
  window.addEventListener("hashchange", function () { fromHash(); apply(); });
  fromHash();
  apply();
})();
