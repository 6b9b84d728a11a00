"""Layer debugging commands (issue 11): being built; placeholders keep `ckfs --help` whole."""

from __future__ import annotations

import click


@click.command("explore", hidden=True)
def explore_cmd() -> None:
    """Not built yet."""
    raise click.UsageError("not built yet")
