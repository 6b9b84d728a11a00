"""ckfsd on the lazy path: started by ``ckfs mount``, restarted under live mounts.

- ``ckfs mount`` (fuse) with no ckfsd answering for its root starts one in
  the background (log ``<root>/ckfsd.log``, socket `ckfs.client.root_address`)
  and returns once the rootfs answers; later commands on that root find it;
  ``--no-daemon`` starts none.
- The FUSE server is its own process: ckfsd killed -9 or stopped with
  SIGTERM takes no mount down, and a process reading from a lazy rootfs
  (an open file and new lookups, bytes not fetched yet) keeps reading while
  no ckfsd runs; the restarted ckfsd adopts the server and leaves the
  healthy mount alone.
- If the FUSE server died too, ckfsd's start brings the mount back at its
  target (`ckfsd.recover.recover_fuse`).

Every ckfsd is stopped by its PID (the fixtures here, or conftest's teardown
for the one ``ckfs mount`` started); the FUSE servers by conftest's.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckfs.client import root_address
from ckfs.mount import is_mountpoint
from integration.conftest import Ckfs
from integration.daemon import Daemon, socket_dir, start, stop
from integration.estargz import CHUNK_SIZE, EstargzImage
from integration.mounts import MountGuard

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: FUSE and overlay mounts"),
]

#: /etc/os-release of the estargz test image's top (its middle layer's).
OS_RELEASE = b'NAME="ckfs test"\nID=ckfs\nVERSION=2\n'

#: The test image's multi-chunk file, read in pieces around a ckfsd kill.
BIG = "usr/share/big.bin"


def daemon_pid(root: Path) -> int | None:
    """The PID of the ckfsd holding *root* (its lock file's), if that process lives."""
    try:
        pid = int((root / "locks" / "ckfsd").read_text())
    except (OSError, ValueError):
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None


def fuse_pid(root: Path) -> int:
    return int((root / "fuse" / "server.pid").read_text())


def test_ckfs_mount_starts_ckfsd_for_its_root(
    estargz_image: EstargzImage, tmp_path: Path, mount_guard: MountGuard
) -> None:
    root, target = tmp_path / "root", tmp_path / "rootfs"
    ckfs = Ckfs(root)
    ckfs.run("mount", estargz_image.ref, str(target))
    assert is_mountpoint(target)
    assert (target / "etc/os-release").read_bytes() == OS_RELEASE

    pid = daemon_pid(root)
    assert pid is not None, "no ckfsd holds the root"
    log = (root / "ckfsd.log").read_text()
    socket = root_address(root).removeprefix("unix://")
    assert f"serving {root} on unix://{socket} (pid {pid})" in log
    # Its Mounts RPC made the snapshot; later commands on the root go through it.
    assert "/ckfs.v1.Ckfs/Mounts OK" in log or "Ckfs/Mounts OK" in log, log
    ckfs.run("images", "ls")
    assert "Images/List OK" in (root / "ckfsd.log").read_text()
    # A second mount finds it: no second daemon.
    ckfs.run("mount", estargz_image.ref, str(tmp_path / "second"))
    assert daemon_pid(root) == pid
    assert (tmp_path / "second/app/run.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    for t in (target, tmp_path / "second"):
        ckfs.run("umount", str(t))

    # --no-daemon never starts one (nor does a daemonless command find a socket).
    other = Ckfs(tmp_path / "other")
    other.run("--no-daemon", "mount", estargz_image.ref, str(tmp_path / "third"))
    assert daemon_pid(other.root) is None
    assert not (other.root / "ckfsd.log").exists()
    other.run("umount", str(tmp_path / "third"))


@pytest.fixture
def daemon_on(tmp_path: Path) -> Iterator[tuple[Path, Path, list[Daemon]]]:
    """A root and a socket for ckfsds started and restarted by the test; all stopped by PID."""
    started: list[Daemon] = []
    with socket_dir() as sockets:
        try:
            yield tmp_path / "root", sockets, started
        finally:
            for d in started:
                stop(d.process)


def restart(root: Path, sockets: Path, started: list[Daemon]) -> Daemon:
    d = start(root, sockets / "ckfsd.sock", sockets / "ckfsd.log")
    started.append(d)
    return d


READER = r"""
import hashlib, sys
f = open(sys.argv[1], "rb")
h = hashlib.sha256(f.read(int(sys.argv[2])))
print("started", flush=True)
sys.stdin.readline()                  # ckfsd is killed meanwhile
while chunk := f.read(65536):
    h.update(chunk)
print(h.hexdigest(), open(sys.argv[3], "rb").read().decode().strip(), flush=True)
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_reader_keeps_reading_while_ckfsd_restarts(
    estargz_image: EstargzImage,
    daemon_on: tuple[Path, Path, list[Daemon]],
    tmp_path: Path,
    mount_guard: MountGuard,
    how: signal.Signals,
) -> None:
    root, sockets, started = daemon_on
    daemon = restart(root, sockets, started)
    ckfs = Ckfs(root, daemon.address)
    target = tmp_path / "rootfs"
    ckfs.run("mount", estargz_image.ref, str(target))
    server = fuse_pid(root)

    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            READER,
            str(target / BIG),
            str(CHUNK_SIZE),
            str(target / "app/run.sh"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline() == "started\n"
        daemon.process.send_signal(how)
        daemon.process.wait(timeout=30)
        assert daemon_pid(root) is None
        # No ckfsd at all now: the rest of the file (not fetched yet) and a
        # new lookup are served by the FUSE server alone.
        reader.stdin.write("go\n")
        reader.stdin.flush()
        out, _ = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    big = hashlib.sha256(bytes(estargz_image_file(estargz_image, BIG))).hexdigest()
    assert out.split() == [big, "#!/bin/sh", "echo", "hi"]
    assert fuse_pid(root) == server and is_mountpoint(target)

    # The restarted ckfsd adopts the server and leaves the healthy mount alone.
    again = restart(root, sockets, started)
    assert "remounted" not in again.log_text()
    assert fuse_pid(root) == server
    assert (target / "etc/os-release").read_bytes() == OS_RELEASE
    Ckfs(root, again.address).run("umount", str(target))


def estargz_image_file(image: EstargzImage, path: str) -> bytes:
    """*path*'s bytes in the image's tars (the bottom layer holds the big file)."""
    import io
    import tarfile

    for layer in reversed(image.tars):
        with tarfile.open(fileobj=io.BytesIO(layer)) as t:
            try:
                member = t.getmember(path)
            except KeyError:
                continue
            f = t.extractfile(member)
            assert f is not None
            return f.read()
    raise KeyError(path)


def test_ckfsd_start_remounts_mounts_of_a_dead_fuse_server(
    estargz_image: EstargzImage,
    daemon_on: tuple[Path, Path, list[Daemon]],
    tmp_path: Path,
    mount_guard: MountGuard,
) -> None:
    root, sockets, started = daemon_on
    daemon = restart(root, sockets, started)
    target = tmp_path / "rootfs"
    Ckfs(root, daemon.address).run("mount", estargz_image.ref, str(target))
    stop(daemon.process)
    os.kill(fuse_pid(root), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:  # the overlay now stands on a dead FUSE mount
        try:
            (target / "etc/os-release").read_bytes()
        except OSError:
            break
        assert time.monotonic() < deadline, "the mount still answers"
        time.sleep(0.1)

    again = restart(root, sockets, started)
    assert f"fuse: remounted {target}" in again.log_text()
    assert (target / "etc/os-release").read_bytes() == OS_RELEASE
    assert (target / "app/run.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    Ckfs(root, again.address).run("umount", str(target))


def test_a_ckfsd_that_cannot_start_leaves_the_mount_to_the_cli(
    estargz_image: EstargzImage, tmp_path: Path, mount_guard: MountGuard
) -> None:
    root, target = tmp_path / "root", tmp_path / "rootfs"
    root.mkdir()
    (root / "ckfsd.sock").write_text("in the way")  # ckfsd refuses to replace it
    ckfs = Ckfs(root)
    proc = ckfs.run("mount", estargz_image.ref, str(target))
    assert "did not start" in proc.stderr and "going on without it" in proc.stderr
    assert daemon_pid(root) is None
    assert (target / "etc/os-release").read_bytes() == OS_RELEASE
    ckfs.run("--no-daemon", "umount", str(target))
