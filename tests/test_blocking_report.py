"""Report page data for a blocking run, from synthetic rows (no model)."""

from __future__ import annotations

import pytest

from db.stats import wilson_interval
from db.store import ResultsDB
from report.pages.blocking import blocking_page_data


def test_blocking_page_data_from_synthetic_rows(tmp_path):
    with ResultsDB(tmp_path / "r.duckdb") as db:
        run_id = db.start_run("blocking", "m", {"k": 1}, {"window": 2})
        for image_id in (1, 2, 3):
            db.add_image(image_id, f"{image_id}.png", 10, 10, "test")
            db.sql("INSERT INTO run_images VALUES (?, ?, 600, 4, 24, 24, now()::TIMESTAMP)", [run_id, image_id])

        def add(image_id, kind, source, target, correct, prob, start=None, end=None, preset=None):
            db.sql(
                "INSERT INTO blocking (run_id, image_id, category, source, target, layer_start, layer_end, window_kind,"
                " preset, correct, question, predicted_token, target_token, target_prob) "
                "VALUES (?, ?, 'cat', ?, ?, ?, ?, ?, ?, ?, 'What?', 'cat', 'cat', ?)",
                [run_id, image_id, source, target, start, end, kind, preset, correct, prob],
            )

        for image_id in (1, 2):
            add(image_id, "baseline", "none", "none", True, 0.8)
        add(1, "sliding", "object_1", "last", False, 0.2, 0, 1)
        add(2, "sliding", "object_1", "last", True, 0.6, 0, 1)
        add(1, "sliding", "object_1", "last", True, 0.7, 1, 2)
        add(1, "sliding", "object_0", "last", True, 0.9, 1, 2)
        add(1, "preset", "object_1", "last", False, 0.1, 0, 3, "all")
        db.sql("INSERT INTO skipped VALUES (?, 3, 'baseline_incorrect', 'x')", [run_id])
        data = blocking_page_data(db, run_id)
        with pytest.raises(ValueError, match="no blocking run"):
            blocking_page_data(db, "nope")

    curve = data["curves"]["last"]
    assert curve["x"] == [0, 1] and curve["window_ends"] == [1, 2]
    series = {s["source"]: s for s in curve["series"]}
    assert series["object_1"]["relative_accuracy"] == [pytest.approx(0.5), pytest.approx(1.0)]
    assert series["object_1"]["mean_target_prob"] == [pytest.approx(0.4), pytest.approx(0.7)]
    assert series["object_0"]["relative_accuracy"] == [None, pytest.approx(1.0)]
    assert data["baseline"] == {
        "n": 2,
        "accuracy": 1.0,
        "mean_target_prob": pytest.approx(0.8),
        "accuracy_ci": list(wilson_interval(2, 2)),
    }
    # Intervals: Wilson on accuracy (1 of 2 right); bootstrap over the two images of the
    # first window: a resample holds image 1 twice (ratio 0), image 2 twice (1) or both
    # (0.5), so with 2000 resamples the 2.5 / 97.5 percentiles are 0 and 1.
    object_1 = series["object_1"]
    assert (object_1["accuracy_ci_low"][0], object_1["accuracy_ci_high"][0]) == wilson_interval(1, 2)
    assert (object_1["relative_accuracy_ci_low"][0], object_1["relative_accuracy_ci_high"][0]) == (0.0, 1.0)
    assert object_1["mean_target_prob_ci_low"][0] == pytest.approx(0.2)
    assert object_1["mean_target_prob_ci_high"][0] == pytest.approx(0.6)
    # One image in the second window: no bootstrap interval, but Wilson is defined.
    assert object_1["relative_accuracy_ci_low"][1] is None and object_1["mean_target_prob_ci_high"][1] is None
    assert (object_1["accuracy_ci_low"][1], object_1["accuracy_ci_high"][1]) == wilson_interval(1, 1)
    assert [
        (p["preset"], p["layer_start"], p["layer_end"], p["n"], p["relative_accuracy"]) for p in data["presets"]
    ] == [("all", 0, 3, 1, 0.0)]
    images = {row["image_id"]: row for row in data["images"]}
    assert images[1]["n_conditions"] == 4 and images[1]["share_correct"] == pytest.approx(0.5)
    assert images[1]["baseline_correct"] is True and images[1]["skipped_reason"] is None
    assert images[3]["skipped_reason"] == "baseline_incorrect" and images[3]["n_conditions"] == 0
    assert data["run"]["config"] == {"window": 2}
