"""Scoring (class-name matcher, yes detector) and batched runs equal to one-at-a-time runs."""

from __future__ import annotations

import pytest
import torch

from collector.ablation.settings import (
    Condition,
    generate_answers,
    mentions_class,
    next_token_predictions,
    says_yes,
    word_forms,
)
from collector.ablation.token_sets import noised_pixel_values
from collector.images import folder_images


@pytest.mark.parametrize(
    "text, name",
    [
        ("A red car parked.", "car"),
        ("Two CARS on a road", "car"),
        ("a city bus", "bus"),
        ("several buses", "bus"),
        ("a knife and two knives", "knife"),
        ("three knives", "knife"),
        ("people walking", "person"),
        ("a person.", "person"),
        ("two mice on a desk", "mouse"),
        ("a computer mouse", "mouse"),
        ("sheep grazing", "sheep"),
        ("the traffic light is red", "traffic light"),
        ("Traffic lights at a crossing", "traffic light"),
        ("a traffic\nlight", "traffic light"),
        ("a hot dog with mustard", "hot dog"),
        ("hot-dogs", "hot dog"),
        ("a teddy bear", "teddy bear"),
        ("two teddy bears", "teddy bear"),
        ("wine glasses on a table", "wine glass"),
        ("a pair of scissors", "scissors"),
        ("a pair of skis", "skis"),
        ("two benches", "bench"),
        ("cherries and a cherry", "cherry"),
        ("(cat)", "cat"),
        ("cat's tail", "cat"),
        ("a TV", "tv"),
        ("a dining table", "dining table"),
    ],
)
def test_names_the_class(text, name):
    assert mentions_class(text, name)


@pytest.mark.parametrize(
    "text, name",
    [
        ("a carrot", "car"),
        ("a sidecar", "car"),
        ("a scar", "car"),
        ("a catalog", "cat"),
        ("concatenate", "cat"),
        ("the light is green", "traffic light"),
        ("heavy traffic", "traffic light"),
        ("a hot day with a dog", "hot dog"),
        ("a bear", "teddy bear"),
        ("a busy street", "bus"),
        ("a personal computer", "person"),
        ("a table", "dining table"),
        ("a mousepad", "mouse"),
        ("", "cat"),
    ],
)
def test_does_not_name_the_class(text, name):
    assert not mentions_class(text, name)


def test_plural_forms():
    assert set(word_forms("person")) >= {"person", "people"}
    assert "mice" in word_forms("mouse") and "mouses" not in word_forms("mouse")
    assert "knives" in word_forms("knife")
    assert "buses" in word_forms("bus")
    assert "traffic lights" in word_forms("traffic light")
    assert "sports balls" in word_forms("sports ball")


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes", True),
        ("Yes, there is a cat.", True),
        (" yes.", True),
        ("YES", True),
        ('"Yes"', True),
        ("No", False),
        ("No, yes it is not", False),
        ("Yesterday", False),
        ("There is no cat", False),
        ("", False),
    ],
)
def test_says_yes(answer, expected):
    assert says_yes(answer) is expected


def _conditions(loaded, inputs, cells_row=5):
    layout = loaded.adapter.image_token_layout(inputs["input_ids"][0], inputs)
    positions = layout.positions.tolist()
    import numpy as np

    cells = np.zeros((24, 24), dtype=bool)
    cells[cells_row : cells_row + 4, 6:12] = True
    return [
        Condition("none", ()),
        Condition("first_100", tuple(positions[:100])),
        Condition("all", tuple(positions)),
        Condition("image_noise", (), noised_pixel_values(inputs["pixel_values"][0], cells, 1.0, 0, 1)),
        Condition("scattered", tuple(positions[::7])),
    ]


@pytest.mark.parametrize("family", ["llava-1.5", "llava-phi"])
def test_batched_answers_equal_one_at_a_time(family, loaded_models, demo_images):
    loaded = loaded_models[family]
    image_dir, annotation_file = demo_images
    record = folder_images(image_dir, annotation_file)[0]
    inputs = loaded.adapter.build_inputs(record.load(), "Describe this image.")
    conditions = _conditions(loaded, inputs)
    vector = torch.randn(loaded.adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    batched = generate_answers(loaded, inputs, conditions, vector, max_new_tokens=12, batch_size=3)
    single = [generate_answers(loaded, inputs, [c], vector, max_new_tokens=12)[0] for c in conditions]
    assert batched == single
    assert len(set(batched)) > 1  # the conditions do differ

    target = 5
    batched_next = next_token_predictions(loaded, inputs, conditions, vector, target, batch_size=2)
    single_next = [next_token_predictions(loaded, inputs, [c], vector, target)[0] for c in conditions]
    assert [p.predicted_id for p in batched_next] == [p.predicted_id for p in single_next]
    for b, s in zip(batched_next, single_next):
        assert b.predicted_prob == pytest.approx(s.predicted_prob, abs=1e-5)
        assert b.target_prob == pytest.approx(s.target_prob, abs=1e-6)
    # the plain forward's softmax, independently
    with torch.no_grad():
        probs = torch.softmax(loaded.model(**inputs).logits[0, -1].float(), -1)
    assert batched_next[0].predicted_id == int(probs.argmax())
    assert batched_next[0].target_prob == pytest.approx(float(probs[target]), abs=1e-6)


def test_answers_stop_at_eos(loaded_models, demo_images):
    loaded = loaded_models["llava-1.5"]
    image_dir, annotation_file = demo_images
    record = folder_images(image_dir, annotation_file)[0]
    inputs = loaded.adapter.build_inputs(record.load(), "Describe this image.")
    eos = loaded.adapter.tokenizer.eos_token_id
    vector = torch.randn(loaded.adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    # a condition whose first token is a word (not an immediate EOS)
    condition = next(
        c for c in _conditions(loaded, inputs) if generate_answers(loaded, inputs, [c], vector, max_new_tokens=1)[0]
    )
    first = generate_answers(loaded, inputs, [condition], vector, max_new_tokens=1)[0]
    calls = {"n": 0}

    def force_eos_second(module, args, output):
        # Force EOS as the second generated token: nothing after it may reach the answer.
        calls["n"] += 1
        if calls["n"] == 2:
            output = output.clone()
            output[..., -1, eos] = 1e4
        return output

    handle = loaded.model.lm_head.register_forward_hook(force_eos_second)
    try:
        answer = generate_answers(loaded, inputs, [condition], vector, max_new_tokens=8)[0]
    finally:
        handle.remove()
    assert calls["n"] >= 2 and answer == first != ""
    longer = generate_answers(loaded, inputs, [condition], vector, max_new_tokens=8)[0]
    assert len(longer) > len(first)
