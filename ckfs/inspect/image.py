"""An image as its layers' indexes: what `ckfs layers`, `which`, `ls` and `cat` read.

No root and nothing unpacked: each layer is read through its index
(`ckfs.layerindex`), which is built if missing, from the local blob when it
is here, else from the registry the image came from as ``ckfs pull --lazy``
does (an eStargz TOC by Range requests; an uncompressed tar, which has no
table of contents, streamed once, with a warning). The indexes are stored, as caches, exactly
where the lazy snapshotter keeps them, so a later lazy mount reuses them.

A layer nothing indexes lazily (zstd, say) is "eager": its local blob is
streamed once to index its tar headers into a temporary index (never
stored: the FUSE server would take it for one it can serve), and a file is
read by streaming the blob to it. A lazily recorded image has such blobs
locally (a lazy pull fetches them).

File bytes come from the same readers the FUSE server uses
(`ckfs.layerindex.readers.Readers`): verified before they are returned,
cached in the chunk cache, never more of the layer than the file's chunks
or spans.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

import trio

from ckfs.archive.entry import Kind
from ckfs.content.store import blob_file
from ckfs.errors import DataLoss, InvalidArgument, NotFound
from ckfs.lazy import EAGER, ESTARGZ, TAR
from ckfs.options import DEFAULTS, PullOptions
from ckfs.safetext import printable

if TYPE_CHECKING:
    from ckfs.descriptor import Descriptor
    from ckfs.digest import Digest
    from ckfs.images.config import ImageConfig
    from ckfs.layerindex.model import LayerIndex, Node
    from ckfs.layerindex.readers import Reader
    from ckfs.lazy import OnDemandClient
    from ckfs.state import State

__all__ = [
    "EAGER",
    "ImageLayers",
    "LayerInfo",
    "LayerStats",
    "StreamedReader",
    "created_by",
    "layer_stats",
]

log = logging.getLogger(__name__)

#: The uncompressed size eStargz writers (ctr-remote, nerdctl) annotate layers with.
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"


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

    A context manager (``with``, or ``async with``, which also closes the
    registry connections reads opened), or close with `aclose` / `close`.

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
        root: Path,
        scratch: Path | None = None,
    ) -> None:
        from ckfs.layerindex.readers import Readers

        self.name = name
        self.manifest = manifest
        self.config = config
        self.layers = layers
        self._root = root
        self._scratch = scratch  # eager layers' temporary indexes
        self._readers = Readers(root)
        self._opened: dict[int, Reader] = {}

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
        from the local blob, or for a lazily recorded layer from the
        registry: an eStargz TOC by Range requests; an uncompressed tar by
        streaming it once (a warning says so: it has no table of contents).
        An eager layer's local blob is streamed.

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
        from ckfs import reference
        from ckfs.images import image as img
        from ckfs.lazy import INDEX_CONCURRENCY, OnDemandClient
        from ckfs.rootfs import image_chain

        parsed = reference.parse(ref)
        image = await trio.to_thread.run_sync(state.images.get, str(parsed))
        manifest_desc, _ = await trio.to_thread.run_sync(
            img.manifest, state.content, image.target, options.platform
        )
        manifest, config, _ = await trio.to_thread.run_sync(
            image_chain, state.content, image.target, options.platform
        )
        made = _Made(len(manifest.layers), on_indexed)
        history = created_by(config)
        limiter = trio.CapacityLimiter(INDEX_CONCURRENCY)
        try:
            async with OnDemandClient(state, parsed, options) as remote:

                async def one(at: list[int], desc: Descriptor) -> None:
                    async with limiter:
                        index, source = await _layer_index(
                            state, desc, config.diff_ids[at[0]], remote, made
                        )
                    for i in at:
                        made.layers[i] = LayerInfo(
                            i + 1, desc, config.diff_ids[i], history[i], source, index
                        )
                        made.done()

                # A blob listed twice (old images repeat the empty layer) is
                # indexed once: its LayerInfos share the index.
                where: dict[Digest, list[int]] = {}
                for i, desc in enumerate(manifest.layers):
                    where.setdefault(desc.digest, []).append(i)
                async with trio.open_nursery() as nursery:
                    for at in where.values():
                        nursery.start_soon(one, at, manifest.layers[at[0]])
        except BaseException:
            made.close()
            raise
        layers = [layer for layer in made.layers if layer is not None]
        return cls(
            str(parsed),
            manifest_desc.digest,
            config,
            layers,
            root=state.root,
            scratch=made.scratch,
        )

    def layer(self, n: int) -> LayerInfo:
        """Layer *n* (1 = bottom).

        Raises:
            InvalidArgument: "layer 7 out of range: <name> has 5 layers".
        """
        from ckfs.rootfs import layer_in_range

        return self.layers[layer_in_range(n, len(self.layers), self.name) - 1]

    def upto(self, n: int) -> list[LayerInfo]:
        """Layers 1 .. *n*, bottom first (`InvalidArgument` as `layer`)."""
        self.layer(n)
        return self.layers[:n]

    async def read(self, layer: LayerInfo, node: Node, offset: int = 0, size: int = -1) -> bytes:
        """Verified bytes of regular file *node* of *layer*, from *offset*.

        Args:
            size: how many bytes at most; -1 for all to the end of the file.

        Raises:
            InvalidArgument: *node* is not a regular file.
            Unavailable, DataLoss: the bytes cannot be fetched, or do not
                match their digest.
        """
        if node.kind != Kind.FILE:
            raise InvalidArgument(f"{printable(node.name)!r} is not a regular file")
        end = node.size if size < 0 else min(node.size, offset + size)
        if offset >= end:
            return b""
        reader = self._opened.get(layer.number)
        if reader is None:
            reader = self._opened[layer.number] = self._reader(layer)
        return await reader.read(node, offset, end - offset)

    def _reader(self, layer: LayerInfo) -> Reader:
        if layer.source != EAGER:
            return self._readers(layer.index)
        return StreamedReader(blob_file(self._root, layer.desc.digest), layer.desc.media_type)

    def close(self) -> None:
        """Close the layers' indexes (readers' registry connections: `aclose`)."""
        for reader in self._opened.values():
            closer = getattr(reader, "close", None)
            if closer is not None:
                closer()
        self._opened.clear()
        for layer in self.layers:
            layer.index.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    async def aclose(self) -> None:
        """Close the indexes and the registry connections reads opened."""
        try:
            with trio.CancelScope(shield=True):
                await self._readers.aclose()
        finally:
            self.close()

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


@dataclass(frozen=True)
class LayerStats:
    """What one layer holds, counted from its index (`layer_stats`).

    Attributes:
        entries: its entries: whiteouts counted, the root and the
            directories it only implies (as parents) not.
        files: regular files (a hardlinked file once).
        file_bytes: their bytes.
        uncompressed_size: its tar stream's size, when the index or the
            descriptor says it (eStargz without the annotation: None).
    """

    entries: int
    files: int
    file_bytes: int
    uncompressed_size: int | None


def layer_stats(layer: LayerInfo) -> LayerStats:
    """*layer*'s `LayerStats`; blocking (one walk of its index)."""
    from ckfs.layerindex.model import iter_nodes

    entries = 0
    inos: dict[int, int] = {}
    for _, node in iter_nodes(layer.index):
        if not node.implied:
            entries += 1
        if node.kind == Kind.FILE:
            inos[node.ino] = node.size
    return LayerStats(entries, len(inos), sum(inos.values()), _uncompressed_size(layer))


