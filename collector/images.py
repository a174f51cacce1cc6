"""Image inputs: any folder of images (optionally with COCO annotations), or a COCO split.

Every image is checked (header read) when listed, so an unreadable file is reported
before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from collector.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Ids for images without a COCO id start here, far above any COCO id.
HASHED_ID_BASE = 10**13


class ImageUnusable(Exception):
    """An image file that cannot be used (unreadable, truncated, too large): the runner
    records the image as skipped with `reason` (a `collector.runner.SkipReason` value)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageRecord:
    """One input image and what is known about it.

    annotations: COCO annotation dicts (id, category_id, category name, area, bbox,
    iscrowd, segmentation) in original-image pixel coordinates.
    """

    image_id: int
    file_name: str
    path: Path
    width: int
    height: int
    source: str
    annotations: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def load(self) -> Image.Image:
        """The image as RGB (grayscale, palette and alpha images converted)."""
        try:
            with Image.open(self.path) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise UserError(f"cannot read image {self.path}: {error}") from None

    @property
    def categories(self) -> list[str]:
        return sorted({str(a["category"]) for a in self.annotations})


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise UserError(f"cannot read image {path}: {error}") from None


def _hashed_id(path: Path) -> int:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return HASHED_ID_BASE + int(digest[:12], 16)


def read_coco_annotations(annotation_file: Path) -> dict[str, Any]:
    """A COCO instances file, with a one-line error for a missing or malformed file."""
    if not annotation_file.is_file():
        raise UserError(f"annotations file not found: {annotation_file}")
    try:
        data = json.loads(annotation_file.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read annotations {annotation_file}: {error}") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise UserError(
            f"{annotation_file} is not a COCO instances file (needs images, annotations, categories)"
        )
    return data


def _annotations_by_file(data: dict[str, Any]) -> dict[str, tuple[int, tuple[dict[str, Any], ...]]]:
    names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    per_image: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        entry = dict(ann)
        entry["category"] = names.get(int(ann["category_id"]), str(ann["category_id"]))
        per_image.setdefault(int(ann["image_id"]), []).append(entry)
    return {
        str(img["file_name"]): (
            int(img["id"]),
            tuple(sorted(per_image.get(int(img["id"]), []), key=lambda a: int(a["id"]))),
        )
        for img in data["images"]
    }


def folder_images(
    directory: str | Path, annotation_file: str | Path | None = None, limit: int | None = None
) -> list[ImageRecord]:
    """Images in a folder (not recursive), sorted by file name.

    Image ids: the COCO id from `annotation_file` when it lists the file; else the file
    stem when it is a number (COCO file names such as 000000039769.jpg); else an id
    derived from the file's content (>= 10**13, never a COCO id).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    by_file = _annotations_by_file(read_coco_annotations(Path(annotation_file))) if annotation_file else {}
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    if limit is not None:
        paths = paths[:limit]
    records = []
    for path in paths:
        width, height = _image_size(path)
        if path.name in by_file:
            image_id, annotations = by_file[path.name]
        elif path.stem.isdigit():
            image_id, annotations = int(path.stem), ()
        else:
            image_id, annotations = _hashed_id(path), ()
        records.append(
            ImageRecord(image_id, path.name, path, width, height, f"folder:{folder.name}", annotations)
        )
    _check_unique_ids(records)
    return records


def coco_images(root: str | Path, split: str, limit: int | None = None) -> list[ImageRecord]:
    """A COCO split: `root/split/<file_name>` with `root/annotations/instances_<split>.json`.

    Sorted by COCO image id; images listed in the annotations but missing on disk are an error.
    """
    root = Path(root)
    data = read_coco_annotations(root / "annotations" / f"instances_{split}.json")
    image_dir = root / split
    if not image_dir.is_dir():
        raise UserError(f"COCO image folder not found: {image_dir}")
    by_file = _annotations_by_file(data)
    entries = sorted(by_file.items(), key=lambda item: item[1][0])
    if limit is not None:
        entries = entries[:limit]
    records = []
    for file_name, (image_id, image_annotations) in entries:
        path = image_dir / file_name
        if not path.is_file():
            raise UserError(f"image listed in the annotations is missing: {path}")
        width, height = _image_size(path)
        records.append(ImageRecord(image_id, file_name, path, width, height, f"coco:{split}", image_annotations))
    return records


def _check_unique_ids(records: list[ImageRecord]) -> None:
    seen: dict[int, str] = {}
    for record in records:
        if record.image_id in seen:
            raise UserError(
                f"images {seen[record.image_id]} and {record.file_name} have the same id "
                f"{record.image_id} (identical content or COCO id)"
            )
        seen[record.image_id] = record.file_name
