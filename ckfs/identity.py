"""Chain IDs: one name for "these layers, applied in this order".

A layer's DiffID (the digest of its uncompressed tar) names a changeset, but
the same changeset applied on top of different parents gives different
filesystems. The image spec therefore names the *result* of applying layers
``L0 … Ln`` by a compound hash::

    ChainID(L0)       = DiffID(L0)
    ChainID(L0|…|Ln)  = sha256(ChainID(L0|…|Ln-1) + " " + DiffID(Ln))

Snapshots of committed layers are keyed by chain ID, which is how "is this
layer stack already unpacked?" is answered without touching the network, and
why two images sharing a base share its snapshots. The recursion always uses
sha256, whatever algorithm the DiffIDs use, as containerd and the image-spec
``identity`` package do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ckfs.digest import Digest
from ckfs.errors import InvalidArgument

__all__ = ["chain_id", "chain_ids"]


def chain_ids(diff_ids: Sequence[Digest | str]) -> list[Digest]:
    """The chain ID of every prefix of *diff_ids*, bottom layer first.

    ``chain_ids([A, B, C]) == [A, ChainID(A|B), ChainID(A|B|C)]``, so entry
    ``i`` names the snapshot holding layers ``0..i`` and entry ``i - 1`` its
    parent.

    Args:
        diff_ids: the image config's ``rootfs.diff_ids``, bottom first.

    Raises:
        InvalidArgument: *diff_ids* is empty or holds an invalid digest.
    """
    if isinstance(diff_ids, str):
        raise InvalidArgument("chain ids: expected a sequence of digests, got one string")
    if not diff_ids:
        raise InvalidArgument("chain ids: no diff ids (an image needs at least one layer)")
    out: list[Digest] = []
    for i, value in enumerate(diff_ids):
        try:
            diff_id = Digest.parse(value)
        except InvalidArgument as e:
            raise InvalidArgument(f"chain ids: diff_ids[{i}]: {e}") from None
        if not out:
            out.append(diff_id)
            continue
        h = hashlib.sha256(f"{out[-1]} {diff_id}".encode())
        out.append(Digest(f"sha256:{h.hexdigest()}"))
    return out


def chain_id(diff_ids: Sequence[Digest | str]) -> Digest:
    """The chain ID of the whole stack: the last entry of `chain_ids`.

    Args:
        diff_ids: the image config's ``rootfs.diff_ids``, bottom first.

    Raises:
        InvalidArgument: *diff_ids* is empty or holds an invalid digest.
    """
    return chain_ids(diff_ids)[-1]
