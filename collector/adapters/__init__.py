"""Model adapters, one per VLM family, and the lookup from a model config to its adapter."""

from __future__ import annotations

from typing import Any

from collector.adapters.base import ExtraImageTokens, ImageTokenLayout, ModelAdapter, NamedView
from collector.adapters.gemma3 import Gemma3Adapter
from collector.adapters.llava import Llava15Adapter, LlavaPhiAdapter
from collector.adapters.llava_next import LlavaNextAdapter
from collector.adapters.paligemma import PaliGemmaAdapter
from collector.adapters.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    Llava15Adapter,
    LlavaPhiAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Gemma3Adapter,
    PaliGemmaAdapter,
)

# Families users ask for that are not supported yet, with what is missing.
UNSUPPORTED: dict[str, str] = {
    "mllama": "Llama 3.2 Vision is not supported: its image enters through cross-attention layers, "
    "so there are no image-token positions to lens, ablate or block",
    "llava_onevision": "LLaVA-OneVision is not supported yet (anyres-max tiling and video tokens)",
    "idefics3": "Idefics3 / SmolVLM is not supported yet (image splitting into sub-images with row/col tokens)",
    "blip-2": "BLIP-2 is not supported: a Q-Former resamples the image into 32 query tokens, not patches",
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
    "NamedView",
    "UnsupportedModelError",
    "adapter_class_for",
]
