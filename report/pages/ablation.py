"""The token-ablation pages: `experiments/ablation-<run>.html` and one drill-down page per image.

`ablation_page_data(db, run_id)` returns plain JSON-able data:

- ``run``: run_id, model_id, status, config.
- ``summary``: rows of the `ablation_summary` view (setting, condition, n_baseline_correct,
  n_flipped, pct_flipped, mean_tokens_ablated, and the 95% Wilson interval of pct_flipped
  as pct_flipped_ci_low / pct_flipped_ci_high), ordered by setting then condition.
- ``images``: one entry per ablated image: image_id, file_name, category, grid size and
  ``conditions``: every (setting, condition) row with positions, patch cells, answer and
  correctness.
- ``skipped``: every skipped image with its reason and detail; ``skip_counts`` per reason.
- ``settings``: the settings present, in reading order (generative, polling, vqa, others).
- ``baseline``: per setting, the images with a ``none`` row (``n_images``) and how many of
  them it answered correctly (``n_correct``): the denominators of ``summary``.

Each condition of ``images`` also carries ``n_unmapped``: its positions that are not image
positions of the ``positions`` table (so have no patch cell; 0 for a faithful run).
"""

from __future__ import annotations

import re
from typing import Any

from db import queries, stats
from db.store import ResultsDB
from report import charts
from report.catalogue import ExperimentPage
from report.pages.experiment_images import write_experiment_pages
from report.site import Site

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
    run = queries.run(db, run_id)
    if run is None:
        raise ValueError(f"no run {run_id!r} in {db.path}")
    if run.experiment != "ablation":
        raise ValueError(f"run {run_id!r} is a {run.experiment} run, not an ablation run")

    summary = [
        {
            "setting": row["setting"],
            "condition": row["condition"],
            "n_baseline_correct": int(row["n_baseline_correct"]),
            "n_flipped": int(row["n_flipped"]),
            "pct_flipped": float(row["pct_flipped"]),
            "mean_tokens_ablated": float(row["mean_tokens_ablated"]),
        }
        for row in queries.ablation_summary(db, run_id)
    ]
    for row in summary:
        # The view's Wilson bounds, recomputed from its counts so that databases written
        # before the view had them (schema < 8, opened read-only) render the same.
        interval = stats.wilson_percent(row["n_flipped"], row["n_baseline_correct"])
        if row["condition"] == "none":
            interval = None  # nothing ablated: its flip rate is 0 by definition, not an estimate
        row["pct_flipped_ci_low"], row["pct_flipped_ci_high"] = interval if interval else (None, None)
    summary.sort(key=lambda row: (setting_sort_key(row["setting"]), condition_sort_key(row["condition"])))

    image_positions = queries.positions_by_image(db, run_id, kind="image")
    grids = queries.image_grids(db, run_id)
    images: dict[int, dict[str, Any]] = {}
    for row in queries.ablation_rows(db, run_id):
        image_id = int(row["image_id"])
        grid_rows, grid_cols = grids.get(image_id, (None, None))
        entry = images.setdefault(
            image_id,
            {
                "image_id": image_id,
                "file_name": row["file_name"],
                "category": row["category"],
                "grid_rows": grid_rows,
                "grid_cols": grid_cols,
                "conditions": [],
            },
        )
        cells = image_positions.get(image_id, {})
        positions = [int(p) for p in row["positions"] or []]
        entry["conditions"].append(
            {
                "setting": row["setting"],
                "condition": row["condition"],
                "positions": positions,
                "cells": [[cells[p].patch_row, cells[p].patch_col] for p in positions if p in cells],
                "n_unmapped": sum(1 for p in positions if p not in cells),
                "n_ablated": int(row["n_ablated"]),
                "correct": bool(row["correct"]),
                **{
                    key: row[key]
                    for key in (
                        "answer",
                        "question",
                        "predicted_token",
                        "predicted_prob",
                        "target_token",
                        "target_prob",
                        "seed",
                    )
                },
            }
        )
    for entry in images.values():
        entry["conditions"].sort(key=lambda c: (setting_sort_key(c["setting"]), condition_sort_key(c["condition"])))

    skipped = [
        {"image_id": int(row["image_id"]), "reason": row["reason"], "detail": row["detail"]}
        for row in queries.skipped(db, run_id)
    ]
    skip_counts: dict[str, int] = {}
    for row in skipped:
        skip_counts[row["reason"]] = skip_counts.get(row["reason"], 0) + 1
    baseline = [
        {"setting": row["setting"], "n_images": int(row["n_images"]), "n_correct": int(row["n_correct"])}
        for row in queries.ablation_baseline(db, run_id)
    ]
    baseline.sort(key=lambda row: setting_sort_key(row["setting"]))
    settings = sorted(
        {c["setting"] for entry in images.values() for c in entry["conditions"]} | {row["setting"] for row in summary},
        key=setting_sort_key,
    )
    return {
        "run": {"run_id": run.run_id, "model_id": run.model_id, "status": run.status, "config": run.config},
        "summary": summary,
        "images": [images[k] for k in sorted(images)],
        "skipped": skipped,
        "skip_counts": skip_counts,
        "settings": settings,
        "baseline": baseline,
    }


