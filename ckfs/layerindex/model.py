"""One layer's tree, kept on disk as a read-only SQLite file.

A lazy layer is served from an index, not from unpacked files: for every
entry its attributes, and for every regular file where its bytes live in the
blob. The index is built once per layer (from an eStargz TOC, a tar or a
gzip seek pass) by `IndexWriter`, which applies the tree rules every source
shares, and read by `LayerIndex` from the FUSE server's worker threads.

Why SQLite, one file per layer: a 100k-entry layer must not live in the
serving process's memory, lookups by (parent directory, name) and listings
must stay O(log n) at a million entries, and a finished index is immutable,
so it is written to a temporary file and renamed into place whole: a crash
leaves either no index or a complete one. docs/layer-index.md documents the
format.

Tree rules, the same for every source (entries arrive in archive order):

- missing parent directories are implied (0755, 0:0, mtime 0, marked
  `Node.implied`: the server shows what the layers below give them,
  `snapshotters.fuse.overrides`);
- a later entry replaces an earlier one at the same path; a directory over
  a directory only takes its attributes (its children stay); a directory
  replaced by anything else drops its subtree;
- a hardlink shares its target's node (same `Node.ino`, ``nlink`` counted),
  whatever the target is but a directory, as link(2) and the eager applier
  allow; a target missing from the layer, a directory, a whiteout, or one
  inside what the link replaces refuses the layer (it would name something
  outside the layer, or something no filesystem can link);
- a whiteout is kept as a `Kind.WHITEOUT` node (served as the 0/0 character
  device overlayfs reads) unless this layer put an entry at that path (a
  whiteout only hides lower layers, which that entry hides anyway); an
  entry replacing a whiteout stays, and a directory there becomes opaque,
  since the lower one was deleted;
- `Kind.OPAQUE` marks its directory opaque;
- an entry below a non-directory (a file, or a symlink: paths are never
  resolved through links) refuses the layer, as do changing the type of
  the root, sparse files (their bytes are not one run of the tar), chunk
  maps that do not tile their file inside the blob, and the `Limits`.
  (Paths below a *lower* layer's symlink: `through_lower_links`.)

Refusal is `BadLayer`: the caller falls back to the eager path, loudly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import xxhash

from ckfs.archive.entry import Entry, Kind
from ckfs.archive.secure import MAX_DEPTH
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from ckfs.safetext import printable

__all__ = [
    "FIRST_FINO",
    "FORMAT",
    "LIMITS",
    "MAX_IMPLIED_CHECKS",
    "ROOT",
    "SCRATCH",
    "SOURCES",
    "BadLayer",
    "Chunk",
    "IndexWriter",
    "LayerIndex",
    "Limits",
    "Node",
    "Span",
    "implied_prefixes",
    "iter_nodes",
    "scratch",
    "stable_ino",
    "sweep",
    "through_lower_links",
]

log = logging.getLogger(__name__)

#: Format version, in ``meta.format``. A reader refuses any other: an index
#: is a cache, rebuilt from its blob rather than migrated.
FORMAT = 2

#: Local inode number of the layer root.
ROOT = 1

#: Where an index came from; `LayerIndex.source` is one of these.
SOURCES = ("estargz", "gzip-index", "tar")

#: Stable inode numbers (`Node.fino`) start here: the FUSE server numbers
#: its own root and top-level directories below it.
FIRST_FINO = 1 << 16

_INT64 = (1 << 63) - 1

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: What nearly every chunk digest is: checked without `Digest.parse`'s
#: overhead (others still go through it).
_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

#: Chunk rows held before one ``executemany`` writes them: a file's
#: chunks are only ever read back at `IndexWriter.commit`.
_CHUNK_BATCH = 4096

_MAX_ID = (1 << 32) - 1

#: Characters of directory paths cached in memory while writing (path →
#: inode). Archives list a directory's entries together, so a small cache
#: resolves nearly every parent; a miss is one lookup in the staging
#: table of directories, so a hostile archive with a million directories,
#: or paths 512 deep, costs neither memory nor a walk per entry.
_DIR_CACHE_CHARS = 1 << 20

#: SQLite page cache of one open index, in KiB (negative: KiB, not pages).
#: The serving process keeps many indexes open; the OS page cache serves
#: the rest, so the process's memory stays flat however big the layer.
_READ_CACHE_KIB = 1024

#: Page cache while writing, in KiB, for each of the two files. Archives
#: add names in order, so the pages in use are few; a miss is a pread
#: from the OS page cache. 8 MiB builds a million entries in the same CPU
#: time as 32 MiB did, and keeps a build's peak RSS ~85 MiB lower.
_WRITE_CACHE_KIB = 8 << 10


class BadLayer(InvalidArgument):
    """The layer's tree cannot be indexed as it is: it is refused, whole."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one layer may make the index hold.

    entries counts nodes (implied directories included), so a few entries
    with deep paths cannot imply millions of directories. depth matches the
    eager applier's (`ckfs.archive.secure.MAX_DEPTH`); name and path are
    Linux's NAME_MAX and PATH_MAX, in bytes.
    """

    entries: int = 2_000_000
    depth: int = MAX_DEPTH
    name: int = 255
    path: int = 4096


LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Node:
    """One directory entry of a layer with the attributes of its inode.

    Hardlinks are several Nodes with one ``ino`` (and one ``fino``); the
    names differ, the attributes are the inode's.
    """

    ino: int  # local inode number, ROOT for the root; hardlinks share it
    parent: int  # ino of the directory holding it (0 for the root)
    name: str  # one component, surrogate-escaped bytes; "" for the root
    kind: Kind
    mode: int  # permission bits only (0o7777)
    uid: int
    gid: int
    size: int  # FILE: bytes; others 0 (a symlink's size is len(link) on the wire)
    mtime_ns: int
    rdev: int  # CHAR/BLOCK: os.makedev(major, minor)
    link: str  # SYMLINK target as written
    nlink: int  # names of this inode; directories: 2 + subdirectories
    fino: int  # stable across rebuilds: see `stable_ino`
    data: int  # offset of the bytes in the uncompressed tar stream; -1: see chunks
    opaque: bool  # a directory hiding lower layers' contents
    implied: bool = False  # a directory only named as a parent (default attributes)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Where bytes [file_offset, file_offset + size) of a file live (eStargz).

    ``blob_offset`` is the compressed offset of the gzip member holding the
    chunk, ``inner_offset`` its offset inside that member once inflated;
    several chunks may share a member. ``digest`` is the chunk's sha256,
    checked before its bytes are served. ``comp_size``: the member's
    compressed length when the source knows it, else -1.
    """

    file_offset: int
    size: int
    blob_offset: int
    inner_offset: int
    digest: str
    comp_size: int = -1


