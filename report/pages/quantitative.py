"""The quantitative logit lens page (`quantitative.html`; Neo et al., §4.1).

For every lens run and every annotated image, the *object-patch positions* of a category
are the image positions whose patch cell overlaps that category's (non-crowd) annotation
masks in the model's view (report/object_cells.py). Per layer we report the share of
those positions whose top-1 (and top-k) lens token names the category (rule:
`db.views.OBJECT_HITS_SELECT`), pooled over all (image, category, position) triples of the
run, and the peak layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from db import queries, stats
from db.store import ResultsDB
from report import charts, urls
from report.catalogue import LENS_EXPERIMENT, LensEntry, RunInfo
from report.object_cells import ObjectCells
from report.pages.lens import differing_settings, run_label
from report.site import Site

POSITION_BATCH = queries.POSITION_BATCH


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
    # 95% percentile bootstrap over images of each share (None where fewer than 2 images).
    top1_ci_low: list[float | None] = field(default_factory=list)
    top1_ci_high: list[float | None] = field(default_factory=list)
    topk_ci_low: list[float | None] = field(default_factory=list)
    topk_ci_high: list[float | None] = field(default_factory=list)
    peak_top1: int | None = None
    peak_topk: int | None = None
    per_image: list[dict[str, Any]] = field(default_factory=list)


def quantitative_lens(
    db: ResultsDB,
    run_id: str,
    model_id: str,
    entries: list[tuple[int, int, int, int]],
    *,
    objects: ObjectCells | None = None,
    top_k: int | None = None,
    hit_rule: str = "word",
) -> RunQuant | None:
    """Per-layer shares for one lens run; `entries` are (image_id, n_layers, grid_rows, grid_cols)
    of its completely written images. None when no image has annotated object cells.

    `objects` shares the object cells with the lens pages (default: computed here);
    `top_k` is the run's configured top-k (default: read from the run); `hit_rule` is the
    lens hit rule (db.views.HIT_RULES).
    """
    objects = ObjectCells.from_db(db) if objects is None else objects
    if top_k is None:
        record = queries.run(db, run_id)
        top_k = record.top_k if record is not None else None
    if top_k is None:
        # Databases written before the run config recorded top_k: the deepest stored rank
        # is the only record of it.
        top_k = queries.max_rank(db, run_id)
    object_rows: dict[str, list] = {"image_id": [], "category": [], "position": []}
    totals: dict[tuple[int, str], int] = {}
    n_layers = 0
    image_positions: dict[int, dict[int, queries.Position]] | None = None
    for at, (image_id, layers, grid_rows, grid_cols) in enumerate(entries):
        if not objects.annotated(run_id, image_id):
            continue
        n_layers = max(n_layers, int(layers or 0))
        by_category = objects.cells(run_id, image_id, grid_rows, grid_cols)
        if not by_category:
            continue
        if image_positions is None or image_id not in image_positions:
            # A batch of the next images at a time: a paper-scale run has millions of positions.
            batch = [e[0] for e in entries[at : at + POSITION_BATCH]]
            image_positions = queries.positions_by_image(db, run_id, kind="image", image_ids=batch)
        patch_position = {(p.patch_row, p.patch_col): number for number, p in image_positions.get(image_id, {}).items()}
        for category, cells in by_category.items():
            rows, cols = np.nonzero(cells)
            positions = [
                patch_position[(int(r), int(c))] for r, c in zip(rows, cols) if (int(r), int(c)) in patch_position
            ]
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
    hits = queries.object_hit_counts(db, run_id, table, hit_rule)

    top1 = np.zeros((len(totals), n_layers))
    topk = np.zeros((len(totals), n_layers))
    keys = sorted(totals)
    index = {key: i for i, key in enumerate(keys)}
    for image_id, category, layer, n1, nk in hits:
        i = index[(image_id, category)]
        top1[i, layer] = n1
        topk[i, layer] = nk
    counts = np.array([totals[key] for key in keys], dtype=np.float64)
    result = RunQuant(run_id=run_id, model_id=model_id, n_layers=n_layers, top_k=top_k)
    result.n_images = len({image_id for image_id, _ in keys})
    result.n_objects = len(keys)
    result.n_positions = int(counts.sum())
    result.top1 = (top1.sum(axis=0) / counts.sum()).tolist()
    result.topk = (topk.sum(axis=0) / counts.sum()).tolist()
    # Positions of one image are not independent draws (neighbouring patches of one object
    # share their fate), so the interval resamples whole images: per image, the hits and
    # object positions summed over its categories.
    image_ids = sorted({image_id for image_id, _ in keys})
    image_row = {image_id: j for j, image_id in enumerate(image_ids)}
    row_of_key = np.array([image_row[image_id] for image_id, _ in keys], dtype=np.int64)
    top1_per_image, topk_per_image = np.zeros((len(image_ids), n_layers)), np.zeros((len(image_ids), n_layers))
    np.add.at(top1_per_image, row_of_key, top1)
    np.add.at(topk_per_image, row_of_key, topk)
    positions_per_image = np.repeat(np.bincount(row_of_key, weights=counts)[:, None], n_layers, axis=1)
    result.top1_ci_low, result.top1_ci_high = stats.bootstrap_curve_ci(top1_per_image, positions_per_image)
    result.topk_ci_low, result.topk_ci_high = stats.bootstrap_curve_ci(topk_per_image, positions_per_image)
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


def write_quantitative_page(
    db: ResultsDB,
    site: Site,
    runs: list[RunInfo],
    entries: list[LensEntry],
    lens_shapes: dict[tuple[str, int], tuple[int, int, int]],
    objects: ObjectCells,
    hit_rule: str = "word",
) -> list[dict[str, Any]]:
    """Write quantitative.html; `lens_shapes` maps each written (run, image) to its
    (n_layers, grid_rows, grid_cols); `hit_rule` is the lens hit rule counted. Returns one
    entry per run with object cells."""
    quant_runs: list[dict[str, Any]] = []
    for run in runs:
        run_entries = [e for e in entries if e.run.run_id == run.run_id]
        if run.experiment != LENS_EXPERIMENT or not run_entries:
            continue
        shapes = [(e.image_id, *lens_shapes[(run.run_id, e.image_id)]) for e in run_entries]
        result = quantitative_lens(
            db, run.run_id, run.model_id, shapes, objects=objects, top_k=run.top_k, hit_rule=hit_rule
        )
        if result is None:
            continue
        note = f"n = {result.n_images} images, {result.n_positions} object positions"
        chart = charts.layer_share_chart(
            [("top-1", result.top1, "series-top1"), (f"top-{result.top_k}", result.topk, "series-topk")],
            result.n_layers,
            intervals=[
                (result.top1_ci_low, result.top1_ci_high),
                (result.topk_ci_low, result.topk_ci_high),
            ],
            n_notes=[note, note],
        )
        pages = {e.image_id: e.page for e in run_entries}
        quant_runs.append({"run": run, "result": result, "chart": chart, "pages": pages})
    overlay, differing = None, set()
    if quant_runs:
        records = [queries.run(db, q["run"].run_id) for q in quant_runs]
        differing = differing_settings([r for r in records if r is not None])
        for q, record in zip(quant_runs, records):
            q["label"] = run_label(record, differing) if record is not None else q["run"].model_id
        if len(quant_runs) > 1:
            overlay = _overlay_chart(quant_runs)
    site.render(
        "quantitative.html.j2",
        urls.QUANTITATIVE,
        bootstrap={"resamples": stats.BOOTSTRAP_RESAMPLES, "seed": stats.BOOTSTRAP_SEED},
        quant_runs=quant_runs,
        overlay=overlay,
        differing=sorted(differing),
        runs_here=[q["run"] for q in quant_runs],
    )
    return quant_runs


def _overlay_chart(quant_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every run on one chart: top-1 share solid, top-k dashed, one colour per run."""
    n_layers = max(q["result"].n_layers for q in quant_runs)
    series: list[tuple[str, list[float], str]] = []
    intervals: list[tuple[list[float | None], list[float | None]] | None] = []
    notes = []
    for i, q in enumerate(quant_runs):
        r = q["result"]
        series.append((f"{q['label']}: top-1", r.top1, f"run-{i}"))
        series.append((f"{q['label']}: top-{r.top_k}", r.topk, f"run-{i}"))
        intervals += [(r.top1_ci_low, r.top1_ci_high), (r.topk_ci_low, r.topk_ci_high)]
        notes += [f"n = {r.n_images} images, {r.n_positions} object positions"] * 2
    chart = charts.layer_share_chart(series, n_layers, width=720, height=320, intervals=intervals, n_notes=notes)
    for j, line in enumerate(chart["lines"]):
        line["stroke"] = charts.PALETTE[(j // 2) % len(charts.PALETTE)]
        line["dash"] = "" if j % 2 == 0 else "6 3"
    return chart
