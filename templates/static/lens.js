// Logit-lens page: builds the position x layer table and the patch overlay from
// window.LENS_DATA (written by report/build.py; format documented there).
// Token strings are untrusted: they only ever reach the DOM through textContent.
(function (global) {
  "use strict";

  function decodeUint(spec) {
    var binary = global.atob(spec.b64);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    var view = new DataView(bytes.buffer);
    // Explicit little-endian reads: typed-array views would use the platform's order.
    if (spec.dtype === "uint16") {
      var out16 = new Uint16Array(bytes.length / 2);
      for (var j = 0; j < out16.length; j++) out16[j] = view.getUint16(2 * j, true);
      return out16;
    }
    if (spec.dtype === "uint32") {
      var out32 = new Uint32Array(bytes.length / 4);
      for (var k = 0; k < out32.length; k++) out32[k] = view.getUint32(4 * k, true);
      return out32;
    }
    throw new Error("unknown dtype " + spec.dtype);
  }

  // The decoded data with lookups by (layer, row, rank) and by patch. A "row" is an
  // index into data.positions (LM input positions in order).
  function LensModel(data) {
    this.data = data;
    this.nLayers = data.n_layers;
    this.topK = data.top_k;
    this.gridRows = data.grid_rows;
    this.gridCols = data.grid_cols;
    this.positions = data.positions;
    this.nRows = data.positions.position.length;
    this.tokens = data.tokens;
    this.tokenIndex = decodeUint(data.token_index);
    this.missing = data.token_index.missing;
    this.prob = decodeUint(data.prob);
    this.probScale = data.prob.scale;
    // Patches map to rows through the recorded (patch_row, patch_col), never through
    // row order, so a reordered or partial grid still lines up.
    this.rowOfPatch = new Int32Array(this.gridRows * this.gridCols).fill(-1);
    this.patchOfRow = new Int32Array(this.nRows).fill(-1);
    for (var row = 0; row < this.nRows; row++) {
      if (this.positions.kind[row] !== "image") continue;
      var patch = this.positions.patch_row[row] * this.gridCols + this.positions.patch_col[row];
      this.rowOfPatch[patch] = row;
      this.patchOfRow[row] = patch;
    }
  }

  LensModel.prototype.cell = function (layer, row, rank) {
    var at = (layer * this.nRows + row) * this.topK + (rank - 1);
    var index = this.tokenIndex[at];
    if (index === this.missing) return null;
    return { token: this.tokens[index], prob: this.prob[at] / this.probScale };
  };

  LensModel.prototype.topk = function (layer, row) {
    var out = [];
    for (var rank = 1; rank <= this.topK; rank++) {
      var cell = this.cell(layer, row, rank);
      if (cell) out.push({ rank: rank, token: cell.token, prob: cell.prob });
    }
    return out;
  };

  LensModel.prototype.top1 = function (layer, row) {
    return this.cell(layer, row, 1);
  };

  global.LensModel = LensModel;

  if (typeof document === "undefined" || !global.LENS_DATA) return;

  // Make whitespace-only and whitespace-edged tokens visible and distinguishable.
  function showToken(token) {
    if (token === "") return "\u2205";
    return token
      .replace(/ /g, "\u2423")
      .replace(/\n/g, "\u21b5")
      .replace(/\t/g, "\u21e5")
      .replace(/[\u0000-\u001f\u007f\u200b-\u200f\u2028\u2029\ufeff]/g, function (ch) {
        return "\u27e8U+" + ch.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0") + "\u27e9";
      });
  }

  // Two significant digits below 10% so small probabilities do not all read "0.0%".
  function formatProb(prob) {
    var percent = 100 * prob;
    return (percent >= 10 || percent === 0 ? percent.toFixed(1) : percent.toPrecision(2)) + "%";
  }

  function positionText(model, row) {
    var p = model.positions;
    var text = "position " + p.position[row] + " \u00b7 " + showToken(p.label[row]) + " (" + p.kind[row];
    if (p.kind[row] === "image") text += ", patch row " + p.patch_row[row] + " col " + p.patch_col[row];
    return text + ")";
  }

  var model = new LensModel(global.LENS_DATA);
  var HEAD_CELLS = 3; // position, label, kind
  var table = document.getElementById("lens-table");
  var wrap = document.getElementById("lens-table-wrap");
  var grid = document.getElementById("patch-grid");
  var slider = document.getElementById("layer");
  var layerValue = document.getElementById("layer-value");
  var tokenSearch = document.getElementById("token-search");
  var panelTitle = document.getElementById("panel-title");
  var panelSubtitle = document.getElementById("panel-subtitle");
  var panelRows = document.getElementById("panel-rows");

  var currentLayer = model.nLayers - 1;
  var locked = null; // {row, layer} while a selection is locked
  var active = null; // {row, layer} currently shown
  var patchEls = [];
  var headerCells = [];
  var bodyRows = [];

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function buildTable() {
    var thead = table.createTHead();
    var head = thead.insertRow();
    ["pos", "label", "kind"].forEach(function (name) { head.appendChild(el("th", "head", name)); });
    for (var layer = 0; layer < model.nLayers; layer++) {
      var th = el("th", "layer-head", "L" + layer);
      th.title = layer === 0 ? "layer 0 (embeddings)" : "layer " + layer;
      head.appendChild(th);
      headerCells.push(th);
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
        var td = el("td", cell ? "p" + Math.min(9, Math.floor(cell.prob * 10)) : "missing",
          cell ? showToken(cell.token) : "\u00b7");
        tr.appendChild(td);
      }
      fragment.appendChild(tr);
      bodyRows.push(tr);
    }
    tbody.appendChild(fragment);
    table.appendChild(tbody);
  }

  function buildGrid() {
    if (!grid) return;
    var fragment = document.createDocumentFragment();
    for (var r = 0; r < model.gridRows; r++) {
      for (var c = 0; c < model.gridCols; c++) {
        var patch = el("div", "patch");
        patch.style.left = (100 * c / model.gridCols) + "%";
        patch.style.top = (100 * r / model.gridRows) + "%";
        patch.style.width = (100 / model.gridCols) + "%";
        patch.style.height = (100 / model.gridRows) + "%";
        patch.setAttribute("data-patch", String(r * model.gridCols + c));
        if (model.rowOfPatch[r * model.gridCols + c] < 0) patch.classList.add("no-position");
        fragment.appendChild(patch);
        patchEls.push(patch);
      }
    }
    grid.appendChild(fragment);
  }

  function dataCell(row, layer) {
    return bodyRows[row].cells[HEAD_CELLS + layer];
  }

  function clearActive() {
    if (!active) return;
    bodyRows[active.row].classList.remove("row-active");
    dataCell(active.row, active.layer).classList.remove("cell-active", "cell-locked");
    var patch = model.patchOfRow[active.row];
    if (patch >= 0 && patchEls.length) patchEls[patch].classList.remove("patch-active", "patch-locked");
    active = null;
  }

  function showPanel(row, layer) {
    panelTitle.textContent = "Top-" + model.topK + " at layer " + layer + (layer === 0 ? " (embeddings)" : "");
    panelSubtitle.textContent = positionText(model, row) + (locked ? " \u2014 locked (click again to unlock)" : "");
    while (panelRows.firstChild) panelRows.removeChild(panelRows.firstChild);
    model.topk(layer, row).forEach(function (entry) {
      var tr = el("tr");
      tr.appendChild(el("td", "rank", String(entry.rank)));
      tr.appendChild(el("td", "token", showToken(entry.token)));
      var probCell = el("td", "prob");
      var bar = el("span", "bar");
      bar.style.width = (100 * entry.prob).toFixed(1) + "%";
      probCell.appendChild(bar);
      probCell.appendChild(el("span", "prob-text", formatProb(entry.prob)));
      tr.appendChild(probCell);
      panelRows.appendChild(tr);
    });
  }

  function select(row, layer) {
    clearActive();
    active = { row: row, layer: layer };
    bodyRows[row].classList.add("row-active");
    dataCell(row, layer).classList.add(locked ? "cell-locked" : "cell-active");
    var patch = model.patchOfRow[row];
    if (patch >= 0 && patchEls.length) patchEls[patch].classList.add(locked ? "patch-locked" : "patch-active");
    showPanel(row, layer);
  }

  function scrollToCell(row, layer) {
    dataCell(row, layer).scrollIntoView({ block: "nearest", inline: "nearest" });
  }

  // Clicking the locked cell again unlocks; clicking any other cell moves the lock there.
  function toggleLock(row, layer) {
    var same = locked !== null && locked.row === row && locked.layer === layer;
    locked = same ? null : { row: row, layer: layer };
    if (layer !== currentLayer) setLayer(layer);
    select(row, layer);
  }

  function setLayer(layer) {
    if (headerCells[currentLayer]) headerCells[currentLayer].classList.remove("layer-current");
    currentLayer = layer;
    headerCells[currentLayer].classList.add("layer-current");
    slider.value = String(layer);
    layerValue.textContent = String(layer);
    if (locked) {
      locked.layer = layer;
      select(locked.row, layer);
    }
    highlightPatchMatches();
  }

  function matchesTerm(cell, term) {
    return cell !== null && cell.token.toLowerCase().indexOf(term) !== -1;
  }

  function searchTerm() {
    return tokenSearch.value.trim().toLowerCase();
  }

  function highlightTableMatches() {
    var term = searchTerm();
    for (var row = 0; row < model.nRows; row++) {
      var cells = bodyRows[row].cells;
      for (var layer = 0; layer < model.nLayers; layer++) {
        cells[HEAD_CELLS + layer].classList.toggle("match", term !== "" && matchesTerm(model.top1(layer, row), term));
      }
    }
  }

  // Patches show matches at the current layer only, so they follow the slider.
  function highlightPatchMatches() {
    var term = searchTerm();
    patchEls.forEach(function (patch, index) {
      var row = model.rowOfPatch[index];
      patch.classList.toggle("match", term !== "" && row >= 0 && matchesTerm(model.top1(currentLayer, row), term));
    });
  }

  function cellTarget(event) {
    var td = event.target.closest ? event.target.closest("td, th") : null;
    if (!td || !td.parentNode || td.parentNode.parentNode.tagName !== "TBODY") return null;
    var layer = td.cellIndex - HEAD_CELLS;
    return { row: td.parentNode.sectionRowIndex, layer: layer >= 0 ? layer : currentLayer };
  }

  function patchTarget(event) {
    var attr = event.target.getAttribute && event.target.getAttribute("data-patch");
    if (attr === null || attr === undefined) return null;
    var row = model.rowOfPatch[Number(attr)];
    return row >= 0 ? row : null;
  }

  buildTable();
  buildGrid();
  setLayer(currentLayer);

  table.addEventListener("mouseover", function (event) {
    var target = cellTarget(event);
    if (target && !locked) select(target.row, target.layer);
  });
  table.addEventListener("click", function (event) {
    var target = cellTarget(event);
    if (!target) return;
    toggleLock(target.row, target.layer);
  });
  table.addEventListener("click", function (event) {
    var th = event.target.closest ? event.target.closest("thead th.layer-head") : null;
    if (th) setLayer(headerCells.indexOf(th));
  });
  if (grid) {
    grid.addEventListener("mouseover", function (event) {
      var row = patchTarget(event);
      if (row !== null && !locked) select(row, currentLayer);
    });
    grid.addEventListener("click", function (event) {
      var row = patchTarget(event);
      if (row === null) return;
      toggleLock(row, currentLayer);
      scrollToCell(row, currentLayer);
    });
  }
  slider.addEventListener("input", function () { setLayer(Number(slider.value)); });
  tokenSearch.addEventListener("input", function () {
    highlightTableMatches();
    highlightPatchMatches();
  });
  if (wrap) wrap.setAttribute("tabindex", "0");
})(typeof window !== "undefined" ? window : globalThis);
