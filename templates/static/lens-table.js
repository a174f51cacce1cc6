// Logit-lens page, the positions x layers table of top-1 tokens: building it, marking the
// active or locked cell, search matches, the current layer's header, scrolling inside the
// table, and which cell an event is on. Part of window.LlavaLens (see lens-data.js).
(function (global) {
  "use strict";
  var ns = global.LlavaLens = global.LlavaLens || {};
  var document = global.document;
  var HEAD_CELLS = 3; // position, label, kind

  function LensTable(model, table, wrap) {
    this.model = model;
    this.table = table;
    this.wrap = wrap;
    this.headerCells = [];
    this.bodyRows = [];
  }

  LensTable.prototype.build = function () {
    var model = this.model, el = ns.text.el, showToken = ns.text.showToken;
    var thead = this.table.createTHead();
    var head = thead.insertRow();
    ["pos", "label", "kind"].forEach(function (name) { head.appendChild(el("th", "head", name)); });
    for (var layer = 0; layer < model.nLayers; layer++) {
      var th = el("th", "layer-head", "L" + layer);
      th.title = layer === 0 ? "layer 0 (embeddings)" : "layer " + layer;
      head.appendChild(th);
      this.headerCells.push(th);
    }
    var tbody = document.createElement("tbody");
    var fragment = document.createDocumentFragment();
    for (var row = 0; row < model.nRows; row++) {
      var tr = el("tr", "kind-" + model.positions.kind[row]);
      tr.appendChild(el("th", "pos", String(model.positions.position[row])));
      tr.appendChild(el("th", "label", showToken(model.positions.label[row])));
      tr.appendChild(el("th", "kind", model.positions.kind[row]));
      for (var l = 0; l < model.nLayers; l++) {
        var cell = model.top1(l, row);
        tr.appendChild(el("td", "p" + Math.min(9, Math.floor(cell.prob * 10)), showToken(cell.token)));
      }
      fragment.appendChild(tr);
      this.bodyRows.push(tr);
    }
    tbody.appendChild(fragment);
    this.table.appendChild(tbody);
  };

  LensTable.prototype.dataCell = function (row, layer) {
    return this.bodyRows[row].cells[HEAD_CELLS + layer];
  };

  // state: "active", "locked", or null to clear the row and cell.
  LensTable.prototype.mark = function (row, layer, state) {
    this.bodyRows[row].classList.toggle("row-active", state !== null);
    var cell = this.dataCell(row, layer);
    cell.classList.remove("cell-active", "cell-locked");
    if (state) cell.classList.add("cell-" + state);
  };

  LensTable.prototype.setCurrentLayer = function (previous, layer) {
    if (this.headerCells[previous]) this.headerCells[previous].classList.remove("layer-current");
    this.headerCells[layer].classList.add("layer-current");
  };

  // matches(layer, row) -> whether that cell matches the search.
  LensTable.prototype.highlightMatches = function (matches) {
    for (var row = 0; row < this.model.nRows; row++) {
      var cells = this.bodyRows[row].cells;
      for (var layer = 0; layer < this.model.nLayers; layer++) {
        cells[HEAD_CELLS + layer].classList.toggle("match", matches(layer, row));
      }
    }
  };

  LensTable.prototype.scrollToCell = function (row, layer) {
    var cell = this.dataCell(row, layer);
    var table = this.table, wrap = this.wrap;
    // Scroll inside the table only, never the page.
    var cellBox = cell.getBoundingClientRect();
    var wrapBox = wrap.getBoundingClientRect();
    var headHeight = table.tHead ? table.tHead.getBoundingClientRect().height : 0;
    var bottom = Math.min(wrapBox.bottom, global.innerHeight || wrapBox.bottom);
    if (cellBox.top < wrapBox.top + headHeight || cellBox.bottom > bottom) {
      wrap.scrollTop += cellBox.top - (wrapBox.top + headHeight + bottom) / 2;
    }
    if (cellBox.left < wrapBox.left || cellBox.right > wrapBox.right) {
      wrap.scrollLeft += cellBox.left - (wrapBox.left + wrapBox.right) / 2;
    }
  };

  // The {row, layer} of the body cell under an event (a head cell of a row: that row at
  // `currentLayer`), or null.
  LensTable.prototype.cellTarget = function (event, currentLayer) {
    var td = event.target.closest ? event.target.closest("td, th") : null;
    if (!td || !td.parentNode || td.parentNode.parentNode.tagName !== "TBODY") return null;
    var layer = td.cellIndex - HEAD_CELLS;
    return { row: td.parentNode.sectionRowIndex, layer: layer >= 0 ? layer : currentLayer };
  };

  // The layer whose header an event is on, or -1.
  LensTable.prototype.headerTarget = function (event) {
    var th = event.target.closest ? event.target.closest("thead th.layer-head") : null;
    return th ? this.headerCells.indexOf(th) : -1;
  };

  ns.LensTable = LensTable;
})(typeof window !== "undefined" ? window : globalThis);
