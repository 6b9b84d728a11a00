"""Cold pull of a >= 200 MB multi-layer image from a local registry: ckfs vs skopeo vs containerd.

    .venv/bin/python bench/pull.py [--mib 260] [--repeat 3]

Set up once, not timed: the layout of `common.big_layout`, pushed by skopeo
into Debian's docker-registry on a free 127.0.0.1 port with temporary
storage (its blobs then sit in the page cache, for every tool alike).

Timed, each into an empty destination, median of ``--repeat`` runs:

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    bench_args,
    big_layout,
    ckfs_cmd,
    containerd,
    import_seconds,
    layout_size,
    report,
    run,
    skopeo_copy,
    timed,
)

sys.path.insert(0, str(REPO))

from integration.registry import Registry

IMAGE = "bench/pull:latest"


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


def main() -> None:
    args = bench_args(__doc__)

    layout = big_layout(args.mib)
    size = layout_size(layout)
    work = Path(tempfile.mkdtemp(prefix="ckfs-bench-pull-"))
    registry = Registry(work / "registry").start()
    daemons = contextlib.ExitStack()
    try:
        digest = registry.push(layout, IMAGE)
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

        t_ckfs = timed(clean, lambda: run(ckfs_cmd(root, "fetch", "-q", ref)), args.repeat)
        t_lib = timed(clean, lambda: fetch_in_process(root, ref), args.repeat)
        t_disk = timed(clean, lambda: write_and_sync(layout, dest), args.repeat)
        t_skopeo = timed(
            clean,
            lambda: skopeo_copy(f"docker://{ref}", f"oci:{dest}:latest"),
            args.repeat,
        )
        t_ctr = timed(
            fresh_containerd,
            lambda: run([*ctr, "content", "fetch", "--plain-http", ref]),
            args.repeat,
        )
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


if __name__ == "__main__":
    main()
