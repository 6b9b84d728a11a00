"""Ingest directories: where a blob lives while it is written, and who owns it.

Layout of ``<content>/ingest/<sha256 hex of ref>/``::

    data       the bytes written so far; its size is the ingest's offset
    ref        the caller's ref, verbatim (the directory name is only its hash,
               so any string is a safe ref)
    total      expected final size, decimal; absent when unknown
    expected   expected digest; absent when unknown
    startedat  creation time, decimal nanoseconds
    updatedat  last write, decimal nanoseconds, saved when a writer closes
    lock       flock(2) target; held exclusively by the one live writer

Why flock on a file: the kernel drops the lock when the holder's last file
descriptor closes, including when the process is killed, so a crashed pull
never leaves a ref locked, and the same lock works between threads (each
opens its own descriptor) and between processes. The lock file lives inside
the directory it guards, so removing an ingest must not strand a waiter on a
deleted inode: removal renames the directory away while holding the lock, and
`acquire` re-checks after locking that its descriptor is still the file at
the path, retrying otherwise.

Metadata files are written to a temporary name and renamed, so a reader
never sees half a number. ``data`` is created last: an ingest without it is
treated as new and its metadata is rewritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ckfs.content.types import Status, ns_to_datetime
from ckfs.digest import Digest
from ckfs.errors import InvalidArgument, NotFound, Unavailable

__all__ = [
    "DATA",
    "acquire",
    "check_ref",
    "held",
    "ingest_dir",
    "is_ingest_name",
    "read_expected",
    "read_int",
    "read_meta",
    "read_status",
    "release",
    "remove",
    "sweep_tombstones",
    "write_meta",
]

DATA = "data"
REF = "ref"
TOTAL = "total"
EXPECTED = "expected"
STARTED_AT = "startedat"
UPDATED_AT = "updatedat"
LOCK = "lock"

#: Prefix of ingest directories being deleted; never a sha256 hex name, so
#: listings skip them.
TOMBSTONE_PREFIX = ".del-"

#: Bound on `acquire` retries after losing a race with a removal. Each retry
#: means another thread removed this very ingest in the last microseconds;
#: more than a handful means something is looping and we should say so.
_MAX_LOCK_RETRIES = 64


def check_ref(ref: str) -> None:
    """Refuse refs that cannot name an ingest.

    Raises:
        InvalidArgument: *ref* is not a non-empty string.
    """
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument(f"invalid ingest ref {ref!r}: must be a non-empty string")


def ingest_dir(ingest_root: Path, ref: str) -> Path:
    """The directory of *ref*'s ingest (hashed so any ref is a safe name)."""
    return ingest_root / hashlib.sha256(ref.encode()).hexdigest()


def acquire(path: Path, ref: str, *, create: bool) -> int:
    """Lock the ingest at *path* for *ref*; return the lock's file descriptor.

    The lock is held until the descriptor is closed (`release`).

    Args:
        path: the ingest directory (`ingest_dir`).
        ref: for messages.
        create: make the directory if missing (a writer); otherwise a missing
            ingest is `NotFound` (abort).

    Raises:
        Unavailable: another writer, in this process or any other, holds it.
        NotFound: *create* is false and there is no such ingest.
    """
    lock_path = path / LOCK
    for _ in range(_MAX_LOCK_RETRIES):
        if create:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                # pathlib saw EEXIST, then no directory: a removal renamed it
                # away in between. Start over.
                continue
        elif not path.is_dir():
            raise NotFound(f"ingest ref {ref}: not found")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            continue  # removed between mkdir and open; start over
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Unavailable(f"ref {ref} locked: another writer holds it") from None
        except BaseException:
            os.close(fd)
            raise
        # Locked; but is it still *the* lock, or one of a removed ingest?
        try:
            st = os.stat(lock_path)
        except FileNotFoundError:
            st = None
        mine = os.fstat(fd)
        if st is not None and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)
    raise Unavailable(f"ref {ref}: lost {_MAX_LOCK_RETRIES} races with concurrent removal")