@dataclass(frozen=True, slots=True)
class Span:
    """A verified window of the blob: ``comp_*`` in the blob as stored,
    ``uncomp_*`` in the tar stream; ``sha256`` (hex) of the stored bytes.

    For an uncompressed tar both are the same range; for gzip the span runs
    between two seek checkpoints.
    """

    comp_offset: int
    comp_size: int
    uncomp_offset: int
    uncomp_size: int
    sha256: str


#: A scratch file's name: ``.<final name>.<pid>.<random>.<what>``.
SCRATCH = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.(?P<what>tmp|stage)")


def scratch(path: Path, what: str) -> Path:
    """A fresh scratch file beside *path*, named after it and this process.

    The PID in the name lets a later writer remove what a dead one left
    (`sweep`).
    """
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{what}")


def sweep(directory: Path) -> int:
    """Remove the scratch files writers that died left in *directory*.

    A crash mid-build leaves its temporary files (`scratch`);
    nobody reads them, but they hold disk space. Files of live processes
    (another build of the same layer) are left alone.

    Returns:
        How many were removed.
    """
    removed = 0
    for entry in directory.iterdir():
        m = SCRATCH.fullmatch(entry.name)
        if m is None or _alive(int(m["pid"])):
            continue
        entry.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def stable_ino(layer: str, path: str) -> int:
    """The inode number *path* of *layer* has on every build and machine.

    xxh3 of the digest and the canonical path, top bit cleared (st_ino is
    signed in places) and never below `FIRST_FINO`.
    """
    key = f"{layer}\0{path}".encode("utf-8", "surrogateescape")
    h = xxhash.xxh3_64_intdigest(key) & _INT64
    return h if h >= FIRST_FINO else h + FIRST_FINO


# -- schema -----------------------------------------------------------------

# The staging table is what the writer edits. Its rowid is the inode number
# for every row but extra hardlink names, which take negative rowids, so a
# directory is found by rowid. Commit copies it sorted by (parent, name):
# one directory's children are then consecutive rowids, and a listing at
# any offset is one range scan (child0 + offset).
_STAGING = """
CREATE TABLE stage.nodes (
    id INTEGER PRIMARY KEY, ino INTEGER NOT NULL, parent INTEGER NOT NULL,
    name BLOB NOT NULL, kind INTEGER NOT NULL, mode INTEGER NOT NULL,
    uid INTEGER NOT NULL, gid INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, rdev INTEGER NOT NULL, link BLOB NOT NULL,
    fino INTEGER NOT NULL, data INTEGER NOT NULL, opaque INTEGER NOT NULL,
    implied INTEGER NOT NULL);
CREATE UNIQUE INDEX stage.nodes_name ON nodes(parent, name);
CREATE TABLE stage.dirs (path BLOB PRIMARY KEY, ino INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE stage.xattrs (ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ino, name)) WITHOUT ROWID;
CREATE TABLE stage.chunks (ino INTEGER NOT NULL, file_offset INTEGER NOT NULL,
    size INTEGER NOT NULL, blob_offset INTEGER NOT NULL, inner_offset INTEGER NOT NULL,
    digest TEXT NOT NULL, comp_size INTEGER NOT NULL,
    PRIMARY KEY (ino, file_offset)) WITHOUT ROWID
"""

_FINAL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE nodes (
    ino INTEGER NOT NULL, parent INTEGER NOT NULL, name BLOB NOT NULL,
    kind INTEGER NOT NULL, mode INTEGER NOT NULL, uid INTEGER NOT NULL,
    gid INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    rdev INTEGER NOT NULL, link BLOB NOT NULL, nlink INTEGER NOT NULL,
    fino INTEGER NOT NULL, data INTEGER NOT NULL, opaque INTEGER NOT NULL,
    implied INTEGER NOT NULL, child0 INTEGER NOT NULL, nchild INTEGER NOT NULL);
CREATE TABLE xattrs (ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ino, name)) WITHOUT ROWID;
CREATE TABLE chunks (ino INTEGER NOT NULL, file_offset INTEGER NOT NULL,
    size INTEGER NOT NULL, blob_offset INTEGER NOT NULL, inner_offset INTEGER NOT NULL,
    digest TEXT NOT NULL, comp_size INTEGER NOT NULL,
    PRIMARY KEY (ino, file_offset)) WITHOUT ROWID;
CREATE TABLE spans (uncomp_offset INTEGER PRIMARY KEY, uncomp_size INTEGER NOT NULL,
    comp_offset INTEGER NOT NULL, comp_size INTEGER NOT NULL, sha256 TEXT NOT NULL)
