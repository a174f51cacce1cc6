"""`llava-interp collect ablation` and `collect mean-vector`."""

from __future__ import annotations

from pathlib import Path

import click

from collector.errors import UserError
from collector.options import (
    DEFAULT_K,
    DEFAULT_NOISE_STD,
    ImageInputs,
    ModelChoice,
    db_option,
    ig_steps_option,
    input_options,
    loader_workers_option,
    max_new_tokens_option,
    model_options,
    parse_area_range,
    questions_option,
    quiet_option,
    selection_options,
)

K_DEFAULT = ",".join(str(k) for k in DEFAULT_K)


def _parse_k(value: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--k must be comma-separated integers, got {value!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise UserError(f"--k needs positive integers, got {value!r}")
    return ks


def _annotation_file(inputs: ImageInputs) -> Path:
    if inputs.coco_root is not None and inputs.split is not None:
        return inputs.coco_root / "annotations" / f"instances_{inputs.split}.json"
    if inputs.annotations is None:
        raise UserError("ablation needs COCO annotations: give --annotations FILE with --images")
    return inputs.annotations


def _model_and_input_options(command):
    return model_options(input_options(command))


# Under torchrun / srun every process keeps its own count, so a limit on kept images of the
# whole run cannot be honoured exactly; refused rather than approximated.
SHARDED_LIMIT = (
    "--limit counts kept images of the whole run, which several processes cannot share: "
    "leave out --limit under torchrun/srun, or run one process"
)


@click.command("ablation")
@_model_and_input_options
@db_option()
@click.option(
    "--settings",
    "settings_text",
    default="generative,polling",
    show_default=True,
    help="Comma-separated settings: generative (describe the image), polling (is there a CLASS?), "
    "vqa (a question + ' It is a'; needs --questions).",
)
@questions_option('VQA questions, {"<coco id>": ["question", ...]}; the first question of each image is asked.')
@click.option(
    "--replacement",
    default="zero",
    show_default=True,
    help="Replacement vector: a .pt file with a 1-D tensor of the model's hidden size (e.g. from "
    "`collect mean-vector`), 'zero', or db:<vector_id> from the mean_vectors table.",
)
@click.option(
    "--no-curate",
    is_flag=True,
    help="Keep every selected image (default: keep one only if the unablated model names the class "
    "and stops naming it under image noise).",
)
@selection_options
@click.option(
    "--k",
    "k_text",
    default=K_DEFAULT,
    show_default=True,
    help="Comma-separated token counts for the random_k and gradient_k conditions.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random_k draws and the image noise.")
@ig_steps_option()
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Conditions per forward/generate batch (speed only; results do not change).",
)
@max_new_tokens_option()
@click.option(
    "--noise-std",
    type=click.FloatRange(min=0),
    default=DEFAULT_NOISE_STD,
    show_default=True,
    help="Std of the image_noise Gaussian, in normalised pixel units.",
)
@loader_workers_option
@quiet_option()
def ablation_command(
    model: ModelChoice,
    inputs: ImageInputs,
    db_path: Path,
    settings_text: str,
    questions_file: Path | None,
    replacement: str,
    no_curate: bool,
    max_annotations: int,
    object_area: str,
    k_text: str,
    seed: int,
    ig_steps: int,
    batch_size: int,
    max_new_tokens: int,
    noise_std: float,
    loader_workers: int,
    quiet: bool,
) -> None:
    """Token ablation: replace image-token embeddings (object patches, register tokens, random,
    top-gradient) at the LM input and check whether the model still identifies the object.
    --limit counts kept images. Rerunning the same command resumes. Images are processed one
    at a time (--batch-size batches the conditions of one image); --loader-workers overlaps
    reading images and writing results with the model. Under torchrun/srun each process
    takes a share of the images (see `collect lens`); --limit and --replacement db:ID are
    then refused."""
    from collector.ablation.experiment import AblationOptions, collect_ablation
    from collector.ablation.replacement import load_replacement
    from collector.distributed import ProcessGroup, run_collect
    from collector.loading import text_config_value
    from collector.options import run_options
    from collector.vqa import load_questions

    settings = tuple(s.strip() for s in settings_text.split(",") if s.strip())
    options = AblationOptions(
        settings=settings,
        questions=load_questions(questions_file) if questions_file is not None else None,
        k_values=_parse_k(k_text),
        seed=seed,
        curate=not no_curate,
        max_annotations=max_annotations,
        area_range=parse_area_range(object_area),
        ig_steps=ig_steps,
        max_new_tokens=max_new_tokens,
        noise_std=noise_std,
        batch_size=batch_size,
    )
    annotation_file = _annotation_file(inputs)
    group = ProcessGroup.from_env()
    if group.world_size > 1 and replacement.startswith("db:"):
        raise UserError(
            "--replacement db:ID reads the target database, which the processes of a sharded "
            "launch do not open: give the vector's .pt file (collect mean-vector --out)"
        )
    # --limit counts kept images, so every listed image is a candidate.
    records = inputs.records(None)
    # Before any weight is read: the template, the questions, the replacement's size.
    hidden_size = text_config_value(model.check(), "hidden_size")
    handling = run_options()

    def run_one(db, share: list, group: ProcessGroup):
        vector = load_replacement(replacement, hidden_size, db) if hidden_size else None
        loaded = model.load(group.default_device())
        vector = vector or load_replacement(replacement, loaded.adapter.hidden_size, db)
        if vector.hidden_size != loaded.adapter.hidden_size:
            raise UserError(
                f"replacement vector {vector.source} has size {vector.hidden_size} but the model's "
                f"hidden size is {loaded.adapter.hidden_size}"
            )
        return collect_ablation(
            loaded,
            share,
            db,
            annotation_file,
            options,
            vector,
            limit=inputs.limit,
            extra_config=inputs.config(model.model_id) | {"questions": str(questions_file) if questions_file else None},
            progress=not quiet,
            loader_workers=loader_workers,
            **handling,
        )

    run_collect(
        db_path,
        records,
        run_one,
        echo=click.echo,
        group=group,
        refuse_sharded=SHARDED_LIMIT if inputs.limit is not None else None,
    )


@click.command("mean-vector")
@_model_and_input_options
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path),
    required=True,
    help="Output .pt file: the mean as a 1-D float tensor (usable as --replacement FILE).",
)
@click.option(
    "--db",
    "db_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also store the vector in this DuckDB file's mean_vectors table (use as --replacement db:<id>).",
)
@quiet_option()
def mean_vector_command(
    model: ModelChoice,
    inputs: ImageInputs,
    out_path: Path,
    db_path: Path | None,
    quiet: bool,
) -> None:
    """Mean post-projector image-token embedding over a folder or COCO split (streamed, constant
    memory): the replacement vector for `collect ablation --replacement`. One process only
    (a mean over shards would need a weighted merge)."""
    from collector.ablation.replacement import compute_mean_vector, save_mean_vector, store_mean_vector
    from collector.distributed import refuse_several_processes
    from collector.options import run_options
    from db.store import ResultsDB

    refuse_several_processes("collect mean-vector")
    if not out_path.parent.exists():
        raise UserError(f"folder for --out does not exist: {out_path.parent}")
    records = inputs.records(inputs.limit)
    model.check()
    loaded = model.load()
    mean = compute_mean_vector(loaded, records, progress=not quiet, strict=run_options()["strict"])
    save_mean_vector(out_path, mean)
    message = f"mean of {mean.n_tokens} image tokens over {mean.n_images} images -> {out_path}"
    if mean.skipped:
        reasons = sorted({reason for _, reason, _ in mean.skipped})
        message += f" ({len(mean.skipped)} image files skipped: {', '.join(reasons)}; first {mean.skipped[0][0]})"
    if db_path is not None:
        with ResultsDB(db_path) as db:
            config = inputs.config(model.model_id)
            vector_id = store_mean_vector(db, loaded, mean, str(out_path), config)
        message += f" and {db_path} (--replacement db:{vector_id})"
    click.echo(message)
