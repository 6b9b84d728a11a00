"""Small file helpers the writer, reader and store share.

Everything here works on raw file descriptors with ``pread``/``preadv``:
no Python-level buffering sits between a blob file and hashlib, and a
descriptor's position is never disturbed, so these are safe on a descriptor
another method of the same object is using.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckfs.digest import CHUNK, Digester

__all__ = ["fsync_dir", "hash_fd", "pread_exact"]


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
