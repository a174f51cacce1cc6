"""The attention-blocking pages: `experiments/blocking-<run>.html` and one drill-down page per image.

`blocking_page_data(db, run_id)` returns plain JSON-able dicts and lists:

- `run`: run_id, model_id, status, config.
- `curves`: per target set, the sliding-window curve: `x` = layer_start of every sliding
  window (ascending) and `window_ends`, and one series per source set with
  `relative_accuracy`, `accuracy`, `mean_target_prob` and `n`, aligned with `x` (None where
  a source has no window starting there).
  Each measure also has `<measure>_ci_low` / `<measure>_ci_high` lists: accuracy a 95%
  Wilson interval (its unit, the image, answers right or wrong), relative accuracy and
  mean class probability a percentile bootstrap over images (`window_intervals`).
- `baseline`: n images with a baseline row, their accuracy and mean class probability.
- `presets`: one row per (target, source, preset) with its window and the same measures.
- `images`: one row per image: category, question, baseline prediction, and the share of
  its blocking conditions still answered correctly; skipped images with their reason.
- `image_details`: per image with blocking rows, the drill-down: its baseline prediction
  against the class token, per (target, source) pair the patch cells of both sets (from the
  `positions` table's patch_row/patch_col, never from position indices) and the text
  positions among them, and every window's prediction (presets in PRESET_ORDER, then the
  sliding windows by start layer).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from db import queries, stats
from db.store import ResultsDB
from report import charts
from report.catalogue import ExperimentPage
from report.pages.experiment_images import write_experiment_pages
from report.site import Site

MEASURES = ("relative_accuracy", "accuracy", "mean_target_prob", "n")
INTERVAL_MEASURES = ("accuracy", "relative_accuracy", "mean_target_prob")
WindowKey = tuple[str, str, int, int]


def window_intervals(outcomes: list[tuple[Any, ...]]) -> dict[WindowKey, dict[str, float | None]]:
    """95% intervals of every blocking condition's measures, keyed (target, source, layer_start, layer_end).

    `outcomes` are `queries.blocking_outcomes` rows (one per image x condition). Accuracy:
    Wilson over the condition's images. Relative accuracy (sum of correct / sum of baseline
    correct over the same images, as the view computes it) and mean class probability:
    percentile bootstrap over images (db.stats.bootstrap_curve_ci), resampling every
    window of a (target, source) pair together so one resample is one set of images.
    """
    by_pair: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for row in outcomes:
        by_pair.setdefault((row[0], row[1]), []).append(row)
    out: dict[WindowKey, dict[str, float | None]] = {}
    for (target, source), rows in by_pair.items():
        windows = sorted({(r[2], r[3]) for r in rows}, key=lambda w: tuple(-1 if v is None else v for v in w))
        images = sorted({r[4] for r in rows})
        col = {w: j for j, w in enumerate(windows)}
        row_of = {image: i for i, image in enumerate(images)}
        shape = (len(images), len(windows))
        correct, base, prob, has_prob = (np.zeros(shape) for _ in range(4))
        for _, _, start, end, image_id, ok, target_prob, base_ok in rows:
            i, j = row_of[image_id], col[(start, end)]
            correct[i, j], base[i, j] = float(bool(ok)), float(bool(base_ok))
            if target_prob is not None:
                prob[i, j], has_prob[i, j] = float(target_prob), 1.0
        present = np.zeros(shape, dtype=bool)
        for _, _, start, end, image_id, *_ in rows:
            present[row_of[image_id], col[(start, end)]] = True
        rel_low, rel_high = stats.bootstrap_curve_ci(correct, base)
        prob_low, prob_high = stats.bootstrap_curve_ci(prob, has_prob)
        for (start, end), j in col.items():
            wilson = stats.wilson_interval(int(correct[:, j].sum()), int(present[:, j].sum()))
            out[(target, source, start, end)] = {
                "accuracy_ci_low": wilson[0] if wilson else None,
                "accuracy_ci_high": wilson[1] if wilson else None,
                "relative_accuracy_ci_low": rel_low[j],
                "relative_accuracy_ci_high": rel_high[j],
                "mean_target_prob_ci_low": prob_low[j],
                "mean_target_prob_ci_high": prob_high[j],
            }
    return out


PRESET_ORDER = ("early", "early_mid", "mid", "mid_late", "late", "all")


def preset_sort_key(preset: str | None) -> tuple[int, str]:
    preset = preset or ""
    return (PRESET_ORDER.index(preset) if preset in PRESET_ORDER else len(PRESET_ORDER), preset)


def blocking_page_data(db: ResultsDB, run_id: str) -> dict[str, Any]:
    run = queries.run(db, run_id)
    if run is None or run.experiment != "blocking":
        raise ValueError(f"no blocking run {run_id!r} in {db.path}")
    curve_rows = queries.blocking_curves(db, run_id, "sliding")
    sliding_ci = window_intervals(queries.blocking_outcomes(db, run_id, "sliding"))
    curves: dict[str, dict[str, Any]] = {}
    for target in sorted({row["target"] for row in curve_rows}):
        rows = [row for row in curve_rows if row["target"] == target]
        x = sorted({row["layer_start"] for row in rows})
        ends = {row["layer_start"]: row["layer_end"] for row in rows}
        series = []
        for source in sorted({row["source"] for row in rows}):
            by_start = {row["layer_start"]: row for row in rows if row["source"] == source}
            intervals = [
                sliding_ci.get((target, source, s, by_start[s]["layer_end"]), {}) if s in by_start else {} for s in x
            ]
            series.append(
                {
                    "source": source,
                    **{
                        measure: [by_start[s][measure] if s in by_start else None for s in x]
                        for measure in ("n", "accuracy", "mean_target_prob", "relative_accuracy")
                    },
                    **{
                        f"{measure}_ci_{bound}": [ci.get(f"{measure}_ci_{bound}") for ci in intervals]
                        for measure in INTERVAL_MEASURES
                        for bound in ("low", "high")
                    },
                }
            )
        curves[target] = {"x": x, "window_ends": [ends[s] for s in x], "series": series}

    baseline_rows = queries.blocking_curves(db, run_id, "baseline")
    baseline = {key: baseline_rows[0][key] for key in ("n", "accuracy", "mean_target_prob")} if baseline_rows else None
    if baseline is not None and baseline["accuracy"] is not None:
        wilson = stats.wilson_interval(round(baseline["accuracy"] * baseline["n"]), int(baseline["n"]))
        baseline["accuracy_ci"] = list(wilson) if wilson else None
    presets = queries.blocking_curves(db, run_id, "preset")
    preset_ci = window_intervals(queries.blocking_outcomes(db, run_id, "preset"))
    for row in presets:
        row.update(
            preset_ci.get((row["target"], row["source"], row["layer_start"], row["layer_end"]), {})
            or {f"{m}_ci_{b}": None for m in INTERVAL_MEASURES for b in ("low", "high")}
        )
    presets.sort(
        key=lambda p: (p["target"], p["source"], preset_sort_key(p["preset"]), p["layer_start"], p["layer_end"])
    )
    return {
        "run": {"run_id": run.run_id, "model_id": run.model_id, "status": run.status, "config": run.config},
        "curves": curves,
        "baseline": baseline,
        "presets": presets,
        "images": queries.blocking_image_summary(db, run_id),
        "image_details": image_details(db, run_id),
    }


def _split(numbers: set[int], known: dict[int, queries.Position]) -> dict[str, Any]:
    """A blocking set's positions as patch cells, text positions and unmapped positions."""
    cells, text, unmapped = [], [], 0
    for number in sorted(numbers):
        p = known.get(number)
        if p is not None and p.kind == "image" and p.patch_row is not None and p.patch_col is not None:
            cells.append([int(p.patch_row), int(p.patch_col)])
        elif p is not None and p.kind == "text":
            text.append({"position": number, "label": p.label})
        else:
            unmapped += 1
    return {"cells": cells, "text": text, "n_positions": len(numbers), "n_unmapped": unmapped}


