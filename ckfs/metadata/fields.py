"""What the rows of every store share: times and labels.

Content, images and snapshots each keep labels and nanosecond times in the
metadata database; one definition of their limits and conversions keeps the
three stores in agreement with each other and with containerd.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping

from ckfs.errors import InvalidArgument

__all__ = ["EPOCH", "MAX_LABEL_SIZE", "ns_to_datetime", "validate_labels"]

#: The time rows default to before they are stored.
EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)

#: Longest key plus value a label may have, in bytes. containerd enforces the
#: same bound so labels copied between the two stay valid in both.
MAX_LABEL_SIZE = 4096


def ns_to_datetime(ns: int) -> _dt.datetime:
    """Nanoseconds since the epoch as an aware UTC datetime (µs, truncated).

    Integer arithmetic, not ``fromtimestamp(ns / 1e9)``: a float loses the
    microseconds of present-day times and could round a time *after* a bound
    the caller measured.
    """
    return EPOCH + _dt.timedelta(microseconds=ns // 1000)


def validate_labels(labels: Mapping[str, str], what: str = "") -> None:
    """Refuse labels containerd would refuse, so both agree on what is valid.

    Args:
        labels: the labels to store.
        what: what they belong to, for messages (``snapshot 'x'``).

    Raises:
        InvalidArgument: a key is empty, a key or value is not a string, or
            key plus value exceed `MAX_LABEL_SIZE` bytes.
    """
    prefix = f"{what}: " if what else ""
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument(f"{prefix}label {k!r}: keys and values must be strings")
        if not k:
            raise InvalidArgument(f"{prefix}label key must not be empty")
        size = len(k.encode()) + len(v.encode())
        if size > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"{prefix}label {k[:64]!r}: key and value are {size} bytes, "
                f"more than {MAX_LABEL_SIZE}"
            )
