"""How the site publishes the views (report/views.py, `report build --views`): the
database's PNG bytes as they are, or JPEG for large runs, on the lens, index, compare and
ablation/blocking image pages alike; checked against the database's own PNGs."""

from __future__ import annotations

import io
import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_report import _make_db
from test_report_experiments import make_experiment_db

from report import views
from report.build import build_site
from report.cli import report
from report.urls import run_dir_name


def _db_views(path: Path) -> dict[tuple[str, int], bytes]:
    with duckdb.connect(str(path), read_only=True) as con:
        return {
            (r, int(i)): bytes(p) for r, i, p in con.execute("SELECT run_id, image_id, png FROM image_views").fetchall()
        }


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int64)


def _assert_jpeg_of(published: bytes, png: bytes) -> None:
    with Image.open(io.BytesIO(published)) as image:
        assert image.format == "JPEG"
    got, want = _pixels(published), _pixels(png)
    assert got.shape == want.shape  # same size as the model's view
    assert np.abs(got - want).mean() < 8.0  # quality 85: close to the PNG's pixels (of 255)


@pytest.fixture
def lens_db(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "results.duckdb"
    return path, _make_db(path)


def test_small_runs_publish_the_databases_png_bytes(lens_db: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, run_ids = lens_db
    out = tmp_path / "site"
    summary = build_site(path, out)
    stored = _db_views(path)
    checked = 0
    for (run_id, image_id), png in stored.items():
        published = out / "lens" / run_dir_name(run_id) / f"{image_id}.png"
        if (out / "lens" / run_dir_name(run_id) / f"{image_id}.html").exists():
            assert published.read_bytes() == png
            checked += 1
    assert checked == 3  # the three lens pages of the two lens runs
    assert {f for (f, _) in summary.view_formats.values()} == {"png"}
    assert not list(out.glob("lens/*/*.jpg"))


def test_auto_turns_large_runs_to_jpeg_and_every_page_follows(
    lens_db: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the threshold at 1 page, the run with two lens pages goes JPEG and the run with
    one stays PNG; a rebuild into the same folder renders the pages again and leaves no
    picture of the other format behind."""
    path, run_ids = lens_db
    out = tmp_path / "site"
    build_site(path, out)  # PNG first, then the same folder again
    monkeypatch.setattr(views, "JPEG_VIEW_PAGES", 1)
    summary = build_site(path, out)
    assert summary.view_formats[run_ids["hostile"]][0] == "jpeg"
    assert summary.view_formats[run_ids["clean"]][0] == "png"
    stored = _db_views(path)
    hostile_dir = out / "lens" / run_dir_name(run_ids["hostile"])
    pictures = sorted(hostile_dir.glob("*.jpg"))
    assert pictures and not list(hostile_dir.glob("*.png"))
    for picture in pictures:
        image_id = int(picture.name.split(".")[0])
        _assert_jpeg_of(picture.read_bytes(), stored[(run_ids["hostile"], image_id)])
        page = (hostile_dir / f"{image_id}.html").read_text(encoding="utf-8")
        assert f'<img src="{image_id}.jpg"' in page and f"{image_id}.png" not in page
    clean_dir = out / "lens" / run_dir_name(run_ids["clean"])
    assert (clean_dir / "102.png").read_bytes() == stored[(run_ids["clean"], 102)]
    index = (out / "index.html").read_text(encoding="utf-8")
    thumbs = set(re.findall(r'class="thumb" src="([^"]+)"', index))
    assert thumbs and all((out / t).is_file() for t in thumbs)
    assert any(t.endswith(".jpg") for t in thumbs) and any(t.endswith(".png") for t in thumbs)
    compare = (out / "compare.html").read_text(encoding="utf-8")
    assert f"{run_dir_name(run_ids['hostile'])}/101.jpg" in compare


def test_views_option_forces_a_format(lens_db: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, run_ids = lens_db
    out = tmp_path / "site"
    result = CliRunner().invoke(report, ["build", "--db", str(path), "--out", str(out), "--views", "jpeg"])
    assert result.exit_code == 0, result.output
    assert f"Views of run {run_ids['clean']}: jpeg (--views jpeg)" in result.output
    assert not list(out.glob("lens/*/*.png")) and list(out.glob("lens/*/*.jpg"))
    bad = CliRunner().invoke(report, ["build", "--db", str(path), "--out", str(out), "--views", "gif"])
    assert bad.exit_code == 2 and "Invalid value for '--views'" in bad.output
    assert list(out.glob("lens/*/*.jpg"))  # the site already written is left as it was


def test_experiment_image_pages_follow_the_run_format(tmp_path: Path) -> None:
    path = tmp_path / "experiments.duckdb"
    run_ids = make_experiment_db(path)
    out = tmp_path / "site"
    build_site(path, out, view_format="jpeg")
    stored = _db_views(path)
    checked = 0
    for experiment in ("ablation", "blocking"):
        for run_id in run_ids.values():
            folder = out / "experiments" / f"{experiment}-{run_dir_name(run_id)}"
            for page in folder.glob("*.html"):
                image_id = int(page.stem)
                html = page.read_text(encoding="utf-8")
                if (run_id, image_id) in stored:
                    assert f'src="{image_id}.jpg"' in html
                    _assert_jpeg_of((folder / f"{image_id}.jpg").read_bytes(), stored[(run_id, image_id)])
                    checked += 1
    assert checked >= 2
    assert not list(out.glob("experiments/*/*.png"))


def test_encode_keeps_png_bytes_and_flattens_transparency() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(buffer, format="PNG")
    png = buffer.getvalue()
    assert views.encode(png, "png") is png
    assert (_pixels(views.encode(png, "jpeg")) > 250).all()  # transparent shows as white
    with pytest.raises(ValueError):
        views.encode(png, "gif")
    assert views.choose("auto", views.JPEG_VIEW_PAGES) == (
        "png",
        f"{views.JPEG_VIEW_PAGES} image pages, at most {views.JPEG_VIEW_PAGES}: the database's PNGs",
    )
    assert views.choose("auto", views.JPEG_VIEW_PAGES + 1)[0] == "jpeg"


def test_digests_of_large_views_fit_in_the_builds_memory(tmp_path: Path) -> None:
    """image_row_digests and row_digest over a BLOB column read it in rowid batches: with
    160 views of ~300 KB and a 64 MB DuckDB memory limit the one-query form runs out of memory,
    the batched one gives the same numbers as that query without the limit."""
    import os

    from db import queries
    from db.store import ResultsDB

    path = tmp_path / "views.duckdb"
    with ResultsDB(path) as db:
        db.duck.executemany(
            "INSERT INTO image_views VALUES ('run-a', ?, ?, 336, 336, 1.0, 1.0, 0.0, 0.0)",
            [(1000 + i, os.urandom(300_000)) for i in range(160)],
        )
    columns = ["run_id", "image_id", "png", "view_width"]
    hashed = 'sum(hash("run_id", "image_id", "png", "view_width")::HUGEINT)'
    with duckdb.connect(str(path), read_only=True) as con:
        expected = [
            (int(i), int(n), int(h), 0)
            for i, n, h in con.execute(
                f"SELECT image_id, count(*), {hashed} FROM image_views GROUP BY image_id ORDER BY image_id"
            ).fetchall()
        ]
    assert len({h for _, _, h, _ in expected}) == 160  # every view differs
    with ResultsDB(path, read_only=True) as db:
        db.duck.execute("SET memory_limit = '64MB'")
        with pytest.raises(duckdb.OutOfMemoryException):
            db.duck.execute(f"SELECT image_id, {hashed} FROM image_views GROUP BY image_id").fetchall()
        assert queries.image_row_digests(db, "image_views", "run-a", columns) == expected
        assert queries.row_digest(db, "image_views", columns, "run-a") == (160, sum(h for _, _, h, _ in expected))


def test_pictures_read_in_ranges_equal_the_one_image_reads(
    lens_db: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """queries.pictures (rowid ranges of PICTURE_SPAN rows) gives each run's own PNG of an
    image two runs share, the database's bytes, with spans of one row too."""
    from db import queries
    from db.store import ResultsDB

    path, run_ids = lens_db
    stored = _db_views(path)
    with ResultsDB(path, read_only=True) as db:
        for span in (1, 2, queries.PICTURE_SPAN):
            monkeypatch.setattr(queries, "PICTURE_SPAN", span)
            for run_id in run_ids.values():
                ids = sorted(i for r, i in stored if r == run_id)
                got = queries.pictures(db, "image_views", run_id, [*ids, 999])  # 999: no view
                assert got == {(i, ""): stored[(run_id, i)] for i in ids}
        assert queries.pictures(db, "extra_views", run_ids["hostile"], [101, 102]) == {}
        with pytest.raises(ValueError):
            queries.pictures(db, "logit_lens", run_ids["hostile"], [101])


def test_two_runs_of_one_image_publish_their_own_pictures(lens_db: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Image 102 is in both lens runs; with different views, each run's page shows its own
    (the build reads the pictures of a batch of pages together), in one process and in two."""
    path, run_ids = lens_db
    buffer = io.BytesIO()
    Image.new("RGB", (28, 28), (10, 200, 30)).save(buffer, format="PNG")
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE image_views SET png = ? WHERE run_id = ?", [buffer.getvalue(), run_ids["clean"]])
    stored = _db_views(path)
    assert stored[(run_ids["clean"], 102)] != stored[(run_ids["hostile"], 102)]
    for jobs in (1, 2):
        out = tmp_path / f"site-{jobs}"
        build_site(path, out, jobs=jobs)
        for key in ("hostile", "clean"):
            picture = out / "lens" / run_dir_name(run_ids[key]) / "102.png"
            assert picture.read_bytes() == stored[(run_ids[key], 102)], (key, jobs)
