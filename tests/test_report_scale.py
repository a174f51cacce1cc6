"""Publishing at scale: Parquet downloads (faithful, sorted, split), the size limits of
`report build`, no dead link with --no-downloads, range requests of report/serve.py, and a
report that installs and builds without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_report import HOSTILE, _make_db

from report import downloads as downloads_module
from report.build import ReportError, build_site, run_dir_name
from report.cli import report
from report.serve import serving

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def db_path(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("scale") / "results.duckdb"
    return path, _make_db(path)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("href", "src") and v]


def _dead_links(out: Path) -> list[tuple[str, str]]:
    dead = []
    for page in out.rglob("*.html"):
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        for url in parser.urls:
            path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
            if path and not (page.parent / path).exists():
                dead.append((str(page.relative_to(out)), url))
    return dead


def test_parquet_downloads_hold_every_row_sorted(
    db_path: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, run_ids = db_path
    # Small files, so the split at image boundaries is exercised on a tiny database.
    monkeypatch.setattr(downloads_module, "FIRST_FILE_ROWS", 150)
    monkeypatch.setattr(downloads_module, "TARGET_FILE_BYTES", 1)
    # Bands of 2 layers, so the tiny model's 3 hidden states make two bands.
    monkeypatch.setattr(downloads_module, "LENS_LAYER_BAND", 2)
    out = tmp_path / "site"
    build_site(path, out)
    hostile = run_dir_name(run_ids["hostile"])
    files = sorted((out / "downloads" / hostile).glob("logit_lens-*.parquet"))
    native = duckdb.connect(str(path), read_only=True)
    lens_images = native.execute(
        "SELECT DISTINCT image_id FROM logit_lens WHERE run_id = ? ORDER BY 1", [run_ids["hostile"]]
    ).fetchall()
    assert len(files) == len(lens_images) > 1  # one image per file here, never split
    published = duckdb.connect()
    run_dir = out / "downloads" / hostile
    listed = ", ".join(f"'{f}'" for f in sorted(run_dir.glob("positions-*.parquet")))
    got = published.execute(f"SELECT * FROM read_parquet([{listed}])").fetchall()
    expected = native.execute(
        "SELECT * FROM positions WHERE run_id = ? ORDER BY image_id, position", [run_ids["hostile"]]
    ).fetchall()
    assert got == expected  # every row, every value, already in sort order
    # Lens rows: token ids without text (the run's lens_tokens file maps them back), prob
    # rounded to PROB_SIGNIFICANT_BITS significant bits; every row, in sort order.
    listed = ", ".join(f"'{f}'" for f in files)
    assert "token" not in [
        c[0] for c in published.execute(f"DESCRIBE SELECT * FROM read_parquet([{listed}])").fetchall()
    ]
    got = published.execute(
        f"SELECT l.run_id, l.image_id, l.layer, l.position, l.rank, l.token_id, t.token, l.prob "
        f"FROM read_parquet([{listed}]) l JOIN '{run_dir / 'lens_tokens-0000.parquet'}' t USING (run_id, token_id) "
        "ORDER BY l.image_id, l.layer, l.position, l.rank"
    ).fetchall()
    expected = native.execute(
        "SELECT run_id, image_id, layer, position, rank, token_id, token, prob FROM logit_lens WHERE run_id = ? "
        "ORDER BY image_id, layer, position, rank",
        [run_ids["hostile"]],
    ).fetchall()
    assert [row[:-1] for row in got] == [row[:-1] for row in expected] and got
    bound = downloads_module.PROB_RELATIVE_ERROR
    assert all(abs(g[-1] - e[-1]) <= bound * e[-1] for g, e in zip(got, expected, strict=True))
    assert any(g[-1] != e[-1] for g, e in zip(got, expected, strict=True))  # it is rounded
    unrounded = published.execute(
        f"SELECT count(*) FROM read_parquet([{listed}]) WHERE prob * 2048 % 1 != 0 AND prob > 0.5"
    ).fetchone()
    assert unrounded == (0,)  # at most 11 significant bits: p in [0.5, 1) is a multiple of 2^-11
    # Unordered rows read in order: the files are sorted (image, band of layers, rank, position, layer).
    band = downloads_module.LENS_LAYER_BAND
    order = published.execute(f"SELECT image_id, layer, position, rank FROM read_parquet([{listed}])").fetchall()
    assert order == sorted(order, key=lambda r: (r[0], r[1] // band, r[3], r[2], r[1]))
    assert max(layer for _, layer, _, _ in order) >= band  # more than one band: the order is tested
    # Token ids without a dictionary (delta-encoded), text with one.
    lens_meta = pq.ParquetFile(files[0]).metadata
    token_column = next(i for i in range(lens_meta.num_columns) if lens_meta.schema.column(i).name == "token_id")
    assert not any("DICTIONARY" in e for e in lens_meta.row_group(0).column(token_column).encodings)
    # Each file holds whole images, in order; text is dictionary-encoded, zstd-compressed.
    images = [published.execute(f"SELECT DISTINCT image_id FROM '{f}'").fetchall() for f in files]
    assert images == [[image] for image in lens_images]
    meta = pq.ParquetFile(files[0]).metadata
    run_column = next(i for i in range(meta.num_columns) if meta.schema.column(i).name == "run_id")
    column = meta.row_group(0).column(run_column)
    assert column.compression == "ZSTD" and any("DICTIONARY" in e for e in column.encodings)
    tokens = run_dir / "lens_tokens-0000.parquet"
    assert HOSTILE in {t for (t,) in published.execute(f"SELECT token FROM '{tokens}'").fetchall()}
    pairs = published.execute(f"SELECT token_id, token FROM '{tokens}' ORDER BY ALL").fetchall()
    assert (
        pairs
        == native.execute(
            "SELECT DISTINCT token_id, token FROM logit_lens WHERE run_id = ? ORDER BY ALL", [run_ids["hostile"]]
        ).fetchall()
    )
    # The downloads page lists every file with its size.
    page = (out / "downloads.html").read_text(encoding="utf-8")
    for f in files:
        assert f.relative_to(out).as_posix() in page
    assert "read_parquet" in page and "pd.read_parquet" in page and "pl.read_parquet" in page
    native.close()


def test_lens_rows_keep_their_text_when_ids_are_ambiguous(tmp_path: Path) -> None:
    """A run where one token id has two texts: no lens_tokens file, the rows keep `token`."""
    path = tmp_path / "results.duckdb"
    run_ids = _make_db(path)
    con = duckdb.connect(str(path))
    con.execute(
        "UPDATE logit_lens SET token = token || '~' WHERE run_id = ? AND layer = 0 AND rank = 1", [run_ids["hostile"]]
    )
    con.close()
    out = tmp_path / "site"
    build_site(path, out)
    run_dir = out / "downloads" / run_dir_name(run_ids["hostile"])
    assert not (run_dir / "lens_tokens-0000.parquet").exists()
    listed = ", ".join(f"'{f}'" for f in sorted(run_dir.glob("logit_lens-*.parquet")))
    published = duckdb.connect()
    got = published.execute(f"SELECT token FROM read_parquet([{listed}]) ORDER BY image_id, layer, position, rank")
    native = duckdb.connect(str(path), read_only=True)
    assert (
        got.fetchall()
        == native.execute(
            "SELECT token FROM logit_lens WHERE run_id = ? ORDER BY image_id, layer, position, rank",
            [run_ids["hostile"]],
        ).fetchall()
    )


def test_small_tables_keep_csv_large_ones_are_parquet_only(
    db_path: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, run_ids = db_path
    monkeypatch.setattr(downloads_module, "CSV_MAX_ROWS", 100)
    out = tmp_path / "site"
    build_site(path, out, database_copy="never")
    run_dir = out / "downloads" / run_dir_name(run_ids["hostile"])
    assert not (run_dir / "logit_lens.csv.gz").exists() and list(run_dir.glob("logit_lens-*.parquet"))
    assert (run_dir / "runs.csv.gz").exists() and (run_dir / "positions.csv.gz").exists()
    assert not (out / "data" / "results.duckdb").exists()
    assert "Parquet only" in (out / "downloads.html").read_text(encoding="utf-8")
    assert not _dead_links(out)


def test_no_downloads_leaves_no_dead_link(db_path: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    out = tmp_path / "site"
    build_site(db_path[0], out, downloads=False)
    assert not (out / "downloads").exists() and not (out / "downloads.html").exists()
    assert _dead_links(out) == []
    for page in out.rglob("*.html"):
        assert "downloads.html" not in page.read_text(encoding="utf-8"), page


def test_with_downloads_every_link_resolves(db_path: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    out = tmp_path / "site"
    build_site(db_path[0], out)
    assert _dead_links(out) == []


@pytest.mark.parametrize(
    "option, limit, what",
    [("--max-file-mb", "0.001", "limit per file"), ("--max-site-mb", "0.05", "GitHub Pages' limit is 1 GB")],
)
def test_limits_refuse_with_one_line(
    db_path: tuple[Path, dict[str, str]], tmp_path: Path, option: str, limit: str, what: str
) -> None:
    out = tmp_path / "site"
    (out / "index.html").parent.mkdir()
    (out / "index.html").write_text("previous site")
    result = CliRunner().invoke(report, ["build", "--db", str(db_path[0]), "--out", str(out), option, limit])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and what in lines[0], result.output
    assert option in lines[0] and "--no-downloads" in lines[0]
    if option == "--max-site-mb":  # every way to publish less is named
        assert all(fix in lines[0] for fix in ("--lens-top-k N", "--lens-pages N", "--views jpeg"))
    assert (out / "index.html").read_text() == "previous site"  # nothing replaced
    assert not any(p.name.startswith(".report-build-") for p in out.iterdir())


def test_build_prints_size_and_largest_file(db_path: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    out = tmp_path / "site"
    result = CliRunner().invoke(report, ["build", "--db", str(db_path[0]), "--out", str(out), "--lens-pages", "1"])
    assert result.exit_code == 0, result.output
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    largest = max(sizes, key=sizes.__getitem__)
    assert f"Site size {sum(sizes.values()) / 1e6:.1f} MB" in result.output
    assert f"largest file {largest} ({sizes[largest] / 1e6:.1f} MB" in result.output
    # --lens-pages 1: one page per lens run, and nothing links to a page that was not written.
    assert len(list((out / "lens").rglob("*.html"))) == 2
    assert "Lens pages for 2 of 3 images" in result.output
    assert _dead_links(out) == []


def test_parallel_build_writes_the_same_pages(db_path: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    build_site(db_path[0], one, downloads=False)
    build_site(db_path[0], two, downloads=False, jobs=2)
    for page in (one / "lens").rglob("*"):
        if page.is_file():
            assert (two / page.relative_to(one)).read_bytes() == page.read_bytes(), page


def test_serve_answers_range_requests(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    (tmp_path / "f.parquet").write_bytes(data)
    sent: list[int] = []
    with serving(tmp_path, on_bytes=lambda path, n: sent.append(n)) as base:

        def get(headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
            try:
                with urllib.request.urlopen(urllib.request.Request(base + "f.parquet", headers=headers)) as r:
                    return r.status, dict(r.headers), r.read()
            except urllib.error.HTTPError as error:
                return error.code, dict(error.headers), b""

        status, headers, body = get({"Range": "bytes=100-199"})
        assert status == 206 and body == data[100:200] and headers["Content-Range"] == f"bytes 100-199/{len(data)}"
        status, headers, body = get({"Range": "bytes=-8"})
        assert status == 206 and body == data[-8:]
        status, headers, body = get({"Range": "bytes=10000-"})
        assert status == 206 and body == data[10000:]
        status, headers, body = get({})
        assert status == 200 and body == data and headers["Accept-Ranges"] == "bytes"
        assert get({"Range": f"bytes={len(data)}-"})[0] == 416
    assert sent[:4] == [100, 8, len(data) - 10000, len(data)]


def test_report_builds_with_torch_and_transformers_blocked(
    db_path: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """What the Pages workflow does: the report's own dependencies only (no torch)."""
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "accelerate", "collector"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import runpy
        sys.argv = ["report", "build", "--db", {str(db_path[0])!r}, "--out", {str(tmp_path / "site")!r}]
        runpy.run_module("report.cli", run_name="__main__")  # the workflow's `python -m report.cli build`
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "downloads.html").is_file()


def test_report_error_is_raised_before_replacing(db_path: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="limit per file"):
        build_site(db_path[0], tmp_path / "site", max_file_bytes=10)


def test_pages_workflow_installs_what_the_test_above_runs() -> None:
    import tomllib

    workflow = (REPO / "docs" / "github-pages-workflow.yml").read_text(encoding="utf-8")
    assert "pip install -r docs/requirements-report.txt" in workflow and "--no-deps -e ." in workflow
    assert "python -m report.cli build" in workflow and "install.sh" not in workflow
    listed = [
        line.strip()
        for line in (REPO / "docs" / "requirements-report.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["report"]
    assert sorted(listed) == sorted(extra)
    assert not [name for name in listed if name.split(">")[0] in ("torch", "transformers", "accelerate")]
