"""Starting, adopting and stopping a state root's FUSE serving process.

The serving process (`snapshotters.fuse.server`) outlives whoever started it:
ckfsd or the CLI may exit, be restarted or be killed, and every overlay on the
FUSE mount keeps reading. So it is started detached (its own session,
re-parented to init), and whoever needs it later finds it again by its state
under ``<root>/fuse/``::

    fuse/mnt            the mountpoint
    fuse/server.lock    flock held by the live server for its whole life
    fuse/server.pid     its PID (written while it holds the lock)
    fuse/server.log     its log (stdout and stderr too)
    fuse/stats.json     lazily read layers' counters: {"layers": {digest: {"fetched", ...}}}
    fuse/start.lock     flock held by a starter, so two never race
    fuse/views/         merged views, <name>.json

Whether a server lives is whether its lock is held: unlike a PID, a lock
cannot be mistaken for a recycled process, and a ``kill -9`` releases it.
A dead server leaves its mount behind, answering ENOTCONN ("Transport
endpoint is not connected"; ``auto_unmount`` does not help after kill -9):
`ensure_server` detaches it and serves again at the same path, and the
overlays stacked on the dead mount must then be mounted again by their owner.

Blocking (polling and sleeps): call from a thread in async code.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ckfs.errors import FailedPrecondition, Unavailable
from ckfs.locks import try_lock
from ckfs.mount import is_mountpoint, is_stale, mountinfo, unmount

__all__ = ["FSTYPE", "START_TIMEOUT", "STOP_TIMEOUT", "ServerPaths", "ensure_server", "stop_server"]

log = logging.getLogger(__name__)

#: What `_start` runs (with ``python -m``).
SERVER_MODULE = "snapshotters.fuse.server"

#: The mount's type in /proc/self/mountinfo (``subtype=ckfs``).
FSTYPE = "fuse.ckfs"

#: Seconds a new server may take to mount: Python start-up and imports take
#: about half a second on an idle machine; a loaded one needs more.
START_TIMEOUT = 30.0

#: Seconds a server may take to unmount and exit after SIGTERM before it
#: is killed.
STOP_TIMEOUT = 10.0

#: Polling interval while waiting for a server to mount or exit.
_POLL = 0.02

#: Log lines quoted when a server fails to start.
_LOG_TAIL = 10


@dataclass(frozen=True)
class ServerPaths:
    """The serving process's files under a state root (module docstring)."""

    root: Path

    @property
    def dir(self) -> Path:
        return self.root / "fuse"

    @property
    def mnt(self) -> Path:
        return self.dir / "mnt"

    @property
    def lock(self) -> Path:
        return self.dir / "server.lock"

    @property
    def pid(self) -> Path:
        return self.dir / "server.pid"

    @property
    def log(self) -> Path:
        return self.dir / "server.log"

    @property
    def stats(self) -> Path:
        return self.dir / "stats.json"

    @property
    def start_lock(self) -> Path:
        return self.dir / "start.lock"

    @property
    def views(self) -> Path:
        return self.dir / "views"

    @property
    def chains(self) -> Path:
        """Override records of variant layer directories (`snapshotters.fuse.overrides`)."""
        return self.dir / "chains"


def ensure_server(
    root: Path, *, timeout: float = START_TIMEOUT, cache_max: int | None = None
) -> Path:
    """The mountpoint of *root*'s live FUSE server, started if needed.

    A live server is adopted (one holding its lock while its mount already
    answers ENOTCONN is dying: it is waited for). A dead one's mount is
    detached and a new server mounts at the same path. A new server runs
    detached: it outlives the caller. The ENOTCONN check is a ``stat`` of the
    mountpoint: a live server that answers nothing blocks it.

    Args:
        root: the ckfs state root.
        timeout: seconds to wait for a new server's mount.
        cache_max: the bound on the chunk cache's files a new server gets
            (``--cache-max``); by default its share of the disk. A live
            server keeps its own.

    Returns:
        ``<root>/fuse/mnt``, served.

    Raises:
        Unavailable: the server did not come up in time, or exited (the
            message quotes its log).
        FailedPrecondition: something that is not a live ckfs server is
            mounted on the mountpoint.
    """
    paths = ServerPaths(root)
    paths.dir.mkdir(parents=True, exist_ok=True)
    with _held(paths.start_lock):
        deadline = time.monotonic() + timeout
        if server_pid(paths) is not None and not _dying(paths, deadline):
            return _wait_mounted(paths, deadline)
        clean_mount(paths)
        _start(paths, timeout, cache_max)
        return _wait_mounted(paths, deadline)


