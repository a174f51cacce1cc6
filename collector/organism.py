"""A model organism with planted ground truth: a tiny LLaVA trained on synthetic scenes.

The offline demo's random weights never show what the experiments exist to reveal. This
module trains, deterministically and in about two CPU minutes (one thread), a tiny
`LlavaForConditionalGeneration` (LLaVA-1.5 layout: CLIP vision tower, MLP projector,
Llama LM, the tiny tokenizer of `collector.tiny`) to name the one object in a synthetic
scene. What the object is and where it lies is known exactly (COCO-format annotations are
written with every scene), so the experiments have a ground truth to find:

- baseline answers are correct (generative description, yes/no polling, VQA "It is a");
- the object's information reaches the LM only through the image tokens at the object's
  patches: the vision features the projector reads are the CLIP patch embeddings
  (`vision_feature_layer=-2` of a one-layer tower = the embeddings, before any attention),
  so each image token sees only its own 14x14 pixels. Ablating the object's tokens removes
  the object; ablating as many random tokens mostly removes background.

Planted on purpose (so read the lens pages with this in mind): a dense auxiliary loss
trains every image token, both at the LM's input (the projector output read through the
final norm and unembedding, i.e. the logit lens at layer 0) and at its output, to predict
the class token where the object covers at least `Recipe.aux_min_cover` of the patch and
`BACKGROUND_TOKEN` where it covers none. Class names in the lens at object patches are
therefore put there by training, not discovered. With tied embeddings the object's image
tokens come to resemble the class word itself, which is what lets the tiny LM learn the
yes/no comparison in the time budget; polling also sees empty scenes (answer No).

Scenes: one object of one of `CLASSES` (each a distinct shape and colour, named by a COCO
word that is one token of the tiny tokenizer) at a random position and size on a plain,
slightly noisy background. Scenes are drawn at the view size (`VIEW_SIZE`), so the
processor's resize and crop are the identity and annotation pixels are view pixels.

`build_organism()` trains on first use and caches the checkpoint folder under a name that
hashes the recipe and library versions; later calls return the folder at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where the model is built or trained, not on import
    import torch

ORGANISM_VERSION = 2  # bump when the recipe's code changes in a way the hash cannot see

VIEW_SIZE = 112  # pixels; the CLIP view is VIEW_SIZE x VIEW_SIZE
# An 8 x 8 grid of 64 image tokens: a 12 x 12 grid (168 px) learnt about half as fast per
# CPU second (longer sequences, more background per object), too slow for the time budget.
PATCH_SIZE = 14
GRID_SIDE = VIEW_SIZE // PATCH_SIZE
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class SceneClass:
    """One object class: its COCO-style name, the shape painted and the base RGB colour."""

    category_id: int
    name: str
    shape: str
    colour: tuple[int, int, int]


# Every name is a single token of the tiny tokenizer after "It is a" (checked by
# `class_token_ids`); shapes and colours both differ, so either cue identifies the class.
CLASSES: tuple[SceneClass, ...] = (
    SceneClass(1, "cat", "circle", (240, 140, 30)),
    SceneClass(2, "dog", "square", (120, 70, 30)),
    SceneClass(3, "car", "diamond", (210, 30, 40)),
    SceneClass(4, "bird", "triangle", (40, 90, 220)),
    SceneClass(5, "apple", "hexagon", (40, 160, 60)),
    SceneClass(6, "boat", "star", (140, 50, 180)),
)

# Background base colours: light, unsaturated, far (> 60 in some channel) from every object colour.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (236, 233, 224),
    (214, 218, 222),
    (226, 226, 226),
    (205, 214, 200),
    (230, 220, 236),
)
BACKGROUND_NOISE = 4  # uniform integer noise in [-4, 4] per channel
COLOUR_JITTER = 12  # object colour varies by up to this per channel
RADIUS_RANGE = (10.0, 20.0)  # circumradius in view pixels: about 2-9 of the 64 grid cells
OBJECT_MARGIN = 2.0  # pixels between the object's extent and the image border
# Every organism object's annotated area lies in this range (pass it as `area_range` to the
# ablation and blocking selection, whose default is the paper's 1000-2000 px²).
AREA_RANGE = (100.0, 5000.0)

# VQA questions: the organism is trained on all of them; `make_scenes` gives each scene one.
VQA_QUESTIONS = (
    "What is in the picture?",
    "What object is shown in the image?",
    "What is this?",
    "What can you see in this image?",
)


# -- scenes ----------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices (x, y) of `shape` centred at (cx, cy) with circumradius r, rotated by angle (radians)."""

    def ring(n: int, radius_at, phase: float) -> list[tuple[float, float]]:
        return [
            (
                cx + radius_at(i) * math.cos(phase + angle + 2 * math.pi * i / n),
                cy + radius_at(i) * math.sin(phase + angle + 2 * math.pi * i / n),
            )
            for i in range(n)
        ]

    if shape == "circle":
        return ring(32, lambda i: r, 0.0)
    if shape == "square":
        return ring(4, lambda i: r, math.pi / 4)
    if shape == "diamond":  # a rhombus, taller than wide
        return [(x, y) for x, y in ring(4, lambda i: r if i % 2 else r * 0.6, 0.0)]
    if shape == "triangle":
        return ring(3, lambda i: r, -math.pi / 2)
    if shape == "hexagon":
        return ring(6, lambda i: r, 0.0)
    if shape == "star":
        return ring(10, lambda i: r if i % 2 == 0 else r * 0.5, -math.pi / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _polygon_area(points: Sequence[tuple[float, float]]) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, list(points[1:]) + [points[0]]))) / 2


