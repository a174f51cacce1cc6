"""Lenses: read a decoder's hidden states as next-token distributions.

`LogitLens` applies the model's own read-out (final norm, unembedding, and the final-logit
softcap where the model has one; `collector.readout`) to every layer's hidden state at every
position, and keeps the top-k tokens of every (layer, position) cell.

How `top_k` works (the lens at its arithmetic floor):

- Work space is allocated once per call and reused by every layer: one float32 logits
  buffer of (chunk rows, vocab), plus one buffer in the model's dtype where that is not
  float32; the top-k ids and probabilities of all layers go into (layers, positions, k)
  tensors on the unembedding's device. No layer allocates a vocabulary-sized tensor.
- Positions are processed in chunks of whole rows, so the logits buffers hold at most
  `max_chunk_bytes` (default 256 MiB: with LLaVA-1.5's 32,064-token vocabulary up to
  1,984 positions per chunk in fp32 and 1,280 in bf16, so a whole 600-token sequence is one
  chunk; with Gemma 3's 262k vocabulary 192 in fp32 and 64 in bf16). Chunks are multiples of `ROW_ALIGN` rows and a short remainder joins the
  chunk before it, so the matrix multiply sees the same row blocks as an unchunked one:
  on CPU a chunked readout equals an unchunked one bit for bit (tested).
- The unembedding runs as `torch.mm(..., out=buffer)` in the model's dtype (fp32, bf16 or
  fp16: the same product the model's own lm_head computes), then the logits are widened
  into the float32 buffer. A softcapping unembedding (Gemma-family `final_logit_softcapping`)
  applies its cap in place on that buffer in the model's own op order. An unembedding the
  fast path cannot reproduce (a bias, forward hooks, accelerate's device hooks, a
  quantized or otherwise custom module) is called as a module per chunk instead, which is
  always exact.
- Numerics: the top-k ids are taken from the float32 logits (ranks by logit are meaningful
  even where a probability underflows to 0) by `top_k_ids`: blockwise (the maxima of
  64-id blocks pick k candidate blocks, only those are ranked; on CPU about a fifth of
  `torch.topk`'s time over 32k logits), and exact, with a fixed order at equal logits (the
  lower id first; `torch.topk` leaves it unspecified, so ids differ from it only there).
  Then the buffer is turned into probabilities in place by torch's softmax kernel in
  float32 (max-subtracted exp, float32 sum) and the k probabilities are gathered at those
  ids. (A log-sum-exp without the softmax's write is not cheaper in torch on CPU: its
  exp alone costs more than the in-place softmax kernel, measured.) The probabilities
  are therefore exactly `torch.softmax(logits.float(), -1)` at those ids, for fp32 and
  bf16/fp16 models alike; only the matmul runs in the model's dtype, as in the model.
- The model's own final logits can stand in for the last layer (`final_logits=`): that
  layer's lens equals the logits exactly anyway, so the last matmul is skipped (float32
  logits are ranked and softmaxed straight from the model's tensor, which is not changed;
  others are widened into the buffer first).
- Nothing waits for the device inside the loop: results stay on the device and come to the
  host once per image (`.cpu()` of the ids and of the probabilities at the end).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from collector.adapters import ModelAdapter
from collector.readout import Readout, param_device

# Upper bound of the logits work space of one `top_k` call, in bytes.
DEFAULT_MAX_CHUNK_BYTES = 256 * 2**20
# Chunks are multiples of this many positions (rows of the matrix multiply).
ROW_ALIGN = 64

# Writes the logits of positions [start, end) of one layer into `out` (end - start, vocab)
# float32; `work` is a buffer of the same shape in the unembedding's dtype, or None.
ChunkWriter = Callable[[int, int, torch.Tensor, torch.Tensor | None], None]


@dataclass(frozen=True)
class LensTopK:
    """Top-k lens readout of one sequence.

    token_ids: (n_layers + 1, T, k) int64; layer 0 is the input embeddings.
    probs: (n_layers + 1, T, k) float32, softmax probabilities, descending along k.
    """

    token_ids: torch.Tensor
    probs: torch.Tensor

    @property
    def n_layers(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def n_positions(self) -> int:
        return int(self.token_ids.shape[1])

    @property
    def k(self) -> int:
        return int(self.token_ids.shape[2])


@dataclass(frozen=True)
class _Workspace:
    """What the logits of a lens look like: vocabulary size, dtype, device."""

    vocab_size: int
    dtype: torch.dtype
    device: torch.device


def chunk_bounds(n_positions: int, rows: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk: `rows` positions each; a remainder shorter than
    ROW_ALIGN joins the chunk before it (so no chunk but a whole short sequence is shorter
    than ROW_ALIGN rows, and chunk starts fall on ROW_ALIGN boundaries)."""
    bounds = [(start, min(n_positions, start + rows)) for start in range(0, n_positions, rows)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < ROW_ALIGN:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def chunk_rows(
    n_positions: int,
    bytes_per_row: int,
    chunk_positions: int | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> int:
    """Positions per chunk: `chunk_positions` rounded up to a multiple of ROW_ALIGN, or the
    most whole ROW_ALIGN blocks whose buffers (plus a joined remainder of up to
    ROW_ALIGN - 1 rows) fit `max_chunk_bytes`; at least ROW_ALIGN."""
    if chunk_positions is not None:
        if chunk_positions < 1:
            raise ValueError("chunk_positions must be at least 1")
        rows = -(-chunk_positions // ROW_ALIGN) * ROW_ALIGN
    else:
        rows = (max_chunk_bytes // max(1, bytes_per_row) - (ROW_ALIGN - 1)) // ROW_ALIGN * ROW_ALIGN
    return max(ROW_ALIGN, min(rows, -(-n_positions // ROW_ALIGN) * ROW_ALIGN))


class Lens(ABC):
    """Maps the hidden state after a layer to logits over the vocabulary."""

    @abstractmethod
    def layer_logits(self, hidden_states: Sequence[torch.Tensor], layer: int) -> torch.Tensor:
        """Logits (B, T, vocab) read from `hidden_states[layer]`.

        hidden_states: the model's `output_hidden_states` tuple, n_layers + 1 entries of
        (B, T, d_model); entry 0 is the input embeddings.
        """

    # -- the buffered readout; subclasses may write chunks without allocating --------------

    def _workspace(self, hidden_states: Sequence[torch.Tensor]) -> _Workspace:
        """Vocabulary size, dtype and device of this lens's logits (default: read from one
        position of layer 0)."""
        probe = self.layer_logits(_Positions(hidden_states, 0, 1), 0)
        return _Workspace(int(probe.shape[-1]), probe.dtype, probe.device)

    def _layer_writer(self, hidden_states: Sequence[torch.Tensor], layer: int) -> ChunkWriter:
        """Writes a chunk of `layer`'s logits (default: `layer_logits` of the chunk's positions)."""

        def write(start: int, end: int, out: torch.Tensor, work: torch.Tensor | None) -> None:
            out.copy_(self.layer_logits(_Positions(hidden_states, start, end), layer)[0])

        return write

    @torch.no_grad()
    def top_k(
        self,
        hidden_states: Sequence[torch.Tensor],
        k: int,
        batch_index: int = 0,
        *,
        final_logits: torch.Tensor | None = None,
        chunk_positions: int | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> LensTopK:
        """Top-k tokens and probabilities at every layer and position of one sequence.

        final_logits: the model's own logits (B, T, vocab) from the same forward; when given,
            the last layer reads them instead of recomputing them (identical values).
        chunk_positions: positions per chunk (rounded up to a multiple of ROW_ALIGN);
            default: as many as fit `max_chunk_bytes` of logits buffers.
        Extra memory: the logits buffers (at most max_chunk_bytes, or ROW_ALIGN rows where
        one block of rows is larger), one layer's normed hidden states (T, d_model), the
        top-k's work space, at most chunk rows * (vocab / 16 + (k * 64 + 63) * 12) bytes
        (block maxima and candidates: 3.9 MB for 593 LLaVA-1.5 positions at k = 5), and the
        results, (n_layers + 1) * T * k * 12 bytes.
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        one_sequence = _OneSequence(hidden_states, batch_index)
        n_entries = len(hidden_states)
        n_positions = int(hidden_states[0].shape[1])
        readout = self._workspace(one_sequence)
        vocab = readout.vocab_size
        k = min(k, vocab)
        if final_logits is not None:
            expected = (n_positions, vocab)
            if final_logits.dim() != 3 or tuple(final_logits.shape[1:]) != expected:
                raise ValueError(
                    f"final_logits must be (B, {n_positions}, {vocab}) logits of every position, "
                    f"got {tuple(final_logits.shape)}"
                )
        narrow = readout.dtype != torch.float32
        bytes_per_row = vocab * (4 + (torch.empty((), dtype=readout.dtype).element_size() if narrow else 0))
        rows = chunk_rows(n_positions, bytes_per_row, chunk_positions, max_chunk_bytes)
        bounds = chunk_bounds(n_positions, rows)
        buffer_rows = max(end - start for start, end in bounds)
        device = readout.device
        logits = torch.empty(buffer_rows, vocab, dtype=torch.float32, device=device)
        work = torch.empty(buffer_rows, vocab, dtype=readout.dtype, device=device) if narrow else None
        token_ids = torch.empty(n_entries, n_positions, k, dtype=torch.int64, device=device)
        probs = torch.empty(n_entries, n_positions, k, dtype=torch.float32, device=device)
        for layer in range(n_entries):
            reuse_final = final_logits is not None and layer == n_entries - 1
            write = None if reuse_final else self._layer_writer(one_sequence, layer)
            for start, end in bounds:
                n = end - start
                chunk = logits[:n]
                source = chunk  # the float32 logits of these positions
                if reuse_final:
                    source = final_logits[batch_index, start:end]
                    if source.dtype != torch.float32 or source.device != device or not source.is_contiguous():
                        source = chunk.copy_(source)  # widened into the buffer
                else:
                    write(start, end, chunk, None if work is None else work[:n])
                ids = token_ids[layer, start:end]
                top_k_ids(source, k, out=ids)  # ranked by logit (ties: the lower id)
                torch.softmax(source, dim=-1, out=chunk)  # the float32 kernel, in place or from the model's logits
                torch.gather(chunk, -1, ids, out=probs[layer, start:end])
            del write
        return LensTopK(token_ids.cpu(), probs.cpu())


class _OneSequence(Sequence[torch.Tensor]):
    """`hidden_states` restricted to one batch element, sliced lazily per layer."""

    def __init__(self, hidden_states: Sequence[torch.Tensor], batch_index: int) -> None:
        self._hidden_states = hidden_states
        self._batch_index = batch_index

    def __len__(self) -> int:
        return len(self._hidden_states)

    def __getitem__(self, layer):
        return self._hidden_states[layer][self._batch_index : self._batch_index + 1]


class _Positions(Sequence[torch.Tensor]):
    """`hidden_states` restricted to positions [start, end), sliced lazily per layer."""

    def __init__(self, hidden_states: Sequence[torch.Tensor], start: int, end: int) -> None:
        self._hidden_states = hidden_states
        self._start, self._end = start, end

    def __len__(self) -> int:
        return len(self._hidden_states)

    def __getitem__(self, layer):
        return self._hidden_states[layer][:, self._start : self._end]


class LogitLens(Lens):
    """The logit lens: the model's read-out (final norm, unembedding, and the final-logit
    softcap where the model has one; `collector.readout`) at every layer.

    transformers has already applied the final norm to the last entry of
    `hidden_states`, so the norm is applied to every entry but that one; the last
    layer's lens therefore equals the model's own logits.
    """

    def __init__(self, adapter: ModelAdapter, readout: Readout | None = None) -> None:
        self.adapter = adapter
        self.readout = readout if readout is not None else adapter.readout()

    def _is_normed(self, hidden_states: Sequence[torch.Tensor], layer: int) -> bool:
        if layer < 0:
            layer += len(hidden_states)
        return layer == len(hidden_states) - 1 and self.adapter.last_hidden_state_is_normed

    def _normed(self, hidden_states: Sequence[torch.Tensor], layer: int) -> torch.Tensor:
        """hidden_states[layer] through the final norm (all but the already-normed last
        entry), on the unembedding's device."""
        hidden = hidden_states[layer]
        if not self._is_normed(hidden_states, layer):
            norm = self.readout.final_norm
            hidden = norm(hidden.to(param_device(norm, hidden)))
        return hidden.to(param_device(self.readout.lm_head, hidden))

    def layer_logits(self, hidden_states: Sequence[torch.Tensor], layer: int) -> torch.Tensor:
        return self.readout(hidden_states[layer], normed=self._is_normed(hidden_states, layer))

    def _workspace(self, hidden_states: Sequence[torch.Tensor]) -> _Workspace:
        weight = getattr(self.readout.lm_head, "weight", None)
        if weight is None or weight.device.type == "meta" or not weight.is_floating_point():
            return super()._workspace(hidden_states)  # offloaded or quantized: ask the module
        return _Workspace(int(weight.shape[0]), weight.dtype, weight.device)

    def _layer_writer(self, hidden_states: Sequence[torch.Tensor], layer: int) -> ChunkWriter:
        hidden = self._normed(hidden_states, layer)[0]  # (T, d_model), once per layer
        weight = _fast_weight(self.readout.lm_head)
        cap = self.readout.softcap
        if weight is None or hidden.dtype != weight.dtype:
            readout = self.readout

            def call_module(start: int, end: int, out: torch.Tensor, work: torch.Tensor | None) -> None:
                out.copy_(readout(hidden[None, start:end], normed=True)[0])

            return call_module
        hidden = hidden.contiguous()
        transposed = weight.t()

        def write(start: int, end: int, out: torch.Tensor, work: torch.Tensor | None) -> None:
            target = out if work is None else work
            torch.mm(hidden[start:end], transposed, out=target)  # = F.linear, into the buffer
            if cap is not None:  # softcap_logits' own ops, in its order, in place
                target.div_(cap).tanh_().mul_(cap)
            if work is not None:
                out.copy_(work)

        return write


def _fast_weight(lm_head: torch.nn.Module) -> torch.Tensor | None:
    """The weight where `lm_head` is exactly `hidden @ weight.T`; None where only calling
    the module is known to be exact (a bias, hooks, a custom or quantized linear, offloaded
    weights)."""
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None or _hooked(lm_head):
        return None
    weight = lm_head.weight
    if weight.device.type == "meta" or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return weight


def _hooked(module: torch.nn.Module) -> bool:
    """Whether calling `module` may do more than its forward (hooks, accelerate's wrappers)."""
    from torch.nn.modules import module as module_globals

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or "forward" in module.__dict__
        or getattr(module, "_hf_hook", None) is not None
        or getattr(module_globals, "_global_forward_hooks", None)
        or getattr(module_globals, "_global_forward_pre_hooks", None)
    )


# -- top-k ids of logits rows: blockwise, exact, ties to the lower id ----------------------------

# Vocabulary block of the blockwise top-k: 64 divides every supported family's vocabulary
# (LLaVA-1.5 32,064 = 64 x 501, Qwen2-VL 151,936, Gemma 3 262,208, PaliGemma 257,216).
TOPK_BLOCK = 64


def top_k_ids(logits: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Ids of the k largest logits of every row (rows, vocab), ranked by logit descending and,
    at equal logits, by id ascending (`torch.topk` leaves the order of ties unspecified;
    this one is fixed, the same on every device and chunking). Written into `out`
    (rows, k) int64 where given.

    Blockwise: the vocabulary is cut into blocks of TOPK_BLOCK ids; the k best elements of a
    row lie in the k blocks whose maxima rank first (by maximum, then block index), so only
    those k blocks (plus a tail of vocab % TOPK_BLOCK ids) are ranked: one max-reduction
    over the row instead of a selection over the whole vocabulary. On CPU the blocks and
    candidates are ranked by `torch.topk`, and the rows where a value ties at or inside the
    top k are ranked again by stable sorts (exact); on other devices stable sorts rank every
    row (no host sync). A vocabulary smaller than 4 candidate sets is ranked whole
    (`torch.topk`, ties repaired the same way).
    """
    rows, vocab = logits.shape
    blocks = vocab // TOPK_BLOCK
    full = blocks * TOPK_BLOCK
    if out is None:
        out = torch.empty(rows, k, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    on_cpu = logits.device.type == "cpu"
    if 4 * (k * TOPK_BLOCK + vocab - full) > vocab:  # small vocabulary: rank whole rows
        if not on_cpu:
            out.copy_(torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k])
            return out
        values, ids = torch.topk(logits, min(k + 1, vocab), dim=-1)
        out.copy_(ids[:, :k])
        tied = _tied(values)
    else:
        if not on_cpu:
            out.copy_(_stable_block_top_k(logits, k))
            return out
        block_max = logits[:, :full].unflatten(1, (blocks, TOPK_BLOCK)).amax(-1)  # (rows, blocks)
        best_max, best_blocks = torch.topk(block_max, k + 1, dim=-1)
        candidates = _candidate_ids(best_blocks[:, :k], full, vocab)
        values, at = torch.topk(logits.gather(1, candidates), k + 1, dim=-1)
        torch.gather(candidates, 1, at[:, :k], out=out)
        # A value left out with the blocks ties the k-th: the best such block's maximum.
        tied = _tied(values) | (best_max[:, k] >= values[:, k - 1])
    if bool(tied.any()):
        rows_tied = tied.nonzero()[:, 0]
        out[rows_tied] = _stable_block_top_k(logits[rows_tied], k)
    return out


def _tied(values: torch.Tensor) -> torch.Tensor:
    """Rows whose k + 1 best values (descending; the k-th and the one after it included) tie
    anywhere, or hold a NaN: the order of their top k is not settled by the values alone."""
    return (values[:, 1:] == values[:, :-1]).any(-1) | values.isnan().any(-1)


def _candidate_ids(blocks: torch.Tensor, full: int, vocab: int) -> torch.Tensor:
    """Ids (rows, k * TOPK_BLOCK + tail), ascending, of the given blocks (rows, k) and of the
    tail [full, vocab) that no block covers."""
    offsets = torch.arange(TOPK_BLOCK, device=blocks.device)
    ids = (blocks.sort(-1).values[:, :, None] * TOPK_BLOCK + offsets).flatten(1)
    if full < vocab:
        tail = torch.arange(full, vocab, device=blocks.device).expand(ids.shape[0], -1)
        ids = torch.cat([ids, tail], dim=1)
    return ids


def _stable_block_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """`top_k_ids` by stable sorts only: blocks ranked by (maximum descending, index
    ascending), then the candidates, in ascending id order, by (logit descending, id ascending)."""
    rows, vocab = logits.shape
    blocks = vocab // TOPK_BLOCK
    full = blocks * TOPK_BLOCK
    if blocks <= k:
        return torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    block_max = logits[:, :full].unflatten(1, (blocks, TOPK_BLOCK)).amax(-1)
    best_blocks = torch.sort(block_max, dim=-1, descending=True, stable=True).indices[:, :k]
    candidates = _candidate_ids(best_blocks, full, vocab)
    order = torch.sort(logits.gather(1, candidates), dim=-1, descending=True, stable=True).indices[:, :k]
    return candidates.gather(1, order)
