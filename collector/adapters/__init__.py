"""Model adapters, one per VLM family, and the lookup from a model config to its adapter."""

from __future__ import annotations

from typing import Any

from collector.adapters.base import ImageTokenLayout, ModelAdapter
from collector.adapters.llava import Llava15Adapter, LlavaPhiAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (Llava15Adapter, LlavaPhiAdapter)

# Families users ask for that are not supported yet, with what is missing.
UNSUPPORTED: dict[str, str] = {
    "llava_next": "LLaVA-NeXT (anyres tiles with image_newline tokens) is not supported yet",
    "qwen2_vl": "Qwen2-VL (dynamic resolution, M-RoPE) is not supported yet",
    "qwen2_5_vl": "Qwen2.5-VL (dynamic resolution, M-RoPE) is not supported yet",
    "gemma3": "Gemma 3 (bidirectional image attention) is not supported yet",
    "paligemma": "PaliGemma (prefix-LM attention) is not supported yet",
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
    "UNSUPPORTED",
    "ImageTokenLayout",
    "ModelAdapter",
    "UnsupportedModelError",
    "adapter_class_for",
]
