"""Lookups in overlay lowers and copy-up (`ckfs.archive.lowers`), without a layer.

The applier's overlay tests cover these through whole layers; here each
rule of the overlay lookup is pinned on its own: the first lower decides, a
non-directory parent hides what is below, a lower's symlinks stay inside
that lower, and copy-up keeps what the file had. Runs confined (the
``test_archive_`` prefix), like every archive test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

import pytest

from ckfs.archive.entry import SkipEntry
from ckfs.archive.lowers import Lowers, copy_node, copy_xattrs

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, trusted xattrs)")


@pytest.fixture
def stack(tmp_path: Path) -> tuple[Path, Path, Path]:
    """top over bottom, and an upper dir; a secret outside both."""
    top, bottom, upper = tmp_path / "top", tmp_path / "bottom", tmp_path / "upper"
    for d in (top, bottom, upper):
        d.mkdir()
    (tmp_path / "secret").write_bytes(b"outside")
    (top / "both").write_bytes(b"top")
    (bottom / "both").write_bytes(b"bottom")
    (bottom / "only").write_bytes(b"bottom-only")
    (top / "hidden").write_bytes(b"a file in top")  # hides bottom's dir
    (bottom / "hidden").mkdir()
    (bottom / "hidden/x").write_bytes(b"x")
    (bottom / "d").mkdir(mode=0o750)
    os.symlink("../..", top / "up")
    os.mknod(top / "gone", stat.S_IFCHR, 0)  # an overlay whiteout
    (bottom / "gone").mkdir()
    return top, bottom, upper


def _found(lowers: Lowers, path: str) -> os.stat_result | None:
    found = lowers.find(path.split("/"))
    if found is None:
        return None
    fd, st = found
    os.close(fd)
    return st


def test_first_lower_decides(stack: tuple[Path, Path, Path]) -> None:
    top, bottom, _ = stack
    with contextlib.closing(Lowers([top, bottom])) as with_lowers:
        st = _found(with_lowers, "both")
        assert st is not None and st.st_ino == (top / "both").stat().st_ino
        st = _found(with_lowers, "only")
        assert st is not None and st.st_ino == (bottom / "only").stat().st_ino
        assert _found(with_lowers, "nowhere") is None
        assert bool(with_lowers) and not Lowers(())


def test_a_file_parent_hides_the_lowers_below(stack: tuple[Path, Path, Path]) -> None:
    top, bottom, _ = stack
    with contextlib.closing(Lowers([top, bottom])) as lowers:
        assert _found(lowers, "hidden/x") is None
        with pytest.raises(NotADirectoryError):  # as the mount: ENOTDIR
            lowers.open_dir("hidden")
        assert lowers.open_dir("gone") is None  # a whiteout hides bottom's dir
    with contextlib.closing(Lowers([bottom])) as alone:
        found = alone.open_dir("hidden")
        assert found is not None
        os.close(found[1])


def test_a_lowers_symlinks_stay_inside_it(stack: tuple[Path, Path, Path]) -> None:
    top, bottom, _ = stack
    with contextlib.closing(Lowers([top, bottom])) as lowers:
        # top/up -> ../.. re-roots at top: up/secret is top/secret, absent.
        assert _found(lowers, "up/secret") is None
        st = _found(lowers, "up/both")
        assert st is not None and st.st_ino == (top / "both").stat().st_ino


def test_open_dir_gives_a_symlinks_target_to_follow_in_the_upper(
    stack: tuple[Path, Path, Path],
) -> None:
    top, bottom, _ = stack
    with contextlib.closing(Lowers([top, bottom])) as lowers:
        assert lowers.open_dir("up") == "../.."


def test_open_dir_gives_the_directory(stack: tuple[Path, Path, Path]) -> None:
    top, bottom, _ = stack
    with contextlib.closing(Lowers([top, bottom])) as lowers:
        found = lowers.open_dir("d")
        assert found is not None
        st, fd = found
        try:
            assert stat.S_IMODE(st.st_mode) == 0o750
            assert os.fstat(fd).st_ino == (bottom / "d").stat().st_ino
        finally:
            os.close(fd)


def _copy(src_dir: Path, dst_dir: Path, name: str, *, devices: bool = True) -> None:
    lfd = os.open(src_dir, os.O_RDONLY | os.O_DIRECTORY)
    ufd = os.open(dst_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.lstat(name, dir_fd=lfd)
        copy_node(lfd, ufd, name, st, same_owner=True, devices=devices, what="layer")
    finally:
        os.close(lfd)
        os.close(ufd)


@ROOT
def test_copy_up_keeps_content_owner_mode_times_xattrs(stack: tuple[Path, Path, Path]) -> None:
    _, bottom, upper = stack
    f = bottom / "only"
    os.chown(f, 1000, 1001)
    os.chmod(f, 0o4755)
    os.setxattr(f, "user.keep", b"\x00\xff")
    os.setxattr(f, "trusted.overlay.opaque", b"y")
    os.utime(f, ns=(1_000_000_123, 2_000_000_456))
    _copy(bottom, upper, "only")
    st = (upper / "only").lstat()
    assert (upper / "only").read_bytes() == b"bottom-only"
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o4755)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    assert os.getxattr(upper / "only", "user.keep") == b"\x00\xff"
    assert "trusted.overlay.opaque" not in os.listxattr(upper / "only")


def test_copy_up_of_symlinks_and_fifos(stack: tuple[Path, Path, Path]) -> None:
    top, _, upper = stack
    os.mkfifo(top / "fifo", 0o640)
    _copy(top, upper, "up")
    _copy(top, upper, "fifo")
    assert os.readlink(upper / "up") == "../.."
    assert stat.S_ISFIFO((upper / "fifo").lstat().st_mode)
    assert stat.S_IMODE((upper / "fifo").lstat().st_mode) == 0o640


def test_copy_up_skips_devices_when_not_allowed_and_sockets(
    stack: tuple[Path, Path, Path],
) -> None:
    top, _, upper = stack
    with pytest.raises(SkipEntry, match="device nodes are not allowed"):
        _copy(top, upper, "gone", devices=False)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(top / "sock"))
        with pytest.raises(SkipEntry, match="socket"):
            _copy(top, upper, "sock")
    assert sorted(os.listdir(upper)) == []


def test_copy_xattrs_leaves_overlay_metadata_behind(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"")
    b.write_bytes(b"")
    os.setxattr(a, "user.x", b"1")
    try:
        os.setxattr(a, "user.overlay.redirect", b"/y")
    except OSError:
        pytest.skip("user.overlay.* xattrs not settable here")
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        copy_xattrs(fa, fb, "layer")
    finally:
        os.close(fa)
        os.close(fb)
    assert os.listxattr(b) == ["user.x"]
