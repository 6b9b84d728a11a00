"""Lazy mounts that outlive their FUSE server: recorded, checked, brought back.

A lazy rootfs is an overlay whose lower directories are inside the FUSE
server's mount. If that server dies, the overlay keeps pointing at the dead
FUSE mount: every lookup below it fails with ``ENOTCONN`` even after a new
server mounts at the same path, since the overlay holds the old mount's
directories. So each mount remembers which server it was made on (the
`SERVED_BY` label: the server's PID and start time, unique per server), and
`recover` remounts every mount made on a server that is no longer the one
running, and every one not mounted at all (after a reboot).

The mounts are the snapshots ``ckfs mount`` names after their targets
(`ckfs.mount.mount_key`); a merged view's mount is a read-only bind of its
view directory in the FUSE tree (`view_name`), a ``--layer`` mount one of
its layer's directory (`snapshotters.layerview`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import xxhash

from ckfs.errors import CkfsError, NotFound
from ckfs.mount import Mount, is_mountpoint, is_stale, mount_all, mount_target, unmount_all
from ckfs.snapshots import Info
from snapshotters.fuse.process import ServerPaths, ensure_server, server_pid
from snapshotters.fuse.snapshotter import FuseSnapshotter

__all__ = [
    "SERVED_BY",
    "Recovered",
    "label_served",
    "merged_mounts",
    "recover",
    "server_identity",
    "view_name",
]

log = logging.getLogger(__name__)

#: On a mount's snapshot: the server it was mounted on (`server_identity`).
SERVED_BY = "ckfs.io/fuse-server"


def server_identity(paths: ServerPaths) -> str | None:
    """``<pid>:<start time>`` of the live server, None when none runs.

    A PID alone can come back for another process; with the start time (in
    clock ticks since boot, from ``/proc/<pid>/stat``) it names one server.
    """
    pid = server_pid(paths)
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime), counted after the command name's closing ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return f"{pid}:{fields[19]}"


def view_name(key: str) -> str:
    """The merged view a mount snapshot *key* is served through, if it is a merged mount."""
    return f"m-{xxhash.xxh3_64_hexdigest(key.encode())}"


def merged_mounts(sn: FuseSnapshotter, key: str) -> list[Mount]:
    """The read-only bind of *key*'s merged view (published on the snapshot's chain).

    Raises:
        NotFound: no such snapshot.
        FailedPrecondition: a layer of its chain is not attached lazily.
    """
    parent = sn.stat(key).parent
    where = sn.write_view(view_name(key), sn.chain_layers(parent))
    return [Mount(type="bind", source=str(where), options=("ro", "rbind"))]


def label_served(sn: FuseSnapshotter, key: str) -> None:
    """Record on *key* the server its mount is made on (call right after mounting)."""
    identity = server_identity(sn.server)
    if identity is None:
        return
    info = sn.stat(key)
    sn.update(
        dataclasses.replace(info, labels={**info.labels, SERVED_BY: identity}),
        [f"labels.{SERVED_BY}"],
    )


@dataclasses.dataclass
class Recovered:
    """What `recover` did."""

    #: Whether the FUSE server had to be started.
    started: bool = False
    #: Targets mounted again.
    remounted: list[Path] = dataclasses.field(default_factory=list)
    #: Targets that could not be, with why.
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)


def recover(sn: FuseSnapshotter) -> Recovered:
    """Bring back every lazy mount whose server died, or that is not mounted.

    Starts the FUSE server when none runs (a dead one's mount is detached
    first), then remounts each mount snapshot made on another server or not
    mounted at its target. A target that fails is reported, not raised: the
    others are still recovered.
    """
    report = Recovered()
    mounts = [(t, info) for info in sn.walk() if (t := mount_target(info.name)) is not None]
    report.started = server_identity(sn.server) is None
    if not mounts and not report.started:
        return report
    ensure_server(sn.server.root, cache_max=sn.cache_max)
    current = server_identity(sn.server)
    for target, info in mounts:
        if _healthy(target, info, current):
            continue
        try:
            _remount(sn, target, info)
        except (CkfsError, OSError) as e:
            log.warning("fuse: cannot remount %s: %s", target, e)
            report.failed.append((target, str(e)))
        else:
            report.remounted.append(target)
    return report


def _healthy(target: Path, info: Info, current: str | None) -> bool:
    try:
        mounted = is_mountpoint(target) and not is_stale(target)
    except OSError:
        return False
    return mounted and info.labels.get(SERVED_BY) == current


def _remount(sn: FuseSnapshotter, target: Path, info: Info) -> None:
    with contextlib.suppress(OSError, CkfsError):
        if is_mountpoint(target) or is_stale(target):
            unmount_all(target, lazy=True)
    records = _records(sn, info)
    target.mkdir(parents=True, exist_ok=True)
    mount_all(records, target)
    try:
        label_served(sn, info.name)
    except NotFound:  # removed meanwhile: its mount goes too
        unmount_all(target, lazy=True)
        raise
    log.info("fuse: remounted %s", target)


def _records(sn: FuseSnapshotter, info: Info) -> list[Mount]:
    """What the mount *info* was made of: its stack, merged view, or one layer alone."""
    from snapshotters.layerview import LAYER_ONLY, layer_mounts

    if LAYER_ONLY in info.labels:
        return layer_mounts(sn, info.name)
    if view_name(info.name) in sn.views():
        return merged_mounts(sn, info.name)
    return sn.mounts(info.name)
