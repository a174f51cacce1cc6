"""The SQL console page (sql.html, report/pages/sql.py, report/duckdb_wasm.py, templates/static/sql.js).

Without DuckDB-WASM: sql.html is still written, says how to enable the console, its links
resolve and it loads without console errors. With it (prepared by
scripts/fetch-duckdb-wasm.sh into the git-ignored .cache/duckdb-wasm; this module runs the
script when npm is available, else skips with the reason; under CI=true, where .ci/run
fetches it first, a missing one fails): the site is served by `llava-interp report serve`
on 127.0.0.1 and sql.html is driven in headless Chromium. Every page records console
errors, dialogs and requests (test_site_browser.Watched): nothing may leave the origin.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import duckdb
import pytest
from support.bench import site_scale
from support.serving import ByteCounter
from test_report import HOSTILE, _make_db
from test_site_browser import IN_CI, Watched, browser  # noqa: F401 - browser is a fixture

from db.store import ResultsDB
from report import duckdb_wasm, vendor
from report.build import build_site
from report.pages import sql as sql_page
from report.serve import serving

pytestmark = pytest.mark.browser  # Chromium / validators: not in the fast subset

REPO = Path(__file__).resolve().parents[1]
FETCH_SCRIPT = REPO / duckdb_wasm.FETCH_SCRIPT
SERVE_TIMEOUT_S = 30
READY_TIMEOUT_MS = 90_000


# --- helpers -----------------------------------------------------------------------------
class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and (name in ("href", "src") or name.startswith("data-") and "/" in value and name != "data-sql"):
                self.urls.append(value)


def _local_targets(page: Path) -> list[str]:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return [u.split("#")[0] for u in parser.urls if not re.match(r"[a-z]+:", u) and u.split("#")[0]]


def _assert_links_resolve(site: Path, page: str) -> None:
    targets = _local_targets(site / page)
    assert targets, "no links found: the link parser is not working"
    missing = [t for t in targets if not (site / page).parent.joinpath(t).is_file()]
    assert missing == [], missing


def _no_wasm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As on a machine where nobody prepared DuckDB-WASM."""
    monkeypatch.delenv(duckdb_wasm.ENV_VAR, raising=False)
    monkeypatch.setattr(vendor, "REPO", tmp_path)
    monkeypatch.chdir(tmp_path)


def _published(site: Path) -> duckdb.DuckDBPyConnection:
    """The console's catalog in native DuckDB: the views the page creates, over the site's files."""
    text = (site / "sql.html").read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="sql-views">(.*?)</script>', text, re.DOTALL)
    assert match, "sql.html carries no view definitions"
    spec = json.loads(match.group(1))
    con = duckdb.connect()
    con.execute(f"SET file_search_path = '{site}'")
    con.execute("ATTACH ':memory:' AS results")
    con.execute("USE results")
    for view in spec["views"]:
        con.execute(view["sql"])
    return con


# --- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def db_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqldb") / "results.duckdb"
    _make_db(path)
    return path


