"""The logit lens against the model's own logits and an independent recomputation."""

from __future__ import annotations

import torch
from PIL import Image

from collector.lens import LogitLens


def _forward(loaded, image=None, question="Describe the image."):
    image = image or Image.new("RGB", (500, 375), (120, 30, 200))
    inputs = loaded.adapter.build_inputs(image, question)
    with torch.no_grad():
        outputs = loaded.model(**inputs, output_hidden_states=True, use_cache=False)
    return inputs, outputs


def test_last_layer_lens_equals_model_logits(loaded):
    _, outputs = _forward(loaded)
    lens = LogitLens(loaded.adapter)
    last = len(outputs.hidden_states) - 1
    lens_logits = lens.layer_logits(outputs.hidden_states, last)
    assert torch.equal(lens_logits, outputs.logits)

    readout = lens.top_k(outputs.hidden_states, k=5)
    expected = torch.topk(torch.softmax(outputs.logits[0].float(), -1), 5, dim=-1)
    assert torch.equal(readout.token_ids[-1], expected.indices)
    assert torch.allclose(readout.probs[-1], expected.values, atol=0, rtol=0)


def _manual_rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hidden = hidden.float()
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def test_every_layer_equals_independent_recomputation(loaded):
    _, outputs = _forward(loaded)
    model = loaded.model
    text_config = model.config.text_config
    norm_weight = model.model.language_model.norm.weight.detach()
    unembedding_weight = model.lm_head.weight.detach().float()
    hidden_states = outputs.hidden_states
    assert len(hidden_states) == text_config.num_hidden_layers + 1

    readout = LogitLens(loaded.adapter).top_k(hidden_states, k=3)
    assert readout.token_ids.shape == (text_config.num_hidden_layers + 1, hidden_states[0].shape[1], 3)
    for layer, hidden in enumerate(hidden_states):
        # The last entry already went through the final norm inside the model.
        normed = hidden[0].float() if layer == len(hidden_states) - 1 else _manual_rms_norm(
            hidden[0], norm_weight, text_config.rms_norm_eps
        )
        probs = torch.softmax(normed @ unembedding_weight.T, dim=-1)
        expected = torch.topk(probs, 3, dim=-1)
        torch.testing.assert_close(readout.probs[layer], expected.values, atol=1e-5, rtol=1e-4)
        # Ties aside, the ids must match; compare where the top-3 probabilities are distinct.
        distinct = (expected.values[:, :-1] - expected.values[:, 1:]).abs().min(-1).values > 1e-5
        assert torch.equal(readout.token_ids[layer][distinct], expected.indices[distinct])


def test_norm_is_applied_to_intermediate_layers_only(loaded):
    """A lens that skipped the norm, or applied it twice, would differ from these."""
    _, outputs = _forward(loaded)
    lens = LogitLens(loaded.adapter)
    middle = 1
    hidden = outputs.hidden_states[middle]
    without_norm = loaded.model.lm_head(hidden)
    assert not torch.allclose(lens.layer_logits(outputs.hidden_states, middle), without_norm, atol=1e-3)
    last = len(outputs.hidden_states) - 1
    double_norm = loaded.model.lm_head(loaded.adapter.final_norm(outputs.hidden_states[last]))
    assert not torch.allclose(lens.layer_logits(outputs.hidden_states, last), double_norm, atol=1e-3)


def test_lens_materialises_one_layer_of_logits_at_a_time(loaded, monkeypatch):
    _, outputs = _forward(loaded)
    unembedding = loaded.adapter.unembedding
    shapes = []
    handle = unembedding.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        LogitLens(loaded.adapter).top_k(outputs.hidden_states, k=2)
    finally:
        handle.remove()
    n_positions = outputs.hidden_states[0].shape[1]
    vocab = outputs.logits.shape[-1]
    assert shapes == [(1, n_positions, vocab)] * len(outputs.hidden_states)
