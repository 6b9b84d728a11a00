"""LayerReader: lazy reads of eStargz-like and tar layers, verified and cached.

The blobs are built here from real gzip members and real tar streams, the
indexes by the real `IndexWriter`; the blob source is a real file
(`LocalBlob`), wrapped by `Probe` to count, hold, fail or corrupt the ranges
the reader asks for.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ckfs.digest import from_bytes
from ckfs.errors import (
    CkfsError,
    DataLoss,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from ckfs.layerindex import reader as reader_module
from ckfs.layerindex.cache import HEADER, ChunkCache
from ckfs.layerindex.model import Chunk
from ckfs.layerindex.reader import COALESCE_GAP, LayerReader, LocalBlob
from tests.chunkedblobs import (
    CHUNK,
    Layer,
    build_estargz,
    build_gzip,
    build_tar,
    content,
    gzip_member,
    hand_made,
)


class Probe:
    """A BlobSource in front of a real one: counts the ranges asked for,
    and can hold them (``gate``), fail them (``fail``) or flip a byte in
    what they return (``flip``: offset into the range).
    """

    def __init__(self, inner: LocalBlob) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int]] = []
        self.gate: trio.Event | None = None
        self.fail: CkfsError | None = None
        self.flip: int | None = None

    @property
    def size(self) -> int:
        return self.inner.size

    async def read_range(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        data = await self.inner.read_range(offset, length)
        if self.flip is not None:
            i = min(self.flip, len(data) - 1)
            data = data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1 :]
        return data


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache", memory_bytes=0)


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) until *condition* holds: tasks may be in worker threads,
    which `trio.testing.wait_all_tasks_blocked` counts as blocked."""
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.001)


def reader_for(layer: Layer, cache: ChunkCache) -> tuple[LayerReader, Probe]:
    probe = Probe(LocalBlob(layer.blob))
    return LayerReader(layer.index, probe, cache), probe


def ranges(size: int, seed: int) -> Iterator[tuple[int, int]]:
    rnd = random.Random(seed)
    yield 0, size
    yield size - 1, 10
    yield size, 10
    for _ in range(30):
        yield rnd.randrange(size), rnd.randrange(1, 3 * CHUNK)


# -- eStargz --------------------------------------------------------------


async def test_estargz_reads_match_and_second_read_is_a_hit(
    tmp_path: Path, cache: ChunkCache
) -> None:
    files = {"a": content(5 * CHUNK + 123, 1), "b": content(CHUNK, 2), "c": content(10, 3)}
    layer = build_estargz(tmp_path, files, shared={"s1": b"small one", "s2": b"small two!"})
    reader, probe = reader_for(layer, cache)
    for name, data in layer.files.items():
        for off, n in ranges(len(data), seed=len(name)):
            assert await reader.read(layer.node(name), off, n) == data[off : off + n], (name, off)
    fetched = len(probe.calls)
    stats = reader.statistics()
    assert stats["misses"] == 6 + 1 + 1 + 2  # every chunk fetched once
    assert stats["fetched_bytes"] == sum(n for _, n in probe.calls)
    for name, data in layer.files.items():
        assert await reader.read(layer.node(name), 0, len(data)) == data
    assert len(probe.calls) == fetched  # all from the cache now
    assert reader.statistics()["hits"] > stats["hits"]


