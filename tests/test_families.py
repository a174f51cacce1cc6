"""More VLM families on tiny checkpoints built offline: adapter parts, the logit lens
against the model's logits and an independent recomputation, the image span and grid
against independent derivations, and one `collect lens` CLI run each into DuckDB."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image


QWEN_FAMILIES = ("qwen2.5-vl", "qwen2-vl")
FAMILIES = QWEN_FAMILIES + ("llava-next", "gemma3", "paligemma")
SOFTCAPPING_FAMILIES: tuple[str, ...] = ("paligemma",)  # whose model class applies final_logit_softcapping
GEMMA_NORM_FAMILIES = ("gemma3", "paligemma")  # (1 + weight) RMSNorm


@pytest.fixture(scope="session")
def _family_cache(family_checkpoint):
    return {"checkpoint": family_checkpoint, "paths": {}, "loaded": {}}


def _get(cache, name):
    """(name, checkpoint folder, LoadedModel through load_model) for one family, built once."""
    from collector.loading import load_model

    if name not in cache["paths"]:
        cache["paths"][name] = cache["checkpoint"](name)
        cache["loaded"][name] = load_model(str(cache["paths"][name]), device="cpu", dtype="float32")
    return name, cache["paths"][name], cache["loaded"][name]


@pytest.fixture(params=FAMILIES)
def family(request, _family_cache):
    return _get(_family_cache, request.param)


@pytest.fixture(params=("llava-next",))
def llava_next(request, _family_cache):
    return _get(_family_cache, request.param)


@pytest.fixture(params=("gemma3",))
def gemma3(request, _family_cache):
    return _get(_family_cache, request.param)


@pytest.fixture(params=("paligemma",))
def paligemma(request, _family_cache):
    return _get(_family_cache, request.param)


@pytest.fixture(params=QWEN_FAMILIES)
def qwen(request, _family_cache):
    return _get(_family_cache, request.param)


def _image(width=500, height=375, seed=0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    array = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
    return Image.fromarray(array)


def _forward(loaded, inputs):
    with torch.no_grad():
        return loaded.model(**inputs, output_hidden_states=True, use_cache=False)


# -- parts and lens ----------------------------------------------------------------------


def test_parts_are_the_models_own_modules(family):
    name, _, loaded = family
    adapter, model = loaded.adapter, loaded.model
    assert adapter.family == name
    assert adapter.decoder is model.model.language_model
    assert adapter.decoder_layers is model.model.language_model.layers
    assert adapter.final_norm is model.model.language_model.norm
    # Gemma 3's tiny config sets final_logit_softcapping, but Gemma3ForConditionalGeneration
    # does not apply it: the lens must not either (test_gemma3_softcapping...). PaliGemma's
    # forward does: its unembedding is lm_head followed by the cap.
    if name in SOFTCAPPING_FAMILIES:
        from collector.adapters.gemma3 import SoftcappedUnembedding

        assert isinstance(adapter.unembedding, SoftcappedUnembedding)
        assert adapter.unembedding.lm_head is model.lm_head
        assert adapter.unembedding.cap == model.config.text_config.final_logit_softcapping
    else:
        assert adapter.unembedding is model.lm_head
    assert adapter.n_layers == model.config.text_config.num_hidden_layers
    assert adapter.attention_module(1) is model.model.language_model.layers[1].self_attn
    if name in QWEN_FAMILIES:
        assert adapter.vision_tower is model.model.visual
        assert adapter.projector is model.model.visual.merger
        # the real config's tied embeddings survive save/load
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    else:
        assert adapter.vision_tower is model.model.vision_tower
        assert adapter.projector is model.model.multi_modal_projector


def test_last_layer_lens_equals_model_logits(family):
    from collector.lens import LogitLens

    _, _, loaded = family
    outputs = _forward(loaded, loaded.adapter.build_inputs(_image(), "Describe the image."))
    lens = LogitLens(loaded.adapter)
    last = len(outputs.hidden_states) - 1
    assert torch.equal(lens.layer_logits(outputs.hidden_states, last), outputs.logits)
    readout = lens.top_k(outputs.hidden_states, k=4)
    expected = torch.topk(torch.softmax(outputs.logits[0].float(), -1), 4, dim=-1)
    assert torch.equal(readout.token_ids[-1], expected.indices)
    assert torch.equal(readout.probs[-1], expected.values)


def _reference_final_norm(name: str, model, hidden: torch.Tensor) -> torch.Tensor:
    """The family's final norm, restated from its definition (not the module's forward)."""
    norm = model.model.language_model.norm
    eps = model.config.text_config.rms_norm_eps
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if name in GEMMA_NORM_FAMILIES:
        return x * (1.0 + norm.weight.detach().float())  # Gemma RMSNorm: (1 + weight) * x_hat
    return x * norm.weight.detach().float()  # Qwen2 / Mistral RMSNorm: weight * x_hat


def _reference_logits(name: str, model, normed: torch.Tensor) -> torch.Tensor:
    """normed @ W^T, then the final logit softcapping where the family's model applies it
    (PaliGemma; not Gemma3ForConditionalGeneration, whatever its config says)."""
    logits = normed @ model.lm_head.weight.detach().float().T
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is not None and name in SOFTCAPPING_FAMILIES:
        logits = cap * torch.tanh(logits / cap)
    return logits


def test_every_layer_equals_independent_recomputation(family):
    from collector.lens import LogitLens

    name, _, loaded = family
    model = loaded.model
    norm_weight = model.model.language_model.norm.weight.detach()
    assert (norm_weight - norm_weight.mean()).abs().max() > 0.05, "norm weights must be randomised"
    outputs = _forward(loaded, loaded.adapter.build_inputs(_image(), "Describe the image."))
    hidden_states = outputs.hidden_states
    assert len(hidden_states) == model.config.text_config.num_hidden_layers + 1
    lens = LogitLens(loaded.adapter)
    readout = lens.top_k(hidden_states, k=3)
    for layer, hidden in enumerate(hidden_states):
        last = layer == len(hidden_states) - 1
        normed = hidden[0].float() if last else _reference_final_norm(name, model, hidden[0])
        logits = _reference_logits(name, model, normed)
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


# -- Qwen2-VL / 2.5-VL: processor, span, grid, M-RoPE, view ----------------------------------


def _real_qwen_processor(loaded):
    """The real `Qwen2VLProcessor` / `Qwen2_5_VLProcessor.__call__`, on the checkpoint's image
    processor and tokenizer. Its constructor needs torchvision for the video processor, so
    the instance is made without __init__; only the attributes __init__ sets are given."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    cls = Qwen2_5_VLProcessor if loaded.model.config.model_type == "qwen2_5_vl" else Qwen2VLProcessor
    processor = cls.__new__(cls)
    tokenizer = loaded.processor.tokenizer
    processor.image_processor = loaded.processor.image_processor
    processor.tokenizer = tokenizer
    processor.video_processor = None
    processor.chat_template = None
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    processor.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return processor


