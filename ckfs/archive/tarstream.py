"""A layer's tar stream, parsed by `tarfile`, hashed and counted on the way.

`tarfile` parses the headers (ustar, GNU long names and sparse files, PAX
records); this module only changes how it is fed, for speed, and how it
reports damage, for safety:

- Its ``"r|"`` streaming mode copies its whole read-ahead buffer on every
  header and data read. Here `tarfile` gets a C ``io.BufferedReader`` over a
  forward-only stream that claims to be seekable, in ``"r:"`` mode: it only
  ever seeks forward (to skip data and padding), which the stream does by
  reading, so this is still a single streaming pass.
- `Member.frombuf` decodes the common ustar header with one
  ``struct.unpack`` and falls back to tarfile's own decoder for anything
  unusual (base-256 numbers, old GNU sparse headers, bad checksums), so its
  results are tarfile's. Together these halve the per-entry cost.
- `tarfile` treats a damaged header after the first as the end of the
  archive and silently drops the rest; Go's archive/tar (containerd, umoci)
  fails, and so does this (`InvalidArgument`).

Everything read from the uncompressed stream is hashed at the bottom, so
the digest covers every byte (padding and trailing zeros included) however
`tarfile` skips around.
"""

from __future__ import annotations

import io
import logging
import struct
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO, Protocol, cast

from ckfs.digest import Digest, Digester
from ckfs.errors import InvalidArgument

log = logging.getLogger(__name__)

__all__ = ["Member", "TarStream"]

#: Read-ahead of the buffer `tarfile` reads from: one refill serves the
#: headers and data of many small files, and big files are read past it.
BUFFER = 1 << 20

#: Bytes read per call when draining or skipping.
_CHUNK = 1 << 20

_BLOCK = 512

# ustar header: name mode uid gid size mtime chksum type linkname
# (magic+version) uname gname devmajor devminor prefix (padding)
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8x32s32s8s8s155s12x")

#: Header errors `tarfile` swallows as "end of archive" (not in typeshed).
_BAD_HEADER: tuple[type[Exception], ...] = (
    tarfile.InvalidHeaderError,  # type: ignore[attr-defined]
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
)


def _octal(field: bytes) -> int:
    # Same as tarfile.nti for plain octal: cut at NUL, int() strips blanks.
    # Anything else raises ValueError and the caller falls back.
    return int(field.split(b"\0", 1)[0] or b"0", 8)


def _text(field: bytes, encoding: str, errors: str) -> str:
    return field.split(b"\0", 1)[0].decode(encoding, errors)


class _Corrupt(Exception):
    """A damaged header; deliberately not a tarfile.HeaderError, so it escapes."""


class Member(tarfile.TarInfo):
    """A `tarfile.TarInfo` with a fast header decoder and strict errors."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Member:
        if len(buf) != _BLOCK or buf[156:157] == tarfile.GNUTYPE_SPARSE:
            return super().frombuf(buf, encoding, errors)
        (name, mode, uid, gid, size, mtime, chk, typ, link, uname, gname, dmaj, dmin, prefix) = (
            _USTAR.unpack(buf)
        )
        try:
            chksum = _octal(chk)
            # The checksum field counts as eight spaces (256).
            if chksum != sum(buf) - sum(chk) + 256:
                raise ValueError("checksum")  # maybe a signed-char checksum
            obj = cls()
            obj.mode = _octal(mode)
            obj.uid = _octal(uid)
            obj.gid = _octal(gid)
            obj.size = _octal(size)
            obj.mtime = _octal(mtime)
            obj.devmajor = _octal(dmaj)
            obj.devminor = _octal(dmin)
        except ValueError:
            return super().frombuf(buf, encoding, errors)
        obj.chksum = chksum
        obj.type = typ
        n = _text(name, encoding, errors)
        obj.linkname = _text(link, encoding, errors)
        obj.uname = _text(uname, encoding, errors)
        obj.gname = _text(gname, encoding, errors)
        if typ == tarfile.AREGTYPE and n.endswith("/"):
            obj.type = tarfile.DIRTYPE  # old V7 directories
        if obj.type == tarfile.DIRTYPE:
            n = n.rstrip("/")
        pre = prefix.split(b"\0", 1)[0]
        if pre and obj.type not in tarfile.GNU_TYPES:
            n = pre.decode(encoding, errors) + "/" + n
        obj.name = n
        return obj

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Member:
        try:
            return super().fromtarfile(tarfile_)
        except _BAD_HEADER as e:
            raise _Corrupt(str(e)) from None


class _Source(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Hashed(io.RawIOBase):
    """The uncompressed stream: hashed, counted, seekable forward only."""

    def __init__(self, source: _Source, algorithm: str) -> None:
        self._source = source
        self._readinto = getattr(source, "readinto", None)
        self._digester = Digester(algorithm)
        self.n = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # forward only; `tarfile` never seeks back (see seek)

    def readinto(self, b: Any) -> int:
        if self._readinto is not None:
            n = int(self._readinto(b))
            view = memoryview(b)[:n]
        else:
            data = self._source.read(len(b))
            n = len(data)
            b[:n] = data
            view = memoryview(data)
        self._digester.update(view)
        self.n += n
        return n

    def tell(self) -> int:
        return self.n

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            pos += self.n
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("layer streams seek forward only")
        if pos < self.n:
            # tarfile seeks to (next header - 1) ≥ the last byte it read,
            # which the buffer above still holds; reaching here is a bug.
            raise io.UnsupportedOperation(f"backward seek to {pos} from {self.n}")
        buf = bytearray(min(_CHUNK, pos - self.n))
        while self.n < pos:
            if not self.readinto(memoryview(buf)[: min(len(buf), pos - self.n)]):
                break
        return self.n

    def digest(self) -> Digest:
        return self._digester.digest()


class TarStream:
    """Members and data of one uncompressed layer stream.

    Use: iterate `members`; for a regular file read exactly its stored
    bytes with `read` before asking for the next member (or none: unread
    data is skipped); then `drain` and `digest`.
    """

    def __init__(self, stream: _Source, algorithm: str = "sha256", *, what: str = "layer") -> None:
        self._raw = _Hashed(stream, algorithm)
        self._buf = io.BufferedReader(self._raw, BUFFER)
        self.read = self._buf.read
        self._what = what
        #: Offset of the header after the current member's data.
        self.next_header = 0
        #: Members returned so far.
        self.count = 0
        #: Offset just past the current member's data.
        self._data_end = 0

    @property
    def size(self) -> int:
        """Bytes of the uncompressed stream read so far (all of it after `drain`)."""
        return self._raw.n

    def members(self) -> Iterator[tarfile.TarInfo]:
        """The members, in order.

        Raises:
            InvalidArgument: the stream is not a tar, or a header is damaged.
        """
        try:
            tar = tarfile.open(  # noqa: SIM115 - closed below; open itself may fail
                fileobj=cast(BinaryIO, self._buf),
                mode="r:",
                tarinfo=Member,
                encoding="utf-8",
                errors="surrogateescape",
            )
        except (_Corrupt, tarfile.TarError) as e:
            if self._raw.n == 0:
                return  # a zero-byte blob: an empty layer, as Go's tar reads it
            raise InvalidArgument(f"{self._what}: not a tar archive: {e}") from None
        with tar:
            while True:
                try:
                    member = tar.next()
                except (_Corrupt, tarfile.TarError) as e:
                    if self._unpadded_end():
                        log.info(
                            "%s: archive ends without padding or end-of-archive blocks "
                            "(as umoci 0.4.7 writes them); all %d entries are whole",
                            self._what,
                            self.count,
                        )
                        return
                    raise InvalidArgument(
                        f"{self._what}: corrupt tar after {self.count} entries: {e}"
                    ) from None
                if member is None:
                    return
                # Streaming: nothing looks back, so keep memory flat.
                tar.members = []  # type: ignore[attr-defined]
                self.count += 1
                self.next_header = tar.offset
                self._data_end = member.offset_data + (member.size if member.isreg() else 0)
                yield member

    def _unpadded_end(self) -> bool:
        """Whether the stream ended right after the last member's data.

        Some writers (umoci 0.4.7's ``insert``) never close their tar writer:
        the last member's data is all there, but its padding to 512 bytes and
        the two zero blocks after it are not. Every byte of every entry has
        arrived (and the diff ID still covers exactly the stream), so such a
        layer is whole; anything shorter is a truncated archive.
        """
        if self.count == 0 or self._buf.peek(1):
            return False
        return self._data_end <= self._raw.n < self.next_header

    def drain(self) -> bool:
        """Read the rest of the stream (so the digest covers it).

        Returns:
            True if any of it was not zero bytes: data after the end of the
            archive, which callers may want to mention.
        """
        nonzero = False
        while data := self._buf.read(_CHUNK):
            if not nonzero and data.count(0) != len(data):
                nonzero = True
        return nonzero

    def digest(self) -> Digest:
        """Digest of everything read so far."""
        return self._raw.digest()
