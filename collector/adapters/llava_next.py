"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, e.g. `llava-hf/llava-v1.6-mistral-7b-hf`).

AnyRes: the processor makes a *base* view (the whole image resized to 336x336) plus the
image resized and padded to the best `image_grid_pinpoints` resolution, cut into 336x336
tiles. The LM input holds one contiguous run of `<image>` tokens, in this order:

1. the base view's 24x24 patch tokens, row-major: these are the layout's grid
   (`positions`, `patch_rows`, `patch_cols`, kind 'image', label `<IMG001>`...), the
   grid the site draws over the base view;
2. the tiles' tokens stitched into one high-resolution (HR) grid of
   (tiles_high*24) x (tiles_wide*24) patches, with the rows (or columns) that only cover
   padding removed (`unpad_image`); row by row, each HR row followed by one
   `image_newline` token. These are `layout.extra`: kind 'image_hr' with the cell of
   the unpadded HR grid in patch_row/patch_col and label `<HR r,c>`; kind
   'image_newline' with patch_row = the HR row it ends, patch_col NULL, label `<NL r>`.

The view (`image_processor_geometry`) is the base view: the whole image resized to exactly
`size` (height/width, or a square of `shortest_edge`), then the processor's resize and
centre crop (no-ops on the real settings); `do_pad` pads only the high-resolution tiles.

`extra_views` gives the HR grid's image (the tiles de-normalised, stitched and cropped
as `unpad_image` crops the features), which the site shows beside the base view.

