"""What the ablation, blocking and GPU benches share: models of three shapes, synthetic
COCO-style images, fixed generation lengths, timing, and the project's public entry points.

Shapes (`--shape`):

- ``tiny``: the project's tiny random LLaVA-1.5 (`collector.tiny.build_tiny_llava`): CLIP
  336/14 (576 image tokens), 4-layer Llama LM with d_model 64, a 1,2xx-token vocabulary.
- ``real-vocab``: the real LLaVA-1.5-7B config (/work/shared/data/real_configs or
  $LLAVA_REAL_CONFIG) with the real tokenizer and processor, the real vocabulary (32,064)
  and depth (32 LM layers), but d_model 64 and a 2-layer, 32-wide vision tower, so a CPU
  can run it. Saved and loaded back with `collector.loading.load_model` like a checkpoint.
- ``7b``: the real LLaVA-1.5-7B sizes (CLIP ViT-L/14-336, 32 x 4096 Llama, vocab 32,064),
  random bf16 weights, built directly on the device (no download, no checkpoint files):
  GPU only in practice (about 14 GB of weights).

Random weights never choose EOS on purpose, but they may by chance, which would make the
two sides of a bench generate different numbers of tokens. `fix_generation_lengths`
suppresses the EOS logits in the model's generation config, which every `generate` call
(the project's and the baselines') reads: every answer is then exactly `max_new_tokens`
long.

The project side of every bench goes through `project_lens`, `project_ablation` and
`project_blocking` below, the public `collect_*` functions users run (runner, resume,
DuckDB writes included). If the runner's API changes, adapt them here only.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("tiny", "real-vocab", "7b")
REAL_CONFIG_DIR = Path(os.environ.get("LLAVA_REAL_CONFIG", "/work/shared/data/real_configs/llava-hf__llava-1.5-7b-hf"))
# Fall back to the copy shipped in the repository's shared/ folder (the device machine
# receives the working tree, shared/ included, but not /work/shared).
_REPO = Path(__file__).resolve().parents[1]
_REAL_CONFIG_FALLBACKS = (
    REAL_CONFIG_DIR,
    _REPO / "shared" / "data" / "real_configs" / "llava-hf__llava-1.5-7b-hf",
    _REPO.parent / "shared" / "data" / "real_configs" / "llava-hf__llava-1.5-7b-hf",
)


def real_config_dir() -> Path:
    """The folder with the real LLaVA-1.5-7B config, tokenizer and processor files."""
    for folder in _REAL_CONFIG_FALLBACKS:
        if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
            return folder
    raise FileNotFoundError(
        "the real LLaVA-1.5-7B config folder was not found; set LLAVA_REAL_CONFIG "
        f"(looked in {', '.join(str(f) for f in _REAL_CONFIG_FALLBACKS)})"
    )


# -- models ---------------------------------------------------------------------------------


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if "norm" in name.lower() and isinstance(weight, torch.nn.Parameter) and weight.dim() == 1:
                values = 0.5 + torch.rand(weight.shape, generator=generator)
                weight.copy_(values.to(device=weight.device, dtype=weight.dtype))


def _copy_processor_files(real: Path, out: Path) -> None:
    for item in real.iterdir():
        if item.name in {"config.json", "model.safetensors.index.json", "generation_config.json"}:
            continue
        if item.suffix == ".md" or not item.is_file():
            continue
        shutil.copy2(item, out / item.name)


def build_real_vocab_checkpoint(out_dir: Path, seed: int = 0, hidden_size: int = 64) -> Path:
    """The real LLaVA-1.5-7B config with the LM's and vision tower's widths shrunk; real
    vocabulary, depth (32 LM layers), tokenizer, processor, 576 image tokens. Saved as a
    checkpoint folder."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    real = real_config_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(real)
    text = config.text_config
    text.hidden_size = hidden_size
    text.intermediate_size = 2 * hidden_size
    text.num_attention_heads = 4
    text.num_key_value_heads = 4
    text.head_dim = hidden_size // 4
    vision = config.vision_config
    vision.hidden_size = 32
    vision.intermediate_size = 64
    vision.num_hidden_layers = 2
    vision.num_attention_heads = 2
    vision.projection_dim = 32
    config.dtype = "float32"
    text.dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    _randomise_norms(model, seed)
    model.save_pretrained(out_dir)
    _copy_processor_files(real, out_dir)
    return out_dir


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def build_7b_in_memory(
    device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, n_layers: int | None = None
) -> Any:
    """A LLaVA-1.5-7B-shaped model with random weights, built on `device` in seconds.

    Parameters are allocated on the device without the library's initialisation, then
    filled with N(0, 0.02) (norm scales uniform in [0.5, 1.5], biases 0) in `dtype`.
    Buffers (rotary frequencies, position ids) are computed by the modules' constructors
    on the device, so they are right. `n_layers` shortens the LM (only to test this path
    on a CPU).
    """
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(real_config_dir())
    if n_layers is not None:
        config.text_config.num_hidden_layers = n_layers
        config.vision_config.num_hidden_layers = min(config.vision_config.num_hidden_layers, n_layers)
    config.text_config.dtype = config.dtype = dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _no_init_weights(), torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and "norm" in name.lower():
                parameter.uniform_(0.5, 1.5, generator=generator)
            elif parameter.dim() == 1 and name.endswith("bias"):
                parameter.zero_()
            else:
                torch.nn.init.normal_(parameter, mean=0.0, std=0.02, generator=generator)
    return model.eval()