"""

_STAGED = (
    "ino, parent, name, kind, mode, uid, gid, size, mtime_ns, rdev, link, fino, data, opaque, "
    "implied"
)
_INSERT = f"INSERT INTO stage.nodes (id, {_STAGED}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
_NODE_COLUMNS = (
    "ino, parent, name, kind, mode, uid, gid, size, mtime_ns, rdev, link, nlink, fino, data, "
    "opaque, implied"
)

# Final rows in (parent, name) order; nlink: names per inode, and for a
# directory 2 + its subdirectories; child0/nchild filled in afterwards.
_COPY = f"""
INSERT INTO nodes ({_NODE_COLUMNS}, child0, nchild)
SELECT n.ino, n.parent, n.name, n.kind, n.mode, n.uid, n.gid, n.size, n.mtime_ns, n.rdev,
       n.link,
       CASE WHEN n.kind = {int(Kind.DIR)} THEN 2 + coalesce(d.n, 0) ELSE {{names}} END,
       n.fino, n.data, n.opaque, n.implied, 0, 0
FROM stage.nodes n {{join}}
LEFT JOIN (SELECT parent, count(*) AS n FROM stage.nodes WHERE kind = {int(Kind.DIR)}
           GROUP BY parent) AS d ON d.parent = n.ino
