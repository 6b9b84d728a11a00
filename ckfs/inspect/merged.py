"""A stack of layers applied bottom-up, with the provenance of every entry.

Pure: it reads the layers' indexes and nothing else, so it is tested with
hand-built indexes (`ckfs.layerindex.model.IndexWriter`). The rules are
overlayfs's, as the lazy snapshotter stacks the same layers:

- an entry of a higher layer hides the same path below (a directory over a
  directory merges with it, unless it is opaque);
- a whiteout deletes the path below it (and everything under it);
- an opaque directory hides what lower layers have under it;
- a non-directory hides everything lower layers have under its path (a
  directory replaced by a file: "replaced-parent").

Paths are never resolved through symlinks, except by `Merged.follow`,
which resolves them inside the image root (``..`` stops at the root).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckfs.archive.entry import Kind
from ckfs.errors import DataLoss, InvalidArgument, NotFound
from ckfs.layerindex.model import Node
from ckfs.safetext import printable

if TYPE_CHECKING:
    from ckfs.inspect.image import LayerInfo

__all__ = [
    "DELETIONS",
    "MAX_LINKS",
    "Deletion",
    "Merged",
    "Version",
    "Which",
    "follow_links",
    "user_path",
]

#: How a path can be deleted by a layer (`Deletion.how`).
DELETIONS = ("whiteout", "opaque", "replaced-parent")

#: Symlinks `Merged.follow` resolves in one path: Linux's limit (ELOOP).
MAX_LINKS = 40


@dataclass(frozen=True)
class Version:
    """An entry as one layer has it.

    Attributes:
        layer: the layer's number (1 = bottom).
        path: the entry's index path.
        node: the entry in that layer's index (`LayerInfo.index`).
    """

    layer: int
    path: str
    node: Node


@dataclass(frozen=True)
class Deletion:
    """A layer hiding a path of the layers below it.

    Attributes:
        layer: the deleting layer's number.
        how: ``whiteout`` (a whiteout at the path or at a parent),
            ``opaque`` (an opaque directory above it), or ``replaced-parent``
            (a parent replaced by a non-directory).
        path: where the deleting entry is (the path itself or a parent).
    """

    layer: int
    how: str
    path: str


@dataclass(frozen=True)
class Which:
    """Where *path* of the merged tree comes from.

    Attributes:
        path: the path asked about (index path).
        provider: the visible entry, or None when the path is not in the
            merged tree.
        shadowed: lower layers' versions of the path that the provider (or
            the deletion) hides, top first; a version deleted before a
            higher layer put the path back is not listed.
        deleted_by: when the path is gone, the layer that deleted it (None
            if it never existed or is visible).
    """

    path: str
    provider: Version | None
    shadowed: list[Version]
    deleted_by: Deletion | None


def user_path(text: str) -> str:
    """The index path of a path typed by a user.

    ``/etc/passwd``, ``etc/passwd`` and ``./etc/passwd`` are the same
    path, ``etc/passwd``; ``/`` and ``""`` are the root, ``""``. Nothing
    is resolved: a path naming ``..`` is refused rather than clamped, so a
    typo never silently shows another file.

    Raises:
        InvalidArgument: a ``..`` component or a NUL in *text*.
    """
    if "\0" in text:
        raise InvalidArgument(f"path {printable(text)!r}: contains a NUL byte")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"path {printable(text)!r}: '..' is not allowed")
    return "/".join(parts)


def follow_links(path: str, look: Callable[[str], tuple[bool, str | None]]) -> str:
    """*path* with every symlink in it resolved inside a root, as `Merged.follow`.

    *look(p)* says whether the root has *p* (an index path) and, if it is a
    symlink, its target (else None). Every *p* it is asked about is made of
    components already found not to be symlinks, so a caller looking in a
    real directory tree may ``lstat`` ``root / p``: no link on the way is
    followed by the kernel, none leads out of the root (``ckfs shell``
    checks a command in a mounted rootfs so).

    Raises:
        InvalidArgument: more than `MAX_LINKS` symlinks on the way (a loop).
    """
    todo = deque(_parts(path))
    done: list[str] = []
    links = 0
    missing = False
    while todo:
        part = todo.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        done.append(part)
        target = None
        if not missing:
            found, target = look("/".join(done))
            missing = not found
        if target is None:
            continue
        links += 1
        if links > MAX_LINKS:
            raise InvalidArgument(f"path {printable(path)!r}: too many levels of symlinks")
        done.pop()
        if target.startswith("/"):
            done.clear()
        todo.extendleft(reversed(target.split("/")))
    return "/".join(done)


class Merged:
    """The merged tree of *layers* (bottom first), as overlayfs stacks them.

    Args:
        layers: the stack, bottom first (``ImageLayers.upto(n)``, or any
            list of `LayerInfo`; numbers need not start at 1).
        whiteouts: show whiteouts as entries (``Kind.WHITEOUT``) where no
            higher layer has the path, instead of deleting it: one layer
            alone as it is (``--layer N``).
    """

    def __init__(self, layers: Sequence[LayerInfo], *, whiteouts: bool = False) -> None:
        self.layers = list(layers)
        self.whiteouts = whiteouts

    def resolve(self, path: str) -> Version | None:
        """The visible entry at *path*, or None (no symlink is followed)."""
        return self.which(path).provider

    def which(self, path: str) -> Which:
        """The provider of *path*, the versions it shadows, or what deleted it.

        A deletion is reported only when it hid something: a whiteout over
        nothing, or a path below a file, never existed. A directory a layer
        only implies (as the parent of its entries) provides nothing when
        a lower layer's directory merges with it: that one's attributes
        show, and it is the provider (`_merged_into`).
        """
        parts = _parts(path)
        found: list[Version] = []
        deleted: Deletion | None = None
        for layer in reversed(self.layers):
            node, gone = _look(layer, parts, self.whiteouts)
            if node is not None:
                found.append(Version(layer.number, path, node))
            elif gone is not None:
                if found or deleted is not None:
                    break  # what lies below was deleted before the versions above came
                deleted = gone
        if deleted is not None:
            return Which(path, None, _real(found), deleted if found else None)
        if not found:
            return Which(path, None, [], None)
        top = _merged_into(found)
        return Which(path, found[top], _real(found[:top] + found[top + 1 :]), None)

    def listdir(self, path: str) -> list[Version]:
        """The merged children of directory *path*, sorted by name (byte order).

        Raises:
            NotFound: no such directory in the merged tree.
            InvalidArgument: *path* is not a directory.
        """
        return [v for v, _ in self._children(path, self._dir_stack(path))]

    def walk(self, path: str = "") -> Iterator[Version]:
        """Every entry below directory *path* (not *path* itself), depth first,
        each directory's children in name order.

        Each directory's layers are carried down from its parent, so a walk
        costs one listing per layer per directory, never a lookup from the root.

        Raises:
            As `listdir` for *path*.
        """
        pending = [iter(self._children(path, self._dir_stack(path)))]
        while pending:
            step = next(pending[-1], None)
            if step is None:
                pending.pop()
                continue
            version, below = step
            yield version
            if below:
                pending.append(iter(self._children(version.path, below)))

    def follow(self, path: str) -> str:
        """*path* with every symlink in it resolved inside the image root.

        Absolute targets start at the image root, ``..`` stops there, so
        the result is always a path of the image. A missing component ends
        the lookups: the rest is joined as written (``..`` still applied).

        Raises:
            InvalidArgument: more than `MAX_LINKS` symlinks on the way (a loop).
        """

        def look(at: str) -> tuple[bool, str | None]:
            version = self.resolve(at)
            if version is None:
                return False, None
            return True, version.node.link if version.node.kind == Kind.SYMLINK else None

        return follow_links(path, look)

    def _dir_stack(self, path: str) -> _Stack:
        """The layers' directories merged at *path*, top first."""
        parts = _parts(path)
        stack: _Stack = []
        for layer in reversed(self.layers):
            node, gone = _look(layer, parts)
            if gone is not None:
                break
            if node is None:
                continue
            if node.kind != Kind.DIR:
                if not stack:
                    raise InvalidArgument(f"{_shown(path)} is not a directory")
                break  # a lower non-directory ends the merge
            stack.append((layer, node))
            if node.opaque:
                break
        if not stack:
            raise NotFound(f"{_shown(path)}: no such directory")
        return stack

    def _children(self, path: str, stack: _Stack) -> list[tuple[Version, _Stack]]:
        """The merged entries of the directory *stack* makes at *path*, by name,
        each with its own stack (empty for a non-directory)."""
        seen: dict[str, tuple[Version, _Stack]] = {}
        closed: set[str] = set()  # names no lower layer adds to
        for layer, directory in stack:
            for child in layer.index.iter_children(directory.ino):
                name = child.name
                if name in closed:
                    continue
                entry = seen.get(name)
                if entry is None and ("/" in name or name in _NOT_NAMES or "\0" in name):
                    raise DataLoss(f"layer index {layer.index.path}: bad name {name!r}")
                if child.kind == Kind.WHITEOUT:
                    closed.add(name)
                    if self.whiteouts and entry is None:
                        seen[name] = (Version(layer.number, _join(path, name), child), [])
                elif entry is None:
                    below = [(layer, child)] if child.kind == Kind.DIR else []
                    seen[name] = (Version(layer.number, _join(path, name), child), below)
                    if not below or child.opaque:
                        closed.add(name)
                elif child.kind == Kind.DIR:
                    entry[1].append((layer, child))
                    if entry[0].node.implied:  # `_merged_into`
                        seen[name] = (Version(layer.number, entry[0].path, child), entry[1])
                    if child.opaque:
                        closed.add(name)
                else:
                    closed.add(name)
        return [seen[name] for name in sorted(seen, key=_name_key)]


