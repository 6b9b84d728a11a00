"""The snapshotter acceptance suite through gRPC, against the service in this process.

`ckfs.remote_snapshots.RemoteSnapshotter` talks to ckfsd's Snapshots
service (`ckfs.services.snapshots`) served by the real bridge and grpcio
over a unix socket; only the daemon process is missing, so a drift between
the wire and the Python contract fails here in seconds, for every
registered snapshotter. ``integration/`` runs the same suite against a
real ckfsd.

The service's trio loop runs in a thread of its own for the test: the suite
is synchronous and blocks in grpc calls, which must not block the loop that
answers them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import trio

import snapshotters
from ckfs.api.services.snapshots.v1 import snapshots_pb2_grpc
from ckfs.errors import FailedPrecondition
from ckfs.services.bridge import Bridge
from ckfs.services.snapshots import SnapshotsService
from ckfs.snapshots import Snapshotter
from ckfs.state import State
from tests.remote_stores import remote_snapshotters
from tests.suites.snapshotter import SnapshotterSuite

#: Enough for the suite's eight concurrent prepares plus a List or two.
WORKERS = 16

#: Upper bound on starting or stopping the in-process server; it takes
#: milliseconds, and a hang must fail the test rather than wedge the run.
SERVE_TIMEOUT = 30.0


@contextlib.contextmanager
def serving(root: Path, address: str) -> Iterator[None]:
    """The Snapshots service on the state *root*, listening on *address* until exit."""
    started = threading.Event()
    token: list[trio.lowlevel.TrioToken] = []
    stop = trio.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        state = State(root)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS))
        try:
            async with trio.open_nursery() as nursery:
                bridge = Bridge(nursery)
                bridge.add(
                    server,
                    SnapshotsService(state),
                    snapshots_pb2_grpc.add_SnapshotsServicer_to_server,
                )
                server.add_insecure_port(address)
                server.start()
                token.append(trio.lowlevel.current_trio_token())
                started.set()
                await stop.wait()
                await trio.to_thread.run_sync(server.stop(None).wait)
        finally:
            await trio.to_thread.run_sync(state.close)

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as e:  # reported to the test below
            failure.append(e)
            started.set()

    thread = threading.Thread(target=run, name="snapshots-service")
    thread.start()
    try:
        assert started.wait(SERVE_TIMEOUT) and not failure, failure
        yield
    finally:
        if token:
            trio.from_thread.run_sync(stop.set, trio_token=token[0])
        thread.join(SERVE_TIMEOUT)
        assert not thread.is_alive(), "the service did not stop"
        assert not failure, failure


@pytest.fixture(params=snapshotters.NAMES)
def make_snapshotter(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], Snapshotter]]:
    address = f"unix://{tmp_path}/snapshots.sock"
    with serving(tmp_path / "root", address), remote_snapshotters(address, request.param) as make:
        yield make


class TestRemoteSnapshotter(SnapshotterSuite):
    pass


def test_a_closed_client_adapter_calls_nothing(
    make_snapshotter: Callable[[], Snapshotter],
) -> None:
    sn = make_snapshotter()
    sn.prepare("k")
    sn.close()
    with pytest.raises(FailedPrecondition):
        sn.stat("k")
    assert make_snapshotter().stat("k").name == "k"  # the daemon's state is untouched
