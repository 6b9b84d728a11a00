"""Cold mount of a >= 200 MB, >= 10k-file image from a local registry: ckfs vs containerd vs umoci.

    .venv/bin/python bench/unpack.py [--mib 260] [--repeat 3]

Set up once, not timed: `common.big_layout` (4 layers, 10,000 files) pushed
by skopeo into Debian's docker-registry on a free 127.0.0.1 port.

Timed, each from an empty state with the page cache dropped first (so layer
blobs come from the registry's disk, as on a real first start), median of
``--repeat`` runs:

- ckfs: ``ckfs mount REF DIR`` (pull, unpack into overlayfs snapshots,
  mount), then the mount is undone outside the timing.
- containerd: ``ctr images pull --plain-http REF`` (fetch and unpack into
  its overlayfs snapshotter) on a containerd with private root and socket.
- skopeo + umoci: ``skopeo copy docker://REF oci:DIR`` then
  ``umoci unpack --image DIR:latest BUNDLE``.

Then the second ``ckfs mount`` of the same image to another directory:
everything present, so only a snapshot and a mount. Targets: ckfs <= 0.6x
containerd; second mount < 0.3 s.
"""

from __future__ import annotations

import contextlib
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
    layout_size,
    report,
    run,
    skopeo_copy,
    timed,
)

sys.path.insert(0, str(REPO))

from integration.registry import Registry

IMAGE = "bench/unpack:latest"


def drop_caches() -> None:
    """Write back and drop the page cache (root only; a no-op otherwise)."""
    subprocess.run(["sync"], check=False)
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    args = bench_args(__doc__)

    layout = big_layout(args.mib)
    size = layout_size(layout)
    work = Path(tempfile.mkdtemp(prefix="ckfs-bench-unpack-"))
    registry = Registry(work / "registry").start()
    daemons = contextlib.ExitStack()
    root, mnt, mnt2 = work / "root", work / "mnt", work / "mnt2"
    oci, bundle, ctd = work / "oci", work / "bundle", work / "containerd"
    ctr: list[str] = []

    def ckfs_umount(target: Path) -> None:
        subprocess.run(ckfs_cmd(root, "umount", str(target)), capture_output=True)

    try:
        registry.push(layout, IMAGE)
        ref = f"{registry.host}/{IMAGE}"

        def clean_ckfs() -> None:
            ckfs_umount(mnt)
            shutil.rmtree(root, ignore_errors=True)
            drop_caches()

        def clean_umoci() -> None:
            shutil.rmtree(oci, ignore_errors=True)
            shutil.rmtree(bundle, ignore_errors=True)
            drop_caches()

        def fresh_containerd() -> None:
            daemons.close()
            shutil.rmtree(ctd, ignore_errors=True)
            sock = daemons.enter_context(containerd(ctd))
            ctr[:] = ["ctr", "--address", str(sock)]
            drop_caches()

        t_ckfs = timed(
            clean_ckfs,
            lambda: run(ckfs_cmd(root, "mount", "--plain-http", ref, str(mnt))),
            args.repeat,
        )
        n_files = sum(1 for _ in mnt.rglob("*"))
        t_second = timed(
            lambda: ckfs_umount(mnt2),
            lambda: run(ckfs_cmd(root, "mount", "--plain-http", ref, str(mnt2))),
            max(5, args.repeat),
        )
        ckfs_umount(mnt2)
        ckfs_umount(mnt)
        t_ctr = timed(
            fresh_containerd,
            lambda: run([*ctr, "images", "pull", "--plain-http", ref]),
            args.repeat,
        )
        daemons.close()

        def skopeo_umoci() -> None:
            skopeo_copy(f"docker://{ref}", f"oci:{oci}:latest")
            run(["umoci", "unpack", "--image", f"{oci}:latest", str(bundle)])

        t_umoci = timed(clean_umoci, skopeo_umoci, args.repeat)
    finally:
        daemons.close()
        ckfs_umount(mnt2)
        ckfs_umount(mnt)
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(
        f"cold mount of a {size / 1e6:.0f} MB, {n_files}-entry image from a local registry, "
        f"page cache dropped (median of {args.repeat})",
        [
            ("ckfs mount (pull+unpack+mount)", t_ckfs),
            ("ctr images pull (fetch+unpack)", t_ctr),
            ("skopeo copy + umoci unpack", t_umoci),
        ],
        "<= 0.6x containerd",
    )
    print(f"  second ckfs mount (all present)          {t_second:8.3f} s   target: < 0.3 s")


if __name__ == "__main__":
    main()
