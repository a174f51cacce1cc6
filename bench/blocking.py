"""Attention blocking: the project vs the original code's per-image work.

Mimics scripts/attention_experiment_curate.py of github.com/clemneo/llava-interp (see
bench/original.py): per condition a full `model.forward(image, prompt)` (processor, vision
tower, LM, every position's logits) with per-layer hooks that build the blocked mask. The
project side is `collect_blocking` (runner, DuckDB writes included; curation off since random
weights never answer right) over every source set x target set x layer window (the paper's
presets and a sliding window at every layer). The baseline runs the same conditions.

Two baselines, both with the original's forwards: `pairwise` clears the blocked (query, key)
pairs one at a time as the original's hook does; `vectorised` builds the same mask in one
indexing operation (a stricter baseline). With many conditions the baseline times an evenly
spaced sample of --baseline-conditions conditions per image and extrapolates to all of them
(the per-image fixed work is timed in full); `--baseline-conditions 0` times every one.

    PYTHONPATH=. python bench/blocking.py [--shape tiny|real-vocab|tiny,real-vocab] [--images 1]

Prints seconds per image for each side, the ratios, and how many conditions were timed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.models import (  # noqa: E402
    SHAPES,
    Stopwatch,
    build_model,
    describe,
    project_blocking,
    synchronize,
    write_synthetic_images,
)
from bench.original import OriginalModel, original_blocking_image  # noqa: E402

MASK_MODES = ("pairwise", "vectorised")


def _conditions(loaded: Any, record: Any, question: str, window: int) -> tuple[list[Any], str]:
    """The project's conditions for this image (same positions, same windows) and the prompt."""
    from collector.blocking.experiment import (
        conditions_for,
        preset_windows,
        sliding_windows,
        source_sets,
        target_sets,
    )
    from collector.targets import object_cells
    from collector.vqa import vqa_prompt

    adapter = loaded.adapter
    text = vqa_prompt(adapter, question)
    inputs = adapter.build_inputs_for_text(record.load(), text)
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    annotation = record.annotations[0]
    cells = object_cells(
        annotation["segmentation"], adapter, record.width, record.height, layout.grid_rows, layout.grid_cols
    )
    windows = preset_windows(adapter.n_layers) + sliding_windows(adapter.n_layers, window)
    conditions = conditions_for(source_sets(cells, layout), target_sets(layout, inputs["input_ids"].shape[1]), windows)
    return conditions, text


def _sample(items: list[Any], n: int) -> list[Any]:
    if n <= 0 or n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step + step / 2)] for i in range(n)]


