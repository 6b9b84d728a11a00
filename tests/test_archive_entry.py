"""The entry rules (`ckfs.archive.entry`): one table per rule, no filesystem.

Each case builds a header with `tests.tarbuild` (as the tar writer would)
and checks what `from_tarinfo` makes of it: the `Entry`, or which outcome
(`BadEntry` refuses the layer, `SkipEntry` skips the entry). The applier's
own tests check that it acts on these entries; here only the interpretation
is checked, so it can be shared by indexes that never touch a disk.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import struct
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckfs.archive.entry import (
    MAX_ID,
    NAME_MAX,
    PATH_MAX,
    BadEntry,
    Entry,
    Kind,
    SkipEntry,
    from_tarinfo,
    normalize_path,
)
from ckfs.archive.secure import MAX_DEPTH
from ckfs.archive.tarstream import TarStream
from ckfs.errors import InvalidArgument
from tests.tarbuild import B, C, D, F, H, L, P, W, tar
from tests.tarbuild import Entry as Built

CAP_V2 = bytes.fromhex("0100000200200000000000000000000000000000")
CAP_V3 = struct.pack("<IIIIII", 0x03000000, 1 << 13, 0, 0, 0, 1000)


def entry(built: Built, **kwargs: int | str) -> Entry:
    return from_tarinfo(built.info, **kwargs)  # type: ignore[arg-type]


def parsed(*built: Built) -> list[tarfile.TarInfo]:
    """The headers as the applier sees them: written, then read back."""
    return list(TarStream(io.BytesIO(tar(*built))).members())


# -- kinds ---------------------------------------------------------------------


def test_every_kind() -> None:
    assert entry(F("etc/passwd", b"root", mode=0o640, uid=1, gid=2)) == Entry(
        "etc/passwd",
        Kind.FILE,
        mode=0o640,
        uid=1,
        gid=2,
        size=4,
        mtime_ns=1_000_000 * 10**9,
        atime_ns=1_000_000 * 10**9,
    )
    assert entry(D("etc/")).kind is Kind.DIR
    assert entry(D("etc/")).path == "etc"
    sym = entry(L("bin", "usr/bin"))
    assert (sym.kind, sym.link, sym.mode) == (Kind.SYMLINK, "usr/bin", 0o777)
    hard = entry(H("a/b", "./c/../d"))
    assert (hard.kind, hard.link) == (Kind.HARDLINK, "d")
    chr_ = entry(C("dev/null", 1, 3))
    assert (chr_.kind, chr_.devmajor, chr_.devminor, chr_.mode) == (Kind.CHAR, 1, 3, 0o666)
    blk = entry(B("dev/sda", 8, 0))
    assert (blk.kind, blk.devmajor, blk.devminor) == (Kind.BLOCK, 8, 0)
    assert entry(P("run/fifo")).kind is Kind.FIFO


def test_kind_values_are_stable() -> None:
    """Indexes store kinds as integers: renumbering would misread old indexes."""
    assert [(k.name, int(k)) for k in Kind] == [
        ("FILE", 0),
        ("DIR", 1),
        ("SYMLINK", 2),
        ("HARDLINK", 3),
        ("CHAR", 4),
        ("BLOCK", 5),
        ("FIFO", 6),
        ("WHITEOUT", 7),
        ("OPAQUE", 8),
    ]


@pytest.mark.parametrize("type_", [tarfile.AREGTYPE, tarfile.CONTTYPE])
def test_old_regular_types_are_files(type_: bytes) -> None:
    built = F("f", b"x")
    built.info.type = type_
    assert entry(built).kind is Kind.FILE


@pytest.mark.parametrize("type_", [b"V", b"Z", tarfile.GNUTYPE_LONGNAME])
def test_unknown_types_are_skipped(type_: bytes) -> None:
    built = F("odd", b"data")
    built.info.type = type_
    with pytest.raises(SkipEntry, match="unsupported entry type"):
        entry(built)


def test_size_only_for_files() -> None:
    built = H("h", "f")
    built.info.size = 10
    assert entry(built).size == 0


def test_entries_are_frozen_and_hashable() -> None:
    e = entry(F("f"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.path = "g"  # type: ignore[misc]
    assert {e: 1}[entry(F("f"))] == 1
    assert e.parts == ["f"]
    assert entry(D("./")).parts == []


# -- paths ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("a/b", "a/b"),
        ("./a/b", "a/b"),
        ("/a/b", "a/b"),
        ("a//b/./c/", "a/b/c"),
        ("../../etc/passwd", "etc/passwd"),
        ("/../../etc/passwd", "etc/passwd"),
        ("a/../../etc/x", "etc/x"),
        ("a/b/../c", "a/c"),
        ("a/..b/c..", "a/..b/c.."),
        ("...", "..."),
        ("./", ""),
        ("/", ""),
        ("..", ""),
        ("a/..", ""),
    ],
)
def test_paths_are_cleaned_as_if_chrooted(name: str, path: str) -> None:
    assert normalize_path(name) == path


def test_names_keep_undecodable_bytes() -> None:
    name = b"caf\xe9/\x1b[31m".decode("utf-8", "surrogateescape")
    assert normalize_path(name) == name
    assert entry(F(name)).path == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("a/b\0c", "null byte"),
        ("a/" + "x" * (NAME_MAX + 1), "longer than 255 bytes"),
        ("a/" + "é" * 128, "longer than 255 bytes"),  # 256 bytes in UTF-8
        ("/".join(["d"] * (MAX_DEPTH + 1)), "nested too deep"),
    ],
)
def test_bad_paths_are_refused(name: str, reason: str) -> None:
    with pytest.raises(BadEntry, match=reason):
        normalize_path(name, what="layer x")
    with pytest.raises(BadEntry, match=reason):
        entry(F(name))


def test_limits_themselves_are_accepted() -> None:
    assert normalize_path("x" * NAME_MAX) == "x" * NAME_MAX
    assert normalize_path("é" * 127) == "é" * 127
    deep = "/".join(["d"] * MAX_DEPTH)
    assert normalize_path(deep) == deep
    # `..` components do not count towards the depth, only what remains.
    assert normalize_path("a/../" * (MAX_DEPTH + 5) + "b") == "b"
    # The total length is not bounded here (the applier walks by descriptors).
    long = "/".join(["y" * 200] * 40)
    assert normalize_path(long) == long


def test_bad_entry_is_invalid_argument_naming_layer_and_entry() -> None:
    with pytest.raises(InvalidArgument, match=r"^layer sha256:ab: entry 'a/b\\x00c': "):
        entry(F("a/b\0c"), what="layer sha256:ab")


def test_messages_quote_only_the_head_of_a_long_name() -> None:
    with pytest.raises(BadEntry) as info:
        entry(F("/".join(["d"] * 10_000)))
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("built", [F("./"), F("/"), L("..", "x"), P("."), H("./", "a")])
def test_root_must_stay_a_directory(built: Built) -> None:
    with pytest.raises(BadEntry, match="type of the root directory"):
        entry(built)


def test_root_directory_entry_is_the_empty_path() -> None:
    root = entry(D("./", mode=0o700, uid=5))
    assert (root.path, root.kind, root.mode, root.uid) == ("", Kind.DIR, 0o700, 5)


# -- whiteouts -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "path"),
    [
        ("a/.wh.b", Kind.WHITEOUT, "a/b"),
        (".wh.b", Kind.WHITEOUT, "b"),
        ("./a/b/.wh..hidden", Kind.WHITEOUT, "a/b/.hidden"),
        ("../../a/.wh.b", Kind.WHITEOUT, "a/b"),
        ("a/.wh..wh..opq", Kind.OPAQUE, "a"),
        (".wh..wh..opq", Kind.OPAQUE, ""),
        ("/a/b/.wh..wh..opq", Kind.OPAQUE, "a/b"),
    ],
)
def test_whiteouts(name: str, kind: Kind, path: str) -> None:
    assert entry(W(name)) == Entry(path, kind)


def test_marker_type_and_metadata_do_not_matter() -> None:
    """A marker only names a deletion: its own metadata is never read."""
    for built in (D("a/.wh.b", uid=-5), L("a/.wh.b", ""), F("a/.wh.b", mtime=float("inf"))):
        assert entry(built) == Entry("a/b", Kind.WHITEOUT)


@pytest.mark.parametrize("name", ["a/.wh..wh.plnk", ".wh..wh.orph", "a/.wh..wh..opq2"])
def test_reserved_whiteout_names_are_skipped(name: str) -> None:
    with pytest.raises(SkipEntry, match="reserved whiteout name"):
        entry(W(name))


@pytest.mark.parametrize("name", ["a/.wh.", "a/.wh..", "a/.wh...", ".wh.."])
def test_whiteouts_naming_no_child_are_refused(name: str) -> None:
    with pytest.raises(BadEntry, match="names no child"):
        entry(W(name))


# -- sizes, owners, modes, times ---------------------------------------------------


def test_size_limit() -> None:
    built = F("big")
    built.info.size = 101
    with pytest.raises(BadEntry, match="101 bytes, over the limit of 100"):
        entry(built, max_size=100)
    built.info.size = 100
    assert entry(built, max_size=100).size == 100
    built.info.size = -1
    with pytest.raises(BadEntry, match="-1 bytes"):
        entry(built)


@pytest.mark.parametrize(("uid", "gid"), [(-1, 0), (0, -1), (MAX_ID + 1, 0), (0, 1 << 33)])
def test_invalid_owners_are_refused(uid: int, gid: int) -> None:
    with pytest.raises(BadEntry, match=r"'f'.*invalid owner"):
        entry(F("f", uid=uid, gid=gid))


def test_largest_owner_is_accepted() -> None:
    assert entry(F("f", uid=MAX_ID, gid=MAX_ID)).uid == MAX_ID


def test_modes_keep_setuid_setgid_sticky_only() -> None:
    assert entry(F("f", mode=0o104755)).mode == 0o4755
    assert entry(F("f", mode=0o2711)).mode == 0o2711
    assert entry(D("tmp/", mode=0o41777)).mode == 0o1777


@pytest.mark.parametrize(
    ("mtime", "pax", "atime_ns", "mtime_ns"),
    [
        (1.5, {}, 1_500_000_000, 1_500_000_000),
        (7, {"mtime": "1234.123456789"}, 1_234_123_456_789, 1_234_123_456_789),
        (7, {"mtime": "1.5", "atime": "2.25"}, 2_250_000_000, 1_500_000_000),
        (7, {"mtime": "-1.5"}, -1_500_000_000, -1_500_000_000),
        (7, {"mtime": "1.1234567891"}, 1_123_456_789, 1_123_456_789),  # cut to ns
        (7, {"mtime": "junk"}, 7_000_000_000, 7_000_000_000),  # the header's own
    ],
)
def test_times(mtime: float, pax: dict[str, str], atime_ns: int, mtime_ns: int) -> None:
    e = entry(F("f", mtime=mtime, pax=pax))
    assert (e.atime_ns, e.mtime_ns) == (atime_ns, mtime_ns)


@pytest.mark.parametrize("mtime", [float("inf"), float("nan")])
def test_impossible_times_are_refused(mtime: float) -> None:
    with pytest.raises(BadEntry, match="'f'"):
        entry(F("f", mtime=mtime))


def test_pax_times_survive_a_real_tar() -> None:
    (m,) = parsed(F("f", pax={"mtime": "1700000000.123456789", "atime": "5"}))
    e = from_tarinfo(m)
    assert (e.mtime_ns, e.atime_ns) == (1_700_000_000_123_456_789, 5_000_000_000)


# -- links and devices ------------------------------------------------------------


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/shadow", "a//b/./", "x" * 4095])
def test_symlink_targets_are_kept_as_written(target: str) -> None:
    assert entry(L("l", target)).link == target


def test_symlink_to_nothing_is_skipped() -> None:
    with pytest.raises(SkipEntry, match="empty target"):
        entry(L("l", ""))


@pytest.mark.parametrize(
    ("target", "reason"),
    [("a\0b", "null byte"), ("x" * PATH_MAX, "4096 bytes"), ("é" * 2048, "4096 bytes")],
)
def test_bad_symlink_targets_are_refused(target: str, reason: str) -> None:
    with pytest.raises(BadEntry, match=reason):
        entry(L("l", target))


@pytest.mark.parametrize(
    ("target", "link"),
    [("a/b", "a/b"), ("/a/b", "a/b"), ("../../a/b", "a/b"), ("./x/../y", "y")],
)
def test_hardlink_targets_are_layer_paths(target: str, link: str) -> None:
    assert entry(H("h", target)).link == link


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("", "hardlink to the root directory"),
        ("/", "hardlink to the root directory"),
        ("a/../..", "hardlink to the root directory"),
        ("a\0", "link target: embedded null byte"),
        ("/".join(["d"] * (MAX_DEPTH + 1)), "link target: nested too deep"),
    ],
)
def test_bad_hardlink_targets_are_refused(target: str, reason: str) -> None:
    with pytest.raises(BadEntry, match=reason):
        entry(H("h", target))


@pytest.mark.parametrize(("major", "minor"), [(4095, (1 << 20) - 1), (0, 0), (259, 1 << 19)])
def test_device_numbers_the_kernel_encodes(major: int, minor: int) -> None:
    e = entry(C("dev/x", major, minor))
    assert (e.devmajor, e.devminor) == (major, minor)


@pytest.mark.parametrize(("major", "minor"), [(4096, 0), (0, 1 << 20), (-1, 0), (0, -1)])
def test_device_numbers_out_of_range_are_refused(major: int, minor: int) -> None:
    with pytest.raises(BadEntry, match="device number"):
        entry(B("dev/x", major, minor))


def test_fifo_ignores_device_fields() -> None:
    built = P("p")
    built.info.devmajor, built.info.devminor = 1 << 40, -3
    e = entry(built)
    assert (e.devmajor, e.devminor) == (0, 0)


# -- sparse files ----------------------------------------------------------------------


def test_sparse_map_is_kept() -> None:
    built = F("s")
    built.info.size = 200
    built.info.sparse = [(0, 10), (100, 5), (200, 0)]  # type: ignore[assignment]
    assert entry(built).sparse == ((0, 10), (100, 5), (200, 0))
    assert entry(F("dense", b"x")).sparse is None


@pytest.mark.parametrize("region", [(-1, 5), (0, -1), (150, 51), (201, 0)])
def test_sparse_regions_outside_the_file_are_refused(region: tuple[int, int]) -> None:
    built = F("s")
    built.info.size = 200
    built.info.sparse = [(0, 10), region]  # type: ignore[assignment]
    with pytest.raises(BadEntry, match="sparse map out of range"):
        entry(built)


# -- xattrs --------------------------------------------------------------------------


def test_xattrs_exact_bytes_and_capabilities_survive_a_real_tar() -> None:
    xattrs = {
        "security.capability": CAP_V2,
        "user.bin": b"\x00\xff\x80",
        "trusted.x": b"",
        "user.text": "é".encode(),
    }
    (m,) = parsed(F("usr/bin/ping", b"x", xattrs=xattrs))
    assert dict(from_tarinfo(m).xattrs) == xattrs


@pytest.mark.parametrize("cap", [CAP_V2, CAP_V3, struct.pack("<IIIII", 0x02000000, 1, 0, 0, 0)])
def test_capability_headers_the_kernel_accepts(cap: bytes) -> None:
    assert entry(F("f", xattrs={"security.capability": cap})).xattrs == (
        ("security.capability", cap),
    )


@pytest.mark.parametrize(
    "cap",
    [
        struct.pack("<III", 0x01000000, 1, 0),  # v1: refused by setxattr
        struct.pack("<IIIII", 0x03000000, 1, 0, 0, 0),  # v3 magic, v2 size
        struct.pack("<IIIIII", 0x02000000, 1, 0, 0, 0, 0),  # v2 magic, v3 size
        struct.pack("<IIIII", 0x02000003, 1, 0, 0, 0),  # unknown flag
        b"",
        b"\x01" * 20,
    ],
)
def test_capability_headers_the_kernel_refuses(cap: bytes) -> None:
    with pytest.raises(BadEntry, match=r"security\.capability"):
        entry(F("f", xattrs={"security.capability": cap}))


def test_overlay_xattrs_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        e = entry(
            D(
                "d/",
                xattrs={
                    "trusted.overlay.opaque": b"y",
                    "user.overlay.redirect": b"/x",
                    "user.keep": b"1",
                },
            ),
            what="layer L",
        )
    assert e.xattrs == (("user.keep", b"1"),)
    assert "layer L: 'd/': overlayfs xattr 'trusted.overlay.opaque' ignored" in caplog.text
    assert "'user.overlay.redirect' ignored" in caplog.text


def test_xattrs_outside_linux_namespaces_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        e = entry(F("f", xattrs={"foo.bar": b"1", "user": b"2", "system.x": b"3"}))
    assert e.xattrs == (("system.x", b"3"),)
    assert "'foo.bar' ignored: no such namespace" in caplog.text


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("user.", b"1", "invalid xattr name"),
        ("security.", b"1", "invalid xattr name"),
        ("user.a\0b", b"1", "invalid xattr name"),
        ("user." + "n" * 251, b"1", "longer than 255 bytes"),
        ("user.big", b"v" * (64 * 1024 + 1), "larger than 65536 bytes"),
    ],
)
def test_xattrs_setxattr_refuses_are_refused(name: str, value: bytes, reason: str) -> None:
    with pytest.raises(BadEntry, match=reason):
        entry(F("f", xattrs={name: value}))


def test_xattr_limits_themselves_are_accepted() -> None:
    name = "user." + "n" * 250
    e = entry(F("f", xattrs={name: b"v" * (64 * 1024)}))
    assert [(n, len(v)) for n, v in e.xattrs] == [(name, 64 * 1024)]


def test_pax_records_other_than_xattrs_are_not_xattrs() -> None:
    e = entry(F("f", pax={"comment": "hello", "LIBARCHIVE.xattr.user.x": "eA=="}))
    assert e.xattrs == ()


# -- property: whatever the name, the outcome is defined and the path is clean ---------


_component = st.sampled_from(["", ".", "..", "a", "b", ".wh.c", ".wh..wh..opq", "é", "\0"])


@given(st.lists(_component, max_size=12), st.booleans(), st.sampled_from([D, F, P]))
@settings(max_examples=400, deadline=None)
def test_any_name_gives_a_clean_path_or_a_defined_outcome(
    parts: list[str], absolute: bool, make: object
) -> None:
    name = ("/" if absolute else "") + "/".join(parts)
    try:
        e = entry(make(name))  # type: ignore[operator]
    except (BadEntry, SkipEntry):
        return
    assert "\0" not in e.path
    assert not e.path.startswith("/")
    assert all(p not in ("", ".", "..") for p in e.parts)
    if e.kind is Kind.WHITEOUT:
        assert e.path


def test_lone_surrogates_are_no_names() -> None:
    """A TOC's JSON can spell text no bytes stand for; a tar cannot."""
    for built in (F("a/\ud800"), L("l", "\udbff"), H("h", "x\ud800")):
        with pytest.raises(BadEntry, match="lone surrogate"):
            entry(built)
    with pytest.raises(BadEntry, match="lone surrogate"):
        entry(F("f", xattrs={}, pax={"SCHILY.xattr.user.\ud800": "v"}))
    with pytest.raises(BadEntry, match=r"user\.x"):
        entry(F("f", pax={"SCHILY.xattr.user.x": "\ud800"}))


