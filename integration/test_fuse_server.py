"""The FUSE serving process, mounted for real (root, /dev/fuse, overlayfs).

Layers are uncompressed tars in the content store with their indexes; the
real server (`snapshotters.fuse.server`, started detached by
`snapshotters.fuse.process.ensure_server`) serves them, and every test
stops it by its PID at teardown (and `mount_guard` detaches anything left).
Checked: the layer directories stack as kernel overlayfs lowerdirs with
whiteouts and opaque directories honoured and writes landing in the upper
dir; attributes equal those of the same layer applied to disk by the eager
applier; hardlinks share an inode; inode numbers survive a restart; a
``kill -9`` of the server is detected and recovered; merged views; EROFS;
modes enforced for other users.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckfs import mediatypes
from ckfs.archive.apply import ApplyOptions, apply_layer
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, from_bytes
from ckfs.layerindex.cache import HEADER, ChunkCache
from ckfs.layerindex.model import IndexWriter
from ckfs.layerindex.store import IndexStore, dirname
from ckfs.layerindex.tarindex import build_tar_index
from ckfs.mount import Mount, is_mountpoint, is_stale
from integration.mounts import MountGuard
from integration.registry import Registry
from snapshotters.fuse.process import ServerPaths, ensure_server, server_pid, stop_server
from snapshotters.fuse.server import READ_AHEAD_KB
from tests import treecmp
from tests.tarbuild import B, C, D, F, H, L, P, W, tar

pytestmark = [pytest.mark.root]

CAP = b"\x01\x00\x00\x02" + b"\x00" * 16  # security.capability v2, no bits

#: Every kind of entry a layer may hold, setuid/setgid/sticky, owners,
#: xattrs, hardlinks; every directory explicit (implied ones have no times).
BASE = [
    D("bin", mode=0o755),
    F("bin/su", b"#!/bin/sh\necho su\n", mode=0o4755, uid=0, gid=0),
    F("bin/sg", b"sg", mode=0o2711, uid=1000, gid=50),
    H("bin/su-link", "bin/su"),
    L("bin/sh", "busybox"),
    F("bin/ping", b"ping", mode=0o755, xattrs={"security.capability": CAP}),
    D("tmp", mode=0o1777),
    D("dev", mode=0o755),
    C("dev/null", 1, 3),
    B("dev/loop0", 7, 0),
    P("dev/fifo", mode=0o600),
    D("etc", mode=0o755),
    F("etc/a", b"A1"),
    F("etc/b", b"B"),
    F("etc/secret", b"root only", mode=0o600),
    F("etc/big", os.urandom(300_000)),
    D("opq", mode=0o755),
    F("opq/old", b"old"),
    D("home", mode=0o755, uid=1000, gid=1000),
    F("home/note", b"note", uid=1000, gid=1000, xattrs={"user.k": b"v"}),
]

TOP = [
    D("etc", mode=0o755),
    F("etc/a", b"A2"),
    W("etc/.wh.b"),
    W("etc/.wh.gone"),  # in no layer below: stays a whiteout in one merged tar
    D("opq", mode=0o700),
    W("opq/.wh..wh..opq"),
    F("opq/new", b"new"),
]


#: Span size of the layers' indexes: small, so one small file's read from a
#: registry fetches a fraction of the blob.
SPAN = 64 << 10


def add_layer(root: Path, raw: bytes, *, ref: str = "") -> Digest:
    """Index the tar *raw* as a layer (ckfs's tar index source); its digest.

    The blob goes into the content store, or with *ref* (where a registry
    holds it) stays out, to be read by range.
    """
    digest = from_bytes(raw)
    if not ref:
        blob = root / "content" / "blobs" / digest.algorithm / digest.hex
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(raw)
    path = IndexStore(root).path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    desc = Descriptor(mediatypes.OCI_LAYER, digest, len(raw))
    writer = IndexWriter.for_layer(path, desc, source="tar", meta={"ref": ref} if ref else None)
    build_tar_index(io.BytesIO(raw), writer, span=SPAN).close()
    return digest


@pytest.fixture
def root(tmp_path: Path, mount_guard: MountGuard) -> Iterator[Path]:
    """A state root whose server is stopped (by PID) at teardown."""
    r = tmp_path / "root"
    r.mkdir()
    yield r
    stop_server(r)
    assert not is_mountpoint(ServerPaths(r).mnt)


def test_layers_stack_as_overlay_lowerdirs(root: Path, mount_guard: MountGuard) -> None:
    base = add_layer(root, tar(*BASE))
    top = add_layer(root, tar(*TOP))
    mnt = ensure_server(root)
    work, upper = root.parent / "work", root.parent / "upper"
    work.mkdir()
    upper.mkdir()
    lower = f"{mnt / dirname(top)}:{mnt / dirname(base)}"
    options = (f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}", "index=off")
    target = mount_guard.mount([Mount("overlay", "overlay", "", options)], root.parent / "rootfs")

    assert (target / "etc/a").read_bytes() == b"A2"
    assert not (target / "etc/b").exists()
    assert sorted(os.listdir(target / "etc")) == ["a", "big", "secret"]
    assert os.listdir(target / "opq") == ["new"]
    assert stat.S_IMODE(os.lstat(target / "opq").st_mode) == 0o700
    assert (target / "bin/su").read_bytes() == b"#!/bin/sh\necho su\n"
    assert (target / "etc/big").read_bytes() == (mnt / dirname(base) / "etc/big").read_bytes()

    # Writes go to the upper directory; the layers do not change.
    (target / "etc/new").write_text("written")
    (target / "etc/a").write_text("changed")
    os.unlink(target / "bin/sg")
    assert (upper / "etc/new").read_text() == "written"
    assert (upper / "etc/a").read_text() == "changed"
    assert stat.S_ISCHR(os.lstat(upper / "bin/sg").st_mode)
    assert (mnt / dirname(top) / "etc/a").read_bytes() == b"A2"
    assert (mnt / dirname(base) / "bin/sg").exists()
    mount_guard.unmount(target)


def test_attributes_equal_the_applied_layer(root: Path, tmp_path: Path) -> None:
    raw = tar(*BASE, *TOP)  # one layer with whiteout and opaque markers too
    digest = add_layer(root, raw)
    applied = tmp_path / "applied"
    applied.mkdir()
    apply_layer(
        applied,
        io.BytesIO(raw),
        media_type=None,
        diff_id=None,
        options=ApplyOptions(whiteouts="overlay"),
    )
    served = ensure_server(root) / dirname(digest)
    # The root's attributes are the mount's, not the layer's; mtimes count,
    # except a whiteout's (the applier makes it now; nothing reads it).
    ours, theirs = treecmp.snapshot(served), treecmp.snapshot(applied)
    treecmp.assert_same(ours, theirs, ignore=(), paths=lambda p: p not in (".", "etc/gone"))
    treecmp.assert_same(ours, theirs, paths=lambda p: p == "etc/gone")
    su, link = os.lstat(served / "bin/su"), os.lstat(served / "bin/su-link")
    on_disk = os.lstat(applied / "bin/su")
    assert su.st_ino == link.st_ino and su.st_nlink == link.st_nlink == 2
    assert (su.st_mode, su.st_size, su.st_blocks) == (on_disk.st_mode, on_disk.st_size, 1)
    null = os.lstat(served / "dev/null")
    assert null.st_rdev == os.makedev(1, 3) == os.lstat(applied / "dev/null").st_rdev
    # Directories count their subdirectories, as on disk.
    assert os.lstat(served / "etc").st_nlink == os.lstat(applied / "etc").st_nlink
    # The whiteout is overlayfs's; the opaque directory carries its xattr.
    wh = os.lstat(served / "etc/gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(served / "opq", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(served / "bin/ping", "security.capability") == CAP
    with pytest.raises(OSError) as e:
        os.getxattr(served / "bin/su", "user.none")
    assert e.value.errno == errno.ENODATA


def test_read_only_and_modes_enforced(root: Path) -> None:
    digest = add_layer(root, tar(*BASE))
    layer = ensure_server(root) / dirname(digest)
    for attempt in (
        lambda: os.open(layer / "etc/a", os.O_WRONLY),
        lambda: os.open(layer / "etc/new", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: os.unlink(layer / "etc/a"),
        lambda: os.mkdir(layer / "d"),
        lambda: os.chmod(layer / "etc/a", 0o777),
        lambda: os.setxattr(layer / "etc/a", "user.x", b"1"),
    ):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    # allow_other + default_permissions: another user reads what the modes
    # allow. It gets the layer directory as an open descriptor: the test's
    # temporary directories above it are root's alone.
    fd = os.open(layer, os.O_PATH | os.O_DIRECTORY)
    try:
        as_user = ["setpriv", "--reuid=1234", "--regid=1234", "--clear-groups", "cat"]

        def cat(path: str) -> subprocess.CompletedProcess[bytes]:
            where = f"/proc/self/fd/{fd}/{path}"
            return subprocess.run([*as_user, where], capture_output=True, pass_fds=(fd,))

        ok = cat("etc/a")
        assert ok.returncode == 0 and ok.stdout == b"A1", ok.stderr
        denied = cat("etc/secret")
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
    finally:
        os.close(fd)


def test_merged_view(root: Path) -> None:
    base = add_layer(root, tar(*BASE))
    top = add_layer(root, tar(*TOP))
    views = ServerPaths(root).views
    views.mkdir(parents=True)
    (views / "img.json").write_text(json.dumps({"layers": [base, top]}))
    mnt = ensure_server(root)
    view = mnt / "merged" / "img"
    assert (view / "etc/a").read_bytes() == b"A2"
    assert sorted(os.listdir(view / "etc")) == ["a", "big", "secret"]
    assert os.listdir(view / "opq") == ["new"]
    assert os.listxattr(view / "opq") == []
    # A view's file is its layer's inode; its directories are its own.
    assert os.lstat(view / "bin/su").st_ino == os.lstat(mnt / dirname(base) / "bin/su").st_ino
    assert os.lstat(view / "etc").st_ino != os.lstat(mnt / dirname(base) / "etc").st_ino


def inode_numbers(mnt: Path, digest: Digest) -> dict[str, int]:
    layer = mnt / dirname(digest)
    return {str(p.relative_to(layer)): os.lstat(p).st_ino for p in sorted(layer.rglob("*"))}


def test_inode_numbers_survive_a_restart(root: Path) -> None:
    digest = add_layer(root, tar(*BASE))
    mnt = ensure_server(root)
    before = inode_numbers(mnt, digest)
    first = server_pid(ServerPaths(root))
    assert stop_server(root)
    mnt = ensure_server(root)
    assert server_pid(ServerPaths(root)) != first
    assert inode_numbers(mnt, digest) == before
    assert len(set(before.values())) == len(before) - 1  # su and su-link


def test_kill_9_is_detected_and_recovered(root: Path) -> None:
    digest = add_layer(root, tar(*BASE))
    paths = ServerPaths(root)
    mnt = ensure_server(root)
    pid = server_pid(paths)
    assert pid and ensure_server(root) == mnt and server_pid(paths) == pid  # adopted
    os.kill(pid, signal.SIGKILL)
    # The root's attributes are cached for ROOT_ATTR_TIMEOUT; then a stat
    # reaches the dead server.
    deadline = time.monotonic() + 10
    while not is_stale(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server_pid(paths) is None and is_stale(mnt)
    with pytest.raises(OSError) as e:
        os.listdir(mnt / dirname(digest))
    assert e.value.errno == errno.ENOTCONN
    assert ensure_server(root) == mnt
    assert server_pid(paths) not in (None, pid)
    assert not is_stale(mnt)
    assert (mnt / dirname(digest) / "etc/a").read_bytes() == b"A1"


def test_a_dying_server_is_waited_for(root: Path) -> None:
    """A killed server's connection can go before its lock: not adopted."""
    digest = add_layer(root, tar(*BASE))
    paths = ServerPaths(root)
    mnt = ensure_server(root)
    pid = server_pid(paths)
    assert pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not (is_stale(mnt) and server_pid(paths) is None) and time.monotonic() < deadline:
        time.sleep(0.05)
    # The dead server's lock, held a little longer (by flock(1) here).
    holder = subprocess.Popen(["flock", str(paths.lock), "sleep", "1"])
    try:
        while server_pid(paths) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server_pid(paths) == pid  # looks alive: locked, its PID on file
        assert ensure_server(root) == mnt
        assert holder.poll() == 0  # waited for the lock to go
    finally:
        holder.wait()
    assert server_pid(paths) not in (None, pid)
    assert (mnt / dirname(digest) / "etc/a").read_bytes() == b"A1"


def remote_layer(root: Path, registry: Registry) -> tuple[bytes, Digest]:
    """The layer of BASE in *registry* only, indexed in *root*: its tar and digest."""
    raw = tar(*BASE)
    registry.upload_blob("fuse/lazy", raw)
    return raw, add_layer(root, raw, ref=f"{registry.host}/fuse/lazy")


def test_remote_layer_is_read_lazily_and_cached(
    root: Path, registry_factory: Callable[..., Registry]
) -> None:
    raw, digest = remote_layer(root, registry_factory())
    layer = ensure_server(root) / dirname(digest)
    assert (layer / "etc/a").read_bytes() == b"A1"
    cached = [p for p in (root / "cache").rglob("*") if p.is_file()]
    # One small file: one or two spans fetched, verified and kept.
    assert 1 <= len(cached) <= 2
    assert sum(p.stat().st_size for p in cached) < len(raw) // 2
    assert (layer / "etc/big").read_bytes() == tar_member(raw, "etc/big")
    # The rest of the tree reads back whole, from registry or cache.
    for path in ("bin/su", "home/note", "bin/sg"):
        assert (layer / path).read_bytes() == tar_member(raw, path)
    # The server's counters for `ckfs mounts ls`, written while they change
    # and when it stops.
    stats = ServerPaths(root).stats
    deadline = time.monotonic() + 10
    while not stats.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    stop_server(root)
    counters = json.loads(stats.read_text())["layers"][str(digest)]
    assert 0 < counters["fetched"] <= len(raw) and counters["misses"] >= 2


def test_the_chunk_cache_stays_within_its_bound(
    root: Path, registry_factory: Callable[..., Registry]
) -> None:
    raw, digest = remote_layer(root, registry_factory())
    bound = 3 * (HEADER + SPAN)
    layer = ensure_server(root, cache_max=bound) / dirname(digest)
    big = tar_member(raw, "etc/big")  # about five spans
    for _ in range(2):  # the second time from the server again, not the page cache
        with open(layer / "etc/big", "rb") as f:
            assert f.read() == big
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert ChunkCache(root / "cache").usage().size <= bound
    for path in ("bin/su", "home/note", "etc/a"):  # evicted or not, read right
        assert (layer / path).read_bytes() == tar_member(raw, path)


def test_the_cache_bound_reaches_a_server_the_snapshotter_starts(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CKFS_CACHE_MAX`` (or ckfsd's ``--cache-max``, given as State's option) is its bound."""
    from ckfs.state import CACHE_MAX_ENV, State
    from snapshotters.fuse.snapshotter import FuseSnapshotter

    monkeypatch.setenv(CACHE_MAX_ENV, "2MiB")
    state = State(root)
    try:
        sn = state.snapshotter("fuse")
        assert isinstance(sn, FuseSnapshotter)
        sn.serve()
    finally:
        state.close()
    pid = server_pid(ServerPaths(root))
    assert pid is not None
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert command[command.index(b"--cache-max") + 1] == str(2 << 20).encode()


def tar_member(raw: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        f = tf.extractfile(name)
        assert f is not None
        return f.read()


def test_a_failing_read_is_eio_and_the_mount_lives(root: Path) -> None:
    broken = add_layer(root, tar(F("lost", b"bytes"), F("also", b"more")))
    fine = add_layer(root, tar(F("kept", b"kept")))
    mnt = ensure_server(root)
    # The blob is cut short under the server.
    os.truncate(root / "content" / "blobs" / broken.algorithm / broken.hex, 100)
    with pytest.raises(OSError) as e:
        (mnt / dirname(broken) / "lost").read_bytes()
    assert e.value.errno == errno.EIO
    assert (mnt / dirname(fine) / "kept").read_bytes() == b"kept"
    assert os.listdir(mnt / dirname(broken)) == ["also", "lost"]
    log = ServerPaths(root).log.read_text()
    assert f"read layer {broken} path /lost: " in log


def test_sequential_reads_arrive_in_large_requests(root: Path) -> None:
    """The mount's read-ahead is raised, so the kernel asks for up to 1 MiB
    per request (libfuse's largest) instead of its default 128 KiB."""
    data = os.urandom(8 << 20)
    digest = add_layer(root, tar(F("big", data)))
    mnt = ensure_server(root)
    st = os.stat(mnt)  # answered: the INIT before it was, and what follows it
    bdi = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    assert int(bdi.read_text()) == READ_AHEAD_KB
    with open(mnt / dirname(digest) / "big", "rb", buffering=0) as f:
        assert b"".join(iter(lambda: f.read(128 << 10), b"")) == data
    stop_server(root)
    served = re.search(r"requests served: .*'read': (\d+)", ServerPaths(root).log.read_text())
    assert served and int(served.group(1)) <= 16  # 64 at 128 KiB each


def test_the_server_outlives_its_starter(root: Path) -> None:
    digest = add_layer(root, tar(*BASE))
    starter = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from snapshotters.fuse.process import ensure_server; "
            "print(ensure_server(Path(sys.argv[1])))",
            str(root),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    mnt = Path(starter.stdout.strip())
    assert (mnt / dirname(digest) / "etc/a").read_bytes() == b"A1"
    pid = server_pid(ServerPaths(root))
    assert pid
    # Its starter has exited; it leads its own session, and is adopted.
    assert os.getsid(pid) == pid != os.getsid(0)
    assert ensure_server(root) == mnt and server_pid(ServerPaths(root)) == pid


def test_setuid_runs_setuid_through_overlay(root: Path, mount_guard: MountGuard) -> None:
    """The FUSE mount is nosuid (libfuse's default); exec checks overlay's mount."""
    digest = add_layer(root, tar(F("id", Path("/usr/bin/id").read_bytes(), mode=0o4755)))
    mnt = ensure_server(root)
    work, upper = root.parent / "work", root.parent / "upper"
    work.mkdir()
    upper.mkdir()
    options = (f"lowerdir={mnt / dirname(digest)}", f"upperdir={upper}", f"workdir={work}")
    target = mount_guard.mount([Mount("overlay", "overlay", "", options)], root.parent / "rootfs")
    fd = os.open(target, os.O_PATH | os.O_DIRECTORY)
    try:
        as_user = ["setpriv", "--reuid=1234", "--regid=1234", "--clear-groups"]
        run = [*as_user, f"/proc/self/fd/{fd}/id"]
        out = subprocess.run(run, capture_output=True, text=True, pass_fds=(fd,), check=True)
    finally:
        os.close(fd)
    assert "uid=1234" in out.stdout and "euid=0(root)" in out.stdout
    mount_guard.unmount(target)
