"""Attention-blocking experiments (Neo et al. §6) in the VQA setting, into the `blocking` table.

Per selected image (a COCO image with a single-instance object of moderate size, see
`collector.coco.select_targets`): the prompt is the family template with the image's first
question followed by the assistant prefix " It is a"; the answer is correct when the
predicted next token is the first token of " <class name>". Nothing blocked first (the
baseline); with curation an image the baseline gets wrong is recorded in `skipped` and no
blocking is run on it. Then every (source set, target set, layer window) condition: queries
at the target positions cannot attend to keys at the source positions in the window's
layers.

Source sets (key positions): object_0/1/2 (the object's cells dilated by 0/1/2 rings of
8-neighbours), image_minus_object_1 (every image position not in object_1),
image_minus_last_row (every image position except the last grid row); "every image
position" is `layout.all_image_positions` (grid plus LLaVA-NeXT's high-resolution and
newline tokens), object and row sets are grid cells. Target sets (query
positions): last (the last input position, where the answer is predicted) and last_row
(the last grid row of image tokens). A position in both sets still attends to itself.

Layer windows, 0-based inclusive: the presets of a 32-layer model (`PRESETS_32`) scaled
to the model's depth (`scale_window`), and a sliding window of width K starting at every
layer (the blocking curve; windows near the top are cut at the last layer).

All conditions of one image share the input: the merged LM input embeddings are taken
once from the baseline forward and the conditions run as batched decoder forwards, one
block mask per batch element (`collector.blocking.mechanism`); the last position's hidden
state is read out through the model's own read-out (`collector.readout`).

`BlockingExperiment` is the per-image work; `collector.runner` runs it.

Why one ~650-line module: the position sets, the window presets and sliding windows and the
per-image batching are one experiment's per-image work (`BlockingExperiment.process`); the
mask mechanism itself lives in `mechanism.py`, the sets' geometry in `db.geometry`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from collector.adapters import ImageTokenLayout
from collector.blocking.mechanism import AttentionBlock, block_attention
from collector.blocking.settings import (  # noqa: E402  (re-exported)
    DEFAULT_AREA_RANGE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_ANNOTATIONS,
    DEFAULT_WINDOW,
    PRESETS_32,
    REFERENCE_DEPTH,
    SOURCE_SETS,
    TARGET_SETS,
)
from collector.coco import AblationTarget, load_coco, select_targets
from collector.errors import UserError
from collector.images import ImageRecord
from collector.loading import LoadedModel
from collector.readout import Readout
from collector.runner import DEFAULT_LOADER_WORKERS, Experiment, ImageOutcome, RunSummary, SkipReason, run_experiment
from collector.tables import decode_tokens, image_view_table, positions_table, run_image_marker
from collector.targets import object_cells, object_positions
from collector.vqa import ASSISTANT_PREFIX, class_first_token, load_questions, vqa_prompt
from db.arrow import table_from_rows
from db.store import ResultsDB

# -- layer windows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerWindow:
    """Decoder layers start..end (0-based, inclusive) blocked together."""

    kind: str  # 'preset' | 'sliding'
    start: int
    end: int
    preset: str | None = None

    @property
    def layers(self) -> range:
        return range(self.start, self.end + 1)


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def scale_window(start: int, end: int, n_layers: int, reference_depth: int = REFERENCE_DEPTH) -> tuple[int, int]:
    """A window of a `reference_depth`-layer model mapped onto `n_layers` layers.

    The window covers the fraction [start, end + 1) / reference_depth of the depth; both
    boundaries are scaled and rounded half up: start' = round(start * n / ref),
    end' = round((end + 1) * n / ref) - 1, then clipped to [0, n - 1] with end' >= start'
    (a window never becomes empty). The identity for n = ref. E.g. n = 4: early (0, 0),
    early_mid (1, 1), mid (1, 2), mid_late (2, 2), late (3, 3), all (0, 3); n = 40: early
    (0, 12), early_mid (6, 18), mid (14, 25), mid_late (19, 30), late (26, 39).
    """
    if n_layers < 1:
        raise ValueError("a model needs at least one layer")
    if not 0 <= start <= end < reference_depth:
        raise ValueError(f"window ({start}, {end}) outside a {reference_depth}-layer model")
    new_start = min(max(_round_half_up(start * n_layers / reference_depth), 0), n_layers - 1)
    new_end = min(max(_round_half_up((end + 1) * n_layers / reference_depth) - 1, new_start), n_layers - 1)
    return new_start, new_end


def preset_windows(n_layers: int) -> list[LayerWindow]:
    """The paper's preset windows scaled to `n_layers` (see `scale_window`)."""
    return [
        LayerWindow("preset", *scale_window(start, end, n_layers), preset=name)
        for name, (start, end) in PRESETS_32.items()
    ]


