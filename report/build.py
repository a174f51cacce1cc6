"""Render a results database as a static site: `build_site` puts the pages together.

Data flows collector -> db -> report: the report reads the database only, read-only,
through db/queries.py, and never imports torch or the collector. Where things are:

- report/site.py: staging writer, Jinja environment, page rendering, provenance.
- report/urls.py: the path of every page and file, and the relative URL between them.
- report/catalogue.py: runs, lens images, experiment run pages.
- report/lens_codec.py: the lens data file format ("llava-interp-lens/4").
- report/object_cells.py: annotated objects on the patch grid, once per (run, image).
- report/downloads.py: Parquet (and CSV where small) of every table, the database copy where small.
- report/charts.py: SVG chart geometry.
- report/pages/: one module per kind of page.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db import queries
from db.store import ResultsDB
from db.views import HIT_RULES
from report import catalogue, hyparquet, incremental, urls, views
from report import site as site_plumbing
from report.catalogue import LensEntry
from report.downloads import PROB_SIGNIFICANT_BITS, write_downloads
from report.object_cells import ObjectCells
from report.pages.ablation import write_ablation_pages
from report.pages.blocking import write_blocking_pages
from report.pages.compare import write_compare_page
from report.pages.depth import write_depth_page
from report.pages.downloads import write_downloads_page
from report.pages.index import write_index_page
from report.pages.lens import write_lens_page
from report.pages.quantitative import write_quantitative_page
from report.pages.reproduction import write_reproduction_page
from report.pages.sql import write_sql_page
from report.site import ReportError, Site, Writer, human_size
from report.urls import NOJEKYLL, OWNED_PATHS, run_dir_name

# Imported from here by the CLI, the collector's demo and the tests.
__all__ = ["ReportError", "SiteSummary", "build_site", "run_dir_name"]

_EXPERIMENT_WRITERS = {"ablation": write_ablation_pages, "blocking": write_blocking_pages}


# GitHub Pages: "no file over 100 MB", "published sites may be no larger than 1 GB".
MAX_FILE_BYTES = 100_000_000
MAX_SITE_BYTES = 1_000_000_000
# DuckDB's buffer pool while the build reads (it would otherwise cache up to 80 % of RAM).
DUCKDB_MEMORY_LIMIT = "256MB"
# Where lens pages get their cells (report/lens_codec.py): "inline" in their data file,
# "parquet" from the lens Parquet downloads over HTTP range requests, "auto" per run.
LENS_DATA_MODES = ("auto", "inline", "parquet")
# auto: parquet for a run with more lens pages than this. A LLaVA-1.5 page's cells are about
# 0.28 MB inline and 0.28 MB in the Parquet download, so at 200 pages the duplicate costs
# about 55 MB (a twentieth of GitHub Pages' 1 GB) and the build seconds; below that, pages
# that open from file:// (no server) are worth more than the bytes.
PARQUET_LENS_PAGES = 200


@dataclass
class SiteSummary:
    """What `build_site` wrote."""

    out_dir: Path
    runs: int
    lens_pages: int
    files_written: int
    bytes_written: int
    largest_file: str = ""
    largest_bytes: int = 0
    lens_images: int = 0  # completely written lens images, with a page or not
    lens_pages_reused: int = 0  # lens pages whose inputs had not changed since the last build: not rewritten
    files_kept: int = 0  # files identical to the previous build's: left in place
    lens_modes: dict[str, tuple[str, str]] = field(default_factory=dict)  # run_id -> (lens data mode, why)
    view_formats: dict[str, tuple[str, str]] = field(default_factory=dict)  # run_id -> (view format, why)


class LimitedWriter(Writer):
    """A Writer that refuses a file over `max_file` bytes or a site over `max_site` bytes,
    as soon as the file is written (before the rest of the build runs)."""

    def __init__(self, root: Path, max_file: int | None, max_site: int | None) -> None:
        super().__init__(root)
        self.max_file, self.max_site = max_file, max_site
        self.largest, self.largest_bytes = "", 0

    def _check(self, relative: str, size: int) -> None:
        if size > self.largest_bytes:
            self.largest, self.largest_bytes = relative, size
        if self.max_file is not None and size > self.max_file:
            raise ReportError(
                f"{relative} would be {human_size(size)}, over the {human_size(self.max_file)} limit per file "
                "(GitHub Pages refuses files over 100 MB); leave it out (--no-downloads, --lens-pages N) "
                "or raise the limit with --max-file-mb"
            )
        if self.max_site is not None and self.bytes > self.max_site:
            raise ReportError(
                f"the site would pass {human_size(self.max_site)} (GitHub Pages' limit is 1 GB) at {relative}; "
                "publish less (--lens-top-k N, --lens-pages N, --views jpeg, --no-downloads) or raise the limit with "
                "--max-site-mb"
            )

    def write(self, relative: str, content: str | bytes) -> None:
        before = self.bytes
        super().write(relative, content)
        self._check(relative, self.bytes - before)

    def write_shared(self, relative: str, content: str | bytes) -> None:
        before = self.bytes
        super().write_shared(relative, content)
        self._check(relative, self.bytes - before)

    def account(self, relative: str) -> int:
        size = super().account(relative)
        self._check(relative, size)
        return size

    def absorb(self, files: int, size: int, largest: str, largest_bytes: int) -> None:
        """Count what a worker process wrote into the same staging folder."""
        self.files += files
        self.bytes += size
        if largest_bytes:
            self._check(largest, largest_bytes)


def _check_hit_rule(db: ResultsDB, runs: list[catalogue.RunInfo], hit_rule: str) -> None:
    """'first_token' needs every lens run's class tokens (written by the lens collector since
    schema 8): without them its hit rates would read as zero, not as unknown."""
    if hit_rule not in HIT_RULES:
        raise ReportError(f"unknown lens hit rule {hit_rule!r} (one of {', '.join(HIT_RULES)})")
    if hit_rule != "first_token":
        return
    with_tokens = queries.runs_with_class_tokens(db)
    missing = [run.run_id for run in runs if run.experiment == "lens" and run.run_id not in with_tokens]
    if missing:
        raise ReportError(
            f"lens run {missing[0]} has no class tokens (collected before schema 8), so the first_token hit "
            "rule cannot be applied; build with --hit-rule word or collect the run again"
        )


def build_site(
    db_path: Path,
    out_dir: Path,
    *,
    downloads: bool = True,
    database_copy: str = "auto",
    lens_pages: int | None = None,
    max_file_bytes: int | None = MAX_FILE_BYTES,
    max_site_bytes: int | None = MAX_SITE_BYTES,
    jobs: int = 1,
    hit_rule: str = "word",
    lens_data: str = "auto",
    lens_top_k: int | None = None,
    view_format: str = "auto",
) -> SiteSummary:
    """Render the database at `db_path` into `out_dir`.

    The site is rendered into a staging folder inside `out_dir` first, so a failed build
    leaves the previous site in place; on success the generated paths (urls.OWNED_PATHS)
    are replaced and nothing else in `out_dir` is touched. `downloads=False` leaves out the
    Parquet and CSV files and the database copy (and every link to them);
    `database_copy` is "auto", "always" or "never" (report/downloads.py). `lens_pages`
    keeps the lens pages (and the quantitative page) to the first N images of each lens
    run (the downloads keep every image). A file over `max_file_bytes` or a site over `max_site_bytes` (None: no
    limit) is a ReportError raised as soon as it is written. `jobs` > 1 renders the lens
    pages in that many processes. Lens pages are rendered image by image, reading only
    that image's rows. `hit_rule` (db.views.HIT_RULES) is the lens hit rule of the
    quantitative, depth and reproduction pages. `lens_data` (LENS_DATA_MODES) is where lens
    pages get their cells: "inline" in each page's data file (opens from file://), "parquet"
    from the lens Parquet downloads (needs http(s) and downloads), "auto" parquet for runs
    with more than PARQUET_LENS_PAGES pages when downloads are on. `lens_top_k` publishes ranks
    1..lens_top_k of each lens cell only (pages and lens downloads; None: every rank collected);
    the database and the pages computed from it (quantitative, depth, reproduction) keep all.
    `view_format` (report/views.py VIEW_FORMATS) is how each run's pictures are published. Raises db.errors.DatabaseError for an unusable database file and
    ReportError for results that cannot be rendered faithfully.
    """
    db_path, out_dir = Path(db_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"output path exists and is not a folder: {out_dir}")
    if lens_data not in LENS_DATA_MODES:
        raise ReportError(f"unknown lens data mode {lens_data!r} (one of {', '.join(LENS_DATA_MODES)})")
    if lens_data == "parquet" and not downloads:
        raise ReportError(
            "--lens-data parquet reads the lens cells from the Parquet downloads, which --no-downloads leaves out: "
            "drop --no-downloads or build with --lens-data inline"
        )
    if lens_top_k is not None and lens_top_k < 1:
        raise ReportError(f"--lens-top-k must be at least 1, not {lens_top_k}")
    if view_format not in views.VIEW_FORMATS:
        raise ReportError(f"unknown view format {view_format!r} (one of {', '.join(views.VIEW_FORMATS)})")
    generated_at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    with ResultsDB(db_path, read_only=True) as db:
        db.duck.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
        db.duck.execute("SET enable_progress_bar = false")
        provenance = site_plumbing.provenance(db, db_path, generated_at)
        runs = catalogue.load_runs(db)
        _check_hit_rule(db, runs, hit_rule)
        all_entries = catalogue.load_lens_entries(db, runs)
        entries = _limit_pages(all_entries, lens_pages)
        modes = _lens_modes(entries, lens_data, downloads)
        view_formats = _view_formats(runs, entries, view_format)
        experiment_pages = catalogue.experiment_pages(runs)
        objects = ObjectCells.from_db(db)
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".report-build-", dir=out_dir))
        try:
            writer = LimitedWriter(stage, max_file_bytes, max_site_bytes)
            common = site_plumbing.common_context(provenance, generated_at, catalogue.experiment_nav(experiment_pages))
            common["hit_rule"] = hit_rule  # the lens hit rule the pages name
            common["has_downloads"] = downloads  # every page's nav: no Downloads link without downloads
            common["lens_top_k"] = lens_top_k  # ranks published per lens cell (None: all)
            site = Site(writer, site_plumbing.environment(), common)
            site_plumbing.copy_static(writer)
            writer.write(NOJEKYLL, "")
            manifest = incremental.Manifest(out_dir, provenance["tool_version"], incremental.code_digest())
            download_info: dict[str, Any] | None = None

            def export() -> None:  # meanwhile, when lens pages render in worker processes
                nonlocal download_info
                if downloads:
                    download_info = write_downloads(
                        db,
                        writer,
                        runs,
                        source_bytes=db_path.stat().st_size,
                        database_copy=database_copy,
                        manifest=manifest,
                        lens_top_k=lens_top_k,
                    )

            sources: dict[tuple[str, int], dict[str, Any]] = {}
            if any(mode == "parquet" for mode, _ in modes.values()):
                export()  # parquet-mode pages point into the files: their layout first
                sources = _lens_sources(db, writer, entries, modes, download_info, lens_top_k)
                if sources:
                    reader, _ = hyparquet.find_hyparquet()
                    assert reader is not None  # checked by _lens_modes
                    hyparquet.copy_hyparquet(reader, writer)
            lens_shapes, reused = _write_lens_pages(
                db,
                db_path,
                site,
                writer,
                entries,
                objects,
                jobs,
                manifest,
                meanwhile=export if download_info is None else lambda: None,
                sources=sources,
            )
            quant_runs = write_quantitative_page(db, site, runs, entries, lens_shapes, objects, hit_rule)
            depth_count = write_depth_page(db, site, runs, quant_runs)  # depth.html: every run at relative depth
            if download_info is not None:
                write_downloads_page(site, runs, download_info)
            write_sql_page(db, site, download_info)  # sql.html, vendor/duckdb-wasm/
            write_compare_page(db, site, entries)  # compare.html: one image in two lens runs
            for page in experiment_pages:
                _EXPERIMENT_WRITERS[page.experiment](db, site, page)
            # reproduction.html: the paper's headline values beside ours, linking to the pages above
            write_reproduction_page(db, site, runs, {page.path for page in experiment_pages}, hit_rule, objects)
            write_index_page(
                site,
                runs,
                entries,
                db_name=db_path.name,
                has_downloads=download_info is not None,
                quant_count=len(quant_runs),
                depth_count=depth_count,
                experiment_pages=experiment_pages,
            )
            kept = incremental.keep_unchanged(out_dir, stage, OWNED_PATHS)
            kept += download_info["files_reused"] if download_info else 0  # linked before, not exported
            manifest.write(stage)  # after keep_unchanged: it records the downloads' mtimes
            site_plumbing.replace_owned(stage, out_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    return SiteSummary(
        out_dir=out_dir,
        runs=len(runs),
        lens_pages=len(entries),
        files_written=writer.files,
        bytes_written=writer.bytes,
        largest_file=writer.largest,
        largest_bytes=writer.largest_bytes,
        lens_images=len(all_entries),
        lens_pages_reused=reused,
        files_kept=kept,
        lens_modes=modes,
        view_formats=view_formats,
    )


def _view_formats(
    runs: list[catalogue.RunInfo], entries: list[LensEntry], view_format: str
) -> dict[str, tuple[str, str]]:
    """run_id -> (view format, why) for every run whose pages show views, set on the runs
    (RunInfo.view_format) for the pages: a lens run counts its lens pages, an ablation or
    blocking run its images (one page each)."""
    pages: dict[str, int] = {}
    for entry in entries:
        pages[entry.run.run_id] = pages.get(entry.run.run_id, 0) + 1
    chosen = {}
    for run in runs:
        count = pages.get(run.run_id, 0) if run.experiment == "lens" else run.image_count
        if count:
            run.view_format, why = views.choose(view_format, count)
            chosen[run.run_id] = (run.view_format, why)
    return chosen


def _lens_modes(entries: list[LensEntry], mode: str, downloads: bool) -> dict[str, tuple[str, str]]:
    """run_id -> (lens data mode, why) for every run with lens pages, before the export
    (a parquet run whose download keeps its token column falls back in `_lens_sources`)."""
    pages: dict[str, int] = {}
    for entry in entries:
        pages[entry.run.run_id] = pages.get(entry.run.run_id, 0) + 1
    reader, problem = hyparquet.find_hyparquet()
    if mode == "parquet" and reader is None and pages:
        raise ReportError(f"--lens-data parquet needs the vendored Parquet reader: {problem}")
    out: dict[str, tuple[str, str]] = {}
    for run_id, n in pages.items():
        if mode == "inline":
            out[run_id] = ("inline", "--lens-data inline")
        elif mode == "parquet":
            out[run_id] = ("parquet", "--lens-data parquet")
        elif not downloads:
            out[run_id] = ("inline", "no downloads to read the cells from")
        elif n <= PARQUET_LENS_PAGES:
            out[run_id] = ("inline", f"{n} lens pages, at most {PARQUET_LENS_PAGES}: pages open from file://")
        elif reader is None:
            out[run_id] = ("inline", f"no vendored Parquet reader ({problem})")
        else:
            out[run_id] = ("parquet", f"{n} lens pages, over {PARQUET_LENS_PAGES}: one copy of the cells")
    return out


# Parquet-mode pages read their other inputs (positions, views, ...) this many images at a time.
INPUT_BATCH = 128


def _with_inputs(
    db: ResultsDB, entries: list[LensEntry], sources: dict[tuple[str, int], dict[str, Any]]
) -> Iterator[tuple[LensEntry, dict[str, Any] | None, dict[tuple[str, int, str], bytes]]]:
    """Each entry with its parquet-mode source (None: inline), the source completed with the
    page's other inputs read INPUT_BATCH images at a time (queries.lens_page_inputs), so a
    parquet-mode page makes no query of its own, and the batch's pictures ((table, image_id,
    name) -> PNG; queries.pictures: a query per image would read a whole vector of them)."""
    for start in range(0, len(entries), INPUT_BATCH):
        batch = entries[start : start + INPUT_BATCH]
        inputs: dict[str, dict[int, queries.LensPageInputs]] = {}
        pieces: dict[str, dict[int, str]] = {}
        for run_id in dict.fromkeys(e.run.run_id for e in batch if (e.run.run_id, e.image_id) in sources):
            image_ids = [e.image_id for e in batch if e.run.run_id == run_id and (run_id, e.image_id) in sources]
            inputs[run_id] = queries.lens_page_inputs(db, run_id, image_ids)
            wanted = {
                int(token_id)
                for page in inputs[run_id].values()
                for token_id, position in zip(page.token_ids, page.positions)
                if token_id is not None and position.kind == "text"
            }
            pieces[run_id] = queries.token_pieces(db, run_id, wanted)
        # Each read of pictures holds the 2,048 stored around them (queries.PICTURE_SPAN): the
        # batch's own 128 are a small part of that, and fewer reads cost less.
        pictures = _pictures(db, batch)
        for entry in batch:
            source = sources.get((entry.run.run_id, entry.image_id))
            page = inputs.get(entry.run.run_id, {}).get(entry.image_id)
            if source is not None and page is not None:
                source = {**source, "inputs": page, "pieces": pieces[entry.run.run_id]}
            yield (
                entry,
                source,
                {
                    (table, image_id, name): png
                    for (run_id, table, image_id, name), png in pictures.items()
                    if run_id == entry.run.run_id and image_id == entry.image_id
                },
            )


def _pictures(db: ResultsDB, entries: list[LensEntry]) -> dict[tuple[str, str, int, str], bytes]:
    """(run_id, table, image_id, name) -> PNG of the entries' views and extra views
    (queries.pictures). Two runs of one image have pictures of their own."""
    out: dict[tuple[str, str, int, str], bytes] = {}
    for run_id in dict.fromkeys(e.run.run_id for e in entries):
        image_ids = [e.image_id for e in entries if e.run.run_id == run_id]
        for (table, image_id, name), png in queries.image_pictures(db, run_id, image_ids).items():
            out[(run_id, table, image_id, name)] = png
    return out


def _parquet_footer_bytes(path: Path) -> int:
    """The bytes a reader fetches first from a Parquet file: its footer (the metadata, its
    4-byte length and the 4-byte magic), so the page gets it in one request."""
    with path.open("rb") as handle:
        handle.seek(-8, 2)
        tail = handle.read(8)
    if tail[4:] != b"PAR1":
        raise ReportError(f"{path.name} is not a Parquet file")
    return int.from_bytes(tail[:4], "little") + 8


def _lens_sources(
    db: ResultsDB,
    writer: Writer,
    entries: list[LensEntry],
    modes: dict[str, tuple[str, str]],
    download_info: dict[str, Any] | None,
    lens_top_k: int | None = None,
) -> dict[tuple[str, int], dict[str, Any]]:
    """(run_id, image_id) -> what its parquet-mode page reads (report/pages/lens.py `lens_data`):
    the lens file (relative to the page), its bytes, the image's row range, the run's token
    text and pieces files. A run whose lens download keeps its token column (or has no token
    ids) is set back to inline in `modes`."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    layouts = (download_info or {}).get("lens_files", {})
    facts: dict[str, dict[int, queries.LensImageFacts]] = {}
    footers: dict[str, int] = {}
    for entry in entries:
        run_id = entry.run.run_id
        if modes.get(run_id, ("inline", ""))[0] != "parquet":
            continue
        layout = layouts.get(run_id)
        if layout is None:
            modes[run_id] = ("inline", "its lens download keeps the token text (or has no token ids)")
            continue
        if run_id not in facts:
            facts[run_id] = queries.lens_image_facts(db, run_id, lens_top_k)
        image_facts = facts[run_id].get(entry.image_id)
        file = next((f for f in layout["files"] if entry.image_id in f["images"]), None)
        if image_facts is None or file is None:
            continue  # no lens rows: lens_data reports it
        page = entry.page
        start, end = file["images"][entry.image_id]
        if file["href"] not in footers:
            footers[file["href"]] = _parquet_footer_bytes(writer.path(file["href"]))
        pieces = layout["pieces"]
        out[(run_id, entry.image_id)] = {
            "source": {
                "reader": urls.href(page, hyparquet.MODULE_PATH),
                "file": urls.href(page, file["href"]),
                "bytes": file["bytes"],
                "footer_bytes": footers[file["href"]],
                "row_start": start,
                "row_end": end,
                "tokens": {"file": urls.href(page, layout["tokens"]["href"]), "bytes": layout["tokens"]["bytes"]},
                "pieces": {"file": urls.href(page, pieces["href"]), "bytes": pieces["bytes"]} if pieces else None,
                "prob_bits": PROB_SIGNIFICANT_BITS,
            },
            "facts": image_facts,
        }
    return out


