"""Render a results database as a static site: an index of runs and one logit-lens page
per completely written (run, image).

Data flows collector -> db -> report: this module reads the database only, read-only,
and never imports torch or the collector. Every URL it writes is relative, so the site
works from file:// and under a GitHub Pages project path.

Lens data file format (`lens/<run>/<image_id>.data.js`, format "llava-interp-lens/2")
-----------------------------------------------------------------------------------
The file is exactly ``window.LENS_DATA = <json>;`` (a classic script, because browsers
block fetch() on file://). The JSON object holds:

- ``run_id``, ``image_id``, ``n_layers`` (layer 0 = embeddings), ``top_k``,
  ``grid_rows``, ``grid_cols``, ``n_cells`` (= n_layers * n_positions * top_k).
- ``positions``: parallel arrays ``position``, ``kind`` ('image' | 'text', or a further
  image kind such as LLaVA-NeXT's 'image_hr' and 'image_newline'), ``label``,
  ``patch_row``, ``patch_col`` (null for text), sorted by LM input position. The index
  into these arrays is the table row ("row" below); the overlay maps patch
  (patch_row, patch_col) to its row through these arrays, never through row order. For
  kind 'image' the cell is of the main grid; for another kind, of the extra view of
  that kind (if any).
- ``view``: ``{"width", "height"}`` of the model's input view in pixels, or null.
- ``extra_views``: one entry per further view of the image (table ``extra_views``, e.g.
  LLaVA-NeXT's high-resolution view; empty for most families): ``name``, ``kind``,
  ``width``, ``height``, ``grid_rows``, ``grid_cols`` and ``png`` (the image file, relative
  to the page). Positions of that ``kind`` are its cells, through their
  (patch_row, patch_col), each cell at most once.
- ``objects``: one entry per annotated category of the image: ``category``,
  ``cells`` (flat patch indices ``patch_row * grid_cols + patch_col`` overlapping the
  category's non-crowd masks, see report/quantitative.py) and ``outlines`` (per
  annotation: ``annotation_id``, ``polygons`` as flat [u0, v0, u1, v1, ...] lists in view
  pixels, or ``bbox`` [u, v, w, h] for RLE masks).
- ``packed``: ``{"encoding": "deflate-raw", "b64", "tokens_bytes", "index_bytes",
  "prob_log_scale"}``. base64 of a raw DEFLATE stream (RFC 1951; browsers inflate it with
  ``DecompressionStream("deflate-raw")``) whose inflated bytes are, in order:

  1. ``tokens_bytes`` bytes: UTF-8 JSON array of the distinct token strings, most
     frequent first (so frequent tokens get small indices);
  2. ``n_cells * index_bytes`` bytes: the token index (into that array) of every cell,
     little-endian unsigned integers of ``index_bytes`` (1, 2 or 4) bytes stored
     byte-planar (all low bytes, then all next bytes, ...), which deflates better;
  3. ``n_cells`` bytes: probability codes. Code ``c`` >= 1 means
     ``p = exp((c - 255) / prob_log_scale)`` (relative error at most
     ``exp(0.5 / prob_log_scale) - 1``, 2.5 % for the scale 20 used); code 0 means
     ``p < exp(-254.5 / prob_log_scale)`` (about 3e-6) and decodes to 0.

  Cell (layer l, row r, rank k >= 1) is at ``(l * n_positions + r) * top_k + (k - 1)``.
  The build refuses images with missing cells, so every cell is present.

The JSON is escaped so no string can end the script or the line: ``<``, ``>``, ``&``,
U+2028 and U+2029 are written as \\uXXXX escapes.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import importlib
import json
import re
import shutil
import tempfile
import urllib.parse
import zlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np

from db.geometry import ViewGeometry, object_cells_by_category, view_outline
from db.migrations import LATEST_VERSION
from db.store import ResultsDB
from db.version import TOOL_VERSION
from report import quantitative, sql_console

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

LENS_EXPERIMENT = "lens"
DATA_FORMAT = "llava-interp-lens/2"
# Probability code c >= 1 <-> p = exp((c - 255) / PROB_LOG_SCALE); 0 <-> below the floor.
PROB_LOG_SCALE = 20.0
DEMO_WARNING = "weights are random: demo output, not results"
SITE_DB_NAME = "results.duckdb"
# DuckDB-WASM 1.x reads storage format v1.4.0 and older, not the newest.
SITE_DB_STORAGE_VERSION = "v1.4.0"
# Tables exported as CSV per run (those with a run_id column) and once (those without).
RUN_TABLES = (
    "runs", "run_images", "skipped", "positions", "logit_lens", "image_views", "extra_views", "ablations", "blocking",
)
# Run tables whose PNG column is left out of the CSV (the images sit next to the pages).
PNG_TABLES = ("image_views", "extra_views")
SHARED_TABLES = ("images", "annotations", "mean_vectors", "schema_migrations")
# Optional experiment pages: module name -> (page file, title). Each module, when it
# exists, exposes `<name>_page_data(db, run_id) -> dict` (see _experiment_pages).
EXPERIMENT_PAGES = {"ablation": ("ablation", "Token ablation"), "blocking": ("blocking", "Attention blocking")}
# Experiments with a dedicated run page and per-image drill-down pages (the rest: generic).
DEDICATED_EXPERIMENT_TEMPLATES = {"ablation": "ablation.html.j2", "blocking": "blocking.html.j2"}

# What the build owns inside out_dir; everything else there is left alone.
OWNED_PATHS = (
    "index.html", "quantitative.html", "downloads.html", "sql.html", "experiments",
    "lens", "static", "downloads", "data", "vendor", ".nojekyll",
)

# Config keys worth a glance in the index; the full config is on each lens page.
CONFIG_SUMMARY_KEYS = ("revision", "dtype", "device", "top_k", "prompt")

_JSON_SCRIPT_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_JSON_SCRIPT_UNSAFE = re.compile("[<>&\u2028\u2029]")
_SAFE_PATH_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}")


class ReportError(Exception):
    """Results the report cannot render faithfully (one line, shown by the CLI)."""


@dataclass
class SiteSummary:
    """What `build_site` wrote."""

    out_dir: Path
    runs: int
    lens_pages: int
    files_written: int
    bytes_written: int


@dataclass
class _RunInfo:
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
    dir_name: str
    config_summary: list[tuple[str, str]]
    image_count: int = 0
    skipped_count: int = 0


@dataclass
class _LensEntry:
    run: _RunInfo
    image_id: int
    file_name: str
    categories: list[str]
    width: int | None
    height: int | None
    has_view: bool
    view_width: int | None
    view_height: int | None
    page_href: str = ""
    png_href: str = ""
    search_text: str = ""


def script_json(value: Any) -> str:
    """JSON text safe to embed in a classic script, in HTML or in a .js file."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return _JSON_SCRIPT_UNSAFE.sub(lambda m: _JSON_SCRIPT_ESCAPES[m.group()], text)


