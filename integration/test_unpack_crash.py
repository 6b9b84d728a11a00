"""Unpacks that die, and unpacks that race: the state stays whole.

- A ``ckfs mount`` is killed with SIGKILL while it applies a big layer (one
  with many small files, so the apply takes seconds). The small layer below
  it stays committed; the big one is left as an ``extract-`` snapshot. The
  next ``ckfs mount`` of the image clears that leftover, applies the layer
  again and mounts the whole tree; after ``umount``, ``images rm`` and
  ``gc`` nothing remains: no snapshot, no blob, no directory under
  ``<root>/snapshots/<snapshotter>/``.
- Two ``ckfs mount`` of one image that is not unpacked yet, started
  together on two targets, both succeed, and every layer is applied exactly
  once: the per-chain-ID lock makes the second wait and find the layer
  committed.

The killed process is found by the PID ``Popen`` gave us, and its progress
is watched with ``ckfs snapshots ls --json`` from other processes, as a user
would.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

import snapshotters
from ckfs.mount import is_mountpoint
from integration.conftest import Ckfs
from integration.mounts import MountGuard
from tests import treecmp
from tests.layouts import Layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts")

NAME = "example.local/ckfs/many:latest"
#: Files in the big layer: enough for an apply of several seconds here
#: (about 2,300 files a second on this machine's disk).
BIG_LAYER_FILES = 10_000
#: Files in each layer of the image two mounts unpack at once.
RACE_LAYER_FILES = 2_000
#: Seconds to wait for the killed mount to reach the big layer.
REACH_TIMEOUT = 120.0


def many_files(prefix: str, n: int) -> dict[str, bytes]:
    """*n* small files of distinct content, 250 to a directory."""
    return {
        f"{prefix}/d{i // 250:03d}/f{i:05d}": b"%s %d\n" % (prefix.encode(), i) for i in range(n)
    }


def chain_ids(layout: Path) -> list[str]:
    """The image's chain IDs, computed here from the config's diff IDs."""
    layout_obj = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / layout_obj["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    chain: list[str] = []
    for diff_id in config["rootfs"]["diff_ids"]:
        if chain:
            chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
        else:
            chain.append(diff_id)
    return chain


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, bytes]]]:
    """A small base layer and a big layer of many files; the layers' files."""
    layers = [{"etc/base": b"base layer\n"}, many_files("data", BIG_LAYER_FILES)]
    layout = Layout(tmp_path_factory.mktemp("big") / "layout")
    layout.image(layers)
    return layout.root, layers


@pytest.fixture(scope="module")
def race_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, bytes]]]:
    """Three layers of a few thousand files each; the layers' files."""
    layers = [many_files(f"l{i}", RACE_LAYER_FILES) for i in range(3)]
    layout = Layout(tmp_path_factory.mktemp("race") / "layout")
    layout.image(layers)
    return layout.root, layers


