"""The one meaning of `image_views`: original image -> model view -> patch grid, and masks.

Torch-free and family-free, so the collector (which writes views) and the report (which
reads them) share one implementation: the collector derives a view from the model's image
processor through its adapter, the report rebuilds it from the `image_views` row.

Coordinates are continuous with pixel ``i`` spanning ``[i, i + 1)``; a resize from
``n`` to ``m`` pixels therefore maps ``x`` to ``x * m / n`` (this is how PIL's
resampling kernels place output pixel centres).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

Segmentation = Sequence[Sequence[float]] | Mapping[str, Any]


class GeometryError(ValueError):
    """A segmentation or geometry that cannot be interpreted (one set of errors for every client)."""


@dataclass(frozen=True)
class ViewGeometry:
    """Affine map from an original image to the model's input view.

    Original coordinate ``(x, y)`` maps to view coordinate
    ``(x * scale_x - offset_x, y * scale_y - offset_y)``. Positive offsets mean the
    view is cropped out of the resized image; negative offsets mean the image was
    padded (it starts ``-offset`` pixels into the view).
    """

    image_width: int
    image_height: int
    view_width: int
    view_height: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def to_view(self, x: float, y: float) -> tuple[float, float]:
        """Map an original-image coordinate to a view coordinate."""
        return (x * self.scale_x - self.offset_x, y * self.scale_y - self.offset_y)

    def to_image(self, u: float, v: float) -> tuple[float, float]:
        """Inverse of :meth:`to_view`."""
        return ((u + self.offset_x) / self.scale_x, (v + self.offset_y) / self.scale_y)


def parse_segmentation(value: Any) -> Segmentation:
    """A segmentation as stored (JSON text in `annotations.segmentation`) or already parsed."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise GeometryError(f"segmentation is not valid JSON: {error}") from None
    return value


def decode_mask(segmentation: Any, width: int, height: int) -> np.ndarray:
    """Rasterise a COCO segmentation (polygons, or RLE with list or compressed counts).

    Returns a bool array of shape ``(height, width)``. Raises `GeometryError` for an RLE
    whose size is not the image's, or a polygon with an odd number or fewer than 6
    coordinates.
    """
    segmentation = parse_segmentation(segmentation)
    if isinstance(segmentation, Mapping):
        if "counts" not in segmentation or "size" not in segmentation:
            raise GeometryError("RLE segmentation needs 'counts' and 'size'")
        rle_h, rle_w = (int(v) for v in segmentation["size"])
        if (rle_h, rle_w) != (height, width):
            raise GeometryError(f"RLE size {rle_w}x{rle_h} does not match image {width}x{height}")
        if isinstance(segmentation["counts"], list):
            rles = mask_utils.frPyObjects(dict(segmentation), height, width)
        else:
            counts = segmentation["counts"]
            rles = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        polygons = [list(map(float, p)) for p in segmentation or []]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        if any(len(p) < 6 or len(p) % 2 for p in polygons):
            raise GeometryError("each polygon needs an even number (>= 6) of coordinates")
        rles = mask_utils.frPyObjects(polygons, height, width)
    if isinstance(rles, list):
        rles = mask_utils.merge(rles)
    return mask_utils.decode(rles).astype(bool)


def mask_in_view(mask: np.ndarray, geometry: ViewGeometry) -> np.ndarray:
    """Map an original-resolution ``(image_height, image_width)`` bool mask into the view.

    Each view pixel takes the value of the original pixel under its centre (nearest
    neighbour); view pixels outside the image (padding) are False.
    Returns a bool array of shape ``(geometry.view_height, geometry.view_width)``.
    """
    src_x = np.floor((np.arange(geometry.view_width) + 0.5 + geometry.offset_x) / geometry.scale_x).astype(np.int64)
    src_y = np.floor((np.arange(geometry.view_height) + 0.5 + geometry.offset_y) / geometry.scale_y).astype(np.int64)
    ok_x = (src_x >= 0) & (src_x < mask.shape[1])
    ok_y = (src_y >= 0) & (src_y < mask.shape[0])
    out = np.zeros((geometry.view_height, geometry.view_width), dtype=bool)
    out[np.ix_(ok_y, ok_x)] = mask[np.ix_(src_y[ok_y], src_x[ok_x])]
    return out


def object_mask_in_view(segmentation: Any, geometry: ViewGeometry) -> np.ndarray:
    """Rasterise a segmentation at full original resolution and map it into the view.

    Decoding at full resolution means parts outside a later crop are never distorted.
    Returns a bool array of shape ``(geometry.view_height, geometry.view_width)``.
    """
    full = decode_mask(segmentation, geometry.image_width, geometry.image_height)
    return mask_in_view(full, geometry)