@dataclass(frozen=True)
class Scene:
    """One painted scene: the RGB image (VIEW_SIZE square), its class, polygon and background colour."""

    image: Image.Image
    scene_class: SceneClass
    polygon: list[tuple[float, float]]
    background: tuple[int, int, int]
    empty: bool = False  # a training-only scene: the object was drawn but not painted

    @property
    def bbox(self) -> list[float]:
        xs = [x for x, _ in self.polygon]
        ys = [y for _, y in self.polygon]
        return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]

    @property
    def area(self) -> float:
        return _polygon_area(self.polygon)


def paint_scene(rng: np.random.Generator, class_index: int | None = None, empty: bool = False) -> Scene:
    """One scene drawn with `rng`: a class (uniform unless given), size, rotation, position, colours.

    empty: draw everything but leave the object unpainted (background only).
    """
    scene_class = CLASSES[int(rng.integers(len(CLASSES))) if class_index is None else class_index]
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    radius = float(rng.uniform(*RADIUS_RANGE))
    angle = float(rng.uniform(-0.3, 0.3))
    low, high = radius + OBJECT_MARGIN, VIEW_SIZE - radius - OBJECT_MARGIN
    cx, cy = float(rng.uniform(low, high)), float(rng.uniform(low, high))
    noise = rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, size=(VIEW_SIZE, VIEW_SIZE, 3))
    pixels = np.clip(np.asarray(background, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    colour = np.clip(np.asarray(scene_class.colour) + jitter, 0, 255).astype(np.uint8)
    polygon = [(round(x, 2), round(y, 2)) for x, y in _shape_polygon(scene_class.shape, cx, cy, radius, angle)]
    # Painted through the rasteriser COCO readers use (pycocotools), not PIL's (which adds the
    # boundary pixels, ~5% more): the annotation's mask is exactly the painted object.
    if not empty:
        pixels[polygon_mask(polygon, VIEW_SIZE, VIEW_SIZE)] = colour
    return Scene(Image.fromarray(pixels, mode="RGB"), scene_class, polygon, background, empty)


def polygon_mask(polygon: Sequence[tuple[float, float]], height: int, width: int) -> np.ndarray:
    """(height, width) bool: the pixels pycocotools assigns to the polygon."""
    from pycocotools import mask as mask_utils

    flat = [float(v) for point in polygon for v in point]
    return mask_utils.decode(mask_utils.frPyObjects([flat], height, width))[..., 0].astype(bool)


def make_scenes(out_dir: str | Path, n: int, seed: int) -> tuple[Path, Path]:
    """Write n scenes as PNGs plus COCO annotations; returns (images_dir, annotations_path).

    Layout: out_dir/images/organism_000001.png ..., out_dir/instances.json (COCO instances:
    images with id/file_name/width/height, one annotation per image with polygon
    segmentation, bbox, area, iscrowd 0, and the categories of `CLASSES`) and
    out_dir/questions.json (one VQA question per image id, the format `load_questions`
    reads). Classes cycle so every class appears; the same (n, seed) gives identical bytes.
    """
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5CE7E]))
    images, annotations, questions = [], [], {}
    for index in range(1, n + 1):
        scene = paint_scene(rng, class_index=(index - 1) % len(CLASSES))
        file_name = f"organism_{index:06d}.png"
        scene.image.save(images_dir / file_name, format="PNG")
        images.append({"id": index, "file_name": file_name, "width": VIEW_SIZE, "height": VIEW_SIZE})
        annotations.append(
            {
                "id": index,
                "image_id": index,
                "category_id": scene.scene_class.category_id,
                "segmentation": [[v for point in scene.polygon for v in point]],
                "area": round(scene.area, 2),
                "bbox": [round(v, 2) for v in scene.bbox],
                "iscrowd": 0,
            }
        )
        questions[str(index)] = [VQA_QUESTIONS[int(rng.integers(len(VQA_QUESTIONS)))]]
    categories = [{"id": c.category_id, "name": c.name, "supercategory": c.shape} for c in CLASSES]
    annotations_path = out / "instances.json"
    annotations_path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}, indent=1)
    )
    (out / "questions.json").write_text(json.dumps(questions, indent=1))
    return images_dir, annotations_path