async def test_cache_hits_are_not_hashed_with_sha256_again(
    tmp_path: Path, cache: ChunkCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = content(3 * CHUNK, 4)
    layer = build_estargz(tmp_path, {"f": data})
    verified: list[object] = []
    real = reader_module._verify

    def counting(*args: Any) -> None:
        verified.append(args)
        real(*args)

    monkeypatch.setattr(reader_module, "_verify", counting)
    first, _ = reader_for(layer, cache)
    assert await first.read(layer.node("f"), 0, len(data)) == data
    assert len(verified) == 3
    second, probe = reader_for(layer, cache)  # a fresh reader: only the disk cache
    assert await second.read(layer.node("f"), 0, len(data)) == data
    assert len(verified) == 3 and probe.calls == []
    assert second.statistics()["hits"] == 3


async def test_neighbouring_chunks_are_one_request(tmp_path: Path, cache: ChunkCache) -> None:
    data = content(6 * CHUNK, 5)
    layer = build_estargz(tmp_path, {"f": data})
    reader, probe = reader_for(layer, cache)
    assert (
        await reader.read(layer.node("f"), CHUNK // 2, 3 * CHUNK)
        == data[CHUNK // 2 : CHUNK // 2 + 3 * CHUNK]
    )
    members = layer.members["f"]
    assert probe.calls == [(members[0][0], sum(n for _, n in members[:4]))]
    # Chunks 0-3 are cached; reading 2-5 fetches 4 and 5 only, again as one.
    assert await reader.read(layer.node("f"), 2 * CHUNK, 4 * CHUNK) == data[2 * CHUNK :]
    assert probe.calls[1] == (members[4][0], members[4][1] + members[5][1])


async def test_far_apart_chunks_are_separate_requests(tmp_path: Path, cache: ChunkCache) -> None:
    files = {"a": content(CHUNK, 6), "big": content(CHUNK, 7) * 8, "b": content(CHUNK, 8)}
    layer = build_estargz(tmp_path, files, level=0)  # stored: "big" keeps its size
    reader, probe = reader_for(layer, cache)
    await reader.read(layer.node("a"), 0, CHUNK)
    await reader.read(layer.node("b"), 0, CHUNK)
    assert len(probe.calls) == 2
    gap = layer.members["b"][0][0] - sum(layer.members["a"][0])
    assert gap > COALESCE_GAP


async def test_unknown_member_sizes_use_next_chunk_and_a_bound(
    tmp_path: Path, cache: ChunkCache
) -> None:
    data = content(3 * CHUNK + 7, 9)
    layer = build_estargz(tmp_path, {"f": data}, sizes_known=False)
    reader, probe = reader_for(layer, cache)
    assert await reader.read(layer.node("f"), 0, len(data)) == data
    # One request: chunk 0..2 end at the next member; the last at its bound.
    assert len(probe.calls) == 1 and probe.calls[0][0] == layer.members["f"][0][0]


async def test_member_longer_than_its_bound_is_fetched_again(
    tmp_path: Path, cache: ChunkCache
) -> None:
    """A gzip header with a 4 KiB file name: the bound is too short; the
    reader fetches the member again with a longer window and serves it."""
    data = b"tiny"
    layer = build_estargz(tmp_path, {"f": data}, sizes_known=False, name=b"n" * 4096)
    reader, probe = reader_for(layer, cache)
    assert await reader.read(layer.node("f"), 0, 4) == data
    assert len(probe.calls) >= 2


async def test_member_past_every_bound_is_data_loss(
    tmp_path: Path, cache: ChunkCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window stops growing at MAX_PIECE: the read fails, it does not loop."""
    layer = build_estargz(tmp_path, {"f": b"tiny"}, sizes_known=False, name=b"n" * 8192)
    monkeypatch.setattr(reader_module, "MAX_PIECE", 4096)
    reader, probe = reader_for(layer, cache)
    with pytest.raises(DataLoss, match="ends before its chunk"):
        await reader.read(layer.node("f"), 0, 4)
    assert probe.calls[-1][1] == 4096


async def test_unwritable_cache_still_serves(tmp_path: Path, cache: ChunkCache) -> None:
    """A cache entry that cannot be read or replaced (a directory in its
    place) is a miss, and the read is served from the fetch."""
    data = content(CHUNK, 34)
    layer = build_estargz(tmp_path, {"f": data})
    reader, probe = reader_for(layer, cache)
    assert await reader.read(layer.node("f"), 0, CHUNK) == data
    (layer_dir,) = (tmp_path / "cache").iterdir()
    (chunk_file,) = layer_dir.iterdir()
    chunk_file.unlink()
    (chunk_file / "sub").mkdir(parents=True)
    assert await reader.read(layer.node("f"), 0, CHUNK) == data
    assert len(probe.calls) == 2


async def test_wrong_bytes_from_the_source_fail_and_cache_nothing(
    tmp_path: Path, cache: ChunkCache
) -> None:
    data = content(2 * CHUNK, 10)
    layer = build_estargz(tmp_path, {"f": data}, level=0)  # stored: a flipped byte inflates
    reader, probe = reader_for(layer, cache)
    probe.flip = 40
    with pytest.raises(DataLoss):  # the member's CRC or the chunk's digest
        await reader.read(layer.node("f"), 0, 10)
    assert cache.usage().files == 0
    assert reader.statistics()["errors"] == 1
    probe.flip = None
    assert await reader.read(layer.node("f"), 0, len(data)) == data


async def test_garbage_instead_of_a_gzip_member_is_data_loss(
    tmp_path: Path, cache: ChunkCache
) -> None:
    layer = build_estargz(tmp_path, {"f": content(CHUNK, 11)})
    reader, probe = reader_for(layer, cache)
    probe.flip = 0  # the gzip magic
    with pytest.raises(DataLoss, match="does not inflate"):
        await reader.read(layer.node("f"), 0, 10)
    assert cache.usage().files == 0


async def test_index_digest_that_does_not_match_is_data_loss(
    tmp_path: Path, cache: ChunkCache
) -> None:
    data = content(100, 12)
    blob = gzip_member(data)
    wrong = from_bytes(b"something else")
    layer = hand_made(tmp_path, blob, {"f": (100, [Chunk(0, 100, 0, 0, wrong, len(blob))])})
    reader, _ = reader_for(layer, cache)
    with pytest.raises(DataLoss):
        await reader.read(layer.node("f"), 0, 100)
    assert cache.usage().files == 0


async def test_member_shorter_than_its_chunk_is_data_loss(
    tmp_path: Path, cache: ChunkCache
) -> None:
    blob = gzip_member(b"only eleven") + gzip_member(b"next")
    digest = from_bytes(b"only eleven" + b"\0" * 9)
    layer = hand_made(tmp_path, blob, {"f": (20, [Chunk(0, 20, 0, 0, digest)])})
    reader, _ = reader_for(layer, cache)
    with pytest.raises(DataLoss, match="holds 11 bytes"):
        await reader.read(layer.node("f"), 0, 20)


async def test_registry_trouble_fails_that_read_only(tmp_path: Path, cache: ChunkCache) -> None:
    files = {"a": content(CHUNK, 13), "b": content(CHUNK, 14)}
    layer = build_estargz(tmp_path, files)
    reader, probe = reader_for(layer, cache)
    assert await reader.read(layer.node("a"), 0, CHUNK) == files["a"]
    probe.fail = Unavailable("registry down")
    with pytest.raises(Unavailable):
        await reader.read(layer.node("b"), 0, 10)
    assert await reader.read(layer.node("a"), 5, 10) == files["a"][5:15]  # cached: still fine
    probe.fail = None
    assert await reader.read(layer.node("b"), 0, CHUNK) == files["b"]


async def test_corrupted_cache_file_is_refetched(tmp_path: Path, cache: ChunkCache) -> None:
    data = content(CHUNK, 15)
    layer = build_estargz(tmp_path, {"f": data})
    reader, probe = reader_for(layer, cache)
    assert await reader.read(layer.node("f"), 0, CHUNK) == data
    (layer_dir,) = (tmp_path / "cache").iterdir()
    (chunk_file,) = layer_dir.iterdir()
    raw = bytearray(chunk_file.read_bytes())
    raw[-100] ^= 1
    chunk_file.write_bytes(raw)
    assert await reader.read(layer.node("f"), 0, CHUNK) == data
    assert len(probe.calls) == 2
    assert cache.statistics()["corrupt"] == 1
    assert await reader.read(layer.node("f"), 0, CHUNK) == data  # the refetched copy is good
    assert len(probe.calls) == 2


async def test_evicted_chunks_are_fetched_again(tmp_path: Path) -> None:
    data = content(3 * CHUNK, 16)
    layer = build_estargz(tmp_path, {"f": data})
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0, max_bytes=HEADER + CHUNK)
    reader, probe = reader_for(layer, cache)
    assert await reader.read(layer.node("f"), 0, 3 * CHUNK) == data  # one request
    (kept,) = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # the last chunk
    assert cache.statistics()["evicted"] == 2
    assert await reader.read(layer.node("f"), 2 * CHUNK, CHUNK) == data[2 * CHUNK :]
    assert len(probe.calls) == 1
    assert await reader.read(layer.node("f"), 0, CHUNK) == data[:CHUNK]  # evicted: refetched
    assert len(probe.calls) == 2 and reader.statistics()["misses"] == 4
    assert not kept.exists()  # and the bound holds


async def test_concurrent_reads_of_one_chunk_fetch_it_once(
    tmp_path: Path, cache: ChunkCache
) -> None:
    data = content(2 * CHUNK, 16)
    layer = build_estargz(tmp_path, {"f": data})
    reader, probe = reader_for(layer, cache)
    probe.gate = trio.Event()
    results: list[bytes] = []

    async def read(off: int) -> None:
        results.append(await reader.read(layer.node("f"), off, 100))

    async with trio.open_nursery() as nursery:
        for off in range(0, 1000, 100):
            nursery.start_soon(read, off)
        await until(lambda: reader.statistics()["joined"] == 9)
        probe.gate.set()
    assert len(probe.calls) == 1
    assert sorted(results) == sorted(data[o : o + 100] for o in range(0, 1000, 100))
    assert reader.statistics()["joined"] == 9


async def test_waiters_share_the_leaders_error(tmp_path: Path, cache: ChunkCache) -> None:
    layer = build_estargz(tmp_path, {"f": content(CHUNK, 17)})
    reader, probe = reader_for(layer, cache)
    probe.gate = trio.Event()
    probe.fail = Unavailable("registry down")
    errors: list[BaseException] = []

    async def read() -> None:
        try:
            await reader.read(layer.node("f"), 0, 10)
        except Unavailable as e:
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(read)
        await until(lambda: reader.statistics()["joined"] == 2)
        probe.gate.set()
    assert len(errors) == 3 and len(probe.calls) == 1


async def test_a_cancelled_leader_hands_the_fetch_to_a_waiter(
    tmp_path: Path, cache: ChunkCache
) -> None:
    data = content(CHUNK, 18)
    layer = build_estargz(tmp_path, {"f": data})
    reader, probe = reader_for(layer, cache)
    probe.gate = trio.Event()
    got: list[bytes] = []

    async def wait_and_read() -> None:
        got.append(await reader.read(layer.node("f"), 0, 10))

    async with trio.open_nursery() as nursery:
        leader = trio.CancelScope()

        async def lead() -> None:
            with leader:
                await reader.read(layer.node("f"), 0, 10)

        nursery.start_soon(lead)
        await until(lambda: len(probe.calls) == 1)
        nursery.start_soon(wait_and_read)
        await until(lambda: reader.statistics()["joined"] == 1)
        leader.cancel()
        await until(lambda: len(probe.calls) == 2)
        probe.gate.set()
    assert got == [data[:10]]
    assert len(probe.calls) == 2


async def test_reads_outside_the_file(tmp_path: Path, cache: ChunkCache) -> None:
    layer = build_estargz(tmp_path, {"f": b"0123456789"})
    reader, probe = reader_for(layer, cache)
    node = layer.node("f")
    assert await reader.read(node, 10, 5) == b""
    assert await reader.read(node, 100, 5) == b""
    assert await reader.read(node, 3, 0) == b""
    assert await reader.read(node, 8, 100) == b"89"
    with pytest.raises(InvalidArgument):
        await reader.read(node, -1, 5)
    assert len(probe.calls) == 1


async def test_chunks_beyond_piece_bound_fail_the_file(tmp_path: Path, cache: ChunkCache) -> None:
    """An inner offset no member could hold fails reads of that file, not more."""
    blob = gzip_member(b"x" * 100) + gzip_member(b"y" * 100)
    huge = Chunk(0, 100, 0, 1 << 40, from_bytes(b"x" * 100))
    good = Chunk(0, 100, len(blob) // 2, 0, from_bytes(b"y" * 100))
    layer = hand_made(tmp_path, blob, {"bad": (100, [huge]), "good": (100, [good])})
    reader, _ = reader_for(layer, cache)
    with pytest.raises(DataLoss, match="too large"):
        await reader.read(layer.node("bad"), 0, 100)
    assert await reader.read(layer.node("good"), 0, 100) == b"y" * 100


async def test_blob_size_must_match_the_index(tmp_path: Path, cache: ChunkCache) -> None:
    layer = build_estargz(tmp_path, {"f": b"abc"})
    with open(layer.blob, "ab") as f:
        f.write(b"more")
    with pytest.raises(InvalidArgument, match="its index says"):
        LayerReader(layer.index, LocalBlob(layer.blob), cache)


# -- tar ------------------------------------------------------------------


async def test_tar_reads_whole_spans_verified(tmp_path: Path, cache: ChunkCache) -> None:
    files = {"a": content(300_000, 20), "b": b"hello", "c": content(2_500_000, 21)}
    layer = build_tar(tmp_path, files, span=256 << 10)
    reader, probe = reader_for(layer, cache)
    for name, data in files.items():
        for off, n in ranges(len(data), seed=3):
            assert await reader.read(layer.node(name), off, n) == data[off : off + n]
    assert all(off % (256 << 10) == 0 for off, _ in probe.calls)
    calls = len(probe.calls)
    assert await reader.read(layer.node("c"), 0, 2_500_000) == files["c"]
    assert len(probe.calls) == calls


async def test_tar_wrong_bytes_fail(tmp_path: Path, cache: ChunkCache) -> None:
    layer = build_tar(tmp_path, {"a": content(10_000, 22)})
    reader, probe = reader_for(layer, cache)
    probe.flip = 600
    with pytest.raises(DataLoss, match="do not match"):
        await reader.read(layer.node("a"), 0, 10)
    assert cache.usage().files == 0


# -- gzip (seek index over the local blob) ---------------------------------


async def test_gzip_index_reads_inflate_from_checkpoints_and_cache(
    tmp_path: Path, cache: ChunkCache
) -> None:
    files = {"a": content(9 << 20, 40), "b": b"tiny", "c": content(300_000, 41)}
    layer = build_gzip(tmp_path, files)
    assert len(layer.index.spans()) >= 3
    reader = LayerReader(layer.index, LocalBlob(layer.blob), cache)
    for name, data in files.items():
        for off, n in ranges(len(data), seed=5):
            assert await reader.read(layer.node(name), off, n) == data[off : off + n]
    stats = reader.statistics()
    assert stats["misses"] == len(layer.index.spans())  # each span inflated once
    assert await reader.read(layer.node("a"), 0, 9 << 20) == files["a"]
    assert reader.statistics()["misses"] == stats["misses"]
    reader.close()
    assert await reader.read(layer.node("c"), 5, 5) == files["c"][5:10]  # reopens if needed


async def test_gzip_index_needs_the_local_blob(tmp_path: Path, cache: ChunkCache) -> None:
    layer = build_gzip(tmp_path, {"a": b"x"})
    with pytest.raises(Unimplemented, match="local blob"):
        LayerReader(layer.index, Probe(LocalBlob(layer.blob)), cache)


async def test_local_blob_bounds(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"0123456789")
    blob = LocalBlob(tmp_path / "b")
    assert blob.size == 10
    assert await blob.read_range(2, 3) == b"234"
    assert await blob.read_range(10, 0) == b""
    with pytest.raises(InvalidArgument):
        await blob.read_range(8, 3)
    (tmp_path / "b").write_bytes(b"01234")  # shrank under us
    with pytest.raises(DataLoss):
        await blob.read_range(2, 5)
    (tmp_path / "b").unlink()  # gone (a gc)
    with pytest.raises(NotFound, match="reading"):
        await blob.read_range(0, 1)


# -- read-ahead -----------------------------------------------------------


async def sequential_reader(
    layer: Layer, cache: ChunkCache, nursery: trio.Nursery
) -> tuple[LayerReader, Probe]:
    probe = Probe(LocalBlob(layer.blob))
    return LayerReader(layer.index, probe, cache, nursery=nursery), probe


async def test_sequential_reads_fetch_ahead_within_the_bound(
    tmp_path: Path, cache: ChunkCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader_module, "READAHEAD", 2 * CHUNK)
    data = content(6 * CHUNK, 30)
    layer = build_estargz(tmp_path, {"f": data, "g": content(CHUNK, 31)})
    node = layer.node("f")
    members = layer.members["f"]
    async with trio.open_nursery() as nursery:
        reader, probe = await sequential_reader(layer, cache, nursery)
        assert await reader.read(node, 0, 4096) == data[:4096]
        assert await reader.read(node, 4096, 4096) == data[4096:8192]  # sequential
        await until(lambda: len(probe.calls) == 2)
        assert probe.calls[1] == (members[1][0], members[1][1] + members[2][1])
        calls = len(probe.calls)
        assert await reader.read(node, 8192, 3 * CHUNK) == data[8192 : 8192 + 3 * CHUNK]
        # Chunk 3 was needed and is fetched now; read-ahead moves on to 4 and 5.
        await until(lambda: len(probe.calls) == calls + 2)
        assert await reader.read(node, 8192 + 3 * CHUNK, 6 * CHUNK) == data[8192 + 3 * CHUNK :]
        await trio.testing.wait_all_tasks_blocked()
    assert len(probe.calls) == calls + 2  # nothing past the file's end ("g" not fetched)
    fetched = sorted(probe.calls)  # every member of "f" exactly once, some coalesced
    assert fetched[0][0] == members[0][0] and sum(n for _, n in fetched) == sum(
        n for _, n in members
    )
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(fetched))


async def test_random_reads_do_not_fetch_ahead(tmp_path: Path, cache: ChunkCache) -> None:
    data = content(6 * CHUNK, 32)
    layer = build_estargz(tmp_path, {"f": data})
    node = layer.node("f")
    async with trio.open_nursery() as nursery:
        reader, probe = await sequential_reader(layer, cache, nursery)
        for off in (3 * CHUNK, 0, 5 * CHUNK + 10, CHUNK):
            assert await reader.read(node, off, 100) == data[off : off + 100]
        await trio.testing.wait_all_tasks_blocked()
    assert len(probe.calls) == 4


async def test_failed_read_ahead_leaves_the_error_to_the_read(
    tmp_path: Path, cache: ChunkCache
) -> None:
    data = content(4 * CHUNK, 33)
    layer = build_estargz(tmp_path, {"f": data})
    node = layer.node("f")
    async with trio.open_nursery() as nursery:
        reader, probe = await sequential_reader(layer, cache, nursery)
        assert await reader.read(node, 0, 100) == data[:100]
        probe.fail = Unavailable("registry down")
        assert await reader.read(node, 100, 100) == data[100:200]  # cached; starts read-ahead
        await until(lambda: reader.statistics()["errors"] == 1)
        with pytest.raises(Unavailable):
            await reader.read(node, CHUNK, 100)
        probe.fail = None
        assert await reader.read(node, CHUNK, 3 * CHUNK) == data[CHUNK:]
