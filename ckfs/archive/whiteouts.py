"""OCI whiteouts, and the two ways ckfs applies them.

A layer records deletions as marker entries (image-spec "Whiteouts"):

- ``dir/.wh.<name>`` deletes ``dir/<name>`` of the layers below;
- ``dir/.wh..wh..opq`` makes ``dir`` opaque: nothing of the layers below
  shows through it.

Markers may come before or after the entries the same layer adds, and a
whiteout never removes what the same layer added. Following umoci, the
applier tracks the real paths this layer wrote (and their ancestors), its
*upper paths*, and every deletion spares them.

How a deletion is made depends on the snapshot's on-disk form:

- ``delete`` (a full copy of the parent, native snapshotter): the path is
  removed; an opaque directory loses every child the layer did not add
  (`remove_except`).
- ``overlay`` (an overlayfs upper directory, lowers untouched): the
  deletion is written the way overlayfs itself writes it, a 0/0 character
  device for a deleted name (`make_whiteout`) and ``trusted.overlay.opaque=y``
  on an opaque directory (`set_opaque`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Set
from typing import Literal

from ckfs.archive.secure import RootDir, join, remove_all
from ckfs.errors import InvalidArgument

__all__ = [
    "OPAQUE",
    "OPAQUE_XATTR",
    "OVERLAY_XATTRS",
    "PREFIX",
    "clear_except",
    "is_overlay_xattr",
    "is_whiteout",
    "make_whiteout",
    "parse",
    "remove_except",
    "set_opaque",
]

PREFIX = ".wh."
#: Names starting with this are whiteout metadata, not deletions (AUFS used
#: ``.wh..wh.plnk`` and ``.wh..wh.orph``); only the opaque marker means anything.
META_PREFIX = PREFIX + PREFIX
OPAQUE = META_PREFIX + ".opq"

OPAQUE_XATTR = "trusted.overlay.opaque"

#: xattr namespaces overlayfs reads its own metadata from (``user.overlay.``
#: with the ``userxattr`` mount option). A layer carrying them could forge
#: opaque directories, redirects or metacopy files in an overlay mount, so
#: they are never taken from a tar and never copied from a lower.
OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")

Kind = Literal["opaque", "whiteout", "meta"]


def parse(base: str) -> tuple[Kind, str] | None:
    """Classify an entry's last component.

    Returns:
        None for an ordinary name; ``("opaque", "")``; ``("whiteout", name)``
        for the name to delete; ``("meta", base)`` for other reserved names,
        which callers skip.

    Raises:
        InvalidArgument: the marker names something that is not a child of
            its directory (``.wh.``, ``.wh..``, ``.wh...``), as containerd
            refuses them: a deletion must not reach the directory itself or
            its parent.
    """
    if not base.startswith(PREFIX):
        return None
    if base == OPAQUE:
        return ("opaque", "")
    if base.startswith(META_PREFIX):
        return ("meta", base)
    name = base[len(PREFIX) :]
    if name in ("", ".", ".."):
        raise InvalidArgument(f"invalid whiteout {base!r}: it names no child of its directory")
    return ("whiteout", name)


def is_overlay_xattr(name: str) -> bool:
    return name.startswith(OVERLAY_XATTRS)


def is_whiteout(st: os.stat_result) -> bool:
    """Whether *st* is an overlayfs whiteout: a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def make_whiteout(dir_fd: int, name: str) -> None:
    """Create an overlayfs whiteout for *name* (which must not exist).

    Mode 0 like overlayfs' own whiteouts. Linux ≥ 5.8 lets unprivileged
    users create the 0/0 device, so this does not depend on the layer's
    device-node policy.
    """
    os.mknod(name, stat.S_IFCHR, 0, dir_fd=dir_fd)


def set_opaque(dir_fd: int, name: str) -> None:
    """Mark directory ``dir_fd/name`` opaque for overlayfs."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.setxattr(fd, OPAQUE_XATTR, b"y")
    finally:
        os.close(fd)


def remove_except(root: RootDir, dir_fd: int, name: str, real: str, keep: Set[str]) -> bool:
    """Delete ``dir_fd/name`` (real path *real*) but spare the paths in *keep*.

    A path not in *keep* is removed with everything under it; a kept
    directory is descended into and its unkept children removed. *keep*
    holds every ancestor of a kept path, so the descent only visits what
    the layer wrote. Symlinks are never followed.

    Returns:
        True if a directory or symlink was removed (cached walks are stale).
    """
    if real not in keep:
        return remove_all(dir_fd, name)
    return clear_except(root, real, keep)


def clear_except(root: RootDir, real: str, keep: Set[str]) -> bool:
    """Empty the directory at *real* but for the paths in *keep*.

    Also the opaque marker in ``delete`` form: the directory itself stays.
    Kept subdirectories are reopened by real path rather than held open, so
    a wide tree costs no more descriptors than a narrow one; a path that is
    no longer a directory (replaced, or a symlink now) is left alone.

    Returns:
        True if a directory or symlink was removed.
    """
    changed = False
    todo = [real]
    while todo:
        dreal = todo.pop()
        try:
            pfd = root.open_real(dreal)
        except (NotADirectoryError, FileNotFoundError):
            continue
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
        finally:
            os.close(pfd)
        try:
            for c in os.listdir(fd):
                creal = join(dreal, c)
                if creal in keep:
                    todo.append(creal)
                elif remove_all(fd, c):
                    changed = True
        finally:
            os.close(fd)
    return changed
