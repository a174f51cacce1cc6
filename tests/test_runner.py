"""The experiment runner: identity and resume, skips recorded by reason, limit, status, summary."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from collector.adapters import ImageTokenLayout
from collector.images import ImageRecord
from collector.runner import Experiment, ImageOutcome, RunSummary, SkipReason, run_experiment
from collector.tables import run_image_marker
from db.store import ResultsDB

LAYOUT = ImageTokenLayout.row_major(torch.arange(4), 2, 2)


_IMAGE_DIR = Path(tempfile.mkdtemp(prefix="llava-interp-runner-"))


def _records(n: int) -> list[ImageRecord]:
    """n real 10x10 images (the pipelined runner decodes every image ahead of the experiment;
    a file that cannot be read would be a recorded 'unreadable' skip)."""
    records = []
    for i in range(1, n + 1):
        path = _IMAGE_DIR / f"{i}.png"
        if not path.exists():
            Image.new("RGB", (10, 10), (i, 0, 0)).save(path)
        records.append(ImageRecord(i, f"{i}.png", path, 10, 10, "test"))
    return records


class Scripted(Experiment):
    """Keeps or skips each image as scripted; records which images it processed."""

    name = "scripted"
    label = "scripted"

    def __init__(
        self,
        loaded,
        script: dict[int, SkipReason | None],
        setting: str = "a",
        fail_on: int | None = None,
        interrupt_on: int | None = None,
    ) -> None:
        super().__init__(loaded)
        self.script = script
        self.setting = setting
        self.fail_on = fail_on
        self.interrupt_on = interrupt_on
        self.processed: list[int] = []

    def identity(self):
        return {"setting": self.setting}

    def provenance(self):
        return {"note": "recorded, not identity"}

    def select(self, records):
        return [r for r in records if r.image_id in self.script]

    def process(self, record, run_id):
        if record.image_id == self.fail_on:
            raise RuntimeError("boom")
        if record.image_id == self.interrupt_on:
            raise KeyboardInterrupt
        self.processed.append(record.image_id)
        tables = {"run_images": run_image_marker(run_id, record.image_id, 4, LAYOUT, None)}
        reason = self.script[record.image_id]
        if reason is None:
            return ImageOutcome.keep(tables)
        return ImageOutcome.skip(reason, f"detail of {record.image_id}", tables)


SCRIPT = {
    1: SkipReason.BASELINE_INCORRECT,
    2: None,
    3: SkipReason.OBJECT_OUTSIDE_VIEW,
    4: None,
    5: None,
    6: SkipReason.BASELINE_INCORRECT,
}


def test_skips_are_recorded_and_counted_by_reason(tmp_path, loaded_models):
    loaded = loaded_models["llava-1.5"]
    records = _records(7)  # image 7 is not selected
    with ResultsDB(tmp_path / "r.duckdb") as db:
        summary = run_experiment(Scripted(loaded, SCRIPT), records, db, extra_config={"caller": 1}, progress=False)
        skipped = db.sql("SELECT image_id, reason, detail FROM skipped ORDER BY 1")
        run = db.runs("scripted")[0]
        assert db.completed_images(summary.run_id) == {1, 2, 3, 4, 5, 6}
        assert db.skipped_images(summary.run_id) == {1, 3, 6}
    assert skipped == [
        (1, "baseline_incorrect", "detail of 1"),
        (3, "object_outside_view", "detail of 3"),
        (6, "baseline_incorrect", "detail of 6"),
    ]
    assert summary == RunSummary(
        summary.run_id, "scripted", 6, 0, 3, 3, {"baseline_incorrect": 2, "object_outside_view": 1}
    )
    assert (summary.images_skipped, summary.images_written) == (3, 6)
    assert run["status"] == "complete"
    config = run["config"]
    assert config["setting"] == "a" and config["note"] == "recorded, not identity" and config["caller"] == 1
    assert config["model_id"] == loaded.model_id and config["limit"] is None
    assert config["readout_sha256"] == loaded.adapter.readout().sha256()


def test_limit_counts_kept_images_across_invocations(tmp_path, loaded_models):
    loaded = loaded_models["llava-1.5"]
    records = _records(6)
    with ResultsDB(tmp_path / "r.duckdb") as db:
        first = Scripted(loaded, SCRIPT)
        summary = run_experiment(first, records, db, limit=1, progress=False)
        assert first.processed == [1, 2]  # skip, keep: the limit is reached
        assert (summary.images_kept, summary.images_kept_total, summary.skip_reasons) == (
            1,
            1,
            {"baseline_incorrect": 1},
        )
        second = Scripted(loaded, SCRIPT)
        summary = run_experiment(second, records, db, limit=1, progress=False)
        assert second.processed == [] and summary.images_written == 0 and summary.images_already_complete == 2
        third = Scripted(loaded, SCRIPT)
        summary = run_experiment(third, records, db, limit=3, progress=False)
        assert third.processed == [3, 4, 5]
        assert (summary.images_kept, summary.images_kept_total, summary.images_already_complete) == (2, 3, 2)
        other = Scripted(loaded, SCRIPT, setting="b")  # another identity: another run, from scratch
        summary = run_experiment(other, records, db, limit=1, progress=False)
        assert other.processed == [1, 2] and len(db.runs("scripted")) == 2


@pytest.mark.parametrize("stop, status", [("fail_on", "failed"), ("interrupt_on", "interrupted")])
def test_a_stopped_run_records_its_status_and_resumes(tmp_path, loaded_models, stop, status):
    loaded = loaded_models["llava-1.5"]
    records = _records(6)
    with ResultsDB(tmp_path / "r.duckdb") as db:
        with pytest.raises(RuntimeError if stop == "fail_on" else KeyboardInterrupt):
            run_experiment(Scripted(loaded, SCRIPT, **{stop: 3}), records, db, progress=False)
        [run] = db.runs("scripted")
        assert run["status"] == status and run["finished_at"] is not None
        assert db.completed_images(run["run_id"]) == {1, 2}
        resumed = Scripted(loaded, SCRIPT)
        summary = run_experiment(resumed, records, db, progress=False)
        assert resumed.processed == [3, 4, 5, 6] and summary.run_id == run["run_id"]
        assert db.runs("scripted")[0]["status"] == "complete"


def test_a_skip_carrying_its_own_skipped_rows_is_refused(tmp_path, loaded_models):
    class OwnRows(Scripted):
        def process(self, record, run_id):
            outcome = super().process(record, run_id)
            rows = pa.table({"run_id": [run_id], "image_id": [record.image_id], "reason": ["x"]})
            return ImageOutcome.skip(outcome.skip_reason, None, {**outcome.tables, "skipped": rows})

    with ResultsDB(tmp_path / "r.duckdb") as db:
        with pytest.raises(ValueError, match="must not carry its own skipped rows"):
            run_experiment(
                OwnRows(loaded_models["llava-1.5"], {1: SkipReason.GRAYSCALE}), _records(1), db, progress=False
            )
        assert db.sql("SELECT count(*) FROM skipped")[0][0] == 0


def test_skip_reasons_are_one_enumeration_of_stored_codes():
    values = [reason.value for reason in SkipReason]
    assert len(values) == len(set(values))
    assert {"unreadable", "truncated", "too_large", "object_outside_view"} <= set(values)
    assert "object_cropped" not in values  # unified with blocking's object_outside_view
    assert str(SkipReason.GRAYSCALE) == f"{SkipReason.GRAYSCALE}" == "grayscale"
    assert SkipReason("no_question") is SkipReason.NO_QUESTION


def test_summary_line_is_the_same_for_every_experiment():
    summary = RunSummary("blocking-x", "blocking", 5, 1, 2, 3, {"no_question": 1, "baseline_incorrect": 1})
    assert summary.line("r.duckdb") == (
        "run blocking-x: 5 images selected, 4 written (2 kept, 2 skipped: 1 baseline_incorrect, 1 no_question), "
        "1 already complete; 3 kept in total -> r.duckdb"
    )
    lens = RunSummary("lens-y", "lens", 2, 2, 0, 2)
    assert lens.line("r.duckdb") == (
        "run lens-y: 2 images selected, 0 written (0 kept, 0 skipped), 2 already complete; 2 kept in total -> r.duckdb"
    )
