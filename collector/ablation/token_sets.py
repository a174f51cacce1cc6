"""Which image tokens an ablation condition replaces.

Token sets are image-token indices k (0 <= k < n_image_tokens, row-major over the patch
grid: token k is cell (k // grid_cols, k % grid_cols)); `layout.positions[k]` is the
LM input position of token k in a given prompt. Keeping sets as indices lets one set be
applied to the prompts of every setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from collector.adapters import ImageTokenLayout
from collector.loading import LoadedModel
from db.geometry import cell_positions, dilate_cells

DEFAULT_K = (5, 10, 20, 40, 60, 100, 250)
OBJECT_RINGS = (0, 1, 2)
DEFAULT_IG_STEPS = 50
DEFAULT_NOISE_STD = 1.0  # in normalised pixel units (pixel_values), about the spread of real pixels


@dataclass(frozen=True)
class TokenSet:
    """One ablation condition: its name, the image-token indices it replaces, its RNG seed if drawn."""

    name: str
    token_indices: tuple[int, ...]
    seed: int | None = None


def object_token_indices(cells: np.ndarray, rings: int) -> list[int]:
    """Image-token indices of the object's cells (grid_rows, grid_cols) bool, dilated by `rings` 8-neighbour rings."""
    return cell_positions(dilate_cells(cells, rings))


def register_token_indices(image_embeddings: torch.Tensor) -> list[int]:
    """Tokens whose L2 norm exceeds mean + 2·std of the image's token norms (outlier "register" tokens).

    image_embeddings: (n_image_tokens, d) at the LM input. std is the unbiased sample std
    (torch.std), as in the original code.
    """
    norms = image_embeddings.float().norm(dim=-1)
    threshold = norms.mean() + 2 * norms.std()
    return [int(i) for i in torch.nonzero(norms > threshold).flatten().tolist()]


def random_token_indices(n_tokens: int, k: int, seed: int, image_id: int) -> list[int]:
    """k distinct tokens (k clipped to n_tokens) drawn by a generator seeded from (seed, image_id, k).

    The same (seed, image_id, k) always gives the same draw, whatever else ran before.
    """
    k = min(k, n_tokens)
    generator = np.random.default_rng(np.random.SeedSequence([int(seed), int(image_id), int(k)]))
    return sorted(int(i) for i in generator.choice(n_tokens, size=k, replace=False))


def top_k_token_indices(attribution: torch.Tensor, k: int) -> list[int]:
    """The k tokens (clipped) with the largest attribution; attribution: (n_image_tokens,)."""
    k = min(k, int(attribution.numel()))
    # stable sort: ties keep the lower index first, so the order is reproducible
    order = torch.sort(attribution.float().cpu(), descending=True, stable=True).indices
    return sorted(int(i) for i in order[:k].tolist())


