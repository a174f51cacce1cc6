"""The logit-lens experiment: one forward per image, top-k lens tokens for every cell.

`LensExperiment` is the per-image work; `collector.runner` runs it (resume, transactions,
status, summary). Every image is kept: the lens has no reason to skip one.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from collector.images import ImageRecord
from collector.lens.lens import LogitLens
from collector.loading import LoadedModel
from collector.runner import Experiment, ImageOutcome, RunSummary, run_experiment
from collector.tables import (
    decode_tokens,
    extra_views_table,
    image_view_table,
    lens_table,
    positions_table,
    run_image_marker,
)
from db.store import ResultsDB

DEFAULT_PROMPT = "Describe the image."


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


@torch.no_grad()
def lens_one_image(
    loaded: LoadedModel, run_id: str, record: ImageRecord, prompt: str, top_k: int, lens: LogitLens | None = None
) -> dict:
    """Every row of one image, as Arrow tables keyed by table name."""
    adapter = loaded.adapter
    inputs = adapter.build_inputs(record.load(), prompt)
    input_ids = inputs["input_ids"][0]
    layout = adapter.image_token_layout(input_ids, inputs)
    outputs = loaded.model(**inputs, output_hidden_states=True, use_cache=False)
    readout = (lens or LogitLens(adapter)).top_k(outputs.hidden_states, top_k, final_logits=outputs.logits)
    del outputs
    token_ids = readout.token_ids.numpy()
    token_text = decode_tokens(adapter.tokenizer, set(token_ids.reshape(-1).tolist()) | set(input_ids.tolist()))
    tables = {
        "positions": positions_table(run_id, record.image_id, input_ids, layout, token_text),
        "logit_lens": lens_table(run_id, record.image_id, token_ids, readout.probs.numpy(), token_text),
        "image_views": image_view_table(run_id, record, adapter, adapter.view_pixels(inputs)),
        "run_images": run_image_marker(
            run_id, record.image_id, int(input_ids.numel()), layout, readout.n_layers
        ),
    }
    extra = adapter.extra_views(inputs)
    if extra:  # e.g. LLaVA-NeXT's high-resolution view
        tables["extra_views"] = extra_views_table(run_id, record.image_id, extra)
    return tables


class LensExperiment(Experiment):
    """The logit lens over images with one prompt, keeping the top-k tokens of every cell."""

    name = "lens"
    label = "logit lens"

    def __init__(self, loaded: LoadedModel, prompt: str = DEFAULT_PROMPT, top_k: int = 5) -> None:
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        super().__init__(loaded)
        self.prompt = prompt
        self.top_k = top_k
        self.lens = LogitLens(loaded.adapter)

    def identity(self) -> dict[str, Any]:
        return run_identity(self.loaded, self.prompt, self.top_k)

    def process(self, record: ImageRecord, run_id: str) -> ImageOutcome:
        return ImageOutcome.keep(lens_one_image(self.loaded, run_id, record, self.prompt, self.top_k, lens=self.lens))


def collect_lens(
    loaded: LoadedModel,
    images: Sequence[ImageRecord],
    db: ResultsDB,
    prompt: str = DEFAULT_PROMPT,
    top_k: int = 5,
    extra_config: dict[str, Any] | None = None,
    progress: bool = True,
    **run_options: Any,  # run_experiment's strict, retry_skipped
) -> RunSummary:
    """Run the logit lens over images into `db`, resuming a matching earlier run."""
    experiment = LensExperiment(loaded, prompt, top_k)
    return run_experiment(experiment, images, db, extra_config=extra_config, progress=progress, **run_options)
