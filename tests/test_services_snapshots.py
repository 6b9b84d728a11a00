"""The Snapshots service class, called directly under trio: no server, no wire.

What is checked here is the service's own work: the snapshotter a request
name reaches, conversions to containerd's messages, List batches and
filters, the remote-snapshot contract containerd's metadata layer relies on
(Prepare answering AlreadyExists for a layer ckfs unpacked, the List that
adopts it), containerd's gc kept off ckfs's own snapshots, and input refused
at the boundary. The snapshotter contract itself is the acceptance suite's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import cast

import pytest
import trio

from ckfs import errors, gc
from ckfs.api.services.snapshots.v1 import snapshots_pb2 as pb
from ckfs.api.types import types_pb2
from ckfs.labels import ADOPTED_BY, CONTAINERD, SNAPSHOT_REF
from ckfs.services.checks import LIST_BATCH, MAX_KEY_SIZE, batches
from ckfs.services.snapshots import PROXY, SnapshotsService
from ckfs.snapshots import Info, Kind, Snapshotter, containerd_owned
from ckfs.state import State
from tests.test_unpack import OffLoop

#: A ckfs snapshotter named directly, as ``ctr --address <ckfsd>`` does.
DIRECT = "overlayfs"

L0 = "sha256:" + "a" * 64
L1 = "sha256:" + "b" * 64


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    state = State(tmp_path / "root")
    # Every store call must come from a worker thread: SQLite blocks.
    sn = state.snapshotter(DIRECT)
    state._snapshotters[DIRECT] = cast(Snapshotter, OffLoop(sn))
    yield state
    state._snapshotters[DIRECT] = sn
    state.close()


@pytest.fixture
def service(state: State) -> SnapshotsService:
    return SnapshotsService(state)


def ckfs_layers(state: State, chain: Sequence[str]) -> None:
    """Commit *chain* as ckfs's unpack does: named by chain ID, no labels."""
    sn = cast(OffLoop, state.snapshotter(DIRECT)).inner
    assert isinstance(sn, Snapshotter)
    parent = ""
    for chain_id in chain:
        key = f"extract-1 {chain_id}"
        sn.prepare(key, parent, {SNAPSHOT_REF: chain_id})
        sn.commit(chain_id, key)
        parent = chain_id


async def prepare(
    service: SnapshotsService,
    key: str,
    parent: str = "",
    labels: dict[str, str] | None = None,
    snapshotter: str = PROXY,
) -> list[types_pb2.Mount]:
    request = pb.PrepareSnapshotRequest(
        snapshotter=snapshotter, key=key, parent=parent, labels=labels or {}
    )
    return list((await service.Prepare(request, None)).mounts)


async def commit(
    service: SnapshotsService,
    name: str,
    key: str,
    labels: dict[str, str] | None = None,
    snapshotter: str = PROXY,
) -> None:
    request = pb.CommitSnapshotRequest(
        snapshotter=snapshotter, name=name, key=key, labels=labels or {}
    )
    await service.Commit(request, None)


async def stat(service: SnapshotsService, key: str, snapshotter: str = PROXY) -> pb.Info:
    return (await service.Stat(pb.StatSnapshotRequest(snapshotter=snapshotter, key=key), None)).info


async def responses(
    service: SnapshotsService, filters: Sequence[str] = (), snapshotter: str = PROXY
) -> list[pb.ListSnapshotsResponse]:
    request = pb.ListSnapshotsRequest(snapshotter=snapshotter, filters=list(filters))
    stream = cast(AsyncIterator[pb.ListSnapshotsResponse], service.List(request, None))
    return [r async for r in stream]


async def names(
    service: SnapshotsService, filters: Sequence[str] = (), snapshotter: str = PROXY
) -> list[str]:
    return [i.name for r in await responses(service, filters, snapshotter) for i in r.info]


async def containerd_unpack(service: SnapshotsService, chain: Sequence[str]) -> list[str]:
    """Unpack *chain* as containerd 1.6's unpacker through its metadata layer does.

    Answers the backend names of the layers, adopted or made.
    """
    backend = []
    bparent = ""
    for n, chain_id in enumerate(chain):
        key = f"default/{2 * n + 1}/extract-{n} {chain_id}"
        try:
            await prepare(service, key, bparent, {SNAPSHOT_REF: chain_id})
        except errors.AlreadyExists:
            # metadata/snapshot.go: the filter it sends, and the checks it makes.
            found = [
                i
                for r in await responses(
                    service, [f'labels."{SNAPSHOT_REF}"=={chain_id},parent=="{bparent}"']
                )
                for i in r.info
                if i.kind == pb.COMMITTED
                and i.labels[SNAPSHOT_REF] == chain_id
                and i.parent == bparent
            ]
            assert found, chain_id
            bparent = found[0].name
        else:
            bparent = f"default/{2 * n + 2}/{chain_id}"
            await commit(service, bparent, key, {SNAPSHOT_REF: chain_id})
        backend.append(bparent)
    return backend


