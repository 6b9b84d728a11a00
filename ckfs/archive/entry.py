"""One tar entry, interpreted once: the rules every reader of a layer shares.

A layer is hostile input whether ckfs applies it to a directory
(`ckfs.archive.apply`), indexes it to serve it lazily (`ckfs.layerindex`) or
reads an eStargz TOC describing it. `from_tarinfo` turns a header into a
frozen `Entry` by the rules below, so the eager and the lazy trees of one
layer cannot disagree about what an entry means:

- **Paths** are cleaned as if chrooted at the layer root (`normalize_path`):
  ``..`` stops at the top, a leading ``/`` is ignored, ``.`` and empty
  components vanish, so ``/../etc/x`` and ``a/../etc/x`` both name
  ``etc/x``. This is what containerd, umoci and the applier do, and what
  keeps a lazy tree identical to an unpacked one. A NUL byte, a lone
  surrogate (text no bytes stand for), a component longer than `NAME_MAX`
  bytes or nesting deeper than `MAX_DEPTH` is refused (the kernel could not
  take the first three anyway). The total length is not
  bounded here: the applier walks by descriptors and handles any; an index
  may bound it.
- **Root** (``./``) may only be a directory: changing its type is refused,
  as umoci does.
- **Whiteouts**, whatever the tar type of the marker: ``dir/.wh..wh..opq``
  is `Kind.OPAQUE` with path ``dir``; ``dir/.wh.<name>`` is `Kind.WHITEOUT`
  with path ``dir/<name>``; other ``.wh..wh.*`` names (AUFS metadata) are
  skipped; ``.wh.``, ``.wh..`` and ``.wh...`` name no child and are refused.
  A marker's own metadata means nothing and is not read.
- **Types**: regular (also contiguous and sparse), directory, symlink,
  hardlink, character and block devices, fifo. Anything else is skipped.
  Whether devices may be created is the consumer's policy, not the entry's.
- **Sizes** are bounded by *max_size* (apparent size; sparse files count
  their holes); a sparse map must stay inside the file.
- **Owners** are uid/gid in ``0 .. 2**32 - 2``: ``(uid_t)-1`` means
  "unchanged" to chown, anything larger is no Linux id.
- **Modes** keep the permission bits with setuid, setgid and sticky.
- **Times** are nanoseconds; PAX ``mtime``/``atime`` keep their full
  precision, a missing atime is the mtime.
- **Links**: a symlink's target is kept as written (it is resolved, if
  ever, inside the layer root at use) but must be non-empty (else skipped),
  free of NUL and shorter than `PATH_MAX`; a hardlink's target is a path
  of the layer, cleaned like entry paths, and never the root.
- **Devices** carry numbers the kernel can encode (12-bit major, 20-bit
  minor, `os.makedev`'s limit on Linux).
- **xattrs** come from PAX ``SCHILY.xattr.*`` records, values as exact
  bytes. ``trusted.overlay.*`` and ``user.overlay.*`` are dropped with a
  warning (a layer must not forge overlayfs metadata), as are names outside
  the namespaces Linux knows (no filesystem could store them). Names must
  be non-empty after their namespace and at most 255 bytes, values at most
  64 KiB, and ``security.capability`` must be a v2 or v3 header the kernel
  accepts: those the kernel would refuse at ``setxattr`` are refused here,
  so an index never serves what an unpack could not have written.

Outcomes: `BadEntry` (an `InvalidArgument`) for a hostile or malformed entry,
whose layer the caller refuses; `SkipEntry` for an entry that means nothing
to ckfs, which the caller skips with a warning.
"""

from __future__ import annotations

import enum
import logging
import struct
import tarfile
from dataclasses import dataclass
from typing import cast

from ckfs.archive import whiteouts
from ckfs.archive.secure import MAX_DEPTH, clean_parts
from ckfs.errors import InvalidArgument

__all__ = [
    "DEFAULT_MAX_ENTRY_SIZE",
    "MAX_ID",
    "NAME_MAX",
    "PATH_MAX",
    "BadEntry",
    "Entry",
    "Kind",
    "SkipEntry",
    "from_tarinfo",
    "normalize_path",
]

log = logging.getLogger(__name__)

#: Largest entry accepted by default. Bigger than any file a real image
#: ships, small enough that one hostile header cannot ask for a disk's worth
#: (sparse files count their apparent size).
DEFAULT_MAX_ENTRY_SIZE = 64 << 30

