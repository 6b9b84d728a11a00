"""``ctr run --rm`` of a >= 200 MB image, cold: containerd's overlayfs vs the ckfs proxy.

    .venv/bin/python bench/containerd.py [--mib 260] [--repeat 3]

Set up once, not timed: `common.big_layout` with ``runnable`` (the example
image's busybox-static userland under four data layers) and the small
example image, pushed by skopeo into Debian's docker-registry on a free
127.0.0.1 port.

Before each timed run, untimed: ckfsd restarts on an empty root, containerd
restarts on an empty root with ``[proxy_plugins.ckfs]`` pointing at that
ckfsd, and runs the small image once with the snapshotter under test, so
both daemons are warm and neither holds a layer of the big image. The same
two daemons, with the same configuration, serve both snapshotters.

Timed, median of ``--repeat`` runs, the two snapshotters taking turns:
``ctr images pull --plain-http
--snapshotter S REF`` then ``ctr run --rm --snapshotter S REF ID
/bin/true``: fetch, containerd's differ unpacking each layer into S's
snapshots, the container's rootfs prepared, mounted, run and removed. S is
``overlayfs`` (containerd's own snapshotter) or ``ckfs`` (the proxy: each
snapshot call a gRPC call to ckfsd, the layers in ckfs's overlayfs store).
Target: ckfs <= 1.0x overlayfs (the lazy snapshotter drives it lower).
Under the figures: each step's median apart, and the RPCs ckfsd served in
the last ckfs run with the sum of their durations from its log, ckfsd's own
share of that run. Each setup ends with ``sync``, so no run writes back the
previous one's data.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PROXY,
    REPO,
    bench_args,
    big_layout,
    containerd,
    example_layout,
    layout_size,
    report,
    run,
    timed_turns,
)

sys.path.insert(0, str(REPO))

from ckfs.mount import unmount_recursive
from integration.daemon import Daemon, running_ckfsd
from integration.registry import Registry

IMAGE = "bench/run:latest"
#: The small image each fresh pair of daemons runs once before timing.
WARMUP = "bench/warmup:latest"
#: What ``ctr run`` starts in the big image: the container's start, no work.
COMMAND = "/bin/true"
#: Committed snapshots the big image leaves: the example image's three
#: layers and the four data layers of `big_layout`.
LAYERS = 3 + 4
#: ckfsd's log line for one RPC: method, result code, duration.
RPC_LOG = re.compile(r" (/\S+) ([A-Z_]+) ([0-9.]+)ms$")


class Daemons:
    """A ckfsd and a containerd proxying to it, restarted empty on demand.

    Args:
        work: the directory their roots go in.
    """

    def __init__(self, work: Path) -> None:
        self.work = work
        self.stack = contextlib.ExitStack()
        self.ctr: list[str] = []
        self.runs = itertools.count()
        self.ckfsd: Daemon | None = None
        self.log_start = 0  # where the ckfsd log stood after the warm-up
        #: Seconds of each timed run's steps, by snapshotter and step.
        self.phases: dict[tuple[str, str], list[float]] = collections.defaultdict(list)

    def fresh(self, warmup: str, snapshotter: str) -> None:
        """Both daemons on empty roots, warmed by pulling and running *warmup*."""
        self.close()
        root, ctd = self.work / "ckfsd-root", self.work / "containerd"
        for d in (root, ctd):
            shutil.rmtree(d, ignore_errors=True)
        self.ckfsd = self.stack.enter_context(running_ckfsd(root))
        sock = self.stack.enter_context(containerd(ctd, proxy=str(self.ckfsd.socket)))
        self.ctr = ["ctr", "--address", str(sock)]
        self.pull_and_run(warmup, snapshotter, "cat", "/etc/os-release")
        self.log_start = self.ckfsd.log.stat().st_size
        # The previous run's writes and removals reach the disk now, not
        # during the next timed run.
        run(["sync"])

    def served(self) -> tuple[int, float]:
        """RPCs ckfsd served since the warm-up and the sum of their durations (s)."""
        if self.ckfsd is None:
            return 0, 0.0
        with self.ckfsd.log.open("rb") as f:
            f.seek(self.log_start)
            lines = f.read().decode(errors="replace").splitlines()
        ms = [float(m[3]) for m in map(RPC_LOG.search, lines) if m]
        return len(ms), sum(ms) / 1e3

    def pull_and_run(self, ref: str, snapshotter: str, *command: str, record: bool = False) -> None:
        """``ctr images pull`` then ``ctr run --rm`` of *ref* on *snapshotter*.

        With *record*, each step's time goes to `phases`.
        """
        on = ["--snapshotter", snapshotter]
        t0 = time.perf_counter()
        run([*self.ctr, "images", "pull", "--plain-http", *on, ref])
        t1 = time.perf_counter()
        run([*self.ctr, "run", "--rm", *on, ref, f"bench-{next(self.runs)}", *command])
        if record:
            self.phases[snapshotter, "pull"].append(t1 - t0)
            self.phases[snapshotter, "run"].append(time.perf_counter() - t1)

    def snapshots(self, snapshotter: str) -> int:
        """How many snapshots containerd lists on *snapshotter*."""
        out = subprocess.run(
            [*self.ctr, "snapshots", "--snapshotter", snapshotter, "ls"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return len(out.splitlines()) - 1

    def close(self) -> None:
        """Stop what a failed run left running, then containerd and ckfsd, by PID."""
        if self.ctr:
            self.kill_tasks()
        self.ctr = []
        self.stack.close()
        unmount_recursive(self.work, lazy=True)

    def kill_tasks(self) -> None:
        """Kill and delete every task, so no shim outlives containerd."""
        ls = subprocess.run([*self.ctr, "tasks", "ls", "-q"], capture_output=True, text=True)
        for task in ls.stdout.split():
            subprocess.run([*self.ctr, "tasks", "kill", "-s", "SIGKILL", task], check=False)
            subprocess.run([*self.ctr, "tasks", "delete", "-f", task], check=False)


def main() -> None:
    args = bench_args(__doc__)

    layout = big_layout(args.mib, runnable=True)
    size = layout_size(layout)
    work = Path(tempfile.mkdtemp(prefix="ckfs-bench-containerd-"))
    registry = Registry(work / "registry").start()
    daemons = Daemons(work)
    try:
        registry.push(layout, IMAGE)
        registry.push(example_layout(), WARMUP)
        ref, warmup = f"{registry.host}/{IMAGE}", f"{registry.host}/{WARMUP}"
        times = timed_turns(
            {
                s: (
                    functools.partial(daemons.fresh, warmup, s),
                    functools.partial(daemons.pull_and_run, ref, s, COMMAND, record=True),
                )
                for s in ("overlayfs", PROXY)  # the proxy last: its daemons are checked
            },
            args.repeat,
        )
        # The last run really went through ckfsd: the image's layers are there.
        held = daemons.snapshots(PROXY)
        assert held >= LAYERS, f"{PROXY} holds {held} snapshots"
        rpcs, served = daemons.served()
    finally:
        daemons.close()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(
        f"cold ctr images pull + ctr run --rm of a {size / 1e6:.0f} MB image from a local "
        f"registry, warm daemons (median of {args.repeat})",
        [
            ("ckfs proxy snapshotter (ckfsd)", times[PROXY]),
            ("containerd's overlayfs", times["overlayfs"]),
        ],
        "<= 1.0x overlayfs",
    )
    for (snapshotter, step), times_of in sorted(daemons.phases.items()):
        what = "ctr images pull (fetch+unpack)" if step == "pull" else "ctr run --rm"
        print(f"    {snapshotter:<10} {what:<30} {statistics.median(times_of):8.3f} s")
    print(f"  ckfsd in the last ckfs run: {rpcs} RPCs, {served:.3f} s served in all")


if __name__ == "__main__":
    main()
