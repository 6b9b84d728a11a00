"""Container-written trees are as hostile as layers: removing and measuring them.

A container writes whatever it likes into its snapshot: directories 10,000
deep, paths far past ``PATH_MAX``, names with escape bytes or no valid
UTF-8, ``chmod 000`` directories, FIFOs, sockets, device nodes, links
pointing out of the tree. `snapshotters.storage.remove_dir` and
`disk_usage` (the usage walk at commit) must handle every one, leave
everything outside the tree alone, never enter a mount, and a tree that
cannot be removed must not stop gc from collecting the rest.

Every test here runs confined (``test_hostile`` in conftest's CONFINED): in a
forked child where only the temp directory is writable, so a removal that
escapes fails instead of deleting the host's files.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckfs import gc
from ckfs.archive.secure import CrossesMount, remove_all
from ckfs.snapshots import LayerDirs
from ckfs.state import State
from snapshotters.storage import disk_usage, remove_dir

#: Wall-time bound for one removal or walk of the largest tree (10,000
#: levels), generous for a loaded two-core machine: it takes well under a
#: second.
SLOW = 60.0

NAME_MAX = 255

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def opened(path: Path | str | bytes, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, _O_DIR, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def tidy(*dirs: Path) -> Iterator[None]:
    """Empty *dirs* when the test ends, pass or fail, while still confined.

    pytest removes old temp directories with ``shutil.rmtree``, which
    recurses: a 10,000-deep tree left behind breaks every later session.
    """
    try:
        yield
    finally:
        for d in dirs:
            with contextlib.suppress(OSError), opened(d) as fd:
                for name in os.listdir(fd):
                    with contextlib.suppress(OSError):
                        remove_all(fd, name)


def chain(top: Path, names: list[str | bytes], leaf: str | bytes = "leaf") -> int:
    """Directories *names* nested under *top*, a file *leaf* at the bottom; inodes made."""
    fd = os.open(top, _O_DIR)
    try:
        for n in names:
            os.mkdir(n, dir_fd=fd)
            nfd = os.open(n, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    return len(names) + 1


def deep(levels: int) -> Callable[[Path, Path], int]:
    def build(top: Path, outside: Path) -> int:
        return chain(top, ["d"] * levels)

    return build


def long_paths(top: Path, outside: Path) -> int:
    """~10 kB paths of 255-byte names, well past PATH_MAX (4096)."""
    made = chain(top, ["x" * NAME_MAX] * 40, "y" * NAME_MAX)
    # And one just past what a full-path walk could reach: ~4,030 bytes deep.
    return made + chain(top, ["p" * 250] * 16, "q" * 100)


def odd_names(top: Path, outside: Path) -> int:
    names: list[str | bytes] = [
        "\x1b]0;pwned\x07",
        "new\nline",
        b"\xff\xfe-not-utf8",
        "\u202eevil",
        " ",
        "-rf",
        "z" * NAME_MAX,
    ]
    made = 0
    for n in names:
        made += chain(top, [n], n)
    return made


def locked_modes(top: Path, outside: Path) -> int:
    made = chain(top, ["closed", "inner"])
    with opened(top / "closed") as fd:
        os.close(os.open("file", os.O_WRONLY | os.O_CREAT, 0o000, dir_fd=fd))
    os.chmod(top / "closed" / "inner", 0o000)
    os.chmod(top / "closed", 0o000)
    os.mkdir(top / "readonly")
    (top / "readonly" / "f").write_bytes(b"x")
    os.chmod(top / "readonly", 0o500)
    return made + 3


def specials(top: Path, outside: Path) -> int:
    os.mkfifo(top / "fifo")
    os.mknod(top / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(top / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    cwd = os.getcwd()
    os.chdir(top)  # a socket's path is limited to 108 bytes
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind("sock")
    finally:
        os.chdir(cwd)
    return 4


def links_out(top: Path, outside: Path) -> int:
    (top / "etc").symlink_to("/etc")
    (top / "up").symlink_to("../../../../../../..")
    (top / "out").symlink_to(outside)
    (top / "dir").mkdir()
    (top / "dir" / "loop").symlink_to("../dir")
    os.link(outside / "keep", top / "hardlink")
    return 6  # the hard link's inode is the outside file's: counted, not removed


TREES = {
    "1500-deep": deep(1500),
    "10000-deep": deep(10_000),
    "long-paths": long_paths,
    "odd-names": odd_names,
    "chmod-000": locked_modes,
    "special-files": specials,
    "links-out": links_out,
}


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the tree with a file that must survive."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "keep").write_bytes(b"keep me")
    return out


def intact(outside: Path) -> bool:
    return (outside / "keep").read_bytes() == b"keep me" and os.listdir(outside) == ["keep"]


@pytest.mark.parametrize(
    "kind",
    # 10,000 levels take several seconds to build on a loaded machine; 1,500
    # already passes Python's recursion limit, the descriptor test below
    # shows depth costs no descriptors.
    [pytest.param(k, marks=pytest.mark.slow) if k == "10000-deep" else k for k in TREES],
)
def test_any_tree_is_measured_then_removed_and_nothing_outside(
    kind: str, tmp_path: Path, outside: Path
) -> None:
    top = tmp_path / "snapshot" / "fs"
    top.mkdir(parents=True)
    with tidy(top.parent):
        made = TREES[kind](top, outside)
        started = time.monotonic()
        usage = disk_usage(top)
        assert time.monotonic() - started < SLOW
        assert usage.inodes == made + 1  # and the top itself
        assert usage.size > 0

        started = time.monotonic()
        remove_dir(tmp_path / "snapshot")
        assert time.monotonic() - started < SLOW
        assert not (tmp_path / "snapshot").exists()
        assert intact(outside) and os.path.exists("/etc/passwd")


def test_remove_all_holds_one_descriptor_at_any_depth(tmp_path: Path) -> None:
    """The old removal held a descriptor per level: 1,000 levels, 1,000 descriptors."""
    import resource

    (tmp_path / "t").mkdir()
    with tidy(tmp_path), opened(tmp_path) as fd:
        chain(tmp_path / "t", ["d"] * 1000)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
        try:
            assert remove_all(fd, "t") is True
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert os.listdir(fd) == []


def test_remove_all_fixes_modes_for_a_caller_without_root_powers(tmp_path: Path) -> None:
    """``chmod 000`` stops an unprivileged owner; removal makes its own way in."""
    top = tmp_path / "t"
    top.mkdir()
    with tidy(tmp_path), opened(tmp_path) as fd:
        chain(top, ["closed", *["deeper"] * 50])
        locked_modes(top / "closed" / "deeper", tmp_path)
        nobody = 65534
        for dirpath, dirnames, filenames in os.walk(tmp_path):
            for n in [*dirnames, *filenames]:
                os.lchown(os.path.join(dirpath, n), nobody, nobody)
        os.lchown(tmp_path, nobody, nobody)
        os.chmod(top / "closed", 0o000)
        os.setgroups([])
        os.setgid(nobody)
        os.setuid(nobody)  # this confined child only
        with pytest.raises(PermissionError):
            os.close(os.open("t/closed", _O_DIR, dir_fd=fd))
        assert remove_all(fd, "t") is True
        assert os.listdir(fd) == []


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount_tmpfs(target: Path) -> None:
    if _libc.mount(b"tmpfs", bytes(target), b"tmpfs", 0, b"size=1m") != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def test_removal_never_enters_a_mount(tmp_path: Path) -> None:
    """A walk stops at another filesystem; remove_dir detaches it first.

    The confined child has its own mount namespace, so the tmpfs dies with it.
    """
    top = tmp_path / "snapshot"
    (top / "fs" / "host").mkdir(parents=True)
    (top / "fs" / "mine").write_bytes(b"x")
    _mount_tmpfs(top / "fs" / "host")
    (top / "fs" / "host" / "precious").write_bytes(b"host data")
    with opened(top / "fs" / "host") as host, opened(tmp_path) as fd, tidy(tmp_path):
        with pytest.raises(CrossesMount):
            remove_all(fd, "snapshot")
        assert os.listdir(host) == ["precious"]

        remove_dir(top)  # detaches the mount (lazily), then removes the tree
        assert not top.exists()
        assert os.listdir(host) == ["precious"]  # the host's file was never touched


# -- through the snapshotters and gc ------------------------------------------


@pytest.fixture(params=["overlayfs", "native"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[State, str]]:
    st = State(tmp_path / "root")
    yield st, request.param
    st.close()


def own_dir(st: State, name: str, key: str) -> Path:
    """Where a container's writes to active snapshot *key* land."""
    sn = st.snapshotter(name)
    if isinstance(sn, LayerDirs):
        return sn.upper_dir(key)
    (m,) = sn.mounts(key)
    return Path(m.source)


