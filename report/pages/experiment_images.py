"""What the ablation and blocking pages share: a run page that lists its images, and one
drill-down page per image (`experiments/<experiment>-<run>/<image_id>.html`) with the
model's view and an overlay of patch cells (drawn by static/experiments.js).
"""

from __future__ import annotations

from typing import Any

from db import queries
from db.store import ResultsDB
from report import urls, views
from report.catalogue import ExperimentPage
from report.site import Site, script_json


def overlay_json(grid_rows: Any, grid_cols: Any, overlays: list[dict[str, Any]]) -> str:
    """The drill-down overlay data (read by static/experiments.js), safe inside <script>."""
    return script_json({"grid_rows": grid_rows, "grid_cols": grid_cols, "overlays": overlays})


def write_experiment_pages(
    db: ResultsDB,
    site: Site,
    page: ExperimentPage,
    template: str,
    data: dict[str, Any],
    context: dict[str, Any],
    images: list[dict[str, Any]],
) -> None:
    """Write the run page and, per item of `images` (each with `image`, `grid_rows`,
    `grid_cols`, `overlays`), its image page and the view picture (report/views.py)."""
    run, experiment = page.run, page.experiment
    sizes = queries.view_sizes(db, run.run_id)
    image_pages = {}
    pictures: dict[tuple[int, str], bytes] = {}
    for at, item in enumerate(images):
        image_id = item["image"]["image_id"]
        if (image_id, "") not in pictures and image_id in sizes:
            # The next images' pictures in one read (queries.pictures), not a query per image.
            batch = [i["image"]["image_id"] for i in images[at : at + queries.PICTURE_SPAN]]
            pictures = queries.pictures(db, "image_views", run.run_id, batch)
        image_page = urls.experiment_image_page(experiment, run.dir_name, image_id)
        picture = urls.experiment_image_view(experiment, run.dir_name, image_id, run.view_ext)
        view = sizes.get(image_id)
        if view is not None:
            site.writer.write(picture, views.encode(pictures[(image_id, "")], run.view_format))
        image_pages[image_id] = image_page
        site.render(
            template,
            image_page,
            page=page,
            data=data,
            run=run,
            runs_here=[run],
            mode="image",
            item=item,
            overlay_json=overlay_json(item["grid_rows"], item["grid_cols"], item["overlays"]),
            view=view,
            picture=picture if view else "",
            **context,
        )
    site.render(
        template,
        page.path,
        page=page,
        data=data,
        run=run,
        runs_here=[run],
        mode="run",
        image_pages=image_pages,
        images=images,
        **context,
    )
