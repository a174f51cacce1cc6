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
   skipped image, its `skipped` row; an image is either completely written or absent.
   Pipelined (`loader_workers` > 0): loader threads decode each image (`record.load()`) and
   run `Experiment.prepare` ahead of the model, in order, a bounded number ahead; one writer
   thread owns the database and builds (deferred tables), encodes and inserts each finished
   image while the model works on the next. An image whose loading raises an error with a
   `SkipReason` `reason` (`collector.images.ImageUnusable`: unreadable, truncated, too large)
   becomes a recorded skip. Batching (`batch_size` > 1): consecutive images with equal
   `Experiment.batch_key` go through one `Experiment.process_batch`; a device out-of-memory
   error halves the batch and retries (runs.config.oom_events);
4. the run's status: complete, interrupted (Ctrl-C; re-raised) or failed (any other error);
5. one `RunSummary`, printed the same way by every CLI (`RunSummary.line`).

Sharding over processes (RANK / WORLD_SIZE) wraps this: every `collect` command runs
`collector.distributed.run_collect`, which gives each process its share of the images.

Why one ~670-line module: the loop, its loader and writer threads and the out-of-memory
retry share one piece of state (the run's counts, queues and stop/drain rules); split apart,
their shutdown order (drain the writer after an error, cancel the loader) would be spread
over modules that must still change together.
"""

from __future__ import annotations

import dataclasses
import enum
import queue
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from tqdm.auto import tqdm

from collector.errors import UserError
from collector.images import ImageRecord, ImageUnusable
from collector.loading import LoadedModel
from collector.tables import run_image_marker, skipped_table
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
        runner adds the `skipped` row of a skipped image itself). A `DeferredTables` is
        built when first read, in the runner's writer thread, so that building Arrow
        tables and encoding pictures overlap the next images' model work.
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


class DeferredTables(Mapping):
    """Tables of one image built on first read by `build()` (then kept), e.g. in the writer
    thread; the build must use only CPU data and thread-safe objects."""

    def __init__(self, build: Callable[[], Mapping[str, pa.Table]]) -> None:
        self._build: Callable[[], Mapping[str, pa.Table]] | None = build
        self._tables: Mapping[str, pa.Table] = {}

    def _built(self) -> Mapping[str, pa.Table]:
        if self._build is not None:
            self._tables, self._build = dict(self._build()), None
        return self._tables

    def __getitem__(self, name: str) -> pa.Table:
        return self._built()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())


def unusable_reason(error: BaseException) -> SkipReason | None:
    """The skip reason an exception from loading an image carries, or None (a real error)."""
    reason = getattr(error, "reason", None)
    try:
        return SkipReason(str(reason)) if reason is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class _LoadedRecord(ImageRecord):
    """An `ImageRecord` whose image was decoded ahead (by the loader): `load()` returns that
    image, or raises the error decoding it raised, without reading the file again."""

    decoded: Any = field(default=None, compare=False, repr=False)
    load_error: BaseException | None = field(default=None, compare=False, repr=False)

    def load(self) -> Any:
        if self.load_error is not None:
            raise self.load_error
        return self.decoded


@dataclass(frozen=True)
class PreparedImage:
    """One image as the loader hands it to the model loop.

    record: the image (its `load()` returns the already decoded picture).
    inputs: what `Experiment.prepare` returned (None when the experiment prepares nothing).
    batch_key: images with equal non-None keys may share one `process_batch` call (the
        lens: the input sequence length T, since one forward takes (B, T) input ids).
    unusable: the error that makes the image a recorded skip (`unusable_reason`), if any.
    """

    record: ImageRecord
    inputs: Any = None
    batch_key: Hashable | None = None
    unusable: BaseException | None = None


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

    def prepare(self, record: ImageRecord) -> Any:
        """Work on one image that needs no model and can run ahead in a loader thread
        (e.g. the processor's preprocessing); `record.load()` returns the decoded image.
        Default: nothing (None). Must be thread-safe."""
        return None

    def batch_key(self, inputs: Any) -> Hashable | None:
        """Images whose prepared inputs have equal keys may be processed as one batch;
        None (the default) never batches."""
        return None

    @abstractmethod
    def process(self, record: ImageRecord, run_id: str) -> ImageOutcome:
        """Every row of one image of run `run_id`, or its skip."""

    def process_batch(self, images: Sequence[PreparedImage], run_id: str) -> list[ImageOutcome]:
        """The outcomes of several images with equal batch keys, in order; must equal
        processing each alone. Default: `process` on each. A device out-of-memory error
        raised here makes the runner halve the batch and retry."""
        return [self.process(image.record, run_id) for image in images]


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
    oom_events: tuple[dict[str, Any], ...] = ()  # device out-of-memory retries (runs.config.oom_events)

    @property
    def images_skipped(self) -> int:
        return sum(self.skip_reasons.values())

    @property
    def images_written(self) -> int:
        return self.images_kept + self.images_skipped

    def line(self, db_path: Any) -> str:
        """The one-line report every `collect` command prints."""
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skip_reasons.items()))
        oom = ""
        if self.oom_events:
            oom = f"; batch halved {len(self.oom_events)}x after device out-of-memory (to {self.oom_events[-1]['retry_batch_size']})"
        return (
            f"run {self.run_id}: {self.images_selected} images selected, {self.images_written} written "
            f"({self.images_kept} kept, {self.images_skipped} skipped{': ' + reasons if reasons else ''}), "
            f"{self.images_already_complete} already complete; {self.images_kept_total} kept in total{oom} -> {db_path}"
        )

    def report(self, db_path: Any) -> str:
        """`line`, then, when images were skipped now, the SQL that lists them."""
        if not self.images_skipped:
            return self.line(db_path)
        return (
            f"{self.line(db_path)}\nlist the skipped images: "
            f"SELECT image_id, reason, detail FROM skipped WHERE run_id = '{self.run_id}'"
        )


def run_config(
    experiment: Experiment, identity: Mapping[str, Any], limit: int | None, extra_config: Mapping[str, Any] | None
) -> dict[str, Any]:
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


DEFAULT_LOADER_WORKERS = 2


def run_experiment(
    experiment: Experiment,
    records: Sequence[ImageRecord],
    db: ResultsDB,
    limit: int | None = None,
    extra_config: Mapping[str, Any] | None = None,
    progress: bool = True,
    strict: bool = False,
    retry_skipped: bool = False,
    batch_size: int = 1,
    loader_workers: int = DEFAULT_LOADER_WORKERS,
) -> RunSummary:
    """Run `experiment` over `records` into `db`, resuming a run with the same identity.

    `limit` counts kept images of the run (earlier invocations included): selection,
    skips and curation drop images, so the loop stops once `limit` images were kept.

    `batch_size`: at most this many consecutive images with equal `Experiment.batch_key`
    go through one `process_batch` call (halved for the rest of the run after a device
    out-of-memory error, recorded in runs.config.oom_events). Results do not change.

    `loader_workers`: threads that decode and `prepare` the next images while the model
    works; with any, one writer thread also builds and inserts the finished images while
    the model works. 0: no pipelining (load, compute and write one after another here).

    An image file that cannot be used (`ImageUnusable`) is recorded in `skipped` and the
    run goes on; `strict` stops the run at it instead (UserError). A resumed run passes over
    its skipped images; `retry_skipped` processes those skipped for their file
    (`FILE_SKIP_REASONS`) again.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if loader_workers < 0:
        raise ValueError("loader_workers must be at least 0")
    run_config_extra = {**(extra_config or {}), "batch_size": batch_size, "loader_workers": loader_workers}
    run = _Run(experiment, db, limit, progress, batch_size, loader_workers, strict, retry_skipped)
    return run.run(records, run_config_extra)


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError)  # torch.cuda.OutOfMemoryError is the same class


class _Loader:
    """The pending images in order as `PreparedImage`s, decoded and prepared up to `depth`
    images ahead by `workers` threads (0: one at a time, when asked for, in the caller's thread)."""

    def __init__(self, experiment: Experiment, records: Sequence[ImageRecord], workers: int, depth: int) -> None:
        self.experiment = experiment
        self.records = records
        self.workers = workers
        self.depth = max(depth, workers)

    def prepare(self, record: ImageRecord) -> PreparedImage:
        try:
            image, error = record.load(), None
        except Exception as load_error:  # kept: the experiment meets it if it loads the image
            image, error = None, load_error
        fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(ImageRecord)}
        loaded = _LoadedRecord(**fields, decoded=image, load_error=error)
        if error is not None:
            return PreparedImage(loaded, unusable=error if unusable_reason(error) else None)
        try:
            inputs = self.experiment.prepare(loaded)
        except Exception as prepare_error:
            if unusable_reason(prepare_error) is None:
                raise
            return PreparedImage(loaded, unusable=prepare_error)
        return PreparedImage(loaded, inputs, self.experiment.batch_key(inputs))

    def __iter__(self) -> Iterator[PreparedImage]:
        if self.workers == 0:
            for record in self.records:
                yield self.prepare(record)
            return
        remaining = iter(self.records)
        executor = ThreadPoolExecutor(self.workers, thread_name_prefix="llava-interp-loader")
        ahead: deque[Future] = deque()
        try:
            for record in remaining:
                ahead.append(executor.submit(self.prepare, record))
                if len(ahead) >= self.depth:
                    break
            while ahead:
                prepared = ahead.popleft().result()  # in order; re-raises the worker's error
                following = next(remaining, None)
                if following is not None:
                    ahead.append(executor.submit(self.prepare, following))
                yield prepared
        finally:  # a stopped run: drop what was not started, wait for what was (milliseconds)
            executor.shutdown(wait=True, cancel_futures=True)


