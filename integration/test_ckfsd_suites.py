"""The acceptance suites a second time, through a real ckfsd.

Each test starts its own ``ckfsd`` on a fresh root (`integration.daemon`)
and runs a suite check through the client adapters: the snapshotter suites
(with and without mounts) through `ckfs.remote_snapshots.RemoteSnapshotter`
for every registered snapshotter, and the content suite through
`ckfs.remote_content.RemoteContentStore`. The wire, the daemon's service
registration and its socket are then held to the same contract as the
local stores, so none of them can drift from it unnoticed. The Mount
records come from the daemon and are mounted here, by the test, as a
runtime would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import snapshotters
from ckfs.content import ContentStore
from ckfs.snapshots import Snapshotter
from integration.daemon import running_ckfsd
from tests.remote_stores import remote_content_stores, remote_snapshotters
from tests.suites.content import ContentStoreSuite
from tests.suites.snapshotter import SnapshotterSuite
from tests.suites.snapshotter_mounted import MountedSnapshotterSuite

pytestmark = [pytest.mark.slow]


@pytest.fixture(params=snapshotters.NAMES)
def make_snapshotter(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], Snapshotter]]:
    with (
        running_ckfsd(tmp_path / "root") as daemon,
        remote_snapshotters(daemon.address, request.param) as make,
    ):
        yield make


class TestSnapshotterThroughCkfsd(SnapshotterSuite):
    pass


class TestMountedSnapshotterThroughCkfsd(MountedSnapshotterSuite):
    pass


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Callable[[], ContentStore]]:
    with (
        running_ckfsd(tmp_path / "root") as daemon,
        remote_content_stores(daemon.address) as make,
    ):
        yield make  # type: ignore[misc]


class TestContentStoreThroughCkfsd(ContentStoreSuite):
    pass
