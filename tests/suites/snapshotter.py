"""The snapshotter acceptance suite without mounts, after containerd's ``SnapshotterSuite``.

`SnapshotterSuite` talks to a snapshotter only through the contract
(`ckfs.snapshots.Snapshotter`, its `Info`, `Usage` and `Kind`, and the
`ckfs.mount.Mount` records it answers), so it runs unchanged against every
registered snapshotter, through ckfsd's gRPC Snapshots service, and later
against the lazy ``fuse`` one. Bind it by subclassing it in a test module
that provides the ``make_snapshotter`` fixture: a callable that opens the
snapshotter on one fresh state per test, and opens it again (a restart) on
a second call; the fixture closes what it opened.

These are the checks that need no mount: metadata, lifecycle errors, the
Walk matrix, Update, Remove with key reuse, StatInWalk, CloseTwice, mount
records and usage. Where a check puts files into a writable snapshot it
writes where its Mount record says writes land (a bind mount's source,
overlay's ``upperdir``), and skips for a snapshotter whose records name no
such directory. The checks that mount and compare real trees are
`tests.suites.snapshotter_mounted`. Checks assert error classes, never
messages.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ckfs import errors
from ckfs.mount import Mount
from ckfs.snapshots import Info, Kind, Snapshotter

GC_ROOT = {"containerd.io/gc.root": "2026-01-01T00:00:00Z"}

#: What ``make_snapshotter`` answers: the snapshotter on the test's state, new or reopened.
SnapshotterFactory = Callable[[], Snapshotter]

#: The overlay option naming the directory that takes an overlay mount's writes.
_UPPERDIR = "upperdir="


def writable_dir(mounts: Sequence[Mount]) -> Path:
    """Where writes through *mounts* (an active snapshot's) land, read off the records.

    A writable bind mount writes to its source, an overlay mount to its
    upper directory. Any other form (a FUSE mount, several mounts) has no
    such directory, and the check asking skips: the mounted suite covers it.
    """
    if len(mounts) == 1:
        (m,) = mounts
        if m.type == "bind" and "rw" in m.options:
            return Path(m.source)
        if m.type == "overlay":
            for option in m.options:
                if option.startswith(_UPPERDIR):
                    return Path(option.removeprefix(_UPPERDIR))
    pytest.skip(f"no writable directory in the mount records {list(mounts)}")


def commit_with(
    sn: Snapshotter, name: str, parent: str = "", files: dict[str, str] | None = None
) -> str:
    """Prepare, write *files* into it, commit as *name*."""
    key = f"{name}-active"
    mounts = sn.prepare(key, parent, labels=GC_ROOT)
    if files:
        root = writable_dir(mounts)
        for rel, text in files.items():
            path = root / rel
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
    # parent is present even when "" (as containerd's storage), so this is
    # how containerd asks for base layers.
    (['parent==""'], ["a-np", "p", "p-wl", "a-np-wl"]),
    (["parent"], ["a", "a-np", "a-np-wl", "a-wl", "p", "p-wl", "v", "v-wl"]),
    (["kind==view", "parent==p-wl,kind==active"], ["v", "v-wl", "a-wl"]),
    (["labels.missing"], []),
    ([], ["a", "a-np", "a-np-wl", "a-wl", "p", "p-wl", "v", "v-wl"]),
]


class SnapshotterSuite:
    """The checks every snapshotter passes; subclass it and provide ``make_snapshotter``."""

    @pytest.fixture
    def snapshotter(self, make_snapshotter: SnapshotterFactory) -> Snapshotter:
        return make_snapshotter()

    def test_implements_the_protocols(self, snapshotter: Snapshotter) -> None:
        assert isinstance(snapshotter, Snapshotter)

    # -- lifecycle (containerd: Basic, StatActive, StatCommitted, Transitivity) ----

    def test_basic_lifecycle_metadata(self, snapshotter: Snapshotter) -> None:
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

    def test_stat_active(self, snapshotter: Snapshotter) -> None:
        snapshotter.prepare("preparing", "", labels=GC_ROOT)
        si = snapshotter.stat("preparing")
        assert (si.name, si.kind, si.parent) == ("preparing", Kind.ACTIVE, "")
        assert si.labels == GC_ROOT

    def test_stat_committed(self, snapshotter: Snapshotter) -> None:
        commit_with(snapshotter, "committed", files={"foo": "foo\n"})
        si = snapshotter.stat("committed")
        assert (si.name, si.kind, si.parent) == ("committed", Kind.COMMITTED, "")

    def test_stat_missing(self, snapshotter: Snapshotter) -> None:
        with pytest.raises(errors.NotFound):
            snapshotter.stat("nope")

    def test_transitivity(self, snapshotter: Snapshotter) -> None:
        commit_with(snapshotter, "snapA", files={"foo": "foo\n"})
        commit_with(snapshotter, "snapB", "snapA", files={"foo": "foo bar\n"})
        si_a, si_b = snapshotter.stat("snapA"), snapshotter.stat("snapB")
        assert si_a.parent == ""
        assert si_b.parent == "snapA"
        assert snapshotter.stat(si_b.parent).parent == ""

    def test_prepare_view_fail_on_reused_keys(self, snapshotter: Snapshotter) -> None:
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

    def test_parent_must_exist_and_be_committed(self, snapshotter: Snapshotter) -> None:
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

    def test_commit_failures(self, snapshotter: Snapshotter) -> None:
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

    def test_commit_replaces_labels_and_keeps_parent(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        commit_with(sn, "base")
        sn.prepare("k", "base", labels={"a": "1", "b": "2"})
        sn.commit("name", "k", labels={"c": "3"})
        info = sn.stat("name")
        assert info.labels == {"c": "3"}
        assert info.parent == "base"
        assert info.created_at == info.updated_at

    def test_labels_are_validated(self, snapshotter: Snapshotter) -> None:
        with pytest.raises(errors.InvalidArgument):
            snapshotter.prepare("k", "", labels={"big": "x" * 5000})
        with pytest.raises(errors.InvalidArgument):
            snapshotter.prepare("k", "", labels={"": "v"})
        snapshotter.prepare("k", "", labels={"empty": "", "kept": "v"})
        assert snapshotter.stat("k").labels == {"kept": "v"}

    # -- Update --------------------------------------------------------------

    def test_update(self, snapshotter: Snapshotter) -> None:
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

    def test_update_missing_and_oversized(self, snapshotter: Snapshotter) -> None:
        with pytest.raises(errors.NotFound):
            snapshotter.update(Info(kind=Kind.ACTIVE, name="nope", labels={"a": "b"}))
        snapshotter.prepare("k")
        with pytest.raises(errors.InvalidArgument):
            snapshotter.update(Info(kind=Kind.ACTIVE, name="k", labels={"a": "x" * 5000}))
        assert snapshotter.stat("k").labels == {}

    # -- Remove --------------------------------------------------------------

    def test_remove_and_key_reuse(self, snapshotter: Snapshotter) -> None:
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

    def test_remove_missing(self, snapshotter: Snapshotter) -> None:
        with pytest.raises(errors.NotFound):
            snapshotter.remove("nope")

    def test_remove_intermediate_snapshot(self, snapshotter: Snapshotter) -> None:
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

    def test_a_view_is_a_child_too(self, snapshotter: Snapshotter) -> None:
        commit_with(snapshotter, "base")
        snapshotter.view("v", "base")
        with pytest.raises(errors.FailedPrecondition):
            snapshotter.remove("base")

    def test_remove_deletes_the_files(self, snapshotter: Snapshotter) -> None:
        d = writable_dir(snapshotter.prepare("k", labels=GC_ROOT))
        (d / "a").mkdir()
        (d / "a" / "b").write_text("x")
        snapshotter.remove("k")
        assert not d.exists()

    # -- Walk ----------------------------------------------------------------

    @pytest.mark.parametrize(("filters", "matches"), WALK_CASES)
    def test_walk(self, snapshotter: Snapshotter, filters: list[str], matches: list[str]) -> None:
        walk_fixture(snapshotter)
        assert sorted(i.name for i in snapshotter.walk(filters)) == sorted(matches)

    def test_walk_is_sorted_and_rejects_bad_filters_at_once(self, snapshotter: Snapshotter) -> None:
        walk_fixture(snapshotter)
        names = [i.name for i in snapshotter.walk()]
        assert names == sorted(names)
        with pytest.raises(errors.InvalidArgument):
            snapshotter.walk(["name=="])
        with pytest.raises(errors.InvalidArgument):
            snapshotter.walk(["labels.l~=/(/"])

    def test_stat_in_walk(self, snapshotter: Snapshotter) -> None:
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

    def test_changes_during_walk_do_not_disturb_it(self, snapshotter: Snapshotter) -> None:
        walk_fixture(snapshotter)
        walked = []
        for info in snapshotter.walk(["kind==active"]):
            snapshotter.remove(info.name)
            walked.append(info.name)
        assert sorted(walked) == ["a", "a-np", "a-np-wl", "a-wl"]
        assert list(snapshotter.walk(["kind==active"])) == []

    # -- Close ---------------------------------------------------------------

    def test_close_twice(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        sn.prepare("closeTwice-prepare", "", labels=GC_ROOT)
        sn.commit("closeTwice", "closeTwice-prepare", labels=GC_ROOT)
        sn.remove("closeTwice")
        sn.close()
        sn.close()

    def test_closed_snapshotter_refuses_work(self, snapshotter: Snapshotter) -> None:
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

    def test_state_survives_reopening(self, make_snapshotter: SnapshotterFactory) -> None:
        sn = make_snapshotter()
        commit_with(sn, "base", files={"f": "x"})
        sn.prepare("k", "base")
        mounts = sn.mounts("k")
        sn.close()
        again = make_snapshotter()
        assert again.stat("k").parent == "base"
        assert again.mounts("k") == mounts

    # -- Mounts --------------------------------------------------------------

    def test_mounts_recovers_prepare_and_view(self, snapshotter: Snapshotter) -> None:
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

    def test_mount_records_round_trip_through_json(self, snapshotter: Snapshotter) -> None:
        commit_with(snapshotter, "base")
        commit_with(snapshotter, "top", "base")
        for mounts in (snapshotter.prepare("a", "top"), snapshotter.view("v", "top")):
            for m in mounts:
                assert Mount.from_json(m.to_json()) == m

    # -- Usage and concurrency -----------------------------------------------

    def test_usage_counts_own_files_once(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        d = writable_dir(sn.prepare("a"))
        empty = sn.usage("a")
        assert empty.inodes == 1
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

    def test_concurrent_prepares(self, snapshotter: Snapshotter) -> None:
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
