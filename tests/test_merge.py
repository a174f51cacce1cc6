"""Merging result databases: shards of one run equal one database written directly."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from db import schema
from db.errors import DatabaseError
from db.merge import merge_databases, table_rules
from db.migrations import LATEST_VERSION
from db.store import ResultsDB

# -- synthetic rows for every table of the schema -----------------------------------------

STAMP = dt.datetime(2024, 1, 2, 3, 4, 5)


def _number(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:6], 16) % 1000


def _value(column: sa.Column, seed: tuple, k: int):
    """A deterministic value of the column's type from `seed` (what identifies the row)."""
    kind = column.type
    n = _number(column.name, *seed)
    if isinstance(kind, sa.ARRAY):
        if isinstance(kind.item_type, sa.Float):
            return [n / 7, n / 11]
        return [n % 50, n % 50 + k + 1]
    if isinstance(kind, sa.JSON):
        return json.dumps({"seed": list(map(str, seed)), "n": n})
    if isinstance(kind, sa.LargeBinary):
        return bytes([n % 256, k, 7])
    if isinstance(kind, sa.Boolean):
        return bool(n % 2)
    if isinstance(kind, sa.Float):
        return n / 13
    if isinstance(kind, sa.Integer):
        return n % 30000
    if isinstance(kind, sa.DateTime):
        return STAMP
    return f"{column.name}-{n}"


def _rows(table: sa.Table, fixed: dict, n_rows: int) -> pa.Table:
    """n_rows rows of `table`: columns in `fixed` take that value, primary-key columns the row
    number, the others values derived from the fixed values and row number."""
    pk = {c.name for c in table.primary_key.columns}
    if pk and pk <= set(fixed):
        n_rows = 1  # the key is fixed: one row only
    columns = {}
    for column in table.columns:
        values = []
        for k in range(n_rows):
            if column.name in fixed:
                values.append(fixed[column.name])
            elif column.name in pk:
                values.append(k if isinstance(column.type, sa.Integer) else f"{column.name}-{k}")
            else:
                values.append(_value(column, tuple(fixed.values()) + (k,), k))
        columns[column.name] = values
    return pa.table(columns)


def _insert(db: ResultsDB, name: str, rows: pa.Table) -> None:
    db.duck.register("_rows", rows)
    try:
        db.duck.execute(f"INSERT OR IGNORE INTO {name} BY NAME SELECT * FROM _rows")
    finally:
        db.duck.unregister("_rows")


RUNS = {  # experiment -> identity
    "lens": {"model_id": "m", "top_k": 3, "prompt": "p"},
    "ablation": {"model_id": "m", "settings": ["vqa"]},
}


def write_images(db: ResultsDB, experiment: str, image_ids, status: str = "complete") -> str:
    """A run of `experiment` over `image_ids`: every table the schema has gets rows."""
    identity = RUNS[experiment]
    run_id = db.start_run(experiment, "m", identity, {**identity, "inputs": "images/"})
    rules = table_rules()
    done = db.completed_images(run_id)  # resumes, as the experiments do
    for image_id in (i for i in image_ids if i not in done):
        with db.transaction():
            for name, rule in rules.items():
                table = schema.metadata.tables[name]
                if rule == "keyed":  # images/annotations of the image, one vector of two, the run's pieces
                    if "image_id" in table.c:
                        key: dict = {"image_id": image_id}
                    elif "run_id" in table.c:  # per run (token_pieces): one of two token ids, equal in every shard
                        key = {"run_id": run_id, "token_id": image_id % 2}
                    else:
                        key = {"vector_id": f"v{image_id % 2}"}
                    _insert(db, name, _rows(table, key, 1 if name != "annotations" else 2))
            tables = {
                name: _rows(schema.metadata.tables[name], {"run_id": run_id, "image_id": image_id}, 3)
                for name, rule in rules.items()
                if rule == "per_image"
            }
            db.write_image_results(run_id, image_id, tables)
    db.finish_run(run_id, status)
    return run_id


