"""The Parquet reader of parquet-mode lens pages (`report build --lens-data parquet`).

Nothing comes from a CDN: the build copies a prepared hyparquet bundle into
`vendor/hyparquet/` when a run's lens pages read their cells from the lens Parquet
downloads. A prepared folder is what `scripts/fetch-hyparquet.sh` writes (default
`.cache/hyparquet/vendor`, git-ignored): one ESM file, `hyparquet.bundle.mjs` (hyparquet, a
pure-JS Parquet reader with async HTTP range reads, and hyparquet-compressors for zstd,
bundled by esbuild), licences and `VERSION.json` (pinned versions, the bundle's sha256,
checked here before copying). Without one, `--lens-data auto` keeps every run inline and
`--lens-data parquet` is refused with the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from report import vendor
from report.site import Writer, sha256_file

HYPARQUET_VERSION = "1.33.0"  # keep equal to scripts/fetch-hyparquet.sh
ENV_VAR = "LLAVA_INTERP_HYPARQUET"
VENDOR_DIR = "vendor/hyparquet"
MODULE_FILE = "hyparquet.bundle.mjs"
MANIFEST = vendor.MANIFEST
FETCH_SCRIPT = "scripts/fetch-hyparquet.sh"
DEFAULT_CACHE = Path(".cache") / "hyparquet" / "vendor"
MODULE_PATH = f"{VENDOR_DIR}/{MODULE_FILE}"


def _check_folder(folder: Path) -> str | None:
    """None when `folder` holds a usable prepared bundle, else why not."""
    if not (folder / MODULE_FILE).is_file() or not (folder / MANIFEST).is_file():
        return f"{folder} lacks {MODULE_FILE} or {MANIFEST} (prepare it with bash {FETCH_SCRIPT})"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        version = manifest.get("hyparquet")
        info = manifest["files"][MODULE_FILE]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{folder / MANIFEST} is not a manifest written by {FETCH_SCRIPT}"
    if version != HYPARQUET_VERSION:
        return f"{folder} holds hyparquet {version}, the lens pages need {HYPARQUET_VERSION} (rerun {FETCH_SCRIPT})"
    path = folder / MODULE_FILE
    if path.stat().st_size != info.get("bytes") or sha256_file(path) != info.get("sha256"):
        return f"{path} does not match its sha256 in {MANIFEST} (rerun {FETCH_SCRIPT})"
    return None


def find_hyparquet(environ: Mapping[str, str] | None = None) -> tuple[Path | None, str]:
    """(the prepared folder, "") or (None, why not): ${LLAVA_INTERP_HYPARQUET} when set (a
    prepared folder or the DEST given to the fetch script), else `.cache/hyparquet/vendor` in
    the current folder or in this repository."""
    candidates, _ = vendor.candidate_folders(os.environ if environ is None else environ, ENV_VAR, DEFAULT_CACHE)
    problems = []
    for candidate in candidates:
        problem = _check_folder(candidate)
        if problem is None:
            return candidate, ""
        problems.append(problem)
    return None, "; ".join(dict.fromkeys(problems)) or f"hyparquet is not prepared (bash {FETCH_SCRIPT})"


def copy_hyparquet(folder: Path, writer: Writer) -> int:
    """Copy the bundle, its manifest and licences into the site's vendor folder; returns bytes."""
    return vendor.copy_folder(folder, writer, VENDOR_DIR, [MODULE_FILE])
