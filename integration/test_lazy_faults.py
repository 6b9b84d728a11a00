"""Faults under a lazy rootfs, with real parts (issue 10, "Tests with real parts").

Each test mounts an image with ``ckfs mount`` (the fuse snapshotter: an
overlay over the FUSE server's layer directories) from a real
docker-registry, then breaks one thing and reads through the mount:

- the registry stops: what was read stays readable (the chunk cache),
  the rest fails with EIO and the server's log names the layer and path,
  the mount stays up, and the same reads work once the registry is back;
  a plain gzip image's reads are local (its blob was pulled to index it)
  and keep working;
- the registry answers 503 or 429, or cuts a body short: the read retries
  and succeeds; a private registry's token stops being taken: the server
  gets a new one with the user's Docker credentials;
- a chunk's bytes are wrong on the wire (`integration.faultproxy`): a
  flipped byte or a whole valid gzip member of other bytes: EIO, never the
  wrong bytes, nothing cached;
- a cache file is damaged on disk: refetched, correct;
- the serving process is killed with SIGKILL: ``ckfs mounts recover``
  brings the rootfs back at its target.

The kernel's page cache would answer repeated reads itself (the server
opens files with ``keep_cache``), so every read here first drops the file's
cached pages (`posix_fadvise` ``DONTNEED``, which overlayfs passes down to
the FUSE file): each read reaches the server.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import gzip
import io
import itertools
import json
import os
import signal
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ckfs.layerindex.cache import HEADER
from ckfs.mount import is_mountpoint
from integration.conftest import Ckfs
from integration.estargz import CHUNK_SIZE, EstargzImage
from integration.faultproxy import Fault, FaultProxy
from integration.mounts import MountGuard
from integration.registry import EXAMPLE_REPO, Registry
from integration.test_containerd_lazy import layout_layer_tars
from integration.tokenserver import TokenServer
from snapshotters.fuse.process import ServerPaths, server_pid
from snapshotters.fuse.server import STATS_INTERVAL

pytestmark = [pytest.mark.root]

#: Where the tests push their images in their own registries.
REPO = "ckfs/lazy-faults:latest"

#: Who may pull from the token-protected registry.
TOKEN_USER, TOKEN_PASSWORD = "lazy-reader", "s3cret-tok"

#: A file of `estargz_image` spanning several chunks (`CHUNK_SIZE` each),
#: in its bottom layer.
BIG = "usr/share/big.bin"

#: Seconds an uncached read is given to reach the server before cached ones
#: are read beside it. A failing registry read retries for about 2 s
#: (`ckfs.remotes.requests`' backoff) before its EIO.
_RETRYING = 0.3

#: Seconds a killed server may take to be gone (reaped by init).
_GONE_TIMEOUT = 10.0


def layer_files(tars: list[bytes]) -> dict[str, bytes]:
    """The regular files of an image of layer *tars* (bottom first), as a
    container sees them: whiteouts and opaque directories applied, a later
    non-directory entry replacing an earlier one (a directory with its contents)."""
    files: dict[str, bytes] = {}

    def drop(path: str) -> None:
        for name in [n for n in files if n == path or n.startswith(path + "/")]:
            del files[name]

    for data in tars:
        # umoci ends a layer's tar after the last file's bytes, without
        # padding or end blocks; tarfile wants both.
        data += bytes(-len(data) % 512 + 1024)
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            members = t.getmembers()
            opaque = {
                os.path.dirname(os.path.normpath(m.name))
                for m in members
                if os.path.basename(m.name) == ".wh..wh..opq"
            }
            for d in opaque:
                for name in [n for n in files if n.startswith(d + "/")]:
                    del files[name]
            for m in members:
                path = os.path.normpath(m.name)
                base = os.path.basename(path)
                if base.startswith(".wh."):
                    if base != ".wh..wh..opq":
                        drop(os.path.join(os.path.dirname(path), base.removeprefix(".wh.")))
                    continue
                if m.isdir():  # merges with a directory below, replaces a file
                    files.pop(path, None)
                    continue
                drop(path)
                if m.isfile():
                    f = t.extractfile(m)
                    assert f is not None
                    files[path] = f.read()
                elif m.islnk():
                    files[path] = files[os.path.normpath(m.linkname)]
    return files


def read(path: Path, offset: int = 0, size: int = -1) -> bytes:
    """*size* bytes of *path* from *offset* (-1: to the end), through the
    server: the file's pages are dropped from the page cache first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if size < 0:
            size = os.fstat(fd).st_size - offset
        out = bytearray()
        while len(out) < size:
            got = os.pread(fd, size - len(out), offset + len(out))
            if not got:
                break
            out += got
        return bytes(out)
    finally:
        os.close(fd)