@pytest.fixture(scope="module")
def wasm_dir() -> Path:
    """A prepared DuckDB-WASM folder: found, or fetched now with npm into .cache/duckdb-wasm."""
    found = duckdb_wasm.find_duckdb_wasm()
    if found.path is not None:
        return found.path
    reason = "; ".join(found.problems) or "DuckDB-WASM is not prepared (.cache/duckdb-wasm/vendor)"
    if shutil.which("npm") is None:
        _unavailable(f"{reason}, and npm is not installed to fetch it (bash {duckdb_wasm.FETCH_SCRIPT})")
    try:
        done = subprocess.run(
            ["bash", str(FETCH_SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"{reason}; {duckdb_wasm.FETCH_SCRIPT} did not finish in 10 minutes")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        _unavailable(f"{reason}; {duckdb_wasm.FETCH_SCRIPT} failed (no npm registry?): {' | '.join(tail)}")
    found = duckdb_wasm.find_duckdb_wasm()
    if found.path is None:
        pytest.fail(f"{duckdb_wasm.FETCH_SCRIPT} ran but its output is unusable: {found.problems}")
    return found.path


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"the SQL console cannot be tested in CI: {reason} (.ci/run fetches DuckDB-WASM first)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, db_path: Path, wasm_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("sqlsite") / "site"
    previous = os.environ.get(duckdb_wasm.ENV_VAR)
    os.environ[duckdb_wasm.ENV_VAR] = str(wasm_dir)
    try:
        build_site(db_path, out)
    finally:
        if previous is None:
            os.environ.pop(duckdb_wasm.ENV_VAR, None)
        else:
            os.environ[duckdb_wasm.ENV_VAR] = previous
    return out


@pytest.fixture(scope="module")
def server(site: Path) -> Iterator[str]:
    """`llava-interp report serve --dir SITE --port 0`, the command the page recommends."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from collector.cli import main; main()",
            "report",
            "serve",
            "--dir",
            str(site),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(SERVE_TIMEOUT_S)
    match = re.search(r"http://127\.0\.0\.1:\d+/", lines[0]) if lines else None
    if match is None:
        process.kill()
        pytest.fail(f"report serve did not start: {lines}")
    try:
        yield match.group()
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def http_page(browser: Any, server: str) -> Iterator[Watched]:  # noqa: F811 - fixture from test_site_browser
    page = Watched(browser, server)
    try:
        yield page
        page.check()
    finally:
        page.context.close()


def _open_console(watched: Watched) -> Any:
    page = watched.goto("sql.html")
    page.wait_for_selector("#sql-console[data-ready]", timeout=READY_TIMEOUT_MS)
    assert page.get_attribute("#sql-console", "data-ready") == "1", page.locator("#sql-error").inner_text()
    return page


def _run(page: Any, sql: str | None = None) -> None:
    """Run the editor's query (after typing `sql`) and wait for the result or the error."""
    if sql is not None:
        page.fill("#sql-editor", sql)
    page.click("#sql-run")
    _wait(page)


def _wait(page: Any) -> None:
    """Until the query started by the last click has finished (Run is disabled meanwhile)."""
    page.wait_for_function("!document.getElementById('sql-run').disabled")


def _result(page: Any) -> tuple[list[str], list[list[str]]]:
    header = page.locator("#sql-result thead th").all_text_contents()
    rows = page.locator("#sql-result tbody tr").evaluate_all(
        "trs => trs.map(tr => Array.from(tr.cells, td => td.classList.contains('null') ? null : td.textContent))"
    )
    return header, rows


# --- without a browser ---------------------------------------------------------------------
def test_pinned_version_matches_the_fetch_script() -> None:
    text = FETCH_SCRIPT.read_text(encoding="utf-8")
    pinned = re.search(r"^DUCKDB_WASM_VERSION=(\S+)", text, re.MULTILINE)
    assert pinned and pinned.group(1) == duckdb_wasm.DUCKDB_WASM_VERSION
    assert duckdb_wasm.DUCKDB_WASM_VERSION.startswith("1.")
    assert "npm install" in text and "--no-save" in text
    assert re.search(r"^/?\.cache/?$", (REPO / ".gitignore").read_text(encoding="utf-8"), re.MULTILINE), (
        ".cache must be git-ignored"
    )


def test_without_duckdb_wasm_the_page_explains_how_to_enable_it(
    db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_wasm(monkeypatch, tmp_path)
    assert not duckdb_wasm.find_duckdb_wasm().found
    out = tmp_path / "site"
    build_site(db_path, out)
    page = (out / "sql.html").read_text(encoding="utf-8")
    assert "Not enabled in this build" in page
    assert f"bash {duckdb_wasm.FETCH_SCRIPT}" in page and duckdb_wasm.ENV_VAR in page
    assert 'data-enabled="0"' in page and "data-module" not in page
    assert not (out / "vendor").exists()
    _assert_links_resolve(out, "sql.html")
    # Every page links to it.
    assert 'href="sql.html"' in (out / "index.html").read_text(encoding="utf-8")
    # The examples are there to copy, escaped like every database string.
    assert page.count('class="sql-example"') >= 5
    assert HOSTILE not in page


def test_no_downloads_means_no_console(db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_wasm(monkeypatch, tmp_path)
    out = tmp_path / "site"
    build_site(db_path, out, downloads=False)
    page = (out / "sql.html").read_text(encoding="utf-8")
    assert "--no-downloads" in page and 'data-enabled="0"' in page
    assert not (out / "data").exists() and not (out / "vendor").exists()
    _assert_links_resolve(out, "sql.html")


def test_a_damaged_folder_is_reported_not_fatal(db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "wasm"
    folder.mkdir()
    for name in duckdb_wasm.REQUIRED_FILES:
        (folder / name).write_bytes(b"truncated")
    manifest = {
        "@duckdb/duckdb-wasm": duckdb_wasm.DUCKDB_WASM_VERSION,
        "files": {name: {"bytes": 9, "sha256": "0" * 64} for name in duckdb_wasm.REQUIRED_FILES},
    }
    (folder / duckdb_wasm.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setenv(duckdb_wasm.ENV_VAR, str(folder))
    found = duckdb_wasm.find_duckdb_wasm()
    assert not found.found and "sha256" in found.problems[0]
    out = tmp_path / "site"
    build_site(db_path, out)
    page = (out / "sql.html").read_text(encoding="utf-8")
    assert "Not enabled in this build" in page and "does not match its sha256" in page
    monkeypatch.setenv(duckdb_wasm.ENV_VAR, str(tmp_path / "nowhere"))
    assert "is not a folder" in duckdb_wasm.find_duckdb_wasm().problems[0]


def test_vendored_files_match_their_manifest(site: Path, wasm_dir: Path) -> None:
    vendor = site / duckdb_wasm.VENDOR_DIR
    manifest = json.loads((vendor / duckdb_wasm.MANIFEST).read_text(encoding="utf-8"))
    assert manifest["@duckdb/duckdb-wasm"] == duckdb_wasm.DUCKDB_WASM_VERSION
    for name in duckdb_wasm.REQUIRED_FILES:
        data = (vendor / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["files"][name]["sha256"], name
    assert any(p.name.startswith("LICENSE") for p in vendor.iterdir())
    # A bundled module: no bare import a browser could not resolve, no CDN.
    module = (vendor / duckdb_wasm.MODULE_FILE).read_text(encoding="utf-8")
    assert not re.search(r"""\bfrom\s*["'][^./"']""", module)
    page = (site / "sql.html").read_text(encoding="utf-8")
    assert 'data-enabled="1"' in page
    _assert_links_resolve(site, "sql.html")
    # Only sql.html loads DuckDB-WASM.
    for other in ("index.html", "downloads.html", "quantitative.html"):
        assert "vendor/" not in (site / other).read_text(encoding="utf-8")


def test_an_old_prepared_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder prepared for another DuckDB-WASM (1.29+ has no Parquet reader built in) is not used."""
    folder = tmp_path / "wasm"
    folder.mkdir()
    (folder / duckdb_wasm.MANIFEST).write_text(json.dumps({"@duckdb/duckdb-wasm": "1.32.0", "files": {}}))
    for name in duckdb_wasm.REQUIRED_FILES:
        (folder / name).write_bytes(b"x")
    monkeypatch.setenv(duckdb_wasm.ENV_VAR, str(folder))
    found = duckdb_wasm.find_duckdb_wasm()
    assert not found.found and "1.32.0" in found.problems[0] and duckdb_wasm.DUCKDB_WASM_VERSION in found.problems[0]


def test_every_example_runs_on_the_published_views(db_path: Path, site: Path) -> None:
    """Native DuckDB over the site's Parquet files, with the views the page creates: each
    example is valid SQL there and returns what it returns on the database itself (lens
    probabilities: within the Parquet files' rounding)."""
    page = (site / "sql.html").read_text(encoding="utf-8")
    with ResultsDB(db_path, read_only=True) as db:
        examples = sql_page.examples(db)
        expected = {e["title"]: db.duck.execute(e["sql"]).fetchall() for e in examples if e["needs"]}
    titles = [e["title"] for e in examples]
    assert any("ablation" in t.lower() for t in titles) and any("blocking" in t.lower() for t in titles)
    assert any("object hits" in t for t in titles) and any("one image" in t for t in titles)
    con = _published(site)
    for example in examples:
        got = con.execute(example["sql"]).fetchall()
        if example["title"] in expected:
            want = expected[example["title"]]
            assert len(got) == len(want), example["title"]
            for row, other in zip(got, want, strict=True):
                for a, b in zip(row, other, strict=True):
                    if isinstance(a, float) and isinstance(b, float):
                        assert a == pytest.approx(b, rel=2e-3, abs=1e-4), example["title"]
                    else:
                        assert a == b, example["title"]
    assert page.count('class="sql-example"') == len(examples)


# --- in the browser: without DuckDB-WASM ------------------------------------------------------
def test_disabled_page_loads_cleanly(
    browser: Any,
    db_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    _no_wasm(monkeypatch, tmp_path)
    out = tmp_path / "site"
    build_site(db_path, out)
    watched = Watched(browser, out.resolve().as_uri() + "/")
    try:
        page = watched.goto("sql.html")
        assert page.locator("#sql-disabled").is_visible()
        assert page.locator("#sql-file-notice").is_hidden()
        page.click("nav >> text=SQL console")
        page.wait_for_load_state()
        assert page.url.endswith("sql.html")
        watched.check()
    finally:
        watched.context.close()


# --- in the browser: with DuckDB-WASM -------------------------------------------------------
def test_console_answers_queries_like_duckdb(http_page: Watched, site: Path) -> None:
    page = _open_console(http_page)
    status = page.locator("#sql-status").inner_text()
    assert "Ready" in status and "range requests" in status
    con = _published(site)

    # An example query, one click away: the same rows as native DuckDB.
    example = page.locator(".sql-example", has_text="object hits")
    sql = example.get_attribute("data-sql")
    example.click()
    _wait(page)
    header, rows = _result(page)
    expected = con.execute(sql).fetchall()
    assert header == [d[0] for d in con.description]
    assert rows == [[str(v) for v in row] for row in expected] and rows
    assert page.input_value("#sql-editor") == sql

    # A custom query.
    _run(page, "SELECT count(*) FROM logit_lens")
    assert _result(page)[1] == [[str(con.execute("SELECT count(*) FROM logit_lens").fetchone()[0])]]

    # Row limit.
    page.fill("#sql-limit", "7")
    _run(page, "SELECT * FROM logit_lens ORDER BY ALL")
    assert len(_result(page)[1]) == 7
    assert "raise the row limit" in page.locator("#sql-summary").inner_text()
    page.fill("#sql-limit", "1000")

    # A view cannot be written to: the error is shown, the console keeps working.
    _run(page, "INSERT INTO logit_lens SELECT * FROM logit_lens LIMIT 1")
    assert page.locator("#sql-error").is_visible()
    _run(page, "SELECT 41 + 1 AS answer")
    assert page.locator("#sql-error").is_hidden()
    assert _result(page) == (["answer"], [["42"]])

    # DuckDB-WASM and the Parquet files came from this site (Watched.check: nothing else);
    # no database file is fetched.
    assert any(u.endswith(f"/{duckdb_wasm.WASM_FILE}") for u in http_page.requests)
    assert not any(u.endswith(".duckdb") for u in http_page.requests)


def test_hostile_tokens_are_text(http_page: Watched) -> None:
    page = _open_console(http_page)
    _run(page, f"SELECT DISTINCT token, length(token) AS n FROM logit_lens WHERE token = '{HOSTILE}'")
    assert _result(page) == (["token", "n"], [[HOSTILE, str(len(HOSTILE))]])
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"], [onerror]').length") == 0
    # Http_page.check(): no dialog opened, no console error.


def test_csv_download_is_the_result(http_page: Watched, site: Path) -> None:
    page = _open_console(http_page)
    sql = "SELECT token, count(*) AS n, NULL AS nothing FROM logit_lens GROUP BY token ORDER BY token"
    _run(page, sql)
    with page.expect_download() as info:
        page.click("#sql-csv")
    download = info.value
    assert download.suggested_filename == "query.csv"
    text = Path(download.path()).read_text(encoding="utf-8")
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    expected = _published(site).execute(sql).fetchall()
    assert parsed[0] == ["token", "n", "nothing"]
    assert parsed[1:] == [[token, str(n), ""] for token, n, _ in expected]
    assert any(HOSTILE == row[0] for row in parsed) and any("\n" in row[0] for row in parsed)


def test_query_in_the_url_runs_on_open(http_page: Watched) -> None:
    page = http_page.goto("sql.html#q=" + "SELECT%20'%3Cb%3Ex%3C%2Fb%3E'%20AS%20html")
    page.wait_for_selector("#sql-console[data-ready='1']", timeout=READY_TIMEOUT_MS)
    page.wait_for_selector("#sql-result tbody tr")
    assert _result(page) == (["html"], [["<b>x</b>"]])
    assert page.locator("#sql-result b").count() == 0


def test_only_sql_html_loads_duckdb_wasm(http_page: Watched) -> None:
    page = http_page.goto("index.html")
    page.click("nav >> text=Quantitative lens")
    page.wait_for_load_state()
    assert http_page.requests and not [u for u in http_page.requests if "/vendor/" in u or u.endswith("results.duckdb")]
    page.click("nav >> text=SQL console")
    page.wait_for_selector("#sql-console[data-ready='1']", timeout=READY_TIMEOUT_MS)
    assert [u for u in http_page.requests if "/vendor/" in u]


def test_file_url_shows_the_http_notice(browser: Any, site: Path) -> None:  # noqa: F811
    watched = Watched(browser, site.resolve().as_uri() + "/")
    try:
        page = watched.goto("sql.html")
        notice = page.locator("#sql-file-notice")
        assert notice.is_visible()
        assert sql_page.SERVE_COMMAND in notice.inner_text()
        assert page.locator("#sql-console").is_hidden()
        assert not [u for u in watched.requests if "/vendor/" in u or u.endswith("results.duckdb")]
        watched.check()
    finally:
        watched.context.close()


# --- in the browser: range requests at LLaVA-1.5 scale ------------------------------------------
@pytest.fixture(scope="module")
def scale_site(tmp_path_factory: pytest.TempPathFactory, wasm_dir: Path) -> tuple[Path, Path]:
    """Six LLaVA-1.5-shaped images (bench/site_scale.py's synthetic database: 97,845 lens
    rows each, about 15 row groups in one lens Parquet file), built with DuckDB-WASM."""
    bench = site_scale()
    root = tmp_path_factory.mktemp("scale")
    db = root / "lens.duckdb"
    bench.make_database(db, 6)
    out = root / "site"
    previous = os.environ.get(duckdb_wasm.ENV_VAR)
    os.environ[duckdb_wasm.ENV_VAR] = str(wasm_dir)
    try:
        build_site(db, out)
    finally:
        if previous is None:
            os.environ.pop(duckdb_wasm.ENV_VAR, None)
        else:
            os.environ[duckdb_wasm.ENV_VAR] = previous
    return db, out


def test_one_image_query_reads_a_small_part_over_range_requests(
    browser: Any,  # noqa: F811
    scale_site: tuple[Path, Path],
) -> None:
    db, out = scale_site
    lens_files = sorted(out.glob("downloads/*/logit_lens-*.parquet"))
    lens_total = sum(f.stat().st_size for f in lens_files)
    assert len(lens_files) == 1 and lens_total > 1_000_000
    on_bytes = ByteCounter()
    moved, responses, lock = on_bytes.moved, on_bytes.responses, on_bytes.lock

    with serving(out, on_bytes=on_bytes) as base:
        watched = Watched(browser, base)
        try:
            page = _open_console(watched)
            with lock:
                moved.clear()
                responses.clear()
            example = page.locator(".sql-example", has_text="one image")
            sql = example.get_attribute("data-sql")
            example.click()
            _wait(page)
            header, rows = _result(page)
            watched.check()
        finally:
            watched.context.close()
    lens_moved = sum(n for path, n in moved.items() if "/logit_lens-" in path)
    lens_responses = sum(n for path, n in responses.items() if "/logit_lens-" in path)
    # Range requests: the footer and one image's row groups, not the file. DuckDB-WASM reads
    # ahead in requests that grow fourfold (16 KB, 64 KB, 256 KB, 1 MB, seen here), so what
    # moves is up to about four times what the query needs.
    image_id = int(re.search(r"image_id = (\d+)", sql or "").group(1))  # type: ignore[union-attr]
    relative = [str(f.relative_to(out)) for f in lens_files]
    needed, _ = sql_page.one_image_bytes(out, relative, image_id)
    assert needed < lens_total / 2, (needed, lens_total)  # the image's row groups, not the file
    assert 0 < lens_moved <= 4 * needed + 65_536 and lens_moved < lens_total, (lens_moved, needed, lens_total)
    assert lens_responses >= 2
    # The rows are the database's: token ids and text exact, probabilities within the rounding.
    con = duckdb.connect(str(db), read_only=True)
    expected = con.execute(sql.replace("round(prob, 4)", "prob")).fetchall()
    con.close()
    assert header[-1] == "prob" and len(rows) == len(expected) == 5
    for got, want in zip(rows, expected, strict=True):
        assert got[:-1] == [str(v) for v in want[:-1]]
        assert float(got[-1]) == pytest.approx(want[-1], abs=1e-4 + want[-1] * 2.0**-11)
