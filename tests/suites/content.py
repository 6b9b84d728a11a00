"""The content store acceptance suite, after containerd's ``ContentSuite``.

`ContentStoreSuite` talks to a store only through its public surface
(writers, info/update/walk/delete, readers, statuses, abort, `write_blob`),
so it runs unchanged against the local store and, through a client adapter,
against ckfsd's Content service. Bind it by subclassing it in a test module
that provides the ``make_store`` fixture: a callable answering a store on
one fresh root per test, called again to "restart" the store on that same
root. The fixture closes what it opened.

Checks assert error classes, never messages. The first block ports
containerd's checks (Writer, UpdateStatus, CommitExists, Resume*, SmallBlob,
Labels, CommitErrorState); the rest covers what ckfs adds or relies on: ref
locks across threads, racing commits, random access, walk/delete/abort, and
`write_blob`'s resume and failure handling. How one store keeps its files
is tested beside it (``tests/test_content_local.py``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
import trio

from ckfs.content import ContentStore, Info, Status, Writer, write_blob
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, from_bytes
from ckfs.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

MEDIA_TYPE = "application/octet-stream"

#: What ``make_store`` answers: a store on the test's root, new or reopened.
StoreFactory = Callable[[], ContentStore]

ROOT_LABELS = {"containerd.io/gc.root": "2024-01-01T00:00:00Z"}

#: Bytes that break what was promised: a commit whose bytes hash to another
#: digest, a write past the promised total. containerd's suite wants
#: FailedPrecondition, which is what its gRPC service answers; the local
#: store says DataLoss (the bytes are not what was promised) and ckfsd's
#: service boundary maps it. Either is the contract; anything else is not.
BROKEN_PROMISE = (FailedPrecondition, DataLoss)

_seed = itertools.count(1)


def create_content(size: int) -> tuple[bytes, Digest]:
    """Fresh pseudo-random bytes (a different, reproducible seed per call)."""
    b = random.Random(next(_seed)).randbytes(size)
    return b, from_bytes(b)


def now() -> datetime:
    return datetime.now(UTC)


def desc_of(b: bytes, d: Digest | None = None) -> Descriptor:
    return Descriptor(MEDIA_TYPE, d or from_bytes(b), len(b))


def check_status(
    w: Writer,
    *,
    ref: str,
    offset: int,
    total: int,
    expected: Digest | None,
    digest: Digest,
    started: tuple[datetime, datetime],
    updated: tuple[datetime, datetime],
) -> None:
    st = w.status()
    assert w.digest() == digest
    assert st.ref == ref
    assert st.offset == offset == w.offset
    assert st.total == total
    assert st.expected == expected
    assert started[0] <= st.started_at <= started[1]
    assert updated[0] <= st.updated_at <= updated[1]


def check_info(
    cs: ContentStore,
    d: Digest,
    *,
    size: int,
    labels: dict[str, str] | None = None,
    created: tuple[datetime, datetime],
    updated: tuple[datetime, datetime],
) -> Info:
    info = cs.info(d)
    assert info.digest == d
    assert info.size == size
    assert created[0] <= info.created_at <= created[1]
    assert updated[0] <= info.updated_at <= updated[1]
    assert dict(info.labels) == (labels or {})
    assert from_bytes(cs.read_all(d), d.algorithm) == d
    return info


def write_chunks(w: Writer, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        assert w.write(data[i : i + chunk]) == len(data[i : i + chunk])


def ref_not_available(cs: ContentStore, ref: str) -> None:
    with pytest.raises(Unavailable):
        cs.writer(ref)


class _StreamOnly(io.RawIOBase):
    """A non-seekable source, like a network response."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        return self._src.readinto(b)


def _resume_truncate(cs: ContentStore, w: Writer, b: bytes, written: int, d: Digest) -> None:
    w.truncate(0)
    write_chunks(w, b, 1024)
    w.commit(len(b), d)


def _resume_discard(cs: ContentStore, w: Writer, b: bytes, written: int, d: Digest) -> None:
    write_chunks(w, b[written:], 1024)
    w.commit(len(b), d)


def _resume_copy_seeker(cs: ContentStore, w: Writer, b: bytes, written: int, d: Digest) -> None:
    w.close()
    assert write_blob(cs, w.ref, io.BytesIO(b), desc_of(b, d))


