"""Build layer tars in memory, entry by entry, for archive tests.

Each helper returns an `Entry`; `tar(*entries)` writes them in order with
`tarfile` (PAX by default), so a test states exactly the bytes a layer has,
hostile ones included: names are written as given, never cleaned.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass, field

import zstandard

from ckfs.digest import Digest


@dataclass
class Entry:
    info: tarfile.TarInfo
    data: bytes | None = None


def _info(name: str, type: bytes, mode: int, mtime: float, uid: int, gid: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type
    info.mode = mode
    info.mtime = mtime
    info.uid = uid
    info.gid = gid
    return info


def F(
    name: str,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    mtime: float = 1_000_000,
    uid: int = 0,
    gid: int = 0,
    xattrs: dict[str, bytes] | None = None,
    pax: dict[str, str] | None = None,
) -> Entry:
    """A regular file."""
    info = _info(name, tarfile.REGTYPE, mode, mtime, uid, gid)
    info.size = len(data)
    _extra(info, xattrs, pax)
    return Entry(info, data)


def D(
    name: str,
    *,
    mode: int = 0o755,
    mtime: float = 1_000_000,
    uid: int = 0,
    gid: int = 0,
    xattrs: dict[str, bytes] | None = None,
) -> Entry:
    """A directory."""
    info = _info(name, tarfile.DIRTYPE, mode, mtime, uid, gid)
    _extra(info, xattrs, None)
    return Entry(info)


def L(name: str, target: str, *, mtime: float = 1_000_000, uid: int = 0, gid: int = 0) -> Entry:
    """A symlink."""
    info = _info(name, tarfile.SYMTYPE, 0o777, mtime, uid, gid)
    info.linkname = target
    return Entry(info)


def H(name: str, target: str) -> Entry:
    """A hardlink to *target* (an earlier entry's name)."""
    info = _info(name, tarfile.LNKTYPE, 0o644, 1_000_000, 0, 0)
    info.linkname = target
    return Entry(info)


def C(name: str, major: int = 1, minor: int = 3, *, mode: int = 0o666) -> Entry:
    """A character device."""
    info = _info(name, tarfile.CHRTYPE, mode, 1_000_000, 0, 0)
    info.devmajor, info.devminor = major, minor
    return Entry(info)


def B(name: str, major: int = 7, minor: int = 0, *, mode: int = 0o660) -> Entry:
    """A block device."""
    info = _info(name, tarfile.BLKTYPE, mode, 1_000_000, 0, 0)
    info.devmajor, info.devminor = major, minor
    return Entry(info)


def P(name: str, *, mode: int = 0o644) -> Entry:
    """A fifo."""
    return Entry(_info(name, tarfile.FIFOTYPE, mode, 1_000_000, 0, 0))


def W(name: str) -> Entry:
    """A whiteout marker as OCI writers make it: an empty regular file."""
    return F(name, mode=0o600)


def _extra(
    info: tarfile.TarInfo, xattrs: dict[str, bytes] | None, pax: dict[str, str] | None
) -> None:
    headers: dict[str, str] = dict(pax or {})
    for k, v in (xattrs or {}).items():
        # tarfile encodes PAX values as UTF-8 with surrogateescape: binary
        # values survive the round trip.
        headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
    if headers:
        info.pax_headers = headers


def tar(*entries: Entry, format: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=format, encoding="utf-8", errors="surrogateescape"
    ) as t:
        for e in entries:
            t.addfile(e.info, io.BytesIO(e.data) if e.data is not None else None)
    return buf.getvalue()


@dataclass
class Blob:
    """A layer as stored, with the digest of its uncompressed form."""

    data: bytes
    diff_id: Digest
    media_type: str = field(default="application/vnd.oci.image.layer.v1.tar")


def compress(raw: bytes, codec: str) -> Blob:
    diff_id = Digest("sha256:" + hashlib.sha256(raw).hexdigest())
    if codec == "gzip":
        return Blob(gzip.compress(raw), diff_id, "application/vnd.oci.image.layer.v1.tar+gzip")
    if codec == "zstd":
        data = zstandard.ZstdCompressor().compress(raw)
        return Blob(data, diff_id, "application/vnd.oci.image.layer.v1.tar+zstd")
    return Blob(raw, diff_id)
