"""The benchmark scripts under `bench/` as modules, for tests that reuse their synthetic data
(e.g. `bench/site_scale.py`'s LLaVA-1.5-shaped lens databases)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_module(name: str) -> Any:
    """`bench/<name>.py` loaded as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def site_scale() -> Any:
    """bench/site_scale.py: `make_database(path, n_images)` and the site measurements."""
    return bench_module("site_scale")
