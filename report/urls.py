"""Where every page and file of the site lives, and the relative URL between any two.

Paths are relative to the site root, '/'-separated, and are also the paths the writer
writes. Every link is built with `href(from_page, to_path)` (templates: `href(path)`, bound
to the page being rendered), so the site works from file:// and under a GitHub Pages
project path; nothing else in the report builds a "../" prefix.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import urllib.parse

INDEX = "index.html"
QUANTITATIVE = "quantitative.html"
REPRODUCTION = "reproduction.html"
DOWNLOADS = "downloads.html"
SQL = "sql.html"
COMPARE = "compare.html"
DEPTH = "depth.html"
NOJEKYLL = ".nojekyll"
BUILD_MANIFEST = ".llava-interp-build.json"  # report/incremental.py
STATIC_DIR = "static"
SITE_DATABASE = "data/results.duckdb"
DUCKDB_WASM_DIR = "vendor/duckdb-wasm"

# What the build owns inside out_dir (top-level names); everything else there is left alone.
OWNED_PATHS = (
    INDEX,
    QUANTITATIVE,
    REPRODUCTION,
    DOWNLOADS,
    SQL,
    COMPARE,
    DEPTH,
    "experiments",
    "lens",
    STATIC_DIR,
    "downloads",
    "data",
    "vendor",
    NOJEKYLL,
    BUILD_MANIFEST,
)

_SAFE_PATH_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}")


def run_dir_name(run_id: str) -> str:
    """A file-system and URL safe folder name for a run, unique per run id."""
    if _SAFE_PATH_COMPONENT.fullmatch(run_id):
        return run_id
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-.")[:40] or "run"
    return f"{slug}-{hashlib.sha256(run_id.encode()).hexdigest()[:10]}"


def static(name: str) -> str:
    return f"{STATIC_DIR}/{name}"


def lens_page(run_dir: str, image_id: int) -> str:
    return f"lens/{run_dir}/{image_id}.html"


def lens_data(run_dir: str, image_id: int) -> str:
    """The page's data script (format: report/lens_codec.py)."""
    return f"lens/{run_dir}/{image_id}.data.js"


def lens_positions(run_dir: str, digest: str) -> str:
    """A parquet-mode run's shared `positions` file (report/lens_codec.py), named by a prefix of
    its content's sha256: one file per distinct layout, whatever number of pages refer to it."""
    return f"lens/{run_dir}/positions-{digest[:POSITIONS_DIGEST_CHARS]}.json"


POSITIONS_DIGEST_CHARS = 20


def lens_view(run_dir: str, image_id: int, ext: str = "png") -> str:
    """The image as the model saw it, next to its lens page (`ext`: report/views.py EXTENSIONS)."""
    return f"lens/{run_dir}/{image_id}.{ext}"


def lens_extra_view(run_dir: str, image_id: int, index: int, ext: str = "png") -> str:
    """The index-th extra view's picture, next to the lens page."""
    return f"lens/{run_dir}/{image_id}.extra{index}.{ext}"


def compare_fragment(a: tuple[str, int], b: tuple[str, int] | None = None) -> str:
    """The fragment choosing (run_dir, image_id) `a` (and `b`) on the two-run view:
    link with `href(COMPARE) + "#" + compare_fragment(...)` (run dirs are URL-safe)."""
    return f"a={a[0]}/{a[1]}" + (f"&b={b[0]}/{b[1]}" if b else "")


def experiment_page(experiment: str, run_dir: str) -> str:
    return f"experiments/{experiment}-{run_dir}.html"


def experiment_image_page(experiment: str, run_dir: str, image_id: int) -> str:
    return f"experiments/{experiment}-{run_dir}/{image_id}.html"


def experiment_image_view(experiment: str, run_dir: str, image_id: int, ext: str = "png") -> str:
    return f"experiments/{experiment}-{run_dir}/{image_id}.{ext}"


def run_download(run_dir: str, table: str) -> str:
    return f"downloads/{run_dir}/{table}.csv.gz"


def shared_download(table: str) -> str:
    return f"downloads/{table}.csv.gz"


def href(from_page: str, to_path: str) -> str:
    """The relative, percent-encoded URL of `to_path` as linked from `from_page`.

    Files in the page's folder (or below it) are linked directly ("5.png"); anything else
    through the site root ("../../index.html"), so a link reads the same on every page of
    one depth.
    """
    folder = posixpath.dirname(from_page)
    if folder and to_path.startswith(folder + "/"):
        relative = to_path[len(folder) + 1 :]
    else:
        relative = "../" * from_page.count("/") + to_path
    return urllib.parse.quote(relative)
