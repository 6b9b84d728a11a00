"""The snapshot metastore: rows in SQLite, directories on disk, kept in step.

Every snapshotter built on directories (overlay, native) stores its
snapshots the same way, as containerd's ``core/snapshots/storage``:

- one row per snapshot in the ``snapshots`` table (see
  `ckfs.metadata.schema`), keyed by (snapshotter, key), so keys and names
  share one space per snapshotter;
- one directory per snapshot, ``<root>/snapshots/<snapshotter>/<id>/``,
  holding ``fs`` (the content, or the overlay upper directory) and
  whatever else the snapshotter needs (``work`` for overlay).

How the two stay consistent across crashes:

- **Create.** The directory is set up under a temporary name
  (``new-XXXXXXXX``), then renamed to ``<id>`` inside the transaction that
  inserts the row, just before it commits. A crash before the commit
  leaves at most a directory no row owns; `MetaStore.cleanup` removes it.
  The slow part of setting up (the native snapshotter's full copy of its
  parent) runs *outside* the transaction, so the database's write lock is
  never held for the length of a copy; the temporary directory carries an
  ``flock`` meanwhile, which is how `cleanup` tells work in progress (in
  any process) from debris.
- **Remove.** The row goes in one transaction; the directory is removed
  after it commits, irreversibly, and a failure there is only logged (the
  key is already free, the directory now debris for `cleanup`), as
  containerd's overlay ``Remove``.
- **Commit** changes the row only: the directory keeps its id.

Ids come from ``AUTOINCREMENT`` and are not reused while the row that took
one is committed; a transaction that rolled back can hand its id out again,
so a stale directory found under a fresh id is removed before the rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import sqlite3
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ckfs.errors import (
    AlreadyExists,
    CkfsError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from ckfs.filters import parse_filters
from ckfs.metadata.db import DB, Tx, now_ns
from ckfs.metadata.fields import MAX_LABEL_SIZE, ns_to_datetime, update_labels, validate_labels
from ckfs.mount import mounts_under, unmount_recursive
from ckfs.snapshots import CleanupError, Info, Kind, Usage, filter_adaptor

__all__ = [
    "MAX_LABEL_SIZE",
    "TEMP_PREFIX",
    "MetaStore",
    "Populate",
    "Snapshot",
    "disk_usage",
    "remove_dir",
]

log = logging.getLogger(__name__)

#: Prefix of directories still being set up; never a snapshot id (digits).
TEMP_PREFIX = "new-"

#: The content directory inside a snapshot's directory.
FS = "fs"


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """What a snapshotter needs to build mounts: the id chain, not the names.

    Attributes:
        id: the snapshot's id (its directory's name).
        kind: its kind.
        parent_ids: ids of its ancestors, nearest first (the order overlay's
            ``lowerdir`` wants).
    """

    id: int
    kind: Kind
    parent_ids: tuple[int, ...] = ()


#: Fills a new snapshot's temporary directory: ``(path, kind, parent_ids)``.
#: It runs outside any transaction and may take long (a full copy).
Populate = Callable[[Path, Kind, tuple[int, ...]], None]


class MetaStore:
    """Snapshots of one snapshotter: rows in *db*, directories under *root*.

    Each public method is one transaction (or one read), so a snapshotter's
    methods are one-liners over it. Thread-safe through `DB`'s lock.

    Args:
        db: the ckfs metadata database (shared with other stores; not
            closed by `close`).
        snapshotter: the snapshotter's name, its key space in the table.
        root: the snapshotter's directory, ``<state root>/snapshots/<name>``.
    """

    def __init__(self, db: DB, snapshotter: str, root: Path) -> None:
        self.db = db
        self.snapshotter = snapshotter
        self.root = root
        self._closed = False
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- paths -----------------------------------------------------------------

    def path(self, id: int) -> Path:
        """The directory of snapshot *id*."""
        return self.root / str(id)

    def fs_path(self, id: int) -> Path:
        """The content directory of snapshot *id* (overlay's upper directory)."""
        return self.root / str(id) / FS

    # -- reads -----------------------------------------------------------------

    def stat(self, key: str) -> Info:
        """`Snapshotter.stat`.

        Raises:
            NotFound: no such snapshot.
        """
        return _info(self._row(key))

    def snapshot(self, key: str) -> Snapshot:
        """The id chain of *key*, whatever its kind.

        Raises:
            NotFound: no such snapshot.
        """
        row = self._row(key)
        return Snapshot(row["id"], Kind(row["kind"]), self._chain(row["parent_id"]))

    def active(self, key: str) -> Snapshot:
        """The id chain of the active or view snapshot *key* (for `Snapshotter.mounts`).

        Raises:
            NotFound: no such snapshot.
            FailedPrecondition: *key* is committed.
        """
        snapshot = self.snapshot(key)
        if snapshot.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key!r}: committed, not active or view")
        return snapshot

    def usage(self, key: str) -> Usage:
        """`Snapshotter.usage`: stored for committed, measured for the rest.

        Raises:
            NotFound: no such snapshot.
        """
        row = self._row(key)
        if row["kind"] == Kind.COMMITTED.value:
            return Usage(size=row["size"] or 0, inodes=row["inodes"] or 0)
        return disk_usage(self.fs_path(row["id"]))

    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        """`Snapshotter.walk`: matching snapshots sorted by name, read up front.

        Raises:
            InvalidArgument: a filter is malformed (raised here, not when
                iterating).
        """
        match = parse_filters(filters)
        rows = self._query(f"{_SELECT} WHERE s.snapshotter = ? ORDER BY s.key", (self.snapshotter,))
        infos = [_info(r) for r in rows]
        return iter([i for i in infos if match.match(filter_adaptor(i))])

    # -- changes ---------------------------------------------------------------

    def create(
        self,
        kind: Kind,
        key: str,
        parent: str,
        labels: Mapping[str, str] | None,
        populate: Populate,
    ) -> Snapshot:
        """Create an active or view snapshot whose directory *populate* fills.

        The checks run twice: once before *populate* (to fail fast, before a
        long copy) and again in the transaction that records the snapshot,
        which also verifies that the parent *populate* worked from is still
        the one recorded. If *populate* fails, the checks run again too, so a
        parent removed meanwhile is reported as such.

        Raises:
            AlreadyExists: *key* is taken.
            NotFound: *parent* does not exist.
            InvalidArgument: *kind* is committed, *key* empty, *parent* not
                committed, a label too large.
            Unavailable: the parent changed while *populate* ran.
            OSError, CkfsError: *populate* failed (the parent unchanged).
        """
        if kind is Kind.COMMITTED:
            raise InvalidArgument(f"snapshot {key!r}: only active or view snapshots are created")
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        clean = _clean_labels(key, labels)
        expected = self._check_create(key, parent)
        temp = self._new_temp()
        renamed: Path | None = None
        try:
            try:
                populate(temp.path, kind, expected)
            except (OSError, CkfsError) as e:
                # A parent removed under the copy makes it fail: report
                # that, not the copy's complaint about a vanished file.
                if self._check_create(key, parent) != expected:
                    raise Unavailable(
                        f"snapshot {key!r}: parent {parent!r} changed while preparing; retry"
                    ) from e
                raise
            with self._tx() as tx:
                parent_ids = self._check_create(key, parent, tx)
                if parent_ids != expected:
                    raise Unavailable(
                        f"snapshot {key!r}: parent {parent!r} changed while preparing; retry"
                    )
                now = now_ns()
                cur = tx.execute(
                    "INSERT INTO snapshots (snapshotter, key, parent_id, kind, labels, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        self.snapshotter,
                        key,
                        parent_ids[0] if parent_ids else None,
                        kind.value,
                        json.dumps(clean, sort_keys=True),
                        now,
                        now,
                    ),
                )
                assert cur.lastrowid is not None
                snapshot = Snapshot(cur.lastrowid, kind, parent_ids)
                dest = self.path(snapshot.id)
                if os.path.lexists(dest):
                    # Left by a transaction that rolled back (or a crash)
                    # after renaming: no committed row owns this id.
                    log.warning("removing stale snapshot directory %s", dest)
                    remove_dir(dest)
                os.rename(temp.path, dest)
                renamed = dest
            return snapshot
        except BaseException:
            # The transaction rolled back (or never began): whichever name
            # the directory has now, no row owns it.
            leftover = renamed or temp.path
            try:
                remove_dir(leftover)
            except FileNotFoundError:
                pass
            except Exception as e:  # the original error is the one to raise
                log.warning("cannot remove %s after a failed create: %s", leftover, e)
            raise
        finally:
            temp.release()

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None) -> None:
        """`Snapshotter.commit`: the row of *key* becomes committed *name*.

        The usage stored with it is measured before the transaction (the
        snapshot must not change any more) so the lock is not held for a
        directory walk.

        Raises:
            AlreadyExists: *name* is taken.
            NotFound: *key* does not exist.
            FailedPrecondition: *key* is not active.
            InvalidArgument: *name* empty or a label too large.
        """
        if not name:
            raise InvalidArgument("committed snapshot name must not be empty")
        clean = _clean_labels(name, labels)
        measured: tuple[int, Usage] | None = None
        rows = self._query(
            "SELECT id, kind FROM snapshots WHERE snapshotter = ? AND key = ?",
            (self.snapshotter, key),
        )
        if rows and rows[0]["kind"] == Kind.ACTIVE.value:
            measured = rows[0]["id"], disk_usage(self.fs_path(rows[0]["id"]))
        with self._tx() as tx:
            if self._get(tx, name) is not None:
                raise AlreadyExists(f"snapshot {name!r}: already exists")
            row = self._get(tx, key)
            if row is None:
                raise NotFound(f"snapshot {key!r}: not found")
            if row["kind"] != Kind.ACTIVE.value:
                raise FailedPrecondition(f"snapshot {key!r}: {row['kind']}, not active")
            if measured is None or measured[0] != row["id"]:
                measured = row["id"], disk_usage(self.fs_path(row["id"]))
            usage = measured[1]
            now = now_ns()
            tx.execute(
                "UPDATE snapshots SET key = ?, kind = ?, labels = ?, size = ?, inodes = ?, "
                "created_at = ?, updated_at = ? WHERE id = ?",
                (
                    name,
                    Kind.COMMITTED.value,
                    json.dumps(clean, sort_keys=True),
                    usage.size,
                    usage.inodes,
                    now,
                    now,
                    row["id"],
                ),
            )

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """`Snapshotter.update`: labels only.

        Raises:
            NotFound: no snapshot is named ``info.name``.
            InvalidArgument: an immutable field path, or a label too large.
        """
        with self._tx() as tx:
            row = self._get(tx, info.name)
            if row is None:
                raise NotFound(f"snapshot {info.name!r}: not found")
            labels, others = update_labels(json.loads(row["labels"]), info.labels, fieldpaths)
            if others:
                raise InvalidArgument(
                    f"cannot update {others[0]!r} field on snapshot {info.name!r}"
                )
            clean = _clean_labels(info.name, labels)
            tx.execute(
                "UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?",
                (json.dumps(clean, sort_keys=True), now_ns(), row["id"]),
            )
            updated = self._get(tx, info.name)
            assert updated is not None
            return _info(updated)

    def remove(self, key: str) -> Snapshot:
        """`Snapshotter.remove`: the row now, the directory after the commit.

        Returns:
            The removed snapshot (its directory is gone or logged as debris).

        Raises:
            NotFound: no such snapshot.
            FailedPrecondition: *key* has children.
        """
        with self._tx() as tx:
            row = self._get(tx, key)
            if row is None:
                raise NotFound(f"snapshot {key!r}: not found")
            child = tx.get_row(
                "SELECT key FROM snapshots WHERE parent_id = ? LIMIT 1", (row["id"],)
            )
            if child is not None:
                raise FailedPrecondition(
                    f"cannot remove snapshot {key!r}: it is the parent of {child['key']!r}"
                )
            tx.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))
        # Irreversible and after the commit: the key is free whatever happens here.
        path = self.path(row["id"])
        try:
            remove_dir(path)
        except FileNotFoundError:
            pass
        except (OSError, CkfsError) as e:
            log.warning("snapshot %r removed but its directory stays: %s: %s", key, path, e)
        return Snapshot(row["id"], Kind(row["kind"]))

    def cleanup(self, on_error: CleanupError | None = None) -> list[str]:
        """`Cleaner.cleanup`: remove directories no row owns.

        The scan runs in a write transaction, so no snapshot can be created
        or renamed into place meanwhile; temporary directories whose
        ``flock`` is held belong to a `create` in progress and are skipped.
        Removal runs after the transaction. A directory that will not go is
        handed to *on_error* (default: logged) and the rest still go, so one
        tree a container made unremovable never stops a gc.

        Returns:
            The paths removed.
        """
        debris: list[Path] = []
        held: list[_TempDir] = []
        with self._tx() as tx:
            ids = {
                str(r["id"])
                for r in tx.execute(
                    "SELECT id FROM snapshots WHERE snapshotter = ?", (self.snapshotter,)
                )
            }
            for entry in sorted(os.listdir(self.root)):
                path = self.root / entry
                if entry in ids:
                    continue
                if entry.startswith(TEMP_PREFIX):
                    temp = _TempDir.try_lock(path)
                    if temp is None:
                        continue
                    held.append(temp)
                debris.append(path)
        removed: list[str] = []
        try:
            for path in debris:
                try:
                    remove_dir(path)
                except FileNotFoundError:
                    continue  # someone else's cleanup was quicker
                except (OSError, CkfsError) as e:
                    if on_error is None:
                        log.warning("cleanup: cannot remove %s: %s", path, e)
                    else:
                        on_error(path, e)
                else:
                    removed.append(str(path))
        finally:
            for temp in held:
                temp.release()
        return removed

    def close(self) -> None:
        """Refuse further use; idempotent. The database stays open (it is shared)."""
        self._closed = True

    # -- helpers ---------------------------------------------------------------

    def _open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"snapshotter {self.snapshotter!r}: closed")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Tx]:
        self._open()
        with self.db.transaction() as tx:
            yield tx

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        self._open()
        return self.db.query(sql, params)

    def _row(self, key: str) -> sqlite3.Row:
        rows = self._query(
            f"{_SELECT} WHERE s.snapshotter = ? AND s.key = ?", (self.snapshotter, key)
        )
        if not rows:
            raise NotFound(f"snapshot {key!r}: not found")
        return rows[0]

    def _get(self, tx: Tx, key: str) -> sqlite3.Row | None:
        return tx.get_row(
            f"{_SELECT} WHERE s.snapshotter = ? AND s.key = ?", (self.snapshotter, key)
        )

    def _chain(self, first: int | None, tx: Tx | None = None) -> tuple[int, ...]:
        """Ids from *first* up to the root, nearest first."""
        if first is None:
            return ()
        sql = (
            "WITH RECURSIVE chain (id, parent_id, depth) AS ("
            " SELECT id, parent_id, 0 FROM snapshots WHERE id = ?"
            " UNION ALL"
            " SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s"
            " JOIN chain c ON s.id = c.parent_id"
            ") SELECT id FROM chain ORDER BY depth"
        )
        rows = tx.execute(sql, (first,)).fetchall() if tx else self._query(sql, (first,))
        return tuple(r["id"] for r in rows)

    def _check_create(self, key: str, parent: str, tx: Tx | None = None) -> tuple[int, ...]:
        """Check *key* is free and *parent* committed; the parent's id chain."""

        def get(k: str) -> sqlite3.Row | None:
            if tx is not None:
                return self._get(tx, k)
            rows = self._query(
                f"{_SELECT} WHERE s.snapshotter = ? AND s.key = ?", (self.snapshotter, k)
            )
            return rows[0] if rows else None

        if get(key) is not None:
            raise AlreadyExists(f"snapshot {key!r}: already exists")
        if not parent:
            return ()
        row = get(parent)
        if row is None:
            raise NotFound(f"parent snapshot {parent!r}: not found")
        if row["kind"] != Kind.COMMITTED.value:
            # InvalidArgument, as containerd: the caller named the wrong thing.
            raise InvalidArgument(f"parent snapshot {parent!r}: {row['kind']}, not committed")
        return (row["id"], *self._chain(row["parent_id"], tx))

    def _new_temp(self) -> _TempDir:
        # Created and locked inside a write transaction, so `cleanup` (which
        # scans inside one) never sees it unlocked.
        with self._tx():
            path = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.root))
            return _TempDir.lock(path)


