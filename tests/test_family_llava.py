"""LLaVA-1.5 and LLaVA-Phi (`collector/adapters/llava.py`) on tiny checkpoints (and the tiny
model from the real LLaVA-1.5 config where the shared data exists): parts found from the
model, the image-token span and its patch grid, the view and its geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from collector.adapters.llava import Llava15Adapter, LlavaPhiAdapter
from tests.support.families import identity_layers
from tests.support.markers import check_adapter_view_geometry


def test_parts_are_the_models_own_modules(loaded):
    adapter = loaded.adapter
    model = loaded.model
    assert adapter.decoder_layers is model.model.language_model.layers
    assert adapter.final_norm is model.model.language_model.norm
    assert adapter.unembedding is model.lm_head
    assert adapter.vision_tower is model.model.vision_tower
    assert adapter.projector is model.model.multi_modal_projector
    assert adapter.n_layers == model.config.text_config.num_hidden_layers


def test_family_detection_and_prompt_format(loaded):
    expected = {"llama": Llava15Adapter, "phi3": LlavaPhiAdapter}[loaded.model.config.text_config.model_type]
    assert type(loaded.adapter) is expected
    prompt = loaded.adapter.format_prompt("What is it?")
    if expected is Llava15Adapter:
        assert prompt == "USER: <image>\nWhat is it? ASSISTANT:"
    else:
        assert prompt == "<|user|>\n<image>What is it?<|end|>\n<|assistant|>\n"


def test_image_positions_are_the_expanded_image_token_span(loaded):
    adapter = loaded.adapter
    tokenizer = adapter.tokenizer
    question = "Is there a cat in this image?"
    inputs = adapter.build_inputs(Image.new("RGB", (640, 480), "gray"), question)
    input_ids = inputs["input_ids"][0]
    layout = adapter.image_token_layout(input_ids, inputs)

    # Independent derivation: tokenise the unexpanded prompt; the single <image> token's
    # index is where the 576-token run starts, and the text after it follows unchanged.
    unexpanded = tokenizer(adapter.format_prompt(question))["input_ids"]
    start = unexpanded.index(tokenizer.image_token_id)
    assert unexpanded.count(tokenizer.image_token_id) == 1
    assert layout.n_tokens == 576 and (layout.grid_rows, layout.grid_cols) == (24, 24)
    assert layout.positions.tolist() == list(range(start, start + 576))
    assert input_ids[:start].tolist() == unexpanded[:start]
    assert input_ids[start + 576 :].tolist() == unexpanded[start + 1 :]
    assert layout.position_of(0, 0) == start
    assert layout.position_of(0, 23) == start + 23
    assert layout.position_of(1, 0) == start + 24
    assert layout.position_of(23, 23) == start + 575
    with pytest.raises(IndexError):
        layout.position_of(24, 0)


@pytest.mark.parametrize("cell", [(0, 0), (0, 23), (5, 17), (23, 0), (23, 23)])
def test_patch_grid_is_row_major_over_pixels(loaded, cell):
    """Perturb the pixels of one 14x14 patch; exactly the LM position the adapter maps
    that cell to must change at the LM input (hidden state 0)."""
    adapter = loaded.adapter
    inputs = adapter.build_inputs(Image.new("RGB", (336, 336), (90, 140, 60)), "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    # Identity CLIP layers: each output token depends only on its own pixel patch (the patch
    # embedding and projector act per token).
    handles = identity_layers(adapter.vision_tower.encoder.layers)
    try:
        with torch.no_grad():
            base = loaded.model(**inputs, output_hidden_states=True).hidden_states[0][0]
            row, col = cell
            perturbed_pixels = inputs["pixel_values"].clone()
            perturbed_pixels[0, :, row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14] += 1.5
            changed = loaded.model(
                **{**inputs, "pixel_values": perturbed_pixels}, output_hidden_states=True
            ).hidden_states[0][0]
    finally:
        for handle in handles:
            handle.remove()
    moved = ((changed - base).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
    assert moved == [layout.position_of(row, col)]


def test_view_image_inverts_the_processor(loaded):
    """The site shows the image as the model saw it: de-normalised pixel_values of a
    square 336 image (no resize or crop) reproduce the original pixels."""
    adapter = loaded.adapter
    torch.manual_seed(0)
    original = Image.fromarray(torch.randint(0, 256, (336, 336, 3), dtype=torch.uint8).numpy())
    inputs = adapter.build_inputs(original, "x")
    view = adapter.view_image(inputs["pixel_values"][0])
    difference = np.asarray(view, dtype=np.int16) - np.asarray(original, dtype=np.int16)
    assert view.size == (336, 336)
    assert np.abs(difference).max() <= 1


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (337, 1000), (100, 50)])
def test_view_geometry_puts_markers_where_the_model_sees_them(loaded, size):
    """Short side to 336, centre crop 336x336: markers drawn in the original image land in
    the pixel_values the model receives where `view_geometry` says."""
    geometry = loaded.adapter.view_geometry(*size)
    assert (geometry.view_width, geometry.view_height) == (336, 336)
    assert check_adapter_view_geometry(loaded.adapter, *size) >= 4
