"""An image store in ckfsd, reached over containerd's Images API.

`RemoteImageStore` answers the read side of `ckfs.images.ImageStore`,
``tag`` and removal (``get``, ``list``, ``tag``, ``delete``), one RPC per call, so the CLI's
``images`` commands take either store and print the same. Images become
model objects only through `ckfs.api.convert` (a malformed answer is
`InvalidArgument`); a failed RPC raises the `ckfs.errors` class of its
status (`ckfs.client.Client.call`), with the daemon's message.

Names are written by Pull (and containerd's clients through the service),
not through this adapter. Light, as every client module: grpc and the
generated modules; the `Image` model loads with the first answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ckfs.api import convert
from ckfs.api.services.images.v1 import images_pb2 as pb
from ckfs.api.services.images.v1 import images_pb2_grpc

if TYPE_CHECKING:
    from ckfs.client import Client
    from ckfs.images.store import Image

__all__ = ["RemoteImageStore"]


class RemoteImageStore:
    """The image store of the ckfsd behind *client* (the channel stays the caller's)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._stub = images_pb2_grpc.ImagesStub(client.channel)

    def __repr__(self) -> str:
        return f"RemoteImageStore(at {self._client.address})"

    def get(self, name: str) -> Image:
        """Raises: NotFound: no image has the name."""
        return convert.image_from_proto(
            self._client.call(self._stub.Get, pb.GetImageRequest(name=name)).image
        )

    def list(self, filters: Sequence[str] = ()) -> list[Image]:
        """Raises: InvalidArgument: a malformed filter."""
        reply = self._client.call(self._stub.List, pb.ListImagesRequest(filters=list(filters)))
        return [convert.image_from_proto(i) for i in reply.images]

    def tag(self, src: str, dst: str, *, force: bool = False) -> Image:
        """Give the image *src* a second name *dst*, as `ckfs.images.ImageStore.tag`.

        Two calls (Get, then Create, or with *force* Update of an existing
        *dst*), not one transaction: a *src* renamed in between still
        copies what Get saw.

        Raises:
            NotFound: *src* does not exist.
            AlreadyExists: *dst* exists and *force* is false.
        """
        from ckfs.errors import AlreadyExists

        source = self.get(src)
        if src == dst:
            return source
        copy = convert.image_to_proto(dataclasses.replace(source, name=dst))
        try:
            reply = self._client.call(self._stub.Create, pb.CreateImageRequest(image=copy))
        except AlreadyExists:
            if not force:
                raise
            reply = self._client.call(self._stub.Update, pb.UpdateImageRequest(image=copy))
        return convert.image_from_proto(reply.image)

    def delete(self, name: str) -> None:
        """Raises: NotFound: no image has the name."""
        self._client.call(self._stub.Delete, pb.DeleteImageRequest(name=name))
