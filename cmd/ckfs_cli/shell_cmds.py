"""Layer debugging commands (issue 11): being built; placeholders keep `ckfs --help` whole."""

from __future__ import annotations

import click


@click.command("shell", hidden=True)
def shell_cmd() -> None:
    """Not built yet."""
    raise click.UsageError("not built yet")
