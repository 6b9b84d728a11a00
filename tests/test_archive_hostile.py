"""Hostile layers: whatever a tar says, nothing outside root changes.

Every case applies a hand-built tar to ``jail/root``, where ``jail`` also
holds sentinel files, a directory, a symlink and (for overlay mode) a lower
layer. Before and after, the jail minus root is snapshotted (names, types,
contents, modes, owners, mtimes, xattrs) and must be identical; no file in
root may share an inode with a file outside it; and no canary path on the
host may appear. Names that would reach the host if a check failed are
unique canaries, never real system files.

Every apply runs `confined` (tests/confine.py): in a forked child whose
mount namespace leaves only the test's scratch directory writable. Escapes
into the jail are still possible and caught by the snapshot; an escape to
the host fails with EROFS, failing the test instead of changing the
machine. This matters: a deliberately broken copy of the applier, run
unconfined as root while checking that these tests catch escapes, once
deleted the host's /etc. Never run this file's cases unconfined.

Modelled on umoci's ``tar_extract_test.go`` tables plus its fuzzer
(`test_random_layers_stay_inside`).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckfs.archive import ApplyOptions, ApplyResult, apply_layer
from ckfs.errors import InvalidArgument
from tests import treecmp
from tests.confine import confined
from tests.tarbuild import B, C, D, Entry, F, H, L, W, tar

CANARY = f"ckfs-canary-{os.getpid()}"


def make_jail(base: Path) -> Path:
    """jail/{root, sentinel, outside, sdir/inner, lower/...}; root pre-populated."""
    jail = base / "jail"
    root = jail / "root"
    (root / "etc").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "etc/passwd").write_bytes(b"root-passwd")
    (root / "etc/shadow").write_bytes(b"root-shadow")
    (root / "bin/sh").write_bytes(b"sh")
    os.symlink("../sentinel", root / "lnk")
    os.symlink("../sdir", root / "sdirlink")
    (jail / "sentinel").write_bytes(b"keep")
    (jail / "outside").write_bytes(b"outside")
    (jail / "sdir").mkdir()
    (jail / "sdir/inner").write_bytes(b"inner")
    lower = jail / "lower"
    (lower / "dir").mkdir(parents=True)
    (lower / "file").write_bytes(b"lower")
    (lower / "dir/x").write_bytes(b"x")
    os.symlink("../..", lower / "up")
    # Links an overlay upper follows as the mount would, never out of root.
    os.symlink("/etc", lower / "etclink")
    os.symlink(str(jail), lower / "jaillink")
    os.symlink("loop2", lower / "loop1")
    os.symlink("/loop1", lower / "loop2")
    os.symlink("file", lower / "tofile")
    os.symlink("hop/sub", lower / "chain")
    lower2 = jail / "lower2"
    (lower2 / "opt/real").mkdir(parents=True)
    os.chmod(lower2 / "opt/real", 0o711)
    os.symlink("../../../opt/real", lower2 / "hop")
    return jail


def apply_confined(scratch: Path, root: Path, blob: bytes, opts: ApplyOptions) -> ApplyResult:
    """Apply *blob* to *root* where nothing but *scratch* can be written."""
    return confined(scratch, _apply, root, blob, opts)


def _apply(root: Path, blob: bytes, opts: ApplyOptions) -> ApplyResult:
    return apply_layer(root, io.BytesIO(blob), media_type=None, diff_id=None, options=opts)


def outside_inodes(jail: Path) -> set[tuple[int, int]]:
    found = set()
    for p in [*jail.rglob("*"), Path("/etc/passwd"), Path("/etc/shadow")]:
        if p.is_relative_to(jail / "root") or not p.exists():
            continue
        st_ = p.lstat()
        if not stat.S_ISDIR(st_.st_mode):
            found.add((st_.st_dev, st_.st_ino))
    return found


def host_canaries() -> list[Path]:
    return [p for p in (Path("/") / CANARY, Path("/tmp") / CANARY) if os.path.lexists(p)]


def check_contained(jail: Path, before: dict[str, treecmp.Node]) -> None:
    after = treecmp.snapshot(jail, exclude=["root"])
    treecmp.assert_same(before, after, ignore=())
    outside = outside_inodes(jail)
    for dirpath, dirnames, filenames in os.walk(jail / "root"):
        for name in filenames + dirnames:
            st_ = os.lstat(os.path.join(dirpath, name))
            if not stat.S_ISDIR(st_.st_mode):
                assert (st_.st_dev, st_.st_ino) not in outside, f"{dirpath}/{name} links outside"
    assert not host_canaries()


@dataclass
class Case:
    id: str
    entries: Callable[[Path], list[Entry]]
    raises: type[Exception] | None = None
    whiteouts: str = "delete"
    options: dict[str, Any] = field(default_factory=dict)
    check: Callable[[Path, Path], None] | None = None  # (root, jail)
    format: int | None = None


def read(root: Path, rel: str) -> bytes:
    return (root / rel).read_bytes()


def lands(rel: str, data: bytes = b"pwn") -> Callable[[Path, Path], None]:
    """The written file ended up at root/rel."""

    def check(root: Path, jail: Path) -> None:
        assert read(root, rel) == data

    return check


def absent(*rels: str) -> Callable[[Path, Path], None]:
    def check(root: Path, jail: Path) -> None:
        for rel in rels:
            assert not os.path.lexists(root / rel), rel

    return check


def same_inode(a: str, b: str) -> Callable[[Path, Path], None]:
    def check(root: Path, jail: Path) -> None:
        assert (root / a).lstat().st_ino == (root / b).lstat().st_ino

    return check


def both(*checks: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def check(root: Path, jail: Path) -> None:
        for c in checks:
            c(root, jail)

    return check


def in_jail_path(jail: Path, *rest: str) -> str:
    """The jail's absolute path as it lands inside root."""
    return str(Path(str(jail).lstrip("/"), *rest))


