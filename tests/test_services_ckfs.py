"""ckfs's own service (Pull, Mounts, Unmount, GC) called directly under trio, no server.

Images are written by `tests.layouts` and imported as ``ckfs import``
does; pulls are offline, so no registry is needed. The wire-level behaviour
(status codes, the client's view) is tested through a real ckfsd in the
CLI tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
import trio

from ckfs.api.v1 import ckfs_pb2 as pb
from ckfs.errors import AlreadyExists, InvalidArgument, NotFound
from ckfs.remotes.archives import open_source
from ckfs.services.bridge import Call
from ckfs.services.ckfs import CkfsService, pull_options_from_proto
from ckfs.state import State
from ckfs.transfer import import_source
from tests.layouts import Layout
from tests.test_unpack import OffLoop

NAME = "example.local/ckfs/service:1"
CALL = Call(method="/ckfs.v1.Ckfs/Test", namespace="default", metadata={})
OFFLINE = pb.PullOptions(offline=True)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[CkfsService]:
    state = State(tmp_path / "root")
    layout = Layout(tmp_path / "layout")
    layout.image([{"etc/os-release": b"ID=service-test\n"}, {"srv/app": b"app\n"}])
    source = open_source(layout.root)
    try:
        await import_source(source, state.content, state.images, name=NAME)
    finally:
        source.close()
    try:
        async with trio.open_nursery() as nursery:
            yield CkfsService(state, nursery=nursery)
            nursery.cancel_scope.cancel()
    finally:
        state.close()


async def events_of(service: CkfsService, request: pb.PullRequest) -> list[pb.PullEvent]:
    return [e async for e in service.Pull(request, CALL)]


async def test_pull_streams_each_blob_then_the_summary(service: CkfsService) -> None:
    events = await events_of(service, pb.PullRequest(ref=NAME, register=True, options=OFFLINE))
    *blobs, last = events
    assert [e.WhichOneof("event") for e in blobs] == ["blob"] * 4  # manifest, config, 2 layers
    assert {e.blob.state for e in blobs} == {pb.EXISTS}
    assert {e.blob.kind for e in blobs} == {"manifest", "config", "layer"}
    summary = last.summary
    assert (summary.reference, summary.name, summary.blobs) == (NAME, NAME, 4)
    assert (summary.fetched_blobs, summary.skipped_blobs, summary.network) == (0, 4, False)
    assert summary.target.digest == blobs[0].blob.descriptor.digest


async def test_fetch_names_nothing(service: CkfsService) -> None:
    *_, last = await events_of(service, pb.PullRequest(ref=NAME, options=OFFLINE))
    assert not last.summary.HasField("name")


async def test_pull_failure_is_the_library_error(service: CkfsService) -> None:
    with pytest.raises(NotFound, match="not present locally"):
        await events_of(service, pb.PullRequest(ref="example.local/nope:1", options=OFFLINE))
    with pytest.raises(InvalidArgument):
        await events_of(service, pb.PullRequest(ref="Not/Valid", options=OFFLINE))


async def test_a_stream_closed_early_cancels_its_pull(service: CkfsService) -> None:
    stream = service.Pull(pb.PullRequest(ref=NAME, options=OFFLINE), CALL)
    first = await stream.__anext__()
    assert first.WhichOneof("event") == "blob"
    await stream.aclose()  # the client went away: no error, nothing left running
    await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize("readonly", [False, True])
async def test_mounts_unpacks_then_answers_the_snapshot(
    service: CkfsService, readonly: bool
) -> None:
    request = pb.MountsRequest(
        ref=NAME, key="k", readonly=readonly, snapshotter="native", options=OFFLINE
    )
    response = await service.Mounts(request, CALL)
    assert response.name == NAME
    [mount] = response.mounts
    assert mount.type == "bind" and ("ro" in mount.options) == readonly
    assert (Path(mount.source) / "etc/os-release").read_bytes() == b"ID=service-test\n"
    with pytest.raises(AlreadyExists):
        await service.Mounts(request, CALL)

    await service.Unmount(pb.UnmountRequest(key="k"), CALL)
    with pytest.raises(NotFound):
        await service.Unmount(pb.UnmountRequest(key="k"), CALL)
    with pytest.raises(NotFound):
        await service.Unmount(pb.UnmountRequest(key="k", snapshotter="native"), CALL)


@pytest.mark.parametrize(
    "request_",
    [
        pb.MountsRequest(ref=NAME, key="", snapshotter="native"),
        pb.MountsRequest(ref=NAME, key="a/../b", snapshotter="native"),
        pb.MountsRequest(ref=NAME, key="k", snapshotter="zfs", options=OFFLINE),
        pb.MountsRequest(ref="Not/Valid", key="k", snapshotter="native"),
    ],
    ids=["empty-key", "dotdot-key", "unknown-snapshotter", "bad-ref"],
)
async def test_mounts_refuses_malformed_requests(
    service: CkfsService, request_: pb.MountsRequest
) -> None:
    with pytest.raises(InvalidArgument):
        await service.Mounts(request_, CALL)


async def test_gc_keeps_the_image_and_its_snapshot_then_collects_when_gone(
    service: CkfsService,
) -> None:
    await service.Mounts(
        pb.MountsRequest(ref=NAME, key="k", snapshotter="native", options=OFFLINE), CALL
    )
    kept = await service.GC(pb.GCRequest(), CALL)
    assert (list(kept.blobs), dict(kept.snapshots), list(kept.errors)) == ([], {}, [])

    await service.Unmount(pb.UnmountRequest(key="k"), CALL)
    service._state.images.delete(NAME)
    dry = await service.GC(pb.GCRequest(dry_run=True, ingest_expiry=0), CALL)
    assert len(dry.blobs) == 4 and len(dry.snapshots["native"].keys) == 2 and dry.bytes > 0
    done = await service.GC(pb.GCRequest(), CALL)
    assert list(done.blobs) == list(dry.blobs)
    assert (await service.GC(pb.GCRequest(), CALL)).blobs == []


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (pb.PullOptions(platform="not a platform"), "platform"),
        (pb.PullOptions(timeout=0), "timeout"),
        (pb.PullOptions(max_blob_size=-1), "at least 1 byte, not -1"),
        (pb.PullOptions(max_blob_size=0), "at least 1 byte, not 0"),
        (pb.PullOptions(timeout=float("nan")), "timeout"),
        (pb.PullOptions(max_concurrent=2**32 - 1), "at most 64, not 4294967295"),
    ],
)
def test_pull_options_are_checked(options: pb.PullOptions, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        pull_options_from_proto(options)


def test_pull_options_zero_values_are_the_defaults() -> None:
    from ckfs.options import PullOptions

    assert pull_options_from_proto(pb.PullOptions()) == PullOptions()
    assert pull_options_from_proto(pb.PullOptions(max_blob_size=1)).max_blob_size == 1
    assert pull_options_from_proto(pb.PullOptions(max_concurrent=64)).max_concurrent == 64
    options = pull_options_from_proto(
        pb.PullOptions(platform="linux/arm/v7", user="u:p", timeout=5)
    )
    assert str(options.platform) == "linux/arm/v7" and options.hosts_dirs == ()
    assert (options.user, options.timeout) == ("u:p", 5)


async def test_hosts_dirs_from_a_client_are_refused_unread(
    service: CkfsService, tmp_path: Path
) -> None:
    """ckfsd runs as root: a caller's hosts.toml would make it read any CA or key file."""
    from ckfs.options import DAEMON_HOSTS_DIRS

    certs = tmp_path / "certs.d" / "registry.test"
    certs.mkdir(parents=True)
    (certs / "hosts.toml").write_text('[host."https://registry.test"]\nca = "/etc/shadow"\n')
    options = pb.PullOptions(hosts_dirs=[str(tmp_path / "certs.d")])
    with pytest.raises(InvalidArgument) as pulled:
        await events_of(service, pb.PullRequest(ref="registry.test/a:1", options=options))
    request = pb.MountsRequest(ref="registry.test/a:1", key="k", options=options)
    with pytest.raises(InvalidArgument) as mounted:
        await service.Mounts(request, CALL)
    assert str(pulled.value) == str(mounted.value) == DAEMON_HOSTS_DIRS
    assert "\n" not in DAEMON_HOSTS_DIRS


