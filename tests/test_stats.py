"""Intervals and lens hit rules: db.stats against brute force, the SQL views against db.stats."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from db.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_curve_ci, bootstrap_ratio_ci, wilson_interval
from db.store import ResultsDB

Z = 1.959963984540054


def _score_test_set(k: int, n: int) -> tuple[float, float]:
    """The Wilson interval by definition: every p the score test does not reject,
    (k/n - p)^2 <= z^2 p (1 - p) / n, found on a fine grid (independent of the closed form)."""
    p = np.linspace(0.0, 1.0, 2_000_001)
    accepted = p[(k / n - p) ** 2 <= Z * Z * p * (1 - p) / n]
    return float(accepted.min()), float(accepted.max())


@pytest.mark.parametrize(("k", "n"), [(0, 40), (1, 40), (20, 40), (40, 40), (7, 9), (355, 500)])
def test_wilson_interval_is_the_score_test_inversion(k: int, n: int) -> None:
    low, high = wilson_interval(k, n)
    ref_low, ref_high = _score_test_set(k, n)
    assert low == pytest.approx(ref_low, abs=2e-6) and high == pytest.approx(ref_high, abs=2e-6)
    assert low <= k / n <= high


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) is None
    assert wilson_interval(0, 40)[0] == 0.0 and wilson_interval(40, 40)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_bootstrap_ratio_interval() -> None:
    rng = np.random.default_rng(1)
    den = rng.integers(5, 30, size=50).astype(float)
    # Every image has the same ratio: every resample has it too.
    low, high = bootstrap_ratio_ci(0.3 * den, den)
    assert low == pytest.approx(0.3) and high == pytest.approx(0.3)
    # Ratios that vary: the interval holds the pooled estimate, narrows with more images,
    # and is reproducible for a seed.
    num = rng.binomial(den.astype(int), 0.4).astype(float)
    low, high = bootstrap_ratio_ci(num, den, seed=3)
    assert low < num.sum() / den.sum() < high
    assert (low, high) == bootstrap_ratio_ci(num, den, seed=3)
    many_den = np.tile(den, 16)
    many_num = rng.binomial(many_den.astype(int), 0.4).astype(float)
    many_low, many_high = bootstrap_ratio_ci(many_num, many_den, seed=3)
    assert many_high - many_low < (high - low) / 2
    # Per-layer curves: one interval per column.
    curves = bootstrap_ratio_ci(np.stack([num, 0.5 * den], axis=1), np.stack([den, den], axis=1))
    assert curves[0].shape == (2,) and curves[0][1] == pytest.approx(0.5)
    assert bootstrap_ratio_ci([1.0], [2.0]) is None


def test_bootstrap_equals_resampling_images_directly() -> None:
    """The per-image draw counts give the interval that summing the drawn rows gives (the
    plain definition), for the same draws: one block of resamples draws as one call does."""
    rng = np.random.default_rng(5)
    den = rng.integers(1, 20, size=(40, 3)).astype(float)
    num = rng.binomial(den.astype(int), [0.2, 0.5, 0.8]).astype(float)
    picks = np.random.default_rng(9).integers(0, 40, size=(500, 40))
    ratios = num[picks].sum(axis=1) / den[picks].sum(axis=1)
    expected = np.quantile(ratios, [0.025, 0.975], axis=0)
    low, high = bootstrap_ratio_ci(num, den, resamples=500, seed=9)
    np.testing.assert_allclose(low, expected[0], rtol=1e-12)
    np.testing.assert_allclose(high, expected[1], rtol=1e-12)


def test_bootstrap_curve_ci_points_without_two_images_have_no_interval() -> None:
    # Point 0: three images; point 1: one image has it (the others 0/0); point 2: nobody.
    num = np.array([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    den = np.array([[2.0, 2.0, 0.0], [2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    low, high = bootstrap_curve_ci(num, den)
    reference = bootstrap_ratio_ci(num[:, 0], den[:, 0], resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
    assert (low[0], high[0]) == (pytest.approx(reference[0]), pytest.approx(reference[1]))
    assert low[1:] == [None, None] and high[1:] == [None, None]
    assert bootstrap_curve_ci(num[:1], den[:1]) == ([None] * 3, [None] * 3)


def _ablation_rows(run_id: str, image_id: int, flipped: bool) -> pa.Table:
    return pa.table(
        {
            "run_id": [run_id, run_id],
            "image_id": pa.array([image_id] * 2, pa.int64()),
            "category": ["cat", "cat"],
            "condition": ["none", "object_1"],
            "setting": ["vqa", "vqa"],
            "positions": pa.array([[], [1, 2]], pa.list_(pa.int32())),
            "n_ablated": pa.array([0, 2], pa.int32()),
            "correct": [True, not flipped],
        }
    )


def _marker(run_id: str, image_id: int) -> pa.Table:
    return pa.table(
        {
            "run_id": [run_id],
            "image_id": pa.array([image_id], pa.int64()),
            "n_positions": [5],
            "grid_rows": [2],
            "grid_cols": [2],
            "written_at": [dt.datetime(2026, 1, 1)],
        }
    )


def test_summary_views_carry_wilson_intervals(tmp_path) -> None:
    with ResultsDB(tmp_path / "r.duckdb") as db:
        run = db.start_run("ablation", "m", {"m": 1}, {"m": 1})
        for image_id in range(9):
            db.add_image(image_id, f"{image_id}.jpg", 10, 10, "coco")
            db.write_image_results(
                run,
                image_id,
                {
                    "ablations": _ablation_rows(run, image_id, flipped=image_id < 7),
                    "run_images": _marker(run, image_id),
                },
            )
            blocking = pa.table(
                {
                    "run_id": [run] * 2,
                    "image_id": pa.array([image_id] * 2, pa.int64()),
                    "category": ["cat"] * 2,
                    "source": ["none", "object_1"],
                    "target": ["last", "last"],
                    "layer_start": pa.array([None, 0], pa.int32()),
                    "layer_end": pa.array([None, 3], pa.int32()),
                    "window_kind": ["baseline", "preset"],
                    "correct": [True, image_id % 3 == 0],
                }
            )
            db.duck.register("blocking_rows", blocking)
            db.duck.execute("INSERT INTO blocking BY NAME SELECT * FROM blocking_rows")
            db.duck.unregister("blocking_rows")
        ((n, flipped, low, high),) = db.sql(
            "SELECT n_baseline_correct, n_flipped, pct_flipped_ci_low, pct_flipped_ci_high "
            "FROM ablation_summary WHERE condition = 'object_1'"
        )
        ((n_block, acc, acc_low, acc_high),) = db.sql(
            "SELECT n, accuracy, accuracy_ci_low, accuracy_ci_high FROM blocking_curves WHERE source = 'object_1'"
        )
    expected = wilson_interval(7, 9)
    assert (n, flipped) == (9, 7)
    assert low == pytest.approx(100 * expected[0]) and high == pytest.approx(100 * expected[1])
    assert n_block == 9 and acc == pytest.approx(3 / 9)
    expected = wilson_interval(3, 9)
    assert acc_low == pytest.approx(expected[0]) and acc_high == pytest.approx(expected[1])


def test_lens_hit_rules(tmp_path) -> None:
    """'word' counts the whole name or one of its words, never a piece; 'first_token' counts
    exactly the class's first token id."""
    cells = [  # (position, token_id, token): position 0 is text, 1..4 are image patches
        (0, 10, "▁cat"),
        (1, 10, "▁cat"),
        (2, 11, "gir"),
        (3, 12, "ing"),
        (4, 13, "▁Table"),
    ]
    with ResultsDB(tmp_path / "r.duckdb") as db:
        db.add_image(
            1,
            "1.jpg",
            10,
            10,
            "coco",
            annotations=[
                {"id": i, "category_id": i, "category": name, "area": 1.0, "bbox": [0, 0, 1, 1], "segmentation": []}
                for i, name in enumerate(["cat", "giraffe", "dining table"], start=1)
            ],
        )
        run = db.start_run("lens", "m", {"m": 1}, {"m": 1})
        n = len(cells)
        db.write_image_results(
            run,
            1,
            {
                "positions": pa.table(
                    {
                        "run_id": [run] * n,
                        "image_id": pa.array([1] * n, pa.int64()),
                        "position": pa.array([c[0] for c in cells], pa.int32()),
                        "kind": ["text"] + ["image"] * (n - 1),
                        "label": ["t"] * n,
                        "patch_row": pa.array([None, 0, 0, 1, 1], pa.int16()),
                        "patch_col": pa.array([None, 0, 1, 0, 1], pa.int16()),
                        "token_id": pa.array([5, 0, 0, 0, 0], pa.int32()),
                    }
                ),
                "logit_lens": pa.table(
                    {
                        "run_id": [run] * n,
                        "image_id": pa.array([1] * n, pa.int64()),
                        "layer": pa.array([0] * n, pa.int16()),
                        "position": pa.array([c[0] for c in cells], pa.int32()),
                        "rank": pa.array([1] * n, pa.int16()),
                        "token_id": pa.array([c[1] for c in cells], pa.int32()),
                        "token": [c[2] for c in cells],
                        "prob": [0.5] * n,
                    }
                ),
                "class_tokens": pa.table(
                    {
                        "run_id": [run] * 3,
                        "image_id": pa.array([1] * 3, pa.int64()),
                        "category": ["cat", "giraffe", "dining table"],
                        "token_id": pa.array([10, 11, 14], pa.int64()),
                    }
                ),
                "run_images": _marker(run, 1),
            },
        )
        hits = set(db.sql("SELECT rule, position, category FROM lens_object_hits"))
    assert hits == {
        ("word", 1, "cat"),
        ("word", 4, "dining table"),
        ("first_token", 1, "cat"),
        ("first_token", 2, "giraffe"),
    }