def pixel_cell_mask(cells: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(height, width) bool: pixels inside the selected cells; cell i spans [i·s/rows, (i+1)·s/rows)."""
    grid_rows, grid_cols = cells.shape
    row_cell = (np.arange(height) * grid_rows) // height
    col_cell = (np.arange(width) * grid_cols) // width
    return torch.from_numpy(np.asarray(cells, dtype=bool)[np.ix_(row_cell, col_cell)])


def noised_pixel_values(
    pixel_values: torch.Tensor, cells: np.ndarray, std: float, seed: int, image_id: int
) -> torch.Tensor:
    """pixel_values (3, H, W) with Gaussian noise (std in normalised units) added inside the cells' pixels.

    The noise is seeded from (seed, image_id), so a rerun draws the same noise.
    """
    _, height, width = pixel_values.shape
    mask = pixel_cell_mask(cells, height, width).to(pixel_values.device)
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([int(seed), int(image_id)]).generate_state(1)[0])
    )
    noise = torch.randn(pixel_values.shape, generator=generator, dtype=torch.float32) * std
    noise = noise.to(device=pixel_values.device, dtype=pixel_values.dtype)
    return torch.where(mask.unsqueeze(0), pixel_values + noise, pixel_values)


# -- tokens ----------------------------------------------------------------------------


def first_word_token_id(tokenizer: Any, text: str) -> int | None:
    """Id of the first token of `text` that carries a word, without special tokens.

    SentencePiece tokenizers split " remote" into ['▁', '▁remote'] and prepend <s> by
    default; the answer token is '▁remote', so special tokens and bare-whitespace pieces
    are passed over. None when the word starts with the unknown token.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    special = set(getattr(tokenizer, "all_special_ids", []))
    for token_id in ids:
        if token_id in special and token_id != tokenizer.unk_token_id:
            continue
        if not tokenizer.decode([token_id]).strip():
            continue
        return None if token_id == tokenizer.unk_token_id else int(token_id)
    return None


def yes_token_id(tokenizer: Any) -> int:
    """The answer token "Yes" (e.g. '▁Yes'), never BOS (the original `encode("Yes")[0]` is <s>)."""
    token_id = first_word_token_id(tokenizer, "Yes")
    if token_id is None:
        raise ValueError("the tokenizer has no token for 'Yes'")
    return token_id


# -- integrated gradients --------------------------------------------------------------


@dataclass(frozen=True)
class IntegratedGradients:
    """attributions: (n_image_tokens, d) IG of the target logit w.r.t. each image-token embedding.

    f_input, f_baseline: the target logit at the input and at the baseline; completeness
    says attributions.sum() ≈ f_input - f_baseline.
    """

    attributions: torch.Tensor
    f_input: float
    f_baseline: float

    @property
    def token_attribution(self) -> torch.Tensor:
        """(n_image_tokens,) sum over the hidden dimension of |IG|, the ranking score."""
        return self.attributions.abs().sum(dim=-1)


@contextlib.contextmanager
def _frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    # Only the input gradient is needed: frozen weights spare their gradient buffers.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def integrated_gradients(
    loaded: LoadedModel,
    inputs: dict[str, torch.Tensor],
    layout: ImageTokenLayout,
    baseline_vector: torch.Tensor,
    target_token_id: int,
    steps: int = DEFAULT_IG_STEPS,
    batch_size: int = 8,
) -> IntegratedGradients:
    """IG of the logit of `target_token_id` at the last position, over the image-token embeddings.

    inputs: one processor batch (input_ids (1, T), pixel_values (1, 3, H, W), ...).
    The path runs on the LM input embeddings of the image positions only, from the
    baseline (every image token = baseline_vector, (d,)) to the real embeddings; text
    embeddings stay as they are. The path integral uses Gauss-Legendre quadrature with
    `steps` nodes (exact for polynomials of degree < 2·steps; captum's default rule),
    evaluated `batch_size` nodes per forward.
    """
    from collector.ablation.replacement import lm_input_embeddings

    if steps < 1:
        raise ValueError("IG needs at least one step")
    adapter = loaded.adapter
    embeddings = lm_input_embeddings(loaded, inputs)  # (1, T, d)
    positions = layout.positions.to(embeddings.device)
    image_embeddings = embeddings[0, positions].float()  # (n, d)
    baseline = baseline_vector.to(device=embeddings.device, dtype=torch.float32).expand_as(image_embeddings)
    difference = image_embeddings - baseline
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor((nodes + 1) / 2, dtype=torch.float32)
    alpha_weights = torch.tensor(weights / 2, dtype=torch.float32)

    def target_logits(path_embeddings: torch.Tensor) -> torch.Tensor:
        """path_embeddings (B, n, d) -> target logit at the last position, (B,)."""
        batch = path_embeddings.shape[0]

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
            merged = kwargs["inputs_embeds"]
            replaced = merged.expand(batch, -1, -1).clone()
            replaced[:, positions] = path_embeddings.to(merged.dtype)
            return args, {**kwargs, "inputs_embeds": replaced}

        batch_inputs = adapter.repeat_inputs(inputs, [None] * batch)
        handle = adapter.decoder.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
        try:
            logits = loaded.model(**batch_inputs, use_cache=False, logits_to_keep=1).logits
        finally:
            handle.remove()
        return logits[:, -1, target_token_id].float()

    gradient_sum = torch.zeros_like(image_embeddings)
    with _frozen_parameters(loaded.model), torch.enable_grad():
        for start in range(0, steps, batch_size):
            chunk_alphas = alphas[start : start + batch_size].to(embeddings.device)
            chunk_weights = alpha_weights[start : start + batch_size].to(embeddings.device)
            path = (baseline.unsqueeze(0) + chunk_alphas.view(-1, 1, 1) * difference.unsqueeze(0)).detach()
            path.requires_grad_(True)
            (gradients,) = torch.autograd.grad(target_logits(path).sum(), path)
            gradient_sum += (gradients.float() * chunk_weights.view(-1, 1, 1)).sum(dim=0)
        with torch.no_grad():
            ends = target_logits(torch.stack([image_embeddings, baseline]))
    return IntegratedGradients(
        attributions=(difference * gradient_sum).detach().cpu(),
        f_input=float(ends[0]),
        f_baseline=float(ends[1]),
    )


def token_sets(
    cells: np.ndarray,
    image_embeddings: torch.Tensor,
    image_id: int,
    seed: int,
    k_values: Sequence[int],
    ig_attribution: torch.Tensor | None,
) -> list[TokenSet]:
    """Every token-replacing condition of one image (not 'none' or 'image_noise').

    cells: (grid_rows, grid_cols) object cells; image_embeddings: (n_image_tokens, d);
    ig_attribution: (n_image_tokens,) or None to leave out gradient_k.
    """
    n_tokens = int(image_embeddings.shape[0])
    sets = [TokenSet(f"object_{rings}", tuple(object_token_indices(cells, rings))) for rings in OBJECT_RINGS]
    sets.append(TokenSet("register", tuple(register_token_indices(image_embeddings))))
    for k in k_values:
        sets.append(TokenSet(f"random_{k}", tuple(random_token_indices(n_tokens, k, seed, image_id)), seed))
    if ig_attribution is not None:
        for k in k_values:
            sets.append(TokenSet(f"gradient_{k}", tuple(top_k_token_indices(ig_attribution, k))))
    return sets
