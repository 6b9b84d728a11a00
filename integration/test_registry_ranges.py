"""RegistryClient.read_range against Debian's docker-registry on 127.0.0.1.

The lazy path reads windows of layers by Range: the real registry must
honour them (206, exactly the bytes asked), and the network's failures
come through `integration.faultproxy` on the wire (a cut mid-range, 5xx
answers, a registry ignoring the range, a redirect to storage, a stall)
and through `integration.tokenserver` (a token the registry stops taking).
The per-read cost is measured here too, and printed (``-s``).
"""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.reference import parse
from ckfs.remotes.bounds import TooSlow
from ckfs.remotes.hosts import load_hosts
from ckfs.remotes.registry import RegistryClient
from integration.faultproxy import Fault, FaultProxy
from integration.registry import Registry
from integration.test_registry_client import anonymous
from integration.tokenserver import TokenServer

pytestmark = pytest.mark.slow

REPO = "test/ranges"

#: A layer-sized blob: large enough that a window far into it would cost
#: much if the range were ignored, small enough to upload in a moment.
BLOB_SIZE = 8 << 20

#: The FUSE hot path's typical read: one page cluster of a small file.
READ = 4096

#: Reads timed per measurement (median reported).
TIMED_READS = 400

Blob = tuple[Registry, Descriptor, bytes]


@pytest.fixture(scope="module")
def blob(registry_factory_session: Callable[..., Registry]) -> Blob:
    reg = registry_factory_session()
    data = os.urandom(BLOB_SIZE)
    return reg, reg.upload_blob(REPO, data), data


@pytest.fixture
def proxy(blob: Blob) -> Iterator[FaultProxy]:
    """The registry behind a fault proxy (started here: its stop blocks, trio must not)."""
    with FaultProxy(blob[0].host).running() as p:
        yield p


def client_for(host: str, tmp_path: Path, **kw: float) -> RegistryClient:
    hosts = load_hosts(host, hosts_dirs=[])
    return RegistryClient(host, hosts=hosts, credentials=anonymous(tmp_path), **kw)  # type: ignore[arg-type]


WINDOWS = [(0, 1), (0, READ), (12345, READ), (BLOB_SIZE - 51, 51), (3 << 20, 2 << 20)]


async def test_registry_honours_ranges(proxy: FaultProxy, blob: Blob, tmp_path: Path) -> None:
    """Each read is one GET with a closed range, answered 206 with exactly its bytes."""
    _, desc, data = blob
    ref = parse(f"{proxy.host}/{REPO}:1")
    async with client_for(proxy.host, tmp_path) as client:
        for offset, length in [*WINDOWS, (0, BLOB_SIZE)]:
            assert await client.read_range(ref, desc, offset, length) == data[offset:][:length]
        stats = client.statistics()
        # One connection served them all: range bodies go back to the pool.
        assert len(client._engine._client._transport._pool.connections) == 1  # type: ignore[attr-defined]
    seen = proxy.requests()
    assert [s.headers.get("range") for s in seen] == [
        f"bytes={o}-{o + n - 1}" for o, n in [*WINDOWS, (0, BLOB_SIZE)]
    ]
    assert [s.status for s in seen] == [206] * len(seen)
    assert [s.body_bytes for s in seen] == [n for _, n in [*WINDOWS, (0, BLOB_SIZE)]]
    assert "range_ignored" not in stats and "retry" not in stats


async def test_idle_connection_kept_between_bursts(blob: Blob, tmp_path: Path) -> None:
    """Reads seconds apart reuse one connection (httpx alone drops it after 5 s idle)."""
    reg, desc, data = blob
    ref = parse(f"{reg.host}/{REPO}:1")
    async with client_for(reg.host, tmp_path) as client:
        pool = client._engine._client._transport._pool  # type: ignore[attr-defined]
        assert await client.read_range(ref, desc, 0, READ) == data[:READ]
        (first,) = pool.connections
        await trio.sleep(6)
        assert await client.read_range(ref, desc, READ, READ) == data[READ:][:READ]
        assert pool.connections == [first]


async def test_cut_mid_range_resumed(proxy: FaultProxy, blob: Blob, tmp_path: Path) -> None:
    _, desc, data = blob
    ref = parse(f"{proxy.host}/{REPO}:1")
    offset, length = 100_000, 1 << 20
    proxy.add(Fault("cut", after=300_007))
    async with client_for(proxy.host, tmp_path) as client:
        assert await client.read_range(ref, desc, offset, length) == data[offset:][:length]
        assert client.statistics()["resume"] == 1
    end = offset + length - 1
    assert [s.headers.get("range") for s in proxy.requests()] == [
        f"bytes={offset}-{end}",
        f"bytes={offset + 300_007}-{end}",
    ]


