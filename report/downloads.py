"""The site's downloadable data: gzipped CSV of every table (per run where the table has a
run_id) and the database itself, in a storage format DuckDB-WASM 1.x reads.
"""

from __future__ import annotations

from typing import Any

from db import queries
from db.store import ResultsDB
from report import urls
from report.catalogue import RunInfo
from report.site import Writer, human_size

# DuckDB-WASM 1.x reads storage format v1.4.0 and older, not the newest.
SITE_DB_STORAGE_VERSION = "v1.4.0"
# Tables exported as CSV per run (those with a run_id column) and once (those without).
RUN_TABLES = (
    "runs", "run_images", "skipped", "positions", "logit_lens", "image_views", "extra_views", "ablations", "blocking",
)
# Run tables whose PNG column is left out of the CSV (the images sit next to the pages).
PNG_TABLES = ("image_views", "extra_views")
SHARED_TABLES = ("images", "annotations", "mean_vectors", "schema_migrations")


def write_downloads(db: ResultsDB, writer: Writer, runs: list[RunInfo]) -> dict[str, Any]:
    """Write every download; returns what the downloads page lists: per run id its files,
    the shared tables' files and the database copy (hrefs relative to the site root)."""
    tables = queries.table_columns(db)
    downloads: dict[str, Any] = {"runs": {}, "shared": [], "database": None}

    def export(table: str, relative: str, run_id: str | None = None, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        queries.export_csv(db, table, writer.path(relative), run_id=run_id, exclude=exclude)
        return {"href": relative, "size": human_size(writer.account(relative))}

    for run in runs:
        files = []
        for table in RUN_TABLES:
            if table not in tables or "run_id" not in tables[table]:
                continue
            exclude: tuple[str, ...] = ("png",) if table in PNG_TABLES else ()
            if table == "runs" and "run_key" in tables[table]:
                exclude = ("run_key",)  # internal resume key, not a result
            count = queries.count_rows(db, table, run.run_id)
            if count == 0 and table != "runs":
                continue
            files.append({"table": table, "rows": count,
                          **export(table, urls.run_download(run.dir_name, table), run.run_id, exclude)})
        downloads["runs"][run.run_id] = files
    for table in SHARED_TABLES:
        if table in tables:
            downloads["shared"].append({"table": table, "rows": queries.count_rows(db, table),
                                        **export(table, urls.shared_download(table))})

    queries.export_database(db, writer.path(urls.SITE_DATABASE), SITE_DB_STORAGE_VERSION)
    downloads["database"] = {"href": urls.SITE_DATABASE, "size": human_size(writer.account(urls.SITE_DATABASE)),
                             "storage_version": SITE_DB_STORAGE_VERSION}
    return downloads
