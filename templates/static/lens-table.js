// Logit-lens page, the positions x layers table of top-1 tokens: building it, marking the
// active or locked cell, search matches, the current layer's header, scrolling inside the
// table (to a row, to a layer), the shown layer range, shading by probability, and which
// cell an event is on. Part of window.LlavaLens (see lens-data.js).
//
// Hovering must stay cheap on a 33 x 593 table (~20 000 cells):
// - every row is in the DOM with its pos / label / kind head cells, but only the rows in
//   and near the scrolled-to window ("live" rows) carry their layer cells and pinned
//   (sticky) head cells and are displayed; the others ("far" rows, display: none) hold one
//   empty spanning cell, and two spacer rows of the far rows' height stand in for them.
//   Rows have one fixed height and columns fixed widths (table-layout: fixed), so nothing
//   moves when a row comes alive, and scrolling to a far row (the follow-scroll of a
//   hovered patch) builds, lays out and paints ~35 rows, not the 593-row table;
// - the active row and cell are drawn by two overlay boxes moved with transforms, so a
//   hover never restyles body cells; the row-active / cell-active / cell-locked classes
//   stay on the elements as markers.
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
    this.range = [0, model.nLayers - 1];
    this.rangeStyle = null;
    this.rowBand = null;
    this.cellBox = null;
    this.activeRow = -1;
    this.marked = null; // {row, layer, state}
    this.matches = null; // (layer, row) -> bool, or null
    this.rowHeight = 0;
    this.live = [0, -1]; // rows [first, last] with their cells
    this.overscan = 3;
    // Only the layer columns in and near view get their text (cells stay, empty): a jump
    // to a far row then writes ~15 columns of text, not 33.
    this.colOverscan = 1;
    this.textCols = [0, -1];
    this.geometry = null; // cached: row pitch, header height, column offsets (measure())
  }

  LensTable.prototype.build = function () {
    var model = this.model, el = ns.text.el;
    var thead = this.table.createTHead();
    var head = thead.insertRow();
    [["pos", "position"], ["label", "input token"], ["kind", "kind of position"]].forEach(function (name) {
      var th = el("th", "head " + name[0], name[0]);
      th.title = name[1];
      th.scope = "col";
      head.appendChild(th);
    });
    for (var layer = 0; layer < model.nLayers; layer++) {
      var th = el("th", "layer-head", "L" + layer);
      th.title = layer === 0 ? "layer 0 (embeddings); click to make it the current layer" : "layer " + layer + "; click to make it the current layer";
      th.scope = "col";
      head.appendChild(th);
      this.headerCells.push(th);
    }
    // The hovered row, mirrored under the layer headers: the hovered position's top-1 at every
    // layer is in view at once, aligned with the columns, without scrolling the table. It is
    // drawn on two canvases (pinned part, layer part): new text on a hover then lays out
    // nothing (text in the table's cells would lay out all 593 rows again).
    var mirror = thead.insertRow();
    mirror.className = "hover-row";
    mirror.setAttribute("aria-hidden", "true");
    this.mirror = mirror;
    var pin = el("th", "mirror-pin");
    pin.colSpan = HEAD_CELLS;
    this.pinCanvas = document.createElement("canvas");
    pin.appendChild(this.pinCanvas);
    mirror.appendChild(pin);
    var layers = el("th", "mirror-layers");
    layers.colSpan = model.nLayers;
    this.layerCanvas = document.createElement("canvas");
    layers.appendChild(this.layerCanvas);
    mirror.appendChild(layers);
    this.mirrorLayersCell = layers;
    var colgroup = document.createElement("colgroup");
    ["col-pos", "col-label", "col-kind"].forEach(function (name) { colgroup.appendChild(el("col", name)); });
    this.cols = [];
    for (var c = 0; c < model.nLayers; c++) {
      var col = el("col", "col-layer");
      colgroup.appendChild(col);
      this.cols.push(col);
    }
    this.table.insertBefore(colgroup, thead);
    var tbody = document.createElement("tbody");
    var fragment = document.createDocumentFragment();
    for (var row = 0; row < model.nRows; row++) {
      var tr = el("tr", "kind-" + model.positions.kind[row]);
      tr.lensRow = row;
      tr.appendChild(el("th", "pos", String(model.positions.position[row])));
      var label = el("th", "label", model.labelShown[row]);
      tr.appendChild(label);
      tr.appendChild(el("th", "kind", model.positions.kind[row]));
      tr.appendChild(this.placeholder());
      fragment.appendChild(tr);
      this.bodyRows.push(tr);
    }
    tbody.appendChild(fragment);
    this.topSpacer = this.spacer();
    this.bottomSpacer = this.spacer();
    tbody.insertBefore(this.topSpacer, tbody.firstChild);
    tbody.appendChild(this.bottomSpacer);
    this.table.appendChild(tbody);
    var self = this;
    this.wrap.addEventListener("scroll", function () { self.updateWindow(); }, { passive: true });
    this.rowBand = el("div", "row-band");
    this.cellBox = el("div", "cell-box");
    this.rowBand.setAttribute("aria-hidden", "true");
    this.cellBox.setAttribute("aria-hidden", "true");
    this.rowBand.hidden = this.cellBox.hidden = true;
    this.wrap.appendChild(this.rowBand);
    this.wrap.appendChild(this.cellBox);
    this.rangeStyle = document.createElement("style");
    document.head.appendChild(this.rangeStyle);
    this.updateWindow();
  };

  // A spacer row: the height of the far rows above (or below) the live ones.
  LensTable.prototype.spacer = function () {
    var tr = ns.text.el("tr", "spacer");
    tr.setAttribute("aria-hidden", "true");
    tr.hidden = true;
    var td = this.placeholder();
    td.colSpan = HEAD_CELLS + this.range[1] - this.range[0] + 1;
    tr.appendChild(td);
    return tr;
  };

  LensTable.prototype.placeSpacers = function (first, last) {
    var g = this.geometry, n = this.model.nRows;
    if (!g) return;
    [[this.topSpacer, first * g.pitch], [this.bottomSpacer, (n - 1 - last) * g.pitch]].forEach(function (pair) {
      var tr = pair[0], height = pair[1] > 0 ? pair[1].toFixed(3) + "px" : "";
      tr.hidden = !height;
      if (tr.cells[0].style.height !== height) tr.cells[0].style.height = height;
    });
  };

  LensTable.prototype.placeholder = function () {
    var td = ns.text.el("td", "placeholder");
    td.colSpan = this.range[1] - this.range[0] + 1;
    return td;
  };

  var BINS = ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"];

  // Give a row its layer cells (with search matches and marks) and pin its head cells.
  LensTable.prototype.renderRow = function (row) {
    var model = this.model, tr = this.bodyRows[row], el = ns.text.el;
    if (tr.classList.contains("live")) return;
    tr.removeChild(tr.cells[HEAD_CELLS]);
    var fragment = document.createDocumentFragment();
    for (var l = 0; l < model.nLayers; l++) {
      var at = (l * model.nRows + row) * model.topK;
      var td = el("td", BINS[Math.min(9, Math.floor(model.probTable[model.probCodes[at]] * 10))],
        l >= this.textCols[0] && l <= this.textCols[1] ? model.shown[model.tokenIndex[at]] : undefined);
      if (this.matches && this.matches(l, row)) td.classList.add("match");
      fragment.appendChild(td);
    }
    tr.appendChild(fragment);
    tr.classList.add("live");
    tr.classList.remove("far");
    var m = this.marked;
    if (m && m.row === row && m.state) tr.cells[HEAD_CELLS + m.layer].classList.add("cell-" + m.state);
  };

  LensTable.prototype.unrenderRow = function (row) {
    var tr = this.bodyRows[row];
    if (!tr.classList.contains("live")) return;
    while (tr.cells.length > HEAD_CELLS) tr.removeChild(tr.lastChild);
    tr.appendChild(this.placeholder());
    tr.classList.remove("live");
    tr.classList.add("far");
  };

  // Row pitch, header height and column offsets, read once (and after a range change) so
  // a hover or a scroll never forces a layout.
  LensTable.prototype.measure = function () {
    var rows = this.bodyRows, n = rows.length, table = this.table;
    var g = { top: table.offsetTop, left: table.offsetLeft, head: table.tHead.offsetHeight, pitch: 0,
      row0: 0, colLeft: [], colWidth: [], width: table.offsetWidth, pinned: this.pinnedWidth(), pinWidths: [] };
    for (var p = 0; p < HEAD_CELLS; p++) g.pinWidths.push(table.tHead.rows[0].cells[p].offsetWidth);
    // The row pitch is read once, at build, while every row is displayed (later most are far
    // rows, display: none); rows have one fixed height, whatever the layer range.
    if (!this.rowMetrics && n) {
      this.rowMetrics = { pitch: n > 1 ? (rows[n - 1].offsetTop - rows[0].offsetTop) / (n - 1) : rows[0].offsetHeight,
        rowHeight: rows[0].offsetHeight };
    }
    if (this.rowMetrics) {
      g.pitch = this.rowMetrics.pitch;
      g.rowHeight = this.rowMetrics.rowHeight;
      g.row0 = this.rowZero(g.pitch);
    }
    for (var l = 0; l < this.headerCells.length; l++) {
      g.colLeft.push(this.headerCells[l].offsetLeft);
      g.colWidth.push(this.headerCells[l].offsetWidth);
    }
    g.maxView = parseFloat(global.getComputedStyle(this.wrap).maxHeight) || 0;
    this.geometry = g.pitch > 0 ? g : null;
    var headRow = table.tHead.rows[0].offsetHeight + "px";
    if (this.mirror && this.mirror.cells[0].style.top !== headRow) {
      for (var i = 0; i < this.mirror.cells.length; i++) this.mirror.cells[i].style.top = headRow;
    }
    if (this.geometry) {
      this.sizeMirror();
      g.head = table.tHead.offsetHeight; // the mirrored row's canvases have their size now
      g.row0 = this.rowZero(g.pitch);
    }
    return this.geometry;
  };

  // Where row 0 is (or would be) in the table: from a displayed row.
  LensTable.prototype.rowZero = function (pitch) {
    var r = this.farSet && this.live[1] >= this.live[0] ? this.live[0] : 0;
    return this.bodyRows[r].offsetTop - r * pitch;
  };

  LensTable.prototype.rowTop = function (row) {
    var g = this.geometry;
    return g ? g.top + g.row0 + row * g.pitch : this.table.offsetTop + this.bodyRows[row].offsetTop;
  };

  // Make the rows in and near the scrolled-to window live (and only those), and give the
  // layer columns in and near view their text.
  LensTable.prototype.updateWindow = function () {
    var n = this.model.nRows, first = 0, last = n - 1, g = this.geometry || this.measure(), wrap = this.wrap;
    var c0 = 0, c1 = this.model.nLayers - 1;
    if (g) {
      var top = wrap.scrollTop - g.top - g.row0;
      // The wrap's own height shrinks while its rows are far (display: none): the window
      // is as tall as the wrap can grow (its max-height), whatever it holds now.
      var height = Math.max(wrap.clientHeight, g.maxView, 400);
      first = Math.max(0, Math.floor(top / g.pitch) - this.overscan);
      last = Math.min(n - 1, Math.ceil((top + height) / g.pitch) + this.overscan);
      var left = wrap.scrollLeft + g.pinned - g.left, right = wrap.scrollLeft + Math.max(wrap.clientWidth, 400) - g.left;
      c0 = c1 = -1;
      for (var l = 0; l < g.colLeft.length; l++) {
        if (!g.colWidth[l] || g.colLeft[l] + g.colWidth[l] < left || g.colLeft[l] > right) continue;
        if (c0 < 0) c0 = l;
        c1 = l;
      }
      if (c0 < 0) { c0 = 0; c1 = -1; }
      c0 = Math.max(0, c0 - this.colOverscan);
      c1 = Math.min(this.model.nLayers - 1, c1 + this.colOverscan);
    }
    var old = this.live, r;
    var oldCols = this.textCols;
    this.textCols = [c0, c1];
    if (c0 < oldCols[0] || c1 > oldCols[1]) {
      // Newly shown columns of rows that stay live get their text now.
      for (r = Math.max(first, old[0]); r <= Math.min(last, old[1]); r++) this.fillText(r, c0, c1, oldCols);
    }
    if (first === old[0] && last === old[1] && this.farSet) return;
    if (!this.farSet) {
      // The first window: every row outside it becomes a far row (until now all were
      // displayed, for measure()).
      for (r = 0; r < n; r++) if (r < first || r > last) this.bodyRows[r].classList.add("far");
      this.farSet = true;
    }
    for (r = old[0]; r <= old[1]; r++) if (r < first || r > last) this.unrenderRow(r);
    for (r = first; r <= last; r++) this.renderRow(r);
    this.live = [first, last];
    this.placeSpacers(first, last);
  };

  LensTable.prototype.fillText = function (row, c0, c1, done) {
    var model = this.model, cells = this.bodyRows[row].cells;
    for (var l = c0; l <= c1; l++) {
      if (l >= done[0] && l <= done[1]) continue;
      var cell = cells[HEAD_CELLS + l];
      if (cell && !cell.firstChild) cell.textContent = model.shown[model.tokenIndex[(l * model.nRows + row) * model.topK]];
    }
  };

  // The body cell of (row, layer), or null while the row is not live.
  LensTable.prototype.dataCell = function (row, layer) {
    var tr = this.bodyRows[row];
    return tr.classList.contains("live") ? tr.cells[HEAD_CELLS + layer] : null;
  };

  // state: "active", "locked", or null to clear the row and cell.
  LensTable.prototype.mark = function (row, layer, state) {
    this.bodyRows[row].classList.toggle("row-active", state !== null);
    var cell = this.dataCell(row, layer);
    if (cell) {
      cell.classList.remove("cell-active", "cell-locked");
      if (state) cell.classList.add("cell-" + state);
    }
    if (state) this.marked = { row: row, layer: layer, state: state };
    else if (this.marked && this.marked.row === row && this.marked.layer === layer) this.marked = null;
    if (state === null) {
      if (this.activeRow === row) {
        this.rowBand.hidden = this.cellBox.hidden = true;
        this.activeRow = -1;
      }
      return;
    }
    this.activeRow = row;
    this.placeBoxes(row, layer, state);
  };

  // Positions from the cached geometry: no layout is read on a hover.
  // Size the mirror's canvases to the pinned and the shown layer columns (after measure()).
  LensTable.prototype.sizeMirror = function () {
    var g = this.geometry;
    if (!g) return;
    var dpr = global.devicePixelRatio || 1, height = g.rowHeight;
    var layersWidth = 0;
    for (var l = 0; l < g.colWidth.length; l++) layersWidth += g.colWidth[l];
    this.mirrorLayersCell.colSpan = this.range[1] - this.range[0] + 1;
    [[this.pinCanvas, g.pinned], [this.layerCanvas, layersWidth]].forEach(function (pair) {
      var canvas = pair[0];
      canvas.width = Math.max(1, Math.round(pair[1] * dpr));
      canvas.height = Math.max(1, Math.round(height * dpr));
      canvas.style.width = pair[1] + "px";
      canvas.style.height = height + "px";
    });
    var style = global.getComputedStyle(this.table);
    this.mirrorFont = "12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace";
    this.mirrorColour = style.color;
    this.mirrorRow = undefined;
    this.clipped = {}; // "width:dictionary index" -> the token's text clipped to that width
    if (this.mirrorLast) this.showMirror(this.mirrorLast[0], this.mirrorLast[1]);
  };

  function clipText(ctx, text, width) {
    if (ctx.measureText(text).width <= width) return text;
    var lo = 0, hi = text.length;
    while (lo < hi) {
      var mid = (lo + hi + 1) >> 1;
      if (ctx.measureText(text.slice(0, mid) + "\u2026").width <= width) lo = mid; else hi = mid - 1;
    }
    return text.slice(0, lo) + "\u2026";
  }

  // Show `row` in the mirrored row under the headers (its top-1 at every shown layer).
  LensTable.prototype.showMirror = function (row, layer) {
    var model = this.model, g = this.geometry;
    if (row === this.mirrorRow && layer === this.mirrorLayer) return;
    this.mirrorRow = row;
    this.mirrorLayer = layer;
    this.mirrorLast = [row, layer];
    this.mirror.setAttribute("data-position", String(model.positions.position[row]));
    if (!g) return;
    var dpr = global.devicePixelRatio || 1, h = g.rowHeight, pad = 4, base = Math.round(h * 0.68);
    var pin = this.pinCanvas.getContext("2d"), ctx = this.layerCanvas.getContext("2d");
    [pin, ctx].forEach(function (c) {
      c.setTransform(dpr, 0, 0, dpr, 0, 0);
      c.clearRect(0, 0, c.canvas.width, c.canvas.height);
      c.font = this.mirrorFont;
      c.fillStyle = this.mirrorColour;
    }, this);
    var x = 0;
    var texts = [String(model.positions.position[row]), model.labelShown[row], model.positions.kind[row]];
    for (var i = 0; i < HEAD_CELLS; i++) {
      var w = g.pinWidths[i];
      pin.fillText(clipText(pin, texts[i], w - 2 * pad), x + pad, base);
      x += w;
    }
    var first = -1;
    for (var l = 0; l < model.nLayers; l++) {
      if (!g.colWidth[l]) continue;
      if (first < 0) first = g.colLeft[l];
      var left = g.colLeft[l] - first, at = (l * model.nRows + row) * model.topK;
      var prob = model.probTable[model.probCodes[at]];
      ctx.fillStyle = "rgba(10, 102, 194, " + (0.05 * Math.min(9, Math.floor(prob * 10))).toFixed(2) + ")";
      ctx.fillRect(left, 0, g.colWidth[l], h);
      if (l === layer) {
        ctx.strokeStyle = "#e0a800";
        ctx.lineWidth = 2;
        ctx.strokeRect(left + 1, 1, g.colWidth[l] - 2, h - 2);
      }
      ctx.fillStyle = this.mirrorColour;
      // Clipping measures text (a binary search): each token is clipped once per column width.
      var index = model.tokenIndex[at], key = g.colWidth[l] + ":" + index, clipped = this.clipped[key];
      if (clipped === undefined) clipped = this.clipped[key] = clipText(ctx, model.shown[index], g.colWidth[l] - 2 * pad);
      ctx.fillText(clipped, left + pad, base);
    }
  };

  LensTable.prototype.placeBoxes = function (row, layer, state) {
    this.showMirror(row, layer);
    var g = this.geometry || this.measure();
    if (!g) return;
    var band = this.rowBand, box = this.cellBox, top = this.rowTop(row);
    var width = g.width + "px", height = g.rowHeight + "px";
    if (band.style.width !== width) band.style.width = width;
    if (band.style.height !== height) band.style.height = height;
    band.style.transform = "translate(" + g.left + "px," + top + "px)";
    band.hidden = false;
    var cls = "cell-box cell-box-" + state;
    if (box.className !== cls) box.className = cls;
    box.hidden = g.colWidth[layer] === 0; // a column outside the shown layer range
    var cellWidth = g.colWidth[layer] + "px";
    if (box.style.width !== cellWidth) box.style.width = cellWidth;
    if (box.style.height !== height) box.style.height = height;
    box.style.transform = "translate(" + (g.left + g.colLeft[layer]) + "px," + top + "px)";
  };

  LensTable.prototype.setCurrentLayer = function (previous, layer) {
    if (this.headerCells[previous]) this.headerCells[previous].classList.remove("layer-current");
    this.headerCells[layer].classList.add("layer-current");
  };

  // matches(layer, row) -> whether that cell matches the search.
  LensTable.prototype.highlightMatches = function (matches) {
    this.matches = matches;
    for (var row = this.live[0]; row <= this.live[1]; row++) {
      var cells = this.bodyRows[row].cells;
      for (var layer = 0; layer < this.model.nLayers; layer++) {
        cells[HEAD_CELLS + layer].classList.toggle("match", matches(layer, row));
      }
    }
  };

  // Shade cells by top-1 probability (on by default).
  LensTable.prototype.setShading = function (on) {
    this.table.classList.toggle("shade", on);
  };

  // Show layers first..last only (inclusive); columns outside stay in the DOM, hidden.
  LensTable.prototype.setRange = function (first, last) {
    var n = this.model.nLayers;
    first = Math.max(0, Math.min(n - 1, first));
    last = Math.max(first, Math.min(n - 1, last));
    this.range = [first, last];
    var rules = [];
    // Column of layer l is child number HEAD_CELLS + 1 + l.
    var sel = "#" + this.table.id + " tr > :not(.placeholder)";
    if (first > 0) rules.push(sel + ":nth-child(n+" + (HEAD_CELLS + 1) + "):nth-child(-n+" + (HEAD_CELLS + first) + ")");
    if (last < n - 1) rules.push(sel + ":nth-child(n+" + (HEAD_CELLS + last + 2) + ")");
    this.table.style.setProperty("--layers", String(last - first + 1));
    this.rangeStyle.textContent = rules.length ? rules.join(",\n") + " { display: none; }" : "";
    // Fixed layout takes widths from the columns: hide the columns of the hidden layers too.
    for (var l = 0; l < n; l++) this.cols[l].classList.toggle("col-hidden", l < first || l > last);
    for (var r = 0; r < this.bodyRows.length; r++) {
      var ph = this.bodyRows[r].cells[HEAD_CELLS];
      if (ph && ph.classList.contains("placeholder")) ph.colSpan = last - first + 1;
    }
    this.topSpacer.cells[0].colSpan = this.bottomSpacer.cells[0].colSpan = HEAD_CELLS + last - first + 1;
    this.measure();
    this.textCols = [0, -1];
    for (var rr = this.live[0]; rr <= this.live[1]; rr++) this.unrenderRow(rr);
    this.live = [0, -1];
    this.updateWindow();
    return this.range;
  };

  // The width of the pinned pos/label/kind columns (what a scrolled layer column hides under).
  LensTable.prototype.pinnedWidth = function () {
    // Widths, not offsets: a stuck (sticky) cell reports where it is stuck.
    var cells = this.table.tHead.rows[0].cells, width = 0;
    for (var i = 0; i < HEAD_CELLS; i++) width += cells[i].offsetWidth;
    return width;
  };

  // Scroll inside the table only, never the page: the row into view vertically.
  LensTable.prototype.scrollToRow = function (row) {
    var g = this.geometry || this.measure(), wrap = this.wrap;
    if (!g) return;
    var top = this.rowTop(row), rowHeight = g.rowHeight, headHeight = g.head;
    var visibleTop = wrap.scrollTop + headHeight, visibleBottom = wrap.scrollTop + wrap.clientHeight;
    if (top < visibleTop || top + rowHeight > visibleBottom) {
      wrap.scrollTop = Math.max(0, top - headHeight - (wrap.clientHeight - headHeight - rowHeight) / 2);
      this.updateWindow(); // now, not at the scroll event: the row's cells exist at once
    }
  };

  // Scroll inside the table only: the layer's column into view beside the pinned columns.
  LensTable.prototype.scrollToLayer = function (layer) {
    var g = this.geometry || this.measure(), wrap = this.wrap;
    if (!g || !g.colWidth[layer]) return;
    var pinned = g.pinned, left = g.left + g.colLeft[layer], width = g.colWidth[layer];
    var visibleLeft = wrap.scrollLeft + pinned, visibleRight = wrap.scrollLeft + wrap.clientWidth;
    if (left < visibleLeft || left + width > visibleRight) {
      // Put the layer towards the right, so the layers leading up to it show too.
      wrap.scrollLeft = Math.max(0, left - pinned - Math.max(0, wrap.clientWidth - pinned - width - Math.min(40, (wrap.clientWidth - pinned) / 4)));
      this.updateWindow();
    }
  };

  LensTable.prototype.scrollToCell = function (row, layer) {
    this.scrollToRow(row);
    this.scrollToLayer(layer);
  };

  // The layer columns whose header is (at least half) visible: [first, last] or null.
  LensTable.prototype.visibleLayers = function () {
    var wrap = this.wrap, pinned = this.pinnedWidth(), first = -1, last = -1;
    for (var l = 0; l < this.headerCells.length; l++) {
      var th = this.headerCells[l];
      if (th.offsetWidth === 0) continue;
      var mid = this.table.offsetLeft + th.offsetLeft + th.offsetWidth / 2 - wrap.scrollLeft;
      if (mid >= pinned && mid <= wrap.clientWidth) {
        if (first < 0) first = l;
        last = l;
      }
    }
    return first < 0 ? null : [first, last];
  };

  // The rows whose middle is visible below the header: [first, last] or null (only live rows
  // are displayed, and the visible ones are among them).
  LensTable.prototype.visibleRows = function () {
    var wrap = this.wrap, head = this.table.tHead.offsetHeight, first = -1, last = -1;
    for (var r = this.live[0]; r <= this.live[1]; r++) {
      var tr = this.bodyRows[r];
      var mid = this.table.offsetTop + tr.offsetTop + tr.offsetHeight / 2 - wrap.scrollTop;
      if (mid >= head && mid <= wrap.clientHeight) {
        if (first < 0) first = r;
        last = r;
      } else if (first >= 0) {
        break;
      }
    }
    return first < 0 ? null : [first, last];
  };

  // The {row, layer} of the body cell under an event (a head cell of a row: that row at
  // `currentLayer`), or null.
  LensTable.prototype.cellTarget = function (event, currentLayer) {
    var td = event.target.closest ? event.target.closest("td, th") : null;
    if (td && td.classList.contains("placeholder")) return null;
    if (!td || !td.parentNode || !td.parentNode.parentNode || td.parentNode.parentNode.tagName !== "TBODY") return null;
    if (typeof td.parentNode.lensRow !== "number") return null; // a spacer row
    var layer = td.cellIndex - HEAD_CELLS;
    return { row: td.parentNode.lensRow, layer: layer >= 0 ? layer : currentLayer };
  };

  // The layer whose header an event is on, or -1.
  LensTable.prototype.headerTarget = function (event) {
    var th = event.target.closest ? event.target.closest("thead th.layer-head") : null;
    return th ? this.headerCells.indexOf(th) : -1;
  };

  ns.LensTable = LensTable;
})(typeof window !== "undefined" ? window : globalThis);
