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
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.bench import bench_module
from test_report import N_LAYERS, TOP_K, _load_data
from test_site_browser import Watched, _open_lens, browser, site  # noqa: F401  (fixtures)

from db.store import ResultsDB
from report.build import build_site, run_dir_name
from report.lens_codec import unpack_lens_data, unpack_token_ids

pytestmark = pytest.mark.browser  # Chromium / validators: not in the fast subset

ROOT = Path(__file__).resolve().parents[1]


def _bench_module() -> Any:
    return bench_module("lens_page")


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
    # Only the rows near the window are displayed (spacer rows stand in for the rest), and the
    # row band and cell box drawn over the active row and cell sit exactly on them.
    assert page.locator("#lens-table tbody tr.live").count() < 80
    row_box = page.locator("#lens-table tbody tr.row-active td:nth-child(36)").bounding_box()
    band, cell_box = page.locator("#lens-table-wrap .row-band").bounding_box(), page.locator(".cell-box").bounding_box()
    assert abs(band["y"] - row_box["y"]) < 1.5 and abs(band["height"] - row_box["height"]) < 1.5
    assert abs(cell_box["x"] - row_box["x"]) < 1.5 and abs(cell_box["y"] - row_box["y"]) < 1.5
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
            assert data["format"] == "llava-interp-lens/4"
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


# -- invisible tokens: the tokenizer's pieces (table token_pieces), with the real LLaVA-1.5 tokenizer --

# 29871: SentencePiece's lone word marker (decodes to ""); 13: byte-fallback newline; 229:
# the lone byte <0xE2> (decodes to U+FFFD); 278: "\u2581the" (decodes to "the"); 32050: an
# id of LLaVA-1.5's padded unembedding the tokenizer has no piece for; 999_999: a made-up id
# whose piece is hostile markup (pieces are untrusted too).
PIECE_IDS = (29871, 13, 229, 278, 32050, 999_999)
HOSTILE_PIECE = "</script><script>alert(1)</script>\"&'"
# What the page shows for each (the legend's promise).
PIECE_SHOWN = {
    29871: "\u2423",
    13: "\u21b5",
    229: "\u27e80xE2\u27e9",
    278: "the",
    32050: "\u2205",
    999_999: HOSTILE_PIECE,
}
PIECE_PROMPT_IDS = (1, 3148, 1001, 29901, 29871)  # "<s> USER: \u2581" before the image, as LLaVA-1.5 tokenizes it
PIECE_AFTER_IDS = (29871, 13, 4002, 29901)  # "\u2581 \n Describe :" after it


def _real_tokenizer() -> Any:
    from conftest import REAL_LLAVA15, require_shared
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(require_shared(REAL_LLAVA15)))


