"""bench/gpu.py runs on a CPU with the tiny model and prints every metric line (slow: ~1 min)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke_on_cpu(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(REPO / "bench" / "gpu.py"),
        "--device",
        "cpu",
        "--shape",
        "tiny",
        "--images",
        "2",
        "--ig-steps",
        "2",
        "--max-new-tokens",
        "2",
        "--baseline-conditions",
        "2",
        "--threads",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OUT": str(tmp_path)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for expected in (
        "environment: ",
        "lens: ",
        " ms/image",
        " images/s",
        "% of bf16 peak (989 TFLOP/s)",
        "lens: device busy",
        "lens: peak device memory",
        "ablation: ",
        "ratio baseline/project",
        "blocking: ",
        "(vectorised-mask baseline)",
        "two-devices: ",
        "errors in: none",
    ):
        assert expected in out, f"missing {expected!r} in:\n{out}"
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert set(report["sections"]) >= {"lens", "ablation", "blocking"}
    assert report["sections"]["ablation"]["ratio"] > 0 and report["sections"]["blocking"]["ratio_pairwise"] > 0
