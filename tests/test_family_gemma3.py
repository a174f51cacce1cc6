"""Gemma 3 (`collector/adapters/gemma3.py`) on a tiny checkpoint: parts and lens, inputs
against the real processor, the image span and pooled grid (order by perturbation), the
bidirectional image block and mixed sliding/full layers, softcapping (configured but not
applied by the model class), embedding scale, the view's geometry, `collect lens`."""

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
    gemma_rms_norm,
    moved_positions,
    random_image,
    real_attention_masks,
)
from tests.support.markers import check_adapter_view_geometry


@pytest.fixture
def gemma3(family_model):
    return family_model("gemma3")


# -- parts and lens ----------------------------------------------------------------------


def test_parts_are_the_models_own_modules(gemma3):
    # The tiny config sets final_logit_softcapping, but Gemma3ForConditionalGeneration does
    # not apply it: the lens must not either (test_gemma3_softcapping_and_embedding_scale).
    name, _, loaded = gemma3
    check_language_model_parts(name, loaded, softcapped=False)
    assert loaded.adapter.vision_tower is loaded.model.model.vision_tower
    assert loaded.adapter.projector is loaded.model.model.multi_modal_projector


def test_last_layer_lens_equals_model_logits(gemma3):
    check_last_layer_lens_equals_model_logits(gemma3[2])


def test_every_layer_equals_independent_recomputation(gemma3):
    check_every_layer_equals_independent_recomputation(gemma3[2], gemma_rms_norm, softcapped=False)


# -- span, pooled grid, bidirectional image attention, softcapping, norms -----------------------


