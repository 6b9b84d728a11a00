"""ChunkCache: what goes in comes out intact, and what was damaged never does."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ckfs.digest import Digest, from_bytes
from ckfs.layerindex.cache import HEADER, MAGIC, CacheUsage, ChunkCache

LAYER = from_bytes(b"layer one")
OTHER = from_bytes(b"layer two")


def _disk_only(tmp_path: Path) -> ChunkCache:
    """A cache holding nothing in memory, so every get reads its file."""
    return ChunkCache(tmp_path / "cache", memory_bytes=0)


def test_round_trip_and_layout(tmp_path: Path) -> None:
    cache = _disk_only(tmp_path)
    key = ChunkCache.key("chunk", 0, 5, LAYER)
    assert cache.get(LAYER, key) is None
    cache.put(LAYER, key, b"hello")
    assert cache.get(LAYER, key) == b"hello"
    path = tmp_path / "cache" / LAYER.split(":")[1] / key
    raw = path.read_bytes()
    assert raw[:4] == MAGIC and raw[HEADER:] == b"hello"
    assert os.listdir(path.parent) == [key]  # no temporary file left behind
    assert cache.statistics() | {"memory_held": 0} == {
        "hits": 1,
        "memory_hits": 0,
        "misses": 1,
        "corrupt": 0,
        "writes": 1,
        "evicted": 0,
        "memory_held": 0,
    }


def test_key_depends_on_every_part() -> None:
    key = ChunkCache.key("chunk", 1, 2)
    assert len(key) == 32 and int(key, 16) >= 0
    assert key == ChunkCache.key("chunk", 1, 2)
    assert len({key, ChunkCache.key("chunk", 12), ChunkCache.key("chunk", 1, 3)}) == 3


def test_empty_payload(tmp_path: Path) -> None:
    cache = _disk_only(tmp_path)
    cache.put(LAYER, "k", b"")
    assert cache.get(LAYER, "k") == b""


def _corrupt_flip(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 1])


def _corrupt_truncate(raw: bytes) -> bytes:
    return raw[:-1]


def _corrupt_extend(raw: bytes) -> bytes:
    return raw + b"x"


def _corrupt_magic(raw: bytes) -> bytes:
    return b"XXXX" + raw[4:]


def _corrupt_header_only(raw: bytes) -> bytes:
    return raw[: HEADER - 3]


def _corrupt_checksum(raw: bytes) -> bytes:
    return raw[: HEADER - 1] + bytes([raw[HEADER - 1] ^ 0x80]) + raw[HEADER:]


@pytest.mark.parametrize(
    "damage",
    [
        _corrupt_flip,
        _corrupt_truncate,
        _corrupt_extend,
        _corrupt_magic,
        _corrupt_header_only,
        _corrupt_checksum,
    ],
)
def test_damaged_file_is_dropped_not_served(tmp_path: Path, damage: object) -> None:
    cache = _disk_only(tmp_path)
    payload = os.urandom(100_000)
    cache.put(LAYER, "k", payload)
    path = tmp_path / "cache" / LAYER.split(":")[1] / "k"
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    assert cache.get(LAYER, "k") is None
    assert not path.exists()
    stats = cache.statistics()
    assert (stats["corrupt"], stats["misses"], stats["hits"]) == (1, 1, 0)
    cache.put(LAYER, "k", payload)  # refetched by the caller
    assert cache.get(LAYER, "k") == payload


def test_memory_copy_serves_without_disk(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", memory_bytes=1000)
    cache.put(LAYER, "k", b"x" * 600)
    assert cache.peek(LAYER, "k") == b"x" * 600
    cache.put(LAYER, "j", b"y" * 600)  # evicts k from memory, not from disk
    assert cache.peek(LAYER, "k") is None
    assert cache.peek(LAYER, "j") == b"y" * 600
    assert cache.statistics()["memory_held"] == 600
    assert cache.get(LAYER, "k") == b"x" * 600  # from disk, back in memory
    assert cache.peek(LAYER, "j") is None
    assert cache.peek(OTHER, "k") is None


def test_chunk_larger_than_memory_bound_is_not_held(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", memory_bytes=10)
    cache.put(LAYER, "k", b"z" * 11)
    assert cache.peek(LAYER, "k") is None
    assert cache.statistics()["memory_held"] == 0


def test_remove_layer_layers_and_usage(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache")
    assert cache.layers() == [] and cache.usage() == CacheUsage()
    cache.put(LAYER, "a", b"1" * 10)
    cache.put(LAYER, "b", b"2" * 20)
    cache.put(OTHER, "a", b"3" * 30)
    (tmp_path / "cache" / "not-a-layer").mkdir()
    assert cache.layers() == sorted([LAYER, OTHER])
    assert cache.usage(LAYER) == CacheUsage(size=30 + 2 * HEADER, files=2)
    assert cache.usage() == CacheUsage(size=60 + 3 * HEADER, files=3)
    cache.remove_layer(LAYER)
    assert cache.layers() == [OTHER]
    assert cache.peek(LAYER, "a") is None and cache.get(LAYER, "a") is None
    assert cache.get(OTHER, "a") == b"3" * 30
    assert cache.statistics()["memory_held"] == 30
    cache.remove_layer(LAYER)  # again: nothing to do, no error


def test_sha512_layer_directory_reads_back(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache")
    layer = Digest.parse("sha512:" + "ab" * 64)
    cache.put(layer, "k", b"v")
    assert cache.layers() == [layer]


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    """Readers never see a partial file while writers replace it."""
    cache = _disk_only(tmp_path)
    payloads = [bytes([i]) * 300_000 for i in range(4)]
    cache.put(LAYER, "k", payloads[0])
    seen: list[bytes | None] = []
    errors: list[BaseException] = []

    def write(i: int) -> None:
        for _ in range(20):
            cache.put(LAYER, "k", payloads[i])

    def read() -> None:
        try:
            for _ in range(40):
                seen.append(cache.get(LAYER, "k"))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    workers = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    workers += [threading.Thread(target=read) for _ in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors
    assert seen and all(s in payloads for s in seen)
    assert cache.statistics()["corrupt"] == 0
    assert os.listdir(tmp_path / "cache" / LAYER.split(":")[1]) == ["k"]


# -- the disk bound ----------------------------------------------------------

#: A cache file of a 100-byte chunk.
FILE = HEADER + 100


def _stored(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()}


def test_files_are_bounded_evicting_the_least_recently_used(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0, max_bytes=3 * FILE)
    for key in "abc":
        cache.put(LAYER, key, key.encode() * 100)
    assert cache.get(LAYER, "a") == b"a" * 100  # a is now the most recent
    cache.put(OTHER, "d", b"d" * 100)
    # Over the bound: the oldest go until the files are under 90 % of it.
    assert _stored(tmp_path) == {"a", "d"}
    assert cache.usage().size == 2 * FILE
    assert cache.get(LAYER, "b") is None and cache.get(LAYER, "c") is None  # misses: refetch
    assert cache.statistics()["evicted"] == 2
    cache.put(LAYER, "b", b"b" * 100)  # the refetched copy is kept again
    assert cache.get(LAYER, "b") == b"b" * 100 and _stored(tmp_path) == {"a", "b", "d"}


def test_memory_hits_count_as_uses_of_the_file(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", memory_bytes=1000, max_bytes=3 * FILE)
    for key in "abc":
        cache.put(LAYER, key, key.encode() * 100)
    assert cache.peek(LAYER, "a") == b"a" * 100
    cache.put(LAYER, "d", b"d" * 100)
    assert _stored(tmp_path) == {"a", "d"}


def test_the_chunk_just_written_stays_even_above_the_bound(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0, max_bytes=FILE)
    cache.put(LAYER, "a", b"a" * 100)
    cache.put(LAYER, "big", b"x" * 500)
    assert _stored(tmp_path) == {"big"}
    assert cache.get(LAYER, "big") == b"x" * 500


def test_files_already_on_disk_count_oldest_first(tmp_path: Path) -> None:
    earlier = ChunkCache(tmp_path / "cache")  # another process, no bound
    for i, key in enumerate(["old", "older", "new"]):
        earlier.put(LAYER, key, b"o" * 100)
        os.utime(tmp_path / "cache" / LAYER.split(":")[1] / key, (0, [200, 100, 300][i]))
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0, max_bytes=4 * FILE)
    cache.put(OTHER, "mine", b"m" * 100)  # at the bound: nothing goes
    assert len(_stored(tmp_path)) == 4
    earlier.put(LAYER, "theirs", b"t" * 100)  # not seen by *cache* until it walks again
    cache.put(OTHER, "again", b"g" * 100)
    # Six files against a bound of four, evicted down to 90 % of it: the
    # walk's new find first (it has no place in this process's order), then
    # the first walk's by mtime.
    assert _stored(tmp_path) == {"new", "mine", "again"}
    assert cache.statistics()["evicted"] == 3


def test_counting_ahead_fixes_the_bound_and_the_files(tmp_path: Path) -> None:
    ChunkCache(tmp_path / "cache").put(LAYER, "old", b"o" * 100)
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0, disk_share=0.5)
    cache.count()
    assert cache.max_bytes is not None and cache.max_bytes > FILE
    cache.max_bytes = 2 * FILE
    cache.put(LAYER, "a", b"a" * 100)
    cache.put(LAYER, "b", b"b" * 100)  # the file counted ahead is the oldest
    assert _stored(tmp_path) == {"b"} and cache.statistics()["evicted"] == 2
    ChunkCache(tmp_path / "unbounded").count()  # nothing to do, nothing made
    assert not (tmp_path / "unbounded").exists()


def test_removed_layers_leave_the_count(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0, max_bytes=3 * FILE)
    cache.put(LAYER, "a", b"a" * 100)
    cache.put(LAYER, "b", b"b" * 100)
    cache.remove_layer(LAYER)
    for key in "cde":
        cache.put(OTHER, key, key.encode() * 100)
    assert _stored(tmp_path) == {"c", "d", "e"}  # a and b no longer counted
    assert cache.statistics()["evicted"] == 0


def test_a_share_of_the_disk_bounds_the_files(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", disk_share=0.5)
    assert cache.max_bytes is None  # measured when first needed
    cache.put(LAYER, "a", b"a" * 100)
    st = os.statvfs(tmp_path)
    assert cache.max_bytes is not None
    assert 0 < cache.max_bytes <= st.f_blocks * st.f_frsize * 0.5 + FILE
    assert cache.get(LAYER, "a") == b"a" * 100


def test_eviction_never_serves_wrong_bytes_to_concurrent_readers(tmp_path: Path) -> None:
    """Writers evicting each other's files while readers read: a read gets
    the chunk's bytes or a miss, nothing else."""
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0, max_bytes=3 * (HEADER + 50_000))
    payloads = {f"k{i}": bytes([i]) * 50_000 for i in range(8)}
    wrong: list[object] = []

    def write(keys: list[str]) -> None:
        for _ in range(10):
            for k in keys:
                cache.put(LAYER, k, payloads[k])

    def read() -> None:
        for _ in range(20):
            for k, v in payloads.items():
                got = cache.get(LAYER, k)
                if got not in (None, v):
                    wrong.append((k, got[:10] if got else got))

    keys = list(payloads)
    workers = [threading.Thread(target=write, args=(keys[i::2],)) for i in range(2)]
    workers += [threading.Thread(target=read) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert wrong == []
    assert cache.usage().size <= 3 * (HEADER + 50_000) + 2 * (HEADER + 50_000)  # + writes in flight
