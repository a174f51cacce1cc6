"""Render a results database as a static site: `build_site` puts the pages together.

Data flows collector -> db -> report: the report reads the database only, read-only,
through db/queries.py, and never imports torch or the collector. Where things are:

- report/site.py: staging writer, Jinja environment, page rendering, provenance.
- report/urls.py: the path of every page and file, and the relative URL between them.
- report/catalogue.py: runs, lens images, experiment run pages.
- report/lens_codec.py: the lens data file format ("llava-interp-lens/2").
- report/object_cells.py: annotated objects on the patch grid, once per (run, image).
- report/downloads.py: CSV of every table and the database copy.
- report/charts.py: SVG chart geometry.
- report/pages/: one module per kind of page.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from db.store import ResultsDB
from report import catalogue
from report import site as site_plumbing
from report.downloads import write_downloads
from report.object_cells import ObjectCells
from report.pages.ablation import write_ablation_pages
from report.pages.blocking import write_blocking_pages
from report.pages.compare import write_compare_page
from report.pages.downloads import write_downloads_page
from report.pages.index import write_index_page
from report.pages.lens import write_lens_page
from report.pages.quantitative import write_quantitative_page
from report.pages.sql import write_sql_page
from report.site import ReportError, Site, Writer
from report.urls import NOJEKYLL, run_dir_name

# Imported from here by the CLI, the collector's demo and the tests.
__all__ = ["ReportError", "SiteSummary", "build_site", "run_dir_name"]

_EXPERIMENT_WRITERS = {"ablation": write_ablation_pages, "blocking": write_blocking_pages}


@dataclass
class SiteSummary:
    """What `build_site` wrote."""

    out_dir: Path
    runs: int
    lens_pages: int
    files_written: int
    bytes_written: int


def build_site(db_path: Path, out_dir: Path, *, downloads: bool = True) -> SiteSummary:
    """Render the database at `db_path` into `out_dir`.

    The site is rendered into a staging folder inside `out_dir` first, so a failed build
    leaves the previous site in place; on success the generated paths (urls.OWNED_PATHS)
    are replaced and nothing else in `out_dir` is touched. `downloads=False` leaves out the
    CSV files and the database copy. Raises db.errors.DatabaseError for an unusable
    database file and ReportError for results that cannot be rendered faithfully.
    """
    db_path, out_dir = Path(db_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"output path exists and is not a folder: {out_dir}")
    generated_at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    with ResultsDB(db_path, read_only=True) as db:
        provenance = site_plumbing.provenance(db, db_path, generated_at)
        runs = catalogue.load_runs(db)
        entries = catalogue.load_lens_entries(db, runs)
        experiment_pages = catalogue.experiment_pages(runs)
        objects = ObjectCells.from_db(db)
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".report-build-", dir=out_dir))
        try:
            writer = Writer(stage)
            site = Site(writer, site_plumbing.environment(), site_plumbing.common_context(
                provenance, generated_at, catalogue.experiment_nav(experiment_pages)))
            site_plumbing.copy_static(writer)
            writer.write(NOJEKYLL, "")
            lens_shapes = {}
            for entry in entries:
                data = write_lens_page(db, site, entry, objects)
                lens_shapes[(entry.run.run_id, entry.image_id)] = (data["n_layers"], data["grid_rows"], data["grid_cols"])
            quant_runs = write_quantitative_page(db, site, runs, entries, lens_shapes, objects)
            download_info = write_downloads(db, writer, runs) if downloads else None
            if download_info is not None:
                write_downloads_page(site, runs, download_info)
            write_sql_page(db, site, download_info)  # sql.html, vendor/duckdb-wasm/
            write_compare_page(db, site, entries)  # compare.html: one image in two lens runs
            for page in experiment_pages:
                _EXPERIMENT_WRITERS[page.experiment](db, site, page)
            write_index_page(site, runs, entries, db_name=db_path.name, has_downloads=download_info is not None,
                             quant_count=len(quant_runs), experiment_pages=experiment_pages)
            site_plumbing.replace_owned(stage, out_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    return SiteSummary(out_dir=out_dir, runs=len(runs), lens_pages=len(entries),
                       files_written=writer.files, bytes_written=writer.bytes)
