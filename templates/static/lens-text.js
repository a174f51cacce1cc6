// Logit-lens page, text helpers: how tokens, probabilities and positions are shown, and
// the one way elements get text (textContent: token strings are untrusted and never
// reach the DOM as HTML). Part of window.LlavaLens (see lens-data.js).
(function (global) {
  "use strict";
  var ns = global.LlavaLens = global.LlavaLens || {};
  var document = global.document;

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

  ns.text = {
    showToken: showToken, normalToken: normalToken, formatProb: formatProb, tokenColour: tokenColour,
    positionText: positionText, el: el,
  };
})(typeof window !== "undefined" ? window : globalThis);
