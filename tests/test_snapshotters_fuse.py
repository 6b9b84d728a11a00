"""The fuse snapshotter's own part: lazily attached layers and merged views, no FUSE needed.

What it shares with overlay runs in the acceptance suites
(``tests/test_snapshotters.py`` and the mounted one). Here a plain directory
stands where the serving process would serve a layer
(``<root>/fuse/mnt/<algo>-<hex>``): the snapshotter only needs it to be a
directory. Mounting over such stand-ins runs in
``integration/test_snapshotters_fuse.py``; the real FUSE server is tested
beside its own code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from ckfs import errors, lazy
from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, from_bytes
from ckfs.gc import collect
from ckfs.mount import Mount
from ckfs.snapshots import Kind, LayerDirs
from ckfs.state import State
from ckfs.unpack import provided
from snapshotters.fuse.snapshotter import LAYER_DIGEST, FuseSnapshotter
from tests.suites.snapshotter import GC_ROOT, commit_with

LAYER_A = from_bytes(b"layer a")
LAYER_B = from_bytes(b"layer b")
REF = "containerd.io/snapshot.ref"


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    st = State(tmp_path / "root")
    yield st
    st.close()


@pytest.fixture
def sn(state: State) -> FuseSnapshotter:
    sn = state.snapshotter("fuse")
    assert isinstance(sn, FuseSnapshotter)
    return sn


def serve(sn: FuseSnapshotter, layer: Digest, files: dict[str, str] | None = None) -> Path:
    """A plain directory where the serving process would serve *layer*."""
    path = sn.layer_dir(layer)
    path.mkdir(parents=True)
    for rel, text in (files or {}).items():
        (path / rel).write_text(text)
    return path


def ids_under(sn: FuseSnapshotter) -> list[str]:
    return sorted(os.listdir(sn._store.root))


def test_the_context_gives_the_state_roots_paths(state: State, sn: FuseSnapshotter) -> None:
    assert sn.server.mnt == state.root / "fuse" / "mnt"
    assert sn.layer_dir(LAYER_A) == state.root / "fuse" / "mnt" / f"sha256-{LAYER_A.hex}"
    assert isinstance(sn, LayerDirs)


def test_attach_commits_the_layer_with_its_labels(sn: FuseSnapshotter) -> None:
    lower = serve(sn, LAYER_A)
    info = sn.attach("chain-a", LAYER_A, labels={REF: "chain-a", **GC_ROOT})
    assert info.kind is Kind.COMMITTED
    assert info.name == "chain-a" and info.parent == ""
    assert info.labels == {REF: "chain-a", **GC_ROOT}
    assert sn.stat("chain-a") == info
    assert sn.layer("chain-a") == LAYER_A
    assert os.readlink(sn._fs(sn._store.snapshot("chain-a").id)) == str(lower)
    # The short-lived active snapshot of the commit is gone.
    assert [i.name for i in sn.walk()] == ["chain-a"]
    # Nothing of the layer is on this snapshotter's disk: one symlink.
    usage = sn.usage("chain-a")
    assert usage.inodes == 1 and usage.size <= 4096


def test_attached_layers_stack_and_prepare_as_overlay_lowers(sn: FuseSnapshotter) -> None:
    serve(sn, LAYER_A)
    serve(sn, LAYER_B)
    sn.attach("chain-a", LAYER_A, labels=GC_ROOT)
    sn.attach("chain-b", LAYER_B, "chain-a", labels=GC_ROOT)
    assert sn.stat("chain-b").parent == "chain-a"
    a, b = (sn._fs(sn._store.snapshot(k).id) for k in ("chain-a", "chain-b"))

    (m,) = sn.prepare("container", "chain-b")
    assert m.type == "overlay"
    assert f"lowerdir={b}:{a}" in m.options
    assert f"upperdir={sn.upper_dir('container')}" in m.options
    assert sn.lower_dirs("container") == [b, a]
    assert [p.resolve() for p in sn.lower_dirs("container")] == [
        sn.layer_dir(LAYER_B),
        sn.layer_dir(LAYER_A),
    ]
    assert sn.view("one", "chain-a") == [Mount("bind", str(a), options=("ro", "rbind"))]
    assert sn.layer("container") is None
    assert sn.chain_layers("chain-b") == [LAYER_A, LAYER_B]


def test_attached_layers_are_what_gc_keeps_indexed(sn: FuseSnapshotter) -> None:
    assert sn.attached_layers() == set()
    serve(sn, LAYER_A)
    serve(sn, LAYER_B)
    sn.attach("chain-a", LAYER_A)
    sn.attach("chain-b", LAYER_B, "chain-a")
    sn.attach("again-a", LAYER_A)
    commit_with(sn, "eager", "chain-b", files={"x": "y"})
    sn.prepare("container", "eager")
    assert sn.attached_layers() == {LAYER_A, LAYER_B}
    sn.remove("container")
    sn.remove("eager")
    sn.remove("chain-b")
    assert sn.attached_layers() == {LAYER_A}


def test_the_upper_dir_takes_the_attached_roots_owner_and_mode(sn: FuseSnapshotter) -> None:
    lower = serve(sn, LAYER_A)
    os.chmod(lower, 0o750)
    os.chown(lower, 1234, 5678)
    sn.attach("chain-a", LAYER_A)
    sn.prepare("container", "chain-a")
    st = os.stat(sn.upper_dir("container"))
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 1234, 5678)


def test_eager_and_lazy_layers_stack(sn: FuseSnapshotter) -> None:
    """A layer that cannot be served lazily is unpacked as in overlay, on or under lazy ones."""
    serve(sn, LAYER_A)
    sn.attach("chain-a", LAYER_A, labels=GC_ROOT)
    commit_with(sn, "eager", "chain-a", files={"etc/x": "unpacked"})
    serve(sn, LAYER_B)
    sn.attach("chain-b", LAYER_B, "eager", labels=GC_ROOT)
    assert sn.layer("eager") is None
    assert [i.parent for i in sn.walk()] == ["", "eager", "chain-a"]
    with pytest.raises(errors.FailedPrecondition, match="'eager': not a lazily attached layer"):
        sn.chain_layers("chain-b")


def test_attach_refuses_what_it_cannot_commit(sn: FuseSnapshotter) -> None:
    with pytest.raises(errors.FailedPrecondition, match="not served at"):
        sn.attach("chain-a", LAYER_A)
    serve(sn, LAYER_A)
    with pytest.raises(errors.InvalidArgument):
        sn.attach("chain-a", "sha256:nothex")
    with pytest.raises(errors.InvalidArgument):
        sn.attach("", LAYER_A)
    with pytest.raises(errors.NotFound):
        sn.attach("chain-b", LAYER_A, "missing")
    sn.prepare("active")
    with pytest.raises(errors.InvalidArgument):
        sn.attach("chain-b", LAYER_A, "active")
    with pytest.raises(errors.InvalidArgument):
        sn.attach("chain-b", LAYER_A, labels={"big": "x" * 5000})
    sn.attach("chain-a", LAYER_A)
    with pytest.raises(errors.AlreadyExists):
        sn.attach("chain-a", LAYER_A)
    with pytest.raises(errors.AlreadyExists):
        sn.attach("active", LAYER_A)
    assert sorted(i.name for i in sn.walk()) == ["active", "chain-a"]
    assert len(ids_under(sn)) == 2


def test_an_attach_losing_a_race_leaves_nothing(sn: FuseSnapshotter) -> None:
    """The name taken between the check and the commit: AlreadyExists, no active leftover."""
    serve(sn, LAYER_A)
    commit = sn._store.commit

    def racing_commit(name: str, key: str, labels: Mapping[str, str] | None) -> None:
        sn.prepare("winner")
        commit(name, "winner", None)  # another process, just before ours
        commit(name, key, labels)

    sn._store.commit = racing_commit  # type: ignore[method-assign]
    with pytest.raises(errors.AlreadyExists):
        sn.attach("chain-a", LAYER_A)
    assert [i.name for i in sn.walk()] == ["chain-a"]
    assert sn.layer("chain-a") is None  # the winner's, not ours
    assert len(ids_under(sn)) == 1


def test_removal_and_cleanup_leave_the_served_layer_alone(sn: FuseSnapshotter) -> None:
    lower = serve(sn, LAYER_A, {"kept": "shared with other images"})
    sn.attach("chain-a", LAYER_A)
    sn.prepare("container", "chain-a")
    with pytest.raises(errors.FailedPrecondition):
        sn.remove("chain-a")
    sn.remove("container")
    sn.remove("chain-a")
    assert ids_under(sn) == []
    assert (lower / "kept").read_text() == "shared with other images"
    # Debris left by a crash: a snapshot directory no row owns, linking a layer.
    debris = sn._store.root / "99"
    debris.mkdir()
    os.symlink(lower, debris / "fs")
    assert sn.cleanup() == [str(debris)]
    assert (lower / "kept").read_text() == "shared with other images"


def test_gc_collects_unreferenced_attached_layers_only(state: State, sn: FuseSnapshotter) -> None:
    lower = serve(sn, LAYER_A, {"kept": "x"})
    serve(sn, LAYER_B)
    sn.attach("chain-a", LAYER_A)
    sn.attach("rooted", LAYER_B, labels=GC_ROOT)
    report = collect(state.content, state.images, {"fuse": sn})
    assert report.errors == []
    assert report.snapshots == {"fuse": ["chain-a"]}
    assert [i.name for i in sn.walk()] == ["rooted"]
    assert (lower / "kept").read_text() == "x"


def test_gc_removes_the_index_and_chunks_of_layers_nothing_needs(
    state: State, sn: FuseSnapshotter
) -> None:
    from ckfs.archive.entry import Entry
    from ckfs.archive.entry import Kind as EntryKind
    from ckfs.layerindex.cache import ChunkCache
    from ckfs.layerindex.store import IndexStore

    indexes, cache = IndexStore(state.root), ChunkCache(state.root / "cache")
    layer_c = from_bytes(b"layer c")
    for layer in (LAYER_A, LAYER_B, layer_c):
        writer = indexes.writer(layer, source="tar", blob_size=0)
        writer.add(Entry("", EntryKind.DIR, mode=0o755))
        writer.commit().close()
        cache.put(layer, cache.key("span", 0), b"bytes")
    serve(sn, LAYER_A)
    serve(sn, LAYER_B)
    sn.attach("chain-a", LAYER_A, labels=GC_ROOT)  # kept: a rooted snapshot attaches it
    sn.attach("chain-b", LAYER_B)  # collected with its snapshot

    chains = [from_bytes(b"chain a"), from_bytes(b"chain b"), from_bytes(b"chain c")]
    descs = [Descriptor(mt.OCI_LAYER, d, 0) for d in (LAYER_A, LAYER_B, layer_c)]
    lazy.record_chains(state.root, chains, [lazy.LayerPlan(d, lazy.TAR) for d in descs])

    dry = collect(state.content, state.images, {"fuse": sn}, dry_run=True, layer_root=state.root)
    assert dry.layers == [layer_c] and indexes.get(layer_c) is not None
    assert lazy.chain_layer(state.root, str(chains[2])) is not None
    report = collect(state.content, state.images, {"fuse": sn}, layer_root=state.root)
    assert report.errors == [] and report.snapshots == {"fuse": ["chain-b"]}
    assert sorted(report.layers) == sorted([LAYER_B, layer_c])
    assert indexes.digests() == [LAYER_A]
    assert cache.layers() == [LAYER_A]
    # containerd's prepare of a removed layer's chain is an ordinary one again.
    assert lazy.chain_layer(state.root, str(chains[0])) == (LAYER_A, "")
    assert lazy.chain_layer(state.root, str(chains[1])) is None
    assert lazy.chain_layer(state.root, str(chains[2])) is None
    assert len(os.listdir(state.root / "layers" / lazy.CHAINS_DIR)) == 1


def test_the_cache_bound_comes_from_the_environment_or_the_root_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckfs.state import CACHE_MAX_ENV

    def bound(**options: str) -> int | None:
        st = State(tmp_path / "root", options=options)
        try:
            sn = st.snapshotter("fuse")
            assert isinstance(sn, FuseSnapshotter)
            return sn.cache_max
        finally:
            st.close()

    monkeypatch.delenv(CACHE_MAX_ENV, raising=False)
    assert bound() is None  # the server's share of the disk
    monkeypatch.setenv(CACHE_MAX_ENV, "1.5GiB")
    assert bound() == 3 << 29
    assert bound(cache_max="500MB") == 500_000_000  # ckfsd's --cache-max wins
    monkeypatch.setenv(CACHE_MAX_ENV, "lots")
    with pytest.raises(errors.InvalidArgument, match="cache_max: 'lots' is not a size"):
        bound()


def test_merged_views_are_written_atomically_as_json(sn: FuseSnapshotter) -> None:
    assert sn.views() == []
    path = sn.write_view("my-view.1", [LAYER_A, LAYER_B])
    assert path == sn.server.mnt / "merged" / "my-view.1"
    file = sn.server.views / "my-view.1.json"
    assert json.loads(file.read_text()) == {"layers": [LAYER_A, LAYER_B]}
    sn.write_view("my-view.1", [LAYER_B])
    assert json.loads(file.read_text()) == {"layers": [LAYER_B]}
    assert sorted(os.listdir(sn.server.views)) == ["my-view.1.json"]  # no temporary left
    assert sn.views() == ["my-view.1"]
    sn.remove_view("my-view.1")
    assert sn.views() == []
    with pytest.raises(errors.NotFound):
        sn.remove_view("my-view.1")


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "-x", "x" * 129, "a b", "é"])
def test_merged_view_names_are_one_plain_component(sn: FuseSnapshotter, name: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        sn.write_view(name, [LAYER_A])
    with pytest.raises(errors.InvalidArgument):
        sn.remove_view(name)


def test_merged_views_need_valid_layers(sn: FuseSnapshotter) -> None:
    with pytest.raises(errors.InvalidArgument):
        sn.write_view("v", [])
    with pytest.raises(errors.InvalidArgument):
        sn.write_view("v", ["sha256:short"])
    assert sn.views() == []


def test_a_merged_view_of_an_attached_chain(sn: FuseSnapshotter) -> None:
    serve(sn, LAYER_A)
    serve(sn, LAYER_B)
    sn.attach("chain-a", LAYER_A)
    sn.attach("chain-b", LAYER_B, "chain-a")
    sn.write_view("img", sn.chain_layers("chain-b"))
    assert json.loads((sn.server.views / "img.json").read_text()) == {"layers": [LAYER_A, LAYER_B]}


def test_the_state_builds_one_init_context_for_every_factory(state: State) -> None:
    context = state._init_context()
    assert (context.root, context.db) == (state.root, state.db)
    assert context.cache_dir == state.root / "cache"
    assert context.registry.hosts_dirs[0] == state.root / "certs.d"
    assert "content" not in vars(state)  # opened only when a snapshotter asks
    assert context.content() is state.content
    assert context.options == {}


def extract_labels(chain_id: str, layer: str) -> dict[str, str]:
    """What containerd's unpacker and the CRI put on a layer's extract snapshot."""
    return {REF: chain_id, LAYER_DIGEST: layer, "containerd.io/snapshot/cri.image-ref": "x/y:1"}


def test_a_prepare_naming_a_served_layer_attaches_it(sn: FuseSnapshotter) -> None:
    """containerd's remote snapshot protocol: AlreadyExists, the chain ID committed."""
    serve(sn, LAYER_A)
    serve(sn, LAYER_B)
    labels = extract_labels("chain-a", LAYER_A)
    with pytest.raises(errors.AlreadyExists) as refused:
        sn.prepare("extract-1 chain-a", "", labels)
    assert "lazily" in str(refused.value)
    info = sn.stat("chain-a")
    assert (info.kind, info.parent, dict(info.labels)) == (Kind.COMMITTED, "", labels)
    assert sn.layer("chain-a") == LAYER_A
    with pytest.raises(errors.NotFound):
        sn.stat("extract-1 chain-a")
    # Asked again (a second pull of the image): the same answer, nothing new.
    with pytest.raises(errors.AlreadyExists):
        sn.prepare("extract-2 chain-a", "", labels)
    with pytest.raises(errors.AlreadyExists):
        sn.prepare("extract-3 chain-b", "chain-a", extract_labels("chain-b", LAYER_B))
    assert sn.chain_layers("chain-b") == [LAYER_A, LAYER_B]
    assert [i.name for i in sn.walk()] == ["chain-a", "chain-b"]


