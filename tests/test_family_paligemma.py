"""PaliGemma (`collector/adapters/paligemma.py`) on a tiny checkpoint: parts and lens,
inputs against the real processor (image first, prefix and causal suffix), the patch order
by perturbation, the bidirectional prefix-LM mask in eager and sdpa, softcapping applied
by the model class, embedding scale, the view's geometry, and `collect lens` end to end."""

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
def paligemma(family_model):
    return family_model("paligemma")


# -- parts and lens ----------------------------------------------------------------------


def test_parts_are_the_models_own_modules(paligemma):
    # PaliGemmaForConditionalGeneration applies final_logit_softcapping: the unembedding is
    # lm_head followed by the cap.
    name, _, loaded = paligemma
    check_language_model_parts(name, loaded, softcapped=True)
    assert loaded.adapter.vision_tower is loaded.model.model.vision_tower
    assert loaded.adapter.projector is loaded.model.model.multi_modal_projector


def test_last_layer_lens_equals_model_logits(paligemma):
    check_last_layer_lens_equals_model_logits(paligemma[2])


def test_every_layer_equals_independent_recomputation(paligemma):
    check_every_layer_equals_independent_recomputation(paligemma[2], gemma_rms_norm, softcapped=True)


# -- image-first prefix, bidirectional prefix-LM mask, softcapping -------------------------------


def test_paligemma_inputs_span_and_grid(paligemma):
    """build_inputs equals the real PaliGemmaProcessor on the template's prefix; the VQA
    answer opening after the prefix's newline is a causal suffix exactly as the processor's
    `suffix=` tokenizes it (less the <eos> it appends); image tokens are positions 0..255."""
    from transformers import PaliGemmaProcessor

    _, _, loaded = paligemma
    adapter = loaded.adapter
    assert isinstance(loaded.processor, PaliGemmaProcessor)  # the real processor, no torchvision needed
    assert adapter.prompt_template == "<image>answer en {question}\n"
    tokenizer = adapter.tokenizer
    question = "Is there a cat in this image?"
    image = random_image(500, 375)
    inputs = adapter.build_inputs(image, question)
    real = loaded.processor(images=image, text=f"<image>answer en {question}", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}  # no labels
    for key in inputs:
        assert torch.equal(inputs[key], real[key]), key
    input_ids = inputs["input_ids"][0]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    # Independent derivation: 256 x <image>, <bos>, the prompt, "\n"; all prefix (type 0).
    expected_text = "<image>" * 256 + f"<bos>answer en {question}\n"
    assert input_ids.tolist() == tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    assert input_ids[:256].eq(image_id).all() and input_ids[256] == tokenizer.bos_token_id
    assert torch.equal(inputs["token_type_ids"][0], torch.zeros_like(input_ids))
    layout = adapter.image_token_layout(input_ids, inputs)
    assert (layout.grid_rows, layout.grid_cols, layout.n_tokens) == (16, 16, 256)
    assert layout.positions.tolist() == list(range(256))
    assert layout.position_of(1, 0) == 16 and layout.position_of(15, 15) == 255
    # The VQA prompt: prefix as above, then " It is a" as type-1 suffix tokens.
    vqa = adapter.build_inputs_for_text(image, adapter.format_prompt(question) + " It is a")
    with_suffix = loaded.processor(
        images=image, text=f"<image>answer en {question}", suffix=" It is a", return_tensors="pt"
    )
    assert with_suffix["input_ids"][0, -1] == tokenizer.eos_token_id
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(vqa[key], with_suffix[key][:, :-1]), key
    assert vqa["token_type_ids"][0].tolist()[-4:] == [0, 1, 1, 1]
    # The view: the whole image resized to 224x224 (no crop, no pad), as the geometry says.
    view = adapter.view_image(adapter.view_pixels(inputs))
    geometry = adapter.view_geometry(500, 375)
    assert view.size == (geometry.view_width, geometry.view_height) == (224, 224)
    assert (geometry.offset_x, geometry.offset_y) == (0.0, 0.0)
    expected_view = image.resize((224, 224), Image.BICUBIC)
    difference = np.asarray(view, dtype=np.int16) - np.asarray(expected_view, dtype=np.int16)
    assert np.abs(difference).max() <= 1


