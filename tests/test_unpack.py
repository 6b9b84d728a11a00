"""`ckfs.unpack.unpack`, `ckfs.rootfs.snapshot_on` and `ckfs.gc.collect` on real
snapshotters (overlayfs and native) in temporary state roots, without mounting.

Images are written byte by byte by `tests.layouts` and imported with
`ckfs.transfer.import_source`, as ``ckfs import`` does. What a snapshot
holds is read from the directories its Mount records name (a bind's source;
an overlay's lower directories, top first), so nothing here needs mount(2).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import httpx
import pytest
import trio

from ckfs import gc, reference
from ckfs.content import ContentStore
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import AlreadyExists, DataLoss, FailedPrecondition, NotFound
from ckfs.identity import chain_ids
from ckfs.images.store import Image, ImageStore
from ckfs.labels import GC_REF_CONTENT, GC_REF_SNAPSHOT, GC_ROOT, SNAPSHOT_REF
from ckfs.mount import PAGE_SIZE, Mount, _compact_lowerdir
from ckfs.options import PullOptions
from ckfs.provide import (
    IMAGE_LABEL,
    ensure_rootfs,
    ensure_rootfs_async,
    pull_image,
    pull_image_async,
)
from ckfs.remotes.archives import open_source
from ckfs.rootfs import EXTRACT_PREFIX, NotUnpacked, snapshot_on
from ckfs.snapshots import Kind, Snapshotter, max_layers
from ckfs.state import State
from ckfs.transfer import import_source
from ckfs.unpack import UnpackReport, pull_and_unpack, unpack
from snapshotters.overlay import OverlaySnapshotter
from snapshotters.storage import Snapshot
from tests.layouts import Layout, layer_tar, sha256

BASE = {"etc/os-release": b"ID=unpack-test\n", "bin/tool": b"#!/bin/sh\n"}
APP = {"srv/app/data": b"x" * 50_000, "etc/app.conf": b"conf\n"}
OTHER = {"srv/other": b"other\n"}


@dataclass
class Env:
    """A state root with one snapshotter to unpack into."""

    state: State
    sn: Snapshotter
    name: str  # the snapshotter's registered name
    tmp: Path

    async def add(self, name: str, layers: list[dict[str, bytes]]) -> Descriptor:
        """Write an image of *layers*, import it as *name*; its target."""
        layout = Layout(self.tmp / f"layout-{len(os.listdir(self.tmp))}")
        layout.image(layers)
        return await self.import_layout(layout, name)

    async def import_layout(self, layout: Layout, name: str) -> Descriptor:
        source = open_source(layout.root)
        try:
            await import_source(source, self.state.content, self.state.images, name=name)
        finally:
            source.close()
        return self.state.images.get(name).target

    async def unpack(self, target: Descriptor) -> UnpackReport:
        return await unpack(
            self.state.content,
            self.sn,
            target,
            snapshotter_name=self.name,
            lock_dir=self.state.lock_dir,
        )

    def names(self) -> list[str]:
        return sorted(i.name for i in self.sn.walk())

    def dirs(self) -> list[str]:
        """What is on disk under ``<root>/snapshots/<name>/``."""
        return sorted(os.listdir(self.state.root / "snapshots" / self.name))

    def collect(self) -> gc.GCReport:
        return gc.collect(self.state.content, self.state.images, {self.name: self.sn})


@pytest.fixture(params=["overlayfs", "native"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    state = State(tmp_path / "root")
    work = tmp_path / "work"
    work.mkdir()
    yield Env(state, state.snapshotter(request.param), request.param, work)
    state.close()


def chain_of(layers: list[dict[str, bytes]]) -> list[str]:
    """Chain IDs of an image of *layers* as `tests.layouts` writes them."""
    return [str(c) for c in chain_ids([sha256(layer_tar(files)) for files in layers])]


def files_in(mounts: list[Mount]) -> dict[str, bytes]:
    """Regular files a snapshot's mounts would show (these layers have no whiteouts)."""
    (m,) = mounts
    if m.type == "bind":
        dirs = [Path(m.source)]
    else:
        (lower,) = [o for o in m.options if o.startswith("lowerdir=")]
        dirs = [Path(d) for d in lower.removeprefix("lowerdir=").split(":")]
        dirs = [Path(o.split("=", 1)[1]) for o in m.options if o.startswith("upperdir=")] + dirs
    seen: dict[str, bytes] = {}
    for d in dirs:  # top first: the first one to have a path wins
        for p in d.rglob("*"):
            rel = str(p.relative_to(d))
            if p.is_file() and not p.is_symlink() and rel not in seen:
                seen[rel] = p.read_bytes()
    return seen


