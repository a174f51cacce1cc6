"""Many processes, one results database: shards, completion markers, and the final merge.

Torch-free: no torch.distributed, no process-group initialisation. A launcher starts N
copies of the same command; each copy learns its place from the environment:

- `RANK` / `WORLD_SIZE` / `LOCAL_RANK`, set by torchrun and `accelerate launch` (and by
  `srun torchrun ...` under SLURM, one torchrun per node). These win when present.
- otherwise `SLURM_PROCID` / `SLURM_STEP_NUM_TASKS` / `SLURM_LOCALID`, set by `srun` for
  every task of a job step. (Not `SLURM_NTASKS` alone: a batch script's own shell sees the
  job's task count too, but runs as one process; it must not wait for N-1 others.)
- neither: one process, which writes the target database itself.

The scheme of a launch with WORLD_SIZE = N > 1 and target `results.duckdb`:

1. Every rank takes its share of the selected images (`shard_records`: image ids sorted,
   every N-th from its rank on; disjoint, complete, balanced, independent of the order the
   images were listed in) and writes it into its own DuckDB file beside the target,
   `results.shard-RR-of-NN.duckdb` (DuckDB allows one writer per file). Results of one image
   are one transaction, so a killed rank loses at most its image in flight, and a relaunch
   of the same command resumes every shard where it stopped.
2. A rank that finishes writes `<shard>.done` (JSON: rank, world size, launch id, a hash of
   its share of image ids, run id, what it wrote); a rank that fails writes `<shard>.failed`
   with the error's first line. Each rank deletes its own old markers when it starts.
3. Rank 0, after its own share, waits for the `.done` of every other rank that matches this
   launch: same world size, same share, same run id (the same command), and the same
   launch id where the launcher gives one (torchrun's `TORCHELASTIC_RUN_ID`, or SLURM job
   and step). A stale marker of an earlier, different launch never counts. It gives up
   with one error line after `LLAVA_INTERP_SHARD_TIMEOUT` seconds (default 3600), or as
   soon as a rank reports failure; the shards stay, and relaunching resumes them.
4. Rank 0 then merges every shard into the target (`db.merge.merge_databases`: idempotent,
   so a relaunch after a killed merge finishes it). The shards and markers are kept; they
   can be deleted once the target is merged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from collector.errors import UserError, first_line

R = TypeVar("R")
S = TypeVar("S")

DEFAULT_TIMEOUT_S = 3600.0
TIMEOUT_ENV = "LLAVA_INTERP_SHARD_TIMEOUT"


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a launch: rank of world_size, and where that came from."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"  # 'torchrun' (also accelerate), 'slurm' or 'single'
    launch_id: str | None = None  # same in every process of one launch, where the launcher says

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        """'rank 1/4' (empty for a single process), to prefix what a process reports."""
        return f"rank {self.rank}/{self.world_size}" if self.world_size > 1 else ""

    def default_device(self) -> str | None:
        """The GPU of this process when several share a machine with CUDA (LOCAL_RANK, modulo
        the GPUs it can see); None, the loader's own default, otherwise."""
        if self.world_size == 1:
            return None
        import torch  # imported here only: the rest of this module works without torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return f"cuda:{self.local_rank % count}" if count else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProcessGroup:
        """The process group the launcher set up (see the module doc for the precedence)."""
        env = os.environ if environ is None else environ
        rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        if rank is not None or world is not None:
            if rank is None or world is None:
                missing = "RANK" if rank is None else "WORLD_SIZE"
                raise UserError(
                    f"{missing} is not set but {'WORLD_SIZE' if rank is None else 'RANK'} is: "
                    "launch with torchrun or accelerate launch, or unset both"
                )
            local = _env_int(env, "LOCAL_RANK")
            source = "torchrun"
        else:
            rank, world = _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_STEP_NUM_TASKS")
            if rank is None or world is None:
                return cls()
            local = _env_int(env, "SLURM_LOCALID")
            source = "slurm"
        if world < 1 or not 0 <= rank < world:
            raise UserError(f"process rank {rank} is not within a world of {world} processes ({source} environment)")
        return cls(rank, world, local if local is not None else 0, source if world > 1 else "single", _launch_id(env))


