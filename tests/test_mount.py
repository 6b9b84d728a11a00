"""Mount records, option parsing, mountinfo, and the syscalls on real mounts.

The pure parts (JSON, option words, lowerdir compaction, mountinfo lines)
need nothing; the tests marked ``root`` mount tmpfs, binds, overlays and a
dead FUSE connection under their own ``tmp_path``, guarded by `mount_guard`
so a failing test leaves nothing mounted.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from ckfs import errors
from ckfs import mount as m
from ckfs.mount import (
    Mount,
    is_mountpoint,
    is_stale,
    mount_all,
    mounts_under,
    unmount,
    unmount_all,
    unmount_recursive,
)
from integration.mounts import MountGuard

# -- records -----------------------------------------------------------------------


def test_json_round_trip() -> None:
    rec = Mount("overlay", "overlay", "sub", ("lowerdir=/a:/b", "index=off"))
    obj = rec.to_json()
    assert obj == {
        "type": "overlay",
        "source": "overlay",
        "target": "sub",
        "options": ["lowerdir=/a:/b", "index=off"],
    }
    assert Mount.from_json(obj) == rec
    assert Mount.from_json({"type": "bind", "source": "/x"}) == Mount("bind", "/x")


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"source": "/x"},
        {"type": "bind"},
        {"type": 1, "source": "/x"},
        {"type": "bind", "source": "/x", "target": None},
        {"type": "bind", "source": "/x", "options": "ro"},
        {"type": "bind", "source": "/x", "options": ["ro", 1]},
    ],
)
def test_from_json_rejects_malformed(obj: object) -> None:
    with pytest.raises(errors.InvalidArgument):
        Mount.from_json(obj)  # type: ignore[arg-type]


# -- options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "flags", "propagation", "data"),
    [
        (["ro", "rbind"], m.MS_RDONLY | m.MS_BIND | m.MS_REC, (), ()),
        (["rw", "bind"], m.MS_BIND, (), ()),
        (["ro", "rw"], 0, (), ()),
        (["rw", "ro"], m.MS_RDONLY, (), ()),
        (["nosuid", "nodev", "noexec"], m.MS_NOSUID | m.MS_NODEV | m.MS_NOEXEC, (), ()),
        (["nosuid", "suid"], 0, (), ()),
        (["remount", "ro"], m.MS_REMOUNT | m.MS_RDONLY, (), ()),
        (["noatime", "atime", "relatime"], m.MS_RELATIME, (), ()),
        (["defaults", "loop"], 0, (), ()),
        (["rprivate"], 0, (m.MS_PRIVATE | m.MS_REC,), ()),
        (["shared", "rslave"], 0, (m.MS_SHARED, m.MS_SLAVE | m.MS_REC), ()),
        (
            ["workdir=/w", "upperdir=/u", "lowerdir=/a:/b", "index=off", "ro"],
            m.MS_RDONLY,
            (),
            ("workdir=/w", "upperdir=/u", "lowerdir=/a:/b", "index=off"),
        ),
        (["size=1m", "mode=755"], 0, (), ("size=1m", "mode=755")),
    ],
)
def test_parse_options(
    options: list[str], flags: int, propagation: tuple[int, ...], data: tuple[str, ...]
) -> None:
    parsed = m._parse_options(options)
    assert (parsed.flags, parsed.propagation, parsed.data) == (flags, propagation, data)


def test_compact_lowerdir() -> None:
    data = ("workdir=/r/s/9/work", "upperdir=/r/s/9/fs", "lowerdir=/r/s/8/fs:/r/s/10/fs", "x")
    assert m._compact_lowerdir(data) == (
        "/r/s",
        ("workdir=/r/s/9/work", "upperdir=/r/s/9/fs", "lowerdir=8/fs:10/fs", "x"),
    )
    # Nothing to gain: no lowerdir, only "/" in common, relative already.
    assert m._compact_lowerdir(("upperdir=/u",)) is None
    assert m._compact_lowerdir(("lowerdir=/a/fs:/b/fs",)) is None
    assert m._compact_lowerdir(("lowerdir=a:b",)) is None
    # A lone layer, and a layer that is the common directory itself.
    assert m._compact_lowerdir(("lowerdir=/r/s/1/fs",)) == ("/r/s/1/fs", ("lowerdir=.",))
    assert m._compact_lowerdir(("lowerdir=/r/s:/r/s/1",)) == ("/r/s", ("lowerdir=.:1",))


def test_target_inside_root() -> None:
    assert m._target_in("/mnt", "") == "/mnt"
    assert m._target_in("/mnt", "a/b") == "/mnt/a/b"
    assert m._target_in("/mnt", "/a") == "/mnt/a"
    with pytest.raises(errors.InvalidArgument):
        m._target_in("/mnt", "../etc")


# -- mountinfo ---------------------------------------------------------------------


def test_parse_mountinfo_line() -> None:
    line = (
        r"36 35 98:0 /mnt1 /mnt/with\040space rw,noatime master:1 shared:2 - "
        r"ext3 /dev/root rw,errors=continue"
    )
    info = m._parse_mountinfo_line(line)
    assert info == m.MountInfo(
        mount_id=36,
        parent_id=35,
        root="/mnt1",
        mountpoint="/mnt/with space",
        options="rw,noatime",
        fstype="ext3",
        source="/dev/root",
        super_options="rw,errors=continue",
    )
    bare = m._parse_mountinfo_line(r"1 0 0:1 / /a\134b\011c rw - overlay overlay rw,lowerdir=x")
    assert (bare.mountpoint, bare.fstype, bare.super_options) == (
        "/a\\b\tc",
        "overlay",
        "rw,lowerdir=x",
    )


def test_mountinfo_of_this_process() -> None:
    table = m.mountinfo()
    assert any(i.mountpoint == "/" for i in table)
    assert is_mountpoint("/")


def test_nothing_is_mounted_on_a_fresh_directory(tmp_path: Path) -> None:
    assert not is_mountpoint(tmp_path)
    assert mounts_under(tmp_path) == []
    assert not is_stale(tmp_path)
    assert not is_stale(tmp_path / "missing")
    assert m.clean_stale(tmp_path) == []


# -- real mounts -------------------------------------------------------------------


@pytest.mark.root
def test_read_only_bind_refuses_writes(tmp_path: Path, mount_guard: MountGuard) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    target = mount_guard.mount([Mount("bind", str(src), options=("ro", "rbind"))], tmp_path / "t")
    assert is_mountpoint(target)
    assert (target / "f").read_text() == "x"
    with pytest.raises(OSError) as exc:
        (target / "g").write_text("y")
    assert exc.value.errno == errno.EROFS
    (option,) = [i.options for i in m.mountinfo() if i.mountpoint == str(target)]
    assert option.split(",")[0] == "ro"
    unmount(target)
    assert not is_mountpoint(target)


@pytest.mark.root
def test_bind_without_option_is_still_a_bind(tmp_path: Path, mount_guard: MountGuard) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    target = mount_guard.mount([Mount("bind", str(src))], tmp_path / "t")
    (target / "g").write_text("y")
    assert (src / "g").read_text() == "y"


@pytest.mark.root
def test_stacked_mounts_and_targets(tmp_path: Path, mount_guard: MountGuard) -> None:
    root = tmp_path / "root"
    mounts = [
        Mount("tmpfs", "tmpfs", options=("size=1m", "mode=755")),
        Mount("tmpfs", "tmpfs", options=("size=1m", "nosuid", "nodev")),
    ]
    mount_guard.mount(mounts, root)
    assert [i.fstype for i in mounts_under(root)] == ["tmpfs", "tmpfs"]
    (root / "sub").mkdir()
    mount_all([Mount("tmpfs", "tmpfs", "sub", ("size=1m",))], root)
    assert mounts_under(root)[0].mountpoint == str(root / "sub")
    assert unmount_recursive(root) == [str(root / "sub"), str(root), str(root)]
    assert mounts_under(root) == []
    unmount_all(root)  # nothing mounted: fine
    unmount_all(tmp_path / "missing")


@pytest.mark.root
def test_mount_all_is_all_or_nothing(tmp_path: Path, mount_guard: MountGuard) -> None:
    root = tmp_path / "root"
    root.mkdir()
    mounts = [
        Mount("tmpfs", "tmpfs", options=("size=1m",)),
        Mount("bind", str(tmp_path / "missing"), options=("rbind",)),
    ]
    with pytest.raises(errors.NotFound):
        mount_all(mounts, root)
    assert mounts_under(root) == []
    with pytest.raises(errors.InvalidArgument):
        mount_all([Mount("tmpfs", "tmpfs", "../x")], root)


@pytest.mark.root
def test_unmount_errors(tmp_path: Path, mount_guard: MountGuard) -> None:
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(errors.InvalidArgument):
        unmount(target)
    with pytest.raises(errors.NotFound):
        unmount(tmp_path / "missing")
    with pytest.raises(errors.NotFound):
        Mount("bind", str(tmp_path / "missing"), options=("rbind",)).mount(target)
    # ckfs's own refusal of options longer than a page, not the kernel's EINVAL
    # (which would carry the OSError as its cause).
    with pytest.raises(errors.InvalidArgument) as refused:
        Mount("tmpfs", "tmpfs", options=("size=" + "9" * 5000,)).mount(target)
    assert refused.value.__cause__ is None


@pytest.mark.root
def test_unmount_of_busy_mount(tmp_path: Path, mount_guard: MountGuard) -> None:
    target = mount_guard.mount([Mount("tmpfs", "tmpfs", options=("size=1m",))], tmp_path / "t")
    with open(target / "f", "w"):
        # FailedPrecondition, answered back as EBUSY: the errno it came as.
        with pytest.raises(errors.FailedPrecondition) as busy:
            unmount(target)
        assert errors.to_errno(busy.value) == errno.EBUSY
        unmount(target, lazy=True)
    assert not is_mountpoint(target)


@pytest.mark.root
def test_overlay_longer_than_a_page(tmp_path: Path, mount_guard: MountGuard) -> None:
    # A deep common parent makes every absolute layer path long: 200 of
    # them are ~20 KB of options, relative they are ~1.4 KB.
    base = tmp_path / ("d" * 100) / ("e" * 100)
    lowers = []
    for i in range(200):
        layer = base / str(i) / "fs"
        layer.mkdir(parents=True)
        (layer / f"file-{i}").write_text(str(i))
        (layer / "shadowed").write_text(str(i))
        lowers.append(layer)
    (base / "up" / "fs").mkdir(parents=True)
    (base / "up" / "work").mkdir()
    options = (
        f"workdir={base / 'up' / 'work'}",
        f"upperdir={base / 'up' / 'fs'}",
        "lowerdir=" + ":".join(str(p) for p in reversed(lowers)),
    )
    assert len(",".join(options)) > m.PAGE_SIZE
    cwd = os.getcwd()
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        # Another thread must never observe a changed working directory.
        while not stop.is_set():
            seen.append(os.getcwd())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        target = mount_guard.mount([Mount("overlay", "overlay", options=options)], tmp_path / "t")
    finally:
        stop.set()
        watcher.join()
    assert os.getcwd() == cwd
    assert set(seen) <= {cwd}
    assert len(os.listdir(target)) == 201
    assert (target / "shadowed").read_text() == "199"
    (target / "new").write_text("upper")
    assert (base / "up" / "fs" / "new").read_text() == "upper"
    unmount(target)


@pytest.mark.root
def test_too_long_even_relative(tmp_path: Path, mount_guard: MountGuard) -> None:
    lowers = [tmp_path / ("x" * 40 + str(i)) for i in range(120)]
    options = ("lowerdir=" + ":".join(str(p) for p in lowers),)
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(errors.InvalidArgument) as refused:
        Mount("overlay", "overlay", options=options).mount(target)
    assert refused.value.__cause__ is None  # ckfs's refusal, not the kernel's


@pytest.mark.root
def test_stale_fuse_mount_is_detected_and_detached(tmp_path: Path, mount_guard: MountGuard) -> None:
    # A FUSE connection whose device is closed without ever answering is
    # what a daemon killed with -9 leaves: every access fails with ENOTCONN.
    target = tmp_path / "fuse"
    target.mkdir()
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        options = (f"fd={fd}", "rootmode=40000", "user_id=0", "group_id=0")
        mount_guard.mount([Mount("fuse.ckfs-test", "ckfs-test", options=options)], target)
    finally:
        os.close(fd)
    assert is_mountpoint(target)
    assert is_stale(target)
    assert m.clean_stale(tmp_path) == [str(target)]
    assert not is_mountpoint(target)
    assert not is_stale(target)


@pytest.mark.root
def test_guard_detaches_only_its_own_leftovers(tmp_path: Path, mount_guard: MountGuard) -> None:
    inner = MountGuard(tmp_path / "inner")
    (tmp_path / "inner").mkdir()
    inner.mount([Mount("tmpfs", "tmpfs", options=("size=1m",))], tmp_path / "inner" / "a")
    mount_all([Mount("tmpfs", "tmpfs", options=("size=1m",))], tmp_path / "inner" / "a")
    (tmp_path / "inner" / "a" / "b").mkdir()
    mount_all([Mount("tmpfs", "tmpfs", options=("size=1m",))], tmp_path / "inner" / "a" / "b")
    # A sibling of the guarded directory whose name shares its prefix.
    outside = mount_guard.mount([Mount("tmpfs", "tmpfs")], tmp_path / "inner-not")
    with pytest.raises(ValueError):
        inner.mount([Mount("tmpfs", "tmpfs")], outside)
    assert len(inner.leftovers()) == 3
    assert len(inner.release()) == 3
    assert inner.leftovers() == []
    assert is_mountpoint(outside)
