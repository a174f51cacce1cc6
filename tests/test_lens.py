"""The logit lens against the model's own logits and an independent recomputation."""

from __future__ import annotations

import pytest
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
        normed = (
            hidden[0].float()
            if layer == len(hidden_states) - 1
            else _manual_rms_norm(hidden[0], norm_weight, text_config.rms_norm_eps)
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


# -- the buffered, chunked readout against the straightforward one --------------------------


def _reference_top_k(lens, hidden_states, k, batch_index=0):
    """The straightforward readout: every layer's logits (one module call each), softmax over
    the full float32 logits, the k best ids by a stable sort of the full logits (ties: the
    lower id first, the lens's documented order) and the probabilities at those ids.
    Returns ids, probs (layers, T, k), the full probabilities of every layer, and
    `torch.topk` of those probabilities (ids, values) as the lens ranked before."""
    one = [hidden[batch_index : batch_index + 1] for hidden in hidden_states]
    ids, probs, full, topk_ids, topk_values = [], [], [], [], []
    for layer in range(len(one)):
        logits = lens.layer_logits(one, layer)[0].float()
        p = torch.softmax(logits, dim=-1)
        best = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
        ids.append(best)
        probs.append(p.gather(-1, best))
        full.append(p)
        top = torch.topk(p, k + 1, dim=-1)
        topk_ids.append(top.indices[:, :k])
        topk_values.append(top.values)
    return torch.stack(ids), torch.stack(probs), full, torch.stack(topk_ids), torch.stack(topk_values)


def _assert_same_readout(readout, reference):
    """Ids and probabilities equal bit for bit to the reference (ties included: the lower id
    ranks first). Against `torch.topk` of the probabilities (the ranking before the
    blockwise top-k): the same ids wherever the k + 1 best probabilities are distinct (at
    an exact tie `torch.topk` may return any of the tied ids)."""
    ref_ids, ref_probs, full, topk_ids, topk_values = reference
    assert readout.token_ids.shape == ref_ids.shape and readout.probs.dtype == torch.float32
    assert torch.equal(readout.token_ids, ref_ids)
    assert torch.equal(readout.probs, ref_probs)
    for layer, p in enumerate(full):
        assert torch.equal(p.gather(-1, readout.token_ids[layer]), ref_probs[layer])
    k = ref_ids.shape[-1]
    assert (readout.token_ids.sort(-1).values.diff(dim=-1) != 0).all() or k == 1
    distinct = (topk_values[..., :-1] - topk_values[..., 1:]).abs().min(-1).values > 0
    assert distinct.float().mean() > 0.5  # the comparison below is not vacuous
    assert torch.equal(readout.token_ids[distinct], topk_ids[distinct])
    assert torch.equal(readout.probs[distinct], topk_values[..., :k][distinct])


@pytest.mark.parametrize("vocab", [32064, 32000, 1200, 7 * 64, 100])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_top_k_ids_ranks_by_logit_then_lower_id(vocab, k):
    """The blockwise top-k against a stable sort of whole rows, on logits with no ties, with
    bf16-like ties, with few distinct values, all equal, and with equal block maxima; on
    vocabularies that are and are not multiples of the block, and smaller than k + 1 blocks."""
    from collector.lens.lens import _stable_block_top_k, top_k_ids

    generator = torch.Generator().manual_seed(vocab + k)
    rows = 70
    distinct = torch.randn(rows, vocab, generator=generator)
    block_ties = distinct.clone()
    block_ties[:, ::64] = 10.0
    block_ties[:, 5] = 10.0
    cases = {
        "distinct": distinct,
        "bf16": (4 * distinct).bfloat16().float(),
        "few values": torch.randint(0, 6, (rows, vocab), generator=generator).float(),
        "all equal": torch.zeros(rows, vocab),
        "block ties": block_ties,
    }
    for name, logits in cases.items():
        expected = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(top_k_ids(logits, k), expected), name
        out = torch.empty(rows, k, dtype=torch.int64)
        assert top_k_ids(logits, k, out=out) is out and torch.equal(out, expected), name
        if vocab >= 64 * (k + 1):  # the sync-free path other devices take
            assert torch.equal(_stable_block_top_k(logits, k), expected), name


def test_buffered_readout_equals_full_softmax_reference_fp32(loaded):
    _, outputs = _forward(loaded)
    lens = LogitLens(loaded.adapter)
    _assert_same_readout(lens.top_k(outputs.hidden_states, k=5), _reference_top_k(lens, outputs.hidden_states, 5))


@pytest.mark.parametrize("loaded", ["llava-1.5"], indirect=True)  # one model: the other families repeat it
def test_buffered_readout_in_bf16_equals_full_softmax_of_bf16_logits(loaded):
    """bf16 model: the unembedding runs in bf16 (as the model's own lm_head does), the softmax in
    float32 over the widened logits: exactly the straightforward `softmax(logits.float())`.
    bf16 logits tie often (8-bit mantissa): tied ids rank lowest id first, as the
    reference's stable sort does. Against the fp32 model the probabilities then differ by
    bf16 rounding of the weights, hidden states and logits: within 0.05 absolute here."""
    import copy

    model = copy.deepcopy(loaded.model).to(torch.bfloat16)
    adapter = type(loaded.adapter)(model, loaded.adapter.processor, loaded.adapter.prompt_template)
    inputs = adapter.build_inputs(Image.new("RGB", (500, 375), (120, 30, 200)), "Describe the image.")
    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True, use_cache=False)
    assert outputs.logits.dtype == torch.bfloat16
    lens = LogitLens(adapter)
    readout = lens.top_k(outputs.hidden_states, k=4, final_logits=outputs.logits)
    _assert_same_readout(readout, _reference_top_k(lens, outputs.hidden_states, 4))
    assert torch.equal(readout.token_ids, lens.top_k(outputs.hidden_states, k=4).token_ids)
    _, fp32_outputs = _forward(loaded)
    fp32 = LogitLens(loaded.adapter).top_k(fp32_outputs.hidden_states, k=4)
    torch.testing.assert_close(readout.probs, fp32.probs, atol=0.05, rtol=0)


