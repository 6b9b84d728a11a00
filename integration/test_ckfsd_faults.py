"""ckfsd killed with SIGKILL mid-pull or mid-unpack: the next ckfsd cleans up and resumes.

The daemon is the one killed, not its client: a pull through ckfsd stalls
on the wire (the fault proxy holds the big layer after 4 MiB), the daemon
gets SIGKILL once the received bytes are in the ingest, a new ckfsd starts
on the same root and socket (the dead one's socket and locks are still
there), and the same Pull RPC completes, asking the registry only for the
bytes that were missing. The client of the killed daemon sees UNAVAILABLE,
not a hang.

Likewise mid-unpack: a Mounts RPC is applying a layer of many files when
the daemon is killed; the next ckfsd removes the ``extract-`` snapshot it
left before serving anything, and the same Mounts RPC then unpacks the
layer once and answers.
"""

from __future__ import annotations

import os
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

import snapshotters
from ckfs.api.v1 import ckfs_pb2, ckfs_pb2_grpc
from ckfs.state import State
from integration import test_unpack_crash
from integration.conftest import Ckfs
from integration.daemon import (
    Daemon,
    channel,
    ckfsd_fixture,  # noqa: F401  (the fixture ckfsd)
    socket_dir,
    start,
    stop,
)
from integration.faultproxy import Fault, FaultProxy
from integration.registry import BIG_REPO, Registry
from integration.test_pull import biggest_layer
from integration.test_unpack_crash import NAME, chain_ids, extracts, snapshot_dirs, snapshots

#: The crash test's image: a small layer, then one of 10,000 files.
big_image = test_unpack_crash.big_image

#: Seconds to wait for the stalled pull to have its bytes in the ingest.
REACH_TIMEOUT = 60.0


def pull(daemon: Daemon, ref: str) -> list[ckfs_pb2.PullEvent]:
    """The events of a Pull RPC (through ckfsd) of *ref*, registered."""
    with channel(daemon) as chan:
        stub = ckfs_pb2_grpc.CkfsStub(chan)
        return list(stub.Pull(ckfs_pb2.PullRequest(ref=ref, register=True), timeout=120))


def ingest_offset(root: Path, ref: str) -> int:
    """Bytes kept in the ingest *ref* on *root*, read as another process would."""
    state = State(root)
    try:
        return next((s.offset for s in state.content.list_statuses() if s.ref == ref), 0)
    finally:
        state.close()


