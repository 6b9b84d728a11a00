"""The daemon's places: its root and its socket, each held by one ckfsd.

Two locks, both ``flock`` on a file beside the thing they guard, released
by the kernel when the process dies however it dies:

- ``<root>/locks/ckfsd``: two daemons never serve one root (two could race
  on its mounts and caches; CLI processes share a root safely through the
  stores' own locks and do not take this one);
- ``<dir>/.<socket>.lock``: two daemons never fight over one socket name.

Each lock file holds the PID of its holder, so a refusal can name it.

The socket appears atomically with its final mode: grpcio binds a temporary
name in the same directory, `bind` chmods it to `SOCKET_MODE`, and a
rename puts it in place, replacing a stale socket of a dead daemon in the
same step. No client ever sees a socket with the wrong mode, or no socket
between the old and the new. grpcio can only bind a path (its Python API
takes no listening descriptor), hence the rename rather than a bind on a
socket prepared here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path
from typing import Any

from ckfs.errors import FailedPrecondition, Unavailable
from ckfs.locks import try_lock

__all__ = [
    "SOCKET_DIR_MODE",
    "SOCKET_MODE",
    "bind",
    "claim",
    "hold",
    "release",
    "remove_socket",
    "socket_answers",
    "socket_lock",
]

#: Owner and group may connect, as containerd's socket: the daemon acts with
#: root's rights on a root's behalf, so "others" must not reach it.
SOCKET_MODE = 0o660

#: Mode of a socket directory the daemon creates: anyone may look up the
#: socket in it; the socket's own mode decides who may connect.
SOCKET_DIR_MODE = 0o755


def _holder(lock: Path) -> str:
    """`` (pid N)`` from a lock file's content, or nothing if unreadable."""
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(lock.read_text().strip())})"
    return ""


def hold(lock: Path, busy: str) -> int:
    """Take the exclusive lock *lock* for this process; its descriptor.

    Args:
        lock: the lock file, created if missing.
        busy: the refusal if another process holds it (its PID is added).

    Raises:
        Unavailable: another process holds the lock.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = try_lock(lock, 0o644)  # readable: the refusal names the holder's pid
    if fd is None:
        raise Unavailable(f"{busy}{_holder(lock)}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(fd: int) -> None:
    """Give up a lock `hold` took (closing is enough for flock)."""
    os.close(fd)


def socket_lock(path: Path) -> Path:
    """The lock file that guards the socket *path*."""
    return path.with_name(f".{path.name}.lock")


def socket_answers(path: Path) -> bool:
    """Whether something accepts connections on the unix socket *path*.

    A refused connection is a socket whose listener died; a missing path
    answers nothing either.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as e:
            if e.errno in (errno.ENOTSOCK, errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
        return True


def claim(path: Path) -> int:
    """Make *path* this daemon's socket name; the lock's descriptor.

    A socket left by a dead daemon stays until `bind` replaces it.

    Raises:
        Unavailable: another ckfsd, or another program, listens on *path*.
        FailedPrecondition: *path* exists and is not a socket.
    """
    path.parent.mkdir(mode=SOCKET_DIR_MODE, parents=True, exist_ok=True)
    fd = hold(socket_lock(path), f"another ckfsd listens on {path}")
    try:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return fd
        if not stat.S_ISSOCK(mode):
            raise FailedPrecondition(f"{path} exists and is not a socket; not replacing it")
        if socket_answers(path):
            raise Unavailable(f"another program listens on {path}")
    except BaseException:
        release(fd)
        raise
    return fd


def bind(server: Any, path: Path) -> None:
    """Bind the grpc *server* to the unix socket *path*, atomically, mode 0660.

    Call after `claim`, before ``server.start()``.

    Raises:
        Unavailable: grpcio could not bind the temporary name.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    try:
        port = server.add_insecure_port(f"unix://{temp}")
    except RuntimeError as e:  # grpcio >= 1.5x raises where it used to answer 0
        raise Unavailable(f"cannot listen on {temp}: {e}") from None
    if not port:
        raise Unavailable(f"cannot listen on {temp}")
    try:
        os.chmod(temp, SOCKET_MODE)
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def remove_socket(path: Path) -> None:
    """Remove our socket at exit, so clients find no daemon at once.

    Only while we still hold its lock: the name is ours, whatever is there.
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
