"""Where a root's own ckfsd listens, and a background start that fails says why.

The successful start, its reuse, ``--no-daemon`` and a daemon on another
socket run end to end in ``integration/test_ckfsd_lazy.py`` and
``integration/test_cli_daemon.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ckfs import client, errors
from ckfs.address import default_address, default_socket, system_root


def test_a_named_root_has_its_socket_inside() -> None:
    assert client.root_address(Path("/srv/ckfs")) == "unix:///srv/ckfs/ckfsd.sock"


def test_the_default_root_named_keeps_the_default_socket() -> None:
    assert client.root_address(system_root()) == default_address()


def test_a_root_too_long_for_a_socket_path_gets_a_hashed_name() -> None:
    root = Path("/srv/" + "x" * 120)
    address = client.root_address(root)
    path = Path(address.removeprefix("unix://"))
    assert path.parent == default_socket().parent / "roots"
    assert len(str(path)) < 100
    assert client.root_address(root) == address  # the same for every command
    assert client.root_address(Path("/srv/" + "y" * 120)) != address


def test_discover_finds_nothing_for_a_named_root_without_its_socket(tmp_path: Path) -> None:
    assert client.discover(None, root_given=True, root=tmp_path) is None
    (tmp_path / "ckfsd.sock").write_text("")  # not a socket: refused at once
    assert client.discover(None, root_given=True, root=tmp_path) is None


def test_a_daemon_that_cannot_start_is_reported_with_its_log_line(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ckfsd.sock").write_text("in the way")  # ckfsd refuses to replace it
    with pytest.raises(errors.Unavailable) as failed:
        client.start_daemon(root)
    assert "did not start" in str(failed.value)
    assert "is not a socket" in str(failed.value)
    assert str(root / "ckfsd.log") in str(failed.value)
