"""Data for the token-ablation report page, read from the database only (no torch, no collector).

`ablation_page_data(db, run_id)` returns plain JSON-able data:

- ``run``: run_id, model_id, status, config.
- ``summary``: rows of the `ablation_summary` view (setting, condition, n_baseline_correct,
  n_flipped, pct_flipped, mean_tokens_ablated), ordered by setting then condition.
- ``images``: one entry per ablated image: image_id, file_name, category, grid size and
  ``conditions``: every (setting, condition) row with positions, patch cells, answer and
  correctness.
- ``skipped``: every skipped image with its reason and detail; ``skip_counts`` per reason.
- ``settings``: the settings present, in reading order (generative, polling, vqa, others).
- ``baseline``: per setting, the images with a ``none`` row (``n_images``) and how many of
  them it answered correctly (``n_correct``): the denominators of ``summary``.

Each condition of ``images`` also carries ``n_unmapped``: its positions that are not image
positions of the ``positions`` table (so have no patch cell; 0 for a faithful run).

`bar_chart(rows, y_max)` gives the geometry of one setting's flip-rate bar chart.
"""

from __future__ import annotations

import json
import re
from typing import Any

from db.store import ResultsDB

# Conditions in reading order; others (future ones) follow alphabetically.
_CONDITION_ORDER = ("none", "object_0", "object_1", "object_2", "register", "random", "gradient", "image_noise")
_SETTING_ORDER = ("generative", "polling", "vqa")


def setting_sort_key(setting: str) -> tuple[int, str]:
    """generative, polling, vqa, then the rest alphabetically."""
    return (_SETTING_ORDER.index(setting) if setting in _SETTING_ORDER else len(_SETTING_ORDER), setting)


def condition_sort_key(condition: str) -> tuple[int, int, str]:
    """none, object_0..2, register, random_k by k, gradient_k by k, image_noise, then the rest."""
    match = re.fullmatch(r"(random|gradient)_(\d+)", condition)
    if match:
        return _CONDITION_ORDER.index(match.group(1)), int(match.group(2)), condition
    if condition in _CONDITION_ORDER:
        return _CONDITION_ORDER.index(condition), 0, condition
    return len(_CONDITION_ORDER), 0, condition


