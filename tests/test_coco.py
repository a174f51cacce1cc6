from __future__ import annotations

import json
from pathlib import Path

import pytest

from collector.coco import AblationTarget, load_coco, select_targets

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_sample" / "instances_sample.json"


@pytest.fixture(scope="module")
def sample():
    if not SAMPLE.is_file():
        pytest.skip(f"shared COCO sample not found at {SAMPLE}")
    return load_coco(SAMPLE)


def test_sample_loads(sample):
    assert sample.getImgIds() == [39769]
    assert len(sample.getAnnIds(imgIds=39769)) == 6


def test_sample_excluded_by_annotation_count(sample):
    assert select_targets(sample) == []
    assert select_targets(sample, max_annotations=5, area_range=(0.0, 1e9)) == []


def test_sample_with_six_annotations_has_no_target_in_paper_range(sample):
    # cats (17) x2 and remotes (75, areas 2121 and 4053) x2 are not single instances;
    # couch (63, 176278) and bed (65, 301553) are, but far outside (1000, 2000).
    assert select_targets(sample, max_annotations=6) == []
    assert select_targets(sample, max_annotations=6, area_range=(2000.0, 2200.0)) == []


def test_sample_single_instance_categories(sample):
    [couch] = select_targets(sample, max_annotations=6, area_range=(100_000.0, 200_000.0))
    assert couch == AblationTarget(
        image_id=39769,
        file_name="000000039769.png",
        width=640,
        height=480,
        annotation_id=1605237,
        category_id=63,
        category="couch",
        area=pytest.approx(176277.5527),
        segmentation=couch.segmentation,
    )
    assert len(couch.segmentation) == 1 and len(couch.segmentation[0]) == 168

    [bed] = select_targets(sample, max_annotations=6, area_range=(200_000.0, 400_000.0))
    assert (bed.annotation_id, bed.category) == (1612051, "bed")

    # both couch (63) and bed (65) qualify: the smaller category id wins
    [both] = select_targets(sample, max_annotations=6, area_range=(100_000.0, 400_000.0))
    assert both.category_id == 63


def _poly(x: float, y: float, s: float) -> list[list[float]]:
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def _write(tmp_path: Path, images: list[tuple[int, list[tuple[int, int, float]]]]) -> Path:
    """images: (image_id, [(annotation_id, category_id, area), ...])."""
    data = {
        "images": [
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": 640, "height": 480} for image_id, _ in images
        ],
        "annotations": [
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": cat,
                "area": area,
                "bbox": [10, 10, 40, 40],
                "iscrowd": 0,
                "segmentation": _poly(10, 10, 40),
            }
            for image_id, anns in images
            for ann_id, cat, area in anns
        ],
        "categories": [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in (1, 2, 3, 4)],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _ids(targets: list[AblationTarget]) -> list[tuple[int, int]]:
    return [(t.image_id, t.annotation_id) for t in targets]


def test_area_bounds_are_strict(tmp_path):
    coco = load_coco(
        _write(
            tmp_path,
            [
                (1, [(11, 1, 1000.0)]),
                (2, [(21, 1, 2000.0)]),
                (3, [(31, 1, 1000.0001)]),
                (4, [(41, 1, 1999.999)]),
                (5, [(51, 1, 999.0)]),
                (6, [(61, 1, 2500.0)]),
            ],
        )
    )
    assert _ids(select_targets(coco)) == [(3, 31), (4, 41)]


def test_exactly_one_instance(tmp_path):
    coco = load_coco(
        _write(
            tmp_path,
            [
                (1, [(11, 1, 1500.0), (12, 1, 1500.0)]),  # two of category 1: none eligible
                (2, [(21, 1, 1500.0), (22, 1, 50.0)]),  # second instance out of range still counts
                (3, [(31, 1, 1500.0), (32, 1, 1500.0), (33, 2, 1200.0)]),  # category 2 is single
            ],
        )
    )
    assert _ids(select_targets(coco)) == [(3, 33)]


def test_annotation_count_limit(tmp_path):
    coco = load_coco(
        _write(
            tmp_path,
            [
                (1, [(11, 1, 1500.0), (12, 2, 50.0), (13, 3, 50.0)]),
                (2, [(21, 1, 1500.0), (22, 2, 50.0), (23, 3, 50.0), (24, 4, 50.0)]),
                (3, []),
            ],
        )
    )
    assert _ids(select_targets(coco)) == [(1, 11)]
    assert _ids(select_targets(coco, max_annotations=4)) == [(1, 11), (2, 21)]
    assert _ids(select_targets(coco, max_annotations=2)) == []


def test_smallest_category_wins_and_sorted_by_image(tmp_path):
    coco = load_coco(
        _write(
            tmp_path,
            [
                (9, [(91, 3, 1500.0), (92, 2, 1100.0)]),
                (4, [(41, 4, 1500.0), (42, 2, 1900.0), (43, 1, 10.0)]),
            ],
        )
    )
    targets = select_targets(coco)
    assert _ids(targets) == [(4, 42), (9, 92)]
    first = targets[0]
    assert (first.category_id, first.category, first.area, first.file_name) == (2, "cat2", 1900.0, "000000000004.jpg")
    assert (first.width, first.height) == (640, 480)
    assert first.segmentation == _poly(10, 10, 40)


def test_area_range_parameter(tmp_path):
    coco = load_coco(_write(tmp_path, [(1, [(11, 1, 500.0)])]))
    assert select_targets(coco) == []
    assert _ids(select_targets(coco, area_range=(100.0, 600.0))) == [(1, 11)]
    with pytest.raises(ValueError):
        select_targets(coco, area_range=(600.0, 100.0))


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_coco(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as info:
        load_coco(bad)
    assert "\n" not in str(info.value)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_coco(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations, categories"):
        load_coco(bad)
    bad.write_text(json.dumps({"images": [], "annotations": [{"id": 1}], "categories": []}))
    with pytest.raises(ValueError, match="malformed"):
        load_coco(bad)
    with pytest.raises(ValueError, match="not found"):
        load_coco(tmp_path)


def test_load_is_quiet(tmp_path, capsys):
    load_coco(_write(tmp_path, [(1, [])]))
    assert capsys.readouterr().out == ""
