"""A full disk is one clear line and leaves the store as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckfs.mount import Mount
from integration.conftest import EXAMPLE_NAME, Ckfs
from integration.mounts import MountGuard


def small_disk(guard: MountGuard, where: Path, size: str, *options: str) -> Path:
    opts = (f"size={size}", "mode=0755", *options)
    return guard.mount([Mount("tmpfs", "tmpfs", options=opts)], where)


@pytest.mark.parametrize(
    ("size", "options", "said"),
    [
        # The example image is about 1.1 MB compressed: refused before a byte
        # is copied, with the numbers.
        ("512k", (), "the import needs 1.1 MB, "),
        # Bytes to spare but few inodes: the space check passes and the
        # ingest writes meet ENOSPC, which must be reported and undone too.
        ("64m", ("nr_inodes=16",), "No space left on device"),
    ],
    ids=["bytes", "inodes"],
)
def test_import_onto_a_full_disk(
    mount_guard: MountGuard,
    example_layout: Path,
    tmp_path: Path,
    size: str,
    options: tuple[str, ...],
    said: str,
) -> None:
    root = small_disk(mount_guard, tmp_path / "disk", size, *options)
    ckfs = Ckfs(root / "state")
    line = ckfs.fails("import", "--name", EXAMPLE_NAME, str(example_layout))
    assert said in line and str(root) in line
    assert ckfs.run("images", "ls", "-q").stdout == ""
    assert ckfs.run("content", "ls", "-q").stdout == ""
    assert json.loads(ckfs.run("content", "active", "--json").stdout) == []


def test_unpack_onto_a_full_disk(
    mount_guard: MountGuard, example_layout: Path, tmp_path: Path
) -> None:
    # Room for the blobs and the database, not for the unpacked busybox too.
    root = small_disk(mount_guard, tmp_path / "disk", "2m")
    ckfs = Ckfs(root / "state")
    ckfs.run("import", "--name", EXAMPLE_NAME, str(example_layout))
    target = tmp_path / "rootfs"
    line = ckfs.fails("mount", "--snapshotter", "native", EXAMPLE_NAME, str(target))
    assert "No space left on device" in line and str(root) in line
    # Nothing half-made is left: no mount, no snapshot, the image intact.
    assert json.loads(ckfs.run("snapshots", "-s", "native", "ls", "--json").stdout) == []
    assert ckfs.run("images", "ls", "-q").stdout.split() == [EXAMPLE_NAME]
    assert "0 corrupt" in ckfs.run("content", "verify").stdout
