"""Where the serving process gets a layer's file bytes.

`readers` picks a `Reader` per open layer index. Until the lazy data path
(``ckfs.layerindex.reader.LayerReader``: ranged fetches, chunk cache,
verification) is wired in, the one source served is an uncompressed tar
layer whose blob is in the local content store: a file's bytes sit at its
node's ``data`` offset in the blob, which is verified by digest when it was
committed and read-only since.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import trio

from ckfs.content.fsutil import pread_exact
from ckfs.errors import DataLoss, Unimplemented
from ckfs.layerindex.model import LayerIndex, Node
from snapshotters.fuse.tree import Reader

__all__ = ["LocalTarReader", "readers"]


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


class _Unserved:
    """The reader of a layer whose source is not served yet: every read fails."""

    def __init__(self, why: str) -> None:
        self.why = why

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        raise Unimplemented(self.why)


def readers(root: Path) -> Callable[[LayerIndex], Reader]:
    """The reader factory for the state root *root*."""
    blobs = root / "content" / "blobs"

    def make(index: LayerIndex) -> Reader:
        blob = blobs / index.layer.algorithm / index.layer.hex
        if index.source == "tar" and blob.exists():
            return LocalTarReader(blob)
        return _Unserved(f"layer {index.layer}: {index.source} layers are not served yet")

    return make
