"""The real ckfsd process: readiness, its socket, its locks, its signals, its log.

Every daemon here is started by `integration.daemon` on a temporary root and
socket and stopped by its PID; RPCs go through real grpc channels.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ckfs.api.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from ckfs.digest import Digest
from ckfs.state import State
from integration.daemon import (
    Daemon,
    channel,
    ckfsd_command,
    ckfsd_fixture,  # noqa: F401  (the fixture ckfsd)
    daemon_env,
    running_ckfsd,
    socket_dir,
    start,
    stop,
)

SNAPSHOTS = "/containerd.services.snapshots.v1.Snapshots"
CHAIN = Digest.from_hex("sha256", "ab" * 32)


def stat_missing(daemon: Daemon, **kwargs: object) -> grpc.RpcError:
    """A Snapshots.Stat of a key that does not exist: its error."""
    with channel(daemon) as chan:
        stub = snapshots_pb2_grpc.SnapshotsStub(chan)
        request = snapshots_pb2.StatSnapshotRequest(snapshotter="overlayfs", key="missing")
        with pytest.raises(grpc.RpcError) as info:
            stub.Stat(request, timeout=30, **kwargs)
    return info.value


def snapshot_names(daemon: Daemon) -> list[str]:
    with channel(daemon) as chan:
        stub = snapshots_pb2_grpc.SnapshotsStub(chan)
        batches = stub.List(snapshots_pb2.ListSnapshotsRequest(snapshotter="overlayfs"), timeout=30)
        return sorted(info.name for batch in batches for info in batch.info)


def run_ckfsd(root: Path, sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A ckfsd expected to refuse to start: its exit status and output."""
    return subprocess.run(
        ckfsd_command(root, sock, *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(),
        stdin=subprocess.DEVNULL,
    )


def refused(proc: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a ckfsd that exited 1."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckfsd: "), proc.stderr
    return lines[0]


def test_ready_means_the_socket_answers(ckfsd: Daemon) -> None:
    # READY=1 came before anything else was said, and the first RPC answers.
    assert stat_missing(ckfsd).code() == grpc.StatusCode.NOT_FOUND
    first = ckfsd.log_text().splitlines()[0]
    assert f"serving {ckfsd.root} on {ckfsd.address} (pid {ckfsd.pid})" in first


def test_socket_mode_and_nothing_else_left(ckfsd: Daemon) -> None:
    mode = ckfsd.socket.lstat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660
    # The temporary name it was bound under was renamed, not left.
    assert sorted(p.name for p in ckfsd.socket.parent.iterdir()) == [
        ".ckfsd.sock.lock",
        "ckfsd.log",
        "ckfsd.sock",
        "ckfsd.toml",
    ]


def test_one_line_per_rpc_and_no_metadata(ckfsd: Daemon) -> None:
    secret = "Bearer do-not-log-me"
    stat_missing(ckfsd, metadata=(("authorization", secret),))
    lines = [line for line in ckfsd.log_text().splitlines() if f"{SNAPSHOTS}/Stat" in line]
    assert len(lines) == 1
    assert lines[0].split()[-2:-1] == ["NOT_FOUND"] and lines[0].endswith("ms")
    assert "do-not-log-me" not in ckfsd.log_text()


def test_other_namespaces_are_refused(ckfsd: Daemon) -> None:
    from ckfs.api.services.content.v1 import content_pb2, content_pb2_grpc

    metadata = (("containerd-namespace", "k8s.io"),)
    with channel(ckfsd) as chan:
        stub = content_pb2_grpc.ContentStub(chan)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.List(content_pb2.ListContentRequest(), metadata=metadata, timeout=30))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ckfs has only the 'default' namespace" in (info.value.details() or "")
    # Snapshots keys carry containerd's namespace themselves: any is served.
    assert stat_missing(ckfsd, metadata=metadata).code() == grpc.StatusCode.NOT_FOUND


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    with socket_dir() as sockets:
        sock = sockets / "ckfsd.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(sock))
        dead.close()  # the file stays; nothing listens
        daemon = start(tmp_path / "root", sock, sockets / "ckfsd.log")
        try:
            assert stat_missing(daemon).code() == grpc.StatusCode.NOT_FOUND
        finally:
            assert stop(daemon.process) == 0


def test_a_live_daemon_is_not_displaced(ckfsd: Daemon, tmp_path: Path) -> None:
    # Another root on the same socket: the socket's lock says who holds it.
    line = refused(run_ckfsd(tmp_path / "other", ckfsd.socket))
    assert line == f"ckfsd: another ckfsd listens on {ckfsd.socket} (pid {ckfsd.pid})"
    # The same root on another socket: the root's lock.
    with socket_dir() as sockets:
        line = refused(run_ckfsd(ckfsd.root, sockets / "other.sock"))
        assert line == f"ckfsd: another ckfsd serves {ckfsd.root} (pid {ckfsd.pid})"
        assert not (sockets / "other.sock").exists()
    # The first daemon is untouched.
    assert stat_missing(ckfsd).code() == grpc.StatusCode.NOT_FOUND


