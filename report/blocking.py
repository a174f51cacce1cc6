"""Data for the attention-blocking report page, read from the database (no torch).

`blocking_page_data(db, run_id)` returns plain JSON-able dicts and lists:

- `run`: run_id, model_id, status, config.
- `curves`: per target set, the sliding-window curve: `x` = layer_start of every sliding
  window (ascending) and `window_ends`, and one series per source set with
  `relative_accuracy`, `accuracy`, `mean_target_prob` and `n`, aligned with `x` (None where
  a source has no window starting there).
- `baseline`: n images with a baseline row, their accuracy and mean class probability.
- `presets`: one row per (target, source, preset) with its window and the same measures.
- `images`: one row per image: category, question, baseline prediction, and the share of
  its blocking conditions still answered correctly; skipped images with their reason.
- `image_details`: per image with blocking rows, the drill-down: its baseline prediction
  against the class token, per (target, source) pair the patch cells of both sets (from the
  `positions` table's patch_row/patch_col, never from position indices) and the text
  positions among them, and every window's prediction (presets in PRESET_ORDER, then the
  sliding windows by start layer).

`line_chart(curve, measure, ...)` gives the geometry of one blocking-curve chart.
"""

from __future__ import annotations

import math
from typing import Any

from db.store import ResultsDB

MEASURES = ("relative_accuracy", "accuracy", "mean_target_prob", "n")
PRESET_ORDER = ("early", "early_mid", "mid", "mid_late", "late", "all")
# Okabe-Ito colours (colour-blind safe) and dash patterns (tell lines apart in greyscale print).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999")
DASHES = ("", "7 3", "2 2", "9 3 2 3", "4 4", "1 3", "12 4", "6 2 2 2")


def preset_sort_key(preset: str | None) -> tuple[int, str]:
    preset = preset or ""
    return (PRESET_ORDER.index(preset) if preset in PRESET_ORDER else len(PRESET_ORDER), preset)


def blocking_page_data(db: ResultsDB, run_id: str) -> dict[str, Any]:
    runs = [run for run in db.runs("blocking") if run["run_id"] == run_id]
    if not runs:
        raise ValueError(f"no blocking run {run_id!r} in {db.path}")
    run = runs[0]
    curve_rows = db.sql(
        "SELECT target, source, layer_start, layer_end, n, accuracy, mean_target_prob, relative_accuracy "
        "FROM blocking_curves WHERE run_id = ? AND window_kind = 'sliding' ORDER BY target, source, layer_start",
        [run_id],
    )
    curves: dict[str, dict[str, Any]] = {}
    for target in sorted({row[0] for row in curve_rows}):
        rows = [row for row in curve_rows if row[0] == target]
        x = sorted({row[2] for row in rows})
        ends = {row[2]: row[3] for row in rows}
        series = []
        for source in sorted({row[1] for row in rows}):
            by_start = {row[2]: row for row in rows if row[1] == source}
            values = {
                "n": [by_start[s][4] if s in by_start else None for s in x],
                "accuracy": [by_start[s][5] if s in by_start else None for s in x],
                "mean_target_prob": [by_start[s][6] if s in by_start else None for s in x],
                "relative_accuracy": [by_start[s][7] if s in by_start else None for s in x],
            }
            series.append({"source": source, **values})
        curves[target] = {"x": x, "window_ends": [ends[s] for s in x], "series": series}

    baseline_row = db.sql(
        "SELECT n, accuracy, mean_target_prob FROM blocking_curves WHERE run_id = ? AND window_kind = 'baseline'",
        [run_id],
    )
    baseline = dict(zip(("n", "accuracy", "mean_target_prob"), baseline_row[0])) if baseline_row else None

    presets = [
        dict(zip(("target", "source", "preset", "layer_start", "layer_end", "n", "accuracy", "mean_target_prob",
                  "relative_accuracy"), row))
        for row in db.sql(
            "SELECT target, source, preset, layer_start, layer_end, n, accuracy, mean_target_prob, relative_accuracy "
            "FROM blocking_curves WHERE run_id = ? AND window_kind = 'preset' "
            "ORDER BY target, source, layer_start, layer_end",
            [run_id],
        )
    ]

    image_rows = db.sql(
        """
        SELECT ri.image_id, i.file_name,
               max(b.category) AS category,
               max(b.question) AS question,
               bool_or(b.correct) FILTER (WHERE b.window_kind = 'baseline') AS baseline_correct,
               max(b.predicted_token) FILTER (WHERE b.window_kind = 'baseline') AS baseline_token,
               max(b.target_prob) FILTER (WHERE b.window_kind = 'baseline') AS baseline_target_prob,
               count(b.image_id) FILTER (WHERE b.window_kind <> 'baseline') AS n_conditions,
               avg(b.correct::DOUBLE) FILTER (WHERE b.window_kind <> 'baseline') AS share_correct,
               (SELECT string_agg(s.reason, ',') FROM skipped s
                 WHERE s.run_id = ri.run_id AND s.image_id = ri.image_id) AS skipped_reason
        FROM run_images ri
        LEFT JOIN images i USING (image_id)
        LEFT JOIN blocking b ON b.run_id = ri.run_id AND b.image_id = ri.image_id
        WHERE ri.run_id = ?
        GROUP BY ri.run_id, ri.image_id, i.file_name
        ORDER BY ri.image_id
        """,
        [run_id],
    )
    columns = ("image_id", "file_name", "category", "question", "baseline_correct", "baseline_token",
               "baseline_target_prob", "n_conditions", "share_correct", "skipped_reason")
    images = [dict(zip(columns, row)) for row in image_rows]
    presets.sort(key=lambda p: (p["target"], p["source"], preset_sort_key(p["preset"]), p["layer_start"], p["layer_end"]))
    return {
        "run": {key: run[key] for key in ("run_id", "model_id", "status", "config")},
        "curves": curves,
        "baseline": baseline,
        "presets": presets,
        "images": images,
        "image_details": image_details(db, run_id),
    }


