"""The snapshotter acceptance suite through gRPC, against the service in this process.

`ckfs.remote_snapshots.RemoteSnapshotter` talks to ckfsd's Snapshots
service (`ckfs.services.snapshots`) served by the real bridge and grpcio
over a unix socket; only the daemon process is missing, so a drift between
the wire and the Python contract fails here in seconds, for every
registered snapshotter. ``integration/`` runs the same suite against a
real ckfsd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import snapshotters
from ckfs.api.services.snapshots.v1 import snapshots_pb2_grpc
from ckfs.errors import FailedPrecondition
from ckfs.services.snapshots import SnapshotsService
from ckfs.snapshots import Snapshotter
from tests.remote_stores import Service, remote_snapshotters, serving
from tests.suites.snapshotter import SnapshotterSuite

SERVICES: list[Service] = [(SnapshotsService, snapshots_pb2_grpc.add_SnapshotsServicer_to_server)]


@pytest.fixture(params=snapshotters.NAMES)
def make_snapshotter(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], Snapshotter]]:
    address = f"unix://{tmp_path}/snapshots.sock"
    with (
        serving(tmp_path / "root", address, SERVICES),
        remote_snapshotters(address, request.param) as make,
    ):
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
