"""A small image for the explorer's tests: hand-built indexes behind an `ImageLayers` stand-in.

The layers are real layer indexes (`tests.layerindexes.build`) and the
merged tree, changes and space report are ckfs.inspect's own; only the
image around them is a stand-in: its file bytes come from a table instead
of a blob, so the UI tests need no store and no registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import trio

from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import InvalidArgument
from ckfs.explore.model import Model
from ckfs.inspect import LayerInfo
from ckfs.layerindex.model import Node
from tests.layerindexes import D, Entry, F, Kind, build

#: A binary's head: an ELF magic and every byte value below 64.
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(range(64))

#: What each layer writes: (created_by, [entry, ...], {path: bytes}).
LAYERS: list[tuple[str, list[Entry], dict[str, bytes]]] = [
    (
        "ADD rootfs.tar /",
        [
            D("etc"),
            D("bin"),
            D("opt/app"),
            Entry("link", Kind.SYMLINK, mode=0o777, link="etc/motd"),
        ],
        {
            "etc/motd": b"motd one\n",
            "etc/hosts": b"127.0.0.1 localhost\n",
            "etc/ansi": b"\x1b]0;retitled\x07 colour \x1b[31mred\n",
            "bin/tool": ELF,
            "opt/app/old": b"old\n",
            "gone": b"to be deleted\n",
        },
    ),
    (
        "RUN edit motd; rm gone; replace opt/app",
        [Entry("gone", Kind.WHITEOUT), Entry("opt/app", Kind.OPAQUE)],
        {"etc/motd": b"motd two\n", "opt/app/new": b"new\n"},
    ),
    (
        "RUN rm /etc/hosts && echo three > /etc/motd",
        [Entry("etc/hosts", Kind.WHITEOUT)],
        {"etc/motd": b"motd three, the longest\n"},
    ),
]

NAME = "example.com/explore/test:1"


class StubImage:
    """`ckfs.inspect.ImageLayers`' surface over hand-built layers (module docstring)."""

    def __init__(self, layers: list[LayerInfo], contents: dict[tuple[int, str], bytes]) -> None:
        self.name = NAME
        self.layers = layers
        self.contents = contents
        self.reads: list[tuple[int, str, int]] = []

    def layer(self, n: int) -> LayerInfo:
        if not 1 <= n <= len(self.layers):
            raise InvalidArgument(f"layer {n} out of range: {self.name} has {len(self.layers)}")
        return self.layers[n - 1]

    def upto(self, n: int) -> list[LayerInfo]:
        self.layer(n) if n else None
        return self.layers[:n]

    async def read(self, layer: LayerInfo, node: Node, offset: int = 0, size: int = -1) -> bytes:
        await trio.sleep(0)
        path = layer.index.path_of(node.ino)
        self.reads.append((layer.number, path, size))
        data = self.contents[layer.number, path]
        return data[offset : None if size < 0 else offset + size]


@contextlib.contextmanager
def stub_image(tmp_path: Path) -> Iterator[StubImage]:
    """The image of `LAYERS`, its indexes open for the block."""
    infos = []
    contents = {}
    for n, (created_by, entries, files) in enumerate(LAYERS, 1):
        digest = Digest.parse("sha256:" + f"{n:02x}" * 32)
        items = [*entries, *(F(p, len(b)) for p, b in files.items())]
        index = build(tmp_path / f"{n}.db", items, layer=digest)
        desc = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", digest, 1000 * n)
        infos.append(LayerInfo(n, desc, digest, created_by, "tar", index))
        contents.update({(n, p): b for p, b in files.items()})
    try:
        yield StubImage(infos, contents)
    finally:
        for info in infos:
            info.index.close()


def opener(
    image: StubImage, gate: trio.Event | None = None
) -> Callable[[Callable[[int, int], None]], contextlib.AbstractAsyncContextManager[Model]]:
    """An `ExploreApp` opener of *image*: reports each layer indexed, waits for *gate*."""

    @contextlib.asynccontextmanager
    async def open_model(on_indexed: Callable[[int, int], None]) -> AsyncIterator[Model]:
        total = len(image.layers)
        on_indexed(0, total)
        if gate is not None:
            await gate.wait()
        for n in range(1, total + 1):
            on_indexed(n, total)
        yield Model(image)

    return open_model
