"""Checks every family's test module runs on its tiny checkpoint, written once.

Each `tests/test_family_<name>.py` calls these with what its family expects (which norm,
whether its model class softcaps the logits) and adds its own checks (span, grid, view).
References are independent of the adapters: the model's own forward, the norm and
softcapping restated from their definitions, the real processor's outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image


def random_image(width: int = 500, height: int = 375, seed: int = 0) -> Image.Image:
    """Uniform random RGB noise, (height, width, 3)."""
    generator = torch.Generator().manual_seed(seed)
    array = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
    return Image.fromarray(array)


def forward(loaded, inputs):
    """The model's own forward with every hidden state, no cache."""
    with torch.no_grad():
        return loaded.model(**inputs, output_hidden_states=True, use_cache=False)


def identity_layers(layers) -> list:
    """Make every layer in `layers` return its input, so each vision token depends only on
    its own patches (patch embedding, pooling and projector act per patch / per group).
    Returns the hook handles; remove them when done."""

    def passthrough(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    # prepend=True: transformers' own output-recording hooks must see the replaced output.
    return [layer.register_forward_hook(passthrough, with_kwargs=True, prepend=True) for layer in layers]


def moved_positions(loaded, inputs, changed_inputs, vision_layers) -> list[int]:
    """LM input positions whose embedding (hidden state 0) differs between two inputs, with
    the vision layers `vision_layers` made identities."""
    handles = identity_layers(vision_layers)
    try:
        base = forward(loaded, inputs).hidden_states[0][0]
        changed = forward(loaded, changed_inputs).hidden_states[0][0]
    finally:
        for handle in handles:
            handle.remove()
    return ((changed - base).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()


def real_attention_masks(loaded, inputs) -> dict[int, torch.Tensor]:
    """layer -> (T, T) bool, True where query t attends to key s, as the model's own attention
    modules receive it in a plain forward of one sequence (a None mask under sdpa is causal)."""
    adapter = loaded.adapter
    seen: dict[int, torch.Tensor | None] = {}
    handles = []
    for layer in range(adapter.n_layers):

        def hook(module, args, kwargs, layer=layer):
            seen[layer] = kwargs.get("attention_mask")

        handles.append(adapter.attention_module(layer).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            loaded.model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    n = int(inputs["input_ids"].shape[1])
    masks = {}
    for layer, mask in seen.items():
        if mask is None:
            masks[layer] = torch.ones(n, n, dtype=torch.bool).tril()
        elif mask.dtype == torch.bool:
            masks[layer] = mask[0, 0].clone()
        else:
            masks[layer] = mask[0, 0] > torch.finfo(mask.dtype).min / 2
    return masks


# -- language-model parts and the lens ---------------------------------------------------------


def check_language_model_parts(name: str, loaded, softcapped: bool) -> None:
    """The adapter's LM parts are the model's own modules; `softcapped`: the model class
    applies final_logit_softcapping, so the unembedding is lm_head followed by the cap."""
    adapter, model = loaded.adapter, loaded.model
    assert adapter.family == name
    assert adapter.decoder is model.model.language_model
    assert adapter.decoder_layers is model.model.language_model.layers
    assert adapter.final_norm is model.model.language_model.norm
    if softcapped:
        from collector.adapters.gemma3 import SoftcappedUnembedding

        assert isinstance(adapter.unembedding, SoftcappedUnembedding)
        assert adapter.unembedding.lm_head is model.lm_head
        assert adapter.unembedding.cap == model.config.text_config.final_logit_softcapping
    else:
        assert adapter.unembedding is model.lm_head
    assert adapter.n_layers == model.config.text_config.num_hidden_layers
    assert adapter.attention_module(1) is model.model.language_model.layers[1].self_attn


def check_last_layer_lens_equals_model_logits(loaded) -> None:
    from collector.lens import LogitLens

    outputs = forward(loaded, loaded.adapter.build_inputs(random_image(), "Describe the image."))
    lens = LogitLens(loaded.adapter)
    last = len(outputs.hidden_states) - 1
    assert torch.equal(lens.layer_logits(outputs.hidden_states, last), outputs.logits)
    readout = lens.top_k(outputs.hidden_states, k=4)
    expected = torch.topk(torch.softmax(outputs.logits[0].float(), -1), 4, dim=-1)
    assert torch.equal(readout.token_ids[-1], expected.indices)
    assert torch.equal(readout.probs[-1], expected.values)


def rms_norm(weight: torch.Tensor, eps: float, hidden: torch.Tensor) -> torch.Tensor:
    """Llama / Qwen2 / Mistral RMSNorm restated: weight * x_hat."""
    x = hidden.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.detach().float()


def gemma_rms_norm(weight: torch.Tensor, eps: float, hidden: torch.Tensor) -> torch.Tensor:
    """Gemma RMSNorm restated: (1 + weight) * x_hat."""
    x = hidden.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.detach().float())


def check_every_layer_equals_independent_recomputation(
    loaded, reference_norm: Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor], softcapped: bool
) -> None:
    """Every layer's lens logits equal the family's final norm (`reference_norm`, restated
    from its definition, not the module's forward) then lm_head, then the softcap where the
    model class applies it (`softcapped`); the last entry is already normed."""
    from collector.lens import LogitLens

    model = loaded.model
    norm_weight = model.model.language_model.norm.weight.detach()
    assert (norm_weight - norm_weight.mean()).abs().max() > 0.05, "norm weights must be randomised"
    outputs = forward(loaded, loaded.adapter.build_inputs(random_image(), "Describe the image."))
    hidden_states = outputs.hidden_states
    assert len(hidden_states) == model.config.text_config.num_hidden_layers + 1
    lens = LogitLens(loaded.adapter)
    readout = lens.top_k(hidden_states, k=3)
    eps = model.config.text_config.rms_norm_eps
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    for layer, hidden in enumerate(hidden_states):
        last = layer == len(hidden_states) - 1
        normed = hidden[0].float() if last else reference_norm(norm_weight, eps, hidden[0])
        logits = normed @ model.lm_head.weight.detach().float().T
        if cap is not None and softcapped:
            logits = cap * torch.tanh(logits / cap)
        torch.testing.assert_close(lens.layer_logits(hidden_states, layer)[0].float(), logits, atol=1e-4, rtol=1e-4)
        expected = torch.topk(torch.softmax(logits, -1), 3, dim=-1)
        torch.testing.assert_close(readout.probs[layer], expected.values, atol=1e-5, rtol=1e-4)
        distinct = (expected.values[:, :-1] - expected.values[:, 1:]).abs().min(-1).values > 1e-5
        assert torch.equal(readout.token_ids[layer][distinct], expected.indices[distinct])
    # A lens that skipped the norm, or normed the last entry twice, would differ.
    unembed = loaded.adapter.unembedding
    middle = lens.layer_logits(hidden_states, 1)
    assert not torch.allclose(middle, unembed(hidden_states[1]), atol=1e-3)
    twice = unembed(model.model.language_model.norm(hidden_states[-1]))
    assert not torch.allclose(lens.layer_logits(hidden_states, len(hidden_states) - 1), twice, atol=1e-3)


# -- the CLI, end to end --------------------------------------------------------------------------


def check_collect_lens_cli(name: str, path: Path, loaded, image_dir: Path, db_path: Path) -> list[dict[str, Any]]:
    """`collect lens` on two images into DuckDB: the run's family, the grid, every position
    and every (layer, position) top-2 are there. Returns per image its run_images marker,
    image_views size and extra_views rows, for the family's own checks."""
    from click.testing import CliRunner

    from collector.cli import cli
    from db.store import ResultsDB

    args = [
        "collect",
        "lens",
        "--model",
        str(path),
        "--images",
        str(image_dir),
        "--db",
        str(db_path),
        "--limit",
        "2",
        "--top-k",
        "2",
        "--device",
        "cpu",
        "--quiet",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    n_layers = loaded.model.config.text_config.num_hidden_layers + 1
    images = []
    with ResultsDB(db_path, read_only=True) as db:
        assert db.runs()[0]["config"]["family"] == name
        run_id = db.runs()[0]["run_id"]
        markers = db.sql("SELECT image_id, n_positions, n_layers, grid_rows, grid_cols FROM run_images ORDER BY 1")
        assert len(markers) == 2
        for image_id, n_positions, layers, rows, cols in markers:
            assert layers == n_layers
            grid = db.sql(
                f"SELECT count(*), max(patch_row), max(patch_col) FROM positions WHERE image_id = {image_id} AND kind = 'image'"
            )[0]
            assert grid == (rows * cols, rows - 1, cols - 1)
            assert db.sql(f"SELECT count(*) FROM positions WHERE image_id = {image_id}")[0][0] == n_positions
            cells = db.sql(f"SELECT count(*), count(DISTINCT layer) FROM logit_lens WHERE image_id = {image_id}")[0]
            assert cells == (n_layers * n_positions * 2, n_layers)
            width, height = db.sql(f"SELECT view_width, view_height FROM image_views WHERE image_id = {image_id}")[0]
            extra = db.sql(
                "SELECT name, kind, view_width, view_height, grid_rows, grid_cols, png FROM extra_views "
                f"WHERE image_id = {image_id}"
            )
            images.append(
                dict(run_id=run_id, image_id=image_id, rows=rows, cols=cols, width=width, height=height, extra=extra)
            )
    return images