def _uncompressed_size(layer: LayerInfo) -> int | None:
    """The tar stream's size, as whatever indexed *layer* recorded it."""
    if layer.index.source == "tar" and layer.source != EAGER:
        return layer.index.blob_size
    known = layer.index.meta("uncompressed_size") or (layer.desc.annotations or {}).get(
        UNCOMPRESSED_SIZE_ANNOTATION
    )
    return int(known) if known and known.isdigit() else None


def created_by(config: ImageConfig) -> list[str]:
    """Each layer's ``created_by``, bottom first, from the config's history.

    History entries marked ``empty_layer`` made no layer (ENV, CMD, ...):
    the others match the layers in order. A history shorter than the
    layers (or none) leaves the rest "".
    """
    made = [h.created_by for h in config.history if not h.empty_layer]
    return [*made, *[""] * (len(config.diff_ids) - len(made))][: len(config.diff_ids)]


class StreamedReader:
    """File bytes of a layer nothing indexes lazily, streamed from its local blob.

    Such a layer has no seek points: the blob is decompressed from its
    start up to the file. The stream stays open at where the last read
    ended, so reading a file piece by piece (``cat``) decompresses the
    layer once; a read before that point starts over. The blob was
    verified by digest when it was committed and is read-only since.

    Args:
        blob: the layer blob in the content store.
        media_type: its media type (the compression).
    """

    def __init__(self, blob: Path, media_type: str) -> None:
        self.blob = blob
        self.media_type = media_type
        self._lock = threading.Lock()  # one read at a time moves the stream
        self._files: list[BinaryIO] = []  # the blob, then its tar stream
        self._at = 0  # offset in the tar stream

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        """*size* bytes of *node* from *offset* (the caller clips to its size)."""
        return await trio.to_thread.run_sync(self._read, node.data + offset, size)

    def _read(self, offset: int, size: int) -> bytes:
        from ckfs.archive.compression import open_layer

        with self._lock:
            if not self._files or offset < self._at:
                self._close()
                self._files.append(open(self.blob, "rb"))  # noqa: SIM115 - kept open
                self._files.append(open_layer(self._files[0], self.media_type))
            tar = self._files[1]
            while self._at < offset:
                skipped = len(tar.read(min(offset - self._at, _SKIP)))
                if not skipped:
                    break
                self._at += skipped
            data = tar.read(size) if self._at == offset else b""
            self._at += len(data)
        if len(data) != size:
            raise DataLoss(f"layer blob {self.blob}: ends before the file does")
        return data

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        for f in reversed(self._files):
            f.close()
        self._files.clear()
        self._at = 0


