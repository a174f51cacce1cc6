"""Main-thread time of one hover on a LLaVA-1.5-shaped lens page (33 layers x 593 positions).

    PYTHONPATH=. .venv/bin/python bench/lens_page.py [--hovers 60] [--original-repo DIR] [--keep DIR]

Builds a site from a synthetic 33-layer, 593-position (5 + 576 image + 12 text), top-5
database, opens its lens page in headless Chromium at 1280x800 and moves the real mouse
over patches and table cells. Per hover it reports main-thread task time (Chrome's
Performance.getMetrics TaskDuration, so script + style + layout + paint + layerize, the
same counter for every page), style recalculation and layout time, and the long tasks
(> 50 ms, PerformanceObserver) seen while hovering.

The baseline is the original paper's page (github.com/clemneo/llava-interp,
src/lvlm_lens.py, `create_interactive_logit_lens`), generated in the same run from the
same shape of data: pass `--original-repo` (a checkout or bare clone of that repository;
its generator needs torch) or set LLAVA_INTERP_ORIGINAL_REPO. Without it the baseline
line says why it is missing. Nothing of the original is copied here: its generator is
loaded from that folder at run time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from db.store import ResultsDB  # noqa: E402
from report.build import build_site, run_dir_name  # noqa: E402

N_LAYERS, GRID, TOP_K = 33, 24, 5
N_PRE, N_POST = 5, 12
N_POS = N_PRE + GRID * GRID + N_POST  # 593
VOCAB = 32000
VIEWPORTS = ({"width": 1280, "height": 800}, {"width": 1440, "height": 900})


def make_db(path: Path, seed: int = 3) -> str:
    """A 33 x 593 x top-5 lens image with lens-like tokens (a top-1 that persists across layers)."""
    rng = np.random.default_rng(seed)
    words = [f"\u2581w{i}" if i % 4 else f"w{i}" for i in range(VOCAB)]

    def draw(n: int) -> np.ndarray:
        return np.minimum(rng.zipf(1.4, n), VOCAB) - 1

    tok = np.zeros((N_LAYERS, N_POS, TOP_K), dtype=np.int64)
    current = draw(N_POS)
    for layer in range(N_LAYERS):
        current = np.where(rng.random(N_POS) < 0.7, current, draw(N_POS))
        tok[layer, :, 0] = current
        tok[layer, :, 1:] = draw(N_POS * (TOP_K - 1)).reshape(N_POS, TOP_K - 1)
    prob = np.sort(rng.dirichlet(np.full(TOP_K + 15, 0.3), (N_LAYERS, N_POS)), axis=-1)[:, :, ::-1][:, :, :TOP_K]
    layer, position, rank = (
        a.ravel() for a in np.meshgrid(np.arange(N_LAYERS), np.arange(N_POS), np.arange(1, TOP_K + 1), indexing="ij")
    )
    kinds = ["text"] * N_PRE + ["image"] * (GRID * GRID) + ["text"] * N_POST
    patch = [None] * N_PRE + list(range(GRID * GRID)) + [None] * N_POST
    labels = [f"<IMG{p + 1:03d}>" if p is not None else f"t{i}" for i, p in enumerate(patch)]
    n = len(layer)
    with ResultsDB(path) as db:
        db.add_image(1, "000000000001.jpg", 640, 480, "coco")
        run = db.start_run(
            "lens",
            "bench/model",
            {"model_id": "bench/model"},
            {"model_id": "bench/model", "top_k": TOP_K, "prompt": "USER: <image>\nDescribe."},
        )
        view = _png(336, 336, rng)
        db.write_image_results(
            run,
            1,
            {
                "positions": pa.table(
                    {
                        "run_id": [run] * N_POS,
                        "image_id": pa.array([1] * N_POS, pa.int64()),
                        "position": pa.array(range(N_POS), pa.int32()),
                        "kind": kinds,
                        "patch_row": pa.array([None if p is None else p // GRID for p in patch], pa.int32()),
                        "patch_col": pa.array([None if p is None else p % GRID for p in patch], pa.int32()),
                        "label": labels,
                        "token_id": pa.array(range(N_POS), pa.int32()),
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
                "image_views": pa.table(
                    {
                        "run_id": [run],
                        "image_id": pa.array([1], pa.int64()),
                        "png": [view],
                        "view_width": [336],
                        "view_height": [336],
                        "scale_x": [336 / 640],
                        "scale_y": [336 / 480],
                        "offset_x": [0.0],
                        "offset_y": [0.0],
                    }
                ),
                "run_images": pa.table(
                    {
                        "run_id": [run],
                        "image_id": pa.array([1], pa.int64()),
                        "n_positions": [N_POS],
                        "n_layers": [N_LAYERS],
                        "grid_rows": [GRID],
                        "grid_cols": [GRID],
                        "written_at": [dt.datetime(2025, 1, 1)],
                    }
                ),
            },
        )
        db.finish_run(run)
    return run


def _png(width: int, height: int, rng: np.random.Generator) -> bytes:
    import io

    from PIL import Image

    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def original_page(repo: Path, out: Path) -> Path:
    """The original project's lens page for the same shape, generated by its own code."""
    source = out / "lvlm_lens.py"
    if (repo / "src" / "lvlm_lens.py").is_file():
        shutil.copyfile(repo / "src" / "lvlm_lens.py", source)
    else:  # a bare clone
        text = subprocess.run(
            ["git", "--git-dir", str(repo), "show", "HEAD:src/lvlm_lens.py"], capture_output=True, text=True, check=True
        ).stdout
        source.write_text(text)
    spec = importlib.util.spec_from_file_location("original_lvlm_lens", source)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    import torch
    from PIL import Image

    torch.manual_seed(0)
    d, vocab = 16, 2000

    class Tokenizer:
        def encode(self, prompt: str) -> list[int]:
            return [1] * N_PRE + [32000] + [2] * N_POST

        def decode(self, ids: Any) -> str:
            value = int(ids[0] if isinstance(ids, list) else ids)
            return f"w{value}"

    hidden = [torch.randn(1, N_POS, d) for _ in range(N_LAYERS)]
    lm_head = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        module.create_interactive_logit_lens(
            hidden,
            torch.nn.Identity(),
            lm_head,
            Tokenizer(),
            Image.new("RGB", (336, 336), (120, 90, 60)),
            "bench",
            "bench.jpg",
            "prompt",
            save_folder=str(out),
        )
    pages = sorted(out.glob("*.html"))
    if not pages:
        raise RuntimeError("the original generator wrote no page")
    return pages[0]


