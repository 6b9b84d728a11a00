"""The content store acceptance suite through gRPC, against the service in this process.

`ckfs.remote_content.RemoteContentStore` talks to ckfsd's Content service
(`ckfs.services.content`) served by the real bridge and grpcio over a unix
socket: resumable Write streams, Read at offsets, statuses, labels and
errors cross the wire exactly as a ckfsd client sees them. ``integration/``
runs the same suite against a real ckfsd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckfs.api.services.content.v1 import content_pb2_grpc
from ckfs.content import ContentStore
from ckfs.errors import Unimplemented
from ckfs.services.content import ContentService
from tests.remote_stores import Service, remote_content_stores, serving
from tests.suites.content import ContentStoreSuite

SERVICES: list[Service] = [(ContentService, content_pb2_grpc.add_ContentServicer_to_server)]


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Callable[[], ContentStore]]:
    address = f"unix://{tmp_path}/content.sock"
    with serving(tmp_path / "root", address, SERVICES), remote_content_stores(address) as make:
        yield make  # type: ignore[misc]


class TestRemoteContentStore(ContentStoreSuite):
    pass


def test_only_a_restart_truncates_over_the_wire(make_store: Callable[[], ContentStore]) -> None:
    with make_store().writer("t") as w:
        w.write(b"0123456789")
        with pytest.raises(Unimplemented):
            w.truncate(4)
        w.truncate(0)
        assert w.offset == 0
        w.write(b"abc")
        assert w.offset == 3
