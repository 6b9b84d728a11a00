"""containerd's Content service over ckfs's content store.

``ctr --address <ckfsd socket> content ls/get/fetch`` and containerd's
content proxy talk to this class; it keeps containerd 1.6's service
semantics (``services/content/contentserver``) where a client can see them:

- **Write** is one stream per ingest ref. The first message names the ref
  (and may give the expected size and digest); each request is answered by
  one response carrying the ingest's offset. STAT reports, WRITE appends at
  the current offset (offset 0 restarts the ingest; any other offset is
  refused), COMMIT writes its data, checks size and digest and ends the
  stream. An expected digest already in the store is ALREADY_EXISTS (the
  ingest is dropped: nothing left to write). A client that goes away keeps
  its ingest: the next Write with that ref resumes at Status's offset.
- **Errors at the boundary.** A commit whose bytes are not what was
  promised is FAILED_PRECONDITION, as containerd's content suite requires
  (the local store calls it DataLoss); so is a write past the promised
  total. A chunk over `MAX_WRITE_CHUNK`, a label set over
  `~ckfs.services.checks.MAX_LABELS_SIZE` and malformed digests are
  INVALID_ARGUMENT before the store sees them.
- **Read and List stream** in bounded messages (`READ_CHUNK`, `~ckfs.services.checks.batches`),
  one worker-thread call each, so neither a large blob nor a large store
  is ever held in one message.

Every store call runs in a worker thread: SQLite and file I/O block, and
the trio loop also serves FUSE.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Final, TypeVar

import trio
from google.protobuf import empty_pb2

from ckfs.api import convert
from ckfs.api.services.content.v1 import content_pb2 as pb
from ckfs.content import Info
from ckfs.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument
from ckfs.metadata.fields import EPOCH
from ckfs.services.checks import batches, check_labels

if TYPE_CHECKING:
    from ckfs.content import ContentStore, Writer
    from ckfs.digest import Digest
    from ckfs.state import State

__all__ = ["MAX_WRITE_CHUNK", "READ_CHUNK", "ContentService"]

#: Bytes per Read response: containerd's copy buffer. Large enough that the
#: per-message cost vanishes, far below gRPC's 4 MiB default message limit.
READ_CHUNK: Final = 1 << 20

#: Largest data one Write request may carry: containerd's own receive limit
#: (16 MiB, ``defaults.DefaultMaxRecvMsgSize``); its clients send 1 MiB. A
#: larger chunk is refused rather than buffered and hashed.
MAX_WRITE_CHUNK: Final = 16 << 20

_T = TypeVar("_T")


class ContentService:
    """``containerd.services.content.v1.Content`` on one ckfs state root."""

    def __init__(self, state: State) -> None:
        self._state = state

    async def _run(self, fn: Callable[[ContentStore], _T]) -> _T:
        """``fn(store)`` in a worker thread."""
        state = self._state
        return await trio.to_thread.run_sync(lambda: fn(state.content))

    async def Info(self, request: pb.InfoRequest, call: object) -> pb.InfoResponse:
        d = convert.digest_from_proto(request.digest)
        info = await self._run(lambda s: s.info(d))
        return pb.InfoResponse(info=convert.content_info_to_proto(info))

    async def Update(self, request: pb.UpdateRequest, call: object) -> pb.UpdateResponse:
        d = convert.digest_from_proto(request.info.digest)
        labels = check_labels(request.info.labels, f"content {d}")
        paths = convert.fieldpaths(request.update_mask)
        # Only the digest and labels are read: size and times are the blob's.
        wanted = Info(digest=d, size=0, created_at=EPOCH, updated_at=EPOCH, labels=labels)
        info = await self._run(lambda s: s.update(wanted, paths))
        return pb.UpdateResponse(info=convert.content_info_to_proto(info))

    async def List(
        self, request: pb.ListContentRequest, call: object
    ) -> AsyncIterator[pb.ListContentResponse]:
        filters = list(request.filters)
        infos = await self._run(lambda s: list(s.walk(filters)))
        for batch in batches(infos):
            yield pb.ListContentResponse(info=[convert.content_info_to_proto(i) for i in batch])

    async def Delete(self, request: pb.DeleteContentRequest, call: object) -> empty_pb2.Empty:
        d = convert.digest_from_proto(request.digest)
        await self._run(lambda s: s.delete(d))
        return empty_pb2.Empty()

    async def Read(
        self, request: pb.ReadContentRequest, call: object
    ) -> AsyncIterator[pb.ReadContentResponse]:
        """The bytes from ``offset`` (negative: 0) for ``size`` (0: to the end).

        Raises:
            InvalidArgument: a malformed digest, or an offset past the end.
            NotFound: no such blob.
        """
        d = convert.digest_from_proto(request.digest)
        reader = await self._run(lambda s: s.reader(d))
        try:
            offset = max(request.offset, 0)
            if offset > reader.size:
                raise InvalidArgument(
                    f"content {d}: read at {offset} is past its {reader.size} bytes"
                )
            end = reader.size
            if 0 < request.size < end - offset:
                end = offset + request.size
            while offset < end:
                n = min(READ_CHUNK, end - offset)
                data = await trio.to_thread.run_sync(reader.read_at, offset, n)
                if not data:
                    raise DataLoss(f"content {d}: ends at {offset}, {end} bytes expected")
                yield pb.ReadContentResponse(offset=offset, data=data)
                offset += len(data)
        finally:
            reader.close()

    async def Status(self, request: pb.StatusRequest, call: object) -> pb.StatusResponse:
        ref = request.ref
        status = await self._run(lambda s: s.status(ref))
        return pb.StatusResponse(status=convert.status_to_proto(status))

    async def ListStatuses(
        self, request: pb.ListStatusesRequest, call: object
    ) -> pb.ListStatusesResponse:
        filters = list(request.filters)
        statuses = await self._run(lambda s: s.list_statuses(filters))
        return pb.ListStatusesResponse(statuses=[convert.status_to_proto(s) for s in statuses])

    async def Abort(self, request: pb.AbortRequest, call: object) -> empty_pb2.Empty:
        ref = request.ref
        await self._run(lambda s: s.abort(ref))
        return empty_pb2.Empty()

    async def Write(
        self, requests: AsyncIterator[pb.WriteContentRequest], call: object
    ) -> AsyncIterator[pb.WriteContentResponse]:
        """Start or resume the ingest the first request names; see the module docstring.

        Cancellation handling: when the client goes away the writer is
        closed (shielded, in a worker thread) and the ingest kept, so a
        later Write resumes it; nothing is committed.

        Raises:
            InvalidArgument: no ref on the first request, another ref later,
                a bad digest, a chunk over `MAX_WRITE_CHUNK`, an offset other
                than 0 or the current one, too many label bytes.
            AlreadyExists: the expected digest is already in the store.
            FailedPrecondition: commit with the wrong size or digest, or
                data past the expected total; the ingest is kept.
            Unavailable: another stream (or process) is writing this ref.
        """
        stream = aiter(requests)
        first = await anext(stream, None)
        if first is None:
            return
        if not first.ref:
            raise InvalidArgument("content write: the first message must have a ref")
        ingest = _Ingest(first.ref, first.total, _expected(first))
        writer = await self._run(ingest.open)
        try:
            request: pb.WriteContentRequest | None = first
            while request is not None:
                ingest.take(request)
                step = functools.partial(ingest.step, writer=writer, request=request)
                yield await self._run(step)
                if request.action == pb.COMMIT:
                    return
                request = await anext(stream, None)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(writer.close)


def _expected(request: pb.WriteContentRequest) -> Digest | None:
    """The request's expected digest; None when it names none."""
    if not request.expected:
        return None
    return convert.digest_from_proto(request.expected, where="content write expected")


