"""The read-out: a decoder hidden state to logits, exactly as the model computes its own logits.

final norm -> unembedding (lm_head) -> final-logit softcap where the model class applies one
(`cap * tanh(logits / cap)`, PaliGemma 2's Gemma 2 LM). Built by the adapter
(`ModelAdapter.readout()`), which knows the family's parts and whether its forward caps;
used by the logit lens (every layer) and by attention blocking (the last position), and
anything else that turns hidden states into tokens. Like tuned-lens's `Unembed`, but it
owns no weights: it borrows the model's modules, so it costs no memory and stays on the
model's devices.
"""

from __future__ import annotations

import hashlib

import torch


def softcap_logits(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap), in the op order of the transformers Gemma models (bit-exact)."""
    logits = logits / cap
    logits = torch.tanh(logits)
    return logits * cap


class SoftcappedUnembedding(torch.nn.Module):
    """lm_head followed by the model's final logit softcapping, in the model's own op order.

    `weight` is the lm_head's (for hidden_size and devices); `lm_head` is the model's module.
    """

    def __init__(self, lm_head: torch.nn.Module, cap: float) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.cap = float(cap)

    @property
    def weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap_logits(self.lm_head(hidden), self.cap)


def param_device(module: torch.nn.Module, fallback: torch.Tensor) -> torch.device:
    """The device of a module's first parameter (`fallback`'s device for a module without any)."""
    # With accelerate's device_map the norm and lm_head may sit on different GPUs.
    for parameter in module.parameters():
        return parameter.device
    return fallback.device


class Readout:
    """hidden (..., d_model) -> logits (..., vocab): final norm, unembedding, optional softcap.

    final_norm: the norm the model applies after its last decoder layer.
    lm_head: hidden (..., d_model) -> raw logits (..., vocab).
    softcap: the final-logit softcap the model's forward applies, or None.
    """

    def __init__(self, final_norm: torch.nn.Module, lm_head: torch.nn.Module, softcap: float | None = None) -> None:
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.softcap = None if softcap is None else float(softcap)

    def __call__(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """Logits (..., vocab) of hidden states (..., d_model).

        normed: the hidden state has been through the final norm already (transformers
        returns the last entry of `hidden_states`, and a decoder's `last_hidden_state`,
        normed); the norm is then not applied again.
        """
        if not normed:
            hidden = self.final_norm(hidden.to(param_device(self.final_norm, hidden)))
        logits = self.lm_head(hidden.to(param_device(self.lm_head, hidden)))
        if self.softcap is not None:
            logits = softcap_logits(logits, self.softcap)
        return logits

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The weights it reads, named: the final norm's state, then the lm_head's, each in state-dict order."""
        return [(f"final_norm.{name}", t) for name, t in self.final_norm.state_dict().items()] + [
            (f"lm_head.{name}", t) for name, t in self.lm_head.state_dict().items()
        ]

    def sha256(self) -> str | None:
        """sha256 over the raw bytes of `tensors()`, concatenated in that order.

        Recorded in a run's config (`readout_sha256`): two runs with equal hashes read
        hidden states out through the same weights. A few hundred MB for a 7B model's
        lm_head, so compute it once per run. None when a weight is not in memory (on the
        meta device, as with accelerate's disk offload).
        """
        tensors = self.tensors()
        if any(tensor.is_meta for _, tensor in tensors):
            return None
        digest = hashlib.sha256()
        for _, tensor in tensors:
            flat = tensor.detach().reshape(-1).contiguous().cpu()
            digest.update(flat.view(torch.uint8).numpy())
        return digest.hexdigest()
