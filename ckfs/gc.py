"""Garbage collection: remove content and snapshots no image or mount needs.

Roots are what a user can name: every image (its whole tree of present
content) and every active or view snapshot (a mount, a bundle, a prepared
snapshot), except ``extract-`` snapshots, which are scratch space of
unpacks. From the roots the collector follows:

- manifests and indexes to their children (parsed, so images imported
  before GC labels existed are covered too) and containerd's
  ``containerd.io/gc.ref.content.*`` labels;
- an image config's ``containerd.io/gc.ref.snapshot.<snapshotter>`` label to
  the top snapshot of the unpacked image;
- snapshots to their parents.

Everything else goes: blobs, committed snapshots, leftover extract
snapshots. Writers (import, pull, unpack, mount) hold the state's gc lock
shared and gc holds it exclusively, so nothing is collected between a blob's
commit and the moment it becomes reachable.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from ckfs.content import ContentStore
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import CkfsError, FailedPrecondition, InvalidArgument, NotFound
from ckfs.images import ImageStore
from ckfs.images import manifest as manifests
from ckfs.images.manifest import GC_CONTENT
from ckfs.jsondoc import parse_object
from ckfs.rootfs import EXTRACT_PREFIX, GC_SNAPSHOT
from snapshotters.api import Kind, Snapshotter

__all__ = ["GCReport", "collect"]

log = logging.getLogger(__name__)


@dataclass
class GCReport:
    """What a collection removed (or, dry, would remove)."""

    blobs: list[Digest] = field(default_factory=list)
    bytes: int = 0
    snapshots: dict[str, list[str]] = field(default_factory=dict)
    directories: list[str] = field(default_factory=list)


def _reachable_content(
    content: ContentStore, images: ImageStore
) -> tuple[set[Digest], dict[str, set[str]]]:
    """Blobs reachable from images, and the snapshot roots their configs name."""
    seen: set[Digest] = set()
    snapshot_roots: dict[str, set[str]] = {}
    todo = [i.target.digest for i in images.list()]
    while todo:
        digest = todo.pop()
        if digest in seen:
            continue
        try:
            info = content.info(digest)
        except NotFound:
            continue
        seen.add(digest)
        for key, value in info.labels.items():
            if key.startswith(GC_CONTENT):
                try:
                    todo.append(Digest.parse(value))
                except InvalidArgument:
                    log.warning("blob %s: ignoring malformed gc label %s", digest, key)
            elif key.startswith(GC_SNAPSHOT + "."):
                snapshot_roots.setdefault(key[len(GC_SNAPSHOT) + 1 :], set()).add(value)
        # Parse too: labels are a cache of what the manifest says, not the truth.
        if info.size <= manifests.MAX_MANIFEST_SIZE:
            todo.extend(_children(content, digest))
    return seen, snapshot_roots


def _children(content: ContentStore, digest: Digest) -> list[Digest]:
    """The children a manifest or index names; nothing for any other blob."""
    with content.reader(digest) as r:
        if r.read_at(0, 1) != b"{":
            return []  # a layer: not worth reading whole
        data = r.read_at(0, r.size)
    try:
        media_type = manifests.body_media_type(parse_object(data, "blob"), "blob")
        if media_type is None:
            return []
        return [
            c.digest for c in manifests.children(Descriptor(media_type, digest, len(data)), data)
        ]
    except CkfsError:
        return []  # not a manifest gc can read (schema 1, malformed): keep it, follow nothing


def _collect_snapshots(sn: Snapshotter, roots: set[str], dry_run: bool) -> list[str]:
    infos = {i.name: i for i in sn.walk()}
    keep: set[str] = set()
    todo = [n for n in roots if n in infos]
    todo += [
        i.name
        for i in infos.values()
        if i.kind is not Kind.COMMITTED and not i.name.startswith(EXTRACT_PREFIX)
    ]
    while todo:
        name = todo.pop()
        if name in keep or name not in infos:
            continue
        keep.add(name)
        if infos[name].parent:
            todo.append(infos[name].parent)
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
        if len(left) == len(pending):
            log.warning("gc: snapshots still have children: %s", ", ".join(left))
            break
        pending = left
    return removed


def collect(
    content: ContentStore,
    images: ImageStore,
    snapshotters: dict[str, Snapshotter],
    *,
    dry_run: bool = False,
) -> GCReport:
    """Remove what nothing reachable needs; the caller holds the gc lock exclusively.

    Args:
        content: the content store.
        images: the image store (the roots).
        snapshotters: every snapshotter by name.
        dry_run: only report.
    """
    report = GCReport()
    reachable, snapshot_roots = _reachable_content(content, images)
    for info in list(content.walk()):
        if info.digest in reachable:
            continue
        report.blobs.append(info.digest)
        report.bytes += info.size
        if not dry_run:
            with contextlib.suppress(NotFound):
                content.delete(info.digest)
    for name, sn in snapshotters.items():
        gone = _collect_snapshots(sn, snapshot_roots.get(name, set()), dry_run)
        if gone:
            report.snapshots[name] = gone
        cleanup = getattr(sn, "cleanup", None)
        if not dry_run and callable(cleanup):
            report.directories.extend(cleanup())
    return report
