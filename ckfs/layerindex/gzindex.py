"""Plain gzip layers served lazily: a seek index over the local blob.

Most layers are plain gzip, which cannot be read at an offset without
inflating everything before it. One pass over the blob with `rapidgzip`
records a checkpoint about every `SPACING` bytes of output: the compressed
offset, its bit offset and the 32 KiB window inflating resumes from; the
tar entries are read out of the same inflated stream
(`ckfs.layerindex.tarindex.add_members`), so a file's `Node.data` is its
offset in the uncompressed stream. Streams that pass leaves alone (see
`_inflate_once`) are indexed in two: zlib-strict for the tar, then
`indexed_gzip` (zran) for checkpoints every `SPACING` bytes (wider past
`MAX_CHECKPOINTS`). Either way a read inflates, with `indexed_gzip`, from
the nearest checkpoint only, about one spacing before what it wants.

The checkpoints are exported in indexed_gzip's own GZIDX format to
``index.gzidx`` beside ``index.db`` (written first, so an index.db never
lacks its checkpoints), with its sha256 in the index meta
(``gzidx_sha256``): a damaged file is refused at open, never used to
inflate. The spans of the index are the compressed ranges between
checkpoints, with the sha256 of each, so that a later issue can publish
the index and let other machines fetch and check one span at a time.

Both write the same file: rapidgzip exports its checkpoints in
indexed_gzip's GZIDX format (zlib's zran, documented and stable, which a
published index needs), and readers import it with indexed_gzip alone. On
a 59 MB layer (70 MB tar, 2,552 entries; two cores, loaded) the whole
index took 0.31 s of CPU in one pass against 0.43 s in two (isal's tar
pass 0.10 s plus zran's 0.17 s became rapidgzip's 0.15 s, on two cores);
random 4 KiB reads cost the same (5.9 against 7.6 ms median on a 74 MB
layer, both inflating about 2 MiB on average).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from ckfs.archive.compression import open_layer
from ckfs.archive.tarstream import TarStream
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, Digester
from ckfs.errors import DataLoss, InvalidArgument
from ckfs.layerindex.model import LIMITS, BadLayer, IndexWriter, LayerIndex, Limits, Span, scratch
from ckfs.layerindex.store import GZIDX_NAME
from ckfs.layerindex.tarindex import add_members

__all__ = [
    "MAX_CHECKPOINTS",
    "SPACING",
    "Inflater",
    "build_gzip_index",
    "index_gzip",
    "open_inflater",
]

log = logging.getLogger(__name__)

#: Uncompressed bytes between checkpoints: the most a read inflates before
#: the bytes it wants (~15 ms at zlib's speed here), against one 32 KiB
#: window kept per checkpoint (0.8 % of the layer's size, on disk and in
#: the memory of a process serving it).
SPACING = 4 << 20

#: Most checkpoints one layer gets: zran holds every window in memory,
#: while building and in a process serving the layer, so a layer bigger
#: than 8 GiB (or a gzip bomb) gets wider spacing rather than more memory
#: (at most 64 MiB of windows).
MAX_CHECKPOINTS = 2048

#: Bytes of history kept per checkpoint: deflate's whole window, so any
#: checkpoint can resume inflating.
WINDOW = 32 << 10

#: Compressed bytes read per refill, and the buffered reader over the
#: inflated stream: reads are small (a page cache miss of a FUSE read),
#: bigger buffers only inflate bytes nobody asked for.
READBUF = 64 << 10
BUFFER = 64 << 10

#: Compressed bytes hashed per read when hashing spans.
_CHUNK = 1 << 20

#: Cores one layer's rapidgzip pass inflates on: layers are indexed a few
#: at once, and past two cores per layer the tar parsing thread is what
#: waits (measured on this two-core machine: a 59 MB layer in 0.10 s).
_THREADS = min(2, os.cpu_count() or 1)

#: A gzip member's trailer: CRC-32 and size, 4 bytes each.
_TRAILER = 8


def _open(spacing: int = SPACING, **kw: Any) -> Any:
    # Imported here: indexed_gzip is a compiled extension only the gzip
    # path needs.
    from indexed_gzip import IndexedGzipFile

    return IndexedGzipFile(
        spacing=spacing,
        window_size=WINDOW,
        readbuf_size=READBUF,
        buffer_size=BUFFER,
        **kw,
    )


def build_gzip_index(
    blob: Path,
    writer: IndexWriter,
    gzidx: Path,
    *,
    diff_id: Digest | None = None,
    one_pass: bool = False,
    verified: bool = False,
) -> LayerIndex:
    """Index the gzip layer in the local file *blob*; blocking.

    Inflating passes record the checkpoints and read the tar entries (see
    `_inflate`, or `_inflate_once` with *one_pass*); one more read of the
    compressed file hashes the spans and the blob (its size only when
    *verified*: the content store checked its digest when it was committed).
    *writer* is committed on success and aborted on any failure.

    Args:
        blob: the compressed layer, as the content store keeps it.
        writer: names the layer (digest and size, which *blob* must match).
        gzidx: where the checkpoints go (`GZIDX_NAME` beside the index).
        diff_id: when given, the uncompressed stream must have this digest.

    Raises:
        BadLayer: see `ckfs.layerindex.tarindex.add_members`.
        InvalidArgument: not gzip, not a tar, or damaged.
        DataLoss: *blob* does not match the layer's digest or size, or the
            tar stream does not match *diff_id*.
        _TwoPasses: with *one_pass*, a stream that pass does not take.
    """
    tmp = scratch(gzidx, "tmp")
    try:
        points = (_inflate_once if one_pass else _inflate)(blob, writer, tmp, diff_id)
        _add_spans(blob, writer, points, verified=verified)
        writer.set_meta("gzidx_sha256", _sha256(tmp))
        os.replace(tmp, gzidx)
        return writer.commit()
    except BaseException:
        writer.abort()
        tmp.unlink(missing_ok=True)
        raise


def _inflate(
    blob: Path, writer: IndexWriter, gzidx: Path, diff_id: Digest | None
) -> list[tuple[int, int]]:
    """Record the entries in *writer* and the checkpoints in *gzidx*; span bounds.

    Two inflating passes over the local file, both at zlib's speed or
    better: the eager path's isal reader for the tar (first: a refused
    layer fails fast, and the size it finds sets the spacing), then zran's
    own (``build_full_index``) for the checkpoints. Reading the tar out of
    `indexed_gzip` instead would be one pass, but its reads restart from
    the last checkpoint on every call: 3.4x slower than zlib with 1 MiB
    reads, 35x with 64 KiB ones (measured on a 91 MB layer).
    """
    with open(blob, "rb") as raw, open_layer(raw) as tar:
        stream = _read_tar(tar, writer, diff_id)
    got = _check_diff_id(stream, writer, diff_id)
    spacing = max(SPACING, -(-stream.size // MAX_CHECKPOINTS))
    with open(blob, "rb") as raw, _open(spacing, fileobj=raw) as gz:
        try:
            gz.build_full_index()
            usize = int(gz.seek(0, io.SEEK_END))
        except OSError as e:
            # A damaged deflate stream, a bad CRC or size (zran's errors
            # reach io.BufferedReader as negative lengths: OSError).
            raise InvalidArgument(f"{writer.what}: not a whole gzip stream: {e}") from None
        _write_synced(gzidx, lambda f: gz.export_index(fileobj=f))
        points = [(int(u), int(c)) for u, c in gz.seek_points()]
    if stream.size != usize:
        raise DataLoss(f"{writer.what}: inflates to {stream.size} bytes and to {usize}")
    return _finish(writer, got, usize, spacing, points)


class _TwoPasses(Exception):
    """A stream `_inflate_once` leaves to `_inflate`, which decides (the reason)."""


def _inflate_once(
    blob: Path, writer: IndexWriter, gzidx: Path, diff_id: Digest | None
) -> list[tuple[int, int]]:
    """`_inflate` in one pass: rapidgzip inflates (on up to `_THREADS` cores)
    the stream the tar entries are read from, recording its checkpoints as
    it goes, and exports them in indexed_gzip's GZIDX format.

    A third less CPU than indexed_gzip's pass alone (which comes on top of
    the tar's), and it needs no GIL. But rapidgzip ends a truncated stream
    quietly, accepts no trailing zeros and needs 32 KiB of output for a
    window, so anything but a whole single-member stream (its size in the
    gzip trailer, under `MAX_CHECKPOINTS` checkpoints of `SPACING`) goes
    to `_inflate` (`_TwoPasses`), as does every error but a refused tree,
    so that zlib's verdict and message stand. A crafted stream can still
    make a truncated one look whole (its last eight bytes equal to the
    trailer of what came before): the index then serves the bytes the
    diff ID names, and the eager path refuses the layer.
    """
    import rapidgzip

    try:
        with rapidgzip.RapidgzipFile(str(blob), parallelization=_THREADS, chunk_size=SPACING) as gz:
            stream = _read_tar(_Bounded(gz, SPACING * MAX_CHECKPOINTS), writer, diff_id)
            _check_trailer(blob, stream.size)
            _write_synced(gzidx, lambda f: gz.export_index(f, rapidgzip.IndexFormat.INDEXED_GZIP))
    except BadLayer:
        raise
    except (InvalidArgument, ValueError, RuntimeError, OSError) as e:
        raise _TwoPasses(f"one pass refused it ({e})") from None
    got = _check_diff_id(stream, writer, diff_id)
    points = _points(blob, gzidx, stream.size, writer.what)
    return _finish(writer, got, stream.size, SPACING, points)


class _Bounded:
    """rapidgzip's stream, up to *limit* bytes (its windows are held in memory)."""

    def __init__(self, gz: Any, limit: int) -> None:
        self._gz, self._limit, self.n = gz, limit, 0

    def readinto(self, b: Any) -> int:
        n = int(self._gz.readinto(b))
        self.n += n
        if self.n > self._limit:
            raise _TwoPasses(f"inflates to more than {self._limit} bytes")
        return n

    def read(self, n: int = -1, /) -> bytes:
        buf = bytearray(n if n >= 0 else _CHUNK)
        return bytes(buf[: self.readinto(buf)])


