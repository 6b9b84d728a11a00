"""Layer debugging commands (issue 11): being built; placeholders keep `ckfs --help` whole."""

from __future__ import annotations

import click


@click.command("diff", hidden=True)
def diff_cmd() -> None:
    """Not built yet."""
    raise click.UsageError("not built yet")


@click.command("space", hidden=True)
def space_cmd() -> None:
    """Not built yet."""
    raise click.UsageError("not built yet")
