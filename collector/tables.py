"""Arrow tables for rows every experiment writes per image (positions, image view)."""

from __future__ import annotations

import io
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import torch

from collector.adapters import ImageTokenLayout, ModelAdapter, NamedView
from collector.images import ImageRecord


def decode_tokens(tokenizer: Any, token_ids: Iterable[int]) -> dict[int, str]:
    """Text of each distinct token id, decoded once per id."""
    unique = sorted({int(i) for i in token_ids})
    texts = tokenizer.batch_decode([[i] for i in unique], skip_special_tokens=False)
    return dict(zip(unique, texts))


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
    return pa.table(
        {
            "run_id": pa.array([run_id] * n, pa.string()),
            "image_id": pa.array([image_id] * n, pa.int64()),
            "position": pa.array(range(n), pa.int32()),
            "kind": pa.array(kind, pa.string()),
            "patch_row": pa.array(patch_row, pa.int32()),
            "patch_col": pa.array(patch_col, pa.int32()),
            "label": pa.array(label, pa.string()),
            "token_id": pa.array(ids, pa.int32()),
        }
    )


def image_view_table(
    run_id: str, record: ImageRecord, adapter: ModelAdapter, pixel_values: torch.Tensor
) -> pa.Table:
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
    view.save(buffer, format="PNG", optimize=True)
    return pa.table(
        {
            "run_id": [run_id],
            "image_id": pa.array([record.image_id], pa.int64()),
            "png": pa.array([buffer.getvalue()], pa.binary()),
            "view_width": [view.size[0]],
            "view_height": [view.size[1]],
            "scale_x": [float(geometry.scale_x)],
            "scale_y": [float(geometry.scale_y)],
            "offset_x": [float(geometry.offset_x)],
            "offset_y": [float(geometry.offset_y)],
        }
    )


def extra_views_table(run_id: str, image_id: int, views: list[NamedView]) -> pa.Table:
    """One row per further view (`ModelAdapter.extra_views`): PNG, size and grid."""
    pngs = []
    for view in views:
        buffer = io.BytesIO()
        view.image.save(buffer, format="PNG", optimize=True)
        pngs.append(buffer.getvalue())
    return pa.table(
        {
            "run_id": pa.array([run_id] * len(views), pa.string()),
            "image_id": pa.array([image_id] * len(views), pa.int64()),
            "name": pa.array([view.name for view in views], pa.string()),
            "kind": pa.array([view.kind for view in views], pa.string()),
            "png": pa.array(pngs, pa.binary()),
            "view_width": pa.array([view.image.size[0] for view in views], pa.int32()),
            "view_height": pa.array([view.image.size[1] for view in views], pa.int32()),
            "grid_rows": pa.array([view.grid_rows for view in views], pa.int32()),
            "grid_cols": pa.array([view.grid_cols for view in views], pa.int32()),
        }
    )


def run_image_marker(
    run_id: str, image_id: int, n_positions: int, layout: ImageTokenLayout, n_layers: int | None
) -> pa.Table:
    """The row that says every result of (run, image) is written."""
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    return pa.table(
        {
            "run_id": [run_id],
            "image_id": pa.array([image_id], pa.int64()),
            "n_positions": pa.array([n_positions], pa.int32()),
            "n_layers": pa.array([n_layers], pa.int32()),
            "grid_rows": pa.array([layout.grid_rows], pa.int32()),
            "grid_cols": pa.array([layout.grid_cols], pa.int32()),
            "written_at": pa.array([now], pa.timestamp("us")),
        }
    )


def lens_table(run_id: str, image_id: int, token_ids: np.ndarray, probs: np.ndarray, token_text: dict[int, str]) -> pa.Table:
    """Long-format logit-lens rows from (layers, T, k) arrays of ids and probabilities."""
    n_layers, n_positions, k = token_ids.shape
    layer = np.repeat(np.arange(n_layers, dtype=np.int16), n_positions * k)
    position = np.tile(np.repeat(np.arange(n_positions, dtype=np.int32), k), n_layers)
    rank = np.tile(np.arange(1, k + 1, dtype=np.int16), n_layers * n_positions)
    flat_ids = token_ids.reshape(-1).astype(np.int32)
    # Dictionary-encode token text: each distinct id is looked up once, not once per cell.
    unique_ids, inverse = np.unique(flat_ids, return_inverse=True)
    dictionary = pa.array([token_text[int(i)] for i in unique_ids], pa.string())
    tokens = pa.DictionaryArray.from_arrays(pa.array(inverse.astype(np.int32)), dictionary)
    return pa.table(
        {
            "run_id": pa.array(np.full(layer.shape, run_id, dtype=object), pa.string()),
            "image_id": pa.array(np.full(layer.shape, image_id, dtype=np.int64)),
            "layer": pa.array(layer),
            "position": pa.array(position),
            "rank": pa.array(rank),
            "token_id": pa.array(flat_ids),
            "token": tokens.cast(pa.string()),
            "prob": pa.array(probs.reshape(-1).astype(np.float64)),
        }
    )