def run_blocking_bench(
    bench_model: Any,
    work: Path,
    n_images: int,
    baseline_conditions: int = 24,
    rounds: int = 1,
    batch_size: int = 16,
    window: int = 9,
    warmup: bool = False,
    mask_modes: tuple[str, ...] = MASK_MODES,
) -> dict[str, Any]:
    loaded = bench_model.loaded
    device = loaded.device
    records, annotation_file, questions = write_synthetic_images(work / "blocking-images", n_images + int(warmup))
    warm, records = (records[:1], records[1:]) if warmup else ([], records)
    om = OriginalModel(loaded)
    runs = iter(range(10**6))
    plans = {r.image_id: _conditions(loaded, r, questions[r.image_id][0], window) for r in records + warm}

    def project(batch: list) -> float:
        synchronize(device)
        start = time.perf_counter()
        summary = project_blocking(
            loaded, batch, work / f"blocking-{next(runs)}.duckdb", annotation_file, questions, batch_size, window
        )
        synchronize(device)
        assert summary.images_kept == len(batch), summary
        return time.perf_counter() - start

    def baseline(batch: list, mode: str, watch: Stopwatch, n_sample: int = baseline_conditions) -> float:
        """Estimated seconds for `batch`: fixed work + sampled conditions scaled to all."""
        total = 0.0
        for record in batch:
            conditions, prompt = plans[record.image_id]
            sample = _sample(conditions, n_sample)
            annotation = record.annotations[0]
            before = dict(watch.seconds)
            original_blocking_image(
                om, record.load(), annotation["segmentation"], annotation["category"], prompt, sample, mode, watch
            )
            spent = {k: v - before.get(k, 0.0) for k, v in watch.seconds.items()}
            for label, seconds in spent.items():
                scale = len(conditions) / len(sample) if label.startswith("conditions") else 1.0
                total += seconds * scale
        return total

    if warm:
        project(warm)
        for mode in mask_modes:
            baseline(warm, mode, Stopwatch(device), n_sample=2)
    totals = {"project": 0.0, **{mode: 0.0 for mode in mask_modes}}
    watches = {mode: Stopwatch(device) for mode in mask_modes}
    for round_index in range(rounds):
        sides = ["project", *mask_modes]
        if round_index % 2:
            sides.reverse()
        for side in sides:
            totals[side] += project(records) if side == "project" else baseline(records, side, watches[side])
    n = len(records) * rounds
    n_conditions = sum(len(plans[r.image_id][0]) for r in records) / len(records)
    timed = sum(len(_sample(plans[r.image_id][0], baseline_conditions)) for r in records) / len(records)
    result = {
        "shape": bench_model.shape,
        "model": describe(bench_model),
        "images": len(records),
        "rounds": rounds,
        "conditions_per_image": n_conditions,
        "baseline_conditions_timed_per_image": timed,
        "batch_size": batch_size,
        "window": window,
        "project_s_per_image": totals["project"] / n,
    }
    for mode in mask_modes:
        result[f"baseline_{mode}_s_per_image"] = totals[mode] / n
        result[f"baseline_{mode}_phases_s"] = {k: v / n for k, v in watches[mode].seconds.items()}
        result[f"ratio_{mode}"] = totals[mode] / totals["project"]
    return result


def print_blocking(result: dict[str, Any], prefix: str = "") -> None:
    print(
        f"{prefix}blocking on {result['model']}; {result['images']} images x {result['rounds']} rounds, "
        f"{result['conditions_per_image']:.0f} conditions per image (baseline: "
        f"{result['baseline_conditions_timed_per_image']:.0f} timed per image, extrapolated)"
    )
    print(
        f"{prefix}  project  (collect_blocking, batch {result['batch_size']}): "
        f"{result['project_s_per_image']:.3f} s/image = {3600 / result['project_s_per_image']:.0f} images/h"
    )
    for mode in MASK_MODES:
        if f"ratio_{mode}" not in result:
            continue
        seconds = result[f"baseline_{mode}_s_per_image"]
        print(
            f"{prefix}  baseline (original forwards, {mode} mask): {seconds:.3f} s/image = "
            f"{3600 / seconds:.0f} images/h; ratio baseline/project {result[f'ratio_{mode}']:.2f}x"
        )
        for phase, phase_seconds in result[f"baseline_{mode}_phases_s"].items():
            print(f"{prefix}      timed {phase}: {phase_seconds:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape",
        default="tiny",
        help=f"comma-separated, of {', '.join(SHAPES)} (real-vocab: ~3-4 min on 1 CPU thread)",
    )
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--baseline-conditions",
        type=int,
        default=24,
        help="conditions the baseline times per image, extrapolated (0: all)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--warmup", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see bench/ablation.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    with tempfile.TemporaryDirectory(prefix="bench-blocking-") as tmp:
        for shape in args.shape.split(","):
            work = Path(tmp) / shape
            bench_model = build_model(shape, work, args.device, args.dtype)
            result = run_blocking_bench(
                bench_model,
                work,
                args.images,
                args.baseline_conditions,
                args.rounds,
                args.batch_size,
                args.window,
                args.warmup,
            )
            print_blocking(result)
            del bench_model


if __name__ == "__main__":
    main()