def image_details(db: ResultsDB, run_id: str) -> list[dict[str, Any]]:
    """The per-image drill-down of a blocking run (see the module docstring)."""
    positions = queries.positions_by_image(db, run_id, images_of="blocking")
    grids = queries.image_grids(db, run_id)
    details: dict[int, dict[str, Any]] = {}
    pairs: dict[int, dict[tuple[str, str], tuple[set[int], set[int]]]] = {}
    for row in queries.blocking_rows(db, run_id):
        image_id = int(row["image_id"])
        grid_rows, grid_cols = grids.get(image_id, (None, None))
        entry = details.setdefault(
            image_id,
            {
                "image_id": image_id,
                "file_name": row["file_name"],
                "category": row["category"],
                "question": row["question"],
                "grid_rows": grid_rows,
                "grid_cols": grid_cols,
                "baseline": None,
                "sets": [],
                "windows": [],
            },
        )
        prediction = {
            "predicted_token": row["predicted_token"],
            "predicted_prob": row["predicted_prob"],
            "target_token": row["target_token"],
            "target_prob": row["target_prob"],
            "correct": bool(row["correct"]),
        }
        if row["window_kind"] == "baseline":
            entry["baseline"] = prediction
            continue
        sets = pairs.setdefault(image_id, {}).setdefault((row["target"], row["source"]), (set(), set()))
        sets[0].update(int(p) for p in row["source_positions"] or [])
        sets[1].update(int(p) for p in row["target_positions"] or [])
        entry["windows"].append(
            {
                "target": row["target"],
                "source": row["source"],
                "window_kind": row["window_kind"],
                "preset": row["preset"],
                "layer_start": row["layer_start"],
                "layer_end": row["layer_end"],
                **prediction,
            }
        )
    for image_id, entry in details.items():
        entry["windows"].sort(
            key=lambda w: (
                w["target"],
                w["source"],
                0 if w["window_kind"] == "preset" else 1,
                preset_sort_key(w["preset"]),
                w["layer_start"] if w["layer_start"] is not None else -1,
                w["layer_end"] if w["layer_end"] is not None else -1,
            )
        )
        known = positions.get(image_id, {})
        for (target, source), (source_set, target_set) in sorted(pairs.get(image_id, {}).items()):
            entry["sets"].append(
                {
                    "target": target,
                    "source": source,
                    "source_set": _split(source_set, known),
                    "target_set": _split(target_set, known),
                }
            )
    return [details[k] for k in sorted(details)]


