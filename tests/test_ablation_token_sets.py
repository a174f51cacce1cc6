"""Token sets: object cells on the real COCO sample, register, random, IG (completeness), noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from collector.ablation.token_sets import (
    first_word_token_id,
    integrated_gradients,
    noised_pixel_values,
    object_token_indices,
    pixel_cell_mask,
    random_token_indices,
    register_token_indices,
    token_sets,
    top_k_token_indices,
    yes_token_id,
)
from collector.targets import object_cells, object_positions
from tests.conftest import COCO_SAMPLE, REAL_LLAVA15, require_shared


def _remote_annotation():
    data = json.loads(require_shared(COCO_SAMPLE / "instances_sample.json").read_text())
    [ann] = [a for a in data["annotations"] if a["id"] == 1108446]
    return ann


def test_object_sets_on_the_real_coco_sample(loaded_models):
    loaded = loaded_models["llava-1.5"]
    image = Image.open(require_shared(COCO_SAMPLE / "images" / "000000039769.png")).convert("RGB")
    geometry = loaded.adapter.view_geometry(640, 480)
    assert (geometry.scale_x, geometry.offset_x, geometry.offset_y) == (0.7, 56.0, 0.0)
    inputs = loaded.adapter.build_inputs(image, "Describe this image.")
    layout = loaded.adapter.image_token_layout(inputs["input_ids"][0], inputs)
    cells = object_cells(_remote_annotation()["segmentation"], loaded.adapter, 640, 480, 24, 24)

    # By hand: bbox x 332.89..371.54 -> view 177.0..204.1 -> cols 12..14 (14 px each);
    # y 79.57..185.88 -> view 55.7..130.1 -> rows 3.98.. -> rows 4..9.
    rows, cols = np.nonzero(cells)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 9, 12, 14)
    assert cells.sum() == 13
    first = int(layout.positions[0])
    by_hand = sorted(first + int(r) * 24 + int(c) for r, c in zip(rows, cols))
    assert object_positions(cells, layout, 0) == by_hand
    assert layout.positions_of_cells(object_token_indices(cells, 0)) == by_hand

    ring = {
        (r + dr, c + dc)
        for r, c in zip(rows.tolist(), cols.tolist())
        for dr in (-1, 0, 1)
        for dc in (-1, 0, 1)
        if 0 <= r + dr < 24 and 0 <= c + dc < 24
    }
    assert object_positions(cells, layout, 1) == sorted(first + r * 24 + c for r, c in ring)
    assert set(object_positions(cells, layout, 0)) < set(object_positions(cells, layout, 1))


def test_register_tokens_are_norm_outliers():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(576, 16, generator=generator) * 0.1 + 1.0
    embeddings[[3, 100, 500]] *= 10
    assert register_token_indices(embeddings) == [3, 100, 500]
    norms = embeddings.norm(dim=-1)
    expected = torch.nonzero(norms > norms.mean() + 2 * norms.std()).flatten().tolist()
    assert register_token_indices(embeddings) == expected


def test_random_sets_are_seeded_per_image_and_k():
    draw = random_token_indices(576, 40, seed=7, image_id=39769)
    assert draw == random_token_indices(576, 40, seed=7, image_id=39769)
    assert len(set(draw)) == 40 and all(0 <= i < 576 for i in draw)
    assert draw != random_token_indices(576, 40, seed=8, image_id=39769)
    assert draw != random_token_indices(576, 40, seed=7, image_id=39770)
    assert random_token_indices(576, 1000, seed=7, image_id=1) == list(range(576))  # clipped


def test_token_sets_names_and_clipping():
    cells = np.zeros((24, 24), dtype=bool)
    cells[0, 0] = True
    embeddings = torch.ones(576, 8)
    sets = token_sets(cells, embeddings, 5, 3, (5, 1000), torch.arange(576.0))
    by_name = {s.name: s for s in sets}
    assert list(by_name) == [
        "object_0",
        "object_1",
        "object_2",
        "register",
        "random_5",
        "random_1000",
        "gradient_5",
        "gradient_1000",
    ]
    assert by_name["object_1"].token_indices == (0, 1, 24, 25)
    assert by_name["register"].token_indices == ()  # equal norms: no outliers
    assert by_name["random_5"].seed == 3 and len(by_name["random_1000"].token_indices) == 576
    assert by_name["gradient_5"].token_indices == (571, 572, 573, 574, 575)
    assert top_k_token_indices(torch.tensor([1.0, 3.0, 3.0, 0.0]), 2) == [1, 2]


def test_yes_token_is_the_answer_token_not_bos(loaded):
    tokenizer = loaded.adapter.tokenizer
    token_id = yes_token_id(tokenizer)
    assert token_id != tokenizer.bos_token_id
    assert tokenizer.decode([token_id]).strip() == "Yes"


def test_first_tokens_with_the_real_llava_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(require_shared(REAL_LLAVA15))
    assert tokenizer.encode("Yes")[0] == tokenizer.bos_token_id  # the original code's slip
    assert yes_token_id(tokenizer) == 3869 and tokenizer.convert_ids_to_tokens(3869) == "▁Yes"
    # " remote" is ['▁', '▁remote']: the bare '▁' is not the class token
    assert tokenizer.encode(" remote", add_special_tokens=False)[0] == 29871
    assert tokenizer.convert_ids_to_tokens(first_word_token_id(tokenizer, " remote")) == "▁remote"
    assert tokenizer.convert_ids_to_tokens(first_word_token_id(tokenizer, " traffic light")) == "▁traffic"


def test_integrated_gradients_completeness(loaded_models):
    loaded = loaded_models["llava-1.5"]
    adapter = loaded.adapter
    inputs = adapter.build_inputs(Image.new("RGB", (400, 300), (200, 60, 40)), "Is there a circle in this image?")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    baseline = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.1
    target = yes_token_id(adapter.tokenizer)
    ig = integrated_gradients(loaded, inputs, layout, baseline, target, steps=64, batch_size=32)
    assert ig.attributions.shape == (576, adapter.hidden_size)
    difference = ig.f_input - ig.f_baseline
    assert abs(difference) > 1e-3
    assert ig.attributions.sum().item() == pytest.approx(difference, rel=1e-3, abs=1e-4)
    # f at the ends is the plain model's logit (input) and the all-ablated logit (baseline)
    with torch.no_grad():
        plain = loaded.model(**inputs, use_cache=False).logits[0, -1, target]
    assert ig.f_input == pytest.approx(float(plain), abs=1e-4)
    assert torch.equal(ig.token_attribution, ig.attributions.abs().sum(-1))
    assert all(p.requires_grad for p in loaded.model.parameters())  # flags restored


def test_image_noise_touches_only_the_object_cells():
    cells = np.zeros((24, 24), dtype=bool)
    cells[4:6, 12] = True
    pixels = torch.zeros(3, 336, 336)
    noised = noised_pixel_values(pixels, cells, std=1.0, seed=0, image_id=1)
    changed = (noised != pixels).any(dim=0)
    expected = torch.zeros(336, 336, dtype=torch.bool)
    expected[4 * 14 : 6 * 14, 12 * 14 : 13 * 14] = True
    assert torch.equal(changed, expected)
    assert torch.equal(noised, noised_pixel_values(pixels, cells, std=1.0, seed=0, image_id=1))
    assert not torch.equal(noised, noised_pixel_values(pixels, cells, std=1.0, seed=1, image_id=1))
    # sides not divisible by the grid: cell i spans [i*s/rows, (i+1)*s/rows)
    mask = pixel_cell_mask(np.eye(3, dtype=bool), 10, 10)
    assert mask[:, 0].tolist() == [True] * 4 + [False] * 6  # 0..3 -> cell 0 (3.33 px per cell)
