"""The snapshotter acceptance suite with real mounts and real files.

Structured like containerd's ``core/snapshots/testsuite``:
`MountedSnapshotterSuite` mounts what a snapshotter returns with
`ckfs.mount`, changes files through the mount and compares the result with
the same changes applied to a plain directory. It talks to the snapshotter
only through the contract and its Mount records, so it runs against every
registered snapshotter and through ckfsd's gRPC Snapshots service alike.
Bind it by subclassing it where ``make_snapshotter`` is provided (see
`tests.suites.snapshotter`); the checks need root. Named after containerd's:

    Basic, StatActive, StatCommitted, Transitivity, PrepareView,
    LayerFileUpdate, RemoveDirectoryInLowerLayer, Chown,
    DirectoryPermissionOnCommit, RemoveIntermediateSnapshot,
    DeletedFilesInChildSnapshot, MoveFileFromLowerLayer, ViewReadonly,
    RootPermission, Rename, 128LayersMount

Every mount goes through `mount_guard` (``integration/mounts.py``), so a
failing check leaves nothing mounted. Checks assert error classes and
errnos, never messages.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ckfs import errors
from ckfs.mount import PAGE_SIZE, Mount, is_mountpoint, mounts_under
from ckfs.snapshots import Kind, Snapshotter
from integration.mounts import MountGuard
from tests.suites.snapshotter import GC_ROOT, SnapshotterFactory, writable_dir

#: One change to a directory tree, applied to a path.
Applier = Callable[[Path], None]

_counter = itertools.count()


# -- appliers (continuity's fstest, the few this suite needs) -----------------------


def _at(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def create_file(path: str, data: bytes, mode: int) -> Applier:
    def apply(root: Path) -> None:
        target = _at(root, path)
        target.write_bytes(data)
        os.chmod(target, mode)

    return apply


def create_dir(path: str, mode: int) -> Applier:
    def apply(root: Path) -> None:
        target = _at(root, path)
        target.mkdir()
        os.chmod(target, mode)

    return apply


def remove_all(path: str) -> Applier:
    def apply(root: Path) -> None:
        target = _at(root, path)
        if target.is_dir() and not target.is_symlink():
            for sub in sorted(target.rglob("*"), reverse=True):
                sub.rmdir() if sub.is_dir() and not sub.is_symlink() else sub.unlink()
            target.rmdir()
        elif os.path.lexists(target):
            target.unlink()

    return apply


def chown(path: str, uid: int, gid: int) -> Applier:
    def apply(root: Path) -> None:
        os.lchown(_at(root, path), uid, gid)

    return apply


def link(old: str, new: str) -> Applier:
    def apply(root: Path) -> None:
        os.link(_at(root, old), _at(root, new))

    return apply


def rename(old: str, new: str) -> Applier:
    def apply(root: Path) -> None:
        os.rename(_at(root, old), _at(root, new))

    return apply


def apply_all(*appliers: Applier) -> Applier:
    def apply(root: Path) -> None:
        for a in appliers:
            a(root)

    return apply


# -- comparing trees ----------------------------------------------------------------

#: xattrs that belong to the machinery, not to the content.
_HIDDEN_XATTRS = ("trusted.overlay.", "security.selinux")


def manifest(root: Path) -> dict[str, tuple[object, ...]]:
    """Path → (type, mode, uid, gid, content or link target, xattrs), root excluded.

    Directory sizes, link counts and times differ between filesystems
    without meaning anything, so they are left out (as continuity does).
    """
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                content: object = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                content = st.st_rdev
            else:
                content = None
            xattrs = sorted(
                (k, os.getxattr(path, k, follow_symlinks=False))
                for k in os.listxattr(path, follow_symlinks=False)
                if not k.startswith(_HIDDEN_XATTRS)
            )
            out[str(path.relative_to(root))] = (
                stat.S_IFMT(st.st_mode),
                oct(stat.S_IMODE(st.st_mode)),
                st.st_uid,
                st.st_gid,
                content,
                tuple(xattrs),
            )
    return out


def assert_same_tree(expected: Path, actual: Path) -> None:
    assert manifest(actual) == manifest(expected)


# -- helpers --------------------------------------------------------------------------


def fresh_dir(work: Path, prefix: str) -> Path:
    path = work / f"{prefix}-{next(_counter)}"
    path.mkdir()
    return path


def prepare_mounted(
    sn: Snapshotter, guard: MountGuard, work: Path, key: str, parent: str = ""
) -> Path:
    """containerd's snapshotterPrepareMount: prepare *key* and mount it at ``work/key``."""
    mounts = sn.prepare(key, parent, labels=GC_ROOT)
    assert len(mounts) >= 1
    return guard.mount(mounts, work / key)