@pytest.mark.parametrize("loaded", ["llava-1.5", "llava-1.5-real-config"], indirect=True)  # the real 32,064 vocabulary
def test_chunked_readout_equals_unchunked_exactly(loaded):
    from collector.lens.lens import ROW_ALIGN, chunk_bounds

    _, outputs = _forward(loaded)
    lens = LogitLens(loaded.adapter)
    whole = lens.top_k(outputs.hidden_states, k=3)
    n_positions = outputs.hidden_states[0].shape[1]
    vocab = outputs.logits.shape[-1]
    assert n_positions > 3 * ROW_ALIGN
    for kwargs in ({"chunk_positions": 1}, {"chunk_positions": 200}, {"max_chunk_bytes": 3 * ROW_ALIGN * vocab * 4}):
        chunked = lens.top_k(outputs.hidden_states, k=3, **kwargs)
        assert torch.equal(chunked.token_ids, whole.token_ids), kwargs
        assert torch.equal(chunked.probs, whole.probs), kwargs
    # Chunks tile the positions, start on ROW_ALIGN boundaries, and none is shorter than
    # ROW_ALIGN (a short remainder joins the chunk before it).
    for n in (1, ROW_ALIGN - 1, ROW_ALIGN, ROW_ALIGN + 1, 577, n_positions):
        for rows in (ROW_ALIGN, 2 * ROW_ALIGN, 1024):
            bounds = chunk_bounds(n, rows)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert all(start % ROW_ALIGN == 0 for start, _ in bounds)
            assert len(bounds) == 1 or min(end - start for start, end in bounds) >= ROW_ALIGN
            assert max(end - start for start, end in bounds) < rows + ROW_ALIGN


