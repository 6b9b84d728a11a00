"""The lazy data path: a file's bytes, fetched on first read, verified, cached.

A `LayerReader` serves ``read(node, offset, size)`` for one layer from three
places, cheapest first: the `ChunkCache`'s memory copies, its files (checked
with xxh3), and the layer's blob through a `BlobSource` (a local file or the
registry's ranged GET). Every byte from the blob is verified with sha256
before it is served or cached; once cached it is trusted on its xxh3 alone.

What a read fetches depends on the layer index's source:

- ``estargz``: the file's chunks covering the range. Each chunk starts a gzip
  member at ``blob_offset``; inflating it gives ``inner_offset`` bytes to skip
  (several small files sharing one member), then the chunk's ``size`` bytes,
  checked against its ``digest`` (the TOC's ``chunkDigest``).
- ``tar``: the whole `Span` (about 1 MiB of the uncompressed blob) around the
  range, checked against the span's sha256.
- ``gzip-index`` (local blob only): the spans covering the range, inflated
  from their checkpoints.

Neighbouring pieces a read needs are fetched with one ranged request
(`COALESCE_GAP`, `MAX_REQUEST`). Concurrent reads needing one piece cause
one fetch: the first read leads it, the others wait for its outcome (a
*flight*), and a led fetch that is cancelled hands the piece to a waiter.
Inflating and hashing run in worker threads (`trio.to_thread`) bounded by a
`trio.CapacityLimiter`, so the event loop keeps serving other reads.

Failures are per read: bytes that do not match their digest raise `DataLoss`
and nothing is cached; the source's errors (`Unavailable` when the registry
is down, ...) propagate to that read and to the reads waiting on its flight
only. The next read of the piece tries again.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import trio
from isal import isal_zlib

from ckfs.content.fsutil import pread_exact
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import CkfsError, DataLoss, InvalidArgument, Unimplemented, from_errno
from ckfs.layerindex.cache import ChunkCache
from ckfs.layerindex.model import Chunk, LayerIndex, Node

if TYPE_CHECKING:
    from ckfs.layerindex.gzindex import Inflater
    from ckfs.reference import Reference
    from ckfs.remotes.registry import RegistryClient

__all__ = [
    "COALESCE_GAP",
    "MAX_PIECE",
    "MAX_REQUEST",
    "READAHEAD",
    "BlobSource",
    "LayerReader",
    "LocalBlob",
    "RemoteBlob",
]

log = logging.getLogger(__name__)

#: Largest gap of unneeded blob bytes between two needed pieces that is still
#: fetched in the same request: one more round trip costs more than 32 KiB on
#: any link a registry is reached over.
COALESCE_GAP = 32 << 10

#: Longest single ranged request: the coalesced bytes are held in memory
#: whole (and `RegistryClient.read_range` refuses more than 64 MiB).
MAX_REQUEST = 16 << 20

#: Largest piece (chunk plus the inner offset skipped before it, or span)
#: served. eStargz writes 4 MiB chunks by default and tar spans are 1 MiB;
#: an index naming more is hostile, and its file reads fail (`DataLoss`)
#: instead of inflating gigabytes into memory. Its fetch stays below
#: `RegistryClient.read_range`'s 64 MiB.
MAX_PIECE = 32 << 20

#: Bytes fetched ahead of a sequential reader: two default eStargz chunks,
#: so the next one is ready while the current one is served, and the
#: memory it holds stays well inside the chunk cache's memory bound.
READAHEAD = 8 << 20

#: Chunk lists kept per reader, by inode: FUSE reads a file in 128 KiB
#: pieces, and each would otherwise query the index for the same list.
_CHUNK_LISTS = 64

#: Gzip member header (10 bytes), the deflate end-of-stream slack, and how
#: many output bytes one stored block may hold at least: with these,
#: `_deflate_bound` is above what any deflate encoder needs to produce a
#: member's first bytes (it chooses a stored block when coding would grow
#: the data; each costs 5 bytes per up to 64 KiB, counted here per 16 KiB).
_GZIP_SLACK = 1024
_STORED_BLOCK = 16 << 10


#: isal's inflate error (its stubs declare it an instance, not a class).
_INFLATE_ERROR = cast(type[Exception], isal_zlib.error)


class BlobSource(Protocol):
    """Where a layer's blob bytes come from; exact ranges or an error."""

    @property
    def size(self) -> int:
        """The blob's size in bytes."""
        ...

    async def read_range(self, offset: int, length: int) -> bytes:
        """Exactly *length* bytes from *offset* (unverified)."""
        ...


