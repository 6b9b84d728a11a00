"""Reading committed blobs: random access for lazy layers, streams for copies."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ckfs.content.fsutil import pread_exact
from ckfs.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["ReaderAt"]


class ReaderAt(io.RawIOBase):
    """An open blob: ``read_at`` for random access, ``read`` for streaming.

    Why both: the lazy snapshotter serves FUSE reads at arbitrary offsets
    from many threads at once, which ``read_at`` (``pread``, no shared
    position) allows on one reader; exporters and decompressors want a plain
    file object, which the `io.RawIOBase` side provides (wrap it in
    `io.BufferedReader` for small reads). Blobs are immutable, so `size` is
    fixed when the reader opens.

    Use it as a context manager, or call `close`.

    Raises:
        NotFound: from the constructor, when the blob does not exist.
    """

    def __init__(self, path: Path, *, what: str = "") -> None:
        super().__init__()
        self._fd = -1  # so close() from __del__ works if open fails
        self._size = 0
        self._pos = 0
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"content {what or path.name}: not found") from None
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        """The blob's length in bytes."""
        return self._size

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to *n* bytes starting at *offset*; short only at the end of the blob.

        Thread-safe and independent of the stream position.

        Raises:
            InvalidArgument: negative *offset* or *n*.
            ValueError: the reader is closed.
        """
        self._check_open()
        if offset < 0 or n < 0:
            raise InvalidArgument(f"read_at({offset}, {n}): offset and size must be >= 0")
        return pread_exact(self._fd, n, offset)

    # -- io.RawIOBase -----------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        self._check_open()
        return self._fd

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        self._check_open()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        self._check_open()
        n = os.preadv(self._fd, [buffer], self._pos)
        self._pos += n
        return n

    def read(self, size: int = -1, /) -> bytes:
        self._check_open()
        if size is None or size < 0:
            return self.readall()
        data = os.pread(self._fd, size, self._pos)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        # RawIOBase's default reads 8 KiB at a time; one pread is enough.
        self._check_open()
        data = pread_exact(self._fd, max(self._size - self._pos, 0), self._pos)
        self._pos += len(data)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        super().close()

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError("I/O operation on closed blob reader")
