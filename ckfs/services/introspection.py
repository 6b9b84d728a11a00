"""containerd's Introspection service: who ckfsd is and which snapshotters it has.

``ctr version`` asks Server for the daemon's UUID after Version; clients
that pick a snapshotter ask Plugins for ``io.containerd.snapshotter.v1``
plugins and their platforms. ckfsd lists its registered snapshotters
(`snapshotters.NAMES`) as such plugins, for this host's platform.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio
from google.protobuf import empty_pb2

from ckfs.address import UUID_FILE
from ckfs.api import convert
from ckfs.api.services.introspection.v1 import introspection_pb2 as pb
from ckfs.filters import adaptor_for, parse_filters

if TYPE_CHECKING:
    from ckfs.state import State

__all__ = ["SNAPSHOTTER_PLUGIN", "IntrospectionService", "server_uuid"]

#: containerd's plugin type for snapshotters, which its clients filter on.
SNAPSHOTTER_PLUGIN: Final = "io.containerd.snapshotter.v1"


def server_uuid(root: Path) -> str:
    """The UUID of the state *root*, made on first use and then kept.

    Two daemons starting at once agree: the file appears by a hard link,
    which fails if another won, and the winner's UUID is read back.
    """
    path = root / UUID_FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{UUID_FILE}.{os.getpid()}.{uuid.uuid4().hex}"
    tmp.write_text(f"{uuid.uuid4()}\n")
    try:
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink()
    return path.read_text().strip()


def _plugins() -> list[pb.Plugin]:
    import snapshotters
    from ckfs.images import platforms

    host = convert.platform_to_proto(platforms.default())
    return [
        pb.Plugin(type=SNAPSHOTTER_PLUGIN, id=name, platforms=[host]) for name in snapshotters.NAMES
    ]


class IntrospectionService:
    """``containerd.services.introspection.v1.Introspection`` for one ckfsd."""

    #: Asked before any namespace matters (``ctr version``).
    NAMESPACED = False

    def __init__(self, state: State) -> None:
        self._root = state.root

    async def Plugins(self, request: pb.PluginsRequest, call: object) -> pb.PluginsResponse:
        """The snapshotter plugins matching any of the filters (``type``, ``id``).

        Raises:
            InvalidArgument: a malformed filter.
        """
        match = parse_filters(list(request.filters))
        plugins = [p for p in _plugins() if match.match(adaptor_for({"type": p.type, "id": p.id}))]
        return pb.PluginsResponse(plugins=plugins)

    async def Server(self, request: empty_pb2.Empty, call: object) -> pb.ServerResponse:
        return pb.ServerResponse(uuid=await trio.to_thread.run_sync(server_uuid, self._root))
