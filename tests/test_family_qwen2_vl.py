"""Qwen2-VL and Qwen2.5-VL (`collector/adapters/qwen2_vl.py`) on tiny checkpoints: parts and
lens, inputs against the real processor, M-RoPE positions, the image span and merged grid,
the merge order by perturbation, the view and its geometry, and `collect lens` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.families import (
    check_collect_lens_cli,
    check_every_layer_equals_independent_recomputation,
    check_language_model_parts,
    check_last_layer_lens_equals_model_logits,
    forward,
    moved_positions,
    random_image,
    rms_norm,
)
from tests.support.markers import check_adapter_view_geometry

QWEN_FAMILIES = ("qwen2.5-vl", "qwen2-vl")


@pytest.fixture(params=QWEN_FAMILIES)
def qwen(request, family_model):
    return family_model(request.param)


# -- parts and lens ----------------------------------------------------------------------


def test_parts_are_the_models_own_modules(qwen):
    name, _, loaded = qwen
    check_language_model_parts(name, loaded, softcapped=False)
    model, adapter = loaded.model, loaded.adapter
    assert adapter.vision_tower is model.model.visual
    assert adapter.projector is model.model.visual.merger
    # the real config's tied embeddings survive save/load
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


def test_last_layer_lens_equals_model_logits(qwen):
    check_last_layer_lens_equals_model_logits(qwen[2])


def test_every_layer_equals_independent_recomputation(qwen):
    check_every_layer_equals_independent_recomputation(qwen[2], rms_norm, softcapped=False)


# -- processor, span, grid, M-RoPE, view -------------------------------------------------------


def _real_qwen_processor(loaded):
    """The real `Qwen2VLProcessor` / `Qwen2_5_VLProcessor.__call__`, on the checkpoint's image
    processor and tokenizer. Its constructor needs torchvision for the video processor, so
    the instance is made without __init__; only the attributes __init__ sets are given."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    cls = Qwen2_5_VLProcessor if loaded.model.config.model_type == "qwen2_5_vl" else Qwen2VLProcessor
    processor = cls.__new__(cls)
    tokenizer = loaded.processor.tokenizer
    processor.image_processor = loaded.processor.image_processor
    processor.tokenizer = tokenizer
    processor.video_processor = None
    processor.chat_template = None
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    processor.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return processor


@pytest.mark.parametrize("size", [(500, 375), (300, 620)])
def test_qwen_inputs_equal_the_real_processor(qwen, size):
    _, _, loaded = qwen
    adapter = loaded.adapter
    from collector.adapters.qwen2_vl import QwenImageTextProcessor

    assert isinstance(loaded.processor, QwenImageTextProcessor)  # no torchvision here
    image = random_image(*size)
    ours = adapter.build_inputs(image, "What is it?")
    real = _real_qwen_processor(loaded)(images=image, text=adapter.format_prompt("What is it?"), return_tensors="pt")
    assert set(ours) == set(real)
    for key in real:
        assert torch.equal(ours[key], real[key]), key


def _independent_mrope_positions(input_ids: torch.Tensor, start: int, rows: int, cols: int) -> torch.Tensor:
    """M-RoPE ids (3, 1, T) from the Qwen2-VL paper's rule: text tokens count up on all three
    axes; the image's tokens get (s, s + row, s + col) with s the next text position; text
    after the image continues from s + max(rows, cols)."""
    n = input_ids.numel()
    pos = torch.zeros(3, n, dtype=torch.long)
    pos[:, :start] = torch.arange(start)
    cell = torch.arange(rows * cols)
    pos[0, start : start + rows * cols] = start
    pos[1, start : start + rows * cols] = start + cell // cols
    pos[2, start : start + rows * cols] = start + cell % cols
    after = start + rows * cols
    pos[:, after:] = start + max(rows, cols) + torch.arange(n - after)
    return pos[:, None, :]


