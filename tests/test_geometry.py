"""Geometry checks against independent references: each adapter's
`image_processor_geometry` on processor settings beyond its tiny checkpoint's (the
per-family modules check `view_geometry` on the checkpoints themselves), and `db.geometry`'s
masks and cells.

References used: the real transformers image processors (LLaVA-1.5 settings read from
the shared config), pycocotools rasterisation at view scale, and hand arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from collector.adapters.llava import Llava15Adapter
from collector.adapters.llava_next import LlavaNextAdapter
from collector.adapters.qwen2_vl import Qwen2VLAdapter
from db.geometry import (
    GeometryError,
    ViewGeometry,
    cell_positions,
    cells_overlapping,
    dilate_cells,
    object_mask_in_view,
)
from tests.support.markers import BACKGROUND, check_markers, denormalised, render

transformers = pytest.importorskip("transformers")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LLAVA_CONFIG = SHARED_DATA / "real_configs" / "llava-hf__llava-1.5-7b-hf" / "preprocessor_config.json"
COCO_DIR = SHARED_DATA / "coco_sample"

SIZES = [(640, 480), (480, 640), (500, 333), (337, 1000), (336, 336), (100, 50)]


def _llava_config() -> dict:
    if not LLAVA_CONFIG.is_file():
        pytest.skip(f"shared LLaVA-1.5 preprocessor config not found at {LLAVA_CONFIG}")
    return json.loads(LLAVA_CONFIG.read_text())


@pytest.fixture(scope="module")
def llava_processor():
    return transformers.CLIPImageProcessorPil(**_llava_config())


def _view_pixels(processor, image: Image.Image) -> np.ndarray:
    """Run the real processor and undo normalisation; returns (H, W, 3) in 0..255."""
    out = processor(images=image, return_tensors="np")
    if "image_grid_thw" in out:  # Qwen2-VL: patchified, see _qwen_unpatchify
        pv = _qwen_unpatchify(np.asarray(out["pixel_values"], dtype=np.float64), out["image_grid_thw"][0], processor)
    else:
        pv = np.asarray(out["pixel_values"][0], dtype=np.float64)
        if pv.ndim == 4:  # LLaVA-NeXT: (tiles, 3, H, W); tile 0 is the base view
            pv = pv[0]
    return denormalised(pv, processor)


def _check_markers(processor, geometry: ViewGeometry, width: int, height: int) -> int:
    """The processor's own output for the marker image against the geometry's prediction."""
    return check_markers(_view_pixels(processor, render(width, height)), geometry, width, height)


# Hand arithmetic: short side -> 336, long side int(336 * long / short), then the crop
# starts at (resized - 336) // 2.
LLAVA_EXPECTED = {
    (640, 480): (448, 336, 56, 0),
    (480, 640): (336, 448, 0, 56),
    (500, 333): (504, 336, 84, 0),  # 336*500/333 = 504.50 -> 504
    (337, 1000): (336, 997, 0, 330),  # 336000/337 = 997.03 -> 997; (997-336)//2 = 330 (floor of 330.5)
    (336, 336): (336, 336, 0, 0),
    (100, 50): (672, 336, 168, 0),
}


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_llava15_geometry_matches_hand_arithmetic(llava_processor, size):
    width, height = size
    rw, rh, ox, oy = LLAVA_EXPECTED[size]
    g = Llava15Adapter.image_processor_geometry(llava_processor, width, height)
    assert (g.image_width, g.image_height, g.view_width, g.view_height) == (width, height, 336, 336)
    assert g.scale_x == pytest.approx(rw / width) and g.scale_y == pytest.approx(rh / height)
    assert (g.offset_x, g.offset_y) == (ox, oy)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_llava15_markers_land_where_predicted(llava_processor, size):
    g = Llava15Adapter.image_processor_geometry(llava_processor, *size)
    measured = _check_markers(llava_processor, g, *size)
    assert measured >= 4


def test_autoimageprocessor_gives_supported_class():
    _llava_config()
    processor = transformers.AutoImageProcessor.from_pretrained(LLAVA_CONFIG.parent)
    g = Llava15Adapter.image_processor_geometry(processor, 640, 480)
    assert (g.offset_x, g.offset_y, g.view_width) == (56, 0, 336)


@pytest.mark.parametrize("size", [(640, 480), (333, 500), (1000, 337)])
def test_clip_224_markers(size):
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    g = Llava15Adapter.image_processor_geometry(processor, *size)
    assert (g.view_width, g.view_height) == (224, 224)
    assert _check_markers(processor, g, *size) >= 4


def test_clip_224_hand_values():
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    g = Llava15Adapter.image_processor_geometry(processor, 1000, 337)
    # 224000/337 = 664.69 -> 664; (664-224)//2 = 220
    assert g.scale_x == pytest.approx(664 / 1000) and g.scale_y == pytest.approx(224 / 337)
    assert (g.offset_x, g.offset_y) == (220, 0)


@pytest.mark.parametrize("size", [(640, 480), (500, 333), (480, 640), (333, 500)])
def test_llava_pad_to_square_markers(size):
    cfg = {**_llava_config(), "do_pad": True}
    processor = transformers.LlavaImageProcessorPil(**cfg)
    g = Llava15Adapter.image_processor_geometry(processor, *size)
    assert _check_markers(processor, g, *size) >= 4

    view = _view_pixels(processor, render(*size))
    pad_colour = np.array([int(m * 255) for m in processor.image_mean], dtype=np.float64)
    u0, v0 = g.to_view(0, 0)
    u1, v1 = g.to_view(*size)
    band = view[: int(v0) - 3] if v0 > 0 else view[:, : int(u0) - 3]
    assert band.size and np.abs(band - pad_colour).max() < 1.5
    inside = view[int(v0) + 3 : int(v1) - 3, int(u0) + 3 : int(u1) - 3]
    assert inside.size and not (np.abs(inside - pad_colour).max(axis=-1) < 1.5).any()


def test_llava_pad_to_square_hand_values():
    processor = transformers.LlavaImageProcessorPil(**{**_llava_config(), "do_pad": True})
    g = Llava15Adapter.image_processor_geometry(processor, 640, 480)
    # pasted at (640-480)//2 = 80 in a 640 square, scaled by 336/640
    assert g.scale_x == g.scale_y == pytest.approx(0.525)
    assert (g.offset_x, g.offset_y) == (0, pytest.approx(-42.0))
    g = Llava15Adapter.image_processor_geometry(processor, 500, 333)
    # (500-333)//2 = 83 (not 84): the odd pixel of padding goes to the bottom
    assert g.offset_y == pytest.approx(-83 * 336 / 500)


def test_crop_larger_than_image_pads_like_pil_backend():
    processor = transformers.CLIPImageProcessorPil(do_resize=False, crop_size={"height": 256, "width": 256})
    g = Llava15Adapter.image_processor_geometry(processor, 301, 201)
    # x: (301-256)//2 = 22 cropped; y: 55 px of padding, image placed at ceil(55/2) = 28
    assert (g.scale_x, g.scale_y, g.offset_x, g.offset_y) == (1.0, 1.0, 22, -28)
    assert _check_markers(processor, g, 301, 201) >= 4
    view = _view_pixels(processor, render(301, 201))
    assert np.abs(view[:28]).max() < 1.0 and np.abs(view[28 + 201 :]).max() < 1.0
    assert np.abs(view[28, 100:150] - BACKGROUND).max() < 1.0


def test_shortest_and_longest_edge():
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 224, "longest_edge": 300}, do_center_crop=False
    )
    g = Llava15Adapter.image_processor_geometry(processor, 337, 1000)
    # 1000/337*224 > 300, so the short side becomes round(300*337/1000) = 101 and the long int(101.1*1000/337) = 300
    assert (g.view_width, g.view_height) == (101, 300)
    assert _check_markers(processor, g, 337, 1000) >= 4
    g = Llava15Adapter.image_processor_geometry(processor, 640, 480)
    assert (g.view_width, g.view_height) == (298, 224)
    assert _check_markers(processor, g, 640, 480) >= 4


def test_unsupported_configurations_raise():
    class NotAProcessor:
        pass

    with pytest.raises(ValueError, match="unsupported image processor"):
        Llava15Adapter.image_processor_geometry(NotAProcessor(), 10, 10)
    processor = transformers.CLIPImageProcessorPil(size={"max_height": 100, "max_width": 100})
    with pytest.raises(ValueError, match="unsupported resize size"):
        Llava15Adapter.image_processor_geometry(processor, 640, 480)
    processor = transformers.CLIPImageProcessorPil(do_pad=True, pad_size={"height": 240, "width": 256})
    with pytest.raises(ValueError, match="do_pad"):
        Llava15Adapter.image_processor_geometry(processor, 640, 480)
    with pytest.raises(ValueError):
        Llava15Adapter.image_processor_geometry(transformers.CLIPImageProcessorPil(), 0, 480)


def test_to_view_and_back():
    g = ViewGeometry(640, 480, 336, 336, 0.7, 0.7, 56.0, 0.0)
    assert g.to_view(80, 0) == pytest.approx((0.0, 0.0))
    assert g.to_view(560, 480) == pytest.approx((336.0, 336.0))
    assert g.to_image(*g.to_view(123.4, 56.7)) == pytest.approx((123.4, 56.7))


# --- object masks -------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_sample():
    path = COCO_DIR / "instances_sample.json"
    if not path.is_file():
        pytest.skip(f"shared COCO sample not found at {path}")
    data = json.loads(path.read_text())
    return data, {a["id"]: a for a in data["annotations"]}


def _reference_view_mask(polygons, g: ViewGeometry) -> np.ndarray:
    """Transform polygon vertices into the view and let pycocotools rasterise (it clips, never drops)."""
    moved = []
    for poly in polygons:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        xy[:, 0] = xy[:, 0] * g.scale_x - g.offset_x
        xy[:, 1] = xy[:, 1] * g.scale_y - g.offset_y
        moved.append(xy.ravel().tolist())
    rle = mask_utils.merge(mask_utils.frPyObjects(moved, g.view_height, g.view_width))
    return mask_utils.decode(rle).astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_remote_mask_area_and_reference(llava_processor, coco_sample):
    _, anns = coco_sample
    g = Llava15Adapter.image_processor_geometry(llava_processor, 640, 480)
    ann = anns[1108446]
    assert ann["area"] == pytest.approx(2121.0, abs=1)
    m = object_mask_in_view(ann["segmentation"], g)
    assert m.shape == (336, 336) and m.dtype == bool
    # entirely inside the crop, so 0.7 * 0.7 = 0.49 of the original area (~1039 px)
    assert m.sum() == pytest.approx(ann["area"] * g.scale_x * g.scale_y, rel=0.03)
    assert _iou(m, _reference_view_mask(ann["segmentation"], g)) > 0.95


def test_remote_partly_cut_by_crop(llava_processor, coco_sample):
    _, anns = coco_sample
    ann = anns[1110067]  # x from 41.9 to 175.0; the crop starts at x = 80
    g = Llava15Adapter.image_processor_geometry(llava_processor, 640, 480)
    m = object_mask_in_view(ann["segmentation"], g)
    ref = _reference_view_mask(ann["segmentation"], g)
    assert m[:, 0].any() and ref[:, 0].any()
    assert _iou(m, ref) > 0.9
    full = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], 480, 640))).astype(bool)
    assert m.sum() == pytest.approx(full[:, 80:].sum() * 0.49, rel=0.05)
    assert m.sum() < 0.49 * full.sum() * 0.9


@pytest.mark.parametrize("ann_id", [1605237, 1612051])
def test_objects_spanning_the_crop_keep_inside_part(llava_processor, coco_sample, ann_id):
    _, anns = coco_sample
    ann = anns[ann_id]
    g = Llava15Adapter.image_processor_geometry(llava_processor, 640, 480)
    m = object_mask_in_view(ann["segmentation"], g)
    ref = _reference_view_mask(ann["segmentation"], g)
    assert _iou(m, ref) > 0.97
    assert m[:, 0].any() and m[:, -1].any()

    # What the original research code did: drop vertices outside the crop, then rasterise.
    kept = []
    for poly in ann["segmentation"]:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        xy = xy[(xy[:, 0] >= 80) & (xy[:, 0] < 560)]
        xy[:, 0] = xy[:, 0] * 0.7 - 56
        xy[:, 1] *= 0.7
        if len(xy) >= 3:
            kept.append(xy.ravel().tolist())
    if kept:
        dropped = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(kept, 336, 336))).astype(bool)
    else:  # the bed is a 4-vertex polygon with every vertex outside the crop
        dropped = np.zeros((336, 336), dtype=bool)
    assert (ref & ~dropped).sum() > 500  # the vertex-dropping approach loses a visible part


def test_rle_inputs_match_polygons(llava_processor, coco_sample):
    _, anns = coco_sample
    ann = anns[2190839]
    g = Llava15Adapter.image_processor_geometry(llava_processor, 640, 480)
    expected = object_mask_in_view(ann["segmentation"], g)
    full = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], 480, 640)))
    compressed = mask_utils.encode(np.asfortranarray(full))
    as_str = {"size": compressed["size"], "counts": compressed["counts"].decode()}
    flat = full.ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    uncompressed = {"size": [480, 640], "counts": counts}
    for rle in (compressed, as_str, uncompressed):
        assert np.array_equal(object_mask_in_view(rle, g), expected)
    with pytest.raises(GeometryError):
        object_mask_in_view({"size": [100, 100], "counts": counts}, g)


def test_mask_hand_cases():
    single = np.zeros((4, 4), dtype=np.uint8)
    single[2, 1] = 1  # row 2, column 1
    rle = mask_utils.encode(np.asfortranarray(single))

    up = ViewGeometry(4, 4, 8, 8, 2.0, 2.0, 0.0, 0.0)
    m = object_mask_in_view(rle, up)
    expected = np.zeros((8, 8), dtype=bool)
    expected[4:6, 2:4] = True
    assert np.array_equal(m, expected)

    padded = ViewGeometry(4, 4, 6, 6, 1.0, 1.0, -1.0, -1.0)
    m = object_mask_in_view(rle, padded)
    expected = np.zeros((6, 6), dtype=bool)
    expected[3, 2] = True
    assert np.array_equal(m, expected)

    cropped = ViewGeometry(4, 4, 2, 2, 1.0, 1.0, 1.0, 2.0)
    assert np.array_equal(object_mask_in_view(rle, cropped), np.array([[True, False], [False, False]]))

    full = ViewGeometry(4, 4, 4, 4, 1.0, 1.0, 0.0, 0.0)
    assert not object_mask_in_view([], full).any()
    with pytest.raises(GeometryError):
        object_mask_in_view([[0.0, 0.0, 1.0, 1.0]], full)


def test_llava_pad_mask_is_false_in_padding(coco_sample):
    _, anns = coco_sample
    processor = transformers.LlavaImageProcessorPil(**{**_llava_config(), "do_pad": True})
    g = Llava15Adapter.image_processor_geometry(processor, 640, 480)
    m = object_mask_in_view(anns[1612051]["segmentation"], g)  # the bed covers almost the whole image
    assert not m[:42].any() and not m[336 - 42 :].any()
    assert m[43:293].any(axis=1).all()
    assert _iou(m, _reference_view_mask(anns[1612051]["segmentation"], g)) > 0.97


# --- cells --------------------------------------------------------------------------


def _single_pixel(h: int, w: int, y: int, x: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y, x] = True
    return m


@pytest.mark.parametrize(
    "pixel, cell",
    [(0, 0), (13, 0), (14, 1), (167, 11), (168, 12), (321, 22), (322, 23), (335, 23)],
)
def test_cells_336_grid_24(pixel, cell):
    cells = cells_overlapping(_single_pixel(336, 336, pixel, 335 - pixel), 24, 24)
    assert cells.shape == (24, 24)
    assert cell_positions(cells) == [cell * 24 + (23 - cell)]


@pytest.mark.parametrize(
    # s = 100, grid 24: cell i spans [4.1667 i, 4.1667 (i + 1)); pixel p -> floor(24 p / 100)
    "pixel, cell",
    [(0, 0), (4, 0), (5, 1), (8, 1), (9, 2), (12, 2), (13, 3), (50, 12), (95, 22), (96, 23), (99, 23)],
)
def test_cells_side_not_divisible(pixel, cell):
    cells = cells_overlapping(_single_pixel(100, 100, pixel, 0), 24, 24)
    assert cell_positions(cells) == [cell * 24]
    cells = cells_overlapping(_single_pixel(100, 100, 0, pixel), 24, 24)
    assert cell_positions(cells) == [cell]


def test_cells_rectangular_and_block():
    m = np.zeros((10, 7), dtype=bool)
    m[4:6, 2:5] = True  # rows 4..5 -> 4*2//10=0, 5*2//10=1; cols 2..4 -> 2*3//7=0, 3*3//7=1, 4*3//7=1
    cells = cells_overlapping(m, 2, 3)
    assert cells.tolist() == [[True, True, False], [True, True, False]]
    assert not cells_overlapping(np.zeros((336, 336), dtype=bool), 24, 24).any()
    assert cells_overlapping(np.ones((336, 336), dtype=bool), 24, 24).all()
    with pytest.raises(ValueError):
        cells_overlapping(np.zeros((10, 10), dtype=bool), 24, 24)


def test_dilate_corner_edge_centre():
    cells = np.zeros((5, 5), dtype=bool)
    cells[0, 0] = True
    assert cell_positions(dilate_cells(cells, 1)) == [0, 1, 5, 6]
    assert cell_positions(dilate_cells(cells, 2)) == [0, 1, 2, 5, 6, 7, 10, 11, 12]

    cells = np.zeros((5, 5), dtype=bool)
    cells[0, 2] = True
    assert cell_positions(dilate_cells(cells, 1)) == [1, 2, 3, 6, 7, 8]
    assert cell_positions(dilate_cells(cells, 2)) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]

    cells = np.zeros((5, 5), dtype=bool)
    cells[2, 2] = True
    assert cell_positions(dilate_cells(cells, 1)) == [6, 7, 8, 11, 12, 13, 16, 17, 18]
    assert dilate_cells(cells, 2).all()

    cells = np.zeros((3, 6), dtype=bool)
    cells[2, 5] = True
    assert cell_positions(dilate_cells(cells, 1)) == [10, 11, 16, 17]


def test_dilate_zero_is_copy_and_negative_rejected():
    cells = np.zeros((4, 4), dtype=bool)
    cells[1, 2] = True
    out = dilate_cells(cells, 0)
    assert out is not cells and np.array_equal(out, cells)
    out[0, 0] = True
    assert not cells[0, 0]
    with pytest.raises(ValueError):
        dilate_cells(cells, -1)


def test_cell_positions_row_major():
    cells = np.array([[False, True, False], [True, False, True]])
    assert cell_positions(cells) == [1, 3, 5]
    assert cell_positions(np.zeros((24, 24), dtype=bool)) == []
    assert all(isinstance(i, int) for i in cell_positions(cells))


def _reference_cells(mask: np.ndarray) -> np.ndarray:
    """24x24 cells of a 336x336 mask by explicit 14-pixel slices."""
    return np.array([[mask[14 * r : 14 * r + 14, 14 * c : 14 * c + 14].any() for c in range(24)] for r in range(24)])


def test_end_to_end_cells_against_reference(llava_processor, coco_sample):
    _, anns = coco_sample
    g = Llava15Adapter.image_processor_geometry(llava_processor, 640, 480)
    for ann in anns.values():
        ours = cells_overlapping(object_mask_in_view(ann["segmentation"], g), 24, 24)
        ref = _reference_cells(_reference_view_mask(ann["segmentation"], g))
        assert (ours ^ ref).sum() <= 1, ann["id"]

    # remote 1108446: bbox maps to u 177.0..204.1 (cols 12..14), v 55.7..130.1 (rows 3..9);
    # the object only grazes row 3 by 0.3 px, so nearest sampling starts at row 4.
    ours = cells_overlapping(object_mask_in_view(anns[1108446]["segmentation"], g), 24, 24)
    rows, cols = np.nonzero(ours)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 9, 12, 14)
    assert ours.sum() == 13


def test_torchvision_backend_pads_with_floor():
    # torchvision is not installed here, so this mirrors TorchvisionBackend.center_crop by hand:
    # padding (crop - side) // 2 on the left/top, unlike the PIL backend's ceil.
    fake = type(
        "CLIPImageProcessor",
        (),
        {
            "backend": "torchvision",
            "do_resize": False,
            "do_center_crop": True,
            "crop_size": {"height": 256, "width": 256},
            "do_pad": False,
        },
    )()
    g = Llava15Adapter.image_processor_geometry(fake, 301, 201)
    assert (g.offset_x, g.offset_y) == (22, -27)


# --- Qwen2-VL / Qwen2.5-VL (smart_resize, no crop) ----------------------------------------


def _qwen_unpatchify(patches: np.ndarray, grid_thw, processor) -> np.ndarray:
    """(t*h*w, 3*tp*p*p) patches, laid out (h/m, w/m, m, m, 3, tp, p, p), back to (3, h*p, w*p)."""
    t, h, w = (int(v) for v in grid_thw)
    p, m, tp = processor.patch_size, processor.merge_size, processor.temporal_patch_size
    x = patches.reshape(t, h // m, w // m, m, m, 3, tp, p, p)[0, :, :, :, :, :, 0]
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, h * p, w * p)


def _qwen_processor(**overrides):
    # The real Qwen2-VL / Qwen2.5-VL preprocessor settings (min_pixels 3136, max_pixels 12845056).
    settings = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2)
    return transformers.Qwen2VLImageProcessorPil(**{**settings, **overrides})


# (width, height) -> (view width, view height), by hand: each side round(side / 28) * 28 unless
# the pixel count leaves [min_pixels, max_pixels].
QWEN_EXPECTED = {
    (640, 480): (644, 476),  # 640/28 = 22.86 -> 23; 480/28 = 17.14 -> 17
    (480, 640): (476, 644),
    (500, 333): (504, 336),  # 17.86 -> 18; 11.89 -> 12
    (337, 1000): (336, 1008),  # 12.04 -> 12; 35.71 -> 36
    (100, 50): (112, 56),  # 3.57 -> 4; 1.79 -> 2
}


@pytest.mark.parametrize("size", list(QWEN_EXPECTED), ids=[f"{w}x{h}" for w, h in QWEN_EXPECTED])
def test_qwen2_vl_geometry_hand_values_and_markers(size):
    processor = _qwen_processor()
    g = Qwen2VLAdapter.image_processor_geometry(processor, *size)
    assert (g.view_width, g.view_height) == QWEN_EXPECTED[size]
    assert (g.offset_x, g.offset_y) == (0.0, 0.0)
    assert g.scale_x == pytest.approx(g.view_width / size[0]) and g.scale_y == pytest.approx(g.view_height / size[1])
    assert _check_markers(processor, g, *size) >= 4


def test_qwen2_vl_geometry_max_and_min_pixels():
    # Too many pixels: beta = sqrt(1200*900 / 200704) = 2.3197; floor(900/2.3197/28)*28 = 364,
    # floor(1200/2.3197/28)*28 = 504.
    processor = _qwen_processor(max_pixels=448 * 448)
    g = Qwen2VLAdapter.image_processor_geometry(processor, 1200, 900)
    assert (g.view_width, g.view_height) == (504, 364)
    assert _check_markers(processor, g, 1200, 900) >= 4
    # Too few: 60x40 rounds to 56x28 = 1568 < 3136; beta = sqrt(3136/2400) = 1.1431;
    # ceil(40*1.1431/28)*28 = 56, ceil(60*1.1431/28)*28 = 84.
    processor = _qwen_processor()
    g = Qwen2VLAdapter.image_processor_geometry(processor, 60, 40)
    assert (g.view_width, g.view_height) == (84, 56)
    view = _view_pixels(processor, render(60, 40))
    assert view.shape == (56, 84, 3)


# --- LLaVA-NeXT base view (the whole image resized to 336x336) ------------------------------


def _llava_next_processor():
    # llava-v1.6 settings: shortest_edge 336, crop 336, the five grid pinpoints, do_pad.
    return transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        do_pad=True,
    )


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 337), (336, 336)])
def test_llava_next_base_view_markers(size):
    processor = _llava_next_processor()
    g = LlavaNextAdapter.image_processor_geometry(processor, *size)
    assert (g.view_width, g.view_height, g.offset_x, g.offset_y) == (336, 336, 0, 0)
    assert g.scale_x == pytest.approx(336 / size[0]) and g.scale_y == pytest.approx(336 / size[1])
    assert _check_markers(processor, g, *size) >= 4
