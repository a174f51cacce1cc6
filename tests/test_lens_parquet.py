"""Parquet-mode lens pages (`report build --lens-data parquet`): one copy of the lens cells.

The build: the mode is refused without downloads, `auto` picks per run by page count, a mode
change renders the pages again, a page's data file carries no cells. In Chromium (marker
`browser`) over report/serve.py: a parquet-mode page of a real tiny lens run (the collector
on a tiny random LLaVA-1.5) shows the database's top-k tokens and probabilities (within the
Parquet's rounding) and the inline page's; on a site of LLaVA-1.5-shaped images the page
reads only its image's row groups of a lens file many times larger; from file:// the page
says how to open it instead.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import duckdb
import pytest
from click.testing import CliRunner
from support.bench import site_scale
from support.serving import ByteCounter
from test_site_browser import IN_CI, Watched, browser  # noqa: F401 - browser is a fixture

from report import build as build_module
from report import hyparquet
from report.build import build_site, run_dir_name
from report.cli import report
from report.downloads import PROB_RELATIVE_ERROR
from report.serve import serving

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reader() -> Path:
    """The prepared hyparquet bundle: found, or fetched now with npm into .cache/hyparquet."""
    found, problem = hyparquet.find_hyparquet()
    if found is None and shutil.which("npm") is not None:
        import subprocess

        subprocess.run(["bash", str(REPO / hyparquet.FETCH_SCRIPT)], cwd=REPO, capture_output=True, timeout=600)
        found, problem = hyparquet.find_hyparquet()
    if found is None:
        if IN_CI:
            pytest.fail(f"parquet-mode lens pages cannot be tested in CI: {problem}")
        pytest.skip(problem)
    return found


@pytest.fixture(scope="module")
def scale_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six LLaVA-1.5-shaped images (bench/site_scale.py): 97,845 lens rows each, one lens file."""
    db = tmp_path_factory.mktemp("lensparquet") / "scale.duckdb"
    site_scale().make_database(db, 6)
    return db


def _data(out: Path, run_id: str, image_id: int) -> dict[str, Any]:
    text = (out / "lens" / run_dir_name(run_id) / f"{image_id}.data.js").read_text(encoding="utf-8")
    assert text.startswith("window.LENS_DATA = ") and text.endswith(";\n")
    return json.loads(text[len("window.LENS_DATA = ") : -2])


def _run_id(db: Path) -> str:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT run_id FROM runs WHERE experiment = 'lens'").fetchone()[0]
    finally:
        con.close()


