"""Typed access to a results database: runs, images, and per-image bulk writes.

The collector writes through `ResultsDB` and nothing else: every row it stores goes
through a typed method here. The report reads through it (read-only). Bulk rows go
through DuckDB's native Arrow path, checked against the schema first (`db.arrow`), one
transaction per image, so an image is either completely written or absent, and a rerun
resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import sqlalchemy as sa

from db import schema
from db.arrow import validate
from db.errors import DatabaseError
from db.migrations import LATEST_VERSION, applied_versions, migrate
from db.version import TOOL_VERSION

# Per-run tables written with each image's rows: a row already stored (same primary key,
# e.g. a token id an earlier image of the run named) is not written again.
ONCE_PER_RUN = frozenset({schema.token_pieces.name})


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def run_key(experiment: str, identity: Mapping[str, Any]) -> str:
    """A stable key for a run's identity: the settings that change its results."""
    canonical = json.dumps({"experiment": experiment, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResultsDB:
    """A DuckDB results file.

    Open writable to migrate and write (one writer at a time: DuckDB locks the file),
    or `read_only=True` to query it while nothing writes.
    """

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise DatabaseError(f"database not found: {self.path}")
        if not read_only and not self.path.parent.exists():
            raise DatabaseError(f"folder for the database does not exist: {self.path.parent}")
        # A file this object creates is removed again when the work that opened it fails
        # before writing anything (e.g. the model does not load): no empty .duckdb is left.
        self.created = not read_only and not self.path.exists()
        self.engine = sa.create_engine(
            f"duckdb:///{self.path}",
            connect_args={"read_only": read_only},
            poolclass=sa.pool.StaticPool,
        )
        try:
            self.conn = self.engine.connect()
        except sa.exc.DBAPIError as error:
            self.engine.dispose()
            message = str(error.orig).splitlines()[0] if error.orig else str(error)
            raise DatabaseError(f"cannot open database {self.path}: {message}") from None
        try:
            with self.transaction():
                self._check_identity()
                if read_only:
                    self._check_readable()
                else:
                    migrate(self.conn)
        except BaseException:
            self.close()
            self._remove_if_created_and_empty(written=False)
            raise

    def _check_identity(self) -> None:
        """Refuse, before anything is written, a database that holds tables but is not a
        llava-interp results database (no `schema_migrations` rows). An empty database is a
        new results database. `collect` (writable) and `report` (read-only) agree on this."""
        names = [
            row[0]
            for row in self.conn.exec_driver_sql(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema NOT IN ('information_schema', 'pg_catalog')"
            ).fetchall()
        ]
        if not names:
            return
        if schema.schema_migrations.name not in names or not applied_versions(self.conn):
            shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
            raise DatabaseError(
                f"{self.path} is not a llava-interp results database (it holds other tables: {shown}); "
                "it was left untouched: give another --db"
            )

    def _check_readable(self) -> None:
        versions = applied_versions(self.conn)
        if not versions:
            raise DatabaseError(f"{self.path} is not a llava-interp results database")
        if max(versions) > LATEST_VERSION:
            raise DatabaseError(
                f"database schema version {max(versions)} is newer than this "
                f"llava-interp ({TOOL_VERSION}); upgrade llava-interp to read it"
            )
        if max(versions) < LATEST_VERSION:
            raise DatabaseError(
                f"database schema version {max(versions)} is older than this "
                f"llava-interp's ({LATEST_VERSION}); open it once for writing "
                "(any collect command) to migrate it"
            )

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()

    def __enter__(self) -> ResultsDB:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        written = True
        if exc_type is not None and self.created:
            written = self._has_rows()
        self.close()
        if not written:
            self._remove_if_created_and_empty(written=False)

    def _has_rows(self) -> bool:
        """Whether anything was committed: a run, an image or a mean vector."""
        try:
            if self.conn.in_transaction():
                self.conn.rollback()
            count = self.conn.exec_driver_sql(
                "SELECT (SELECT count(*) FROM runs) + (SELECT count(*) FROM images) + (SELECT count(*) FROM mean_vectors)"
            ).scalar()
            return bool(count)
        except Exception:  # noqa: BLE001 - an unreadable file is not removed
            return True

    def _remove_if_created_and_empty(self, written: bool) -> None:
        if self.created and not written:
            for leftover in (self.path, self.path.with_name(self.path.name + ".wal")):
                leftover.unlink(missing_ok=True)

    @property
    def duck(self) -> Any:
        """The underlying DuckDB connection, for Arrow inserts and ad-hoc SQL."""
        return self.conn.connection.driver_connection

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """A transaction that commits on success, or joins the one already open."""
        if self.conn.in_transaction():
            yield self.conn
            return
        with self.conn.begin():
            yield self.conn

    def sql(self, query: str, params: Iterable[Any] | None = None) -> list[Any]:
        """Run raw SQL (committed) and return all rows, tuple-like (empty for statements without rows)."""
        with self.transaction() as conn:
            result = conn.exec_driver_sql(query, tuple(params or ()))
            return list(result.fetchall()) if result.returns_rows else []

    # -- runs ------------------------------------------------------------------------

    def start_run(
        self,
        experiment: str,
        model_id: str,
        identity: Mapping[str, Any],
        config: Mapping[str, Any],
    ) -> str:
        """Create a run, or reopen the run with the same identity (resume).

        `identity` holds the settings that change results (model, revision, dtype, prompt,
        top-k ...); `config` is everything recorded for provenance (a superset).
        Returns the run id.
        """
        key = run_key(experiment, identity)
        runs = schema.runs
        with self.transaction():
            existing = self.conn.execute(sa.select(runs.c.run_id).where(runs.c.run_key == key)).scalar_one_or_none()
            if existing is not None:
                self.conn.execute(
                    runs.update()
                    .where(runs.c.run_id == existing)
                    .values(status="running", finished_at=None, config=dict(config))
                )
                return existing
            run_id = f"{experiment}-{key[:10]}"
            self.conn.execute(
                runs.insert().values(
                    run_id=run_id,
                    experiment=experiment,
                    model_id=model_id,
                    config=dict(config),
                    status="running",
                    started_at=_now(),
                    finished_at=None,
                    tool_version=TOOL_VERSION,
                    run_key=key,
                )
            )
        return run_id

    def finish_run(self, run_id: str, status: str = "complete") -> None:
        with self.transaction():
            self.conn.execute(
                schema.runs.update().where(schema.runs.c.run_id == run_id).values(status=status, finished_at=_now())
            )

    def runs(self, experiment: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(schema.runs).order_by(schema.runs.c.started_at, schema.runs.c.run_id)
        if experiment is not None:
            query = query.where(schema.runs.c.experiment == experiment)
        with self.transaction() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def completed_images(self, run_id: str) -> set[int]:
        """Image ids whose results for this run are completely written."""
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(schema.run_images.c.image_id).where(schema.run_images.c.run_id == run_id)
            ).scalars()
            return set(rows)

    def skipped_images(self, run_id: str) -> set[int]:
        """Image ids of this run recorded in `skipped` (left out with a reason)."""
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(schema.skipped.c.image_id).where(schema.skipped.c.run_id == run_id).distinct()
            ).scalars()
            return set(rows)

    def forget_skipped_images(self, run_id: str, reasons: Sequence[str]) -> set[int]:
        """Remove every row of this run's images skipped for one of `reasons` (their
        completion marker included), so that a resumed run processes them again. Returns
        their ids."""
        table = schema.skipped
        with self.transaction() as conn:
            ids = set(
                conn.execute(
                    sa.select(table.c.image_id).where(table.c.run_id == run_id, table.c.reason.in_(list(reasons)))
                ).scalars()
            )
            if not ids:
                return ids
            for per_image in schema.metadata.sorted_tables:
                if {"run_id", "image_id"} <= set(per_image.c.keys()) and self._has_table(per_image.name):
                    conn.execute(
                        per_image.delete().where(per_image.c.run_id == run_id, per_image.c.image_id.in_(sorted(ids)))
                    )
        return ids

    def _has_table(self, name: str) -> bool:
        return sa.inspect(self.conn).has_table(name)

    # -- mean vectors ----------------------------------------------------------------

    def add_mean_vector(
        self,
        vector_id: str,
        model_id: str,
        vector: Sequence[float],
        n_images: int,
        n_tokens: int,
        source: str,
        config: Mapping[str, Any],
    ) -> None:
        """Store a mean image-token embedding once (a second call with the same id keeps the first)."""
        table = schema.mean_vectors
        with self.transaction():
            exists = self.conn.execute(
                sa.select(table.c.vector_id).where(table.c.vector_id == vector_id)
            ).scalar_one_or_none()
            if exists is not None:
                return
            self.conn.execute(
                table.insert().values(
                    vector_id=vector_id,
                    model_id=model_id,
                    hidden_size=len(vector),
                    n_images=int(n_images),
                    n_tokens=int(n_tokens),
                    vector=[float(v) for v in vector],
                    source=source,
                    config=json.loads(json.dumps(dict(config), default=str)),
                    created_at=_now(),
                )
            )

    def mean_vector(self, vector_id: str) -> list[float] | None:
        """The stored vector `vector_id` (hidden_size floats), or None when there is none."""
        table = schema.mean_vectors
        with self.transaction() as conn:
            row = conn.execute(sa.select(table.c.vector).where(table.c.vector_id == vector_id)).first()
        return None if row is None else [float(v) for v in row[0]]

    # -- images ----------------------------------------------------------------------

    def add_image(
        self,
        image_id: int,
        file_name: str,
        width: int,
        height: int,
        source: str,
        annotations: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        """Record an image and its annotations once (later calls leave them as they are)."""
        with self.transaction():
            self.conn.exec_driver_sql(
                "INSERT OR IGNORE INTO images (image_id, file_name, width, height, source) VALUES (?, ?, ?, ?, ?)",
                (image_id, file_name, width, height, source),
            )
            if width and height:  # a size first unknown (unreadable header) once the file is readable
                self.conn.exec_driver_sql(
                    "UPDATE images SET width = ?, height = ? WHERE image_id = ? AND width = 0 AND height = 0",
                    (width, height, image_id),
                )
            for ann in annotations:
                self.conn.exec_driver_sql(
                    "INSERT OR IGNORE INTO annotations (image_id, annotation_id, category_id, "
                    "category, area, bbox, iscrowd, segmentation) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        image_id,
                        int(ann["id"]),
                        int(ann["category_id"]),
                        str(ann["category"]),
                        float(ann["area"]),
                        [float(v) for v in ann["bbox"]],
                        bool(ann.get("iscrowd", 0)),
                        json.dumps(ann["segmentation"]),
                    ),
                )

    # -- per-image results -------------------------------------------------------------

    def write_image_results(self, run_id: str, image_id: int, tables: Mapping[str, pa.Table]) -> None:
        """Write every row of one image of one run in a single transaction.

        `tables` maps table name to an Arrow table whose columns are a subset of that
        table's columns (inserted by name); it must include the `run_images` marker row.
        Each table is checked against the schema (`db.arrow.validate`: known columns,
        castable types, no nulls in NOT NULL columns) inside the transaction, so a bad
        batch rolls back the whole image. Rows of a per-run table (ONCE_PER_RUN, e.g.
        `token_pieces`) already stored for the run are skipped. Atomicity is what makes resume exact: an image
        is either complete (marker present, all rows present) or absent, so a rerun
        never finds partial rows.
        """
        if "run_images" not in tables:
            raise ValueError("per-image results must include their run_images marker row")
        unknown = set(tables) - set(schema.metadata.tables)
        if unknown:
            raise ValueError(f"unknown tables {sorted(unknown)}")
        duck = self.duck
        with self.transaction():
            if image_id in self.completed_images(run_id):
                raise DatabaseError(f"image {image_id} of run {run_id} is already complete")
            for name, table in tables.items():
                table = validate(name, table)
                view_name = f"_incoming_{name}"
                duck.register(view_name, table)
                try:
                    duck.execute(self._insert_sql(name, view_name))
                finally:
                    duck.unregister(view_name)

    @staticmethod
    def _insert_sql(name: str, view_name: str) -> str:
        """The INSERT of an image's rows of table `name` from the registered `view_name`.

        Tables of rows shared by a run's images (ONCE_PER_RUN: no image_id column) take only
        the rows whose primary key is not stored yet, so each is written once per run."""
        if name not in ONCE_PER_RUN:
            return f"INSERT INTO {name} BY NAME SELECT * FROM {view_name}"
        key = [column.name for column in schema.metadata.tables[name].primary_key.columns]
        same = " AND ".join(f"stored.{column} = incoming.{column}" for column in key)
        return (
            f"INSERT INTO {name} BY NAME SELECT * FROM {view_name} incoming "
            f"WHERE NOT EXISTS (SELECT 1 FROM {name} stored WHERE {same})"
        )

    # -- run provenance added while a run is in progress ------------------------------------

    def append_run_config_entry(self, run_id: str, key: str, entry: Any) -> None:
        """Append `entry` (JSON-able) to the list `runs.config[key]` of run `run_id` (created
        when missing), e.g. the device out-of-memory events of a run."""
        runs = schema.runs
        with self.transaction():
            config = self.conn.execute(sa.select(runs.c.config).where(runs.c.run_id == run_id)).scalar_one()
            config = dict(config or {})
            config[key] = [*config.get(key, []), json.loads(json.dumps(entry, default=str))]
            self.conn.execute(runs.update().where(runs.c.run_id == run_id).values(config=config))
