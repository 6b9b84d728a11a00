"""Plain gzip layers served lazily: a seek index over the local blob.

Most layers are plain gzip, which cannot be read at an offset without
inflating everything before it. One pass over the blob with `indexed_gzip`
(zran) records a checkpoint every `SPACING` bytes of output (wider past
`MAX_CHECKPOINTS`): the compressed offset, its bit offset and the 32 KiB
window inflating resumes from. A read then inflates from the nearest
checkpoint only, at most one spacing before what it wants. The tar entries
are read out of the inflated stream (`ckfs.layerindex.tarindex.add_members`),
so a file's `Node.data` is its offset in the uncompressed stream.

The checkpoints are exported in indexed_gzip's own GZIDX format to
``index.gzidx`` beside ``index.db`` (written first, so an index.db never
lacks its checkpoints), with its sha256 in the index meta
(``gzidx_sha256``): a damaged file is refused at open, never used to
inflate. The spans of the index are the compressed ranges between
checkpoints, with the sha256 of each, so that a later issue can publish
the index and let other machines fetch and check one span at a time.

indexed_gzip against rapidgzip 0.16.2, measured on a 59 MB layer (70 MB
tar, 2,552 entries) on this two-core machine: one rapidgzip pass giving
both the tar stream and the checkpoints (exported in indexed_gzip's
format, which indexed_gzip imports and reads correctly) took 0.31 s of
CPU for the whole index against 0.43 s for these two passes, and random
4 KiB reads cost the same. It is not used: rapidgzip decodes each chunk
(4 MiB of compressed input) whole into memory, with no bound its Python
API can set, so a gzip bomb (9 MB inflating to 2 GiB of zeros) took it
to 1.7 GiB RSS where isal and zran stay under 20 MB; it also ends a
truncated stream quietly. A layer is as hostile as a tar.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from ckfs.archive.compression import open_layer
from ckfs.archive.tarstream import TarStream
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, Digester
from ckfs.errors import DataLoss, InvalidArgument
from ckfs.layerindex.model import LIMITS, IndexWriter, LayerIndex, Limits, Span, scratch
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
    verified: bool = False,
) -> LayerIndex:
    """Index the gzip layer in the local file *blob*; blocking.

    Inflating passes record the checkpoints and read the tar entries (see
    `_inflate`); one more read of the compressed file hashes the spans and
    the blob (its size only when *verified*: the content store checked its
    digest when it was committed).
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
    """
    tmp = scratch(gzidx, "tmp")
    try:
        points = _inflate(blob, writer, tmp, diff_id)
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
        stream = TarStream(tar, diff_id.algorithm if diff_id else "sha256", what=writer.what)
        add_members(stream, writer)
        stream.drain()
    got = stream.digest()
    if diff_id is not None and got != diff_id:
        raise DataLoss(f"{writer.what}: uncompressed digest {got}, not {diff_id}")
    spacing = max(SPACING, -(-stream.size // MAX_CHECKPOINTS))
    with _open(spacing, filename=str(blob), drop_handles=False) as gz:
        try:
            # Seeking to the end builds the index as ``build_full_index``
            # does, but releases the GIL, which that holds throughout (0.13 s
            # per 59 MB layer in which no other thread of the process runs:
            # other layers' tar parsing, ckfsd's event loop); zran reads the
            # file itself, not through Python.
            gz.seek(stream.size)
            usize = int(gz.seek(0, io.SEEK_END))
        except (OSError, ValueError) as e:
            # A damaged deflate stream (zran's errors reach io.BufferedReader
            # as negative lengths: OSError), or one that ends before the end
            # the tar pass found (NotCoveredError: ValueError). The tar pass
            # has checked CRC and size already.
            raise InvalidArgument(f"{writer.what}: not a whole gzip stream: {e}") from None
        with open(gzidx, "wb") as f:
            gz.export_index(fileobj=f)
            f.flush()
            os.fsync(f.fileno())
        points = [(int(u), int(c)) for u, c in gz.seek_points()]
    if stream.size != usize:
        raise DataLoss(f"{writer.what}: inflates to {stream.size} bytes and to {usize}")
    writer.set_meta("diff_id", str(got))
    writer.set_meta("uncompressed_size", str(usize))
    writer.set_meta("spacing", str(spacing))
    return _boundaries(points, usize, writer.blob_size)


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
    writer = IndexWriter.for_layer(path, desc, source="gzip-index", meta=meta, limits=limits)
    gzidx = gzidx or path.with_name(GZIDX_NAME)
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
