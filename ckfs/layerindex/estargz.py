"""eStargz layers indexed from their table of contents, by one or two range reads.

An eStargz blob (upstream ``estargz`` Go library, ``ctr-remote``, ``nerdctl
image convert --estargz``) is a gzip tar whose files start new gzip members,
followed by a member holding the TOC (``stargz.index.json``: every entry and,
for each chunk of each file, the offset of its member) and a footer naming
the TOC's offset. So a layer is indexed without reading its data: one Range
request for the blob's last few KiB (the footer, and a small TOC whole), one
more for the rest of a bigger TOC.

Trust: neither range can be checked against the blob digest (only the whole
blob could). The TOC is trusted only through the layer descriptor's
`TOC_DIGEST_ANNOTATION` (sha256 of the uncompressed TOC JSON), which the
manifest's digest covers: a layer without it is `NotEstargz` (the caller
falls back to a non-lazy source), and a TOC whose JSON does not match it is
`DataLoss` before a byte of the JSON is parsed. The footer only says where to
look: a lying footer finds no TOC member there (`BadLayer`) or one that fails
that check. Each chunk's ``chunkDigest`` is kept in the index and checked by
the data path before the chunk is served or cached.

A verified TOC is still hostile input (whoever made the image chose it), so
it is read with bounds and under the same rules as a tar:

- the TOC member is inflated in bounded pieces, never whole, within
  `TocLimits` (compressed and inflated size, bytes per record, records,
  chunks per file), and parsed record by record rather than as one document,
  so a million-entry TOC costs the index, not a million Python objects;
- each entry is read into a `tarfile.TarInfo` and interpreted by
  `ckfs.archive.entry.from_tarinfo`, the rules eager apply uses (paths
  cleaned inside the layer, owners, modes, devices, xattrs, whiteouts), and
  written through `ckfs.layerindex.model.IndexWriter`, which applies the
  tree rules (duplicates, hardlinks inside the layer, nothing below a
  symlink, limits);
- chunks must lie before the TOC, follow each other in the blob (offsets
  never go back; chunks sharing a member do not overlap inside it), ask for
  no more inflated bytes than deflate can produce from their member
  (`MAX_INFLATION`), and tile their file exactly. An ``innerOffset`` beyond
  its member's real inflated end cannot be seen without the member: the
  data path finds it short and fails that file's reads (EIO).

Anything else wrong refuses the whole layer with one `BadLayer` line naming
what and where: the caller falls back to the eager path, loudly.
``stargz.index.json`` and the prefetch landmarks are not part of the layer's
tree and are left out of the index.

The format, as the upstream library writes it: the 51-byte footer is an
empty gzip member whose FEXTRA field holds the subfield ``SG`` with
``%016x`` of the TOC offset and ``STARGZ``; the legacy 47-byte one holds the
same 22 bytes as the whole extra field. The TOC member inflates to a tar
whose first entry is ``stargz.index.json``. Entries are ``{"version": 1,
"entries": [...]}`` records; a ``reg`` entry describes a file and its first
chunk, ``chunk`` records after it the rest; ``chunkSize`` 0 means "to the end
of the file".
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import json
import logging
import re
import tarfile
import threading
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from ckfs.archive.entry import BadEntry, Entry, Kind, SkipEntry, from_tarinfo, normalize_path
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import DataLoss, FailedPrecondition, InvalidArgument
from ckfs.layerindex.model import LIMITS, BadLayer, Chunk, IndexWriter, LayerIndex, Limits
from ckfs.layerindex.sources import TOC_DIGEST_ANNOTATION as TOC_DIGEST_ANNOTATION
from ckfs.safetext import printable

__all__ = [
    "FOOTER_SIZE",
    "HIDDEN",
    "LEGACY_FOOTER_SIZE",
    "MAX_INFLATION",
    "TOC_DIGEST_ANNOTATION",
    "TOC_LIMITS",
    "TOC_NAME",
    "Footer",
    "NotEstargz",
    "ReadRange",
    "TocLimits",
    "build_index",
    "index_estargz",
    "parse_footer",
    "toc_digest",
    "toc_records",
    "verify_toc",
]

log = logging.getLogger(__name__)

#: The TOC's tar entry name inside its gzip member.
TOC_NAME = "stargz.index.json"

#: Footer sizes: the current one (FEXTRA with an ``SG`` subfield) and the
#: legacy one (the bare 22 bytes), tried in that order, as upstream does.
FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47

#: Root entries the upstream writer adds for its own use; they are not files
#: of the layer (an unpacked original would not have them).
HIDDEN = frozenset({TOC_NAME, ".prefetch.landmark", ".no.prefetch.landmark"})

#: Deflate's largest expansion (258-byte matches from 2-bit codes): no
#: member inflates to more than this many bytes per compressed byte, so a
#: chunk claiming more is refused without fetching anything.
MAX_INFLATION = 1032

_INT64 = (1 << 63) - 1
#: Bytes read from the blob's end at first: the footer and, for a layer of
#: up to some 80 entries, its whole TOC, which then needs no second request;
#: a bigger TOC starts there, so nothing read is wasted. Kept small: for a
#: small TOC the rest is file data nobody asked for.
_TAIL = 4 << 10
#: Longest single range read: a big TOC (tens of MB for a million entries)
#: is fetched in pieces, each well inside what one registry read accepts
#: (`ckfs.remotes.blobs.MAX_RANGE`) and retried on its own.
_MAX_READ = 16 << 20
_TAR_BLOCK = 512
#: Compressed bytes handed to zlib per call, and most inflated bytes taken
#: back per call: memory per step stays small however the TOC inflates.
_FEED = 64 << 10
_PIECE = 1 << 20
_OFFSET_FIELD = re.compile(rb"[0-9a-fA-F]{16}STARGZ")
_SUBFIELD = b"SG" + (22).to_bytes(2, "little")
_GZIP_FEXTRA = b"\x1f\x8b\x08\x04"
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_BLANKS = " \t\n\r"
#: A separator or closer between JSON values, with the blanks around it.
_SEPARATOR = re.compile(r"[ \t\n\r]*([,\]}])[ \t\n\r]*")
#: Entries held back at most while a file's last member has no known end
#: (a large file followed by thousands of empty files, links and dirs).
_MAX_WAITING = 4096
#: Skipped entries are logged one by one up to this many, then counted.
_SKIPS_LOGGED = 10

#: Held while a build turns TOC records into tables: that is Python and
#: SQLite under the GIL, so builds in parallel threads only contend for it
#: (four layers of 2,500 entries built in 4 threads took 0.38-0.52 s, one
#: after another 0.27-0.34 s, same minute, 2 cores). Process-wide, as the
#: GIL is. Checking the TOC (zlib, sha256) and syncing the finished file
#: run outside it, beside the next build.
_BUILDING = threading.Lock()

_TAR_TYPES = {
    "reg": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


class NotEstargz(FailedPrecondition):
    """The layer carries no TOC digest annotation: it cannot be trusted lazily."""


#: A blob's range reader: ``await read_range(offset, length)`` returns exactly
#: *length* bytes from *offset* (the registry's `read_range`, or a local file).
ReadRange = Callable[[int, int], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class TocLimits:
    """Bounds on what one TOC may make ckfs hold or do.

    Upstream writes some 350 bytes of JSON per entry, 50 compressed
    (measured on /usr/share: 97,307 entries, 33.6 MB, 5.0 MB): the
    defaults take the index writer's 2,000,000 entries with room to spare.
    The TOC is parsed as a stream, so ``inflated`` bounds time, not memory.
    ``record`` bounds one entry's JSON (a file's xattrs at Linux's 64 KiB
    each, base64, fit many times); ``records`` counts entries and chunks;
    ``chunks`` is per file (16 GiB at upstream's smallest useful chunks).
    """

    compressed: int = 256 << 20
    inflated: int = 1 << 30
    record: int = 1 << 20
    records: int = 4_000_000
    chunks: int = 1 << 18


TOC_LIMITS = TocLimits()


@dataclass(frozen=True, slots=True)
class Footer:
    """Where the TOC member starts, and the footer's size (51 or 47)."""

    toc_offset: int
    size: int


async def index_estargz(
    read_range: ReadRange,
    desc: Descriptor,
    path: Path,
    *,
    meta: Mapping[str, str] | None = None,
    limits: TocLimits = TOC_LIMITS,
    tree_limits: Limits = LIMITS,
) -> LayerIndex:
    """Index the eStargz layer *desc* into *path* with one or two range reads.

    Args:
        read_range: the blob's range reader.
        desc: the layer descriptor (digest, size, annotations).
        path: where the index file goes (its directory must exist).
        meta: kept in the index's meta (where the layer can be fetched).
        limits: bounds on the TOC.
        tree_limits: bounds on the tree, for the index writer.

    Returns:
        The committed index, open.

    Raises:
        NotEstargz: *desc* has no `TOC_DIGEST_ANNOTATION`.
        BadLayer: the footer, TOC or an entry is malformed or hostile, or
            exceeds a limit; nothing is written.
        DataLoss: the TOC JSON does not match the annotation.
        Unavailable: from *read_range*.

    Cancellation: the reads are cancellable; once the TOC is in hand, the
    build runs to its end in a worker thread (abandoning it would leave a
    writer half done).
    """
    what = f"layer {desc.digest}"
    expected = toc_digest(desc)
    if desc.size < LEGACY_FOOTER_SIZE:
        raise BadLayer(f"{what}: {desc.size} bytes, too small for an eStargz footer")
    tail_at = max(0, desc.size - _TAIL)
    tail = await read_range(tail_at, desc.size - tail_at)
    footer = parse_footer(tail, desc.size, what=what)
    toc_size = desc.size - footer.size - footer.toc_offset
    if toc_size > limits.compressed:
        raise BadLayer(f"{what}: TOC of {toc_size} bytes, over the limit of {limits.compressed}")
    toc = tail[max(0, footer.toc_offset - tail_at) : len(tail) - footer.size]
    if footer.toc_offset < tail_at:
        toc = await _read(read_range, footer.toc_offset, tail_at - footer.toc_offset) + toc
    return await trio.to_thread.run_sync(
        lambda: build_index(toc, expected, desc, footer, path, limits, tree_limits, meta)
    )


async def _read(read_range: ReadRange, offset: int, length: int) -> bytes:
    """*length* bytes from *offset*, in requests of at most `_MAX_READ`."""
    if length <= _MAX_READ:
        return await read_range(offset, length)
    pieces = []
    for start in range(offset, offset + length, _MAX_READ):
        pieces.append(await read_range(start, min(_MAX_READ, offset + length - start)))
    return b"".join(pieces)


def toc_digest(desc: Descriptor) -> Digest:
    """The TOC digest *desc* is annotated with.

    Raises:
        NotEstargz: no annotation.
        BadLayer: it is not a digest.
    """
    value = (desc.annotations or {}).get(TOC_DIGEST_ANNOTATION)
    if value is None:
        raise NotEstargz(f"layer {desc.digest}: no {TOC_DIGEST_ANNOTATION} annotation")
    try:
        return Digest.parse(value)
    except InvalidArgument as e:
        raise BadLayer(f"layer {desc.digest}: {TOC_DIGEST_ANNOTATION}: {e}") from None


def parse_footer(tail: bytes, blob_size: int, *, what: str = "layer") -> Footer:
    """The footer at the end of *tail*, the last bytes of a blob of *blob_size*.

    Raises:
        BadLayer: no valid footer, or one naming an offset outside the blob.
    """
    for size in (FOOTER_SIZE, LEGACY_FOOTER_SIZE):
        if len(tail) < size:
            continue
        offset = _footer_offset(tail[-size:], legacy=size == LEGACY_FOOTER_SIZE)
        if offset is None:
            continue
        if offset >= blob_size - size:
            raise BadLayer(f"{what}: eStargz footer names TOC offset {offset} past the blob")
        return Footer(offset, size)
    raise BadLayer(f"{what}: no eStargz footer (blob truncated or not eStargz)")


def _footer_offset(footer: bytes, *, legacy: bool) -> int | None:
    """The TOC offset a footer names, or None if it is no such footer.

    The gzip header must be exactly what the upstream writer makes (FEXTRA
    only), and the rest one empty member ending at the blob's end.
    """
    if footer[:4] != _GZIP_FEXTRA:
        return None
    xlen = int.from_bytes(footer[10:12], "little")
    extra = footer[12 : 12 + xlen]
    if legacy:
        field_ = extra if xlen == 22 else b""
    else:
        field_ = extra[4:] if xlen == 26 and extra[:4] == _SUBFIELD else b""
    if not _OFFSET_FIELD.fullmatch(field_):
        return None
    inflater = zlib.decompressobj(wbits=31)
    try:
        if inflater.decompress(footer, 1) or not inflater.eof or inflater.unused_data:
            return None
    except zlib.error:
        return None
    return int(field_[:16], 16)


def build_index(
    toc: bytes,
    expected: Digest,
    desc: Descriptor,
    footer: Footer,
    path: Path,
    limits: TocLimits = TOC_LIMITS,
    tree_limits: Limits = LIMITS,
    meta: Mapping[str, str] | None = None,
) -> LayerIndex:
    """Verify the TOC member *toc*, then index its entries into *path*.

    Blocking (inflate, JSON, SQLite): run it in a worker thread. Raises what
    `index_estargz` does, except `NotEstargz`.
    """
    what = f"layer {desc.digest}"
    verify_toc(toc, expected, limits, what=what)
    with IndexWriter.for_layer(
        path, desc, source="estargz", meta=meta, limits=tree_limits
    ) as writer:
        with _BUILDING:
            writer.set_meta("toc_digest", str(expected))
            writer.set_meta("toc_offset", str(footer.toc_offset))
            layout = _Layout(footer.toc_offset, limits, what)
            for record in toc_records(toc, limits, what=what):
                for entry, chunks in layout.feed(record):
                    writer.add(entry, chunks=chunks)
            for entry, chunks in layout.finish():
                writer.add(entry, chunks=chunks)
            writer.finish()
        return writer.publish()


def verify_toc(toc: bytes, expected: Digest, limits: TocLimits, *, what: str = "layer") -> None:
    """Check the TOC JSON inside the member *toc* against *expected*.

    Raises:
        BadLayer: the member is not a gzip tar starting with the TOC, or
            breaks a limit.
        DataLoss: the JSON's digest is not *expected*.
    """
    digester = expected.digester()
    for piece in _toc_json(toc, limits, what):
        digester.update(piece)
    actual = digester.digest()
    if actual != expected:
        raise DataLoss(f"{what}: TOC digest {actual} does not match the annotated {expected}")


def _toc_json(toc: bytes, limits: TocLimits, what: str) -> Iterator[bytes]:
    """The TOC JSON bytes of the member *toc*, in bounded pieces.

    The member must inflate to a tar whose first header is a regular file
    named `TOC_NAME`, and must end exactly where the footer begins.
    """
    stream = _inflate(toc, limits.inflated + 4 * _TAR_BLOCK, what)
    head = b""
    for piece in stream:
        head += piece
        if len(head) >= _TAR_BLOCK:
            break
    size = _toc_header(head[:_TAR_BLOCK], limits, what)
    rest = memoryview(head)[_TAR_BLOCK:]
    while size:
        if not rest:
            rest = memoryview(next(stream, b""))
            if not rest:
                raise BadLayer(f"{what}: TOC member ends inside the TOC")
        take = rest[:size]
        size -= len(take)
        rest = rest[len(take) :]
        yield bytes(take)
    for _ in stream:  # tar padding and end blocks: only the member's end matters
        pass


def _toc_header(block: bytes, limits: TocLimits, what: str) -> int:
    """The TOC's size from the first tar header of its member."""
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        raise BadLayer(f"{what}: the TOC offset holds no tar header ({e})") from None
    if info.name != TOC_NAME or info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise BadLayer(f"{what}: the TOC offset holds {printable(info.name)!r}, not {TOC_NAME}")
    if not 0 <= info.size <= limits.inflated:
        raise BadLayer(
            f"{what}: TOC of {info.size} bytes, over the limit of {limits.inflated} inflated"
        )
    return info.size


def _inflate(data: bytes, limit: int, what: str) -> Iterator[bytes]:
    """Inflate the one gzip member *data* in pieces, at most *limit* bytes."""
    inflater = zlib.decompressobj(wbits=31)
    view = memoryview(data)
    pos = total = 0
    try:
        while not inflater.eof:
            feed: bytes | memoryview
            if inflater.unconsumed_tail:
                feed = inflater.unconsumed_tail
            else:
                feed = view[pos : pos + _FEED]
                pos += len(feed)
            piece = inflater.decompress(feed, _PIECE)
            if not piece and not feed and not inflater.eof:
                raise BadLayer(f"{what}: TOC member truncated")
            total += len(piece)
            if total > limit:
                raise BadLayer(f"{what}: TOC inflates past {limit} bytes")
            if piece:
                yield piece
    except zlib.error as e:
        raise BadLayer(f"{what}: the TOC offset holds no gzip member ({e})") from None
    if inflater.unused_data or pos < len(data):
        raise BadLayer(f"{what}: bytes between the TOC member and the footer")


def toc_records(toc: bytes, limits: TocLimits, *, what: str = "layer") -> Iterator[Any]:
    """The ``entries`` of the TOC member *toc*, one parsed JSON value at a time.

    The document is read as a stream: the top-level object and the entries
    array by hand, each entry (and each other top-level value) by
    `json.JSONDecoder.raw_decode` within `TocLimits.record` bytes. Nothing
    but the current entry and a window of text is held.

    Raises:
        BadLayer: not JSON, not ``{"version": 1, "entries": [...]}``, a
            record over `TocLimits.record`, or more than `TocLimits.records`.
    """
    return _TocParser(_toc_json(toc, limits, what), limits, what).records()


class _TocParser:
    """The streaming reader behind `toc_records`.

    Before each value the window holds at least ``limits.record`` characters
    (or the rest of the document), so a value that fails to decode is
    malformed or too big, never merely cut off by the window.
    """

    def __init__(self, pieces: Iterator[bytes], limits: TocLimits, what: str) -> None:
        self._pieces = pieces
        self._utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        self._text = ""
        self._pos = 0
        self._done = False
        self._limits = limits
        self._what = what
        self._decoder = json.JSONDecoder(parse_constant=self._constant)

    def records(self) -> Iterator[Any]:
        self._expect("{")
        seen: set[str] = set()
        closed = self._opened("}")
        while not closed:
            key = self._value()
            if not isinstance(key, str) or key in seen:
                raise self._bad("expected a new key")
            seen.add(key)
            self._expect(":")
            if key == "entries":
                yield from self._entries()
            elif key == "version":
                version = self._value()
                if type(version) is not int or version != 1:
                    raise self._bad("unknown TOC version (want 1)")
            else:
                self._value()  # unknown fields are ignored, as upstream does
            closed = self._separator("}")
        if "version" not in seen:
            raise self._bad("no version")
        if self._peek() != "":
            raise self._bad("data after the document")

    def _entries(self) -> Iterator[Any]:
        self._expect("[")
        closed = self._opened("]")
        count = 0
        while not closed:
            count += 1
            if count > self._limits.records:
                raise self._bad(f"more than {self._limits.records} records")
            yield self._value()
            closed = self._separator("]")

    def _bad(self, why: str) -> BadLayer:
        return BadLayer(f"{self._what}: TOC JSON: {why}")

    def _constant(self, name: str) -> Any:
        raise self._bad(f"{name} is not JSON")

    def _fill(self, want: int) -> None:
        """Make at least *want* characters available from the position on."""
        while len(self._text) - self._pos < want and not self._done:
            if self._pos > (1 << 20) and self._pos * 2 > len(self._text):
                self._text, self._pos = self._text[self._pos :], 0
            piece = next(self._pieces, None)
            try:
                if piece is None:
                    self._done = True
                    self._text += self._utf8.decode(b"", final=True)
                else:
                    self._text += self._utf8.decode(piece)
            except UnicodeDecodeError:
                raise self._bad("not UTF-8") from None

    def _peek(self) -> str:
        """The next non-blank character ("" at the end), not consumed."""
        while True:
            self._fill(1)
            self._pos = _WHITESPACE.match(self._text, self._pos).end()  # type: ignore[union-attr]
            if self._pos < len(self._text) or self._done:
                return self._text[self._pos : self._pos + 1]

    def _next(self) -> str:
        c = self._peek()
        self._pos += len(c)
        return c

    def _opened(self, close: str) -> bool:
        """Whether the object or array just opened closes at once (consumed)."""
        if self._peek() != close:
            return False
        self._next()
        return True

    def _separator(self, close: str) -> bool:
        """Consume ``,`` (False: more follows) or *close* (True).

        With the blanks around it inside the window, in one match (this
        runs for every record); else by `_next`, which reads on.
        """
        m = _SEPARATOR.match(self._text, self._pos)
        if m is not None and m.end() < len(self._text):
            self._pos = m.end()
            c = m[1]
        else:
            c = self._next()
        if c == close:
            return True
        if c != ",":
            raise self._bad(f"expected ',' or {close!r}")
        return False

    def _expect(self, want: str) -> None:
        if self._next() != want:
            raise self._bad(f"expected {want!r}")

    def _value(self) -> Any:
        limit = self._limits.record
        text, pos = self._text, self._pos
        if pos >= len(text) or text[pos] in _BLANKS:
            self._peek()
        if len(self._text) - self._pos <= limit:
            self._fill(limit + 1)
        try:
            value, end = self._decoder.raw_decode(self._text, self._pos)
        except json.JSONDecodeError as e:
            if len(self._text) - self._pos > limit:
                raise self._bad(f"a record over {limit} bytes or malformed ({e.msg})") from None
            raise self._bad(e.msg) from None
        except RecursionError:
            raise self._bad("nested too deep") from None
        except ValueError:  # an integer past Python's digit limit
            raise self._bad("a number too long") from None
        if end - self._pos > limit:
            raise self._bad(f"a record over {limit} bytes")
        self._pos = end
        return value


@dataclass(slots=True)
class _Pending:
    """An entry waiting for its chunks' members to end (see `_Layout`).

    chunks: [file_offset, size, blob_offset, inner_offset, digest] each.
    """

    entry: Entry | None  # None: hidden or skipped; kept only for its place
    chunks: list[tuple[int, int, int, int, str]] = field(default_factory=list)
    size: int = 0
    digest: str = ""  # the file's whole digest, for a single-chunk file
    raw: str = ""  # its name as the TOC spells it

    def name(self) -> str:
        """The entry's path for messages."""
        return repr(printable(self.entry.path)) if self.entry else "a hidden entry"


class _Layout:
    """TOC records in, (entry, chunks) out, in TOC order.

    A chunk's compressed length is only known when the next member starts
    (the next data record with a greater offset) or at the TOC: a file whose
    last member is still open waits, and the entries after it wait behind
    it (the tree rules depend on the order). At most `_MAX_WAITING` wait;
    beyond that the file goes out with that member's length unknown (-1),
    which the data path reads through a bounded window.
    """

    def __init__(self, toc_offset: int, limits: TocLimits, what: str) -> None:
        self._toc_offset = toc_offset
        self._limits = limits
        self._what = what
        self._queue: deque[_Pending] = deque()
        self._file: _Pending | None = None  # the file whose chunk records may follow
        self._member = -1  # offset of the last member a chunk lives in
        self._inner_end = 0  # end of the last chunk inside that member
        #: (member offset, next member's offset) in blob order, for waiting chunks.
        self._ends: deque[tuple[int, int]] = deque()
        self._index = -1
        self._skipped = 0

    def feed(self, record: Any) -> Iterator[tuple[Entry, tuple[Chunk, ...]]]:
        self._index += 1
        if not isinstance(record, dict):
            raise self._bad(None, "not an object")
        try:
            kind = _text(record, "type")
            if kind == "chunk":
                self._check_chunk_name(record)
                self._chunk(record)
            else:
                self._close_file()
                self._entry(record, kind)
        except (TypeError, ValueError) as e:
            raise self._bad(record, str(e)) from None
        except BadEntry as e:
            raise BadLayer(str(e)) from None
        yield from self._flush()

    def finish(self) -> Iterator[tuple[Entry, tuple[Chunk, ...]]]:
        self._close_file()
        if self._member >= 0:
            self._ends.append((self._member, self._toc_offset))
        self._member = _INT64
        yield from self._flush()
        if self._skipped > _SKIPS_LOGGED:
            log.warning("%s: %d TOC entries skipped in all", self._what, self._skipped)

    def _bad(self, record: dict[str, Any] | None, why: str) -> BadLayer:
        name = record.get("name") if record is not None else None
        shown = f" ({printable(name)!r})" if isinstance(name, str) else ""
        return BadLayer(f"{self._what}: TOC entry {self._index}{shown}: {why}")

    def _entry(self, record: dict[str, Any], kind: str) -> None:
        if kind not in _TAR_TYPES:
            raise self._bad(record, f"unknown type {printable(kind)!r}")
        try:
            info = _tarinfo(record, kind)
            entry: Entry | None = from_tarinfo(info, what=self._what)
        except SkipEntry as e:
            self._skip(record, str(e))
            entry = None
        except (ValueError, TypeError) as e:
            raise self._bad(record, str(e)) from None
        if entry is not None and entry.path in HIDDEN:
            entry = None
        pending = _Pending(entry)
        if entry is not None:
            self._queue.append(pending)
        if kind == "reg" and info.size > 0:
            pending.size = info.size
            pending.digest = _text(record, "digest")
            pending.raw = info.name
            self._file = pending
            self._chunk(record)

    def _skip(self, record: dict[str, Any], why: str) -> None:
        self._skipped += 1
        if self._skipped <= _SKIPS_LOGGED:
            log.warning("%s: TOC entry %r skipped: %s", self._what, record.get("name"), why)

    def _chunk(self, record: dict[str, Any]) -> None:
        file = self._file
        if file is None:
            raise self._bad(record, "a chunk that follows no regular file")
        if len(file.chunks) >= self._limits.chunks:
            raise self._bad(record, f"more than {self._limits.chunks} chunks in one file")
        start, size, offset, inner = _ints(record, _CHUNK_FIELDS)
        size = size or file.size - start
        if size <= 0:
            raise self._bad(record, f"chunk at {start} of a {file.size}-byte file")
        if offset >= self._toc_offset:
            raise self._bad(record, f"chunk at blob offset {offset}, not before the TOC")
        if offset < self._member or (offset == self._member and inner < self._inner_end):
            raise self._bad(record, f"chunk at blob offset {offset}+{inner} overlaps the last")
        if offset > self._member:
            if self._member >= 0 and self._queue:
                self._ends.append((self._member, offset))
            self._member = offset
        self._inner_end = inner + size
        file.chunks.append((start, size, offset, inner, _text(record, "chunkDigest")))

    def _check_chunk_name(self, record: dict[str, Any]) -> None:
        """A chunk record names the file it continues (upstream writes it so)."""
        name = _text(record, "name")
        file = self._file
        if (
            file is not None
            and name != file.raw
            and (normalize_path(name, what=self._what) != normalize_path(file.raw, what=self._what))
        ):
            raise self._bad(record, f"a chunk of another file than {printable(file.raw)!r}")

    def _close_file(self) -> None:
        """The open file has all its chunks: each needs a digest to be served."""
        file, self._file = self._file, None
        if file is None:
            return
        if len(file.chunks) == 1 and not file.chunks[0][4]:
            start, size, offset, inner, _ = file.chunks[0]
            file.chunks[0] = (start, size, offset, inner, file.digest)
        for c in file.chunks:
            if not c[4]:
                raise BadLayer(f"{self._what}: TOC: {file.name()}: chunk at {c[0]} has no digest")

    def _flush(self) -> Iterator[tuple[Entry, tuple[Chunk, ...]]]:
        queue = self._queue
        while queue and queue[0] is not self._file:
            chunks = queue[0].chunks
            if chunks and chunks[-1][2] >= self._member and len(queue) <= _MAX_WAITING:
                return  # its last member's end is not known yet
            pending = queue.popleft()
            assert pending.entry is not None
            yield pending.entry, self._chunks(pending)
        if not queue:
            self._ends.clear()

    def _end(self, member: int) -> int:
        """Where the member at *member* ends, -1 if not known yet.

        Asked in blob order, so members before *member* are forgotten.
        """
        ends = self._ends
        while ends and ends[0][0] < member:
            ends.popleft()
        return ends[0][1] if ends and ends[0][0] == member else -1

    def _chunks(self, pending: _Pending) -> tuple[Chunk, ...]:
        assert pending.entry is not None
        if pending.entry.kind != Kind.FILE:
            return ()  # a whiteout written as a file: its bytes mean nothing
        out = []
        for start, size, offset, inner, digest in pending.chunks:
            end = self._end(offset)
            comp = end - offset if end >= 0 else -1
            if end >= 0 and inner + size > comp * MAX_INFLATION:
                raise BadLayer(
                    f"{self._what}: TOC: {pending.name()}: chunk at {start} asks for "
                    f"{inner + size} bytes from a {comp}-byte member"
                )
            out.append(Chunk(start, size, offset, inner, digest, comp))
        return tuple(out)


def _int(record: dict[str, Any], key: str) -> int:
    """A non-negative int64 field (absent: 0, as upstream omits zeros)."""
    return _ints(record, (key,))[0]


#: Integer fields of a record, read together (in the order checked).
_OWNER_FIELDS = ("mode", "uid", "gid")
_DEVICE_FIELDS = ("devMajor", "devMinor")
_CHUNK_FIELDS = ("chunkOffset", "chunkSize", "offset", "innerOffset")


def _ints(record: dict[str, Any], keys: tuple[str, ...]) -> list[int]:
    """`_int` of each of *keys*, in one call (this runs for every record)."""
    values = []
    for key in keys:
        value = record.get(key, 0)
        if type(value) is not int or not 0 <= value <= _INT64:
            raise TypeError(f"{key} is not a number from 0 to 2**63-1")
        values.append(value)
    return values


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise TypeError(f"{key} is not a string")
    return value


def _tarinfo(record: dict[str, Any], kind: str) -> tarfile.TarInfo:
    """The tar header the TOC record describes, for `from_tarinfo`.

    Raises:
        TypeError, ValueError: a field of the wrong type or out of range.
    """
    info = tarfile.TarInfo(_text(record, "name"))
    info.type = _TAR_TYPES[kind]
    info.mode, info.uid, info.gid = _ints(record, _OWNER_FIELDS)
    info.size = _int(record, "size") if kind == "reg" else 0
    info.mtime = _mtime(_text(record, "modtime"))
    info.linkname = _text(record, "linkName")
    info.devmajor, info.devminor = _ints(record, _DEVICE_FIELDS)
    xattrs = record.get("xattrs")
    if xattrs is None:
        xattrs = {}
    elif not isinstance(xattrs, dict):
        raise TypeError("xattrs is not an object")
    pax: dict[str, str] = {}
    for name, value in xattrs.items():
        if not isinstance(value, str):
            raise TypeError(f"xattr {printable(name)!r} is not base64 text")
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError(f"xattr {printable(name)!r} is not base64") from None
        pax[f"SCHILY.xattr.{name}"] = raw.decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    return info


@functools.lru_cache(maxsize=1024)
def _mtime(text: str) -> int:
    """Seconds since the epoch of an RFC 3339 time (upstream writes whole
    seconds, UTC); absent means 0, as for upstream's zero time.

    Cached: a layer's files mostly share a few times, and parsing one costs
    more than the rest of its field checks together.
    """
    if not text:
        return 0
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"modtime {printable(text)!r} is not an RFC 3339 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp())
