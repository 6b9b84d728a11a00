"""The FUSE mount's model (`snapshotters.fuse.tree`), without FUSE or root.

Layers are real indexes written by `ckfs.layerindex.model.IndexWriter`; the
tests drive the tree as the kernel would (lookups, readdirplus entries,
forgets) and check attributes, inode numbers, lookup counts, overlay
markers and the merged views' whiteout and opaque rules.
"""

from __future__ import annotations

import itertools
import json
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from ckfs.archive.entry import Entry, Kind
from ckfs.digest import Digest, from_bytes
from ckfs.errors import InvalidArgument, NotFound
from ckfs.layerindex.model import IndexWriter
from ckfs.layerindex.store import IndexStore, dirname
from snapshotters.fuse.tree import (
    MERGED,
    MERGED_INO,
    OPAQUE_XATTR,
    PAGE,
    RESERVED,
    ROOT_INO,
    Inode,
    Tree,
)

MTIME = 1_700_000_000_123_456_789


def layer(store: IndexStore, seed: str, entries: Sequence[Entry]) -> Digest:
    """Index *entries* as the layer named by *seed*; its digest."""
    digest = from_bytes(seed.encode())
    path = store.path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with IndexWriter(path, layer=digest, source="tar", blob_size=1 << 30) as w:
        for e in entries:
            w.add(e, data=0 if e.kind == Kind.FILE else -1)
        w.commit().close()
    return digest


def f(path: str, **kw: object) -> Entry:
    return Entry(path, Kind.FILE, **{"mtime_ns": MTIME, **kw})  # type: ignore[arg-type]


def d(path: str, **kw: object) -> Entry:
    return Entry(path, Kind.DIR, **{"mode": 0o755, "mtime_ns": MTIME, **kw})  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> IndexStore:
    return IndexStore(tmp_path / "root")


@pytest.fixture
def views(tmp_path: Path) -> Path:
    v = tmp_path / "views"
    v.mkdir()
    return v


def walk(tree: Tree, path: str, base: int = ROOT_INO) -> Inode:
    """Look *path* up component by component, counting each lookup."""
    inode = tree.inode(base)
    for part in path.split("/"):
        inode = tree.lookup(inode.ino, part)
    return inode


def listing(tree: Tree, ino: int, offset: int = 0) -> list[tuple[int, str]]:
    return [(nxt, e.name) for nxt, e in tree.opendir(ino).entries(offset)]


def test_top_level_lists_merged_and_every_layer(store: IndexStore, views: Path) -> None:
    a = layer(store, "a", [f("x")])
    b = layer(store, "b", [f("y")])
    tree = Tree(store, views)
    names = [n for _, n in listing(tree, ROOT_INO)]
    assert names == [MERGED, *sorted([dirname(a), dirname(b)])]
    top = tree.lookup(ROOT_INO, dirname(a))
    assert stat.S_ISDIR(top.attr.mode) and top.ino >= RESERVED
    assert tree.lookup(ROOT_INO, MERGED).ino == MERGED_INO
    for bad in ("nope", "sha256-00", "sha256-" + "0" * 64, ".."):
        with pytest.raises(NotFound):
            tree.lookup(ROOT_INO, bad)


def test_attributes_are_the_layers(store: IndexStore, views: Path) -> None:
    digest = layer(
        store,
        "attrs",
        [
            d("bin", mode=0o1777, uid=7, gid=8),
            f("bin/su", mode=0o4755, uid=0, gid=0, size=12345),
            f("bin/sg", mode=0o2711, uid=1000, gid=1001, size=3),
            Entry("bin/sh", Kind.SYMLINK, mode=0o777, link="busybox", mtime_ns=MTIME),
            Entry("dev/null", Kind.CHAR, mode=0o666, devmajor=1, devminor=3, mtime_ns=MTIME),
            Entry("dev/sda", Kind.BLOCK, mode=0o660, devmajor=8, devminor=0, mtime_ns=MTIME),
            Entry("run/fifo", Kind.FIFO, mode=0o600, mtime_ns=MTIME),
        ],
    )
    tree = Tree(store, views)
    base = dirname(digest)
    su = walk(tree, f"{base}/bin/su").attr
    assert (su.mode, su.uid, su.gid, su.size, su.mtime_ns, su.nlink) == (
        stat.S_IFREG | 0o4755,
        0,
        0,
        12345,
        MTIME,
        1,
    )
    assert su.blocks == (12345 + 511) // 512
    assert walk(tree, f"{base}/bin/sg").attr.mode == stat.S_IFREG | 0o2711
    b = walk(tree, f"{base}/bin").attr
    assert (b.mode, b.uid, b.gid) == (stat.S_IFDIR | 0o1777, 7, 8)
    sh = walk(tree, f"{base}/bin/sh")
    assert sh.attr.mode == stat.S_IFLNK | 0o777 and sh.attr.size == len("busybox")
    assert tree.readlink(sh.ino) == "busybox"
    null = walk(tree, f"{base}/dev/null").attr
    assert (null.mode, null.rdev) == (stat.S_IFCHR | 0o666, (1 << 8) | 3)
    assert walk(tree, f"{base}/dev/sda").attr.mode == stat.S_IFBLK | 0o660
    assert walk(tree, f"{base}/run/fifo").attr.mode == stat.S_IFIFO | 0o600
    with pytest.raises(InvalidArgument):
        tree.readlink(walk(tree, f"{base}/bin/su").ino)
    with pytest.raises(InvalidArgument):
        tree.file(walk(tree, f"{base}/bin").ino)