def extracts(env: Env) -> list[str]:
    return [n for n in env.names() if n.startswith(EXTRACT_PREFIX)]


async def test_unpack_applies_each_missing_layer_and_nothing_twice(env: Env) -> None:
    target = await env.add("example.local/unpack/app:1", [BASE, APP])
    chain = chain_of([BASE, APP])

    first = await env.unpack(target)
    assert [str(c) for c in first.applied] == chain and first.present == 0
    assert str(first.chain_id) == chain[-1]
    assert env.names() == sorted(chain)
    assert [env.sn.stat(c).parent for c in chain] == ["", chain[0]]
    assert all(env.sn.stat(c).kind is Kind.COMMITTED for c in chain)

    again = await env.unpack(target)
    assert again.applied == [] and again.present == 2
    assert env.names() == sorted(chain)
    assert extracts(env) == []


async def test_a_layer_shared_with_another_image_is_not_applied_again(env: Env) -> None:
    app = await env.add("example.local/unpack/app:1", [BASE, APP])
    other = await env.add("example.local/unpack/other:1", [BASE, OTHER])
    await env.unpack(app)
    report = await env.unpack(other)
    chain = chain_of([BASE, OTHER])
    assert report.present == 1 and [str(c) for c in report.applied] == chain[1:]
    assert len(env.names()) == 3  # one base, two tops
    assert files_in(snapshot_on(env.state.content, env.sn, other, "v", readonly=True)) == {
        **BASE,
        **OTHER,
    }


def with_wrong_diff_id(layout: Layout, layer: int) -> None:
    """Make the image's config claim a diff ID layer *layer* does not have."""
    m = layout.manifest()
    config = json.loads(layout.blob_path(m["config"]["digest"]).read_bytes())
    config["rootfs"]["diff_ids"][layer] = sha256(b"not this layer")
    data = json.dumps(config).encode()
    m["config"] = {**m["config"], "digest": layout.blob(data), "size": len(data)}
    body = json.dumps(m).encode()
    layout.manifests[0] = {**layout.manifests[0], "digest": layout.blob(body), "size": len(body)}
    layout.write_index()


async def test_layer_not_matching_its_diff_id_is_data_loss_and_leaves_nothing(env: Env) -> None:
    layout = Layout(env.tmp / "bad")
    layout.image([BASE, APP])
    with_wrong_diff_id(layout, 1)
    target = await env.import_layout(layout, "example.local/unpack/bad:1")
    good_base = chain_of([BASE])[0]

    for _ in range(2):  # and again: no leftover changes the outcome
        with pytest.raises(DataLoss):
            await env.unpack(target)
        # The good layer below stays committed; the bad one left no trace.
        assert env.names() == [good_base]
        assert extracts(env) == []
        assert len(env.dirs()) == 1

    config = env.state.content.info(Digest.parse(layout.manifest()["config"]["digest"]))
    assert not any(k.startswith(GC_REF_SNAPSHOT) for k in config.labels)
    with pytest.raises(NotUnpacked):
        snapshot_on(env.state.content, env.sn, target, "rootfs")


async def test_missing_layer_blob_is_not_found_and_leaves_nothing(env: Env) -> None:
    layout = Layout(env.tmp / "missing")
    layout.image([BASE, APP])
    target = await env.import_layout(layout, "example.local/unpack/app:1")
    env.state.content.delete(Digest.parse(layout.manifest()["layers"][1]["digest"]))
    with pytest.raises(NotFound):
        await env.unpack(target)
    assert env.names() == chain_of([BASE])
    assert extracts(env) == []


