"""Checks and bounds every service applies at the boundary.

Keys, names and label sets arrive from any client of ckfsd; the stores
bound single labels (`ckfs.metadata.fields.MAX_LABEL_SIZE`) but trust
whoever calls them with keys. These checks refuse what no honest client
sends (InvalidArgument), so each service refuses it alike. The way out is
bounded too: a streamed List answers in `batches` no client's message
limit refuses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol, TypeVar

from ckfs.errors import InvalidArgument

__all__ = ["LIST_BATCH", "MAX_KEY_SIZE", "MAX_LABELS_SIZE", "batches", "check_key", "check_labels"]

#: Longest key or name accepted, in bytes. containerd's are
#: ``<namespace>/<sequence>/<key>`` with identifiers of at most 76
#: characters, and its unpack keys are ~110 bytes; 1 KiB fits any of them
#: and keeps a client from storing kilobytes of text per key, which every
#: later List would stream.
MAX_KEY_SIZE = 1024

#: Most bytes one request's labels may take together. A single label is
#: bounded by the store (`ckfs.metadata.fields.MAX_LABEL_SIZE`, 4 KiB);
#: this bounds their number, so no record carries megabytes of labels
#: into every Stat and List. containerd sets a handful per object.
MAX_LABELS_SIZE = 64 * 1024

#: Characters no key or name may hold: NUL and the other C0 controls, DEL.
#: containerd's keys are identifiers and digests; a control character in a
#: key is an attack on whatever prints or stores it.
_CONTROL = re.compile("[\x00-\x1f\x7f]")

#: Records per List response, as containerd's own services batch: the
#: client gets the first ones early and no response grows with the store.
LIST_BATCH = 100

#: Bytes of labels one List response may carry before its batch is cut
#: early: 100 records with labels near `MAX_LABELS_SIZE` would pass gRPC's
#: default 4 MiB message limit; a quarter of it leaves room. Names and
#: digests are bounded (`MAX_KEY_SIZE`) and left out of the count.
_BATCH_BYTES = 1 << 20


class _Labelled(Protocol):
    @property
    def labels(self) -> Mapping[str, str]: ...


_L = TypeVar("_L", bound=_Labelled)


def check_key(key: str, what: str = "snapshot key", *, empty: bool = False) -> None:
    """Refuse a key or name that no client has a reason to send.

    Args:
        key: the key, name or parent as received.
        what: what it is, for the message.
        empty: whether ``""`` is allowed (a parent, meaning none).

    Raises:
        InvalidArgument: *key* is empty (unless allowed), longer than
            `MAX_KEY_SIZE` bytes, holds a control character, or has a
            ``..`` path component (keys never become paths in ckfs, but a
            name that could climb out of a directory has no honest use).
    """
    if not key:
        if empty:
            return
        raise InvalidArgument(f"{what} must not be empty")
    size = len(key.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_SIZE:
        raise InvalidArgument(f"{what} {key[:64]!r}...: {size} bytes, more than {MAX_KEY_SIZE}")
    if _CONTROL.search(key):
        raise InvalidArgument(f"{what} {key!r}: control characters are not allowed")
    if ".." in key.split("/"):
        raise InvalidArgument(f"{what} {key!r}: '..' is not allowed as a path component")


def check_labels(labels: Mapping[str, str], what: str) -> dict[str, str]:
    """*labels* as a dict, refused when together larger than `MAX_LABELS_SIZE`.

    Raises:
        InvalidArgument: the keys and values add up to too many bytes.
    """
    size = sum(len(k.encode()) + len(v.encode()) for k, v in labels.items())
    if size > MAX_LABELS_SIZE:
        raise InvalidArgument(
            f"{what}: {len(labels)} labels of {size} bytes, more than {MAX_LABELS_SIZE}"
        )
    return dict(labels)


def batches(records: Iterable[_L]) -> Iterator[list[_L]]:
    """*records* in runs of at most `LIST_BATCH`, cut early past `_BATCH_BYTES` of labels."""
    batch: list[_L] = []
    size = 0
    for record in records:
        batch.append(record)
        size += sum(len(k) + len(v) for k, v in record.labels.items())
        if len(batch) >= LIST_BATCH or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