def _limit_pages(entries: list[LensEntry], per_run: int | None) -> list[LensEntry]:
    if per_run is None:
        return entries
    kept: dict[str, int] = {}
    out = []
    for entry in entries:
        if kept.get(entry.run.run_id, 0) < per_run:
            kept[entry.run.run_id] = kept.get(entry.run.run_id, 0) + 1
            out.append(entry)
    return out


Shapes = dict[tuple[str, int], tuple[int, int, int]]


def _write_lens_pages(
    db: ResultsDB,
    db_path: Path,
    site: Site,
    writer: LimitedWriter,
    entries: list[LensEntry],
    objects: ObjectCells,
    jobs: int,
    manifest: incremental.Manifest,
    meanwhile: Callable[[], None] = lambda: None,
    sources: dict[tuple[str, int], dict[str, Any]] | None = None,
) -> tuple[Shapes, int]:
    """Every lens page, one image at a time (in `jobs` processes when > 1); returns
    (run, image) -> (n_layers, grid_rows, grid_cols) and how many pages were reused: a
    page whose input digest matches the previous build's (report/incremental.py) is linked
    from the previous site, not rendered. `meanwhile` runs in this process while worker
    processes render (after the pages when there are none), so the downloads' export overlaps
    the pages. `sources`: where each parquet-mode page reads its cells (absent: inline)."""
    sources = sources or {}
    published = frozenset((entry.run.run_id, entry.image_id) for entry in entries)  # links only to these
    runs_of_image: dict[int, list[str]] = {}
    for run_id, image_id in sorted(published):
        runs_of_image.setdefault(image_id, []).append(run_id)
    runs_by_id = {entry.run.run_id: [entry.run.run_id, entry.run.config_json, entry.run.model_id] for entry in entries}
    rows = incremental.row_digests(db, sorted({entry.run.run_id for entry in entries}))
    context = {
        key: site.common.get(key)
        for key in ("experiment_nav", "has_downloads", "demo_warning", "schema_latest", "lens_top_k")
    }
    shapes: Shapes = {}
    todo: list[tuple[LensEntry, str]] = []
    reused = 0
    for entry in entries:
        key = (entry.run.run_id, entry.image_id)
        others = [runs_by_id[r] for r in runs_of_image.get(entry.image_id, []) if r != entry.run.run_id]
        source = sources.get(key)
        lens = {"mode": "parquet", **source["source"]} if source else {"mode": "inline"}
        digest = incremental.page_digest(entry, rows.get(key), others, context, manifest.key["code"], lens=lens)
        record = manifest.reusable(entry, digest)
        if record is None:
            todo.append((entry, digest))
            continue
        for relative in record["files"]:
            if (writer.root / relative).exists():
                continue  # a parquet run's shared positions file, already linked for another page
            incremental.link_previous(manifest.out_dir, writer.root, relative)
            writer.account(relative)
        entry.summary = record["summary"]
        shapes[key] = tuple(record["shape"])
        manifest.lens[manifest.name(entry)] = record
        reused += 1
    digests = {(entry.run.run_id, entry.image_id): digest for entry, digest in todo}
    pending = [entry for entry, _ in todo]
    if jobs <= 1 or len(pending) < 2 * jobs:
        lens_runs = queries.runs(db, "lens")
        for entry, source, pictures in _with_inputs(db, pending, sources):
            writer.written = []
            data = write_lens_page(db, site, entry, objects, published, source, lens_runs, pictures)
            shape = (data["n_layers"], data["grid_rows"], data["grid_cols"])
            shapes[(entry.run.run_id, entry.image_id)] = shape
            manifest.record(entry, digests[(entry.run.run_id, entry.image_id)], writer.written, shape)
        writer.written = None
        meanwhile()
        return shapes, reused
    import multiprocessing

    # Consecutive images per worker: their pictures sit next to each other (queries.pictures).
    shares = [pending[i * len(pending) // jobs : (i + 1) * len(pending) // jobs] for i in range(jobs)]
    context_mp = multiprocessing.get_context("spawn")  # never fork an open DuckDB connection
    with context_mp.Pool(jobs) as pool:
        pending_results = pool.starmap_async(
            _lens_worker,
            [
                (
                    db_path,
                    writer.root,
                    share,
                    site.common,
                    published,
                    {
                        (e.run.run_id, e.image_id): sources[(e.run.run_id, e.image_id)]
                        for e in share
                        if (e.run.run_id, e.image_id) in sources
                    },
                )
                for share in shares
            ],
        )
        meanwhile()
        results = pending_results.get()
    summaries: dict[tuple[str, int], Any] = {}
    written: dict[tuple[str, int], list[str]] = {}
    for worker_shapes, worker_summaries, worker_files, files, size, largest, largest_bytes in results:
        shapes.update(worker_shapes)
        summaries.update(worker_summaries)
        written.update(worker_files)
        writer.absorb(files, size, largest, largest_bytes)
    for entry in pending:  # the index's per-image columns, computed in the workers
        key = (entry.run.run_id, entry.image_id)
        entry.summary = summaries.get(key)
        manifest.record(entry, digests[key], written.get(key, []), shapes[key])
    return shapes, reused


def _lens_worker(
    db_path: Path,
    root: Path,
    entries: list[LensEntry],
    common: dict,
    published: frozenset[tuple[str, int]],
    sources: dict[tuple[str, int], dict[str, Any]],
) -> tuple:
    writer = LimitedWriter(root, None, None)  # the parent checks the limits on what comes back
    site = Site(writer, site_plumbing.environment(), common)
    shapes: Shapes = {}
    written: dict[tuple[str, int], list[str]] = {}
    with ResultsDB(db_path, read_only=True) as db:
        db.duck.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
        db.duck.execute("SET threads = 1")
        objects = ObjectCells.from_db(db)
        lens_runs = queries.runs(db, "lens")
        for entry, source, pictures in _with_inputs(db, entries, sources):
            writer.written = []
            data = write_lens_page(db, site, entry, objects, published, source, lens_runs, pictures)
            shapes[(entry.run.run_id, entry.image_id)] = (data["n_layers"], data["grid_rows"], data["grid_cols"])
            written[(entry.run.run_id, entry.image_id)] = writer.written
    summaries = {(entry.run.run_id, entry.image_id): entry.summary for entry in entries}
    return shapes, summaries, written, writer.files, writer.bytes, writer.largest, writer.largest_bytes
