// Logit-lens page: builds the position x layer table, the patch overlay, the token map
// and the object outlines from window.LENS_DATA (written by report/build.py; format
// "llava-interp-lens/2" documented there). Token strings are untrusted: they only ever
// reach the DOM through textContent.
(function (global) {
  "use strict";

  function decodeBase64(b64) {
    var binary = global.atob(b64);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  // Raw DEFLATE (RFC 1951) through the platform's DecompressionStream: no library, and
  // it works on file:// (nothing is fetched).
  function inflateRaw(bytes) {
    if (typeof global.DecompressionStream !== "function") {
      return Promise.reject(new Error("this browser lacks DecompressionStream (needs Chrome 80+, Firefox 113+, Safari 16.4+)"));
    }
    var stream = new global.Blob([bytes]).stream().pipeThrough(new global.DecompressionStream("deflate-raw"));
    return new global.Response(stream).arrayBuffer().then(function (buffer) { return new Uint8Array(buffer); });
  }

  // The decoded data with lookups by (layer, row, rank) and by patch. A "row" is an
  // index into data.positions (LM input positions in order).
  function LensModel(data, raw) {
    var packed = data.packed;
    this.data = data;
    this.nLayers = data.n_layers;
    this.topK = data.top_k;
    this.gridRows = data.grid_rows;
    this.gridCols = data.grid_cols;
    this.positions = data.positions;
    this.nRows = data.positions.position.length;
    var nCells = data.n_cells;
    if (nCells !== this.nLayers * this.nRows * this.topK) throw new Error("lens data: cell count mismatch");
    var nt = packed.tokens_bytes;
    var nb = packed.index_bytes;
    if (raw.length !== nt + nCells * (nb + 1)) throw new Error("lens data: packed length mismatch");
    this.tokens = JSON.parse(new global.TextDecoder("utf-8").decode(raw.subarray(0, nt)));
    var index = new Uint32Array(nCells);
    for (var b = 0; b < nb; b++) {
      var plane = raw.subarray(nt + b * nCells, nt + (b + 1) * nCells);
      for (var i = 0; i < nCells; i++) index[i] += plane[i] * Math.pow(256, b);
    }
    this.tokenIndex = index;
    this.probCodes = raw.subarray(nt + nb * nCells);
    this.probTable = new Float64Array(256);
    for (var c = 1; c < 256; c++) this.probTable[c] = Math.exp((c - 255) / packed.prob_log_scale);
    this.probFloor = Math.exp(-254.5 / packed.prob_log_scale);
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
    // Extra views (e.g. LLaVA-NeXT's high-resolution view): the positions of a view's
    // kind map to its cells through their recorded (patch_row, patch_col) too.
    this.extraViews = (data.extra_views || []).map(function (view) {
      var rowOfCell = new Int32Array(view.grid_rows * view.grid_cols).fill(-1);
      var cellOfRow = new Int32Array(this.nRows).fill(-1);
      for (var r = 0; r < this.nRows; r++) {
        if (this.positions.kind[r] !== view.kind) continue;
        var pr = this.positions.patch_row[r], pc = this.positions.patch_col[r];
        if (pr === null || pc === null || pr < 0 || pr >= view.grid_rows || pc < 0 || pc >= view.grid_cols) continue;
        rowOfCell[pr * view.grid_cols + pc] = r;
        cellOfRow[r] = pr * view.grid_cols + pc;
      }
      return { view: view, rowOfCell: rowOfCell, cellOfRow: cellOfRow };
    }, this);
  }

  LensModel.load = function (data) {
    if (!data.packed || data.packed.encoding !== "deflate-raw") {
      return Promise.reject(new Error("unsupported lens data format " + data.format));
    }
    return inflateRaw(decodeBase64(data.packed.b64)).then(function (raw) { return new LensModel(data, raw); });
  };

  LensModel.prototype.at = function (layer, row, rank) {
    return (layer * this.nRows + row) * this.topK + (rank - 1);
  };

  LensModel.prototype.cell = function (layer, row, rank) {
    var at = this.at(layer, row, rank);
    var code = this.probCodes[at];
    return { token: this.tokens[this.tokenIndex[at]], prob: this.probTable[code], belowFloor: code === 0 };
  };

  LensModel.prototype.topk = function (layer, row) {
    var out = [];
    for (var rank = 1; rank <= this.topK; rank++) {
      var cell = this.cell(layer, row, rank);
      cell.rank = rank;
      out.push(cell);
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

  // What a search compares: lowercased, without whitespace and word markers at the edges.
  function normalToken(token) {
    return token.replace(/^[\s\u2581\u0120]+|[\s\u2581]+$/g, "").toLowerCase();
  }

  // Two significant digits below 10% so small probabilities do not all read "0.0%".
  function formatProb(cell) {
    if (cell.belowFloor) return "<0.0003%";
    var percent = 100 * cell.prob;
    return (percent >= 10 ? percent.toFixed(1) : percent.toPrecision(2)) + "%";
  }

  // A colour per token string, the same on every page (FNV-1a hash -> hue).
  function tokenColour(token) {
    var hash = 0x811c9dc5;
    for (var i = 0; i < token.length; i++) {
      hash ^= token.charCodeAt(i);
      hash = Math.imul(hash, 0x01000193) >>> 0;
    }
    var hue = hash % 360;
    var light = 42 + ((hash >>> 9) % 3) * 10;
    return "hsla(" + hue + ", 80%, " + light + "%, 0.62)";
  }

  function positionText(model, row) {
    var p = model.positions;
    var text = "position " + p.position[row] + " \u00b7 " + showToken(p.label[row]) + " (" + p.kind[row];
    if (p.patch_row[row] !== null && p.patch_col[row] !== null) text += ", patch row " + p.patch_row[row] + " col " + p.patch_col[row];
    return text + ")";
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function showLoadError(error) {
    var box = document.getElementById("load-error");
    if (box) {
      box.textContent = "Could not load the lens data: " + (error && error.message ? error.message : String(error));
      box.hidden = false;
    }
    if (global.console) global.console.error(error);
  }

  function start(model) {
    var HEAD_CELLS = 3; // position, label, kind
    var data = model.data;
    var table = document.getElementById("lens-table");
    var wrap = document.getElementById("lens-table-wrap");
    var grid = document.getElementById("patch-grid");
    var outlines = document.getElementById("outlines");
    var slider = document.getElementById("layer");
    var layerValue = document.getElementById("layer-value");
    var tokenSearch = document.getElementById("token-search");
    var searchExact = document.getElementById("search-exact");
    var searchTopk = document.getElementById("search-topk");
    var searchSummary = document.getElementById("search-summary");
    var tokenMap = document.getElementById("token-map");
    var showOutlines = document.getElementById("show-outlines");
    var legend = document.getElementById("legend");
    var legendTitle = document.getElementById("legend-title");
    var legendItems = document.getElementById("legend-items");
    var permalink = document.getElementById("permalink");
    var panelTitle = document.getElementById("panel-title");
    var panelSubtitle = document.getElementById("panel-subtitle");
    var panelRows = document.getElementById("panel-rows");

    var currentLayer = model.nLayers - 1;
    var locked = null; // {row, layer} while a selection is locked
    var active = null; // {row, layer} currently shown
    var patchEls = [];
    var extraCellEls = []; // per extra view, its cell elements
    var headerCells = [];
    var bodyRows = [];

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
          tr.appendChild(el("td", "p" + Math.min(9, Math.floor(cell.prob * 10)), showToken(cell.token)));
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

    function buildExtraGrids() {
      model.extraViews.forEach(function (extra, index) {
        var container = document.getElementById("extra-grid-" + index);
        var cells = [];
        extraCellEls.push(cells);
        if (!container) return;
        var rows = extra.view.grid_rows, cols = extra.view.grid_cols;
        var fragment = document.createDocumentFragment();
        for (var r = 0; r < rows; r++) {
          for (var c = 0; c < cols; c++) {
            var cell = el("div", "patch");
            cell.style.left = (100 * c / cols) + "%";
            cell.style.top = (100 * r / rows) + "%";
            cell.style.width = (100 / cols) + "%";
            cell.style.height = (100 / rows) + "%";
            cell.setAttribute("data-cell", String(r * cols + c));
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
          if (row !== null && !locked) select(row, currentLayer);
        });
        container.addEventListener("click", function (event) {
          var row = target(event);
          if (row === null) return;
          toggleLock(row, currentLayer);
          scrollToCell(row, currentLayer);
        });
      });
    }

    // The cell elements of a row in the extra views, as [element, ...].
    function extraCellsOf(row) {
      var out = [];
      model.extraViews.forEach(function (extra, index) {
        var cell = extra.cellOfRow[row];
        if (cell >= 0 && extraCellEls[index] && extraCellEls[index][cell]) out.push(extraCellEls[index][cell]);
      });
      return out;
    }

    function buildOutlines() {
      if (!outlines || !data.view || !data.objects || !data.objects.length) return;
      var NS = "http://www.w3.org/2000/svg";
      outlines.setAttribute("viewBox", "0 0 " + data.view.width + " " + data.view.height);
      outlines.setAttribute("preserveAspectRatio", "none");
      data.objects.forEach(function (object, index) {
        var group = document.createElementNS(NS, "g");
        group.setAttribute("class", "object object-" + (index % 6));
        var title = document.createElementNS(NS, "title");
        title.textContent = object.category;
        group.appendChild(title);
        object.outlines.forEach(function (outline) {
          outline.polygons.forEach(function (coords) {
            var points = [];
            for (var i = 0; i + 1 < coords.length; i += 2) points.push(coords[i] + "," + coords[i + 1]);
            var polygon = document.createElementNS(NS, "polygon");
            polygon.setAttribute("points", points.join(" "));
            if (outline.iscrowd) polygon.setAttribute("class", "crowd");
            group.appendChild(polygon);
          });
          if (outline.bbox) {
            var rect = document.createElementNS(NS, "rect");
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
      setOutlinesVisible();
    }

    // An <svg> has no .hidden property: toggle the attribute itself.
    function setOutlinesVisible() {
      if (!outlines) return;
      // A class, not the hidden attribute: HTML allows no hidden on an inline <svg>.
      outlines.classList.toggle("outlines-off", !(showOutlines && showOutlines.checked && outlines.firstChild));
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
      extraCellsOf(active.row).forEach(function (cell) { cell.classList.remove("patch-active", "patch-locked"); });
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
        probCell.appendChild(el("span", "prob-text", formatProb(entry)));
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
      extraCellsOf(row).forEach(function (cell) { cell.classList.add(locked ? "patch-locked" : "patch-active"); });
      showPanel(row, layer);
    }

    function scrollToCell(row, layer) {
      var cell = dataCell(row, layer);
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
    }

    // Clicking the locked cell again unlocks; clicking any other cell moves the lock there.
    function toggleLock(row, layer) {
      var same = locked !== null && locked.row === row && locked.layer === layer;
      locked = same ? null : { row: row, layer: layer };
      if (layer !== currentLayer) setLayer(layer);
      select(row, layer);
      updateUrl();
    }

    function lockAt(row, layer) {
      locked = { row: row, layer: layer };
      if (layer !== currentLayer) setLayer(layer);
      select(row, layer);
      scrollToCell(row, layer);
      updateUrl();
    }

    function setLayer(layer) {
      layer = Math.max(0, Math.min(model.nLayers - 1, layer));
      if (headerCells[currentLayer]) headerCells[currentLayer].classList.remove("layer-current");
      currentLayer = layer;
      headerCells[currentLayer].classList.add("layer-current");
      slider.value = String(layer);
      layerValue.textContent = String(layer);
      if (locked) {
        locked.layer = layer;
        select(locked.row, layer);
      } else if (active) {
        select(active.row, layer);
      }
      paintPatches();
      updateSummary();
      updateUrl();
    }

    // --- search -----------------------------------------------------------------------
    function searchState() {
      return {
        term: normalToken(tokenSearch.value),
        exact: !!(searchExact && searchExact.checked),
        topk: !!(searchTopk && searchTopk.checked),
      };
    }

    function tokenMatches(token, search) {
      var t = normalToken(token);
      return search.exact ? t === search.term : t.indexOf(search.term) !== -1;
    }

    function cellMatches(layer, row, search) {
      if (search.term === "") return false;
      var ranks = search.topk ? model.topK : 1;
      for (var rank = 1; rank <= ranks; rank++) {
        if (tokenMatches(model.tokens[model.tokenIndex[model.at(layer, row, rank)]], search)) return true;
      }
      return false;
    }

    function highlightTableMatches() {
      var search = searchState();
      for (var row = 0; row < model.nRows; row++) {
        var cells = bodyRows[row].cells;
        for (var layer = 0; layer < model.nLayers; layer++) {
          cells[HEAD_CELLS + layer].classList.toggle("match", cellMatches(layer, row, search));
        }
      }
    }

    function updateSummary() {
      var search = searchState();
      if (search.term === "") { searchSummary.textContent = ""; return; }
      var perLayer = [];
      for (var layer = 0; layer < model.nLayers; layer++) {
        var n = 0;
        for (var p = 0; p < model.rowOfPatch.length; p++) {
          var row = model.rowOfPatch[p];
          if (row >= 0 && cellMatches(layer, row, search)) n++;
        }
        perLayer.push(n);
      }
      var first = perLayer.findIndex(function (n) { return n > 0; });
      var best = perLayer.indexOf(Math.max.apply(null, perLayer));
      var what = search.topk ? "top-" + model.topK : "top-1";
      searchSummary.textContent = perLayer[currentLayer] + " of " + model.rowOfPatch.length + " patches at layer " +
        currentLayer + " (" + what + ")" + (first < 0 ? "; no patch at any layer" :
          "; first at layer " + first + ", most at layer " + best + " (" + perLayer[best] + ")");
    }

    // --- patches: matches, token map, legend --------------------------------------------
    function paintPatches() {
      var search = searchState();
      var mapOn = !!(tokenMap && tokenMap.checked);
      var counts = new Map();
      patchEls.forEach(function (patch, index) {
        var row = model.rowOfPatch[index];
        patch.classList.toggle("match", row >= 0 && cellMatches(currentLayer, row, search));
        if (row < 0) return;
        var token = model.top1(currentLayer, row).token;
        if (mapOn) {
          patch.style.backgroundColor = tokenColour(token);
          counts.set(token, (counts.get(token) || 0) + 1);
        } else {
          patch.style.backgroundColor = "";
        }
      });
      if (!legend) return;
      legend.hidden = !mapOn;
      if (!mapOn) return;
      var entries = Array.from(counts.entries()).sort(function (a, b) { return b[1] - a[1]; });
      legendTitle.textContent = "Most frequent top-1 tokens at layer " + currentLayer + " (" + entries.length +
        " distinct over " + patchEls.length + " patches); click one to find it.";
      while (legendItems.firstChild) legendItems.removeChild(legendItems.firstChild);
      entries.slice(0, 12).forEach(function (entry) {
        var li = el("li");
        var button = el("button", "legend-item");
        button.type = "button";
        var swatch = el("span", "swatch");
        swatch.style.backgroundColor = tokenColour(entry[0]);
        button.appendChild(swatch);
        button.appendChild(el("span", "legend-token", showToken(entry[0])));
        button.appendChild(el("span", "legend-count", String(entry[1])));
        button.addEventListener("click", function () {
          tokenSearch.value = entry[0].trim() === "" ? entry[0] : entry[0].trim();
          if (searchExact) searchExact.checked = true;
          onSearch();
        });
        li.appendChild(button);
        legendItems.appendChild(li);
      });
    }

    function onSearch() {
      highlightTableMatches();
      paintPatches();
      updateSummary();
      updateUrl();
    }

    // --- URL state: #layer=L&patch=r,c|pos=N&q=..&exact=1&topk=1&map=1&outlines=0 ----------
    var applyingUrl = true; // until applyUrl has read the URL, nothing may overwrite it
    function stateParams() {
      var params = new URLSearchParams();
      params.set("layer", String(currentLayer));
      if (locked) {
        var patch = model.patchOfRow[locked.row];
        if (patch >= 0) params.set("patch", model.positions.patch_row[locked.row] + "," + model.positions.patch_col[locked.row]);
        else params.set("pos", String(model.positions.position[locked.row]));
      }
      if (tokenSearch.value) params.set("q", tokenSearch.value);
      if (searchExact && searchExact.checked) params.set("exact", "1");
      if (searchTopk && searchTopk.checked) params.set("topk", "1");
      if (tokenMap && tokenMap.checked) params.set("map", "1");
      if (showOutlines && !showOutlines.checked) params.set("outlines", "0");
      return params;
    }

    function updateUrl() {
      if (applyingUrl) return;
      var hash = "#" + stateParams().toString();
      if (permalink) permalink.setAttribute("href", hash);
      if (global.location.hash !== hash && global.history && global.history.replaceState) {
        try { global.history.replaceState(null, "", hash); } catch (e) { /* some file:// setups refuse */ }
      }
    }

    function applyUrl() {
      var params = new URLSearchParams(global.location.hash.replace(/^#/, ""));
      applyingUrl = true;
      try {
        if (params.has("q")) tokenSearch.value = params.get("q");
        if (searchExact) searchExact.checked = params.get("exact") === "1";
        if (searchTopk) searchTopk.checked = params.get("topk") === "1";
        if (tokenMap) tokenMap.checked = params.get("map") === "1";
        if (showOutlines) showOutlines.checked = params.get("outlines") !== "0";
        setOutlinesVisible();
        var layer = parseInt(params.get("layer"), 10);
        setLayer(isNaN(layer) ? currentLayer : layer);
        var row = -1;
        if (params.has("patch")) {
          var rc = params.get("patch").split(",").map(Number);
          if (rc.length === 2 && rc[0] >= 0 && rc[0] < model.gridRows && rc[1] >= 0 && rc[1] < model.gridCols) {
            row = model.rowOfPatch[rc[0] * model.gridCols + rc[1]];
          }
        } else if (params.has("pos")) {
          row = model.positions.position.indexOf(Number(params.get("pos")));
        }
        highlightTableMatches();
        paintPatches();
        updateSummary();
        if (row >= 0) lockAt(row, currentLayer);
      } finally {
        applyingUrl = false;
      }
      updateUrl();
    }

    // --- events -------------------------------------------------------------------------
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

    function current() {
      return locked || active;
    }

    // Arrow keys on the patch grid: move to the neighbouring patch that has a position.
    function movePatch(dr, dc) {
      var now = current();
      var patch = now ? model.patchOfRow[now.row] : -1;
      var r = 0, c = 0;
      if (patch >= 0) {
        r = Math.floor(patch / model.gridCols) + dr;
        c = (patch % model.gridCols) + dc;
      }
      r = Math.max(0, Math.min(model.gridRows - 1, r));
      c = Math.max(0, Math.min(model.gridCols - 1, c));
      var row = model.rowOfPatch[r * model.gridCols + c];
      if (row >= 0) lockAt(row, currentLayer);
    }

    function moveRow(delta) {
      var now = current();
      var row = now ? Math.max(0, Math.min(model.nRows - 1, now.row + delta)) : 0;
      lockAt(row, currentLayer);
    }

    var ARROWS = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };

    buildTable();
    buildGrid();
    buildExtraGrids();
    buildOutlines();
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
      grid.addEventListener("keydown", function (event) {
        var move = ARROWS[event.key];
        if (!move) return;
        event.preventDefault();
        movePatch(move[0], move[1]);
      });
    }
    wrap.setAttribute("tabindex", "0");
    wrap.addEventListener("keydown", function (event) {
      if (event.key === "ArrowUp" || event.key === "ArrowDown") {
        event.preventDefault();
        moveRow(event.key === "ArrowUp" ? -1 : 1);
      } else if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
        event.preventDefault();
        setLayer(currentLayer + (event.key === "ArrowLeft" ? -1 : 1));
        if (current()) scrollToCell(current().row, currentLayer);
      }
    });
    document.addEventListener("keydown", function (event) {
      var tag = event.target && event.target.tagName;
      if (tag === "INPUT" || tag === "TEXTAREA" || event.ctrlKey || event.metaKey || event.altKey) return;
      if (event.key === "[" || event.key === "]") {
        event.preventDefault();
        setLayer(currentLayer + (event.key === "[" ? -1 : 1));
      }
    });
    slider.addEventListener("input", function () { setLayer(Number(slider.value)); });
    tokenSearch.addEventListener("input", onSearch);
    [searchExact, searchTopk, tokenMap].forEach(function (box) { if (box) box.addEventListener("change", onSearch); });
    if (showOutlines) {
      showOutlines.addEventListener("change", function () {
        setOutlinesVisible();
        updateUrl();
      });
    }
    global.addEventListener("hashchange", function () {
      if (global.location.hash !== "#" + stateParams().toString()) applyUrl();
    });
    applyUrl();
    document.body.setAttribute("data-lens-ready", "true");
  }

  LensModel.load(global.LENS_DATA).then(start).catch(showLoadError);
})(typeof window !== "undefined" ? window : globalThis);