#: Longest path component, in bytes: Linux's NAME_MAX (ext4, xfs, tmpfs,
#: overlayfs and FUSE all refuse longer names).
NAME_MAX = 255

#: Linux's PATH_MAX, terminating NUL included: a symlink target must be
#: shorter (``symlink(2)`` fails with ENAMETOOLONG otherwise).
PATH_MAX = 4096

#: Largest uid/gid: ``(uid_t)-1`` means "leave unchanged" to chown.
MAX_ID = (1 << 32) - 2

#: Device numbers the kernel's 32-bit encoding holds (``new_encode_dev``);
#: larger ones make ``mknod`` fail with EINVAL.
_MAX_MAJOR = (1 << 12) - 1
_MAX_MINOR = (1 << 20) - 1

_XATTR_PREFIX = "SCHILY.xattr."
#: xattr namespaces Linux has; others fail with EOPNOTSUPP everywhere.
_XATTR_NAMESPACES = ("security.", "system.", "trusted.", "user.")
#: XATTR_NAME_MAX and XATTR_SIZE_MAX of linux/limits.h.
_XATTR_NAME_MAX = 255
_XATTR_SIZE_MAX = 64 << 10

_CAPABILITY = "security.capability"
#: ``struct vfs_cap_data`` (v2) and ``vfs_ns_cap_data`` (v3) sizes and
#: revisions; the low bit of the magic is the effective flag. Version 1 and
#: anything else is refused by ``setxattr`` (commoncap.c ``validheader``).
_CAP_HEADERS = {20: 0x02000000, 24: 0x03000000}
_CAP_EFFECTIVE = 0x000001
_MAGIC = struct.Struct("<I")

#: Below this many characters a name cannot exceed `NAME_MAX` bytes (UTF-8
#: takes at most 4 bytes per character), so most names skip the check.
_SHORT = NAME_MAX // 4

#: Characters of an entry name quoted in a message.
_SHOWN = 200


class Kind(enum.IntEnum):
    """What an entry is. Stored as integers by layer indexes: never renumber."""

    FILE = 0
    DIR = 1
    SYMLINK = 2
    HARDLINK = 3
    CHAR = 4
    BLOCK = 5
    FIFO = 6
    #: ``dir/.wh.<name>``: `Entry.path` is the deleted path ``dir/<name>``.
    WHITEOUT = 7
    #: ``dir/.wh..wh..opq``: `Entry.path` is the directory made opaque.
    OPAQUE = 8


@dataclass(frozen=True, slots=True)
class Entry:
    """One layer entry as ckfs understands it (see the module docstring).

    Attributes:
        path: cleaned relative path, ``/``-separated; ``""`` is the layer root.
        kind: see `Kind`.
        mode: permission bits with setuid, setgid and sticky (``& 0o7777``).
        uid: owner, ``0 .. MAX_ID``.
        gid: group, ``0 .. MAX_ID``.
        size: apparent size of a `Kind.FILE`; 0 for other kinds.
        mtime_ns: modification time, nanoseconds since the epoch (may be
            negative, and beyond what an int64 or ``utimensat`` holds).
        atime_ns: access time, likewise; the mtime if the tar has none.
        link: `Kind.SYMLINK`: the target as written; `Kind.HARDLINK`: the
            target's cleaned path.
        devmajor: `Kind.CHAR` / `Kind.BLOCK` only.
        devminor: likewise.
        xattrs: (name, value) pairs in tar order, already filtered.
        sparse: a sparse `Kind.FILE`'s map of data regions ``(offset,
            length)``, each inside ``size``; the tar stores the regions back
            to back. None for a dense file.
    """

    path: str
    kind: Kind
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    link: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    sparse: tuple[tuple[int, int], ...] | None = None

    @property
    def parts(self) -> list[str]:
        """The path's components; empty for the layer root."""
        return self.path.split("/") if self.path else []


class BadEntry(InvalidArgument):
    """A hostile or malformed entry: the whole layer is refused.

    The message names the layer and the entry as the tar spells it.
    """


class SkipEntry(Exception):
    """An entry that means nothing to ckfs; the message says why.

    Callers skip it and log a warning; the layer is otherwise fine.
    """


def normalize_path(name: str, *, what: str = "layer") -> str:
    """*name* cleaned as if chrooted at the layer root, ``/``-separated.

    ``""`` is the root.

    Raises:
        BadEntry: a NUL byte, a component over `NAME_MAX` bytes, nesting
            deeper than `MAX_DEPTH`; the message names *what* and *name*.
    """
    try:
        return _clean(name)
    except ValueError as e:
        raise BadEntry(f"{what}: entry {_shown(name)}: {e}") from None


