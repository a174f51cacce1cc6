// Logit-lens page, data decoding: window.LENS_DATA (a classic script written by
// report/lens_codec.py; format "llava-interp-lens/4", or /3 without pieces, /2 without token ids, documented there) -> LensModel, the
// decoded cells with lookups by (layer, row, rank) and by patch. A data file holds its cells
// ("packed", inflated here) or, in parquet mode, says where they are in the run's lens Parquet
// download ("parquet"): then they are read over HTTP range requests with the vendored
// hyparquet bundle, into the same arrays, and the positions arrays may sit in the run's shared
// positions file (fetched first; the model then sees data.positions as if inline).
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
  function LensModel(data, raw, cells) {
    if (cells) return this.fromCells(data, cells);
    var packed = data.packed;
    var nCells = this.shape(data);
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
    var index = new Uint32Array(nCells);
    for (var b = 0; b < nb; b++) {
      var plane = raw.subarray(nt + b * nCells, nt + (b + 1) * nCells);
      for (var i = 0; i < nCells; i++) index[i] += plane[i] * Math.pow(256, b);
    }
    this.tokenIndex = index;
    this.probCodes = raw.subarray(nt + nb * nCells);
    this.probScale = packed.prob_log_scale;
    this.finish(data);
  }

  // The lookups every format shares: what the page shows for each entry (ns.text.showPiece),
  // the probability table, the patch and view maps.
  LensModel.prototype.finish = function (data) {
    // (lens-text.js provides showPiece; a page or tool that loads this file alone shows the text as is.)
    var showPiece = ns.text ? ns.text.showPiece : function (text) { return text; };
    this.shown = this.tokens.map(function (token, k) { return showPiece(token, this.pieces ? this.pieces[k] : null); }, this);
    var labelPieces = this.positions.piece || [];
    this.labelShown = this.positions.label.map(function (label, row) { return showPiece(label, labelPieces[row]); });
    this.probTable = new Float64Array(256);
    for (var c = 1; c < 256; c++) this.probTable[c] = Math.exp((c - 255) / this.probScale);
    this.probFloor = Math.exp(-254.5 / this.probScale);
    // A code stands for every probability within half a step of it: this relative error.
    this.probRelError = Math.exp(0.5 / this.probScale) - 1;
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
    return this;
  };

  // The table's shape from the data object (both formats); returns its cell count, checked.
  LensModel.prototype.shape = function (data) {
    this.data = data;
    this.nLayers = data.n_layers;
    this.topK = data.top_k;
    this.gridRows = data.grid_rows;
    this.gridCols = data.grid_cols;
    this.positions = data.positions;
    this.nRows = data.positions.position.length;
    if (data.n_cells !== this.nLayers * this.nRows * this.topK) throw new Error("lens data: cell count mismatch");
    return data.n_cells;
  };

  // Parquet mode: `cells` = {layer, position, rank, tokenId, prob} (parallel arrays, one entry
  // per lens row of the image), `text` token id -> text, `pieces` token id -> piece (or null).
  // Builds the arrays the packed format decodes into: a dictionary of the image's distinct
  // token ids (tokens, tokenIds, pieces), tokenIndex and probCodes per cell; each cell must be
  // covered exactly once. probValues keeps the Parquet's probability (PROB_SIGNIFICANT_BITS).
  LensModel.prototype.fromCells = function (data, cells) {
    var nCells = this.shape(data), n = cells.layer.length;
    if (n !== nCells) throw new Error("lens data: the Parquet rows cover " + n + " of " + nCells + " cells");
    var rowOfPosition = new Map();
    data.positions.position.forEach(function (position, row) { rowOfPosition.set(position, row); });
    var entryOfId = new Map();
    this.tokens = [];
    this.tokenIds = [];
    var pieces = [], anyPiece = false;
    this.tokenIndex = new Uint32Array(nCells);
    this.probCodes = new Uint8Array(nCells);
    this.probValues = new Float32Array(nCells);
    this.probScale = PROB_LOG_SCALE;
    var seen = new Uint8Array(nCells);
    for (var i = 0; i < n; i++) {
      var row = rowOfPosition.get(cells.position[i]);
      var layer = cells.layer[i], rank = cells.rank[i];
      if (row === undefined || layer < 0 || layer >= this.nLayers || rank < 1 || rank > this.topK) {
        throw new Error("lens data: a Parquet row outside the page's cells (layer " + layer + ", position " + cells.position[i] + ", rank " + rank + ")");
      }
      var at = (layer * this.nRows + row) * this.topK + (rank - 1);
      if (seen[at]) throw new Error("lens data: two Parquet rows for one cell");
      seen[at] = 1;
      var id = cells.tokenId[i], entry = entryOfId.get(id);
      if (entry === undefined) {
        var text = cells.text.get(id);
        if (text === undefined) throw new Error("lens data: token id " + id + " has no text in the run's lens_tokens file");
        entry = this.tokens.length;
        entryOfId.set(id, entry);
        this.tokens.push(text);
        this.tokenIds.push(id);
        var piece = cells.pieces ? cells.pieces.get(id) : undefined;
        pieces.push(piece === undefined ? null : piece);
        if (piece !== undefined && piece !== null) anyPiece = true;
      }
      this.tokenIndex[at] = entry;
      var p = cells.prob[i];
      this.probValues[at] = p;
      this.probCodes[at] = encodeProb(p);
    }
    this.pieces = anyPiece ? pieces : null;
    return this.finish(data);
  };

  // The packed format's probability code of p (report/lens_codec.py encode_probs).
  var PROB_LOG_SCALE = 20;
  function encodeProb(p) {
    if (!(p > 0)) return 0;
    var code = Math.round(255 + PROB_LOG_SCALE * Math.log(Math.min(p, 1)));
    return code < 0 ? 0 : code > 255 ? 255 : code;
  }

  // What a parquet-mode page says on file://: browsers read no file over file:// from a script.
  var FILE_NOTICE = "This lens page reads its cells from the site's Parquet downloads over HTTP, which browsers " +
    "do not allow for pages opened from disk (file://). Serve the site and open it from there: " +
    "`llava-interp report serve --dir SITE` (then http://127.0.0.1:8000/), or any web server; or rebuild it " +
    "with `llava-interp report build --lens-data inline` for pages that open from disk (each then carries its own " +
    "copy of its cells).";

  // Token text exactly as stored: the reader's default TextDecoder drops a leading U+FEFF
  // (a token of its own in LLaVA-1.5's vocabulary), ignoreBOM keeps it.
  var EXACT_TEXT = { stringFromBytes: function (bytes) {
    return bytes && new global.TextDecoder("utf-8", { ignoreBOM: true }).decode(bytes);
  } };

  function fetchBytes(url) {
    return global.fetch(url).then(function (response) {
      if (!response.ok) throw new Error("could not read " + url + " (HTTP " + response.status + ")");
      return response.arrayBuffer();
    });
  }

  // The lens file's footer (its metadata, about 1.5 KB per image in the file) is the same for
  // every page of the images in that file: kept in sessionStorage once read, so the next page
  // of the tab reads only its row groups. Where storage is full or unavailable, it is read again.
  function withStoredFooter(remote, url, footerBytes) {
    if (!footerBytes) return remote;
    var size = remote.byteLength, footerStart = size - footerBytes;
    var key = "llava-interp-lens-footer:" + url + ":" + size + ":" + footerBytes;
    var footer = null;
    try {
      var stored = global.sessionStorage && global.sessionStorage.getItem(key);
      if (stored) footer = decodeBase64(stored).buffer;
    } catch (error) { footer = null; }
    function store(buffer) {
      try {
        var bytes = new Uint8Array(buffer), parts = [];
        for (var i = 0; i < bytes.length; i += 0x8000) parts.push(String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000)));
        global.sessionStorage.setItem(key, global.btoa(parts.join("")));
      } catch (error) { /* full or unavailable: read it again next time */ }
    }
    return {
      byteLength: size,
      slice: function (start, end) {
        var stop = end === undefined ? size : end;
        if (footer && start >= footerStart && stop <= size) return footer.slice(start - footerStart, stop - footerStart);
        if (start === footerStart && stop === size) {
          return Promise.resolve(remote.slice(start, end)).then(function (buffer) { footer = buffer; store(buffer); return buffer; });
        }
        return remote.slice(start, end);
      },
    };
  }

  // Parquet mode: the positions arrays, from the run's shared file that the data file names
  // (positions_file: file, bytes, sha256, n_positions) unless the data file holds them.
  // The file is checked against its recorded length, digest (where the browser offers
  // crypto.subtle: https and localhost) and number of positions before the page uses it.
  var POSITION_ARRAYS = ["position", "kind", "label", "patch_row", "patch_col", "token_id", "piece"];
  function loadPositions(data, url) {
    if (data.positions) return Promise.resolve(data.positions);
    var ref = data.positions_file;
    if (!ref) return Promise.reject(new Error("lens data: no positions"));
    return fetchBytes(url(ref.file)).then(function (buffer) {
      if (buffer.byteLength !== ref.bytes) {
        throw new Error("lens data: " + ref.file + " is " + buffer.byteLength + " bytes, the data file says " + ref.bytes);
      }
      var subtle = global.crypto && global.crypto.subtle;
      var checked = subtle ? subtle.digest("SHA-256", buffer).then(function (hash) {
        var hex = Array.prototype.map.call(new Uint8Array(hash), function (b) { return (b < 16 ? "0" : "") + b.toString(16); }).join("");
        if (hex !== ref.sha256) throw new Error("lens data: " + ref.file + " does not have the recorded sha256");
      }) : Promise.resolve();
      return checked.then(function () {
        var positions = JSON.parse(new global.TextDecoder("utf-8").decode(buffer));
        POSITION_ARRAYS.forEach(function (name) {
          var values = positions[name];
          if (!Array.isArray(values) || values.length !== ref.n_positions) {
            throw new Error("lens data: " + ref.file + " does not hold " + ref.n_positions + " " + name + " values");
          }
        });
        return positions;
      });
    });
  }

  // Parquet mode: the image's rows of the lens file (row range and byte length from the build,
  // so no HEAD request and only the row groups holding them), the run's token texts and pieces.
  function loadParquet(data, options) {
    var source = data.parquet;
    var progress = options.onProgress || function () {};
    if (global.location && global.location.protocol === "file:") {
      var notice = new Error(FILE_NOTICE);
      notice.notice = true;
      return Promise.reject(notice);
    }
    var base = options.base || (global.location && global.location.href);
    function url(path) { return new URL(path, base).href; }
    var positions = loadPositions(data, url);
    positions.catch(function () {});  // reported through Promise.all below, not as unhandled
    progress("loading the Parquet reader");
    var reader = options.hyparquet ? Promise.resolve(options.hyparquet) : import(url(source.reader));
    return reader.then(function (hp) {
      var lensUrl = url(source.file);
      var file = hp.asyncBufferFromUrl({ url: lensUrl, byteLength: source.bytes }).then(function (remote) {
        return withStoredFooter(remote, lensUrl, source.footer_bytes);
      });
      var done = 0;
      function step(what) { return function (value) { done += 1; progress(what + " (" + done + " of 3 parts read)"); return value; }; }
      progress("reading rows " + source.row_start + "–" + source.row_end + " of " + source.file);
      var rows = file.then(function (buffer) {
        return hp.parquetMetadataAsync(buffer, { initialFetchSize: source.footer_bytes || 65536 }).then(function (metadata) {
          return new Promise(function (resolve, reject) {
            hp.parquetRead({
              file: buffer, metadata: metadata, compressors: hp.compressors,
              columns: ["layer", "position", "rank", "token_id", "prob"],
              rowStart: source.row_start, rowEnd: source.row_end,
              onComplete: resolve,
            }).catch(reject);
          });
        });
      }).then(step("lens rows"));
      function table(part, columns) {
        if (!part) return Promise.resolve(null);
        return fetchBytes(url(part.file)).then(function (buffer) {
          return new Promise(function (resolve, reject) {
            hp.parquetRead({ file: buffer, compressors: hp.compressors, columns: columns, parsers: EXACT_TEXT, onComplete: function (found) {
              var map = new Map();
              found.forEach(function (r) { map.set(Number(r[0]), r[1]); });
              resolve(map);
            } }).catch(reject);
          });
        });
      }
      var text = table(source.tokens, ["token_id", "token"]).then(step("token texts"));
      var pieces = table(source.pieces, ["token_id", "piece"]).then(step("token pieces"));
      return Promise.all([rows, text, pieces, positions]).then(function (parts) {
        var found = parts[0], n = found.length;
        data.positions = parts[3];
        var cells = { layer: new Int32Array(n), position: new Int32Array(n), rank: new Int32Array(n),
          tokenId: new Int32Array(n), prob: new Float32Array(n), text: parts[1], pieces: parts[2] };
        for (var i = 0; i < n; i++) {
          var r = found[i];
          cells.layer[i] = r[0]; cells.position[i] = r[1]; cells.rank[i] = r[2];
          cells.tokenId[i] = r[3]; cells.prob[i] = r[4];
        }
        progress("decoding " + n + " cells");
        return new LensModel(data, null, cells);
      });
    }, function (error) {
      throw new Error("could not load the Parquet reader " + source.reader + ": " + (error && error.message ? error.message : error));
    });
  }

  // options: {base: URL the data file's paths are relative to (default: this page),
  // onProgress: function (text) called while a parquet-mode page reads its cells,
  // hyparquet: the reader's module, already imported (default: import the data file's `reader`)}.
  LensModel.load = function (data, options) {
    if (data.parquet) return loadParquet(data, options || {});
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
    // Parquet mode: the download's probability (11 significant bits), the code kept for the shading.
    return { token: this.tokens[index], shown: this.shown[index], piece: this.pieces ? this.pieces[index] : null,
      id: this.tokenIds ? this.tokenIds[index] : null, prob: this.probValues ? this.probValues[at] : this.probTable[code],
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
