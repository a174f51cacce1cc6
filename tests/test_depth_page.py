"""The relative-depth comparison page (depth.html) and the intervals drawn on every chart.

`_make_two_family_db` writes, through ResultsDB, runs of two model families of different
depths (llava-1.5 with 4 decoder layers, qwen2-vl with 2 for the lens; 8 and 4 for
blocking) with known per-image outcomes. Every check recomputes what the page should show
from the raw rows (not the views, not the report's code): coordinates by hand from the
chart's plot box, intervals with db.stats on per-image counts. A second test runs the real
lens collector on two families' tiny checkpoints.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from test_report_experiments import Node, parse, run_page
from test_site_browser import Watched, browser  # noqa: F401  (browser: the shared Chromium fixture)

from db.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_ratio_ci, wilson_interval
from db.store import ResultsDB
from report.build import build_site

HOSTILE_MODEL = 'org/<script>alert("m")</script>'
LENS_DEPTHS = {"llava-1.5": 4, "qwen2-vl": 2}  # decoder layers: L + 1 hidden states stored
BLOCKING_DEPTHS = {"llava-1.5": 8, "qwen2-vl": 4}
IMAGES = (11, 12, 13, 14, 15)
GRID = 2
TEXT_BEFORE = 2


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def _lens_tables(run_id: str, image_id: int, n_states: int, hits: np.ndarray) -> dict[str, pa.Table]:
    """Positions (2 text, a 2x2 image block, 1 text) and top-1 lens rows: image position p
    says "cat" at layer l where hits[l, p] (the object covers the whole image)."""
    kinds = ["text"] * TEXT_BEFORE + ["image"] * GRID * GRID + ["text"]
    n_pos = len(kinds)
    patch = [(None, None)] * TEXT_BEFORE + [(i // GRID, i % GRID) for i in range(GRID * GRID)] + [(None, None)]
    layers, positions, tokens = [], [], []
    for layer in range(n_states):
        for position in range(n_pos):
            image_index = position - TEXT_BEFORE
            hit = kinds[position] == "image" and hits[layer, image_index]
            layers.append(layer)
            positions.append(position)
            tokens.append("\u2581cat" if hit else "<b>x</b>")
    n = len(layers)
    return {
        "positions": pa.table(
            {
                "run_id": [run_id] * n_pos,
                "image_id": pa.array([image_id] * n_pos, pa.int64()),
                "position": pa.array(range(n_pos), pa.int32()),
                "kind": kinds,
                "patch_row": pa.array([p[0] for p in patch], pa.int32()),
                "patch_col": pa.array([p[1] for p in patch], pa.int32()),
                "label": [f"t{i}" for i in range(n_pos)],
                "token_id": pa.array(range(n_pos), pa.int32()),
            }
        ),
        "logit_lens": pa.table(
            {
                "run_id": [run_id] * n,
                "image_id": pa.array([image_id] * n, pa.int64()),
                "layer": pa.array(layers, pa.int16()),
                "position": pa.array(positions, pa.int32()),
                "rank": pa.array([1] * n, pa.int16()),
                "token_id": pa.array([7] * n, pa.int32()),
                "token": tokens,
                "prob": pa.array([0.5] * n, pa.float64()),
            }
        ),
        "image_views": pa.table(
            {
                "run_id": [run_id],
                "image_id": pa.array([image_id], pa.int64()),
                "png": pa.array([_png()], pa.binary()),
                "view_width": [8],
                "view_height": [8],
                "scale_x": [1.0],
                "scale_y": [1.0],
                "offset_x": [0.0],
                "offset_y": [0.0],
            }
        ),
        "run_images": _marker(run_id, image_id, n_pos, n_states),
    }


def _marker(run_id: str, image_id: int, n_positions: int, n_layers: int) -> pa.Table:
    return pa.table(
        {
            "run_id": [run_id],
            "image_id": pa.array([image_id], pa.int64()),
            "n_positions": [n_positions],
            "n_layers": pa.array([n_layers], pa.int32()),
            "grid_rows": [GRID],
            "grid_cols": [GRID],
            "written_at": [dt.datetime(2026, 1, 2)],
        }
    )


def _config(family: str, **extra: object) -> dict[str, object]:
    return {"family": family, "prompt": f"Describe it ({family}).", "top_k": 1, **extra}


def _make_two_family_db(path: Path) -> dict[str, dict[str, str]]:
    """Lens, blocking and ablation runs of two families; returns run ids by experiment, family."""
    rng = np.random.default_rng(14)
    ids: dict[str, dict[str, str]] = {"lens": {}, "blocking": {}, "ablation": {}}
    with ResultsDB(path) as db:
        for image_id in IMAGES:
            db.add_image(
                image_id,
                f"{image_id}.png",
                8,
                8,
                "coco",
                annotations=[
                    {
                        "id": image_id,
                        "category_id": 17,
                        "category": "cat",
                        "area": 64.0,
                        "bbox": [0, 0, 8, 8],
                        "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]],
                    }
                ],
            )
        for family, depth in LENS_DEPTHS.items():
            model = HOSTILE_MODEL if family == "qwen2-vl" else f"tiny/{family}"
            run = db.start_run("lens", model, {"family": family}, _config(family))
            for image_id in IMAGES:
                # Hits grow with depth, at a different rate per image: intervals are not points.
                p = np.linspace(0.0, 0.9, depth + 1)[:, None] * rng.uniform(0.3, 1.0)
                hits = rng.random((depth + 1, GRID * GRID)) < p
                db.write_image_results(run, image_id, _lens_tables(run, image_id, depth + 1, hits))
            db.finish_run(run)
            ids["lens"][family] = run
        for family, depth in BLOCKING_DEPTHS.items():
            run = db.start_run("blocking", f"tiny/{family}", {"family": family}, _config(family, window=2))
            for image_id in IMAGES:
                db.write_image_results(run, image_id, {"run_images": _marker(run, image_id, 7, depth)})
                rows = [(None, None, "baseline", "none", "none", bool(rng.random() < 0.8), 0.7)]
                for start in range(depth):
                    correct = bool(rng.random() < 0.3 + 0.7 * start / depth)
                    rows.append((start, min(start + 1, depth - 1), "sliding", "object_1", "last", correct, 0.5))
                for start, end, kind, source, target, correct, prob in rows:
                    db.sql(
                        "INSERT INTO blocking (run_id, image_id, category, source, target, layer_start, layer_end, "
                        "window_kind, correct, question, predicted_token, target_token, target_prob) "
                        "VALUES (?, ?, 'cat', ?, ?, ?, ?, ?, ?, 'What?', 'x', 'cat', ?)",
                        [run, image_id, source, target, start, end, kind, correct, prob],
                    )
            db.finish_run(run)
            ids["blocking"][family] = run
        for family in LENS_DEPTHS:
            run = db.start_run("ablation", f"tiny/{family}", {"family": family}, _config(family))
            for image_id in IMAGES:
                for condition, flip in (("none", 0.0), ("object_1", 0.7), ("random_3", 0.1)):
                    correct = bool(rng.random() >= flip) if condition != "none" else image_id != IMAGES[0]
                    db.sql(
                        "INSERT INTO ablations (run_id, image_id, category, condition, setting, positions, n_ablated, "
                        "correct) VALUES (?, ?, 'cat', ?, 'vqa', [2, 3], 2, ?)",
                        [run, image_id, condition, correct],
                    )
            db.finish_run(run)
            ids["ablation"][family] = run
    return ids


@pytest.fixture(scope="module")
def two_families(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, dict[str, str]]]:
    root = tmp_path_factory.mktemp("depth")
    db_path = root / "results.duckdb"
    ids = _make_two_family_db(db_path)
    out = root / "site"
    build_site(db_path, out)
    return db_path, out, ids


def _plot_box(svg: Node) -> tuple[float, float, float, float, float]:
    return tuple(  # type: ignore[return-value]
        float(svg.attrs[k])
        for k in ("data-plot-left", "data-plot-width", "data-plot-top", "data-plot-height", "data-y-max")
    )


def _run_keys(dom: Node) -> dict[str, str]:
    """Run id -> its data-run key, from the run picker."""
    keys = {}
    for label in dom.find_all("label", class_="depth-run"):
        run_id = label.find_all("code")[0].text()
        keys[run_id] = label.attrs["data-run"]
    return keys


def test_lens_hit_rates_of_two_families_at_relative_depth(two_families) -> None:
    db_path, out, ids = two_families
    dom = parse(out / "depth.html")
    keys = _run_keys(dom)
    [svg] = [s for s in dom.find_all("svg") if s.attrs.get("data-chart") == "lens-top1"]
    left, plot_w, top, plot_h, y_max = _plot_box(svg)
    with ResultsDB(db_path, read_only=True) as db:
        for family, depth in LENS_DEPTHS.items():
            run = ids["lens"][family]
            # Hits per image and layer, straight from the raw lens rows (4 object positions each).
            counts = dict(
                ((int(i), int(layer)), int(n))
                for i, layer, n in db.sql(
                    "SELECT image_id, layer, count(*) FILTER (WHERE token = '\u2581cat') FROM logit_lens l "
                    "JOIN positions p USING (run_id, image_id, position) WHERE run_id = ? AND p.kind = 'image' "
                    "GROUP BY ALL",
                    [run],
                )
            )
            hits = np.array([[counts[(i, layer)] for layer in range(depth + 1)] for i in IMAGES], dtype=float)
            positions = np.full_like(hits, GRID * GRID)
            low, high = bootstrap_ratio_ci(hits, positions, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
            [group] = [g for g in svg.find_all("g", class_="run-series") if g.attrs["data-run"] == keys[run]]
            dots = group.find_all("circle", class_="dot")
            whiskers = group.find_all("line", class_="ci")
            assert len(dots) == len(whiskers) == depth + 1
            share = hits.sum(axis=0) / positions.sum(axis=0)
            for layer, (dot, whisker) in enumerate(zip(dots, whiskers)):
                # x of hidden state `layer` of a model with `depth` decoder layers: layer / depth.
                assert float(dot.attrs["cx"]) == pytest.approx(left + plot_w * layer / depth, abs=0.006)
                assert float(dot.attrs["cy"]) == pytest.approx(top + plot_h * (1 - share[layer] / y_max), abs=0.006)
                assert float(whisker.attrs["data-low"]) == pytest.approx(low[layer], abs=1e-12)
                assert float(whisker.attrs["data-high"]) == pytest.approx(high[layer], abs=1e-12)
                assert float(whisker.attrs["y2"]) == pytest.approx(top + plot_h * (1 - high[layer] / y_max), abs=0.006)
                assert f"n = {len(IMAGES)} images, {len(IMAGES) * GRID * GRID} positions" in dot.text()
            assert any(low[layer] < high[layer] for layer in range(depth + 1))  # real intervals, not points
    # Both families are named, the hostile model id only escaped.
    html = (out / "depth.html").read_text(encoding="utf-8")
    labels = {label.attrs["data-run"]: label.text() for label in dom.find_all("label", class_="depth-run")}
    assert "llava-1.5" in labels[keys[ids["lens"]["llava-1.5"]]]
    assert (
        "qwen2-vl" in labels[keys[ids["lens"]["qwen2-vl"]]] and HOSTILE_MODEL in labels[keys[ids["lens"]["qwen2-vl"]]]
    )
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#34;m&#34;)" in html


def test_blocking_curves_and_flip_rates_of_two_families(two_families) -> None:
    db_path, out, ids = two_families
    dom = parse(out / "depth.html")
    keys = _run_keys(dom)
    [svg] = [s for s in dom.find_all("svg") if s.attrs.get("data-chart") == "blocking-1"]
    left, plot_w, top, plot_h, y_max = _plot_box(svg)
    with ResultsDB(db_path, read_only=True) as db:
        for family, depth in BLOCKING_DEPTHS.items():
            run = ids["blocking"][family]
            rows = db.sql(
                "SELECT b.image_id, b.layer_start, b.correct, base.correct FROM blocking b JOIN blocking base "
                "ON base.run_id = b.run_id AND base.image_id = b.image_id AND base.window_kind = 'baseline' "
                "WHERE b.run_id = ? AND b.window_kind = 'sliding'",
                [run],
            )
            correct = np.zeros((len(IMAGES), depth))
            base = np.zeros((len(IMAGES), depth))
            for image_id, start, ok, base_ok in rows:
                correct[IMAGES.index(image_id), start], base[IMAGES.index(image_id), start] = ok, base_ok
            low, high = bootstrap_ratio_ci(correct, base, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
            [group] = [g for g in svg.find_all("g", class_="run-series") if g.attrs["data-run"] == keys[run]]
            dots, whiskers = group.find_all("circle", class_="dot"), group.find_all("line", class_="ci")
            assert len(dots) == len(whiskers) == depth
            for start, (dot, whisker) in enumerate(zip(dots, whiskers)):
                assert float(dot.attrs["cx"]) == pytest.approx(left + plot_w * start / depth, abs=0.006)
                relative = correct[:, start].sum() / base[:, start].sum()
                assert float(dot.attrs["cy"]) == pytest.approx(top + plot_h * (1 - relative / y_max), abs=0.006)
                assert float(whisker.attrs["data-low"]) == pytest.approx(low[start], abs=1e-12)
                assert float(whisker.attrs["data-high"]) == pytest.approx(high[start], abs=1e-12)
                assert dot.attrs["data-n"] == f"{len(IMAGES)} images"
            # The run's own page draws the same intervals over window start layers.
            run_svg = [
                s
                for s in parse(run_page(out, "blocking", run)).find_all("svg")
                if s.attrs.get("data-measure") == "relative_accuracy"
            ][0]
            [series] = run_svg.find_all("g", class_="series")
            drawn = [
                (float(w.attrs["data-low"]), float(w.attrs["data-high"])) for w in series.find_all("line", class_="ci")
            ]
            assert drawn == [(pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12)) for lo, hi in zip(low, high)]
        # Ablation: one bar per run and condition, whiskers the Wilson interval of the raw counts.
        [bars_svg] = [s for s in dom.find_all("svg") if s.attrs.get("data-chart") == "ablation-1"]
        for family in LENS_DEPTHS:
            run = ids["ablation"][family]
            for condition, n, flipped in db.sql(
                "SELECT a.condition, count(*), count(*) FILTER (WHERE NOT a.correct) FROM ablations a "
                "JOIN ablations b ON b.run_id = a.run_id AND b.image_id = a.image_id AND b.setting = a.setting "
                "AND b.condition = 'none' AND b.correct WHERE a.run_id = ? AND a.condition <> 'none' GROUP BY 1",
                [run],
            ):
                [bar] = [
                    g
                    for g in bars_svg.find_all("g", class_="bar")
                    if g.attrs["data-run"] == keys[run] and g.attrs["data-condition"] == condition
                ]
                [whisker] = bar.find_all("line", class_="ci")
                wilson_low, wilson_high = wilson_interval(flipped, n)
                assert float(whisker.attrs["data-low"]) == pytest.approx(100 * wilson_low, abs=1e-9)
                assert float(whisker.attrs["data-high"]) == pytest.approx(100 * wilson_high, abs=1e-9)
                assert int(whisker.attrs["data-n"]) == n == len(IMAGES) - 1
    # Every run is selectable, and every mark of a run carries its key.
    boxes = {i.attrs["value"] for i in dom.find_all("input") if i.attrs.get("type") == "checkbox"}
    assert boxes == set(keys.values()) and len(boxes) == 6
    assert 'href="depth.html"' in (out / "index.html").read_text(encoding="utf-8")


def _charts_carry_intervals_and_n(page: Path) -> int:
    dom = parse(page)
    # A chart: an SVG with points or bars (legend swatches have neither).
    charts = [s for s in dom.find_all("svg") if s.find_all("g", class_="bar") or s.find_all("circle")]
    for svg in charts:
        assert svg.find_all("line", class_="ci"), page
        marks = svg.find_all("circle") or svg.find_all("g", class_="bar")
        assert all("n = " in m.text() for m in marks), page
    return len(charts)


def test_every_chart_of_the_experiment_pages_carries_intervals_and_n(two_families) -> None:
    _, out, ids = two_families
    pages = [out / "quantitative.html", out / "depth.html"]
    pages += [run_page(out, "ablation", run) for run in ids["ablation"].values()]
    pages += [run_page(out, "blocking", run) for run in ids["blocking"].values()]
    for page in pages:
        assert _charts_carry_intervals_and_n(page) >= 1, page
    captions = " ".join(f.text() for page in pages for f in parse(page).find_all("figcaption"))
    assert f"{BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}" in captions and "Wilson" in captions


def test_two_families_tiny_lens_runs_share_the_relative_depth_axis(
    tiny_checkpoints, family_checkpoint, demo_images, tmp_path
) -> None:
    from collector.images import folder_images
    from collector.lens.experiment import collect_lens
    from collector.loading import load_model

    image_dir, annotation_file = demo_images
    records = folder_images(image_dir, annotation_file)[:2]
    db_path = tmp_path / "r.duckdb"
    with ResultsDB(db_path) as db:
        for path in (tiny_checkpoints["llava-1.5"], family_checkpoint("qwen2-vl")):
            loaded = load_model(str(path), device="cpu", dtype="float32")
            collect_lens(loaded, records, db, progress=False)
    build_site(db_path, tmp_path / "site")
    dom = parse(tmp_path / "site" / "depth.html")
    [svg] = [s for s in dom.find_all("svg") if s.attrs.get("data-chart") == "lens-top1"]
    left, plot_w, *_ = _plot_box(svg)
    keys = _run_keys(dom)
    labels = {label.attrs["data-run"]: label.text().strip() for label in dom.find_all("label", class_="depth-run")}
    with ResultsDB(db_path, read_only=True) as db:
        states = dict(db.sql("SELECT run_id, max(n_layers) FROM run_images GROUP BY 1"))
        families = dict(db.sql("SELECT run_id, json_extract_string(config, 'family') FROM runs"))
    # Each run is labelled by the family its loader recorded.
    assert sorted(families.values()) == ["llava-1.5", "qwen2-vl"]
    for run_id, family in families.items():
        assert labels[keys[run_id]].startswith(f"{family} \u00b7 ")
    assert len(states) == 2 and len(set(states.values())) == 2  # different depths: the axis must normalise
    for run_id, n_states in states.items():
        [group] = [g for g in svg.find_all("g", class_="run-series") if g.attrs["data-run"] == keys[run_id]]
        xs = [float(d.attrs["cx"]) for d in group.find_all("circle", class_="dot")]
        assert xs == pytest.approx([left + plot_w * layer / (n_states - 1) for layer in range(n_states)], abs=0.006)


@pytest.mark.browser  # Chromium through Playwright, from file://
def test_checkboxes_choose_the_runs_drawn(browser, two_families) -> None:
    _, out, _ = two_families
    watched = Watched(browser, out.resolve().as_uri() + "/")

    def hidden_runs(page) -> set[str]:
        # Marks of a run: chart groups and bars (display="none") and rows of the n tables (hidden).
        return set(
            page.evaluate(
                """() => [...document.querySelectorAll("[data-run]:not(.depth-run)")]
                    .filter(e => e.getAttribute("display") === "none" || e.hidden)
                    .map(e => e.dataset.run)"""
            )
        )

    try:
        page = watched.goto("depth.html")
        assert hidden_runs(page) == set()
        page.locator('#run-picker input[value="run-1"]').uncheck()
        assert hidden_runs(page) == {"run-1"}
        assert page.evaluate("location.hash") == "#hide=run-1"
        # run-1 (the second lens run) is in both lens charts and both of their n tables.
        assert page.locator('svg [data-run="run-1"][display="none"]').count() == 2
        assert page.locator('tr[data-run="run-1"][hidden]').count() == 2
        page.locator("#runs-none").click()
        assert hidden_runs(page) == {f"run-{i}" for i in range(6)}
        page.locator("#runs-all").click()
        assert hidden_runs(page) == set() and page.evaluate("location.hash") == ""
        # A link with #hide= shows those runs hidden and their boxes cleared: followed on the
        # page (only the hash changes) and loaded afresh.
        page = watched.goto("depth.html#hide=run-0,run-4")
        assert hidden_runs(page) == {"run-0", "run-4"}
        page.reload()
        assert hidden_runs(page) == {"run-0", "run-4"}
        assert not page.locator('#run-picker input[value="run-4"]').is_checked()
        assert page.locator('#run-picker input[value="run-1"]').is_checked()
        watched.check()
    finally:
        watched.context.close()
