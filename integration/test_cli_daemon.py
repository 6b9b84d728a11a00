"""The CLI through a real ckfsd: the same words as without it, in a light process.

The behavioural CLI tests run both ways (`integration.conftest.BOTH_FACES`);
here the two faces are compared with each other on one root, command by
command, and what only the daemon face has is checked: the client process
loads no event loop, HTTP stack or store, ``--no-daemon`` wins over
``CKFS_ADDRESS``, and a named daemon that is gone is one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckfs.mount import is_mountpoint
from integration.conftest import EXAMPLE_NAME, Ckfs
from integration.daemon import Daemon, running_ckfsd, start, stop
from integration.mounts import MountGuard
from integration.registry import EXAMPLE_REPO, Registry


@pytest.fixture
def faces(tmp_path: Path, example_layout: Path) -> Iterator[tuple[Ckfs, Ckfs, Daemon]]:
    """The CLI on one root holding the example image: direct, through ckfsd, and the daemon."""
    root = tmp_path / "root"
    Ckfs(root).run("import", "--name", EXAMPLE_NAME, str(example_layout))
    with running_ckfsd(root) as daemon:
        yield Ckfs(root), Ckfs(root, daemon.address), daemon


def rpcs(daemon: Daemon) -> list[str]:
    """The RPCs the daemon logged, in order (one line each)."""
    return [line.split()[4] for line in daemon.log_text().splitlines() if " ckfs.services." in line]


#: Commands whose output does not depend on the clock, right and wrong.
SAME_WORDS = [
    ["images", "ls"],
    ["images", "ls", "--json"],
    ["images", "ls", "-q", "name~=busybox"],
    ["images", "inspect", "--json", EXAMPLE_NAME],
    ["images", "inspect", "alpine"],
    ["images", "ls", "name=="],
    ["images", "rm", "nope", "example.local/nope"],
    ["content", "ls", "--json"],
    ["content", "ls", "-q", "size>1000"],
    ["content", "get", "sha256:" + "0" * 64],
    ["content", "get", "sha256:abc"],
    ["content", "active", "--json"],
    ["content", "abort", "nope"],
    ["snapshots", "ls", "--json"],
    ["snapshots", "-s", "zfs", "ls"],
    ["snapshots", "info", "nope"],
    ["rootfs", "--json", "--key", "k", "--offline", "example.local/nope"],
    ["pull", "--json", "--offline", "example.local/nope"],
    ["pull", "--timeout", "0", "example.local/nope"],
    ["pull", "--max-blob-size", "0", "example.local/nope"],
    ["rootfs", "--key", "z", "--max-blob-size", "0kB", "example.local/nope"],
    ["mount", "--platform", "no/such/platform/x", "example.local/nope", "/nonexistent/x"],
    ["gc", "--dry-run", "--json"],
]


def test_both_faces_say_the_same(faces: tuple[Ckfs, Ckfs, Daemon]) -> None:
    local, remote, daemon = faces
    for args in SAME_WORDS:
        here, there = local.run(*args, check=False), remote.run(*args, check=False)
        assert (there.returncode, there.stdout, there.stderr) == (
            here.returncode,
            here.stdout,
            here.stderr,
        ), args
    called = set(rpcs(daemon))
    assert {"/ckfs.v1.Ckfs/GC", "/containerd.services.images.v1.Images/List"} <= called
    assert "/containerd.services.content.v1.Content/List" in called


def test_rootfs_mount_gc_umount_through_ckfsd(
    faces: tuple[Ckfs, Ckfs, Daemon], tmp_path: Path, mount_guard: MountGuard
) -> None:
    local, remote, daemon = faces
    out = json.loads(remote.run("rootfs", "--json", "--key", "r", "--ro", EXAMPLE_NAME).stdout)
    assert out["key"] == "r" and out["mounts"]
    target = tmp_path / "mnt"
    remote.run("mount", EXAMPLE_NAME, str(target))
    assert is_mountpoint(target) and (target / "bin/busybox").exists()
    refused = remote.fails("mount", EXAMPLE_NAME, str(target))
    assert refused == local.fails("mount", EXAMPLE_NAME, str(target))

    kept = json.loads(remote.run("gc", "--json").stdout)
    assert (kept["blobs"], kept["snapshots"]) == ([], {})  # the image and both snapshots hold
    remote.run("umount", str(target))
    assert not is_mountpoint(target)
    assert remote.fails("umount", str(target)) == local.fails("umount", str(target))
    names = {i["name"] for i in json.loads(remote.run("snapshots", "ls", "--json").stdout)}
    assert "r" in names and not any(n.startswith("mount:") for n in names)
    # The mount was lazy: the root's FUSE server stays (the conftest sweep stops it).
    assert mount_guard.leftovers() == [str(remote.root / "fuse" / "mnt")]
    called = rpcs(daemon)
    # The refused mount is refused here: the target is a mountpoint, no RPC.
    assert called.count("/ckfs.v1.Ckfs/Mounts") == 2 and "/ckfs.v1.Ckfs/Unmount" in called


#: Modules a client-only run must not load (the `snapshotters` package itself
#: is only the registry of names the CLI's --snapshotter offers: its
#: implementations are what would be heavy).
HEAVY = ("trio", "httpx", "httpcore", "h11", "sqlite3", "snapshotters.base", "ckfs.content")
HEAVY += ("ckfs.images", "ckfs.metadata.db", "ckfs.remotes.walk", "ckfs.state", "ckfs.unpack")
HEAVY += ("snapshotters.overlay", "snapshotters.native", "snapshotters.storage")
HEAVY += ("ckfs.api.convert", "ckfs.snapshots", "ckfs.api.services.snapshots")

_PROBE = """
import sys
from ckfs_cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
heavy = HEAVY
loaded = [m for m in sys.modules if m in heavy or m.startswith(tuple(h + "." for h in heavy))]
print(sorted(loaded), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["pull", "-q", "REGISTRY/" + EXAMPLE_REPO],
        ["pull", "REGISTRY/" + EXAMPLE_REPO],
        ["fetch", "--json", "REGISTRY/" + EXAMPLE_REPO],
        ["rootfs", "--key", "light", "REGISTRY/" + EXAMPLE_REPO],
        ["gc", "--dry-run"],
    ],
    ids=["pull-quiet", "pull", "fetch-json", "rootfs", "gc"],
)
def test_a_client_run_loads_no_loop_http_or_store(
    registry: Registry, tmp_path: Path, args: list[str]
) -> None:
    args = [a.replace("REGISTRY", registry.host) for a in args]
    root = tmp_path / "root"
    with running_ckfsd(root) as daemon:
        face = ["--root", str(root), "--address", daemon.address]
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE.replace("HEAVY", repr(HEAVY)), *face, *args],
            capture_output=True,
            text=True,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr


def test_ckfsd_on_a_root_and_ckfs_on_it_find_each_other(
    tmp_path: Path, example_layout: Path
) -> None:
    """``ckfsd --root X`` by hand and ``ckfs --root X``: neither is told a socket."""
    root = tmp_path / "root"
    Ckfs(root).run("import", "--name", EXAMPLE_NAME, str(example_layout))
    daemon = start(root, None, tmp_path / "ckfsd.log")
    try:
        assert daemon.socket.is_socket()
        assert Ckfs(root).run("images", "ls", "-q").stdout.split() == [EXAMPLE_NAME]
        assert rpcs(daemon)[-1] == "/containerd.services.images.v1.Images/List"
    finally:
        stop(daemon.process)


def test_a_daemon_of_another_root_is_refused(
    faces: tuple[Ckfs, Ckfs, Daemon], tmp_path: Path
) -> None:
    _, _, daemon = faces
    line = Ckfs(tmp_path / "other", daemon.address).fails("images", "ls")
    assert line == (
        f"ckfs: ckfsd at {daemon.address} serves another state root than {tmp_path / 'other'} "
        "(give the root it serves, or --no-daemon)"
    )
    assert rpcs(daemon) == ["/containerd.services.introspection.v1.Introspection/Server"]


def test_no_daemon_wins_over_the_address(
    faces: tuple[Ckfs, Ckfs, Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    local, _, daemon = faces
    monkeypatch.setenv("CKFS_ADDRESS", daemon.address)
    assert local.run("--no-daemon", "images", "ls", "-q").stdout.split() == [EXAMPLE_NAME]
    assert rpcs(daemon) == []
    assert local.run("images", "ls", "-q").stdout.split() == [EXAMPLE_NAME]  # the env: ckfsd
    assert rpcs(daemon)[-1] == "/containerd.services.images.v1.Images/List"


def test_a_named_daemon_that_is_gone_is_one_line(tmp_path: Path) -> None:
    with running_ckfsd(tmp_path / "root") as daemon:
        address = daemon.address
    line = Ckfs(tmp_path / "root", address).fails("images", "ls")
    assert line.startswith(f"ckfs: ckfsd at {address} does not answer: ")


def test_a_hosts_dir_through_ckfsd_is_refused(
    faces: tuple[Ckfs, Ckfs, Daemon], tmp_path: Path
) -> None:
    """ckfsd reads only its own registry configuration: a caller's hosts.toml never reaches it."""
    from ckfs.options import DAEMON_HOSTS_DIRS

    _, remote, daemon = faces
    certs = str(tmp_path / "certs.d")
    for args in (
        ["pull", "--hosts-dir", certs, EXAMPLE_NAME],
        ["fetch", "--hosts-dir", certs, EXAMPLE_NAME],
        ["rootfs", "--key", "h", "--hosts-dir", certs, EXAMPLE_NAME],
    ):
        assert remote.fails(*args) == f"ckfs: {DAEMON_HOSTS_DIRS}", args
    assert not any(r.startswith("/ckfs.v1.") for r in rpcs(daemon))


def test_a_pull_read_to_its_end_is_logged_ok(registry: Registry, tmp_path: Path) -> None:
    """The client reads the Pull stream past its summary: leaving early cancels the call.

    The client is closed the moment `Client.pull` returns, as a ``ckfs``
    process exits: had it stopped reading at the summary, the daemon would
    still be finishing the stream and log the pull CANCELLED.
    """
    from ckfs.client import Client, pull_options

    ref = f"{registry.host}/{EXAMPLE_REPO}"
    with running_ckfsd(tmp_path / "root") as daemon:
        for _ in range(4):  # the first fetches, the rest find it present
            client = Client.connect(daemon.address)
            try:
                client.pull(ref, register=True, options=pull_options(), on_event=lambda p: None)
            finally:
                client.close()
        log = daemon.log_text()
    pulls = [line.split()[4:6] for line in log.splitlines() if "/Pull " in line]
    assert pulls == [["/ckfs.v1.Ckfs/Pull", "OK"]] * 4, log