def ablation_context(data: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Template context of an ablation run page, and one context per image page (its
    overlays: the ablated patch cells of each (setting, condition))."""
    y_max = charts.flip_rate_y_max(data["summary"])
    by_setting = []
    for setting in data["settings"]:
        rows = [row for row in data["summary"] if row["setting"] == setting]
        bars = [row for row in rows if row["condition"] != "none"]
        baseline = next((b for b in data["baseline"] if b["setting"] == setting), None)
        by_setting.append(
            {
                "setting": setting,
                "rows": rows,
                "baseline": baseline,
                "chart": charts.flip_rate_bar_chart(bars, y_max) if bars else None,
            }
        )
    images = []
    for image in data["images"]:
        conditions = sorted({c["condition"] for c in image["conditions"]}, key=condition_sort_key)
        settings = [s for s in data["settings"] if any(c["setting"] == s for c in image["conditions"])]
        cell = {(c["setting"], c["condition"]): c for c in image["conditions"]}
        overlays = [
            {
                "key": [c["setting"], c["condition"]],
                "cells": c["cells"],
                "caption": f"{c['setting']} / {c['condition']}: {len(c['cells'])} patch"
                f"{'' if len(c['cells']) == 1 else 'es'} ablated"
                + (f" ({c['n_unmapped']} positions without a patch cell)" if c["n_unmapped"] else ""),
            }
            for c in image["conditions"]
        ]
        first = next((c for c in image["conditions"] if c["cells"]), image["conditions"][0])
        per_setting = []
        for s in data["settings"]:
            base = cell.get((s, "none"))
            rest = [c for c in image["conditions"] if c["setting"] == s and c["condition"] != "none"]
            per_setting.append(
                {
                    "setting": s,
                    "baseline": base,
                    "n_conditions": len(rest),
                    "n_incorrect": sum(1 for c in rest if not c["correct"]),
                }
            )
        questions = []
        for s in settings:
            c0 = cell.get((s, "none")) or next(c for c in image["conditions"] if c["setting"] == s)
            questions.append({"setting": s, "question": c0["question"], "target_token": c0["target_token"]})
        images.append(
            {
                "image": image,
                "conditions": conditions,
                "settings": settings,
                "cell": cell,
                "grid_rows": image["grid_rows"],
                "grid_cols": image["grid_cols"],
                "overlays": overlays,
                "initial": [first["setting"], first["condition"]],
                "per_setting": per_setting,
                "questions": questions,
            }
        )
    return {"by_setting": by_setting, "y_max": y_max}, images


def write_ablation_pages(db: ResultsDB, site: Site, page: ExperimentPage) -> None:
    """The run page and one page (with the view PNG) per ablated image."""
    data = ablation_page_data(db, page.run.run_id)
    context, images = ablation_context(data)
    write_experiment_pages(db, site, page, "ablation.html.j2", data, context, images)
