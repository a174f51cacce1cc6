"""Attention blocking against independent references, under eager and sdpa attention.

References: (a) causality — a position no later position may see cannot influence them;
(b) a per-layer recomputation of attention from q/k/v with a mask built here from index
lists; (c) an empty block is the plain forward bit for bit; (d) a batch of different blocks
equals one-at-a-time runs; (e) a left-padded batch (bool / padded float masks) equals the
unpadded runs.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from collector.blocking.mechanism import (
    NO_BLOCK,
    AttentionBlock,
    block_attention,
    check_implementation,
    combine_mask,
)
from collector.errors import UserError

IMPLEMENTATIONS = ("eager", "sdpa")
MODEL_NAMES = ("llava-1.5", "llava-phi", "llava-1.5-real-config")


@pytest.fixture(scope="session")
def models_by_implementation(tiny_checkpoints, real_config_checkpoint_or_none) -> dict:
    from collector.loading import load_model

    paths = dict(tiny_checkpoints)
    if real_config_checkpoint_or_none is not None:
        paths["llava-1.5-real-config"] = real_config_checkpoint_or_none
    return {
        (name, implementation): load_model(str(path), device="cpu", attn_implementation=implementation)
        for name, path in paths.items()
        for implementation in IMPLEMENTATIONS
    }


@pytest.fixture(params=[(m, i) for m in MODEL_NAMES for i in IMPLEMENTATIONS], ids=lambda p: f"{p[0]}-{p[1]}")
def model(request, models_by_implementation):
    if request.param not in models_by_implementation:
        pytest.skip(f"{request.param[0]}: needs ../shared/data/real_configs (not present in this clone)")
    loaded = models_by_implementation[request.param]
    assert loaded.model.config.text_config._attn_implementation == request.param[1]
    return loaded


def _image_inputs(loaded, batch: int = 1) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    inputs = loaded.adapter.build_inputs(image, "What is behind the television?")
    inputs.pop("attention_mask", None)
    return {
        "input_ids": inputs["input_ids"].repeat(batch, 1),
        "pixel_values": inputs["pixel_values"].repeat(batch, 1, 1, 1),
    }


def _logits(loaded, inputs, blocks=None, pre_decoder_hook=None) -> torch.Tensor:
    """(B, T, vocab) logits of one forward, optionally blocked and with the LM input edited."""
    handle = None
    if pre_decoder_hook is not None:
        handle = loaded.adapter.decoder.register_forward_pre_hook(pre_decoder_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            if blocks is None:
                return loaded.model(**inputs, use_cache=False).logits
            with block_attention(loaded.adapter, blocks):
                return loaded.model(**inputs, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()


# -- (a) invariance ---------------------------------------------------------------------------


def test_blocked_position_cannot_influence_any_other_position(model):
    inputs = _image_inputs(model)
    n_positions = inputs["input_ids"].shape[1]
    layout = model.adapter.image_token_layout(inputs["input_ids"][0], inputs)
    j = int(layout.positions[layout.n_tokens // 2])
    block = AttentionBlock.of([j], range(j + 1, n_positions), range(model.adapter.n_layers))

    def perturb(module, args, kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        embeds[:, j] += 3.0 * torch.randn(embeds.shape[-1], generator=torch.Generator().manual_seed(0))
        return args, {**kwargs, "inputs_embeds": embeds}

    blocked = _logits(model, inputs, [block])
    blocked_perturbed = _logits(model, inputs, [block], perturb)
    others = [p for p in range(n_positions) if p != j]
    torch.testing.assert_close(blocked_perturbed[0, others], blocked[0, others], atol=1e-6, rtol=0)
    assert (blocked_perturbed[0, j] - blocked[0, j]).abs().max() > 1e-3  # the perturbation is real

    # Without the block the same perturbation reaches every later position: the test can fail.
    plain = _logits(model, inputs)
    plain_perturbed = _logits(model, inputs, None, perturb)
    torch.testing.assert_close(plain_perturbed[0, :j], plain[0, :j], atol=1e-6, rtol=0)
    later_change = (plain_perturbed[0, j + 1 :] - plain[0, j + 1 :]).abs().amax(-1)
    assert bool((later_change > 1e-4).all())


# -- (b) independent recomputation ------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _manual_attention(module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: np.ndarray):
    """Self-attention output (B, T, d_model) recomputed from the module's weights.

    hidden: (B, T, d_model) the module's input; cos, sin: (B, T, rotary_dim) rotary tables;
    allowed: (B, T, T) bool, True where query t may attend to key s.
    """
    config = module.config
    n_heads, n_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, module.head_dim
    batch, n_positions, _ = hidden.shape
    if hasattr(module, "qkv_proj"):  # Phi-3: one fused projection, q then k then v
        qkv = module.qkv_proj(hidden)
        q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    else:
        q, k, v = module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden)
    q = q.view(batch, n_positions, n_heads, head_dim).transpose(1, 2).double()
    k = k.view(batch, n_positions, n_kv, head_dim).transpose(1, 2).double()
    v = v.view(batch, n_positions, n_kv, head_dim).transpose(1, 2).double()
    rotary = cos.shape[-1]
    cos, sin = cos[:, None].double(), sin[:, None].double()
    q = torch.cat([q[..., :rotary] * cos + _rotate_half(q[..., :rotary]) * sin, q[..., rotary:]], -1)
    k = torch.cat([k[..., :rotary] * cos + _rotate_half(k[..., :rotary]) * sin, k[..., rotary:]], -1)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(~torch.from_numpy(allowed)[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    out = out.transpose(1, 2).reshape(batch, n_positions, n_heads * head_dim).to(hidden.dtype)
    return module.o_proj(out)


def _allowed_from_lists(n_positions: int, blocks: list[AttentionBlock], layer: int) -> np.ndarray:
    """(B, T, T) bool written out pair by pair: causal, minus blocked pairs, self always kept."""
    allowed = np.zeros((len(blocks), n_positions, n_positions), dtype=bool)
    for b, block in enumerate(blocks):
        for t in range(n_positions):
            allowed[b, t, : t + 1] = True
        if layer in block.layers:
            for t in block.targets:
                for s in block.sources:
                    if s != t:
                        allowed[b, t, s] = False
    return allowed


def test_blocked_attention_equals_manual_masked_attention(model):
    adapter = model.adapter
    inputs = _image_inputs(model, batch=3)
    n_positions = inputs["input_ids"].shape[1]
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    image = layout.positions.tolist()
    last_layer = adapter.n_layers - 1
    blocks = [
        # the last position may not see the first half of the image, in layers 0 and last
        AttentionBlock.of(image[: len(image) // 2], [n_positions - 1], [0, last_layer]),
        # the last image row may not see the rest of the image (and overlaps it: self kept), layer 1
        AttentionBlock.of(image[: -layout.grid_cols], image[-layout.grid_cols - 3 :], [1]),
        NO_BLOCK,
    ]
    captured: dict[int, dict] = {}
    handles = []
    for layer in range(adapter.n_layers):
        module = adapter.attention_module(layer)

        def grab_inputs(module, args, kwargs, layer=layer):
            captured[layer] = {"hidden": kwargs["hidden_states"], "rotary": kwargs["position_embeddings"]}

        def grab_output(module, args, kwargs, output, layer=layer):
            captured[layer]["output"] = output[0]

        handles.append(module.register_forward_pre_hook(grab_inputs, with_kwargs=True))
        handles.append(module.register_forward_hook(grab_output, with_kwargs=True))
    try:
        _logits(model, inputs, blocks)
    finally:
        for handle in handles:
            handle.remove()

    with torch.no_grad():
        for layer in range(adapter.n_layers):
            module = adapter.attention_module(layer)
            hidden, (cos, sin), output = captured[layer]["hidden"], captured[layer]["rotary"], captured[layer]["output"]
            allowed = _allowed_from_lists(n_positions, blocks, layer)
            expected = _manual_attention(module, hidden, cos, sin, allowed)
            torch.testing.assert_close(output, expected, atol=2e-5, rtol=1e-4)
            plain = _manual_attention(module, hidden, cos, sin, _allowed_from_lists(n_positions, [NO_BLOCK] * 3, layer))
            for b, block in enumerate(blocks):
                changed = (output[b] - plain[b]).abs().amax(-1) > 1e-4
                if layer in block.layers and not block.is_empty:
                    # The block did something at its targets and nothing anywhere else.
                    assert bool(changed[list(block.targets)].all())
                    assert not bool(changed[[p for p in range(n_positions) if p not in block.targets]].any())
                else:
                    torch.testing.assert_close(output[b], plain[b], atol=2e-5, rtol=1e-4)


# -- (c) empty blocks, (d) batches ---------------------------------------------------------------


def test_blocking_nothing_is_the_plain_forward_exactly(model):
    inputs = _image_inputs(model, batch=2)
    plain = _logits(model, inputs)
    n = model.adapter.n_layers
    empty_blocks = [NO_BLOCK, AttentionBlock.of([], [5], range(n))]
    assert torch.equal(_logits(model, inputs, empty_blocks), plain)
    assert torch.equal(_logits(model, inputs, [AttentionBlock.of([3], [5], []), NO_BLOCK]), plain)


def test_batch_of_different_blocks_equals_one_at_a_time(model):
    n_layers = model.adapter.n_layers
    single = _image_inputs(model)
    n_positions = single["input_ids"].shape[1]
    image = model.adapter.image_token_layout(single["input_ids"][0], single).positions.tolist()
    blocks = [
        AttentionBlock.of(image[:200], [n_positions - 1], range(n_layers)),
        NO_BLOCK,
        AttentionBlock.of(image[100:400], image[-24:] + [n_positions - 1], range(1, n_layers)),
    ]
    batched = _logits(model, _image_inputs(model, batch=len(blocks)), blocks)
    for b, block in enumerate(blocks):
        alone = _logits(model, single, [block])
        torch.testing.assert_close(batched[b], alone[0], atol=1e-5, rtol=1e-5)
    # and the blocks did differ from each other
    assert (batched[0, -1] - batched[1, -1]).abs().max() > 1e-3


# -- (e) padding ----------------------------------------------------------------------------------


def test_left_padded_batch_equals_unpadded_runs(model):
    tokenizer = model.adapter.tokenizer
    tokenizer_padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        texts = ["What is behind the television? It is a cat on a couch with a remote", "Is there a dog?"]
        padded = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = tokenizer_padding_side
    n_padded = padded["input_ids"].shape[1]
    short = tokenizer([texts[1]], return_tensors="pt")
    n_short = short["input_ids"].shape[1]
    pad = n_padded - n_short
    assert pad > 0 and bool((padded["attention_mask"][1, :pad] == 0).all())
    long_block = AttentionBlock.of(range(2, 8), range(9, n_padded), range(model.adapter.n_layers))
    short_block = AttentionBlock.of([1, 2], [n_short - 1], [0])
    shifted_short_block = AttentionBlock.of([pad + 1, pad + 2], [pad + n_short - 1], [0])

    with torch.no_grad(), block_attention(model.adapter, [long_block, shifted_short_block]) as stats:
        batched = model.model(**padded, use_cache=False).logits
    implementation = model.model.config.text_config._attn_implementation
    assert set(stats.mask_kinds) == {"bool" if implementation == "sdpa" else "float"}

    with torch.no_grad():
        with block_attention(model.adapter, [long_block]):
            long_alone = model.model(input_ids=padded["input_ids"][:1], use_cache=False).logits
        with block_attention(model.adapter, [short_block]):
            short_alone = model.model(**short, use_cache=False).logits
        short_plain = model.model(**short, use_cache=False).logits
    torch.testing.assert_close(batched[0], long_alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1, pad:], short_alone[0], atol=1e-4, rtol=1e-4)
    assert (short_alone[0, -1] - short_plain[0, -1]).abs().max() > 1e-4


# -- mask forms and refusals ------------------------------------------------------------------------


def test_combine_mask_handles_every_form_without_touching_the_shared_mask():
    n = 4
    blocked = torch.zeros(2, 1, n, n, dtype=torch.bool)
    blocked[1, 0, 3, 1] = True
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    expected_allowed = causal.expand(2, 1, n, n).clone()
    expected_allowed[1, 0, 3, 1] = False

    assert torch.equal(combine_mask(None, blocked, "sdpa", torch.float32), expected_allowed)
    # eager with no mask masks nothing; only the blocked pair is removed
    eager_none = combine_mask(None, blocked, "eager", torch.float32)
    assert eager_none.dtype == torch.float32 and bool((eager_none < 0).sum() == 1)

    shared_bool = causal[None, None].clone()
    before = shared_bool.clone()
    assert torch.equal(combine_mask(shared_bool, blocked, "sdpa", torch.float32), expected_allowed)
    assert torch.equal(shared_bool, before)

    minimum = torch.finfo(torch.float16).min
    shared_float = torch.where(causal, 0.0, minimum).to(torch.float16)[None, None].expand(2, 1, n, n).clone()
    before = shared_float.clone()
    combined = combine_mask(shared_float, blocked, "eager", torch.float16)
    assert combined.dtype == torch.float16
    assert torch.equal(combined == 0, expected_allowed)
    assert torch.equal(shared_float, before)


def test_a_query_blocked_from_every_key_still_sees_itself(model):
    inputs = _image_inputs(model)
    n_positions = inputs["input_ids"].shape[1]
    everything = AttentionBlock.of(range(n_positions), [n_positions - 1, 10], range(model.adapter.n_layers))
    logits = _logits(model, inputs, [everything])
    assert bool(torch.isfinite(logits).all())


def test_flash_attention_and_bad_blocks_are_refused(model):
    with pytest.raises(UserError, match="flash_attention_2"):
        check_implementation("flash_attention_2")
    with pytest.raises(UserError, match="flex_attention"):
        check_implementation("flex_attention")
    adapter = SimpleNamespace(
        n_layers=1,
        attention_module=lambda layer: SimpleNamespace(
            config=SimpleNamespace(_attn_implementation="flash_attention_2")
        ),
    )
    with pytest.raises(UserError, match="sdpa"):
        with block_attention(adapter, [AttentionBlock.of([0], [1], [0])]):
            pass

    inputs = _image_inputs(model)
    n_positions = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match="outside"):
        _logits(model, inputs, [AttentionBlock.of([0], [1], [model.adapter.n_layers])])
    with pytest.raises(ValueError, match="sequence has"):
        _logits(model, inputs, [AttentionBlock.of([n_positions], [1], [0])])
    with pytest.raises(ValueError, match="batch of 1"):
        _logits(model, inputs, [AttentionBlock.of([0], [1], [0]), NO_BLOCK])
    with pytest.raises(ValueError, match="negative"):
        AttentionBlock.of([-1], [1], [0])