ORDER BY n.parent, n.name
"""
#: Names per inode, for a layer with hardlinks: without any, every
#: non-directory has one, and the copy skips this grouping (a third of it).
_COPY_LINKED = _COPY.format(
    names="l.n",
    join="JOIN (SELECT ino, count(*) AS n FROM stage.nodes GROUP BY ino) AS l ON l.ino = n.ino",
)
_COPY_UNLINKED = _COPY.format(names="1", join="")

_CHILD_RANGES = f"""
UPDATE nodes SET child0 = r.first, nchild = r.n
FROM (SELECT parent, min(rowid) AS first, count(*) AS n FROM nodes GROUP BY parent) AS r
WHERE nodes.ino = r.parent AND nodes.kind = {int(Kind.DIR)}
"""


def _enc(name: str) -> bytes:
    """*name* as the bytes it came from (os.fsencode, without its overhead)."""
    return name.encode("utf-8", "surrogateescape")


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _unnormal(path: str) -> bool:
    """Whether *path* has an empty, ``.`` or ``..`` component, or a NUL:
    what no normalized path has (substring tests: a regex took 3x as long)."""
    p = f"/{path}/"
    return "//" in p or "/./" in p or "/../" in p or "\0" in path


def _bad(what: str, path: str, why: str) -> BadLayer:
    return BadLayer(f"{what}: entry {printable(path)!r}: {why}")


def _bad_chunk(what: str, path: str, chunk: Chunk, why: str) -> BadLayer:
    return _bad(what, path, f"chunk at {chunk.file_offset}{why}")


class _Row(NamedTuple):
    id: int  # staging rowid
    ino: int
    kind: Kind


class IndexWriter:
    """Builds one layer's index in a temporary file; `commit` renames it in.

    Use from one thread at a time (a source runs its whole build in one
    ``trio.to_thread`` call). A context manager: leaving the block without
    `commit` aborts, removing the temporary files.

    Args:
        path: where the finished index goes (its directory must exist).
        layer: the layer's digest (compressed blob), for `Node.fino`.
        source: one of `SOURCES`.
        blob_size: the blob's size in bytes; chunks and spans must lie in it.
        limits: bounds on the tree (`BadLayer` beyond them).
    """

    def __init__(
        self,
        path: Path,
        *,
        layer: Digest,
        source: str,
        blob_size: int,
        limits: Limits = LIMITS,
    ) -> None:
        if source not in SOURCES:
            raise InvalidArgument(f"unknown layer index source {source!r}")
        self.path = path
        self.layer = Digest.parse(layer)
        self.limits = limits
        self.what = f"layer {self.layer}"
        self._blob_size = blob_size
        sweep(path.parent)
        self._tmp = scratch(path, "tmp")
        self._stage = scratch(path, "stage")
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self._tmp, isolation_level=None, check_same_thread=False
        )
        self._next_ino = ROOT
        self._next_link = -1
        self._nodes = 0
        self._span_end = 0
        self._dirs: dict[str, int] = {}
        self._dir_chars = 0
        self._chunk_rows: list[tuple[int, int, int, int, int, str, int]] = []
        self._finished = False  # finish() done, publish() not yet
        self._dropped = False  # a node was removed (`_drop`)
        self._meta: dict[str, str] = {
            "format": str(FORMAT),
            "layer": str(self.layer),
            "source": source,
            "blob_size": str(blob_size),
        }
        try:
            self._setup()
        except BaseException:
            self.abort()
            raise

    @classmethod
    def for_layer(
        cls,
        path: Path,
        desc: Descriptor,
        *,
        source: str,
        meta: Mapping[str, str] | None = None,
        limits: Limits = LIMITS,
    ) -> IndexWriter:
        """A writer for the layer *desc*, with *meta* (``ref``, ...) recorded."""
        writer = cls(path, layer=desc.digest, source=source, blob_size=desc.size, limits=limits)
        writer.set_meta("media_type", desc.media_type)
        for key, value in (meta or {}).items():
            writer.set_meta(key, value)
        return writer

    @property
    def blob_size(self) -> int:
        return self._blob_size

    def _setup(self) -> None:
        db = self._db
        # Both files are scratch until commit renames one: no journal, no
        # syncs (commit fsyncs once); a crash leaves a .tmp nobody reads.
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute(f"PRAGMA cache_size=-{_WRITE_CACHE_KIB}")
        db.execute("ATTACH DATABASE ? AS stage", (str(self._stage),))
        db.execute("PRAGMA stage.journal_mode=OFF")
        db.execute("PRAGMA stage.synchronous=OFF")
        db.execute(f"PRAGMA stage.cache_size=-{_WRITE_CACHE_KIB}")
        db.execute("BEGIN")
        for stmt in (_STAGING + ";" + _FINAL).split(";"):
            if stmt.strip():
                db.execute(stmt)
        self._insert(0, "", "", Kind.DIR)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise InvalidArgument(f"{self.what}: index writer already closed")
        return self._conn

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()

    # -- adding -------------------------------------------------------------

    def add(self, entry: Entry, *, data: int = -1, chunks: Sequence[Chunk] = ()) -> None:
        """Add *entry* under the tree rules (module docstring).

        Args:
            entry: the entry as interpreted by `ckfs.archive.entry`.
            data: for a FILE, the offset of its bytes in the uncompressed
                tar stream; -1 when *chunks* say where they are.
            chunks: for a FILE, its chunks in file order, covering exactly
                [0, size) within the blob.

        Raises:
            BadLayer: the entry breaks a tree rule or a limit.
        """
        try:
            self._add(entry, data, chunks)
        except (UnicodeEncodeError, OverflowError) as e:
            # Text no bytes stand for (a lone surrogate a JSON TOC can
            # spell), or an integer SQLite cannot hold.
            raise _bad(self.what, entry.path, f"cannot be stored: {e}") from None

    def _add(self, entry: Entry, data: int, chunks: Sequence[Chunk]) -> None:
        path = entry.path
        kind = entry.kind
        self._check_path(path)
        if path == "":
            self._add_root(entry)
            return
        if kind == Kind.OPAQUE:
            self._set_opaque(self._dir(path))
            return
        parent_path, _, name = path.rpartition("/")
        parent = self._dir(parent_path)
        if kind == Kind.WHITEOUT:
            if self._row(parent, name) is None:
                self._insert(parent, name, path, Kind.WHITEOUT)
            return
        if kind == Kind.HARDLINK:
            self._add_hardlink(entry, parent, name, self._row(parent, name))
            return
        try:
            # Most paths are new: insert first, and only on a clash look.
            ino = self._insert_entry(parent, name, entry, data=data, opaque=False)
        except sqlite3.IntegrityError:
            existing = self._row(parent, name)
            if existing is None:
                raise
            if existing.kind == Kind.DIR and kind == Kind.DIR:
                self._update_attrs(existing.ino, entry)
                return
            self._drop(existing, path)
            opaque = kind == Kind.DIR and existing.kind == Kind.WHITEOUT
            ino = self._insert_entry(parent, name, entry, data=data, opaque=opaque)
        if chunks:
            self._add_chunks(ino, entry, data, chunks)

    def _add_root(self, entry: Entry) -> None:
        if entry.kind == Kind.DIR:
            self._update_attrs(ROOT, entry)
        elif entry.kind == Kind.OPAQUE:
            self._set_opaque(ROOT)
        else:
            raise _bad(self.what, "/", f"changes the layer root into a {entry.kind.name.lower()}")

    def _set_opaque(self, ino: int) -> None:
        self._db.execute("UPDATE stage.nodes SET opaque = 1 WHERE id = ?", (ino,))

    def _add_hardlink(self, entry: Entry, parent: int, name: str, existing: _Row | None) -> None:
        target = self._resolve(entry.link)
        if target is None:
            raise _bad(
                self.what, entry.path, f"hardlink to {printable(entry.link)!r}, not in this layer"
            )
        if target.kind in (Kind.DIR, Kind.WHITEOUT):
            why = f"hardlink to {target.kind.name.lower()} {printable(entry.link)!r}"
            raise _bad(self.what, entry.path, why)
        if existing is not None:
            if existing.ino == target.ino:
                return  # a link to itself, or to another name of the same inode
            self._drop(existing, entry.path)
        self._count(entry.path)
        # The new name copies the target's row: one inode, two names.
        copied = self._db.execute(
            f"INSERT INTO stage.nodes (id, {_STAGED}) SELECT ?, ino, ?, ?, kind, mode, uid, "
            "gid, size, mtime_ns, rdev, link, fino, data, opaque, implied FROM stage.nodes "
            "WHERE id = ?",
            (self._next_link, parent, _enc(name), target.id),
        ).rowcount
        if not copied:
            # What the link replaced held its target (x/y linked as x).
            raise _bad(self.what, entry.path, "hardlink target inside what it replaces")
        self._next_link -= 1

    def _update_attrs(self, ino: int, entry: Entry) -> None:
        self._db.execute(
            "UPDATE stage.nodes SET mode = ?, uid = ?, gid = ?, mtime_ns = ?, implied = 0 "
            "WHERE id = ?",
            (*self._owner(entry), _clamp(entry.mtime_ns), ino),
        )
        self._db.execute("DELETE FROM stage.xattrs WHERE ino = ?", (ino,))
        self._add_xattrs(ino, entry)

    def _owner(self, entry: Entry) -> tuple[int, int, int]:
        uid, gid = entry.uid, entry.gid
        if not (0 <= uid <= _MAX_ID and 0 <= gid <= _MAX_ID):
            raise _bad(self.what, entry.path, f"owner {uid}:{gid} out of range")
        return entry.mode & 0o7777, uid, gid

    def _insert_entry(
        self, parent: int, name: str, entry: Entry, *, data: int, opaque: bool
    ) -> int:
        path, kind = entry.path, entry.kind
        mode, uid, gid = self._owner(entry)
        size = 0
        rdev = 0
        link = ""
        if kind == Kind.FILE:
            size = entry.size
            if entry.sparse is not None:
                raise _bad(self.what, path, "sparse files are not served lazily")
            if not (0 <= size <= _INT64 and -1 <= data <= _INT64 - size):
                raise _bad(self.what, path, f"size {size} at {data} out of range")
        else:
            data = -1
            if kind == Kind.SYMLINK:
                link = entry.link
                if len(_enc(link)) >= self.limits.path:
                    raise _bad(self.what, path, "symlink target too long")
            elif kind == Kind.CHAR or kind == Kind.BLOCK:
                try:
                    rdev = os.makedev(entry.devmajor, entry.devminor)
                except (OverflowError, ValueError):
                    raise _bad(self.what, path, "device numbers out of range") from None
        ino = self._put(
            parent,
            name,
            path,
            kind,
            mode,
            uid,
            gid,
            size,
            _clamp(entry.mtime_ns),
            rdev,
            link,
            data,
            opaque,
        )
        if entry.xattrs:
            self._add_xattrs(ino, entry)
        return ino

    def _insert(
        self, parent: int, name: str, path: str, kind: Kind, *, opaque: bool = False
    ) -> int:
        """A node with default attributes: an implied directory (0755) or a whiteout."""
        implied = kind == Kind.DIR and path != ""
        mode = 0o755 if kind == Kind.DIR else 0
        return self._put(parent, name, path, kind, mode, 0, 0, 0, 0, 0, "", -1, opaque, implied)

    def _put(
        self,
        parent: int,
        name: str,
        path: str,
        kind: Kind,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        mtime_ns: int,
        rdev: int,
        link: str,
        data: int,
        opaque: bool,
        implied: bool = False,
    ) -> int:
        """Insert one node (positional: this runs for every entry)."""
        ino = self._next_ino
        fino = stable_ino(self.layer, path)
        row = (
            ino,
            ino,
            parent,
            _enc(name),
            int(kind),
            mode,
            uid,
            gid,
            size,
            mtime_ns,
            rdev,
            _enc(link),
            fino,
            data,
            int(opaque),
            int(implied),
        )
        self._db.execute(_INSERT, row)
        self._next_ino += 1
        self._count(path)
        if kind == Kind.DIR:
            self._add_dir(path, ino)
        return ino

    def _count(self, path: str) -> None:
        self._nodes += 1
        if self._nodes > self.limits.entries:
            raise _bad(self.what, path, f"more than {self.limits.entries} entries")

    def _add_xattrs(self, ino: int, entry: Entry) -> None:
        if entry.xattrs:
            self._db.executemany(
                "INSERT OR REPLACE INTO stage.xattrs VALUES (?, ?, ?)",
                [(ino, _enc(k), bytes(v)) for k, v in entry.xattrs],
            )

    def _add_chunks(self, ino: int, entry: Entry, data: int, chunks: Sequence[Chunk]) -> None:
        path = entry.path
        if entry.kind != Kind.FILE or data != -1:
            raise _bad(self.what, path, "chunks for something other than a chunked file")
        end = 0
        for c in chunks:
            if c.file_offset != end or c.size <= 0:
                raise _bad_chunk(self.what, path, c, " leaves a gap or overlaps")
            if not (0 <= c.blob_offset < self._blob_size and 0 <= c.inner_offset <= _INT64):
                raise _bad_chunk(self.what, path, c, " outside the blob")
            if c.comp_size != -1 and not 0 < c.comp_size <= self._blob_size - c.blob_offset:
                raise _bad_chunk(self.what, path, c, " runs past the blob")
            if not _SHA256_DIGEST.fullmatch(c.digest):
                try:
                    Digest.parse(c.digest)
                except InvalidArgument:
                    raise _bad_chunk(self.what, path, c, ": malformed digest") from None
            end += c.size
        if end != entry.size:
            raise _bad(self.what, path, f"chunks cover {end} of {entry.size} bytes")
        self._chunk_rows.extend(
            (ino, c.file_offset, c.size, c.blob_offset, c.inner_offset, c.digest, c.comp_size)
            for c in chunks
        )
        if len(self._chunk_rows) >= _CHUNK_BATCH:
            self._flush_chunks()

    def _flush_chunks(self) -> None:
        self._db.executemany(
            "INSERT INTO stage.chunks VALUES (?, ?, ?, ?, ?, ?, ?)", self._chunk_rows
        )
        self._chunk_rows.clear()

    def add_span(self, span: Span) -> None:
        """Record a verified window of the blob (spans come in stream order).

        Raises:
            BadLayer: the span leaves a gap, overlaps or leaves the blob.
        """
        s = span
        if s.uncomp_offset != self._span_end or not 0 < s.uncomp_size <= _INT64 - s.uncomp_offset:
            raise BadLayer(f"{self.what}: span at {s.uncomp_offset} does not follow the last")
        if not (s.comp_offset >= 0 and 0 <= s.comp_size <= self._blob_size - s.comp_offset):
            raise BadLayer(f"{self.what}: span at {s.uncomp_offset} outside the blob")
        if not _SHA256_HEX.fullmatch(s.sha256):
            raise BadLayer(f"{self.what}: span at {s.uncomp_offset}: {s.sha256!r} is no sha256")
        self._span_end = s.uncomp_offset + s.uncomp_size
        self._db.execute(
            "INSERT INTO spans VALUES (?, ?, ?, ?, ?)",
            (s.uncomp_offset, s.uncomp_size, s.comp_offset, s.comp_size, s.sha256),
        )

    def set_meta(self, key: str, value: str) -> None:
        """Record *key* (e.g. ``ref``, ``diff_id``) for `LayerIndex.meta`."""
        self._meta[key] = value

    # -- the tree in staging --------------------------------------------------

    def _check_path(self, path: str) -> None:
        """The limits, and the shape `normalize_path` promises (belt and braces)."""
        if not path:
            return
        limits = self.limits
        if len(path) * 4 >= limits.path and len(_enc(path)) >= limits.path:
            raise _bad(self.what, path, "path too long")
        if path.count("/") >= limits.depth:
            raise _bad(self.what, path, f"deeper than {limits.depth} directories")
        if _unnormal(path):
            raise _bad(self.what, path, "not a normalized path")
        # Four bytes a character at most: short names need no encoding.
        if len(path) * 4 > limits.name:
            parts = path.split("/")
            if max(map(len, parts)) * 4 > limits.name:
                for part in parts:
                    if len(_enc(part)) > limits.name:
                        raise _bad(self.what, path, "name too long")

    def _row(self, parent: int, name: str) -> _Row | None:
        row = self._db.execute(
            "SELECT id, ino, kind FROM stage.nodes WHERE parent = ? AND name = ?",
            (parent, _enc(name)),
        ).fetchone()
        return None if row is None else _Row(row[0], row[1], Kind(row[2]))

    def _resolve(self, path: str) -> _Row | None:
        """The row at *path*, never through links; None if there is none."""
        parent_path, _, name = path.rpartition("/")
        parent = self._known_dir(parent_path)
        return None if parent is None else self._row(parent, name)

    def _known_dir(self, path: str) -> int | None:
        """The directory at *path* if there is one: the cache, else one lookup."""
        ino = self._dirs.get(path)
        if ino is None:
            row = self._db.execute(
                "SELECT ino FROM stage.dirs WHERE path = ?", (_enc(path),)
            ).fetchone()
            if row is not None:
                ino = row[0]
                self._cache(path, ino)
        return ino

    def _dir(self, path: str) -> int:
        """The directory at *path*, implying missing ones.

        A whiteout in the way becomes an opaque directory (the layer
        deleted what the lower layers had there, then made a new one).

        Raises:
            BadLayer: a component is not a directory.
        """
        ino = self._known_dir(path)
        if ino is not None:
            return ino
        # The nearest directory above, then down, making what is missing:
        # each lookup that misses stands for a node made (or the refusal),
        # so a deep path costs its depth once, not on every entry.
        parts = path.split("/")
        i = len(parts) - 1
        while i > 0 and (ino := self._known_dir("/".join(parts[:i]))) is None:
            i -= 1
        if i == 0:
            ino = ROOT
        assert ino is not None
        for j in range(i, len(parts)):
            sub = "/".join(parts[: j + 1])
            row = self._row(ino, parts[j])
            if row is None or row.kind == Kind.WHITEOUT:
                if row is not None:
                    self._drop(row, sub)
                ino = self._insert(ino, parts[j], sub, Kind.DIR, opaque=row is not None)
            elif row.kind == Kind.DIR:
                ino = row.ino  # known to nodes but not to dirs: cannot happen
                self._add_dir(sub, ino)
            else:
                raise _bad(self.what, path, f"{printable(sub)!r} is a {row.kind.name.lower()}")
        return ino

    def _add_dir(self, path: str, ino: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO stage.dirs VALUES (?, ?)", (_enc(path), ino))
        self._cache(path, ino)

    def _cache(self, path: str, ino: int) -> None:
        self._dir_chars += len(path)
        if self._dir_chars > _DIR_CACHE_CHARS:
            self._dirs.clear()
            self._dir_chars = len(path)
        self._dirs[path] = ino

    def _drop(self, row: _Row, path: str) -> None:
        """Remove *row* (at *path*) and, for a directory, everything below it."""
        self._dropped = True
        if row.kind == Kind.DIR:
            self._db.execute(
                f"""WITH RECURSIVE sub(ino) AS (
                    SELECT ? UNION ALL
                    SELECT n.ino FROM stage.nodes n JOIN sub ON n.parent = sub.ino
                    WHERE n.kind = {int(Kind.DIR)})
                DELETE FROM stage.nodes WHERE parent IN sub""",
                (row.ino,),
            )
            # '/' is 0x2f and '0' 0x30: the range holds exactly what is below.
            raw = _enc(path)
            self._db.execute(
                "DELETE FROM stage.dirs WHERE path = ? OR (path > ? AND path < ?)",
                (raw, raw + b"/", raw + b"0"),
            )
            self._dirs.clear()
            self._dir_chars = 0
        self._db.execute("DELETE FROM stage.nodes WHERE id = ?", (row.id,))

    # -- finishing ------------------------------------------------------------

    def commit(self) -> LayerIndex:
        """Write the final tables, make the file durable and rename it in.

        `finish` then `publish`: a caller that runs builds one at a time
        (they contend for the GIL) can let the next one start while this
        one waits on the disk.

        Returns:
            The finished index, open.
        """
        self.finish()
        return self.publish()

    def finish(self) -> None:
        """Write the final tables and close the file; nothing can be added after."""
        db = self._db
        self._flush_chunks()
        db.execute(_COPY_UNLINKED if self._next_link == -1 else _COPY_LINKED)
        db.execute(_CHILD_RANGES)
        db.execute("CREATE UNIQUE INDEX nodes_name ON nodes(parent, name)")
        db.execute("CREATE INDEX nodes_ino ON nodes(ino)")
        # Inodes no name reaches any more (replaced, or under a dropped
        # directory) take their xattrs and chunks with them; only `_drop`
        # leaves such inodes.
        reached = " WHERE EXISTS (SELECT 1 FROM nodes WHERE nodes.ino = x.ino)"
        for table in ("xattrs", "chunks"):
            db.execute(
                f"INSERT INTO {table} SELECT * FROM stage.{table} AS x"
                + (reached if self._dropped else "")
            )
        self._unique_finos()
        self._meta["count"] = str(db.execute("SELECT count(*) FROM nodes").fetchone()[0])
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(self._meta.items()))
        db.execute("COMMIT")
        db.execute("DETACH DATABASE stage")
        db.close()
        self._conn = None
        self._stage.unlink(missing_ok=True)
        self._finished = True

    def publish(self) -> LayerIndex:
        """Make the file `finish` wrote durable and rename it into place.

        Returns:
            The finished index, open.
        """
        if not self._finished:
            raise InvalidArgument(f"{self.what}: index writer not finished")
        _fsync(self._tmp)
        os.replace(self._tmp, self.path)
        self._finished = False  # published: abort has nothing left to remove
        _fsync(self.path.parent)
        return LayerIndex.open(self.path)

    def _unique_finos(self) -> None:
        """Give every inode its own `Node.fino`.

        xxh3 is no defence against a layer crafted to collide: later inodes
        of a clash take the next free number, so no two files of a layer
        share a stable inode. The index is made only when there is a clash.
        """
        db = self._db
        clashes = db.execute(
            "SELECT fino FROM nodes GROUP BY fino HAVING min(ino) != max(ino)"
        ).fetchall()
        if not clashes:
            return
        db.execute("CREATE INDEX nodes_fino ON nodes(fino)")
        for (fino,) in clashes:
            inos = db.execute(
                "SELECT DISTINCT ino FROM nodes WHERE fino = ? ORDER BY ino", (fino,)
            ).fetchall()
            for (ino,) in inos[1:]:
                new = fino
                while db.execute("SELECT 1 FROM nodes WHERE fino = ?", (new,)).fetchone():
                    new = new + 1 if new < _INT64 else FIRST_FINO
                log.warning(
                    "%s: stable inode %d clash: inode %d takes %d", self.what, fino, ino, new
                )
                db.execute("UPDATE nodes SET fino = ? WHERE ino = ?", (new, ino))
        db.execute("DROP INDEX nodes_fino")

    def abort(self) -> None:
        """Drop everything written; idempotent (and a no-op after `commit`)."""
        if self._conn is not None or self._finished:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
            self._conn = None
            self._finished = False
            self._tmp.unlink(missing_ok=True)
            self._stage.unlink(missing_ok=True)


def _clamp(ns: int) -> int:
    """A time in SQLite's int64: times past year 2262 are cut there, not refused."""
    return max(-_INT64, min(_INT64, ns))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading ------------------------------------------------------------------


