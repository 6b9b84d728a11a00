"""Hostile eStargz TOCs: each class the issue names gets a defined outcome.

Outcomes: the layer is refused whole (`BadLayer`, an `InvalidArgument`:
the caller falls back to the eager path, loudly) and nothing is left behind;
or the layer is indexed and reads of the one lying file fail (`DataLoss`,
EIO at the FUSE boundary) while its other files read right. Never wrong
bytes, never an exception outside `ckfs.errors`. The module's name puts
its tests under confinement (conftest.py), so they are synchronous and
drive trio themselves.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import os
import struct
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckfs.archive.entry import Kind
from ckfs.errors import CkfsError, DataLoss, InvalidArgument
from ckfs.layerindex.cache import ChunkCache
from ckfs.layerindex.estargz import (
    LEGACY_FOOTER_SIZE,
    TOC_DIGEST_ANNOTATION,
    NotEstargz,
    TocLimits,
    index_estargz,
)
from ckfs.layerindex.model import ROOT, BadLayer, LayerIndex, Node, iter_nodes
from ckfs.layerindex.reader import LayerReader
from tests import hostile_toc as h
from tests.hostile_toc import CHUNK, D, F, H, Item, L, Layer, Record, estargz


def index(layer: Layer, where: Path, **kw: Any) -> LayerIndex:
    return trio.run(partial(index_estargz, layer.read_range, layer.desc, where / "index.db", **kw))


def refused(layer: Layer, where: Path, match: str, cls: type[CkfsError] = BadLayer) -> str:
    with pytest.raises(cls, match=match) as e:
        index(layer, where)
    assert "\n" not in str(e.value)
    assert list(where.iterdir()) == [], "a refused layer left files behind"
    return str(e.value)


def tree(idx: LayerIndex) -> dict[str, Node]:
    return dict(iter_nodes(idx))


def node(idx: LayerIndex, path: str) -> Node:
    ino = ROOT
    found = idx.root()
    for name in path.split("/"):
        found_or_none = idx.lookup(ino, name)
        assert found_or_none is not None, path
        found, ino = found_or_none, found_or_none.ino
    return found


def read(idx: LayerIndex, layer: Layer, cache: Path, path: str) -> bytes:
    reader = LayerReader(idx, layer, ChunkCache(cache))
    n = node(idx, path)
    return trio.run(reader.read, n, 0, n.size + 1)


@pytest.fixture
def where(tmp_path: Path) -> Path:
    (tmp_path / "index").mkdir()
    return tmp_path / "index"


# -- honest layers ------------------------------------------------------------

CAP = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # v2, effective, cap_net_bind_service


def honest_items() -> list[Item]:
    big = os.urandom(3 * CHUNK + 123)
    return [
        D("etc", uid=1, gid=2, modtime="2020-01-02T03:04:05Z"),
        F("etc/big", big),
        F("etc/small", b"hello\n", mode=0o4755),
        F("etc/empty"),
        H("etc/again", "etc/small"),
        L("link", "etc/small"),
        Item({"name": "dev/null", "type": "char", "mode": 0o666, "devMajor": 1, "devMinor": 3}),
        Item({"name": "dev/sda", "type": "block", "mode": 0o660, "devMajor": 8}),
        Item({"name": "fifo", "type": "fifo", "mode": 0o600}),
        F(
            "bin/ping",
            b"\x7fELF",
            xattrs={
                "security.capability": base64.b64encode(CAP).decode(),
                "user.note": base64.b64encode(b"\xff\x00").decode(),
                "trusted.overlay.opaque": base64.b64encode(b"y").decode(),
            },
        ),
        F("gone/.wh.file"),
        F("opq/.wh..wh..opq"),
    ]


def test_honest_layer_indexes_every_entry_and_reads_back(where: Path, tmp_path: Path) -> None:
    items = honest_items()
    layer = estargz(items)
    idx = index(layer, where)
    nodes = tree(idx)
    assert sorted(nodes) == sorted(
        [
            "etc", "etc/big", "etc/small", "etc/empty", "etc/again", "link", "dev", "dev/null",
            "dev/sda", "fifo", "bin", "bin/ping", "gone", "gone/file", "opq",
        ]
    )  # fmt: skip
    assert (
        idx.source == "estargz"
        and idx.meta("toc_digest") == layer.desc.annotations[TOC_DIGEST_ANNOTATION]
    )
    assert (nodes["etc"].uid, nodes["etc"].gid) == (1, 2)
    assert nodes["etc"].mtime_ns == 1577934245 * 10**9
    assert nodes["etc/small"].mode == 0o4755
    assert nodes["etc/again"].ino == nodes["etc/small"].ino and nodes["etc/small"].nlink == 2
    assert nodes["link"].kind == Kind.SYMLINK and nodes["link"].link == "etc/small"
    assert nodes["dev/null"].rdev == os.makedev(1, 3) and nodes["dev/sda"].kind == Kind.BLOCK
    assert nodes["fifo"].kind == Kind.FIFO
    assert idx.xattrs(nodes["bin/ping"].ino) == {
        "security.capability": CAP,
        "user.note": b"\xff\x00",
    }
    assert nodes["gone/file"].kind == Kind.WHITEOUT and nodes["opq"].opaque
    assert len(idx.chunks(nodes["etc/big"].ino)) == 4
    for item in items:
        if item.record["type"] == "reg" and "/.wh." not in item.record["name"]:
            assert read(idx, layer, tmp_path / "cache", item.record["name"]) == item.data


def test_landmarks_and_the_toc_entry_are_hidden(where: Path) -> None:
    layer = estargz([F(".prefetch.landmark", b"\x0f"), F("stargz.index.json", b"{}"), F("a")])
    assert sorted(tree(index(layer, where))) == ["a"]


def test_legacy_footer(where: Path) -> None:
    layer = estargz(h.files(), foot=partial(h.footer, legacy=True))
    assert layer.blob[-LEGACY_FOOTER_SIZE:].startswith(b"\x1f\x8b\x08\x04")
    assert "d/f2" in tree(index(layer, where))


# -- trust ----------------------------------------------------------------------


def test_no_annotation_is_not_trusted_lazily(where: Path) -> None:
    refused(estargz(h.files(), annotate=False), where, "no containerd.io/snapshot", NotEstargz)


def test_toc_not_matching_its_annotation_is_data_loss(where: Path) -> None:
    wrong = "sha256:" + "0" * 64
    refused(estargz(h.files(), toc_digest=wrong), where, "does not match", DataLoss)


def test_malformed_annotation(where: Path) -> None:
    refused(estargz(h.files(), toc_digest="md5:xyz"), where, "toc.digest")


# -- paths ------------------------------------------------------------------------


def test_dotdot_and_absolute_paths_stay_inside_the_layer(where: Path, tmp_path: Path) -> None:
    """Cleaned as eager apply cleans them (as if chrooted): the same tree."""
    assert sorted(tree(index(h.dotdot(), where))) == ["b", "etc", "etc/evil"]
    (tmp_path / "two").mkdir()
    assert sorted(tree(index(h.absolute(), tmp_path / "two"))) == ["etc", "etc/shadow"]


def test_path_through_a_symlinked_directory_is_refused(where: Path) -> None:
    refused(h.through_symlink(), where, "is a symlink")


@pytest.mark.parametrize(
    ("target", "match"),
    [("../../etc/passwd", "etc/passwd"), ("d", "to dir"), ("", "hardlink to the root")],
)
def test_hardlink_out_of_the_layer_is_refused(where: Path, target: str, match: str) -> None:
    layer = estargz([D("d"), F("f", b"x"), H("h", target)])
    refused(layer, where, match)


def test_deep_path_is_refused(where: Path) -> None:
    refused(estargz([F("a/" * 600 + "f", b"x")]), where, "deep")


def test_name_with_nul_is_refused(where: Path) -> None:
    refused(estargz([F("a\0b", b"x")]), where, "null")


@pytest.mark.parametrize(
    ("first", "second", "kind"),
    [
        (F("x", b"file"), D("x"), Kind.DIR),
        (L("x", "y"), F("x", b"file"), Kind.FILE),
        (Item({"name": "x", "type": "fifo"}), L("x", "/etc"), Kind.SYMLINK),
    ],
)
def test_path_twice_the_later_entry_wins(
    where: Path, first: Item, second: Item, kind: Kind
) -> None:
    nodes = tree(index(h.path_twice(first, second), where))
    assert nodes["x"].kind == kind


def test_directory_replaced_by_a_file_drops_its_subtree(where: Path, tmp_path: Path) -> None:
    layer = estargz([D("x"), F("x/inner", b"in"), F("x", b"now a file")])
    idx = index(layer, where)
    assert sorted(tree(idx)) == ["x"]
    assert read(idx, layer, tmp_path / "cache", "x") == b"now a file"


def test_root_turned_into_a_file_is_refused(where: Path) -> None:
    refused(estargz([F("./", b"x")]), where, "root")


# -- chunks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (h.chunk_past_blob, "not before the TOC"),
        (h.chunk_negative, "offset is not a number"),
        (h.chunks_overlap, "overlaps"),
        (h.chunks_gap, "gap"),
        (h.size_near_2_63, "over the limit"),
        (h.chunk_size_near_2_63, "bytes from a"),
        (partial(h.inner_offset_outside, 1 << 40), "bytes from a"),
    ],
)
def test_lying_chunks_refuse_the_layer(where: Path, make: Any, match: str) -> None:
    refused(make(), where, match)


def test_chunks_sharing_a_member_must_not_overlap(where: Path) -> None:
    def tamper(entries: list[Record]) -> None:
        chunks = [e for e in entries if e["name"] == "d/f1" and ("offset" in e)]
        chunks[1].update(offset=chunks[0]["offset"], innerOffset=10)

    refused(estargz(h.files(), tamper=tamper), where, "overlaps")


def test_chunk_past_the_blob_end_is_refused(where: Path) -> None:
    layer = estargz(h.files())
    layer = estargz(h.files(), tamper=h.chunk_field("d/f0", 0, offset=len(layer.blob) + 10))
    refused(layer, where, "not before the TOC")


def test_chunk_naming_another_file_is_refused(where: Path) -> None:
    refused(estargz(h.files(), tamper=h.chunk_field("d/f1", 1, name="d/f0")), where, "another")


def test_small_files_sharing_a_member_read_back(where: Path, tmp_path: Path) -> None:
    """Newer upstream writers pack small files into one member (innerOffset)."""
    items = [F("big", os.urandom(2 * CHUNK + 5))] + [
        F(f"s{i}", bytes([i]) * (100 + i)) for i in range(1, 6)
    ]
    layer = estargz(items, pack=1024)
    assert len({e.get("offset") for e in layer.entries if e["name"].startswith("s")}) == 1
    idx = index(layer, where)
    for item in items:
        assert read(idx, layer, tmp_path / "cache", item.record["name"]) == item.data


def test_chunk_without_a_file_is_refused(where: Path) -> None:
    def tamper(entries: list[Record]) -> list[Record]:
        return [{"name": "x", "type": "chunk", "offset": 10, "chunkDigest": "sha256:" + "0" * 64}]

    refused(estargz([], landmark=False, tamper=tamper), where, "follows no regular file")


def test_chunk_without_a_digest_is_refused(where: Path) -> None:
    refused(
        estargz(h.files(), tamper=h.chunk_field("d/f1", 2, chunkDigest="")),
        where,
        "no digest",
    )


def test_single_chunk_file_may_rely_on_its_file_digest(where: Path, tmp_path: Path) -> None:
    layer = estargz([F("a", b"data")], tamper=h.chunk_field("a", 0, chunkDigest=""))
    idx = index(layer, where)
    assert read(idx, layer, tmp_path / "cache", "a") == b"data"


def test_inner_offset_past_its_member_fails_that_files_reads_only(
    where: Path, tmp_path: Path
) -> None:
    layer = h.inner_offset_outside(30_000)  # its member inflates to some 4 KiB
    idx = index(layer, where)
    with pytest.raises(DataLoss):
        read(idx, layer, tmp_path / "cache", "d/f1")
    for other in ("d/f0", "d/f2"):
        assert read(idx, layer, tmp_path / "cache", other) == bytes([int(other[-1]) + 1]) * (
            3 * CHUNK + 100
        )


def test_wrong_chunk_digest_fails_that_files_reads_only(where: Path, tmp_path: Path) -> None:
    layer = estargz(h.files(), tamper=h.chunk_field("d/f1", 2, chunkDigest="sha256:" + "1" * 64))
    idx = index(layer, where)
    with pytest.raises(DataLoss):
        read(idx, layer, tmp_path / "cache", "d/f1")
    assert read(idx, layer, tmp_path / "cache", "d/f2") == b"\x03" * (3 * CHUNK + 100)


# -- the TOC itself ----------------------------------------------------------------


def test_toc_inflating_past_the_limit_is_refused(where: Path) -> None:
    layer = h.inflates_huge(16 << 20)
    with pytest.raises(BadLayer, match="inflates past"):
        index(layer, where, limits=TocLimits(inflated=4 << 20))
    assert list(where.iterdir()) == []


def test_toc_claiming_a_huge_size_is_refused(where: Path) -> None:
    member = h.gzip_member(_tar_header(h.TOC_NAME, 1 << 40) + b"{}")
    refused(estargz([], toc=member), where, "over the limit")


def _tar_header(name: str, size: int) -> bytes:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.GNU_FORMAT)


def test_too_many_records_are_refused(where: Path) -> None:
    layer = h.many_entries(500)
    with pytest.raises(BadLayer, match="more than 100 records"):
        index(layer, where, limits=TocLimits(records=100))


def test_too_many_entries_for_the_tree_are_refused(where: Path) -> None:
    from ckfs.layerindex.model import Limits

    with pytest.raises(BadLayer, match="entries"):
        index(h.many_entries(500), where, tree_limits=Limits(entries=100))


def test_deeply_nested_toc_is_refused(where: Path) -> None:
    refused(h.nested_deep(), where, "nested too deep|over")


def test_record_over_the_limit_is_refused(where: Path) -> None:
    layer = estargz([F("a", b"x", junk="j" * (2 << 20))])
    refused(layer, where, "record over")


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (b"not json", "TOC JSON"),
        (b'{"version": 2, "entries": []}', "version"),
        (b'{"version": true, "entries": []}', "version"),
        (b'{"entries": []}', "no version"),
        (b'{"version": 1, "entries": [], "entries": []}', "new key"),
        (b'{"version": 1, "entries": [1]}', "not an object"),
        (b'{"version": 1, "entries": [{"name": "a", "type": "socket"}]}', "unknown type"),
        (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": NaN}]}', "NaN"),
        (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": 1.5}]}', "size"),
        (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "uid": -1}]}', "uid"),
        (b'{"version": 1, "entries": [{"name": 7, "type": "dir"}]}', "name"),
        (b'{"version": 1, "entries": [{"name": "\xff", "type": "dir"}]}', "UTF-8"),
        (b'{"version": 1, "entries": [{"name": "a\\ud800", "type": "dir"}]}', "surrogate"),
        (b'{"version": 1, "entries": [' + b"9" * 5000 + b"]}", "number too long"),
        (b'{"version": 1, "entries": []} {}', "after the document"),
        (b'{"version": 1, "entries": [{"name": "a", "type": "dir"}', "expected"),
        (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "modtime": "x"}]}', "modtime"),
        (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "xattrs": []}]}', "xattrs"),
        (
            b'{"version": 1, "entries": [{"name": "a", "type": "dir", '
            b'"xattrs": {"user.x": "***"}}]}',
            "base64",
        ),
        (
            b'{"version": 1, "entries": [{"name": "a", "type": "reg", '
            b'"xattrs": {"security.capability": "AAAA"}}]}',
            "capability",
        ),
        (
            b'{"version": 1, "entries": [{"name": "a", "type": "char", "devMajor": 99999999}]}',
            "device number",
        ),
    ],
)
def test_malformed_toc_json_is_refused(where: Path, doc: bytes, match: str) -> None:
    refused(estargz([], landmark=False, toc_json=doc), where, match)


# -- footers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (h.footer_into_member, "no tar header|not stargz"),
        (h.footer_into_data, "no gzip member"),
        (h.footer_truncated, "no eStargz footer"),
        (lambda: estargz(h.files(), foot=lambda _: h.footer(1 << 50)), "past the blob"),
        (lambda: estargz(h.files(), foot=lambda _: b"\0" * 51), "no eStargz footer"),
        (
            lambda: estargz(h.files(), foot=lambda off: h.footer(off)[:-8] + b"\1" * 8),
            "no eStargz footer",
        ),
    ],
)
def test_lying_footers_are_refused(where: Path, make: Any, match: str) -> None:
    refused(make(), where, match)


def test_blob_too_small_for_a_footer(where: Path) -> None:
    refused(h.cut(estargz([]), 40), where, "too small")


def test_bytes_between_the_toc_and_the_footer_are_refused(where: Path) -> None:
    doc = json.dumps({"version": 1, "entries": []}).encode()
    layer = estargz([], toc_json=doc, toc=h.toc_member(doc) + b"junk")
    refused(layer, where, "between the TOC member and the footer")


def test_toc_member_truncated(where: Path) -> None:
    doc = json.dumps({"version": 1, "entries": []}).encode()
    layer = estargz([], toc_json=doc, toc=h.toc_member(doc)[:-30])
    refused(layer, where, "truncated|ends inside")


def test_toc_tar_entry_with_another_name(where: Path) -> None:
    doc = json.dumps({"version": 1, "entries": []}).encode()
    layer = estargz([], toc_json=doc, toc=h.toc_member(doc, name="other.json"))
    refused(layer, where, "not stargz.index.json")


def test_a_big_toc_is_fetched_in_pieces(where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckfs.layerindex.estargz as module

    monkeypatch.setattr(module, "_MAX_READ", 1000)
    monkeypatch.setattr(module, "_TAIL", 100)
    layer = h.many_entries(300)
    asked: list[int] = []

    async def read_range(offset: int, length: int) -> bytes:
        asked.append(length)
        return await layer.read_range(offset, length)

    toc_size = len(layer.blob) - 51 - layer.toc_offset
    trio.run(index_estargz, read_range, layer.desc, where / "index.db")
    # The tail (footer and the TOC's end) first, then the rest of the TOC.
    assert asked[0] == 100 < toc_size
    assert sum(asked) == toc_size + 51 and max(asked[1:]) == 1000


def test_a_small_toc_comes_with_the_footer(where: Path) -> None:
    layer = h.many_entries(3)
    asked: list[tuple[int, int]] = []

    async def read_range(offset: int, length: int) -> bytes:
        asked.append((offset, length))
        return await layer.read_range(offset, length)

    trio.run(index_estargz, read_range, layer.desc, where / "index.db")
    tail = min(len(layer.blob), 4096)
    assert asked == [(len(layer.blob) - tail, tail)]


# -- a million entries -------------------------------------------------------------


@pytest.mark.slow
def test_a_million_entries_index_in_seconds_within_memory(where: Path) -> None:
    """Streaming parse: the TOC's entries are never all in memory at once."""
    layer = h.many_entries(1_000_000)
    layer.entries.clear()
    base = _peak_reset()
    start = time.monotonic()
    idx = index(layer, where)
    took = time.monotonic() - start
    grew = (_status("VmHWM") - base) >> 20
    print(
        f"1,000,000-entry TOC ({len(layer.blob) >> 10} KiB blob) indexed in {took:.1f} s, "
        f"peak RSS {grew} MiB over the blob's"
    )
    assert idx.count == 1_000_000 + 1000 + 1
    assert took < 180 and grew < 200


