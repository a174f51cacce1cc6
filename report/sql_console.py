"""The SQL console page (`sql.html`): DuckDB-WASM in the browser over the site's copy of
the database (`data/results.duckdb`, attached read-only).

Nothing comes from a CDN: the build copies a prepared DuckDB-WASM into
`vendor/duckdb-wasm/` when it finds one (see `find_duckdb_wasm`), and only sql.html loads
it, only when opened. A prepared folder is what `scripts/fetch-duckdb-wasm.sh` writes
(default `.cache/duckdb-wasm/vendor`, git-ignored): the single-threaded "eh" build
(`duckdb-browser-eh.worker.js`, `duckdb-eh.wasm`, no COOP/COEP headers needed), the
package's ESM entry bundled with apache-arrow (`duckdb-browser.bundle.mjs`), licences and
`VERSION.json` (pinned versions, sha256 of each file; checked here before copying).

Without one, or without the database copy (`--no-downloads`), sql.html is still written
and says how to enable the console; the build never fails for it. The page needs
http(s): browsers refuse module scripts, workers and fetch() on file://, and it says so.

Never imports torch or the collector; the page's JavaScript is templates/static/sql.js.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from db.store import ResultsDB

DUCKDB_WASM_VERSION = "1.32.0"  # keep equal to scripts/fetch-duckdb-wasm.sh
ENV_VAR = "LLAVA_INTERP_DUCKDB_WASM"
PAGE = "sql.html"
VENDOR_DIR = "vendor/duckdb-wasm"
MODULE_FILE = "duckdb-browser.bundle.mjs"
WORKER_FILE = "duckdb-browser-eh.worker.js"
WASM_FILE = "duckdb-eh.wasm"
REQUIRED_FILES = (MODULE_FILE, WORKER_FILE, WASM_FILE)
MANIFEST = "VERSION.json"
FETCH_SCRIPT = "scripts/fetch-duckdb-wasm.sh"
DEFAULT_CACHE = Path(".cache") / "duckdb-wasm" / "vendor"
SERVE_COMMAND = "llava-interp report serve --dir site"
DEFAULT_ROW_LIMIT = 1000

# The repository this module sits in (an editable install or a checkout).
_REPO = Path(__file__).resolve().parents[1]


@dataclass
class WasmFiles:
    """Where the prepared DuckDB-WASM files are, or why none were found."""

    path: Path | None
    version: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.path is not None


def _check_folder(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) when `folder` holds a usable prepared DuckDB-WASM, else (None, why)."""
    if not folder.is_dir():
        return None, f"{folder} is not a folder"
    missing = [name for name in (*REQUIRED_FILES, MANIFEST) if not (folder / name).is_file()]
    if missing:
        return None, f"{folder} lacks {', '.join(missing)} (prepare it with {FETCH_SCRIPT})"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        expected = {name: manifest["files"][name] for name in REQUIRED_FILES}
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{folder / MANIFEST} is not a manifest written by {FETCH_SCRIPT}"
    for name, info in expected.items():
        path = folder / name
        if path.stat().st_size != info.get("bytes") or _sha256(path) != info.get("sha256"):
            return None, f"{path} does not match its sha256 in {MANIFEST} (rerun {FETCH_SCRIPT})"
    return manifest, None


def find_duckdb_wasm(environ: Mapping[str, str] | None = None) -> WasmFiles:
    """The prepared DuckDB-WASM folder: ${LLAVA_INTERP_DUCKDB_WASM} when set (a prepared
    folder, or the DEST given to the fetch script), else `.cache/duckdb-wasm/vendor` in the
    current folder or in this repository. Unusable folders are reported in `problems`."""
    environ = os.environ if environ is None else environ
    configured = environ.get(ENV_VAR, "").strip()
    if configured:
        base = Path(configured)
        candidates = [base / "vendor" if (base / "vendor" / MANIFEST).is_file() else base]
    else:
        candidates = [Path.cwd() / DEFAULT_CACHE, _REPO / DEFAULT_CACHE]
    problems: list[str] = []
    seen: set[Path] = set()
    for candidate in candidates:
        resolved = candidate.resolve()
        if resolved in seen or (not configured and not candidate.exists()):
            continue
        seen.add(resolved)
        manifest, problem = _check_folder(candidate)
        if manifest is not None:
            return WasmFiles(candidate, str(manifest.get("@duckdb/duckdb-wasm", "")), manifest)
        problems.append(f"{ENV_VAR}: {problem}" if configured else str(problem))
    return WasmFiles(None, problems=problems)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _relations(db: ResultsDB) -> set[str]:
    return {
        name
        for (name,) in db.sql(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'main' AND table_catalog = current_database()"
        )
    }