def image_details(db: ResultsDB, run_id: str) -> list[dict[str, Any]]:
    """The per-image drill-down of a blocking run (see the module docstring)."""
    positions: dict[int, dict[int, tuple[str, int | None, int | None, str]]] = {}
    for image_id, position, kind, patch_row, patch_col, label in db.sql(
        "SELECT image_id, position, kind, patch_row, patch_col, label FROM positions "
        "WHERE run_id = ? AND image_id IN (SELECT image_id FROM blocking WHERE run_id = ?)",
        [run_id, run_id],
    ):
        positions.setdefault(image_id, {})[position] = (kind, patch_row, patch_col, label)
    grids = {
        image_id: (rows, cols)
        for image_id, rows, cols in db.sql("SELECT image_id, grid_rows, grid_cols FROM run_images WHERE run_id = ?", [run_id])
    }
    details: dict[int, dict[str, Any]] = {}
    pairs: dict[int, dict[tuple[str, str], tuple[set[int], set[int]]]] = {}
    for (image_id, file_name, category, question, source, target, layer_start, layer_end, window_kind, preset,
         correct, predicted_token, predicted_prob, target_token, target_prob, source_positions,
         target_positions) in db.sql(
        "SELECT b.image_id, i.file_name, b.category, b.question, b.source, b.target, b.layer_start, b.layer_end, "
        "b.window_kind, b.preset, b.correct, b.predicted_token, b.predicted_prob, b.target_token, b.target_prob, "
        "b.source_positions, b.target_positions "
        "FROM blocking b LEFT JOIN images i USING (image_id) WHERE b.run_id = ? ORDER BY b.image_id",
        [run_id],
    ):
        entry = details.setdefault(image_id, {
            "image_id": int(image_id), "file_name": file_name, "category": category, "question": question,
            "grid_rows": grids.get(image_id, (None, None))[0], "grid_cols": grids.get(image_id, (None, None))[1],
            "baseline": None, "sets": [], "windows": [],
        })
        prediction = {"predicted_token": predicted_token, "predicted_prob": predicted_prob,
                      "target_token": target_token, "target_prob": target_prob, "correct": bool(correct)}
        if window_kind == "baseline":
            entry["baseline"] = prediction
            continue
        sets = pairs.setdefault(image_id, {}).setdefault((target, source), (set(), set()))
        sets[0].update(int(p) for p in source_positions or [])
        sets[1].update(int(p) for p in target_positions or [])
        entry["windows"].append({"target": target, "source": source, "window_kind": window_kind, "preset": preset,
                                 "layer_start": layer_start, "layer_end": layer_end, **prediction})
    for image_id, entry in details.items():
        entry["windows"].sort(key=lambda w: (
            w["target"], w["source"], 0 if w["window_kind"] == "preset" else 1, preset_sort_key(w["preset"]),
            w["layer_start"] if w["layer_start"] is not None else -1, w["layer_end"] if w["layer_end"] is not None else -1))
        known = positions.get(image_id, {})

        def split(numbers: set[int], known: dict[int, tuple[str, int | None, int | None, str]] = known) -> dict[str, Any]:
            cells, text, unmapped = [], [], 0
            for number in sorted(numbers):
                kind, row, col, label = known.get(number, (None, None, None, None))
                if kind == "image" and row is not None and col is not None:
                    cells.append([int(row), int(col)])
                elif kind == "text":
                    text.append({"position": number, "label": label})
                else:
                    unmapped += 1
            return {"cells": cells, "text": text, "n_positions": len(numbers), "n_unmapped": unmapped}

        for (target, source), (source_set, target_set) in sorted(pairs.get(image_id, {}).items()):
            entry["sets"].append({"target": target, "source": source, "source_set": split(source_set),
                                  "target_set": split(target_set)})
    return [details[k] for k in sorted(details)]


