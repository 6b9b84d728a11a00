"""What a killed daemon leaves behind, cleared before the next one serves.

A ckfsd killed with SIGKILL mid-pull or mid-unpack leaves:

- ingests (``content/ingest/``): resumable by design, kept; the next pull
  of the same blob continues from their offset;
- file locks: ``flock`` dies with its process, nothing to do;
- ``extract-<unique> <chainID>`` active snapshots of interrupted unpacks:
  removed here when nobody holds that chain ID's unpack lock (a daemonless
  ``ckfs`` may be unpacking the same root right now: its lock protects its
  snapshot), as the next unpack of the layer or ``ckfs gc`` would;
- directories no snapshot row owns (a crash between creating a directory
  and committing its row): each snapshotter's `ckfs.snapshots.Cleaner`.

Only snapshotters that have a directory under the root are opened: a
recovery must not create state for a snapshotter nobody used.

Lazy mounts (`recover_fuse`): the FUSE server outlives ckfsd, so a restarted
ckfsd normally finds it serving and every mount on it healthy. If the server
died too (a reboot, a crash), the start is where it comes back: the server
is started again and each ``ckfs mount`` made on the dead one is remounted
at its target (`snapshotters.fuse.recover.recover`, what ``ckfs mounts
recover`` runs).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import snapshotters
from ckfs.digest import Digest
from ckfs.errors import CkfsError, InvalidArgument
from ckfs.locks import try_lock
from ckfs.snapshots import Cleaner, Snapshotter
from ckfs.state import State
from ckfs.unpack import extract_snapshots, lock_path, remove_leftover

__all__ = ["recover", "recover_fuse"]

log = logging.getLogger("ckfsd")


def recover(state: State) -> list[str]:
    """Clear the leftovers of interrupted work on *state*; what was removed.

    Runs in a worker thread: every step is blocking store work.
    """
    removed: list[str] = []
    state.lock_dir.mkdir(parents=True, exist_ok=True)
    for name in snapshotters.NAMES:
        if not (state.root / "snapshots" / name).is_dir():
            continue
        sn = state.snapshotter(name)
        removed += [f"{name} snapshot {key!r}" for key in _interrupted_unpacks(sn, state)]
        if isinstance(sn, Cleaner):
            removed += [f"{name} directory {path}" for path in sn.cleanup()]
    return removed


@contextlib.contextmanager
def _unpack_lock(state: State, chain_id: str) -> Iterator[bool]:
    """Whether the unpack lock of *chain_id* is free, holding it while true.

    The lock file is the one `ckfs.unpack` takes (`ckfs.unpack.lock_path`).
    A name that is no chain ID was not made by an unpack: never free.
    """
    try:
        path = lock_path(state.lock_dir, Digest.parse(chain_id))
    except InvalidArgument:
        yield False
        return
    fd = try_lock(path)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def _interrupted_unpacks(sn: Snapshotter, state: State) -> list[str]:
    removed = []
    for key, chain_id in extract_snapshots(sn):
        with _unpack_lock(state, chain_id) as free:
            if free and remove_leftover(sn, key):
                removed.append(key)
    return removed


def recover_fuse(state: State) -> list[str]:
    """Bring back the lazy mounts of *state* whose FUSE server died; what was done.

    Runs only when the fuse snapshotter has something standing on the FUSE
    mount (a ``ckfs mount``, or a layer attached for containerd), so a root
    that never went lazy starts no server. A failure is logged, not raised:
    ckfsd serves either way, and ``ckfs mounts recover`` can try again.
    Runs in a worker thread (it may wait for the server to mount).
    """
    if not (state.root / "snapshots" / "fuse").is_dir():
        return []
    from ckfs.mount import mount_target
    from snapshotters.fuse.recover import recover as recover_mounts
    from snapshotters.fuse.snapshotter import FuseSnapshotter

    sn = state.snapshotter("fuse")
    assert isinstance(sn, FuseSnapshotter)
    mounts = any(mount_target(info.name) is not None for info in sn.walk())
    if not mounts and not sn.attached_layers():
        return []
    try:
        report = recover_mounts(sn)
    except (CkfsError, OSError) as e:
        log.error("fuse: recovery failed: %s", e)
        return []
    done = ["started the FUSE server"] if report.started else []
    done += [f"remounted {target}" for target in report.remounted]
    for target, why in report.failed:
        log.error("fuse: cannot remount %s: %s", target, why)
    return done
