"""Layer debugging commands (issue 11): being built; placeholders keep `ckfs --help` whole."""

from __future__ import annotations

import click


@click.command("layers", hidden=True)
def layers_cmd() -> None:
    """Not built yet."""
    raise click.UsageError("not built yet")


@click.command("which", hidden=True)
def which_cmd() -> None:
    """Not built yet."""
    raise click.UsageError("not built yet")


@click.command("ls", hidden=True)
def ls_cmd() -> None:
    """Not built yet."""
    raise click.UsageError("not built yet")


@click.command("cat", hidden=True)
def cat_cmd() -> None:
    """Not built yet."""
    raise click.UsageError("not built yet")
