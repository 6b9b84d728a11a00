"""ckfsd's parts without a running daemon: config, socket places, recovery, the service table.

The daemon itself (signals, readiness, real RPCs) is tested as a process in
``integration/test_ckfsd.py``.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path

import pytest
import trio

from ckfs import unpack
from ckfs.address import (
    SYSTEM_SOCKET,
    default_address,
    default_socket,
    socket_path,
    system_root,
)
from ckfs.digest import Digest
from ckfs.errors import FailedPrecondition, InvalidArgument, Unavailable
from ckfs.services.bridge import AddToServer, generated_handlers
from ckfs.state import State
from ckfsd import listen
from ckfsd.daemon import SERVICES
from ckfsd.main import DEFAULT_GRACE, DEFAULT_WORKERS, load_config, resolve
from ckfsd.recover import recover

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_documented_config_loads() -> None:
    assert load_config(DOCS / "ckfsd.toml") == {
        "root": Path("/var/lib/ckfs"),
        "address": f"unix://{SYSTEM_SOCKET}",
        "grace_period": DEFAULT_GRACE,
        "workers": DEFAULT_WORKERS,
    }


def test_the_containerd_snippet_points_at_the_default_socket() -> None:
    config = tomllib.loads((DOCS / "containerd-config.toml").read_text())
    assert config["proxy_plugins"]["ckfs"] == {"type": "snapshot", "address": str(SYSTEM_SOCKET)}


def test_command_line_wins_over_file_over_defaults(tmp_path: Path) -> None:
    file = tmp_path / "ckfsd.toml"
    file.write_text('root = "/from/file"\naddress = "unix:///file.sock"\nworkers = 4\n')
    config = resolve(Path("/from/cli"), None, file, debug=True, ready_fd=None)
    assert (config.root, config.address, config.workers) == (
        Path("/from/cli"),
        "unix:///file.sock",
        4,
    )
    assert config.grace_period == DEFAULT_GRACE and config.debug


def test_without_an_address_a_root_is_served_where_ckfs_looks_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CKFS_ROOT", raising=False)
    assert resolve(Path("/srv/x"), None, None).address == "unix:///srv/x/ckfsd.sock"
    file = tmp_path / "ckfsd.toml"
    file.write_text('root = "/srv/y"\n')
    assert resolve(None, None, file).address == "unix:///srv/y/ckfsd.sock"
    monkeypatch.setenv("CKFS_ROOT", "/srv/z")
    assert resolve(None, None, None).address == "unix:///srv/z/ckfsd.sock"
    # The root nobody names keeps the well-known socket containerd points at.
    monkeypatch.delenv("CKFS_ROOT")
    assert resolve(None, None, None).address == default_address()
    assert resolve(system_root(), None, None).address == default_address()
    assert resolve(Path("/srv/x"), "unix:///run/x.sock", None).address == "unix:///run/x.sock"


def test_the_cache_bound_from_the_command_line_or_the_file(tmp_path: Path) -> None:
    file = tmp_path / "ckfsd.toml"
    file.write_text('cache_max = "2GB"\n')
    assert resolve(Path("/r"), None, file).cache_max == 2_000_000_000
    assert resolve(Path("/r"), None, file, cache_max="1KiB").cache_max == 1024
    assert resolve(Path("/r"), None, None).cache_max is None
    file.write_text("cache_max = 4096\n")
    assert resolve(Path("/r"), None, file).cache_max == 4096
    with pytest.raises(InvalidArgument, match="--cache-max: 'lots' is not a size"):
        resolve(Path("/r"), None, None, cache_max="lots")
    file.write_text('cache_max = "-1"\n')
    with pytest.raises(InvalidArgument, match="cache_max: '-1' is not a size"):
        resolve(Path("/r"), None, file)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("secret = 1\n", "unknown key 'secret'"),
        ('workers = "8"\n', "workers has the wrong type"),
        ("workers = true\n", "workers has the wrong type"),
        ("root = [\n", "not valid TOML"),
        ("workers = 1\n", "workers must be >= 2"),
        ("grace_period = -1\n", "grace_period must be >= 0"),
    ],
)
def test_bad_config_is_one_invalid_argument(tmp_path: Path, text: str, says: str) -> None:
    file = tmp_path / "ckfsd.toml"
    file.write_text(text)
    with pytest.raises(InvalidArgument, match=says):
        resolve(None, None, file)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="No such file"):
        load_config(tmp_path / "absent.toml")


def test_default_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_address() == "unix:///run/ckfs/ckfsd.sock"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_socket() == Path("/run/user/1000/ckfs/ckfsd.sock")
    # Never a guessable name in a shared directory: the user's own state dir.
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/u")
    assert default_socket() == Path("/home/u/.local/state/ckfs/ckfsd.sock")


def test_addresses() -> None:
    assert socket_path("unix:///run/x.sock") == Path("/run/x.sock")
    assert socket_path("unix:/run/x.sock") == Path("/run/x.sock")
    assert socket_path("/run/x.sock") == Path("/run/x.sock")
    with pytest.raises(ValueError, match="unix sockets only"):
        socket_path("tcp://127.0.0.1:1")


def test_a_held_lock_names_its_holder(tmp_path: Path) -> None:
    fd = listen.hold(tmp_path / "locks" / "ckfsd", "busy")
    try:
        with pytest.raises(Unavailable, match=rf"^busy \(pid {os.getpid()}\)$"):
            listen.hold(tmp_path / "locks" / "ckfsd", "busy")
    finally:
        listen.release(fd)
    listen.release(listen.hold(tmp_path / "locks" / "ckfsd", "busy"))


def test_claim_tells_stale_live_and_foreign_apart(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    listen.release(listen.claim(path))  # nothing there yet
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        assert not listen.socket_answers(path)  # bound, not listening: stale
        listen.release(listen.claim(path))
        live.listen()
        assert listen.socket_answers(path)
        with pytest.raises(Unavailable, match="another program listens"):
            listen.claim(path)
    assert path.exists() and not listen.socket_answers(path)  # its listener closed
    listen.release(listen.claim(path))
    path.unlink()
    path.write_text("precious")
    with pytest.raises(FailedPrecondition, match="is not a socket"):
        listen.claim(path)
    assert path.read_text() == "precious"


def test_recover_removes_only_unlocked_extract_snapshots(tmp_path: Path) -> None:
    state = State(tmp_path)
    try:
        sn = state.snapshotter("native")
        free, held = Digest.from_hex("sha256", "a" * 64), Digest.from_hex("sha256", "b" * 64)
        sn.prepare(f"extract-1-x {free}", "")
        sn.prepare(f"extract-2-y {held}", "")
        sn.prepare("extract-but-no-chain-id", "")
        sn.prepare("mine", "")

        async def recover_while_unpacking() -> list[str]:
            # The lock an unpack really takes, so both sides name the same file.
            async with unpack.layer_lock(state.lock_dir, held):
                return recover(state)

        removed = trio.run(recover_while_unpacking)
        assert removed == [f"native snapshot 'extract-1-x {free}'"]
        names = sorted(info.name for info in sn.walk([]))
        assert names == [f"extract-2-y {held}", "extract-but-no-chain-id", "mine"]
        # overlayfs was never used on this root: recovery created nothing for it.
        assert not (tmp_path / "snapshots" / "overlayfs").exists()
    finally:
        state.close()


@pytest.mark.parametrize(("cls", "add_to_server"), SERVICES, ids=lambda x: x.__name__)
def test_every_rpc_method_of_a_service_is_one_of_its_service(
    cls: type, add_to_server: AddToServer
) -> None:
    """A misspelt method would leave its RPC UNIMPLEMENTED without a word."""
    rpcs = {rpc for table in generated_handlers(add_to_server).values() for rpc in table}
    methods = {name for name in vars(cls) if name[:1].isupper() and callable(vars(cls)[name])}
    assert methods and methods <= rpcs, sorted(methods - rpcs)


def test_ready_is_grpcs_http2_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real grpc server answers the readiness probe; a socket that accepts but
    never speaks HTTP/2 does not, and the wait ends at its bound."""
    from concurrent import futures

    import grpc

    from ckfsd import daemon

    path = tmp_path / "grpc.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_insecure_port(f"unix://{path}")
    server.start()
    try:
        daemon._wait_answers(path)
    finally:
        server.stop(None).wait()

    mute = tmp_path / "mute.sock"
    monkeypatch.setattr(daemon, "READY_TIMEOUT", 0.2)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(mute))
        s.listen()  # accepts (the kernel's backlog), never answers
        with pytest.raises(Unavailable, match=r"mute\.sock did not answer within"):
            daemon._wait_answers(mute)
