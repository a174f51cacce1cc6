"""Rebuilds keep unchanged downloads (report/downloads.py ExportCache): a file whose inputs
(its rows, how they are selected, the writer) are unchanged since the previous build is
not exported again but left in place (same inode, same mtime); a changed, deleted,
truncated or edited file is exported again, and the result equals a fresh build. And the
run's lens_tokens file comes from token_pieces only where the lens rows agree with it."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest
from test_report import _make_db

from db import queries
from report import downloads as downloads_module
from report import urls
from report.build import build_site, run_dir_name

EXPORTS = (
    "export_parquet",
    "export_csv",
    "export_lens_tokens",
    "export_token_pieces_as_lens_tokens",
    "export_database",
)
_FOOTER_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC")


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, str]]:
    # One lens image per Parquet file: the split is exercised on a tiny database.
    monkeypatch.setattr(downloads_module, "FIRST_FILE_ROWS", 150)
    monkeypatch.setattr(downloads_module, "TARGET_FILE_BYTES", 1)
    path = tmp_path / "results.duckdb"
    return path, _make_db(path)


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Site paths of every file the export queries write (staging folder stripped)."""
    written: list[str] = []

    def spy(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(db: Any, *args: Any, **kwargs: Any) -> Any:
            path = Path(args[1] if function.__name__ in ("export_parquet", "export_csv") else args[0])
            parts = path.parts
            stage = next(i for i, part in enumerate(parts) if part.startswith(".report-build-"))
            written.append("/".join(parts[stage + 1 :]))
            return function(db, *args, **kwargs)

        return wrapper

    for name in EXPORTS:
        monkeypatch.setattr(queries, name, spy(getattr(queries, name)))
    return written


def _downloads(out: Path) -> dict[str, tuple[int, int, bytes]]:
    """Site path -> (inode, mtime, bytes) of every download file and the database copy."""
    files = [p for p in (out / "downloads").rglob("*") if p.is_file()]
    if (out / urls.SITE_DATABASE).is_file():
        files.append(out / urls.SITE_DATABASE)
    return {p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def _page(out: Path) -> str:
    return _FOOTER_TIME.sub("", (out / "downloads.html").read_text(encoding="utf-8"))


def _rebuild(path: Path, out: Path, exported: list[str]) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
    before = _downloads(out)
    exported.clear()
    build_site(path, out)
    after = _downloads(out)
    return before, after, set(exported)


def _check_against_fresh(path: Path, out: Path, tmp_path: Path) -> None:
    """Every download of the rebuilt site equals a build into an empty folder."""
    fresh = tmp_path / "fresh"
    build_site(path, fresh)
    rebuilt, new = _downloads(out), _downloads(fresh)
    assert set(rebuilt) == set(new)
    for relative in rebuilt:
        if relative != urls.SITE_DATABASE:  # a DuckDB file is not byte-reproducible
            assert rebuilt[relative][2] == new[relative][2], relative
    assert _page(out) == _page(fresh)


def test_a_rebuild_with_nothing_changed_exports_nothing(
    db: tuple[Path, dict[str, str]], tmp_path: Path, exported: list[str]
) -> None:
    path, _ = db
    out = tmp_path / "site"
    build_site(path, out)
    assert urls.SITE_DATABASE in exported and any(p.endswith(".csv.gz") for p in exported)
    assert any(p.endswith("lens_tokens-0000.parquet") for p in exported)
    page = _page(out)
    before, after, again = _rebuild(path, out, exported)
    assert again == set()  # not one export query
    assert len(before) > 10 and before == after  # every file in place: inode, mtime, bytes
    assert _page(out) == page
    manifest = json.loads((out / urls.BUILD_MANIFEST).read_text(encoding="utf-8"))
    assert set(manifest["downloads"]["files"]) == set(before)


@pytest.mark.parametrize("change", ["prob", "delete_image", "append_image"])
def test_a_change_rewrites_exactly_the_files_it_changes(
    db: tuple[Path, dict[str, str]], tmp_path: Path, exported: list[str], change: str
) -> None:
    path, run_ids = db
    run = run_ids["hostile"]
    out = tmp_path / "site"
    build_site(path, out)
    lens_files = sorted((out / "downloads" / run_dir_name(run)).glob("logit_lens-*.parquet"))
    assert len(lens_files) == 3  # one image per file
    con = duckdb.connect(str(path))
    query = "SELECT DISTINCT image_id FROM logit_lens WHERE run_id = ? ORDER BY 1"
    images = [i for (i,) in con.execute(query, [run]).fetchall()]
    if change == "prob":
        con.execute(
            "UPDATE logit_lens SET prob = prob / 2 WHERE run_id = ? AND image_id = ? AND layer = 1 AND rank = 1",
            [run, images[1]],
        )
    elif change == "delete_image":
        for table in ("logit_lens", "positions", "image_views", "run_images"):
            con.execute(f"DELETE FROM {table} WHERE run_id = ? AND image_id = ?", [run, images[-1]])
    else:
        new_image = images[-1] + 100
        con.execute(
            "INSERT INTO images SELECT ? AS image_id, * EXCLUDE (image_id) FROM images WHERE image_id = ?",
            [new_image, images[0]],
        )
        for table in ("run_images", "positions", "logit_lens", "image_views"):
            con.execute(
                f"INSERT INTO {table} SELECT * REPLACE (? AS image_id) FROM {table} WHERE run_id = ? AND image_id = ?",
                [new_image, run, images[0]],
            )
    con.close()
    before, after, again = _rebuild(path, out, exported)
    changed = {p for p in after if p not in before or after[p][2] != before[p][2]}
    run_dir = f"downloads/{run_dir_name(run)}/"
    tokens = run_dir + "lens_tokens-0000.parquet"
    # Exported: exactly the files whose content changed, and the run's lens_tokens where the
    # (token_id, token) rows changed (a count per pair, not the set: here the same set).
    assert again - {tokens} == changed and (tokens in again) == (change != "prob")
    for relative in set(after) - changed:
        assert after[relative] == before[relative], relative  # left in place
    lens = sorted(p for p in changed if p.startswith(run_dir + "logit_lens-"))
    if change == "prob":
        assert lens == [run_dir + "logit_lens-0001.parquet"]
    elif change == "delete_image":
        assert lens == [] and run_dir + "logit_lens-0002.parquet" in before
        assert run_dir + "logit_lens-0002.parquet" not in after
    else:
        assert lens == [run_dir + "logit_lens-0003.parquet"]
    assert tokens not in changed  # the same (id, text) pairs: same bytes, left in place
    _check_against_fresh(path, out, tmp_path)


def test_deleted_runs_lose_their_files(db: tuple[Path, dict[str, str]], tmp_path: Path, exported: list[str]) -> None:
    path, run_ids = db
    out = tmp_path / "site"
    build_site(path, out)
    gone = run_dir_name(run_ids["clean"])
    assert (out / "downloads" / gone).is_dir()
    con = duckdb.connect(str(path))
    for table in ("logit_lens", "positions", "image_views", "run_images", "skipped", "runs"):
        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_ids["clean"]])
    con.close()
    before, after, again = _rebuild(path, out, exported)
    assert not (out / "downloads" / gone).exists()
    assert again == {p for p in after if p not in before or after[p][2] != before[p][2]}
    kept = [p for p in after if p.startswith(f"downloads/{run_dir_name(run_ids['hostile'])}/")]
    assert kept and all(after[p] == before[p] for p in kept)
    _check_against_fresh(path, out, tmp_path)


