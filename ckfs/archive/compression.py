"""Layer decompression: one readable byte stream whatever the blob's codec.

The codec is read from the blob's first bytes, like containerd's
``DecompressStream``: gzip (``1f 8b``), zstd (``28 b5 2f fd``), anything else
is taken as a plain tar. The media type is a hint checked against the magic;
when they disagree the magic wins (registries and ``docker save`` have long
mislabelled uncompressed layers as gzip) and the mismatch is logged.

Decompression runs on a background thread so that inflating and applying a
layer use two cores (isal, zstandard and hashlib release the GIL). The
returned stream must be read and closed by the thread that opened it:
closing it stops the worker. The blob itself is never closed here; it
belongs to the caller.

zstandard's ``stream_reader`` does not report a stream cut short at or
inside its last frame; it just ends. A cut inside a tar entry is still
caught by the tar reader, and any cut by the diff ID check, which is why
callers should always pass the diff ID they have.
"""

from __future__ import annotations

import gzip
import io
import logging
import queue
import threading
from typing import Any, BinaryIO, cast

import zstandard
from isal import isal_zlib

from ckfs.errors import InvalidArgument
from ckfs.mediatypes import Compression, layer_compression

__all__ = ["BLOCK", "GZIP_MAGIC", "ZSTD_MAGIC", "detect", "open_layer"]

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

#: Unit of decompressed data handed between threads and read from the blob:
#: big enough that per-call overhead and GIL hand-offs vanish, small enough
#: that a couple in flight stay in L2/L3 cache.
BLOCK = 1 << 20

#: Decompressed blocks a worker may run ahead of the reader.
_QUEUE_BLOCKS = 4


def detect(head: bytes) -> Compression:
    """The codec a blob starting with *head* (at least 4 bytes if it has them) uses."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class _Prefixed(io.RawIOBase):
    """Bytes already read from *raw*, then the rest of *raw*."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self._head = memoryview(head)
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        readinto = getattr(self._raw, "readinto", None)
        if readinto is not None:
            return int(readinto(b))
        data = self._raw.read(len(b))
        b[: len(data)] = data
        return len(data)


class _Threaded(io.RawIOBase):
    """Read *source* on a worker thread, *BLOCK* bytes at a time.

    The worker stops when the reader closes the stream; an exception in the
    worker is raised to the reader where the data would have been.
    """

    def __init__(self, source: Any) -> None:
        self._source = source
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(_QUEUE_BLOCKS)
        self._stop = threading.Event()
        self._buf = memoryview(b"")
        self._eof = False
        self._worker = threading.Thread(target=self._run, name="ckfs-decompress", daemon=True)
        self._worker.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(BLOCK)
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # handed to the reader, who raises it
            self._put(e)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._buf:
            if self._eof:
                return 0
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return 0
            self._buf = memoryview(item)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            self._worker.join()
            close = getattr(self._source, "close", None)
            if close is not None:
                close()
        super().close()


#: What the codecs raise for damaged data (as opposed to an unreadable blob):
#: isal's inflate error, a bad gzip header or CRC, a stream cut short, zstd.
_CODEC_ERRORS: tuple[type[BaseException], ...] = (
    cast("type[BaseException]", isal_zlib.error),  # typed as an instance in isal's stubs
    gzip.BadGzipFile,
    EOFError,
    zstandard.ZstdError,
)


class _Checked(io.RawIOBase):
    """Report damaged compressed data as `InvalidArgument` naming the codec.

    Callers then need not know each codec's exception classes; an ``OSError``
    reading the blob itself passes through unchanged.
    """

    def __init__(self, inner: BinaryIO, codec: str) -> None:
        self._inner = inner
        self._codec = codec

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._inner.read(n)
        except _CODEC_ERRORS as e:
            raise InvalidArgument(f"corrupt {self._codec} stream: {e}") from e

    def readinto(self, b: Any) -> int:
        # Straight into the caller's buffer: no block-sized copy per read.
        try:
            return int(self._inner.readinto(b))  # type: ignore[attr-defined]
        except _CODEC_ERRORS as e:
            raise InvalidArgument(f"corrupt {self._codec} stream: {e}") from e

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


def _open_gzip(raw: BinaryIO) -> BinaryIO:
    try:
        from isal import igzip_threaded
    except ImportError:  # isal < 1.4: inflate on a thread of our own
        from isal import igzip

        inflater = igzip.IGzipFile(fileobj=raw)  # type: ignore[no-untyped-call]
        return cast(BinaryIO, io.BufferedReader(_Threaded(inflater), BLOCK))
    # threads=1: one worker inflates while the caller parses; reading gzip
    # cannot use more.
    gz = igzip_threaded.open(raw, "rb", threads=1, block_size=BLOCK)  # type: ignore[no-untyped-call]
    return cast(BinaryIO, gz)


def _open_zstd(raw: BinaryIO) -> BinaryIO:
    # read_across_frames: zstd:chunked and parallel encoders write many frames.
    reader = zstandard.ZstdDecompressor().stream_reader(
        raw, read_size=BLOCK, read_across_frames=True, closefd=False
    )
    return cast(BinaryIO, io.BufferedReader(_Threaded(reader), BLOCK))


def open_layer(blob: BinaryIO, media_type: str | None = None) -> BinaryIO:
    """Open a layer blob as its uncompressed tar stream.

    Args:
        blob: the layer as stored, read from its current position.
        media_type: the descriptor's media type; None when unknown.

    Returns:
        A readable stream. Read and close it on the calling thread; closing
        it stops the decompression worker but leaves *blob* open. Errors in
        the compressed data surface from ``read`` as `InvalidArgument`.

    Raises:
        InvalidArgument: *media_type* is given and is not a layer type.
    """
    declared: Compression | None = None
    if media_type is not None:
        try:
            declared = layer_compression(media_type)
        except KeyError:
            raise InvalidArgument(f"media type {media_type!r} is not a layer") from None
    head = b""
    while len(head) < 4:
        more = blob.read(4 - len(head))
        if not more:
            break
        head += more
    codec = detect(head)
    if declared is not None and declared != codec:
        log.warning(
            "layer declared %s (%s) but its data is %s; using %s",
            declared,
            media_type,
            codec,
            codec,
        )
    raw = cast(BinaryIO, io.BufferedReader(_Prefixed(head, blob), BLOCK))
    if codec == "gzip":
        return cast(BinaryIO, _Checked(_open_gzip(raw), "gzip"))
    if codec == "zstd":
        return cast(BinaryIO, _Checked(_open_zstd(raw), "zstd"))
    return raw
