"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

- Dynamic resolution: the image is resized to multiples of 28 (transformers' `smart_resize`,
  restated here; that resize is the whole view geometry: no crop, no pad), cut into
  14x14 patches, and every 2x2 block of patches is merged into one LM token. The image's
  span in the LM input is `<|vision_start|>` + `<|image_pad|>` x (t*h*w/4) + `<|vision_end|>`;
  its grid is (h/2) x (w/2) cells, row-major, from `image_grid_thw` = (t, h, w) patches.
- `pixel_values` are patchified, (t*h*w, 3*2*14*14), in 2x2-merge-block order; the adapter
  de-patchifies them for the view.
- M-RoPE: the model derives 3-D position ids from `input_ids`, `image_grid_thw` and
  `mm_token_type_ids`. Without `mm_token_type_ids` it silently falls back to 1-D positions,
  so `build_inputs` always returns it.
- The real processor (`Qwen2VLProcessor`) cannot be built without torchvision (its video
  part needs it). `load_processor` tries it first and otherwise builds
  `QwenImageTextProcessor`: the checkpoint's image processor and tokenizer, expanding
  `<|image_pad|>` exactly as the real processor does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from collector.adapters.base import ImageTokenLayout, ModelAdapter, denormalise_to_image
from collector.adapters.view_steps import ViewSteps, size_fields
from db.geometry import ViewGeometry

QWEN_CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


