"""The few error classes every part of ckfs raises, and where each one maps.

Callers branch on the class, never on the message, the way containerd's
``errdefs`` works: a content store, a snapshotter and the CLI agree on what
"already exists" means without knowing each other. Messages are one line and
say what and where; they are what the CLI prints.

The tree::

    CkfsError
     ├── NotFound              no such blob, image, snapshot, ingest
     ├── AlreadyExists         a commit or create of something already there
     ├── FailedPrecondition    the state forbids it (parent has children, ...)
     │    └── Unauthorized     a registry refused our credentials (or lack of them)
     ├── InvalidArgument       malformed input: references, digests, manifests
     ├── Unavailable           locked ref, unreachable registry; try again
     ├── Unimplemented         a valid request this ckfs does not serve
     └── DataLoss              bytes do not match their digest or size

Each class has its errno and gRPC status name in one table
(`ERRNOS`, `GRPC_CODES`, plus `exit_code`) so the mappings live in one place.
The way back, for a ckfsd client or a failed syscall, is `from_grpc_code`
and `from_errno`, derived from the same tables so the two directions cannot
drift: the CLI through ckfsd raises what the daemonless path raises.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from typing import TypeVar

__all__ = [
    "ERRNOS",
    "GRPC_CODES",
    "AlreadyExists",
    "CkfsError",
    "DataLoss",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "Unauthorized",
    "Unavailable",
    "Unimplemented",
    "exit_code",
    "first_error",
    "from_errno",
    "from_grpc_code",
    "grpc_code_name",
    "to_errno",
    "unwrap_groups",
]


class CkfsError(Exception):
    """Base class: something ckfs understood and can explain in one line."""


class NotFound(CkfsError):
    """The named object does not exist."""


class AlreadyExists(CkfsError):
    """The object being created or committed exists already.

    For content this is usually success in disguise: the bytes are there.
    """


class FailedPrecondition(CkfsError):
    """The request is well formed but the current state forbids it."""


class Unauthorized(FailedPrecondition):
    """A registry or its token server refused access after authentication.

    Also the kernel's ``EACCES``/``EPERM`` (a mount without
    ``CAP_SYS_ADMIN``): access refused to who we are, not to what we asked.
    A `FailedPrecondition`: retrying without new credentials fails again. Not
    `NotFound`, although registries answer 401 for missing repositories too:
    the message names both possibilities rather than send a user with a
    mistyped password hunting for the image.
    """


class InvalidArgument(CkfsError):
    """The input is malformed: a reference, digest, manifest or option."""


class Unavailable(CkfsError):
    """A resource is busy or out of reach right now; retrying may succeed."""


class Unimplemented(CkfsError):
    """A well-formed request for something this ckfs does not do (yet).

    containerd's ``errdefs.ErrNotImplemented``, gRPC ``UNIMPLEMENTED``. Not
    named ``NotImplemented``: that is Python's builtin constant for binary
    operators, and ``from ckfs.errors import *`` or ``raise NotImplemented``
    would then silently mean different things in different modules.
    """


class DataLoss(CkfsError):
    """Bytes do not match the digest or size they were promised under."""


ERRNOS: dict[type[CkfsError], int] = {
    CkfsError: errno.EIO,
    NotFound: errno.ENOENT,
    AlreadyExists: errno.EEXIST,
    FailedPrecondition: errno.EBUSY,
    Unauthorized: errno.EACCES,
    InvalidArgument: errno.EINVAL,
    Unavailable: errno.EAGAIN,
    # Not ENOSYS: a FUSE handler answering ENOSYS makes the kernel disable
    # that operation for the whole mount (xattrs, flush, ...) and a program
    # reads it as "no such syscall"; EOPNOTSUPP refuses this one call.
    Unimplemented: errno.EOPNOTSUPP,
    DataLoss: errno.EIO,
}

# Names of google.rpc.Code values, resolved by the gRPC layer so this module
# stays free of grpc imports.
GRPC_CODES: dict[type[CkfsError], str] = {
    CkfsError: "UNKNOWN",
    NotFound: "NOT_FOUND",
    AlreadyExists: "ALREADY_EXISTS",
    FailedPrecondition: "FAILED_PRECONDITION",
    Unauthorized: "PERMISSION_DENIED",
    InvalidArgument: "INVALID_ARGUMENT",
    Unavailable: "UNAVAILABLE",
    Unimplemented: "UNIMPLEMENTED",
    DataLoss: "DATA_LOSS",
}

# The way back: every code in GRPC_CODES answers its own class, so a class
# survives a trip through ckfsd; the codes ckfs never sends answer the
# nearest class, by what a caller should do next.
_FROM_GRPC: dict[str, type[CkfsError]] = {
    # The call did not finish in time, or a transaction lost a race:
    # retrying may succeed.
    "DEADLINE_EXCEEDED": Unavailable,
    "ABORTED": Unavailable,
    "CANCELLED": Unavailable,
    # No or bad credentials: new ones are needed, as for PERMISSION_DENIED.
    "UNAUTHENTICATED": Unauthorized,
    # gRPC's "INVALID_ARGUMENT that depends on the state", e.g. a read past
    # the end of a blob: the request itself is wrong.
    "OUT_OF_RANGE": InvalidArgument,
    # grpc's transport refusing a message over the daemon's size limit,
    # before any ckfs code runs: the same request fails every time. (Its
    # other use, a full server, is told apart by `_LOAD_REFUSAL`.)
    "RESOURCE_EXHAUSTED": InvalidArgument,
    # A server bug: nothing the caller can fix, reported as-is.
    "INTERNAL": CkfsError,
} | {code: cls for cls, code in GRPC_CODES.items()}

#: What grpcio answers (RESOURCE_EXHAUSTED) when a server's
#: ``maximum_concurrent_rpcs`` is reached, as ckfsd's is under a flood:
#: load, which passes, unlike a message over the size limit.
_LOAD_REFUSAL = "Concurrent RPC limit exceeded"

# errno → class, inverted from ERRNOS so errno → class → errno round-trips.
# Where two classes share an errno (EIO) the first listed, the more general,
# wins: an EIO from the kernel is not a digest mismatch. EPERM and ENOSYS
# have no class of their own and join their nearest.
_FROM_ERRNO: dict[int, type[CkfsError]] = {
    errno.EPERM: Unauthorized,
    errno.ENOSYS: Unimplemented,
} | {err: cls for cls, err in reversed(ERRNOS.items())}


_T = TypeVar("_T")


def _lookup(table: dict[type[CkfsError], _T], exc: BaseException, default: _T) -> _T:
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return default


def exit_code(exc: BaseException) -> int:
    """The CLI exit status for *exc*.

    Every failure exits 1, like ``ctr`` and ``skopeo``: scripts test for
    non-zero and read the one-line message; 2 stays click's usage error.
    """
    return 1


def to_errno(exc: BaseException) -> int:
    """The errno a filesystem handler should answer for *exc* (EIO if unknown)."""
    return _lookup(ERRNOS, exc, errno.EIO)


def grpc_code_name(exc: BaseException) -> str:
    """The google.rpc.Code name for *exc* (UNKNOWN if not a CkfsError)."""
    return _lookup(GRPC_CODES, exc, "UNKNOWN")


def from_grpc_code(name: str, details: str = "") -> type[CkfsError]:
    """The ckfs class a client raises for the google.rpc.Code *name*.

    Unknown names (and ``UNKNOWN``) answer `CkfsError`; ``OK`` is no error
    and a caller asking for it has a bug. *details*, the status message,
    tells grpc's two RESOURCE_EXHAUSTED apart: a server at its concurrent
    RPC limit is Unavailable (try again), a message too large is not.
    """
    if name == "OK":
        raise ValueError("OK is not an error code")
    if name == "RESOURCE_EXHAUSTED" and _LOAD_REFUSAL in details:
        return Unavailable
    return _FROM_GRPC.get(name, CkfsError)


def from_errno(err: int, what: str) -> CkfsError:
    """The ckfs error for the failed syscall *what* with errno *err*.

    The message is *what* plus strerror; an `OSError` is chained as the
    cause, so a traceback shows the raw errno. Errnos without a class become
    `CkfsError` (EIO back).
    """
    exc = _FROM_ERRNO.get(err, CkfsError)(f"{what}: {os.strerror(err)}")
    exc.__cause__ = OSError(err, os.strerror(err))
    return exc


def first_error(exc: BaseException) -> BaseException:
    """The one error worth reporting from a (nested) exception group.

    trio nurseries wrap every failure in an ExceptionGroup; callers of the
    library and the CLI want the error that explains the failure: the first
    `CkfsError` leaf if any, else the first leaf.
    """
    while isinstance(exc, BaseExceptionGroup):
        leaves = [first_error(e) for e in exc.exceptions]
        ours = [e for e in leaves if isinstance(e, CkfsError)]
        exc = (ours or leaves)[0]
    return exc


@contextlib.contextmanager
def unwrap_groups() -> Iterator[None]:
    """Re-raise an exception group escaping the body as its `first_error`.

    Library entry points that run nurseries use this so their callers get
    `NotFound`, `DataLoss`, ... directly, as their docstrings promise.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        raise first_error(group) from group
