"""The site's downloadable data, sized for GitHub Pages.

- Every table as Parquet (zstd, PARQUET_VERSION v2: dictionary-encoded text), per run for
  the tables with a run_id, split at image boundaries into files of about
  TARGET_FILE_BYTES and sorted (image, then layer/position/rank) so that row-group min/max
  statistics let a reader skip everything but one run, image or layer. These files are
  also what the SQL console queries, over HTTP range requests (report/pages/sql.py).
- The logit-lens rows without their token text: each run's distinct (token_id, token)
  pairs are a small `lens_tokens` file beside them (the SQL console's `logit_lens` view
  joins them back), unless a token id of the run has no text or two texts, when the rows
  keep their token column. Probabilities are rounded to PROB_SIGNIFICANT_BITS significant
  bits (float16's precision, float32's range: relative error at most 2^-11, about 0.05 %),
  which zstd compresses to half; the database keeps the exact values, and so does the
  CSV.
- Gzipped CSV where people expect it: tables of a run (or shared tables) with at most
  CSV_MAX_ROWS rows. The lens rows of a paper-scale run are Parquet only.
- The database itself (a copy in storage format v1.4.0, which DuckDB-WASM 1.x and DuckDB
  1.4+ open) only where it is small: `database_copy="auto"` writes it when the source
  file is at most DATABASE_COPY_AUTO_BYTES; "always" and "never" decide it outright.

`write_downloads` streams: one COPY per file, never more than one file's rows at a time.
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
# Tables exported per run (those with a run_id column) and once (those without).
RUN_TABLES = (
    "runs",
    "run_images",
    "skipped",
    "positions",
    "logit_lens",
    "image_views",
    "extra_views",
    "ablations",
    "blocking",
    "class_tokens",
    "token_pieces",
)
# Run tables whose PNG column is left out (the images sit next to the pages).
PNG_TABLES = ("image_views", "extra_views")
SHARED_TABLES = ("images", "annotations", "mean_vectors", "schema_migrations")
# Sort order inside each file after (run_id, image_id): what a query on one image and
# one layer filters on.
SORT_KEYS = {
    "logit_lens": ("image_id", "layer", "position", "rank"),
    "positions": ("image_id", "position"),
    "run_images": ("image_id",),
    "image_views": ("image_id",),
    "extra_views": ("image_id", "name"),
    "skipped": ("image_id", "reason"),
    "ablations": ("image_id", "setting", "condition"),
    "blocking": ("image_id", "target", "source", "layer_start"),
    "class_tokens": ("image_id", "category"),
    "token_pieces": ("token_id",),
    "images": ("image_id",),
    "annotations": ("image_id", "annotation_id"),
}
# About one image's lens rows (593 positions x 33 layers x top-5 = 97,845) per row group,
# two to three row groups per LLaVA-1.5 image, so a one-layer query reads a third of it.
ROW_GROUP_SIZE = 40_960
TARGET_FILE_BYTES = 48_000_000  # well under GitHub's 100 MB per file
FIRST_FILE_ROWS = 1_000_000  # rows of the first file of a table, before its bytes per row are known
CSV_MAX_ROWS = 250_000
LENS_TABLE = "logit_lens"
LENS_TOKENS = "lens_tokens"  # per run: token_id -> token text of the lens rows
# Lens probabilities in Parquet: rounded to this many significant bits (float16 has 11).
PROB_SIGNIFICANT_BITS = 11
PROB_RELATIVE_ERROR = 2.0**-PROB_SIGNIFICANT_BITS
DATABASE_COPY_AUTO_BYTES = 64_000_000
DATABASE_COPY_CHOICES = ("auto", "always", "never")


def parquet_path(run_dir: str | None, table: str, part: int | None = None) -> str:
    """`downloads/<run_dir>/<table>-0000.parquet`, `downloads/<table>.parquet` for shared tables."""
    if run_dir is None:
        return f"downloads/{table}.parquet"
    return f"downloads/{run_dir}/{table}-{part or 0:04d}.parquet"


def rounded_prob_sql(column: str = "prob", bits: int = PROB_SIGNIFICANT_BITS) -> str:
    """SQL rounding a positive finite float to `bits` significant bits (round half to even;
    powers of two scale exactly, so the result is exact in float32 for bits <= 24)."""
    value = f"CAST({column} AS DOUBLE)"
    exponent = f"floor(log2({value}))"
    return (
        f"CASE WHEN {column} > 0 AND isfinite({column}) THEN "
        f"round({value} * pow(2.0, {bits - 1} - {exponent})) * pow(2.0, {exponent} - {bits - 1}) "
        f"ELSE {column} END"
    )


def lens_select(columns: list[tuple[str, str]], keep_token: bool) -> str:
    """The select list of the lens Parquet files: every column but `token` (unless kept),
    `prob` rounded (see the module docstring), each with its database type."""
    parts = []
    for name, kind in columns:
        if name == "token" and not keep_token:
            continue
        if name == "prob" and kind in ("FLOAT", "DOUBLE"):
            parts.append(f'CAST({rounded_prob_sql(name)} AS {kind}) AS "{name}"')
        else:
            parts.append(f'"{name}"')
    return ", ".join(parts)


def _image_batches(counts: list[tuple[int, int]], rows_per_file: int) -> list[tuple[int, int, int]]:
    """Consecutive image ranges (first_id, last_id, rows) of at most rows_per_file rows each
    (an image is never split: one image with more rows gets a file of its own)."""
    batches: list[tuple[int, int, int]] = []
    first: int | None = None
    last = 0
    rows = 0
    for image_id, n in counts:
        if first is not None and rows + n > rows_per_file:
            batches.append((first, last, rows))
            first, rows = None, 0
        if first is None:
            first = image_id
        last, rows = image_id, rows + n
    if first is not None:
        batches.append((first, last, rows))
    return batches


class _Exporter:
    def __init__(self, db: ResultsDB, writer: Writer, tables: dict[str, set[str]]) -> None:
        self.db, self.writer, self.tables = db, writer, tables
        self.bytes_per_row: dict[str, float] = {}
        # (table, run_id) -> per file: its first/last image and each image's [row start, row end)
        self.image_rows: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def _exclude(self, table: str) -> tuple[str, ...]:
        if table in PNG_TABLES:
            return ("png",)
        if table == "runs" and "run_key" in self.tables[table]:
            return ("run_key",)  # internal resume key, not a result
        return ()

    def _order(self, table: str) -> tuple[str, ...]:
        return tuple(c for c in SORT_KEYS.get(table, ()) if c in self.tables[table])

    def _file(self, relative: str, rows: int, table: str) -> dict[str, Any]:
        size = self.writer.account(relative)
        if rows:
            self.bytes_per_row[table] = max(self.bytes_per_row.get(table, 0.0), size / rows)
        return {"href": relative, "bytes": size, "size": human_size(size), "rows": rows}

    def parquet(self, table: str, run: RunInfo | None, select: str | None = None) -> list[dict[str, Any]]:
        exclude, order = self._exclude(table), self._order(table)
        if run is None or "image_id" not in self.tables[table]:
            relative = parquet_path(run.dir_name if run else None, table)
            rows = queries.export_parquet(
                self.db,
                table,
                self.writer.path(relative),
                run_id=run.run_id if run else None,
                exclude=exclude,
                order_by=order,
                row_group_size=ROW_GROUP_SIZE,
                select=select,
            )
            return [self._file(relative, rows, table)]
        files = []
        counts = queries.image_row_counts(self.db, table, run.run_id)
        remaining = counts
        part = 0
        while remaining:
            per_row = self.bytes_per_row.get(table)
            rows_per_file = FIRST_FILE_ROWS if per_row is None else max(1, int(TARGET_FILE_BYTES / per_row))
            first, last, _ = _image_batches(remaining, rows_per_file)[0]
            relative = parquet_path(run.dir_name, table, part)
            rows = queries.export_parquet(
                self.db,
                table,
                self.writer.path(relative),
                run_id=run.run_id,
                image_range=(first, last),
                exclude=exclude,
                order_by=order,
                row_group_size=ROW_GROUP_SIZE,
                select=select,
            )
            files.append(self._file(relative, rows, table))
            offsets: dict[int, tuple[int, int]] = {}
            start = 0
            for image_id, n in remaining:  # image_id order: the files' sort order
                if image_id > last:
                    break
                offsets[image_id] = (start, start + n)
                start += n
            self.image_rows.setdefault((table, run.run_id), []).append(
                {**files[-1], "first_image": first, "last_image": last, "images": offsets}
            )
            remaining = [(i, n) for i, n in remaining if i > last]
            part += 1
        return files

    def csv(self, table: str, run: RunInfo | None, rows: int) -> dict[str, Any] | None:
        if rows > CSV_MAX_ROWS:
            return None
        relative = urls.run_download(run.dir_name, table) if run else urls.shared_download(table)
        queries.export_csv(
            self.db, table, self.writer.path(relative), run_id=run.run_id if run else None, exclude=self._exclude(table)
        )
        return self._file(relative, rows, table)


def _entry(table: str, rows: int, parquet: list[dict[str, Any]], csv: dict[str, Any] | None) -> dict[str, Any]:
    total = sum(f["bytes"] for f in parquet)
    return {
        "table": table,
        "rows": rows,
        "parquet": parquet,
        "parquet_size": human_size(total),
        "parquet_bytes": total,
        "csv": csv,
        # kept for templates and tests that link "the" file of a table
        "href": (csv or parquet[0])["href"],
        "size": (csv or parquet[0])["size"],
        "rounded_prob": False,  # logit_lens: prob rounded (PROB_SIGNIFICANT_BITS)
        "without_token": False,  # logit_lens: token text in the run's lens_tokens file instead
    }


def _lens_files(exporter: _Exporter, run_id: str, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What a parquet-mode lens page reads: the run's lens files with each image's row range
    (`files`: href, bytes, rows, first_image, last_image, images: image_id -> (start, end)),
    its `lens_tokens` file (token_id -> text) and `token_pieces` file (None where absent), or
    None when the run has no lens rows or its lens files keep their token column."""
    files = exporter.image_rows.get((LENS_TABLE, run_id))
    by_table = {entry["table"]: entry for entry in entries}
    lens = by_table.get(LENS_TABLE)
    if not files or lens is None or not lens["without_token"] or LENS_TOKENS not in by_table:
        return None
    pieces = by_table.get("token_pieces")
    return {
        "files": files,
        "tokens": {k: by_table[LENS_TOKENS]["parquet"][0][k] for k in ("href", "bytes")},
        "pieces": {k: pieces["parquet"][0][k] for k in ("href", "bytes")} if pieces else None,
    }


