"""The overlay snapshotter: each snapshot is one overlayfs layer directory.

A snapshot's ``fs`` directory holds only its own changes; stacking is the
kernel's job. Mounts are exactly containerd's
(``plugins/snapshots/overlay/overlay.go``), so what ckfs hands out can be
used wherever containerd's would:

=========================  =====================================================
snapshot                   mounts
=========================  =====================================================
Prepare, no parent         ``bind`` of its own ``fs``, ``rw,rbind``
View, no parent            ``bind`` of its own (empty) ``fs``, ``ro,rbind``
View of one parent         ``bind`` of the parent's ``fs``, ``ro,rbind``
Prepare with parents       ``overlay``: ``workdir``, ``upperdir``,
                           ``lowerdir`` (most recent first), ``index=off``
View of several parents    ``overlay`` with ``lowerdir`` only (read-only by
                           construction), ``index=off``
=========================  =====================================================

Why bind mounts for the single-directory cases: overlayfs needs a lower
layer, and a bind costs nothing. Why ``index=off``: with the index on,
overlayfs records the layers' identity in the upper directory and refuses
to mount it again over different lowers, while a snapshot's lowers are
legitimately reopened after a reboot or by another tool; containerd turns it
off whenever the kernel has the parameter.

More than about 40 layers under a long root no longer fit one page of mount
options; `ckfs.mount` then passes the layers relative to their common parent
(this snapshotter's directory), ``<id>/fs`` each. Even so a page holds only
so many: with 4-digit snapshot ids about 490 layers, with 6-digit ids about
400, fewer than the kernel's own maximum of 500 (``OVL_MAX_STACK``).
`OverlaySnapshotter.max_layers` is the smaller of the two for this state
root, so an image deeper than that is refused before it is fetched or
unpacked rather than after (`ckfs.rootfs.check_depth`).

The layer applier writes overlay-form whiteouts (``0/0`` character devices,
``trusted.overlay.opaque``) straight into `OverlaySnapshotter.upper_dir`
rather than through a mount: `upper_dir` and `lower_dirs` (`ckfs.snapshots.LayerDirs`)
are for that.
Renaming a directory that came from a lower layer needs ``redirect_dir``,
which this snapshotter leaves at the kernel default (off here), so such a
rename fails with ``EXDEV`` (tools fall back to copying), as with containerd.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckfs.metadata.db import DB
from ckfs.mount import PAGE_SIZE, Mount
from ckfs.snapshots import Kind
from snapshotters.base import ROOT_MODE, DirectorySnapshotter
from snapshotters.storage import Snapshot

__all__ = ["OverlaySnapshotter", "supports_index"]

#: Lower layers one overlayfs mount stacks at most: the kernel's
#: ``OVL_MAX_STACK`` (fs/overlayfs/params.h), beyond which mount fails with
#: EINVAL ("too many lower directories").
OVL_MAX_STACK = 500

#: Present when the running kernel's overlayfs knows the ``index`` option.
INDEX_PARAMETER = Path("/sys/module/overlay/parameters/index")


def supports_index() -> bool:
    """Whether ``index=off`` may be passed (containerd's ``supportsIndex``)."""
    return INDEX_PARAMETER.exists()


class OverlaySnapshotter(DirectorySnapshotter):
    """Snapshots as overlayfs layers under ``<root>/snapshots/overlayfs``.

    Args:
        root: the ckfs state root.
        db: its metadata database.
    """

    name = "overlayfs"

    def __init__(self, root: Path, db: DB) -> None:
        super().__init__(root, db)
        #: Options appended to every overlay mount.
        self.options: tuple[str, ...] = ("index=off",) if supports_index() else ()

    @property
    def max_layers(self) -> int:
        """Most layers one snapshot here can stack (`ckfs.snapshots.LayerLimit`).

        The smaller of the kernel's `OVL_MAX_STACK` and what fits one page
        of mount options, for the worst case: a prepared (writable)
        snapshot, whose ``workdir`` and ``upperdir`` are absolute paths
        while `ckfs.mount` makes ``lowerdir`` relative to this snapshotter's
        directory (``<id>/fs`` per layer, ``:`` between). mount(2) reads
        at most a page, NUL included. Ids only grow (AUTOINCREMENT), and
        the layers still to unpack take new ones: the bound assumes every
        id as wide as the last one handed out plus `OVL_MAX_STACK`.
        """
        rows = self._store.db.query("SELECT seq FROM sqlite_sequence WHERE name = 'snapshots'")
        widest = int(rows[0]["seq"]) if rows else 0
        fits = self._fit_in_page(len(str(widest + OVL_MAX_STACK)))
        # One layer always mounts read-only (a bind); under a root too long for
        # even that page, a writable snapshot fails at the mount, as before.
        return max(1, min(OVL_MAX_STACK, fits))

    def _fit_in_page(self, width: int) -> int:
        """How many lower layers with *width*-digit ids one page of options holds."""
        some_id = 10 ** (width - 1)
        fixed = ",".join(
            [
                f"workdir={self._work(some_id)}",
                f"upperdir={self._fs(some_id)}",
                "lowerdir=",
                *self.options,
            ]
        )
        # fixed + n * len("<id>/fs") + (n - 1) colons <= PAGE_SIZE - 1 (the NUL)
        return (PAGE_SIZE - len(os.fsencode(fixed))) // (width + len("/fs") + 1)

    def upper_dir(self, key: str) -> Path:
        """The directory holding *key*'s own changes (overlay's upper directory).

        Raises:
            NotFound: no such snapshot.
        """
        return self._fs(self._store.snapshot(key).id)

    def lower_dirs(self, key: str) -> list[Path]:
        """The ``fs`` directories of *key*'s ancestors, most recent first.

        Raises:
            NotFound: no such snapshot.
        """
        return [self._fs(i) for i in self._store.snapshot(key).parent_ids]

    def _work(self, id: int) -> Path:
        return self._store.path(id) / "work"

    def _populate(self, path: Path, kind: Kind, parent_ids: tuple[int, ...]) -> None:
        fs = path / "fs"
        fs.mkdir()
        if parent_ids:
            # The merged root takes the upper directory's owner and mode:
            # carry the parent's over, or an image whose "/" is not
            # root:root 0755 would change at every layer.
            st = os.stat(self._fs(parent_ids[0]))
            os.chown(fs, st.st_uid, st.st_gid)
            os.chmod(fs, st.st_mode & 0o7777)
        else:
            os.chmod(fs, ROOT_MODE)
        if kind is Kind.ACTIVE:
            (path / "work").mkdir(mode=0o711)

    def _mounts(self, snapshot: Snapshot) -> list[Mount]:
        s = snapshot
        if not s.parent_ids:
            ro = "ro" if s.kind is Kind.VIEW else "rw"
            return [Mount("bind", str(self._fs(s.id)), options=(ro, "rbind"))]
        options: list[str] = []
        if s.kind is Kind.ACTIVE:
            options += [f"workdir={self._work(s.id)}", f"upperdir={self._fs(s.id)}"]
        elif len(s.parent_ids) == 1:
            return [Mount("bind", str(self._fs(s.parent_ids[0])), options=("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(str(self._fs(i)) for i in s.parent_ids))
        options += self.options
        return [Mount("overlay", "overlay", options=tuple(options))]
