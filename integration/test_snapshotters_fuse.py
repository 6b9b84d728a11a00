"""The fuse snapshotter's attached layers under real overlayfs mounts.

Plain directories stand where the serving process serves layers
(``<root>/fuse/mnt/<algo>-<hex>``), written in overlay's form (0/0
character-device whiteouts, ``trusted.overlay.opaque``) as the FUSE tree
presents them: what these check is the snapshotter's half, that its mounts
stack such directories as the kernel expects and never write to or delete
them. At the end the same over the real serving process, with layers
indexed as ``integration/test_fuse_server.py`` indexes them: attach, a
container's overlay, a merged view, and a dead server refused loudly. The
acceptance suites bind ``fuse`` like every registered snapshotter.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckfs import errors
from ckfs import mediatypes as mt
from ckfs.archive.apply import ApplyOptions, apply_layer
from ckfs.digest import Digest, from_bytes
from ckfs.labels import SNAPSHOT_REF
from ckfs.mount import is_mountpoint, is_stale
from integration.mounts import MountGuard
from integration.test_fuse_server import BASE, TOP, add_layer
from snapshotters.fuse.process import server_pid, stop_server
from snapshotters.fuse.snapshotter import LAYER_DIGEST, FuseSnapshotter
from tests.tarbuild import tar
from tests.test_snapshotters_fuse import sn as sn_fixture
from tests.test_snapshotters_fuse import state as state_fixture

pytestmark = [pytest.mark.root]

OPAQUE = "trusted.overlay.opaque"


#: The fuse snapshotter on a fresh state root (`tests.test_snapshotters_fuse`'s fixtures).
state, sn = state_fixture, sn_fixture


def serve(sn: FuseSnapshotter, layer: Digest, tree: dict[str, str | None]) -> Path:
    """A stand-in layer directory: ``path: text`` files, ``path: None`` whiteouts.

    A path ending in ``/`` is an opaque directory.
    """
    top = sn.layer_dir(layer)
    top.mkdir(parents=True)
    for rel, text in tree.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("/"):
            path.mkdir(exist_ok=True)
            os.setxattr(path, OPAQUE, b"y")
        elif text is None:
            os.mknod(path, 0o600 | 0o020000, os.makedev(0, 0))
        else:
            path.write_text(text)
    return top


def snapshot_of(top: Path) -> dict[str, str]:
    """Every file under *top* with its text; directories as ``path/``."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(top):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), top) + "/"] = ""
        for f in files:
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, top)
            out[rel] = "<whiteout>" if not os.path.isfile(path) else Path(path).read_text()
    return out