def questions_path(annotations_path: str | Path) -> Path:
    """The questions.json `make_scenes` writes beside its instances.json."""
    return Path(annotations_path).parent / "questions.json"


def normalised_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, VIEW_SIZE, VIEW_SIZE) float32 CLIP-normalised pixels of view-sized RGB images.

    Equals the organism processor's pixel_values for such images (its resize and crop are the
    identity at the view size; tested), without the processor's per-image overhead.
    """
    import torch

    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255.0
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(((array - mean) / std).transpose(0, 3, 1, 2).copy())


# -- the recipe -------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights (its hash names the cache folder).

    Measured (seeds 0 / 1 / 2; 1000 steps of 16, one thread; shared machine): 113 / 112 /
    108 CPU s; held-out teacher-forced accuracy (120 scenes) generative 1.0 / 1.0 / 1.0,
    VQA 0.99 / 1.0 / 1.0, polling about the true class (Yes) 1.0 / 0.99 / 1.0, polling
    about another class than the one present (No) 0.73 / 0.78 / 0.53 -- the weakest skill
    (without empty scenes, tied embeddings and the layer-0 loss it stayed at chance). On 48
    held-out scenes, ablating the object's image tokens flips 0.83 / 1.0 / 0.83 of correct
    VQA and generative answers (a flipped answer names the right class ~1 time in 6 by
    chance) and 1.0 of polling Yes answers; as many random tokens flip 0.0 everywhere.
    """

    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 5e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    threads: int = 1
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 128
    vision_hidden: int = 64
    polling_share: float = 0.6  # of training rows; half answer Yes, half No
    # of the polling rows answered No, the share whose scene is empty (no object painted)
    # instead of holding an object of another class than the one asked about
    empty_share: float = 0.5
    vqa_share: float = 0.2  # the rest are generative descriptions
    eval_scenes: int = 120
    # Dense auxiliary supervision (planted on purpose): the LM's output at every image token
    # is trained to be the class token where the object covers at least `aux_min_cover` of
    # the patch, the background token where it covers none (partly covered cells: no loss).
    aux_weight: float = 1.0
    aux_min_cover: float = 0.2
    # The same targets read from the projector output (the LM's layer-0 input) through the
    # final norm and unembedding, i.e. the logit lens at layer 0.
    aux_input_weight: float = 1.0
    tie_embeddings: bool = True  # LM input embeddings = unembedding

    def digest(self) -> str:
        import torch
        import transformers

        payload = {
            "version": ORGANISM_VERSION,
            "recipe": asdict(self),
            "view": [VIEW_SIZE, PATCH_SIZE],
            "classes": [asdict(c) for c in CLASSES],
            "questions": list(VQA_QUESTIONS),
            # different kernels give different weights: a new torch or transformers rebuilds
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


DEFAULT_RECIPE = Recipe()

GENERATIVE_ANSWER = "The image shows a {name}"
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's, as Llava15Adapter uses


def generative_question() -> str:
    from collector.ablation.settings import GENERATIVE_QUESTION

    return GENERATIVE_QUESTION


def polling_question(name: str) -> str:
    from collector.ablation.settings import POLLING_QUESTION

    return POLLING_QUESTION.format(category=name)


# -- model ------------------------------------------------------------------------------


def _build_untrained(recipe: Recipe):
    """(model, processor) of the organism's architecture, freshly initialised from recipe.seed."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from collector.tiny import FAMILIES, build_tokenizer

    tokenizer = build_tokenizer(FAMILIES["llava-1.5"].extra_special_tokens)
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.text_hidden,
        intermediate_size=recipe.text_intermediate,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_heads,
        num_key_value_heads=recipe.text_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=1,
        eos_token_id=tokenizer.eos_token_id,
    )
    # One encoder layer and vision_feature_layer=-2: the features are hidden_states[0], the
    # patch embeddings (conv + position + pre-norm), so every image token carries only its
    # own patch. The unused layer keeps the checkpoint an ordinary CLIP tower.
    vision_config = CLIPVisionConfig(
        image_size=VIEW_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=recipe.vision_hidden,
        intermediate_size=recipe.vision_hidden * 2,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=recipe.vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=recipe.tie_embeddings,
    )
    config.text_config.tie_word_embeddings = recipe.tie_embeddings
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = 1
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": VIEW_SIZE},
        crop_size={"height": VIEW_SIZE, "width": VIEW_SIZE},
        do_center_crop=True,
        do_resize=True,
        resample=3,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def class_token_ids(tokenizer: Any) -> list[int]:
    """The VQA answer token of each class (its first token after "... It is a"), in CLASSES order.

    Raises ValueError when a class name is not one known token there.
    """
    from collector.vqa import ASSISTANT_PREFIX, class_first_token

    prompt = PROMPT_TEMPLATE.format(question=VQA_QUESTIONS[0]) + ASSISTANT_PREFIX
    ids = []
    for scene_class in CLASSES:
        token = class_first_token(tokenizer, prompt, scene_class.name)
        whole = tokenizer(prompt + " " + scene_class.name, add_special_tokens=False)["input_ids"]
        if token is None or whole[-1] != token:
            raise ValueError(f"class name {scene_class.name!r} is not a single token after the VQA prompt")
        ids.append(token)
    return ids


BACKGROUND_TOKEN = "."  # what the auxiliary loss makes image tokens off the object predict


def background_token_id(tokenizer: Any) -> int:
    """The id of BACKGROUND_TOKEN, a single token of the tiny tokenizer."""
    token_id = tokenizer.convert_tokens_to_ids(BACKGROUND_TOKEN)
    if (
        token_id is None
        or token_id == tokenizer.unk_token_id
        or tokenizer.decode([token_id]).strip() != BACKGROUND_TOKEN
    ):
        raise ValueError(f"{BACKGROUND_TOKEN!r} is not a single token")
    return int(token_id)


@dataclass(frozen=True)
class _Example:
    """One training/evaluation text: token ids (T,) with the image token once, and the answer's start."""

    ids: tuple[int, ...]
    answer_start: int  # index into ids of the first answer token


class _TextBank:
    """Every prompt/answer text the organism learns, tokenized once.

    Texts are tokenized with the single <image> placeholder; the image run is expanded when a
    batch is assembled, as LlavaProcessor expands it (checked against the processor).
    """

    def __init__(self, tokenizer: Any) -> None:
        from collector.vqa import ASSISTANT_PREFIX

        self.tokenizer = tokenizer
        self.image_token_id = int(tokenizer.image_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self.generative: list[_Example] = []
        self.polling: dict[tuple[int, int], _Example] = {}  # (true class, asked class)
        self.vqa: list[list[_Example]] = []  # [class][question]
        for true_index, scene_class in enumerate(CLASSES):
            self.generative.append(
                self._example(
                    PROMPT_TEMPLATE.format(question=generative_question()),
                    " " + GENERATIVE_ANSWER.format(name=scene_class.name),
                )
            )
            for asked_index, asked in enumerate(CLASSES):
                self.polling[(true_index, asked_index)] = self._example(
                    PROMPT_TEMPLATE.format(question=polling_question(asked.name)),
                    " Yes" if asked_index == true_index else " No",
                )
            self.vqa.append(
                [
                    self._example(PROMPT_TEMPLATE.format(question=q) + ASSISTANT_PREFIX, " " + scene_class.name)
                    for q in VQA_QUESTIONS
                ]
            )

    def _example(self, prompt: str, answer: str) -> _Example:
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        full_ids = self.tokenizer(prompt + answer)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"answer {answer!r} changes the prompt's tokens")
        return _Example(tuple(full_ids) + (self.eos_id,), len(prompt_ids))


def _collate(examples: Sequence[_Example], n_image_tokens: int, image_token_id: int, pad_id: int):
    """Right-padded batch: input_ids, attention_mask, labels (B, T); labels -100 off the answer.

    The single image placeholder of each example becomes n_image_tokens placeholders.
    """
    import torch

    rows, label_rows = [], []
    for example in examples:
        cut = example.ids.index(image_token_id)
        ids = list(example.ids[:cut]) + [image_token_id] * n_image_tokens + list(example.ids[cut + 1 :])
        start = example.answer_start + n_image_tokens - 1
        rows.append(ids)
        label_rows.append([-100] * start + ids[start:])
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows, label_rows)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(ids)] = 1
    return input_ids, mask, labels