def cells_overlapping(mask_view: np.ndarray, grid_rows: int, grid_cols: int) -> np.ndarray:
    """Patch-grid cells containing at least one mask pixel.

    ``mask_view`` has shape ``(view_height, view_width)``. Pixel row ``p`` belongs to
    cell row ``p * grid_rows // view_height`` (cell ``i`` spans
    ``[i * H / grid_rows, (i + 1) * H / grid_rows)``), likewise for columns, so sides
    not divisible by the grid are handled exactly.

    Returns a bool array of shape ``(grid_rows, grid_cols)``.
    """
    mask_view = np.asarray(mask_view)
    if mask_view.ndim != 2:
        raise GeometryError(f"mask_view must be 2-D, got shape {mask_view.shape}")
    if grid_rows <= 0 or grid_cols <= 0:
        raise GeometryError("grid dimensions must be positive")
    height, width = mask_view.shape
    if height < grid_rows or width < grid_cols:
        raise GeometryError(f"view {width}x{height} is smaller than the grid {grid_cols}x{grid_rows}")
    ys, xs = np.nonzero(mask_view)
    cells = np.zeros((grid_rows, grid_cols), dtype=bool)
    cells[ys * grid_rows // height, xs * grid_cols // width] = True
    return cells


def dilate_cells(cells: np.ndarray, rings: int) -> np.ndarray:
    """Grow a ``(rows, cols)`` bool cell selection by ``rings`` rings of 8-neighbours.

    Equivalent to selecting every cell within Chebyshev distance ``rings`` of a
    selected cell. Returns a new ``(rows, cols)`` bool array.
    """
    if rings < 0:
        raise GeometryError(f"rings must be >= 0, got {rings}")
    out = np.array(cells, dtype=bool, copy=True)
    if out.ndim != 2:
        raise GeometryError(f"cells must be 2-D, got shape {out.shape}")
    rows, cols = out.shape
    for _ in range(rings):
        padded = np.pad(out, 1)
        grown = np.zeros_like(out)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                grown |= padded[dy : dy + rows, dx : dx + cols]
        out = grown
    return out


def cell_positions(cells: np.ndarray) -> list[int]:
    """Sorted row-major flat indices ``r * cols + c`` of the selected cells of a ``(rows, cols)`` array."""
    cells = np.asarray(cells, dtype=bool)
    if cells.ndim != 2:
        raise GeometryError(f"cells must be 2-D, got shape {cells.shape}")
    return [int(i) for i in np.flatnonzero(cells)]


def view_outline(segmentation: Any, bbox: Sequence[float] | None, geometry: ViewGeometry) -> dict[str, Any]:
    """An annotation's outline in view pixels: polygons as flat [u0, v0, u1, v1, ...] lists
    (rounded to 0.1 px), or for RLE masks its bbox ``[u, v, w, h]``."""
    segmentation = parse_segmentation(segmentation)
    if isinstance(segmentation, list) and segmentation:
        polygons = []
        for polygon in segmentation:
            coords = [float(v) for v in polygon]
            points: list[float] = []
            for x, y in zip(coords[0::2], coords[1::2]):
                u, v = geometry.to_view(x, y)
                points += [round(u, 1), round(v, 1)]
            if len(points) >= 6:
                polygons.append(points)
        return {"polygons": polygons, "bbox": None}
    x, y, w, h = (float(v) for v in (bbox or [0, 0, 0, 0]))
    u0, v0 = geometry.to_view(x, y)
    u1, v1 = geometry.to_view(x + w, y + h)
    return {"polygons": [], "bbox": [round(u0, 1), round(v0, 1), round(u1 - u0, 1), round(v1 - v0, 1)]}


@dataclass(frozen=True)
class ObjectCells:
    """Per category, the union of its non-crowd annotations' overlapping cells.

    cells: category -> (grid_rows, grid_cols) bool; invalid: annotation id -> why its
    segmentation could not be used (those annotations contribute no cells).
    """

    cells: dict[str, np.ndarray]
    invalid: dict[int, str]


def object_cells_by_category(
    annotations: Iterable[Mapping[str, Any]], geometry: ViewGeometry, grid_rows: int, grid_cols: int
) -> ObjectCells:
    """Object cells of every category of one image (keys of an annotation: `annotation_id`
    or `id`, `category`, `iscrowd`, `segmentation`)."""
    cells: dict[str, np.ndarray] = {}
    invalid: dict[int, str] = {}
    for ann in annotations:
        if ann.get("iscrowd"):
            continue
        try:
            mask = object_mask_in_view(ann["segmentation"], geometry)
        except (GeometryError, KeyError, TypeError) as error:
            invalid[int(ann.get("annotation_id", ann.get("id", -1)))] = str(error)
            continue
        grid = cells_overlapping(mask, grid_rows, grid_cols)
        category = str(ann["category"])
        cells[category] = cells[category] | grid if category in cells else grid
    return ObjectCells(cells, invalid)
