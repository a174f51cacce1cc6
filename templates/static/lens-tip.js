// Logit-lens page, the top-k at a glance: the rows of a top-k table (rank, token,
// probability, token id, with the raw text and the probability's stored range on hover),
// used by the panel and by the tooltip that follows the pointer over the patches and the
// table. Part of window.LlavaLens (see lens-data.js).
(function (global) {
  "use strict";
  var ns = global.LlavaLens = global.LlavaLens || {};
  var document = global.document;

  // Fill `tbody` with the top-k of (layer, row).
  function renderTopk(tbody, model, layer, row) {
    var text = ns.text, el = text.el;
    while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
    model.topk(layer, row).forEach(function (entry) {
      var tr = el("tr");
      tr.appendChild(el("td", "rank", String(entry.rank)));
      var token = el("td", "token", entry.shown);
      token.title = text.tokenTitle(entry);
      tr.appendChild(token);
      // The tokenizer's piece, shown where the run recorded pieces (the tooltip cannot be
      // hovered, so what the title says is also written out here).
      if (model.pieces) {
        var piece = el("td", "piece", typeof entry.piece === "string" ? entry.piece : "\u2013");
        piece.title = token.title;
        tr.appendChild(piece);
      }
      var probCell = el("td", "prob");
      var bar = el("span", "bar");
      bar.style.width = (100 * entry.prob).toFixed(1) + "%";
      probCell.appendChild(bar);
      var probText = el("span", "prob-text", text.formatProb(entry));
      probCell.title = "stored as a 1-byte log code: " + text.probRange(model, entry);
      probCell.appendChild(probText);
      tr.appendChild(probCell);
      tr.appendChild(el("td", "token-id", entry.id !== null ? String(entry.id) : "\u2013"));
      tbody.appendChild(tr);
    });
  }

  // A tooltip that follows the pointer (position: fixed, moved with a transform).
  function Tip(model, element) {
    this.model = model;
    this.element = element;
    this.title = element.querySelector(".tip-title");
    this.rows = element.querySelector("tbody");
    this.key = "";
  }

  // from: "table" or "image" (what the pointer is over).
  Tip.prototype.show = function (layer, row, event, from) {
    this.from = from;
    var key = layer + ":" + row;
    if (key !== this.key) {
      this.key = key;
      this.title.textContent = "L" + layer + " \u00b7 " + ns.text.positionText(this.model, row);
      renderTopk(this.rows, this.model, layer, row);
    }
    this.element.hidden = false;
    this.move(event);
  };

  Tip.prototype.move = function (event) {
    if (this.element.hidden || !event) return;
    var el = this.element;
    // The tooltip has a fixed size (one title line, top-k rows): read it once, so moving it
    // never forces a layout.
    if (!this.size) this.size = [el.offsetWidth, el.offsetHeight];
    var width = this.size[0], height = this.size[1];
    // The viewport's size, read once per resize (reading it at every move would force the
    // layout of what the hover just changed).
    if (!this.viewport) {
      var self = this;
      this.viewport = [document.documentElement.clientWidth, document.documentElement.clientHeight];
      global.addEventListener("resize", function () { self.viewport = null; }, { once: true });
    }
    var vw = this.viewport[0], vh = this.viewport[1];
    var x = event.clientX + 16, y = event.clientY + 16;
    if (x + width > vw - 4) x = event.clientX - width - 12;
    if (y + height > vh - 4) y = event.clientY - height - 12;
    x = Math.max(4, Math.min(x, vw - width - 4));
    y = Math.max(4, y);
    el.style.transform = "translate(" + Math.round(x) + "px," + Math.round(y) + "px)";
  };

  Tip.prototype.hide = function () {
    this.element.hidden = true;
    this.key = "";
  };

  ns.renderTopk = renderTopk;
  ns.Tip = Tip;
})(typeof window !== "undefined" ? window : globalThis);
