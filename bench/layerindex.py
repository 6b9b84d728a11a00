"""Layer index sizes and speeds: synthetic trees, and a plain gzip layer.

- Synthetic: N entries (directories of 100 files) through `IndexWriter`:
  build and commit time, file size, a full listing, random lookups by
  name, and the peak RSS of a fresh process that opens the index, lists it
  all and looks names up (the serving process's share of it).
- gzip: a tar of ``--tree`` (default: this checkout's .venv) compressed
  with gzip -6, indexed by `ckfs.layerindex.gzindex` (one inflating pass)
  versus a plain inflate of it with zlib (the same library indexed_gzip
  uses) as the peer; then random 4 KiB reads through the inflater.

Run: ``.venv/bin/python bench/layerindex.py [--entries 100000 1000000]``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ckfs.archive.entry import Entry, Kind
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.layerindex.gzindex import index_gzip, open_inflater
from ckfs.layerindex.model import ROOT, IndexWriter, LayerIndex, iter_nodes
from ckfs.layerindex.store import GZIDX_NAME

LAYER = Digest("sha256:" + "ab" * 32)
PER_DIR = 100


def synthetic(path: Path, n: int) -> tuple[float, float, float]:
    """Write an index of *n* entries; (add seconds, commit seconds, CPU seconds).

    CPU time as well as wall time: on a shared machine it is the steadier.
    """
    c0 = time.process_time()
    t0 = time.perf_counter()
    with IndexWriter(path, layer=LAYER, source="tar", blob_size=1 << 50) as w:
        off = 0
        for i in range(n // PER_DIR):
            d = f"usr/share/g{i // 100}/d{i}"
            w.add(Entry(d, Kind.DIR, mode=0o755, mtime_ns=i))
            for j in range(PER_DIR - 1):
                w.add(Entry(f"{d}/file-{j}.txt", Kind.FILE, size=1000, mtime_ns=j), data=off)
                off += 1536
        t1 = time.perf_counter()
        w.commit().close()
    return t1 - t0, time.perf_counter() - t1, time.process_time() - c0


def _hwm_mb() -> float:
    """Peak RSS of this process image, in MB (ru_maxrss survives exec: no good here)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reader_stats(path: str, n: int) -> None:
    """In a fresh process: list everything, look names up, print timings and RSS."""
    base = _hwm_mb()
    index = LayerIndex.open(Path(path))
    t = time.perf_counter()
    count = sum(1 for _ in iter_nodes(index))
    listing = time.perf_counter() - t
    rng = random.Random(1)
    t = time.perf_counter()
    lookups = 20_000
    for _ in range(lookups // 5):
        i = rng.randrange(n // PER_DIR)
        ino = ROOT
        for name in ("usr", "share", f"g{i // 100}", f"d{i}", "file-7.txt"):
            node = index.lookup(ino, name)
            assert node is not None
            ino = node.ino
    lookup = (time.perf_counter() - t) / lookups
    rss = _hwm_mb()
    print(f"{count} {listing:.2f} {lookup * 1e6:.1f} {rss:.1f} {rss - base:.1f}")


def bench_synthetic(n: int, tmp: Path) -> None:
    path = tmp / f"synthetic-{n}.db"
    add, commit, cpu = synthetic(path, n)
    out = subprocess.run(
        [sys.executable, __file__, "--reader", str(path), str(n)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    count, listing, lookup, rss, grown = out
    print(
        f"{n:>9} entries: build {add + commit:5.2f} s (add {add:.2f}, commit {commit:.2f}; "
        f"CPU {cpu:.2f} s), "
        f"{path.stat().st_size / 1e6:6.1f} MB, list all {count} in {float(listing):.2f} s, "
        f"lookup {lookup} us, reader peak RSS {rss} MB (+{grown} MB for the index)"
    )
    path.unlink()


def bench_gzip(tree: Path, tmp: Path, reads: int) -> None:
    raw = tmp / "layer.tar"
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as t:
        t.add(tree, arcname=tree.name)
    blob = tmp / "layer.tar.gz"
    with open(raw, "rb") as src, gzip.open(blob, "wb", compresslevel=6) as dst:
        while data := src.read(1 << 20):
            dst.write(data)
    data = blob.read_bytes()
    desc = Descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Digest("sha256:" + hashlib.sha256(data).hexdigest()),
        len(data),
    )
    del data
    t = time.perf_counter()
    d = zlib.decompressobj(31)
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 20):
            d.decompress(chunk)
    peer = time.perf_counter() - t
    out = tmp / "idx"
    out.mkdir()
    t = time.perf_counter()
    index = index_gzip(blob, desc, out / "index.db")
    build = time.perf_counter() - t
    usize = raw.stat().st_size
    print(
        f"gzip layer: {desc.size / 1e6:.1f} MB ({usize / 1e6:.1f} MB tar, {index.count} entries); "
        f"index {build:.2f} s vs zlib inflate {peer:.2f} s ({build / peer:.2f}x); "
        f"index.db {(out / 'index.db').stat().st_size / 1e6:.2f} MB, "
        f"{GZIDX_NAME} {(out / GZIDX_NAME).stat().st_size / 1e6:.2f} MB, "
        f"{len(index.spans())} spans"
    )
    rng = random.Random(2)
    with open_inflater(index, blob) as inflater, open(raw, "rb") as plain:
        times = []
        for _ in range(reads):
            off = rng.randrange(usize - 4096)
            t = time.perf_counter()
            got = inflater.read(off, 4096)
            times.append(time.perf_counter() - t)
            plain.seek(off)
            assert got == plain.read(4096)
    times.sort()
    print(
        f"random 4 KiB reads ({reads}): median {statistics.median(times) * 1e3:.1f} ms, "
        f"p90 {times[int(reads * 0.9)] * 1e3:.1f} ms, max {times[-1] * 1e3:.1f} ms"
    )
    index.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reader":
        reader_stats(sys.argv[2], int(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, nargs="*", default=[100_000, 1_000_000])
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent / ".venv")
    p.add_argument("--reads", type=int, default=500)
    p.add_argument("--no-gzip", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        tmp = Path(d)
        for n in args.entries:
            bench_synthetic(n, tmp)
        if not args.no_gzip:
            bench_gzip(args.tree, tmp, args.reads)


if __name__ == "__main__":
    main()
