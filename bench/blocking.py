"""Time per image of attention blocking: batched conditions vs one forward per condition.

Same tiny model, same images, same conditions, in one run:

    .venv/bin/python bench/blocking.py [--model DIR] [--images N] [--batch-size 16] [--window 9]

Without --model a tiny random LLaVA-1.5 (4 layers) is built in a temporary folder. Prints
seconds per image for both ways, their ratio, and the largest difference between the two
ways' class probabilities (they must agree).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from collector.vqa import class_first_token, vqa_prompt
from collector.blocking.experiment import (  # noqa: E402
    baseline_forward,
    conditions_for,
    preset_windows,
    run_conditions,
    select_blocking_images,
    sliding_windows,
    source_sets,
    target_sets,
)
from collector.demo import write_demo_images  # noqa: E402
from collector.images import folder_images  # noqa: E402
from collector.loading import load_model  # noqa: E402
from collector.targets import object_cells  # noqa: E402
from collector.tiny import build_tiny_llava  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: a tiny random model)")
    parser.add_argument("--images", type=int, default=2, help="demo images to time")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-blocking-"))
    model = args.model or str(build_tiny_llava(work / "tiny", "llava-1.5", seed=1))
    annotation_file = write_demo_images(work)
    loaded = load_model(model, device=args.device, attn_implementation=args.attn_implementation)
    adapter = loaded.adapter
    selected = select_blocking_images(folder_images(work / "images", annotation_file), annotation_file, 3, (4000, 12000))
    selected = selected[: args.images]
    windows = preset_windows(adapter.n_layers) + sliding_windows(adapter.n_layers, args.window)

    prepared = []
    for record, target in selected:
        text = vqa_prompt(adapter, "What is the shape?")
        inputs = adapter.build_inputs_for_text(record.load(), text)
        layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
        cells = object_cells(target.segmentation, adapter, record.width, record.height,
                             layout.grid_rows, layout.grid_cols)
        class_token = class_first_token(adapter.tokenizer, text, target.category)
        decoder_inputs, _ = baseline_forward(loaded, inputs, class_token)
        conditions = conditions_for(source_sets(cells, layout), target_sets(layout, inputs["input_ids"].shape[1]), windows)
        prepared.append((decoder_inputs, [c.block for c in conditions], class_token))
    n_distinct = np.mean([len(set(blocks)) for _, blocks, _ in prepared])

    def timed(batch_size: int) -> tuple[float, list]:
        run_conditions(loaded, *prepared[0][:1], prepared[0][1][:batch_size], prepared[0][2], batch_size)  # warm-up
        start = time.perf_counter()
        results = [run_conditions(loaded, d, b, c, batch_size) for d, b, c in prepared]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(prepared), results

    batched_s, batched = timed(args.batch_size)
    single_s, single = timed(1)
    difference = max(
        abs(a.target_prob - b.target_prob) for x, y in zip(batched, single) for a, b in zip(x, y)
    )
    print(f"model {model} ({adapter.n_layers} layers, {args.attn_implementation}, {args.device}); "
          f"{len(prepared)} images, {len(prepared[0][1])} conditions per image ({n_distinct:.0f} distinct)")
    print(f"batched (batch {args.batch_size}): {batched_s:.3f} s/image")
    print(f"one forward per condition:  {single_s:.3f} s/image")
    print(f"ratio one-at-a-time / batched: {single_s / batched_s:.2f}x; max |class prob difference| {difference:.2e}")


if __name__ == "__main__":
    main()
