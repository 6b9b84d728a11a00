"""ckfsd's stores as the acceptance suites' factories, through the client adapters.

The counterpart of `tests.local_stores` for a daemon: given the address of
something serving ckfsd's gRPC services (the real ``ckfsd`` in
``integration/``, the services in this process in ``tests/``), each
factory yields a callable that opens another client on it, so a suite's
"reopen" is a new connection to the same daemon state. Leaving the factory
closes every client it opened; the daemon is the caller's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import grpc

from ckfs.client import Client
from ckfs.remote_snapshots import RemoteSnapshotter

if TYPE_CHECKING:
    from ckfs.snapshots import Snapshotter


#: A unix socket has no proxy; without this grpc reads proxy variables.
_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


@contextlib.contextmanager
def clients(address: str) -> Iterator[Callable[[], Client]]:
    """Connections to *address*, each closed on exit.

    Not `Client.connect`: its readiness wait leaves grpc polling the
    channel's state, and closing such a channel waits out a 0.2 s poll;
    a suite opens a client per test. The server is listening already, and
    the first call connects.
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
