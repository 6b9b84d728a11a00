"""Protobuf messages to ckfs's model objects and back.

The services and the client meet the wire only here: everything past this
module is a frozen model object whose fields were checked, so a malformed
message (a bad digest, an unknown snapshot kind, a negative size, a time
outside what protobuf can express) becomes one `InvalidArgument` naming the
field, never an object a store trusts. The ``*_to_proto`` direction takes
model objects, which are valid by construction, and cannot fail.

The CLI as a ckfsd client imports this module, so it stays light: the
content and image types live in modules that open SQLite stores, and are
imported inside the functions that build them.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from ckfs.api.services.content.v1 import content_pb2
from ckfs.api.services.images.v1 import images_pb2
from ckfs.api.services.snapshots.v1 import snapshots_pb2
from ckfs.api.types import types_pb2
from ckfs.descriptor import Descriptor, Platform
from ckfs.digest import Digest
from ckfs.errors import InvalidArgument
from ckfs.metadata.fields import EPOCH
from ckfs.mount import Mount
from ckfs.snapshots import Info, Kind, Usage

if TYPE_CHECKING:
    from google.protobuf.field_mask_pb2 import FieldMask

    from ckfs.content.types import Info as ContentInfo
    from ckfs.content.types import Status
    from ckfs.images.store import Image

__all__ = [
    "content_info_from_proto",
    "content_info_to_proto",
    "datetime_from_proto",
    "datetime_to_proto",
    "descriptor_from_proto",
    "descriptor_to_proto",
    "digest_from_proto",
    "fieldpaths",
    "image_from_proto",
    "image_to_proto",
    "kind_from_proto",
    "kind_to_proto",
    "mount_from_proto",
    "mount_to_proto",
    "mounts_from_proto",
    "mounts_to_proto",
    "platform_from_proto",
    "platform_to_proto",
    "snapshot_info_from_proto",
    "snapshot_info_to_proto",
    "status_from_proto",
    "status_to_proto",
    "usage_from_proto",
    "usage_to_proto",
]

#: The range google.protobuf.Timestamp allows (0001-01-01 to 9999-12-31, UTC);
#: outside it no conforming peer can read the time, and datetime cannot hold it.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_NANOS_PER_SECOND = 1_000_000_000

_KINDS: Mapping[Kind, snapshots_pb2.Kind.ValueType] = {
    Kind.VIEW: snapshots_pb2.VIEW,
    Kind.ACTIVE: snapshots_pb2.ACTIVE,
    Kind.COMMITTED: snapshots_pb2.COMMITTED,
}
_KINDS_BACK = {v: k for k, v in _KINDS.items()}


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


def _size(value: int, where: str) -> int:
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
        size=_size(pb.size, where),
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


def fieldpaths(mask: FieldMask) -> list[str]:
    """An update's field paths, in order; none means "every mutable field"."""
    return list(mask.paths)


# -- snapshots ----------------------------------------------------------------


def kind_to_proto(kind: Kind) -> snapshots_pb2.Kind.ValueType:
    return _KINDS[kind]


def kind_from_proto(value: int, *, where: str = "snapshot") -> Kind:
    """Raises: InvalidArgument: UNKNOWN, or a number no Kind has."""
    try:
        return _KINDS_BACK[snapshots_pb2.Kind.ValueType(value)]
    except KeyError:
        raise InvalidArgument(f"{where}: unknown snapshot kind {value}") from None


def snapshot_info_to_proto(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=kind_to_proto(info.kind),
        created_at=datetime_to_proto(info.created_at),
        updated_at=datetime_to_proto(info.updated_at),
        labels=info.labels,
    )


def snapshot_info_from_proto(pb: snapshots_pb2.Info) -> Info:
    """Raises: InvalidArgument: no name, an unknown kind, or a bad time."""
    if not pb.name:
        raise InvalidArgument("snapshot info: missing name")
    where = f"snapshot {pb.name!r}"
    return Info(
        kind=kind_from_proto(pb.kind, where=where),
        name=pb.name,
        parent=pb.parent,
        labels=dict(pb.labels),
        created_at=datetime_from_proto(pb.created_at, where=f"{where} created_at"),
        updated_at=datetime_from_proto(pb.updated_at, where=f"{where} updated_at"),
    )


