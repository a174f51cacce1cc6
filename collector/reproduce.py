"""The paper's protocol as one sequence: lens, mean vector, ablation, blocking, into one database.

`run_protocol` is the one orchestration of every experiment on one model: `llava-interp
reproduce` runs it with the paper's defaults (Neo et al., arXiv 2410.07149, and the
defaults of its code, github.com/clemneo/llava-interp), and `llava-interp demo` runs it
with the demo's small settings. Each step resumes on its own (the runner resumes a run
with the same identity; the mean vector is found again by its inputs), so rerunning the
same command writes nothing new once the sequence is complete.

Every run's config gets a `reproduce` entry: the protocol it ran under and every
deviation from the paper's (a smaller image count, a model other than LLaVA-1.5-7B, a
shorter generation, settings scaled to a smaller model), each with its reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from collector.blocking.settings import DEFAULT_AREA_RANGE, DEFAULT_MAX_ANNOTATIONS, DEFAULT_WINDOW, REFERENCE_DEPTH
from collector.errors import UserError
from collector.images import ImageRecord
from collector.options import (
    ABLATION_SETTINGS,
    DEFAULT_IG_STEPS,
    DEFAULT_K,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NOISE_STD,
    ModelChoice,
    db_option,
    ig_steps_option,
    loader_workers_option,
    max_new_tokens_option,
    model_options,
    questions_option,
    quiet_option,
    run_options,
)

if TYPE_CHECKING:  # not imported at run time: the CLI's --help must not load torch
    from collector.loading import LoadedModel
    from db.store import ResultsDB

PAPER_MODEL = "llava-hf/llava-1.5-7b-hf"
PAPER_IMAGE_TOKENS = 576  # LLaVA-1.5: a 24 x 24 patch grid
# The paper's code loads the model in float16, unquantized (HookedLVLM(quantize=True,
# quantize_type="fp16") in src/HookedLVLM.py).
PAPER_DTYPE = "float16"
PAPER_QUANTIZATION = "none"
PROTOCOL_NAME = "neo2024"
# The paper code's ablation defaults are `collect ablation`'s (collector/options.py; tests/test_reproduce.py checks).
SETTINGS = ABLATION_SETTINGS
LENS_PROMPT = "Describe the image."  # scripts/logit_lens/create_logit_lens.py of the paper's code


@dataclass(frozen=True)
class Protocol:
    """Every setting of the sequence that is not the model or the images.

    limit: kept images per ablation and blocking run (None: every selected image);
    lens_limit: images of the lens run (None: as many as `limit`, or all);
    lens_images: 'selected' (the images the ablation selection keeps: <= max_annotations
    annotations, one single-instance object within area_range) or 'all';
    mean_images: images averaged for the mean vector (None: every given image).
    """

    lens_prompt: str = LENS_PROMPT
    lens_top_k: int = 5
    lens_images: str = "selected"
    settings: tuple[str, ...] = SETTINGS
    k_values: tuple[int, ...] = DEFAULT_K
    ablation_curate: bool = True
    blocking_curate: bool = True
    max_annotations: int = DEFAULT_MAX_ANNOTATIONS
    area_range: tuple[float, float] = DEFAULT_AREA_RANGE
    ig_steps: int = DEFAULT_IG_STEPS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    noise_std: float = DEFAULT_NOISE_STD
    window: int = DEFAULT_WINDOW
    seed: int = 0
    limit: int | None = None
    lens_limit: int | None = None
    mean_images: int | None = None

    def as_config(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# The paper's protocol (its code's defaults); `limit`s are None: the paper ran every image
# its selection kept.
PAPER_PROTOCOL = Protocol()


@dataclass(frozen=True)
class Deviation:
    """One setting that differs from the paper's, and why."""

    setting: str
    paper: Any
    here: Any
    reason: str

    def as_config(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def deviations(
    protocol: Protocol,
    model_id: str,
    reasons: Mapping[str, str] | None = None,
    model_note: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> list[Deviation]:
    """Every field of `protocol` that differs from PAPER_PROTOCOL, the model if it is not the
    paper's, and the dtype and quantization of `provenance` (how the model was loaded) if
    they are not the paper's; `reasons` explains them by name (default: 'set by the caller')."""
    reasons = reasons or {}
    out = []
    if model_id != PAPER_MODEL:
        out.append(Deviation("model", PAPER_MODEL, model_id, model_note or "a model other than the paper's"))
    for name, paper_value in (("dtype", PAPER_DTYPE), ("quantization", PAPER_QUANTIZATION)):
        here = (provenance or {}).get(name)
        if here is not None and here != paper_value:
            out.append(Deviation(name, paper_value, here, reasons.get(name, f"loaded with --{name} {here}")))
    paper = dataclasses.asdict(PAPER_PROTOCOL)
    for name, value in dataclasses.asdict(protocol).items():
        if value != paper[name]:
            out.append(Deviation(name, paper[name], value, reasons.get(name, "set by the caller")))
    return out


def scaled_k_values(n_image_tokens: int) -> tuple[int, ...]:
    """The paper's k values (of 576 image tokens) scaled to a model with `n_image_tokens`, so
    that random_k and gradient_k ablate the same share of the image; at least 1, deduplicated."""
    return tuple(sorted({max(1, round(k * n_image_tokens / PAPER_IMAGE_TOKENS)) for k in DEFAULT_K}))


def scaled_window(n_layers: int) -> int:
    """The paper's sliding-window width (9 of 32 layers) scaled to `n_layers`, at least 1."""
    return max(1, round(DEFAULT_WINDOW * n_layers / REFERENCE_DEPTH))


@dataclass
class ProtocolSummary:
    """What one pass of the sequence did: each step's run summary (None when not run)."""

    lens: Any = None
    mean_vector_id: str | None = None
    mean_vector_reused: bool = False
    ablation: Any = None
    blocking: Any = None
    deviations: list[Deviation] = field(default_factory=list)


def mean_vector_key(model_id: str, provenance: Mapping[str, Any], records: Sequence[ImageRecord]) -> str:
    """What identifies a mean vector's inputs: the model as loaded and the images averaged."""
    payload = {
        "model_id": model_id,
        "provenance": {k: provenance.get(k) for k in ("revision", "dtype", "quantization", "prompt_template")},
        "images": sorted(str(record.path) for record in records),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def selected_records(
    records: Sequence[ImageRecord], annotation_file: str | Path, protocol: Protocol
) -> list[ImageRecord]:
    """The records whose image the ablation and blocking selection keeps, in id order."""
    from collector.coco import load_coco, select_targets

    keep = {
        target.image_id
        for target in select_targets(load_coco(annotation_file), protocol.max_annotations, protocol.area_range)
    }
    return sorted((record for record in records if record.image_id in keep), key=lambda record: record.image_id)


def no_selection_message(protocol: Protocol) -> str:
    low, high = protocol.area_range
    return (
        f"no image passes the paper's selection (at most {protocol.max_annotations} annotations, one "
        f"single-instance object of {low:g}-{high:g} px²): nothing to reproduce on"
    )


def run_protocol(
    loaded: LoadedModel,
    records: Sequence[ImageRecord],
    db: ResultsDB,
    annotation_file: str | Path,
    questions: Mapping[int, Sequence[str]],
    protocol: Protocol,
    *,
    mean_records: Sequence[ImageRecord] | None = None,
    extra_config: Mapping[str, Any] | None = None,
    deviation_reasons: Mapping[str, str] | None = None,
    model_note: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    **run_options: Any,  # run_experiment's strict, retry_skipped, loader_workers
) -> ProtocolSummary:
    """Lens, mean vector, ablation (every setting of the protocol), blocking (presets and
    sliding windows) on `records` into `db`, each step resuming what an earlier pass wrote.

    `mean_records` are the images averaged for the mean vector (default: `records`, the
    first `protocol.mean_images`). Every run's config records the protocol and its
    deviations (`reproduce`) on top of `extra_config`.
    """
    from collector.ablation.experiment import AblationOptions, collect_ablation
    from collector.ablation.replacement import compute_mean_vector, load_replacement, store_mean_vector
    from collector.blocking.experiment import collect_blocking
    from collector.lens.experiment import collect_lens
    from db.reproduction import find_mean_vector

    def say(message: str) -> None:
        if echo is not None:
            echo(message)

    found = deviations(protocol, loaded.model_id, deviation_reasons, model_note, loaded.provenance)
    config = {
        **(extra_config or {}),
        "reproduce": {
            "protocol": PROTOCOL_NAME,
            "settings": protocol.as_config(),
            "deviations": [d.as_config() for d in found],
        },
    }
    summary = ProtocolSummary(deviations=found)

    lens_records = (
        selected_records(records, annotation_file, protocol) if protocol.lens_images == "selected" else list(records)
    )
    lens_limit = protocol.lens_limit if protocol.lens_limit is not None else protocol.limit
    if lens_limit is not None:
        lens_records = lens_records[:lens_limit]
    if not lens_records:
        raise UserError(no_selection_message(protocol))
    summary.lens = collect_lens(
        loaded,
        lens_records,
        db,
        prompt=protocol.lens_prompt,
        top_k=protocol.lens_top_k,
        extra_config=config,
        progress=progress,
        **run_options,
    )
    say(f"lens: run {summary.lens.run_id}")

    averaged = list(mean_records if mean_records is not None else records)
    if protocol.mean_images is not None:
        averaged = averaged[: protocol.mean_images]
    key = mean_vector_key(loaded.model_id, loaded.provenance, averaged)
    vector_id = find_mean_vector(db, key)
    summary.mean_vector_reused = vector_id is not None
    if vector_id is None:
        mean = compute_mean_vector(loaded, averaged, progress=progress, strict=bool(run_options.get("strict")))
        source = str(averaged[0].path.parent) if averaged else ""
        vector_id = store_mean_vector(db, loaded, mean, source=source, config={**config, "reproduce_mean_key": key})
    summary.mean_vector_id = vector_id
    say(f"mean vector: {vector_id}{' (reused)' if summary.mean_vector_reused else ''}")
    replacement = load_replacement(f"db:{vector_id}", loaded.adapter.hidden_size, db)

    options = AblationOptions(
        settings=protocol.settings,
        questions={int(k): list(v) for k, v in questions.items()},
        k_values=protocol.k_values,
        seed=protocol.seed,
        curate=protocol.ablation_curate,
        max_annotations=protocol.max_annotations,
        area_range=protocol.area_range,
        ig_steps=protocol.ig_steps,
        max_new_tokens=protocol.max_new_tokens,
        noise_std=protocol.noise_std,
    )
    summary.ablation = collect_ablation(
        loaded,
        records,
        db,
        annotation_file,
        options,
        replacement,
        limit=protocol.limit,
        extra_config=config,
        progress=progress,
        **run_options,
    )
    say(f"ablation: run {summary.ablation.run_id}")
    summary.blocking = collect_blocking(
        loaded,
        records,
        db,
        annotation_file,
        questions,
        max_annotations=protocol.max_annotations,
        area_range=protocol.area_range,
        curate=protocol.blocking_curate,
        window=protocol.window,
        limit=protocol.limit,
        extra_config=config,
        progress=progress,
        **run_options,
    )
    say(f"blocking: run {summary.blocking.run_id}")
    return summary


# -- the model organism ------------------------------------------------------------------------


def organism_protocol(
    n_image_tokens: int, n_layers: int, base: Protocol = PAPER_PROTOCOL
) -> tuple[Protocol, dict[str, str]]:
    """The paper's protocol adapted to the model organism (`collector.organism`), and why each
    change was made: its objects' areas, its 64 image tokens and 4 layers, its short answers,
    and its answers surviving the image-noise check (which would drop nearly every image)."""
    from collector import organism

    protocol = dataclasses.replace(
        base,
        area_range=organism.AREA_RANGE,
        k_values=scaled_k_values(n_image_tokens),
        window=scaled_window(n_layers),
        ablation_curate=False,
        max_new_tokens=min(base.max_new_tokens, 12),
    )
    reasons = {
        "area_range": f"the organism's scenes: every object's area lies in {organism.AREA_RANGE} px²",
        "k_values": f"the paper's k of {PAPER_IMAGE_TOKENS} image tokens scaled to the organism's {n_image_tokens}",
        "window": f"the paper's 9 of {REFERENCE_DEPTH} layers scaled to the organism's {n_layers}",
        "ablation_curate": "the organism still names the object under image noise, so the paper's curation "
        "would drop nearly every image; baseline-correct images are still the flip rate's denominator",
        "max_new_tokens": "the organism answers in one or two words",
    }
    return protocol, reasons


# -- the command -------------------------------------------------------------------------------

ORGANISM = "organism"
ORGANISM_NOTE = (
    "the model organism (collector/organism.py): a tiny model of the paper model's shape, trained offline on "
    "synthetic scenes, with its own held-out scenes in place of COCO"
)


def _cli_protocol(
    limit: int | None, lens_limit: int | None, mean_images: int | None, max_new_tokens: int | None, ig_steps: int | None
) -> tuple[Protocol, dict[str, str]]:
    """The paper's protocol with the command line's overrides, and a reason for each."""
    changes: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for name, value, option in (
        ("limit", limit, "--limit"),
        ("lens_limit", lens_limit, "--lens-limit"),
        ("mean_images", mean_images, "--mean-images"),
        ("max_new_tokens", max_new_tokens, "--max-new-tokens"),
        ("ig_steps", ig_steps, "--ig-steps"),
    ):
        if value is not None:
            changes[name] = value
            reasons[name] = f"given on the command line ({option} {value})"
    return dataclasses.replace(PAPER_PROTOCOL, **changes), reasons


@click.command("reproduce")
@model_options
@click.option(
    "--coco-images",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of COCO images (e.g. val2017/); needed unless --model organism.",
)
@click.option(
    "--coco-annotations",
    type=click.Path(path_type=Path),
    default=None,
    help="COCO instances JSON of those images (e.g. annotations/instances_val2017.json).",
)
@questions_option(
    'VQA questions {"<coco id>": ["question", ...]} for the VQA setting and blocking (the paper\'s '
    "data/clean_questions.json); needed unless --model organism."
)
@db_option("; every run goes into it")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Kept images per ablation and blocking run, and images of the lens run (default: every "
    "selected image, as the paper). Recorded as a deviation.",
)
@click.option(
    "--lens-limit",
    type=click.IntRange(min=1),
    default=None,
    help="Images of the lens run, if other than --limit. Recorded as a deviation.",
)
@click.option(
    "--mean-images",
    type=click.IntRange(min=1),
    default=None,
    help="Images averaged for the mean vector (default: every given image). Recorded as a deviation.",
)
@max_new_tokens_option(deviation=True)
@ig_steps_option(deviation=True)
@click.option(
    "--scenes",
    type=click.IntRange(min=1),
    default=12,
    show_default=True,
    help="With --model organism: how many held-out scenes to generate and use.",
)
@loader_workers_option
@quiet_option("bars")
def reproduce_command(
    model: ModelChoice,
    coco_images: Path | None,
    coco_annotations: Path | None,
    questions_file: Path | None,
    db_path: Path,
    limit: int | None,
    lens_limit: int | None,
    mean_images: int | None,
    max_new_tokens: int | None,
    ig_steps: int | None,
    scenes: int,
    loader_workers: int,
    quiet: bool,
) -> None:
    """The paper's protocol, resumable, into one database: logit lens, mean vector, token
    ablation (generative, polling, VQA; with curation), attention blocking (presets and
    sliding windows), with the defaults of Neo et al. (arXiv 2410.07149) and its code.

    --model llava-hf/llava-1.5-7b-hf --coco-images DIR --coco-annotations FILE --questions FILE
    runs it on COCO; --model organism runs it offline on the model organism and its scenes
    (written beside --db). Every run's config records the protocol and each deviation from
    the paper's (runs.config -> reproduce). Rerunning the same command resumes; once complete
    it writes nothing new. `llava-interp report build` then renders the Reproduction page."""
    from collector.distributed import refuse_several_processes
    from collector.images import folder_images
    from collector.loading import load_model
    from collector.options import resolve_images
    from collector.vqa import load_questions
    from db.store import ResultsDB

    refuse_several_processes("reproduce")
    if not db_path.parent.exists():
        raise UserError(f"folder for --db does not exist: {db_path.parent}")
    protocol, reasons = _cli_protocol(limit, lens_limit, mean_images, max_new_tokens, ig_steps)
    model_note = None
    if model.model_id == ORGANISM:
        given = [name for name, value in (("--coco-images", coco_images), ("--coco-annotations", coco_annotations),
                                          ("--questions", questions_file)) if value is not None]  # fmt: skip
        if given:
            raise UserError(f"--model organism brings its own scenes: leave out {', '.join(given)}")
        from collector.organism import GRID_SIDE, prepare_demo

        scene_set = prepare_demo(db_path.parent / f"{db_path.stem}-organism-scenes", n_scenes=scenes)
        annotation_file = scene_set.annotations_path
        questions = load_questions(scene_set.questions_path)
        records = folder_images(scene_set.images_dir, annotation_file)
        loaded = load_model(
            str(scene_set.model_dir), model.device or "cpu", model.dtype, model.quantization, model.prompt_template
        )
        protocol, organism_reasons = organism_protocol(GRID_SIDE * GRID_SIDE, loaded.adapter.n_layers, protocol)
        reasons = {**organism_reasons, **reasons}
        if model.dtype == "float32":
            reasons["dtype"] = "the organism is trained in float32 and runs on a CPU"
        model_note = ORGANISM_NOTE
        extra = {"model_organism": True, "images": str(scene_set.images_dir), "annotations": str(annotation_file)}
    else:
        missing = [name for name, value in (("--coco-images", coco_images), ("--coco-annotations", coco_annotations),
                                            ("--questions", questions_file)) if value is None]  # fmt: skip
        if missing:
            raise UserError(f"reproduce on {model.model_id} needs {', '.join(missing)} (or --model organism)")
        assert coco_images is not None and coco_annotations is not None and questions_file is not None
        questions = load_questions(questions_file)
        records = resolve_images(coco_images, coco_annotations, None, None, None)
        annotation_file = coco_annotations
        if not selected_records(records, annotation_file, protocol):  # before any weight is read
            raise UserError(no_selection_message(protocol))
        model.check()  # before any weight is read
        loaded = model.load()
        extra = {
            "images": str(coco_images),
            "annotations": str(coco_annotations),
            "questions_file": str(questions_file),
        }
    with ResultsDB(db_path) as db:
        summary = run_protocol(
            loaded,
            records,
            db,
            annotation_file,
            questions,
            protocol,
            extra_config=extra,
            deviation_reasons=reasons,
            model_note=model_note,
            progress=not quiet,
            echo=click.echo,
            loader_workers=loader_workers,
            **run_options(),
        )
    click.echo(
        f"reproduce: lens {summary.lens.run_id}, mean vector {summary.mean_vector_id}, ablation "
        f"{summary.ablation.run_id}, blocking {summary.blocking.run_id} in {db_path}; "
        f"{len(summary.deviations)} deviation(s) from the paper's protocol recorded in runs.config"
    )