def _check_hardlinked_symlink(root: Path, jail: Path) -> None:
    assert (root / "h").is_symlink()
    assert os.readlink(root / "h") == str(jail / "outside")
    assert (root / "h").lstat().st_ino == (root / "s").lstat().st_ino


def _check_copied_up(root: Path, jail: Path) -> None:
    assert read(root, "file") == b"lower"
    assert (root / "h2").lstat().st_ino == (root / "file").lstat().st_ino
    assert not (root / "h").exists()


def _check_only_l(root: Path, jail: Path) -> None:
    assert sorted(os.listdir(root)) == ["l"]


def _check_no_overlay_xattrs(root: Path, jail: Path) -> None:
    for p in (root / "f", root / "d"):
        names = os.listxattr(p, follow_symlinks=False)
        assert not [n for n in names if "overlay" in n], names


def _check_upper_whiteout(root: Path, jail: Path) -> None:
    st_ = (root / "file").lstat()
    assert stat.S_ISCHR(st_.st_mode) and st_.st_rdev == 0


def _check_etclink(root: Path, jail: Path) -> None:
    assert read(root, f"etc/{CANARY}") == b"pwn"
    assert not (root / "etclink").exists()
    assert not Path("/etc", CANARY).exists()


def _check_chain(root: Path, jail: Path) -> None:
    assert read(root, "opt/real/sub/x") == b"pwn"
    assert stat.S_IMODE((root / "opt/real").stat().st_mode) == 0o711
    assert sorted(os.listdir(root)) == ["opt"]


def _check_lnk_replaced(root: Path, jail: Path) -> None:
    assert not (root / "lnk").is_symlink()
    assert read(root, "lnk") == b"pwn"