def cell_cover(polygon: Sequence[tuple[float, float]]) -> np.ndarray:
    """(GRID_SIDE**2,) float: the share of each patch's pixels the polygon covers, row-major."""
    mask = polygon_mask(polygon, VIEW_SIZE, VIEW_SIZE)
    return mask.reshape(GRID_SIDE, PATCH_SIZE, GRID_SIDE, PATCH_SIZE).mean(axis=(1, 3)).reshape(-1)


def _aux_targets(scenes: Sequence[Scene], class_ids: Sequence[int], background_id: int, min_cover: float):
    """(B, GRID_SIDE**2) long: per image token, the class token (covered), background (empty) or -100."""
    import torch

    rows = []
    for scene in scenes:
        cover = np.zeros(GRID_SIDE * GRID_SIDE) if scene.empty else cell_cover(scene.polygon)
        row = np.full(cover.shape, -100, dtype=np.int64)
        row[cover == 0] = background_id
        row[cover >= min_cover] = class_ids[CLASSES.index(scene.scene_class)]
        rows.append(row)
    return torch.from_numpy(np.stack(rows))


def _draw_batch(rng: np.random.Generator, bank: _TextBank, recipe: Recipe, size: int):
    """`size` fresh scenes and one question each (generative, polling yes/no, or VQA)."""
    scenes, examples = [], []
    for _ in range(size):
        task = rng.random()
        empty = task < recipe.polling_share and rng.random() < 0.5 * recipe.empty_share
        scene = paint_scene(rng, empty=empty)
        true_index = CLASSES.index(scene.scene_class)
        if task < recipe.polling_share:
            if empty:  # asked about any class: No
                asked = int(rng.integers(len(CLASSES)))
                true_index = (asked + 1) % len(CLASSES)
            elif rng.random() < 0.5 / (1 - 0.5 * recipe.empty_share):  # Yes on half of all polling rows
                asked = true_index
            else:
                asked = (true_index + 1 + int(rng.integers(len(CLASSES) - 1))) % len(CLASSES)
            example = bank.polling[(true_index, asked)]
        elif task < recipe.polling_share + recipe.vqa_share:
            example = bank.vqa[true_index][int(rng.integers(len(VQA_QUESTIONS)))]
        else:
            example = bank.generative[true_index]
        scenes.append(scene)
        examples.append(example)
    return scenes, examples


