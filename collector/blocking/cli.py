"""`llava-interp collect blocking`: attention blocking (knockout) in the VQA setting."""

from __future__ import annotations

from pathlib import Path

import click

from collector.blocking.settings import DEFAULT_BATCH_SIZE, DEFAULT_WINDOW, SOURCE_SETS, TARGET_SETS
from collector.errors import UserError
from collector.options import (
    ImageInputs,
    ModelChoice,
    db_option,
    input_options,
    loader_workers_option,
    model_options,
    parse_area_range,
    questions_option,
    quiet_option,
    run_options,
    selection_options,
)


def parse_names(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise UserError(f"{option}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
    return names


@click.command("blocking")
@model_options
@input_options
@db_option()
@questions_option(
    'Questions JSON in the original format {"<coco id>": ["question", ...]}; the first question of each image is asked.',
    required=True,
)
@selection_options
@click.option(
    "--no-curate", is_flag=True, help="Also block on images the unblocked model answers wrongly (default: skip them)."
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=DEFAULT_WINDOW,
    show_default=True,
    help="Width K of the sliding layer window (clipped to the model's depth); one window starts at every layer.",
)
@click.option(
    "--attn-implementation",
    type=click.Choice(["sdpa", "eager"]),
    default="sdpa",
    show_default=True,
    help="Attention implementation to load the model with (flash attention cannot take block masks).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Blocking conditions per batched forward (one block mask per batch element).",
)
@click.option(
    "--sources",
    default=",".join(SOURCE_SETS),
    show_default=True,
    help="Comma-separated source sets (blocked key positions).",
)
@click.option(
    "--targets",
    default=",".join(TARGET_SETS),
    show_default=True,
    help="Comma-separated target sets (blocked query positions).",
)
@loader_workers_option
@quiet_option()
def blocking_command(
    model: ModelChoice,
    inputs: ImageInputs,
    db_path: Path,
    questions_file: Path,
    max_annotations: int,
    object_area: str,
    no_curate: bool,
    window: int,
    attn_implementation: str,
    batch_size: int,
    sources: str,
    targets: str,
    loader_workers: int,
    quiet: bool,
) -> None:
    """Attention blocking (knockout): stop the last position (or the last row of image
    tokens) attending to object / non-object image tokens in a window of layers, and record
    whether the model still names the object ("... It is a <class>"). Needs COCO
    annotations. --limit counts images kept after selection and curation. Rerunning the
    same command resumes. Images are processed one at a time (--batch-size batches the
    conditions of one image); --loader-workers overlaps reading images and writing results
    with the model. Under torchrun/srun each process takes a share of the images (see
    `collect lens`); --limit is then refused."""
    from collector.ablation.cli import SHARDED_LIMIT
    from collector.blocking.experiment import collect_blocking
    from collector.distributed import run_collect
    from collector.vqa import load_questions

    area_range = parse_area_range(object_area)
    source_names = parse_names(sources, SOURCE_SETS, "--sources")
    target_names = parse_names(targets, TARGET_SETS, "--targets")
    if inputs.images_dir is not None and inputs.annotations is None:
        raise UserError("collect blocking needs object annotations: give --annotations with --images")
    records = inputs.records(None)
    annotation_file = (
        inputs.annotations
        if inputs.annotations is not None
        else Path(inputs.coco_root) / "annotations" / f"instances_{inputs.split}.json"
    )
    questions = load_questions(questions_file)
    model.check()  # before any weight is read
    handling = run_options()

    def run_one(db, share: list, group):
        return collect_blocking(
            model.load(group.default_device(), attn_implementation=attn_implementation),
            share,
            db,
            annotation_file,
            questions,
            max_annotations=max_annotations,
            area_range=area_range,
            curate=not no_curate,
            window=window,
            batch_size=batch_size,
            limit=inputs.limit,
            sources=source_names,
            targets=target_names,
            extra_config={**inputs.config(model.model_id), "questions_file": str(questions_file)},
            progress=not quiet,
            loader_workers=loader_workers,
            **handling,
        )

    run_collect(
        db_path, records, run_one, echo=click.echo, refuse_sharded=SHARDED_LIMIT if inputs.limit is not None else None
    )