LONGTASKS = """
window.__longtasks = [];
try {
  new PerformanceObserver(function (list) {
    list.getEntries().forEach(function (e) { window.__longtasks.push(e.duration); });
  }).observe({ entryTypes: ["longtask"] });
} catch (e) {}
"""


def _metrics(cdp: Any) -> dict[str, float]:
    return {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}


def measure(
    browser: Any,
    url: str,
    image_selector: str,
    cell_selector: str,
    hovers: int,
    viewport: dict[str, int],
    ready: str | None = None,
) -> dict[str, float]:
    """Per hover: main-thread task, style and layout ms; long tasks while hovering."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.add_init_script(LONGTASKS)
    page.goto(url)
    if ready:
        page.wait_for_selector(ready, timeout=60_000)
    page.wait_for_timeout(500)
    img = page.locator(image_selector).first.bounding_box()
    cells = page.locator(cell_selector)
    cell_boxes = [cells.nth(i).bounding_box() for i in range(min(cells.count(), 40))]
    cell_boxes = [
        b for b in cell_boxes if b and 0 < b["y"] < viewport["height"] - 10 and b["x"] < viewport["width"] - 10
    ]
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    rng = np.random.default_rng(1)
    points = []
    for i in range(hovers):
        if i % 2 == 0 or not cell_boxes:
            u, v = rng.uniform(0.03, 0.97, 2)
            points.append((img["x"] + u * img["width"], img["y"] + v * img["height"]))
        else:
            b = cell_boxes[int(rng.integers(len(cell_boxes)))]
            points.append((b["x"] + b["width"] / 2, b["y"] + b["height"] / 2))
    # Warm up once, then measure.
    page.mouse.move(*points[0])
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    page.evaluate("window.__longtasks = []")
    before = _metrics(cdp)
    for x, y in points:
        page.mouse.move(x, y)
        page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    after = _metrics(cdp)
    longtasks = page.evaluate("window.__longtasks")
    context.close()

    def per(name: str) -> float:
        return 1000 * (after.get(name, 0) - before.get(name, 0)) / hovers

    return {
        "task_ms": per("TaskDuration"),
        "style_ms": per("RecalcStyleDuration"),
        "layout_ms": per("LayoutDuration"),
        "script_ms": per("ScriptDuration"),
        "longtasks": len(longtasks),
        "longest_ms": max(longtasks, default=0.0),
    }


def _chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    raise SystemExit("no Chromium binary found (apt-get install chromium, or set CHROMIUM=/path)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hovers", type=int, default=60)
    parser.add_argument("--original-repo", type=Path, default=os.environ.get("LLAVA_INTERP_ORIGINAL_REPO"))
    parser.add_argument("--keep", type=Path, help="build into this folder and keep it")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="bench-lens-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    db_path = root / "bench.duckdb"
    if db_path.exists():
        db_path.unlink()
    run = make_db(db_path)
    build_site(db_path, root / "site", downloads=False)
    lens_url = (root / "site" / "lens" / run_dir_name(run) / "1.html").resolve().as_uri()
    original_url, why = None, "not measured: pass --original-repo (github.com/clemneo/llava-interp; needs torch)"
    if args.original_repo:
        try:
            original_url = original_page(Path(args.original_repo), root).resolve().as_uri()
        except Exception as error:  # noqa: BLE001 - the baseline is optional; say why it is missing
            why = f"not measured: {error}"

    args_chromium = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=args_chromium)
        results = {}
        for viewport in VIEWPORTS:
            size = f"{viewport['width']}x{viewport['height']}"
            results[("this page", size)] = measure(
                browser,
                lens_url,
                "#patch-grid",
                "#lens-table tbody td",
                args.hovers,
                viewport,
                ready="body[data-lens-ready]",
            )
            if original_url:
                results[("original page", size)] = measure(
                    browser, original_url, ".image-container img", "#logitLens td", args.hovers, viewport
                )
        browser.close()

    print(
        f"lens page hover, {N_LAYERS} layers x {N_POS} positions x top-{TOP_K}, {args.hovers} hovers per page "
        "(half patches, half table cells), main-thread time per hover"
    )
    print(
        f"{'page':<15}{'viewport':>10}{'main thread ms':>16}{'style ms':>10}{'layout ms':>11}{'script ms':>11}"
        f"{'long tasks':>12}{'longest ms':>12}"
    )
    for (name, size), r in results.items():
        print(
            f"{name:<15}{size:>10}{r['task_ms']:>16.1f}{r['style_ms']:>10.1f}{r['layout_ms']:>11.1f}"
            f"{r['script_ms']:>11.1f}{r['longtasks']:>12d}{r['longest_ms']:>12.1f}"
        )
    if not original_url:
        print(f"{'original page':<15}{why}")
    else:
        for viewport in VIEWPORTS:
            size = f"{viewport['width']}x{viewport['height']}"
            ratio = results[("this page", size)]["task_ms"] / max(results[("original page", size)]["task_ms"], 1e-9)
            print(f"ratio this/original main-thread time per hover at {size}: {ratio:.2f}")
    print(
        "target: <= 16 ms main-thread time per hover, no long tasks (absolute times depend on the machine's load;"
        " compare within one run)"
    )
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