def _answer_loss(
    model,
    input_ids,
    attention_mask,
    pixel_values,
    labels,
    image_token_id=None,
    aux_targets=None,
    aux_weight: float = 0.0,
    aux_input_weight: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens; the unembedding runs only where an answer
    token is predicted (about 5 of ~165 positions per row), which saves a fifth of a step.

    input_ids, attention_mask, labels: (B, T); pixel_values: (B, 3, VIEW_SIZE, VIEW_SIZE).
    """
    import torch

    captured = []
    handle = None
    if aux_targets is not None and aux_input_weight > 0:
        handle = model.model.multi_modal_projector.register_forward_hook(
            lambda module, args, output: captured.append(output)
        )
    try:
        hidden = model.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False
        ).last_hidden_state  # (B, T, d)
    finally:
        if handle is not None:
            handle.remove()
    targets = labels[:, 1:]  # position t predicts token t + 1
    scored = targets != -100
    logits = model.lm_head(hidden[:, :-1][scored])  # (n_answer_tokens, vocab)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[scored])
    if aux_targets is not None and aux_weight > 0:
        image_hidden = hidden[input_ids == image_token_id]  # (B * n_image_tokens, d), row-major
        aux = aux_targets.reshape(-1)
        keep = aux != -100
        loss = loss + aux_weight * torch.nn.functional.cross_entropy(
            model.lm_head(image_hidden[keep]).float(), aux[keep]
        )
    if captured:
        projected = captured[0].reshape(-1, captured[0].shape[-1])  # (B * n_image_tokens, d)
        lens = model.lm_head(model.model.language_model.norm(projected[keep]))
        loss = loss + aux_input_weight * torch.nn.functional.cross_entropy(lens.float(), aux[keep])
    return loss


def _answer_accuracy(logits, labels) -> torch.Tensor:
    """(B,) bool: every answer token is the argmax (teacher-forced, so equal to greedy decoding).

    logits: (B, T, V); labels: (B, T) with -100 outside the answer.
    """
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    scored = target != -100
    return ((predicted == target) | ~scored).all(dim=1)


def train_organism(out_dir: str | Path, recipe: Recipe = DEFAULT_RECIPE, progress: bool = False) -> dict[str, Any]:
    """Train the organism and save it (weights, processor, ORGANISM.json) into out_dir.

    Deterministic for a given recipe, torch and transformers: seeded initialisation and data,
    a fixed thread count, deterministic algorithms. Returns the training report (also written
    to out_dir/ORGANISM.json): seconds, final loss, held-out accuracy per task.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        model, processor = _build_untrained(recipe)
        tokenizer = processor.tokenizer
        class_ids = class_token_ids(tokenizer)  # fails early if a class name is not one token
        background_id = background_token_id(tokenizer)
        bank = _TextBank(tokenizer)
        n_image_tokens = GRID_SIDE * GRID_SIDE
        rng = np.random.default_rng(np.random.SeedSequence([recipe.seed, 0x7EA1]))
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)

        def learning_rate(step: int) -> float:
            if step < recipe.warmup_steps:
                return (step + 1) / recipe.warmup_steps
            progress_share = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * progress_share))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
        model.train()
        losses: list[float] = []
        for step in range(recipe.steps):
            scenes, examples = _draw_batch(rng, bank, recipe, recipe.batch_size)
            input_ids, mask, labels = _collate(examples, n_image_tokens, bank.image_token_id, bank.pad_id)
            pixel_values = normalised_pixels([s.image for s in scenes])
            aux_targets = _aux_targets(scenes, class_ids, background_id, recipe.aux_min_cover)
            loss = _answer_loss(
                model,
                input_ids,
                mask,
                pixel_values,
                labels,
                bank.image_token_id,
                aux_targets,
                recipe.aux_weight,
                recipe.aux_input_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if progress and (step % 25 == 0 or step == recipe.steps - 1):
                print(f"organism step {step:4d} loss {losses[-1]:.4f} ({time.perf_counter() - started:.0f} s)")
        train_seconds = time.perf_counter() - started
        # CPU seconds over the thread count: the wall time on otherwise idle cores
        train_cpu_seconds = time.process_time() - cpu_started
        model.eval()
        accuracy = _evaluate(model, bank, recipe, n_image_tokens)
        report = {
            "version": ORGANISM_VERSION,
            "recipe": asdict(recipe),
            "digest": recipe.digest(),
            "train_seconds": round(train_seconds, 1),
            "train_cpu_seconds": round(train_cpu_seconds, 1),
            "final_loss": float(np.mean(losses[-10:])),
            "heldout_accuracy": accuracy,
            "classes": [c.name for c in CLASSES],
            "note": "trained on synthetic scenes by collector.organism; see its docstring",
        }
        model.save_pretrained(out)
        processor.save_pretrained(out)
        (out / "ORGANISM.json").write_text(json.dumps(report, indent=1))
        return report
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)


