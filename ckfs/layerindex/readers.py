"""Where a layer's file bytes come from: the FUSE server's and ``ckfs cat``'s readers.

`Readers` picks one `Reader` per open layer index, by the index's source and
whether the layer's blob is in the root's content store:

- ``tar`` with the blob local: read straight from the blob at each file's
  data offset (`LocalTarReader`). The blob was verified by digest when it
  was committed and is read-only since, so copying its bytes into the chunk
  cache would only double the disk used.
- ``estargz`` (local or not) and ``tar`` in a registry: the lazy data path,
  `ckfs.layerindex.reader.LayerReader` (ranged fetches, sha256 checks, the
  chunk cache, `ckfs.state.State.cache_dir`). A remote layer's index names where to
  fetch it in its meta: ``ref`` (a reference of the repository holding the
  layer) and optionally ``media_type``. Registries are reached as a pull on
  this root would (its hosts directories and Docker credentials).
- ``gzip-index`` with the blob local: the same `LayerReader`, which inflates
  spans from the checkpoint nearest each read and caches them. A gzip layer
  without its local blob cannot be read: every read fails, saying why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from ckfs import mediatypes
from ckfs.content.fsutil import pread_exact
from ckfs.content.store import blob_file
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import DataLoss, FailedPrecondition, Unimplemented
from ckfs.layerindex.cache import ChunkCache
from ckfs.layerindex.model import LayerIndex, Node
from ckfs.layerindex.reader import BlobSource, LayerReader, LocalBlob, RemoteBlob
from ckfs.reference import parse

if TYPE_CHECKING:
    from ckfs.remotes.registry import RegistryClient

__all__ = ["LocalTarReader", "Reader", "Readers", "Unserved"]

#: What a remote layer's media type is taken to be when its index does not
#: say: only the range reads use it, and they do not depend on it.
DEFAULT_MEDIA_TYPE = mediatypes.OCI_LAYER_GZIP


class Reader(Protocol):
    """Where one layer's file bytes come from."""

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        """Up to *size* bytes of *node*'s file from *offset*; short only at its end."""
        ...


class LocalTarReader:
    """File bytes of an uncompressed tar layer, from its local blob.

    Args:
        blob: the layer's blob in the content store.
    """

    def __init__(self, blob: Path) -> None:
        self.blob = blob
        self._fd: int | None = None

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        """*size* bytes of *node* from *offset* (the caller clips to its size).

        Raises:
            DataLoss: *node* has no data offset (its bytes are chunked), or
                the blob ends before them.
        """
        if node.data < 0:
            raise DataLoss(f"{self.blob}: {node.name!r} has no offset in the tar stream")
        return await trio.to_thread.run_sync(self._pread, node.data + offset, size)

    def _pread(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.blob, os.O_RDONLY | os.O_CLOEXEC)
        data = pread_exact(self._fd, size, offset)
        if len(data) != size:
            raise DataLoss(f"{self.blob}: ends before offset {offset + size}")
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Unserved:
    """The reader of a layer that cannot be read: every read fails, saying why."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        raise self.error


class _Counted:
    """A `LayerReader` whose counters add up into its layer's totals.

    A layer's reader goes when the kernel forgets the layer's last inode;
    its counts stay in the totals, which last as long as the server.
    """

    def __init__(self, inner: LayerReader, totals: dict[str, int]) -> None:
        self.inner = inner
        self.totals = totals
        self._seen: dict[str, int] = {}

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        try:
            return await self.inner.read(node, offset, size)
        finally:
            now = self.inner.statistics()
            for key, value in now.items():
                self.totals[key] = self.totals.get(key, 0) + value - self._seen.get(key, 0)
            self._seen = now


class Readers:
    """Makes the `Reader` of each layer the server opens (module docstring).

    Args:
        root: the ckfs state root.
        cache: the chunk cache; default the root's (`ckfs.state.State.cache_dir`).
    """

    def __init__(self, root: Path, *, cache: ChunkCache | None = None) -> None:
        from ckfs.state import State

        self.root = root
        self.cache = cache or ChunkCache(State(root).cache_dir)
        self._clients: dict[str, RegistryClient] = {}
        self._limiter = trio.CapacityLimiter(os.cpu_count() or 1)
        self._totals: dict[Digest, dict[str, int]] = {}

    def __call__(self, index: LayerIndex) -> Reader:
        try:
            return self._make(index)
        except (Unimplemented, FailedPrecondition, DataLoss) as e:
            return Unserved(e)

    def _make(self, index: LayerIndex) -> Reader:
        layer = index.layer
        blob = blob_file(self.root, layer)
        local = blob.is_file()
        if index.source == "tar" and local:
            return LocalTarReader(blob)
        if index.source == "gzip-index" and not local:
            raise FailedPrecondition(f"layer {layer}: gzip blob {blob} is gone; pull it again")
        if index.source not in ("tar", "estargz", "gzip-index"):
            raise Unimplemented(f"layer {layer}: {index.source} layers are not served yet")
        source: BlobSource = LocalBlob(blob) if local else self._remote(index)
        reader = LayerReader(index, source, self.cache, limiter=self._limiter)
        return _Counted(reader, self._totals.setdefault(layer, {}))

    def statistics(self) -> dict[Digest, dict[str, int]]:
        """Each lazily read layer's `LayerReader.statistics`, summed since the
        server started (``fetched_bytes``, ``hits``, ``misses``, ...)."""
        return {digest: dict(totals) for digest, totals in self._totals.items()}

    def _remote(self, index: LayerIndex) -> RemoteBlob:
        where = index.meta("ref")
        if not where:
            raise FailedPrecondition(
                f"layer {index.layer}: not in the content store and its index names no registry"
            )
        ref = parse(where)
        desc = Descriptor(
            media_type=index.meta("media_type") or DEFAULT_MEDIA_TYPE,
            digest=index.layer,
            size=index.blob_size,
        )
        return RemoteBlob(self._client(ref.domain), ref, desc)

    def _client(self, domain: str) -> RegistryClient:
        """One client per registry, shared by its layers (connections, tokens)."""
        client = self._clients.get(domain)
        if client is None:
            from ckfs.remotes.auth import Credentials
            from ckfs.remotes.hosts import default_hosts_dirs, load_hosts
            from ckfs.remotes.registry import RegistryClient

            hosts = load_hosts(domain, hosts_dirs=default_hosts_dirs(self.root))
            client = self._clients[domain] = RegistryClient(
                domain, hosts=hosts, credentials=Credentials(None)
            )
        return client

    async def aclose(self) -> None:
        """Close the registry clients' connections."""
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
