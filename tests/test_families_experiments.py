"""Token ablation and attention blocking on every family beyond LLaVA-1.5 / LLaVA-Phi
(Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT, Gemma 3, PaliGemma), on tiny checkpoints built offline:

(a) ablating every image position (`layout.all_image_positions`) makes the logits
    independent of the image;
(b) blocking a position from every position that can attend to it under the model's REAL
    mask (bidirectional image blocks and sliding windows included), in eager and sdpa,
    leaves every other position untouched when it is perturbed;
(c) object cells land on the tokens covering the object in the model's view;
(d) one `collect ablation` and one `collect blocking` CLI run per family into DuckDB.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.families import real_attention_masks

FAMILIES = ("qwen2.5-vl", "qwen2-vl", "llava-next", "gemma3", "paligemma")
BIDIRECTIONAL_IMAGE_FAMILIES = ("gemma3", "paligemma")  # image tokens attend to later image tokens
IMPLEMENTATIONS = ("eager", "sdpa")


def _image(width=448, height=336, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _logits(loaded, inputs, pre_decoder_hook=None):
    handle = None
    if pre_decoder_hook is not None:
        handle = loaded.adapter.decoder.register_forward_pre_hook(pre_decoder_hook, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            return loaded.model(**inputs, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()


# -- (a) ablating every image position ---------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_ablating_every_image_position_makes_logits_image_independent(name, family_model):
    from collector.ablation.replacement import ablate_positions

    _, _, loaded = family_model(name, "sdpa")
    adapter = loaded.adapter
    # Same size, different content: the token layout (and Qwen's M-RoPE grid) is the same.
    inputs = [adapter.build_inputs(_image(seed=s), "Describe the image.") for s in (1, 2)]
    assert torch.equal(inputs[0]["input_ids"], inputs[1]["input_ids"])
    layout = adapter.image_token_layout(inputs[0]["input_ids"][0], inputs[0])
    everything = layout.all_image_positions.tolist()
    vector = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    plain = [_logits(loaded, x) for x in inputs]
    assert not torch.allclose(plain[0], plain[1], atol=1e-4)  # the image matters without ablation
    with ablate_positions(adapter, [everything], vector):
        ablated = [_logits(loaded, x) for x in inputs]
    torch.testing.assert_close(ablated[0], ablated[1], atol=1e-5, rtol=0)
    if layout.extra is not None:  # the grid alone is not every image token (LLaVA-NeXT)
        with ablate_positions(adapter, [layout.positions.tolist()], vector):
            grid_only = [_logits(loaded, x) for x in inputs]
        assert not torch.allclose(grid_only[0], grid_only[1], atol=1e-4)


# -- (b) blocking invariance under the real mask ----------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", FAMILIES)
def test_blocked_position_cannot_influence_any_other_position(name, implementation, family_model):
    """j = a middle image token. "Later" = every position that can attend to j in some layer
    under the model's own mask (for Gemma 3 that includes earlier image tokens: the image
    block is bidirectional; for PaliGemma every prefix position: image + prompt are one
    bidirectional block, and the VQA answer opening after it is causal). Blocking j from them in every layer, a perturbation of j's LM
    input changes no other position's logits; without the block it reaches them."""
    from collector.blocking.mechanism import AttentionBlock, block_attention

    _, _, loaded = family_model(name, implementation)
    assert loaded.model.config.get_text_config()._attn_implementation == implementation
    adapter = loaded.adapter
    inputs = adapter.build_inputs(_image(seed=3), "What is behind the television?")
    n = int(inputs["input_ids"].shape[1])
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    j = int(layout.positions[layout.n_tokens // 2 + 1])
    masks = real_attention_masks(loaded, inputs)
    sees_j = torch.stack([masks[layer][:, j] for layer in range(adapter.n_layers)]).any(0)
    sees_j[j] = False
    watchers = sees_j.nonzero().flatten().tolist()
    block = AttentionBlock.of([j], watchers, range(adapter.n_layers))

    def perturb(module, args, kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        embeds[:, j] += 3.0 * torch.randn(embeds.shape[-1], generator=torch.Generator().manual_seed(0))
        return args, {**kwargs, "inputs_embeds": embeds}

    with block_attention(adapter, [block]) as stats:
        blocked = _logits(loaded, inputs)
        blocked_perturbed = _logits(loaded, inputs, perturb)
    assert sum(stats.mask_kinds.values()) == 2 * adapter.n_layers
    others = [p for p in range(n) if p != j]
    torch.testing.assert_close(blocked_perturbed[0, others], blocked[0, others], atol=1e-6, rtol=0)
    assert (blocked_perturbed[0, j] - blocked[0, j]).abs().max() > 1e-3

    plain = _logits(loaded, inputs)
    plain_perturbed = _logits(loaded, inputs, perturb)
    change = (plain_perturbed[0] - plain[0]).abs().amax(-1)
    first_image = int(layout.all_image_positions[0])
    assert bool((change[:first_image] <= 1e-6).all())  # nothing before the image can see it
    assert bool(change[n - 1] > 1e-4)  # the last position does, without the block
    earlier_image = [p for p in range(first_image, j) if p in set(watchers)]
    if name in BIDIRECTIONAL_IMAGE_FAMILIES:  # bidirectional image block: earlier image tokens see j
        assert earlier_image and bool((change[earlier_image] > 1e-5).any())
    else:
        assert not earlier_image


# -- (c) object cells on the right tokens ------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_object_cells_land_on_the_tokens_covering_the_object(name, family_model):
    """A rectangle annotation in a non-square image: its cells from the adapter's view geometry
    equal the cells of the grid the painted rectangle covers in the model's own view."""
    from collector.targets import object_cells

    _, _, loaded = family_model(name, "sdpa")
    adapter = loaded.adapter
    width, height = 500, 300
    x0, y0, x1, y1 = 300, 60, 420, 210
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[y0:y1, x0:x1] = 255
    inputs = adapter.build_inputs(Image.fromarray(array), "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    polygon = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    cells = object_cells(polygon, adapter, width, height, layout.grid_rows, layout.grid_cols)
    view = np.asarray(adapter.view_image(adapter.view_pixels(inputs)).convert("L"), dtype=np.int32)
    vh, vw = view.shape
    bright = np.zeros((layout.grid_rows, layout.grid_cols), dtype=bool)
    for r in range(layout.grid_rows):
        for c in range(layout.grid_cols):
            patch = view[
                r * vh // layout.grid_rows : (r + 1) * vh // layout.grid_rows,
                c * vw // layout.grid_cols : (c + 1) * vw // layout.grid_cols,
            ]
            bright[r, c] = patch.max() > 127
    assert cells.any()
    assert np.array_equal(cells, bright)


# -- (d) the CLI, end to end -------------------------------------------------------------------


@pytest.mark.slow  # every family through both CLIs: minutes on 2 cores
@pytest.mark.parametrize("name", FAMILIES)
def test_collect_ablation_and_blocking_cli_end_to_end(name, family_model, family_checkpoint, demo_images, tmp_path):
    from click.testing import CliRunner

    from collector.cli import cli
    from db.store import ResultsDB

    path = family_checkpoint(name)
    image_dir, annotation_file = demo_images
    db_path = tmp_path / "r.duckdb"
    common = [
        "--model",
        str(path),
        "--images",
        str(image_dir),
        "--annotations",
        str(annotation_file),
        "--db",
        str(db_path),
        "--no-curate",
        "--object-area",
        "1000:40000",
        "--device",
        "cpu",
        "--quiet",
    ]
    ablation = [
        "collect",
        "ablation",
        *common,
        "--limit",
        "1",
        "--k",
        "3",
        "--ig-steps",
        "2",
        "--max-new-tokens",
        "2",
        "--settings",
        "polling,generative",
    ]
    result = CliRunner().invoke(cli, ablation)
    assert result.exit_code == 0, result.output
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({str(i): ["What is the shape?"] for i in range(1, 10)}))
    blocking = ["collect", "blocking", *common, "--limit", "1", "--questions", str(questions), "--window", "2"]
    result = CliRunner().invoke(cli, blocking)
    assert result.exit_code == 0, result.output
    _, _, loaded = family_model(name, "sdpa")
    with ResultsDB(db_path, read_only=True) as db:
        runs = {r["experiment"]: r for r in db.runs()}
        assert set(runs) == {"ablation", "blocking"}
        for run in runs.values():
            assert run["config"]["family"] == name and run["status"] == "complete"
        rows = db.sql("SELECT image_id, condition, setting, n_ablated, positions FROM ablations")
        assert {r[2] for r in rows} == {"polling", "generative"}
        conditions = {r[1] for r in rows}
        assert {"none", "object_0", "object_1", "random_3", "gradient_3", "image_noise"} <= conditions
        image_id = rows[0][0]
        image_positions = {
            p
            for (p,) in db.sql(
                f"SELECT position FROM positions WHERE image_id = {image_id} AND kind = 'image' "
                f"AND run_id = '{runs['ablation']['run_id']}'"
            )
        }
        assert image_positions and all(set(r[4]) <= image_positions for r in rows)
        assert all(r[3] == 3 for r in rows if r[1] in ("random_3", "gradient_3"))
        blocking_rows = db.sql("SELECT source, target, layer_start, layer_end, source_positions FROM blocking")
        assert {r[0] for r in blocking_rows} >= {"none", "object_0", "image_minus_object_1", "image_minus_last_row"}
        assert max(r[3] for r in blocking_rows if r[3] is not None) == loaded.adapter.n_layers - 1
        views = db.sql("SELECT run_id, view_width, view_height FROM image_views")
        assert len(views) == 2 and len({(w, h) for _, w, h in views}) == 1


@pytest.mark.parametrize("name", FAMILIES)
def test_view_pixels_round_trip_and_batched_rows(name, family_model):
    """with_view_pixels inverts view_pixels; repeat_inputs rows equal single forwards, a row
    with a noised view equals the forward on that view put back into pixel_values (how
    the image_noise condition reaches Qwen's patches and LLaVA-NeXT's base tile)."""
    from collector.ablation.token_sets import noised_pixel_values

    _, _, loaded = family_model(name, "sdpa")
    adapter = loaded.adapter
    inputs = adapter.build_inputs(_image(seed=4), "Describe the image.")
    view = adapter.view_pixels(inputs)
    assert view.dim() == 3 and view.shape[0] == 3
    assert torch.equal(adapter.with_view_pixels(inputs, view), inputs["pixel_values"])
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    cells = np.zeros((layout.grid_rows, layout.grid_cols), dtype=bool)
    cells[1, 2] = True
    noised = noised_pixel_values(view, cells, 1.0, 0, 1)
    noised_inputs = {**inputs, "pixel_values": adapter.with_view_pixels(inputs, noised)}
    assert torch.equal(adapter.view_pixels(noised_inputs), noised)
    batch = adapter.repeat_inputs(inputs, [None, noised])
    rows = _logits(loaded, batch)
    torch.testing.assert_close(rows[0:1], _logits(loaded, inputs), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(rows[1:2], _logits(loaded, noised_inputs), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(rows[0], rows[1], atol=1e-4)
