"""Containers run by runc from bundles `ckfs bundle` makes.

Two images: the busybox example (fast) and a Debian bookworm minbase system
built by debootstrap from the mirror this machine's apt uses, turned into an
OCI image by umoci. Each is imported with ``ckfs import``, made a bundle with
``ckfs bundle`` and run with ``runc run``; the container prints its
``/etc/os-release``.

runc keeps its state in a directory of the test's own (``runc --root``), so
the test neither sees nor touches other containers on the machine. Teardown
force-deletes the container if it is still there, then ``ckfs umount``s the
bundle's rootfs, then `mount_guard` detaches anything left.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import snapshotters
from ckfs.mount import is_mountpoint
from integration.conftest import EXAMPLE_NAME, Ckfs, need
from integration.mounts import MountGuard
from integration.test_archive_umoci import umoci

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runc, mounts")

DEBIAN_NAME = "example.local/ckfs/debian:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_PRETTY = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"'
EXAMPLE_PRETTY = 'PRETTY_NAME="ckfs example (busybox)"'

#: Seconds debootstrap may take (about 45 here, from a nearby mirror).
DEBOOTSTRAP_TIMEOUT = 900
#: Seconds one container may run; it only cats a file.
RUN_TIMEOUT = 120

APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
APT_SOURCES_LIST = Path("/etc/apt/sources.list")


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    """The stanzas of a deb822 ``.sources`` file, field names lowercased."""
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        last = None
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and last is not None:
                fields[last] += " " + line.strip()  # a continuation line
            elif ":" in line:
                key, value = line.split(":", 1)
                last = key.strip().lower()
                fields[last] = value.strip()
        if fields:
            yield fields


def debian_mirror(suite: str = DEBIAN_SUITE) -> str:
    """The mirror this machine's apt fetches *suite* from.

    Read at run time (``/etc/apt/sources.list.d/*.sources``, then
    ``/etc/apt/sources.list``) so no host name is written into the tests.
    """
    for path in sorted(APT_SOURCES_DIR.glob("*.sources")):
        for fields in _deb822_stanzas(path.read_text()):
            if (
                "deb" in fields.get("types", "").split()
                and suite in fields.get("suites", "").split()
            ):
                uris = fields.get("uris", "").split()
                if uris:
                    return uris[0]
    if APT_SOURCES_LIST.exists():
        for line in APT_SOURCES_LIST.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) > 1 and words[1].startswith("["):
                # Options: "deb [arch=amd64 signed-by=…] URI suite …"
                end = next(i for i, w in enumerate(words) if w.endswith("]"))
                words = [words[0], *words[end + 1 :]]
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1]
    pytest.fail(f"no apt source for {suite} in {APT_SOURCES_DIR}/*.sources or {APT_SOURCES_LIST}")


def image_from_rootfs(rootfs: Path, layout: Path, cmd: list[str]) -> Path:
    """An OCI layout (tag ``latest``) whose one layer is *rootfs* and whose cmd is *cmd*."""
    image = f"{layout}:latest"
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", image)
    umoci("insert", "--image", image, str(rootfs), "/")
    umoci("config", "--image", image, *[a for c in cmd for a in ("--config.cmd", c)])
    umoci("gc", "--layout", str(layout))
    return layout


@pytest.fixture(scope="session")
def debian_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Debian bookworm minbase image as an OCI layout; built once per session."""
    need("debootstrap", "umoci")
    work = tmp_path_factory.mktemp("debian")
    rootfs, log = work / "rootfs", work / "debootstrap.log"
    guard = MountGuard(work)  # debootstrap mounts /proc and /sys in the target
    try:
        with open(log, "wb") as out:
            proc = subprocess.run(
                ["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(rootfs), debian_mirror()],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=DEBOOTSTRAP_TIMEOUT,
            )
        if proc.returncode != 0:
            pytest.fail(f"debootstrap exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    finally:
        guard.release()
    assert guard.leftovers() == []
    # What `apt-get clean` removes in image builds: downloaded packages.
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    layout = image_from_rootfs(rootfs, work / "layout", ["sh", "-c", "cat /etc/os-release"])
    shutil.rmtree(rootfs)  # 200 MB the session does not need again
    return layout


@dataclass
class Runc:
    """runc with private state, and the bundles and containers to clean up."""

    ckfs: Ckfs
    state: Path
    containers: list[str] = field(default_factory=list)
    bundles: list[Path] = field(default_factory=list)

    def bundle(
        self, ref: str, directory: Path, *, options: Sequence[str] = (), command: Sequence[str] = ()
    ) -> Path:
        """``ckfs bundle [OPTIONS] REF DIRECTORY [COMMAND]``, to be undone at teardown."""
        self.bundles.append(directory)
        self.ckfs.run("bundle", *options, ref, str(directory), *command)
        assert is_mountpoint(directory / "rootfs")
        assert (directory / "config.json").is_file()
        return directory

    def run(self, bundle: Path) -> subprocess.CompletedProcess[str]:
        cid = f"ckfs-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.containers.append(cid)
        return subprocess.run(
            ["runc", "--root", str(self.state), "run", "-b", str(bundle), cid],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )

    def exists(self, cid: str) -> bool:
        state = subprocess.run(
            ["runc", "--root", str(self.state), "state", cid], capture_output=True, text=True
        )
        return state.returncode == 0

    def cleanup(self) -> None:
        for cid in self.containers:
            if self.exists(cid):
                subprocess.run(
                    ["runc", "--root", str(self.state), "delete", "-f", cid],
                    capture_output=True,
                    timeout=60,
                )
        for bundle in self.bundles:
            if is_mountpoint(bundle / "rootfs"):
                self.ckfs.run("umount", str(bundle / "rootfs"), check=False)


@pytest.fixture
def runc(ckfs: Ckfs, mount_guard: MountGuard, tmp_path: Path) -> Iterator[Runc]:
    need("runc")
    r = Runc(ckfs, tmp_path / "runc-state")
    try:
        yield r
    finally:
        r.cleanup()  # before mount_guard's teardown, which catches what this misses


def run_image(
    runc: Runc, layout: Path, name: str, tmp_path: Path, options: Sequence[str] = ()
) -> str:
    """Import *layout* as *name*, bundle it, run it; the container's stdout."""
    runc.ckfs.run("import", "--name", name, str(layout))
    bundle = runc.bundle(name, tmp_path / "bundle", options=options)
    proc = runc.run(bundle)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert [c for c in runc.containers if runc.exists(c)] == []  # runc run deletes on exit
    runc.ckfs.run("umount", str(bundle / "rootfs"))
    assert not is_mountpoint(bundle / "rootfs")
    return proc.stdout


@pytest.mark.parametrize("snapshotter", snapshotters.NAMES)
def test_busybox_example_runs(
    runc: Runc, example_layout: Path, tmp_path: Path, snapshotter: str
) -> None:
    out = run_image(runc, example_layout, EXAMPLE_NAME, tmp_path, ["--snapshotter", snapshotter])
    assert EXAMPLE_PRETTY in out.splitlines()


def test_debian_bookworm_runs(runc: Runc, debian_layout: Path, tmp_path: Path) -> None:
    out = run_image(runc, debian_layout, DEBIAN_NAME, tmp_path)
    assert DEBIAN_PRETTY in out.splitlines()
