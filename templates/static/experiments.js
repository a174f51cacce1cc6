// llava-interp report: ablation and blocking pages (templates/ablation.html.j2, blocking.html.j2).
//
// Image pages: the overlay data is the JSON in <script type="application/json" id="overlay-data">:
// {grid_rows, grid_cols, overlays: [{key: [a, b], cells: [[row, col], ...], outline: [[row, col], ...],
// caption}]}. The cells come from the positions table (report/pages/ablation.py and blocking.py); this
// script only draws them. The selects marked data-overlay-part="i" give key[i]; elements with
// data-select='[a, b]' select that key on click; elements with data-key='[a, b]' are shown only
// while their key is selected. The selection is kept in the URL hash (#sel=<json>).
// Run pages: every figure[data-figure-name] gets a button that saves its SVG as a file.
// No string from the database is ever parsed as HTML: text goes through textContent only.
(function () {
  "use strict";
  var SVG_NS = "http://www.w3.org/2000/svg";

  function sameKey(a, b) {
    if (!Array.isArray(a) || !Array.isArray(b) || a.length !== b.length) return false;
    for (var i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
    return true;
  }

  function parseKey(text) {
    try {
      var value = JSON.parse(text);
      return Array.isArray(value) ? value : null;
    } catch (e) {
      return null;
    }
  }

  function setupOverlay() {
    var source = document.getElementById("overlay-data");
    var svg = document.getElementById("overlay");
    if (!source || !svg) return;
    var data = JSON.parse(source.textContent);
    var caption = document.getElementById("overlay-caption");
    var selects = Array.prototype.slice.call(document.querySelectorAll("select[data-overlay-part]"));
    selects.sort(function (a, b) { return Number(a.dataset.overlayPart) - Number(b.dataset.overlayPart); });

    function currentKey() { return selects.map(function (s) { return s.value; }); }

    function find(key) {
      for (var i = 0; i < data.overlays.length; i++) if (sameKey(data.overlays[i].key, key)) return data.overlays[i];
      return null;
    }

    function rect(cell, cls) {
      var r = document.createElementNS(SVG_NS, "rect");
      r.setAttribute("x", String(cell[1]));
      r.setAttribute("y", String(cell[0]));
      r.setAttribute("width", "1");
      r.setAttribute("height", "1");
      r.setAttribute("class", cls);
      r.setAttribute("data-cell", cell[0] + "," + cell[1]);
      return r;
    }

    function draw(updateHash) {
      var key = currentKey();
      var overlay = find(key);
      while (svg.firstChild) svg.removeChild(svg.firstChild);
      if (overlay) {
        (overlay.cells || []).forEach(function (c) { svg.appendChild(rect(c, "cell-fill")); });
        (overlay.outline || []).forEach(function (c) { svg.appendChild(rect(c, "cell-outline")); });
      }
      if (caption) caption.textContent = overlay ? overlay.caption : "No row for " + key.join(" / ") + ".";
      document.querySelectorAll("[data-key]").forEach(function (el) {
        el.hidden = !sameKey(parseKey(el.getAttribute("data-key")), key);
      });
      document.querySelectorAll("[data-select]").forEach(function (el) {
        el.classList.toggle("selected", sameKey(parseKey(el.getAttribute("data-select")), key));
      });
      document.body.dataset.overlayKey = JSON.stringify(key);
      if (updateHash && history.replaceState) {
        history.replaceState(null, "", "#sel=" + encodeURIComponent(JSON.stringify(key)));
      }
    }

    function select(key, updateHash) {
      if (!key || key.length !== selects.length) return false;
      for (var i = 0; i < selects.length; i++) {
        var ok = Array.prototype.some.call(selects[i].options, function (o) { return o.value === key[i]; });
        if (!ok) return false;
      }
      selects.forEach(function (s, i) { s.value = key[i]; });
      draw(updateHash);
      return true;
    }

    selects.forEach(function (s) { s.addEventListener("change", function () { draw(true); }); });
    document.querySelectorAll("[data-select]").forEach(function (el) {
      function pick() { select(parseKey(el.getAttribute("data-select")), true); }
      el.addEventListener("click", pick);
      el.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); pick(); }
      });
    });
    var match = /(?:^#|&)sel=([^&]*)/.exec(location.hash);
    var fromHash = match ? parseKey(decodeURIComponent(match[1])) : null;
    if (!fromHash || !select(fromHash, false)) draw(false);
    document.body.dataset.overlayReady = "1";
  }

  function setupSvgDownloads() {
    document.querySelectorAll("figure[data-figure-name]").forEach(function (figure) {
      var svg = figure.querySelector("svg");
      if (!svg || !window.Blob || !window.URL || !URL.createObjectURL) return;
      var button = document.createElement("button");
      button.type = "button";
      button.className = "svg-save";
      button.textContent = "Save SVG";
      button.addEventListener("click", function () {
        var text = '<?xml version="1.0" encoding="UTF-8"?>\n' + new XMLSerializer().serializeToString(svg);
        var url = URL.createObjectURL(new Blob([text], { type: "image/svg+xml" }));
        var a = document.createElement("a");
        a.href = url;
        a.download = figure.dataset.figureName + ".svg";
        document.body.appendChild(a);
        a.click();
        a.remove();
        setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
      });
      var caption = figure.querySelector("figcaption");
      (caption || figure).appendChild(button);
    });
  }

  setupOverlay();
  setupSvgDownloads();
})();