def create_snapshot(
    sn: Snapshotter, guard: MountGuard, work: Path, parent: str, applier: Applier
) -> str:
    """Prepare on *parent*, apply through the mount, unmount, commit; the name."""
    name = f"layer-{next(_counter)}"
    key = f"{name}-prepare"
    mounts = sn.prepare(key, parent, labels=GC_ROOT)
    target = guard.mount(mounts, fresh_dir(work, "prepare"))
    try:
        applier(target)
    finally:
        guard.unmount(target)
    sn.commit(name, key, labels=GC_ROOT)
    return name


def check_snapshot(sn: Snapshotter, guard: MountGuard, work: Path, name: str, flat: Path) -> None:
    """Mount a view of *name* and compare it with *flat*; remove the view."""
    view = f"{name}-view"
    mounts = sn.view(view, name, labels=GC_ROOT)
    target = guard.mount(mounts, fresh_dir(work, "check"))
    try:
        assert_same_tree(flat, target)
    finally:
        guard.unmount(target)
        sn.remove(view)


def check_snapshots(sn: Snapshotter, guard: MountGuard, work: Path, *appliers: Applier) -> None:
    """Build a chain from *appliers*, checking each layer against one flat directory."""
    flat = fresh_dir(work, "flat")
    parent = ""
    for applier in appliers:
        name = create_snapshot(sn, guard, work, parent, applier)
        applier(flat)
        check_snapshot(sn, guard, work, name, flat)
        parent = name


#: One more than containerd's 128, so the lower directories (129 of them
#: under the last layer) are well past one page of mount options.
LAYERS = 130


