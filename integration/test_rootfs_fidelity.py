"""`ckfs mount` shows exactly the tree `umoci unpack` makes of the same image.

The image is the multi-layer one umoci builds for the archive tests
(`integration.test_archive_umoci.build_image`: setuid, ``security.capability``
and ``user.*`` xattrs, hardlinks, symlinks, devices, a fifo, whiteouts of a
file and of a directory, an opaque directory, directories replaced by files)
plus one layer whose hardlink group survives to the top, copied by skopeo
into a fresh OCI layout as users would get it. Every combination of where
the image comes from (``ckfs import`` of the layout, or a cold ``ckfs mount``
that pulls from a docker-registry), snapshotter (overlayfs, native) and
``--ro`` must mount a tree equal to umoci's rootfs in path, type, mode,
owner, size, content, symlink target, device numbers, xattrs and hardlink
groups (see `tests.treecmp`).

Modification times are compared too, with one exception: the root directory
of a writable overlayfs mount. Its upper directory is created by the prepare
(as containerd's), and overlayfs shows a merged directory with its upper
directory's times. Nothing else overlayfs-specific needs ignoring: the merged
view hides ``trusted.overlay.*`` (checked below rather than filtered, so a
leak would fail), and `tests.treecmp` records neither inode numbers nor
directory sizes, the other things overlayfs makes up.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import snapshotters
from ckfs.mount import is_mountpoint
from integration.conftest import BOTH_FACES, Ckfs, need, skopeo
from integration.mounts import MountGuard
from integration.registry import Registry
from integration.test_archive_umoci import CAPABILITY, build_image, umoci
from tests import treecmp

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, owners, devices"),
    BOTH_FACES,
]

#: Name of the image in ckfs after `ckfs import`.
IMPORTED = "example.local/ckfs/fidelity:latest"
#: Repository of the image in the test registry.
REPO = "ckfs/fidelity:latest"

#: Snapshotters whose writable root is a fresh overlay upper directory, so
#: its mtime is the mount's, not the image's.
OVERLAY_BASED = ("overlayfs", "fuse")


def add_link_layer(work: Path, image: str) -> None:
    """A layer with a three-member hardlink group (setgid, with an xattr) that no
    later layer touches, and a dangling absolute symlink."""
    src = work / "links"
    (src / "srv/links").mkdir(parents=True)
    first = src / "srv/links/a"
    first.write_bytes(b"linked content\n" * 100)
    os.chown(first, 0, 50)
    os.chmod(first, 0o2750)
    os.setxattr(first, "user.linked", b"yes")
    os.link(first, src / "srv/links/b")
    os.link(first, src / "srv/links/c")
    os.symlink("/nonexistent/target", src / "srv/links/dangling")
    umoci("insert", "--image", image, str(src), "/")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The skopeo copy of the umoci image (tag ``latest``) and umoci's rootfs of it."""
    need("umoci", "skopeo")
    work = tmp_path_factory.mktemp("fidelity")
    _, ref = build_image(work)
    add_link_layer(work, ref)
    copied = work / "copied"
    skopeo("copy", "-q", f"oci:{ref}", f"oci:{copied}:latest")
    bundle = work / "bundle"
    umoci("unpack", "--image", f"{copied}:latest", str(bundle))
    return copied, bundle / "rootfs"


@pytest.fixture(scope="module")
def reference(image: tuple[Path, Path]) -> dict[str, treecmp.Node]:
    """umoci's rootfs, described; checked to hold what the test is about."""
    tree = treecmp.snapshot(image[1])
    assert tree["usr/bin/tool"].mode == 0o4755 and tree["usr/bin/tool"].uid == 1000
    assert ("security.capability", CAPABILITY) in tree["usr/bin/ping"].xattrs
    assert ("user.origin", b"umoci") in tree["etc/app.conf"].xattrs
    assert tree["usr/share"].kind == "file" and tree["opt/empty"].kind == "file"
    assert sorted(p for p in tree if p.startswith("etc/conf.d/")) == ["etc/conf.d/c"]
    assert "var/data" not in tree and "usr/lib/libx.so" not in tree
    assert tree["usr/lib/libx.so.link"].kind == "file"
    assert tree["usr/doc"].target == "/usr/share/doc"
    assert tree["dev/null"].rdev == (1, 3) and tree["run/fifo"].kind == "fifo"
    links = {tree[f"srv/links/{n}"] for n in "abc"}
    assert len(links) == 1 and links.pop().link_group == "srv/links/a"
    assert tree["srv/links/a"].mode == 0o2750
    return tree


