"""The snapshotter interface: what every snapshotter promises, and its vocabulary.

The model is containerd's (``core/snapshots/snapshotter.go``), kept on
purpose so containerd can drive ckfs as a proxy snapshotter and so its test
suite's intent carries over unchanged. `Snapshotter` below tells the
lifecycle; `Info`, `Usage` and `Kind` are the values it answers with. Only
`ckfs.mount.Mount` crosses process boundaries; these stay in Python.

The contract lives in the core, as containerd's ``core/snapshots`` does:
unpack, rootfs, gc and the state root code against it, and the
implementations under ``snapshotters/`` (found by name through that
package's registry) depend on the core, never the other way round.

Beyond the contract, a snapshotter may offer what only some can: `Cleaner`,
`LayerLimit` and `LayerDirs`. Each is a small runtime-checkable protocol,
optional because a snapshotter containerd drives through the proxy, or a
lazy one whose layers live elsewhere, cannot offer it; callers test with
``isinstance`` and fall back to what the contract alone allows.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ckfs.filters import Adaptor, adaptor_for
from ckfs.metadata.fields import EPOCH
from ckfs.mount import Mount

if TYPE_CHECKING:
    from ckfs.content import ContentStore
    from ckfs.metadata.db import DB
    from ckfs.options import PullOptions

__all__ = [
    "Cleaner",
    "CleanupError",
    "Info",
    "InitContext",
    "Kind",
    "LayerDirs",
    "LayerLimit",
    "Snapshotter",
    "Usage",
    "containerd_owned",
    "filter_adaptor",
    "max_layers",
]


class Kind(enum.Enum):
    """What a snapshot is; the value is the spelling filters and the database use."""

    #: Read-only, created by `Snapshotter.view`; can never be committed.
    VIEW = "view"
    #: Writable, created by `Snapshotter.prepare`; becomes committed only
    #: through `Snapshotter.commit`, which ends it.
    ACTIVE = "active"
    #: Immutable, created by `Snapshotter.commit`; the only kind that can be
    #: a parent.
    COMMITTED = "committed"


@dataclasses.dataclass(frozen=True, slots=True)
class Info:
    """What `Snapshotter.stat` and `Snapshotter.walk` say about one snapshot.

    Only ``labels`` is mutable (through `Snapshotter.update`); the store
    sets the rest, whatever a caller passes.
    """

    kind: Kind
    #: The key of an active or view snapshot, the name of a committed one.
    name: str
    #: Name of the committed parent; ``""`` for none.
    parent: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: UTC. For a committed snapshot, the time of the commit (as containerd).
    created_at: datetime = EPOCH
    #: UTC; the last label change, else ``created_at``.
    updated_at: datetime = EPOCH


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """Disk used by one snapshot itself, not by its parents.

    Attributes:
        size: bytes of allocated blocks (``st_blocks * 512``), each inode
            counted once however many hard links it has.
        inodes: distinct inodes, the snapshot's root directory included.
    """

    size: int = 0
    inodes: int = 0


@runtime_checkable
class Snapshotter(Protocol):
    """Allocates, snapshots and mounts filesystem change sets.

    A snapshot is a filesystem state. Every snapshot has a parent, ``""``
    standing for the empty directory; the difference between a snapshot and
    its parent is a classic image layer.

    Terms used throughout (as containerd):

    ``key``
        names an active or view snapshot: a transaction in progress.
    ``name``
        names a committed snapshot: a finished layer, usually its chain ID.
    ``parent``
        the committed snapshot another descends from.

    Invariants:

    - Keys and names share **one key space**: an active snapshot cannot
      have the key of a committed one, nor two snapshots one key, whatever
      their kinds.
    - Active and view snapshots are created only by `prepare` and `view`;
      committed ones only by `commit`. An active snapshot never turns into
      a committed one except through `commit`, which removes the key and
      creates the name; a committed one never becomes active again.
    - Only committed snapshots can be parents, and a snapshot with
      children cannot be removed.
    - Methods are synchronous and may touch the disk (copies, ``du``);
      trio callers run them with ``trio.to_thread.run_sync``.

    **Importing a layer.** Prepare an active snapshot on the empty parent,
    apply the layer into it, commit it under the layer's name (containerd
    mounts the snapshot to apply; `ckfs.unpack` writes into its directory)::

        mounts = sn.prepare("extract-1 sha256:aaa", "", labels={"containerd.io/gc.root": now})
        mount_all(mounts, tmpdir)
        apply_layer(tmpdir, blob, media_type=layer.media_type, diff_id=expected,
                    options=ApplyOptions())             # refuses a layer of another DiffID
        unmount_all(tmpdir)
        sn.commit("sha256:aaa", "extract-1 sha256:aaa")

    The key is gone after the commit; the layer is now ``sha256:aaa``, and
    ``sn.stat("sha256:aaa")`` answers "is this layer here?" without network.

    **Importing the next layer.** Identical, with the previous layer's name
    as the parent; the new snapshot starts with the parent's content and
    records only the changes made to it::

        mounts = sn.prepare("extract-2 sha256:bbb", "sha256:aaa")

    **Running a container.** Prepare on the image's top chain ID and hand
    the mounts to the runtime; when the container is done, `remove` the key
    to drop its changes (or `commit` it to keep them as a new image layer)::

        mounts = sn.prepare("container-1", top_chain_id)

    For a read-only root (inspecting an image, ``ckfs mount``), `view`
    gives mounts that refuse writes (``EROFS``) and cannot be committed.
    """

    def stat(self, key: str) -> Info:
        """Information about an active, view or committed snapshot.

        Used to resolve parents, to test existence and to tell kinds apart.

        Raises:
            NotFound: no snapshot has that key or name.
        """
        ...

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change the mutable fields (only the labels) of ``info.name``.

        Without *fieldpaths* the labels are replaced by ``info.labels``.
        Otherwise ``labels`` replaces them all and ``labels.<key>`` sets one
        label from ``info.labels`` (deleting it when absent there or ``""``).
        ``updated_at`` becomes now; every other field of *info* is ignored.

        Raises:
            NotFound: no snapshot has that name.
            InvalidArgument: a field path other than ``labels`` or
                ``labels.<key>`` (``parent``, ``kind``, ``name``, ...), or a
                label too large.
        """
        ...

    def usage(self, key: str) -> Usage:
        """Disk used by the snapshot itself, excluding its parents.

        Committed snapshots answer from what was measured at commit; active
        and view snapshots are measured now, in time proportional to their
        size.

        Raises:
            NotFound: no such snapshot.
        """
        ...

    def mounts(self, key: str) -> list[Mount]:
        """The mounts `prepare` or `view` returned for *key*, again.

        For recovering mounts after a restart; only active and view
        snapshots have mounts.

        Raises:
            NotFound: no such snapshot.
            FailedPrecondition: *key* names a committed snapshot.
        """
        ...

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create an active (writable) snapshot *key* descending from *parent*.

        Mounted, the returned mounts show the parent's content (or an empty
        directory of mode 0755 for ``""``); changes made through them are the
        snapshot's. `commit` keeps them under a name; `remove` drops them.

        Args:
            key: unused key for the new snapshot.
            parent: name of a committed snapshot, or ``""``.
            labels: initial labels.

        Raises:
            AlreadyExists: *key* is taken by a snapshot of any kind.
            NotFound: *parent* does not exist.
            InvalidArgument: *parent* is not committed, *key* is empty, or
                a label is too large.
            Unavailable: *parent* was removed and re-created while the new
                snapshot was being set up; try again.
        """
        ...

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create a read-only view *key* of *parent*.

        Like `prepare`, but the mounts are read-only (writes fail with
        ``EROFS``), the snapshot can never be committed, and implementations
        may skip work `prepare` needs (no copy, no upper directory). `remove`
        releases it.

        Raises:
            AlreadyExists: *key* is taken by a snapshot of any kind.
            NotFound: *parent* does not exist.
            InvalidArgument: *parent* is not committed, *key* is empty, or
                a label is too large.
            Unavailable: as for `prepare`.
        """
        ...

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Capture active snapshot *key* as committed snapshot *name*.

        The committed snapshot has *key*'s parent and its content; *key*
        stops existing. Labels are replaced by *labels*, not inherited. The
        snapshot must be unmounted first: its usage is measured now.

        Raises:
            AlreadyExists: *name* is taken (keys and names share one space).
            NotFound: *key* does not exist.
            FailedPrecondition: *key* is a view or already committed.
            InvalidArgument: *name* is empty or a label too large.
        """
        ...

    def remove(self, key: str) -> None:
        """Remove the active, view or committed snapshot *key* and its files.

        The key is free again as soon as this returns. The files go after
        the metadata, irreversibly; a failure there is logged, not raised
        (`Cleaner.cleanup` retries it).

        Raises:
            NotFound: no such snapshot.
            FailedPrecondition: *key* is the parent of another snapshot;
                remove the children first.
        """
        ...

    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        """The snapshots matching *filters*, sorted by name.

        Filters use containerd's syntax (`ckfs.filters`) over ``name``,
        ``parent``, ``kind`` (``active``, ``view``, ``committed``) and
        ``labels.<key>``, with ``==``, ``!=``, ``~=`` or bare presence; commas
        AND selectors, several filters are OR'd, none matches all. The
        answer is read before it is returned, so the caller may `stat` (or
        change the snapshotter) while iterating.

        Raises:
            InvalidArgument: a filter is malformed.
        """
        ...

    def close(self) -> None:
        """Release the snapshotter; later calls raise `FailedPrecondition`.

        Closing twice is fine. The metadata database belongs to the caller
        and stays open.
        """
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class InitContext:
    """What a snapshotter factory is given: containerd's ``plugin.InitContext``, for snapshotters.

    The directory snapshotters need only `root` and `db`; a lazy one reads
    layers from registries on demand and so needs the content store (for
    manifests and locally pulled blobs), the registry options and a cache.
    One value carries all of it so a new need is one field here and one
    line where it is built (`ckfs.state.State.snapshotter`, the only place),
    not a new constructor argument threaded through every caller.

    There is no trio token or nursery: snapshotter methods are synchronous
    (trio callers run them in a thread) and the FUSE loop runs in its own
    process so that it outlives ckfsd; nothing here needs an event loop.

    Attributes:
        root: the ckfs state root; a snapshotter keeps its files under
            ``<root>/snapshots/<name>/`` (and the lazy one its serving
            process's under ``<root>/fuse/``).
        db: the root's metadata database (the caller closes it).
        content: opens the root's content store on first call (most
            snapshotter uses never touch it, and it is not free to load).
        registry: how to reach registries: hosts directories (the root's
            defaults filled in), plain HTTP, explicit credentials.
        cache_dir: where fetched layer chunks are cached (``<root>/cache``).
        options: snapshotter-specific settings by name; empty by default.
    """

    root: Path
    db: DB
    content: Callable[[], ContentStore]
    registry: PullOptions
    cache_dir: Path
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)


#: Told about a directory `Cleaner.cleanup` could not remove, and why.
CleanupError = Callable[[Path, Exception], None]


@runtime_checkable
class Cleaner(Protocol):
    """A snapshotter that can reclaim disk left by failed or interrupted work.

    Optional: containerd's contract has ``Cleanup`` as a separate, optional
    interface too; a snapshotter that keeps no files of its own (one that
    forwards to another process) has nothing to reclaim.
    """

    def cleanup(self, on_error: CleanupError | None = None) -> list[str]:
        """Remove directories no snapshot owns; return the paths removed.

        Leftovers come from a crash between creating a directory and
        committing its metadata, or from a removal that failed (a busy
        mount, a tree a container made unremovable). Directories still being
        set up by a running `prepare` are left alone. A directory that will
        not go is handed to *on_error* (default: logged) and the rest still
        go, so gc can report it and carry on.
        """
        ...


@runtime_checkable
class LayerLimit(Protocol):
    """A snapshotter that can stack only so many layers under one snapshot.

    Overlay's layers are the kernel's to stack, and the kernel has limits;
    an image deeper than them can be unpacked but never mounted. Callers
    that know an image's layer count (`ckfs.rootfs.check_depth`) ask before
    fetching or unpacking anything, so such an image fails in a moment, not
    after every layer was applied.

    Optional: a snapshotter that copies each parent whole (native) stacks
    any number, and may lack the protocol or declare None.
    """

    #: The snapshotter's registry name, for the message that suggests another.
    name: str

    @property
    def max_layers(self) -> int | None:
        """Most layers one snapshot can have beneath it; None for no limit."""
        ...


def max_layers(sn: object) -> int | None:
    """*sn*'s `LayerLimit.max_layers`, or None when it declares no limit.

    The ``isinstance`` check evaluates the property once more (overlay's
    reads one row of the database): a few microseconds, once per image.
    """
    return sn.max_layers if isinstance(sn, LayerLimit) else None


@runtime_checkable
class LayerDirs(Protocol):
    """A snapshotter whose layers are directories on this host, one per snapshot.

    Unpack writes a layer straight into `upper_dir`, in overlay's whiteout
    form, consulting `lower_dirs` for what the layer deletes or makes
    opaque: no mount, and no copy-up of lower files.

    Optional: containerd's contract answers with mounts only. A snapshotter
    whose snapshot is one self-contained directory (native's bind mount) is
    written through its mount source; a lazy or remote one has no such
    directory at all.
    """

    def upper_dir(self, key: str) -> Path:
        """The directory holding *key*'s own changes.

        Raises:
            NotFound: no such snapshot.
        """
        ...

    def lower_dirs(self, key: str) -> list[Path]:
        """The own directories of *key*'s ancestors, most recent first.

        Raises:
            NotFound: no such snapshot.
        """
        ...


#: The key containerd's metadata layer gives every snapshot it makes in a
#: backend, ``<namespace>/<sequence>/<key>``, the namespace a containerd
#: identifier. ckfs never makes one, so such a snapshot is containerd's:
#: containerd's gc removes it and ckfs's does not, and through ckfsd
#: containerd may remove only those.
_CONTAINERD_KEY = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*/[0-9]+/")


def containerd_owned(key: str) -> bool:
    """Whether containerd's metadata layer made snapshot *key* (``<ns>/<seq>/<key>``)."""
    return _CONTAINERD_KEY.match(key) is not None


def filter_adaptor(info: Info) -> Adaptor:
    """containerd's snapshot filter adaptor: name, kind, labels, and parent even when ``""``.

    As containerd's snapshot storage: ``parent==""`` selects the snapshots on
    no parent, which is how containerd asks a proxy for a base layer to adopt.
    One adaptor for the stores and the Snapshots service, so a filter selects
    the same snapshots wherever it is applied.
    """
    fields = {"name": info.name, "kind": info.kind.value, "parent": info.parent}
    return adaptor_for(fields, info.labels)
