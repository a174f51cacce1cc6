"""How a published site scales with the run: size per image, largest file, build time and
peak memory, on synthetic databases with LLaVA-1.5's real vocabulary and depth.

Run: PYTHONPATH=. .venv/bin/python bench/site_scale.py [--images 200 1000 5000] [--jobs 1]
     [--no-downloads] [--console] [--rebuild] [--photo]

Each database is generated with DuckDB SQL (no model, seconds per thousand images): one
lens run, 33 hidden states x 593 positions (576 patches on a 24x24 grid + 17 text
positions), top-5, tokens drawn from the real LLaVA-1.5 vocabulary (tokenizer.json from
../shared/data when present, else 32064 made-up pieces) the way a real lens table looks
(the top-1 token persists over a few layers, the others are Zipf-like), float32
probabilities descending along rank, one COCO-style annotation per image and a small view
PNG, and the run's `token_pieces` rows (schema 9; databases generated before them have
none: the lens_tokens file then comes from the lens rows). Databases are cached under
--cache (default /tmp/llava-interp-bench).

With --photo every view is a real photo (the COCO sample, 336x336 PNG, ~225 KB) instead of
a flat 1 KB PNG, in a copy of the database: what the pictures cost (`report build --views`).

Printed per size: database size, site size, bytes per image (all included, and without
the pictures), the largest file, `report build` wall time and peak RSS of the build
process (a fresh `llava-interp report build` subprocess, measured with getrusage).
With --rebuild: a second build into the same folder, nothing changed (report/incremental.py
and the downloads' ExportCache keep what is unchanged), measured the same way.
With --console: bytes the SQL console's example queries move over HTTP range requests
(headless Chromium through Playwright, the site served by report/serve.py). With
--lens-page: bytes and requests one lens page view moves, by kind (a parquet-mode page,
`--build-args "--lens-data parquet"`, reads its image's rows of the lens Parquet file).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import duckdb  # noqa: E402

TOKENIZER = REPO.parent / "shared" / "data" / "real_configs" / "llava-hf__llava-1.5-7b-hf" / "tokenizer.json"
N_LAYERS, GRID, N_TEXT, TOP_K = 33, 24, 17, 5
N_POS = GRID * GRID + N_TEXT  # 593


def vocabulary() -> list[str]:
    if TOKENIZER.is_file():
        vocab = json.loads(TOKENIZER.read_text(encoding="utf-8"))["model"]["vocab"]
        words = [""] * (max(vocab.values()) + 1)
        for text, index in vocab.items():
            words[index] = text
        return words
    return [f"\u2581w{i}" if i % 3 else f"p{i}" for i in range(32064)]


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (336, 336), (120, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_database(path: Path, n_images: int) -> None:
    """A results database with one lens run of `n_images` images (see the module doc)."""
    from db.store import ResultsDB

    if path.exists():
        path.unlink()
    with ResultsDB(path) as db:
        run_id = db.start_run(
            "lens",
            "llava-hf/llava-1.5-7b-hf",
            {"model_id": "llava-hf/llava-1.5-7b-hf", "bench": n_images},
            {
                "model_id": "llava-hf/llava-1.5-7b-hf",
                "revision": "bench",
                "top_k": TOP_K,
                "prompt": "USER: <image>\nDescribe the image. ASSISTANT:",
            },
        )
    words = vocabulary()
    con = duckdb.connect(str(path))
    try:
        con.execute("SET preserve_insertion_order = true")
        import pyarrow as pa

        vocab_table = pa.table({"token_id": pa.array(range(len(words)), pa.int32()), "token": words})
        con.register("vocab_arrow", vocab_table)
        con.execute("CREATE TEMP TABLE vocab AS SELECT * FROM vocab_arrow")
        v = len(words)
        con.execute(f"""INSERT INTO images SELECT 1000000 + i, printf('%012d.jpg', 1000000 + i), 640, 480, 'coco'
                        FROM range({n_images}) t(i)""")
        # One square object per image over a quarter of the view.
        con.execute(f"""INSERT INTO annotations SELECT 1000000 + i, i, 17, 'cat', 40000.0,
                        [100.0, 100.0, 200.0, 200.0], false,
                        '[[100,100,300,100,300,300,100,300]]'::JSON FROM range({n_images}) t(i)""")
        con.execute(
            f"""INSERT INTO run_images SELECT ?, 1000000 + i, {N_POS}, {N_LAYERS}, {GRID}, {GRID},
                        TIMESTAMP '2025-01-01' FROM range({n_images}) t(i)""",
            [run_id],
        )
        con.execute(
            f"""INSERT INTO image_views SELECT ?, 1000000 + i, ?, 336, 336, 0.7, 0.7, 56.0, 0.0
                        FROM range({n_images}) t(i)""",
            [run_id, _png()],
        )
        n_before = 5
        con.execute(
            f"""
            INSERT INTO positions
            SELECT ?, 1000000 + i, p,
                   CASE WHEN p >= {n_before} AND p < {n_before + GRID * GRID} THEN 'image' ELSE 'text' END,
                   CASE WHEN p >= {n_before} AND p < {n_before + GRID * GRID} THEN (p - {n_before}) // {GRID} END,
                   CASE WHEN p >= {n_before} AND p < {n_before + GRID * GRID} THEN (p - {n_before}) % {GRID} END,
                   CASE WHEN p >= {n_before} AND p < {n_before + GRID * GRID}
                        THEN printf('<IMG%03d>', p - {n_before} + 1) ELSE 'tok' || p END,
                   p
            FROM range({n_images}) t(i), range({N_POS}) q(p)
            ORDER BY i, p""",
            [run_id],
        )
        # Lens rows: in image order (as the collector writes them), tokens realistic.
        chunk = 100
        for start in range(0, n_images, chunk):
            stop = min(n_images, start + chunk)
            con.execute(
                f"""
                INSERT INTO logit_lens
                WITH cells AS (
                    SELECT i, l, p, r,
                           -- uniform pseudo-random numbers from hashes of the cell
                           (hash(i, p, l // 4) % 1000003) / 1000003.0 AS u_top,
                           (hash(i, p, l // 2, r) % 1000003) / 1000003.0 AS u_tok,
                           (hash(i, l, p, r, 7) % 1000003) / 1000003.0 AS u_prob
                    FROM range({start}, {stop}) a(i), range({N_LAYERS}) b(l), range({N_POS}) c(p),
                         range(1, {TOP_K + 1}) d(r)
                ), ids AS (
                    SELECT i, l, p, r, u_prob,
                           (CASE WHEN r = 1 THEN floor(exp(pow(u_top, 1.5) * ln({v}))) - 1
                                 ELSE floor(exp(pow(u_tok, 1.5) * ln({v}))) - 1 END)::INTEGER % {v} AS token_id
                    FROM cells
                )
                SELECT ?, 1000000 + i, l::SMALLINT, p, r::SMALLINT, ids.token_id, vocab.token,
                       (0.95 * exp(-1.3 * (r - 1 + u_prob)))::FLOAT
                FROM ids JOIN vocab USING (token_id)
                ORDER BY i, l, p, r""",
                [run_id],
            )
        add_token_pieces(con)
        con.execute("CHECKPOINT")
    finally:
        con.close()


PHOTO = REPO.parent / "shared" / "data" / "coco_sample" / "images" / "000000039769.png"


def with_photo_views(db_path: Path, photo_path: Path) -> Path:
    """A copy of the database whose every view is the COCO sample photo at 336x336 (PNG),
    the size a real run's views have; made once, then reused."""
    if photo_path.exists():
        return photo_path
    if not PHOTO.is_file():
        sys.exit(f"--photo needs {PHOTO} (the project's ../shared/data)")
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(PHOTO) as image:
        image.convert("RGB").resize((336, 336)).save(buffer, format="PNG")
    partial = photo_path.with_suffix(".partial")
    subprocess.run(["cp", str(db_path), str(partial)], check=True)
    con = duckdb.connect(str(partial))
    try:
        con.execute("UPDATE image_views SET png = ?", [buffer.getvalue()])
        con.execute("CHECKPOINT")
    finally:
        con.close()
    partial.rename(photo_path)
    return photo_path


def add_token_pieces(con: duckdb.DuckDBPyConnection) -> None:
    """`token_pieces` rows (schema 9) for the ids of the lens rows, as the collector writes
    them: the lens rows' text (here the piece itself) once per (run, token id)."""
    con.execute(
        "INSERT INTO token_pieces SELECT d.run_id, d.token_id, d.token, d.token "
        "FROM (SELECT DISTINCT run_id, token_id, token FROM logit_lens) d "
        "ANTI JOIN token_pieces p ON p.run_id = d.run_id AND p.token_id = d.token_id"
    )


def _peak_rss_children_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def build(db_path: Path, out: Path, extra: list[str]) -> tuple[float, float, str]:
    """Build in a fresh process; (seconds, peak RSS MB, CLI output). The CPU time of the
    build and its workers is `cpu_seconds()` afterwards."""
    code = (
        "import sys; from report.cli import report; "
        "sys.exit(report.main(sys.argv[1:], prog_name='report', standalone_mode=True))"
    )
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-c", code, "build", "--db", str(db_path), "--out", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    seconds = time.perf_counter() - started
    # RUSAGE_CHILDREN is the maximum over waited-for children: measure one child per process.
    return seconds, _peak_rss_children_mb(), completed.stdout + completed.stderr


def cpu_seconds() -> float:
    """User + system CPU seconds of the waited-for children (the build and its workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def site_stats(out: Path) -> dict[str, float | str]:
    sizes = {p: p.stat().st_size for p in out.rglob("*") if p.is_file()}
    largest = max(sizes, key=sizes.__getitem__)
    pictures = sum(size for p, size in sizes.items() if p.suffix == ".png")
    return {
        "bytes": sum(sizes.values()),
        "pictures": pictures,
        "files": len(sizes),
        "largest": str(largest.relative_to(out)),
        "largest_bytes": sizes[largest],
    }


ONE_IMAGE_SQL = (
    "SELECT layer, position, rank, token, prob FROM logit_lens\n"
    "WHERE image_id = {image} AND layer = 16 AND position BETWEEN 100 AND 110\nORDER BY ALL;"
)


def console_bytes(out: Path, n_images: int, only: str = "") -> list[dict[str, object]]:
    """Bytes the SQL console moves per query (the site served by report/serve.py, counted
    by the server: every response body), each query in a fresh page after the console is
    ready: the site's example queries and ONE_IMAGE_SQL on an image in the middle."""
    import collections
    import threading

    from playwright.sync_api import sync_playwright

    from report.serve import serving

    sys.path.insert(0, str(REPO / "tests"))
    from test_site_browser import CHROMIUM_ARGS, _chromium

    counted: collections.Counter[str] = collections.Counter()
    requests: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def on_bytes(path: str, n: int) -> None:
        with lock:
            counted[path] += n
            requests[path] += 1

    page_html = (out / "sql.html").read_text(encoding="utf-8")
    import html
    import re

    examples = [
        (html.unescape(t), html.unescape(q))
        for q, t in re.findall(r'class="sql-example" data-sql="([^"]*)"[^>]*>([^<]*)</button>', page_html)
    ]
    examples.append(("one image, one layer, 11 positions", ONE_IMAGE_SQL.format(image=1000000 + n_images // 2)))
    examples = [(title, sql) for title, sql in examples if only in title]
    results = []
    with serving(out, on_bytes=on_bytes) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        for title, sql in examples:
            context = browser.new_context()
            page = context.new_page()
            with lock:
                counted.clear()
                requests.clear()
            page.goto(base + "sql.html")
            page.wait_for_selector("#sql-console[data-ready]", timeout=300_000)
            with lock:
                startup = sum(counted.values())
                counted.clear()
                requests.clear()
            started = time.perf_counter()
            page.fill("#sql-editor", sql)
            page.click("#sql-run")
            page.wait_for_function("!document.getElementById('sql-run').disabled", timeout=600_000)
            seconds = time.perf_counter() - started
            error = page.locator("#sql-error").inner_text() if page.locator("#sql-error").is_visible() else ""
            rows = page.locator("#sql-result tbody tr").count()
            with lock:
                moved = sum(v for k, v in counted.items() if k.endswith(".parquet"))
                ranges = sum(v for k, v in requests.items() if k.endswith(".parquet"))
            results.append(
                {
                    "query": title,
                    "parquet_bytes": moved,
                    "parquet_requests": ranges,
                    "rows": rows,
                    "seconds": round(seconds, 1),
                    "startup_bytes": startup,
                    "error": error[:200],
                }
            )
            print(json.dumps(results[-1]), flush=True)
            context.close()
        browser.close()
    return results


def lens_page_bytes(out: Path, n_images: int) -> dict[str, object]:
    """Bytes and requests a view of the lens page of the image in the middle moves (a fresh
    browser context: nothing cached), then the next image's page in the same tab, by kind,
    counted by report/serve.py."""
    import collections
    import threading

    from playwright.sync_api import sync_playwright

    from report.serve import serving

    sys.path.insert(0, str(REPO / "tests"))
    from test_site_browser import CHROMIUM_ARGS, _chromium

    counted: collections.Counter[str] = collections.Counter()
    requests: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def on_bytes(path: str, n: int) -> None:
        kind = (
            "lens Parquet" if "/logit_lens-" in path
            else "lens_tokens, token_pieces" if "/lens_tokens-" in path or "/token_pieces-" in path
            else "vendor (hyparquet)" if "/vendor/" in path
            else "lens page + data.js" if "/lens/" in path
            else "static"
        )  # fmt: skip
        with lock:
            counted[kind] += n
            requests[kind] += 1

    pages = [next(iter(sorted(out.glob(f"lens/*/{1000000 + n_images // 2 + k}.html")))) for k in (0, 1)]
    views = []
    with serving(out, on_bytes=on_bytes) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        context = browser.new_context()
        tab = context.new_page()
        for page in pages:  # the second in the same tab: what it has cached (reader, tokens, footer)
            with lock:
                counted.clear()
                requests.clear()
            started = time.perf_counter()
            tab.goto(base + page.relative_to(out).as_posix())
            tab.wait_for_selector("body[data-lens-ready]", timeout=120_000)
            with lock:
                views.append(
                    {
                        "lens_page_view": page.relative_to(out).as_posix(),
                        "seconds": round(time.perf_counter() - started, 2),
                        "kb": {k: round(v / 1e3, 1) for k, v in counted.most_common()},
                        "requests": dict(requests),
                        "total_kb": round(sum(counted.values()) / 1e3, 1),
                    }
                )
            print(json.dumps(views[-1]), flush=True)
        context.close()
        browser.close()
    return {"views": views}


def file_kinds(out: Path, n_images: int) -> dict[str, float]:
    """KB per image of each kind of file (lens pages, lens data, pictures, lens Parquet, ...)."""
    kinds: dict[str, int] = {}
    for path in out.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(out).as_posix()
        if rel.startswith("lens/"):
            kind = "lens " + ("data.js" if rel.endswith(".data.js") else path.suffix.lstrip("."))
        elif rel.startswith("downloads/"):
            stem = path.name.split("-")[0].split(".")[0]
            kind = f"download {stem} ({'csv' if '.csv' in path.name else 'parquet'})"
        elif rel.startswith("vendor/"):
            kind = "vendor (hyparquet)" if rel.startswith("vendor/hyparquet/") else "vendor (DuckDB-WASM)"
        else:
            kind = rel.split("/")[0]
        kinds[kind] = kinds.get(kind, 0) + path.stat().st_size
    return {k: round(v / n_images / 1e3, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def measure(db_path: Path, out: Path, n: int, args: argparse.Namespace, rebuild: bool) -> None:
    """One `report build` into `out` (a rebuild when the site is there): its numbers as JSON."""
    load_before = os.getloadavg()
    seconds, rss, output = build(db_path, out, args.build_args.split())
    print(output.strip(), flush=True)
    stats = site_stats(out)
    load = os.getloadavg()
    print(
        json.dumps(
            {
                "images": n,
                "rebuild": rebuild,
                "seconds": round(seconds, 1),
                "cpu_seconds": round(cpu_seconds(), 1),
                "peak_rss_mb": round(rss),
                "loadavg_before": [round(x, 1) for x in load_before],
                "loadavg_after": [round(x, 1) for x in load],
                **stats,
            }
        ),
        flush=True,
    )
    if rebuild:
        return
    print(json.dumps({"images": n, "kb_per_image": file_kinds(out, n)}), flush=True)
    if args.console:
        console_bytes(out, n, args.console_only)
    if args.lens_page:
        lens_page_bytes(out, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/llava-interp-bench"))
    parser.add_argument("--build-args", default="", help="extra `report build` options, e.g. '--jobs 2'")
    parser.add_argument("--only-db", action="store_true", help="generate the databases and stop")
    parser.add_argument("--console", action="store_true", help="also measure the SQL console's bytes per query")
    parser.add_argument("--keep", action="store_true", help="reuse an existing site (no build): --console only")
    parser.add_argument("--console-only", default="", help="only the console queries whose title holds this text")
    parser.add_argument(
        "--rebuild", action="store_true", help="then build again into the same folder, nothing changed, and measure it"
    )
    parser.add_argument("--lens-page", action="store_true", help="also measure the bytes one lens page view moves")
    parser.add_argument(
        "--photo",
        action="store_true",
        help="every view a real photo (the COCO sample in ../shared/data, 336x336 PNG, ~225 KB) instead of a "
        "flat 1 KB PNG: a copy of the database, lens-N-photo.duckdb",
    )
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.images:
        db_path = args.cache / f"lens-{n}.duckdb"
        if not db_path.exists():
            started = time.perf_counter()
            make_database(db_path, n)
            print(
                f"generated {db_path} ({db_path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s",
                flush=True,
            )
        if args.photo:
            db_path = with_photo_views(db_path, args.cache / f"lens-{n}-photo.duckdb")
        if args.only_db:
            continue
        out = args.cache / f"site-{n}{'-photo' if args.photo else ''}"
        if args.keep and out.exists():
            print(json.dumps({"images": n, "kb_per_image": file_kinds(out, n)}), flush=True)
            if args.console:
                console_bytes(out, n, args.console_only)
            if args.lens_page:
                lens_page_bytes(out, n)
            continue
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        for rebuild in [False, True] if args.rebuild else [False]:
            if os.fork() == 0:  # one child per measurement, so ru_maxrss is this build's alone
                measure(db_path, out, n, args, rebuild)
                os._exit(0)
            os.wait()
        results.append(n)


if __name__ == "__main__":
    main()