def _check_trailer(blob: Path, usize: int) -> None:
    """The gzip trailer's size (of the last member) is that of the whole stream."""
    with open(blob, "rb") as f:
        f.seek(0, io.SEEK_END)
        if f.tell() < _TRAILER:
            raise _TwoPasses("shorter than a gzip trailer")
        f.seek(-4, io.SEEK_END)
        size = int.from_bytes(f.read(4), "little")
    if size != usize & 0xFFFFFFFF:
        raise _TwoPasses(f"trailer size {size} is not that of the {usize} bytes inflated")


def _points(blob: Path, gzidx: Path, usize: int, what: str) -> list[tuple[int, int]]:
    """The checkpoints of *gzidx*, as the readers' indexed_gzip imports them."""
    with _open(filename=str(blob)) as gz:
        try:
            with open(gzidx, "rb") as f:
                gz.import_index(fileobj=f)
            end = int(gz.seek(0, io.SEEK_END))
        except (OSError, ValueError) as e:
            raise _TwoPasses(f"its checkpoints do not import ({e})") from None
        points = [(int(u), int(c)) for u, c in gz.seek_points()]
    if end != usize or len(points) > MAX_CHECKPOINTS + 2:
        raise _TwoPasses(f"{len(points)} checkpoints over {end} bytes, not {usize}")
    return points


