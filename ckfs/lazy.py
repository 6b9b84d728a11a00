"""Images attached lazily: layer indexes instead of unpacked layers.

The lazy counterpart of `ckfs.unpack`. An image is made ready for the
``fuse`` snapshotter in three steps:

1. **Pull lazily** (`pull_lazy`): manifests, config and every layer that
   cannot be read by range are fetched as a normal pull would; eStargz
   layers (those carrying a TOC digest annotation) and uncompressed tars
   are not: their bytes arrive as files are read.
2. **Index** (`index_layers`): each layer gets an index (`ckfs.layerindex`),
   best source first: an eStargz TOC by two range reads, an uncompressed
   tar's headers in one streamed pass, a gzip seek index built in one pass
   over the local blob.
   A layer nothing can index (a zstd layer, a damaged or hostile TOC) is
   left for the eager path, and the caller is told (never silently).
3. **Attach** (`attach_image`): missing chain IDs are committed as snapshots
   whose lower directory is the layer's directory in the FUSE server's
   tree, in order, under the same per-chain-ID locks as an unpack; layers
   without an index are fetched and applied eagerly into the same chain.

Indexes are shared by every image holding a layer and kept under
``<root>/layers``; an index already there is reused without any network.
Each index records where its bytes can be fetched (``ref`` in its meta),
which the serving process reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence, Set
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import trio

from ckfs import mediatypes as mt
from ckfs.digest import Digest
from ckfs.errors import CkfsError, NotFound
from ckfs.labels import SNAPSHOT_REF
from ckfs.layerindex.sources import EAGER as EAGER
from ckfs.layerindex.sources import ESTARGZ as ESTARGZ
from ckfs.layerindex.sources import GZIP as GZIP
from ckfs.layerindex.sources import TAR as TAR
from ckfs.layerindex.sources import source_of as source_of
from ckfs.options import DEFAULTS, PullOptions

if TYPE_CHECKING:
    from ckfs.content import ContentStore
    from ckfs.descriptor import Descriptor, Platform
    from ckfs.layerindex.model import LayerIndex
    from ckfs.layerindex.store import IndexStore
    from ckfs.progress import BlobProgress
    from ckfs.pull import PullReport
    from ckfs.reference import Reference
    from ckfs.remotes.registry import RegistryClient
    from ckfs.remotes.walk import ChildrenFunc
    from ckfs.snapshots import Info, Snapshotter
    from ckfs.state import State

__all__ = [
    "ESTARGZ",
    "GZIP",
    "TAR",
    "AttachReport",
    "Attacher",
    "LayerPlan",
    "OnDemandClient",
    "attach_image",
    "build_index",
    "chain_layer",
    "drop_chains",
    "index_layers",
    "lazy_children",
    "pull_lazy",
    "record_chains",
    "source_of",
]

log = logging.getLogger(__name__)

#: Sources read from the registry as files are read: a lazy pull skips their blobs.
_BY_RANGE = frozenset({ESTARGZ, TAR})

#: Under ``<root>/layers``: one file per chain ID of an indexed image, naming
#: the layer that completes it (`record_chains`). containerd's unpacker
#: prepares a layer naming only its chain ID; this is how the fuse
#: snapshotter tells which served layer that is.
CHAINS_DIR = "chains"

#: Layers indexed at once: each holds a registry connection (eStargz) or a
#: core inflating (gzip); more than the cores only queue.
INDEX_CONCURRENCY = 4


@runtime_checkable
class Attacher(Protocol):
    """A snapshotter that commits layers served from elsewhere (``fuse``)."""

    def serve(self) -> None:
        """Make sure the layer directories are served (start the FUSE server)."""

    def attach(
        self, name: str, layer: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> Info:
        """Commit *name* on *parent* as the served *layer*; `AlreadyExists` if taken."""


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one layer of an image is provided."""

    #: The layer's descriptor (its compressed blob).
    desc: Descriptor
    #: ``estargz``, ``gzip-index``, ``tar``, or ``eager`` (not indexable).
    source: str
    #: Why the layer is eager, for the user; empty otherwise.
    why: str = ""


