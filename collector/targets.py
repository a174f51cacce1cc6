"""Object token sets: which LM input positions cover an annotated object in the model's view."""

from __future__ import annotations

from typing import Any

import numpy as np

from collector.adapters import ImageTokenLayout, ModelAdapter
from db.geometry import cell_positions, cells_overlapping, dilate_cells, object_mask_in_view


def object_cells(
    segmentation: Any, adapter: ModelAdapter, width: int, height: int, grid_rows: int, grid_cols: int
) -> np.ndarray:
    """Grid cells (grid_rows, grid_cols) bool overlapping the object in the model's view.

    The mask is rasterised on the full ``width`` x ``height`` original image and mapped
    through the adapter's view geometry (its processor's real resize/crop/pad); empty when
    the crop cut the object away.
    """
    geometry = adapter.view_geometry(width, height)
    return cells_overlapping(object_mask_in_view(segmentation, geometry), grid_rows, grid_cols)


def object_positions(cells: np.ndarray, layout: ImageTokenLayout, rings: int) -> list[int]:
    """LM input positions of the object's cells dilated by `rings` rings of 8-neighbours."""
    if cells.shape != (layout.grid_rows, layout.grid_cols):
        raise ValueError(f"cells {cells.shape} do not match the {layout.grid_rows}x{layout.grid_cols} grid")
    return layout.positions_of_cells(cell_positions(dilate_cells(cells, rings)))
