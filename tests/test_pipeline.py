"""The pipelined runner: loader threads, writer thread, batches, out-of-memory halving,
unusable images; every configuration writes the rows one image at a time would."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import collector.lens.experiment as lens_module
from collector.images import ImageRecord, ImageUnusable, folder_images
from collector.lens.experiment import LensExperiment, collect_lens
from collector.runner import SkipReason, run_experiment
from db.store import ResultsDB

TABLES = {
    "positions": "*",
    "logit_lens": "run_id, image_id, layer, position, rank, token_id, token, prob",
    "image_views": "run_id, image_id, png, view_width, view_height, scale_x, scale_y, offset_x, offset_y",
    "run_images": "run_id, image_id, n_positions, n_layers, grid_rows, grid_cols",
    "images": "*",
    "skipped": "*",
}


def _rows(path: Path) -> dict[str, list[tuple]]:
    with ResultsDB(path, read_only=True) as db:
        return {table: db.sql(f"SELECT {columns} FROM {table} ORDER BY ALL") for table, columns in TABLES.items()}


def _lens(tmp_path, loaded, records, name, **options):
    path = tmp_path / f"{name}.duckdb"
    with ResultsDB(path) as db:
        summary = collect_lens(loaded, records, db, top_k=3, progress=False, **options)
        config = db.runs("lens")[0]["config"]
    return path, summary, config


@pytest.fixture(scope="module")
def lens_records(demo_images):
    image_dir, annotation_file = demo_images
    records = folder_images(image_dir, annotation_file)
    assert len(records) >= 4
    return records


def test_pipelined_and_batched_lens_equal_one_image_at_a_time(tmp_path, loaded_models, lens_records):
    loaded = loaded_models["llava-1.5"]
    reference, _, _ = _lens(tmp_path, loaded, lens_records, "inline", batch_size=1, loader_workers=0)
    expected = _rows(reference)
    assert len(expected["run_images"]) == len(lens_records) and expected["skipped"] == []
    for name, options in {
        "pipelined": dict(batch_size=1, loader_workers=2),
        "batched": dict(batch_size=3, loader_workers=2),
        "batched-inline": dict(batch_size=4, loader_workers=0),
    }.items():
        path, summary, config = _lens(tmp_path, loaded, lens_records, name, **options)
        assert summary.images_kept == len(lens_records) and summary.oom_events == ()
        assert (config["batch_size"], config["loader_workers"]) == (options["batch_size"], options["loader_workers"])
        actual = _rows(path)
        for table in TABLES:
            if table == "logit_lens" and name.startswith("batched"):
                # A batched matmul may round differently in the last bit: same tokens, same ranks.
                assert [row[:7] for row in actual[table]] == [row[:7] for row in expected[table]], name
                assert max(abs(a[7] - e[7]) for a, e in zip(actual[table], expected[table])) < 1e-5
            else:
                assert actual[table] == expected[table], (name, table)


def test_batches_group_images_by_prompt_length(loaded_models, lens_records):
    loaded = loaded_models["llava-1.5"]
    experiment = LensExperiment(loaded)
    inputs = [experiment.prepare(record) for record in lens_records[:2]]
    assert experiment.batch_key(inputs[0]) == experiment.batch_key(inputs[1]) == inputs[0]["input_ids"].shape[1]
    batch = lens_module.stack_inputs(inputs)
    assert batch["input_ids"].shape[0] == 2 and torch.equal(batch["pixel_values"][1], inputs[1]["pixel_values"][0])
    shorter = {**inputs[1], "input_ids": inputs[1]["input_ids"][:, 1:]}
    assert lens_module.stack_inputs([inputs[0], shorter]) is None


def test_out_of_memory_halves_the_batch_and_is_recorded(tmp_path, loaded_models, lens_records, monkeypatch):
    loaded = loaded_models["llava-1.5"]
    reference, _, _ = _lens(tmp_path, loaded, lens_records, "reference", batch_size=1, loader_workers=0)
    real_forward = lens_module.lens_forward
    batch_sizes = []

    def forward_without_room_for_two(loaded, inputs):
        batch_sizes.append(inputs["input_ids"].shape[0])
        if inputs["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(loaded, inputs)

    monkeypatch.setattr(lens_module, "lens_forward", forward_without_room_for_two)
    path, summary, config = _lens(tmp_path, loaded, lens_records, "oom", batch_size=4, loader_workers=2)
    n = len(lens_records)
    # 4 fails, its halves 2 fail, then batch 1 for the rest of the run.
    assert batch_sizes[:3] == [4, 2, 1] and batch_sizes.count(1) == n
    assert [(e["batch_size"], e["retry_batch_size"]) for e in summary.oom_events] == [(4, 2), (2, 1), (2, 1)]
    assert [e["image_ids"] for e in config["oom_events"]] == [e["image_ids"] for e in summary.oom_events]
    assert config["oom_events"][0]["image_ids"] == [r.image_id for r in lens_records[:4]]
    assert "batch halved 3x after device out-of-memory (to 1)" in summary.line("r.duckdb")
    assert _rows(path) == _rows(reference)


def test_limit_is_exact_with_batches(tmp_path, loaded_models, lens_records):
    loaded = loaded_models["llava-1.5"]
    path = tmp_path / "r.duckdb"
    with ResultsDB(path) as db:
        summary = run_experiment(
            LensExperiment(loaded, top_k=2), lens_records, db, limit=3, progress=False, batch_size=2
        )
        assert (summary.images_kept, summary.images_kept_total) == (3, 3)
        assert db.completed_images(summary.run_id) == {r.image_id for r in lens_records[:3]}


@dataclasses.dataclass(frozen=True)
class _BrokenFile(ImageRecord):
    reason: str = "truncated"

    def load(self):
        raise ImageUnusable(self.reason, f"{self.file_name}: image file is truncated")


@pytest.mark.parametrize("workers", [0, 2])
def test_unusable_images_are_recorded_skips(tmp_path, loaded_models, lens_records, workers):
    loaded = loaded_models["llava-1.5"]
    broken = _BrokenFile(**{f.name: getattr(lens_records[1], f.name) for f in dataclasses.fields(ImageRecord)})
    records = [lens_records[0], broken, lens_records[2]]
    path = tmp_path / "r.duckdb"
    with ResultsDB(path) as db:
        summary = run_experiment(
            LensExperiment(loaded, top_k=2), records, db, progress=False, batch_size=2, loader_workers=workers
        )
        assert summary.skip_reasons == {"truncated": 1} and summary.images_kept == 2
        assert db.sql("SELECT image_id, reason, detail FROM skipped") == [
            (broken.image_id, SkipReason.TRUNCATED.value, f"{broken.file_name}: image file is truncated")
        ]
        assert db.sql(
            "SELECT n_positions, n_layers, grid_rows, grid_cols FROM run_images WHERE image_id = ?", [broken.image_id]
        ) == [(0, None, 0, 0)]
        assert db.sql("SELECT count(*) FROM positions WHERE image_id = ?", [broken.image_id]) == [(0,)]
        assert db.completed_images(summary.run_id) == {r.image_id for r in records}
        # Resume: a complete run, the skip included, has nothing left to do.
        again = run_experiment(LensExperiment(loaded, top_k=2), records, db, progress=False, loader_workers=workers)
        assert again.images_written == 0 and again.images_already_complete == 3


def test_a_failed_write_stops_the_run_and_keeps_earlier_images(tmp_path, loaded_models, lens_records, monkeypatch):
    loaded = loaded_models["llava-1.5"]
    real_write = ResultsDB.write_image_results
    failing = lens_records[2].image_id

    def write(self, run_id, image_id, tables):
        if image_id == failing:
            raise RuntimeError("disk full (injected)")
        return real_write(self, run_id, image_id, tables)

    monkeypatch.setattr(ResultsDB, "write_image_results", write)
    with ResultsDB(tmp_path / "r.duckdb") as db:
        with pytest.raises(RuntimeError, match="disk full"):
            run_experiment(LensExperiment(loaded, top_k=2), lens_records, db, progress=False, loader_workers=2)
        [run] = db.runs("lens")
        assert run["status"] == "failed"
        assert db.completed_images(run["run_id"]) == {r.image_id for r in lens_records[:2]}