def sliding_windows(n_layers: int, width: int = DEFAULT_WINDOW) -> list[LayerWindow]:
    """Windows of `width` layers (at most the depth) starting at every layer, cut at the last layer."""
    if width < 1:
        raise ValueError("the window width must be at least 1")
    width = min(width, n_layers)
    return [LayerWindow("sliding", start, min(start + width - 1, n_layers - 1)) for start in range(n_layers)]


# -- position sets ----------------------------------------------------------------------------


def source_sets(cells: np.ndarray, layout: ImageTokenLayout) -> dict[str, list[int]]:
    """Key-position sets by name, from the object's (grid_rows, grid_cols) bool cells."""
    # Every image-derived position, not just the grid: with LLaVA-NeXT the high-resolution and
    # newline tokens also carry the image, so "the image minus X" must block them too.
    image = [int(p) for p in layout.all_image_positions.tolist()]
    object_1 = set(object_positions(cells, layout, 1))
    last_row = set(last_row_positions(layout))
    return {
        "object_0": object_positions(cells, layout, 0),
        "object_1": sorted(object_1),
        "object_2": object_positions(cells, layout, 2),
        "image_minus_object_1": sorted(p for p in image if p not in object_1),
        "image_minus_last_row": sorted(p for p in image if p not in last_row),
    }


def last_row_positions(layout: ImageTokenLayout) -> list[int]:
    """LM positions of the last grid row of image tokens, left to right."""
    return [layout.position_of(layout.grid_rows - 1, col) for col in range(layout.grid_cols)]


def target_sets(layout: ImageTokenLayout, n_positions: int) -> dict[str, list[int]]:
    """Query-position sets by name."""
    return {"last": [n_positions - 1], "last_row": last_row_positions(layout)}


@dataclass(frozen=True)
class BlockingCondition:
    """One blocking condition of one image: queries at `target_positions` cannot attend to keys
    at `source_positions` in the window's layers. (Not token ablation's `Condition`, which
    replaces embeddings: the two share only a name.)"""

    source: str
    target: str
    window: LayerWindow
    source_positions: tuple[int, ...]
    target_positions: tuple[int, ...]

    @property
    def block(self) -> AttentionBlock:
        return AttentionBlock.of(self.source_positions, self.target_positions, self.window.layers)


def conditions_for(
    sources: Mapping[str, Sequence[int]],
    targets: Mapping[str, Sequence[int]],
    windows: Sequence[LayerWindow],
) -> list[BlockingCondition]:
    """Every (target, source, window) combination, in that nesting order."""
    return [
        BlockingCondition(source, target, window, tuple(sources[source]), tuple(targets[target]))
        for target in targets
        for source in sources
        for window in windows
    ]


# -- prompts and answers ----------------------------------------------------------------------


# -- forwards ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """The next-token prediction at the last position."""

    token_id: int
    prob: float
    target_prob: float  # probability of the class's first token


