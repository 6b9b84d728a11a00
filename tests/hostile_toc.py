"""Write eStargz blobs in memory, honest or hostile, for the TOC reader's tests.

`estargz` lays a layer out as the upstream Go writer does (a tar in gzip
members, each file chunk starting a new member, the landmark first, then the
TOC member and the 51-byte footer) from `Item`s, and hands the TOC entries to
a ``tamper`` hook before they are written, so a test states exactly the lie
it tells: offsets past the blob, overlapping chunks, sizes near 2**63, a path
twice, a million entries. The raw TOC JSON, the TOC member and the footer
can be replaced whole too. The annotation digest is that of the JSON as
written (the image author signs their own lies); ``toc_digest`` overrides it.

Classes of hostile TOC the issue names, and the helper that writes each:
`dotdot` / `absolute` (paths), `through_symlink`, `hardlink_out`,
`chunk_past_blob`, `chunk_negative`, `chunks_overlap`, `chunks_gap`,
`size_near_2_63`, `inner_offset_outside`, `inflates_huge`, `many_entries`,
`nested_deep`, `footer_into_member`, `footer_truncated`, `path_twice`.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.layerindex.estargz import TOC_DIGEST_ANNOTATION, TOC_NAME

Record = dict[str, Any]
Tamper = Callable[[list[Record]], list[Record] | None]

#: Upstream's default chunk size is 4 MiB; tests use small ones so a few
#: kilobytes make several chunks.
CHUNK = 4096
LANDMARK = ".no.prefetch.landmark"


@dataclass
class Item:
    """One entry: its TOC fields (``name``, ``type`` and any others, written
    as given) and, for ``reg``, its content."""

    record: Record
    data: bytes = b""


def F(name: str, data: bytes = b"", **fields: Any) -> Item:
    return Item({"name": name, "type": "reg", "mode": 0o644, **fields}, data)


def D(name: str, **fields: Any) -> Item:
    return Item({"name": name, "type": "dir", "mode": 0o755, **fields})


def L(name: str, target: str, **fields: Any) -> Item:
    return Item({"name": name, "type": "symlink", "linkName": target, "mode": 0o777, **fields})


def H(name: str, target: str, **fields: Any) -> Item:
    return Item({"name": name, "type": "hardlink", "linkName": target, **fields})


@dataclass
class Layer:
    """A written blob and the descriptor a manifest would give it."""

    blob: bytes
    toc_offset: int
    entries: list[Record] = field(repr=False)
    desc: Descriptor

    @property
    def size(self) -> int:
        return len(self.blob)

    async def read_range(self, offset: int, length: int) -> bytes:
        """The `ckfs.layerindex.reader.BlobSource` side of a layer."""
        assert offset >= 0 and offset + length <= len(self.blob), (offset, length)
        return self.blob[offset : offset + length]


class _Members:
    """Bytes made of gzip members, one open at a time."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self._z: Any = None
        self.start = 0  # where the open member starts
        self.inner = 0  # bytes written into it

    def tell(self) -> int:
        """Close the open member; the offset the next one starts at."""
        self.close()
        return self.out.tell()

    def write(self, data: bytes) -> None:
        if self._z is None:
            self._z = zlib.compressobj(9, zlib.DEFLATED, 31)
            self.start, self.inner = self.out.tell(), 0
        self.out.write(self._z.compress(data))
        self.inner += len(data)

    def close(self) -> None:
        if self._z is not None:
            self.out.write(self._z.flush())
            self._z = None


def gzip_member(data: bytes) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    return z.compress(data) + z.flush()


def footer(toc_offset: int, *, legacy: bool = False) -> bytes:
    """The upstream footer: an empty gzip member whose FEXTRA names the TOC."""
    field_ = b"%016xSTARGZ" % toc_offset
    extra = field_ if legacy else b"SG" + len(field_).to_bytes(2, "little") + field_
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\0\xff" + len(extra).to_bytes(2, "little")
    # A stored empty final block, then CRC32 and ISIZE of nothing.
    return header + extra + b"\x01\x00\x00\xff\xff" + b"\0" * 8


