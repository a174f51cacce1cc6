"""The GPU bench: LLaVA-1.5-7B-shaped, random bf16 weights, built on the device (no network).

Sections (each runs even if another failed; its error is printed and recorded):

- lens: `collect lens` through the project's public API (`collect_lens`, runner, DuckDB in a
  temporary folder) on --images synthetic 640x480 images, after one untimed warm-up image.
  Prints ms per image, images/s, model FLOPs / wall time as a share of the device's bf16
  peak, the share of wall time the device is busy, and peak device memory.
  FLOPs per image = 2 x vision params x 577 + 2 x LM params (input embedding table excluded)
  x T + 4 x layers x T^2 x d_model (attention) + 2 x d_model x vocab x T x (layers + 1)
  (the lens), T the prompt length. Device busy = the sum over images of the CUDA-event time
  from the model forward's start to the lens's last unembedding, over wall time (kernel gaps
  inside a span count as busy, so it is an upper bound on kernel occupancy).
- ablation: bench/ablation.py's comparison (the paper's full protocol vs the original's
  per-image work) on --ablation-images images, answers fixed at --max-new-tokens tokens.
- blocking: bench/blocking.py's comparison (every condition vs the original's one full forward
  per condition, pairwise and vectorised masks; sampled conditions, extrapolated).
- two-devices: with two or more GPUs, lens on one device vs two processes on two devices
  (aggregate images/s ratio); skipped with one device.

    bash bench/gpu.sh                                  # on the GPU machine (defaults below)
    PYTHONPATH=. python bench/gpu.py --device cpu --shape tiny --images 2   # smoke test, seconds

Results also go to $OUT/bench_gpu.json (or --json). Reference peak: --peak-tflops, default
989 (H100/H200 SXM, dense bf16, no sparsity).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.models import (  # noqa: E402
    SHAPES,
    build_model,
    describe,
    environment,
    project_lens,
    synchronize,
    write_synthetic_images,
)

H100_BF16_DENSE_TFLOPS = 989.0


class SpanTimer:
    """CUDA-event spans from each model forward's start to the last unembedding call after it."""

    def __init__(self, loaded: Any) -> None:
        self.spans: list[list[Any]] = []
        self.enabled = torch.cuda.is_available() and str(loaded.device).startswith("cuda")
        self.handles = []
        if self.enabled:
            self.handles.append(loaded.model.register_forward_pre_hook(self._start))
            self.handles.append(loaded.adapter.unembedding.register_forward_hook(self._end))

    def _start(self, module: Any, args: Any) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.spans.append([event, None])

    def _end(self, module: Any, args: Any, output: Any) -> None:
        if self.spans:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.spans[-1][1] = event

    def busy_seconds(self) -> float | None:
        if not self.enabled:
            return None
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.spans if end is not None) / 1000

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def lens_flops_per_image(loaded: Any, n_positions: int) -> float:
    model = loaded.model
    text = model.config.text_config
    vision_params = sum(
        p.numel() for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n
    )
    embedding_params = loaded.adapter.input_embeddings.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    lm_params = total - vision_params - embedding_params
    layers, d, vocab = loaded.adapter.n_layers, text.hidden_size, text.vocab_size
    image_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 + 1
    return (
        2 * vision_params * image_tokens
        + 2 * lm_params * n_positions
        + 4 * layers * n_positions**2 * d
        + 2 * d * vocab * n_positions * (layers + 1)
    )


