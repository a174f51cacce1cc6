"""The token-ablation experiment: select images, curate, ablate token sets, score, write DuckDB rows.

Per kept image, every condition (none, object_0/1/2, register, random_k, gradient_k,
image_noise) is run in every requested setting (generative, polling, vqa). An image is
either kept (every requested setting ran) or skipped with a recorded reason; both get a
`run_images` marker so a rerun resumes exactly where it stopped. `AblationExperiment` is
the per-image work; `collector.runner` runs it.

Why one ~410-line module: curation, token sets and the three settings are one image's work
(`AblationExperiment.process`); settings, token sets and the replacement live beside it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from PIL import Image

from collector.ablation.replacement import Replacement, lm_input_embeddings
from collector.ablation.settings import (
    DEFAULT_MAX_NEW_TOKENS,
    GENERATIVE_QUESTION,
    POLLING_MAX_NEW_TOKENS,
    POLLING_QUESTION,
    SETTINGS,
    Condition,
    generate_answers,
    mentions_class,
    next_token_predictions,
    says_yes,
)
from collector.ablation.token_sets import (
    DEFAULT_IG_STEPS,
    DEFAULT_K,
    DEFAULT_NOISE_STD,
    TokenSet,
    integrated_gradients,
    noised_pixel_values,
    token_sets,
    yes_token_id,
)
from collector.coco import AblationTarget, load_coco, select_targets
from collector.errors import UserError
from collector.images import ImageRecord
from collector.loading import LoadedModel
from collector.runner import DEFAULT_LOADER_WORKERS, Experiment, ImageOutcome, RunSummary, SkipReason, run_experiment
from collector.tables import decode_tokens, image_view_table, positions_table, run_image_marker
from collector.targets import object_cells
from collector.vqa import class_first_token, vqa_prompt
from db.arrow import table_from_rows
from db.store import ResultsDB

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass(frozen=True)
class AblationOptions:
    """What defines an ablation run besides the model and the replacement vector."""

    settings: tuple[str, ...] = ("generative", "polling")
    questions: dict[int, list[str]] | None = None
    k_values: tuple[int, ...] = DEFAULT_K
    seed: int = 0
    curate: bool = True
    max_annotations: int = 3
    area_range: tuple[float, float] = (1000.0, 2000.0)
    ig_steps: int = DEFAULT_IG_STEPS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    noise_std: float = DEFAULT_NOISE_STD
    batch_size: int = 16  # speed only: batched answers equal one-at-a-time answers

    def __post_init__(self) -> None:
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown or not self.settings:
            raise UserError(f"unknown setting(s) {unknown or '(none)'}; choose from {', '.join(SETTINGS)}")
        if "vqa" in self.settings and self.questions is None:
            raise UserError("the vqa setting needs --questions FILE")
        if any(k < 1 for k in self.k_values):
            raise UserError("every k must be at least 1")
        if self.ig_steps < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise UserError("--ig-steps, --batch-size and --max-new-tokens must be at least 1")
        low, high = self.area_range
        if not 0 <= low < high:
            raise UserError(f"object area range must be 0 <= MIN < MAX, got {low}:{high}")

    def identity(self) -> dict[str, Any]:
        questions_sha = None
        if "vqa" in self.settings and self.questions is not None:
            canonical = {str(image_id): list(q) for image_id, q in sorted(self.questions.items())}
            questions_sha = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
        return {
            "settings": list(self.settings),
            "questions_sha256": questions_sha,
            "k": list(self.k_values),
            "seed": self.seed,
            "curate": self.curate,
            "max_annotations": self.max_annotations,
            "area_range": list(self.area_range),
            "ig_steps": self.ig_steps,
            "ig_rule": "gauss-legendre",
            "max_new_tokens": self.max_new_tokens,
            "polling_max_new_tokens": POLLING_MAX_NEW_TOKENS,
            "noise_std": self.noise_std,
        }


def run_identity(loaded: LoadedModel, replacement: Replacement, options: AblationOptions) -> dict[str, Any]:
    """The settings that change ablation results; a rerun with the same identity resumes."""
    return {
        "model_id": loaded.model_id,
        "revision": loaded.revision,
        "dtype": loaded.dtype,
        "quantization": loaded.quantization,
        "prompt_template": loaded.adapter.prompt_template,
        "replacement_sha256": replacement.sha256,
        **options.identity(),
    }


def _is_grayscale(record: ImageRecord) -> bool:
    with Image.open(record.path) as image:
        return image.mode in GRAYSCALE_MODES or (image.mode == "P" and image.palette.mode in GRAYSCALE_MODES)


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def ablate_one_image(
    loaded: LoadedModel,
    run_id: str,
    record: ImageRecord,
    target: AblationTarget,
    replacement: Replacement,
    options: AblationOptions,
) -> ImageOutcome:
    """Every row of one image (ablations, positions, image view, marker), or its skip (marker only)."""
    adapter = loaded.adapter
    tokenizer = adapter.tokenizer
    category = target.category
    image = record.load()
    generative_inputs = adapter.build_inputs(image, GENERATIVE_QUESTION)
    layout = adapter.image_token_layout(generative_inputs["input_ids"][0], generative_inputs)
    n_positions = int(generative_inputs["input_ids"].shape[1])

    def skip(reason: SkipReason, detail: str) -> ImageOutcome:
        marker = run_image_marker(run_id, record.image_id, n_positions, layout, None)
        return ImageOutcome.skip(reason, detail, {"run_images": marker})

    if _is_grayscale(record):
        return skip(SkipReason.GRAYSCALE, "grayscale image")
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
            f"annotation {target.annotation_id} ({category}) lies outside the model's view",
        )
    vqa_question = vqa_token = None
    if "vqa" in options.settings:
        questions = (options.questions or {}).get(record.image_id) or []
        if not questions:
            return skip(SkipReason.NO_QUESTION, "no VQA question for this image")
        vqa_question = questions[0]
        vqa_token = class_first_token(tokenizer, vqa_prompt(adapter, vqa_question), category)
        if vqa_token is None:
            return skip(SkipReason.CLASS_TOKEN_UNKNOWN, f"the first token of {category!r} is not in the vocabulary")

    vector = replacement.vector
    image_embeddings = lm_input_embeddings(loaded, generative_inputs)[0, layout.positions].float().cpu()
    # Noise goes into the model's view (what the object cells index); the adapter maps the
    # view back into the family's pixel_values when the condition runs.
    noise_pixels = noised_pixel_values(
        adapter.view_pixels(generative_inputs), cells, options.noise_std, options.seed, record.image_id
    )
    none_condition = Condition("none", ())
    noise_condition = Condition("image_noise", (), noise_pixels)

    curation_answers: list[str] | None = None
    if options.curate:
        curation_answers = generate_answers(
            loaded,
            generative_inputs,
            [none_condition, noise_condition],
            vector,
            options.max_new_tokens,
            options.batch_size,
        )
        baseline_answer, noise_answer = curation_answers
        if not mentions_class(baseline_answer, category):
            return skip(
                SkipReason.BASELINE_INCORRECT, f"description does not name {category!r}: {_short(baseline_answer)}"
            )
        if mentions_class(noise_answer, category):
            return skip(
                SkipReason.NOISE_STILL_CORRECT, f"still names {category!r} under image noise: {_short(noise_answer)}"
            )

    polling_question = POLLING_QUESTION.format(category=category)
    polling_inputs = adapter.build_inputs(image, polling_question)
    polling_layout = adapter.image_token_layout(polling_inputs["input_ids"][0], polling_inputs)
    ig = integrated_gradients(
        loaded,
        polling_inputs,
        polling_layout,
        vector,
        yes_token_id(tokenizer),
        steps=options.ig_steps,
        batch_size=options.batch_size,
    )
    sets: list[TokenSet] = token_sets(
        cells, image_embeddings, record.image_id, options.seed, options.k_values, ig.token_attribution
    )

    rows: list[dict[str, Any]] = []
    first_inputs: dict[str, torch.Tensor] | None = None
    for setting in options.settings:
        if setting == "generative":
            question, inputs = GENERATIVE_QUESTION, generative_inputs
        elif setting == "polling":
            question, inputs = polling_question, polling_inputs
        else:
            question = vqa_question
            inputs = adapter.build_inputs_for_text(image, vqa_prompt(adapter, vqa_question))
        first_inputs = first_inputs or inputs
        setting_layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
        conditions = [none_condition]
        conditions += [Condition(s.name, tuple(setting_layout.positions_of_cells(list(s.token_indices)))) for s in sets]
        conditions.append(noise_condition)
        seeds = {s.name: s.seed for s in sets} | {"image_noise": options.seed}
        base = {"category": category, "setting": setting, "question": question}

        if setting in ("generative", "polling"):
            todo = conditions
            reused: dict[str, str] = {}
            if setting == "generative" and curation_answers is not None:
                # batched answers equal one-at-a-time answers (tested), so curation's are reused
                reused = {"none": curation_answers[0], "image_noise": curation_answers[1]}
                todo = [c for c in conditions if c.name not in reused]
            max_new = options.max_new_tokens if setting == "generative" else POLLING_MAX_NEW_TOKENS
            answers = dict(
                zip([c.name for c in todo], generate_answers(loaded, inputs, todo, vector, max_new, options.batch_size))
            )
            answers.update(reused)
            for condition in conditions:
                answer = answers[condition.name]
                correct = mentions_class(answer, category) if setting == "generative" else says_yes(answer)
                rows.append(
                    {
                        **base,
                        "condition": condition.name,
                        "positions": list(condition.positions),
                        "correct": correct,
                        "answer": answer,
                        "seed": seeds.get(condition.name),
                    }
                )
        else:
            predictions = next_token_predictions(loaded, inputs, conditions, vector, vqa_token, options.batch_size)
            target_text = tokenizer.decode([vqa_token])
            for condition, prediction in zip(conditions, predictions):
                rows.append(
                    {
                        **base,
                        "condition": condition.name,
                        "positions": list(condition.positions),
                        "correct": prediction.predicted_id == vqa_token,
                        "answer": None,
                        "predicted_token": prediction.predicted_token,
                        "predicted_prob": prediction.predicted_prob,
                        "target_token": target_text,
                        "target_prob": prediction.target_prob,
                        "seed": seeds.get(condition.name),
                    }
                )

    assert first_inputs is not None
    input_ids = first_inputs["input_ids"][0]
    first_layout = adapter.image_token_layout(input_ids, first_inputs)
    tables = {
        "ablations": _ablation_table(run_id, record.image_id, rows),
        "positions": positions_table(
            run_id, record.image_id, input_ids, first_layout, decode_tokens(tokenizer, input_ids.tolist())
        ),
        "image_views": image_view_table(run_id, record, adapter, adapter.view_pixels(generative_inputs)),
        "run_images": run_image_marker(run_id, record.image_id, int(input_ids.numel()), first_layout, None),
    }
    return ImageOutcome.keep(tables)


# Every column of `ablations` is written (NULL where a setting has no value).
ABLATION_COLUMNS = (
    "run_id",
    "image_id",
    "category",
    "condition",
    "setting",
    "positions",
    "n_ablated",
    "correct",
    "answer",
    "question",
    "predicted_token",
    "predicted_prob",
    "target_token",
    "target_prob",
    "seed",
)


def _ablation_table(run_id: str, image_id: int, rows: list[dict[str, Any]]) -> pa.Table:
    full_rows = [
        {
            **row,
            "run_id": run_id,
            "image_id": image_id,
            "n_ablated": len(row["positions"]),
            "correct": bool(row["correct"]),
        }
        for row in rows
    ]
    return table_from_rows("ablations", full_rows, ABLATION_COLUMNS)


def select_records(
    records: Sequence[ImageRecord], annotation_file: str | Path, options: AblationOptions
) -> list[tuple[ImageRecord, AblationTarget]]:
    """Records with a single-instance target object (collector.coco.select_targets), in input order."""
    try:
        coco = load_coco(annotation_file)
    except ValueError as error:
        raise UserError(str(error)) from None
    targets = {t.image_id: t for t in select_targets(coco, options.max_annotations, options.area_range)}
    return [(record, targets[record.image_id]) for record in records if record.image_id in targets]


class AblationExperiment(Experiment):
    """Token ablation of every selected image (see the module docstring)."""

    name = "ablation"
    label = "ablation"

    def __init__(
        self, loaded: LoadedModel, annotation_file: str | Path, options: AblationOptions, replacement: Replacement
    ) -> None:
        if replacement.hidden_size != loaded.adapter.hidden_size:
            raise UserError(
                f"replacement vector has size {replacement.hidden_size} but the model's hidden size is "
                f"{loaded.adapter.hidden_size}"
            )
        super().__init__(loaded)
        self.annotation_file = annotation_file
        self.options = options
        self.replacement = replacement
        self._targets: dict[int, AblationTarget] = {}

    def identity(self) -> dict[str, Any]:
        return run_identity(self.loaded, self.replacement, self.options)

    def provenance(self) -> dict[str, Any]:
        return {
            "replacement": self.replacement.source,
            "batch_size": self.options.batch_size,
            "annotation_file": str(self.annotation_file),
        }

    def select(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        selected = select_records(records, self.annotation_file, self.options)
        self._targets = {record.image_id: target for record, target in selected}
        return [record for record, _ in selected]

    def process(self, record: ImageRecord, run_id: str) -> ImageOutcome:
        target = self._targets[record.image_id]
        return ablate_one_image(self.loaded, run_id, record, target, self.replacement, self.options)


def collect_ablation(
    loaded: LoadedModel,
    records: Sequence[ImageRecord],
    db: ResultsDB,
    annotation_file: str | Path,
    options: AblationOptions,
    replacement: Replacement,
    limit: int | None = None,
    extra_config: dict[str, Any] | None = None,
    progress: bool = True,
    loader_workers: int = DEFAULT_LOADER_WORKERS,
    **run_options: Any,  # run_experiment's strict, retry_skipped
) -> RunSummary:
    """Run token ablation over the selected images into `db`, resuming a matching earlier run.

    `limit` counts kept images (earlier invocations' included): selection and curation
    drop images, so the loop stops after `limit` images were ablated, not listed.
    """
    experiment = AblationExperiment(loaded, annotation_file, options, replacement)
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
