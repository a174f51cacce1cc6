"""`llava-interp db ...`: maintain results databases (merge the shards of a multi-process run)."""

from __future__ import annotations

from pathlib import Path

import click

from collector.options import CleanErrorGroup


@click.group("db", cls=CleanErrorGroup)
def db() -> None:
    """Maintain results databases: merge the shards of a multi-process run."""


@db.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--into",
    "into",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Target results database (created if missing, migrated if older). Rows it already has are kept.",
)
def merge_command(shards: tuple[Path, ...], into: Path) -> None:
    """Merge results databases SHARD... (e.g. results.shard-*-of-*.duckdb) into one.

    Every image complete in a shard and not yet in the target is copied with all its rows;
    images, annotations and mean vectors are copied once; the shards of one run become one
    run, complete only if complete in every shard. Merging again changes nothing, and a
    killed merge is finished by rerunning it. Shards of another schema version, or holding
    the same run with different result-defining settings, are refused before anything is
    written. The shards are only read.
    """
    from db.merge import merge_databases

    report = merge_databases(list(shards), into)
    for line in report.lines():
        click.echo(line)
