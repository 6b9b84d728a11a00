"""Hostile trees given to the layer index: each gets a defined outcome.

A layer's entries (from a tar, a gzip stream or an eStargz TOC) are as
hostile as any archive: one path given twice with different types, links
out of the layer or through symlinked directories, absurd nesting, sizes
near 2**63, chunk maps with gaps and overlaps. The index either refuses the
layer (`BadLayer`, so it falls back to the eager path, loudly) or builds a
tree that means what an unpack would. Runs confined (``test_hostile``).
"""

from __future__ import annotations

import gzip
import hashlib
import random
import resource
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import DataLoss, InvalidArgument
from ckfs.layerindex.gzindex import index_gzip
from ckfs.layerindex.model import ROOT, BadLayer, Chunk, LayerIndex, Limits, iter_nodes
from ckfs.layerindex.tarindex import index_tar
from tests import tarbuild as tb
from tests.layerindexes import D, Entry, F, Item, Kind, L, build, entries_of

SHA = "sha256:" + "cd" * 32
TAR = "application/vnd.oci.image.layer.v1.tar"
TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"
INT64 = (1 << 63) - 1


def kinds(items: list[Item], tmp_path: Path) -> dict[str, str]:
    return {p: k for p, (k, _) in entries_of(build(tmp_path / "i.db", items)).items()}


# -- one path, several types ----------------------------------------------------


@pytest.mark.parametrize(
    ("items", "want"),
    [
        ([F("x"), D("x")], {"x": "DIR"}),
        ([D("x"), F("x/y"), F("x")], {"x": "FILE"}),
        ([F("x"), Entry("x", Kind.SYMLINK, link="/etc")], {"x": "SYMLINK"}),
        ([Entry("x", Kind.SYMLINK, link="d"), D("x"), F("x/y")], {"x": "DIR", "x/y": "FILE"}),
        ([D("x"), F("x/y"), Entry("x", Kind.FIFO), D("x")], {"x": "DIR"}),
        ([F("x"), Entry("x", Kind.WHITEOUT)], {"x": "FILE"}),
        ([Entry("x", Kind.WHITEOUT), F("x")], {"x": "FILE"}),
        ([F("a"), L("x", "a"), F("x")], {"a": "FILE", "x": "FILE"}),
    ],
)
def test_one_path_several_types(tmp_path: Path, items: list[Item], want: dict[str, str]) -> None:
    assert kinds(items, tmp_path) == want


def test_dropped_subtree_leaves_no_reachable_inode(tmp_path: Path) -> None:
    items: list[Item] = [F(f"d/{i}/f{j}") for i in range(30) for j in range(30)]
    idx = build(tmp_path / "i.db", [*items, F("d"), D("d"), F("d/new")])
    assert sorted(entries_of(idx)) == ["d", "d/new"]
    assert idx.count == 3


def test_hardlink_into_a_dropped_subtree_keeps_its_inode(tmp_path: Path) -> None:
    idx = build(
        tmp_path / "i.db",
        [(F("d/f", 4, xattrs=(("user.k", b"v"),)), 512), L("h", "d/f"), F("d")],
    )
    h = idx.lookup(ROOT, "h")
    assert h is not None and (h.size, h.data, h.nlink) == (4, 512, 1)
    assert idx.xattrs(h.ino) == {"user.k": b"v"} and idx.node(h.ino) == h


# -- links out of the layer, through links, to what cannot be linked -------------


@pytest.mark.parametrize(
    "items",
    [
        [L("x", "etc/shadow")],  # not in this layer (lower layers are not reachable)
        [D("d"), L("x", "d")],  # a directory
        [Entry("w", Kind.WHITEOUT), L("x", "w")],  # a whiteout
        [Entry("s", Kind.SYMLINK, link="/etc"), L("x", "s/shadow")],  # through a symlink
        [F("f"), L("x", "f/y")],  # below a file
        [F("d/f"), F("d"), L("x", "d/f")],  # target dropped with its directory
        [D("x"), Entry("x/y", Kind.CHAR), L("x", "x/y")],  # target inside what it replaces
    ],
)
def test_bad_hardlinks(tmp_path: Path, items: list[Item]) -> None:
    with pytest.raises(BadLayer, match="hardlink"):
        build(tmp_path / "i.db", items)


