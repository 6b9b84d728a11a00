"""The recursive fetcher against a scripted registry: only what is missing
crosses the wire, every byte is verified, interrupted blobs resume.

`FakeRemote` implements the fetcher's `Remote` protocol over a dict of blobs
and can misbehave on request (drop a connection after N bytes, ignore a
Range header, send wrong bytes, count what was asked). The pull-level tests
at the end go through the real `RegistryClient` with an `httpx.MockTransport`
registry, to check the pieces fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from ckfs import mediatypes as mt
from ckfs import reference
from ckfs.descriptor import Descriptor, Platform
from ckfs.digest import Digest
from ckfs.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ckfs.images import platforms
from ckfs.images.image import MAX_CONFIG_SIZE
from ckfs.images.manifest import MAX_MANIFEST_SIZE
from ckfs.pull import PullOptions, PullReport, pull
from ckfs.remotes import fetch as fetch_mod
from ckfs.remotes.fetch import (
    SMALL_BLOB,
    BlobProgress,
    BlobState,
    fetch,
    platform_children,
    ref_key,
)
from ckfs.state import State

REF = reference.parse("registry.test/team/app:1")
HOST = platforms.default()


def sha256(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def desc_of(media_type: str, data: bytes, **kw: Any) -> Descriptor:
    return Descriptor(media_type=media_type, digest=sha256(data), size=len(data), **kw)


@dataclass
class Image:
    """An image's blobs by digest, and its root descriptor."""

    target: Descriptor
    blobs: dict[Digest, bytes] = field(default_factory=dict)
    layers: list[Descriptor] = field(default_factory=list)
    config: Descriptor | None = None


def build_image(
    layers: list[bytes],
    *,
    layer_type: str = mt.OCI_LAYER_GZIP,
    platform: Platform = HOST,
    extra_layers: list[Descriptor] = (),  # type: ignore[assignment]
) -> Image:
    config = json.dumps(
        {
            "architecture": platform.architecture,
            "os": platform.os,
            "rootfs": {"type": "layers", "diff_ids": [str(sha256(b)) for b in layers]},
        }
    ).encode()
    cdesc = desc_of(mt.OCI_CONFIG, config)
    ldescs = [desc_of(layer_type, b) for b in layers] + list(extra_layers)
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": cdesc.to_json(),
            "layers": [d.to_json() for d in ldescs],
        }
    ).encode()
    mdesc = desc_of(mt.OCI_MANIFEST, body, platform=platform)
    blobs = {cdesc.digest: config, mdesc.digest: body}
    blobs.update({sha256(b): b for b in layers})
    return Image(target=mdesc, blobs=blobs, layers=ldescs, config=cdesc)


def build_index(*images: Image) -> Image:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [i.target.to_json() for i in images],
        }
    ).encode()
    idesc = desc_of(mt.OCI_INDEX, body)
    blobs: dict[Digest, bytes] = {idesc.digest: body}
    for i in images:
        blobs.update(i.blobs)
    return Image(target=idesc, blobs=blobs)


def layer(n: int, size: int = 300_000) -> bytes:
    """Incompressible-looking bytes, distinct per *n*."""
    out = bytearray()
    seed = str(n).encode()
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return gzip.compress(bytes(out[:size]), mtime=0)


class FakeStream:
    def __init__(
        self,
        data: bytes,
        offset: int,
        *,
        chunk: int,
        cut_at: int | None,
        stall_at: int | None = None,
        total: int | None = None,
    ) -> None:
        self.offset = offset
        self.total = len(data) if total is None else total
        self.host = "registry.test"
        self._data = data
        self._chunk = chunk
        self._cut_at = cut_at
        self._stall_at = stall_at

    async def aiter_chunks(self) -> AsyncIterator[bytes]:
        pos = self.offset
        while pos < len(self._data):
            end = min(pos + self._chunk, len(self._data))
            for limit in (self._cut_at, self._stall_at):
                if limit is not None and end > limit:
                    if limit > pos:
                        yield self._data[pos:limit]
                    if limit == self._stall_at:
                        await trio.sleep_forever()  # a registry that stops sending
                    raise Unavailable(f"blob from {self.host}: connection lost at {limit}")
            await trio.sleep(0)
            yield self._data[pos:end]
            pos = end


