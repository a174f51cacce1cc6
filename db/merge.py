"""Merge results databases (the shards of a multi-process run) into one target database.

`merge_databases(shards, into)` copies every result row of every shard into `into`
(created, or migrated, through `ResultsDB`). What a row belongs to decides how it is
copied; the rule of each table is derived from `db.schema`, not listed by hand:

- per-image tables (a `run_id` and an `image_id` column: `run_images`, `positions`,
  `logit_lens`, `image_views`, `ablations`, ...): the rows of a (run_id, image_id) are
  copied only when the shard holds that image's `run_images` completion marker and the
  target does not. An image is complete or absent in a shard (one transaction per image),
  so it is complete or absent in the target too, and a rerun copies nothing twice.
- keyed tables without an image (`images`, `annotations`, `mean_vectors`, and per run
  `token_pieces`): deduplicated by their primary key (the first copy wins, as
  `ResultsDB.add_image` does; a run's token pieces come from one tokenizer).
- `runs`: one row per run_id. run_id derives from `run_key` (the hash of the settings that
  define results), so the shards of one run hold one run. Its status in the target is
  recomputed from the shards of this merge that hold it: complete only if complete in every
  one of them; while a merge is in progress it reads 'running'.
- `schema_migrations` describes a file, not results: never copied.

Refused with one `DatabaseError` line before the target is written: a shard whose schema
version is not this tool's (shards of one run come from one tool version), and a run_id
whose identity (run_key, experiment, model) differs between shards or from the target.

Each shard is copied in one transaction (DuckDB ATTACH ... READ_ONLY, then one
INSERT ... SELECT per table), so a killed merge leaves the target consistent and rerunning
the same merge finishes it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import sqlalchemy as sa

from db import schema
from db.errors import DatabaseError
from db.store import ResultsDB

SHARD_ALIAS = "merge_shard"
_STATUS_SEVERITY = ("failed", "interrupted", "running")  # the worst wins when not all complete


@dataclass(frozen=True)
class ShardReport:
    """What one shard contributed: its runs, images copied now, images the target already had."""

    shard: Path
    runs: tuple[str, ...]
    images_merged: int
    images_present: int


@dataclass(frozen=True)
class MergeReport:
    into: Path
    shards: tuple[ShardReport, ...]
    run_status: dict[str, str]  # status in the target of every run the shards hold

    @property
    def images_merged(self) -> int:
        return sum(s.images_merged for s in self.shards)

    @property
    def images_present(self) -> int:
        return sum(s.images_present for s in self.shards)

    def lines(self) -> list[str]:
        """Human-readable report: one line per shard, then one for the target."""
        out = [
            f"{s.shard}: {len(s.runs)} run(s), {s.images_merged} images merged, {s.images_present} already present"
            for s in self.shards
        ]
        runs = ", ".join(f"{run_id} ({status})" for run_id, status in sorted(self.run_status.items()))
        out.append(
            f"merged {len(self.shards)} shard(s) into {self.into}: {self.images_merged} images merged, "
            f"{self.images_present} already present; runs: {runs or 'none'}"
        )
        return out


# -- table rules, derived from the schema ------------------------------------------------


def _columns(table: sa.Table) -> list[str]:
    return [column.name for column in table.columns]


def table_rules() -> dict[str, str]:
    """How each schema table is merged: 'skip', 'runs', 'per_image' or 'keyed'.

    Raises TypeError for a table no rule covers, so a new table cannot be silently
    left out of merges (tests check every table of the schema has a rule).
    """
    rules: dict[str, str] = {}
    for name, table in schema.metadata.tables.items():
        columns = set(_columns(table))
        if table is schema.schema_migrations:
            rules[name] = "skip"
        elif table is schema.runs:
            rules[name] = "runs"
        elif {"run_id", "image_id"} <= columns:
            rules[name] = "per_image"
        elif table.primary_key.columns:
            # Rows keyed without an image (`images`, `mean_vectors`, or per run such as
            # `token_pieces`): equal in every shard that holds them, so the first copy wins.
            rules[name] = "keyed"
        else:
            raise TypeError(f"db.merge has no rule for table {name!r}; add one before merging it")
    return rules


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# -- reading shards -----------------------------------------------------------------------


@dataclass(frozen=True)
class _RunRow:
    run_id: str
    run_key: str
    experiment: str
    model_id: str
    status: str
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class _ShardInfo:
    path: Path
    version: int | None
    runs: tuple[_RunRow, ...]


_RUN_COLUMNS = "run_id, run_key, experiment, model_id, status, started_at, finished_at"


def _read_shard(path: Path) -> _ShardInfo:
    if path.is_dir():
        raise DatabaseError(f"shard {path} is a folder, not a results database")
    if not path.is_file():
        raise DatabaseError(f"shard not found: {path}")
    try:
        connection = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatabaseError(f"cannot open shard {path}: {message}") from None
    try:
        tables = {row[0] for row in connection.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if schema.schema_migrations.name not in tables or schema.runs.name not in tables:
            raise DatabaseError(f"{path} is not a llava-interp results database")
        version = (connection.execute("SELECT max(version) FROM schema_migrations").fetchone() or (None,))[0]
        rows = connection.execute(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY run_id").fetchall()
    finally:
        connection.close()
    return _ShardInfo(path, version, tuple(_RunRow(*row) for row in rows))


def _check_versions(infos: Sequence[_ShardInfo]) -> None:
    from db.migrations import LATEST_VERSION

    if all(info.version == LATEST_VERSION for info in infos):
        return
    versions = ", ".join(f"{info.path.name} {info.version}" for info in infos)
    raise DatabaseError(
        f"cannot merge shards of different schema versions ({versions}; this llava-interp writes "
        f"{LATEST_VERSION}): merge only shards written by this llava-interp version"
    )


def _identity(row: _RunRow) -> tuple[str, str, str]:
    return (row.run_key, row.experiment, row.model_id)


def _check_identities(sources: Iterable[tuple[str, Iterable[_RunRow]]]) -> None:
    """One identity per run_id and one run_id per run_key, across shards and the target."""
    by_id: dict[str, tuple[tuple[str, str, str], str]] = {}
    by_key: dict[str, tuple[str, str]] = {}
    for where, rows in sources:
        for row in rows:
            seen = by_id.setdefault(row.run_id, (_identity(row), where))
            if seen[0] != _identity(row):
                raise DatabaseError(
                    f"cannot merge: run {row.run_id} has a different identity (settings that define "
                    f"results: run_key, experiment, model) in {where} than in {seen[1]}"
                )
            other = by_key.setdefault(row.run_key, (row.run_id, where))
            if other[0] != row.run_id:
                raise DatabaseError(
                    f"cannot merge: the same run settings are run {row.run_id} in {where} "
                    f"but run {other[0]} in {other[1]}"
                )


def _final_runs(infos: Sequence[_ShardInfo]) -> dict[str, tuple[str, dt.datetime | None, dt.datetime | None]]:
    """run_id -> (status, started_at, finished_at) over the shards that hold the run."""
    grouped: dict[str, list[_RunRow]] = {}
    for info in infos:
        for row in info.runs:
            grouped.setdefault(row.run_id, []).append(row)
    final = {}
    for run_id, rows in grouped.items():
        statuses = [row.status for row in rows]
        if all(status == "complete" for status in statuses):
            status = "complete"
        else:
            status = next(
                (s for s in _STATUS_SEVERITY if s in statuses),
                next(s for s in statuses if s != "complete"),
            )
        started = min((row.started_at for row in rows if row.started_at is not None), default=None)
        finished_all = [row.finished_at for row in rows]
        finished = max(f for f in finished_all if f is not None) if all(f is not None for f in finished_all) else None
        final[run_id] = (status, started, finished)
    return final


# -- merging --------------------------------------------------------------------------------


def _target_runs(db: ResultsDB) -> list[_RunRow]:
    return [_RunRow(*row) for row in db.sql(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY run_id")]


def _merge_one(db: ResultsDB, info: _ShardInfo, rules: dict[str, str]) -> ShardReport:
    duck = db.duck
    shard = SHARD_ALIAS
    run_cols = ", ".join(_quote(c) for c in _columns(schema.runs))
    try:
        duck.execute(f"ATTACH {_literal(str(info.path))} AS {shard} (READ_ONLY)")
    except duckdb.Error as error:
        message = str(error).strip().splitlines()[0]
        raise DatabaseError(f"cannot open shard {info.path}: {message}") from None
    try:
        with db.transaction():
            # Runs first: new ones arrive 'running' and every run of the shard reads 'running'
            # until the final step of the merge sets its status.
            select_runs = ", ".join(
                "'running'" if c == "status" else "NULL" if c == "finished_at" else _quote(c)
                for c in _columns(schema.runs)
            )
            duck.execute(
                f"INSERT INTO main.runs ({run_cols}) SELECT {select_runs} FROM {shard}.runs s "
                "WHERE s.run_id NOT IN (SELECT run_id FROM main.runs)"
            )
            duck.execute(
                f"UPDATE main.runs SET status = 'running', finished_at = NULL "
                f"WHERE run_id IN (SELECT run_id FROM {shard}.runs)"
            )
            # The (run, image) pairs complete in the shard and not yet in the target.
            duck.execute("DROP TABLE IF EXISTS temp.merge_pairs")
            duck.execute(
                f"CREATE TEMP TABLE merge_pairs AS SELECT s.run_id, s.image_id FROM {shard}.run_images s "
                "WHERE NOT EXISTS (SELECT 1 FROM main.run_images m "
                "WHERE m.run_id = s.run_id AND m.image_id = s.image_id)"
            )
            merged = duck.execute("SELECT count(*) FROM temp.merge_pairs").fetchone()[0]
            total = duck.execute(f"SELECT count(*) FROM {shard}.run_images").fetchone()[0]
            for name, rule in rules.items():
                table = schema.metadata.tables[name]
                cols = ", ".join(_quote(c) for c in _columns(table))
                if rule == "keyed":
                    duck.execute(
                        f"INSERT OR IGNORE INTO main.{_quote(name)} ({cols}) SELECT {cols} FROM {shard}.{_quote(name)}"
                    )
                elif rule == "per_image":
                    duck.execute(
                        f"INSERT INTO main.{_quote(name)} ({cols}) SELECT {cols} FROM {shard}.{_quote(name)} s "
                        "WHERE EXISTS (SELECT 1 FROM temp.merge_pairs p "
                        "WHERE p.run_id = s.run_id AND p.image_id = s.image_id)"
                    )
            duck.execute("DROP TABLE temp.merge_pairs")
    finally:
        duck.execute(f"DETACH {shard}")
    return ShardReport(info.path, tuple(row.run_id for row in info.runs), merged, total - merged)


def merge_databases(shards: Sequence[str | Path], into: str | Path) -> MergeReport:
    """Merge result databases `shards` into `into` (created if missing); see the module doc.

    Idempotent: merging the same shards again copies nothing and changes no row.
    Raises DatabaseError (one line) for a missing or foreign file, a schema version other
    than this tool's, or a run whose identity differs between the files; the target is
    not written then.
    """
    into = Path(into)
    paths: list[Path] = []
    for shard in shards:
        path = Path(shard)
        if path.resolve() == into.resolve():
            raise DatabaseError(f"cannot merge {path} into itself")
        if all(path.resolve() != seen.resolve() for seen in paths):
            paths.append(path)
    if not paths:
        raise DatabaseError("no shards to merge")
    infos = [_read_shard(path) for path in paths]
    _check_versions(infos)
    _check_identities((str(info.path), info.runs) for info in infos)
    rules = table_rules()
    final = _final_runs(infos)
    with ResultsDB(into) as db:
        existing = _target_runs(db)
        _check_identities([(str(into), existing), *((str(info.path), info.runs) for info in infos)])
        started_before = {row.run_id: row.started_at for row in existing}
        reports = tuple(_merge_one(db, info, rules) for info in infos)
        with db.transaction():
            for run_id, (status, started, finished) in final.items():
                earlier = started_before.get(run_id)
                if earlier is not None and (started is None or earlier < started):
                    started = earlier
                db.conn.execute(
                    schema.runs.update()
                    .where(schema.runs.c.run_id == run_id)
                    .values(status=status, started_at=started, finished_at=finished)
                )
    return MergeReport(into, reports, {run_id: value[0] for run_id, value in final.items()})
