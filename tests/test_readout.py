"""The read-out (final norm + unembedding + softcap) against independent recomputations."""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image

from collector.readout import Readout, SoftcappedUnembedding, softcap_logits


def _hidden_states(loaded):
    inputs = loaded.adapter.build_inputs(Image.new("RGB", (400, 300), (30, 140, 90)), "Describe the image.")
    with torch.no_grad():
        return loaded.model(**inputs, output_hidden_states=True, use_cache=False)


def _manual_rms_norm(hidden, weight, eps, one_plus=False):
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * ((1.0 + weight.float()) if one_plus else weight.float())


def test_readout_of_a_hidden_state_is_norm_then_unembedding(loaded):
    outputs = _hidden_states(loaded)
    model = loaded.model
    readout = loaded.adapter.readout()
    assert readout.softcap is None  # LLaVA's Llama / Phi-3 heads have none
    hidden = outputs.hidden_states[1]
    expected = (
        _manual_rms_norm(hidden, model.model.language_model.norm.weight.detach(), model.config.text_config.rms_norm_eps)
        @ model.lm_head.weight.detach().float().T
    )
    with torch.no_grad():
        torch.testing.assert_close(readout(hidden), expected, atol=1e-4, rtol=1e-4)
        # normed=True skips the norm: on the last (already normed) entry that is the model's logits exactly
        assert torch.equal(readout(outputs.hidden_states[-1], normed=True), outputs.logits)


def test_softcap_is_applied_after_the_unembedding():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(8)
    lm_head = torch.nn.Linear(8, 11, bias=False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        lm_head.weight.mul_(40)  # logits well beyond the cap, where tanh visibly bends them
    hidden = torch.randn(2, 3, 8)
    readout = Readout(norm, lm_head, softcap=3.0)
    with torch.no_grad():
        raw = torch.nn.functional.layer_norm(hidden, (8,), norm.weight, norm.bias, norm.eps) @ lm_head.weight.T
        expected = 3.0 * torch.tanh(raw / 3.0)
        got = readout(hidden)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        assert got.abs().max() <= 3.0 and raw.abs().max() > 3.0
        assert torch.equal(SoftcappedUnembedding(lm_head, 3.0)(hidden), softcap_logits(lm_head(hidden), 3.0))
        assert torch.equal(Readout(norm, lm_head)(hidden, normed=True), lm_head(hidden))


def test_sha256_is_over_the_norm_and_unembedding_bytes(loaded):
    model = loaded.model
    readout = loaded.adapter.readout()
    assert model.lm_head.weight.dtype == torch.float32
    norm_bytes = model.model.language_model.norm.weight.detach().numpy().tobytes()
    lm_head_bytes = model.lm_head.weight.detach().numpy().tobytes()  # tobytes copies
    expected = hashlib.sha256(norm_bytes + lm_head_bytes).hexdigest()
    assert readout.sha256() == expected
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    try:
        assert readout.sha256() != expected
    finally:
        with torch.no_grad():
            model.lm_head.weight[0, 0] -= 1.0


@pytest.fixture(scope="module")
def paligemma(family_checkpoint):
    from collector.loading import load_model

    return load_model(str(family_checkpoint("paligemma")), device="cpu", dtype="float32")


def test_paligemma_readout_applies_the_models_softcap(paligemma):
    """PaliGemma's forward caps its logits (the tiny config sets cap 3): the read-out does too,
    with Gemma's (1 + w) RMSNorm, and equals the model's logits exactly on the last entry."""
    model = paligemma.model
    text_config = model.config.text_config
    readout = paligemma.adapter.readout()
    assert readout.softcap == text_config.final_logit_softcapping == 3.0
    outputs = _hidden_states(paligemma)
    with torch.no_grad():
        assert torch.equal(readout(outputs.hidden_states[-1], normed=True), outputs.logits)
        hidden = outputs.hidden_states[1]
        normed = _manual_rms_norm(
            hidden, model.model.language_model.norm.weight.detach(), text_config.rms_norm_eps, one_plus=True
        )
        raw = normed @ model.lm_head.weight.detach().float().T
        torch.testing.assert_close(readout(hidden), 3.0 * torch.tanh(raw / 3.0), atol=1e-4, rtol=1e-4)


def test_sha256_of_half_precision_and_offloaded_weights():
    norm = torch.nn.LayerNorm(4, bias=False).to(torch.bfloat16)
    lm_head = torch.nn.Linear(4, 6, bias=False).to(torch.bfloat16)
    # bfloat16 has no numpy dtype: its raw bytes read as int16
    raw = (
        norm.weight.detach().view(torch.int16).numpy().tobytes()
        + lm_head.weight.detach().view(torch.int16).numpy().tobytes()
    )
    assert Readout(norm, lm_head).sha256() == hashlib.sha256(raw).hexdigest()
    with torch.device("meta"):
        offloaded = torch.nn.Linear(4, 6, bias=False)
    assert Readout(norm, offloaded).sha256() is None
