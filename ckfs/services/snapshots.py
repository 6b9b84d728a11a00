"""containerd's Snapshots service over ckfs's snapshotters: the proxy plugin's wire.

containerd configured with ``[proxy_plugins.ckfs] type = "snapshot"`` sends
every call of its metadata layer here, each request naming the proxy in its
``snapshotter`` field (containerd 1.6 sends the plugin's configured name,
``ckfs``); ``ctr --address <ckfsd socket> snapshots --snapshotter overlayfs``
names a ckfs snapshotter itself. A *proxy name* (`PROXY` unless
configured) stands for a ckfs snapshotter; any other name must be one.

Under a proxy name the service keeps the promises containerd's metadata
layer (``metadata/snapshot.go``) relies on, which a snapshotter used by ckfs
alone never needed:

- **Layers ckfs unpacked are found, not unpacked again.** containerd's
  unpacker prepares each layer with ``containerd.io/snapshot.ref=<chainID>``
  (`ckfs.labels.SNAPSHOT_REF`). When a committed snapshot named by that
  chain ID sits on the same parent, Prepare answers AlreadyExists;
  containerd then Lists with ``labels."containerd.io/snapshot.ref"==<chainID>,
  parent==<parent>`` and adopts what it finds. ckfs names its layers by chain
  ID without that label, so under a proxy name a committed snapshot named
  by a digest shows the label, naming itself: ``ckfs pull`` then ``ctr run``
  of the same image unpacks nothing twice. That List is the adoption: each
  ckfs layer it answers with is labelled `ckfs.labels.ADOPTED_BY` once, in
  the store, so that ckfs's gc keeps it for containerd from then on.
- **containerd's gc removes only what containerd made.** containerd's gc
  Lists every snapshot of the backend and removes, children first, each
  one it has no record of, going on past FailedPrecondition. Under a proxy
  name, removing a snapshot whose key containerd did not make
  (`containerd_owned`) is FailedPrecondition: ckfs's own layers and mounts
  survive containerd's gc, and ckfs's gc decides about them.

Filters follow containerd's snapshot storage (what its own snapshotters
answer a proxy's List with): ``parent`` is present even when empty, so
``parent==""`` selects base snapshots, as the adoption above asks.

Malformed input is refused here, before any store sees it (InvalidArgument):
keys and names that are not plain text (`check_key`), and label sets too
large as a whole (`check_labels`), as every service checks them
(`ckfs.services.checks`); single labels are the store's to refuse.
Every store call runs in a worker thread: SQLite and ``du`` block.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from google.protobuf import empty_pb2

from ckfs.api.convert import (
    fieldpaths,
    mounts_to_proto,
    snapshot_info_to_proto,
    usage_to_proto,
)
from ckfs.api.services.snapshots.v1 import snapshots_pb2 as pb
from ckfs.api.types import types_pb2
from ckfs.digest import Digest
from ckfs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from ckfs.filters import Filter, Operator, parse_filters
from ckfs.labels import ADOPTED_BY, CONTAINERD, SNAPSHOT_REF
from ckfs.services.checks import batches, check_key, check_labels
from ckfs.snapshots import (
    Cleaner,
    Info,
    Kind,
    Snapshotter,
    Usage,
    containerd_owned,
    filter_adaptor,
)

if TYPE_CHECKING:
    from ckfs.mount import Mount
    from ckfs.state import State

__all__ = ["LAZY_PROXY", "PROXY", "SnapshotsService"]

#: The proxy name the documented ``[proxy_plugins.ckfs]`` gives; unless
#: configured otherwise, ckfs's default snapshotter (``snapshotters.DEFAULT``,
#: overlayfs as containerd's own default) serves it.
PROXY = "ckfs"

#: The proxy name of lazy pulls (``[proxy_plugins.ckfs-lazy]``): the ``fuse``
#: snapshotter serves it, so containerd's unpacker finds every layer of an
#: image ckfs indexed (``ckfs pull --lazy``, or the CRI's layer-digest label)
#: attached instead of downloading it. A second name rather than `PROXY` on
#: fuse: images containerd already unpacked through `PROXY` live in
#: overlayfs, and layers ``ckfs pull`` unpacked there are adopted from it.
LAZY_PROXY = "ckfs-lazy"

_T = TypeVar("_T")


def _is_digest(name: str) -> bool:
    try:
        Digest.parse(name)
    except InvalidArgument:
        return False
    return True


@dataclass(frozen=True, slots=True)
class _Backend:
    """One ckfs snapshotter as one request name sees it (sync; run in threads)."""

    sn: Snapshotter
    #: Served under a proxy name, to containerd: see the module docstring.
    proxy: bool

    def present(self, info: Info) -> Info:
        """*info* as the client sees it: under a proxy, ckfs's layers name their chain."""
        if (
            self.proxy
            and info.kind is Kind.COMMITTED
            and SNAPSHOT_REF not in info.labels
            and _is_digest(info.name)
        ):
            return replace(info, labels={**info.labels, SNAPSHOT_REF: info.name})
        return info

    def stat(self, key: str) -> Info:
        return self.present(self.sn.stat(key))

    def walk(self, filters: Sequence[str]) -> list[Info]:
        match: Filter = parse_filters(filters)
        infos = [i for i in map(self.present, self.sn.walk()) if match.match(filter_adaptor(i))]
        lookups = _chain_lookups(match)
        if not self.proxy or lookups is None:
            return infos
        return [a for a in (self._adopt(i, lookups) for i in infos) if a is not None]

    def _adopt(self, info: Info, lookups: Filter) -> Info | None:
        """*info*, labelled `ADOPTED_BY` if a chain-ID lookup finds a ckfs layer.

        None when the layer went meanwhile: containerd must not adopt it.
        """
        if (
            info.kind is not Kind.COMMITTED
            or ADOPTED_BY in info.labels
            or containerd_owned(info.name)
            or not lookups.match(filter_adaptor(info))
        ):
            return info
        mark = Info(kind=info.kind, name=info.name, labels={ADOPTED_BY: CONTAINERD})
        try:
            return self.present(self.sn.update(mark, [f"labels.{ADOPTED_BY}"]))
        except NotFound:
            return None

    def create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        target = labels.get(SNAPSHOT_REF, "")
        if self.proxy and target and self._provides(target, parent):
            raise AlreadyExists(f"snapshot {target!r}: committed already, on parent {parent!r}")
        create = self.sn.prepare if kind is Kind.ACTIVE else self.sn.view
        return create(key, parent, labels)

    def _provides(self, target: str, parent: str) -> bool:
        """Whether committed snapshot *target* exists on *parent* (containerd adopts it)."""
        try:
            info = self.stat(target)
        except NotFound:
            return False
        return (
            info.kind is Kind.COMMITTED
            and info.parent == parent
            and info.labels.get(SNAPSHOT_REF) == target
        )

    def remove(self, key: str) -> None:
        if self.proxy and not containerd_owned(key):
            raise FailedPrecondition(
                f"snapshot {key!r}: made by ckfs, not containerd; ckfs's gc removes it"
            )
        self.sn.remove(key)

    def update(self, name: str, labels: dict[str, str], paths: list[str]) -> Info:
        return self.present(self.sn.update(Info(kind=Kind.ACTIVE, name=name, labels=labels), paths))

    def cleanup(self, name: str) -> None:
        if not isinstance(self.sn, Cleaner):
            raise Unimplemented(f"snapshotter {name!r}: has nothing to clean up")
        self.sn.cleanup()


