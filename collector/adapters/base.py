"""The model adapter: the one place that knows where a VLM family keeps its parts.

An adapter answers: where are the decoder layers, the final norm, the unembedding and
the vision parts; how is a prompt built; which LM input positions are image tokens and
how they map onto the patch grid; which view of the original image its image processor
makes (`view_geometry`). Nothing outside `collector.adapters` special-cases a model
family (tests/test_adapters.py enforces it); docs/adding-a-family.md lists what a
new family needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from collector.readout import Readout
from db.geometry import ViewGeometry


@dataclass(frozen=True)
class ExtraImageTokens:
    """Image-derived LM positions that are not cells of the layout's grid.

    E.g. LLaVA-NeXT's high-resolution tile tokens and its `image_newline` tokens. Each
    entry has a `kind` (written to `positions.kind`), a cell of its own grid (`rows`,
    `cols`; -1 where there is none, written as NULL) and a `label`.
    """

    positions: torch.Tensor
    kinds: tuple[str, ...]
    rows: torch.Tensor
    cols: torch.Tensor
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        n = int(self.positions.numel())
        if not (len(self.kinds) == len(self.labels) == self.rows.numel() == self.cols.numel() == n):
            raise ValueError("extra image tokens: positions, kinds, rows, cols and labels differ in length")


@dataclass(frozen=True)
class NamedView:
    """A further image the model sees besides its main view (e.g. LLaVA-NeXT's stitched
    high-resolution tiles), with the grid its tokens cover.

    Positions of kind `kind` carry their cell of this grid in (patch_row, patch_col); one
    cell is (image width / grid_cols) x (image height / grid_rows) pixels.
    """

    name: str
    image: Image.Image
    grid_rows: int
    grid_cols: int
    kind: str


@dataclass(frozen=True)
class ImageTokenLayout:
    """Where an image's tokens sit in the LM input and which patch each one is.

    positions: (n_image_tokens,) int64, LM input positions of the grid's image tokens,
        in row-major cell order (ascending for every family whose tokens are row-major).
    patch_rows, patch_cols: (n_image_tokens,) int64, the grid cell of each token
        (row-major: token k is cell (k // grid_cols, k % grid_cols)).
    extra: image-derived positions outside the grid (None for most families); see
        `ExtraImageTokens`. `all_image_positions` covers both.
    """

    positions: torch.Tensor
    patch_rows: torch.Tensor
    patch_cols: torch.Tensor
    grid_rows: int
    grid_cols: int
    extra: ExtraImageTokens | None = None

    @classmethod
    def row_major(
        cls, positions: torch.Tensor, grid_rows: int, grid_cols: int, extra: ExtraImageTokens | None = None
    ) -> ImageTokenLayout:
        """The layout of grid tokens at `positions` (grid_rows * grid_cols,), in row-major cell order."""
        flat = torch.arange(grid_rows * grid_cols)
        return cls(positions, flat // grid_cols, flat % grid_cols, grid_rows, grid_cols, extra)

    @property
    def n_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def all_image_positions(self) -> torch.Tensor:
        """Every LM position that carries image features (grid + extra), ascending."""
        if self.extra is None or self.extra.positions.numel() == 0:
            return self.positions.sort().values
        return torch.cat([self.positions, self.extra.positions]).sort().values

    def position_of(self, row: int, col: int) -> int:
        """The LM input position of grid cell (row, col)."""
        if not (0 <= row < self.grid_rows and 0 <= col < self.grid_cols):
            raise IndexError(f"cell ({row}, {col}) outside the {self.grid_rows}x{self.grid_cols} grid")
        return int(self.positions[row * self.grid_cols + col])

    def positions_of_cells(self, cell_indices: list[int]) -> list[int]:
        """LM input positions of row-major flat cell indices (r * grid_cols + c)."""
        return [int(self.positions[i]) for i in cell_indices]


class ModelAdapter(ABC):
    """Where a VLM family keeps its parts. Subclasses declare one family each."""

    family: ClassVar[str]
    default_prompt_template: ClassVar[str]
    # Class names of the image processors whose preprocessing `image_processor_geometry`
    # restates; any other (a subclass, another model's processor) may pad or crop
    # differently and is refused.
    image_processor_classes: ClassVar[frozenset[str]] = frozenset()
    # transformers applies the final norm to the last entry of `hidden_states` already.
    last_hidden_state_is_normed: ClassVar[bool] = True

    def __init__(self, model: Any, processor: Any, prompt_template: str | None = None) -> None:
        self.model = model
        self.processor = processor
        self.prompt_template = prompt_template or self.default_prompt_template
        if "{question}" not in self.prompt_template:
            raise ValueError("a prompt template must contain '{question}'")

    @classmethod
    @abstractmethod
    def matches(cls, config: Any) -> bool:
        """Whether this adapter handles a model with this config."""

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None) -> Any:
        """The checkpoint's processor (`AutoProcessor.from_pretrained` unless a family needs more)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_id, revision=revision)

    # -- where the parts are -----------------------------------------------------------

    # Where the language-model parts are. transformers 5 exposes them the same way for
    # every supported family; an adapter overrides only what its family keeps elsewhere.

    @property
    def decoder(self) -> torch.nn.Module:
        """The language model: forward(inputs_embeds=(B, T, d_model), ...) runs every layer.

        A forward pre-hook here sees the LM input embeddings after image features are merged.
        """
        return self.model.get_decoder()

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        """The LM's decoder layers, in order."""
        return self.decoder.layers

    @property
    def final_norm(self) -> torch.nn.Module:
        """The norm applied to the last decoder layer's output before the unembedding."""
        return self.decoder.norm

    @property
    def unembedding(self) -> torch.nn.Module:
        """hidden (..., d_model) -> logits (..., vocab), exactly as the model computes its logits."""
        return self.model.get_output_embeddings()

    @property
    def softcap(self) -> float | None:
        """The final-logit softcap the model class's forward applies to its logits (None: none)."""
        return None

    def readout(self) -> Readout:
        """Hidden state -> logits exactly as the model computes them: final norm, lm_head, softcap."""
        return Readout(self.final_norm, self.model.get_output_embeddings(), self.softcap)

    @property
    def input_embeddings(self) -> torch.nn.Module:
        """token ids -> LM input embeddings."""
        return self.model.get_input_embeddings()

    @property
    def image_token_id(self) -> int:
        """The placeholder token id that image features replace in input_ids."""
        return int(self.model.config.image_token_id)

    @property
    @abstractmethod
    def vision_tower(self) -> torch.nn.Module: ...

    @property
    @abstractmethod
    def projector(self) -> torch.nn.Module: ...

    def attention_module(self, layer: int) -> torch.nn.Module:
        """The self-attention module of decoder layer `layer` (its forward gets `attention_mask`)."""
        return self.decoder_layers[layer].self_attn

    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.unembedding.weight.shape[-1])

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.input_embeddings.weight.device

    # -- inputs ------------------------------------------------------------------------

    def format_prompt(self, question: str) -> str:
        return self.prompt_template.format(question=question)

    def build_inputs(self, image: Image.Image, question: str) -> dict[str, torch.Tensor]:
        """Processor inputs for one image and one question placed into the prompt template,
        on the model's device: input_ids (1, T), attention_mask (1, T), pixel_values, ..."""
        return self.build_inputs_for_text(image, self.format_prompt(question))

    def build_inputs_for_text(self, image: Image.Image, text: str) -> dict[str, torch.Tensor]:
        """Processor inputs for one image and a complete prompt text (template already
        applied, e.g. with a forced answer prefix), on the model's device."""
        batch = self.processor(images=image, text=text, return_tensors="pt")
        return self._to_model(batch)

    def _to_model(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Tensors moved to the model's device; floating ones cast to its dtype."""
        dtype = self.input_embeddings.weight.dtype
        out: dict[str, torch.Tensor] = {}
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(dtype)
            out[name] = value
        return out

    def image_token_run(
        self,
        input_ids: torch.Tensor,
        expected: int,
        what: str,
        opened_by: int | None = None,
        closed_by: int | None = None,
    ) -> torch.Tensor:
        """Positions (expected,) of the one contiguous run of image tokens in input_ids (T,).

        Raises ValueError when the run has another length (`what` says what was expected),
        is split, or is not between the `opened_by` / `closed_by` delimiter token ids.
        """
        if input_ids.dim() != 1:
            raise ValueError(f"expected one sequence of token ids (T,), got shape {tuple(input_ids.shape)}")
        positions = torch.nonzero(input_ids == self.image_token_id).flatten().cpu()
        if positions.numel() != expected:
            raise ValueError(
                f"expected {what}, found {positions.numel()} image tokens (one image per prompt is supported)"
            )
        if expected and int(positions[-1] - positions[0]) != expected - 1:
            raise ValueError("image tokens are not one contiguous run")
        if expected and opened_by is not None:
            start = int(positions[0])
            if start == 0 or int(input_ids[start - 1]) != opened_by:
                raise ValueError(f"the image token run does not follow token {opened_by}")
        if expected and closed_by is not None:
            end = int(positions[-1])
            if end + 1 >= input_ids.numel() or int(input_ids[end + 1]) != closed_by:
                raise ValueError(f"the image token run is not followed by token {closed_by}")
        return positions

    @abstractmethod
    def image_token_layout(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> ImageTokenLayout:
        """Image positions of one sequence, input_ids (T,), and their grid cells.

        `inputs` is what `build_inputs` returned for these input_ids: families whose grid
        depends on the image read it (Qwen2-VL: `image_grid_thw`; LLaVA-NeXT: `image_sizes`).
        """

    # -- the view ------------------------------------------------------------------------

    def view_geometry(self, width: int, height: int) -> ViewGeometry:
        """original -> model view for a ``width`` x ``height`` image, under this model's
        image processor: the view is what `view_pixels` holds and what the grid covers."""
        return self.image_processor_geometry(self.processor.image_processor, width, height)

    @classmethod
    @abstractmethod
    def image_processor_geometry(cls, image_processor: Any, width: int, height: int) -> ViewGeometry:
        """The view geometry `image_processor` (one of `image_processor_classes`, instance
        settings, not per-call overrides) gives a ``width`` x ``height`` image.

        Raises ValueError for another processor class, a setting the geometry cannot
        express, or a non-positive size.
        """

    @classmethod
    def require_image_processor(cls, image_processor: Any) -> str:
        """The processor's class name; ValueError unless it is one of `image_processor_classes`."""
        name = type(image_processor).__name__
        if name not in cls.image_processor_classes:
            raise ValueError(
                f"unsupported image processor {name!r} for {cls.family}; expected one of "
                f"{sorted(cls.image_processor_classes)}"
            )
        return name

    def view_pixels(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The (3, H, W) pixel tensor of the model's view, from `build_inputs`' output.

        Default: `pixel_values[0]`; families with patchified or tiled pixel values override.
        """
        return inputs["pixel_values"][0]

    def with_view_pixels(self, inputs: Mapping[str, Any], view: torch.Tensor) -> torch.Tensor:
        """`inputs["pixel_values"]` (one image) with the view replaced by `view` (3, H, W): the
        inverse of `view_pixels`, e.g. to add noise to part of the image as the model sees it.

        Default: pixel_values[0] = view; families with patchified or tiled pixel values override.
        """
        pixels = inputs["pixel_values"].clone()
        pixels[0] = view.to(device=pixels.device, dtype=pixels.dtype)
        return pixels

    def repeat_inputs(self, inputs: Mapping[str, Any], views: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """One image's `build_inputs` output repeated as a batch of len(views) rows; row b sees
        `views[b]` (3, H, W) as its view (`with_view_pixels`), or the image itself where None.

        Default: every tensor expanded along dim 0, pixel_values copied where a row has a view.
        """
        batch = len(views)
        out = {
            name: value.expand(batch, *value.shape[1:]).contiguous() if isinstance(value, torch.Tensor) else value
            for name, value in inputs.items()
        }
        if any(view is not None for view in views):
            pixels = out["pixel_values"].clone()
            for row, view in enumerate(views):
                if view is not None:
                    pixels[row] = self.with_view_pixels(inputs, view)[0]
            out["pixel_values"] = pixels
        return out

    def extra_views(self, inputs: Mapping[str, Any]) -> list[NamedView]:
        """Further views of the image the model sees, from `build_inputs`' output, each with
        the grid of the positions of its `kind`. Default: none."""
        return []

    @abstractmethod
    def view_image(self, pixel_values: torch.Tensor) -> Image.Image:
        """The image as the model sees it, from pixel_values (3, H, W)."""


def denormalise_to_image(pixel_values: torch.Tensor, image_processor: Any) -> Image.Image:
    """Undo an image processor's normalisation and rescaling of (3, H, W) pixel values."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(3, 1, 1)
    rescale = float(getattr(image_processor, "rescale_factor", 1 / 255))
    values = pixel_values.detach().float().cpu()
    if getattr(image_processor, "do_normalize", True):
        values = values * std + mean
    if getattr(image_processor, "do_rescale", True):
        values = values / rescale
    array = values.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")