@dataclass
class FakeRemote:
    """A registry in a dict, with faults to order.

    Attributes:
        cuts: digest → byte positions; each blob request pops one and drops
            the connection when it reaches that position.
        ignore_range: digests whose requests answer from byte 0 (HTTP 200).
        corrupt: digests served with one byte flipped.
        stalls: digest → byte position where its next response stops sending.
        extra: digests served with bytes beyond their size (the stream
            does not announce its total, as a chunked response would not).
        manifest_wait: seconds every manifest request waits before it is
            answered (a registry that stalls).
        busy: digests whose requests fail as a 503 (as the client's would
            after its own retries).
        open_wait: seconds every blob request waits before it is answered
            (as the client's would while it honours a ``Retry-After``).
        gate: hold blob requests until this many are open at once: proves
            they can be, with no timing involved.
        requests: (kind, digest, offset) of every request, in order.
    """

    blobs: dict[Digest, bytes]
    chunk: int = 64 << 10
    cuts: dict[Digest, list[int]] = field(default_factory=dict)
    ignore_range: set[Digest] = field(default_factory=set)
    corrupt: set[Digest] = field(default_factory=set)
    stalls: dict[Digest, int] = field(default_factory=dict)
    extra: set[Digest] = field(default_factory=set)
    open_wait: float = 0.0
    manifest_wait: float = 0.0
    gate: int = 0
    busy: set[Digest] = field(default_factory=set)
    requests: list[tuple[str, Digest, int]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    delay: float = 0.0

    async def fetch_manifest(self, ref: reference.Reference, desc: Descriptor) -> bytes:
        self.requests.append(("manifest", desc.digest, 0))
        await trio.sleep(self.manifest_wait)
        return self.blobs[desc.digest]

    @contextlib.asynccontextmanager
    async def open_blob(
        self, ref: reference.Reference, desc: Descriptor, *, offset: int = 0
    ) -> AsyncIterator[FakeStream]:
        self.requests.append(("blob", desc.digest, offset))
        if desc.digest not in self.blobs:
            raise NotFound(f"blob {desc.digest}: not found on registry.test")
        await trio.sleep(self.open_wait)
        if desc.digest in self.busy:
            raise Unavailable(f"blob {desc.digest}: registry.test answered HTTP 503")
        data = self.blobs[desc.digest]
        if desc.digest in self.corrupt:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        total = None
        if desc.digest in self.extra:
            data, total = data + b"and then some", 0
        if desc.digest in self.ignore_range:
            offset = 0
        cuts = self.cuts.get(desc.digest)
        cut_at = cuts.pop(0) if cuts else None
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await trio.sleep(self.delay)
            if self.gate:
                # Hold requests until *gate* are open at once (then let all
                # through); bounded, so a fetch that never opens that many
                # fails rather than hangs.
                with trio.fail_after(30):
                    while self.max_in_flight < self.gate:
                        await trio.sleep(0.001)
            stall_at = self.stalls.pop(desc.digest, None)
            yield FakeStream(
                data, offset, chunk=self.chunk, cut_at=cut_at, stall_at=stall_at, total=total
            )
        finally:
            self.in_flight -= 1

    def blob_requests(self, digest: Digest | None = None) -> list[tuple[str, Digest, int]]:
        return [r for r in self.requests if r[0] == "blob" and digest in (None, r[1])]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    s = State(tmp_path / "root")
    yield s
    s.close()


def digests(state: State) -> set[Digest]:
    return {i.digest for i in state.content.walk()}


async def test_fetches_index_manifest_config_and_layers(state: State) -> None:
    image = build_image([layer(1), layer(2)])
    index = build_index(image)
    remote = FakeRemote(index.blobs)
    events: list[tuple[str, str]] = []

    report = await fetch(
        remote,
        state.content,
        REF,
        index.target,
        children=platform_children(),
        on_event=lambda p: events.append((p.kind, str(p.state))),
    )

    assert digests(state) == set(index.blobs)
    assert report.fetched_blobs == 5 and report.present_blobs == 0
    assert report.fetched_bytes == sum(len(b) for b in index.blobs.values())
    assert {b.state for b in report.blobs} == {BlobState.VERIFIED}
    assert ("layer", "downloading") in events and ("layer", "verified") in events
    assert state.content.list_statuses() == []

    # GC labels lead from the index to the manifest, and from it to config and layers.
    gc = "containerd.io/gc.ref.content"
    assert state.content.info(index.target.digest).labels[f"{gc}.m.0"] == image.target.digest
    labels = state.content.info(image.target.digest).labels
    assert labels[f"{gc}.config"] == image.config.digest  # type: ignore[union-attr]
    assert labels[f"{gc}.l.1"] == image.layers[1].digest
    source = state.content.info(image.layers[0].digest).labels
    assert source["containerd.io/distribution.source.registry.test"] == "team/app"


async def test_second_fetch_requests_nothing(state: State) -> None:
    index = build_index(build_image([layer(1), layer(2)]))
    await fetch(FakeRemote(index.blobs), state.content, REF, index.target)
    again = FakeRemote(index.blobs)
    report = await fetch(again, state.content, REF, index.target)
    assert again.requests == []
    assert report.present_blobs == 5 and report.fetched_bytes == 0


async def test_only_missing_blobs_are_requested(state: State) -> None:
    image = build_image([layer(1), layer(2)])
    await fetch(FakeRemote(image.blobs), state.content, REF, image.target)
    state.content.delete(image.layers[1].digest)
    remote = FakeRemote(image.blobs)
    await fetch(remote, state.content, REF, image.target)
    assert remote.requests == [("blob", image.layers[1].digest, 0)]


async def test_without_remote_present_content_suffices(state: State) -> None:
    image = build_image([layer(1)])
    with pytest.raises(NotFound, match="not in the content store"):
        await fetch(None, state.content, REF, image.target)
    assert digests(state) == set()
    await fetch(FakeRemote(image.blobs), state.content, REF, image.target)
    report = await fetch(None, state.content, REF, image.target)
    assert report.present_blobs == 3

    state.content.delete(image.layers[0].digest)
    with pytest.raises(NotFound, match=image.layers[0].digest):
        await fetch(None, state.content, REF, image.target)


async def test_dropped_connection_resumes_in_process_with_a_range(state: State) -> None:
    big = layer(1, 2_000_000)
    image = build_image([big])
    d = image.layers[0].digest
    remote = FakeRemote(image.blobs, cuts={d: [700_000, 1_500_000]})
    states: list[str] = []

    report = await fetch(
        remote,
        state.content,
        REF,
        image.target,
        on_event=lambda p: states.append(str(p.state)) if p.kind == "layer" else None,
    )

    assert [offset for _, _, offset in remote.blob_requests(d)] == [0, 700_000, 1_500_000]
    assert states == ["downloading", "resuming", "resuming", "verified"]
    blob = next(b for b in report.blobs if b.desc.digest == d)
    assert blob.fetched == len(big)  # nothing was received twice
    assert state.content.exists(d)


async def test_gives_up_after_bounded_resumes_and_next_fetch_continues(state: State) -> None:
    big = layer(1, 2_000_000)
    image = build_image([big])
    d = image.layers[0].digest
    cuts = [100_000 * (i + 1) for i in range(fetch_mod.MAX_RESUMES + 1)]
    remote = FakeRemote(image.blobs, cuts={d: list(cuts)})

    with pytest.raises(Unavailable, match="gave up after"):
        await fetch(remote, state.content, REF, image.target)
    assert len(remote.blob_requests(d)) == fetch_mod.MAX_RESUMES + 1
    (status,) = state.content.list_statuses()
    assert status.ref == ref_key(image.layers[0]) and status.offset == cuts[-1]

    again = FakeRemote(image.blobs)
    report = await fetch(again, state.content, REF, image.target)
    assert again.blob_requests(d) == [("blob", d, cuts[-1])]
    blob = next(b for b in report.blobs if b.desc.digest == d)
    assert blob.fetched == len(big) - cuts[-1]
    assert state.content.exists(d) and state.content.list_statuses() == []


async def test_server_ignoring_range_restarts_the_ingest(state: State) -> None:
    big = layer(1, 1_000_000)
    image = build_image([big])
    d = image.layers[0].digest
    remote = FakeRemote(image.blobs, cuts={d: [400_000]}, ignore_range={d})
    notes: list[str] = []
    await fetch(remote, state.content, REF, image.target, on_event=lambda p: notes.append(p.note))
    assert [o for _, _, o in remote.blob_requests(d)] == [0, 400_000]
    assert any("ignored the range" in n for n in notes)
    state.content.verify(d)


async def test_wrong_bytes_are_rejected_and_nothing_is_kept(state: State) -> None:
    image = build_image([layer(1)])
    d = image.layers[0].digest
    remote = FakeRemote(image.blobs, corrupt={d})
    failed: list[BlobProgress] = []
    with pytest.raises(DataLoss) as e:
        await fetch(
            remote,
            state.content,
            REF,
            image.target,
            on_event=lambda p: failed.append(p) if p.state is BlobState.FAILED else None,
        )
    assert d in str(e.value) and "registry.test" in str(e.value)
    assert not state.content.exists(d)
    assert all(s.ref != ref_key(image.layers[0]) for s in state.content.list_statuses())
    assert [p.desc.digest for p in failed] == [d]


async def test_bad_resumed_bytes_restart_from_zero_once(state: State) -> None:
    big = layer(1, 1_000_000)
    image = build_image([big])
    d = image.layers[0].digest
    # An earlier run left an ingest whose first bytes are wrong.
    w = state.content.writer(ref_key(image.layers[0]), total=len(big), expected=d)
    w.write(b"\0" * 1000 + big[1000:300_000])
    w.close()

    remote = FakeRemote(image.blobs)
    await fetch(remote, state.content, REF, image.target)
    assert [o for _, _, o in remote.blob_requests(d)] == [300_000, 0]
    state.content.verify(d)


async def test_a_complete_leftover_ingest_is_committed_without_a_request(state: State) -> None:
    image = build_image([layer(1)])
    data = image.blobs[image.layers[0].digest]
    w = state.content.writer(ref_key(image.layers[0]), total=len(data))
    w.write(data)
    w.close()
    remote = FakeRemote(image.blobs)
    await fetch(remote, state.content, REF, image.target)
    assert remote.blob_requests(image.layers[0].digest) == []
    assert state.content.exists(image.layers[0].digest)


async def test_platform_selection() -> None:
    amd = build_image([layer(1)], platform=Platform("linux", "amd64"))
    arm = build_image([layer(2)], platform=Platform("linux", "arm64", "v8"))
    index = build_index(amd, arm)
    body = index.blobs[index.target.digest]

    pick = platform_children(Platform("linux", "arm64"))
    assert [d.digest for d in pick(index.target, body)] == [arm.target.digest]
    both = platform_children(all_platforms=True)
    assert len(both(index.target, body)) == 2
    with pytest.raises(NotFound, match=r"linux/s390x.*linux/amd64, linux/arm64"):
        platform_children(Platform("linux", "s390x"))(index.target, body)


async def test_all_platforms_fetches_every_manifest(state: State) -> None:
    amd = build_image([layer(1)], platform=Platform("linux", "amd64"))
    arm = build_image([layer(2)], platform=Platform("linux", "arm64"))
    index = build_index(amd, arm)

    one = FakeRemote(index.blobs)
    await fetch(
        one,
        state.content,
        REF,
        index.target,
        children=platform_children(Platform("linux", "arm64")),
    )
    assert digests(state) == {index.target.digest, *arm.blobs}

    every = FakeRemote(index.blobs)
    await fetch(
        every, state.content, REF, index.target, children=platform_children(all_platforms=True)
    )
    assert digests(state) == set(index.blobs)
    assert {r[1] for r in every.requests} == set(amd.blobs)


async def test_media_types_and_nondistributable_layers(state: State) -> None:
    zstd = build_image([b"\x28\xb5\x2f\xfdzstd"], layer_type=mt.OCI_LAYER_ZSTD)
    docker = build_image([layer(3)], layer_type=mt.DOCKER_LAYER_GZIP)
    for image in (zstd, docker):
        await fetch(FakeRemote(image.blobs), state.content, REF, image.target)
        assert all(state.content.exists(d) for d in image.blobs)

    foreign = desc_of(mt.OCI_LAYER_ND_GZIP, b"elsewhere", urls=("https://cdn.test/l",))
    plain = build_image([b"plain tar bytes"], layer_type=mt.OCI_LAYER, extra_layers=[foreign])
    remote = FakeRemote(plain.blobs)
    report = await fetch(remote, state.content, REF, plain.target)
    assert all(state.content.exists(d) for d in plain.blobs)
    assert foreign.digest not in {r[1] for r in remote.requests}
    assert [b.desc.digest for b in report.skipped] == [foreign.digest]
    assert "non-distributable" in report.skipped[0].note
    assert "cdn.test" in report.skipped[0].note
    # A skipped layer does not make the image look incomplete offline.
    offline = await fetch(None, state.content, REF, plain.target)
    assert [b.desc.digest for b in offline.skipped] == [foreign.digest]


async def test_schema1_is_refused_before_any_request(state: State) -> None:
    target = desc_of(mt.DOCKER_SCHEMA1_SIGNED, b"{}")
    remote = FakeRemote({})
    with pytest.raises(InvalidArgument, match="schema 1"):
        await fetch(remote, state.content, REF, target)
    assert remote.requests == []


async def test_concurrency_is_bounded(state: State) -> None:
    image = build_image([layer(i, SMALL_BLOB + 1) for i in range(6)])
    remote = FakeRemote(image.blobs, gate=3)
    await fetch(remote, state.content, REF, image.target, max_concurrent=2)
    assert remote.max_in_flight == 3  # two layers, and the config beside them
    with pytest.raises(InvalidArgument):
        await fetch(remote, state.content, REF, image.target, max_concurrent=0)


async def test_small_blobs_do_not_queue_behind_large_ones(state: State) -> None:
    """Configs and small layers are round trips: the limit is for transfers."""
    image = build_image([layer(i, 50_000) for i in range(6)])
    remote = FakeRemote(image.blobs, gate=7)
    await fetch(remote, state.content, REF, image.target, max_concurrent=2)
    assert remote.max_in_flight == 7  # the config and six layers at once


async def test_waits_for_another_writer_then_finds_the_blob(state: State) -> None:
    """Another process downloading the same layer holds its ref: we wait, then skip it."""
    image = build_image([layer(1)])
    ldesc = image.layers[0]
    data = image.blobs[ldesc.digest]
    other = state.content.writer(ref_key(ldesc), total=ldesc.size, expected=ldesc.digest)
    other.write(data[:1000])
    waiting = threading.Event()

    def on_event(p: BlobProgress) -> None:
        if p.state is BlobState.WAITING:
            waiting.set()

    async def other_process_finishes() -> None:
        await trio.to_thread.run_sync(waiting.wait)
        other.write(data[1000:])
        other.commit(ldesc.size, ldesc.digest)

    remote = FakeRemote(image.blobs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_process_finishes)
        report = await fetch(remote, state.content, REF, image.target, on_event=on_event)
    assert remote.blob_requests(ldesc.digest) == []
    states = {b.desc.digest: b.state for b in report.blobs}
    assert states[ldesc.digest] is BlobState.EXISTS


async def test_missing_blob_on_the_registry_is_not_found(state: State) -> None:
    image = build_image([layer(1)])
    blobs = dict(image.blobs)
    del blobs[image.layers[0].digest]
    with pytest.raises(NotFound, match="not found"):
        await fetch(FakeRemote(blobs), state.content, REF, image.target)
    assert not state.content.exists(image.layers[0].digest)


# -- bounded: time, disk, memory ----------------------------------------------------


@pytest.fixture
def idle_clock() -> trio.testing.MockClock:
    """Virtual time that jumps to the next deadline once nothing has run for 0.2 s.

    Not pytest-trio's ``autojump_clock``: that one jumps as soon as every
    task waits, which includes waiting on a worker thread writing an
    ingest, so budgets would run out while the disk works.
    """
    return trio.testing.MockClock(autojump_threshold=0.2)


def no_empty_ingest(state: State, failed: Descriptor) -> bool:
    """No ingest for the blob that failed, and none empty at all.

    Siblings cancelled by the failure may keep theirs (a config written but
    not yet committed, say): those hold bytes for the next fetch.
    """
    statuses = state.content.list_statuses()
    return all(s.ref != ref_key(failed) and s.offset > 0 for s in statuses)


async def test_a_stalled_blob_gives_up_at_its_budget_and_keeps_what_arrived(
    state: State, idle_clock: trio.testing.MockClock
) -> None:
    """The budget stops the transfer; every byte received is in the ingest for the next pull.

    500 kB arrive (less than one write batch), then the registry stops
    sending: the fetch must give up at the blob's budget, not hang, and
    must still write the batch it was holding, so the next fetch resumes
    at byte 500,000 rather than at 0.
    """
    big = layer(1, 900_000)
    image = build_image([big])
    ldesc = image.layers[0]
    remote = FakeRemote(image.blobs, stalls={ldesc.digest: 500_000})
    started = trio.current_time()
    with pytest.raises(Unavailable) as e:
        await fetch(remote, state.content, REF, image.target, timeout=300)
    assert trio.current_time() - started == pytest.approx(300, abs=1)
    assert f"layer {ldesc.digest}" in str(e.value)
    assert "gave up after 300 s" in str(e.value) and "0.5 MB of 0.9 MB" in str(e.value)
    assert "next pull resumes" in str(e.value)
    assert state.content.status(ref_key(ldesc)).offset == 500_000

    again = FakeRemote(image.blobs)
    report = await fetch(again, state.content, REF, image.target)
    assert again.blob_requests(ldesc.digest) == [("blob", ldesc.digest, 500_000)]
    blob = next(b for b in report.blobs if b.desc.digest == ldesc.digest)
    assert blob.fetched == ldesc.size - 500_000
    state.content.verify(ldesc.digest)
    assert state.content.list_statuses() == []


async def test_retries_and_resumes_share_one_budget(
    state: State, idle_clock: trio.testing.MockClock
) -> None:
    """Every request waits 50 s (the client honouring Retry-After), every body drops.

    Five resumes of 50 s each would take 300 s: the blob's one budget
    (120 s + its size at 100 kB/s) ends it at 123 s, bytes kept.
    """
    image = build_image([layer(1, 500_000)])
    ldesc = image.layers[0]
    cuts = [100_000 * (i + 1) for i in range(fetch_mod.MAX_RESUMES + 1)]
    remote = FakeRemote(image.blobs, cuts={ldesc.digest: cuts}, open_wait=50)
    budget = fetch_mod.time_budget(ldesc.size)
    assert budget == pytest.approx(125, abs=1)  # the base and the size allowance
    started = trio.current_time()
    with pytest.raises(Unavailable, match=r"gave up after 125 s .* 0\.2 MB of 0\.5 MB fetched"):
        await fetch(remote, state.content, REF, image.target)
    assert trio.current_time() - started == pytest.approx(budget, abs=1)
    assert [o for _, _, o in remote.blob_requests(ldesc.digest)] == [0, 100_000, 200_000]
    assert state.content.status(ref_key(ldesc)).offset == 200_000


async def test_a_request_the_client_gave_up_on_is_not_retried(state: State) -> None:
    """The client already retried it: asking again here would multiply its retries."""
    image = build_image([layer(1)])
    ldesc = image.layers[0]
    remote = FakeRemote(image.blobs, busy={ldesc.digest})
    with pytest.raises(Unavailable, match="HTTP 503"):
        await fetch(remote, state.content, REF, image.target)
    assert len(remote.blob_requests(ldesc.digest)) == 1
    assert no_empty_ingest(state, ldesc)


async def test_timeout_bounds_manifests_and_leaves_no_empty_ingest(
    state: State, idle_clock: trio.testing.MockClock
) -> None:
    index = build_index(build_image([layer(1)]))
    remote = FakeRemote(index.blobs, manifest_wait=3600)
    with pytest.raises(Unavailable, match=r"index sha256:\w+ from registry .*gave up after 5 s"):
        await fetch(remote, state.content, REF, index.target, timeout=5)
    assert state.content.list_statuses() == []
    with pytest.raises(InvalidArgument, match="timeout"):
        await fetch(remote, state.content, REF, index.target, timeout=0)


async def test_a_failed_request_leaves_no_ingest(state: State) -> None:
    image = build_image([layer(1)])
    blobs = dict(image.blobs)
    del blobs[image.layers[0].digest]
    with pytest.raises(NotFound):
        await fetch(FakeRemote(blobs), state.content, REF, image.target)
    assert no_empty_ingest(state, image.layers[0])


async def test_more_bytes_than_the_descriptor_are_refused_and_not_kept(state: State) -> None:
    image = build_image([layer(1)])
    ldesc = image.layers[0]
    remote = FakeRemote(image.blobs, extra={ldesc.digest})
    with pytest.raises(DataLoss, match="more than the expected"):
        await fetch(remote, state.content, REF, image.target)
    assert no_empty_ingest(state, ldesc) and not state.content.exists(ldesc.digest)


async def test_blobs_over_the_size_limits_are_refused_before_any_request(state: State) -> None:
    image = build_image([layer(1), layer(2)])
    remote = FakeRemote(image.blobs)
    with pytest.raises(InvalidArgument) as e:
        await fetch(remote, state.content, REF, image.target, max_blob_size=100_000)
    assert f"{image.layers[0].digest} claims {image.layers[0].size} bytes" in str(e.value)
    assert "100000 byte maximum blob size" in str(e.value)
    assert remote.blob_requests() == []  # not even the config, which fitted

    # A descriptor's claim is checked, whatever the registry would send.
    huge = dataclasses.replace(image.layers[0], size=fetch_mod.DEFAULT_MAX_BLOB_SIZE + 1)
    lying = build_image([], extra_layers=[huge])
    remote = FakeRemote(lying.blobs)
    with pytest.raises(InvalidArgument, match="maximum blob size"):
        await fetch(remote, state.content, REF, lying.target)
    assert remote.blob_requests() == []

    # Manifests and configs have their format's limit, checked before the request.
    remote = FakeRemote({})
    big_manifest = Descriptor(mt.OCI_MANIFEST, sha256(b"m"), MAX_MANIFEST_SIZE + 1)
    with pytest.raises(InvalidArgument, match="limit for a manifest"):
        await fetch(remote, state.content, REF, big_manifest)
    big_config = Descriptor(mt.OCI_CONFIG, sha256(b"c"), MAX_CONFIG_SIZE + 1)
    with pytest.raises(InvalidArgument, match="limit for a config"):
        await fetch(remote, state.content, REF, big_config)
    assert remote.requests == []


async def test_free_space_is_checked_before_the_children_start(
    state: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = build_image([layer(1), layer(2)])
    need = sum(d.size for d in image.layers) + image.config.size  # type: ignore[union-attr]
    monkeypatch.setattr(state.content, "free_bytes", lambda: need - 1)
    remote = FakeRemote(image.blobs)
    with pytest.raises(FailedPrecondition) as e:
        await fetch(remote, state.content, REF, image.target)
    assert f"needs {need / 1e6:.1f} MB more" in str(e.value)
    assert str(state.content.root) in str(e.value)
    assert remote.blob_requests() == []

    # What an interrupted pull left in an ingest needs no new space.
    first = image.layers[0]
    with state.content.writer(ref_key(first), total=first.size, expected=first.digest) as w:
        w.write(image.blobs[first.digest][:1000])
    await fetch(remote, state.content, REF, image.target)
    assert digests(state) == set(image.blobs)


def test_ref_keys_are_containerds() -> None:
    image = build_image([layer(1)])
    assert ref_key(image.target) == f"manifest-{image.target.digest}"
    assert ref_key(image.layers[0]).startswith("layer-sha256:")
    assert ref_key(image.config).startswith("config-sha256:")  # type: ignore[arg-type]
    assert ref_key(desc_of("application/x-other", b"x")).startswith("unknown-sha256:")


# -- through the real registry client and `pull` ------------------------------------


class Body(httpx.AsyncByteStream):
    """A streamed body that may break after *cut* bytes, as a dropped TCP connection."""

    def __init__(self, data: bytes, cut: int | None = None) -> None:
        self.data = data
        self.cut = cut

    async def __aiter__(self) -> AsyncIterator[bytes]:
        end = len(self.data) if self.cut is None else self.cut
        for i in range(0, end, 32 << 10):
            yield self.data[i : min(i + (32 << 10), end)]
        if self.cut is not None:
            raise httpx.RemoteProtocolError("peer closed connection mid-body")


@dataclass
class MockRegistry:
    """A registry behind `httpx.MockTransport`, serving one repository.

    Attributes:
        honour_range: answer Range requests with 206 (else 200, whole blob).
        cut_once: digest → byte after which its next response breaks.
        calls: (method, path, Range header) of every request.
    """

    tags: dict[str, Descriptor]
    blobs: dict[Digest, bytes]
    honour_range: bool = True
    cut_once: dict[Digest, int] = field(default_factory=dict)
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append((request.method, path, request.headers.get("range")))
        kind, _, name = path.removeprefix(f"/v2/{REF.path}/").partition("/")
        if kind == "manifests":
            digest = self.tags[name].digest if name in self.tags else name
            if digest not in self.blobs:
                return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            data = self.blobs[Digest.parse(digest)]
            headers = {
                "Content-Type": json.loads(data)["mediaType"],
                "Docker-Content-Digest": str(digest),
                "Content-Length": str(len(data)),
            }
            body = Body(b"" if request.method == "HEAD" else data)
            return httpx.Response(200, headers=headers, stream=body)
        digest = Digest.parse(name)
        if kind != "blobs" or digest not in self.blobs:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
        data = self.blobs[digest]
        start, status, headers = 0, 200, {}
        wanted = request.headers.get("range")
        if wanted and self.honour_range:
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(data) - start)
        cut = self.cut_once.pop(digest, None)
        return httpx.Response(status, headers=headers, stream=Body(data[start:], cut))

    def blob_calls(self) -> list[tuple[str, str, str | None]]:
        return [c for c in self.calls if "/blobs/" in c[1]]


def refuse(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no request expected, got {request.method} {request.url}")


async def do_pull(
    state: State,
    ref: reference.Reference,
    transport: Any,
    *,
    register: bool = True,
    on_event: Callable[[BlobProgress], None] | None = None,
    **kw: Any,
) -> PullReport:
    """`pull` with *kw* as its `PullOptions`."""
    options = PullOptions(**kw)
    return await pull(
        ref,
        state.content,
        state.images,
        options,
        register=register,
        on_event=on_event,
        transport=transport,
    )


async def test_pull_by_tag_registers_and_repull_is_one_head(state: State) -> None:
    index = build_index(build_image([layer(1), layer(2)]))
    reg = MockRegistry({"1": index.target}, index.blobs)
    report = await do_pull(state, REF, reg.transport())
    assert report.network and report.image is not None
    assert state.images.get(str(REF)).target == index.target
    assert report.fetch.fetched_blobs == 5

    reg.calls.clear()
    again = await do_pull(state, REF, reg.transport())
    assert [c[0] for c in reg.calls] == ["HEAD"]
    assert again.fetch.present_blobs == 5 and again.image == report.image


async def test_fetch_only_registers_nothing(state: State) -> None:
    image = build_image([layer(1)])
    reg = MockRegistry({"1": image.target}, image.blobs)
    report = await do_pull(state, REF, reg.transport(), register=False)
    assert report.image is None and state.images.list() == []
    assert digests(state) == set(image.blobs)


async def test_pull_by_digest_or_offline_when_present_makes_no_request(state: State) -> None:
    image = build_image([layer(1)])
    await do_pull(state, REF, MockRegistry({"1": image.target}, image.blobs).transport())
    pinned = REF.with_tag("").with_digest(image.target.digest)
    events: list[str] = []
    report = await do_pull(
        state, pinned, httpx.MockTransport(refuse), on_event=lambda p: events.append(p.state)
    )
    assert not report.network and events == ["exists"] * 3
    assert state.images.get(str(pinned)).target.digest == image.target.digest
    offline = await do_pull(state, REF, httpx.MockTransport(refuse), offline=True)
    assert not offline.network and offline.target.digest == image.target.digest


async def test_offline_with_something_missing_fails(state: State) -> None:
    image = build_image([layer(1)])
    with pytest.raises(NotFound, match="offline"):
        await do_pull(state, REF, httpx.MockTransport(refuse), offline=True)
    await do_pull(state, REF, MockRegistry({"1": image.target}, image.blobs).transport())
    state.content.delete(image.layers[0].digest)
    with pytest.raises(NotFound, match=image.layers[0].digest):
        await do_pull(state, REF, httpx.MockTransport(refuse), offline=True)


async def test_pull_by_digest_with_a_blob_missing_goes_to_the_registry(state: State) -> None:
    image = build_image([layer(1), layer(2)])
    reg = MockRegistry({"1": image.target}, image.blobs)
    await do_pull(state, REF, reg.transport())
    state.content.delete(image.layers[1].digest)
    reg.calls.clear()
    events: list[tuple[str, str]] = []
    pinned = REF.with_digest(image.target.digest)
    report = await do_pull(
        state, pinned, reg.transport(), on_event=lambda p: events.append((p.kind, p.state))
    )
    assert report.network
    assert [c[0] for c in reg.blob_calls()] == ["GET"]
    assert events.count(("manifest", "exists")) == 1  # reported once, not per attempt


async def test_client_cut_and_ignored_range_restart_the_blob(state: State) -> None:
    big = layer(1, 1_500_000)
    image = build_image([big])
    d = image.layers[0].digest
    reg = MockRegistry({"1": image.target}, image.blobs, honour_range=False, cut_once={d: 600_000})
    report = await do_pull(state, REF, reg.transport())
    ranges = [c[2] for c in reg.blob_calls() if c[1].endswith(d)]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    blob = next(b for b in report.fetch.blobs if b.desc.digest == d)
    assert blob.fetched == 600_000 + len(big)  # the registry sent it all again
    state.content.verify(d)


async def test_client_cut_with_ranges_fetches_only_the_rest(state: State) -> None:
    big = layer(1, 1_500_000)
    image = build_image([big])
    d = image.layers[0].digest
    reg = MockRegistry({"1": image.target}, image.blobs, cut_once={d: 600_000})
    report = await do_pull(state, REF, reg.transport())
    blob = next(b for b in report.fetch.blobs if b.desc.digest == d)
    assert blob.fetched == len(big)
    assert [c[2] for c in reg.blob_calls() if c[1].endswith(d)][1] == "bytes=600000-"


async def test_registry_lacking_a_blob_is_not_found_and_names_nothing_else(state: State) -> None:
    image = build_image([layer(1)])
    blobs = dict(image.blobs)
    del blobs[image.layers[0].digest]
    with pytest.raises(NotFound):
        await do_pull(state, REF, MockRegistry({"1": image.target}, blobs).transport())
    assert state.images.list() == []


async def test_pull_resolve_is_bounded_by_the_timeout(
    state: State, idle_clock: trio.testing.MockClock
) -> None:
    # Plain HTTP: no system CAs loaded in a worker thread while virtual time runs.
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    started = trio.current_time()
    with pytest.raises(Unavailable, match=r"resolving gave up after 5 s \(--timeout\)"):
        await do_pull(state, REF, httpx.MockTransport(hang), timeout=5, plain_http=True)
    assert trio.current_time() - started == pytest.approx(5, abs=0.5)
    assert state.content.list_statuses() == [] and state.images.list() == []
