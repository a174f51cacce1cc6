// Logit-lens page, the view as a URL fragment:
// #layer=L&patch=r,c|pos=N&q=..&exact=1&topk=1&map=1&outlines=0&from=A&to=B&shade=0
// `write` turns a view state into the fragment, `read` a fragment into a view state:
// {layer, patch: [r, c] or null, pos: N or null, q: string or null, exact, topk, map,
// outlines, from, to (the shown layer range, null: all), shade}. Part of window.LlavaLens (see lens-data.js).
(function (global) {
  "use strict";
  var ns = global.LlavaLens = global.LlavaLens || {};

  function write(state) {
    var params = new URLSearchParams();
    params.set("layer", String(state.layer));
    if (state.patch) params.set("patch", state.patch[0] + "," + state.patch[1]);
    else if (state.pos !== null) params.set("pos", String(state.pos));
    if (state.q) params.set("q", state.q);
    if (state.exact) params.set("exact", "1");
    if (state.topk) params.set("topk", "1");
    if (state.map) params.set("map", "1");
    if (!state.outlines) params.set("outlines", "0");
    if (state.from !== null && state.from !== undefined) params.set("from", String(state.from));
    if (state.to !== null && state.to !== undefined) params.set("to", String(state.to));
    if (state.shade === false) params.set("shade", "0");
    return "#" + params.toString();
  }

  function read(hash) {
    var params = new URLSearchParams(hash.replace(/^#/, ""));
    var layer = parseInt(params.get("layer"), 10);
    var from = parseInt(params.get("from"), 10), to = parseInt(params.get("to"), 10);
    return {
      layer: isNaN(layer) ? null : layer,
      patch: params.has("patch") ? params.get("patch").split(",").map(Number) : null,
      pos: !params.has("patch") && params.has("pos") ? Number(params.get("pos")) : null,
      q: params.has("q") ? params.get("q") : null,
      exact: params.get("exact") === "1",
      topk: params.get("topk") === "1",
      map: params.get("map") === "1",
      outlines: params.get("outlines") !== "0",
      from: isNaN(from) ? null : from,
      to: isNaN(to) ? null : to,
      shade: params.get("shade") !== "0",
    };
  }

  ns.lensUrl = { write: write, read: read };
})(typeof window !== "undefined" ? window : globalThis);
