"""The VQA setting shared by token ablation and attention blocking.

The prompt is the family's template with a question about the image, followed by the
assistant prefix " It is a" that the answer continues; the answer is correct when the
predicted next token is the class name's first token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from collector.adapters import ModelAdapter
from collector.errors import UserError

ASSISTANT_PREFIX = " It is a"


def vqa_prompt(adapter: ModelAdapter, question: str) -> str:
    """The family template with the question, then the assistant prefix the answer continues."""
    return adapter.format_prompt(question) + ASSISTANT_PREFIX


def class_first_token(tokenizer: Any, prompt: str, class_name: str) -> int | None:
    """Id of the first token the class name adds after the prompt; None when it is unknown.

    The continuation is tokenized in context (prompt + " " + name versus the prompt alone):
    tokenizing " " + name on its own starts with a bare "▁" (id 29871) with LLaVA-1.5's
    Llama tokenizer, and with BOS when special tokens are added, neither of which the model
    predicts after "It is a". Falls back to " " + name alone (skipping bare-space tokens)
    when the prompt's tokens are not a prefix of the longer text's. None when that token is
    the unknown token or only whitespace.
    """
    prefix = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + " " + class_name, add_special_tokens=False)["input_ids"]
    if len(full) > len(prefix) and full[: len(prefix)] == prefix:
        candidates = full[len(prefix) :]
    else:
        candidates = tokenizer(" " + class_name, add_special_tokens=False)["input_ids"]
    for token_id in candidates:
        text = tokenizer.decode([token_id])
        if text.strip() or token_id == tokenizer.unk_token_id:
            return None if token_id == tokenizer.unk_token_id else int(token_id)
    return None


def load_questions(path: str | Path) -> dict[int, list[str]]:
    """A questions file in the original format {"<coco id>": ["question", ...]}; UserError if malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"questions file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"questions file {path} is not valid JSON: {error}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"questions file {path} must map COCO image ids to lists of questions")
    questions: dict[int, list[str]] = {}
    for key, value in data.items():
        if not str(key).strip().isdigit() or not isinstance(value, list) or not all(isinstance(q, str) for q in value):
            raise UserError(f'questions file {path}: entry {key!r} must be "<image id>": ["question", ...]')
        questions[int(key)] = list(value)
    return questions
