"""RPC overhead of ckfsd: Stat round trips and List of 10,000 snapshots, containerd beside it.

    .venv/bin/python bench/rpc.py [--snapshots 10000] [--calls 10000] [--repeat 3]

Set up, not timed: a ckfsd on an empty root and, as the peer, Debian's
containerd on its own empty root, each holding ``--snapshots`` active
snapshots made by Prepare through its Snapshots service (ckfsd's under the
proxy name ``ckfs``, the name containerd's proxy plugin sends; containerd's
in its own ``overlayfs``), each labelled a gc root.

Timed, through each daemon's unix socket with the same Python gRPC client
(one channel, ``containerd-namespace: default``):

- ``Version``: the floor of a round trip, no store touched.
- ``Stat``: ``--calls`` calls in a row, each on the next snapshot's key;
  p50 and p99 of each call's wall time.
- ``List``: the whole server-streamed list of every snapshot, median of
  ``--repeat``.

No target: these are printed to be watched as the services change.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROXY, REPO, containerd, timed

sys.path.insert(0, str(REPO))

from google.protobuf import empty_pb2

from ckfs.api.services.snapshots.v1 import snapshots_pb2 as pb
from ckfs.api.services.snapshots.v1.snapshots_pb2_grpc import SnapshotsStub
from ckfs.api.services.version.v1.version_pb2_grpc import VersionStub
from integration.daemon import running_ckfsd

#: Every call's metadata: the one namespace ckfsd serves.
METADATA = (("containerd-namespace", "default"),)
#: Prepares in flight while setting up: enough to keep both cores busy
#: without queueing past ckfsd's worker threads.
PREPARE_CONCURRENCY = 16
#: Every snapshot's labels: a gc root, or containerd's gc collects the
#: snapshots (no lease holds them) while they are being timed.
LABELS = {"containerd.io/gc.root": "bench"}
#: Calls made and thrown away before timing: channel and caches warm.
WARMUP_CALLS = 200


def args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--snapshots", type=int, default=10_000, help="snapshots to list")
    ap.add_argument("--calls", type=int, default=10_000, help="Stat calls timed")
    ap.add_argument("--repeat", type=int, default=3, help="Lists timed; the median is shown")
    return ap.parse_args()


def keys(n: int) -> list[str]:
    """Keys as containerd's metadata layer makes them: ``<ns>/<n>/<key>``."""
    return [f"default/{i + 1}/bench-{i}" for i in range(n)]


def prepare_all(stub: SnapshotsStub, snapshotter: str, names: list[str]) -> None:
    def prepare(key: str) -> None:
        request = pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, labels=LABELS)
        stub.Prepare(request, metadata=METADATA)

    with ThreadPoolExecutor(PREPARE_CONCURRENCY) as pool:
        list(pool.map(prepare, names))


def latencies(call: Callable[[int], object], n: int) -> list[float]:
    """Wall time of each of *n* calls ``call(i)``, in seconds, after a warm-up."""
    for i in range(WARMUP_CALLS):
        call(i)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - t0)
    return out


def quantile(samples: list[float], q: float) -> float:
    return sorted(samples)[min(len(samples) - 1, int(q * len(samples)))]


def measure(address: str, snapshotter: str, o: argparse.Namespace) -> dict[str, float]:
    """Prepare ``o.snapshots`` snapshots on *address*, then time Version, Stat, List."""
    names = keys(o.snapshots)
    with grpc.insecure_channel(address) as channel:
        snaps, version = SnapshotsStub(channel), VersionStub(channel)
        t0 = time.perf_counter()
        prepare_all(snaps, snapshotter, names)
        prepared = time.perf_counter() - t0

        def stat(i: int) -> object:
            request = pb.StatSnapshotRequest(snapshotter=snapshotter, key=names[i % len(names)])
            return snaps.Stat(request, metadata=METADATA)

        def ls() -> None:
            request = pb.ListSnapshotsRequest(snapshotter=snapshotter)
            listed = sum(len(r.info) for r in snaps.List(request, metadata=METADATA))
            assert listed >= len(names), f"{address} listed {listed} of {len(names)}"

        v = latencies(lambda _: version.Version(empty_pb2.Empty(), metadata=METADATA), o.calls)
        s = latencies(stat, o.calls)
        t_list = timed(lambda: None, ls, o.repeat)
    return {
        "prepare": prepared / len(names),
        "version p50": statistics.median(v),
        "stat p50": statistics.median(s),
        "stat p99": quantile(s, 0.99),
        "list": t_list,
    }


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="ckfs-bench-rpc-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    o = args()
    with workdir() as work:
        with running_ckfsd(work / "ckfsd-root") as daemon:
            ckfsd = measure(daemon.address, PROXY, o)
        with containerd(work / "containerd") as sock:
            ctd = measure(f"unix://{sock}", "overlayfs", o)
    ms = 1e3
    print(
        f"Snapshots RPCs over a unix socket, one Python gRPC client, {o.snapshots} active snapshots"
    )
    print(f"  {'':<36} {'ckfsd':>10} {'containerd':>12}")
    for label, key, scale, unit in [
        ("Prepare, 16 in flight (per call)", "prepare", ms, "ms"),
        (f"Version round trip p50 ({o.calls})", "version p50", ms, "ms"),
        (f"Stat round trip p50 ({o.calls})", "stat p50", ms, "ms"),
        (f"Stat round trip p99 ({o.calls})", "stat p99", ms, "ms"),
        (f"List of all (median of {o.repeat})", "list", 1, "s"),
    ]:
        print(f"  {label:<36} {ckfsd[key] * scale:7.3f} {unit:<2} {ctd[key] * scale:9.3f} {unit}")
    print("  no target: watched as the services change")


if __name__ == "__main__":
    main()
