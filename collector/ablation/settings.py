"""The three ways of asking whether the model still sees the object, and their scoring.

- generative: greedy "Describe this image."; correct if the class name appears as a word.
- polling: greedy "Is there a {class} in this image?"; correct if the answer says yes.
- vqa: a question about the image followed by " It is a"; correct if the next token is
  the first token of the class name.

Every condition of one image shares the prompt and so the sequence length (only
embeddings or pixels differ), so the conditions run as one batch without padding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from collector.ablation.replacement import ablate_positions
from collector.loading import LoadedModel

SETTINGS = ("generative", "polling", "vqa")
GENERATIVE_QUESTION = "Describe this image."
POLLING_QUESTION = "Is there a {category} in this image?"
DEFAULT_MAX_NEW_TOKENS = 200
POLLING_MAX_NEW_TOKENS = 10

# Irregular plurals of words in COCO class names (the last word is what gets pluralised).
_IRREGULAR_PLURALS = {
    "person": ("people", "persons"),
    "mouse": ("mice",),
    "knife": ("knives",),
    "sheep": ("sheep",),
    "skis": ("skis", "ski"),
    "scissors": ("scissors",),
    "glass": ("glasses",),
    "bus": ("buses", "busses"),
    "bench": ("benches",),
    "couch": ("couches",),
    "sandwich": ("sandwiches",),
    "toothbrush": ("toothbrushes",),
    "dining table": ("dining tables",),
    "wine glass": ("wine glasses",),
    "potted plant": ("potted plants",),
    "hair drier": ("hair driers", "hair dryer", "hair dryers"),
}


def word_forms(class_name: str) -> list[str]:
    """Singular and plural surface forms of a (possibly multi-word) class name, lower case."""
    name = " ".join(class_name.lower().split())
    forms = {name}
    if name in _IRREGULAR_PLURALS:
        forms.update(_IRREGULAR_PLURALS[name])
    head, _, last = name.rpartition(" ")
    prefix = f"{head} " if head else ""
    if last in _IRREGULAR_PLURALS:
        forms.update(prefix + form for form in _IRREGULAR_PLURALS[last])
    elif re.search(r"(s|x|z|ch|sh)$", last):
        forms.add(prefix + last + "es")
    elif re.search(r"[^aeiou]y$", last):
        forms.add(prefix + last[:-1] + "ies")
    elif last.endswith("fe"):
        forms.add(prefix + last[:-2] + "ves")
    else:
        forms.add(prefix + last + "s")
    return sorted(forms, key=len, reverse=True)


def mentions_class(text: str, class_name: str) -> bool:
    """Whether `text` names the class as a whole word or phrase, case-insensitive, plurals included.

    "car" matches "Cars" but not "carrot" or "sidecar"; "traffic light" matches
    "traffic  lights" across any whitespace (hyphens count as a separator too) but not
    "light" alone.
    """
    for form in word_forms(class_name):
        words = [re.escape(word) for word in form.split()]
        pattern = r"(?<![\w])" + r"[\s\-]+".join(words) + r"(?![\w])"
        if re.search(pattern, text, flags=re.IGNORECASE):
            return True
    return False


def says_yes(answer: str) -> bool:
    """Whether a polling answer starts with the word "yes" (after punctuation/whitespace)."""
    return re.match(r"^[\W_]*yes(?![\w])", answer.strip(), flags=re.IGNORECASE) is not None


# -- batched runs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One row of a batch: the LM input positions it replaces, and its own pixel_values if any.

    pixel_values: (3, H, W) replacing the image's view (image_noise), or None; the adapter
    puts it into the family's pixel_values (`ModelAdapter.with_view_pixels`).
    """

    name: str
    positions: tuple[int, ...]
    pixel_values: torch.Tensor | None = None


def _batch_inputs(
    adapter: Any, inputs: dict[str, torch.Tensor], conditions: Sequence[Condition]
) -> dict[str, torch.Tensor]:
    """The one-image inputs repeated per condition, with per-condition views (the adapter
    knows how a family batches its pixel values)."""
    return adapter.repeat_inputs(inputs, [condition.pixel_values for condition in conditions])


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    if size < 1:
        raise ValueError("batch size must be at least 1")
    return [items[start : start + size] for start in range(0, len(items), size)]


def _eos_ids(loaded: LoadedModel) -> list[int]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.adapter.tokenizer.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@torch.no_grad()
def generate_answers(
    loaded: LoadedModel,
    inputs: dict[str, torch.Tensor],
    conditions: Sequence[Condition],
    replacement: torch.Tensor,
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers, one per condition, each cut at its first EOS.

    inputs: one image's processor batch (input_ids (1, T), pixel_values (1, 3, H, W), ...).
    One `generate` call per chunk of `batch_size` conditions; the replacement (d,) goes
    into each row's positions during the prefill.
    """
    tokenizer = loaded.adapter.tokenizer
    eos_ids = _eos_ids(loaded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    prompt_length = int(inputs["input_ids"].shape[1])
    answers: list[str] = []
    for chunk in _chunks(list(conditions), batch_size):
        batch = _batch_inputs(loaded.adapter, inputs, chunk)
        with ablate_positions(loaded.adapter, [c.positions for c in chunk], replacement):
            sequences = loaded.model.generate(
                **batch,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        for row in sequences[:, prompt_length:].tolist():
            cut = next((i for i, token in enumerate(row) if token in eos_ids), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


@dataclass(frozen=True)
class NextToken:
    """The next-token prediction of one condition (vqa)."""

    predicted_id: int
    predicted_token: str
    predicted_prob: float
    target_prob: float


@torch.no_grad()
def next_token_predictions(
    loaded: LoadedModel,
    inputs: dict[str, torch.Tensor],
    conditions: Sequence[Condition],
    replacement: torch.Tensor,
    target_token_id: int,
    batch_size: int = 16,
) -> list[NextToken]:
    """One forward per chunk of conditions; the softmax at the last position, read per condition."""
    tokenizer = loaded.adapter.tokenizer
    results: list[NextToken] = []
    for chunk in _chunks(list(conditions), batch_size):
        batch = _batch_inputs(loaded.adapter, inputs, chunk)
        with ablate_positions(loaded.adapter, [c.positions for c in chunk], replacement):
            logits = loaded.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1)
        predicted = probs.argmax(dim=-1)
        for row in range(len(chunk)):
            token_id = int(predicted[row])
            results.append(
                NextToken(
                    predicted_id=token_id,
                    predicted_token=tokenizer.decode([token_id]),
                    predicted_prob=float(probs[row, token_id]),
                    target_prob=float(probs[row, target_token_id]),
                )
            )
    return results
