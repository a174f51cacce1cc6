"""Tiny random-weight VLMs built offline from configs, for tests and the demo.

Each builder writes a complete checkpoint folder (weights, config, tokenizer, processor)
with `save_pretrained`, so it is loaded back through exactly the `from_pretrained` path
real checkpoints use. The shapes that matter for interpretation are real: a 336 px
image with patch 14 gives 576 image tokens on a 24x24 grid.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# Words the tiny tokenizer must know as whole tokens: COCO class names, the prompts'
# words and the answers the experiments score ("Yes", "It is a ...").
COCO_CATEGORY_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant "
    "stop sign parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports ball kite baseball "
    "bat glove skateboard surfboard tennis racket bottle wine glass cup fork knife spoon bowl "
    "banana apple sandwich orange broccoli carrot hot pizza donut cake chair couch potted plant "
    "bed dining table toilet tv laptop mouse remote keyboard cell phone microwave oven toaster "
    "sink refrigerator book clock vase scissors teddy hair drier toothbrush"
).split()

_CORPUS_SENTENCES = (
    "USER: Describe the image. ASSISTANT: The image shows a cat on a couch.",
    "Is there a dog in this image? Yes, there is a dog. No, there is not.",
    "What is behind the television? It is a remote. It is a cat.",
    "The picture features two cats lying on a pink blanket with remotes.",
    "A red circle, a blue square and a green triangle on a white background.",
    "Yes No yes no It is a the an of in on with and there this that image picture photo",
    "What color is the object? What is on the table? What is the animal?",
    "shape circle square triangle star red green blue yellow white black",
)


@dataclass(frozen=True)
class TinyFamily:
    """What differs between the tiny families: text model, special tokens, prompt."""

    name: str
    extra_special_tokens: tuple[str, ...]
    make_text_config: Callable[[int, int, int], object]


def _llama_text_config(vocab_size: int, pad_id: int, eos_id: int) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        pad_token_id=pad_id,
        bos_token_id=1,
        eos_token_id=eos_id,
    )


def _phi3_text_config(vocab_size: int, pad_id: int, eos_id: int) -> object:
    from transformers import Phi3Config

    return Phi3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        original_max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        pad_token_id=pad_id,
        bos_token_id=1,
        eos_token_id=eos_id,
    )


FAMILIES: dict[str, TinyFamily] = {
    "llava-1.5": TinyFamily("llava-1.5", ("<image>", "<pad>"), _llama_text_config),
    "llava-phi": TinyFamily(
        "llava-phi",
        ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<image>", "<pad>"),
        _phi3_text_config,
    ),
}


def build_tokenizer(extra_special_tokens: tuple[str, ...], vocab_size: int = 1200):
    """A small SentencePiece-style (Metaspace) BPE tokenizer, trained here, in memory.

    Ids 0, 1, 2 are <unk>, <s>, </s> as in Llama; the family's special tokens follow the
    learnt vocabulary. BOS is prepended like Llama's tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = list(_CORPUS_SENTENCES) * 50 + [" ".join(COCO_CATEGORY_NAMES)] * 20
    corpus += [f"a {name} . {name.capitalize()} {name}s" for name in COCO_CATEGORY_NAMES] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:?!'\"-<>/\n"),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens(list(extra_special_tokens))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    eos = "<|endoftext|>" if "<|endoftext|>" in extra_special_tokens else "</s>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token=eos,
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )
    return fast


def _randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    # Fresh norm weights are all ones, which would hide a lens that applies the final norm
    # twice or not at all; random scales make such a bug visible.
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if "norm" in name.lower() and isinstance(weight, torch.nn.Parameter) and weight.dim() == 1:
                weight.copy_(0.5 + torch.rand(weight.shape, generator=generator))


def build_tiny_llava(out_dir: str | Path, family: str = "llava-1.5", seed: int = 0) -> Path:
    """Build and save a tiny random LLaVA-shaped checkpoint (CLIP 336/14 vision, 4-layer LM).

    `family` is 'llava-1.5' (Llama LM) or 'llava-phi' (Phi-3 LM). Returns the folder,
    loadable with `from_pretrained` like a hub checkpoint.
    """
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.extra_special_tokens)
    eos_id = tokenizer.eos_token_id
    text_config = spec.make_text_config(len(tokenizer), tokenizer.pad_token_id, eos_id)
    vision_config = CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _randomise_norms(model, generator)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = 1
    model.save_pretrained(out)

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        do_resize=True,
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    (out / "TINY_MODEL.json").write_text(
        json.dumps({"family": family, "seed": seed, "note": "random weights, for tests and the demo"})
    )
    return out


def shrink_real_config(real_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random model with a real checkpoint's config structure and real tokenizer.

    Copies the real config with only sizes shrunk (vocab, image size, patch size, token ids
    and processor files stay real) and saves weights + the real processor files.
    """
    import shutil

    from transformers import AutoConfig, AutoModelForImageTextToText

    real = Path(real_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(real)
    text = config.text_config
    text.hidden_size = 64
    text.intermediate_size = 128
    text.num_hidden_layers = 3
    text.num_attention_heads = 4
    text.num_key_value_heads = 4
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
    _randomise_norms(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(out)
    for item in real.iterdir():
        if item.name in {"config.json", "model.safetensors.index.json"} or item.suffix == ".md":
            continue
        if item.name == "generation_config.json" and (out / item.name).exists():
            continue
        shutil.copy2(item, out / item.name)
    return out