def _prediction(logits: torch.Tensor, class_token_id: int) -> list[Prediction]:
    """Predictions from (B, vocab) logits."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_prob, top_id = probs.max(dim=-1)
    return [
        Prediction(int(top_id[b]), float(top_prob[b]), float(probs[b, class_token_id])) for b in range(probs.shape[0])
    ]


@torch.no_grad()
def baseline_forward(
    loaded: LoadedModel, inputs: Mapping[str, torch.Tensor], class_token_id: int
) -> tuple[dict[str, Any], Prediction]:
    """The plain forward: the prediction, and the keyword arguments the LM (decoder) received.

    The captured decoder inputs (inputs_embeds (1, T, d_model) with image features merged,
    attention_mask (1, T), position ids ...) let every blocking condition rerun only the
    language model, without the vision tower.
    """
    captured: dict[str, Any] = {}

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if args:
            raise ValueError("the language model got positional arguments; expected inputs_embeds=...")
        captured.update(kwargs)

    handle = loaded.adapter.decoder.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        logits = loaded.model(**inputs, use_cache=False, logits_to_keep=1).logits  # (1, 1, vocab)
    finally:
        handle.remove()
    if captured.get("inputs_embeds") is None:
        raise RuntimeError("the language model was not called with inputs_embeds")
    return captured, _prediction(logits[:, -1], class_token_id)[0]


def _expand_decoder_inputs(decoder_inputs: Mapping[str, Any], batch: int) -> dict[str, Any]:
    """The captured batch-of-one decoder inputs repeated `batch` times (views, no copies)."""
    out: dict[str, Any] = {}
    for name, value in decoder_inputs.items():
        if isinstance(value, torch.Tensor):
            if value.shape[0] == 1:
                value = value.expand(batch, *value.shape[1:])
            elif name == "position_ids" and value.dim() == 3 and value.shape[1] == 1:
                value = value.expand(value.shape[0], batch, *value.shape[2:])  # M-RoPE (3, B, T)
            else:
                raise ValueError(f"cannot repeat the language model input {name} of shape {tuple(value.shape)}")
        out[name] = value
    out["use_cache"] = False
    return out


@torch.no_grad()
def predict_blocked(
    loaded: LoadedModel,
    decoder_inputs: Mapping[str, Any],
    blocks: Sequence[AttentionBlock],
    class_token_id: int,
    readout: Readout | None = None,
) -> list[Prediction]:
    """One batched language-model forward, batch element b blocked by blocks[b].

    readout: the adapter's (`adapter.readout()`, built here when not given).
    """
    adapter = loaded.adapter
    readout = readout if readout is not None else adapter.readout()
    with block_attention(adapter, blocks):
        hidden = adapter.decoder(**_expand_decoder_inputs(decoder_inputs, len(blocks))).last_hidden_state
    last = hidden[:, -1]  # (B, d_model)
    return _prediction(readout(last, normed=adapter.last_hidden_state_is_normed), class_token_id)


def run_conditions(
    loaded: LoadedModel,
    decoder_inputs: Mapping[str, Any],
    blocks: Sequence[AttentionBlock],
    class_token_id: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    readout: Readout | None = None,
) -> list[Prediction]:
    """Predictions for each block, computing each distinct block once, `batch_size` per forward.

    Identical blocks (e.g. a preset window equal to a sliding one) share one batch element.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    readout = readout if readout is not None else loaded.adapter.readout()
    distinct = list(dict.fromkeys(blocks))
    results: dict[AttentionBlock, Prediction] = {}
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start : start + batch_size]
        results.update(zip(chunk, predict_blocked(loaded, decoder_inputs, chunk, class_token_id, readout)))
    return [results[block] for block in blocks]


# -- rows -------------------------------------------------------------------------------------


# Every column of `blocking` is written (NULL where a row has no value, e.g. the baseline's window).
BLOCKING_COLUMNS = (
    "run_id",
    "image_id",
    "category",
    "source",
    "target",
    "layer_start",
    "layer_end",
    "window_kind",
    "preset",
    "correct",
    "question",
    "predicted_token",
    "predicted_prob",
    "target_token",
    "target_prob",
    "source_positions",
    "target_positions",
)


