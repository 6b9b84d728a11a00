"""One layer alone, as its snapshot holds it: ``ckfs mount --layer N``.

A stacked rootfs hides what a layer did: its whiteouts delete, its opaque
directories hide, its files shadow. To look at a layer itself, the mount is
a read-only bind of the layer's own directory, where overlay's whiteout
form shows those as what they are: 0/0 character devices and
``trusted.overlay.opaque`` directories. That directory is the committed
snapshot's upper directory for an unpacked layer (`ckfs.snapshots.LayerDirs`),
or, for a lazily attached one, the layer's directory in the FUSE mount
(its shared directory, not a variant: the layer as its archive has it).

The mount stands on a view snapshot whose parent is the layer's chain ID,
named after its target like every ``ckfs mount`` (so ``ckfs umount`` and gc
treat it as any other), and labelled `LAYER_ONLY` so that a remount after
the FUSE server died (`snapshotters.fuse.recover`) binds the layer again
instead of mounting the view's stack.

``ckfs shell --layer N`` wants the layer writable (runc makes its mount
points in the rootfs): an overlay with the layer as its one lower
directory and a scratch upper directory, discarded with the container.
Its whiteouts then act as overlay's do, hiding themselves.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ckfs.errors import FailedPrecondition
from ckfs.mount import Mount
from ckfs.snapshots import LayerDirs, Snapshotter

__all__ = ["LAYER_ONLY", "layer_mounts", "mark_layer_only"]

#: On a mount's view snapshot: its mount shows the parent layer alone.
LAYER_ONLY = "ckfs.io/layer-only"


def layer_mounts(sn: Snapshotter, key: str, scratch: Path | None = None) -> list[Mount]:
    """A read-only bind of the layer *key* stands on (its parent), alone.

    Args:
        scratch: an empty directory: the mount is then a writable overlay
            on the layer, its upper and work directories made in *scratch*.

    Raises:
        NotFound: no such snapshot.
        FailedPrecondition: *key* has no parent, or *sn* keeps no
            directory per layer (native copies the whole tree each layer).
    """
    parent = sn.stat(key).parent
    if not parent:
        raise FailedPrecondition(f"snapshot {key!r} stands on no layer")
    from snapshotters.fuse.snapshotter import FuseSnapshotter

    if isinstance(sn, FuseSnapshotter) and (layer := sn.layer(parent)) is not None:
        source = sn.layer_dir(layer)
    elif isinstance(sn, LayerDirs):
        source = sn.upper_dir(parent)
    else:
        raise FailedPrecondition(
            "--layer needs the overlayfs or fuse snapshotter: this one keeps no directory per layer"
        )
    if scratch is None:
        return [Mount("bind", str(source), options=("ro", "rbind"))]
    from snapshotters.overlay import supports_index

    upper, work = scratch / "fs", scratch / "work"
    upper.mkdir()
    work.mkdir()
    options = [f"lowerdir={source}", f"upperdir={upper}", f"workdir={work}"]
    # The layer directory is shared with every mount of the image: an index
    # would tie it to this upper directory (as overlay's own mounts avoid).
    options += ["index=off"] if supports_index() else []
    return [Mount("overlay", "overlay", options=tuple(options))]


def mark_layer_only(sn: Snapshotter, key: str) -> None:
    """Label *key* `LAYER_ONLY` (before it is mounted, so a remount knows)."""
    info = sn.stat(key)
    sn.update(
        dataclasses.replace(info, labels={**info.labels, LAYER_ONLY: "true"}),
        [f"labels.{LAYER_ONLY}"],
    )
