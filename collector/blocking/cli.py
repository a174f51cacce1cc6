"""`llava-interp collect blocking` (being built)."""

import click

from collector.errors import UserError


@click.command("blocking")
def blocking_command() -> None:
    """Attention blocking (knockout): not available yet."""
    raise UserError("collect blocking is not available yet")
