"""The view geometry a transformers image processor applies (original image -> model view).

The geometry type and everything computed from it (masks, cells) live in `db.geometry`.

Coordinates are continuous with pixel ``i`` spanning ``[i, i + 1)``; a resize from
``n`` to ``m`` pixels therefore maps ``x`` to ``x * m / n`` (this is how PIL's
resampling kernels place output pixel centres).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from db.geometry import ViewGeometry

# Only processors whose preprocessing pipeline has been read and tested are accepted;
# a subclass or another model's processor may pad/crop differently.
_CLIP_LIKE = {"CLIPImageProcessor", "CLIPImageProcessorPil"}
_LLAVA = {"LlavaImageProcessor", "LlavaImageProcessorPil"}
# Qwen2-VL / Qwen2.5-VL: smart_resize to multiples of patch_size * merge_size, no crop.
# LLaVA-NeXT: the base view (the whole image resized to size x size, then the usual resize
# and crop, both no-ops on the real settings); the high-resolution tiles are not a view.
_LLAVA_NEXT = {"LlavaNextImageProcessor", "LlavaNextImageProcessorPil"}
_QWEN2_VL = {"Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil"}
# Gemma 3 (pan-and-scan off) and SigLIP (PaliGemma): resize to exactly size, no crop or pad.
_RESIZE_ONLY = {"Gemma3ImageProcessor", "Gemma3ImageProcessorPil", "SiglipImageProcessor", "SiglipImageProcessorPil"}
_SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")


def view_geometry_from_processor(image_processor: Any, width: int, height: int) -> ViewGeometry:
    """Derive the geometry a transformers image processor applies to a ``width``×``height`` image.

    Mirrors transformers 5.x exactly, using the processor's instance settings (not
    per-call overrides):

    * ``LlavaImageProcessor[Pil]`` with ``do_pad``: pad to a square of side
      ``max(w, h)``, image pasted at ``(max - side) // 2`` (odd pixel at the bottom/right),
      before resizing.
    * resize with ``size={"shortest_edge": s}``: short side -> ``s``, long side ->
      ``int(s * long / short)`` (truncation); with ``longest_edge`` as well, the
      transformers ``get_size_with_aspect_ratio`` rule; ``{"height", "width"}``:
      exact size.
    * centre crop: offset ``(resized - crop) // 2`` (floor). When the image is
      smaller than the crop it is zero-padded; the PIL backend places it at
      ``ceil(pad / 2)`` (i.e. the same floor formula) while the torchvision backend
      places it at ``floor(pad / 2)``.

    * ``LlavaNextImageProcessor[Pil]``: the geometry of the *base view* (tile 0 of
      ``pixel_values``): the whole image resized to exactly ``size`` (height/width, or
      a square of ``shortest_edge``), then the steps above; ``do_pad`` pads only the
      high-resolution tiles.
    * ``Gemma3ImageProcessor[Pil]`` (pan-and-scan off), ``SiglipImageProcessor[Pil]``:
      resize to exactly ``size`` (height/width), no crop or pad.
    * ``Qwen2VLImageProcessor[Pil]``: ``smart_resize`` to multiples of
      ``patch_size * merge_size`` within the pixel budget, no crop or pad.

    CLIP processors with ``do_pad`` (bottom/right padding after the crop) are
    rejected. Raises ``ValueError`` for processors or settings not covered above.
    """
    name = type(image_processor).__name__
    if name in _QWEN2_VL:
        return _qwen2_vl_view(image_processor, width, height)
    supported = _CLIP_LIKE | _LLAVA | _LLAVA_NEXT | _QWEN2_VL | _RESIZE_ONLY
    if name in _RESIZE_ONLY and getattr(image_processor, "do_pan_and_scan", False):
        raise ValueError(f"{name} with do_pan_and_scan=True (extra crops) is not supported")
    if name not in _CLIP_LIKE | _LLAVA | _LLAVA_NEXT | _RESIZE_ONLY:
        raise ValueError(f"unsupported image processor {name!r}; expected one of {sorted(supported)}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    backend = getattr(image_processor, "backend", None)
    if backend not in ("pil", "torchvision"):
        raise ValueError(f"unsupported image processor backend {backend!r}")

    scale_x = scale_y = 1.0
    offset_x = offset_y = 0.0
    cur_w, cur_h = width, height
    do_pad = bool(getattr(image_processor, "do_pad", False))

    if name in _LLAVA_NEXT:
        # get_image_patches: the base view is the image resized to exactly (h, w) of
        # size, or a square of shortest_edge; do_pad only concerns the tiles.
        base = _size_fields(image_processor.size, "size")
        side_h = base.get("height") or base.get("shortest_edge")
        side_w = base.get("width") or base.get("shortest_edge")
        scale_x, scale_y = int(side_w) / cur_w, int(side_h) / cur_h
        cur_w, cur_h = int(side_w), int(side_h)
        do_pad = False

    if name in _LLAVA and do_pad and cur_w != cur_h:
        side = max(cur_w, cur_h)
        offset_x -= (side - cur_w) // 2
        offset_y -= (side - cur_h) // 2
        cur_w = cur_h = side

    if getattr(image_processor, "do_resize", False):
        new_h, new_w = _resize_output_size(_size_fields(image_processor.size, "size"), cur_h, cur_w)
        fx, fy = new_w / cur_w, new_h / cur_h
        scale_x, scale_y = scale_x * fx, scale_y * fy
        offset_x, offset_y = offset_x * fx, offset_y * fy
        cur_w, cur_h = new_w, new_h

    if getattr(image_processor, "do_center_crop", False):
        crop = _size_fields(image_processor.crop_size, "crop_size")
        crop_h, crop_w = crop.get("height"), crop.get("width")
        if not crop_h or not crop_w:
            raise ValueError(f"crop_size must have height and width, got {crop}")
        offset_x += _crop_offset(cur_w, int(crop_w), backend)
        offset_y += _crop_offset(cur_h, int(crop_h), backend)
        cur_w, cur_h = int(crop_w), int(crop_h)

    if name in _CLIP_LIKE and do_pad:
        # The generic backend pads bottom/right after cropping; the padded strip would
        # need a separate valid-region notion that this affine geometry cannot express.
        raise ValueError(f"{name} with do_pad=True (bottom/right padding after crop) is not supported")

    return ViewGeometry(
        image_width=int(width),
        image_height=int(height),
        view_width=int(cur_w),
        view_height=int(cur_h),
        scale_x=float(scale_x),
        scale_y=float(scale_y),
        offset_x=float(offset_x),
        offset_y=float(offset_y),
    )


def _qwen2_vl_view(image_processor: Any, width: int, height: int) -> ViewGeometry:
    """Qwen2-VL: ``smart_resize`` (both sides to multiples of ``patch_size * merge_size``,
    pixel count kept within [shortest_edge, longest_edge]), then patchify; no crop or pad."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    new_w, new_h = width, height
    if getattr(image_processor, "do_resize", True):
        size = _size_fields(image_processor.size, "size")
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise ValueError(f"Qwen2-VL size needs shortest_edge and longest_edge (pixel counts), got {size}")
        factor = int(image_processor.patch_size) * int(image_processor.merge_size)
        new_h, new_w = qwen_smart_resize(height, width, factor, int(size["shortest_edge"]), int(size["longest_edge"]))
    return ViewGeometry(
        image_width=int(width),
        image_height=int(height),
        view_width=int(new_w),
        view_height=int(new_h),
        scale_x=new_w / width,
        scale_y=new_h / height,
        offset_x=0.0,
        offset_y=0.0,
    )


