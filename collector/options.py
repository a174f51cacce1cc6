"""Click options and input handling shared by every `llava-interp collect` command."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from collector.errors import UserError
from collector.images import DEFAULT_MAX_PIXELS
from db.errors import DatabaseError, disk_full

MODEL_HELP = "Hugging Face model id (e.g. llava-hf/llava-1.5-7b-hf) or local checkpoint folder."


class CleanErrorGroup(click.Group):
    """Turns user mistakes raised anywhere below into a one-line `Error:` and exit 1: our own
    errors, and click's usage errors (bad option values, unknown options or commands), whose
    usage text and exit code 2 would otherwise set them apart. `--help` is unchanged."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            raise _one_line(error) from None

    def invoke(self, ctx: click.Context) -> Any:
        # The command line below this group, read before click consumes it: the disk-full
        # message names the database the command was writing.
        below = [str(arg) for arg in (*getattr(ctx, "_protected_args", []), *ctx.args)]
        ctx.meta.setdefault(DB_PATH_KEY, _option_value(below, "--db"))
        try:
            return super().invoke(ctx)
        except (UserError, DatabaseError) as error:
            raise click.ClickException(str(error)) from None
        except click.UsageError as error:
            raise _one_line(error) from None
        except Exception as error:
            if disk_full(error):
                target = ctx.meta.get(DB_PATH_KEY) or "the output"
                raise click.ClickException(
                    f"disk full while writing {target}: images finished before this one are kept; "
                    "free space and rerun the same command to resume"
                ) from None
            raise


def _option_value(args: list[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def _one_line(error: click.UsageError) -> click.ClickException:
    return click.ClickException(" ".join(error.format_message().split()))


_META_KEY = "llava_interp.image_handling"
DB_PATH_KEY = "llava_interp.db_path"  # the database a command writes, for error messages


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Keep an image-handling option for `resolve_images` / `run_options` (not a command argument)."""
    ctx.meta.setdefault(_META_KEY, {})[param.name] = value
    return value


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
        click.option(
            "--allow-incomplete-weights",
            is_flag=True,
            expose_value=False,
            callback=_remember,
            help="Run even when the checkpoint lacks tensors the model needs (transformers initialises them "
            "randomly) or holds ones it does not use; recorded in the run (runs.config weights_incomplete). "
            "Default: refuse such a checkpoint.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _image_handling() -> dict[str, Any]:
    ctx = click.get_current_context(silent=True)
    handling = dict(ctx.meta.get(_META_KEY, {})) if ctx is not None else {}
    return {"max_image_pixels": DEFAULT_MAX_PIXELS, "strict": False, "retry_skipped": False, **handling}


def run_options() -> dict[str, Any]:
    """The runner's image-handling options of this command (`run_experiment(strict=, retry_skipped=)`)."""
    handling = _image_handling()
    return {"strict": bool(handling["strict"]), "retry_skipped": bool(handling["retry_skipped"])}


def load_options() -> dict[str, Any]:
    """`load_model` keyword arguments set by this command's model options."""
    ctx = click.get_current_context(silent=True)
    handling = ctx.meta.get(_META_KEY, {}) if ctx is not None else {}
    return {"allow_incomplete_weights": bool(handling.get("allow_incomplete_weights", False))}


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
        click.option(
            "--max-image-pixels",
            type=click.IntRange(min=1),
            default=DEFAULT_MAX_PIXELS,
            show_default=True,
            expose_value=False,
            callback=_remember,
            help="Images with more pixels (width x height) are skipped with reason too_large, "
            "before they are decoded (the default is PIL's decompression-bomb limit).",
        ),
        click.option(
            "--strict",
            is_flag=True,
            expose_value=False,
            callback=_remember,
            help="Stop at the first image file that cannot be used (unreadable, truncated, too large) "
            "instead of recording it in the skipped table and going on.",
        ),
        click.option(
            "--retry-skipped",
            is_flag=True,
            expose_value=False,
            callback=_remember,
            help="On a resumed run, process again the images skipped because their file could not be "
            "used (reasons unreadable, truncated, too_large); other skips stay.",
        ),
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


def resolve_images(
    images_dir: Path | None, annotations: Path | None, coco_root: Path | None, split: str | None, limit: int | None
):

    handling = _image_handling()
    records = _resolve(images_dir, annotations, coco_root, split, limit, handling["max_image_pixels"])
    if handling["strict"]:
        _check_up_front(records)
    return records


def _check_up_front(records) -> None:
    """--strict: every image's header read and its size checked before the model loads."""
    from collector.images import ImageUnusable, check_pixels, open_header

    for record in records:
        try:
            with open_header(record.path) as image:
                check_pixels(record.path, image.size, record.max_pixels)
        except ImageUnusable as error:
            raise UserError(f"cannot read image {record.path}: {error.detail} (--strict)") from None


def _resolve(images_dir, annotations, coco_root, split, limit, max_pixels):
    from collector.images import coco_images, folder_images

    if (images_dir is None) == (coco_root is None):
        raise UserError("give exactly one input: --images DIR or --coco-root ROOT --split SPLIT")
    if coco_root is not None:
        if split is None:
            raise UserError("--coco-root needs --split (e.g. --split val2017)")
        if annotations is not None:
            raise UserError("--annotations goes with --images; --coco-root reads ROOT/annotations/")
        return coco_images(coco_root, split, limit, max_pixels)
    if split is not None:
        raise UserError("--split goes with --coco-root")
    return folder_images(images_dir, annotations, limit, max_pixels)


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
