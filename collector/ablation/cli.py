"""`llava-interp collect ablation` and `collect mean-vector` (being built)."""

import click

from collector.errors import UserError


@click.command("ablation")
def ablation_command() -> None:
    """Token ablation: not available yet."""
    raise UserError("collect ablation is not available yet")


@click.command("mean-vector")
def mean_vector_command() -> None:
    """Mean image-token embedding: not available yet."""
    raise UserError("collect mean-vector is not available yet")
