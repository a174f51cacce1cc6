"""Replacement vectors (seed files, sizes, DB) and the prefill ablation hook, against plain forwards."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from collector.ablation.replacement import (
    ablate_positions,
    compute_mean_vector,
    image_token_embeddings,
    load_replacement,
    save_mean_vector,
    store_mean_vector,
)
from collector.errors import UserError
from collector.images import folder_images
from db.store import ResultsDB
from tests.conftest import SHARED_DATA, require_shared

SEED = SHARED_DATA / "seed_reference"


@pytest.mark.parametrize(
    "name, size",
    [("test_acts_full_precision_mean_vector.pt", 4096), ("val_acts_full_precision_phi_mean_vector.pt", 3072)],
)
def test_seed_mean_vectors_load_with_weights_only(name, size):
    path = require_shared(SEED / name)
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw, torch.Tensor) and raw.shape == (size,)
    replacement = load_replacement(str(path), size)
    assert replacement.vector.shape == (size,) and replacement.vector.dtype == torch.float32
    assert torch.equal(replacement.vector, raw.float())
    assert len(replacement.sha256) == 64


def test_size_mismatch_is_a_one_line_user_error(loaded_models):
    path = require_shared(SEED / "test_acts_full_precision_mean_vector.pt")
    hidden = loaded_models["llava-1.5"].adapter.hidden_size
    with pytest.raises(UserError, match=r"size 4096 but the model's hidden size is 64") as info:
        load_replacement(str(path), hidden)
    assert "\n" not in str(info.value)


def test_bad_replacement_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_replacement(str(tmp_path / "nope.pt"), 8)
    torch.save(torch.zeros(2, 4), tmp_path / "matrix.pt")
    with pytest.raises(UserError, match="1-D float tensor"):
        load_replacement(str(tmp_path / "matrix.pt"), 8)
    (tmp_path / "junk.pt").write_bytes(b"not a tensor")
    with pytest.raises(UserError, match="cannot load"):
        load_replacement(str(tmp_path / "junk.pt"), 8)
    zero = load_replacement("zero", 8)
    assert torch.equal(zero.vector, torch.zeros(8))


def _manual_image_features(loaded, image) -> torch.Tensor:
    """Independent path: the vision tower + projector through get_image_features, (n, d)."""
    inputs = loaded.adapter.build_inputs(image, "Describe the image.")
    config = loaded.model.config
    with torch.no_grad():
        out = loaded.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
    return out.pooler_output[0]


def test_mean_vector_equals_manual_average_and_round_trips(loaded_models, demo_images, tmp_path):
    loaded = loaded_models["llava-1.5"]
    image_dir, annotation_file = demo_images
    records = folder_images(image_dir, annotation_file)[:3]
    features = [_manual_image_features(loaded, r.load()) for r in records]
    # the hook reads what the LM receives: equal to the projector output
    assert torch.equal(image_token_embeddings(loaded, records[0].load()), features[0])
    manual = torch.cat(features).double().mean(dim=0)
    mean = compute_mean_vector(loaded, records, progress=False)
    assert (mean.n_images, mean.n_tokens) == (3, 3 * 576)
    torch.testing.assert_close(mean.vector, manual, atol=1e-10, rtol=1e-10)

    save_mean_vector(tmp_path / "mean.pt", mean)
    from_file = load_replacement(str(tmp_path / "mean.pt"), 64)
    torch.testing.assert_close(from_file.vector, manual.float())
    with ResultsDB(tmp_path / "r.duckdb") as db:
        vector_id = store_mean_vector(db, loaded, mean, "test", {})
        from_db = load_replacement(f"db:{vector_id}", 64, db)
        assert torch.equal(from_db.vector, from_file.vector)
        with pytest.raises(UserError, match="no mean vector"):
            load_replacement("db:missing", 64, db)


def _batch(loaded, images, question="Is there a circle in this image?"):
    singles = [loaded.adapter.build_inputs(image, question) for image in images]
    return {k: torch.cat([s[k] for s in singles]) for k in singles[0]}


IMAGES = (Image.new("RGB", (500, 375), (120, 30, 200)), Image.new("RGB", (320, 480), (10, 220, 90)))


def test_ablating_every_image_token_removes_the_image(loaded):
    adapter = loaded.adapter
    inputs = _batch(loaded, IMAGES)
    image_positions = adapter.image_token_layout(inputs["input_ids"][0], inputs).positions.tolist()
    vector = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = loaded.model(**inputs, use_cache=False).logits
        assert not torch.allclose(plain[0], plain[1], atol=1e-4)
        with ablate_positions(adapter, [image_positions] * 2, vector):
            ablated = loaded.model(**inputs, use_cache=False).logits
    assert torch.equal(ablated[0], ablated[1])
    with ablate_positions(adapter, [image_positions] * 2, vector):
        generated = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    assert torch.equal(generated[0], generated[1])


def test_ablating_nothing_is_the_plain_forward(loaded):
    inputs = _batch(loaded, IMAGES)
    with torch.no_grad():
        plain = loaded.model(**inputs, use_cache=False).logits
        with ablate_positions(loaded.adapter, [[], []], torch.ones(loaded.adapter.hidden_size)):
            ablated = loaded.model(**inputs, use_cache=False).logits
    assert torch.equal(plain, ablated)


def test_ablated_positions_hold_the_vector_and_others_are_unchanged(loaded):
    adapter = loaded.adapter
    inputs = _batch(loaded, IMAGES)
    layout = adapter.image_token_layout(inputs["input_ids"][0], inputs)
    rows = [layout.positions[[0, 5, 300]].tolist(), layout.positions[[7]].tolist() + [1]]  # a text position too
    vector = torch.arange(adapter.hidden_size, dtype=torch.float32) / 10
    with torch.no_grad():
        plain = loaded.model(**inputs, use_cache=False, output_hidden_states=True).hidden_states[0]
        with ablate_positions(adapter, rows, vector):
            ablated = loaded.model(**inputs, use_cache=False, output_hidden_states=True).hidden_states[0]
    for b, positions in enumerate(rows):
        assert torch.equal(ablated[b, positions], vector.expand(len(positions), -1))
        untouched = [p for p in range(plain.shape[1]) if p not in positions]
        assert torch.equal(ablated[b, untouched], plain[b, untouched])


def test_hook_acts_on_the_prefill_only(loaded):
    """Decoding steps see one new token; replacing it would corrupt generation."""
    adapter = loaded.adapter
    inputs = _batch(loaded, IMAGES[:1])
    seen = []
    handle = adapter.decoder.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    vector = torch.full((adapter.hidden_size,), 3.0)
    last = int(inputs["input_ids"].shape[1]) - 1
    try:
        with ablate_positions(adapter, [[last]], vector):  # also position 0 of a 1-token step, if misapplied
            loaded.model.generate(**inputs, do_sample=False, max_new_tokens=3, min_new_tokens=3)
    finally:
        handle.remove()
    assert seen[0].shape[1] > 1 and torch.equal(seen[0][0, last], vector)
    assert len(seen) == 3 and all(step.shape[1] == 1 and not torch.equal(step[0, 0], vector) for step in seen[1:])