def _read_tar(source: Any, writer: IndexWriter, diff_id: Digest | None) -> TarStream:
    """Add the entries of the tar stream *source* to *writer*; the stream, drained."""
    stream = TarStream(source, diff_id.algorithm if diff_id else "sha256", what=writer.what)
    add_members(stream, writer)
    stream.drain()
    return stream


def _check_diff_id(stream: TarStream, writer: IndexWriter, diff_id: Digest | None) -> Digest:
    got = stream.digest()
    if diff_id is not None and got != diff_id:
        raise DataLoss(f"{writer.what}: uncompressed digest {got}, not {diff_id}")
    return got


def _finish(
    writer: IndexWriter, got: Digest, usize: int, spacing: int, points: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Record the stream's meta; the span bounds of *points*."""
    writer.set_meta("diff_id", str(got))
    writer.set_meta("uncompressed_size", str(usize))
    writer.set_meta("spacing", str(spacing))
    return _boundaries(points, usize, writer.blob_size)


def _write_synced(path: Path, export: Callable[[BinaryIO], object]) -> None:
    with open(path, "wb") as f:
        export(f)
        f.flush()
        os.fsync(f.fileno())


def _boundaries(points: list[tuple[int, int]], usize: int, csize: int) -> list[tuple[int, int]]:
    """Span boundaries: (0, 0), each checkpoint inside the stream, (usize, csize).

    The first checkpoint sits after the gzip header and the last may sit at
    the end; spans tile both the blob and the stream from 0 to the end.
    """
    inner = [(u, c) for u, c in points if 0 < u < usize and 0 < c < csize]
    return [(0, 0), *inner, (usize, csize)]


def _add_spans(
    blob: Path, writer: IndexWriter, bounds: list[tuple[int, int]], *, verified: bool = False
) -> None:
    """Hash the compressed range of each span, and unless *verified* the blob as a whole."""
    whole = None if verified else Digester(writer.layer.algorithm)
    total = 0
    with open(blob, "rb") as f:
        for (u0, c0), (u1, c1) in itertools.pairwise(bounds):
            h = hashlib.sha256()
            left = c1 - c0
            while left > 0:
                data = f.read(min(_CHUNK, left))
                if not data:
                    break
                h.update(data)
                if whole is not None:
                    whole.update(data)
                left -= len(data)
                total += len(data)
            if u1 > u0:
                writer.add_span(Span(c0, c1 - c0, u0, u1 - u0, h.hexdigest()))
        while data := f.read(_CHUNK):
            if whole is not None:
                whole.update(data)
            total += len(data)
    if total != writer.blob_size:
        raise DataLoss(f"{writer.what}: {total} bytes, expected {writer.blob_size}")
    if whole is not None and whole.digest() != writer.layer:
        raise DataLoss(f"{writer.what}: content has digest {whole.digest()}")


def index_gzip(
    blob: Path,
    desc: Descriptor,
    path: Path,
    gzidx: Path | None = None,
    *,
    meta: Mapping[str, str] | None = None,
    limits: Limits = LIMITS,
    diff_id: Digest | None = None,
    verified: bool = False,
) -> LayerIndex:
    """Index the gzip layer *desc* from its local *blob* into *path*; blocking.

    The checkpoints go to *gzidx*, by default `GZIDX_NAME` beside *path*
    (where `open_inflater` looks). A *verified* blob (the content store's,
    whose digest was checked when it was committed) is not hashed whole
    again: 0.04 s of CPU per 59 MB layer.

    Raises:
        BadLayer, InvalidArgument, DataLoss: see `build_gzip_index`.
    """
    gzidx = gzidx or path.with_name(GZIDX_NAME)
    writer = IndexWriter.for_layer(path, desc, source="gzip-index", meta=meta, limits=limits)
    with writer:
        try:
            return build_gzip_index(
                blob, writer, gzidx, diff_id=diff_id, one_pass=True, verified=verified
            )
        except _TwoPasses as e:
            log.info("%s: %s; indexing it in two passes", writer.what, e)
    writer = IndexWriter.for_layer(path, desc, source="gzip-index", meta=meta, limits=limits)
    with writer:
        return build_gzip_index(blob, writer, gzidx, diff_id=diff_id, verified=verified)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(_CHUNK):
            h.update(data)
    return h.hexdigest()


class Inflater:
    """Reads of a gzip layer's uncompressed stream at any offset.

    Blocking (callers use ``trio.to_thread``) and safe across threads: one
    lock serializes seeks and reads of the one zran state. Keeps the blob
    open and the checkpoints' windows in memory (0.8 % of the layer's
    uncompressed size); close it when the layer goes idle.
    """

    def __init__(self, gz: Any, size: int, what: str) -> None:
        self._gz = gz
        self._lock = threading.Lock()
        self.size = size
        self.what = what

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of the tar stream, fewer at its end.

        Raises:
            InvalidArgument: a negative offset or size.
            DataLoss: the local blob no longer inflates (damaged on disk).
        """
        if offset < 0 or size < 0:
            raise InvalidArgument(f"{self.what}: read of {size} bytes at {offset}")
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        from indexed_gzip import NotCoveredError

        with self._lock:
            try:
                data: bytes = self._gz.pread(size, offset)
            except (OSError, NotCoveredError) as e:
                raise DataLoss(f"{self.what}: inflating at {offset}: {e}") from None
        if len(data) != size:
            raise DataLoss(f"{self.what}: {len(data)} bytes inflated at {offset}, not {size}")
        return data

    def close(self) -> None:
        with self._lock:
            self._gz.close()

    def __enter__(self) -> Inflater:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_inflater(index: LayerIndex, blob: Path, gzidx: Path | None = None) -> Inflater:
    """An `Inflater` over *blob* for the gzip-indexed layer *index*; blocking.

    Args:
        index: the layer's index (source ``gzip-index``).
        blob: the compressed layer.
        gzidx: its checkpoints; by default `GZIDX_NAME` beside the index.

    Raises:
        InvalidArgument: the index is not a gzip index.
        DataLoss: the checkpoint file is missing, or not the one the index
            was built with.
    """
    what = f"layer {index.layer}"
    if index.source != "gzip-index":
        raise InvalidArgument(f"{what}: a {index.source} index has no gzip checkpoints")
    gzidx = gzidx or index.path.with_name(GZIDX_NAME)
    try:
        data = gzidx.read_bytes()
    except FileNotFoundError:
        raise DataLoss(f"{what}: checkpoints {gzidx} missing") from None
    if hashlib.sha256(data).hexdigest() != index.meta("gzidx_sha256"):
        raise DataLoss(f"{what}: checkpoints {gzidx} do not match the index")
    gz = _open(filename=str(blob), drop_handles=False)
    try:
        # From the bytes just checked, not from the path a second time.
        gz.import_index(fileobj=io.BytesIO(data))
    except BaseException:
        gz.close()
        raise
    return Inflater(gz, int(index.meta("uncompressed_size") or 0), what)