#: Names no tar entry can give (a tar's ``..`` is refused when indexed):
#: one listed came from a damaged or tampered index, and would print a path
#: that is not where the entry is.
_NOT_NAMES = frozenset({"", ".", ".."})

#: The directories of one merged path, top layer first.
_Stack = list[tuple["LayerInfo", Node]]


def _parts(path: str) -> list[str]:
    return path.split("/") if path else []


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _name_key(name: str) -> bytes:
    """Names sort as the index lists them: by their bytes."""
    return name.encode("utf-8", "surrogateescape")


def _shown(path: str) -> str:
    return repr("/" + printable(path))


def _merged_into(found: list[Version]) -> int:
    """Which of *found* (top first) provides a path: the top one, unless it is
    a directory layers only imply; then the first real directory it merges
    with, or the lowest of those merged (where the directory first appeared)."""
    for i, version in enumerate(found):
        node = version.node
        if node.kind != Kind.DIR:
            return max(i - 1, 0)
        if not node.implied or node.opaque:
            return i
    return len(found) - 1


def _real(versions: list[Version]) -> list[Version]:
    """*versions* but the directories layers only imply."""
    return [v for v in versions if not v.node.implied]


def _look(
    layer: LayerInfo, parts: list[str], whiteouts: bool = False
) -> tuple[Node | None, Deletion | None]:
    """*layer*'s entry at the path of *parts*, or what in it hides lower layers' entry there.

    With *whiteouts*, a whiteout at the path itself is the entry.

    Returns:
        (the node, None) when the layer has the path; (None, the deletion)
        when it hides the path of lower layers; (None, None) when it neither
        has nor hides it.
    """
    index = layer.index
    node = index.root()
    for i, part in enumerate(parts):
        child = index.lookup(node.ino, part)
        if child is None:
            if node.opaque:
                return None, Deletion(layer.number, "opaque", "/".join(parts[:i]))
            return None, None
        if child.kind == Kind.WHITEOUT:
            if whiteouts and i == len(parts) - 1:
                return child, None
            return None, Deletion(layer.number, "whiteout", "/".join(parts[: i + 1]))
        if i < len(parts) - 1 and child.kind != Kind.DIR:
            return None, Deletion(layer.number, "replaced-parent", "/".join(parts[: i + 1]))
        node = child
    return node, None
