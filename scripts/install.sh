#!/usr/bin/env bash
# Installs llava-interp and its test dependencies into ./.venv (CPU torch wheel first,
# so pip never pulls a multi-GB CUDA build on machines without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
