"""The directory snapshotters' own workings, beyond the acceptance suite.

`tests.suites.snapshotter` holds what every snapshotter promises; these
check how overlay and native keep their promises on this host: the
registry, the exact mount records each builds, directories and their modes,
usage that excludes (overlay) or includes (native) the parent's files,
native's faithful copies, and crash safety (failed population, stale
directories, a parent removed mid-prepare, cleanup of debris). They read
the metastore and directories directly, as the suite never may.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import snapshotters
from ckfs import errors
from ckfs.metadata.db import DB
from ckfs.mount import Mount
from ckfs.snapshots import Cleaner, Kind, Snapshotter
from ckfs.state import State
from snapshotters.native import NativeSnapshotter
from snapshotters.overlay import OverlaySnapshotter, supports_index
from snapshotters.storage import TEMP_PREFIX, MetaStore, disk_usage
from tests.suites.snapshotter import commit_with, writable_dir

#: The snapshotters whose snapshots are directories under the state root:
#: the ones these white-box tests know how to look inside.
DIRECTORY_SNAPSHOTTERS = ("overlayfs", "native", "fuse")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    st = State(tmp_path / "root")
    yield st
    st.close()


@pytest.fixture
def db(state: State) -> DB:
    return state.db


@pytest.fixture(params=DIRECTORY_SNAPSHOTTERS)
def snapshotter(request: pytest.FixtureRequest, state: State) -> Iterator[Snapshotter]:
    sn = state.snapshotter(request.param)
    yield sn
    sn.close()


def store_of(sn: Snapshotter) -> MetaStore:
    """The metastore behind a directory snapshotter (white-box checks only)."""
    assert isinstance(sn, OverlaySnapshotter | NativeSnapshotter)
    return sn._store


# -- registry ----------------------------------------------------------------------


def test_registry_knows_its_names(state: State) -> None:
    assert snapshotters.NAMES == ("overlayfs", "native", "fuse")
    with pytest.raises(errors.InvalidArgument):
        state.snapshotter("aufs")


def test_root_with_option_separators_is_refused(tmp_path: Path) -> None:
    for name in snapshotters.NAMES:
        for root in ("a,b", "a:b"):
            state = State(tmp_path / root)
            try:
                with pytest.raises(errors.InvalidArgument):
                    state.snapshotter(name)
            finally:
                state.close()


def test_implements_the_optional_protocols(snapshotter: Snapshotter) -> None:
    assert isinstance(snapshotter, Cleaner)


def test_failed_creates_leave_no_directory(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    sn.prepare("active", "")
    sn.view("view", "")
    for create in (sn.prepare, sn.view):
        for parent in ("active", "view", "missing"):
            with pytest.raises((errors.InvalidArgument, errors.NotFound)):
                create("k", parent)
    assert sorted(os.listdir(store_of(sn).root)) == sorted(
        str(store_of(sn).snapshot(k).id) for k in ("active", "view")
    )


def test_closing_leaves_the_database_open(snapshotter: Snapshotter, db: DB) -> None:
    snapshotter.prepare("k")
    snapshotter.close()
    assert db.query("SELECT count(*) FROM snapshots")[0][0] == 1


def test_remove_deletes_the_directory(snapshotter: Snapshotter) -> None:
    commit_with(snapshotter, "base", files={"a/b": "x"})
    path = store_of(snapshotter).path(store_of(snapshotter).snapshot("base").id)
    assert path.is_dir()
    snapshotter.remove("base")
    assert not path.exists()
    assert os.listdir(store_of(snapshotter).root) == []


def test_snapshotters_have_separate_key_spaces(state: State) -> None:
    overlay = state.snapshotter("overlayfs")
    native = state.snapshotter("native")
    overlay.prepare("same")
    native.view("same")
    assert overlay.stat("same").kind is Kind.ACTIVE
    assert native.stat("same").kind is Kind.VIEW
    assert [i.name for i in native.walk()] == ["same"]


def test_overlay_mount_records(tmp_path: Path, db: DB) -> None:
    sn = OverlaySnapshotter(tmp_path / "root", db)
    index = ("index=off",) if supports_index() else ()

    (m,) = sn.prepare("a0")
    assert m == Mount("bind", str(sn.upper_dir("a0")), options=("rw", "rbind"))
    (m,) = sn.view("v0")
    assert m == Mount("bind", str(sn.upper_dir("v0")), options=("ro", "rbind"))

    commit_with(sn, "c1")
    (m,) = sn.view("v1", "c1")
    assert m == Mount("bind", str(sn.upper_dir("c1")), options=("ro", "rbind"))
    (m,) = sn.prepare("a1", "c1")
    work = sn.upper_dir("a1").parent / "work"
    assert m == Mount(
        "overlay",
        "overlay",
        options=(
            f"workdir={work}",
            f"upperdir={sn.upper_dir('a1')}",
            f"lowerdir={sn.upper_dir('c1')}",
            *index,
        ),
    )
    assert work.is_dir()

    commit_with(sn, "c2", "c1")
    commit_with(sn, "c3", "c2")
    lowers = [sn.upper_dir(n) for n in ("c3", "c2", "c1")]
    assert sn.lower_dirs("c3") == lowers[1:]
    (m,) = sn.view("v3", "c3")
    assert m == Mount(
        "overlay", "overlay", options=(f"lowerdir={':'.join(map(str, lowers))}", *index)
    )
    assert not (sn.upper_dir("v3").parent / "work").exists()
    (m,) = sn.prepare("a3", "c3")
    assert m.options[-1 - len(index)] == f"lowerdir={':'.join(map(str, lowers))}"
    assert sn.lower_dirs("a3") == lowers
    assert sn.upper_dir("a3") not in lowers
    with pytest.raises(errors.NotFound):
        sn.upper_dir("missing")


def test_native_mount_records(tmp_path: Path, db: DB) -> None:
    sn = NativeSnapshotter(tmp_path / "root", db)
    store = store_of(sn)
    (m,) = sn.prepare("a0")
    assert m == Mount("bind", str(store.fs_path(store.snapshot("a0").id)), options=("rw", "rbind"))
    (m,) = sn.view("v0")
    assert m == Mount("bind", str(store.fs_path(store.snapshot("v0").id)), options=("ro", "rbind"))
    commit_with(sn, "c1", files={"f": "x"})
    commit_with(sn, "c2", "c1", files={"g": "y"})
    c2 = store.fs_path(store.snapshot("c2").id)
    (m,) = sn.view("v2", "c2")
    assert m == Mount("bind", str(c2), options=("ro", "rbind"))
    (m,) = sn.prepare("a2", "c2")
    assert m == Mount("bind", str(store.fs_path(store.snapshot("a2").id)), options=("rw", "rbind"))
    assert sorted(os.listdir(m.source)) == ["f", "g"]


def test_new_roots_are_0755(snapshotter: Snapshotter) -> None:
    old = os.umask(0o077)
    try:
        snapshotter.prepare("a")
        snapshotter.view("v")
    finally:
        os.umask(old)
    for key in ("a", "v"):
        (m,) = snapshotter.mounts(key)
        assert stat.S_IMODE(os.stat(m.source).st_mode) == 0o755


def test_overlay_child_root_keeps_parent_owner_and_mode(tmp_path: Path, db: DB) -> None:
    sn = OverlaySnapshotter(tmp_path / "root", db)
    sn.prepare("base-a")
    upper = sn.upper_dir("base-a")
    os.chmod(upper, 0o750)
    os.chown(upper, 1, 2)
    sn.commit("base", "base-a")
    sn.prepare("child", "base")
    st = os.stat(sn.upper_dir("child"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 1, 2)


def test_usage_excludes_parents(tmp_path: Path, db: DB) -> None:
    sn = OverlaySnapshotter(tmp_path / "root", db)
    commit_with(sn, "base", files={"big": "x" * 100_000})
    sn.prepare("child", "base")
    sn.view("view", "base")
    sn.prepare("lone")  # no parent: an upper directory with nothing in it
    lone = sn.usage("lone")
    assert lone.inodes == 1
    # The parent's 100 kB count nowhere: the child is exactly an empty upper.
    assert sn.usage("child") == lone
    assert sn.usage("child").size < 100_000
    assert sn.usage("view").inodes == 1


def test_native_usage_is_its_own_copy(tmp_path: Path, db: DB) -> None:
    sn = NativeSnapshotter(tmp_path / "root", db)
    commit_with(sn, "base", files={"big": "x" * 100_000})
    sn.prepare("child", "base")
    sn.view("view", "base")
    assert sn.usage("child").inodes == 2
    assert sn.usage("child").size >= 100_000
    # A view binds the committed parent: it copies, and so uses, nothing.
    assert sn.usage("view").inodes == 1


def test_disk_usage_of_missing_path(tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound):
        disk_usage(tmp_path / "missing")


@pytest.mark.root
def test_native_copy_preserves_everything(tmp_path: Path, db: DB) -> None:
    sn = NativeSnapshotter(tmp_path / "root", db)
    sn.prepare("base-a")
    d = writable_dir(sn.mounts("base-a"))
    (d / "dir").mkdir(mode=0o700)
    os.chown(d / "dir", 7, 8)
    (d / "dir" / "file").write_text("hello")
    os.chmod(d / "dir" / "file", 0o4751)
    os.setxattr(d / "dir" / "file", "user.note", b"kept")
    os.setxattr(d / "dir" / "file", "trusted.note", b"also kept")
    os.link(d / "dir" / "file", d / "hardlink")
    os.symlink("dir/file", d / "symlink")
    os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(d / "fifo")
    os.utime(d / "dir" / "file", ns=(1_000_000_123, 2_000_000_456))
    os.lchown(d / "symlink", 5, 6)
    sn.commit("base", "base-a")

    sn.prepare("child", "base")
    c = writable_dir(sn.mounts("child"))
    f = os.lstat(c / "dir" / "file")
    assert stat.S_IMODE(f.st_mode) == 0o4751
    assert f.st_mtime_ns == 2_000_000_456
    assert os.getxattr(c / "dir" / "file", "user.note") == b"kept"
    assert os.getxattr(c / "dir" / "file", "trusted.note") == b"also kept"
    assert os.lstat(c / "hardlink").st_ino == f.st_ino
    assert f.st_nlink == 2
    dst = os.lstat(c / "dir")
    assert (stat.S_IMODE(dst.st_mode), dst.st_uid, dst.st_gid) == (0o700, 7, 8)
    assert os.readlink(c / "symlink") == "dir/file"
    assert (os.lstat(c / "symlink").st_uid, os.lstat(c / "symlink").st_gid) == (5, 6)
    null = os.lstat(c / "null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.lstat(c / "fifo").st_mode)
    # The copy is independent of the parent.
    (c / "dir" / "file").write_text("changed")
    assert (d / "dir" / "file").read_text() == "hello"


def test_failed_populate_leaves_nothing(
    snapshotter: Snapshotter, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(snapshotter)

    def boom(path: Path, kind: Kind, parent_ids: tuple[int, ...]) -> None:
        (path / "fs").mkdir()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshotter, "_populate", boom)
    with pytest.raises(OSError):
        snapshotter.prepare("k")
    monkeypatch.undo()
    assert os.listdir(store.root) == []
    snapshotter.prepare("k")  # the key is free


def test_stale_directory_at_a_new_id_is_replaced(snapshotter: Snapshotter) -> None:
    store = store_of(snapshotter)
    snapshotter.prepare("first")
    first = store.snapshot("first").id
    # As if a transaction had renamed into place and then rolled back.
    stale = store.fs_path(first + 1)
    stale.mkdir(parents=True)
    (stale / "junk").write_text("left over")
    snapshotter.prepare("second")
    assert store.snapshot("second").id == first + 1
    assert os.listdir(store.fs_path(first + 1)) == []


@pytest.mark.parametrize(
    ("recreate", "error"), [(True, errors.Unavailable), (False, errors.NotFound)]
)
def test_parent_removed_while_populating(
    snapshotter: Snapshotter,
    monkeypatch: pytest.MonkeyPatch,
    recreate: bool,
    error: type[errors.CkfsError],
) -> None:
    commit_with(snapshotter, "base")
    populate = snapshotter._populate  # type: ignore[attr-defined]

    def race(path: Path, kind: Kind, parent_ids: tuple[int, ...]) -> None:
        monkeypatch.undo()
        snapshotter.remove("base")
        if recreate:
            commit_with(snapshotter, "base")
        populate(path, kind, parent_ids)

    monkeypatch.setattr(snapshotter, "_populate", race)
    with pytest.raises(error):
        snapshotter.prepare("k", "base")
    store = store_of(snapshotter)
    assert [i.name for i in snapshotter.walk()] == (["base"] if recreate else [])
    assert sorted(os.listdir(store.root)) == ([str(store.snapshot("base").id)] if recreate else [])


def test_cleanup_removes_only_debris(snapshotter: Snapshotter) -> None:
    store = store_of(snapshotter)
    commit_with(snapshotter, "base", files={"f": "x"})
    snapshotter.prepare("k", "base")
    live = sorted(os.listdir(store.root))
    orphan = store.root / "999"
    (orphan / "fs").mkdir(parents=True)
    abandoned = store.root / f"{TEMP_PREFIX}abandoned"
    (abandoned / "fs").mkdir(parents=True)
    stray = store.root / "stray-file"
    stray.write_text("?")
    in_progress = store._new_temp()  # a create in flight holds its lock
    try:
        removed = snapshotter.cleanup()  # type: ignore[attr-defined]
        assert sorted(removed) == sorted(map(str, [orphan, abandoned, stray]))
        assert sorted(os.listdir(store.root)) == sorted([*live, in_progress.path.name])
    finally:
        in_progress.release()
    assert snapshotter.cleanup() == [str(in_progress.path)]  # type: ignore[attr-defined]
    assert sorted(os.listdir(store.root)) == live
    assert snapshotter.stat("k").parent == "base"
