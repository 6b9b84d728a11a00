"""``ckfs explore``: an image's layers in a terminal UI (`ckfs.explore`).

textual is imported inside the command: ``ckfs --help`` and every other
command never load it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from ckfs_cli.app import App
from ckfs_cli.options import pass_app, pull_options, registry_options


@click.command("explore")
@registry_options
@click.argument("ref")
@pass_app
def explore_cmd(app: App, /, ref: str, **flags: Any) -> None:
    """Browse image REF's layers, files and wasted space in a terminal UI.

    Left, the layers, bottom first, with the command that made each; in the
    middle, the merged tree, each entry with the layer providing it (L3);
    with a layer highlighted, only what that layer changed: added (green,
    +), modified (yellow, ~), deleted (red, -); right, where the
    highlighted entry comes from (which layer provides it, which it
    shadows, what deleted it) and a preview of its head (text, or binaries
    as hex). Works on a pulled or lazily recorded image: indexes missing
    are built first (a progress bar shows them), and a preview fetches only
    that file's first bytes.

    \b
    Keys:
      arrows, Enter   move; open a directory (and switch layers in the list)
      Tab             next pane
      [ and ]         the layer below / above; a: all layers (merged)
      /               search paths (Enter finds, Esc clears)
      w               wasted space: what later layers overwrite or delete,
                      the largest files, efficiency (as ckfs space)
      s               ckfs shell --upto N at the chosen layer (the top one
                      in the merged view); back to the explorer at its exit
      q               quit

    Needs a terminal. Nothing is unpacked and nothing in the store changes
    but missing layer indexes, which are stored (they are caches).
    """
    import asyncio
    import functools

    from ckfs.errors import FailedPrecondition
    from ckfs.explore.app import ExploreApp
    from ckfs.explore.model import opened
    from ckfs.explore.portal import TrioPortal

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise FailedPrecondition("ckfs explore needs a terminal (stdin and stdout)")
    options = pull_options(**flags)
    opener = functools.partial(opened, app.state, ref, options=options)
    shell = _shell_runner(click.get_current_context(), ref)

    async def run() -> ExploreApp:
        async with TrioPortal() as portal:
            ui = ExploreApp(portal, opener, shell=shell)
            await ui.run_async()
            return ui

    ui = asyncio.run(run())
    if ui.error is not None:
        raise ui.error


def _shell_runner(ctx: click.Context, ref: str) -> Callable[[int], int]:
    """What the explorer's shell key runs: ``ckfs shell REF --upto N`` with this
    command's global and registry options, on the terminal the explorer hands over."""
    import subprocess

    assert ctx.parent is not None
    command = [
        *(sys.executable, "-m", "ckfs_cli.main"),
        *forwarded(ctx.parent),
        "shell",
        *forwarded(ctx),
        ref,
    ]

    def run(n: int) -> int:
        status = subprocess.run([*command, "--upto", str(n)], check=False).returncode
        if status:
            # Its error would vanish under the redrawn explorer.
            input(f"ckfs shell exited with status {status}; Enter returns to the explorer ")
        return status

    return run


def forwarded(ctx: click.Context) -> list[str]:
    """The options of *ctx* that were given (not defaults), as arguments again.

    So a command started from this one (``ckfs shell`` from ``ckfs
    explore``) sees the same root, daemon and registry options.
    """
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name or ""
        value = ctx.params.get(name)
        if not isinstance(param, click.Option) or ctx.get_parameter_source(name) not in given:
            continue
        flag = param.opts[0]
        if param.is_flag:
            if value:
                args.append(flag)
        elif param.multiple:
            for v in value or ():
                args += [flag, str(v)]
        else:
            args += [flag, str(value)]
    return args
