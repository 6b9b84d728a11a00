"""The snapshotter acceptance suite without mounts: metadata, mount records, directories.

Every test runs against every snapshotter (`snapshotter` is parametrized over
`snapshotters.NAMES`), in a fresh state root, in the spirit of containerd's
``core/snapshots/testsuite``: the checks that need no mount live here, the
ones that mount and compare real files in
``integration/test_snapshotters_mounted.py``. Tests assert error classes,
never messages. Where a test needs to put files into a writable snapshot it
writes into the directory the bind mount would expose (the record's source)
or overlay's upper directory, which is what the mount would write to.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

import snapshotters
from ckfs import errors
from ckfs.metadata.db import DB
from ckfs.mount import Mount
from ckfs.snapshots import Cleaner, Info, Kind, Snapshotter
from snapshotters.native import NativeSnapshotter
from snapshotters.overlay import OverlaySnapshotter, supports_index
from snapshotters.storage import TEMP_PREFIX, MetaStore, disk_usage

GC_ROOT = {"containerd.io/gc.root": "2026-01-01T00:00:00Z"}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[DB]:
    db = DB(tmp_path / "root" / "metadata.db")
    yield db
    db.close()


@pytest.fixture(params=snapshotters.NAMES)
def snapshotter(request: pytest.FixtureRequest, tmp_path: Path, db: DB) -> Iterator[Snapshotter]:
    sn = snapshotters.get(request.param, tmp_path / "root", db)
    yield sn
    sn.close()


def store_of(sn: Snapshotter) -> MetaStore:
    """The metastore behind a directory snapshotter (white-box checks only)."""
    assert isinstance(sn, OverlaySnapshotter | NativeSnapshotter)
    return sn._store


def writable_dir(sn: Snapshotter, key: str) -> Path:
    """Where writes to the mounted active snapshot *key* land."""
    if isinstance(sn, OverlaySnapshotter):
        return sn.upper_dir(key)
    (m,) = sn.mounts(key)
    assert m.type == "bind" and "rw" in m.options
    return Path(m.source)


def commit_with(
    sn: Snapshotter, name: str, parent: str = "", files: dict[str, str] | None = None
) -> str:
    """Prepare, write *files* into it, commit as *name*."""
    key = f"{name}-active"
    sn.prepare(key, parent, labels=GC_ROOT)
    for rel, text in (files or {}).items():
        path = writable_dir(sn, key) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    sn.commit(name, key, labels=GC_ROOT)
    return name


def base_snapshots(sn: Snapshotter) -> None:
    """containerd's baseTestSnapshots: c1 <- c2 <- {a1, v1}; a2 and v2 on nothing."""
    sn.prepare("c1-a", "", labels=GC_ROOT)
    sn.commit("c1", "c1-a", labels=GC_ROOT)
    sn.prepare("c2-a", "c1", labels=GC_ROOT)
    sn.commit("c2", "c2-a", labels=GC_ROOT)
    sn.prepare("a1", "c2", labels=GC_ROOT)
    sn.prepare("a2", "", labels=GC_ROOT)
    sn.view("v1", "c2", labels=GC_ROOT)
    sn.view("v2", "", labels=GC_ROOT)


# -- registry ----------------------------------------------------------------------


def test_registry_knows_its_names(tmp_path: Path, db: DB) -> None:
    assert snapshotters.NAMES == ("overlayfs", "native")
    with pytest.raises(errors.InvalidArgument):
        snapshotters.get("aufs", tmp_path / "root", db)


def test_implements_the_protocols(snapshotter: Snapshotter) -> None:
    assert isinstance(snapshotter, Snapshotter)
    assert isinstance(snapshotter, Cleaner)


def test_root_with_option_separators_is_refused(tmp_path: Path, db: DB) -> None:
    for name in snapshotters.NAMES:
        with pytest.raises(errors.InvalidArgument):
            snapshotters.get(name, tmp_path / "a,b", db)
        with pytest.raises(errors.InvalidArgument):
            snapshotters.get(name, tmp_path / "a:b", db)


