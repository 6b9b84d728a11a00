"""ckfsd's stores as the acceptance suites' factories, through the client adapters.

The counterpart of `tests.local_stores` for a daemon: given the address of
something serving ckfsd's gRPC services (the real ``ckfsd`` in
``integration/``, the services in this process by `serving` in ``tests/``), each
factory yields a callable that opens another client on it, so a suite's
"reopen" is a new connection to the same daemon state. Leaving the factory
closes every client it opened; the daemon is the caller's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import trio

from ckfs.client import Client
from ckfs.remote_content import RemoteContentStore
from ckfs.remote_snapshots import RemoteSnapshotter
from ckfs.services.bridge import AddToServer, Bridge
from ckfs.state import State

if TYPE_CHECKING:
    from ckfs.snapshots import Snapshotter

#: A service class as ckfsd registers it: built on the `State`, with its
#: generated ``add_*Servicer_to_server``.
Service = tuple[Callable[[State], object], AddToServer]


#: Enough for the suites' concurrent calls (eight prepares, six blob writers,
#: four churning writers) plus a List or two.
WORKERS = 16

#: Upper bound on starting or stopping the in-process server; it takes
#: milliseconds, and a hang must fail the test rather than wedge the run.
SERVE_TIMEOUT = 30.0


@contextlib.contextmanager
def serving(root: Path, address: str, services: Sequence[Service]) -> Iterator[None]:
    """*services* on the state *root*, listening on *address* until exit.

    The services' trio loop runs in a thread of its own: the suites are
    synchronous and block in grpc calls, which must not block the loop that
    answers them.

    Args:
        root: the state root.
        address: a ``unix://`` address.
        services: (service class taking the `State`, generated
            ``add_*Servicer_to_server``) pairs, as ckfsd registers them.
    """
    started = threading.Event()
    token: list[trio.lowlevel.TrioToken] = []
    stop = trio.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        state = State(root)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS))
        try:
            async with trio.open_nursery() as nursery:
                bridge = Bridge(nursery)
                for service, add_to_server in services:
                    bridge.add(server, service(state), add_to_server)
                server.add_insecure_port(address)
                server.start()
                token.append(trio.lowlevel.current_trio_token())
                started.set()
                await stop.wait()
                await trio.to_thread.run_sync(server.stop(None).wait)
        finally:
            await trio.to_thread.run_sync(state.close)

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as e:  # reported to the test below
            failure.append(e)
            started.set()

    thread = threading.Thread(target=run, name="snapshots-service")
    thread.start()
    try:
        assert started.wait(SERVE_TIMEOUT) and not failure, failure
        yield
    finally:
        if token:
            trio.from_thread.run_sync(stop.set, trio_token=token[0])
        thread.join(SERVE_TIMEOUT)
        assert not thread.is_alive(), "the service did not stop"
        assert not failure, failure


#: A unix socket has no proxy; without this grpc reads proxy variables.
_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


@contextlib.contextmanager
def clients(address: str) -> Iterator[Callable[[], Client]]:
    """Connections to *address*, each closed on exit.

    Not `Client.connect`: its readiness probe is an RPC a suite does not
    need per client. The server is listening already, and the first call
    connects.
    """
    opened: list[Client] = []

    def connect() -> Client:
        client = Client(grpc.insecure_channel(address, options=_CHANNEL_OPTIONS), address)
        opened.append(client)
        return client

    try:
        yield connect
    finally:
        for client in opened:
            client.close()


@contextlib.contextmanager
def remote_snapshotters(address: str, name: str) -> Iterator[Callable[[], Snapshotter]]:
    """The snapshotter *name* served at *address*; every call is another client."""
    with clients(address) as connect:
        yield lambda: RemoteSnapshotter(connect(), name)


@contextlib.contextmanager
def remote_content_stores(address: str) -> Iterator[Callable[[], RemoteContentStore]]:
    """The content store served at *address*; every call is another client."""
    with clients(address) as connect:
        yield lambda: RemoteContentStore(connect())