The number of image tokens therefore depends on the image size (`image_sizes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from collector.adapters.base import ExtraImageTokens, ImageTokenLayout, NamedView, denormalise_to_image
from collector.adapters.llava import LlavaAdapter
from collector.adapters.view_steps import ViewSteps, processor_backend, resize_and_center_crop, size_fields
from db.geometry import ViewGeometry


def hr_grid(image_size: tuple[int, int], pinpoints: list, tile: int, patches_per_side: int) -> dict[str, int]:
    """The unpadded high-resolution grid of an (height, width) image, as LLaVA-NeXT builds it.

    Returns tiles_high, tiles_wide, the full stitched grid (full_rows, full_cols), and the
    kept window (row0, rows, col0, cols) after `unpad_image`.
    """
    from transformers.image_processing_utils import select_best_resolution

    height, width = (int(v) for v in image_size)
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    tiles_high, tiles_wide = best_h // tile, best_w // tile
    full_rows, full_cols = tiles_high * patches_per_side, tiles_wide * patches_per_side
    row0, rows, col0, cols = 0, full_rows, 0, full_cols
    if width / height > full_cols / full_rows:
        new_height = int(round(height * (full_cols / width), 7))
        padding = (full_rows - new_height) // 2
        row0, rows = padding, full_rows - 2 * padding
    else:
        new_width = int(round(width * (full_rows / height), 7))
        padding = (full_cols - new_width) // 2
        col0, cols = padding, full_cols - 2 * padding
    return dict(
        tiles_high=tiles_high,
        tiles_wide=tiles_wide,
        full_rows=full_rows,
        full_cols=full_cols,
        row0=row0,
        rows=rows,
        col0=col0,
        cols=cols,
    )


class LlavaNextAdapter(LlavaAdapter):
    family = "llava-next"
    default_prompt_template = "[INST] <image>\n{question} [/INST]"
    image_processor_classes = frozenset({"LlavaNextImageProcessor", "LlavaNextImageProcessorPil"})

    def __init__(self, model: Any, processor: Any, prompt_template: str | None = None) -> None:
        super().__init__(model, processor, prompt_template)
        if self.model.config.vision_feature_select_strategy != "default":
            raise ValueError("LLaVA-NeXT with vision_feature_select_strategy 'full' is not supported")

    @classmethod
    def matches(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) == "llava_next"

    @property
    def image_newline(self) -> torch.Tensor:
        return self.model.model.image_newline

    @classmethod
    def image_processor_geometry(cls, image_processor: Any, width: int, height: int) -> ViewGeometry:
        """The base view (tile 0 of pixel_values): the image resized to exactly `size`, then
        the usual resize and centre crop; `do_pad` concerns only the tiles."""
        cls.require_image_processor(image_processor)
        steps = ViewSteps.of_image(width, height)
        backend = processor_backend(image_processor)
        base = size_fields(image_processor.size, "size")
        steps.resize_to(base.get("width") or base.get("shortest_edge"), base.get("height") or base.get("shortest_edge"))
        resize_and_center_crop(steps, image_processor, backend)
        return steps.geometry()

    @staticmethod
    def _image_size(inputs: Mapping[str, Any]) -> tuple[int, int]:
        """(height, width) of the one original image, from `build_inputs`' `image_sizes`."""
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT's token layout depends on the image size: inputs need 'image_sizes'")
        sizes = torch.as_tensor(sizes).reshape(-1, 2)
        if sizes.shape[0] != 1:
            raise ValueError(f"one image per prompt is supported, got {sizes.shape[0]}")
        return int(sizes[0, 0]), int(sizes[0, 1])

    def hr_grid(self, image_size: tuple[int, int]) -> dict[str, int]:
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return hr_grid(image_size, self.model.config.image_grid_pinpoints, int(vision.image_size), side)

    def image_token_layout(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> ImageTokenLayout:
        if input_ids.dim() != 1:
            raise ValueError(f"expected one sequence of token ids (T,), got shape {tuple(input_ids.shape)}")
        base_rows, base_cols = self.patch_grid
        grid = self.hr_grid(self._image_size(inputs))
        rows, cols = grid["rows"], grid["cols"]
        n_base, n_hr = base_rows * base_cols, rows * (cols + 1)
        positions = self.image_token_run(
            input_ids, n_base + n_hr, f"{n_base} base + {n_hr} high-resolution image tokens"
        )
        hr = torch.arange(n_hr)
        hr_rows, hr_cols = hr // (cols + 1), hr % (cols + 1)
        newline = hr_cols == cols
        kinds = tuple("image_newline" if nl else "image_hr" for nl in newline.tolist())
        labels = tuple(
            f"<NL {r}>" if nl else f"<HR {r},{c}>"
            for r, c, nl in zip(hr_rows.tolist(), hr_cols.tolist(), newline.tolist())
        )
        extra = ExtraImageTokens(
            positions=positions[n_base:],
            kinds=kinds,
            rows=hr_rows,
            cols=torch.where(newline, torch.full_like(hr_cols, -1), hr_cols),
            labels=labels,
        )
        return ImageTokenLayout.row_major(positions[:n_base], base_rows, base_cols, extra)

    def hr_cell_source(self, image_size: tuple[int, int], row: int, col: int) -> tuple[int, int, int]:
        """(tile index in pixel_values[0], patch row, patch col in that tile) of HR cell (row, col)."""
        grid = self.hr_grid(image_size)
        side = self.patch_grid[0]
        full_r, full_c = row + grid["row0"], col + grid["col0"]
        return 1 + (full_r // side) * grid["tiles_wide"] + full_c // side, full_r % side, full_c % side

    def view_pixels(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The base view (the whole image at 336x336): tile 0 of pixel_values (1, tiles, 3, H, W)."""
        return inputs["pixel_values"][0][0]

    def with_view_pixels(self, inputs: Mapping[str, Any], view: torch.Tensor) -> torch.Tensor:
        """pixel_values with the base view (tile 0) replaced; the high-resolution tiles are kept."""
        pixels = inputs["pixel_values"].clone()
        pixels[0, 0] = view.to(device=pixels.device, dtype=pixels.dtype)
        return pixels

    def extra_views(self, inputs: Mapping[str, Any]) -> list[NamedView]:
        """The high-resolution view: the tiles of pixel_values[0][1:] stitched row-major into
        the anyres grid, cropped to the rows/columns `unpad_image` keeps. Cell (r, c) of its
        grid is HR token `<HR r,c>` (kind 'image_hr'), one patch_size x patch_size block."""
        grid = self.hr_grid(self._image_size(inputs))
        side = int(self.model.config.vision_config.image_size)
        patch = int(self.model.config.vision_config.patch_size)
        th, tw = grid["tiles_high"], grid["tiles_wide"]
        tiles = inputs["pixel_values"][0][1 : 1 + th * tw]
        if tiles.shape[0] != th * tw:
            raise ValueError(f"expected {th * tw} high-resolution tiles, got {tiles.shape[0]}")
        stitched = tiles.reshape(th, tw, 3, side, side).permute(2, 0, 3, 1, 4).reshape(3, th * side, tw * side)
        row0, col0 = grid["row0"] * patch, grid["col0"] * patch
        kept = stitched[:, row0 : row0 + grid["rows"] * patch, col0 : col0 + grid["cols"] * patch]
        image = denormalise_to_image(kept, self.processor.image_processor)
        return [NamedView("high_res", image, grid["rows"], grid["cols"], "image_hr")]

    def view_image(self, pixel_values: torch.Tensor) -> Image.Image:
        if pixel_values.dim() == 4:  # all tiles of one image given: show the base view
            pixel_values = pixel_values[0]
        return denormalise_to_image(pixel_values, self.processor.image_processor)
