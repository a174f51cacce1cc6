// The two-run view (compare.html, report/pages/compare.py): loads the data files of two
// lens pages chosen from the page's own catalogue (never a path from the URL), decodes them
// with LensModel (lens-data.js) and shows the top-1 tokens of both, aligned by patch cell
// (image positions) and by place from the end (text positions), differing cells marked.
// URL: compare.html#a=<run_dir>/<image_id>&b=<run_dir>/<image_id>&from=..&to=..&diff=1
(function (global) {
  "use strict";
  var document = global.document, ns = global.LlavaLens;
  var source = document.getElementById("compare-catalogue");
  if (!source || !ns || !ns.LensModel) return;
  var catalogue = JSON.parse(source.textContent);
  var byKey = {};
  catalogue.forEach(function (entry) { byKey[entry.key] = entry; });
  var text = ns.text, el = text.el;
  function byId(id) { return document.getElementById(id); }
  var pickA = byId("pick-a"), pickB = byId("pick-b"), from = byId("cmp-from"), to = byId("cmp-to");
  var onlyDiff = byId("cmp-only-diff"), table = byId("compare-table"), summary = byId("compare-summary");
  var models = {}; // key -> Promise<LensModel>
  var loadChain = Promise.resolve();

  function fail(error) {
    var box = byId("load-error");
    // A notice (parquet-mode data opened from file://) is the whole message: what to do instead.
    box.textContent = error && error.notice ? error.message
      : "Could not load the lens data: " + (error && error.message ? error.message : String(error));
    box.hidden = false;
  }

  // Data files are classic scripts setting window.LENS_DATA: load one at a time.
  function load(key) {
    if (models[key]) return models[key];
    var entry = byKey[key];
    if (!entry) return Promise.reject(new Error("unknown page " + key));
    models[key] = loadChain = loadChain.then(function () {
      return new Promise(function (resolve, reject) {
        var script = document.createElement("script");
        script.src = entry.data;
        script.onload = function () {
          var data = global.LENS_DATA;
          global.LENS_DATA = undefined;
          script.remove();
          if (!data || data.image_id !== entry.image_id) reject(new Error("data file of " + key + " did not load"));
          else resolve(data);
        };
        script.onerror = function () { reject(new Error("could not read " + entry.data)); };
        document.head.appendChild(script);
      });
    }).then(function (data) {
      // A parquet-mode data file's paths are relative to it (the lens page's folder).
      return ns.LensModel.load(data, { base: new URL(entry.data, global.location.href).href });
    });
    return models[key];
  }

  function option(entry) {
    var o = el("option", null, entry.image_id + " \u00b7 " + entry.file_name + " \u00b7 " + entry.label);
    o.value = entry.key;
    return o;
  }
  catalogue.forEach(function (entry) { pickA.appendChild(option(entry)); pickB.appendChild(option(entry)); });

  // Row keys: "p:r,c" for a main-grid patch, "t:k" for the k-th text position from the end,
  // "x:kind:r,c" for further image kinds.
  function rowKeys(model) {
    var p = model.positions, keys = [], textSeen = 0, n = model.nRows;
    var textFromEnd = new Array(n);
    for (var r = n - 1; r >= 0; r--) if (p.kind[r] === "text") textFromEnd[r] = textSeen++;
    for (var row = 0; row < n; row++) {
      if (p.kind[row] === "text") keys.push("t:" + textFromEnd[row]);
      else if (p.kind[row] === "image") keys.push("p:" + p.patch_row[row] + "," + p.patch_col[row]);
      else keys.push("x:" + p.kind[row] + ":" + p.patch_row[row] + "," + p.patch_col[row]);
    }
    return keys;
  }

  function meta(entry, model) {
    return entry.model + " \u00b7 top-" + model.topK + " \u00b7 " + model.nLayers + " layers \u00b7 prompt " + JSON.stringify(entry.prompt);
  }

  function render(a, b, ea, eb) {
    byId("title-a").textContent = "A: " + ea.label;
    byId("title-b").textContent = "B: " + eb.label;
    byId("meta-a").textContent = meta(ea, a);
    byId("meta-b").textContent = meta(eb, b);
    [["img-a", ea, "A"], ["img-b", eb, "B"]].forEach(function (pair) {
      var box = byId(pair[0]);
      while (box.firstChild) box.removeChild(box.firstChild);
      if (!pair[1].png) return;
      var img = document.createElement("img");
      img.src = pair[1].png;
      img.alt = "image " + pair[1].image_id + " as run " + pair[2] + "'s model saw it";
      box.appendChild(img);
    });
    var nLayers = Math.min(a.nLayers, b.nLayers);
    from.max = to.max = String(nLayers - 1);
    var first = Math.max(0, Math.min(nLayers - 1, parseInt(from.value, 10) || 0));
    var last = Math.max(first, Math.min(nLayers - 1, isNaN(parseInt(to.value, 10)) ? nLayers - 1 : parseInt(to.value, 10)));
    from.value = String(first);
    to.value = String(last);
    var keysA = rowKeys(a), keysB = rowKeys(b), rowB = {};
    keysB.forEach(function (k, r) { rowB[k] = r; });
    while (table.firstChild) table.removeChild(table.firstChild);
    var head = table.createTHead().insertRow();
    ["pos A", "pos B", "label"].forEach(function (name) { head.appendChild(el("th", "head", name)); });
    var differPerLayer = [];
    for (var l = first; l <= last; l++) { head.appendChild(el("th", "layer-head", "L" + l)); differPerLayer.push(0); }
    var tbody = document.createElement("tbody"), shared = 0, shownRows = 0;
    keysA.forEach(function (key, ra) {
      var rb = rowB[key];
      if (rb === undefined) return;
      shared++;
      var tr = el("tr", "kind-" + a.positions.kind[ra]), differs = false;
      tr.appendChild(el("th", "pos", String(a.positions.position[ra])));
      tr.appendChild(el("th", "pos", String(b.positions.position[rb])));
      var labelA = a.labelShown[ra], labelB = b.labelShown[rb];
      tr.appendChild(el("th", "label", labelA === labelB ? labelA : labelA + " / " + labelB));
      for (var layer = first; layer <= last; layer++) {
        var ca = a.top1(layer, ra), cb = b.top1(layer, rb);
        var same = ca.token === cb.token;
        var td = el("td", same ? "same" : "differ");
        td.appendChild(el("span", "tok-a", ca.shown));
        td.appendChild(el("span", "tok-b", same ? "=" : cb.shown));
        td.title = "L" + layer + ": A " + ca.shown + " " + text.formatProb(ca) + " \u00b7 B " +
          cb.shown + " " + text.formatProb(cb);
        if (!same) { differs = true; differPerLayer[layer - first]++; }
        tr.appendChild(td);
      }
      if (differs) tr.classList.add("row-differs");
      if (onlyDiff.checked && !differs) tr.hidden = true; else shownRows++;
      tbody.appendChild(tr);
    });
    table.appendChild(tbody);
    summary.textContent = shared + " aligned positions; top-1 differs at " + differPerLayer.map(function (n, i) {
      return "L" + (first + i) + ": " + n;
    }).join(", ") + (onlyDiff.checked ? " (showing " + shownRows + " rows that differ)" : "");
    document.body.setAttribute("data-compare-ready", "true");
  }

  function writeUrl() {
    var params = new URLSearchParams();
    params.set("a", pickA.value);
    params.set("b", pickB.value);
    params.set("from", from.value);
    params.set("to", to.value);
    if (onlyDiff.checked) params.set("diff", "1");
    try { global.history.replaceState(null, "", "#" + params.toString()); } catch (e) { /* file:// */ }
  }

  function update() {
    document.body.removeAttribute("data-compare-ready");
    var ka = pickA.value, kb = pickB.value;
    Promise.all([load(ka), load(kb)]).then(function (pair) {
      render(pair[0], pair[1], byKey[ka], byKey[kb]);
      writeUrl();
    }).catch(fail);
  }

  var params = new URLSearchParams(global.location.hash.replace(/^#/, ""));
  var a = byKey[params.get("a")] ? params.get("a") : catalogue[0].key;
  var b = byKey[params.get("b")] ? params.get("b") : null;
  if (!b) {  // the same image in another run, else the next page
    var imageA = byKey[a].image_id, runA = byKey[a].run_id;
    var other = catalogue.filter(function (e) { return e.image_id === imageA && e.run_id !== runA; })[0];
    b = (other || catalogue[Math.min(1, catalogue.length - 1)]).key;
  }
  pickA.value = a;
  pickB.value = b;
  if (params.has("from")) from.value = params.get("from");
  to.value = params.has("to") ? params.get("to") : "";
  onlyDiff.checked = params.get("diff") === "1";
  [pickA, pickB, from, to, onlyDiff].forEach(function (control) { control.addEventListener("change", update); });
  update();
})(typeof window !== "undefined" ? window : globalThis);
