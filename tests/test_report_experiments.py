"""Dedicated ablation and blocking pages: numbers, overlays, escaping, links (no browser).

`make_experiment_db` writes a synthetic database through ResultsDB with realistic
numbers: an ablation run (three settings, every condition, one column-major image so the
overlay must follow the positions table, hostile answers/categories/tokens, skipped
images), a blocking run (8 layers, sliding windows and presets, two targets, three
source sets) and a demo blocking run whose baseline accuracy is 0 (relative accuracy
null everywhere). tests/test_site_browser.py reuses it.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from db.stats import wilson_interval
from db.store import ResultsDB
from report.build import build_site, run_dir_name

HOSTILE = "</script><img src=x onerror=alert(1)>"
QUOTES = "\"&<>'"
HOSTILE_STRINGS = (HOSTILE, QUOTES, "<img src=x", "\u2028")
GRID = 6
N_TEXT_BEFORE = 3
SETTINGS = ("generative", "polling", "vqa")
CONDITIONS = ("none", "object_0", "object_1", "object_2", "register", "random_5", "gradient_5", "image_noise")
FLIP_P = {
    "none": 0.0,
    "object_0": 0.3,
    "object_1": 0.55,
    "object_2": 0.75,
    "register": 0.1,
    "random_5": 0.05,
    "gradient_5": 0.4,
    "image_noise": 0.9,
}
ABLATION_IMAGES = (201, 202, 203, 204, 205, 206)
COLUMN_MAJOR_IMAGE = 202
HOSTILE_IMAGE = 203
BLOCK_IMAGES = (301, 302, 303, 304)
N_LAYERS = 8
WINDOW = 3
PRESETS = {"early": (0, 1), "early_mid": (1, 3), "mid": (2, 5), "mid_late": (4, 6), "late": (6, 7), "all": (0, 7)}
SOURCES = ("object_0", "object_1", "image_minus_object_1")
TARGETS = ("last", "last_row")


def _png(object_cells: set[tuple[int, int]], size: int = 96) -> bytes:
    image = Image.new("RGB", (size, size), (70, 110, 90))
    draw = ImageDraw.Draw(image)
    step = size / GRID
    for r, c in object_cells:
        draw.rectangle([c * step + 2, r * step + 2, (c + 1) * step - 2, (r + 1) * step - 2], fill=(230, 190, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _layout(image_id: int, column_major: bool) -> tuple[list[tuple], dict[tuple[int, int], int], int]:
    """Rows of the positions table (text, GRID x GRID image block, text) and patch -> position."""
    rows: list[tuple] = [("text", None, None, "USER"), ("text", None, None, ":"), ("text", None, None, "<image>")]
    patch_position = {}
    for i in range(GRID * GRID):
        r, c = (i % GRID, i // GRID) if column_major else (i // GRID, i % GRID)
        patch_position[(r, c)] = len(rows)
        rows.append(("image", r, c, f"<IMG{i + 1:03d}>"))
    rows += [("text", None, None, "What"), ("text", None, None, "?"), ("text", None, None, " a")]
    return rows, patch_position, len(rows) - 1


def _positions_table(run_id: str, image_id: int, rows: list[tuple]) -> pa.Table:
    return pa.table(
        {
            "run_id": [run_id] * len(rows),
            "image_id": pa.array([image_id] * len(rows), pa.int64()),
            "position": pa.array(range(len(rows)), pa.int32()),
            "kind": [r[0] for r in rows],
            "patch_row": pa.array([r[1] for r in rows], pa.int32()),
            "patch_col": pa.array([r[2] for r in rows], pa.int32()),
            "label": [r[3] for r in rows],
            "token_id": pa.array(range(len(rows)), pa.int32()),
        }
    )


def _view(run_id: str, image_id: int, object_cells: set[tuple[int, int]]) -> pa.Table:
    return pa.table(
        {
            "run_id": [run_id],
            "image_id": pa.array([image_id], pa.int64()),
            "png": pa.array([_png(object_cells)], pa.binary()),
            "view_width": [96],
            "view_height": [96],
            "scale_x": [0.2],
            "scale_y": [0.2],
            "offset_x": [0.0],
            "offset_y": [0.0],
        }
    )


def _marker(run_id: str, image_id: int, n_positions: int, n_layers: int | None) -> pa.Table:
    return pa.table(
        {
            "run_id": [run_id],
            "image_id": pa.array([image_id], pa.int64()),
            "n_positions": [n_positions],
            "n_layers": pa.array([n_layers], pa.int32()),
            "grid_rows": [GRID],
            "grid_cols": [GRID],
            "written_at": [dt.datetime(2025, 3, 4, 5, 6, 7)],
        }
    )


def _dilate(cells: set[tuple[int, int]], rings: int) -> set[tuple[int, int]]:
    out = set(cells)
    for _ in range(rings):
        out |= {
            (r + dr, c + dc)
            for r, c in out
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if 0 <= r + dr < GRID and 0 <= c + dc < GRID
        }
    return out


def _object(image_id: int) -> set[tuple[int, int]]:
    r0, c0 = 1 + image_id % 3, image_id // 3 % 3  # a horizontal bar: not symmetric under transposition
    return {(r0, c0), (r0, c0 + 1), (r0, c0 + 2), (r0 + 1, c0)}


def _skip(run_id: str, image_id: int, reason: str, detail: str) -> dict[str, pa.Table]:
    return {
        "skipped": pa.table(
            {"run_id": [run_id], "image_id": pa.array([image_id], pa.int64()), "reason": [reason], "detail": [detail]}
        ),
        "run_images": _marker(run_id, image_id, 0, None),
    }


def _ablation_run(db: ResultsDB, rng: np.random.Generator) -> str:
    run_id = db.start_run(
        "ablation",
        "llava-hf/llava-1.5-7b-hf",
        {"model_id": "ablation-test"},
        {"model_id": "llava-hf/llava-1.5-7b-hf", "revision": "abc123", "dtype": "float16"},
    )
    for image_id in ABLATION_IMAGES:
        category = HOSTILE if image_id == HOSTILE_IMAGE else ("cat" if image_id % 2 else "dog")
        rows, patch_position, _ = _layout(image_id, column_major=image_id == COLUMN_MAJOR_IMAGE)
        obj = _object(image_id)
        cell_sets = {
            "none": [],
            "object_0": sorted(obj),
            "object_1": sorted(_dilate(obj, 1)),
            "object_2": sorted(_dilate(obj, 2)),
            "register": [(0, 5), (5, 0)],
            "image_noise": [],
        }
        all_cells = sorted(patch_position)
        rec: dict[str, list] = {
            k: []
            for k in (
                "condition",
                "setting",
                "positions",
                "n_ablated",
                "correct",
                "answer",
                "question",
                "predicted_token",
                "predicted_prob",
                "target_token",
                "target_prob",
                "seed",
            )
        }
        for setting in SETTINGS:
            baseline_ok = bool(rng.random() < 0.8)
            for condition in CONDITIONS:
                if condition in cell_sets:
                    cells = cell_sets[condition]
                else:  # random_5 / gradient_5 differ per setting
                    picks = rng.choice(len(all_cells), size=5, replace=False)
                    cells = [all_cells[i] for i in sorted(picks)]
                positions = [patch_position[c] for c in cells]
                correct = baseline_ok and not (condition != "none" and rng.random() < FLIP_P[condition])
                name = "cat" if image_id % 2 else "dog"
                answer = (
                    HOSTILE
                    if image_id == HOSTILE_IMAGE and condition == "object_1"
                    else f"A {name} sitting on a sofa."
                    if correct
                    else "A blurry picture of a room."
                )
                rec["condition"].append(condition)
                rec["setting"].append(setting)
                rec["positions"].append(positions)
                rec["n_ablated"].append(len(positions))
                rec["correct"].append(correct)
                rec["seed"].append(1234 if condition.startswith("random") or condition == "image_noise" else None)
                if setting == "vqa":
                    rec["answer"].append(None)
                    rec["question"].append(
                        "What animal is in the image?" + (QUOTES if image_id == HOSTILE_IMAGE else "")
                    )
                    token = (
                        HOSTILE
                        if image_id == HOSTILE_IMAGE and condition == "object_2"
                        else (name if correct else "room")
                    )
                    rec["predicted_token"].append(token)
                    rec["predicted_prob"].append(float(rng.uniform(0.2, 0.9)))
                    rec["target_token"].append(name)
                    rec["target_prob"].append(float(rng.uniform(0.01, 0.9)))
                else:
                    rec["answer"].append(answer if setting == "generative" else ("Yes" if correct else "No"))
                    rec["question"].append("Describe the image." if setting == "generative" else f"Is there a {name}?")
                    for key in ("predicted_token", "predicted_prob", "target_token", "target_prob"):
                        rec[key].append(None)
        n = len(rec["condition"])
        ablations = pa.table(
            {
                "run_id": [run_id] * n,
                "image_id": pa.array([image_id] * n, pa.int64()),
                "category": [category] * n,
                **{k: v for k, v in rec.items() if k not in ("positions", "n_ablated", "seed")},
                "positions": pa.array(rec["positions"], pa.list_(pa.int32())),
                "n_ablated": pa.array(rec["n_ablated"], pa.int32()),
                "seed": pa.array(rec["seed"], pa.int64()),
            }
        )
        db.write_image_results(
            run_id,
            image_id,
            {
                "positions": _positions_table(run_id, image_id, rows),
                "image_views": _view(run_id, image_id, obj),
                "ablations": ablations,
                "run_images": _marker(run_id, image_id, len(rows), None),
            },
        )
    db.write_image_results(run_id, 207, _skip(run_id, 207, "too_many_annotations", "5 annotations"))
    db.write_image_results(run_id, 208, _skip(run_id, 208, "too_many_annotations", "4 annotations"))
    db.write_image_results(run_id, 209, _skip(run_id, 209, "object_outside_view", HOSTILE))
    db.finish_run(run_id)
    return run_id


def _blocking_run(db: ResultsDB, rng: np.random.Generator, *, demo: bool) -> str:
    model = "llava-hf/llava-1.5-7b-hf"
    config = {"model_id": model, "revision": "abc123", "window": WINDOW, **({"demo": True} if demo else {})}
    run_id = db.start_run("blocking", model, {"model_id": model, "demo": demo}, config)
    windows = [("preset", name, a, b) for name, (a, b) in PRESETS.items()]
    windows += [("sliding", None, s, min(s + WINDOW - 1, N_LAYERS - 1)) for s in range(N_LAYERS)]
    for image_id in BLOCK_IMAGES[: 2 if demo else 4]:
        name = HOSTILE if image_id == 302 else "giraffe"
        rows, patch_position, last = _layout(image_id, column_major=image_id == 303)
        obj = _object(image_id)
        all_cells = set(patch_position)
        source_cells = {
            "object_0": obj,
            "object_1": _dilate(obj, 1),
            "image_minus_object_1": all_cells - _dilate(obj, 1),
        }
        target_positions = {"last": [last], "last_row": sorted(patch_position[(GRID - 1, c)] for c in range(GRID))}
        baseline_ok = not demo and image_id != 304
        rec: list[dict[str, Any]] = [
            {
                "source": "none",
                "target": "none",
                "layer_start": None,
                "layer_end": None,
                "window_kind": "baseline",
                "preset": None,
                "correct": baseline_ok,
                "predicted_token": name if baseline_ok else "animal",
                "predicted_prob": 0.6,
                "target_prob": 0.6 if baseline_ok else 0.05,
                "source_positions": None,
                "target_positions": None,
            }
        ]
        for target in TARGETS:
            for source in SOURCES:
                for kind, preset, start, end in windows:
                    hit = target == "last" and source != "image_minus_object_1" and start <= 4 and end >= 2
                    strength = {"object_0": 0.35, "object_1": 0.7, "image_minus_object_1": 0.1}[source]
                    prob = max(0.001, (0.6 if baseline_ok else 0.05) * (1 - strength * hit) + rng.normal(0, 0.02))
                    correct = baseline_ok and not (hit and rng.random() < strength)
                    token = (
                        HOSTILE
                        if image_id == 302 and source == "object_1" and start == 2
                        else (name if correct else "animal")
                    )
                    rec.append(
                        {
                            "source": source,
                            "target": target,
                            "layer_start": start,
                            "layer_end": end,
                            "window_kind": kind,
                            "preset": preset,
                            "correct": correct,
                            "predicted_token": token,
                            "predicted_prob": float(rng.uniform(0.2, 0.8)),
                            "target_prob": float(prob),
                            "source_positions": sorted(patch_position[c] for c in source_cells[source]),
                            "target_positions": target_positions[target],
                        }
                    )
        n = len(rec)
        blocking = pa.table(
            {
                "run_id": [run_id] * n,
                "image_id": pa.array([image_id] * n, pa.int64()),
                "category": [name] * n,
                "source": [r["source"] for r in rec],
                "target": [r["target"] for r in rec],
                "layer_start": pa.array([r["layer_start"] for r in rec], pa.int32()),
                "layer_end": pa.array([r["layer_end"] for r in rec], pa.int32()),
                "window_kind": [r["window_kind"] for r in rec],
                "preset": [r["preset"] for r in rec],
                "correct": [r["correct"] for r in rec],
                "question": ["What is the animal?" + QUOTES] * n,
                "predicted_token": [r["predicted_token"] for r in rec],
                "predicted_prob": pa.array([r["predicted_prob"] for r in rec], pa.float32()),
                "target_token": [" " + ("giraffe" if image_id != 302 else HOSTILE)] * n,
                "target_prob": pa.array([r["target_prob"] for r in rec], pa.float32()),
                "source_positions": pa.array([r["source_positions"] for r in rec], pa.list_(pa.int32())),
                "target_positions": pa.array([r["target_positions"] for r in rec], pa.list_(pa.int32())),
            }
        )
        db.write_image_results(
            run_id,
            image_id,
            {
                "positions": _positions_table(run_id, image_id, rows),
                "image_views": _view(run_id, image_id, obj),
                "blocking": blocking,
                "run_images": _marker(run_id, image_id, len(rows), N_LAYERS),
            },
        )
    if not demo:
        db.write_image_results(run_id, 305, _skip(run_id, 305, "baseline_incorrect", "predicted ' animal'"))
    db.finish_run(run_id)
    return run_id


def make_experiment_db(path: Path) -> dict[str, str]:
    """The synthetic database (see the module docstring); returns run ids by name."""
    rng = np.random.default_rng(7)
    with ResultsDB(path) as db:
        for image_id in (*ABLATION_IMAGES, 207, 208, 209, *BLOCK_IMAGES, 305):
            db.add_image(
                image_id, (HOSTILE if image_id == HOSTILE_IMAGE else "") + f"{image_id:012d}.jpg", 480, 480, "coco"
            )
        ablation = _ablation_run(db, rng)
        blocking = _blocking_run(db, rng, demo=False)
        demo = _blocking_run(db, rng, demo=True)
    return {"ablation": ablation, "blocking": blocking, "demo_blocking": demo}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("experiments")
    db_path = root / "results.duckdb"
    run_ids = make_experiment_db(db_path)
    out = root / "site"
    build_site(db_path, out)
    return db_path, out, run_ids


# -- a minimal DOM over html.parser ----------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        def ok(node: Node) -> bool:
            for key, value in attrs.items():
                key = key.replace("_", "-").rstrip("-")
                if key == "class":
                    if value not in (node.attrs.get("class") or "").split():
                        return False
                elif node.attrs.get(key) != value:
                    return False
            return True

        return [n for n in self.iter() if (tag == "*" or n.tag == tag) and ok(n)]


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs), self.current)
        self.current.children.append(node)
        if tag not in _VOID:
            self.current = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.current.children.append(Node(tag, dict(attrs), self.current))

    def handle_endtag(self, tag: str) -> None:
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


def parse(path: Path) -> Node:
    builder = _TreeBuilder()
    builder.feed(path.read_text(encoding="utf-8"))
    return builder.root


def overlay_data(path: Path) -> dict[str, Any]:
    match = re.search(
        r'<script type="application/json" id="overlay-data">(.*?)</script>', path.read_text(encoding="utf-8"), re.DOTALL
    )
    assert match, path
    return json.loads(match.group(1))


def run_page(out: Path, experiment: str, run_id: str) -> Path:
    return out / "experiments" / f"{experiment}-{run_dir_name(run_id)}.html"


def image_page(out: Path, experiment: str, run_id: str, image_id: int) -> Path:
    return out / "experiments" / f"{experiment}-{run_dir_name(run_id)}" / f"{image_id}.html"


# -- tests -------------------------------------------------------------------------------------


def test_pages_exist_per_run_and_image(site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, run_ids = site
    with ResultsDB(db_path, read_only=True) as db:
        for name, experiment, table in (
            ("ablation", "ablation", "ablations"),
            ("blocking", "blocking", "blocking"),
            ("demo_blocking", "blocking", "blocking"),
        ):
            run_id = run_ids[name]
            assert run_page(out, experiment, run_id).is_file()
            images = [
                i for (i,) in db.sql(f"SELECT DISTINCT image_id FROM {table} WHERE run_id = ? ORDER BY 1", [run_id])
            ]
            folder = run_page(out, experiment, run_id).with_suffix("")
            assert sorted(p.name for p in folder.glob("*.html")) == sorted(f"{i}.html" for i in images)
            for image_id in images:
                (png,) = db.sql("SELECT png FROM image_views WHERE run_id = ? AND image_id = ?", [run_id, image_id])[0]
                assert (folder / f"{image_id}.png").read_bytes() == bytes(png)
            # The run page links every image page.
            hrefs = {
                a.attrs["href"] for a in parse(run_page(out, experiment, run_id)).find_all("a") if "href" in a.attrs
            }
            assert {f"{folder.name}/{i}.html" for i in images} <= hrefs
    assert not (out / "experiments" / f"ablation-{run_dir_name(run_ids['ablation'])}" / "207.html").exists()


def test_ablation_summary_equals_the_view(site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, run_ids = site
    run_id = run_ids["ablation"]
    with ResultsDB(db_path, read_only=True) as db:
        rows = db.sql(
            "SELECT setting, condition, n_baseline_correct, n_flipped, pct_flipped, mean_tokens_ablated, "
            "pct_flipped_ci_low, pct_flipped_ci_high FROM ablation_summary WHERE run_id = ?",
            [run_id],
        )
    assert len(rows) > 20 and any(0 < r[4] < 100 for r in rows)  # the fixture has realistic numbers
    dom = parse(run_page(out, "ablation", run_id))
    shown = {}
    for table in dom.find_all("table", class_="exp-summary"):
        for tr in table.find_all("tr"):
            if "data-condition" not in tr.attrs:
                continue
            tds = tr.find_all("td")
            shown[(table.attrs["data-setting"], tr.attrs["data-condition"])] = (
                int(tds[0].attrs["data-value"]),
                int(tds[1].attrs["data-value"]),
                float(tds[2].attrs["data-value"]),
                float(tds[4].attrs["data-value"]),
                [td.text().strip() for td in tds],
                (json.loads(tds[3].attrs["data-low"]), json.loads(tds[3].attrs["data-high"])),
            )
    assert set(shown) == {(r[0], r[1]) for r in rows}
    for setting, condition, n_base, n_flipped, pct, mean_tokens, ci_low, ci_high in rows:
        got = shown[(setting, condition)]
        assert got[:4] == (n_base, n_flipped, pct, mean_tokens)  # exactly the view's values
        if condition == "none":  # nothing ablated: a flip rate of 0 by definition, no interval shown
            assert got[5] == (None, None)
            ci_text = ""
        else:
            # The page's Wilson interval (db.stats) equals the view's (SQL) to rounding.
            assert got[5] == (pytest.approx(ci_low, abs=1e-9), pytest.approx(ci_high, abs=1e-9))
            ci_text = f"{ci_low:.1f}\u2013{ci_high:.1f}"
        assert got[4] == [str(n_base), str(n_flipped), f"{pct:.2f}", ci_text, f"{mean_tokens:.2f}"]
    # Tables in reading order: generative, polling, vqa; none first, image_noise last.
    assert [t.attrs["data-setting"] for t in dom.find_all("table", class_="exp-summary")] == list(SETTINGS)
    first = dom.find_all("table", class_="exp-summary")[0]
    conditions = [tr.attrs["data-condition"] for tr in first.find_all("tr") if "data-condition" in tr.attrs]
    assert conditions == [c for c in CONDITIONS if (SETTINGS[0], c) in shown]


def test_ablation_bar_charts(site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, run_ids = site
    run_id = run_ids["ablation"]
    with ResultsDB(db_path, read_only=True) as db:
        rows = db.sql(
            "SELECT setting, condition, n_baseline_correct, n_flipped, pct_flipped FROM ablation_summary "
            "WHERE run_id = ? AND condition <> 'none'",
            [run_id],
        )
        # Flip counts straight from the raw rows, for the intervals (independent of the view).
        raw = {
            (setting, condition): (int(n), int(flipped))
            for setting, condition, n, flipped in db.sql(
                "SELECT a.setting, a.condition, count(*), count(*) FILTER (WHERE NOT a.correct) FROM ablations a "
                "WHERE a.run_id = ? AND EXISTS (SELECT 1 FROM ablations b WHERE b.run_id = a.run_id "
                "AND b.image_id = a.image_id AND b.setting = a.setting AND b.condition = 'none' AND b.correct) "
                "GROUP BY 1, 2",
                [run_id],
            )
        }
    dom = parse(run_page(out, "ablation", run_id))
    charts = dom.find_all("svg", class_="bar-chart")
    assert [c.attrs["data-setting"] for c in charts] == list(SETTINGS)
    for chart in charts:
        setting = chart.attrs["data-setting"]
        expected = {r[1]: r for r in rows if r[0] == setting}
        bars = chart.find_all("g", class_="bar")
        assert {b.attrs["data-condition"] for b in bars} == set(expected)
        for bar in bars:
            _, _, n_base, n_flipped, pct = expected[bar.attrs["data-condition"]]
            title = bar.find_all("title")[0].text()
            assert f"{n_flipped} of {n_base} baseline-correct answers flipped ({pct:.2f}%" in title
            # The whisker: the Wilson interval of the raw counts, at y = top + h (1 - v / y_max).
            n, flipped = raw[(setting, bar.attrs["data-condition"])]
            low, high = wilson_interval(flipped, n)
            [whisker] = bar.find_all("line", class_="ci")
            assert float(whisker.attrs["data-low"]) == pytest.approx(100 * low, abs=1e-9)
            assert float(whisker.attrs["data-high"]) == pytest.approx(100 * high, abs=1e-9)
            assert int(whisker.attrs["data-n"]) == n and f"n = {n}" in title
            top, plot_h, y_max = (float(chart.attrs[k]) for k in ("data-plot-top", "data-plot-height", "data-y-max"))
            assert float(whisker.attrs["y1"]) == pytest.approx(top + plot_h * (1 - 100 * low / y_max), abs=0.01)
            assert float(whisker.attrs["y2"]) == pytest.approx(top + plot_h * (1 - 100 * high / y_max), abs=0.01)
            assert any(t.text() == f"n={n}" for t in bar.find_all("text"))
            assert bar.find_all("text")[0].text() == f"{pct:.1f}"
            # The bar height is proportional to % flipped (shared y range).
            assert float(bar.find_all("rect")[0].attrs["height"]) >= 0
        assert chart.attrs["xmlns"] == "http://www.w3.org/2000/svg"  # stands alone as a figure


def test_skip_counts_by_reason(site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, run_ids = site
    run_id = run_ids["ablation"]
    with ResultsDB(db_path, read_only=True) as db:
        expected = dict(db.sql("SELECT reason, count(*) FROM skipped WHERE run_id = ? GROUP BY reason", [run_id]))
    assert expected == {"too_many_annotations": 2, "object_outside_view": 1}
    [table] = parse(run_page(out, "ablation", run_id)).find_all("table", class_="exp-skip-counts")
    shown = {
        tr.attrs["data-reason"]: int(tr.find_all("td")[1].text())
        for tr in table.find_all("tr")
        if "data-reason" in tr.attrs
    }
    assert shown == expected


def _db_cells(db: ResultsDB, run_id: str, image_id: int, positions: list[int]) -> set[tuple[int, int]]:
    rows = db.sql(
        "SELECT patch_row, patch_col FROM positions WHERE run_id = ? AND image_id = ? AND kind = 'image' "
        "AND list_contains(?, position)",
        [run_id, image_id, positions],
    )
    return {(r, c) for r, c in rows}


def test_ablation_overlays_mark_the_positions_cells(site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, run_ids = site
    run_id = run_ids["ablation"]
    with ResultsDB(db_path, read_only=True) as db:
        for image_id in ABLATION_IMAGES:
            data = overlay_data(image_page(out, "ablation", run_id, image_id))
            assert (data["grid_rows"], data["grid_cols"]) == (GRID, GRID)
            rows = db.sql(
                "SELECT setting, condition, positions FROM ablations WHERE run_id = ? AND image_id = ?",
                [run_id, image_id],
            )
            overlays = {tuple(o["key"]): o for o in data["overlays"]}
            assert set(overlays) == {(s, c) for s, c, _ in rows}
            for setting, condition, positions in rows:
                cells = {tuple(c) for c in overlays[(setting, condition)]["cells"]}
                assert cells == _db_cells(db, run_id, image_id, positions), (image_id, setting, condition)
                assert len(cells) == len(positions)
            if image_id == COLUMN_MAJOR_IMAGE:
                # Row-major arithmetic on the position index would give other cells.
                setting, condition, positions = next(r for r in rows if r[1] == "object_0")
                naive = {divmod(p - N_TEXT_BEFORE, GRID) for p in positions}
                assert {tuple(c) for c in overlays[(setting, condition)]["cells"]} != naive


def test_ablation_answers_per_setting_and_condition(site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, run_ids = site
    run_id = run_ids["ablation"]
    with ResultsDB(db_path, read_only=True) as db:
        rows = db.sql(
            "SELECT setting, condition, correct, answer, predicted_token, n_ablated FROM ablations "
            "WHERE run_id = ? AND image_id = ?",
            [run_id, HOSTILE_IMAGE],
        )
    dom = parse(image_page(out, "ablation", run_id, HOSTILE_IMAGE))
    cells = {tuple(json.loads(td.attrs["data-select"])): td for td in dom.find_all("td") if "data-select" in td.attrs}
    assert set(cells) == {(r[0], r[1]) for r in rows}
    for setting, condition, correct, answer, predicted, n_ablated in rows:
        td = cells[(setting, condition)]
        marks = td.find_all("span", class_="mark")
        assert len(marks) == 1 and ("mark-ok" in marks[0].attrs["class"]) == correct
        text = td.text()
        assert f"{n_ablated} ablated" in text
        if answer is not None:
            assert td.find_all("div", class_="answer")[0].text() == answer  # the exact text, unescaped by the parser
        if predicted is not None:
            assert predicted in text
    assert HOSTILE in {
        td.find_all("div", class_="answer")[0].text() for td in cells.values() if td.find_all("div", class_="answer")
    }


def _curves(db: ResultsDB, run_id: str) -> list[tuple]:
    return db.sql(
        "SELECT target, source, layer_start, layer_end, n, accuracy, mean_target_prob, relative_accuracy "
        "FROM blocking_curves WHERE run_id = ? AND window_kind = 'sliding' ORDER BY ALL",
        [run_id],
    )


def test_blocking_charts_have_one_series_per_source(site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, run_ids = site
    run_id = run_ids["blocking"]
    with ResultsDB(db_path, read_only=True) as db:
        curves = _curves(db, run_id)
    assert any(r[7] is not None and r[7] < 0.8 for r in curves)  # a visible dip
    dom = parse(run_page(out, "blocking", run_id))
    charts = dom.find_all("svg", class_="line-chart")
    assert sorted((c.attrs["data-target"], c.attrs["data-measure"]) for c in charts) == sorted(
        (t, m) for t in TARGETS for m in ("relative_accuracy", "mean_target_prob")
    )
    for chart in charts:
        target, measure = chart.attrs["data-target"], chart.attrs["data-measure"]
        column = 7 if measure == "relative_accuracy" else 6
        series = chart.find_all("g", class_="series")
        assert sorted(g.attrs["data-series"] for g in series) == sorted(SOURCES)
        assert not chart.find_all("text", class_="chart-empty")
        for g in series:
            expected = [
                r for r in curves if r[0] == target and r[1] == g.attrs["data-series"] and r[column] is not None
            ]
            titles = [c.find_all("title")[0].text() for c in g.find_all("circle")]
            assert len(titles) == len(expected) == N_LAYERS
            for title, row in zip(titles, expected):
                assert (
                    f"layers {row[2]}–{row[3]}:" in title and f"{row[column]:.4g}" in title and f"n = {row[4]}" in title
                )
        legend = [t.text() for t in chart.find_all("g", class_="legend")[0].find_all("text")]
        assert legend == [g.attrs["data-series"] for g in series]


def test_blocking_presets_equal_the_view(site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, run_ids = site
    run_id = run_ids["blocking"]
    with ResultsDB(db_path, read_only=True) as db:
        rows = db.sql(
            "SELECT target, source, preset, layer_start, layer_end, n, accuracy, relative_accuracy, "
            "mean_target_prob FROM blocking_curves WHERE run_id = ? AND window_kind = 'preset'",
            [run_id],
        )
    assert len(rows) == len(TARGETS) * len(SOURCES) * len(PRESETS)
    dom = parse(run_page(out, "blocking", run_id))
    shown = {}
    for table in dom.find_all("table", class_="exp-presets"):
        body = [tr for tr in table.find_all("tr") if "data-preset" in tr.attrs]
        assert [tr.attrs["data-preset"] for tr in body if tr.attrs["data-source"] == "object_1"] == list(PRESETS)
        for tr in body:
            tds = tr.find_all("td")
            values = [json.loads(td.attrs["data-value"]) for td in tds[3:] if "data-value" in td.attrs]
            [accuracy_ci] = [td for td in tds if td.attrs.get("data-measure") == "accuracy"]
            shown[(table.attrs["data-target"], tr.attrs["data-source"], tr.attrs["data-preset"])] = (
                tds[2].text(),
                *values,
                (json.loads(accuracy_ci.attrs["data-low"]), json.loads(accuracy_ci.attrs["data-high"])),
            )
    assert set(shown) == {r[:3] for r in rows}
    for target, source, preset, start, end, n, accuracy, relative, prob in rows:
        wilson = wilson_interval(round(accuracy * n), n)
        assert shown[(target, source, preset)] == (f"{start}–{end}", n, accuracy, relative, prob, wilson)


def test_all_null_relative_accuracy_is_said(site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, run_ids = site
    run_id = run_ids["demo_blocking"]
    with ResultsDB(db_path, read_only=True) as db:
        assert {r[7] for r in _curves(db, run_id)} == {None}
    path = run_page(out, "blocking", run_id)
    dom = parse(path)
    text = path.read_text(encoding="utf-8")
    assert "weights are random: demo output, not results" in text  # demo banner
    assert "The baseline accuracy is 0, so relative accuracy is undefined" in text
    for chart in dom.find_all("svg", class_="line-chart"):
        if chart.attrs["data-measure"] == "relative_accuracy":
            assert not chart.find_all("g", class_="series")
            empty = " ".join(t.text() for t in chart.find_all("text", class_="chart-empty"))
            assert "No relative accuracy to draw" in empty and "baseline accuracy is 0" in empty
        else:
            assert len(chart.find_all("g", class_="series")) == len(SOURCES)
    assert len(dom.find_all("p", class_="chart-note")) == len(TARGETS)
    assert "weights are random" not in run_page(out, "blocking", run_ids["blocking"]).read_text(encoding="utf-8")


def test_blocking_image_page(site: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, run_ids = site
    run_id = run_ids["blocking"]
    with ResultsDB(db_path, read_only=True) as db:
        for image_id in BLOCK_IMAGES:
            path = image_page(out, "blocking", run_id, image_id)
            data = overlay_data(path)
            pairs = db.sql(
                "SELECT DISTINCT target, source, source_positions, target_positions FROM blocking "
                "WHERE run_id = ? AND image_id = ? AND window_kind <> 'baseline'",
                [run_id, image_id],
            )
            overlays = {tuple(o["key"]): o for o in data["overlays"]}
            assert set(overlays) == {(t, s) for t, s, _, _ in pairs}
            for target, source, source_positions, target_positions in pairs:
                o = overlays[(target, source)]
                assert {tuple(c) for c in o["cells"]} == _db_cells(db, run_id, image_id, source_positions)
                assert {tuple(c) for c in o["outline"]} == _db_cells(db, run_id, image_id, target_positions)
            dom = parse(path)
            baseline = db.sql(
                "SELECT predicted_token, target_token, correct FROM blocking WHERE run_id = ? "
                "AND image_id = ? AND window_kind = 'baseline'",
                [run_id, image_id],
            )[0]
            [table] = dom.find_all("table", class_="exp-baseline")
            toks = [c.text() for c in table.find_all("code")]
            assert toks == [baseline[0], baseline[1]]
            assert ("mark-ok" in table.find_all("span", class_="mark")[0].attrs["class"]) == baseline[2]
            windows = db.sql(
                "SELECT target, source, predicted_token, correct FROM blocking WHERE run_id = ? "
                "AND image_id = ? AND window_kind <> 'baseline'",
                [run_id, image_id],
            )
            bodies = dom.find_all("tbody")
            shown = sorted(
                (
                    tuple(json.loads(b.attrs["data-key"])),
                    tr.find_all("code")[0].text(),
                    "mark-ok" in tr.find_all("span", class_="mark")[0].attrs["class"],
                )
                for b in bodies
                if "data-key" in b.attrs
                for tr in b.find_all("tr")
            )
            assert shown == sorted(((t, s), p, c) for t, s, p, c in windows)
        # The text target (the last position) is listed by its label.
        assert "(position 41)" in image_page(out, "blocking", run_id, 301).read_text(encoding="utf-8")


def test_hostile_strings_are_only_escaped(site: tuple[Path, Path, dict[str, str]]) -> None:
    _, out, run_ids = site
    pages = list((out / "experiments").rglob("*.html"))
    assert len(pages) == 3 + len(ABLATION_IMAGES) + len(BLOCK_IMAGES) + 2
    for path in pages + [out / "index.html"]:
        text = path.read_text(encoding="utf-8")
        for hostile in HOSTILE_STRINGS:
            assert hostile not in text, (path, hostile)
    escaped = "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"
    ablation_image = image_page(out, "ablation", run_ids["ablation"], HOSTILE_IMAGE).read_text(encoding="utf-8")
    assert ablation_image.count(escaped) >= 3  # category, file name, answer, predicted token
    assert "&#34;&amp;&lt;&gt;&#39;" in ablation_image  # the question
    blocking_image = image_page(out, "blocking", run_ids["blocking"], 302).read_text(encoding="utf-8")
    assert escaped in blocking_image
    assert escaped in run_page(out, "ablation", run_ids["ablation"]).read_text(
        encoding="utf-8"
    )  # skip detail, category
    # No element came from DB text.
    for path in pages:
        dom = parse(path)
        assert not [n for n in dom.iter() if n.tag == "img" and n.attrs.get("src") == "x"]
        assert not [n for n in dom.iter() if "onerror" in n.attrs]


def test_every_link_resolves_and_is_relative(site: tuple[Path, Path, dict[str, str]]) -> None:
    _, out, run_ids = site
    for page in [out / "index.html", *(out / "experiments").rglob("*.html")]:
        dom = parse(page)
        urls = [n.attrs[a] for n in dom.iter() for a in ("href", "src") if n.attrs.get(a) is not None]
        assert urls, page
        for url in urls:
            parsed = urllib.parse.urlsplit(url)
            assert not url.startswith("/") and not parsed.scheme and not parsed.netloc, (page, url)
            if not parsed.path:  # a fragment on the same page
                assert dom.find_all("*", id=parsed.fragment), (page, url)
                continue
            target = (page.parent / urllib.parse.unquote(parsed.path)).resolve()
            assert target.is_file(), (page, url)
            assert out.resolve() in target.parents, (page, url)
            if parsed.fragment and target == page.resolve():
                assert dom.find_all("*", id=parsed.fragment), (page, url)
    index = (out / "index.html").read_text(encoding="utf-8")
    for experiment, name in (("ablation", "ablation"), ("blocking", "blocking"), ("blocking", "demo_blocking")):
        assert f'href="experiments/{experiment}-{run_dir_name(run_ids[name])}.html"' in index


def test_every_page_has_provenance(site: tuple[Path, Path, dict[str, str]]) -> None:
    _, out, _ = site
    for page in (out / "experiments").rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "Generated by llava-interp" in text and "schema version" in text, page
        assert "static/experiments.js" in text and "static/site.css" in text, page


def test_nav_and_runs_table_link_the_experiment_pages(site: tuple[Path, Path, dict[str, str]]) -> None:
    """Needs the two-line hook in templates/base.html.j2 and index.html.j2 (experiment_nav, run_pages)."""
    from templates import __file__ as templates_init

    folder = Path(templates_init).parent
    if (
        "experiment_nav" not in (folder / "base.html.j2").read_text()
        or "run_pages" not in (folder / "index.html.j2").read_text()
    ):
        pytest.skip("templates/base.html.j2 / index.html.j2 do not use experiment_nav / run_pages yet")
    _, out, run_ids = site
    index = parse(out / "index.html")
    [runs_table] = index.find_all("table", class_="runs")
    hrefs = {a.attrs.get("href") for a in runs_table.find_all("a")}
    for experiment, name in (("ablation", "ablation"), ("blocking", "blocking")):
        assert f"experiments/{experiment}-{run_dir_name(run_ids[name])}.html" in hrefs
    page = image_page(out, "ablation", run_ids["ablation"], ABLATION_IMAGES[0])
    nav = parse(page).find_all("nav")[0]
    assert f"../../experiments/ablation-{run_dir_name(run_ids['ablation'])}.html" in {
        a.attrs.get("href") for a in nav.find_all("a")
    }