def _node(row: Sequence[Any]) -> Node:
    return Node(
        ino=row[0],
        parent=row[1],
        name=_dec(row[2]),
        kind=Kind(row[3]),
        mode=row[4],
        uid=row[5],
        gid=row[6],
        size=row[7],
        mtime_ns=row[8],
        rdev=row[9],
        link=_dec(row[10]),
        nlink=row[11],
        fino=row[12],
        data=row[13],
        opaque=bool(row[14]),
        implied=bool(row[15]),
    )


class LayerIndex:
    """A finished index, read-only; safe to use from any thread.

    One SQLite connection behind a lock: each query takes microseconds, so
    the lock costs less than a connection per worker thread would in memory.
    The file is opened immutable (it never changes once renamed in), so
    SQLite takes no file locks; removing it while open is fine.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._lock = threading.Lock()
        meta = dict(self._all("SELECT key, value FROM meta"))
        if meta.get("format") != str(FORMAT):
            raise DataLoss(f"{path}: layer index format {meta.get('format')!r}, not {FORMAT}")
        self._meta: dict[str, str] = meta
        self.layer = Digest.parse(meta["layer"])
        self.source = meta["source"]
        self.blob_size = int(meta["blob_size"])
        self.count = int(meta["count"])

    @classmethod
    def open(cls, path: Path) -> LayerIndex:
        """Open the index at *path*.

        Raises:
            NotFound: no file there.
            DataLoss: the file is not a layer index of this format.
        """
        if not path.is_file():
            raise NotFound(f"layer index {path} not found")
        conn = sqlite3.connect(
            f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA cache_size=-{_READ_CACHE_KIB}")
            return cls(path, conn)
        except (sqlite3.Error, KeyError, ValueError) as e:
            conn.close()
            raise DataLoss(f"{path}: not a layer index: {e}") from None
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> LayerIndex:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock, self._translated():
            return self._conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        with self._lock, self._translated():
            return self._conn.execute(sql, params).fetchone()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """SQLite's errors as ckfs's: a server thread reading an index that
        was closed under it, or damaged on disk, fails that one call."""
        try:
            yield
        except sqlite3.ProgrammingError as e:
            raise FailedPrecondition(f"layer index {self.path}: {e}") from None
        except sqlite3.DatabaseError as e:
            raise DataLoss(f"layer index {self.path}: {e}") from None

    def meta(self, key: str) -> str | None:
        """A value the writer recorded with `IndexWriter.set_meta` (or None)."""
        return self._meta.get(key)

    def root(self) -> Node:
        return self.node(ROOT)

    def node(self, ino: int) -> Node:
        """The node of local inode *ino* (a hardlinked one: one of its names,
        always the same one).

        Raises:
            NotFound: no such inode in this layer.
        """
        row = self._one(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE ino = ? LIMIT 1", (ino,))
        if row is None:
            raise NotFound(f"layer {self.layer}: no inode {ino}")
        return _node(row)

    def lookup(self, parent: int, name: str | bytes) -> Node | None:
        """The entry *name* of directory *parent*, or None."""
        raw = _enc(name) if isinstance(name, str) else name
        row = self._one(
            f"SELECT {_NODE_COLUMNS} FROM nodes WHERE parent = ? AND name = ?", (parent, raw)
        )
        return None if row is None else _node(row)

    def children(self, ino: int, offset: int, limit: int) -> list[Node]:
        """Entries *offset* .. *offset* + *limit* of directory *ino*, by name.

        The order is stable (byte order of names), so an offset is a
        position a listing can resume at; an offset past the end, or a
        non-directory, gives an empty list.
        """
        row = self._one("SELECT child0, nchild FROM nodes WHERE ino = ? LIMIT 1", (ino,))
        if row is None or offset >= row[1] or limit <= 0:
            return []
        first = row[0] + max(offset, 0)
        last = row[0] + min(row[1], max(offset, 0) + limit) - 1
        rows = self._all(
            f"SELECT {_NODE_COLUMNS} FROM nodes WHERE rowid BETWEEN ? AND ? ORDER BY rowid",
            (first, last),
        )
        return [_node(r) for r in rows]

    def iter_children(self, ino: int, batch: int = 1024) -> Iterator[Node]:
        """Every entry of directory *ino*, fetched *batch* at a time."""
        offset = 0
        while page := self.children(ino, offset, batch):
            yield from page
            offset += len(page)

    def path_of(self, ino: int) -> str:
        """The path of inode *ino* ("" for the root; for a hardlink, the name
        `node` gives).

        For messages and checks, not the hot path: one query per level.

        Raises:
            NotFound: no such inode in this layer.
        """
        names: list[str] = []
        while ino != ROOT:
            row = self._one("SELECT parent, name FROM nodes WHERE ino = ? LIMIT 1", (ino,))
            if row is None:
                raise NotFound(f"layer {self.layer}: no inode {ino}")
            ino = row[0]
            names.append(_dec(row[1]))
        return "/".join(reversed(names))

    def implied_dirs(self) -> list[str]:
        """Paths of the directories the layer only names as parents, shallow first."""
        inos = [r[0] for r in self._all("SELECT ino FROM nodes WHERE implied = 1")]
        return sorted((self.path_of(i) for i in inos), key=lambda p: (p.count("/"), p))

    def xattrs(self, ino: int) -> dict[str, bytes]:
        """The extended attributes of inode *ino* (name → value)."""
        return {
            _dec(k): bytes(v)
            for k, v in self._all("SELECT name, value FROM xattrs WHERE ino = ?", (ino,))
        }

    def chunks(self, ino: int) -> list[Chunk]:
        """The chunks of file *ino* in file order (empty unless chunked)."""
        rows = self._all(
            "SELECT file_offset, size, blob_offset, inner_offset, digest, comp_size "
            "FROM chunks WHERE ino = ? ORDER BY file_offset",
            (ino,),
        )
        return [Chunk(*r) for r in rows]

    def spans(self) -> list[Span]:
        """Every span, in stream order."""
        return [Span(*r) for r in self._all(f"{_SPANS} ORDER BY uncomp_offset")]

    def span_for(self, uncomp_offset: int) -> Span | None:
        """The span holding byte *uncomp_offset* of the tar stream, or None."""
        row = self._one(
            f"{_SPANS} WHERE uncomp_offset <= ? ORDER BY uncomp_offset DESC LIMIT 1",
            (uncomp_offset,),
        )
        if row is None or uncomp_offset >= row[2] + row[3]:
            return None
        return Span(*row)


_SPANS = "SELECT comp_offset, comp_size, uncomp_offset, uncomp_size, sha256 FROM spans"


#: Implied directories `through_lower_links` checks; past this many it
#: answers the next one unchecked, so a layer of a million implied
#: directories costs bounded time (and is served eagerly).
MAX_IMPLIED_CHECKS = 100_000


def through_lower_links(
    index: LayerIndex, lowers: Sequence[LayerIndex], non_dirs: Container[str] = frozenset()
) -> str | None:
    """A path *index* puts below what a lower layer has as a non-directory.

    A layer may hold ``lib/x`` without a ``lib/`` entry while a lower layer
    has ``lib`` as a symlink (a usrmerge ``lib -> usr/lib``). Unpacked over
    the lowers, ``x`` lands in ``usr/lib`` through the link; served as its
    own overlayfs lower, the layer's implied ``lib`` directory would hide
    the lower link instead, and the two trees would differ. Such a layer
    is served eagerly: this finds one (an explicit directory entry means
    the layer replaces the link, the same both ways).

    Conservative: a lower's whiteouts and opaque directories above are not
    followed, so a link a middle layer deleted still counts.

    Args:
        index: the layer to attach.
        lowers: the layers below it, in any order.
        non_dirs: paths layers below it without an index (eager ones, read
            from their blobs) hold as non-directories (`implied_prefixes`
            says which are worth collecting).

    Returns:
        The first implied directory of *index* that goes through a lower
        non-directory, or None when there is none.
    """
    for checked, path in enumerate(index.implied_dirs()):
        if checked >= MAX_IMPLIED_CHECKS:
            return path
        parts = path.split("/")
        if non_dirs and any("/".join(parts[:n]) in non_dirs for n in range(1, len(parts) + 1)):
            return path
        for lower in lowers:
            ino = ROOT
            for part in parts:
                node = lower.lookup(ino, part)
                if node is None or node.kind == Kind.WHITEOUT:
                    break
                if node.kind != Kind.DIR:
                    return path
                ino = node.ino
    return None


def implied_prefixes(index: LayerIndex) -> set[str]:
    """Every path `through_lower_links` looks up for *index*: its implied
    directories (as many as it checks) and their parents."""
    found: set[str] = set()
    for path in index.implied_dirs()[:MAX_IMPLIED_CHECKS]:
        parts = path.split("/")
        found.update("/".join(parts[:n]) for n in range(1, len(parts) + 1))
    return found


def iter_nodes(index: LayerIndex, top: int = ROOT) -> Iterable[tuple[str, Node]]:
    """(path, node) of every entry below *top*, depth first, for tests and tools."""
    stack: list[tuple[str, int]] = [("", top)]
    while stack:
        prefix, ino = stack.pop()
        for child in index.iter_children(ino):
            path = f"{prefix}/{child.name}" if prefix else child.name
            yield path, child
            if child.kind == Kind.DIR:
                stack.append((path, child.ino))
