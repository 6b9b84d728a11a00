"""Unpacking: an image's layers into committed snapshots, only those missing.

It works like containerd's unpacker. The image config's diff IDs give
chain IDs; a committed snapshot named by a chain ID *is* that layer stack, so
"is this layer here?" is one `stat`, no network and no hashing. For each
missing layer, bottom up::

    prepare("extract-<unique> <chainID>", parent=<previous chainID>,
            labels={"containerd.io/snapshot.ref": <chainID>})
    apply the layer blob into it (diff ID verified while streaming)
    commit("<chainID>", "extract-…")

A remote (lazy) snapshotter that can provide a layer itself answers that
prepare with AlreadyExists and commits the chain ID on its own, as under
containerd; the layer then counts as present and its blob is never read.

Concurrent unpacks of the same layer (two ``ckfs mount`` of one image) take
a per-chain-ID file lock, so the work is done once and the second finds the
snapshot committed. An interrupted unpack leaves only an ``extract-``
snapshot, which the next unpack of that layer removes (it holds the lock, so
nobody else can be using it) and which ``ckfs gc`` removes too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ckfs import mediatypes as mt
from ckfs.archive.apply import ApplyOptions, apply_layer
from ckfs.archive.secure import remove_all
from ckfs.content import ContentStore
from ckfs.descriptor import Descriptor, Platform
from ckfs.digest import Digest
from ckfs.errors import AlreadyExists, FailedPrecondition, NotFound, unwrap_groups
from ckfs.images import ImageStore
from ckfs.labels import SNAPSHOT_REF, gc_snapshot_label
from ckfs.locks import try_lock
from ckfs.mount import Mount
from ckfs.options import PullOptions
from ckfs.pull import PullReport, pull
from ckfs.reference import Reference
from ckfs.remotes.fetch import BlobProgress, BlobState
from ckfs.remotes.walk import platform_children
from ckfs.rootfs import (
    EXTRACT_PREFIX,
    check_depth,
    check_depth_within,
    committed,
    image_chain,
)
from ckfs.snapshots import Kind, LayerDirs, Snapshotter, max_layers

if TYPE_CHECKING:
    import httpx

__all__ = [
    "Arrivals",
    "UnpackReport",
    "extract_snapshots",
    "label_config",
    "layer_lock",
    "lock_path",
    "present_below",
    "provided",
    "pull_and_unpack",
    "remove_leftover",
    "remove_leftovers",
    "unpack",
    "unpack_layer",
]

log = logging.getLogger(__name__)

#: How often a waiting unpack re-checks another process's layer lock.
LOCK_POLL = 0.05


@dataclass
class UnpackReport:
    """What an unpack did: the top chain ID and the layers it had to apply.

    ``present`` counts the layers it did not apply: committed already, or
    provided by the snapshotter itself (its prepare answered AlreadyExists).
    """

    chain_id: Digest
    applied: list[Digest] = field(default_factory=list)
    present: int = 0
    seconds: float = 0.0


def lock_path(lock_dir: Path, chain_id: Digest) -> Path:
    """The file whose flock guards the unpack of *chain_id* under *lock_dir*.

    Public so that whoever clears an interrupted unpack (ckfsd's recovery)
    tests the very lock an unpack in another process holds.
    """
    return lock_dir / chain_id.hex


@contextlib.asynccontextmanager
async def layer_lock(lock_dir: Path, chain_id: Digest) -> AsyncIterator[None]:
    """Hold the unpack lock of one chain ID, across processes.

    flock is polled rather than blocked on in a thread so that waiting stays
    cancellable.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(lock_dir, chain_id)
    while (fd := try_lock(path)) is None:
        await trio.sleep(LOCK_POLL)
    try:
        yield
    finally:
        os.close(fd)


def extract_snapshots(sn: Snapshotter) -> list[tuple[str, str]]:
    """``(key, chain ID)`` of every extract snapshot on *sn*, the ID as written.

    An unpack names its snapshot ``<EXTRACT_PREFIX><unique> <chain ID>``
    (`_apply`); one whose unpack is gone is a leftover. Public so that
    ckfsd's recovery finds them without knowing how keys are made.
    """
    infos = sn.walk([f'name~="^{EXTRACT_PREFIX}"'])
    return [(info.name, info.name.rsplit(" ", 1)[-1]) for info in infos]


def remove_leftover(sn: Snapshotter, key: str) -> bool:
    """Remove extract snapshot *key* unless it went meanwhile; whether it was removed."""
    log.info("removing leftover snapshot %r of an interrupted unpack", key)
    with contextlib.suppress(NotFound, FailedPrecondition):
        sn.remove(key)
        return True
    return False


def remove_leftovers(sn: Snapshotter, chain_id: Digest) -> None:
    """Remove extract snapshots of *chain_id* left by interrupted unpacks."""
    for key, chain in extract_snapshots(sn):
        if chain == str(chain_id):
            remove_leftover(sn, key)


def _apply_into(
    sn: Snapshotter,
    key: str,
    mounts: Sequence[Mount],
    blob: Path,
    layer: Descriptor,
    diff_id: Digest,
) -> None:
    """Apply *layer* into the active snapshot *key*; runs in a worker thread.

    Layers are written straight into the snapshot's directory, never through
    a mount: the overlay upper dir (whiteouts in overlay form, so lower
    layers are never copied up) or a native snapshot's full copy of its
    parent, a plain bind source (whiteouts as deletions).
    """
    if isinstance(sn, LayerDirs) and (below := sn.lower_dirs(key)):
        target, options = sn.upper_dir(key), ApplyOptions(whiteouts="overlay", lowers=below)
    elif len(mounts) == 1 and mounts[0].type == "bind":
        target, options = Path(mounts[0].source), ApplyOptions(whiteouts="delete")
    else:
        raise FailedPrecondition(f"snapshot {key!r}: cannot apply a layer into {mounts}")
    with open(blob, "rb") as f:
        apply_layer(target, f, media_type=layer.media_type, diff_id=diff_id, options=options)


async def unpack_layer(
    sn: Snapshotter,
    content: ContentStore,
    layer: Descriptor,
    diff_id: Digest,
    chain_id: Digest,
    parent: str,
) -> None:
    """Apply *layer* and commit it as *chain_id*.

    The extract snapshot carries `SNAPSHOT_REF`, so a remote snapshotter
    may answer its prepare with AlreadyExists (see `provided`); the layer
    blob is looked for only after the prepare, as such a snapshotter needs
    no blob.
    """
    key = f"{EXTRACT_PREFIX}{time.time_ns()}-{secrets.token_hex(4)} {chain_id}"
    labels = {SNAPSHOT_REF: str(chain_id)}
    mounts = await trio.to_thread.run_sync(sn.prepare, key, parent, labels)
    try:
        try:
            blob = await trio.to_thread.run_sync(content.path, layer.digest)
        except NotFound as e:
            raise NotFound(
                f"layer {layer.digest} is not in the content store; pull the image first"
            ) from e
        await trio.to_thread.run_sync(_apply_into, sn, key, mounts, blob, layer, diff_id)
        await trio.to_thread.run_sync(sn.commit, str(chain_id), key, None)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_discard, sn, key, mounts)
        raise


