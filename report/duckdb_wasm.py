"""The DuckDB-WASM files the SQL console page (report/pages/sql.py) runs on.

Nothing comes from a CDN: the build copies a prepared DuckDB-WASM into
`vendor/duckdb-wasm/` when it finds one (see `find_duckdb_wasm`), and only sql.html loads
it, only when opened. A prepared folder is what `scripts/fetch-duckdb-wasm.sh` writes
(default `.cache/duckdb-wasm/vendor`, git-ignored): the single-threaded "eh" build
(`duckdb-browser-eh.worker.js`, `duckdb-eh.wasm`, no COOP/COEP headers needed), the
package's ESM entry bundled with apache-arrow (`duckdb-browser.bundle.mjs`), licences and
`VERSION.json` (pinned versions, sha256 of each file; checked here before copying).

Without one, or without the Parquet downloads (`--no-downloads`), sql.html is still written
and says how to enable the console; the build never fails for it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from report import urls, vendor
from report.site import Writer, sha256_file

# DuckDB-WASM 1.28.0 is DuckDB 0.9.1, the last release with the parquet extension built into
# the WASM: 1.29+ load it from extensions.duckdb.org at run time, which nothing on npm
# vendors and which an offline site (or one served on a private network) cannot reach. The
# console reads Parquet files only (never a .duckdb file), so the older engine does it all.
DUCKDB_WASM_VERSION = "1.28.0"  # keep equal to scripts/fetch-duckdb-wasm.sh
DUCKDB_VERSION = "0.9.1"  # the DuckDB inside it: what the console's SQL dialect is
ENV_VAR = "LLAVA_INTERP_DUCKDB_WASM"
VENDOR_DIR = urls.DUCKDB_WASM_DIR
MODULE_FILE = "duckdb-browser.bundle.mjs"
WORKER_FILE = "duckdb-browser-eh.worker.js"
WASM_FILE = "duckdb-eh.wasm"
REQUIRED_FILES = (MODULE_FILE, WORKER_FILE, WASM_FILE)
MANIFEST = vendor.MANIFEST
FETCH_SCRIPT = "scripts/fetch-duckdb-wasm.sh"
DEFAULT_CACHE = Path(".cache") / "duckdb-wasm" / "vendor"

# The repository this module sits in (an editable install or a checkout).


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
        version = manifest.get("@duckdb/duckdb-wasm")
        if version != DUCKDB_WASM_VERSION:
            return None, (
                f"{folder} holds DuckDB-WASM {version}, the console needs {DUCKDB_WASM_VERSION} "
                f"(the last with Parquet built in; rerun {FETCH_SCRIPT})"
            )
        expected = {name: manifest["files"][name] for name in REQUIRED_FILES}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, f"{folder / MANIFEST} is not a manifest written by {FETCH_SCRIPT}"
    for name, info in expected.items():
        path = folder / name
        if path.stat().st_size != info.get("bytes") or sha256_file(path) != info.get("sha256"):
            return None, f"{path} does not match its sha256 in {MANIFEST} (rerun {FETCH_SCRIPT})"
    return manifest, None


def find_duckdb_wasm(environ: Mapping[str, str] | None = None) -> WasmFiles:
    """The prepared DuckDB-WASM folder: ${LLAVA_INTERP_DUCKDB_WASM} when set (a prepared
    folder, or the DEST given to the fetch script), else `.cache/duckdb-wasm/vendor` in the
    current folder or in this repository. Unusable folders are reported in `problems`."""
    candidates, configured = vendor.candidate_folders(
        os.environ if environ is None else environ, ENV_VAR, DEFAULT_CACHE
    )
    problems: list[str] = []
    for candidate in candidates:
        manifest, problem = _check_folder(candidate)
        if manifest is not None:
            return WasmFiles(candidate, str(manifest.get("@duckdb/duckdb-wasm", "")), manifest)
        problems.append(f"{ENV_VAR}: {problem}" if configured else str(problem))
    return WasmFiles(None, problems=problems)


def copy_duckdb_wasm(wasm: WasmFiles, writer: Writer) -> int:
    """Copy the prepared files (and their licences) into the site's vendor folder; returns bytes."""
    assert wasm.path is not None
    return vendor.copy_folder(wasm.path, writer, VENDOR_DIR, REQUIRED_FILES)
