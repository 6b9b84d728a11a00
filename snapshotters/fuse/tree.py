"""The FUSE mount's tree without FUSE: layer directories, merged views, inodes.

One serving process per state root shows every indexed layer as a top-level
directory named by its digest (`ckfs.layerindex.dirname`), which kernel
overlayfs stacks as lowerdirs, and ``merged/<name>`` views that apply the
layers' whiteouts and opaque directories themselves (no kernel overlay)::

    /                         ROOT_INO
    /merged/                  MERGED_INO
    /merged/<view>/...        one view per <root>/fuse/views/<view>.json
    /sha256-<hex>/...         one directory per layer index in the store
    /sha256-<hex>.<key>/...   a variant of one: the same index, its implied
                              directories showing what <root>/fuse/chains/
                              <variant>.json says (`snapshotters.fuse.overrides`)

Inode numbers are stable across restarts of the server: a layer's node keeps
the index's ``fino`` (xxh3 of layer digest and path), a variant's node a hash
of that and the variant's key, a merged directory the same kind of hash of
its view and path. A merged view's files are the
layer's own inodes (the kernel sees them as hardlinks of the layer directory's
entries, which they are: same bytes, same attributes); its directories are
its own, since their children differ from any single layer's.

The kernel refers to an inode by number until it forgets it, and counts every
lookup reply (and every accepted readdirplus entry) as one reference. `Tree`
keeps exactly those inodes, with those counts, and each layer index open while
any of them points into it. Everything here is plain Python: `ops` is the thin
pyfuse3 shell over it, and the tests drive it without FUSE or root.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ckfs.archive.entry import Kind
from ckfs.digest import Digest
from ckfs.errors import CkfsError, InvalidArgument, NotFound
from ckfs.jsondoc import parse_object
from ckfs.layerindex.model import FIRST_FINO, LayerIndex, Node, stable_ino
from ckfs.layerindex.store import dirname
from snapshotters.fuse.overrides import (
    DirAttrs,
    Record,
    join_name,
    read_record,
    salted_ino,
    split_name,
)

if TYPE_CHECKING:
    from ckfs.layerindex.readers import Reader

__all__ = [
    "MERGED",
    "MERGED_INO",
    "RESERVED",
    "ROOT_INO",
    "Attr",
    "Entry",
    "Indexes",
    "Inode",
    "Layer",
    "Listing",
    "Tree",
    "View",
    "node_attr",
]

log = logging.getLogger(__name__)

#: The mount's root (FUSE's ``FUSE_ROOT_ID``).
ROOT_INO = 1
#: The directory holding the merged views.
MERGED_INO = 2
#: Inode numbers below this are the server's own directories; layer indexes
#: never hand them out (`ckfs.layerindex.model.stable_ino`).
RESERVED = FIRST_FINO

#: Name of the merged views' directory at the top; no layer dir looks like it.
MERGED = "merged"

#: Children read from a layer index per query while listing a directory:
#: a dozen or more readdirplus replies' worth (a 4 KiB reply holds a few
#: dozen entries with their attributes).
PAGE = 512

#: Largest directory whose listing `Inode.children` keeps (about 100 bytes
#: an entry); bigger ones are paged from the index every time.
CACHED_CHILDREN = 10_000

#: Xattr names a layer may not show: overlayfs reads ``trusted.overlay.*`` on
#: its lowerdirs as instructions (redirects, metacopy, opaque). Only the
#: index's own opaque flag may produce one.
OVERLAY_XATTR_PREFIX = "trusted.overlay."
OPAQUE_XATTR = "trusted.overlay.opaque"

_TYPES = {
    Kind.FILE: stat.S_IFREG,
    Kind.HARDLINK: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHAR: stat.S_IFCHR,
    Kind.BLOCK: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
    # overlayfs's own whiteout: a character device 0/0.
    Kind.WHITEOUT: stat.S_IFCHR,
}


@dataclass(frozen=True, slots=True)
class Attr:
    """What ``stat`` shows for one inode; atime and ctime are the mtime."""

    ino: int
    #: st_mode: file type and permission bits (setuid, setgid, sticky too).
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    mtime_ns: int = 0

    @property
    def blocks(self) -> int:
        """512-byte blocks, as a sparse-free file of this size occupies."""
        return (self.size + 511) // 512


def node_attr(node: Node, ino: int | None = None) -> Attr:
    """*node*'s attributes under inode *ino* (default: its stable ``fino``)."""
    if node.kind == Kind.WHITEOUT:
        # Exactly what overlayfs writes: no permissions, device 0/0.
        return Attr(ino or node.fino, stat.S_IFCHR, 1, node.uid, node.gid, 0, 0, node.mtime_ns)
    if node.kind == Kind.SYMLINK:
        size = len(os.fsencode(node.link))
    elif node.kind in (Kind.FILE, Kind.HARDLINK):
        size = node.size
    else:
        size = 0
    return Attr(
        ino=ino or node.fino,
        mode=_TYPES[node.kind] | (node.mode & 0o7777),
        nlink=max(1, node.nlink),
        uid=node.uid,
        gid=node.gid,
        rdev=node.rdev if node.kind in (Kind.CHAR, Kind.BLOCK) else 0,
        size=size,
        mtime_ns=node.mtime_ns,
    )


