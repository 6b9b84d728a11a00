"""Snapshotters by name: ``overlayfs``, ``native`` (and ``fuse``, the lazy one, later).

`get` is the one way in, so the CLI, the daemon and the tests agree on
names; `NAMES`, `DEFAULT` and `SUMMARIES` give the CLI its choices and help.
The contract they implement is the core's (`ckfs.snapshots`); this package
holds implementations only.

Importing this module costs nothing beyond the standard library: ``ckfs
--help`` reads the names from here. Implementations are imported on first
use: a FUSE snapshotter pulls in pyfuse3, which plain ``overlayfs`` users
need not have.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from pathlib import Path

    from ckfs.metadata.db import DB
    from ckfs.snapshots import Snapshotter

__all__ = ["DEFAULT", "NAMES", "SUMMARIES", "get"]

# name -> (module, class, one line for --help); the class takes (root, db).
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "overlayfs": (
        "snapshotters.overlay",
        "OverlaySnapshotter",
        "layers the kernel's overlayfs stacks, up to a few hundred",
    ),
    "native": (
        "snapshotters.native",
        "NativeSnapshotter",
        "a bind-mounted full copy per snapshot, any depth",
    ),
}

#: The registered snapshotter names, in order of preference.
NAMES: tuple[str, ...] = tuple(_REGISTRY)

#: What a command uses unless told otherwise: until the lazy snapshotter
#: lands, overlayfs is what containerd users expect.
DEFAULT = "overlayfs"

#: One line per snapshotter saying what it is, for ``--help``.
SUMMARIES: dict[str, str] = {name: entry[2] for name, entry in _REGISTRY.items()}


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
        module, cls, _ = _REGISTRY[name]
    except KeyError:
        from ckfs.errors import InvalidArgument

        raise InvalidArgument(f"unknown snapshotter {name!r} (known: {', '.join(NAMES)})") from None
    factory = getattr(importlib.import_module(module), cls)
    return cast("Snapshotter", factory(root, db))