def _resume_copy_stream(cs: ContentStore, w: Writer, b: bytes, written: int, d: Digest) -> None:
    w.close()
    assert write_blob(cs, w.ref, _StreamOnly(b), desc_of(b, d))  # type: ignore[arg-type]


class _CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = super().readinto(b)
        self.bytes_read += n
        return n


def churn(cs: ContentStore, ref: str, *, threads: int = 4, rounds: int = 150) -> None:
    """Writers, closes and aborts racing on one *ref*; fails if two ever own it at once."""
    holders = acquired = 0
    seen_overlap = False
    guard = threading.Lock()
    unexpected: list[BaseException] = []

    def one_round(rng: random.Random) -> None:
        nonlocal holders, acquired, seen_overlap
        try:
            w = cs.writer(ref)
        except Unavailable:
            return
        with guard:
            holders += 1
            acquired += 1
            seen_overlap |= holders > 1
        w.write(b"x")
        with guard:
            holders -= 1
        if rng.random() < 0.5:
            # Over the wire the stream ends before the Abort call, and
            # another writer may take (or abort) the ref in between.
            with contextlib.suppress(Unavailable, NotFound):
                w.abort()
        else:
            w.close()
            with contextlib.suppress(Unavailable, NotFound):
                cs.abort(ref)

    def run(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(rounds):
                one_round(rng)
        except BaseException as e:  # pragma: no cover - reported below
            unexpected.append(e)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not unexpected
    assert acquired > 0, "no writer ever got the ref: the churn tested nothing"
    assert not seen_overlap


class ContentStoreSuite:
    """The checks every content store passes; subclass it and provide ``make_store``."""

    @pytest.fixture
    def cs(self, make_store: StoreFactory) -> ContentStore:
        return make_store()

    # -- containerd's ContentSuite ------------------------------------------------

    def test_writer(self, cs: ContentStore) -> None:
        """Writers with and without total/expected all commit what they wrote."""
        cases = []
        for ref, with_total, with_expected in [
            ("c1", False, False),
            ("c2", True, False),
            ("c3", False, True),
            ("c4", True, True),
        ]:
            b, d = create_content(256)
            w = cs.writer(
                ref, total=len(b) if with_total else None, expected=d if with_expected else None
            )
            cases.append((b, d, w))
        for b, d, w in cases:
            with w:
                write_chunks(w, b, 32)
                pre = now()
                w.commit(0, None, ROOT_LABELS)
                post = now()
                assert w.digest() == d
                check_info(
                    cs, d, size=256, labels=ROOT_LABELS, created=(pre, post), updated=(pre, post)
                )

    def test_update_status(self, cs: ContentStore) -> None:
        b, d = create_content(256)
        pre_start = now()
        with cs.writer("c1", total=256, expected=d) as w:
            post_start = now()
            started = (pre_start, post_start)
            check = functools.partial(
                check_status, w, ref="c1", total=256, expected=d, started=started
            )
            check(offset=0, digest=from_bytes(b""), updated=started)
            for lo, hi in [(0, 64), (64, 192), (192, 256)]:
                pre = now()
                w.write(b[lo:hi])
                post = now()
                check(offset=hi, digest=from_bytes(b[:hi]), updated=(pre, post))
                assert cs.status("c1").offset == hi
            pre = now()
            w.commit(0, None, ROOT_LABELS)
            post = now()
        check_info(cs, d, size=256, labels=ROOT_LABELS, created=(pre, post), updated=(pre, post))

    def test_commit_exists(self, cs: ContentStore) -> None:
        b, d = create_content(256)
        assert write_blob(cs, "c1", io.BytesIO(b), desc_of(b, d))
        for i, expected in enumerate([d, None]):
            with cs.writer(f"c1-commitexists-{i}") as w:
                w.write(b)
                with pytest.raises(AlreadyExists):
                    w.commit(len(b), expected)
        assert cs.list_statuses() == []

    def test_resume(self, cs: ContentStore) -> None:
        ref = "cb"
        b, d = create_content(256)
        first, second = b[:128], b[128:]
        pre_start = now()
        w1 = cs.writer(ref, total=256, expected=d)
        post_start = now()
        pre_update = post_start
        w1.write(first)
        post_update = now()
        started = (pre_start, post_start)
        check_status(
            w1,
            ref=ref,
            offset=128,
            total=256,
            expected=d,
            digest=from_bytes(first),
            started=started,
            updated=(pre_update, post_update),
        )
        w1.close()

        with cs.writer(ref, total=256, expected=d) as w2:
            # Consistent with what the first writer saw before closing.
            check_status(
                w2,
                ref=ref,
                offset=128,
                total=256,
                expected=d,
                digest=from_bytes(first),
                started=started,
                updated=(pre_update, post_update),
            )
            pre_update = now()
            w2.write(second)
            post_update = now()
            check_status(
                w2,
                ref=ref,
                offset=256,
                total=256,
                expected=d,
                digest=d,
                started=started,
                updated=(pre_update, post_update),
            )
            pre = now()
            w2.commit(0, None)
            post = now()
        check_info(cs, d, size=256, created=(pre, post), updated=(pre, post))

    @pytest.mark.parametrize(
        "resume",
        [_resume_truncate, _resume_discard, _resume_copy_seeker, _resume_copy_stream],
        ids=["ResumeTruncate", "ResumeDiscard", "ResumeCopySeeker", "ResumeCopy"],
    )
    def test_resume_variants(
        self, cs: ContentStore, resume: Callable[[ContentStore, Writer, bytes, int, Digest], None]
    ) -> None:
        for i, size in enumerate([500, 5000, 50000]):
            for j, fraction in enumerate([0.0, 0.1, 0.5, 0.9, 1.0]):
                b, d = create_content(size)
                limit = int(size * fraction)
                ref = f"ref-{i}-{j}"
                with cs.writer(ref, total=size, expected=d) as w:
                    w.write(b[:limit])
                w = cs.writer(ref, total=size, expected=d)
                try:
                    assert w.status().offset == limit
                    assert w.digest() == from_bytes(b[:limit])
                    pre = now()
                    resume(cs, w, b, limit, d)
                    post = now()
                finally:
                    w.close()
                check_info(cs, d, size=size, created=(pre, post), updated=(pre, post))
                assert cs.read_all(d) == b
        assert cs.list_statuses() == []

    def test_small_blob(self, cs: ContentStore) -> None:
        blob = b"foobar"
        d = from_bytes(blob)
        with cs.writer("small", total=len(blob), expected=d) as w:
            w.write(blob)
            w.commit(len(blob), d)
        with cs.reader(d) as r:
            assert r.size == len(blob)
            assert r.read_at(0, len(blob) + 1) == blob
            assert r.read(len(blob) + 1) == blob
        assert from_bytes(cs.read_all(d)) == d

    def test_labels(self, cs: ContentStore) -> None:
        b, d = create_content(256)
        labels = {"k1": "v1", "k2": "v2", **ROOT_LABELS}
        with cs.writer("c1-checklabels", total=256, expected=d) as w:
            w.write(b)
            pre_c = now()
            w.commit(0, None, labels)
            post_c = now()
        info = check_info(
            cs, d, size=256, labels=labels, created=(pre_c, post_c), updated=(pre_c, post_c)
        )

        labels = {"k1": "newvalue", "k3": "v3", **ROOT_LABELS}
        pre = now()
        got = cs.update(Info(d, info.size, info.created_at, info.updated_at, labels))
        post = now()
        assert dict(got.labels) == labels
        check_info(cs, d, size=256, labels=labels, created=(pre_c, post_c), updated=(pre, post))

        # Only the named keys change: k3 (absent from info) goes, k1 is reset.
        pre = now()
        cs.update(
            Info(d, 256, info.created_at, info.updated_at, {"k1": "v1", **ROOT_LABELS}),
            ["labels.k3", "labels.k1"],
        )
        post = now()
        check_info(
            cs,
            d,
            size=256,
            labels={"k1": "v1", **ROOT_LABELS},
            created=(pre_c, post_c),
            updated=(pre, post),
        )

        # An empty value deletes; "labels" replaces the whole set.
        cs.update(Info(d, 256, info.created_at, info.updated_at, {"k1": ""}), ["labels.k1"])
        assert dict(cs.info(d).labels) == ROOT_LABELS
        cs.update(Info(d, 256, info.created_at, info.updated_at, {"x": "y", "z": ""}), ["labels"])
        assert dict(cs.info(d).labels) == {"x": "y"}

        with pytest.raises(InvalidArgument):
            cs.update(info, ["size"])
        with pytest.raises(InvalidArgument):
            cs.update(info, ["labels."])
        with pytest.raises(InvalidArgument):
            cs.update(Info(d, 256, info.created_at, info.updated_at, {"k": "v" * 5000}))
        _, missing = create_content(10)
        with pytest.raises(NotFound):
            cs.update(Info(missing, 10, info.created_at, info.updated_at, {"a": "b"}))

    def test_commit_error_state(self, cs: ContentStore) -> None:
        c1, d1 = create_content(256)
        _, d2 = create_content(256)
        assert write_blob(cs, "c1", io.BytesIO(c1), desc_of(c1, d1))
        ref = "c1-commiterror-state"

        # Exists, with digest.
        w = cs.writer(ref)
        w.write(c1)
        ref_not_available(cs, ref)
        with pytest.raises(AlreadyExists):
            w.commit(len(c1), d1)
        w.close()

        # Exists, without digest (the ingest was discarded: this one starts empty).
        w = cs.writer(ref)
        assert w.offset == 0
        ref_not_available(cs, ref)
        w.write(c1)
        with pytest.raises(AlreadyExists):
            w.commit(len(c1), None)
        w.close()

        # Wrong digest: the ingest survives.
        w = cs.writer(ref)
        ref_not_available(cs, ref)
        w.write(c1 + b"more")
        with pytest.raises(BROKEN_PROMISE):
            w.commit(len(c1) + 4, d2)
        w.close()

        # Wrong size: the ingest survives.
        w = cs.writer(ref)
        assert w.offset == len(c1) + 4
        ref_not_available(cs, ref)
        with pytest.raises(FailedPrecondition):
            w.commit(len(c1), None)
        w.close()

        # Now it commits.
        w = cs.writer(ref)
        ref_not_available(cs, ref)
        w.commit(len(c1) + 4, None)
        w.close()
        assert cs.exists(from_bytes(c1 + b"more"))

        # A new ingest under the same ref; committing c1 again already exists.
        w = cs.writer(ref)
        assert w.offset == 0
        w.write(c1)
        ref_not_available(cs, ref)
        with pytest.raises(AlreadyExists):
            w.commit(len(c1), d1)
        w.close()

        w = cs.writer(ref)
        ref_not_available(cs, ref)
        w.close()
        w = cs.writer(ref)
        w.close()

    def test_commit_size_must_equal_what_was_written(self, cs: ContentStore) -> None:
        """Without a digest the size is the only check: larger and smaller are both refused."""
        b, d = create_content(256)
        with cs.writer("size") as w:
            w.write(b)
            for wrong in (len(b) + 1, 2 * len(b), len(b) - 1, 1):
                with pytest.raises(FailedPrecondition):
                    w.commit(wrong, None)
                assert not w.closed and cs.status("size").offset == len(b)
            assert list(cs.walk()) == []
            w.commit(len(b), None)
        assert cs.read_all(d) == b

    def test_ingest_never_grows_past_its_total(self, cs: ContentStore) -> None:
        """A source sending more than promised is refused before the extra bytes land."""
        b, d = create_content(1000)
        with cs.writer("bounded", total=1000, expected=d) as w:
            w.write(b[:600])
            with pytest.raises(BROKEN_PROMISE):
                w.write(b[600:] + b"x")
            assert w.offset == 600 and cs.status("bounded").offset == 600
            assert w.digest() == from_bytes(b[:600])
            w.write(b[600:])
            with pytest.raises(BROKEN_PROMISE):
                w.write(b"x")
            w.commit(1000, d)
        # A writer resuming without restating the total keeps the stored one, and its bound.
        with cs.writer("bounded2", total=10) as w:
            w.write(b"0123456789")
        with cs.writer("bounded2") as w, pytest.raises(BROKEN_PROMISE):
            w.write(b"!")
        assert cs.status("bounded2").offset == 10

    # -- locks and races -----------------------------------------------------

    def test_ref_locked_across_threads(self, cs: ContentStore) -> None:
        holding = threading.Event()
        done = threading.Event()
        errors: list[BaseException] = []

        def hold() -> None:
            try:
                with cs.writer("shared") as w:
                    w.write(b"abc")
                    holding.set()
                    done.wait(10)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
                holding.set()

        t = threading.Thread(target=hold)
        t.start()
        try:
            assert holding.wait(10)
            with pytest.raises(Unavailable):
                cs.writer("shared")
            with pytest.raises(Unavailable):
                cs.abort("shared")
            # Another ref is independent.
            with cs.writer("other"):
                pass
        finally:
            done.set()
            t.join()
        assert not errors
        with cs.writer("shared") as w:
            assert w.offset == 3

    def test_two_refs_same_digest(self, cs: ContentStore) -> None:
        b, d = create_content(4096)
        w1 = cs.writer("ref-a")
        w2 = cs.writer("ref-b")
        w1.write(b)
        w2.write(b)
        w1.commit(len(b), d)
        with pytest.raises(AlreadyExists):
            w2.commit(len(b), d)
        w1.close()
        w2.close()
        assert [i.digest for i in cs.walk()] == [d]
        assert cs.list_statuses() == []
        # And once present, opening a writer that expects it short-circuits.
        with pytest.raises(AlreadyExists):
            cs.writer("ref-c", expected=d)
        with pytest.raises(NotFound):
            cs.status("ref-c")

    async def test_write_blob_race_in_threads(self, cs: ContentStore) -> None:
        """Many workers fetching the same blob under different refs: one writes it."""
        b, d = create_content(3 << 20)
        results: list[bool] = []

        async def one(i: int) -> None:
            results.append(
                await trio.to_thread.run_sync(
                    write_blob, cs, f"race-{i}", io.BytesIO(b), desc_of(b, d)
                )
            )

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(one, i)
        assert sorted(results) == [False] * 5 + [True]
        assert cs.read_all(d) == b
        assert cs.list_statuses() == []

    # -- reading -------------------------------------------------------------

    def test_read_at_random_access(self, cs: ContentStore) -> None:
        b, d = create_content((1 << 20) + 12345)
        assert write_blob(cs, "ra", io.BytesIO(b), desc_of(b, d))
        rng = random.Random(7)
        with cs.reader(d) as r:
            assert r.size == len(b)
            for _ in range(200):
                off = rng.randrange(len(b))
                n = rng.randrange(1, 300_000)
                assert r.read_at(off, n) == b[off : off + n]
            assert r.read_at(len(b), 10) == b""
            assert r.read_at(len(b) - 3, 10) == b[-3:]
            with pytest.raises(InvalidArgument):
                r.read_at(-1, 1)
            # The stream side: position independent of read_at.
            assert r.read(10) == b[:10]
            r.seek(100)
            assert r.tell() == 100
            assert r.read(5) == b[100:105]
            r.seek(-4, os.SEEK_END)
            assert r.read() == b[-4:]
            r.seek(0)
            assert io.BufferedReader(r).read() == b
        with pytest.raises(ValueError):
            r.read_at(0, 1)
        with pytest.raises(NotFound):
            cs.reader(create_content(1)[1])

    def test_read_all_limit(self, cs: ContentStore) -> None:
        b, d = create_content(1000)
        assert write_blob(cs, "m", io.BytesIO(b), desc_of(b, d))
        assert cs.read_all(d, limit=1000) == b
        with pytest.raises(InvalidArgument):
            cs.read_all(d, limit=999)
        with pytest.raises(NotFound):
            cs.read_all(create_content(1)[1])

    def test_no_blob_visible_before_commit(self, cs: ContentStore) -> None:
        b, d = create_content(2048)
        with cs.writer("pending", total=len(b), expected=d) as w:
            w.write(b)
            assert not cs.exists(d)
            with pytest.raises(NotFound):
                cs.info(d)
            with pytest.raises(NotFound):
                cs.reader(d)
            assert list(cs.walk()) == []
            w.commit(len(b), d)
        assert cs.exists(d)

    # -- store operations ----------------------------------------------------

    def test_delete(self, cs: ContentStore) -> None:
        b, d = create_content(100)
        with pytest.raises(NotFound):
            cs.delete(d)
        assert write_blob(cs, "del", io.BytesIO(b), desc_of(b, d), labels={"a": "b"})
        assert dict(cs.info(d).labels) == {"a": "b"}
        cs.delete(d)
        assert not cs.exists(d)
        with pytest.raises(NotFound):
            cs.info(d)
        with pytest.raises(NotFound):
            cs.delete(d)
        # Its labels went with it.
        assert write_blob(cs, "del", io.BytesIO(b), desc_of(b, d))
        assert dict(cs.info(d).labels) == {}

    def test_walk(self, cs: ContentStore) -> None:
        blobs = [create_content(n) for n in (10, 20, 30)]
        for i, (b, d) in enumerate(blobs):
            write_blob(cs, f"w{i}", io.BytesIO(b), desc_of(b, d), labels={"idx": str(i)})
        infos = list(cs.walk())
        assert [i.digest for i in infos] == sorted(d for _, d in blobs)
        assert {i.digest: i.size for i in infos} == {d: len(b) for b, d in blobs}
        assert {i.digest: dict(i.labels) for i in infos} == {
            d: {"idx": str(i)} for i, (_, d) in enumerate(blobs)
        }

    def test_walk_filters(self, cs: ContentStore) -> None:
        blobs = [create_content(n) for n in (10, 20, 30)]
        for i, (b, d) in enumerate(blobs):
            write_blob(
                cs, f"w{i}", io.BytesIO(b), desc_of(b, d), labels={"idx": str(i), "x.y": "z"}
            )

        def digests(*filters: str) -> set[Digest]:
            return {i.digest for i in cs.walk(list(filters))}

        (_, d0), (_, d1), (_, d2) = blobs
        assert digests(f"digest=={d1}") == {d1}
        assert digests("labels.idx==2") == {d2}
        assert digests("labels.idx==0", "labels.idx==2") == {d0, d2}
        assert digests("size==20") == {d1}
        assert digests('labels."x.y"==z') == {d0, d1, d2}
        assert digests("labels.nope") == set()
        with pytest.raises(InvalidArgument):
            cs.walk(["labels.idx=="])

    def test_status_and_abort(self, cs: ContentStore) -> None:
        with pytest.raises(NotFound):
            cs.status("nope")
        with pytest.raises(NotFound):
            cs.abort("nope")
        w = cs.writer("a1", total=10)
        w.write(b"12345")
        with cs.writer("a2"):
            pass
        assert [s.ref for s in cs.list_statuses()] == ["a1", "a2"]
        st = cs.status("a1")
        assert isinstance(st, Status)
        assert (st.offset, st.total, st.expected) == (5, 10, None)
        with pytest.raises(Unavailable):
            cs.abort("a1")
        w.close()
        cs.abort("a1")
        with pytest.raises(NotFound):
            cs.status("a1")
        with pytest.raises(NotFound):
            cs.abort("a1")
        assert [s.ref for s in cs.list_statuses()] == ["a2"]
        with cs.writer("a1") as w:
            assert w.offset == 0  # a fresh ingest after abort

    def test_list_statuses_filters(self, cs: ContentStore) -> None:
        for ref in ("layer-1", "layer-2", "config"):
            with cs.writer(ref):
                pass
        assert [s.ref for s in cs.list_statuses(["ref==config"])] == ["config"]
        assert [s.ref for s in cs.list_statuses(["ref~=^layer-"])] == ["layer-1", "layer-2"]

    def test_writer_abort(self, cs: ContentStore) -> None:
        w = cs.writer("wa")
        w.write(b"abc")
        w.abort()
        assert w.closed
        with pytest.raises(NotFound):
            cs.status("wa")
        with pytest.raises(FailedPrecondition):
            w.write(b"x")
        with pytest.raises(FailedPrecondition):
            w.abort()
        w.close()  # idempotent

    def test_truncate_and_algorithms(self, cs: ContentStore) -> None:
        b, d = create_content(10_000)
        with cs.writer("t") as w:
            w.write(b"wrong bytes first")
            w.truncate(0)  # a restart; only the local store cuts anywhere else
            assert w.offset == 0
            w.write(b)
            # Committing against a sha512 digest rehashes with sha512.
            d512 = from_bytes(b, "sha512")
            w.commit(len(b), d512)
        assert cs.read_all(d512) == b
        assert not cs.exists(d)
        assert cs.info(d512).size == len(b)

        c, c512 = b"sha512 from the start", from_bytes(b"sha512 from the start", "sha512")
        with cs.writer("t512", expected=c512) as w:
            w.write(c)
            assert w.digest() == c512
            w.commit(0, c512)

    def test_resume_conflicts(self, cs: ContentStore) -> None:
        b, d = create_content(100)
        with cs.writer("rc", total=100, expected=d) as w:
            w.write(b[:10])
        with pytest.raises(FailedPrecondition):
            cs.writer("rc", total=200)
        with pytest.raises(FailedPrecondition):
            cs.writer("rc", expected=create_content(5)[1])
        with cs.writer("rc") as w:  # no claims: resumes, keeps the stored ones
            assert w.status().total == 100
            assert w.status().expected == d

    def test_invalid_arguments(self, cs: ContentStore) -> None:
        with pytest.raises(InvalidArgument):
            cs.writer("")
        with pytest.raises(InvalidArgument):
            cs.writer("x", total=-1)
        with pytest.raises(InvalidArgument):
            cs.info("sha256:../../etc/passwd")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument), cs.writer("labels") as w:
            w.write(b"x")
            w.commit(1, None, {"": "v"})

    def test_labels_persist_across_store_instances(self, make_store: StoreFactory) -> None:
        cs1 = make_store()
        b, d = create_content(64)
        assert write_blob(cs1, "p", io.BytesIO(b), desc_of(b, d), labels={"k": "v"})
        cs2 = make_store()
        assert dict(cs2.info(d).labels) == {"k": "v"}

    # -- write_blob ----------------------------------------------------------

    def test_write_blob_resumes_from_offset(self, cs: ContentStore) -> None:
        b, d = create_content(3 << 20)
        with cs.writer("wb", total=len(b), expected=d) as w:
            w.write(b[:1_000_000])
        src = _CountingReader(b)
        assert write_blob(cs, "wb", src, desc_of(b, d), labels={"l": "1"})
        assert src.bytes_read == len(b) - 1_000_000
        assert cs.read_all(d) == b
        assert dict(cs.info(d).labels) == {"l": "1"}
        assert write_blob(cs, "wb", io.BytesIO(b), desc_of(b, d)) is False
        with pytest.raises(NotFound):
            cs.status("wb")

    @pytest.mark.parametrize(
        "mangle",
        [
            lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # same size, wrong digest
            lambda b: b[:-10],  # short
            lambda b: b + b"extra",  # long
        ],
        ids=["wrong-digest", "short", "long"],
    )
    def test_write_blob_wrong_bytes(
        self, cs: ContentStore, mangle: Callable[[bytes], bytes]
    ) -> None:
        b, d = create_content(10_000)
        with pytest.raises(DataLoss) as excinfo:
            write_blob(cs, "bad", io.BytesIO(mangle(b)), desc_of(b, d))
        assert d in str(excinfo.value)
        assert not cs.exists(d)
        assert list(cs.walk()) == []
        with pytest.raises(NotFound):
            cs.status("bad")
        assert cs.list_statuses() == []

    def test_write_blob_keeps_ingest_on_source_error(self, cs: ContentStore) -> None:
        b, d = create_content(3 << 20)

        class Broken(io.RawIOBase):
            def __init__(self) -> None:
                self.pos = 0

            def readable(self) -> bool:
                return True

            def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
                if self.pos >= 2 << 20:
                    raise ConnectionError("connection reset")
                n = min(len(buf), len(b) - self.pos)
                buf[:n] = b[self.pos : self.pos + n]
                self.pos += n
                return n

        with pytest.raises(ConnectionError):
            write_blob(cs, "flaky", Broken(), desc_of(b, d))  # type: ignore[arg-type]
        assert cs.status("flaky").offset == 2 << 20
        assert write_blob(cs, "flaky", io.BytesIO(b), desc_of(b, d))
        assert cs.read_all(d) == b

    def test_writer_context_and_repr(self, cs: ContentStore) -> None:
        with cs.writer("cm") as w:
            assert "cm" in repr(w)
        assert w.closed
        w.close()  # idempotent
        assert cs.status("cm").offset == 0

    def test_lock_exclusive_under_churn(self, cs: ContentStore) -> None:
        """Writers, closes and aborts racing on one ref never yield two owners."""
        churn(cs, "churn")