#: The server's own directories: root-owned, world-readable, never changing.
_OWN_DIR_MODE = stat.S_IFDIR | 0o755


class Indexes(Protocol):
    """The layer indexes of a state root (`ckfs.layerindex.store.IndexStore`)."""

    def get(self, digest: Digest) -> LayerIndex | None:
        """*digest*'s index, opened; None if the layer has none."""
        ...

    def digests(self) -> Iterable[Digest]:
        """Every layer with an index."""
        ...


class Layer:
    """One open layer index, shared by every inode that points into it.

    A variant of a layer (`snapshotters.fuse.overrides`) is a Layer of its
    own over the same index file: its implied directories show *dirs*, and
    its inodes are numbered apart from the shared directory's.

    Attributes:
        digest: the layer's digest.
        index: its open index.
        refs: known inodes pointing into it; at zero it is closed.
        name: its top-level directory's name.
        variant: the variant's key, or None for the shared directory.
        dirs: local inode → the attributes a variant shows for it.
    """

    __slots__ = ("_reader", "digest", "dirs", "index", "name", "refs", "variant")

    def __init__(
        self,
        digest: Digest,
        index: LayerIndex,
        variant: str | None = None,
        dirs: dict[int, DirAttrs] | None = None,
    ) -> None:
        self.digest = digest
        self.index = index
        self.refs = 0
        self.variant = variant
        self.dirs = dirs or {}
        self.name = join_name(digest, variant)
        self._reader: Reader | None = None

    def ino(self, node: Node) -> int:
        """The inode number *node* has in this layer's directory."""
        return node.fino if self.variant is None else salted_ino(node.fino, self.variant)

    def attr(self, node: Node) -> Attr:
        """*node*'s attributes in this layer's directory."""
        attr = node_attr(node, self.ino(node))
        over = self.dirs.get(node.ino)
        if over is None:
            return attr
        return Attr(
            attr.ino, stat.S_IFDIR | over.mode, attr.nlink, over.uid, over.gid, 0, 0, over.mtime_ns
        )

    def xattrs(self, node: Node) -> dict[str, bytes]:
        """*node*'s extended attributes in this layer's directory, as the index holds them."""
        over = self.dirs.get(node.ino)
        return self.index.xattrs(node.ino) if over is None else dict(over.xattrs)

    def reader(self, make: Callable[[LayerIndex], Reader]) -> Reader:
        """This layer's reader, made by *make* on first use."""
        if self._reader is None:
            self._reader = make(self.index)
        return self._reader

    def close(self) -> None:
        """Close the index, and the reader if it holds anything to close."""
        close = getattr(self._reader, "close", None)
        if callable(close):
            close()
        self.index.close()


