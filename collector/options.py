"""Click options and input handling shared by the `llava-interp collect` commands and `reproduce`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from collector.blocking.settings import DEFAULT_AREA_RANGE, DEFAULT_MAX_ANNOTATIONS
from collector.errors import UserError
from collector.images import DEFAULT_MAX_PIXELS
from db.errors import DatabaseError, disk_full

if TYPE_CHECKING:  # not imported at run time: the CLI's --help must not load torch
    from collector.images import ImageRecord
    from collector.loading import LoadedModel

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
    return _with_options(command, options, "model", ModelChoice)


def _with_options(command: Callable, options: list[Callable], name: str, group: type) -> Callable:
    """`command` with `options`, their values passed as one `group` object, keyword `name`."""
    fields = list(group.__dataclass_fields__)

    @functools.wraps(command)
    def with_group(*args: Any, **kwargs: Any) -> Any:
        return command(*args, **{name: group(**{field: kwargs.pop(field) for field in fields})}, **kwargs)

    for option in reversed(options):
        with_group = option(with_group)
    return with_group


@dataclass(frozen=True)
class ModelChoice:
    """The values of `model_options`: which model, and how to load it."""

    model_id: str
    revision: str | None
    device: str | None
    dtype: str
    quantization: str
    prompt_template: str | None

    def check(self, *args: Any) -> Any:
        """`check_before_load` of this model (before any weight is read; `args`: its prompts, top_k)."""
        from collector.loading import check_before_load

        return check_before_load(self.model_id, self.revision, self.prompt_template, *args)

    def load(self, default_device: str | None = None, **extra: Any) -> LoadedModel:
        """`load_model` with these options and the command's `load_options()`; `default_device`
        where --device is not given; `extra`: further `load_model` keywords."""
        from collector.loading import load_model

        return load_model(
            self.model_id,
            self.device or default_device,
            self.dtype,
            self.quantization,
            self.prompt_template,
            self.revision,
            **extra,
            **load_options(),
        )


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
    return _with_options(command, options, "inputs", ImageInputs)


@dataclass(frozen=True)
class ImageInputs:
    """The values of `input_options`: a folder of images or a COCO split, and --limit."""

    images_dir: Path | None
    annotations: Path | None
    coco_root: Path | None
    split: str | None
    limit: int | None

    def records(self, limit: int | None) -> list[ImageRecord]:
        """`resolve_images` of these inputs, at most `limit` (None: every listed image)."""
        return resolve_images(self.images_dir, self.annotations, self.coco_root, self.split, limit)

    def config(self, model_id: str) -> dict[str, Any]:
        """`input_config` of these inputs: their provenance in runs.config."""
        return input_config(self.images_dir, self.annotations, self.coco_root, self.split, self.limit, model_id)


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


def db_option(note: str = "") -> Callable[[Callable], Callable]:
    """--db, the results file a command writes (`note`: what more the help says)."""
    return click.option(
        "--db",
        "db_path",
        type=click.Path(path_type=Path),
        required=True,
        help=f"DuckDB results file (created if missing){note}.",
    )


def quiet_option(bars: str = "bar") -> Callable[[Callable], Callable]:
    """--quiet: no progress `bars` ('bars' for a command that shows several)."""
    return click.option("--quiet", is_flag=True, help=f"No progress {bars}.")


def questions_option(help: str, *, required: bool = False) -> Callable[[Callable], Callable]:
    """--questions: a VQA questions JSON {"<coco id>": ["question", ...]} (`help`: what the command asks)."""
    return click.option(
        "--questions", "questions_file", type=click.Path(path_type=Path), required=required, default=None, help=help
    )


def selection_options(command: Callable) -> Callable:
    """The paper's image selection (collector.coco.select_targets): --max-annotations, --object-area."""
    low, high = DEFAULT_AREA_RANGE
    command = click.option(
        "--object-area",
        default=f"{low:g}:{high:g}",
        show_default=True,
        help="MIN:MAX area (COCO 'area', original pixels², exclusive) of the single-instance target object.",
    )(command)
    return click.option(
        "--max-annotations",
        type=click.IntRange(min=1),
        default=DEFAULT_MAX_ANNOTATIONS,
        show_default=True,
        help="Select images with at most N annotations.",
    )(command)


def parse_area_range(text: str) -> tuple[float, float]:
    """--object-area 'MIN:MAX' in px² -> (min, max); UserError if malformed."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise UserError(f"--object-area must be MIN:MAX in px² (e.g. 1000:2000), got {text!r}") from None
    if not 0 <= low < high:
        raise UserError(f"--object-area needs 0 <= MIN < MAX, got {text!r}")
    return low, high


# The paper code's ablation defaults (scripts/ablation_experiment_curate.py), the same as
# the collector's (tests/test_reproduce.py checks); written out here because the
# collector's modules that hold them import torch, which `llava-interp --help` must not.
ABLATION_SETTINGS = ("generative", "polling", "vqa")
DEFAULT_K = (5, 10, 20, 40, 60, 100, 250)
DEFAULT_IG_STEPS = 50
DEFAULT_MAX_NEW_TOKENS = 200
DEFAULT_NOISE_STD = 1.0


def _protocol_option(name: str, default: int, help: str, deviation: bool) -> Callable[[Callable], Callable]:
    if deviation:  # `reproduce`: unset means the paper's value; a value given is recorded as a deviation
        return click.option(
            name,
            type=click.IntRange(min=1),
            default=None,
            help=f"{help} (paper: {default}). Recorded as a deviation.",
        )
    return click.option(name, type=click.IntRange(min=1), default=default, show_default=True, help=f"{help}.")


def ig_steps_option(*, deviation: bool = False) -> Callable[[Callable], Callable]:
    """--ig-steps (default the paper's; with `deviation`, unset unless given, for `reproduce`)."""
    return _protocol_option(
        "--ig-steps", DEFAULT_IG_STEPS, "Integrated-gradients quadrature nodes for gradient_k", deviation
    )


def max_new_tokens_option(*, deviation: bool = False) -> Callable[[Callable], Callable]:
    """--max-new-tokens (default the paper's; with `deviation`, unset unless given, for `reproduce`)."""
    return _protocol_option(
        "--max-new-tokens", DEFAULT_MAX_NEW_TOKENS, "Greedy tokens generated in the generative setting", deviation
    )


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
