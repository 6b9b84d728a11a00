"""`ckfs.inspect.image` helpers that need no image: history matching, layer numbers."""

from __future__ import annotations

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