def test_a_daemon_killed_mid_pull_leaves_a_resumable_ingest(
    tmp_path: Path, registry: Registry, big_layout: Path
) -> None:
    root = tmp_path / "root"
    layer = biggest_layer(big_layout)
    ingest = f"layer-{layer['digest']}"
    with FaultProxy(registry.host).running() as proxy, socket_dir() as sockets:
        ref = f"{proxy.host}/{BIG_REPO}"
        sock, log = sockets / "ckfsd.sock", sockets / "ckfsd.log"
        proxy.add(Fault("stall", path=layer["digest"], after=4 << 20))
        daemon = start(root, sock, log)
        with futures.ThreadPoolExecutor(1) as client:
            try:
                first = client.submit(pull, daemon, ref)
                # Until the received megabytes are in the ingest (or the
                # RPC failed on its own: then its error says why).
                deadline = time.monotonic() + REACH_TIMEOUT
                while (kept := ingest_offset(root, ingest)) < 3 << 20 and not first.done():
                    assert time.monotonic() < deadline, "the pull never reached the stall"
                    time.sleep(0.05)
                daemon.process.kill()
                daemon.process.wait(timeout=30)
            finally:
                stop(daemon.process)
            with pytest.raises(grpc.RpcError) as info:
                first.result(timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert proxy.stalled.is_set() and kept >= 3 << 20
        assert ingest_offset(root, ingest) == kept  # nothing half-committed, nothing lost

        proxy.clear()
        daemon = start(root, sock, log)
        try:
            events = pull(daemon, ref)
        finally:
            assert stop(daemon.process) == 0
    asked = proxy.requests(layer["digest"])
    assert [s.headers.get("range") for s in asked] == [f"bytes={kept}-"]
    assert proxy.body_bytes(layer["digest"]) == layer["size"] - kept
    summary = events[-1].summary
    assert summary.fetched_bytes <= layer["size"] - kept + 10_000  # + manifest, config
    assert any(e.blob.state == ckfs_pb2.RESUMING and e.blob.offset == kept for e in events[:-1])
    assert ingest_offset(root, ingest) == 0  # committed: no ingest left


def mounts(daemon: Daemon, ref: str, key: str, snapshotter: str) -> ckfs_pb2.MountsResponse:
    """A Mounts RPC: the snapshot *key* on *ref*'s layers, unpacked as needed."""
    with channel(daemon) as chan:
        stub = ckfs_pb2_grpc.CkfsStub(chan)
        request = ckfs_pb2.MountsRequest(ref=ref, key=key, snapshotter=snapshotter)
        response: ckfs_pb2.MountsResponse = stub.Mounts(request, timeout=300)
        return response


#: The snapshotters that unpack: fuse attaches a gzip layer (an index over the
#: pulled blob, no extraction), so there is no unpack to kill it in.
UNPACKING = tuple(n for n in snapshotters.NAMES if n != "fuse")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: layers keep their owners")
@pytest.mark.parametrize("snapshotter", UNPACKING)
def test_a_daemon_killed_mid_unpack_is_cleaned_up_by_the_next(
    snapshotter: str, tmp_path: Path, big_image: tuple[Path, list[dict[str, bytes]]]
) -> None:
    layout, _ = big_image
    base, big = chain_ids(layout)
    ckfs = Ckfs(tmp_path / "root")
    ckfs.run("import", "--name", NAME, str(layout))
    with socket_dir() as sockets, futures.ThreadPoolExecutor(1) as client:
        sock, log = sockets / "ckfsd.sock", sockets / "ckfsd.log"
        daemon = start(ckfs.root, sock, log)
        try:
            first = client.submit(mounts, daemon, NAME, "k", snapshotter)
            deadline = time.monotonic() + REACH_TIMEOUT
            while not any(n.endswith(f" {big}") for n in extracts(snapshots(ckfs, snapshotter))):
                if first.done():
                    raise AssertionError(f"Mounts ended early: {first.exception()}")
                assert time.monotonic() < deadline, "the unpack never reached the big layer"
                time.sleep(0.02)
            daemon.process.kill()
            daemon.process.wait(timeout=30)
        finally:
            stop(daemon.process)
        with pytest.raises(grpc.RpcError) as info:
            first.result(timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        (leftover,) = extracts(snapshots(ckfs, snapshotter))

        daemon = start(ckfs.root, sock, log)
        try:
            # Cleared at start, before any RPC: nobody held its layer's lock.
            assert extracts(snapshots(ckfs, snapshotter)) == []
            assert f"removed {snapshotter} snapshot {leftover!r}" in daemon.log_text()
            assert mounts(daemon, NAME, "k", snapshotter).mounts
        finally:
            assert stop(daemon.process) == 0
    now = snapshots(ckfs, snapshotter)
    assert sorted(now) == sorted([base, big, "k"])
    assert now[big]["parent"] == base
    assert len(snapshot_dirs(ckfs)[snapshotter]) == 3  # the leftover's directory went too


def test_a_client_gone_mid_pull_cancels_it_and_the_ingest_stays(
    ckfsd: Daemon, registry: Registry, big_layout: Path
) -> None:
    layer = biggest_layer(big_layout)
    ingest = f"layer-{layer['digest']}"
    with FaultProxy(registry.host).running() as proxy:
        ref = f"{proxy.host}/{BIG_REPO}"
        proxy.add(Fault("stall", path=layer["digest"], after=4 << 20))
        with channel(ckfsd) as chan:
            stub = ckfs_pb2_grpc.CkfsStub(chan)
            events = stub.Pull(ckfs_pb2.PullRequest(ref=ref, register=True), timeout=120)
            deadline = time.monotonic() + REACH_TIMEOUT
            while (kept := ingest_offset(ckfsd.root, ingest)) < 3 << 20:
                assert time.monotonic() < deadline, "the pull never reached the stall"
                time.sleep(0.05)
            events.cancel()
        # The daemon's side of the pull ends: its log line says so, and the
        # stalled download is dropped rather than left running.
        deadline = time.monotonic() + 30
        while "/ckfs.v1.Ckfs/Pull CANCELLED" not in ckfsd.log_text():
            assert time.monotonic() < deadline, ckfsd.log_text()
            time.sleep(0.05)
        assert ingest_offset(ckfsd.root, ingest) == kept

        proxy.clear()
        summary = pull(ckfsd, ref)[-1].summary
    assert [s.headers.get("range") for s in proxy.requests(layer["digest"])] == [f"bytes={kept}-"]
    assert summary.fetched_bytes <= layer["size"] - kept + 10_000
