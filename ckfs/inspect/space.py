"""Where an image's bytes go: what later layers waste, the largest files, dive's score.

Every layer stores its files whole, so a file a later layer overwrites or
deletes still takes its bytes in the image (in every pull, in every
registry): those bytes are *wasted*. `space` walks the layers' changes
(`ckfs.inspect.changes.layer_steps`, indexes only, nothing read) and lists
each such version with the layer that stored it and the layer that made it
dead. A hardlinked file is wasted once all its names in its layer are gone.

The efficiency score is dive's (github.com/wagoodman/dive, "image
efficiency"): every path any layer writes or deletes has a list of
versions, one per layer, each of the size that layer gives it (a regular
file's size; a link or a device 0; deleting it, or putting a directory
there, 0; directories themselves are not scored); the score is the sum
over paths of each path's *smallest* version, divided by the sum of all
versions. 1.0 means no byte is stored twice or deleted; a file written in
three layers at 10 MB each counts 10 MB of 30 MB. Where ckfs differs from
dive's implementation: a hardlink's bytes count once (tar stores them once),
and the files under a deleted directory (whiteout, opaque directory, or a
directory replaced by a file) each get their deletion, where dive counts
the whole directory's size against the directory's own path, as both its
smallest and its total version: to dive, such a deletion is efficient (it
even raises the score).
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckfs.archive.entry import Kind
from ckfs.inspect.changes import Layers, Step, layer_steps
from ckfs.inspect.merged import Merged, Version

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["HOWS", "SpaceReport", "Waste", "space"]

#: `Waste.how`: the file was replaced by another entry, or deleted.
HOWS = ("overwritten", "deleted")


@dataclass(frozen=True, slots=True)
class Waste:
    """A file version a later layer made dead: its bytes are still in the image.

    Attributes:
        path: the index path of the file (for a hardlinked file, the name
            that was gone last).
        size: its bytes, stored in layer *layer*.
        layer: the layer storing it.
        by_layer: the layer overwriting or deleting it.
        how: ``overwritten`` or ``deleted`` (`HOWS`).
    """

    path: str
    size: int
    layer: int
    by_layer: int
    how: str

    def to_json(self) -> dict[str, object]:
        return {
            "path": "/" + self.path,
            "size": self.size,
            "layer": self.layer,
            "by_layer": self.by_layer,
            "how": self.how,
        }


@dataclass(frozen=True, slots=True)
class SpaceReport:
    """The space report of an image (see the module docstring).

    Attributes:
        total: bytes of every file version of every layer (uncompressed,
            hardlinks once): what the layers store.
        wasted: bytes of the versions in *waste*.
        efficiency: dive's score, 0 .. 1 (1.0 for an image with no bytes).
        waste: every wasted version, largest first.
        largest: the largest files of the merged tree, largest first.
    """

    total: int
    wasted: int
    efficiency: float
    waste: list[Waste]
    largest: list[Version]

    def to_json(self, top: int | None = None) -> dict[str, object]:
        """Stable field names for ``--json``; *top* cuts both lists."""
        return {
            "total": self.total,
            "wasted": self.wasted,
            "efficiency": self.efficiency,
            "waste": [w.to_json() for w in self.waste[:top]],
            "largest": [
                {"path": "/" + v.path, "size": v.node.size, "layer": v.layer}
                for v in self.largest[:top]
            ],
        }


class _Versions:
    """Per path, the sum and the smallest of the sizes layers give it (dive's score)."""

    def __init__(self) -> None:
        self.paths: dict[str, tuple[int, int]] = {}

    def add(self, path: str, size: int) -> None:
        known = self.paths.get(path)
        self.paths[path] = (size, size) if known is None else (known[0] + size, min(known[1], size))

    def score(self) -> float:
        total = sum(s for s, _ in self.paths.values())
        return 1.0 if total == 0 else sum(m for _, m in self.paths.values()) / total


def space(image: Layers, *, top: int = 20) -> SpaceReport:
    """The space report of *image*, from its indexes (nothing is read).

    Args:
        top: how many of the largest files to list.
    """
    versions = _Versions()
    total = 0
    waste: list[Waste] = []
    dead: Counter[tuple[int, int]] = Counter()  # (layer, inode) -> names gone
    for info in image.layers:
        stored: set[int] = set()  # inodes of this layer already counted
        for step in layer_steps(image, info.number):
            size = _stored(step, stored)
            total += size
            if (version := _version(step, size)) is not None:
                versions.add(step.change.path, version)
            if (w := _wasted(step, dead)) is not None:
                waste.append(w)
    waste.sort(key=lambda w: (-w.size, w.path, w.layer))
    return SpaceReport(
        total=total,
        wasted=sum(w.size for w in waste),
        efficiency=versions.score(),
        waste=waste,
        largest=_largest(Merged(image.layers).walk(), top),
    )


def _stored(step: Step, stored: set[int]) -> int:
    """The bytes *step* stores: a new file's size, once per inode of the layer."""
    new = step.new
    if new is None or new.node.kind != Kind.FILE or new.node.ino in stored:
        return 0
    stored.add(new.node.ino)
    return new.node.size


def _version(step: Step, stored: int) -> int | None:
    """The version *step* gives its path for the score: what it stores there,
    0 for a non-directory it deletes; None when directories are all it is
    about (dive scores leaves: a directory's files have their own paths)."""
    if step.new is not None and step.new.node.kind != Kind.DIR:
        return stored
    if step.old is not None and step.old.node.kind != Kind.DIR:
        return 0
    return None


def _wasted(step: Step, dead: Counter[tuple[int, int]]) -> Waste | None:
    """The waste *step* makes: the file it replaces or deletes, once its last name goes."""
    old, change = step.old, step.change
    if old is None or old.node.kind != Kind.FILE:
        return None
    key = (old.layer, old.node.ino)
    dead[key] += 1
    if dead[key] < old.node.nlink:
        return None
    how = "deleted" if change.kind == "deleted" else "overwritten"
    return Waste(old.path, old.node.size, old.layer, change.layer or 0, how)


def _largest(entries: Iterable[Version], top: int) -> list[Version]:
    files = (v for v in entries if v.node.kind == Kind.FILE)
    return heapq.nsmallest(top, files, key=lambda v: (-v.node.size, v.path))
