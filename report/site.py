"""Site plumbing: the staging writer, the Jinja environment, page rendering (every link
relative to the page, through report/urls.py), static files, provenance, and the text
helpers every page uses.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from db import queries
from db.migrations import LATEST_VERSION
from db.store import ResultsDB
from db.version import TOOL_VERSION
from report import urls

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DEMO_WARNING = "weights are random: demo output, not results"
# The demo's trained organism (collector/organism.py) shows real effects, but on synthetic scenes.
ORGANISM_WARNING = "model organism: a tiny model trained on synthetic scenes, not results of a real VLM"

_JSON_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_JSON_SCRIPT_UNSAFE = re.compile("[<>&\u2028\u2029]")


class ReportError(Exception):
    """Results the report cannot render faithfully (one line, shown by the CLI)."""


def script_json(value: Any) -> str:
    """JSON text safe to embed in a classic script, in HTML or in a .js file."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return _JSON_SCRIPT_UNSAFE.sub(lambda m: _JSON_SCRIPT_ESCAPES[m.group()], text)


def readable_json(value: Any) -> str:
    """Indented JSON for people: non-ASCII stays readable, invisible line separators are escaped."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def format_time(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M UTC")  # the store writes naive UTC
    return str(value)


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _template_root() -> Traversable:
    return files("templates")


def environment() -> jinja2.Environment:
    """Templates from the `templates` package; every value autoescaped, undefined names fail."""
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


class Writer:
    """Writes files under a staging folder and counts them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = 0
        self.bytes = 0
        self.written: list[str] | None = None  # when a list: every path written or accounted, in order

    def write(self, relative: str, content: str | bytes) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode("utf-8") if isinstance(content, str) else content
        path.write_bytes(data)
        self.files += 1
        self.bytes += len(data)
        if self.written is not None:
            self.written.append(relative)

    def write_shared(self, relative: str, content: str | bytes) -> None:
        """Write a content-addressed file that many pages share (its name says its content):
        once per build. Where the staging folder already holds it (written by another page or
        worker, or linked from the previous site for a reused page) only its path is recorded;
        otherwise it is written to a temporary name and renamed into place, so parallel workers
        writing the same file never race and a hard-linked previous file is never written through."""
        path = self.root / relative
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            data = content.encode("utf-8") if isinstance(content, str) else content
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, path)
            self.files += 1
            self.bytes += len(data)
        if self.written is not None:
            self.written.append(relative)

    def path(self, relative: str) -> Path:
        """A path for a file written by someone else (DuckDB COPY); call `account` after."""
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def account(self, relative: str) -> int:
        size = (self.root / relative).stat().st_size
        self.files += 1
        self.bytes += size
        if self.written is not None:
            self.written.append(relative)
        return size


@dataclass
class Site:
    """What every page render needs: the writer, the templates and the context shared by all
    pages (provenance, demo warning, experiment nav)."""

    writer: Writer
    env: jinja2.Environment
    common: dict[str, Any]

    def render(self, template: str, path: str, /, **context: Any) -> None:
        """Render `template` into the file at site path `path`; the template links with
        `href(target)`, which turns a site path into a URL relative to this page."""
        html = self.env.get_template(template).render(
            href=lambda target: urls.href(path, target), **{**self.common, **context}
        )
        self.writer.write(path, html)


def copy_static(writer: Writer) -> None:
    static = _template_root().joinpath("static")
    for item in static.iterdir():
        if item.is_file() and not item.name.startswith("."):
            writer.write(urls.static(item.name), item.read_bytes())


def replace_owned(stage: Path, out_dir: Path) -> None:
    """Move the staged site into out_dir, replacing only the paths the build owns."""
    for name in urls.OWNED_PATHS:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        staged = stage / name
        if staged.exists():
            staged.rename(target)


def provenance(db: ResultsDB, db_path: Path, generated_at: str) -> dict[str, Any]:
    """The footer of every page: tool, database file and schema, build time."""
    return {
        "tool_version": TOOL_VERSION,
        "db_name": db_path.name,
        "db_sha256": sha256_file(db_path),
        "db_bytes": db_path.stat().st_size,
        "schema_version": queries.schema_version(db),
        "generated_at": generated_at,
    }


def common_context(
    site_provenance: dict[str, Any], generated_at: str, experiment_nav: list[dict[str, str]]
) -> dict[str, Any]:
    """The context every page gets (base.html.j2: nav, demo warning, provenance footer)."""
    return {
        "demo_warning": DEMO_WARNING,
        "generated_at": generated_at,
        "provenance": site_provenance,
        "schema_latest": LATEST_VERSION,
        "experiment_nav": experiment_nav,
    }