def _status(field: str) -> int:
    """A /proc/self/status memory figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) << 10
    raise AssertionError(field)


def _peak_reset() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS, which is returned."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


# -- anything else ---------------------------------------------------------------

_FIELDS = st.sampled_from(
    ["name", "type", "size", "offset", "chunkOffset", "chunkSize", "innerOffset", "mode",
     "uid", "gid", "linkName", "devMajor", "devMinor", "chunkDigest", "digest", "modtime",
     "xattrs"]
)  # fmt: skip
_VALUES = st.one_of(
    st.integers(min_value=-(1 << 64), max_value=1 << 64),
    st.sampled_from([0, 1, CHUNK, (1 << 63) - 1, 1 << 63]),
    st.text(max_size=20),
    st.sampled_from(["reg", "chunk", "dir", "hardlink", "symlink", "../..", "/", ""]),
    st.none(),
    st.booleans(),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=st.lists(st.tuples(st.integers(0, 40), _FIELDS, _VALUES), min_size=1, max_size=4))
def test_any_edit_is_indexed_or_refused_cleanly(
    tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[int, str, Any]]
) -> None:
    def tamper(entries: list[Record]) -> None:
        for i, key, value in edits:
            entries[i % len(entries)][key] = value

    layer = estargz([*h.files(2, 2 * CHUNK + 1), L("s", "d")], tamper=tamper)
    where = tmp_path_factory.mktemp("idx")
    try:
        idx = index(layer, where)
    except InvalidArgument:
        assert list(where.iterdir()) == []
        return
    for path, n in iter_nodes(idx):
        assert path and ".." not in path.split("/")
        if n.kind == Kind.FILE and n.size:
            try:
                data = read(idx, layer, where / "cache", path)
            except DataLoss:
                continue
            assert hashlib.sha256(data).hexdigest() in _honest_digests()


def _honest_digests() -> set[str]:
    """The contents the writer put in the blob: the files' and the landmark's."""
    files = [bytes([i + 1]) * (2 * CHUNK + 1) for i in range(2)]
    return {hashlib.sha256(data).hexdigest() for data in [*files, b"\x0f"]}