def test_qwen_forward_uses_mrope_positions(qwen):
    """The project's forward (build_inputs -> model) equals the forward with independently
    derived M-RoPE position ids and the real processor's forward; without mm_token_type_ids
    the model silently runs with 1-D positions and differs."""
    _, _, loaded = qwen
    adapter = loaded.adapter
    image = random_image(420, 252)
    inputs = adapter.build_inputs(image, "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    assert layout.grid_rows != layout.grid_cols  # a non-square grid makes row/col mix-ups visible
    ours = forward(loaded, inputs).logits
    positions = _independent_mrope_positions(
        inputs["input_ids"][0], int(layout.positions[0]), layout.grid_rows, layout.grid_cols
    )
    explicit = forward(loaded, {**inputs, "position_ids": positions}).logits
    assert torch.equal(ours, explicit)
    real = _real_qwen_processor(loaded)(
        images=image, text=adapter.format_prompt("Describe the image."), return_tensors="pt"
    )
    assert torch.equal(forward(loaded, dict(real)).logits, ours)
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    if loaded.model.config.model_type == "qwen2_vl":
        with pytest.raises(ValueError, match="mm_token_type_ids"):  # Qwen2-VL refuses
            forward(loaded, without)
    else:  # Qwen2.5-VL silently falls back to 1-D positions
        assert not torch.allclose(forward(loaded, without).logits, ours, atol=1e-4)


@pytest.mark.parametrize("size", [(500, 375), (300, 620), (64, 900)])
def test_qwen_image_span_and_grid_from_processor_outputs(qwen, size):
    _, _, loaded = qwen
    adapter = loaded.adapter
    tokenizer = adapter.tokenizer
    question = "Is there a cat in this image?"
    image = random_image(*size)
    inputs = adapter.build_inputs(image, question)
    input_ids = inputs["input_ids"][0]
    layout = adapter.image_token_layout(input_ids, inputs)
    # Independent derivation from the image processor alone.
    t, h, w = loaded.processor.image_processor(images=image, return_tensors="pt")["image_grid_thw"][0].tolist()
    assert t == 1 and layout.n_tokens == t * h * w // 4
    assert (layout.grid_rows, layout.grid_cols) == (h // 2, w // 2)
    unexpanded = tokenizer(adapter.format_prompt(question))["input_ids"]
    start = unexpanded.index(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    assert unexpanded[start - 1] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert unexpanded[start + 1] == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    n = layout.n_tokens
    assert layout.positions.tolist() == list(range(start, start + n))
    assert input_ids[:start].tolist() == unexpanded[:start]
    assert input_ids[start + n :].tolist() == unexpanded[start + 1 :]
    assert layout.position_of(0, 0) == start
    assert layout.position_of(0, layout.grid_cols - 1) == start + layout.grid_cols - 1
    assert layout.position_of(1, 0) == start + layout.grid_cols
    assert layout.position_of(layout.grid_rows - 1, layout.grid_cols - 1) == start + n - 1
    with pytest.raises(IndexError):
        layout.position_of(layout.grid_rows, 0)
    # The grid comes from the inputs, never from a cache of earlier calls.
    with pytest.raises(ValueError, match="image_grid_thw"):
        adapter.image_token_layout(input_ids, {"input_ids": inputs["input_ids"]})
    # The view matches the geometry the site uses.
    view = adapter.view_image(adapter.view_pixels(inputs))
    geometry = adapter.view_geometry(*size)
    assert view.size == (geometry.view_width, geometry.view_height) == (w * 14, h * 14)


@pytest.mark.parametrize("cell", [(0, 0), (0, 8), (3, 5), (6, 0), (6, 8)])
def test_qwen_merge_order_by_perturbing_one_merged_patch(qwen, cell):
    """A 252x196 image needs no resize (multiples of 28): a 9x7 merged grid. Repaint the
    28x28 pixels of one cell; exactly the LM position the adapter maps it to must change."""
    _, _, loaded = qwen
    adapter = loaded.adapter
    base_image = random_image(252, 196, seed=5)
    row, col = cell
    array = np.asarray(base_image).copy()
    array[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28] = [250, 10, 90]
    perturbed = Image.fromarray(array)
    inputs = adapter.build_inputs(base_image, "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    assert (layout.grid_rows, layout.grid_cols) == (7, 9)
    inputs_p = adapter.build_inputs(perturbed, "Describe the image.")
    assert moved_positions(loaded, inputs, inputs_p, adapter.vision_tower.blocks) == [layout.position_of(row, col)]


def test_qwen_view_image_inverts_the_processor(qwen):
    _, _, loaded = qwen
    adapter = loaded.adapter
    original = random_image(252, 196, seed=6)
    inputs = adapter.build_inputs(original, "x")
    view = adapter.view_image(adapter.view_pixels(inputs))
    assert view.size == (252, 196)
    difference = np.asarray(view, dtype=np.int16) - np.asarray(original, dtype=np.int16)
    assert np.abs(difference).max() <= 1


@pytest.mark.parametrize("size", [(640, 480), (337, 1000), (100, 50)])
def test_view_geometry_puts_markers_where_the_model_sees_them(qwen, size):
    """smart_resize geometry (no crop) against the de-patchified view the model receives."""
    _, _, loaded = qwen
    geometry = loaded.adapter.view_geometry(*size)
    assert (geometry.offset_x, geometry.offset_y) == (0.0, 0.0)
    assert geometry.view_width % 28 == 0 and geometry.view_height % 28 == 0
    assert check_adapter_view_geometry(loaded.adapter, *size) >= 4


# -- end to end: the CLI into DuckDB -----------------------------------------------------------


@pytest.mark.slow  # the whole CLI on a family model; the lens itself is tested above
def test_collect_lens_cli_end_to_end(qwen, demo_images, tmp_path):
    name, path, loaded = qwen
    for image in check_collect_lens_cli(name, path, loaded, demo_images[0], tmp_path / "r.duckdb"):
        assert image["extra"] == []
        # one merged cell = 28x28 view pixels
        assert (image["width"], image["height"]) == (image["cols"] * 28, image["rows"] * 28)
