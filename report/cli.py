"""`llava-interp report ...`: render a results database as a static site."""

from __future__ import annotations

from pathlib import Path

import click

from db.errors import DatabaseError, disk_full
from db.views import HIT_RULES
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
@click.option(
    "--downloads/--no-downloads",
    default=True,
    show_default=True,
    help="Write downloads/: every table as Parquet (per run, split into files of about 48 MB; what the SQL "
    "console reads), gzipped CSV of the small ones, and data/results.duckdb where the database is small. "
    "--no-downloads leaves them out, with every link to them.",
)
@click.option(
    "--database-copy",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="Copy the database into the site as data/results.duckdb: auto = only when the file is at most 64 MB.",
)
@click.option(
    "--lens-pages",
    type=click.IntRange(min=0),
    default=None,
    help="Lens pages (and the quantitative page) for the first N images of each lens run only; "
    "the downloads keep every image. Default: every image.",
)
@click.option(
    "--lens-top-k",
    type=click.IntRange(min=1),
    default=None,
    help="Publish ranks 1..N of each logit-lens cell only, on the lens pages and in the lens downloads "
    "(the SQL console's logit_lens); the database keeps every rank, and the quantitative, depth and "
    "Reproduction pages count from it. About N/K of the lens bytes for a run collected with top-K. "
    "Default: every rank collected.",
)
@click.option(
    "--max-file-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=100.0,
    show_default=True,
    help="Refuse to write a file larger than this (GitHub Pages refuses files over 100 MB).",
)
@click.option(
    "--max-site-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=1000.0,
    show_default=True,
    help="Refuse to write a site larger than this (GitHub Pages sites are limited to 1 GB).",
)
@click.option(
    "--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Render lens pages in this many processes."
)
@click.option(
    "--hit-rule",
    type=click.Choice(HIT_RULES),
    default="word",
    show_default=True,
    help="When a lens token names an object: 'word' (the class word itself) or 'first_token' (the first "
    "token of the class name in the run's tokenizer, word pieces included).",
)
@click.option(
    "--lens-data",
    type=click.Choice(["auto", "inline", "parquet"]),
    default="auto",
    show_default=True,
    help="Where lens pages get their cells: 'inline' in each page's data file (pages open from file://); "
    "'parquet' from the lens Parquet downloads over HTTP range requests (one copy of the cells; needs the "
    "downloads and http(s), e.g. `llava-interp report serve`); 'auto' parquet for runs with more than 200 "
    "lens pages when downloads are on, else inline.",
)
@click.option(
    "--views",
    "view_format",
    type=click.Choice(["auto", "png", "jpeg"]),
    default="auto",
    show_default=True,
    help="How the pages publish each image as the model saw it: 'png' the database's PNG as it is (about "
    "225 KB for a photo), 'jpeg' re-encoded at quality 85 (about 30 KB); 'auto' jpeg for runs with more "
    "than 200 image pages, else png. The database keeps the PNGs.",
)
def build(
    db_path: Path,
    out_dir: Path,
    downloads: bool,
    database_copy: str,
    lens_pages: int | None,
    lens_top_k: int | None,
    max_file_mb: float,
    max_site_mb: float,
    jobs: int,
    hit_rule: str,
    lens_data: str,
    view_format: str,
) -> None:
    """Build the site and print what was written."""
    try:
        summary = build_site(
            db_path,
            out_dir,
            downloads=downloads,
            database_copy=database_copy,
            lens_pages=lens_pages,
            lens_top_k=lens_top_k,
            max_file_bytes=int(max_file_mb * 1e6),
            max_site_bytes=int(max_site_mb * 1e6),
            jobs=jobs,
            hit_rule=hit_rule,
            lens_data=lens_data,
            view_format=view_format,
        )
    except (DatabaseError, ReportError) as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:
        if disk_full(error):
            raise click.ClickException(
                f"disk full while writing the site to {out_dir}: the previous site there is left as it was; "
                "free space and rebuild"
            ) from None
        if isinstance(error, OSError):
            raise click.ClickException(f"cannot write the site: {error}") from None
        raise
    click.echo(
        f"Wrote {summary.lens_pages} lens pages for {summary.runs} runs "
        f"({summary.files_written} files, {summary.bytes_written / 1e6:.1f} MB) to {summary.out_dir}"
    )
    if summary.lens_pages_reused or summary.files_kept:
        click.echo(
            f"Unchanged since the last build, left in place: {summary.lens_pages_reused} lens pages, "
            f"{summary.files_kept} other files"
        )
    for run_id, (mode, why) in summary.lens_modes.items():
        click.echo(f"Lens data of run {run_id}: {mode} ({why})")
    for run_id, (view_format, why) in summary.view_formats.items():
        if view_format != "png":  # the database's own bytes need no word
            click.echo(f"Views of run {run_id}: {view_format} ({why})")
    if summary.lens_pages < summary.lens_images:
        click.echo(f"Lens pages for {summary.lens_pages} of {summary.lens_images} images (--lens-pages)")
    click.echo(
        f"Site size {summary.bytes_written / 1e6:.1f} MB of {max_site_mb:g} MB allowed; largest file "
        f"{summary.largest_file} ({summary.largest_bytes / 1e6:.1f} MB, limit {max_file_mb:g} MB)"
    )
    click.echo(f"Open {summary.out_dir / 'index.html'}")


@report.command("serve", help="Serve a built site on 127.0.0.1 (only this machine can reach it) until Ctrl-C.")
@click.option(
    "--dir",
    "site_dir",
    default=Path("site"),
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Folder of a built site (the --out of `report build`).",
)
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port; 0 picks a free one."
)
def serve(site_dir: Path, port: int) -> None:
    """Serve the folder with the standard library's threaded HTTP server."""
    from report.serve import site_server

    if not (site_dir / "index.html").is_file():
        raise click.ClickException(f"{site_dir} has no index.html; build it first with `llava-interp report build`")
    try:
        httpd = site_server(site_dir, port, log=lambda line: click.echo(line, err=True))
    except OSError as error:
        raise click.ClickException(f"cannot listen on 127.0.0.1:{port}: {error.strerror or error}") from None
    click.echo(f"Serving {site_dir} at http://127.0.0.1:{httpd.server_address[1]}/ (Ctrl-C to stop)")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":  # `python -m report.cli build ...`: the report alone, without the collector's CLI
    report()
