"""`ckfs.inspect.image` helpers that need no image: history matching, layer numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckfs.digest import Digest
from ckfs.errors import InvalidArgument
from ckfs.images.config import History, ImageConfig
from ckfs.inspect.image import ImageLayers, created_by

DIFF_IDS = tuple(Digest.parse("sha256:" + f"{n:02x}" * 32) for n in range(1, 4))


def config(*history: History) -> ImageConfig:
    return ImageConfig("amd64", "linux", DIFF_IDS, history=history)


@pytest.mark.parametrize(
    ("history", "expect"),
    [
        (
            [
                History(created_by="A"),
                History(created_by="ENV", empty_layer=True),
                History(created_by="B"),
                History(created_by="C"),
            ],
            ["A", "B", "C"],
        ),
        ([History(created_by="A")], ["A", "", ""]),  # a short history leaves the rest empty
        ([], ["", "", ""]),
        ([History(created_by=c) for c in "ABCD"], ["A", "B", "C"]),  # more steps than layers
    ],
)
def test_created_by_skips_empty_layer_steps(history: list[History], expect: list[str]) -> None:
    assert created_by(config(*history)) == expect


def test_layer_numbers_out_of_range() -> None:
    image = ImageLayers.__new__(ImageLayers)
    image.name, image.layers = "x.local/i:latest", [object()] * 5  # type: ignore[list-item]
    assert image.upto(5) == image.layers and image.layer(1) is image.layers[0]
    for n in (0, 6, -1):
        with pytest.raises(
            InvalidArgument, match=f"layer {n} out of range: x.local/i:latest has 5"
        ):
            image.layer(n)


def test_streamed_reader_reads_on_and_starts_over(tmp_path: Path) -> None:
    """Pieces in order continue the stream; a piece before it starts over; both right."""
    import io
    import random
    import tarfile

    import trio

    from ckfs.archive.entry import Kind
    from ckfs.inspect.image import StreamedReader
    from ckfs.layerindex.model import Node
    from tests.tarbuild import F, compress, tar

    body = random.Random(3).randbytes(3 << 20)
    raw = tar(F("a", b"x" * 5000), F("big", body))
    blob = compress(raw, "zstd")
    (tmp_path / "blob").write_bytes(blob.data)
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        data = t.getmember("big").offset_data
    node = Node(2, 1, "big", Kind.FILE, 0o644, 0, 0, len(body), 0, 0, "", 1, 1 << 20, data, False)
    reader = StreamedReader(tmp_path / "blob", blob.media_type)

    async def pieces() -> None:
        for offset, size in [(0, 100), (100, 1 << 20), (2 << 20, 5), (10, 10), (3 << 20, 0)]:
            assert await reader.read(node, offset, size) == body[offset : offset + size]

    try:
        trio.run(pieces)
    finally:
        reader.close()