def toc_member(json_bytes: bytes, *, name: str = TOC_NAME, trailer: bytes = b"") -> bytes:
    """The gzip member holding the TOC tar (what follows the JSON: *trailer*
    plus the tar's padding and end blocks)."""
    info = tarfile.TarInfo(name)
    info.size = len(json_bytes)
    pad = b"\0" * (-len(json_bytes) % 512)
    return gzip_member(info.tobuf(tarfile.USTAR_FORMAT) + json_bytes + pad + trailer + b"\0" * 1024)


def estargz(
    items: list[Item],
    *,
    chunk: int = CHUNK,
    pack: int = 0,
    landmark: bool = True,
    tamper: Tamper | None = None,
    toc_json: bytes | None = None,
    toc: bytes | None = None,
    foot: Callable[[int], bytes] | None = None,
    toc_digest: str | None = None,
    annotate: bool = True,
) -> Layer:
    """Lay *items* out as an eStargz blob (module docstring).

    Files smaller than *pack* bytes share the open member (``innerOffset``),
    as newer upstream writers pack small files.
    """
    members = _Members()
    entries: list[Record] = []
    if landmark:
        items = [F(LANDMARK, b"\x0f"), *items]
    for item in items:
        entries.extend(_write(members, item, chunk, pack))
    members.write(b"\0" * 1024)
    toc_offset = members.tell()
    if tamper is not None:
        entries = tamper(entries) or entries
    if toc_json is None:
        toc_json = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    blob = members.out.getvalue()
    blob += toc if toc is not None else toc_member(toc_json)
    blob += (foot or footer)(toc_offset)
    annotations = {}
    if annotate:
        annotations[TOC_DIGEST_ANNOTATION] = toc_digest or (
            "sha256:" + hashlib.sha256(toc_json).hexdigest()
        )
    desc = Descriptor(
        mt.OCI_LAYER_GZIP,
        Digest("sha256:" + hashlib.sha256(blob).hexdigest()),
        len(blob),
        annotations=annotations,
    )
    return Layer(blob, toc_offset, entries, desc)


def _write(members: _Members, item: Item, chunk: int, pack: int) -> Iterator[Record]:
    """Write *item*'s tar header and data; yield its TOC records."""
    record = dict(item.record)
    info = tarfile.TarInfo(str(record["name"]))
    info.type = {"reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}.get(
        str(record["type"]), tarfile.REGTYPE
    )
    info.size = len(item.data)
    members.write(info.tobuf(tarfile.PAX_FORMAT))
    if record["type"] != "reg" or not item.data:
        if record["type"] == "reg":
            record.setdefault("size", 0)
        yield record
        return
    data = item.data
    record.setdefault("size", len(data))
    record.setdefault("digest", "sha256:" + hashlib.sha256(data).hexdigest())
    if len(data) < pack:
        members.write(b"")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        record.update(offset=members.start, innerOffset=members.inner, chunkDigest=digest)
        members.write(data + b"\0" * (-len(data) % 512))
        yield record
        return
    for start in range(0, len(data), chunk):
        piece = data[start : start + chunk]
        fields = {
            "offset": members.tell(),
            "chunkOffset": start,
            "chunkDigest": "sha256:" + hashlib.sha256(piece).hexdigest(),
        }
        if len(data) - start > chunk:
            fields["chunkSize"] = chunk
        members.write(piece)
        if start == 0:
            record.update({k: v for k, v in fields.items() if k not in record})
            yield record
        else:
            yield {"name": record["name"], "type": "chunk", **fields}
    members.write(b"\0" * (-len(data) % 512))


# -- the hostile classes -------------------------------------------------------


def files(n: int = 3, size: int = 3 * CHUNK + 100) -> list[Item]:
    """A few honest files of several chunks each, under a directory."""
    return [D("d")] + [F(f"d/f{i}", bytes([i + 1]) * size) for i in range(n)]


def dotdot() -> Layer:
    return estargz([F("../../../etc/evil", b"x"), F("a/../../b", b"y")])


def absolute() -> Layer:
    return estargz([F("/etc/shadow", b"x")])


def through_symlink() -> Layer:
    return estargz([L("a", "/etc"), F("a/passwd", b"root::0:0::/:/bin/sh\n")])


def hardlink_out(target: str = "../../etc/passwd") -> Layer:
    return estargz([F("f", b"x"), H("h", target)])


