"""Implied directories of a lazy layer get the attributes the layers below give them.

A layer tar that lists ``etc/passwd`` but not ``etc/`` leaves its index to
imply ``etc`` (0755, 0:0, mtime 0, no xattrs; `ckfs.layerindex.model`).
Unpacked eagerly, that directory is a copy of the one the layers below have
(`ckfs.archive.lowers`; containerd's applier and overlayfs's copy-up do the
same), so the rootfs shows the lower ``etc``'s mode, owner, times and
xattrs. Stacked as an overlay lowerdir as it is, the made-up directory is
the upper-most and hides them.

What the layers below give depends on the chain, while a layer's FUSE
directory (``<algo>-<hex>``) is shared by every chain that has the layer.
So an attach (`snapshotters.fuse.snapshotter.FuseSnapshotter.attach`)
`resolve`\\ s each implied directory down the chain under it: the first
lower layer holding that path as a directory gives its attributes (an
attached layer's from its index, or from its own override record when the
directory is implied there too; an unpacked one's from its files); a
whiteout, a non-directory or an opaque directory on the way hides the
lower ones, and the defaults stay. When any directory ends up differing
from the defaults, the attach writes an override `Record` to
``<root>/fuse/chains/<variant>.json`` and links the snapshot to the
*variant* directory ``<algo>-<hex>.<key>``: the same index, served with
those attributes (`snapshotters.fuse.tree`), under inode numbers of its own
(`salted_ino`) so the kernel never mistakes one for the shared directory's.
The key is a hash of the record, so every chain needing the same
attributes shares one variant, and a record never changes once written.

Merged views apply the same rule themselves: an implied directory of an
upper layer takes the attributes of the directory it merges with below
(`snapshotters.fuse.tree`).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import xxhash

from ckfs.archive.entry import Kind
from ckfs.archive.whiteouts import OPAQUE_XATTR, is_overlay_xattr
from ckfs.content.fsutil import replace_file
from ckfs.digest import Digest
from ckfs.errors import InvalidArgument
from ckfs.jsondoc import parse_object
from ckfs.layerindex.model import FIRST_FINO, ROOT, LayerIndex
from ckfs.layerindex.store import dirname, parse_dirname

__all__ = [
    "IMPLIED",
    "MAX_RESOLVED",
    "DirAttrs",
    "DirLower",
    "IndexLower",
    "Lower",
    "Probe",
    "Record",
    "implied_paths",
    "join_name",
    "read_record",
    "record_path",
    "resolve",
    "salted_ino",
    "split_name",
    "write_record",
]

log = logging.getLogger(__name__)

#: Implied directories of one layer resolved at most. An honest layer
#: implies a handful (``etc``, ``usr``, ``usr/lib``); a layer that lists no
#: directories at all may imply thousands. Past this, the rest keep the
#: defaults, with a warning: the record (and the attach) stays small.
MAX_RESOLVED = 65536

#: Hex digits of a variant's key: 128 bits of the record's sha256.
KEY_HEX = 32

_KEY = re.compile(rf"[0-9a-f]{{{KEY_HEX}}}")

_INT64 = (1 << 63) - 1

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class DirAttrs:
    """A directory's own attributes: what an implied one shows instead of its defaults."""

    mode: int  # permission bits (0o7777)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()  # sorted; no overlayfs ones


#: What the index gives an implied directory (`ckfs.layerindex.model`).
IMPLIED = DirAttrs(0o755)


class Probe(enum.Enum):
    """A lower layer's answer when it holds no directory at the path."""

    #: Nothing there: the layers below it decide.
    ABSENT = "absent"
    #: A whiteout, a non-directory, or an opaque directory above the path:
    #: nothing below shows there, and the defaults stay.
    HIDDEN = "hidden"


class Lower(Protocol):
    """One layer under the one being attached."""

    def probe(self, path: str) -> DirAttrs | Probe:
        """The directory at *path* (``""``: the layer root) in this layer, or why not."""
        ...


