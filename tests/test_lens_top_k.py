"""`report build --lens-top-k N`: the site publishes ranks 1..N of each lens cell only.

Checked against the database: an inline page's cells are exactly the database's ranks
1..N (tokens, ids, probabilities within the page's 2.5 % codes), the lens Parquet files hold
exactly the database's rows with rank <= N, a parquet-mode page's row range is its image's
capped rows, the quantitative page (computed from the database) does not change, and a
different cap rebuilds what it changes while the same cap keeps everything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner
from support.bench import site_scale

from report import hyparquet, lens_codec
from report.build import build_site, run_dir_name
from report.cli import report

REPO = Path(__file__).resolve().parents[1]
IMAGES = (1_000_000, 1_000_003)


@pytest.fixture(scope="module")
def scale_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four LLaVA-1.5-shaped images (bench/site_scale.py), top-5: 97,845 lens rows each."""
    db = tmp_path_factory.mktemp("lenstopk") / "scale.duckdb"
    site_scale().make_database(db, 4)
    return db


def _run_id(db: Path) -> str:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT run_id FROM runs WHERE experiment = 'lens'").fetchone()[0]


def _data(out: Path, run_id: str, image_id: int) -> dict[str, Any]:
    text = (out / "lens" / run_dir_name(run_id) / f"{image_id}.data.js").read_text(encoding="utf-8")
    return json.loads(text[len("window.LENS_DATA = ") : -2])


def _db_rows(db: Path, run_id: str, image_id: int, max_rank: int) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(
            "SELECT layer, position, rank, token_id, prob FROM logit_lens WHERE run_id = ? AND image_id = ? "
            "AND rank <= ? ORDER BY layer, position, rank",
            [run_id, image_id, max_rank],
        ).fetchall()


def test_inline_pages_hold_exactly_the_first_ranks(scale_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    run_id = _run_id(scale_db)
    build_site(scale_db, out, lens_data="inline", lens_top_k=2, downloads=False)
    for image_id in IMAGES:
        data = _data(out, run_id, image_id)
        assert data["top_k"] == 2
        n_rows = len(data["positions"]["position"])
        assert data["n_cells"] == data["n_layers"] * n_rows * 2
        tokens, index, probs = lens_codec.unpack_lens_data(data)
        ids = lens_codec.unpack_token_ids(data)
        assert ids is not None
        row_of = {p: r for r, p in enumerate(data["positions"]["position"])}
        expected = _db_rows(scale_db, run_id, image_id, 2)
        assert len(expected) == data["n_cells"]
        for layer, position, rank, token_id, prob in expected[:: max(1, len(expected) // 500)]:
            cell = (layer * n_rows + row_of[position]) * 2 + (rank - 1)
            assert ids[index[cell]] == token_id
            assert probs[cell] == pytest.approx(prob, rel=0.026)
    page = (out / "lens" / run_dir_name(run_id) / f"{IMAGES[0]}.html").read_text(encoding="utf-8")
    assert "--lens-top-k 2" in page and "collected top-5" in page


def test_downloads_and_parquet_pages_hold_the_capped_rows(scale_db: Path, tmp_path: Path) -> None:
    if hyparquet.find_hyparquet()[0] is None:
        pytest.skip("the vendored Parquet reader is not prepared (scripts/fetch-hyparquet.sh)")
    out = tmp_path / "site"
    run_id = _run_id(scale_db)
    summary = build_site(scale_db, out, lens_data="parquet", lens_top_k=3)
    assert summary.lens_modes[run_id][0] == "parquet"
    files = sorted((out / "downloads").rglob("logit_lens-*.parquet"))
    assert files
    with duckdb.connect(str(scale_db), read_only=True) as con:
        published = con.execute(
            f"SELECT image_id, layer, position, rank, token_id FROM read_parquet({[str(f) for f in files]}) "
            "ORDER BY ALL"
        ).fetchall()
        expected = con.execute(
            "SELECT image_id, layer, position, rank, token_id FROM logit_lens WHERE run_id = ? AND rank <= 3 "
            "ORDER BY ALL",
            [run_id],
        ).fetchall()
    assert published == expected and max(row[3] for row in published) == 3
    for image_id in IMAGES:
        data = _data(out, run_id, image_id)
        source = data["parquet"]
        assert data["top_k"] == 3
        assert (
            source["row_end"] - source["row_start"] == data["n_cells"] == len(_db_rows(scale_db, run_id, image_id, 3))
        )
    downloads_page = (out / "downloads.html").read_text(encoding="utf-8")
    assert 'id="lens-top-k-note"' in downloads_page and "--lens-top-k 3" in downloads_page
    assert "--lens-top-k 3" in (out / "sql.html").read_text(encoding="utf-8")


def _without_build_time(text: str) -> str:
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "", text)


def test_a_cap_leaves_the_database_pages_alone_and_rebuilds_what_it_changes(scale_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    run_id = _run_id(scale_db)
    full = build_site(scale_db, out, lens_data="inline")
    quantitative = _without_build_time((out / "quantitative.html").read_text(encoding="utf-8"))
    lens_file = next((out / "downloads").rglob("logit_lens-*.parquet"))
    before = lens_file.stat().st_size

    capped = build_site(scale_db, out, lens_data="inline", lens_top_k=1)
    assert capped.lens_pages_reused == 0 and full.lens_pages == capped.lens_pages
    assert _data(out, run_id, IMAGES[0])["top_k"] == 1
    assert lens_file.stat().st_size < before / 2  # one rank of five, exported again
    assert _without_build_time((out / "quantitative.html").read_text(encoding="utf-8")) == quantitative

    kept = lens_file.stat()
    again = build_site(scale_db, out, lens_data="inline", lens_top_k=1)
    assert again.lens_pages_reused == again.lens_pages
    assert (lens_file.stat().st_ino, lens_file.stat().st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)

    build_site(scale_db, out, lens_data="inline")  # the cap lifted: every rank again
    assert _data(out, run_id, IMAGES[0])["top_k"] == 5
    assert np.isclose(lens_file.stat().st_size, before, rtol=0.01)


def test_cli_refuses_a_cap_below_one(scale_db: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        report, ["build", "--db", str(scale_db), "--out", str(tmp_path / "s"), "--lens-top-k", "0"]
    )
    assert result.exit_code == 2
    assert "--lens-top-k" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()