def _chain_lookups(match: Filter) -> Filter | None:
    """The alternatives of *match* that look a layer up by chain ID, if any.

    containerd's adoption asks ``labels."containerd.io/snapshot.ref"==<chainID>``;
    a listing that merely tests the label's presence (``ctr snapshots ls``
    with a filter) adopts nothing.
    """
    alternatives = tuple(
        alt
        for alt in match.alternatives
        if any(
            s.operator is Operator.EQUAL and s.fieldpath == ("labels", SNAPSHOT_REF) for s in alt
        )
    )
    return Filter(alternatives) if alternatives else None


class SnapshotsService:
    """``containerd.services.snapshots.v1.Snapshots`` on one ckfs state root.

    Args:
        state: the state root whose snapshotters serve the requests.
        proxies: proxy name → ckfs snapshotter name (default: `PROXY` →
            ckfs's default snapshotter, `LAZY_PROXY` → ``fuse``); requests naming a proxy get
            containerd's semantics described in the module docstring.
    """

    #: containerd namespaces the keys itself (``<ns>/<seq>/<key>``), so
    #: requests from any namespace are served.
    NAMESPACED = False

    def __init__(self, state: State, proxies: Mapping[str, str] | None = None) -> None:
        self._state = state
        if proxies is None:
            import snapshotters  # the core names no implementation at import time

            proxies = {PROXY: snapshotters.DEFAULT, LAZY_PROXY: "fuse"}
        self._proxies = dict(proxies)
        self._backends: dict[str, _Backend] = {}
        self._opening = trio.Lock()

    async def _backend(self, name: str) -> _Backend:
        """The backend for the request's ``snapshotter`` *name*, opened once.

        Raises:
            InvalidArgument: neither a proxy name nor a ckfs snapshotter.
        """
        if (backend := self._backends.get(name)) is None:
            async with self._opening:
                if (backend := self._backends.get(name)) is None:
                    real = self._proxies.get(name, name)
                    sn = await trio.to_thread.run_sync(self._state.snapshotter, real)
                    backend = self._backends[name] = _Backend(sn, name in self._proxies)
        return backend

    async def _run(self, name: str, fn: Callable[[_Backend], _T]) -> _T:
        """``fn(backend)`` in a worker thread: every store call blocks."""
        backend = await self._backend(name)
        return await trio.to_thread.run_sync(fn, backend)

    async def _create(self, kind: Kind, request: Any) -> list[types_pb2.Mount]:
        check_key(request.key)
        check_key(request.parent, "parent", empty=True)
        labels = check_labels(request.labels, f"snapshot {request.key!r}")
        key, parent = request.key, request.parent
        mounts = await self._run(request.snapshotter, lambda b: b.create(kind, key, parent, labels))
        return mounts_to_proto(mounts)

    async def Prepare(
        self, request: pb.PrepareSnapshotRequest, call: object
    ) -> pb.PrepareSnapshotResponse:
        return pb.PrepareSnapshotResponse(mounts=await self._create(Kind.ACTIVE, request))

    async def View(self, request: pb.ViewSnapshotRequest, call: object) -> pb.ViewSnapshotResponse:
        return pb.ViewSnapshotResponse(mounts=await self._create(Kind.VIEW, request))

    async def Mounts(self, request: pb.MountsRequest, call: object) -> pb.MountsResponse:
        check_key(request.key)
        key = request.key
        mounts = await self._run(request.snapshotter, lambda b: b.sn.mounts(key))
        return pb.MountsResponse(mounts=mounts_to_proto(mounts))

    async def Commit(self, request: pb.CommitSnapshotRequest, call: object) -> empty_pb2.Empty:
        check_key(request.name, "committed snapshot name")
        check_key(request.key)
        labels = check_labels(request.labels, f"snapshot {request.name!r}")
        name, key = request.name, request.key
        await self._run(request.snapshotter, lambda b: b.sn.commit(name, key, labels))
        return empty_pb2.Empty()

    async def Remove(self, request: pb.RemoveSnapshotRequest, call: object) -> empty_pb2.Empty:
        check_key(request.key)
        key = request.key
        await self._run(request.snapshotter, lambda b: b.remove(key))
        return empty_pb2.Empty()

    async def Stat(self, request: pb.StatSnapshotRequest, call: object) -> pb.StatSnapshotResponse:
        check_key(request.key)
        key = request.key
        info = await self._run(request.snapshotter, lambda b: b.stat(key))
        return pb.StatSnapshotResponse(info=snapshot_info_to_proto(info))

    async def Update(
        self, request: pb.UpdateSnapshotRequest, call: object
    ) -> pb.UpdateSnapshotResponse:
        name = request.info.name
        check_key(name, "snapshot name")
        labels = check_labels(request.info.labels, f"snapshot {name!r}")
        paths = fieldpaths(request.update_mask)
        info = await self._run(request.snapshotter, lambda b: b.update(name, labels, paths))
        return pb.UpdateSnapshotResponse(info=snapshot_info_to_proto(info))

    async def List(
        self, request: pb.ListSnapshotsRequest, call: object
    ) -> AsyncIterator[pb.ListSnapshotsResponse]:
        filters = list(request.filters)
        infos = await self._run(request.snapshotter, lambda b: b.walk(filters))
        for batch in batches(infos):
            yield pb.ListSnapshotsResponse(info=[snapshot_info_to_proto(i) for i in batch])

    async def Usage(self, request: pb.UsageRequest, call: object) -> pb.UsageResponse:
        check_key(request.key)
        key = request.key
        usage: Usage = await self._run(request.snapshotter, lambda b: b.sn.usage(key))
        return usage_to_proto(usage)

    async def Cleanup(self, request: pb.CleanupRequest, call: object) -> empty_pb2.Empty:
        name = request.snapshotter
        await self._run(name, lambda b: b.cleanup(name))
        return empty_pb2.Empty()