def test_first_token_rule_on_a_real_collection(tmp_path, loaded_models) -> None:
    """The lens collector writes each annotated category's first token in the real LLaVA-1.5
    tokenizer (" cat" in context is 6635, not the bare '▁' 29871), and the 'first_token' rule
    counts exactly the image-position lens cells with that id (an independent SQL count)."""
    from collector.images import folder_images
    from collector.lens.experiment import collect_lens
    from tests.conftest import COCO_SAMPLE, require_shared

    if "llava-1.5-real-config" not in loaded_models:
        pytest.skip("needs ../shared/data/real_configs (the real LLaVA-1.5 tokenizer)")
    records = folder_images(require_shared(COCO_SAMPLE / "images"), COCO_SAMPLE / "instances_sample.json")
    with ResultsDB(tmp_path / "r.duckdb") as db:
        summary = collect_lens(loaded_models["llava-1.5-real-config"], records, db, top_k=50, progress=False)
        tokens = dict(db.sql("SELECT category, token_id FROM class_tokens WHERE run_id = ?", (summary.run_id,)))
        assert tokens["cat"] == 6635 and set(tokens) == set(records[0].categories)
        expected = db.sql(
            """
            SELECT k.category, count(DISTINCT (l.layer, l.position)) FROM logit_lens l
            JOIN positions p USING (run_id, image_id, position)
            JOIN class_tokens k ON k.run_id = l.run_id AND k.image_id = l.image_id AND k.token_id = l.token_id
            WHERE p.kind = 'image' GROUP BY ALL ORDER BY 1
            """
        )
        got = db.sql(
            "SELECT category, count(*) FROM lens_object_hits WHERE rule = 'first_token' GROUP BY ALL ORDER BY 1"
        )
    assert expected and got == expected  # random weights still put class ids in some top-50s
