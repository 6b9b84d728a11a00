"""The ``ckfsd`` command line and its config file.

``ckfsd [--root DIR] [--address unix:///run/ckfs/ckfsd.sock] [--config FILE]
[--debug] [--ready-fd N]``. Options on the command line win over the config
file, which wins over the defaults. Without an address, a root other than
the default one is served on ``<root>/ckfsd.sock``, where ``ckfs --root``
looks for it. The config file is TOML with top-level
keys only (see ``docs/ckfsd.toml``)::

    root = "/var/lib/ckfs"
    address = "unix:///run/ckfs/ckfsd.sock"
    grace_period = 10.0     # seconds in-flight RPCs get after SIGTERM
    workers = 32            # grpcio worker threads: RPCs served at once
    cache_max = "20GiB"     # the FUSE server's chunk cache bound [$CKFS_CACHE_MAX]

Exit status: 0 after SIGTERM or SIGINT; 1 when the daemon cannot start or
fails (one line on stderr, ``ckfsd: <what and where>``); 2 for usage errors.
"""

from __future__ import annotations

import logging
import os
import sys
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import click

from ckfs.errors import CkfsError, InvalidArgument, first_error

__all__ = ["DEFAULT_GRACE", "DEFAULT_WORKERS", "Config", "load_config", "main"]

#: Seconds in-flight RPCs may finish in after SIGTERM before they are
#: cancelled: systemd's default stop timeout is 90 s, so the daemon is done
#: long before it would be killed.
DEFAULT_GRACE = 10.0

#: grpcio worker threads. Each RPC holds one for its whole life (a
#: streamed pull for minutes), so this bounds RPCs served at once; more
#: wait in grpcio's queue. The work itself runs on the trio loop and its
#: own worker threads, so these threads mostly wait.
DEFAULT_WORKERS = 32


@dataclass(frozen=True)
class Config:
    """Everything the daemon is told, resolved.

    Attributes:
        root: the state root served.
        address: the ``unix://`` address listened on.
        grace_period: see `DEFAULT_GRACE`.
        workers: see `DEFAULT_WORKERS`.
        cache_max: bytes the chunk cache of a FUSE server this daemon
            starts may hold; None: ``$CKFS_CACHE_MAX``, else its share of
            the disk (`ckfs.layerindex.cache.DISK_SHARE`).
        debug: debug logging, with tracebacks of unexpected errors.
        ready_fd: a descriptor to write ``READY=1`` to, then close.
    """

    root: Path
    address: str
    grace_period: float = DEFAULT_GRACE
    workers: int = DEFAULT_WORKERS
    cache_max: int | None = None
    debug: bool = False
    ready_fd: int | None = None


#: Keys a config file may set, with the type each must have.
_FILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "root": str,
    "address": str,
    "grace_period": (int, float),
    "workers": int,
    "cache_max": (int, str),
}


