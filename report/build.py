"""Render a results database as a static site: an index of runs and one logit-lens page
per completely written (run, image).

Data flows collector -> db -> report: this module reads the database only, read-only,
and never imports torch or the collector. Every URL it writes is relative, so the site
works from file:// and under a GitHub Pages project path.

Lens data file format (`lens/<run>/<image_id>.data.js`, format "llava-interp-lens/1")
-----------------------------------------------------------------------------------
The file is exactly ``window.LENS_DATA = <json>;`` (a classic script, because browsers
block fetch() on file://). The JSON object holds:

- ``run_id``, ``image_id``, ``n_layers`` (layer 0 = embeddings), ``top_k``,
  ``grid_rows``, ``grid_cols``.
- ``positions``: parallel arrays ``position``, ``kind`` ('image' | 'text'), ``label``,
  ``patch_row``, ``patch_col`` (null for text), sorted by LM input position. The index
  into these arrays is the table row ("row" below); the overlay maps patch
  (patch_row, patch_col) to its row through these arrays, never through row order.
- ``tokens``: the distinct token strings of this image's lens cells.
- ``token_index``: ``{"dtype": "uint16"|"uint32", "missing": <sentinel>, "b64": ...}``,
  base64 of little-endian unsigned integers indexing ``tokens``; uint16 unless the
  dictionary needs more. ``missing`` would mark a (layer, row, rank) without a database
  row; the build refuses such images today, so readers only need it for robustness.
- ``prob``: ``{"dtype": "uint16", "scale": 65535, "b64": ...}``, probabilities quantised
  as round(p * 65535), so decoded values are within 1/131070 of the stored ones.

Both arrays are flat with the cell (layer l, row r, rank k >= 1) at
``(l * n_positions + r) * top_k + (k - 1)``.

The JSON is escaped so no string can end the script or the line: ``<``, ``>``, ``&``,
U+2028 and U+2029 are written as \\uXXXX escapes.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np

from db.store import ResultsDB

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

LENS_EXPERIMENT = "lens"
DATA_FORMAT = "llava-interp-lens/1"
PROB_SCALE = 65535
DEMO_WARNING = "weights are random: demo output, not results"

# What the build owns inside out_dir; everything else there is left alone.
OWNED_PATHS = ("index.html", "lens", "static", ".nojekyll")

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


def _encode_uint(values: np.ndarray, dtype: str) -> str:
    return base64.b64encode(values.astype(f"<{'u2' if dtype == 'uint16' else 'u4'}").tobytes()).decode(
        "ascii"
    )


def lens_data(db: ResultsDB, run_id: str, image_id: int) -> dict[str, Any]:
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
        else:
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
    index_dtype = "uint16" if len(tokens) < 0xFFFF else "uint32"
    missing = 0xFFFF if index_dtype == "uint16" else 0xFFFFFFFF
    token_index = np.full(n_cells, missing, dtype=np.uint64)
    token_index[flat] = token_codes
    quantised = np.zeros(n_cells, dtype=np.uint64)
    quantised[flat] = np.rint(np.clip(np.nan_to_num(prob), 0.0, 1.0) * PROB_SCALE).astype(np.uint64)

    return {
        "format": DATA_FORMAT,
        "run_id": run_id,
        "image_id": image_id,
        "n_layers": n_layers,
        "top_k": top_k,
        "grid_rows": grid_rows,
        "grid_cols": grid_cols,
        "positions": {
            "position": position_numbers,
            "kind": kinds,
            "label": labels,
            "patch_row": patch_rows,
            "patch_col": patch_cols,
        },
        "tokens": tokens,
        "token_index": {"dtype": index_dtype, "missing": missing, "b64": _encode_uint(token_index, index_dtype)},
        "prob": {"dtype": "uint16", "scale": PROB_SCALE, "b64": _encode_uint(quantised, "uint16")},
    }


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


def build_site(db_path: Path, out_dir: Path) -> SiteSummary:
    """Render the database at `db_path` into `out_dir`.

    The site is rendered into a staging folder inside `out_dir` first, so a failed build
    leaves the previous site in place; on success the generated paths (`index.html`,
    `lens/`, `static/`, `.nojekyll`) are replaced and nothing else in `out_dir` is touched.
    Raises db.errors.DatabaseError for an unusable database file and ReportError for
    results that cannot be rendered faithfully.
    """
    db_path, out_dir = Path(db_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"output path exists and is not a folder: {out_dir}")
    env = _environment()
    generated_at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    with ResultsDB(db_path, read_only=True) as db:
        runs = _load_runs(db)
        entries = _load_lens_entries(db, runs)
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".report-build-", dir=out_dir))
        try:
            writer = _Writer(stage)
            _copy_static(writer)
            writer.write(".nojekyll", "")
            lens_template = env.get_template("lens.html.j2")
            for entry in entries:
                run = entry.run
                data = lens_data(db, run.run_id, entry.image_id)
                base = f"lens/{run.dir_name}/{entry.image_id}"
                if entry.has_view:
                    (png,) = db.sql(
                        "SELECT png FROM image_views WHERE run_id = ? AND image_id = ?",
                        (run.run_id, entry.image_id),
                    )[0]
                    writer.write(base + ".png", bytes(png))
                writer.write(base + ".data.js", f"window.LENS_DATA = {script_json(data)};\n")
                writer.write(
                    base + ".html",
                    lens_template.render(
                        entry=entry,
                        run=run,
                        data_src=f"{entry.image_id}.data.js",
                        png_src=f"{entry.image_id}.png" if entry.has_view else "",
                        root="../../",
                        n_layers=data["n_layers"],
                        n_positions=len(data["positions"]["position"]),
                        grid=(data["grid_rows"], data["grid_cols"]),
                        top_k=data["top_k"],
                        demo_warning=DEMO_WARNING,
                        generated_at=generated_at,
                    ),
                )
            writer.write(
                "index.html",
                env.get_template("index.html.j2").render(
                    runs=runs,
                    entries=entries,
                    root="",
                    demo_warning=DEMO_WARNING,
                    generated_at=generated_at,
                    db_name=db_path.name,
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
