"""The ``ckfs`` command: a thin click face over the ckfs library.

Startup stays fast (``ckfs --help`` and ``ckfs images ls`` import no FUSE,
gRPC or HTTP module): subcommand modules import only click at top level and
pull heavy library modules inside the command bodies.

Every failure is one line on stderr and exit status 1; ``--debug`` adds the
traceback. That mapping lives here, in `main`, and nowhere else.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import click

from ckfs import __version__
from ckfs_cli import (
    content_cmds,
    images_cmds,
    pull_cmds,
    rootfs_cmds,
    snapshot_cmds,
    transfer_cmds,
)
from ckfs_cli.app import App

_debug = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="CKFS_ROOT",
    help="State directory [default: /var/lib/ckfs as root, $XDG_DATA_HOME/ckfs otherwise; "
    "env CKFS_ROOT].",
)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(__version__, prog_name="ckfs")
@click.pass_context
def cli(ctx: click.Context, root: Path | None, debug: bool) -> None:
    """ckfs: container image names to root filesystems."""
    global _debug
    _debug = debug
    ctx.obj = App(root, debug)
    ctx.call_on_close(ctx.obj.close)


cli.add_command(images_cmds.images)
cli.add_command(content_cmds.content)
cli.add_command(transfer_cmds.import_cmd)
cli.add_command(transfer_cmds.export_cmd)
cli.add_command(pull_cmds.pull_cmd)
cli.add_command(pull_cmds.fetch_cmd)
cli.add_command(rootfs_cmds.mount_cmd)
cli.add_command(rootfs_cmds.umount_cmd)
cli.add_command(rootfs_cmds.rootfs_cmd)
cli.add_command(rootfs_cmds.bundle_cmd)
cli.add_command(rootfs_cmds.gc_cmd)
cli.add_command(snapshot_cmds.snapshots)


def describe(exc: BaseException) -> str:
    """One line saying what went wrong and where."""
    from ckfs.errors import CkfsError

    if isinstance(exc, CkfsError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and turn errors into exit status 1."""
    try:
        cli.main(args=argv, prog_name="ckfs", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # `ckfs content get X | head`: the reader left; that is not an error.
        sys.stderr.close()
        sys.exit(0)
    except BaseException as e:
        from ckfs.errors import first_error

        leaf = first_error(e)
        if isinstance(leaf, SystemExit):
            raise leaf from None
        if isinstance(leaf, KeyboardInterrupt):
            sys.exit(130)
        if _debug:
            traceback.print_exception(e)
        print(f"ckfs: {describe(leaf)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
