"""A full disk is one clear line and leaves the store as it was."""

from __future__ import annotations

import json
from pathlib import Path

from ckfs.mount import Mount
from integration.conftest import EXAMPLE_NAME, Ckfs
from integration.mounts import MountGuard


def small_disk(guard: MountGuard, where: Path, size: str) -> Path:
    return guard.mount([Mount("tmpfs", "tmpfs", options=(f"size={size}", "mode=0755"))], where)


def test_import_onto_a_full_disk(
    mount_guard: MountGuard, example_layout: Path, tmp_path: Path
) -> None:
    # The example image is about 1.1 MB compressed: it cannot fit in 512 KiB.
    root = small_disk(mount_guard, tmp_path / "disk", "512k")
    ckfs = Ckfs(root / "state")
    line = ckfs.fails("import", "--name", EXAMPLE_NAME, str(example_layout))
    assert "No space left on device" in line and str(root) in line
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