# --- the build ------------------------------------------------------------------------------------
def test_parquet_without_downloads_is_refused_in_one_line(scale_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    result = CliRunner().invoke(
        report, ["build", "--db", str(scale_db), "--out", str(out), "--lens-data", "parquet", "--no-downloads"]
    )
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--no-downloads" in lines[0] and "--lens-data inline" in lines[0], result.output
    assert not (out / "index.html").exists()


def test_auto_picks_parquet_only_for_runs_over_the_threshold(
    scale_db: Path, tmp_path: Path, reader: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = _run_id(scale_db)
    small = build_site(scale_db, tmp_path / "small")  # 6 pages: at most PARQUET_LENS_PAGES
    assert small.lens_modes[run_id][0] == "inline" and "packed" in _data(tmp_path / "small", run_id, 1_000_000)
    monkeypatch.setattr(build_module, "PARQUET_LENS_PAGES", 5)
    big = build_site(scale_db, tmp_path / "big")
    assert big.lens_modes[run_id][0] == "parquet", big.lens_modes
    data = _data(tmp_path / "big", run_id, 1_000_002)
    assert "packed" not in data and data["parquet"]["row_end"] - data["parquet"]["row_start"] == data["n_cells"]
    assert (tmp_path / "big" / "vendor" / "hyparquet" / hyparquet.MODULE_FILE).is_file()
    assert not (tmp_path / "small" / "vendor" / "hyparquet").exists()
    # no downloads: nothing to read the cells from, so inline whatever the page count
    bare = build_site(scale_db, tmp_path / "bare", downloads=False)
    assert bare.lens_modes[run_id] == ("inline", "no downloads to read the cells from")
    # the summary line says which mode and why
    monkeypatch.setattr(build_module, "PARQUET_LENS_PAGES", 5)
    result = CliRunner().invoke(report, ["build", "--db", str(scale_db), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert f"Lens data of run {run_id}: parquet (6 lens pages, over 5" in result.output


def test_a_run_whose_lens_download_keeps_its_token_text_stays_inline(
    scale_db: Path, tmp_path: Path, reader: Path
) -> None:
    """A token id with two texts: the lens Parquet keeps its token column, so no lens_tokens file
    can stand in for it and the pages keep their cells."""
    db = tmp_path / "two-texts.duckdb"
    shutil.copyfile(scale_db, db)
    con = duckdb.connect(str(db))
    con.execute(
        "UPDATE logit_lens SET token = token || 'x' WHERE image_id = 1000001 AND layer = 0 AND position = 0 AND rank = 1"
    )
    con.close()
    out = tmp_path / "site"
    summary = build_site(db, out, lens_data="parquet")
    run_id = _run_id(db)
    mode, why = summary.lens_modes[run_id]
    assert mode == "inline" and "keeps the token text" in why
    assert "packed" in _data(out, run_id, 1_000_001)
    assert not (out / "vendor" / "hyparquet").exists()


@pytest.mark.parametrize("rebuild", [False, True])
def test_row_ranges_point_at_each_images_rows(scale_db: Path, tmp_path: Path, reader: Path, rebuild: bool) -> None:
    """Each page's (file, row_start, row_end) holds exactly its image's rows, per DuckDB; also
    after a rebuild that kept the lens files without exporting them (report/downloads.py)."""
    out = tmp_path / "site"
    run_id = _run_id(scale_db)
    summary = build_site(scale_db, out, lens_data="parquet")
    if rebuild:
        lens_file = next((out / "downloads").rglob("logit_lens-*.parquet"))
        before = lens_file.stat()
        shutil.rmtree(out / "lens")  # the pages are written again, from the kept files' ranges
        summary = build_site(scale_db, out, lens_data="parquet")
        assert summary.lens_pages_reused == 0
        after = lens_file.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # kept, not exported
    assert summary.lens_modes[run_id][0] == "parquet"
    page_dir = out / "lens" / run_dir_name(run_id)
    for image_id in (1_000_000, 1_000_003, 1_000_005):
        source = _data(out, run_id, image_id)["parquet"]
        path = (page_dir / source["file"]).resolve()
        assert path.stat().st_size == source["bytes"]
        images = duckdb.sql(
            f"SELECT DISTINCT image_id FROM (SELECT image_id, row_number() OVER () - 1 AS r FROM '{path}') "
            f"WHERE r >= {source['row_start']} AND r < {source['row_end']}"
        ).fetchall()
        assert images == [(image_id,)]
        assert (page_dir / source["tokens"]["file"]).resolve().stat().st_size == source["tokens"]["bytes"]


def test_a_mode_change_renders_the_pages_again(scale_db: Path, tmp_path: Path, reader: Path) -> None:
    out = tmp_path / "site"
    first = build_site(scale_db, out, lens_data="inline")
    assert first.lens_pages == 6
    again = build_site(scale_db, out, lens_data="inline")
    assert again.lens_pages_reused == 6
    switched = build_site(scale_db, out, lens_data="parquet")
    assert switched.lens_pages_reused == 0
    assert "parquet" in _data(out, _run_id(scale_db), 1_000_000)
    assert build_site(scale_db, out, lens_data="parquet").lens_pages_reused == 6
    back = build_site(scale_db, out, lens_data="inline")
    assert back.lens_pages_reused == 0 and "packed" in _data(out, _run_id(scale_db), 1_000_000)


def test_a_parquet_page_adds_a_few_kb_beyond_the_parquet(scale_db: Path, tmp_path: Path, reader: Path) -> None:
    """Per LLaVA-1.5-shaped image: the page and its data file (no cells) against the inline data file."""
    run_id = _run_id(scale_db)
    build_site(scale_db, tmp_path / "inline", lens_data="inline")
    build_site(scale_db, tmp_path / "parquet", lens_data="parquet")
    run_dir = run_dir_name(run_id)
    inline = (tmp_path / "inline" / "lens" / run_dir / "1000001.data.js").stat().st_size
    page = sum(
        (tmp_path / "parquet" / "lens" / run_dir / f"1000001.{ext}").stat().st_size for ext in ("data.js", "html")
    )
    lens_parquet = sum(f.stat().st_size for f in (tmp_path / "parquet" / "downloads").glob("*/logit_lens-*.parquet"))
    print(f"inline data.js {inline / 1e3:.1f} KB, parquet page + data.js {page / 1e3:.1f} KB, "
          f"lens Parquet {lens_parquet / 6e3:.1f} KB per image")  # fmt: skip
    assert page < 40_000 < inline / 5, (page, inline)
    assert page < lens_parquet / 6 / 8


# --- the shared positions files -------------------------------------------------------------------
def _positions_of(out: Path, run_id: str, image_id: int) -> tuple[str, dict[str, Any]]:
    """(the positions file a parquet-mode page names, its content), checked against its reference."""
    ref = _data(out, run_id, image_id)["positions_file"]
    path = out / "lens" / run_dir_name(run_id) / ref["file"]
    content = path.read_bytes()
    assert len(content) == ref["bytes"] and hashlib.sha256(content).hexdigest() == ref["sha256"]
    assert ref["file"] == f"positions-{ref['sha256'][:20]}.json"
    positions = json.loads(content)
    assert all(len(values) == ref["n_positions"] for values in positions.values())
    return ref["file"], positions


def _db_positions(db: Path, run_id: str, image_id: int) -> dict[str, list[Any]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute(
            "SELECT position, kind, label, patch_row, patch_col, token_id FROM positions "
            "WHERE run_id = ? AND image_id = ? ORDER BY position",
            [run_id, image_id],
        ).fetchall()
    finally:
        con.close()
    names = ("position", "kind", "label", "patch_row", "patch_col", "token_id")
    return {name: [row[k] for row in rows] for k, name in enumerate(names)}


def _swap_two_patches(db: Path, image_id: int) -> None:
    """Another layout for one image (as a dynamic-resolution family's own grid would give):
    its first two image positions, patches (0, 0) and (0, 1), trade places (again: back)."""
    con = duckdb.connect(str(db))
    first, second = con.execute(
        "SELECT position FROM positions WHERE image_id = ? AND kind = 'image' ORDER BY position LIMIT 2", [image_id]
    ).fetchall()
    con.execute(
        "UPDATE positions SET patch_col = 1 - patch_col WHERE image_id = ? AND position IN (?, ?)",
        [image_id, first[0], second[0]],
    )
    con.close()


def _position_files(out: Path, run_id: str) -> list[str]:
    return sorted(p.name for p in (out / "lens" / run_dir_name(run_id)).glob("positions-*"))


def test_a_run_whose_images_share_positions_gets_one_positions_file(
    scale_db: Path, tmp_path: Path, reader: Path
) -> None:
    """One file per run, data files without positions arrays, a few KB each at LLaVA-1.5 shape;
    the inline data file still holds its positions (it opens from file://)."""
    run_id = _run_id(scale_db)
    out = tmp_path / "site"
    build_site(scale_db, out, lens_data="parquet", jobs=2)
    files = _position_files(out, run_id)
    assert len(files) == 1, files
    for image_id in range(1_000_000, 1_000_006):
        data_js = out / "lens" / run_dir_name(run_id) / f"{image_id}.data.js"
        data = _data(out, run_id, image_id)
        assert "positions" not in data and data_js.stat().st_size < 6_000, data_js.stat().st_size
        name, positions = _positions_of(out, run_id, image_id)
        assert name == files[0]
        assert {k: positions[k] for k in _db_positions(scale_db, run_id, image_id)} == _db_positions(
            scale_db, run_id, image_id
        )
    build_site(scale_db, tmp_path / "inline", lens_data="inline")
    assert "positions" in _data(tmp_path / "inline", run_id, 1_000_000)
    assert _position_files(tmp_path / "inline", run_id) == []


@pytest.mark.parametrize("jobs", [1, 2])
def test_two_position_layouts_get_two_files_each_page_the_right_one(
    scale_db: Path, tmp_path: Path, reader: Path, jobs: int
) -> None:
    db = tmp_path / "two-layouts.duckdb"
    shutil.copyfile(scale_db, db)
    _swap_two_patches(db, 1_000_002)
    con = duckdb.connect(str(db))  # and another prompt for another image: a text label differs
    con.execute(
        "UPDATE positions SET label = label || 'x' WHERE image_id = 1000004 AND position = "
        "(SELECT max(position) FROM positions WHERE image_id = 1000004)"
    )
    con.close()
    run_id = _run_id(db)
    out = tmp_path / "site"
    build_site(db, out, lens_data="parquet", jobs=jobs)
    assert len(_position_files(out, run_id)) == 3
    names = {}
    for image_id in range(1_000_000, 1_000_006):
        names[image_id], positions = _positions_of(out, run_id, image_id)
        want = _db_positions(db, run_id, image_id)
        assert {k: positions[k] for k in want} == want, image_id
    assert len({names[1_000_002], names[1_000_004], names[1_000_000]}) == 3
    assert {names[i] for i in (1_000_000, 1_000_001, 1_000_003, 1_000_005)} == {names[1_000_000]}


def test_a_rebuild_after_one_images_positions_change_rewrites_only_that_page(
    scale_db: Path, tmp_path: Path, reader: Path
) -> None:
    db = tmp_path / "changing.duckdb"
    shutil.copyfile(scale_db, db)
    run_id = _run_id(db)
    out = tmp_path / "site"
    page_dir = out / "lens" / run_dir_name(run_id)
    build_site(db, out, lens_data="parquet")
    (shared,) = _position_files(out, run_id)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in page_dir.iterdir()}
    _swap_two_patches(db, 1_000_003)
    summary = build_site(db, out, lens_data="parquet")
    assert summary.lens_pages_reused == 5
    files = _position_files(out, run_id)
    assert len(files) == 2 and shared in files
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in page_dir.iterdir()}
    changed = {name for name in before if after.get(name) != before[name]}
    assert changed == {"1000003.data.js", "1000003.html"}, changed
    name, positions = _positions_of(out, run_id, 1_000_003)
    assert name != shared and {k: positions[k] for k in _db_positions(db, run_id, 1_000_003)} == _db_positions(
        db, run_id, 1_000_003
    )
    assert _positions_of(out, run_id, 1_000_002)[0] == shared
    # the image's positions back as they were: the file no page names is gone
    _swap_two_patches(db, 1_000_003)
    assert build_site(db, out, lens_data="parquet").lens_pages_reused == 5
    assert _position_files(out, run_id) == [shared]
    assert _positions_of(out, run_id, 1_000_003)[0] == shared
    # an inline build leaves no positions file behind
    build_site(db, out, lens_data="inline")
    assert _position_files(out, run_id) == []


# --- in the browser -------------------------------------------------------------------------------
browser_mark = pytest.mark.browser


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: dict[str, Path], demo_images: Any) -> Path:
    """A real lens run: the collector on a tiny random LLaVA-1.5 over the demo's images."""
    from collector.cli import cli

    images, annotations = demo_images
    db = tmp_path_factory.mktemp("tinyrun") / "tiny.duckdb"
    result = CliRunner().invoke(
        cli,
        ["collect", "lens", "--model", str(tiny_checkpoints["llava-1.5"]), "--images", str(images),
         "--annotations", str(annotations), "--db", str(db), "--device", "cpu", "--limit", "3", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return db


@pytest.fixture(scope="module")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, reader: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tinysites")
    build_site(tiny_run, root / "inline", lens_data="inline")
    build_site(tiny_run, root / "parquet", lens_data="parquet")
    return root / "inline", root / "parquet"


def _model_cells(page: Any, picks: list[tuple[int, int]]) -> list[list[dict[str, Any]]]:
    return page.evaluate(
        """(picks) => picks.map(([layer, row]) => window.LlavaLens.model.topk(layer, row).map(c =>
             ({token: c.token, id: c.id, prob: c.prob, piece: c.piece, code: c.code})))""",
        [list(p) for p in picks],
    )


def _patch_mapping(page: Any) -> dict[str, Any]:
    """The page model's patch -> row map (image positions), as {patch: LM position}, and its labels."""
    return page.evaluate(
        """() => { const m = window.LlavaLens.model, out = {};
             m.rowOfPatch.forEach((row, patch) => { if (row >= 0) out[patch] = m.positions.position[row]; });
             return {patches: out, labels: m.positions.label, rows: m.nRows}; }"""
    )


def _db_patch_mapping(db: Path, run_id: str, image_id: int) -> dict[str, Any]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        (grid_cols,) = con.execute(
            "SELECT grid_cols FROM run_images WHERE run_id = ? AND image_id = ?", [run_id, image_id]
        ).fetchone()
        rows = con.execute(
            "SELECT position, kind, label, patch_row, patch_col FROM positions WHERE run_id = ? AND image_id = ? "
            "ORDER BY position",
            [run_id, image_id],
        ).fetchall()
    finally:
        con.close()
    patches = {str(r * grid_cols + c): position for position, kind, _, r, c in rows if kind == "image"}
    return {"patches": patches, "labels": [label for _, _, label, _, _ in rows], "rows": len(rows)}


@browser_mark
def test_pages_of_two_position_layouts_map_patches_as_the_database(
    browser: Any,  # noqa: F811
    scale_db: Path,
    tmp_path: Path,
    reader: Path,
) -> None:
    """Two images of one run with different layouts (two patches traded): each page fetches its
    own positions file and maps patches to rows exactly as the database's positions say."""
    db = tmp_path / "two-layouts.duckdb"
    shutil.copyfile(scale_db, db)
    _swap_two_patches(db, 1_000_002)
    run_id = _run_id(db)
    out = tmp_path / "site"
    build_site(db, out, lens_data="parquet")
    seen = {}
    with serving(out) as base:
        for image_id in (1_000_000, 1_000_002):
            watched = Watched(browser, base)
            try:
                page = watched.goto(f"lens/{run_dir_name(run_id)}/{image_id}.html")
                page.wait_for_selector("body[data-lens-ready]", timeout=30_000)
                seen[image_id] = _patch_mapping(page)
                name = _data(out, run_id, image_id)["positions_file"]["file"]
                assert [u for u in watched.requests if "/positions-" in u] == [
                    f"{base}lens/{run_dir_name(run_id)}/{name}"
                ]
                watched.check()
            finally:
                watched.context.close()
    for image_id, got in seen.items():
        assert got == _db_patch_mapping(db, run_id, image_id), image_id
    assert seen[1_000_000]["patches"]["0"] == seen[1_000_002]["patches"]["1"]
    assert seen[1_000_000]["patches"]["1"] == seen[1_000_002]["patches"]["0"]


@browser_mark
def test_parquet_page_shows_the_databases_cells(
    browser: Any,  # noqa: F811
    tiny_run: Path,
    tiny_sites: tuple[Path, Path],
) -> None:
    inline_site, parquet_site = tiny_sites
    con = duckdb.connect(str(tiny_run), read_only=True)
    run_id, image_id = con.execute("SELECT run_id, min(image_id) FROM run_images GROUP BY run_id").fetchone()
    n_layers, positions = con.execute(
        "SELECT n_layers, n_positions FROM run_images WHERE run_id = ? AND image_id = ?", [run_id, image_id]
    ).fetchone()
    ordered = [p for (p,) in con.execute(
        "SELECT position FROM positions WHERE run_id = ? AND image_id = ? ORDER BY position", [run_id, image_id]
    ).fetchall()]  # fmt: skip
    picks = [(0, 0), (n_layers - 1, positions - 1), (n_layers // 2, positions // 2), (1, 3)]
    relative = f"lens/{run_dir_name(run_id)}/{image_id}.html"
    shown, mapping = {}, {}
    for name, out in (("inline", inline_site), ("parquet", parquet_site)):
        with serving(out) as base:
            watched = Watched(browser, base)
            try:
                page = watched.goto(relative)
                page.wait_for_selector("body[data-lens-ready]", timeout=20_000)
                shown[name] = _model_cells(page, picks)
                mapping[name] = _patch_mapping(page)
                if name == "parquet":
                    assert page.locator("#load-progress").is_hidden()
                    # the top-k panel renders from the same model: the first cell's token is there
                    assert page.locator("#lens-table-wrap").count() == 1
                watched.check()
            finally:
                watched.context.close()
    assert _data(parquet_site, run_id, image_id)["parquet"]["pieces"] is not None  # the run recorded pieces
    # the parquet page's positions come from the run's shared file: the patch <-> row mapping is the database's
    assert "positions" not in _data(parquet_site, run_id, image_id)
    assert mapping["parquet"] == mapping["inline"] == _db_patch_mapping(tiny_run, run_id, image_id)
    for (layer, row), got, inline in zip(picks, shown["parquet"], shown["inline"], strict=True):
        want = con.execute(
            "SELECT rank, token_id, token, prob FROM logit_lens WHERE run_id = ? AND image_id = ? AND layer = ? "
            "AND position = ? ORDER BY rank",
            [run_id, image_id, layer, ordered[row]],
        ).fetchall()
        pieces = dict(con.execute(
            "SELECT token_id, piece FROM token_pieces WHERE run_id = ?", [run_id]
        ).fetchall())  # fmt: skip
        assert len(got) == len(want) == len(inline)
        for cell, (_, token_id, token, prob), other in zip(got, want, inline, strict=True):
            assert (cell["id"], cell["token"]) == (token_id, token)
            assert cell["piece"] == pieces.get(token_id)
            assert cell["prob"] == pytest.approx(prob, rel=PROB_RELATIVE_ERROR, abs=1e-12)
            # the inline page: the same token, and the same 1-byte code but where the rounding crosses a step
            assert (other["id"], other["token"], other["piece"]) == (cell["id"], cell["token"], cell["piece"])
            assert abs(other["code"] - cell["code"]) <= 1
    con.close()


@pytest.fixture(scope="module")
def scale_site(tmp_path_factory: pytest.TempPathFactory, scale_db: Path, reader: Path) -> Path:
    out = tmp_path_factory.mktemp("scalesite") / "site"
    build_site(scale_db, out, lens_data="parquet")
    return out


@browser_mark
def test_a_parquet_page_reads_only_its_images_row_groups(
    browser: Any,  # noqa: F811
    scale_db: Path,
    scale_site: Path,
) -> None:
    run_id = _run_id(scale_db)
    lens_files = sorted(scale_site.glob("downloads/*/logit_lens-*.parquet"))
    lens_total = sum(f.stat().st_size for f in lens_files)
    assert len(lens_files) == 1 and lens_total > 1_500_000
    on_bytes = ByteCounter()
    moved, responses = on_bytes.moved, on_bytes.responses

    image_id = 1_000_003
    with serving(scale_site, on_bytes=on_bytes) as base:
        watched = Watched(browser, base)
        try:
            page = watched.goto(f"lens/{run_dir_name(run_id)}/{image_id}.html")
            page.wait_for_selector("body[data-lens-ready]", timeout=30_000)
            last = page.evaluate("window.LlavaLens.model.top1(32, 592)")
            watched.check()
        finally:
            watched.context.close()
    lens_moved = sum(n for path, n in moved.items() if "/logit_lens-" in path)
    lens_requests = sum(n for path, n in responses.items() if "/logit_lens-" in path)
    total = sum(moved.values())
    print(f"one page view: {lens_moved / 1e3:.0f} KB of the lens file ({lens_total / 1e3:.0f} KB) in "
          f"{lens_requests} requests; {total / 1e3:.0f} KB in all")  # fmt: skip
    per_image = lens_total / 6
    # The footer and the row groups holding the image (an image spans at most 4 of them), not the file.
    assert 0 < lens_moved < 2 * per_image + 40_000 and lens_moved < lens_total / 2, (lens_moved, lens_total)
    assert 2 <= lens_requests <= 6, responses
    con = duckdb.connect(str(scale_db), read_only=True)
    token, prob = con.execute(
        "SELECT token, prob FROM logit_lens WHERE image_id = ? AND layer = 32 AND position = 592 AND rank = 1",
        [image_id],
    ).fetchone()
    con.close()
    assert last["token"] == token and last["prob"] == pytest.approx(prob, rel=PROB_RELATIVE_ERROR)


@browser_mark
def test_a_parquet_page_from_file_says_how_to_open_it(
    browser: Any,  # noqa: F811
    scale_db: Path,
    scale_site: Path,
) -> None:
    run_id = _run_id(scale_db)
    watched = Watched(browser, scale_site.resolve().as_uri() + "/")
    try:
        page = watched.goto(f"lens/{run_dir_name(run_id)}/1000000.html")
        page.wait_for_selector("body[data-lens-failed]", timeout=10_000)
        assert page.get_attribute("body", "data-lens-failed") == "notice"
        message = page.locator("#load-error")
        assert message.is_visible() and page.locator("#load-progress").is_hidden()
        text = message.inner_text()
        assert "llava-interp report serve --dir SITE" in text and "--lens-data inline" in text
        assert "\n" not in text.strip()  # one paragraph
        watched.check()  # no console error, no uncaught exception, nothing fetched off the folder
    finally:
        watched.context.close()


def test_pinned_version_matches_the_fetch_script() -> None:
    script = (REPO / hyparquet.FETCH_SCRIPT).read_text(encoding="utf-8")
    assert f"HYPARQUET_VERSION={hyparquet.HYPARQUET_VERSION}\n" in script


def test_vendored_reader_matches_its_manifest(scale_db: Path, tmp_path: Path, reader: Path) -> None:
    import hashlib

    out = tmp_path / "site"
    build_site(scale_db, out, lens_data="parquet")
    vendor = out / hyparquet.VENDOR_DIR
    manifest = json.loads((vendor / hyparquet.MANIFEST).read_text(encoding="utf-8"))
    bundle = (vendor / hyparquet.MODULE_FILE).read_bytes()
    assert manifest["hyparquet"] == hyparquet.HYPARQUET_VERSION
    assert manifest["files"][hyparquet.MODULE_FILE]["sha256"] == hashlib.sha256(bundle).hexdigest()
    assert {p.name for p in vendor.glob("LICENSE-*.txt")} >= {"LICENSE-hyparquet.txt", "LICENSE-fzstd.txt"}


def test_a_damaged_reader_is_refused_for_parquet_and_skipped_by_auto(
    scale_db: Path, tmp_path: Path, reader: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    damaged = tmp_path / "vendor"
    shutil.copytree(reader, damaged)
    (damaged / hyparquet.MODULE_FILE).write_text("export {};\n", encoding="utf-8")
    monkeypatch.setenv(hyparquet.ENV_VAR, str(damaged))
    with pytest.raises(build_module.ReportError, match="sha256"):
        build_site(scale_db, tmp_path / "refused", lens_data="parquet")
    monkeypatch.setattr(build_module, "PARQUET_LENS_PAGES", 5)
    summary = build_site(scale_db, tmp_path / "auto")
    (mode, why) = summary.lens_modes[_run_id(scale_db)]
    assert mode == "inline" and "no vendored Parquet reader" in why


@browser_mark
def test_compare_page_reads_parquet_mode_data(browser: Any, tmp_path: Path, reader: Path) -> None:  # noqa: F811
    """compare.html resolves a parquet-mode data file's paths against the data file, not itself."""
    from test_lens_page import _make_two_run_db
    from test_report import N_LAYERS

    db_path = tmp_path / "two.duckdb"
    ids = _make_two_run_db(db_path)
    out = tmp_path / "site"
    summary = build_site(db_path, out, lens_data="parquet")
    assert {mode for mode, _ in summary.lens_modes.values()} == {"parquet"}, summary.lens_modes
    # each run's positions in its shared file, fetched relative to the data file (not compare.html)
    assert all("positions" not in _data(out, run, 102) and "positions_file" in _data(out, run, 102) for run in ids)
    con = duckdb.connect(str(db_path), read_only=True)
    top1 = {
        (run, layer, position): token
        for run, layer, position, token in con.execute(
            "SELECT run_id, layer, position, token FROM logit_lens WHERE image_id = 102 AND rank = 1"
        ).fetchall()
    }
    con.close()
    a, b = (f"{run_dir_name(run)}/102" for run in ids)
    with serving(out) as base:
        watched = Watched(browser, base)
        try:
            page = watched.goto(f"compare.html#a={a}&b={b}")
            page.wait_for_selector("body[data-compare-ready]", timeout=20_000)
            rows = page.locator("#compare-table tbody tr")
            assert rows.count() > 0
            n_diff = 0
            for i in range(rows.count()):
                row = rows.nth(i)
                pa_, pb = (int(t) for t in row.locator("th.pos").all_inner_texts())
                cells = row.locator("td")
                for layer in range(N_LAYERS):
                    differs = top1[(ids[0], layer, pa_)] != top1[(ids[1], layer, pb)]
                    assert ("differ" in cells.nth(layer).get_attribute("class")) == differs
                    n_diff += differs
            assert n_diff > 0
            watched.check()
        finally:
            watched.context.close()


# --- in Node (no browser): the page's decoder on the served files ---------------------------------
NODE_SCRIPT = """
import fs from "fs";
const [page, dataJs, lensData, bundle] = process.argv.slice(1);
globalThis.window = globalThis;
globalThis.location = { protocol: "http:", href: page };
(0, eval)(fs.readFileSync(dataJs, "utf8"));
(0, eval)(fs.readFileSync(lensData, "utf8"));
const hyparquet = await import(bundle);
const seen = [];
const m = await LensModel.load(LENS_DATA, { hyparquet, onProgress: (text) => seen.push(text) });
const cells = [];
for (let l = 0; l < m.nLayers; l++) for (let r = 0; r < m.nRows; r++) for (const c of m.topk(l, r))
  cells.push([l, m.positions.position[r], c.rank, c.id, c.token, c.prob, c.piece]);
process.stdout.write(JSON.stringify({ cells, progress: seen.length }));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_the_page_decoder_reads_every_cell_of_the_database(tmp_path: Path, reader: Path) -> None:
    """lens-data.js in Node on a parquet-mode site served over HTTP: every (layer, position, rank)
    of the image is the database's row (id and text exact, probability within the rounding);
    the hostile test database's texts survive the lens_tokens round trip."""
    import subprocess

    from test_lens_page import _make_two_run_db

    db_path = tmp_path / "two.duckdb"
    ids = _make_two_run_db(db_path)
    con = duckdb.connect(str(db_path))
    # A text that starts with U+FEFF (LLaVA-1.5's id 30143 is that character alone): kept, not stripped as a BOM.
    con.execute(
        "UPDATE logit_lens SET token = '\ufeff' || token WHERE token_id = (SELECT min(token_id) FROM logit_lens)"
    )
    assert con.execute("SELECT count(*) FROM logit_lens WHERE token LIKE '\ufeff%'").fetchone()[0] > 0
    con.close()
    out = tmp_path / "site"
    build_site(db_path, out, lens_data="parquet")
    con = duckdb.connect(str(db_path), read_only=True)
    for run_id in ids:
        image_id = 102
        page = f"lens/{run_dir_name(run_id)}/{image_id}.html"
        with serving(out) as base:
            done = subprocess.run(
                ["node", "--input-type=module", "-e", NODE_SCRIPT, base + page,
                 str(out / page.replace(".html", ".data.js")), str(out / "static" / "lens-data.js"),
                 (reader / hyparquet.MODULE_FILE).as_uri()],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
        assert "parquet" in _data(out, run_id, image_id)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout)
        assert result["progress"] >= 3  # the page is told what is being read
        want = con.execute(
            "SELECT l.layer, l.position, l.rank, l.token_id, l.token, l.prob, p.piece FROM logit_lens l "
            "LEFT JOIN token_pieces p ON p.run_id = l.run_id AND p.token_id = l.token_id "
            "WHERE l.run_id = ? AND l.image_id = ? ORDER BY l.layer, l.position, l.rank",
            [run_id, image_id],
        ).fetchall()
        got = sorted(result["cells"], key=lambda c: (c[0], c[1], c[2]))
        assert len(got) == len(want) > 0
        for g, w in zip(got, want, strict=True):
            assert g[:5] == list(w[:5]) and g[6] == w[6], (g, w)
            assert g[5] == pytest.approx(w[5], rel=PROB_RELATIVE_ERROR, abs=1e-12)
    con.close()


@browser_mark
def test_the_next_page_of_a_tab_reads_no_footer_again(
    browser: Any,  # noqa: F811
    scale_db: Path,
    scale_site: Path,
) -> None:
    """The lens file's footer is kept in sessionStorage: a second page of the same file in the
    tab asks only for its row groups (and still shows the database's cells)."""
    run_id = _run_id(scale_db)
    ranges: list[tuple[int, str]] = []
    with serving(scale_site) as base:
        watched = Watched(browser, base)
        try:
            page = watched.page
            view = [0]
            page.on(
                "request",
                lambda r: ranges.append((view[0], r.headers.get("range", ""))) if "/logit_lens-" in r.url else None,
            )
            for image_id in (1_000_001, 1_000_004):
                page.goto(f"{base}lens/{run_dir_name(run_id)}/{image_id}.html")
                page.wait_for_selector("body[data-lens-ready]", timeout=30_000)
                view[0] += 1
            last = page.evaluate("window.LlavaLens.model.top1(32, 592)")
            watched.check()
        finally:
            watched.context.close()
    source = _data(scale_site, run_id, 1_000_004)["parquet"]
    footer = f"bytes={source['bytes'] - source['footer_bytes']}-"
    first = [r for v, r in ranges if v == 0]
    second = [r for v, r in ranges if v == 1]
    assert any(r.startswith(footer) for r in first), first
    assert second and not any(r.startswith(footer) for r in second), second
    con = duckdb.connect(str(scale_db), read_only=True)
    token, prob = con.execute(
        "SELECT token, prob FROM logit_lens WHERE image_id = 1000004 AND layer = 32 AND position = 592 AND rank = 1"
    ).fetchone()
    con.close()
    assert last["token"] == token and last["prob"] == pytest.approx(prob, rel=PROB_RELATIVE_ERROR)


@browser_mark  # the HTML validators run with the browser tests
def test_a_parquet_mode_lens_page_is_valid_html(scale_site: Path, scale_db: Path) -> None:
    """The Nu HTML Checker on a parquet-mode page (its progress line and legend differ from inline)."""
    import subprocess

    from test_site_validation import _unavailable as unavailable
    from test_site_validation import _vnu_jar

    java, jar = shutil.which("java"), _vnu_jar()
    if java is None or jar is None:
        unavailable("Java or vnu.jar not found (apt-get install default-jre-headless; pip install -e '.[test]')")
    page = scale_site / "lens" / run_dir_name(_run_id(scale_db)) / "1000002.html"
    assert 'id="load-progress"' in page.read_text(encoding="utf-8")
    done = subprocess.run(
        [str(java), "-Xss2m", "-jar", str(jar), "--errors-only", "--format", "json", str(page)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = done.stderr + done.stdout
    messages = json.loads(report[report.index('{"messages"') :].splitlines()[0])["messages"]
    assert [m for m in messages if m.get("type") in ("error", "non-document-error")] == [], messages


@browser_mark
def test_a_lens_file_that_cannot_be_read_is_said_on_the_page(
    browser: Any,  # noqa: F811
    scale_db: Path,
    scale_site: Path,
) -> None:
    """A lens file the server does not answer: the page says what failed instead of a table,
    and the progress line goes away."""
    run_id = _run_id(scale_db)
    with serving(scale_site) as base:
        watched = Watched(browser, base)
        try:
            page = watched.page
            page.route("**/logit_lens-*.parquet", lambda route: route.fulfill(status=404, body="gone"))
            page.goto(f"{base}lens/{run_dir_name(run_id)}/1000002.html")
            page.wait_for_selector("body[data-lens-failed]", timeout=30_000)
            assert page.get_attribute("body", "data-lens-failed") == "error"
            box = page.locator("#load-error")
            assert box.is_visible() and "Could not load the lens data" in box.inner_text()
            assert "404" in box.inner_text()
            assert page.locator("#load-progress").is_hidden()
            assert page.get_attribute("body", "data-lens-ready") is None
            assert [e for e in watched.errors if "pageerror" in e] == []  # reported, not thrown
        finally:
            watched.context.close()
