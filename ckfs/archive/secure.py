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
    "CrossesMount",
    "MakeDir",
    "RootDir",
    "SymlinkLoop",
    "TooDeep",
    "clean_parts",
    "join",
    "remove_all",
    "walk_tree",
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
#: a directory named *name* and returns True, or returns False to refuse. For
#: a missing one it may instead return a symlink target: an overlay upper
#: follows the symlink a lower holds there, as the mount would, and the walk
#: treats it exactly like a symlink on disk (counted, re-rooted, clamped).
MakeDir = Callable[[int, str, str, "os.stat_result | None"], "bool | str"]


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
                target: str | None = None
                try:
                    nfd = os.open(c, _O_DIR, dir_fd=fd)
                except FileNotFoundError:
                    made = make_dir(fd, c, child, None) if make_dir is not None else False
                    if made is False:
                        raise
                    if made is True:
                        nfd = os.open(c, _O_DIR, dir_fd=fd)
                    else:
                        target = made
                except NotADirectoryError:
                    try:
                        target = os.readlink(c, dir_fd=fd)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        # Not a symlink: a file, device, whiteout...
                        st = os.lstat(c, dir_fd=fd)
                        if make_dir is None or make_dir(fd, c, child, st) is not True:
                            raise NotADirectoryError(
                                errno.ENOTDIR, "not a directory", child
                            ) from None
                        nfd = os.open(c, _O_DIR, dir_fd=fd)
                if target is not None:
                    budget[0] -= 1
                    if budget[0] < 0:
                        raise SymlinkLoop(child)
                    if not target:
                        # The kernel resolves an empty symlink to ENOENT.
                        raise FileNotFoundError(errno.ENOENT, "empty symlink", child)
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


#: What `walk_tree` calls for each entry of a directory it lists, while the
#: listing is open: ``visit(dir_fd, entry)``, True to descend into *entry*
#: (a directory, never a symlink to one).
Visit = Callable[[int, "os.DirEntry[str]"], bool]

#: What `walk_tree` calls once a directory's entries were all visited and
#: its subdirectories left: ``leave(parent_fd, name)``.
Leave = Callable[[int, str], None]


class CrossesMount(OSError):
    """A walk reached a directory on another filesystem: a mount it must not enter."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.EXDEV, "a mount point inside the tree", path)


class _Level:
    """One directory on the walk's current path: how to check and leave it."""

    __slots__ = ("dev", "ino", "name", "pending")

    def __init__(self, name: str, st: os.stat_result, pending: list[str]) -> None:
        self.name = name
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.pending = pending


def walk_tree(
    dir_fd: int, name: str, visit: Visit, leave: Leave | None = None, *, fix_modes: bool = False
) -> None:
    """Walk the directory ``dir_fd/name`` depth first, by descriptors only.

    Built for trees a layer or a container wrote, which can be any depth
    (10,000 levels), any path length (far past ``PATH_MAX``), and hold any
    name and file type. So the walk:

    - never builds a path: each directory is opened relative to its parent
      with ``O_NOFOLLOW``, and left through its own ``..``, checked to be
      the parent it came from (a directory moved meanwhile fails the walk
      rather than lead it elsewhere);
    - is iterative and holds two descriptors at most, so neither Python's
      stack nor the descriptor limit bounds the depth (memory grows with the
      names still to visit, not with their paths);
    - never enters a mount: a directory on another device whose mount id
      (``/proc/self/fdinfo``) differs from its parent's raises
      `CrossesMount`. A btrfs subvolume, another device on the same mount,
      is walked. Bind mounts of the same file system show no change of
      device and are not noticed: callers that remove detach what
      ``/proc/self/mountinfo`` lists first;
    - with *fix_modes*, makes every directory below *dir_fd* owner-
      accessible (a container's ``chmod 000`` stops a caller without
      ``CAP_DAC_OVERRIDE``, not root).

    Args:
        dir_fd: the directory holding the top (not closed here).
        name: the top directory's name in *dir_fd*; the caller has checked
            it is a directory.
        visit: called for every entry below the top, parents' entries first.
        leave: called for every directory below the top (not the top
            itself), children before parents, with its parent's descriptor.
        fix_modes: make unlistable directories listable (removal does).

    Raises:
        OSError: a directory cannot be opened, was moved during the walk, or
            lies on another filesystem (`CrossesMount`); or *visit* or
            *leave* raised it.
    """
    fd, top = _enter(dir_fd, name, fix_modes)
    try:
        stack = [_Level(name, top, _scan(fd, visit))]
        while stack:
            level = stack[-1]
            if level.pending:
                child = level.pending.pop()
                cfd, st = _enter(fd, child, fix_modes)
                if st.st_dev != level.dev and not _same_mount(cfd, fd):
                    os.close(cfd)
                    raise CrossesMount(child)
                os.close(fd)
                fd = cfd
                stack.append(_Level(child, st, _scan(fd, visit)))
                continue
            stack.pop()
            if not stack:
                break
            parent = os.open("..", _O_LIST, dir_fd=fd)
            os.close(fd)
            fd = parent
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (stack[-1].dev, stack[-1].ino):
                raise OSError(errno.ESTALE, "directory moved while being walked", level.name)
            if leave is not None:
                leave(fd, level.name)
    finally:
        os.close(fd)