def dump(path: Path, timestamps: bool = False) -> dict[str, list[tuple]]:
    """Every row of every table (timestamps left out unless asked), in a fixed order."""
    out = {}
    with ResultsDB(path, read_only=True) as db:
        for name, table in schema.metadata.tables.items():
            if table is schema.schema_migrations:
                continue
            columns = [c.name for c in table.columns if timestamps or not isinstance(c.type, sa.DateTime)]
            out[name] = db.sql(f"SELECT {', '.join(columns)} FROM {name} ORDER BY ALL")
    return out


@pytest.fixture(scope="module")
def built_shards(tmp_path_factory):
    """Two shards of a lens run (images 1,3 / 2,4) and an ablation run (1 / 2), and the
    database a single process writes over all of them; built once per module."""
    folder = tmp_path_factory.mktemp("shards")
    a, b, single = folder / "r.shard-00-of-02.duckdb", folder / "r.shard-01-of-02.duckdb", folder / "single.duckdb"
    with ResultsDB(a) as db:
        write_images(db, "lens", [1, 3])
        write_images(db, "ablation", [1])
    with ResultsDB(b) as db:
        write_images(db, "lens", [2, 4])
        write_images(db, "ablation", [2])
    with ResultsDB(single) as db:
        write_images(db, "lens", [1, 2, 3, 4])
        write_images(db, "ablation", [1, 2])
    return a, b, single


@pytest.fixture
def shards(built_shards, tmp_path):
    """Fresh copies of built_shards in this test's folder."""
    copies = []
    for path in built_shards:
        copy = tmp_path / path.name
        copy.write_bytes(path.read_bytes())
        copies.append(copy)
    return tuple(copies)


# -- tests ----------------------------------------------------------------------------------


def test_every_table_has_a_rule():
    rules = table_rules()
    assert set(rules) == set(schema.metadata.tables)
    assert rules["runs"] == "runs" and rules["schema_migrations"] == "skip"
    assert {
        "run_images",
        "positions",
        "logit_lens",
        "image_views",
        "extra_views",
        "skipped",
        "ablations",
        "blocking",
    } <= {n for n, r in rules.items() if r == "per_image"}
    assert {"images", "annotations", "mean_vectors", "token_pieces"} <= {n for n, r in rules.items() if r == "keyed"}


def test_two_shards_equal_one_database(shards, tmp_path):
    a, b, single = shards
    target = tmp_path / "merged.duckdb"
    report = merge_databases([a, b], target)
    expected = dump(single)
    assert all(expected[name] for name in expected), "the fixture fills every table"
    assert dump(target) == expected
    assert [(s.images_merged, s.images_present) for s in report.shards] == [(3, 0), (3, 0)]
    assert set(report.shards[0].runs) == set(report.run_status)
    assert set(report.run_status.values()) == {"complete"}
    with ResultsDB(target, read_only=True) as db:
        assert db.sql("SELECT max(version) FROM schema_migrations")[0][0] == LATEST_VERSION
        # One run per run id, started when the first shard started, finished with the last.
        for run_id, started, finished in db.sql("SELECT run_id, started_at, finished_at FROM runs"):
            rows = []
            for shard in (a, b):
                with ResultsDB(shard, read_only=True) as s:
                    rows += s.sql("SELECT started_at, finished_at FROM runs WHERE run_id = ?", [run_id])
            assert started == min(r[0] for r in rows) and finished == max(r[1] for r in rows)


def test_merge_order_does_not_matter(shards, tmp_path):
    a, b, _ = shards
    merge_databases([a, b], tmp_path / "ab.duckdb")
    merge_databases([b, a], tmp_path / "ba.duckdb")
    assert dump(tmp_path / "ab.duckdb", timestamps=True) == dump(tmp_path / "ba.duckdb", timestamps=True)


def test_merging_twice_changes_nothing(shards, tmp_path):
    a, b, single = shards
    target = tmp_path / "merged.duckdb"
    merge_databases([a, b], target)
    first = dump(target, timestamps=True)
    report = merge_databases([a, b], target)
    assert dump(target, timestamps=True) == first
    assert [(s.images_merged, s.images_present) for s in report.shards] == [(0, 3), (0, 3)]
    # A shard merged alone again, or a shard listed twice, adds nothing either.
    merge_databases([b, b], target)
    assert dump(target, timestamps=True) == first