CASES = [
    # -- names that climb or are absolute -----------------------------------
    Case("dotdot", lambda j: [F("../sentinel", b"pwn")], check=lands("sentinel")),
    Case(
        "dotdot-chain", lambda j: [F("../../../../../../sentinel", b"pwn")], check=lands("sentinel")
    ),
    Case("dotdot-middle", lambda j: [F("a/../../sentinel", b"pwn")], check=lands("sentinel")),
    Case("dot-dotdot", lambda j: [F("./../outside", b"pwn")], check=lands("outside")),
    Case("absolute", lambda j: [F("/sentinel", b"pwn")], check=lands("sentinel")),
    Case("absolute-dotdot", lambda j: [F(f"/../../{CANARY}", b"pwn")], check=lands(CANARY)),
    Case(
        "absolute-jail-path",
        lambda j: [F(str(j / "sentinel"), b"pwn")],
        check=lambda r, j: lands(in_jail_path(j, "sentinel"))(r, j),
    ),
    Case(
        "pax-long-name-dotdot",
        lambda j: [F("a/" * 60 + "../" * 70 + "sentinel", b"pwn")],
        check=lands("sentinel"),
    ),
    Case(
        "gnu-long-name-dotdot",
        lambda j: [F("a/" * 60 + "../" * 70 + "sentinel", b"pwn")],
        check=lands("sentinel"),
        format=tarfile.GNU_FORMAT,
    ),
    Case("too-deep", lambda j: [F("a/" * 600 + "f")], raises=InvalidArgument),
    # -- writing through symlinked parents -----------------------------------
    Case(
        "symlink-parent-to-slash",
        lambda j: [L("l", "/"), F(f"l/{CANARY}", b"pwn")],
        check=lands(CANARY),
    ),
    Case(
        "symlink-parent-to-dotdot2",
        lambda j: [L("l", "../.."), F("l/sentinel", b"pwn")],
        check=lands("sentinel"),
    ),
    Case(
        "symlink-parent-to-dotdot",
        lambda j: [L("l", ".."), F("l/outside", b"pwn")],
        check=lands("outside"),
    ),
    Case(
        "symlink-parent-absolute-jail",
        lambda j: [L("l", str(j)), F("l/sentinel", b"pwn")],
        check=lambda r, j: lands(in_jail_path(j, "sentinel"))(r, j),
    ),
    Case(
        "symlink-chain",
        lambda j: [L("a", "b"), L("b", "c"), L("c", "../../.."), F("a/sentinel", b"pwn")],
        check=lands("sentinel"),
    ),
    Case(
        "symlink-chain-through-dirs",
        lambda j: [D("d/"), L("d/up", "../../.."), L("x", "d/up/d/up"), F("x/sentinel", b"pwn")],
        check=lands("sentinel"),
    ),
    Case(
        "symlink-deep-dotdot",
        lambda j: [
            D("a/"),
            D("a/b/"),
            D("a/b/c/"),
            L("a/b/c/l", "../../../../../../.."),
            F("a/b/c/l/sentinel", b"pwn"),
        ],
        check=lands("sentinel"),
    ),
    Case("symlink-loop", lambda j: [L("x", "y"), L("y", "x"), F("x/f")], raises=InvalidArgument),
    Case("symlink-self-loop", lambda j: [L("s", "s"), F("s/f")], raises=InvalidArgument),
    Case(
        "symlink-deep-expansion",
        lambda j: [L("x", "a/" * 400), F("x/" + "b/" * 200 + "f")],
        raises=InvalidArgument,
    ),
    Case(
        "preexisting-symlink-dir",
        lambda j: [F("sdirlink/inner", b"pwn")],
        check=lands("sdir/inner"),
    ),
    # -- replacing, then writing through --------------------------------------
    Case(
        "file-to-symlink-outside-then-write",
        lambda j: [F("f", b"1"), L("f", str(j / "sentinel")), F("f", b"pwn")],
        check=lands("f"),
    ),
    Case(
        "symlink-metadata-not-followed",
        lambda j: [
            L("s", "../sentinel", uid=4242, gid=4242, mtime=5),
            L("t", str(j / "sdir"), uid=4242, gid=4242, mtime=5),
            D("t/", mode=0o700, uid=4242),
        ],
    ),
    Case(
        "file-to-symlink-dotdot-then-write",
        lambda j: [F("f", b"1"), L("f", "../sentinel"), F("f", b"pwn")],
        check=lands("f"),
    ),
    Case(
        "preexisting-symlink-replaced",
        lambda j: [F("lnk", b"pwn")],
        check=_check_lnk_replaced,
    ),
    Case(
        "dir-to-symlink-then-children",
        lambda j: [D("d/"), F("d/x"), L("d", "../.."), F("d/sentinel", b"pwn")],
        check=lands("sentinel"),
    ),
    Case(
        "symlink-to-dir-entry",
        lambda j: [L("d", str(j)), D("d/"), F("d/sentinel", b"pwn")],
        check=lands("d/sentinel"),
    ),
    # -- hardlinks ---------------------------------------------------------------
    Case(
        "hardlink-etc-shadow",
        lambda j: [H("shadow", "/etc/shadow")],
        check=same_inode("shadow", "etc/shadow"),
    ),
    Case("hardlink-dotdot-outside", lambda j: [H("o", "../outside")], check=absent("o")),
    Case(
        "hardlink-dotdot-chain",
        lambda j: [H("p", "../../../../etc/passwd")],
        check=same_inode("p", "etc/passwd"),
    ),
    Case(
        "hardlink-through-symlinked-dir",
        lambda j: [L("e", "../../../etc"), H("h", "e/shadow"), L("u", ".."), H("o", "u/outside")],
        check=both(same_inode("h", "etc/shadow"), absent("o")),
    ),
    Case(
        "hardlink-to-symlink-outside",
        lambda j: [L("s", str(j / "outside")), H("h", "s")],
        check=_check_hardlinked_symlink,
    ),
    Case(
        "hardlink-long-gnu-dotdot",
        lambda j: [H("h", "../" * 60 + "etc/passwd")],
        check=same_inode("h", "etc/passwd"),
        format=tarfile.GNU_FORMAT,
    ),
    Case("hardlink-to-dir", lambda j: [D("d/"), H("h", "d")], raises=InvalidArgument),
    Case("hardlink-to-root", lambda j: [H("h", "..")], raises=InvalidArgument),
    Case(
        "hardlink-then-overwrite",
        lambda j: [H("p", "etc/passwd"), F("p", b"pwn")],
        check=both(lands("p"), lands("etc/passwd", b"root-passwd")),
    ),
    # -- whiteouts ---------------------------------------------------------------
    Case("whiteout-dotdotdot", lambda j: [W(".wh...")], raises=InvalidArgument),
    Case("whiteout-dotdot-in-dir", lambda j: [W("etc/.wh..")], raises=InvalidArgument),
    Case("whiteout-empty", lambda j: [W(".wh.")], raises=InvalidArgument),
    Case(
        "whiteout-dotdot-path",
        lambda j: [W("../.wh.sentinel"), W("../../.wh.etc")],
        check=absent("etc"),
    ),
    Case(
        "whiteout-dotdot-trick",
        # Cleaned first: "bin/.wh.../../.wh.sh" is "bin/.wh.sh"; a marker
        # inside a directory named ".wh..." deletes nothing.
        lambda j: [W("bin/.wh.../../.wh.sh"), W("bin/.wh.../.wh.x"), W(".wh.../../.wh.outside")],
        check=absent("bin/sh"),
    ),
    Case(
        "whiteout-symlinked-parent",
        lambda j: [L("l", "../.."), W("l/.wh.sentinel"), W("l/.wh.bin")],
        check=absent("bin"),
    ),
    Case("whiteout-preexisting-symlink", lambda j: [W(".wh.lnk")], check=absent("lnk")),
    Case("whiteout-through-symlink-dir", lambda j: [W("sdirlink/.wh.inner")]),
    Case(
        "opaque-symlinked-parent",
        lambda j: [L("l", "../../.."), W("l/.wh..wh..opq")],
        check=_check_only_l,
    ),
    Case(
        "opaque-symlink-absolute-jail",
        lambda j: [L("l", str(j)), W("l/.wh..wh..opq")],
        check=lambda r, j: lands("etc/passwd", b"root-passwd")(r, j),
    ),
    Case("opaque-through-symlink-dir", lambda j: [W("sdirlink/.wh..wh..opq")]),
    # -- root itself -------------------------------------------------------------
    Case("root-as-file", lambda j: [F(".", b"x")], raises=InvalidArgument),
    Case("root-as-file-dotdot", lambda j: [F("a/..", b"x")], raises=InvalidArgument),
    Case("root-as-symlink", lambda j: [L(".", "/")], raises=InvalidArgument),
    Case("root-as-symlink-dotdot", lambda j: [L("..", str(j))], raises=InvalidArgument),
    Case("root-as-hardlink", lambda j: [H("./", "etc/passwd")], raises=InvalidArgument),
    # -- devices and sizes -------------------------------------------------------
    Case(
        "char-device-not-allowed",
        lambda j: [C("dev/mem", 1, 1)],
        options={"devices": False},
        check=absent("dev/mem"),
    ),
    Case(
        "block-device-not-allowed",
        lambda j: [B("sda", 8, 0)],
        options={"devices": False},
        check=absent("sda"),
    ),
    Case(
        "size-over-limit",
        lambda j: [F("big", b"x" * 11)],
        options={"max_entry_size": 10},
        raises=InvalidArgument,
    ),
    Case(
        "sparse-apparent-size-over-limit",
        lambda j: [F("sp", b"abc", pax={"GNU.sparse.map": "0,3", "GNU.sparse.size": str(1 << 40)})],
        raises=InvalidArgument,
    ),
    Case(
        "sparse-map-beyond-data",
        lambda j: [
            F("sp", b"abc", pax={"GNU.sparse.map": "0,3,10,5000", "GNU.sparse.size": "6000"}),
            F("after", b"after"),
        ],
        raises=InvalidArgument,
    ),
    # -- overlay mode: lowers are outside root and must stay untouched ------------
    Case(
        "overlay-forged-xattrs",
        lambda j: [
            F("f", xattrs={"trusted.overlay.opaque": b"y", "user.overlay.redirect": b"/x"}),
            D("d/", xattrs={"trusted.overlay.redirect": b"/etc"}),
        ],
        whiteouts="overlay",
        check=_check_no_overlay_xattrs,
    ),
    Case(
        "overlay-hardlink-into-lower",
        lambda j: [H("h", "../lower/file"), H("h2", "../../file")],
        whiteouts="overlay",
        options={"lowers": ["lower"]},
        check=_check_copied_up,
    ),
    Case(
        "overlay-hardlink-via-lower-symlink",
        lambda j: [H("h", "up/sentinel"), H("h3", "up/up/outside")],
        whiteouts="overlay",
        options={"lowers": ["lower"]},
        check=absent("h", "h3"),
    ),
    Case(
        "overlay-whiteout-symlinked-parent",
        lambda j: [L("l", "/"), W("l/.wh.file")],
        whiteouts="overlay",
        options={"lowers": ["lower"]},
        check=_check_upper_whiteout,
    ),
    Case(
        "overlay-opaque-symlink-to-lower",
        lambda j: [L("l", str(j / "lower")), W("l/.wh..wh..opq"), W("l/.wh.file")],
        whiteouts="overlay",
        options={"lowers": ["lower"]},
    ),
    Case(
        "overlay-through-lower-link-to-etc",
        lambda j: [F(f"etclink/{CANARY}", b"pwn")],
        whiteouts="overlay",
        options={"lowers": ["lower"]},
        check=_check_etclink,
    ),
    Case(
        "overlay-through-lower-link-to-the-jail",
        lambda j: [F("jaillink/sentinel", b"pwn"), F("jaillink/../outside", b"pwn")],
        whiteouts="overlay",
        options={"lowers": ["lower"]},
        check=lambda root, j: lands(in_jail_path(j, "sentinel"))(root, j),
    ),
    Case(
        "overlay-through-lower-link-dotdot",
        lambda j: [F("up/sentinel", b"pwn"), F("up/up/up/outside", b"pwn"), W("up/.wh.file")],
        whiteouts="overlay",
        options={"lowers": ["lower"]},
        check=both(lands("sentinel"), lands("outside"), _check_upper_whiteout, absent("up")),
    ),
    Case(
        "overlay-through-lower-link-loop",
        lambda j: [F("loop1/x", b"pwn")],
        raises=InvalidArgument,
        whiteouts="overlay",
        options={"lowers": ["lower"]},
    ),
    Case(
        "overlay-through-lower-link-to-a-file",
        lambda j: [F("tofile/x", b"pwn"), H("tofile/h", "file")],
        whiteouts="overlay",
        options={"lowers": ["lower"]},
        check=absent("tofile"),
    ),
    Case(
        "overlay-through-lower-link-chain",
        lambda j: [F("chain/x", b"pwn")],
        whiteouts="overlay",
        options={"lowers": ["lower", "lower2"]},
        check=_check_chain,
    ),
    Case(
        "overlay-whiteout-dotdot",
        lambda j: [W("../lower/.wh.file"), W("../../.wh.dir")],
        whiteouts="overlay",
        options={"lowers": ["lower"]},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_layer_stays_inside(case: Case, tmp_path: Path) -> None:
    jail = make_jail(tmp_path)
    root = jail / "root"
    if case.whiteouts == "overlay":
        # An upper directory starts empty; the lowers hold the parent layers.
        for p in list(root.iterdir()):
            if p.is_dir() and not p.is_symlink():
                for q in sorted(p.rglob("*"), reverse=True):
                    q.unlink()
                p.rmdir()
            else:
                p.unlink()
    before = treecmp.snapshot(jail, exclude=["root"])
    options = dict(case.options)
    if "lowers" in options:
        options["lowers"] = [jail / p for p in options["lowers"]]
    opts = ApplyOptions(whiteouts=case.whiteouts, **options)  # type: ignore[arg-type]
    kw = {} if case.format is None else {"format": case.format}
    blob = tar(*case.entries(jail), **kw)
    if case.raises is not None:
        with pytest.raises(case.raises):
            apply_confined(tmp_path, root, blob, opts)
    else:
        apply_confined(tmp_path, root, blob, opts)
        if case.check is not None:
            case.check(root, jail)
    check_contained(jail, before)


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


# -- random layers ---------------------------------------------------------------

# Components are canaries: if a layer escaped to the host's "/", these names
# (not "etc/passwd") are what it would write there.
_A, _B = "ckfsq1", "ckfsq2"
_NAMES = [_A, _B, "..", ".", ""]
_TARGETS = [
    "/",
    "..",
    "../..",
    "../../..",
    _A,
    f"{_A}/..",
    f"{_B}/{_A}",
    f"/{_A}",
    "{jail}",
    "{outer}",
]
_TARGETS += ["../sentinel", "{jail}/sentinel", "../lower/file"] * 2


def _path(parts: list[str], absolute: bool) -> str:
    return ("/" if absolute else "") + "/".join(parts)


# Mostly a few clean names, so entries land on each other and symlinks get
# written through; a quarter mangled.
_pool = st.sampled_from([_A, _B, f"{_A}/{_B}", f"{_B}/{_A}", f"../{_A}", f"/{_B}"])
_paths = st.one_of(
    _pool,
    _pool,
    _pool,
    st.builds(_path, st.lists(st.sampled_from(_NAMES), min_size=1, max_size=4), st.booleans()),
)


_KINDS = ["file", "file", "symlink", "symlink", "dir", "hardlink", "whiteout", "opaque", "dev"]


@st.composite
def _layer(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    """A few paths, then entries on them: collisions (a file written where a
    symlink was planted, a link to a replaced file) are the point."""
    names = draw(st.lists(_paths, min_size=1, max_size=3))
    spec = []
    for _ in range(draw(st.integers(2, 12))):
        # Files and symlinks most: writing through a planted symlink is the attack.
        kind = draw(st.sampled_from(_KINDS))
        name = draw(st.sampled_from(names))
        target = ""
        if kind == "symlink":
            target = draw(st.sampled_from(_TARGETS))
        elif kind == "hardlink":
            target = draw(st.one_of(st.sampled_from(names), _paths))
        elif kind == "whiteout":
            name = name.rstrip("/") + "/.wh." + draw(st.sampled_from([_A, _B, ".."]))
        elif kind == "opaque":
            name = name.rstrip("/") + "/.wh..wh..opq"
        spec.append((kind, name, target))
    return spec


def _build(spec: list[tuple[str, str, str]], jail: Path) -> bytes:
    entries = []
    for kind, name, target in spec:
        target = target.replace("{jail}", str(jail)).replace("{outer}", str(jail.parent))
        # Owners and times differ from the jail's, so metadata applied
        # through a symlink shows up in the snapshot too.
        if kind == "file":
            entries.append(F(name, b"pwn", uid=4242, gid=4242, mode=0o4711))
        elif kind == "dir":
            entries.append(D(name, uid=4242, gid=4242, mode=0o700))
        elif kind == "symlink":
            entries.append(L(name, target, uid=4242, gid=4242))
        elif kind == "hardlink":
            entries.append(H(name, target))
        elif kind == "dev":
            entries.append(C(name))
        else:
            entries.append(W(name))
    return tar(*entries)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=_layer(),
    whiteouts=st.sampled_from(["delete", "overlay"]),
)
def test_random_layers_stay_inside(spec: list[tuple[str, str, str]], whiteouts: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        outer = Path(tmp) / "outer"
        jail = make_jail(outer)
        (outer / "beside").write_bytes(b"beside")
        before = treecmp.snapshot(outer, exclude=["jail/root"])
        lowers = [jail / "lower"] if whiteouts == "overlay" else []
        opts = ApplyOptions(whiteouts=whiteouts, lowers=lowers, devices=False)  # type: ignore[arg-type]
        with contextlib.suppress(InvalidArgument):
            apply_confined(Path(tmp), jail / "root", _build(spec, jail), opts)
        after = treecmp.snapshot(outer, exclude=["jail/root"])
        treecmp.assert_same(before, after, ignore=())
        outside = outside_inodes(jail)
        for p in (jail / "root").rglob("*"):
            st_ = p.lstat()
            if not stat.S_ISDIR(st_.st_mode):
                assert (st_.st_dev, st_.st_ino) not in outside
        for name in (_A, _B):
            assert not os.path.lexists(Path("/") / name)
            assert not os.path.lexists(Path(tmp) / name)
