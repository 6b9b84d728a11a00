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
     └── DataLoss              bytes do not match their digest or size

Each class has its errno and gRPC status name in one table
(`ERRNOS`, `GRPC_CODES`, plus `exit_code`) so the mappings live in one place.
"""

from __future__ import annotations

import contextlib
import errno
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
    "exit_code",
    "first_error",
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

    A `FailedPrecondition`: retrying without new credentials fails again. Not
    `NotFound`, although registries answer 401 for missing repositories too:
    the message names both possibilities rather than send a user with a
    mistyped password hunting for the image.
    """


class InvalidArgument(CkfsError):
    """The input is malformed: a reference, digest, manifest or option."""


class Unavailable(CkfsError):
    """A resource is busy or out of reach right now; retrying may succeed."""


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
    DataLoss: "DATA_LOSS",
}


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
