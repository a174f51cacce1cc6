"""Sharding a run over processes: the environment, the shares, the markers, the merge."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_merge import dump, write_images

from collector.distributed import (
    ProcessGroup,
    done_marker,
    failed_marker,
    run_sharded,
    shard_db_path,
    shard_records,
)
from collector.errors import UserError
from db.store import ResultsDB

REPO = Path(__file__).resolve().parents[1]


# -- the environment --------------------------------------------------------------------------


def test_torchrun_and_accelerate_variables():
    group = ProcessGroup.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "abc"})
    assert (group.rank, group.world_size, group.local_rank, group.source) == (3, 4, 1, "torchrun")
    assert group.launch_id == "torchrun:abc" and not group.is_main and group.label == "rank 3/4"


def test_torchrun_variables_win_over_slurm():
    # srun torchrun ...: SLURM_PROCID numbers the node's torchrun, RANK the worker.
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": "0",
        "TORCHELASTIC_RUN_ID": "none",
    }
    group = ProcessGroup.from_env(env)
    assert (group.rank, group.world_size, group.local_rank, group.source) == (5, 8, 1, "torchrun")
    assert group.launch_id == "slurm:77.0"  # torchrun's default 'none' is no launch id


def test_slurm_step_variables():
    env = {
        "SLURM_PROCID": "2",
        "SLURM_STEP_NUM_TASKS": "3",
        "SLURM_NTASKS": "3",
        "SLURM_LOCALID": "2",
        "SLURM_JOB_ID": "9",
        "SLURM_STEP_ID": "1",
    }
    group = ProcessGroup.from_env(env)
    assert (group.rank, group.world_size, group.local_rank, group.source, group.launch_id) == (
        2,
        3,
        2,
        "slurm",
        "slurm:9.1",
    )


def test_a_batch_script_shell_is_one_process():
    # sbatch --ntasks=4 runs the script once, with SLURM_PROCID=0 and SLURM_NTASKS=4 but no step.
    group = ProcessGroup.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9"})
    assert (group.rank, group.world_size, group.source) == (0, 1, "single")
    assert ProcessGroup.from_env({}) == ProcessGroup()
    assert ProcessGroup.from_env({"RANK": "0", "WORLD_SIZE": "1"}).world_size == 1


@pytest.mark.parametrize(
    "env, pattern",
    [
        ({"RANK": "1"}, "WORLD_SIZE is not set"),
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is not within a world of 2"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"SLURM_PROCID": "4", "SLURM_STEP_NUM_TASKS": "4"}, "rank 4 is not within"),
    ],
)
def test_inconsistent_environments_are_one_line_errors(env, pattern):
    with pytest.raises(UserError, match=pattern) as error:
        ProcessGroup.from_env(env)
    assert "\n" not in str(error.value)


# -- shares and paths -------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    image_id: int
    name: str = ""


@pytest.mark.parametrize("world", [1, 2, 3, 7, 12])
def test_shares_are_disjoint_complete_balanced_and_order_free(world):
    rng = random.Random(world)
    ids = rng.sample(range(10**6), 10)
    records = [Record(i) for i in ids]
    shares = [shard_records(records, rank, world) for rank in range(world)]
    owned = [r.image_id for share in shares for r in share]
    assert sorted(owned) == sorted(ids)  # complete and disjoint
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    # The k-th smallest id belongs to rank k mod world, whatever order the records came in.
    for rank, share in enumerate(shares):
        assert {r.image_id for r in share} == {i for k, i in enumerate(sorted(ids)) if k % world == rank}
    for _ in range(5):
        shuffled = records[:]
        rng.shuffle(shuffled)
        again = [shard_records(shuffled, rank, world) for rank in range(world)]
        assert [sorted(r.image_id for r in s) for s in again] == [sorted(r.image_id for r in s) for s in shares]
        # Each share keeps the order the records were listed in.
        for share in again:
            assert share == [r for r in shuffled if r in share]


def test_records_of_one_image_share_a_rank():
    records = [Record(5, "a"), Record(1), Record(5, "b"), Record(2)]
    shares = [shard_records(records, rank, 2) for rank in range(2)]
    assert shares == [[Record(5, "a"), Record(1), Record(5, "b")], [Record(2)]]  # ids 1, 5 | 2
    with pytest.raises(ValueError):
        shard_records(records, 2, 2)


def test_shard_paths():
    assert shard_db_path(Path("out/results.duckdb"), 1, 2) == Path("out/results.shard-01-of-02.duckdb")
    assert shard_db_path("results", 0, 3) == Path("results.shard-00-of-03")
    assert shard_db_path("r.db", 7, 128) == Path("r.shard-007-of-128.db")
    assert len({shard_db_path("r.duckdb", rank, 12) for rank in range(12)}) == 12
    assert done_marker(Path("a/r.shard-00-of-02.duckdb")) == Path("a/r.shard-00-of-02.duckdb.done")


# -- run_sharded, ranks run one after another in this process ---------------------------------


@dataclass(frozen=True)
class Summary:
    run_id: str
    images_written: int


def _writer(experiment: str = "lens", calls: list | None = None):
    def run_one(path: Path, share: list[Record]) -> Summary:
        if calls is not None:
            calls.append((path, [r.image_id for r in share]))
        with ResultsDB(path) as db:
            run_id = write_images(db, experiment, [r.image_id for r in share])
        return Summary(run_id, len(share))

    return run_one


RECORDS = [Record(i) for i in (4, 1, 3, 2)]


def test_one_process_writes_the_target_itself(tmp_path):
    calls = []
    outcome = run_sharded(tmp_path / "r.duckdb", RECORDS, _writer(calls=calls), group=ProcessGroup())
    assert calls == [(tmp_path / "r.duckdb", [4, 1, 3, 2])]
    assert outcome.merge is None and outcome.db_path == tmp_path / "r.duckdb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.duckdb"]


def test_two_ranks_write_shards_and_rank_zero_merges(tmp_path):
    target = tmp_path / "r.duckdb"
    calls = []
    rank1 = run_sharded(
        target, RECORDS, _writer(calls=calls), group=ProcessGroup(1, 2, source="torchrun", launch_id="L")
    )
    assert rank1.merge is None and rank1.db_path == shard_db_path(target, 1, 2)
    assert not target.exists()
    marker = json.loads(done_marker(rank1.db_path).read_text())
    assert marker["run_id"] == rank1.summary.run_id and marker["rank"] == 1 and marker["images_written"] == 2
    rank0 = run_sharded(
        target, RECORDS, _writer(calls=calls), group=ProcessGroup(0, 2, source="torchrun", launch_id="L")
    )
    assert calls == [(shard_db_path(target, 1, 2), [4, 2]), (shard_db_path(target, 0, 2), [1, 3])]
    assert rank0.merge is not None and rank0.merge.images_merged == 4
    single = tmp_path / "single.duckdb"
    with ResultsDB(single) as db:
        write_images(db, "lens", [1, 2, 3, 4])
    assert dump(target) == dump(single)
    # A relaunch of the same command resumes nothing new and merges nothing twice.
    for rank in (1, 0):
        run_sharded(target, RECORDS, _writer(), group=ProcessGroup(rank, 2, source="torchrun", launch_id="L2"))
    assert dump(target) == dump(single)


def test_stale_markers_of_another_launch_do_not_count(tmp_path):
    target = tmp_path / "r.duckdb"
    run_sharded(target, RECORDS, _writer(), group=ProcessGroup(1, 2, launch_id="old"))
    with pytest.raises(UserError, match=r"waited 0.3 s for rank\(s\) 1 of 2 .*relaunch the same command") as error:
        run_sharded(target, RECORDS, _writer(), group=ProcessGroup(0, 2, launch_id="new"), timeout=0.3, poll_s=0.05)
    assert "\n" not in str(error.value)
    # Nor does a marker of another run (another command) or of another selection of images.
    run_sharded(target, RECORDS, _writer("ablation"), group=ProcessGroup(1, 2))
    with pytest.raises(UserError, match="waited"):
        run_sharded(target, RECORDS, _writer(), group=ProcessGroup(0, 2), timeout=0.3, poll_s=0.05)
    run_sharded(target, RECORDS, _writer(), group=ProcessGroup(1, 2))
    with pytest.raises(UserError, match="waited"):
        run_sharded(target, RECORDS[:3], _writer(), group=ProcessGroup(0, 2), timeout=0.3, poll_s=0.05)
    # The shards were kept; with the matching marker the merge happens.
    outcome = run_sharded(target, RECORDS, _writer(), group=ProcessGroup(0, 2), timeout=5, poll_s=0.05)
    assert outcome.merge.images_merged == 4 + 2  # the lens run, and the ablation run rank 1 also wrote
    assert set(outcome.merge.run_status.values()) == {"complete"}


def test_a_failed_rank_stops_the_wait_with_its_error(tmp_path):
    target = tmp_path / "r.duckdb"

    def broken(path, share):
        raise UserError("cannot read image x.png: truncated")

    with pytest.raises(UserError):
        run_sharded(target, RECORDS, broken, group=ProcessGroup(1, 2, launch_id="L"))
    assert "truncated" in failed_marker(shard_db_path(target, 1, 2)).read_text()
    with pytest.raises(UserError, match=r"^rank 1 failed \(cannot read image x.png: truncated\)"):
        run_sharded(target, RECORDS, _writer(), group=ProcessGroup(0, 2, launch_id="L"), timeout=60)
    # The relaunched rank clears its failure marker and the launch completes.
    run_sharded(target, RECORDS, _writer(), group=ProcessGroup(1, 2, launch_id="M"))
    assert not failed_marker(shard_db_path(target, 1, 2)).exists()
    assert run_sharded(target, RECORDS, _writer(), group=ProcessGroup(0, 2, launch_id="M")).merge.images_merged == 4


def test_rank_zero_checks_the_target_before_working(tmp_path):
    notes = tmp_path / "notes.duckdb"
    notes.write_text("my notes")
    calls = []
    from db.errors import DatabaseError

    with pytest.raises(DatabaseError, match="cannot open database"):
        run_sharded(notes, RECORDS, _writer(calls=calls), group=ProcessGroup(0, 2))
    assert calls == [] and notes.read_text() == "my notes"


# -- the logit lens on the tiny model ------------------------------------------------------------


LENS_TABLES = ("runs", "images", "annotations", "positions", "logit_lens", "run_images", "image_views")


def test_sharded_lens_equals_one_process(tmp_path, tiny_checkpoints, demo_images):
    """Both ranks of `collect lens` run here one after the other (rank 1, then rank 0)."""
    from collector.cli import cli

    image_dir, annotation_file = demo_images
    args = [
        "collect",
        "lens",
        "--model",
        str(tiny_checkpoints["llava-1.5"]),
        "--images",
        str(image_dir),
        "--annotations",
        str(annotation_file),
        "--limit",
        "3",
        "--top-k",
        "2",
        "--quiet",
    ]
    single = tmp_path / "single.duckdb"
    result = CliRunner().invoke(cli, [*args, "--db", str(single)], env={"RANK": None, "WORLD_SIZE": None})
    assert result.exit_code == 0, result.output
    target = tmp_path / "sharded.duckdb"
    outputs = {}
    for rank in (1, 0):
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "TORCHELASTIC_RUN_ID": "t"}
        result = CliRunner().invoke(cli, [*args, "--db", str(target)], env=env)
        assert result.exit_code == 0, result.output
        outputs[rank] = result.output
    assert "rank 1/2: run lens-" in outputs[1] and ", 1 written (1 kept" in outputs[1]
    assert str(shard_db_path(target, 1, 2)) in outputs[1]
    assert ", 2 written (2 kept" in outputs[0] and "merged 2 shard(s) into" in outputs[0]
    merged, expected = dump(target), dump(single)
    for table in LENS_TABLES:
        assert merged[table] == expected[table], table
    assert len(expected["run_images"]) == 3


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(tmp_path, tiny_checkpoints, demo_images):
    """torchrun --nproc_per_node 2 -m collector.cli collect lens: the merged database equals
    a single-process run row for row."""
    from collector.cli import cli

    image_dir, annotation_file = demo_images
    args = [
        "collect",
        "lens",
        "--model",
        str(tiny_checkpoints["llava-1.5"]),
        "--images",
        str(image_dir),
        "--annotations",
        str(annotation_file),
        "--limit",
        "4",
        "--top-k",
        "2",
        "--quiet",
    ]
    single = tmp_path / "single.duckdb"
    result = CliRunner().invoke(cli, [*args, "--db", str(single)], env={"RANK": None, "WORLD_SIZE": None})
    assert result.exit_code == 0, result.output

    target = tmp_path / "sharded.duckdb"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "LLAVA_INTERP_SHARD_TIMEOUT": "300",
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        env.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "collector.cli",
        *args,
        "--db",
        str(target),
    ]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rank 1/2: run lens-" in run.stdout and "rank 0/2: run lens-" in run.stdout
    assert "merged 2 shard(s) into" in run.stdout and "4 images merged" in run.stdout
    merged, expected = dump(target), dump(single)
    for table in LENS_TABLES:
        assert merged[table] == expected[table], table
    assert len(expected["run_images"]) == 4
    with ResultsDB(target, read_only=True) as db:
        assert db.sql("SELECT status FROM runs") == [("complete",)]


# -- every collect command shards the same way (collector.distributed.run_collect) ------------------


BLOCKING_TABLES = ("runs", "images", "annotations", "positions", "run_images", "image_views", "blocking", "skipped")


def _blocking_args(tiny_checkpoints, demo_images, questions, *extra):
    image_dir, annotation_file = demo_images
    return [
        "collect",
        "blocking",
        "--model",
        str(tiny_checkpoints["llava-1.5"]),
        "--device",
        "cpu",
        "--images",
        str(image_dir),
        "--annotations",
        str(annotation_file),
        "--questions",
        str(questions),
        "--object-area",
        "4000:12000",
        "--window",
        "2",
        "--sources",
        "object_1",
        "--targets",
        "last",
        "--no-curate",
        "--quiet",
        *extra,
    ]


def test_sharded_blocking_equals_one_process(tmp_path, tiny_checkpoints, demo_images):
    """`collect blocking` as rank 1 then rank 0 of two, merged, equals one process row for row
    (kept images and the skip of image 3, which has no question)."""
    from collector.cli import cli

    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({"1": ["What is the shape?"], "2": ["What shape is it?"], "3": []}))
    args = _blocking_args(tiny_checkpoints, demo_images, questions)
    single = tmp_path / "single.duckdb"
    result = CliRunner().invoke(cli, [*args, "--db", str(single)], env={"RANK": None, "WORLD_SIZE": None})
    assert result.exit_code == 0, result.output
    target = tmp_path / "sharded.duckdb"
    outputs = {}
    for rank in (1, 0):
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "TORCHELASTIC_RUN_ID": "b"}
        result = CliRunner().invoke(cli, [*args, "--db", str(target)], env=env)
        assert result.exit_code == 0, result.output
        outputs[rank] = result.output
    assert "rank 1/2: run blocking-" in outputs[1] and "merged 2 shard(s) into" in outputs[0]
    merged, expected = dump(target), dump(single)
    for table in BLOCKING_TABLES:
        assert merged[table] == expected[table], table
    assert len(expected["run_images"]) == 3 and len(expected["skipped"]) == 1 and expected["blocking"]


def test_limits_on_kept_images_and_mean_vectors_refuse_several_processes(tmp_path, tiny_checkpoints, demo_images):
    from collector.cli import cli

    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({"1": ["What?"]}))
    image_dir, annotation_file = demo_images
    env = {"RANK": "0", "WORLD_SIZE": "2"}
    model = str(tiny_checkpoints["llava-1.5"])
    cases = {
        "--limit counts kept images of the whole run": [
            *_blocking_args(tiny_checkpoints, demo_images, questions, "--limit", "1"),
            "--db",
            str(tmp_path / "b.duckdb"),
        ],
        "--replacement db:ID reads the target database": [
            "collect",
            "ablation",
            "--model",
            model,
            "--images",
            str(image_dir),
            "--annotations",
            str(annotation_file),
            "--replacement",
            "db:v1",
            "--db",
            str(tmp_path / "a.duckdb"),
        ],
        "collect mean-vector runs as one process, not 2": [
            "collect",
            "mean-vector",
            "--model",
            model,
            "--images",
            str(image_dir),
            "--out",
            str(tmp_path / "m.pt"),
        ],
    }
    for message, args in cases.items():
        result = CliRunner().invoke(cli, args, env=env)
        assert result.exit_code == 1, result.output
        assert result.output.startswith(f"Error: {message}") and result.output.count("\n") == 1, result.output
    ablation_limit = [
        "collect",
        "ablation",
        "--model",
        model,
        "--images",
        str(image_dir),
        "--annotations",
        str(annotation_file),
        "--limit",
        "1",
        "--db",
        str(tmp_path / "a.duckdb"),
    ]
    result = CliRunner().invoke(cli, ablation_limit, env=env)
    assert result.exit_code == 1 and result.output.startswith("Error: --limit counts kept images"), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["questions.json"]  # nothing opened or written