@pytest.mark.parametrize(
    "items",
    [
        [Entry("lib", Kind.SYMLINK, link="/usr/lib"), F("lib/libc.so")],
        [Entry("lib", Kind.SYMLINK, link="../../.."), F("lib/etc/passwd")],
        [F("f"), F("f/g")],
        [Entry("f", Kind.FIFO), D("f/g")],
        [Entry("s", Kind.SYMLINK, link="/"), Entry("s", Kind.OPAQUE)],
        [Entry("s", Kind.SYMLINK, link="/"), Entry("s/x", Kind.WHITEOUT)],
    ],
)
def test_paths_below_non_directories_refuse_the_layer(tmp_path: Path, items: list[Item]) -> None:
    with pytest.raises(BadLayer, match="is a"):
        build(tmp_path / "i.db", items)


@pytest.mark.parametrize("kind", [Kind.FILE, Kind.SYMLINK, Kind.WHITEOUT, Kind.FIFO])
def test_root_keeps_its_type(tmp_path: Path, kind: Kind) -> None:
    with pytest.raises(BadLayer, match="root"):
        build(tmp_path / "i.db", [Entry("", kind, link="x")])


@pytest.mark.parametrize(
    "path", ["/etc/x", "a/../b", "../b", "a//b", "a/./b", "a/", ".", "a\0b", "x/.."]
)
def test_unnormalized_paths_are_refused(tmp_path: Path, path: str) -> None:
    # ckfs.archive.entry cleans paths; the index checks the shape again.
    with pytest.raises(BadLayer):
        build(tmp_path / "i.db", [F(path)])


# -- sizes and limits -----------------------------------------------------------


def test_nesting_and_name_limits(tmp_path: Path) -> None:
    limits = Limits(depth=40, name=20, path=200, entries=100)
    ok = "/".join(["d"] * 40)
    idx = build(tmp_path / "ok.db", [F(ok)], limits=limits)
    assert len(list(iter_nodes(idx))) == 40
    for bad, why in [
        ("/".join(["d"] * 41), "deeper"),
        ("x" * 21, "name too long"),
        ("/".join(["abcdefghij"] * 19), "path too long"),
    ]:
        with pytest.raises(BadLayer, match=why):
            build(tmp_path / "bad.db", [F(bad)], limits=limits)
    with pytest.raises(BadLayer, match="name too long"):
        build(tmp_path / "bad.db", [F("é" * 11)], limits=limits)  # 22 bytes


def test_entry_limit_counts_implied_directories(tmp_path: Path) -> None:
    limits = Limits(entries=50)
    build(tmp_path / "ok.db", [F("/".join(["d"] * 48) + "/f")], limits=limits)
    with pytest.raises(BadLayer, match="more than 50 entries"):
        build(tmp_path / "bad.db", [F("/".join(["d"] * 50) + "/f")], limits=limits)
    with pytest.raises(BadLayer, match="more than 50 entries"):
        build(tmp_path / "bad.db", [F(f"f{i}") for i in range(50)], limits=limits)
    # Replacing one path over and over counts too: the work is bounded.
    with pytest.raises(BadLayer, match="more than 50 entries"):
        build(tmp_path / "bad.db", [F("x")] * 60, limits=limits)


def test_default_depth_matches_the_applier(tmp_path: Path) -> None:
    build(tmp_path / "ok.db", [F("/".join(["d"] * 512))])
    with pytest.raises(BadLayer, match="deeper"):
        build(tmp_path / "bad.db", [F("/".join(["d"] * 513))])


@pytest.mark.parametrize(
    ("entry", "data"),
    [
        (F("f", 1 << 63), 0),
        (F("f", -1), 0),
        (F("f", INT64), 1),  # the end does not fit an int64
        (F("f", 10), -2),
        (F("f", 10, uid=1 << 32), 0),
        (F("f", 10, gid=-1), 0),
        (Entry("c", Kind.CHAR, devmajor=1 << 40), -1),
        (Entry("s", Kind.SYMLINK, link="x" * 4096), -1),
        (F("f", 10, sparse=((0, 5),)), 0),
    ],
)
def test_out_of_range_fields(tmp_path: Path, entry: Entry, data: int) -> None:
    with pytest.raises(BadLayer):
        build(tmp_path / "i.db", [(entry, data)])


def test_extreme_values_that_fit(tmp_path: Path) -> None:
    idx = build(
        tmp_path / "i.db",
        [
            (F("big", INT64), 0),
            (F("late", 1, mtime_ns=1 << 80), 0),  # clamped, not refused
            (F("early", 1, mtime_ns=-(1 << 80)), 0),
            (F("ids", 1, uid=(1 << 32) - 2, gid=(1 << 32) - 2), 0),
        ],
    )
    big, late, early = (idx.lookup(ROOT, n) for n in ("big", "late", "early"))
    assert big is not None and big.size == INT64
    assert late is not None and late.mtime_ns == INT64
    assert early is not None and early.mtime_ns == -INT64