def test_a_damaged_download_is_exported_again(
    db: tuple[Path, dict[str, str]], tmp_path: Path, exported: list[str]
) -> None:
    path, run_ids = db
    out = tmp_path / "site"
    build_site(path, out)
    run_dir = out / "downloads" / run_dir_name(run_ids["hostile"])
    deleted, truncated, edited = (run_dir / f"logit_lens-000{i}.parquet" for i in range(3))
    deleted.unlink()
    with truncated.open("r+b") as handle:
        handle.truncate(100)
    content = edited.read_bytes()
    edited.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))  # same size, a later mtime
    damaged = {p.relative_to(out).as_posix() for p in (deleted, truncated, edited)}
    before, after, again = _rebuild(path, out, exported)
    assert again == damaged
    assert all(after[p] == before[p] for p in set(after) - damaged)
    _check_against_fresh(path, out, tmp_path)


@pytest.mark.parametrize(
    "constant",
    ["EXPORT_FORMAT", "ROW_GROUP_SIZE", "PROB_SIGNIFICANT_BITS", "LENS_LAYER_BAND", "LENS_COMPRESSION_LEVEL"],
)
def test_a_changed_writer_rewrites_every_download(
    db: tuple[Path, dict[str, str]],
    tmp_path: Path,
    exported: list[str],
    monkeypatch: pytest.MonkeyPatch,
    constant: str,
) -> None:
    path, _ = db
    out = tmp_path / "site"
    build_site(path, out)
    value = getattr(downloads_module, constant)
    monkeypatch.setattr(downloads_module, constant, value + "-next" if isinstance(value, str) else value - 1)
    before, after, again = _rebuild(path, out, exported)
    assert again == set(after) == set(before)


