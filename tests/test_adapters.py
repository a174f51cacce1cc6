"""Adapters as a boundary: the family lookup, the contract every adapter fulfils, and no
family knowledge outside `collector/adapters/` (per-family checks: tests/test_family_*.py)."""

from __future__ import annotations

import ast
import re
import types
from pathlib import Path

import pytest

from collector.adapters import ADAPTERS, UNSUPPORTED, UnsupportedModelError, adapter_class_for

REPO = Path(__file__).resolve().parents[1]


def test_unsupported_families_are_named():
    for model_type in UNSUPPORTED:
        config = types.SimpleNamespace(model_type=model_type, text_config=None)
        with pytest.raises(UnsupportedModelError, match="not supported"):
            adapter_class_for(config)
    odd = types.SimpleNamespace(model_type="llava", text_config=types.SimpleNamespace(model_type="gpt2"))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        adapter_class_for(odd)


@pytest.mark.parametrize("adapter", ADAPTERS, ids=[a.family for a in ADAPTERS])
def test_every_adapter_declares_its_image_processors_and_refuses_others(adapter):
    """`view_geometry` restates specific processors' preprocessing; any other is refused
    rather than guessed (a subclass or another model's processor may pad or crop differently)."""
    assert adapter.image_processor_classes and all(isinstance(n, str) for n in adapter.image_processor_classes)

    class NotAProcessor:
        pass

    with pytest.raises(ValueError, match="unsupported image processor 'NotAProcessor'"):
        adapter.image_processor_geometry(NotAProcessor(), 640, 480)


# -- no family knowledge outside the adapters ---------------------------------------------------

# Names of the families the project supports or refuses, their language models and vision
# towers, as they appear in transformers class names (LlavaConfig, Qwen2VLImageProcessor,
# Gemma3ForConditionalGeneration, SiglipVisionConfig, Phi3Config, MistralConfig, MllamaConfig),
# model types ("llava_next", "qwen2_5_vl", "paligemma"), family ids ("llava-1.5") and hub ids.
# Matched case-insensitively as substrings, except:
# - "llava" followed by "-interp" / "_interp": the project's own name (llava-interp,
#   LLAVA_INTERP_DUCKDB_WASM), not a family;
# - CLIP is matched only as a name (CLIPImageProcessor, _CLIP_LIKE), case-sensitively: the
#   lowercase word is numpy's and torch's clip.
FAMILY_WORDS = re.compile(
    r"llava(?![-_]interp)|qwen|gemma|siglip|phi-?3|mistral|llama|vicuna|idefics|smolvlm|blip",
    re.IGNORECASE,
)
CLIP_NAME = re.compile(r"(?<![A-Za-z])CLIP(?![a-z])")
SCANNED = ("collector", "db", "report")
# Files that must name a family, and what they may name:
ALLOWED: dict[str, set[str] | None] = {
    # The model adapters: the one place family knowledge belongs.
    "collector/adapters/": None,
    # Builds the demo's tiny LLaVA-1.5 / LLaVA-Phi checkpoints from transformers configs
    # (LlavaConfig, CLIPVisionConfig, LlamaConfig, Phi3Config); it must name them. Test-only
    # builders of other families live in tests/support/.
    "collector/tiny.py": None,
    # Builds and trains the model organism, a LLaVA-1.5-shaped checkpoint, from the same
    # transformers configs and processor classes; it must name them too.
    "collector/organism.py": None,
    # The demo runs that tiny LLaVA-1.5 by design; nothing else in it may name a family.
    "collector/demo.py": {"build_tiny_llava", "tiny-llava-1.5", "llava-1.5"},
    # `llava-interp reproduce` runs the paper's protocol, whose default model is the paper's.
    "collector/reproduce.py": {"llava-hf/llava-1.5-7b-hf"},
    # The paper's reported values are data about the models the paper measured (their hub
    # ids and names); nothing there handles a family.
    "report/paper_reference.py": None,
}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                found.add(id(first.value))
    return found


def _help_texts(tree: ast.AST) -> set[int]:
    """String constants that are --help text: `help=` arguments and `*_HELP` constants."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "help":
            found.update(id(n) for n in ast.walk(node.value))
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id.endswith("_HELP") for t in node.targets
        ):
            found.update(id(n) for n in ast.walk(node.value))
    return found


def code_words(source: str) -> list[tuple[int, str]]:
    """(line, text) of every name and string the code uses: identifiers, attributes,
    definitions, arguments, imports, and string constants other than docstrings and --help
    text. Prose (comments, docstrings, help) may cite a family as an example; code may not."""
    tree = ast.parse(source)
    prose = _docstrings(tree) | _help_texts(tree)
    words: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Name):
            words.append((line, node.id))
        elif isinstance(node, ast.Attribute):
            words.append((line, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            words.append((line, node.name))
        elif isinstance(node, ast.arg):
            words.append((line, node.arg))
        elif isinstance(node, ast.keyword) and node.arg:
            words.append((node.value.lineno, node.arg))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            words.extend((line, alias.name) for alias in node.names)
            words.extend((line, alias.asname) for alias in node.names if alias.asname)
            if isinstance(node, ast.ImportFrom) and node.module:
                words.append((line, node.module))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            words.append((line, node.value))
    return words


def family_names_in(source: str, allowed: set[str] = frozenset()) -> list[tuple[int, str]]:
    """(line, text) of the code words that name a family, less the `allowed` words."""
    return sorted(
        (line, text)
        for line, text in code_words(source)
        if text not in allowed and (FAMILY_WORDS.search(text) or CLIP_NAME.search(text))
    )


def test_the_family_scan_finds_names_in_code_and_ignores_prose():
    leaky = '''
"""Docstrings may say LLaVA-NeXT or Qwen2-VL."""
import click
from transformers import Qwen2VLImageProcessor as QwenIP
_CLIP_LIKE = {"CLIPImageProcessorPil"}
MODEL_HELP = "e.g. llava-hf/llava-1.5-7b-hf"

def view(image_processor, width):  # a comment on Gemma3 is prose
    """Prose about PaliGemma."""
    if type(image_processor).__name__ == "LlavaNextImageProcessor":
        return qwen_smart_resize(width)
    if image_processor.model_type in ("paligemma", "siglip_vision_model"):
        return np.clip(width, 0, 1)
    name = f"{width}-mistral"
    click.option("--x", help="LLaVA-1.5 default")
    return LLAVA_INTERP_DUCKDB_WASM, "llava-interp"
'''
    found = [text for _, text in family_names_in(leaky)]
    assert sorted(found) == sorted(
        [
            "Qwen2VLImageProcessor",
            "QwenIP",
            "_CLIP_LIKE",
            "CLIPImageProcessorPil",
            "LlavaNextImageProcessor",
            "qwen_smart_resize",
            "paligemma",
            "siglip_vision_model",
            "-mistral",
        ]
    )


def test_no_family_names_outside_the_adapters():
    """Adding a family must not touch the experiments, the database or the report: only
    `collector/adapters/` may name one (allowances in ALLOWED, each with its reason)."""
    leaks = []
    scanned = 0
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            rule = next((ALLOWED[prefix] for prefix in ALLOWED if relative.startswith(prefix)), set())
            if rule is None:
                continue
            scanned += 1
            leaks += [f"{relative}:{line}: {text!r}" for line, text in family_names_in(path.read_text(), rule)]
    assert scanned > 20  # the scan saw the code
    assert not leaks, "family knowledge outside collector/adapters/ (move it into the adapter):\n" + "\n".join(leaks)