def _launch_id(env: Mapping[str, str]) -> str | None:
    run_id = env.get("TORCHELASTIC_RUN_ID", "").strip()
    if run_id and run_id != "none":  # torchrun's default id when none was given
        return f"torchrun:{run_id}"
    job, step = env.get("SLURM_JOB_ID", "").strip(), env.get("SLURM_STEP_ID", "").strip()
    if job and step:
        return f"slurm:{job}.{step}"
    return None


# -- sharding -------------------------------------------------------------------------------


def _image_id(record: Any) -> int:
    return record.image_id


def shard_records(records: Iterable[R], rank: int, world_size: int, key: Callable[[R], Any] = _image_id) -> list[R]:
    """This rank's share of `records`: the distinct keys (image ids) sorted, every
    world_size-th from position `rank` on. Records sharing a key go to the same rank.

    Shares are disjoint, together complete, differ in size by at most one key, and do not
    depend on the order the records arrive in. The share keeps the records' input order.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within a world of {world_size}")
    records = list(records)
    keys = sorted({key(record) for record in records})
    mine = set(keys[rank::world_size])
    return [record for record in records if key(record) in mine]


def shard_db_path(target: str | Path, rank: int, world_size: int) -> Path:
    """The shard file of `rank` beside `target`: results.duckdb -> results.shard-01-of-04.duckdb."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within a world of {world_size}")
    target = Path(target)
    width = max(2, len(str(world_size)))
    suffix = target.suffix
    stem = target.name[: -len(suffix)] if suffix else target.name
    return target.with_name(f"{stem}.shard-{rank:0{width}d}-of-{world_size:0{width}d}{suffix}")


def done_marker(shard: Path) -> Path:
    return shard.with_name(shard.name + ".done")


def failed_marker(shard: Path) -> Path:
    return shard.with_name(shard.name + ".failed")


def _share_hash(records: Sequence[Any], key: Callable[[Any], Any]) -> str:
    keys = sorted({key(record) for record in records})
    return hashlib.sha256(json.dumps(keys, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, default=str, sort_keys=True))
    os.replace(tmp, path)  # atomic: a reader never sees half a marker


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- running a sharded launch ------------------------------------------------------------------


@dataclass(frozen=True)
class ShardedOutcome(Generic[S]):
    """What this process did: its group, the file it wrote, run_one's summary, and on rank 0
    of a multi-process launch the merge report."""

    group: ProcessGroup
    db_path: Path
    summary: S
    merge: Any = None  # db.merge.MergeReport