@dataclass
class BenchModel:
    loaded: Any  # collector.loading.LoadedModel
    shape: str
    build_seconds: float

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.loaded.model.parameters())


def build_model(
    shape: str,
    work: Path,
    device: str = "cpu",
    dtype: str | None = None,
    attn_implementation: str = "sdpa",
    seed: int = 1,
    n_layers: int | None = None,
) -> BenchModel:
    """A `LoadedModel` of the given shape (see the module docstring)."""
    from collector.loading import DTYPES, LoadedModel, load_model

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    start = time.perf_counter()
    if shape == "tiny":
        from collector.tiny import build_tiny_llava

        folder = build_tiny_llava(work / "tiny", "llava-1.5", seed=seed)
        loaded = load_model(
            str(folder), device=device, dtype=dtype or "float32", attn_implementation=attn_implementation
        )
    elif shape == "real-vocab":
        folder = build_real_vocab_checkpoint(work / "real-vocab", seed=seed)
        loaded = load_model(
            str(folder), device=device, dtype=dtype or "float32", attn_implementation=attn_implementation
        )
    else:
        import transformers

        from collector.adapters import adapter_class_for

        dtype = dtype or "bfloat16"
        model = build_7b_in_memory(device, DTYPES[dtype], seed, n_layers)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn_implementation)
        else:  # pragma: no cover - older transformers
            model.config._attn_implementation = attn_implementation
        adapter_class = adapter_class_for(model.config)
        processor = adapter_class.load_processor(str(real_config_dir()))
        adapter = adapter_class(model, processor, None)
        model_id = "bench:llava-1.5-7b-shaped-random" + (f"-{n_layers}layers" if n_layers else "")
        provenance = {
            "model_id": model_id,
            "revision": None,
            "family": adapter.family,
            "dtype": dtype,
            "device": device,
            "quantization": "none",
            "attn_implementation": attn_implementation,
            "prompt_template": adapter.prompt_template,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "python_version": platform.python_version(),
        }
        loaded = LoadedModel(
            model, processor, adapter, model_id, None, dtype, device, "none", attn_implementation, provenance
        )
    synchronize(device)
    return BenchModel(loaded, shape, time.perf_counter() - start)


def describe(bench_model: BenchModel) -> str:
    loaded = bench_model.loaded
    text = loaded.model.config.text_config
    return (
        f"{bench_model.shape}: {loaded.adapter.n_layers} LM layers, d_model {text.hidden_size}, "
        f"vocab {text.vocab_size}, {bench_model.n_parameters / 1e6:.1f} M parameters, {loaded.dtype}, "
        f"{loaded.device}, attention {loaded.attn_implementation}"
    )


def fix_generation_lengths(loaded: Any) -> list[int]:
    """Suppress EOS in the model's generation config: every generate runs max_new_tokens steps."""
    config = loaded.model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else loaded.adapter.tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    config.suppress_tokens = eos_ids
    return eos_ids


# -- images ---------------------------------------------------------------------------------

# COCO class names the tiny tokenizer knows as whole words.
CATEGORIES = ({"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"})