async def test_lifecycle_through_the_proxy_name(service: SnapshotsService) -> None:
    mounts = await prepare(service, "default/1/base")
    assert [m.type for m in mounts] == ["bind"]
    await commit(service, "default/2/base", "default/1/base", {"x": "1"})
    await prepare(service, "default/3/c", "default/2/base")
    info = await stat(service, "default/3/c")
    assert (info.kind, info.parent) == (pb.ACTIVE, "default/2/base")
    assert info.created_at.ToNanoseconds() > 0
    committed = await stat(service, "default/2/base")
    assert (committed.kind, dict(committed.labels)) == (pb.COMMITTED, {"x": "1"})
    again = await service.Mounts(pb.MountsRequest(snapshotter=PROXY, key="default/3/c"), None)
    assert [m.type for m in again.mounts] == ["overlay"]
    usage = await service.Usage(pb.UsageRequest(snapshotter=PROXY, key="default/3/c"), None)
    assert usage.inodes >= 1
    view = pb.ViewSnapshotRequest(snapshotter=PROXY, key="default/4/v", parent="default/2/base")
    assert (await service.View(view, None)).mounts
    assert await names(service) == ["default/2/base", "default/3/c", "default/4/v"]
    for key in ("default/4/v", "default/3/c", "default/2/base"):
        await service.Remove(pb.RemoveSnapshotRequest(snapshotter=PROXY, key=key), None)
    await service.Cleanup(pb.CleanupRequest(snapshotter=PROXY), None)
    assert await names(service) == []


async def test_proxy_and_direct_names_share_one_snapshotter(service: SnapshotsService) -> None:
    await prepare(service, "default/1/a", snapshotter=PROXY)
    assert await names(service, snapshotter=DIRECT) == ["default/1/a"]
    with pytest.raises(errors.InvalidArgument, match="unknown snapshotter"):
        await names(service, snapshotter="zfs")


async def test_proxy_names_are_configurable(state: State) -> None:
    service = SnapshotsService(state, proxies={"lazy": DIRECT})
    await prepare(service, "default/1/a", snapshotter="lazy")
    with pytest.raises(errors.InvalidArgument):
        await prepare(service, "default/2/a", snapshotter=PROXY)


async def test_errors_keep_their_class(service: SnapshotsService) -> None:
    with pytest.raises(errors.NotFound):
        await stat(service, "default/1/none")
    await prepare(service, "default/1/a")
    with pytest.raises(errors.AlreadyExists):
        await prepare(service, "default/1/a")
    with pytest.raises(errors.NotFound):
        await prepare(service, "default/2/b", "default/9/none")
    with pytest.raises(errors.InvalidArgument):  # an active parent, as containerd
        await prepare(service, "default/2/b", "default/1/a")
    await commit(service, "default/3/a", "default/1/a")
    await prepare(service, "default/4/b", "default/3/a")
    with pytest.raises(errors.FailedPrecondition):  # it has a child
        await service.Remove(pb.RemoveSnapshotRequest(snapshotter=PROXY, key="default/3/a"), None)
    with pytest.raises(errors.FailedPrecondition):  # committed: no mounts
        await service.Mounts(pb.MountsRequest(snapshotter=PROXY, key="default/3/a"), None)


async def test_list_streams_in_batches(service: SnapshotsService) -> None:
    total = 2 * LIST_BATCH + 7
    for n in range(total):
        await prepare(service, f"default/{n}/k{n:04}")
    batches = await responses(service)
    assert [len(r.info) for r in batches] == [LIST_BATCH, LIST_BATCH, 7]
    assert await names(service) == sorted(f"default/{n}/k{n:04}" for n in range(total))
    assert await responses(service, ["name==nothing"]) == []


async def test_list_filters_as_containerd(service: SnapshotsService) -> None:
    await prepare(service, "default/1/base", labels={SNAPSHOT_REF: L0})
    await commit(service, "default/2/base", "default/1/base", {SNAPSHOT_REF: L0})
    await prepare(service, "default/3/c", "default/2/base", {"team": "x"})
    await prepare(service, "default/4/other")
    assert await names(service, [f'labels."{SNAPSHOT_REF}"=={L0}']) == ["default/2/base"]
    assert await names(service, ['parent=="default/2/base"']) == ["default/3/c"]
    # containerd's storage adaptor: parent is present, and empty, for a base.
    assert await names(service, ['parent==""']) == ["default/2/base", "default/4/other"]
    assert await names(service, ["kind==active"]) == ["default/3/c", "default/4/other"]
    assert await names(service, ["kind==committed", "labels.team"]) == [
        "default/2/base",
        "default/3/c",
    ]
    assert await names(service, ["name==default/4/other"]) == ["default/4/other"]
    with pytest.raises(errors.InvalidArgument):
        await names(service, ["labels.=="])


