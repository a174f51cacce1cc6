"""Loading a VLM and its processor the way real checkpoints load: `from_pretrained`."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from collector.adapters import ModelAdapter, UnsupportedModelError, adapter_class_for
from collector.errors import UserError, first_line

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
QUANTIZATIONS = ("none", "8bit", "4bit")


@dataclass
class LoadedModel:
    """A model, its processor and adapter, and the provenance of how it was loaded."""

    model: Any
    processor: Any
    adapter: ModelAdapter
    model_id: str
    revision: str | None
    dtype: str
    device: str
    quantization: str
    attn_implementation: str | None
    provenance: dict[str, Any] = field(default_factory=dict)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_map(device: str) -> Any:
    # "auto" lets accelerate spread a model larger than one GPU across devices.
    if device == "auto":
        return "auto"
    return {"": device}


def incomplete_weights(loading_info: dict[str, Any] | None) -> dict[str, list[str]]:
    """{'missing' | 'unexpected' | 'mismatched': sorted tensor names} from `from_pretrained`'s
    loading info, only the kinds that occur (empty: the checkpoint matches the model)."""
    problems: dict[str, list[str]] = {}
    for kind, key in (
        ("missing", "missing_keys"),
        ("unexpected", "unexpected_keys"),
        ("mismatched", "mismatched_keys"),
    ):
        names = sorted(
            str(item[0] if isinstance(item, (tuple, list)) else item) for item in (loading_info or {}).get(key) or ()
        )
        if names:
            problems[kind] = names
    return problems


def describe_incomplete(problems: dict[str, list[str]], first: int = 3) -> str:
    """'1 missing: model.language_model.norm.weight; 2 unexpected: a, b' (the first names of each kind)."""
    parts = []
    for kind, names in problems.items():
        shown = ", ".join(names[:first]) + (f", ... ({len(names) - first} more)" if len(names) > first else "")
        parts.append(f"{len(names)} {kind}: {shown}")
    return "; ".join(parts)


@contextlib.contextmanager
def _quiet_load_report():
    """transformers prints its own table of missing/unexpected keys; the caller reports them in one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# The image placeholder of each family's template, most specific first.
_PLACEHOLDERS = ("<start_of_image>", "<|image_pad|>", "<image>")


def image_placeholder(adapter_class: type[ModelAdapter]) -> str | None:
    """The text that marks the image in the family's prompt template ('<image>', ...)."""
    template = adapter_class.default_prompt_template
    return next((p for p in _PLACEHOLDERS if p in template), None)


def check_prompt_template(template: str | None, adapter_class: type[ModelAdapter]) -> None:
    """UserError unless `template` has '{question}' and exactly one image placeholder."""
    if template is None:
        return
    placeholder = image_placeholder(adapter_class)
    if "{question}" not in template:
        raise UserError("--prompt-template must contain '{question}' (where the question goes)")
    if placeholder is not None and template.count(placeholder) != 1:
        raise UserError(
            f"--prompt-template must contain the image placeholder {placeholder!r} exactly once "
            f"(found {template.count(placeholder)}), e.g. {adapter_class.default_prompt_template!r}"
        )


def read_model_config(model_id: str, revision: str | None = None) -> Any:
    """The checkpoint's config (no weights); UserError for an unknown or unreachable model."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_id, revision=revision)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load model {model_id!r}: {first_line(error)}") from None


def text_config_value(config: Any, name: str) -> int | None:
    """A text-model setting (hidden_size, vocab_size) from a VLM config, None when absent."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, name, None)
    return int(value) if value else None


def check_before_load(
    model_id: str,
    revision: str | None = None,
    prompt_template: str | None = None,
    prompts: Sequence[str] = (),
    top_k: int | None = None,
) -> Any:
    """What can be checked from the config alone, before any weight is read: the family,
    the template, image placeholders in the question(s), --top-k against the vocabulary.
    Returns the config. UserError (one line) for the first problem."""
    config = read_model_config(model_id, revision)
    try:
        adapter_class = adapter_class_for(config)
    except UnsupportedModelError as error:
        raise UserError(f"{model_id}: {error}") from None
    check_prompt_template(prompt_template, adapter_class)
    placeholder = image_placeholder(adapter_class)
    for prompt in prompts:
        if placeholder is not None and placeholder in prompt:
            raise UserError(
                f"--prompt must not contain the image placeholder {placeholder!r}: the prompt template places "
                "the image (change the template with --prompt-template)"
            )
    vocab = text_config_value(config, "vocab_size")
    if top_k is not None and vocab is not None and top_k > vocab:
        raise UserError(f"--top-k {top_k} is larger than the model's vocabulary ({vocab} tokens)")
    return config


def load_model(
    model_id: str,
    device: str | None = None,
    dtype: str = "float32",
    quantization: str = "none",
    prompt_template: str | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
    allow_incomplete_weights: bool = False,
) -> LoadedModel:
    """Load a hub id or local folder with `from_pretrained`, plus its adapter.

    Raises UserError (one line) for an unknown or unreachable model, an unsupported
    family, a bad dtype/device, missing bitsandbytes, or a checkpoint whose weights do not
    match the model (missing, unexpected or mismatched tensors: transformers would
    initialise the missing ones randomly). `allow_incomplete_weights` loads such a
    checkpoint anyway and records what was wrong in the provenance (`weights_incomplete`).
    """
    import transformers
    from transformers import AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here")

    config = read_model_config(model_id, revision)
    try:
        adapter_class = adapter_class_for(config)
    except UnsupportedModelError as error:
        raise UserError(f"{model_id}: {error}") from None
    check_prompt_template(prompt_template, adapter_class)  # before the weights are read

    kwargs: dict[str, Any] = {"revision": revision, "dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization != "none":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("quantized loading needs bitsandbytes: pip install 'llava-interp[quantization]'") from None
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit",
            load_in_4bit=quantization == "4bit",
            bnb_4bit_compute_dtype=DTYPES[dtype],
        )
        kwargs["device_map"] = _device_map(device if device != "cpu" else "auto")
    elif device != "cpu":
        kwargs["device_map"] = _device_map(device)
    try:
        processor = adapter_class.load_processor(model_id, revision=revision)
        with _quiet_load_report():
            model, loading_info = AutoModelForImageTextToText.from_pretrained(
                model_id, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load model {model_id!r}: {first_line(error)}") from None
    weight_problems = incomplete_weights(loading_info)
    if weight_problems and not allow_incomplete_weights:
        raise UserError(
            f"{model_id}: the checkpoint's weights do not match the model ({describe_incomplete(weight_problems)}); "
            "missing tensors would be randomly initialised. Pass --allow-incomplete-weights to run anyway"
        )
    model.eval()
    try:
        adapter = adapter_class(model, processor, prompt_template)
    except ValueError as error:
        raise UserError(str(error)) from None
    commit = getattr(model.config, "_commit_hash", None)
    resolved_revision = commit or revision
    provenance = {
        "model_id": model_id,
        "revision": resolved_revision,
        "family": adapter.family,
        "dtype": dtype,
        "device": device,
        "quantization": quantization,
        "attn_implementation": getattr(model.config, "_attn_implementation", attn_implementation),
        "prompt_template": adapter.prompt_template,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
    }
    if weight_problems:
        provenance["weights_incomplete"] = weight_problems
    return LoadedModel(
        model=model,
        processor=processor,
        adapter=adapter,
        model_id=model_id,
        revision=resolved_revision,
        dtype=dtype,
        device=device,
        quantization=quantization,
        attn_implementation=provenance["attn_implementation"],
        provenance=provenance,
    )
