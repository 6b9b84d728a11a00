"""The error tables, both ways: every class has an errno and a gRPC code,
and each comes back as the class it left as."""

from __future__ import annotations

import errno

import pytest

from ckfs import errors


def _tree(cls: type[errors.CkfsError]) -> list[type[errors.CkfsError]]:
    """*cls* and every subclass below it, found by walking, not listed."""
    found = [cls]
    for sub in cls.__subclasses__():
        found += _tree(sub)
    return found


# The hierarchy itself: a class added to ckfs.errors without table entries
# fails here. Subclasses elsewhere (rootfs.NotUnpacked, bounds.TooSlow)
# specialise a message and inherit their base's entries.
HIERARCHY = [c for c in _tree(errors.CkfsError) if c.__module__ == errors.__name__]


def test_hierarchy_is_walked() -> None:
    assert {errors.Unimplemented, errors.Unauthorized, errors.DataLoss} <= set(HIERARCHY)


@pytest.mark.parametrize("cls", HIERARCHY, ids=lambda c: c.__name__)
def test_every_class_has_its_own_entries(cls: type[errors.CkfsError]) -> None:
    assert cls in errors.ERRNOS
    assert cls in errors.GRPC_CODES
    assert cls.__name__ in errors.__all__


@pytest.mark.parametrize("cls", HIERARCHY, ids=lambda c: c.__name__)
def test_grpc_code_round_trips(cls: type[errors.CkfsError]) -> None:
    assert errors.from_grpc_code(errors.grpc_code_name(cls("x"))) is cls


def test_grpc_codes_are_distinct() -> None:
    assert len(set(errors.GRPC_CODES.values())) == len(errors.GRPC_CODES)


@pytest.mark.parametrize("err", sorted(set(errors.ERRNOS.values())), ids=errno.errorcode.get)
def test_errno_round_trips(err: int) -> None:
    exc = errors.from_errno(err, "mount x")
    assert errors.to_errno(exc) == err
    assert isinstance(exc.__cause__, OSError)
    assert exc.__cause__.errno == err
    assert str(exc).startswith("mount x: ")


def test_errno_decisions() -> None:
    # A busy mount is the state forbidding it, answered back as EBUSY, not EAGAIN.
    assert type(errors.from_errno(errno.EBUSY, "umount")) is errors.FailedPrecondition
    # The kernel's EIO is not a claim that bytes mismatch their digest.
    assert type(errors.from_errno(errno.EIO, "read")) is errors.CkfsError
    assert type(errors.from_errno(errno.EPERM, "mount")) is errors.Unauthorized
    assert type(errors.from_errno(errno.ENOSYS, "x")) is errors.Unimplemented
    assert type(errors.from_errno(errno.ENOSPC, "x")) is errors.CkfsError
    assert errors.to_errno(errors.Unimplemented("x")) == errno.EOPNOTSUPP


def test_grpc_codes_without_a_class_answer_the_nearest() -> None:
    nearest = {
        "UNKNOWN": errors.CkfsError,
        "INTERNAL": errors.CkfsError,
        "PERMISSION_DENIED": errors.Unauthorized,
        "UNAUTHENTICATED": errors.Unauthorized,
        "DEADLINE_EXCEEDED": errors.Unavailable,
        # A message over the daemon's size limit: the same request fails again.
        "RESOURCE_EXHAUSTED": errors.InvalidArgument,
        "ABORTED": errors.Unavailable,
        "CANCELLED": errors.Unavailable,
        "OUT_OF_RANGE": errors.InvalidArgument,
        "SOMETHING_NEW": errors.CkfsError,
    }
    assert {name: errors.from_grpc_code(name) for name in nearest} == nearest
    with pytest.raises(ValueError):
        errors.from_grpc_code("OK")


def test_subclasses_elsewhere_inherit() -> None:
    from ckfs.remotes.bounds import TooSlow
    from ckfs.rootfs import NotUnpacked

    assert errors.grpc_code_name(NotUnpacked("x")) == "NOT_FOUND"
    assert errors.to_errno(TooSlow("x")) == errno.EAGAIN


def test_foreign_exceptions() -> None:
    assert errors.to_errno(ValueError()) == errno.EIO
    assert errors.grpc_code_name(ValueError()) == "UNKNOWN"


def test_first_error_prefers_ours() -> None:
    nf = errors.NotFound("blob")
    group = BaseExceptionGroup("g", [ValueError("x"), ExceptionGroup("h", [nf])])
    assert errors.first_error(group) is nf
    with pytest.raises(errors.NotFound), errors.unwrap_groups():
        raise group


def test_resource_exhausted_is_a_request_too_large_unless_the_server_is_full() -> None:
    """grpcio's own details for its two uses of the code (seen from a real server)."""
    too_large = "SERVER: Received message larger than max (16777300 vs. 16777216)"
    assert errors.from_grpc_code("RESOURCE_EXHAUSTED", too_large) is errors.InvalidArgument
    full = "Concurrent RPC limit exceeded!"
    assert errors.from_grpc_code("RESOURCE_EXHAUSTED", full) is errors.Unavailable
    # Details never change what ckfs's own codes answer.
    for cls, code in errors.GRPC_CODES.items():
        assert errors.from_grpc_code(code, full) is cls
