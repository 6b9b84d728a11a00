"""The sandbox the hostile-layer tests rely on must really confine."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.confine import confined

PROBE = Path(__file__).resolve().parent / ".confine-probe"


def _write(path: Path) -> str:
    path.write_text("x")
    return "written"


@pytest.mark.skipif(os.geteuid() != 0, reason="confinement needs root")
def test_only_the_scratch_directory_is_writable(tmp_path: Path) -> None:
    assert confined(tmp_path, _write, tmp_path / "ok") == "written"
    assert (tmp_path / "ok").read_text() == "x"
    try:
        with pytest.raises(OSError) as info:
            confined(tmp_path, _write, PROBE)
        assert info.value.errno == errno.EROFS
        assert not PROBE.exists()
    finally:
        PROBE.unlink(missing_ok=True)


def test_exceptions_come_back(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError):
        confined(tmp_path, divmod, 1, 0)