_anyint = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.sampled_from([0, -1, MAX_ID, MAX_ID + 1, (1 << 63) - 1, 4095, 4096, 1 << 20]),
)
_text = st.text(st.characters(codec=None, blacklist_categories=()), max_size=20)
_pax = st.dictionaries(
    st.one_of(
        st.sampled_from(["mtime", "atime", "comment"]),
        st.builds(
            lambda n: "SCHILY.xattr." + n,
            st.one_of(
                _text,
                st.sampled_from(
                    ["user.a", "security.capability", "trusted.overlay.opaque", "user.", "x.y"]
                ),
            ),
        ),
    ),
    st.one_of(_text, st.sampled_from(["1.5", "-3", "inf", "nan", "1e9", "99999999999999999999"])),
    max_size=4,
)


@given(
    name=st.one_of(_text, st.lists(_component, max_size=6).map("/".join)),
    type_=st.sampled_from(
        [
            tarfile.REGTYPE,
            tarfile.DIRTYPE,
            tarfile.SYMTYPE,
            tarfile.LNKTYPE,
            tarfile.CHRTYPE,
            tarfile.BLKTYPE,
            tarfile.FIFOTYPE,
            b"Q",
        ]
    ),
    link=_text,
    nums=st.tuples(_anyint, _anyint, _anyint, _anyint, _anyint, _anyint),
    mtime=st.one_of(_anyint, st.floats(allow_nan=True, allow_infinity=True)),
    pax=_pax,
)
@settings(max_examples=600, deadline=None)
def test_any_header_gives_an_entry_within_the_rules_or_a_defined_outcome(
    name: str,
    type_: bytes,
    link: str,
    nums: tuple[int, int, int, int, int, int],
    mtime: float,
    pax: dict[str, str],
) -> None:
    m = tarfile.TarInfo(name)
    m.type = type_
    m.linkname = link
    m.uid, m.gid, m.mode, m.size, m.devmajor, m.devminor = nums
    m.mtime = mtime
    m.pax_headers = pax
    try:
        e = from_tarinfo(m)
    except (BadEntry, SkipEntry):
        return
    for p in e.parts:
        assert p not in ("", ".", "..") and "\0" not in p
        assert len(p.encode("utf-8", "surrogateescape")) <= NAME_MAX
    assert 0 <= e.uid <= MAX_ID and 0 <= e.gid <= MAX_ID and 0 <= e.mode <= 0o7777
    assert 0 <= e.size <= (1 << 36)
    assert 0 <= e.devmajor < 1 << 12 and 0 <= e.devminor < 1 << 20
    if e.kind is Kind.HARDLINK:
        assert e.link and not e.link.startswith("/") and ".." not in e.link.split("/")
    if e.kind is Kind.SYMLINK:
        assert 0 < len(e.link.encode("utf-8", "surrogateescape")) < PATH_MAX
    for xname, value in e.xattrs:
        assert xname.startswith(("security.", "system.", "trusted.", "user."))
        assert not xname.startswith(("trusted.overlay.", "user.overlay."))
        assert isinstance(value, bytes) and len(value) <= 64 << 10