@dataclasses.dataclass
class AttachReport:
    """What `attach_image` did."""

    chain_id: Digest
    #: Every layer of the image, bottom first, with its source.
    layers: list[LayerPlan] = dataclasses.field(default_factory=list)
    #: Chain IDs attached (lazy) and applied (eager fallback) by this call.
    attached: list[Digest] = dataclasses.field(default_factory=list)
    applied: list[Digest] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def lazy_children(
    platform: Platform | None = None,
    *,
    all_platforms: bool = False,
    max_layers: int | None = None,
    snapshotter: str = "fuse",
) -> ChildrenFunc:
    """`ckfs.remotes.walk.platform_children` without the layers read by range.

    eStargz and uncompressed tar layers are indexed from the registry
    (`index_layers`) and their bytes fetched as files are read. An image
    with more layers than *max_layers* is refused at its manifest, before
    its config or any layer is fetched (`ckfs.rootfs.check_depth_within`).
    """
    from ckfs.remotes.walk import platform_children
    from ckfs.rootfs import check_depth_within

    follow = platform_children(platform, all_platforms=all_platforms)

    def children(desc: Descriptor, data: bytes) -> Sequence[Descriptor]:
        found = follow(desc, data)
        if not mt.is_manifest(desc.media_type):
            return found
        check_depth_within(max_layers, snapshotter, desc, len(found) - 1)
        return [d for d in found if not (mt.is_layer(d.media_type) and source_of(d) in _BY_RANGE)]

    return children


async def pull_lazy(
    state: State,
    ref: Reference,
    options: PullOptions = DEFAULTS,
    *,
    register: bool = True,
    on_event: Callable[[BlobProgress], None] | None = None,
    max_layers: int | None = None,
) -> tuple[PullReport, list[LayerPlan]]:
    """Pull *ref* without the bytes of its layers read by range, and index every layer.

    ``ckfs pull --lazy``: afterwards the image mounts (and containerd
    attaches its layers) with no layer download. With *max_layers* (the
    snapshotter's stacking limit), a deeper image is refused at its
    manifest. Indexing starts once the config is here, each gzip layer's
    as soon as its blob is, while later blobs still arrive (as
    `ckfs.unpack.pull_and_unpack` applies layers).

    Returns:
        The pull's report and each layer's plan, bottom first.

    Raises:
        As `ckfs.pull.pull`; a layer that cannot be indexed is not an error
        (its plan says ``eager``, and its blob was pulled).
    """
    from ckfs.errors import unwrap_groups
    from ckfs.provide import with_hosts_dirs
    from ckfs.pull import pull
    from ckfs.unpack import Arrivals

    arrivals = Arrivals(state.content, on_event)
    pulled = trio.Event()
    waiting: set[trio.CancelScope] = set()
    reports: list[PullReport] = []
    plans: list[LayerPlan] = []

    async def arrived(desc: Descriptor) -> None:
        """Until *desc*'s blob is here, or the pull is over without it."""
        with trio.CancelScope() as scope:
            waiting.add(scope)
            try:
                if not pulled.is_set():
                    await arrivals.wait(desc)
            finally:
                waiting.discard(scope)
        if not await trio.to_thread.run_sync(state.content.exists, desc.digest):
            # Failed or skipped: a failed pull cancels this wait and its
            # error is the one raised; after a whole pull, NotFound.
            await pulled.wait()

    async def do_pull() -> None:
        reports.append(
            await pull(
                ref,
                state.content,
                state.images,
                with_hosts_dirs(state, options),
                register=register,
                children=lazy_children(
                    options.platform, all_platforms=options.all_platforms, max_layers=max_layers
                ),
                on_event=arrivals.event,
            )
        )
        pulled.set()
        arrivals.config_present.set()  # a pull of present blobs may report none
        for scope in waiting:
            scope.cancel()

    async def do_index() -> None:
        await arrivals.config_present.wait()
        target = reports[0].target if reports else arrivals.target
        assert target is not None
        plans.extend(await index_layers(state, ref, target, options, arrival=arrived))

    with unwrap_groups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(do_pull)
            nursery.start_soon(do_index)
    return reports[0], plans


