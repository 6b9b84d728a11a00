"""A content store in ckfsd, reached over containerd's Content API.

`RemoteContentStore` answers what `ckfs.content.ContentStore` answers
(writers, info/update/walk/delete, readers, ingest statuses, abort), one
RPC per call, so the content acceptance suite and `ckfs.content.write_blob`
run through ckfsd unchanged. A `RemoteWriter` is one Write stream: each
request is answered before the next is sent, and every answer carries the
ingest's offset and digest, so the writer knows what the daemon holds.

Where the wire is narrower than the local store, the adapter says so
rather than pretends: containerd's Write can restart an ingest but not
truncate it to a length (`RemoteWriter.truncate` of anything but 0 is
`Unimplemented`, as containerd's own remote writer); a stream the daemon
ended with an error is reopened on the same ref, so the writer stays
usable as a local one does after a refused commit.

Light, as every client module: grpc, the generated modules and the model
types. Calls block; trio callers run them in worker threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import queue
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from google.protobuf.field_mask_pb2 import FieldMask

from ckfs.api import convert
from ckfs.api.services.content.v1 import content_pb2 as pb
from ckfs.api.services.content.v1 import content_pb2_grpc
from ckfs.client import rpc_errors
from ckfs.digest import Digest
from ckfs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unimplemented

if TYPE_CHECKING:
    from ckfs.client import Client
    from ckfs.content.types import Info, Status

__all__ = ["RemoteContentStore", "RemoteReader", "RemoteWriter"]

#: Marks the end of a Write stream's requests.
_END = None


class RemoteContentStore:
    """The content store of the ckfsd behind *client* (the caller closes the client)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._stub = content_pb2_grpc.ContentStub(client.channel)

    def __repr__(self) -> str:
        return f"RemoteContentStore(at {self._client.address})"

    # -- blobs --------------------------------------------------------------------

    def info(self, dgst: Digest) -> Info:
        reply = self._client.call(self._stub.Info, pb.InfoRequest(digest=str(dgst)))
        return convert.content_info_from_proto(reply.info)

    def exists(self, dgst: Digest) -> bool:
        try:
            self.info(dgst)
        except NotFound:
            return False
        return True

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        request = pb.UpdateRequest(
            info=convert.content_info_to_proto(info), update_mask=FieldMask(paths=list(fieldpaths))
        )
        return convert.content_info_from_proto(self._client.call(self._stub.Update, request).info)

    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        """Every blob matching *filters*, read before returning (a bad filter raises here)."""
        replies = self._client.stream(self._stub.List, pb.ListContentRequest(filters=list(filters)))
        return iter([convert.content_info_from_proto(i) for r in replies for i in r.info])

    def delete(self, dgst: Digest) -> None:
        self._client.call(self._stub.Delete, pb.DeleteContentRequest(digest=str(dgst)))

    def reader(self, dgst: Digest) -> RemoteReader:
        """A random-access reader of blob *dgst* (NotFound at once if it is missing)."""
        return RemoteReader(self, dgst, self.info(dgst).size)

    def read_range(self, dgst: Digest, offset: int, size: int) -> bytes:
        """*size* bytes of *dgst* from *offset* (fewer at the end); one Read stream."""
        request = pb.ReadContentRequest(digest=str(dgst), offset=offset, size=size)
        return b"".join(r.data for r in self._client.stream(self._stub.Read, request))

    def read_all(self, dgst: Digest, *, limit: int | None = None) -> bytes:
        """The whole blob.

        Raises:
            NotFound: no such blob.
            InvalidArgument: it is larger than *limit*.
        """
        size = self.info(dgst).size
        if limit is not None and size > limit:
            raise InvalidArgument(f"content {dgst}: {size} bytes, more than the limit {limit}")
        return self.read_range(dgst, 0, size) if size else b""

    # -- ingests ------------------------------------------------------------------

    def writer(
        self, ref: str, *, total: int | None = None, expected: Digest | None = None
    ) -> RemoteWriter:
        """Start or resume the ingest *ref* (see `ckfs.content.ContentStore.writer`)."""
        return RemoteWriter(self, ref, total, expected)

    def status(self, ref: str) -> Status:
        reply = self._client.call(self._stub.Status, pb.StatusRequest(ref=ref))
        return convert.status_from_proto(reply.status)

    def list_statuses(self, filters: Sequence[str] = ()) -> list[Status]:
        request = pb.ListStatusesRequest(filters=list(filters))
        reply = self._client.call(self._stub.ListStatuses, request)
        return [convert.status_from_proto(s) for s in reply.statuses]

    def abort(self, ref: str) -> None:
        self._client.call(self._stub.Abort, pb.AbortRequest(ref=ref))

    def write_stream(self, requests: Iterator[pb.WriteContentRequest]) -> Any:
        """Open a Write stream fed by *requests*; its response iterator."""
        return self._stub.Write(requests, **self._client.call_options())


