"""eStargz layers written by the upstream Go library, indexed over HTTP range reads.

The image (`integration.estargz.estargz_image`) is converted by upstream's
``estargz.Build`` and pushed to the real docker-registry with ``skopeo
copy``; each layer is indexed by `ckfs.layerindex.estargz` through
`RegistryClient.read_range` only (footer, then TOC), and the index must list
exactly the tree the layer's original tar gives when indexed as a tar (the
independent source), file contents included.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import from_bytes
from ckfs.layerindex.cache import ChunkCache
from ckfs.layerindex.estargz import TOC_DIGEST_ANNOTATION, index_estargz
from ckfs.layerindex.model import Kind, LayerIndex, Node, iter_nodes
from ckfs.layerindex.reader import LayerReader, RemoteBlob
from ckfs.layerindex.store import IndexStore
from ckfs.layerindex.tarindex import index_tar
from ckfs.reference import Reference, parse
from ckfs.remotes.auth import Credentials
from ckfs.remotes.hosts import load_hosts
from ckfs.remotes.registry import RegistryClient
from integration.conftest import Ckfs
from integration.estargz import EstargzImage

pytestmark = pytest.mark.slow


@dataclass
class Pulled:
    """A client of the image's registry, the image's reference and its layers."""

    client: RegistryClient
    ref: Reference
    layers: list[Descriptor]


@pytest.fixture
async def pulled(estargz_image: EstargzImage, tmp_path: Path) -> AsyncIterator[Pulled]:
    host = estargz_image.registry.host
    credentials = Credentials(config_file=tmp_path / "none.json", env={"PATH": ""})
    client = RegistryClient(host, hosts=load_hosts(host, hosts_dirs=[]), credentials=credentials)
    ref = parse(estargz_image.ref)
    async with client:
        manifest = json.loads(await client.fetch_manifest(ref, await client.resolve(ref)))
        yield Pulled(client, ref, [Descriptor.from_json(d) for d in manifest["layers"]])


def shape(index: LayerIndex) -> dict[str, tuple[Any, ...]]:
    """Everything a lazy tree must reproduce, by path (inode numbers aside,
    hardlinks as the path their inode first appears at)."""
    first: dict[int, str] = {}
    out = {}
    for path, n in sorted(iter_nodes(index)):
        first.setdefault(n.ino, path)
        out[path] = (
            Kind(n.kind).name, n.mode, n.uid, n.gid, n.size, n.mtime_ns, n.rdev, n.link,
            n.nlink, n.opaque, first[n.ino], sorted(index.xattrs(n.ino).items()),
        )  # fmt: skip
    return out


async def test_upstream_estargz_layers_index_by_range_reads_as_their_tars(
    estargz_image: EstargzImage, pulled: Pulled, tmp_path: Path
) -> None:
    image, client, ref, layers = estargz_image, pulled.client, pulled.ref, pulled.layers
    assert [d.digest for d in layers] == [c.descriptor().digest for c in image.layers]
    assert all(TOC_DIGEST_ANNOTATION in d.annotations for d in layers), "skopeo dropped them"
    for i, (desc, tar_bytes) in enumerate(zip(layers, image.tars, strict=True)):
        asked: list[int] = []

        async def read_range(
            offset: int, length: int, desc: Descriptor = desc, asked: list[int] = asked
        ) -> bytes:
            asked.append(length)
            return await client.read_range(ref, desc, offset, length)

        lazy = await index_estargz(read_range, desc, tmp_path / f"estargz{i}.db")
        # The blob's tail holds the footer and, when small, the TOC; the rest of a
        # bigger TOC takes one more request.
        assert 1 <= len(asked) <= 2, asked
        tar_path = tmp_path / f"layer{i}.tar"
        tar_path.write_bytes(tar_bytes)
        tar_desc = Descriptor(mt.OCI_LAYER, from_bytes(tar_bytes), len(tar_bytes))
        eager = await trio.to_thread.run_sync(
            index_tar, tar_path, tar_desc, tmp_path / f"tar{i}.db"
        )
        assert shape(lazy) == shape(eager), f"layer {i}"
        await same_contents(lazy, eager, RemoteBlob(client, ref, desc), tar_path, tmp_path)
        print(
            f"layer {i}: {lazy.count} entries, {desc.size} bytes, indexed with "
            f"{sum(asked)} bytes in {len(asked)} range reads"
        )


async def same_contents(
    lazy: LayerIndex, eager: LayerIndex, blob: RemoteBlob, tar_path: Path, tmp_path: Path
) -> None:
    """Every file read lazily (chunks fetched and verified) equals the tar's bytes."""
    reader = LayerReader(lazy, blob, ChunkCache(tmp_path / "cache"))
    data = tar_path.read_bytes()
    files: dict[str, Node] = {p: n for p, n in iter_nodes(eager) if n.kind == Kind.FILE}
    lazy_nodes = dict(iter_nodes(lazy))
    for path, n in files.items():
        got = await reader.read(lazy_nodes[path], 0, n.size + 1)
        assert got == data[n.data : n.data + n.size], path


async def test_reading_a_small_file_fetches_a_small_part(pulled: Pulled, tmp_path: Path) -> None:
    desc = pulled.layers[0]
    blob = RemoteBlob(pulled.client, pulled.ref, desc)
    index = await index_estargz(blob.read_range, desc, tmp_path / "index.db")
    reader = LayerReader(index, blob, ChunkCache(tmp_path / "cache"))
    nodes = dict(iter_nodes(index))
    assert await reader.read(nodes["etc/os-release"], 0, 4096) == (b'NAME="ckfs test"\nID=ckfs\n')
    fetched = reader.statistics()["fetched_bytes"]
    print(f"read of etc/os-release fetched {fetched} of {desc.size} bytes")
    assert fetched < desc.size * 0.05


def test_lazy_pull_indexes_every_upstream_layer(estargz_image: EstargzImage, ckfs: Ckfs) -> None:
    """``ckfs pull --lazy`` of the image: each layer's index built from its TOC."""
    ckfs.run("pull", "--lazy", "--plain-http", estargz_image.ref)
    for layer in estargz_image.layers:
        digest = layer.descriptor().digest
        index = IndexStore(ckfs.root).get(digest)
        assert index is not None, digest
        assert index.source == "estargz" and index.meta("toc_digest") == layer.toc_digest
        index.close()