def test_hardlinks_share_one_inode(store: IndexStore, views: Path) -> None:
    digest = layer(store, "links", [f("a", size=5), Entry("b", Kind.HARDLINK, link="a"), f("c")])
    tree = Tree(store, views)
    a = walk(tree, f"{dirname(digest)}/a")
    b = walk(tree, f"{dirname(digest)}/b")
    assert a is b and a.attr.nlink == 2 and a.lookups == 2
    assert walk(tree, f"{dirname(digest)}/c").ino != a.ino


def test_whiteouts_opaque_and_overlay_xattrs(store: IndexStore, views: Path) -> None:
    digest = layer(
        store,
        "markers",
        [
            d("opq"),
            Entry("opq", Kind.OPAQUE),
            Entry("gone", Kind.WHITEOUT),
            f("cap", xattrs=(("security.capability", b"\x01\x02"), ("user.k", b"v"))),
        ],
    )
    tree = Tree(store, views)
    base = dirname(digest)
    gone = walk(tree, f"{base}/gone").attr
    assert (stat.S_ISCHR(gone.mode), gone.rdev, gone.mode & 0o7777) == (True, 0, 0)
    opq = walk(tree, f"{base}/opq")
    assert tree.xattrs(opq.ino) == {OPAQUE_XATTR: b"y"}
    cap = walk(tree, f"{base}/cap")
    assert tree.xattrs(cap.ino) == {"security.capability": b"\x01\x02", "user.k": b"v"}
    assert tree.xattrs(walk(tree, base).ino) == {}
    assert tree.xattr(opq.ino, OPAQUE_XATTR) == b"y"
    assert tree.xattr(cap.ino, "security.capability") == b"\x01\x02"
    for ino in (opq.ino, cap.ino):
        assert tree.xattr(ino, "trusted.overlay.metacopy") is None
    assert tree.xattr(cap.ino, OPAQUE_XATTR) is None


def test_forget_is_exact_and_closes_layers(store: IndexStore, views: Path) -> None:
    digest = layer(store, "forget", [f("dir/file")])
    tree = Tree(store, views)
    base = dirname(digest)
    file = walk(tree, f"{base}/dir/file")
    again = walk(tree, f"{base}/dir/file")
    assert again is file and file.lookups == 2
    top = tree.inode(walk(tree, base).ino)
    assert top.lookups == 3
    assert tree.statistics() == {"inodes": 5, "layers": 1}
    tree.forget(file.ino, 1)
    assert tree.inode(file.ino).lookups == 1
    tree.forget(file.ino, 1)
    with pytest.raises(NotFound):
        tree.inode(file.ino)
    dir_ino = tree.lookup(top.ino, "dir").ino
    tree.forget(dir_ino, 3)
    tree.forget(top.ino, 3)
    # Only the server's own directories remain, and no index is open.
    assert tree.statistics() == {"inodes": 2, "layers": 0}
    tree.forget(ROOT_INO, 5)
    tree.forget(12345678, 1)  # unknown: ignored
    assert tree.inode(ROOT_INO).lookups == 1


def test_listing_pages_and_resumes(store: IndexStore, views: Path) -> None:
    n = PAGE * 2 + 7
    digest = layer(store, "big", [f(f"d/{i:05}") for i in range(n)])
    tree = Tree(store, views)
    d_ino = walk(tree, f"{dirname(digest)}/d").ino
    entries = listing(tree, d_ino)
    assert [name for _, name in entries] == [f"{i:05}" for i in range(n)]
    assert [nxt for nxt, _ in entries] == list(range(1, n + 1))
    assert listing(tree, d_ino, n - 2) == entries[-2:]
    # Listed entries are not counted until the kernel accepts them.
    _, entry = next(iter(tree.opendir(d_ino).entries(3)))
    with pytest.raises(NotFound):
        tree.inode(entry.inode.ino)
    assert tree.remember(entry.inode).lookups == 1
    assert tree.lookup(d_ino, entry.name).lookups == 2


