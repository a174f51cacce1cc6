"""Batched vs one-condition-at-a-time ablation on the tiny model: seconds per image and the ratio.

Run: .venv/bin/python bench/ablation.py [--images N] [--max-new-tokens N]
Both modes answer the same conditions of the same images; the answers are checked equal.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from collector.ablation.settings import Condition, generate_answers  # noqa: E402
from collector.ablation.token_sets import random_token_indices  # noqa: E402
from collector.demo import write_demo_images  # noqa: E402
from collector.images import folder_images  # noqa: E402
from collector.loading import load_model  # noqa: E402
from collector.tiny import build_tiny_llava  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--conditions", type=int, default=18, help="conditions per image (paper: 18)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llava(Path(tmp) / "tiny", "llava-1.5", seed=1)
        annotation_file = write_demo_images(Path(tmp))
        records = folder_images(Path(tmp) / "images", annotation_file)[: args.images]
        loaded = load_model(str(model_dir), device="cpu", dtype="float32")
        vector = torch.zeros(loaded.adapter.hidden_size)
        timings = {"batched": 0.0, "one-at-a-time": 0.0}
        for record in records:
            inputs = loaded.adapter.build_inputs(record.load(), "Describe this image.")
            positions = loaded.adapter.image_token_layout(inputs["input_ids"][0], inputs).positions.tolist()
            conditions = [
                Condition(f"random_{i}", tuple(positions[j] for j in random_token_indices(576, 5 * (i + 1), 0, i)))
                for i in range(args.conditions)
            ]
            start = time.perf_counter()
            batched = generate_answers(loaded, inputs, conditions, vector, args.max_new_tokens, batch_size=len(conditions))
            timings["batched"] += time.perf_counter() - start
            start = time.perf_counter()
            single = [generate_answers(loaded, inputs, [c], vector, args.max_new_tokens)[0] for c in conditions]
            timings["one-at-a-time"] += time.perf_counter() - start
            assert batched == single, "batched answers differ from one-at-a-time answers"
    n = len(records)
    print(f"tiny llava-1.5, {n} images x {args.conditions} conditions, up to {args.max_new_tokens} new tokens, "
          f"torch threads {torch.get_num_threads()}")
    for mode, seconds in timings.items():
        print(f"  {mode:>14}: {seconds / n:.3f} s per image")
    print(f"  speed-up (one-at-a-time / batched): {timings['one-at-a-time'] / timings['batched']:.2f}x")


if __name__ == "__main__":
    main()