def read_fails(path: Path, offset: int = 0, size: int = 4096) -> int:
    """The errno of a read of *path* that must fail."""
    with pytest.raises(OSError) as failed:
        read(path, offset, size)
    return failed.value.errno or 0


def server_log(root: Path) -> str:
    return ServerPaths(root).log.read_text(errors="replace")


def cache_files(root: Path, layer: str) -> dict[str, bytes]:
    """The chunk cache's files of *layer* (a digest), by name."""
    where = root / "cache" / layer.split(":", 1)[1]
    if not where.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in where.iterdir() if not p.name.startswith(".")}


def kill_server(root: Path) -> int:
    """SIGKILL the root's FUSE server (by its pid file's PID); wait until it is gone."""
    pid = server_pid(ServerPaths(root))
    assert pid is not None, "no FUSE server runs for the root"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + _GONE_TIMEOUT
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"FUSE server {pid} still there after SIGKILL"
        time.sleep(0.05)
    return pid


def mounts_ls(ckfs: Ckfs) -> dict[str, dict[str, object]]:
    """``ckfs mounts ls --json``, by target."""
    return {m["target"]: m for m in json.loads(ckfs.run("mounts", "ls", "--json").stdout)}


def wait_counters(
    ckfs: Ckfs, target: Path, layer: str, ready: Callable[[dict[str, int]], bool]
) -> dict[str, int]:
    """The read counters ``ckfs mounts ls`` shows for *layer* of the mount at
    *target*, once *ready* accepts them (the server writes them every
    `STATS_INTERVAL` seconds while they change)."""
    deadline = time.monotonic() + 3 * STATS_INTERVAL
    while True:
        layers = mounts_ls(ckfs)[str(target)]["layers"]
        assert isinstance(layers, list)
        counters = next(x for x in layers if x["digest"] == layer)
        if ready(counters):
            return dict(counters)
        assert time.monotonic() < deadline, counters
        time.sleep(0.2)


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


