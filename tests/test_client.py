"""The CLI's ckfsd client without a daemon: error mapping, discovery, lightness.

Calls through a real ckfsd are in the CLI tests, run both ways.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from ckfs import client, errors
from ckfs.api.v1 import ckfs_pb2 as pb


class _Failed(grpc.RpcError):
    """What grpc raises for a failed call: an RpcError that tells its status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("cls", list(errors.GRPC_CODES), ids=lambda c: c.__name__)
def test_a_status_comes_back_as_its_class_with_the_message(cls: type[errors.CkfsError]) -> None:
    code = grpc.StatusCode[errors.GRPC_CODES[cls]]
    with pytest.raises(errors.CkfsError) as caught, client.rpc_errors():
        raise _Failed(code, "snapshot k: not found")
    assert type(caught.value) is cls and str(caught.value) == "snapshot k: not found"


def test_a_status_without_details_names_its_code() -> None:
    with pytest.raises(errors.Unavailable, match="UNAVAILABLE"), client.rpc_errors():
        raise _Failed(grpc.StatusCode.UNAVAILABLE, "")


@pytest.mark.parametrize(
    ("details", "cls"),
    [
        ("Concurrent RPC limit exceeded!", errors.Unavailable),
        (
            "SERVER: Received message larger than max (16777300 vs. 16777216)",
            errors.InvalidArgument,
        ),
    ],
    ids=["server full", "message too large"],
)
def test_resource_exhausted_is_told_apart_by_its_details(
    details: str, cls: type[errors.CkfsError]
) -> None:
    """grpcio's two uses of the code: only a full server is worth trying again."""
    with pytest.raises(errors.CkfsError) as caught, client.rpc_errors():
        raise _Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
    assert type(caught.value) is cls and str(caught.value) == details


def test_a_named_daemon_that_is_not_there_fails_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    for address in (str(tmp_path / "none.sock"), f"unix://{tmp_path}/none.sock"):
        with pytest.raises(errors.Unavailable, match=r"none\.sock does not answer"):
            client.discover(address, root_given=False)
    assert time.monotonic() - started < client.CONNECT_TIMEOUT  # refused, not waited for


def test_a_stale_default_socket_means_the_local_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckfsd.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # a daemon that died: the file stays, nobody listens
    monkeypatch.setattr("ckfs.address.default_address", lambda: f"unix://{path}")
    assert client.discover(None, root_given=False) is None
    monkeypatch.setattr("ckfs.address.default_address", lambda: f"unix://{tmp_path}/gone.sock")
    assert client.discover(None, root_given=False) is None


def test_another_root_never_goes_to_the_default_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> str:
        raise AssertionError("probed the default socket for a root of its own")

    monkeypatch.setattr("ckfs.address.default_address", refuse)
    assert client.discover(None, root_given=True) is None


def test_the_default_socket_is_used_only_for_a_daemon_of_the_default_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon on the default socket serving another root must not act on the default one."""
    from ckfs.api.services.introspection.v1 import introspection_pb2_grpc
    from ckfs.services.introspection import IntrospectionService
    from tests.remote_stores import serving

    served, other = tmp_path / "served", tmp_path / "other"
    other.mkdir()
    path = tmp_path / "ckfsd.sock"
    monkeypatch.setattr("ckfs.address.default_address", lambda: f"unix://{path}")
    service = (IntrospectionService, introspection_pb2_grpc.add_IntrospectionServicer_to_server)
    with serving(served, f"unix://{path}", [service]):
        monkeypatch.setenv("CKFS_ROOT", str(other))  # default_root(): a root it does not serve
        assert client.discover(None, root_given=False) is None
        (other / "uuid").write_text("0c6e9f0e-0000-4000-8000-000000000000\n")
        assert client.discover(None, root_given=False) is None
        monkeypatch.setenv("CKFS_ROOT", str(served))
        found = client.discover(None, root_given=False)
        assert found is not None
        found.close()


def test_connect_probes_with_the_root_uuid_and_asks_it_once(tmp_path: Path) -> None:
    """Readiness is Introspection.Server under a deadline (no channel_ready_future
    polling thread to wait out at close), and check_root reuses its answer."""
    from ckfs.api.services.introspection.v1 import introspection_pb2_grpc
    from ckfs.services.introspection import IntrospectionService
    from tests.remote_stores import serving

    asked: list[str] = []

    class Counting(IntrospectionService):
        async def Server(self, request: object, call: object) -> object:
            asked.append("Server")
            return await super().Server(request, call)  # type: ignore[arg-type]

    address = f"unix://{tmp_path}/ckfsd.sock"
    add = introspection_pb2_grpc.add_IntrospectionServicer_to_server
    with serving(tmp_path / "root", address, [(Counting, add)]):
        daemon = client.Client.connect(address)
        try:
            assert asked == ["Server"]  # the probe
            daemon.check_root(tmp_path / "root")
            assert asked == ["Server"]  # its answer kept
        finally:
            daemon.close()


def test_a_socket_that_accepts_but_never_answers_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(str(path))
        mute.listen()  # the kernel completes connections; nobody speaks HTTP/2
        with pytest.raises(errors.Unavailable, match=r"mute\.sock does not answer$"):
            client.Client.connect(str(path), timeout=0.5)


def test_a_named_daemon_without_a_root_to_check_is_not_probed(tmp_path: Path) -> None:
    """The command's own RPC is the first; a wedged daemon still fails it within the bound."""
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(str(path))
        mute.listen()
        daemon = client.discover(str(path), root_given=False)  # no probe: no wait
        assert daemon is not None
        started = time.monotonic()
        try:
            with pytest.raises(errors.Unavailable, match=r"mute\.sock"):
                daemon.pull(
                    "example.local/x",
                    register=True,
                    options=client.pull_options(),
                    on_event=lambda p: None,
                )
        finally:
            daemon.close()
    assert time.monotonic() - started < client.CONNECT_TIMEOUT * 3  # not grpc's 20 s


