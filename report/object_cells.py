"""Annotated objects on the patch grid, computed once per (run, image) per build.

The object cells of a category are the patch cells overlapping its non-crowd annotation
masks in the model's view (db.geometry: the same rasterisation the collector uses to
choose object tokens). The lens page data (`objects`) and the quantitative page both need
them; rasterising masks is the slow part, so the build keeps one `ObjectCells` and both
read from it.

Why the membership is computed here and not stored: the database already holds
everything it depends on (`annotations.segmentation`, `images` size, `image_views`
geometry), so a derived table would be a second copy that can drift from its inputs (and
the collector would have to know about the report). Annotations whose segmentation
db.geometry cannot use contribute no cells.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from db import queries
from db.geometry import ViewGeometry, object_cells_by_category, view_outline
from db.store import ResultsDB


class ObjectCells:
    """Object cells and outlines of every (run, image), each rasterised at most once."""

    def __init__(self, geometries: dict[tuple[str, int], ViewGeometry], annotations: dict[int, list[dict[str, Any]]]):
        self._geometries = geometries
        self._annotations = annotations
        self._cells: dict[tuple[str, int, int, int], dict[str, np.ndarray]] = {}

    @classmethod
    def from_db(cls, db: ResultsDB) -> ObjectCells:
        return cls(queries.view_geometries(db), queries.annotations_by_image(db))

    def annotated(self, run_id: str, image_id: int) -> bool:
        """Whether the image has annotations and a recorded view to map them into."""
        return (run_id, image_id) in self._geometries and bool(self._annotations.get(image_id))

    def cells(self, run_id: str, image_id: int, grid_rows: int, grid_cols: int) -> dict[str, np.ndarray]:
        """Category -> (grid_rows, grid_cols) bool cells; empty without a view or annotations."""
        key = (run_id, image_id, grid_rows, grid_cols)
        if key not in self._cells:
            self._cells[key] = (
                object_cells_by_category(
                    self._annotations[image_id], self._geometries[(run_id, image_id)], grid_rows, grid_cols
                ).cells
                if self.annotated(run_id, image_id)
                else {}
            )
        return self._cells[key]

    def page_objects(self, run_id: str, image_id: int, grid_rows: int, grid_cols: int) -> list[dict[str, Any]]:
        """The lens data file's `objects` (see report/lens_codec.py): per category, its flat
        cell indices and each annotation's outline in view pixels."""
        if not self.annotated(run_id, image_id):
            return []
        geometry = self._geometries[(run_id, image_id)]
        cells = self.cells(run_id, image_id, grid_rows, grid_cols)
        out: dict[str, dict[str, Any]] = {}
        for ann in self._annotations[image_id]:
            entry = out.setdefault(ann["category"], {"category": ann["category"], "cells": [], "outlines": []})
            outline = view_outline(ann["segmentation"], ann["bbox"], geometry)
            entry["outlines"].append({"annotation_id": ann["annotation_id"], "iscrowd": ann["iscrowd"], **outline})
        for category, entry in out.items():
            if category in cells:
                rows, cols = np.nonzero(cells[category])
                entry["cells"] = (rows * grid_cols + cols).astype(int).tolist()
        return list(out.values())
