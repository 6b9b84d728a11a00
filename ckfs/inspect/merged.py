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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckfs.errors import InvalidArgument
from ckfs.layerindex.model import Node

if TYPE_CHECKING:
    from ckfs.inspect.image import LayerInfo

__all__ = ["DELETIONS", "MAX_LINKS", "Deletion", "Merged", "Version", "Which", "user_path"]

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
    from ckfs.safetext import printable

    if "\0" in text:
        raise InvalidArgument(f"path {printable(text)!r}: contains a NUL byte")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"path {printable(text)!r}: '..' is not allowed")
    return "/".join(parts)


class Merged:
    """The merged tree of *layers* (bottom first), as overlayfs stacks them.

    Args:
        layers: the stack, bottom first (``ImageLayers.upto(n)``, or any
            list of `LayerInfo`; numbers need not start at 1).
    """

    def __init__(self, layers: Sequence[LayerInfo]) -> None:
        self.layers = list(layers)

    def resolve(self, path: str) -> Version | None:
        """The visible entry at *path*, or None (no symlink is followed)."""
        raise NotImplementedError  # TODO(I1)

    def which(self, path: str) -> Which:
        """The provider of *path*, the versions it shadows, or what deleted it."""
        raise NotImplementedError  # TODO(I1)

    def listdir(self, path: str) -> list[Version]:
        """The merged children of directory *path*, sorted by name (byte order).

        Raises:
            NotFound: no such directory in the merged tree.
            InvalidArgument: *path* is not a directory.
        """
        raise NotImplementedError  # TODO(I1)

    def walk(self, path: str = "") -> Iterator[Version]:
        """Every entry below directory *path* (not *path* itself), depth first,
        each directory's children in name order.

        Raises:
            As `listdir` for *path*.
        """
        raise NotImplementedError  # TODO(I1)

    def follow(self, path: str) -> str:
        """*path* with every symlink in it resolved inside the image root.

        Absolute targets start at the image root, ``..`` stops there, so
        the result is always a path of the image. A missing component ends
        the resolution: the rest is appended as it is.

        Raises:
            InvalidArgument: more than `MAX_LINKS` symlinks on the way (a loop).
        """
        raise NotImplementedError  # TODO(I1)
