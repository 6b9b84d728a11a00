"""The Content service class, called directly under trio: no server, no wire.

containerd's semantics as its clients see them: Write's stat/write/commit
actions, resuming an ingest a client left, commits that break their promise
(FAILED_PRECONDITION), malformed or oversized input (INVALID_ARGUMENT);
Read and List in bounded messages. The store itself is the content suite's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from ckfs.api.services.content.v1 import content_pb2 as pb
from ckfs.content import ContentStore
from ckfs.digest import from_bytes
from ckfs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ckfs.services.checks import LIST_BATCH, MAX_LABELS_SIZE
from ckfs.services.content import MAX_WRITE_CHUNK, READ_CHUNK, ContentService
from ckfs.state import State
from tests.test_unpack import OffLoop

DATA = b"hello, content service\n" * 100
DIGEST = str(from_bytes(DATA))
CALL = object()


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    state = State(tmp_path / "root")
    # Every store call must come from a worker thread: SQLite blocks.
    state.__dict__["content"] = cast(
        ContentStore, OffLoop(ContentStore(state.root / "content", state.db))
    )
    yield state
    state.close()


@pytest.fixture
def service(state: State) -> ContentService:
    return ContentService(state)


async def _requests(*requests: pb.WriteContentRequest) -> AsyncIterator[pb.WriteContentRequest]:
    for r in requests:
        yield r


async def write(
    service: ContentService, *requests: pb.WriteContentRequest
) -> list[pb.WriteContentResponse]:
    return [r async for r in service.Write(_requests(*requests), CALL)]


def commit(data: bytes = DATA, **fields: object) -> pb.WriteContentRequest:
    """One message that writes *data* and commits it (fields override)."""
    fields.setdefault("ref", "r")
    fields.setdefault("expected", str(from_bytes(data)))
    fields.setdefault("total", len(data))
    return pb.WriteContentRequest(action=pb.COMMIT, data=data, **fields)  # type: ignore[arg-type]


async def read(
    service: ContentService, digest: str = DIGEST, offset: int = 0, size: int = 0
) -> list[pb.ReadContentResponse]:
    request = pb.ReadContentRequest(digest=digest, offset=offset, size=size)
    return [r async for r in service.Read(request, CALL)]


async def listing(service: ContentService, *filters: str) -> list[str]:
    request = pb.ListContentRequest(filters=filters)
    return [i.digest async for r in service.List(request, CALL) for i in r.info]


async def test_one_message_write_read_delete(service: ContentService) -> None:
    labels = {"containerd.io/gc.root": "x"}
    (response,) = await write(service, commit(labels=labels))
    assert response.action == pb.COMMIT
    assert (response.offset, response.total, response.digest) == (len(DATA), len(DATA), DIGEST)
    info = (await service.Info(pb.InfoRequest(digest=DIGEST), CALL)).info
    assert (info.digest, info.size, dict(info.labels)) == (DIGEST, len(DATA), labels)
    assert info.created_at.seconds > 0
    assert await listing(service) == [DIGEST]
    assert b"".join(r.data for r in await read(service)) == DATA
    (part,) = await read(service, offset=7, size=5)
    assert (part.offset, part.data) == (7, DATA[7:12])
    await service.Delete(pb.DeleteContentRequest(digest=DIGEST), CALL)
    with pytest.raises(NotFound):
        await service.Info(pb.InfoRequest(digest=DIGEST), CALL)


async def test_write_resumes_where_a_client_left(service: ContentService) -> None:
    head, tail = DATA[:1000], DATA[1000:]
    (stat, wrote) = await write(
        service,
        pb.WriteContentRequest(action=pb.STAT, ref="r", total=len(DATA), expected=DIGEST),
        pb.WriteContentRequest(action=pb.WRITE, data=head),
    )
    assert (stat.action, stat.offset, stat.total) == (pb.STAT, 0, len(DATA))
    assert (wrote.action, wrote.offset) == (pb.WRITE, len(head))
    # The stream ended without a commit: the ingest stays, unlocked.
    status = (await service.Status(pb.StatusRequest(ref="r"), CALL)).status
    assert (status.ref, status.offset, status.total, status.expected) == (
        "r",
        1000,
        len(DATA),
        DIGEST,
    )
    listed = await service.ListStatuses(pb.ListStatusesRequest(filters=['ref=="r"']), CALL)
    assert [s.ref for s in listed.statuses] == ["r"]
    # A second client stats, writes the rest at the offset, commits.
    stat, done = await write(
        service,
        pb.WriteContentRequest(action=pb.STAT, ref="r"),
        pb.WriteContentRequest(action=pb.COMMIT, offset=1000, data=tail, expected=DIGEST),
    )
    assert stat.offset == 1000 and stat.digest == str(from_bytes(head))
    # The stream's total, not the ingest's, as containerd 1.6's service answers.
    assert stat.total == 0
    assert (done.offset, done.digest) == (len(DATA), DIGEST)
    assert await listing(service) == [DIGEST]
    with pytest.raises(NotFound):
        await service.Status(pb.StatusRequest(ref="r"), CALL)


async def test_offset_zero_restarts_and_others_are_refused(service: ContentService) -> None:
    await write(service, pb.WriteContentRequest(action=pb.WRITE, ref="r", data=b"garbage"))
    with pytest.raises(InvalidArgument, match="current offset 7"):
        await write(service, pb.WriteContentRequest(action=pb.WRITE, ref="r", offset=3, data=b"x"))
    (done,) = await write(service, commit())
    assert done.digest == DIGEST


async def test_commit_breaking_its_promise_keeps_the_ingest(service: ContentService) -> None:
    wrong = "sha256:" + "0" * 64
    with pytest.raises(FailedPrecondition, match="digest"):
        await write(service, commit(expected=wrong))
    assert (await service.Status(pb.StatusRequest(ref="r"), CALL)).status.offset == len(DATA)
    # Resumed with another total than the ingest was started for.
    with pytest.raises(FailedPrecondition, match=str(len(DATA) + 1)):
        await write(
            service,
            pb.WriteContentRequest(
                action=pb.COMMIT, ref="r", offset=len(DATA), total=len(DATA) + 1
            ),
        )
    with pytest.raises(FailedPrecondition):
        await write(service, commit(ref="t", data=DATA, total=10))  # past the promised total
    await service.Abort(pb.AbortRequest(ref="r"), CALL)
    with pytest.raises(NotFound):
        await service.Status(pb.StatusRequest(ref="r"), CALL)
    assert await listing(service) == []


async def test_expected_digest_already_present(service: ContentService) -> None:
    await write(service, commit())
    with pytest.raises(AlreadyExists):
        await write(service, commit(ref="again"))
    # Named only on a later message: the ingest is dropped all the same.
    with pytest.raises(AlreadyExists):
        await write(
            service,
            pb.WriteContentRequest(action=pb.WRITE, ref="late", data=DATA[:10]),
            pb.WriteContentRequest(action=pb.STAT, expected=DIGEST),
        )
    with pytest.raises(NotFound):
        await service.Status(pb.StatusRequest(ref="late"), CALL)


async def test_a_ref_has_one_writer(service: ContentService, state: State) -> None:
    store = cast(OffLoop, state.content).inner
    with store.writer("busy"), pytest.raises(Unavailable):  # type: ignore[attr-defined]
        await write(service, pb.WriteContentRequest(action=pb.STAT, ref="busy"))


@pytest.mark.parametrize(
    ("requests", "match"),
    [
        ([pb.WriteContentRequest(action=pb.STAT)], "must have a ref"),
        ([pb.WriteContentRequest(ref="r", expected="sha256:abc")], "invalid digest"),
        ([pb.WriteContentRequest(ref="r"), pb.WriteContentRequest(ref="other")], "names ref"),
        ([pb.WriteContentRequest(ref="r", data=b"\0" * (MAX_WRITE_CHUNK + 1))], "chunk"),
        ([pb.WriteContentRequest(ref="r", action=7)], "unknown action"),  # type: ignore[arg-type]
        ([commit(labels={f"k{i}": "v" * 4000 for i in range(20)})], "labels"),
        ([commit(labels={"k": "v" * 5000})], "label"),
    ],
)
async def test_write_refuses(
    service: ContentService, requests: list[pb.WriteContentRequest], match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        await write(service, *requests)
    assert await listing(service) == []


async def test_labels_over_the_set_limit() -> None:
    assert MAX_LABELS_SIZE < 20 * 4001  # what test_write_refuses relies on


async def test_update_labels(service: ContentService) -> None:
    await write(service, commit(labels={"a": "1", "b": "2"}))
    info = pb.Info(digest=DIGEST, labels={"a": "10", "c": "3"})
    updated = await service.Update(
        pb.UpdateRequest(info=info, update_mask=FieldMask(paths=["labels.a"])), CALL
    )
    assert dict(updated.info.labels) == {"a": "10", "b": "2"}
    replaced = await service.Update(pb.UpdateRequest(info=info), CALL)
    assert dict(replaced.info.labels) == {"a": "10", "c": "3"}
    assert (await listing(service, "labels.c==3")) == [DIGEST]
    assert (await listing(service, "labels.b==2")) == []
    with pytest.raises(InvalidArgument):
        await service.Update(
            pb.UpdateRequest(info=info, update_mask=FieldMask(paths=["size"])), CALL
        )
    with pytest.raises(InvalidArgument):
        await service.Update(pb.UpdateRequest(info=pb.Info(digest="sha256:ZZ")), CALL)


@pytest.mark.parametrize("digest", ["", "sha256:xyz", "md5:" + "0" * 32])
async def test_malformed_digests(service: ContentService, digest: str) -> None:
    with pytest.raises(InvalidArgument):
        await service.Info(pb.InfoRequest(digest=digest), CALL)
    with pytest.raises(InvalidArgument):
        await read(service, digest)
    with pytest.raises(InvalidArgument):
        await service.Delete(pb.DeleteContentRequest(digest=digest), CALL)


async def test_read_in_bounded_chunks(service: ContentService) -> None:
    big = bytes(range(256)) * (READ_CHUNK // 256 * 2 + 3)
    await write(service, commit(big))
    chunks = await read(service, str(from_bytes(big)), offset=5)
    assert [c.offset for c in chunks] == [5, 5 + READ_CHUNK, 5 + 2 * READ_CHUNK]
    assert all(len(c.data) <= READ_CHUNK for c in chunks)
    assert b"".join(c.data for c in chunks) == big[5:]
    assert await read(service, str(from_bytes(big)), offset=len(big)) == []
    with pytest.raises(InvalidArgument, match="past"):
        await read(service, str(from_bytes(big)), offset=len(big) + 1)
    with pytest.raises(NotFound):
        await read(service, "sha256:" + "1" * 64)


async def test_list_in_batches(service: ContentService, state: State) -> None:
    store = cast(OffLoop, state.content).inner
    for i in range(LIST_BATCH + 1):
        with store.writer(f"b{i}") as w:  # type: ignore[attr-defined]
            w.write(b"%d" % i)
            w.commit(0, None)
    batches = [r async for r in service.List(pb.ListContentRequest(), CALL)]
    assert [len(b.info) for b in batches] == [LIST_BATCH, 1]
    with pytest.raises(InvalidArgument):
        await listing(service, "labels.==")


async def test_list_batches_are_cut_by_label_size(service: ContentService, state: State) -> None:
    """20 blobs at the label-set limit would make one 1.2 MiB response: cut in two."""
    store = cast(OffLoop, state.content).inner
    labels = {f"l{n}": "v" * 4000 for n in range(16)}
    for i in range(20):
        with store.writer(f"b{i}") as w:  # type: ignore[attr-defined]
            w.write(b"%d" % i)
            w.commit(0, None, labels)
    batches = [r async for r in service.List(pb.ListContentRequest(), CALL)]
    assert len(batches) == 2 and sum(len(b.info) for b in batches) == 20
    assert all(b.ByteSize() < 2 << 20 for b in batches)