async def test_snapshot_on_needs_an_unpacked_image_then_answers_mounts(env: Env) -> None:
    target = await env.add("example.local/unpack/app:1", [BASE, APP])
    chain = chain_of([BASE, APP])
    content = env.state.content
    with pytest.raises(NotUnpacked):
        snapshot_on(content, env.sn, target, "rw")
    with pytest.raises(NotFound):  # NotUnpacked is a NotFound, for callers that only know those
        snapshot_on(content, env.sn, target, "ro", readonly=True)
    assert env.names() == []

    await env.unpack(target)
    labels = {"ckfs.io/image": "example.local/unpack/app:1"}
    rw = snapshot_on(content, env.sn, target, "rw", labels=labels)
    ro = snapshot_on(content, env.sn, target, "ro", readonly=True)
    assert env.sn.stat("rw").kind is Kind.ACTIVE and env.sn.stat("ro").kind is Kind.VIEW
    assert env.sn.stat("rw").parent == env.sn.stat("ro").parent == chain[-1]
    assert dict(env.sn.stat("rw").labels) == labels
    assert files_in(rw) == files_in(ro) == {**BASE, **APP}

    if isinstance(env.sn, OverlaySnapshotter):
        lowers = "lowerdir=" + ":".join(str(env.sn.upper_dir(c)) for c in reversed(chain))
        assert [m.type for m in rw] == [m.type for m in ro] == ["overlay"]
        assert lowers in rw[0].options and lowers in ro[0].options
        assert f"upperdir={env.sn.upper_dir('rw')}" in rw[0].options
        assert not any(o.startswith(("upperdir=", "workdir=")) for o in ro[0].options)
    else:
        assert [(m.type, m.options) for m in rw] == [("bind", ("rw", "rbind"))]
        assert [(m.type, m.options) for m in ro] == [("bind", ("ro", "rbind"))]
        assert rw[0].source != ro[0].source  # a writable copy, and the committed top itself

    with pytest.raises(AlreadyExists):
        snapshot_on(content, env.sn, target, "rw")


async def test_single_layer_view_is_a_read_only_bind(env: Env) -> None:
    target = await env.add("example.local/unpack/base:1", [BASE])
    await env.unpack(target)
    (m,) = snapshot_on(env.state.content, env.sn, target, "ro", readonly=True)
    assert (m.type, m.options) == ("bind", ("ro", "rbind"))
    assert files_in([m]) == BASE


async def test_unpack_labels_the_config_with_its_top_snapshot(env: Env) -> None:
    layout = Layout(env.tmp / "labelled")
    layout.image([BASE, APP])
    target = await env.import_layout(layout, "example.local/unpack/app:1")
    config = Digest.parse(layout.manifest()["config"]["digest"])
    label = f"{GC_REF_SNAPSHOT}.{env.name}"
    assert label not in env.state.content.info(config).labels
    await env.unpack(target)
    assert env.state.content.info(config).labels[label] == chain_of([BASE, APP])[-1]


async def test_gc_follows_images_and_mounts(env: Env) -> None:
    name = "example.local/unpack/app:1"
    target = await env.add(name, [BASE, APP])
    chain = chain_of([BASE, APP])
    await env.unpack(target)
    blobs = sorted(str(i.digest) for i in env.state.content.walk())
    assert len(blobs) == 4  # manifest, config, two layers

    # The image keeps its blobs and, through the config's label, its snapshots.
    report = env.collect()
    assert (report.blobs, report.snapshots, report.directories) == ([], {}, [])
    # A leftover of an interrupted unpack is scratch, not a root.
    env.sn.prepare(f"{EXTRACT_PREFIX}1-dead {chain[1]}", chain[0])
    assert env.collect().snapshots == {env.name: [f"{EXTRACT_PREFIX}1-dead {chain[1]}"]}
    assert env.names() == sorted(chain)

    # A mount keeps the snapshots it stands on after its image is gone;
    # blobs are reachable from images only.
    snapshot_on(env.state.content, env.sn, target, "mount:/mnt/x")
    env.state.images.delete(name)
    report = env.collect()
    assert sorted(str(d) for d in report.blobs) == blobs and report.snapshots == {}
    assert env.names() == sorted([*chain, "mount:/mnt/x"])
    assert len(env.dirs()) == 3

    env.sn.remove("mount:/mnt/x")
    report = env.collect()
    assert sorted(report.snapshots[env.name]) == sorted(chain)
    assert env.names() == [] and env.dirs() == []
    assert list(env.state.content.walk()) == []


async def test_gc_keeps_everything_while_the_image_and_a_mount_exist(env: Env) -> None:
    target = await env.add("example.local/unpack/app:1", [BASE, APP])
    await env.unpack(target)
    snapshot_on(env.state.content, env.sn, target, "mount:/mnt/x")
    snapshot_on(env.state.content, env.sn, target, "view:/mnt/y", readonly=True)
    before = (env.names(), env.dirs(), sorted(str(i.digest) for i in env.state.content.walk()))
    report = env.collect()
    assert (report.blobs, report.snapshots, report.directories) == ([], {}, [])
    after = (env.names(), env.dirs(), sorted(str(i.digest) for i in env.state.content.walk()))
    assert after == before