class LocalBlob:
    """A blob in a local file (the content store, or a test's file).

    Args:
        path: the blob file; it must not change while read.
        size: its size, if known (else taken from the file now).
    """

    def __init__(self, path: Path, size: int | None = None) -> None:
        self.path = Path(path)
        self._size = os.stat(self.path).st_size if size is None else size

    def __repr__(self) -> str:
        return f"LocalBlob({str(self.path)!r})"

    @property
    def size(self) -> int:
        return self._size

    async def read_range(self, offset: int, length: int) -> bytes:
        """Exactly *length* bytes at *offset*, read in a worker thread.

        Raises:
            InvalidArgument: the range is negative or ends past `size`.
            DataLoss: the file is shorter than it was.
            NotFound, CkfsError: the file is gone, or reading it failed (by
                errno: `ckfs.errors.from_errno`).
        """
        _check_range(offset, length, self._size, self)
        try:
            data = await trio.to_thread.run_sync(self._pread, offset, length)
        except OSError as e:
            raise from_errno(e.errno or errno.EIO, f"reading {self.path}") from e
        if len(data) != length:
            raise DataLoss(f"{self.path}: {len(data)} bytes at {offset}, expected {length}")
        return data

    def _pread(self, offset: int, length: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return pread_exact(fd, length, offset)
        finally:
            os.close(fd)


class RemoteBlob:
    """A blob in a registry, read by ranged GETs (`RegistryClient.read_range`).

    Retries, backoff, token refresh and mirrors are the client's; what it
    finally raises fails the one read that asked.
    """

    def __init__(self, client: RegistryClient, ref: Reference, desc: Descriptor) -> None:
        self.client = client
        self.ref = ref
        self.desc = desc

    def __repr__(self) -> str:
        return f"RemoteBlob({self.ref}, {self.desc.digest})"

    @property
    def size(self) -> int:
        return self.desc.size

    async def read_range(self, offset: int, length: int) -> bytes:
        """Exactly *length* bytes at *offset* of the blob, unverified."""
        _check_range(offset, length, self.desc.size, self)
        return await self.client.read_range(self.ref, self.desc, offset, length)


@dataclass(frozen=True, slots=True)
class _Piece:
    """One verifiable unit of a read: an eStargz chunk or a tar span.

    ``start`` and ``size`` place its bytes in the file (chunks) or in the
    uncompressed layer stream (spans); ``comp_offset``..``comp_end`` is the
    blob range to fetch (for a chunk an upper bound: its member may end
    earlier, and `LayerReader` fetches more if it ends later).
    """

    key: str
    start: int
    size: int
    comp_offset: int
    comp_end: int
    inner: int
    digest: str
    kind: str  # "member" (gzip member, eStargz), "raw" (tar), "gzip" (gzip-index span)


@dataclass(slots=True)
class _Flight:
    """The outcome of one led fetch, for the reads waiting on it."""

    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: CkfsError | None = None


class _Short(Exception):
    """The fetched bytes ended before the piece's member gave enough output."""


class LayerReader:
    """Serves file reads of one layer: cache first, else fetch and verify.

    Args:
        index: the layer's index (its ``source`` picks the method).
        source: the layer's blob.
        cache: where verified pieces are kept (shared by all layers).
        limiter: bounds the worker threads inflating and hashing; by default
            one per CPU, for this reader alone.
        nursery: where read-ahead runs: with one, a file read sequentially
            has its next pieces (`READAHEAD` bytes) fetched in the
            background, so fetching, inflating and hashing overlap with
            serving on another core; without, reads fetch only what they
            need.
    """

    def __init__(
        self,
        index: LayerIndex,
        source: BlobSource,
        cache: ChunkCache,
        *,
        limiter: trio.CapacityLimiter | None = None,
        nursery: trio.Nursery | None = None,
    ) -> None:
        if index.source not in ("estargz", "tar", "gzip-index"):
            raise Unimplemented(f"layer {index.layer}: lazy reads of {index.source!r} layers")
        if index.source == "gzip-index" and not isinstance(source, LocalBlob):
            raise Unimplemented(
                f"layer {index.layer}: gzip-index layers are read from a local blob"
            )
        if source.size != index.blob_size:
            raise InvalidArgument(
                f"layer {index.layer}: blob has {source.size} bytes, its index says "
                f"{index.blob_size}"
            )
        self.index = index
        self.source = source
        self.cache = cache
        self.layer = index.layer
        self._limiter = limiter or trio.CapacityLimiter(os.cpu_count() or 1)
        self._flights: dict[str, _Flight] = {}
        self._inflater: Inflater | None = None
        self._inflater_lock = threading.Lock()
        self._chunk_lists: OrderedDict[int, list[_Piece]] = OrderedDict()
        self._spans: list[_Piece] | None = None
        self._nursery = nursery
        self._ends: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._stats = {
            "hits": 0,
            "misses": 0,
            "joined": 0,
            "fetched_bytes": 0,
            "requests": 0,
            "errors": 0,
        }

    def __repr__(self) -> str:
        return f"LayerReader({self.layer}, {self.source!r})"

    def statistics(self) -> dict[str, int]:
        """Counters since this reader was made.

        ``hits``: pieces served from the cache; ``misses``: pieces this reader
        fetched; ``joined``: pieces a read waited for while another fetched
        them; ``fetched_bytes`` and ``requests``: what the blob source was
        asked for; ``errors``: fetches that failed (source error or bad bytes).
        """
        return dict(self._stats)

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        """Up to *size* bytes of *node*'s content from *offset* (short at its end).

        Raises:
            InvalidArgument: a negative offset or size.
            DataLoss: the index places the bytes outside the blob or leaves
                gaps, or the blob's bytes do not match their digests.
            Unavailable, NotFound, ...: the blob source failed; this read only.

        Cancellation: a cancelled read caches nothing half done; a fetch it
        led is taken over by a read waiting on it (or by the next read).
        Its worker thread, if one is running, finishes first.
        """
        if offset < 0 or size < 0:
            raise InvalidArgument(f"layer {self.layer}: read of inode {node.ino} at {offset}")
        end = min(offset + size, node.size)
        if end <= offset:
            return b""
        base = 0 if self.index.source == "estargz" else node.data
        if base < 0:
            raise DataLoss(f"layer {self.layer}: inode {node.ino} has no data offset")
        pieces, first, last = self._covering(node, base + offset, base + end)
        if self._nursery is not None and self._sequential(node.ino, offset, end, last):
            self._read_ahead(pieces, last, base + node.size)
        chosen = pieces[first:last]
        if len(chosen) == 1:  # the common case, served without a thread hop
            data = self.cache.peek(self.layer, chosen[0].key)
            if data is not None:
                self._stats["hits"] += 1
                return _assemble(chosen, {chosen[0].key: data}, base + offset, base + end)
        datas = await self._get(chosen)
        return _assemble(chosen, datas, base + offset, base + end)

    # -- which pieces ------------------------------------------------------

    def _covering(self, node: Node, start: int, end: int) -> tuple[list[_Piece], int, int]:
        """The pieces of *node*'s file (or stream), and the slice of them
        holding bytes *start*..*end*, contiguous, in order.

        Raises:
            DataLoss: the pieces leave a gap or overlap there.
        """
        estargz = self.index.source == "estargz"
        pieces = self._chunk_pieces(node) if estargz else self._span_pieces()
        first = max(bisect.bisect_right(pieces, start, key=lambda p: p.start) - 1, 0)
        pos = start
        last = first
        while pos < end and last < len(pieces):
            p = pieces[last]
            # The first piece holds *start*; each next one starts where the
            # last ended (no gap, no overlap to cut around).
            held = p.start <= pos < p.start + p.size if last == first else p.start == pos
            if not held:
                raise DataLoss(
                    f"layer {self.layer}: no verified piece holds byte {pos} of inode {node.ino}"
                )
            pos = p.start + p.size
            last += 1
        if pos < end:
            raise DataLoss(f"layer {self.layer}: inode {node.ino} ends at {pos} in its pieces")
        return pieces, first, last

    def _sequential(self, ino: int, offset: int, end: int, last: int) -> bool:
        """Whether to read ahead after this read of *ino*: it continues the
        last read (remembered for a few inodes) and reached pieces up to
        *last*, further than when read-ahead last ran (reads inside one
        piece need not look again)."""
        previous = self._ends.pop(ino, None)
        if previous is not None and previous[0] == offset:
            ahead = previous[1] != last
            self._ends[ino] = (end, last)
        else:
            ahead = False
            self._ends[ino] = (end, -1)
        if len(self._ends) > _CHUNK_LISTS:
            self._ends.popitem(last=False)
        return ahead

    def _read_ahead(self, pieces: list[_Piece], after: int, limit: int) -> None:
        """Fetch up to `READAHEAD` bytes of the pieces from index *after* in
        the background, stopping at the file's end (*limit*)."""
        assert self._nursery is not None
        wanted = []
        total = 0
        for p in itertools.islice(pieces, after, None):
            if total >= READAHEAD or p.start >= limit:
                break
            total += p.size
            if p.key not in self._flights and not self.cache.holds(self.layer, p.key):
                wanted.append(p)
        if wanted:
            # Claimed now, not when the task first runs: the reads that
            # follow (memory hits that never yield) must see them in flight.
            self._claim(wanted)
            try:
                self._nursery.start_soon(self._prefetch, wanted)
            except BaseException:
                self._settle(wanted, {})
                raise

    async def _prefetch(self, pieces: list[_Piece]) -> None:
        """Read-ahead's task, leading *pieces*' flights: errors are for the
        reads waiting on them to report."""
        try:
            await self._lead(pieces, {})
        except CkfsError as e:
            log.debug("layer %s: read-ahead failed: %s", self.layer, e)

    def _chunk_pieces(self, node: Node) -> list[_Piece]:
        found = self._chunk_lists.get(node.ino)
        if found is not None:
            self._chunk_lists.move_to_end(node.ino)
            return found
        chunks = sorted(self.index.chunks(node.ino), key=lambda c: c.file_offset)
        pieces = []
        for i, c in enumerate(chunks):
            comp_end = min(self._chunk_end(c, chunks[i + 1 : i + 2]), self.source.size)
            key = ChunkCache.key("chunk", c.blob_offset, c.inner_offset, c.size, c.digest)
            piece = _Piece(
                key,
                c.file_offset,
                c.size,
                c.blob_offset,
                comp_end,
                c.inner_offset,
                c.digest,
                "member",
            )
            pieces.append(self._checked(piece, node))
        self._chunk_lists[node.ino] = pieces
        if len(self._chunk_lists) > _CHUNK_LISTS:
            self._chunk_lists.popitem(last=False)
        return pieces

    @staticmethod
    def _chunk_end(c: Chunk, following: Sequence[Chunk]) -> int:
        """Where to stop fetching chunk *c*: its member's end if the index
        knows it, else the next chunk's member start, within a bound.

        The bound (`_deflate_bound`) keeps a hostile index from making one
        small read fetch the rest of the blob; a member that needs more than
        it is fetched again, longer (`LayerReader._fetch_longer`).
        """
        bound = c.blob_offset + _deflate_bound(c.inner_offset + c.size)
        if c.comp_size > 0:
            return min(c.blob_offset + c.comp_size, bound)
        if following and following[0].blob_offset > c.blob_offset:
            return min(following[0].blob_offset, bound)
        return bound

    def _span_pieces(self) -> list[_Piece]:
        if self._spans is None:
            spans = sorted(self.index.spans(), key=lambda s: s.uncomp_offset)
            pieces = []
            kind = "gzip" if self.index.source == "gzip-index" else "raw"
            for s in spans:
                if kind == "raw" and (
                    s.comp_offset != s.uncomp_offset or s.comp_size != s.uncomp_size
                ):
                    raise DataLoss(f"layer {self.layer}: tar span at {s.comp_offset} is not 1:1")
                key = ChunkCache.key(kind, s.uncomp_offset, s.uncomp_size, s.comp_offset, s.sha256)
                end = s.comp_offset + s.comp_size
                digest = f"sha256:{s.sha256}"
                piece = _Piece(
                    key, s.uncomp_offset, s.uncomp_size, s.comp_offset, end, 0, digest, kind
                )
                pieces.append(self._checked(piece, None))
            self._spans = pieces
        return self._spans

    def _checked(self, p: _Piece, node: Node | None) -> _Piece:
        """*p*, unless it lies outside the blob, is empty, or is too large to
        inflate.

        Raises:
            DataLoss: so that reads of the file (or layer) fail, not the server.
        """
        if not (0 <= p.comp_offset < p.comp_end <= self.source.size) or not (
            p.size > 0 and p.inner >= 0 and p.inner + p.size <= MAX_PIECE
        ):
            where = f"inode {node.ino}" if node else "the layer's spans"
            raise DataLoss(
                f"layer {self.layer}: {where} names {p.size} bytes (+{p.inner}) at blob offset "
                f"{p.comp_offset}, outside the {self.source.size}-byte blob, empty or too large"
            )
        return p

    # -- getting them ------------------------------------------------------

    async def _get(self, pieces: list[_Piece]) -> dict[str, bytes]:
        """Every piece's verified bytes: from memory, disk cache, or the blob."""
        datas: dict[str, bytes] = {}
        for p in pieces:
            data = self.cache.peek(self.layer, p.key)
            if data is not None:
                datas[p.key] = data
        self._stats["hits"] += len(datas)
        missing = [p for p in pieces if p.key not in datas]
        while missing:
            missing = await self._load_or_join(missing, datas)
        return datas

    def _from_disk(self, pieces: list[_Piece]) -> dict[str, bytes]:
        found = {}
        for p in pieces:
            data = self.cache.get(self.layer, p.key)
            if data is not None:
                found[p.key] = data
        return found

    async def _load_or_join(self, pieces: list[_Piece], datas: dict[str, bytes]) -> list[_Piece]:
        """Load the pieces nobody is loading (disk cache, else the blob);
        wait for the others.

        Returns:
            The pieces still missing: those whose leading read was cancelled.
        """
        unique = list({p.key: p for p in pieces}.values())
        mine = [p for p in unique if p.key not in self._flights]
        others = [(p, self._flights[p.key]) for p in unique if p.key in self._flights]
        self._claim(mine)
        await self._lead(mine, datas)
        again = []
        self._stats["joined"] += len(others)
        for p, flight in others:
            await flight.done.wait()
            if flight.data is not None:
                datas[p.key] = flight.data
            elif flight.error is not None:
                raise type(flight.error)(*flight.error.args)
            else:
                again.append(p)
        return again

    def _claim(self, pieces: list[_Piece]) -> None:
        """Open a flight for each of *pieces* (none may be in flight)."""
        for p in pieces:
            self._flights[p.key] = _Flight()

    def _settle(self, pieces: list[_Piece], datas: dict[str, bytes]) -> None:
        """Close *pieces*' flights with what *datas* holds for them."""
        for p in pieces:
            led = self._flights.pop(p.key)
            led.data = datas.get(p.key)
            led.done.set()

    async def _lead(self, pieces: list[_Piece], datas: dict[str, bytes]) -> None:
        """Load claimed *pieces* into *datas*: disk cache, else the blob."""
        try:
            if pieces:
                found = await trio.to_thread.run_sync(self._from_disk, pieces)
                datas.update(found)
                self._stats["hits"] += len(found)
                await self._fetch([p for p in pieces if p.key not in found], datas)
        finally:
            self._settle(pieces, datas)

    async def _fetch(self, pieces: list[_Piece], datas: dict[str, bytes]) -> None:
        """Fetch, verify and cache *pieces*, one request per coalesced group."""
        for group in _coalesce(pieces):
            try:
                got = await self._fetch_group(group)
            except CkfsError as e:
                self._stats["errors"] += 1
                for p in pieces:
                    if p.key not in datas:
                        self._flights[p.key].error = e
                raise
            datas.update(got)
            self._stats["misses"] += len(group)

    async def _fetch_group(self, group: list[_Piece]) -> dict[str, bytes]:
        if group[0].kind == "gzip":
            self._stats["requests"] += 1
            self._stats["fetched_bytes"] += group[-1].comp_end - group[0].comp_offset
            return await trio.to_thread.run_sync(
                self._inflate_and_keep, group, limiter=self._limiter
            )
        start = group[0].comp_offset
        end = max(p.comp_end for p in group)
        data = await self._read_source(start, end)
        got, short = await trio.to_thread.run_sync(
            self._verify_and_keep, group, data, start, limiter=self._limiter
        )
        for p in short:
            got.update(await self._fetch_longer(p))
        return got

    async def _fetch_longer(self, p: _Piece) -> dict[str, bytes]:
        """A chunk whose member runs past its fetched window (rare): fetched
        alone, the window doubled until the chunk inflates whole, or the
        blob or `MAX_PIECE` ends (`DataLoss`)."""
        while True:
            grown = p.comp_offset + 2 * (p.comp_end - p.comp_offset)
            grown = min(grown, self.source.size, p.comp_offset + MAX_PIECE)
            if grown <= p.comp_end:
                raise DataLoss(
                    f"layer {self.layer}: gzip member at blob offset {p.comp_offset} "
                    "ends before its chunk"
                )
            p = replace(p, comp_end=grown)
            raw = await self._read_source(p.comp_offset, p.comp_end)
            got, short = await trio.to_thread.run_sync(
                self._verify_and_keep, [p], raw, p.comp_offset, limiter=self._limiter
            )
            if not short:
                return got

    def _inflate_and_keep(self, group: list[_Piece]) -> dict[str, bytes]:
        """In a worker thread: a gzip-index layer's spans, inflated from the
        local blob at their checkpoints, then cached.

        The blob was verified against its digest when it entered the content
        store and the checkpoints are checked against the index
        (`ckfs.layerindex.gzindex.open_inflater`); what comes out is what
        the verified blob holds.
        """
        start = group[0].start
        end = group[-1].start + group[-1].size
        data = self._open_inflater().read(start, end - start)
        if len(data) != end - start:
            raise DataLoss(f"layer {self.layer}: gzip stream ends before {end}")
        out = {p.key: data[p.start - start : p.start - start + p.size] for p in group}
        self._keep(group, out)
        return out

    def _open_inflater(self) -> Inflater:
        from ckfs.layerindex.gzindex import open_inflater

        with self._inflater_lock:
            if self._inflater is None:
                assert isinstance(self.source, LocalBlob)
                self._inflater = open_inflater(self.index, self.source.path)
            return self._inflater

    def close(self) -> None:
        """Release what the reader holds open (a gzip layer's inflater);
        blocking, but brief. Reads after this reopen it."""
        with self._inflater_lock:
            if self._inflater is not None:
                self._inflater.close()
                self._inflater = None

    async def _read_source(self, start: int, end: int) -> bytes:
        self._stats["requests"] += 1
        data = await self.source.read_range(start, end - start)
        self._stats["fetched_bytes"] += len(data)
        if len(data) != end - start:
            raise DataLoss(
                f"layer {self.layer}: blob source gave {len(data)} bytes at {start}, "
                f"asked {end - start}"
            )
        return data

    def _verify_and_keep(
        self, group: list[_Piece], data: bytes, start: int
    ) -> tuple[dict[str, bytes], list[_Piece]]:
        """In a worker thread: each piece's bytes, verified, then cached.

        Returns:
            The verified pieces' bytes, and the chunks whose gzip member
            needs more bytes than *data* holds.

        Raises:
            DataLoss: a piece does not match its digest (nothing of the group
                is cached then: it came from one response).
        """
        out = {}
        short = []
        for p in group:
            raw = memoryview(data)[p.comp_offset - start : p.comp_end - start]
            try:
                out[p.key] = _inflate(p, raw, self.layer) if p.kind == "member" else bytes(raw)
            except _Short:
                short.append(p)
                continue
            _verify(p, out[p.key], self.layer)
        self._keep([p for p in group if p.key in out], out)
        return out, short

    def _keep(self, group: list[_Piece], out: dict[str, bytes]) -> None:
        """Cache verified pieces; a failed write (disk full) fails no read."""
        for p in group:
            try:
                self.cache.put(self.layer, p.key, out[p.key])
            except OSError as e:
                log.warning("layer %s: chunk cache write failed: %s", self.layer, e)


def _check_range(offset: int, length: int, size: int, source: object) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidArgument(f"{source!r}: range {offset}+{length} outside its {size} bytes")


def _deflate_bound(n: int) -> int:
    """Compressed bytes enough for a gzip member's first *n* output bytes."""
    return n + 5 * (n // _STORED_BLOCK + 1) + _GZIP_SLACK


def _coalesce(pieces: list[_Piece]) -> list[list[_Piece]]:
    """Pieces grouped into ranged requests: neighbours in the blob together."""
    groups: list[list[_Piece]] = []
    end = -1
    for p in sorted(pieces, key=lambda p: p.comp_offset):
        if (
            groups
            and p.comp_offset - end <= COALESCE_GAP
            and max(end, p.comp_end) - groups[-1][0].comp_offset <= MAX_REQUEST
        ):
            groups[-1].append(p)
            end = max(end, p.comp_end)
        else:
            groups.append([p])
            end = p.comp_end
    return groups


def _inflate(p: _Piece, raw: memoryview, layer: Digest) -> bytes:
    """The chunk's bytes out of the gzip member starting *raw*."""
    want = p.inner + p.size
    inflater = isal_zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(raw, want)
    except _INFLATE_ERROR as e:
        raise DataLoss(
            f"layer {layer}: gzip member at blob offset {p.comp_offset} does not inflate: {e}"
        ) from None
    if len(out) < want:
        if inflater.eof:
            raise DataLoss(
                f"layer {layer}: gzip member at blob offset {p.comp_offset} holds "
                f"{len(out)} bytes, its chunk needs {want}"
            )
        raise _Short
    return out if p.inner == 0 else out[p.inner :]


def _verify(p: _Piece, data: bytes, layer: Digest) -> None:
    alg, _, expected = p.digest.partition(":")
    if alg not in ("sha256", "sha512") or not expected:
        raise DataLoss(f"layer {layer}: piece at blob offset {p.comp_offset} has no digest")
    if hashlib.new(alg, data).hexdigest() != expected:
        raise DataLoss(
            f"layer {layer}: bytes at blob offset {p.comp_offset} do not match {p.digest}"
        )


def _assemble(pieces: list[_Piece], datas: dict[str, bytes], start: int, end: int) -> bytes:
    """Bytes *start*..*end* cut from the pieces that hold them."""
    if len(pieces) == 1:
        p = pieces[0]
        if start == p.start and end == p.start + p.size:
            return datas[p.key]
        return datas[p.key][start - p.start : end - p.start]
    out = bytearray()
    for p in pieces:
        out += memoryview(datas[p.key])[max(start - p.start, 0) : min(end - p.start, p.size)]
    return bytes(out)