def write_downloads(
    db: ResultsDB, writer: Writer, runs: list[RunInfo], *, source_bytes: int = 0, database_copy: str = "auto"
) -> dict[str, Any]:
    """Write every download; returns what the downloads page and the SQL console need:
    per run id its tables, the shared tables, the database copy (or None, with the reason
    in `database_note`), `parquet`: table -> every Parquet file of it (site paths), and
    `lens_files`: run id -> where each image's lens rows are (see `_lens_files`; None where
    the run's lens files keep their token column), for parquet-mode lens pages."""
    if database_copy not in DATABASE_COPY_CHOICES:
        raise ValueError(f"database_copy must be one of {DATABASE_COPY_CHOICES}")
    tables = queries.table_columns(db)
    relations = queries.relations(db)
    base_tables = {t for t in tables if t in relations} - {name for name, _ in queries.view_definitions(db)}
    exporter = _Exporter(db, writer, tables)
    downloads: dict[str, Any] = {
        "runs": {},
        "shared": [],
        "database": None,
        "database_note": "",
        "parquet": {},
        "csv_max_rows": CSV_MAX_ROWS,
        "lens_token_files": [],  # logit_lens files that keep their token column
        "prob_bits": PROB_SIGNIFICANT_BITS,
        "prob_error_pct": f"{100 * PROB_RELATIVE_ERROR:.2f}",
        "lens_files": {},  # run_id -> where each image's lens rows are (parquet-mode lens pages)
    }
    lens_columns = queries.ordered_columns(db, LENS_TABLE) if LENS_TABLE in base_tables else []
    split_tokens = {"token", "token_id"} <= {name for name, _ in lens_columns}

    for run in runs:
        entries = []
        for table in RUN_TABLES:
            if table not in base_tables or "run_id" not in tables[table]:
                continue
            count = queries.count_rows(db, table, run.run_id)
            if count == 0 and table != "runs":
                continue
            select = None
            tokens_entry = None
            if table == LENS_TABLE:
                keep_token = True
                if split_tokens:
                    relative = parquet_path(run.dir_name, LENS_TOKENS)
                    token_rows, usable = queries.export_lens_tokens(db, writer.path(relative), run.run_id)
                    if usable:
                        keep_token = False
                        tokens = [exporter._file(relative, token_rows, LENS_TOKENS)]
                        downloads["parquet"].setdefault(LENS_TOKENS, []).append(relative)
                        tokens_entry = _entry(LENS_TOKENS, token_rows, tokens, None)
                    else:
                        writer.path(relative).unlink()
                select = lens_select(lens_columns, keep_token) if lens_columns else None
            parquet = exporter.parquet(table, run, select)
            downloads["parquet"].setdefault(table, []).extend(f["href"] for f in parquet)
            if table == LENS_TABLE and select is not None and tokens_entry is None:
                downloads["lens_token_files"].extend(f["href"] for f in parquet)
            entry = _entry(table, count, parquet, exporter.csv(table, run, count))
            entry["rounded_prob"] = table == LENS_TABLE and select is not None
            entry["without_token"] = tokens_entry is not None
            entries.append(entry)
            if tokens_entry is not None:
                entries.append(tokens_entry)
        downloads["runs"][run.run_id] = entries
        downloads["lens_files"][run.run_id] = _lens_files(exporter, run.run_id, entries)
    for table in SHARED_TABLES:
        if table in base_tables:
            count = queries.count_rows(db, table)
            parquet = exporter.parquet(table, None)
            downloads["parquet"][table] = [f["href"] for f in parquet]
            downloads["shared"].append(_entry(table, count, parquet, exporter.csv(table, None, count)))
    # Tables with no rows in any run still get an (empty) file, so every table has a view.
    for table in sorted(base_tables):
        if table not in downloads["parquet"] and {"run_id", "image_id"} <= tables[table] and table in RUN_TABLES:
            relative = parquet_path(None, table)  # downloads/<table>.parquet, no rows
            queries.export_parquet(
                db, table, writer.path(relative), image_range=(1, 0), exclude=exporter._exclude(table)
            )
            writer.account(relative)
            downloads["parquet"][table] = [relative]

    if database_copy == "always" or (database_copy == "auto" and source_bytes <= DATABASE_COPY_AUTO_BYTES):
        queries.export_database(db, writer.path(urls.SITE_DATABASE), SITE_DB_STORAGE_VERSION)
        downloads["database"] = {
            "href": urls.SITE_DATABASE,
            "size": human_size(writer.account(urls.SITE_DATABASE)),
            "storage_version": SITE_DB_STORAGE_VERSION,
        }
    elif database_copy == "auto":
        downloads["database_note"] = (
            f"The database ({human_size(source_bytes)}) is not copied into the site: a copy is included "
            f"up to {human_size(DATABASE_COPY_AUTO_BYTES)} (`--database-copy always` forces it). "
            "Every table is above, as Parquet."
        )
    else:
        downloads["database_note"] = "The database is not copied into this site (`--database-copy never`)."
    downloads["total_bytes"] = sum(
        f["parquet_bytes"] + (f["csv"]["bytes"] if f["csv"] else 0)
        for entries in [*downloads["runs"].values(), downloads["shared"]]
        for f in entries
    )
    return downloads