def write_synthetic_images(
    folder: Path,
    n: int,
    width: int = 640,
    height: int = 480,
    seed: int = 0,
    area: tuple[float, float] = (1000.0, 2000.0),
) -> tuple[list[Any], Path, dict[int, list[str]]]:
    """n noisy `width`x`height` images, each with one polygon object of the paper's size
    (1000-2000 px²) inside the centre crop, COCO annotations and a VQA question per image.

    Returns (records, annotation file, questions {image id: [question]}).
    """
    from collector.images import folder_images

    rng = np.random.default_rng(seed)
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, questions = [], [], {}
    crop = min(width, height)
    left, top = (width - crop) // 2, (height - crop) // 2
    for index in range(1, n + 1):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        category = CATEGORIES[index % len(CATEGORIES)]
        target_area = rng.uniform(area[0] * 1.1, area[1] * 0.9)
        radius = math.sqrt(target_area / math.pi) / math.cos(math.pi / 16) ** 0.5
        cx = left + rng.uniform(radius + 20, crop - radius - 20)
        cy = top + rng.uniform(radius + 20, crop - radius - 20)
        points = [
            (cx + radius * math.cos(2 * math.pi * i / 16), cy + radius * math.sin(2 * math.pi * i / 16))
            for i in range(16)
        ]
        ImageDraw.Draw(image).polygon(points, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        polygon_area = abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))) / 2
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        file_name = f"synthetic_{index:05d}.jpg"
        image.save(image_dir / file_name, quality=90)
        images.append({"id": index, "file_name": file_name, "width": width, "height": height})
        annotations.append(
            {
                "id": index,
                "image_id": index,
                "category_id": category["id"],
                "segmentation": [[round(v, 2) for point in points for v in point]],
                "area": round(polygon_area, 2),
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                "iscrowd": 0,
            }
        )
        questions[index] = ["What animal is in the picture?"]
    annotation_file = folder / "annotations.json"
    annotation_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": list(CATEGORIES)})
    )
    (folder / "questions.json").write_text(json.dumps({str(k): v for k, v in questions.items()}))
    records = folder_images(image_dir, annotation_file)
    return records, annotation_file, questions


# -- the project's public entry points (the one place to adapt when the runner changes) ------


def project_lens(loaded: Any, records: Sequence[Any], db_path: Path, top_k: int = 5) -> Any:
    from collector.lens.experiment import collect_lens
    from db.store import ResultsDB

    with ResultsDB(db_path) as db:
        return collect_lens(loaded, records, db, top_k=top_k, progress=False)


def project_ablation(
    loaded: Any,
    records: Sequence[Any],
    db_path: Path,
    annotation_file: Path,
    questions: dict[int, list[str]],
    max_new_tokens: int,
    ig_steps: int = 50,
    batch_size: int = 16,
) -> Any:
    """The paper's full protocol: generative, polling and VQA; 50-step IG; every k.

    Curation is off: random weights never name the object, so curation would skip every
    image (and the work would not be measured); the original's curation answers are
    reused as the none / image_noise rows, so the work per kept image is the same.
    """
    from collector.ablation.experiment import AblationOptions, collect_ablation
    from collector.ablation.replacement import Replacement
    from db.store import ResultsDB

    vector = torch.zeros(loaded.adapter.hidden_size)
    replacement = Replacement(vector, "zero", "0" * 64)
    options = AblationOptions(
        settings=("generative", "polling", "vqa"),
        questions=questions,
        curate=False,
        ig_steps=ig_steps,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    with ResultsDB(db_path) as db:
        return collect_ablation(loaded, records, db, annotation_file, options, replacement, progress=False)


def project_blocking(
    loaded: Any,
    records: Sequence[Any],
    db_path: Path,
    annotation_file: Path,
    questions: dict[int, list[str]],
    batch_size: int = 16,
    window: int = 9,
) -> Any:
    """Every source set x target set x (preset and sliding) window; curation off (random weights)."""
    from collector.blocking.experiment import collect_blocking
    from db.store import ResultsDB

    with ResultsDB(db_path) as db:
        return collect_blocking(
            loaded,
            records,
            db,
            annotation_file,
            questions,
            curate=False,
            window=window,
            batch_size=batch_size,
            progress=False,
        )


# -- timing -----------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


class Stopwatch:
    """Accumulates seconds per label; `with watch("label"):` (synchronises CUDA at both ends)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._label: str | None = None

    def __call__(self, label: str) -> Stopwatch:
        self._label = label
        return self

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        synchronize(self.device)
        assert self._label is not None
        self.seconds[self._label] = self.seconds.get(self._label, 0.0) + time.perf_counter() - self._start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def environment() -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["capability"] = list(torch.cuda.get_device_capability(0))
    return info