def qwen_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL ``smart_resize``, restated: (height, width) after resizing."""
    import math

    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
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


def _size_fields(size: Any, what: str) -> dict[str, int]:
    """Non-empty fields of a transformers ``SizeDict`` or plain dict."""
    if size is None:
        return {}
    if isinstance(size, Mapping):
        items = dict(size)
    else:
        items = {k: getattr(size, k, None) for k in _SIZE_KEYS}
    fields = {k: v for k, v in items.items() if v is not None}
    if not fields:
        raise ValueError(f"{what} is empty")
    return fields


def _resize_output_size(size: dict[str, int], height: int, width: int) -> tuple[int, int]:
    """(height, width) after ``resize``, replicating transformers' rounding."""
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if shortest and longest:
        return _size_with_aspect_ratio(height, width, int(shortest), int(longest))
    if shortest:
        if set(size) - {"shortest_edge"}:
            raise ValueError(f"unsupported resize size {size}")
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = int(shortest), int(int(shortest) * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if size.get("height") and size.get("width") and set(size) <= {"height", "width"}:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"unsupported resize size {size}; expected shortest_edge[/longest_edge] or height/width")


def _size_with_aspect_ratio(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """transformers.image_transforms.get_size_with_aspect_ratio, restated."""
    raw_size = None
    lo, hi = float(min(height, width)), float(max(height, width))
    if hi / lo * size > max_size:
        raw_size = max_size * lo / hi
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        ow = size
        oh = int(raw_size * height / width) if raw_size is not None else int(size * height / width)
    else:
        oh = size
        ow = int(raw_size * width / height) if raw_size is not None else int(size * width / height)
    return oh, ow


def _crop_offset(length: int, crop: int, backend: str) -> int:
    """Where the crop window starts in a side of ``length`` pixels (negative: padding)."""
    if crop <= length or backend == "pil":
        # PIL backend pads by ceil(d/2) before cropping, which floor division already yields.
        return (length - crop) // 2
    return -((crop - length) // 2)
