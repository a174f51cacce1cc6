"""Token ablation, the paper's full protocol: the project vs the original code's per-image work.

Mimics scripts/ablation_experiment.py (generative + polling) and
scripts/ablation_experiment_curate.py (VQA) of github.com/clemneo/llava-interp, run one after
the other on each image as the paper did (see bench/original.py for every step). The project
side is `collect_ablation` (runner, DuckDB writes included) with settings generative,
polling, vqa; 50-step integrated gradients; k = 5..250; curation off (random weights never
name the object; the work per kept image is the same).

Both sides run on the same model, the same synthetic 640x480 images, in the same process,
alternating (project first in even rounds, the baseline first in odd ones). EOS is
suppressed, so every answer is exactly --max-new-tokens (generative) / 10 (polling) tokens
on both sides; the paper's generative length is 200 (`--max-new-tokens 200`).

    PYTHONPATH=. python bench/ablation.py [--shape tiny|real-vocab|tiny,real-vocab] [--images 1] [--max-new-tokens 8]

Prints seconds per image for both sides, the baseline's time by phase, and the ratio
(baseline / project = how many times more images per hour the project does).
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
    fix_generation_lengths,
    project_ablation,
    synchronize,
    write_synthetic_images,
)
from bench.original import OriginalModel, original_ablation_image  # noqa: E402


def run_ablation_bench(
    bench_model: Any,
    work: Path,
    n_images: int,
    max_new_tokens: int,
    ig_steps: int = 50,
    rounds: int = 1,
    batch_size: int = 16,
    warmup: bool = False,
) -> dict[str, Any]:
    """Time the project and the original-style baseline on the same images; returns the figures."""
    from collector.ablation.token_sets import yes_token_id

    loaded = bench_model.loaded
    device = loaded.device
    fix_generation_lengths(loaded)
    records, annotation_file, questions = write_synthetic_images(work / "ablation-images", n_images + int(warmup))
    warm, records = (records[:1], records[1:]) if warmup else ([], records)
    om = OriginalModel(loaded)
    vector = torch.zeros(loaded.adapter.hidden_size)
    yes_id = yes_token_id(loaded.adapter.tokenizer)
    runs = iter(range(10**6))

    def project(batch: list) -> float:
        synchronize(device)
        start = time.perf_counter()
        summary = project_ablation(
            loaded,
            batch,
            work / f"ablation-{next(runs)}.duckdb",
            annotation_file,
            questions,
            max_new_tokens,
            ig_steps,
            batch_size,
        )
        synchronize(device)
        assert summary.images_kept == len(batch), summary
        return time.perf_counter() - start

    def baseline(batch: list, watch: Stopwatch) -> float:
        start = time.perf_counter()
        for record in batch:
            annotation = record.annotations[0]
            original_ablation_image(
                om,
                record.load(),
                annotation["segmentation"],
                annotation["category"],
                questions[record.image_id][0],
                vector,
                max_new_tokens,
                ig_steps,
                yes_id,
                watch,
                work / "original-results.json",
            )
        synchronize(device)
        return time.perf_counter() - start

    if warm:
        project(warm)
        baseline(warm, Stopwatch(device))
    phases = Stopwatch(device)
    totals = {"project": 0.0, "baseline": 0.0}
    for round_index in range(rounds):
        order = ("project", "baseline") if round_index % 2 == 0 else ("baseline", "project")
        for side in order:
            totals[side] += project(records) if side == "project" else baseline(records, phases)
    n = len(records) * rounds
    result = {
        "shape": bench_model.shape,
        "model": describe(bench_model),
        "images": len(records),
        "rounds": rounds,
        "max_new_tokens": max_new_tokens,
        "polling_max_new_tokens": 10,
        "ig_steps": ig_steps,
        "batch_size": batch_size,
        "project_s_per_image": totals["project"] / n,
        "baseline_s_per_image": totals["baseline"] / n,
        "baseline_phases_s_per_image": {k: v / n for k, v in phases.seconds.items()},
    }
    result["ratio"] = result["baseline_s_per_image"] / result["project_s_per_image"]
    return result


def print_ablation(result: dict[str, Any], prefix: str = "") -> None:
    print(
        f"{prefix}ablation, full protocol (generative {result['max_new_tokens']} + polling 10 tokens, fixed; "
        f"VQA; IG {result['ig_steps']} steps) on {result['model']}; {result['images']} images x "
        f"{result['rounds']} rounds"
    )
    print(
        f"{prefix}  project  (collect_ablation, batch {result['batch_size']}): "
        f"{result['project_s_per_image']:.3f} s/image = {3600 / result['project_s_per_image']:.0f} images/h"
    )
    print(
        f"{prefix}  baseline (original per-image work):    {result['baseline_s_per_image']:.3f} s/image = "
        f"{3600 / result['baseline_s_per_image']:.0f} images/h"
    )
    for phase, seconds in result["baseline_phases_s_per_image"].items():
        print(f"{prefix}      {phase}: {seconds:.3f} s")
    print(f"{prefix}  ratio baseline/project: {result['ratio']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape",
        default="tiny",
        help=f"comma-separated, of {', '.join(SHAPES)} (real-vocab: ~3-4 min on 1 CPU thread)",
    )
    parser.add_argument("--images", type=int, default=1, help="timed images per round")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (project/baseline order flips)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="generative answer length (paper: 200)")
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 (tiny, real-vocab), bfloat16 (7b)")
    parser.add_argument("--warmup", action="store_true", help="one untimed image per side first")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared, loaded machine 2 OpenMP threads spin "
        "and run tiny forwards 20x slower)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    with tempfile.TemporaryDirectory(prefix="bench-ablation-") as tmp:
        for shape in args.shape.split(","):
            work = Path(tmp) / shape
            bench_model = build_model(shape, work, args.device, args.dtype)
            result = run_ablation_bench(
                bench_model,
                work,
                args.images,
                args.max_new_tokens,
                args.ig_steps,
                args.rounds,
                args.batch_size,
                args.warmup,
            )
            print_ablation(result)
            del bench_model


if __name__ == "__main__":
    main()
