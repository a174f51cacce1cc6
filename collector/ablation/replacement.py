"""The replacement vector of token ablation and the hook that puts it into the LM input.

Token ablation overwrites chosen image-token embeddings at the LM input (after the
projector, after image features are merged into the text embeddings) with one vector:
the mean post-projector image-token embedding over a dataset, or zero.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from collector.adapters import ModelAdapter
from collector.errors import UserError, first_line
from collector.images import ImageRecord, ImageUnusable
from collector.loading import LoadedModel
from db.store import ResultsDB

# Any question works: image features do not depend on the text (the image precedes it).
MEAN_VECTOR_PROMPT = "Describe the image."


@dataclass(frozen=True)
class Replacement:
    """The vector written over ablated positions.

    vector: (hidden_size,) float32 on the CPU.
    source: 'zero', the file path, or 'db:<vector_id>'.
    sha256: of the file's bytes (file), else of the vector's float32 bytes.
    """

    vector: torch.Tensor
    source: str
    sha256: str

    @property
    def hidden_size(self) -> int:
        return int(self.vector.numel())


def _vector_sha256(vector: torch.Tensor) -> str:
    return hashlib.sha256(vector.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def load_replacement(spec: str, hidden_size: int, db: ResultsDB | None = None) -> Replacement:
    """The replacement named by `spec`: 'zero', 'db:<vector_id>' (needs `db`), or a `.pt` file.

    A file must hold a 1-D float tensor (the original project's format) and load with
    torch.load(weights_only=True). Raises UserError (one line) when it cannot be read or
    its size differs from the model's hidden size.
    """
    if spec == "zero":
        vector = torch.zeros(hidden_size, dtype=torch.float32)
        return Replacement(vector, "zero", _vector_sha256(vector))
    if spec.startswith("db:"):
        vector_id = spec[3:]
        if db is None:
            raise UserError(f"--replacement {spec} needs a results database")
        stored = db.mean_vector(vector_id)
        if stored is None:
            raise UserError(f"no mean vector {vector_id!r} in the database")
        vector = torch.tensor(stored, dtype=torch.float32)
        source = spec
        digest = _vector_sha256(vector)
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"replacement vector file not found: {path} (or use 'zero' or 'db:<vector_id>')")
        data = path.read_bytes()
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a bad file
            raise UserError(f"cannot load replacement vector {path}: {_load_failure(error)}") from None
        if not isinstance(loaded, torch.Tensor) or loaded.dim() != 1 or not loaded.is_floating_point():
            shape = tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else type(loaded).__name__
            raise UserError(f"replacement vector {path} must be a 1-D float tensor, got {shape}")
        vector = loaded.float()
        source = str(path)
        digest = hashlib.sha256(data).hexdigest()
    if vector.numel() != hidden_size:
        raise UserError(
            f"replacement vector {source} has size {vector.numel()} but the model's hidden size is {hidden_size}"
        )
    return Replacement(vector, source, digest)


def _load_failure(error: BaseException) -> str:
    """Why torch.load refused a file, without torch's advice to load it with weights_only=False
    (which would run arbitrary code from the file)."""
    import pickle

    text = str(error)
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text or "Weights only load failed" in text:
        return (
            "it holds Python objects besides tensors, which are not loaded "
            "(save the vector alone: torch.save(vector, path))"
        )
    return first_line(error)


# -- the ablation hook ----------------------------------------------------------------


def _is_prefill(inputs_embeds: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    """Whether this decoder call processes the prompt (not one generated token on a cache)."""
    if inputs_embeds.shape[1] <= 1:
        return False
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length()) == 0
    return True


@contextlib.contextmanager
def ablate_positions(
    adapter: ModelAdapter, positions_per_row: Sequence[Sequence[int]], vector: torch.Tensor
) -> Iterator[None]:
    """Within the block, every prefill forward sets inputs_embeds[b, positions_per_row[b]] = vector.

    positions_per_row: one list of LM input positions per batch element (may be empty).
    vector: (hidden_size,). Later decoding steps (one token on a filled cache) are left
    alone, so generation continues from the ablated prompt. The hook is prepended
    because transformers registers its own hooks on the decoder to record outputs, and
    those must see the ablated embeddings.
    """
    index_rows = [torch.as_tensor(list(p), dtype=torch.long) for p in positions_per_row]

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        inputs_embeds = kwargs.get("inputs_embeds")
        if inputs_embeds is None or not _is_prefill(inputs_embeds, kwargs):
            return None
        if inputs_embeds.shape[0] != len(index_rows):
            raise RuntimeError(
                f"ablation hook set up for {len(index_rows)} sequences, forward has {inputs_embeds.shape[0]}"
            )
        replaced = inputs_embeds.clone()
        value = vector.to(device=replaced.device, dtype=replaced.dtype)
        for row, index in enumerate(index_rows):
            if index.numel():
                replaced[row, index.to(replaced.device)] = value
        return args, {**kwargs, "inputs_embeds": replaced}

    handle = adapter.decoder.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the LM never runs."""


@torch.no_grad()
def lm_input_embeddings(loaded: LoadedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The LM input embeddings (image features merged) of a processor batch, without running the LM.

    Returns (B, T, hidden_size) as the decoder receives them.
    """
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        captured.append(kwargs["inputs_embeds"].detach())
        raise _StopForward

    handle = loaded.adapter.decoder.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        loaded.model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the decoder was never called")
    return captured[0]


def image_token_embeddings(loaded: LoadedModel, image: Any) -> torch.Tensor:
    """Post-projector embeddings of one image's tokens as the LM receives them: (n_image_tokens, d)."""
    inputs = loaded.adapter.build_inputs(image, MEAN_VECTOR_PROMPT)
    layout = loaded.adapter.image_token_layout(inputs["input_ids"][0], inputs)
    embeddings = lm_input_embeddings(loaded, inputs)[0]
    return embeddings[layout.positions.to(embeddings.device)]


@dataclass(frozen=True)
class MeanVector:
    """vector: (hidden_size,) float64 mean over every image token of every image.

    skipped: (file name, reason, detail) of each image file that could not be used.
    """

    vector: torch.Tensor
    n_images: int
    n_tokens: int
    skipped: tuple[tuple[str, str, str], ...] = ()


def compute_mean_vector(
    loaded: LoadedModel, records: Sequence[ImageRecord], progress: bool = True, strict: bool = False
) -> MeanVector:
    """Mean post-projector image-token embedding over images, streamed in constant memory.

    A float64 running sum (not a stack of every token) keeps memory at one vector and
    keeps the sum exact enough over millions of tokens. An image file that cannot be used
    is left out and listed in `skipped` (strict: UserError instead).
    """
    if not records:
        raise UserError("no images to average over")
    total = torch.zeros(loaded.adapter.hidden_size, dtype=torch.float64)
    n_tokens = 0
    skipped: list[tuple[str, str, str]] = []
    for record in tqdm(records, desc="mean vector", unit="image", disable=not progress):
        try:
            image = record.load()
        except ImageUnusable as error:
            if strict:
                raise UserError(f"cannot read image {record.path}: {error.detail} (--strict)") from None
            skipped.append((record.file_name, error.reason, error.detail))
            continue
        embeddings = image_token_embeddings(loaded, image)
        total += embeddings.double().sum(dim=0).cpu()
        n_tokens += int(embeddings.shape[0])
    if n_tokens == 0:
        raise UserError(f"none of the {len(records)} images could be used (first: {skipped[0][0]}: {skipped[0][2]})")
    return MeanVector(total / n_tokens, len(records) - len(skipped), n_tokens, tuple(skipped))


def save_mean_vector(path: str | Path, mean: MeanVector) -> None:
    """Save as a 1-D float32 tensor `.pt`, the original project's format (loads with weights_only=True)."""
    torch.save(mean.vector.float().clone(), Path(path))


def store_mean_vector(db: ResultsDB, loaded: LoadedModel, mean: MeanVector, source: str, config: dict[str, Any]) -> str:
    """Store the vector in `mean_vectors` (once per value); returns its id (usable as --replacement db:<id>)."""
    vector = mean.vector.float()
    vector_id = f"mean-{_vector_sha256(vector)[:12]}"
    db.add_mean_vector(
        vector_id,
        loaded.model_id,
        vector.tolist(),
        mean.n_images,
        mean.n_tokens,
        source,
        {**loaded.provenance, **config},
    )
    return vector_id
