"""``ckfs pull`` and ``ckfs fetch``: images from a registry into the stores.

Progress goes to stderr so stdout stays the result (the name and digest, or
with ``--json`` one JSON object per line): on a terminal a live table with
one line per blob (bytes, rate, state) and a total; elsewhere one plain line
per state change, no animation; nothing with ``--quiet``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ckfs.options import MAX_CONCURRENT
from ckfs.remotes import DEFAULT_CONCURRENCY
from ckfs_cli.app import App, human_size, skip_httpx_cli
from ckfs_cli.options import apply, pass_app, pull_options, registry_options

if TYPE_CHECKING:
    from rich.console import RenderableType

    from ckfs.progress import BlobProgress
    from ckfs.reference import Reference

_F = TypeVar("_F", bound=Callable[..., Any])


def _pull_options(f: _F) -> _F:
    """The options `pull` and `fetch` share (they differ only in registering a name)."""
    return registry_options(
        apply(
            f,
            [
                click.option(
                    "--all-platforms", is_flag=True, help="Fetch every platform of an index."
                ),
                click.option(
                    "--max-concurrent",
                    type=click.IntRange(min=1, max=MAX_CONCURRENT),
                    default=DEFAULT_CONCURRENCY,
                    show_default=True,
                    help="Layers transferred at once "
                    "(blobs over 1 MiB; configs and manifests never wait).",
                ),
                click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
                click.option(
                    "--json",
                    "as_json",
                    is_flag=True,
                    help="One JSON event per line, then a summary.",
                ),
                click.argument("ref"),
            ],
        )
    )


@click.command("pull")
@_pull_options
@click.option(
    "--lazy",
    is_flag=True,
    help="Index the layers instead of fetching those read by range (eStargz, "
    "uncompressed tar): mounts and containerd then fetch file contents as they are read.",
)
@pass_app
def pull_cmd(app: App, /, **opts: Any) -> None:
    """Pull REF from its registry: fetch what is missing, then name it.

    \b
    Examples:
      ckfs pull --plain-http 127.0.0.1:5000/busybox:latest
      ckfs pull --platform linux/arm64 docker.io/library/alpine
      ckfs pull --offline alpine@sha256:…      # no network: all must be here
      ckfs pull --lazy registry.local/app:esgz  # layer indexes, no eStargz layer bytes
    """
    _run(app, register=True, **opts)


@click.command("fetch")
@_pull_options
@pass_app
def fetch_cmd(app: App, /, **opts: Any) -> None:
    """Fetch REF's content like `pull`, without registering a name.

    What `ctr content fetch` does: the blobs land in the content store.
    """
    _run(app, register=False, **opts)


def _run(app: App, *, register: bool, ref: str, quiet: bool, as_json: bool, **flags: Any) -> None:
    from ckfs import reference

    parsed = reference.parse(ref)
    display: _Display
    if as_json:
        display = _JsonDisplay()
    elif quiet:
        display = _Display()
    elif sys.stderr.isatty():
        display = _LiveDisplay()
    else:
        display = _PlainDisplay()
    if (daemon := app.daemon) is not None:
        from ckfs.client import pull_options as request_options

        with display:
            summary = daemon.pull(
                str(parsed),
                register=register,
                options=request_options(**flags),
                on_event=display.event,
            )
    else:
        summary = _pull_here(app, parsed, register, display, flags)
    if flags.get("lazy") and register:
        from ckfs_cli.images_cmds import indexed
        from ckfs_cli.rootfs_cmds import say_eager

        say_eager(
            app,
            str(parsed),
            flags,
            lambda d, _: indexed(app, d),
            "will be unpacked eagerly when mounted",
        )
    if as_json:
        _emit(summary)
    elif not quiet:
        click.echo(f"{summary['name'] or summary['reference']}  {summary['target']['digest']}")
        click.echo(_summary_line(summary), err=True)


def _pull_here(
    app: App, parsed: Reference, register: bool, display: _Display, flags: dict[str, Any]
) -> dict[str, Any]:
    """The pull in this process (`ckfs.provide.pull_image`); its summary."""
    from ckfs.provide import pull_image

    options = pull_options(**flags)
    skip_httpx_cli()  # before the full pull, if it comes to that, imports httpx
    report = pull_image(
        app.state,
        parsed,
        register=register,
        options=options,
        on_event=display.event,
        transfer=display,
    )
    return report.to_json()


def _summary_line(summary: dict[str, Any]) -> str:
    """The human summary, from the ``--json`` one: the same from ckfsd and from here."""
    line = (
        f"fetched {summary['fetched_blobs']} of {summary['blobs']} blobs "
        f"({human_size(summary['fetched_bytes'])}) in {summary['seconds']:.2f}s; "
        f"{summary['skipped_blobs']} already present"
    )
    if summary["nondistributable"]:
        line += f"; {len(summary['nondistributable'])} non-distributable skipped"
    if not summary["network"]:
        line += "; registry not contacted"
    return line


def _emit(obj: dict[str, Any]) -> None:
    import json

    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class _Display:
    """Where progress goes; this base shows nothing (``--quiet``)."""

    def event(self, p: BlobProgress) -> None:
        """A blob changed state."""

    def __enter__(self) -> _Display:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _JsonDisplay(_Display):
    """One JSON object per state change, on stdout, flushed at once."""

    def event(self, p: BlobProgress) -> None:
        _emit(p.to_json())


def _line(p: BlobProgress) -> str:
    note = f"  ({p.note})" if p.note else ""
    return f"{p.state:<11} {p.kind:<8} {p.desc.digest}  {human_size(p.desc.size)}{note}"


class _PlainDisplay(_Display):
    """One line per state change on stderr: logs and pipes, no redraws."""

    def event(self, p: BlobProgress) -> None:
        click.echo(_line(p), err=True)


class _LiveDisplay(_Display):
    """A rich live table on the terminal: one row per blob and a total.

    rich redraws from its own thread a few times a second, reading the
    `BlobProgress` objects the fetcher updates; plain integer reads are
    safe across threads, and rows are only appended.
    """

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        # Rows in the order blobs first reported, keyed by object identity.
        self._rows: dict[int, BlobProgress] = {}
        # Per blob: (bytes fetched, time) when its current transfer began,
        # and the rate it finished at.
        self._marks: dict[int, tuple[int, float]] = {}
        self._final: dict[int, float] = {}
        self._start = time.monotonic()
        self._live = Live(
            get_renderable=self._render,
            console=Console(stderr=True),
            refresh_per_second=8,
            transient=False,
        )

    def event(self, p: BlobProgress) -> None:
        from ckfs.progress import BlobState

        key = id(p)
        self._rows.setdefault(key, p)
        if p.state in (BlobState.DOWNLOADING, BlobState.RESUMING):
            self._marks[key] = (p.fetched, time.monotonic())
        elif p.state is BlobState.VERIFIED and key in self._marks:
            self._final[key] = self._rate(p)

    def _rate(self, p: BlobProgress) -> float:
        if id(p) not in self._marks:
            return 0.0
        fetched0, t0 = self._marks[id(p)]
        elapsed = time.monotonic() - t0
        return (p.fetched - fetched0) / elapsed if elapsed > 0 else 0.0

    def _render(self) -> RenderableType:
        from rich.table import Table

        from ckfs.progress import BlobState

        table = Table(box=None, pad_edge=False, show_header=False)
        for column in ("kind", "digest", "bytes", "rate", "state"):
            table.add_column(column, no_wrap=True, justify="right" if column == "rate" else "left")
        total = done = 0
        rows = list(self._rows.values())
        for p in rows:
            size = p.desc.size
            total += size
            done += min(p.offset, size)
            active = p.state in (BlobState.DOWNLOADING, BlobState.RESUMING)
            rate = self._rate(p) if active else self._final.get(id(p), 0.0)
            table.add_row(
                p.kind,
                p.desc.digest.short(16),
                f"{human_size(min(p.offset, size))} / {human_size(size)}",
                f"{human_size(int(rate))}/s" if rate else "",
                str(p.state),
            )
        elapsed = time.monotonic() - self._start
        fetched = sum(p.fetched for p in rows)
        table.add_row(
            "total",
            f"{len(rows)} blobs",
            f"{human_size(done)} / {human_size(total)}",
            f"{human_size(int(fetched / elapsed))}/s" if elapsed > 0 and fetched else "",
            f"{elapsed:.1f}s",
        )
        return table

    def __enter__(self) -> _Display:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.stop()
