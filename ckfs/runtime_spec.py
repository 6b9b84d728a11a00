"""OCI runtime bundles: an image config turned into the ``config.json`` runc runs.

The defaults are those of ``runc spec`` and containerd's ``oci.WithDefaultSpec``
(namespaces, the default capability set, masked and read-only paths, the
standard /proc, /dev, /sys mounts), because a container started from a ckfs
bundle should behave exactly like one started by containerd from the same
image. The image contributes what the image spec says it may: entrypoint and
cmd, env, working directory, user, stop signal.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckfs.errors import InvalidArgument
from ckfs.images.config import ImageConfig

__all__ = ["DEFAULT_PATH", "build_spec", "resolve_user"]

#: The PATH a container gets when its image sets none (containerd's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: runc's and containerd's default capability set for unprivileged containers.
DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

_MASKED = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
_READONLY = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]

#: Largest passwd/group file read from an image; they are tiny in practice.
_MAX_DB = 4 << 20


def _mounts() -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": []},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/run",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
    ]


def _read_db(rootfs: Path, name: str) -> list[list[str]]:
    """Rows of an /etc/passwd-style file inside *rootfs*.

    Each component is opened with O_NOFOLLOW, so a hostile image whose
    ``/etc`` or ``/etc/passwd`` is a symlink cannot make us read host files;
    such an image simply has no users to resolve.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        root_fd = os.open(rootfs, flags | os.O_DIRECTORY)
    except OSError:
        return []
    try:
        etc_fd = os.open("etc", flags | os.O_DIRECTORY, dir_fd=root_fd)
        try:
            fd = os.open(name, flags, dir_fd=etc_fd)
        finally:
            os.close(etc_fd)
    except OSError:
        return []
    finally:
        os.close(root_fd)
    with os.fdopen(fd, "rb") as f:
        data = f.read(_MAX_DB)
    return [
        line.split(":")
        for line in data.decode("utf-8", "replace").splitlines()
        if line and not line.startswith("#")
    ]


def resolve_user(user: str, rootfs: Path | None) -> tuple[int, int, list[int]]:
    """The uid, gid and supplementary gids for an image's ``User`` field.

    ``User`` may be ``uid``, ``uid:gid``, ``name``, ``name:group`` (names
    resolved in the image's own /etc/passwd and /etc/group), or empty (root).

    Raises:
        InvalidArgument: a name the image's passwd/group files do not know.
    """
    if not user:
        return 0, 0, []
    name, _, group = user.partition(":")
    passwd = _read_db(rootfs, "passwd") if rootfs is not None else []
    groups = _read_db(rootfs, "group") if rootfs is not None else []
    uid = gid = None
    if name.isdigit():
        uid = int(name)
        for row in passwd:
            if len(row) > 3 and row[2] == name and row[3].isdigit():
                gid = int(row[3])
                break
    else:
        for row in passwd:
            if len(row) > 3 and row[0] == name and row[2].isdigit() and row[3].isdigit():
                uid, gid = int(row[2]), int(row[3])
                break
        if uid is None:
            raise InvalidArgument(f"image user {name!r} is not in the image's /etc/passwd")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            found = [int(r[2]) for r in groups if len(r) > 2 and r[0] == group and r[2].isdigit()]
            if not found:
                raise InvalidArgument(f"image group {group!r} is not in the image's /etc/group")
            gid = found[0]
    if gid is None:
        gid = 0
    member_of = name if not name.isdigit() else None
    extra = sorted(
        {
            int(r[2])
            for r in groups
            if member_of and len(r) > 3 and r[2].isdigit() and member_of in r[3].split(",")
        }
        - {gid}
    )
    return uid, gid, extra


def build_spec(
    config: ImageConfig,
    *,
    rootfs: Path,
    root_path: str = "rootfs",
    args: Sequence[str] = (),
    hostname: str = "ckfs",
    readonly: bool = False,
    no_new_privileges: bool = False,
) -> dict[str, Any]:
    """A runtime-spec ``config.json`` for running *config*'s image.

    Args:
        config: the image config (entrypoint, cmd, env, working dir, user).
        rootfs: where the root filesystem is (to resolve user names).
        root_path: ``root.path`` as written into the spec, relative to the
            bundle directory (``rootfs``) or absolute.
        args: replaces the image's cmd, as ``docker run IMAGE ARGS`` does.
        hostname: the container's hostname.
        readonly: mount the root filesystem read-only.
        no_new_privileges: set ``noNewPrivileges``, so setuid binaries in the
            image do not gain privileges. Off by default, as containerd and
            Docker run containers: an image's setuid programs (su, ping,
            sudo) work for its non-root users. ``runc spec`` turns it on.

    Raises:
        InvalidArgument: nothing to run (no entrypoint, cmd or args), or an
            unknown user name.
    """
    argv = [*(config.entrypoint or ()), *(args or config.cmd or ())]
    if not argv:
        raise InvalidArgument("the image has no entrypoint or cmd; give a command to run")
    env = list(config.env)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, f"PATH={DEFAULT_PATH}")
    uid, gid, extra = resolve_user(config.user, rootfs)
    caps = list(DEFAULT_CAPS)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, **({"additionalGids": extra} if extra else {})},
            "args": argv,
            "env": env,
            "cwd": config.working_dir or "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": no_new_privileges,
        },
        "root": {"path": root_path, "readonly": readonly},
        "hostname": hostname,
        "mounts": _mounts(),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [
                {"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")
            ],
            "maskedPaths": list(_MASKED),
            "readonlyPaths": list(_READONLY),
        },
    }
