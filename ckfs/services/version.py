"""containerd's Version service: which ckfs answers on the socket.

Clients probe a daemon with it (``ctr version``); a CLI can compare the
daemon's version with its own before trusting that both speak the same API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.protobuf import empty_pb2

from ckfs import __version__
from ckfs.api.services.version.v1 import version_pb2 as pb

if TYPE_CHECKING:
    from ckfs.state import State

__all__ = ["VersionService"]


class VersionService:
    """``containerd.services.version.v1.Version``: ckfs's package version."""

    #: Any client may ask, whatever namespace it is in.
    NAMESPACED = False

    def __init__(self, state: State | None = None) -> None:
        """*state*: taken as ckfsd makes every service; a version needs none."""

    async def Version(self, request: empty_pb2.Empty, call: object) -> pb.VersionResponse:
        return pb.VersionResponse(version=__version__, revision="")
