"""`llava-interp reproduce` and the Reproduction page.

The command runs end to end on the model organism (its build is cached, see
tests/test_demo.py); the page's numbers are recomputed here from the raw rows of
`ablations`, `blocking`, `logit_lens`, `positions`, `annotations` and `image_views`
(plain Python over the rows, not the views or db/reproduction.py) and compared with what
the page shows.
"""

from __future__ import annotations

import html
import json
import math
import re
import subprocess
import sys

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner
from pycocotools import mask as mask_utils

from collector.cli import cli
from report.paper_reference import PAPER_VALUES, REPLICATION_SUMMARY

ARGS = ("--scenes", "3", "--ig-steps", "4", "--max-new-tokens", "6", "--quiet")
TABLES = ("runs", "run_images", "ablations", "blocking", "logit_lens", "positions", "mean_vectors", "skipped")


def _counts(db_path) -> dict[str, int]:
    with duckdb.connect(str(db_path), read_only=True) as con:
        return {table: con.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0] for table in TABLES}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """The organism reproduction, run twice into one database: (db path, counts after the
    first call, counts after the second, output of the second)."""
    db_path = tmp_path_factory.mktemp("reproduce") / "results.duckdb"
    command = ["reproduce", "--model", "organism", "--db", str(db_path), *ARGS]
    first = CliRunner().invoke(cli, command)
    assert first.exit_code == 0, first.output
    after_first = _counts(db_path)
    second = CliRunner().invoke(cli, command)
    assert second.exit_code == 0, second.output
    return db_path, after_first, _counts(db_path), second.output


@pytest.fixture(scope="module")
def page(reproduced, tmp_path_factory):
    from report.build import build_site

    site = tmp_path_factory.mktemp("site")
    build_site(reproduced[0], site, downloads=False)
    return (site / "reproduction.html").read_text()


# -- the command -------------------------------------------------------------------------------


@pytest.mark.slow  # two passes of every experiment on the organism: 40-130 s on 2 shared cores
def test_reproduce_runs_every_experiment_and_resumes(reproduced):
    db_path, after_first, after_second, second_output = reproduced
    assert after_second == after_first  # the second call wrote no row
    assert "(reused)" in second_output
    with duckdb.connect(str(db_path), read_only=True) as con:
        runs = con.sql("SELECT experiment, status, config FROM runs").fetchall()
        assert sorted(e for e, _, _ in runs) == ["ablation", "blocking", "lens"]
        assert all(status == "complete" for _, status, _ in runs)
        settings = {s for (s,) in con.sql("SELECT DISTINCT setting FROM ablations").fetchall()}
        assert settings == {"generative", "polling", "vqa"}
        kinds = {k for (k,) in con.sql("SELECT DISTINCT window_kind FROM blocking").fetchall()}
        assert kinds == {"baseline", "preset", "sliding"}
        presets = {p for (p,) in con.sql("SELECT DISTINCT preset FROM blocking WHERE preset IS NOT NULL").fetchall()}
        assert presets == {"early", "early_mid", "mid", "mid_late", "late", "all"}
        assert con.sql("SELECT count(*) FROM mean_vectors").fetchall()[0][0] == 1
        # the paper's k (5 ... 250 of 576 tokens) scaled to the organism's 64
        conditions = {c for (c,) in con.sql("SELECT DISTINCT condition FROM ablations").fetchall()}
        assert {f"random_{k}" for k in (1, 2, 4, 7, 11, 28)} <= conditions
    for _, _, config in runs:
        recorded = json.loads(config)["reproduce"]
        assert recorded["protocol"] == "neo2024"
        deviations = {d["setting"]: d for d in recorded["deviations"]}
        assert set(deviations) == {
            "model",
            "dtype",
            "area_range",
            "k_values",
            "window",
            "ablation_curate",
            "max_new_tokens",
            "ig_steps",
        }
        assert deviations["ig_steps"]["paper"] == 50 and deviations["ig_steps"]["here"] == 4
        assert deviations["max_new_tokens"]["paper"] == 200 and deviations["max_new_tokens"]["here"] == 6
        assert deviations["model"]["paper"] == "llava-hf/llava-1.5-7b-hf"
        assert deviations["dtype"]["paper"] == "float16" and deviations["dtype"]["here"] == "float32"
        assert all(d["reason"] for d in deviations.values())


