"""The experiment loop, written once: run identity, resume, one transaction per image, status.

An experiment (logit lens, token ablation, attention blocking) supplies only its per-image
work as an `Experiment`:

    identity()        the settings that change its results (what a rerun must match to resume)
    provenance()      further settings recorded in runs.config, not part of the identity
    select(records)   the candidate images, in the order they are processed
    process(record, run_id) -> ImageOutcome
                      every row of one image (its `run_images` marker included), kept or
                      skipped with a `SkipReason`

`run_experiment(experiment, records, db, limit=..., ...)` does the rest, the same way for
every experiment:

1. run identity + provenance (the loaded model's, the experiment's, the read-out's weight
   hash `readout_sha256`, the caller's) -> `db.start_run` (reopens a matching run);
2. selection, then resume: images already complete in this run (`db.completed_images`)
   are passed over; `limit` counts kept images of the run, earlier invocations included;
3. one transaction per image (`db.write_image_results`): the outcome's tables plus, for a
   skipped image, its `skipped` row; an image is either completely written or absent;
4. the run's status: complete, interrupted (Ctrl-C; re-raised) or failed (any other error);
5. one `RunSummary`, printed the same way by every CLI (`RunSummary.line`).

Where later work lands (one place each):
- unreadable / truncated / too-large images: `_process` (wrap `experiment.process`; the
  reasons `SkipReason.UNREADABLE`, `TRUNCATED`, `TOO_LARGE` exist already);
- sharding over processes (RANK / WORLD_SIZE): `_pending` (after resume, before the limit);
- a pipelined loader / writer and batching: `_run_images` owns the iteration over records
  and the write of each outcome.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import pyarrow as pa
from tqdm.auto import tqdm

from collector.errors import UserError
from collector.images import ImageRecord, ImageUnusable
from collector.loading import LoadedModel
from collector.tables import skipped_table
from db.store import ResultsDB


class SkipReason(str, enum.Enum):
    """Why an image was left out of an experiment: the `skipped.reason` codes of every experiment.

    `skipped.reason` is free text, so databases written before a code was renamed stay
    readable; renamed codes: `object_cropped` (ablation, before this enumeration) is now
    `object_outside_view`.
    """

    # The image file itself (reserved for the runner's skip-and-record of bad files).
    UNREADABLE = "unreadable"
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"
    # What the experiment needs from its inputs.
    NO_QUESTION = "no_question"  # the questions file has no (ablation: or an empty) entry for the image
    EMPTY_QUESTION_LIST = "empty_question_list"  # blocking: the entry lists no question
    GRAYSCALE = "grayscale"
    OBJECT_OUTSIDE_VIEW = "object_outside_view"  # the target object is cut away by the model's crop
    CLASS_TOKEN_UNKNOWN = "class_token_unknown"  # the class name's first token is not in the vocabulary
    # Curation: the unmodified model must get the image right.
    BASELINE_INCORRECT = "baseline_incorrect"
    NOISE_STILL_CORRECT = "noise_still_correct"  # ablation: still right with the image noised

    def __str__(self) -> str:
        return self.value


# Reasons about the image file itself: what `--retry-skipped` processes again.
FILE_SKIP_REASONS = (SkipReason.UNREADABLE, SkipReason.TRUNCATED, SkipReason.TOO_LARGE)


@dataclass(frozen=True)
class ImageOutcome:
    """What one image produced.

    tables: table name -> Arrow rows of this image, its `run_images` marker included (the
        runner adds the `skipped` row of a skipped image itself).
    skip_reason: None when the image was kept (the experiment ran on it).
    """

    tables: Mapping[str, pa.Table]
    skip_reason: SkipReason | None = None
    skip_detail: str | None = None

    @classmethod
    def keep(cls, tables: Mapping[str, pa.Table]) -> ImageOutcome:
        return cls(tables)

    @classmethod
    def skip(cls, reason: SkipReason, detail: str | None, tables: Mapping[str, pa.Table]) -> ImageOutcome:
        return cls(tables, SkipReason(reason), detail)

    @property
    def kept(self) -> bool:
        return self.skip_reason is None


class Experiment(ABC):
    """The per-image work of one experiment; `run_experiment` runs it."""

    name: ClassVar[str]  # runs.experiment
    label: ClassVar[str]  # progress bar

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """The settings that change results; a rerun with the same identity resumes the run."""

    def provenance(self) -> dict[str, Any]:
        """Further settings recorded in runs.config (not part of the identity)."""
        return {}

    def select(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        """The images to process, in order (default: all of them, as given)."""
        return list(records)

    @abstractmethod
    def process(self, record: ImageRecord, run_id: str) -> ImageOutcome:
        """Every row of one image of run `run_id`, or its skip."""


@dataclass(frozen=True)
class RunSummary:
    """What one invocation did. Kept and skipped counts are of this invocation unless named `_total`."""

    run_id: str
    experiment: str
    images_selected: int  # candidates after the experiment's selection
    images_already_complete: int  # of the selection, complete from an earlier invocation
    images_kept: int  # written now with results
    images_kept_total: int  # kept images of the run, earlier invocations included
    skip_reasons: dict[str, int] = field(default_factory=dict)  # reason -> images skipped now

    @property
    def images_skipped(self) -> int:
        return sum(self.skip_reasons.values())

    @property
    def images_written(self) -> int:
        return self.images_kept + self.images_skipped

    def line(self, db_path: Any) -> str:
        """The one-line report every `collect` command prints."""
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skip_reasons.items()))
        return (
            f"run {self.run_id}: {self.images_selected} images selected, {self.images_written} written "
            f"({self.images_kept} kept, {self.images_skipped} skipped{': ' + reasons if reasons else ''}), "
            f"{self.images_already_complete} already complete; {self.images_kept_total} kept in total -> {db_path}"
        )

    def report(self, db_path: Any) -> str:
        """`line`, then, when images were skipped now, the SQL that lists them."""
        if not self.images_skipped:
            return self.line(db_path)
        return (f"{self.line(db_path)}\nlist the skipped images: "
                f"SELECT image_id, reason, detail FROM skipped WHERE run_id = '{self.run_id}'")


def run_config(experiment: Experiment, identity: Mapping[str, Any], limit: int | None,
               extra_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """runs.config: how the model was loaded, the identity, the experiment's provenance, the
    read-out's weight hash (computed once per run), the limit, then the caller's entries."""
    loaded = experiment.loaded
    return {
        **loaded.provenance,
        **identity,
        **experiment.provenance(),
        "readout_sha256": loaded.adapter.readout().sha256(),
        "limit": limit,
        **(extra_config or {}),
    }


def run_experiment(
    experiment: Experiment,
    records: Sequence[ImageRecord],
    db: ResultsDB,
    limit: int | None = None,
    extra_config: Mapping[str, Any] | None = None,
    progress: bool = True,
    strict: bool = False,
    retry_skipped: bool = False,
) -> RunSummary:
    """Run `experiment` over `records` into `db`, resuming a run with the same identity.

    `limit` counts kept images of the run (earlier invocations included): selection,
    skips and curation drop images, so the loop stops once `limit` images were kept.
    An image file that cannot be used (`ImageUnusable`) is recorded in `skipped` and the
    run goes on; `strict` stops the run at it instead (UserError). A resumed run passes over
    its skipped images; `retry_skipped` processes those skipped for their file
    (`FILE_SKIP_REASONS`) again.
    """
    run = _Run(experiment, db, limit, progress)
    run.strict, run.retry_skipped = strict, retry_skipped
    return run.run(records, extra_config)


class _Run:
    """One invocation of `run_experiment` (state shared by its steps)."""

    def __init__(self, experiment: Experiment, db: ResultsDB, limit: int | None, progress: bool) -> None:
        self.experiment = experiment
        self.db = db
        self.limit = limit
        self.progress = progress
        self.kept = 0
        self.kept_total = 0
        self.skip_reasons: dict[str, int] = {}
        self.strict = False
        self.retry_skipped = False

    def run(self, records: Sequence[ImageRecord], extra_config: Mapping[str, Any] | None) -> RunSummary:
        experiment, db = self.experiment, self.db
        identity = experiment.identity()
        # Selection before the run exists: a bad annotations file leaves no 'running' run behind.
        selected = experiment.select(records)
        config = run_config(experiment, identity, self.limit, extra_config)
        run_id = db.start_run(experiment.name, experiment.loaded.model_id, identity, config)
        if self.retry_skipped:
            db.forget_skipped_images(run_id, [str(reason) for reason in FILE_SKIP_REASONS])
        done = db.completed_images(run_id)
        self.kept_total = len(done - db.skipped_images(run_id))
        already = sum(1 for record in selected if record.image_id in done)
        status = "failed"
        try:
            self._run_images(run_id, self._pending(selected, done))
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            db.finish_run(run_id, status)
        return RunSummary(
            run_id, experiment.name, len(selected), already, self.kept, self.kept_total, dict(self.skip_reasons)
        )

    def _pending(self, selected: Sequence[ImageRecord], done: set[int]) -> list[ImageRecord]:
        """The selected images not yet complete in this run, in order.

        Sharding over processes (RANK / WORLD_SIZE) belongs here; `limit` would then count
        per shard or need a shared count.
        """
        return [record for record in selected if record.image_id not in done]

    def _limit_reached(self) -> bool:
        return self.limit is not None and self.kept_total >= self.limit

    def _run_images(self, run_id: str, pending: Iterable[ImageRecord]) -> None:
        """Process and write each pending image, one transaction per image, until `limit` kept."""
        pending = list(pending)
        # With a limit the bar counts kept images towards it; without one, images processed.
        bar = tqdm(
            total=len(pending) if self.limit is None else self.limit,
            initial=0 if self.limit is None else min(self.kept_total, self.limit),
            desc=self.experiment.label,
            unit="image",
            disable=not self.progress,
        )
        try:
            for record in pending:
                if self._limit_reached():
                    break
                self.db.add_image(
                    record.image_id, record.file_name, record.width, record.height, record.source, record.annotations
                )
                outcome = self._process(record, run_id)
                self.db.write_image_results(run_id, record.image_id, self._tables(run_id, record, outcome))
                if outcome.kept:
                    self.kept += 1
                    self.kept_total += 1
                else:
                    reason = str(outcome.skip_reason)
                    self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1
                if outcome.kept or self.limit is None:
                    bar.update(1)
                bar.set_postfix(kept=self.kept_total, skipped=sum(self.skip_reasons.values()))
        finally:
            bar.close()

    def _process(self, record: ImageRecord, run_id: str) -> ImageOutcome:
        """The experiment's work on one image; an unreadable / truncated / too-large file is a
        recorded skip (or, strict, the end of the run)."""
        try:
            return self.experiment.process(record, run_id)
        except ImageUnusable as error:
            if self.strict:
                raise UserError(f"cannot read image {record.path}: {error.detail} (--strict)") from None
            return ImageOutcome.skip(SkipReason(error.reason), error.detail, {"run_images": file_skip_marker(run_id, record)})

    @staticmethod
    def _tables(run_id: str, record: ImageRecord, outcome: ImageOutcome) -> Mapping[str, pa.Table]:
        """The outcome's tables, plus the `skipped` row of a skipped image."""
        if outcome.kept:
            return outcome.tables
        if "skipped" in outcome.tables:
            raise ValueError("an experiment's skip outcome must not carry its own skipped rows")
        row = skipped_table(run_id, record.image_id, outcome.skip_reason, outcome.skip_detail)
        return {**outcome.tables, "skipped": row}


def file_skip_marker(run_id: str, record: ImageRecord) -> pa.Table:
    """The `run_images` marker of an image skipped for its file: nothing ran (no positions, no grid)."""
    import datetime as dt

    from db.arrow import table_from_columns

    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    return table_from_columns(
        "run_images",
        {"run_id": [run_id], "image_id": [record.image_id], "n_positions": [0], "n_layers": [None],
         "grid_rows": [0], "grid_cols": [0], "written_at": [now]},
    )