def _readable_json(value: Any) -> str:
    """Indented JSON for people: non-ASCII stays readable, invisible line separators are escaped."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def run_dir_name(run_id: str) -> str:
    """A file-system and URL safe folder name for a run, unique per run id."""
    if _SAFE_PATH_COMPONENT.fullmatch(run_id):
        return run_id
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-.")[:40] or "run"
    return f"{slug}-{hashlib.sha256(run_id.encode()).hexdigest()[:10]}"


def _format_time(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M UTC")  # the store writes naive UTC
    return str(value)


def _as_config(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {"config": value}
    return dict(value) if isinstance(value, dict) else {"config": value}


def _summary_value(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _load_runs(db: ResultsDB) -> list[_RunInfo]:
    runs = []
    for row in db.runs():
        config = _as_config(row["config"])
        runs.append(
            _RunInfo(
                run_id=row["run_id"],
                experiment=row["experiment"],
                model_id=row["model_id"],
                config=config,
                config_json=_readable_json(config),
                status=row["status"],
                started_at=_format_time(row["started_at"]),
                finished_at=_format_time(row["finished_at"]),
                tool_version=row["tool_version"],
                demo=config.get("demo") is True,
                dir_name=run_dir_name(row["run_id"]),
                config_summary=[
                    (key, _summary_value(config[key])) for key in CONFIG_SUMMARY_KEYS if key in config
                ],
            )
        )
    dir_names = [run.dir_name for run in runs]
    if len(set(dir_names)) != len(dir_names):
        raise ReportError("two runs map to the same folder name; rename one run id")
    return runs


def _load_lens_entries(db: ResultsDB, runs: list[_RunInfo]) -> list[_LensEntry]:
    by_id = {run.run_id: run for run in runs}
    for run_id, count in db.sql("SELECT run_id, count(*) FROM run_images GROUP BY run_id"):
        if run_id in by_id:
            by_id[run_id].image_count = count
    for run_id, count in db.sql("SELECT run_id, count(DISTINCT image_id) FROM skipped GROUP BY run_id"):
        if run_id in by_id:
            by_id[run_id].skipped_count = count

    categories: dict[int, list[str]] = {}
    for image_id, category in db.sql(
        "SELECT DISTINCT image_id, category FROM annotations ORDER BY image_id, category"
    ):
        categories.setdefault(image_id, []).append(category)

    rows = db.sql(
        """
        SELECT ri.run_id, ri.image_id, i.file_name, i.width, i.height,
               v.image_id IS NOT NULL AS has_view, v.view_width, v.view_height
        FROM run_images ri
        JOIN runs r USING (run_id)
        LEFT JOIN images i USING (image_id)
        LEFT JOIN image_views v ON v.run_id = ri.run_id AND v.image_id = ri.image_id
        WHERE r.experiment = ?
          -- A skipped image carries its marker (so a rerun does not retry it) but no rows.
          AND NOT EXISTS (
              SELECT 1 FROM skipped s WHERE s.run_id = ri.run_id AND s.image_id = ri.image_id
          )
        ORDER BY r.started_at, ri.run_id, ri.image_id
        """,
        [LENS_EXPERIMENT],
    )
    entries = []
    for run_id, image_id, file_name, width, height, has_view, view_width, view_height in rows:
        run = by_id[run_id]
        entry = _LensEntry(
            run=run,
            image_id=int(image_id),
            file_name=file_name or "",
            categories=categories.get(image_id, []),
            width=width,
            height=height,
            has_view=bool(has_view),
            view_width=view_width,
            view_height=view_height,
        )
        base = f"lens/{urllib.parse.quote(run.dir_name)}/{entry.image_id}"
        entry.page_href = base + ".html"
        entry.png_href = base + ".png" if entry.has_view else ""
        entry.search_text = " ".join(
            [str(entry.image_id), entry.file_name, run.model_id, run.run_id, *entry.categories]
        ).lower()
        entries.append(entry)
    return entries


def lens_data(
    db: ResultsDB,
    run_id: str,
    image_id: int,
    *,
    geometries: dict[tuple[str, int], ViewGeometry] | None = None,
    annotations: dict[int, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The lens data object of one completely written (run, image), validated.

    Raises ReportError when the rows cannot be mapped faithfully (patches outside the
    grid, two positions on one patch, lens rows for unknown positions or layers,
    duplicate or missing (layer, position, rank) cells).
    """
    where = (run_id, image_id)
    marker = db.sql(
        "SELECT n_positions, n_layers, grid_rows, grid_cols FROM run_images "
        "WHERE run_id = ? AND image_id = ?",
        where,
    )
    if not marker:
        raise ReportError(f"run {run_id!r} image {image_id}: not completely written")
    n_positions, n_layers_marker, grid_rows, grid_cols = marker[0]
    context = f"run {run_id!r} image {image_id}"

    pos_rows = db.sql(
        "SELECT position, kind, patch_row, patch_col, label FROM positions "
        "WHERE run_id = ? AND image_id = ? ORDER BY position",
        where,
    )
    if len(pos_rows) != n_positions:
        raise ReportError(f"{context}: {len(pos_rows)} positions written, run_images says {n_positions}")
    position_numbers = [row[0] for row in pos_rows]
    kinds, labels, patch_rows, patch_cols = [], [], [], []
    seen_patches: set[tuple[int, int]] = set()
    for position, kind, patch_row, patch_col, label in pos_rows:
        if kind == "image":
            if patch_row is None or patch_col is None:
                raise ReportError(f"{context}: image position {position} has no patch coordinates")
            if not (0 <= patch_row < grid_rows and 0 <= patch_col < grid_cols):
                raise ReportError(
                    f"{context}: position {position} patch ({patch_row}, {patch_col}) is outside "
                    f"the {grid_rows}x{grid_cols} grid"
                )
            if (patch_row, patch_col) in seen_patches:
                raise ReportError(f"{context}: two positions on patch ({patch_row}, {patch_col})")
            seen_patches.add((patch_row, patch_col))
        elif kind == "text":
            patch_row = patch_col = None
        elif not kind.startswith("image_"):  # further image kinds (e.g. 'image_hr') keep their cells
            raise ReportError(f"{context}: position {position} has unknown kind {kind!r}")
        kinds.append(kind)
        labels.append(label)
        patch_rows.append(patch_row)
        patch_cols.append(patch_col)

    lens = db.duck.sql(
        "SELECT layer, position, rank, token, prob FROM logit_lens WHERE run_id = ? AND image_id = ?",
        params=list(where),
    ).to_arrow_table()
    layer = lens.column("layer").to_numpy().astype(np.int64)
    position = lens.column("position").to_numpy().astype(np.int64)
    rank = lens.column("rank").to_numpy().astype(np.int64)
    prob = lens.column("prob").to_numpy().astype(np.float64)
    encoded = lens.column("token").combine_chunks().dictionary_encode()
    token_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    tokens: list[str] = encoded.dictionary.to_pylist()

    n_rows = len(pos_rows)
    if len(layer) and (layer.min() < 0 or rank.min() < 1):
        raise ReportError(f"{context}: lens rows with a negative layer or a rank below 1")
    n_layers = int(n_layers_marker) if n_layers_marker is not None else int(layer.max(initial=-1)) + 1
    if len(layer) and layer.max() >= n_layers:
        raise ReportError(f"{context}: lens rows for layer {int(layer.max())}, run_images says {n_layers} layers")
    top_k = int(rank.max(initial=0))

    row_of_position = np.full(max(position_numbers, default=-1) + 1, -1, dtype=np.int64)
    row_of_position[position_numbers] = np.arange(n_rows)
    known = (position >= 0) & (position < len(row_of_position))
    row = np.full(len(position), -1, dtype=np.int64)
    row[known] = row_of_position[position[known]]
    if (row < 0).any():
        unknown = int(position[row < 0][0])
        raise ReportError(f"{context}: lens rows for position {unknown}, which is not in positions")

    flat = (layer * n_rows + row) * top_k + (rank - 1)
    if len(np.unique(flat)) != len(flat):
        raise ReportError(f"{context}: duplicate lens rows for one (layer, position, rank)")

    n_cells = n_layers * n_rows * top_k
    # A gap would render as an empty cell that reads like data; a complete image has none.
    if n_cells == 0 or len(flat) != n_cells:
        raise ReportError(
            f"{context}: lens rows cover {len(flat)} of {n_layers} layers x {n_rows} positions "
            f"x top-{top_k} = {n_cells} cells"
        )
    # Frequency order: the most common tokens get the smallest indices (fewer high bytes).
    counts = np.bincount(token_codes, minlength=len(tokens))
    order = np.argsort(-counts, kind="stable")
    new_code = np.empty_like(order)
    new_code[order] = np.arange(len(order))
    tokens = [tokens[i] for i in order]
    index_bytes = 1 if len(tokens) <= 0x100 else 2 if len(tokens) <= 0x10000 else 4
    token_index = np.zeros(n_cells, dtype=np.uint64)
    token_index[flat] = new_code[token_codes]
    codes = np.zeros(n_cells, dtype=np.uint8)
    codes[flat] = encode_probs(prob)
    planes = np.frombuffer(token_index.astype(f"<u{index_bytes}").tobytes(), dtype=np.uint8)
    planes = planes.reshape(n_cells, index_bytes).T.tobytes()
    tokens_json = json.dumps(tokens, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = compressor.compress(tokens_json + planes + codes.tobytes()) + compressor.flush()

    return {
        "format": DATA_FORMAT,
        "run_id": run_id,
        "image_id": image_id,
        "n_layers": n_layers,
        "top_k": top_k,
        "grid_rows": grid_rows,
        "grid_cols": grid_cols,
        "n_cells": n_cells,
        "positions": {
            "position": position_numbers,
            "kind": kinds,
            "label": labels,
            "patch_row": patch_rows,
            "patch_col": patch_cols,
        },
        "view": _view_size(db, run_id, image_id),
        "extra_views": _extra_views(db, run_id, image_id, context, kinds, patch_rows, patch_cols, position_numbers),
        "objects": _objects(db, run_id, image_id, grid_rows, grid_cols, geometries, annotations),
        "packed": {
            "encoding": "deflate-raw",
            "tokens_bytes": len(tokens_json),
            "index_bytes": index_bytes,
            "prob_log_scale": PROB_LOG_SCALE,
            "b64": base64.b64encode(packed).decode("ascii"),
        },
    }


def encode_probs(prob: np.ndarray) -> np.ndarray:
    """Log-quantised uint8 probability codes (see the module docstring)."""
    prob = np.clip(np.nan_to_num(np.asarray(prob, dtype=np.float64)), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        codes = np.rint(255.0 + PROB_LOG_SCALE * np.log(prob))
    return np.clip(np.nan_to_num(codes, neginf=0.0), 0, 255).astype(np.uint8)


def decode_probs(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.float64)
    return np.where(codes > 0, np.exp((codes - 255.0) / PROB_LOG_SCALE), 0.0)


def unpack_lens_data(data: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(tokens, token index per cell, probability per cell) of a lens data object."""
    packed = data["packed"]
    raw = zlib.decompress(base64.b64decode(packed["b64"]), -15)
    n_cells, nb, nt = data["n_cells"], packed["index_bytes"], packed["tokens_bytes"]
    tokens = json.loads(raw[:nt].decode("utf-8"))
    planes = np.frombuffer(raw[nt : nt + n_cells * nb], dtype=np.uint8).reshape(nb, n_cells)
    index = np.zeros(n_cells, dtype=np.int64)
    for b in range(nb):
        index |= planes[b].astype(np.int64) << (8 * b)
    codes = np.frombuffer(raw[nt + n_cells * nb :], dtype=np.uint8)
    if len(codes) != n_cells:
        raise ValueError("packed lens data has the wrong length")
    return tokens, index, decode_probs(codes)


def _view_size(db: ResultsDB, run_id: str, image_id: int) -> dict[str, int] | None:
    rows = db.sql("SELECT view_width, view_height FROM image_views WHERE run_id = ? AND image_id = ?", (run_id, image_id))
    return {"width": int(rows[0][0]), "height": int(rows[0][1])} if rows else None


def extra_view_rows(db: ResultsDB, run_id: str, image_id: int) -> list[tuple]:
    """(name, kind, view_width, view_height, grid_rows, grid_cols) of each extra view, by
    name; none where the database predates the table."""
    exists = db.sql(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'extra_views' "
        "AND table_schema = 'main' AND table_catalog = current_database()"
    )[0][0]
    if not exists:
        return []
    return db.sql(
        "SELECT name, kind, view_width, view_height, grid_rows, grid_cols FROM extra_views "
        "WHERE run_id = ? AND image_id = ? ORDER BY name",
        (run_id, image_id),
    )


def extra_view_file(image_id: int, index: int) -> str:
    """File name (next to the lens page) of the index-th extra view's PNG."""
    return f"{image_id}.extra{index}.png"


def _extra_views(
    db: ResultsDB, run_id: str, image_id: int, context: str,
    kinds: list[str], patch_rows: list[Any], patch_cols: list[Any], positions: list[int],
) -> list[dict[str, Any]]:
    """The extra views of an image, each checked against the positions of its kind."""
    out = []
    for index, (name, kind, width, height, grid_rows, grid_cols) in enumerate(extra_view_rows(db, run_id, image_id)):
        if kind in ("image", "text"):
            raise ReportError(f"{context}: extra view {name!r} claims kind {kind!r}")
        seen: set[tuple[int, int]] = set()
        for k, position in enumerate(positions):
            if kinds[k] != kind:
                continue
            cell = (patch_rows[k], patch_cols[k])
            if cell[0] is None or cell[1] is None or not (0 <= cell[0] < grid_rows and 0 <= cell[1] < grid_cols):
                raise ReportError(
                    f"{context}: {kind} position {position} cell {cell} is outside the "
                    f"{grid_rows}x{grid_cols} grid of view {name!r}"
                )
            if cell in seen:
                raise ReportError(f"{context}: two {kind} positions on cell {cell} of view {name!r}")
            seen.add(cell)
        out.append({
            "name": name, "kind": kind, "width": int(width), "height": int(height),
            "grid_rows": int(grid_rows), "grid_cols": int(grid_cols), "png": extra_view_file(image_id, index),
        })
    return out


def _objects(
    db: ResultsDB,
    run_id: str,
    image_id: int,
    grid_rows: int,
    grid_cols: int,
    geometries: dict[tuple[str, int], ViewGeometry] | None,
    annotations: dict[int, list[dict[str, Any]]] | None,
) -> list[dict[str, Any]]:
    """Annotated objects of the image in view coordinates and patch cells, per category."""
    geometries = quantitative.load_geometries(db) if geometries is None else geometries
    annotations = quantitative.load_annotations(db) if annotations is None else annotations
    geometry = geometries.get((run_id, image_id))
    image_annotations = annotations.get(image_id, [])
    if geometry is None or not image_annotations:
        return []
    cells = object_cells_by_category(image_annotations, geometry, grid_rows, grid_cols).cells
    out: dict[str, dict[str, Any]] = {}
    for ann in image_annotations:
        entry = out.setdefault(ann["category"], {"category": ann["category"], "cells": [], "outlines": []})
        outline = view_outline(ann["segmentation"], ann["bbox"], geometry)
        entry["outlines"].append({"annotation_id": ann["annotation_id"], "iscrowd": ann["iscrowd"], **outline})
    for category, entry in out.items():
        if category in cells:
            rows, cols = np.nonzero(cells[category])
            entry["cells"] = (rows * grid_cols + cols).astype(int).tolist()
    return list(out.values())


def _template_root() -> Traversable:
    return files("templates")


def _environment() -> jinja2.Environment:
    root = _template_root()

    def load(name: str) -> str:
        return root.joinpath(name).read_text(encoding="utf-8")

    return jinja2.Environment(
        loader=jinja2.FunctionLoader(load),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


class _Writer:
    """Writes files under a staging folder and counts them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = 0
        self.bytes = 0

    def write(self, relative: str, content: str | bytes) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode("utf-8") if isinstance(content, str) else content
        path.write_bytes(data)
        self.files += 1
        self.bytes += len(data)

    def path(self, relative: str) -> Path:
        """A path for a file written by someone else (DuckDB COPY); call `account` after."""
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def account(self, relative: str) -> int:
        size = (self.root / relative).stat().st_size
        self.files += 1
        self.bytes += size
        return size


def _copy_static(writer: _Writer) -> None:
    static = _template_root().joinpath("static")
    for item in static.iterdir():
        if item.is_file() and not item.name.startswith("."):
            writer.write(f"static/{item.name}", item.read_bytes())


def _replace_owned(stage: Path, out_dir: Path) -> None:
    for name in OWNED_PATHS:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        staged = stage / name
        if staged.exists():
            staged.rename(target)


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _provenance(db: ResultsDB, db_path: Path, generated_at: str) -> dict[str, Any]:
    versions = db.sql("SELECT max(version) FROM schema_migrations")
    return {
        "tool_version": TOOL_VERSION,
        "db_name": db_path.name,
        "db_sha256": _sha256(db_path),
        "db_bytes": db_path.stat().st_size,
        "schema_version": versions[0][0] if versions else None,
        "generated_at": generated_at,
    }


def _human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def _existing_tables(db: ResultsDB) -> dict[str, set[str]]:
    columns: dict[str, set[str]] = {}
    for table, column in db.sql(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'main' AND table_catalog = current_database()"
    ):
        columns.setdefault(table, set()).add(column)
    return columns


def _write_downloads(db: ResultsDB, writer: _Writer, runs: list[_RunInfo]) -> dict[str, Any]:
    """Gzipped CSV of every table (per run where the table has a run_id) and the
    database itself in a storage format DuckDB-WASM 1.x reads."""
    tables = _existing_tables(db)
    downloads: dict[str, Any] = {"runs": {}, "shared": [], "database": None}

    def copy(query: str, relative: str) -> dict[str, Any]:
        path = writer.path(relative)
        db.duck.execute(f"COPY ({query}) TO {_sql_literal(str(path))} (HEADER, DELIMITER ',', COMPRESSION gzip)")
        size = writer.account(relative)
        return {"href": relative, "size": _human_size(size)}

    for run in runs:
        files = []
        for table in RUN_TABLES:
            if table not in tables or "run_id" not in tables[table]:
                continue
            select = "* EXCLUDE (png)" if table in PNG_TABLES else "*"
            if table == "runs":
                select = "* EXCLUDE (run_key)" if "run_key" in tables[table] else "*"
            query = f"SELECT {select} FROM {table} WHERE run_id = {_sql_literal(run.run_id)}"
            count = db.sql(f"SELECT count(*) FROM {table} WHERE run_id = ?", (run.run_id,))[0][0]
            if count == 0 and table != "runs":
                continue
            files.append({"table": table, "rows": count, **copy(query, f"downloads/{run.dir_name}/{table}.csv.gz")})
        downloads["runs"][run.run_id] = files
    for table in SHARED_TABLES:
        if table in tables:
            count = db.sql(f"SELECT count(*) FROM {table}")[0][0]
            downloads["shared"].append({"table": table, "rows": count, **copy(f"SELECT * FROM {table}", f"downloads/{table}.csv.gz")})

    relative = f"data/{SITE_DB_NAME}"
    target = writer.path(relative)
    alias = "llava_interp_site_copy"
    source = db.sql("SELECT current_database()")[0][0]
    db.duck.execute(
        f"ATTACH {_sql_literal(str(target))} AS {alias} "
        f"(STORAGE_VERSION {_sql_literal(SITE_DB_STORAGE_VERSION)}, READ_ONLY false)"
    )
    try:
        db.duck.execute(f'COPY FROM DATABASE "{source}" TO {alias}')
    finally:
        db.duck.execute(f"DETACH {alias}")
    downloads["database"] = {"href": relative, "size": _human_size(writer.account(relative)),
                             "storage_version": SITE_DB_STORAGE_VERSION}
    return downloads


def _experiment_pages(db: ResultsDB, runs: list[_RunInfo]) -> list[dict[str, Any]]:
    """Seam for the ablation and blocking reports (report/ablation.py, report/blocking.py).

    When `report.<name>` exists and defines `<name>_page_data(db, run_id)`, each run of
    that experiment gets a page. Experiments in DEDICATED_EXPERIMENT_TEMPLATES get their
    own template (summary tables, charts, one drill-down page per image, see
    `_write_experiment_pages`); any other renders the returned dict generically
    (templates/experiment.html.j2, `_generic_sections`): scalars as a summary, lists of
    dicts as tables. All values are autoescaped.
    """
    pages = []
    for experiment, (module_name, title) in EXPERIMENT_PAGES.items():
        try:
            module = importlib.import_module(f"report.{module_name}")
        except ModuleNotFoundError:
            continue
        page_data = getattr(module, f"{module_name}_page_data", None)
        if page_data is None:
            continue
        for run in runs:
            if run.experiment != experiment:
                continue
            data = page_data(db, run.run_id)
            if not isinstance(data, dict):
                continue
            page = {"run": run, "title": title, "experiment": experiment, "module": module,
                    "href": f"experiments/{experiment}-{run.dir_name}.html"}
            if experiment in DEDICATED_EXPERIMENT_TEMPLATES:
                page.update(template=DEDICATED_EXPERIMENT_TEMPLATES[experiment], data=data,
                            folder=f"{experiment}-{run.dir_name}")
            else:
                page.update(template="experiment.html.j2", **_generic_sections(data))
            pages.append(page)
    return pages


def _experiment_nav(pages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Nav entries (href relative to the site root) for the experiment pages: the title
    alone where an experiment has one run, the title and run id where it has several."""
    counts: dict[str, int] = {}
    for page in pages:
        counts[page["experiment"]] = counts.get(page["experiment"], 0) + 1
    return [{"href": page["href"], "run_id": page["run"].run_id,
             "label": page["title"] if counts[page["experiment"]] == 1 else f"{page['title']} ({page['run'].run_id})"}
            for page in pages]


def _overlay_json(grid_rows: Any, grid_cols: Any, overlays: list[dict[str, Any]]) -> str:
    """The drill-down overlay data (read by static/experiments.js), safe inside <script>."""
    return script_json({"grid_rows": grid_rows, "grid_cols": grid_cols, "overlays": overlays})


def _ablation_context(page: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Template context of an ablation run page, and one context per image page."""
    module, data = page["module"], page["data"]
    y_max = module.chart_y_max(data["summary"])
    by_setting = []
    for setting in data["settings"]:
        rows = [row for row in data["summary"] if row["setting"] == setting]
        bars = [row for row in rows if row["condition"] != "none"]
        baseline = next((b for b in data["baseline"] if b["setting"] == setting), None)
        by_setting.append({"setting": setting, "rows": rows, "baseline": baseline,
                           "chart": module.bar_chart(bars, y_max) if bars else None})
    images = []
    for image in data["images"]:
        conditions = sorted({c["condition"] for c in image["conditions"]}, key=module.condition_sort_key)
        settings = [s for s in data["settings"] if any(c["setting"] == s for c in image["conditions"])]
        cell = {(c["setting"], c["condition"]): c for c in image["conditions"]}
        overlays = [
            {"key": [c["setting"], c["condition"]], "cells": c["cells"],
             "caption": f"{c['setting']} / {c['condition']}: {len(c['cells'])} patch"
                        f"{'' if len(c['cells']) == 1 else 'es'} ablated"
                        + (f" ({c['n_unmapped']} positions without a patch cell)" if c["n_unmapped"] else "")}
            for c in image["conditions"]
        ]
        first = next((c for c in image["conditions"] if c["cells"]), image["conditions"][0])
        per_setting = []
        for s in data["settings"]:
            base = cell.get((s, "none"))
            rest = [c for c in image["conditions"] if c["setting"] == s and c["condition"] != "none"]
            per_setting.append({"setting": s, "baseline": base, "n_conditions": len(rest),
                                "n_incorrect": sum(1 for c in rest if not c["correct"])})
        questions = []
        for s in settings:
            c0 = cell.get((s, "none")) or next(c for c in image["conditions"] if c["setting"] == s)
            questions.append({"setting": s, "question": c0["question"], "target_token": c0["target_token"]})
        images.append({"image": image, "conditions": conditions, "settings": settings, "cell": cell,
                       "overlay_json": _overlay_json(image["grid_rows"], image["grid_cols"], overlays),
                       "initial": [first["setting"], first["condition"]], "per_setting": per_setting,
                       "questions": questions})
    return {"by_setting": by_setting, "y_max": y_max}, images


def _blocking_context(page: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Template context of a blocking run page, and one context per image page."""
    module, data = page["module"], page["data"]
    charts = []
    for target, curve in data["curves"].items():
        charts.append({
            "target": target, "curve": curve,
            "relative": module.line_chart(curve, "relative_accuracy", y_label="relative accuracy", reference=1.0),
            "prob": module.line_chart(curve, "mean_target_prob", y_label="mean class probability"),
        })
    presets: dict[str, list[dict[str, Any]]] = {}
    for row in data["presets"]:
        presets.setdefault(row["target"], []).append(row)
    images = []
    for detail in data["image_details"]:
        overlays = []
        for pair in detail["sets"]:
            src, tgt = pair["source_set"], pair["target_set"]
            caption = (f"source {pair['source']}: {len(src['cells'])} patches blocked as keys; "
                       f"target {pair['target']}: {len(tgt['cells'])} patches"
                       + (f" and {len(tgt['text'])} text position{'' if len(tgt['text']) == 1 else 's'}"
                          if tgt["text"] else "") + " as queries")
            if src["n_unmapped"] or tgt["n_unmapped"]:
                caption += f" ({src['n_unmapped'] + tgt['n_unmapped']} positions not in the positions table)"
            overlays.append({"key": [pair["target"], pair["source"]], "cells": src["cells"],
                             "outline": tgt["cells"], "caption": caption})
        initial = [overlays[0]["key"][0], overlays[0]["key"][1]] if overlays else ["", ""]
        images.append({"image": detail, "targets": sorted({p["target"] for p in detail["sets"]}),
                       "sources": sorted({p["source"] for p in detail["sets"]}),
                       "overlay_json": _overlay_json(detail["grid_rows"], detail["grid_cols"], overlays),
                       "initial": initial})
    return {"charts": charts, "presets": presets}, images


def _write_experiment_pages(db: ResultsDB, env: jinja2.Environment, writer: _Writer,
                            pages: list[dict[str, Any]], common: dict[str, Any]) -> None:
    """Write every experiment page; dedicated ones also get a page (and view PNG) per image
    under `experiments/<experiment>-<run folder>/<image_id>.html`."""
    for page in pages:
        run = page["run"]
        if page["template"] == "experiment.html.j2":
            writer.write(page["href"], env.get_template("experiment.html.j2").render(
                page=page, run=run, root="../", runs_here=[run], **common))
            continue
        context, images = (_ablation_context if page["experiment"] == "ablation" else _blocking_context)(page)
        views = {
            int(image_id): (width, height)
            for image_id, width, height in db.sql(
                "SELECT image_id, view_width, view_height FROM image_views WHERE run_id = ?", (run.run_id,))
        }
        template = env.get_template(page["template"])
        folder = page["folder"]
        image_hrefs = {}
        for item in images:
            image_id = item["image"]["image_id"]
            view = views.get(image_id)
            if view is not None:
                (png,) = db.sql("SELECT png FROM image_views WHERE run_id = ? AND image_id = ?",
                                (run.run_id, image_id))[0]
                writer.write(f"experiments/{folder}/{image_id}.png", bytes(png))
            image_hrefs[image_id] = f"{folder}/{image_id}.html"
            writer.write(f"experiments/{folder}/{image_id}.html", template.render(
                page=page, data=page["data"], run=run, root="../../", runs_here=[run], mode="image",
                item=item, view=view, png_src=f"{image_id}.png" if view else "",
                run_href=f"../{page['folder']}.html", **context, **common))
        writer.write(page["href"], template.render(
            page=page, data=page["data"], run=run, root="../", runs_here=[run], mode="run",
            image_hrefs=image_hrefs, images=images, **context, **common))


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return _summary_value(value, 120)
    return str(value)


def _generic_sections(data: dict[str, Any]) -> dict[str, Any]:
    """A page dict as summary pairs (scalar values) and tables (lists of dicts); nested
    values are shown as shortened JSON. Until report/build.py gets dedicated ablation and
    blocking pages, this renders whatever those modules return, faithfully if plainly."""
    summary, tables = [], []
    for key, value in data.items():
        if key == "run":
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            summary.append((key.replace("_", " "), _cell_text(value)))
        elif isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
            summary += [(f"{key.replace('_', ' ')}: {k}", _cell_text(v)) for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            columns: list[str] = []
            for row in value:
                columns += [c for c in row if c not in columns]
            tables.append({"title": key.replace("_", " "), "columns": columns,
                           "rows": [[_cell_text(row.get(c)) for c in columns] for row in value]})
        elif isinstance(value, list) and not value:
            summary.append((key.replace("_", " "), "none"))
    return {"summary": summary, "tables": tables}


def build_site(db_path: Path, out_dir: Path, *, downloads: bool = True) -> SiteSummary:
    """Render the database at `db_path` into `out_dir`.

    The site is rendered into a staging folder inside `out_dir` first, so a failed build
    leaves the previous site in place; on success the generated paths (OWNED_PATHS) are
    replaced and nothing else in `out_dir` is touched. `downloads=False` leaves out the
    CSV files and the database copy. Raises db.errors.DatabaseError for an unusable
    database file and ReportError for results that cannot be rendered faithfully.
    """
    db_path, out_dir = Path(db_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"output path exists and is not a folder: {out_dir}")
    env = _environment()
    generated_at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    with ResultsDB(db_path, read_only=True) as db:
        provenance = _provenance(db, db_path, generated_at)
        runs = _load_runs(db)
        entries = _load_lens_entries(db, runs)
        geometries = quantitative.load_geometries(db)
        annotations = quantitative.load_annotations(db)
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".report-build-", dir=out_dir))
        try:
            writer = _Writer(stage)
            _copy_static(writer)
            writer.write(".nojekyll", "")
            experiment_pages = _experiment_pages(db, runs)
            common = {"demo_warning": DEMO_WARNING, "generated_at": generated_at, "provenance": provenance,
                      "schema_latest": LATEST_VERSION, "experiment_nav": _experiment_nav(experiment_pages)}
            lens_template = env.get_template("lens.html.j2")
            run_entries: dict[str, list[tuple[int, int, int, int]]] = {}
            for entry in entries:
                run = entry.run
                data = lens_data(db, run.run_id, entry.image_id, geometries=geometries, annotations=annotations)
                run_entries.setdefault(run.run_id, []).append(
                    (entry.image_id, data["n_layers"], data["grid_rows"], data["grid_cols"])
                )
                base = f"lens/{run.dir_name}/{entry.image_id}"
                if entry.has_view:
                    (png,) = db.sql(
                        "SELECT png FROM image_views WHERE run_id = ? AND image_id = ?",
                        (run.run_id, entry.image_id),
                    )[0]
                    writer.write(base + ".png", bytes(png))
                for index, view in enumerate(data["extra_views"]):
                    (png,) = db.sql(
                        "SELECT png FROM extra_views WHERE run_id = ? AND image_id = ? AND name = ?",
                        (run.run_id, entry.image_id, view["name"]),
                    )[0]
                    writer.write(f"lens/{run.dir_name}/{extra_view_file(entry.image_id, index)}", bytes(png))
                writer.write(base + ".data.js", f"window.LENS_DATA = {script_json(data)};\n")
                writer.write(
                    base + ".html",
                    lens_template.render(
                        entry=entry,
                        run=run,
                        runs_here=[run],
                        data_src=f"{entry.image_id}.data.js",
                        png_src=f"{entry.image_id}.png" if entry.has_view else "",
                        root="../../",
                        n_layers=data["n_layers"],
                        n_positions=len(data["positions"]["position"]),
                        grid=(data["grid_rows"], data["grid_cols"]),
                        extra_views=data["extra_views"],
                        top_k=data["top_k"],
                        has_objects=bool(data["objects"]),
                        **common,
                    ),
                )

            quant_runs = []
            for run in runs:
                if run.experiment != LENS_EXPERIMENT or run.run_id not in run_entries:
                    continue
                result = quantitative.quantitative_lens(db, run.run_id, run.model_id, run_entries[run.run_id])
                if result is None:
                    continue
                chart = quantitative.line_chart_svg(
                    [("top-1", result.top1, "series-top1"), (f"top-{result.top_k}", result.topk, "series-topk")],
                    result.n_layers,
                )
                pages_by_image = {e.image_id: e.page_href for e in entries if e.run.run_id == run.run_id}
                quant_runs.append({"run": run, "result": result, "chart": chart, "pages": pages_by_image})

            download_info = _write_downloads(db, writer, runs) if downloads else None
            if download_info is not None:
                writer.write(
                    "downloads.html",
                    env.get_template("downloads.html.j2").render(
                        runs=runs, downloads=download_info, root="", runs_here=runs, **common
                    ),
                )
            sql_console.write_sql_page(db, writer, env, common, download_info)  # sql.html, vendor/duckdb-wasm/
            writer.write(
                "quantitative.html",
                env.get_template("quantitative.html.j2").render(
                    quant_runs=quant_runs, root="", runs_here=[q["run"] for q in quant_runs], **common
                ),
            )
            _write_experiment_pages(db, env, writer, experiment_pages, common)
            writer.write(
                "index.html",
                env.get_template("index.html.j2").render(
                    runs=runs,
                    entries=entries,
                    root="",
                    runs_here=runs,
                    db_name=db_path.name,
                    has_downloads=download_info is not None,
                    quant_count=len(quant_runs),
                    experiment_pages=experiment_pages,
                    run_pages={page["run"].run_id: page["href"] for page in experiment_pages},
                    **common,
                ),
            )
            _replace_owned(stage, out_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    return SiteSummary(
        out_dir=out_dir,
        runs=len(runs),
        lens_pages=len(entries),
        files_written=writer.files,
        bytes_written=writer.bytes,
    )