@pytest.mark.parametrize("size", [(500, 375), (300, 620)])
def test_qwen_inputs_equal_the_real_processor(qwen, size):
    _, _, loaded = qwen
    adapter = loaded.adapter
    from collector.adapters.qwen2_vl import QwenImageTextProcessor

    assert isinstance(loaded.processor, QwenImageTextProcessor)  # no torchvision here
    image = _image(*size)
    ours = adapter.build_inputs(image, "What is it?")
    real = _real_qwen_processor(loaded)(images=image, text=adapter.format_prompt("What is it?"), return_tensors="pt")
    assert set(ours) == set(real)
    for key in real:
        assert torch.equal(ours[key], real[key]), key


def _independent_mrope_positions(input_ids: torch.Tensor, start: int, rows: int, cols: int) -> torch.Tensor:
    """M-RoPE ids (3, 1, T) from the Qwen2-VL paper's rule: text tokens count up on all three
    axes; the image's tokens get (s, s + row, s + col) with s the next text position; text
    after the image continues from s + max(rows, cols)."""
    n = input_ids.numel()
    pos = torch.zeros(3, n, dtype=torch.long)
    pos[:, :start] = torch.arange(start)
    cell = torch.arange(rows * cols)
    pos[0, start : start + rows * cols] = start
    pos[1, start : start + rows * cols] = start + cell // cols
    pos[2, start : start + rows * cols] = start + cell % cols
    after = start + rows * cols
    pos[:, after:] = start + max(rows, cols) + torch.arange(n - after)
    return pos[:, None, :]