def section_lens(bench_model: Any, work: Path, n_images: int, peak_tflops: float) -> dict[str, Any]:
    loaded = bench_model.loaded
    device = str(loaded.device)
    records, _, _ = write_synthetic_images(work / "lens-images", n_images + 1, seed=7)
    project_lens(loaded, records[:1], work / "lens-warmup.duckdb")
    inputs = loaded.adapter.build_inputs(records[1].load(), "Describe the image.")
    n_positions = int(inputs["input_ids"].shape[1])
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = SpanTimer(loaded)
    try:
        synchronize(device)
        start = time.perf_counter()
        summary = project_lens(loaded, records[1:], work / "lens.duckdb")
        synchronize(device)
        wall = time.perf_counter() - start
        busy = timer.busy_seconds()
    finally:
        timer.close()
    flops = lens_flops_per_image(loaded, n_positions)
    result = {
        "images": summary.images_kept,
        "positions": n_positions,
        "wall_s": wall,
        "ms_per_image": 1000 * wall / n_images,
        "images_per_s": n_images / wall,
        "flops_per_image": flops,
        "achieved_tflops": flops * n_images / wall / 1e12,
        "peak_tflops": peak_tflops,
        "device_busy_share": busy / wall if busy is not None else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    result["mfu"] = result["achieved_tflops"] / peak_tflops
    return result


def print_lens(r: dict[str, Any]) -> None:
    busy = f"{100 * r['device_busy_share']:.1f}%" if r["device_busy_share"] is not None else "n/a (not a CUDA device)"
    memory = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else "n/a (not a CUDA device)"
    print(f"lens: {r['images']} images, {r['positions']} positions each")
    print(f"lens: {r['ms_per_image']:.1f} ms/image")
    print(f"lens: {r['images_per_s']:.2f} images/s")
    print(
        f"lens: model FLOPs {r['flops_per_image'] / 1e12:.3g} TFLOP/image, {r['achieved_tflops']:.3g} TFLOP/s = "
        f"{100 * r['mfu']:.3g}% of bf16 peak ({r['peak_tflops']:.0f} TFLOP/s)"
    )
    print(f"lens: device busy {busy} of wall time")
    print(f"lens: peak device memory {memory}")


def section_two_devices(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Lens throughput of two processes on two devices over one process on one device."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return {
            "skipped": f"needs 2 CUDA devices, found {torch.cuda.device_count() if torch.cuda.is_available() else 0}"
        }
    script = Path(__file__).resolve()

    def launch(device: str, out: Path) -> subprocess.Popen:
        command = [
            sys.executable,
            str(script),
            "--device",
            device,
            "--shape",
            args.shape,
            "--images",
            str(args.images),
            "--sections",
            "lens",
            "--json",
            str(out),
        ]
        return subprocess.Popen(
            command,
            env={**os.environ, "PYTHONPATH": str(script.parents[1])},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def lens_rate(out: Path) -> float:
        return json.loads(out.read_text())["sections"]["lens"]["images_per_s"]

    one = launch("cuda:0", work / "one.json")
    one.wait()
    pair = [launch(f"cuda:{i}", work / f"two-{i}.json") for i in range(2)]
    for process in pair:
        process.wait()
    single = lens_rate(work / "one.json")
    both = sum(lens_rate(work / f"two-{i}.json") for i in range(2))
    return {"one_device_images_per_s": single, "two_devices_images_per_s": both, "ratio": both / single}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="7b", choices=SHAPES)
    parser.add_argument("--dtype", default=None, help="default bfloat16 for 7b, float32 otherwise")
    parser.add_argument("--images", type=int, default=32, help="lens images (timed, after one warm-up image)")
    parser.add_argument("--ablation-images", type=int, default=1)
    parser.add_argument("--blocking-images", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generative answer length (paper: 200)")
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--baseline-conditions", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sections", default="lens,ablation,blocking,two-devices")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--json", default=None, help="default: $OUT/bench_gpu.json when $OUT is set")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--layers", type=int, default=None, help="7b shape only: fewer LM layers (to test on a CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    json_path = (
        Path(args.json)
        if args.json
        else (Path(os.environ["OUT"]) / "bench_gpu.json" if os.environ.get("OUT") else None)
    )
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "environment": environment(),
        "sections": {},
        "errors": {},
    }

    def save() -> None:
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=1, default=str))

    print("environment: " + json.dumps(report["environment"]))
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(args.device))
        print(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(tmp)
        try:
            bench_model = build_model(args.shape, work / "model", args.device, args.dtype, n_layers=args.layers)
        except Exception as error:  # nothing else can run
            report["errors"]["build"] = traceback.format_exc()
            print(f"build: FAILED {type(error).__name__}: {error}")
            save()
            raise SystemExit(1) from None
        report["model"] = describe(bench_model)
        print(f"model: {report['model']}; built in {bench_model.build_seconds:.1f} s")
        save()

        def run_section(name: str, body: Callable[[], dict[str, Any]], show: Callable[[dict[str, Any]], None]) -> None:
            if name not in args.sections.split(","):
                return
            section_start = time.perf_counter()
            try:
                result = body()
                result["section_seconds"] = time.perf_counter() - section_start
                report["sections"][name] = result
                show(result)
            except Exception as error:
                report["errors"][name] = traceback.format_exc()
                print(f"{name}: FAILED {type(error).__name__}: {error}")
                traceback.print_exc()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            print(f"{name}: section took {time.perf_counter() - section_start:.1f} s")
            save()

        from bench.ablation import print_ablation, run_ablation_bench
        from bench.blocking import print_blocking, run_blocking_bench

        run_section("lens", lambda: section_lens(bench_model, work / "lens", args.images, args.peak_tflops), print_lens)
        run_section(
            "ablation",
            lambda: run_ablation_bench(
                bench_model,
                work / "ablation",
                args.ablation_images,
                args.max_new_tokens,
                args.ig_steps,
                batch_size=args.batch_size,
                warmup=True,
            ),
            lambda r: (
                print_ablation(r, "  ")
                or print(f"ablation: {r['project_s_per_image'] * 1000:.0f} ms/image, ratio {r['ratio']:.2f}x")
            ),
        )
        run_section(
            "blocking",
            lambda: run_blocking_bench(
                bench_model,
                work / "blocking",
                args.blocking_images,
                args.baseline_conditions,
                batch_size=args.batch_size,
                warmup=True,
            ),
            lambda r: (
                print_blocking(r, "  ")
                or print(
                    f"blocking: {r['project_s_per_image'] * 1000:.0f} ms/image, ratio {r['ratio_vectorised']:.2f}x "
                    f"(vectorised-mask baseline), {r['ratio_pairwise']:.2f}x (pairwise, as the original)"
                )
            ),
        )
        bench_model = None  # frees the device for the two-device section (the sections above have run)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        run_section(
            "two-devices",
            lambda: section_two_devices(args, work / "two"),
            lambda r: print(
                f"two-devices: {r['skipped']}"
                if "skipped" in r
                else f"two-devices: {r['two_devices_images_per_s']:.2f} vs {r['one_device_images_per_s']:.2f} images/s, "
                f"ratio {r['ratio']:.2f}x"
            ),
        )
    report["total_seconds"] = time.perf_counter() - started
    save()
    print(f"total: {report['total_seconds']:.1f} s; errors in: {', '.join(report['errors']) or 'none'}")
    if json_path is not None:
        print(f"json: {json_path}")


if __name__ == "__main__":
    main()