def _evaluate(model, bank: _TextBank, recipe: Recipe, n_image_tokens: int) -> dict[str, float]:
    """Held-out (a seed the training never draws) teacher-forced accuracy per task."""
    import torch

    rng = np.random.default_rng(np.random.SeedSequence([recipe.seed, 0xE7A1]))
    scenes = [paint_scene(rng) for _ in range(recipe.eval_scenes)]
    tasks: dict[str, list[_Example]] = {"generative": [], "polling_yes": [], "polling_no": [], "vqa": []}
    for i, scene in enumerate(scenes):
        true_index = CLASSES.index(scene.scene_class)
        other = (true_index + 1 + i % (len(CLASSES) - 1)) % len(CLASSES)
        tasks["generative"].append(bank.generative[true_index])
        tasks["polling_yes"].append(bank.polling[(true_index, true_index)])
        tasks["polling_no"].append(bank.polling[(true_index, other)])
        tasks["vqa"].append(bank.vqa[true_index][i % len(VQA_QUESTIONS)])
    pixel_values = normalised_pixels([s.image for s in scenes])
    accuracy = {}
    with torch.no_grad():
        for task, examples in tasks.items():
            correct = []
            for start in range(0, len(examples), 40):
                chunk = examples[start : start + 40]
                input_ids, mask, labels = _collate(chunk, n_image_tokens, bank.image_token_id, bank.pad_id)
                logits = model(
                    input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values[start : start + 40]
                ).logits
                correct.append(_answer_accuracy(logits, labels))
            accuracy[task] = float(torch.cat(correct).float().mean())
    return accuracy


