"""The built site in a real browser (headless Chromium through Playwright).

The site is built from the hostile test database of test_report.py and opened both over
http (a threaded http.server on 127.0.0.1) and from file://. Every page load records
console errors, uncaught exceptions, dialogs and every request; the fixture fails the
test if any fired or if a request left the page's origin (the site folder on file://).

Skips with the reason when Playwright or a Chromium binary is missing; under CI
(CI=true) those are failures instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report import GRID, HOSTILE, N_LAYERS, QUOTES, TOP_K, _make_db

from db.store import ResultsDB
from report.build import build_site, run_dir_name
from report.serve import serving

pytestmark = pytest.mark.browser  # Chromium / validators: not in the fast subset

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IN_CI = os.environ.get("CI", "").lower() == "true"


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    return None


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"browser tests cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    executable = _chromium()
    if executable is None:
        _unavailable("no Chromium binary found (apt-get install chromium, or set CHROMIUM=/path)")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("browser")
    db_path = root / "results.duckdb"
    run_ids = _make_db(db_path)
    out = root / "site"
    build_site(db_path, out)
    return db_path, out, run_ids


@pytest.fixture(scope="module")
def server(site: tuple[Path, Path, dict[str, str]]) -> Iterator[str]:
    _, out, _ = site
    with serving(out) as url:
        yield url


class Watched:
    """A page whose console errors, exceptions, dialogs and requests are recorded."""

    def __init__(self, browser: Any, origin: str) -> None:
        self.origin = origin
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.foreign: list[str] = []
        self.requests: list[str] = []
        self.page.on(
            "console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None
        )
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

        def on_dialog(dialog: Any) -> None:
            self.dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

        self.page.on("dialog", on_dialog)

        def route(route: Any) -> None:
            url = route.request.url
            self.requests.append(url)
            if url.startswith(self.origin):
                route.continue_()
            else:
                self.foreign.append(url)
                route.abort()

        self.context.route("**/*", route)

    def goto(self, relative: str) -> Any:
        self.page.goto(self.origin + relative)
        return self.page

    def check(self) -> None:
        assert self.errors == [], self.errors
        assert self.dialogs == [], self.dialogs
        assert self.foreign == [], self.foreign
        assert self.requests, "no request was seen: the request listener is not working"


@pytest.fixture(params=["http", "file"])
def watched(request: pytest.FixtureRequest, browser: Any, site: tuple[Path, Path, dict[str, str]]) -> Iterator[Watched]:
    _, out, _ = site
    origin = request.getfixturevalue("server") if request.param == "http" else out.resolve().as_uri() + "/"
    page = Watched(browser, origin)
    try:
        yield page
        page.check()
    finally:
        page.context.close()


def _lens_url(run_id: str, image_id: int, fragment: str = "") -> str:
    return f"lens/{run_dir_name(run_id)}/{image_id}.html" + (f"#{fragment}" if fragment else "")


def _open_lens(watched: Watched, run_id: str, image_id: int, fragment: str = "") -> Any:
    page = watched.goto(_lens_url(run_id, image_id, fragment))
    page.wait_for_selector("body[data-lens-ready]", timeout=10_000)
    return page


def _patch_positions(db_path: Path, run_id: str, image_id: int) -> dict[tuple[int, int], int]:
    with ResultsDB(db_path, read_only=True) as db:
        rows = db.sql(
            "SELECT patch_row, patch_col, position FROM positions WHERE run_id = ? AND image_id = ? AND kind = 'image'",
            (run_id, image_id),
        )
    return {(r, c): p for r, c, p in rows}


def _shown(token: str) -> str:
    """What the page shows for a token (lens.js showToken)."""
    if token == "":
        return "\u2205"
    out = token.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")
    return "".join(
        f"\u27e8U+{ord(ch):04X}\u27e9"
        if ord(ch) < 0x20 or ch in "\x7f\u200b\u200c\u200d\u200e\u200f\u2028\u2029\ufeff"
        else ch
        for ch in out
    )


def _active_position(page: Any) -> int:
    return int(page.locator("#lens-table tbody tr.row-active th.pos").inner_text())


def test_hovering_a_patch_highlights_its_row(watched: Watched, site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, _, run_ids = site
    run_id = run_ids["hostile"]
    mapping = _patch_positions(db_path, run_id, 102)  # the column-major image
    page = _open_lens(watched, run_id, 102)
    with ResultsDB(db_path, read_only=True) as db:
        top = db.sql(
            "SELECT position, rank, token FROM logit_lens WHERE run_id = ? AND image_id = 102 AND layer = ? ORDER BY rank",
            (run_id, N_LAYERS - 1),
        )
    for (r, c), position in sorted(mapping.items()):
        page.hover(f'#patch-grid [data-patch="{r * GRID + c}"]')
        assert _active_position(page) == position, (r, c)
        assert page.locator(f'#patch-grid .patch-active[data-patch="{r * GRID + c}"]').count() == 1
        panel = page.locator("#panel-rows td.token").all_inner_texts()
        assert panel == [_shown(token) for p, _, token in top if p == position]
    assert page.locator("#patch-grid .patch-active").count() == 1


def test_keyboard_moves_across_patches_and_layers(watched: Watched, site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, _, run_ids = site
    run_id = run_ids["hostile"]
    mapping = _patch_positions(db_path, run_id, 102)
    page = _open_lens(watched, run_id, 102)
    page.focus("#patch-grid")
    page.keyboard.press("ArrowRight")  # nothing selected yet: starts at the top-left patch
    assert _active_position(page) == mapping[(0, 0)]
    page.keyboard.press("ArrowRight")
    assert _active_position(page) == mapping[(0, 1)]
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    assert _active_position(page) == mapping[(2, 1)]
    page.keyboard.press("ArrowLeft")
    assert _active_position(page) == mapping[(2, 0)]
    page.keyboard.press("ArrowLeft")  # clamped at the edge
    assert _active_position(page) == mapping[(2, 0)]
    assert "patch=2%2C0" in page.evaluate("location.hash") or "patch=2,0" in page.evaluate("location.hash")

    assert page.locator("#layer-value").inner_text() == str(N_LAYERS - 1)
    page.keyboard.press("[")
    assert page.locator("#layer-value").inner_text() == str(N_LAYERS - 2)
    assert page.locator("#lens-table thead th.layer-current").inner_text() == f"L{N_LAYERS - 2}"
    # The locked cell follows the layer.
    locked = page.locator("#lens-table tbody td.cell-locked")
    assert locked.count() == 1
    assert locked.evaluate("td => td.cellIndex") == 3 + N_LAYERS - 2

    page.focus("#lens-table-wrap")
    page.keyboard.press("ArrowLeft")
    assert page.locator("#layer-value").inner_text() == str(N_LAYERS - 3)
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")  # clamped at the last layer
    assert page.locator("#layer-value").inner_text() == str(N_LAYERS - 1)
    before = _active_position(page)
    page.keyboard.press("ArrowDown")
    assert _active_position(page) == before + 1


def test_tokens_are_shown_literally_and_nothing_executes(
    watched: Watched, site: tuple[Path, Path, dict[str, str]]
) -> None:
    db_path, _, run_ids = site
    run_id = run_ids["hostile"]
    with ResultsDB(db_path, read_only=True) as db:
        layer, position = db.sql(
            "SELECT layer, position FROM logit_lens WHERE run_id = ? AND image_id = 101 AND token = ? "
            "ORDER BY layer, position LIMIT 1",
            (run_id, HOSTILE),
        )[0]
    page = _open_lens(watched, run_id, 101, f"layer={layer}&pos={position}")
    assert _active_position(page) == position
    assert page.locator("#layer-value").inner_text() == str(layer)
    assert _shown(HOSTILE) in page.locator("#panel-rows td.token").all_inner_texts()
    # The hostile label (position 1) and file name reach the page as text.
    assert page.locator("#lens-table tbody tr:not(.spacer)").nth(1).locator("th.label").inner_text() == _shown(HOSTILE)
    assert HOSTILE in page.locator("h1 + p").inner_text()
    page.hover("#patch-grid .patch >> nth=0")
    page.fill("#token-search", "onerror")
    assert page.locator("#lens-table td.match").count() > 0
    # No element was created from token text and nothing ran.
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"], [onerror]').length") == 0
    assert page.evaluate("typeof window.alert") == "function"
    # Category names in the SVG outlines are text too.
    titles = page.locator("#outlines title").all_text_contents()
    assert sorted(titles) == sorted(["cat", QUOTES])


def test_url_restores_the_view_and_token_map(watched: Watched, site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, _, run_ids = site
    run_id = run_ids["clean"]
    mapping = _patch_positions(db_path, run_id, 102)
    page = _open_lens(watched, run_id, 102, "layer=1&patch=2,3&q=cat&exact=1&map=1")
    assert page.locator("#layer-value").inner_text() == "1"
    assert _active_position(page) == mapping[(2, 3)]
    assert page.input_value("#token-search") == "cat"
    with ResultsDB(db_path, read_only=True) as db:
        top1 = db.sql(
            "SELECT patch_row, patch_col, token FROM lens_top1 WHERE run_id = ? AND image_id = 102 "
            "AND layer = 1 AND kind = 'image'",
            (run_id,),
        )
    cat_patches = {r * GRID + c for r, c, token in top1 if token == "cat"}
    matched = {
        int(v) for v in page.locator("#patch-grid .patch.match").evaluate_all("els => els.map(e => e.dataset.patch)")
    }
    assert matched == cat_patches
    # Token map: one colour per token, the legend counts the most frequent top-1 token.
    colours = page.locator("#patch-grid .patch").evaluate_all("els => els.map(e => e.style.backgroundColor)")
    by_token: dict[str, set[str]] = {}
    for r, c, token in top1:
        by_token.setdefault(token, set()).add(colours[r * GRID + c])
    assert all(len(v) == 1 and "" not in v for v in by_token.values())
    assert page.locator("#legend").is_visible()
    counts = sorted((sum(1 for *_, t in top1 if t == token) for token in by_token), reverse=True)
    assert int(page.locator("#legend-items .legend-count").first.inner_text()) == counts[0]
    # Moving the layer rewrites the URL; reloading it gives the same view.
    page.keyboard.press("]")
    assert "layer=2" in page.evaluate("location.hash")
    page.reload()
    page.wait_for_selector("body[data-lens-ready]")
    assert page.locator("#layer-value").inner_text() == "2"
    assert _active_position(page) == mapping[(2, 3)]


def test_overview_pages_load_cleanly(watched: Watched, site: tuple[Path, Path, dict[str, str]]) -> None:
    page = watched.goto("index.html")
    assert page.locator("#filter-bar").is_visible()
    page.fill("#search", "000000000102")
    assert page.locator("#match-count").inner_text().startswith("2 of 3")
    page.click("text=Quantitative logit lens >> nth=0")
    page.wait_for_load_state()
    assert page.url.endswith("quantitative.html")
    page.click("nav >> text=Downloads")
    page.wait_for_load_state()
    assert page.locator("a[href='data/results.duckdb']").count() == 1
    # Theme toggle: auto -> light -> dark, kept across pages.
    page.click("#theme-toggle")
    page.click("#theme-toggle")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    page.click("nav >> text=Index")
    page.wait_for_load_state()
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(17, 20, 24)"


def test_lens_page_fits_top_k(site: tuple[Path, Path, dict[str, str]]) -> None:
    """Sanity check of the fixture the browser tests rely on (runs without a browser)."""
    _, out, run_ids = site
    assert (out / _lens_url(run_ids["hostile"], 102)).is_file()
    assert TOP_K >= 2


# -- ablation and blocking pages (site built from tests/test_report_experiments.py's database) --

from test_report_experiments import (
    ABLATION_IMAGES,
    COLUMN_MAJOR_IMAGE,
    SOURCES,
    TARGETS,
    image_page,
    make_experiment_db,
    run_page,
)


@pytest.fixture(scope="module")
def experiment_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("browser-experiments")
    db_path = root / "results.duckdb"
    run_ids = make_experiment_db(db_path)
    out = root / "site"
    build_site(db_path, out)
    return db_path, out, run_ids


@pytest.fixture(scope="module")
def experiment_server(experiment_site: tuple[Path, Path, dict[str, str]]) -> Iterator[str]:
    _, out, _ = experiment_site
    with serving(out) as url:
        yield url


@pytest.fixture(params=["http", "file"])
def exp_watched(
    request: pytest.FixtureRequest, browser: Any, experiment_site: tuple[Path, Path, dict[str, str]]
) -> Iterator[Watched]:
    _, out, _ = experiment_site
    origin = request.getfixturevalue("experiment_server") if request.param == "http" else out.resolve().as_uri() + "/"
    page = Watched(browser, origin)
    try:
        yield page
        page.check()
    finally:
        page.context.close()


def _relative(out: Path, path: Path) -> str:
    return path.relative_to(out).as_posix()


def _db_cells(db_path: Path, run_id: str, image_id: int, positions: list[int]) -> set[str]:
    with ResultsDB(db_path, read_only=True) as db:
        rows = db.sql(
            "SELECT patch_row, patch_col FROM positions WHERE run_id = ? AND image_id = ? AND kind = 'image' "
            "AND list_contains(?, position)",
            [run_id, image_id, positions],
        )
    return {f"{r},{c}" for r, c in rows}


def _shown_cells(page: Any, cls: str) -> set[str]:
    return set(page.locator(f"#overlay rect.{cls}").evaluate_all("els => els.map(e => e.dataset.cell)"))


def test_selecting_an_ablation_condition_highlights_its_patches(
    exp_watched: Watched, experiment_site: tuple[Path, Path, dict[str, str]]
) -> None:
    db_path, out, run_ids = experiment_site
    run_id = run_ids["ablation"]
    image_id = COLUMN_MAJOR_IMAGE  # positions are column-major: only the positions table maps them right
    with ResultsDB(db_path, read_only=True) as db:
        rows = db.sql(
            "SELECT setting, condition, positions FROM ablations WHERE run_id = ? AND image_id = ?", [run_id, image_id]
        )
    page = exp_watched.goto(_relative(out, image_page(out, "ablation", run_id, image_id)))
    page.wait_for_selector("body[data-overlay-ready]", timeout=10_000)
    for setting, condition, positions in rows:
        page.select_option("#setting-select", setting)
        page.select_option("#condition-select", condition)
        assert _shown_cells(page, "cell-fill") == _db_cells(db_path, run_id, image_id, positions), (setting, condition)
        assert page.locator("#answers td.selected").count() == 1
        assert f"{setting} / {condition}:" in page.locator("#overlay-caption").inner_text()
    # The overlay lies on the image: cell (r, c) covers the image's (r, c) grid cell.
    page.select_option("#setting-select", "vqa")
    page.select_option("#condition-select", "object_0")
    img = page.locator(".exp-view img").bounding_box()
    rect = page.locator("#overlay rect.cell-fill").first
    r, c = (int(v) for v in rect.get_attribute("data-cell").split(","))
    box = rect.bounding_box()
    cell_w, cell_h = img["width"] / 6, img["height"] / 6  # the box includes the stroke: compare centres
    assert abs(box["x"] + box["width"] / 2 - (img["x"] + (c + 0.5) * cell_w)) < 1.5
    assert abs(box["y"] + box["height"] / 2 - (img["y"] + (r + 0.5) * cell_h)) < 1.5
    assert abs(box["width"] - cell_w) < 6
    # Clicking an answer cell selects its setting and condition, and the URL keeps it.
    page.click('#answers td[data-select=\'["polling", "object_2"]\']')
    assert page.input_value("#setting-select") == "polling" and page.input_value("#condition-select") == "object_2"
    expected = next(p for s, c, p in rows if (s, c) == ("polling", "object_2"))
    assert _shown_cells(page, "cell-fill") == _db_cells(db_path, run_id, image_id, expected)
    page.reload()
    page.wait_for_selector("body[data-overlay-ready]")
    assert page.input_value("#condition-select") == "object_2"
    assert _shown_cells(page, "cell-fill") == _db_cells(db_path, run_id, image_id, expected)
    # Hostile answers were shown as text; nothing was created from them.
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"], [onerror]').length") == 0


def test_blocking_image_overlay_and_window_table(
    exp_watched: Watched, experiment_site: tuple[Path, Path, dict[str, str]]
) -> None:
    db_path, out, run_ids = experiment_site
    run_id = run_ids["blocking"]
    image_id = 303  # column-major positions
    with ResultsDB(db_path, read_only=True) as db:
        pairs = db.sql(
            "SELECT DISTINCT target, source, source_positions, target_positions FROM blocking "
            "WHERE run_id = ? AND image_id = ? AND window_kind <> 'baseline'",
            [run_id, image_id],
        )
    page = exp_watched.goto(_relative(out, image_page(out, "blocking", run_id, image_id)))
    page.wait_for_selector("body[data-overlay-ready]", timeout=10_000)
    for target, source, source_positions, target_positions in pairs:
        page.select_option("#target-select", target)
        page.select_option("#source-select", source)
        assert _shown_cells(page, "cell-fill") == _db_cells(db_path, run_id, image_id, source_positions)
        assert _shown_cells(page, "cell-outline") == _db_cells(db_path, run_id, image_id, target_positions)
        visible = page.locator("#windows tbody:visible")
        assert visible.count() == 1
        assert visible.first.locator("tr").count() == 14  # 6 presets + 8 sliding windows
        assert set(visible.first.locator("td:nth-child(2)").all_inner_texts()) == {source}


def test_experiment_charts_render(exp_watched: Watched, experiment_site: tuple[Path, Path, dict[str, str]]) -> None:
    _, out, run_ids = experiment_site
    page = exp_watched.goto(_relative(out, run_page(out, "ablation", run_ids["ablation"])))
    charts = page.locator("svg.bar-chart")
    assert charts.count() == 3
    for i in range(3):
        assert charts.nth(i).locator("g.bar").count() == 7
        assert charts.nth(i).bounding_box()["width"] > 300
    assert page.locator("figure .svg-save").count() == 3

    page = exp_watched.goto(_relative(out, run_page(out, "blocking", run_ids["blocking"])))
    charts = page.locator("svg.line-chart")
    assert charts.count() == 2 * len(TARGETS)
    for i in range(charts.count()):
        series = charts.nth(i).locator("g.series")
        assert series.count() == len(SOURCES)
        for j in range(series.count()):
            assert series.nth(j).locator("polyline").first.bounding_box()["width"] > 100  # drawn across the layers
    # Hover shows the exact values (SVG <title> tooltips).
    assert "relative accuracy" in charts.first.locator("circle").first.locator("title").text_content()

    page = exp_watched.goto(_relative(out, run_page(out, "blocking", run_ids["demo_blocking"])))
    assert page.locator(".warning.banner").is_visible()
    relative = page.locator("svg.line-chart[data-measure='relative_accuracy']")
    assert relative.count() == len(TARGETS)
    for i in range(relative.count()):
        assert relative.nth(i).locator("g.series").count() == 0
        assert relative.nth(i).locator("text.chart-empty").first.is_visible()
    assert page.locator("svg.line-chart[data-measure='mean_target_prob'] g.series").count() == len(TARGETS) * len(
        SOURCES
    )
    assert ABLATION_IMAGES  # imported for the fixture's sake


# -- extra views: LLaVA-NeXT's high-resolution panel (site built from test_report's NeXT-like database) --

from test_report import HR_COLS, HR_ROWS, make_extra_view_db


@pytest.fixture(scope="module")
def next_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("browser-next")
    db_path = root / "results.duckdb"
    ids = make_extra_view_db(db_path)
    out = root / "site"
    build_site(db_path, out, downloads=False)
    return db_path, out, ids


def test_hovering_a_high_res_cell_highlights_its_row(
    browser: Any, next_site: tuple[Path, Path, dict[str, Any]]
) -> None:
    db_path, out, ids = next_site
    with ResultsDB(db_path, read_only=True) as db:
        rows = db.sql("SELECT patch_row, patch_col, position FROM positions WHERE kind = 'image_hr'")
    mapping = {(r, c): p for r, c, p in rows}
    watched = Watched(browser, out.resolve().as_uri() + "/")
    try:
        page = _open_lens(watched, ids["run"], ids["image_id"])
        for (r, c), position in sorted(mapping.items()):
            page.hover(f'#extra-grid-0 [data-cell="{r * HR_COLS + c}"]')
            assert _active_position(page) == position, (r, c)
            assert page.locator(f'#extra-grid-0 .patch-active[data-cell="{r * HR_COLS + c}"]').count() == 1
            assert page.locator("#extra-grid-0 .patch-active").count() == 1
            assert page.locator("#patch-grid .patch-active").count() == 0  # not a base-grid position
        # Selecting an image_hr row in the table highlights its cell in the high-resolution panel.
        r, c = HR_ROWS - 1, 1
        page.locator("#lens-table tbody tr:not(.spacer)").nth(mapping[(r, c)]).locator("th.label").click()
        assert page.locator("#extra-grid-0 .patch-locked").evaluate_all("els => els.map(e => e.dataset.cell)") == [
            str(r * HR_COLS + c)
        ]
        watched.check()
    finally:
        watched.context.close()
