"""COCO loading and the paper's selection of single-object ablation targets."""

from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO


def load_coco(annotation_file: str | Path) -> COCO:
    """Load a COCO instances file; raise ``ValueError`` with a one-line message if it is missing or invalid."""
    path = Path(annotation_file)
    if not path.is_file():
        raise ValueError(f"COCO annotation file not found: {path}")
    try:
        dataset = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"COCO annotation file {path} is not valid JSON: {exc}".replace("\n", " ")) from exc
    if not isinstance(dataset, dict):
        raise ValueError(f"COCO annotation file {path} must contain a JSON object")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(dataset.get(key), list)]
    if missing:
        raise ValueError(f"COCO annotation file {path} lacks list field(s): {', '.join(missing)}")
    coco = COCO()
    coco.dataset = dataset
    # pycocotools prints progress to stdout, which would pollute CLI output.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco.createIndex()
        except (KeyError, TypeError) as exc:
            raise ValueError(f"COCO annotation file {path} is malformed: missing/invalid {exc}") from exc
    return coco


@dataclass(frozen=True)
class AblationTarget:
    """One image and the single-instance object whose patches get ablated."""

    image_id: int
    file_name: str
    width: int
    height: int
    annotation_id: int
    category_id: int
    category: str
    area: float
    segmentation: Any


def select_targets(
    coco: COCO,
    max_annotations: int = 3,
    area_range: tuple[float, float] = (1000.0, 2000.0),
) -> list[AblationTarget]:
    """Select images with a single-instance object of moderate size, as in the paper.

    An image qualifies when it has at most ``max_annotations`` annotations (all of
    them, crowd annotations included, as ``getAnnIds(imgIds=...)`` returns) and some
    category has exactly one annotation in it whose ``area`` lies strictly between
    ``area_range[0]`` and ``area_range[1]``. That annotation is the target; when
    several categories qualify, the one with the smallest category id is chosen so
    the result is deterministic. Results are sorted by image id.
    """
    low, high = area_range
    if low > high:
        raise ValueError(f"area_range must be (min, max), got {area_range}")
    targets = []
    for image_id in sorted(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        if not anns or len(anns) > max_annotations:
            continue
        by_category: dict[int, list[dict]] = defaultdict(list)
        for ann in anns:
            by_category[ann["category_id"]].append(ann)
        eligible = [
            group[0]
            for _, group in sorted(by_category.items())
            if len(group) == 1 and low < float(group[0]["area"]) < high
        ]
        if not eligible:
            continue
        ann = eligible[0]
        image = coco.imgs[image_id]
        targets.append(
            AblationTarget(
                image_id=int(image_id),
                file_name=image["file_name"],
                width=int(image["width"]),
                height=int(image["height"]),
                annotation_id=int(ann["id"]),
                category_id=int(ann["category_id"]),
                category=coco.cats[ann["category_id"]]["name"],
                area=float(ann["area"]),
                segmentation=ann["segmentation"],
            )
        )
    return targets