@pytest.mark.parametrize("cell", [(0, 0), (0, 15), (5, 9), (15, 0), (15, 15)])
def test_paligemma_patch_order_by_perturbing_one_cell(paligemma, cell):
    """With identity SigLIP layers, token (r, c) depends only on its own 14x14 patch:
    repainting that patch moves exactly the LM position the layout gives (r, c)."""
    _, _, loaded = paligemma
    adapter = loaded.adapter
    inputs = adapter.build_inputs(random_image(400, 300, seed=8), "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    row, col = cell
    pixels = inputs["pixel_values"].clone()
    pixels[0, :, row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14] += 1.5
    moved = moved_positions(loaded, inputs, {**inputs, "pixel_values": pixels}, adapter.vision_tower.encoder.layers)
    assert moved == [layout.position_of(row, col)]


@pytest.mark.parametrize("implementation", ("sdpa", "eager"))
def test_paligemma_prefix_is_bidirectional_and_suffix_causal(paligemma, implementation, family_model):
    """The masks the attention modules receive (eager and sdpa): image + BOS + prompt + "\\n"
    form one bidirectional block, the suffix is causal; without token_type_ids the mask is
    causal and the logits differ."""
    _, _, loaded = family_model("paligemma", implementation)
    adapter = loaded.adapter
    inputs = adapter.build_inputs_for_text(random_image(), adapter.format_prompt("What is it?") + " It is a")
    n = inputs["input_ids"].shape[1]
    prefix = inputs["token_type_ids"][0] == 0
    assert int(prefix.sum()) < n and bool(prefix[: int(prefix.sum())].all())
    expected = torch.ones(n, n, dtype=torch.bool).tril() | (prefix[:, None] & prefix[None, :])
    masks = real_attention_masks(loaded, inputs)
    for layer in range(adapter.n_layers):
        assert torch.equal(masks[layer], expected), layer
    assert adapter.attention_module(0).is_causal is False  # sdpa must never run without a mask here
    without = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    causal_masks = real_attention_masks(loaded, without)
    assert torch.equal(causal_masks[0], torch.ones(n, n, dtype=torch.bool).tril())
    assert not torch.allclose(forward(loaded, without).logits, forward(loaded, inputs).logits, atol=1e-4)


def test_paligemma_softcapping_and_embedding_scale(paligemma):
    """The tiny config sets final_logit_softcapping (cap 3, which visibly changes these
    logits) and PaliGemmaForConditionalGeneration applies it: the lens's unembedding of the
    last hidden state equals the model's logits exactly, and differs from lm_head alone."""
    from collector.adapters.gemma3 import forward_applies_softcap
    from collector.lens import LogitLens

    _, _, loaded = paligemma
    model, adapter = loaded.model, loaded.adapter
    inputs = adapter.build_inputs(random_image(), "Describe the image.")
    outputs = forward(loaded, inputs)
    raw = model.lm_head(outputs.hidden_states[-1])
    cap = model.config.text_config.final_logit_softcapping
    assert cap == 3.0 and forward_applies_softcap(type(model)) and adapter.softcap == cap
    assert not torch.allclose(raw, outputs.logits, atol=1e-3)  # the cap matters here
    torch.testing.assert_close(outputs.logits, cap * torch.tanh(raw / cap), atol=1e-6, rtol=1e-6)
    assert torch.equal(adapter.unembedding(outputs.hidden_states[-1]), outputs.logits)
    lens = LogitLens(adapter)
    assert torch.equal(lens.layer_logits(outputs.hidden_states, len(outputs.hidden_states) - 1), outputs.logits)
    # hidden_states[0] at text positions: embedding row * sqrt(d), as Gemma scales them.
    ids = inputs["input_ids"][0]
    text = (ids != adapter.image_token_id).nonzero().flatten()
    expected = model.model.language_model.embed_tokens.weight[ids[text]] * (model.config.text_config.hidden_size**0.5)
    torch.testing.assert_close(outputs.hidden_states[0][0, text], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(640, 480), (337, 1000)])
def test_view_geometry_puts_markers_where_the_model_sees_them(paligemma, size):
    """Resize to 224x224, no crop: markers in the view the model receives."""
    _, _, loaded = paligemma
    geometry = loaded.adapter.view_geometry(*size)
    assert (geometry.view_width, geometry.view_height, geometry.offset_x, geometry.offset_y) == (224, 224, 0, 0)
    assert check_adapter_view_geometry(loaded.adapter, *size) >= 4


# -- end to end: the CLI into DuckDB -----------------------------------------------------------


@pytest.mark.slow  # the whole CLI on a family model; the lens itself is tested above
def test_collect_lens_cli_end_to_end(paligemma, demo_images, tmp_path):
    from db.store import ResultsDB

    name, path, loaded = paligemma
    db_path = tmp_path / "r.duckdb"
    images = check_collect_lens_cli(name, path, loaded, demo_images[0], db_path)
    with ResultsDB(db_path, read_only=True) as db:
        for image in images:
            assert image["extra"] == []
            # 224x224 view, 16x16 patch grid, image tokens first
            assert (image["width"], image["height"], image["rows"], image["cols"]) == (224, 224, 16, 16)
            first = db.sql(
                f"SELECT min(position) FROM positions WHERE image_id = {image['image_id']} AND kind = 'image'"
            )
            assert first[0][0] == 0
