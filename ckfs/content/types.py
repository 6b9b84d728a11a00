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
from ckfs.metadata.fields import MAX_LABEL_SIZE, ns_to_datetime, validate_labels

__all__ = ["MAX_LABEL_SIZE", "Info", "Status", "ns_to_datetime", "validate_labels"]


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