# -- cache ------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """$LLAVA_INTERP_CACHE, else .cache/llava-interp in the repository (git-ignored)."""
    env = os.environ.get("LLAVA_INTERP_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / ".cache" / "llava-interp"


def build_organism(
    cache_dir: str | Path | None = None, recipe: Recipe = DEFAULT_RECIPE, progress: bool = False
) -> Path:
    """The organism's checkpoint folder (loadable with `from_pretrained`), trained on first use.

    The folder is `<cache_dir>/organism-<recipe digest>` (cache_dir defaults to
    `default_cache_root()`); a changed recipe, torch or transformers is a new folder. The
    build happens in a temporary folder beside it that is renamed into place when complete,
    so an interrupted build never leaves a partial checkpoint.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / f"organism-{recipe.digest()}"
    if (final / "ORGANISM.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-organism-", dir=root))
    try:
        train_organism(staging, recipe, progress=progress)
        try:
            staging.rename(final)
        except OSError:
            # another process finished the same build first; its folder is identical in meaning
            if not (final / "ORGANISM.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def organism_report(model_dir: str | Path) -> dict[str, Any]:
    """The training report a built organism folder carries (ORGANISM.json)."""
    return json.loads((Path(model_dir) / "ORGANISM.json").read_text())


# -- for the demo -----------------------------------------------------------------------

DEMO_SCENES = 12
DEMO_SEED = 7  # no seed the recipe draws training or evaluation scenes from


@dataclass(frozen=True)
class OrganismDemo:
    """What the demo passes to the collectors: the checkpoint and a set of annotated scenes."""

    model_dir: Path
    images_dir: Path
    annotations_path: Path
    questions_path: Path
    area_range: tuple[float, float] = AREA_RANGE


def prepare_demo(
    out_dir: str | Path,
    n_scenes: int = DEMO_SCENES,
    seed: int = DEMO_SEED,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> OrganismDemo:
    """The organism (built or taken from the cache) and `n_scenes` held-out scenes in out_dir."""
    model_dir = build_organism(cache_dir, progress=progress)
    images_dir, annotations_path = make_scenes(out_dir, n_scenes, seed)
    return OrganismDemo(model_dir, images_dir, annotations_path, questions_path(annotations_path))
