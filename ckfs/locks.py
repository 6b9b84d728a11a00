"""Exclusive file locks taken without waiting, one way for every holder.

Unpack's per-chain-ID locks, ckfsd's recovery testing them, and ckfsd's
claim on its root and socket all take a ``flock`` on a lock file that may
not exist yet, and must not leak the descriptor when the lock is taken by
another process (or the attempt is interrupted).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["try_lock"]


def try_lock(path: Path, mode: int = 0o600, *, create: bool = True) -> int | None:
    """A descriptor holding the exclusive flock on *path*; None if another holds it.

    *path* is created with *mode* if missing (its directory must exist);
    without *create*, a missing *path* (or directory) is None too: a lock
    file its holder has yet to make (``ckfs shell``'s bundles).
    The lock lasts until the caller closes the descriptor, or its process
    dies: a killed holder leaves nothing to clear.
    """
    if create:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    else:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd
