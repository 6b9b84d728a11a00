"""Cold pull of a >= 200 MB multi-layer image from a local registry: ckfs vs skopeo vs containerd.

    .venv/bin/python bench/pull.py [--mib 260] [--repeat 3]

Set up once, not timed: the layout of `common.big_layout`, pushed by skopeo
into Debian's docker-registry on a free 127.0.0.1 port with temporary
storage (its blobs then sit in the page cache, for every tool alike).

Timed, each into an empty destination, median of ``--repeat`` runs, the
tools taking turns:

- ckfs: ``ckfs fetch REF``: every blob streamed into the content store,
  hashed, verified and committed; no name registered.
- ckfs in process: the same fetch through the library in this (warm)
  process: what a long-running ckfs process pays, with no interpreter
  start-up or imports. Shown for the analysis; the target is on the command.
- the disk's part: the same blobs copied from the page cache and fsynced,
  the floor under every tool here (all of them fsync what they fetch).
- skopeo: ``skopeo copy docker://REF oci:DEST`` (it verifies too).
- containerd: ``ctr content fetch --plain-http REF`` against a containerd
  with its own root, state and socket, restarted empty before each run.

Then the re-pull, the whole ``ckfs pull`` process with everything present:
by tag (one manifest HEAD), by digest and ``--offline`` (no network). It
imports neither trio nor httpx; the floor printed under it is starting
Python and importing the CLI and the stores, and the trio and httpx imports
are shown for what a full pull's start-up costs on top. Targets: ckfs <=
0.8x skopeo; re-pull < 0.15 s.

Then the warm path, where a long-lived daemon does the work and the command
is a light client: before each timed run the daemon restarts on an empty
root and pulls the small example image (`common.example_layout`), all
untimed, so it is warm (imports done, registry connection open, threads
up) while its store holds no blob of REF:

- ckfs: ``ckfs --address unix://… pull REF`` through ckfsd (the client
  process included in the time).
- containerd: ``ctr content fetch --plain-http REF`` against containerd
  warmed the same way.

skopeo, which has no daemon, is timed again beside them, as above; the
three take turns. Targets: ckfs <= 0.8x skopeo and <= 0.8x ctr. Last, the
re-pull of the present image through the warm daemons: ``ckfs pull REF``
through ckfsd versus ``ctr images pull REF`` (fetched and unpacked once
before timing). Target: <= 1.0x.
Under it, the Pull RPC alone on a channel opened once: the daemon's part.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    bench_args,
    big_layout,
    ckfs_client_cmd,
    ckfs_cmd,
    containerd,
    example_layout,
    import_seconds,
    layout_size,
    report,
    run,
    skopeo_copy,
    timed,
    timed_turns,
)

sys.path.insert(0, str(REPO))

from integration.daemon import running_ckfsd
from integration.registry import Registry

IMAGE = "bench/pull:latest"
#: The small image the daemons are warmed with before each timed run.
WARMUP = "bench/warmup:latest"


def fetch_in_process(root: Path, ref: str) -> None:
    """``ckfs fetch REF`` through the library, in this already warm process."""
    import trio

    from ckfs import reference
    from ckfs.pull import pull
    from ckfs.state import State

    state = State(root)
    try:
        trio.run(
            functools.partial(
                pull, reference.parse(ref), state.content, state.images, register=False
            )
        )
    finally:
        state.close()


def write_and_sync(layout: Path, dest: Path) -> None:
    """Write the layout's blobs to *dest* in 1 MiB writes and fsync each: the disk's part.

    Every tool here makes the blobs durable (skopeo and containerd fsync them
    too), so this is a floor none of them can go under on this disk.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for blob in sorted((layout / "blobs" / "sha256").iterdir()):
        fd = os.open(dest / blob.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with blob.open("rb") as src:
                while chunk := src.read(1 << 20):
                    os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)


def pull_rpc(channel: grpc.Channel, ref: str) -> Callable[[], None]:
    """One ckfsd Pull RPC of *ref* on an open *channel*: the re-pull without a client process.

    The stream is read to its end, the summary last.
    """
    from ckfs.api.v1 import ckfs_pb2, ckfs_pb2_grpc

    stub = ckfs_pb2_grpc.CkfsStub(channel)
    options = ckfs_pb2.PullOptions(plain_http=True)
    request = ckfs_pb2.PullRequest(ref=ref, register=True, options=options)

    def call() -> None:
        *_, last = stub.Pull(request, metadata=(("containerd-namespace", "default"),))
        assert last.HasField("summary"), last

    return call


