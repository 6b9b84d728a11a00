"""The native snapshotter: every active snapshot is a full copy of its parent.

It needs nothing from the kernel but bind mounts, so it works on any
filesystem (and under overlayfs itself, where overlay-on-overlay fails). The
price is disk and time: preparing a child copies the parent's whole tree.
Mounts are containerd's (``plugins/snapshots/native``):

===========================  ==========================================
snapshot                     mount
===========================  ==========================================
Prepare (any parent)         ``bind`` of its own ``fs``, ``rw,rbind``
View, no parent              ``bind`` of its own (empty) ``fs``, ``ro,rbind``
View of a parent             ``bind`` of the parent's ``fs``, ``ro,rbind``
===========================  ==========================================

A view is never copied: the parent is committed, hence immutable, and a
read-only bind of it is exactly its content.

Why ``cp -a --reflink=auto`` rather than a copy in Python: it preserves
everything a layer can hold (modes, owners, xattrs including
``security.capability``, hard links within the tree, devices, fifos,
symlinks, times) without code of ours to get wrong, shares blocks where the
filesystem can (btrfs, XFS), and is the faster of the two. Measured here,
alternating runs on tmpfs (so the disk does not blur the comparison): a tree
of 20,000 small files (117 MB) took 0.68 s with ``cp`` against 0.95 s for an
``os.copy_file_range`` walk in Python; two 512 MiB files took 1.7 s against
2.4 s. On this machine's ext4 the same small-file tree took anywhere from
1.9 s to 22 s with either method: there the disk decides.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ckfs.errors import CkfsError, FailedPrecondition
from ckfs.mount import Mount
from ckfs.snapshots import Kind
from snapshotters.base import ROOT_MODE, DirectorySnapshotter
from snapshotters.storage import Snapshot

__all__ = ["NativeSnapshotter", "copy_tree"]


def copy_tree(src: Path, dst: Path) -> None:
    """Copy the tree *src* to the new path *dst*, preserving all metadata.

    Raises:
        FailedPrecondition: GNU ``cp`` is not installed.
        CkfsError: the copy failed (its stderr is the message).
    """
    cp = shutil.which("cp")
    if cp is None:
        raise FailedPrecondition("native snapshotter: cp (GNU coreutils) not found")
    # -T: dst is the copy itself, never a directory to copy into; an
    # existing dst is a bug, not a place to nest the tree.
    proc = subprocess.run(
        [cp, "-a", "--reflink=auto", "-T", "--", os.fspath(src), os.fspath(dst)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise CkfsError(f"copy {src} to {dst}: {proc.stderr.strip()}")


class NativeSnapshotter(DirectorySnapshotter):
    """Snapshots as full directory copies under ``<root>/snapshots/native``.

    Args:
        root: the ckfs state root.
        db: its metadata database.
    """

    name = "native"

    #: `ckfs.snapshots.LayerLimit`: every snapshot is a whole copy, never
    #: a stack, so any number of layers mounts.
    max_layers: int | None = None

    def _populate(self, path: Path, kind: Kind, parent_ids: tuple[int, ...]) -> None:
        fs = path / "fs"
        if kind is Kind.ACTIVE and parent_ids:
            copy_tree(self._fs(parent_ids[0]), fs)
            return
        fs.mkdir()
        os.chmod(fs, ROOT_MODE)

    def _mounts(self, snapshot: Snapshot) -> list[Mount]:
        s = snapshot
        if s.kind is Kind.VIEW:
            source = self._fs(s.parent_ids[0]) if s.parent_ids else self._fs(s.id)
            return [Mount("bind", str(source), options=("ro", "rbind"))]
        return [Mount("bind", str(self._fs(s.id)), options=("rw", "rbind"))]
