"""The layer index format and store: tree rules, lookups, listings, atomic commit.

Hostile trees are in test_hostile_layerindex.py (confined).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from ckfs.digest import Digest
from ckfs.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from ckfs.layerindex import dirname, model, parse_dirname
from ckfs.layerindex.model import (
    FIRST_FINO,
    ROOT,
    BadLayer,
    Chunk,
    IndexWriter,
    LayerIndex,
    Span,
    iter_nodes,
    stable_ino,
    through_lower_links,
)
from ckfs.layerindex.store import IndexStore
from tests.layerindexes import LAYER, D, Entry, F, Kind, L, build, entries_of

SHA = "sha256:" + "cd" * 32


def test_tree_attributes_and_lookup(tmp_path: Path) -> None:
    idx = build(
        tmp_path / "i.db",
        [
            Entry("", Kind.DIR, mode=0o700, uid=5, gid=6, mtime_ns=7),
            D("etc", mtime_ns=123_456_789_012),
            (F("etc/passwd", 10, mode=0o4755, uid=1, gid=2, xattrs=(("user.a", b"\0\xff"),)), 512),
            Entry("etc/link", Kind.SYMLINK, link="../x/y", mode=0o777),
            Entry("dev/null", Kind.CHAR, mode=0o666, devmajor=1, devminor=3),
            Entry("run/fifo", Kind.FIFO, mode=0o600),
        ],
    )
    root = idx.root()
    assert (root.ino, root.parent, root.name, root.kind) == (ROOT, 0, "", Kind.DIR)
    assert (root.mode, root.uid, root.gid, root.mtime_ns) == (0o700, 5, 6, 7)
    etc = idx.lookup(ROOT, "etc")
    assert etc is not None and etc.mtime_ns == 123_456_789_012
    pw = idx.lookup(etc.ino, b"passwd")
    assert pw is not None
    assert (pw.kind, pw.mode, pw.uid, pw.gid, pw.size, pw.data, pw.nlink) == (
        Kind.FILE,
        0o4755,
        1,
        2,
        10,
        512,
        1,
    )
    assert idx.xattrs(pw.ino) == {"user.a": b"\0\xff"}
    link = idx.lookup(etc.ino, "link")
    assert link is not None and link.link == "../x/y" and link.kind == Kind.SYMLINK
    dev = idx.lookup(idx.lookup(ROOT, "dev").ino, "null")  # type: ignore[union-attr]
    assert dev is not None and dev.rdev == os.makedev(1, 3)
    assert idx.node(pw.ino) == pw
    assert idx.lookup(ROOT, "nope") is None
    assert idx.lookup(pw.ino, "x") is None
    with pytest.raises(NotFound):
        idx.node(999_999)
    assert idx.count == 8 and idx.layer == LAYER and idx.source == "tar"
    # Directories: 2 + subdirectories; the root holds dev, etc, run.
    assert root.nlink == 5 and etc.nlink == 2


def test_implied_parents(tmp_path: Path) -> None:
    idx = build(tmp_path / "i.db", [F("a/b/c", 1, uid=9)])
    a = idx.lookup(ROOT, "a")
    assert a is not None
    assert (a.kind, a.mode, a.uid, a.gid, a.mtime_ns) == (Kind.DIR, 0o755, 0, 0, 0)
    assert set(entries_of(idx)) == {"a", "a/b", "a/b/c"}


def test_children_are_sorted_and_paged(tmp_path: Path) -> None:
    names = [f"n{i:04d}" for i in range(1000)]
    idx = build(tmp_path / "i.db", [F(f"d/{n}") for n in reversed(names)] + [F("z")])
    d = idx.lookup(ROOT, "d")
    assert d is not None
    got: list[str] = []
    while page := idx.children(d.ino, len(got), 77):
        got += [n.name for n in page]
    assert got == names
    assert idx.children(d.ino, 1000, 10) == []
    assert idx.children(d.ino, 5, 0) == []
    assert [n.name for n in idx.children(ROOT, 0, 10)] == ["d", "z"]
    z = idx.lookup(ROOT, "z")
    assert z is not None and idx.children(z.ino, 0, 10) == []


def test_later_entry_replaces_earlier(tmp_path: Path) -> None:
    idx = build(
        tmp_path / "i.db",
        [
            (F("f", 1), 0),
            (F("f", 2), 100),
            D("d", mode=0o700),
            F("d/x"),
            D("d", uid=3),  # a directory over a directory: attributes only
            F("g"),
            D("g"),  # a file replaced by a directory
        ],
    )
    f = idx.lookup(ROOT, "f")
    assert f is not None and (f.size, f.data) == (2, 100)
    d = idx.lookup(ROOT, "d")
    assert d is not None and (d.uid, d.mode) == (3, 0o755) and idx.lookup(d.ino, "x")
    g = idx.lookup(ROOT, "g")
    assert g is not None and g.kind == Kind.DIR
    assert sorted(entries_of(idx)) == ["d", "d/x", "f", "g"]


def test_directory_replaced_by_file_drops_subtree(tmp_path: Path) -> None:
    idx = build(
        tmp_path / "i.db",
        [
            F("d/e/f", xattrs=(("user.x", b"1"),)),
            F("d/e/g"),
            F("d/h"),
            F("keep"),
            F("d", 3),
            F("d2/x"),
        ],
    )
    assert sorted(entries_of(idx)) == ["d", "d2", "d2/x", "keep"]
    d = idx.lookup(ROOT, "d")
    assert d is not None and d.kind == Kind.FILE and d.size == 3
    # Nothing of the dropped subtree survives, xattrs included.
    assert idx.count == 5
    with sqlite3.connect(idx.path) as db:
        assert db.execute("SELECT count(*) FROM xattrs").fetchone()[0] == 0


def test_hardlinks_share_the_inode(tmp_path: Path) -> None:
    idx = build(
        tmp_path / "i.db",
        [
            (F("bin/busybox", 9, mode=0o755, xattrs=(("user.k", b"v"),)), 1024),
            L("bin/sh", "bin/busybox"),
            L("sbin/init", "bin/sh"),  # a link to a link: the same inode
            L("bin/busybox", "bin/sh"),  # re-linking a name to its own inode
        ],
    )
    bb = idx.lookup(idx.lookup(ROOT, "bin").ino, "busybox")  # type: ignore[union-attr]
    sh = idx.lookup(idx.lookup(ROOT, "bin").ino, "sh")  # type: ignore[union-attr]
    init = idx.lookup(idx.lookup(ROOT, "sbin").ino, "init")  # type: ignore[union-attr]
    assert bb is not None and sh is not None and init is not None
    assert bb.ino == sh.ino == init.ino and bb.fino == sh.fino == init.fino
    assert bb.nlink == sh.nlink == 3 and sh.data == 1024 and sh.size == 9
    assert idx.xattrs(sh.ino) == {"user.k": b"v"}
    assert idx.node(sh.ino).ino == bb.ino


def test_hardlink_keeps_the_inode_its_target_name_leaves(tmp_path: Path) -> None:
    idx = build(tmp_path / "i.db", [(F("a", 1), 0), L("b", "a"), (F("a", 2), 512)])
    a, b = idx.lookup(ROOT, "a"), idx.lookup(ROOT, "b")
    assert a is not None and b is not None
    assert a.ino != b.ino and (b.size, b.data, b.nlink) == (1, 0, 1) and a.data == 512
    assert idx.node(b.ino) == b


def test_hardlinks_to_symlinks_and_devices(tmp_path: Path) -> None:
    idx = build(
        tmp_path / "i.db",
        [
            Entry("s", Kind.SYMLINK, link="t"),
            L("s2", "s"),
            Entry("c", Kind.CHAR, devmajor=4, devminor=5),
            L("c2", "c"),
        ],
    )
    s2, c2 = idx.lookup(ROOT, "s2"), idx.lookup(ROOT, "c2")
    assert s2 is not None and s2.kind == Kind.SYMLINK and s2.link == "t" and s2.nlink == 2
    assert c2 is not None and c2.rdev == os.makedev(4, 5)


def test_whiteouts_and_opaque(tmp_path: Path) -> None:
    idx = build(
        tmp_path / "i.db",
        [
            Entry("gone", Kind.WHITEOUT),
            Entry("d", Kind.OPAQUE),
            F("d/x"),
            F("mine"),
            Entry("mine", Kind.WHITEOUT),  # hides lower layers only: mine stays
            Entry("redo", Kind.WHITEOUT),
            D("redo"),  # deleted, then made again: opaque
            Entry("again", Kind.WHITEOUT),
            F("again/y"),  # likewise when implied
            Entry("", Kind.OPAQUE),
        ],
    )
    gone = idx.lookup(ROOT, "gone")
    assert gone is not None and gone.kind == Kind.WHITEOUT and gone.mode == 0
    for name in ("d", "redo", "again"):
        node = idx.lookup(ROOT, name)
        assert node is not None and node.kind == Kind.DIR and node.opaque, name
    mine = idx.lookup(ROOT, "mine")
    assert mine is not None and mine.kind == Kind.FILE
    assert idx.root().opaque


def test_chunks_round_trip(tmp_path: Path) -> None:
    chunks = [Chunk(0, 4, 100, 0, SHA, 50), Chunk(4, 6, 100, 4, SHA), Chunk(10, 1, 150, 0, SHA)]
    idx = build(tmp_path / "i.db", [(F("f", 11), chunks), F("empty")], source="estargz")
    f = idx.lookup(ROOT, "f")
    assert f is not None and f.data == -1
    assert idx.chunks(f.ino) == chunks
    assert idx.chunks(idx.lookup(ROOT, "empty").ino) == []  # type: ignore[union-attr]


def test_chunks_written_in_batches_are_all_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model, "_CHUNK_BATCH", 3)
    other = "sha512:" + "0" * 128  # not the sha256 fast path: Digest.parse takes it
    files = [
        (F(f"f{i}", 2), [Chunk(0, 1, 10 * i, 0, SHA), Chunk(1, 1, 10 * i, 1, other)])
        for i in range(5)
    ]
    idx = build(tmp_path / "i.db", [*files, F("f2", 0)], source="estargz")
    for i in (0, 1, 3, 4):
        assert idx.chunks(idx.lookup(ROOT, f"f{i}").ino) == files[i][1]  # type: ignore[union-attr]
    assert idx.chunks(idx.lookup(ROOT, "f2").ino) == []  # type: ignore[union-attr]  # replaced
    with sqlite3.connect(idx.path) as db:  # the replaced file's chunks are gone
        assert db.execute("SELECT count(*) FROM chunks").fetchone()[0] == 8


def test_spans(tmp_path: Path) -> None:
    spans = [Span(0, 10, 0, 100, "0" * 64), Span(10, 5, 100, 50, "1" * 64)]
    with IndexWriter(tmp_path / "i.db", layer=LAYER, source="gzip-index", blob_size=15) as w:
        for s in spans:
            w.add_span(s)
        w.set_meta("diff_id", SHA)
        idx = w.commit()
    assert idx.spans() == spans
    assert idx.span_for(0) == spans[0] and idx.span_for(99) == spans[0]
    assert idx.span_for(100) == spans[1] and idx.span_for(149) == spans[1]
    assert idx.span_for(150) is None
    assert idx.meta("diff_id") == SHA and idx.meta("nope") is None
    assert idx.blob_size == 15 and idx.source == "gzip-index"


@pytest.mark.parametrize(
    "span",
    [
        Span(0, 10, 1, 10, "0" * 64),  # does not start at 0
        Span(0, 10, 0, 0, "0" * 64),  # empty
        Span(0, 10, 0, 10, "0"),  # not a sha256
        Span(90, 20, 0, 10, "0" * 64),  # past the blob
        Span(-1, 1, 0, 10, "0" * 64),
        Span(0, 10, 0, 1 << 70, "0" * 64),  # more than SQLite holds
    ],
)
def test_bad_spans(tmp_path: Path, span: Span) -> None:
    with (
        IndexWriter(tmp_path / "i.db", layer=LAYER, source="tar", blob_size=100) as w,
        pytest.raises(BadLayer),
    ):
        w.add_span(span)


def test_stable_inode_numbers(tmp_path: Path) -> None:
    items = [F("a/b"), D("c"), F("c/d")]
    one = build(tmp_path / "1.db", items)
    two = build(tmp_path / "2.db", list(reversed(items)))
    other = build(tmp_path / "3.db", items, layer=Digest.parse(SHA))
    finos = {p: n.fino for p, n in iter_nodes(one)}
    assert finos == {p: n.fino for p, n in iter_nodes(two)}
    assert finos["a/b"] == stable_ino(LAYER, "a/b")
    assert all(f >= FIRST_FINO and f < 1 << 63 for f in finos.values())
    assert not set(finos.values()) & {n.fino for _, n in iter_nodes(other)}


def test_stable_inode_clashes_get_distinct_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model, "stable_ino", lambda layer, path: FIRST_FINO + 7)
    idx = build(tmp_path / "i.db", [F("a"), F("b"), L("c", "a"), D("d")])
    finos = {p: n.fino for p, n in iter_nodes(idx)}
    assert finos["a"] == finos["c"]
    assert len({finos["a"], finos["b"], finos["d"], idx.root().fino}) == 4


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        IndexWriter(tmp_path / "i.db", layer=LAYER, source="tar", blob_size=1) as w,
    ):
        w.add(F("x"))
        raise RuntimeError("source failed")
    assert list(tmp_path.iterdir()) == []
    w.abort()  # idempotent


def test_finish_then_publish_and_abort_between(tmp_path: Path) -> None:
    with IndexWriter(tmp_path / "i.db", layer=LAYER, source="tar", blob_size=1) as w:
        w.add(F("x"))
        w.finish()
        with pytest.raises(InvalidArgument):
            w.add(F("y"))  # finished: closed to additions
    assert list(tmp_path.iterdir()) == []  # left before publish: aborted, nothing kept
    with IndexWriter(tmp_path / "i.db", layer=LAYER, source="tar", blob_size=1) as w:
        with pytest.raises(InvalidArgument):
            w.publish()  # not finished
        w.add(F("x"))
        w.finish()
        idx = w.publish()
    assert [p.name for p in tmp_path.iterdir()] == ["i.db"]
    assert idx.lookup(ROOT, "x") is not None


def test_commit_replaces_atomically_and_old_readers_keep_reading(tmp_path: Path) -> None:
    old = build(tmp_path / "i.db", [F("old")])
    new = build(tmp_path / "i.db", [F("new")])
    assert old.lookup(ROOT, "old") is not None and old.lookup(ROOT, "new") is None
    assert new.lookup(ROOT, "new") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.db"]


def test_open_refuses_what_is_not_an_index(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        LayerIndex.open(tmp_path / "missing.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite" * 100)
    with pytest.raises(DataLoss):
        LayerIndex.open(junk)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE meta (key TEXT, value TEXT)")
        db.execute("INSERT INTO meta VALUES ('format', '999')")
    with pytest.raises(DataLoss):
        LayerIndex.open(other)


def test_writer_refuses_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        IndexWriter(tmp_path / "i.db", layer=LAYER, source="zip", blob_size=1)


def test_lookups_from_many_threads(tmp_path: Path) -> None:
    idx = build(tmp_path / "i.db", [F(f"d/f{i}", i) for i in range(200)])
    d = idx.lookup(ROOT, "d")
    assert d is not None
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(200):
                node = idx.lookup(d.ino, f"f{i}")
                assert node is not None and node.size == i
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- store --------------------------------------------------------------------


def test_dirname_round_trip() -> None:
    assert dirname(LAYER) == "sha256-" + "ab" * 32
    assert parse_dirname(dirname(LAYER)) == LAYER
    for bad in ("sha256:" + "ab" * 32, "md5-00", "sha256-xyz", "merged", ""):
        with pytest.raises(InvalidArgument):
            parse_dirname(bad)


def test_store(tmp_path: Path) -> None:
    store = IndexStore(tmp_path)
    assert store.get(LAYER) is None and store.digests() == []
    assert store.path(LAYER) == tmp_path / "layers" / "sha256" / ("ab" * 32) / "index.db"
    with store.writer(LAYER, source="tar", blob_size=10) as w:
        w.add(F("x"))
        w.commit().close()
    (tmp_path / "layers" / "sha256" / "stray").mkdir()
    (tmp_path / "layers" / "sha256" / "stray" / "index.db").touch()
    assert store.digests() == [LAYER]
    idx = store.get(LAYER)
    assert idx is not None and idx.lookup(ROOT, "x") is not None
    idx.close()
    assert store.remove(LAYER) and not store.remove(LAYER)
    assert store.get(LAYER) is None and store.digests() == []


def test_store_treats_a_damaged_index_as_missing(tmp_path: Path) -> None:
    store = IndexStore(tmp_path)
    store.path(LAYER).parent.mkdir(parents=True)
    store.path(LAYER).write_bytes(b"\0" * 4096)
    assert store.get(LAYER) is None


def test_closed_or_damaged_index_fails_the_call(tmp_path: Path) -> None:
    idx = build(tmp_path / "i.db", [F(f"d/f{i}") for i in range(5000)])
    idx.close()
    with pytest.raises(FailedPrecondition):
        idx.lookup(ROOT, "d")
    idx = LayerIndex.open(tmp_path / "i.db")
    size = (tmp_path / "i.db").stat().st_size
    with open(tmp_path / "i.db", "r+b") as f:  # every page but the first
        f.seek(4096)
        f.write(b"\xa5" * (size - 4096))
    with pytest.raises(DataLoss):
        list(iter_nodes(idx))


def test_store_sweeps_what_dead_writers_left(tmp_path: Path) -> None:
    store = IndexStore(tmp_path)
    d = store.layer_dir(LAYER)
    d.mkdir(parents=True)
    dead = 2**22 + 7  # above Linux's PID_MAX_LIMIT: no process has it
    gone = [d / f".index.db.{dead}.0123abcd.tmp", d / f".index.gzidx.{dead}.0123abcd.tmp"]
    live = d / f".index.db.{os.getpid()}.0123abcd.stage"
    for f in [*gone, live]:
        f.write_bytes(b"x")
    with store.writer(LAYER, source="tar", blob_size=1) as w:
        assert not any(f.exists() for f in gone) and live.exists()
        w.abort()
    assert live.exists()


def test_implied_directories_and_paths(tmp_path: Path) -> None:
    idx = build(tmp_path / "i.db", [F("a/b/c"), D("a"), L("h", "a/b/c")])
    a = idx.lookup(ROOT, "a")
    assert a is not None and not a.implied  # made explicit by its own entry
    b = idx.lookup(a.ino, "b")
    assert b is not None and b.implied and idx.path_of(b.ino) == "a/b"
    assert idx.implied_dirs() == ["a/b"]
    assert idx.path_of(ROOT) == ""
    h = idx.lookup(ROOT, "h")
    assert h is not None and idx.path_of(h.ino) in ("h", "a/b/c")  # one of its names
    with pytest.raises(NotFound):
        idx.path_of(10**9)


@pytest.mark.parametrize(
    ("upper", "lower", "want"),
    [
        ([F("lib/x")], [Entry("lib", Kind.SYMLINK, link="usr/lib")], "lib"),
        ([F("usr/lib/x/y")], [D("usr"), Entry("usr/lib", Kind.SYMLINK, link="/lib")], "usr/lib"),
        ([F("etc/x")], [F("etc")], "etc"),
        ([D("lib"), F("lib/x")], [Entry("lib", Kind.SYMLINK, link="usr/lib")], None),
        ([F("lib/x")], [D("lib")], None),
        ([F("lib/x")], [Entry("lib", Kind.WHITEOUT)], None),
        ([F("lib/x")], [F("other")], None),
    ],
)
def test_paths_through_lower_links(
    tmp_path: Path, upper: list[Entry], lower: list[Entry], want: str | None
) -> None:
    top = build(tmp_path / "top.db", upper)
    below = [build(tmp_path / "empty.db", []), build(tmp_path / "low.db", lower)]
    assert through_lower_links(top, below) == want


def test_through_lower_links_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "MAX_IMPLIED_CHECKS", 1)
    top = build(tmp_path / "top.db", [F("a/x"), F("b/x")])
    assert through_lower_links(top, [build(tmp_path / "low.db", [])]) == "b"
