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
"""

from __future__ import annotations

from typing import Any

from db.store import ResultsDB

MEASURES = ("relative_accuracy", "accuracy", "mean_target_prob", "n")


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
    return {
        "run": {key: run[key] for key in ("run_id", "model_id", "status", "config")},
        "curves": curves,
        "baseline": baseline,
        "presets": presets,
        "images": images,
    }
