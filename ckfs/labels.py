"""The containerd label names ckfs reads or writes, and what each means.

containerd keeps its object graph in labels: its garbage collector follows
them, and its remote snapshotters and ``ctr`` read them. ckfs writes the same
names so that containerd, driving ckfs through ckfsd, sees the graph it
expects, and ckfs's own gc reads them so that it keeps what containerd (or a
user) keeps. The names live here, once, so the writer and the reader cannot
drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

__all__ = [
    "ADOPTED_BY",
    "CONTAINERD",
    "DISTRIBUTION_SOURCE",
    "GC_REF_CONTENT",
    "GC_REF_SNAPSHOT",
    "GC_ROOT",
    "SNAPSHOT_REF",
    "content_refs",
    "gc_snapshot_label",
    "snapshot_refs",
]

#: On any record (blob, snapshot): keep it, whatever refers to it or not.
#: containerd's gc treats such a record as a root; ckfs's gc does the same,
#: so a layer a user or containerd pinned is never collected.
GC_ROOT = "containerd.io/gc.root"

#: Prefix of the labels from a record to the blobs it needs
#: (``…content.l.0`` = a layer's digest, ``…content.config``, ``…content.m.1``).
#: ckfs writes them on manifests and indexes; both gcs follow them from any
#: record they keep.
GC_REF_CONTENT = "containerd.io/gc.ref.content"

#: Prefix of the labels from a record to a snapshot:
#: ``containerd.io/gc.ref.snapshot.<snapshotter>[/<anything>]`` = the
#: snapshot's key in that snapshotter. ckfs writes one on an image's config
#: naming the top snapshot an unpack made; both gcs follow them from any
#: record they keep.
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot"

#: Snapshot label an unpacker puts on each layer's extract snapshot, naming
#: the chain ID it will commit. containerd's unpacker sets it so a remote
#: (lazy) snapshotter can answer Prepare with AlreadyExists when it can
#: provide that layer itself; ckfs unpacks the same way. gc does not read it.
SNAPSHOT_REF = "containerd.io/snapshot.ref"

#: Snapshot label ckfs sets, once, on a layer it unpacked itself when
#: containerd adopts that layer through the proxy snapshotter (ckfsd's
#: Snapshots service shows it to containerd's chain-ID lookup after Prepare
#: answered AlreadyExists); the value names the adopter, `CONTAINERD`.
#: containerd records the layer as its own from then on, yet its gc can
#: never remove it: through the proxy, removing a key containerd did not
#: make is refused. So the label is the only trace of containerd's use, and
#: ckfs's gc keeps an adopted snapshot and its parents, which would
#: otherwise leave containerd's record naming nothing (NotFound at its next
#: ``ctr run``). ``ckfs snapshots rm`` still removes one explicitly, once the
#: user knows containerd is done with it.
ADOPTED_BY = "ckfs.io/adopted-by"

#: The `ADOPTED_BY` value for containerd, the one adopter so far.
CONTAINERD = "containerd"

#: Prefix of the blob label naming where a blob was fetched from
#: (``…source.<registry host>`` = the repository path); the lazy snapshotter
#: and ``ctr`` use it to fetch again from the same repository.
DISTRIBUTION_SOURCE = "containerd.io/distribution.source"


def gc_snapshot_label(snapshotter: str) -> str:
    """The label by which a record keeps a snapshot of *snapshotter*."""
    return f"{GC_REF_SNAPSHOT}.{snapshotter}"


def content_refs(labels: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """The (label, value) pairs of *labels* that refer to blobs.

    As containerd, the name may go on after a ``.`` or a ``/``; any other
    label that merely starts with the prefix is not a reference.
    """
    for key, value in labels.items():
        rest = key.removeprefix(GC_REF_CONTENT)
        if rest != key and rest[:1] in ("", ".", "/"):
            yield key, value


def snapshot_refs(labels: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """The (snapshotter, key) pairs *labels* refer to, as containerd reads them.

    The snapshotter's name ends at the first ``/``, so that one record can
    keep several snapshots of one snapshotter; a label with an empty name or
    an empty key refers to nothing.
    """
    prefix = GC_REF_SNAPSHOT + "."
    for key, value in labels.items():
        if key.startswith(prefix):
            name = key[len(prefix) :].split("/", 1)[0]
            if name and value:
                yield name, value
