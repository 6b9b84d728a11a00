"""``ckfs explore``'s command: the shell it starts, its refusal without a terminal,
and ``ckfs --help`` staying free of textual."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from ckfs_cli.explore_cmds import _shell_runner, explore_cmd, forwarded
from ckfs_cli.main import cli
from ckfs_cli.shell_cmds import shell_cmd

GLOBAL = ("--root", "/r", "--no-daemon")
EXPLORE = (
    *("--plain-http", "--hosts-dir", "/h1", "--hosts-dir", "/h2", "--timeout", "5m"),
    "reg.test/img:1",
)


def contexts() -> tuple[click.Context, click.Context]:
    """The group's and explore's contexts for ``ckfs GLOBAL explore EXPLORE`` (nothing runs)."""
    top = cli.make_context("ckfs", [*GLOBAL, "explore"])
    return top, explore_cmd.make_context("explore", list(EXPLORE), parent=top)


def test_the_shell_gets_the_explorers_root_daemon_and_registry_options() -> None:
    top, ctx = contexts()
    assert forwarded(top) == ["--root", "/r", "--no-daemon"]
    assert forwarded(ctx) == [
        *("--plain-http", "--hosts-dir", "/h1", "--hosts-dir", "/h2", "--timeout", "300.0"),
    ]
    # ckfs shell reads them back as the same values.
    shell = shell_cmd.make_context("shell", [*forwarded(ctx), "reg.test/img:1"], parent=top)
    for name in ("plain_http", "hosts_dirs", "timeout", "platform", "offline"):
        assert shell.params[name] == ctx.params[name], name


def test_the_shell_key_runs_ckfs_shell_upto_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    _, ctx = contexts()
    ran: list[list[str]] = []

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(subprocess, "run", run)
    assert _shell_runner(ctx, "reg.test/img:1")(3) == 0
    assert ran == [
        [
            *(sys.executable, "-m", "ckfs_cli.main", "--root", "/r", "--no-daemon", "shell"),
            *("--plain-http", "--hosts-dir", "/h1", "--hosts-dir", "/h2", "--timeout", "300.0"),
            *("reg.test/img:1", "--upto", "3"),
        ]
    ]


def ckfs(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
        **kw,
    )


def test_explore_needs_a_terminal(tmp_path: Path) -> None:
    proc = ckfs("-m", "ckfs_cli.main", "--root", str(tmp_path), "explore", "any/image")
    assert proc.returncode == 1
    assert proc.stderr == "ckfs: ckfs explore needs a terminal (stdin and stdout)\n"


def test_help_does_not_load_textual() -> None:
    proc = ckfs("-X", "importtime", "-m", "ckfs_cli.main", "--help")
    assert proc.returncode == 0 and "explore" in proc.stdout
    assert "textual" not in proc.stderr
