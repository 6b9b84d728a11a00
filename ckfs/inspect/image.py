"""An image as its layers' indexes: what `ckfs layers`, `which`, `ls` and `cat` read.

No root and nothing unpacked: each layer is read through its index
(`ckfs.layerindex`), which is built if missing, from the local blob when it
is here, else by Range requests from the registry the image came from (as
``ckfs pull --lazy`` does). The indexes are stored, as caches, exactly
where the lazy snapshotter keeps them, so a later lazy mount reuses them.

A layer nothing indexes lazily (zstd, say) is "eager": its local blob is
streamed once to index its tar headers into a temporary index (never
stored: the FUSE server would take it for one it can serve), and a file is
read by streaming the blob to it. A lazily recorded image has such blobs
locally (a lazy pull fetches them).

File bytes come from the same readers the FUSE server uses
(`ckfs.layerindex.readers.Readers`): verified before they are returned,
cached in the chunk cache, never the whole layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from ckfs.options import DEFAULTS, PullOptions

if TYPE_CHECKING:
    from ckfs.descriptor import Descriptor
    from ckfs.digest import Digest
    from ckfs.images.config import ImageConfig
    from ckfs.layerindex.model import LayerIndex, Node
    from ckfs.state import State

__all__ = ["EAGER", "ImageLayers", "LayerInfo"]

#: `LayerInfo.source` of a layer indexed only for inspection (module docstring).
EAGER = "eager"


@dataclass(frozen=True)
class LayerInfo:
    """One layer of an image, with its open index.

    Attributes:
        number: 1 for the bottom layer, N for the top.
        desc: the layer blob as the manifest lists it.
        diff_id: the digest of its uncompressed tar (the config's).
        created_by: the ``created_by`` of the config history entry that made
            it (entries marked ``empty_layer`` are skipped), "" if none.
        source: what indexes it: ``estargz``, ``gzip-index``, ``tar``, or
            ``eager`` (a temporary index from streaming its local blob).
        index: the layer's index, open; `ImageLayers.close` closes it.
    """

    number: int
    desc: Descriptor
    diff_id: Digest
    created_by: str
    source: str
    index: LayerIndex


class ImageLayers:
    """An image ckfs knows, as its layers bottom first; open with `open`.

    A context manager (``with``), or close with `aclose` (which also closes
    the registry connections reads opened) or `close`.

    Attributes:
        name: the image's name as stored.
        manifest: the digest of the platform manifest read.
        config: the image config.
        layers: the layers, bottom first (``layers[0].number == 1``).
    """

    def __init__(
        self,
        name: str,
        manifest: Digest,
        config: ImageConfig,
        layers: list[LayerInfo],
        *,
        state: State,
    ) -> None:
        self.name = name
        self.manifest = manifest
        self.config = config
        self.layers = layers
        self._state = state

    @classmethod
    async def open(
        cls,
        state: State,
        ref: str,
        *,
        options: PullOptions = DEFAULTS,
        on_indexed: Callable[[int, int], None] | None = None,
    ) -> ImageLayers:
        """Open image *ref* of *state*, indexing the layers that have no index yet.

        Indexes present are reused with no network. A missing one is built
        from the local blob, or by Range requests (eStargz TOC, tar headers)
        for a lazily recorded layer; an eager layer's local blob is streamed.

        Args:
            ref: an image name (``alpine`` is ``docker.io/library/alpine:latest``).
            options: the platform to read, and registry options for Range reads.
            on_indexed: called with (layers ready, layers in all) as each
                layer's index opens, for a progress display.

        Raises:
            NotFound: no image *ref*, or a layer neither here nor indexable by
                range (an eager layer whose blob is missing).
            FailedPrecondition: manifest and config disagree.
            InvalidArgument: a layer that cannot be indexed (a hostile tree).
            Unavailable: the registry cannot be reached for a missing index.
        """
        raise NotImplementedError  # TODO(I1)

    def layer(self, n: int) -> LayerInfo:
        """Layer *n* (1 = bottom).

        Raises:
            InvalidArgument: "layer 7 out of range: <name> has 5 layers".
        """
        raise NotImplementedError  # TODO(I1)

    def upto(self, n: int) -> list[LayerInfo]:
        """Layers 1 .. *n*, bottom first (`InvalidArgument` as `layer`)."""
        raise NotImplementedError  # TODO(I1)

    async def read(self, layer: LayerInfo, node: Node, offset: int = 0, size: int = -1) -> bytes:
        """Verified bytes of regular file *node* of *layer*, from *offset*.

        Args:
            size: how many bytes at most; -1 for all to the end of the file.

        Raises:
            InvalidArgument: *node* is not a regular file.
            Unavailable, DataLoss: the bytes cannot be fetched, or do not
                match their digest.
        """
        raise NotImplementedError  # TODO(I1)

    def close(self) -> None:
        """Close the layers' indexes (readers' registry connections: `aclose`)."""
        raise NotImplementedError  # TODO(I1)

    async def aclose(self) -> None:
        """Close the indexes and the registry connections reads opened."""
        raise NotImplementedError  # TODO(I1)

    def __enter__(self) -> ImageLayers:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> ImageLayers:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
