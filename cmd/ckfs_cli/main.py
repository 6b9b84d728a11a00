"""The ``ckfs`` command: a thin click face over the ckfs library.

Startup stays fast: a command's module is imported only when that command
runs (`_LazyGroup`), and command modules import only click at top level,
pulling library modules inside the command bodies. ``ckfs images ls`` or a
re-pull of a present image loads no FUSE, gRPC, trio or httpx module.

Every failure is one line on stderr and exit status 1; ``--debug`` adds the
traceback. That mapping lives here, in `main`, and nowhere else.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path
from typing import NoReturn

import click

from ckfs import __version__
from ckfs_cli.app import App

_debug = False

#: Each command and where it lives, in the order ``ckfs --help`` lists them.
_COMMANDS = {
    "images": "images_cmds:images",
    "content": "content_cmds:content",
    "import": "transfer_cmds:import_cmd",
    "export": "transfer_cmds:export_cmd",
    "pull": "pull_cmds:pull_cmd",
    "fetch": "pull_cmds:fetch_cmd",
    "mount": "rootfs_cmds:mount_cmd",
    "umount": "rootfs_cmds:umount_cmd",
    "rootfs": "rootfs_cmds:rootfs_cmd",
    "bundle": "rootfs_cmds:bundle_cmd",
    "mounts": "mounts_cmds:mounts",
    "gc": "rootfs_cmds:gc_cmd",
    "snapshots": "snapshot_cmds:snapshots",
    "layers": "inspect_cmds:layers_cmd",
    "which": "inspect_cmds:which_cmd",
    "ls": "inspect_cmds:ls_cmd",
    "cat": "inspect_cmds:cat_cmd",
    "diff": "changes_cmds:diff_cmd",
    "space": "changes_cmds:space_cmd",
    "shell": "shell_cmds:shell_cmd",
    "explore": "explore_cmds:explore_cmd",
}


class _LazyGroup(click.Group):
    """A group that imports a command's module only when the command is used.

    click's documented pattern for large CLIs: ``ckfs pull`` then never pays
    for the modules of ``mount`` or ``snapshots``.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = _COMMANDS.get(cmd_name)
        if where is None:
            return None
        module, attr = where.split(":")
        command = getattr(importlib.import_module(f"ckfs_cli.{module}"), attr)
        assert isinstance(command, click.Command)
        return command

    def invoke(self, ctx: click.Context) -> object:
        """Run the command; a reader that left early (``ckfs ls -R | head``) is no error.

        click would exit 1 on EPIPE; the output is pointed at /dev/null so
        the final flush cannot fail again, and the status is 0.
        """
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(0) from None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="CKFS_ROOT",
    help="State directory [default: /var/lib/ckfs as root, $XDG_DATA_HOME/ckfs otherwise; "
    "env CKFS_ROOT].",
)
@click.option(
    "--address",
    envvar="CKFS_ADDRESS",
    metavar="ADDRESS",
    help="Go through the ckfsd at ADDRESS (unix:///path or a socket path) "
    "[default: the default socket if a ckfsd answers there; env CKFS_ADDRESS].",
)
@click.option("--no-daemon", is_flag=True, help="Work on the state root directly, never via ckfsd.")
@click.option("--debug", is_flag=True, help="Show tracebacks and ckfs's debug logs.")
@click.version_option(__version__, prog_name="ckfs")
@click.pass_context
def cli(
    ctx: click.Context, root: Path | None, address: str | None, no_daemon: bool, debug: bool
) -> None:
    """ckfs: container image names to root filesystems."""
    global _debug
    _debug = debug
    if debug:
        _log_debug()
    ctx.obj = App(root, address=None if no_daemon else address, no_daemon=no_daemon)
    ctx.call_on_close(ctx.obj.close)


def _log_debug() -> None:
    """Send ckfs's own debug records to stderr (not httpx's or httpcore's: too chatty)."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("ckfs: debug: %(name)s: %(message)s"))
    for name in ("ckfs", "snapshotters"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)


def describe(exc: BaseException) -> str:
    """One line saying what went wrong and where, safe to print.

    Messages carry untrusted text (a layer's file names, a registry's error
    body, a path a container wrote): `ckfs.safetext.message` escapes and
    bounds it; ``--debug`` logs the message whole.
    """
    from ckfs.errors import CkfsError
    from ckfs.safetext import message

    if isinstance(exc, CkfsError):
        text = str(exc)
    elif isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror or exc}{where}"
    else:
        text = f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)"
    safe = message(text)
    if _debug and safe != text:
        print(f"ckfs: debug: full message: {text!r}", file=sys.stderr)
    return safe


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and turn errors into exit status 1.

    Called as the program (no *argv*), it leaves through `_leave`; called
    with *argv* (tests, embedding) it raises `SystemExit` as usual.
    """
    code = _run(argv)
    if argv is None:
        _leave(code)
    sys.exit(code)


def _run(argv: list[str] | None) -> int:
    """Run one command; the exit status."""
    try:
        cli.main(args=argv, prog_name="ckfs", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        return 130
    except BrokenPipeError:
        # `ckfs content get X | head`: the reader left; that is not an error.
        sys.stderr.close()
        return 0
    except BaseException as e:
        from ckfs.errors import exit_code, first_error

        leaf = first_error(e)
        if isinstance(leaf, SystemExit):
            return _status(leaf)
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        if _debug:
            import traceback

            traceback.print_exception(e)
        print(f"ckfs: {describe(leaf)}", file=sys.stderr)
        return exit_code(leaf)
    return 0


def _status(exc: SystemExit) -> int:
    """The status `sys.exit` would give for *exc*, printing a message code as it does."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def _leave(code: int) -> NoReturn:
    """End the process without tearing the interpreter down.

    By now every store is closed (the click context's teardown) and every
    file ckfs wrote is closed or fsynced. What Python would still do is free
    every module and object one by one: 20-60 ms on a small machine, a third
    of a re-pull of a present image. So the standard streams are flushed and
    the process ends, as short-lived tools on a large runtime do.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed stream
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
