"""Report data of an ablation run, from synthetic rows (no model)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from db.store import ResultsDB
from report.pages.ablation import ablation_page_data, condition_sort_key


def _insert(db, name, columns):
    db.duck.register("incoming", pa.table(columns))
    db.duck.execute(f"INSERT INTO {name} BY NAME SELECT * FROM incoming")
    db.duck.unregister("incoming")


def test_page_data(tmp_path):
    with ResultsDB(tmp_path / "r.duckdb") as db:
        run_id = db.start_run("ablation", "m", {"x": 1}, {"seed": 0})
        db.add_image(7, "a.png", 640, 480, "folder:x")
        rows = [("none", 0, True), ("object_0", 2, False), ("random_10", 1, True), ("gradient_5", 1, False)]
        _insert(
            db,
            "ablations",
            {
                "run_id": [run_id] * 4,
                "image_id": [7] * 4,
                "category": ["cat"] * 4,
                "condition": [r[0] for r in rows],
                "setting": ["generative"] * 4,
                "positions": pa.array([[], [5, 6], [30], [6]], pa.list_(pa.int32())),
                "n_ablated": pa.array([r[1] for r in rows], pa.int32()),
                "correct": [r[2] for r in rows],
                "answer": ["a cat", "a dog", "cats", "nothing"],
            },
        )
        _insert(
            db,
            "positions",
            {
                "run_id": [run_id] * 3,
                "image_id": [7] * 3,
                "position": pa.array([5, 6, 30], pa.int32()),
                "kind": ["image"] * 3,
                "patch_row": pa.array([0, 0, 1], pa.int32()),
                "patch_col": pa.array([0, 1, 1], pa.int32()),
                "label": ["<IMG001>", "<IMG002>", "<IMG026>"],
                "token_id": pa.array([9, 9, 9], pa.int32()),
            },
        )
        _insert(db, "skipped", {"run_id": [run_id], "image_id": [8], "reason": ["grayscale"], "detail": ["gray"]})
        data = ablation_page_data(db, run_id)
        lens_run = db.start_run("lens", "m", {"y": 1}, {})
        with pytest.raises(ValueError, match="not an ablation run"):
            ablation_page_data(db, lens_run)
    assert data["run"]["config"] == {"seed": 0}
    summary = {(s["setting"], s["condition"]): s for s in data["summary"]}
    assert [s["condition"] for s in data["summary"]] == ["none", "object_0", "random_10", "gradient_5"]
    assert summary[("generative", "object_0")]["pct_flipped"] == 100.0
    assert summary[("generative", "random_10")]["n_flipped"] == 0
    [image] = data["images"]
    assert image["image_id"] == 7 and image["file_name"] == "a.png" and image["category"] == "cat"
    object_0 = [c for c in image["conditions"] if c["condition"] == "object_0"][0]
    assert object_0["positions"] == [5, 6] and object_0["cells"] == [[0, 0], [0, 1]] and object_0["answer"] == "a dog"
    assert data["skipped"] == [{"image_id": 8, "reason": "grayscale", "detail": "gray"}]
    assert data["skip_counts"] == {"grayscale": 1}


def test_condition_order():
    names = [
        "image_noise",
        "gradient_100",
        "random_5",
        "none",
        "gradient_5",
        "register",
        "object_2",
        "object_0",
        "random_40",
        "zzz",
    ]
    assert sorted(names, key=condition_sort_key) == [
        "none",
        "object_0",
        "object_2",
        "register",
        "random_5",
        "random_40",
        "gradient_5",
        "gradient_100",
        "image_noise",
        "zzz",
    ]
