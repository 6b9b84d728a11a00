"""The local stores as the acceptance suites' factories (see ``tests/suites``).

One place knows how a test opens a local content store or snapshotter on
a temporary root, so the suite bindings and the white-box tests beside them
open them alike. Each factory is a context manager yielding a callable that
opens (or reopens) the store on *root*; leaving it closes what was opened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ckfs.content import ContentStore
from ckfs.metadata.db import DB
from ckfs.state import State

if TYPE_CHECKING:
    from ckfs.snapshots import Snapshotter


def database(root: Path) -> DB:
    """The metadata database of the state *root*, where ckfs keeps it."""
    return DB(root / "metadata.db")


@contextlib.contextmanager
def content_stores(root: Path) -> Iterator[Callable[[], ContentStore]]:
    """Local content stores on *root* (``content/`` beside ``metadata.db``)."""
    dbs: list[DB] = []

    def make() -> ContentStore:
        db = database(root)
        dbs.append(db)
        return ContentStore(root / "content", db)

    try:
        yield make
    finally:
        for db in dbs:
            db.close()


@contextlib.contextmanager
def snapshotter_factory(name: str, root: Path) -> Iterator[Callable[[], Snapshotter]]:
    """The registered snapshotter *name* on *root*; every call opens another instance.

    Each instance comes from a `State` of its own, the one place a
    snapshotter's init context is built, as ckfs and ckfsd open them.
    """
    opened: list[State] = []

    def make() -> Snapshotter:
        state = State(root)
        opened.append(state)
        return state.snapshotter(name)

    try:
        yield make
    finally:
        for state in reversed(opened):
            state.close()
