"""The snapshotter acceptance suite without mounts, bound to every registered snapshotter.

The checks are `tests.suites.snapshotter.SnapshotterSuite`; here each
snapshotter in the registry (`snapshotters.NAMES`) gets its factory, a fresh
state root per test. The checks that mount real trees run in
``integration/test_snapshotters_mounted.py``; overlay's and native's own
workings are tested in ``tests/test_snapshotters_internals.py``; ckfsd's
Snapshots service runs the same suite through a client in ``integration/``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import snapshotters
from ckfs.snapshots import Snapshotter
from tests.local_stores import snapshotter_factory
from tests.suites.snapshotter import SnapshotterSuite


@pytest.fixture(params=snapshotters.NAMES)
def make_snapshotter(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], Snapshotter]]:
    with snapshotter_factory(request.param, tmp_path / "root") as make:
        yield make


class TestSnapshotter(SnapshotterSuite):
    pass
