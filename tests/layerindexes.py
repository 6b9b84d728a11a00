"""Layer indexes built from `Entry` lists, for tests of the index and its users.

`build` writes the entries in order through the real `IndexWriter`, so a
test states exactly what a source would have added, hostile trees included.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ckfs.archive.entry import Entry, Kind
from ckfs.digest import Digest
from ckfs.layerindex.model import LIMITS, Chunk, IndexWriter, LayerIndex, Limits

__all__ = ["LAYER", "D", "Entry", "F", "Item", "Kind", "L", "build", "entries_of"]

LAYER = Digest.parse("sha256:" + "ab" * 32)

#: An entry with where its bytes are: (entry, data offset) or (entry, chunks).
Item = Entry | tuple[Entry, int] | tuple[Entry, list[Chunk]]


def F(path: str, size: int = 0, **kw: object) -> Entry:
    return Entry(path, Kind.FILE, size=size, **kw)  # type: ignore[arg-type]


def D(path: str, **kw: object) -> Entry:
    kw.setdefault("mode", 0o755)
    return Entry(path, Kind.DIR, **kw)  # type: ignore[arg-type]


def L(path: str, target: str) -> Entry:
    """A hardlink to *target* (a layer path)."""
    return Entry(path, Kind.HARDLINK, link=target)


def build(
    path: Path,
    items: Iterable[Item],
    *,
    layer: Digest = LAYER,
    source: str = "tar",
    blob_size: int = 1 << 40,
    limits: Limits = LIMITS,
) -> LayerIndex:
    """The index of *items*, committed at *path* (a file name) and open."""
    with IndexWriter(path, layer=layer, source=source, blob_size=blob_size, limits=limits) as w:
        for item in items:
            if isinstance(item, Entry):
                w.add(item)
            elif isinstance(item[1], int):
                w.add(item[0], data=item[1])
            else:
                w.add(item[0], chunks=item[1])
        return w.commit()


def entries_of(index: LayerIndex) -> dict[str, tuple[str, int]]:
    """path → (kind name, ino) of every node, for comparing whole trees."""
    from ckfs.layerindex.model import iter_nodes

    return {p: (n.kind.name, n.ino) for p, n in iter_nodes(index)}