def test_pull_options_travel_as_typed() -> None:
    options = client.pull_options(platform="linux/arm64", timeout=None, max_concurrent=3)
    assert options.platform == "linux/arm64" and not options.HasField("timeout")
    assert options.hosts_dirs == [] and options.max_concurrent == 3
    assert client.pull_options(timeout=2.5).timeout == 2.5


def test_hosts_dirs_are_refused_with_the_daemons_words() -> None:
    from ckfs.options import DAEMON_HOSTS_DIRS

    with pytest.raises(errors.InvalidArgument) as caught:
        client.pull_options(hosts_dirs=[Path("certs.d")])
    assert str(caught.value) == DAEMON_HOSTS_DIRS


def test_events_update_one_progress_object_per_blob() -> None:
    desc = pb.BlobEvent(kind="layer", state=pb.DOWNLOADING, offset=5, fetched=5)
    desc.descriptor.media_type = "application/vnd.oci.image.layer.v1.tar"
    desc.descriptor.digest = "sha256:" + "a" * 64
    desc.descriptor.size = 10
    blobs: dict[tuple[str, str], object] = {}
    first = client._progress(blobs, desc)  # type: ignore[arg-type]
    desc.state, desc.offset = pb.VERIFIED, 10
    second = client._progress(blobs, desc)  # type: ignore[arg-type]
    assert first is second and str(second.state) == "verified" and second.offset == 10
    assert second.to_json()["digest"] == "sha256:" + "a" * 64


@pytest.mark.parametrize("state", [pb.BLOB_STATE_UNSPECIFIED, 99])
def test_an_event_in_an_unknown_state_is_refused(state: int) -> None:
    event = pb.BlobEvent(kind="layer", state=state)  # type: ignore[arg-type]
    event.descriptor.media_type = "application/octet-stream"
    event.descriptor.digest = "sha256:" + "c" * 64
    with pytest.raises(errors.InvalidArgument, match="unknown state"):
        client._progress({}, event)


#: What a client-only run must not load: the event loop, the HTTP stack, the stores.
HEAVY = ("trio", "httpx", "httpcore", "sqlite3", "ckfs.content", "ckfs.images.store")
HEAVY += ("ckfs.metadata.db", "ckfs.remotes.walk", "snapshotters", "ckfs.state")
#: ... nor the service-level conversions and messages (`ckfs.api.convert_types` is enough).
HEAVY += ("ckfs.api.convert", "ckfs.snapshots", "ckfs.api.services.content")
HEAVY += ("ckfs.api.services.images", "ckfs.api.services.snapshots", "ckfs.mount")

_PROBE = """
import sys
from ckfs import client
from ckfs.api.v1 import ckfs_pb2 as pb
event = pb.BlobEvent(kind="config", state=pb.EXISTS, offset=1)
event.descriptor.media_type = "application/json"
event.descriptor.digest = "sha256:" + "b" * 64
p = client._progress({}, event)
p.to_json()
summary = pb.PullSummary(reference="r", blobs=1)
summary.target.CopyFrom(event.descriptor)
client.summary_json(summary)
client.pull_options(platform="linux/amd64")
assert client.discover(None, root_given=True) is None
heavy = HEAVY
print(sorted(m for m in sys.modules if m in heavy or m.startswith(tuple(h + "." for h in heavy))))
"""


def test_a_client_only_run_loads_no_loop_http_or_store() -> None:
    probe = _PROBE.replace("HEAVY", repr(HEAVY))
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
