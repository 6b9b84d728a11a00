"""The daemon's life: claim, recover, serve, stop.

`serve` runs inside `trio.run` and, in order:

1. holds the root's lock and the socket's (`ckfsd.listen`): a second
   daemon on either is refused with one line naming the first one's PID;
2. clears what a killed daemon left (`ckfsd.recover`), and brings back
   lazy mounts whose FUSE server died (`ckfsd.recover.recover_fuse`; a
   live server, which outlives ckfsd, is adopted as it is);
3. builds the grpc server (a bounded worker pool, the logging interceptor)
   and registers every service of `SERVICES`, through the
   trio bridge (`ckfs.services.bridge`);
4. binds the socket atomically, starts, and waits until grpc's transport
   answers on it (the HTTP/2 handshake); only then does it say anything: ``READY=1`` on
   ``--ready-fd``, sd_notify, one log line;
5. waits for signals: SIGHUP reloads (calls ``reload`` on the services
   that have one; registry hosts.toml and credentials are read afresh by
   every pull today, so nothing else holds them), SIGTERM or SIGINT stops;
6. stops accepting, gives in-flight RPCs the grace period to finish, then
   cancels them (their trio side sees `trio.Cancelled`), removes the socket
   and returns: exit status 0.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import trio

from ckfs import __version__
from ckfs.address import socket_path
from ckfs.api.services.content.v1 import content_pb2_grpc
from ckfs.api.services.images.v1 import images_pb2_grpc
from ckfs.api.services.introspection.v1 import introspection_pb2_grpc
from ckfs.api.services.namespaces.v1 import namespaces_pb2_grpc
from ckfs.api.services.snapshots.v1 import snapshots_pb2_grpc
from ckfs.api.services.version.v1 import version_pb2_grpc
from ckfs.api.v1 import ckfs_pb2_grpc
from ckfs.errors import InvalidArgument, Unavailable
from ckfs.remotes import skip_httpx_cli
from ckfs.safetext import message
from ckfs.services.bridge import AddToServer, Bridge, LoggingInterceptor
from ckfs.services.ckfs import CkfsService
from ckfs.services.content import ContentService
from ckfs.services.images import ImagesService
from ckfs.services.introspection import IntrospectionService
from ckfs.services.namespaces import NamespacesService
from ckfs.services.snapshots import SnapshotsService
from ckfs.services.version import VersionService
from ckfs.state import State
from ckfsd import listen
from ckfsd.main import Config
from ckfsd.recover import recover, recover_fuse

__all__ = ["SERVICES", "register", "serve"]

log = logging.getLogger("ckfsd")

#: The services ckfsd serves, each with the generated function that declares
#: its RPCs. Each class is made with the daemon's `ckfs.state.State` and, if
#: its constructor takes one, ``nursery=`` the serving nursery (for work that
#: outlives a call's task).
SERVICES: tuple[tuple[type, AddToServer], ...] = (
    (SnapshotsService, snapshots_pb2_grpc.add_SnapshotsServicer_to_server),
    (ContentService, content_pb2_grpc.add_ContentServicer_to_server),
    (ImagesService, images_pb2_grpc.add_ImagesServicer_to_server),
    (NamespacesService, namespaces_pb2_grpc.add_NamespacesServicer_to_server),
    (VersionService, version_pb2_grpc.add_VersionServicer_to_server),
    (IntrospectionService, introspection_pb2_grpc.add_IntrospectionServicer_to_server),
    (CkfsService, ckfs_pb2_grpc.add_CkfsServicer_to_server),
)

#: Largest message either way, as containerd's own server (16 MiB): a
#: content Write chunk or a List batch fits many times over. grpcio refuses
#: a bigger one from its length prefix, before buffering it or calling any
#: ckfs code, with RESOURCE_EXHAUSTED (as containerd does).
MAX_MESSAGE = 16 << 20

#: RPCs in progress or queued for a worker before grpcio answers
#: RESOURCE_EXHAUSTED at once: a flood of calls costs a bounded queue, not
#: memory without end. Far above what containerd sends at once (a pull
#: writes a few layers in parallel) or the issue's 200 concurrent calls.
MAX_RPCS = 1024

#: Seconds to wait for our own socket to answer a gRPC handshake at start.
READY_TIMEOUT = 30.0

_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


def register(
    server: grpc.Server, bridge: Bridge, state: State, nursery: trio.Nursery
) -> list[object]:
    """Serve every service of `SERVICES` on *server*; the services."""
    services: list[object] = []
    for cls, add_to_server in SERVICES:
        wants_nursery = "nursery" in inspect.signature(cls).parameters
        service = cls(state, nursery=nursery) if wants_nursery else cls(state)
        bridge.add(server, service, add_to_server)
        services.append(service)
    return services


async def _reload(services: list[object]) -> None:
    """SIGHUP: every service with a ``reload`` re-reads its configuration."""
    for service in services:
        reload = getattr(service, "reload", None)
        if reload is None:
            continue
        try:
            result = reload()
            if inspect.isawaitable(result):
                await result
        except Exception as e:
            log.error("reload of %s failed: %s", type(service).__name__, message(str(e)))
    log.info("reloaded configuration (SIGHUP)")


#: An HTTP/2 client's opening: the connection preface, then an empty
#: SETTINGS frame (length 0, type 4, no flags, stream 0). RFC 9113 3.4.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])

#: Type of the frame a live HTTP/2 server answers the preface with first.
_H2_SETTINGS = 4


def _wait_answers(path: Path) -> None:
    """Block until grpc's transport answers on the socket *path* (a worker thread).

    Ready means grpc's HTTP/2 server answers a connection with its SETTINGS
    frame, the handshake every client's first call makes. Done on a plain
    socket: ``grpc.channel_ready_future`` left a polling thread that closing
    the channel waited out (~200 ms of every start), and an RPC as probe
    would be the first line of the daemon's log, before it said it serves.

    Raises:
        Unavailable: no SETTINGS frame within `READY_TIMEOUT`.
    """
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if _settings_frame(path, deadline - time.monotonic()):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise Unavailable(f"unix://{path} did not answer within {READY_TIMEOUT:.0f}s")
        time.sleep(0.01)


def _settings_frame(path: Path, timeout: float) -> bool:
    """Whether the server on *path* answers the HTTP/2 preface with SETTINGS."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(max(timeout, 0.001))
        s.connect(str(path))
        s.sendall(_H2_PREFACE)
        header = b""
        while len(header) < 9:  # a frame header: length (3), type, flags, stream (4)
            chunk = s.recv(9 - len(header))
            if not chunk:
                return False
            header += chunk
        return header[3] == _H2_SETTINGS