@pytest.mark.parametrize(
    "chunks",
    [
        [Chunk(0, 5, 0, 0, SHA), Chunk(6, 5, 0, 0, SHA)],  # gap
        [Chunk(0, 6, 0, 0, SHA), Chunk(5, 5, 0, 0, SHA)],  # overlap
        [Chunk(1, 10, 0, 0, SHA)],  # does not start at 0
        [Chunk(0, 5, 0, 0, SHA)],  # short of the size
        [Chunk(0, 20, 0, 0, SHA)],  # past the size
        [Chunk(0, 0, 0, 0, SHA), Chunk(0, 10, 0, 0, SHA)],  # empty chunk
        [Chunk(0, 10, 1000, 0, SHA)],  # past the blob
        [Chunk(0, 10, -1, 0, SHA)],
        [Chunk(0, 10, 0, -1, SHA)],
        [Chunk(0, 10, 0, 1 << 63, SHA)],
        [Chunk(0, 10, 900, 0, SHA, 200)],  # its member runs past the blob
        [Chunk(0, 10, 0, 0, "sha256:zz")],
        [Chunk(0, 10, 0, 0, "md5:" + "0" * 32)],
    ],
)
def test_bad_chunk_maps(tmp_path: Path, chunks: list[Chunk]) -> None:
    with pytest.raises(BadLayer, match="chunk"):
        build(tmp_path / "i.db", [(F("f", 10), chunks)], blob_size=1000, source="estargz")


def test_chunks_only_for_chunked_files(tmp_path: Path) -> None:
    with pytest.raises(BadLayer, match="chunks for"):
        build(tmp_path / "i.db", [(D("d"), [Chunk(0, 1, 0, 0, SHA)])], source="estargz")


# -- names ----------------------------------------------------------------------


def test_undecodable_and_control_names_round_trip(tmp_path: Path) -> None:
    raw = b"caf\xe9\x1b[31m\n"
    name = raw.decode("utf-8", "surrogateescape")
    idx = build(tmp_path / "i.db", [F(name), Entry("l", Kind.SYMLINK, link=name)])
    node = idx.lookup(ROOT, raw)
    assert node is not None and node.name == name and idx.lookup(ROOT, name) == node
    link = idx.lookup(ROOT, "l")
    assert link is not None and link.link.encode("utf-8", "surrogateescape") == raw


def test_messages_are_printable(tmp_path: Path) -> None:
    with pytest.raises(BadLayer) as e:
        build(tmp_path / "i.db", [L("\x1b]0;pwned\x07", "\x1b[2J")])
    assert "\x1b" not in str(e.value) and "\x07" not in str(e.value)


def test_wide_and_deep_replacements_stay_bounded(tmp_path: Path) -> None:
    # A directory 500 deep, replaced by a file: the drop walks it in SQL.
    deep = "/".join(["d"] * 500)
    idx = build(tmp_path / "i.db", [F(deep), *[F(f"d/w{i}") for i in range(2000)], F("d")])
    assert sorted(entries_of(idx)) == ["d"]


# -- hostile and damaged streams, through the tar and gzip sources ---------------------


def _desc(data: bytes, media_type: str) -> Descriptor:
    return Descriptor(media_type, Digest("sha256:" + hashlib.sha256(data).hexdigest()), len(data))


def _index(tmp_path: Path, raw: bytes, codec: str) -> None:
    """Index *raw* (a tar) stored with *codec*; the output dir must stay empty on failure."""
    blob = gzip.compress(raw) if codec == "gzip" else raw
    path = tmp_path / "blob"
    path.write_bytes(blob)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    try:
        if codec == "gzip":
            index_gzip(path, _desc(blob, TGZ), out / "index.db")
        else:
            index_tar(path, _desc(blob, TAR), out / "index.db")
    finally:
        assert list(out.iterdir()) == [] or (out / "index.db").exists()


