"""The lens data codec: one lens page's data file, and the packing of its cells.

Lens data file format (`lens/<run>/<image_id>.data.js`, format "llava-interp-lens/4")
-----------------------------------------------------------------------------------
Version 3 adds the token ids (``token_ids_bytes`` and ``positions.token_id``); a version 2
file is a version 3 file without them and still decodes. Version 4 adds the tokenizer's
pieces (``token_pieces_bytes`` and ``positions.piece``, table ``token_pieces``); a version 3
file is a version 4 file without them (or a run that recorded none) and still decodes.

The file is exactly ``window.LENS_DATA = <json>;`` (a classic script, because browsers
block fetch() on file://). The JSON object holds:

- ``run_id``, ``image_id``, ``n_layers`` (layer 0 = embeddings), ``top_k``,
  ``grid_rows``, ``grid_cols``, ``n_cells`` (= n_layers * n_positions * top_k).
- ``positions``: parallel arrays ``position``, ``kind`` ('image' | 'text', or a further
  image kind such as LLaVA-NeXT's 'image_hr' and 'image_newline'), ``label``,
  ``patch_row``, ``patch_col`` (null for text), ``token_id`` (the input token id, null
  where unrecorded), ``piece`` (the tokenizer's piece of a text position's input token,
  e.g. "\u2581" where ``label`` is ""; null for image positions or where unrecorded),
  sorted by LM input position. The index
  into these arrays is the table row ("row" below); the overlay maps patch
  (patch_row, patch_col) to its row through these arrays, never through row order. For
  kind 'image' the cell is of the main grid; for another kind, of the extra view of
  that kind (if any).
- ``view``: ``{"width", "height"}`` of the model's input view in pixels, or null.
- ``extra_views``: one entry per further view of the image (table ``extra_views``, e.g.
  LLaVA-NeXT's high-resolution view; empty for most families): ``name``, ``kind``,
  ``width``, ``height``, ``grid_rows``, ``grid_cols`` and ``png`` (the picture's file,
  relative to the page: PNG, or JPEG under ``report build --views``; the key keeps its name). Positions of that ``kind`` are its cells, through their
  (patch_row, patch_col), each cell at most once.
- ``objects``: one entry per annotated category of the image: ``category``,
  ``cells`` (flat patch indices ``patch_row * grid_cols + patch_col`` overlapping the
  category's non-crowd masks, see report/object_cells.py) and ``outlines`` (per
  annotation: ``annotation_id``, ``polygons`` as flat [u0, v0, u1, v1, ...] lists in view
  pixels, or ``bbox`` [u, v, w, h] for RLE masks).
- ``packed``: ``{"encoding": "deflate-raw", "b64", "tokens_bytes", "token_ids_bytes",
  "token_pieces_bytes", "index_bytes", "prob_log_scale"}``. base64 of a raw DEFLATE stream (RFC 1951; browsers inflate it with
  ``DecompressionStream("deflate-raw")``) whose inflated bytes are, in order:

  1. ``tokens_bytes`` bytes: UTF-8 JSON array of the token dictionary's strings. One
     entry per distinct (token id, text), or per distinct text where the database has no
     token ids. Without ids the most frequent come first; with ids the 256 most frequent
     come first, in id order, then the rest in id order (frequent tokens keep one-byte
     indices, and the ids below delta-encode into small numbers);
  1b. ``token_ids_bytes`` bytes (0 or absent: no ids): UTF-8 JSON array of the token ids
     of the dictionary entries, delta-encoded: the first id, then each id minus the one
     before it;
  1c. ``token_pieces_bytes`` bytes (0 or absent: no pieces): UTF-8 JSON array of the
     tokenizer's piece of each dictionary entry (``convert_ids_to_tokens``; what the
     decoded text hides: "\u2581" for LLaVA-1.5's id 29871, whose text is "";
     "<0xE2>" for a lone byte, whose text is U+FFFD), as: ``0`` the piece equals the text,
     ``1`` the piece is "\u2581" + the text (a SentencePiece word start), a string: the
     piece itself, null: not recorded for that id;
  2. ``n_cells * index_bytes`` bytes: the token index (into that array) of every cell,
     little-endian unsigned integers of ``index_bytes`` (1, 2 or 4) bytes stored
     byte-planar (all low bytes, then all next bytes, ...), which deflates better;
  3. ``n_cells`` bytes: probability codes. Code ``c`` >= 1 means
     ``p = exp((c - 255) / prob_log_scale)`` (relative error at most
     ``exp(0.5 / prob_log_scale) - 1``, 2.5 % for the scale 20 used); code 0 means
     ``p < exp(-254.5 / prob_log_scale)`` (about 3e-6) and decodes to 0.

  Cell (layer l, row r, rank k >= 1) is at ``(l * n_positions + r) * top_k + (k - 1)``.
  The build refuses images with missing cells, so every cell is present.

Parquet mode (`report build --lens-data parquet`, report/build.py): the data file has the
same keys except ``packed``; instead ``parquet`` says where the page reads its cells (paths
relative to the data file, which sits beside its page):

- ``reader``: the vendored hyparquet bundle (report/hyparquet.py);
- ``file``, ``bytes``, ``footer_bytes``: the run's lens Parquet file (report/downloads.py:
  columns layer, position, rank, token_id, prob; sorted by image, layer, position, rank), its
  length (no HEAD request) and its footer's length (read in one request);
- ``row_start``, ``row_end``: the image's rows in it, [start, end), exactly ``n_cells`` rows;
- ``tokens``: ``{"file", "bytes"}`` of the run's ``lens_tokens`` file (token_id -> text);
- ``pieces``: ``{"file", "bytes"}`` of the run's ``token_pieces`` download (token_id -> piece),
  or null where the run recorded none;
- ``prob_bits``: the significant bits the file's probabilities keep.

Nor does a parquet-mode data file hold ``positions``: ``positions_file`` names the run's shared
file holding them, ``{"file", "bytes", "sha256", "n_positions"}``: ``file`` relative to the data
file, ``lens/<run>/positions-<first 20 hex digits of sha256>.json``, whose content is exactly the
``positions`` object above as UTF-8 JSON (keys sorted, no whitespace; ``lens_codec.positions_file``),
``bytes`` long with that ``sha256``, each array ``n_positions`` long. The name is content-addressed, so
the images of a run with one layout (same prompt, fixed image span) share one file and an image
with another layout (another prompt, a dynamic-resolution grid) gets its own. The page fetches it,
checks its length, its sha256 (where the browser has ``crypto.subtle``: https, localhost) and
its arrays' lengths, and then uses it as ``positions`` (so the patch <-> row mapping is the
database's, as inline). The build writes each file once (report/site.py ``Writer.write_shared``:
an existing file is kept, a new one renamed into place), lists it among the files of every page
naming it (report/incremental.py), and a file no page of the build names is not staged, so the
swap removes it.

The page builds the packed format's arrays from those rows (a dictionary of the image's
distinct token ids; each row's probability code as ``encode_probs`` computes it, and the
probability itself) and refuses rows that miss or repeat a cell. It needs http(s); from
file:// it shows how to serve the site instead.

The JSON is escaped so no string can end the script or the line: ``<``, ``>``, ``&``,
U+2028 and U+2029 are written as \\uXXXX escapes.

The browser side of this format is templates/static/lens-data.js.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from typing import Any

import numpy as np

from report.site import script_json

DATA_FORMAT = "llava-interp-lens/4"
# Probability code c >= 1 <-> p = exp((c - 255) / PROB_LOG_SCALE); 0 <-> below the floor.
PROB_LOG_SCALE = 20.0


def encode_probs(prob: np.ndarray) -> np.ndarray:
    """Log-quantised uint8 probability codes (see the module docstring)."""
    prob = np.clip(np.nan_to_num(np.asarray(prob, dtype=np.float64)), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        codes = np.rint(255.0 + PROB_LOG_SCALE * np.log(prob))
    return np.clip(np.nan_to_num(codes, neginf=0.0), 0, 255).astype(np.uint8)


def decode_probs(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.float64)
    return np.where(codes > 0, np.exp((codes - 255.0) / PROB_LOG_SCALE), 0.0)


def pack_cells(
    tokens: list[str],
    token_codes: np.ndarray,
    prob: np.ndarray,
    flat: np.ndarray,
    n_cells: int,
    token_ids: list[int] | None = None,
    token_pieces: list[str | None] | None = None,
) -> dict[str, Any]:
    """The ``packed`` object of a lens data file.

    `tokens` are the distinct token strings, `token_codes` each lens row's index into
    them, `prob` its probability and `flat` its cell index; every cell must be covered
    exactly once (the caller checks). `token_ids`, parallel to `tokens`, are the
    dictionary's token ids (None: not recorded); `token_pieces`, parallel too, the
    tokenizer's pieces (None: none recorded; an entry None: not recorded for that id).
    """
    # Frequency order: the most common tokens get the smallest indices (fewer high bytes).
    counts = np.bincount(token_codes, minlength=len(tokens))
    order = np.argsort(-counts, kind="stable")
    if token_ids is not None:
        ids = np.asarray(token_ids, dtype=np.int64)
        head, rest = order[:256], order[256:]
        order = np.concatenate([head[np.argsort(ids[head], kind="stable")], rest[np.argsort(ids[rest], kind="stable")]])
    new_code = np.empty_like(order)
    new_code[order] = np.arange(len(order))
    tokens = [tokens[i] for i in order]
    ids_json = b""
    if token_ids is not None:
        ordered_ids = np.asarray(token_ids, dtype=np.int64)[order]
        ids_json = json.dumps(np.diff(ordered_ids, prepend=0).tolist(), separators=(",", ":")).encode("ascii")
    pieces_json = b""
    if token_pieces is not None:
        ordered_pieces = [_piece_code(token_pieces[i], tokens[k]) for k, i in enumerate(order)]
        pieces_json = json.dumps(ordered_pieces, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    index_bytes = 1 if len(tokens) <= 0x100 else 2 if len(tokens) <= 0x10000 else 4
    token_index = np.zeros(n_cells, dtype=np.uint64)
    token_index[flat] = new_code[token_codes]
    codes = np.zeros(n_cells, dtype=np.uint8)
    codes[flat] = encode_probs(prob)
    planes = np.frombuffer(token_index.astype(f"<u{index_bytes}").tobytes(), dtype=np.uint8)
    planes = planes.reshape(n_cells, index_bytes).T.tobytes()
    tokens_json = json.dumps(tokens, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)  # level 9: 0.7 % smaller, 4.5x slower
    packed = compressor.compress(tokens_json + ids_json + pieces_json + planes + codes.tobytes()) + compressor.flush()
    return {
        "encoding": "deflate-raw",
        "tokens_bytes": len(tokens_json),
        "token_ids_bytes": len(ids_json),
        "token_pieces_bytes": len(pieces_json),
        "index_bytes": index_bytes,
        "prob_log_scale": PROB_LOG_SCALE,
        "b64": base64.b64encode(packed).decode("ascii"),
    }


WORD_START = "\u2581"  # SentencePiece's word-start marker


def _piece_code(piece: str | None, text: str) -> str | int | None:
    """A dictionary entry's piece as stored: 0 (= the text), 1 (= WORD_START + the text),
    the piece, or None (not recorded)."""
    if piece is None:
        return None
    if piece == text:
        return 0
    if piece == WORD_START + text:
        return 1
    return piece


def unpack_lens_data(data: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(tokens, token index per cell, probability per cell) of a lens data object."""
    packed = data["packed"]
    raw = zlib.decompress(base64.b64decode(packed["b64"]), -15)
    n_cells, nb = data["n_cells"], packed["index_bytes"]
    tokens = json.loads(raw[: packed["tokens_bytes"]].decode("utf-8"))
    nt = packed["tokens_bytes"] + packed.get("token_ids_bytes", 0) + packed.get("token_pieces_bytes", 0)
    planes = np.frombuffer(raw[nt : nt + n_cells * nb], dtype=np.uint8).reshape(nb, n_cells)
    index = np.zeros(n_cells, dtype=np.int64)
    for b in range(nb):
        index |= planes[b].astype(np.int64) << (8 * b)
    codes = np.frombuffer(raw[nt + n_cells * nb :], dtype=np.uint8)
    if len(codes) != n_cells:
        raise ValueError("packed lens data has the wrong length")
    return tokens, index, decode_probs(codes)