def ablation_page_data(db: ResultsDB, run_id: str) -> dict[str, Any]:
    """Summary table and per-image drill-down of one ablation run (see the module docstring)."""
    run_rows = db.sql("SELECT run_id, model_id, status, config, experiment FROM runs WHERE run_id = ?", [run_id])
    if not run_rows:
        raise ValueError(f"no run {run_id!r} in {db.path}")
    run_id_, model_id, status, config, experiment = run_rows[0]
    if experiment != "ablation":
        raise ValueError(f"run {run_id!r} is a {experiment} run, not an ablation run")
    if isinstance(config, str):
        config = json.loads(config)

    summary = [
        {
            "setting": setting,
            "condition": condition,
            "n_baseline_correct": int(n_base),
            "n_flipped": int(n_flipped),
            "pct_flipped": float(pct),
            "mean_tokens_ablated": float(mean_tokens),
        }
        for condition, setting, n_base, n_flipped, pct, mean_tokens in db.sql(
            "SELECT condition, setting, n_baseline_correct, n_flipped, pct_flipped, mean_tokens_ablated "
            "FROM ablation_summary WHERE run_id = ?",
            [run_id],
        )
    ]
    summary.sort(key=lambda row: (setting_sort_key(row["setting"]), condition_sort_key(row["condition"])))

    cells: dict[tuple[int, int], tuple[int | None, int | None]] = {
        (image_id, position): (row, col)
        for image_id, position, row, col in db.sql(
            "SELECT image_id, position, patch_row, patch_col FROM positions WHERE run_id = ? AND kind = 'image'",
            [run_id],
        )
    }
    grids = {
        image_id: (rows, cols)
        for image_id, rows, cols in db.sql(
            "SELECT image_id, grid_rows, grid_cols FROM run_images WHERE run_id = ?", [run_id]
        )
    }
    images: dict[int, dict[str, Any]] = {}
    for (image_id, file_name, category, setting, condition, positions, n_ablated, correct, answer, question,
         predicted_token, predicted_prob, target_token, target_prob, seed) in db.sql(
        "SELECT a.image_id, i.file_name, a.category, a.setting, a.condition, a.positions, a.n_ablated, a.correct, "
        "a.answer, a.question, a.predicted_token, a.predicted_prob, a.target_token, a.target_prob, a.seed "
        "FROM ablations a JOIN images i USING (image_id) WHERE a.run_id = ? ORDER BY a.image_id",
        [run_id],
    ):
        entry = images.setdefault(
            image_id,
            {
                "image_id": int(image_id),
                "file_name": file_name,
                "category": category,
                "grid_rows": grids.get(image_id, (None, None))[0],
                "grid_cols": grids.get(image_id, (None, None))[1],
                "conditions": [],
            },
        )
        positions = [int(p) for p in positions or []]
        entry["conditions"].append(
            {
                "setting": setting,
                "condition": condition,
                "positions": positions,
                "cells": [list(cells[(image_id, p)]) for p in positions if (image_id, p) in cells],
                "n_unmapped": sum(1 for p in positions if (image_id, p) not in cells),
                "n_ablated": int(n_ablated),
                "correct": bool(correct),
                "answer": answer,
                "question": question,
                "predicted_token": predicted_token,
                "predicted_prob": predicted_prob,
                "target_token": target_token,
                "target_prob": target_prob,
                "seed": seed,
            }
        )
    for entry in images.values():
        entry["conditions"].sort(key=lambda c: (setting_sort_key(c["setting"]), condition_sort_key(c["condition"])))

    skipped = [
        {"image_id": int(image_id), "reason": reason, "detail": detail}
        for image_id, reason, detail in db.sql(
            "SELECT image_id, reason, detail FROM skipped WHERE run_id = ? ORDER BY image_id, reason", [run_id]
        )
    ]
    skip_counts: dict[str, int] = {}
    for row in skipped:
        skip_counts[row["reason"]] = skip_counts.get(row["reason"], 0) + 1
    baseline = [
        {"setting": setting, "n_images": int(n_images), "n_correct": int(n_correct)}
        for setting, n_images, n_correct in db.sql(
            "SELECT setting, count(*), count(*) FILTER (WHERE correct) FROM ablations "
            "WHERE run_id = ? AND condition = 'none' GROUP BY setting",
            [run_id],
        )
    ]
    baseline.sort(key=lambda row: setting_sort_key(row["setting"]))
    settings = sorted(
        {c["setting"] for entry in images.values() for c in entry["conditions"]} | {row["setting"] for row in summary},
        key=setting_sort_key,
    )
    return {
        "run": {"run_id": run_id_, "model_id": model_id, "status": status, "config": config},
        "summary": summary,
        "images": [images[k] for k in sorted(images)],
        "skipped": skipped,
        "skip_counts": skip_counts,
        "settings": settings,
        "baseline": baseline,
    }


def bar_chart(rows: list[dict[str, Any]], y_max: float, *, width: int = 640, height: int = 300) -> dict[str, Any]:
    """Geometry of one setting's bar chart: one bar per `ablation_summary` row (% flipped).

    `y_max` (percent) is shared by the charts of a run so their bars compare. Every text
    is rendered by the template (autoescaped); the SVG carries its own colours and fonts
    so it can be saved and used as a figure on its own.
    """
    left, right, top, bottom = 52, 12, 22, 92
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / max(1, len(rows))
    bar_w = min(44.0, slot * 0.7)
    bars = []
    for i, row in enumerate(rows):
        pct = row["pct_flipped"]
        h = plot_h * min(pct, y_max) / y_max
        cx = left + slot * (i + 0.5)
        bars.append({
            "x": round(cx - bar_w / 2, 2), "y": round(top + plot_h - h, 2), "w": round(bar_w, 2), "h": round(h, 2),
            "cx": round(cx, 2), "label_y": round(top + plot_h - h - 4, 2), "value": f"{pct:.1f}",
            "condition": row["condition"],
            "title": (f"{row['setting']} / {row['condition']}: {row['n_flipped']} of {row['n_baseline_correct']} "
                      f"baseline-correct answers flipped ({pct:.2f}%); mean {row['mean_tokens_ablated']:.2f} "
                      "tokens ablated"),
        })
    ticks = [{"y": round(top + plot_h * (1 - f), 2), "label": f"{y_max * f:g}%"} for f in (0, 0.25, 0.5, 0.75, 1)]
    return {"width": width, "height": height, "left": left, "top": top, "plot_w": plot_w, "plot_h": plot_h,
            "bottom_y": top + plot_h, "bars": bars, "y_ticks": ticks}


def chart_y_max(summary: list[dict[str, Any]]) -> float:
    """A shared y range for a run's charts: the largest % flipped rounded up to 10, at least 10."""
    top = max([row["pct_flipped"] for row in summary if row["condition"] != "none"], default=0.0)
    return float(min(100, max(10, -(-top // 10) * 10)))
