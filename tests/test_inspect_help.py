"""The layer-debugging commands: help texts, and how `ckfs cat` tells a binary file."""

from __future__ import annotations

import pytest

from ckfs_cli.main import main


def help_text(capsys: pytest.CaptureFixture[str], command: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_layer_option_of_ls_and_cat(capsys: pytest.CaptureFixture[str]) -> None:
    """cat prints one file: listing whiteouts is ls's business only."""
    assert "--layer N Layer N alone (1 = bottom), whiteouts shown as entries." in help_text(
        capsys, "ls"
    )
    cat = help_text(capsys, "cat")
    assert "--layer N Layer N alone (1 = bottom). --upto N" in cat
    assert "whiteouts shown" not in cat


def test_binary_sniff_cut_characters() -> None:
    """A character cut by the sniff's end is text; a file ending in a bad byte is not."""
    from ckfs_cli.inspect_cmds import _binary

    assert not _binary("é".encode()[:1])
    assert _binary("é".encode()[:1], whole=True)
    assert _binary(b"ab\xff", whole=True)
    assert not _binary("text é".encode(), whole=True)
    assert _binary(b"a\0b")
