"""What a fetch walks and reports, with no event loop and no network.

The fetcher (`ckfs.remotes.fetch`) and the pull that finds everything
already present (`ckfs.pull.pull_local`) share these: the blob states a
display shows, the `FetchReport`, which children a platform needs,
`present`, the walk over local content alone, and the check of the limits
both accept (`check_limits`) with the formats their messages share
(`megabytes`, `seconds_text`). Keeping them here means a re-pull of a
present image imports neither trio nor httpx.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from ckfs import mediatypes as mt
from ckfs.content import ContentStore
from ckfs.descriptor import Descriptor, Platform
from ckfs.errors import InvalidArgument, NotFound
from ckfs.images import manifest as manifests
from ckfs.images import platforms
from ckfs.progress import BlobProgress, BlobState
from ckfs.reference import Reference
from ckfs.remotes import DEFAULT_CONCURRENCY

__all__ = [
    "DEFAULT_CONCURRENCY",
    "BlobProgress",
    "BlobState",
    "ChildrenFunc",
    "FetchReport",
    "check_limits",
    "ensure_gc_labels",
    "is_parent",
    "kind_of",
    "megabytes",
    "missing",
    "platform_children",
    "present",
    "schema1_error",
    "seconds_text",
    "skip",
]


@dataclasses.dataclass
class FetchReport:
    """What one fetch did, blob by blob, for summaries and JSON output."""

    target: Descriptor
    blobs: list[BlobProgress] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def fetched_bytes(self) -> int:
        """Bytes received from the registry (including any resumed-over retries)."""
        return sum(b.fetched for b in self.blobs)

    @property
    def fetched_blobs(self) -> int:
        """Blobs committed by this fetch."""
        return sum(1 for b in self.blobs if b.state is BlobState.VERIFIED)

    @property
    def present_blobs(self) -> int:
        """Blobs that were already in the content store (not requested)."""
        return sum(1 for b in self.blobs if b.state is BlobState.EXISTS)

    @property
    def skipped(self) -> list[BlobProgress]:
        """Blobs left out on purpose (non-distributable layers)."""
        return [b for b in self.blobs if b.state is BlobState.SKIPPED]


#: ``children(desc, data)``: which descriptors under a manifest or index to
#: fetch (containerd's ``images.HandlerFunc`` returning children).
ChildrenFunc = Callable[[Descriptor, bytes], Sequence[Descriptor]]


def kind_of(desc: Descriptor) -> str:
    """``index``, ``manifest``, ``config``, ``layer`` or ``blob``: how messages and refs name it."""
    media_type = desc.media_type
    if mt.is_index(media_type):
        return "index"
    if mt.is_manifest(media_type) or media_type in mt.SCHEMA1:
        return "manifest"
    if mt.is_config(media_type):
        return "config"
    if mt.is_layer(media_type):
        return "layer"
    return "blob"


def is_parent(desc: Descriptor) -> bool:
    """Whether *desc* has children to follow (an index or a manifest)."""
    return mt.is_index(desc.media_type) or mt.is_manifest(desc.media_type)


def platform_children(
    platform: Platform | None = None, *, all_platforms: bool = False
) -> ChildrenFunc:
    """Children that a pull for *platform* needs (containerd's ``LimitManifests(FilterPlatforms)``).

    An index yields only its best match for the platform (see
    `platforms.select`), or every entry with *all_platforms*; a manifest
    yields its config and layers.

    Args:
        platform: the platform wanted; None means this host's.
        all_platforms: keep every manifest of an index.

    Raises:
        NotFound: (from the returned function) an index has no manifest for
            the platform; the message lists the ones it has.
    """
    want = platforms.normalize(platform) if platform is not None else platforms.default()

    def children(desc: Descriptor, data: bytes) -> Sequence[Descriptor]:
        found = manifests.children(desc, data)
        if all_platforms or not mt.is_index(desc.media_type):
            return found
        chosen = platforms.select(found, want)
        if not chosen:
            have = sorted({str(d.platform) for d in found if d.platform is not None})
            raise NotFound(
                f"index {desc.digest}: no manifest for platform {want} "
                f"(it has: {', '.join(have) or 'none with a platform'})"
            )
        return chosen[:1]

    return children


def schema1_error(ref: Reference, desc: Descriptor) -> InvalidArgument:
    return InvalidArgument(f"{ref}: manifest {desc.digest}: {manifests.SCHEMA1_HINT}")


def ensure_gc_labels(content: ContentStore, desc: Descriptor, data: bytes) -> None:
    """Add the GC labels a present manifest or index lacks (it may have come from elsewhere)."""
    want = manifests.gc_labels(desc, data)
    info = content.info(desc.digest)
    if all(info.labels.get(k) == v for k, v in want.items()):
        return
    content.update(dataclasses.replace(info, labels={**info.labels, **want}), ["labels"])


def present(
    content: ContentStore,
    ref: Reference,
    target: Descriptor,
    *,
    children: ChildrenFunc = manifests.children,
) -> FetchReport:
    """The report of a fetch that finds everything present, from local content alone.

    Walks *target* and what *children* leads to, reading only local
    manifests, as `ckfs.remotes.fetch.fetch` would with nothing to fetch:
    every blob ends `BlobState.EXISTS`, or `BlobState.SKIPPED` for an absent
    non-distributable layer. Present manifests get GC labels they lack.

    Raises:
        NotFound: a needed blob is not in the content store (the message
            names it); or an index has no manifest for the platform.
        InvalidArgument: a malformed manifest or index, or Docker schema 1.
    """
    report = FetchReport(target=target)
    seen: set[str] = set()
    pending = [target]
    while pending:
        desc = pending.pop(0)
        if str(desc.digest) in seen:
            continue
        seen.add(str(desc.digest))
        if desc.media_type in mt.SCHEMA1:
            raise schema1_error(ref, desc)
        p = BlobProgress(desc=desc, kind=kind_of(desc), state=BlobState.EXISTS, offset=desc.size)
        report.blobs.append(p)
        if content.exists(desc.digest):
            if is_parent(desc):
                data = content.read_all(desc.digest, limit=manifests.MAX_MANIFEST_SIZE)
                ensure_gc_labels(content, desc, data)
                p.offset = len(data)
                pending.extend(children(desc, data))
        elif desc.media_type in mt.NONDISTRIBUTABLE:
            skip(p)
        else:
            raise missing(ref, desc)
    return report


def skip(p: BlobProgress) -> None:
    """Mark an absent non-distributable layer as deliberately not fetched."""
    urls = f" (its urls: {', '.join(p.desc.urls)})" if p.desc.urls else ""
    p.state = BlobState.SKIPPED
    p.note = f"non-distributable layer, not fetched{urls}"
    p.offset = 0


def missing(ref: Reference, desc: Descriptor) -> NotFound:
    return NotFound(
        f"{ref}: {kind_of(desc)} {desc.digest} is not in the content store "
        "and the registry is not being asked"
    )


def check_limits(timeout: float | None, max_blob_size: int) -> None:
    """Refuse a *timeout* or *max_blob_size* no fetch could work with.

    Raises:
        InvalidArgument: *timeout* is not positive or *max_blob_size*
            below 1: a limit that refuses every blob is a mistake, and a
            silent "no limit" or "the default" would not be what was asked.
    """
    if timeout is not None and not timeout > 0:
        raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout}")
    if max_blob_size < 1:
        raise InvalidArgument(f"max blob size must be at least 1 byte, not {max_blob_size}")


def megabytes(n: int) -> str:
    """*n* bytes for a message: ``12.3 MB`` (1000-based, as the CLI's sizes)."""
    return f"{n / 1e6:.1f} MB"


def seconds_text(x: float) -> str:
    """A budget in seconds for a message: ``300``, ``125``, ``0.5``."""
    return f"{x:.0f}" if x >= 10 else f"{x:g}"
