"""What the content store reports: `Info` about blobs, `Status` of ingests.

Both are frozen snapshots taken at the moment of the call; they never follow
later changes. Times are timezone-aware UTC `datetime` values truncated to
microseconds, converted from the nanosecond integers ckfs stores (file times
and the ``content`` table), so comparisons with ``datetime.now(UTC)`` taken
around an operation hold exactly.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Mapping

from ckfs.digest import Digest
from ckfs.errors import InvalidArgument

__all__ = ["MAX_LABEL_SIZE", "Info", "Status", "ns_to_datetime", "validate_labels"]

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)

#: Longest key plus value a label may have, in bytes. containerd enforces the
#: same bound so labels copied between the two stay valid in both.
MAX_LABEL_SIZE = 4096


def ns_to_datetime(ns: int) -> _dt.datetime:
    """Nanoseconds since the epoch as an aware UTC datetime (µs, truncated).

    Integer arithmetic, not ``fromtimestamp(ns / 1e9)``: a float loses the
    microseconds of present-day times and could round a time *after* a bound
    the caller measured.
    """
    return _EPOCH + _dt.timedelta(microseconds=ns // 1000)


def validate_labels(labels: Mapping[str, str]) -> None:
    """Refuse labels containerd would refuse, so both agree on what is valid.

    Raises:
        InvalidArgument: a key is empty, a key or value is not a string, or
            key plus value exceed `MAX_LABEL_SIZE` bytes.
    """
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument(f"label {k!r}: keys and values must be strings")
        if not k:
            raise InvalidArgument("label key must not be empty")
        size = len(k.encode()) + len(v.encode())
        if size > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label {k!r}: key and value length ({size} bytes) greater than "
                f"maximum size ({MAX_LABEL_SIZE} bytes)"
            )


@dataclasses.dataclass(frozen=True, slots=True)
class Info:
    """A committed blob.

    Attributes:
        digest: the blob's digest, which is also its address.
        size: its length in bytes.
        created_at: when it was committed (the blob file's mtime, which
            commit sets).
        updated_at: the later of creation and the last label change.
        labels: string labels; GC references live here
            (``containerd.io/gc.ref.content.*``).
    """

    digest: Digest
    size: int
    created_at: _dt.datetime
    updated_at: _dt.datetime
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    """An ingest in progress, as a caller needs it to resume.

    Attributes:
        ref: the caller's name for the ingest.
        offset: bytes written so far; a resuming caller continues from here.
        total: expected final size, 0 when unknown (containerd's convention).
        expected: expected digest, None when unknown.
        started_at: when the ingest was created.
        updated_at: last write (or truncate).
    """

    ref: str
    offset: int
    total: int
    expected: Digest | None
    started_at: _dt.datetime
    updated_at: _dt.datetime
