"""Mount records and the mount(2)/umount2(2) calls that perform them.

A `Mount` is the one currency every part of ckfs speaks: snapshotters hand
out lists of them, ``ckfs mount`` performs them, the gRPC service and runc
bundles carry them as JSON. It is containerd's ``mount.Mount``: a type, a
source and options in ``mount(8)`` spelling, plus an optional ``target``
relative to the root the list is mounted at.

Why syscalls through ctypes rather than running ``mount(8)``: the options of
an overlay with a hundred layers do not fit a command line comfortably, the
error is an errno we can map rather than text to parse, and a mount costs a
syscall instead of a process.

Options are split the way containerd's ``parseMountOptions`` does: words
that name a flag (``ro``, ``rbind``, ``nosuid``, ``remount``, ...) become
``MS_*`` flags, propagation words (``rprivate``, ``shared``, ...) are applied
by a second call after the mount, and everything else is passed to the
filesystem as its data string (``lowerdir=...,upperdir=...``).

Two kernel details shape the code:

- A bind mount ignores ``MS_RDONLY`` (and the other per-mount flags) when it
  is created; a read-only bind takes a second call that remounts it with
  ``MS_REMOUNT|MS_BIND|MS_RDONLY``. If that second call fails the bind is
  undone: a mount asked for read-only must never be left writable.
- ``mount(2)`` copies at most one page of data (4096 bytes here), and an
  overlay of 129 layers under a deep root is longer than that. containerd
  changes into the layers' common parent and passes relative ``lowerdir``
  paths. The working directory is per process, and other threads (trio's
  worker threads) resolve relative paths against it at any moment, so
  ckfs never changes the process's directory: the mount runs on a short-lived
  thread that first calls ``unshare(CLONE_FS)``, which gives that one thread a
  private working directory, changes into the common parent there, mounts
  and exits. This needs no fork (hazardous in a threaded process), leaves no
  symlink farm behind (whose paths would also count against the page), and
  works on kernels without the new mount API's ``lowerdir+``.

Errors map errno to the `ckfs.errors` classes with `ckfs.errors.from_errno`
(the `OSError` is chained as the cause): ``ENOENT`` → `NotFound`, ``EINVAL``
→ `InvalidArgument`, ``EBUSY`` → `FailedPrecondition` (a busy mount stays
busy until its users leave; waiting on a timer does not fix that),
``EPERM``/``EACCES`` → `Unauthorized`, anything else → `CkfsError`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ckfs.errors import InvalidArgument, NotFound, from_errno

__all__ = [
    "MOUNT_PREFIX",
    "Mount",
    "MountInfo",
    "clean_stale",
    "is_mountpoint",
    "is_stale",
    "mount_all",
    "mount_key",
    "mount_target",
    "mountinfo",
    "mounts_under",
    "unmount",
    "unmount_all",
    "unmount_recursive",
]

log = logging.getLogger(__name__)

#: Keys of the snapshots ``ckfs mount`` and ``ckfs bundle`` mount: the prefix,
#: then the target's absolute path. ``umount`` finds a snapshot from its
#: path alone, gc sees it as in use, ``ckfs mounts`` lists and recovers it.
MOUNT_PREFIX = "mount:"


def mount_key(target: os.PathLike[str] | str) -> str:
    """The snapshot key of the rootfs mounted at *target*."""
    return f"{MOUNT_PREFIX}{os.path.abspath(target)}"


def mount_target(key: str) -> Path | None:
    """The directory the snapshot *key* is mounted at, None for other keys."""
    if not key.startswith(MOUNT_PREFIX):
        return None
    path = key.removeprefix(MOUNT_PREFIX)
    return Path(path) if os.path.isabs(path) else None


# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

CLONE_FS = 0x200

#: ``mount(2)`` copies at most one page of option data (NUL included).
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: How long `unmount` retries a busy (``EBUSY``) mount before giving up:
#: a process that just closed its last file there often needs a moment.
UNMOUNT_BUSY_RETRIES = 20
UNMOUNT_BUSY_DELAY = 0.05

# option word -> (clear?, flag): "rw" clears MS_RDONLY, "ro" sets it.
_FLAGS: Mapping[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "lazytime": (False, MS_LAZYTIME),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nolazytime": (True, MS_LAZYTIME),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "nosymfollow": (False, MS_NOSYMFOLLOW),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}

# Propagation changes must be a call of their own, after the mount exists.
_PROPAGATION: Mapping[str, int] = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}

# containerd's option for loop devices: ckfs sets none up, and the word
# must not reach a filesystem as data.
_IGNORED = frozenset({"loop"})


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    libc.mount.restype = ctypes.c_int
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.umount2.restype = ctypes.c_int
    libc.unshare.argtypes = [ctypes.c_int]
    libc.unshare.restype = ctypes.c_int
    return libc


_libc = _load_libc()


@dataclasses.dataclass(frozen=True, slots=True)
class Mount:
    """One mount to perform, in ``mount(8)`` terms.

    Attributes:
        type: filesystem type (``overlay``, ``bind``, ``tmpfs``, ``fuse.ckfs``).
        source: device or directory (``overlay`` for overlays).
        target: where to mount, relative to the root given to `mount_all`;
            ``""`` is the root itself.
        options: flags and data, e.g. ``("ro", "rbind")`` or
            ``("index=off", "lowerdir=/a:/b")``.
    """

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The JSON object form: ``{"type", "source", "target", "options"}``."""
        return {
            "type": self.type,
            "source": self.source,
            "target": self.target,
            "options": list(self.options),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Mount:
        """Parse the object `to_json` writes; ``target`` and ``options`` may be absent.

        Raises:
            InvalidArgument: *obj* is not an object, or a field is missing or
                of the wrong type.
        """
        if not isinstance(obj, Mapping):
            raise InvalidArgument(f"mount: expected a JSON object, got {type(obj).__name__}")
        fields: dict[str, str] = {}
        for name in ("type", "source", "target"):
            value = obj.get(name, "" if name == "target" else None)
            if not isinstance(value, str):
                raise InvalidArgument(f"mount: field {name!r} must be a string")
            fields[name] = value
        options = obj.get("options", [])
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise InvalidArgument("mount: field 'options' must be a list of strings")
        return cls(options=tuple(options), **fields)

    def mount(self, target: Path | str) -> None:
        """Perform this mount on *target* (its own ``target`` field is ignored).

        Args:
            target: an existing directory.

        Raises:
            InvalidArgument: the option data is too long (even compacted, for
                an overlay) or the kernel rejected the options (``EINVAL``).
            NotFound: the source or *target* does not exist.
            Unauthorized: not permitted (needs ``CAP_SYS_ADMIN``).
            CkfsError: any other failure of the syscalls.
        """
        _mount_one(self, os.fspath(target))


@dataclasses.dataclass(frozen=True, slots=True)
class _Options:
    flags: int
    propagation: tuple[int, ...]
    data: tuple[str, ...]


def _parse_options(options: Sequence[str]) -> _Options:
    """Split mount(8) words into flags, propagation changes and filesystem data."""
    flags = 0
    propagation: list[int] = []
    data: list[str] = []
    for option in options:
        if option in _FLAGS:
            clear, flag = _FLAGS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in _PROPAGATION:
            propagation.append(_PROPAGATION[option])
        elif option not in _IGNORED:
            data.append(option)
    return _Options(flags, tuple(propagation), tuple(data))


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
    rc = _libc.mount(
        os.fsencode(source),
        os.fsencode(target),
        os.fsencode(fstype),
        flags,
        None if data is None else os.fsencode(data),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise from_errno(err, f"mount {fstype or '(remount)'} {source!r} on {target!r}")


def _sys_mount_in(cwd: str, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """`_sys_mount` with relative paths in *data* resolved against *cwd*.

    Runs on a thread of its own that unshares its filesystem attributes
    (``CLONE_FS``) before changing directory, so no other thread ever sees
    the change; the thread, and with it the private working directory, ends
    with the call.
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if _libc.unshare(CLONE_FS) != 0:
                raise from_errno(ctypes.get_errno(), "unshare(CLONE_FS)")
            os.chdir(cwd)
            _sys_mount(source, target, fstype, flags, data)
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=run, name="ckfs-mount-relative")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def _compact_lowerdir(data: Sequence[str]) -> tuple[str, tuple[str, ...]] | None:
    """Rewrite ``lowerdir=`` relative to the layers' longest common directory.

    Returns:
        ``(common_dir, data)`` with the lowerdir entries made relative, or
        None when there is nothing to gain (no lowerdir, or only ``/`` in
        common).
    """
    for i, option in enumerate(data):
        if not option.startswith("lowerdir="):
            continue
        lowers = _UNESCAPED_COLON.split(option[len("lowerdir=") :])
        if not all(os.path.isabs(p) for p in lowers):
            return None
        common = os.path.commonpath(lowers)
        if common == "/":
            return None
        relative = [os.path.relpath(p, common) for p in lowers]
        compacted = f"lowerdir={':'.join(relative)}"
        return common, (*data[:i], compacted, *data[i + 1 :])
    return None


def _mount_one(m: Mount, target: str) -> None:
    opts = _parse_options(m.options)
    flags = opts.flags
    if m.type == "bind":
        # containerd spells a bind as type "bind" plus "bind"/"rbind"; a
        # record that forgot the option still means a bind, not a
        # filesystem called "bind".
        flags |= MS_BIND
    data = ",".join(opts.data)
    cwd: str | None = None
    if len(os.fsencode(data)) >= PAGE_SIZE:
        compacted = _compact_lowerdir(opts.data) if m.type == "overlay" else None
        if compacted is not None:
            cwd, rewritten = compacted
            data = ",".join(rewritten)
        if len(os.fsencode(data)) >= PAGE_SIZE:
            raise InvalidArgument(
                f"mount {m.type} on {target!r}: options are {len(data)} bytes, "
                f"longer than a page ({PAGE_SIZE}) even with relative layer paths"
            )
    if cwd is None:
        _sys_mount(m.source, target, m.type, flags, data or None)
    else:
        _sys_mount_in(cwd, m.source, target, m.type, flags, data)

    try:
        read_only_bind = MS_BIND | MS_RDONLY
        if flags & read_only_bind == read_only_bind and not flags & MS_REMOUNT:
            # The bind above ignored MS_RDONLY and the other per-mount flags.
            _sys_mount("", target, "", flags | MS_REMOUNT, None)
        for change in opts.propagation:
            _sys_mount("", target, "", change, None)
    except BaseException:
        # Never leave a mount asked for read-only (or private) behind in the
        # wrong state.
        _umount2_quiet(target)
        raise


def _target_in(root: str, relative: str) -> str:
    if not relative:
        return root
    parts = Path(relative).parts
    if ".." in parts:
        raise InvalidArgument(f"mount target {relative!r} leaves the root it is relative to")
    return os.path.join(root, *[p for p in parts if p != "/"])


def mount_all(mounts: Sequence[Mount], target: Path | str) -> None:
    """Perform *mounts* in order on *target*, as containerd's ``mount.All``.

    Each mount goes to ``target / mount.target``; later mounts stack on
    earlier ones. If one fails, those already made are unmounted again
    (latest first), so the call either mounts everything or nothing.

    Args:
        mounts: the records, typically a snapshotter's answer.
        target: an existing directory.

    Raises:
        InvalidArgument: a record's ``target`` contains ``..``, or its
            options are malformed or too long (see `Mount.mount`).
        NotFound: a source or target does not exist.
        Unauthorized: not permitted (needs ``CAP_SYS_ADMIN``).
        CkfsError: any other mount failure.
    """
    root = os.fspath(target)
    done: list[str] = []
    try:
        for m in mounts:
            where = _target_in(root, m.target)
            _mount_one(m, where)
            done.append(where)
    except BaseException:
        for where in reversed(done):
            _umount2_quiet(where)
        raise


def _umount2_quiet(target: str) -> None:
    """Lazily detach *target*, logging instead of raising: for cleanup paths."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        log.warning("cleanup: umount %s: %s", target, os.strerror(err))


def unmount(target: Path | str, *, lazy: bool = False) -> None:
    """Unmount the topmost mount on *target*.

    A busy mount is retried for about a second before giving up; *lazy*
    (``MNT_DETACH``) detaches it at once and lets the kernel finish when the
    last user leaves. A symlink at *target* is not followed.

    Args:
        target: the mount point.
        lazy: detach instead of failing while busy.

    Raises:
        InvalidArgument: nothing is mounted on *target* (``EINVAL``).
        NotFound: *target* does not exist.
        FailedPrecondition: still busy after the retries.
        Unauthorized: not permitted.
        CkfsError: any other failure.
    """
    path = os.fsencode(os.fspath(target))
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    for attempt in range(UNMOUNT_BUSY_RETRIES + 1):
        if _libc.umount2(path, flags) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EBUSY or attempt == UNMOUNT_BUSY_RETRIES:
            raise from_errno(err, f"umount {os.fspath(target)!r}")
        time.sleep(UNMOUNT_BUSY_DELAY)


def unmount_all(target: Path | str, *, lazy: bool = False) -> None:
    """Unmount every mount stacked on *target* until nothing is mounted there.

    `mount_all` may stack several mounts on one directory; this peels them
    off one by one, as containerd's ``UnmountAll``. A *target* that does not
    exist, or has nothing mounted, is success.

    Raises:
        FailedPrecondition: a mount stays busy (and *lazy* is false).
        Unauthorized: not permitted.
        CkfsError: any other failure.
    """
    while True:
        try:
            unmount(target, lazy=lazy)
        except (InvalidArgument, NotFound):
            return


@dataclasses.dataclass(frozen=True, slots=True)
class MountInfo:
    """One line of ``/proc/self/mountinfo`` (see proc(5))."""

    mount_id: int
    parent_id: int
    #: The path inside the source filesystem that is mounted (``/`` mostly).
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _parse_mountinfo_line(line: str) -> MountInfo:
    fields = line.split(" ")
    sep = fields.index("-", 6)
    return MountInfo(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        root=_unescape(fields[3]),
        mountpoint=_unescape(fields[4]),
        options=fields[5],
        fstype=fields[sep + 1],
        source=_unescape(fields[sep + 2]),
        super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
    )


def mountinfo(path: Path | str = "/proc/self/mountinfo") -> list[MountInfo]:
    """The mount table of this process's mount namespace, in mount order."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return [_parse_mountinfo_line(line.rstrip("\n")) for line in f if line.strip()]


def _resolve(path: Path | str) -> str:
    """*path* made absolute with its directory's symlinks resolved.

    The last component is left as is and never stat'ed: on a mount point it
    is the mounted filesystem's root, and a hung FUSE daemon would block the
    stat (a dead one fails it with ``ENOTCONN``).
    """
    absolute = os.path.normpath(os.path.abspath(os.fspath(path)))
    head, tail = os.path.split(absolute)
    return os.path.join(os.path.realpath(head), tail) if tail else absolute


def is_mountpoint(path: Path | str) -> bool:
    """Whether something is mounted on *path* (symlinks above it resolved).

    Reads ``/proc/self/mountinfo`` rather than comparing ``st_dev`` with the
    parent's: a bind mount of a directory of the same filesystem has the
    same device, and a dead FUSE mount cannot be stat'ed at all.
    """
    where = _resolve(path)
    return any(m.mountpoint == where for m in mountinfo())


def mounts_under(prefix: Path | str) -> list[MountInfo]:
    """Mounts on *prefix* or below it, deepest (and latest) first: unmount order."""
    base = _resolve(prefix)
    inside = base.rstrip("/") + "/"
    found = [m for m in mountinfo() if m.mountpoint == base or m.mountpoint.startswith(inside)]
    # Stable sort of the mount-order list: deeper paths first, and on one
    # path the later (upper) mount first.
    found.reverse()
    found.sort(key=lambda m: m.mountpoint.count("/"), reverse=True)
    return found


def unmount_recursive(prefix: Path | str, *, lazy: bool = False) -> list[str]:
    """Unmount everything mounted on or below *prefix*, deepest first.

    Args:
        prefix: a directory.
        lazy: detach busy mounts instead of failing.

    Returns:
        The mount points unmounted, in order (a point repeats once per
        stacked mount).

    Raises:
        FailedPrecondition: a mount stays busy (and *lazy* is false).
        Unauthorized: not permitted.
        CkfsError: any other failure.
    """
    done: list[str] = []
    for m in mounts_under(prefix):
        try:
            unmount(m.mountpoint, lazy=lazy)
        except InvalidArgument:
            # Already gone: detached together with a parent mount.
            continue
        done.append(m.mountpoint)
    return done


def is_stale(path: Path | str) -> bool:
    """Whether *path* is a dead FUSE mount (its daemon exited without unmounting).

    The kernel answers every request on such a mount with ``ENOTCONN``
    ("Transport endpoint is not connected") until it is unmounted;
    ``auto_unmount`` does not help after ``kill -9``.

    Asked with statfs, not stat: the kernel may answer a stat from the
    root's cached attributes for a while after the server died (see
    ``snapshotters.fuse.ops.ROOT_ATTR_TIMEOUT``), but sends every statfs
    to the server, so a dead one shows at once.
    """
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def clean_stale(prefix: Path | str) -> list[str]:
    """Lazily unmount every dead FUSE mount on or below *prefix*.

    Returns:
        The mount points detached.

    Raises:
        Unauthorized: not permitted.
        CkfsError: any other failure of umount2.
    """
    cleaned: list[str] = []
    for m in mounts_under(prefix):
        if m.fstype.startswith("fuse") and is_stale(m.mountpoint):
            try:
                unmount(m.mountpoint, lazy=True)
            except InvalidArgument:
                continue
            log.info("detached stale FUSE mount %s", m.mountpoint)
            cleaned.append(m.mountpoint)
    return cleaned
