"""Main-thread time of one hover on a LLaVA-1.5-shaped lens page (33 layers x 593 positions).

    PYTHONPATH=. .venv/bin/python bench/lens_page.py [--hovers 60] [--repeats 3] [--original-repo DIR]
        [--keep DIR] [--also OTHER_SITE/lens/<run>/1.html]

Builds a site from a synthetic 33-layer, 593-position (5 + 576 image + 12 text), top-5
database, opens its lens page in headless Chromium at 1280x800 and 1440x900 and moves the
real mouse: over patches (a new patch every frame), over table cells, and over patches with
a 400 ms rest on each (so the table's follow-scroll runs at every hover). From a Chromium
trace (CDP Tracing) it reports per hover the renderer main thread's CPU time (thread time
of every top-level task: event handlers, style, layout, hit tests, paint, layerize, commit,
timers), its wall time, the CPU time of each rendering phase, and the long tasks (> 50 ms
wall). CPU time is what to compare on a shared machine: wall time grows with other
processes' load, thread time much less. Pages are measured `--repeats` times, interleaved,
and the median is printed with the range and the load average.

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
                "token_pieces": pa.table(
                    {
                        "run_id": [run] * len(np.unique(tok)),
                        "token_id": pa.array(np.unique(tok).astype(np.int32)),
                        "piece": [words[i] for i in np.unique(tok)],
                        "text": [words[i] for i in np.unique(tok)],
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


# Chromium trace categories: top-level tasks (RunTask, with wall and thread-CPU durations)
# and the rendering phases inside them.
TRACE_CATEGORIES = "toplevel,devtools.timeline,disabled-by-default-devtools.timeline"
# Rendering phases reported per hover (trace event names on the renderer's main thread).
PHASES = {
    "style": ("UpdateLayoutTree",),
    "layout": ("Layout",),
    "hit test": ("HitTest", "LayoutView::HitTest"),
    "paint": ("Paint", "PrePaint"),
    "layerize": ("Layerize", "UpdateLayer", "Commit"),
    "script": ("FunctionCall", "EvaluateScript", "TimerFire", "FireAnimationFrame"),
}
# How a pointer sweeps: "patch" / "cell" move on at every frame; "rest" stays 400 ms on
# each patch, so the table's follow-scroll (after 350 ms) runs at every hover.
KINDS = ("patch", "cell", "rest")
REST_MS = 400


def _main_thread_stats(events: list[dict[str, Any]], hovers: int) -> dict[str, float]:
    """Per hover: main-thread CPU (thread time) and wall time of top-level tasks, CPU per
    rendering phase, and the long tasks (> 50 ms wall) among them."""
    names = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    main = {key for key, name in names.items() if name == "CrRendererMain"}
    tasks: list[tuple[float, float]] = []
    phases = dict.fromkeys(PHASES, 0.0)
    for e in events:
        if (e.get("pid"), e.get("tid")) not in main or e.get("ph") != "X":
            continue
        wall, cpu = e.get("dur", 0) / 1000, e.get("tdur", e.get("dur", 0)) / 1000
        if e["name"] == "ThreadControllerImpl::RunTask":
            tasks.append((wall, cpu))
        for phase, event_names in PHASES.items():
            if e["name"] in event_names:
                phases[phase] += cpu
    long_tasks = [wall for wall, _ in tasks if wall > 50]
    long_cpu = [cpu for _, cpu in tasks if cpu > 50]
    return {
        "cpu_ms": sum(cpu for _, cpu in tasks) / hovers,
        "wall_ms": sum(wall for wall, _ in tasks) / hovers,
        **{f"{phase}_ms": value / hovers for phase, value in phases.items()},
        "longtasks": len(long_tasks),
        "longest_ms": max((wall for wall, _ in tasks), default=0.0),
        # The same by thread time: what the page itself costs, whatever else runs on the machine.
        "longtasks_cpu": len(long_cpu),
        "longest_cpu_ms": max((cpu for _, cpu in tasks), default=0.0),
    }


def _traced(page: Any, cdp: Any, run: Any) -> list[dict[str, Any]]:
    """The trace events recorded while `run()` runs."""
    events: list[dict[str, Any]] = []
    done: list[bool] = []
    cdp.on("Tracing.dataCollected", lambda e: events.extend(e["value"]))
    cdp.on("Tracing.tracingComplete", lambda e: done.append(True))
    cdp.send("Tracing.start", {"categories": TRACE_CATEGORIES, "transferMode": "ReportEvents"})
    run()
    cdp.send("Tracing.end")
    while not done:
        page.wait_for_timeout(50)
    return events


def measure(
    browser: Any,
    url: str,
    image_selector: str,
    cell_selector: str,
    hovers: int,
    viewport: dict[str, int],
    ready: str | None = None,
) -> dict[str, dict[str, float]]:
    """Per hover kind (KINDS): main-thread CPU and wall ms per hover, CPU per phase, long tasks.

    Each hover is one real mouse move followed by two animation frames (the hover's
    rendering is done); the whole renderer main thread is counted (event handlers, style,
    layout, hit tests, paint, layerize, commit, timers), from a Chromium trace."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.goto(url)
    if ready:
        page.wait_for_selector(ready, timeout=60_000)
    page.wait_for_timeout(500)
    img = page.locator(image_selector).first.bounding_box()
    cells = page.locator(cell_selector)
    cell_boxes = [cells.nth(i).bounding_box() for i in range(min(cells.count(), 60))]
    cell_boxes = [
        b for b in cell_boxes if b and 0 < b["y"] < viewport["height"] - 10 and 0 < b["x"] < viewport["width"] - 10
    ]
    rng = np.random.default_rng(1)

    def patch_point() -> tuple[float, float]:
        u, v = rng.uniform(0.03, 0.97, 2)
        return img["x"] + u * img["width"], img["y"] + v * img["height"]

    def cell_point() -> tuple[float, float]:
        b = cell_boxes[int(rng.integers(len(cell_boxes)))]
        return b["x"] + b["width"] / 2, b["y"] + b["height"] / 2

    cdp = context.new_cdp_session(page)
    frames = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
    out = {}
    for kind in KINDS:
        if kind == "cell" and not cell_boxes:
            continue
        n = hovers if kind != "rest" else max(4, hovers // 6)
        points = [cell_point() if kind == "cell" else patch_point() for _ in range(n)]
        page.mouse.move(*points[0])  # warm up, then let any follow-scroll settle
        page.wait_for_timeout(REST_MS + 100)

        def sweep(points: list[tuple[float, float]] = points, kind: str = kind) -> None:
            for x, y in points:
                page.mouse.move(x, y)
                page.evaluate(frames)
                if kind == "rest":
                    page.wait_for_timeout(REST_MS)

        out[kind] = _main_thread_stats(_traced(page, cdp, sweep), n)
        page.mouse.move(2, 2)
    context.close()
    return out


def _chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    raise SystemExit("no Chromium binary found (apt-get install chromium, or set CHROMIUM=/path)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hovers", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3, help="measure each page this many times, interleaved")
    parser.add_argument("--original-repo", type=Path, default=os.environ.get("LLAVA_INTERP_ORIGINAL_REPO"))
    parser.add_argument("--keep", type=Path, help="build into this folder and keep it")
    parser.add_argument(
        "--also", type=Path, action="append", default=[], help="also measure this built lens page (A/B)"
    )
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="bench-lens-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    db_path = root / "bench.duckdb"
    if db_path.exists():
        db_path.unlink()
    run = make_db(db_path)
    build_site(db_path, root / "site", downloads=False)
    pages = {"this page": (root / "site" / "lens" / run_dir_name(run) / "1.html").resolve().as_uri()}
    for extra in args.also:
        pages[f"also {extra.parents[3].name}"[:15]] = extra.resolve().as_uri()  # named by the folder above site/
    why = "not measured: pass --original-repo (github.com/clemneo/llava-interp; needs torch)"
    if args.original_repo:
        try:
            pages["original page"] = original_page(Path(args.original_repo), root).resolve().as_uri()
        except Exception as error:  # noqa: BLE001 - the baseline is optional; say why it is missing
            why = f"not measured: {error}"

    selectors = {
        "original page": (".image-container img", "#logitLens td", None),
    }
    ours = ("#patch-grid", "#lens-table tbody td", "body[data-lens-ready]")
    args_chromium = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    loads = [os.getloadavg()[0]]
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=args_chromium)
        for _ in range(args.repeats):
            for viewport in VIEWPORTS:
                size = f"{viewport['width']}x{viewport['height']}"
                for name, url in pages.items():
                    image, cell, ready = selectors.get(name, ours)
                    for kind, stats in measure(browser, url, image, cell, args.hovers, viewport, ready).items():
                        results.setdefault((name, size, kind), []).append(stats)
                    loads.append(os.getloadavg()[0])
        browser.close()

    print(
        f"lens page hover, {N_LAYERS} layers x {N_POS} positions x top-{TOP_K}, {args.hovers} hovers per sweep, "
        f"{args.repeats} interleaved repeats; {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs, 1-min load average {min(loads):.1f}-{max(loads):.1f} during the run"
    )
    print(
        "per hover, renderer main thread: CPU ms (thread time of all tasks; median of repeats, min-max), wall ms, "
        "CPU ms of style / layout / hit test / paint / layerize+commit / script; long tasks in all repeats: "
        "> 50 ms wall (grows with the machine's load) and > 50 ms CPU, with the longest of each"
    )
    phases = [f"{p}_ms" for p in PHASES]
    header = f"{'page':<15}{'viewport':>10}{'hover':>7}{'CPU ms':>20}{'wall ms':>9}"
    header += "".join(f"{p[:8]:>9}" for p in PHASES) + f"{'long':>6}{'longest':>9}{'long CPU':>10}{'longest':>9}"
    print(header)
    for (name, size, kind), runs in results.items():
        cpu = sorted(r["cpu_ms"] for r in runs)
        line = f"{name:<15}{size:>10}{kind:>7}{float(np.median(cpu)):>8.1f} ({cpu[0]:.1f}-{cpu[-1]:.1f})".ljust(52)
        line += f"{float(np.median([r['wall_ms'] for r in runs])):>9.1f}"
        line += "".join(f"{float(np.median([r[p] for r in runs])):>9.1f}" for p in phases)
        line += f"{sum(int(r['longtasks']) for r in runs):>6d}{max(r['longest_ms'] for r in runs):>9.1f}"
        line += f"{sum(int(r['longtasks_cpu']) for r in runs):>10d}{max(r['longest_cpu_ms'] for r in runs):>9.1f}"
        print(line)
    if "original page" not in pages:
        print(f"{'original page':<15}{why}")
    else:
        for viewport in VIEWPORTS:
            size = f"{viewport['width']}x{viewport['height']}"
            for kind in KINDS:
                mine, theirs = results.get(("this page", size, kind)), results.get(("original page", size, kind))
                if mine and theirs:
                    ratio = np.median([r["cpu_ms"] for r in mine]) / max(np.median([r["cpu_ms"] for r in theirs]), 1e-9)
                    print(f"ratio this/original main-thread CPU per hover at {size}, {kind}: {ratio:.2f}")
    print(
        "target: <= 16 ms main-thread time per hover, no long tasks (absolute times depend on the machine's load;"
        " compare within one run, and CPU rather than wall time on a loaded machine)"
    )
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
