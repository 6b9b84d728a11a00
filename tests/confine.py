"""Run hostile-input code where a containment bug cannot hurt the machine.

The archive tests feed the layer applier tars built to escape its root, as
root. If the applier has a bug, the escape is real: a test run on this
project's machine once deleted the host's /etc that way. So those tests run
the applier in a forked child with its own mount namespace in which every
mount is read-only except the test's scratch directory. An escape then
fails with EROFS inside the child (and the test fails, naming the case)
instead of changing the host.

Without root (no CAP_SYS_ADMIN for the namespace) the function runs
unconfined: an unprivileged process cannot change system files anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    _check(
        _libc.mount(source.encode() if source else None, target.encode(), None, flags, None),
        f"mount {target}",
    )


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return sorted(set(points), key=len)


def _seal(writable: Sequence[Path]) -> None:
    """In a fresh mount namespace, make everything but *writable* read-only."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare")
    _mount(None, "/", MS_REC | MS_PRIVATE)
    keep = [str(w) for w in writable]
    for k in keep:
        _mount(k, k, MS_BIND | MS_REC)
    for point in _mountpoints():
        if point.startswith("/proc") or any(point == k or point.startswith(k + "/") for k in keep):
            continue
        # Some pseudo filesystems refuse; nothing a layer writes lands there.
        with contextlib.suppress(OSError):
            _mount(None, point, MS_REMOUNT | MS_BIND | MS_RDONLY)


def confined(
    writable: Path | Sequence[Path], fn: Callable[..., _T], *args: Any, **kwargs: Any
) -> _T:
    """Call ``fn(*args, **kwargs)`` with only *writable* writable; return or raise its outcome.

    The result or exception travels back pickled, so both must pickle.
    """
    dirs = [writable] if isinstance(writable, Path) else list(writable)
    if os.geteuid() != 0:
        return fn(*args, **kwargs)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            try:
                _seal([d.resolve() for d in dirs])
                outcome: tuple[bool, Any] = (True, fn(*args, **kwargs))
            except BaseException as e:
                outcome = (False, e)
            try:
                data = pickle.dumps(outcome)
            except Exception as e:
                data = pickle.dumps((False, RuntimeError(f"unpicklable outcome: {e!r}")))
            with os.fdopen(w, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    ok, value = pickle.loads(data)
    if ok:
        return value  # type: ignore[no-any-return]
    raise value