@dataclass(frozen=True)
class Record:
    """The attributes a variant of *layer* shows for some implied directories.

    Attributes:
        layer: the layer's digest.
        dirs: path in the layer (``""`` for its root) → attributes.
    """

    layer: Digest
    dirs: Mapping[str, DirAttrs]

    def body(self) -> bytes:
        """The record as stored: canonical JSON, so equal records hash equal."""
        doc = {
            "layer": str(self.layer),
            "dirs": {
                path: {
                    "mode": a.mode,
                    "uid": a.uid,
                    "gid": a.gid,
                    "mtime_ns": a.mtime_ns,
                    "xattrs": {k: base64.b64encode(v).decode() for k, v in a.xattrs},
                }
                for path, a in self.dirs.items()
            },
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    @property
    def key(self) -> str:
        return hashlib.sha256(self.body()).hexdigest()[:KEY_HEX]

    @property
    def name(self) -> str:
        """The variant directory's name in the FUSE mount: ``<algo>-<hex>.<key>``.

        No ``:`` or ``,`` either, like `ckfs.layerindex.dirname`'s.
        """
        return join_name(self.layer, self.key)


def join_name(layer: Digest, key: str | None) -> str:
    """The directory name of *layer*'s variant *key* (None: the shared one); see `split_name`."""
    return dirname(layer) if key is None else f"{dirname(layer)}.{key}"


def split_name(name: str) -> tuple[Digest, str | None]:
    """The layer and variant key (None for the shared directory) a directory name names.

    Raises:
        InvalidArgument: *name* is neither ``<algo>-<hex>`` nor ``<algo>-<hex>.<key>``.
    """
    base, dot, key = name.partition(".")
    if dot and not _KEY.fullmatch(key):
        raise InvalidArgument(f"{name!r} is not a layer directory name")
    return parse_dirname(base), key if dot else None


def record_path(directory: Path, name: str) -> Path:
    """Where the record of variant *name* is kept in *directory*."""
    return directory / f"{name}.json"


def write_record(directory: Path, record: Record) -> Path:
    """Store *record* (durably, atomically: the server may read it any time); its path.

    Writing the same record again rewrites the same bytes: the fresh mtime
    tells gc it is in use (`FuseSnapshotter.cleanup`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = record_path(directory, record.name)
    replace_file(path, record.body())
    return path


def read_record(directory: Path, name: str) -> Record | None:
    """The record of variant *name*; None if there is none.

    Raises:
        InvalidArgument: the file is not a record of that variant.
    """
    layer, key = split_name(name)
    path = record_path(directory, name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    doc = parse_object(data, str(path))
    try:
        if Digest.parse(doc["layer"]) != layer:
            raise ValueError(f"layer {doc['layer']!r}, not {layer}")
        dirs = {str(p): _attrs(a) for p, a in doc["dirs"].items()}
    except (KeyError, TypeError, ValueError, AttributeError, InvalidArgument) as e:
        raise InvalidArgument(f"{path}: not an override record: {e}") from None
    record = Record(layer, dirs)
    if record.key != key:
        raise InvalidArgument(f"{path}: holds the record of another variant ({record.name})")
    return record


def _attrs(doc: Mapping[str, object]) -> DirAttrs:
    xattrs = doc["xattrs"]
    if not isinstance(xattrs, dict):
        raise ValueError("xattrs is not an object")
    pairs = tuple(sorted((str(k), base64.b64decode(v, validate=True)) for k, v in xattrs.items()))
    mode, uid, gid, mtime = (_int(doc, k) for k in ("mode", "uid", "gid", "mtime_ns"))
    return DirAttrs(mode & 0o7777, uid, gid, mtime, pairs)


def _int(doc: Mapping[str, object], key: str) -> int:
    value = doc[key]
    if type(value) is not int:
        raise ValueError(f"{key} is not an integer")
    return value


def salted_ino(fino: int, key: str) -> int:
    """A variant's inode number for the node the shared directory numbers *fino*.

    Stable across restarts (a hash, like ``fino`` itself), never below
    `FIRST_FINO`, and unrelated to *fino*: the kernel caches attributes by
    inode number, and the variant's differ.
    """
    h = xxhash.xxh3_64_intdigest(key.encode() + fino.to_bytes(8, "little")) & _INT64
    return h if h >= FIRST_FINO else h + FIRST_FINO


# -- resolving --------------------------------------------------------------------


def implied_paths(index: LayerIndex) -> list[str]:
    """The implied directories of *index* whose attributes the layers below may give.

    Not those inside (or themselves) an opaque directory of this layer:
    nothing below shows there, so the defaults are right (an implied
    directory is opaque when it replaced a whiteout of the same layer).
    """
    root = index.root()
    if root.opaque:
        return []
    # path → its directory's inode, or None inside an opaque directory.
    clear: dict[str, int | None] = {"": ROOT}

    def clear_ino(path: str) -> int | None:
        if path not in clear:
            parent, _, name = path.rpartition("/")
            above = clear_ino(parent)
            node = None if above is None else index.lookup(above, name)
            clear[path] = None if node is None or node.opaque else node.ino
        return clear[path]

    return [p for p in index.implied_dirs() if clear_ino(p) is not None]


def resolve(paths: Sequence[str], lowers: Sequence[Lower]) -> dict[str, DirAttrs]:
    """The attributes of each of *paths* the first of *lowers* (top first) holding it gives.

    Only those differing from `IMPLIED` are returned. At most
    `MAX_RESOLVED` paths are looked at (the rest keep the defaults, logged).
    """
    if len(paths) > MAX_RESOLVED:
        log.warning(
            "%d implied directories: the %d past %d keep the default attributes",
            len(paths),
            len(paths) - MAX_RESOLVED,
            MAX_RESOLVED,
        )
    found: dict[str, DirAttrs] = {}
    for path in paths[:MAX_RESOLVED]:
        for lower in lowers:
            answer = lower.probe(path)
            if answer is Probe.ABSENT:
                continue
            if isinstance(answer, DirAttrs) and answer != IMPLIED:
                found[path] = answer
            break
    return found


class IndexLower:
    """A lazily attached lower layer: its index, and its own record if it has one."""

    def __init__(self, index: LayerIndex, record: Record | None = None) -> None:
        self.index = index
        self.dirs: Mapping[str, DirAttrs] = record.dirs if record is not None else {}

    def probe(self, path: str) -> DirAttrs | Probe:
        node = self.index.root()
        for part in _parts(path):
            child = self.index.lookup(node.ino, part)
            if child is None:
                return Probe.HIDDEN if node.opaque else Probe.ABSENT
            if child.kind != Kind.DIR:
                return Probe.HIDDEN
            node = child
        if node.implied:
            # Resolved when this layer was attached on the same chain below.
            return self.dirs.get(path, IMPLIED)
        xattrs = self.index.xattrs(node.ino).items()
        return DirAttrs(node.mode, node.uid, node.gid, node.mtime_ns, _kept(xattrs))


class DirLower:
    """A lower layer unpacked into a directory (an eager snapshot's ``fs``).

    Whiteouts there are 0/0 character devices and opaque directories carry
    ``trusted.overlay.opaque=y``, as in any overlay upper directory. Paths
    are walked one component at a time, never through a symlink.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def probe(self, path: str) -> DirAttrs | Probe:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("lower layer %s: %s: the defaults stay", self.path, e.strerror)
            return Probe.HIDDEN
        try:
            for part in _parts(path):
                try:
                    st = os.lstat(part, dir_fd=fd)
                except FileNotFoundError:
                    return Probe.HIDDEN if _opaque(fd) else Probe.ABSENT
                if not stat.S_ISDIR(st.st_mode):
                    return Probe.HIDDEN
                below = os.open(part, _O_DIR, dir_fd=fd)
                os.close(fd)
                fd = below
            st = os.fstat(fd)
            return DirAttrs(
                stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, _fd_xattrs(fd)
            )
        except OSError as e:
            log.warning("lower layer %s: /%s: %s: the defaults stay", self.path, path, e.strerror)
            return Probe.HIDDEN
        finally:
            os.close(fd)


def _parts(path: str) -> list[str]:
    return path.split("/") if path else []


def _kept(xattrs: Iterable[tuple[str, bytes]]) -> tuple[tuple[str, bytes], ...]:
    """*xattrs* a copy-up keeps: all but overlayfs's own (`ckfs.archive.lowers.copy_xattrs`)."""
    return tuple(sorted((k, v) for k, v in xattrs if not is_overlay_xattr(k)))


def _opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _fd_xattrs(fd: int) -> tuple[tuple[str, bytes], ...]:
    found: list[tuple[str, bytes]] = []
    for name in os.listxattr(fd):
        try:
            found.append((name, os.getxattr(fd, name)))
        except OSError:
            continue  # removed meanwhile
    return _kept(found)
