"""Lenses: read a decoder's hidden states as next-token distributions.

`LogitLens` applies the model's own read-out (final norm, unembedding, and the final-logit
softcap where the model has one; `collector.readout`) to every layer's hidden state at every
position. It works one layer at a time, so at most one (positions x vocab) logit matrix
exists at once, never (layers x positions x vocab).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from collector.adapters import ModelAdapter
from collector.readout import Readout


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


class Lens(ABC):
    """Maps the hidden state after a layer to logits over the vocabulary."""

    @abstractmethod
    def layer_logits(self, hidden_states: Sequence[torch.Tensor], layer: int) -> torch.Tensor:
        """Logits (B, T, vocab) read from `hidden_states[layer]`.

        hidden_states: the model's `output_hidden_states` tuple, n_layers + 1 entries of
        (B, T, d_model); entry 0 is the input embeddings.
        """

    @torch.no_grad()
    def top_k(self, hidden_states: Sequence[torch.Tensor], k: int, batch_index: int = 0) -> LensTopK:
        """Top-k tokens and probabilities at every layer and position of one sequence."""
        if k < 1:
            raise ValueError("k must be at least 1")
        one_sequence = _OneSequence(hidden_states, batch_index)
        ids_per_layer = []
        probs_per_layer = []
        for layer in range(len(hidden_states)):
            logits = self.layer_logits(one_sequence, layer)
            probs = torch.softmax(logits[0].float(), dim=-1)
            top = torch.topk(probs, k=min(k, probs.shape[-1]), dim=-1)
            ids_per_layer.append(top.indices.cpu())
            probs_per_layer.append(top.values.cpu())
            del logits, probs, top
        return LensTopK(torch.stack(ids_per_layer), torch.stack(probs_per_layer))


class _OneSequence(Sequence[torch.Tensor]):
    """`hidden_states` restricted to one batch element, sliced lazily per layer."""

    def __init__(self, hidden_states: Sequence[torch.Tensor], batch_index: int) -> None:
        self._hidden_states = hidden_states
        self._batch_index = batch_index

    def __len__(self) -> int:
        return len(self._hidden_states)

    def __getitem__(self, layer):  # type: ignore[override]
        return self._hidden_states[layer][self._batch_index : self._batch_index + 1]


class LogitLens(Lens):
    """The logit lens: final norm then unembedding, as the model does after its last layer.

    transformers has already applied the final norm to the last entry of
    `hidden_states`, so the norm is applied to every entry but that one; the last
    layer's lens therefore equals the model's own logits. The norm, unembedding and any
    final-logit softcap come from the adapter's read-out (`collector.readout`).
    """

    def __init__(self, adapter: ModelAdapter, readout: Readout | None = None) -> None:
        self.adapter = adapter
        self.readout = readout if readout is not None else adapter.readout()

    def layer_logits(self, hidden_states: Sequence[torch.Tensor], layer: int) -> torch.Tensor:
        last = len(hidden_states) - 1
        if layer < 0:
            layer += len(hidden_states)
        normed = layer == last and self.adapter.last_hidden_state_is_normed
        return self.readout(hidden_states[layer], normed=normed)
