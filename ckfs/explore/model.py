"""What the explorer shows of an image: a thin adapter over `ckfs.inspect`.

The UI (`ckfs.explore.app`) asks for rows: a directory's children in the
merged tree or in one layer's changes, where a path comes from, matches of
a search, the wasted-space report, a file's head. `Model` answers them from
the layers' indexes (`ckfs.inspect.Merged`, `ckfs.inspect.changes`,
`ckfs.inspect.space`) and reads bytes with `ImageLayers.read`, so nothing
is fetched but the heads of the files a user looks at.

Index work is blocking SQLite, so it runs in ``trio.to_thread``: the UI's
event loop never waits on a disk. Whole-tree passes (a search, a layer's
changes, the space report: seconds on a large image) run one at a time, so
the caches below are filled once; directory listings and lookups run beside
them, so a space report being made never holds up opening a directory.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import trio

from ckfs.archive.entry import Kind
from ckfs.inspect.changes import Layers
from ckfs.inspect.merged import Merged, Version, Which
from ckfs.options import DEFAULTS, PullOptions

if TYPE_CHECKING:
    from ckfs.inspect.changes import Step
    from ckfs.inspect.image import LayerInfo
    from ckfs.inspect.space import SpaceReport
    from ckfs.layerindex.model import Node
    from ckfs.state import State

__all__ = ["ADDED", "CHANGES", "DELETED", "MODIFIED", "Image", "Item", "Model", "opened"]

ADDED, MODIFIED, DELETED = "added", "modified", "deleted"

#: The kinds of change a layer makes (`Item.change`), as `ckfs.inspect.changes` names them.
CHANGES = (ADDED, MODIFIED, DELETED)

#: Entries a search walks between checks for cancellation: a new search
#: (or quitting) stops an old one within a few milliseconds.
_CANCEL_EVERY = 1000

T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    """One row of the explorer's tree.

    Attributes:
        version: the entry shown: the merged tree's provider, or in one
            layer's view that layer's entry (for a deletion, the version
            it deleted).
        change: in a layer's view, ``added``, ``modified`` or ``deleted``;
            "" in the merged view and for directories that only lead to
            changes.
        fields: what a modification changed (``content``, ``mode``, …).
    """

    version: Version
    change: str = ""
    fields: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return self.version.path

    @property
    def name(self) -> str:
        return self.version.path.rpartition("/")[2]

    @property
    def node(self) -> Node:
        return self.version.node

    @property
    def expandable(self) -> bool:
        """A directory: its children can be listed (a deleted one's: what it took along)."""
        return self.version.node.kind == Kind.DIR


class Image(Layers, Protocol):
    """What the model reads of an image: `ckfs.inspect.ImageLayers`' surface
    (what `ckfs.inspect.changes` reads, with a name and stacks)."""

    @property
    def name(self) -> str: ...

    def upto(self, n: int) -> list[LayerInfo]: ...


class Model:
    """The explorer's questions about *image*, answered from its indexes.

    Every method is a trio coroutine (the explorer calls them through
    `ckfs.explore.portal.TrioPortal`).
    """

    def __init__(self, image: Image) -> None:
        self.image = image
        self._passes = trio.CapacityLimiter(1)
        self._lookups = trio.CapacityLimiter(1)
        self._merged: dict[tuple[int, int], Merged] = {}
        self._changes: dict[int, _ChangeTree] = {}

    @property
    def name(self) -> str:
        return self.image.name

    @property
    def layers(self) -> list[LayerInfo]:
        return self.image.layers

    @property
    def top(self) -> int:
        """The top layer's number (0 for an image with no layers)."""
        return len(self.image.layers)

    async def children(self, path: str, layer: int | None = None) -> list[Item]:
        """The children of directory *path*: merged, or *layer*'s changes below it."""
        if layer is None:
            merged = self._stack(self.top)
            return await self._lookup(lambda: [Item(v) for v in merged.listdir(path)])
        return await self._pass(lambda: self._change_tree(layer).children(path))

    async def which(self, path: str) -> Which:
        """Where *path* of the whole image comes from (`Merged.which`)."""
        return await self._lookup(lambda: self._stack(self.top).which(path))

    async def search(self, needle: str, layer: int | None = None, limit: int = 500) -> list[Item]:
        """Entries whose path contains *needle* (case-insensitive), in tree order.

        In the merged tree, or among *layer*'s changes; at most *limit*.
        """
        return await self._pass(lambda: self._search(needle.casefold(), layer, limit))

    async def space(self) -> SpaceReport:
        """Wasted bytes and the largest files (`ckfs.inspect.space.space`)."""
        from ckfs.inspect.space import space

        return await self._pass(lambda: space(self.image))

    async def read(self, item: Item, size: int) -> bytes:
        """The first *size* bytes of regular file *item*, verified."""
        version = item.version
        return await self.image.read(self.image.layer(version.layer), version.node, 0, size)

    async def _pass(self, work: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(work, limiter=self._passes)

    async def _lookup(self, work: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(work, limiter=self._lookups)

    def _stack(self, top: int, bottom: int = 1) -> Merged:
        """The merged tree of layers *bottom* .. *top* (stateless: any thread may use it)."""
        key = (bottom, top)
        if key not in self._merged:
            self._merged[key] = Merged(self.image.upto(top)[bottom - 1 :])
        return self._merged[key]

    def _change_tree(self, n: int) -> _ChangeTree:
        if n not in self._changes:
            from ckfs.inspect.changes import layer_steps

            self._changes[n] = _ChangeTree(layer_steps(self.image, n), self._stack(n, n))
        return self._changes[n]

    def _search(self, needle: str, layer: int | None, limit: int) -> list[Item]:
        if layer is None:
            rows: Iterable[Item] = (Item(v) for v in self._stack(self.top).walk())
        else:
            rows = self._change_tree(layer).walk()
        found = []
        for i, item in enumerate(rows):
            if i % _CANCEL_EVERY == 0:
                trio.from_thread.check_cancelled()
            if needle in item.path.casefold():
                found.append(item)
                if len(found) == limit:
                    break
        return found


@contextlib.asynccontextmanager
async def opened(
    state: State,
    ref: str,
    on_indexed: Callable[[int, int], None] | None = None,
    *,
    options: PullOptions = DEFAULTS,
) -> AsyncIterator[Model]:
    """The model of image *ref* of *state*, open for the block (`ImageLayers.open`).

    Args:
        on_indexed: called with (layers ready, layers in all) while the
            layers' indexes open, for a progress display.
        options: the platform, and registry options for Range reads.

    Raises:
        As `ImageLayers.open`.
    """
    from ckfs.inspect.image import ImageLayers

    opening = ImageLayers.open(state, ref, options=options, on_indexed=on_indexed)
    async with await opening as image:
        yield Model(image)


class _ChangeTree:
    """One layer's changes as a tree: the changed entries and the directories
    of that layer leading to them.

    Args:
        steps: the layer's changes with their versions
            (`ckfs.inspect.changes.layer_steps`): a deletion shows the
            version it deleted, anything else the layer's own.
        alone: the layer by itself, for the directories leading to changes.
    """

    def __init__(self, steps: Sequence[Step], alone: Merged) -> None:
        self._items: dict[str, Item] = {}
        self._kids: dict[str, set[str]] = {}
        for step in steps:
            change = step.change
            version = step.new or step.old
            if version is None:
                continue  # nothing to show on either side
            self._items[change.path] = Item(version, change.kind, change.fields)
            self._link(change.path, alone)

    def _link(self, path: str, alone: Merged) -> None:
        """Make *path* reachable from the root through the layer's directories."""
        while path:
            parent = path.rpartition("/")[0]
            self._kids.setdefault(parent, set()).add(path)
            if not parent or parent in self._items:
                return
            version = alone.resolve(parent)
            if version is None:
                return  # (every layer has its entries' parents, implied at least)
            self._items[parent] = Item(version)
            path = parent

    def children(self, path: str) -> list[Item]:
        """The changed entries and leading directories right below *path*, by name."""
        kids = sorted(self._kids.get(path, ()), key=_byte_order)
        return [self._items[p] for p in kids]

    def walk(self, path: str = "") -> Iterator[Item]:
        """Every row below *path*, depth first, in name order."""
        for item in self.children(path):
            yield item
            yield from self.walk(item.path)


def _byte_order(path: str) -> bytes:
    """Sort key putting names in the byte order listings use."""
    return path.encode("utf-8", "surrogateescape")
