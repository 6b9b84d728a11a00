"""containerd's unpacker names a layer by its chain ID alone: the chain records.

`ckfs.lazy.record_chains` (written when an image is indexed) maps each chain
ID to its layer and parent chain; the fuse snapshotter's prepare with only
``containerd.io/snapshot.ref`` attaches the recorded layer. A plain
directory stands where the serving process would serve a layer, as in
``tests/test_snapshotters_fuse.py``.
"""

from __future__ import annotations

import pytest

from ckfs import errors
from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, from_bytes
from ckfs.labels import SNAPSHOT_REF
from ckfs.lazy import EAGER, ESTARGZ, LayerPlan, chain_layer, record_chains
from ckfs.snapshots import Kind
from ckfs.state import State
from snapshotters.fuse.snapshotter import FuseSnapshotter
from tests.test_snapshotters_fuse import serve
from tests.test_snapshotters_fuse import sn as sn_fixture
from tests.test_snapshotters_fuse import state as state_fixture

LAYERS = [from_bytes(b"layer a"), from_bytes(b"layer b"), from_bytes(b"layer c")]
CHAIN = [from_bytes(b"chain a"), from_bytes(b"chain b"), from_bytes(b"chain c")]


#: The fuse snapshotter on a fresh state root (`tests.test_snapshotters_fuse`'s fixtures).
state, fresh_sn = state_fixture, sn_fixture


@pytest.fixture
def sn(fresh_sn: FuseSnapshotter) -> FuseSnapshotter:
    """The fuse snapshotter with `LAYERS` "served" (plain directories)."""
    for layer in LAYERS:
        serve(fresh_sn, layer)
    return fresh_sn


def plans(*sources: str) -> list[LayerPlan]:
    return [
        LayerPlan(Descriptor(mt.OCI_LAYER_GZIP, d, 1), s)
        for d, s in zip(LAYERS, sources, strict=True)
    ]


def test_records_name_layer_and_parent_chain_and_skip_eager_layers(state: State) -> None:
    record_chains(state.root, CHAIN, plans(ESTARGZ, EAGER, ESTARGZ))
    assert chain_layer(state.root, str(CHAIN[0])) == (LAYERS[0], "")
    assert chain_layer(state.root, str(CHAIN[1])) is None
    assert chain_layer(state.root, str(CHAIN[2])) == (LAYERS[2], str(CHAIN[1]))
    record_chains(state.root, CHAIN, plans(ESTARGZ, ESTARGZ, ESTARGZ))  # again: same answers
    assert chain_layer(state.root, str(CHAIN[1])) == (LAYERS[1], str(CHAIN[0]))
    assert chain_layer(state.root, "not a digest") is None
    # A damaged record is no record.
    path = next((state.root / "layers" / "chains").iterdir())
    path.write_text("{")
    assert chain_layer(state.root, str(Digest.parse(path.name.replace("-", ":")))) is None


def test_a_prepare_naming_only_a_recorded_chain_id_attaches_its_layer(
    state: State, sn: FuseSnapshotter
) -> None:
    record_chains(state.root, CHAIN, plans(ESTARGZ, ESTARGZ, ESTARGZ))
    parent = ""
    for chain_id, layer in zip(CHAIN, LAYERS, strict=True):
        labels = {SNAPSHOT_REF: str(chain_id)}
        with pytest.raises(errors.AlreadyExists):
            sn.prepare(f"extract-1 {chain_id}", parent, labels)
        info = sn.stat(str(chain_id))
        assert (info.kind, info.parent, dict(info.labels)) == (Kind.COMMITTED, parent, labels)
        assert sn.layer(str(chain_id)) == layer
        parent = str(chain_id)


def test_an_unknown_chain_id_or_another_parent_is_an_ordinary_prepare(
    state: State, sn: FuseSnapshotter
) -> None:
    record_chains(state.root, CHAIN[:1], plans(ESTARGZ, ESTARGZ, ESTARGZ)[:1])
    sn.prepare("base", "")
    sn.commit("other-base", "base")
    # Recorded on parent "", asked on another parent: not that layer.
    sn.prepare(f"extract-1 {CHAIN[0]}", "other-base", {SNAPSHOT_REF: str(CHAIN[0])})
    # Never recorded.
    sn.prepare(f"extract-2 {CHAIN[1]}", "", {SNAPSHOT_REF: str(CHAIN[1])})
    kinds = {i.name: i.kind for i in sn.walk()}
    assert kinds[f"extract-1 {CHAIN[0]}"] is Kind.ACTIVE
    assert kinds[f"extract-2 {CHAIN[1]}"] is Kind.ACTIVE
    assert str(CHAIN[0]) not in kinds


async def test_the_lazy_proxy_name_reaches_the_fuse_snapshotter(
    state: State, sn: FuseSnapshotter
) -> None:
    """ckfsd's default proxies: ``ckfs-lazy`` is fuse, as containerd's unpacker drives it."""
    from ckfs.api.services.snapshots.v1 import snapshots_pb2 as pb
    from ckfs.services.snapshots import LAZY_PROXY, SnapshotsService

    record_chains(state.root, CHAIN, plans(ESTARGZ, ESTARGZ, ESTARGZ))
    service = SnapshotsService(state)
    request = pb.PrepareSnapshotRequest(
        snapshotter=LAZY_PROXY,
        key=f"default/7/extract-1 {CHAIN[0]}",
        labels={SNAPSHOT_REF: str(CHAIN[0])},
    )
    with pytest.raises(errors.AlreadyExists):
        await service.Prepare(request, None)
    listing = pb.ListSnapshotsRequest(
        snapshotter=LAZY_PROXY, filters=[f'labels."{SNAPSHOT_REF}"=={CHAIN[0]},parent==""']
    )
    found = [i.name async for r in service.List(listing, None) for i in r.info]
    assert found == [str(CHAIN[0])]
    assert sn.layer(str(CHAIN[0])) == LAYERS[0]
