"""The `llava-interp` command line: a thin click layer over the collector and report APIs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from collector.options import (
    CleanErrorGroup,
    ImageInputs,
    ModelChoice,
    db_option,
    input_options,
    loader_workers_option,
    model_options,
    quiet_option,
    run_options,
)


@click.group(cls=CleanErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llava-interp", message="llava-interp %(version)s")
def cli() -> None:
    """Interpretability experiments on vision-language models (logit lens, ablation,
    attention blocking) into a DuckDB results file, and a static site over it."""


@cli.group(cls=CleanErrorGroup)
def collect() -> None:
    """Run an experiment on a model over images and write the results to DuckDB."""


@collect.command("lens")
@model_options
@input_options
@db_option()
@click.option(
    "--prompt",
    default="Describe the image.",
    show_default=True,
    help="Question placed into the family's prompt template.",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1, max=100),
    default=5,
    show_default=True,
    help="Tokens kept per (layer, position) cell.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Images per forward, among consecutive images with prompts of equal token count (LLaVA-1.5: "
    "all); halved for the rest of the run after a device out-of-memory error (recorded in "
    "runs.config.oom_events). Results do not change.",
)
@loader_workers_option
@quiet_option()
def collect_lens_command(
    model: ModelChoice,
    inputs: ImageInputs,
    db_path: Path,
    prompt: str,
    top_k: int,
    batch_size: int,
    loader_workers: int,
    quiet: bool,
) -> None:
    """Logit lens: final norm + unembedding on every layer's hidden state at every
    position; keeps the top-k tokens per cell. Rerunning the same command resumes."""
    from collector.distributed import run_collect
    from collector.lens.experiment import collect_lens

    records = inputs.records(inputs.limit)
    model.check([prompt], top_k)  # before any weight is read
    handling = run_options()

    def run_one(db, share: list, group) -> object:
        return collect_lens(
            model.load(group.default_device()),
            share,
            db,
            prompt=prompt,
            top_k=top_k,
            extra_config=inputs.config(model.model_id),
            progress=not quiet,
            batch_size=batch_size,
            loader_workers=loader_workers,
            **handling,
        )

    run_collect(db_path, records, run_one, echo=click.echo)


@cli.command("demo")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Folder for the model, images, results.duckdb and site/.",
)
@click.option(
    "--random-weights",
    is_flag=True,
    help="Use a tiny random-weight LLaVA instead of the trained model organism (seconds instead of the "
    "organism's one-time training of about two CPU-minutes; results are meaningless).",
)
@quiet_option("bars")
def demo_command(out_dir: Path, random_weights: bool, quiet: bool) -> None:
    """Offline end-to-end demo: every experiment on a tiny LLaVA -> OUT/results.duckdb -> OUT/site/.

    By default the model is the organism: a tiny LLaVA trained offline on synthetic scenes whose
    object and position are known (built on first use, cached in .cache/llava-interp/), so the
    pages show real effects: correct answers, flips under object ablation, blocking curves."""
    from collector.demo import run_demo

    summary = run_demo(out_dir, progress=not quiet, organism=not random_weights)
    click.echo(f"demo written: {summary.db_path} and {summary.site_dir / 'index.html'}")


def _add_commands() -> None:
    from collector.ablation.cli import ablation_command, mean_vector_command
    from collector.blocking.cli import blocking_command
    from collector.db_cli import db
    from collector.reproduce import reproduce_command
    from report.cli import report

    collect.add_command(ablation_command)
    collect.add_command(mean_vector_command)
    collect.add_command(blocking_command)
    cli.add_command(reproduce_command)
    cli.add_command(report)
    cli.add_command(db)


_add_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=argv, prog_name="llava-interp", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