def test_listing_is_kept_for_the_next_one(store: IndexStore, views: Path) -> None:
    digest = layer(store, "again", [f(f"d/{i:03}") for i in range(300)] + [f("d/z", size=7)])
    tree = Tree(store, views)
    d_ino = walk(tree, f"{dirname(digest)}/d").ino
    first = tree.opendir(d_ino)
    part = list(itertools.islice(first.entries(0), 100))
    assert tree.inode(d_ino).children is None  # not read to its end yet
    rest = list(first.entries(100))
    kept = tree.inode(d_ino).children
    assert kept is not None and [n for n, _ in kept] == [
        n for _, e in part + rest for n in [e.name]
    ]
    # Known children come back as the same inodes; the others from the index.
    z = tree.lookup(d_ino, "z")
    again = dict((e.name, e.inode) for _, e in tree.opendir(d_ino).entries(0))
    assert again["z"] is z and again["000"].attr == part[0][1].inode.attr
    assert [nxt for nxt, _ in tree.opendir(d_ino).entries(299)] == [300, 301]


def write_view(views: Path, name: str, layers: Sequence[Digest]) -> None:
    (views / f"{name}.json").write_text(json.dumps({"layers": list(layers)}))


def test_merged_view_applies_whiteouts_and_opaque_dirs(store: IndexStore, views: Path) -> None:
    bottom = layer(
        store,
        "bottom",
        [
            f("a/x", size=1),
            f("a/y", size=2),
            f("o/old"),
            f("g/h"),
            f("k"),
            f("keep", size=9),
            f("gone"),
        ],
    )
    top = layer(
        store,
        "top",
        [
            Entry("a/x", Kind.WHITEOUT),
            f("a/z", size=3),
            d("o"),
            Entry("o", Kind.OPAQUE),
            f("o/new"),
            f("g", size=4),  # a file over a directory
            d("k"),  # a directory over a file
            f("k/l"),
            Entry("gone", Kind.WHITEOUT),
        ],
    )
    write_view(views, "img", [bottom, top])
    tree = Tree(store, views)
    assert [n for _, n in listing(tree, MERGED_INO)] == ["img"]
    root = tree.lookup(MERGED_INO, "img")
    assert [n for _, n in listing(tree, root.ino)] == ["a", "g", "k", "keep", "o"]
    a = tree.lookup(root.ino, "a")
    assert [n for _, n in listing(tree, a.ino)] == ["y", "z"]
    with pytest.raises(NotFound):
        tree.lookup(a.ino, "x")
    o = tree.lookup(root.ino, "o")
    assert [n for _, n in listing(tree, o.ino)] == ["new"]
    assert tree.xattrs(o.ino) == {}  # applied here, not shown
    g = tree.lookup(root.ino, "g")
    assert stat.S_ISREG(g.attr.mode) and g.attr.size == 4
    k = tree.lookup(root.ino, "k")
    assert [n for _, n in listing(tree, k.ino)] == ["l"]
    # Files are the layers' own inodes; directories are the view's.
    keep = tree.lookup(root.ino, "keep")
    assert keep is walk(tree, f"{dirname(bottom)}/keep")
    layer_a = walk(tree, f"{dirname(bottom)}/a")
    assert a.ino != layer_a.ino and a.attr.nlink == 1
    assert tree.describe(a.ino) == "view img path /a"
    assert tree.describe(keep.ino) == f"layer {bottom} path /keep"


def test_inode_numbers_survive_a_new_tree(store: IndexStore, views: Path) -> None:
    lower = layer(store, "l1", [f("d/e/f"), Entry("d/h", Kind.HARDLINK, link="d/e/f")])
    upper = layer(store, "l2", [f("d/e/g")])
    write_view(views, "v", [lower, upper])
    paths = [f"{dirname(lower)}/d/e/f", f"{dirname(lower)}/d/h", f"{dirname(upper)}/d/e/g"]
    merged = ["v/d", "v/d/e", "v/d/e/f", "v/d/e/g"]

    def numbers() -> list[int]:
        tree = Tree(store, views)
        inos = [walk(tree, p).ino for p in paths]
        return inos + [walk(tree, p, MERGED_INO).ino for p in merged]

    first = numbers()
    assert first == numbers()
    assert first[0] == first[1]  # hardlinks
    # A view's files are its layers' inodes; its directories its own.
    assert first[5:] == [first[0], first[2]]
    assert len(set(first)) == 4
    assert min(first) >= RESERVED


def test_bad_views(store: IndexStore, views: Path) -> None:
    tree = Tree(store, views)
    (views / "broken.json").write_text("{not json")
    (views / "wrong.json").write_text('{"layers": "sha256:00"}')
    write_view(views, "missing", [from_bytes(b"never indexed")])
    (views / ".tmp.json").write_text("{}")
    write_view(views, "empty", [])
    # Listing skips (and logs) the views it cannot open; the rest stay.
    assert [n for _, n in listing(tree, MERGED_INO)] == ["empty"]
    assert listing(tree, tree.lookup(MERGED_INO, "empty").ino) == []
    for name in ("broken", "wrong"):
        with pytest.raises(InvalidArgument):
            tree.lookup(MERGED_INO, name)
    with pytest.raises(NotFound):
        tree.lookup(MERGED_INO, "missing")
    with pytest.raises(NotFound):
        tree.lookup(MERGED_INO, ".tmp")
    assert tree.statistics()["layers"] == 0
