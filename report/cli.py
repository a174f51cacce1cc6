"""`llava-interp report ...`: render a results database as a static site."""

from __future__ import annotations

from pathlib import Path

import click

from db.errors import DatabaseError
from report.build import ReportError, build_site


@click.group(help="Render results from a llava-interp database as a static website.")
def report() -> None:
    """The `report` command group."""


@report.command(
    "build",
    help="Build the static site (index plus one logit-lens page per image) from a results database.",
)
@click.option(
    "--db",
    "db_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Results database (DuckDB file) written by the collector; opened read-only.",
)
@click.option(
    "--out",
    "out_dir",
    default=Path("site"),
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Output folder. Its index.html, lens/, static/ and .nojekyll are replaced; other files are kept.",
)
def build(db_path: Path, out_dir: Path) -> None:
    """Build the site and print what was written."""
    try:
        summary = build_site(db_path, out_dir)
    except (DatabaseError, ReportError) as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise click.ClickException(f"cannot write the site: {error}") from None
    click.echo(
        f"Wrote {summary.lens_pages} lens pages for {summary.runs} runs "
        f"({summary.files_written} files, {summary.bytes_written / 1e6:.1f} MB) to {summary.out_dir}"
    )
    click.echo(f"Open {summary.out_dir / 'index.html'}")