def tar_layer(tree: dict[str, str | None]) -> bytes:
    """An uncompressed layer: files, and whiteouts (``None``) in the OCI form."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, text in tree.items():
            head, _, name = rel.rpartition("/")
            if text is None:
                info = tarfile.TarInfo(f"{head}/.wh.{name}" if head else f".wh.{name}")
                tar.addfile(info, io.BytesIO(b""))
            else:
                data = text.encode()
                info = tarfile.TarInfo(rel)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


LAYER_A = from_bytes(b"a")
LAYER_B = from_bytes(b"b")
TREE_A: dict[str, str | None] = {
    "etc/os-release": "ID=lazy\n",
    "gone": "deleted by b",
    "dir/old": "hidden by b's opaque dir",
    "keep": "a",
}
TREE_B: dict[str, str | None] = {"gone": None, "dir/": "", "dir/new": "b"}


def test_a_container_over_attached_layers(
    sn: FuseSnapshotter, tmp_path: Path, mount_guard: MountGuard
) -> None:
    a = serve(sn, LAYER_A, TREE_A)
    b = serve(sn, LAYER_B, TREE_B)
    before = {a: snapshot_of(a), b: snapshot_of(b)}
    sn.attach("chain-a", LAYER_A)
    sn.attach("chain-b", LAYER_B, "chain-a")

    target = mount_guard.mount(sn.prepare("container", "chain-b"), tmp_path / "rootfs")
    try:
        assert sorted(os.listdir(target)) == ["dir", "etc", "keep"]
        assert (target / "etc/os-release").read_text() == "ID=lazy\n"
        assert os.listdir(target / "dir") == ["new"]
        (target / "written").write_text("upper")
        (target / "keep").write_text("changed")
        (target / "etc/os-release").unlink()
    finally:
        mount_guard.unmount(target)
    upper = sn.upper_dir("container")
    assert (upper / "written").read_text() == "upper"
    assert (upper / "keep").read_text() == "changed"
    assert os.stat(upper / "etc/os-release").st_rdev == os.makedev(0, 0)
    assert {a: snapshot_of(a), b: snapshot_of(b)} == before

    for key in ("container", "chain-b", "chain-a"):
        sn.remove(key)
    assert os.listdir(sn._store.root) == []
    assert {a: snapshot_of(a), b: snapshot_of(b)} == before


def test_views_of_attached_layers_are_read_only(
    sn: FuseSnapshotter, tmp_path: Path, mount_guard: MountGuard
) -> None:
    serve(sn, LAYER_A, TREE_A)
    serve(sn, LAYER_B, TREE_B)
    sn.attach("chain-a", LAYER_A)
    sn.attach("chain-b", LAYER_B, "chain-a")
    one = mount_guard.mount(sn.view("one", "chain-a"), tmp_path / "one")
    two = mount_guard.mount(sn.view("two", "chain-b"), tmp_path / "two")
    try:
        assert (one / "gone").read_text() == "deleted by b"
        assert not (two / "gone").exists()
        for target in (one, two):
            with pytest.raises(OSError) as e:
                (target / "new").write_text("x")
            assert e.value.errno == errno.EROFS
    finally:
        mount_guard.unmount(one)
        mount_guard.unmount(two)


def test_an_eager_layer_applies_over_attached_ones_without_copy_up(
    sn: FuseSnapshotter, tmp_path: Path, mount_guard: MountGuard
) -> None:
    """The fallback for a layer that cannot be served lazily: unpacked on the lazy ones."""
    a = serve(sn, LAYER_A, TREE_A)
    before = snapshot_of(a)
    sn.attach("chain-a", LAYER_A)
    sn.prepare("extract", "chain-a")
    blob = tar_layer({"keep": None, "etc/added": "eager"})
    apply_layer(
        sn.upper_dir("extract"),
        io.BytesIO(blob),
        media_type=mt.OCI_LAYER,
        diff_id=None,
        options=ApplyOptions(whiteouts="overlay", lowers=sn.lower_dirs("extract")),
    )
    sn.commit("eager", "extract")
    target = mount_guard.mount(sn.view("top", "eager"), tmp_path / "rootfs")
    try:
        assert sorted(os.listdir(target)) == ["dir", "etc", "gone"]
        assert sorted(os.listdir(target / "etc")) == ["added", "os-release"]
    finally:
        mount_guard.unmount(target)
    assert snapshot_of(a) == before


def test_many_attached_layers_fit_one_mount(
    sn: FuseSnapshotter, tmp_path: Path, mount_guard: MountGuard
) -> None:
    """The mounts name ``<id>/fs`` links, so a deep lazy image stacks as deep as overlay's.

    The layer directories' own names (71 characters each) would make the
    options outgrow a page at about 55 layers.
    """
    depth = 200
    parent = ""
    for i in range(depth):
        layer = from_bytes(str(i).encode())
        serve(sn, layer, {f"f{i}": str(i)})
        sn.attach(f"chain-{i}", layer, parent)
        parent = f"chain-{i}"
    assert sn.max_layers >= depth
    target = mount_guard.mount(sn.prepare("deep", parent), tmp_path / "rootfs")
    try:
        assert len(os.listdir(target)) == depth
        assert (target / "f0").read_text() == "0"
    finally:
        mount_guard.unmount(target)


# -- over the real serving process -------------------------------------------------


@pytest.fixture
def served(sn: FuseSnapshotter, mount_guard: MountGuard) -> Iterator[FuseSnapshotter]:
    """The fuse snapshotter of a root whose FUSE server is stopped (by PID) at teardown."""
    try:
        yield sn
    finally:
        stop_server(sn.server.root)
        assert not is_mountpoint(sn.server.mnt)


def test_a_container_over_layers_the_server_serves(
    served: FuseSnapshotter, tmp_path: Path, mount_guard: MountGuard
) -> None:
    """Attach indexed layers, run a container's overlay on them, view them merged."""
    sn = served
    base = add_layer(sn.server.root, tar(*BASE))
    top = add_layer(sn.server.root, tar(*TOP))
    sn.serve()
    sn.attach("chain-base", base)
    sn.attach("chain-top", top, "chain-base")

    target = mount_guard.mount(sn.prepare("container", "chain-top"), tmp_path / "rootfs")
    try:
        assert (target / "etc/a").read_bytes() == b"A2"
        assert sorted(os.listdir(target / "etc")) == ["a", "big", "secret"]
        assert os.listdir(target / "opq") == ["new"]
        assert os.stat(target / "bin/su").st_mode & 0o7777 == 0o4755
        (target / "etc/new").write_text("written")
        os.unlink(target / "bin/sg")
    finally:
        mount_guard.unmount(target)
    upper = sn.upper_dir("container")
    assert (upper / "etc/new").read_text() == "written"
    assert os.stat(upper / "bin/sg").st_rdev == os.makedev(0, 0)

    view = sn.write_view("img", sn.chain_layers("chain-top"))
    assert sorted(os.listdir(view / "etc")) == ["a", "big", "secret"]
    assert (view / "etc/a").read_bytes() == b"A2"

    for key in ("container", "chain-top", "chain-base"):
        sn.remove(key)
    assert (sn.layer_dir(base) / "bin/sg").exists()  # served still, for other images


def test_a_dead_server_is_refused_loudly_then_served_again(served: FuseSnapshotter) -> None:
    """ENOTCONN: attach and a remote-snapshot prepare fail clearly, never fall back silently."""
    sn = served
    layer = add_layer(sn.server.root, tar(*BASE))
    sn.serve()
    pid = server_pid(sn.server)
    assert pid
    os.kill(pid, signal.SIGKILL)
    # Stale (ENOTCONN) and its lock released: a dying server can abort its
    # connection before its lock goes, and ensure_server would adopt it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
        is_stale(sn.server.mnt) and server_pid(sn.server) is None
    ):
        time.sleep(0.05)
    with pytest.raises(errors.FailedPrecondition, match="not connected"):
        sn.attach("chain", layer)
    labels = {SNAPSHOT_REF: "chain", LAYER_DIGEST: str(layer)}
    with pytest.raises(errors.FailedPrecondition, match="not connected"):
        sn.prepare("extract chain", "", labels)
    assert list(sn.walk()) == []
    sn.serve()  # adopts nothing, detaches the dead mount, serves again
    with pytest.raises(errors.AlreadyExists):
        sn.prepare("extract chain", "", labels)
    assert sn.layer("chain") == layer
