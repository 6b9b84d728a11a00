"""Fetching an image's content graph from a registry into the content store.

This is containerd's ``images.Dispatch`` with ``remotes.FetchHandler``: start
at a target descriptor, make sure its blob is in the content store, and if it
is an index or a manifest read it and do the same for its children, several
at once. What is already present is never requested again, so a second run
finds everything and only reads local manifests.

Every blob goes through the content store's ingests, named the way
containerd names them (``index-``, ``manifest-``, ``config-``, ``layer-``,
``unknown-`` + digest), which gives the properties a pull needs with
little bookkeeping of its own:

- **Verified**: bytes stream into the ingest while a worker thread hashes
  them; `Writer.commit` checks size and digest, so a wrong byte from a
  registry or a mirror never becomes a blob (the ingest is aborted and the
  error names the blob and the registry).
- **Resumable**: an ingest left by an interrupted pull keeps its bytes; the
  next writer on the same ref starts at its offset and asks the registry for
  the rest with a Range request. A connection that drops mid-blob resumes in
  process the same way, a bounded number of times.
- **Shared between processes**: the ingest's ref lock admits one writer.
  Another ``ckfs pull`` of the same image waits on the lock, then finds the
  blob committed, so each blob crosses the network once.
- **Bounded**: in time, every blob and manifest has one budget
  (`ckfs.remotes.time_budget`, or ``timeout``) that the registry client's
  retries and waits and this module's resumes all draw from; when it runs
  out the blob fails with `Unavailable`, its bytes kept for the next pull.
  On disk, a descriptor larger than ``max_blob_size`` is refused before any
  request, an ingest never grows past its descriptor's size, the free space
  is checked against what a manifest's children still need before any of
  them starts, and a fetch that wrote nothing leaves no ingest. In memory,
  a manifest or index is checked against `MAX_MANIFEST_SIZE` before it is
  requested or read, and blobs stream through a pipeline a few MiB deep.

Writing and hashing run in worker threads (`trio.to_thread` under one
`trio.CapacityLimiter`), fed batches of network chunks through a small
channel, so receiving the next megabyte overlaps hashing the last one and a
thread hop costs microseconds per megabyte rather than per chunk.

The fetcher talks to a registry through the small `Remote` protocol, which
`ckfs.remotes.registry.RegistryClient` implements; tests pass fakes.
With no remote at all, `fetch` only checks that everything is present and
raises `NotFound` otherwise; pulls that need nothing use the same check
without an event loop (`ckfs.remotes.walk.present`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import trio

from ckfs import mediatypes as mt
from ckfs.content import ContentStore, Writer
from ckfs.descriptor import Descriptor
from ckfs.digest import CHUNK, Digest
from ckfs.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    unwrap_groups,
)
from ckfs.images import manifest as manifests
from ckfs.images.image import MAX_CONFIG_SIZE
from ckfs.labels import DISTRIBUTION_SOURCE
from ckfs.reference import Reference
from ckfs.remotes import DEFAULT_MAX_BLOB_SIZE, time_budget
from ckfs.remotes.bounds import Deadline
from ckfs.remotes.walk import (
    DEFAULT_CONCURRENCY,
    BlobProgress,
    BlobState,
    ChildrenFunc,
    FetchReport,
    check_limits,
    ensure_gc_labels,
    is_parent,
    kind_of,
    megabytes,
    missing,
    platform_children,
    schema1_error,
    seconds_text,
    skip,
)

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_BLOB_SIZE",
    "BlobProgress",
    "BlobState",
    "BlobStream",
    "ChildrenFunc",
    "FetchReport",
    "Remote",
    "fetch",
    "platform_children",
    "ref_key",
]

#: Blobs up to this size (configs, manifests, tiny layers) take no transfer
#: slot: see `_Fetch._slot`.
SMALL_BLOB = 1 << 20

#: Bytes handed to a worker thread per hop. A thread hop costs tens of
#: microseconds; at 1 MiB per hop that is noise even at 1 GB/s, while single
#: network chunks (16-64 KiB) would make it a fifth of the time.
BATCH_BYTES = CHUNK

#: Batches received but not yet written, per blob. Two lets the network side
#: run one batch ahead of the hashing thread without buffering a whole layer.
PIPELINE_DEPTH = 2

#: Mid-stream resumes per blob per fetch before giving up. The client already
#: retries failed requests (so a request that fails to open is not tried
#: again here: that would multiply its retries); this bounds connections
#: that keep dropping after they started, and all of them share the blob's
#: one time budget. What arrived stays in the ingest for the next pull.
MAX_RESUMES = 5

#: How long to wait for another process holding a blob's ref lock (it is
#: downloading the same blob) before giving up; a whole layer may take this
#: long on a slow link.
LOCK_WAIT = 600.0

#: Worker threads writing and hashing at once, across all blobs of a fetch:
#: one per core (hashlib releases the GIL), plus one per transfer slot
#: (`_Fetch`), since much of a batch's time is the kernel taking the write,
#: and a transfer whose batch waits behind another blob's stalls its socket.
_HASH_THREADS = max(2, os.cpu_count() or 2)

#: Worker threads committing at once. A commit mostly waits for fsync, so
#: these do not compete with hashing for cores; bounded only so that a
#: fetch of a hundred small layers does not start a hundred threads.
_SYNC_THREADS = 8

#: Poll interval bounds while waiting on a ref lock; flock has no async wait.
_LOCK_POLL_MIN, _LOCK_POLL_MAX = 0.02, 0.5


class BlobStream(Protocol):
    """An open blob download: what `Remote.open_blob` yields.

    Attributes:
        offset: where the bytes actually start. The offset asked for when
            the server honoured the Range request, 0 when it sent the whole
            blob instead.
        total: the blob's full size as the server states it (0 if unknown).
        host: the server sending it (``host:port``), for messages.
    """

    @property
    def offset(self) -> int: ...

    @property
    def total(self) -> int: ...

    @property
    def host(self) -> str: ...

    def aiter_chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk; raises `Unavailable` if the connection drops."""
        ...