@dataclass(frozen=True)
class BlockingSettings:
    """Settings that change results (part of the run identity), with their defaults."""

    sources: tuple[str, ...] = SOURCE_SETS
    targets: tuple[str, ...] = TARGET_SETS
    window: int = DEFAULT_WINDOW
    curate: bool = True

    def __post_init__(self) -> None:
        unknown = (set(self.sources) - set(SOURCE_SETS)) | (set(self.targets) - set(TARGET_SETS))
        if unknown:
            raise UserError(
                f"unknown source/target sets {sorted(unknown)}; sources: {SOURCE_SETS}, targets: {TARGET_SETS}"
            )
        if not self.sources or not self.targets:
            raise UserError("give at least one source set and one target set")
        if self.window < 1:
            raise UserError("--window must be at least 1")


def blocking_one_image(
    loaded: LoadedModel,
    run_id: str,
    record: ImageRecord,
    target: AblationTarget,
    questions: Sequence[str] | None,
    settings: BlockingSettings,
    batch_size: int = DEFAULT_BATCH_SIZE,
    readout: Readout | None = None,
) -> ImageOutcome:
    """Every row of one image: baseline and conditions (or the reason it was skipped)."""
    adapter = loaded.adapter
    image = record.load()

    def skip(
        reason: SkipReason, detail: str | None, tables: dict[str, pa.Table] | None = None, layout=None, n_positions=0
    ) -> ImageOutcome:
        tables = dict(tables or {})
        if layout is None:
            # Nothing ran: the marker still needs the grid, so take it from a processed prompt.
            probe = adapter.build_inputs_for_text(image, vqa_prompt(adapter, ""))
            layout = adapter.image_token_layout(probe["input_ids"][0], probe)
        tables["run_images"] = run_image_marker(
            run_id, record.image_id, n_positions, layout, adapter.n_layers if n_positions else None
        )
        return ImageOutcome.skip(reason, detail, tables)

    if questions is None:
        return skip(SkipReason.NO_QUESTION, "the questions file has no entry for this image")
    if not questions:
        return skip(SkipReason.EMPTY_QUESTION_LIST, "the questions file lists no question for this image")
    question = questions[0]
    text = vqa_prompt(adapter, question)
    inputs = adapter.build_inputs_for_text(image, text)
    input_ids = inputs["input_ids"][0]
    n_positions = int(input_ids.numel())
    layout = adapter.image_token_layout(input_ids, inputs)
    per_image = {"image_views": image_view_table(run_id, record, adapter, adapter.view_pixels(inputs))}

    def with_positions() -> dict[str, pa.Table]:
        token_text = decode_tokens(adapter.tokenizer, set(input_ids.tolist()))
        return {**per_image, "positions": positions_table(run_id, record.image_id, input_ids, layout, token_text)}

    cells = object_cells(
        target.segmentation,
        adapter,
        record.width,
        record.height,
        layout.grid_rows,
        layout.grid_cols,
    )
    if not cells.any():
        return skip(
            SkipReason.OBJECT_OUTSIDE_VIEW,
            f"annotation {target.annotation_id} is cropped out of the model's view",
            with_positions(),
            layout,
            n_positions,
        )
    class_token_id = class_first_token(adapter.tokenizer, text, target.category)
    if class_token_id is None:
        return skip(
            SkipReason.CLASS_TOKEN_UNKNOWN,
            f"no known first token for {target.category!r}",
            with_positions(),
            layout,
            n_positions,
        )

    decoder_inputs, baseline = baseline_forward(loaded, inputs, class_token_id)
    sources = source_sets(cells, layout)
    sources = {name: sources[name] for name in settings.sources}
    targets = target_sets(layout, n_positions)
    targets = {name: targets[name] for name in settings.targets}
    windows = preset_windows(adapter.n_layers) + sliding_windows(adapter.n_layers, settings.window)

    curated_out = settings.curate and baseline.token_id != class_token_id
    conditions = [] if curated_out else conditions_for(sources, targets, windows)
    predictions = run_conditions(
        loaded, decoder_inputs, [c.block for c in conditions], class_token_id, batch_size, readout
    )

    token_text = decode_tokens(
        adapter.tokenizer, {class_token_id, baseline.token_id} | {p.token_id for p in predictions}
    )
    common = {
        "run_id": run_id,
        "image_id": record.image_id,
        "category": target.category,
        "question": question,
        "target_token": token_text[class_token_id],
    }

    def row(prediction: Prediction, **fields: Any) -> dict[str, Any]:
        return {
            **common,
            **fields,
            "correct": prediction.token_id == class_token_id,
            "predicted_token": token_text[prediction.token_id],
            "predicted_prob": prediction.prob,
            "target_prob": prediction.target_prob,
        }

    rows = [
        row(
            baseline,
            source="none",
            target="none",
            layer_start=None,
            layer_end=None,
            window_kind="baseline",
            preset=None,
            source_positions=None,
            target_positions=None,
        )
    ]
    for condition, prediction in zip(conditions, predictions):
        rows.append(
            row(
                prediction,
                source=condition.source,
                target=condition.target,
                layer_start=condition.window.start,
                layer_end=condition.window.end,
                window_kind=condition.window.kind,
                preset=condition.window.preset,
                source_positions=list(condition.source_positions),
                target_positions=list(condition.target_positions),
            )
        )
    tables = {**with_positions(), "blocking": table_from_rows("blocking", rows, BLOCKING_COLUMNS)}
    if curated_out:
        detail = f"baseline predicts {token_text[baseline.token_id]!r}, not {token_text[class_token_id]!r}"
        return skip(SkipReason.BASELINE_INCORRECT, detail, tables, layout, n_positions)
    tables["run_images"] = run_image_marker(run_id, record.image_id, n_positions, layout, adapter.n_layers)
    return ImageOutcome.keep(tables)