def test_qwen_forward_uses_mrope_positions(qwen):
    """The project's forward (build_inputs -> model) equals the forward with independently
    derived M-RoPE position ids and the real processor's forward; without mm_token_type_ids
    the model silently runs with 1-D positions and differs."""
    _, _, loaded = qwen
    adapter = loaded.adapter
    image = _image(420, 252)
    inputs = adapter.build_inputs(image, "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    assert layout.grid_rows != layout.grid_cols  # a non-square grid makes row/col mix-ups visible
    ours = _forward(loaded, inputs).logits
    positions = _independent_mrope_positions(
        inputs["input_ids"][0], int(layout.positions[0]), layout.grid_rows, layout.grid_cols
    )
    explicit = _forward(loaded, {**inputs, "position_ids": positions}).logits
    assert torch.equal(ours, explicit)
    real = _real_qwen_processor(loaded)(images=image, text=adapter.format_prompt("Describe the image."), return_tensors="pt")
    assert torch.equal(_forward(loaded, dict(real)).logits, ours)
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    if loaded.model.config.model_type == "qwen2_vl":
        with pytest.raises(ValueError, match="mm_token_type_ids"):  # Qwen2-VL refuses
            _forward(loaded, without)
    else:  # Qwen2.5-VL silently falls back to 1-D positions
        assert not torch.allclose(_forward(loaded, without).logits, ours, atol=1e-4)


@pytest.mark.parametrize("size", [(500, 375), (300, 620), (64, 900)])
def test_qwen_image_span_and_grid_from_processor_outputs(qwen, size):
    _, _, loaded = qwen
    adapter = loaded.adapter
    tokenizer = adapter.tokenizer
    question = "Is there a cat in this image?"
    image = _image(*size)
    inputs = adapter.build_inputs(image, question)
    input_ids = inputs["input_ids"][0]
    layout = adapter.image_token_layout(input_ids, inputs)
    # Independent derivation from the image processor alone.
    t, h, w = loaded.processor.image_processor(images=image, return_tensors="pt")["image_grid_thw"][0].tolist()
    assert t == 1 and layout.n_tokens == t * h * w // 4
    assert (layout.grid_rows, layout.grid_cols) == (h // 2, w // 2)
    unexpanded = tokenizer(adapter.format_prompt(question))["input_ids"]
    start = unexpanded.index(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    assert unexpanded[start - 1] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert unexpanded[start + 1] == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    n = layout.n_tokens
    assert layout.positions.tolist() == list(range(start, start + n))
    assert input_ids[:start].tolist() == unexpanded[:start]
    assert input_ids[start + n :].tolist() == unexpanded[start + 1 :]
    assert layout.position_of(0, 0) == start
    assert layout.position_of(0, layout.grid_cols - 1) == start + layout.grid_cols - 1
    assert layout.position_of(1, 0) == start + layout.grid_cols
    assert layout.position_of(layout.grid_rows - 1, layout.grid_cols - 1) == start + n - 1
    with pytest.raises(IndexError):
        layout.position_of(layout.grid_rows, 0)
    # Without inputs, the grid of the latest build_inputs for these ids is used.
    assert adapter.image_token_layout(input_ids).positions.tolist() == layout.positions.tolist()
    # The view matches the geometry the site uses.
    from collector.geometry import view_geometry_from_processor

    view = adapter.view_image(adapter.view_pixels(inputs))
    geometry = view_geometry_from_processor(loaded.processor.image_processor, *size)
    assert view.size == (geometry.view_width, geometry.view_height) == (w * 14, h * 14)


def _identity_vision_blocks(vision_tower) -> list:
    """Every vision block returns its input: each merged token then depends only on its own
    2x2 patches (patch embedding and merger act per patch / per merge group)."""

    def passthrough(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    # prepend=True: transformers' own output-recording hooks must see the replaced output.
    return [b.register_forward_hook(passthrough, with_kwargs=True, prepend=True) for b in vision_tower.blocks]


@pytest.mark.parametrize("cell", [(0, 0), (0, 8), (3, 5), (6, 0), (6, 8)])
def test_qwen_merge_order_by_perturbing_one_merged_patch(qwen, cell):
    """A 252x196 image needs no resize (multiples of 28): a 9x7 merged grid. Repaint the
    28x28 pixels of one cell; exactly the LM position the adapter maps it to must change."""
    _, _, loaded = qwen
    adapter = loaded.adapter
    base_image = _image(252, 196, seed=5)
    row, col = cell
    array = torch.tensor(__import__("numpy").asarray(base_image)).clone()
    array[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28] = torch.tensor([250, 10, 90], dtype=torch.uint8)
    perturbed = Image.fromarray(array.numpy())
    inputs = adapter.build_inputs(base_image, "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    assert (layout.grid_rows, layout.grid_cols) == (7, 9)
    inputs_p = adapter.build_inputs(perturbed, "Describe the image.")
    handles = _identity_vision_blocks(adapter.vision_tower)
    try:
        base = _forward(loaded, inputs).hidden_states[0][0]
        changed = _forward(loaded, inputs_p).hidden_states[0][0]
    finally:
        for handle in handles:
            handle.remove()
    moved = ((changed - base).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
    assert moved == [layout.position_of(row, col)]


def test_qwen_view_image_inverts_the_processor(qwen):
    _, _, loaded = qwen
    adapter = loaded.adapter
    original = _image(252, 196, seed=6)
    inputs = adapter.build_inputs(original, "x")
    view = adapter.view_image(adapter.view_pixels(inputs))
    assert view.size == (252, 196)
    difference = torch.tensor(list(view.getdata())) - torch.tensor(list(original.getdata()))
    assert difference.abs().max() <= 1


# -- end to end: the CLI into DuckDB ---------------------------------------------------------


def test_collect_lens_cli_end_to_end(family, demo_images, tmp_path):
    from click.testing import CliRunner

    from collector.cli import cli
    from db.store import ResultsDB

    name, path, loaded = family
    image_dir, _ = demo_images
    db_path = tmp_path / "r.duckdb"
    args = ["collect", "lens", "--model", str(path), "--images", str(image_dir), "--db", str(db_path),
            "--limit", "2", "--top-k", "2", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    n_layers = loaded.model.config.text_config.num_hidden_layers + 1
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
            if name != "llava-next":
                assert extra == []
            if name in QWEN_FAMILIES:  # one merged cell = 28x28 view pixels
                assert (width, height) == (cols * 28, rows * 28)
            if name == "gemma3":  # 896x896 view, 16x16 pooled grid
                assert (width, height, rows, cols) == (896, 896, 16, 16)
            if name == "paligemma":  # 224x224 view, 16x16 patch grid, image tokens first
                assert (width, height, rows, cols) == (224, 224, 16, 16)
                first = db.sql(f"SELECT min(position) FROM positions WHERE image_id = {image_id} AND kind = 'image'")
                assert first[0][0] == 0
            if name == "llava-next":  # base view 336x336 on a 24x24 grid; tiles + newlines after it
                assert (width, height, rows, cols) == (336, 336, 24, 24)
                kinds = dict(db.sql(f"SELECT kind, count(*) FROM positions WHERE image_id = {image_id} GROUP BY 1"))
                n_newline = kinds["image_newline"]
                assert kinds["image_hr"] % n_newline == 0
                hr = db.sql(
                    f"SELECT max(patch_row) + 1, max(patch_col) + 1, count(patch_col) FROM positions "
                    f"WHERE image_id = {image_id} AND kind LIKE 'image_%'"
                )[0]
                assert hr == (n_newline, kinds["image_hr"] // n_newline, kinds["image_hr"])
                # The high-resolution view: one cell per image_hr position, 14x14 px each.
                ((view_name, view_kind, hr_width, hr_height, hr_rows, hr_cols, png),) = extra
                assert (view_name, view_kind) == ("high_res", "image_hr")
                assert (hr_width, hr_height) == (hr_cols * 14, hr_rows * 14)
                assert Image.open(io.BytesIO(bytes(png))).size == (hr_width, hr_height)
                assert (hr_rows, hr_cols) == (n_newline, kinds["image_hr"] // n_newline)
    if name == "llava-next":  # the site renders both views; every image_hr position is one HR cell
        import json

        from report.build import build_site, run_dir_name

        build_site(db_path, tmp_path / "site", downloads=False)
        folder = tmp_path / "site" / "lens" / run_dir_name(run_id)
        for image_id, *_ in markers:
            text = (folder / f"{image_id}.data.js").read_text(encoding="utf-8").strip()
            data = json.loads(text.removeprefix("window.LENS_DATA = ").removesuffix(";"))
            (view,) = data["extra_views"]
            pos = data["positions"]
            cells = [(r, c) for k, r, c in zip(pos["kind"], pos["patch_row"], pos["patch_col"]) if k == "image_hr"]
            assert sorted(cells) == [(r, c) for r in range(view["grid_rows"]) for c in range(view["grid_cols"])]
            assert 'id="extra-grid-0"' in (folder / f"{image_id}.html").read_text(encoding="utf-8")


# -- LLaVA-NeXT: anyres tiles, base grid, HR grid, newlines ----------------------------------


@pytest.mark.parametrize("size", [(500, 375), (300, 620), (336, 336), (1000, 300)])
def test_llava_next_token_count_and_layout(llava_next, size):
    _, _, loaded = llava_next
    adapter = loaded.adapter
    inputs = adapter.build_inputs(_image(*size), "What is it?")
    input_ids = inputs["input_ids"][0]
    layout = adapter.image_token_layout(input_ids, inputs)
    image_positions = torch.nonzero(input_ids == adapter.image_token_id).flatten()
    # The real processor's own count for this image size (it drops the CLS token for the
    # 'default' feature-select strategy).
    expected = loaded.processor._get_number_of_features(size[1], size[0], 336, 336) - 1
    assert image_positions.numel() == expected == layout.n_tokens + layout.extra.positions.numel()
    assert layout.all_image_positions.tolist() == image_positions.tolist()
    assert (layout.grid_rows, layout.grid_cols, layout.n_tokens) == (24, 24, 576)
    assert layout.positions.tolist() == image_positions[:576].tolist()
    kinds = list(layout.extra.kinds)
    n_rows = kinds.count("image_newline")
    cols = kinds.count("image_hr") // n_rows
    assert kinds.count("image_hr") == n_rows * cols
    newline_offsets = [k for k, kind in enumerate(kinds) if kind == "image_newline"]
    assert newline_offsets == [r * (cols + 1) + cols for r in range(n_rows)]
    assert layout.extra.labels[0] == "<HR 0,0>" and layout.extra.labels[cols] == "<NL 0>"
    assert adapter.image_token_layout(input_ids).extra.labels == layout.extra.labels  # cached size


def _identity_clip_layers(vision_tower) -> list:
    def passthrough(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    return [
        layer.register_forward_hook(passthrough, with_kwargs=True, prepend=True)
        for layer in vision_tower.encoder.layers
    ]


def test_llava_next_every_token_by_perturbing_tile_patches(llava_next):
    """A 500x375 image: best resolution 672x672 (2x2 tiles), the image resized to 672x504
    and padded by 84 px top and bottom, i.e. 6 patch rows of padding in the 48x48 stitched
    grid, leaving 36 rows. With identity CLIP layers, repainting one 14x14 patch of one
    tile must move exactly the LM position the layout gives that patch, and nothing for a
    patch that only covers padding. Newline positions hold the model's image_newline."""
    _, _, loaded = llava_next
    adapter = loaded.adapter
    inputs = adapter.build_inputs(_image(500, 375, seed=7), "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    labels = dict(zip(layout.extra.labels, layout.extra.positions.tolist()))
    assert layout.extra.kinds.count("image_newline") == 36 and "<HR 35,47>" in labels and "<HR 36,0>" not in labels
    # (tile, patch row, patch col) -> expected moved position; tiles 1..4 are row-major 2x2.
    cases = {
        (0, 0, 0): layout.position_of(0, 0),  # tile 0 is the base view
        (0, 23, 5): layout.position_of(23, 5),
        (1, 6, 0): labels["<HR 0,0>"],  # stitched row 6 is the first kept row
        (2, 10, 23): labels["<HR 4,47>"],  # top-right tile: stitched (10, 47)
        (3, 0, 3): labels["<HR 18,3>"],  # bottom-left tile: stitched (24, 3)
        (4, 17, 23): labels["<HR 35,47>"],  # stitched (41, 47): the last kept cell
        (1, 2, 9): None,  # stitched row 2: padding, removed by unpad
        (4, 20, 0): None,  # stitched row 44: padding
    }
    handles = _identity_clip_layers(adapter.vision_tower)
    try:
        base = _forward(loaded, inputs).hidden_states[0][0]
        newline = adapter.image_newline.detach()
        nl_positions = [p for p, k in zip(layout.extra.positions.tolist(), layout.extra.kinds) if k == "image_newline"]
        assert torch.equal(base[nl_positions], newline.expand(len(nl_positions), -1))
        for (tile, row, col), expected in cases.items():
            pixels = inputs["pixel_values"].clone()
            pixels[0, tile, :, row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14] += 1.5
            changed = _forward(loaded, {**inputs, "pixel_values": pixels}).hidden_states[0][0]
            moved = ((changed - base).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
            assert moved == ([] if expected is None else [expected]), (tile, row, col)
    finally:
        for handle in handles:
            handle.remove()


# -- Gemma 3: span, pooled grid, bidirectional image attention, softcapping, norms -----------


def test_gemma3_inputs_span_and_grid(gemma3):
    from transformers import Gemma3Processor

    _, _, loaded = gemma3
    adapter = loaded.adapter
    assert isinstance(loaded.processor, Gemma3Processor)  # the real processor, no torchvision needed
    tokenizer = adapter.tokenizer
    question = "Is there a cat in this image?"
    image = _image(500, 375)
    inputs = adapter.build_inputs(image, question)
    real = loaded.processor(images=image, text=adapter.format_prompt(question), return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}
    for key in inputs:
        assert torch.equal(inputs[key], real[key]), key
    input_ids = inputs["input_ids"][0]
    layout = adapter.image_token_layout(input_ids, inputs)
    assert (layout.grid_rows, layout.grid_cols, layout.n_tokens) == (16, 16, 256)
    # Independent derivation: the tokenized template with <start_of_image> expanded to
    # "\n\n<start_of_image>" + 256 x <image_soft_token> + "<end_of_image>\n\n".
    image_id = tokenizer.convert_tokens_to_ids("<image_soft_token>")
    boi, eoi = (tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>"))
    expected_text = adapter.format_prompt(question).replace(
        "<start_of_image>", "\n\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\n\n"
    )
    assert input_ids.tolist() == tokenizer(expected_text)["input_ids"]
    assert input_ids[0] == tokenizer.bos_token_id
    start = input_ids.tolist().index(image_id)
    assert input_ids[start - 1] == boi and input_ids[start + 256] == eoi
    assert layout.positions.tolist() == list(range(start, start + 256))
    assert layout.position_of(1, 0) == start + 16 and layout.position_of(15, 15) == start + 255
    assert torch.equal(inputs["token_type_ids"][0], (input_ids == image_id).long())
    # The view: the whole image resized to 896x896 (no crop, no pad), as the geometry says.
    from collector.geometry import view_geometry_from_processor

    view = adapter.view_image(adapter.view_pixels(inputs))
    geometry = view_geometry_from_processor(loaded.processor.image_processor, 500, 375)
    assert view.size == (geometry.view_width, geometry.view_height) == (896, 896)
    assert (geometry.offset_x, geometry.offset_y) == (0.0, 0.0)
    expected_view = image.resize((896, 896), Image.BILINEAR)
    difference = torch.tensor(list(view.getdata())) - torch.tensor(list(expected_view.getdata()))
    assert difference.abs().max() <= 1


def _identity_siglip_layers(vision_tower) -> list:
    def passthrough(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    return [
        layer.register_forward_hook(passthrough, with_kwargs=True, prepend=True)
        for layer in vision_tower.encoder.layers
    ]


@pytest.mark.parametrize("cell", [(0, 0), (0, 15), (5, 9), (15, 0), (15, 15)])
def test_gemma3_pooling_order_by_perturbing_one_cell(gemma3, cell):
    """With identity SigLIP layers, token (r, c) depends only on the 4x4 patches (56x56 view
    pixels) it pools. Repainting one 14x14 patch inside cell (r, c) must move exactly the LM
    position the layout gives (r, c); patches are repainted in pixel_values directly."""
    _, _, loaded = gemma3
    adapter = loaded.adapter
    inputs = adapter.build_inputs(_image(400, 300, seed=8), "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    row, col = cell
    pixels = inputs["pixel_values"].clone()
    y, x = row * 56 + 14 * (row % 4), col * 56 + 14 * (3 - col % 4)  # some patch inside the cell
    pixels[0, :, y : y + 14, x : x + 14] += 1.5
    handles = _identity_siglip_layers(adapter.vision_tower)
    try:
        base = _forward(loaded, inputs).hidden_states[0][0]
        changed = _forward(loaded, {**inputs, "pixel_values": pixels}).hidden_states[0][0]
    finally:
        for handle in handles:
            handle.remove()
    moved = ((changed - base).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
    assert moved == [layout.position_of(row, col)]


def test_gemma3_image_attention_is_bidirectional_and_layers_are_mixed(gemma3):
    """The masks the attention modules receive: image block bidirectional (token_type_ids
    passed), text causal, sliding layers cut at the window; and the logits depend on it."""
    from tests.test_families_experiments import real_attention_masks

    _, _, loaded = gemma3
    adapter = loaded.adapter
    inputs = adapter.build_inputs(_image(), "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    masks = real_attention_masks(loaded, inputs)  # layer -> (T, T) bool, True = attend
    n = inputs["input_ids"].shape[1]
    start, end = int(layout.positions[0]), int(layout.positions[-1])
    window = loaded.model.config.text_config.sliding_window
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    image = torch.zeros(n, dtype=torch.bool)
    image[start : end + 1] = True
    block = image[:, None] & image[None, :]
    distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    for layer, layer_type in enumerate(loaded.model.config.text_config.layer_types):
        expected = causal | block
        if layer_type == "sliding_attention":
            expected = expected & (distance < window)  # keys more than a window back are cut; later image keys stay
        assert torch.equal(masks[layer], expected), layer
    assert "full_attention" in loaded.model.config.text_config.layer_types
    assert "sliding_attention" in loaded.model.config.text_config.layer_types
    without = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    assert not torch.allclose(_forward(loaded, without).logits, _forward(loaded, inputs).logits, atol=1e-4)


def test_gemma3_softcapping_and_embedding_scale(gemma3):
    """The tiny config ENABLES final_logit_softcapping (cap 3, which visibly changes these
    logits), yet Gemma3ForConditionalGeneration's forward does not apply it: the lens
    follows the model, not the config. The wrapper used where a model does apply it
    (PaliGemma) equals cap * tanh(logits / cap)."""
    from collector.adapters.gemma3 import SoftcappedUnembedding, forward_applies_softcap

    _, _, loaded = gemma3
    model, adapter = loaded.model, loaded.adapter
    inputs = adapter.build_inputs(_image(), "Describe the image.")
    outputs = _forward(loaded, inputs)
    raw = model.lm_head(outputs.hidden_states[-1])
    cap = model.config.text_config.final_logit_softcapping
    capped = cap * torch.tanh(raw / cap)
    assert cap == 3.0 and not torch.allclose(raw, capped, atol=1e-3)  # the cap would matter here
    assert torch.equal(outputs.logits, raw)  # ... but the model does not apply it
    assert not forward_applies_softcap(type(model)) and adapter.softcap is None
    assert torch.equal(adapter.unembedding(outputs.hidden_states[-1]), outputs.logits)
    wrapper = SoftcappedUnembedding(model.lm_head, cap)
    torch.testing.assert_close(wrapper(outputs.hidden_states[-1]), capped, atol=1e-6, rtol=1e-6)
    assert wrapper.weight is model.lm_head.weight
    # hidden_states[0] at text positions: embedding row * sqrt(d), as Gemma scales them.
    ids = inputs["input_ids"][0]
    text = (inputs["token_type_ids"][0] == 0).nonzero().flatten()
    expected = model.model.language_model.embed_tokens.weight[ids[text]] * (model.config.text_config.hidden_size**0.5)
    torch.testing.assert_close(outputs.hidden_states[0][0, text], expected, atol=1e-5, rtol=1e-5)


# -- PaliGemma: image-first prefix, bidirectional prefix-LM mask, softcapping ----------------


def test_paligemma_inputs_span_and_grid(paligemma):
    """build_inputs equals the real PaliGemmaProcessor on the template's prefix; the VQA
    answer opening after the prefix's newline is a causal suffix exactly as the processor's
    `suffix=` tokenizes it (less the <eos> it appends); image tokens are positions 0..255."""
    from transformers import PaliGemmaProcessor

    _, _, loaded = paligemma
    adapter = loaded.adapter
    assert isinstance(loaded.processor, PaliGemmaProcessor)  # the real processor, no torchvision needed
    assert adapter.prompt_template == "<image>answer en {question}\n"
    tokenizer = adapter.tokenizer
    question = "Is there a cat in this image?"
    image = _image(500, 375)
    inputs = adapter.build_inputs(image, question)
    real = loaded.processor(images=image, text=f"<image>answer en {question}", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}  # no labels
    for key in inputs:
        assert torch.equal(inputs[key], real[key]), key
    input_ids = inputs["input_ids"][0]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    # Independent derivation: 256 x <image>, <bos>, the prompt, "\n"; all prefix (type 0).
    expected_text = "<image>" * 256 + f"<bos>answer en {question}\n"
    assert input_ids.tolist() == tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    assert input_ids[:256].eq(image_id).all() and input_ids[256] == tokenizer.bos_token_id
    assert torch.equal(inputs["token_type_ids"][0], torch.zeros_like(input_ids))
    layout = adapter.image_token_layout(input_ids, inputs)
    assert (layout.grid_rows, layout.grid_cols, layout.n_tokens) == (16, 16, 256)
    assert layout.positions.tolist() == list(range(256))
    assert layout.position_of(1, 0) == 16 and layout.position_of(15, 15) == 255
    # The VQA prompt: prefix as above, then " It is a" as type-1 suffix tokens.
    vqa = adapter.build_inputs_for_text(image, adapter.format_prompt(question) + " It is a")
    with_suffix = loaded.processor(
        images=image, text=f"<image>answer en {question}", suffix=" It is a", return_tensors="pt"
    )
    assert with_suffix["input_ids"][0, -1] == tokenizer.eos_token_id
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(vqa[key], with_suffix[key][:, :-1]), key
    assert vqa["token_type_ids"][0].tolist()[-4:] == [0, 1, 1, 1]
    # The view: the whole image resized to 224x224 (no crop, no pad), as the geometry says.
    from collector.geometry import view_geometry_from_processor

    view = adapter.view_image(adapter.view_pixels(inputs))
    geometry = view_geometry_from_processor(loaded.processor.image_processor, 500, 375)
    assert view.size == (geometry.view_width, geometry.view_height) == (224, 224)
    assert (geometry.offset_x, geometry.offset_y) == (0.0, 0.0)
    expected_view = image.resize((224, 224), Image.BICUBIC)
    difference = torch.tensor(list(view.getdata())) - torch.tensor(list(expected_view.getdata()))
    assert difference.abs().max() <= 1


@pytest.mark.parametrize("cell", [(0, 0), (0, 15), (5, 9), (15, 0), (15, 15)])
def test_paligemma_patch_order_by_perturbing_one_cell(paligemma, cell):
    """With identity SigLIP layers, token (r, c) depends only on its own 14x14 patch:
    repainting that patch moves exactly the LM position the layout gives (r, c)."""
    _, _, loaded = paligemma
    adapter = loaded.adapter
    inputs = adapter.build_inputs(_image(400, 300, seed=8), "Describe the image.")
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    row, col = cell
    pixels = inputs["pixel_values"].clone()
    pixels[0, :, row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14] += 1.5
    handles = _identity_siglip_layers(adapter.vision_tower)
    try:
        base = _forward(loaded, inputs).hidden_states[0][0]
        changed = _forward(loaded, {**inputs, "pixel_values": pixels}).hidden_states[0][0]
    finally:
        for handle in handles:
            handle.remove()
    moved = ((changed - base).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
    assert moved == [layout.position_of(row, col)]


@pytest.mark.parametrize("implementation", ("sdpa", "eager"))
def test_paligemma_prefix_is_bidirectional_and_suffix_causal(paligemma, implementation):
    """The masks the attention modules receive (eager and sdpa): image + BOS + prompt + "\\n"
    form one bidirectional block, the suffix is causal; without token_type_ids the mask is
    causal and the logits differ."""
    from collector.loading import load_model
    from tests.test_families_experiments import real_attention_masks

    _, path, _ = paligemma
    loaded = load_model(str(path), device="cpu", dtype="float32", attn_implementation=implementation)
    adapter = loaded.adapter
    inputs = adapter.build_inputs_for_text(_image(), adapter.format_prompt("What is it?") + " It is a")
    n = inputs["input_ids"].shape[1]
    prefix = inputs["token_type_ids"][0] == 0
    assert int(prefix.sum()) < n and bool(prefix[: int(prefix.sum())].all())
    expected = torch.ones(n, n, dtype=torch.bool).tril() | (prefix[:, None] & prefix[None, :])
    masks = real_attention_masks(loaded, inputs)
    for layer in range(adapter.n_layers):
        assert torch.equal(masks[layer], expected), layer
    assert adapter.attention_module(0).is_causal is False  # sdpa must never run without a mask here
    without = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    causal_masks = real_attention_masks(loaded, without)
    assert torch.equal(causal_masks[0], torch.ones(n, n, dtype=torch.bool).tril())
    assert not torch.allclose(_forward(loaded, without).logits, _forward(loaded, inputs).logits, atol=1e-4)


def test_paligemma_softcapping_and_embedding_scale(paligemma):
    """The tiny config sets final_logit_softcapping (cap 3, which visibly changes these
    logits) and PaliGemmaForConditionalGeneration applies it: the lens's unembedding of the
    last hidden state equals the model's logits exactly, and differs from lm_head alone."""
    from collector.adapters.gemma3 import forward_applies_softcap
    from collector.lens import LogitLens

    _, _, loaded = paligemma
    model, adapter = loaded.model, loaded.adapter
    inputs = adapter.build_inputs(_image(), "Describe the image.")
    outputs = _forward(loaded, inputs)
    raw = model.lm_head(outputs.hidden_states[-1])
    cap = model.config.text_config.final_logit_softcapping
    assert cap == 3.0 and forward_applies_softcap(type(model)) and adapter.softcap == cap
    assert not torch.allclose(raw, outputs.logits, atol=1e-3)  # the cap matters here
    torch.testing.assert_close(outputs.logits, cap * torch.tanh(raw / cap), atol=1e-6, rtol=1e-6)
    assert torch.equal(adapter.unembedding(outputs.hidden_states[-1]), outputs.logits)
    lens = LogitLens(adapter)
    assert torch.equal(lens.layer_logits(outputs.hidden_states, len(outputs.hidden_states) - 1), outputs.logits)
    # hidden_states[0] at text positions: embedding row * sqrt(d), as Gemma scales them.
    ids = inputs["input_ids"][0]
    text = (ids != adapter.image_token_id).nonzero().flatten()
    expected = model.model.language_model.embed_tokens.weight[ids[text]] * (model.config.text_config.hidden_size**0.5)
    torch.testing.assert_close(outputs.hidden_states[0][0, text], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(500, 375), (300, 620)])
def test_llava_next_high_res_view_is_the_stitched_unpadded_tiles(llava_next, size):
    """The high-resolution view equals the processor's tiles stitched independently (one
    paste per tile, then the unpad crop); its size is the unpadded grid implied by
    image_sizes and the pinpoints, and each cell's pixels come from the tile patch
    `hr_cell_source` names for it."""
    import numpy as np
    from transformers.image_processing_utils import select_best_resolution

    from collector.adapters.base import denormalise_to_image

    _, _, loaded = llava_next
    adapter = loaded.adapter
    inputs = adapter.build_inputs(_image(*size, seed=3), "What is it?")
    (view,) = adapter.extra_views(inputs)
    assert (view.name, view.kind) == ("high_res", "image_hr")
    # The unpadded size, derived here from image_sizes and the pinpoints (unpad_image's rule).
    height, width = (int(v) for v in inputs["image_sizes"][0])
    best_h, best_w = select_best_resolution((height, width), loaded.model.config.image_grid_pinpoints)
    full_rows, full_cols = best_h // 14, best_w // 14
    if width / height > full_cols / full_rows:
        pad = (full_rows - int(round(height * full_cols / width, 7))) // 2
        rows, cols, row0, col0 = full_rows - 2 * pad, full_cols, pad, 0
    else:
        pad = (full_cols - int(round(width * full_rows / height, 7))) // 2
        rows, cols, row0, col0 = full_rows, full_cols - 2 * pad, 0, pad
    assert (view.grid_rows, view.grid_cols) == (rows, cols)
    assert view.image.size == (cols * 14, rows * 14)
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    assert layout.extra.kinds.count("image_hr") == rows * cols
    # Independent stitching: paste each de-normalised tile at its place, then crop.
    image_processor = loaded.processor.image_processor
    tiles = inputs["pixel_values"][0]
    canvas = Image.new("RGB", (best_w, best_h))
    for t in range(1, tiles.shape[0]):
        r, c = divmod(t - 1, best_w // 336)
        canvas.paste(denormalise_to_image(tiles[t], image_processor), (c * 336, r * 336))
    expected = canvas.crop((col0 * 14, row0 * 14, (col0 + cols) * 14, (row0 + rows) * 14))
    assert list(view.image.getdata()) == list(expected.getdata())
    # Cell (r, c) of the view is the tile patch hr_cell_source names.
    pixels = np.asarray(view.image)
    for r, c in [(0, 0), (rows - 1, cols - 1), (rows // 2, cols // 3), (rows - 1, 0), (0, cols - 1)]:
        tile, pr, pc = adapter.hr_cell_source((height, width), r, c)
        source = denormalise_to_image(tiles[tile][:, pr * 14 : (pr + 1) * 14, pc * 14 : (pc + 1) * 14], image_processor)
        cell = pixels[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14]
        assert np.array_equal(cell, np.asarray(source)), (r, c)
