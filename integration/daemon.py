"""The real ``ckfsd`` for tests: started on a temporary root and socket, stopped by PID.

`running_ckfsd` starts ``python -m ckfsd`` (the console script's code, with
this interpreter) with ``--ready-fd``, waits for its ``READY=1``, yields a
`Daemon`, and in teardown, also when the test failed, sends SIGTERM, then
SIGKILL after a grace, to that PID only. The ``ckfsd`` fixture wraps it with
a fresh root (import `ckfsd_fixture` to use it); `channel` makes a gRPC
channel to a daemon.

Sockets live in a short directory under /tmp rather than in ``tmp_path``:
a unix socket path is limited to 107 bytes, and pytest's temporary paths
for long test names are longer.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ckfs.address import socket_path
from ckfs.client import root_address
from integration.conftest import REPO

__all__ = ["READY_TIMEOUT", "STOP_GRACE", "Daemon", "channel", "ckfsd_fixture", "running_ckfsd"]

#: Seconds a daemon may take to answer on its socket (interpreter start,
#: grpc import, recovery of a small root), with room for a loaded machine.
READY_TIMEOUT = 60.0

#: Seconds between SIGTERM and SIGKILL in teardown: the daemon's own grace
#: period (set low by `running_ckfsd`) plus its start-up and exit.
STOP_GRACE = 15.0


@dataclass
class Daemon:
    """A running ckfsd.

    Attributes:
        address: its ``unix://`` address.
        socket: the socket's path.
        root: the state root it serves.
        pid: its process ID.
        log: its stderr, as a file (one line per RPC at info).
        process: the `subprocess.Popen` (to wait for its exit status).
    """

    address: str
    socket: Path
    root: Path
    pid: int
    log: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def ckfsd_command(root: Path, socket: Path | None, *args: str) -> list[str]:
    """The command line of a ckfsd on *root* and *socket* (None: the root's own)."""
    address = ["--address", f"unix://{socket}"] if socket else []
    return [sys.executable, "-m", "ckfsd", "--root", str(root), *address, *args]


def daemon_env() -> dict[str, str]:
    """The environment: ckfsd importable even before the package is reinstalled."""
    paths = [str(REPO / "cmd"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def wait_ready(read_fd: int, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Wait for ``READY=1`` on *read_fd*; fail with the daemon's log if it never comes."""
    deadline = time.monotonic() + timeout
    received = b""
    while b"\n" not in received:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"ckfsd not ready within {timeout:.0f}s:\n{log.read_text()}")
        readable, _, _ = select.select([read_fd], [], [], left)
        if readable:
            chunk = os.read(read_fd, 64)
            if not chunk:  # closed without a word: the daemon failed to start
                process.wait(timeout=10)
                pytest.fail(f"ckfsd exited {process.returncode} before ready:\n{log.read_text()}")
            received += chunk
    assert received == b"READY=1\n", received


def start(
    root: Path,
    socket: Path | None,
    log: Path,
    *args: str,
    timeout: float = READY_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> Daemon:
    """Start ckfsd and wait until it is ready (the caller must `stop` it).

    Without a *socket* it is given no ``--address``: it listens on the
    root's own (`ckfs.client.root_address`). *env* adds to the daemon's
    environment.
    """
    read_fd, write_fd = os.pipe()
    try:
        with log.open("ab") as err:
            process = subprocess.Popen(
                [*ckfsd_command(root, socket, *args), "--ready-fd", str(write_fd)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                pass_fds=(write_fd,),
                env={**daemon_env(), **(env or {})},
            )
        os.close(write_fd)
        write_fd = -1
        try:
            wait_ready(read_fd, process, log, timeout)
        except BaseException:
            stop(process)
            raise
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    address = f"unix://{socket}" if socket else root_address(root)
    return Daemon(address, socket_path(address), root, process.pid, log, process)


def stop(process: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> int:
    """SIGTERM *process*, SIGKILL after *grace* seconds; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
    return process.returncode


@contextlib.contextmanager
def socket_dir() -> Iterator[Path]:
    """A short private directory for sockets, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ckfsd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_ckfsd(root: Path, *args: str, grace: float = 2.0) -> Iterator[Daemon]:
    """A ckfsd serving *root* on a fresh socket, stopped (by its PID) on exit.

    Args:
        root: the state root.
        args: more ckfsd options.
        grace: the daemon's ``grace_period`` (a config file is written).
    """
    with socket_dir() as sockets:
        config = sockets / "ckfsd.toml"
        config.write_text(f"grace_period = {grace}\n")
        daemon = start(
            root, sockets / "ckfsd.sock", sockets / "ckfsd.log", "--config", str(config), *args
        )
        try:
            yield daemon
        finally:
            stop(daemon.process)


@pytest.fixture(name="ckfsd")
def ckfsd_fixture(tmp_path: Path) -> Iterator[Daemon]:
    """A ckfsd on a fresh root under *tmp_path*.

    Import ``ckfsd_fixture`` into a test module to use the fixture ``ckfsd``.
    """
    with running_ckfsd(tmp_path / "root") as daemon:
        yield daemon


def channel(daemon: Daemon) -> grpc.Channel:
    """A gRPC channel to *daemon*; a namespace goes in each call's metadata."""
    return grpc.insecure_channel(daemon.address)
