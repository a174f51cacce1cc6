"""The index page (`index.html`): every run and every lens image, searchable, with links to
the other pages."""

from __future__ import annotations

from report import urls
from report.catalogue import ExperimentPage, LensEntry, RunInfo
from report.site import Site


def write_index_page(site: Site, runs: list[RunInfo], entries: list[LensEntry], *, db_name: str,
                     has_downloads: bool, quant_count: int, experiment_pages: list[ExperimentPage]) -> None:
    site.render(
        "index.html.j2", urls.INDEX,
        runs=runs,
        entries=entries,
        runs_here=runs,
        db_name=db_name,
        has_downloads=has_downloads,
        quant_count=quant_count,
        experiment_pages=experiment_pages,
        run_pages={page.run.run_id: page.path for page in experiment_pages},
    )