@pytest.mark.root
class MountedSnapshotterSuite:
    """The mounted checks every snapshotter passes; subclass it and provide ``make_snapshotter``."""

    @pytest.fixture
    def sn(self, mount_guard: MountGuard, make_snapshotter: SnapshotterFactory) -> Snapshotter:
        """A fresh snapshotter whose every mount is guarded (the guard goes up first, down last)."""
        return make_snapshotter()

    @pytest.fixture
    def work(self, tmp_path: Path) -> Path:
        """The play area for mount points and flat copies."""
        path = tmp_path / "work"
        path.mkdir()
        return path

    def test_basic(self, sn: Snapshotter, mount_guard: MountGuard, work: Path) -> None:
        initial = apply_all(
            create_file("/foo", b"foo\n", 0o777),
            create_dir("/a", 0o755),
            create_dir("/a/b", 0o755),
            create_dir("/a/b/c", 0o755),
        )
        diff = apply_all(
            create_file("/bar", b"bar\n", 0o777),
            create_file("/foo", b"bar\n", 0o777),
            remove_all("/a/b"),
        )
        preparing = prepare_mounted(sn, mount_guard, work, "preparing")
        initial(preparing)
        mount_guard.unmount(preparing)
        sn.commit("committed", "preparing", labels=GC_ROOT)
        si = sn.stat("committed")
        assert (si.parent, si.kind) == ("", Kind.COMMITTED)
        with pytest.raises(errors.NotFound):
            sn.stat("preparing")

        expected = fresh_dir(work, "expected")
        initial(expected)
        nxt = prepare_mounted(sn, mount_guard, work, "nextlayer", "committed")
        assert_same_tree(expected, nxt)
        diff(nxt)
        mount_guard.unmount(nxt)
        ni = sn.stat("nextlayer")
        assert (ni.parent, ni.kind) == ("committed", Kind.ACTIVE)
        sn.commit("committed-next", "nextlayer", labels=GC_ROOT)
        si2 = sn.stat("committed-next")
        assert (si2.parent, si2.kind) == ("committed", Kind.COMMITTED)
        assert {i.name: i for i in sn.walk()} == {"committed": si, "committed-next": si2}

        mounts = sn.view("nextnextlayer", "committed-next", labels=GC_ROOT)
        view = mount_guard.mount(mounts, work / "nextnextlayer")
        diff(expected)
        assert_same_tree(expected, view)
        mount_guard.unmount(view)
        sn.remove("nextnextlayer")
        with pytest.raises(errors.FailedPrecondition):
            sn.remove("committed")
        sn.remove("committed-next")
        sn.remove("committed")

    def test_stat_active(self, sn: Snapshotter, mount_guard: MountGuard, work: Path) -> None:
        preparing = prepare_mounted(sn, mount_guard, work, "preparing")
        (preparing / "foo").write_bytes(b"foo\n")
        si = sn.stat("preparing")
        assert (si.name, si.kind, si.parent) == ("preparing", Kind.ACTIVE, "")
        mount_guard.unmount(preparing)

    def test_stat_committed(self, sn: Snapshotter, mount_guard: MountGuard, work: Path) -> None:
        preparing = prepare_mounted(sn, mount_guard, work, "preparing")
        (preparing / "foo").write_bytes(b"foo\n")
        mount_guard.unmount(preparing)
        sn.commit("committed", "preparing", labels=GC_ROOT)
        si = sn.stat("committed")
        assert (si.name, si.kind, si.parent) == ("committed", Kind.COMMITTED, "")
        assert sn.usage("committed").inodes == 2

    def test_transitivity(self, sn: Snapshotter, mount_guard: MountGuard, work: Path) -> None:
        preparing = prepare_mounted(sn, mount_guard, work, "preparing")
        (preparing / "foo").write_bytes(b"foo\n")
        mount_guard.unmount(preparing)
        sn.commit("snapA", "preparing", labels=GC_ROOT)
        nxt = prepare_mounted(sn, mount_guard, work, "next", "snapA")
        assert (nxt / "foo").read_bytes() == b"foo\n"
        (nxt / "foo").write_bytes(b"foo bar\n")
        mount_guard.unmount(nxt)
        sn.commit("snapB", "next", labels=GC_ROOT)
        si_a, si_b = sn.stat("snapA"), sn.stat("snapB")
        assert (si_a.parent, si_b.parent, sn.stat(si_b.parent).parent) == ("", "snapA", "")

    def test_prepare_view_fails_on_reused_keys(
        self, sn: Snapshotter, mount_guard: MountGuard, work: Path
    ) -> None:
        preparing = prepare_mounted(sn, mount_guard, work, "preparing")
        mount_guard.unmount(preparing)
        sn.commit("snapA", "preparing", labels=GC_ROOT)
        sn.prepare("newlayer", "snapA", labels=GC_ROOT)
        with pytest.raises(errors.AlreadyExists):
            sn.view("newlayer", "snapA", labels=GC_ROOT)
        sn.prepare("prepLayer", "snapA", labels=GC_ROOT)
        with pytest.raises(errors.AlreadyExists):
            sn.prepare("prepLayer", "snapA", labels=GC_ROOT)
        sn.view("viewLayer", "snapA", labels=GC_ROOT)
        with pytest.raises(errors.AlreadyExists):
            sn.view("viewLayer", "snapA", labels=GC_ROOT)

    def test_layer_file_update(self, sn: Snapshotter, mount_guard: MountGuard, work: Path) -> None:
        l1 = apply_all(
            create_dir("/etc", 0o700),
            create_file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
            create_file("/etc/profile", b"PATH=/usr/bin", 0o644),
        )
        l2 = apply_all(
            create_file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
            create_file("/etc/profile", b"PATH=/usr/bin", 0o666),
            create_dir("/root", 0o700),
            create_file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644),
        )
        # Several rounds, one crossing a second boundary: the original bug
        # (docker#21555) hid behind equal mtimes.
        for _ in range(3):
            check_snapshots(sn, mount_guard, work, l1, l2)
            time.sleep(1 - time.time() % 1)

    def test_remove_directory_in_lower_layer(
        self, sn: Snapshotter, mount_guard: MountGuard, work: Path
    ) -> None:
        check_snapshots(
            sn,
            mount_guard,
            work,
            apply_all(create_dir("/lib", 0o700), create_file("/lib/hidden", b"", 0o644)),
            apply_all(
                remove_all("/lib"),
                create_dir("/lib", 0o700),
                create_file("/lib/not-hidden", b"", 0o644),
            ),
            apply_all(create_file("/lib/newfile", b"", 0o644)),
        )

    def test_chown(self, sn: Snapshotter, mount_guard: MountGuard, work: Path) -> None:
        check_snapshots(
            sn,
            mount_guard,
            work,
            apply_all(
                create_dir("/opt", 0o700),
                create_dir("/opt/a", 0o700),
                create_dir("/opt/a/b", 0o700),
                create_file("/opt/a/b/file.txt", b"hello", 0o644),
            ),
            apply_all(
                chown("/opt", 1, 1),
                chown("/opt/a", 1, 1),
                chown("/opt/a/b", 1, 1),
                chown("/opt/a/b/file.txt", 1, 1),
            ),
        )

    def test_directory_permission_on_commit(
        self, sn: Snapshotter, mount_guard: MountGuard, work: Path
    ) -> None:
        check_snapshots(
            sn,
            mount_guard,
            work,
            apply_all(
                create_dir("/dir1", 0o700),
                create_dir("/dir2", 0o700),
                create_dir("/dir3", 0o700),
                create_dir("/dir4", 0o700),
                create_file("/dir4/f1", b"...", 0o644),
                create_dir("/dir5", 0o700),
                create_file("/dir5/f1", b"...", 0o644),
                chown("/dir1", 1, 1),
                chown("/dir2", 1, 1),
                chown("/dir3", 1, 1),
                chown("/dir5", 1, 1),
                chown("/dir5/f1", 1, 1),
            ),
            apply_all(
                chown("/dir2", 0, 0),
                remove_all("/dir3"),
                chown("/dir4", 1, 1),
                chown("/dir4/f1", 1, 1),
            ),
            apply_all(
                create_dir("/dir3", 0o700),
                chown("/dir3", 1, 1),
                remove_all("/dir5"),
                create_dir("/dir5", 0o700),
                chown("/dir5", 1, 1),
            ),
        )

    def test_remove_intermediate_snapshot(
        self, sn: Snapshotter, mount_guard: MountGuard, work: Path
    ) -> None:
        base = prepare_mounted(sn, mount_guard, work, "base")
        mount_guard.unmount(base)
        sn.commit("committed-base", "base", labels=GC_ROOT)
        sn.prepare("intermediate", "committed-base", labels=GC_ROOT)
        sn.commit("committed-inter", "intermediate", labels=GC_ROOT)
        sn.prepare("toplayer", "committed-inter", labels=GC_ROOT)
        with pytest.raises(errors.FailedPrecondition):
            sn.remove("committed-inter")
        sn.remove("toplayer")
        sn.remove("committed-inter")
        sn.remove("committed-base")

    def test_deleted_files_in_child_snapshot(
        self, sn: Snapshotter, mount_guard: MountGuard, work: Path
    ) -> None:
        check_snapshots(
            sn,
            mount_guard,
            work,
            apply_all(
                create_file("/foo", b"foo\n", 0o777),
                create_file("/foobar", b"foobar\n", 0o777),
            ),
            apply_all(remove_all("/foobar")),
            apply_all(),
        )

    def test_move_file_from_lower_layer(
        self, sn: Snapshotter, mount_guard: MountGuard, work: Path
    ) -> None:
        check_snapshots(
            sn,
            mount_guard,
            work,
            apply_all(
                create_dir("/dir1", 0o700),
                create_file("/dir1/f1", b"Hello", 0o644),
                create_dir("dir2", 0o700),
                create_file("dir2/f2", b"...", 0o644),
            ),
            apply_all(
                create_dir("/dir3", 0o700),
                create_file("/dir3/f1", b"Hello", 0o644),
                remove_all("/dir1"),
                link("dir2/f2", "dir3/f2"),
                remove_all("dir2/f2"),
            ),
        )

    def test_rename(self, sn: Snapshotter, mount_guard: MountGuard, work: Path) -> None:
        l1 = apply_all(
            create_dir("/dir1", 0o700),
            create_dir("/somefiles", 0o700),
            create_file("/somefiles/f1", b"was here first!", 0o644),
            create_file("/somefiles/f2", b"nothing interesting", 0o644),
        )
        files = [
            create_file("/somefiles/f1-overwrite", b"new content 1", 0o644),
            rename("/somefiles/f1-overwrite", "/somefiles/f1"),
            rename("/somefiles/f2", "/somefiles/f3"),
        ]
        base = create_snapshot(sn, mount_guard, work, "", l1)
        mounts = sn.prepare("rename-probe", base, labels=GC_ROOT)
        target = mount_guard.mount(mounts, work / "rename-probe")
        try:
            if any(m.type == "overlay" for m in mounts):
                # Without redirect_dir, a directory from a lower layer cannot
                # be renamed on overlayfs (tools fall back to copying): EXDEV,
                # as the overlay module's docstring says. Prove it, then skip
                # that step.
                with pytest.raises(OSError) as exc:
                    os.rename(target / "dir1", target / "dir2")
                assert exc.value.errno == errno.EXDEV
                l2 = apply_all(*files)
            else:
                l2 = apply_all(rename("/dir1", "/dir2"), *files)
        finally:
            mount_guard.unmount(target)
        check_snapshots(sn, mount_guard, work, l1, l2)

    @pytest.mark.parametrize("depth", [0, 1, 3])
    def test_view_readonly(
        self, sn: Snapshotter, mount_guard: MountGuard, work: Path, depth: int
    ) -> None:
        """A real write through every form a view takes (bind of own, of parent, overlay)."""
        parent = ""
        for i in range(depth):
            parent = create_snapshot(
                sn, mount_guard, work, parent, create_file(f"/f{i}", b"x", 0o644)
            )
        mounts = sn.view("view", parent, labels=GC_ROOT)
        target = mount_guard.mount(mounts, work / "view-mount")
        try:
            with pytest.raises(OSError) as exc:
                (target / "testfile").write_bytes(b"testcontent")
            assert exc.value.errno == errno.EROFS
            if depth:
                with pytest.raises(OSError) as exc:
                    (target / "f0").write_bytes(b"changed")
                assert exc.value.errno == errno.EROFS
        finally:
            mount_guard.unmount(target)
        sn.remove("view")

    @pytest.mark.parametrize("with_parent", [False, True])
    def test_root_permission(
        self, sn: Snapshotter, mount_guard: MountGuard, work: Path, with_parent: bool
    ) -> None:
        old = os.umask(0o077)
        try:
            parent = ""
            if with_parent:
                parent = create_snapshot(sn, mount_guard, work, "", create_file("/f", b"", 0o644))
            preparing = prepare_mounted(sn, mount_guard, work, "preparing", parent)
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(preparing).st_mode) == 0o755
        mount_guard.unmount(preparing)

    def test_many_layers_mount(
        self,
        sn: Snapshotter,
        mount_guard: MountGuard,
        work: Path,
        capsys: pytest.CaptureFixture[str],
        request: pytest.FixtureRequest,
    ) -> None:
        appliers = [
            apply_all(
                create_file("/bottom", b"way at the bottom\n", 0o777),
                create_file("/overwriteme", b"FIRST!\n", 0o777),
                create_dir("/addhere", 0o755),
                create_dir("/onlyme", 0o755),
                create_file("/onlyme/bottom", b"bye!\n", 0o777),
            )
        ]
        for i in range(1, LAYERS):
            appliers.append(
                apply_all(
                    create_file("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
                    create_file(f"/addhere/file-{i}", b"same\n", 0o755),
                    remove_all("/onlyme"),
                    create_dir("/onlyme", 0o755),
                    create_file(f"/onlyme/file-{i}", b"only me!\n", 0o777),
                )
            )
        flat = fresh_dir(work, "flat")
        parent = ""
        for i, applier in enumerate(appliers):
            key = f"prepare-layer-{i}"
            target = prepare_mounted(sn, mount_guard, work, key, parent)
            try:
                assert_same_tree(flat, target)
                applier(flat)
                applier(target)
                assert_same_tree(flat, target)
            finally:
                mount_guard.unmount(target)
            parent = f"committed-{i}"
            sn.commit(parent, key, labels=GC_ROOT)

        mounts = sn.view("fullview", parent, labels=GC_ROOT)
        if mounts[0].type == "overlay":
            # The point of the check: absolute lowerdirs no longer fit a page.
            assert len(",".join(mounts[0].options)) > PAGE_SIZE
        started = time.perf_counter()
        view = mount_guard.mount(mounts, work / "fullview")
        elapsed = time.perf_counter() - started
        try:
            assert_same_tree(flat, view)
            assert sorted(os.listdir(view / "addhere")) == sorted(
                f"file-{i}" for i in range(1, LAYERS)
            )
            assert (view / "overwriteme").read_bytes() == f"{LAYERS - 1} WAS HERE!\n".encode()
            assert os.listdir(view / "onlyme") == [f"file-{LAYERS - 1}"]
        finally:
            mount_guard.unmount(view)
        assert not is_mountpoint(view)
        assert mounts_under(work) == []
        with capsys.disabled():
            print(f"\n{request.node.name}: {LAYERS}-layer view mounted in {elapsed * 1000:.1f} ms")

    def test_remove_detaches_mounts_inside_instead_of_deleting_through_them(
        self, sn: Snapshotter, mount_guard: MountGuard, work: Path, tmp_path: Path
    ) -> None:
        """A host directory bind-mounted into a snapshot survives the snapshot's removal."""
        host = tmp_path / "host"
        host.mkdir()
        (host / "precious").write_text("keep me")
        own = writable_dir(sn.prepare("container", labels=GC_ROOT))
        mount_guard.mount([Mount("bind", str(host), options=("rw", "rbind"))], own / "mnt")
        sn.remove("container")
        assert (host / "precious").read_text() == "keep me"
        assert mounts_under(own) == []
        assert not own.exists()
