"""The pyfuse3 shell over `snapshotters.fuse.tree`: requests in, errno out.

Each handler turns a request into one call on the `Tree` (or a layer's
reader) and its answer into pyfuse3's types; the model is tested without
FUSE. Every handler is wrapped (`_guarded`): pyfuse3 ends its main loop on
any exception other than `pyfuse3.FUSEError`, leaving a dead mount for every
container on it, so a bug becomes EIO for that one request plus a log line
naming the layer and path; so does any ckfs error but NotFound (ENOENT) and
InvalidArgument (EINVAL).

The content never changes (a layer's index is immutable), so entries and
attributes are cached by the kernel for `TIMEOUT` and open files keep their
page cache; the mount is read-only, and every write request answers EROFS.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from ckfs.errors import CkfsError, InvalidArgument, NotFound
from ckfs.layerindex.model import LayerIndex, Node
from ckfs.layerindex.readers import Reader
from snapshotters.fuse.tree import ROOT_INO, Attr, Layer, Listing, Tree

__all__ = ["BLOCK_SIZE", "ROOT_ATTR_TIMEOUT", "TIMEOUT", "Ops", "entry_attributes"]

log = logging.getLogger(__name__)

#: Seconds the kernel may keep entries and attributes: a day. Nothing under
#: a layer directory ever changes; the top level only gains and loses whole
#: layers, and a removed layer's index stays open while anything refers to it.
TIMEOUT = 86400.0

#: Seconds the kernel may keep the root's attributes. Short, so that a
#: ``stat`` of the mountpoint soon reaches the server again and answers
#: ENOTCONN once it is dead (`ckfs.mount.is_stale`; with cached attributes
#: the kernel answers for it). Not 0: every path walk through the root checks
#: its permission (default_permissions) and would then cost a request.
ROOT_ATTR_TIMEOUT = 1.0

#: st_blksize and statfs's block size: the page size, the unit the kernel
#: reads and caches in.
BLOCK_SIZE = 4096

#: statfs's f_namemax: the longest name a layer index accepts.
NAME_MAX = 255

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def entry_attributes(attr: Attr) -> pyfuse3.EntryAttributes:
    """*attr* as pyfuse3 replies it, with the long timeouts (the root's short)."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = pyfuse3.InodeT(attr.ino)
    e.generation = 0
    e.entry_timeout = TIMEOUT
    e.attr_timeout = ROOT_ATTR_TIMEOUT if attr.ino == ROOT_INO else TIMEOUT
    e.st_mode = pyfuse3.ModeT(attr.mode)
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = attr.rdev
    e.st_size = attr.size
    e.st_blksize = BLOCK_SIZE
    e.st_blocks = attr.blocks
    e.st_atime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.mtime_ns
    e.st_mtime_ns = attr.mtime_ns
    return e


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


def _guarded(what: str) -> Callable[[F], F]:
    """Wrap a handler so nothing but `pyfuse3.FUSEError` leaves it.

    NotFound is ENOENT and InvalidArgument EINVAL (what the request asked
    for is not there, or not of its kind); any other failure is EIO, logged
    with the object's layer and path: a registry that is down (EAGAIN would
    read as "try again at once"), a layer not served, bad bytes, an index
    closed or damaged under the server.

    Args:
        what: how the handler's first argument names its object: ``"inode"``,
            ``"file"`` (a file handle), ``"dir"`` (a directory handle) or
            ``""`` (none), for the log line.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def handler(self: Ops, *args: Any) -> Any:
            self.requests[fn.__name__] += 1
            try:
                return await fn(self, *args)
            except pyfuse3.FUSEError:
                raise
            except NotFound:
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            except InvalidArgument:
                raise pyfuse3.FUSEError(errno.EINVAL) from None
            except CkfsError as e:
                log.warning("%s %s: %s", fn.__name__, self.where(what, args), e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            except Exception:
                log.exception("%s %s: unexpected error", fn.__name__, self.where(what, args))
                raise pyfuse3.FUSEError(errno.EIO) from None

        return cast(F, handler)

    return wrap


class Ops(pyfuse3.Operations):
    """pyfuse3's operations over a `Tree`.

    Args:
        tree: the mount's model.
        reader: makes a layer's `Reader` (file bytes) from its index, once
            per open layer.
    """

    # No NFS export: lookups of "." and ".." are never needed.
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, reader: Callable[[LayerIndex], Reader]) -> None:
        super().__init__()
        self.tree = tree
        self._make_reader = reader
        self._files: dict[int, tuple[int, Layer, Node]] = {}
        self._dirs: dict[int, tuple[int, Listing]] = {}
        self._next_fh = 1
        #: Requests served, by handler name (forgets by inodes forgotten).
        self.requests: Counter[str] = Counter()
        #: Set once the kernel's INIT is handled: its reply is on its way,
        #: and the kernel has applied it before the next request is read.
        self.initialized = trio.Event()

    def init(self) -> None:
        """Called (blocking) while the kernel's INIT is handled; its reply is
        sent right after: waiters on `initialized` run before the next request."""
        self.initialized.set()

    def where(self, what: str, args: Sequence[Any]) -> str:
        """The object a request was about, for log lines (never raises)."""
        try:
            if what == "inode":
                return self.tree.describe(int(args[0]))
            if what == "file" and args[0] in self._files:
                return self.tree.describe(self._files[args[0]][0])
            if what == "dir" and args[0] in self._dirs:
                return self.tree.describe(self._dirs[args[0]][0])
        except Exception as e:  # a log line must not fail the request twice
            return f"{what} {args[:1]} ({e!r} describing it)"
        return f"{what} {args[:1]}" if what else ""

    def _handle(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- reading the tree ---------------------------------------------------------

    @_guarded("inode")
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.tree.lookup(parent_inode, os.fsdecode(name)).attr)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.requests["forget"] += len(inode_list)
        # No reply to carry an error: log, and never raise (see _guarded).
        for ino, n in inode_list:
            try:
                self.tree.forget(ino, n)
            except Exception:
                log.exception("forget %s: unexpected error", self.tree.describe(ino))

    @_guarded("inode")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.tree.inode(inode).attr)

    @_guarded("inode")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(self.tree.readlink(inode))

    @_guarded("inode")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = self._handle()
        self._dirs[fh] = (inode, self.tree.opendir(inode))
        return fh

    @_guarded("dir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        _, listing = self._dirs[fh]
        for next_id, entry in listing.entries(start_id):
            attrs = entry_attributes(entry.inode.attr)
            if not pyfuse3.readdir_reply(token, os.fsencode(entry.name), attrs, next_id):
                return
            # Accepted readdirplus entries count as lookups in the kernel.
            self.tree.remember(entry.inode)

    @_guarded("dir")
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
        # Listing the top level opens every layer; close the unreferenced.
        self.tree.sweep()

    @_guarded("inode")
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self.tree.xattr(inode, os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_guarded("inode")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return [os.fsencode(name) for name in self.tree.xattrs(inode)]

    @_guarded("")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # overlayfs refuses a lowerdir whose statfs fails; the numbers only
        # have to be sane: nothing is free on a read-only filesystem.
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = BLOCK_SIZE
        s.f_blocks = 0
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = self.tree.statistics()["inodes"]
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = NAME_MAX
        return s

    # -- reading files ------------------------------------------------------------

    @_guarded("inode")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise _erofs()
        layer, node = self.tree.file(inode)
        fh = self._handle()
        self._files[fh] = (inode, layer, node)
        # keep_cache: the bytes never change, so pages read once stay valid
        # across opens.
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)

    @_guarded("file")
    async def read(self, fh: int, off: int, size: int) -> bytes:
        _, layer, node = self._files[fh]
        if off >= node.size or size <= 0:
            return b""
        size = min(size, node.size - off)
        return await layer.reader(self._make_reader).read(node, off, size)

    @_guarded("file")
    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    # -- everything that writes: a read-only filesystem ---------------------------

    async def setattr(self, *args: Any, **kwargs: Any) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mknod(self, *args: Any, **kwargs: Any) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mkdir(self, *args: Any, **kwargs: Any) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def unlink(self, *args: Any, **kwargs: Any) -> None:
        raise _erofs()

    async def rmdir(self, *args: Any, **kwargs: Any) -> None:
        raise _erofs()

    async def symlink(self, *args: Any, **kwargs: Any) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def rename(self, *args: Any, **kwargs: Any) -> None:
        raise _erofs()

    async def link(self, *args: Any, **kwargs: Any) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def write(self, *args: Any, **kwargs: Any) -> int:
        raise _erofs()

    async def create(self, *args: Any, **kwargs: Any) -> tuple[pyfuse3.FileInfo, Any]:
        raise _erofs()

    async def setxattr(self, *args: Any, **kwargs: Any) -> None:
        raise _erofs()

    async def removexattr(self, *args: Any, **kwargs: Any) -> None:
        raise _erofs()