#: Bytes discarded per read while streaming to a file of an eager layer.
_SKIP = 1 << 20


class _Made:
    """What `ImageLayers.open` has made so far: closed if it fails half way."""

    def __init__(self, total: int, on_indexed: Callable[[int, int], None] | None) -> None:
        self.layers: list[LayerInfo | None] = [None] * total
        self.scratch: Path | None = None
        self._on_indexed = on_indexed
        self._done = 0

    def done(self) -> None:
        self._done += 1
        if self._on_indexed is not None:
            self._on_indexed(self._done, len(self.layers))

    def scratch_dir(self) -> Path:
        if self.scratch is None:
            self.scratch = Path(tempfile.mkdtemp(prefix="ckfs-inspect-"))
        return self.scratch

    def close(self) -> None:
        for layer in self.layers:
            if layer is not None:
                layer.index.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


async def _layer_index(
    state: State, desc: Descriptor, diff_id: Digest, remote: OnDemandClient, made: _Made
) -> tuple[LayerIndex, str]:
    """*desc*'s index, open, and its source: the stored one, else one built now."""
    from ckfs.layerindex.model import BadLayer
    from ckfs.layerindex.store import IndexStore
    from ckfs.lazy import build_index, source_of

    store = IndexStore(state.root)
    existing = await trio.to_thread.run_sync(store.get, desc.digest)
    if existing is not None:
        return existing, existing.source
    source = source_of(desc)
    blob = blob_file(state.root, desc.digest)
    local = await trio.to_thread.run_sync(blob.is_file)
    meta = {"ref": str(remote.ref)}  # where a later read fetches it (`Readers`)
    try:
        if source == ESTARGZ and local:
            return await _estargz_from(blob, desc, store.path(desc.digest), meta), source
        if source != EAGER:
            if source == TAR and not local:
                log.warning(  # said: this one fetches a whole layer
                    "layer %s: indexing an uncompressed layer reads all of it from %s",
                    desc.digest,
                    remote.ref.domain,
                )
            return await build_index(state, store, source, desc, diff_id, meta, remote), source
    except BadLayer as e:
        if not local:
            raise
        log.info("%s; indexing its blob's tar headers for inspection", e)
    if not local:
        raise NotFound(f"layer {desc.digest} ({desc.media_type}) is not in the content store")
    path = made.scratch_dir() / f"{desc.digest.hex}.db"
    index = await trio.to_thread.run_sync(_index_streamed, blob, desc, diff_id, path)
    return index, EAGER


async def _estargz_from(
    blob: Path, desc: Descriptor, path: Path, meta: dict[str, str]
) -> LayerIndex:
    """An eStargz layer's index from its local blob (no registry)."""
    from ckfs.layerindex.estargz import index_estargz
    from ckfs.layerindex.reader import LocalBlob

    await trio.to_thread.run_sync(lambda: path.parent.mkdir(parents=True, exist_ok=True))
    return await index_estargz(LocalBlob(blob, desc.size).read_range, desc, path, meta=meta)


def _index_streamed(blob: Path, desc: Descriptor, diff_id: Digest, path: Path) -> LayerIndex:
    """Index *blob*'s tar headers, decompressing it whole; blocking.

    Data offsets are in the uncompressed stream (`StreamedReader` reads
    there); the stream must match *diff_id*.

    Raises:
        BadLayer: a hostile tree.
        DataLoss: the stream does not match *diff_id*.
    """
    from ckfs.archive.compression import open_layer
    from ckfs.archive.tarstream import TarStream
    from ckfs.layerindex.model import IndexWriter
    from ckfs.layerindex.tarindex import add_members

    writer = IndexWriter.for_layer(path, desc, source="tar", meta={"inspect": EAGER})
    with writer, open(blob, "rb") as raw, open_layer(raw, desc.media_type) as tar:
        stream = TarStream(tar, diff_id.algorithm, what=writer.what)
        add_members(stream, writer)
        stream.drain()
        if stream.digest() != diff_id:
            raise DataLoss(f"layer {desc.digest}: uncompressed digest is not {diff_id}")
        writer.set_meta("uncompressed_size", str(stream.size))
        return writer.commit()