def load_config(path: Path) -> dict[str, Any]:
    """The settings in the TOML file *path*, checked.

    Raises:
        InvalidArgument: unreadable, not TOML, an unknown key, a value of
            the wrong type or out of range.
    """
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise InvalidArgument(f"config {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"config {path}: not valid TOML: {e}") from None
    for key, value in data.items():
        if key not in _FILE_KEYS:
            raise InvalidArgument(
                f"config {path}: unknown key {key!r} (known: {', '.join(_FILE_KEYS)})"
            )
        if isinstance(value, bool) or not isinstance(value, _FILE_KEYS[key]):
            raise InvalidArgument(f"config {path}: {key} has the wrong type")
    if "root" in data:
        data["root"] = Path(data["root"])
    if "cache_max" in data:
        data["cache_max"] = _size(str(data["cache_max"]), f"config {path}: cache_max")
    return data


def _size(text: str, what: str) -> int:
    """*text* as bytes (`ckfs.options.parse_size`); InvalidArgument naming *what* if not."""
    from ckfs.options import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise InvalidArgument(f"{what}: {e}") from None


def _checked(config: Config) -> Config:
    """*config* with its numbers in range.

    Raises:
        InvalidArgument: a grace period below zero, or fewer than 2 workers
            (one long stream would block every other RPC).
    """
    if config.grace_period < 0:
        raise InvalidArgument(f"grace_period must be >= 0, not {config.grace_period}")
    if config.workers < 2:
        raise InvalidArgument(f"workers must be >= 2, not {config.workers}")
    return replace(config, grace_period=float(config.grace_period))


def resolve(
    root: Path | None, address: str | None, config_file: Path | None, **options: Any
) -> Config:
    """The `Config` from the command line, the config file and the defaults.

    Without an address the daemon listens where ``ckfs`` looks for the
    root's daemon (`ckfs.client.root_address`): ``ckfsd --root X`` and
    ``ckfs --root X`` find each other with no socket named to either.
    """
    from ckfs.address import default_root
    from ckfs.client import root_address

    settings = load_config(config_file) if config_file else {}
    if root is not None:
        settings["root"] = root
    if address is not None:
        settings["address"] = address
    if (cache_max := options.pop("cache_max", None)) is not None:
        settings["cache_max"] = _size(cache_max, "--cache-max")
    settings.setdefault("root", default_root())
    settings.setdefault("address", root_address(settings["root"]))
    known = {f.name for f in fields(Config)}
    return _checked(Config(**settings, **{k: v for k, v in options.items() if k in known}))


def _setup_logging(debug: bool) -> None:
    """Log lines on stderr, where journald or the supervisor collects them."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not debug:
        # httpx logs every request at info: one RPC line is enough.
        for noisy in ("httpx", "httpcore", "hpack"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _check_fd(ready_fd: int | None) -> None:
    if ready_fd is None:
        return
    try:
        os.fstat(ready_fd)
    except OSError:
        raise click.BadParameter(
            f"descriptor {ready_fd} is not open", param_hint="--ready-fd"
        ) from None
    os.set_inheritable(ready_fd, False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    help="State root to serve [default: $CKFS_ROOT, /var/lib/ckfs for root].",
)
@click.option(
    "--address",
    help="unix:// socket to listen on [default: <root>/ckfsd.sock, where ckfs --root looks; "
    "for the default root unix:///run/ckfs/ckfsd.sock for root, "
    "$XDG_RUNTIME_DIR/ckfs/ckfsd.sock otherwise].",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML config file (root, address, grace_period, workers, cache_max).",
)
@click.option(
    "--cache-max",
    metavar="SIZE",
    help="Bound on the chunk cache of the FUSE server it starts (e.g. 20GiB) "
    "[default: $CKFS_CACHE_MAX, else a quarter of the cache's disk].",
)
@click.option("--debug", is_flag=True, help="Debug logging, with tracebacks.")
@click.option(
    "--ready-fd",
    type=click.IntRange(min=0),
    help="Write READY=1 to this descriptor once the socket answers, then close it.",
)
def cli(
    root: Path | None,
    address: str | None,
    config_file: Path | None,
    cache_max: str | None,
    debug: bool,
    ready_fd: int | None,
) -> None:
    """Serve ckfs's gRPC API (containerd's snapshots, content, images) on a unix socket."""
    _check_fd(ready_fd)
    _setup_logging(debug)
    config = resolve(
        root, address, config_file, cache_max=cache_max, debug=debug, ready_fd=ready_fd
    )

    import trio

    from ckfsd.daemon import serve

    trio.run(serve, config)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the daemon; one line and status 1 on failure."""
    try:
        cli.main(args=argv, prog_name="ckfsd", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.exit(130)
    except BaseException as e:
        leaf = first_error(e)
        if isinstance(leaf, SystemExit):
            raise leaf from None
        if not isinstance(leaf, CkfsError | OSError):
            raise
        from ckfs.safetext import message

        logging.getLogger("ckfsd").debug("ckfsd failed", exc_info=e)
        sys.stderr.write(f"ckfsd: {message(str(leaf))}\n")
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