class Remote(Protocol):
    """The part of a registry client the fetcher uses."""

    async def fetch_manifest(self, ref: Reference, desc: Descriptor) -> bytes:
        """The manifest or index *desc*, already checked against its digest."""
        ...

    def open_blob(
        self, ref: Reference, desc: Descriptor, *, offset: int = 0
    ) -> AbstractAsyncContextManager[BlobStream]:
        """Start downloading *desc* from byte *offset* (a Range request if > 0)."""
        ...


def ref_key(desc: Descriptor) -> str:
    """The ingest ref for *desc*, as containerd's ``remotes.MakeRefKey``.

    Using containerd's names means ``ckfs content active`` reads like
    ``ctr content active``, and that a fetch and an import of the same blob
    (``import-<digest>``) never share a half-written ingest.
    """
    kind = kind_of(desc)
    return f"{'unknown' if kind == 'blob' else kind}-{desc.digest}"


async def fetch(
    remote: Remote | None,
    content: ContentStore,
    ref: Reference,
    target: Descriptor,
    *,
    children: ChildrenFunc = manifests.children,
    max_concurrent: int = DEFAULT_CONCURRENCY,
    on_event: Callable[[BlobProgress], None] | None = None,
    timeout: float | None = None,
    max_blob_size: int = DEFAULT_MAX_BLOB_SIZE,
) -> FetchReport:
    """Make *target* and everything *children* leads to present in *content*.

    Manifests and indexes are committed with containerd's GC reference
    labels to their children; a present one missing them gets them added.
    Fetched blobs are labelled with the repository they came from
    (``containerd.io/distribution.source.<registry>``). Non-distributable
    layers that are not present are recorded as skipped, not fetched.

    Args:
        remote: where missing blobs come from; None to only check presence.
        content: the content store blobs go into.
        ref: the reference being fetched (the repository to ask for blobs).
        target: the root descriptor (an index, a manifest or any blob).
        children: which descriptors under a manifest or index to follow;
            `platform_children` for a platform-limited pull.
        max_concurrent: blobs over `SMALL_BLOB` transferred at once (>= 1);
            smaller ones (configs, manifests) never wait for a slot.
        on_event: called with a blob's `BlobProgress` at each state change.
        timeout: seconds each blob or manifest may take, retries, waits
            and resumes included; None for `ckfs.remotes.time_budget` of
            its size. Waiting for a transfer slot or for another process
            holding the blob's ref (`LOCK_WAIT`) is not counted.
        max_blob_size: refuse, before any request, a blob to fetch whose
            descriptor claims more bytes than this.

    Returns:
        Every blob visited, with its final state.

    Raises:
        NotFound: *remote* is None and a needed blob is absent; or an index
            has no manifest for the platform; or the registry lacks a blob.
        DataLoss: a blob's bytes do not match its digest or size. Its
            ingest is aborted and nothing is committed for it; the message
            names the blob and the registry.
        InvalidArgument: a malformed manifest or index, Docker schema 1,
            *max_concurrent* < 1, *timeout* not positive; a blob to fetch
            larger than *max_blob_size* (or a manifest larger than
            `MAX_MANIFEST_SIZE`, a config larger than `MAX_CONFIG_SIZE`),
            refused before it is requested.
        FailedPrecondition: the children of a manifest need more space
            than the content store's filesystem has free; nothing of them
            was requested (the message has both numbers).
        Unavailable: the registry cannot be reached, a connection kept
            dropping, or a blob's time budget ran out (what arrived stays
            in the ingest for the next fetch); or another process held a
            blob's ref for `LOCK_WAIT` seconds.

    Cancellation:
        Transfers stop; every open ingest is closed with its bytes kept, so
        the next fetch resumes where this one stopped. A blob whose commit
        had begun is committed or not, never half.
    """
    if max_concurrent < 1:
        raise InvalidArgument(f"max concurrent transfers must be at least 1, not {max_concurrent}")
    check_limits(timeout, max_blob_size)
    run = _Fetch(
        remote,
        content,
        ref,
        children=children,
        slots=trio.Semaphore(max_concurrent),
        on_event=on_event,
        timeout=timeout,
        max_blob_size=max_blob_size,
    )
    started = time.monotonic()
    report = FetchReport(target=target, blobs=run.blobs)
    await run.admit([target])
    with unwrap_groups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run.visit, target, nursery)
    report.seconds = time.monotonic() - started
    return report


