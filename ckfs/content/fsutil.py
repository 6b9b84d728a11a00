"""Small file helpers the writer, reader and store share.

Everything here works on raw file descriptors with ``pread``/``preadv``:
no Python-level buffering sits between a blob file and hashlib, and a
descriptor's position is never disturbed, so these are safe on a descriptor
another method of the same object is using.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ckfs.digest import CHUNK, Digester

__all__ = ["fsync_dir", "hash_fd", "pread_exact", "replace_file", "start_writeback"]


def hash_fd(fd: int, algorithm: str, limit: int | None = None) -> tuple[Digester, int]:
    """Hash a file from offset 0 up to *limit* bytes (or EOF).

    Why a digester and not a digest: a resuming writer keeps feeding the
    returned digester with new bytes.

    Returns:
        The digester fed with the bytes read, and how many were read.
    """
    d = Digester(algorithm)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    pos = 0
    while limit is None or pos < limit:
        want = CHUNK if limit is None else min(CHUNK, limit - pos)
        n = os.preadv(fd, [view[:want]], pos)
        if n == 0:
            break
        d.update(view[:n])
        pos += n
    return d, pos


def pread_exact(fd: int, n: int, offset: int) -> bytes:
    """Read *n* bytes at *offset*, fewer only at end of file.

    ``pread`` may return short reads (signals, some filesystems); callers of
    ``read_at`` expect exactly what they asked for unless the blob ends.
    """
    data = os.pread(fd, n, offset)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks in *path* durable.

    A rename is only as durable as the directory entry it changed: without
    this, a power loss after commit can leave the blob back in the ingest.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Make *data* the content of *path* atomically and durably.

    A small state file another process may read at any moment (a merged
    view, an override record): it sees the old content or the new one,
    never a part, and a power loss keeps one of them.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


#: ``sync_file_range(2)`` flag: start writing back the dirty pages of the
#: range, without waiting for it (``<linux/fs.h>``).
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + length)`` to disk now.

    Why: a blob written in one go otherwise sits dirty in the page cache
    until the commit's fsync, which then stalls on all of it at once. Started
    while the rest is still arriving, the writeback overlaps the download and
    the fsync finds little left to do (RocksDB's ``bytes_per_sync``). It
    changes no durability promise: commit still fsyncs. Best effort: where
    ``sync_file_range`` is missing or refuses (another OS, some filesystems),
    nothing happens.
    """
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range``, or None; Python's os module does not offer it."""
    import ctypes  # here: most commands never write a large blob

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn
