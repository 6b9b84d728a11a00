"""Content digests: the trust boundary between ckfs and everything remote.

A digest is ``<algorithm>:<lowercase hex>``. Only sha256 and sha512 are
accepted, with their exact hex lengths: a digest that is merely "shaped
right" but uses an algorithm we cannot verify would let unverified bytes in.

`Digest` is a `str` subclass so it can be used wherever JSON or SQLite expects
text, but it can only be built through `Digest.parse`, which validates.
"""

from __future__ import annotations

import re
from typing import IO, Protocol

from ckfs.errors import DataLoss, InvalidArgument

__all__ = [
    "ALGORITHMS",
    "CHUNK",
    "Digest",
    "Digester",
    "VerifyingReader",
    "from_bytes",
    "from_file",
]

#: Algorithm name → hex length. The order is the preference for new digests.
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}

#: Read size for hashing files: large enough that hashlib releases the GIL and
#: the per-call overhead vanishes, small enough to stay in L2 cache.
CHUNK = 1 << 20

_HEX = re.compile(r"[0-9a-f]+")


class Digest(str):
    """A validated ``algorithm:hex`` digest."""

    __slots__ = ()

    @classmethod
    def parse(cls, value: str) -> Digest:
        """Validate *value* and return it as a `Digest`.

        Raises:
            InvalidArgument: unknown algorithm, wrong hex length, upper-case or
                non-hex characters, or a missing ``:``.
        """
        if isinstance(value, Digest):
            return value
        if not isinstance(value, str):
            raise InvalidArgument(f"invalid digest {value!r}: not a string")
        alg, sep, hexpart = value.partition(":")
        if not sep:
            raise InvalidArgument(f"invalid digest {value!r}: expected <algorithm>:<hex>")
        if alg not in ALGORITHMS:
            raise InvalidArgument(
                f"invalid digest {value!r}: unsupported algorithm {alg!r} "
                f"(supported: {', '.join(ALGORITHMS)})"
            )
        if len(hexpart) != ALGORITHMS[alg] or not _HEX.fullmatch(hexpart):
            raise InvalidArgument(
                f"invalid digest {value!r}: {alg} needs {ALGORITHMS[alg]} lowercase hex digits"
            )
        return cls(value)

    @classmethod
    def from_hex(cls, algorithm: str, hexpart: str) -> Digest:
        return cls.parse(f"{algorithm}:{hexpart}")

    @property
    def algorithm(self) -> str:
        return self.partition(":")[0]

    @property
    def hex(self) -> str:
        return self.partition(":")[2]

    def short(self, n: int = 12) -> str:
        """The first *n* hex digits, for tables meant for humans."""
        return self.hex[:n]

    def digester(self) -> Digester:
        """A fresh hasher for this digest's algorithm."""
        return Digester(self.algorithm)


class Digester:
    """Incremental hasher that yields a `Digest`."""

    __slots__ = ("_h", "algorithm")

    def __init__(self, algorithm: str = "sha256") -> None:
        if algorithm not in ALGORITHMS:
            raise InvalidArgument(f"unsupported digest algorithm {algorithm!r}")
        import hashlib  # here: its OpenSSL start-up (~6 ms) is wasted on a ckfsd client

        self.algorithm = algorithm
        self._h = hashlib.new(algorithm)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)

    def digest(self) -> Digest:
        return Digest(f"{self.algorithm}:{self._h.hexdigest()}")

    def copy(self) -> Digester:
        clone = Digester.__new__(Digester)
        clone.algorithm = self.algorithm
        clone._h = self._h.copy()
        return clone


def from_bytes(data: bytes, algorithm: str = "sha256") -> Digest:
    d = Digester(algorithm)
    d.update(data)
    return d.digest()


def from_file(f: IO[bytes], algorithm: str = "sha256") -> tuple[Digest, int]:
    """Hash a file object from its current position to EOF.

    Returns:
        The digest and the number of bytes read.
    """
    d = Digester(algorithm)
    n = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        got = f.readinto(view)  # type: ignore[attr-defined]
        if not got:
            break
        d.update(view[:got])
        n += got
    return d.digest(), n


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class VerifyingReader:
    """Wrap a byte stream; at EOF the bytes must match *digest* and *size*.

    The check happens when the stream ends, so a consumer that streams the
    data somewhere must not treat it as trusted until `read` has returned
    ``b""`` without raising. `verify` can be called explicitly after a
    consumer that stops reading at its own end (a tar reader, say) to drain
    and check the rest.

    Raises:
        DataLoss: from `read` at EOF, or as soon as more than *size* bytes
            arrive, naming *what* (a blob, a file) in the message.
    """

    def __init__(
        self, raw: _Readable, digest: Digest, size: int | None = None, *, what: str = ""
    ) -> None:
        self._raw = raw
        self._expected = digest
        self._size = size
        self._what = what or str(digest)
        self._digester = digest.digester()
        self._n = 0
        self._done = False

    @property
    def offset(self) -> int:
        return self._n

    def read(self, n: int = -1, /) -> bytes:
        data = self._raw.read(n)
        if data:
            self._n += len(data)
            if self._size is not None and self._n > self._size:
                raise DataLoss(f"{self._what}: more than the expected {self._size} bytes")
            self._digester.update(data)
        elif n != 0:
            self._check()
        return data

    def verify(self) -> None:
        """Read to EOF (discarding) and check size and digest."""
        while self.read(CHUNK):
            pass

    def _check(self) -> None:
        if self._done:
            return
        if self._size is not None and self._n != self._size:
            raise DataLoss(f"{self._what}: size {self._n} does not match expected {self._size}")
        actual = self._digester.digest()
        if actual != self._expected:
            raise DataLoss(f"{self._what}: digest mismatch, got {actual}")
        self._done = True