class _Fetch:
    """One fetch's shared state: what was seen, the limits, the callbacks."""

    def __init__(
        self,
        remote: Remote | None,
        content: ContentStore,
        ref: Reference,
        *,
        children: ChildrenFunc,
        slots: trio.Semaphore,
        on_event: Callable[[BlobProgress], None] | None,
        timeout: float | None,
        max_blob_size: int,
    ) -> None:
        self.remote = remote
        self.content = content
        self.ref = ref
        self.children = children
        self.slots = slots
        self.hashing = trio.CapacityLimiter(_HASH_THREADS + slots.value)
        # Commits wait on fsync, not the CPU: they get their own threads so
        # a layer being flushed never holds up the hashing of the others.
        self.syncing = trio.CapacityLimiter(_SYNC_THREADS)
        self.on_event = on_event
        self.timeout = timeout
        self.max_blob_size = max_blob_size
        self.seen: set[Digest] = set()
        self.blobs: list[BlobProgress] = []
        self.progress: dict[Digest, BlobProgress] = {}
        # Bytes still to write per blob admitted for download (`admit`).
        self.reserved: dict[Digest, int] = {}
        self.source_labels = {f"{DISTRIBUTION_SOURCE}.{ref.domain}": ref.path}

    # -- the walk -------------------------------------------------------------------

    async def visit(self, desc: Descriptor, nursery: trio.Nursery) -> None:
        """Make *desc* present, then start its children in *nursery*."""
        if desc.digest in self.seen:
            return
        self.seen.add(desc.digest)
        if desc.media_type in mt.SCHEMA1:
            raise schema1_error(self.ref, desc)
        p = BlobProgress(desc=desc, kind=kind_of(desc))
        self.blobs.append(p)
        self.progress[desc.digest] = p
        try:
            if is_parent(desc):
                data = await self._parent(p)
                found = self.children(desc, data)
                await self.admit(found)
                for child in found:
                    nursery.start_soon(self.visit, child, nursery)
            elif desc.media_type in mt.NONDISTRIBUTABLE and not await self._exists(desc):
                skip(p)
                self._set(p, BlobState.SKIPPED, p.note)
            else:
                await self._blob(p)
        except BaseException as e:
            if not isinstance(e, trio.Cancelled):
                self._set(p, BlobState.FAILED, str(e))
            raise

    # -- limits -----------------------------------------------------------------------

    async def admit(self, descs: Sequence[Descriptor]) -> None:
        """Refuse *descs* before any of them is requested if they cannot fit.

        Called with the target and with each manifest's or index's children
        as soon as they are known: the sizes their descriptors claim are
        checked one by one against the limits, and together, with what this
        fetch still has to write, against the free space. A pull that cannot
        fit fails before it fills the disk, not after. The store is asked in
        a worker thread (`_missing`); what this fetch has seen or reserved
        meanwhile is checked again on return.

        Raises:
            InvalidArgument: one is over its size limit.
            FailedPrecondition: together they need more than is free.
        """
        if self.remote is None:
            return
        wanted = [
            desc
            for desc in descs
            if desc.digest not in self.seen
            and desc.digest not in self.reserved
            and desc.media_type not in mt.NONDISTRIBUTABLE
            and desc.media_type not in mt.SCHEMA1
        ]
        if not wanted:
            return
        missing, free = await trio.to_thread.run_sync(self._missing, wanted)
        need = 0
        for desc, resumable in missing:
            if desc.digest in self.seen or desc.digest in self.reserved:
                continue
            self._check_size(desc)
            left = desc.size - resumable
            self.reserved[desc.digest] = left
            need += left
        if need <= 0:
            return
        total = self._outstanding()
        if free is not None and total > free:
            raise FailedPrecondition(
                f"{self.ref}: the fetch needs {megabytes(total)} more, "
                f"{megabytes(free)} free on {self.content.root}"
            )

    def _missing(
        self, descs: Sequence[Descriptor]
    ) -> tuple[list[tuple[Descriptor, int]], int | None]:
        """In a worker thread: which of *descs* are absent, with the bytes an
        earlier fetch left in each one's ingest, and the free bytes."""
        missing = [(d, self._resumable(d)) for d in descs if not self.content.exists(d.digest)]
        return missing, self.content.free_bytes() if missing else None

    def _check_size(self, desc: Descriptor) -> None:
        kind = kind_of(desc)
        limit, which = self.max_blob_size, "maximum blob size (--max-blob-size)"
        if is_parent(desc) and limit > manifests.MAX_MANIFEST_SIZE:
            limit, which = manifests.MAX_MANIFEST_SIZE, f"limit for a {kind}"
        elif kind == "config" and limit > MAX_CONFIG_SIZE:
            limit, which = MAX_CONFIG_SIZE, "limit for a config"
        if desc.size > limit:
            raise InvalidArgument(
                f"{self.ref}: {kind} {desc.digest} claims {desc.size} bytes, over the "
                f"{limit} byte {which}; nothing was fetched"
            )

    def _resumable(self, desc: Descriptor) -> int:
        """Bytes an earlier fetch left in *desc*'s ingest (they need no new space).

        Asks the store: in a worker thread.
        """
        try:
            return min(self.content.status(ref_key(desc)).offset, desc.size)
        except NotFound:
            return 0

    def _outstanding(self) -> int:
        """Bytes this fetch has still to write for the blobs it admitted."""
        total = 0
        for digest, left in self.reserved.items():
            p = self.progress.get(digest)
            if p is None or p.state in (BlobState.QUEUED, BlobState.WAITING):
                total += left
            elif p.state in (BlobState.DOWNLOADING, BlobState.RESUMING):
                total += max(0, p.desc.size - p.offset)
        return total

    def _slot(self, desc: Descriptor) -> AbstractAsyncContextManager[object]:
        """A transfer slot for *desc*; none for a small blob.

        The limit is there to share bandwidth and connections among large
        blobs. A config or a manifest is one round trip: queued behind three
        layers it would only delay the layers that need it (and the walk
        that needs a manifest's children).
        """
        if desc.size <= SMALL_BLOB:
            return contextlib.nullcontext()
        return self.slots

    async def _exists(self, desc: Descriptor) -> bool:
        """Whether *desc* is present, asked in a worker thread: a store call
        blocks, and the loop may serve a daemon's every RPC."""
        return await trio.to_thread.run_sync(self.content.exists, desc.digest)

    def _set(self, p: BlobProgress, state: BlobState, note: str = "") -> None:
        p.state = state
        p.note = note
        if self.on_event is not None:
            self.on_event(p)

    def _what(self, p: BlobProgress) -> str:
        """``layer sha256:… from registry host``: how errors name a blob."""
        return f"{p.kind} {p.desc.digest} from registry {p.source or self.ref.domain}"

    # -- manifests and indexes ----------------------------------------------------

    async def _parent(self, p: BlobProgress) -> bytes:
        """The bytes of a manifest or index: local if present, else fetched and committed."""
        desc = p.desc
        writer = None
        if not await self._exists(desc):
            if self.remote is None:
                raise missing(self.ref, desc)
            writer = await self._writer(p)
        if writer is None:
            data = await trio.to_thread.run_sync(
                functools.partial(
                    self.content.read_all, desc.digest, limit=manifests.MAX_MANIFEST_SIZE
                ),
                limiter=self.hashing,
            )
            p.offset = len(data)
            await trio.to_thread.run_sync(ensure_gc_labels, self.content, desc, data)
            self._set(p, BlobState.EXISTS)
            return data
        async with _kept_if_written(writer):
            assert self.remote is not None
            p.started = time.monotonic()
            self._set(p, BlobState.DOWNLOADING)
            budget = Deadline.after(time_budget(desc.size, self.timeout))
            with budget.raising(lambda: Unavailable(self._gave_up(p, budget))):
                data = await self.remote.fetch_manifest(self.ref, desc)
            p.fetched += len(data)
            labels = {**manifests.gc_labels(desc, data), **self.source_labels}
            await trio.to_thread.run_sync(
                _write_all, writer, desc, data, labels, limiter=self.syncing
            )
        p.offset = len(data)
        self._set(p, BlobState.VERIFIED)
        return data

    # -- blobs ----------------------------------------------------------------------

    async def _writer(self, p: BlobProgress) -> Writer | None:
        """The blob's ingest writer, or None once the blob is present.

        Waits while another writer (another ckfs process pulling the same
        image) holds the ref: when it lets go the blob is usually committed,
        and then nothing needs downloading.
        """
        deadline = time.monotonic() + LOCK_WAIT
        delay = _LOCK_POLL_MIN
        while True:
            try:
                return await trio.to_thread.run_sync(
                    _open_writer, self.content, p.desc, limiter=self.hashing
                )
            except Unavailable:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"{self.ref}: {p.kind} {p.desc.digest}: another writer held its "
                        f"ingest for {LOCK_WAIT:.0f} s"
                    ) from None
                if p.state is not BlobState.WAITING:
                    self._set(p, BlobState.WAITING, "another process is fetching it")
                await trio.sleep(delay)
                delay = min(delay * 2, _LOCK_POLL_MAX)

    async def _blob(self, p: BlobProgress) -> None:
        """Make a config, layer or other blob present."""
        desc = p.desc
        if await self._exists(desc):
            p.offset = desc.size
            self._set(p, BlobState.EXISTS)
            return
        if self.remote is None:
            raise missing(self.ref, desc)
        committed = False
        for attempt in range(2):
            writer = await self._writer(p)
            if writer is None:
                break
            async with _kept_if_written(writer):
                resumed = writer.offset > 0
                try:
                    # The slot covers the network part only: while this blob
                    # is flushed to disk, the next one is already arriving.
                    async with self._slot(desc):
                        await self._transfer(p, writer)
                    # Every byte is here: a sibling's failure cancelling the
                    # fetch now would leave a whole blob as an ingest.
                    with trio.CancelScope(shield=True):
                        committed = await self._commit(p, writer)
                except DataLoss:
                    if not writer.closed:
                        await trio.to_thread.run_sync(writer.abort, limiter=self.hashing)
                    if resumed and attempt == 0:
                        # The bytes kept from an earlier run may be the bad
                        # ones (another mirror, a disk error): start over once.
                        continue
                    raise
            break
        p.offset = desc.size
        self._set(p, BlobState.VERIFIED if committed else BlobState.EXISTS)

    async def _commit(self, p: BlobProgress, writer: Writer) -> bool:
        """Verify and commit; False if another ref committed the same blob first.

        Raises:
            DataLoss: size or digest differ (the caller aborts the ingest).
        """
        try:
            await trio.to_thread.run_sync(
                functools.partial(
                    writer.commit, p.desc.size, p.desc.digest, labels=self.source_labels
                ),
                limiter=self.syncing,
            )
        except AlreadyExists:
            return False
        except DataLoss:
            raise DataLoss(
                f"{self._what(p)}: wrong content (it hashes to {writer.digest()}); nothing was kept"
            ) from None
        return True

    async def _transfer(self, p: BlobProgress, writer: Writer) -> None:
        """Bring the ingest to the blob's full size, resuming as needed.

        Every attempt draws on one time budget for the blob, started here
        (after the transfer slot was granted): the registry client's
        retries and ``Retry-After`` waits run under its deadline, and no
        attempt starts once it has passed.

        Raises:
            Unavailable: the request failed (after the client's own
                retries), the connection dropped more than `MAX_RESUMES`
                times, or the budget ran out; the bytes received so far
                stay in the ingest.
            DataLoss: the registry sent more bytes than the descriptor says
                or stated another size; the ingest is aborted.
        """
        desc = p.desc
        budget = Deadline.after(time_budget(desc.size, self.timeout))
        resumes = 0
        while True:
            if writer.offset > desc.size:
                await self._truncate(writer, 0)
            p.offset = offset = writer.offset
            if offset == desc.size and desc.size > 0:
                return  # all there from an earlier run: just commit
            if budget.passed():
                raise Unavailable(self._gave_up(p, budget))
            p.started = time.monotonic()
            if offset:
                self._set(p, BlobState.RESUMING, f"continuing at byte {offset}")
            else:
                self._set(p, BlobState.DOWNLOADING)
            try:
                expired = await self._receive(p, writer, budget)
            except _NotOpened as e:
                raise e.error from None
            except Unavailable as e:
                p.offset = writer.offset
                if budget.passed():
                    raise Unavailable(f"{self._gave_up(p, budget)}; last error: {e}") from None
                if resumes >= MAX_RESUMES:
                    raise Unavailable(
                        f"{e} (gave up after {resumes} resumes; {writer.offset} of {desc.size} "
                        "bytes are kept for the next pull)"
                    ) from None
                resumes += 1
                continue
            p.offset = writer.offset
            if writer.offset >= desc.size:
                return
            if expired:
                raise Unavailable(self._gave_up(p, budget))
            # The body ended early without an error: resume like a drop.
            if resumes >= MAX_RESUMES:
                raise Unavailable(
                    f"{self._what(p)}: the body ended at byte {writer.offset} of {desc.size} "
                    f"(gave up after {resumes} resumes)"
                )
            resumes += 1

    def _gave_up(self, p: BlobProgress, budget: Deadline) -> str:
        """The message of a blob or manifest whose time *budget* ran out."""
        what = f"{self._what(p)}: gave up after {seconds_text(budget.seconds)} s (its time budget; "
        if is_parent(p.desc):
            return what + "--timeout sets it)"
        kept = "; the next pull resumes" if p.offset else ""
        return (
            f"{what}--timeout sets it): {megabytes(p.offset)} of "
            f"{megabytes(p.desc.size)} fetched{kept}"
        )

    async def _truncate(self, writer: Writer, size: int) -> None:
        await trio.to_thread.run_sync(writer.truncate, size, limiter=self.hashing)

    async def _receive(self, p: BlobProgress, writer: Writer, budget: Deadline) -> bool:
        """One attempt: open the blob at the ingest's offset and copy it in.

        Receiving runs here and writing and hashing in a thread: batches go
        through a channel `PIPELINE_DEPTH` deep to one drain task, so the
        two sides overlap. The *budget* covers the request and the
        receiving side only. When it passes, or the connection drops, the
        drain still writes every batch already received, so the ingest
        (and the next resume) keeps all of it.

        Returns:
            Whether the *budget* ran out before the body ended.

        Raises:
            _NotOpened: the request failed, with the client's error.
            Unavailable: the connection dropped (after the batches received
                were written).
            DataLoss: more bytes than the descriptor says, or another size.
        """
        assert self.remote is not None
        desc = p.desc
        send, receive = trio.open_memory_channel[list[bytes]](PIPELINE_DEPTH)
        dropped: Unavailable | None = None
        opened = False

        async def drain() -> None:
            async with receive:
                async for batch in receive:
                    await trio.to_thread.run_sync(_write_batch, writer, batch, limiter=self.hashing)
                    p.offset = writer.offset

        with unwrap_groups():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                async with send:
                    batch: list[bytes] = []
                    pending = 0
                    with trio.CancelScope(deadline=budget.at) as scope:
                        try:
                            async with self.remote.open_blob(
                                self.ref, desc, offset=writer.offset
                            ) as stream:
                                opened = True
                                received = await self._start(p, writer, stream)
                                async for chunk in stream.aiter_chunks():
                                    received += len(chunk)
                                    p.fetched += len(chunk)
                                    if received > desc.size:
                                        raise DataLoss(
                                            f"{self._what(p)}: more than the expected "
                                            f"{desc.size} bytes"
                                        )
                                    batch.append(chunk)
                                    pending += len(chunk)
                                    if pending >= BATCH_BYTES:
                                        # Cancelled, a send delivers nothing: the
                                        # batch is still ours to send below.
                                        await send.send(batch)
                                        batch, pending = [], 0
                        except Unavailable as e:
                            dropped = e
                    if batch:
                        await send.send(batch)
        if dropped is not None:
            raise dropped if opened else _NotOpened(dropped)
        return scope.cancelled_caught

    async def _start(self, p: BlobProgress, writer: Writer, stream: BlobStream) -> int:
        """Check where *stream* starts and line the ingest up with it; return that offset.

        Raises:
            DataLoss: the registry states another size than the descriptor.
            Unavailable: the stream starts after the ingest's offset.
        """
        offset = writer.offset
        p.source = stream.host
        if stream.total and stream.total != p.desc.size:
            raise DataLoss(
                f"{self._what(p)}: the registry says it has {stream.total} bytes, "
                f"the descriptor says {p.desc.size}"
            )
        if stream.offset != offset:
            if not 0 <= stream.offset < offset:
                raise Unavailable(
                    f"{self._what(p)}: asked for bytes from {offset}, "
                    f"got bytes from {stream.offset}"
                )
            # The server ignored the Range request (200, not 206).
            await self._truncate(writer, stream.offset)
            p.offset = stream.offset
            self._set(
                p,
                BlobState.DOWNLOADING,
                f"registry ignored the range request; restarted at {stream.offset}",
            )
        return stream.offset