async def index_layers(
    state: State,
    ref: Reference,
    target: Descriptor,
    options: PullOptions = DEFAULTS,
    *,
    arrival: Callable[[Descriptor], Awaitable[None]] | None = None,
) -> list[LayerPlan]:
    """An index for each layer of *target* that can have one; each layer's plan.

    Present indexes are reused. eStargz layers are read by range from
    *ref*'s registry, uncompressed tars streamed from it unless their blob
    is here; gzip layers are indexed from their local blobs (a lazy pull
    fetched them; with *arrival*, awaited first: a pull still running
    brings them). Runs up to `INDEX_CONCURRENCY` layers at once.

    Raises:
        NotFound: the manifest, config or a gzip layer's blob is missing.
        Unavailable: the registry cannot be reached for an eStargz or tar layer.
    """
    from ckfs.rootfs import image_chain

    manifest, config, chain = await trio.to_thread.run_sync(
        image_chain, state.content, target, options.platform
    )
    plans: list[LayerPlan | None] = [None] * len(manifest.layers)
    limiter = trio.CapacityLimiter(INDEX_CONCURRENCY)
    async with OnDemandClient(state, ref, options) as remote:

        async def one(i: int, desc: Descriptor) -> None:
            async with limiter:
                plans[i] = await _index_one(state, desc, config.diff_ids[i], remote, arrival)

        async with trio.open_nursery() as nursery:
            for i, desc in enumerate(manifest.layers):
                nursery.start_soon(one, i, desc)
    done = [p for p in plans if p]
    for desc in _eager_under_lazy(done):  # `_through_links` reads their paths
        if arrival is not None:
            await arrival(desc)
        await _fetch_blob(state, ref, desc, options)
    done = await trio.to_thread.run_sync(_through_links, state.root, done, state.content)
    await trio.to_thread.run_sync(record_chains, state.root, chain, done)
    return done


def _eager_under_lazy(plans: Sequence[LayerPlan]) -> list[Descriptor]:
    """The eager layers of *plans* below a lazy one, bottom first."""
    top = max((i for i, p in enumerate(plans) if p.source != EAGER), default=0)
    return [p.desc for p in plans[:top] if p.source == EAGER]


def _through_links(
    root: Path, plans: list[LayerPlan], content: ContentStore | None = None
) -> list[LayerPlan]:
    """*plans*, with each lazy layer that implies a directory where a lower
    layer has a non-directory turned eager (`ckfs.layerindex.model.through_lower_links`).

    Unpacked, such a layer's files land through the lower symlink (a
    usrmerge ``lib -> usr/lib``); stacked as its own overlay lower, its
    implied directory would hide the link, and the trees would differ.
    Lowers are the indexed layers (one turned eager here too: its entries
    are there all the same) and, with *content*, the eager layers' blobs
    (`_eager_non_dirs`).
    """
    from ckfs.layerindex.model import through_lower_links
    from ckfs.layerindex.store import IndexStore

    store = IndexStore(root)
    opened: dict[int, LayerIndex] = {}
    try:
        for i, plan in enumerate(plans):
            index = store.get(plan.desc.digest) if plan.source != EAGER else None
            if index is not None:
                opened[i] = index
        eager = _eager_non_dirs(content, plans, opened) if content is not None else {}
        for i, index in opened.items():
            lowers = [lower for j, lower in opened.items() if j < i]
            non_dirs = {path for path, j in eager.items() if j < i}
            if (lowers or non_dirs) and (path := through_lower_links(index, lowers, non_dirs)):
                why = f"layer {plans[i].desc.digest}: {path!r} goes through a lower layer's link"
                plans[i] = LayerPlan(plans[i].desc, EAGER, why)
    finally:
        for index in opened.values():
            index.close()
    return plans


def _eager_non_dirs(
    content: ContentStore, plans: Sequence[LayerPlan], indexed: Mapping[int, LayerIndex]
) -> dict[str, int]:
    """Paths eager layers of *plans* hold as non-directories where an indexed
    layer above implies a directory (`ckfs.layerindex.model.implied_prefixes`):
    path -> the lowest such eager layer.

    Read from each blob's tar headers by the applier's rules
    (`ckfs.archive.entry.from_tarinfo`), keeping only the paths asked for,
    so memory is bounded by the indexed layers' implied directories, not
    by the blob. A deletion is no obstacle (conservative, as for indexed
    lowers). A blob missing or damaged is passed over: its unpack fails
    on its own.
    """
    from ckfs.layerindex.model import implied_prefixes

    eager = [(i, p.desc) for i, p in enumerate(plans) if p.source == EAGER and i not in indexed]
    wanted = {
        path
        for i, index in indexed.items()
        if any(j < i for j, _ in eager)
        for path in implied_prefixes(index)
    }
    found: dict[str, int] = {}
    for i, desc in eager if wanted else []:
        try:
            for path in _blob_non_dirs(content, desc, wanted):
                found.setdefault(path, i)
        except (CkfsError, OSError) as e:
            log.debug("layer %s: not checked against the lazy layers above: %s", desc.digest, e)
    return found


