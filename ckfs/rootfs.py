"""From an unpacked image to Mount records, without an event loop.

An image's layers become committed snapshots named by chain ID (see
`ckfs.unpack`). Once they exist, a root filesystem is one snapshot on top
of the last chain ID: a stat, a prepare (or view) and its Mount records.
That path is kept free of trio and HTTP so a second ``ckfs mount`` of an
image costs a Python start, a few SQLite queries and a mount(2).
"""

from __future__ import annotations

from collections.abc import Mapping

from ckfs.content import ContentStore
from ckfs.descriptor import Descriptor, Platform
from ckfs.digest import Digest
from ckfs.errors import FailedPrecondition, InvalidArgument, NotFound
from ckfs.identity import chain_ids
from ckfs.images import image as img
from ckfs.images.config import ImageConfig
from ckfs.images.manifest import Manifest
from ckfs.mount import Mount
from ckfs.snapshots import Kind, LayerLimit, Snapshotter

__all__ = [
    "EXTRACT_PREFIX",
    "NotUnpacked",
    "check_depth",
    "check_depth_within",
    "committed",
    "image_chain",
    "layer_in_range",
    "snapshot_on",
]

#: Keys of snapshots being extracted start with this; anything else that
#: starts with it is a leftover of an interrupted unpack.
EXTRACT_PREFIX = "extract-"


class NotUnpacked(NotFound):
    """The image's layers are not all committed snapshots yet: unpack first."""


def committed(sn: Snapshotter, name: str) -> bool:
    """Whether *name* is a committed snapshot of *sn*."""
    try:
        return sn.stat(name).kind is Kind.COMMITTED
    except NotFound:
        return False


def check_depth(sn: Snapshotter, image: Descriptor, layers: int) -> None:
    """Refuse an image of *layers* layers that *sn* cannot stack (`ckfs.snapshots.LayerLimit`).

    Asked as soon as the layer count is known, before a layer is fetched
    or applied: overlay accepts such an image layer by layer and fails only
    at the mount, after all the work. Asks *sn* (a store call); with its
    limit in hand, `check_depth_within`.

    Raises:
        FailedPrecondition: too many layers for *sn*. Not InvalidArgument:
            the image is valid and another snapshotter (or a state root
            with shorter paths) takes it.
    """
    if isinstance(sn, LayerLimit):
        check_depth_within(sn.max_layers, sn.name, image, layers)


def check_depth_within(limit: int | None, snapshotter: str, image: Descriptor, layers: int) -> None:
    """`check_depth` against a *limit* read before (`ckfs.snapshots.max_layers`), from
    code that must not call the store (a fetch's children callback on the loop).

    Raises:
        FailedPrecondition: *layers* is over *limit*.
    """
    if limit is not None and layers > limit:
        raise FailedPrecondition(
            f"image {image.digest} has {layers} layers; the {snapshotter} snapshotter stacks "
            f"at most {limit} here (use --snapshotter native)"
        )


def image_chain(
    content: ContentStore, target: Descriptor, platform: Platform | None = None
) -> tuple[Manifest, ImageConfig, list[Digest]]:
    """The manifest, config and layer chain IDs of *target* for *platform*.

    Raises:
        NotFound: the manifest or config is not in the content store.
        FailedPrecondition: manifest and config disagree on the number of
            layers, or the image has none.
    """
    _, manifest = img.manifest(content, target, platform)
    config = img.read_config(content, manifest)
    if len(manifest.layers) != len(config.diff_ids):
        raise FailedPrecondition(
            f"image {target.digest}: manifest has {len(manifest.layers)} layers but the "
            f"config lists {len(config.diff_ids)} diff IDs"
        )
    if not config.diff_ids:
        raise FailedPrecondition(f"image {target.digest} has no layers")
    return manifest, config, chain_ids(config.diff_ids)


def snapshot_on(
    content: ContentStore,
    sn: Snapshotter,
    target: Descriptor,
    key: str,
    *,
    readonly: bool = False,
    labels: Mapping[str, str] | None = None,
    platform: Platform | None = None,
    upto: int | None = None,
    name: str = "",
) -> list[Mount]:
    """A new snapshot *key* on top of the unpacked image *target*: its Mount records.

    Args:
        readonly: a view instead of a writable (prepared) snapshot.
        labels: labels of the new snapshot.
        upto: stack only layers 1..*upto* (bottom first, as ``ckfs layers``
            numbers them): the snapshot's parent is that layer's chain ID.
            Only those layers need be unpacked.
        name: the image's name, for the out-of-range message.

    Raises:
        NotUnpacked: the chain ID it stands on is not a committed snapshot.
        FailedPrecondition: the image has more layers than *sn* stacks.
        InvalidArgument: *upto* is out of range.
        AlreadyExists: *key* is taken.
        NotFound: the image's manifest or config is missing.
    """
    _, _, chain = image_chain(content, target, platform)
    if upto is not None:
        chain = chain[: layer_in_range(upto, len(chain), name or str(target.digest))]
    check_depth(sn, target, len(chain))
    top = str(chain[-1])
    if not committed(sn, top):
        raise NotUnpacked(f"image {target.digest} is not unpacked (no snapshot {top})")
    create = sn.view if readonly else sn.prepare
    return create(key, top, labels)


def layer_in_range(number: int, layers: int, name: str) -> int:
    """*number* if it names a layer (1..*layers*, bottom first) of the image *name*.

    Raises:
        InvalidArgument: it does not.
    """
    if not 1 <= number <= layers:
        raise InvalidArgument(f"layer {number} out of range: {name} has {layers} layers")
    return number
