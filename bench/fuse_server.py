"""The FUSE serving process: a metadata walk, and its memory with a big layer.

Walk: ``find -printf %s`` (one getdents per directory, one lstat per entry)
over a layer of ``--entries`` entries (directories of 100), in four places:

- fuse: the layer's directory in the server's mount;
- disk: the same layer applied to a directory by ckfs's eager applier;
- ovl/fuse, ovl/disk: kernel overlayfs with that directory as its one
  lowerdir (and an empty upper), as the snapshotters mount it.

Cold runs start a fresh server (a new mount: the kernel knows none of its
inodes) and drop the dentry and inode caches (``drop_caches=2``, not the
page cache); warm runs repeat the walk at once. Rounds alternate the places,
and medians are printed with the ratios to their on-disk peers.

Memory: the server's RSS with a ``--big``-entry layer attached, after a
walk of all of it (every inode known to the kernel, so to the server), and
after the kernel forgot them.

Read (``--read``): a sequential read, in 128 KiB reads, of the 256 MiB
eStargz-shaped file of `bench.layerreader` through the layer's directory
in the mount, its blob in the root's content store (a `LocalBlob`): cold
(empty chunk cache, the blob's pages dropped), then from the chunk cache
(the file's pages dropped with ``fadvise(DONTNEED)``), against the same
file on tmpfs; with the server's CPU seconds for each.

Run as root: ``.venv/bin/python bench/fuse_server.py [--read]``.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ckfs import mediatypes
from ckfs.archive.apply import ApplyOptions, apply_layer
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, from_bytes
from ckfs.layerindex.store import IndexStore, dirname
from ckfs.layerindex.tarindex import index_tar
from ckfs.mount import Mount, mount_all, unmount_all
from snapshotters.fuse.process import ServerPaths, ensure_server, server_pid, stop_server

#: Entries per directory of the generated layer.
PER_DIR = 100


def layer_tar(entries: int) -> bytes:
    """An uncompressed layer of *entries* entries: directories of small files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for n in range(entries):
            d, i = divmod(n, PER_DIR)
            info = tarfile.TarInfo(f"d{d:05}" if i == 0 else f"d{d:05}/f{i:03}")
            info.mtime = 1_000_000
            if i == 0:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            else:
                info.size = 10
                t.addfile(info, io.BytesIO(b"0123456789"))
    return buf.getvalue()


def add_layer(root: Path, raw: bytes) -> Digest:
    """The layer *raw* in *root*'s content store, with its index."""
    digest = from_bytes(raw)
    blob = root / "content" / "blobs" / digest.algorithm / digest.hex
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(raw)
    path = IndexStore(root).path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    index_tar(blob, Descriptor(mediatypes.OCI_LAYER, digest, len(raw)), path).close()
    return digest


def find(top: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["find", str(top), "-printf", "%s\n"], capture_output=True, check=True)
    return time.perf_counter() - start


def drop_dentries() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def walk(work: Path, entries: int, rounds: int) -> None:
    root = work / "root"
    raw = layer_tar(entries)
    digest = add_layer(root, raw)
    disk = work / "disk"
    disk.mkdir()
    opts = ApplyOptions(whiteouts="overlay")
    apply_layer(disk, io.BytesIO(raw), media_type=None, diff_id=None, options=opts)
    times: dict[str, list[float]] = {}

    def fresh_fuse() -> Path:
        stop_server(root)
        return ensure_server(root) / dirname(digest)

    def overlay(lower: Callable[[], Path], name: str) -> None:
        target, upper, workdir = (work / f"{name}-{part}" for part in ("t", "u", "w"))
        for d in (target, upper, workdir):
            d.mkdir(exist_ok=True)
        options = (f"lowerdir={lower()}", f"upperdir={upper}", f"workdir={workdir}", "index=off")
        mount_all([Mount("overlay", "overlay", "", options)], target)
        try:
            drop_dentries()
            times.setdefault(f"{name} cold", []).append(find(target))
            times.setdefault(f"{name} warm", []).append(find(target))
        finally:
            unmount_all(target)

    try:
        for _ in range(rounds):
            layer = fresh_fuse()
            drop_dentries()
            times.setdefault("fuse cold", []).append(find(layer))
            times.setdefault("fuse warm", []).append(find(layer))
            drop_dentries()
            times.setdefault("disk cold", []).append(find(disk))
            times.setdefault("disk warm", []).append(find(disk))
            overlay(fresh_fuse, "ovl-fuse")
            overlay(lambda: disk, "ovl-disk")
    finally:
        stop_server(root)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"find + lstat of {entries + 1} entries, medians of {rounds} rounds (ms):")
    for ours, peer in (("fuse", "disk"), ("ovl-fuse", "ovl-disk")):
        for kind in ("cold", "warm"):
            a, b = med[f"{ours} {kind}"], med[f"{peer} {kind}"]
            print(f"  {kind} {ours:9} {a:8.1f}   {peer:9} {b:8.1f}   ratio {a / b:5.2f}x")