def test_unpack_takes_an_attached_layer_as_provided(sn: FuseSnapshotter) -> None:
    chain_id = from_bytes(b"chain")
    serve(sn, LAYER_A)
    with pytest.raises(errors.AlreadyExists) as refused:
        sn.prepare("extract", "", extract_labels(chain_id, LAYER_A))
    provided(sn, chain_id, refused.value)  # no error: the unpacker moves on


@pytest.mark.parametrize(
    "labels",
    [
        {},
        {REF: "chain-a"},
        {LAYER_DIGEST: str(LAYER_A)},
        extract_labels("chain-a", "sha256:not-a-digest"),
        extract_labels("chain-a", str(LAYER_B)),  # not served
    ],
)
def test_other_prepares_are_overlays(sn: FuseSnapshotter, labels: dict[str, str]) -> None:
    serve(sn, LAYER_A)
    (m,) = sn.prepare("extract", "", labels)
    assert m.type == "bind"
    assert sn.stat("extract").kind is Kind.ACTIVE
    assert [i.name for i in sn.walk()] == ["extract"]


async def test_containerd_through_the_proxy_finds_an_attached_layer(
    state: State, sn: FuseSnapshotter
) -> None:
    """ckfsd's Snapshots service with its proxy name on ``fuse``, as containerd drives it.

    containerd's metadata layer prepares the extract snapshot under its own
    key, takes AlreadyExists as "the remote snapshotter has it", then Lists
    by the chain ID label on the parent and adopts what it finds.
    """
    from ckfs.api.services.snapshots.v1 import snapshots_pb2 as pb
    from ckfs.services.snapshots import SnapshotsService

    service = SnapshotsService(state, proxies={"ckfs": "fuse"})
    chain_id = str(from_bytes(b"chain"))
    serve(sn, LAYER_A)
    request = pb.PrepareSnapshotRequest(
        snapshotter="ckfs",
        key=f"default/7/extract-1 {chain_id}",
        labels=extract_labels(chain_id, LAYER_A),
    )
    with pytest.raises(errors.AlreadyExists):
        await service.Prepare(request, None)
    listing = pb.ListSnapshotsRequest(
        snapshotter="ckfs", filters=[f'labels."{REF}"=={chain_id},parent==""']
    )
    found = [i.name async for r in service.List(listing, None) for i in r.info]
    assert found == [chain_id]
    assert sn.layer(chain_id) == LAYER_A