def stop_server(root: Path, *, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop *root*'s server by its pid file's PID; detach whatever mount it left.

    SIGTERM first (the server unmounts and exits), SIGKILL after *timeout*.

    Returns:
        Whether a live server was stopped.
    """
    paths = ServerPaths(root)
    pid = server_pid(paths)
    if pid is not None:
        _signal(pid, signal.SIGTERM)
        if not _wait_gone(paths, time.monotonic() + timeout):
            log.warning("fuse server %d ignored SIGTERM for %.0f s: killing it", pid, timeout)
            _signal(pid, signal.SIGKILL)
            _wait_gone(paths, time.monotonic() + timeout)
        _wait_exited(pid, time.monotonic() + timeout)
    clean_mount(paths)
    return pid is not None


def _wait_exited(pid: int, deadline: float) -> None:
    """Until *pid* has exited: it releases its lock a moment before its
    interpreter is done, and "stopped" must mean no process left."""
    while pid > 0 and time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat[stat.rindex(")") + 2] == "Z":
            return
        time.sleep(_POLL)


def server_pid(paths: ServerPaths) -> int | None:
    """The live server's PID, None when no server holds the lock."""
    if not paths.lock.exists():
        return None
    fd = try_lock(paths.lock)
    if fd is not None:
        os.close(fd)
        return None
    try:
        return int(paths.pid.read_text())
    except (FileNotFoundError, ValueError):
        # Locked but no PID yet: a server between its lock and its pid
        # file. Say "alive" with an impossible PID rather than start another.
        return 0


def clean_mount(paths: ServerPaths) -> bool:
    """Detach a mount with no live server behind it (call with no server).

    Returns:
        Whether something was detached.

    Raises:
        FailedPrecondition: the mount answers, so it is not ours to remove.
    """
    detached = False
    while is_mountpoint(paths.mnt):
        if not is_stale(paths.mnt) and _fstype(paths.mnt) != FSTYPE:
            raise FailedPrecondition(f"{paths.mnt}: a live non-ckfs filesystem is mounted there")
        log.info("fuse: detaching the dead mount %s", paths.mnt)
        unmount(paths.mnt, lazy=True)
        detached = True
    return detached


def _dying(paths: ServerPaths, deadline: float) -> bool:
    """Whether the server holding the lock is dying: its mount answers ENOTCONN.

    A killed process's files are released in no fixed order: its FUSE
    connection may be gone while its lock is still held. Such a server is
    waited for until its lock goes.

    Raises:
        Unavailable: the lock is still held at *deadline*.
    """
    if not (is_mountpoint(paths.mnt) and is_stale(paths.mnt)):
        return False
    if not _wait_gone(paths, deadline):
        raise Unavailable(f"{paths.mnt}: dead (ENOTCONN), but its server still holds its lock")
    return True


def _fstype(where: Path) -> str:
    found = [m.fstype for m in mountinfo() if m.mountpoint == str(where)]
    return found[-1] if found else ""


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """Hold the flock on *path* (waiting for it) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _start(paths: ServerPaths, timeout: float, cache_max: int | None) -> None:
    """Run the server detached; return once its starter (not it) exited.

    The child double-forks (``--detach``): the server is re-parented to
    init, so it is reaped when it dies however long its starter lives.
    """
    paths.pid.unlink(missing_ok=True)
    command = [sys.executable, "-m", SERVER_MODULE, "--root", str(paths.root), "--detach"]
    if cache_max is not None:
        command += ["--cache-max", str(cache_max)]
    with open(paths.log, "ab") as out:
        starter = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
    try:
        code = starter.wait(timeout)
    except subprocess.TimeoutExpired:
        starter.kill()
        starter.wait()
        raise Unavailable(
            f"fuse server for {paths.root}: did not start in {timeout:.0f} s"
        ) from None
    if code != 0:
        raise Unavailable(f"fuse server for {paths.root}: exited {code}: {_tail(paths.log)}")


def _wait_mounted(paths: ServerPaths, deadline: float) -> Path:
    while True:
        if is_mountpoint(paths.mnt) and _fstype(paths.mnt) == FSTYPE and server_pid(paths):
            return paths.mnt
        if server_pid(paths) is None and paths.pid.exists():
            raise Unavailable(f"fuse server for {paths.root} exited: {_tail(paths.log)}")
        if time.monotonic() > deadline:
            raise Unavailable(
                f"fuse server for {paths.root}: not mounted in time: {_tail(paths.log)}"
            )
        time.sleep(_POLL)


def _wait_gone(paths: ServerPaths, deadline: float) -> bool:
    while server_pid(paths) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True


def _signal(pid: int, sig: int) -> None:
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):  # ESRCH: gone already
        os.kill(pid, sig)


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL:]
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(lines) or "(empty log)"
