"""Odd but real layers: what other tools write must apply."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from ckfs.archive.apply import ApplyOptions, apply_layer
from ckfs.digest import from_bytes
from ckfs.errors import DataLoss, InvalidArgument


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _unterminated(files: dict[str, bytes]) -> bytes:
    """A tar whose writer was never closed: no final padding, no zero blocks."""
    data = _tar(files).rstrip(b"\0")
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
    blob = _tar({"a": b"y" * 2000})[: 512 + 1000]
    with pytest.raises((InvalidArgument, DataLoss)):
        apply_layer(
            tmp_path,
            io.BytesIO(blob),
            media_type=None,
            diff_id=from_bytes(blob),
            options=ApplyOptions(whiteouts="delete"),
        )