_SELECT = (
    "SELECT s.id, s.key, s.parent_id, s.kind, s.labels, s.size, s.inodes, "
    "s.created_at, s.updated_at, p.key AS parent_key "
    "FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
)


class _TempDir:
    """A temporary snapshot directory and the ``flock`` that marks it in use."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def lock(cls, path: Path) -> _TempDir:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    @classmethod
    def try_lock(cls, path: Path) -> _TempDir | None:
        """Lock *path* unless someone holds it; None then (or if it vanished)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            # Not a directory we can lock: debris all the same, take it.
            return cls(path, -1)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None and self._fd >= 0:
            os.close(self._fd)
        self._fd = None


def remove_dir(path: Path) -> None:
    """Remove the tree at *path*, detaching anything mounted inside it first.

    A removal must never descend into a mount: it would delete the files of
    whatever is mounted there (a host directory bind-mounted into a
    container's root, say). So mounts on or below *path* (a container that
    was never unmounted) are lazily detached before the tree goes, the order
    containerd's ``removeCleanupDir`` reaches on ``EBUSY``; the walk itself
    still refuses to enter another filesystem.

    What is inside was written by a container and is as hostile as a layer
    (any depth or path length, any name, special files, ``chmod 000``):
    `ckfs.archive.secure.remove_all` copes with all of it.

    Raises:
        FileNotFoundError: *path* does not exist.
        OSError: the tree cannot be removed.
        CkfsError: a mount inside cannot be detached.
    """
    # Imported here: ckfs.archive loads the layer applier and decompressors,
    # which listing or stat'ing snapshots never needs.
    from ckfs.archive.secure import remove_all

    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    if mounts_under(path):
        log.warning("%s: detaching the mounts left inside before removing it", path)
        unmount_recursive(path, lazy=True)
    with _parent_fd(path) as parent:
        if not remove_all(parent, path.name):
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(path))