def unpack_token_ids(data: dict[str, Any]) -> list[int] | None:
    """The token id of each dictionary entry of a lens data object (None: not recorded)."""
    packed = data["packed"]
    size = packed.get("token_ids_bytes", 0)
    if not size:
        return None
    raw = zlib.decompress(base64.b64decode(packed["b64"]), -15)
    start = packed["tokens_bytes"]
    return np.cumsum(json.loads(raw[start : start + size].decode("ascii"))).tolist()


def data_script(data: dict[str, Any]) -> str:
    """The text of a lens data file (see the module docstring)."""
    return f"window.LENS_DATA = {script_json(data)};\n"


def positions_file(positions: dict[str, Any]) -> tuple[bytes, str]:
    """(content, sha256 hex) of a parquet-mode positions file: the ``positions`` object as
    UTF-8 JSON (see the module docstring); equal objects give equal bytes."""
    content = json.dumps(positions, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return content, hashlib.sha256(content).hexdigest()


def shared_positions_data(data: dict[str, Any], file: str, content: bytes, digest: str) -> dict[str, Any]:
    """A parquet-mode data object with its ``positions`` replaced by ``positions_file``, the
    reference to the run's shared file `file` (relative to the data file) holding `content`."""
    out = {key: value for key, value in data.items() if key != "positions"}
    out["positions_file"] = {
        "file": file,
        "bytes": len(content),
        "sha256": digest,
        "n_positions": len(data["positions"]["position"]),
    }
    return out


def unpack_token_pieces(data: dict[str, Any]) -> list[str | None] | None:
    """The tokenizer piece of each dictionary entry of a lens data object (None: no pieces
    recorded; an entry None: not recorded for that id)."""
    packed = data["packed"]
    size = packed.get("token_pieces_bytes", 0)
    if not size:
        return None
    raw = zlib.decompress(base64.b64decode(packed["b64"]), -15)
    tokens = json.loads(raw[: packed["tokens_bytes"]].decode("utf-8"))
    start = packed["tokens_bytes"] + packed.get("token_ids_bytes", 0)
    codes = json.loads(raw[start : start + size].decode("utf-8"))
    return [
        None if code is None else text if code == 0 else WORD_START + text if code == 1 else code
        for code, text in zip(codes, tokens, strict=True)
    ]