class QwenImageTextProcessor:
    """Image + text processing of Qwen2-VL without the video part (no torchvision needed).

    Mirrors `Qwen2VLProcessor.__call__` for images: each `<|image_pad|>` in the text
    becomes t*h*w / merge_size**2 copies; returns input_ids, attention_mask,
    mm_token_type_ids (text 0, image 1, video 2), pixel_values and image_grid_thw.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None) -> QwenImageTextProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(
            AutoImageProcessor.from_pretrained(model_id, revision=revision),
            AutoTokenizer.from_pretrained(model_id, revision=revision),
        )

    def __call__(self, images: Any = None, text: str | list[str] | None = None, return_tensors: str = "pt", **kwargs):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text or [])
        data: dict[str, Any] = {}
        if images is not None:
            image_inputs = self.image_processor(images=images, return_tensors="pt")
            grids = image_inputs["image_grid_thw"]
            merge = int(self.image_processor.merge_size) ** 2
            index = 0
            expanded = []
            for sample in texts:
                pieces = sample.split(self.image_token)
                out = pieces[0]
                for piece in pieces[1:]:
                    # A placeholder keeps expanded tokens from being re-expanded.
                    out += "<|placeholder|>" * (int(grids[index].prod()) // merge) + piece
                    index += 1
                expanded.append(out.replace("<|placeholder|>", self.image_token))
            if index != len(grids):
                raise ValueError(f"{len(grids)} images but {index} {self.image_token} tokens in the text")
            texts = expanded
            data.update(image_inputs)
        encoded = self.tokenizer(texts, return_tensors=return_tensors, **kwargs)
        data.update(encoded)
        ids = encoded["input_ids"]
        token_type = torch.zeros_like(ids)
        token_type[ids == self.image_token_id] = 1
        token_type[ids == self.video_token_id] = 2
        data["mm_token_type_ids"] = token_type
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2-vl"
    model_types: tuple[str, ...] = ("qwen2_vl",)
    default_prompt_template = QWEN_CHAT_PROMPT
    # Qwen2.5-VL checkpoints use the same image processor class.
    image_processor_classes = frozenset({"Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil"})

    @classmethod
    def matches(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) in cls.model_types

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None) -> Any:
        try:
            return super().load_processor(model_id, revision)
        except (ImportError, AttributeError, ValueError, TypeError):
            # Without torchvision the video processor cannot be built; images do not need it.
            return QwenImageTextProcessor.from_pretrained(model_id, revision)

    # -- parts ----------------------------------------------------------------------------

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

    @property
    def projector(self) -> torch.nn.Module:
        # The patch merger: 2x2 neighbouring patch features -> one LM-sized token.
        return self.model.model.visual.merger

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    @property
    def patch_size(self) -> int:
        return int(self.model.config.vision_config.patch_size)

    # -- inputs ---------------------------------------------------------------------------

    def build_inputs_for_text(self, image: Image.Image, text: str) -> dict[str, torch.Tensor]:
        batch = dict(self.processor(images=image, text=text, return_tensors="pt"))
        ids = batch["input_ids"]
        if "mm_token_type_ids" not in batch:
            token_type = torch.zeros_like(ids)
            token_type[ids == self.image_token_id] = 1
            token_type[ids == self.video_token_id] = 2
            batch["mm_token_type_ids"] = token_type
        return self._to_model(batch)

    @staticmethod
    def _grid_thw(inputs: Mapping[str, Any]) -> torch.Tensor:
        """(t, h, w) patches of the one image, from `build_inputs`' `image_grid_thw`."""
        grids = inputs.get("image_grid_thw")
        if grids is None:
            raise ValueError("Qwen2-VL's image grid depends on the image: inputs need 'image_grid_thw'")
        grids = torch.as_tensor(grids).cpu().reshape(-1, 3)
        if grids.shape[0] != 1:
            raise ValueError(f"one image per prompt is supported, got {grids.shape[0]} image grids")
        return grids[0]

    def image_token_layout(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> ImageTokenLayout:
        if input_ids.dim() != 1:
            raise ValueError(f"expected one sequence of token ids (T,), got shape {tuple(input_ids.shape)}")
        t, h, w = (int(v) for v in self._grid_thw(inputs))
        if t != 1:
            raise ValueError(f"an image has temporal grid 1, got {t}")
        rows, cols = h // self.merge_size, w // self.merge_size
        config = self.model.config
        positions = self.image_token_run(
            input_ids,
            rows * cols,
            f"{rows * cols} image tokens for a {rows}x{cols} merged grid (image_grid_thw {t}x{h}x{w})",
            opened_by=int(config.vision_start_token_id),
            closed_by=int(config.vision_end_token_id),
        )
        return ImageTokenLayout.row_major(positions, rows, cols)

    # -- the view -------------------------------------------------------------------------

    @classmethod
    def image_processor_geometry(cls, image_processor: Any, width: int, height: int) -> ViewGeometry:
        """`smart_resize` (both sides to multiples of ``patch_size * merge_size``, the pixel
        count kept within [shortest_edge, longest_edge]), then patchify; no crop or pad."""
        cls.require_image_processor(image_processor)
        steps = ViewSteps.of_image(width, height)
        if getattr(image_processor, "do_resize", True):
            size = size_fields(image_processor.size, "size")
            if not size.get("shortest_edge") or not size.get("longest_edge"):
                raise ValueError(f"Qwen2-VL size needs shortest_edge and longest_edge (pixel counts), got {size}")
            factor = int(image_processor.patch_size) * int(image_processor.merge_size)
            new_h, new_w = smart_resize(height, width, factor, int(size["shortest_edge"]), int(size["longest_edge"]))
            steps.resize_to(new_w, new_h)
        return steps.geometry()

    def view_pixels(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """De-patchify `pixel_values` (t*h*w, 3*tp*p*p) into the (3, h*p, w*p) view."""
        t, h, w = (int(v) for v in self._grid_thw(inputs))
        return depatchify(inputs["pixel_values"], t, h, w, self.patch_size, self.merge_size)

    def with_view_pixels(self, inputs: Mapping[str, Any], view: torch.Tensor) -> torch.Tensor:
        """Patchify a (3, h*p, w*p) view back into `pixel_values` (t*h*w, 3*tp*p*p)."""
        t, h, w = (int(v) for v in self._grid_thw(inputs))
        pixels = inputs["pixel_values"]
        temporal = int(pixels.shape[1]) // (3 * self.patch_size**2)
        out = patchify(view, t, h, w, self.patch_size, self.merge_size, temporal)
        return out.to(device=pixels.device, dtype=pixels.dtype)

    def repeat_inputs(self, inputs: Mapping[str, Any], views) -> dict[str, torch.Tensor]:
        """Rows of one image: pixel_values are concatenated (the model splits them by
        image_grid_thw), every other tensor is expanded along dim 0."""
        batch = len(views)
        out = {
            name: value.expand(batch, *value.shape[1:]).contiguous() if isinstance(value, torch.Tensor) else value
            for name, value in inputs.items()
            if name != "pixel_values"
        }
        out["pixel_values"] = torch.cat(
            [inputs["pixel_values"] if view is None else self.with_view_pixels(inputs, view) for view in views]
        )
        return out

    def view_image(self, pixel_values: torch.Tensor) -> Image.Image:
        return denormalise_to_image(pixel_values, self.processor.image_processor)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL ``smart_resize``, restated: (height, width) after resizing."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(view: torch.Tensor, t: int, h: int, w: int, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """The inverse of `depatchify` for a still image: (C, h*p, w*p) -> (t*h*w, C*tp*p*p), every
    temporal copy equal to the view."""
    channels = view.shape[0]
    x = view.detach().reshape(channels, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (h/m, w/m, m, m, C, p, p)
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal, -1, -1)  # (h/m, w/m, m, m, C, tp, p, p)
    x = x.reshape(1, h * w, channels * temporal * patch * patch).expand(t, -1, -1)
    return x.reshape(t * h * w, channels * temporal * patch * patch).contiguous()


def depatchify(pixel_values: torch.Tensor, t: int, h: int, w: int, patch: int, merge: int) -> torch.Tensor:
    """Invert `Qwen2VLImageProcessor.patchify` for one image: (t*h*w, C*tp*p*p) -> (C, h*p, w*p).

    The processor lays out patches as (h/m, w/m, m, m, C, tp, p, p); the temporal copies of
    a still image are identical, the first is taken.
    """
    n, dim = pixel_values.shape
    if n != t * h * w:
        raise ValueError(f"pixel_values has {n} patches, image_grid_thw says {t}x{h}x{w}")
    temporal = dim // (3 * patch * patch)
    x = pixel_values.detach().reshape(t, h // merge, w // merge, merge, merge, 3, temporal, patch, patch)
    x = x[0, :, :, :, :, :, 0]  # (h/m, w/m, m, m, C, p, p)
    x = x.permute(4, 0, 2, 5, 1, 3, 6)  # (C, h/m, m, p, w/m, m, p)
    return x.reshape(3, h * patch, w * patch)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)