async def test_update_labels_by_field_path(service: SnapshotsService) -> None:
    await prepare(service, "default/1/a", labels={"a": "1", "b": "2"})

    async def update(labels: dict[str, str], paths: list[str]) -> dict[str, str]:
        request = pb.UpdateSnapshotRequest(
            snapshotter=PROXY, info=pb.Info(name="default/1/a", labels=labels)
        )
        request.update_mask.paths.extend(paths)
        return dict((await service.Update(request, None)).info.labels)

    assert await update({"b": "3", "c": "4"}, ["labels.b"]) == {"a": "1", "b": "3"}
    assert await update({"c": "4"}, ["labels.a"]) == {"b": "3"}
    assert await update({"d": "5"}, ["labels"]) == {"d": "5"}
    assert await update({"e": "6"}, []) == {"e": "6"}
    with pytest.raises(errors.InvalidArgument):
        await update({}, ["parent"])
    assert dict((await stat(service, "default/1/a")).labels) == {"e": "6"}


async def test_containerd_adopts_the_layers_ckfs_unpacked(
    state: State, service: SnapshotsService
) -> None:
    ckfs_layers(state, [L0, L1])
    # Stat by chain ID answers for ckfs's layers, with the label containerd reads.
    info = await stat(service, L1)
    assert (info.kind, info.parent, info.labels[SNAPSHOT_REF]) == (pb.COMMITTED, L0, L1)
    assert await containerd_unpack(service, [L0, L1]) == [L0, L1]
    # Nothing was made: containerd's only snapshot is the container's.
    assert await names(service) == [L0, L1]
    await prepare(service, "default/5/container", L1)
    assert await names(service, ["kind==active"]) == ["default/5/container"]


async def test_adoption_needs_the_same_parent(state: State, service: SnapshotsService) -> None:
    ckfs_layers(state, [L1])  # L1 committed on nothing; containerd wants it on L0
    made = await containerd_unpack(service, [L0, L1])
    assert made == [f"default/2/{L0}", f"default/4/{L1}"]


async def test_adoption_is_recorded_and_kept_by_ckfs_gc(
    state: State, service: SnapshotsService
) -> None:
    """containerd's lookup labels the layer it adopts, once; ckfs's gc keeps
    it and its parents; only an explicit removal (``ckfs snapshots rm``) ends it."""
    unused = "sha256:" + "c" * 64
    ckfs_layers(state, [L0, L1])
    ckfs_layers(state, [unused])

    async def adopted() -> list[str]:
        infos = [await stat(service, n, DIRECT) for n in await names(service, [], DIRECT)]
        return [i.name for i in infos if i.labels.get(ADOPTED_BY) == CONTAINERD]

    # Listings that are not containerd's chain-ID lookup adopt nothing.
    await names(service)
    await names(service, [f'labels."{SNAPSHOT_REF}"'])
    await names(service, [f'labels."{SNAPSHOT_REF}"=={L1}'], DIRECT)
    assert await adopted() == []
    lookup = [f'labels."{SNAPSHOT_REF}"=={L1},parent=="{L0}"']
    (shown,) = [i for r in await responses(service, lookup) for i in r.info]
    assert (shown.name, shown.labels[ADOPTED_BY]) == (L1, CONTAINERD)
    marked = await stat(service, L1, DIRECT)
    await names(service, lookup)  # set once: a second lookup changes nothing
    assert (await stat(service, L1, DIRECT)).updated_at == marked.updated_at
    assert await adopted() == [L1]

    sn = state.snapshotter(DIRECT)
    report = await trio.to_thread.run_sync(
        lambda: gc.collect(state.content, state.images, {DIRECT: sn})
    )
    assert (report.snapshots, report.errors) == ({DIRECT: [unused]}, [])
    assert await names(service, [], DIRECT) == [L0, L1]
    # containerd's gc cannot remove it through the proxy; the direct name can.
    with pytest.raises(errors.FailedPrecondition):
        await service.Remove(pb.RemoveSnapshotRequest(snapshotter=PROXY, key=L1), None)
    for key in (L1, L0):
        await service.Remove(pb.RemoveSnapshotRequest(snapshotter=DIRECT, key=key), None)
    assert await names(service, [], DIRECT) == []


