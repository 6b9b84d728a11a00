"""Layer indexes: each layer's tree on disk, so it can be served lazily.

`ckfs.layerindex.model` holds the format (`IndexWriter`, `LayerIndex`),
`ckfs.layerindex.store` where indexes live under a state root; the sources
that build them are `tarindex` (uncompressed tar), `gzindex` (plain gzip,
with a seek index) and `estargz`. docs/layer-index.md describes the file.
"""

from ckfs.layerindex.store import dirname, parse_dirname

__all__ = ["dirname", "parse_dirname"]