async def test_stall_mid_range_resumed(proxy: FaultProxy, blob: Blob, tmp_path: Path) -> None:
    """A body that stops coming is taken for a dead connection after the read timeout."""
    _, desc, data = blob
    ref = parse(f"{proxy.host}/{REPO}:1")
    proxy.add(Fault("stall", after=5000))
    async with client_for(proxy.host, tmp_path, read_timeout=0.5) as client:
        start = trio.current_time()
        assert await client.read_range(ref, desc, 0, 65536) == data[:65536]
        assert trio.current_time() - start < 10
        assert client.statistics()["resume"] == 1


async def test_trickle_is_too_slow(proxy: FaultProxy, blob: Blob, tmp_path: Path) -> None:
    """A body trickling below the minimum rate fails; it is not asked for again."""
    _, desc, _ = blob
    ref = parse(f"{proxy.host}/{REPO}:1")
    proxy.add(Fault("trickle", after=1000, seconds=0.05))
    async with client_for(proxy.host, tmp_path, min_rate=1000, low_speed_time=1) as client:
        with pytest.raises(TooSlow, match="slower than 1000 bytes/s") as info:
            await client.read_range(ref, desc, 0, 65536)
        assert "resume" not in client.statistics()
    assert str(desc.digest) in str(info.value)
    assert len(proxy.requests()) == 1


async def test_5xx_then_success(proxy: FaultProxy, blob: Blob, tmp_path: Path) -> None:
    _, desc, data = blob
    ref = parse(f"{proxy.host}/{REPO}:1")
    proxy.add(Fault("status", status=503, times=2))
    async with client_for(proxy.host, tmp_path) as client:
        assert await client.read_range(ref, desc, 777, READ) == data[777:][:READ]
        assert client.statistics()["retry"] == 2
    assert [s.status for s in proxy.requests()] == [503, 503, 206]


async def test_ignored_range_cut_to_the_window(
    proxy: FaultProxy, blob: Blob, tmp_path: Path
) -> None:
    """A 200 with the whole blob: the window is taken, the rest of the body left unread."""
    _, desc, data = blob
    ref = parse(f"{proxy.host}/{REPO}:1")
    proxy.add(Fault("ignore_range"))
    async with client_for(proxy.host, tmp_path) as client:
        assert await client.read_range(ref, desc, 1 << 20, READ) == data[1 << 20 :][:READ]
        stats = client.statistics()
        assert stats["range_ignored"] == 1
        assert stats["blob_bytes"] < BLOB_SIZE // 2
        # The client keeps working after leaving that body unread.
        assert await client.read_range(ref, desc, 5, 5) == data[5:10]


async def test_redirect_keeps_the_range(proxy: FaultProxy, blob: Blob, tmp_path: Path) -> None:
    _, desc, data = blob
    ref = parse(f"{proxy.host}/{REPO}:1")
    proxy.add(Fault("redirect"))
    async with client_for(proxy.host, tmp_path) as client:
        assert await client.read_range(ref, desc, 4242, READ) == data[4242:][:READ]
        assert client.statistics()["redirect"] == 1
    storage = [s for s in proxy.requests() if s.redirected]
    assert [s.headers.get("range") for s in storage] == [f"bytes=4242-{4242 + READ - 1}"]
    assert storage[0].status == 206


async def test_cancelled_read_leaves_the_client_working(
    proxy: FaultProxy, blob: Blob, tmp_path: Path
) -> None:
    """A read cancelled mid-body (a FUSE request interrupted) costs its connection only."""
    _, desc, data = blob
    ref = parse(f"{proxy.host}/{REPO}:1")
    proxy.add(Fault("stall", after=1000))
    async with client_for(proxy.host, tmp_path) as client:
        with trio.move_on_after(0.5) as scope:
            await client.read_range(ref, desc, 0, 65536)
        assert scope.cancelled_caught
        assert await client.read_range(ref, desc, 0, 65536) == data[:65536]