async def test_direct_names_answer_the_store_as_it_is(
    state: State, service: SnapshotsService
) -> None:
    ckfs_layers(state, [L0])
    assert SNAPSHOT_REF not in (await stat(service, L0, DIRECT)).labels
    # No adoption either: the prepare makes a snapshot.
    await prepare(service, "k", "", {SNAPSHOT_REF: L0}, snapshotter=DIRECT)
    assert await names(service, snapshotter=DIRECT) == ["k", L0]
    # ckfs's own snapshots are the store's to remove under its own name.
    await service.Remove(pb.RemoveSnapshotRequest(snapshotter=DIRECT, key=L0), None)


async def test_containerd_gc_removes_only_its_own(state: State, service: SnapshotsService) -> None:
    ckfs_layers(state, [L0])
    await prepare(service, "default/1/c", L0)
    await prepare(service, "ckfs-mount-1", L0, snapshotter=DIRECT)
    # containerd's gc: every backend snapshot it has no record of, children first.
    removed, refused = [], []
    for name in sorted(await names(service), key=lambda n: n == L0):
        try:
            await service.Remove(pb.RemoveSnapshotRequest(snapshotter=PROXY, key=name), None)
        except errors.FailedPrecondition:
            refused.append(name)
        else:
            removed.append(name)
    assert (removed, refused) == (["default/1/c"], ["ckfs-mount-1", L0])
    assert await names(service, snapshotter=DIRECT) == ["ckfs-mount-1", L0]


def test_containerd_owned_keys() -> None:
    assert containerd_owned("default/12/extract-1 sha256:abc")
    assert containerd_owned("k8s.io/3/sha256:abc")
    assert not containerd_owned("sha256:abc")
    assert not containerd_owned("default/x/key")
    assert not containerd_owned("/1/key")


BAD_KEYS = {
    "dotdot": "default/1/../../etc",
    "dotdot alone": "..",
    "nul": "default/1/a\x00b",
    "escape": "default/1/\x1b[31m",
    "4 KiB": "default/1/" + "k" * 4096,
}


@pytest.mark.parametrize("key", BAD_KEYS.values(), ids=BAD_KEYS.keys())
async def test_malformed_keys_are_invalid_everywhere(service: SnapshotsService, key: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        await prepare(service, key)
    with pytest.raises(errors.InvalidArgument):
        await prepare(service, "default/1/ok", key)
    await prepare(service, "default/1/ok")
    with pytest.raises(errors.InvalidArgument):
        await commit(service, key, "default/1/ok")
    for rpc, request in [
        (service.Stat, pb.StatSnapshotRequest(snapshotter=PROXY, key=key)),
        (service.Mounts, pb.MountsRequest(snapshotter=PROXY, key=key)),
        (service.Usage, pb.UsageRequest(snapshotter=PROXY, key=key)),
        (service.Remove, pb.RemoveSnapshotRequest(snapshotter=PROXY, key=key)),
        (service.Update, pb.UpdateSnapshotRequest(snapshotter=PROXY, info=pb.Info(name=key))),
    ]:
        with pytest.raises(errors.InvalidArgument):
            await rpc(request, None)  # type: ignore[operator]
    assert await names(service) == ["default/1/ok"]


async def test_a_key_at_the_limit_is_fine(service: SnapshotsService) -> None:
    key = "default/1/" + "k" * (MAX_KEY_SIZE - len("default/1/"))
    await prepare(service, key)
    assert (await stat(service, key)).name == key


async def test_label_sets_over_the_limit_are_invalid(service: SnapshotsService) -> None:
    many = {f"label.{n}": "v" * 1000 for n in range(100)}  # each fine, 100 KB together
    with pytest.raises(errors.InvalidArgument, match="labels"):
        await prepare(service, "default/1/a", labels=many)
    with pytest.raises(errors.InvalidArgument):  # one label too large: the store's check
        await prepare(service, "default/1/a", labels={"big": "v" * 5000})
    await prepare(service, "default/1/a")
    with pytest.raises(errors.InvalidArgument, match="labels"):
        await commit(service, "default/2/a", "default/1/a", many)
    request = pb.UpdateSnapshotRequest(
        snapshotter=PROXY, info=pb.Info(name="default/1/a", labels=many)
    )
    with pytest.raises(errors.InvalidArgument, match="labels"):
        await service.Update(request, None)
    assert await names(service) == ["default/1/a"]
    assert dict((await stat(service, "default/1/a")).labels) == {}


def test_list_batches_are_cut_by_size_too() -> None:
    # 100 snapshots with labels near the per-request limit would make one
    # response larger than gRPC's default 4 MiB.
    labels = {f"l{n}": "v" * 4000 for n in range(15)}
    infos = [Info(kind=Kind.ACTIVE, name=f"k{n}", labels=labels) for n in range(LIST_BATCH)]
    sizes = [len(batch) for batch in batches(infos)]
    assert sum(sizes) == LIST_BATCH and len(sizes) > 1
    assert all(len(labels) * 4000 * size <= 2 << 20 for size in sizes)
