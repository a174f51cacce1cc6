"""Image inputs: any folder of images (optionally with COCO annotations), or a COCO split.

Listing reads no pixels: only each file's header (size and EXIF orientation), and a file
whose header cannot be read is still listed. Whether an image can be used is decided when
it is loaded (`ImageRecord.load`), which raises `ImageUnusable` with a reason; the runner
records such an image in `skipped` and goes on (or stops, with `--strict`).

Images are used the way transformers' own `load_image` uses them: the EXIF orientation
applied (`ImageOps.exif_transpose`), then converted to RGB. The stored size, the annotation
geometry and the model's view are all of the oriented image.

Pixel limit: PIL's decompression-bomb check (a warning above `Image.MAX_IMAGE_PIXELS`, an
error above twice that) is replaced by one limit of our own, `max_pixels` per record
(default PIL's default, 89,478,485 pixels; `--max-image-pixels` raises it): a larger image
is skipped with reason 'too_large', before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from collector.errors import UserError

# PIL's own default limit, taken before the check is handed over to `ImageRecord.load`.
DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
Image.MAX_IMAGE_PIXELS = None  # our limit (per record) replaces PIL's warning and error

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageUnusable(Exception):
    """An image file that cannot be used: `reason` is a `collector.runner.SkipReason` value
    ('unreadable', 'truncated', 'too_large'), `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Ids for images without a COCO id start here, far above any COCO id.
HASHED_ID_BASE = 10**13


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
    max_pixels: int | None = field(default=DEFAULT_MAX_PIXELS, compare=False)  # None: no limit

    def load(self) -> Image.Image:
        """The image as the model gets it: EXIF orientation applied, then RGB (grayscale,
        palette and alpha images converted), as transformers' `load_image` does.

        Raises ImageUnusable ('unreadable', 'truncated' or 'too_large') for a file that
        cannot be used.
        """
        return load_image(self.path, self.max_pixels)

    @property
    def categories(self) -> list[str]:
        return sorted({str(a["category"]) for a in self.annotations})


def open_header(path: Path) -> Image.Image:
    """The image's header (no pixels decoded yet); ImageUnusable when it is no image."""
    try:
        if path.stat().st_size == 0:
            raise ImageUnusable("unreadable", "empty file (0 bytes)")
        return Image.open(path)
    except UnidentifiedImageError:
        raise ImageUnusable("unreadable", "not an image PIL can identify") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageUnusable("unreadable", _first_line(error)) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a malformed EXIF block: exif_transpose will not apply it either
        orientation = None
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    pixels = size[0] * size[1]
    if max_pixels is not None and pixels > max_pixels:
        raise ImageUnusable(
            "too_large",
            f"{size[0]}x{size[1]} = {pixels:,} pixels is over the limit of {max_pixels:,} (--max-image-pixels)",
        )


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`path` decoded as RGB with its EXIF orientation applied; ImageUnusable when it cannot be used."""
    path = Path(path)
    with open_header(path) as image:
        check_pixels(path, image.size, max_pixels)
        try:
            image.load()
            oriented = ImageOps.exif_transpose(image)
            return oriented.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            message = _first_line(error)
            truncated = any(word in message.lower() for word in ("truncated", "broken data stream", "premature end"))
            raise ImageUnusable("truncated" if truncated else "unreadable", message) from None


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) of the image as used (EXIF orientation applied), from its header
    alone; None when the header cannot be read (the file is then skipped when loaded)."""
    try:
        with open_header(Path(path)) as image:
            return _oriented_size(image)
    except ImageUnusable:
        return None


def _hashed_id(path: Path) -> int:
    try:
        content = path.read_bytes()
    except OSError:
        content = b""
    # An empty or unreadable file is named by its file name (it is skipped when loaded);
    # two of them must not share an id.
    digest = hashlib.sha256(content or f"empty file {path.name}".encode()).hexdigest()
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
        raise UserError(f"{annotation_file} is not a COCO instances file (needs images, annotations, categories)")
    _check_coco_entries(annotation_file, data)
    return data


_ANNOTATION_FIELDS = {
    "id": int,
    "image_id": int,
    "category_id": int,
    "area": (int, float),
    "bbox": list,
    "segmentation": (list, dict),
}


def _check_coco_entries(annotation_file: Path, data: dict[str, Any]) -> None:
    """Every entry has the fields the collector reads, with the right types (UserError naming the first bad one)."""
    for kind, fields in (
        ("images", {"id": int, "file_name": str}),
        ("categories", {"id": int, "name": str}),
        ("annotations", _ANNOTATION_FIELDS),
    ):
        entries = data[kind]
        if not isinstance(entries, list):
            raise UserError(f"{annotation_file}: '{kind}' must be a list")
        for index, entry in enumerate(entries):
            bad = [
                name
                for name, types in fields.items()
                if not isinstance(entry, dict)
                or not isinstance(entry.get(name), types)
                or isinstance(entry.get(name), bool)
            ]
            if bad:
                raise UserError(f"{annotation_file}: {kind}[{index}] lacks or has a wrong type for {', '.join(bad)}")


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
    directory: str | Path,
    annotation_file: str | Path | None = None,
    limit: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
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
        width, height = image_size(path) or (0, 0)  # 0x0: no readable header (skipped when loaded)
        if path.name in by_file:
            image_id, annotations = by_file[path.name]
        elif path.stem.isdigit():
            image_id, annotations = int(path.stem), ()
        else:
            image_id, annotations = _hashed_id(path), ()
        records.append(
            ImageRecord(image_id, path.name, path, width, height, f"folder:{folder.name}", annotations, max_pixels)
        )
    _check_unique_ids(records)
    return records


def coco_images(
    root: str | Path, split: str, limit: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> list[ImageRecord]:
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
    listed_sizes = {
        str(img["file_name"]): (int(img.get("width") or 0), int(img.get("height") or 0)) for img in data["images"]
    }
    if limit is not None:
        entries = entries[:limit]
    records = []
    for file_name, (image_id, image_annotations) in entries:
        path = image_dir / file_name
        if not path.is_file():
            raise UserError(f"image listed in the annotations is missing: {path}")
        # The header's size (oriented); the annotations' size where the header cannot be read.
        width, height = image_size(path) or listed_sizes.get(file_name, (0, 0))
        records.append(
            ImageRecord(image_id, file_name, path, width, height, f"coco:{split}", image_annotations, max_pixels)
        )
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
