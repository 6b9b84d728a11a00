"""Import a >= 200 MB multi-layer OCI layout: ckfs vs skopeo, same layout, same run.

    .venv/bin/python bench/import.py [--mib 260] [--repeat 3]

ckfs: ``ckfs import`` into an empty root (every blob verified and committed).
skopeo: ``skopeo copy oci:A oci:B`` into an empty layout (it too verifies).
Both read the source from the page cache (warmed once before timing), so the
comparison is of the work each does, not of the disk. Target: <= 1.0x skopeo.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_args, big_layout, ckfs_cmd, layout_size, report, run, skopeo_copy, timed


def main() -> None:
    args = bench_args(__doc__)

    layout = big_layout(args.mib)
    size = layout_size(layout)
    work = Path(tempfile.mkdtemp(prefix="ckfs-bench-"))
    try:
        root, dest = work / "root", work / "dest"
        # Warm the page cache with the source once, for both tools alike.
        for p in (layout / "blobs").rglob("*"):
            if p.is_file():
                p.read_bytes()

        def clean() -> None:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(dest, ignore_errors=True)

        t_ckfs = timed(
            clean,
            lambda: run(ckfs_cmd(root, "import", "--name", "bench/import:latest", str(layout))),
            args.repeat,
        )
        t_skopeo = timed(
            clean,
            lambda: skopeo_copy(f"oci:{layout}:latest", f"oci:{dest}:latest"),
            args.repeat,
        )
        t_again = timed(
            lambda: None,
            lambda: run(ckfs_cmd(root, "import", "--name", "bench/import:latest", str(layout))),
            args.repeat,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(
        f"import of {size / 1e6:.0f} MB OCI layout (median of {args.repeat})",
        [("ckfs import", t_ckfs), ("skopeo copy oci: oci:", t_skopeo)],
        "<= 1.0x skopeo",
    )
    print(f"  ckfs re-import (all present)             {t_again:8.3f} s")


if __name__ == "__main__":
    main()