# -- the run ----------------------------------------------------------------------------------


def _sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_identity(
    loaded: LoadedModel,
    questions: Mapping[int, Sequence[str]],
    annotation_sha256: str,
    max_annotations: int,
    area_range: tuple[float, float],
    settings: BlockingSettings,
) -> dict[str, Any]:
    """The settings that change blocking results; a rerun with the same identity resumes."""
    canonical_questions = json.dumps({str(k): list(v) for k, v in sorted(questions.items())}, sort_keys=True)
    n_layers = loaded.adapter.n_layers
    return {
        "model_id": loaded.model_id,
        "revision": loaded.revision,
        "dtype": loaded.dtype,
        "quantization": loaded.quantization,
        "prompt_template": loaded.adapter.prompt_template,
        "assistant_prefix": ASSISTANT_PREFIX,
        "questions_sha256": hashlib.sha256(canonical_questions.encode()).hexdigest(),
        "annotations_sha256": annotation_sha256,
        "max_annotations": max_annotations,
        "area_range": [float(area_range[0]), float(area_range[1])],
        "curate": settings.curate,
        "window": min(settings.window, n_layers),
        "presets": {w.preset: [w.start, w.end] for w in preset_windows(n_layers)},
        "sources": list(settings.sources),
        "targets": list(settings.targets),
    }


def select_blocking_images(
    records: Sequence[ImageRecord], annotation_file: str | Path, max_annotations: int, area_range: tuple[float, float]
) -> list[tuple[ImageRecord, AblationTarget]]:
    """The given images that have a target object (`select_targets`), in image-id order."""
    try:
        coco = load_coco(annotation_file)
        targets = select_targets(coco, max_annotations=max_annotations, area_range=area_range)
    except ValueError as error:
        raise UserError(str(error)) from None
    by_id = {record.image_id: record for record in records}
    return [(by_id[t.image_id], t) for t in targets if t.image_id in by_id]