def commit_layer(sn: Snapshotter, name: str, parent: str = "", **labels: str) -> None:
    """Commit an empty snapshot *name* on *parent*, as an unpack would."""
    sn.prepare(f"{EXTRACT_PREFIX}{name}", parent)
    sn.commit(name, f"{EXTRACT_PREFIX}{name}", labels=labels or None)


async def test_gc_keeps_what_other_owners_keep(env: Env) -> None:
    """gc.root, gc.ref.* labels from kept records, and containerd's own
    snapshots (``<namespace>/<n>/<key>``) survive; ckfs's unreferenced layers go."""
    target = await env.add("example.local/unpack/app:1", [BASE, APP])
    chain = chain_of([BASE, APP])
    await env.unpack(target)
    env.state.images.delete("example.local/unpack/app:1")
    ref = f"{GC_REF_SNAPSHOT}.{env.name}"
    pinned, held, via_blob = (str(sha256(n)) for n in (b"pinned", b"held", b"via-blob"))
    commit_layer(env.sn, pinned, **{GC_ROOT: "2026-01-01T00:00:00Z"})
    commit_layer(env.sn, held)
    commit_layer(env.sn, via_blob)
    # A blob kept only by a kept snapshot's label, keeping a snapshot by its own.
    put_blob(env.state, b"note")
    note = env.state.content.info(Digest.parse(sha256(b"note")))
    env.state.content.update(replace(note, labels={ref: via_blob}))
    env.sn.prepare(
        "container-1", held, labels={f"{ref}/extra": held, GC_REF_CONTENT: str(note.digest)}
    )
    # containerd's, as its metadata layer names them in the backend.
    foreign = ["default/3/sha256:" + "a" * 64, "k8s.io/42/sha256:" + "b" * 64]
    commit_layer(env.sn, foreign[0])
    commit_layer(env.sn, foreign[1], foreign[0])
    env.sn.prepare(f"default/7/{EXTRACT_PREFIX}9 sha256:" + "c" * 64)
    # A label on a record that goes keeps nothing.
    env.sn.prepare(f"{EXTRACT_PREFIX}1-dead", chain[0], labels={ref: chain[1]})

    before = env.names()
    report = env.collect()
    assert report.errors == []
    assert sorted(report.snapshots[env.name]) == sorted([*chain, f"{EXTRACT_PREFIX}1-dead"])
    assert [str(b) for b in report.blobs if str(b) == str(note.digest)] == []
    left = sorted(set(before) - set(report.snapshots[env.name]))
    assert env.names() == left
    assert {pinned, held, via_blob, *foreign} <= set(left)
    # Once the container and the pin go, so do the layers they kept.
    env.sn.remove("container-1")
    env.sn.update(replace(env.sn.stat(pinned), labels={}))
    report = env.collect()
    assert sorted(report.snapshots[env.name]) == sorted([pinned, held, via_blob])
    assert [str(b) for b in report.blobs] == [str(note.digest)]
    assert len(env.names()) == 3  # containerd's three


# -- images deeper than the snapshotter stacks ---------------------------------------

DEEP = "registry.test/team/deep:1"


def deep_layout(tmp: Path, layers: int) -> Layout:
    """An image of *layers* layers of one empty file each: cheap to write."""
    layout = Layout(tmp / f"deep-{layers}")
    layout.image([{f"f{i}": b""} for i in range(layers)])
    return layout


def put_blob(state: State, data: bytes) -> None:
    digest = Digest.parse(sha256(data))
    with state.content.writer(f"test-{digest}", total=len(data), expected=digest) as w:
        w.write(data)
        w.commit(len(data), digest)


def register_without_layers(state: State, layout: Layout, name: str) -> Descriptor:
    """Put *layout*'s manifest and config in the store and name the image; no layer."""
    entry = layout.manifests[0]
    put_blob(state, layout.blob_path(entry["digest"]).read_bytes())
    put_blob(state, layout.blob_path(layout.manifest()["config"]["digest"]).read_bytes())
    target = Descriptor.from_json(entry).replace(annotations={})
    state.images.put(Image.new(name, target))
    return target


