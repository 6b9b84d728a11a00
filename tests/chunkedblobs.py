"""eStargz-shaped and tar layers built from real gzip members and tar streams.

For the lazy data path's tests (`tests/test_layerreader.py` and the
registry ones in `integration/`): a blob in a file plus the index the real
`IndexWriter` makes of it, and the contents every file must read back as.
The eStargz shape is the upstream writer's: a gzip member holding a file's
tar header, then one member per chunk (`CHUNK` bytes), and a TOC member last.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ckfs import mediatypes as mt
from ckfs.archive.entry import Entry, Kind
from ckfs.descriptor import Descriptor
from ckfs.digest import from_bytes
from ckfs.layerindex.model import ROOT, Chunk, IndexWriter, LayerIndex, Node, Span

__all__ = [
    "CHUNK",
    "Layer",
    "build_estargz",
    "build_gzip",
    "build_tar",
    "content",
    "gzip_member",
    "hand_made",
    "tar_bytes",
]

CHUNK = 64 << 10


def content(n: int, seed: int) -> bytes:
    """*n* bytes that compress about as well as a binary: text and noise."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += rnd.randbytes(rnd.randrange(16, 200))
        out += b"the quick brown fox %d jumps\n" % rnd.randrange(1000) * rnd.randrange(1, 20)
    return bytes(out[:n])


def gzip_member(data: bytes, *, level: int = 6, name: bytes = b"") -> bytes:
    """One gzip member of *data*; *name* fills the header's FNAME field."""
    header = struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, 0x08 if name else 0, 0, 0, 255)
    if name:
        header += name + b"\0"
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    body = c.compress(data) + c.flush()
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


@dataclass
class Layer:
    """A built blob, its index and the expected file contents."""

    blob: Path
    index: LayerIndex
    files: dict[str, bytes]
    members: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def node(self, name: str) -> Node:
        node = self.index.lookup(ROOT, name)
        assert node is not None
        return node


def build_estargz(
    tmp: Path,
    files: dict[str, bytes],
    *,
    shared: dict[str, bytes] | None = None,
    sizes_known: bool = True,
    level: int = 6,
    name: bytes = b"",
) -> Layer:
    """An eStargz-shaped blob: a header member per file, one member per chunk,
    small *shared* files in one member (inner offsets), a trailing TOC member.
    """
    blob = bytearray()
    entries: list[tuple[Entry, list[Chunk]]] = []
    members: dict[str, list[tuple[int, int]]] = {}
    for path, data in files.items():
        blob += gzip_member(b"H" * 512)
        chunks = []
        for off in range(0, len(data), CHUNK):
            part = data[off : off + CHUNK]
            member = gzip_member(part, level=level, name=name)
            known = len(member) if sizes_known else -1
            chunks.append(Chunk(off, len(part), len(blob), 0, from_bytes(part), known))
            members.setdefault(path, []).append((len(blob), len(member)))
            blob += member
        entries.append((Entry(path, Kind.FILE, size=len(data)), chunks))
    if shared:
        start, payload = len(blob), b""
        for path, data in shared.items():
            chunk = Chunk(0, len(data), start, len(payload), from_bytes(data))
            entries.append((Entry(path, Kind.FILE, size=len(data)), [chunk]))
            payload += data + b"\0" * 7
        blob += gzip_member(payload)
    blob += gzip_member(b'{"version":1,"entries":[]}')
    blob_path = tmp / "blob"
    blob_path.write_bytes(blob)
    layer = from_bytes(bytes(blob))
    w = IndexWriter(tmp / "index.db", layer=layer, source="estargz", blob_size=len(blob))
    with w:
        for entry, chunks in entries:
            w.add(entry, chunks=chunks)
        index = w.commit()
    return Layer(blob_path, index, {**files, **(shared or {})}, members)


def hand_made(tmp: Path, blob: bytes, files: dict[str, tuple[int, list[Chunk]]]) -> Layer:
    """An eStargz-shaped layer whose chunks the test writes itself: *files*
    maps a name to its size and chunks (which may lie about the blob)."""
    blob_path = tmp / "blob"
    blob_path.write_bytes(blob)
    w = IndexWriter(tmp / "index.db", layer=from_bytes(blob), source="estargz", blob_size=len(blob))
    with w:
        for name, (size, chunks) in files.items():
            w.add(Entry(name, Kind.FILE, size=size), chunks=chunks)
        index = w.commit()
    return Layer(blob_path, index, {})


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """A PAX tar stream of regular *files*, in order."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def build_tar(tmp: Path, files: dict[str, bytes], span: int = 1 << 20) -> Layer:
    """An uncompressed tar layer with its spans of *span* bytes."""
    blob = tar_bytes(files)
    blob_path = tmp / "blob"
    blob_path.write_bytes(blob)
    w = IndexWriter(tmp / "index.db", layer=from_bytes(blob), source="tar", blob_size=len(blob))
    with w, tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for m in tar:
            w.add(Entry(m.name, Kind.FILE, size=m.size), data=m.offset_data)
        for off in range(0, len(blob), span):
            part = blob[off : off + span]
            w.add_span(Span(off, len(part), off, len(part), hashlib.sha256(part).hexdigest()))
        index = w.commit()
    return Layer(blob_path, index, files)


def build_gzip(tmp: Path, files: dict[str, bytes]) -> Layer:
    """A plain gzip layer indexed by `ckfs.layerindex.gzindex` (checkpoints
    every `gzindex.SPACING` bytes of the tar stream)."""
    from ckfs.layerindex.gzindex import index_gzip

    blob = gzip.compress(tar_bytes(files), compresslevel=1, mtime=0)
    blob_path = tmp / "blob"
    blob_path.write_bytes(blob)
    desc = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(blob), len(blob))
    return Layer(blob_path, index_gzip(blob_path, desc, tmp / "index.db"), files)