def _chunks_of(entries: list[Record], name: str) -> list[Record]:
    return [e for e in entries if e["name"] == name and ("offset" in e or e["type"] == "chunk")]


def chunk_field(file: str, index: int, **fields: Any) -> Tamper:
    """A tamper hook setting *fields* on chunk *index* of *file*."""

    def tamper(entries: list[Record]) -> None:
        _chunks_of(entries, file)[index].update(fields)

    return tamper


def chunk_past_blob() -> Layer:
    return estargz(files(), tamper=chunk_field("d/f1", 1, offset=1 << 40))


def chunk_negative() -> Layer:
    return estargz(files(), tamper=chunk_field("d/f1", 1, offset=-5))


def chunks_overlap() -> Layer:
    """Chunk 2 of a file claims chunk 1's member again (offsets go back)."""

    def tamper(entries: list[Record]) -> None:
        chunks = _chunks_of(entries, "d/f1")
        chunks[2]["offset"] = chunks[1]["offset"]

    return estargz(files(), tamper=tamper)


def chunks_gap() -> Layer:
    return estargz(files(), tamper=chunk_field("d/f1", 2, chunkOffset=3 * CHUNK))


def size_near_2_63() -> Layer:
    return estargz(files(1), tamper=chunk_field("d/f0", 0, size=(1 << 63) - 1))


def chunk_size_near_2_63() -> Layer:
    return estargz(files(1), tamper=chunk_field("d/f0", 3, chunkSize=(1 << 63) - 1 - 3 * CHUNK))


def inner_offset_outside(inner: int = 1 << 20) -> Layer:
    """Chunk 1 of d/f1 starts *inner* bytes into its member: past its end,
    but within what its compressed size could inflate to."""
    return estargz(files(), tamper=chunk_field("d/f1", 1, innerOffset=inner))


def inflates_huge(size: int) -> Layer:
    """An honest TOC whose member then inflates to *size* more zero bytes."""
    entries_json = json.dumps({"version": 1, "entries": []}).encode()
    return estargz([], landmark=False, toc_json=entries_json, toc=_big_member(entries_json, size))


def _big_member(json_bytes: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(TOC_NAME)
    info.size = len(json_bytes)
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [z.compress(info.tobuf(tarfile.USTAR_FORMAT) + json_bytes)]
    zeros = b"\0" * (1 << 20)
    for _ in range(size >> 20):
        out.append(z.compress(zeros))
    out.append(z.flush())
    return b"".join(out)


def many_entries(n: int, *, per_dir: int = 1000) -> Layer:
    """*n* empty files in directories of *per_dir*; the TOC alone says so."""

    def tamper(entries: list[Record]) -> list[Record]:
        return entries + [
            {"name": f"d{i // per_dir}/f{i}", "type": "reg", "mode": 0o644} for i in range(n)
        ]

    return estargz([], tamper=tamper)


def nested_deep(depth: int = 100_000) -> Layer:
    """An entry carrying a field nested *depth* deep."""
    toc_json = (
        b'{"version": 1, "entries": [{"name": "x", "type": "dir", "junk": '
        + b"[" * depth
        + b"]" * depth
        + b"}]}"
    )
    return estargz([], landmark=False, toc_json=toc_json)


def footer_into_member() -> Layer:
    """The footer names the member of a file's first chunk, not the TOC."""
    honest = estargz(files())
    target = _chunks_of(honest.entries, "d/f1")[0]["offset"]
    return estargz(files(), foot=lambda _: footer(target))


def footer_into_data() -> Layer:
    """The footer names a byte in the middle of a member."""
    return estargz(files(), foot=lambda off: footer(off // 2 + 1))


def footer_truncated() -> Layer:
    layer = estargz(files())
    return cut(layer, len(layer.blob) - 20)


def cut(layer: Layer, size: int) -> Layer:
    """*layer* with its blob cut to *size* bytes (the descriptor says so too)."""
    blob = layer.blob[:size]
    digest = Digest("sha256:" + hashlib.sha256(blob).hexdigest())
    desc = Descriptor(layer.desc.media_type, digest, size, annotations=layer.desc.annotations)
    return Layer(blob, layer.toc_offset, layer.entries, desc)


def path_twice(first: Item, second: Item) -> Layer:
    return estargz([first, second])