def sd_notify(state: str) -> None:
    """Tell a systemd-style supervisor *state* (``READY=1``), if it asked.

    The protocol is one datagram to ``$NOTIFY_SOCKET``, a path or, with a
    leading ``@``, an abstract socket name. Failures are logged, not fatal:
    the daemon serves either way.
    """
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return
    if where.startswith("@"):
        where = "\0" + where[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(where)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("sd_notify %s failed: %s", state.split("=")[0], e.strerror)


#: Modules a pull or a mount imports on first use (they stay out of the
#: start so ckfsd answers sooner): imported once it serves, so the first
#: ``ckfs mount`` does not wait for them. On a cold page cache that was
#: ~0.3 s of the first Mounts RPC (0.77 s, 0.48 s with them loaded;
#: medians of 3, 4 eStargz layers of 2,500 files).
WARM_MODULES = (
    "ckfs.provide",
    "ckfs.pull",
    "ckfs.unpack",
    "ckfs.lazy",
    "ckfs.remotes.registry",
    "ckfs.layerindex.estargz",
    "ckfs.layerindex.store",
    "snapshotters.fuse.snapshotter",
    "snapshotters.overlay",
)


async def _warm() -> None:
    """Import `WARM_MODULES` in a worker thread, without httpx's CLI
    (`ckfs.remotes.skip_httpx_cli`); a failure is only logged (the RPC
    that needs the module will say it)."""
    skip_httpx_cli()
    for name in WARM_MODULES:
        try:
            await trio.to_thread.run_sync(importlib.import_module, name, abandon_on_cancel=True)
        except Exception as e:
            log.warning("warming %s failed: %s", name, message(str(e)))


def _say_ready(ready_fd: int | None) -> None:
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"READY=1\n")
        except OSError as e:
            log.warning("--ready-fd %d: %s", ready_fd, e.strerror)
        finally:
            os.close(ready_fd)
    sd_notify(f"READY=1\nMAINPID={os.getpid()}")


@contextlib.contextmanager
def _places(config: Config) -> Iterator[tuple[State, Path]]:
    """The state and socket path, held by this daemon alone while inside."""
    try:
        path = socket_path(config.address)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    options = {} if config.cache_max is None else {"cache_max": str(config.cache_max)}
    state = State(config.root, options=options)
    root_fd = listen.hold(state.lock_dir / "ckfsd", f"another ckfsd serves {config.root}")
    try:
        socket_fd = listen.claim(path)
        try:
            yield state, path
        finally:
            listen.remove_socket(path)
            listen.release(socket_fd)
    finally:
        state.close()
        listen.release(root_fd)


@contextlib.asynccontextmanager
async def _server(config: Config, state: State, path: Path) -> AsyncIterator[list[object]]:
    """A grpc server serving on *path* inside, its services yielded.

    On the way out it stops within the grace period, then cancels what is
    left of streaming RPCs on the loop.
    """
    pool = futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc")
    server = grpc.server(
        pool,
        interceptors=[LoggingInterceptor()],
        options=_SERVER_OPTIONS,
        maximum_concurrent_rpcs=MAX_RPCS,
    )
    try:
        async with trio.open_nursery() as nursery:
            bridge = Bridge(nursery, max_streams=config.workers)
            services = register(server, bridge, state, nursery)
            listen.bind(server, path)
            server.start()
            try:
                yield services
            finally:
                with trio.CancelScope(shield=True):
                    sd_notify("STOPPING=1")
                    log.info("stopping: %.0fs for in-flight RPCs", config.grace_period)
                    await trio.to_thread.run_sync(server.stop(config.grace_period).wait)
                nursery.cancel_scope.cancel()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


async def serve(config: Config) -> None:
    """Run ckfsd with *config* until SIGTERM or SIGINT (see the module docstring).

    Raises:
        Unavailable: another ckfsd serves the root or listens on the
            socket, or the socket does not answer once bound.
        FailedPrecondition: the socket path is taken by something else.
        InvalidArgument: the address is not a unix socket.
    """
    with (
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
        _places(config) as (state, path),
    ):
        leftovers = await trio.to_thread.run_sync(recover, state)
        lazy = await trio.to_thread.run_sync(recover_fuse, state)
        async with _server(config, state, path) as services:
            await trio.to_thread.run_sync(_wait_answers, path)
            _say_ready(config.ready_fd)
            log.info(
                "ckfsd %s serving %s on unix://%s (pid %d)",
                __version__,
                config.root,
                path,
                os.getpid(),
            )
            for what in leftovers:
                log.info("removed %s, left by an interrupted daemon", what)
            for what in lazy:
                log.info("fuse: %s", what)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_warm)
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        log.info("%s received", signal.Signals(signum).name)
                        break
                    await _reload(services)
                nursery.cancel_scope.cancel()
