"""Third-party browser files vendored into the site (DuckDB-WASM for the SQL console,
hyparquet for parquet-mode lens pages): where a prepared folder is looked for, and how it
is copied. Each is prepared once by its `scripts/fetch-*.sh` (npm, pinned versions, a
`VERSION.json` manifest with every file's sha256); nothing is fetched from a CDN."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from report.site import Writer

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "VERSION.json"


def candidate_folders(environ: Mapping[str, str], env_var: str, default_cache: Path) -> tuple[list[Path], bool]:
    """(folders to try in order, whether ${env_var} chose them): ${env_var} when set (a prepared
    folder, or the DEST given to the fetch script, whose `vendor/` is then used), else
    `default_cache` in the current folder and in this repository, those that exist, each once."""
    configured = environ.get(env_var, "").strip()
    if configured:
        base = Path(configured)
        return [base / "vendor" if (base / "vendor" / MANIFEST).is_file() else base], True
    folders: list[Path] = []
    for folder in (Path.cwd() / default_cache, REPO / default_cache):
        if folder.exists() and folder.resolve() not in {f.resolve() for f in folders}:
            folders.append(folder)
    return folders, False


def copy_folder(folder: Path, writer: Writer, vendor_dir: str, files: Iterable[str]) -> int:
    """Copy `files`, the manifest and the licences of a prepared folder into `vendor_dir` of
    the site (file to file, never read into memory: the WASM is tens of MB); returns bytes."""
    wanted = {*files, MANIFEST}
    total = 0
    for item in sorted(folder.iterdir()):
        if item.is_file() and (item.name in wanted or item.name.startswith(("LICENSE", "NOTICE"))):
            relative = f"{vendor_dir}/{item.name}"
            shutil.copyfile(item, writer.path(relative))
            total += writer.account(relative)
    return total
