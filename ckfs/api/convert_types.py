"""containerd.types messages (Mount, Descriptor, Platform) and protobuf's
Timestamp to ckfs's model objects and back: what every service shares.

The rules are `ckfs.api.convert`'s, which re-exports these; they live apart
so the CLI as a ckfsd client loads only them (a pull's events carry
descriptors, a Mounts answer carries Mount records), not the service
messages and the snapshot, content and image model modules the other
conversions need. ``tests/test_client.py`` checks what a client run loads.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from ckfs.api.types import types_pb2
from ckfs.descriptor import Descriptor, Platform
from ckfs.digest import Digest
from ckfs.errors import InvalidArgument
from ckfs.metadata.fields import EPOCH

if TYPE_CHECKING:
    from ckfs.mount import Mount

__all__ = [
    "datetime_from_proto",
    "datetime_to_proto",
    "descriptor_from_proto",
    "descriptor_to_proto",
    "digest_from_proto",
    "mount_from_proto",
    "mount_to_proto",
    "mounts_from_proto",
    "mounts_to_proto",
    "platform_from_proto",
    "platform_to_proto",
    "size_from_proto",
]

#: The range google.protobuf.Timestamp allows (0001-01-01 to 9999-12-31, UTC);
#: outside it no conforming peer can read the time, and datetime cannot hold it.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_NANOS_PER_SECOND = 1_000_000_000

# -- times -----------------------------------------------------------------


def datetime_to_proto(when: _dt.datetime) -> Timestamp:
    """*when* as a Timestamp; a naive datetime is taken as UTC (as the stores write)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    delta = when - EPOCH
    return Timestamp(seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000)


def datetime_from_proto(ts: Timestamp, *, where: str = "timestamp") -> _dt.datetime:
    """*ts* as an aware UTC datetime, nanoseconds truncated to microseconds.

    Raises:
        InvalidArgument: seconds or nanos outside protobuf's Timestamp range.
    """
    if not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS:
        raise InvalidArgument(f"{where}: seconds {ts.seconds} out of range")
    if not 0 <= ts.nanos < _NANOS_PER_SECOND:
        raise InvalidArgument(f"{where}: nanos {ts.nanos} out of range")
    return EPOCH + _dt.timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


# -- shared types -----------------------------------------------------------


def digest_from_proto(value: str, *, where: str = "digest") -> Digest:
    """A digest field, validated.

    Raises:
        InvalidArgument: *value* is empty or not ``<algorithm>:<hex>`` of a
            supported algorithm.
    """
    if not value:
        raise InvalidArgument(f"{where}: missing digest")
    try:
        return Digest.parse(value)
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: {e}") from None


def size_from_proto(value: int, where: str) -> int:
    """Raises: InvalidArgument: *value* is negative."""
    if value < 0:
        raise InvalidArgument(f"{where}: negative size {value}")
    return value


def mount_to_proto(m: Mount) -> types_pb2.Mount:
    return types_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))


def mounts_to_proto(mounts: Iterable[Mount]) -> list[types_pb2.Mount]:
    return [mount_to_proto(m) for m in mounts]


def mount_from_proto(pb: types_pb2.Mount, *, where: str = "mount") -> Mount:
    """A Mount record a caller is about to pass to mount(2).

    Raises:
        InvalidArgument: no type, or a NUL in any field (the kernel would
            read a shorter string than the one checked).
    """
    if not pb.type:
        raise InvalidArgument(f"{where}: missing type")
    for text in (pb.type, pb.source, pb.target, *pb.options):
        if "\0" in text:
            raise InvalidArgument(f"{where}: NUL in a field")
    from ckfs.mount import Mount  # here: loads ctypes, which a pull never needs

    return Mount(type=pb.type, source=pb.source, target=pb.target, options=tuple(pb.options))


def mounts_from_proto(pbs: Iterable[types_pb2.Mount]) -> list[Mount]:
    """Every Mount of a response, each checked as `mount_from_proto` does."""
    return [mount_from_proto(m, where=f"mount {i}") for i, m in enumerate(pbs)]


def descriptor_to_proto(d: Descriptor) -> types_pb2.Descriptor:
    """*d* as containerd 1.6 carries it: platform, urls and artifact type do not cross."""
    return types_pb2.Descriptor(
        media_type=d.media_type, digest=str(d.digest), size=d.size, annotations=d.annotations
    )


def descriptor_from_proto(pb: types_pb2.Descriptor, *, where: str = "descriptor") -> Descriptor:
    """A descriptor from the wire.

    Raises:
        InvalidArgument: no media type, a bad digest or a negative size.
    """
    if not pb.media_type:
        raise InvalidArgument(f"{where}: missing media type")
    return Descriptor(
        media_type=pb.media_type,
        digest=digest_from_proto(pb.digest, where=where),
        size=size_from_proto(pb.size, where),
        annotations=dict(pb.annotations),
    )


def platform_to_proto(p: Platform) -> types_pb2.Platform:
    """*p* as containerd 1.6 carries it: os.version and os.features do not cross."""
    return types_pb2.Platform(os=p.os, architecture=p.architecture, variant=p.variant)


def platform_from_proto(pb: types_pb2.Platform, *, where: str = "platform") -> Platform:
    """Raises: InvalidArgument: os or architecture is missing."""
    if not pb.os or not pb.architecture:
        raise InvalidArgument(f"{where}: os and architecture are required")
    return Platform(os=pb.os, architecture=pb.architecture, variant=pb.variant)
