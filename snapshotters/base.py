"""What the directory-backed snapshotters share: everything but two methods.

The overlay and native snapshotters differ only in how a new snapshot's
directory is filled (`DirectorySnapshotter._populate`) and in the mounts a
snapshot is served with (`DirectorySnapshotter._mounts`, pure). Every public
method is a one-liner into the `MetaStore`, as containerd's overlay
snapshotter is one ``WithTransaction`` per method; Prepare and View both go
through `DirectorySnapshotter._create`.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Self

from ckfs.errors import InvalidArgument
from ckfs.metadata.db import DB
from ckfs.mount import Mount
from ckfs.snapshots import CleanupError, Info, InitContext, Kind, Usage
from snapshotters.storage import MetaStore, Snapshot

__all__ = ["DirectorySnapshotter"]

#: Mode of a snapshot's root with no parent: what containerd's suite checks
#: (RootPermission) and what an image's ``/`` is.
ROOT_MODE = 0o755


class DirectorySnapshotter(abc.ABC):
    """A `ckfs.snapshots.Snapshotter` storing each snapshot in a directory.

    Args:
        root: the ckfs state root; snapshots live in
            ``<root>/snapshots/<name>/<id>/``.
        db: the state root's metadata database (left open by `close`).

    Raises:
        InvalidArgument: *root* contains ``,`` or ``:``, which mount option
            strings cannot carry.
    """

    #: The snapshotter's registry name and key space in the database.
    name: ClassVar[str]

    def __init__(self, root: Path, db: DB) -> None:
        path = Path(os.path.abspath(root)) / "snapshots" / self.name
        if "," in str(path) or ":" in str(path):
            raise InvalidArgument(f"{path}: snapshot paths cannot contain ',' or ':'")
        self._store = MetaStore(db, self.name, path)

    @classmethod
    def from_context(cls, context: InitContext) -> Self:
        """The registry's factory (`snapshotters.get`): a directory needs only root and db."""
        return cls(context.root, context.db)

    def stat(self, key: str) -> Info:
        """`Snapshotter.stat`; raises `NotFound`."""
        return self._store.stat(key)

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """`Snapshotter.update` (labels only); raises `NotFound`, `InvalidArgument`."""
        return self._store.update(info, fieldpaths)

    def usage(self, key: str) -> Usage:
        """`Snapshotter.usage`: ``du`` of the snapshot's own ``fs``; raises `NotFound`."""
        return self._store.usage(key)

    def mounts(self, key: str) -> list[Mount]:
        """`Snapshotter.mounts`; raises `NotFound`, `FailedPrecondition` (committed)."""
        return self._mounts(self._store.active(key))

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """`Snapshotter.prepare`; raises `AlreadyExists`, `NotFound`, `InvalidArgument`."""
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """`Snapshotter.view`; raises `AlreadyExists`, `NotFound`, `InvalidArgument`."""
        return self._create(Kind.VIEW, key, parent, labels)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """`Snapshotter.commit`; raises `AlreadyExists`, `NotFound`, `FailedPrecondition`."""
        self._store.commit(name, key, labels)

    def remove(self, key: str) -> None:
        """`Snapshotter.remove`; raises `NotFound`, `FailedPrecondition` (children)."""
        self._store.remove(key)

    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        """`Snapshotter.walk`; raises `InvalidArgument` for a malformed filter."""
        return self._store.walk(filters)

    def close(self) -> None:
        """`Snapshotter.close`: idempotent; the database stays open."""
        self._store.close()

    def cleanup(self, on_error: CleanupError | None = None) -> list[str]:
        """`Cleaner.cleanup`: remove directories no snapshot owns.

        Args:
            on_error: told about each directory that will not go (default:
                logged); gc reports them instead.
        """
        return self._store.cleanup(on_error)

    # -- for subclasses --------------------------------------------------------

    def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None
    ) -> list[Mount]:
        """Create an active or view snapshot and answer its mounts: Prepare and View."""
        return self._mounts(self._store.create(kind, key, parent, labels, self._populate))

    def _fs(self, id: int) -> Path:
        """Snapshot *id*'s content directory."""
        return self._store.fs_path(id)

    @abc.abstractmethod
    def _populate(self, path: Path, kind: Kind, parent_ids: tuple[int, ...]) -> None:
        """Fill a new snapshot's directory *path* (to be renamed to its id).

        Runs outside any transaction; may be slow. Must create ``path/fs``.
        """

    @abc.abstractmethod
    def _mounts(self, snapshot: Snapshot) -> list[Mount]:
        """The mounts serving *snapshot*: pure, no I/O."""
