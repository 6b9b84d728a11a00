"""What several commands share on their command line, defined once.

Click only: importing this costs nothing beyond click itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

import snapshotters
from ckfs.remotes import BUDGET_BASE, BUDGET_MIN_RATE, DEFAULT_MAX_BLOB_SIZE
from ckfs_cli.app import App

if TYPE_CHECKING:
    from ckfs.options import PullOptions

__all__ = [
    "DEFAULT_SNAPSHOTTER",
    "DURATION",
    "SIZE",
    "apply",
    "pass_app",
    "pull_options",
    "registry_options",
    "snapshotter_option",
    "with_images",
]

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")

#: Hands a command the `App` made by the top-level group.
pass_app = click.make_pass_decorator(App)

#: The registry's choice (`snapshotters.DEFAULT`).
DEFAULT_SNAPSHOTTER = snapshotters.DEFAULT


def apply(f: _F, options: list[Callable[[Any], Any]]) -> _F:
    """Decorate *f* with *options*, listed in the order ``--help`` shows them."""
    for option in reversed(options):
        f = option(f)
    return f


def snapshotter_option(f: _F) -> _F:
    """``--snapshotter``, its choices and help from the registry (a new one needs no edit here).

    Not a `click.Choice`: an unknown name is refused by the registry
    (`snapshotters.get`), as one line and exit status 1 like every other
    error, and the same way through ckfsd.
    """
    return snapshotter_option_defaulting(DEFAULT_SNAPSHOTTER)(f)


def snapshotter_option_defaulting(default: str) -> Callable[[_F], _F]:
    """`snapshotter_option` with another default (``ckfs mount``'s is fuse)."""
    kinds = "; ".join(f"{name}: {snapshotters.SUMMARIES[name]}" for name in snapshotters.NAMES)
    return click.option(
        "--snapshotter",
        "-s",
        metavar=f"[{'|'.join(snapshotters.NAMES)}]",
        default=default,
        show_default=True,
        help=f"Snapshotter ({kinds}).",
    )


class _Quantity(click.ParamType[float]):
    """A non-negative number with an optional unit suffix, as a float of base units."""

    def __init__(self, name: str, examples: str, units: dict[str, int]) -> None:
        self.name = name
        self._examples = examples
        self._units = units

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from ckfs.options import parse_quantity

        if isinstance(value, float | int):
            return value
        try:
            return parse_quantity(str(value), self._units)
        except ValueError:
            self.fail(f"{value!r} is not a {self.name} ({self._examples})", param, ctx)


#: ``--timeout``'s and ``--ingest-expiry``'s type: seconds, as a float.
DURATION = _Quantity(
    "duration",
    "seconds, or e.g. 90s, 5m, 1.5h, 1d",
    {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400},
)


class _Size(click.ParamType[int]):
    """Bytes, as `ckfs.options.parse_size` reads them."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from ckfs.options import parse_size

        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


#: ``--max-blob-size``'s type: bytes, as an int.
SIZE = _Size()


def limit_options(f: _F) -> _F:
    """How long and how large a fetch may get: every command that may download."""
    per_mb = 1e6 / BUDGET_MIN_RATE
    return apply(
        f,
        [
            click.option(
                "--timeout",
                type=DURATION,
                default=None,
                metavar="DURATION",
                help="Time budget per blob, manifest and tag resolve (e.g. 300, 5m), "
                "retries and resumes included; a blob out of time fails and keeps its "
                f"bytes for the next pull [default: {BUDGET_BASE:.0f} s + {per_mb:.0f} s "
                "per MB of the blob].",
            ),
            click.option(
                "--max-blob-size",
                type=SIZE,
                default=DEFAULT_MAX_BLOB_SIZE,
                metavar="SIZE",
                help="Refuse, before downloading, a blob whose descriptor claims more "
                f"(e.g. 500MB, 8GiB) [default: {DEFAULT_MAX_BLOB_SIZE >> 30} GiB].",
            ),
        ],
    )


def registry_options(f: _F) -> _F:
    """Where an image comes from when it is not all present: `pull`, `mount` and the like."""
    return apply(
        f,
        [
            click.option(
                "--plain-http",
                is_flag=True,
                help="Use plain HTTP when no hosts.toml says otherwise.",
            ),
            click.option(
                "--hosts-dir",
                "hosts_dirs",
                multiple=True,
                type=click.Path(file_okay=False, path_type=Path),
                help="certs.d directory with <registry>/hosts.toml (repeatable; not "
                "through ckfsd, which reads its own) "
                "[default: <root>/certs.d, /etc/containerd/certs.d].",
            ),
            click.option(
                "--platform", default=None, help="os/arch[/variant] [default: this host]."
            ),
            click.option("--user", "-u", default=None, metavar="USER:PASS", help="Credentials."),
            click.option(
                "--offline", is_flag=True, help="Never contact the registry; all must be present."
            ),
            limit_options,
        ],
    )


def pull_options(*, platform: str | None = None, **flags: Any) -> PullOptions:
    """The `registry_options` (and pull's own flags) as the library's `ckfs.options.PullOptions`.

    Raises:
        InvalidArgument: a malformed ``--platform``.
    """
    from ckfs.images import platforms
    from ckfs.options import PullOptions

    parsed = platforms.parse(platform) if platform else None
    return PullOptions(platform=parsed, **flags)


def with_images(
    app: App, refs: tuple[str, ...], flags: dict[str, Any], body: Callable[..., Awaitable[_T]]
) -> _T:
    """Open the images *refs* (indexing layers that have none yet), run *body*
    on them, and close them, whatever happens.

    *flags* are the `registry_options`: where a missing layer index is read from.
    """
    import contextlib

    import trio

    from ckfs.inspect import ImageLayers

    options = pull_options(**flags)

    async def run() -> _T:
        async with contextlib.AsyncExitStack() as stack:
            images = []
            for ref in refs:
                opened = await ImageLayers.open(app.state, ref, options=options)
                images.append(await stack.enter_async_context(opened))
            return await body(*images)

    return trio.run(run)
