"""The run catalogue: every run with what the pages show about it, every completely
written lens image with its page paths, and which experiment runs get a run page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from db import queries
from db.store import ResultsDB
from report import urls, views
from report.site import DEMO_WARNING, ORGANISM_WARNING, ReportError, format_time, readable_json

LENS_EXPERIMENT = "lens"
# Experiments with a run page (and per-image drill-down pages): experiment -> title.
EXPERIMENT_TITLES = {"ablation": "Token ablation", "blocking": "Attention blocking"}
# Config keys worth a glance in the index; the full config is on each lens page.
CONFIG_SUMMARY_KEYS = ("revision", "dtype", "device", "top_k", "prompt")


@dataclass
class RunInfo:
    run_id: str
    experiment: str
    model_id: str
    config: dict[str, Any]
    config_json: str
    status: str
    started_at: str
    finished_at: str
    tool_version: str
    demo: bool
    # The banner a demo run carries (None: not a demo run).
    demo_warning: str | None
    dir_name: str
    config_summary: list[tuple[str, str]]
    # The lens top-k the run asked for; None for databases written before config held it.
    top_k: int | None = None
    image_count: int = 0
    skipped_count: int = 0
    # How its pages publish the views: "png" or "jpeg" (report/views.py; set by the build).
    view_format: str = "png"

    @property
    def view_ext(self) -> str:
        return views.EXTENSIONS[self.view_format]


@dataclass
class LensEntry:
    """A completely written image of a lens run; paths relative to the site root."""

    run: RunInfo
    image_id: int
    file_name: str
    categories: list[str]
    width: int | None
    height: int | None
    has_view: bool
    view_width: int | None
    view_height: int | None
    page: str = ""
    search_text: str = ""
    summary: dict[str, Any] | None = None  # the index's per-image columns, set when its page is written

    @property
    def view(self) -> str:
        """Site path of the view picture, "" without a recorded view."""
        return urls.lens_view(self.run.dir_name, self.image_id, self.run.view_ext) if self.has_view else ""


@dataclass
class ExperimentPage:
    """The run page of an ablation or blocking run."""

    run: RunInfo
    experiment: str
    title: str

    @property
    def path(self) -> str:
        return urls.experiment_page(self.experiment, self.run.dir_name)


def _summary_value(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_runs(db: ResultsDB) -> list[RunInfo]:
    """Every run, with its image and skipped counts; refuses two runs on one folder name."""
    image_counts, skipped_counts = queries.image_counts(db), queries.skipped_image_counts(db)
    runs = []
    for record in queries.runs(db):
        config = record.config
        runs.append(
            RunInfo(
                run_id=record.run_id,
                experiment=record.experiment,
                model_id=record.model_id,
                config=config,
                config_json=readable_json(config),
                status=record.status,
                started_at=format_time(record.started_at),
                finished_at=format_time(record.finished_at),
                tool_version=record.tool_version,
                demo=config.get("demo") is True,
                demo_warning=_demo_warning(config),
                dir_name=urls.run_dir_name(record.run_id),
                config_summary=[(key, _summary_value(config[key])) for key in CONFIG_SUMMARY_KEYS if key in config],
                top_k=record.top_k,
                image_count=image_counts.get(record.run_id, 0),
                skipped_count=skipped_counts.get(record.run_id, 0),
            )
        )
    dir_names = [run.dir_name for run in runs]
    if len(set(dir_names)) != len(dir_names):
        raise ReportError("two runs map to the same folder name; rename one run id")
    return runs


def load_lens_entries(db: ResultsDB, runs: list[RunInfo]) -> list[LensEntry]:
    """Every completely written, not skipped image of a lens run, by run start then id."""
    by_id = {run.run_id: run for run in runs}
    categories = queries.categories_by_image(db)
    entries = []
    for image in queries.written_images(db, LENS_EXPERIMENT):
        run = by_id[image.run_id]
        entry = LensEntry(
            run=run,
            image_id=image.image_id,
            file_name=image.file_name,
            categories=categories.get(image.image_id, []),
            width=image.width,
            height=image.height,
            has_view=image.has_view,
            view_width=image.view_width,
            view_height=image.view_height,
            page=urls.lens_page(run.dir_name, image.image_id),
        )
        entry.search_text = " ".join(
            [str(entry.image_id), entry.file_name, run.model_id, run.run_id, *entry.categories]
        ).lower()
        entries.append(entry)
    return entries


def experiment_pages(runs: list[RunInfo]) -> list[ExperimentPage]:
    """One run page per ablation and blocking run, experiments in EXPERIMENT_TITLES order."""
    return [
        ExperimentPage(run, experiment, title)
        for experiment, title in EXPERIMENT_TITLES.items()
        for run in runs
        if run.experiment == experiment
    ]


def experiment_nav(pages: list[ExperimentPage]) -> list[dict[str, str]]:
    """Nav entries (href relative to the site root) for the experiment pages: the title
    alone where an experiment has one run, the title and run id where it has several."""
    counts: dict[str, int] = {}
    for page in pages:
        counts[page.experiment] = counts.get(page.experiment, 0) + 1
    return [
        {
            "href": page.path,
            "run_id": page.run.run_id,
            "label": page.title if counts[page.experiment] == 1 else f"{page.title} ({page.run.run_id})",
        }
        for page in pages
    ]


def _demo_warning(config: dict[str, Any]) -> str | None:
    """The banner of a demo run: the organism's results are real effects on synthetic scenes,
    a random-weight model's are noise."""
    if config.get("demo") is not True:
        return None
    return ORGANISM_WARNING if config.get("model") == "organism" else DEMO_WARNING