@dataclass(frozen=True, slots=True)
class View:
    """One merged view: its name and its layers, top first."""

    name: str
    layers: tuple[Digest, ...]

    @property
    def key(self) -> str:
        """What merged inode numbers hash: a view re-written with other layers
        under the same name gets other inodes, so stale kernel caches miss."""
        return self.name + "\0" + ",".join(self.layers)


@dataclass(slots=True, eq=False)
class Inode:
    """One inode the kernel may refer to.

    A layer's node is its *layer* and *local* inode number there: the node
    itself stays in the index (`load`), so the kernel holding a whole
    layer's inodes costs the server a few hundred bytes each. A merged
    directory keeps the directories it merges in *merged*, top first, cut
    below the first opaque one. The server's own directories have neither.
    """

    ino: int
    attr: Attr
    layer: Layer | None = None
    local: int = 0
    merged: tuple[tuple[Layer, Node], ...] = ()
    #: Set for a merged view's root and directories.
    view: View | None = None
    #: Path inside the view (merged directories only; "" is its root).
    path: str = ""
    #: Which of *merged* gives the directory's attributes and xattrs.
    source: int = 0
    #: References the kernel holds (lookups minus forgets).
    lookups: int = 0
    #: A layer directory's (name, inode number) list, once listed whole:
    #: listing it again (the kernel caches no readdir replies) then costs no
    #: query and no new Node for the children it knows.
    children: list[tuple[str, int]] | None = None
    #: A symlink's target: the kernel caches none (pyfuse3 does not ask it
    #: to), so every path walk through a link (``/lib`` -> ``usr/lib``)
    #: reads it again.
    link: str | None = None

    def layers(self) -> list[Layer]:
        """The layers this inode keeps open."""
        return [self.layer] if self.layer is not None else [layer for layer, _ in self.merged]

    def load(self) -> tuple[Layer, Node] | None:
        """The layer and node behind this inode (a merged directory: the one
        giving its attributes); None for the server's own directories.

        Raises:
            NotFound: the index lost the node (it cannot: indexes never change).
        """
        if self.layer is not None:
            return self.layer, self.layer.index.node(self.local)
        return self.merged[self.source] if self.merged else None


@dataclass(frozen=True, slots=True)
class Entry:
    """A directory entry as listed: its name, and the inode it leads to."""

    name: str
    inode: Inode


class Listing:
    """One open directory's entries, by offset (pyfuse3's readdir ``start_id``).

    Layer directories page through the index; the others (root, ``merged/``,
    merged directories) are listed once at opendir, so offsets stay valid
    while the directory is read.
    """

    def __init__(self, tree: Tree, inode: Inode) -> None:
        self._tree = tree
        self._inode = inode
        self._names: list[str] | None = None
        # A layer directory's listing as read so far, while read in order.
        self._collected: list[tuple[str, int]] | None = []
        if inode.view is not None or inode.ino in (ROOT_INO, MERGED_INO):
            self._names = tree.names(inode)

    def entries(self, offset: int) -> Iterator[tuple[int, Entry]]:
        """Entries from *offset* on, each with the offset of the one after it.

        The inodes are not counted: the caller calls `Tree.remember` for each
        entry the kernel accepted.
        """
        if self._names is None:
            yield from self._layer_entries(offset)
            return
        for i in range(offset, len(self._names)):
            name = self._names[i]
            try:
                child = self._tree.child(self._inode, name)
            except CkfsError as e:
                # One broken view (or layer) must not hide its siblings.
                log.warning(
                    "listing %s: skipping %r: %s", self._tree.describe(self._inode.ino), name, e
                )
                continue
            if child is not None:
                yield i + 1, Entry(name, child)

    def _layer_entries(self, offset: int) -> Iterator[tuple[int, Entry]]:
        layer, local = self._inode.layer, self._inode.local
        assert layer is not None
        listed = self._inode.children
        if listed is not None:
            for i in range(offset, len(listed)):
                name, ino = listed[i]
                child = self._tree.known(ino)
                if child is None:
                    found = layer.index.lookup(local, name)
                    if found is None:  # an index never changes: cannot happen
                        continue
                    child = self._tree.layer_inode(layer, found)
                yield i + 1, Entry(name, child)
            return
        while True:
            page = layer.index.children(local, offset, PAGE)
            for found in page:
                self._collect(offset, found)
                offset += 1
                yield offset, Entry(found.name, self._tree.layer_inode(layer, found))
            if len(page) < PAGE:
                if self._collected is not None and len(self._collected) == offset:
                    self._inode.children = self._collected
                return

    def _collect(self, offset: int, child: Node) -> None:
        """Add *child*, at *offset*, to the listing kept for next time."""
        collected = self._collected
        if collected is None or offset < len(collected):
            return  # not collecting, or read again after a rewind
        if offset > len(collected) or offset >= CACHED_CHILDREN:
            self._collected = None  # a seek past a gap, or too big to keep
            return
        assert self._inode.layer is not None
        collected.append((child.name, self._inode.layer.ino(child)))


