"""What a first lazy mount of a plain gzip image spends on its layers (issue 10, target 3).

    .venv/bin/python bench/gzmount.py [--mib 260] [--repeat 5]

The image is `bench.lazy`'s gzip one (`common.big_layout` with
``runnable``: busybox under four data layers of 2,500 files), cached under
``.bench/``. Two measures, each a median of ``--repeat`` turns taken in
the same minutes (the machine is shared: compare within one run only):

1. Per layer, in this process: `ckfs.layerindex.gzindex.index_gzip` of
   one data layer's blob as `ckfs.lazy` runs it (``verified``: the content
   store checked the blob) and as a standalone index does (the blob hashed
   whole again), against a plain isal inflate of it (what the eager path
   inflates too). CPU is the process's (every thread), wall the call's.
2. Per image, from a local docker-registry on fresh state roots:
   `ckfs.lazy.pull_lazy` (indexing while the pull runs) against the pull
   and then `ckfs.lazy.index_layers` one after the other, and a plain
   ``ckfs.pull.pull`` of the whole image (what any first mount pays) for
   scale. No CLI, daemon or FUSE server: ``bench/lazy.py --only 3`` times
   the whole ``ckfs mount``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from bench.common import CACHE, big_layout
from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.layerindex.gzindex import index_gzip
from integration.registry import Registry

REPO_TAG = "bench/gzmount:latest"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def biggest_layer(layout: Path) -> Descriptor:
    blobs = layout / "blobs" / "sha256"
    path = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    digest = Digest("sha256:" + path.name)
    return Descriptor(mt.OCI_LAYER_GZIP, digest, path.stat().st_size)


def per_layer(layout: Path, work: Path, repeat: int) -> None:
    from ckfs.archive.compression import open_layer

    desc = biggest_layer(layout)
    blob = layout / "blobs" / "sha256" / desc.digest.hex

    def index(verified: bool) -> Callable[[Path], None]:
        def body(out: Path) -> None:
            index_gzip(blob, desc, out / "index.db", verified=verified).close()

        return body

    def inflate(out: Path) -> None:
        with open(blob, "rb") as raw, open_layer(raw) as tar:
            while tar.read(1 << 20):
                pass

    cases = {
        "index_gzip, verified (ckfs.lazy)": index(True),
        "index_gzip, blob hashed again": index(False),
        "eager path's inflate alone (isal)": inflate,
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for i in range(repeat):
        for name, body in cases.items():
            out = work / f"layer-{i}"
            out.mkdir()
            w0, c0 = time.perf_counter(), cpu()
            body(out)
            runs[name].append((time.perf_counter() - w0, cpu() - c0))
            shutil.rmtree(out)
    print(f"1. index of one {desc.size / 1e6:.0f} MB layer (median of {repeat})")
    for name, got in runs.items():
        wall = statistics.median(w for w, _ in got)
        used = statistics.median(c for _, c in got)
        print(f"   {name:34s} wall {wall:6.3f} s  CPU {used:6.3f} s")


def per_image(layout: Path, work: Path, repeat: int) -> None:
    from ckfs.lazy import index_layers, lazy_children, pull_lazy
    from ckfs.options import DEFAULTS
    from ckfs.provide import with_hosts_dirs
    from ckfs.pull import pull
    from ckfs.reference import parse
    from ckfs.state import State

    registry = Registry(work / "registry")
    registry.start()
    try:
        registry.push(layout, REPO_TAG)
        ref = parse(f"{registry.host}/{REPO_TAG}")
        options = dataclasses.replace(DEFAULTS, plain_http=True)
        count = iter(range(1 << 30))

        async def overlapped(state: State) -> None:
            await pull_lazy(state, ref, options)

        async def one_after_the_other(state: State) -> None:
            o = with_hosts_dirs(state, options)
            report = await pull(ref, state.content, state.images, o, children=lazy_children())
            await index_layers(state, ref, report.target, options)

        async def pull_only(state: State) -> None:
            await pull(ref, state.content, state.images, with_hosts_dirs(state, options))

        cases: dict[str, Callable[[State], object]] = {
            "pull_lazy (index while pulling)": overlapped,
            "pull, then index_layers": one_after_the_other,
            "pull alone (no index)": pull_only,
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for _ in range(repeat):
            for name, case in cases.items():
                root = work / f"root{next(count)}"
                state = State(root)
                os.sync()
                w0, c0 = time.perf_counter(), cpu()
                trio.run(case, state)  # type: ignore[arg-type]
                times[name].append((time.perf_counter() - w0, cpu() - c0))
                shutil.rmtree(root)
    finally:
        registry.stop()
    print(f"2. lazy pull of the image from a local registry (median of {repeat})")
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        used = statistics.median(c for _, c in runs)
        print(f"   {name:34s} wall {wall:6.3f} s  CPU (this process) {used:6.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=260, help="image size before compression")
    ap.add_argument("--repeat", type=int, default=5, help="turns; medians are shown")
    ap.add_argument("--only", default="1,2", help="measures to run, e.g. 2")
    args = ap.parse_args()
    only = {int(x) for x in args.only.split(",")}
    layout = big_layout(args.mib, runnable=True)
    CACHE.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ckfs-bench-gzmount-", dir=CACHE))
    try:
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        if 1 in only:
            per_layer(layout, work, args.repeat)
        if 2 in only:
            per_image(layout, work, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