def test_gemma3_inputs_span_and_grid(gemma3):
    from transformers import Gemma3Processor

    _, _, loaded = gemma3
    adapter = loaded.adapter
    assert isinstance(loaded.processor, Gemma3Processor)  # the real processor, no torchvision needed
    tokenizer = adapter.tokenizer
    question = "Is there a cat in this image?"
    image = random_image(500, 375)
    inputs = adapter.build_inputs(image, question)
    real = loaded.processor(images=image, text=adapter.format_prompt(question), return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}
    for key in inputs:
        assert torch.equal(inputs[key], real[key]), key
    input_ids = inputs["input_ids"][0]
    layout = adapter.image_token_layout(input_ids, inputs)
    assert (layout.grid_rows, layout.grid_cols, layout.n_tokens) == (16, 16, 256)
    # Independent derivation: the tokenized template with <start_of_image> expanded to
    # "\n\n<start_of_image>" + 256 x <image_soft_token> + "<end_of_image>\n\n".
    image_id = tokenizer.convert_tokens_to_ids("<image_soft_token>")
    boi, eoi = (tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>"))
    expected_text = adapter.format_prompt(question).replace(
        "<start_of_image>", "\n\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\n\n"
    )
    assert input_ids.tolist() == tokenizer(expected_text)["input_ids"]
    assert input_ids[0] == tokenizer.bos_token_id
    start = input_ids.tolist().index(image_id)
    assert input_ids[start - 1] == boi and input_ids[start + 256] == eoi
    assert layout.positions.tolist() == list(range(start, start + 256))
    assert layout.position_of(1, 0) == start + 16 and layout.position_of(15, 15) == start + 255
    assert torch.equal(inputs["token_type_ids"][0], (input_ids == image_id).long())
    # The view: the whole image resized to 896x896 (no crop, no pad), as the geometry says.
    view = adapter.view_image(adapter.view_pixels(inputs))
    geometry = adapter.view_geometry(500, 375)
    assert view.size == (geometry.view_width, geometry.view_height) == (896, 896)
    assert (geometry.offset_x, geometry.offset_y) == (0.0, 0.0)
    expected_view = image.resize((896, 896), Image.BILINEAR)
    difference = np.asarray(view, dtype=np.int16) - np.asarray(expected_view, dtype=np.int16)
    assert np.abs(difference).max() <= 1


@pytest.mark.parametrize("cell", [(0, 0), (0, 15), (5, 9), (15, 0), (15, 15)])
def test_gemma3_pooling_order_by_perturbing_one_cell(gemma3, cell):
    """With identity SigLIP layers, token (r, c) depends only on the 4x4 patches (56x56 view
    pixels) it pools. Repainting one 14x14 patch inside cell (r, c) must move exactly the LM
    position the layout gives (r, c); patches are repainted in pixel_values directly."""
    _, _, loaded = gemma3
    adapter = loaded.adapter
    inputs = adapter.build_inputs(random_image(400, 300, seed=8), "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    row, col = cell
    pixels = inputs["pixel_values"].clone()
    y, x = row * 56 + 14 * (row % 4), col * 56 + 14 * (3 - col % 4)  # some patch inside the cell
    pixels[0, :, y : y + 14, x : x + 14] += 1.5
    moved = moved_positions(loaded, inputs, {**inputs, "pixel_values": pixels}, adapter.vision_tower.encoder.layers)
    assert moved == [layout.position_of(row, col)]


def test_gemma3_image_attention_is_bidirectional_and_layers_are_mixed(gemma3):
    """The masks the attention modules receive: image block bidirectional (token_type_ids
    passed), text causal, sliding layers cut at the window; and the logits depend on it."""
    _, _, loaded = gemma3
    adapter = loaded.adapter
    inputs = adapter.build_inputs(random_image(), "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    masks = real_attention_masks(loaded, inputs)  # layer -> (T, T) bool, True = attend
    n = inputs["input_ids"].shape[1]
    start, end = int(layout.positions[0]), int(layout.positions[-1])
    window = loaded.model.config.text_config.sliding_window
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    image = torch.zeros(n, dtype=torch.bool)
    image[start : end + 1] = True
    block = image[:, None] & image[None, :]
    distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    for layer, layer_type in enumerate(loaded.model.config.text_config.layer_types):
        expected = causal | block
        if layer_type == "sliding_attention":
            expected = expected & (distance < window)  # keys more than a window back are cut; later image keys stay
        assert torch.equal(masks[layer], expected), layer
    assert "full_attention" in loaded.model.config.text_config.layer_types
    assert "sliding_attention" in loaded.model.config.text_config.layer_types
    without = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    assert not torch.allclose(forward(loaded, without).logits, forward(loaded, inputs).logits, atol=1e-4)


def test_gemma3_softcapping_and_embedding_scale(gemma3):
    """The tiny config ENABLES final_logit_softcapping (cap 3, which visibly changes these
    logits), yet Gemma3ForConditionalGeneration's forward does not apply it: the lens
    follows the model, not the config. The wrapper used where a model does apply it
    (PaliGemma) equals cap * tanh(logits / cap)."""
    from collector.adapters.gemma3 import SoftcappedUnembedding, forward_applies_softcap

    _, _, loaded = gemma3
    model, adapter = loaded.model, loaded.adapter
    inputs = adapter.build_inputs(random_image(), "Describe the image.")
    outputs = forward(loaded, inputs)
    raw = model.lm_head(outputs.hidden_states[-1])
    cap = model.config.text_config.final_logit_softcapping
    capped = cap * torch.tanh(raw / cap)
    assert cap == 3.0 and not torch.allclose(raw, capped, atol=1e-3)  # the cap would matter here
    assert torch.equal(outputs.logits, raw)  # ... but the model does not apply it
    assert not forward_applies_softcap(type(model)) and adapter.softcap is None
    assert torch.equal(adapter.unembedding(outputs.hidden_states[-1]), outputs.logits)
    wrapper = SoftcappedUnembedding(model.lm_head, cap)
    torch.testing.assert_close(wrapper(outputs.hidden_states[-1]), capped, atol=1e-6, rtol=1e-6)
    assert wrapper.weight is model.lm_head.weight
    # hidden_states[0] at text positions: embedding row * sqrt(d), as Gemma scales them.
    ids = inputs["input_ids"][0]
    text = (inputs["token_type_ids"][0] == 0).nonzero().flatten()
    expected = model.model.language_model.embed_tokens.weight[ids[text]] * (model.config.text_config.hidden_size**0.5)
    torch.testing.assert_close(outputs.hidden_states[0][0, text], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(640, 480), (337, 1000)])
def test_view_geometry_puts_markers_where_the_model_sees_them(gemma3, size):
    """Resize to 896x896, no crop: markers in the view the model receives."""
    _, _, loaded = gemma3
    geometry = loaded.adapter.view_geometry(*size)
    assert (geometry.view_width, geometry.view_height, geometry.offset_x, geometry.offset_y) == (896, 896, 0, 0)
    assert check_adapter_view_geometry(loaded.adapter, *size) >= 4


def test_pan_and_scan_is_refused(gemma3):
    """Pan-and-scan adds crops the geometry and the 256-token layout do not describe."""
    import copy

    from collector.adapters.gemma3 import Gemma3Adapter

    _, _, loaded = gemma3
    image_processor = copy.copy(loaded.processor.image_processor)
    image_processor.do_pan_and_scan = True
    with pytest.raises(ValueError, match="do_pan_and_scan"):
        Gemma3Adapter.image_processor_geometry(image_processor, 640, 480)


# -- end to end: the CLI into DuckDB -----------------------------------------------------------


@pytest.mark.slow  # the whole CLI on a family model; the lens itself is tested above
def test_collect_lens_cli_end_to_end(gemma3, demo_images, tmp_path):
    name, path, loaded = gemma3
    for image in check_collect_lens_cli(name, path, loaded, demo_images[0], tmp_path / "r.duckdb"):
        assert image["extra"] == []
        # 896x896 view, 16x16 pooled grid
        assert (image["width"], image["height"], image["rows"], image["cols"]) == (896, 896, 16, 16)
