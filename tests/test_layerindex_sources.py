"""Layer indexes from uncompressed tar and plain gzip layers.

Real tars written by `tarfile` (tests/tarbuild.py); every file's bytes are
read back through the index (the tar's data offsets, the gzip inflater) and
compared with what was written. Damaged and hostile streams are in
test_hostile_layerindex.py.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from ckfs.archive.entry import Kind
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import DataLoss, InvalidArgument
from ckfs.layerindex import gzindex
from ckfs.layerindex.gzindex import SPACING, index_gzip, open_inflater
from ckfs.layerindex.model import ROOT, IndexWriter, LayerIndex, iter_nodes
from ckfs.layerindex.store import GZIDX_NAME
from ckfs.layerindex.tarindex import build_tar_index, index_tar, index_tar_stream
from tests import tarbuild as tb

TAR = "application/vnd.oci.image.layer.v1.tar"
TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"

CONTENT = {
    "etc/os-release": b"ID=test\n",
    "bin/busybox": bytes(range(256)) * 40,
    "empty": b"",
    "a/b/c/deep.txt": b"deep" * 1000,
}


def layer_tar() -> bytes:
    return tb.tar(
        tb.D("etc", mode=0o755),
        *[tb.F(p, data, mode=0o644) for p, data in CONTENT.items()],
        tb.F("sbin/su", b"#!", mode=0o4755, uid=0, gid=0, xattrs={"security.selinux": b"x\0"}),
        tb.L("etc/link", "os-release"),
        tb.H("bin/sh", "bin/busybox"),
        tb.C("dev/null", 1, 3),
        tb.P("run/fifo"),
        tb.W("var/.wh.gone"),
        tb.W("opq/.wh..wh..opq"),
    )


def desc_of(data: bytes, media_type: str) -> Descriptor:
    return Descriptor(media_type, Digest("sha256:" + hashlib.sha256(data).hexdigest()), len(data))


def blob_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path


def want(path: str) -> bytes:
    """What the file at *path* of `layer_tar` holds."""
    return CONTENT.get({"bin/sh": "bin/busybox"}.get(path, path), b"#!")


def files(index: LayerIndex) -> dict[str, tuple[int, int]]:
    """path → (data offset, size) of every regular file."""
    return {p: (n.data, n.size) for p, n in iter_nodes(index) if n.kind == Kind.FILE}


def check_tree(index: LayerIndex) -> None:
    kinds = {p: n.kind for p, n in iter_nodes(index)}
    assert kinds["etc/link"] == Kind.SYMLINK and kinds["dev/null"] == Kind.CHAR
    assert kinds["run/fifo"] == Kind.FIFO and kinds["var/gone"] == Kind.WHITEOUT
    opq = index.lookup(ROOT, "opq")
    assert opq is not None and opq.opaque
    bb, sh = (index.lookup(index.lookup(ROOT, "bin").ino, n) for n in ("busybox", "sh"))  # type: ignore[union-attr]
    assert bb is not None and sh is not None and bb.ino == sh.ino and bb.nlink == 2
    su = index.lookup(index.lookup(ROOT, "sbin").ino, "su")  # type: ignore[union-attr]
    assert su is not None and su.mode == 0o4755
    assert index.xattrs(su.ino) == {"security.selinux": b"x\0"}


# -- uncompressed tar -------------------------------------------------------------


def test_tar_data_offsets_and_spans(tmp_path: Path) -> None:
    raw = layer_tar()
    desc = desc_of(raw, TAR)
    index = index_tar(blob_file(tmp_path, raw), desc, tmp_path / "index.db", meta={"ref": "r"})
    check_tree(index)
    for path, (data, size) in files(index).items():
        assert raw[data : data + size] == want(path), path
    assert index.meta("ref") == "r" and index.meta("diff_id") == desc.digest
    assert index.meta("media_type") == TAR and index.source == "tar"
    spans = index.spans()
    assert sum(s.comp_size for s in spans) == len(raw)
    for s in spans:
        assert s.comp_offset == s.uncomp_offset and s.comp_size == s.uncomp_size
        chunk = raw[s.comp_offset : s.comp_offset + s.comp_size]
        assert hashlib.sha256(chunk).hexdigest() == s.sha256


def test_tar_spans_split_at_their_size(tmp_path: Path) -> None:
    raw = layer_tar()
    desc = desc_of(raw, TAR)
    with (
        IndexWriter(tmp_path / "i.db", layer=desc.digest, source="tar", blob_size=desc.size) as w,
        open(blob_file(tmp_path, raw), "rb") as f,
    ):
        index = build_tar_index(f, w, span=1000)
    spans = index.spans()
    assert len(spans) == -(-len(raw) // 1000)
    assert all(s.uncomp_size == 1000 for s in spans[:-1])
    assert index.span_for(len(raw) - 1) == spans[-1] and index.span_for(len(raw)) is None


@pytest.mark.parametrize("damage", ["digest", "size"])
def test_tar_mismatch_keeps_nothing(tmp_path: Path, damage: str) -> None:
    raw = layer_tar()
    desc = desc_of(raw, TAR)
    if damage == "digest":
        desc = Descriptor(TAR, Digest("sha256:" + "0" * 64), len(raw))
    else:
        desc = Descriptor(TAR, desc.digest, len(raw) + 1)
    blob = blob_file(tmp_path, raw)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataLoss):
        index_tar(blob, desc, out / "index.db")
    assert list(out.iterdir()) == []


async def test_tar_from_an_async_stream(tmp_path: Path) -> None:
    raw = layer_tar()
    desc = desc_of(raw, TAR)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 777):
            yield raw[i : i + 777]

    index = await index_tar_stream(chunks(), desc, tmp_path / "index.db")
    check_tree(index)
    local = index_tar(blob_file(tmp_path, raw), desc, tmp_path / "local.db")
    assert files(index) == files(local) and index.spans() == local.spans()


async def test_tar_stream_that_breaks_off_keeps_nothing(tmp_path: Path) -> None:
    raw = layer_tar()
    desc = desc_of(raw, TAR)

    async def chunks() -> AsyncIterator[bytes]:
        yield raw[:2048]
        raise OSError("connection reset")

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError, match="connection reset"):
        await index_tar_stream(chunks(), desc, out / "index.db")
    assert list(out.iterdir()) == []


# -- gzip ---------------------------------------------------------------------------


def test_gzip_index_reads_every_file(tmp_path: Path) -> None:
    raw = layer_tar()
    blob = gzip.compress(raw)
    desc = desc_of(blob, TGZ)
    diff_id = Digest("sha256:" + hashlib.sha256(raw).hexdigest())
    index = index_gzip(blob_file(tmp_path, blob), desc, tmp_path / "index.db", diff_id=diff_id)
    check_tree(index)
    assert index.source == "gzip-index" and index.meta("diff_id") == diff_id
    assert (tmp_path / GZIDX_NAME).is_file()
    with open_inflater(index, tmp_path / "blob") as inflater:
        for path, (data, size) in files(index).items():
            assert inflater.read(data, size) == want(path), path
        assert inflater.read(len(raw) - 10, 100) == raw[-10:]
        assert inflater.read(len(raw), 10) == b""
        with pytest.raises(InvalidArgument):
            inflater.read(-1, 10)


def test_gzip_checkpoints_and_spans_over_a_big_layer(tmp_path: Path) -> None:
    rng = random.Random(10)
    big = rng.randbytes(SPACING * 3 + 12345)  # incompressible: checkpoints in the blob too
    raw = tb.tar(tb.F("small", b"x" * 100), tb.F("big", big), tb.F("tail", b"end"))
    blob = gzip.compress(raw, compresslevel=1)
    desc = desc_of(blob, TGZ)
    index = index_gzip(blob_file(tmp_path, blob), desc, tmp_path / "index.db")
    spans = index.spans()
    assert len(spans) >= 3
    assert spans[0].comp_offset == 0 and spans[0].uncomp_offset == 0
    assert sum(s.comp_size for s in spans) == len(blob)
    assert sum(s.uncomp_size for s in spans) == len(raw)
    for s in spans:
        chunk = blob[s.comp_offset : s.comp_offset + s.comp_size]
        assert hashlib.sha256(chunk).hexdigest() == s.sha256
    node = index.lookup(ROOT, "big")
    assert node is not None
    with open_inflater(index, tmp_path / "blob") as inflater:
        for _ in range(50):
            off = rng.randrange(len(big) - 4096)
            assert inflater.read(node.data + off, 4096) == big[off : off + 4096]
        tail = index.lookup(ROOT, "tail")
        assert tail is not None and inflater.read(tail.data, 3) == b"end"


def test_gzip_inflater_refuses_changed_checkpoints(tmp_path: Path) -> None:
    raw = layer_tar()
    blob = gzip.compress(raw)
    index = index_gzip(blob_file(tmp_path, blob), desc_of(blob, TGZ), tmp_path / "index.db")
    gzidx = tmp_path / GZIDX_NAME
    data = bytearray(gzidx.read_bytes())
    data[-1] ^= 1
    gzidx.write_bytes(bytes(data))
    with pytest.raises(DataLoss, match="do not match"):
        open_inflater(index, tmp_path / "blob")
    os.unlink(gzidx)
    with pytest.raises(DataLoss, match="missing"):
        open_inflater(index, tmp_path / "blob")
    tar_index = index_tar(blob_file(tmp_path, raw), desc_of(raw, TAR), tmp_path / "tar.db")
    with pytest.raises(InvalidArgument):
        open_inflater(tar_index, tmp_path / "blob")


@pytest.mark.parametrize("damage", ["digest", "diff_id", "size"])
def test_gzip_mismatch_keeps_nothing(tmp_path: Path, damage: str) -> None:
    raw = layer_tar()
    blob = gzip.compress(raw)
    desc = desc_of(blob, TGZ)
    diff_id = None
    if damage == "digest":
        desc = Descriptor(TGZ, Digest("sha256:" + "0" * 64), len(blob))
    elif damage == "size":
        desc = Descriptor(TGZ, desc.digest, len(blob) - 1)
    else:
        diff_id = Digest("sha256:" + "1" * 64)
    path = blob_file(tmp_path, blob)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataLoss):
        index_gzip(path, desc, out / "index.db", diff_id=diff_id)
    assert list(out.iterdir()) == []


def test_gzip_verified_blob_is_not_hashed_again(tmp_path: Path) -> None:
    # The content store's blobs were checked when committed; their size still is.
    raw = layer_tar()
    blob = gzip.compress(raw)
    path = blob_file(tmp_path, blob)
    other = Descriptor(TGZ, Digest("sha256:" + "0" * 64), len(blob))
    index = index_gzip(path, other, tmp_path / "index.db", verified=True)
    assert index.layer == other.digest and sum(s.comp_size for s in index.spans()) == len(blob)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataLoss):
        index_gzip(path, Descriptor(TGZ, other.digest, len(blob) + 1), out / "i.db", verified=True)
    assert list(out.iterdir()) == []


def test_gzip_checkpoints_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Windows are held in memory: a big layer (or a bomb) gets wider spacing.
    monkeypatch.setattr(gzindex, "SPACING", 64 << 10)
    monkeypatch.setattr(gzindex, "MAX_CHECKPOINTS", 4)
    data = random.Random(3).randbytes(1 << 20)
    raw = tb.tar(tb.F("data", data))
    blob = gzip.compress(raw, compresslevel=1)
    index = index_gzip(blob_file(tmp_path, blob), desc_of(blob, TGZ), tmp_path / "index.db")
    assert index.meta("spacing") == str(-(-len(raw) // 4))
    assert 2 <= len(index.spans()) <= 5
    node = index.lookup(ROOT, "data")
    assert node is not None
    with open_inflater(index, tmp_path / "blob") as inflater:
        assert inflater.read(node.data, len(data)) == data


def _big_tar(seed: int) -> bytes:
    """A tar with a file over a few checkpoints (incompressible and text)."""
    big = random.Random(seed).randbytes(SPACING * 2) + b"text " * (SPACING // 4)
    return tb.tar(tb.F("small", b"x" * 100), tb.F("big", big), tb.F("tail", b"end"))


def _full_flush_prefix(raw: bytes) -> bytes:
    """A gzip stream of *raw*'s first half, cut after a whole deflate block (no
    trailer): a shorter, whole tar, which only the missing trailer gives away
    (rapidgzip reads it without a word)."""
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    half = len(raw) // 2 // 512 * 512
    return z.compress(raw[:half]) + z.flush(zlib.Z_FULL_FLUSH)


@pytest.mark.parametrize(
    ("name", "make", "whole"),
    [
        ("truncated at a block", _full_flush_prefix, False),
        ("truncated", lambda raw: gzip.compress(raw)[: -len(raw) // 10], False),
        ("trailing zeros", lambda raw: gzip.compress(raw) + b"\0" * 1000, True),
        ("trailing garbage", lambda raw: gzip.compress(raw) + b"garbage", False),
        ("two members", lambda raw: gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]), True),
    ],
)
def test_gzip_stream_endings(
    tmp_path: Path, name: str, make: Callable[[bytes], bytes], whole: bool
) -> None:
    # zlib's verdict on how a stream ends: what the eager path accepts.
    raw = _big_tar(13)
    blob = make(raw)
    path = blob_file(tmp_path, blob)
    out = tmp_path / "out"
    out.mkdir()
    if whole:
        index = index_gzip(path, desc_of(blob, TGZ), out / "index.db")
        assert index.lookup(ROOT, "tail") is not None
    else:
        with pytest.raises(InvalidArgument, match="gzip stream"):
            index_gzip(path, desc_of(blob, TGZ), out / "index.db")
        assert list(out.iterdir()) == [], name


async def test_tar_stream_cancelled_keeps_nothing(tmp_path: Path) -> None:
    raw = layer_tar()
    desc = desc_of(raw, TAR)

    async def stalls() -> AsyncIterator[bytes]:
        yield raw[:1024]
        await trio.sleep_forever()
        yield b""  # pragma: no cover

    out = tmp_path / "out"
    out.mkdir()
    with trio.fail_after(30):  # a hang fails here, not the whole run
        with trio.move_on_after(0.2) as scope:
            await index_tar_stream(stalls(), desc, out / "index.db")
    assert scope.cancelled_caught
    assert list(out.iterdir()) == []
