"""The ablation experiment end to end on the tiny model: rows, skips, curation, resume, the view."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

import collector.ablation.experiment as experiment
from collector.ablation.experiment import AblationOptions, collect_ablation
from collector.ablation.replacement import load_replacement
from collector.ablation.settings import mentions_class, says_yes
from collector.errors import UserError
from collector.images import folder_images
from db.store import ResultsDB

FAST = dict(k_values=(5, 40), ig_steps=2, max_new_tokens=4, area_range=(4000.0, 12000.0), batch_size=32)
CONDITIONS = {
    "none",
    "object_0",
    "object_1",
    "object_2",
    "register",
    "random_5",
    "random_40",
    "gradient_5",
    "gradient_40",
    "image_noise",
}


def test_summary_view_matches_a_hand_computation(tmp_path):
    # (image, condition, setting, n_ablated, correct)
    rows = [
        (1, "none", "generative", 0, True),
        (1, "object_0", "generative", 10, False),
        (1, "random_5", "generative", 5, True),
        (2, "none", "generative", 0, True),
        (2, "object_0", "generative", 20, True),
        (2, "random_5", "generative", 5, False),
        (3, "none", "generative", 0, False),
        (3, "object_0", "generative", 99, False),
        (3, "random_5", "generative", 5, True),
        (1, "none", "polling", 0, False),
        (1, "object_0", "polling", 10, False),
        (2, "none", "polling", 0, True),
        (2, "object_0", "polling", 20, False),
    ]
    table = pa.table(
        {
            "run_id": ["r"] * len(rows),
            "image_id": [r[0] for r in rows],
            "category": ["cat"] * len(rows),
            "condition": [r[1] for r in rows],
            "setting": [r[2] for r in rows],
            "positions": pa.array([list(range(r[3])) for r in rows], pa.list_(pa.int32())),
            "n_ablated": pa.array([r[3] for r in rows], pa.int32()),
            "correct": [r[4] for r in rows],
        }
    )
    with ResultsDB(tmp_path / "r.duckdb") as db:
        db.duck.register("incoming", table)
        db.duck.execute("INSERT INTO ablations BY NAME SELECT * FROM incoming")
        got = db.sql(
            "SELECT setting, condition, n_baseline_correct, n_flipped, pct_flipped, mean_tokens_ablated "
            "FROM ablation_summary ORDER BY setting, condition"
        )
    # generative: baseline-correct images 1, 2 (3 is excluded everywhere)
    assert got == [
        ("generative", "none", 2, 0, 0.0, 0.0),
        ("generative", "object_0", 2, 1, 50.0, 15.0),
        ("generative", "random_5", 2, 1, 50.0, 5.0),
        ("polling", "none", 1, 0, 0.0, 0.0),
        ("polling", "object_0", 1, 1, 100.0, 20.0),
    ]


def _records(demo_images):
    image_dir, annotation_file = demo_images
    return folder_images(image_dir, annotation_file), annotation_file


def _ablation_rows(db):
    return db.sql(
        "SELECT image_id, category, condition, setting, positions, n_ablated, correct, answer, question, "
        "predicted_token, round(predicted_prob, 6), target_token, round(target_prob, 6), seed "
        "FROM ablations ORDER BY ALL"
    )


def test_rows_of_an_uncurated_run(tmp_path, loaded_models, demo_images):
    loaded = loaded_models["llava-1.5"]
    records, annotation_file = _records(demo_images)
    questions = {r.image_id: ["What is the shape?"] for r in records}
    options = AblationOptions(settings=("generative", "polling", "vqa"), questions=questions, curate=False, **FAST)
    zero = load_replacement("zero", 64)
    with ResultsDB(tmp_path / "r.duckdb") as db:
        summary = collect_ablation(loaded, records, db, annotation_file, options, zero, limit=2, progress=False)
        # areas 4000..12000 select demo images 1 (circle), 2 (triangle), 3 (circle); 4's square is too big
        assert (summary.images_selected, summary.images_kept, summary.images_skipped) == (3, 2, 0)
        rows = _ablation_rows(db)
        run = db.runs("ablation")[0]
        first_image = db.sql("SELECT min(position) FROM positions WHERE kind = 'image' AND image_id = 1")[0][0]
        n_image_positions = db.sql("SELECT count(*) FROM positions WHERE kind = 'image' AND image_id = 1")[0][0]
        assert db.sql("SELECT count(*) FROM image_views")[0][0] == 2
        assert db.completed_images(summary.run_id) == {1, 2}
    assert run["status"] == "complete"
    assert run["config"]["replacement_sha256"] == zero.sha256 and run["config"]["ig_steps"] == 2
    assert n_image_positions == 576
    assert {(r[0], r[1]) for r in rows} == {(1, "circle"), (2, "triangle")}
    assert len(rows) == 2 * 3 * len(CONDITIONS)
    assert {r[2] for r in rows} == CONDITIONS
    for (
        _image_id,
        category,
        condition,
        setting,
        positions,
        n_ablated,
        correct,
        answer,
        question,
        predicted_token,
        predicted_prob,
        target_token,
        target_prob,
        seed,
    ) in rows:
        assert n_ablated == len(positions) == len(set(positions))
        assert all(first_image <= p < first_image + 576 for p in positions)
        if condition in ("none", "image_noise"):
            assert positions == []
        if condition.startswith(("random_", "gradient_")):
            assert n_ablated == int(condition.split("_")[1])
        assert (seed is not None) == (condition.startswith("random_") or condition == "image_noise")
        if setting == "generative":
            assert correct == mentions_class(answer, category) and question == "Describe this image."
        elif setting == "polling":
            assert correct == says_yes(answer) and question == f"Is there a {category} in this image?"
        else:
            assert answer is None and question == "What is the shape?"
            assert 0 <= target_prob <= 1 and 0 < predicted_prob <= 1
            assert target_token.strip() == category
            assert correct == (predicted_token == target_token)
    object_sets = {r[2]: set(r[4]) for r in rows if r[0] == 1 and r[3] == "polling" and r[2].startswith("object")}
    assert object_sets["object_0"] < object_sets["object_1"] < object_sets["object_2"]


class _StopAfter:
    def __init__(self, n):
        self.n = n

    def __call__(self, *args, **kwargs):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_resume_and_limit_counts_kept_images(tmp_path, loaded_models, demo_images, monkeypatch):
    loaded = loaded_models["llava-phi"]
    records, annotation_file = _records(demo_images)
    records = records[:2]  # demo images 1 and 2 are selected
    options = AblationOptions(settings=("polling",), curate=False, **{**FAST, "k_values": (5,)})
    zero = load_replacement("zero", 64)
    with ResultsDB(tmp_path / "straight.duckdb") as db:
        collect_ablation(loaded, records, db, annotation_file, options, zero, progress=False)
        expected = _ablation_rows(db)

    stop = _StopAfter(1)
    stop.real = experiment.ablate_one_image
    monkeypatch.setattr(experiment, "ablate_one_image", stop)
    path = tmp_path / "resumed.duckdb"
    with ResultsDB(path) as db:
        with pytest.raises(KeyboardInterrupt):
            collect_ablation(loaded, records, db, annotation_file, options, zero, progress=False)
        assert db.runs()[0]["status"] == "interrupted"
    monkeypatch.setattr(experiment, "ablate_one_image", stop.real)
    with ResultsDB(path) as db:
        summary = collect_ablation(loaded, records, db, annotation_file, options, zero, limit=1, progress=False)
        assert summary.images_kept == 0  # the one kept image already fills --limit 1
        summary = collect_ablation(loaded, records, db, annotation_file, options, zero, limit=2, progress=False)
        assert (summary.images_already_complete, summary.images_kept) == (1, 1)
        assert db.completed_images(summary.run_id) == {1, 2}
        assert _ablation_rows(db) == expected
        summary = collect_ablation(loaded, records, db, annotation_file, options, zero, progress=False)
        assert summary.images_kept == 0 and _ablation_rows(db) == expected


def test_curation_skips_are_recorded_and_resumed(tmp_path, loaded_models, demo_images, monkeypatch):
    loaded = loaded_models["llava-1.5"]
    records, annotation_file = _records(demo_images)
    options = AblationOptions(settings=("generative",), curate=True, **FAST)
    zero = load_replacement("zero", 64)
    # Scripted curation judgements (the tiny model never names a class): image 1's
    # description misses it; image 2's names it even under noise; image 3 is kept.
    script = {1: (False, False), 2: (True, True), 3: (True, False)}
    state = {"image": None, "calls": 0}
    real_judge, real_one = experiment.mentions_class, experiment.ablate_one_image

    def one(loaded, run_id, record, *args, **kwargs):
        state.update(image=record.image_id, calls=0)
        return real_one(loaded, run_id, record, *args, **kwargs)

    def judge(text, name):
        state["calls"] += 1
        return script[state["image"]][state["calls"] - 1] if state["calls"] <= 2 else real_judge(text, name)

    monkeypatch.setattr(experiment, "ablate_one_image", one)
    monkeypatch.setattr(experiment, "mentions_class", judge)
    with ResultsDB(tmp_path / "r.duckdb") as db:
        summary = collect_ablation(loaded, records, db, annotation_file, options, zero, limit=1, progress=False)
        assert summary.skip_reasons == {"baseline_incorrect": 1, "noise_still_correct": 1}
        assert summary.images_kept == 1
        skipped = db.sql("SELECT image_id, reason, detail FROM skipped ORDER BY image_id")
        assert [(s[0], s[1]) for s in skipped] == [(1, "baseline_incorrect"), (2, "noise_still_correct")]
        assert "does not name 'circle'" in skipped[0][2]
        assert db.completed_images(summary.run_id) == {1, 2, 3}
        assert {r[0] for r in db.sql("SELECT image_id FROM ablations")} == {3}
        monkeypatch.setattr(experiment, "mentions_class", real_judge)
        again = collect_ablation(loaded, records, db, annotation_file, options, zero, limit=1, progress=False)
        assert (again.images_kept, again.images_skipped, again.images_already_complete) == (0, 0, 3)


def _write_case(tmp_path):
    """A grayscale image, an object cut away by the centre crop, an unknown class word."""
    folder = tmp_path / "case"
    folder.mkdir()
    square = lambda x, y, s: [[x, y, x + s, y, x + s, y + s, x, y + s]]  # noqa: E731
    gray = Image.new("L", (640, 480), 90)
    ImageDraw.Draw(gray).rectangle([300, 200, 360, 260], fill=250)
    gray.save(folder / "gray.png")
    Image.new("RGB", (800, 400), (200, 200, 200)).save(folder / "cropped.png")
    Image.new("RGB", (640, 480), (20, 200, 20)).save(folder / "unknown.png")
    data = {
        "images": [
            {"id": 1, "file_name": "gray.png", "width": 640, "height": 480},
            {"id": 2, "file_name": "cropped.png", "width": 800, "height": 400},
            {"id": 3, "file_name": "unknown.png", "width": 640, "height": 480},
        ],
        "annotations": [
            {
                "id": 11,
                "image_id": 1,
                "category_id": 1,
                "segmentation": square(300, 200, 60),
                "area": 3600,
                "bbox": [300, 200, 60, 60],
                "iscrowd": 0,
            },
            # the view keeps original x in [200, 600): this square at x 20..80 is cropped away
            {
                "id": 21,
                "image_id": 2,
                "category_id": 1,
                "segmentation": square(20, 100, 60),
                "area": 3600,
                "bbox": [20, 100, 60, 60],
                "iscrowd": 0,
            },
            {
                "id": 31,
                "image_id": 3,
                "category_id": 2,
                "segmentation": square(300, 200, 60),
                "area": 3600,
                "bbox": [300, 200, 60, 60],
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "éclair"}],
    }
    (folder / "ann.json").write_text(json.dumps(data))
    return folder, folder / "ann.json"


def test_grayscale_cropped_and_unknown_class_are_recorded_skips(tmp_path, loaded_models):
    loaded = loaded_models["llava-1.5"]
    folder, annotation_file = _write_case(tmp_path)
    records = folder_images(folder, annotation_file)
    options = AblationOptions(
        settings=("vqa",),
        questions={1: ["q?"], 2: ["q?"], 3: ["What is it?"]},
        curate=False,
        **{**FAST, "area_range": (3000.0, 4000.0)},
    )
    with ResultsDB(tmp_path / "r.duckdb") as db:
        summary = collect_ablation(
            loaded, records, db, annotation_file, options, load_replacement("zero", 64), progress=False
        )
        skipped = db.sql("SELECT image_id, reason FROM skipped ORDER BY image_id")
        assert db.completed_images(summary.run_id) == {1, 2, 3}
    # one code for "the object is cut away" in every experiment (ablation wrote 'object_cropped' before)
    assert skipped == [(1, "grayscale"), (2, "object_outside_view"), (3, "class_token_unknown")]
    assert summary.images_kept == 0


def test_bad_options_are_user_errors(loaded_models):
    with pytest.raises(UserError, match="needs --questions"):
        AblationOptions(settings=("vqa",))
    with pytest.raises(UserError, match="unknown setting"):
        AblationOptions(settings=("captioning",))
    with pytest.raises(UserError, match="MIN < MAX"):
        AblationOptions(area_range=(5.0, 1.0))
