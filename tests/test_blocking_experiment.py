"""Blocking experiments: windows, position sets, answer tokens, batching, skips, the curves view."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from collector.adapters import ImageTokenLayout
from collector.blocking.experiment import (
    baseline_forward,
    collect_blocking,
    conditions_for,
    predict_blocked,
    preset_windows,
    run_conditions,
    scale_window,
    sliding_windows,
    source_sets,
    target_sets,
)
from collector.blocking.mechanism import NO_BLOCK, block_attention
from collector.images import folder_images
from collector.vqa import class_first_token, vqa_prompt
from db.store import ResultsDB


def _windows(windows):
    return {w.preset: (w.start, w.end) for w in windows}


def test_presets_scale_to_the_depth():
    assert _windows(preset_windows(32)) == {
        "early": (0, 9),
        "early_mid": (5, 14),
        "mid": (11, 20),
        "mid_late": (15, 24),
        "late": (21, 31),
        "all": (0, 31),
    }
    # 4 layers: start' = round(start*4/32), end' = round((end+1)*4/32) - 1, half up, never empty
    assert _windows(preset_windows(4)) == {
        "early": (0, 0),
        "early_mid": (1, 1),
        "mid": (1, 2),
        "mid_late": (2, 2),
        "late": (3, 3),
        "all": (0, 3),
    }
    assert _windows(preset_windows(40)) == {
        "early": (0, 12),
        "early_mid": (6, 18),
        "mid": (14, 25),
        "mid_late": (19, 30),
        "late": (26, 39),
        "all": (0, 39),
    }
    assert _windows(preset_windows(1)) == {name: (0, 0) for name in _windows(preset_windows(32))}
    assert scale_window(0, 31, 3) == (0, 2)
    with pytest.raises(ValueError):
        scale_window(5, 32, 4)


def test_sliding_windows_start_at_every_layer():
    windows = sliding_windows(32, 9)
    assert [(w.start, w.end) for w in windows[:2]] == [(0, 8), (1, 9)]
    assert [(w.start, w.end) for w in windows[-2:]] == [(30, 31), (31, 31)]
    assert len(windows) == 32 and {w.kind for w in windows} == {"sliding"}
    assert [(w.start, w.end) for w in sliding_windows(4, 9)] == [(0, 3), (1, 3), (2, 3), (3, 3)]


def _layout(rows=4, cols=5, first=3) -> ImageTokenLayout:
    flat = torch.arange(rows * cols)
    return ImageTokenLayout(first + flat, flat // cols, flat % cols, rows, cols)


def test_position_sets():
    layout = _layout()
    cells = np.zeros((4, 5), dtype=bool)
    cells[1, 1] = True
    sources = source_sets(cells, layout)
    image = set(range(3, 23))
    pos = lambda r, c: 3 + r * 5 + c  # noqa: E731
    assert sources["object_0"] == [pos(1, 1)]
    assert set(sources["object_1"]) == {pos(r, c) for r in (0, 1, 2) for c in (0, 1, 2)}
    assert set(sources["object_2"]) == {pos(r, c) for r in range(4) for c in range(4)}
    assert set(sources["image_minus_object_1"]) == image - set(sources["object_1"])
    assert set(sources["image_minus_last_row"]) == {pos(r, c) for r in range(3) for c in range(5)}
    targets = target_sets(layout, n_positions=30)
    assert targets == {"last": [29], "last_row": [pos(3, c) for c in range(5)]}
    conditions = conditions_for(sources, targets, sliding_windows(2, 1))
    assert len(conditions) == 5 * 2 * 2
    assert conditions[0].block.targets == (29,) and conditions[0].block.layers == frozenset({0})


def test_class_token_is_the_first_token_the_answer_adds(loaded_models):
    tiny = loaded_models["llava-1.5"].adapter
    prompt = vqa_prompt(tiny, "What is it?")
    assert prompt.endswith("ASSISTANT: It is a")
    token = class_first_token(tiny.tokenizer, prompt, "circle")
    assert tiny.tokenizer.convert_ids_to_tokens(token) == "▁circle"
    assert class_first_token(tiny.tokenizer, prompt, "ñandú") is None  # unknown characters
    if "llava-1.5-real-config" in loaded_models:
        real = loaded_models["llava-1.5-real-config"].adapter.tokenizer
        # " cat" alone tokenizes to ['▁', '▁cat'] here; the model predicts '▁cat' (6635) after "It is a".
        assert real(" cat", add_special_tokens=False)["input_ids"][0] == 29871
        assert class_first_token(real, prompt, "cat") == 6635
        assert real.convert_ids_to_tokens(class_first_token(real, prompt, "traffic light")) == "▁traffic"


def _prepared(loaded, question="What is the shape?"):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (336, 448, 3), dtype=np.uint8))
    adapter = loaded.adapter
    inputs = adapter.build_inputs_for_text(image, vqa_prompt(adapter, question))
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    cells = np.zeros((layout.grid_rows, layout.grid_cols), dtype=bool)
    cells[10:14, 8:12] = True
    return inputs, layout, cells


def test_batched_conditions_equal_one_at_a_time_and_the_full_model(loaded):
    adapter = loaded.adapter
    inputs, layout, cells = _prepared(loaded)
    n_positions = inputs["input_ids"].shape[1]
    class_token = class_first_token(adapter.tokenizer, vqa_prompt(adapter, "What is the shape?"), "circle")
    decoder_inputs, baseline = baseline_forward(loaded, inputs, class_token)
    windows = preset_windows(adapter.n_layers) + sliding_windows(adapter.n_layers, 2)
    conditions = conditions_for(source_sets(cells, layout), target_sets(layout, n_positions), windows)
    blocks = [c.block for c in conditions][::12] + [NO_BLOCK]
    batched = run_conditions(loaded, decoder_inputs, blocks, class_token, batch_size=5)
    for block, prediction in zip(blocks, batched):
        alone = predict_blocked(loaded, decoder_inputs, [block], class_token)[0]
        assert alone.token_id == prediction.token_id
        assert alone.prob == pytest.approx(prediction.prob, abs=1e-6)
        assert alone.target_prob == pytest.approx(prediction.target_prob, abs=1e-6)
    # Blocking nothing through the language model alone is the baseline of the full model.
    assert batched[-1].token_id == baseline.token_id
    assert batched[-1].target_prob == pytest.approx(baseline.target_prob, abs=1e-6)
    # The language-model-only path equals the full model (vision tower included) under the same block.
    strongest = conditions_for(
        {"image_minus_last_row": source_sets(cells, layout)["image_minus_last_row"]},
        {"last": [n_positions - 1]},
        preset_windows(adapter.n_layers)[-1:],
    )[0].block
    with torch.no_grad(), block_attention(adapter, [strongest]):
        full = loaded.model(**inputs, use_cache=False, logits_to_keep=1).logits[0, -1]
    probs = torch.softmax(full.float(), -1)
    via_decoder = predict_blocked(loaded, decoder_inputs, [strongest], class_token)[0]
    assert via_decoder.token_id == int(probs.argmax())
    assert via_decoder.target_prob == pytest.approx(float(probs[class_token]), abs=1e-6)
    assert abs(via_decoder.target_prob - baseline.target_prob) > 1e-7  # the block changed the answer distribution


def _skip_fixture(tmp_path, demo_images):
    """Five images, one per skip reason: 1 no question, 2 empty list, 3 cut away, 4 unknown class, 5 asked."""
    folder, annotation_file = demo_images
    images = tmp_path / "images"
    images.mkdir()
    data = json.loads(annotation_file.read_text())
    for image in data["images"]:
        shutil.copy(folder / image["file_name"], images / image["file_name"])
    shutil.copy(folder / "demo_001.png", images / "demo_005.png")
    data["images"].append({"id": 5, "file_name": "demo_005.png", "width": 640, "height": 480})
    data["categories"].append({"id": 4, "name": "ñandú"})
    kept_annotations = []
    for ann in data["annotations"]:
        if ann["image_id"] == 3 and ann["category_id"] == 3:
            continue  # image 3 keeps only its circle
        kept_annotations.append(ann)
    data["annotations"] = kept_annotations
    next_id = max(a["id"] for a in kept_annotations) + 1
    # image 3 (500x500, centre crop 336 of 336): a square in the left 60 px... still visible; use
    # image 4 (800x400 -> 672x336, crop cuts 168 px each side = 200 original px): a square at x < 150.
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 4]
    data["annotations"].append(
        {
            "id": next_id,
            "image_id": 4,
            "category_id": 2,
            "segmentation": [[20, 150, 120, 150, 120, 250, 20, 250]],
            "area": 10000.0,
            "bbox": [20, 150, 100, 100],
            "iscrowd": 0,
        }
    )
    for ann in data["annotations"]:
        if ann["image_id"] == 2:
            ann["category_id"] = 4
    for ann in [a for a in data["annotations"] if a["image_id"] == 1]:
        data["annotations"].append({**ann, "id": next_id + 1 + ann["id"], "image_id": 5})
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(data))
    questions = {"2": ["What is this?"], "3": [], "4": ["What is this?"], "5": ["What is the shape?"]}
    return images, annotations, questions


def test_skips_are_recorded_with_reasons_and_runs_resume(tmp_path, demo_images, loaded_models):
    loaded = loaded_models["llava-1.5"]
    images, annotations, questions = _skip_fixture(tmp_path, demo_images)
    records = folder_images(images, annotations)
    with ResultsDB(tmp_path / "r.duckdb") as db:
        summary = collect_blocking(
            loaded,
            records,
            db,
            annotations,
            questions,
            area_range=(4000, 12000),
            progress=False,
            sources=("object_0",),
            targets=("last",),
            window=2,
        )
        assert summary.images_selected == 5 and summary.images_written == 5
        reasons = dict(db.sql("SELECT image_id, reason FROM skipped WHERE run_id = ? ORDER BY 1", [summary.run_id]))
        assert reasons[1] == "no_question"
        assert reasons[2] == "class_token_unknown"
        assert reasons[3] == "empty_question_list"
        assert reasons[4] == "object_outside_view"
        # The random model names no shape: with curation image 5 stops at its baseline.
        assert reasons[5] == "baseline_incorrect"
        rows = db.sql(
            "SELECT image_id, window_kind, source, target, correct FROM blocking WHERE run_id = ?", [summary.run_id]
        )
        assert rows == [(5, "baseline", "none", "none", False)]
        assert db.completed_images(summary.run_id) == {1, 2, 3, 4, 5}
        assert (
            db.sql("SELECT count(*) FROM image_views WHERE run_id = ?", [summary.run_id])[0][0] == 3
        )  # 2, 4, 5 ran the processor with a question

        again = collect_blocking(
            loaded,
            records,
            db,
            annotations,
            questions,
            area_range=(4000, 12000),
            progress=False,
            sources=("object_0",),
            targets=("last",),
            window=2,
        )
        assert again.run_id == summary.run_id and again.images_written == 0 and again.images_already_complete == 5

        uncurated = collect_blocking(
            loaded,
            records,
            db,
            annotations,
            questions,
            area_range=(4000, 12000),
            progress=False,
            curate=False,
            sources=("object_0", "image_minus_last_row"),
            targets=("last",),
            window=2,
        )
        assert uncurated.run_id != summary.run_id and uncurated.images_kept == 1
        counts = dict(
            db.sql(
                "SELECT window_kind, count(*) FROM blocking WHERE run_id = ? AND image_id = 5 GROUP BY 1",
                [uncurated.run_id],
            )
        )
        assert counts == {"baseline": 1, "preset": 2 * 6, "sliding": 2 * 4}
        config = db.runs("blocking")[-1]["config"]
        assert config["window"] == 2 and config["presets"]["mid"] == [1, 2] and config["curate"] is False


def test_blocking_curves_view_matches_a_hand_computation(tmp_path):
    with ResultsDB(tmp_path / "v.duckdb") as db:

        def add(image_id, window_kind, source, correct, prob, start=None, end=None, preset=None, run="r1"):
            db.sql(
                "INSERT INTO blocking (run_id, image_id, category, source, target, layer_start, layer_end, "
                "window_kind, preset, correct, target_prob) VALUES (?, ?, 'cat', ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run,
                    image_id,
                    source,
                    "none" if window_kind == "baseline" else "last",
                    start,
                    end,
                    window_kind,
                    preset,
                    correct,
                    prob,
                ],
            )

        # baselines: images 1, 2 correct, 3 wrong; image 4 has no baseline and must not count
        add(1, "baseline", "none", True, 0.9)
        add(2, "baseline", "none", True, 0.8)
        add(3, "baseline", "none", False, 0.1)
        add(1, "sliding", "object_1", True, 0.6, 0, 8)
        add(2, "sliding", "object_1", False, 0.2, 0, 8)
        add(3, "sliding", "object_1", False, 0.1, 0, 8)
        add(4, "sliding", "object_1", True, 0.99, 0, 8)
        add(1, "preset", "object_1", False, 0.3, 0, 9, "early")
        add(2, "preset", "object_1", False, 0.1, 0, 9, "early")
        add(1, "sliding", "object_1", True, 0.5, 0, 8, run="r2")  # another run, own baseline missing
        rows = db.sql(
            "SELECT run_id, source, target, layer_start, layer_end, window_kind, preset, n, accuracy, "
            "mean_target_prob, relative_accuracy FROM blocking_curves ORDER BY run_id, window_kind, layer_end"
        )
    by_kind = {row[5]: row for row in rows}
    assert len(rows) == 3  # r2 has no baseline rows
    # sliding 0-8 over images 1-3: accuracy 1/3, baseline accuracy on those images 2/3 -> 0.5
    assert by_kind["sliding"][1:8] == ("object_1", "last", 0, 8, "sliding", None, 3)
    assert by_kind["sliding"][8] == pytest.approx(1 / 3)
    assert by_kind["sliding"][9] == pytest.approx((0.6 + 0.2 + 0.1) / 3)
    assert by_kind["sliding"][10] == pytest.approx((1 / 3) / (2 / 3))
    # preset over images 1, 2 (both baseline-correct): accuracy 0 -> relative 0
    assert by_kind["preset"][6:] == ("early", 2, 0.0, pytest.approx(0.2), 0.0)
    # baseline rows: accuracy 2/3, relative 1
    assert by_kind["baseline"][7:] == (3, pytest.approx(2 / 3), pytest.approx(0.6), pytest.approx(1.0))
