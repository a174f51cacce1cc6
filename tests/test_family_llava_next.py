"""LLaVA-NeXT (`collector/adapters/llava_next.py`) on a tiny checkpoint: parts and lens,
anyres tiles, base grid, high-resolution grid and newlines (token count from the real
processor, every token by perturbation), the high-resolution view, the base view's
geometry, and `collect lens` end to end with the site's two views."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.families import (
    check_collect_lens_cli,
    check_every_layer_equals_independent_recomputation,
    check_language_model_parts,
    check_last_layer_lens_equals_model_logits,
    forward,
    identity_layers,
    random_image,
    rms_norm,
)
from tests.support.markers import check_adapter_view_geometry


@pytest.fixture
def llava_next(family_model):
    return family_model("llava-next")


# -- parts and lens ----------------------------------------------------------------------


def test_parts_are_the_models_own_modules(llava_next):
    name, _, loaded = llava_next
    check_language_model_parts(name, loaded, softcapped=False)
    assert loaded.adapter.vision_tower is loaded.model.model.vision_tower
    assert loaded.adapter.projector is loaded.model.model.multi_modal_projector


def test_last_layer_lens_equals_model_logits(llava_next):
    check_last_layer_lens_equals_model_logits(llava_next[2])


def test_every_layer_equals_independent_recomputation(llava_next):
    check_every_layer_equals_independent_recomputation(llava_next[2], rms_norm, softcapped=False)


# -- anyres tiles, base grid, HR grid, newlines ------------------------------------------------


@pytest.mark.parametrize("size", [(500, 375), (300, 620), (336, 336), (1000, 300)])
def test_llava_next_token_count_and_layout(llava_next, size):
    _, _, loaded = llava_next
    adapter = loaded.adapter
    inputs = adapter.build_inputs(random_image(*size), "What is it?")
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
    # The layout comes from the inputs' image_sizes, never from a cache of earlier calls.
    with pytest.raises(ValueError, match="image_sizes"):
        adapter.image_token_layout(input_ids, {"input_ids": inputs["input_ids"]})


def test_llava_next_every_token_by_perturbing_tile_patches(llava_next):
    """A 500x375 image: best resolution 672x672 (2x2 tiles), the image resized to 672x504
    and padded by 84 px top and bottom, i.e. 6 patch rows of padding in the 48x48 stitched
    grid, leaving 36 rows. With identity CLIP layers, repainting one 14x14 patch of one
    tile must move exactly the LM position the layout gives that patch, and nothing for a
    patch that only covers padding. Newline positions hold the model's image_newline."""
    _, _, loaded = llava_next
    adapter = loaded.adapter
    inputs = adapter.build_inputs(random_image(500, 375, seed=7), "Describe the image.")
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
    handles = identity_layers(adapter.vision_tower.encoder.layers)
    try:
        base = forward(loaded, inputs).hidden_states[0][0]
        newline = adapter.image_newline.detach()
        nl_positions = [p for p, k in zip(layout.extra.positions.tolist(), layout.extra.kinds) if k == "image_newline"]
        assert torch.equal(base[nl_positions], newline.expand(len(nl_positions), -1))
        for (tile, row, col), expected in cases.items():
            pixels = inputs["pixel_values"].clone()
            pixels[0, tile, :, row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14] += 1.5
            changed = forward(loaded, {**inputs, "pixel_values": pixels}).hidden_states[0][0]
            moved = ((changed - base).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
            assert moved == ([] if expected is None else [expected]), (tile, row, col)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("size", [(500, 375), (300, 620)])
def test_llava_next_high_res_view_is_the_stitched_unpadded_tiles(llava_next, size):
    """The high-resolution view equals the processor's tiles stitched independently (one
    paste per tile, then the unpad crop); its size is the unpadded grid implied by
    image_sizes and the pinpoints, and each cell's pixels come from the tile patch
    `hr_cell_source` names for it."""
    from transformers.image_processing_utils import select_best_resolution

    from collector.adapters.base import denormalise_to_image

    _, _, loaded = llava_next
    adapter = loaded.adapter
    inputs = adapter.build_inputs(random_image(*size, seed=3), "What is it?")
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
    assert np.array_equal(np.asarray(view.image), np.asarray(expected))
    # Cell (r, c) of the view is the tile patch hr_cell_source names.
    pixels = np.asarray(view.image)
    for r, c in [(0, 0), (rows - 1, cols - 1), (rows // 2, cols // 3), (rows - 1, 0), (0, cols - 1)]:
        tile, pr, pc = adapter.hr_cell_source((height, width), r, c)
        source = denormalise_to_image(tiles[tile][:, pr * 14 : (pr + 1) * 14, pc * 14 : (pc + 1) * 14], image_processor)
        cell = pixels[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14]
        assert np.array_equal(cell, np.asarray(source)), (r, c)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 337), (336, 336)])