def warm_daemons(ref: str, warmup: str, work: Path, repeat: int) -> dict[str, float]:
    """The warm path: cold pulls and re-pulls of *ref* through ckfsd and containerd, skopeo beside.

    Each daemon restarts on an empty root and pulls *warmup* before each cold
    run, outside the timing; the re-pulls follow on the last daemons, whose
    stores then hold *ref*. The tools take turns.
    """
    ckfsd, ctd = contextlib.ExitStack(), contextlib.ExitStack()
    address: list[str] = []  # the running ckfsd's address
    ctr: list[str] = []  # the ctr command line for the running containerd

    def ckfs(*args: str) -> list[str]:
        return ckfs_client_cmd(address[0], *args)

    def fresh_ckfsd() -> None:
        ckfsd.close()
        root = work / "ckfsd-root"
        shutil.rmtree(root, ignore_errors=True)
        address[:] = [ckfsd.enter_context(running_ckfsd(root)).address]
        run(ckfs("pull", "-q", "--plain-http", warmup))
        run(["sync"])  # the removed root's writes, now rather than in the timed run

    def fresh_containerd() -> None:
        ctd.close()
        root = work / "containerd-warm"
        shutil.rmtree(root, ignore_errors=True)
        ctr[:] = ["ctr", "--address", str(ctd.enter_context(containerd(root)))]
        run([*ctr, "content", "fetch", "--plain-http", warmup])
        run(["sync"])

    def ckfs_pull() -> None:
        run(ckfs("pull", "-q", "--plain-http", ref))

    def clean_skopeo() -> None:
        shutil.rmtree(work / "skopeo-warm", ignore_errors=True)
        run(["sync"])

    def skopeo() -> None:
        skopeo_copy(f"docker://{ref}", f"oci:{work / 'skopeo-warm'}:latest")

    def ctr_fetch() -> None:
        run([*ctr, "content", "fetch", "--plain-http", ref])

    def ctr_pull() -> None:
        run([*ctr, "images", "pull", "--plain-http", ref])

    try:
        times = timed_turns(
            {
                "ckfsd": (fresh_ckfsd, ckfs_pull),
                "skopeo": (clean_skopeo, skopeo),
                "ctr": (fresh_containerd, ctr_fetch),
            },
            repeat,
        )
        summary = json.loads(
            subprocess.run(
                ckfs("pull", "--json", "--plain-http", ref),
                check=True,
                capture_output=True,
                text=True,
            ).stdout.splitlines()[-1]
        )
        assert summary["fetched_blobs"] == 0, summary
        ctr_pull()  # registers and unpacks: the re-pulls find it all present
        channel = ckfsd.enter_context(grpc.insecure_channel(address[0]))
        present = timed_turns(
            {
                "ckfsd re-pull": (lambda: None, ckfs_pull),
                "ckfsd re-pull rpc": (lambda: None, pull_rpc(channel, ref)),
                "ctr re-pull": (lambda: None, ctr_pull),
            },
            max(5, repeat),
        )
    finally:
        ckfsd.close()
        ctd.close()
    return times | present


