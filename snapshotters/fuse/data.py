"""The serving process's readers of layer bytes: now `ckfs.layerindex.readers`.

Kept so ``snapshotters.fuse.data.Readers`` still names them; the core must
not import snapshotters, and ``ckfs cat`` reads through the same readers.
"""

from ckfs.layerindex.readers import LocalTarReader, Readers, Unserved

__all__ = ["LocalTarReader", "Readers", "Unserved"]