def test_a_socket_of_another_program_is_refused(tmp_path: Path) -> None:
    with socket_dir() as sockets, socket.socket(socket.AF_UNIX) as other:
        other.bind(str(sockets / "busy.sock"))
        other.listen()
        line = refused(run_ckfsd(tmp_path / "root", sockets / "busy.sock"))
        assert line == f"ckfsd: another program listens on {sockets / 'busy.sock'}"
        (sockets / "file").write_text("not a socket")
        line = refused(run_ckfsd(tmp_path / "root", sockets / "file"))
        assert "is not a socket" in line
        assert (sockets / "file").read_text() == "not a socket"


def test_bad_addresses_and_config_are_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*ckfsd_command(tmp_path / "root", tmp_path / "x.sock")[:-1], "tcp://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(),
    )
    assert "unix sockets only" in refused(proc)
    config = tmp_path / "ckfsd.toml"
    config.write_text('root = "/x"\nsecret_key = 1\n')
    assert "unknown key 'secret_key'" in refused(
        run_ckfsd(tmp_path / "root", tmp_path / "x.sock", "--config", str(config))
    )


def test_sigterm_exits_0_within_the_grace(ckfsd: Daemon) -> None:
    started = time.monotonic()
    assert stop(ckfsd.process) == 0
    assert time.monotonic() - started < 10
    assert not ckfsd.socket.exists()
    assert "SIGTERM received" in ckfsd.log_text()


def test_sigterm_cancels_an_rpc_past_the_grace(tmp_path: Path) -> None:
    """A Content Write left open by its client is cancelled after the grace period."""
    from ckfs.api.services.content.v1 import content_pb2, content_pb2_grpc

    with running_ckfsd(tmp_path / "root", grace=1.0) as daemon:
        hold = threading.Event()

        def requests() -> Iterator[content_pb2.WriteContentRequest]:
            yield content_pb2.WriteContentRequest(action=content_pb2.STAT, ref="held-open")
            hold.wait(60)  # the client has more to say, later

        with channel(daemon) as chan:
            responses = content_pb2_grpc.ContentStub(chan).Write(requests(), timeout=60)
            next(responses)
            started = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(timeout=20) == 0
            took = time.monotonic() - started
            hold.set()
            with pytest.raises(grpc.RpcError):
                list(responses)
    assert 1.0 <= took < 10, took


def test_sighup_reloads_and_keeps_serving(ckfsd: Daemon) -> None:
    os.kill(ckfsd.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "reloaded configuration (SIGHUP)" not in ckfsd.log_text():
        assert time.monotonic() < deadline, ckfsd.log_text()
        time.sleep(0.05)
    assert stat_missing(ckfsd).code() == grpc.StatusCode.NOT_FOUND
    assert ckfsd.process.poll() is None


def _interrupted_unpack(root: Path, chain: Digest) -> str:
    """An extract snapshot as an unpack killed mid-layer leaves it; its key."""
    key = f"extract-1-dead {chain}"
    state = State(root)
    try:
        state.snapshotter("overlayfs").prepare(key, "")
    finally:
        state.close()
    return key


def test_kill_9_then_restart_clears_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with socket_dir() as sockets:
        sock, log = sockets / "ckfsd.sock", sockets / "ckfsd.log"
        daemon = start(root, sock, log)
        daemon.process.kill()
        daemon.process.wait(timeout=30)
        assert sock.exists()  # a killed daemon removes nothing
        left = _interrupted_unpack(root, CHAIN)
        # Another unpack of a second layer is still running (holds its lock):
        # its extract snapshot is not a leftover.
        busy_chain = Digest.from_hex("sha256", "cd" * 32)
        busy = _interrupted_unpack(root, busy_chain)
        lock = os.open(root / "locks" / busy_chain.hex, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            daemon = start(root, sock, log)
        finally:
            os.close(lock)
        try:
            assert snapshot_names(daemon) == [busy]
            assert f"removed overlayfs snapshot {left!r}" in daemon.log_text()
        finally:
            assert stop(daemon.process) == 0


def test_sd_notify_ready_then_stopping(tmp_path: Path) -> None:
    with socket_dir() as sockets, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(sockets / "notify"))
        notify.settimeout(30)
        env = {"NOTIFY_SOCKET": str(sockets / "notify")}
        daemon = start(tmp_path / "root", sockets / "d.sock", sockets / "d.log", env=env)
        try:
            assert notify.recv(4096) == f"READY=1\nMAINPID={daemon.pid}".encode()
        finally:
            assert stop(daemon.process) == 0
        assert notify.recv(4096) == b"STOPPING=1"
