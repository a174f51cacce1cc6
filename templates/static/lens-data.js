// Logit-lens page, data decoding: window.LENS_DATA (a classic script written by
// report/lens_codec.py; format "llava-interp-lens/4", or /3 without pieces, /2 without token ids, documented there) -> LensModel, the
// decoded cells with lookups by (layer, row, rank) and by patch.
// The lens page's scripts are classic scripts (ES module imports are blocked on file://)
// sharing one namespace, window.LlavaLens; this one also exposes window.LensModel.
(function (global) {
  "use strict";
  var ns = global.LlavaLens = global.LlavaLens || {};

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
    var ni = packed.token_ids_bytes || 0;
    var np = packed.token_pieces_bytes || 0;
    var nt = packed.tokens_bytes + ni + np;
    var nb = packed.index_bytes;
    if (raw.length !== nt + nCells * (nb + 1)) throw new Error("lens data: packed length mismatch");
    var decoder = new global.TextDecoder("utf-8");
    this.tokens = JSON.parse(decoder.decode(raw.subarray(0, packed.tokens_bytes)));
    // The token id of each dictionary entry (null without ids: format 2, or no ids recorded).
    this.tokenIds = null;
    if (ni) {
      var deltas = JSON.parse(decoder.decode(raw.subarray(packed.tokens_bytes, packed.tokens_bytes + ni)));
      for (var d = 1; d < deltas.length; d++) deltas[d] += deltas[d - 1];
      this.tokenIds = deltas;
    }
    // The tokenizer's piece of each dictionary entry (null: not recorded; format 3, or a run
    // written before the pieces were), and what the page shows for each entry (ns.text.showPiece).
    this.pieces = null;
    if (np) {
      var codes = JSON.parse(decoder.decode(raw.subarray(packed.tokens_bytes + ni, nt)));
      this.pieces = codes.map(function (code, k) {
        return code === 0 ? this.tokens[k] : code === 1 ? "\u2581" + this.tokens[k] : code;
      }, this);
    }
    // (lens-text.js provides showPiece; a page or tool that loads this file alone shows the text as is.)
    var showPiece = ns.text ? ns.text.showPiece : function (text) { return text; };
    this.shown = this.tokens.map(function (token, k) { return showPiece(token, this.pieces ? this.pieces[k] : null); }, this);
    var labelPieces = this.positions.piece || [];
    this.labelShown = this.positions.label.map(function (label, row) { return showPiece(label, labelPieces[row]); });
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
    // A code stands for every probability within half a step of it: this relative error.
    this.probScale = packed.prob_log_scale;
    this.probRelError = Math.exp(0.5 / packed.prob_log_scale) - 1;
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
    var index = this.tokenIndex[at];
    return { token: this.tokens[index], shown: this.shown[index], piece: this.pieces ? this.pieces[index] : null,
      id: this.tokenIds ? this.tokenIds[index] : null, prob: this.probTable[code],
      code: code, belowFloor: code === 0 };
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

  // The top-1 token's dictionary index (no object allocated: for loops over many cells).
  LensModel.prototype.top1Index = function (layer, row) {
    return this.tokenIndex[(layer * this.nRows + row) * this.topK];
  };

  ns.LensModel = LensModel;
  global.LensModel = LensModel;
})(typeof window !== "undefined" ? window : globalThis);