def test_view_geometry_puts_markers_where_the_model_sees_them(llava_next, size):
    """The base view (tile 0): the whole image squeezed to 336x336, no crop, no pad."""
    _, _, loaded = llava_next
    geometry = loaded.adapter.view_geometry(*size)
    assert (geometry.view_width, geometry.view_height, geometry.offset_x, geometry.offset_y) == (336, 336, 0, 0)
    assert geometry.scale_x == pytest.approx(336 / size[0]) and geometry.scale_y == pytest.approx(336 / size[1])
    assert check_adapter_view_geometry(loaded.adapter, *size) >= 4


# -- end to end: the CLI into DuckDB, and the site ---------------------------------------------


@pytest.mark.slow  # the whole CLI on a family model; the lens itself is tested above
def test_collect_lens_cli_end_to_end(llava_next, demo_images, tmp_path):
    from db.store import ResultsDB
    from report.build import build_site, run_dir_name

    name, path, loaded = llava_next
    db_path = tmp_path / "r.duckdb"
    images = check_collect_lens_cli(name, path, loaded, demo_images[0], db_path)
    with ResultsDB(db_path, read_only=True) as db:
        for image in images:
            image_id = image["image_id"]
            # base view 336x336 on a 24x24 grid; tiles + newlines after it
            assert (image["width"], image["height"], image["rows"], image["cols"]) == (336, 336, 24, 24)
            kinds = dict(db.sql(f"SELECT kind, count(*) FROM positions WHERE image_id = {image_id} GROUP BY 1"))
            n_newline = kinds["image_newline"]
            assert kinds["image_hr"] % n_newline == 0
            hr = db.sql(
                f"SELECT max(patch_row) + 1, max(patch_col) + 1, count(patch_col) FROM positions "
                f"WHERE image_id = {image_id} AND kind LIKE 'image_%'"
            )[0]
            assert hr == (n_newline, kinds["image_hr"] // n_newline, kinds["image_hr"])
            # The high-resolution view: one cell per image_hr position, 14x14 px each.
            ((view_name, view_kind, hr_width, hr_height, hr_rows, hr_cols, png),) = image["extra"]
            assert (view_name, view_kind) == ("high_res", "image_hr")
            assert (hr_width, hr_height) == (hr_cols * 14, hr_rows * 14)
            assert Image.open(io.BytesIO(bytes(png))).size == (hr_width, hr_height)
            assert (hr_rows, hr_cols) == (n_newline, kinds["image_hr"] // n_newline)
    # The site renders both views; every image_hr position is one HR cell.
    build_site(db_path, tmp_path / "site", downloads=False)
    folder = tmp_path / "site" / "lens" / run_dir_name(images[0]["run_id"])
    for image in images:
        image_id = image["image_id"]
        text = (folder / f"{image_id}.data.js").read_text(encoding="utf-8").strip()
        data = json.loads(text.removeprefix("window.LENS_DATA = ").removesuffix(";"))
        (view,) = data["extra_views"]
        pos = data["positions"]
        cells = [(r, c) for k, r, c in zip(pos["kind"], pos["patch_row"], pos["patch_col"]) if k == "image_hr"]
        assert sorted(cells) == [(r, c) for r in range(view["grid_rows"]) for c in range(view["grid_cols"])]
        assert 'id="extra-grid-0"' in (folder / f"{image_id}.html").read_text(encoding="utf-8")
        # The picture beside the page is the database's high-resolution PNG (read with the
        # batch's others: queries.pictures).
        assert (folder / f"{image_id}.extra0.png").read_bytes() == bytes(image["extra"][0][-1])
