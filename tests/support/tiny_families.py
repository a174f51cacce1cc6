"""Tiny random-weight checkpoints of more VLM families, built offline, for tests.

Each builder saves weights, config, tokenizer and processor files with `save_pretrained`
into a folder that loads back through the same `from_pretrained` path real checkpoints
use (`collector.loading.load_model`). Sizes are shrunk; token ids, image sizes, patch
sizes, merge sizes and the structure of the config are the real ones where known.

- Qwen2.5-VL: from the REAL `Qwen/Qwen2.5-VL-3B-Instruct` config.json (shared data), sizes
  shrunk only; a locally trained byte-level BPE tokenizer whose special tokens sit at the
  real Qwen ids (151643...151656).
- Qwen2-VL: `Qwen2VLConfig` with the published `Qwen/Qwen2-VL-2B-Instruct` structure
  (no real file was available), sizes shrunk; same tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from collector.tiny import _CORPUS_SENTENCES, COCO_CATEGORY_NAMES, _randomise_norms

# The Qwen2 tokenizer's special tokens and their real ids (Qwen2-VL and Qwen2.5-VL share them).
QWEN_SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
QWEN_VOCAB_SIZE = 151936


def _corpus() -> list[str]:
    corpus = list(_CORPUS_SENTENCES) * 50 + [" ".join(COCO_CATEGORY_NAMES)] * 20
    corpus += [f"a {name} . {name.capitalize()} {name}s" for name in COCO_CATEGORY_NAMES] * 5
    corpus += ["system You are a helpful assistant. user assistant"] * 20
    return corpus


def build_qwen_tokenizer(vocab_size: int = 1200):
    """A byte-level BPE tokenizer trained here with Qwen's special tokens at their real ids.

    Like Qwen2's tokenizer: byte-level, no BOS, `<|endoftext|>` is the pad token and
    `<|im_end|>` the end of a turn. The learnt vocabulary takes ids 0..vocab_size-1; the
    ids between it and 151643 are unused (the model's embedding has all 151936 rows).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_tok.train_from_iterator(_corpus(), trainer=trainer)
    learnt = json.loads(trainer_tok.to_str())["model"]
    vocab = dict(learnt["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    # Special tokens live in the model vocabulary at their real ids, so adding them as
    # special tokens keeps those ids.
    vocab.update(QWEN_SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    for token, expected in QWEN_SPECIAL_TOKENS.items():
        got = fast.convert_tokens_to_ids(token)
        if got != expected:
            raise RuntimeError(f"tokenizer put {token} at id {got}, expected {expected}")
    return fast


def _qwen_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    # The real Qwen2-VL / 2.5-VL preprocessor settings except max_pixels, shrunk so that
    # test images give at most 64 image tokens (real: 12845056).
    return Qwen2VLImageProcessorPil(
        min_pixels=3136,
        max_pixels=224 * 224,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def _save_qwen_processor(out: Path, tokenizer: Any) -> None:
    """Save the processor's parts. The real `Qwen2VLProcessor` cannot be built without
    torchvision (its video processor needs it), so image processor and tokenizer are saved
    side by side, which is what the processor's own save_pretrained writes for them."""
    _qwen_image_processor().save_pretrained(out)
    tokenizer.save_pretrained(out)


def _finish(model: torch.nn.Module, out: Path, family: str, seed: int, note: str) -> Path:
    _randomise_norms(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(out)
    (out / "TINY_MODEL.json").write_text(
        json.dumps({"family": family, "seed": seed, "note": f"random weights, for tests; {note}"})
    )
    return out


def build_tiny_qwen2_5_vl(real_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Tiny Qwen2.5-VL from the real Qwen2.5-VL-3B-Instruct config.json, sizes shrunk only.

    Kept real: every token id, vocab size (151936), tied embeddings, M-RoPE with the real
    section proportions (16:24:24 of head_dim/2 -> 2:3:3 at head_dim 16), patch 14,
    temporal patch 2, 2x2 spatial merge, window size 112 and a mix of windowed and
    full-attention vision blocks.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(real_dir)
    text = config.text_config
    text.hidden_size = 64
    text.intermediate_size = 128
    text.num_hidden_layers = 3
    text.layer_types = list(text.layer_types[:3])
    text.num_attention_heads = 4
    text.num_key_value_heads = 2
    text.max_window_layers = 3
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [2, 3, 3]}
    vision = config.vision_config
    vision.hidden_size = 32
    vision.intermediate_size = 64
    vision.num_heads = 2
    vision.depth = 2
    vision.fullatt_block_indexes = [1]
    vision.out_hidden_size = 64
    config.dtype = "float32"
    text.dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    _save_qwen_processor(out, build_qwen_tokenizer())
    return _finish(model, out, "qwen2.5-vl", seed, "config from the real Qwen2.5-VL-3B-Instruct, sizes shrunk")


def build_tiny_qwen2_vl(out_dir: str | Path, seed: int = 0) -> Path:
    """Tiny Qwen2-VL with the published Qwen2-VL-2B-Instruct structure, sizes shrunk.

    No real Qwen2-VL config file is available offline; the structure (token ids, vocab
    151936, tied embeddings, M-RoPE sections 16:24:24, quick_gelu vision MLP, patch 14,
    2x2 merge, temporal patch 2) follows the published config.
    """
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": QWEN_VOCAB_SIZE,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "hidden_act": "quick_gelu",
        },
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    _save_qwen_processor(out, build_qwen_tokenizer())
    return _finish(model, out, "qwen2-vl", seed, "Qwen2-VL-2B structure, sizes shrunk")


def build_tiny_llava_next(out_dir: str | Path, seed: int = 0) -> Path:
    """Tiny LLaVA-NeXT with the llava-v1.6-mistral-7b-hf structure, sizes shrunk.

    Kept from the published config (no real file was available offline): CLIP 336/14
    vision tower (feature layer -2, 'default' select strategy), Mistral LM, the five
    `image_grid_pinpoints`, an `image_newline` vector, prompt `[INST] <image>\\n... [/INST]`.
    """
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
    )

    from collector.tiny import build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(("<image>", "<pad>", "[INST]", "[/INST]"))
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            image_size=336,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        ),
        text_config=MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            sliding_window=None,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # a distinctive newline vector (initialised to zeros otherwise)
        model.model.image_newline.copy_(torch.randn(model.model.image_newline.shape))
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=pinpoints,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_pad=True,
    )
    LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(out)
    return _finish(model, out, "llava-next", seed, "llava-v1.6-mistral-7b structure, sizes shrunk")


# Gemma's special tokens (real ids in google/gemma-3-4b-it: <pad> 0, <eos> 1, <bos> 2,
# <unk> 3, <start_of_turn> 105, <end_of_turn> 106, <start_of_image> 255999,
# <end_of_image> 256000, <image_soft_token> 262144; vocab 262208). The tiny tokenizer keeps
# the names, roles and order (pad, eos, bos, unk first) but a small vocabulary: a 262k-row
# unembedding would make every lens test read 262k logits per cell.
GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
GEMMA3_EXTRA_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")


def build_gemma_tokenizer(
    extra_tokens: tuple[str, ...] = GEMMA3_EXTRA_TOKENS, vocab_size: int = 1200, image_tokens: dict | None = None
):
    """A SentencePiece-style (Metaspace) BPE tokenizer with Gemma's special tokens.

    Like Gemma's: ids 0..3 are <pad>, <eos>, <bos>, <unk>; BOS is prepended; `image_tokens`
    names the processor's attributes (Gemma 3: image_token, boi_token, eoi_token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = _corpus() + ["user model Describe the image. What is in the image?"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(GEMMA_SPECIAL_TOKENS),
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:?!'\"-<>/\n"),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens(list(extra_tokens))
    bos_id = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens=dict(image_tokens or {}),
    )
    for expected, token in enumerate(GEMMA_SPECIAL_TOKENS):
        if fast.convert_tokens_to_ids(token) != expected:
            raise RuntimeError(f"tokenizer put {token} at {fast.convert_tokens_to_ids(token)}, expected {expected}")
    return fast


def build_tiny_gemma3(
    out_dir: str | Path, seed: int = 0, final_logit_softcapping: float | None = 3.0, sliding_window: int = 48
) -> Path:
    """Tiny Gemma 3 with the published google/gemma-3-4b-it structure, sizes shrunk.

    Kept (no real config file was available offline): SigLIP 896/14 vision tower (64x64
    patches), 256 image tokens per image (4x4 average pooling to a 16x16 grid), image
    span `\\n\\n<start_of_image>` + `<image_soft_token>` x 256 + `<end_of_image>\\n\\n`,
    bidirectional attention inside the image (token_type_ids), a 5:1 mix of sliding-window
    and full-attention layers (here sliding, sliding, full, sliding), q/k norms,
    `(1 + weight)` RMSNorm, embeddings scaled by sqrt(hidden_size), tied embeddings.
    Changed for the tests: `final_logit_softcapping` is ENABLED (gemma-3 ships None; a low
    cap makes it visible on random logits) and the sliding window is shorter than the
    prompt (real: 1024), so the mixed layers actually differ.
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_gemma_tokenizer(
        image_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        }
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA3_EXTRA_TOKENS}
    config = Gemma3Config(
        text_config=Gemma3TextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=sliding_window,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=final_logit_softcapping,
            attn_logit_softcapping=None,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh",
            pad_token_id=0,
            eos_token_id=[1, ids["<end_of_turn>"]],
            bos_token_id=2,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        vision_config=SiglipVisionConfig(
            image_size=896,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            layer_norm_eps=1e-6,
            vision_use_head=False,
        ),
        mm_tokens_per_image=256,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=True,
    )
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # the projector is initialised to zeros: image features would vanish
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        weight.copy_(torch.randn(weight.shape) * 0.5)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
        resample=2,
    )
    Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=256).save_pretrained(out)
    return _finish(model, out, "gemma3", seed, "gemma-3-4b-it structure, sizes shrunk, softcapping enabled")


