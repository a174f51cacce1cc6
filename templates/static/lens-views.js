// Logit-lens page, the image views: the patch grid over the model's view, the grids of
// extra views (e.g. LLaVA-NeXT's high-resolution view), the object outlines, and the
// token map with its legend. Patches map to table rows only through the model's
// rowOfPatch / cellOfRow lookups. Part of window.LlavaLens (see lens-data.js).
(function (global) {
  "use strict";
  var ns = global.LlavaLens = global.LlavaLens || {};
  var document = global.document;
  var SVG_NS = "http://www.w3.org/2000/svg";

  // elements: {grid, outlines, showOutlines, legend, legendTitle, legendItems} (any may be null).
  function PatchViews(model, elements) {
    this.model = model;
    this.elements = elements;
    this.patchEls = [];
    this.extraCellEls = []; // per extra view, its cell elements
  }

  // Cells are items of a CSS grid (set on the container), not positioned boxes: 576
  // positioned boxes would each be a paint layer that every hover hit-tests and repaints.
  function cellElement(r, c, rows, cols, attribute, value) {
    var cell = ns.text.el("div", "patch");
    cell.setAttribute(attribute, String(value));
    return cell;
  }

  function gridTemplate(container, rows, cols) {
    container.style.gridTemplateColumns = "repeat(" + cols + ", 1fr)";
    container.style.gridTemplateRows = "repeat(" + rows + ", 1fr)";
  }

  PatchViews.prototype.buildGrid = function () {
    var grid = this.elements.grid, model = this.model;
    if (!grid) return;
    gridTemplate(grid, model.gridRows, model.gridCols);
    // The active / locked patch is drawn by one box moved with a transform.
    this.box = ns.text.el("div", "patch-box");
    this.box.setAttribute("aria-hidden", "true");
    this.box.hidden = true;
    this.box.style.width = (100 / model.gridCols) + "%";
    this.box.style.height = (100 / model.gridRows) + "%";
    grid.parentNode.appendChild(this.box);
    var fragment = document.createDocumentFragment();
    for (var r = 0; r < model.gridRows; r++) {
      for (var c = 0; c < model.gridCols; c++) {
        var patch = cellElement(r, c, model.gridRows, model.gridCols, "data-patch", r * model.gridCols + c);
        if (model.rowOfPatch[r * model.gridCols + c] < 0) patch.classList.add("no-position");
        fragment.appendChild(patch);
        this.patchEls.push(patch);
      }
    }
    grid.appendChild(fragment);
  };

  // The table row of the patch under an event on the main grid, or null.
  PatchViews.prototype.patchTarget = function (event) {
    var attr = event.target.getAttribute && event.target.getAttribute("data-patch");
    if (attr === null || attr === undefined) return null;
    var row = this.model.rowOfPatch[Number(attr)];
    return row >= 0 ? row : null;
  };

  // Builds each extra view's grid; hover(row) and click(row) receive the row of the cell.
  PatchViews.prototype.buildExtraGrids = function (hover, click) {
    var self = this;
    this.model.extraViews.forEach(function (extra, index) {
      var container = document.getElementById("extra-grid-" + index);
      var cells = [];
      self.extraCellEls.push(cells);
      if (!container) return;
      var rows = extra.view.grid_rows, cols = extra.view.grid_cols;
      gridTemplate(container, rows, cols);
      var fragment = document.createDocumentFragment();
      for (var r = 0; r < rows; r++) {
        for (var c = 0; c < cols; c++) {
          var cell = cellElement(r, c, rows, cols, "data-cell", r * cols + c);
          if (extra.rowOfCell[r * cols + c] < 0) cell.classList.add("no-position");
          fragment.appendChild(cell);
          cells.push(cell);
        }
      }
      container.appendChild(fragment);
      function target(event) {
        var attr = event.target.getAttribute && event.target.getAttribute("data-cell");
        if (attr === null || attr === undefined) return null;
        var row = extra.rowOfCell[Number(attr)];
        return row >= 0 ? row : null;
      }
      container.addEventListener("mouseover", function (event) {
        var row = target(event);
        if (row !== null) hover(row, event);
      });
      container.addEventListener("click", function (event) {
        var row = target(event);
        if (row !== null) click(row);
      });
    });
  };

  // The cell elements of a row: its patch on the main grid and its cells in the extra views.
  PatchViews.prototype.cellsOf = function (row) {
    var out = [], self = this;
    var patch = this.model.patchOfRow[row];
    if (patch >= 0 && this.patchEls.length) out.push(this.patchEls[patch]);
    this.model.extraViews.forEach(function (extra, index) {
      var cell = extra.cellOfRow[row];
      if (cell >= 0 && self.extraCellEls[index] && self.extraCellEls[index][cell]) out.push(self.extraCellEls[index][cell]);
    });
    return out;
  };

  // state: "active", "locked", or null to clear.
  PatchViews.prototype.mark = function (row, state) {
    this.cellsOf(row).forEach(function (cell) {
      cell.classList.remove("patch-active", "patch-locked");
      if (state) cell.classList.add("patch-" + state);
    });
    var patch = this.model.patchOfRow[row], box = this.box;
    if (!box || patch < 0) return;
    if (!state) {
      if (this.boxPatch === patch) box.hidden = true;
      return;
    }
    this.boxPatch = patch;
    box.className = "patch-box patch-box-" + state;
    // translate() percentages are of the box itself: one step = one cell.
    box.style.transform = "translate(" + (100 * (patch % this.model.gridCols)) + "%," +
      (100 * Math.floor(patch / this.model.gridCols)) + "%)";
    box.hidden = false;
  };

  PatchViews.prototype.buildOutlines = function (data) {
    var outlines = this.elements.outlines;
    if (!outlines || !data.view || !data.objects || !data.objects.length) return;
    outlines.setAttribute("viewBox", "0 0 " + data.view.width + " " + data.view.height);
    outlines.setAttribute("preserveAspectRatio", "none");
    data.objects.forEach(function (object, index) {
      var group = document.createElementNS(SVG_NS, "g");
      group.setAttribute("class", "object object-" + (index % 6));
      var title = document.createElementNS(SVG_NS, "title");
      title.textContent = object.category;
      group.appendChild(title);
      object.outlines.forEach(function (outline) {
        outline.polygons.forEach(function (coords) {
          var points = [];
          for (var i = 0; i + 1 < coords.length; i += 2) points.push(coords[i] + "," + coords[i + 1]);
          var polygon = document.createElementNS(SVG_NS, "polygon");
          polygon.setAttribute("points", points.join(" "));
          if (outline.iscrowd) polygon.setAttribute("class", "crowd");
          group.appendChild(polygon);
        });
        if (outline.bbox) {
          var rect = document.createElementNS(SVG_NS, "rect");
          rect.setAttribute("x", outline.bbox[0]);
          rect.setAttribute("y", outline.bbox[1]);
          rect.setAttribute("width", outline.bbox[2]);
          rect.setAttribute("height", outline.bbox[3]);
          rect.setAttribute("class", "bbox");
          group.appendChild(rect);
        }
      });
      outlines.appendChild(group);
    });
    this.setOutlinesVisible();
  };

  PatchViews.prototype.setOutlinesVisible = function () {
    var outlines = this.elements.outlines, box = this.elements.showOutlines;
    if (!outlines) return;
    // A class, not the hidden attribute: HTML allows no hidden on an inline <svg>.
    outlines.classList.toggle("outlines-off", !(box && box.checked && outlines.firstChild));
  };

  // Search matches and the token map at `layer`: matches(row) says whether a patch's row
  // matches; with mapOn every patch takes its top-1 token's colour and the legend lists the
  // most frequent tokens; pick(token) runs when one is clicked.
  PatchViews.prototype.paint = function (layer, matches, mapOn, pick) {
    var model = this.model, text = ns.text, el = text.el, e = this.elements;
    var counts = new Map(), shownOf = new Map();
    this.patchEls.forEach(function (patch, index) {
      var row = model.rowOfPatch[index];
      patch.classList.toggle("match", row >= 0 && matches(row));
      if (row < 0) return;
      var index = model.top1Index(layer, row), token = model.tokens[index];
      if (mapOn) {
        patch.style.backgroundColor = text.tokenColour(token);
        counts.set(token, (counts.get(token) || 0) + 1);
        if (!shownOf.has(token)) shownOf.set(token, model.shown[index]);
      } else {
        patch.style.backgroundColor = "";
      }
    });
    if (!e.legend) return;
    e.legend.hidden = !mapOn;
    if (!mapOn) return;
    var entries = Array.from(counts.entries()).sort(function (a, b) { return b[1] - a[1]; });
    e.legendTitle.textContent = "Most frequent top-1 tokens at layer " + layer + " (" + entries.length +
      " distinct over " + this.patchEls.length + " patches); click one to find it.";
    while (e.legendItems.firstChild) e.legendItems.removeChild(e.legendItems.firstChild);
    entries.slice(0, 12).forEach(function (entry) {
      var li = el("li");
      var button = el("button", "legend-item");
      button.type = "button";
      var swatch = el("span", "swatch");
      swatch.style.backgroundColor = text.tokenColour(entry[0]);
      button.appendChild(swatch);
      button.appendChild(el("span", "legend-token", shownOf.get(entry[0])));
      button.appendChild(el("span", "legend-count", String(entry[1])));
      button.addEventListener("click", function () { pick(entry[0]); });
      li.appendChild(button);
      e.legendItems.appendChild(li);
    });
  };

  ns.PatchViews = PatchViews;
})(typeof window !== "undefined" ? window : globalThis);
