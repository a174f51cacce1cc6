// Logit-lens page, the controller: the current layer and the active or locked
// (row, layer), the top-k panel and the tooltip, the controls (layer slider, layer range,
// shading, search, token map, outlines), keyboard navigation, exports and the URL state.
// Loaded last, after lens-data.js (LensModel), lens-text.js, lens-table.js, lens-views.js,
// lens-search.js, lens-tip.js, lens-export.js and lens-url.js, which share the namespace
// window.LlavaLens (classic scripts: module imports are blocked on file://).
(function (global) {
  "use strict";
  var ns = global.LlavaLens;
  var document = global.document;
  if (!document || !global.LENS_DATA || !ns || !ns.LensModel) return;
  var text = ns.text;

  function showLoadError(error) {
    var box = document.getElementById("load-error");
    var progress = document.getElementById("load-progress");
    if (progress) progress.hidden = true;
    if (box) {
      // A notice (a parquet-mode page opened from file://) is the whole message: what to do instead.
      box.textContent = error && error.notice ? error.message
        : "Could not load the lens data: " + (error && error.message ? error.message : String(error));
      box.hidden = false;
    }
    document.body.setAttribute("data-lens-failed", error && error.notice ? "notice" : "error");
    if (global.console && !(error && error.notice)) global.console.error(error);
  }

  function showProgress(message) {
    var box = document.getElementById("load-progress");
    if (box) box.textContent = "Reading this page\u2019s cells from the lens Parquet download: " + message + "\u2026";
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
    var layerFrom = byId("layer-from");
    var layerTo = byId("layer-to");
    var shade = byId("shade");
    var tip = new ns.Tip(model, byId("lens-tip"));

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
      ns.renderTopk(panelRows, model, layer, row);
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
      // The shown layer range follows the current layer (keeping its width).
      var range = table.range;
      if (layer < range[0] || layer > range[1]) {
        var width = range[1] - range[0];
        var first = layer < range[0] ? layer : layer - width;
        applyRange(first, first + width);
      }
      table.setCurrentLayer(currentLayer, layer);
      currentLayer = layer;
      table.scrollToLayer(layer);
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

    function applyRange(first, last) {
      var range = table.setRange(first, last);
      if (layerFrom) layerFrom.value = String(range[0]);
      if (layerTo) layerTo.value = String(range[1]);
      if (active) table.mark(active.row, active.layer, locked ? "locked" : "active");
    }

    function onRangeInput() {
      var first = parseInt(layerFrom.value, 10), last = parseInt(layerTo.value, 10);
      if (isNaN(first) || isNaN(last)) return;
      applyRange(first, last);
      if (currentLayer < table.range[0] || currentLayer > table.range[1]) setLayer(Math.max(table.range[0], Math.min(table.range[1], currentLayer)));
      table.scrollToLayer(currentLayer);
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
        from: table.range[0] > 0 || table.range[1] < model.nLayers - 1 ? table.range[0] : null,
        to: table.range[0] > 0 || table.range[1] < model.nLayers - 1 ? table.range[1] : null,
        shade: !shade || shade.checked,
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
        if (shade) shade.checked = state.shade;
        table.setShading(!shade || shade.checked);
        applyRange(state.from === null ? 0 : state.from, state.to === null ? model.nLayers - 1 : state.to);
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
    // The hovered row shows at once in the mirrored row under the table's headers; the
    // table itself scrolls to the row once the pointer rests on the patch (FOLLOW_MS), so
    // sweeping across the image does not scroll (and rebuild) the table at every patch.
    var FOLLOW_MS = 350;
    var followTimer = 0;
    function follow(row) {
      global.clearTimeout(followTimer);
      followTimer = global.setTimeout(function () {
        if (!locked && active && active.row === row) table.scrollToRow(row);
      }, FOLLOW_MS);
    }
    function hoverRow(row, event) {
      if (!locked) {
        select(row, currentLayer);
        follow(row);
      }
      tip.show(currentLayer, row, event, "image");
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
      if (!target) return;
      if (!locked) select(target.row, target.layer);
      tip.show(target.layer, target.row, event, "table");
    });
    table.table.addEventListener("mousemove", function (event) { tip.move(event); });
    table.table.addEventListener("mouseleave", function () { tip.hide(); });
    // A tooltip over the table would point at another cell once the table scrolls.
    wrap.addEventListener("scroll", function () { if (tip.from === "table") tip.hide(); }, { passive: true });
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
        if (row !== null) hoverRow(row, event);
      });
      grid.addEventListener("mousemove", function (event) { tip.move(event); });
      grid.addEventListener("mouseleave", function () { tip.hide(); });
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
    // [ and ] work whatever has focus, except where they are typed (text inputs).
    var TEXT_TYPES = { text: 1, search: 1, number: 1, email: 1, url: 1, password: 1, tel: 1 };
    function typesText(target) {
      if (!target || !target.tagName) return false;
      if (target.isContentEditable || target.tagName === "TEXTAREA") return true;
      return target.tagName === "INPUT" && TEXT_TYPES[(target.type || "text").toLowerCase()] === 1;
    }
    document.addEventListener("keydown", function (event) {
      if (typesText(event.target) || event.ctrlKey || event.metaKey || event.altKey) return;
      if (event.key === "Escape") tip.hide();
      if (event.key === "[" || event.key === "]") {
        event.preventDefault();
        setLayer(currentLayer + (event.key === "[" ? -1 : 1));
      }
    });
    slider.addEventListener("input", function () { setLayer(Number(slider.value)); });
    if (layerFrom && layerTo) {
      layerFrom.addEventListener("change", onRangeInput);
      layerTo.addEventListener("change", onRangeInput);
    }
    var allLayers = byId("layer-all");
    if (allLayers) allLayers.addEventListener("click", function () {
      applyRange(0, model.nLayers - 1);
      table.scrollToLayer(currentLayer);
      updateUrl();
    });
    if (shade) shade.addEventListener("change", function () { table.setShading(shade.checked); updateUrl(); });
    ns.lensExport.wire(model, table, {
      mapSvg: byId("export-map-svg"), mapPng: byId("export-map-png"), tableSvg: byId("export-table-svg"),
      tablePng: byId("export-table-png"), csv: byId("export-csv"),
    }, "lens-" + String(model.data.image_id), function () { return currentLayer; });
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

  ns.LensModel.load(global.LENS_DATA, { onProgress: showProgress }).then(function (model) {
    var progress = document.getElementById("load-progress");
    if (progress) progress.hidden = true;
    ns.model = model; // for tools and tests: the decoded cells of this page
    start(model);
  }).catch(showLoadError);
})(typeof window !== "undefined" ? window : globalThis);
