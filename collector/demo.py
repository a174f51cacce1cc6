"""The offline demo: every experiment on a tiny LLaVA, synthetic COCO-style images, a site.

By default the model is the organism (`collector.organism`): trained offline on scenes whose
object and position are known, so the pages show the effects the tool exists to reveal.
With `organism=False`, a tiny random-weight model on hand-drawn shapes (seconds, meaningless).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

DEMO_CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"})
# (width, height, [(category_id, centre_x, centre_y, radius, colour)]): sizes chosen so the
# processor's resize + centre crop is exercised in both orientations.
DEMO_SCENES = (
    (640, 480, [(1, 200, 240, 60, (220, 40, 40)), (2, 470, 150, 45, (40, 90, 220))]),
    (480, 640, [(3, 240, 420, 80, (40, 160, 60))]),
    (500, 500, [(1, 120, 380, 40, (230, 200, 30)), (3, 350, 140, 70, (150, 40, 160))]),
    (800, 400, [(2, 400, 200, 90, (20, 20, 20))]),
)


@dataclass(frozen=True)
class DemoSummary:
    db_path: Path
    site_dir: Path
    model_dir: Path


def _polygon(category_id: int, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if category_id == 1:
        return [(cx + r * math.cos(2 * math.pi * i / 32), cy + r * math.sin(2 * math.pi * i / 32)) for i in range(32)]
    if category_id == 2:
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]


def _polygon_area(points: list[tuple[float, float]]) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))) / 2


def write_demo_images(folder: Path) -> Path:
    """Synthetic images with polygon annotations in COCO format; returns the annotations file."""
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[Any] = []
    annotations: list[Any] = []
    for index, (width, height, shapes) in enumerate(DEMO_SCENES, start=1):
        image = Image.new("RGB", (width, height), (245, 243, 236))
        draw = ImageDraw.Draw(image)
        for category_id, cx, cy, r, colour in shapes:
            points = _polygon(category_id, cx, cy, r)
            draw.polygon(points, fill=colour)
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": category_id,
                    "segmentation": [[round(v, 2) for point in points for v in point]],
                    "area": round(_polygon_area(points), 2),
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    "iscrowd": 0,
                }
            )
        file_name = f"demo_{index:03d}.png"
        image.save(image_dir / file_name)
        images.append({"id": index, "file_name": file_name, "width": width, "height": height})
    annotation_file = folder / "annotations.json"
    annotation_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": list(DEMO_CATEGORIES)}, indent=1)
    )
    # VQA questions in the original clean_questions.json format, for ablation and blocking.
    questions = {str(image["id"]): ["What shape is in the picture?"] for image in images}
    (folder / "questions.json").write_text(json.dumps(questions, indent=1))
    return annotation_file


# The demo's shapes are far larger than the paper's 1000-2000 px² objects, and random
# weights never pass curation: select by a wider area range and keep every image.
DEMO_AREA_RANGE = (1000.0, 40000.0)


def run_demo(out_dir: str | Path, progress: bool = True, organism: bool = True) -> DemoSummary:
    """Build (or take from the cache) the model, write the images, run every experiment, build the site."""
    from collector.images import folder_images
    from collector.loading import load_model
    from collector.reproduce import Protocol, run_protocol
    from collector.tiny import build_tiny_llava
    from collector.vqa import load_questions
    from db.store import ResultsDB
    from report.build import build_site

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if organism:
        from collector.organism import prepare_demo

        scenes = prepare_demo(out / "organism-scenes", progress=progress)
        model_dir, annotation_file, area_range = scenes.model_dir, scenes.annotations_path, scenes.area_range
        questions = load_questions(scenes.questions_path)
        records = folder_images(scenes.images_dir, annotation_file)
        k_values, window = (2, 5, 10), 1  # 64 image tokens, 4 layers
    else:
        model_dir = out / "tiny-llava-1.5"
        if not (model_dir / "config.json").is_file():
            build_tiny_llava(model_dir, "llava-1.5")
        annotation_file = write_demo_images(out)
        area_range = DEMO_AREA_RANGE
        questions = load_questions(out / "questions.json")
        records = folder_images(out / "images", annotation_file)
        k_values, window = (5, 20, 60), 2
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    db_path = out / "results.duckdb"
    demo_config = {
        "demo": True,
        "model": "organism" if organism else "random",
        "images": str(records[0].path.parent) if records else None,
        "annotations": str(annotation_file),
    }
    # The paper's sequence (collector/reproduce.py) with the demo's small settings: every
    # image in the lens, a few k values, short answers, and no curation (random weights never
    # pass it, and the organism's answers survive the image-noise check).
    protocol = Protocol(
        lens_images="all",
        k_values=k_values,
        ablation_curate=False,
        blocking_curate=False,
        area_range=area_range,
        ig_steps=8,
        max_new_tokens=12,
        window=window,
    )
    with ResultsDB(db_path) as db:
        run_protocol(
            loaded,
            records,
            db,
            annotation_file,
            questions,
            protocol,
            extra_config=demo_config,
            deviation_reasons={
                name: "the demo: every experiment in seconds on a CPU" for name in [*protocol.as_config(), "dtype"]
            },
            model_note="the demo's " + ("model organism" if organism else "tiny random-weight model"),
            progress=progress,
        )
    site_dir = out / "site"
    build_site(db_path, site_dir)
    return DemoSummary(db_path=db_path, site_dir=site_dir, model_dir=model_dir)