class _Ingest:
    """One Write stream's view of its ingest: the latest total and expected digest.

    containerd lets any request before the commit change them; the
    store's writer keeps what the ingest was opened with, so the values the
    commit checks against live here.
    """

    def __init__(self, ref: str, total: int, expected: Digest | None) -> None:
        self.ref = ref
        self.total = max(total, 0)
        self.expected = expected

    def open(self, store: ContentStore) -> Writer:
        return store.writer(self.ref, total=self.total or None, expected=self.expected)

    def take(self, request: pb.WriteContentRequest) -> None:
        """Adopt *request*'s ref check, total and expected digest (on the trio thread).

        Raises:
            InvalidArgument: another ref, a bad digest, an oversized chunk.
        """
        if request.ref and request.ref != self.ref:
            raise InvalidArgument(
                f"content write {self.ref!r}: a later message names ref {request.ref[:200]!r}"
            )
        if len(request.data) > MAX_WRITE_CHUNK:
            raise InvalidArgument(
                f"content write {self.ref!r}: a chunk of {len(request.data)} bytes, "
                f"more than {MAX_WRITE_CHUNK}"
            )
        if request.expected:
            self.expected = _expected(request)
        if request.total > 0:
            self.total = request.total

    def step(
        self, store: ContentStore, writer: Writer, request: pb.WriteContentRequest
    ) -> pb.WriteContentResponse:
        """Carry out one request against the open *writer* (in a worker thread)."""
        if request.expected and self.expected is not None and store.exists(self.expected):
            # Nothing left to write: containerd drops the ingest and says so.
            writer.abort()
            raise AlreadyExists(f"content {self.expected}: already exists")
        if request.action == pb.STAT:
            return self._response(request, writer, writer.digest())
        if request.action not in (pb.WRITE, pb.COMMIT):
            raise InvalidArgument(f"content write {self.ref!r}: unknown action {request.action}")
        labels = check_labels(request.labels, f"content write {self.ref!r}")
        with _client_bytes():
            if request.offset > 0 and request.offset != writer.offset:
                raise InvalidArgument(
                    f"content write {self.ref!r}: write at {request.offset} must occur at "
                    f"the current offset {writer.offset}"
                )
            if request.offset == 0 and writer.offset > 0:
                writer.truncate(0)
            if request.data:
                writer.write(request.data)
            digest = writer.digest()
            response = self._response(request, writer, digest)
            if request.action == pb.COMMIT:
                writer.commit(self.total, self.expected, labels)
        return response

    def _response(
        self, request: pb.WriteContentRequest, writer: Writer, digest: Digest
    ) -> pb.WriteContentResponse:
        status = writer.status()
        return pb.WriteContentResponse(
            action=request.action,
            started_at=convert.datetime_to_proto(status.started_at),
            updated_at=convert.datetime_to_proto(status.updated_at),
            offset=writer.offset,
            total=self.total,
            digest=str(digest),
        )


@contextlib.contextmanager
def _client_bytes() -> Iterator[None]:
    """Inside, the local store's DataLoss is the client's broken promise.

    The bytes a client sent differ from what it promised (digest, total):
    the request does not fit the ingest's state, nothing was lost on disk,
    and containerd's clients expect FailedPrecondition.
    """
    try:
        yield
    except DataLoss as e:
        raise FailedPrecondition(str(e)) from None