def main() -> None:
    args = bench_args(__doc__)

    layout = big_layout(args.mib)
    size = layout_size(layout)
    work = Path(tempfile.mkdtemp(prefix="ckfs-bench-pull-"))
    registry = Registry(work / "registry").start()
    daemons = contextlib.ExitStack()
    try:
        digest = registry.push(layout, IMAGE)
        registry.push(example_layout(), WARMUP)
        ref = f"{registry.host}/{IMAGE}"
        root, dest, ctd = work / "root", work / "dest", work / "containerd"
        ctr: list[str] = []  # the ctr command line for the current containerd

        def clean() -> None:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(dest, ignore_errors=True)

        def fresh_containerd() -> None:
            daemons.close()
            shutil.rmtree(ctd, ignore_errors=True)
            sock = daemons.enter_context(containerd(ctd))
            ctr[:] = ["ctr", "--address", str(sock)]

        cold = timed_turns(
            {
                "ckfs": (clean, lambda: run(ckfs_cmd(root, "fetch", "-q", ref))),
                "lib": (clean, lambda: fetch_in_process(root, ref)),
                "disk": (clean, lambda: write_and_sync(layout, dest)),
                "skopeo": (clean, lambda: skopeo_copy(f"docker://{ref}", f"oci:{dest}:latest")),
                "ctr": (
                    fresh_containerd,
                    lambda: run([*ctr, "content", "fetch", "--plain-http", ref]),
                ),
            },
            args.repeat,
        )
        t_ckfs, t_lib, t_disk = cold["ckfs"], cold["lib"], cold["disk"]
        t_skopeo, t_ctr = cold["skopeo"], cold["ctr"]
        daemons.close()

        # Re-pull: everything present, the name registered by one real pull.
        clean()
        run(ckfs_cmd(root, "pull", "-q", ref))
        summary = json.loads(
            subprocess.run(
                ckfs_cmd(root, "pull", "--json", ref), check=True, capture_output=True, text=True
            ).stdout.splitlines()[-1]
        )
        assert summary["fetched_blobs"] == 0, summary
        pinned = f"{registry.host}/{IMAGE.split(':')[0]}@{digest}"
        repeat = max(5, args.repeat)
        t_tag = timed(lambda: None, lambda: run(ckfs_cmd(root, "pull", "-q", ref)), repeat)
        t_digest = timed(lambda: None, lambda: run(ckfs_cmd(root, "pull", "-q", pinned)), repeat)
        t_offline = timed(
            lambda: None, lambda: run(ckfs_cmd(root, "pull", "-q", "--offline", ref)), repeat
        )
        t_python = import_seconds("")
        t_trio = import_seconds("trio")
        t_httpx = import_seconds("httpx")
        t_both = import_seconds("trio, httpx")
        t_cli = import_seconds("ckfs_cli.main, ckfs.pull")
        t_client = import_seconds("ckfs_cli.main, ckfs.client")
        warm = warm_daemons(ref, f"{registry.host}/{WARMUP}", work, args.repeat)
    finally:
        daemons.close()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)

    report(
        f"cold pull (fetch only) of a {size / 1e6:.0f} MB image from a local docker-registry "
        f"(median of {args.repeat})",
        [
            ("ckfs fetch", t_ckfs),
            ("skopeo copy docker:// oci:", t_skopeo),
            ("ctr content fetch", t_ctr),
        ],
        "<= 0.8x skopeo",
    )
    print(f"  ckfs fetch in process (no start-up)      {t_lib:8.3f} s")
    print(f"  the disk's part: write + fsync the blobs {t_disk:8.3f} s")
    print(f"  ratio in process / skopeo                {t_lib / t_skopeo:8.2f}x")
    print(f"  ckfs throughput                          {size / t_ckfs / 1e6:8.0f} MB/s")
    print(f"re-pull with everything present, whole process (median of {repeat})")
    print(f"  ckfs pull by tag (one HEAD)              {t_tag:8.3f} s")
    print(f"  ckfs pull by digest (no network)         {t_digest:8.3f} s")
    print(f"  ckfs pull --offline (no network)         {t_offline:8.3f} s")
    print("  target: < 0.15 s; the floor, per process:")
    print(f"    python start-up                        {t_python:8.3f} s")
    print(f"    + import ckfs_cli.main, ckfs.pull      {t_cli:8.3f} s")
    print("  what a full pull's start-up adds (the re-pull avoids it):")
    print(f"    + import trio                          {t_trio:8.3f} s")
    print(f"    + import httpx                         {t_httpx:8.3f} s")
    print(f"    + import trio, httpx                   {t_both:8.3f} s")
    report(
        f"cold pull through a warm daemon, store empty (median of {args.repeat})",
        [
            ("ckfs pull through ckfsd", warm["ckfsd"]),
            ("skopeo copy docker:// oci:", warm["skopeo"]),
            ("ctr content fetch, warm containerd", warm["ctr"]),
        ],
        "<= 0.8x skopeo, <= 0.8x ctr",
    )
    print(f"  the client's floor: import ckfs_cli.main, ckfs.client {t_client:8.3f} s")
    report(
        f"re-pull of a present image through a warm daemon (median of {max(5, args.repeat)})",
        [
            ("ckfs pull through ckfsd", warm["ckfsd re-pull"]),
            ("ctr images pull, warm containerd", warm["ctr re-pull"]),
        ],
        "<= 1.0x",
    )
    print(f"  the Pull RPC alone, channel open          {warm['ckfsd re-pull rpc']:8.3f} s")


if __name__ == "__main__":
    main()
