"""The logit-lens experiment: one forward per image, top-k lens tokens for every cell."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from collector.images import ImageRecord
from collector.lens import LogitLens
from collector.loading import LoadedModel
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


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    images_total: int
    images_skipped: int  # already complete from an earlier invocation
    images_written: int


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
def lens_one_image(loaded: LoadedModel, run_id: str, record: ImageRecord, prompt: str, top_k: int) -> dict:
    """Every row of one image, as Arrow tables keyed by table name."""
    adapter = loaded.adapter
    inputs = adapter.build_inputs(record.load(), prompt)
    input_ids = inputs["input_ids"][0]
    layout = adapter.image_token_layout(input_ids, inputs)
    outputs = loaded.model(**inputs, output_hidden_states=True, use_cache=False)
    readout = LogitLens(adapter).top_k(outputs.hidden_states, top_k, final_logits=outputs.logits)
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


def collect_lens(
    loaded: LoadedModel,
    images: Sequence[ImageRecord],
    db: ResultsDB,
    prompt: str = DEFAULT_PROMPT,
    top_k: int = 5,
    extra_config: dict[str, Any] | None = None,
    progress: bool = True,
) -> RunSummary:
    """Run the logit lens over images into `db`, resuming a matching earlier run."""
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    identity = run_identity(loaded, prompt, top_k)
    config = {**loaded.provenance, **identity, **(extra_config or {})}
    run_id = db.start_run("lens", loaded.model_id, identity, config)
    done = db.completed_images(run_id)
    todo = [record for record in images if record.image_id not in done]
    status = "failed"
    try:
        for record in tqdm(todo, desc="logit lens", unit="image", disable=not progress):
            db.add_image(
                record.image_id, record.file_name, record.width, record.height, record.source, record.annotations
            )
            tables = lens_one_image(loaded, run_id, record, prompt, top_k)
            db.write_image_results(run_id, record.image_id, tables)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        db.finish_run(run_id, status)
    return RunSummary(run_id, len(images), len(images) - len(todo), len(todo))