@pytest.fixture(scope="module")
def fidelity_registry(
    registry_factory_session: Callable[..., Registry], image: tuple[Path, Path]
) -> Registry:
    """A docker-registry serving the image as `REPO`."""
    r = registry_factory_session()
    r.push(image[0], REPO)
    return r


def overlay_xattrs(tree: dict[str, treecmp.Node]) -> list[str]:
    return [
        p for p, n in tree.items() if any(k.startswith("trusted.overlay.") for k, _ in n.xattrs)
    ]


def assert_same_tree(
    reference: dict[str, treecmp.Node], mounted: dict[str, treecmp.Node], *, fresh_root: bool
) -> None:
    """Every field equal, mtimes included, except the root's mtime if *fresh_root*."""
    if not fresh_root:
        treecmp.assert_same(reference, mounted, ignore=())
        return
    treecmp.assert_same(reference, mounted, ignore=(), paths=lambda p: p != ".")
    treecmp.assert_same(reference, mounted, paths=lambda p: p == ".")


@pytest.mark.parametrize("ro", [False, True], ids=["rw", "ro"])
@pytest.mark.parametrize("snapshotter", snapshotters.NAMES)
@pytest.mark.parametrize("source", ["import", "registry"])
def test_mount_equals_umoci_unpack(
    source: str,
    snapshotter: str,
    ro: bool,
    ckfs: Ckfs,
    mount_guard: MountGuard,
    request: pytest.FixtureRequest,
    image: tuple[Path, Path],
    reference: dict[str, treecmp.Node],
    tmp_path: Path,
) -> None:
    if source == "import":
        ckfs.run("import", "--name", IMPORTED, str(image[0]))
        ref = IMPORTED
    else:
        # A cold mount: the image is pulled and unpacked by `ckfs mount` itself.
        ref = f"{request.getfixturevalue('fidelity_registry').host}/{REPO}"
    target = tmp_path / "rootfs"
    ckfs.run("mount", "--snapshotter", snapshotter, *(["--ro"] if ro else []), ref, str(target))
    assert is_mountpoint(target)

    mounted = treecmp.snapshot(target)
    assert overlay_xattrs(mounted) == []
    assert_same_tree(reference, mounted, fresh_root=snapshotter in OVERLAY_BASED and not ro)

    probe = target / "probe"
    if ro:
        with pytest.raises(OSError) as refused:
            probe.write_bytes(b"x")
        assert refused.value.errno == errno.EROFS
    else:
        probe.write_bytes(b"x")
        (target / "etc/app.conf").write_bytes(b"changed through the mount")

    ckfs.run("umount", str(target))
    assert not is_mountpoint(target)
    # The FUSE server outlives the mounts it serves (conftest stops it).
    assert [m for m in mount_guard.leftovers() if m != str(ckfs.root / "fuse/mnt")] == []
    if not ro:
        # The committed layers were not written through: a new mount is pristine.
        ckfs.run("mount", "--snapshotter", snapshotter, ref, str(target))
        assert_same_tree(
            reference, treecmp.snapshot(target), fresh_root=snapshotter in OVERLAY_BASED
        )
        ckfs.run("umount", str(target))
    listed = ckfs.run("snapshots", "--snapshotter", snapshotter, "ls", "--json").stdout
    assert "mount:" not in listed


def test_pull_and_import_unpack_to_the_same_chain(
    ckfs: Ckfs, image: tuple[Path, Path], fidelity_registry: Registry
) -> None:
    """The pulled and the imported image are one image: the second unpack is free."""

    def lowerdir(out: str) -> list[str]:
        (mount,) = json.loads(out)["mounts"]
        return [o for o in mount["options"] if o.startswith("lowerdir=")]

    ckfs.run("import", "--name", IMPORTED, str(image[0]))
    first = ckfs.run("rootfs", "--json", "--key", "first", IMPORTED).stdout
    before = {i["name"] for i in json.loads(ckfs.run("snapshots", "ls", "--json").stdout)}
    ref = f"{fidelity_registry.host}/{REPO}"
    second = ckfs.run("rootfs", "--json", "--key", "second", ref).stdout
    after = {i["name"] for i in json.loads(ckfs.run("snapshots", "ls", "--json").stdout)}
    assert after - before == {"second"}
    assert len(lowerdir(first)) == 1 and lowerdir(first) == lowerdir(second)
