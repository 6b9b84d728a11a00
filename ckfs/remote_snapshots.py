"""A `Snapshotter` whose snapshots live in ckfsd, reached over containerd's Snapshots API.

`RemoteSnapshotter` implements `ckfs.snapshots.Snapshotter` by calling
``containerd.services.snapshots.v1.Snapshots`` on a ckfsd channel, one RPC
per method, so whatever takes a snapshotter (the acceptance suite first,
then the CLI as a client) can take ckfsd's instead, and the wire cannot
drift from the Python contract without the suite noticing. Messages become
model objects only through `ckfs.api.convert`, which refuses a malformed
answer as `InvalidArgument`; a failed RPC raises the `ckfs.errors` class of
its status (`ckfs.client.Client.call`), which is what the local snapshotter
would have raised.

Light, as every client module: grpc, the generated modules and the model
types; no trio, no store. Calls block; trio callers run them in a worker
thread, as they do the local snapshotters' methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.field_mask_pb2 import FieldMask

from ckfs.api import convert
from ckfs.api.services.snapshots.v1 import snapshots_pb2 as pb
from ckfs.api.services.snapshots.v1 import snapshots_pb2_grpc
from ckfs.errors import FailedPrecondition
from ckfs.snapshots import Info, Usage

if TYPE_CHECKING:
    from ckfs.client import Client
    from ckfs.mount import Mount

__all__ = ["RemoteSnapshotter"]

_T = TypeVar("_T")


class RemoteSnapshotter:
    """The snapshotter *name* of the ckfsd behind *client*.

    Args:
        client: a connected `ckfs.client.Client`; it stays the caller's to
            close (several snapshotters may share one channel).
        name: the snapshotter as the service knows it: a ckfs snapshotter
            (``overlayfs``, ``native``) or a proxy name (``ckfs``), which
            gets containerd's semantics (see `ckfs.services.snapshots`).
    """

    def __init__(self, client: Client, name: str) -> None:
        self.name = name
        self._client = client
        self._stub = snapshots_pb2_grpc.SnapshotsStub(client.channel)
        self._closed = False

    def __repr__(self) -> str:
        return f"RemoteSnapshotter({self.name!r} at {self._client.address})"

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"snapshotter {self.name} is closed")

    def _call(self, rpc: Callable[..., _T], request: object) -> _T:
        """One unary RPC, refused once closed."""
        self._check_open()
        return self._client.call(rpc, request)

    def stat(self, key: str) -> Info:
        reply = self._call(self._stub.Stat, pb.StatSnapshotRequest(snapshotter=self.name, key=key))
        return convert.snapshot_info_from_proto(reply.info)

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        request = pb.UpdateSnapshotRequest(
            snapshotter=self.name,
            info=convert.snapshot_info_to_proto(info),
            update_mask=FieldMask(paths=list(fieldpaths)),
        )
        return convert.snapshot_info_from_proto(self._call(self._stub.Update, request).info)

    def usage(self, key: str) -> Usage:
        reply = self._call(self._stub.Usage, pb.UsageRequest(snapshotter=self.name, key=key))
        return convert.usage_from_proto(reply)

    def mounts(self, key: str) -> list[Mount]:
        reply = self._call(self._stub.Mounts, pb.MountsRequest(snapshotter=self.name, key=key))
        return convert.mounts_from_proto(reply.mounts)

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self._create(self._stub.Prepare, pb.PrepareSnapshotRequest, key, parent, labels)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self._create(self._stub.View, pb.ViewSnapshotRequest, key, parent, labels)

    def _create(
        self,
        rpc: Callable[..., Any],
        request: Callable[..., object],
        key: str,
        parent: str,
        labels: Mapping[str, str] | None,
    ) -> list[Mount]:
        """Prepare or View (same fields, same answer): the new snapshot's mounts."""
        message = request(snapshotter=self.name, key=key, parent=parent, labels=labels or {})
        return convert.mounts_from_proto(self._call(rpc, message).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        request = pb.CommitSnapshotRequest(
            snapshotter=self.name, name=name, key=key, labels=labels or {}
        )
        self._call(self._stub.Commit, request)

    def remove(self, key: str) -> None:
        self._call(self._stub.Remove, pb.RemoveSnapshotRequest(snapshotter=self.name, key=key))

    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        """The List stream read to its end before returning, as the contract asks.

        A malformed filter therefore raises here, not at the first ``next``,
        and the caller may change snapshots while iterating.
        """
        request = pb.ListSnapshotsRequest(snapshotter=self.name, filters=list(filters))
        self._check_open()
        replies = self._client.stream(self._stub.List, request)
        return iter([convert.snapshot_info_from_proto(i) for reply in replies for i in reply.info])

    def close(self) -> None:
        """Refuse later calls; the channel is the client's and stays open."""
        self._closed = True
