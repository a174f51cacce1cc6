"""Marker images: where coloured blocks of an original image land in a model's view,
measured in the view and compared with a `ViewGeometry`'s prediction.

The reference is the image processor's own output (never the geometry code): blocks are
found by colour, and their edges located to sub-pixel precision where a symmetric
resampling kernel puts the 50% level of a step exactly on the edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from db.geometry import ViewGeometry

BACKGROUND = (40, 40, 40)
COLOURS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
    (0, 255, 255),
    (255, 255, 255),
]
# Fractions of (W, H): two corner blocks, four blocks that straddle typical centre-crop
# boundaries for landscape/portrait images, and one central block.
LAYOUT = [
    (0.00, 0.00, 0.08, 0.08),
    (0.92, 0.92, 1.00, 1.00),
    (0.10, 0.45, 0.20, 0.55),
    (0.80, 0.45, 0.90, 0.55),
    (0.45, 0.10, 0.55, 0.20),
    (0.45, 0.80, 0.55, 0.90),
    (0.40, 0.40, 0.60, 0.60),
]


def markers(width: int, height: int) -> list[tuple[int, int, int, int, tuple[int, int, int]]]:
    """(x0, y0, x1, y1, colour) of every block in a ``width`` x ``height`` image."""
    out = []
    for (fx0, fy0, fx1, fy1), colour in zip(LAYOUT, COLOURS):
        out.append((round(fx0 * width), round(fy0 * height), round(fx1 * width), round(fy1 * height), colour))
    return out


def render(width: int, height: int) -> Image.Image:
    """The marker image: coloured blocks on a dark background."""
    arr = np.empty((height, width, 3), dtype=np.uint8)
    arr[:] = BACKGROUND
    for x0, y0, x1, y1, colour in markers(width, height):
        arr[y0:y1, x0:x1] = colour
    return Image.fromarray(arr)


def denormalised(pixels: Any, image_processor: Any) -> np.ndarray:
    """(3, H, W) normalised pixel values -> (H, W, 3) float64 in 0..255, not rounded."""
    pv = np.asarray(pixels, dtype=np.float64)
    mean = np.asarray(image_processor.image_mean, dtype=np.float64)[:, None, None]
    std = np.asarray(image_processor.image_std, dtype=np.float64)[:, None, None]
    return np.moveaxis((pv * std + mean) * 255.0, 0, -1)


def adapter_view(adapter: Any, inputs: Mapping[str, Any]) -> np.ndarray:
    """(H, W, 3) in 0..255: the view the model receives (`view_pixels` of `build_inputs`)."""
    return denormalised(adapter.view_pixels(inputs).detach().float().cpu().numpy(), adapter.processor.image_processor)


def _crossing(profile: np.ndarray, lo: float, hi: float, rising: bool, near: float, window: int = 8) -> float | None:
    """Sub-pixel position (continuous coordinates) where ``profile`` crosses the midpoint near ``near``."""
    start = max(int(near) - window, 0)
    p = profile[start : int(near) + window + 1]
    if not rising:
        p = p[::-1]
    mid = (lo + hi) / 2.0
    idx = np.nonzero((p[:-1] < mid) & (p[1:] >= mid))[0]
    if len(idx) != 1:
        return None
    j = idx[0]
    pos = j + 0.5 + (mid - p[j]) / (p[j + 1] - p[j])
    return start + (pos if rising else len(p) - pos)


def check_markers(view: np.ndarray, geometry: ViewGeometry, width: int, height: int) -> int:
    """Compare every marker found in ``view`` (H, W, 3, 0..255, the processed `render(width,
    height)`) with the geometry's prediction; returns how many interior edges were located
    to sub-pixel precision."""
    assert view.shape == (geometry.view_height, geometry.view_width, 3)
    vh, vw = view.shape[:2]
    measured = 0
    for x0, y0, x1, y1, colour in markers(width, height):
        u0, v0 = geometry.to_view(x0, y0)
        u1, v1 = geometry.to_view(x1, y1)
        hit = np.all(np.abs(view - np.asarray(colour)) < 100, axis=-1)
        cu0, cv0, cu1, cv1 = max(u0, 0), max(v0, 0), min(u1, vw), min(v1, vh)
        if cu1 - cu0 < -1 or cv1 - cv0 < -1:
            assert not hit.any(), f"marker {colour} should be outside the view but was found"
            continue
        if cu1 - cu0 < 2 or cv1 - cv0 < 2:
            continue
        ys, xs = np.nonzero(hit)
        assert len(xs), f"marker {colour} missing; expected at u[{u0:.1f},{u1:.1f}) v[{v0:.1f},{v1:.1f})"
        assert abs(xs.min() - cu0) <= 1.5 and abs(xs.max() + 1 - cu1) <= 1.5, (colour, xs.min(), xs.max(), cu0, cu1)
        assert abs(ys.min() - cv0) <= 1.5 and abs(ys.max() + 1 - cv1) <= 1.5, (colour, ys.min(), ys.max(), cv0, cv1)

        # Sub-pixel edge positions: a symmetric resampling kernel puts the 50% level of
        # a step exactly on the edge, so this detects half-pixel and off-by-one errors.
        channel = int(np.argmax(colour))
        row = view[int((cv0 + cv1) / 2), :, channel]
        col = view[:, int((cu0 + cu1) / 2), channel]
        bg, fg = BACKGROUND[channel], colour[channel]
        edges = [
            (x0, u0, row, True),
            (x1, u1, row, False),
            (y0, v0, col, True),
            (y1, v1, col, False),
        ]
        for orig, predicted, profile, rising in edges:
            limit = width if profile is row else height
            if not (0 < orig < limit) or not (3 <= predicted <= len(profile) - 3):
                continue
            found = _crossing(profile, bg, fg, rising, predicted)
            assert found is not None, (colour, orig, predicted)
            assert abs(found - predicted) <= 0.25, f"marker {colour} edge at {found:.3f}, predicted {predicted:.3f}"
            measured += 1
    return measured


def check_adapter_view_geometry(adapter: Any, width: int, height: int) -> int:
    """`adapter.view_geometry(width, height)` against the view the model receives for the
    marker image (through `build_inputs` and `view_pixels`); returns the edges measured."""
    geometry = adapter.view_geometry(width, height)
    assert (geometry.image_width, geometry.image_height) == (width, height)
    inputs = adapter.build_inputs(render(width, height), "Describe the image.")
    return check_markers(adapter_view(adapter, inputs), geometry, width, height)