def start(ckfs: Ckfs, *args: str) -> subprocess.Popen[str]:
    """Start the real ``ckfs`` on *ckfs*'s root, as `Ckfs.run` runs it, without waiting."""
    return subprocess.Popen(
        [sys.executable, "-m", "ckfs_cli.main", "--root", str(ckfs.root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (proc.args, proc.returncode, out, err)


def snapshots(ckfs: Ckfs, snapshotter: str) -> dict[str, dict[str, object]]:
    """``ckfs snapshots ls --json``, by name."""
    out = ckfs.run("snapshots", "--snapshotter", snapshotter, "ls", "--json").stdout
    return {i["name"]: i for i in json.loads(out)}


def extracts(names: Iterable[str]) -> list[str]:
    """The names of extract snapshots (layers being applied, or left by a crash)."""
    return [n for n in names if n.startswith("extract-")]


def assert_whole_tree(target: Path, layers: list[dict[str, bytes]]) -> None:
    """Exactly the layers' files with their content; nothing but directories besides."""
    expected = {path: data for files in layers for path, data in files.items()}
    tree = treecmp.snapshot(target)
    files = {p: n for p, n in tree.items() if n.kind != "dir"}
    assert sorted(files) == sorted(expected)
    wrong = [p for p, d in expected.items() if files[p].sha256 != hashlib.sha256(d).hexdigest()]
    assert wrong == []


def snapshot_dirs(ckfs: Ckfs) -> dict[str, list[str]]:
    """What is on disk under each ``<root>/snapshots/<snapshotter>/``."""
    base = ckfs.root / "snapshots"
    return {d.name: sorted(os.listdir(d)) for d in sorted(base.iterdir())}


def snapshots_ever_created(ckfs: Ckfs) -> int:
    """Snapshot rows ever inserted: ids are AUTOINCREMENT and never reused, so
    this counts every prepare and view, including removed ones."""
    db = sqlite3.connect(f"file:{ckfs.root / 'metadata.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'snapshots'").fetchone()
    finally:
        db.close()
    return int(row[0])


#: The snapshotters that apply layers: fuse attaches the image's gzip layers
#: (an index over each pulled blob), so it has no apply to be killed in.
APPLYING = tuple(n for n in snapshotters.NAMES if n != "fuse")


@pytest.mark.parametrize("snapshotter", APPLYING)
def test_mount_killed_while_applying_a_layer(
    snapshotter: str,
    ckfs: Ckfs,
    mount_guard: MountGuard,
    big_image: tuple[Path, list[dict[str, bytes]]],
    tmp_path: Path,
) -> None:
    layout, layers = big_image
    base, big = chain_ids(layout)
    ckfs.run("import", "--name", NAME, str(layout))
    target = tmp_path / "rootfs"
    mount = ["mount", "--snapshotter", snapshotter, NAME, str(target)]

    proc = start(ckfs, *mount)
    try:
        deadline = time.monotonic() + REACH_TIMEOUT
        while not any(n.endswith(f" {big}") for n in extracts(snapshots(ckfs, snapshotter))):
            assert proc.poll() is None, f"ckfs mount ended early: {proc.communicate()}"
            assert time.monotonic() < deadline, "ckfs mount never reached the big layer"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()  # only if an assertion above failed; our own child, by PID
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    # Killed mid-apply: the base is committed, the big layer is not, its
    # extract snapshot is left behind, and nothing is mounted.
    left = snapshots(ckfs, snapshotter)
    assert left[base]["kind"] == "committed"
    assert big not in left
    assert [n.endswith(f" {big}") for n in extracts(left)] == [True]
    assert not is_mountpoint(target)

    ckfs.run(*mount)
    assert is_mountpoint(target)
    assert_whole_tree(target, layers)
    now = snapshots(ckfs, snapshotter)
    assert sorted(now) == sorted([base, big, f"mount:{target}"])
    assert now[big]["parent"] == base
    # The leftover's directory went with it: one directory per snapshot.
    assert len(snapshot_dirs(ckfs)[snapshotter]) == 3

    ckfs.run("umount", str(target))
    ckfs.run("images", "rm", NAME)
    report = json.loads(ckfs.run("gc", "--json").stdout)
    assert sorted(report["snapshots"][snapshotter]) == sorted([base, big])
    assert len(report["blobs"]) == 4  # manifest, config, two layers
    for name in snapshotters.NAMES:
        assert snapshots(ckfs, name) == {}
    assert json.loads(ckfs.run("content", "ls", "--json").stdout) == []
    assert snapshot_dirs(ckfs) == {name: [] for name in snapshotters.NAMES}
    assert mount_guard.leftovers() == []


@pytest.mark.parametrize("snapshotter", snapshotters.NAMES)
def test_two_mounts_at_once_apply_each_layer_once(
    snapshotter: str,
    ckfs: Ckfs,
    mount_guard: MountGuard,
    race_image: tuple[Path, list[dict[str, bytes]]],
    tmp_path: Path,
) -> None:
    layout, layers = race_image
    chain = chain_ids(layout)
    ckfs.run("import", "--name", NAME, str(layout))
    targets = [tmp_path / "a", tmp_path / "b"]

    procs = [start(ckfs, "mount", "--snapshotter", snapshotter, NAME, str(t)) for t in targets]
    try:
        # Both run together (an unpack of three layers takes seconds); the
        # count of extract snapshots below shows no layer was applied twice.
        for p in procs:
            finish(p)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # our own children, by PID
                p.communicate()

    for t in targets:
        assert is_mountpoint(t)
        assert_whole_tree(t, layers)
    now = snapshots(ckfs, snapshotter)
    assert sorted(now) == sorted([*chain, *(f"mount:{t}" for t in targets)])
    assert extracts(now) == []
    # One extract snapshot per layer and one per mount: no layer was applied twice.
    assert snapshots_ever_created(ckfs) == len(chain) + len(targets)

    for t in targets:
        ckfs.run("umount", str(t))
        assert not is_mountpoint(t)
    # A lazy mount's FUSE server stays (the conftest sweep stops it).
    server = [str(ckfs.root / "fuse" / "mnt")] if snapshotter == "fuse" else []
    assert mount_guard.leftovers() == server
