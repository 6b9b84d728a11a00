"""Snapshotters by name: ``overlayfs``, ``native`` and ``fuse`` (the lazy one).

`get` is the one way in, so the CLI, the daemon and the tests agree on
names; `NAMES`, `DEFAULT` and `SUMMARIES` give the CLI its choices and help.
The contract they implement is the core's (`ckfs.snapshots`); this package
holds implementations only.

Importing this module costs nothing beyond the standard library: ``ckfs
--help`` reads the names from here. Implementations are imported on first
use, so a command pays only for the snapshotter it opens.

Each implementation class has a ``from_context`` class method taking the
`ckfs.snapshots.InitContext`, as a containerd plugin's ``InitFn`` takes
its ``InitContext``: the class's own constructor keeps the arguments it
really needs, and the context is built in one place
(`ckfs.state.State.snapshotter`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from ckfs.snapshots import InitContext, Snapshotter

__all__ = ["DEFAULT", "NAMES", "SUMMARIES", "get"]

# name -> (module, class, one line for --help); the class's ``from_context``
# takes an InitContext.
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
    "fuse": (
        "snapshotters.fuse.snapshotter",
        "FuseSnapshotter",
        "overlayfs over layers served lazily by ckfs's FUSE server",
    ),
}

#: The registered snapshotter names, in order of preference.
NAMES: tuple[str, ...] = tuple(_REGISTRY)

#: What a command uses unless told otherwise, and what ckfsd's containerd
#: proxy ``ckfs`` stands for: overlayfs needs no serving process and is what
#: containerd users expect. ``ckfs mount`` and ``ckfs bundle`` default to
#: ``fuse`` (the lazy one) instead.
DEFAULT = "overlayfs"

#: One line per snapshotter saying what it is, for ``--help``.
SUMMARIES: dict[str, str] = {name: entry[2] for name, entry in _REGISTRY.items()}


def get(name: str, context: InitContext) -> Snapshotter:
    """Open the snapshotter *name* on the ckfs state root of *context*.

    Args:
        name: one of `NAMES`.
        context: what the snapshotter may use (`ckfs.state.State.snapshotter`
            builds it); it keeps its files under ``<root>/snapshots/<name>/``.

    Raises:
        InvalidArgument: no snapshotter has that name, or its root is
            unusable for it (see the implementation).
    """
    try:
        module, cls, _ = _REGISTRY[name]
    except KeyError:
        from ckfs.errors import InvalidArgument

        raise InvalidArgument(f"unknown snapshotter {name!r} (known: {', '.join(NAMES)})") from None
    factory = getattr(importlib.import_module(module), cls).from_context
    return cast("Snapshotter", factory(context))
