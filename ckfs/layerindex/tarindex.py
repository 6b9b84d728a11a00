"""Index an uncompressed tar layer in one pass over its bytes.

An uncompressed layer needs no seek index: a file's bytes sit at a fixed
offset of the blob, so the index records each file's data offset and a read
is one Range request. Those bytes cannot be checked against the blob digest
(only the whole blob can), so the pass also cuts the blob into `SPAN`-sized
spans and keeps each one's sha256: a reader fetches whole spans and checks
them before serving a byte. The blob digest itself is checked at the end of
the pass; a mismatch keeps nothing.

`add_members` (the tar entries of a stream into a writer) is shared with
the gzip source, which reads the same tar from an inflated stream.

Only `tarfile`'s header parsing is used (through `ckfs.archive.tarstream`),
never its extraction.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import AsyncIterable, Callable, Mapping
from pathlib import Path
from typing import Protocol

import trio

from ckfs.archive.entry import BadEntry, Kind, SkipEntry, from_tarinfo
from ckfs.archive.tarstream import TarStream
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import DataLoss, InvalidArgument, unwrap_groups
from ckfs.layerindex.model import LIMITS, BadLayer, IndexWriter, LayerIndex, Limits, Span

__all__ = ["SPAN", "add_members", "build_tar_index", "index_tar", "index_tar_stream"]

log = logging.getLogger(__name__)

#: Bytes per verified span: one Range request fetches and checks a whole
#: span, so this is the smallest read from the registry. 1 MiB keeps a
#: small file's read cheap and the span table small (1,000 rows per GiB).
SPAN = 1 << 20

#: Chunks of an async stream queued for the indexing thread: enough to keep
#: it busy while the next chunk arrives, bounded so memory is too.
_QUEUE = 16


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Spans:
    """A reader that cuts what passes through it into hashed `Span` s."""

    def __init__(self, source: Readable, emit: Callable[[Span], None], span: int) -> None:
        self._source = source
        self._emit = emit
        self._span = span
        self._start = 0
        self._filled = 0
        self._hash = hashlib.sha256()

    def read(self, n: int = -1, /) -> bytes:
        data = self._source.read(n)
        view = memoryview(data)
        while view:
            take = min(len(view), self._span - self._filled)
            self._hash.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self._span:
                self.flush()
        return data

    def flush(self) -> None:
        """Emit the span in progress, if it holds anything (at the end)."""
        if self._filled:
            self._emit(
                Span(self._start, self._filled, self._start, self._filled, self._hash.hexdigest())
            )
            self._start += self._filled
            self._filled = 0
            self._hash = hashlib.sha256()


def add_members(stream: TarStream, writer: IndexWriter) -> None:
    """Add every entry of *stream* to *writer*, files with their data offsets.

    Entries are interpreted by `ckfs.archive.entry.from_tarinfo`, the rules
    the eager applier uses too; what it skips is skipped here, with a
    warning.

    Raises:
        BadLayer: a hostile entry, or a tree the index refuses.
        InvalidArgument: the stream is not a tar, or is damaged.
    """
    what = writer.what
    for member in stream.members():
        try:
            entry = from_tarinfo(member, what=what)
        except SkipEntry as e:
            log.warning("%s: entry %r skipped: %s", what, member.name, e)
            continue
        except BadEntry as e:
            raise BadLayer(str(e)) from None
        writer.add(entry, data=member.offset_data if entry.kind == Kind.FILE else -1)


def build_tar_index(source: Readable, writer: IndexWriter, *, span: int = SPAN) -> LayerIndex:
    """Index the uncompressed tar layer read from *source*; blocking.

    *writer* names the layer (its digest and size, which the stream must
    match) and is committed on success, aborted on any failure.

    Raises:
        BadLayer: see `add_members`.
        InvalidArgument: not a tar, or a damaged one.
        DataLoss: the bytes do not match the layer's digest or size.
    """
    try:
        spans = _Spans(source, writer.add_span, span)
        stream = TarStream(spans, writer.layer.algorithm, what=writer.what)
        add_members(stream, writer)
        stream.drain()
        spans.flush()
        _check_blob(writer, stream.size, stream.digest())
        writer.set_meta("diff_id", str(writer.layer))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def index_tar(
    blob: Path,
    desc: Descriptor,
    path: Path,
    *,
    meta: Mapping[str, str] | None = None,
    limits: Limits = LIMITS,
) -> LayerIndex:
    """Index the uncompressed layer *desc* from its local *blob* into *path*; blocking.

    Raises:
        BadLayer, InvalidArgument, DataLoss: see `build_tar_index`.
    """
    writer = IndexWriter.for_layer(path, desc, source="tar", meta=meta, limits=limits)
    with writer, open(blob, "rb") as f:
        return build_tar_index(f, writer)


def _check_blob(writer: IndexWriter, size: int, digest: Digest) -> None:
    if size != writer.blob_size:
        raise DataLoss(f"{writer.what}: {size} bytes, expected {writer.blob_size}")
    if digest != writer.layer:
        raise DataLoss(f"{writer.what}: content has digest {digest}")


class _ChannelReader:
    """A blocking reader, in a trio worker thread, of chunks sent by the loop."""

    def __init__(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._receive = receive
        self._buf = memoryview(b"")
        self.failed = False

    def read(self, n: int = -1, /) -> bytes:
        while not self._buf:
            try:
                self._buf = memoryview(trio.from_thread.run(self._receive.receive))
            except trio.EndOfChannel:
                if self.failed:
                    # The feeding task's own error is what the caller sees.
                    raise InvalidArgument("layer stream broke off") from None
                return b""
        if n < 0:
            n = len(self._buf)
        data, self._buf = self._buf[:n], self._buf[n:]
        return bytes(data)


async def index_tar_stream(
    chunks: AsyncIterable[bytes],
    desc: Descriptor,
    path: Path,
    *,
    meta: Mapping[str, str] | None = None,
    limits: Limits = LIMITS,
    span: int = SPAN,
) -> LayerIndex:
    """`index_tar` fed by an async byte stream (the blob as it is fetched).

    The parse runs in a worker thread; the stream is read on the loop, at
    most a few chunks ahead.

    Cancellation: the worker thread finishes its current chunk and the
    writer is aborted.
    """
    writer = IndexWriter.for_layer(path, desc, source="tar", meta=meta, limits=limits)
    send, receive = trio.open_memory_channel[bytes](_QUEUE)
    reader = _ChannelReader(receive)

    async def feed() -> None:
        async with send:
            try:
                async for chunk in chunks:
                    if chunk:
                        await send.send(chunk)
            except BaseException:
                reader.failed = True
                raise

    with unwrap_groups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            try:
                build = functools.partial(build_tar_index, reader, writer, span=span)
                return await trio.to_thread.run_sync(build)
            finally:
                nursery.cancel_scope.cancel()
