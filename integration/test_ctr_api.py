"""The real ``ctr`` (Debian's containerd 1.6) against a real ckfsd.

ckfsd's Content, Images, Namespaces and Version services are containerd's on
the wire: ``ctr --address <ckfsd socket path>`` (containerd 1.6's ctr takes
a path, not a ``unix://`` address) lists, reads and writes ckfs's
stores unchanged. The image is pulled from the real docker-registry by the
ckfs CLI (daemonless) before the daemon starts on the same root.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.conftest import Ckfs, need
from integration.daemon import Daemon, running_ckfsd
from integration.registry import EXAMPLE_REPO, Registry
from snapshotters import NAMES


@dataclass
class Served:
    """A ckfsd serving a root that holds one pulled image."""

    daemon: Daemon
    ckfs: Ckfs
    name: str

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            ["ctr", "--address", str(self.daemon.socket), "--connect-timeout", "30s", *args],
            capture_output=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} exited {proc.returncode}\n"
                f"{proc.stderr.decode(errors='replace')}\n--- ckfsd log:\n{self.daemon.log_text()}"
            )
        return proc

    def text(self, *args: str) -> str:
        proc = self.ctr(*args)
        assert not proc.stderr, proc.stderr  # ctr logs what it could not compute there
        return proc.stdout.decode()


@pytest.fixture
def served(tmp_path: Path, registry: Registry) -> Iterator[Served]:
    need("ctr")
    ckfs = Ckfs(tmp_path / "root")
    name = f"{registry.host}/{EXAMPLE_REPO}"
    ckfs.run("pull", "--quiet", "--plain-http", name)
    with running_ckfsd(ckfs.root) as daemon:
        yield Served(daemon, ckfs, name)


def test_images_ls(served: Served) -> None:
    listed = served.text("images", "ls")
    header, *rows = listed.splitlines()
    assert header.split() == ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"]
    (row,) = rows
    ref, media_type, digest = row.split()[:3]
    target = served.ckfs.run("images", "ls", "--json").stdout
    assert ref == served.name and digest in target and media_type in target
    # Size and platforms come from reading manifests and config through Content.
    assert "linux/" in row
    assert served.text("images", "ls", "-q").split() == [served.name]
    assert served.text("images", "ls", "-q", "name==nope").split() == []


def test_content_ls_and_get(served: Served) -> None:
    listed = served.text("content", "ls", "-q").split()
    local = served.ckfs.run("content", "ls", "-q").stdout.split()
    assert sorted(listed) == sorted(local) and len(listed) >= 3
    table = served.text("content", "ls").splitlines()
    assert table[0].split()[:3] == ["DIGEST", "SIZE", "AGE"] and len(table) == len(listed) + 1
    for digest in listed:
        data = served.ctr("content", "get", digest).stdout
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


def test_content_ingest_through_write(served: Served) -> None:
    data = b"written by ctr through ckfsd's Content.Write\n" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    proc = subprocess.run(
        [
            "ctr",
            "--address",
            str(served.daemon.socket),
            "content",
            "ingest",
            "--expected-size",
            str(len(data)),
            "--expected-digest",
            digest,
            "ctr-ingest",
        ],
        input=data,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert digest in served.text("content", "ls", "-q").split()
    assert served.ctr("content", "get", digest).stdout == data
    served.ckfs.run("content", "verify")


def test_namespaces_version_plugins(served: Served) -> None:
    assert served.text("namespaces", "ls", "-q").split() == ["default"]
    plugins = served.text("plugins", "ls", "type==io.containerd.snapshotter.v1")
    assert "overlayfs" in plugins
    # ctr warns on stderr that ckfsd's version is not its own: not checked.
    version = served.ctr("version").stdout.decode()
    server = version.split("Server:", 1)[1]
    assert "0.1.0" in server
    (uuid_line,) = [line for line in server.splitlines() if "UUID:" in line]
    assert len(uuid_line.split()[-1]) == 36
    assert served.ctr("version").stdout.decode().split("Server:")[1] == server  # kept


def test_other_namespace_refused(served: Served) -> None:
    proc = served.ctr("--namespace", "k8s.io", "images", "ls", check=False)
    assert proc.returncode != 0
    assert b"default" in proc.stderr and b"failed precondition" in proc.stderr.lower()


@pytest.mark.parametrize("snapshotter", NAMES)
def test_snapshots_ls_and_tree(served: Served, snapshotter: str) -> None:
    """``ctr snapshots --snapshotter X ls`` reads ckfs's own snapshots through Snapshots."""
    served.ckfs.run("rootfs", "--snapshotter", snapshotter, "--key", "ctr-api", served.name)
    listed = served.text("snapshots", "--snapshotter", snapshotter, "ls")
    header, *rows = listed.splitlines()
    assert header.split() == ["KEY", "PARENT", "KIND"]
    kinds = {row.split()[0]: row.split()[-1] for row in rows}
    assert kinds.pop("ctr-api") == "Active"
    assert kinds and set(kinds.values()) == {"Committed"}  # the image's layers, by chain ID
    assert all(key.startswith("sha256:") for key in kinds)
    tree = served.text("snapshots", "--snapshotter", snapshotter, "tree")
    assert "ctr-api" in tree
    info = served.text("snapshots", "--snapshotter", snapshotter, "info", "ctr-api")
    assert '"Kind": "Active"' in info and '"Parent": "sha256:' in info