def _blob_non_dirs(content: ContentStore, desc: Descriptor, wanted: Set[str]) -> set[str]:
    """Which of *wanted* the layer blob *desc* holds as a non-directory (deletions aside).

    Raises:
        InvalidArgument: the blob is not a layer or is damaged.
        OSError: it cannot be read.
    """
    from ckfs.archive.compression import open_layer
    from ckfs.archive.entry import BadEntry, Kind, SkipEntry, from_tarinfo
    from ckfs.archive.tarstream import TarStream

    what, found = f"layer {desc.digest}", set()
    with open(content.path(desc.digest), "rb") as raw, open_layer(raw, desc.media_type) as tar:
        for member in TarStream(tar, what=what).members():
            try:
                entry = from_tarinfo(member, what=what)
            except (BadEntry, SkipEntry):
                continue
            if entry.path in wanted and entry.kind not in (Kind.DIR, Kind.WHITEOUT, Kind.OPAQUE):
                found.add(entry.path)
    return found


def record_chains(root: Path, chain: Sequence[Digest], plans: Sequence[LayerPlan]) -> None:
    """Remember, for each chain ID of *chain* served lazily, its layer and parent chain.

    containerd's unpacker (CRI's pull, nerdctl) prepares each layer with
    only ``containerd.io/snapshot.ref=<chainID>``; `chain_layer` answers
    which indexed layer that is, so the fuse snapshotter attaches it
    instead of letting containerd download and unpack it. A chain ID names
    its whole chain of diff IDs, so the record holds for any image that has
    it; eager layers get none (nothing serves them), and lose one an
    earlier decision left (an index of an older format, other limits).
    """
    from ckfs.layerindex import dirname

    where = root / "layers" / CHAINS_DIR
    where.mkdir(parents=True, exist_ok=True)
    for i, (chain_id, plan) in enumerate(zip(chain, plans, strict=True)):
        path = where / dirname(chain_id)
        if plan.source == EAGER:
            path.unlink(missing_ok=True)
            continue
        record = {"layer": str(plan.desc.digest), "parent": str(chain[i - 1]) if i else ""}
        body = json.dumps(record).encode()
        with contextlib.suppress(OSError):
            if path.read_bytes() == body:
                continue
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=where)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def chain_layer(root: Path, chain_id: str) -> tuple[Digest, str] | None:
    """The layer completing *chain_id* and its parent chain ID, if `record_chains` knows it."""
    from ckfs.errors import InvalidArgument
    from ckfs.layerindex import dirname

    try:
        path = root / "layers" / CHAINS_DIR / dirname(Digest.parse(chain_id))
    except InvalidArgument:
        return None
    return _chain_record(path)


def drop_chains(root: Path, indexed: Set[Digest]) -> int:
    """Remove every chain record naming a layer outside *indexed*; how many went.

    ``ckfs gc`` calls it with the layers whose index it kept: a record
    outliving its layer's index names a layer nothing serves any more. A
    file that does not read as a record goes too; temporaries (dot names)
    are `record_chains`'s own.

    Raises:
        OSError: the records' directory cannot be listed or a record removed.
    """
    where = root / "layers" / CHAINS_DIR
    if not where.is_dir():
        return 0
    dropped = 0
    for path in sorted(where.iterdir()):
        if path.name.startswith("."):
            continue
        record = _chain_record(path)
        if record is None or record[0] not in indexed:
            path.unlink(missing_ok=True)
            dropped += 1
    return dropped


def _chain_record(path: Path) -> tuple[Digest, str] | None:
    """The layer and parent chain ID the record *path* names; None if it does not read as one."""
    from ckfs.errors import InvalidArgument
    from ckfs.jsondoc import parse_object

    try:
        record = parse_object(path.read_bytes(), str(path))
        parent = record["parent"]
        if not isinstance(parent, str):
            return None
        return Digest.parse(record["layer"]), parent
    except (OSError, InvalidArgument, KeyError, TypeError):
        return None