class _Writer:
    """Applies write jobs (functions of the database) in order.

    Threaded: one thread owns the database for the whole loop (DuckDB connections are
    used from one thread at a time), fed through a bounded queue so finished images wait
    in memory only a few at a time. A failed job stops the writer; its error is raised in
    the caller's thread by the next `submit` or by `close`, and nothing after it is
    written. Inline: each job runs in `submit`.
    """

    _STOP = object()

    def __init__(self, db: ResultsDB, threaded: bool, depth: int) -> None:
        self.db = db
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.jobs: queue.Queue = queue.Queue(maxsize=max(1, depth))
        if threaded:
            self.thread = threading.Thread(target=self._loop, name="llava-interp-writer", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is self._STOP:
                return
            if self.error is None:  # after a failure, queued jobs are dropped, not written
                try:
                    job(self.db)
                except BaseException as error:  # surfaced in the caller's thread
                    self.error = error

    def _raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def submit(self, job: Callable[[ResultsDB], None]) -> None:
        if self.thread is None:
            job(self.db)
            return
        self._raise_error()
        while True:
            try:
                self.jobs.put(job, timeout=0.1)
                return
            except queue.Full:
                self._raise_error()

    def close(self, raise_error: bool = True) -> None:
        """Write what is queued (unless a job failed), stop the thread and wait for it;
        then raise the failed job's error (if `raise_error`). A second Ctrl-C while waiting
        does not leave the thread writing behind the caller's back."""
        if self.thread is None:
            return
        interrupted = False
        while True:
            try:
                self.jobs.put(self._STOP)
                break
            except KeyboardInterrupt:
                interrupted = True
        while self.thread.is_alive():
            try:
                self.thread.join()
            except KeyboardInterrupt:
                interrupted = True
                self.error = self.error or KeyboardInterrupt()
        self.thread = None
        if raise_error:
            self._raise_error()
        if interrupted:
            raise KeyboardInterrupt


class _Run:
    """One invocation of `run_experiment` (state shared by its steps)."""

    def __init__(
        self,
        experiment: Experiment,
        db: ResultsDB,
        limit: int | None,
        progress: bool,
        batch_size: int = 1,
        loader_workers: int = 0,
        strict: bool = False,
        retry_skipped: bool = False,
    ) -> None:
        self.experiment = experiment
        self.db = db
        self.limit = limit
        self.progress = progress
        self.batch_size = batch_size
        self.loader_workers = loader_workers
        self.kept = 0
        self.kept_total = 0
        self.skip_reasons: dict[str, int] = {}
        self.strict = strict
        self.retry_skipped = retry_skipped
        self.oom_events: list[dict[str, Any]] = []
        # Seconds inside the experiment's process/process_batch (the model's share of the loop).
        self.compute_s = 0.0

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
            run_id,
            experiment.name,
            len(selected),
            already,
            self.kept,
            self.kept_total,
            dict(self.skip_reasons),
            tuple(self.oom_events),
        )

    def _pending(self, selected: Sequence[ImageRecord], done: set[int]) -> list[ImageRecord]:
        """The selected images not yet complete in this run, in order. (Sharding over
        processes happens before: each process runs on its share, `collector.distributed`.)"""
        return [record for record in selected if record.image_id not in done]

    def _limit_reached(self) -> bool:
        return self.limit is not None and self.kept_total >= self.limit

    def _room(self) -> int:
        """Images the next batch may hold: the batch size, and no more than the kept images
        the limit still allows (so a batch never keeps more than the limit)."""
        if self.limit is None:
            return self.batch_size
        return max(1, min(self.batch_size, self.limit - self.kept_total))

    def _run_images(self, run_id: str, pending: Iterable[ImageRecord]) -> None:
        """Process and write the pending images, one transaction per image, until `limit` kept.

        Loader threads decode and prepare images ahead; consecutive images with equal batch
        keys form batches; the writer writes each outcome while the next batch computes.
        """
        pending = list(pending)
        # With a limit the bar counts kept images towards it; without one, images processed.
        bar = tqdm(
            total=len(pending) if self.limit is None else self.limit,
            initial=0 if self.limit is None else min(self.kept_total, self.limit),
            desc=self.experiment.label,
            unit="image",
            disable=not self.progress,
        )
        threaded = self.loader_workers > 0
        loader = iter(_Loader(self.experiment, pending, self.loader_workers, 2 * self.loader_workers + self.batch_size))
        writer = self._writer = _Writer(self.db, threaded, depth=2 * self.batch_size + 2)
        batch: list[PreparedImage] = []
        try:
            for prepared in loader:
                if batch and (
                    len(batch) >= self._room() or prepared.batch_key is None or prepared.batch_key != batch[0].batch_key
                ):
                    self._finish(run_id, batch, writer, bar)
                    batch = []
                if self._limit_reached():
                    break
                if prepared.unusable is not None:
                    self._finish(run_id, [prepared], writer, bar)
                else:
                    batch.append(prepared)
            if batch and not self._limit_reached():
                self._finish(run_id, batch, writer, bar)
        except BaseException:
            loader.close()
            writer.close(raise_error=False)  # what was computed before the error is written
            raise
        else:
            loader.close()
            writer.close()
        finally:
            bar.close()

    def _finish(self, run_id: str, batch: list[PreparedImage], writer: _Writer, bar: Any) -> None:
        """Process one batch (or one unusable image) and hand its outcomes to the writer."""
        if batch[0].unusable is not None:
            outcomes = [self._unusable_outcome(run_id, batch[0], self.strict)]
        else:
            try:
                outcomes = self._process(batch, run_id)
            except ImageUnusable as error:  # the experiment itself loaded the file
                if len(batch) > 1:
                    raise
                outcomes = [self._unusable_outcome(run_id, PreparedImage(batch[0].record, unusable=error), self.strict)]
        for prepared, outcome in zip(batch, outcomes, strict=True):
            writer.submit(self._write_job(run_id, prepared.record, outcome))
            if outcome.kept:
                self.kept += 1
                self.kept_total += 1
            else:
                reason = str(outcome.skip_reason)
                self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1
            if outcome.kept or self.limit is None:
                bar.update(1)
            bar.set_postfix(kept=self.kept_total, skipped=sum(self.skip_reasons.values()))

    def _process(self, batch: list[PreparedImage], run_id: str) -> list[ImageOutcome]:
        """The experiment's outcomes of one batch; on a device out-of-memory error the batch
        is halved (for the rest of the run too), the event recorded, and both halves retried."""
        start = time.perf_counter()
        try:
            if len(batch) == 1 and type(self.experiment).process_batch is Experiment.process_batch:
                return [self.experiment.process(batch[0].record, run_id)]
            return self.experiment.process_batch(batch, run_id)
        except Exception as error:
            if len(batch) == 1 or not _is_out_of_memory(error):
                raise
        finally:
            self.compute_s += time.perf_counter() - start
        # Out of the except block: the error's traceback (and its tensors) are freed first.
        _empty_device_cache()
        half = len(batch) // 2
        self.batch_size = min(self.batch_size, half)
        event = {
            "batch_size": len(batch),
            "retry_batch_size": half,
            "image_ids": [prepared.record.image_id for prepared in batch],
            "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self.oom_events.append(event)
        tqdm.write(
            f"device out of memory with a batch of {len(batch)} images; retrying with batches of {half}",
            file=sys.stderr,
        )
        self._record_oom_event(run_id, event)
        return self._process(batch[:half], run_id) + self._process(batch[half:], run_id)

    def _record_oom_event(self, run_id: str, event: dict[str, Any]) -> None:
        """runs.config.oom_events gets the event, through the writer (which owns the database)."""
        self._writer.submit(lambda db: db.append_run_config_entry(run_id, "oom_events", event))

    @staticmethod
    def _unusable_outcome(run_id: str, prepared: PreparedImage, strict: bool = False) -> ImageOutcome:
        """A recorded skip of an image that cannot be used (unreadable, truncated, too large):
        a marker without positions or grid, and the reason the loader met; with `strict`, the
        end of the run (UserError)."""
        error = prepared.unusable
        if strict:
            detail = getattr(error, "detail", None) or str(error)
            raise UserError(f"cannot read image {prepared.record.path}: {detail} (--strict)")
        detail = getattr(error, "detail", None) or str(error)
        marker = run_image_marker(run_id, prepared.record.image_id, 0, None, None)
        return ImageOutcome.skip(unusable_reason(error), detail, {"run_images": marker})

    def _write_job(self, run_id: str, record: ImageRecord, outcome: ImageOutcome) -> Callable[[ResultsDB], None]:
        def write(db: ResultsDB) -> None:
            db.add_image(
                record.image_id, record.file_name, record.width, record.height, record.source, record.annotations
            )
            db.write_image_results(run_id, record.image_id, self._tables(run_id, record, outcome))

        return write

    @staticmethod
    def _tables(run_id: str, record: ImageRecord, outcome: ImageOutcome) -> Mapping[str, pa.Table]:
        """The outcome's tables, plus the `skipped` row of a skipped image."""
        tables = outcome.tables
        if outcome.kept:
            return tables
        if "skipped" in tables:
            raise ValueError("an experiment's skip outcome must not carry its own skipped rows")
        row = skipped_table(run_id, record.image_id, outcome.skip_reason, outcome.skip_detail)
        return {**tables, "skipped": row}
