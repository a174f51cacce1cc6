"""Data for the token-ablation report page, read from the database only (no torch, no collector).

`ablation_page_data(db, run_id)` returns plain JSON-able data:

- ``run``: run_id, model_id, status, config.
- ``summary``: rows of the `ablation_summary` view (setting, condition, n_baseline_correct,
  n_flipped, pct_flipped, mean_tokens_ablated), ordered by setting then condition.
- ``images``: one entry per ablated image: image_id, file_name, category, grid size and
  ``conditions``: every (setting, condition) row with positions, patch cells, answer and
  correctness.
- ``skipped``: every skipped image with its reason and detail; ``skip_counts`` per reason.
"""

from __future__ import annotations

import json
import re
from typing import Any

from db.store import ResultsDB

# Conditions in reading order; others (future ones) follow alphabetically.
_CONDITION_ORDER = ("none", "object_0", "object_1", "object_2", "register", "random", "gradient", "image_noise")


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
    summary.sort(key=lambda row: (row["setting"], condition_sort_key(row["condition"])))

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
        entry["conditions"].sort(key=lambda c: (c["setting"], condition_sort_key(c["condition"])))

    skipped = [
        {"image_id": int(image_id), "reason": reason, "detail": detail}
        for image_id, reason, detail in db.sql(
            "SELECT image_id, reason, detail FROM skipped WHERE run_id = ? ORDER BY image_id, reason", [run_id]
        )
    ]
    skip_counts: dict[str, int] = {}
    for row in skipped:
        skip_counts[row["reason"]] = skip_counts.get(row["reason"], 0) + 1
    return {
        "run": {"run_id": run_id_, "model_id": model_id, "status": status, "config": config},
        "summary": summary,
        "images": [images[k] for k in sorted(images)],
        "skipped": skipped,
        "skip_counts": skip_counts,
    }