def test_merge_into_a_database_with_other_runs_keeps_them(shards, tmp_path):
    a, b, single = shards
    target = tmp_path / "merged.duckdb"
    with ResultsDB(target) as db:
        other = db.start_run("lens", "other-model", {"model_id": "other"}, {})
        db.finish_run(other)
        write_images(db, "lens", [1])  # the same run and image as shard a: kept, not duplicated
        other_row = db.sql("SELECT * FROM runs WHERE run_id = ?", [other])
    report = merge_databases([a, b], target)
    assert (report.shards[0].images_merged, report.shards[0].images_present) == (2, 1)
    assert other not in report.run_status
    after = dump(target)
    with ResultsDB(target, read_only=True) as db:
        assert db.sql("SELECT * FROM runs WHERE run_id = ?", [other]) == other_row
    after["runs"] = [row for row in after["runs"] if row[0] != other]
    assert after == dump(single)


def test_status_is_complete_only_when_complete_in_every_shard(tmp_path):
    a, b = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    target = tmp_path / "merged.duckdb"
    with ResultsDB(a) as db:
        write_images(db, "lens", [1, 3])
    with ResultsDB(b) as db:  # killed after image 2: the run reads 'interrupted'
        run_id = write_images(db, "lens", [2], status="interrupted")
    report = merge_databases([a, b], target)
    assert report.run_status == {run_id: "interrupted"}
    with ResultsDB(target, read_only=True) as db:
        assert db.sql("SELECT status, finished_at IS NULL FROM runs") == [("interrupted", False)]
    # The relaunch finishes the shard; merging again completes the run in the target.
    with ResultsDB(b) as db:
        write_images(db, "lens", [4])
    report = merge_databases([a, b], target)
    assert report.run_status == {run_id: "complete"}
    assert [(s.images_merged, s.images_present) for s in report.shards] == [(0, 2), (1, 1)]
    single = tmp_path / "single.duckdb"
    with ResultsDB(single) as db:
        write_images(db, "lens", [1, 2, 3, 4])
    assert dump(target) == dump(single)


