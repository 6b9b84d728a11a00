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

from ckfs.api.services.content.v1 import content_pb2 as pb
from ckfs.api.services.content.v1 import content_pb2_grpc
from ckfs.content import ContentStore
from ckfs.digest import from_bytes
from ckfs.errors import Unimplemented
from ckfs.services.content import ContentService
from ckfs.state import State
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


class _CountingContent(ContentService):
    """The real service, counting its Status calls."""

    def __init__(self, state: State) -> None:
        super().__init__(state)
        self.statuses = 0

    async def Status(self, request: pb.StatusRequest, call: object) -> pb.StatusResponse:
        self.statuses += 1
        return await super().Status(request, call)


def test_a_writer_opened_with_total_and_digest_asks_no_status(tmp_path: Path) -> None:
    """Its status comes from the stream alone; one opened without them reads the ingest."""
    served: list[_CountingContent] = []

    def service(state: State) -> _CountingContent:
        served.append(_CountingContent(state))
        return served[-1]

    address = f"unix://{tmp_path}/content.sock"
    data = b"0123456789" * 10
    d = from_bytes(data)
    counting: list[Service] = [(service, content_pb2_grpc.add_ContentServicer_to_server)]
    with serving(tmp_path / "root", address, counting), remote_content_stores(address) as make:
        cs = make()
        with cs.writer("known", total=len(data), expected=d) as w:
            w.write(data[:10])
            st = w.status()
        assert (st.offset, st.total, st.expected) == (10, len(data), d)
        assert served[0].statuses == 0
        with cs.writer("known") as w:
            st = w.status()
        assert (st.offset, st.total, st.expected) == (10, len(data), d)
        assert served[0].statuses == 1