def _clean(name: str) -> str:
    """`normalize_path`, raising ValueError with the reason."""
    if "\0" in name:
        raise ValueError("embedded null byte")
    size = _encoded_len(name)
    parts = clean_parts(name)
    if len(parts) > MAX_DEPTH:
        raise ValueError("nested too deep")
    if size > NAME_MAX:
        for p in parts:
            if len(p) > _SHORT and _encoded_len(p) > NAME_MAX:
                raise ValueError(f"a name is longer than {NAME_MAX} bytes")
    return "/".join(parts)


def _encoded_len(text: str) -> int:
    """Length of *text* as the bytes a syscall gets; ValueError if it has none.

    Names read from a tar carry undecodable bytes as surrogate escapes and
    encode back to them; a lone surrogate from elsewhere (a TOC's JSON
    ``\\ud800``) is no file name at all.
    """
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise ValueError("not a valid file name (a lone surrogate)") from None


def _shown(name: str) -> str:
    """*name* quoted for a message, its head only if long (the CLI bounds it too)."""
    return repr(name) if len(name) <= _SHOWN else f"{name[:_SHOWN]!r}..."


def from_tarinfo(
    m: tarfile.TarInfo, *, what: str = "layer", max_size: int = DEFAULT_MAX_ENTRY_SIZE
) -> Entry:
    """Interpret one tar header by the rules of the module docstring.

    Args:
        m: the header, as `tarfile` (or `ckfs.archive.tarstream`) parsed it.
        what: the layer, for messages (``"layer sha256:..."``).
        max_size: entries with a larger apparent size are refused.

    Raises:
        BadEntry: the entry is hostile or malformed; the message names it.
        SkipEntry: the entry is to be skipped (unsupported type, reserved
            whiteout name, symlink to nothing); the message says why.
    """
    name = m.name
    size = m.size
    if size > max_size or size < 0:
        raise BadEntry(
            f"{what}: entry {_shown(name)} is {size} bytes, over the limit of {max_size}"
        )
    path = normalize_path(name, what=what)
    if path:
        parent, _, base = path.rpartition("/")
        marker = _marker(parent, base, what, name)
        if marker is not None:
            return marker
        kind = _kind(m)
    elif m.isdir():
        kind = Kind.DIR
    else:
        raise BadEntry(
            f"{what}: entry {_shown(name)} would change the type of the root "
            "directory: refusing a malicious layer"
        )
    try:
        return _entry(m, path, kind, what)
    except (ValueError, OverflowError) as e:
        raise BadEntry(f"{what}: entry {_shown(name)}: {e}") from None


def _marker(parent: str, base: str, what: str, name: str) -> Entry | None:
    """The whiteout or opaque marker *base* in directory *parent*, or None."""
    try:
        parsed = whiteouts.parse(base)
    except InvalidArgument as e:
        raise BadEntry(f"{what}: entry {_shown(name)}: {e}") from None
    if parsed is None:
        return None
    kind, target = parsed
    if kind == "opaque":
        return Entry(parent, Kind.OPAQUE)
    if kind == "meta":
        raise SkipEntry("reserved whiteout name")
    return Entry(f"{parent}/{target}" if parent else target, Kind.WHITEOUT)


def _kind(m: tarfile.TarInfo) -> Kind:
    if m.isreg():
        return Kind.FILE
    if m.isdir():
        return Kind.DIR
    if m.issym():
        return Kind.SYMLINK
    if m.islnk():
        return Kind.HARDLINK
    if m.ischr():
        return Kind.CHAR
    if m.isblk():
        return Kind.BLOCK
    if m.isfifo():
        return Kind.FIFO
    raise SkipEntry(f"unsupported entry type {m.type!r}")