def _timeout(value: float | None) -> float:
    if value is not None:
        return value
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def _summary_fields(summary: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(summary) and not isinstance(summary, type):
        return dataclasses.asdict(summary)
    return {"summary": repr(summary)}


def run_sharded(
    db_path: str | Path,
    records: Sequence[R],
    run_one: Callable[[Path, list[R]], S],
    *,
    group: ProcessGroup | None = None,
    key: Callable[[R], Any] = _image_id,
    timeout: float | None = None,
    poll_s: float = 0.5,
    log: Callable[[str], None] = lambda message: None,
) -> ShardedOutcome[S]:
    """Run `run_one(db_file, my_records)` as this process's part of a launch (module doc).

    One process: run_one on `db_path` with every record. Several: run_one on this rank's
    shard file with this rank's share, then the done marker; rank 0 waits for every other
    rank and merges all shards into `db_path`. run_one must close its database before it
    returns (rank 0 then reads the file), and its summary should have a `run_id` (ranks of
    one launch report the same run; a dataclass summary is recorded in the marker). Raises UserError (one line) when a
    rank fails or does not finish in time; the shards are kept for a relaunch.
    """
    group = ProcessGroup.from_env() if group is None else group
    target = Path(db_path)
    records = list(records)
    if group.world_size == 1:
        return ShardedOutcome(group, target, run_one(target, records))

    from db.merge import merge_databases
    from db.store import ResultsDB

    world = group.world_size
    shard = shard_db_path(target, group.rank, world)
    for marker in (done_marker(shard), failed_marker(shard)):
        marker.unlink(missing_ok=True)
    share = shard_records(records, group.rank, world, key)
    stamp = {"rank": group.rank, "world_size": world, "launch": group.launch_id, "share": _share_hash(share, key)}
    try:
        if group.is_main:  # a target that cannot be written fails now, not after the work
            ResultsDB(target).close()
        summary = run_one(shard, share)
    except BaseException as error:
        _write_json(failed_marker(shard), {**stamp, "error": first_line(error)})
        raise
    run_id = getattr(summary, "run_id", None)
    _write_json(done_marker(shard), {**stamp, "run_id": run_id, **_summary_fields(summary)})
    if not group.is_main:
        return ShardedOutcome(group, shard, summary)

    expected = {
        rank: {
            "rank": rank,
            "world_size": world,
            "launch": group.launch_id,
            "share": _share_hash(shard_records(records, rank, world, key), key),
            "run_id": run_id,
        }
        for rank in range(1, world)
    }
    _wait_for_ranks(target, world, expected, _timeout(timeout), poll_s, log)
    shards = [shard_db_path(target, rank, world) for rank in range(world)]
    log(f"{group.label}: all {world} ranks done; merging their shards into {target}")
    report = merge_databases(shards, target)
    return ShardedOutcome(group, shard, summary, report)


def _wait_for_ranks(
    target: Path,
    world: int,
    expected: dict[int, dict[str, Any]],
    timeout: float,
    poll_s: float,
    log: Callable[[str], None],
) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(expected)
    announced = False
    while True:
        for rank in sorted(waiting):
            shard = shard_db_path(target, rank, world)
            want = expected[rank]
            failed = _read_json(failed_marker(shard))
            if failed is not None and all(failed.get(k) == want[k] for k in ("world_size", "launch", "share")):
                raise UserError(
                    f"rank {rank} failed ({failed.get('error')}); the shards are kept: "
                    "relaunch the same command to resume"
                )
            done = _read_json(done_marker(shard))
            if done is not None and all(done.get(k) == v for k, v in want.items()):
                waiting.discard(rank)
        if not waiting:
            return
        if time.monotonic() >= deadline:
            ranks = ", ".join(str(r) for r in sorted(waiting))
            raise UserError(
                f"waited {timeout:g} s for rank(s) {ranks} of {world} to finish "
                f"(no matching {done_marker(shard_db_path(target, min(waiting), world)).name}); "
                f"the shards are kept: relaunch the same command to resume, or merge them by hand "
                f"with 'llava-interp db merge' (wait longer: {TIMEOUT_ENV}=SECONDS)"
            )
        if not announced:
            log(f"rank 0/{world}: waiting for rank(s) {', '.join(str(r) for r in sorted(waiting))} to finish")
            announced = True
        time.sleep(poll_s)


# -- one entry point for every collect command ---------------------------------------------------


def run_collect(
    db_path: str | Path,
    records: Sequence[R],
    run_one: Callable[[Any, list[R], ProcessGroup], S],
    *,
    echo: Callable[..., None] = print,
    refuse_sharded: str | None = None,
    group: ProcessGroup | None = None,
) -> ShardedOutcome[S]:
    """What every `collect` command does with its images: run `run_one(db, share, group)`
    on this process's share (all of them for one process) with its database open, shard
    and merge as `run_sharded` does, then print the summary line (prefixed with the rank)
    and the merge report.

    refuse_sharded: when given and the launch has several processes, this one-line
    UserError is raised before anything is opened or loaded (e.g. a limit on kept images,
    which shards cannot share).
    """
    group = ProcessGroup.from_env() if group is None else group
    if refuse_sharded is not None and group.world_size > 1:
        raise UserError(refuse_sharded)

    def one(path: Path, share: list[R]) -> S:
        from db.store import ResultsDB

        # The database opens before the model loads: a locked or newer file fails fast.
        with ResultsDB(path) as db:
            return run_one(db, share, group)

    outcome = run_sharded(db_path, records, one, group=group, log=lambda line: echo(line, err=True))
    echo(f"{group.label + ': ' if group.label else ''}{outcome.summary.report(outcome.db_path)}")
    for line in outcome.merge.lines() if outcome.merge else ():
        echo(line)
    return outcome


def refuse_several_processes(what: str, group: ProcessGroup | None = None) -> None:
    """A one-line UserError when this launch has several processes and `what` cannot be sharded."""
    group = ProcessGroup.from_env() if group is None else group
    if group.world_size > 1:
        raise UserError(
            f"{what} runs as one process, not {group.world_size} ({group.source}): launch it without torchrun/srun"
        )
