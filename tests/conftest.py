"""Shared fixtures: tiny random checkpoints built once per session, real shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_LLAVA15 = SHARED_DATA / "real_configs" / "llava-hf__llava-1.5-7b-hf"
COCO_SAMPLE = SHARED_DATA / "coco_sample"


def require_shared(path: Path) -> Path:
    """Skip (with the reason) where this clone has no ../shared data beside it."""
    if not path.exists():
        pytest.skip(f"needs the project's shared data at {path} (not present in this clone)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny random checkpoints, keyed by family, saved with save_pretrained."""
    from collector.tiny import build_tiny_llava

    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_llava(root / family, family, seed=1) for family in ("llava-1.5", "llava-phi")}


@pytest.fixture(scope="session")
def loaded_models(tiny_checkpoints, real_config_checkpoint_or_none) -> dict:
    """Every test model loaded through load_model (the real from_pretrained path)."""
    from collector.loading import load_model

    paths = dict(tiny_checkpoints)
    if real_config_checkpoint_or_none is not None:
        paths["llava-1.5-real-config"] = real_config_checkpoint_or_none
    return {name: load_model(str(path), device="cpu", dtype="float32") for name, path in paths.items()}


@pytest.fixture(scope="session")
def real_config_checkpoint_or_none(tmp_path_factory):
    from collector.tiny import shrink_real_config

    if not REAL_LLAVA15.exists():
        return None
    return shrink_real_config(REAL_LLAVA15, tmp_path_factory.mktemp("real15b") / "model", seed=2)


MODEL_NAMES = ("llava-1.5", "llava-phi", "llava-1.5-real-config")


@pytest.fixture(params=MODEL_NAMES)
def loaded(request, loaded_models):
    if request.param not in loaded_models:
        pytest.skip(f"{request.param}: needs ../shared/data/real_configs (not present in this clone)")
    return loaded_models[request.param]


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    """The demo's synthetic images and their COCO annotations file."""
    from collector.demo import write_demo_images

    folder = tmp_path_factory.mktemp("demo_images")
    annotation_file = write_demo_images(folder)
    return folder / "images", annotation_file


REAL_QWEN25 = SHARED_DATA / "real_configs" / "Qwen__Qwen2.5-VL-3B-Instruct"
# The families beyond LLaVA (tests/support/tiny_families.py), each with a fixed seed.
OTHER_FAMILIES = ("qwen2.5-vl", "qwen2-vl", "llava-next", "gemma3", "paligemma")


def build_family_checkpoint(name: str, folder: Path) -> Path:
    """A tiny checkpoint of one of OTHER_FAMILIES, saved with save_pretrained into `folder`."""
    from tests.support import tiny_families as tf

    if name == "qwen2.5-vl":
        return tf.build_tiny_qwen2_5_vl(require_shared(REAL_QWEN25), folder, seed=3)
    if name == "qwen2-vl":
        return tf.build_tiny_qwen2_vl(folder, seed=4)
    if name == "llava-next":
        return tf.build_tiny_llava_next(folder, seed=5)
    if name == "gemma3":
        return tf.build_tiny_gemma3(folder, seed=6)
    if name == "paligemma":
        return tf.build_tiny_paligemma(folder, seed=7)
    raise ValueError(name)


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """family_checkpoint(name) -> checkpoint folder, built once per session on first use."""
    root = tmp_path_factory.mktemp("families")
    paths: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in paths:
            paths[name] = build_family_checkpoint(name, root / name)
        return paths[name]

    return get


@pytest.fixture(scope="session")
def family_model(family_checkpoint):
    """family_model(name, attn_implementation=None) -> (name, checkpoint folder, LoadedModel
    through load_model), loaded once per session for each (name, implementation)."""
    from collector.loading import load_model

    models: dict[tuple[str, str | None], object] = {}

    def get(name: str, attn_implementation: str | None = None):
        key = (name, attn_implementation)
        if key not in models:
            models[key] = load_model(
                str(family_checkpoint(name)), device="cpu", dtype="float32", attn_implementation=attn_implementation
            )
        return name, family_checkpoint(name), models[key]

    return get