@pytest.fixture(scope="module")
def pieces_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, Any]:
    """One lens image whose cells and input positions name PIECE_IDS, written through the
    collector's own table builders with the real tokenizer's decoded texts and pieces."""
    import datetime as dt

    import numpy as np
    import pyarrow as pa

    from collector.tables import decode_tokens, lens_table, token_pieces, token_pieces_table

    tokenizer = _real_tokenizer()
    root = tmp_path_factory.mktemp("lens-pieces")
    db_path = root / "pieces.duckdb"
    grid, n_layers, top_k = 4, 3, 3
    input_ids = [*PIECE_PROMPT_IDS, *([32000] * grid * grid), *PIECE_AFTER_IDS]
    n = len(input_ids)
    ids = np.array(
        [
            [[PIECE_IDS[(layer + row + k) % len(PIECE_IDS)] for k in range(top_k)] for row in range(n)]
            for layer in range(n_layers)
        ]
    )
    probs = np.tile(np.array([0.5, 0.3, 0.1]), (n_layers, n, 1))
    real = [i for i in set(ids.ravel().tolist()) | set(input_ids) if i != 999_999]
    text = decode_tokens(tokenizer, real)
    pieces = token_pieces(tokenizer, real)
    text[999_999], pieces[999_999] = "", HOSTILE_PIECE
    first = len(PIECE_PROMPT_IDS)
    with ResultsDB(db_path) as db:
        db.add_image(7, "seven.jpg", 64, 64, "coco")
        run_id = db.start_run("lens", "llava-hf/llava-1.5-7b-hf", {"model_id": "p"}, {"model_id": "p", "top_k": top_k})
        db.write_image_results(
            run_id,
            7,
            {
                "positions": pa.table(
                    {
                        "run_id": [run_id] * n,
                        "image_id": pa.array([7] * n, pa.int64()),
                        "position": pa.array(range(n), pa.int32()),
                        "kind": ["image" if first <= p < first + grid * grid else "text" for p in range(n)],
                        "patch_row": pa.array(
                            [(p - first) // grid if first <= p < first + grid * grid else None for p in range(n)],
                            pa.int32(),
                        ),
                        "patch_col": pa.array(
                            [(p - first) % grid if first <= p < first + grid * grid else None for p in range(n)],
                            pa.int32(),
                        ),
                        "label": [
                            f"<IMG{p - first + 1:03d}>" if first <= p < first + grid * grid else text[i]
                            for p, i in enumerate(input_ids)
                        ],
                        "token_id": pa.array(input_ids, pa.int32()),
                    }
                ),
                "logit_lens": lens_table(run_id, 7, ids, probs, text),
                "token_pieces": token_pieces_table(run_id, text, pieces),
                "run_images": pa.table(
                    {
                        "run_id": [run_id],
                        "image_id": pa.array([7], pa.int64()),
                        "n_positions": [n],
                        "n_layers": [n_layers],
                        "grid_rows": [grid],
                        "grid_cols": [grid],
                        "written_at": [dt.datetime(2025, 1, 1)],
                    }
                ),
            },
        )
        db.finish_run(run_id)
    out = root / "site"
    build_site(db_path, out, downloads=False)
    return db_path, out, run_id, tokenizer


def test_data_file_carries_the_tokenizers_pieces(pieces_site: tuple[Path, Path, str, Any]) -> None:
    from report.lens_codec import unpack_token_pieces

    _, out, run_id, tokenizer = pieces_site
    data = _load_data(out / "lens" / run_dir_name(run_id) / "7.data.js")
    assert data["format"] == "llava-interp-lens/4"
    tokens, _, _ = unpack_lens_data(data)
    ids, pieces = unpack_token_ids(data), unpack_token_pieces(data)
    assert ids is not None and pieces is not None and sorted(ids) == sorted(PIECE_IDS)
    reference = dict(zip(PIECE_IDS[:5], tokenizer.convert_ids_to_tokens(list(PIECE_IDS[:5]))))
    for token_id, piece, token in zip(ids, pieces, tokens):
        expected = HOSTILE_PIECE if token_id == 999_999 else (reference[token_id] or "")
        assert piece == expected, token_id
        assert token == ("" if token_id == 999_999 else tokenizer.decode([token_id]))
    assert reference[29871] == "\u2581" and reference[13] == "<0x0A>" and reference[229] == "<0xE2>"
    kinds = data["positions"]["kind"]
    assert [p for p, k in zip(data["positions"]["piece"], kinds) if k == "text"] == tokenizer.convert_ids_to_tokens(
        [*PIECE_PROMPT_IDS, *PIECE_AFTER_IDS]
    )


def test_invisible_tokens_show_as_the_legend_promises_with_piece_and_id(
    browser: Any,
    pieces_site: tuple[Path, Path, str, Any],  # noqa: F811
) -> None:
    db_path, out, run_id, tokenizer = pieces_site
    watched = _watched(browser, out, 1400, 1000)
    try:
        page = _open_lens(watched, run_id, 7, "layer=2&pos=0")
        assert page.locator("#panel thead th.piece").count() == 1
        n_rows = page.locator("#lens-table tbody tr:not(.spacer)").count()
        for token_id in PIECE_IDS:
            # The first text position whose top-1 at layer 2 is token_id ((2 + row) % 6 == index).
            row = next(
                r
                for r in range(n_rows)
                if (2 + r) % len(PIECE_IDS) == PIECE_IDS.index(token_id)
                and page.locator("#lens-table tbody tr:not(.spacer)").nth(r).locator("th.kind").inner_text() == "text"
            )
            tr = page.locator("#lens-table tbody tr:not(.spacer)").nth(row)
            position = int(tr.locator("th.pos").inner_text())
            cell = tr.locator("td").nth(2)  # layer 2
            cell.hover()  # a real pointer over the table cell
            tip = page.locator("#lens-tip")
            assert tip.is_visible()
            assert tip.locator("td.token").first.inner_text() == PIECE_SHOWN[token_id]
            assert tip.locator("td.token-id").first.inner_text() == str(token_id)
            piece = HOSTILE_PIECE if token_id == 999_999 else tokenizer.convert_ids_to_tokens(token_id) or ""
            assert tip.locator("td.piece").first.inner_text() == piece  # the raw piece, as the tokenizer has it
            assert cell.inner_text() == PIECE_SHOWN[token_id]
            cell.click()  # lock: the panel shows the same, its token cell's title has piece, text and id
            assert page.locator("#panel-rows td.token").first.inner_text() == PIECE_SHOWN[token_id]
            title = page.locator("#panel-rows td.token").first.get_attribute("title")
            assert f"token id {token_id}" in title and "piece " in title, title
            if token_id == 29871:
                assert 'piece "\u2581"' in title and 'text ""' in title
            cell.click()  # unlock
            assert position >= 0
        # Input labels: the lone word marker before and after the image shows as a space.
        labels = page.locator("#lens-table tbody th.label").all_inner_texts()
        assert labels[len(PIECE_PROMPT_IDS) - 1] == "\u2423"
        assert labels[-4:-2] == ["\u2423", "\u21b5"]
        # Untrusted pieces stay text: nothing they spell became markup.
        assert page.evaluate("document.querySelectorAll('script:not([src])').length") == 0
        assert HOSTILE_PIECE not in (out / "lens" / run_dir_name(run_id) / "7.data.js").read_text(encoding="utf-8")
        watched.check()
    finally:
        watched.context.close()


def test_a_run_without_pieces_falls_back_to_the_text(
    browser: Any,
    site: tuple[Path, Path, dict[str, str]],  # noqa: F811
) -> None:
    """A run written before the token_pieces table (the test_report database writes none): the
    data file has no pieces, the page shows the decoded text (an empty one as \u2205) and no
    piece column, and says so in the legend."""
    db_path, out, run_ids = site
    run_id = run_ids["clean"]
    with ResultsDB(db_path, read_only=True) as db:
        assert db.sql("SELECT count(*) FROM token_pieces")[0][0] == 0
        layer, position, rank = db.sql(
            "SELECT layer, position, rank FROM logit_lens WHERE run_id = ? AND image_id = 102 AND token = '' "
            "ORDER BY layer, position LIMIT 1",
            (run_id,),
        )[0]
    data = _load_data(out / "lens" / run_dir_name(run_id) / "102.data.js")
    assert not data["packed"]["token_pieces_bytes"]
    watched = _watched(browser, out, 1400, 1000)
    try:
        page = _open_lens(watched, run_id, 102, f"layer={layer}&pos={position}")
        assert page.locator("#panel thead th.piece").count() == 0
        assert page.locator("#panel-rows td.piece").count() == 0
        token = page.locator("#panel-rows td.token").nth(rank - 1)
        assert token.inner_text() == "\u2205"
        assert token.get_attribute("title").startswith('raw text ""')
        assert "did not" in page.locator("#table-legend").inner_text()
        watched.check()
    finally:
        watched.context.close()
