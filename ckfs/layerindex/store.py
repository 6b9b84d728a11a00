"""Where layer indexes live under a state root, keyed by layer digest.

``<root>/layers/<algorithm>/<hex>/index.db`` (plus, for gzip layers, the
seek index `GZIDX_NAME` beside it). An index is a cache of what its blob
says: a damaged or outdated one is rebuilt, never repaired, so `get` treats
one it cannot open as missing.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ckfs.digest import ALGORITHMS, Digest
from ckfs.errors import DataLoss, InvalidArgument
from ckfs.layerindex.model import LIMITS, IndexWriter, LayerIndex, Limits

__all__ = ["GZIDX_NAME", "INDEX_NAME", "IndexStore", "dirname", "parse_dirname"]

log = logging.getLogger(__name__)

INDEX_NAME = "index.db"

#: indexed_gzip's exported checkpoints (format GZIDX) of a gzip layer.
GZIDX_NAME = "index.gzidx"


def dirname(digest: Digest) -> str:
    """The layer's directory name in the FUSE mount: ``sha256-<hex>``.

    No ``:``, which overlayfs's ``lowerdir=`` option would split on.
    """
    d = Digest.parse(digest)
    return f"{d.algorithm}-{d.hex}"


def parse_dirname(name: str) -> Digest:
    """The digest `dirname` made *name* from.

    Raises:
        InvalidArgument: *name* is no such directory name.
    """
    algorithm, sep, hexpart = name.partition("-")
    if not sep or algorithm not in ALGORITHMS:
        raise InvalidArgument(f"{name!r} is not a layer directory name")
    return Digest.from_hex(algorithm, hexpart)


class IndexStore:
    """The layer indexes of one state root."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "layers"

    def layer_dir(self, digest: Digest) -> Path:
        d = Digest.parse(digest)
        return self.dir / d.algorithm / d.hex

    def path(self, digest: Digest) -> Path:
        """Where the index of layer *digest* is (whether or not it exists)."""
        return self.layer_dir(digest) / INDEX_NAME

    def get(self, digest: Digest) -> LayerIndex | None:
        """The index of layer *digest*, open; None if there is none.

        An index that cannot be opened (damaged, older format) counts as
        missing, with a warning: the caller rebuilds it over the old one.
        """
        path = self.path(digest)
        if not path.is_file():
            return None
        try:
            return LayerIndex.open(path)
        except DataLoss as e:
            log.warning("layer index %s unusable, to be rebuilt: %s", path, e)
            return None

    def writer(
        self, digest: Digest, *, source: str, blob_size: int, limits: Limits = LIMITS
    ) -> IndexWriter:
        """An `IndexWriter` whose `IndexWriter.commit` puts the index in place."""
        path = self.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        return IndexWriter(path, layer=digest, source=source, blob_size=blob_size, limits=limits)

    def remove(self, digest: Digest) -> bool:
        """Remove layer *digest*'s index and everything kept with it.

        Returns:
            Whether there was anything to remove.
        """
        d = self.layer_dir(digest)
        if not d.exists():
            return False
        shutil.rmtree(d)
        return True

    def digests(self) -> list[Digest]:
        """Every layer with an index, sorted."""
        found = []
        for algorithm in ALGORITHMS:
            base = self.dir / algorithm
            if not base.is_dir():
                continue
            for d in base.iterdir():
                if (d / INDEX_NAME).is_file():
                    try:
                        found.append(Digest.from_hex(algorithm, d.name))
                    except InvalidArgument:
                        log.warning("stray directory %s in the layer index store", d)
        return sorted(found)