async def _index_one(
    state: State,
    desc: Descriptor,
    diff_id: Digest,
    remote: OnDemandClient,
    arrival: Callable[[Descriptor], Awaitable[None]] | None = None,
) -> LayerPlan:
    """Index *desc* unless it is already; its plan. A refused layer's plan is eager.

    A gzip layer's *arrival* is awaited first (`index_layers`).
    """
    from ckfs.layerindex.model import BadLayer
    from ckfs.layerindex.store import IndexStore

    store = IndexStore(state.root)
    source = source_of(desc)
    if source == EAGER:
        return LayerPlan(desc, EAGER, f"{desc.media_type} layers cannot be read lazily")
    existing = await trio.to_thread.run_sync(store.get, desc.digest)
    if existing is not None:
        plan = LayerPlan(desc, existing.source)
        existing.close()
        return plan
    meta = {"ref": str(remote.ref)}  # the media type: IndexWriter.for_layer
    if source == GZIP and arrival is not None:
        await arrival(desc)
    try:
        index = await build_index(state, store, source, desc, diff_id, meta, remote)
    except BadLayer as e:
        log.info("%s; unpacking it eagerly", e)  # the CLI says it (every mount, either face)
        return LayerPlan(desc, EAGER, str(e))
    index.close()
    return LayerPlan(desc, source)


async def build_index(
    state: State,
    store: IndexStore,
    source: str,
    desc: Descriptor,
    diff_id: Digest,
    meta: Mapping[str, str],
    remote: OnDemandClient,
) -> LayerIndex:
    """Build *desc*'s index from *source* (raises `BadLayer` when it refuses).

    eStargz layers are read by range, uncompressed tars streamed from the
    registry once (their spans' digests recorded for later range reads)
    unless the blob is here already; gzip layers are indexed from their
    local blob, which a lazy pull fetched.
    """
    path = store.path(desc.digest)
    await trio.to_thread.run_sync(lambda: path.parent.mkdir(parents=True, exist_ok=True))
    if source == ESTARGZ:
        from ckfs.layerindex.estargz import index_estargz

        client = await remote.client()

        async def read_range(offset: int, length: int) -> bytes:
            return await client.read_range(remote.ref, desc, offset, length)

        return await index_estargz(read_range, desc, path, meta=meta)
    local = await trio.to_thread.run_sync(_local_blob, state.content, desc)
    if source == TAR:
        from ckfs.layerindex.tarindex import index_tar, index_tar_stream

        if local is not None:
            return await trio.to_thread.run_sync(
                functools.partial(index_tar, local, desc, path, meta=meta)
            )
        client = await remote.client()
        async with client.open_blob(remote.ref, desc) as stream:
            return await index_tar_stream(stream.aiter_chunks(), desc, path, meta=meta)
    from ckfs.layerindex.gzindex import index_gzip

    if local is None:
        raise NotFound(f"layer {desc.digest} is not in the content store; pull it first")
    return await trio.to_thread.run_sync(
        # The content store verified the blob's digest when it committed it.
        functools.partial(index_gzip, local, desc, path, meta=meta, diff_id=diff_id, verified=True)
    )


def _local_blob(content: ContentStore, desc: Descriptor) -> Path | None:
    try:
        return content.path(desc.digest)
    except NotFound:
        return None


class OnDemandClient:
    """A registry client for *ref*, opened on first use only (most layers need none)."""

    def __init__(self, state: State, ref: Reference, options: PullOptions) -> None:
        self.state, self.ref, self.options = state, ref, options
        self._client: RegistryClient | None = None
        self._lock = trio.Lock()

    async def client(self) -> RegistryClient:
        async with self._lock:
            if self._client is None:
                from ckfs.provide import with_hosts_dirs
                from ckfs.pull import client_for

                options = with_hosts_dirs(self.state, self.options)
                self._client = await client_for(self.ref, options).__aenter__()
            return self._client

    async def __aenter__(self) -> OnDemandClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            with trio.CancelScope(shield=True):
                await self._client.aclose()


