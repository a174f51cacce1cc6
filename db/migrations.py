"""Ordered schema migrations, recorded in `schema_migrations`.

Each migration creates the tables (and views) it introduces. A database whose highest
applied version is newer than this code knows is refused with a clear message rather
than written to.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from db import schema, views
from db.errors import DatabaseError
from db.version import TOOL_VERSION


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[sa.Connection], None]


def _create(*tables: sa.Table) -> Callable[[sa.Connection], None]:
    def apply(conn: sa.Connection) -> None:
        for table in tables:
            table.create(conn, checkfirst=True)

    return apply


def _lens_views(conn: sa.Connection) -> None:
    for statement in views.LENS_VIEWS:
        conn.exec_driver_sql(statement)


def _quant_views(conn: sa.Connection) -> None:
    for statement in views.QUANT_VIEWS:
        conn.exec_driver_sql(statement)


def _ablation_views(conn: sa.Connection) -> None:
    for statement in views.ABLATION_VIEWS:
        conn.exec_driver_sql(statement)


def _hit_rules_and_intervals(conn: sa.Connection) -> None:
    schema.class_tokens.create(conn, checkfirst=True)
    for statement in views.HIT_RULE_VIEWS + views.ABLATION_VIEWS + views.BLOCKING_VIEWS:
        conn.exec_driver_sql(statement)


def _blocking_views(conn: sa.Connection) -> None:
    for statement in views.BLOCKING_VIEWS:
        conn.exec_driver_sql(statement)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "runs, images, annotations, positions, logit_lens",
        _create(
            schema.runs,
            schema.images,
            schema.annotations,
            schema.run_images,
            schema.image_views,
            schema.positions,
            schema.logit_lens,
        ),
    ),
    Migration(2, "logit lens views", _lens_views),
    Migration(
        3,
        "skipped, mean_vectors, ablations, blocking",
        _create(schema.skipped, schema.mean_vectors, schema.ablations, schema.blocking),
    ),
    Migration(4, "blocking views", _blocking_views),
    Migration(5, "ablation views", _ablation_views),
    Migration(6, "quantitative logit lens view", _quant_views),
    Migration(7, "extra_views", _create(schema.extra_views)),
    Migration(8, "class_tokens; lens hit rules; Wilson intervals in summaries", _hit_rules_and_intervals),
    Migration(9, "token_pieces", _create(schema.token_pieces)),
)

LATEST_VERSION = MIGRATIONS[-1].version


def applied_versions(conn: sa.Connection) -> list[int]:
    if not sa.inspect(conn).has_table(schema.schema_migrations.name):
        return []
    rows = conn.execute(sa.select(schema.schema_migrations.c.version)).scalars()
    return sorted(rows)


def migrate(conn: sa.Connection) -> list[int]:
    """Apply every pending migration; returns the versions applied now."""
    schema.schema_migrations.create(conn, checkfirst=True)
    done = applied_versions(conn)
    if done and max(done) > LATEST_VERSION:
        raise DatabaseError(
            f"database schema version {max(done)} is newer than this llava-interp "
            f"({TOOL_VERSION}, schema {LATEST_VERSION}); upgrade llava-interp to use it"
        )
    applied_now = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        migration.apply(conn)
        conn.execute(
            schema.schema_migrations.insert().values(
                version=migration.version,
                name=migration.name,
                applied_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
                tool_version=TOOL_VERSION,
            )
        )
        applied_now.append(migration.version)
    return applied_now