# -- lifecycle (containerd: Basic, StatActive, StatCommitted, Transitivity) ---------


def test_basic_lifecycle_metadata(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    mounts = sn.prepare("preparing", "", labels=GC_ROOT)
    assert len(mounts) >= 1
    sn.commit("committed", "preparing", labels=GC_ROOT)
    si = sn.stat("committed")
    assert (si.kind, si.parent) == (Kind.COMMITTED, "")
    with pytest.raises(errors.NotFound):
        sn.stat("preparing")

    sn.prepare("next", "committed", labels=GC_ROOT)
    ni = sn.stat("next")
    assert (ni.kind, ni.parent) == (Kind.ACTIVE, "committed")
    sn.commit("committed-next", "next", labels=GC_ROOT)
    si2 = sn.stat("committed-next")
    assert (si2.kind, si2.parent) == (Kind.COMMITTED, "committed")
    with pytest.raises(errors.NotFound):
        sn.stat("next")

    walked = {i.name: i for i in sn.walk()}
    assert walked == {"committed": si, "committed-next": si2}

    sn.view("nextnext", "committed-next", labels=GC_ROOT)
    sn.remove("nextnext")
    with pytest.raises(errors.FailedPrecondition):
        sn.remove("committed")
    sn.remove("committed-next")
    sn.remove("committed")
    assert list(sn.walk()) == []


def test_stat_active(snapshotter: Snapshotter) -> None:
    snapshotter.prepare("preparing", "", labels=GC_ROOT)
    si = snapshotter.stat("preparing")
    assert (si.name, si.kind, si.parent) == ("preparing", Kind.ACTIVE, "")
    assert si.labels == GC_ROOT


def test_stat_committed(snapshotter: Snapshotter) -> None:
    commit_with(snapshotter, "committed", files={"foo": "foo\n"})
    si = snapshotter.stat("committed")
    assert (si.name, si.kind, si.parent) == ("committed", Kind.COMMITTED, "")


def test_stat_missing(snapshotter: Snapshotter) -> None:
    with pytest.raises(errors.NotFound):
        snapshotter.stat("nope")


def test_transitivity(snapshotter: Snapshotter) -> None:
    commit_with(snapshotter, "snapA", files={"foo": "foo\n"})
    commit_with(snapshotter, "snapB", "snapA", files={"foo": "foo bar\n"})
    si_a, si_b = snapshotter.stat("snapA"), snapshotter.stat("snapB")
    assert si_a.parent == ""
    assert si_b.parent == "snapA"
    assert snapshotter.stat(si_b.parent).parent == ""


def test_prepare_view_fail_on_reused_keys(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    commit_with(sn, "snapA")
    sn.prepare("newlayer", "snapA")
    with pytest.raises(errors.AlreadyExists):
        sn.view("newlayer", "snapA")
    sn.prepare("prepLayer", "snapA")
    with pytest.raises(errors.AlreadyExists):
        sn.prepare("prepLayer", "snapA")
    sn.view("viewLayer", "snapA")
    with pytest.raises(errors.AlreadyExists):
        sn.view("viewLayer", "snapA")
    # One key space: a committed name is a key too.
    with pytest.raises(errors.AlreadyExists):
        sn.prepare("snapA", "")
    with pytest.raises(errors.AlreadyExists):
        sn.view("snapA", "")


def test_parent_must_exist_and_be_committed(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    with pytest.raises(errors.NotFound):
        sn.prepare("k", "missing")
    with pytest.raises(errors.NotFound):
        sn.view("k", "missing")
    sn.prepare("active", "")
    sn.view("view", "")
    for parent in ("active", "view"):
        with pytest.raises(errors.InvalidArgument):
            sn.prepare("k", parent)
        with pytest.raises(errors.InvalidArgument):
            sn.view("k", parent)
    with pytest.raises(errors.InvalidArgument):
        sn.prepare("", "")
    # Nothing of the failed attempts is left.
    assert sorted(i.name for i in sn.walk()) == ["active", "view"]
    assert sorted(os.listdir(store_of(sn).root)) == sorted(
        str(store_of(sn).snapshot(k).id) for k in ("active", "view")
    )


def test_commit_failures(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    commit_with(sn, "base")
    sn.prepare("active", "base")
    sn.view("view", "base")
    with pytest.raises(errors.AlreadyExists):
        sn.commit("base", "active")
    with pytest.raises(errors.AlreadyExists):
        sn.commit("view", "active")  # keys and names share one space
    with pytest.raises(errors.NotFound):
        sn.commit("new", "missing")
    with pytest.raises(errors.FailedPrecondition):
        sn.commit("new", "view")
    with pytest.raises(errors.FailedPrecondition):
        sn.commit("new", "base")
    with pytest.raises(errors.InvalidArgument):
        sn.commit("", "active")
    # The failures changed nothing.
    assert sn.stat("active").kind is Kind.ACTIVE
    assert sn.stat("view").kind is Kind.VIEW


def test_commit_replaces_labels_and_keeps_parent(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    commit_with(sn, "base")
    sn.prepare("k", "base", labels={"a": "1", "b": "2"})
    sn.commit("name", "k", labels={"c": "3"})
    info = sn.stat("name")
    assert info.labels == {"c": "3"}
    assert info.parent == "base"
    assert info.created_at == info.updated_at


def test_labels_are_validated(snapshotter: Snapshotter) -> None:
    with pytest.raises(errors.InvalidArgument):
        snapshotter.prepare("k", "", labels={"big": "x" * 5000})
    with pytest.raises(errors.InvalidArgument):
        snapshotter.prepare("k", "", labels={"": "v"})
    snapshotter.prepare("k", "", labels={"empty": "", "kept": "v"})
    assert snapshotter.stat("k").labels == {"kept": "v"}


# -- Update ------------------------------------------------------------------------


def test_update(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    t1 = datetime.now(UTC)
    base_snapshots(sn)
    t2 = datetime.now(UTC)
    cases = [
        ("c1", Kind.COMMITTED, ""),
        ("c2", Kind.COMMITTED, "c1"),
        ("a1", Kind.ACTIVE, "c2"),
        ("a2", Kind.ACTIVE, ""),
        ("v1", Kind.VIEW, "c2"),
        ("v2", Kind.VIEW, ""),
    ]
    for name, kind, parent in cases:
        st = sn.stat(name)
        # Both sides are floored to microseconds, so the order holds exactly.
        assert t1 <= st.created_at <= t2
        assert st.created_at == st.updated_at
        assert (st.kind, st.parent, st.name) == (kind, parent, name)

        created = st.created_at
        root_time = datetime.now(UTC).isoformat()
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", "containerd.io/gc.root": root_time}
        # Immutable fields in the info are ignored without field paths.
        attempt = Info(kind=Kind.VIEW, name=name, parent="doesnotexist", labels=expected)
        u1 = datetime.now(UTC)
        st = sn.update(attempt)
        u2 = datetime.now(UTC)
        assert st.created_at == created
        assert u1 <= st.updated_at <= u2
        assert (st.kind, st.parent, st.name) == (kind, parent, name)
        assert st.labels == expected

        st = sn.update(
            Info(kind=kind, name=name, labels={"l1": "updated", "l4": "v4"}),
            ["labels.l1", "labels.l2"],
        )
        assert st.labels == {"l1": "updated", "l3": "v3", "containerd.io/gc.root": root_time}

        expected = {"l4": "v4", "containerd.io/gc.root": root_time}
        st = sn.update(Info(kind=kind, name=name, labels=expected), ["labels"])
        assert st.labels == expected
        assert sn.stat(name) == st

        for path in ("parent", "kind", "name", "created_at", "labels.", "bogus"):
            with pytest.raises(errors.InvalidArgument):
                sn.update(Info(kind=kind, name=name, parent="doesnotexist"), [path])
        assert sn.stat(name) == st


def test_update_missing_and_oversized(snapshotter: Snapshotter) -> None:
    with pytest.raises(errors.NotFound):
        snapshotter.update(Info(kind=Kind.ACTIVE, name="nope", labels={"a": "b"}))
    snapshotter.prepare("k")
    with pytest.raises(errors.InvalidArgument):
        snapshotter.update(Info(kind=Kind.ACTIVE, name="k", labels={"a": "x" * 5000}))
    assert snapshotter.stat("k").labels == {}


# -- Remove ------------------------------------------------------------------------


def test_remove_and_key_reuse(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    sn.prepare("committed-a", "", labels=GC_ROOT)
    sn.commit("committed-1", "committed-a", labels=GC_ROOT)
    sn.prepare("reuse-1", "committed-1", labels=GC_ROOT)
    sn.remove("reuse-1")
    sn.view("reuse-1", "committed-1", labels=GC_ROOT)
    sn.remove("reuse-1")
    sn.prepare("reuse-1", "", labels=GC_ROOT)
    sn.remove("committed-1")
    sn.commit("committed-1", "reuse-1", labels=GC_ROOT)
    assert sn.stat("committed-1").kind is Kind.COMMITTED


def test_remove_missing(snapshotter: Snapshotter) -> None:
    with pytest.raises(errors.NotFound):
        snapshotter.remove("nope")


def test_remove_intermediate_snapshot(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    commit_with(sn, "committed-base")
    sn.prepare("intermediate", "committed-base", labels=GC_ROOT)
    sn.commit("committed-inter", "intermediate", labels=GC_ROOT)
    sn.prepare("toplayer", "committed-inter", labels=GC_ROOT)
    with pytest.raises(errors.FailedPrecondition):
        sn.remove("committed-inter")
    sn.remove("toplayer")
    sn.remove("committed-inter")
    sn.remove("committed-base")


def test_a_view_is_a_child_too(snapshotter: Snapshotter) -> None:
    commit_with(snapshotter, "base")
    snapshotter.view("v", "base")
    with pytest.raises(errors.FailedPrecondition):
        snapshotter.remove("base")


def test_remove_deletes_the_directory(snapshotter: Snapshotter) -> None:
    commit_with(snapshotter, "base", files={"a/b": "x"})
    path = store_of(snapshotter).path(store_of(snapshotter).snapshot("base").id)
    assert path.is_dir()
    snapshotter.remove("base")
    assert not path.exists()
    assert os.listdir(store_of(snapshotter).root) == []


# -- Walk --------------------------------------------------------------------------


WALK_CASES: list[tuple[list[str], list[str]]] = [
    (
        ['labels."containerd.io/gc.root"==check-walk'],
        ["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
    ),
    (['kind==active,labels."containerd.io/gc.root"==check-walk'], ["a-np", "a", "a-wl", "a-np-wl"]),
    (['kind==view,labels."containerd.io/gc.root"==check-walk'], ["v", "v-wl"]),
    (['kind==committed,labels."containerd.io/gc.root"==check-walk'], ["p", "p-wl"]),
    (["name==p", "name==a-np-wl"], ["p", "a-np-wl"]),
    (["name==a-wl,labels.l"], ["a-wl"]),
    (["parent==p"], ["a", "v"]),
    (['parent!="",labels."containerd.io/gc.root"==check-walk'], ["a", "v", "a-wl", "v-wl"]),
    (["labels.l"], ["p-wl", "a-wl", "v-wl", "a-np-wl"]),
    (["labels.l==2"], ["a-wl", "a-np-wl"]),
    # Beyond containerd's table: regexp, inequality, presence of parent, OR of ANDs.
    (["labels.l~=^[23]$"], ["a-wl", "v-wl", "a-np-wl"]),
    (["name~=/-wl$/"], ["p-wl", "a-wl", "v-wl", "a-np-wl"]),
    (["kind!=committed,labels.l!=2"], ["a-np", "a", "v", "v-wl"]),
    (["parent"], ["a", "v", "a-wl", "v-wl"]),
    (["kind==view", "parent==p-wl,kind==active"], ["v", "v-wl", "a-wl"]),
    (["labels.missing"], []),
    ([], ["a", "a-np", "a-np-wl", "a-wl", "p", "p-wl", "v", "v-wl"]),
]


def walk_fixture(sn: Snapshotter) -> None:
    gc = {"containerd.io/gc.root": "check-walk"}
    sn.prepare("a-np", "", labels=gc)
    sn.prepare("p-tmp", "", labels=gc)
    sn.commit("p", "p-tmp", labels=gc)
    sn.prepare("a", "p", labels=gc)
    sn.view("v", "p", labels=gc)
    sn.prepare("p-wl-tmp", "", labels=gc)
    sn.commit("p-wl", "p-wl-tmp", labels={"l": "1", **gc})
    sn.prepare("a-wl", "p-wl", labels={"l": "2", **gc})
    sn.view("v-wl", "p-wl", labels={"l": "3", **gc})
    sn.prepare("a-np-wl", "", labels={"l": "2", **gc})


@pytest.mark.parametrize(("filters", "matches"), WALK_CASES)
def test_walk(snapshotter: Snapshotter, filters: list[str], matches: list[str]) -> None:
    walk_fixture(snapshotter)
    assert sorted(i.name for i in snapshotter.walk(filters)) == sorted(matches)


def test_walk_is_sorted_and_rejects_bad_filters_at_once(snapshotter: Snapshotter) -> None:
    walk_fixture(snapshotter)
    names = [i.name for i in snapshotter.walk()]
    assert names == sorted(names)
    with pytest.raises(errors.InvalidArgument):
        snapshotter.walk(["name=="])
    with pytest.raises(errors.InvalidArgument):
        snapshotter.walk(["labels.l~=/(/"])


def test_stat_in_walk(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    prefix = "stats-in-walk-"
    sn.prepare(f"{prefix}c1-a", "", labels=GC_ROOT)
    sn.commit(f"{prefix}c1", f"{prefix}c1-a", labels=GC_ROOT)
    sn.prepare(f"{prefix}c2-a", f"{prefix}c1", labels=GC_ROOT)
    sn.commit(f"{prefix}c2", f"{prefix}c2-a", labels=GC_ROOT)
    sn.prepare(f"{prefix}a1", f"{prefix}c2", labels=GC_ROOT)
    sn.view(f"{prefix}v1", f"{prefix}c2", labels=GC_ROOT)
    seen = 0
    for info in sn.walk():
        assert sn.stat(info.name) == info
        seen += 1
    assert seen == 4


def test_changes_during_walk_do_not_disturb_it(snapshotter: Snapshotter) -> None:
    walk_fixture(snapshotter)
    walked = []
    for info in snapshotter.walk(["kind==active"]):
        snapshotter.remove(info.name)
        walked.append(info.name)
    assert sorted(walked) == ["a", "a-np", "a-np-wl", "a-wl"]
    assert list(snapshotter.walk(["kind==active"])) == []


# -- Close -------------------------------------------------------------------------


def test_close_twice(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    sn.prepare("closeTwice-prepare", "", labels=GC_ROOT)
    sn.commit("closeTwice", "closeTwice-prepare", labels=GC_ROOT)
    sn.remove("closeTwice")
    sn.close()
    sn.close()


def test_closed_snapshotter_refuses_work(snapshotter: Snapshotter, db: DB) -> None:
    snapshotter.prepare("k")
    snapshotter.close()
    for call in (
        lambda: snapshotter.stat("k"),
        lambda: snapshotter.prepare("k2"),
        lambda: snapshotter.remove("k"),
        lambda: list(snapshotter.walk()),
        lambda: snapshotter.mounts("k"),
        lambda: snapshotter.usage("k"),
    ):
        with pytest.raises(errors.FailedPrecondition):
            call()
    # The shared database is still open for its other users.
    assert db.query("SELECT count(*) FROM snapshots")[0][0] == 1


def test_state_survives_reopening(snapshotter: Snapshotter, tmp_path: Path, db: DB) -> None:
    name = store_of(snapshotter).snapshotter
    commit_with(snapshotter, "base", files={"f": "x"})
    snapshotter.prepare("k", "base")
    mounts = snapshotter.mounts("k")
    snapshotter.close()
    again = snapshotters.get(name, tmp_path / "root", db)
    assert again.stat("k").parent == "base"
    assert again.mounts("k") == mounts


def test_snapshotters_have_separate_key_spaces(tmp_path: Path, db: DB) -> None:
    overlay = snapshotters.get("overlayfs", tmp_path / "root", db)
    native = snapshotters.get("native", tmp_path / "root", db)
    overlay.prepare("same")
    native.view("same")
    assert overlay.stat("same").kind is Kind.ACTIVE
    assert native.stat("same").kind is Kind.VIEW
    assert [i.name for i in native.walk()] == ["same"]


# -- Mounts ------------------------------------------------------------------------


def test_mounts_recovers_prepare_and_view(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    commit_with(sn, "base")
    commit_with(sn, "top", "base")
    for key, parent in [("a0", ""), ("a1", "base"), ("a2", "top")]:
        mounts = sn.prepare(key, parent)
        assert sn.mounts(key) == mounts
    for key, parent in [("v0", ""), ("v1", "base"), ("v2", "top")]:
        mounts = sn.view(key, parent)
        assert sn.mounts(key) == mounts
    with pytest.raises(errors.FailedPrecondition):
        sn.mounts("base")
    with pytest.raises(errors.NotFound):
        sn.mounts("missing")


def test_mount_records_round_trip_through_json(snapshotter: Snapshotter) -> None:
    commit_with(snapshotter, "base")
    commit_with(snapshotter, "top", "base")
    for mounts in (snapshotter.prepare("a", "top"), snapshotter.view("v", "top")):
        for m in mounts:
            assert Mount.from_json(m.to_json()) == m


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


# -- Usage -------------------------------------------------------------------------


def test_usage_counts_own_files_once(snapshotter: Snapshotter) -> None:
    sn = snapshotter
    sn.prepare("a")
    empty = sn.usage("a")
    assert empty.inodes == 1
    d = writable_dir(sn, "a")
    (d / "big").write_bytes(b"x" * 64 * 1024)
    os.link(d / "big", d / "big-link")
    (d / "dir").mkdir()
    grown = sn.usage("a")
    assert grown.inodes == 3
    assert 64 * 1024 <= grown.size - empty.size < 2 * 64 * 1024
    sn.commit("c", "a")
    assert sn.usage("c") == grown
    with pytest.raises(errors.NotFound):
        sn.usage("a")


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


# -- native copies -----------------------------------------------------------------


@pytest.mark.root
def test_native_copy_preserves_everything(tmp_path: Path, db: DB) -> None:
    sn = NativeSnapshotter(tmp_path / "root", db)
    sn.prepare("base-a")
    d = writable_dir(sn, "base-a")
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
    c = writable_dir(sn, "child")
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


# -- crash safety and cleanup ------------------------------------------------------


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


def test_concurrent_prepares(snapshotter: Snapshotter) -> None:
    commit_with(snapshotter, "base", files={"f": "x"})
    failures: list[BaseException] = []

    def work(i: int) -> None:
        try:
            snapshotter.prepare(f"k{i}", "base")
            snapshotter.commit(f"c{i}", f"k{i}")
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(list(snapshotter.walk(["kind==committed"]))) == 9
