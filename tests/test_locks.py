"""ckfs.locks.try_lock: taken, refused while held, no descriptor leaked."""

from __future__ import annotations

import os
from pathlib import Path

from ckfs.locks import try_lock


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_try_lock_is_exclusive_and_leaks_nothing(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    held = try_lock(path, 0o644)
    assert held is not None
    assert path.stat().st_mode & 0o777 == 0o644 & ~_umask()
    before = _open_fds()
    # flock belongs to the open file: a second open is refused even here.
    assert try_lock(path) is None
    assert _open_fds() == before
    os.close(held)
    again = try_lock(path)
    assert again is not None
    os.close(again)


def test_try_lock_without_create_leaves_a_missing_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    assert try_lock(path, create=False) is None
    assert try_lock(tmp_path / "gone" / "lock", create=False) is None
    assert not path.exists()
    held = try_lock(path)
    assert held is not None
    assert try_lock(path, create=False) is None  # held
    os.close(held)
    again = try_lock(path, create=False)
    assert again is not None
    os.close(again)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
