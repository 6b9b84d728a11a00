"""Protobuf <-> model conversions (ckfs.api.convert): round trips and refusals."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Iterator

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from ckfs.api import convert
from ckfs.api.services.content.v1 import content_pb2
from ckfs.api.services.images.v1 import images_pb2
from ckfs.api.services.introspection.v1 import introspection_pb2
from ckfs.api.services.namespaces.v1 import namespaces_pb2
from ckfs.api.services.snapshots.v1 import snapshots_pb2
from ckfs.api.services.version.v1 import version_pb2
from ckfs.api.types import types_pb2
from ckfs.content.types import Info as ContentInfo
from ckfs.content.types import Status
from ckfs.descriptor import Descriptor, Platform
from ckfs.digest import Digest, from_bytes
from ckfs.errors import InvalidArgument
from ckfs.images.store import Image
from ckfs.metadata.fields import EPOCH
from ckfs.mount import Mount
from ckfs.snapshots import Info, Kind, Usage

DIGEST = from_bytes(b"layer")
WHEN = dt.datetime(2026, 12, 3, 7, 51, 39, 123456, tzinfo=dt.UTC)
LATER = WHEN + dt.timedelta(seconds=5)
DESC = Descriptor(
    media_type="application/vnd.oci.image.manifest.v1+json",
    digest=DIGEST,
    size=1234,
    annotations={"org.opencontainers.image.ref.name": "latest"},
)

BAD_DIGESTS = [
    "",
    "sha256",
    "sha256:abc",
    "md5:" + "0" * 32,
    "sha256:" + "A" * 64,
    "sha256:" + "g" * 64,
    "sha256:" + "0" * 64 + "\0",
]


def test_containerd_method_paths() -> None:
    """containerd calls these exact paths; the package names are part of the wire."""
    services = {
        snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]: "containerd.services.snapshots.v1",
        content_pb2.DESCRIPTOR.services_by_name["Content"]: "containerd.services.content.v1",
        images_pb2.DESCRIPTOR.services_by_name["Images"]: "containerd.services.images.v1",
    }
    for service, package in services.items():
        assert service.full_name == f"{package}.{service.name}"
    assert types_pb2.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"
    listing = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"].methods_by_name["List"]
    assert listing.server_streaming and not listing.client_streaming
    # containerd's numbers where proto3 habits would differ (Image skips 4-6).
    assert images_pb2.Image.DESCRIPTOR.fields_by_name["created_at"].number == 7
    assert types_pb2.Descriptor.DESCRIPTOR.fields_by_name["annotations"].number == 5


#: The wire of containerd 1.6.20's api/ (types, snapshots, content, images,
#: namespaces, version, introspection) as `_wire` lists it, hashed. Computed
#: from containerd's own .proto files (gogoproto options stripped, which do
#: not reach the wire) less Plugin.init_err, which ckfs never sends. A change
#: here means containerd and ctr no longer read ckfsd's messages as theirs.
CONTAINERD_WIRE = "f95648fd28da200df6556e8710d231d22591570b41fd82cacf47fcbf7638750c"


def _fields(prefix: str, messages: Iterable[descriptor_pb2.DescriptorProto]) -> Iterator[str]:
    for m in messages:
        name = f"{prefix}.{m.name}"
        for x in m.field:
            yield f"{name} {x.name} {x.number} {x.type} {x.label} {x.type_name}"
        yield from _fields(name, m.nested_type)


def _wire(*modules: object) -> list[str]:
    """Every field, enum value and method of *modules*: names, numbers, types."""
    out: list[str] = []
    for module in modules:
        f = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(f)  # type: ignore[attr-defined]
        out += _fields(f.package, f.message_type)
        out += [f"{f.package}.{e.name} {v.name} {v.number}" for e in f.enum_type for v in e.value]
        out += [
            f"{f.package}.{s.name}/{m.name} {m.input_type} {m.output_type} "
            f"{m.client_streaming} {m.server_streaming}"
            for s in f.service
            for m in s.method
        ]
    return sorted(out)


def test_wire_is_containerds() -> None:
    wire = _wire(
        types_pb2,
        snapshots_pb2,
        content_pb2,
        images_pb2,
        namespaces_pb2,
        version_pb2,
        introspection_pb2,
    )
    assert len(wire) == 191
    assert hashlib.sha256("\n".join(wire).encode()).hexdigest() == CONTAINERD_WIRE


@pytest.mark.parametrize(
    "m",
    [
        Mount("overlay", "overlay", "", ("index=off", "lowerdir=/a:/b", "upperdir=/u")),
        Mount("bind", "/var/lib/ckfs/snapshots/1/fs", "", ("ro", "rbind")),
        Mount("tmpfs", "tmpfs", "dev", ()),
    ],
)
def test_mount_round_trip(m: Mount) -> None:
    pb = convert.mount_to_proto(m)
    assert convert.mount_from_proto(types_pb2.Mount.FromString(pb.SerializeToString())) == m
    assert convert.mounts_from_proto(convert.mounts_to_proto([m, m])) == [m, m]


@pytest.mark.parametrize(
    "pb",
    [
        types_pb2.Mount(source="/x"),
        types_pb2.Mount(type="bind", source="/x\0/etc"),
        types_pb2.Mount(type="bind", source="/x", options=["ro\0rw"]),
        types_pb2.Mount(type="bind", source="/x", target="a\0"),
    ],
)
def test_mount_refused(pb: types_pb2.Mount) -> None:
    with pytest.raises(InvalidArgument, match="mount"):
        convert.mount_from_proto(pb)


def test_descriptor_round_trip() -> None:
    pb = types_pb2.Descriptor.FromString(convert.descriptor_to_proto(DESC).SerializeToString())
    assert convert.descriptor_from_proto(pb) == DESC


def test_descriptor_drops_what_containerd_16_cannot_carry() -> None:
    rich = DESC.replace(platform=Platform("linux", "amd64"), urls=("https://x",))
    back = convert.descriptor_from_proto(convert.descriptor_to_proto(rich))
    assert back == DESC


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_descriptor_bad_digest(digest: str) -> None:
    pb = types_pb2.Descriptor(media_type="x", digest=digest, size=1)
    with pytest.raises(InvalidArgument, match="target"):
        convert.descriptor_from_proto(pb, where="target")


@pytest.mark.parametrize(
    "pb",
    [
        types_pb2.Descriptor(digest=str(DIGEST), size=1),
        types_pb2.Descriptor(media_type="x", digest=str(DIGEST), size=-1),
    ],
)
def test_descriptor_refused(pb: types_pb2.Descriptor) -> None:
    with pytest.raises(InvalidArgument, match="descriptor"):
        convert.descriptor_from_proto(pb)


def test_platform() -> None:
    for p in (Platform("linux", "arm64", "v8"), Platform("linux", "amd64")):
        assert convert.platform_from_proto(convert.platform_to_proto(p)) == p
    with pytest.raises(InvalidArgument, match="platform"):
        convert.platform_from_proto(types_pb2.Platform(os="linux"))


@given(
    st.datetimes(
        min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59, 59, 999999)
    )
)
def test_timestamp_round_trip(naive: dt.datetime) -> None:
    when = naive.replace(tzinfo=dt.UTC)
    assert convert.datetime_from_proto(convert.datetime_to_proto(when)) == when


def test_timestamp_details() -> None:
    assert convert.datetime_from_proto(Timestamp()) == EPOCH
    # Nanoseconds are truncated, never rounded up past the true time.
    ts = Timestamp(seconds=1, nanos=999_999_999)
    assert convert.datetime_from_proto(ts) == EPOCH + dt.timedelta(seconds=1, microseconds=999_999)
    # Another zone and a naive time (the stores' UTC) mean the same instant.
    east = WHEN.astimezone(dt.timezone(dt.timedelta(hours=5)))
    assert convert.datetime_to_proto(east) == convert.datetime_to_proto(WHEN)
    assert convert.datetime_to_proto(WHEN.replace(tzinfo=None)) == convert.datetime_to_proto(WHEN)


@pytest.mark.parametrize(
    "ts",
    [
        Timestamp(seconds=253_402_300_800),
        Timestamp(seconds=-62_135_596_801),
        Timestamp(seconds=0, nanos=-1),
        Timestamp(seconds=0, nanos=1_000_000_000),
    ],
)
def test_timestamp_out_of_range(ts: Timestamp) -> None:
    with pytest.raises(InvalidArgument, match="out of range"):
        convert.datetime_from_proto(ts)


@pytest.mark.parametrize("kind", list(Kind))
def test_snapshot_info_round_trip(kind: Kind) -> None:
    info = Info(
        kind=kind,
        name="default/3/sha256:" + "a" * 64,
        parent="sha256:" + "b" * 64,
        labels={"containerd.io/snapshot.ref": "sha256:" + "c" * 64},
        created_at=WHEN,
        updated_at=LATER,
    )
    pb = convert.snapshot_info_to_proto(info)
    back = snapshots_pb2.Info.FromString(pb.SerializeToString())
    assert convert.snapshot_info_from_proto(back) == info


@pytest.mark.parametrize("value", [snapshots_pb2.UNKNOWN, 4, 99, -1])
def test_snapshot_unknown_kind(value: int) -> None:
    # An open proto3 enum keeps numbers it has no name for; they are refused here.
    pb = snapshots_pb2.Info.FromString(
        snapshots_pb2.Info(name="x", kind=value).SerializeToString()  # type: ignore[arg-type]
    )
    with pytest.raises(InvalidArgument, match="unknown snapshot kind"):
        convert.snapshot_info_from_proto(pb)


def test_snapshot_info_needs_a_name() -> None:
    with pytest.raises(InvalidArgument, match="missing name"):
        convert.snapshot_info_from_proto(snapshots_pb2.Info(kind=snapshots_pb2.ACTIVE))


def test_usage() -> None:
    usage = Usage(size=1 << 40, inodes=12)
    assert convert.usage_from_proto(convert.usage_to_proto(usage)) == usage
    for pb in (snapshots_pb2.UsageResponse(size=-1), snapshots_pb2.UsageResponse(inodes=-1)):
        with pytest.raises(InvalidArgument, match="negative"):
            convert.usage_from_proto(pb)


def test_content_info_round_trip() -> None:
    info = ContentInfo(DIGEST, 5, WHEN, LATER, {"containerd.io/gc.ref.content.l.0": str(DIGEST)})
    pb = content_pb2.Info.FromString(convert.content_info_to_proto(info).SerializeToString())
    assert convert.content_info_from_proto(pb) == info


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_content_info_bad_digest(digest: str) -> None:
    with pytest.raises(InvalidArgument, match="content"):
        convert.content_info_from_proto(content_pb2.Info(digest=digest, size=1))


def test_content_info_negative_size() -> None:
    with pytest.raises(InvalidArgument, match="negative size"):
        convert.content_info_from_proto(content_pb2.Info(digest=str(DIGEST), size=-5))


@pytest.mark.parametrize("expected", [DIGEST, None])
def test_status_round_trip(expected: Digest | None) -> None:
    status = Status("fetch-layer-1", 10, 100 if expected else 0, expected, WHEN, LATER)
    pb = content_pb2.Status.FromString(convert.status_to_proto(status).SerializeToString())
    assert convert.status_from_proto(pb) == status


@pytest.mark.parametrize(
    ("pb", "match"),
    [
        (content_pb2.Status(offset=1), "missing ref"),
        (content_pb2.Status(ref="r", offset=-1), "negative"),
        (content_pb2.Status(ref="r", total=-1), "negative"),
        (content_pb2.Status(ref="r", expected="sha256:nope"), "invalid digest"),
    ],
)
def test_status_refused(pb: content_pb2.Status, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        convert.status_from_proto(pb)


def test_image_round_trip() -> None:
    image = Image("docker.io/library/busybox:latest", DESC, {"k": "v"}, WHEN, LATER)
    pb = images_pb2.Image.FromString(convert.image_to_proto(image).SerializeToString())
    assert convert.image_from_proto(pb) == image


@pytest.mark.parametrize(
    ("pb", "match"),
    [
        (images_pb2.Image(target=convert.descriptor_to_proto(DESC)), "missing name"),
        (images_pb2.Image(name="x"), "missing target"),
        (
            images_pb2.Image(name="x", target=types_pb2.Descriptor(media_type="m", digest="z")),
            "invalid digest",
        ),
    ],
)
def test_image_refused(pb: images_pb2.Image, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        convert.image_from_proto(pb)


def test_fieldpaths() -> None:
    assert convert.fieldpaths(FieldMask()) == []
    assert convert.fieldpaths(FieldMask(paths=["labels.a", "target"])) == ["labels.a", "target"]
