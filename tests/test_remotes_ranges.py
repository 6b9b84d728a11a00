"""RegistryClient.read_range against the scripted registry of test_remotes_registry.

The lazy path's reads: exact windows, bounds, a server that ignores ranges,
bodies that break off, retries, token refresh, mirrors and redirects. The
real registry and real sockets are in integration/test_registry_ranges.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import trio

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import from_bytes
from ckfs.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from ckfs.reference import Reference, parse
from ckfs.remotes.registry import MAX_RANGE, RANGE_RESUMES
from tests.test_remotes_registry import (
    REGISTRY,
    BrokenStream,
    FakeRegistry,
    client_for,
    mirrored_hosts,
    nocreds,
    resp,
)

LAYER = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def layer(fake: FakeRegistry) -> tuple[Reference, Descriptor]:
    fake.push("library/app", "1", [b"{}", LAYER])
    return parse(f"{REGISTRY}/library/app:1"), Descriptor(
        mt.OCI_LAYER_GZIP, from_bytes(LAYER), len(LAYER)
    )


Layer = tuple[Reference, Descriptor]


def ranges(fake: FakeRegistry) -> list[str | None]:
    return [r.headers.get("range") for r in fake.requests if r.url.host != "auth.test"]


async def test_exact_windows(fake: FakeRegistry, layer: Layer, tmp_path: Path) -> None:
    ref, desc = layer
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.read_range(ref, desc, 0, 4096) == LAYER[:4096]
        assert await client.read_range(ref, desc, 5000, 1) == LAYER[5000:5001]
        assert await client.read_range(ref, desc, len(LAYER) - 51, 51) == LAYER[-51:]
        assert await client.read_range(ref, desc, 0, len(LAYER)) == LAYER
        assert await client.read_range(ref, desc, 77, 0) == b""
        stats = client.statistics()
    assert ranges(fake) == ["bytes=0-4095", "bytes=5000-5000", "bytes=10189-10239", "bytes=0-10239"]
    assert stats["range"] == 4 and stats["blob_bytes"] == 4096 + 1 + 51 + len(LAYER)


@pytest.mark.parametrize(
    ("offset", "length", "why"),
    [
        (-1, 10, "outside its 10240 bytes"),
        (10, -1, "outside its 10240 bytes"),
        (10240, 1, "outside its 10240 bytes"),
        (10000, 241, "outside its 10240 bytes"),
        (0, MAX_RANGE + 1, "outside its"),
    ],
)
async def test_bounds_checked_before_any_request(
    fake: FakeRegistry, layer: Layer, tmp_path: Path, offset: int, length: int, why: str
) -> None:
    ref, desc = layer
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument, match=why) as info:
            await client.read_range(ref, desc, offset, length)
    assert str(desc.digest) in str(info.value) and "\n" not in str(info.value)
    assert fake.requests == []


async def test_longer_than_max_range_refused(fake: FakeRegistry, tmp_path: Path) -> None:
    ref = parse(f"{REGISTRY}/library/app:1")
    huge = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(b"huge"), MAX_RANGE * 2)
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument, match="byte limit of a read"):
            await client.read_range(ref, huge, 1, MAX_RANGE + 1)
    assert fake.requests == []


async def test_other_registry_refused(fake: FakeRegistry, layer: Layer, tmp_path: Path) -> None:
    _, desc = layer
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument, match="not on registry"):
            await client.read_range(parse("other.test/library/app:1"), desc, 0, 1)


async def test_range_ignored_reads_only_the_window(
    fake: FakeRegistry, layer: Layer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 200 with the whole blob: the window is cut out of it, the rest never read."""
    ref, desc = layer
    fake.ignore_range = True
    async with client_for(fake, nocreds(tmp_path)) as client:
        with caplog.at_level(logging.WARNING, logger="ckfs.remotes.blobs"):
            assert await client.read_range(ref, desc, 4000, 300) == LAYER[4000:4300]
            assert await client.read_range(ref, desc, 0, len(LAYER)) == LAYER
        stats = client.statistics()
    assert [r.getMessage() for r in caplog.records] == [
        f"registry host {REGISTRY} ignores Range requests: each lazy read downloads "
        "its blob from the start up to the bytes it needs"
    ]
    assert stats["range_ignored"] == 2
    # The fake sends 4096-byte chunks: reading stopped in the one holding byte 4299.
    assert stats["blob_bytes"] == 8192 + len(LAYER)


async def test_broken_body_resumed_from_the_byte_reached(
    fake: FakeRegistry, layer: Layer, tmp_path: Path
) -> None:
    ref, desc = layer
    cut = httpx.Response(
        206,
        headers={"Content-Range": "bytes 1000-5999/10240", "Content-Length": "5000"},
        stream=BrokenStream(LAYER[1000:1700]),
    )
    fake.script = [cut]
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.read_range(ref, desc, 1000, 5000) == LAYER[1000:6000]
        assert client.statistics()["resume"] == 1
    assert ranges(fake) == ["bytes=1000-5999", "bytes=1700-5999"]


