"""The object every command receives: the state root and output helpers."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Re-exported: commands that reach a registry call it before importing httpx.
from ckfs.remotes import skip_httpx_cli as skip_httpx_cli

if TYPE_CHECKING:
    from ckfs.client import Client
    from ckfs.content import ContentStore
    from ckfs.images import ImageStore
    from ckfs.mount import Mount
    from ckfs.remote_content import RemoteContentStore
    from ckfs.remote_images import RemoteImageStore
    from ckfs.snapshots import Snapshotter
    from ckfs.state import State

#: Not yet looked for (`App.daemon` is None both for "none" and "not asked").
_UNKNOWN: Any = object()


class App:
    """Per-invocation context: where the state is, which ckfsd, how to print."""

    def __init__(
        self, root: Path | None, *, address: str | None = None, no_daemon: bool = False
    ) -> None:
        """Nothing is opened yet: a store or a daemon only when a command asks.

        Args:
            root: ``--root``, if given.
            address: ``--address`` / ``CKFS_ADDRESS``, if given.
            no_daemon: ``--no-daemon``.
        """
        self._root = root
        self._state: State | None = None
        self._address = address
        self._no_daemon = no_daemon
        self._daemon: Client | None = _UNKNOWN

    @property
    def daemon(self) -> Client | None:
        """The ckfsd to go through, or None for the local path (`ckfs.client.discover`).

        Looked for once, on first use, so commands that never ask (``ckfs
        --help``, ``import``) never probe a socket.
        """
        if self._daemon is _UNKNOWN:
            self._daemon = None
            if not self._no_daemon:
                from ckfs.client import discover

                root = self._given_root()
                self._daemon = discover(self._address, root_given=root is not None, root=root)
        return self._daemon

    def start_daemon(self) -> None:
        """Go through a ckfsd from now on, started in the background if none answers.

        For ``ckfs mount`` (lazy): nothing with ``--no-daemon`` or
        ``--address`` (a named daemon answers or the command fails). A
        daemon that does not start is said on stderr, and the command goes
        on without one: the mount works either way.
        """
        if self._no_daemon or self._address or self.daemon is not None:
            return
        import click

        from ckfs.address import default_root
        from ckfs.client import start_daemon
        from ckfs.errors import Unavailable
        from ckfs.safetext import message

        root = self._given_root()
        try:
            self._daemon = start_daemon(root or default_root())
        except Unavailable as e:
            click.echo(f"ckfs: {message(str(e))}; going on without it", err=True)

    def _given_root(self) -> Path | None:
        """``--root`` / ``CKFS_ROOT``, None for the default root."""
        if self._root is not None:
            return self._root
        env = os.environ.get("CKFS_ROOT")
        return Path(env) if env else None

    @property
    def state(self) -> State:
        if self._state is None:
            from ckfs.address import default_root
            from ckfs.state import State

            self._state = State(self._root or default_root())
        return self._state

    @functools.cached_property
    def content(self) -> ContentStore | RemoteContentStore:
        """The content store: ckfsd's (through its Content service) when one serves, else local.

        Made once: a command reading many blobs or images shares one stub.
        """
        if (daemon := self.daemon) is not None:
            from ckfs.remote_content import RemoteContentStore

            return RemoteContentStore(daemon)
        return self.state.content

    @functools.cached_property
    def images(self) -> ImageStore | RemoteImageStore:
        """The image store: ckfsd's (through its Images service) when one serves, else local."""
        if (daemon := self.daemon) is not None:
            from ckfs.remote_images import RemoteImageStore

            return RemoteImageStore(daemon)
        return self.state.images

    def snapshotter(self, name: str) -> Snapshotter:
        """The snapshotter *name*: ckfsd's (through its Snapshots service) when one serves,
        else the root's."""
        if (daemon := self.daemon) is not None:
            from ckfs.remote_snapshots import RemoteSnapshotter

            return RemoteSnapshotter(daemon, name)
        return self.state.snapshotter(name)

    def close(self) -> None:
        if self._state is not None:
            self._state.close()
        if self._daemon is not _UNKNOWN and self._daemon is not None:
            self._daemon.close()


def print_json(obj: Any) -> None:
    """Stable JSON for machines: two-space indent, keys in the order given."""
    import json

    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Aligned columns for humans, like ``ctr``'s tab writer.

    On a terminal rich draws the table; in a pipe the same columns are plain
    text with no width limit, so long digests are never cut. Cells are
    escaped (`ckfs.safetext.escape`): names and labels may come from images.
    """
    from ckfs.safetext import escape

    rows = [[escape(v) for v in r] for r in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, pad_edge=False, header_style="bold")
        for c in columns:
            table.add_column(c, overflow="fold")
        for r in rows:
            # Text, not str: rich reads a str cell as markup, so a file named
            # "[red]x" would be coloured, "[link=…]" a hyperlink, "[/]" an error.
            table.add_row(*(Text(v) for v in r))
        Console().print(table)
        return
    widths = [len(c) for c in columns]
    for r in rows:
        widths = [max(w, len(v)) for w, v in zip(widths, r, strict=True)]
    for r in [list(columns), *rows]:
        line = "   ".join(v.ljust(w) for v, w in zip(r, widths, strict=True))
        sys.stdout.write(line.rstrip() + "\n")


def human_size(n: int) -> str:
    """Sizes as ``ctr`` prints them: 1000-based, one decimal."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1000
    raise AssertionError("unreachable")


def labels_text(labels: dict[str, str] | Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def labels_json(labels: dict[str, str] | Any) -> dict[str, str]:
    """Labels in key order: the same JSON whether they came from SQLite or ckfsd's wire
    (protobuf maps keep no order)."""
    return dict(sorted(labels.items()))


def print_mounts(mounts: Sequence[Mount], as_json: bool = False) -> None:
    """Mount records: a JSON list, or one ``type source options`` line each."""
    if as_json:
        print_json([m.to_json() for m in mounts])
        return
    for m in mounts:
        sys.stdout.write(f"{m.type} {m.source} {','.join(m.options)}".rstrip() + "\n")


def for_each(items: Sequence[str], action: Callable[[str], object]) -> None:
    """Apply *action* to every item, like ``ctr ... rm A B C``.

    Each success prints what *action* returned if it is a string (a
    normalized name, say), else the item; each failure (a `CkfsError`, or
    an `OSError` of that item's files) prints its one-line error and the
    rest still run; any failure makes the exit status 1.
    """
    import click

    from ckfs.errors import CkfsError
    from ckfs_cli.main import describe

    failed = 0
    for item in items:
        try:
            done = action(item)
        except (CkfsError, OSError) as e:
            click.echo(f"ckfs: {describe(e)}", err=True)
            failed += 1
        else:
            click.echo(done if isinstance(done, str) else item)
    if failed:
        raise SystemExit(1)