class RemoteWriter:
    """One ingest being written through ckfsd's Write stream.

    Opening sends a STAT: the daemon opens (or resumes) the ingest and holds
    its lock while the stream lives, so another writer of the same ref is
    `Unavailable`, as locally.
    """

    def __init__(
        self, store: RemoteContentStore, ref: str, total: int | None, expected: Digest | None
    ) -> None:
        if total is not None and total < 0:
            # The wire would take it for "unknown"; the caller meant something else.
            raise InvalidArgument(f"ref {ref}: total {total} is negative")
        self.ref = ref
        self._store = store
        self._total = total or 0
        self._expected = expected
        self._requests: queue.SimpleQueue[pb.WriteContentRequest | None] | None = None
        self._responses: Any = None
        self._offset = 0
        self._digest = ""
        self._closed = False
        self._open()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self._offset}"
        return f"RemoteWriter({self.ref!r}, {state})"

    def __enter__(self) -> RemoteWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def closed(self) -> bool:
        return self._closed

    def digest(self) -> Digest:
        """The digest of the bytes written so far, as the daemon computed it."""
        return Digest.parse(self._digest)

    def status(self) -> Status:
        """The ingest's status: offset and times from the daemon's writer, as a STAT answers.

        The total and expected digest are the ones the ingest recorded. A
        writer opened with both knows them: the store records exactly these
        or refuses the resume. Otherwise a Status call reads them, as the
        wire cannot answer them on the stream: a STAT answers the stream's
        total (containerd's service does so too: 0 for a stream opened
        without one, whatever the ingest holds) and no expected digest.
        """
        self._check_open()
        answer = self._send(pb.WriteContentRequest(action=pb.STAT))
        if self._total and self._expected is not None:
            return convert.status_from_proto(
                pb.Status(
                    ref=self.ref,
                    offset=answer.offset,
                    total=self._total,
                    expected=str(self._expected),
                    started_at=answer.started_at,
                    updated_at=answer.updated_at,
                )
            )
        stored = self._store.status(self.ref)
        return dataclasses.replace(
            stored,
            offset=answer.offset,
            started_at=convert.datetime_from_proto(answer.started_at),
            updated_at=convert.datetime_from_proto(answer.updated_at),
        )

    def _open(self) -> None:
        """Open the stream with a STAT; the daemon opens the ingest."""
        requests: queue.SimpleQueue[pb.WriteContentRequest | None] = queue.SimpleQueue()
        self._requests = requests
        self._responses = self._store.write_stream(iter(requests.get, _END))
        self._send(
            pb.WriteContentRequest(
                action=pb.STAT,
                ref=self.ref,
                total=self._total,
                expected=str(self._expected or ""),
            )
        )

    def _send(self, request: pb.WriteContentRequest) -> pb.WriteContentResponse:
        """One request and its answer. A refusal ends the daemon's stream: reopen it.

        After AlreadyExists the ingest is gone and the writer stays closed,
        as the local writer's.
        """
        assert self._requests is not None
        self._requests.put(request)
        try:
            with rpc_errors():
                response: pb.WriteContentResponse = next(self._responses)
        except AlreadyExists:
            self._end()
            raise
        except StopIteration:
            self._end()
            raise FailedPrecondition(f"ingest {self.ref!r}: the daemon ended the stream") from None
        except Exception:
            if request.action == pb.STAT:
                self._end()  # never opened: nothing to keep
            else:
                self._reopen()
            raise
        self._offset = response.offset
        self._digest = response.digest
        return response

    def _reopen(self) -> None:
        """After a refused request: a fresh stream on the ingest the daemon kept."""
        self._drain()
        with contextlib.suppress(Exception):
            self._open()
            return
        self._closed = True

    def _drain(self) -> None:
        """End the request stream and wait for the daemon to let go of the ingest."""
        if self._requests is not None:
            self._requests.put(_END)
            self._requests = None
            with contextlib.suppress(Exception):
                for _ in self._responses:
                    pass

    def _end(self) -> None:
        self._drain()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"ingest {self.ref!r}: the writer is closed")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append *data* at the current offset; its length."""
        self._check_open()
        self._send(pb.WriteContentRequest(action=pb.WRITE, offset=self._offset, data=bytes(data)))
        return len(data)

    def truncate(self, size: int) -> None:
        """Restart the ingest (*size* 0); the wire cannot cut it anywhere else.

        Raises:
            Unimplemented: *size* is not 0.
        """
        self._check_open()
        if size != 0:
            raise Unimplemented(f"ingest {self.ref!r}: truncate to {size}: only 0 over the wire")
        self._send(pb.WriteContentRequest(action=pb.WRITE, offset=0))

    def commit(
        self, size: int, expected: Digest | None, labels: Mapping[str, str] | None = None
    ) -> None:
        """Verify and commit the ingest (see `ckfs.content.Writer.commit`); the writer closes."""
        self._check_open()
        if size < 0:
            raise InvalidArgument(f"ref {self.ref}: commit size {size} is negative")
        self._send(
            pb.WriteContentRequest(
                action=pb.COMMIT,
                offset=self._offset,
                total=size,
                expected=str(expected or ""),
                labels=dict(labels or {}),
            )
        )
        self._end()

    def abort(self) -> None:
        """Throw the ingest away and close the writer."""
        self._check_open()
        self._end()
        self._store.abort(self.ref)

    def close(self) -> None:
        """End the stream, keeping the ingest for a later resume; closing twice is fine."""
        if not self._closed:
            self._end()


class RemoteReader(io.RawIOBase):
    """Random access to one blob in ckfsd: `read_at` plus a file-like stream side."""

    def __init__(self, store: RemoteContentStore, dgst: Digest, size: int) -> None:
        super().__init__()
        self.digest = dgst
        self.size = size
        self._store = store
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to *n* bytes from *offset*; ``b""`` at or past the end.

        Raises:
            InvalidArgument: *offset* is negative.
            ValueError: the reader is closed.
        """
        if self.closed:
            raise ValueError(f"reader of {self.digest} is closed")
        if offset < 0:
            raise InvalidArgument(f"content {self.digest}: read at negative offset {offset}")
        n = min(n, self.size - offset)
        if n <= 0:
            return b""
        return self._store.read_range(self.digest, offset, n)

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read_at(self._pos, len(b))
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def tell(self) -> int:
        return self._pos