async def test_transferring_blobs_tick_between_state_changes(autojump_clock: object) -> None:
    from ckfs.descriptor import Descriptor
    from ckfs.digest import from_bytes
    from ckfs.progress import BlobProgress
    from ckfs.services.ckfs import TICK, _ticks

    desc = Descriptor(media_type="application/octet-stream", digest=from_bytes(b"x"), size=100)
    p = BlobProgress(desc=desc, kind="layer")
    sent: list[pb.PullEvent | Exception] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_ticks, {id(p): p}, sent.append, lambda: 0)
        p.offset = p.fetched = 40
        await trio.sleep(TICK * 1.5)
        await trio.sleep(TICK * 3)  # no bytes moved: no more ticks
        p.offset = 70
        await trio.sleep(TICK)
        nursery.cancel_scope.cancel()
    assert [(e.blob.offset, e.blob.progress_only) for e in sent] == [(40, True), (70, True)]


async def test_ticks_wait_while_the_client_is_behind(autojump_clock: object) -> None:
    """A client that stops reading gets no more ticks queued, and the next once it reads."""
    from ckfs.descriptor import Descriptor
    from ckfs.digest import from_bytes
    from ckfs.progress import BlobProgress
    from ckfs.services.ckfs import MAX_QUEUED_TICKS, TICK, _ticks

    desc = Descriptor(media_type="application/octet-stream", digest=from_bytes(b"x"), size=100)
    p = BlobProgress(desc=desc, kind="layer")
    sent: list[pb.PullEvent | Exception] = []
    backlog = MAX_QUEUED_TICKS
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_ticks, {id(p): p}, sent.append, lambda: backlog)
        for offset in range(10, 60, 10):
            p.offset = offset
            await trio.sleep(TICK)
        assert sent == []
        backlog = 0
        # Wait for the first tick, not for one TICK: the ticker's wake-up may
        # share that instant with this task's, in either order.
        with trio.fail_after(3 * TICK):
            while not sent:
                await trio.sleep(TICK / 10)
        nursery.cancel_scope.cancel()
    assert [e.blob.offset for e in sent] == [50]


class _OffLoopState:
    """A state whose stores and snapshotters fail any use from the trio thread."""

    def __init__(self, state: State) -> None:
        self._state = state
        self.root = state.root
        self.lock_dir = state.lock_dir
        self.content = OffLoop(state.content)
        self.images = OffLoop(state.images)
        self.gc_lock = state.gc_lock

    def snapshotter(self, name: str) -> object:
        return OffLoop(self._state.snapshotter(name))


async def test_the_service_reaches_the_stores_only_from_worker_threads(
    service: CkfsService,
) -> None:
    off = CkfsService(cast(State, _OffLoopState(service._state)), nursery=service._nursery)
    *_, last = await events_of(off, pb.PullRequest(ref=NAME, register=True, options=OFFLINE))
    assert last.summary.blobs == 4
    request = pb.MountsRequest(ref=NAME, key="k", snapshotter="native", options=OFFLINE)
    await service.Mounts(request, CALL)  # unpacks (its own suite checks unpack)
    request.key = "k2"
    await off.Mounts(request, CALL)  # on an unpacked image
    await off.Unmount(pb.UnmountRequest(key="k2"), CALL)
    await off.GC(pb.GCRequest(dry_run=True), CALL)