def test_chunk_size_keeps_buffers_within_the_byte_limit():
    from collector.lens.lens import DEFAULT_MAX_CHUNK_BYTES, ROW_ALIGN, chunk_rows

    for vocab, bytes_per_value in ((32064, 4), (32064, 6), (152064, 6), (262208, 4), (262208, 6)):
        per_row = vocab * bytes_per_value
        rows = chunk_rows(100_000, per_row)
        assert rows % ROW_ALIGN == 0
        assert (rows + ROW_ALIGN - 1) * per_row <= DEFAULT_MAX_CHUNK_BYTES  # joined remainder included
        assert (rows + 2 * ROW_ALIGN - 1) * per_row > DEFAULT_MAX_CHUNK_BYTES  # and no smaller than need be
    assert chunk_rows(600, 32064 * 4) == 640  # a whole LLaVA-1.5 sequence is one chunk
    assert chunk_rows(600, 32064 * 4, chunk_positions=100) == 128


def test_final_logits_stand_in_for_the_last_layer(loaded):
    _, outputs = _forward(loaded)
    lens = LogitLens(loaded.adapter)
    computed = lens.top_k(outputs.hidden_states, k=4)
    before = outputs.logits.clone()
    reused = lens.top_k(outputs.hidden_states, k=4, final_logits=outputs.logits)
    assert torch.equal(reused.token_ids, computed.token_ids)
    assert torch.equal(reused.probs, computed.probs)
    assert torch.equal(outputs.logits, before)  # read in place, not written
    # Logits that are not contiguous float32 rows are widened into the buffer first.
    strided = outputs.logits.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    for final in (strided, outputs.logits.double()):
        again = lens.top_k(outputs.hidden_states, k=4, final_logits=final)
        assert torch.equal(again.token_ids, computed.token_ids) and torch.equal(again.probs, computed.probs)
    # The last layer really is read from final_logits (and only the last layer).
    shuffled = outputs.logits.flip(-1)
    other = lens.top_k(outputs.hidden_states, k=4, final_logits=shuffled)
    vocab = outputs.logits.shape[-1]
    assert torch.equal(other.token_ids[:-1], computed.token_ids[:-1])
    assert torch.equal(other.token_ids[-1], vocab - 1 - computed.token_ids[-1])
    with pytest.raises(ValueError, match="final_logits"):
        lens.top_k(outputs.hidden_states, k=4, final_logits=outputs.logits[:, -1:])


@pytest.mark.parametrize("loaded", ["llava-1.5"], indirect=True)  # one model: the other families repeat it
def test_batch_index_selects_one_sequence(loaded):
    _, first = _forward(loaded)
    _, second = _forward(loaded, image=Image.new("RGB", (320, 480), (10, 200, 90)), question="What is it?")
    n = min(first.hidden_states[0].shape[1], second.hidden_states[0].shape[1])
    one = [h[:, :n] for h in second.hidden_states]
    batch = [torch.cat([a[:, :n], b[:, :n]]) for a, b in zip(first.hidden_states, second.hidden_states)]
    logits = torch.cat([first.logits[:, :n], second.logits[:, :n]])
    lens = LogitLens(loaded.adapter)
    alone = lens.top_k(one, k=3)
    picked = lens.top_k(batch, k=3, batch_index=1, final_logits=logits)
    assert torch.equal(picked.token_ids, alone.token_ids) and torch.equal(picked.probs, alone.probs)
    first_alone = lens.top_k([h[:, :n] for h in first.hidden_states], k=3)
    assert torch.equal(lens.top_k(batch, k=3, batch_index=0).probs, first_alone.probs)
    assert not torch.equal(first_alone.probs, alone.probs)