def release(fd: int) -> None:
    """Drop the lock taken by `acquire` (closing is what releases it)."""
    os.close(fd)


@contextlib.contextmanager
def held(path: Path, ref: str) -> Iterator[None]:
    """Hold the lock of the existing ingest at *path* for the block (abort, expiry).

    Raises:
        NotFound, Unavailable: as `acquire` without *create*.
    """
    fd = acquire(path, ref, create=False)
    try:
        yield
    finally:
        release(fd)


def remove(path: Path) -> None:
    """Delete an ingest directory; the caller must hold its lock.

    The directory is first renamed to a tombstone so that anyone racing to
    open ``lock`` by path finds either the old inode (and then notices it is
    stale) or a fresh directory, never a half-deleted one.
    """
    tomb = path.with_name(f"{TOMBSTONE_PREFIX}{path.name}-{os.urandom(16).hex()}")
    try:
        os.rename(path, tomb)
    except FileNotFoundError:
        return
    shutil.rmtree(tomb, ignore_errors=True)


def sweep_tombstones(ingest_root: Path) -> None:
    """Finish removals a crash interrupted (between `remove`'s rename and rmtree).

    Without this an interrupted abort or commit of a large layer would leave
    its bytes on disk forever, invisible to `read_status` listings. Another
    process may be deleting the same tombstone; both tolerate that.
    """
    try:
        names = os.listdir(ingest_root)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(TOMBSTONE_PREFIX):
            shutil.rmtree(ingest_root / name, ignore_errors=True)


def named(e: OSError, path: Path) -> OSError:
    """*e* again, naming *path* unless it names a file already.

    Writes through descriptors name no file, and a full disk must still say
    where; raise the result ``from e``.
    """
    return OSError(e.errno, e.strerror, e.filename or str(path))


def write_meta(path: Path, name: str, value: str) -> None:
    """Replace metadata file *name* atomically (temporary file + rename)."""
    tmp = path / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise named(e, tmp) from e
    finally:
        os.close(fd)
    os.replace(tmp, path / name)


def read_meta(path: Path, name: str) -> str | None:
    """The text of metadata file *name*, or None when it does not exist."""
    try:
        return (path / name).read_text()
    except FileNotFoundError:
        return None


def read_int(path: Path, name: str) -> int | None:
    """A decimal metadata file, None when absent or unreadable (torn by a crash)."""
    text = read_meta(path, name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def read_expected(path: Path) -> Digest | None:
    """The ``expected`` digest, None when absent or invalid."""
    text = read_meta(path, EXPECTED)
    if not text:
        return None
    try:
        return Digest.parse(text.strip())
    except InvalidArgument:
        return None


def read_status(path: Path) -> Status:
    """The `Status` of the ingest at *path*, read without taking its lock.

    A live writer may be appending meanwhile: the offset is the size of
    ``data`` at the moment of the stat, and the update time the later of the
    saved ``updatedat`` and ``data``'s mtime, so progress shows while a
    writer in another process is busy.

    Raises:
        NotFound: no ingest here, or one still being created (no ``ref``).
    """
    ref = read_meta(path, REF)
    if ref is None:
        raise NotFound(f"ingest {path.name}: not found")
    try:
        st: os.stat_result | None = os.stat(path / DATA)
    except FileNotFoundError:
        st = None
    started = read_int(path, STARTED_AT)
    if started is None:
        try:
            started = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            raise NotFound(f"ingest ref {ref}: not found") from None
    updated = read_int(path, UPDATED_AT) or started
    if st is not None:
        updated = max(updated, st.st_mtime_ns)
    return Status(
        ref=ref,
        offset=st.st_size if st is not None else 0,
        total=read_int(path, TOTAL) or 0,
        expected=read_expected(path),
        started_at=ns_to_datetime(started),
        updated_at=ns_to_datetime(updated),
    )


def is_ingest_name(name: str) -> bool:
    """Whether a directory entry under ``ingest/`` names an ingest."""
    return len(name) == 64 and not name.startswith(".")
