"""The static report: pages per completely written image, links, escaping, data fidelity, CLI.

Builds a small results database through `ResultsDB` with synthetic rows (no torch),
including hostile strings in tokens, labels, file names, model id and config.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import subprocess
import sys
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from db.store import ResultsDB
from report.build import ReportError, build_site, run_dir_name
from report.cli import report
from report.lens_codec import (
    PROB_LOG_SCALE,
    decode_probs,
    encode_probs,
    unpack_lens_data,
)

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
            {
                "model_id": hostile_model,
                "revision": QUOTES,
                "prompt": "USER: <image>\n" + HOSTILE,
                "top_k": TOP_K,
                "demo": True,
                "note": "\u2028" + HOSTILE,
            },
        )
        clean = db.start_run(
            "lens",
            "llava-hf/llava-1.5-7b-hf",
            {"model_id": "llava-hf/llava-1.5-7b-hf"},
            {
                "model_id": "llava-hf/llava-1.5-7b-hf",
                "revision": "abc123",
                "prompt": "USER: <image>\nDescribe.",
                "top_k": TOP_K,
            },
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
                "skipped": pa.table(
                    {
                        "run_id": [hostile],
                        "image_id": pa.array([104], pa.int64()),
                        "reason": ["cropped_away"],
                        "detail": [HOSTILE],
                    }
                ),
                "run_images": pa.table(
                    {
                        "run_id": [hostile],
                        "image_id": pa.array([104], pa.int64()),
                        "n_positions": [0],
                        "n_layers": [None],
                        "grid_rows": [GRID],
                        "grid_cols": [GRID],
                        "written_at": [dt.datetime(2025, 1, 2)],
                    }
                ),
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


# Decoded probabilities are within this relative error (log-quantised, see report/lens_codec.py).
PROB_REL = float(np.expm1(0.5 / PROB_LOG_SCALE)) + 1e-9
PROB_FLOOR = float(np.exp(-254.5 / PROB_LOG_SCALE))


def _close(decoded: float, stored: float) -> bool:
    if stored < PROB_FLOOR:
        return decoded == 0.0 or abs(decoded - stored) <= stored * PROB_REL + 1e-12
    return abs(decoded - stored) <= stored * PROB_REL


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
        complete = db.sql("SELECT run_id, image_id FROM run_images WHERE image_id <> 104 ORDER BY ALL")
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
    names = {p.relative_to(out).as_posix() for p in html_files if not p.parent.name == "experiments"}
    assert (
        len(names) == 10
        and {
            "index.html",
            "quantitative.html",
            "depth.html",
            "reproduction.html",
            "downloads.html",
            "sql.html",
            "compare.html",
        }
        <= names
    )
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
            assert (data["n_layers"], data["top_k"], data["grid_rows"], data["grid_cols"]) == (
                N_LAYERS,
                TOP_K,
                GRID,
                GRID,
            )
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
            tokens, index, prob = unpack_lens_data(data)
            assert len(index) == len(prob) == data["n_cells"] == N_LAYERS * n_rows * TOP_K
            assert data["format"] == "llava-interp-lens/4" and data["packed"]["encoding"] == "deflate-raw"
            row_of = {p: r for r, p in enumerate(pos["position"])}
            lens = db.sql(
                "SELECT layer, position, rank, token, prob FROM logit_lens WHERE run_id = ? AND image_id = ?",
                (run_id, image_id),
            )
            assert len(lens) == N_LAYERS * n_rows * TOP_K
            for layer, position, rank, token, p in lens:
                at = (layer * n_rows + row_of[position]) * TOP_K + rank - 1
                assert tokens[index[at]] == token
                assert _close(prob[at], p), (prob[at], p)
            top1 = db.sql(
                "SELECT layer, position, token FROM lens_top1 WHERE run_id = ? AND image_id = ?",
                (run_id, image_id),
            )
            for layer, position, token in top1:
                assert tokens[index[(layer * n_rows + row_of[position]) * TOP_K]] == token


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_lens_js_maps_patches_to_the_recorded_positions(built: tuple[Path, Path, dict[str, str]]) -> None:
    """Runs the shipped lens model (static/lens-data.js) on a data file: patch (r, c) -> top-1 must match the DB."""
    db_path, out, run_ids = built
    run_id = run_ids["hostile"]
    data_js = out / "lens" / run_dir_name(run_id) / "102.data.js"  # the column-major image
    script = (
        "const vm = require('vm'), fs = require('fs');"
        "const ctx = {atob: (s) => Buffer.from(s, 'base64').toString('latin1'), Blob, Response,"
        " DecompressionStream, TextDecoder, Uint8Array, Uint32Array, Int32Array, Float64Array, JSON, Math, Promise, Error};"
        "ctx.window = ctx; vm.createContext(ctx);"
        f"vm.runInContext(fs.readFileSync({json.dumps(str(data_js))}, 'utf8'), ctx);"
        f"vm.runInContext(fs.readFileSync({json.dumps(str(out / 'static' / 'lens-data.js'))}, 'utf8'), ctx);"
        "ctx.LensModel.load(ctx.LENS_DATA).then((m) => { const result = {};"
        "for (let l = 0; l < m.nLayers; l++) for (let r = 0; r < m.gridRows; r++) for (let c = 0; c < m.gridCols; c++) {"
        "  const row = m.rowOfPatch[r * m.gridCols + c]; const cell = m.top1(l, row);"
        "  result[l + ',' + r + ',' + c] = [cell.token, cell.prob]; }"
        "process.stdout.write(JSON.stringify(result)); });"
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
        assert _close(js_prob, prob), (js_prob, prob)


def test_demo_warning_only_on_demo_runs(built: tuple[Path, Path, dict[str, str]]) -> None:
    _, out, run_ids = built
    warning = "weights are random: demo output, not results"
    assert warning in (out / "index.html").read_text(encoding="utf-8")
    assert warning in (out / "lens" / run_dir_name(run_ids["hostile"]) / "101.html").read_text(encoding="utf-8")
    assert warning not in (out / "lens" / run_dir_name(run_ids["clean"]) / "102.html").read_text(encoding="utf-8")


def test_rebuild_replaces_generated_files_and_keeps_others(
    tmp_path: Path, built: tuple[Path, Path, dict[str, str]]
) -> None:
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
        (
            "UPDATE logit_lens SET position = 99 WHERE layer = 1 AND position = 4",
            "position 99, which is not in positions",
        ),
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


def _llava_sized_db(path: Path, *, uniform: bool) -> tuple[str, int]:
    """One LLaVA-1.5-7b-shaped image: 576 patches + 10 text positions, 33 layers, top-5.

    Tokens come from a 32000-word vocabulary. `uniform=False` draws them the way a real
    lens table looks (Zipf-distributed, top-1 persisting across layers 60 % of the time);
    `uniform=True` is the worst case (every cell an independent uniform draw).
    """
    rng = np.random.default_rng(7)
    n_layers, grid, n_text, top_k, vocab = 33, 24, 10, 5, 32000
    words = [f"\u2581w{i}" if i % 3 else f"p{i}" for i in range(vocab)]
    n_pos = grid * grid + n_text

    def zipf(n: int) -> np.ndarray:
        return np.minimum(rng.zipf(1.3, n), vocab) - 1

    tok = np.zeros((n_layers, n_pos, top_k), dtype=np.int64)
    if uniform:
        tok[:] = rng.integers(0, vocab, tok.shape)
    else:
        previous = zipf(n_pos)
        for layer in range(n_layers):
            keep = rng.random(n_pos) < 0.6
            tok[layer, :, 0] = previous = np.where(keep, previous, zipf(n_pos))
            tok[layer, :, 1:] = zipf(n_pos * (top_k - 1)).reshape(n_pos, top_k - 1)
    prob = np.sort(rng.dirichlet(np.ones(top_k + 20) * 0.3, (n_layers, n_pos)), axis=-1)[:, :, ::-1][:, :, :top_k]
    layer, position, rank = (
        a.ravel() for a in np.meshgrid(np.arange(n_layers), np.arange(n_pos), np.arange(1, top_k + 1), indexing="ij")
    )
    run_id_holder = {}
    with ResultsDB(path) as db:
        db.add_image(1, "1.jpg", 640, 480, "coco")
        run = db.start_run("lens", "m", {"model_id": "m"}, {"model_id": "m"})
        run_id_holder["run"] = run
        kinds = ["text"] * 5 + ["image"] * (grid * grid) + ["text"] * 5
        patch = [None] * 5 + list(range(grid * grid)) + [None] * 5
        n = len(layer)
        db.write_image_results(
            run,
            1,
            {
                "positions": pa.table(
                    {
                        "run_id": [run] * n_pos,
                        "image_id": pa.array([1] * n_pos, pa.int64()),
                        "position": pa.array(range(n_pos), pa.int32()),
                        "kind": kinds,
                        "patch_row": pa.array([None if p is None else p // grid for p in patch], pa.int32()),
                        "patch_col": pa.array([None if p is None else p % grid for p in patch], pa.int32()),
                        "label": [f"<IMG{p + 1:03d}>" if p is not None else "USER" for p in patch],
                        "token_id": pa.array(range(n_pos), pa.int32()),
                    }
                ),
                "logit_lens": pa.table(
                    {
                        "run_id": [run] * n,
                        "image_id": pa.array(np.ones(n, dtype=np.int64)),
                        "layer": pa.array(layer.astype(np.int16)),
                        "position": pa.array(position.astype(np.int32)),
                        "rank": pa.array(rank.astype(np.int16)),
                        "token_id": pa.array(tok.ravel().astype(np.int32)),
                        "token": [words[i] for i in tok.ravel()],
                        "prob": pa.array(prob.ravel()),
                    }
                ),
                "run_images": pa.table(
                    {
                        "run_id": [run],
                        "image_id": pa.array([1], pa.int64()),
                        "n_positions": [n_pos],
                        "n_layers": [n_layers],
                        "grid_rows": [grid],
                        "grid_cols": [grid],
                        "written_at": [dt.datetime(2025, 1, 1)],
                    }
                ),
            },
        )
    return run_id_holder["run"], n_pos


@pytest.mark.parametrize("uniform, limit", [(False, 300_000), (True, 560_000)])
def test_llava_sized_lens_data_is_compact(tmp_path: Path, uniform: bool, limit: int) -> None:
    db_path = tmp_path / "big.duckdb"
    run_id, n_pos = _llava_sized_db(db_path, uniform=uniform)
    out = tmp_path / "site"
    build_site(db_path, out, downloads=False)
    data_file = out / "lens" / run_dir_name(run_id) / "1.data.js"
    size = data_file.stat().st_size
    print(f"lens data, {'uniform' if uniform else 'realistic'} tokens: {size} bytes")
    assert size < limit
    data = _load_data(data_file)
    tokens, index, prob = unpack_lens_data(data)
    assert len(index) == 33 * n_pos * 5
    with ResultsDB(db_path, read_only=True) as db:
        sample = db.sql(
            "SELECT layer, position, rank, token, prob FROM logit_lens USING SAMPLE 2000 ROWS (reservoir, 1)"
        )
    for layer, position, rank, token, p in sample:
        at = (layer * n_pos + position) * 5 + rank - 1
        assert tokens[index[at]] == token and _close(prob[at], p)


def test_probability_codes_round_trip() -> None:
    p = np.array([1.0, 0.5, 1e-3, 1e-5, 3.1e-6, 1e-7, 0.0])
    decoded = decode_probs(encode_probs(p))
    for d, v in zip(decoded, p):
        assert _close(d, v), (d, v)
    assert decoded[-1] == 0.0 and decoded[0] == 1.0


def test_downloads_csv_and_database_copy(built: tuple[Path, Path, dict[str, str]]) -> None:
    import csv
    import gzip

    import duckdb

    db_path, out, run_ids = built
    hostile = run_dir_name(run_ids["hostile"])
    with gzip.open(out / "downloads" / hostile / "logit_lens.csv.gz", "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with ResultsDB(db_path, read_only=True) as db:
        expected = db.sql("SELECT count(*) FROM logit_lens WHERE run_id = ?", (run_ids["hostile"],))[0][0]
        tables = {name for (name,) in db.sql("SELECT table_name FROM information_schema.tables")}
    assert len(rows) == expected and {r["run_id"] for r in rows} == {run_ids["hostile"]}
    assert HOSTILE in {r["token"] for r in rows}  # CSV keeps the text as it is
    for name in ("positions", "run_images", "image_views", "runs", "skipped"):
        assert (out / "downloads" / hostile / f"{name}.csv.gz").is_file(), name
    for name in ("images", "annotations", "schema_migrations"):
        assert (out / "downloads" / f"{name}.csv.gz").is_file(), name
    with gzip.open(out / "downloads" / hostile / "image_views.csv.gz", "rt") as handle:
        assert "png" not in handle.readline().split(",")
    downloads = (out / "downloads.html").read_text(encoding="utf-8")
    assert 'href="data/results.duckdb"' in downloads and f"downloads/{hostile}/logit_lens.csv.gz" in downloads

    copy = duckdb.connect(str(out / "data" / "results.duckdb"), read_only=True)
    try:
        copy.execute("SELECT tags FROM duckdb_databases() WHERE database_name = current_database()")
        assert copy.fetchall()[0][0]["storage_version"].startswith("v1.4.0")
        copy.execute("SELECT table_name FROM information_schema.tables")
        assert {name for (name,) in copy.fetchall()} == tables
        copy.execute("SELECT count(*) FROM logit_lens WHERE run_id = ?", [run_ids["hostile"]])
        assert copy.fetchall()[0][0] == expected
    finally:
        copy.close()
    with ResultsDB(out / "data" / "results.duckdb", read_only=True) as again:
        assert len(again.runs()) == 3


def test_every_page_has_provenance_and_theme(built: tuple[Path, Path, dict[str, str]]) -> None:
    db_path, out, _ = built
    import hashlib

    digest = hashlib.sha256(db_path.read_bytes()).hexdigest()
    for page in out.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "Generated by llava-interp" in text and digest[:16] in text, page
        assert "schema version" in text and 'id="theme-toggle"' in text and "static/theme.js" in text, page
    assert (out / ".nojekyll").is_file()
    css = (out / "static" / "site.css").read_text()
    assert '[data-theme="dark"]' in css and "prefers-color-scheme: dark" in css


def _quant_db(path: Path) -> str:
    """A 4x4 grid over a 28x28 view of a 56x56 image (scale 0.5, no offset); the object is
    the square (0, 0)-(28, 28) in the image, i.e. view (0, 0)-(14, 14): patches (0..1, 0..1)."""
    with ResultsDB(path) as db:
        db.add_image(
            5,
            "5.jpg",
            56,
            56,
            "coco",
            annotations=[
                {
                    "id": 1,
                    "category_id": 1,
                    "category": "hot dog",
                    "area": 784.0,
                    "bbox": [0, 0, 28, 28],
                    "segmentation": [[0, 0, 28, 0, 28, 28, 0, 28]],
                },
                {
                    "id": 2,
                    "category_id": 1,
                    "category": "hot dog",
                    "area": 1.0,
                    "bbox": [50, 50, 6, 6],
                    "iscrowd": 1,
                    "segmentation": {"size": [56, 56], "counts": [3130, 6]},
                },
            ],
        )
        run = db.start_run("lens", "m", {"model_id": "m"}, {"model_id": "m"})
        positions = _positions(run, 5, column_major=False)  # patch (r, c) at position 2 + 4r + c
        n_pos = positions.num_rows
        object_positions = {2 + 4 * r + c for r in (0, 1) for c in (0, 1)}
        cols: dict[str, list] = {k: [] for k in ("layer", "position", "rank", "token_id", "token", "prob")}
        for layer in range(N_LAYERS):
            for position in range(n_pos):
                tokens = ["x", "y", "z"]
                if position in object_positions:
                    obj = sorted(object_positions).index(position)
                    if layer == 1 and obj < 3:
                        tokens = ["\u2581Hot", "y", "z"]  # a word of the name, top-1
                    if layer == 2:
                        tokens = ["x", "dog", "z"] if obj < 2 else ["hotdog", "y", "z"]
                elif position == 2 + 4 * 3 + 3 and layer == 1:
                    tokens = ["hot", "y", "z"]  # outside the object: never counted
                for rank, token in enumerate(tokens, start=1):
                    cols["layer"].append(layer)
                    cols["position"].append(position)
                    cols["rank"].append(rank)
                    cols["token_id"].append(rank)
                    cols["token"].append(token)
                    cols["prob"].append(0.5 / rank)
        n = len(cols["layer"])
        tables = {
            "positions": positions,
            "logit_lens": pa.table(
                {
                    "run_id": [run] * n,
                    "image_id": pa.array([5] * n, pa.int64()),
                    "layer": pa.array(cols["layer"], pa.int16()),
                    "position": pa.array(cols["position"], pa.int32()),
                    "rank": pa.array(cols["rank"], pa.int16()),
                    "token_id": pa.array(cols["token_id"], pa.int32()),
                    "token": cols["token"],
                    "prob": pa.array(cols["prob"], pa.float64()),
                }
            ),
            "image_views": pa.table(
                {
                    "run_id": [run],
                    "image_id": pa.array([5], pa.int64()),
                    "png": pa.array([_png(28, 28)], pa.binary()),
                    "view_width": [28],
                    "view_height": [28],
                    "scale_x": [0.5],
                    "scale_y": [0.5],
                    "offset_x": [0.0],
                    "offset_y": [0.0],
                }
            ),
            "run_images": pa.table(
                {
                    "run_id": [run],
                    "image_id": pa.array([5], pa.int64()),
                    "n_positions": [n_pos],
                    "n_layers": [N_LAYERS],
                    "grid_rows": [GRID],
                    "grid_cols": [GRID],
                    "written_at": [dt.datetime(2025, 1, 2)],
                }
            ),
        }
        db.write_image_results(run, 5, tables)
        db.finish_run(run)
    return run


def test_quantitative_logit_lens(tmp_path: Path) -> None:
    from report.pages.quantitative import quantitative_lens

    db_path = tmp_path / "quant.duckdb"
    run = _quant_db(db_path)
    with ResultsDB(db_path, read_only=True) as db:
        result = quantitative_lens(db, run, "m", [(5, N_LAYERS, GRID, GRID)])
        hits = db.sql("SELECT layer, position, category, best_rank FROM lens_object_hits ORDER BY ALL")
    assert result is not None
    assert (result.n_images, result.n_objects, result.n_positions) == (1, 1, 4)
    assert result.top1 == [0.0, 0.75, 0.5]
    assert result.topk == [0.0, 0.75, 1.0]
    assert (result.peak_top1, result.peak_topk) == (1, 2)
    assert (1, 2 + 4 * 3 + 3, "hot dog", 1) in hits  # the view itself does not know about patches
    out = tmp_path / "site"
    build_site(db_path, out)
    page = (out / "quantitative.html").read_text(encoding="utf-8")
    assert "<svg" in page and "75.0%" in page and "at layer <strong>1</strong>" in page
    data = _load_data(out / "lens" / run_dir_name(run) / "5.data.js")
    (obj,) = data["objects"]
    assert obj["category"] == "hot dog" and obj["cells"] == [0, 1, 4, 5]
    polygon = obj["outlines"][0]["polygons"][0]
    assert polygon == [0, 0, 14, 0, 14, 14, 0, 14]
    assert obj["outlines"][1]["iscrowd"] and obj["outlines"][1]["bbox"] == [25, 25, 3, 3]
    index = (out / "index.html").read_text(encoding="utf-8")
    assert 'href="quantitative.html"' in index


def test_cli_serve_serves_the_site(tmp_path: Path, built: tuple[Path, Path, dict[str, str]]) -> None:
    import socket
    import time
    import urllib.request

    _, out, _ = built
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from report.cli import report; report()",
            "serve",
            "--dir",
            str(out),
            "--port",
            str(port),
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2) as response:
                    assert response.status == 200 and b"llava-interp" in response.read()
                break
            except OSError:
                if time.time() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=10)
    missing = CliRunner().invoke(report, ["serve", "--dir", str(tmp_path)])
    assert missing.exit_code != 0 and "build it first" in missing.output


# -- extra views (LLaVA-NeXT's high-resolution view) -------------------------------------

HR_ROWS, HR_COLS, HR_CELL = 3, 5, 10  # the high-resolution grid and its cell size in pixels


def make_extra_view_db(path: Path) -> dict[str, Any]:
    """A lens run on one image laid out as LLaVA-NeXT lays it out: text, a GRID x GRID base
    grid ('image'), an HR_ROWS x HR_COLS high-resolution grid ('image_hr', written in a
    shuffled order so only (patch_row, patch_col) can place it) with one 'image_newline'
    per HR row, text; plus the high-resolution view in extra_views."""
    rows = [("text", None, None, "USER")]
    rows += [("image", i // GRID, i % GRID, f"<IMG{i + 1:03d}>") for i in range(GRID * GRID)]
    cells = [(r, c) for r in range(HR_ROWS) for c in range(HR_COLS)]
    order = np.random.default_rng(5).permutation(len(cells))
    for k, index in enumerate(order):
        r, c = cells[index]
        rows.append(("image_hr", r, c, f"<HR {r},{c}>"))
        if k % HR_COLS == HR_COLS - 1:
            rows.append(("image_newline", k // HR_COLS, None, f"<NL {k // HR_COLS}>"))
    rows += [("text", None, None, "ASSISTANT")]
    image_id = 201
    with ResultsDB(path) as db:
        db.add_image(image_id, "000000000201.jpg", 500, 375, "coco")
        run = db.start_run("lens", "llava-hf/llava-v1.6-mistral-7b-hf", {"m": "next"}, {"model_id": "next"})
        positions = pa.table(
            {
                "run_id": [run] * len(rows),
                "image_id": pa.array([image_id] * len(rows), pa.int64()),
                "position": pa.array(range(len(rows)), pa.int32()),
                "kind": [row[0] for row in rows],
                "patch_row": pa.array([row[1] for row in rows], pa.int32()),
                "patch_col": pa.array([row[2] for row in rows], pa.int32()),
                "label": [row[3] for row in rows],
                "token_id": pa.array(range(len(rows)), pa.int32()),
            }
        )
        db.write_image_results(
            run,
            image_id,
            {
                "positions": positions,
                "logit_lens": _lens(run, image_id, len(rows), seed=11),
                "image_views": pa.table(
                    {
                        "run_id": [run],
                        "image_id": pa.array([image_id], pa.int64()),
                        "png": pa.array([_png(28, 28)], pa.binary()),
                        "view_width": [28],
                        "view_height": [28],
                        "scale_x": [0.5],
                        "scale_y": [0.5],
                        "offset_x": [0.0],
                        "offset_y": [0.0],
                    }
                ),
                "extra_views": pa.table(
                    {
                        "run_id": [run],
                        "image_id": pa.array([image_id], pa.int64()),
                        "name": ["high_res"],
                        "kind": ["image_hr"],
                        "png": pa.array([_png(HR_COLS * HR_CELL, HR_ROWS * HR_CELL)], pa.binary()),
                        "view_width": [HR_COLS * HR_CELL],
                        "view_height": [HR_ROWS * HR_CELL],
                        "grid_rows": [HR_ROWS],
                        "grid_cols": [HR_COLS],
                    }
                ),
                "run_images": pa.table(
                    {
                        "run_id": [run],
                        "image_id": pa.array([image_id], pa.int64()),
                        "n_positions": [len(rows)],
                        "n_layers": [N_LAYERS],
                        "grid_rows": [GRID],
                        "grid_cols": [GRID],
                        "written_at": [dt.datetime(2025, 1, 2)],
                    }
                ),
            },
        )
        db.finish_run(run)
    return {"run": run, "image_id": image_id}


def test_lens_page_shows_the_extra_view_with_every_hr_position_on_one_cell(
    tmp_path: Path, built: tuple[Path, Path, dict[str, str]]
) -> None:
    db_path = tmp_path / "next.duckdb"
    ids = make_extra_view_db(db_path)
    out = tmp_path / "site"
    build_site(db_path, out)
    folder = out / "lens" / run_dir_name(ids["run"])
    page = (folder / f"{ids['image_id']}.html").read_text(encoding="utf-8")
    assert 'id="patch-grid"' in page and 'id="extra-grid-0"' in page  # both panels
    data = _load_data(folder / f"{ids['image_id']}.data.js")
    (view,) = data["extra_views"]
    assert (view["name"], view["kind"], view["grid_rows"], view["grid_cols"]) == (
        "high_res",
        "image_hr",
        HR_ROWS,
        HR_COLS,
    )
    assert (view["width"], view["height"]) == (HR_COLS * HR_CELL, HR_ROWS * HR_CELL)
    assert f'src="{view["png"]}"' in page
    with ResultsDB(db_path, read_only=True) as db:
        (png,) = db.sql("SELECT png FROM extra_views")[0]
        hr = db.sql("SELECT position, patch_row, patch_col FROM positions WHERE kind = 'image_hr'")
    assert (folder / view["png"]).read_bytes() == bytes(png)
    # Every image_hr position maps to exactly one cell of the grid, and every cell to one position.
    pos = data["positions"]
    cell_of = {
        p: (r, c)
        for p, k, r, c in zip(pos["position"], pos["kind"], pos["patch_row"], pos["patch_col"])
        if k == "image_hr"
    }
    assert cell_of == {p: (r, c) for p, r, c in hr}
    assert sorted(cell_of.values()) == [(r, c) for r in range(HR_ROWS) for c in range(HR_COLS)]
    # Families without extra views: no second panel, an empty list in the data.
    _, built_out, run_ids = built
    plain = built_out / "lens" / run_dir_name(run_ids["clean"])
    assert "extra-grid" not in (plain / "102.html").read_text(encoding="utf-8")
    assert _load_data(plain / "102.data.js")["extra_views"] == []
    assert not list(plain.glob("*.extra*.png"))


@pytest.mark.parametrize(
    "sql, message",
    [
        ("UPDATE positions SET patch_row = 3 WHERE label = '<HR 0,0>'", "outside the 3x5 grid of view 'high_res'"),
        ("UPDATE positions SET patch_col = 1 WHERE label = '<HR 0,0>'", "two image_hr positions on cell (0, 1)"),
    ],
)
def test_unmappable_extra_view_cells_fail_loudly(tmp_path: Path, sql: str, message: str) -> None:
    db_path = tmp_path / "bad.duckdb"
    make_extra_view_db(db_path)
    _execute_sql(db_path, sql)
    with pytest.raises(ReportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_site(db_path, tmp_path / "site")