#: Ways a chunk cache file gets damaged: a flipped bit in its payload, a
#: torn write (cut short), a header that is not the cache's.
DAMAGE: tuple[Callable[[bytes], bytes], ...] = (
    _flip_last,
    lambda data: data[: len(data) // 2],
    lambda data: b"XXXX" + data[4:],
)


@pytest.fixture
def lazy(ckfs: Ckfs, mount_guard: MountGuard, tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``ckfs mount REF`` (lazy: the fuse snapshotter) at a target under
    the test's directory; unmounted at the end (the guard detaches it if
    the test failed first, the suite's fixture stops the FUSE server)."""
    targets: list[Path] = []

    def mount(ref: str) -> Path:
        target = tmp_path / f"rootfs{len(targets)}"
        ckfs.run("mount", ref, str(target))
        targets.append(target)
        return target

    yield mount
    for target in targets:
        if is_mountpoint(target):
            ckfs.run("umount", str(target), check=False)


def test_registry_stopped_after_mount(
    estargz_image: EstargzImage,
    registry_factory: Callable[..., Registry],
    lazy: Callable[[str], Path],
    ckfs: Ckfs,
) -> None:
    """Cached reads go on, uncached ones fail alone (EIO, logged with layer
    and path), the mount survives, and reads work again after a restart."""
    registry = registry_factory()
    registry.push(estargz_image.layout, REPO)
    target = lazy(f"{registry.host}/{REPO}")
    want = layer_files(estargz_image.tars)
    base, top = (str(c.descriptor().digest) for c in estargz_image.layers[::2])
    assert read(target / "etc/os-release") == want["etc/os-release"]
    assert read(target / BIG, 0, CHUNK_SIZE) == want[BIG][:CHUNK_SIZE]

    server = server_pid(ServerPaths(ckfs.root))

    registry.stop()
    with ThreadPoolExecutor(1) as pool:
        # An uncached read waits out the client's retries (seconds) before
        # its EIO; reads of cached bytes are answered meanwhile.
        failing = pool.submit(read_fails, target / "app/run.sh")
        time.sleep(_RETRYING)
        assert read(target / "etc/os-release") == want["etc/os-release"]
        assert read(target / BIG, 0, CHUNK_SIZE) == want[BIG][:CHUNK_SIZE]
        assert not failing.done(), "the read failed without waiting for retries"
        assert failing.result() == errno.EIO
    assert read_fails(target / BIG, 4 * CHUNK_SIZE) == errno.EIO
    log = server_log(ckfs.root)
    assert f"layer {top} path /app/run.sh" in log, log[-2000:]
    assert f"layer {base} path /{BIG}" in log, log[-2000:]
    # The mount is up: listed, cached bytes still served, the tree walks.
    assert sorted(os.listdir(target / "app")) == ["run.sh"]
    assert mounts_ls(ckfs)[str(target)]["state"] == "mounted"
    assert server_pid(ServerPaths(ckfs.root)) == server
    # The cached reads reached the server (not the page cache) and were
    # served by the chunk cache: counted as hits, shown by ``mounts ls``.
    counted = wait_counters(ckfs, target, base, lambda c: c.get("hits", 0) > 0)
    assert counted["misses"] >= 1 and counted["fetched"] > 0, counted

    registry.start()
    assert read(target / "app/run.sh") == want["app/run.sh"]
    assert read(target / BIG) == want[BIG]
    assert read(target / "etc/os-release") == want["etc/os-release"]


def test_token_refreshed_during_reads(
    estargz_image: EstargzImage,
    lazy: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A private registry behind a token server: the FUSE server reads with
    the user's Docker credentials, and when the registry stops taking its
    token (a 401 mid-mount), it gets a new one and the read succeeds."""
    tokens = TokenServer(users={TOKEN_USER: TOKEN_PASSWORD}, anonymous_pull=False).start()
    registry = Registry(
        tmp_path / "token-registry", extra_config=tokens.registry_config(tmp_path / "ca.pem")
    )
    try:
        registry.start()
        registry.push(estargz_image.layout, REPO, creds=(TOKEN_USER, TOKEN_PASSWORD))
        auth = base64.b64encode(f"{TOKEN_USER}:{TOKEN_PASSWORD}".encode()).decode()
        docker = tmp_path / "docker"
        docker.mkdir()
        (docker / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
        # Inherited by the ckfs commands, the ckfsd they start and its FUSE server.
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))
        target = lazy(f"{registry.host}/{REPO}")
        want = layer_files(estargz_image.tars)
        tokens.requests.clear()
        tokens.stale_tokens = 1  # the server's first token dies at the registry in seconds
        assert read(target / "etc/os-release") == want["etc/os-release"]
        time.sleep(tokens.grace + 1)
        assert read(target / "app/run.sh") == want["app/run.sh"]
        assert read(target / BIG) == want[BIG]
        # The first challenge, then the 401 of the stale token: one new token.
        assert [r.user for r in tokens.requests] == [TOKEN_USER, TOKEN_USER], tokens.requests
    finally:
        registry.stop()
        tokens.stop()


def test_gzip_image_reads_are_local(
    example_layout: Path,
    registry_factory: Callable[..., Registry],
    lazy: Callable[[str], Path],
    ckfs: Ckfs,
) -> None:
    """A plain gzip image is indexed over its pulled blob: with the registry
    gone, every file still reads, and reads what the layers hold."""
    registry = registry_factory()
    registry.push(example_layout, EXAMPLE_REPO)
    target = lazy(f"{registry.host}/{EXAMPLE_REPO}")
    registry.stop()
    layers = mounts_ls(ckfs)[str(target)]["layers"]
    assert isinstance(layers, list)
    assert {layer["source"] for layer in layers} == {"gzip-index"}, layers
    want = layer_files(layout_layer_tars(example_layout))
    got = {
        os.path.relpath(os.path.join(d, f), target): read(Path(d) / f)
        for d, _, files in os.walk(target)
        for f in files
        if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))
    }
    assert got == want


#: The file of `estargz_image` each wrong-bytes case reads, and the bottom-up
#: number of its layer.
RUN_SH, TOP = "app/run.sh", 2

#: Wrong bytes for a chunk: ``(layer, file, offset read, fault, what the
#: server's log says)``. A flipped byte inside a gzip member fails its CRC
#: before the chunk's sha256 is reached; a whole valid member of other
#: bytes (its CRC right) only the sha256 (the TOC's ``chunkDigest``) refuses.
WRONG = {
    "flipped byte": (0, BIG, CHUNK_SIZE, Fault("corrupt", times=-1), "does not inflate"),
    "valid member, other bytes": (
        TOP,
        RUN_SH,
        0,
        Fault("replace", times=-1, body=gzip.compress(b"#!/bin/sh\necho HI\n", mtime=0)),
        "do not match",
    ),
}


@pytest.mark.parametrize("case", WRONG, ids=list(WRONG))
def test_wrong_bytes_for_a_chunk(
    case: str, estargz_image: EstargzImage, lazy: Callable[[str], Path], ckfs: Ckfs
) -> None:
    """A chunk whose bytes are wrong on the wire: EIO (logged), never the
    wrong bytes, nothing cached; the right bytes read and cache afterwards."""
    number, path, offset, fault, said = WRONG[case]
    layer = str(estargz_image.layers[number].descriptor().digest)
    want = layer_files(estargz_image.tars)[path]
    if fault.body:  # the forged member holds other bytes of the same length
        forged = gzip.decompress(fault.body)
        assert len(forged) == len(want) and forged != want
    with FaultProxy(estargz_image.registry.host).running() as proxy:
        target = lazy(f"{proxy.host}/{estargz_image.repo_tag}")
        before = cache_files(ckfs.root, layer)
        proxy.clear()
        proxy.add(dataclasses.replace(fault, path=f"/blobs/{layer}"))
        assert read_fails(target / path, offset) == errno.EIO
        assert read_fails(target / path, 0, len(want)) == errno.EIO
        assert [s for s in proxy.requests(layer) if s.fault == fault.kind], proxy.seen
        assert cache_files(ckfs.root, layer) == before
        log = server_log(ckfs.root)
        assert f"layer {layer} path /{path}: layer {layer}: " in log, log[-2000:]
        assert said in log, log[-2000:]

        proxy.clear()
        assert read(target / path) == want
        assert len(cache_files(ckfs.root, layer)) > len(before)


#: Registry trouble a read rides out: each fault (on the blob requests of
#: one file's layer, bottom-up number) and that file.
TRANSIENT = [
    (Fault("status", status=503, times=2), 2, RUN_SH),
    (Fault("status", status=429, retry_after="1", times=1), 1, "etc/os-release"),
    (Fault("cut", after=1000, times=1), 0, BIG),
]


def test_transient_registry_trouble_retried(
    estargz_image: EstargzImage, lazy: Callable[[str], Path]
) -> None:
    """5xx answers, a 429 with Retry-After, a connection cut mid-body: the
    read waits, tries again and returns the right bytes."""
    want = layer_files(estargz_image.tars)
    with FaultProxy(estargz_image.registry.host).running() as proxy:
        target = lazy(f"{proxy.host}/{estargz_image.repo_tag}")
        for fault, number, path in TRANSIENT:
            layer = str(estargz_image.layers[number].descriptor().digest)
            proxy.clear()
            proxy.add(dataclasses.replace(fault, path=f"/blobs/{layer}"))
            assert read(target / path) == want[path], fault
            seen = [s.fault for s in proxy.requests(layer)]
            assert seen[-1] is None and seen.count(fault.kind) == fault.times, (fault, seen)


def test_corrupt_cache_file_is_refetched(
    estargz_image: EstargzImage, lazy: Callable[[str], Path], ckfs: Ckfs
) -> None:
    """Cache files damaged on disk are dropped and fetched again, never served.

    The server keeps recent chunks in memory too, so the damaged files are
    read from disk by the next server: this one is killed (a crash, the
    usual way a cache file is torn) and ``ckfs mounts recover`` starts it.
    """
    base = str(estargz_image.layers[0].descriptor().digest)
    want = layer_files(estargz_image.tars)
    with FaultProxy(estargz_image.registry.host).running() as proxy:
        target = lazy(f"{proxy.host}/{estargz_image.repo_tag}")
        assert read(target / BIG) == want[BIG]
        cached = cache_files(ckfs.root, base)
        assert len(cached) >= len(want[BIG]) // CHUNK_SIZE, cached.keys()
        kill_server(ckfs.root)
        where = ckfs.root / "cache" / base.split(":", 1)[1]
        intact, *damaged = sorted(cached)
        for name, damage in zip(damaged, itertools.cycle(DAMAGE), strict=False):
            (where / name).write_bytes(damage(cached[name]))
        inodes = {name: (where / name).stat().st_ino for name in cached}
        ckfs.run("mounts", "recover")
        proxy.clear()

        assert read(target / BIG) == want[BIG]
        # Each damaged file was refetched and written whole again (its bytes are
        # the good ones; its inode number may be the freed one's, so it says
        # nothing); the intact one was served as it is, never rewritten.
        assert cache_files(ckfs.root, base) == cached
        assert (where / intact).stat().st_ino == inodes[intact]
        refetched = sum(len(cached[name]) - HEADER for name in damaged)
        assert proxy.body_bytes(base) >= refetched  # random bytes: stored, not smaller


def test_serving_process_killed(
    estargz_image: EstargzImage, lazy: Callable[[str], Path], ckfs: Ckfs
) -> None:
    """``kill -9`` of the FUSE server leaves a dead rootfs (ENOTCONN, listed
    as stale); ``ckfs mounts recover`` mounts it again at its target."""
    target = lazy(estargz_image.ref)
    want = layer_files(estargz_image.tars)
    assert read(target / "etc/os-release") == want["etc/os-release"]
    names = sorted(os.listdir(target))
    killed = kill_server(ckfs.root)

    with pytest.raises(OSError) as dead:
        os.listdir(target / "usr")
    assert dead.value.errno == errno.ENOTCONN
    assert mounts_ls(ckfs)[str(target)]["state"] == "stale"

    recovered = ckfs.run("mounts", "recover")
    assert f"remounted {target}" in recovered.stderr
    assert server_pid(ServerPaths(ckfs.root)) not in (None, killed)
    assert mounts_ls(ckfs)[str(target)]["state"] == "mounted"
    assert sorted(os.listdir(target)) == names
    for path, data in want.items():
        assert read(target / path) == data, path