@dataclass
class Deep:
    """A fresh state root, its overlay snapshotter, its limit and an image one layer deeper."""

    state: State
    overlay: Snapshotter
    limit: int
    layout: Layout


@pytest.fixture
def deep(tmp_path: Path) -> Iterator[Deep]:
    state = State(tmp_path / "root")
    overlay = state.snapshotter("overlayfs")
    limit = max_layers(overlay)
    assert limit is not None
    yield Deep(state, overlay, limit, deep_layout(tmp_path, limit + 1))
    state.close()


async def test_image_deeper_than_overlay_stacks_is_refused_before_any_layer(deep: Deep) -> None:
    state, overlay, limit = deep.state, deep.overlay, deep.limit
    # Only the manifest and config are present: a refusal that looked at a
    # layer would fail on its absence (NotFound) instead.
    target = register_without_layers(state, deep.layout, DEEP)
    started = time.monotonic()
    words = f"has {limit + 1} layers; the overlayfs snapshotter stacks at most {limit}"
    with pytest.raises(FailedPrecondition, match=words):
        await unpack(
            state.content, overlay, target, snapshotter_name="overlayfs", lock_dir=state.lock_dir
        )
    with pytest.raises(FailedPrecondition, match=words):
        snapshot_on(state.content, overlay, target, "rootfs")
    assert time.monotonic() - started < 10
    assert list(overlay.walk()) == []
    # Native copies each parent whole and stacks nothing: it goes on to want layers.
    native = state.snapshotter("native")
    assert max_layers(native) is None
    with pytest.raises(NotFound, match="not in the content store"):
        await unpack(
            state.content, native, target, snapshotter_name="native", lock_dir=state.lock_dir
        )


@pytest.mark.parametrize("width", [3, 4, 6, 8])
def test_overlay_max_layers_is_what_one_page_of_mount_options_holds(
    tmp_path: Path, width: int
) -> None:
    state = State(tmp_path / "root")
    sn = state.snapshotter("overlayfs")
    assert isinstance(sn, OverlaySnapshotter)
    fits = sn._fit_in_page(width)

    def data_length(layers: int) -> int:
        """The options ckfs.mount passes for a prepare on *layers* layers, in bytes."""
        ids = [10 ** (width - 1) + i for i in range(layers + 1)]
        [m] = sn._mounts(Snapshot(ids[0], Kind.ACTIVE, tuple(ids[1:])))
        compacted = _compact_lowerdir(m.options)
        assert compacted is not None
        return len(os.fsencode(",".join(compacted[1])))

    assert data_length(fits) < PAGE_SIZE <= data_length(fits + 1)
    state.close()


def test_overlay_max_layers_narrows_as_snapshot_ids_grow(tmp_path: Path) -> None:
    state = State(tmp_path / "root")
    sn = state.snapshotter("overlayfs")
    assert isinstance(sn, OverlaySnapshotter)
    assert sn.max_layers == min(500, sn._fit_in_page(3))
    sn.prepare("first")
    with state.db.transaction() as tx:
        tx.execute("UPDATE sqlite_sequence SET seq = 99999 WHERE name = 'snapshots'")
    # Ids up to 100,499 are six digits wide.
    assert sn.max_layers == sn._fit_in_page(6) < 500
    state.close()


async def test_pull_and_unpack_refuses_a_deep_image_before_fetching_a_layer(deep: Deep) -> None:
    state, sn, limit = deep.state, deep.overlay, deep.limit
    registry = LayoutRegistry(deep.layout)
    started = time.monotonic()
    with pytest.raises(FailedPrecondition, match=f"stacks at most {limit}"):
        await pull_and_unpack(
            reference.parse(DEEP),
            state.content,
            state.images,
            sn,
            PullOptions(),
            snapshotter_name="overlayfs",
            lock_dir=state.lock_dir,
            transport=httpx.MockTransport(registry.handle),
        )
    assert time.monotonic() - started < 10
    assert registry.paths and all("/manifests/" in p for p in registry.paths)
    assert state.images.list() == [] and list(sn.walk()) == []