def _entry(m: tarfile.TarInfo, path: str, kind: Kind, what: str) -> Entry:
    """The metadata every kind but the markers has; ValueError on a bad field
    (`from_tarinfo` names the entry), `SkipEntry` for a symlink to nothing."""
    uid, gid = m.uid, m.gid
    if not (0 <= uid <= MAX_ID and 0 <= gid <= MAX_ID):
        raise ValueError(f"invalid owner {uid}:{gid}")
    atime, mtime = _times(m)
    link = ""
    major = minor = 0
    sparse = None
    if kind is Kind.SYMLINK:
        link = _symlink_target(m.linkname)
    elif kind is Kind.HARDLINK:
        link = _hardlink_target(m.linkname)
    elif kind is Kind.CHAR or kind is Kind.BLOCK:
        major, minor = m.devmajor, m.devminor
        if not (0 <= major <= _MAX_MAJOR and 0 <= minor <= _MAX_MINOR):
            raise ValueError(f"device number {major}:{minor} out of range")
    elif kind is Kind.FILE and m.sparse is not None:
        sparse = _sparse(m)
    return Entry(
        path,
        kind,
        mode=m.mode & 0o7777,
        uid=uid,
        gid=gid,
        size=m.size if kind is Kind.FILE else 0,
        mtime_ns=mtime,
        atime_ns=atime,
        link=link,
        devmajor=major,
        devminor=minor,
        xattrs=_xattrs(m, what),
        sparse=sparse,
    )


def _symlink_target(target: str) -> str:
    if not target:
        raise SkipEntry("symlink with an empty target")
    if "\0" in target:
        raise ValueError("embedded null byte in the link target")
    if _encoded_len(target) >= PATH_MAX:
        raise ValueError(f"link target of {PATH_MAX} bytes or more")
    return target


def _hardlink_target(target: str) -> str:
    try:
        path = _clean(target)
    except ValueError as e:
        raise ValueError(f"link target: {e}") from None
    if not path:
        raise ValueError("hardlink to the root directory")
    return path


def _sparse(m: tarfile.TarInfo) -> tuple[tuple[int, int], ...]:
    # typeshed says bytes; tarfile stores [(offset, length), ...].
    regions = tuple(cast("list[tuple[int, int]]", m.sparse))
    for offset, length in regions:
        if offset < 0 or length < 0 or offset + length > m.size:
            raise ValueError("sparse map out of range")
    return regions


def _xattrs(m: tarfile.TarInfo, what: str) -> tuple[tuple[str, bytes], ...]:
    pax = m.pax_headers
    if not pax:
        return ()
    out = []
    for key, text in pax.items():
        if not key.startswith(_XATTR_PREFIX):
            continue
        name = key[len(_XATTR_PREFIX) :]
        if whiteouts.is_overlay_xattr(name):
            log.warning("%s: %r: overlayfs xattr %r ignored", what, m.name, name)
            continue
        if not name.startswith(_XATTR_NAMESPACES):
            log.warning("%s: %r: xattr %r ignored: no such namespace", what, m.name, name)
            continue
        # tarfile decoded the value as UTF-8 with surrogateescape: this
        # gives back the exact bytes (capabilities are binary).
        try:
            value = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise ValueError(f"xattr {name!r}: value is not bytes a tar holds") from None
        _check_xattr(name, value)
        out.append((name, value))
    return tuple(out)


def _check_xattr(name: str, value: bytes) -> None:
    """Refuse what ``setxattr`` refuses everywhere (EINVAL, ERANGE, E2BIG)."""
    if "\0" in name or name in _XATTR_NAMESPACES:
        raise ValueError(f"invalid xattr name {name!r}")
    if _encoded_len(name) > _XATTR_NAME_MAX:
        raise ValueError(f"xattr name longer than {_XATTR_NAME_MAX} bytes")
    if len(value) > _XATTR_SIZE_MAX:
        raise ValueError(f"xattr {name!r} larger than {_XATTR_SIZE_MAX} bytes")
    if name == _CAPABILITY:
        revision = _CAP_HEADERS.get(len(value))
        if revision is None or _MAGIC.unpack_from(value)[0] & ~_CAP_EFFECTIVE != revision:
            raise ValueError("invalid security.capability (not a v2 or v3 header)")


def _times(m: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in nanoseconds; PAX times keep their full precision."""
    pax = m.pax_headers
    mtime = _ns(pax["mtime"]) if pax and "mtime" in pax else None
    if mtime is None:
        mtime = (
            int(m.mtime * 1_000_000_000) if isinstance(m.mtime, float) else m.mtime * 1_000_000_000
        )
    atime = _ns(pax["atime"]) if pax and "atime" in pax else None
    return (mtime if atime is None else atime), mtime


def _ns(value: str) -> int | None:
    sign = -1 if value.startswith("-") else 1
    sec, _, frac = value.lstrip("-").partition(".")
    try:
        return sign * (int(sec) * 1_000_000_000 + int((frac + "000000000")[:9]))
    except ValueError:
        return None