async def attach_image(
    state: State,
    sn: Snapshotter,
    ref: Reference,
    target: Descriptor,
    *,
    snapshotter_name: str,
    options: PullOptions = DEFAULTS,
    upto: int | None = None,
) -> AttachReport:
    """Make every layer of *target* a committed snapshot of *sn*, lazily where possible.

    Indexes are built first (all layers at once), then chain IDs missing
    from *sn* are attached bottom up; an eager layer's blob is pulled if
    missing and applied in place, stacked with the lazy ones. With *upto*,
    only layers 1..*upto* (``ckfs mount --upto``/``--layer``): an eager
    layer above them is neither fetched nor unpacked for a stack that does
    not show it; a later whole mount attaches the rest.

    Raises:
        FailedPrecondition: *sn* cannot attach, or has too few layers for
            the image, or the FUSE server cannot start.
        InvalidArgument: *upto* is out of range.
        As `index_layers` and `ckfs.unpack.unpack` for eager layers.
    """
    from ckfs.errors import AlreadyExists, FailedPrecondition
    from ckfs.labels import gc_snapshot_label
    from ckfs.rootfs import check_depth, committed, image_chain, layer_in_range
    from ckfs.unpack import (
        label_config,
        layer_lock,
        present_below,
        provided,
        remove_leftovers,
        unpack_layer,
    )

    if not isinstance(sn, Attacher):
        raise FailedPrecondition(f"snapshotter {snapshotter_name!r} cannot attach layers lazily")
    started = time.monotonic()
    manifest, config, chain = await trio.to_thread.run_sync(
        image_chain, state.content, target, options.platform
    )
    await trio.to_thread.run_sync(check_depth, sn, target, len(chain))
    whole = chain
    if upto is not None:
        chain = chain[: layer_in_range(upto, len(chain), str(ref))]
    report = AttachReport(chain_id=chain[-1])
    present = await trio.to_thread.run_sync(present_below, sn, chain)
    report.layers = await index_layers(state, ref, target, options)
    if present < len(chain):
        await trio.to_thread.run_sync(sn.serve)
    for i in range(present, len(chain)):
        plan, parent = report.layers[i], str(chain[i - 1]) if i else ""
        async with layer_lock(state.lock_dir, chain[i]):
            if await trio.to_thread.run_sync(committed, sn, str(chain[i])):
                continue
            await trio.to_thread.run_sync(remove_leftovers, sn, chain[i])
            if plan.source == EAGER:
                await _fetch_blob(state, ref, plan.desc, options)
                await unpack_layer(
                    sn, state.content, plan.desc, config.diff_ids[i], chain[i], parent
                )
                report.applied.append(chain[i])
                continue
            labels = {SNAPSHOT_REF: str(chain[i])}
            try:
                await trio.to_thread.run_sync(
                    sn.attach, str(chain[i]), str(plan.desc.digest), parent, labels
                )
            except AlreadyExists as e:
                await trio.to_thread.run_sync(provided, sn, chain[i], e)
            else:
                report.attached.append(chain[i])
    if len(chain) < len(whole) and await trio.to_thread.run_sync(committed, sn, str(whole[-1])):
        chain = whole  # attached whole before: the label stays on its top
    await trio.to_thread.run_sync(
        label_config,
        state.content,
        manifest.config.digest,
        gc_snapshot_label(snapshotter_name),
        chain,
    )
    report.seconds = time.monotonic() - started
    return report


async def _fetch_blob(state: State, ref: Reference, desc: Descriptor, options: PullOptions) -> None:
    """Bring the one blob *desc* into the content store (an eager layer of a lazy pull)."""
    if await trio.to_thread.run_sync(state.content.exists, desc.digest):
        return
    from ckfs.provide import with_hosts_dirs
    from ckfs.pull import pull
    from ckfs.remotes.walk import platform_children

    follow = platform_children(options.platform, all_platforms=options.all_platforms)
    options = with_hosts_dirs(state, options)

    def only(parent: Descriptor, data: bytes) -> Sequence[Descriptor]:
        found = follow(parent, data)
        if mt.is_manifest(parent.media_type):
            return [d for d in found if d.digest == desc.digest]
        return found

    try:
        await pull(ref, state.content, state.images, options, register=False, children=only)
    except CkfsError as e:
        raise type(e)(f"layer {desc.digest} (not indexable, fetched whole): {e}") from e
