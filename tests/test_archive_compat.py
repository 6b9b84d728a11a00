"""Odd but real layers: what other tools write must apply."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from ckfs.archive.apply import ApplyOptions, apply_layer
from ckfs.digest import from_bytes
from ckfs.errors import DataLoss, InvalidArgument
from tests.layouts import layer_tar


def _unterminated(files: dict[str, bytes]) -> bytes:
    """A tar whose writer was never closed: no final padding, no zero blocks."""
    data = layer_tar(files).rstrip(b"\0")
    last = list(files.values())[-1]
    assert data.endswith(last.rstrip(b"\0"))
    return data


@pytest.mark.parametrize(
    "files",
    [
        {"etc/os-release": b"NAME=x\n", "srv/a": b"12345678"},
        {"a": b"x" * 512},  # data ends on a block boundary: only the end blocks lack
    ],
)
def test_unterminated_tar_as_umoci_047_writes_it(tmp_path: Path, files: dict[str, bytes]) -> None:
    blob = _unterminated(files)
    result = apply_layer(
        tmp_path,
        io.BytesIO(blob),
        media_type=None,
        diff_id=from_bytes(blob),
        options=ApplyOptions(whiteouts="delete"),
    )
    assert result.entries == len(files)
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data


def test_truncated_inside_file_data_is_still_an_error(tmp_path: Path) -> None:
    blob = layer_tar({"a": b"y" * 2000})[: 512 + 1000]
    with pytest.raises((InvalidArgument, DataLoss)):
        apply_layer(
            tmp_path,
            io.BytesIO(blob),
            media_type=None,
            diff_id=from_bytes(blob),
            options=ApplyOptions(whiteouts="delete"),
        )
