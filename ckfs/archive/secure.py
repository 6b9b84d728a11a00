"""Resolving layer paths inside a root that the layer cannot escape.

A layer is hostile input. Its entry names may climb (``../../etc/passwd``),
be absolute, or walk through symlinks the same layer planted a moment earlier
(``lib -> /`` then ``lib/etc/passwd``). Everything here treats the
destination directory as if it were ``/`` of a chroot, the way containerd's
``fs.RootPath`` and umoci's ``SecureJoin`` do, but on file descriptors:

- names are cleaned lexically first (`clean_parts`), so ``..`` never climbs
  above root and absolute names are rooted at it;
- directories are then opened one component at a time with
  ``openat(O_PATH | O_NOFOLLOW | O_DIRECTORY)`` relative to the previous
  one. A component that is a symlink is read and its target is walked the
  same way, re-rooted at root when absolute, its ``..`` stopping at root;
- the final component of an entry is never resolved here: callers act on
  ``(parent_fd, name)`` with ``*at`` calls that do not follow it.

Because every step is relative to a descriptor that was itself reached this
way, no string check can be fooled by a symlink swapped in between: the
kernel never sees a path that starts above root.

`RootDir` also caches the descriptors of the last directory chain it walked:
layers list entries depth-first, so consecutive entries share their parents
and most lookups cost no system call at all. Callers that remove or replace
an existing directory or symlink must call `RootDir.invalidate`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "MAX_DEPTH",
    "MAX_SYMLINKS",
    "MakeDir",
    "RootDir",
    "SymlinkLoop",
    "TooDeep",
    "clean_parts",
    "join",
    "remove_all",
]

#: Symlinks followed while resolving one path before giving up: Linux's own
#: MAXSYMLINKS, so a chain the kernel would resolve resolves here too, and a
#: loop ends as quickly as it would for the kernel.
MAX_SYMLINKS = 40

#: Deepest directory nesting accepted, lexically or after following symlinks.
#: Real images stay far below it (node_modules trees reach a few dozen). The
#: bound keeps a hostile layer from building trees that recursive tools,
#: which hold one descriptor or one stack frame per level, cannot remove.
MAX_DEPTH = 512

#: Descriptors of the last walked chain kept open; deeper levels are walked
#: without caching so a deep tree cannot exhaust the descriptor limit.
_CACHE_DEPTH = 64

_O_DIR = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_O_LIST = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC

#: Called for a missing (or, for overlay whiteouts, replaceable) directory
#: component: ``make_dir(parent_fd, name, real_path, existing_stat)`` creates
#: a directory named *name* and returns True, or returns False to refuse.
MakeDir = Callable[[int, str, str, "os.stat_result | None"], bool]


class SymlinkLoop(OSError):
    """More than `MAX_SYMLINKS` symlinks on one path."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.ELOOP, "too many levels of symbolic links", path)


