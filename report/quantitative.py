"""Quantitative logit lens (Neo et al., §4.1) and annotation geometry for the report.

For every lens run and every annotated image, the *object-patch positions* of a category
are the image positions whose patch cell overlaps that category's (non-crowd) annotation
masks in the model's view. Per layer we report the share of those positions whose top-1
(and top-k) lens token names the category (rule: `db.views.OBJECT_HITS_SELECT`), pooled
over all (image, category, position) triples of the run, and the peak layer.

Why the membership is computed here and not stored: the database already holds
everything it depends on (`annotations.segmentation`, `images` size, `image_views`
geometry, `positions` patch coordinates), so a derived table would be a second copy
that can drift from its inputs (and the collector would have to know about the report).
Rasterising a few hundred masks with pycocotools takes well under a second per hundred
images. The rasterisation is `db.geometry`, the same code the collector uses to choose
object tokens; annotations whose segmentation it cannot use contribute no cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from db.geometry import ViewGeometry, object_cells_by_category
from db.store import ResultsDB
from db.views import OBJECT_HITS_SELECT


def load_geometries(db: ResultsDB) -> dict[tuple[str, int], ViewGeometry]:
    rows = db.sql(
        "SELECT v.run_id, v.image_id, i.width, i.height, v.view_width, v.view_height, "
        "v.scale_x, v.scale_y, v.offset_x, v.offset_y FROM image_views v JOIN images i USING (image_id)"
    )
    return {
        (run_id, int(image_id)): ViewGeometry(int(w), int(h), int(vw), int(vh), float(sx), float(sy), float(ox), float(oy))
        for run_id, image_id, w, h, vw, vh, sx, sy, ox, oy in rows
    }


def load_annotations(db: ResultsDB) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for image_id, annotation_id, category, bbox, iscrowd, segmentation in db.sql(
        "SELECT image_id, annotation_id, category, bbox, iscrowd, segmentation FROM annotations "
        "ORDER BY image_id, annotation_id"
    ):
        out.setdefault(int(image_id), []).append(
            {"annotation_id": int(annotation_id), "category": category, "bbox": bbox,
             "iscrowd": bool(iscrowd), "segmentation": segmentation}
        )
    return out


@dataclass
class RunQuant:
    run_id: str
    model_id: str
    n_layers: int
    top_k: int
    n_images: int = 0
    n_objects: int = 0  # (image, category) pairs with at least one object cell
    n_positions: int = 0  # object-patch positions, pooled
    top1: list[float] = field(default_factory=list)  # share per layer
    topk: list[float] = field(default_factory=list)
    peak_top1: int | None = None
    peak_topk: int | None = None
    per_image: list[dict[str, Any]] = field(default_factory=list)


def quantitative_lens(db: ResultsDB, run_id: str, model_id: str, entries: list[tuple[int, int, int, int]]) -> RunQuant | None:
    """Per-layer shares for one lens run; `entries` are (image_id, n_layers, grid_rows, grid_cols)
    of its completely written images. None when no image has annotated object cells."""
    geometries = load_geometries(db)
    annotations = load_annotations(db)
    object_rows: dict[str, list] = {"image_id": [], "category": [], "position": []}
    totals: dict[tuple[int, str], int] = {}
    n_layers = 0
    top_k = int(db.sql("SELECT coalesce(max(rank), 0) FROM logit_lens WHERE run_id = ?", (run_id,))[0][0])
    for image_id, layers, grid_rows, grid_cols in entries:
        geometry = geometries.get((run_id, image_id))
        if geometry is None or image_id not in annotations:
            continue
        n_layers = max(n_layers, int(layers or 0))
        by_cat = object_cells_by_category(annotations[image_id], geometry, grid_rows, grid_cols).cells
        if not by_cat:
            continue
        patch_pos = {
            (int(r), int(c)): int(p)
            for p, r, c in db.sql(
                "SELECT position, patch_row, patch_col FROM positions "
                "WHERE run_id = ? AND image_id = ? AND kind = 'image'",
                (run_id, image_id),
            )
        }
        for category, cells in by_cat.items():
            rows, cols = np.nonzero(cells)
            positions = [patch_pos[(int(r), int(c))] for r, c in zip(rows, cols) if (int(r), int(c)) in patch_pos]
            if not positions:
                continue
            totals[(image_id, category)] = len(positions)
            object_rows["image_id"] += [image_id] * len(positions)
            object_rows["category"] += [category] * len(positions)
            object_rows["position"] += positions
    if not totals or n_layers == 0:
        return None

    table = pa.table(
        {
            "image_id": pa.array(object_rows["image_id"], pa.int64()),
            "category": pa.array(object_rows["category"], pa.string()),
            "position": pa.array(object_rows["position"], pa.int32()),
        }
    )
    duck = db.duck.cursor()
    try:
        duck.register("_object_positions", table)
        duck.execute(
            f"""
            WITH hits AS ({OBJECT_HITS_SELECT})
            SELECT h.image_id, h.category, h.layer,
                   count(*) FILTER (WHERE h.best_rank = 1) AS top1, count(*) AS topk
            FROM hits h
            JOIN _object_positions o
              ON o.image_id = h.image_id AND o.category = h.category AND o.position = h.position
            WHERE h.run_id = ?
            GROUP BY ALL
            """,
            [run_id],
        )
        hits = duck.fetchall()
    finally:
        duck.close()

    top1 = np.zeros((len(totals), n_layers))
    topk = np.zeros((len(totals), n_layers))
    keys = sorted(totals)
    index = {key: i for i, key in enumerate(keys)}
    for image_id, category, layer, n1, nk in hits:
        i = index[(int(image_id), category)]
        top1[i, int(layer)] = n1
        topk[i, int(layer)] = nk
    counts = np.array([totals[key] for key in keys], dtype=np.float64)
    result = RunQuant(run_id=run_id, model_id=model_id, n_layers=n_layers, top_k=top_k)
    result.n_images = len({image_id for image_id, _ in keys})
    result.n_objects = len(keys)
    result.n_positions = int(counts.sum())
    result.top1 = (top1.sum(axis=0) / counts.sum()).tolist()
    result.topk = (topk.sum(axis=0) / counts.sum()).tolist()
    result.peak_top1 = int(np.argmax(result.top1)) if max(result.top1) > 0 else None
    result.peak_topk = int(np.argmax(result.topk)) if max(result.topk) > 0 else None
    for i, (image_id, category) in enumerate(keys):
        shares1 = top1[i] / counts[i]
        sharesk = topk[i] / counts[i]
        result.per_image.append(
            {
                "image_id": image_id,
                "category": category,
                "object_positions": int(counts[i]),
                "best_top1": float(shares1.max()),
                "peak_layer_top1": int(np.argmax(shares1)) if shares1.max() > 0 else None,
                "best_topk": float(sharesk.max()),
                "peak_layer_topk": int(np.argmax(sharesk)) if sharesk.max() > 0 else None,
            }
        )
    return result


def line_chart_svg(series: list[tuple[str, list[float], str]], n_layers: int, *, width: int = 640, height: int = 260,
                   y_label: str = "share of object-patch positions") -> dict[str, Any]:
    """Geometry of an inline SVG line chart (rendered by a template; all text autoescaped).

    `series` is [(name, values per layer, css class)]; y runs 0..max (at least 0.05).
    """
    left, right, top, bottom = 52, 12, 12, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    y_max = max([0.05] + [v for _, values, _ in series for v in values])
    y_max = float(np.ceil(y_max * 25 - 1e-9) / 25)  # a multiple of 4 %, so the quarter ticks are whole percents

    def x_of(layer: int) -> float:
        return left + (plot_w * layer / max(1, n_layers - 1))

    def y_of(value: float) -> float:
        return top + plot_h * (1 - value / y_max)

    lines = []
    for name, values, css in series:
        points = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in enumerate(values))
        dots = [{"x": round(x_of(i), 1), "y": round(y_of(v), 1), "title": f"{name}, layer {i}: {100 * v:.1f}%"}
                for i, v in enumerate(values)]
        lines.append({"name": name, "points": points, "css": css, "dots": dots})
    step = max(1, int(np.ceil(n_layers / 12)))
    x_ticks = [{"x": round(x_of(i), 1), "label": str(i)} for i in range(0, n_layers, step)]
    y_ticks = [{"y": round(y_of(y_max * f), 1), "label": f"{100 * y_max * f:.0f}%"} for f in (0, 0.25, 0.5, 0.75, 1)]
    return {
        "width": width, "height": height, "left": left, "top": top, "plot_w": plot_w, "plot_h": plot_h,
        "bottom_y": top + plot_h, "lines": lines, "x_ticks": x_ticks, "y_ticks": y_ticks, "y_label": y_label,
    }
