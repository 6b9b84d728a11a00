"""Applying well-formed layers: every entry kind, metadata, whiteouts, codecs.

Layers are built with `tarfile` in memory (tests/tarbuild.py), except sparse
files, which GNU tar writes in each of its sparse formats. Whiteouts are
checked in both forms: ``delete`` against the resulting tree, ``overlay``
against the upper directory's markers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from ckfs.archive import ApplyOptions, ApplyResult, apply_layer, open_layer
from ckfs.digest import Digest
from ckfs.errors import DataLoss, InvalidArgument
from tests.tarbuild import B, C, D, Entry, F, H, L, P, W, compress, tar

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, trusted xattrs)")

# A version-2 file capability: cap_net_raw in the permitted set, effective.
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")


def apply(root: Path, *entries: Entry, whiteouts: str = "delete", **options: Any) -> ApplyResult:
    opts = ApplyOptions(whiteouts=whiteouts, **options)  # type: ignore[arg-type]
    return apply_layer(root, io.BytesIO(tar(*entries)), media_type=None, diff_id=None, options=opts)


def lmode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def is_whiteout(p: Path) -> bool:
    st = p.lstat()
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def opaque(p: Path) -> bool:
    try:
        return os.getxattr(p, "trusted.overlay.opaque") == b"y"
    except OSError:
        return False


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


# -- entry kinds -------------------------------------------------------------------


@ROOT
def test_every_entry_kind(root: Path) -> None:
    result = apply(
        root,
        D("d/", mode=0o750),
        F("d/file", b"hello", mode=0o640),
        F("d/empty"),
        F("big", os.urandom(3 << 20) + b"end"),
        L("d/link", "file"),
        L("abs", "/d/file"),
        H("d/hard", "d/file"),
        C("dev/null", 1, 3, mode=0o666),
        B("dev/loop0", 7, 0, mode=0o660),
        P("fifo", mode=0o600),
    )
    assert result.entries == 10
    assert lmode(root / "d") == 0o750 and (root / "d").is_dir()
    assert (root / "d/file").read_bytes() == b"hello" and lmode(root / "d/file") == 0o640
    assert (root / "d/empty").read_bytes() == b""
    assert (root / "big").read_bytes().endswith(b"end") and (root / "big").stat().st_size == (
        3 << 20
    ) + 3
    assert os.readlink(root / "d/link") == "file"
    assert os.readlink(root / "abs") == "/d/file"
    assert (root / "d/hard").stat().st_ino == (root / "d/file").stat().st_ino
    null = (root / "dev/null").lstat()
    assert (
        stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    )
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = (root / "dev/loop0").lstat()
    assert stat.S_ISBLK(loop.st_mode) and os.major(loop.st_rdev) == 7
    assert stat.S_ISFIFO((root / "fifo").lstat().st_mode) and lmode(root / "fifo") == 0o600
    # An implicit parent: 0755, root-owned.
    assert lmode(root / "dev") == 0o755


def test_devices_skipped_when_not_allowed(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        apply(root, C("dev/null", 1, 3), B("dev/sda", 8, 0), F("after", b"x"), devices=False)
    assert not (root / "dev/null").exists() and not (root / "dev/sda").exists()
    assert (root / "after").read_bytes() == b"x"
    assert "device nodes are not allowed" in caplog.text


def test_unknown_type_is_skipped_with_its_data(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    odd = F("odd", b"data that must be skipped " * 100)
    odd.info.type = b"Q"
    with caplog.at_level(logging.WARNING):
        apply(root, odd, F("after", b"after"))
    assert not (root / "odd").exists()
    assert (root / "after").read_bytes() == b"after"
    assert "unsupported entry type" in caplog.text


def test_long_names_pax_and_gnu(root: Path) -> None:
    long_dir = "/".join(["d" * 60] * 3)  # 182 chars
    longer = "/".join(["e" * 200, "f" * 200])  # 401 chars
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        shutil.rmtree(root)
        root.mkdir()
        blob = tar(
            F(f"{long_dir}/file", b"one"),
            F(f"{longer}/file", b"two"),
            L("sym", longer + "/file"),
            H("hard", f"{long_dir}/file"),
            format=fmt,
        )
        opts = ApplyOptions(whiteouts="delete")
        apply_layer(root, io.BytesIO(blob), media_type=None, diff_id=None, options=opts)
        assert (root / long_dir / "file").read_bytes() == b"one"
        assert (root / longer / "file").read_bytes() == b"two"
        assert os.readlink(root / "sym") == longer + "/file"
        assert (root / "hard").stat().st_ino == (root / long_dir / "file").stat().st_ino


def test_non_utf8_names_round_trip(root: Path) -> None:
    name = b"caf\xe9-latin1".decode("utf-8", "surrogateescape")
    apply(root, F(name, b"x"))
    assert os.listdir(os.fsencode(root)) == [b"caf\xe9-latin1"]


@pytest.mark.parametrize(
    "fmt",
    [
        ["--format=gnu"],
        ["--format=pax", "--sparse-version=0.0"],
        ["--format=pax", "--sparse-version=0.1"],
        ["--format=pax", "--sparse-version=1.0"],
    ],
    ids=["gnu", "pax-0.0", "pax-0.1", "pax-1.0"],
)
def test_sparse_files(root: Path, tmp_path: Path, fmt: list[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 64 << 20
    with open(src / "sparse", "wb") as f:
        f.truncate(size)
        for off in (0, 5 << 20, 40 << 20):
            f.seek(off)
            f.write(os.urandom(8192))
        f.seek(size - 100)
        f.write(b"tail" * 25)
    with open(src / "hole-at-end", "wb") as f:
        f.write(b"head")
        f.truncate(8 << 20)
    (src / "after").write_bytes(b"after")
    layer = tmp_path / "layer.tar"
    subprocess.run(
        [
            "tar",
            "--sparse",
            *fmt,
            "-cf",
            str(layer),
            "-C",
            str(src),
            "sparse",
            "hole-at-end",
            "after",
        ],
        check=True,
    )
    with open(layer, "rb") as f:
        apply_layer(
            root, f, media_type=None, diff_id=None, options=ApplyOptions(whiteouts="delete")
        )
    for name in ("sparse", "hole-at-end"):
        assert (root / name).read_bytes() == (src / name).read_bytes(), name
        st = (root / name).stat()
        assert st.st_blocks * 512 < st.st_size // 4, f"{name} was not written sparse"
    assert (root / "after").read_bytes() == b"after"


# -- metadata ----------------------------------------------------------------------


@ROOT
def test_xattrs_including_capabilities(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        apply(
            root,
            D("d/", xattrs={"user.dir": b"yes", "trusted.overlay.opaque": b"y"}),
            F(
                "d/ping",
                b"\x7fELF",
                mode=0o755,
                uid=1000,
                xattrs={"security.capability": CAPABILITY, "user.bin": b"\x00\xff\x80"},
            ),
            L("d/link", "ping"),
        )
    assert os.getxattr(root / "d/ping", "security.capability") == CAPABILITY
    assert os.getxattr(root / "d/ping", "user.bin") == b"\x00\xff\x80"
    assert os.getxattr(root / "d", "user.dir") == b"yes"
    assert not opaque(root / "d")
    assert "overlayfs xattr 'trusted.overlay.opaque' ignored" in caplog.text


@ROOT
def test_symlink_xattrs_set_on_the_link(root: Path) -> None:
    link = L("l", "target")
    link.info.pax_headers = {"SCHILY.xattr.trusted.note": "on-the-link"}
    apply(root, F("target", b"t"), link)
    assert os.getxattr(root / "l", "trusted.note", follow_symlinks=False) == b"on-the-link"
    assert "trusted.note" not in os.listxattr(root / "target")


@ROOT
def test_setuid_setgid_sticky_survive_chown(root: Path) -> None:
    apply(
        root,
        F("su", b"x", mode=0o4755, uid=1000, gid=1001),
        F("sg", b"x", mode=0o2711, uid=0, gid=50),
        D("tmp/", mode=0o1777),
        D("shared/", mode=0o2775, gid=100),
    )
    st = (root / "su").stat()
    assert stat.S_IMODE(st.st_mode) == 0o4755 and (st.st_uid, st.st_gid) == (1000, 1001)
    assert lmode(root / "sg") == 0o2711 and (root / "sg").stat().st_gid == 50
    assert lmode(root / "tmp") == 0o1777
    assert lmode(root / "shared") == 0o2775 and (root / "shared").stat().st_gid == 100


@ROOT
def test_owners_and_same_owner_off(root: Path) -> None:
    apply(root, F("f", uid=123, gid=456), L("l", "f", uid=7, gid=8), D("d/", uid=9, gid=10))
    assert ((root / "f").stat().st_uid, (root / "f").stat().st_gid) == (123, 456)
    assert ((root / "l").lstat().st_uid, (root / "l").lstat().st_gid) == (7, 8)
    assert (root / "d").stat().st_uid == 9
    other = root.parent / "other"
    other.mkdir()
    apply(other, F("f", uid=123, gid=456), same_owner=False)
    assert (other / "f").stat().st_uid == os.geteuid()


def test_invalid_owner_is_refused(root: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"'f'.*owner"):
        apply(root, F("f", uid=1 << 33), same_owner=True)


def test_invalid_owner_is_refused_even_when_owners_are_not_kept(root: Path) -> None:
    """The entry rules (`ckfs.archive.entry`) are the same for every reader."""
    with pytest.raises(InvalidArgument, match=r"'f'.*owner"):
        apply(root, F("f", uid=-1), same_owner=False)


def test_capability_the_kernel_would_refuse_is_refused(root: Path) -> None:
    v1 = bytes.fromhex("000000010020000000000000")
    with pytest.raises(InvalidArgument, match=r"'f'.*security\.capability"):
        apply(root, F("f", xattrs={"security.capability": v1}))


def test_xattrs_outside_linux_namespaces_are_ignored(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        apply(root, F("f", xattrs={"os2.ea": b"1", "user.kept": b"2"}))
    assert os.getxattr(root / "f", "user.kept") == b"2"
    assert "'os2.ea' ignored" in caplog.text


def test_mtimes_dirs_after_children(root: Path) -> None:
    apply(
        root,
        D("d/", mtime=1_000_000),
        D("d/sub/", mtime=2_000_000),
        F("d/sub/f", b"x", mtime=3_000_000),
        F("d/g", mtime=4_000_000),
        L("d/l", "g", mtime=5_000_000),
        F("frac", pax={"mtime": "1700000000.123456789"}),
    )
    assert (root / "d").stat().st_mtime_ns == 1_000_000 * 10**9
    assert (root / "d/sub").stat().st_mtime_ns == 2_000_000 * 10**9
    assert (root / "d/sub/f").stat().st_mtime_ns == 3_000_000 * 10**9
    assert (root / "d/l").lstat().st_mtime_ns == 5_000_000 * 10**9
    assert (root / "frac").stat().st_mtime_ns == 1_700_000_000_123_456_789


def test_existing_directories_keep_their_times(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/old").write_bytes(b"old")
    os.utime(root / "usr/bin", ns=(5, 7))
    os.utime(root / "usr", ns=(5, 9))
    apply(root, F("usr/bin/new", b"new"), W("usr/bin/.wh.old"))
    assert (root / "usr/bin").stat().st_mtime_ns == 7
    assert (root / "usr").stat().st_mtime_ns == 9
    assert sorted(os.listdir(root / "usr/bin")) == ["new"]


def test_restrictive_directory_modes_without_privileges(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unprivileged, a 0500 directory would refuse its own children: its
    # mode waits until the end. (Faked: the test itself may run as root.)
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    apply(root, D("ro/", mode=0o500), D("ro/inner/", mode=0o000), F("ro/inner/f", b"x"))
    assert lmode(root / "ro") == 0o500
    assert lmode(root / "ro/inner") == 0o000
    os.chmod(root / "ro/inner", 0o700)
    assert (root / "ro/inner/f").read_bytes() == b"x"


# -- replacement -------------------------------------------------------------------


def test_dir_replaced_by_file_and_file_by_dir(root: Path) -> None:
    (root / "d/deep").mkdir(parents=True)
    (root / "d/deep/x").write_bytes(b"x")
    (root / "f").write_bytes(b"f")
    apply(root, F("d", b"now a file"), D("f/"), F("f/inside", b"in"))
    assert (root / "d").read_bytes() == b"now a file"
    assert (root / "f/inside").read_bytes() == b"in"


def test_directory_entry_merges_into_existing(root: Path) -> None:
    (root / "d").mkdir(mode=0o700)
    (root / "d/keep").write_bytes(b"keep")
    os.setxattr(root / "d", "user.old", b"1")
    apply(root, D("d/", mode=0o751, xattrs={"user.new": b"2"}))
    assert (root / "d/keep").read_bytes() == b"keep"
    assert lmode(root / "d") == 0o751
    assert os.listxattr(root / "d") == ["user.new"]


def test_symlink_replaced_by_directory(root: Path) -> None:
    (root / "real").mkdir()
    os.symlink("real", root / "lib")
    apply(root, D("lib/"), F("lib/x", b"x"))
    assert (root / "lib").is_dir() and not (root / "lib").is_symlink()
    assert os.listdir(root / "real") == []


def test_later_entries_replace_earlier_and_spare_hardlinks(root: Path) -> None:
    (root / "a").write_bytes(b"old")
    os.link(root / "a", root / "b")
    apply(root, F("a", b"new"), F("c", b"1"), F("c", b"2"), L("s", "x"), L("s", "y"))
    assert (root / "a").read_bytes() == b"new"
    assert (root / "b").read_bytes() == b"old"  # the other link kept its content
    assert (root / "c").read_bytes() == b"2"
    assert os.readlink(root / "s") == "y"


def test_odd_entries_are_skipped(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        result = apply(
            root,
            H("early", "later"),  # a hardlink before its target
            F("later", b"t"),
            F("file", b"f"),
            F("file/child", b"c"),  # below a file
            L("empty", ""),
        )
    assert result.entries == 5
    assert not (root / "early").exists()
    assert (root / "file").read_bytes() == b"f"
    assert not (root / "empty").exists()
    assert caplog.text.count("skipped") == 3


# -- whiteouts: delete form --------------------------------------------------------


def lower_tree(root: Path) -> None:
    (root / "etc/conf.d").mkdir(parents=True)
    (root / "etc/conf.d/a").write_bytes(b"a")
    (root / "etc/conf.d/b").write_bytes(b"b")
    (root / "etc/passwd").write_bytes(b"p")
    (root / "var/cache").mkdir(parents=True)
    (root / "var/cache/x").write_bytes(b"x")


def test_delete_whiteouts(root: Path) -> None:
    lower_tree(root)
    apply(root, W("etc/.wh.passwd"), W("var/.wh.cache"), W(".wh.missing"), W("gone/.wh.x"))
    assert not (root / "etc/passwd").exists()
    assert not (root / "var/cache").exists()
    assert (root / "etc/conf.d/a").exists()


@pytest.mark.parametrize("order", ["marker-first", "marker-last"])
def test_delete_opaque_in_any_order(root: Path, order: str) -> None:
    lower_tree(root)
    entries = [D("etc/conf.d/"), F("etc/conf.d/new", b"n")]
    marker = W("etc/conf.d/.wh..wh..opq")
    apply(root, *([marker, *entries] if order == "marker-first" else [*entries, marker]))
    assert sorted(os.listdir(root / "etc/conf.d")) == ["new"]
    assert (root / "etc/passwd").exists()


@pytest.mark.parametrize("order", ["whiteout-first", "whiteout-last"])
def test_delete_whiteout_spares_what_the_layer_added(root: Path, order: str) -> None:
    lower_tree(root)
    added = [F("etc/passwd", b"new"), F("var/cache/new", b"n")]
    outs = [W("etc/.wh.passwd"), W("var/.wh.cache")]
    apply(root, *([*outs, *added] if order == "whiteout-first" else [*added, *outs]))
    assert (root / "etc/passwd").read_bytes() == b"new"
    # The lower's var/cache is gone either way; the layer's file stays.
    assert sorted(os.listdir(root / "var/cache")) == ["new"]


def test_moot_whiteout_below_a_replaced_directory(root: Path) -> None:
    # umoci 0.4.7 writes this: "d" replaced by a file, plus d/.wh.x.
    lower_tree(root)
    apply(root, F("etc", b"a file now"), W("etc/.wh.passwd"), W("etc/conf.d/.wh..wh..opq"))
    assert (root / "etc").read_bytes() == b"a file now"


def test_reserved_whiteout_names_are_skipped(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    lower_tree(root)
    with caplog.at_level(logging.WARNING):
        apply(root, W("etc/.wh..wh.plnk"), W(".wh..wh.aufs"))
    assert (root / "etc/passwd").exists()
    assert "reserved whiteout name" in caplog.text


# -- whiteouts: overlay form -------------------------------------------------------


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    low = tmp_path / "lower"
    (low / "etc/conf.d").mkdir(parents=True)
    (low / "etc/conf.d/a").write_bytes(b"a")
    (low / "etc/passwd").write_bytes(b"p")
    (low / "usr/lib").mkdir(parents=True)
    (low / "usr/lib/libc.so").write_bytes(b"libc")
    os.chmod(low / "usr/lib", 0o750)
    os.utime(low / "usr/lib", ns=(11, 22))
    return low


@ROOT
def test_overlay_whiteouts_and_opaque(root: Path, lower: Path) -> None:
    os.chown(lower / "usr/lib", 123, 456)
    os.setxattr(lower / "usr/lib", "user.label", b"lib")
    apply(
        root,
        W("etc/.wh.passwd"),
        W("etc/conf.d/.wh..wh..opq"),
        F("usr/lib/new.so", b"new"),
        W("nowhere/.wh.x"),
        W("nowhere2/.wh..wh..opq"),
        whiteouts="overlay",
        lowers=[lower],
    )
    assert is_whiteout(root / "etc/passwd")
    assert opaque(root / "etc/conf.d") and os.listdir(root / "etc/conf.d") == []
    assert not opaque(root / "etc")
    lib = (root / "usr/lib").stat()
    assert (stat.S_IMODE(lib.st_mode), lib.st_uid, lib.st_gid) == (0o750, 123, 456)
    assert lib.st_mtime_ns == 22
    assert os.getxattr(root / "usr/lib", "user.label") == b"lib"
    assert lmode(root / "usr") == 0o755
    # Markers in directories no layer has create nothing.
    assert not (root / "nowhere").exists() and not (root / "nowhere2").exists()
    assert (lower / "etc/passwd").read_bytes() == b"p"  # lowers untouched


@ROOT
@pytest.mark.parametrize("order", ["whiteout-first", "whiteout-last"])
def test_overlay_replaced_directory_is_opaque(root: Path, lower: Path, order: str) -> None:
    added = [D("etc/conf.d/"), F("etc/conf.d/new", b"n"), F("etc/passwd", b"mine")]
    outs = [W("etc/.wh.conf.d"), W("etc/.wh.passwd")]
    entries = [*outs, *added] if order == "whiteout-first" else [*added, *outs]
    apply(root, *entries, whiteouts="overlay", lowers=[lower])
    assert opaque(root / "etc/conf.d")
    assert os.listdir(root / "etc/conf.d") == ["new"]
    assert (root / "etc/passwd").read_bytes() == b"mine"


@ROOT
def test_overlay_implicit_parent_replacing_whiteout(root: Path, lower: Path) -> None:
    apply(root, W("etc/.wh.conf.d"), F("etc/conf.d/x", b"x"), whiteouts="overlay", lowers=[lower])
    assert opaque(root / "etc/conf.d")
    assert os.listdir(root / "etc/conf.d") == ["x"]


@ROOT
def test_overlay_moot_whiteout(root: Path, lower: Path) -> None:
    apply(root, F("etc", b"file"), W("etc/.wh.passwd"), whiteouts="overlay", lowers=[lower])
    assert (root / "etc").read_bytes() == b"file"


@ROOT
def test_overlay_hardlink_copies_up_from_lower(root: Path, lower: Path) -> None:
    os.chmod(lower / "usr/lib/libc.so", 0o555)
    apply(root, H("usr/lib/libc.so.6", "usr/lib/libc.so"), whiteouts="overlay", lowers=[lower])
    up = root / "usr/lib/libc.so"
    assert up.read_bytes() == b"libc" and lmode(up) == 0o555
    assert (root / "usr/lib/libc.so.6").stat().st_ino == up.stat().st_ino
    assert up.stat().st_ino != (lower / "usr/lib/libc.so").stat().st_ino
    assert (lower / "usr/lib/libc.so").stat().st_nlink == 1


@ROOT
def test_overlay_hardlink_to_whited_out_target_is_skipped(root: Path, lower: Path) -> None:
    apply(root, W("etc/.wh.passwd"), H("pw", "etc/passwd"), whiteouts="overlay", lowers=[lower])
    assert not (root / "pw").exists()


@ROOT
def test_overlay_mounts_like_delete(root: Path, lower: Path, tmp_path: Path) -> None:
    """The two forms of the same layer give the same tree."""
    entries = [
        W("etc/.wh.passwd"),
        W("etc/conf.d/.wh..wh..opq"),
        F("etc/conf.d/b", b"b"),
        F("usr/lib/new.so", b"new"),
        H("usr/lib/libc.so.6", "usr/lib/libc.so"),
        D("opt/"),
        F("opt/x", b"x"),
    ]
    assert_mounts_like_delete(root, lower, tmp_path, entries)


@ROOT
@pytest.mark.parametrize("then", ["", "dir", "symlink", "whiteout", "under-itself"])
def test_overlay_follows_a_lower_link_like_delete(
    root: Path, lower: Path, tmp_path: Path, then: str
) -> None:
    """``lib/x.so`` over a lower's ``lib -> usr/lib`` lands in ``usr/lib``,
    copied up, as the mount resolves it and as native mode applies it; an
    entry this layer then puts at ``lib`` itself takes over from the link."""
    os.symlink("usr/lib", lower / "lib")
    os.symlink("/etc", lower / "conf")
    entries = [
        F("lib/x.so", b"x"),
        W("lib/.wh.libc.so"),
        H("conf/pw", "conf/passwd"),
        F("conf/conf.d/y", b"y"),
    ]
    later = {
        "dir": [D("lib/"), F("lib/y", b"y")],
        "symlink": [L("lib", "etc"), F("lib/z", b"z")],
        "whiteout": [W(".wh.lib"), F("lib/w", b"w")],
        # lib/up is root: the walk to lib/up/z passed the lower's link at
        # lib, which the new directory there must end.
        "under-itself": [L("usr/lib/up", "/"), D("lib/up/lib/"), F("lib/up/lib/z", b"z")],
    }
    entries += later.get(then, [])
    assert_mounts_like_delete(root, lower, tmp_path, entries)
    if not then:
        assert sorted(os.listdir(root)) == ["etc", "usr"]
        assert (root / "usr/lib/x.so").read_bytes() == b"x"
        assert is_whiteout(root / "usr/lib/libc.so")
        assert lmode(root / "usr/lib") == 0o750


def assert_mounts_like_delete(
    root: Path, lower: Path, tmp_path: Path, entries: list[Entry]
) -> None:
    """Applied in overlay form over *lower* and mounted, *entries* give the
    tree that a copy of *lower* with them applied in delete form has."""
    apply(root, *entries, whiteouts="overlay", lowers=[lower])
    full = tmp_path / "full"
    shutil.copytree(lower, full, symlinks=True)
    apply(full, *entries)
    merged, work = tmp_path / "merged", tmp_path / "work"
    merged.mkdir()
    work.mkdir()
    opts = f"lowerdir={lower},upperdir={root},workdir={work}"
    mount = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
        capture_output=True,
        text=True,
    )
    assert mount.returncode == 0, f"mount -t overlay: {mount.stderr.strip()}"
    try:
        from tests import treecmp

        treecmp.assert_same(
            treecmp.snapshot(full), treecmp.snapshot(merged), ignore=("mtime_ns", "link_group")
        )
    finally:
        subprocess.run(["umount", str(merged)], check=True)


# -- codecs and diff IDs -----------------------------------------------------------


@pytest.mark.parametrize("codec", ["gzip", "zstd", "none"])
def test_codecs_and_diff_id(root: Path, codec: str) -> None:
    raw = tar(F("a", b"a" * 100_000), D("d/"), F("d/b", os.urandom(2 << 20)))
    blob = compress(raw, codec)
    opts = ApplyOptions(whiteouts="delete")
    result = apply_layer(
        root, io.BytesIO(blob.data), media_type=blob.media_type, diff_id=blob.diff_id, options=opts
    )
    assert result.diff_id == blob.diff_id
    assert result.bytes == len(raw) and result.entries == 3
    assert (root / "a").read_bytes() == b"a" * 100_000


@pytest.mark.parametrize("codec", ["gzip", "zstd", "none"])
def test_diff_id_mismatch_is_data_loss(root: Path, codec: str) -> None:
    raw = tar(F("a", b"a"))
    blob = compress(raw, codec)
    wrong = Digest("sha256:" + "0" * 64)
    with pytest.raises(DataLoss, match=f"layer {wrong}"):
        apply_layer(
            root,
            io.BytesIO(blob.data),
            media_type=blob.media_type,
            diff_id=wrong,
            options=ApplyOptions(whiteouts="delete"),
        )


def test_damaged_layer_reports_data_loss_when_diff_id_known(root: Path) -> None:
    raw = bytearray(tar(F("a", b"a" * 2000), F("b", b"b")))
    raw[2560 + 10] ^= 0xFF  # inside the second header: a bad checksum
    good = Digest(
        "sha256:" + hashlib.sha256(bytes(tar(F("a", b"a" * 2000), F("b", b"b")))).hexdigest()
    )
    with pytest.raises(DataLoss):
        apply_layer(
            root,
            io.BytesIO(bytes(raw)),
            media_type=None,
            diff_id=good,
            options=ApplyOptions(whiteouts="delete"),
        )
    with pytest.raises(InvalidArgument, match="corrupt tar after 1 entries"):
        apply_layer(
            root / "..",
            io.BytesIO(bytes(raw)),
            media_type=None,
            diff_id=None,
            options=ApplyOptions(whiteouts="delete"),
        )


def test_corrupt_inputs(root: Path) -> None:
    opts = ApplyOptions(whiteouts="delete")

    def run(data: bytes, media_type: str | None = None) -> ApplyResult:
        return apply_layer(
            root, io.BytesIO(data), media_type=media_type, diff_id=None, options=opts
        )

    gz = bytearray(gzip.compress(tar(F("a", os.urandom(50_000)))))
    gz[100] ^= 0xFF
    with pytest.raises(InvalidArgument, match="gzip"):
        run(bytes(gz))
    with pytest.raises(InvalidArgument, match="gzip"):
        run(gzip.compress(tar(F("a", os.urandom(50_000))))[:3000])
    with pytest.raises(InvalidArgument, match="not a tar"):
        run(b"{ this is json, not a tar }" * 40)
    with pytest.raises(InvalidArgument, match="ends inside its data"):
        run(tar(F("a", os.urandom(5000)))[:3000])
    with pytest.raises(InvalidArgument, match="not a layer"):
        run(tar(F("a")), "application/vnd.oci.image.config.v1+json")


def test_the_host_root_is_refused(tmp_path: Path) -> None:
    # An empty layer: even if the guard failed, nothing would be written.
    os.symlink("/", tmp_path / "slash")
    for target in (Path("/"), tmp_path / "slash"):
        with pytest.raises(InvalidArgument, match="host's /"):
            apply_layer(
                target,
                io.BytesIO(b""),
                media_type=None,
                diff_id=None,
                options=ApplyOptions(whiteouts="delete"),
            )


def test_empty_layers(root: Path) -> None:
    opts = ApplyOptions(whiteouts="delete")
    for data in (b"", b"\0" * 1024, gzip.compress(b"\0" * 10240)):
        result = apply_layer(root, io.BytesIO(data), media_type=None, diff_id=None, options=opts)
        assert result.entries == 0
    assert os.listdir(root) == []


def test_declared_compression_may_be_wrong(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = tar(F("a", b"a"))
    with caplog.at_level(logging.WARNING):
        apply_layer(
            root,
            io.BytesIO(raw),
            media_type="application/vnd.docker.image.rootfs.diff.tar.gzip",
            diff_id=None,
            options=ApplyOptions(whiteouts="delete"),
        )
    assert (root / "a").read_bytes() == b"a"
    assert "declared gzip" in caplog.text


def test_trailing_garbage_is_hashed_and_mentioned(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = tar(F("a", b"a")) + b"junk" * 100
    with caplog.at_level(logging.WARNING):
        result = apply_layer(
            root,
            io.BytesIO(raw),
            media_type=None,
            diff_id=None,
            options=ApplyOptions(whiteouts="delete"),
        )
    assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert "after the end of the archive" in caplog.text


def test_open_layer_streams(tmp_path: Path) -> None:
    raw = tar(F("a", os.urandom(3 << 20)))
    for codec in ("gzip", "zstd", "none"):
        with open_layer(io.BytesIO(compress(raw, codec).data)) as s:
            assert s.read() == raw
        # Closing early stops the worker without reading the rest.
        s = open_layer(io.BytesIO(compress(raw, codec).data))
        assert s.read(10) == raw[:10]
        s.close()
