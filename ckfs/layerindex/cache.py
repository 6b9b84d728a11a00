"""The chunk cache: verified layer bytes kept on disk, re-checked on every read.

The lazy path fetches a chunk, checks it against its sha256 once, and then
keeps it here so the next read neither goes to the registry nor hashes it with
sha256 again. What protects a cached chunk from then on is cheaper: each file
carries an xxh3-128 checksum of its payload in a small header, checked on every
read from disk. A file that fails the check (a torn write after a crash, a bit
flip, someone's editor) is deleted and reported as a miss, so the caller
fetches and verifies the chunk again; it is never served.

Layout, under the state root's ``cache/``::

    cache/<layer hex>/<key hex>        one chunk: header + payload
    cache/<layer hex>/.tmp.<random>    a write in progress (renamed when whole)

The key is the xxh3-128 of what identifies the bytes inside their layer (see
`ChunkCache.key`); the layer's own digest names the directory, so a layer's
chunks go away together (`ChunkCache.remove_layer`, used by ``ckfs gc``).

A file's header (`HEADER`, 32 bytes, little-endian)::

    magic   4 bytes   b"CKC1"
    flags   4 bytes   0
    length  8 bytes   payload bytes
    xxh3    16 bytes  xxh3-128 digest of the payload

The files are bounded too (``max_bytes``, headers included): a write that
takes the cache past it deletes the least recently used files until it is
back under `LOW_WATER` of it (never the file just written). Recency is kept
in memory: the files found when the bound is first needed are ordered by
mtime, later ones by their writes and reads here. Removing a file never
disturbs a read: an open file reads whole after its unlink, memory copies
are separate objects, and a file gone before it is opened is a miss the
caller fetches (and verifies) again. Files written by other processes are
counted when the bound is next exceeded (the directory is then walked again).

Recently used chunks are also held in memory (bounded by ``memory_bytes``):
FUSE reads a 4 MiB chunk as thirty-two 128 KiB reads, and re-reading and
re-checking the whole file for each would cost more than the read itself.

All methods except `peek`, `holds` and `statistics` do file I/O and block: call them
through `trio.to_thread`. They are safe to call from several threads at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ckfs.content.fsutil import pread_exact
from ckfs.digest import ALGORITHMS, Digest
from ckfs.errors import InvalidArgument

__all__ = [
    "DISK_SHARE",
    "HEADER",
    "LOW_WATER",
    "MAGIC",
    "MEMORY_BYTES",
    "CacheUsage",
    "ChunkCache",
]

log = logging.getLogger(__name__)

#: Identifies a cache file of this layout; a different magic is treated as
#: corruption (dropped and refetched), so a future layout needs no migration.
MAGIC = b"CKC1"

_HEADER = struct.Struct("<4sIQ16s")

#: Header bytes before the payload.
HEADER = _HEADER.size

#: Default bound on chunk bytes held in memory. Enough for a few 4 MiB
#: chunks of several files read at once (readahead, parallel readers), small
#: against the serving process's 100 MB memory budget.
MEMORY_BYTES = 32 << 20

#: The serving process's disk bound (``disk_share``): this share of what the
#: cache's filesystem could give it (its free space plus what the cache
#: already holds). Chunks are only a copy of what a registry keeps: enough
#: for the working set of many images, while most of the disk stays for
#: containers and images.
DISK_SHARE = 0.25

#: Eviction goes down to this fraction of the bound, so a cache at its bound
#: does not walk its order and unlink a file on every write.
LOW_WATER = 0.9

_TMP_PREFIX = ".tmp."


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """Disk used by the cache (or one layer of it).

    Attributes:
        size: bytes of the cache files (headers included).
        files: number of cache files, writes in progress included.
    """

    size: int = 0
    files: int = 0


class ChunkCache:
    """Verified chunks of every layer under one directory.

    Args:
        root: the cache directory (``<state root>/cache``); created on the
            first write.
        memory_bytes: bound on the in-memory copies of recent chunks; 0 keeps
            none.
        max_bytes: bound on the cache files' bytes (module docstring).
        disk_share: without *max_bytes*, bound the files to this share of
            what the cache's filesystem could give them (free space plus the
            cache's files, measured when the bound is first needed; the
            serving process passes `DISK_SHARE`). Neither: no bound (tools
            that only read or remove).
    """

    def __init__(
        self,
        root: Path,
        *,
        memory_bytes: int = MEMORY_BYTES,
        max_bytes: int | None = None,
        disk_share: float | None = None,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._disk_share = disk_share
        self._bounded = max_bytes is not None or disk_share is not None
        self._memory_bytes = memory_bytes
        self._memory: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        #: Cache files by recency (oldest first) and size; None until the
        #: bound is first needed.
        self._files: OrderedDict[tuple[Digest, str], int] | None = None
        self._stored = 0
        self._stats = {
            "hits": 0,
            "memory_hits": 0,
            "misses": 0,
            "corrupt": 0,
            "writes": 0,
            "evicted": 0,
        }

    def __repr__(self) -> str:
        return f"ChunkCache({str(self.root)!r})"

    @staticmethod
    def key(*parts: str | int) -> str:
        """The cache key (32 hex digits) for bytes identified by *parts*.

        Callers pass everything that determines the bytes (kind, offsets,
        sizes, expected digest), so a changed index never finds stale bytes.
        """
        material = "\0".join(str(p) for p in parts).encode()
        return xxhash.xxh3_128_hexdigest(material)

    def peek(self, layer: Digest, key: str) -> bytes | None:
        """The chunk if it is held in memory, without touching the disk.

        Cheap enough for the event loop; counts a hit only when found.
        """
        with self._lock:
            data = self._memory.get((layer, key))
            if data is not None:
                self._memory.move_to_end((layer, key))
                self._stats["hits"] += 1
                self._stats["memory_hits"] += 1
                self._used((layer, key))
            return data

    def holds(self, layer: Digest, key: str) -> bool:
        """Whether the chunk is held in memory (no counters touched)."""
        with self._lock:
            return (layer, key) in self._memory

    def get(self, layer: Digest, key: str) -> bytes | None:
        """The chunk stored under *key* for *layer*, or None (a miss).

        A file whose header or checksum is wrong is deleted and counted as
        ``corrupt`` (and as a miss): the caller fetches the chunk again.
        """
        data = self.peek(layer, key)
        if data is not None:
            return data
        path = self._path(layer, key)
        try:
            data = _read_checked(path)
        except FileNotFoundError:
            data, corrupt = None, False
        except OSError as e:  # unreadable: a miss; the fetch's put replaces it
            log.warning("chunk cache %s: %s", path, e)
            data, corrupt = None, False
        else:
            corrupt = data is None
        with self._lock:
            if data is None:
                self._stats["misses"] += 1
                self._stats["corrupt"] += corrupt
            else:
                self._stats["hits"] += 1
                self._remember(layer, key, data)
                self._used((layer, key))
        if corrupt:
            self._unlink(layer, key)
        return data

    def put(self, layer: Digest, key: str, data: bytes) -> None:
        """Store *data* (already verified by the caller) under *key*.

        The file appears whole or not at all: it is written under a temporary
        name and renamed. It is not fsynced: a crash can leave a torn file,
        which its checksum catches on the next read, and a cache write per
        chunk should not wait for the disk.
        """
        directory = self._dir(layer)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        header = _HEADER.pack(MAGIC, 0, len(data), xxhash.xxh3_128_digest(data))
        try:
            with open(tmp, "xb", buffering=0) as f:
                _write_all(f.fileno(), header)
                _write_all(f.fileno(), data)
            os.replace(tmp, directory / key)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with self._lock:
            self._stats["writes"] += 1
            self._remember(layer, key, data)
        if self._bounded:
            self._account(layer, key, HEADER + len(data))

    def remove_layer(self, layer: Digest) -> None:
        """Delete every chunk of *layer* (memory and disk); no error if none."""
        with self._lock:
            for k in [k for k in self._memory if k[0] == layer]:
                self._held -= len(self._memory.pop(k))
            for k in [k for k in self._files or () if k[0] == layer]:
                self._forget(k)
        shutil.rmtree(self._dir(layer), ignore_errors=True)

    def layers(self) -> list[Digest]:
        """Digests of the layers with a directory in the cache, sorted.

        The algorithm is read back from the hex length (sha256: 64, sha512:
        128); directories that fit neither are not ckfs's and are skipped.
        """
        by_length = {n: alg for alg, n in ALGORITHMS.items()}
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                alg = by_length.get(len(entry.name))
                if alg and entry.is_dir(follow_symlinks=False):
                    with contextlib.suppress(InvalidArgument):
                        found.append(Digest.parse(f"{alg}:{entry.name}"))
        return sorted(found)

    def usage(self, layer: Digest | None = None) -> CacheUsage:
        """Bytes and files on disk for *layer*, or for the whole cache."""
        size = files = 0
        for each in [layer] if layer else self.layers():
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(self._dir(each)):
                    with contextlib.suppress(FileNotFoundError):
                        size += entry.stat(follow_symlinks=False).st_size
                        files += 1
        return CacheUsage(size=size, files=files)

    def statistics(self) -> dict[str, int]:
        """Counters since this object was made: hits (memory_hits of them from
        memory), misses, corrupt files dropped, writes, files evicted; and
        bytes held in memory.
        """
        with self._lock:
            return {**self._stats, "memory_held": self._held}

    def count(self) -> None:
        """Walk the cache's files now and fix the bound, so that the first
        write (a read waiting on it) does not; blocking. Without a bound,
        nothing to do."""
        if not self._bounded:
            return
        on_disk = self._scan()
        with self._lock:
            if self._files is None:
                self._files, self._stored = on_disk, sum(on_disk.values())
            if self.max_bytes is None:
                self.max_bytes = _share_of_disk(self.root, self._stored, self._disk_share)

    def _account(self, layer: Digest, key: str, size: int) -> None:
        """Count a file just written; past the bound, evict down to `LOW_WATER`.

        The directory walk (first use, and each time the bound is passed, to
        count other processes' files) runs outside the lock: `peek` takes it
        on the event loop.
        """
        with self._lock:
            if self._files is not None:
                self._forget((layer, key))
                self._files[(layer, key)] = size
                self._stored += size
                if self._stored <= self._bound():
                    return
        on_disk = self._scan()
        with self._lock:
            known = self._files or OrderedDict()
            # Files only the walk found (other processes') count as oldest.
            files = OrderedDict((k, n) for k, n in on_disk.items() if k not in known)
            files.update((k, on_disk[k]) for k in known if k in on_disk)
            files[(layer, key)] = size
            files.move_to_end((layer, key))
            self._files, self._stored = files, sum(files.values())
            if self.max_bytes is None:
                self.max_bytes = _share_of_disk(self.root, self._stored, self._disk_share)
            victims = []
            over = self._stored > self._bound()
            while over and self._stored > self._bound() * LOW_WATER and len(files) > 1:
                victim = next(iter(files))
                self._forget(victim)
                victims.append(victim)
            self._stats["evicted"] += len(victims)
        for victim in victims:
            self._unlink(*victim)

    def _bound(self) -> int:
        """The disk bound (under _lock, once `max_bytes` is known)."""
        return self.max_bytes if self.max_bytes is not None else 0

    def _used(self, k: tuple[Digest, str]) -> None:
        """File *k* was just read (from disk or its memory copy): the most
        recent, last to be evicted; under _lock."""
        if self._files is not None and k in self._files:
            self._files.move_to_end(k)

    def _forget(self, k: tuple[Digest, str]) -> None:
        """Stop counting file *k*; under _lock."""
        if self._files is not None:
            self._stored -= self._files.pop(k, 0)

    def _scan(self) -> OrderedDict[tuple[Digest, str], int]:
        """The cache files on disk by mtime (oldest first), with their sizes."""
        found = []
        for layer in self.layers():
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(self._dir(layer)):
                    if entry.name.startswith(_TMP_PREFIX):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat(follow_symlinks=False)
                        found.append((st.st_mtime_ns, layer, entry.name, st.st_size))
        found.sort()
        return OrderedDict(((layer, key), size) for _, layer, key, size in found)

    def _unlink(self, layer: Digest, key: str) -> None:
        with self._lock:
            self._forget((layer, key))
        with contextlib.suppress(FileNotFoundError):
            self._path(layer, key).unlink()

    def _dir(self, layer: Digest) -> Path:
        """Where *layer*'s chunks are: named by its hex (`layers` reads the algorithm back)."""
        return self.root / layer.split(":", 1)[1]

    def _path(self, layer: Digest, key: str) -> Path:
        return self._dir(layer) / key

    def _remember(self, layer: Digest, key: str, data: bytes) -> None:
        """Hold *data* in memory, evicting the least recently used; under _lock."""
        if len(data) > self._memory_bytes:
            return
        old = self._memory.pop((layer, key), None)
        if old is not None:
            self._held -= len(old)
        self._memory[(layer, key)] = data
        self._held += len(data)
        while self._held > self._memory_bytes:
            _, evicted = self._memory.popitem(last=False)
            self._held -= len(evicted)


def _share_of_disk(root: Path, stored: int, share: float | None) -> int:
    """*share* of the free space of *root*'s filesystem (its nearest existing
    directory's) plus *stored*."""
    while not root.exists() and root != root.parent:
        root = root.parent
    st = os.statvfs(root)
    return int((st.f_bavail * st.f_frsize + stored) * (share or 0))


def _read_checked(path: Path) -> bytes | None:
    """The payload of the cache file at *path*, or None if it is not intact.

    Raises:
        FileNotFoundError: there is no such file (a plain miss).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header = os.pread(fd, HEADER, 0)
        if len(header) != HEADER:
            return None
        magic, flags, length, checksum = _HEADER.unpack(header)
        if magic != MAGIC or flags != 0 or os.fstat(fd).st_size != HEADER + length:
            return None
        data = pread_exact(fd, length, HEADER)
    finally:
        os.close(fd)
    if len(data) != length or xxhash.xxh3_128_digest(data) != checksum:
        return None
    return data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