def test_a_killed_merge_is_finished_by_rerunning_it(shards, tmp_path, monkeypatch):
    import db.merge as merge_module

    a, b, single = shards
    target = tmp_path / "merged.duckdb"
    real = merge_module._merge_one
    calls = []

    def die_on_second_shard(db, info, rules):
        calls.append(info.path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two shard transactions
        return real(db, info, rules)

    monkeypatch.setattr(merge_module, "_merge_one", die_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        merge_databases([a, b], target)
    with ResultsDB(target, read_only=True) as db:
        # Shard a is in completely, the runs say the merge is not finished.
        assert db.sql("SELECT DISTINCT status FROM runs") == [("running",)]
        assert db.sql("SELECT image_id FROM run_images ORDER BY ALL") == [(1,), (1,), (3,)]
        assert db.sql("SELECT count(DISTINCT image_id) FROM positions")[0][0] == 2
    monkeypatch.setattr(merge_module, "_merge_one", real)
    merge_databases([a, b], target)
    assert dump(target) == dump(single)


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_a_shard_of_another_schema_version_is_refused(shards, tmp_path):
    a, b, _ = shards
    target = tmp_path / "merged.duckdb"
    merge_databases([a], target)
    before = _bytes(target)
    old = tmp_path / "old.duckdb"
    old.write_bytes(b.read_bytes())
    connection = duckdb.connect(str(old))
    connection.execute("DELETE FROM schema_migrations WHERE version = ?", [LATEST_VERSION])
    connection.close()
    with pytest.raises(DatabaseError) as error:
        merge_databases([a, old], target)
    message = str(error.value)
    assert "\n" not in message and "schema version" in message and f"old.duckdb {LATEST_VERSION - 1}" in message
    assert _bytes(target) == before
    newer = tmp_path / "newer.duckdb"
    newer.write_bytes(b.read_bytes())
    connection = duckdb.connect(str(newer))
    connection.execute(
        "INSERT INTO schema_migrations VALUES (?, 'future', now()::TIMESTAMP, '9')", [LATEST_VERSION + 1]
    )
    connection.close()
    with pytest.raises(DatabaseError, match="schema version"):
        merge_databases([newer], tmp_path / "fresh.duckdb")
    assert not (tmp_path / "fresh.duckdb").exists()


def test_a_run_with_another_identity_is_refused(shards, tmp_path):
    a, b, _ = shards
    target = tmp_path / "merged.duckdb"
    merge_databases([a], target)
    before = _bytes(target)
    other = tmp_path / "other.duckdb"
    other.write_bytes(b.read_bytes())
    connection = duckdb.connect(str(other))  # the same run id, other result-defining settings
    connection.execute("UPDATE runs SET run_key = 'f' || run_key WHERE experiment = 'lens'")
    connection.close()
    for sources in ([a, other], [other]):  # against another shard, and against the target
        with pytest.raises(DatabaseError, match=r"^cannot merge: run lens-\w+ has a different identity") as error:
            merge_databases(sources, target)
        assert "\n" not in str(error.value)
        assert _bytes(target) == before
    model = tmp_path / "model.duckdb"
    model.write_bytes(b.read_bytes())
    connection = duckdb.connect(str(model))
    connection.execute("UPDATE runs SET model_id = 'another' WHERE experiment = 'lens'")
    connection.close()
    with pytest.raises(DatabaseError, match="different identity"):
        merge_databases([a, model], tmp_path / "fresh.duckdb")
    assert not (tmp_path / "fresh.duckdb").exists()


def test_files_that_cannot_be_merged(shards, tmp_path):
    a, _, _ = shards
    notes = tmp_path / "notes.duckdb"
    notes.write_text("my notes")
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()
    cases = [
        ([tmp_path / "missing.duckdb"], tmp_path / "t.duckdb", "shard not found"),
        ([tmp_path], tmp_path / "t.duckdb", "is a folder"),
        ([notes], tmp_path / "t.duckdb", "cannot open shard"),
        ([empty], tmp_path / "t.duckdb", "not a llava-interp results database"),
        ([a], a, "into itself"),
        ([], tmp_path / "t.duckdb", "no shards"),
        ([a], tmp_path / "no-folder" / "t.duckdb", "folder for the database does not exist"),
    ]
    for sources, target, pattern in cases:
        with pytest.raises(DatabaseError, match=pattern):
            merge_databases(sources, target)
    assert not (tmp_path / "t.duckdb").exists() and notes.read_text() == "my notes"


# -- the command line -----------------------------------------------------------------------


def _one_error_line(result, pattern: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert re.search(pattern, lines[0]), lines[0]


def test_db_merge_command(shards, tmp_path):
    from collector.cli import cli

    a, b, single = shards
    target = tmp_path / "merged.duckdb"
    result = CliRunner().invoke(cli, ["db", "merge", str(a), str(b), "--into", str(target)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{a}: 2 run(s), 3 images merged, 0 already present"
    assert lines[1] == f"{b}: 2 run(s), 3 images merged, 0 already present"
    assert lines[2].startswith(f"merged 2 shard(s) into {target}: 6 images merged, 0 already present; runs: ")
    assert dump(target) == dump(single)
    again = CliRunner().invoke(cli, ["db", "merge", str(a), str(b), "--into", str(target)])
    assert again.exit_code == 0 and "0 images merged, 6 already present" in again.output

    old = tmp_path / "old.duckdb"
    old.write_bytes(b.read_bytes())
    connection = duckdb.connect(str(old))
    connection.execute("DELETE FROM schema_migrations WHERE version = ?", [LATEST_VERSION])
    connection.close()
    before = _bytes(target)
    _one_error_line(CliRunner().invoke(cli, ["db", "merge", str(a), str(old), "--into", str(target)]), "schema version")
    _one_error_line(
        CliRunner().invoke(cli, ["db", "merge", str(tmp_path / "nope.duckdb"), "--into", str(target)]),
        "shard not found",
    )
    assert _bytes(target) == before
    help_text = CliRunner().invoke(cli, ["db", "merge", "--help"]).output
    assert "--into" in help_text and "SHARD" in help_text