class Tree:
    """The whole mount's tree, over the layer indexes of one state root.

    Args:
        store: the root's layer indexes.
        views: the directory of merged views' JSON files
            (``<root>/fuse/views``).
        chains: the directory of variants' override records
            (``<root>/fuse/chains``); None: no variants.
    """

    def __init__(self, store: Indexes, views: Path, chains: Path | None = None) -> None:
        self._store = store
        self._views = views
        self._chains = chains
        #: Open layers by top-level directory name (a variant's own).
        self._layers: dict[str, Layer] = {}
        root = Attr(ROOT_INO, _OWN_DIR_MODE)
        merged = Attr(MERGED_INO, _OWN_DIR_MODE)
        self._inodes: dict[int, Inode] = {
            ROOT_INO: Inode(ROOT_INO, root, lookups=1),
            MERGED_INO: Inode(MERGED_INO, merged, lookups=1),
        }

    # -- the kernel's references ------------------------------------------------

    def inode(self, ino: int) -> Inode:
        """The known inode *ino*.

        Raises:
            NotFound: the kernel was never told of *ino*, or forgot it.
        """
        try:
            return self._inodes[ino]
        except KeyError:
            raise NotFound(f"inode {ino} is not known") from None

    def lookup(self, parent: int, name: str) -> Inode:
        """The entry *name* in directory *parent*, counted as one lookup.

        Raises:
            NotFound: no such entry, or *parent* is not known.
            InvalidArgument: *parent* is not a directory.
        """
        child = self.child(self.inode(parent), name)
        if child is None:
            self.sweep()
            raise NotFound(f"no entry {name!r} in inode {parent}")
        return self.remember(child)

    def known(self, ino: int) -> Inode | None:
        """The inode *ino* if the kernel holds a reference to it."""
        return self._inodes.get(ino)

    def remember(self, inode: Inode) -> Inode:
        """Count one kernel reference to *inode* (a lookup or readdirplus reply).

        Returns the registered inode: *inode* itself, or the one already
        known under its number.
        """
        known = self._inodes.get(inode.ino)
        if known is None:
            known = self._inodes[inode.ino] = inode
            for layer in inode.layers():
                layer.refs += 1
        known.lookups += 1
        return known

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped *n* references to *ino*; at zero it is gone.

        The server's own directories are never dropped. An unknown *ino* is
        ignored (forget has no reply to carry an error).
        """
        inode = self._inodes.get(ino)
        if inode is None or ino < RESERVED:
            return
        inode.lookups -= n
        if inode.lookups > 0:
            return
        if inode.lookups < 0:
            log.warning(
                "forget: inode %d forgotten %d times more than looked up", ino, -inode.lookups
            )
        del self._inodes[ino]
        for layer in inode.layers():
            layer.refs -= 1
            # Only this inode's layers: a forget per inode of a big walk
            # must not scan every open layer.
            if layer.refs <= 0 and self._layers.get(layer.name) is layer:
                self._layers.pop(layer.name).close()

    def sweep(self) -> None:
        """Close the layer indexes no known inode points into."""
        for name in [n for n, layer in self._layers.items() if layer.refs <= 0]:
            self._layers.pop(name).close()

    def statistics(self) -> dict[str, int]:
        """Known inodes and open layer indexes (for logs and tests)."""
        return {"inodes": len(self._inodes), "layers": len(self._layers)}

    # -- reading ----------------------------------------------------------------

    def child(self, parent: Inode, name: str) -> Inode | None:
        """The inode *name* leads to in *parent*, not counted; None if absent.

        Raises:
            InvalidArgument: *parent* is not a directory.
        """
        if parent.ino == ROOT_INO:
            return self._top(name)
        if parent.ino == MERGED_INO:
            return self._view_root(name)
        if not stat.S_ISDIR(parent.attr.mode):
            raise InvalidArgument(f"inode {parent.ino} is not a directory")
        if parent.view is not None:
            return self._merged_child(parent, name)
        assert parent.layer is not None
        child = parent.layer.index.lookup(parent.local, name)
        return None if child is None else self.layer_inode(parent.layer, child)

    def names(self, inode: Inode) -> list[str]:
        """Every name in a directory that is not a layer's own, sorted."""
        if inode.ino == ROOT_INO:
            layers = [dirname(d) for d in self._store.digests()]
            variants = _json_stems(self._chains) if self._chains is not None else []
            return [MERGED, *sorted(layers + variants)]
        if inode.ino == MERGED_INO:
            return sorted(_json_stems(self._views))
        names: set[str] = set()
        for layer, node in inode.merged:
            offset = 0
            while page := layer.index.children(node.ino, offset, PAGE):
                names.update(child.name for child in page)
                offset += len(page)
                if len(page) < PAGE:
                    break
        return sorted(names, key=os.fsencode)

    def opendir(self, ino: int) -> Listing:
        """A listing of directory *ino*.

        Raises:
            NotFound: *ino* is not known.
            InvalidArgument: it is not a directory.
        """
        inode = self.inode(ino)
        if not stat.S_ISDIR(inode.attr.mode):
            raise InvalidArgument(f"inode {ino} is not a directory")
        return Listing(self, inode)

    def readlink(self, ino: int) -> str:
        """A symlink's target as written in the layer.

        Raises:
            NotFound: *ino* is not known.
            InvalidArgument: it is not a symlink (readlink's EINVAL).
        """
        inode = self.inode(ino)
        if inode.link is None:
            raise InvalidArgument(f"inode {ino} is not a symlink")
        return inode.link

    def file(self, ino: int) -> tuple[Layer, Node]:
        """The layer and node of regular file *ino*, for reading its bytes.

        Raises:
            NotFound: *ino* is not known.
            InvalidArgument: it is not a regular file.
        """
        inode = self.inode(ino)
        found = inode.load() if stat.S_ISREG(inode.attr.mode) else None
        if found is None:
            raise InvalidArgument(f"inode {ino} is not a regular file")
        return found

    def xattrs(self, ino: int) -> dict[str, bytes]:
        """Extended attributes of *ino*, as overlayfs should see them.

        The layer's ``trusted.overlay.*`` attributes are dropped whatever the
        index holds; an opaque directory of a layer gets
        ``trusted.overlay.opaque=y``. Merged views show none of either: they
        have applied them already.
        """
        inode = self.inode(ino)
        top = inode.load()
        if top is None:
            return {}
        layer, node = top
        found = {
            name: value
            for name, value in layer.xattrs(node).items()
            if not name.startswith(OVERLAY_XATTR_PREFIX)
        }
        if node.opaque and inode.view is None:
            found[OPAQUE_XATTR] = b"y"
        return found

    def xattr(self, ino: int, name: str) -> bytes | None:
        """One extended attribute of *ino* (`xattrs`), None if it has none.

        overlayfs asks every lower file for ``trusted.overlay.metacopy`` (and
        directories for more): those are answered without reading the index.

        Raises:
            NotFound: *ino* is not known.
        """
        inode = self.inode(ino)
        if name.startswith(OVERLAY_XATTR_PREFIX) and (
            name != OPAQUE_XATTR or not stat.S_ISDIR(inode.attr.mode) or inode.view is not None
        ):
            return None
        return self.xattrs(ino).get(name)

    def describe(self, ino: int) -> str:
        """Where *ino* is, for log lines: its layer (or view) and path."""
        inode = self._inodes.get(ino)
        if inode is None:
            return f"unknown inode {ino}"
        if inode.view is not None:
            return f"view {inode.view.name} path /{inode.path}"
        top = inode.load()
        if top is None:
            return "/" if ino == ROOT_INO else f"/{MERGED}"
        layer, node = top
        return f"layer {layer.digest} path /{self._path(layer, node)}"

    # -- internals --------------------------------------------------------------

    def layer_inode(self, layer: Layer, node: Node) -> Inode:
        """The inode of a layer's node: the known one, or a new uncounted one."""
        ino = layer.ino(node)
        known = self._inodes.get(ino)
        if known is not None:
            return known
        link = node.link if node.kind == Kind.SYMLINK else None
        return Inode(ino, layer.attr(node), layer, node.ino, link=link)

    def _layer(self, digest: Digest, variant: str | None = None) -> Layer | None:
        """The open layer *digest* (or its *variant*), opened now if needed.

        None if the layer is not indexed, or the variant has no usable record.
        """
        name = join_name(digest, variant)
        layer = self._layers.get(name)
        if layer is not None:
            return layer
        record = None
        if variant is not None:
            record = self._record(name)
            if record is None:
                return None
        index = self._store.get(digest)
        if index is None:
            return None
        dirs = _implied_inodes(index, record.dirs, name) if record is not None else {}
        layer = self._layers[name] = Layer(digest, index, variant, dirs)
        return layer

    def _record(self, name: str) -> Record | None:
        """Variant *name*'s override record; None (logged if damaged) without one."""
        if self._chains is None:
            return None
        try:
            return read_record(self._chains, name)
        except InvalidArgument as e:
            log.warning("variant %s not served: %s", name, e)
            return None

    def _top(self, name: str) -> Inode | None:
        if name == MERGED:
            return self._inodes[MERGED_INO]
        try:
            digest, variant = split_name(name)
        except InvalidArgument:
            return None
        layer = self._layer(digest, variant)
        return None if layer is None else self.layer_inode(layer, layer.index.root())

    def _view(self, name: str) -> View | None:
        """The view *name* as its file says now; None if there is no such file.

        Raises:
            InvalidArgument: the file is not ``{"layers": [digest, ...]}``.
        """
        if name.startswith(".") or "/" in name:
            return None
        path = self._views / f"{name}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        doc = parse_object(data, str(path))
        layers = doc.get("layers")
        if not isinstance(layers, list) or not all(isinstance(d, str) for d in layers):
            raise InvalidArgument(f"{path}: 'layers' is not a list of digests")
        return View(name, tuple(Digest.parse(d) for d in reversed(layers)))

    def _view_root(self, name: str) -> Inode | None:
        view = self._view(name)
        if view is None:
            return None
        dirs: list[tuple[Layer, Node]] = []
        for digest in view.layers:
            layer = self._layer(digest)
            if layer is None:
                self.sweep()
                raise NotFound(f"view {name}: layer {digest} has no index")
            dirs.append((layer, layer.index.root()))
        return self._merged_dir(view, "", _cut_at_opaque(dirs))

    def _merged_child(self, parent: Inode, name: str) -> Inode | None:
        """*name* in a merged directory: overlayfs's rules, applied here.

        The topmost layer having *name* decides: a whiteout hides it, a
        non-directory is the answer; a directory merges with the directories
        of the same name below it, down to (and including) the first opaque
        one, and stops at anything else (a file or a whiteout hides
        everything under it).
        """
        assert parent.view is not None
        below = parent.merged
        for i, (layer, dir_node) in enumerate(below):
            node = layer.index.lookup(dir_node.ino, name)
            if node is None:
                continue
            if node.kind not in _TYPES or node.kind == Kind.WHITEOUT:
                return None
            if node.kind != Kind.DIR:
                return self.layer_inode(layer, node)
            dirs = [(layer, node)]
            for lower, lower_dir in below[i + 1 :]:
                if dirs[-1][1].opaque:
                    break
                other = lower.index.lookup(lower_dir.ino, name)
                if other is None:
                    continue
                if other.kind != Kind.DIR:
                    break
                dirs.append((lower, other))
            path = f"{parent.path}/{name}" if parent.path else name
            return self._merged_dir(parent.view, path, tuple(dirs))
        return None

    def _merged_dir(self, view: View, path: str, dirs: tuple[tuple[Layer, Node], ...]) -> Inode:
        # The index's own rule, keyed by the view instead of a layer digest.
        ino = stable_ino("view\0" + view.key, path)
        known = self._inodes.get(ino)
        if known is not None:
            return known
        # The attributes of the top directory a layer lists: one it only
        # implies is a copy of the one below it, as an eager unpack makes
        # it (`snapshotters.fuse.overrides`). nlink 1 says "not counted"
        # (find and fts then do not guess subdirectories from it).
        source = next((i for i, (_, node) in enumerate(dirs) if not node.implied), 0)
        if dirs:
            top = node_attr(dirs[source][1], ino)
            attr = Attr(ino, top.mode, 1, top.uid, top.gid, 0, 0, top.mtime_ns)
        else:  # a view of no layers: an empty directory
            attr = Attr(ino, _OWN_DIR_MODE)
        return Inode(ino, attr, merged=dirs, view=view, path=path, source=source)

    def _path(self, layer: Layer, node: Node) -> str:
        parts: list[str] = []
        seen = 0
        while node.parent and node.ino != node.parent and seen < 4096:
            parts.append(node.name)
            try:
                node = layer.index.node(node.parent)
            except NotFound:
                parts.append("?")
                break
            seen += 1
        return "/".join(reversed(parts))


def _cut_at_opaque(dirs: list[tuple[Layer, Node]]) -> tuple[tuple[Layer, Node], ...]:
    """*dirs* (top first) down to and including the first opaque one."""
    for i, (_, node) in enumerate(dirs):
        if node.opaque:
            return tuple(dirs[: i + 1])
    return tuple(dirs)


def _implied_inodes(
    index: LayerIndex, dirs: Mapping[str, DirAttrs], name: str
) -> dict[int, DirAttrs]:
    """*dirs* (by path) keyed by local inode; paths that are no implied directory are dropped."""
    found: dict[int, DirAttrs] = {}
    for path, attrs in dirs.items():
        node: Node | None = index.root()
        for part in path.split("/") if path else []:
            node = index.lookup(node.ino, part) if node is not None else None
        if node is None or node.kind != Kind.DIR or not node.implied:
            log.warning("variant %s: /%s is no implied directory of the layer", name, path)
            continue
        found[node.ino] = attrs
    return found


def _json_stems(directory: Path) -> list[str]:
    """The names of the ``<name>.json`` files in *directory* (views, override records).

    Hidden names are their writers' temporary files (atomic renames).
    """
    try:
        files = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [f[: -len(".json")] for f in files if f.endswith(".json") and not f.startswith(".")]
