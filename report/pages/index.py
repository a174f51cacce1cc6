"""The index page (`index.html`): every run and every lens image, searchable, with links to
the other pages."""

from __future__ import annotations

import re

from report import urls
from report.catalogue import ExperimentPage, LensEntry, RunInfo
from report.site import Site


def write_index_page(
    site: Site,
    runs: list[RunInfo],
    entries: list[LensEntry],
    *,
    db_name: str,
    has_downloads: bool,
    quant_count: int,
    depth_count: int = 0,
    experiment_pages: list[ExperimentPage],
) -> None:
    models = sorted({entry.run.model_id for entry in entries})
    lens_runs = [run for run in runs if any(entry.run.run_id == run.run_id for entry in entries)]
    for entry in entries:
        summary = getattr(entry, "summary", None)
        if summary is not None:
            summary["next_prob_text"] = _two_digits(summary["next_prob"])
    # Natural order of file names (img2 before img10), then run start: the page's default sort.
    run_order = {run.run_id: i for i, run in enumerate(runs)}
    entries = sorted(entries, key=lambda e: (_natural_key(e.file_name), run_order.get(e.run.run_id, 0), e.image_id))
    site.render(
        "index.html.j2",
        urls.INDEX,
        runs=runs,
        entries=entries,
        models=models,
        lens_runs=lens_runs,
        runs_here=runs,
        db_name=db_name,
        has_downloads=has_downloads,
        quant_count=quant_count,
        depth_count=depth_count,
        experiment_pages=experiment_pages,
        run_pages={page.run.run_id: page.path for page in experiment_pages},
    )


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key ordering digit runs by value: "img2" < "img10"."""
    return [(0, int(part)) if part.isdigit() else (1, part.lower()) for part in re.split(r"(\d+)", name) if part]


def _two_digits(p: float) -> str:
    """A probability as a percentage to two significant digits (what the lens pages hold)."""
    percent = 100 * p
    if percent >= 99.5:
        return "100%"
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"
