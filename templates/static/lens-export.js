// Logit-lens page, exports from the page: the token map (SVG, PNG), the visible part of
// the table (SVG, PNG: the rows and layer columns in view) and every row of the image as
// CSV. Files are made in the page (Blob + download link), so this works from file://.
// Token text reaches SVG only through textContent and XMLSerializer (escaped), and
// canvases through fillText. Part of window.LlavaLens (see lens-data.js).
(function (global) {
  "use strict";
  var ns = global.LlavaLens = global.LlavaLens || {};
  var document = global.document;
  var SVG_NS = "http://www.w3.org/2000/svg";
  var FONT = "12px ui-monospace, Menlo, Consolas, monospace";

  function download(name, blob) {
    var url = global.URL.createObjectURL(blob);
    var a = document.createElement("a");
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    global.setTimeout(function () { global.URL.revokeObjectURL(url); }, 1000);
  }

  function csvField(value) {
    if (value === null || value === undefined) return "";
    var s = String(value);
    return /[",\n\r]/.test(s) || s !== s.trim() ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  // Every (position, layer, rank) of the image; probabilities as the page holds them.
  function csv(model) {
    var p = model.positions;
    var lines = ["position,kind,patch_row,patch_col,label,label_token_id,layer,rank,token_id,token,prob_approx"];
    for (var row = 0; row < model.nRows; row++) {
      var head = [p.position[row], p.kind[row], p.patch_row[row], p.patch_col[row], p.label[row],
        p.token_id ? p.token_id[row] : null].map(csvField).join(",");
      for (var layer = 0; layer < model.nLayers; layer++) {
        for (var rank = 1; rank <= model.topK; rank++) {
          var cell = model.cell(layer, row, rank);
          lines.push(head + "," + [layer, rank, cell.id, cell.token, cell.prob.toPrecision(3)].map(csvField).join(","));
        }
      }
    }
    return lines.join("\n") + "\n";
  }

  // A figure: a title, column headers and rows of {text, fill} cells, drawn as SVG or canvas.
  // spec: {title, note, colWidth, rowHeight, headWidth, columns: [name], rows: [{head, cells: [{text, fill, title}]}]}
  function figureSize(spec) {
    return { width: spec.headWidth + spec.columns.length * spec.colWidth + 8, height: 44 + (spec.rows.length + 1) * spec.rowHeight + 8 };
  }

  function svgFigure(spec) {
    var size = figureSize(spec);
    var svg = document.createElementNS(SVG_NS, "svg");
    svg.setAttribute("xmlns", SVG_NS);
    svg.setAttribute("width", size.width);
    svg.setAttribute("height", size.height);
    svg.setAttribute("viewBox", "0 0 " + size.width + " " + size.height);
    svg.setAttribute("font-family", "ui-monospace, Menlo, Consolas, monospace");
    svg.setAttribute("font-size", "11");
    function add(parent, tag, attrs, text) {
      var node = document.createElementNS(SVG_NS, tag);
      Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
      if (text !== undefined) node.textContent = text;
      parent.appendChild(node);
      return node;
    }
    add(svg, "rect", { x: 0, y: 0, width: size.width, height: size.height, fill: "#ffffff" });
    add(svg, "text", { x: 4, y: 16, "font-size": "13", fill: "#111" }, spec.title);
    add(svg, "text", { x: 4, y: 32, fill: "#555" }, spec.note);
    var y0 = 44;
    spec.columns.forEach(function (name, j) {
      add(svg, "text", { x: spec.headWidth + j * spec.colWidth + 2, y: y0 + spec.rowHeight - 4, fill: "#333" }, name);
    });
    spec.rows.forEach(function (row, i) {
      var y = y0 + (i + 1) * spec.rowHeight;
      add(svg, "text", { x: 2, y: y + spec.rowHeight - 4, fill: "#333" }, row.head);
      row.cells.forEach(function (cell, j) {
        var g = add(svg, "g", {});
        if (cell.title) add(g, "title", {}, cell.title);
        add(g, "rect", { x: spec.headWidth + j * spec.colWidth, y: y, width: spec.colWidth, height: spec.rowHeight,
          fill: cell.fill || "#ffffff", stroke: "#d4d9df", "stroke-width": "0.5" });
        if (cell.text) add(g, "text", { x: spec.headWidth + j * spec.colWidth + 2, y: y + spec.rowHeight - 4, fill: "#111" }, clip(cell.text, spec.colWidth));
      });
    });
    return new global.XMLSerializer().serializeToString(svg);
  }

  function clip(text, width) {
    var max = Math.max(1, Math.floor((width - 4) / 6.7));
    return text.length > max ? text.slice(0, max - 1) + "\u2026" : text;
  }

  function pngFigure(spec, done) {
    var size = figureSize(spec), scale = 2;
    var canvas = document.createElement("canvas");
    canvas.width = size.width * scale;
    canvas.height = size.height * scale;
    var ctx = canvas.getContext("2d");
    ctx.scale(scale, scale);
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, size.width, size.height);
    ctx.font = FONT;
    ctx.fillStyle = "#111";
    ctx.fillText(spec.title, 4, 16);
    ctx.fillStyle = "#555";
    ctx.fillText(spec.note, 4, 32);
    var y0 = 44;
    ctx.fillStyle = "#333";
    spec.columns.forEach(function (name, j) { ctx.fillText(name, spec.headWidth + j * spec.colWidth + 2, y0 + spec.rowHeight - 4); });
    spec.rows.forEach(function (row, i) {
      var y = y0 + (i + 1) * spec.rowHeight;
      ctx.fillStyle = "#333";
      ctx.fillText(row.head, 2, y + spec.rowHeight - 4);
      row.cells.forEach(function (cell, j) {
        var x = spec.headWidth + j * spec.colWidth;
        ctx.fillStyle = cell.fill || "#ffffff";
        ctx.fillRect(x, y, spec.colWidth, spec.rowHeight);
        ctx.strokeStyle = "#d4d9df";
        ctx.strokeRect(x, y, spec.colWidth, spec.rowHeight);
        if (cell.text) {
          ctx.fillStyle = "#111";
          ctx.fillText(clip(cell.text, spec.colWidth), x + 2, y + spec.rowHeight - 4);
        }
      });
    });
    canvas.toBlob(done, "image/png");
  }

  // The token map at `layer`: one cell per patch in its top-1 token's colour, labelled.
  function tokenMapSpec(model, layer, name) {
    var text = ns.text, rows = [], columns = [];
    for (var c = 0; c < model.gridCols; c++) columns.push(String(c));
    for (var r = 0; r < model.gridRows; r++) {
      var cells = [];
      for (var c2 = 0; c2 < model.gridCols; c2++) {
        var row = model.rowOfPatch[r * model.gridCols + c2];
        if (row < 0) { cells.push({ text: "", fill: "#eeeeee" }); continue; }
        var cell = model.top1(layer, row);
        cells.push({ text: cell.shown, fill: opaque(text.tokenColour(cell.token)),
          title: "patch " + r + "," + c2 + ": " + cell.shown + " " + text.formatProb(cell) });
      }
      rows.push({ head: String(r), cells: cells });
    }
    return { title: name + " \u00b7 token map, layer " + layer, note: "top-1 lens token per patch (colour per token string)",
      colWidth: 44, rowHeight: 16, headWidth: 22, columns: columns, rows: rows };
  }

  // The table as shown: the rows and the layer columns in view.
  function tableSpec(model, table, name) {
    var text = ns.text, rowsIn = table.visibleRows(), layersIn = table.visibleLayers();
    if (!rowsIn || !layersIn) return null;
    var columns = [], rows = [];
    for (var l = layersIn[0]; l <= layersIn[1]; l++) if (table.headerCells[l].offsetWidth) columns.push(l);
    for (var row = rowsIn[0]; row <= rowsIn[1]; row++) {
      rows.push({
        head: model.positions.position[row] + " " + model.labelShown[row].slice(0, 10),
        cells: columns.map(function (layer) {
          var cell = model.top1(layer, row);
          var alpha = (0.05 * Math.min(9, Math.floor(cell.prob * 10))).toFixed(2);
          return { text: cell.shown, fill: "rgba(10,102,194," + alpha + ")",
            title: "L" + layer + " pos " + model.positions.position[row] + ": " + cell.shown + " " + text.formatProb(cell) };
        }),
      });
    }
    return { title: name + " \u00b7 lens table, positions " + model.positions.position[rowsIn[0]] + "\u2013" +
      model.positions.position[rowsIn[1]] + ", layers " + columns[0] + "\u2013" + columns[columns.length - 1],
      note: "top-1 lens token; shade = top-1 probability (10% steps)", colWidth: 72, rowHeight: 16, headWidth: 110,
      columns: columns.map(function (l) { return "L" + l; }), rows: rows };
  }

  function opaque(hsla) {
    return hsla.replace("hsla(", "hsl(").replace(/,\s*[\d.]+\)$/, ")");
  }

  // buttons: {mapSvg, mapPng, tableSvg, tablePng, csv}; name: file name stem; layer(): current layer.
  function wire(model, table, buttons, name, layer) {
    function on(button, handler) { if (button) button.addEventListener("click", handler); }
    on(buttons.mapSvg, function () {
      download(name + "-tokenmap-L" + layer() + ".svg", new global.Blob([svgFigure(tokenMapSpec(model, layer(), name))], { type: "image/svg+xml" }));
    });
    on(buttons.mapPng, function () {
      pngFigure(tokenMapSpec(model, layer(), name), function (blob) { download(name + "-tokenmap-L" + layer() + ".png", blob); });
    });
    on(buttons.tableSvg, function () {
      var spec = tableSpec(model, table, name);
      if (spec) download(name + "-table.svg", new global.Blob([svgFigure(spec)], { type: "image/svg+xml" }));
    });
    on(buttons.tablePng, function () {
      var spec = tableSpec(model, table, name);
      if (spec) pngFigure(spec, function (blob) { download(name + "-table.png", blob); });
    });
    on(buttons.csv, function () {
      download(name + ".csv", new global.Blob([csv(model)], { type: "text/csv" }));
    });
  }

  ns.lensExport = { wire: wire, csv: csv, svgFigure: svgFigure, tokenMapSpec: tokenMapSpec, tableSpec: tableSpec };
})(typeof window !== "undefined" ? window : globalThis);
