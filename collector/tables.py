"""Arrow tables for rows every experiment writes per image (positions, image view, marker, skip).

Column types come from the schema (`db.arrow`), never written here: each builder gives
column values and `table_from_columns` converts and checks them.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from collector.adapters import ImageTokenLayout, ModelAdapter, NamedView
from collector.images import ImageRecord
from db.arrow import table_from_columns


def decode_tokens(tokenizer: Any, token_ids: Iterable[int]) -> dict[int, str]:
    """Text of each distinct token id, decoded once per id."""
    unique = sorted({int(i) for i in token_ids})
    texts = tokenizer.batch_decode([[i] for i in unique], skip_special_tokens=False)
    return dict(zip(unique, texts))


def distinct_ids(*arrays: np.ndarray) -> list[int]:
    """The distinct non-negative ids of integer arrays, ascending: one pass over a presence
    table (a lens image holds ~100k cells but only ids below the vocabulary size)."""
    flat = [np.asarray(a).reshape(-1) for a in arrays if np.asarray(a).size]
    if not flat:
        return []
    present = np.zeros(max(int(a.max()) for a in flat) + 1, dtype=bool)
    for a in flat:
        present[a] = True
    return np.flatnonzero(present).tolist()


def token_pieces(tokenizer: Any, token_ids: Iterable[int]) -> dict[int, str]:
    """The tokenizer's own piece of each distinct token id (`convert_ids_to_tokens`: e.g.
    "\u2581" for LLaVA-1.5's 29871, whose decoded text is ""; "<0x0A>" for a byte-fallback
    newline); "" for an id the tokenizer has no piece for (a padded unembedding's extra rows)."""
    unique = sorted({int(i) for i in token_ids})
    pieces = tokenizer.convert_ids_to_tokens(unique)
    return {i: piece if isinstance(piece, str) else "" for i, piece in zip(unique, pieces)}


def token_pieces_table(run_id: str, token_text: dict[int, str], pieces: dict[int, str]) -> pa.Table:
    """`token_pieces` rows: piece and decoded text of every token id in `token_text`
    (the store keeps one row per (run, token id) however many images name it)."""
    ids = sorted(token_text)
    return table_from_columns(
        "token_pieces",
        {
            "run_id": [run_id] * len(ids),
            "token_id": ids,
            "piece": [pieces.get(i, "") for i in ids],
            "text": [token_text[i] for i in ids],
        },
    )


def image_label(index: int, n_tokens: int) -> str:
    """`<IMG001>`-style label of the index-th (0-based) image token."""
    width = max(3, len(str(n_tokens)))
    return f"<IMG{index + 1:0{width}d}>"


def positions_table(
    run_id: str,
    image_id: int,
    input_ids: torch.Tensor,
    layout: ImageTokenLayout,
    token_text: dict[int, str],
) -> pa.Table:
    """One row per LM input position: kind, patch cell (image) and label.

    input_ids: (T,) token ids of the sequence; token_text must cover them.
    """
    ids = input_ids.cpu().tolist()
    n = len(ids)
    kind = ["text"] * n
    patch_row: list[int | None] = [None] * n
    patch_col: list[int | None] = [None] * n
    label = [token_text[i] for i in ids]
    for k, position in enumerate(layout.positions.tolist()):
        kind[position] = "image"
        patch_row[position] = int(layout.patch_rows[k])
        patch_col[position] = int(layout.patch_cols[k])
        label[position] = image_label(k, layout.n_tokens)
    extra = getattr(layout, "extra", None)
    if extra is not None:  # image-derived positions outside the grid (e.g. LLaVA-NeXT tiles)
        for k, position in enumerate(extra.positions.tolist()):
            kind[position] = extra.kinds[k]
            row, col = int(extra.rows[k]), int(extra.cols[k])
            patch_row[position] = row if row >= 0 else None
            patch_col[position] = col if col >= 0 else None
            label[position] = extra.labels[k]
    return table_from_columns(
        "positions",
        {
            "run_id": [run_id] * n,
            "image_id": [image_id] * n,
            "position": range(n),
            "kind": kind,
            "patch_row": patch_row,
            "patch_col": patch_col,
            "label": label,
            "token_id": ids,
        },
    )


def image_view_table(run_id: str, record: ImageRecord, adapter: ModelAdapter, pixel_values: torch.Tensor) -> pa.Table:
    """The model's view of the image as PNG, with the original→view geometry.

    pixel_values: (3, H, W) as given to the model.
    """
    view = adapter.view_image(pixel_values)
    geometry = adapter.view_geometry(record.width, record.height)
    if (geometry.view_width, geometry.view_height) != view.size:
        raise RuntimeError(
            f"processor geometry predicts a {geometry.view_width}x{geometry.view_height} view "
            f"but the model received {view.size[0]}x{view.size[1]}"
        )
    buffer = io.BytesIO()
    view.save(buffer, format="PNG")  # no optimize: 5-10x slower for a few % smaller
    return table_from_columns(
        "image_views",
        {
            "run_id": [run_id],
            "image_id": [record.image_id],
            "png": [buffer.getvalue()],
            "view_width": [view.size[0]],
            "view_height": [view.size[1]],
            "scale_x": [float(geometry.scale_x)],
            "scale_y": [float(geometry.scale_y)],
            "offset_x": [float(geometry.offset_x)],
            "offset_y": [float(geometry.offset_y)],
        },
    )


def extra_views_table(run_id: str, image_id: int, views: list[NamedView]) -> pa.Table:
    """One row per further view (`ModelAdapter.extra_views`): PNG, size and grid."""
    pngs = []
    for view in views:
        buffer = io.BytesIO()
        view.image.save(buffer, format="PNG")  # no optimize (see image_view_table)
        pngs.append(buffer.getvalue())
    return table_from_columns(
        "extra_views",
        {
            "run_id": [run_id] * len(views),
            "image_id": [image_id] * len(views),
            "name": [view.name for view in views],
            "kind": [view.kind for view in views],
            "png": pngs,
            "view_width": [view.image.size[0] for view in views],
            "view_height": [view.image.size[1] for view in views],
            "grid_rows": [view.grid_rows for view in views],
            "grid_cols": [view.grid_cols for view in views],
        },
    )


def run_image_marker(
    run_id: str, image_id: int, n_positions: int, layout: ImageTokenLayout | None, n_layers: int | None
) -> pa.Table:
    """The row that says every result of (run, image) is written. Without a layout (an
    image that could not be used at all) the grid is 0 x 0."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    return table_from_columns(
        "run_images",
        {
            "run_id": [run_id],
            "image_id": [image_id],
            "n_positions": [n_positions],
            "n_layers": [n_layers],
            "grid_rows": [layout.grid_rows if layout is not None else 0],
            "grid_cols": [layout.grid_cols if layout is not None else 0],
            "written_at": [now],
        },
    )


def skipped_table(run_id: str, image_id: int, reason: str, detail: str | None) -> pa.Table:
    """The row that says why (run, image) was left out; `reason` is a `SkipReason` value."""
    return table_from_columns(
        "skipped", {"run_id": [run_id], "image_id": [image_id], "reason": [str(reason)], "detail": [detail]}
    )


def lens_table(
    run_id: str, image_id: int, token_ids: np.ndarray, probs: np.ndarray, token_text: dict[int, str]
) -> pa.Table:
    """Long-format logit-lens rows from (layers, T, k) arrays of ids and probabilities."""
    n_layers, n_positions, k = token_ids.shape
    layer = np.repeat(np.arange(n_layers), n_positions * k)
    position = np.tile(np.repeat(np.arange(n_positions), k), n_layers)
    rank = np.tile(np.arange(1, k + 1), n_layers * n_positions)
    flat_ids = token_ids.reshape(-1)
    # Dictionary-encode token text: each distinct id is looked up once, not once per cell
    # (distinct ids and each cell's index among them by a presence table: no sort).
    unique_ids = np.asarray(distinct_ids(flat_ids), dtype=np.int64)
    index = np.zeros(int(unique_ids[-1]) + 1 if unique_ids.size else 1, dtype=np.int32)
    index[unique_ids] = np.arange(unique_ids.size, dtype=np.int32)
    dictionary = pa.array([token_text[int(i)] for i in unique_ids], pa.string())
    tokens = pa.DictionaryArray.from_arrays(pa.array(index[flat_ids]), dictionary)
    return table_from_columns(
        "logit_lens",
        {
            "run_id": np.full(layer.shape, run_id, dtype=object),
            "image_id": np.full(layer.shape, image_id, dtype=np.int64),
            "layer": layer,
            "position": position,
            "rank": rank,
            "token_id": flat_ids,
            "token": tokens,  # decoded to plain strings by the schema's type
            "prob": probs.reshape(-1),
        },
    )