def _nice_ceiling(value: float) -> float:
    if not value > 0:
        return 1.0
    # Steps whose quarters are round numbers (the y ticks sit at quarters).
    scale = 10 ** math.floor(math.log10(value))
    step = next(m for m in (1, 1.2, 1.6, 2, 4, 6, 8, 10) if m * scale >= value * (1 - 1e-9))
    return round(step * scale, 12)


def line_chart(curve: dict[str, Any], measure: str, *, y_label: str, width: int = 640, height: int = 300,
               reference: float | None = None) -> dict[str, Any]:
    """Geometry of one blocking-curve chart: x = window start layer, one line per source set.

    `curve` is one entry of `curves`; `measure` one of MEASURES. None values leave gaps (a
    line is split there). `empty` is True when no series has any value (e.g. relative
    accuracy where the baseline accuracy is 0); the template then says so. The legend sits
    inside the SVG and every colour and font is an attribute, so the SVG is a figure on
    its own.
    """
    left, right, top, bottom, legend_w = 64, 12, 14, 40, 172
    plot_w, plot_h = width - left - right - legend_w, height - top - bottom
    x_values = curve["x"]
    values = [v for series in curve["series"] for v in series[measure] if v is not None]
    y_max = _nice_ceiling(max(values + ([reference] if reference is not None else []), default=0.0))
    x_min, x_max = (min(x_values), max(x_values)) if x_values else (0, 1)

    def x_of(x: float) -> float:
        if x_max == x_min:
            return left + plot_w / 2
        return left + plot_w * (x - x_min) / (x_max - x_min)

    def y_of(y: float) -> float:
        return top + plot_h * (1 - y / y_max)

    lines = []
    for i, series in enumerate(curve["series"]):
        segments, current, dots = [], [], []
        for j, x in enumerate(x_values):
            value = series[measure][j]
            if value is None:
                if current:
                    segments.append(current)
                current = []
                continue
            point = (round(x_of(x), 2), round(y_of(value), 2))
            current.append(point)
            end = curve["window_ends"][j]
            accuracy = series["accuracy"][j]
            dots.append({
                "x": point[0], "y": point[1],
                "title": (f"{series['source']}, layers {x}–{end}: {y_label} {value:.4g} "
                          f"(accuracy {accuracy:.4g}, n = {series['n'][j]})" if accuracy is not None
                          else f"{series['source']}, layers {x}–{end}: {y_label} {value:.4g} (n = {series['n'][j]})"),
            })
        if current:
            segments.append(current)
        lines.append({
            "name": series["source"], "color": PALETTE[i % len(PALETTE)], "dash": DASHES[i % len(DASHES)],
            "segments": [" ".join(f"{x},{y}" for x, y in seg) for seg in segments], "dots": dots,
            "legend_y": top + 10 + 20 * i,
        })
    step = max(1, math.ceil(len(x_values) / 16))
    x_ticks = [{"x": round(x_of(x), 2), "label": str(x)} for x in x_values[::step]]
    y_ticks = [{"y": round(y_of(y_max * f), 2), "label": f"{y_max * f:.4g}"} for f in (0, 0.25, 0.5, 0.75, 1)]
    return {
        "width": width, "height": height, "left": left, "top": top, "plot_w": plot_w, "plot_h": plot_h,
        "bottom_y": top + plot_h, "legend_x": left + plot_w + 18, "lines": lines, "x_ticks": x_ticks,
        "y_ticks": y_ticks, "y_label": y_label, "empty": not values,
        "reference_y": round(y_of(reference), 2) if reference is not None and values else None,
    }
