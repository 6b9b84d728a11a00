"""Protobuf messages to ckfs's model objects and back.

The services and the client meet the wire only here: everything past this
module is a frozen model object whose fields were checked, so a malformed
message (a bad digest, an unknown snapshot kind, a negative size, a time
outside what protobuf can express) becomes one `InvalidArgument` naming the
field, never an object a store trusts. The ``*_to_proto`` direction takes
model objects, which are valid by construction, and cannot fail.

The conversions of containerd.types (Mount, Descriptor, Platform) and of
timestamps live in `ckfs.api.convert_types`, re-exported here: the CLI as a
ckfsd client imports only that module. The content and image types live in
modules that open SQLite stores, and are imported inside the functions
that build them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ckfs.api.convert_types import (
    datetime_from_proto,
    datetime_to_proto,
    descriptor_from_proto,
    descriptor_to_proto,
    digest_from_proto,
    mount_from_proto,
    mount_to_proto,
    mounts_from_proto,
    mounts_to_proto,
    platform_from_proto,
    platform_to_proto,
    size_from_proto,
)
from ckfs.api.services.content.v1 import content_pb2
from ckfs.api.services.images.v1 import images_pb2
from ckfs.api.services.snapshots.v1 import snapshots_pb2
from ckfs.errors import InvalidArgument
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
    "size_from_proto",
    "snapshot_info_from_proto",
    "snapshot_info_to_proto",
    "status_from_proto",
    "status_to_proto",
    "usage_from_proto",
    "usage_to_proto",
]

_KINDS: Mapping[Kind, snapshots_pb2.Kind.ValueType] = {
    Kind.VIEW: snapshots_pb2.VIEW,
    Kind.ACTIVE: snapshots_pb2.ACTIVE,
    Kind.COMMITTED: snapshots_pb2.COMMITTED,
}
_KINDS_BACK = {v: k for k, v in _KINDS.items()}


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
    return Usage(size=size_from_proto(pb.size, "usage"), inodes=pb.inodes)


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
        size=size_from_proto(pb.size, where),
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
        offset=size_from_proto(pb.offset, f"{where} offset"),
        total=size_from_proto(pb.total, f"{where} total"),
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
