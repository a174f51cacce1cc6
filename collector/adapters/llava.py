"""LLaVA (`LlavaForConditionalGeneration`): CLIP vision tower, MLP projector, decoder LM.

LLaVA-1.5 (`llava-hf/llava-1.5-7b-hf`, Llama/Vicuna LM) and LLaVA-Phi
(`xtuner/llava-phi-3-mini-hf`, Phi-3 LM) share the architecture and the image-token
layout (one contiguous run of `<image>` tokens, one per CLIP patch after dropping CLS,
row-major over the patch grid); they differ only in the prompt format.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from PIL import Image

from collector.adapters.base import ImageTokenLayout, ModelAdapter, denormalise_to_image


class LlavaAdapter(ModelAdapter):
    """Shared LLaVA layout; subclasses fix the LM family and prompt format."""

    text_model_types: tuple[str, ...] = ()

    @classmethod
    def matches(cls, config: Any) -> bool:
        text_type = getattr(getattr(config, "text_config", None), "model_type", None)
        return getattr(config, "model_type", None) == "llava" and text_type in cls.text_model_types

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def patch_grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return side, side

    def image_token_layout(
        self, input_ids: torch.Tensor, inputs: Mapping[str, Any] | None = None
    ) -> ImageTokenLayout:
        rows, cols = self.patch_grid
        positions = self.image_token_run(input_ids, rows * cols, f"{rows * cols} image tokens for a {rows}x{cols} patch grid")
        return ImageTokenLayout.row_major(positions, rows, cols)

    def view_image(self, pixel_values: torch.Tensor) -> Image.Image:
        return denormalise_to_image(pixel_values, self.processor.image_processor)


class Llava15Adapter(LlavaAdapter):
    family = "llava-1.5"
    text_model_types = ("llama",)
    default_prompt_template = "USER: <image>\n{question} ASSISTANT:"


class LlavaPhiAdapter(LlavaAdapter):
    family = "llava-phi"
    text_model_types = ("phi3",)
    default_prompt_template = "<|user|>\n<image>{question}<|end|>\n<|assistant|>\n"
