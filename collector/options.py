"""Click options and input handling shared by every `llava-interp collect` command."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from collector.errors import UserError
from db.errors import DatabaseError

MODEL_HELP = "Hugging Face model id (e.g. llava-hf/llava-1.5-7b-hf) or local checkpoint folder."


class CleanErrorGroup(click.Group):
    """Turns user mistakes raised anywhere below into a one-line `Error:` and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UserError, DatabaseError) as error:
            raise click.ClickException(str(error)) from None


def model_options(command: Callable) -> Callable:
    """Options shared by every command that loads a model."""
    options = [
        click.option("--model", "model_id", required=True, help=MODEL_HELP),
        click.option("--revision", default=None, help="Model revision (branch, tag or commit) on the hub."),
        click.option(
            "--device",
            default=None,
            help="Device: cpu, cuda, cuda:1, or auto (accelerate spreads the model over all GPUs). "
            "Default: cuda if available, else cpu.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "float16", "bfloat16"]),
            default="float32",
            show_default=True,
            help="Weights and activations dtype.",
        ),
        click.option(
            "--quantization",
            type=click.Choice(["none", "8bit", "4bit"]),
            default="none",
            show_default=True,
            help="Load weights quantized with bitsandbytes (pip install 'llava-interp[quantization]').",
        ),
        click.option(
            "--prompt-template",
            default=None,
            help="Override the family's prompt format; must contain {question} and the image token "
            "(LLaVA-1.5 default: 'USER: <image>\\n{question} ASSISTANT:').",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def input_options(command: Callable) -> Callable:
    """Options shared by every command that reads images."""
    options = [
        click.option(
            "--images",
            "images_dir",
            type=click.Path(path_type=Path),
            default=None,
            help="A folder of images (any format PIL reads; non-RGB images are converted).",
        ),
        click.option(
            "--annotations",
            type=click.Path(path_type=Path),
            default=None,
            help="COCO instances JSON for --images (gives COCO ids, categories and object masks).",
        ),
        click.option(
            "--coco-root",
            type=click.Path(path_type=Path),
            default=None,
            help="COCO root: reads ROOT/SPLIT/<file_name> and ROOT/annotations/instances_SPLIT.json.",
        ),
        click.option("--split", default=None, help="COCO split with --coco-root, e.g. val2017."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Process at most N images."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def loader_workers_option(command: Callable) -> Callable:
    """--loader-workers, shared by every collect command that runs through the runner."""
    return click.option(
        "--loader-workers",
        type=click.IntRange(min=0),
        default=2,
        show_default=True,
        help="Threads that decode and preprocess the next images while the model works; with any, "
        "a writer thread also stores finished images meanwhile. 0: no pipelining. Results do not change.",
    )(command)


def resolve_images(images_dir: Path | None, annotations: Path | None, coco_root: Path | None, split: str | None, limit: int | None):
    from collector.images import coco_images, folder_images

    if (images_dir is None) == (coco_root is None):
        raise UserError("give exactly one input: --images DIR or --coco-root ROOT --split SPLIT")
    if coco_root is not None:
        if split is None:
            raise UserError("--coco-root needs --split (e.g. --split val2017)")
        if annotations is not None:
            raise UserError("--annotations goes with --images; --coco-root reads ROOT/annotations/")
        return coco_images(coco_root, split, limit)
    if split is not None:
        raise UserError("--split goes with --coco-root")
    return folder_images(images_dir, annotations, limit)


def input_config(images_dir, annotations, coco_root, split, limit, model_id: str) -> dict[str, Any]:
    """Provenance of the inputs, recorded in runs.config."""
    config: dict[str, Any] = {
        "images": str(images_dir) if images_dir else None,
        "annotations": str(annotations) if annotations else None,
        "coco_root": str(coco_root) if coco_root else None,
        "split": split,
        "limit": limit,
    }
    if (Path(model_id) / "TINY_MODEL.json").is_file():
        config["demo"] = True
    return config