def blocking_context(data: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Template context of a blocking run page, and one context per image page (its
    overlays: per (target, source) pair, the source cells filled and the target outlined)."""
    chart_list = []
    for target, curve in data["curves"].items():
        chart_list.append(
            {
                "target": target,
                "curve": curve,
                "relative": charts.blocking_curve_chart(
                    curve, "relative_accuracy", y_label="relative accuracy", reference=1.0
                ),
                "prob": charts.blocking_curve_chart(curve, "mean_target_prob", y_label="mean class probability"),
            }
        )
    presets: dict[str, list[dict[str, Any]]] = {}
    for row in data["presets"]:
        presets.setdefault(row["target"], []).append(row)
    images = []
    for detail in data["image_details"]:
        overlays = []
        for pair in detail["sets"]:
            src, tgt = pair["source_set"], pair["target_set"]
            caption = (
                f"source {pair['source']}: {len(src['cells'])} patches blocked as keys; "
                f"target {pair['target']}: {len(tgt['cells'])} patches"
                + (
                    f" and {len(tgt['text'])} text position{'' if len(tgt['text']) == 1 else 's'}"
                    if tgt["text"]
                    else ""
                )
                + " as queries"
            )
            if src["n_unmapped"] or tgt["n_unmapped"]:
                caption += f" ({src['n_unmapped'] + tgt['n_unmapped']} positions not in the positions table)"
            overlays.append(
                {
                    "key": [pair["target"], pair["source"]],
                    "cells": src["cells"],
                    "outline": tgt["cells"],
                    "caption": caption,
                }
            )
        initial = [overlays[0]["key"][0], overlays[0]["key"][1]] if overlays else ["", ""]
        images.append(
            {
                "image": detail,
                "targets": sorted({p["target"] for p in detail["sets"]}),
                "sources": sorted({p["source"] for p in detail["sets"]}),
                "grid_rows": detail["grid_rows"],
                "grid_cols": detail["grid_cols"],
                "overlays": overlays,
                "initial": initial,
            }
        )
    bootstrap = {"resamples": stats.BOOTSTRAP_RESAMPLES, "seed": stats.BOOTSTRAP_SEED}
    return {"charts": chart_list, "presets": presets, "bootstrap": bootstrap}, images


def write_blocking_pages(db: ResultsDB, site: Site, page: ExperimentPage) -> None:
    """The run page and one page (with the view PNG) per image with blocking rows."""
    data = blocking_page_data(db, page.run.run_id)
    context, images = blocking_context(data)
    write_experiment_pages(db, site, page, "blocking.html.j2", data, context, images)
