"""Building blocks for an adapter's `view_geometry`: the pad / resize / centre-crop steps
that transformers image processors apply, each restated as an affine map.

Family-free on purpose: an adapter composes the steps its own image processor takes
(`collector/adapters/llava.py` pads to a square then resizes and crops; Qwen2-VL resizes
to its own `smart_resize` size), so adding a family never edits this module.

Coordinates are continuous with pixel ``i`` spanning ``[i, i + 1)``; a resize from ``n``
to ``m`` pixels maps ``x`` to ``x * m / n`` (where PIL's resampling kernels place output
pixel centres). The result is a `db.geometry.ViewGeometry`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from db.geometry import ViewGeometry

_SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")


@dataclass
class ViewSteps:
    """The original image followed through preprocessing steps, one call per step.

    Tracks the current (width, height) and the affine map original -> current:
    ``u = x * scale_x - offset_x`` (likewise v).
    """

    image_width: int
    image_height: int
    width: int
    height: int
    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0

    @classmethod
    def of_image(cls, width: int, height: int) -> ViewSteps:
        """The identity map of a ``width`` x ``height`` image; ValueError unless both are positive."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        return cls(int(width), int(height), int(width), int(height))

    def pad_to_square(self) -> None:
        """Pad to a square of side max(w, h), the image pasted at ((side - w) // 2, (side - h) // 2):
        the odd pixel of padding goes to the bottom/right (transformers' `pad_to_square`)."""
        if self.width == self.height:
            return
        side = max(self.width, self.height)
        self.offset_x -= (side - self.width) // 2
        self.offset_y -= (side - self.height) // 2
        self.width = self.height = side

    def resize_to(self, width: int, height: int) -> None:
        """Resize the current image to exactly ``width`` x ``height``."""
        fx, fy = int(width) / self.width, int(height) / self.height
        self.scale_x, self.scale_y = self.scale_x * fx, self.scale_y * fy
        self.offset_x, self.offset_y = self.offset_x * fx, self.offset_y * fy
        self.width, self.height = int(width), int(height)

    def resize(self, size: Any) -> None:
        """Resize as transformers' `resize` does for a ``size`` of shortest_edge[/longest_edge]
        or height/width (see `resize_output_size`)."""
        new_h, new_w = resize_output_size(size_fields(size, "size"), self.height, self.width)
        self.resize_to(new_w, new_h)

    def center_crop(self, crop_size: Any, backend: str) -> None:
        """Centre-crop to ``crop_size`` (height and width); a side shorter than the crop is
        zero-padded, placed as the processor ``backend`` places it (`crop_offset`)."""
        crop = size_fields(crop_size, "crop_size")
        crop_h, crop_w = crop.get("height"), crop.get("width")
        if not crop_h or not crop_w:
            raise ValueError(f"crop_size must have height and width, got {crop}")
        self.offset_x += crop_offset(self.width, int(crop_w), backend)
        self.offset_y += crop_offset(self.height, int(crop_h), backend)
        self.width, self.height = int(crop_w), int(crop_h)

    def geometry(self) -> ViewGeometry:
        return ViewGeometry(
            image_width=self.image_width,
            image_height=self.image_height,
            view_width=int(self.width),
            view_height=int(self.height),
            scale_x=float(self.scale_x),
            scale_y=float(self.scale_y),
            offset_x=float(self.offset_x),
            offset_y=float(self.offset_y),
        )


def processor_backend(image_processor: Any) -> str:
    """The image processor's backend ('pil' or 'torchvision'); ValueError for any other."""
    backend = getattr(image_processor, "backend", None)
    if backend not in ("pil", "torchvision"):
        raise ValueError(f"unsupported image processor backend {backend!r}")
    return backend


def resize_and_center_crop(steps: ViewSteps, image_processor: Any, backend: str) -> None:
    """The resize (``do_resize``, ``size``) then centre crop (``do_center_crop``,
    ``crop_size``) of a transformers image processor's instance settings."""
    if getattr(image_processor, "do_resize", False):
        steps.resize(image_processor.size)
    if getattr(image_processor, "do_center_crop", False):
        steps.center_crop(image_processor.crop_size, backend)


def size_fields(size: Any, what: str) -> dict[str, int]:
    """Non-empty fields of a transformers ``SizeDict`` or plain dict; ValueError when empty."""
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


def resize_output_size(size: dict[str, int], height: int, width: int) -> tuple[int, int]:
    """(height, width) after transformers' ``resize``, with its rounding.

    ``shortest_edge`` alone: short side -> s, long side -> ``int(s * long / short)``
    (truncation); with ``longest_edge``: `size_with_aspect_ratio`; height/width: exact.
    """
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if shortest and longest:
        return size_with_aspect_ratio(height, width, int(shortest), int(longest))
    if shortest:
        if set(size) - {"shortest_edge"}:
            raise ValueError(f"unsupported resize size {size}")
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = int(shortest), int(int(shortest) * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if size.get("height") and size.get("width") and set(size) <= {"height", "width"}:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"unsupported resize size {size}; expected shortest_edge[/longest_edge] or height/width")


def size_with_aspect_ratio(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """transformers.image_transforms.get_size_with_aspect_ratio, restated: (height, width)."""
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


def crop_offset(length: int, crop: int, backend: str) -> int:
    """Where a centre-crop window of ``crop`` starts in a side of ``length`` pixels
    (negative: the image is padded and starts that many pixels into the crop)."""
    if crop <= length or backend == "pil":
        # The PIL backend pads by ceil(d / 2) before cropping, which floor division already
        # yields; torchvision pads by floor(d / 2).
        return (length - crop) // 2
    return -((crop - length) // 2)
