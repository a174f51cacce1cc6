"""The site's downloadable data, sized for GitHub Pages.

- Every table as Parquet (zstd, PARQUET_VERSION v2: dictionary-encoded text), per run for
  the tables with a run_id, split at image boundaries into files of about
  TARGET_FILE_BYTES and sorted (SORT_KEYS: image first) so that row-group min/max
  statistics let a reader skip everything but one run or image, and for the lens rows
  the layer bands other than one layer's (LENS_LAYER_BAND). The lens files without token
  text are delta-encoded rather than dictionary-encoded (smaller for ids that repeat over
  layers). These files are also what the SQL console queries, over HTTP range requests
  (report/pages/sql.py).
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

A rebuild exports only what changed (ExportCache): the build manifest records per file a
digest of its inputs (its rows' count and sum of row hashes, one DuckDB aggregate by image
per run and table; its select list, order and image range; EXPORT_FORMAT, the constants,
DuckDB's version and the writer's source), its size and mtime, and its dict as returned
here. A file whose digest matches and which is intact in the site stays in place. The
split of a run's table is a function of its rows alone (bytes per row learnt per run from
its own first file, rounded up to BYTES_PER_ROW_STEP), so unchanged rows split the same:
images appended at the end of a run rewrite its last file and add files; a changed image
rewrites its file; an image inserted or deleted in the middle rewrites the files after it.
The lens_tokens file comes from the run's `token_pieces` where every lens row agrees with
them (queries.lens_tokens_from_pieces), else from the lens rows' distinct pairs; the
manifest keeps the decision, keyed by the (token_id, token) rows' digest and the
token_pieces rows' digest, so a rebuild with the same tokens repeats neither.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import stat
from pathlib import Path
from typing import Any

import duckdb

from db import queries
from db.store import ResultsDB
from report import incremental, urls
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
# The lens rows of an image are ordered by bands of LENS_LAYER_BAND layers, then rank,
# position and layer (lens_sort_keys): a cell's top-k tokens and probabilities tend to
# persist over neighbouring layers, and the rows of one (rank, position) in consecutive
# layers sit next to each other, where delta encoding and zstd find the repeats. A row
# group's layer statistics span one or two bands, so a query on one layer of one image
# can still skip the row groups of the image's other bands. With LENS_ROW_GROUP_SIZE and
# LENS_COMPRESSION_LEVEL (zstd 7: 2 % smaller than the default 3 for ~10 % more export
# time; higher levels cost several times the time) the lens files of bench/site_scale.py
# came out 23 % smaller than in (layer, position, rank) order with dictionaries, row
# groups of 40,960 rows and zstd 3 (bench/RESULTS.md).
LENS_LAYER_BAND = 16
LENS_ROW_GROUP_SIZE = 81_920  # ~0.84 of a LLaVA-1.5 image's 97,845 rows at top-5
LENS_COMPRESSION_LEVEL = 7
# Sort order inside each file after (run_id, image_id): what a query on one image filters
# on. A key is a column or `column // N` (queries.export_parquet); logit_lens: lens_sort_keys.
SORT_KEYS = {
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
# Row groups of the other tables (the lens files: LENS_ROW_GROUP_SIZE).
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
# The split learns a run's bytes per lens row from its first file, rounded up to this step,
# so a few bytes more or less in a rewritten file do not move the later files' split points.
BYTES_PER_ROW_STEP = 1 / 64
# Bump when a file written from the same rows with the same constants would differ (the
# source of this module and of the export queries is part of the key too).
EXPORT_FORMAT = "llava-interp-downloads/1"


def lens_sort_keys() -> tuple[str, ...]:
    """The lens files' sort order (see LENS_LAYER_BAND)."""
    return ("image_id", f"layer // {LENS_LAYER_BAND}", "rank", "position", "layer")


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


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _export_functions() -> tuple[Any, ...]:
    return (
        queries.export_parquet,
        queries.export_csv,
        queries.export_lens_tokens,
        queries.export_token_pieces_as_lens_tokens,
        queries.lens_tokens_from_pieces,
        queries._lens_tokens_check,
        queries.export_database,
        queries.image_row_digests,
        queries.row_digest,
        queries.schema_statements,
    )


