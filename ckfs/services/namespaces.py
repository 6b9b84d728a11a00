"""containerd's Namespaces service: ckfs has one namespace, ``default``.

containerd's client reads a namespace's labels through Get (its default
runtime and snapshotter, ``containerd.io/defaults/*``) and ``ctr namespaces
ls`` lists them; ckfs answers both for ``default`` alone. Every other
namespace is absent, and the calls that would create, change or delete one
are refused: one namespace is a property of ckfs, not a state a client can
change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from google.protobuf import empty_pb2

from ckfs.api.services.namespaces.v1 import namespaces_pb2 as pb
from ckfs.errors import AlreadyExists, FailedPrecondition, NotFound
from ckfs.services.bridge import DEFAULT_NAMESPACE

if TYPE_CHECKING:
    from ckfs.state import State

__all__ = ["ONLY_DEFAULT", "NamespacesService"]

#: The reason every change is refused, in each message.
ONLY_DEFAULT: Final = f"ckfs has one namespace, {DEFAULT_NAMESPACE!r}"


class NamespacesService:
    """``containerd.services.namespaces.v1.Namespaces`` answering for ``default``.

    Args:
        state: the daemon's state root (unused: nothing here is stored).
        labels: the labels ``default`` shows; none unless the daemon says.
    """

    #: Namespaces are not themselves namespaced: a client in any namespace
    #: may ask which exist.
    NAMESPACED = False

    def __init__(self, state: State | None = None, labels: Mapping[str, str] | None = None) -> None:
        self._labels = dict(labels or {})

    def _default(self) -> pb.Namespace:
        return pb.Namespace(name=DEFAULT_NAMESPACE, labels=self._labels)

    def _known(self, name: str) -> pb.Namespace:
        """Raises: NotFound: *name* is not ``default``."""
        if name != DEFAULT_NAMESPACE:
            raise NotFound(f"namespace {name[:200]!r}: not found; {ONLY_DEFAULT}")
        return self._default()

    async def Get(self, request: pb.GetNamespaceRequest, call: object) -> pb.GetNamespaceResponse:
        return pb.GetNamespaceResponse(namespace=self._known(request.name))

    async def List(
        self, request: pb.ListNamespacesRequest, call: object
    ) -> pb.ListNamespacesResponse:
        return pb.ListNamespacesResponse(namespaces=[self._default()])

    async def Create(
        self, request: pb.CreateNamespaceRequest, call: object
    ) -> pb.CreateNamespaceResponse:
        """Raises: AlreadyExists for ``default``; FailedPrecondition for any other."""
        if request.namespace.name == DEFAULT_NAMESPACE:
            raise AlreadyExists(f"namespace {DEFAULT_NAMESPACE!r}: already exists")
        raise FailedPrecondition(f"cannot create namespace: {ONLY_DEFAULT}")

    async def Update(
        self, request: pb.UpdateNamespaceRequest, call: object
    ) -> pb.UpdateNamespaceResponse:
        """Raises: NotFound for another namespace; FailedPrecondition for ``default``."""
        self._known(request.namespace.name)
        raise FailedPrecondition(f"namespace labels are fixed by ckfsd: {ONLY_DEFAULT}")

    async def Delete(self, request: pb.DeleteNamespaceRequest, call: object) -> empty_pb2.Empty:
        """Raises: NotFound for another namespace; FailedPrecondition for ``default``."""
        self._known(request.name)
        raise FailedPrecondition(f"cannot delete namespace {DEFAULT_NAMESPACE!r}: {ONLY_DEFAULT}")
