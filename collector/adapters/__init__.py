"""Model adapters, one per VLM family, and the lookup from a model config to its adapter."""

from __future__ import annotations

from typing import Any

from collector.adapters.base import ExtraImageTokens, ImageTokenLayout, ModelAdapter
from collector.adapters.gemma3 import Gemma3Adapter
from collector.adapters.llava import Llava15Adapter, LlavaPhiAdapter
from collector.adapters.llava_next import LlavaNextAdapter
from collector.adapters.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    Llava15Adapter,
    LlavaPhiAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Gemma3Adapter,
)

# Families users ask for that are not supported yet, with what is missing.
UNSUPPORTED: dict[str, str] = {
    "paligemma": (
        "PaliGemma is not supported yet: no adapter verified for its image-first prefix-LM "
        "attention (token_type_ids) and SigLIP 224/14 grid"
    ),
}


class UnsupportedModelError(ValueError):
    """No adapter knows this model family."""


def adapter_class_for(config: Any) -> type[ModelAdapter]:
    """The adapter class for a model config, or UnsupportedModelError saying why."""
    for adapter in ADAPTERS:
        if adapter.matches(config):
            return adapter
    model_type = getattr(config, "model_type", "?")
    if model_type in UNSUPPORTED:
        raise UnsupportedModelError(UNSUPPORTED[model_type])
    text_type = getattr(getattr(config, "text_config", None), "model_type", None)
    families = ", ".join(a.family for a in ADAPTERS)
    detail = f"{model_type}" + (f" with a {text_type} language model" if text_type else "")
    raise UnsupportedModelError(f"unsupported model family: {detail} (supported: {families})")


__all__ = [
    "ADAPTERS",
    "ExtraImageTokens",
    "UNSUPPORTED",
    "ImageTokenLayout",
    "ModelAdapter",
    "UnsupportedModelError",
    "adapter_class_for",
]
