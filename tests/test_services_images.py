"""The Images, Namespaces, Version and Introspection service classes, under trio.

Images: records through containerd's messages, filters, field-mask updates
(label-only updates without a target, as containerd's clients send them),
malformed input refused. Namespaces: ``default`` alone. Introspection: the
root's UUID kept, snapshotters as containerd's plugins. The image store
itself is tested in test_image_store.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from google.protobuf import empty_pb2
from google.protobuf.field_mask_pb2 import FieldMask

import ckfs
import snapshotters
from ckfs.api import convert
from ckfs.api.services.images.v1 import images_pb2 as pb
from ckfs.api.services.introspection.v1 import introspection_pb2 as in_pb
from ckfs.api.services.namespaces.v1 import namespaces_pb2 as ns_pb
from ckfs.api.types import types_pb2
from ckfs.descriptor import Descriptor
from ckfs.digest import from_bytes
from ckfs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ckfs.images import ImageStore
from ckfs.services.images import ImagesService
from ckfs.services.introspection import SNAPSHOTTER_PLUGIN, IntrospectionService
from ckfs.services.namespaces import NamespacesService
from ckfs.services.version import VersionService
from ckfs.state import State
from tests.test_unpack import OffLoop

CALL = object()
NAME = "docker.io/library/busybox:latest"
TARGET = Descriptor(
    media_type="application/vnd.oci.image.index.v1+json", digest=from_bytes(b"index"), size=5
)
OTHER = Descriptor(
    media_type="application/vnd.oci.image.manifest.v1+json",
    digest=from_bytes(b"manifest"),
    size=8,
    annotations={"a": "1"},
)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    state = State(tmp_path / "root")
    # Every store call must come from a worker thread: SQLite blocks.
    state.__dict__["images"] = cast(ImageStore, OffLoop(ImageStore(state.db)))
    yield state
    state.close()


@pytest.fixture
def service(state: State) -> ImagesService:
    return ImagesService(state)


def image(name: str = NAME, target: Descriptor = TARGET, **labels: str) -> pb.Image:
    return pb.Image(name=name, target=convert.descriptor_to_proto(target), labels=labels)


async def create(service: ImagesService, img: pb.Image) -> pb.Image:
    return (await service.Create(pb.CreateImageRequest(image=img), CALL)).image


async def names(service: ImagesService, *filters: str) -> list[str]:
    listed = await service.List(pb.ListImagesRequest(filters=filters), CALL)
    return [i.name for i in listed.images]


async def test_create_get_list_delete(service: ImagesService) -> None:
    created = await create(service, image(k="v"))
    assert created.created_at.seconds > 0 and created.updated_at == created.created_at
    got = (await service.Get(pb.GetImageRequest(name=NAME), CALL)).image
    assert got == created
    assert convert.image_from_proto(got).target == TARGET
    await create(service, image("docker.io/library/alpine:3", OTHER))
    assert await names(service) == ["docker.io/library/alpine:3", NAME]
    assert await names(service, "labels.k==v") == [NAME]
    assert await names(service, f"target.digest=={OTHER.digest}") == ["docker.io/library/alpine:3"]
    with pytest.raises(AlreadyExists):
        await create(service, image())
    await service.Delete(pb.DeleteImageRequest(name=NAME, sync=True), CALL)
    with pytest.raises(NotFound):
        await service.Get(pb.GetImageRequest(name=NAME), CALL)
    with pytest.raises(NotFound):
        await service.Delete(pb.DeleteImageRequest(name=NAME), CALL)


async def test_update(service: ImagesService) -> None:
    await create(service, image(a="1", b="2"))
    # What `ctr images label` sends: the name, the labels, one path.
    partial = pb.Image(name=NAME, labels={"a": "10"})
    mask = FieldMask(paths=["labels.a"])
    updated = (
        await service.Update(pb.UpdateImageRequest(image=partial, update_mask=mask), CALL)
    ).image
    assert dict(updated.labels) == {"a": "10", "b": "2"}
    assert convert.descriptor_from_proto(updated.target) == TARGET
    # No mask: target and labels replaced.
    whole = await service.Update(pb.UpdateImageRequest(image=image(target=OTHER, c="3")), CALL)
    assert dict(whole.image.labels) == {"c": "3"}
    assert convert.descriptor_from_proto(whole.image.target) == OTHER
    # Target paths need a target.
    with pytest.raises(InvalidArgument, match="target"):
        await service.Update(
            pb.UpdateImageRequest(image=partial, update_mask=FieldMask(paths=["target"])), CALL
        )
    with pytest.raises(NotFound):
        await service.Update(
            pb.UpdateImageRequest(image=pb.Image(name="nope"), update_mask=mask), CALL
        )
    with pytest.raises(InvalidArgument):
        await service.Update(
            pb.UpdateImageRequest(image=partial, update_mask=FieldMask(paths=["name"])), CALL
        )


@pytest.mark.parametrize(
    ("img", "match"),
    [
        (image(""), "must not be empty"),
        (image("a\0b"), "control"),
        (image("x" * 5000), "more than"),
        (pb.Image(name=NAME), "missing target"),
        (
            pb.Image(name=NAME, target=types_pb2.Descriptor(media_type="m", digest="sha256:1")),
            "invalid digest",
        ),
        (image(**{f"k{i}": "v" * 4000 for i in range(20)}), "labels"),
        (image(k="v" * 5000), "label"),
    ],
)
async def test_create_refuses(service: ImagesService, img: pb.Image, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        await create(service, img)
    assert await names(service) == []


async def test_malformed_filter(service: ImagesService) -> None:
    with pytest.raises(InvalidArgument):
        await names(service, "name==")


async def test_namespaces_default_alone() -> None:
    service = NamespacesService(labels={"containerd.io/defaults/snapshotter": "overlayfs"})
    assert service.NAMESPACED is False
    got = (await service.Get(ns_pb.GetNamespaceRequest(name="default"), CALL)).namespace
    assert got.name == "default"
    assert dict(got.labels) == {"containerd.io/defaults/snapshotter": "overlayfs"}
    listed = await service.List(ns_pb.ListNamespacesRequest(), CALL)
    assert [n.name for n in listed.namespaces] == ["default"]
    with pytest.raises(NotFound, match="one namespace"):
        await service.Get(ns_pb.GetNamespaceRequest(name="k8s.io"), CALL)
    with pytest.raises(AlreadyExists):
        await service.Create(
            ns_pb.CreateNamespaceRequest(namespace=ns_pb.Namespace(name="default")), CALL
        )
    with pytest.raises(FailedPrecondition, match="one namespace"):
        await service.Create(
            ns_pb.CreateNamespaceRequest(namespace=ns_pb.Namespace(name="other")), CALL
        )
    with pytest.raises(FailedPrecondition):
        await service.Update(
            ns_pb.UpdateNamespaceRequest(namespace=ns_pb.Namespace(name="default")), CALL
        )
    with pytest.raises(FailedPrecondition):
        await service.Delete(ns_pb.DeleteNamespaceRequest(name="default"), CALL)
    with pytest.raises(NotFound):
        await service.Delete(ns_pb.DeleteNamespaceRequest(name="other"), CALL)


async def test_version() -> None:
    service = VersionService()
    assert service.NAMESPACED is False
    answer = await service.Version(empty_pb2.Empty(), CALL)
    assert answer.version == ckfs.__version__


async def test_introspection(state: State) -> None:
    service = IntrospectionService(state)
    first = (await service.Server(empty_pb2.Empty(), CALL)).uuid
    assert len(first) == 36
    assert (await IntrospectionService(state).Server(empty_pb2.Empty(), CALL)).uuid == first
    assert [p.name for p in state.root.iterdir() if "uuid" in p.name] == ["uuid"]
    everything = await service.Plugins(in_pb.PluginsRequest(), CALL)
    assert [p.id for p in everything.plugins] == list(snapshotters.NAMES)
    assert all(p.type == SNAPSHOTTER_PLUGIN and p.platforms for p in everything.plugins)
    name = snapshotters.NAMES[0]
    one = in_pb.PluginsRequest(filters=[f"type=={SNAPSHOTTER_PLUGIN},id=={name}"])
    assert [p.id for p in (await service.Plugins(one, CALL)).plugins] == [name]
    none = in_pb.PluginsRequest(filters=["type==io.containerd.runtime.v2"])
    assert not (await service.Plugins(none, CALL)).plugins
    with pytest.raises(InvalidArgument):
        await service.Plugins(in_pb.PluginsRequest(filters=["id=="]), CALL)