@functools.cache
def _writer_source() -> str:
    source = hashlib.sha256(Path(__file__).read_bytes())
    for function in _export_functions():
        source.update(inspect.getsource(function).encode())
    return source.hexdigest()


def cache_key() -> dict[str, Any]:
    """What every exported file depends on besides its rows: the writer (this module's source
    and the export queries'), DuckDB's version and the constants. Any change rewrites all."""
    return {
        "format": EXPORT_FORMAT,
        "writer": _writer_source(),
        "duckdb": duckdb.__version__,
        "constants": [ROW_GROUP_SIZE, TARGET_FILE_BYTES, FIRST_FILE_ROWS, CSV_MAX_ROWS, PROB_SIGNIFICANT_BITS,
                      SITE_DB_STORAGE_VERSION, BYTES_PER_ROW_STEP, LENS_LAYER_BAND, LENS_ROW_GROUP_SIZE,
                      LENS_COMPRESSION_LEVEL],
    }  # fmt: skip


class ExportCache:
    """The previous build's download files that still hold what this build would write.

    The build manifest (report/incremental.py) records per exported file the digest of its
    inputs (the rows it holds: count and sum of row hashes over exactly those rows; what
    selects and orders them; the cache key), its size and mtime, and the dict
    `write_downloads` returned for it (whatever fields it has). A file whose digest matches
    and that is still in the site with that size and mtime is hard-linked into the staging
    folder (same inode, same mtime) and its dict reused; anything else is exported again.
    """

    def __init__(self, writer: Writer, out_dir: Path | None = None, previous: Any = None) -> None:
        self.writer, self.out_dir, self.key = writer, out_dir, cache_key()
        self.previous_files: dict[str, Any] = {}
        self.previous_tokens: dict[str, Any] = {}
        if out_dir is not None and isinstance(previous, dict) and previous.get("key") == self.key:
            files, tokens = previous.get("files"), previous.get("tokens")
            self.previous_files = files if isinstance(files, dict) else {}
            self.previous_tokens = tokens if isinstance(tokens, dict) else {}
        self.files: dict[str, Any] = {}
        self.tokens: dict[str, Any] = {}
        self.reused = self.exported = 0

    def reuse(self, relative: str, digest: str) -> dict[str, Any] | None:
        """The previous file at `relative` (linked into the staging folder, its dict) when its
        digest is `digest` and it is intact; None when it must be written."""
        record = self.previous_files.get(relative)
        if self.out_dir is None or not isinstance(record, dict) or record.get("digest") != digest:
            return None
        file = record.get("file")
        if not isinstance(file, dict) or file.get("href") != relative:
            return None  # the path is ours, never the manifest's
        try:
            found = (self.out_dir / relative).lstat()
        except OSError:
            return None
        if not stat.S_ISREG(found.st_mode) or [found.st_size, found.st_mtime_ns] != [
            record.get("bytes"),
            record.get("mtime_ns"),
        ]:
            return None  # deleted, replaced, truncated or edited in the site
        if file.get("bytes", found.st_size) != found.st_size:
            return None
        incremental.link_previous(self.out_dir, self.writer.root, relative)
        self.writer.account(relative)
        self.files[relative] = {"digest": digest, "file": file}  # fields added to it later are recorded too
        self.reused += 1
        return file

    def store(self, relative: str, digest: str, file: dict[str, Any]) -> None:
        """Record a file this build wrote: its dict as `write_downloads` returns it (the
        manifest is written at the end of the build, with any field added to the dict
        meanwhile; a reused file gets its dict back through JSON: lists, not tuples)."""
        self.files[relative] = {"digest": digest, "file": file}
        self.exported += 1

    def state(self, root: Path) -> dict[str, Any]:
        """The manifest's record: per file its digest, dict, size and mtime in `root` (the
        staging folder, after incremental.keep_unchanged linked identical files)."""
        files = {}
        for relative, record in self.files.items():
            try:
                found = (root / relative).stat()
            except OSError:
                continue
            files[relative] = {**record, "bytes": found.st_size, "mtime_ns": found.st_mtime_ns}
        return {"key": self.key, "files": files, "tokens": self.tokens}


