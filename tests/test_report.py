"""The static report: pages per completely written image, links, escaping, data fidelity, CLI.

Builds a small results database through `ResultsDB` with synthetic rows (no torch),
including hostile strings in tokens, labels, file names, model id and config.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import shutil
import subprocess
import sys
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from db.store import ResultsDB
from report.build import PROB_SCALE, ReportError, build_site, run_dir_name
from report.cli import report

HOSTILE = "</script><img src=x onerror=alert(1)>"
QUOTES = "\"&<>'"
HOSTILE_STRINGS = (HOSTILE, QUOTES, "<img src=x", "\u2028", "\u2029")
GRID = 4
N_LAYERS = 3
TOP_K = 3
TOKEN_POOL = ("cat", " the", "\n", HOSTILE, QUOTES, "\u2028sep", "dog", "a\u2029b", "", "猫", "sofa", "▁remote")


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _positions(run_id: str, image_id: int, column_major: bool) -> pa.Table:
    """Two text positions, a GRID x GRID block of image positions, three text positions."""
    rows = [("text", None, None, "USER"), ("text", None, None, HOSTILE)]
    for i in range(GRID * GRID):
        # Column-major on purpose for one image: the report must follow the recorded
        # (patch_row, patch_col), not assume row-major order.
        r, c = (i % GRID, i // GRID) if column_major else (i // GRID, i % GRID)
        rows.append(("image", r, c, f"<IMG{i + 1:03d}>"))
    rows += [("text", None, None, QUOTES), ("text", None, None, "\u2028"), ("text", None, None, "ASSISTANT")]
    return pa.table(
        {
            "run_id": [run_id] * len(rows),
            "image_id": pa.array([image_id] * len(rows), pa.int64()),
            "position": pa.array(range(len(rows)), pa.int32()),
            "kind": [row[0] for row in rows],
            "patch_row": pa.array([row[1] for row in rows], pa.int32()),
            "patch_col": pa.array([row[2] for row in rows], pa.int32()),
            "label": [row[3] for row in rows],
            "token_id": pa.array(range(100, 100 + len(rows)), pa.int32()),
        }
    )


def _lens(run_id: str, image_id: int, n_positions: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in ("layer", "position", "rank", "token_id", "token", "prob")}
    for layer in range(N_LAYERS):
        for position in range(n_positions):
            picks = rng.choice(len(TOKEN_POOL), size=TOP_K, replace=False)
            probs = np.sort(rng.dirichlet(np.ones(TOP_K + 2)))[::-1][:TOP_K]
            for rank, (pick, prob) in enumerate(zip(picks, probs), start=1):
                cols["layer"].append(layer)
                cols["position"].append(position)
                cols["rank"].append(rank)
                cols["token_id"].append(int(pick))
                cols["token"].append(TOKEN_POOL[pick])
                cols["prob"].append(float(prob))
    n = len(cols["layer"])
    return pa.table(
        {
            "run_id": [run_id] * n,
            "image_id": pa.array([image_id] * n, pa.int64()),
            "layer": pa.array(cols["layer"], pa.int16()),
            "position": pa.array(cols["position"], pa.int32()),
            "rank": pa.array(cols["rank"], pa.int16()),
            "token_id": pa.array(cols["token_id"], pa.int32()),
            "token": cols["token"],
            "prob": pa.array(cols["prob"], pa.float64()),
        }
    )


def _write_image(db: ResultsDB, run_id: str, image_id: int, *, complete: bool, column_major: bool = False) -> None:
    positions = _positions(run_id, image_id, column_major)
    tables = {
        "positions": positions,
        "logit_lens": _lens(run_id, image_id, positions.num_rows, seed=image_id),
        "image_views": pa.table(
            {
                "run_id": [run_id],
                "image_id": pa.array([image_id], pa.int64()),
                "png": pa.array([_png(28, 28)], pa.binary()),
                "view_width": [28],
                "view_height": [28],
                "scale_x": [0.5],
                "scale_y": [0.5],
                "offset_x": [0.0],
                "offset_y": [2.0],
            }
        ),
    }
    if complete:
        tables["run_images"] = pa.table(
            {
                "run_id": [run_id],
                "image_id": pa.array([image_id], pa.int64()),
                "n_positions": [positions.num_rows],
                "n_layers": [N_LAYERS],
                "grid_rows": [GRID],
                "grid_cols": [GRID],
                "written_at": [dt.datetime(2025, 1, 2, 3, 4, 5)],
            }
        )
        db.write_image_results(run_id, image_id, tables)
    else:
        # Rows without their marker, as a writer killed mid-image (or an older tool
        # version) could leave them: the report must not publish them.
        for name, table in tables.items():
            db.duck.register("_partial", table)
            db.duck.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _partial")
            db.duck.unregister("_partial")


def _make_db(path: Path) -> dict[str, str]:
    """A database with a hostile demo run, a clean run and a non-lens run; returns run ids."""
    with ResultsDB(path) as db:
        db.add_image(
            101,
            HOSTILE + ".jpg",
            640,
            480,
            "coco",
            annotations=[
                {"id": 1, "category_id": 17, "category": "cat", "area": 10.0, "bbox": [1, 2, 3, 4], "segmentation": []},
                {"id": 2, "category_id": 99, "category": QUOTES, "area": 5.0, "bbox": [0, 0, 1, 1], "segmentation": []},
            ],
        )
        db.add_image(102, "000000000102.jpg", 500, 375, "coco")
        db.add_image(103, "000000000103.jpg", 500, 375, "coco")
        hostile_model = "org/" + HOSTILE + QUOTES
        hostile = db.start_run(
            "lens",
            hostile_model,
            {"model_id": hostile_model},
            {"model_id": hostile_model, "revision": QUOTES, "prompt": "USER: <image>\n" + HOSTILE,
             "top_k": TOP_K, "demo": True, "note": "\u2028" + HOSTILE},
        )
        clean = db.start_run(
            "lens",
            "llava-hf/llava-1.5-7b-hf",
            {"model_id": "llava-hf/llava-1.5-7b-hf"},
            {"model_id": "llava-hf/llava-1.5-7b-hf", "revision": "abc123", "prompt": "USER: <image>\nDescribe.",
             "top_k": TOP_K},
        )
        other = db.start_run("ablation", "llava-hf/llava-1.5-7b-hf", {"k": 1}, {"k": 1})
        _write_image(db, hostile, 101, complete=True)
        _write_image(db, hostile, 102, complete=True, column_major=True)
        _write_image(db, hostile, 103, complete=False)  # interrupted: no run_images row
        _write_image(db, clean, 102, complete=True)
        db.add_image(104, "000000000104.jpg", 500, 375, "coco")
        db.write_image_results(  # skipped: marker without rows
            hostile,
            104,
            {
                "skipped": pa.table({"run_id": [hostile], "image_id": pa.array([104], pa.int64()),
                                     "reason": ["cropped_away"], "detail": [HOSTILE]}),
                "run_images": pa.table({"run_id": [hostile], "image_id": pa.array([104], pa.int64()),
                                        "n_positions": [0], "n_layers": [None], "grid_rows": [GRID],
                                        "grid_cols": [GRID], "written_at": [dt.datetime(2025, 1, 2)]}),
            },
        )
        db.finish_run(hostile)
        db.finish_run(clean)
    return {"hostile": hostile, "clean": clean, "other": other}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("report")
    db_path = root / "results.duckdb"
    run_ids = _make_db(db_path)
    out = root / "site"
    build_site(db_path, out)
    return db_path, out, run_ids


def _decode(spec: dict) -> np.ndarray:
    dtype = {"uint16": "<u2", "uint32": "<u4"}[spec["dtype"]]
    return np.frombuffer(base64.b64decode(spec["b64"]), dtype=dtype)


def _load_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8").strip()
    assert text.startswith("window.LENS_DATA = ") and text.endswith(";")
    return json.loads(text.removeprefix("window.LENS_DATA = ").removesuffix(";"))


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"href", "src"} and value is not None:
                self.urls.append(value)


def test_a_page_per_completely_written_image(built: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, run_ids = built
    with ResultsDB(db_path, read_only=True) as db:
        complete = db.sql(
            "SELECT run_id, image_id FROM run_images WHERE image_id <> 104 ORDER BY ALL"
        )
    assert len(complete) == 3
    pages = sorted(out.glob("lens/*/*.html"))
    expected = sorted(out / "lens" / run_dir_name(run) / f"{image}.html" for run, image in complete)
    assert pages == expected
    for page in pages:
        assert (page.parent / f"{page.stem}.data.js").exists()
        assert (page.parent / f"{page.stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "lens" / run_dir_name(run_ids["hostile"]) / "103.html").exists()
    assert not (out / "lens" / run_dir_name(run_ids["other"])).exists()
    index = (out / "index.html").read_text(encoding="utf-8")
    for run, image in complete:
        assert f'href="lens/{run_dir_name(run)}/{image}.html"' in index
    assert "103.html" not in index and "104.html" not in index
    assert "1 skipped" in index
    assert 'id="search"' in index and "000000000102.jpg" in index and "<td>&#34;&amp;&lt;&gt;&#39;, cat</td>" in index
    assert (out / ".nojekyll").exists()
    assert {p.name for p in (out / "static").iterdir()} >= {"site.css", "lens.js", "index.js"}


def test_every_link_resolves_and_is_relative(built: tuple[Path, Path, dict[str, str]]) -> None:
    _, out, _ = built
    html_files = list(out.rglob("*.html"))
    assert len(html_files) == 4
    for page in html_files:
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        assert parser.urls, page
        for url in parser.urls:
            parsed = urllib.parse.urlsplit(url)
            assert not url.startswith("/"), (page, url)
            assert not parsed.scheme and not parsed.netloc, (page, url)
            target = (page.parent / urllib.parse.unquote(parsed.path)).resolve()
            assert target.is_file(), (page, url)
            assert out.resolve() in target.parents, (page, url)


def test_hostile_strings_are_only_escaped(built: tuple[Path, Path, dict[str, str]]) -> None:
    _, out, run_ids = built
    outputs = list(out.rglob("*.html")) + list(out.rglob("*.js"))
    for path in outputs:
        text = path.read_text(encoding="utf-8")
        for hostile in HOSTILE_STRINGS:
            assert hostile not in text, (path, hostile)
    page = (out / "lens" / run_dir_name(run_ids["hostile"]) / "101.html").read_text(encoding="utf-8")
    # Present, but escaped: model id, file name, category and config all reach the page.
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&#34;&amp;&lt;&gt;&#39;" in page
    data = (out / "lens" / run_dir_name(run_ids["hostile"]) / "101.data.js").read_text(encoding="utf-8")
    assert "\\u003c/script\\u003e" in data and "\\u2028" in data


def test_data_file_reproduces_the_database(built: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, _ = built
    with ResultsDB(db_path, read_only=True) as db:
        for run_id, image_id in db.sql("SELECT run_id, image_id FROM run_images WHERE image_id <> 104"):
            data = _load_data(out / "lens" / run_dir_name(run_id) / f"{image_id}.data.js")
            assert (data["n_layers"], data["top_k"], data["grid_rows"], data["grid_cols"]) == (N_LAYERS, TOP_K, GRID, GRID)
            pos = data["positions"]
            db_positions = db.sql(
                "SELECT position, kind, label, patch_row, patch_col FROM positions "
                "WHERE run_id = ? AND image_id = ? ORDER BY position",
                (run_id, image_id),
            )
            assert list(zip(pos["position"], pos["kind"], pos["label"], pos["patch_row"], pos["patch_col"])) == [
                tuple(row) for row in db_positions
            ]
            n_rows = len(pos["position"])
            tokens, index, prob = data["tokens"], _decode(data["token_index"]), _decode(data["prob"])
            assert len(index) == len(prob) == N_LAYERS * n_rows * TOP_K
            assert data["prob"]["scale"] == PROB_SCALE
            row_of = {p: r for r, p in enumerate(pos["position"])}
            lens = db.sql(
                "SELECT layer, position, rank, token, prob FROM logit_lens WHERE run_id = ? AND image_id = ?",
                (run_id, image_id),
            )
            assert len(lens) == N_LAYERS * n_rows * TOP_K
            for layer, position, rank, token, p in lens:
                at = (layer * n_rows + row_of[position]) * TOP_K + rank - 1
                assert tokens[index[at]] == token
                assert abs(prob[at] / PROB_SCALE - p) <= 0.5 / PROB_SCALE + 1e-12
            top1 = db.sql(
                "SELECT layer, position, token FROM lens_top1 WHERE run_id = ? AND image_id = ?",
                (run_id, image_id),
            )
            for layer, position, token in top1:
                assert tokens[index[(layer * n_rows + row_of[position]) * TOP_K]] == token


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_lens_js_maps_patches_to_the_recorded_positions(built: tuple[Path, Path, dict[str, str]]) -> None:
    """Runs the shipped lens.js model on a data file: patch (r, c) -> top-1 must match the DB."""
    db_path, out, run_ids = built
    run_id = run_ids["hostile"]
    data_js = out / "lens" / run_dir_name(run_id) / "102.data.js"  # the column-major image
    script = (
        "const vm = require('vm'), fs = require('fs');"
        "const ctx = {atob: (s) => Buffer.from(s, 'base64').toString('latin1')};"
        "ctx.window = ctx; vm.createContext(ctx);"
        f"vm.runInContext(fs.readFileSync({json.dumps(str(data_js))}, 'utf8'), ctx);"
        f"vm.runInContext(fs.readFileSync({json.dumps(str(out / 'static' / 'lens.js'))}, 'utf8'), ctx);"
        "const m = new ctx.LensModel(ctx.LENS_DATA); const result = {};"
        "for (let l = 0; l < m.nLayers; l++) for (let r = 0; r < m.gridRows; r++) for (let c = 0; c < m.gridCols; c++) {"
        "  const row = m.rowOfPatch[r * m.gridCols + c]; const cell = m.top1(l, row);"
        "  result[l + ',' + r + ',' + c] = [cell.token, cell.prob]; }"
        "process.stdout.write(JSON.stringify(result));"
    )
    completed = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30, check=True)
    from_js = json.loads(completed.stdout)
    with ResultsDB(db_path, read_only=True) as db:
        expected = db.sql(
            "SELECT layer, patch_row, patch_col, token, prob FROM lens_top1 "
            "WHERE run_id = ? AND image_id = 102 AND kind = 'image'",
            (run_id,),
        )
    assert len(expected) == len(from_js) == N_LAYERS * GRID * GRID
    for layer, r, c, token, prob in expected:
        js_token, js_prob = from_js[f"{layer},{r},{c}"]
        assert js_token == token
        assert abs(js_prob - prob) <= 0.5 / PROB_SCALE + 1e-12


def test_demo_warning_only_on_demo_runs(built: tuple[Path, Path, dict[str, str]]) -> None:
    _, out, run_ids = built
    warning = "weights are random: demo output, not results"
    assert warning in (out / "index.html").read_text(encoding="utf-8")
    assert warning in (out / "lens" / run_dir_name(run_ids["hostile"]) / "101.html").read_text(encoding="utf-8")
    assert warning not in (out / "lens" / run_dir_name(run_ids["clean"]) / "102.html").read_text(encoding="utf-8")


def test_rebuild_replaces_generated_files_and_keeps_others(tmp_path: Path, built: tuple[Path, Path, dict[str, str]]) -> None:
    _, first_site, run_ids = built
    out = tmp_path / "site"
    shutil.copytree(first_site, out)
    (out / "CNAME").write_text("example.org")
    (out / "lens" / "stale-run").mkdir()
    (out / "lens" / "stale-run" / "1.html").write_text("old")

    db_path = tmp_path / "smaller.duckdb"
    with ResultsDB(db_path) as db:
        db.add_image(102, "000000000102.jpg", 500, 375, "coco")
        run = db.start_run("lens", "m", {"model_id": "m"}, {"model_id": "m"})
        _write_image(db, run, 102, complete=True)
    summary = build_site(db_path, out)

    assert summary.runs == 1 and summary.lens_pages == 1
    assert (out / "CNAME").read_text() == "example.org"
    assert sorted(p.relative_to(out).as_posix() for p in (out / "lens").rglob("*.html")) == [
        f"lens/{run_dir_name(run)}/102.html"
    ]
    assert not (out / "lens" / run_dir_name(run_ids["hostile"])).exists()
    assert not any(p.name.startswith(".report-build-") for p in out.iterdir())


def test_run_folder_names_are_safe_and_distinct() -> None:
    assert run_dir_name("lens-0123456789") == "lens-0123456789"
    hostile = run_dir_name("../" + HOSTILE)
    assert "/" not in hostile and "<" not in hostile and not hostile.startswith(".")
    assert run_dir_name("a b") != run_dir_name("a/b")


def _execute_sql(db_path: Path, sql: str) -> None:
    with ResultsDB(db_path) as db:
        db.sql(sql)


@pytest.mark.parametrize(
    "sql, message",
    [
        ("UPDATE positions SET patch_row = 4 WHERE position = 5", "outside the 4x4 grid"),
        ("UPDATE positions SET patch_row = 0, patch_col = 0 WHERE position = 3", "two positions on patch (0, 0)"),
        ("UPDATE positions SET patch_col = NULL WHERE position = 3", "no patch coordinates"),
        ("DELETE FROM positions WHERE position = 20", "positions written, run_images says"),
        ("DELETE FROM logit_lens WHERE layer = 1 AND position = 4 AND rank = 1", "lens rows cover 188 of"),
        ("UPDATE logit_lens SET position = 99 WHERE layer = 1 AND position = 4", "position 99, which is not in positions"),
        ("UPDATE logit_lens SET rank = 2 WHERE layer = 0 AND position = 0 AND rank = 1", "duplicate lens rows"),
    ],
)
def test_unmappable_positions_fail_loudly(tmp_path: Path, sql: str, message: str) -> None:
    db_path = tmp_path / "bad.duckdb"
    with ResultsDB(db_path) as db:
        run = db.start_run("lens", "m", {"model_id": "m"}, {"model_id": "m"})
        _write_image(db, run, 7, complete=True)
    _execute_sql(db_path, sql)
    out = tmp_path / "site"
    with pytest.raises(ReportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_site(db_path, out)
    assert not (out / "index.html").exists()
    assert not any(p.name.startswith(".report-build-") for p in out.iterdir())


def test_cli_builds_a_site(tmp_path: Path, built: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, _, _ = built
    result = CliRunner().invoke(report, ["build", "--db", str(db_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "3 lens pages for 3 runs" in result.output
    assert (tmp_path / "out" / "index.html").exists()


@pytest.mark.parametrize("content", [None, b"this is not a database\n"])
def test_cli_bad_database_is_one_line_error(tmp_path: Path, content: bytes | None) -> None:
    db_path = tmp_path / "results.duckdb"
    if content is not None:
        db_path.write_bytes(content)
    result = CliRunner().invoke(report, ["build", "--db", str(db_path), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "index.html").exists()


def test_cli_help_documents_every_option() -> None:
    result = CliRunner().invoke(report, ["build", "--help"])
    assert result.exit_code == 0
    command = report.commands["build"]
    for param in command.params:
        assert param.help, param.name
        for opt in param.opts:
            assert opt in result.output
    assert "--db" in result.output and "--out" in result.output and "site" in result.output
    group_help = CliRunner().invoke(report, ["--help"])
    assert group_help.exit_code == 0 and "build" in group_help.output


def test_report_imports_neither_torch_nor_the_collector() -> None:
    code = (
        "import sys, report.build, report.cli;"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'collector'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr
