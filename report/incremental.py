"""Incremental rebuilds: a second `report build` into the same folder rewrites only what changed.

The build always renders into a staging folder and then swaps the generated paths into
place (report/site.py `replace_owned`); this module keeps what did not change in place:

- Lens pages (the bulk of a build): each (run, image) gets an input digest, the sha256 of
  the tool version, the digest of the report's code and templates (`code_digest`), the
  run's recorded fields the page shows, the image's entry, where it gets its cells
  (inline, or parquet mode's lens file, its byte length and the image's row range), a digest and row count of each
  of its rows (logit_lens, positions, image_views, extra_views; annotations and images of
  the image), the other runs linking to it, the nav and whether downloads exist. The
  manifest (`MANIFEST`, in the site folder) records per page its digest, its files and the
  numbers the index and quantitative pages need from it. A page whose digest is unchanged
  and whose files are all still there is not rendered again: its files are hard-linked
  from the previous site into the staging folder (same inode, same mtime; a copy keeping
  the mtime where hard links fail).
- Every other file: rendered again, then `keep_unchanged` hard-links the previous file in
  its place when the bytes are identical, so untouched files keep their inode and mtime
  (static files, the vendored DuckDB-WASM, the Parquet files of unchanged runs).

- Downloads (report/downloads.py ExportCache): the manifest's `downloads` records, with their
  own key (the writer, not the report's code), let an unchanged Parquet or CSV file, the
  lens_tokens file or the database copy stay in place without being exported again.

Pages of deleted runs or images are simply not staged, so the swap removes them. An
unchanged page keeps the footer of the build that wrote it (its build time and database
digest): it says which database the page was rendered from. The manifest is thrown away
when the tool version or the report's code changes (every page is rendered again).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from db import queries
from db.store import ResultsDB
from report import urls
from report.catalogue import LensEntry

MANIFEST = urls.BUILD_MANIFEST
FORMAT = "llava-interp-build/1"
_REPORT = Path(__file__).resolve().parent
# Per-image tables a lens page reads (run_id + image_id), and shared per-image tables.
_RUN_TABLES = ("logit_lens", "positions", "image_views", "extra_views", "run_images", "skipped")
_SHARED_TABLES = ("images", "annotations")
_CHUNK = 1 << 20
_PAGE_FILE = re.compile(r"lens/[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def code_digest() -> str:
    """sha256 over the report package's source and templates (any change renders everything)."""
    import templates

    digest = hashlib.sha256()
    roots = [_REPORT, Path(templates.__file__).resolve().parent]
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(path.relative_to(root).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def row_digests(db: ResultsDB, run_ids: Iterable[str]) -> dict[tuple[str, int], list[Any]]:
    """(run_id, image_id) -> [table, rows, sum of row hashes, ...] for the tables a lens page reads."""
    tables = queries.table_columns(db)
    out: dict[tuple[str, int], list[Any]] = {}
    for table in _RUN_TABLES:
        if table not in tables or not {"run_id", "image_id"} <= tables[table]:
            continue
        names = [name for name, _ in queries.ordered_columns(db, table)]
        # The lens rows' digests as the downloads ask for them (queries remembers them for the export).
        token = ("token_id", "token") if table == "logit_lens" and {"token_id", "token"} <= set(names) else None
        for run_id in run_ids:
            for image_id, count, hashed, _ in queries.image_row_digests(db, table, run_id, names, token):
                out.setdefault((run_id, image_id), []).append([table, count, str(hashed)])
    shared: dict[int, list[Any]] = {}
    for table in _SHARED_TABLES:
        if table not in tables or "image_id" not in tables[table]:
            continue
        columns = ", ".join(f'"{name}"' for name, _ in queries.ordered_columns(db, table))
        for image_id, count, xor in db.sql(
            f"SELECT image_id, count(*), bit_xor(hash({columns})) FROM {table} GROUP BY image_id"
        ):
            shared.setdefault(int(image_id), []).append([table, int(count), str(xor)])
    for (_, image_id), value in out.items():
        value.append(shared.get(image_id, []))
    return out


def page_digest(
    entry: LensEntry,
    rows: list[Any] | None,
    other_runs: list[Any],
    context: dict[str, Any],
    code: str,
    lens: dict[str, Any] | None = None,
) -> str:
    """The input digest of one lens page (see the module docstring). `lens`: where the page
    gets its cells (`{"mode": "inline"}`, or parquet mode's file, bytes and row range), so a
    mode change or a rewritten lens Parquet file renders the page again."""
    run = asdict(entry.run)
    for unused in ("image_count", "skipped_count"):  # not on a lens page
        run.pop(unused, None)
    fields = {k: v for k, v in asdict(entry).items() if k not in ("summary", "run")}
    return _digest({"format": FORMAT, "code": code, "run": run, "entry": fields, "rows": rows,
                    "other_runs": other_runs, "context": context, "lens": lens})  # fmt: skip


class Manifest:
    """What the previous build wrote (out_dir/MANIFEST), and what this one writes."""

    def __init__(self, out_dir: Path, tool_version: str, code: str) -> None:
        self.out_dir, self.key = out_dir, {"format": FORMAT, "tool_version": tool_version, "code": code}
        self.previous: dict[str, Any] = {}
        # The downloads' records (report/downloads.py ExportCache), checked against their own
        # key there: a change of the report's code does not re-export unchanged downloads.
        self.previous_downloads: Any = None
        try:
            loaded = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
            if isinstance(loaded, dict) and loaded.get("key") == self.key and isinstance(loaded.get("lens"), dict):
                self.previous = loaded["lens"]
            if isinstance(loaded, dict):
                self.previous_downloads = loaded.get("downloads")
        except (OSError, ValueError):
            pass
        self.lens: dict[str, Any] = {}
        self.downloads: Any = None  # this build's ExportCache, when it writes downloads

    @staticmethod
    def name(entry: LensEntry) -> str:
        return f"{entry.run.run_id}\x00{entry.image_id}"

    def reusable(self, entry: LensEntry, digest: str) -> dict[str, Any] | None:
        """The previous record of this page when its digest matches and its files are all there."""
        record = self.previous.get(self.name(entry))
        if not isinstance(record, dict) or record.get("digest") != digest:
            return None
        files = record.get("files")
        if not isinstance(files, list) or not all(
            isinstance(f, str) and _PAGE_FILE.fullmatch(f) and ".." not in f and (self.out_dir / f).is_file()
            for f in files
        ):
            return None  # missing, or not a lens page's file (a hand-edited manifest links nothing else)
        return record

    def record(self, entry: LensEntry, digest: str, files: list[str], shape: tuple[int, int, int]) -> None:
        self.lens[self.name(entry)] = {"digest": digest, "files": files, "shape": list(shape), "summary": entry.summary}

    def write(self, stage: Path) -> None:
        """Write the manifest into the staging folder: after `keep_unchanged`, so that the
        downloads' recorded mtimes are those of the files the swap puts in place."""
        content: dict[str, Any] = {"key": self.key, "lens": self.lens}
        if self.downloads is not None:
            content["downloads"] = self.downloads.state(stage)
        (stage / MANIFEST).write_text(json.dumps(content, sort_keys=True), encoding="utf-8")


def link_previous(out_dir: Path, stage: Path, relative: str) -> int:
    """Put the previous site's file at `relative` into the staging folder without rewriting it
    (a hard link; a copy keeping its mtime where links fail). Returns its size."""
    source, target = out_dir / relative, stage / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target.stat().st_size


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            block = fa.read(_CHUNK)
            if block != fb.read(_CHUNK):
                return False
            if not block:
                return True


def keep_unchanged(out_dir: Path, stage: Path, owned: Iterable[str]) -> int:
    """Replace each staged file whose bytes equal the previous site's file at the same path
    by a hard link to that file (so the swap leaves it untouched). Returns how many."""
    kept = 0
    for name in owned:
        root = stage / name
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for path in paths:
            relative = path.relative_to(stage).as_posix()
            previous = out_dir / relative
            if not previous.is_file() or previous.is_symlink():
                continue
            try:
                if os.path.samefile(previous, path):
                    continue  # already linked (a reused lens page)
                if _same_file(previous, path):
                    path.unlink()
                    link_previous(out_dir, stage, relative)
                    kept += 1
            except OSError:
                continue
    return kept