def _per_row(size: int, rows: int) -> float:
    return math.ceil(size / rows / BYTES_PER_ROW_STEP) * BYTES_PER_ROW_STEP


class _Exporter:
    def __init__(
        self,
        db: ResultsDB,
        writer: Writer,
        tables: dict[str, set[str]],
        cache: ExportCache,
        where: dict[str, str] | None = None,
    ) -> None:
        self.db, self.writer, self.tables, self.cache = db, writer, tables, cache
        self.columns: dict[str, list[str]] = {}
        self.where = where or {}  # table -> SQL condition on the rows published (the lens' rank cap)
        # (table, run_id) -> per file: its first/last image and each image's [row start, row end)
        self.image_rows: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def _exclude(self, table: str) -> tuple[str, ...]:
        if table in PNG_TABLES:
            return ("png",)
        if table == "runs" and "run_key" in self.tables[table]:
            return ("run_key",)  # internal resume key, not a result
        return ()

    def _order(self, table: str) -> tuple[str, ...]:
        keys = lens_sort_keys() if table == LENS_TABLE else SORT_KEYS.get(table, ())
        return tuple(key for key in keys if key.split(" // ")[0] in self.tables[table])

    def exported_columns(self, table: str) -> list[str]:
        """The columns a file of `table` is made of (the digest's row hash covers them)."""
        if table not in self.columns:
            exclude = self._exclude(table)
            self.columns[table] = [name for name, _ in queries.ordered_columns(self.db, table) if name not in exclude]
        return self.columns[table]

    def image_digests(self, table: str, run: RunInfo, token: bool = False) -> list[tuple[int, int, int, int]]:
        columns = self.exported_columns(table)
        return queries.image_row_digests(
            self.db, table, run.run_id, columns, ("token_id", "token") if token else None, self.where.get(table)
        )

    def _file(self, relative: str, rows: int) -> dict[str, Any]:
        size = self.writer.account(relative)
        return {"href": relative, "bytes": size, "size": human_size(size), "rows": rows}

    def _digest(self, kind: str, relative: str, table: str, select: str | None, rows: int, hashed: int,
                **more: Any) -> str:  # fmt: skip
        return _digest({"kind": kind, "href": relative, "table": table, "select": select,
                        "exclude": self._exclude(table), "order": self._order(table), "rows": rows, "hash": hashed,
                        "where": self.where.get(table),
                        "key": self.cache.key, **more})  # fmt: skip

    def parquet(
        self,
        table: str,
        run: RunInfo | None,
        select: str | None = None,
        images: list[tuple[int, int, int, int]] | None = None,
        total: tuple[int, int] | None = None,
        numbers_only: bool = False,
    ) -> list[dict[str, Any]]:
        """The Parquet files of a table (of a run): `images` are its per-image digests
        (`image_digests`) where it has an image_id, `total` its (rows, hash sum) otherwise.
        `numbers_only`: the select list has no text column but run_id (the lens rows without
        their token): written without dictionaries, in LENS_ROW_GROUP_SIZE row groups at
        LENS_COMPRESSION_LEVEL."""
        if run is None or "image_id" not in self.tables[table]:
            relative = parquet_path(run.dir_name if run else None, table)
            if total is None:
                total = queries.row_digest(self.db, table, self.exported_columns(table), run.run_id if run else None)
            digest = self._digest("parquet", relative, table, select, *total)
            return [self._parquet_file(table, relative, digest, run, None, select, numbers_only)]
        # Split at image boundaries: the first file FIRST_FILE_ROWS rows, the next ones
        # TARGET_FILE_BYTES at the largest bytes per row seen so far in this run (rounded up to
        # BYTES_PER_ROW_STEP). The same rows give the same split, so a rebuild finds the
        # previous files; images appended to a run rewrite its last file and add new ones.
        files = []
        remaining = images if images is not None else self.image_digests(table, run)
        per_row: float | None = None
        part = 0
        while remaining:
            rows_per_file = FIRST_FILE_ROWS if per_row is None else max(1, int(TARGET_FILE_BYTES / per_row))
            first, last, _ = _image_batches([(i, n) for i, n, _, _ in remaining], rows_per_file)[0]
            batch = [image for image in remaining if image[0] <= last]
            relative = parquet_path(run.dir_name, table, part)
            digest = self._digest(
                "parquet", relative, table, select, sum(b[1] for b in batch), sum(b[2] for b in batch),
                images=[first, last],
            )  # fmt: skip
            file = self._parquet_file(table, relative, digest, run, (first, last), select, numbers_only)
            files.append(file)
            if file["rows"]:
                per_row = max(per_row or 0.0, _per_row(file["bytes"], file["rows"]))
            offsets: dict[int, tuple[int, int]] = {}
            start = 0
            for image in batch:  # image_id order: the files' sort order
                offsets[image[0]] = (start, start + image[1])
                start += image[1]
            self.image_rows.setdefault((table, run.run_id), []).append(
                {**file, "first_image": first, "last_image": last, "images": offsets}
            )
            remaining = remaining[len(batch) :]
            part += 1
        return files

    def _parquet_file(
        self,
        table: str,
        relative: str,
        digest: str,
        run: RunInfo | None,
        image_range: tuple[int, int] | None,
        select: str | None,
        numbers_only: bool = False,
    ) -> dict[str, Any]:
        """One Parquet file of `table`: the previous build's when its `digest` matches, else exported."""
        file = self.cache.reuse(relative, digest)
        if file is None:
            rows = queries.export_parquet(
                self.db,
                table,
                self.writer.path(relative),
                run_id=run.run_id if run else None,
                image_range=image_range,
                exclude=self._exclude(table),
                order_by=self._order(table),
                row_group_size=LENS_ROW_GROUP_SIZE if numbers_only else ROW_GROUP_SIZE,
                select=select,
                where=self.where.get(table),
                compression_level=LENS_COMPRESSION_LEVEL if numbers_only else None,
                dictionaries=not numbers_only,
            )
            file = self._file(relative, rows)
            self.cache.store(relative, digest, file)
        return file

    def csv(self, table: str, run: RunInfo | None, total: tuple[int, int]) -> dict[str, Any] | None:
        rows = total[0]
        if rows > CSV_MAX_ROWS:
            return None
        relative = urls.run_download(run.dir_name, table) if run else urls.shared_download(table)
        digest = self._digest("csv", relative, table, None, *total)
        file = self.cache.reuse(relative, digest)
        if file is None:
            queries.export_csv(
                self.db, table, self.writer.path(relative), run_id=run.run_id if run else None,
                exclude=self._exclude(table), where=self.where.get(table),
            )  # fmt: skip
            file = self._file(relative, rows)
            self.cache.store(relative, digest, file)
        return file

    def lens_tokens(self, run: RunInfo, images: list[tuple[int, int, int, int]], pieces: bool) -> dict[str, Any] | None:
        """The run's lens_tokens file (None when a token id of the lens rows has no text or two
        texts: the lens files keep their token column). From `token_pieces` where the lens rows
        agree with it (queries.lens_tokens_from_pieces), else the lens rows' distinct pairs."""
        relative = parquet_path(run.dir_name, LENS_TOKENS)
        piece_rows = (
            queries.row_digest(self.db, "token_pieces", self.exported_columns("token_pieces"), run.run_id)
            if pieces
            else None
        )
        digest = self._digest(
            "lens_tokens", relative, LENS_TABLE, None, sum(i[1] for i in images), sum(i[3] for i in images),
            pieces=piece_rows,
        )  # fmt: skip
        previous = self.cache.previous_tokens.get(run.run_id)
        if isinstance(previous, dict) and previous.get("digest") == digest:
            if previous.get("usable") is False:
                self.cache.tokens[run.run_id] = previous
                return None
            file = self.cache.reuse(relative, digest)
            if file is not None:
                self.cache.tokens[run.run_id] = previous
                return file
        path = self.writer.path(relative)
        usable, source = False, "lens"
        ids = queries.lens_tokens_from_pieces(self.db, run.run_id) if piece_rows and piece_rows[0] else None
        if ids is not None:
            rows, usable = queries.export_token_pieces_as_lens_tokens(self.db, path, run.run_id, ids)
            source = "token_pieces"
        if not usable:
            rows, usable = queries.export_lens_tokens(self.db, path, run.run_id)
            source = "lens"
        self.cache.tokens[run.run_id] = {"digest": digest, "usable": usable, "source": source}
        if not usable:
            path.unlink()
            return None
        file = self._file(relative, rows)
        self.cache.store(relative, digest, file)
        return file

    def database(self, base_tables: set[str]) -> dict[str, Any]:
        relative = urls.SITE_DATABASE
        tables = {
            table: queries.row_digest(self.db, table, [name for name, _ in queries.ordered_columns(self.db, table)])
            for table in sorted(base_tables)
        }
        digest = _digest({"kind": "database", "schema": queries.schema_statements(self.db), "tables": tables,
                          "storage_version": SITE_DB_STORAGE_VERSION, "key": self.cache.key})  # fmt: skip
        file = self.cache.reuse(relative, digest)
        if file is None:
            queries.export_database(self.db, self.writer.path(relative), SITE_DB_STORAGE_VERSION)
            size = self.writer.account(relative)
            file = {"href": relative, "bytes": size, "size": human_size(size),
                    "storage_version": SITE_DB_STORAGE_VERSION}  # fmt: skip
            self.cache.store(relative, digest, file)
        return file


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
    db: ResultsDB,
    writer: Writer,
    runs: list[RunInfo],
    *,
    source_bytes: int = 0,
    database_copy: str = "auto",
    manifest: incremental.Manifest | None = None,
    lens_top_k: int | None = None,
) -> dict[str, Any]:
    """Write every download; returns what the downloads page and the SQL console need:
    per run id its tables, the shared tables, the database copy (or None, with the reason
    in `database_note`), `parquet`: table -> every Parquet file of it (site paths), and
    `lens_files`: run id -> where each image's lens rows are (see `_lens_files`; None where
    the run's lens files keep their token column), for parquet-mode lens pages.
    With the build `manifest`, files whose inputs have not changed since the previous build
    are kept (ExportCache) and the manifest records this build's files. `lens_top_k`: the
    lens files (and CSV) hold ranks 1..lens_top_k only (`report build --lens-top-k`)."""
    if database_copy not in DATABASE_COPY_CHOICES:
        raise ValueError(f"database_copy must be one of {DATABASE_COPY_CHOICES}")
    tables = queries.table_columns(db)
    relations = queries.relations(db)
    base_tables = {t for t in tables if t in relations} - {name for name, _ in queries.view_definitions(db)}
    cache = ExportCache(
        writer, manifest.out_dir if manifest else None, manifest.previous_downloads if manifest else None
    )
    if manifest is not None:
        manifest.downloads = cache
    if lens_top_k is not None and lens_top_k < 1:
        raise ValueError("lens_top_k must be at least 1")
    where = {LENS_TABLE: f"rank <= {int(lens_top_k)}"} if lens_top_k is not None else {}
    exporter = _Exporter(db, writer, tables, cache, where)
    downloads: dict[str, Any] = {
        "runs": {},
        "shared": [],
        "database": None,
        "database_note": "",
        "parquet": {},
        "csv_max_rows": CSV_MAX_ROWS,
        "lens_token_files": [],  # logit_lens files that keep their token column
        "prob_bits": PROB_SIGNIFICANT_BITS,
        "lens_layer_band": LENS_LAYER_BAND,  # the lens files' sort: bands of this many layers first
        "lens_top_k": lens_top_k,  # the lens files' rank cap (None: every rank collected)
        "prob_error_pct": f"{100 * PROB_RELATIVE_ERROR:.2f}",
        "lens_files": {},  # run_id -> where each image's lens rows are (parquet-mode lens pages)
    }
    lens_columns = queries.ordered_columns(db, LENS_TABLE) if LENS_TABLE in base_tables else []
    split_tokens = {"token", "token_id"} <= {name for name, _ in lens_columns}
    pieces = "token_pieces" in base_tables and {"run_id", "token_id", "text"} <= tables["token_pieces"]

    for run in runs:
        entries = []
        for table in RUN_TABLES:
            if table not in base_tables or "run_id" not in tables[table]:
                continue
            images = None
            if "image_id" in tables[table]:
                images = exporter.image_digests(table, run, token=table == LENS_TABLE and split_tokens)
                total = (sum(i[1] for i in images), sum(i[2] for i in images))
            else:
                total = queries.row_digest(db, table, exporter.exported_columns(table), run.run_id)
            count = total[0]
            if count == 0 and table != "runs":
                continue
            select = None
            tokens_entry = None
            if table == LENS_TABLE:
                keep_token = True
                if split_tokens and images is not None:
                    tokens = exporter.lens_tokens(run, images, pieces)
                    if tokens is not None:
                        keep_token = False
                        downloads["parquet"].setdefault(LENS_TOKENS, []).append(tokens["href"])
                        tokens_entry = _entry(LENS_TOKENS, tokens["rows"], [tokens], None)
                select = lens_select(lens_columns, keep_token) if lens_columns else None
            numbers_only = table == LENS_TABLE and tokens_entry is not None
            parquet = exporter.parquet(table, run, select, images, total, numbers_only)
            downloads["parquet"].setdefault(table, []).extend(f["href"] for f in parquet)
            if table == LENS_TABLE and select is not None and tokens_entry is None:
                downloads["lens_token_files"].extend(f["href"] for f in parquet)
            entry = _entry(table, count, parquet, exporter.csv(table, run, total))
            entry["rounded_prob"] = table == LENS_TABLE and select is not None
            entry["without_token"] = tokens_entry is not None
            entries.append(entry)
            if tokens_entry is not None:
                entries.append(tokens_entry)
        downloads["runs"][run.run_id] = entries
        downloads["lens_files"][run.run_id] = _lens_files(exporter, run.run_id, entries)
    for table in SHARED_TABLES:
        if table in base_tables:
            total = queries.row_digest(db, table, exporter.exported_columns(table))
            parquet = exporter.parquet(table, None, total=total)
            downloads["parquet"][table] = [f["href"] for f in parquet]
            downloads["shared"].append(_entry(table, total[0], parquet, exporter.csv(table, None, total)))
    # Tables with no rows in any run still get an (empty) file, so every table has a view.
    for table in sorted(base_tables):
        if table not in downloads["parquet"] and {"run_id", "image_id"} <= tables[table] and table in RUN_TABLES:
            relative = parquet_path(None, table)  # downloads/<table>.parquet, no rows
            digest = exporter._digest("empty", relative, table, None, 0, 0, types=queries.ordered_columns(db, table))
            if cache.reuse(relative, digest) is None:
                queries.export_parquet(
                    db, table, writer.path(relative), image_range=(1, 0), exclude=exporter._exclude(table)
                )
                cache.store(relative, digest, exporter._file(relative, 0))
            downloads["parquet"][table] = [relative]

    if database_copy == "always" or (database_copy == "auto" and source_bytes <= DATABASE_COPY_AUTO_BYTES):
        downloads["database"] = exporter.database(base_tables)
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
    downloads["files_reused"], downloads["files_exported"] = cache.reused, cache.exported
    return downloads
