"""Applying an image layer to a directory: safely, and at disk speed.

`apply_layer` decompresses a layer blob, parses it with `tarfile` in one
forward pass (`ckfs.archive.tarstream`) and writes each entry under a root
directory, hashing the uncompressed stream on the way so the caller learns
(or checks) the diff ID in the same pass. It runs synchronously; callers run it in
``trio.to_thread.run_sync`` and decompression runs on one more thread.

What a layer says is never trusted. What each entry means (its cleaned
path, kind, owner, mode, times, links, filtered xattrs, whiteout markers)
is decided by `ckfs.archive.entry`, the rules the lazy layer indexes share;
acting on it is done here, through `ckfs.archive.secure`:

- every name is cleaned as if chrooted at root and every parent directory is
  opened component by component, symlinks re-rooted at root, the last
  component never followed, so nothing outside root is created, changed or
  deleted whatever the entries are;
- hardlink targets are resolved the same way and must not be directories;
- changing the type of root itself is refused, as umoci does;
- device nodes are made only when the process may (root, no user
  namespace) or the caller says so; ``trusted.overlay.*`` and
  ``user.overlay.*`` xattrs are never taken from a tar, since they would
  let a layer forge overlayfs metadata;
- entries above a size limit are refused before a byte is written.

Only `tarfile`'s header parsing is used. Its ``extract*`` methods (and their
filters, which in 3.11 miss the 2024–25 path-escape fixes) are never called.

Whiteouts are applied in one of two forms (`ckfs.archive.whiteouts`):
``delete`` for a full copy of the parent, ``overlay`` for an overlayfs upper
directory above *lowers*, which are only read (`ckfs.archive.lowers`: the
overlay lookup rules, and copy-up of hardlink targets).

Error policy: what makes the result wrong or the input hostile raises
`InvalidArgument` naming the entry (the caller discards the directory);
what is merely odd (a device node not permitted, a hardlink to nothing, an
entry below a file) is skipped with a warning on this module's logger.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

from ckfs.archive import whiteouts
from ckfs.archive.compression import open_layer
from ckfs.archive.entry import DEFAULT_MAX_ENTRY_SIZE, Entry, Kind, SkipEntry, from_tarinfo
from ckfs.archive.lowers import Lowers, copy_node, copy_xattrs
from ckfs.archive.secure import MakeDir, RootDir, SymlinkLoop, TooDeep, join, remove_all
from ckfs.archive.tarstream import TarStream
from ckfs.digest import Digest
from ckfs.errors import CkfsError, DataLoss, InvalidArgument

__all__ = ["DEFAULT_MAX_ENTRY_SIZE", "ApplyOptions", "ApplyResult", "apply_layer"]

log = logging.getLogger(__name__)

#: Bytes copied per read of file data: large reads keep the per-call Python
#: cost negligible next to the kernel's copy.
_CHUNK = 1 << 20

#: Errors from the filesystem under root itself; they are not the layer's
#: fault and surface unchanged. Any other OSError an entry provokes
#: (ENAMETOOLONG, EINVAL, ...) becomes InvalidArgument naming the entry.
_ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
)

#: xattrs a directory entry merged into an existing directory leaves alone:
#: overlayfs metadata is ckfs's own (an opaque marker of this layer), and
#: SELinux labels belong to the host.
_KEEP_XATTRS = (*whiteouts.OVERLAY_XATTRS, "security.selinux")

_O_NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class ApplyOptions:
    """How a layer is applied.

    Attributes:
        whiteouts: ``"overlay"`` writes deletions in overlayfs form into an
            upper directory and never touches *lowers*; ``"delete"`` applies
            them as deletions to a full copy of the parent (native snapshots).
        lowers: overlay mode only: the parent layers' directories, top
            first. Implicit parent directories copy mode, owner, times and
            xattrs from the first lower that has them, and hardlinks to files
            that live only in a lower copy the file up first.
        devices: whether to create device nodes; None means "if root and not
            in a user namespace". When not allowed they are skipped with a
            warning.
        max_entry_size: entries larger than this (apparent size) are refused.
        same_owner: chown entries to the tar's uid/gid; None means "if root".
    """

    whiteouts: Literal["overlay", "delete"]
    lowers: Sequence[Path] = ()
    devices: bool | None = None
    max_entry_size: int = DEFAULT_MAX_ENTRY_SIZE
    same_owner: bool | None = None


@dataclass(frozen=True)
class ApplyResult:
    """What was applied.

    Attributes:
        diff_id: digest of the uncompressed layer stream.
        entries: tar members read (including skipped and whiteout entries).
        bytes: length of the uncompressed layer stream.
    """

    diff_id: Digest
    entries: int
    bytes: int


def apply_layer(
    root: Path,
    blob: BinaryIO,
    *,
    media_type: str | None,
    diff_id: Digest | None,
    options: ApplyOptions,
) -> ApplyResult:
    """Apply one layer blob to the directory *root*.

    The directory is changed in place as entries arrive. If this raises,
    the directory holds part of the layer and must be discarded.

    Args:
        root: existing directory: a copy of the parent (``delete``) or an
            empty upper directory (``overlay``).
        blob: the layer as stored (gzip, zstd or plain tar), read to its end.
        media_type: the descriptor's media type, a hint for the codec.
        diff_id: expected digest of the uncompressed stream; None to only
            compute it.
        options: see `ApplyOptions`.

    Returns:
        The computed diff ID, the number of tar members and the
        uncompressed size.

    Raises:
        DataLoss: the uncompressed stream does not match *diff_id* (also
            when the damage made the tar unreadable).
        InvalidArgument: a corrupt stream or tar, an unknown layer media
            type, or a hostile or malformed entry: root's type changed, an
            entry over ``max_entry_size``, a whiteout naming something outside
            its directory, a symlink loop or absurd depth in a parent path,
            a hardlink to a directory. The message names the entry.
        OSError: the filesystem under *root* failed (ENOSPC, EIO, ...).
    """
    what = f"layer {diff_id}" if diff_id is not None else "layer"
    algorithm = diff_id.algorithm if diff_id is not None else "sha256"
    with _Applier(root, options, what) as applier, open_layer(blob, media_type) as stream:
        tar = TarStream(stream, algorithm, what=what)
        try:
            applier.run(tar)
            if tar.drain():
                log.warning("%s: non-zero data after the end of the archive ignored", what)
        except InvalidArgument as e:
            # A damaged blob shows up as a corrupt tar first; if the stream
            # can still be read to its end, say which it is.
            if diff_id is not None:
                try:
                    tar.drain()
                except (CkfsError, OSError):
                    raise e from None
                if tar.digest() != diff_id:
                    raise DataLoss(f"{what}: uncompressed content has digest {tar.digest()}") from e
            raise
        except OSError as e:
            # Writes through descriptors name no file; say where it failed.
            if e.filename is None:
                raise OSError(e.errno, e.strerror, str(root)) from e
            raise
    actual = tar.digest()
    if diff_id is not None and actual != diff_id:
        raise DataLoss(f"{what}: uncompressed content has digest {actual}")
    return ApplyResult(diff_id=actual, entries=tar.count, bytes=tar.size)


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace (moby/sys/userns' test).

    The initial namespace maps every id to itself: ``0 0 4294967295``.
    """
    try:
        with open("/proc/self/uid_map") as f:
            lines = f.read().split()
    except OSError:
        return False
    return lines != ["0", "0", "4294967295"]


