"""`llava-interp collect blocking`: attention blocking (knockout) in the VQA setting."""

from __future__ import annotations

from pathlib import Path

import click

from collector.blocking.settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_ANNOTATIONS,
    DEFAULT_WINDOW,
    SOURCE_SETS,
    TARGET_SETS,
)
from collector.errors import UserError
from collector.options import (
    input_config,
    input_options,
    load_options,
    loader_workers_option,
    model_options,
    resolve_images,
    run_options,
)


def parse_area_range(text: str) -> tuple[float, float]:
    """'MIN:MAX' in px² -> (min, max); UserError if malformed."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise UserError(f"--object-area must be MIN:MAX in px² (e.g. 1000:2000), got {text!r}") from None
    if not 0 <= low < high:
        raise UserError(f"--object-area needs 0 <= MIN < MAX, got {text!r}")
    return low, high


def parse_names(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise UserError(f"{option}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
    return names


@click.command("blocking")
@model_options
@input_options
@click.option(
    "--db", "db_path", type=click.Path(path_type=Path), required=True, help="DuckDB results file (created if missing)."
)
@click.option(
    "--questions",
    "questions_file",
    type=click.Path(path_type=Path),
    required=True,
    help='Questions JSON in the original format {"<coco id>": ["question", ...]}; the first question of each image is asked.',
)
@click.option(
    "--max-annotations",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_ANNOTATIONS,
    show_default=True,
    help="Select images with at most this many annotations.",
)
@click.option(
    "--object-area",
    default="1000:2000",
    show_default=True,
    help="MIN:MAX area (px², COCO 'area') of the single-instance target object.",
)
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
@click.option("--quiet", is_flag=True, help="No progress bar.")
def blocking_command(
    model_id: str,
    revision: str | None,
    device: str | None,
    dtype: str,
    quantization: str,
    prompt_template: str | None,
    images_dir: Path | None,
    annotations: Path | None,
    coco_root: Path | None,
    split: str | None,
    limit: int | None,
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
    from collector.loading import check_before_load, load_model
    from collector.vqa import load_questions

    area_range = parse_area_range(object_area)
    source_names = parse_names(sources, SOURCE_SETS, "--sources")
    target_names = parse_names(targets, TARGET_SETS, "--targets")
    if images_dir is not None and annotations is None:
        raise UserError("collect blocking needs object annotations: give --annotations with --images")
    records = resolve_images(images_dir, annotations, coco_root, split, None)
    annotation_file = (
        annotations if annotations is not None else Path(coco_root) / "annotations" / f"instances_{split}.json"
    )
    questions = load_questions(questions_file)
    check_before_load(model_id, revision, prompt_template)  # before any weight is read
    handling = run_options()

    def run_one(db, share: list, group):
        loaded = load_model(
            model_id,
            device or group.default_device(),
            dtype,
            quantization,
            prompt_template,
            revision,
            attn_implementation=attn_implementation,
            **load_options(),
        )
        return collect_blocking(
            loaded,
            share,
            db,
            annotation_file,
            questions,
            max_annotations=max_annotations,
            area_range=area_range,
            curate=not no_curate,
            window=window,
            batch_size=batch_size,
            limit=limit,
            sources=source_names,
            targets=target_names,
            extra_config={
                **input_config(images_dir, annotations, coco_root, split, limit, model_id),
                "questions_file": str(questions_file),
            },
            progress=not quiet,
            loader_workers=loader_workers,
            **handling,
        )

    run_collect(db_path, records, run_one, echo=click.echo, refuse_sharded=SHARDED_LIMIT if limit is not None else None)
