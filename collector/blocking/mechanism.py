"""Attention blocking (knockout): stop chosen query positions attending to chosen key positions.

`block_attention(adapter, blocks)` hooks the self-attention module of every layer that some
batch element blocks and replaces the `attention_mask` keyword argument it receives with a
new mask per call: what the model would have used AND "not blocked". Batch element `b`
blocks queries at `blocks[b].targets` from keys at `blocks[b].sources` in `blocks[b].layers`
(all heads); other batch elements and other layers keep the model's own mask.

Mask forms this transformers version passes to `self_attn` (see NOTES-transformers5.md):

| implementation | mask kwarg                        | what the hook passes on                          |
|----------------|-----------------------------------|--------------------------------------------------|
| sdpa           | None (causality from `is_causal`) | bool (B, 1, T, T): causal AND not blocked         |
| sdpa, padding  | bool (B, 1, T, T), True = attend  | bool: mask AND not blocked                        |
| eager          | float (B|1, 1, T, T), 0 / min     | float: min where blocked, the mask elsewhere      |
| eager, None    | None (eager then masks nothing)   | float: 0 where not blocked, min where blocked     |

Flash attention cannot take an arbitrary mask and is refused. The shared mask object is
never edited in place: every layer receives the same object.

A position is never blocked from attending to itself (the diagonal is always kept), so a
query row can never lose every key, which would turn its softmax into NaN. Should a row that
had keys end up with none anyway (a padding query whose own key is masked), the hook raises.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from collector.adapters import ModelAdapter
from collector.errors import UserError

SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class AttentionBlock:
    """What one batch element blocks: queries at `targets` cannot see keys at `sources` in `layers`.

    Positions index the LM input sequence as the model receives it (with any left padding);
    layers are 0-based decoder layer indices. An empty block leaves the element untouched.
    """

    sources: tuple[int, ...]
    targets: tuple[int, ...]
    layers: frozenset[int]

    @classmethod
    def of(cls, sources: Iterable[int], targets: Iterable[int], layers: Iterable[int]) -> AttentionBlock:
        """A block from any iterables of ints (sorted, de-duplicated)."""
        block = cls(
            tuple(sorted({int(p) for p in sources})),
            tuple(sorted({int(p) for p in targets})),
            frozenset(int(layer) for layer in layers),
        )
        if any(p < 0 for p in block.sources + block.targets) or any(layer < 0 for layer in block.layers):
            raise ValueError(f"negative position or layer in {block}")
        return block

    @property
    def is_empty(self) -> bool:
        return not (self.sources and self.targets and self.layers)

    def blocks_layer(self, layer: int) -> bool:
        return not self.is_empty and layer in self.layers


NO_BLOCK = AttentionBlock((), (), frozenset())


@dataclass
class BlockingStats:
    """What the hooks saw, for tests and sanity checks.

    mask_kinds counts the incoming mask form ('none', 'bool', 'float') per hooked call that
    changed a mask; untouched_calls counts hooked calls that passed the mask on unchanged.
    """

    mask_kinds: Counter = field(default_factory=Counter)
    untouched_calls: int = 0


def attention_implementation(module: torch.nn.Module) -> str:
    """The attention implementation an attention module dispatches to (its config's)."""
    config = getattr(module, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def check_implementation(implementation: str) -> None:
    """Refuse implementations whose masks this module cannot rewrite (flash, flex, kernels)."""
    if implementation in SUPPORTED_IMPLEMENTATIONS:
        return
    if "flash" in implementation:
        raise UserError(
            f"attention blocking needs an explicit attention mask, which {implementation} cannot take; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    raise UserError(
        f"attention blocking supports attn_implementation {' or '.join(SUPPORTED_IMPLEMENTATIONS)}, "
        f"not {implementation!r}"
    )


def blocked_pairs(
    blocks: Sequence[AttentionBlock], layer: int, n_positions: int, device: torch.device
) -> torch.Tensor | None:
    """(B, 1, T, T) bool, True where query t of element b may not attend to key s in `layer`.

    None when no element blocks anything in this layer. The diagonal is always False.
    """
    active = [b for b, block in enumerate(blocks) if block.blocks_layer(layer)]
    if not active:
        return None
    blocked = torch.zeros(len(blocks), 1, n_positions, n_positions, dtype=torch.bool, device=device)
    for b in active:
        block = blocks[b]
        highest = max(max(block.sources), max(block.targets))
        if highest >= n_positions:
            raise ValueError(f"batch element {b} blocks position {highest}, but the sequence has {n_positions}")
        targets = torch.tensor(block.targets, dtype=torch.long, device=device)
        sources = torch.tensor(block.sources, dtype=torch.long, device=device)
        blocked[b, 0, targets[:, None], sources[None, :]] = True
    diagonal = torch.arange(n_positions, device=device)
    blocked[:, :, diagonal, diagonal] = False
    return blocked


def combine_mask(
    mask: torch.Tensor | None,
    blocked: torch.Tensor,
    implementation: str,
    dtype: torch.dtype,
    is_causal: bool = True,
) -> torch.Tensor:
    """The model's mask with `blocked` pairs removed; a new tensor, `mask` is left as it is.

    mask: None, bool (B|1, 1, T, T) True = attend, or additive float (B|1, 1, T, T).
    blocked: (B, 1, T, T) bool. dtype: the attention's compute dtype (for a float mask built
    from None). is_causal: the module's flag, which sdpa applies when it gets no mask.
    Returns (B, 1, T, T) of the form the implementation expects.
    """
    batch, _, n_queries, n_keys = blocked.shape
    if mask is None:
        # With no mask sdpa applies causality itself (is_causal, for more than one query) and
        # eager applies nothing. Once a mask is passed sdpa stops applying causality, so the
        # causal part is built here: key s is visible from query t when s <= t.
        visible = torch.ones(n_queries, n_keys, dtype=torch.bool, device=blocked.device)
        if implementation == "sdpa" and is_causal and n_queries > 1:
            visible = visible.tril()
        allowed = visible[None, None] & ~blocked
        if implementation == "sdpa":
            return allowed
        zero = torch.zeros((), dtype=dtype, device=blocked.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    if mask.shape[-2:] != (n_queries, n_keys) or mask.shape[0] not in (1, batch):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not fit blocks {tuple(blocked.shape)}")
    if mask.dtype == torch.bool:
        return mask.expand(batch, -1, -1, -1) & ~blocked
    if not mask.is_floating_point():
        raise ValueError(f"unexpected attention mask dtype {mask.dtype}")
    fill = torch.tensor(torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
    return torch.where(blocked, fill, mask.expand(batch, -1, -1, -1))


def _attending(mask: torch.Tensor | None, implementation: str) -> torch.Tensor | None:
    """(B|1, 1, T, T) bool of the pairs a mask lets through (None: not determined by a mask)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _check_no_row_emptied(before: torch.Tensor | None, after: torch.Tensor, implementation: str) -> None:
    after_allowed = _attending(after, implementation)
    rows_after = after_allowed.any(-1)
    rows_before = before.any(-1) if before is not None else torch.ones_like(rows_after)
    emptied = rows_before.expand_as(rows_after) & ~rows_after
    if bool(emptied.any()):
        b, _, t = (int(v) for v in emptied.nonzero()[0])
        raise ValueError(
            f"blocking leaves query position {t} of batch element {b} no key to attend to "
            "(is it a padding position?); its softmax would be NaN"
        )


@contextlib.contextmanager
def block_attention(adapter: ModelAdapter, blocks: Sequence[AttentionBlock]) -> Iterator[BlockingStats]:
    """Within the context, forwards with batch size len(blocks) apply one block per element.

    Forwards must run without a cache (use_cache=False): a query row is the key position of
    the same index. Raises UserError for attention implementations that take no explicit
    mask (flash attention), ValueError for a layer outside the model.
    """
    blocks = list(blocks)
    if not blocks:
        raise ValueError("block_attention needs one AttentionBlock per batch element")
    layers = sorted(set().union(*(block.layers for block in blocks if not block.is_empty)))
    if layers and layers[-1] >= adapter.n_layers:
        raise ValueError(f"layer {layers[-1]} outside the model's {adapter.n_layers} layers")
    stats = BlockingStats()
    handles = []
    try:
        for layer in layers:
            module = adapter.attention_module(layer)
            implementation = attention_implementation(module)
            check_implementation(implementation)
            hook = _make_hook(blocks, layer, implementation, stats)
            # prepend: run before transformers' own output-recording hooks, so they see our mask.
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def _make_hook(blocks: list[AttentionBlock], layer: int, implementation: str, stats: BlockingStats):
    cache: dict[tuple[int, torch.device], torch.Tensor | None] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        if args:
            raise ValueError(
                f"layer {layer}'s attention got positional arguments; blocking expects keyword arguments "
                "(hidden_states=..., attention_mask=...) as transformers 5 passes them"
            )
        hidden = kwargs["hidden_states"]  # (B, T, d_model)
        batch, n_positions = int(hidden.shape[0]), int(hidden.shape[1])
        if batch != len(blocks):
            raise ValueError(f"batch of {batch} sequences but {len(blocks)} attention blocks")
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("attention blocking needs forwards without a cache (use_cache=False)")
        key = (n_positions, hidden.device)
        if key not in cache:
            cache[key] = blocked_pairs(blocks, layer, n_positions, hidden.device)
        blocked = cache[key]
        if blocked is None:
            stats.untouched_calls += 1
            return args, kwargs
        mask = kwargs.get("attention_mask")
        stats.mask_kinds["none" if mask is None else "bool" if mask.dtype == torch.bool else "float"] += 1
        # sdpa_attention_forward prefers an is_causal kwarg over the module's flag.
        is_causal = kwargs.get("is_causal")
        is_causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        new_mask = combine_mask(mask, blocked, implementation, hidden.dtype, is_causal)
        _check_no_row_emptied(_attending(mask, implementation), new_mask, implementation)
        return args, {**kwargs, "attention_mask": new_mask}

    return hook