def provided(sn: Snapshotter, chain_id: Digest, refused: AlreadyExists) -> None:
    """Check that an AlreadyExists from preparing or committing *chain_id* means "present".

    As containerd's unpacker: a remote snapshotter answers the prepare so
    when it provides the layer itself, and an unpacker that does not take
    our lock (containerd) answers the commit so when it won the race. Either
    way the chain ID must now stat as committed; anything else is an error.

    Raises:
        AlreadyExists: *chain_id* is not a committed snapshot after all (the
            refusal was about something else, such as the extract key).
        CkfsError: the stat itself failed.
    """
    try:
        kind = sn.stat(str(chain_id)).kind
    except NotFound:
        kind = None
    if kind is not Kind.COMMITTED:
        what = "does not exist" if kind is None else f"is {kind.value}, not committed"
        raise AlreadyExists(
            f"unpacking layer {chain_id}: the snapshotter refused it as existing "
            f"({refused}), but snapshot {chain_id} {what}"
        ) from refused


def _discard(sn: Snapshotter, key: str, mounts: Sequence[Mount]) -> None:
    """Remove a failed extract snapshot, even when the disk is full.

    Removing a snapshot writes to the database, which a full disk refuses;
    the half-applied layer is what filled it, so empty the snapshot's own
    directory first and try again. What still fails is left to the next
    unpack of this layer or to gc, and logged.
    """
    try:
        sn.remove(key)
        return
    except NotFound:
        return
    except OSError as e:
        if e.errno != errno.ENOSPC:
            log.warning("cannot remove snapshot %r: %s", key, e)
            return
    own = sn.upper_dir(key) if isinstance(sn, LayerDirs) else Path(mounts[0].source)
    # A native snapshot starts as a copy of its parent, which a container
    # may have written: any depth, any name (remove_all copes, rmtree not).
    fd = os.open(own, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in os.listdir(fd):
            with contextlib.suppress(OSError):
                remove_all(fd, name)
    finally:
        os.close(fd)
    try:
        sn.remove(key)
    except (NotFound, OSError) as e:
        log.warning("cannot remove snapshot %r: %s", key, e)


def present_below(sn: Snapshotter, chain: Sequence[Digest]) -> int:
    """How many layers from the bottom are committed already.

    Walks down from the top: usually everything is there and one stat answers.
    """
    have = len(chain)
    while have > 0 and not committed(sn, str(chain[have - 1])):
        have -= 1
    return have


def label_config(
    content: ContentStore, config: Digest, label: str, chain: Sequence[Digest]
) -> None:
    """Point the image config's gc label at the top snapshot, unless it does already."""
    info = content.info(config)
    if info.labels.get(label) != str(chain[-1]):
        content.update(replace(info, labels={label: str(chain[-1])}), [f"labels.{label}"])


async def unpack(
    content: ContentStore,
    sn: Snapshotter,
    target: Descriptor,
    *,
    snapshotter_name: str,
    lock_dir: Path,
    platform: Platform | None = None,
    arrival: Callable[[Descriptor], Awaitable[None]] | None = None,
) -> UnpackReport:
    """Make sure the layers of *target* exist as committed snapshots in *sn*.

    Args:
        content: where the image's manifest, config and layers are (all must
            be present: pull first).
        sn: the snapshotter to unpack into.
        target: the image's target descriptor (index or manifest).
        snapshotter_name: *sn*'s registered name, for the gc label.
        lock_dir: directory for the per-chain-ID unpack locks.
        platform: which manifest of an index (default: this host).
        arrival: awaited before each missing layer is applied; returns once
            that layer's blob is in the content store (or will not come).
            Lets unpacking run while a pull is still downloading later layers.

    Returns:
        The top chain ID (the parent for a rootfs snapshot) and what was done.

    Raises:
        NotFound: a manifest, config or layer blob is missing.
        FailedPrecondition: the manifest and config disagree on the number
            of layers, or there are more than *sn* can stack (checked before
            any layer is applied).
        DataLoss: a layer does not decompress to its diff ID; the snapshot
            being built is removed.
        InvalidArgument: a malformed or hostile layer.

    Cancellation: the snapshot being extracted is removed; committed layers stay.
    """
    started = time.monotonic()
    manifest, config, chain = await trio.to_thread.run_sync(image_chain, content, target, platform)
    await trio.to_thread.run_sync(check_depth, sn, target, len(chain))
    layers, diff_ids = manifest.layers, config.diff_ids
    report = UnpackReport(chain_id=chain[-1])

    report.present = await trio.to_thread.run_sync(present_below, sn, chain)
    for i in range(report.present, len(chain)):
        parent = str(chain[i - 1]) if i else ""
        if arrival is not None:
            await arrival(layers[i])
        async with layer_lock(lock_dir, chain[i]):
            if await trio.to_thread.run_sync(committed, sn, str(chain[i])):
                report.present += 1  # another unpack applied it while we waited
                continue
            await trio.to_thread.run_sync(remove_leftovers, sn, chain[i])
            try:
                await unpack_layer(sn, content, layers[i], diff_ids[i], chain[i], parent)
            except AlreadyExists as e:
                await trio.to_thread.run_sync(provided, sn, chain[i], e)
                report.present += 1
            else:
                report.applied.append(chain[i])

    await trio.to_thread.run_sync(
        label_config, content, manifest.config.digest, gc_snapshot_label(snapshotter_name), chain
    )
    report.seconds = time.monotonic() - started
    return report


#: States after which a blob will not change any more in this fetch.
_SETTLED = frozenset({BlobState.EXISTS, BlobState.VERIFIED, BlobState.SKIPPED, BlobState.FAILED})


class Arrivals:
    """Which blobs a running fetch has made present, as trio events.

    Fed by the fetch's ``on_event`` (`event`), which passes each event on to
    *on_event*. The fetch visits its target before any child, so the first
    blob it reports is the image's target.
    """

    def __init__(
        self, content: ContentStore, on_event: Callable[[BlobProgress], None] | None = None
    ) -> None:
        self.content = content
        self.on_event = on_event
        self.target: Descriptor | None = None
        self.config_present = trio.Event()
        self._done: dict[Digest, trio.Event] = {}

    def event(self, p: BlobProgress) -> None:
        if self.target is None:
            self.target = p.desc
        if p.state in _SETTLED:
            if p.kind == "config":
                self.config_present.set()
            self._done.setdefault(p.desc.digest, trio.Event()).set()
        if self.on_event is not None:
            self.on_event(p)

    async def wait(self, desc: Descriptor) -> None:
        """Until *desc* is present. The store is asked in a worker thread (the
        loop may serve a daemon's every RPC); an arrival reported meanwhile
        has set the event already."""
        if not await trio.to_thread.run_sync(self.content.exists, desc.digest):
            await self._done.setdefault(desc.digest, trio.Event()).wait()


async def pull_and_unpack(
    ref: Reference,
    content: ContentStore,
    images: ImageStore,
    sn: Snapshotter,
    options: PullOptions,
    *,
    snapshotter_name: str,
    lock_dir: Path,
    on_event: Callable[[BlobProgress], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> PullReport:
    """Pull *ref* and unpack it at the same time, like containerd's pull with unpack.

    Each layer is applied as soon as it has arrived and the one below it is
    applied, so decompression and extraction overlap the download of later
    layers instead of waiting for the whole image. An image with more layers
    than *sn* stacks is refused as soon as its manifest is read, before any
    layer is requested.

    Args:
        ref, content, images, options, on_event, transport: as
            `ckfs.pull.pull` (the options' platform is the one unpacked).
        sn, snapshotter_name, lock_dir: as `unpack`.

    Raises:
        As `ckfs.pull.pull` and `unpack`; the first failure cancels the other.
    """
    arrivals = Arrivals(content, on_event)
    platform = options.platform
    follow = platform_children(platform, all_platforms=options.all_platforms)
    limit = await trio.to_thread.run_sync(max_layers, sn)  # children() runs on the loop

    def children(desc: Descriptor, data: bytes) -> Sequence[Descriptor]:
        found = follow(desc, data)
        if mt.is_manifest(desc.media_type):
            # A manifest's children are its config, then its layers; none of
            # them is fetched before this returns.
            check_depth_within(limit, snapshotter_name, desc, len(found) - 1)
        return found

    report: list[PullReport] = []

    async def do_pull() -> None:
        report.append(
            await pull(
                ref,
                content,
                images,
                options,
                children=children,
                on_event=arrivals.event,
                transport=transport,
            )
        )

    async def do_unpack() -> None:
        # The manifest and config come first and are small; layers stream.
        await arrivals.config_present.wait()
        assert arrivals.target is not None
        await unpack(
            content,
            sn,
            arrivals.target,
            snapshotter_name=snapshotter_name,
            lock_dir=lock_dir,
            platform=platform,
            arrival=arrivals.wait,
        )

    with unwrap_groups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(do_pull)
            nursery.start_soon(do_unpack)
    return report[0]
