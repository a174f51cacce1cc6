// Logit-lens page, "where does token X appear": which cells match the search box (top-1
// or any top-k token, exact or substring, after normalising) and the per-layer summary
// over the image patches. Part of window.LlavaLens (see lens-data.js).
(function (global) {
  "use strict";
  var ns = global.LlavaLens = global.LlavaLens || {};

  // inputs: {tokenSearch, searchExact, searchTopk} (the checkboxes may be null).
  function LensSearch(model, inputs) {
    this.model = model;
    this.inputs = inputs;
  }

  LensSearch.prototype.state = function () {
    var inputs = this.inputs;
    return {
      term: ns.text.normalToken(inputs.tokenSearch.value),
      exact: !!(inputs.searchExact && inputs.searchExact.checked),
      topk: !!(inputs.searchTopk && inputs.searchTopk.checked),
    };
  };

  function tokenMatches(token, search) {
    var t = ns.text.normalToken(token);
    return search.exact ? t === search.term : t.indexOf(search.term) !== -1;
  }

  LensSearch.prototype.cellMatches = function (layer, row, search) {
    if (search.term === "") return false;
    var model = this.model;
    var ranks = search.topk ? model.topK : 1;
    for (var rank = 1; rank <= ranks; rank++) {
      if (tokenMatches(model.tokens[model.tokenIndex[model.at(layer, row, rank)]], search)) return true;
    }
    return false;
  };

  // The summary line for the current search at `currentLayer` ("" without a search).
  LensSearch.prototype.summary = function (currentLayer) {
    var model = this.model, search = this.state();
    if (search.term === "") return "";
    var perLayer = [];
    for (var layer = 0; layer < model.nLayers; layer++) {
      var n = 0;
      for (var p = 0; p < model.rowOfPatch.length; p++) {
        var row = model.rowOfPatch[p];
        if (row >= 0 && this.cellMatches(layer, row, search)) n++;
      }
      perLayer.push(n);
    }
    var first = perLayer.findIndex(function (n) { return n > 0; });
    var best = perLayer.indexOf(Math.max.apply(null, perLayer));
    var what = search.topk ? "top-" + model.topK : "top-1";
    return perLayer[currentLayer] + " of " + model.rowOfPatch.length + " patches at layer " +
      currentLayer + " (" + what + ")" + (first < 0 ? "; no patch at any layer" :
        "; first at layer " + first + ", most at layer " + best + " (" + perLayer[best] + ")");
  };

  ns.LensSearch = LensSearch;
})(typeof window !== "undefined" ? window : globalThis);
