"""The snapshotter acceptance suite with real mounts, bound to every registered snapshotter.

The checks are `tests.suites.snapshotter_mounted.MountedSnapshotterSuite`;
here each snapshotter in the registry (`snapshotters.NAMES`) gets its
factory, a fresh state root per test. The checks that need no mount run in
``tests/test_snapshotters.py``. Below the binding: overlay's own limit on
stacked layers, with real mounts and a real registry.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import snapshotters
from ckfs import errors
from ckfs.metadata.db import DB
from ckfs.mount import is_mountpoint
from ckfs.snapshots import Snapshotter
from integration.conftest import Ckfs
from integration.mounts import MountGuard
from integration.registry import Registry
from tests.layouts import Layout
from tests.local_stores import snapshotter_factory
from tests.suites.snapshotter import GC_ROOT
from tests.suites.snapshotter_mounted import MountedSnapshotterSuite

pytestmark = [pytest.mark.root]


@pytest.fixture(params=snapshotters.NAMES)
def make_snapshotter(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], Snapshotter]]:
    with snapshotter_factory(request.param, tmp_path / "root") as make:
        yield make


class TestMountedSnapshotter(MountedSnapshotterSuite):
    pass


# -- the deepest stack overlay declares is the deepest that mounts ------------------


@pytest.mark.slow
@pytest.mark.parametrize("bound", ["stack", "page"])
def test_overlay_max_layers_mount_and_one_more_does_not(
    tmp_path: Path, mount_guard: MountGuard, bound: str
) -> None:
    """`OverlaySnapshotter.max_layers` layers mount; one more does not, whichever limit binds.

    "stack": short ids, so the kernel's OVL_MAX_STACK (500) binds and the
    kernel refuses one more. "page": every id six digits wide, so one page
    of mount options binds first and `ckfs.mount` refuses one more.
    """
    from snapshotters.overlay import OVL_MAX_STACK, OverlaySnapshotter

    db = DB(tmp_path / "root" / "metadata.db")
    sn = OverlaySnapshotter(tmp_path / "root", db)
    try:
        if bound == "page":
            with db.transaction() as tx:
                tx.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('snapshots', 100000)")
        limit = sn.max_layers
        assert (limit == OVL_MAX_STACK) == (bound == "stack")
        parent = ""
        for i in range(limit + 1):
            key = f"extract-{i}"
            sn.prepare(key, parent, labels=GC_ROOT)
            (sn.upper_dir(key) / f"file-{i}").write_bytes(b"")
            sn.commit(f"layer-{i}", key, labels=GC_ROOT)
            parent = f"layer-{i}"
        # On layer-(limit-1): limit layers beneath; on layer-limit: one more.
        target = mount_guard.mount(sn.prepare("fits", f"layer-{limit - 1}"), tmp_path / "fits")
        try:
            assert sorted(os.listdir(target)) == sorted(f"file-{i}" for i in range(limit))
            (target / "written").write_bytes(b"upper\n")
        finally:
            mount_guard.unmount(target)
        with pytest.raises(errors.InvalidArgument):
            mount_guard.mount(sn.prepare("one-more", parent), tmp_path / "one-more")
        assert not is_mountpoint(tmp_path / "one-more")
    finally:
        sn.close()
        db.close()


@pytest.mark.slow
def test_mount_of_an_image_too_deep_to_stack_fails_before_fetching_a_layer(
    registry_factory: Callable[..., Registry],
    ckfs: Ckfs,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A cold ``ckfs mount`` from a real registry: refused at the manifest, no layer asked for."""
    from ckfs.snapshots import max_layers
    from ckfs.state import State

    state = State(ckfs.root)
    limit = max_layers(state.snapshotter("overlayfs"))
    state.close()
    assert limit is not None
    layout = Layout(tmp_path / "deep")
    layout.image([{f"f{i}": b""} for i in range(limit + 1)])
    registry = registry_factory()
    manifest = registry.push_layout_raw(layout.root, "team/deep:1")

    started = time.monotonic()
    line = ckfs.fails("mount", f"{registry.host}/team/deep:1", str(tmp_path / "rootfs"))
    elapsed = time.monotonic() - started
    assert elapsed < 20
    with capsys.disabled():
        print(f"\n{limit + 1}-layer image refused by ckfs mount in {elapsed:.2f} s")
    assert f"has {limit + 1} layers" in line and f"at most {limit}" in line
    assert "--snapshotter native" in line
    # Only the manifest came: no config, no layer, no ingest; nothing named or unpacked.
    assert ckfs.run("content", "ls", "-q").stdout.split() == [manifest]
    assert json.loads(ckfs.run("content", "active", "--json").stdout) == []
    assert ckfs.run("images", "ls", "-q").stdout == ""
    assert (
        json.loads(ckfs.run("snapshots", "--snapshotter", "overlayfs", "ls", "--json").stdout) == []
    )