def _same_mount(a: int, b: int) -> bool:
    """Whether descriptors *a* and *b* are on one mount; False if /proc cannot tell."""
    ids = [_mount_id(fd) for fd in (a, b)]
    return ids[0] is not None and ids[0] == ids[1]


def _mount_id(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _enter(dir_fd: int, name: str, fix_modes: bool) -> tuple[int, os.stat_result]:
    """Open directory ``dir_fd/name`` for listing, never following a symlink.

    With *fix_modes* the directory ends up readable, searchable and writable
    by its owner, so its entries can be listed, entered and removed.
    """
    try:
        fd = os.open(name, _O_LIST, dir_fd=dir_fd)
    except PermissionError:
        if not fix_modes:
            raise
        # O_PATH needs no permission on the directory itself; chmod through
        # /proc acts on that very inode, never on a symlink swapped in.
        pfd = os.open(name, _O_DIR, dir_fd=dir_fd)
        try:
            os.chmod(f"/proc/self/fd/{pfd}", stat.S_IRWXU)
        finally:
            os.close(pfd)
        fd = os.open(name, _O_LIST, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if fix_modes and st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
            os.fchmod(fd, st.st_mode & 0o7777 | stat.S_IRWXU)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _scan(fd: int, visit: Visit) -> list[str]:
    """Visit the entries of the open directory *fd*; the names to descend into."""
    with os.scandir(fd) as it:
        return [e.name for e in it if visit(fd, e)]


#: Times `remove_all` walks a tree again when a directory was not empty after
#: its walk: a file system may leave entries out of a listing that is being
#: deleted from, as Go's RemoveAll allows for; a tree still being written to
#: wins after these.
_REMOVE_PASSES = 3


def remove_all(dir_fd: int, name: str) -> bool:
    """Remove ``dir_fd/name`` and everything under it, following no symlink.

    Any depth and path length, special files and undecodable names
    included (`walk_tree`); directories a non-root caller may not list or
    change are made owner-writable first. A mount inside the tree stops the
    removal (`CrossesMount`) before anything on the mount is touched; what
    was removed above it by then stays removed, so callers detach mounts
    first (`snapshotters.storage.remove_dir`).

    Returns:
        True if the removed entry was a directory or a symlink (callers then
        invalidate cached walks), False for anything else or nothing there.

    Raises:
        OSError: something could not be removed.
    """
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return stat.S_ISLNK(st.st_mode)
    for attempt in range(_REMOVE_PASSES):
        try:
            walk_tree(dir_fd, name, _unlink_entry, _rmdir_child, fix_modes=True)
            # The caller's directory keeps its mode: it is not being removed.
            os.rmdir(name, dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise
            if not _lexists(dir_fd, name):
                return True  # a concurrent removal was quicker
            if attempt == _REMOVE_PASSES - 1:
                raise
        else:
            return True
    raise AssertionError("unreachable")


def _lexists(dir_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _unlink_entry(fd: int, entry: os.DirEntry[str]) -> bool:
    if entry.is_dir(follow_symlinks=False):
        return True
    os.unlink(entry.name, dir_fd=fd)
    return False


def _rmdir_child(fd: int, name: str) -> None:
    os.rmdir(name, dir_fd=fd)
