"""From a name to an image or a root filesystem: the one path every face takes.

``ckfs pull``, ``ckfs mount``, ``ckfs rootfs`` and ckfsd's Pull and Mounts
RPCs all come here, so they decide the same way and cannot drift apart:

- `pull_image` answers a present image from local state (by digest or
  offline with no network, by tag with one ``HEAD``) and pulls otherwise.
- `ensure_rootfs` answers an unpacked image with a snapshot on its top
  chain ID (a few SQLite queries, no event loop), unpacks the missing
  layers of a present image, and pulls and unpacks at once an image that
  is not all here.

Each comes twice: the plain function for a process without an event loop
(the CLI), which tries the fast local answer before it starts one, and an
``_async`` twin for a caller already on trio (ckfsd), which does the same
work on its loop, blocking steps in worker threads. Progress is the
library's own (`ckfs.progress`): ``on_event`` receives each `BlobProgress`,
whose ``to_json`` is the event the CLI's ``--json`` prints and ckfsd streams.

Module imports stay light; trio, httpx and the stores load inside the
functions, only on the paths that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ckfs.options import DEFAULTS, PullOptions

if TYPE_CHECKING:
    from ckfs.descriptor import Descriptor
    from ckfs.mount import Mount
    from ckfs.progress import OnEvent
    from ckfs.pull import PullReport
    from ckfs.reference import Reference
    from ckfs.snapshots import Snapshotter
    from ckfs.state import State

__all__ = [
    "IMAGE_LABEL",
    "PullOptions",
    "ensure_rootfs",
    "ensure_rootfs_async",
    "pull_image",
    "pull_image_async",
    "with_hosts_dirs",
]

#: On a rootfs snapshot: the image name it was made from (``ckfs snapshots ls``).
IMAGE_LABEL = "ckfs.io/image"


def pull_image(
    state: State,
    ref: Reference,
    *,
    register: bool = True,
    options: PullOptions = DEFAULTS,
    on_event: OnEvent | None = None,
    transfer: contextlib.AbstractContextManager[Any] | None = None,
) -> PullReport:
    """Pull *ref* into *state* outside an event loop: locally when all is here.

    An image already complete here needs no event loop: by digest or
    offline nothing is asked, by tag one ``HEAD`` (given no ``user``: those
    credentials are for the full client). Otherwise the pull runs on trio.

    Args:
        register: name the image (``ckfs pull``); false for ``ckfs fetch``.
        options: as `ckfs.pull.pull`; empty ``hosts_dirs`` means the root's.
        on_event: told about every blob, on the local path too.
        transfer: entered around the full pull only (a display that
            redraws while bytes arrive has nothing to draw otherwise).

    The collector's lock is held shared throughout, so a concurrent ``ckfs
    gc`` cannot collect blobs committed before the name that keeps them.

    Raises:
        As `ckfs.pull.pull`.
    """
    with state.gc_lock():
        return _pull_image(state, ref, register, options, on_event, transfer)


def _pull_image(
    state: State,
    ref: Reference,
    register: bool,
    options: PullOptions,
    on_event: OnEvent | None,
    transfer: contextlib.AbstractContextManager[Any] | None,
) -> PullReport:
    """`pull_image`'s body, with the collector's lock held."""
    from ckfs.pull import pull_local

    options = with_hosts_dirs(state, options)
    if options.lazy:  # indexes are built even for an image whose blobs are all here
        import trio

        with transfer or contextlib.nullcontext():
            return trio.run(_pull, state, ref, register, options, on_event)
    hosts = None
    if not (options.user or options.offline or ref.digest):
        from ckfs.remotes.hosts import load_hosts

        hosts = load_hosts(ref.domain, hosts_dirs=options.hosts_dirs, plain_http=options.plain_http)
    report = pull_local(
        ref,
        state.content,
        state.images,
        options,
        register=register,
        hosts=hosts,
        on_event=on_event,
    )
    if report is not None:
        return report
    import trio

    run = functools.partial(_pull, state, ref, register, options, on_event)
    with transfer or contextlib.nullcontext():
        return trio.run(run)


async def pull_image_async(
    state: State,
    ref: Reference,
    *,
    register: bool = True,
    options: PullOptions = DEFAULTS,
    on_event: OnEvent | None = None,
) -> PullReport:
    """`pull_image` for a caller on trio: `ckfs.pull.pull` with the root's hosts directories.

    A present image pinned by digest, or any offline pull, is still answered
    locally; a tag is resolved through the registry client (no blocking
    ``HEAD`` on the loop), and present blobs are not fetched again.
    """
    async with _gc_lock_async(state):
        return await _pull(state, ref, register, options, on_event)


async def _pull(
    state: State,
    ref: Reference,
    register: bool,
    options: PullOptions,
    on_event: OnEvent | None,
) -> PullReport:
    """`ckfs.pull.pull` on *state* with the root's hosts directories (lock held by the caller).

    A lazy pull (``options.lazy``) goes through `ckfs.lazy.pull_lazy`.
    """
    from ckfs.pull import pull

    if options.lazy:
        from ckfs.lazy import pull_lazy

        report, _ = await pull_lazy(state, ref, options, register=register, on_event=on_event)
        return report

    options = with_hosts_dirs(state, options)
    return await pull(
        ref, state.content, state.images, options, register=register, on_event=on_event
    )


def ensure_rootfs(
    state: State,
    ref: Reference,
    key: str,
    *,
    snapshotter: str,
    readonly: bool = False,
    options: PullOptions = DEFAULTS,
    on_event: OnEvent | None = None,
    upto: int | None = None,
) -> list[Mount]:
    """A new snapshot *key* on the image *ref*, in a process without an event loop.

    The common case, an image already pulled and unpacked, is a few SQLite
    queries and never starts an event loop. Otherwise the missing layers are
    unpacked, or, when the image is not complete locally, pulled and
    unpacked at once, each layer applied as soon as it has arrived. A
    complete local image needs no network, whatever its name says. The
    collector's lock is held shared throughout (`ckfs.state.State.gc_lock`).

    Args:
        ref: the image (normalized, `ckfs.reference.parse`); the snapshot
            is labelled with its name (`IMAGE_LABEL`).
        key: the new snapshot's key.
        snapshotter: a registered snapshotter name (`snapshotters.NAMES`).
        readonly: a view instead of a writable (prepared) snapshot.
        options: for the pull, when one is needed; its platform picks the
            manifest of an index.
        on_event: the pull's blob progress, when there is a pull.
        upto: stack only the image's layers 1..*upto* (``ckfs mount
            --upto``; `ckfs.rootfs.snapshot_on`).

    Returns:
        The snapshot's Mount records, to mount in order on one target.

    Raises:
        AlreadyExists: *key* is taken.
        FailedPrecondition: the image has more layers than the snapshotter
            stacks.
        InvalidArgument: no such snapshotter; *upto* out of range.
        As `ckfs.pull.pull` and `ckfs.unpack.unpack`.
    """
    with state.gc_lock():
        sn = state.snapshotter(snapshotter)
        found, mounts = _snapshot_if_unpacked(state, sn, ref, key, readonly, options, upto)
        if mounts is not None:
            return mounts
        import trio

        run = functools.partial(
            _unpack_or_pull, state, sn, snapshotter, ref, found, options, on_event, upto
        )
        target = trio.run(run)
        return _snapshot(state, sn, ref, target, key, readonly, options, upto)


async def ensure_rootfs_async(
    state: State,
    ref: Reference,
    key: str,
    *,
    snapshotter: str,
    readonly: bool = False,
    options: PullOptions = DEFAULTS,
    on_event: OnEvent | None = None,
    upto: int | None = None,
) -> list[Mount]:
    """`ensure_rootfs` for a caller on trio (ckfsd's Mounts): the same steps on its loop.

    Database queries, the layer application and the wait for the
    collector's lock run in worker threads, so the loop keeps serving.
    """
    import trio

    async with _gc_lock_async(state):
        sn = await trio.to_thread.run_sync(state.snapshotter, snapshotter)
        found, mounts = await trio.to_thread.run_sync(
            _snapshot_if_unpacked, state, sn, ref, key, readonly, options, upto
        )
        if mounts is not None:
            return mounts
        target = await _unpack_or_pull(state, sn, snapshotter, ref, found, options, on_event, upto)
        return await trio.to_thread.run_sync(
            _snapshot, state, sn, ref, target, key, readonly, options, upto
        )


def with_hosts_dirs(state: State, options: PullOptions) -> PullOptions:
    """*options* with the root's default ``certs.d`` directories when it names none."""
    if options.hosts_dirs:
        return options
    from ckfs.remotes.hosts import default_hosts_dirs

    return dataclasses.replace(options, hosts_dirs=tuple(default_hosts_dirs(state.root)))


def _snapshot(
    state: State,
    sn: Snapshotter,
    ref: Reference,
    target: Descriptor,
    key: str,
    readonly: bool,
    options: PullOptions,
    upto: int | None,
) -> list[Mount]:
    """Snapshot *key* on the unpacked image *target* (`ckfs.rootfs.snapshot_on`)."""
    from ckfs.rootfs import snapshot_on

    return snapshot_on(
        state.content,
        sn,
        target,
        key,
        readonly=readonly,
        labels={IMAGE_LABEL: str(ref)},
        platform=options.platform,
        upto=upto,
        name=str(ref),
    )


def _snapshot_if_unpacked(
    state: State,
    sn: Snapshotter,
    ref: Reference,
    key: str,
    readonly: bool,
    options: PullOptions,
    upto: int | None,
) -> tuple[Descriptor | None, list[Mount] | None]:
    """The fast path: the image's target if complete here (for a snapshotter
    attaching lazily, if recorded: its layer blobs need not be), and the
    mounts if unpacked too."""
    from ckfs.errors import NotFound
    from ckfs.images import image as img
    from ckfs.rootfs import NotUnpacked

    name = str(ref)
    try:
        image = state.images.get(name)
        if not _attaches(sn):  # a lazy image lacks layer blobs by design
            img.tree(state.content, image.target, name=name)
    except NotFound:
        return None, None
    try:
        snapshot = _snapshot(state, sn, ref, image.target, key, readonly, options, upto)
        return image.target, snapshot
    except NotUnpacked:
        return image.target, None
    except NotFound:  # a lazy image's manifest or config went: pull again
        return None, None


def _attaches(sn: Snapshotter) -> bool:
    from ckfs.lazy import Attacher

    return isinstance(sn, Attacher)


async def _unpack_or_pull(
    state: State,
    sn: Snapshotter,
    snapshotter: str,
    ref: Reference,
    found: Descriptor | None,
    options: PullOptions,
    on_event: OnEvent | None,
    upto: int | None = None,
) -> Descriptor:
    """Unpack the present image *found*, or pull and unpack *ref*; the image's target.

    A snapshotter that attaches layers lazily gets the image pulled without
    its eStargz layers and attached (`ckfs.lazy`) instead: only layers
    1..*upto* when the snapshot stacks no more, so an eager layer above
    them is not unpacked. The others unpack the whole image.
    """
    from ckfs.unpack import pull_and_unpack, unpack

    if _attaches(sn):
        from ckfs.lazy import attach_image, pull_lazy

        if found is None:
            import trio

            from ckfs.snapshots import max_layers

            limit = await trio.to_thread.run_sync(max_layers, sn)
            report, _ = await pull_lazy(state, ref, options, on_event=on_event, max_layers=limit)
            found = report.target
        await attach_image(
            state, sn, ref, found, snapshotter_name=snapshotter, options=options, upto=upto
        )
        return found

    if found is not None:
        await unpack(
            state.content,
            sn,
            found,
            snapshotter_name=snapshotter,
            lock_dir=state.lock_dir,
            platform=options.platform,
        )
        return found
    report = await pull_and_unpack(
        ref,
        state.content,
        state.images,
        sn,
        with_hosts_dirs(state, options),
        snapshotter_name=snapshotter,
        lock_dir=state.lock_dir,
        on_event=on_event,
    )
    return report.target


@contextlib.asynccontextmanager
async def _gc_lock_async(state: State) -> AsyncIterator[None]:
    """`ckfs.state.State.gc_lock` (shared), waited for in a worker thread.

    The wait lasts as long as a running ``ckfs gc`` and cannot be cancelled
    (a thread blocked in flock cannot be interrupted); the release is a
    close, done on the loop.
    """
    import trio

    with contextlib.ExitStack() as stack:
        await trio.to_thread.run_sync(stack.enter_context, state.gc_lock())
        yield
