"""The layers below an overlay upper directory: lookups in them, and copy-up.

In ``overlay`` mode (`ckfs.archive.apply`) a layer is written into an empty
upper directory while the layers below stay untouched, read-only *lowers*,
top first, as the overlay mount will stack them. The applier needs them for
two things overlayfs itself would do:

- a parent directory the layer does not list is created as a copy of the
  first lower's directory (mode, owner, times, xattrs), so the upper one
  does not change what the mount shows;
- a hardlink to a file that only a lower has copies that file up first,
  since a link cannot cross into a lower.

Lookups follow the mount's rules: the first lower holding a name decides,
and a lower in which a parent component is not a directory hides the ones
below. Every lookup is made through a `RootDir`, so a lower's own symlinks
(``up -> ../..``) are resolved inside that lower and never reach past it.
Nothing here writes to a lower.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ckfs.archive import whiteouts
from ckfs.archive.entry import SkipEntry
from ckfs.archive.secure import RootDir, SymlinkLoop, TooDeep

__all__ = ["Lowers", "copy_node", "copy_xattrs"]

log = logging.getLogger(__name__)

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class Lowers:
    """The lower layers' directories, top first, opened as `RootDir`s.

    Empty (falsy) when the layer has none. Close it to release the
    descriptors.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self._roots: list[RootDir] = []
        try:
            for p in paths:
                self._roots.append(RootDir(p))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for root in self._roots:
            root.close()

    def __bool__(self) -> bool:
        return bool(self._roots)

    def find(self, parts: list[str]) -> tuple[int, os.stat_result] | None:
        """The first lower holding *parts*: its parent's descriptor and the entry's lstat.

        The caller closes the descriptor. None if no lower has it, or a
        lower hides it (a parent component there is not a directory, or
        loops).
        """
        for root in self._roots:
            try:
                pfd, _ = root.open_dir(parts[:-1])
            except FileNotFoundError:
                continue
            except (NotADirectoryError, SymlinkLoop, TooDeep):
                return None
            try:
                return pfd, os.lstat(parts[-1], dir_fd=pfd)
            except FileNotFoundError:
                os.close(pfd)
            except BaseException:
                os.close(pfd)
                raise
        return None

    def open_dir(self, real: str) -> tuple[os.stat_result, int] | str | None:
        """The first lower's directory at *real*: its stat and an open descriptor.

        The caller closes the descriptor. If the first lower holding *real*
        has a symlink there, its target instead: the mount resolves *real*
        through it, so the caller follows it in the upper, inside its root
        (`ckfs.archive.secure.MakeDir`). None if no lower has it or that
        lower has a whiteout there: nothing shows, a new directory may.

        Raises:
            NotADirectoryError: that lower has another non-directory there;
                it hides the ones below and the mount would say ENOTDIR.
        """
        parts = real.split("/")
        found = self.find(parts)
        if found is None:
            return None
        pfd, st = found
        try:
            if stat.S_ISLNK(st.st_mode):
                return os.readlink(parts[-1], dir_fd=pfd)
            if whiteouts.is_whiteout(st):
                return None
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory in a lower", real)
            return st, os.open(parts[-1], _O_DIR, dir_fd=pfd)
        finally:
            os.close(pfd)


def copy_node(
    lfd: int,
    ufd: int,
    name: str,
    st: os.stat_result,
    *,
    same_owner: bool,
    devices: bool,
    what: str,
) -> None:
    """Copy the non-directory ``lfd/name`` (lstat *st*) to ``ufd/name`` with its metadata.

    Owner (if *same_owner*), mode, xattrs and times are kept, in the order
    `ckfs.archive.apply` sets them for tar entries.

    Raises:
        SkipEntry: a device node while *devices* is off, or a socket.
        OSError: the copy failed; ``ufd/name`` must not exist beforehand.
    """
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        src = os.open(name, _O_READ, dir_fd=lfd)
        try:
            dst = os.open(name, _O_NEWFILE, 0o600, dir_fd=ufd)
            try:
                _copy_fd(src, dst, st.st_size)
                if same_owner:
                    os.fchown(dst, st.st_uid, st.st_gid)
                os.fchmod(dst, mode)
                copy_xattrs(src, dst, what)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=lfd), name, dir_fd=ufd)
    elif stat.S_ISFIFO(st.st_mode):
        os.mknod(name, stat.S_IFIFO | 0o600, 0, dir_fd=ufd)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        if not devices:
            raise SkipEntry("hardlink target is a device node; device nodes are not allowed here")
        os.mknod(name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=ufd)
    else:
        raise SkipEntry("hardlink target is a socket")
    if same_owner:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=ufd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, mode, dir_fd=ufd)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=ufd, follow_symlinks=False)


def copy_xattrs(src: int, dst: int, what: str) -> None:
    """Copy a lower's xattrs to its upper copy, overlayfs' own excepted.

    A lower's ``trusted.overlay.*`` belongs to that layer's own upper dir
    (its opaque markers); copied up it would change what the mount shows.
    What cannot be copied is logged, not fatal: the copy is still the file.
    """
    try:
        names = os.listxattr(src)
    except OSError:
        return
    for name in names:
        if whiteouts.is_overlay_xattr(name):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name))
        except OSError as e:
            log.warning("%s: xattr %r not copied up: %s", what, name, e.strerror)


def _copy_fd(src: int, dst: int, size: int) -> None:
    """Copy *size* bytes between files in the kernel (reflink or sendfile)."""
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src, dst, size - done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = os.sendfile(dst, src, None, size - done)
        if n == 0:
            break
        done += n