class LayoutRegistry:
    """A registry serving one `tests.layouts.Layout` at `DEEP`, recording request paths."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.paths: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.paths.append(path)
        entry = self.layout.manifests[0]
        kind, _, name = path.removeprefix("/v2/team/deep/").partition("/")
        digest = entry["digest"] if name == "1" else name
        try:
            data = self.layout.blob_path(digest).read_bytes()
        except (OSError, IndexError):
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
        headers = {"Docker-Content-Digest": digest, "Content-Length": str(len(data))}
        if kind == "manifests":
            headers["Content-Type"] = entry["mediaType"]
        body = b"" if request.method == "HEAD" else data
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(body))


async def test_two_unpacks_of_one_image_at_once_apply_each_layer_once(env: Env) -> None:
    """The per-chain-ID lock and the check under it: the second waits, then finds it done."""
    import trio

    layers = [BASE, APP, OTHER]
    target = await env.add("example.local/unpack/app:1", layers)
    reports: list[UnpackReport] = []

    async def one() -> None:
        reports.append(await env.unpack(target))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
    applied = [str(c) for r in reports for c in r.applied]
    assert sorted(applied) == sorted(chain_of(layers))
    assert env.names() == sorted(chain_of(layers)) and extracts(env) == []


# -- containerd's remote-snapshot contract --------------------------------------------


class Remote:
    """A snapshotter that provides some layers itself, as a lazy one under containerd.

    Wraps a real one. A prepare labelled `SNAPSHOT_REF` with a chain ID in
    `provides` commits that chain ID itself (empty: no tar is read) and
    answers AlreadyExists; with `refuses`, it answers AlreadyExists and
    commits nothing. Every prepare's labels are recorded.
    """

    def __init__(self, sn: Snapshotter, provides: set[str], refuses: bool = False) -> None:
        self.sn, self.provides, self.refuses = sn, provides, refuses
        self.prepared: list[dict[str, str]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.sn, name)

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        self.prepared.append(dict(labels or {}))
        ref = (labels or {}).get(SNAPSHOT_REF, "")
        if self.refuses:
            raise AlreadyExists(f"snapshot {key!r} already exists")
        if ref in self.provides:
            self.sn.prepare(f"remote {ref}", parent)
            self.sn.commit(ref, f"remote {ref}")
            raise AlreadyExists(f"target snapshot {ref!r} already exists")
        return self.sn.prepare(key, parent, labels)


async def remote_unpack(env: Env, remote: Remote, target: Descriptor) -> UnpackReport:
    return await unpack(
        env.state.content,
        cast(Snapshotter, remote),
        target,
        snapshotter_name=env.name,
        lock_dir=env.state.lock_dir,
    )


async def test_extract_snapshots_carry_the_chain_id_they_will_commit(env: Env) -> None:
    target = await env.add("example.local/unpack/app:1", [BASE, APP])
    chain = chain_of([BASE, APP])
    remote = Remote(env.sn, provides=set())
    report = await remote_unpack(env, remote, target)
    assert remote.prepared == [{SNAPSHOT_REF: c} for c in chain]
    assert [str(c) for c in report.applied] == chain and report.present == 0


async def test_layers_the_snapshotter_provides_are_present_and_their_blobs_unread(
    env: Env,
) -> None:
    layout = Layout(env.tmp / "remote")
    layout.image([BASE, APP, OTHER])
    target = await env.import_layout(layout, "example.local/unpack/app:1")
    chain = chain_of([BASE, APP, OTHER])
    # The two lower layers' blobs are gone: reading either would be NotFound.
    for layer in layout.manifest()["layers"][:2]:
        env.state.content.delete(Digest.parse(layer["digest"]))
    remote = Remote(env.sn, provides=set(chain[:2]))

    report = await remote_unpack(env, remote, target)
    assert report.present == 2 and [str(c) for c in report.applied] == chain[2:]
    assert env.names() == sorted(chain) and extracts(env) == []
    assert [env.sn.stat(c).parent for c in chain] == ["", chain[0], chain[1]]
    assert files_in(snapshot_on(env.state.content, env.sn, target, "v", readonly=True)) == OTHER

    again = await remote_unpack(env, remote, target)
    assert again.applied == [] and again.present == 3
    assert len(remote.prepared) == 3  # the second unpack prepared nothing


async def test_already_exists_without_a_committed_chain_id_is_an_error(env: Env) -> None:
    target = await env.add("example.local/unpack/app:1", [BASE])
    (chain,) = chain_of([BASE])
    remote = Remote(env.sn, provides=set(), refuses=True)
    with pytest.raises(AlreadyExists, match=f"but snapshot {chain} does not exist"):
        await remote_unpack(env, remote, target)
    assert env.names() == []


class OffLoop:
    """Wraps a store or snapshotter; fails any use of it from the trio thread.

    SQLite calls block, and a daemon serves FUSE on that thread.
    """

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        value = getattr(self.inner, name)
        if not callable(value):
            assert threading.current_thread() is not threading.main_thread(), name
            return value

        def off_loop(*args: object, **kwargs: object) -> object:
            assert threading.current_thread() is not threading.main_thread(), name
            return value(*args, **kwargs)

        return off_loop


async def test_unpack_reaches_the_stores_only_from_worker_threads(env: Env) -> None:
    target = await env.add("example.local/unpack/app:1", [BASE, APP])
    for _ in range(2):  # applying, then finding everything present
        await unpack(
            cast(ContentStore, OffLoop(env.state.content)),
            cast(Snapshotter, OffLoop(env.sn)),
            target,
            snapshotter_name=env.name,
            lock_dir=env.state.lock_dir,
        )
    assert env.names() == sorted(chain_of([BASE, APP]))


# -- ckfs.provide: the one path every face takes -------------------------------------


async def test_ensure_rootfs_unpacks_what_is_missing_then_answers_from_snapshots(env: Env) -> None:
    """Both faces: the async one (ckfsd) and the sync one (the CLI, here in a worker thread)."""
    name = "example.local/provide/app:1"
    await env.add(name, [BASE, APP])
    ref, offline = reference.parse(name), PullOptions(offline=True)

    rw = await ensure_rootfs_async(env.state, ref, "rw", snapshotter=env.name, options=offline)
    assert env.names() == sorted([*chain_of([BASE, APP]), "rw"])
    assert dict(env.sn.stat("rw").labels) == {IMAGE_LABEL: name}
    ro = await trio.to_thread.run_sync(
        lambda: ensure_rootfs(env.state, ref, "ro", snapshotter=env.name, readonly=True)
    )
    assert env.sn.stat("ro").kind is Kind.VIEW
    assert files_in(rw) == files_in(ro) == {**BASE, **APP}
    with pytest.raises(AlreadyExists):
        await ensure_rootfs_async(env.state, ref, "rw", snapshotter=env.name, options=offline)

    # The sync face unpacks too (its own event loop, in this thread).
    other = "example.local/provide/other:1"
    await env.add(other, [BASE, OTHER])
    mounts = await trio.to_thread.run_sync(
        lambda: ensure_rootfs(env.state, reference.parse(other), "o", snapshotter=env.name)
    )
    assert files_in(mounts) == {**BASE, **OTHER}


async def test_pull_image_of_a_present_image_reports_every_blob_and_asks_nobody(env: Env) -> None:
    name = "example.local/provide/app:1"
    target = await env.add(name, [BASE, APP])
    ref, offline = reference.parse(name), PullOptions(offline=True)
    events: list[dict[str, object]] = []

    local = await trio.to_thread.run_sync(
        lambda: pull_image(
            env.state, ref, options=offline, on_event=lambda p: events.append(p.to_json())
        )
    )
    on_loop = await pull_image_async(env.state, ref, options=offline)
    for report in (local, on_loop):
        assert report.target == target and not report.network
        assert report.to_json()["fetched_blobs"] == 0
    assert {e["state"] for e in events} == {"exists"} and len(events) == 4  # manifest, config, 2


def test_pull_options_never_show_the_credentials() -> None:
    assert "secret" not in repr(PullOptions(user="me:secret"))


async def test_pull_and_unpack_reach_the_stores_only_from_worker_threads(env: Env) -> None:
    """End to end, as ckfsd runs it on its loop: fetch (exists, status, free space,
    GC labels, writers) and unpack, then a re-pull that finds everything present."""
    layout = Layout(env.tmp / "pulled")
    layout.image([BASE, APP])
    registry = LayoutRegistry(layout)
    content = cast(ContentStore, OffLoop(env.state.content))
    images = cast(ImageStore, OffLoop(env.state.images))
    for _ in range(2):
        report = await pull_and_unpack(
            reference.parse(DEEP),
            content,
            images,
            cast(Snapshotter, OffLoop(env.sn)),
            PullOptions(),
            snapshotter_name=env.name,
            lock_dir=env.state.lock_dir,
            transport=httpx.MockTransport(registry.handle),
        )
        assert report.image is not None
    assert any("/blobs/" in p for p in registry.paths)
    assert env.names() == sorted(chain_of([BASE, APP]))
