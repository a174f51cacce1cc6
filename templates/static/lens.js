// Logit-lens page, the controller: the current layer and the active or locked
// (row, layer), the top-k panel, the controls (layer slider, search, token map, outlines),
// keyboard navigation and the URL state. Loaded last, after lens-data.js (LensModel),
// lens-text.js, lens-table.js, lens-views.js, lens-search.js and lens-url.js, which share
// the namespace window.LlavaLens (classic scripts: module imports are blocked on file://).
(function (global) {
  "use strict";
  var ns = global.LlavaLens;
  var document = global.document;
  if (!document || !global.LENS_DATA || !ns || !ns.LensModel) return;
  var text = ns.text;

  function showLoadError(error) {
    var box = document.getElementById("load-error");
    if (box) {
      box.textContent = "Could not load the lens data: " + (error && error.message ? error.message : String(error));
      box.hidden = false;
    }
    if (global.console) global.console.error(error);
  }

  function start(model) {
    function byId(id) { return document.getElementById(id); }
    var wrap = byId("lens-table-wrap");
    var grid = byId("patch-grid");
    var slider = byId("layer");
    var layerValue = byId("layer-value");
    var tokenSearch = byId("token-search");
    var searchExact = byId("search-exact");
    var searchTopk = byId("search-topk");
    var searchSummary = byId("search-summary");
    var tokenMap = byId("token-map");
    var showOutlines = byId("show-outlines");
    var permalink = byId("permalink");
    var panelTitle = byId("panel-title");
    var panelSubtitle = byId("panel-subtitle");
    var panelRows = byId("panel-rows");

    var table = new ns.LensTable(model, byId("lens-table"), wrap);
    var views = new ns.PatchViews(model, {
      grid: grid, outlines: byId("outlines"), showOutlines: showOutlines,
      legend: byId("legend"), legendTitle: byId("legend-title"), legendItems: byId("legend-items"),
    });
    var search = new ns.LensSearch(model, { tokenSearch: tokenSearch, searchExact: searchExact, searchTopk: searchTopk });

    var currentLayer = model.nLayers - 1;
    var locked = null; // {row, layer} while a selection is locked
    var active = null; // {row, layer} currently shown

    function clearActive() {
      if (!active) return;
      table.mark(active.row, active.layer, null);
      views.mark(active.row, null);
      active = null;
    }

    function showPanel(row, layer) {
      panelTitle.textContent = "Top-" + model.topK + " at layer " + layer + (layer === 0 ? " (embeddings)" : "");
      panelSubtitle.textContent = text.positionText(model, row) + (locked ? " \u2014 locked (click again to unlock)" : "");
      while (panelRows.firstChild) panelRows.removeChild(panelRows.firstChild);
      model.topk(layer, row).forEach(function (entry) {
        var tr = text.el("tr");
        tr.appendChild(text.el("td", "rank", String(entry.rank)));
        tr.appendChild(text.el("td", "token", text.showToken(entry.token)));
        var probCell = text.el("td", "prob");
        var bar = text.el("span", "bar");
        bar.style.width = (100 * entry.prob).toFixed(1) + "%";
        probCell.appendChild(bar);
        probCell.appendChild(text.el("span", "prob-text", text.formatProb(entry)));
        tr.appendChild(probCell);
        panelRows.appendChild(tr);
      });
    }

    function select(row, layer) {
      clearActive();
      active = { row: row, layer: layer };
      table.mark(row, layer, locked ? "locked" : "active");
      views.mark(row, locked ? "locked" : "active");
      showPanel(row, layer);
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
      table.scrollToCell(row, layer);
      updateUrl();
    }

    function setLayer(layer) {
      layer = Math.max(0, Math.min(model.nLayers - 1, layer));
      table.setCurrentLayer(currentLayer, layer);
      currentLayer = layer;
      slider.value = String(layer);
      layerValue.textContent = String(layer);
      if (locked) {
        locked.layer = layer;
        select(locked.row, layer);
      } else if (active) {
        select(active.row, layer);
      }
      paintPatches();
      searchSummary.textContent = search.summary(currentLayer);
      updateUrl();
    }

    function paintPatches() {
      var state = search.state();
      views.paint(currentLayer, function (row) { return search.cellMatches(currentLayer, row, state); },
        !!(tokenMap && tokenMap.checked), function (token) {
          tokenSearch.value = token.trim() === "" ? token : token.trim();
          if (searchExact) searchExact.checked = true;
          onSearch();
        });
    }

    function highlightTableMatches() {
      var state = search.state();
      table.highlightMatches(function (layer, row) { return search.cellMatches(layer, row, state); });
    }

    function onSearch() {
      highlightTableMatches();
      paintPatches();
      searchSummary.textContent = search.summary(currentLayer);
      updateUrl();
    }

    // --- URL state ----------------------------------------------------------------------
    var applyingUrl = true; // until applyUrl has read the URL, nothing may overwrite it
    function urlHash() {
      var patch = locked ? model.patchOfRow[locked.row] : -1;
      return ns.lensUrl.write({
        layer: currentLayer,
        patch: patch >= 0 ? [model.positions.patch_row[locked.row], model.positions.patch_col[locked.row]] : null,
        pos: locked && patch < 0 ? model.positions.position[locked.row] : null,
        q: tokenSearch.value,
        exact: !!(searchExact && searchExact.checked),
        topk: !!(searchTopk && searchTopk.checked),
        map: !!(tokenMap && tokenMap.checked),
        outlines: !showOutlines || showOutlines.checked,
      });
    }

    function updateUrl() {
      if (applyingUrl) return;
      var hash = urlHash();
      if (permalink) permalink.setAttribute("href", hash);
      if (global.location.hash !== hash && global.history && global.history.replaceState) {
        try { global.history.replaceState(null, "", hash); } catch (e) { /* some file:// setups refuse */ }
      }
    }

    function applyUrl() {
      var state = ns.lensUrl.read(global.location.hash);
      applyingUrl = true;
      try {
        if (state.q !== null) tokenSearch.value = state.q;
        if (searchExact) searchExact.checked = state.exact;
        if (searchTopk) searchTopk.checked = state.topk;
        if (tokenMap) tokenMap.checked = state.map;
        if (showOutlines) showOutlines.checked = state.outlines;
        views.setOutlinesVisible();
        setLayer(state.layer === null ? currentLayer : state.layer);
        var row = -1;
        var rc = state.patch;
        if (rc) {
          if (rc.length === 2 && rc[0] >= 0 && rc[0] < model.gridRows && rc[1] >= 0 && rc[1] < model.gridCols) {
            row = model.rowOfPatch[rc[0] * model.gridCols + rc[1]];
          }
        } else if (state.pos !== null) {
          row = model.positions.position.indexOf(state.pos);
        }
        highlightTableMatches();
        paintPatches();
        searchSummary.textContent = search.summary(currentLayer);
        if (row >= 0) lockAt(row, currentLayer);
      } finally {
        applyingUrl = false;
      }
      updateUrl();
    }

    // --- keyboard -----------------------------------------------------------------------
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

    // --- build and wire -----------------------------------------------------------------
    function hoverRow(row) {
      if (!locked) select(row, currentLayer);
    }
    function clickRow(row) {
      toggleLock(row, currentLayer);
      table.scrollToCell(row, currentLayer);
    }

    table.build();
    views.buildGrid();
    views.buildExtraGrids(hoverRow, clickRow);
    views.buildOutlines(model.data);
    setLayer(currentLayer);

    table.table.addEventListener("mouseover", function (event) {
      var target = table.cellTarget(event, currentLayer);
      if (target && !locked) select(target.row, target.layer);
    });
    table.table.addEventListener("click", function (event) {
      var target = table.cellTarget(event, currentLayer);
      if (!target) return;
      toggleLock(target.row, target.layer);
    });
    table.table.addEventListener("click", function (event) {
      var layer = table.headerTarget(event);
      if (layer >= 0) setLayer(layer);
    });
    if (grid) {
      grid.addEventListener("mouseover", function (event) {
        var row = views.patchTarget(event);
        if (row !== null) hoverRow(row);
      });
      grid.addEventListener("click", function (event) {
        var row = views.patchTarget(event);
        if (row !== null) clickRow(row);
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
        if (current()) table.scrollToCell(current().row, currentLayer);
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
        views.setOutlinesVisible();
        updateUrl();
      });
    }
    global.addEventListener("hashchange", function () {
      if (global.location.hash !== urlHash()) applyUrl();
    });
    applyUrl();
    document.body.setAttribute("data-lens-ready", "true");
  }

  ns.LensModel.load(global.LENS_DATA).then(start).catch(showLoadError);
})(typeof window !== "undefined" ? window : globalThis);
