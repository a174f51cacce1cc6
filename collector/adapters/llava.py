"""LLaVA (`LlavaForConditionalGeneration`): CLIP vision tower, MLP projector, decoder LM.

LLaVA-1.5 (`llava-hf/llava-1.5-7b-hf`, Llama/Vicuna LM) and LLaVA-Phi
(`xtuner/llava-phi-3-mini-hf`, Phi-3 LM) share the architecture and the image-token
layout (one contiguous run of `<image>` tokens, one per CLIP patch after dropping CLS,
row-major over the patch grid); they differ only in the prompt format.

The view (`image_processor_geometry`): `CLIPImageProcessor` resizes the short side to
`size["shortest_edge"]` and centre-crops `crop_size` (336x336 for LLaVA-1.5);
`LlavaImageProcessor` with `do_pad` first pads the image to a square (the original
LLaVA-1.5 "pad" preprocessing). A CLIP processor with `do_pad` pads bottom/right after the
crop, a valid-region the affine view cannot express: refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from collector.adapters.base import ImageTokenLayout, ModelAdapter, denormalise_to_image
from collector.adapters.view_steps import ViewSteps, processor_backend, resize_and_center_crop
from db.geometry import ViewGeometry

CLIP_IMAGE_PROCESSORS = frozenset({"CLIPImageProcessor", "CLIPImageProcessorPil"})
LLAVA_IMAGE_PROCESSORS = frozenset({"LlavaImageProcessor", "LlavaImageProcessorPil"})


class LlavaAdapter(ModelAdapter):
    """Shared LLaVA layout; subclasses fix the LM family and prompt format."""

    text_model_types: tuple[str, ...] = ()
    image_processor_classes = CLIP_IMAGE_PROCESSORS | LLAVA_IMAGE_PROCESSORS

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

    def image_token_layout(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> ImageTokenLayout:
        rows, cols = self.patch_grid
        positions = self.image_token_run(
            input_ids, rows * cols, f"{rows * cols} image tokens for a {rows}x{cols} patch grid"
        )
        return ImageTokenLayout.row_major(positions, rows, cols)

    @classmethod
    def image_processor_geometry(cls, image_processor: Any, width: int, height: int) -> ViewGeometry:
        """[pad to a square (`LlavaImageProcessor` with do_pad)], resize, centre crop."""
        name = cls.require_image_processor(image_processor)
        steps = ViewSteps.of_image(width, height)
        backend = processor_backend(image_processor)
        do_pad = bool(getattr(image_processor, "do_pad", False))
        if name in LLAVA_IMAGE_PROCESSORS and do_pad:
            steps.pad_to_square()
        resize_and_center_crop(steps, image_processor, backend)
        if name in CLIP_IMAGE_PROCESSORS and do_pad:
            # The generic backend pads bottom/right after cropping; the padded strip would
            # need a separate valid-region notion that this affine geometry cannot express.
            raise ValueError(f"{name} with do_pad=True (bottom/right padding after crop) is not supported")
        return steps.geometry()

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
