"""Garbage collection: remove content and snapshots no image or mount needs.

Roots are what a user, or another owner, can name: every image (its whole
tree of present content), every blob and snapshot labelled
``containerd.io/gc.root`` (as containerd's gc), every active or view
snapshot (a mount, a bundle, a prepared snapshot) except ``extract-``
snapshots, which are scratch space of unpacks, and every snapshot
containerd made or adopted (below). From the roots the collector follows, as
containerd's does (names in `ckfs.labels`):

- manifests and indexes to their children (parsed, so images imported
  before GC labels existed are covered too);
- ``containerd.io/gc.ref.content*`` labels on any kept blob or snapshot to
  blobs;
- ``containerd.io/gc.ref.snapshot.<snapshotter>[/…]`` labels on any kept
  blob (an unpacked image's config names its top snapshot) or snapshot to
  that snapshotter's snapshot;
- snapshots to their parents.

**Other owners.** Once containerd drives ckfs through ckfsd, some snapshots
are containerd's, and containerd's own gc removes them; ckfs must not,
and must tell them apart with no daemon to ask. containerd's metadata layer
names every snapshot it asks a backend for ``<namespace>/<n>/<key>``
(``default/3/sha256:…``, ``k8s.io/42/extract-…``), a form ckfs never makes
(its keys are chain IDs, ``extract-…``, ``mount:<path>``, or what a user
typed), so gc keeps every snapshot of that form, and its parents, whatever
its kind or labels. A layer ckfs unpacked that containerd adopted through
the proxy (labelled ``ckfs.io/adopted-by``, `ckfs.labels.ADOPTED_BY`) is
containerd's too, but containerd's gc cannot remove it through ckfsd, so
gc keeps it, and its parents, until ``ckfs snapshots rm`` removes it. A
user's own committed snapshot, not named by any of the above, is
collected, as before; label it ``containerd.io/gc.root`` to keep it.

Everything else goes: blobs, committed snapshots, leftover extract
snapshots. One bad record never stops the rest: a manifest that does not
parse, a blob or a directory that will not go (a tree a container made
unremovable) is one line in `GCReport.errors`, and everything else is still
collected; only a blob that cannot be read at all keeps every blob, since
what it names is unknown. Writers (import, pull, unpack, mount) hold the state's gc lock
shared and gc holds it exclusively, so nothing is collected between a blob's
commit and the moment it becomes reachable.

Ingests are not reachable or unreachable: an interrupted pull keeps its
bytes for the next one to resume. Those not written to for
`DEFAULT_INGEST_EXPIRY` (or the caller's expiry) go, unless a live writer
holds them (`ContentStore.expire_ingests`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

from ckfs import mediatypes as mt
from ckfs.content import ContentStore
from ckfs.content import Info as BlobInfo
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import CkfsError, FailedPrecondition, InvalidArgument, NotFound
from ckfs.images import ImageStore
from ckfs.images import manifest as manifests
from ckfs.jsondoc import parse_object
from ckfs.labels import ADOPTED_BY, GC_ROOT, content_refs, snapshot_refs
from ckfs.rootfs import EXTRACT_PREFIX
from ckfs.snapshots import Cleaner, CleanupError, Info, Kind, Snapshotter, containerd_owned

__all__ = ["DEFAULT_INGEST_EXPIRY", "GCReport", "collect"]

log = logging.getLogger(__name__)

#: Seconds an ingest may go unwritten before gc removes it: a day, as the
#: lease containerd's pulls take (``ctr``'s 24 h): long enough that a pull
#: interrupted today resumes tomorrow, short enough that the bytes of an
#: abandoned (or hostile) download do not hold the disk for good.
DEFAULT_INGEST_EXPIRY = 24 * 3600.0

#: A blob still to walk: its digest, the media type its parent gave it (None
#: when only a label named it), and the root it was reached from, for errors.
_Todo = tuple[Digest, str | None, str]


@dataclass
class GCReport:
    """What a collection removed (or, dry, would remove)."""

    blobs: list[Digest] = field(default_factory=list)
    bytes: int = 0
    snapshots: dict[str, list[str]] = field(default_factory=dict)
    directories: list[str] = field(default_factory=list)
    #: One line per record that could not be handled (an image whose
    #: manifest does not parse, a blob or a directory that would not go);
    #: gc collected everything else.
    errors: list[str] = field(default_factory=list)
    #: Refs of the stale ingests removed, and the bytes they held.
    ingests: list[str] = field(default_factory=list)
    ingest_bytes: int = 0
    #: Layers whose index and cached chunks were removed (lazy layers no
    #: image names and no snapshot attaches).
    layers: list[Digest] = field(default_factory=list)

    def to_json(self, *, dry_run: bool) -> dict[str, object]:
        """What ``ckfs gc --json`` prints, from here or through ckfsd alike."""
        return {
            "dry_run": dry_run,
            "blobs": [str(d) for d in self.blobs],
            "bytes": self.bytes,
            "snapshots": dict(sorted(self.snapshots.items())),
            "directories": self.directories,
            "ingests": self.ingests,
            "ingest_bytes": self.ingest_bytes,
            "layers": [str(d) for d in self.layers],
            "errors": self.errors,
        }


@runtime_checkable
class LayerHolder(Protocol):
    """A snapshotter whose snapshots read lazily served layers (``fuse``)."""

    def attached_layers(self) -> set[Digest]:
        """Every layer one of its snapshots reads: their indexes must stay."""


def _reachable(
    content: ContentStore,
    stored: Sequence[BlobInfo],
    images: ImageStore,
    snapshots: Mapping[str, Mapping[str, Info]],
    errors: list[str],
    named: set[Digest],
) -> tuple[set[Digest], dict[str, set[str]], bool]:
    """Blobs and snapshots (by snapshotter) reachable from the roots, and
    whether the blobs are the whole truth. *named* gets every digest a
    reachable blob names, present or not (a lazy image's layers are not).

    Blobs and snapshots name each other by labels, so the two walks take
    turns until neither finds anything new.
    *stored* is the content store's one walk, which the caller also
    collects from: the store's labels are read once per gc.
    """
    seen: set[Digest] = set()
    keep: dict[str, set[str]] = {name: set() for name in snapshots}
    blobs = _image_roots(images, errors)
    blobs += [
        (info.digest, None, f"blob {info.digest}") for info in stored if GC_ROOT in info.labels
    ]
    snaps = [(sn, key) for sn, infos in snapshots.items() for key in infos if _is_root(infos[key])]
    sure = True
    while blobs or snaps:
        refs, walked = _walk_content(content, blobs, seen, errors, named)
        sure = sure and walked
        snaps += refs
        blobs = _walk_snapshots(snapshots, snaps, keep)
        snaps = []
    return seen, keep, sure


def _image_roots(images: ImageStore, errors: list[str]) -> list[_Todo]:
    todo: list[_Todo] = []
    for image in images.list():
        media_type: str | None = image.target.media_type
        if not _is_manifest_type(image.target.media_type):
            errors.append(
                f"image {image.name}: target media type {image.target.media_type!r} "
                "is neither an index nor a manifest"
            )
            media_type = None  # sniffed, so a mislabelled manifest's blobs still stay
        todo.append((image.target.digest, media_type, f"image {image.name}"))
    return todo


def _is_root(info: Info) -> bool:
    """Whether a snapshot is kept for itself (see the module's docstring)."""
    if GC_ROOT in info.labels or ADOPTED_BY in info.labels or containerd_owned(info.name):
        return True
    return info.kind is not Kind.COMMITTED and not info.name.startswith(EXTRACT_PREFIX)


def _blob_refs(labels: Mapping[str, str], owner: str) -> list[_Todo]:
    """The blobs *owner*'s labels keep; a malformed one is logged and skipped."""
    todo: list[_Todo] = []
    for key, value in content_refs(labels):
        try:
            todo.append((Digest.parse(value), None, owner))
        except InvalidArgument:
            log.warning("%s: ignoring malformed gc label %s", owner, key)
    return todo


def _walk_content(
    content: ContentStore,
    todo: list[_Todo],
    seen: set[Digest],
    errors: list[str],
    named: set[Digest],
) -> tuple[list[tuple[str, str]], bool]:
    """Add to *seen* the blobs reachable from *todo*; the (snapshotter, key)
    pairs their labels keep, and whether every blob could be read.

    A manifest that does not parse (a hostile or corrupt record) is reported
    in *errors*, and only what its body names by its own media type, if
    anything, is kept; the rest of the store is walked as usual. A blob that
    cannot be read at all makes the answer unsure: its children might be
    anything, so the caller must not delete blobs.
    """
    refs: list[tuple[str, str]] = []
    sure = True
    while todo:
        digest, media_type, owner = todo.pop()
        named.add(digest)
        if digest in seen:
            continue
        try:
            info = content.info(digest)
        except NotFound:
            continue
        seen.add(digest)
        todo.extend(_blob_refs(info.labels, owner))
        refs.extend(snapshot_refs(info.labels))
        # Parse too: labels are a cache of what the manifest says, not the truth.
        try:
            kids = _children(content, info.digest, info.size, media_type)
        except _Unparsable as e:
            errors.append(f"{owner}: {e}")
            kids = e.sniffed
        except OSError as e:
            errors.append(f"{owner}: blob {digest}: {_reason(e)}")
            sure = False
            continue
        todo.extend((d.digest, d.media_type, owner) for d in kids)
    return refs, sure


def _walk_snapshots(
    snapshots: Mapping[str, Mapping[str, Info]],
    todo: list[tuple[str, str]],
    keep: dict[str, set[str]],
) -> list[_Todo]:
    """Add to *keep* the snapshots reachable from *todo* by parents and
    labels; the blobs their labels keep.

    A label naming a snapshotter or a snapshot that is not there keeps
    nothing, as in containerd.
    """
    blobs: list[_Todo] = []
    while todo:
        sn, key = todo.pop()
        info = snapshots.get(sn, {}).get(key)
        if info is None or key in keep[sn]:
            continue
        keep[sn].add(key)
        if info.parent:
            todo.append((sn, info.parent))
        todo.extend(snapshot_refs(info.labels))
        blobs.extend(_blob_refs(info.labels, f"snapshot {sn} {key}"))
    return blobs


def _children(
    content: ContentStore, digest: Digest, size: int, media_type: str | None
) -> list[Descriptor]:
    """The children a manifest or index names; nothing for any other blob.

    With the media type its parent (or the image) gave it, a blob is parsed
    only if that type is a manifest or an index, strictly. A blob only a
    label names is sniffed instead, and followed if it reads as one.

    Raises:
        _Unparsable: a blob named as a manifest or index is not one.
        OSError: the blob cannot be read.
    """
    if media_type is not None and not _is_manifest_type(media_type):
        return []  # a config or a layer: not worth reading
    if size > manifests.MAX_MANIFEST_SIZE:
        if media_type is None:
            return []
        raise _Unparsable(
            InvalidArgument(
                f"manifest {digest}: {size} bytes exceeds the "
                f"{manifests.MAX_MANIFEST_SIZE} byte limit"
            ),
            [],
        )
    with content.reader(digest) as r:
        if media_type is None and r.read_at(0, 1) != b"{":
            return []  # a layer: not worth reading whole
        data = r.read_at(0, r.size)
    if media_type is not None:
        try:
            return manifests.children(Descriptor(media_type, digest, len(data)), data)
        except CkfsError as e:
            # Mislabelled rather than garbage, maybe: what the body says it
            # is still keeps its children.
            raise _Unparsable(e, _sniffed_children(digest, data)) from None
    return _sniffed_children(digest, data)


class _Unparsable(Exception):
    """A blob named as a manifest or index that does not parse as one.

    Its message is *error*'s, the report's line.

    Attributes:
        sniffed: the children its body names by its own media type (often
            none), kept rather than collected.
    """

    def __init__(self, error: CkfsError, sniffed: list[Descriptor]) -> None:
        super().__init__(str(error))
        self.sniffed = sniffed


def _sniffed_children(digest: Digest, data: bytes) -> list[Descriptor]:
    """The children *data* names if its body reads as an index or manifest; else none."""
    try:
        media_type = manifests.body_media_type(parse_object(data, "blob"), "blob")
        if media_type is None:
            return []
        return manifests.children(Descriptor(media_type, digest, len(data)), data)
    except CkfsError:
        return []  # not a manifest gc can read (schema 1, malformed): keep it, follow nothing


def _is_manifest_type(media_type: str) -> bool:
    return mt.is_index(media_type) or mt.is_manifest(media_type) or media_type in mt.SCHEMA1


def _collect_snapshots(
    sn: Snapshotter, infos: Mapping[str, Info], keep: set[str], dry_run: bool, errors: list[str]
) -> list[str]:
    doomed = [n for n in infos if n not in keep]
    if dry_run:
        return doomed
    removed: list[str] = []
    # Children before parents: retry until a pass removes nothing.
    pending = list(doomed)
    while pending:
        left = []
        for name in pending:
            try:
                sn.remove(name)
                removed.append(name)
            except FailedPrecondition:
                left.append(name)
            except NotFound:
                pass
            except (CkfsError, OSError) as e:
                errors.append(f"snapshot {name}: {_reason(e)}")
        if len(left) == len(pending):
            errors.extend(f"snapshot {n}: still has children" for n in left)
            break
        pending = left
    return removed


def collect(
    content: ContentStore,
    images: ImageStore,
    snapshotters: dict[str, Snapshotter],
    *,
    dry_run: bool = False,
    ingest_expiry: float | None = DEFAULT_INGEST_EXPIRY,
    layer_root: Path | None = None,
) -> GCReport:
    """Remove what nothing reachable needs; the caller holds the gc lock exclusively.

    Args:
        content: the content store.
        images: the image store (the roots).
        snapshotters: every snapshotter by name.
        dry_run: only report.
        ingest_expiry: remove ingests not written to for this many seconds
            (those a live writer holds stay); None keeps them all.
        layer_root: the state root whose layer indexes (``layers/``) and
            chunk cache (``cache/``) to collect: a layer no reachable
            manifest names and no snapshot attaches loses both.

    Returns:
        What was (or would be) removed, and in ``errors`` one line for each
        record that could not be handled; everything else was collected.
    """
    report = GCReport()
    snapshots = {name: {i.name: i for i in sn.walk()} for name, sn in snapshotters.items()}
    stored = list(content.walk())
    named: set[Digest] = set()
    reachable, keep, sure = _reachable(content, stored, images, snapshots, report.errors, named)
    if not sure:
        report.errors.append("content: no blob removed, as not every image could be read")
    for info in stored if sure else []:
        if info.digest in reachable:
            continue
        if not dry_run:
            try:
                content.delete(info.digest)
            except NotFound:
                continue
            except (CkfsError, OSError) as e:
                report.errors.append(f"blob {info.digest}: {_reason(e)}")
                continue
        report.blobs.append(info.digest)
        report.bytes += info.size
    for name, sn in snapshotters.items():
        errors: list[str] = []
        gone = _collect_snapshots(sn, snapshots[name], keep[name], dry_run, errors)
        if gone:
            report.snapshots[name] = gone
        if not dry_run and isinstance(sn, Cleaner):
            report.directories.extend(sn.cleanup(on_error=_noting(errors)))
        report.errors.extend(f"{name}: {e}" for e in errors)
    if layer_root is not None and sure:
        attached = set().union(
            *(sn.attached_layers() for sn in snapshotters.values() if isinstance(sn, LayerHolder))
        )
        _collect_layers(layer_root, named | attached, dry_run, report)
    if ingest_expiry is not None:
        before = datetime.now(UTC) - timedelta(seconds=ingest_expiry)
        try:
            expired = content.expire_ingests(before, dry_run=dry_run)
        except (CkfsError, OSError) as e:
            report.errors.append(f"ingests: {_reason(e)}")
            expired = []
        for st in expired:
            report.ingests.append(st.ref)
            report.ingest_bytes += st.offset
    return report


def _collect_layers(root: Path, keep: set[Digest], dry_run: bool, report: GCReport) -> None:
    """Remove the index, cached chunks and chain records of every layer not in *keep*."""
    from ckfs.layerindex.cache import ChunkCache
    from ckfs.layerindex.store import IndexStore
    from ckfs.state import State

    indexes, cache = IndexStore(root), ChunkCache(State(root).cache_dir)
    for digest in sorted(set(indexes.digests()) | set(cache.layers())):
        if digest in keep:
            continue
        if not dry_run:
            try:
                indexes.remove(digest)
                cache.remove_layer(digest)
            except (CkfsError, OSError) as e:
                report.errors.append(f"layer {digest}: {_reason(e)}")
                continue
        report.layers.append(digest)
    if not dry_run:
        from ckfs.lazy import drop_chains

        try:
            drop_chains(root, set(indexes.digests()))
        except OSError as e:
            report.errors.append(f"chain records: {_reason(e)}")


def _noting(out: list[str]) -> CleanupError:
    """A `Cleaner.cleanup` callback that notes each directory that will not go in *out*."""

    def note(path: Path, e: Exception) -> None:
        out.append(f"{path}: {_reason(e)}")

    return note


def _reason(e: BaseException) -> str:
    """An error's one line: an `OSError` as its reason and file, not its repr."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)