@pytest.mark.parametrize("codec", ["tar", "gzip"])
@pytest.mark.parametrize(
    ("entries", "error"),
    [
        ([tb.F("./", b"x")], "root"),
        ([tb.D("a", mode=0o755), tb.H("x", "../../etc/shadow")], "not in this layer"),
        ([tb.L("lib", "/usr/lib"), tb.F("lib/libc.so", b"x")], "is a symlink"),
        ([tb.F("f", b"x"), tb.F("f/g", b"y")], "is a file"),
        ([tb.D("d", mode=0o755), tb.F("d/x", b"1"), tb.F("d", b"2"), tb.H("h", "d/x")], "hardlink"),
    ],
)
def test_hostile_tars_refuse_the_layer(
    tmp_path: Path, codec: str, entries: list[tb.Entry], error: str
) -> None:
    raw = tb.tar(*entries)
    with pytest.raises(BadLayer, match=error):
        _index(tmp_path, raw, codec)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("codec", ["tar", "gzip"])
def test_dotdot_paths_stay_in_the_layer(tmp_path: Path, codec: str) -> None:
    raw = tb.tar(tb.F("../../etc/passwd", b"x"), tb.F("/abs/../y", b"y"))
    _index(tmp_path, raw, codec)
    idx = LayerIndex.open(tmp_path / "out" / "index.db")
    assert sorted(entries_of(idx)) == ["etc", "etc/passwd", "y"]


def test_truncated_tar_keeps_nothing(tmp_path: Path) -> None:
    raw = tb.tar(tb.F("a", b"x" * 5000), tb.F("b", b"y" * 5000))[:3000]
    with pytest.raises((InvalidArgument, DataLoss)):
        _index(tmp_path, raw, "tar")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9, -8, -5, -1])  # -8..-5: CRC, -4..-1: size
def test_damaged_gzip_keeps_nothing(tmp_path: Path, where: float) -> None:
    raw = tb.tar(*[tb.F(f"f{i}", random.Random(i).randbytes(3000)) for i in range(20)])
    blob = bytearray(gzip.compress(raw))
    at = int(len(blob) * where) if where > 0 else len(blob) + int(where)
    blob[at] ^= 0x55
    path = tmp_path / "blob"
    path.write_bytes(bytes(blob))
    out = tmp_path / "out"
    out.mkdir()
    # The digest is of the damaged bytes: only the inflate can notice.
    with pytest.raises((InvalidArgument, DataLoss, BadLayer)):
        index_gzip(path, _desc(bytes(blob), TGZ), out / "index.db")
    assert list(out.iterdir()) == []


def test_gzip_bomb_indexes_in_bounded_memory(tmp_path: Path) -> None:
    # 256 MiB of zeros in 0.25 MB: the index build streams it. (rapidgzip,
    # which decodes 4 MiB of input at a time whole, grew by gigabytes here.)
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [z.compress(tb.tar(tb.F("f", b"x")))]
    zeros = bytes(1 << 20)
    parts += [z.compress(zeros) for _ in range(256)]
    blob = b"".join([*parts, z.flush()])
    path = tmp_path / "blob"
    path.write_bytes(blob)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    index = index_gzip(path, _desc(blob, TGZ), tmp_path / "index.db")
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert sorted(entries_of(index)) == ["f"]
    assert grew_kib < 64 << 10, f"peak RSS grew by {grew_kib} KiB"


@pytest.mark.parametrize("data", [b"", b"not gzip" * 100, gzip.compress(b"not a tar" * 100)])
def test_not_a_gzip_tar(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "blob"
    path.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidArgument):
        index_gzip(path, _desc(data, TGZ), out / "index.db")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "entry",
    [
        F("bad\ud800name"),  # a lone surrogate no bytes stand for
        Entry("l", Kind.SYMLINK, link="\udfff"),
        F("x", xattrs=(("user.\ud800", b"v"),)),
    ],
)
def test_unstorable_text_refuses_the_layer(tmp_path: Path, entry: Entry) -> None:
    with pytest.raises(BadLayer):
        build(tmp_path / "i.db", [entry])


def test_xattr_names_keep_their_bytes(tmp_path: Path) -> None:
    name = b"user.caf\xe9".decode("utf-8", "surrogateescape")
    idx = build(tmp_path / "i.db", [F("x", xattrs=((name, b"\xff"),))])
    node = idx.lookup(ROOT, "x")
    assert node is not None and idx.xattrs(node.ino) == {name: b"\xff"}


#: Wall-time bound for the thrashing layer below: it takes about a second;
#: resolving parents by walking 500 levels on every entry took over 30.
THRASH_BOUND = 20.0