# -- lens_tokens from token_pieces ------------------------------------------------------


def _with_token_pieces(path: Path, run_id: str, disagree: str | None = None) -> list[tuple[int, str]]:
    """Give the run token_pieces rows: the lens rows' (id, text) pairs plus ids the lens rows
    do not name; `disagree` = "text" changes one used id's text, "missing" drops one used id.
    Returns the lens rows' distinct (token_id, token), computed from the lens rows."""
    con = duckdb.connect(str(path))
    pairs = con.execute(
        "SELECT DISTINCT token_id, token FROM logit_lens WHERE run_id = ? ORDER BY ALL", [run_id]
    ).fetchall()
    rows = [(run_id, token_id, f"piece{token_id}", text) for token_id, text in pairs]
    rows += [(run_id, 90_000 + i, "extra", "not in a lens row") for i in range(3)]
    if disagree == "text":
        rows[1] = (*rows[1][:3], rows[1][3] + "?")
    elif disagree == "missing":
        del rows[1]
    con.executemany("INSERT INTO token_pieces VALUES (?, ?, ?, ?)", rows)
    con.close()
    return [(int(i), t) for i, t in pairs]


def _lens_tokens(out: Path, run_id: str) -> tuple[list[tuple[int, str]], str]:
    tokens = out / "downloads" / run_dir_name(run_id) / "lens_tokens-0000.parquet"
    pairs = duckdb.connect().execute(f"SELECT token_id, token FROM '{tokens}' ORDER BY ALL").fetchall()
    manifest = json.loads((out / urls.BUILD_MANIFEST).read_text(encoding="utf-8"))
    return [(int(i), t) for i, t in pairs], manifest["downloads"]["tokens"][run_id]["source"]


def test_lens_tokens_come_from_token_pieces_where_the_lens_rows_agree(
    db: tuple[Path, dict[str, str]], tmp_path: Path, exported: list[str]
) -> None:
    path, run_ids = db
    expected = _with_token_pieces(path, run_ids["hostile"])
    out = tmp_path / "site"
    build_site(path, out)
    pairs, source = _lens_tokens(out, run_ids["hostile"])
    assert source == "token_pieces" and pairs == expected  # the same content as the lens rows' DISTINCT
    assert _lens_tokens(out, run_ids["clean"])[1] == "lens"  # no token_pieces rows: the DISTINCT path
    tokens = f"downloads/{run_dir_name(run_ids['hostile'])}/lens_tokens-0000.parquet"
    assert tokens in exported
    exported.clear()
    build_site(path, out)
    assert tokens not in exported and _lens_tokens(out, run_ids["hostile"]) == (expected, "token_pieces")


@pytest.mark.parametrize("disagree", ["text", "missing"])
def test_lens_tokens_ignore_token_pieces_that_disagree_with_the_lens_rows(
    db: tuple[Path, dict[str, str]], tmp_path: Path, disagree: str
) -> None:
    path, run_ids = db
    expected = _with_token_pieces(path, run_ids["hostile"], disagree)
    out = tmp_path / "site"
    build_site(path, out)
    pairs, source = _lens_tokens(out, run_ids["hostile"])
    assert source == "lens" and pairs == expected  # each id maps to the lens rows' text
    native = duckdb.connect(str(path), read_only=True)
    disagreeing = native.execute(
        "SELECT count(*) FROM logit_lens l ANTI JOIN token_pieces p "
        "ON p.run_id = l.run_id AND p.token_id = l.token_id AND p.text = l.token WHERE l.run_id = ?",
        [run_ids["hostile"]],
    ).fetchone()
    native.close()
    assert disagreeing is not None and disagreeing[0] > 0  # the database does disagree