class TooDeep(OSError):
    """A path nests deeper than `MAX_DEPTH`."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.ENAMETOOLONG, f"nested deeper than {MAX_DEPTH} levels", path)


def clean_parts(name: str) -> list[str]:
    """Split *name* into components, cleaned as if chrooted at ``/``.

    ``.`` and empty components vanish, ``..`` removes the previous component
    and stops at the top, a leading ``/`` is ignored: ``/../../etc/x`` and
    ``a/../etc/x`` both become ``["etc", "x"]``. An empty list names root.
    """
    if ".." not in name and "//" not in name and "./" not in name and not name.endswith("."):
        return [p for p in name.split("/") if p]
    out: list[str] = []
    for p in name.split("/"):
        if not p or p == ".":
            continue
        if p == "..":
            if out:
                out.pop()
            continue
        out.append(p)
    return out


def join(parent: str, name: str) -> str:
    """Join a root-relative path ("" is root) and one component."""
    return f"{parent}/{name}" if parent else name


class _Frame:
    """One cached step of the last walk: lexical component → directory."""

    __slots__ = ("fd", "name", "real")

    def __init__(self, name: str, fd: int, real: str) -> None:
        self.name = name
        self.fd = fd
        self.real = real


class RootDir:
    """A directory in which paths resolve as if it were the root of a chroot.

    Descriptors returned by `resolve` are borrowed: valid until the next
    `resolve` call; callers never close them. `open_dir` returns a
    descriptor the caller owns. Both return the *real* path too: the path
    relative to root with every symlink expanded, which is what callers key
    bookkeeping on (two lexical names may reach the same directory).

    Not thread-safe: one apply owns one `RootDir`.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # The caller's path is trusted: a root reached through a symlink is
        # fine (only what is below it is the layer's to name).
        self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._frames: list[_Frame] = []
        self._stale = False

    def close(self) -> None:
        self._drop(0)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RootDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def invalidate(self) -> None:
        """Forget cached walks: an existing directory or symlink changed.

        The cached descriptors stay open until the next `resolve`, so a
        descriptor a caller borrowed for the entry in progress stays usable.
        """
        self._stale = True

    def _drop(self, keep: int) -> None:
        while len(self._frames) > keep:
            os.close(self._frames.pop().fd)

    def resolve(self, parts: Sequence[str], make_dir: MakeDir | None = None) -> tuple[int, str]:
        """Open the directory *parts* (already cleaned), following symlinks inside root.

        Args:
            parts: components from `clean_parts`; ``[]`` is root itself.
            make_dir: creates missing components; without it a missing
                component raises `FileNotFoundError`.

        Returns:
            A borrowed ``O_PATH`` descriptor of the directory and its real path.

        Raises:
            FileNotFoundError: a component is missing and *make_dir* is None.
            NotADirectoryError: a component is neither a directory nor a
                symlink leading to one (and *make_dir* did not replace it).
            SymlinkLoop: more than `MAX_SYMLINKS` symlinks.
            TooDeep: the path or its expansion is deeper than `MAX_DEPTH`.
        """
        if self._stale:
            self._drop(0)
            self._stale = False
        frames = self._frames
        n = 0
        limit = min(len(frames), len(parts))
        while n < limit and frames[n].name == parts[n]:
            n += 1
        self._drop(n)
        if n == len(parts):
            if n == 0:
                return self.fd, ""
            return frames[n - 1].fd, frames[n - 1].real
        if len(parts) > MAX_DEPTH:
            raise TooDeep("/".join(parts))
        fd, real = (frames[n - 1].fd, frames[n - 1].real) if n else (self.fd, "")
        budget = [MAX_SYMLINKS]
        owned = False
        try:
            for i in range(n, len(parts)):
                nfd, real = self._walk(fd, real, [parts[i]], make_dir, budget)
                if owned:
                    os.close(fd)
                fd, owned = nfd, True
                if i < _CACHE_DEPTH:
                    frames.append(_Frame(parts[i], fd, real))
                    owned = False
        except BaseException:
            if owned:
                os.close(fd)
            raise
        if owned:
            # Deeper than the cache: hand out a descriptor that lives as long
            # as a cached one would, until the next resolve.
            frames.append(_Frame("\0", fd, real))
        return fd, real

    def open_dir(self, parts: Sequence[str], make_dir: MakeDir | None = None) -> tuple[int, str]:
        """Like `resolve`, uncached: the returned descriptor is the caller's to close."""
        if len(parts) > MAX_DEPTH:
            raise TooDeep("/".join(parts))
        return self._walk(self.fd, "", list(parts), make_dir, [MAX_SYMLINKS])

    def open_real(self, real: str) -> int:
        """Open a directory by a real path this object returned earlier (caller closes).

        Real paths contain no symlinks, so nothing is followed: if one has
        appeared since, this fails rather than going anywhere else.
        """
        fd = os.open(".", _O_DIR, dir_fd=self.fd)
        try:
            for p in real.split("/") if real else ():
                nfd = os.open(p, _O_DIR, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _walk(
        self,
        start_fd: int,
        start_real: str,
        todo: list[str],
        make_dir: MakeDir | None,
        budget: list[int],
    ) -> tuple[int, str]:
        """Walk *todo* from a directory; return an owned descriptor and real path.

        *start_fd* is never closed here. *budget* holds the symlinks still
        allowed, shared across the calls of one resolution.
        """
        fd = start_fd
        owned = False
        real = start_real
        todo.reverse()  # a stack: pop() takes the next component
        try:
            while todo:
                c = todo.pop()
                if not c or c == ".":
                    continue
                if c == "..":
                    if real:
                        real = real.rpartition("/")[0]
                        nfd = self.open_real(real)
                        if owned:
                            os.close(fd)
                        fd, owned = nfd, True
                    continue
                child = join(real, c)
                try:
                    nfd = os.open(c, _O_DIR, dir_fd=fd)
                except FileNotFoundError:
                    if make_dir is None or not make_dir(fd, c, child, None):
                        raise
                    nfd = os.open(c, _O_DIR, dir_fd=fd)
                except NotADirectoryError:
                    try:
                        target = os.readlink(c, dir_fd=fd)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        # Not a symlink: a file, device, whiteout...
                        st = os.lstat(c, dir_fd=fd)
                        if make_dir is None or not make_dir(fd, c, child, st):
                            raise NotADirectoryError(
                                errno.ENOTDIR, "not a directory", child
                            ) from None
                        nfd = os.open(c, _O_DIR, dir_fd=fd)
                    else:
                        budget[0] -= 1
                        if budget[0] < 0:
                            raise SymlinkLoop(child) from None
                        if not target:
                            # The kernel resolves an empty symlink to ENOENT.
                            raise FileNotFoundError(errno.ENOENT, "empty symlink", child) from None
                        if target.startswith("/"):
                            if owned:
                                os.close(fd)
                            fd, owned, real = self.fd, False, ""
                        todo.extend(reversed(target.split("/")))
                        continue
                if owned:
                    os.close(fd)
                fd, owned, real = nfd, True, child
                if real.count("/") >= MAX_DEPTH:
                    raise TooDeep(real)
            if not owned:
                fd = os.open(".", _O_DIR, dir_fd=fd)
                owned = True
            return fd, real
        except BaseException:
            if owned:
                os.close(fd)
            raise


def remove_all(dir_fd: int, name: str) -> bool:
    """Remove ``dir_fd/name`` and everything under it, following no symlink.

    Iterative, so no tree depth can exhaust Python's stack; each level holds
    one descriptor, bounded by `MAX_DEPTH` for trees built by a layer.

    Returns:
        True if the removed entry was a directory or a symlink (callers then
        invalidate cached walks), False for anything else or nothing there.
    """
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return stat.S_ISLNK(st.st_mode)
    stack: list[tuple[int, str, int, list[os.DirEntry[str]]]] = []
    fd = os.open(name, _O_LIST, dir_fd=dir_fd)
    with os.scandir(fd) as it:
        stack.append((dir_fd, name, fd, list(it)))
    try:
        while stack:
            parent, dname, fd, entries = stack[-1]
            if not entries:
                stack.pop()
                os.close(fd)
                os.rmdir(dname, dir_fd=parent)
                continue
            e = entries.pop()
            if e.is_dir(follow_symlinks=False):
                cfd = os.open(e.name, _O_LIST, dir_fd=fd)
                with os.scandir(cfd) as it:
                    stack.append((fd, e.name, cfd, list(it)))
            else:
                os.unlink(e.name, dir_fd=fd)
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)
    return True