def test_help_documents_every_option():
    result = CliRunner().invoke(cli, ["reproduce", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for option in (
        "--model",
        "--coco-images",
        "--coco-annotations",
        "--questions",
        "--db",
        "--limit",
        "--lens-limit",
        "--mean-images",
        "--max-new-tokens",
        "--ig-steps",
        "--scenes",
        "--quiet",
    ):
        assert option in text, option
    assert "--model organism" in text and "resumes" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "organism", "--coco-images", "x"],
            "--model organism brings its own scenes: leave out --coco-images",
        ),
        (["--model", "llava-hf/llava-1.5-7b-hf"], "needs --coco-images, --coco-annotations, --questions"),
        (["--model", "organism", "--limit", "0"], "0 is not in the range x>=1"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["reproduce", *args, "--db", str(tmp_path / "r.duckdb")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
    assert not (tmp_path / "r.duckdb").exists()


def test_coco_without_a_selectable_image_stops_before_the_model_loads(tmp_path):
    """The COCO path up to loading: the shared sample image has six annotations, so the
    paper's selection keeps nothing, and the command says so before reading any weight
    (the model id is one this offline machine cannot load)."""
    from tests.conftest import COCO_SAMPLE, require_shared

    require_shared(COCO_SAMPLE)
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({"39769": ["What animal is this?"]}))
    result = CliRunner().invoke(
        cli,
        [
            "reproduce",
            "--model",
            "llava-hf/llava-1.5-7b-hf",
            "--coco-images",
            str(COCO_SAMPLE / "images"),
            "--coco-annotations",
            str(COCO_SAMPLE / "instances_sample.json"),
            "--questions",
            str(questions),
            "--db",
            str(tmp_path / "r.duckdb"),
        ],
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: no image passes the paper's selection (at most 3 annotations, one single-instance object of "
        "1000-2000 px²): nothing to reproduce on"
    ]
    assert not (tmp_path / "r.duckdb").exists()


def test_paper_protocol_is_the_collectors_defaults():
    """The protocol's ablation defaults are written out (no torch at CLI start-up); they must
    stay the collectors' own defaults, those of the paper's code."""
    from collector import reproduce
    from collector.ablation.settings import DEFAULT_MAX_NEW_TOKENS, SETTINGS
    from collector.ablation.token_sets import DEFAULT_IG_STEPS, DEFAULT_K, DEFAULT_NOISE_STD
    from collector.blocking.settings import DEFAULT_AREA_RANGE, DEFAULT_WINDOW

    paper = reproduce.PAPER_PROTOCOL
    assert paper.settings == SETTINGS and paper.k_values == DEFAULT_K and paper.ig_steps == DEFAULT_IG_STEPS
    assert paper.max_new_tokens == DEFAULT_MAX_NEW_TOKENS and paper.noise_std == DEFAULT_NOISE_STD
    assert paper.area_range == DEFAULT_AREA_RANGE == (1000.0, 2000.0) and paper.window == DEFAULT_WINDOW == 9
    assert paper.ablation_curate and paper.blocking_curate and paper.limit is None
    # scaled to the organism's 64 image tokens and 4 layers
    assert reproduce.scaled_k_values(64) == (1, 2, 4, 7, 11, 28)
    assert reproduce.scaled_k_values(576) == DEFAULT_K
    assert reproduce.scaled_window(4) == 1 and reproduce.scaled_window(32) == 9


def test_reference_values_and_measures_import_no_torch():
    code = (
        "import sys, report.paper_reference, db.reproduction, report.pages.reproduction, collector.cli; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the page ----------------------------------------------------------------------------------


def _rows(page_html: str) -> dict[str, dict]:
    """Per paper value id: verified flag, the row's text, and ours as {(run, target): (value, n, ci)}."""
    rows = {}
    for match in re.finditer(
        r'<tr id="[^"]*" data-paper-id="([^"]+)" data-verified="(\w+)">(.*?)</tr>', page_html, re.S
    ):
        paper_id, verified, body = match.groups()
        ours = {}
        for div in re.finditer(
            r'<div class="our-value" data-run-id="([^"]+)" data-target="([^"]*)">.*?<strong class="value">([^<]*)</strong>'
            r'.*?<span class="n">(\d+)</span>.*?<span class="ci">([^<]*)</span>',
            body,
            re.S,
        ):
            run_id, target, value, n, ci = (html.unescape(g) for g in div.groups())
            ours[(run_id, target)] = (value, int(n), ci)
        text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())
        rows[paper_id] = {"verified": verified == "true", "text": text, "ours": ours}
    return rows


def _wilson(successes: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _fetch(db_path, query: str) -> list[tuple]:
    with duckdb.connect(str(db_path), read_only=True) as con:
        return con.sql(query).fetchall()


def _run_id(db_path, experiment: str) -> str:
    return _fetch(db_path, f"SELECT run_id FROM runs WHERE experiment = '{experiment}'")[0][0]


def _check_ablation_rows(db_path, page_html: str, run_id: str, random_condition: str) -> None:
    """The page's flip rates of a run equal a recount of its `ablations` rows."""
    rows = _fetch(db_path, f"SELECT image_id, setting, condition, correct FROM ablations WHERE run_id = '{run_id}'")
    correct = {(image, setting, condition): ok for image, setting, condition, ok in rows}
    shown = _rows(page_html)
    for condition, prefix in (("object_1", "ablation-object1"), (random_condition, "ablation-random40")):
        for setting in ("generative", "polling", "vqa"):
            baseline = [i for (i, s, c), ok in correct.items() if s == setting and c == "none" and ok]
            flipped = sum(1 for i in baseline if not correct[(i, setting, condition)])
            n = len(baseline)
            low, high = _wilson(flipped, n)
            value, shown_n, ci = shown[f"{prefix}-{setting}"]["ours"][(run_id, setting)]
            assert shown_n == n and n >= 1
            assert value == f"{100 * flipped / n:.1f}%"
            assert ci == f"{100 * low:.1f}% – {100 * high:.1f}%"


BLOCKING_ROWS = (
    ("blocking-object1-last-mid-late", ("object_1", "last", "mid_late")),
    ("blocking-object1-last-all", ("object_1", "last", "all")),
    ("blocking-image-last-row-all", ("image_minus_last_row", "last_row", "all")),
    ("blocking-image-last-row-all", ("object_1", "last_row", "all")),
)


def _check_blocking_rows(db_path, page_html: str, run_id: str) -> int:
    """The page's kept shares of a run equal a recount of its `blocking` rows; returns how
    many of the page's blocking values the run has."""
    rows = _fetch(
        db_path,
        f"SELECT image_id, source, target, window_kind, preset, correct FROM blocking WHERE run_id = '{run_id}'",
    )
    baseline = {image for image, _, _, kind, _, ok in rows if kind == "baseline" and ok}
    shown = _rows(page_html)
    found = 0
    for paper_id, (source, target, preset) in BLOCKING_ROWS:
        kept = [
            ok
            for image, s, t, kind, p, ok in rows
            if image in baseline and (s, t, kind, p) == (source, target, "preset", preset)
        ]
        key = (run_id, f"{source}|{target}|{preset}")
        if not kept:
            assert key not in shown[paper_id]["ours"]
            continue
        found += 1
        n = len(kept)
        low, high = _wilson(sum(kept), n)
        value, shown_n, ci = shown[paper_id]["ours"][key]
        assert shown_n == n == len(baseline)
        assert value == f"{sum(kept) / n:.2f}"
        assert ci == f"{low:.2f} – {high:.2f}"
    return found


@pytest.mark.slow  # shares the reproduction fixture
def test_ablation_rows_equal_a_recount_of_the_raw_rows(reproduced, page):
    db_path = reproduced[0]
    # 40 of 576 tokens is 4.4 of the organism's 64: random_4 is the matched condition
    _check_ablation_rows(db_path, page, _run_id(db_path, "ablation"), "random_4")


@pytest.mark.slow  # shares the reproduction fixture
def test_blocking_rows_equal_a_recount_of_the_raw_rows(reproduced, page):
    db_path = reproduced[0]
    assert _check_blocking_rows(db_path, page, _run_id(db_path, "blocking")) == len(BLOCKING_ROWS)


def test_page_equals_a_recount_on_a_synthetic_database(tmp_path):
    """The synthetic experiment database of the report tests (LLaVA-1.5-named runs, a
    baseline-incorrect image, only random_5): the page's values equal a recount, and the
    run on the paper's model is marked as such."""
    from report.build import build_site
    from tests.test_report_experiments import make_experiment_db

    db_path = tmp_path / "synthetic.duckdb"
    ids = make_experiment_db(db_path)
    build_site(db_path, tmp_path / "site", downloads=False)
    page_html = (tmp_path / "site" / "reproduction.html").read_text()
    _check_ablation_rows(db_path, page_html, ids["ablation"], "random_5")
    assert _check_blocking_rows(db_path, page_html, ids["blocking"]) == 3  # no image_minus_last_row source
    row = _rows(page_html)["ablation-object1-vqa"]
    assert "not the paper's model" not in row["text"]
    assert "No run in this database measures this" in _rows(page_html)["lens-hit-share-llava15"]["text"]


def _object_cells(segmentation, width, height, view) -> np.ndarray:
    """(rows, cols) bool: patch cells with a mask pixel, the mask sampled at each view pixel's centre."""
    view_w, view_h, scale_x, scale_y, offset_x, offset_y, rows, cols = view
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    mask = mask_utils.decode(rle).astype(bool)
    cells = np.zeros((rows, cols), dtype=bool)
    for v in range(view_h):
        y = math.floor((v + 0.5 + offset_y) / scale_y)
        if not 0 <= y < height:
            continue
        for u in range(view_w):
            x = math.floor((u + 0.5 + offset_x) / scale_x)
            if 0 <= x < width and mask[y, x]:
                cells[v * rows // view_h, u * cols // view_w] = True
    return cells


@pytest.mark.slow  # shares the reproduction fixture
def test_lens_rows_equal_a_recount_of_the_raw_rows(reproduced, page):
    from db.stats import bootstrap_ratio_ci

    db_path = reproduced[0]
    run_id = _run_id(db_path, "lens")
    images = _fetch(
        db_path,
        f"SELECT ri.image_id, i.width, i.height, v.view_width, v.view_height, v.scale_x, v.scale_y, v.offset_x, "
        f"v.offset_y, ri.grid_rows, ri.grid_cols FROM run_images ri JOIN images i USING (image_id) "
        f"JOIN image_views v ON v.run_id = ri.run_id AND v.image_id = ri.image_id WHERE ri.run_id = '{run_id}'",
    )
    annotations = _fetch(db_path, "SELECT image_id, category, segmentation, iscrowd FROM annotations")
    positions = _fetch(
        db_path,
        f"SELECT image_id, position, patch_row, patch_col FROM positions WHERE run_id = '{run_id}' AND kind = 'image'",
    )
    top1 = _fetch(
        db_path, f"SELECT image_id, position, layer, token FROM logit_lens WHERE run_id = '{run_id}' AND rank = 1"
    )
    tokens: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for image, position, layer, token in top1:
        tokens.setdefault((image, position), []).append((layer, token))
    decoded, totals, layer_sums = [], [], []
    for image, width, height, *view in sorted(images):
        cell_of = {(r, c): p for i, p, r, c in positions if i == image}
        hits = total = layers = 0
        for ann_image, category, segmentation, iscrowd in annotations:
            if ann_image != image or iscrowd:
                continue
            cells = _object_cells(json.loads(segmentation), width, height, view)
            for r, c in zip(*np.nonzero(cells)):
                total += 1
                names = {category.lower(), category.lower().replace(" ", ""), *category.lower().split()}
                first = [
                    layer
                    for layer, token in tokens[(image, cell_of[(int(r), int(c))])]
                    if token.strip().lstrip("\u2581\u0120").lower() in names
                ]
                if first:
                    hits += 1
                    layers += min(first)
        decoded.append(hits)
        totals.append(total)
        layer_sums.append(layers)
    shown = _rows(page)
    n_layers = _fetch(db_path, f"SELECT max(n_layers) FROM run_images WHERE run_id = '{run_id}'")[0][0]
    share, n, ci = shown["lens-hit-share-llava15"]["ours"][(run_id, "")]
    assert n == len(images) and sum(totals) > 0
    assert share == f"{100 * sum(decoded) / sum(totals):.1f}%"
    low, high = bootstrap_ratio_ci(decoded, totals)
    assert ci == f"{100 * low:.1f}% – {100 * high:.1f}%"
    layer, _, ci = shown["lens-mean-layer-llava15"]["ours"][(run_id, "")]
    assert sum(decoded) > 0  # the organism is trained to name the object at its patches
    assert layer == f"{sum(layer_sums) / sum(decoded):.1f} of {n_layers}"
    low, high = bootstrap_ratio_ci(layer_sums, decoded)
    assert ci == f"{low:.1f} – {high:.1f}"


def test_unverified_values_are_marked_and_absent_runs_said_plainly(tmp_path):
    """On a database without runs: every paper value is on the page, the unverified ones
    marked with their source, and each row says that no run measures it."""
    from db.store import ResultsDB
    from report.build import build_site

    db_path = tmp_path / "empty.duckdb"
    with ResultsDB(db_path):
        pass
    build_site(db_path, tmp_path / "site", downloads=False)
    rows = _rows((tmp_path / "site" / "reproduction.html").read_text())
    assert set(rows) == {value.id for value in PAPER_VALUES}
    for value in PAPER_VALUES:
        row = rows[value.id]
        assert row["verified"] == value.verified
        if not value.verified:
            assert "unverified" in row["text"] and value.source in row["text"]
        assert "No run in this database measures this" in row["text"]
        assert not row["ours"]
    assert REPLICATION_SUMMARY in rows["ablation-object1-polling"]["text"]
    index = (tmp_path / "site" / "index.html").read_text()
    assert 'href="reproduction.html"' in index
