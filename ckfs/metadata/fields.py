"""What the rows of every store share: times and labels.

Content, images and snapshots each keep labels and nanosecond times in the
metadata database; one definition of their limits and conversions keeps the
three stores in agreement with each other and with containerd.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence

from ckfs.errors import InvalidArgument

__all__ = ["EPOCH", "MAX_LABEL_SIZE", "ns_to_datetime", "update_labels", "validate_labels"]

#: The time rows default to before they are stored.
EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)

#: Longest key plus value a label may have, in bytes. containerd enforces the
#: same bound so labels copied between the two stay valid in both; labels are
#: metadata for gc and tools, not a place to store blobs.
MAX_LABEL_SIZE = 4096


def ns_to_datetime(ns: int) -> _dt.datetime:
    """Nanoseconds since the epoch as an aware UTC datetime (µs, truncated).

    Integer arithmetic, not ``fromtimestamp(ns / 1e9)``: a float loses the
    microseconds of present-day times and could round a time *after* a bound
    the caller measured.
    """
    return EPOCH + _dt.timedelta(microseconds=ns // 1000)


def update_labels(
    current: Mapping[str, str], new: Mapping[str, str], fieldpaths: Sequence[str]
) -> tuple[dict[str, str], list[str]]:
    """containerd's field-path update of labels, one copy for every store.

    Content, images and snapshots each take an update as an object plus the
    field paths to copy from it; one function keeps the three in step with
    containerd and with each other. No *fieldpaths* replaces every label;
    ``labels`` does too; ``labels.<key>`` copies one key from *new*, so a key
    absent there or set to ``""`` is deleted (containerd never stores an
    empty value). ``labels.`` names the empty key, which no label may have
    (see `validate_labels`), so it is left to the caller to refuse.

    Args:
        current: the labels stored now.
        new: the labels the update carries.
        fieldpaths: the paths to apply, in order.

    Returns:
        The labels afterwards (without empty values), and the paths that are
        not about labels, in order, for the caller to apply or refuse.
    """
    if not fieldpaths:
        fieldpaths = ["labels"]
    labels = dict(current)
    others: list[str] = []
    for path in fieldpaths:
        key = path.removeprefix("labels.")
        if path == "labels":
            labels = dict(new)
        elif key != path and key:
            labels[key] = new.get(key, "")
        else:
            others.append(path)
    return {k: v for k, v in labels.items() if v != ""}, others


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