async def test_short_range_resumed(fake: FakeRegistry, layer: Layer, tmp_path: Path) -> None:
    """A server answering fewer bytes than asked (then closing) is asked for the rest."""
    ref, desc = layer
    fake.script = [resp(206, headers={"Content-Range": "bytes 0-99/10240"}, content=LAYER[:100])]
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.read_range(ref, desc, 0, 300) == LAYER[:300]
    assert ranges(fake)[-1] == "bytes=100-299"


async def test_resumes_are_bounded(fake: FakeRegistry, layer: Layer, tmp_path: Path) -> None:
    ref, desc = layer

    def broken(start: int) -> httpx.Response:
        return httpx.Response(
            206,
            headers={"Content-Range": f"bytes {start}-9999/10240"},
            stream=BrokenStream(LAYER[start : start + 10]),
        )

    fake.script = [broken(i * 10) for i in range(RANGE_RESUMES + 1)]
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(Unavailable, match=f"gave up after {RANGE_RESUMES} resumes") as info:
            await client.read_range(ref, desc, 0, 10000)
    assert "connection lost at byte 40" in str(info.value)
    assert str(desc.digest) in str(info.value) and "\n" not in str(info.value)


async def test_5xx_retried_then_served(
    fake: FakeRegistry, layer: Layer, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, desc = layer
    fake.script = [resp(503), resp(502)]
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.read_range(ref, desc, 10, 20) == LAYER[10:30]
        assert client.statistics()["retry"] == 2


async def test_5xx_gives_up_after_retries(
    fake: FakeRegistry, layer: Layer, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, desc = layer
    fake.script = [resp(500) for _ in range(3)]
    async with client_for(fake, nocreds(tmp_path), retries=2) as client:
        with pytest.raises(Unavailable, match=r"reg\.test answered HTTP 500") as info:
            await client.read_range(ref, desc, 10, 20)
    assert "bytes 10-29" in str(info.value)


async def test_token_reused_and_refreshed_on_401(
    fake: FakeRegistry, layer: Layer, tmp_path: Path
) -> None:
    ref, desc = layer
    fake.auth = "bearer"
    async with client_for(fake, nocreds(tmp_path)) as client:
        for i in range(5):
            assert await client.read_range(ref, desc, i, 1) == LAYER[i : i + 1]
        assert client.statistics()["token"] == 1  # fetched once, then cached
        fake.revoked.update(fake.tokens)
        assert await client.read_range(ref, desc, 9, 3) == LAYER[9:12]
        stats = client.statistics()
    assert stats["token"] == 2 and stats["auth"] == 2  # first challenge, then the revocation


async def test_not_found(fake: FakeRegistry, layer: Layer, tmp_path: Path) -> None:
    ref, _ = layer
    missing = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(b"missing"), 7)
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(NotFound, match="BLOB_UNKNOWN"):
            await client.read_range(ref, missing, 0, 7)


@pytest.mark.parametrize(
    ("headers", "error", "match"),
    [
        ({"Content-Range": "bytes 0-9/10240"}, InvalidArgument, "asked for bytes from 50"),
        ({"Content-Range": "bytes 50-59/99999"}, DataLoss, "has 99999 bytes, not 10240"),
        ({}, InvalidArgument, "got range 'none'"),
    ],
)
async def test_wrong_range_answers_refused(
    fake: FakeRegistry,
    layer: Layer,
    tmp_path: Path,
    headers: dict[str, str],
    error: type[Exception],
    match: str,
) -> None:
    ref, desc = layer
    fake.script = [resp(206, headers=headers, content=LAYER[50:60])]
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(error, match=match):
            await client.read_range(ref, desc, 50, 10)


async def test_more_bytes_than_asked_is_data_loss(
    fake: FakeRegistry, layer: Layer, tmp_path: Path
) -> None:
    ref, desc = layer
    fake.script = [resp(206, headers={"Content-Range": "bytes 50-59/10240"}, content=LAYER[50:70])]
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(DataLoss):
            await client.read_range(ref, desc, 50, 10)


async def test_mirror_failure_falls_through(
    fake: FakeRegistry, layer: Layer, tmp_path: Path
) -> None:
    ref, desc = layer
    fake.script = [resp(503), resp(404)]  # mirror, mirror2
    async with client_for(fake, nocreds(tmp_path), hosts=mirrored_hosts()) as client:
        assert await client.read_range(ref, desc, 3, 4) == LAYER[3:7]
    assert [r.url.host for r in fake.requests] == ["mirror.test", "mirror2.test", REGISTRY]
    assert fake.requests[0].url.params["ns"] == REGISTRY


async def test_redirect_keeps_range_and_drops_authorization(
    fake: FakeRegistry, layer: Layer, tmp_path: Path
) -> None:
    ref, desc = layer
    fake.auth = "bearer"
    fake.redirect_blobs = True
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.read_range(ref, desc, 300, 30) == LAYER[300:330]
    storage = [r for r in fake.requests if r.url.host == "storage.test"]
    assert [r.headers.get("range") for r in storage] == ["bytes=300-329"]
    assert "authorization" not in storage[0].headers