def _example_token(db: ResultsDB) -> str:
    """A token worth looking up: the most annotated category, else the README's 'cat'."""
    rows = db.sql(
        "SELECT lower(category) FROM annotations WHERE category IS NOT NULL AND category <> '' "
        "GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
    )
    return rows[0][0] if rows else "cat"


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def examples(db: ResultsDB) -> list[dict[str, str]]:
    """Example queries one click away, for the tables and views this database has."""
    relations = _relations(db)
    out = [
        {
            "title": "Tables and views",
            "needs": "",
            "description": "Every table and view of this database.",
            "sql": "SELECT table_name, table_type\nFROM information_schema.tables\n"
            "WHERE table_catalog = 'results'\nORDER BY table_type, table_name;",
        },
        {
            "title": "Runs",
            "needs": "runs",
            "description": "Every run: experiment, model, status.",
            "sql": "SELECT run_id, experiment, model_id, status, started_at, finished_at\nFROM runs\n"
            "ORDER BY started_at;",
        },
        {
            "title": "Token ablation: flipped answers per setting",
            "needs": "ablation_summary",
            "description": "Paper §5: among images answered correctly with nothing ablated, the share "
            "whose answer flips under each ablation, per setting (view ablation_summary).",
            "sql": "SELECT run_id, setting, condition, n_baseline_correct, n_flipped,\n"
            "       round(pct_flipped, 1) AS pct_flipped, round(mean_tokens_ablated, 1) AS mean_tokens_ablated\n"
            "FROM ablation_summary\nORDER BY run_id, setting, pct_flipped DESC;",
        },
        {
            "title": "Attention blocking: object_1 \u2192 last, mid_late layers",
            "needs": "blocking_curves",
            "description": "Paper §6: accuracy relative to the unblocked baseline when the last position "
            "cannot attend to the object's patches (and their neighbours) in the mid-late layer window "
            "(view blocking_curves).",
            "sql": "SELECT run_id, source, target, preset, layer_start, layer_end, n,\n"
            "       round(accuracy, 3) AS accuracy, round(relative_accuracy, 3) AS relative_accuracy\n"
            "FROM blocking_curves\nWHERE window_kind = 'preset' AND preset = 'mid_late'\n"
            "  AND source = 'object_1' AND target = 'last'\nORDER BY run_id;",
        },
    ]
    token = _example_token(db)
    out.append(
        {
            "title": f"Logit lens: where \u201c{token}\u201d is the top-1 token",
            "needs": "lens_top1",
            "description": "Per image, the first layer at which the token is the top-1 lens token at "
            "some image patch, and at how many patches (view lens_top1).",
            "sql": "SELECT run_id, image_id, min(layer) AS first_layer, count(*) AS patch_layers\n"
            f"FROM lens_top1\nWHERE kind = 'image' AND lower(trim(token)) = {_sql_string(token)}\n"
            "GROUP BY run_id, image_id\nORDER BY run_id, image_id;",
        }
    )
    out += [
        {
            "title": "Quantitative lens: object hits per layer",
            "needs": "lens_object_hits",
            "description": "Paper §4.1: per run and layer, the (patch, category) pairs whose lens tokens "
            "name an annotated object at rank 1 and within the top-k (view lens_object_hits).",
            "sql": "SELECT run_id, layer,\n       count(*) FILTER (WHERE best_rank = 1) AS top1_hits,\n"
            "       count(*) AS topk_hits\nFROM lens_object_hits\nGROUP BY run_id, layer\n"
            "ORDER BY run_id, layer;",
        },
        {
            "title": "Logit lens: top-k at the last position, middle layer",
            "needs": "run_images",
            "description": "The lens's top-k at the last input position in the middle layer of one image.",
            "sql": "WITH one AS (\n"
            "    SELECT ri.run_id, ri.image_id, ri.n_layers FROM run_images ri JOIN runs r USING (run_id)\n"
            "    WHERE r.experiment = 'lens' AND ri.n_layers IS NOT NULL\n"
            "    ORDER BY ri.run_id, ri.image_id LIMIT 1)\n"
            "SELECT l.run_id, l.image_id, l.layer, l.position, l.rank, l.token, round(l.prob, 4) AS prob\n"
            "FROM logit_lens l JOIN one USING (run_id, image_id)\n"
            "WHERE l.layer = one.n_layers // 2\n"
            "  AND l.position = (SELECT max(position) FROM positions p\n"
            "                    WHERE p.run_id = l.run_id AND p.image_id = l.image_id)\n"
            "ORDER BY l.rank;",
        },
    ]
    return [example for example in out if not example["needs"] or example["needs"] in relations]


def write_sql_page(
    db: ResultsDB,
    writer: Any,
    env: jinja2.Environment,
    common: dict[str, Any],
    download_info: dict[str, Any] | None,
    *,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write sql.html (always) and vendor/duckdb-wasm/ (when found and the database copy
    was published). `writer` is report.build's staging writer; `download_info` what
    `_write_downloads` returned (None with --no-downloads). Returns what was written."""
    database = (download_info or {}).get("database")
    wasm = find_duckdb_wasm(environ)
    enabled = wasm.found and database is not None
    vendor_bytes = 0
    if enabled:
        assert wasm.path is not None
        for item in sorted(wasm.path.iterdir()):
            if item.is_file() and (item.name in REQUIRED_FILES or item.name == MANIFEST
                                   or item.name.startswith(("LICENSE", "NOTICE"))):
                relative = f"{VENDOR_DIR}/{item.name}"
                shutil.copyfile(item, writer.path(relative))  # 34 MB: copied, never read into memory
                vendor_bytes += writer.account(relative)
    page = env.get_template("sql.html.j2").render(
        enabled=enabled,
        wasm=wasm,
        database=database,
        examples=examples(db),
        default_limit=DEFAULT_ROW_LIMIT,
        vendor_dir=VENDOR_DIR,
        module_file=MODULE_FILE,
        worker_file=WORKER_FILE,
        wasm_file=WASM_FILE,
        fetch_script=FETCH_SCRIPT,
        env_var=ENV_VAR,
        serve_command=SERVE_COMMAND,
        pinned_version=DUCKDB_WASM_VERSION,
        wasm_size=_human(wasm.manifest.get("files", {}).get(WASM_FILE, {}).get("bytes", 0)),
        root="",
        runs_here=[],
        has_downloads=download_info is not None,
        **common,
    )
    writer.write(PAGE, page)
    return {"href": PAGE, "enabled": enabled, "vendor_bytes": vendor_bytes,
            "version": wasm.version if enabled else None}


def _human(size: int) -> str:
    return f"{size / 1e6:.0f} MB" if size else ""
