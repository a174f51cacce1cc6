"""Gemma 3 (`Gemma3ForConditionalGeneration`, e.g. `google/gemma-3-4b-it`).

- Image span: the processor replaces `<start_of_image>` in the prompt by
  `\\n\\n<start_of_image>` + `<image_soft_token>` x mm_tokens_per_image + `<end_of_image>\\n\\n`.
  The SigLIP tower sees the image resized to 896x896 (no crop, no pad; pan-and-scan is off
  by default and refused here) as 64x64 patches of 14 px; the projector average-pools them
  4x4 into 16x16 = 256 tokens, row-major (verified by perturbation). One cell = 56x56 view px.
- Attention: with `token_type_ids` (image 1, text 0), which the real processor returns and
  `build_inputs` always passes, image tokens attend to each other bidirectionally; text is
  causal. Layers alternate sliding-window and full attention (`layer_types`); each layer
  gets its own mask from a dict the model builds, so blocking hooks see the real one.
- Norms are `(1 + weight)`-scaled RMSNorm and token embeddings are scaled by
  sqrt(hidden_size) inside the embedding module; the lens reuses the model's own modules.
- `final_logit_softcapping`, logits = cap * tanh(logits / cap): the lens must equal the
  model's logits, so `unembedding` applies the cap exactly when the model class's forward
  does. `Gemma3ForConditionalGeneration` (transformers 5.24) does NOT apply it even when
  the text config sets one (only `Gemma3ForCausalLM` does; Gemma 3 checkpoints ship None);
  `PaliGemmaForConditionalGeneration` does (PaliGemma 2's Gemma 2 LM: cap 30). Where it
  applies, `softcap` says so: `readout()` (`collector.readout`) and `unembedding`
  (`SoftcappedUnembedding`) apply lm_head, then the cap in the model's own op order, so the
  lens and the blocking read-out equal the model's logits exactly.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from collector.adapters.base import ImageTokenLayout, ModelAdapter, denormalise_to_image
from collector.adapters.view_steps import ViewSteps, processor_backend, resize_and_center_crop
from collector.readout import SoftcappedUnembedding  # re-exported: the softcap op lives in the read-out
from db.geometry import ViewGeometry


@functools.cache
def forward_applies_softcap(model_class: type) -> bool:
    """Whether `model_class.forward` applies `final_logit_softcapping` to its logits (read from
    its source: the VLM classes differ, see the module docstring)."""
    try:
        source = inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return True  # cannot tell: assume the config is honoured
    return "final_logit_softcapping" in source


class GemmaFamilyAdapter(ModelAdapter):
    """Parts shared by Gemma-LM VLMs (Gemma 3, PaliGemma): softcapping and the vision parts."""

    @property
    def softcap(self) -> float | None:
        """The final logit softcap the model's forward applies (None: none applied)."""
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap is None or not forward_applies_softcap(type(self.model)):
            return None
        return float(cap)

    @property
    def unembedding(self) -> torch.nn.Module:
        lm_head = self.model.get_output_embeddings()
        cap = self.softcap
        if cap is None:
            return lm_head
        cached = getattr(self, "_softcapped", None)
        if cached is None or cached.lm_head is not lm_head or cached.cap != cap:
            cached = self._softcapped = SoftcappedUnembedding(lm_head, cap)
        return cached

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    @classmethod
    def image_processor_geometry(cls, image_processor: Any, width: int, height: int) -> ViewGeometry:
        """The processor's resize (to exactly `size`: height/width on the real settings) and
        centre crop if set (off on the real settings); no pad."""
        cls.require_image_processor(image_processor)
        steps = ViewSteps.of_image(width, height)
        resize_and_center_crop(steps, image_processor, processor_backend(image_processor))
        return steps.geometry()

    def view_image(self, pixel_values: torch.Tensor) -> Image.Image:
        return denormalise_to_image(pixel_values, self.processor.image_processor)


class Gemma3Adapter(GemmaFamilyAdapter):
    family = "gemma3"
    # What the real chat template produces for one image and one question (BOS comes from
    # the tokenizer).
    default_prompt_template = "<start_of_turn>user\n<start_of_image>{question}<end_of_turn>\n<start_of_turn>model\n"
    image_processor_classes = frozenset({"Gemma3ImageProcessor", "Gemma3ImageProcessorPil"})

    def __init__(self, model: Any, processor: Any, prompt_template: str | None = None) -> None:
        super().__init__(model, processor, prompt_template)
        image_processor = getattr(processor, "image_processor", None)
        if getattr(image_processor, "do_pan_and_scan", False):
            raise ValueError("Gemma 3 with do_pan_and_scan=True (extra crops) is not supported")

    @classmethod
    def matches(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) == "gemma3"

    @property
    def patch_grid(self) -> tuple[int, int]:
        side = math.isqrt(int(self.model.config.mm_tokens_per_image))
        return side, side

    def build_inputs_for_text(self, image: Image.Image, text: str) -> dict[str, torch.Tensor]:
        batch = dict(self.processor(images=image, text=text, return_tensors="pt"))
        batch.pop("num_crops", None)
        if "token_type_ids" not in batch:  # what the real processor passes: image 1, text 0
            batch["token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        return self._to_model(batch)

    @classmethod
    def image_processor_geometry(cls, image_processor: Any, width: int, height: int) -> ViewGeometry:
        """Resize to 896x896 (`GemmaFamilyAdapter`); pan-and-scan's extra crops are refused."""
        name = cls.require_image_processor(image_processor)
        if getattr(image_processor, "do_pan_and_scan", False):
            raise ValueError(f"{name} with do_pan_and_scan=True (extra crops) is not supported")
        return super().image_processor_geometry(image_processor, width, height)

    def image_token_layout(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> ImageTokenLayout:
        rows, cols = self.patch_grid
        config = self.model.config
        positions = self.image_token_run(
            input_ids,
            rows * cols,
            f"{rows * cols} image tokens for a {rows}x{cols} grid (no pan-and-scan crops)",
            opened_by=int(config.boi_token_id),
            closed_by=int(config.eoi_token_id),
        )
        return ImageTokenLayout.row_major(positions, rows, cols)
