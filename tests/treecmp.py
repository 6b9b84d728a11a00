"""Describe a directory tree and compare two of them, for any test.

`snapshot` records what a root filesystem consumer can observe of each path:
type, permission bits, owner, size, content hash, symlink target, device
numbers, xattrs and which paths share an inode (hardlink groups). `diff`
lists the differences one line each, so a failing assertion reads like
``usr/bin/su: mode 0o4755 != 0o755``. Snapshotter and mount tests compare an
unpacked or mounted tree against a reference built by umoci the same way.

Nothing is followed: symlinks are recorded, never resolved.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

__all__ = ["Node", "assert_same", "diff", "snapshot"]

_KINDS = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True)
class Node:
    kind: str
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    size: int | None = None  # regular files
    sha256: str | None = None  # regular files
    target: str | None = None  # symlinks
    rdev: tuple[int, int] | None = None  # devices
    xattrs: tuple[tuple[str, bytes], ...] = ()
    link_group: str | None = None  # first path (sorted) of its hardlink group
    mtime_ns: int = 0


def _xattrs(path: Path, skip: Callable[[str], bool]) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        if skip(n):
            continue
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(out)


def _no_selinux(name: str) -> bool:
    # Labels come from the host's policy, not from the image.
    return name == "security.selinux"


def snapshot(
    root: Path,
    *,
    exclude: Iterable[str] = (),
    skip_xattr: Callable[[str], bool] = _no_selinux,
    hash_files: bool = True,
) -> dict[str, Node]:
    """Describe every path under *root* (root itself is ``"."``).

    Args:
        root: directory to walk.
        exclude: relative paths to leave out, with everything below them.
        skip_xattr: xattr names not to record.
        hash_files: hash regular files' content (else only their size).
    """
    excluded = set(exclude)
    raw: dict[str, tuple[os.stat_result, Node]] = {}
    stack = [(root, ".")]
    while stack:
        path, rel = stack.pop()
        st = os.lstat(path)
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "other")
        node = Node(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            xattrs=_xattrs(path, skip_xattr),
            mtime_ns=st.st_mtime_ns,
        )
        if kind == "file":
            digest = None
            if hash_files:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                digest = h.hexdigest()
            node = replace(node, size=st.st_size, sha256=digest)
        elif kind == "symlink":
            node = replace(node, target=os.readlink(path))
        elif kind in ("char", "block"):
            node = replace(node, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
        raw[rel] = (st, node)
        if kind == "dir":
            for name in os.listdir(path):
                crel = name if rel == "." else f"{rel}/{name}"
                if crel not in excluded:
                    stack.append((path / name, crel))
    groups: dict[tuple[int, int], list[str]] = {}
    for rel, (st, node) in raw.items():
        if node.kind != "dir" and st.st_nlink > 1:
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    out = {rel: node for rel, (_, node) in raw.items()}
    for members in groups.values():
        if len(members) > 1:
            first = min(members)
            for rel in members:
                out[rel] = replace(out[rel], link_group=first)
    return out


def diff(
    a: dict[str, Node],
    b: dict[str, Node],
    *,
    ignore: Iterable[str] = ("mtime_ns",),
    paths: Callable[[str], bool] = lambda p: True,
) -> list[str]:
    """Differences between two snapshots, one line each, sorted by path.

    Args:
        ignore: `Node` fields not compared (mtimes by default).
        paths: only paths for which this is true are compared.
    """
    skip = set(ignore)
    out = []
    for rel in sorted(set(a) | set(b)):
        if not paths(rel):
            continue
        x, y = a.get(rel), b.get(rel)
        if x is None or y is None:
            out.append(f"{rel}: only in {'second' if x is None else 'first'}")
            continue
        for f in fields(Node):
            if f.name in skip:
                continue
            vx, vy = getattr(x, f.name), getattr(y, f.name)
            if vx != vy:
                if f.name == "mode":
                    out.append(f"{rel}: mode {vx:#o} != {vy:#o}")
                else:
                    out.append(f"{rel}: {f.name} {vx!r} != {vy!r}")
    return out


def assert_same(a: dict[str, Node], b: dict[str, Node], **kw: object) -> None:
    """Fail listing the differences (at most 50) if the snapshots differ."""
    problems = diff(a, b, **kw)  # type: ignore[arg-type]
    assert not problems, "trees differ:\n" + "\n".join(problems[:50])
