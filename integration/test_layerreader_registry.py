"""LayerReader over RemoteBlob against Debian's docker-registry on 127.0.0.1.

The lazy data path end to end below FUSE: chunked layers (built by
`tests.chunkedblobs` from real gzip members and tar streams) are uploaded
to the real registry, and files are read through `RegistryClient.read_range`.
The requests are counted, and bytes corrupted, by `integration.faultproxy`
on the wire; the registry is really stopped and started again for the
outage case.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from ckfs.descriptor import Descriptor
from ckfs.errors import DataLoss, Unavailable
from ckfs.layerindex.cache import ChunkCache
from ckfs.layerindex.reader import LayerReader, RemoteBlob
from ckfs.reference import parse
from ckfs.remotes.registry import RegistryClient
from integration.faultproxy import Fault, FaultProxy
from integration.registry import Registry
from integration.test_registry_ranges import client_for
from tests.chunkedblobs import CHUNK, Layer, build_estargz, build_tar, content

pytestmark = pytest.mark.slow

REPO = "test/lazy"

FILES = {
    "big": content(6 * CHUNK + 17, 1),
    "small": b"hello, lazy world\n",
    "mid": content(CHUNK, 2),
}


def upload(reg: Registry, layer: Layer) -> Descriptor:
    desc = reg.upload_blob(REPO, layer.blob.read_bytes())
    assert desc.digest == layer.index.layer
    return desc


@pytest.fixture(scope="module")
def registry(registry_factory_session: Callable[..., Registry]) -> Registry:
    return registry_factory_session()


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    """The registry behind a fault proxy (started here: its stop blocks, trio must not)."""
    with FaultProxy(registry.host).running() as p:
        yield p


def reader(
    client: RegistryClient, host: str, layer: Layer, desc: Descriptor, tmp_path: Path
) -> LayerReader:
    blob = RemoteBlob(client, parse(f"{host}/{REPO}:1"), desc)
    return LayerReader(layer.index, blob, ChunkCache(tmp_path / "cache"))


async def test_estargz_reads_fetch_only_their_chunks(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    layer = build_estargz(tmp_path, FILES)
    desc = upload(registry, layer)
    async with client_for(proxy.host, tmp_path) as client:
        r = reader(client, proxy.host, layer, desc, tmp_path)
        assert await r.read(layer.node("small"), 0, 4096) == FILES["small"]
        (small,) = proxy.requests()
        assert small.status == 206 and small.body_bytes < 200  # one tiny member
        big = FILES["big"]
        assert await r.read(layer.node("big"), 0, len(big)) == big
        assert len(proxy.requests()) == 2  # seven neighbouring chunks, one request
        assert await r.read(layer.node("big"), CHUNK, 3 * CHUNK) == big[CHUNK : 4 * CHUNK]
        assert len(proxy.requests()) == 2  # cached
        stats = r.statistics()
    assert stats["fetched_bytes"] == proxy.body_bytes() < desc.size
    assert stats["requests"] == 2 and stats["misses"] == 8


async def test_concurrent_reads_of_a_chunk_make_one_request(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    layer = build_estargz(tmp_path, FILES)
    desc = upload(registry, layer)
    proxy.add(Fault("delay", seconds=0.3))  # the first request takes a while
    got: list[bytes] = []
    async with client_for(proxy.host, tmp_path) as client:
        r = reader(client, proxy.host, layer, desc, tmp_path)

        async def read(offset: int) -> None:
            got.append(await r.read(layer.node("mid"), offset, 1000))

        async with trio.open_nursery() as nursery:
            for offset in range(0, 20_000, 1000):
                nursery.start_soon(read, offset)
    assert sorted(got) == sorted(FILES["mid"][o : o + 1000] for o in range(0, 20_000, 1000))
    assert len(proxy.requests()) == 1


@pytest.mark.parametrize("build", [build_estargz, build_tar], ids=["estargz", "tar"])
async def test_wrong_bytes_from_the_registry_are_never_served(
    registry: Registry,
    proxy: FaultProxy,
    tmp_path: Path,
    build: Callable[[Path, dict[str, bytes]], Layer],
) -> None:
    layer = build(tmp_path, FILES)
    desc = upload(registry, layer)
    proxy.add(Fault("corrupt"))
    async with client_for(proxy.host, tmp_path) as client:
        r = reader(client, proxy.host, layer, desc, tmp_path)
        with pytest.raises(DataLoss):
            await r.read(layer.node("mid"), 0, 100)
        assert r.cache.usage().files == 0
        assert await r.read(layer.node("mid"), 0, CHUNK) == FILES["mid"]
    assert [s.fault for s in proxy.requests()] == ["corrupt", None]


async def test_registry_down_fails_uncached_reads_until_it_is_back(
    registry_factory: Callable[..., Registry], tmp_path: Path
) -> None:
    reg = registry_factory()
    layer = build_estargz(tmp_path, FILES)
    desc = upload(reg, layer)
    async with client_for(reg.host, tmp_path, retries=1, connect_timeout=2) as client:
        r = reader(client, reg.host, layer, desc, tmp_path)
        assert await r.read(layer.node("small"), 0, 100) == FILES["small"]
        await trio.to_thread.run_sync(reg.stop)
        assert await r.read(layer.node("small"), 0, 100) == FILES["small"]  # cached
        with pytest.raises(Unavailable):
            await r.read(layer.node("mid"), 0, 100)
        await trio.to_thread.run_sync(reg.start)
        assert await r.read(layer.node("mid"), 0, CHUNK) == FILES["mid"]
        assert r.statistics()["errors"] == 1
