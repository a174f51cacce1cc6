#!/usr/bin/env bash
# The GPU bench in one step, for a machine with one (or two) H100/H200 and no network:
# builds a LLaVA-1.5-7B-shaped model with random bf16 weights on the device and runs
# bench/gpu.py (lens, ablation, blocking, two-device scaling); about 3-5 minutes, capped at 8.
# Prints per-image ms, images/s, MFU against 989 TFLOP/s, device busy share, peak memory and
# the baseline ratios; writes $OUT/bench_gpu.json when OUT is set.
#
#   bash bench/gpu.sh [extra bench/gpu.py options, e.g. --images 64 --max-new-tokens 200]
#
# Needs: a Python with torch (CUDA), transformers 5, duckdb, pyarrow, pycocotools and this
# project's dependencies ($PYTHON, else .venv/bin/python, else python3), and the real
# LLaVA-1.5-7B config + tokenizer folder: $LLAVA_REAL_CONFIG, or
# shared/data/real_configs/llava-hf__llava-1.5-7b-hf inside (or beside) the checkout.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
echo "gpu.sh: $(date -u +%FT%TZ) python $PY"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "gpu.sh: no nvidia-smi"
if ! "$PY" -c "import torch, transformers, duckdb, pyarrow, pycocotools" 2>/dev/null; then
    echo "gpu.sh: $PY lacks torch/transformers/duckdb/pyarrow/pycocotools; set PYTHON to one that has them"
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
exec timeout 470 "$PY" bench/gpu.py --device cuda --shape 7b "$@"