def memory(work: Path, entries: int) -> None:
    root = work / "root-big"
    start = time.perf_counter()
    digest = add_layer(root, layer_tar(entries))
    print(f"indexed {entries} entries in {time.perf_counter() - start:.1f} s")
    try:
        mnt = ensure_server(root)
        pid = server_pid(ServerPaths(root))
        assert pid
        print(f"  RSS idle: {rss_mib(pid)} MiB")
        os.lstat(mnt / dirname(digest))
        print(f"  RSS with the layer attached: {rss_mib(pid)} MiB")
        took = find(mnt / dirname(digest))
        print(f"  RSS after a walk of all of it ({took:.1f} s): {rss_mib(pid)} MiB")
        drop_dentries()
        time.sleep(1)
        print(f"  RSS after the kernel forgot its inodes: {rss_mib(pid)} MiB")
    finally:
        stop_server(root)


def read_seq(path: Path, *, drop_file: bool = False) -> float:
    """Seconds to read *path* in 128 KiB reads (its pages dropped first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop_file:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(128 << 10)
        off = 0
        start = time.perf_counter()
        while n := os.preadv(fd, [buf], off):
            off += n
        return time.perf_counter() - start
    finally:
        os.close(fd)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read(work: Path, rounds: int) -> None:
    from bench.layerreader import SIZE, build, drop_pages

    root = work / "root-read"
    blob, index, data = build(work)
    digest = index.layer
    index.close()
    stored = root / "content" / "blobs" / digest.algorithm / digest.hex
    stored.parent.mkdir(parents=True)
    shutil.copyfile(blob, stored)
    path = IndexStore(root).path(digest)
    path.parent.mkdir(parents=True)
    shutil.copyfile(work / "index.db", path)
    shm = Path(tempfile.mkdtemp(prefix="ckfs-bench-fuse-", dir="/dev/shm"))
    (shm / "big").write_bytes(data)
    del data
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            stop_server(root)
            shutil.rmtree(root / "cache", ignore_errors=True)
            big = ensure_server(root) / dirname(digest) / "big"
            pid = server_pid(ServerPaths(root))
            assert pid
            drop_pages(stored)
            for name, path, drop in (
                ("cold", big, False),
                ("chunk cache", big, True),
                ("tmpfs", shm / "big", False),
            ):
                before = cpu_seconds(pid)
                times.setdefault(name, []).append(read_seq(path, drop_file=drop))
                cpu.setdefault(name, []).append(cpu_seconds(pid) - before)
    finally:
        stop_server(root)
        shutil.rmtree(shm, ignore_errors=True)
    print(f"sequential read of {SIZE >> 20} MiB, 128 KiB reads, medians of {rounds} rounds:")
    for name, secs in times.items():
        mbs = SIZE / statistics.median(secs) / 1e6
        print(f"  {name:12} {mbs:6.0f} MB/s   server CPU {statistics.median(cpu[name]):.2f} s")
    ratio = statistics.median(times["tmpfs"]) / statistics.median(times["chunk cache"])
    print(f"  chunk cache / tmpfs {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--read", action="store_true", help="the read measure only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckfs-bench-fuse-") as tmp:
        if args.read:
            read(Path(tmp), args.rounds)
            return
        walk(Path(tmp), args.entries, args.rounds)
        memory(Path(tmp), args.big)


if __name__ == "__main__":
    main()
