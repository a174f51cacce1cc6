"""The logit-lens experiment: one forward per image (or per batch of images with equal
prompt length), top-k lens tokens for every cell.

`LensExperiment` is the per-image work; `collector.runner` runs it (resume, transactions,
status, summary). Every image is kept: the lens has no reason to skip one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from collector.images import ImageRecord
from collector.lens.lens import LogitLens
from collector.loading import LoadedModel
from collector.runner import (
    DEFAULT_LOADER_WORKERS,
    DeferredTables,
    Experiment,
    ImageOutcome,
    PreparedImage,
    RunSummary,
    run_experiment,
)
from collector.tables import (
    decode_tokens,
    distinct_ids,
    extra_views_table,
    image_view_table,
    lens_table,
    positions_table,
    run_image_marker,
    token_pieces,
    token_pieces_table,
)
from collector.vqa import class_first_token
from db.arrow import table_from_columns
from db.store import ResultsDB

DEFAULT_PROMPT = "Describe the image."


_NO_LOCK = contextlib.nullcontext()  # reusable: nullcontext holds no state


def run_identity(loaded: LoadedModel, prompt: str, top_k: int) -> dict[str, Any]:
    """The settings that change lens results; a rerun with the same identity resumes."""
    return {
        "model_id": loaded.model_id,
        "revision": loaded.revision,
        "dtype": loaded.dtype,
        "quantization": loaded.quantization,
        "prompt_template": loaded.adapter.prompt_template,
        "prompt": prompt,
        "top_k": top_k,
    }


def stack_inputs(inputs: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor] | None:
    """`build_inputs` outputs of several images as one batch: every tensor concatenated
    along dim 0 (input_ids (1, T) -> (B, T); pixel_values as the processor batches them,
    including Qwen2-VL's patch rows with their image_grid_thw rows). None when they cannot
    be one batch (another key set, a non-tensor value, or shapes beyond dim 0 that differ,
    e.g. LLaVA-NeXT images with different tile counts)."""
    names = set(inputs[0])
    if any(set(one) != names for one in inputs):
        return None
    batch: dict[str, torch.Tensor] = {}
    for name in inputs[0]:
        values = [one[name] for one in inputs]
        if not all(isinstance(value, torch.Tensor) and value.dim() > 0 for value in values):
            return None
        if len({tuple(value.shape[1:]) for value in values}) != 1:
            return None
        batch[name] = torch.cat(values, dim=0)
    return batch


def _cpu(inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value.detach().cpu() if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


def lens_tables(
    loaded: LoadedModel,
    run_id: str,
    record: ImageRecord,
    inputs: Mapping[str, Any],
    hidden_states: Sequence[torch.Tensor],
    batch_index: int,
    top_k: int,
    lens: LogitLens,
    tokenizer_lock: Any = _NO_LOCK,
    final_logits: torch.Tensor | None = None,
) -> DeferredTables:
    """Every row of one image whose forward is done: the lens read-out now (on the device),
    the tables later (`DeferredTables`, from CPU copies: the runner builds them in its
    writer thread).

    inputs: this image's `build_inputs` output (input_ids (1, T), ...).
    hidden_states: n_layers + 1 tensors (B, T, d_model) of the forward this image was row
        `batch_index` of.
    tokenizer_lock: held while decoding tokens (the loader's threads tokenize at the same time).
    final_logits: the forward's logits (B, T, vocab), reused as the last layer's lens.
    """
    adapter = loaded.adapter
    input_ids = inputs["input_ids"][0].detach().cpu()
    layout = adapter.image_token_layout(input_ids, inputs)
    readout = lens.top_k(hidden_states, top_k, batch_index=batch_index, final_logits=final_logits)
    token_ids, probs = readout.token_ids.numpy(), readout.probs.numpy()
    cpu_inputs = _cpu(inputs)
    view = adapter.view_pixels(cpu_inputs)

    def build() -> dict:
        named = distinct_ids(token_ids, input_ids.numpy())
        with tokenizer_lock:
            token_text = decode_tokens(adapter.tokenizer, named)
            pieces = token_pieces(adapter.tokenizer, named)
        tables = {
            "positions": positions_table(run_id, record.image_id, input_ids, layout, token_text),
            "logit_lens": lens_table(run_id, record.image_id, token_ids, probs, token_text),
            "token_pieces": token_pieces_table(run_id, token_text, pieces),
            "image_views": image_view_table(run_id, record, adapter, view),
            "run_images": run_image_marker(run_id, record.image_id, int(input_ids.numel()), layout, readout.n_layers),
        }
        extra = adapter.extra_views(cpu_inputs)
        if extra:  # e.g. LLaVA-NeXT's high-resolution view
            tables["extra_views"] = extra_views_table(run_id, record.image_id, extra)
        with tokenizer_lock:
            class_tokens = class_tokens_table(adapter.tokenizer, run_id, record)
        if class_tokens is not None:
            tables["class_tokens"] = class_tokens
        return tables

    return DeferredTables(build)


# The context in which a category name's first token is taken (as the VQA setting scores it):
# the token that starts the word after an article, not a bare word-boundary piece.
CLASS_TOKEN_CONTEXT = "It is a"


def class_tokens_table(tokenizer: Any, run_id: str, record: ImageRecord) -> Any:
    """`class_tokens` rows of the image's annotated categories (None without annotations or
    known tokens): the 'first_token' lens hit rule matches lens cells by these ids."""
    rows = []
    for category in record.categories:
        token_id = class_first_token(tokenizer, CLASS_TOKEN_CONTEXT, category)
        if token_id is not None:
            rows.append((category, token_id, tokenizer.decode([token_id])))
    if not rows:
        return None
    return table_from_columns(
        "class_tokens",
        {
            "run_id": [run_id] * len(rows),
            "image_id": [record.image_id] * len(rows),
            "category": [r[0] for r in rows],
            "token_id": [r[1] for r in rows],
            "token": [r[2] for r in rows],
        },
    )


def lens_forward(loaded: LoadedModel, inputs: Mapping[str, torch.Tensor]) -> Any:
    """One forward with every layer's hidden states: input_ids (B, T) -> hidden_states,
    n_layers + 1 tensors (B, T, d_model)."""
    return loaded.model(**inputs, output_hidden_states=True, use_cache=False)


@torch.no_grad()
def lens_one_image(
    loaded: LoadedModel,
    run_id: str,
    record: ImageRecord,
    prompt: str,
    top_k: int,
    lens: LogitLens | None = None,
    inputs: Mapping[str, Any] | None = None,
    tokenizer_lock: Any = _NO_LOCK,
) -> Mapping:
    """Every row of one image, as Arrow tables keyed by table name (built when first read).

    inputs: the image's `build_inputs(record.load(), prompt)` output, when already made.
    tokenizer_lock: held while decoding tokens (see `lens_tables`).
    """
    if inputs is None:
        inputs = loaded.adapter.build_inputs(record.load(), prompt)
    outputs = lens_forward(loaded, inputs)
    tables = lens_tables(
        loaded,
        run_id,
        record,
        inputs,
        outputs.hidden_states,
        0,
        top_k,
        lens or LogitLens(loaded.adapter),
        tokenizer_lock,
        final_logits=outputs.logits,
    )
    del outputs
    return tables


class LensExperiment(Experiment):
    """The logit lens over images with one prompt, keeping the top-k tokens of every cell.

    Batches: images whose prompts have the same token count T go through one forward
    (B, T); the lens then reads each row. LLaVA-1.5 gives every image the same T.
    """

    name = "lens"
    label = "logit lens"

    def __init__(self, loaded: LoadedModel, prompt: str = DEFAULT_PROMPT, top_k: int = 5) -> None:
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        super().__init__(loaded)
        self.prompt = prompt
        self.top_k = top_k
        self.lens = LogitLens(loaded.adapter)
        # One fast tokenizer serves the loader's threads (prompts) and the writer (decoding);
        # its Rust object must not be borrowed mutably and shared at once.
        self.tokenizer_lock = threading.Lock()

    def identity(self) -> dict[str, Any]:
        return run_identity(self.loaded, self.prompt, self.top_k)

    def prepare(self, record: ImageRecord) -> dict[str, torch.Tensor]:
        image = record.load()
        with self.tokenizer_lock:
            return self.loaded.adapter.build_inputs(image, self.prompt)

    def batch_key(self, inputs: Mapping[str, torch.Tensor]) -> int:
        return int(inputs["input_ids"].shape[1])

    def process(self, record: ImageRecord, run_id: str) -> ImageOutcome:
        return ImageOutcome.keep(
            lens_one_image(
                self.loaded, run_id, record, self.prompt, self.top_k, self.lens, tokenizer_lock=self.tokenizer_lock
            )
        )

    @torch.no_grad()
    def process_batch(self, images: Sequence[PreparedImage], run_id: str) -> list[ImageOutcome]:
        inputs = [image.inputs if image.inputs is not None else self.prepare(image.record) for image in images]
        batch = stack_inputs(inputs) if len(images) > 1 else None
        if batch is None:  # one image, or images that cannot share a forward
            return [
                ImageOutcome.keep(
                    lens_one_image(
                        self.loaded, run_id, image.record, self.prompt, self.top_k, self.lens, one, self.tokenizer_lock
                    )
                )
                for image, one in zip(images, inputs)
            ]
        outputs = lens_forward(self.loaded, batch)
        del batch
        return [
            ImageOutcome.keep(
                lens_tables(
                    self.loaded,
                    run_id,
                    image.record,
                    one,
                    outputs.hidden_states,
                    row,
                    self.top_k,
                    self.lens,
                    self.tokenizer_lock,
                    final_logits=outputs.logits,
                )
            )
            for row, (image, one) in enumerate(zip(images, inputs))
        ]


def collect_lens(
    loaded: LoadedModel,
    images: Sequence[ImageRecord],
    db: ResultsDB,
    prompt: str = DEFAULT_PROMPT,
    top_k: int = 5,
    extra_config: dict[str, Any] | None = None,
    progress: bool = True,
    batch_size: int = 1,
    loader_workers: int = DEFAULT_LOADER_WORKERS,
    **run_options: Any,  # run_experiment's strict, retry_skipped
) -> RunSummary:
    """Run the logit lens over images into `db`, resuming a matching earlier run.

    batch_size: images (of equal prompt length) per forward; loader_workers: threads that
    decode and preprocess ahead, 0 for no pipelining (`run_experiment`)."""
    experiment = LensExperiment(loaded, prompt, top_k)
    return run_experiment(
        experiment,
        images,
        db,
        extra_config=extra_config,
        progress=progress,
        batch_size=batch_size,
        loader_workers=loader_workers,
        **run_options,
    )