@pytest.mark.parametrize("loaded", ["llava-1.5"], indirect=True)  # one model: the other families repeat it
def test_softcapped_unembedding_takes_the_fast_path_and_stays_exact(loaded):
    """A Gemma-style softcapping unembedding: the in-place cap on the buffer gives exactly
    the wrapper module's logits (its own ops and order)."""
    from collector.lens.lens import _fast_weight
    from collector.readout import Readout, SoftcappedUnembedding

    _, outputs = _forward(loaded)
    capped = SoftcappedUnembedding(loaded.model.lm_head, 0.5)
    lens = LogitLens(loaded.adapter, Readout(loaded.adapter.final_norm, loaded.model.lm_head, 0.5))
    assert _fast_weight(loaded.model.lm_head) is loaded.model.lm_head.weight
    raw = loaded.model.lm_head(outputs.hidden_states[-1])
    assert not torch.allclose(capped(outputs.hidden_states[-1]), raw, atol=1e-3)  # the cap matters
    # The fast path's in-place cap equals the wrapper module's ops at the last layer.
    assert torch.equal(lens.layer_logits(outputs.hidden_states, -1), capped(outputs.hidden_states[-1]))
    reference = _reference_top_k(lens, outputs.hidden_states, 4)
    _assert_same_readout(lens.top_k(outputs.hidden_states, k=4), reference)
    _assert_same_readout(lens.top_k(outputs.hidden_states, k=4, chunk_positions=64), reference)


@pytest.mark.parametrize("loaded", ["llava-1.5"], indirect=True)  # one model: the other families repeat it
def test_hooked_or_custom_unembeddings_are_called_as_modules(loaded):
    """Hooks (and accelerate's wrappers, biases, custom linears) must see every call: such an
    unembedding is called per chunk, with the same results as the fast path."""
    from collector.lens.lens import _fast_weight, chunk_bounds

    _, outputs = _forward(loaded)
    lens = LogitLens(loaded.adapter)
    fast = lens.top_k(outputs.hidden_states, k=3)
    head = loaded.model.lm_head
    assert _fast_weight(head) is not None
    calls = []
    handle = head.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape)))
    try:
        assert _fast_weight(head) is None
        hooked = lens.top_k(outputs.hidden_states, k=3, chunk_positions=256)
    finally:
        handle.remove()
    n_positions, vocab = outputs.logits.shape[1:]
    bounds = chunk_bounds(n_positions, 256)
    assert len(bounds) > 1
    assert calls == [(1, end - start, vocab) for start, end in bounds] * len(outputs.hidden_states)
    assert torch.equal(hooked.token_ids, fast.token_ids) and torch.equal(hooked.probs, fast.probs)
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    assert _fast_weight(biased) is None


def test_no_vocabulary_sized_allocation_per_layer(loaded):
    """The logits buffer is allocated once per call, not once per layer: count allocations of
    at least half a (positions x vocab) float32 matrix made by any op during top_k."""
    from torch.profiler import ProfilerActivity, profile

    _, outputs = _forward(loaded)
    n_positions, vocab = outputs.logits.shape[1:]
    threshold = n_positions * vocab * 4 // 2
    lens = LogitLens(loaded.adapter)

    def big_allocations(run):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        return [e.name for e in prof.events() if e.self_cpu_memory_usage >= threshold]

    assert len(big_allocations(lambda: lens.top_k(outputs.hidden_states, k=5))) == 1
    assert len(big_allocations(lambda: lens.top_k(outputs.hidden_states, k=5, final_logits=outputs.logits))) == 1
    # The check can see per-layer allocations: the straightforward readout makes them.
    n_entries = len(outputs.hidden_states)
    assert len(big_allocations(lambda: _reference_top_k(lens, outputs.hidden_states, 5))) >= 2 * n_entries


def test_lens_table_token_text_per_cell():
    """The lens table's dictionary-encoded token text (ids deduplicated by a presence table)
    reads back as each cell's own token's text, and `distinct_ids` equals a set union."""
    import numpy as np

    from collector.tables import distinct_ids, lens_table

    rng = np.random.default_rng(0)
    token_ids = rng.integers(0, 32064, (4, 37, 3))
    probs = rng.random((4, 37, 3)).astype(np.float32)
    text = {i: f"<{i}>" for i in range(32064)}
    table = lens_table("run", 7, token_ids, probs, text)
    assert table.column("token").to_pylist() == [text[int(i)] for i in token_ids.reshape(-1)]
    assert table.column("token_id").to_pylist() == token_ids.reshape(-1).tolist()
    extra = np.array([1, 2, 32000])
    assert distinct_ids(token_ids, extra) == sorted(set(token_ids.reshape(-1).tolist()) | {1, 2, 32000})
    assert distinct_ids(np.array([], dtype=np.int64)) == []
