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

  // What the page shows for a token: its decoded text made visible (showToken), unless the
  // text hides the token (empty, or U+FFFD from a lone byte) and the tokenizer's piece is
  // known; then the piece made visible: SentencePiece's word marker "\u2581" as a space
  // (so LLaVA-1.5's lone "\u2581", id 29871, shows as \u2423), a byte-fallback piece such
  // as "<0xE2>" as \u27e80xE2\u27e9 (or, for an ASCII byte, as that character made visible).
  function showPiece(text, piece) {
    if (typeof piece !== "string" || piece === "" || (text !== "" && text.indexOf("\ufffd") < 0)) return showToken(text);
    var byte = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
    if (byte) {
      var code = parseInt(byte[1], 16);
      return code < 0x80 ? showToken(String.fromCharCode(code)) : "\u27e80x" + byte[1].toUpperCase() + "\u27e9";
    }
    return showToken(piece.replace(/\u2581/g, " "));
  }

  // Hover text of a token: its piece, decoded text and id, each exactly as recorded.
  function tokenTitle(entry) {
    var parts = [];
    if (typeof entry.piece === "string") parts.push("piece " + rawToken(entry.piece));
    parts.push((typeof entry.piece === "string" ? "text " : "raw text ") + rawToken(entry.token));
    if (entry.id !== null && entry.id !== undefined) parts.push("token id " + entry.id);
    return parts.join(", ");
  }

  // What a search compares: lowercased, without whitespace and word markers at the edges.
  function normalToken(token) {
    return token.replace(/^[\s\u2581\u0120]+|[\s\u2581]+$/g, "").toLowerCase();
  }

  // The page holds each probability as a 1-byte log code: within about 2.5 % (relative)
  // of the model's value. Two significant digits is all that code can back, so that is
  // what is printed ("43%", "4.3%", "0.043%"); the database holds the exact value.
  function formatPercent(p) {
    var percent = 100 * p;
    if (percent >= 99.5) return "100%";
    return (percent >= 10 ? String(Math.round(percent)) : percent.toPrecision(2)) + "%";
  }

  function formatProb(cell) {
    if (cell.belowFloor) return "<0.0003%";
    return formatPercent(cell.prob);
  }

  // The range of probabilities a stored code stands for, e.g. "42%–44%".
  function probRange(model, cell) {
    if (cell.belowFloor) return "below " + formatPercent(model.probFloor);
    var low = Math.exp((cell.code - 255.5) / model.probScale);
    var high = Math.min(1, Math.exp((cell.code - 254.5) / model.probScale));
    return formatPercent(low) + "–" + formatPercent(high);
  }

  // The token text exactly as stored, as a JSON string literal (quotes, escapes visible).
  function rawToken(token) {
    return JSON.stringify(token).replace(/[\u007f-\u009f\u00ad\u200b-\u200f\u2028\u2029\u2060\ufeff]/g, function (ch) {
      return "\\u" + ch.charCodeAt(0).toString(16).padStart(4, "0");
    });
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
    var shown = model.labelShown ? model.labelShown[row] : showToken(p.label[row]);
    var text = "position " + p.position[row] + " \u00b7 " + shown + " (" + p.kind[row];
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
    showToken: showToken, showPiece: showPiece, tokenTitle: tokenTitle, normalToken: normalToken, formatProb: formatProb, formatPercent: formatPercent,
    probRange: probRange, rawToken: rawToken, tokenColour: tokenColour,
    positionText: positionText, el: el,
  };
})(typeof window !== "undefined" ? window : globalThis);
