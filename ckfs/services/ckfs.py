"""``ckfs.v1.Ckfs``: what ckfsd offers beyond containerd's API.

Four RPCs, each the daemon face of one library call, so the CLI through
ckfsd and the CLI without it decide the same way (`ckfs.provide`):

- ``Pull`` runs `ckfs.provide.pull_image_async` and streams every blob's
  state change, then a summary: the events ``ckfs pull --json`` prints,
  which the client draws as its progress display.
- ``Mounts`` runs `ckfs.provide.ensure_rootfs_async`: a snapshot on the
  image's top chain ID (pulled and unpacked as needed) and its Mount
  records. The client performs the mount, as the caller and in the
  caller's mount namespace; the daemon never mounts on a client's behalf.
- ``Unmount`` removes the snapshot once the client has unmounted it.
- ``GC`` runs `ckfs.gc.collect` under the collector's exclusive lock.

Store calls and lock waits run in worker threads; the pull runs on the
daemon's loop, sharing it with every other RPC.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import trio
from google.protobuf import empty_pb2

from ckfs.api.convert import descriptor_to_proto, mounts_to_proto
from ckfs.api.v1 import ckfs_pb2 as pb
from ckfs.errors import InvalidArgument, NotFound, unwrap_groups
from ckfs.options import DAEMON_HOSTS_DIRS, MAX_CONCURRENT, PullOptions
from ckfs.reference import Reference
from ckfs.services.checks import check_key

if TYPE_CHECKING:
    from ckfs.gc import GCReport
    from ckfs.progress import BlobProgress
    from ckfs.pull import PullReport
    from ckfs.services.bridge import Call
    from ckfs.state import State

__all__ = ["CkfsService", "pull_options_from_proto"]

#: BlobState names (`ckfs.progress.BlobState` values) to the wire enum.
_STATES = {
    name.lower(): value
    for name, value in pb.BlobState.items()
    if value != pb.BLOB_STATE_UNSPECIFIED
}


def pull_options_from_proto(options: pb.PullOptions) -> PullOptions:
    """A request's pull options; zero values (absent ones for the optional
    fields) mean ckfs's defaults.

    The registry configuration is the daemon's own (its root's defaults,
    `ckfs.provide`): hosts directories named by a client are refused, not
    read (`DAEMON_HOSTS_DIRS`). Credentials (``user``) are the caller's to
    give; nothing else in the options names a file.

    Raises:
        InvalidArgument: hosts directories; a malformed platform, a
            negative size, a timeout that is not positive, more than
            `MAX_CONCURRENT` transfers at once.
    """
    from ckfs.images import platforms
    from ckfs.remotes.walk import check_limits

    if options.hosts_dirs:
        raise InvalidArgument(DAEMON_HOSTS_DIRS)
    if options.max_concurrent > MAX_CONCURRENT:
        what = f"max concurrent transfers must be at most {MAX_CONCURRENT}"
        raise InvalidArgument(f"{what}, not {options.max_concurrent}")
    defaults = PullOptions()
    timeout = options.timeout if options.HasField("timeout") else None
    size = options.max_blob_size if options.HasField("max_blob_size") else defaults.max_blob_size
    check_limits(timeout, size)  # the local path's words exactly
    return PullOptions(
        platform=platforms.parse(options.platform) if options.platform else None,
        all_platforms=options.all_platforms,
        offline=options.offline,
        plain_http=options.plain_http,
        user=options.user or None,
        max_concurrent=options.max_concurrent or defaults.max_concurrent,
        timeout=timeout,
        max_blob_size=size,
        lazy=options.lazy,
    )


def _reference(ref: str) -> Reference:
    """Raises: InvalidArgument: *ref* is not an image reference."""
    from ckfs import reference

    return reference.parse(ref)


#: Seconds between progress ticks of a transferring blob. The CLI's live
#: display redraws 8 times a second; a tick every other redraw keeps its
#: byte counts and rates moving, slower ones make them visibly jump, and one
#: per redraw would double the events for a change nobody can read.
TICK = 0.25


def _blob_event(p: BlobProgress, *, progress_only: bool = False) -> pb.PullEvent:
    """*p* as it stands now (the fetcher keeps changing the object)."""
    return pb.PullEvent(
        blob=pb.BlobEvent(
            state=_STATES[str(p.state)],
            kind=p.kind,
            descriptor=descriptor_to_proto(p.desc),
            offset=p.offset,
            fetched=p.fetched,
            note=p.note,
            progress_only=progress_only,
        )
    )


#: Events a Pull's stream may hold unsent before ticks are skipped. State
#: changes are always queued (a client needs each one, and a pull has a
#: bounded number), ticks only while the client keeps up: one that stops
#: reading costs a bounded queue, not one growing four times a second for
#: every transferring blob for as long as the pull runs.
MAX_QUEUED_TICKS = 64


async def _ticks(
    moving: dict[int, BlobProgress],
    hand_over: Callable[[pb.PullEvent], None],
    queued: Callable[[], int],
) -> None:
    """Every `TICK`, a progress-only event for each transferring blob that moved,
    unless *queued* events number `MAX_QUEUED_TICKS` or more."""
    sent: dict[int, int] = {}
    while True:
        await trio.sleep(TICK)
        for key, p in moving.items():
            if sent.get(key) != p.offset and queued() < MAX_QUEUED_TICKS:
                sent[key] = p.offset
                hand_over(_blob_event(p, progress_only=True))


def _summary_event(report: PullReport) -> pb.PullEvent:
    s = report.to_json()
    return pb.PullEvent(
        summary=pb.PullSummary(
            reference=s["reference"],
            name=s["name"],
            target=descriptor_to_proto(report.target),
            blobs=s["blobs"],
            fetched_blobs=s["fetched_blobs"],
            fetched_bytes=s["fetched_bytes"],
            skipped_blobs=s["skipped_blobs"],
            nondistributable=s["nondistributable"],
            network=s["network"],
            seconds=s["seconds"],
        )
    )


def _gc_response(report: GCReport) -> pb.GCResponse:
    return pb.GCResponse(
        blobs=[str(d) for d in report.blobs],
        bytes=report.bytes,
        snapshots={n: pb.SnapshotKeys(keys=keys) for n, keys in report.snapshots.items()},
        directories=report.directories,
        errors=report.errors,
        ingests=report.ingests,
        ingest_bytes=report.ingest_bytes,
        layers=[str(d) for d in report.layers],
    )


class CkfsService:
    """``ckfs.v1.Ckfs`` on one ckfs state root.

    Args:
        state: the state root the daemon serves.
        nursery: where each Pull's work runs while its RPC streams the
            events; it must outlive the RPCs (the daemon's serving nursery).
    """

    def __init__(self, state: State, *, nursery: trio.Nursery) -> None:
        self._state = state
        self._nursery = nursery

    async def Pull(self, request: pb.PullRequest, call: Call) -> AsyncIterator[pb.PullEvent]:
        """Stream *request*'s pull: one event per blob state change, then the summary.

        Cancellation: a client that goes away cancels its pull, which keeps
        the bytes it received for the next one to resume.

        Raises:
            InvalidArgument: a malformed reference or option.
            As `ckfs.pull.pull`, after the events so far.
        """
        ref = _reference(request.ref)
        options = pull_options_from_proto(request.options)
        send, receive = trio.open_memory_channel[pb.PullEvent | Exception](math.inf)
        scope = trio.CancelScope()
        self._nursery.start_soon(self._pull, ref, request.register, options, send, scope)
        try:
            async with receive:
                async for item in receive:
                    if isinstance(item, Exception):
                        raise item
                    yield item
        finally:
            scope.cancel()

    async def _pull(
        self,
        ref: Reference,
        register: bool,
        options: PullOptions,
        send: trio.MemorySendChannel[pb.PullEvent | Exception],
        scope: trio.CancelScope,
    ) -> None:
        """The pull behind one Pull RPC, handing events and the outcome to its stream.

        Runs in the daemon's nursery and never raises but `trio.Cancelled`:
        the failure belongs to the RPC, which re-raises it for its client.
        `ckfs.pull.pull` reports events on the loop's thread (its store
        calls run in worker threads, its events do not), so they reach the
        channel in order, ahead of the outcome.
        Between state changes, transferring blobs tick (`TICK`).
        """
        from ckfs.progress import BlobState
        from ckfs.provide import pull_image_async

        moving: dict[int, BlobProgress] = {}

        def hand_over(item: pb.PullEvent | Exception) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                send.send_nowait(item)

        def queued() -> int:
            return send.statistics().current_buffer_used

        def on_event(p: BlobProgress) -> None:
            if p.state in (BlobState.DOWNLOADING, BlobState.RESUMING):
                moving[id(p)] = p
            else:
                moving.pop(id(p), None)
            hand_over(_blob_event(p))

        with send, scope:
            try:
                with unwrap_groups():
                    async with trio.open_nursery() as ticking:
                        ticking.start_soon(_ticks, moving, hand_over, queued)
                        try:
                            report = await pull_image_async(
                                self._state,
                                ref,
                                register=register,
                                options=options,
                                on_event=on_event,
                            )
                        finally:
                            ticking.cancel_scope.cancel()
            except Exception as e:
                hand_over(e)
            else:
                hand_over(_summary_event(report))

    async def Mounts(self, request: pb.MountsRequest, call: Call) -> pb.MountsResponse:
        """A new snapshot *key* on the image *ref* and its Mount records.

        Raises:
            InvalidArgument: a malformed reference, key or option; no such
                snapshotter.
            AlreadyExists: the key is taken.
            As `ckfs.provide.ensure_rootfs`.
        """
        from ckfs.provide import ensure_rootfs_async

        ref = _reference(request.ref)
        check_key(request.key)
        mounts = await ensure_rootfs_async(
            self._state,
            ref,
            request.key,
            snapshotter=request.snapshotter,
            readonly=request.readonly,
            options=pull_options_from_proto(request.options),
        )
        return pb.MountsResponse(name=str(ref), mounts=mounts_to_proto(mounts))

    async def Unmount(self, request: pb.UnmountRequest, call: Call) -> empty_pb2.Empty:
        """Remove the snapshot *key*: from *snapshotter*, or from each that has it if empty.

        Raises:
            NotFound: no such snapshot (in any snapshotter, when none is named).
            InvalidArgument: a malformed key; no such snapshotter.
            FailedPrecondition: the snapshot has children.
        """
        check_key(request.key)
        await trio.to_thread.run_sync(self._unmount, request.key, request.snapshotter)
        return empty_pb2.Empty()

    def _unmount(self, key: str, snapshotter: str) -> None:
        import snapshotters

        if snapshotter:
            self._state.snapshotter(snapshotter).remove(key)
            return
        removed = False
        for name in snapshotters.NAMES:
            with contextlib.suppress(NotFound):
                self._state.snapshotter(name).remove(key)
                removed = True
        if not removed:
            raise NotFound(f"snapshot {key}: not found")

    async def GC(self, request: pb.GCRequest, call: Call) -> pb.GCResponse:
        """Collect what nothing needs (`ckfs.gc.collect`); waits for running writers.

        Never fails for one bad record: those are the response's ``errors``.
        """
        expiry = request.ingest_expiry if request.HasField("ingest_expiry") else None
        if expiry is not None and not 0 <= expiry < math.inf:
            raise InvalidArgument(f"ingest_expiry must be a number of seconds, not {expiry}")
        report = await trio.to_thread.run_sync(self._collect, request.dry_run, expiry)
        return _gc_response(report)

    def _collect(self, dry_run: bool, ingest_expiry: float | None) -> GCReport:
        import snapshotters
        from ckfs.gc import collect

        state = self._state
        with state.gc_lock(exclusive=True):
            return collect(
                state.content,
                state.images,
                {n: state.snapshotter(n) for n in snapshotters.NAMES},
                dry_run=dry_run,
                layer_root=state.root,
                **({} if ingest_expiry is None else {"ingest_expiry": ingest_expiry}),
            )
