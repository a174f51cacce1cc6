"""PaliGemma (`PaliGemmaForConditionalGeneration`, e.g. `google/paligemma-3b-mix-224`).

- Input layout (what `PaliGemmaProcessor` builds, transformers 5.24): `<image>` x 256, then
  `<bos>`, the prompt text, and `"\\n"`, which ends the *prefix*. The image comes first;
  there are no begin/end-of-image tokens. With `suffix=` the processor appends the suffix
  tokens (+ `<eos>`) after the newline.
- Attention: the processor returns `token_type_ids`, 0 for the prefix (image + BOS + prompt
  + newline) and 1 for a suffix; the model turns them into `block_sequence_ids` (prefix 0,
  suffix -1): the whole prefix attends bidirectionally, the suffix (and generated tokens)
  causally. `build_inputs` always passes `token_type_ids`; without them the mask is causal.
  Gemma's attention modules are built with `is_causal=False` (`use_bidirectional_attention`),
  which the blocking hooks read.
- Prompt template: the mix checkpoints take a task prefix; the default is the VQA task
  `<image>answer en {question}\\n`. The leading `<image>` is where the processor puts the 256
  image tokens (and BOS after them; without it the processor adds it with a warning); the
  template's LAST newline marks the end of the prefix: text before it is the bidirectional
  prefix (the processor adds that newline back itself), text after it (e.g. the VQA answer
  opening " It is a") is a causal suffix (token type 1), tokenized as the processor
  tokenizes `suffix=` but without the `<eos>` it appends. Text without a newline is all
  prefix, as the processor treats it.
- Vision: SigLIP 224/14 (16x16 patches), no pooling, a linear projector per patch: 256
  tokens, row-major (verified by perturbation); one cell = 14x14 px of the 224x224 view
  (image resized exactly, no crop, no pad).
- LM: Gemma (v1: `(1 + weight)` RMSNorm, embeddings scaled by sqrt(d) in the embedding
  module). The forward applies `final_logit_softcapping` when the text config sets one
  (PaliGemma 2's Gemma 2 LM: 30), so `unembedding` is `SoftcappedUnembedding` then
  (`GemmaFamilyAdapter.softcap`), and the lens equals the logits exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from collector.adapters.base import ImageTokenLayout
from collector.adapters.gemma3 import GemmaFamilyAdapter

PREFIX_END = "\n"


class PaliGemmaAdapter(GemmaFamilyAdapter):
    family = "paligemma"
    default_prompt_template = "<image>answer en {question}" + PREFIX_END
    # The SigLIP image processor: resize to exactly 224x224 (`GemmaFamilyAdapter`).
    image_processor_classes = frozenset({"SiglipImageProcessor", "SiglipImageProcessorPil"})

    @classmethod
    def matches(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) == "paligemma"

    @property
    def patch_grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return side, side

    @staticmethod
    def split_prefix(text: str) -> tuple[str, str]:
        """(prefix, suffix): the text before the last newline (which the processor appends
        back) and after it; (text, "") when there is no newline."""
        if PREFIX_END not in text:
            return text, ""
        prefix, _, suffix = text.rpartition(PREFIX_END)
        return prefix, suffix

    def build_inputs_for_text(self, image: Image.Image, text: str) -> dict[str, torch.Tensor]:
        prefix, suffix = self.split_prefix(text)
        batch = dict(self.processor(images=image, text=prefix, return_tensors="pt"))
        batch.pop("labels", None)  # the processor's training labels: not a model input here
        if "token_type_ids" not in batch:  # what the real processor passes: prefix 0
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        if suffix:
            ids = self.tokenizer(suffix, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = ids.to(batch["input_ids"].dtype)
            batch["input_ids"] = torch.cat([batch["input_ids"], ids], dim=1)
            batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(ids)], dim=1)
            batch["token_type_ids"] = torch.cat([batch["token_type_ids"], torch.ones_like(ids)], dim=1)
        return self._to_model(batch)

    def image_token_layout(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> ImageTokenLayout:
        rows, cols = self.patch_grid
        positions = self.image_token_run(input_ids, rows * cols, f"{rows * cols} image tokens for a {rows}x{cols} grid")
        return ImageTokenLayout.row_major(positions, rows, cols)
