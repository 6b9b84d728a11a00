"""Images: names → descriptors, and the manifests, configs and platforms behind them.

The public API, re-exported from the modules that define it:

- `ImageStore`, `Image` (`ckfs.images.store`): the name → target store.
- `parse`, `children`, `Index`, `Manifest`, `index_json`, `manifest_json`,
  `MAX_MANIFEST_SIZE` (`ckfs.images.manifest`): reading and writing
  indexes and manifests.
- `ImageConfig`, `History`, `parse_config` (`ckfs.images.config`).
- `ckfs.images.platforms`: `normalize`, `parse`, `default`, `matches`,
  `select` (kept as a module: its ``parse`` would clash with the manifest one).
"""

from ckfs.images import platforms
from ckfs.images.config import History, ImageConfig, parse_config
from ckfs.images.manifest import (
    MAX_MANIFEST_SIZE,
    Index,
    Manifest,
    canonical_json,
    children,
    index_json,
    manifest_json,
    parse,
)
from ckfs.images.store import Image, ImageStore

__all__ = [
    "MAX_MANIFEST_SIZE",
    "History",
    "Image",
    "ImageConfig",
    "ImageStore",
    "Index",
    "Manifest",
    "canonical_json",
    "children",
    "index_json",
    "manifest_json",
    "parse",
    "parse_config",
    "platforms",
]