def test_deep_paths_and_drops_cost_no_walk_per_entry(tmp_path: Path) -> None:
    # 40 paths 500 deep (more directories than any cache holds), entries
    # cycling through them, and directories replaced by files in between
    # (which invalidates what is cached): each entry must still cost a
    # lookup or two, not a walk from the root.
    deep = ["/".join([f"p{k}"] + ["d"] * 499) for k in range(40)]
    items: list[Item] = []
    for i in range(10_000):
        items.append(F(f"{deep[i % 40]}/f{i}"))
        if i % 3 == 0:
            items += [F(f"q{i}/x"), F(f"q{i}")]
    t = time.monotonic()
    idx = build(tmp_path / "i.db", items)
    assert time.monotonic() - t < THRASH_BOUND
    assert idx.count == 1 + 40 * 500 + 10_000 + 3334


# -- the tree rules against a model of them, on random entry sequences ----------------


class Model:
    """The tree rules of `ckfs.layerindex.model` on a dict.

    path → [kind, inode, opaque, implied].
    """

    def __init__(self) -> None:
        self.tree: dict[str, list[object]] = {"": [Kind.DIR, 0, False, False]}
        self.inodes = 0

    def _new(self, path: str, kind: Kind, opaque: bool = False, implied: bool = False) -> None:
        self.inodes += 1
        self.tree[path] = [kind, self.inodes, opaque, implied]

    def _drop(self, path: str) -> None:
        for p in [p for p in self.tree if p == path or p.startswith(path + "/")]:
            del self.tree[p]

    def _dir(self, path: str) -> None:
        parts = path.split("/") if path else []
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            node = self.tree.get(sub)
            if node is None or node[0] == Kind.WHITEOUT:
                self._new(sub, Kind.DIR, opaque=node is not None, implied=True)
            elif node[0] != Kind.DIR:
                raise BadLayer(sub)

    def add(self, path: str, kind: Kind, link: str = "") -> None:
        if path == "":
            if kind == Kind.OPAQUE:
                self.tree[""][2] = True
            elif kind != Kind.DIR:
                raise BadLayer("root")
            return
        if kind == Kind.OPAQUE:
            self._dir(path)
            self.tree[path][2] = True
            return
        self._dir(path.rpartition("/")[0])
        old = self.tree.get(path)
        if kind == Kind.WHITEOUT:
            if old is None:
                self._new(path, kind)
            return
        if kind == Kind.HARDLINK:
            target = self.tree.get(link)
            if target is None or target[0] in (Kind.DIR, Kind.WHITEOUT):
                raise BadLayer(link)
            if old is not None and old[1] == target[1]:
                return
            if old is not None:
                self._drop(path)
                if link not in self.tree:
                    raise BadLayer(link)
            self.tree[path] = list(target)
            return
        if old is not None and old[0] == Kind.DIR and kind == Kind.DIR:
            old[3] = False  # an entry of its own now
            return
        if old is not None:
            self._drop(path)
        self._new(
            path, kind, opaque=kind == Kind.DIR and old is not None and old[0] == Kind.WHITEOUT
        )


_NAMES = st.sampled_from(["a", "b", "c"])
_PATHS = st.lists(_NAMES, max_size=3).map("/".join)
_KINDS = st.sampled_from(
    [Kind.FILE, Kind.DIR, Kind.SYMLINK, Kind.HARDLINK, Kind.FIFO, Kind.WHITEOUT, Kind.OPAQUE]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_PATHS, _KINDS, _PATHS), max_size=12))
def test_tree_rules_match_their_model(steps: list[tuple[str, Kind, str]]) -> None:
    model = Model()
    entries = []
    refused = False
    for path, kind, link in steps:
        if kind == Kind.HARDLINK and not link:
            continue  # the entry rules refuse hardlinks to the root before us
        entries.append(Entry(path, kind, link=link if kind == Kind.HARDLINK else "x"))
        try:
            model.add(path, kind, link)
        except BadLayer:
            refused = True
            break
    with tempfile.TemporaryDirectory() as d:
        if refused:
            with pytest.raises(BadLayer):
                build(Path(d) / "i.db", entries)
            return
        idx = build(Path(d) / "i.db", entries)
        got = {p: n for p, n in iter_nodes(idx)}
        assert set(got) == set(model.tree) - {""}
        inodes: dict[object, int] = {}
        for p, n in got.items():
            kind, inode, opaque, implied = model.tree[p]
            assert (n.kind, n.opaque, n.implied) == (kind, opaque, implied), p
            assert inodes.setdefault(inode, n.ino) == n.ino, p  # one inode, one ino
        assert len(set(inodes.values())) == len(inodes)  # and the other way round
        assert idx.root().opaque == model.tree[""][2]