def disk_usage(path: Path) -> Usage:
    """Blocks and inodes used under *path*, each inode counted once.

    Like containerd's ``fs.DiskUsage``: hard links share one inode, so they
    are counted once; size is allocated blocks, not apparent length, so
    sparse files and reflinked copies count what they occupy. Mounts inside
    are not counted (``du -x``). The walk is `ckfs.archive.secure.walk_tree`,
    so a container-written tree of any depth and path length is measured.

    Raises:
        NotFound: *path* does not exist.
        OSError: a directory inside cannot be read.
    """
    from ckfs.archive.secure import walk_tree  # as in remove_dir

    try:
        top = os.lstat(path)
    except FileNotFoundError:
        raise NotFound(f"{path}: not found") from None
    seen = {(top.st_dev, top.st_ino)}
    size = top.st_blocks * 512

    def visit(fd: int, entry: os.DirEntry[str]) -> bool:
        nonlocal size
        st = entry.stat(follow_symlinks=False)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
        return entry.is_dir(follow_symlinks=False) and st.st_dev == top.st_dev

    if stat.S_ISDIR(top.st_mode):
        with _parent_fd(path) as parent:
            walk_tree(parent, path.name, visit)
    return Usage(size=size, inodes=len(seen))


@contextlib.contextmanager
def _parent_fd(path: Path) -> Iterator[int]:
    """*path*'s directory, open for the fd-relative walks of `ckfs.archive.secure`."""
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _clean_labels(name: str, labels: Mapping[str, str] | None) -> dict[str, str]:
    """Labels without empty values (an empty value deletes), size-checked."""
    clean = {k: v for k, v in (labels or {}).items() if v != ""}
    validate_labels(clean, f"snapshot {name!r}")
    return clean


def _info(row: sqlite3.Row) -> Info:
    return Info(
        kind=Kind(row["kind"]),
        name=row["key"],
        parent=row["parent_key"] or "",
        labels=json.loads(row["labels"]),
        created_at=ns_to_datetime(row["created_at"]),
        updated_at=ns_to_datetime(row["updated_at"]),
    )