def build_tiny_paligemma(out_dir: str | Path, seed: int = 0, final_logit_softcapping: float | None = 3.0) -> Path:
    """Tiny PaliGemma with the published google/paligemma-3b-mix-224 structure, sizes shrunk.

    Kept (no real config file was available offline): SigLIP 224/14 vision tower (16x16
    patches, no head), a linear projector per patch (256 image tokens), the image first in
    the prompt (`<image>` x 256, `<bos>`, prompt, "\\n"), a bidirectional prefix
    (token_type_ids), Gemma v1 LM (`(1 + weight)` RMSNorm, sqrt(d)-scaled embeddings, one KV
    head, tied embeddings), the real `PaliGemmaProcessor` (it adds the 1024 `<locNNNN>` and
    128 `<segNNN>` tokens to the tokenizer) with `SiglipImageProcessorPil` (no torchvision).
    Changed for the tests: `final_logit_softcapping` is set on the Gemma v1 text config
    (PaliGemma 1 has none; PaliGemma 2 uses 30): `PaliGemmaForConditionalGeneration` applies
    it, and a low cap makes it visible on random logits. The tiny tokenizer has the real
    special tokens' names and roles, not their ids (real `<image>`: 257152).
    """
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_gemma_tokenizer(extra_tokens=("<image>",), image_tokens={"image_token": "<image>"})
    image_processor = SiglipImageProcessorPil(
        size={"height": 224, "width": 224},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,
        do_convert_rgb=True,
        image_seq_length=256,
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <loc>/<seg>
    text_kwargs: dict[str, Any] = {}
    if final_logit_softcapping is not None:
        text_kwargs["final_logit_softcapping"] = final_logit_softcapping
    config = PaliGemmaConfig(
        text_config=GemmaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh",
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            **text_kwargs,
        ),
        vision_config=SiglipVisionConfig(
            image_size=224,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            layer_norm_eps=1e-6,
            vision_use_head=False,
        ),
        image_token_index=tokenizer.image_token_id,
        projection_dim=64,
        hidden_size=64,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
    )
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    processor.save_pretrained(out)
    return _finish(model, out, "paligemma", seed, "paligemma-3b-mix-224 structure, sizes shrunk, softcapping enabled")