def test_a_container_written_tree_commits_measures_and_goes(
    state: tuple[State, str], outside: Path
) -> None:
    st, name = state
    with tidy(st.root / "snapshots" / name):
        sn = st.snapshotter(name)
        sn.prepare("run", "")
        fs = own_dir(st, name, "run")
        made = 0
        # All but the 10,000 levels, which take seconds to build here.
        for kind, build in TREES.items():
            if kind == "10000-deep":
                continue
            (fs / kind).mkdir()
            made += 1 + build(fs / kind, outside)
        started = time.monotonic()
        sn.commit("saved", "run")  # measures the tree: the usage walk
        assert time.monotonic() - started < SLOW
        assert sn.usage("saved").inodes == made + 1
        report = gc.collect(st.content, st.images, {name: sn})
        assert report.snapshots == {name: ["saved"]} and report.errors == []
        assert list(sn.walk()) == [] and os.listdir(st.root / "snapshots" / name) == []
        assert intact(outside)


FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10


def _set_immutable(path: Path, on: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
        flags = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
    finally:
        os.close(fd)


def test_gc_reports_a_tree_it_cannot_remove_and_collects_the_rest(
    state: tuple[State, str],
) -> None:
    """An immutable directory (a privileged container's ``chattr +i``) stays;
    gc says so in one line, every time, and removes everything else."""
    st, name = state
    with tidy(st.root / "snapshots" / name):
        sn = st.snapshotter(name)
        dirs = {}
        for key in ("stuck", "other"):
            sn.prepare(key, "")
            dirs[key] = own_dir(st, name, key)  # a commit keeps the directory
            chain(dirs[key], ["d"] * 20)
            sn.commit(f"{key}-done", key)
        sn.prepare("extract-1 x", "")  # scratch of an unpack: collected too
        stuck = dirs["stuck"] / "d"
        try:
            _set_immutable(stuck, True)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                pytest.skip(f"no immutable flag on this file system: {e}")
            raise
        try:
            for _ in range(2):  # a later gc does not fail either
                report = gc.collect(st.content, st.images, {name: sn})
                [line] = report.errors
                assert line.startswith(f"{name}: {dirs['stuck'].parent}: ")
                assert "not permitted" in line
                assert list(sn.walk()) == []
                assert os.listdir(st.root / "snapshots" / name) == [dirs["stuck"].parent.name]
        finally:
            _set_immutable(stuck, False)
        report = gc.collect(st.content, st.images, {name: sn})
        assert report.errors == [] and report.directories == [str(dirs["stuck"].parent)]
        assert os.listdir(st.root / "snapshots" / name) == []