async def test_concurrent_reads(blob: Blob, tmp_path: Path) -> None:
    """Many reads at once, as FUSE issues them: each gets its own bytes."""
    reg, desc, data = blob
    ref = parse(f"{reg.host}/{REPO}:1")
    rng = random.Random(7)
    windows = [(rng.randrange(0, BLOB_SIZE - 65536), rng.randrange(1, 65536)) for _ in range(64)]
    got: dict[int, bytes] = {}

    async def read(i: int, offset: int, length: int) -> None:
        got[i] = await client.read_range(ref, desc, offset, length)

    async with client_for(reg.host, tmp_path) as client:
        async with trio.open_nursery() as nursery:
            for i, (offset, length) in enumerate(windows):
                nursery.start_soon(read, i, offset, length)
        assert client.statistics()["range"] == len(windows)
    assert [got[i] for i in range(len(windows))] == [data[o:][:n] for o, n in windows]


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, TokenServer, Descriptor, bytes]]:
    work = tmp_path_factory.mktemp("token-ranges")
    tokens = TokenServer(users={"ckfs": "pw"}).start()
    reg = Registry(work / "reg", extra_config=tokens.registry_config(work / "ca.pem"))
    try:
        reg.start()
        tokens.anonymous_pull = True
        # Uploads need push access: the test's own client asks with a token.
        data = os.urandom(1 << 20)
        token = tokens.sign("ckfs", [{"type": "repository", "name": REPO, "actions": ["*"]}])
        desc = _upload(reg, REPO, data, token)
        yield reg, tokens, desc, data
    finally:
        reg.stop()
        tokens.stop()


def _upload(reg: Registry, repo: str, data: bytes, token: str) -> Descriptor:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"{reg.url}/v2/", headers=headers) as client:
        start = client.post(f"{repo}/blobs/uploads/")
        start.raise_for_status()
        location = httpx.URL(start.headers["location"]).copy_add_param("digest", digest)
        client.put(location, content=data).raise_for_status()
    return Descriptor(mt.OCI_LAYER, Digest.parse(digest), len(data))


async def test_token_cached_then_refreshed_on_401(
    token_registry: tuple[Registry, TokenServer, Descriptor, bytes], tmp_path: Path
) -> None:
    """Reads share one token; when the registry stops taking it, one 401 fetches the next."""
    reg, tokens, desc, data = token_registry
    tokens.requests.clear()
    ref = parse(f"{reg.host}/{REPO}:1")
    tokens.stale_tokens = 1  # the first token dies at the registry long before expires_in
    async with client_for(reg.host, tmp_path) as client:
        assert await client.read_range(ref, desc, 0, 10) == data[:10]
        await trio.sleep(tokens.grace + 1)
        for i in range(20):
            assert await client.read_range(ref, desc, i * 1000, 100) == data[i * 1000 :][:100]
        stats = client.statistics()
    assert len(tokens.requests) == 2
    assert stats["auth"] == 2  # the first challenge, then the stale token


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


async def test_cost_of_a_small_read(blob: Blob, tmp_path: Path) -> None:
    """One 4 KiB read_range against the local registry: its median cost, printed.

    For comparison: a bare httpx GET of the same window on a kept-alive
    connection (what the registry itself costs), and the window through
    `open_blob`, which opens a new connection per read (its body bypasses
    h11, see `_raw_body`). The bound asserted is generous (a loaded 2-core
    machine); the figures are the point.
    """
    reg, desc, data = blob
    ref = parse(f"{reg.host}/{REPO}:1")
    rng = random.Random(10)
    offsets = [rng.randrange(0, BLOB_SIZE - READ) for _ in range(TIMED_READS)]
    ranged: list[float] = []
    streamed: list[float] = []
    bare: list[float] = []
    url = f"{reg.url}/v2/{REPO}/blobs/{desc.digest}"
    async with httpx.AsyncClient() as plain:
        for offset in offsets[:200]:
            t = time.perf_counter()
            response = await plain.get(
                url, headers={"Range": f"bytes={offset}-{offset + READ - 1}"}
            )
            bare.append(time.perf_counter() - t)
            assert response.status_code == 206 and len(response.content) == READ
    async with client_for(reg.host, tmp_path) as client:
        await client.read_range(ref, desc, 0, READ)  # connection and first request
        for offset in offsets:
            t = time.perf_counter()
            got = await client.read_range(ref, desc, offset, READ)
            ranged.append(time.perf_counter() - t)
            assert got == data[offset:][:READ]
        for offset in offsets[:100]:
            t = time.perf_counter()
            async with client.open_blob(ref, desc, offset=offset, length=READ) as stream:
                b"".join([c async for c in stream.aiter_chunks()])
            streamed.append(time.perf_counter() - t)
    print(
        f"\n4 KiB read_range: median {_median_us(ranged):.0f} µs "
        f"(p90 {statistics.quantiles(ranged, n=10)[-1] * 1e6:.0f} µs, n={len(ranged)}); "
        f"bare httpx GET {_median_us(bare):.0f} µs; "
        f"open_blob of the same window {_median_us(streamed):.0f} µs"
    )
    assert _median_us(ranged) < 50_000
