"""The layer-debugging commands' help texts say what each option does for that command."""

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
