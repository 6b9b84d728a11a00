"""What each layer changes, and how two images differ, from the layer indexes.

A layer's changes are its entries judged against the stack below it
(`Merged` of layers 1 .. n-1), the way overlayfs would show them:

- **added**: the path is not in the stack below;
- **modified**: the layer writes a path the stack below has; ``fields``
  says what differs (`FIELDS`), and may be empty: a layer that rewrites a
  file unchanged (a new mtime, say) still stores it again, which is what
  ``ckfs space`` counts as waste. A directory over a directory is a change
  only when something differs (layers list the parents of what they add);
- **deleted**: one entry per path the layer hides: a whiteout, an opaque
  directory (what lower layers have under it that this layer does not put
  back), or a directory replaced by a non-directory (everything under it).
  A deleted directory is listed with every entry under it.

Two images are compared by their merged trees: a path in one only is added
or deleted; a path in both with any field differing is modified; equal
entries are not listed.

Content is compared without downloading whenever something else answers:
the same blob and path is the same bytes; different sizes are different
bytes; eStargz chunk digests, when both sides have them in the same places,
answer either way; when only one side has them, only the other side is
read, and hashed against them. Only files of equal size with no digest to
compare are read, both sides, piece by piece up to the first difference (`layer_diff`,
`diff_images`); `layer_changes` never reads, and leaves such a file without
``content`` in its fields (`ckfs layers` counts entries, not bytes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ckfs.archive.entry import Kind
from ckfs.errors import unwrap_groups
from ckfs.inspect.merged import Merged, Version

if TYPE_CHECKING:
    from ckfs.inspect.image import LayerInfo
    from ckfs.layerindex.model import Chunk, LayerIndex, Node

__all__ = [
    "FIELDS",
    "KINDS",
    "Change",
    "Layers",
    "Step",
    "diff_images",
    "layer_changes",
    "layer_diff",
    "layer_steps",
]

#: `Change.kind` values.
KINDS = ("added", "modified", "deleted")

#: What can differ between two versions of a path (`Change.fields`), in the
#: order they are listed. ``content``: a file's bytes or a device's number.
FIELDS = ("type", "content", "mode", "owner", "xattrs", "link")

#: Bytes compared per read when no digest answers: a difference early in a
#: large file stops the reading there, and memory stays bounded.
_PIECE = 1 << 20

#: Up to this many names of one directory are resolved in the stack below
#: one by one (each lookup walks every layer from the root); more, and the
#: lower directory is listed once instead. Listing a large lower directory
#: for a layer adding one file there would cost more than the lookup.
_RESOLVE_MAX = 8

#: Files compared at once by reading; each holds two pieces in memory.
_READERS = 4


class Layers(Protocol):
    """What this module needs of an image (`ckfs.inspect.ImageLayers` has it)."""

    @property
    def layers(self) -> list[LayerInfo]: ...

    def layer(self, n: int) -> LayerInfo: ...

    async def read(
        self, layer: LayerInfo, node: Node, offset: int = 0, size: int = -1
    ) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Change:
    """One path a layer (or the second image) adds, modifies or deletes.

    Attributes:
        path: the index path (no leading ``/``).
        kind: one of `KINDS`.
        fields: for ``modified``, what differs, in `FIELDS` order (may be
            empty in a layer's changes: rewritten unchanged); else ``()``.
        size: the new size (added, modified), the old one (deleted); 0 for
            anything but a regular file.
        layer: the layer making the change; None between two images.
    """

    path: str
    kind: str
    fields: tuple[str, ...]
    size: int
    layer: int | None

    def to_json(self) -> dict[str, object]:
        """Stable field names for ``--json``; the path absolute, as users type it."""
        return {
            "path": "/" + self.path,
            "kind": self.kind,
            "fields": list(self.fields),
            "size": self.size,
            "layer": self.layer,
        }


@dataclass(frozen=True, slots=True)
class Step:
    """A change with the versions it is about, for `ckfs.inspect.space`.

    Attributes:
        change: the change.
        old: what the stack below had at the path (modified, deleted).
        new: the layer's entry (added, modified).
        undecided: equal-size files no digest compares (read to decide).
    """

    change: Change
    old: Version | None
    new: Version | None
    undecided: bool = False


def layer_changes(image: Layers, n: int) -> list[Change]:
    """What layer *n* changes over layers 1 .. n-1, from the indexes alone.

    Never reads file bytes: a file rewritten at the same size with no digest
    to compare is listed as modified without ``content`` (see the module
    docstring).

    Raises:
        InvalidArgument: *n* is out of range.
    """
    return [s.change for s in layer_steps(image, n)]


async def layer_diff(image: Layers, n: int) -> list[Change]:
    """`layer_changes`, with undecided contents compared by reading both files.

    The indexes are walked in a worker thread: an event loop (the explorer's)
    stays responsive on a large layer.

    Raises:
        InvalidArgument: *n* is out of range.
        Unavailable, DataLoss: bytes that had to be read could not be.
    """
    import trio

    steps = await trio.to_thread.run_sync(layer_steps, image, n)
    return await _settle(image, image, steps)


async def diff_images(a: Layers, b: Layers, *, read: bool = True) -> list[Change]:
    """How the merged tree of *b* differs from that of *a* (``layer`` None).

    The trees are walked in a worker thread, as in `layer_diff`.

    Args:
        read: compare by reading the files no digest answers for; if False,
            they are listed as modified, with only the fields known to differ.

    Raises:
        Unavailable, DataLoss: bytes that had to be read could not be.
    """
    import trio

    steps = await trio.to_thread.run_sync(_image_steps, a, b)
    return await _settle(a, b, steps) if read else [s.change for s in steps]


def _image_steps(a: Layers, b: Layers) -> list[Step]:
    """The steps from *a*'s merged tree to *b*'s, sorted; contents undecided
    where no digest answers."""
    old = {v.path: v for v in Merged(a.layers).walk()}
    steps: list[Step] = []
    for new in Merged(b.layers).walk():
        was = old.pop(new.path, None)
        if was is None:
            steps.append(_added(new, None))
            continue
        fields, undecided = _differences(a, was, b, new)
        if fields or undecided:
            steps.append(_modified(was, new, fields, undecided, None))
    steps.extend(_deleted(v, None) for v in old.values())
    return _sorted(steps)


def layer_steps(image: Layers, n: int) -> list[Step]:
    """`layer_changes` with the versions each change is about, sorted by path.

    The layer's tree is walked once; the stack below is asked only about
    paths it can still have (nothing under a path it lacks or has as a
    non-directory). An opaque directory is compared as a new subtree over
    the old one: what it puts back at a path is modified there, what it
    does not is deleted, however deep.

    Raises:
        InvalidArgument: *n* is out of range.
    """
    index = image.layer(n).index
    below = Merged(image.layers[: n - 1])
    steps: list[Step] = []
    root = index.root()
    if root.opaque and below.layers:
        steps.extend(_hidden(below, "", index, root.ino, n))
    # (directory inode, its path, whether the stack below lacks it, whether
    # an opaque directory at or above it already listed what it hides)
    todo: list[tuple[int, str, bool, bool]] = [(root.ino, "", not below.layers, root.opaque)]
    while todo:
        ino, prefix, absent, swept = todo.pop()
        children = list(index.iter_children(ino))
        lowers = _lower_children(below, prefix, absent, len(children))
        for node in children:
            path = f"{prefix}/{node.name}" if prefix else node.name
            if absent:
                lower = None
            elif lowers is not None:
                lower = lowers.get(node.name)
            else:
                lower = below.resolve(path)
            new = Version(n, path, node)
            steps.extend(_entry_steps(image, below, new, lower))
            if node.kind != Kind.DIR:
                continue
            lower_dir = lower is not None and lower.node.kind == Kind.DIR
            if lower_dir and node.opaque and not swept:
                steps.extend(_hidden(below, path, index, node.ino, n))
            todo.append((node.ino, path, not lower_dir, swept or node.opaque))
    return _sorted(steps)


def _lower_children(
    below: Merged, path: str, absent: bool, wanted: int
) -> dict[str, Version] | None:
    """The stack below's directory *path* by name, when listing it is cheaper
    than resolving *wanted* of its names one by one (else None)."""
    if absent or wanted <= _RESOLVE_MAX:
        return None
    return {v.node.name: v for v in below.listdir(path)}


def _entry_steps(
    image: Layers, below: Merged, new: Version, lower: Version | None
) -> Iterator[Step]:
    """The steps one entry of the layer makes, given what is below its path."""
    node, n = new.node, new.layer
    if node.kind == Kind.WHITEOUT:
        if lower is not None:
            yield from _gone(below, lower, n)
        return
    if lower is None:
        yield _added(new, n)
        return
    if node.kind == Kind.DIR and lower.node.kind == Kind.DIR:
        # A directory over a directory changes only what differs (an
        # implied one shows the lower one's attributes: nothing).
        fields, _ = ((), False) if node.implied else _differences(image, lower, image, new)
        if fields:
            yield _modified(lower, new, fields, False, n)
        return
    fields, undecided = _differences(image, lower, image, new)
    yield _modified(lower, new, fields, undecided, n)
    if lower.node.kind == Kind.DIR:
        yield from _deleted_under(below, lower.path, n)


def _hidden(below: Merged, path: str, index: LayerIndex, ino: int, n: int) -> Iterator[Step]:
    """What opaque directory *ino* at *path* hides: lower entries it does not
    put back, at any depth (what it replaces is `_entry_steps`' business).

    A loop, not recursion: a layer may nest `ckfs.archive.secure.MAX_DEPTH`
    directories."""
    todo = [(path, ino)]
    while todo:
        path, ino = todo.pop()
        for child in below.listdir(path):
            mine = index.lookup(ino, child.node.name)
            if mine is None:
                yield from _gone(below, child, n)
            elif mine.kind == Kind.DIR and child.node.kind == Kind.DIR:
                todo.append((child.path, mine.ino))


def _gone(below: Merged, lower: Version, n: int) -> Iterator[Step]:
    """*lower* and, for a directory, everything under it, deleted by layer *n*."""
    yield _deleted(lower, n)
    if lower.node.kind == Kind.DIR:
        yield from _deleted_under(below, lower.path, n)


def _deleted_under(below: Merged, path: str, n: int) -> Iterator[Step]:
    return (_deleted(v, n) for v in below.walk(path))


def _added(new: Version, layer: int | None) -> Step:
    return Step(Change(new.path, "added", (), _size(new.node), layer), None, new)


def _deleted(old: Version, layer: int | None) -> Step:
    return Step(Change(old.path, "deleted", (), _size(old.node), layer), old, None)


def _modified(
    old: Version, new: Version, fields: tuple[str, ...], undecided: bool, layer: int | None
) -> Step:
    change = Change(new.path, "modified", fields, _size(new.node), layer)
    return Step(change, old, new, undecided)


def _size(node: Node) -> int:
    return node.size if node.kind == Kind.FILE else 0


def _differences(a: Layers, old: Version, b: Layers, new: Version) -> tuple[tuple[str, ...], bool]:
    """What differs between *old* (of image *a*) and *new* (of *b*), and
    whether their contents are still to be compared by reading."""
    o, n = old.node, new.node
    found: set[str] = set()
    undecided = False
    if o.kind != n.kind:
        found.add("type")
    elif o.kind == Kind.FILE:
        same = _same_content(a.layer(old.layer), old, b.layer(new.layer), new)
        undecided = same is None
        if same is False:
            found.add("content")
    elif o.kind in (Kind.CHAR, Kind.BLOCK) and o.rdev != n.rdev:
        found.add("content")
    if o.mode != n.mode:
        found.add("mode")
    if (o.uid, o.gid) != (n.uid, n.gid):
        found.add("owner")
    if o.link != n.link:
        found.add("link")
    old_index, new_index = a.layer(old.layer).index, b.layer(new.layer).index
    if old_index.xattrs(o.ino) != new_index.xattrs(n.ino):
        found.add("xattrs")
    return tuple(f for f in FIELDS if f in found), undecided


def _same_content(la: LayerInfo, a: Version, lb: LayerInfo, b: Version) -> bool | None:
    """Whether two files hold the same bytes, when the indexes can tell (else None)."""
    if a.node.size != b.node.size:
        return False
    if a.node.size == 0 or (la.index.layer == lb.index.layer and a.path == b.path):
        return True  # nothing to differ, or the same entry of the same blob
    ca, cb = la.index.chunks(a.node.ino), lb.index.chunks(b.node.ino)
    if ca and [(c.file_offset, c.size) for c in ca] == [(c.file_offset, c.size) for c in cb]:
        return [c.digest for c in ca] == [c.digest for c in cb]
    return None


async def _settle(a: Layers, b: Layers, steps: list[Step]) -> list[Change]:
    """The changes of *steps*, undecided contents compared by reading.

    Old versions come from image *a*, new ones from *b*. A file found equal
    keeps its other fields; between images, one with nothing left differing
    is dropped.

    Files are compared `_READERS` at a time, except when a side is an
    eager layer (`ckfs.inspect.image.EAGER`): its reader streams the blob
    forward and starts again for an earlier offset, so those are compared
    one by one, in path order (the usual order of a layer's tar).
    """
    import trio

    from ckfs.inspect.image import EAGER

    pairs = {
        i: (s.old, s.new)
        for i, s in enumerate(steps)
        if s.undecided and s.old is not None and s.new is not None
    }
    differs: dict[int, bool] = {}

    async def compare(i: int, old: Version, new: Version) -> None:
        differs[i] = not await _same_bytes(a, old, b, new)

    sources = {a.layer(o.layer).source for o, _ in pairs.values()}
    if EAGER in sources | {b.layer(n.layer).source for _, n in pairs.values()}:
        for i, (old, new) in pairs.items():
            await compare(i, old, new)
    else:
        limiter = trio.CapacityLimiter(_READERS)

        async def limited(i: int, old: Version, new: Version) -> None:
            async with limiter:
                await compare(i, old, new)

        with unwrap_groups():
            async with trio.open_nursery() as nursery:
                for i, (old, new) in pairs.items():
                    nursery.start_soon(limited, i, old, new)
    return [c for i, s in enumerate(steps) if (c := _decided(s, differs.get(i))) is not None]


def _decided(step: Step, differs: bool | None) -> Change | None:
    change = step.change
    if differs:
        fields = tuple(f for f in FIELDS if f == "content" or f in change.fields)
        return Change(change.path, change.kind, fields, change.size, change.layer)
    if differs is False and not change.fields and change.layer is None:
        return None
    return change


async def _same_bytes(a: Layers, old: Version, b: Layers, new: Version) -> bool:
    """Read both files piece by piece; False at the first difference.

    When one side's index has chunk digests covering the file, only the
    other side is read and hashed against them: a digest answers for its
    side, whose bytes (a lazily recorded layer's) are then never fetched.
    """
    la, lb = a.layer(old.layer), b.layer(new.layer)
    ca, cb = la.index.chunks(old.node.ino), lb.index.chunks(new.node.ino)
    if _covers(cb, new.node.size):
        return await _hashes_to(a, la, old.node, cb)
    if _covers(ca, old.node.size):
        return await _hashes_to(b, lb, new.node, ca)
    for offset in range(0, old.node.size, _PIECE):
        piece_a = await a.read(la, old.node, offset, _PIECE)
        piece_b = await b.read(lb, new.node, offset, _PIECE)
        if piece_a != piece_b:
            return False
    return True


def _covers(chunks: Sequence[Chunk], size: int) -> bool:
    """Whether *chunks* tile a file of *size* bytes, each with a sha256."""
    end = 0
    for c in chunks:
        if c.file_offset != end or not c.digest.startswith("sha256:"):
            return False
        end += c.size
    return bool(chunks) and end == size


async def _hashes_to(image: Layers, layer: LayerInfo, node: Node, chunks: Sequence[Chunk]) -> bool:
    """Read *node* in *chunks*' pieces; False at the first piece whose sha256 differs."""
    import hashlib

    import trio

    for c in chunks:
        h = hashlib.sha256()
        for offset in range(c.file_offset, c.file_offset + c.size, _PIECE):
            size = min(_PIECE, c.file_offset + c.size - offset)
            await trio.to_thread.run_sync(h.update, await image.read(layer, node, offset, size))
        if "sha256:" + h.hexdigest() != c.digest:
            return False
    return True


def _sorted(steps: Sequence[Step]) -> list[Step]:
    """In tree order: a directory before what is under it, ``a/b`` before ``a-b``."""
    return sorted(steps, key=_tree_order)


def _tree_order(step: Step) -> list[str]:
    return step.change.path.split("/")
