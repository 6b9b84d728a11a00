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


def test_table_cells_are_not_rich_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal, names from an image are shown as they are, never read as markup."""
    import io

    from ckfs_cli.app import print_table

    out = io.StringIO()
    out.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setenv("COLUMNS", "200")
    print_table(["NAME", "CREATED BY"], [["[red]x", "[link=https:e.example]y"], ["a", "CMD [/]"]])
    text = out.getvalue()
    assert "[red]x" in text and "[link=https:e.example]y" in text and "CMD [/]" in text
    assert "\x1b]8;" not in text


@pytest.mark.parametrize(
    ("share", "text"),
    [(0.0, "0.00%"), (1e-7, "< 0.01%"), (0.5, "50.00%"), (1 - 1e-7, "> 99.99%"), (1.0, "100.00%")],
)
def test_space_percentages_never_round_to_what_they_are_not(share: float, text: str) -> None:
    from ckfs_cli.changes_cmds import _percent

    assert _percent(share) == text