class BlockingExperiment(Experiment):
    """Attention blocking of every selected image (see the module docstring)."""

    name = "blocking"
    label = "attention blocking"

    def __init__(
        self,
        loaded: LoadedModel,
        annotation_file: str | Path,
        questions: Mapping[int, Sequence[str]],
        settings: BlockingSettings,
        max_annotations: int = DEFAULT_MAX_ANNOTATIONS,
        area_range: tuple[float, float] = DEFAULT_AREA_RANGE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        questions_path: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        super().__init__(loaded)
        self.annotation_file = annotation_file
        self.questions = questions
        self.settings = settings
        self.max_annotations = max_annotations
        self.area_range = area_range
        self.batch_size = batch_size
        self.questions_path = questions_path
        self.readout = loaded.adapter.readout()
        self._targets: dict[int, AblationTarget] = {}

    def identity(self) -> dict[str, Any]:
        return run_identity(
            self.loaded,
            self.questions,
            _sha256_file(self.annotation_file),
            self.max_annotations,
            self.area_range,
            self.settings,
        )

    def provenance(self) -> dict[str, Any]:
        return {
            "questions_file": self.questions_path,
            "annotation_file": str(self.annotation_file),
            "batch_size": self.batch_size,
            "attn_implementation": self.loaded.attn_implementation,
            "source_sets": list(self.settings.sources),
            "target_sets": list(self.settings.targets),
        }

    def select(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        selected = select_blocking_images(records, self.annotation_file, self.max_annotations, self.area_range)
        self._targets = {record.image_id: target for record, target in selected}
        return [record for record, _ in selected]

    def process(self, record: ImageRecord, run_id: str) -> ImageOutcome:
        return blocking_one_image(
            self.loaded,
            run_id,
            record,
            self._targets[record.image_id],
            self.questions.get(record.image_id),
            self.settings,
            self.batch_size,
            self.readout,
        )


def collect_blocking(
    loaded: LoadedModel,
    records: Sequence[ImageRecord],
    db: ResultsDB,
    annotation_file: str | Path,
    questions: str | Path | Mapping[int, Sequence[str]],
    max_annotations: int = DEFAULT_MAX_ANNOTATIONS,
    area_range: tuple[float, float] = DEFAULT_AREA_RANGE,
    curate: bool = True,
    window: int = DEFAULT_WINDOW,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    sources: Sequence[str] = SOURCE_SETS,
    targets: Sequence[str] = TARGET_SETS,
    extra_config: Mapping[str, Any] | None = None,
    progress: bool = True,
    loader_workers: int = DEFAULT_LOADER_WORKERS,
    **run_options: Any,  # run_experiment's strict, retry_skipped
) -> RunSummary:
    """Run attention blocking over the selected images into `db`, resuming a matching run.

    `questions` is a questions file path or an already loaded {image id: [question, ...]}.
    `limit` counts kept images (blocking ran) in image-id order, earlier invocations
    included, so rerunning the same command resumes the same set. Each image's rows
    (blocking, skipped, positions, image_views, run_images) are written in one transaction.
    """
    settings = BlockingSettings(tuple(sources), tuple(targets), window, curate)
    questions_path = None
    if isinstance(questions, (str, Path)):
        questions_path = str(questions)
        questions = load_questions(questions)
    else:  # keys as in the file ("<coco id>") or already ints
        questions = {int(key): list(value) for key, value in questions.items()}
    experiment = BlockingExperiment(
        loaded, annotation_file, questions, settings, max_annotations, area_range, batch_size, questions_path
    )
    return run_experiment(
        experiment,
        records,
        db,
        limit=limit,
        extra_config=extra_config,
        progress=progress,
        loader_workers=loader_workers,
        **run_options,
    )
