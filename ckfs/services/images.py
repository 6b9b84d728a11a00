"""containerd's Images service over ckfs's image store.

``ctr --address <ckfsd socket> images ls`` and containerd's image proxy talk
to this class. An image is a name bound to a target descriptor with labels;
the content behind it is not checked here (containerd's service does not
either). Names, like snapshot keys, are refused when they are empty, over
`~ckfs.services.checks.MAX_KEY_SIZE` bytes or hold control characters;
label sets as a whole are bounded as the other services bound them.

Every store call runs in a worker thread: SQLite blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import trio
from google.protobuf import empty_pb2

from ckfs.api import convert
from ckfs.api.services.images.v1 import images_pb2 as pb
from ckfs.services.checks import check_key, check_labels

if TYPE_CHECKING:
    from ckfs.images import Image, ImageStore
    from ckfs.state import State

__all__ = ["ImagesService"]

_T = TypeVar("_T")

#: Update paths that read the request's target; others leave it as stored.
_TARGET_PATHS = ("target", "annotations")


def _needs_target(paths: Sequence[str]) -> bool:
    """Whether an update with *paths* takes the request's target (none: everything)."""
    return not paths or any(p.split(".", 1)[0] in _TARGET_PATHS for p in paths)


class ImagesService:
    """``containerd.services.images.v1.Images`` on one ckfs state root."""

    def __init__(self, state: State) -> None:
        self._state = state

    async def _run(self, fn: Callable[[ImageStore], _T]) -> _T:
        """``fn(store)`` in a worker thread."""
        state = self._state
        return await trio.to_thread.run_sync(lambda: fn(state.images))

    async def Get(self, request: pb.GetImageRequest, call: object) -> pb.GetImageResponse:
        name = request.name
        check_key(name, "image name")
        image = await self._run(lambda s: s.get(name))
        return pb.GetImageResponse(image=convert.image_to_proto(image))

    async def List(self, request: pb.ListImagesRequest, call: object) -> pb.ListImagesResponse:
        filters = list(request.filters)
        images = await self._run(lambda s: s.list(filters))
        return pb.ListImagesResponse(images=[convert.image_to_proto(i) for i in images])

    async def Create(self, request: pb.CreateImageRequest, call: object) -> pb.CreateImageResponse:
        image = _checked(request.image)
        created = await self._run(lambda s: s.create(image))
        return pb.CreateImageResponse(image=convert.image_to_proto(created))

    async def Update(self, request: pb.UpdateImageRequest, call: object) -> pb.UpdateImageResponse:
        """Change what the mask names (nothing named: target and labels).

        A label-only update need not carry a valid target, as containerd's
        clients send partial images; the stored target is kept.

        Raises:
            InvalidArgument: a malformed name, target (when used) or labels,
                or a field path the store does not know.
            NotFound: no image has the name.
        """
        paths = convert.fieldpaths(request.update_mask)
        if _needs_target(paths):
            image = _checked(request.image)
            updated = await self._run(lambda s: s.update(image, paths))
        else:
            name = request.image.name
            check_key(name, "image name")
            labels = check_labels(request.image.labels, f"image {name!r}")

            def update(s: ImageStore) -> Image:
                # The target is not among the paths: the stored one stands in.
                partial = dataclasses.replace(s.get(name), labels=labels)
                return s.update(partial, paths)

            updated = await self._run(update)
        return pb.UpdateImageResponse(image=convert.image_to_proto(updated))

    async def Delete(self, request: pb.DeleteImageRequest, call: object) -> empty_pb2.Empty:
        """Forget the name; its content stays until ``ckfs gc`` (``sync`` changes nothing)."""
        name = request.name
        check_key(name, "image name")
        await self._run(lambda s: s.delete(name))
        return empty_pb2.Empty()


def _checked(image: pb.Image) -> Image:
    """*image* as a model object, its name and label set checked.

    Raises:
        InvalidArgument: see `ImagesService.Update`.
    """
    check_key(image.name, "image name")
    check_labels(image.labels, f"image {image.name!r}")
    return convert.image_from_proto(image)