class _Reader(Protocol):
    def __call__(self, n: int, /) -> bytes: ...


class _DirTimes:
    """What a directory gets once all its children exist: times, maybe mode."""

    __slots__ = ("atime", "ino", "mode", "mtime")

    def __init__(self, ino: int, atime: int, mtime: int, mode: int | None = None) -> None:
        self.ino = ino
        self.atime = atime
        self.mtime = mtime
        self.mode = mode


class _Applier:
    """One layer being applied to one root; see the module docstring."""

    def __init__(self, root: Path, options: ApplyOptions, what: str) -> None:
        if options.whiteouts not in ("overlay", "delete"):
            raise InvalidArgument(f"unknown whiteout mode {options.whiteouts!r}")
        if options.lowers and options.whiteouts != "overlay":
            raise InvalidArgument("lowers are for overlay mode only")
        self.what = what
        self.max_size = options.max_entry_size
        self.overlay = options.whiteouts == "overlay"
        privileged = os.geteuid() == 0
        self.privileged = privileged
        self.same_owner = privileged if options.same_owner is None else options.same_owner
        self.devices = (
            privileged and not in_user_namespace() if options.devices is None else options.devices
        )
        self.root = RootDir(root)
        self.lowers = Lowers(())
        try:
            if os.path.samestat(os.fstat(self.root.fd), os.stat("/")):
                # A caller's bug, not a layer's: whiteouts and opaque markers
                # would delete the host's own files.
                raise InvalidArgument("refusing to apply a layer to the host's /")
            self.lowers = Lowers(options.lowers)
        except BaseException:
            self.close()
            raise
        #: Real paths this layer wrote, with all their ancestors (umoci's
        #: upperPaths): deletions of this layer spare them.
        self.upper: set[str] = set()
        #: Overlay whiteouts this layer made: a directory later created
        #: there must hide the lowers' one, so it is made opaque.
        self.whited: set[str] = set()
        #: Directories already made opaque by this layer.
        self.opaque: set[str] = set()
        #: Paths where a walk followed a lower's symlink (`_lower_link`).
        self.links: set[str] = set()
        #: Times (and deferred modes) to set on directories at the end.
        self.dirs: dict[str, _DirTimes] = {}
        self._xattr_warned = False

    def close(self) -> None:
        self.root.close()
        self.lowers.close()

    def __enter__(self) -> _Applier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ---------------------------------------------------------

    def run(self, tar: TarStream) -> None:
        for member in tar.members():
            try:
                self._entry(member, tar.read, tar.next_header)
            except SkipEntry as e:
                log.warning("%s: %r skipped: %s", self.what, member.name, e)
            except CkfsError:
                raise
            except OSError as e:
                if e.errno in _ENVIRONMENT_ERRNOS:
                    raise
                raise InvalidArgument(
                    f"{self.what}: entry {member.name!r}: {e.strerror or e}"
                ) from e
            except (ValueError, OverflowError) as e:
                raise InvalidArgument(f"{self.what}: entry {member.name!r}: {e}") from e
        self._finish()

    def _entry(self, m: tarfile.TarInfo, read: _Reader, next_header: int) -> None:
        e = from_tarinfo(m, what=self.what, max_size=self.max_size)
        kind = e.kind
        if kind is Kind.WHITEOUT or kind is Kind.OPAQUE:
            self._whiteout(e)
            return
        if not e.path:
            self._dir_meta(self.root.fd, ".", "", e, created=False)
            return
        if (kind is Kind.CHAR or kind is Kind.BLOCK) and not self.devices:
            raise SkipEntry("device nodes are not allowed here")
        parts = e.parts
        base = parts[-1]
        pfd, preal = self._parent(parts, self._make_dir)
        real = join(preal, base)
        self._placed(real)
        self._touch(pfd, preal)
        if kind is Kind.FILE:
            self._file(pfd, base, e, m.offset_data, read, next_header)
        elif kind is Kind.DIR:
            self._dir(pfd, base, real, e)
        elif kind is Kind.SYMLINK:
            self._symlink(pfd, base, e)
        elif kind is Kind.HARDLINK:
            if not self._hardlink(pfd, base, real, e):
                return
        else:
            self._node(pfd, base, e)
        self._mark(real)

    def _parent(self, parts: list[str], make_dir: MakeDir | None) -> tuple[int, str]:
        try:
            return self.root.resolve(parts[:-1], make_dir)
        except (SymlinkLoop, TooDeep) as e:
            raise InvalidArgument(f"{self.what}: entry {'/'.join(parts)!r}: {e.strerror}") from None
        except (FileNotFoundError, NotADirectoryError) as e:
            raise SkipEntry(f"parent {e.filename!r} is not a directory") from None

    def _mark(self, real: str) -> None:
        upper = self.upper
        while real and real not in upper:
            upper.add(real)
            real = real.rpartition("/")[0]

    def _touch(self, pfd: int, preal: str) -> None:
        """Remember a directory's times before this layer changes its entries.

        Adding or removing a child bumps a directory's mtime; like umoci,
        directories keep the times they had (or the tar gives them).
        """
        if preal not in self.dirs:
            st = os.fstat(pfd)
            self.dirs[preal] = _DirTimes(st.st_ino, st.st_atime_ns, st.st_mtime_ns)

    def _placed(self, real: str) -> None:
        """This layer puts an entry at *real*: cached walks through a lower's link there end."""
        if real in self.links:
            self.links.discard(real)
            self.root.invalidate()

    def _clear(self, pfd: int, name: str) -> None:
        """Remove whatever is at ``pfd/name``: a later entry replaces it."""
        if remove_all(pfd, name):
            self.root.invalidate()

    # -- entry kinds --------------------------------------------------------

    def _file(
        self, pfd: int, base: str, e: Entry, data_start: int, read: _Reader, next_header: int
    ) -> None:
        try:
            fd = os.open(base, _O_NEWFILE, 0o600, dir_fd=pfd)
        except FileExistsError:
            # Replace, never write in place: the old inode may be shared by
            # hardlinks that must keep their content.
            self._clear(pfd, base)
            fd = os.open(base, _O_NEWFILE, 0o600, dir_fd=pfd)
        try:
            if e.sparse is not None:
                self._copy_sparse(fd, e, e.sparse, data_start, next_header, read)
            elif e.size:
                self._copy(fd, e.size, read, e.path)
            self._meta_fd(fd, e)
            os.utime(fd, ns=(e.atime_ns, e.mtime_ns))
        finally:
            os.close(fd)

    def _copy(self, fd: int, size: int, read: _Reader, name: str) -> None:
        remaining = size
        while remaining:
            data = read(min(remaining, _CHUNK))
            if not data:
                raise InvalidArgument(f"{self.what}: entry {name!r}: archive ends inside its data")
            remaining -= len(data)
            n = os.write(fd, data)
            if n != len(data):
                view = memoryview(data)[n:]
                while view:
                    view = view[os.write(fd, view) :]

    def _copy_sparse(
        self,
        fd: int,
        e: Entry,
        sparse: tuple[tuple[int, int], ...],
        data_start: int,
        next_header: int,
        read: _Reader,
    ) -> None:
        # The stored data is the non-hole parts back to back; write each at
        # its offset and leave the gaps as holes. The entry checked that each
        # part lies inside the file; whether the tar holds them is known here.
        if sum(length for _, length in sparse) > next_header - data_start:
            raise InvalidArgument(f"{self.what}: entry {e.path!r}: sparse map beyond its data")
        for offset, length in sparse:
            os.lseek(fd, offset, os.SEEK_SET)
            self._copy(fd, length, read, e.path)
        os.ftruncate(fd, e.size)

    def _dir(self, pfd: int, base: str, real: str, e: Entry) -> None:
        created = True
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
        except FileExistsError:
            st = os.lstat(base, dir_fd=pfd)
            if stat.S_ISDIR(st.st_mode):
                created = False  # merge: the entry updates the metadata
            else:
                self._clear(pfd, base)
                os.mkdir(base, 0o700, dir_fd=pfd)
        self._dir_meta(pfd, base, real, e, created=created)

    def _dir_meta(self, pfd: int, base: str, real: str, e: Entry, *, created: bool) -> None:
        fd = os.open(base, _O_DIR, dir_fd=pfd)
        try:
            if not created:
                self._drop_xattrs(fd, {k for k, _ in e.xattrs})
            deferred = self._meta_fd(fd, e, is_dir=True)
            if self.overlay and real in self.whited:
                # This layer deleted the lowers' entry, then made a new
                # directory: nothing below may show through it.
                self._replaces_whiteout(fd, real)
            self.dirs[real] = _DirTimes(os.fstat(fd).st_ino, e.atime_ns, e.mtime_ns, deferred)
        finally:
            os.close(fd)

    def _symlink(self, pfd: int, base: str, e: Entry) -> None:
        try:
            os.symlink(e.link, base, dir_fd=pfd)
        except FileExistsError:
            self._clear(pfd, base)
            os.symlink(e.link, base, dir_fd=pfd)
        self._meta_at(pfd, base, e, chmod=False)

    def _node(self, pfd: int, base: str, e: Entry) -> None:
        if e.kind is Kind.FIFO:
            kind, dev = stat.S_IFIFO, 0
        else:
            kind = stat.S_IFCHR if e.kind is Kind.CHAR else stat.S_IFBLK
            dev = os.makedev(e.devmajor, e.devminor)
        try:
            os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
        except FileExistsError:
            self._clear(pfd, base)
            os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
        self._meta_at(pfd, base, e, chmod=True)

    def _hardlink(self, pfd: int, base: str, real: str, e: Entry) -> bool:
        """Link ``pfd/base`` to the entry's target (never root); False if skipped."""
        tparts = e.link.split("/")
        tname = tparts[-1]
        try:
            tfd, tparent = self.root.open_dir(tparts[:-1])
        except (SymlinkLoop, TooDeep) as err:
            raise InvalidArgument(
                f"{self.what}: entry {e.path!r}: link target: {err.strerror}"
            ) from None
        except (FileNotFoundError, NotADirectoryError):
            tfd, tparent = -1, ""
        try:
            st: os.stat_result | None = None
            if tfd >= 0:
                try:
                    st = os.lstat(tname, dir_fd=tfd)
                except FileNotFoundError:
                    st = None
            if st is not None and self.overlay and whiteouts.is_whiteout(st):
                raise SkipEntry(f"hardlink target {e.link!r} was deleted by this layer")
            if st is None and self.lowers:
                if tfd >= 0:
                    os.close(tfd)
                    tfd = -1
                found = self._copy_up(tparts, e)
                if found is not None:
                    tfd, tparent = found
                    st = os.lstat(tname, dir_fd=tfd)
            if st is None:
                raise SkipEntry(f"hardlink target {e.link!r} does not exist")
            if stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(
                    f"{self.what}: entry {e.path!r}: hardlink to directory {e.link!r}"
                )
            if join(tparent, tname) == real:
                return True  # a link to itself: already there
            try:
                os.link(tname, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileExistsError:
                self._clear(pfd, base)
                try:
                    os.link(tname, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    raise SkipEntry(
                        f"hardlink target {e.link!r} was inside what it replaced"
                    ) from None
            return True
        finally:
            if tfd >= 0:
                os.close(tfd)

    # -- whiteouts -----------------------------------------------------------

    def _whiteout(self, e: Entry) -> None:
        """A deletion: `Kind.WHITEOUT` of ``e.path``, `Kind.OPAQUE` of its children."""
        parts = e.parts
        opaque = e.kind is Kind.OPAQUE
        # Overlay mode may create the directory holding the marker, but only
        # if a lower has it: a whiteout must not make new directories appear.
        make_dir = self._make_lower_dir if self.overlay else None
        try:
            pfd, preal = self.root.resolve(parts if opaque else parts[:-1], make_dir)
        except (SymlinkLoop, TooDeep) as err:
            raise InvalidArgument(f"{self.what}: entry {e.path!r}: {err.strerror}") from None
        except (FileNotFoundError, NotADirectoryError):
            # Nothing to delete in: the directory is gone, or this layer
            # replaced it with a file (umoci 0.4.7 writes such layers).
            log.debug("%s: whiteout of %r is moot", self.what, e.path)
            return
        if opaque:
            self._opaque(pfd, preal)
            return
        target = parts[-1]
        if self.overlay:
            self._overlay_whiteout(pfd, preal, target)
        else:
            self._touch(pfd, preal)
            if whiteouts.remove_except(self.root, pfd, target, join(preal, target), self.upper):
                self.root.invalidate()

    def _overlay_whiteout(self, pfd: int, preal: str, name: str) -> None:
        real = join(preal, name)
        self._placed(real)
        if real in self.upper:
            # This layer wrote the path (or below it): keep that, but hide
            # whatever a lower has under it.
            try:
                st = os.lstat(name, dir_fd=pfd)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(st.st_mode) and real not in self.opaque:
                whiteouts.set_opaque(pfd, name)
                self.opaque.add(real)
            return
        self._touch(pfd, preal)
        try:
            whiteouts.make_whiteout(pfd, name)
        except FileExistsError:
            self._clear(pfd, name)
            whiteouts.make_whiteout(pfd, name)
        self.whited.add(real)

    def _opaque(self, pfd: int, real: str) -> None:
        if real in self.opaque:
            return
        self.opaque.add(real)
        if self.overlay:
            whiteouts.set_opaque(pfd, ".")
            return
        self._touch(pfd, real)
        if whiteouts.clear_except(self.root, real, self.upper):
            self.root.invalidate()

    def _replaces_whiteout(self, fd: int, real: str) -> None:
        """The directory *fd* replaces this layer's whiteout of *real*: make it opaque."""
        os.setxattr(fd, whiteouts.OPAQUE_XATTR, b"y")
        self.whited.discard(real)
        self.opaque.add(real)

    # -- implicit directories and copy-up -------------------------------------

    def _make_dir(
        self,
        pfd: int,
        name: str,
        real: str,
        existing: os.stat_result | None,
        *,
        lower: tuple[os.stat_result, int] | None = None,
    ) -> bool | str:
        """Create a parent directory the layer did not list (`secure.MakeDir`).

        *lower* is the lower directory it copies when the caller has looked
        it up already (only with no *existing* entry); its descriptor is
        closed here. Otherwise it is looked up here, and where the lowers
        hold a symlink its target is returned for the walk to follow.
        """
        if existing is not None:
            if not (self.overlay and real in self.whited and whiteouts.is_whiteout(existing)):
                return False
            # Deleted earlier in this layer, now a directory again: a fresh
            # one, hiding the lowers'.
            os.unlink(name, dir_fd=pfd)
        elif lower is None and self.lowers:
            found = self.lowers.open_dir(real)
            if isinstance(found, str):
                return self._lower_link(real, found)
            lower = found
        try:
            self._touch(pfd, real.rpartition("/")[0])
            os.mkdir(name, 0o700, dir_fd=pfd)
            fd = os.open(name, _O_DIR, dir_fd=pfd)
        except BaseException:
            if lower is not None:
                os.close(lower[1])
            raise
        try:
            if lower is None and existing is not None:
                # Replacing this layer's whiteout: a lower directory there
                # only lends its metadata; anything else lends nothing.
                with contextlib.suppress(NotADirectoryError):
                    found = self.lowers.open_dir(real)
                    lower = None if isinstance(found, str) else found
            if lower is None:
                uid = gid = 0
                mode = 0o755
                times = None
            else:
                lst, lfd = lower
                try:
                    uid, gid, mode = lst.st_uid, lst.st_gid, stat.S_IMODE(lst.st_mode)
                    times = (lst.st_atime_ns, lst.st_mtime_ns)
                    copy_xattrs(lfd, fd, self.what)
                finally:
                    os.close(lfd)
            if self.same_owner:
                os.fchown(fd, uid, gid)
            deferred = self._chmod_dir(fd, mode)
            if existing is not None:
                self._replaces_whiteout(fd, real)
            if times is not None or deferred is not None:
                st = os.fstat(fd)
                atime, mtime = times if times is not None else (st.st_atime_ns, st.st_mtime_ns)
                self.dirs[real] = _DirTimes(st.st_ino, atime, mtime, deferred)
        finally:
            os.close(fd)
        return True

    def _make_lower_dir(
        self, pfd: int, name: str, real: str, existing: os.stat_result | None
    ) -> bool | str:
        """`_make_dir`, but only for directories (or symlinks) some lower has."""
        if existing is not None:
            return self._make_dir(pfd, name, real, existing)
        lower = self.lowers.open_dir(real)
        if lower is None:
            return False
        if isinstance(lower, str):
            return self._lower_link(real, lower)
        return self._make_dir(pfd, name, real, None, lower=lower)

    def _lower_link(self, real: str, target: str) -> str:
        """Follow a lower's symlink at *real* in the upper, as the mount does.

        ``lib/x.so`` over a lower's ``lib -> usr/lib`` lands in
        ``usr/lib``, copied up, not in a new ``lib/`` that would hide the
        link (containerd, umoci and native mode all follow it). The walk
        that asked resolves *target* inside the upper's root. The upper has
        nothing at *real*, yet the root's cached walks now lead through it:
        whatever this layer puts there later must drop them (`_placed`).
        """
        self.links.add(real)
        return target

    def _copy_up(self, tparts: list[str], e: Entry) -> tuple[int, str] | None:
        """Copy a hardlink target that only a lower has into the upper dir.

        Returns:
            The upper parent directory (caller closes) and its real path, or
            None if no lower has the target.
        """
        found = self.lowers.find(tparts)
        if found is None:
            return None
        lfd, st = found
        tname = tparts[-1]
        try:
            if whiteouts.is_whiteout(st):
                return None
            if stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(
                    f"{self.what}: entry {e.path!r}: hardlink to directory {e.link!r}"
                )
            try:
                ufd, ureal = self.root.open_dir(tparts[:-1], self._make_dir)
            except (FileNotFoundError, NotADirectoryError) as err:
                raise SkipEntry(f"cannot copy up {e.link!r}: {err.filename!r} in the way") from None
            try:
                self._touch(ufd, ureal)
                copy_node(
                    lfd,
                    ufd,
                    tname,
                    st,
                    same_owner=self.same_owner,
                    devices=self.devices,
                    what=self.what,
                )
            except BaseException:
                os.close(ufd)
                raise
            self._mark(join(ureal, tname))
            return ufd, ureal
        finally:
            os.close(lfd)

    # -- metadata ----------------------------------------------------------------

    def _meta_fd(self, fd: int, e: Entry, *, is_dir: bool = False) -> int | None:
        """Owner, mode and xattrs through an open descriptor, in that order.

        chown clears setuid/setgid and file capabilities, so the mode comes
        after it and ``security.capability`` after both.

        Returns:
            A directory mode left to `_finish` (see `_chmod_dir`), else None.
        """
        if self.same_owner:
            os.fchown(fd, e.uid, e.gid)
        mode = e.mode
        deferred = None
        if is_dir:
            deferred = self._chmod_dir(fd, mode)
        else:
            os.fchmod(fd, mode)
        for name, value in e.xattrs:
            self._setxattr(fd, name, value, e)
        return deferred

    def _chmod_dir(self, fd: int, mode: int) -> int | None:
        """Set a directory's mode now, or leave it for the end.

        Without CAP_DAC_OVERRIDE a directory lacking owner rwx would stop
        its own children from being written, so it stays 0700 until
        `_finish` has handled everything below it.
        """
        if self.privileged or mode & 0o700 == 0o700:
            os.fchmod(fd, mode)
            return None
        os.fchmod(fd, 0o700)
        return mode

    def _meta_at(self, pfd: int, base: str, e: Entry, *, chmod: bool) -> None:
        """Owner, mode, xattrs and times of a symlink or node, by name."""
        if self.same_owner:
            os.chown(base, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        if chmod:
            # A node this entry just created: nothing to follow.
            os.chmod(base, e.mode, dir_fd=pfd)
        if e.xattrs:
            # No *at form of setxattr: go through an O_PATH descriptor, whose
            # /proc magic link reaches the inode itself, symlink or not.
            fd = os.open(base, _O_PATH, dir_fd=pfd)
            try:
                for name, value in e.xattrs:
                    self._setxattr(f"/proc/self/fd/{fd}", name, value, e)
            finally:
                os.close(fd)
        self._utime_at(pfd, base, e)

    def _utime_at(self, pfd: int, base: str, e: Entry) -> None:
        try:
            os.utime(base, ns=(e.atime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        except (OverflowError, OSError) as err:
            if isinstance(err, OSError) and err.errno != errno.EINVAL:
                raise
            log.warning("%s: %r: time not set: %s", self.what, e.path, err)

    def _setxattr(self, target: int | str, name: str, value: bytes, e: Entry) -> None:
        try:
            os.setxattr(target, name, value)
        except OSError as err:
            if err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                if not self._xattr_warned:
                    log.warning(
                        "%s: %r: xattrs not supported under root: %s", self.what, e.path, err
                    )
                    self._xattr_warned = True
                return
            if err.errno == errno.EPERM and (not self.privileged or name.startswith("user.")):
                # Unprivileged (security.*, trusted.*), or user.* on a
                # symlink or device, which the kernel refuses to everyone.
                log.warning("%s: %r: xattr %r not set: %s", self.what, e.path, name, err.strerror)
                return
            raise

    def _drop_xattrs(self, fd: int, keep: set[str]) -> None:
        """Remove xattrs a merged directory entry does not list."""
        try:
            names = os.listxattr(fd)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return
            raise
        for name in names:
            if name not in keep and not name.startswith(_KEEP_XATTRS):
                try:
                    os.removexattr(fd, name)
                except OSError as e:
                    log.warning("%s: xattr %r not removed: %s", self.what, name, e.strerror)

    def _finish(self) -> None:
        """Set directory times (and deferred modes) once their children exist.

        Deepest first, so a deferred restrictive mode never blocks a child.
        A directory is only touched if it is still the inode recorded.
        """
        order = sorted(self.dirs, key=lambda r: (-r.count("/") - (1 if r else 0), r))
        for real in order:
            t = self.dirs[real]
            parent, _, base = real.rpartition("/")
            try:
                if real:
                    pfd, _ = self.root.resolve(parent.split("/") if parent else [])
                else:
                    pfd, base = self.root.fd, "."
                st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode) or st.st_ino != t.ino:
                    continue
                if t.mode is not None:
                    os.chmod(base, t.mode, dir_fd=pfd)
                os.utime(base, ns=(t.atime, t.mtime), dir_fd=pfd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError, SymlinkLoop, TooDeep):
                continue
            except (OverflowError, OSError) as e:
                if isinstance(e, OSError) and e.errno != errno.EINVAL:
                    raise
                log.warning("%s: %r: directory time not set: %s", self.what, real, e)
