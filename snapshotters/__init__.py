"""Snapshotters by name: ``overlayfs``, ``native`` (and ``fuse``, the lazy one, later).

`get` is the one way in, so the CLI, the daemon and the tests agree on
names. Implementations are imported on first use: a FUSE snapshotter pulls
in pyfuse3, which plain ``overlayfs`` users need not have.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import cast

from ckfs.errors import InvalidArgument
from ckfs.metadata.db import DB
from snapshotters.api import Cleaner, Info, Kind, Snapshotter, Usage

__all__ = ["NAMES", "Cleaner", "Info", "Kind", "Snapshotter", "Usage", "get"]

# name -> (module, class); the class takes (root, db).
_REGISTRY: dict[str, tuple[str, str]] = {
    "overlayfs": ("snapshotters.overlay", "OverlaySnapshotter"),
    "native": ("snapshotters.native", "NativeSnapshotter"),
}

#: The registered snapshotter names, in order of preference.
NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get(name: str, root: Path, db: DB) -> Snapshotter:
    """Open the snapshotter *name* on the ckfs state *root*.

    Args:
        name: one of `NAMES`.
        root: the state root; the snapshotter keeps its files under
            ``<root>/snapshots/<name>/``.
        db: the root's metadata database (the caller closes it).

    Raises:
        InvalidArgument: no snapshotter has that name, or *root* is
            unusable for it (see the implementation).
    """
    try:
        module, cls = _REGISTRY[name]
    except KeyError:
        raise InvalidArgument(f"unknown snapshotter {name!r} (known: {', '.join(NAMES)})") from None
    factory = getattr(importlib.import_module(module), cls)
    return cast(Snapshotter, factory(root, db))
