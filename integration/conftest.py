"""Fixtures for tests against real parts: umoci and skopeo build the images,
the real ckfs CLI runs as a subprocess, as a user would run it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_NAME = "example.local/ckfs/busybox:latest"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(REPO / "integration"):
            item.add_marker(pytest.mark.slow)


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        # The README's test command installs these; a missing one is a setup
        # bug, not a reason to skip quietly.
        pytest.fail(f"missing tools {missing}: run scripts/test.sh, which installs them")


@dataclass
class Ckfs:
    """Runs the real `ckfs` command against one state root.

    With an *address*, every command goes through the ckfsd there (which
    serves the same root), as ``--address`` asks.
    """

    root: Path
    address: str | None = None

    def run(
        self, *args: str, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        face = ["--address", self.address] if self.address else []
        proc = subprocess.run(
            [sys.executable, "-m", "ckfs_cli.main", "--root", str(self.root), *face, *args],
            capture_output=True,
            text=True,
            input=input.decode() if input else None,
            env={**os.environ, "COLUMNS": "200"},
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ckfs {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def fails(self, *args: str) -> str:
        """Run a command that must fail cleanly; return its one stderr line."""
        proc = self.run(*args, check=False)
        assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ckfs: "), proc.stderr
        assert "Traceback" not in proc.stderr
        return lines[0]


#: Both faces of the CLI: ``pytestmark = BOTH_FACES`` runs a module's tests
#: on the root directly and through a real ckfsd, expecting the same.
BOTH_FACES = pytest.mark.parametrize("ckfs", ["local", "ckfsd"], indirect=True)


@pytest.fixture(params=["local"])
def ckfs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ckfs]:
    """The CLI on a fresh root: ``local``, or through a ``ckfsd`` on that root (`BOTH_FACES`)."""
    root = tmp_path / "root"
    if request.param == "local":
        yield Ckfs(root)
        return
    from integration.daemon import running_ckfsd

    with running_ckfsd(root) as daemon:
        yield Ckfs(root, daemon.address)


@pytest.fixture(scope="session")
def example_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's example image, built by umoci from busybox-static."""
    need("umoci")
    out = tmp_path_factory.mktemp("example") / "layout"
    subprocess.run(
        ["bash", str(REPO / "scripts/example-image.sh"), str(out), "latest"],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture
def layout_copy(example_layout: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the example layout, free to spoil."""
    dst = tmp_path / "layout"
    shutil.copytree(example_layout, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield dst


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    need("skopeo")
    return subprocess.run(
        ["skopeo", "--insecure-policy", *args], check=True, capture_output=True, text=True
    )