class _NotOpened(Exception):
    """A blob request that failed before its body started (the client gave up on it)."""

    def __init__(self, error: Unavailable) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.asynccontextmanager
async def _kept_if_written(writer: Writer) -> AsyncIterator[Writer]:
    """Close *writer* on the way out, keeping its ingest only if it holds bytes.

    An ingest is kept so that the next fetch resumes it; one with nothing in
    it (a request that failed before its first byte) has nothing to resume
    and would only be litter under ``ckfs content active``. Closing touches
    the disk: a worker thread does it, shielded, so a cancelled fetch still
    lets go of its refs.
    """
    try:
        yield writer
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_let_go, writer)


# -- worker-thread helpers --------------------------------------------------------


def _open_writer(content: ContentStore, desc: Descriptor) -> Writer | None:
    """A writer for *desc*, or None when the blob is present.

    The presence check is repeated after the lock is taken: another process
    may have committed the blob and released the ref between the store's
    own check and our lock, and we must not download it a second time.

    Raises:
        Unavailable: another writer holds the ref.
    """
    try:
        writer = content.writer(ref_key(desc), total=desc.size, expected=desc.digest)
    except AlreadyExists:
        return None
    if content.exists(desc.digest):
        writer.abort()
        return None
    return writer


def _let_go(writer: Writer) -> None:
    """`_kept_if_written`'s ending: abort an empty ingest, else close and keep it."""
    if not writer.closed and writer.offset == 0:
        writer.abort()
    else:
        writer.close()


def _write_batch(writer: Writer, batch: list[bytes]) -> None:
    for chunk in batch:
        writer.write(chunk)


def _write_all(writer: Writer, desc: Descriptor, data: bytes, labels: dict[str, str]) -> None:
    """Write a whole (already verified) manifest and commit it with *labels*."""
    if writer.offset:
        writer.truncate(0)
    writer.write(data)
    with contextlib.suppress(AlreadyExists):
        writer.commit(desc.size, desc.digest, labels=labels)
