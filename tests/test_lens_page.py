"""The lens page as a researcher uses it, in Chromium through Playwright, with real pointer
and keyboard events: the top-k at the pointer, the table following the hovered row and the
current layer, header alignment after a sideways scroll, the layer range, shading, the
keyboard wherever the focus is, a 390 px wide screen, honest probabilities, token ids and
exports.

Two sites: the hostile test database of test_report.py (tiny, every kind of awkward token)
and a LLaVA-1.5-shaped page (33 layers x 593 positions x top-5, from bench/lens_page.py).
Every page load fails the test on a console error, an exception, a dialog or a request
leaving the site (test_site_browser.Watched).
"""

from __future__ import annotations

import csv
import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report import N_LAYERS, TOP_K, _load_data
from test_site_browser import Watched, _open_lens, browser, site  # noqa: F401  (fixtures)

from db.store import ResultsDB
from report.build import build_site, run_dir_name
from report.lens_codec import unpack_lens_data, unpack_token_ids

pytestmark = pytest.mark.browser  # Chromium / validators: not in the fast subset

ROOT = Path(__file__).resolve().parents[1]


def _bench_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_lens_page", ROOT / "bench" / "lens_page.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def big_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A LLaVA-1.5-shaped lens page: 33 layers x 593 positions (5 + 576 image + 12 text), top-5."""
    root = tmp_path_factory.mktemp("lens-big")
    db_path = root / "big.duckdb"
    run_id = _bench_module().make_db(db_path)
    out = root / "site"
    build_site(db_path, out, downloads=False)
    return db_path, out, run_id


def _watched(chromium: Any, out: Path, width: int = 1280, height: int = 800) -> Watched:
    watched = Watched(chromium, out.resolve().as_uri() + "/")
    watched.page.set_viewport_size({"width": width, "height": height})
    return watched


@pytest.fixture
def big(browser: Any, big_site: tuple[Path, Path, str]) -> Iterator[tuple[Watched, Any, Path, str]]:  # noqa: F811
    db_path, out, run_id = big_site
    watched = _watched(browser, out)
    try:
        page = _open_lens(watched, run_id, 1)
        yield watched, page, db_path, run_id
        watched.check()
    finally:
        watched.context.close()


def _top(db_path: Path, run_id: str, image_id: int, layer: int, position: int) -> list[tuple[int, str, int, float]]:
    with ResultsDB(db_path, read_only=True) as db:
        return db.sql(
            "SELECT rank, token, token_id, prob FROM logit_lens WHERE run_id = ? AND image_id = ? "
            "AND layer = ? AND position = ? ORDER BY rank",
            (run_id, image_id, layer, position),
        )


def _in_box(inner: dict[str, float], outer: dict[str, float]) -> bool:
    return (
        inner["x"] >= outer["x"] - 0.5
        and inner["y"] >= outer["y"] - 0.5
        and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + 0.5
        and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + 0.5
    )


def _visible_in_wrap(page: Any, selector: str) -> bool:
    wrap = page.locator("#lens-table-wrap").bounding_box()
    box = page.locator(selector).first.bounding_box()
    return box is not None and _in_box(box, wrap)


def test_hovering_a_patch_shows_its_top_k_at_the_pointer_and_the_table_follows(big: Any) -> None:
    _, page, db_path, run_id = big
    grid = page.locator("#patch-grid").bounding_box()
    # The last patch row: its position (5 + 23 * 24 + 20 = 577) is far down the table.
    r, c = 23, 20
    x, y = grid["x"] + (c + 0.5) * grid["width"] / 24, grid["y"] + (r + 0.5) * grid["height"] / 24
    page.mouse.move(x, y)
    tip = page.locator("#lens-tip")
    assert tip.is_visible()
    box = tip.bounding_box()
    assert _in_box(box, {"x": 0, "y": 0, "width": 1280, "height": 800})  # fully on screen, near the pointer
    assert abs(box["x"] - x) < 400 and abs(box["y"] - y) < 300
    position = 5 + r * 24 + c
    expected = _top(db_path, run_id, 1, 32, position)
    tokens = tip.locator("td.token").all_inner_texts()
    ids = tip.locator("td.token-id").all_inner_texts()
    assert tokens == [t.replace(" ", "\u2423") for _, t, _, _ in expected]
    assert ids == [str(i) for _, _, i, _ in expected]
    assert (
        "L32" in tip.locator(".tip-title").inner_text()
        and f"position {position}" in tip.locator(".tip-title").inner_text()
    )
    # The panel shows the same and is in view at 1280x800.
    panel = page.locator("#panel").bounding_box()
    assert panel["y"] + panel["height"] <= 800
    assert page.locator("#panel-rows td.token-id").all_inner_texts() == ids
    # The hovered row shows at once under the table's headers (the mirrored row, drawn on canvases) ...
    assert page.locator("#lens-table thead tr.hover-row").get_attribute("data-position") == str(position)
    wrap_box = page.locator("#lens-table-wrap").bounding_box()
    assert _in_box(page.locator("#lens-table thead th.mirror-pin").bounding_box(), wrap_box)
    layers = page.locator("#lens-table thead th.mirror-layers").bounding_box()
    assert wrap_box["y"] <= layers["y"] and layers["y"] + layers["height"] <= wrap_box["y"] + 80  # under the headers
    # ... and the table follows the hovered patch once the pointer rests: its row scrolls into view.
    page.wait_for_function(
        f"document.querySelector('#lens-table tbody tr.row-active th.pos').textContent === '{position}'"
    )
    page.wait_for_function(
        "document.querySelector('#lens-table tbody tr.row-active td.cell-active') !== null", timeout=3000
    )
    assert _visible_in_wrap(page, "#lens-table tbody tr.row-active th.pos")
    assert _visible_in_wrap(page, "#lens-table tbody tr.row-active td:nth-child(36)")  # L32, the current layer
    # Leaving the image hides the tooltip.
    page.mouse.move(5, 5)
    assert not tip.is_visible()


def test_hovering_a_table_cell_shows_its_top_k_tooltip(big: Any) -> None:
    _, page, db_path, run_id = big
    cell = page.locator("#lens-table tbody tr.live").nth(8).locator("td").nth(31)  # layer 31
    cell.hover()
    position = int(page.locator("#lens-table tbody tr.live").nth(8).locator("th.pos").inner_text())
    tip = page.locator("#lens-tip")
    assert tip.is_visible()
    assert tip.locator(".tip-title").inner_text().startswith("L31 ")
    expected = _top(db_path, run_id, 1, 31, position)
    assert tip.locator("td.token-id").all_inner_texts() == [str(i) for _, _, i, _ in expected]
    assert cell.inner_text() == expected[0][1].replace(" ", "\u2423")


def test_headers_stay_above_their_columns_after_a_sideways_scroll(big: Any) -> None:
    _, page, _, _ = big
    wrap = page.locator("#lens-table-wrap")
    box = wrap.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for delta in (-5000, 700):  # to the far left, then part way right: pinned columns over scrolled ones
        page.mouse.wheel(delta, 0)
        page.wait_for_timeout(200)
    assert 0 < wrap.evaluate("w => w.scrollLeft") < wrap.evaluate("w => w.scrollWidth - w.clientWidth")
    row = page.locator("#lens-table tbody tr.live").nth(6)
    head = page.locator("#lens-table thead tr th")
    for i, name in enumerate(("pos", "label", "kind")):  # pinned: header and body cells in one column
        h, b = head.nth(i).bounding_box(), row.locator("th").nth(i).bounding_box()
        assert head.nth(i).inner_text() == name
        assert abs(h["x"] - b["x"]) < 1 and abs(h["width"] - b["width"]) < 1.5, name
    pinned_right = head.nth(2).bounding_box()["x"] + head.nth(2).bounding_box()["width"]
    checked = 0
    for layer in range(33):
        h = head.nth(3 + layer).bounding_box()
        if h["x"] < pinned_right or h["x"] + h["width"] > box["x"] + box["width"]:
            continue  # under the pinned columns or beyond the right edge
        b = row.locator("td").nth(layer).bounding_box()
        assert head.nth(3 + layer).inner_text() == f"L{layer}"
        assert abs(h["x"] - b["x"]) < 1 and abs(h["width"] - b["width"]) < 1.5, layer
        checked += 1
    assert checked >= 4
    # What is drawn at the left edge of the header is the "pos" header, not a layer's.
    hit = page.evaluate(
        f"document.elementFromPoint({box['x'] + 10}, {head.nth(0).bounding_box()['y'] + 5}).textContent"
    )
    assert hit == "pos"


def test_the_table_follows_the_current_layer(big: Any) -> None:
    _, page, _, _ = big
    assert page.locator("#layer-value").inner_text() == "32"
    assert _visible_in_wrap(page, "#lens-table thead th.layer-current")  # opens at layer 32 showing L32
    assert page.locator("#lens-table thead th.layer-current").inner_text() == "L32"
    page.focus("#layer")
    page.keyboard.press("Home")  # the slider's own key
    assert page.locator("#layer-value").inner_text() == "0"
    assert _visible_in_wrap(page, "#lens-table thead th.layer-current")
    page.keyboard.press("]")  # [ and ] work while the slider has focus
    assert page.locator("#layer-value").inner_text() == "1"
    # Token search leaves the table on the current layer too.
    page.fill("#token-search", "w0")
    page.keyboard.press("]")  # typed into the box, not a layer change
    assert page.locator("#layer-value").inner_text() == "1" and page.input_value("#token-search") == "w0]"
    page.focus("#search-exact")  # a checkbox: the keys work again
    for _ in range(15):
        page.keyboard.press("]")
    assert page.locator("#layer-value").inner_text() == "16"
    assert page.locator("#lens-table thead th.layer-current").inner_text() == "L16"
    assert _visible_in_wrap(page, "#lens-table thead th.layer-current")
    page.focus("#shade")
    page.keyboard.press("[")
    assert page.locator("#layer-value").inner_text() == "15"


def test_layer_range_and_shading(big: Any) -> None:
    _, page, _, _ = big
    page.fill("#layer-from", "10")
    page.fill("#layer-to", "12")
    page.keyboard.press("Enter")  # change
    page.locator("#layer-from").dispatch_event("change")
    shown = [t for t in page.locator("#lens-table thead th.layer-head:visible").all_inner_texts()]
    assert shown == ["L10", "L11", "L12"]
    assert page.locator("#layer-value").inner_text() == "12"  # the current layer moved into the range
    assert "from=10" in page.evaluate("location.hash") and "to=12" in page.evaluate("location.hash")
    # The shown cells are the columns' own: header over cell.
    row = page.locator("#lens-table tbody tr.live").nth(3)
    heads = page.locator("#lens-table thead th.layer-head:visible")
    cells = row.locator("td:visible")
    assert cells.count() == 3
    for i in range(3):
        assert abs(heads.nth(i).bounding_box()["x"] - cells.nth(i).bounding_box()["x"]) < 1
    # Moving past the range slides it along.
    page.locator("#lens-table-wrap").focus()
    page.keyboard.press("]")
    assert page.locator("#lens-table thead th.layer-head:visible").all_inner_texts() == ["L11", "L12", "L13"]
    shaded = "document.querySelector('#lens-table tbody tr.live td.p9, #lens-table tbody tr.live td.p5, #lens-table tbody tr.live td.p3')"
    assert page.evaluate(f"getComputedStyle({shaded}).backgroundColor") != "rgba(0, 0, 0, 0)"
    page.click("#shade")
    assert page.evaluate(f"getComputedStyle({shaded}).backgroundColor") == "rgba(0, 0, 0, 0)"
    assert "shade=0" in page.evaluate("location.hash")
    page.click("#layer-all")
    assert page.locator("#lens-table thead th.layer-head:visible").count() == 33


def test_narrow_screen_has_no_horizontal_overflow(browser: Any, big_site: tuple[Path, Path, str]) -> None:  # noqa: F811
    _, out, run_id = big_site
    watched = _watched(browser, out, 390, 844)
    try:
        page = _open_lens(watched, run_id, 1)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        img = page.locator("#view img").bounding_box()
        assert img["x"] >= 0 and img["x"] + img["width"] <= 390
        grid = page.locator("#patch-grid").bounding_box()
        page.mouse.move(grid["x"] + grid["width"] * 0.9, grid["y"] + grid["height"] * 0.5)
        tip = page.locator("#lens-tip").bounding_box()
        assert tip["x"] >= 0 and tip["x"] + tip["width"] <= 390
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.goto(watched.origin + "index.html")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        watched.check()
    finally:
        watched.context.close()


def test_probabilities_ids_and_invisible_tokens_are_shown_honestly(
    browser: Any, site: tuple[Path, Path, dict[str, str]]
) -> None:  # noqa: F811
    db_path, out, run_ids = site
    run_id = run_ids["clean"]
    watched = _watched(browser, out, 1400, 1000)
    try:
        with ResultsDB(db_path, read_only=True) as db:
            layer, position, rank = db.sql(
                "SELECT layer, position, rank FROM logit_lens WHERE run_id = ? AND image_id = 102 AND token = ' the' "
                "ORDER BY layer, position LIMIT 1",
                (run_id,),
            )[0]
        page = _open_lens(watched, run_id, 102, f"layer={layer}&pos={position}")
        expected = _top(db_path, run_id, 102, layer, position)
        tokens = page.locator("#panel-rows td.token")
        assert tokens.all_inner_texts()[rank - 1] == "\u2423the"  # space shown as the legend says
        assert '" the"' in tokens.nth(rank - 1).get_attribute("title")  # raw text on hover
        assert page.locator("#panel-rows td.token-id").all_inner_texts() == [str(i) for _, _, i, _ in expected]
        for text, (_, _, _, p) in zip(page.locator("#panel-rows .prob-text").all_inner_texts(), expected):
            digits = text.rstrip("%").replace(".", "").lstrip("0").lstrip("<")
            assert len(digits) <= 2 or text == "100%", text  # two significant digits: what a 1-byte code holds
            value = float(text.rstrip("%").lstrip("<")) / 100
            assert abs(value - p) <= 0.03 * p + 0.005 * max(p, 1e-9), (text, p)
        assert "2.5%" in page.locator("#table-legend").inner_text()
        assert "\u2205" in page.locator("#table-legend").inner_text()
        watched.check()
    finally:
        watched.context.close()


def test_exports_csv_svg_png(browser: Any, site: tuple[Path, Path, dict[str, str]]) -> None:  # noqa: F811
    db_path, out, run_ids = site
    run_id = run_ids["hostile"]
    watched = _watched(browser, out, 1400, 1000)
    try:
        page = _open_lens(watched, run_id, 101)
        with page.expect_download() as info:
            page.click("#export-csv")
        rows = list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text(encoding="utf-8"))))
        with ResultsDB(db_path, read_only=True) as db:
            lens = db.sql(
                "SELECT layer, position, rank, token_id, token FROM logit_lens WHERE run_id = ? AND image_id = 101",
                (run_id,),
            )
        assert {
            (int(r["layer"]), int(r["position"]), int(r["rank"]), int(r["token_id"]), r["token"]) for r in rows
        } == set(lens)
        assert len(rows) == len(lens)
        with page.expect_download() as info:
            page.click("#export-map-svg")
        svg = Path(info.value.path()).read_text(encoding="utf-8")
        assert svg.startswith("<svg") and "<img" not in svg and "<rect" in svg
        with page.expect_download() as info:
            page.click("#export-map-png")
        assert Path(info.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with page.expect_download() as info:
            page.click("#export-table-svg")
        table_svg = Path(info.value.path()).read_text(encoding="utf-8")
        assert table_svg.count("<g>") >= N_LAYERS and "<script" not in table_svg
        with page.expect_download() as info:
            page.click("#export-table-png")
        assert Path(info.value.path()).read_bytes()[:4] == b"\x89PNG"
        watched.check()
    finally:
        watched.context.close()


def test_data_file_carries_the_token_ids(site: tuple[Path, Path, dict[str, str]]) -> None:  # noqa: F811
    db_path, out, run_ids = site
    with ResultsDB(db_path, read_only=True) as db:
        for run_id, image_id in db.sql("SELECT run_id, image_id FROM run_images WHERE n_positions > 0"):
            data = _load_data(out / "lens" / run_dir_name(run_id) / f"{image_id}.data.js")
            assert data["format"] == "llava-interp-lens/3"
            tokens, index, _ = unpack_lens_data(data)
            ids = unpack_token_ids(data)
            assert ids is not None and len(ids) == len(tokens)
            n_rows = len(data["positions"]["position"])
            row_of = {p: r for r, p in enumerate(data["positions"]["position"])}
            for layer, position, rank, token_id, token in db.sql(
                "SELECT layer, position, rank, token_id, token FROM logit_lens WHERE run_id = ? AND image_id = ?",
                (run_id, image_id),
            ):
                at = (layer * n_rows + row_of[position]) * TOP_K + rank - 1
                assert (ids[index[at]], tokens[index[at]]) == (token_id, token)
            assert data["positions"]["token_id"] == [
                r[0]
                for r in db.sql(
                    "SELECT token_id FROM positions WHERE run_id = ? AND image_id = ? ORDER BY position",
                    (run_id, image_id),
                )
            ]


# -- index, comparison and the quantitative overlay (a site with two runs of the same model, two prompts) --

from test_report import _write_image  # noqa: E402


def _make_two_run_db(path: Path) -> list[str]:
    """Two lens runs of one model with different prompts, on images named img10.jpg (id 101) and img2.jpg (id 102)."""
    square = [[0, 0, 300, 0, 300, 300, 0, 300]]
    with ResultsDB(path) as db:
        db.add_image(
            101,
            "img10.jpg",
            640,
            480,
            "coco",
            annotations=[
                {
                    "id": 1,
                    "category_id": 17,
                    "category": "cat",
                    "area": 10.0,
                    "bbox": [0, 0, 300, 300],
                    "segmentation": square,
                }
            ],
        )
        db.add_image(
            102,
            "img2.jpg",
            640,
            480,
            "coco",
            annotations=[
                {
                    "id": 2,
                    "category_id": 17,
                    "category": "cat",
                    "area": 10.0,
                    "bbox": [0, 0, 300, 300],
                    "segmentation": square,
                }
            ],
        )
        ids = []
        # The second run's positions are column-major: the view aligns patches by cell, not by position number.
        for prompt, column_major in (("Describe.", False), ("What is it?", True)):
            run = db.start_run(
                "lens",
                "llava-hf/llava-1.5-7b-hf",
                {"model_id": "m", "prompt": prompt},
                {"model_id": "llava-hf/llava-1.5-7b-hf", "prompt": "USER: <image>\n" + prompt, "top_k": TOP_K},
            )
            _write_image(db, run, 101, complete=True, column_major=column_major)
            _write_image(db, run, 102, complete=True, column_major=column_major)
            db.finish_run(run)
            ids.append(run)
    return ids


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("lens-two-runs")
    db_path = root / "two.duckdb"
    ids = _make_two_run_db(db_path)
    out = root / "site"
    build_site(db_path, out, downloads=False)
    return db_path, out, ids


@pytest.fixture
def two(browser: Any, two_runs: tuple[Path, Path, list[str]]) -> Iterator[tuple[Watched, Path, Path, list[str]]]:  # noqa: F811
    db_path, out, ids = two_runs
    watched = _watched(browser, out, 1280, 800)
    try:
        yield watched, db_path, out, ids
        watched.check()
    finally:
        watched.context.close()


def _index_rows(page: Any) -> list[tuple[str, str]]:
    return [
        tuple(r)
        for r in page.locator("#lens-list tbody tr:visible").evaluate_all(
            "rows => rows.map(r => [r.dataset.file, r.dataset.run])"
        )
    ]


def test_index_sorts_filters_and_keeps_its_state_in_the_url(two: Any) -> None:
    watched, _, _, ids = two
    page = watched.goto("index.html")
    # Natural order of file names: img2 before img10.
    assert [f for f, _ in _index_rows(page)] == ["img2.jpg", "img2.jpg", "img10.jpg", "img10.jpg"]
    page.click("#lens-list button.sort[data-sort='file']")  # descending
    assert [f for f, _ in _index_rows(page)] == ["img10.jpg", "img10.jpg", "img2.jpg", "img2.jpg"]
    assert page.locator("#lens-list th[aria-sort='descending'] button").inner_text() == "File name"
    page.click("#lens-list button.sort[data-sort='image']")
    assert page.locator("#lens-list tbody tr:visible").first.get_attribute("data-image") == "101"
    # Image id is an exact filter: "1" matches nothing, "102" exactly its two rows.
    page.fill("#filter-image", "1")
    assert page.locator("#match-count").inner_text().startswith("0 of 4")
    page.fill("#filter-image", "102")
    assert {f for f, _ in _index_rows(page)} == {"img2.jpg"} and len(_index_rows(page)) == 2
    page.select_option("#filter-run", ids[1])
    assert _index_rows(page) == [("img2.jpg", ids[1])]
    hash_ = page.evaluate("location.hash")
    assert "id=102" in hash_ and f"run={ids[1]}" in hash_ and "sort=image" in hash_
    page.reload()
    assert _index_rows(page) == [("img2.jpg", ids[1])]
    assert page.input_value("#filter-image") == "102"
    # The any-column filter matches words within one column, not across the joined row.
    page.select_option("#filter-run", "")
    page.fill("#filter-image", "")
    page.fill("#search", "img2")
    assert page.locator("#match-count").inner_text().startswith("2 of 4")
    page.fill("#filter-file", "img1")
    assert page.locator("#match-count").inner_text().startswith("0 of 4")
    # Per-image summary columns: positions, layers, predicted next token.
    row = page.locator("#lens-list tbody tr").first
    assert row.get_attribute("data-layers") == str(N_LAYERS)
    assert int(row.get_attribute("data-positions")) > 0


def test_lens_page_links_the_same_image_in_other_runs_and_compares_them(two: Any) -> None:
    watched, db_path, out, ids = two
    page = _open_lens(watched, ids[0], 102)
    links = page.locator(".other-runs a:not(.compare-link)")
    assert links.count() == 1
    assert "What is it?" in links.first.inner_text()  # named by what differs: the prompt
    links.first.click()
    page.wait_for_selector("body[data-lens-ready]")
    assert page.url.split("#")[0].endswith(f"lens/{run_dir_name(ids[1])}/102.html")
    page.locator(".other-runs a.compare-link").first.click()
    page.wait_for_selector("body[data-compare-ready]", timeout=10_000)
    assert page.input_value("#pick-a") == f"{run_dir_name(ids[1])}/102"
    assert page.input_value("#pick-b") == f"{run_dir_name(ids[0])}/102"
    assert (
        "What is it?" in page.locator("#title-a").inner_text() and "Describe." in page.locator("#title-b").inner_text()
    )
    with ResultsDB(db_path, read_only=True) as db:
        top1 = {
            (run, layer, position): token
            for run, layer, position, token in db.sql(
                "SELECT run_id, layer, position, token FROM lens_top1 WHERE image_id = 102"
            )
        }
    with ResultsDB(db_path, read_only=True) as db:
        cell_of = {
            (run, position): (r, c)
            for run, position, r, c in db.sql(
                "SELECT run_id, position, patch_row, patch_col FROM positions WHERE image_id = 102"
            )
        }
    rows = page.locator("#compare-table tbody tr")
    n_diff = 0
    for i in range(rows.count()):
        row = rows.nth(i)
        pa_, pb = (int(t) for t in row.locator("th.pos").all_inner_texts())
        assert cell_of[(ids[1], pa_)] == cell_of[(ids[0], pb)]  # aligned by patch cell (text: both None)
        cells = row.locator("td")
        for layer in range(N_LAYERS):
            differs = top1[(ids[1], layer, pa_)] != top1[(ids[0], layer, pb)]
            assert ("differ" in cells.nth(layer).get_attribute("class")) == differs
            n_diff += differs
    assert n_diff > 0
    page.check("#cmp-only-diff")
    page.wait_for_selector("body[data-compare-ready]")
    assert (
        page.locator("#compare-table tbody tr:visible").count()
        == page.locator("#compare-table tbody tr.row-differs").count()
    )
    assert "diff=1" in page.evaluate("location.hash")


def test_quantitative_page_overlays_runs_and_saves_svg(two: Any) -> None:
    watched, _, _, _ = two
    page = watched.goto("quantitative.html")
    headings = page.locator("section.quant-run h2").all_inner_texts()
    assert len(headings) == 2 and headings[0] != headings[1]
    assert "Describe." in headings[0] and "What is it?" in headings[1]
    overlay = page.locator("svg.overlay-chart")
    assert overlay.locator("g.series").count() == 4  # top-1 and top-k of each run
    assert overlay.locator("g.series polyline").first.bounding_box()["width"] > 100
    strokes = set(overlay.locator("g.series polyline").evaluate_all("ls => ls.map(l => l.getAttribute('stroke'))"))
    assert len(strokes) == 2
    with page.expect_download() as info:
        page.locator("#overlay-section .svg-save").click()
    svg = Path(info.value.path()).read_text(encoding="utf-8")
    assert "<svg" in svg and "polyline" in svg and "What is it?" in svg
    assert page.locator("figure[data-figure-name] .svg-save").count() == 3


def test_blocking_windows_table_fits_at_1280(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: F811
    """The per-image blocking table shows its last ("Correct") column without a sideways scroll."""
    from test_report_experiments import image_page, make_experiment_db

    root = tmp_path_factory.mktemp("blocking-fit")
    ids = make_experiment_db(root / "e.duckdb")
    build_site(root / "e.duckdb", root / "site", downloads=False)
    watched = _watched(browser, root / "site", 1280, 800)
    try:
        page = watched.goto(
            image_page(root / "site", "blocking", ids["blocking"], 303).relative_to(root / "site").as_posix()
        )
        page.wait_for_selector("body[data-overlay-ready]")
        scroller = page.locator("#windows").locator("xpath=..")
        assert scroller.evaluate("s => s.scrollWidth <= s.clientWidth")
        correct = page.locator("#windows thead th").last
        assert correct.inner_text() == "Correct"
        box, frame = correct.bounding_box(), scroller.bounding_box()
        assert box["x"] + box["width"] <= frame["x"] + frame["width"] + 0.5
        watched.check()
    finally:
        watched.context.close()