def usage_to_proto(usage: Usage) -> snapshots_pb2.UsageResponse:
    return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)


def usage_from_proto(pb: snapshots_pb2.UsageResponse) -> Usage:
    """Raises: InvalidArgument: a negative size or inode count."""
    if pb.inodes < 0:
        raise InvalidArgument(f"usage: negative inode count {pb.inodes}")
    return Usage(size=_size(pb.size, "usage"), inodes=pb.inodes)


# -- content --------------------------------------------------------------


def content_info_to_proto(info: ContentInfo) -> content_pb2.Info:
    return content_pb2.Info(
        digest=str(info.digest),
        size=info.size,
        created_at=datetime_to_proto(info.created_at),
        updated_at=datetime_to_proto(info.updated_at),
        labels=info.labels,
    )


def content_info_from_proto(pb: content_pb2.Info) -> ContentInfo:
    """Raises: InvalidArgument: a bad digest, a negative size or a bad time."""
    from ckfs.content.types import Info as ContentInfo

    where = f"content {pb.digest[:80]!r}"
    return ContentInfo(
        digest=digest_from_proto(pb.digest, where=where),
        size=_size(pb.size, where),
        created_at=datetime_from_proto(pb.created_at, where=f"{where} created_at"),
        updated_at=datetime_from_proto(pb.updated_at, where=f"{where} updated_at"),
        labels=dict(pb.labels),
    )


def status_to_proto(status: Status) -> content_pb2.Status:
    return content_pb2.Status(
        ref=status.ref,
        offset=status.offset,
        total=status.total,
        expected=str(status.expected or ""),
        started_at=datetime_to_proto(status.started_at),
        updated_at=datetime_to_proto(status.updated_at),
    )


def status_from_proto(pb: content_pb2.Status) -> Status:
    """An ingest's status; an empty expected digest means unknown.

    Raises:
        InvalidArgument: no ref, a negative offset or total, a bad expected
            digest or a bad time.
    """
    from ckfs.content.types import Status

    if not pb.ref:
        raise InvalidArgument("ingest status: missing ref")
    where = f"ingest {pb.ref[:80]!r}"
    return Status(
        ref=pb.ref,
        offset=_size(pb.offset, f"{where} offset"),
        total=_size(pb.total, f"{where} total"),
        expected=digest_from_proto(pb.expected, where=where) if pb.expected else None,
        started_at=datetime_from_proto(pb.started_at, where=f"{where} started_at"),
        updated_at=datetime_from_proto(pb.updated_at, where=f"{where} updated_at"),
    )


# -- images ---------------------------------------------------------------


def image_to_proto(image: Image) -> images_pb2.Image:
    return images_pb2.Image(
        name=image.name,
        labels=image.labels,
        target=descriptor_to_proto(image.target),
        created_at=datetime_to_proto(image.created_at),
        updated_at=datetime_to_proto(image.updated_at),
    )


def image_from_proto(pb: images_pb2.Image) -> Image:
    """An image record; the store sets the times again when it writes one.

    Raises:
        InvalidArgument: no name, no target, a bad target or a bad time.
    """
    from ckfs.images.store import Image

    if not pb.name:
        raise InvalidArgument("image: missing name")
    where = f"image {pb.name[:200]!r}"
    if not pb.HasField("target"):
        raise InvalidArgument(f"{where}: missing target")
    return Image(
        name=pb.name,
        target=descriptor_from_proto(pb.target, where=f"{where} target"),
        labels=dict(pb.labels),
        created_at=datetime_from_proto(pb.created_at, where=f"{where} created_at"),
        updated_at=datetime_from_proto(pb.updated_at, where=f"{where} updated_at"),
    )
