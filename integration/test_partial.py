"""Partial mounts and ``ckfs shell`` on a real registry, with real runc (issue 11).

One image built by umoci on the README's busybox example (three layers),
five more layers about ``/data``: ``file`` written in layers 4, 6 and 8
("version N"), ``gone`` added in 4 and whited out in 5, ``dir`` filled in 4
and made opaque in 7. Pushed to a real docker-registry, it is mounted with
the fuse snapshotter (layers attached lazily from the registry) and with
overlayfs (pulled and unpacked).

- ``mount --upto N`` shows the stack 1..N; ``mount --layer N`` that layer
  alone, read-only, its whiteout a 0/0 character device and its opaque
  directory carrying ``trusted.overlay.opaque=y``.
- ``ckfs shell --upto N -- cat /data/file`` prints "version N"; the
  container's exit status comes back; what it writes is gone afterwards.
- An interrupted shell ends, and every command leaves nothing behind: no
  mount but the FUSE server's own (the autouse fixture stops the server),
  no snapshot but the image's committed layers, no runc state, no bundle.
"""

from __future__ import annotations

import gzip
import json
import os
import pty
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import Ckfs, need
from integration.estargz import estargz_layout
from integration.faultproxy import FaultProxy
from integration.inspect_images import VARIANTS, InspectImages
from integration.mounts import MountGuard
from integration.registry import Registry
from integration.test_archive_umoci import umoci
from integration.test_lazy_faults import kill_server
from integration.test_lazy_mount import layer_blobs, sent, sources
from snapshotters.fuse.process import stop_server
from tests.tarbuild import F, tar

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, runc")


#: Layers of the image: the example's three and five about /data.
LAYERS = 8

#: The layers that write /data/file, and what it says there.
FILE_VERSIONS = {4: "version 4", 6: "version 6", 8: "version 8"}

#: The layer whiting out /data/gone (added in 4), and the one making /data/dir opaque.
WHITEOUT_LAYER, OPAQUE_LAYER = 5, 7

#: Random bytes on top of the eStargz variant: what a lazy shell must not fetch.
BIG = 4 << 20

#: Seconds an interrupted ``ckfs shell`` may take to end: the container
#: ignores SIGINT (PID 1 without a handler), so it waits out STOP_GRACE (3 s)
#: and kills it, then cleans up.
INTERRUPT_END = 60.0

SNAPSHOTTERS = pytest.mark.parametrize("snapshotter", ["fuse", "overlayfs"])


def build_layers(example_layout: Path, work: Path) -> Path:
    """The example image plus the five /data layers (module docstring), as a layout."""
    need("umoci")
    layout = work / "layout"
    shutil.copytree(example_layout, layout)
    image = f"{layout}:latest"

    def tree(name: str, files: dict[str, str]) -> Path:
        root = work / name
        for path, text in files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)
        return root

    s4 = tree("s4", {"data/file": "version 4\n", "data/gone": "gone\n", "data/dir/x": "x\n"})
    umoci("insert", "--image", image, str(s4), "/")
    umoci("insert", "--image", image, "--whiteout", "/data/gone")
    umoci("insert", "--image", image, str(tree("s6", {"data/file": "version 6\n"})), "/")
    umoci("insert", "--image", image, "--opaque", str(tree("s7", {"y": "y\n"})), "/data/dir")
    umoci("insert", "--image", image, str(tree("s8", {"data/file": "version 8\n"})), "/")
    return layout


@pytest.fixture(scope="module")
def layout(example_layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_layers(example_layout, tmp_path_factory.mktemp("partial"))


@pytest.fixture(scope="module")
def image(registry_factory_session: Callable[..., Registry], layout: Path) -> str:
    """The layered image's reference in a registry of this module."""
    registry = registry_factory_session()
    registry.push(layout, "partial/data:latest")
    return f"{registry.host}/partial/data:latest"


@pytest.fixture(scope="module")
def estargz(
    registry_factory_session: Callable[..., Registry],
    layout: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, FaultProxy]]:
    """The layered image in eStargz with `BIG` random bytes on top, behind a
    counting proxy: its reference through the proxy, and the proxy."""
    tars = [gzip.decompress(blob.read_bytes()) for blob in layer_blobs(layout)]
    tars.append(tar(F("opt/big.bin", random.Random(3).randbytes(BIG))))
    converted = estargz_layout(tmp_path_factory.mktemp("esgz") / "layout", tars)[0]
    registry = registry_factory_session()
    registry.push_layout_raw(converted, "partial/esgz:latest")
    with FaultProxy(registry.host).running() as proxy:
        yield f"{proxy.host}/partial/esgz:latest", proxy


def flags(snapshotter: str) -> list[str]:
    return ["--plain-http", "--snapshotter", snapshotter]


def assert_clean(ckfs: Ckfs, guard: MountGuard, snapshotter: str) -> None:
    """Nothing of a mount or shell is left: mounts, snapshots, runc state, bundles."""
    assert guard.leftovers() in ([], [str(ckfs.root / "fuse/mnt")])
    found = json.loads(ckfs.run("snapshots", "-s", snapshotter, "ls", "--json").stdout)
    assert [s["name"] for s in found if s["kind"] != "committed"] == []
    shells = ckfs.root / "shells"
    assert not shells.exists() or list(shells.iterdir()) == []


def shell(ckfs: Ckfs, snapshotter: str, *args: str) -> subprocess.CompletedProcess[str]:
    return ckfs.run("shell", *flags(snapshotter), *args, check=False)


@SNAPSHOTTERS
def test_shell_upto_prints_that_layers_file(
    ckfs: Ckfs, image: str, mount_guard: MountGuard, snapshotter: str
) -> None:
    need("runc")
    for layer, text in FILE_VERSIONS.items():
        proc = shell(ckfs, snapshotter, "--upto", str(layer), image, "cat", "/data/file")
        assert (proc.returncode, proc.stdout) == (0, f"{text}\n"), proc.stderr
    proc = shell(ckfs, snapshotter, image, "--", "ls", "/data")
    assert (proc.returncode, proc.stdout.split()) == (0, ["dir", "file"]), proc.stderr
    assert_clean(ckfs, mount_guard, snapshotter)


@pytest.mark.parametrize("ckfs", ["local", "ckfsd"], indirect=True)
@SNAPSHOTTERS
def test_shell_passes_exit_status_and_discards_writes(
    ckfs: Ckfs, image: str, mount_guard: MountGuard, snapshotter: str
) -> None:
    need("runc")
    script = "echo changed > /data/file && rm /bin/cat && exit 7"
    proc = shell(ckfs, snapshotter, "--upto", "6", image, "--", "sh", "-c", script)
    assert proc.returncode == 7, proc.stderr
    proc = shell(ckfs, snapshotter, "--upto", "6", image, "cat", "/data/file")
    assert (proc.returncode, proc.stdout) == (0, "version 6\n"), proc.stderr
    proc = shell(ckfs, snapshotter, image, "/no/such/program")
    assert proc.returncode != 0 and "no/such/program" in proc.stderr
    assert_clean(ckfs, mount_guard, snapshotter)


@SNAPSHOTTERS
def test_shell_at_one_layer(
    ckfs: Ckfs, image: str, mount_guard: MountGuard, snapshotter: str
) -> None:
    """``--layer 1`` (busybox alone) runs; the layer's whiteouts hide themselves there."""
    need("runc")
    proc = shell(ckfs, snapshotter, "--layer", "1", image, "ls", "/")
    assert proc.returncode == 0 and "bin" in proc.stdout.split(), proc.stderr
    proc = shell(ckfs, snapshotter, "--layer", str(WHITEOUT_LAYER), image)
    n = WHITEOUT_LAYER  # that layer holds no shell: one ckfs line, not runc's log
    assert proc.returncode == 1 and proc.stderr == (
        f"ckfs: layer {n} of {image} alone has no '/bin/sh': try --upto {n} (layers 1..{n})\n"
    )
    assert_clean(ckfs, mount_guard, snapshotter)


def test_terminal_only_when_stdin_is_one(ckfs: Ckfs, image: str, mount_guard: MountGuard) -> None:
    """The container gets a terminal when ckfs shell's stdin is one, plain stdio otherwise."""
    need("runc")
    probe = ["--", "sh", "-c", "test -t 0 && echo tty || echo notty"]
    proc = shell(ckfs, "fuse", image, *probe)
    assert (proc.returncode, proc.stdout) == (0, "notty\n"), proc.stderr
    argv = [sys.executable, "-m", "ckfs_cli.main", "--root", str(ckfs.root), "shell"]
    leader, follower = pty.openpty()
    try:
        run = subprocess.run(
            [*argv, *flags("fuse"), image, *probe],
            stdin=follower,
            capture_output=True,
            text=True,
            timeout=INTERRUPT_END,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert run.returncode == 0, run.stderr
    assert run.stdout.replace("\r", "") == "tty\n"
    assert_clean(ckfs, mount_guard, "fuse")


def test_interactive_shell_on_a_terminal(ckfs: Ckfs, image: str, mount_guard: MountGuard) -> None:
    """No COMMAND and a terminal: /bin/sh reads what is typed; its exit status comes back."""
    need("runc")
    argv = [sys.executable, "-m", "ckfs_cli.main", "--root", str(ckfs.root), "shell"]
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*argv, *flags("fuse"), "--upto", "6", image],
            stdin=follower,
            stdout=follower,
            stderr=follower,
        )
        os.close(follower)
        os.write(leader, b"cat /data/file; exit 5\n")
        seen, deadline = b"", time.monotonic() + INTERRUPT_END
        while True:  # until the last process holding the terminal is gone
            assert select.select([leader], [], [], deadline - time.monotonic())[0], seen
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=INTERRUPT_END) == 5, seen
    finally:
        os.close(leader)
    assert b"version 6" in seen
    assert_clean(ckfs, mount_guard, "fuse")


def start_sleeping_shell(ckfs: Ckfs, image: str, **stdio: Any) -> subprocess.Popen[bytes]:
    """``ckfs shell IMAGE sleep 600``, returned once its container runs."""
    argv = [sys.executable, "-m", "ckfs_cli.main", "--root", str(ckfs.root), "shell"]
    proc = subprocess.Popen(
        [*argv, *flags("fuse"), image, "sleep", "600"], stdin=subprocess.DEVNULL, **stdio
    )
    deadline = time.monotonic() + INTERRUPT_END
    try:
        # runc's state.json appears once the container exists.
        while not list((ckfs.root / "shells").glob("*/runc/*/state.json")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    time.sleep(0.5)  # runc has started sleep, not only the container
    return proc


def delete_containers(ckfs: Ckfs) -> None:
    """Delete any container a shell under *ckfs*'s root left (runc outlives a killed ckfs)."""
    for state in (ckfs.root / "shells").glob("*/runc/*/state.json"):
        runc_root, cid = state.parent.parent, state.parent.name
        subprocess.run(["runc", "--root", str(runc_root), "delete", "-f", cid], check=False)


def test_killed_shell_is_cleaned_up_by_the_next(
    ckfs: Ckfs, image: str, mount_guard: MountGuard
) -> None:
    """A ``ckfs shell`` killed outright leaves its container, mount and snapshot; the
    next ``ckfs shell`` on the root removes them."""
    need("runc")
    proc = start_sleeping_shell(ckfs, image, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.kill()
    proc.wait()
    try:
        (left,) = (ckfs.root / "shells").iterdir()
        assert (left / "rootfs").is_mount()
        done = shell(ckfs, "fuse", image, "true")
        assert done.returncode == 0, done.stderr
    finally:
        delete_containers(ckfs)  # none if the test passes
    assert_clean(ckfs, mount_guard, "fuse")


def test_shell_after_the_fuse_server_stopped(
    ckfs: Ckfs, image: str, mount_guard: MountGuard
) -> None:
    """An image attached before is served again when its FUSE server has stopped."""
    need("runc")
    proc = shell(ckfs, "fuse", "--upto", "4", image, "cat", "/data/file")
    assert (proc.returncode, proc.stdout) == (0, "version 4\n"), proc.stderr
    assert stop_server(ckfs.root)
    proc = shell(ckfs, "fuse", "--upto", "6", image, "cat", "/data/file")
    assert (proc.returncode, proc.stdout) == (0, "version 6\n"), proc.stderr
    assert_clean(ckfs, mount_guard, "fuse")


def test_lazy_shell_fetches_what_it_reads(
    ckfs: Ckfs, estargz: tuple[str, FaultProxy], mount_guard: MountGuard
) -> None:
    """A shell on a lazily attached eStargz image fetches the TOCs and what the
    container reads (busybox, /data/file), not the big file in the top layer."""
    need("runc")
    ref, proxy = estargz
    before = sent(proxy)
    proc = shell(ckfs, "fuse", ref, "cat", "/data/file")
    assert (proc.returncode, proc.stdout) == (0, "version 8\n"), proc.stderr
    assert sent(proxy) - before < BIG // 2
    assert_clean(ckfs, mount_guard, "fuse")


def test_interrupted_shell_leaves_nothing(
    ckfs: Ckfs, image: str, mount_guard: MountGuard, tmp_path: Path
) -> None:
    """SIGINT to ``ckfs shell`` ends a container that ignores it; all is cleaned up."""
    need("runc")
    proc = start_sleeping_shell(ckfs, image, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=INTERRUPT_END)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (128 + signal.SIGINT, 128 + signal.SIGKILL), err
    assert_clean(ckfs, mount_guard, "fuse")


@pytest.mark.parametrize("ckfs", ["local", "ckfsd"], indirect=True)
@SNAPSHOTTERS
def test_mount_layer_shows_whiteouts_and_opaque_dirs(
    ckfs: Ckfs, image: str, mount_guard: MountGuard, tmp_path: Path, snapshotter: str
) -> None:
    alone = tmp_path / "alone"
    ckfs.run("mount", *flags(snapshotter), "--layer", str(WHITEOUT_LAYER), image, str(alone))
    try:
        assert sorted(os.listdir(alone)) == ["data"]
        assert os.listdir(alone / "data") == ["gone"]
        st = os.lstat(alone / "data/gone")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
        with pytest.raises(OSError):
            (alone / "data/new").write_text("read-only")
    finally:
        ckfs.run("umount", str(alone))
    ckfs.run("mount", *flags(snapshotter), "--layer", str(OPAQUE_LAYER), image, str(alone))
    try:
        assert os.getxattr(alone / "data/dir", "trusted.overlay.opaque") == b"y"
        assert os.listdir(alone / "data/dir") == ["y"]
    finally:
        ckfs.run("umount", str(alone))
    assert_clean(ckfs, mount_guard, snapshotter)


@SNAPSHOTTERS
def test_mount_upto_trees(
    ckfs: Ckfs, image: str, mount_guard: MountGuard, tmp_path: Path, snapshotter: str
) -> None:
    expected: dict[int, dict[str, Any]] = {
        3: {},
        4: {"file": "version 4\n", "gone": "gone\n", "dir": ["x"]},
        5: {"file": "version 4\n", "dir": ["x"]},
        6: {"file": "version 6\n", "dir": ["x"]},
        7: {"file": "version 6\n", "dir": ["y"]},
        8: {"file": "version 8\n", "dir": ["y"]},
    }
    for layer, want in expected.items():
        target = tmp_path / f"upto{layer}"
        ckfs.run("mount", *flags(snapshotter), "--upto", str(layer), image, str(target))
        try:
            assert data_tree(target / "data") == want, layer
            assert (target / "etc/os-release").is_file()
            if snapshotter == "fuse":  # attached lazily, as many as stacked
                assert sources(ckfs, target) == ["gzip-index"] * layer
        finally:
            ckfs.run("umount", str(target))
    assert_clean(ckfs, mount_guard, snapshotter)


def test_layer_mount_recovered_alone(
    ckfs: Ckfs, image: str, mount_guard: MountGuard, tmp_path: Path
) -> None:
    """A ``--layer`` mount whose FUSE server died comes back as that layer alone."""
    alone = tmp_path / "alone"
    ckfs.run("mount", *flags("fuse"), "--layer", str(WHITEOUT_LAYER), image, str(alone))
    try:
        kill_server(ckfs.root)
        with pytest.raises(OSError):
            os.listdir(alone)
        assert f"remounted {alone}" in ckfs.run("mounts", "recover").stderr
        assert sorted(os.listdir(alone)) == ["data"]
        assert stat.S_ISCHR(os.lstat(alone / "data/gone").st_mode)
    finally:
        ckfs.run("umount", str(alone))
    assert_clean(ckfs, mount_guard, "fuse")


@pytest.mark.parametrize(
    ("variant", "snapshotter"), [*((v, "fuse") for v in VARIANTS), ("gzip", "overlayfs")]
)
def test_layers_of_the_inspect_image(
    ckfs: Ckfs,
    inspect_images: InspectImages,
    mount_guard: MountGuard,
    tmp_path: Path,
    variant: str,
    snapshotter: str,
) -> None:
    """The shared inspect image (integration/inspect_images.py) in every encoding:
    lazily attached (gzip, tar, eStargz), unpacked in the fuse snapshotter (zstd)
    or by overlayfs, each layer alone and each stack show what its layers hold."""
    ref, target = inspect_images.ref(variant), tmp_path / "m"

    def mount(*part: str) -> Path:
        ckfs.run("mount", *flags(snapshotter), *part, ref, str(target))
        return target

    try:
        alone = mount("--layer", "2")
        assert sorted(os.listdir(alone)) == ["etc", "gone", "opt"]
        assert os.lstat(alone / "gone").st_rdev == os.makedev(0, 0)
        assert stat.S_ISCHR(os.lstat(alone / "gone").st_mode)
        assert os.getxattr(alone / "opt/app", "trusted.overlay.opaque") == b"y"
        assert os.listdir(alone / "opt/app") == ["new"]
        assert (alone / "etc/motd").read_bytes() == b"motd v2\n"
        ckfs.run("umount", str(target))
        alone = mount("--layer", "3")
        assert (alone / "var/lib/data").read_bytes() == b"now a file\n"
        assert stat.S_IMODE(os.lstat(alone / "etc/hosts").st_mode) == 0o600
        ckfs.run("umount", str(target))
        stack = mount("--upto", "3")
        assert (stack / "etc/motd").read_bytes() == b"motd v3\n"
        assert (stack / "etc/os-release").is_file() and not (stack / "gone").exists()
        assert sorted(os.listdir(stack / "opt/app")) == ["new"]
        ckfs.run("umount", str(target))
        stack = mount("--upto", "4")
        assert not (stack / "etc/os-release").exists()
        assert (stack / "var/lib/data").is_file()
    finally:
        if target.is_mount():
            ckfs.run("umount", str(target))
    assert_clean(ckfs, mount_guard, snapshotter)


def test_partial_mount_unpacks_only_the_layers_it_stacks(
    ckfs: Ckfs, inspect_images: InspectImages, mount_guard: MountGuard, tmp_path: Path
) -> None:
    """zstd layers (nothing reads them lazily) are unpacked in the fuse snapshotter:
    ``--layer N`` and ``--upto N`` unpack layers 1..N, not the whole image; a whole
    mount afterwards unpacks the rest."""
    ref, target = inspect_images.ref("zstd"), tmp_path / "m"

    def committed() -> int:
        found = json.loads(ckfs.run("snapshots", "-s", "fuse", "ls", "--json").stdout)
        return sum(s["kind"] == "committed" for s in found)

    for part, layers in ((["--layer", "2"], 2), (["--upto", "3"], 3), ([], 4)):
        proc = ckfs.run("mount", *flags("fuse"), *part, ref, str(target))
        try:
            assert proc.stderr.count("unpacked eagerly") == layers, proc.stderr
            assert (target / "etc/motd").is_file()
        finally:
            ckfs.run("umount", str(target))
        assert committed() == layers, part
    assert_clean(ckfs, mount_guard, "fuse")


def data_tree(data: Path) -> dict[str, Any]:
    """/data of a mount: file contents, directory listings."""
    if not data.exists():
        return {}
    return {p.name: sorted(os.listdir(p)) if p.is_dir() else p.read_text() for p in data.iterdir()}


def test_partial_bad_input(ckfs: Ckfs, image: str, mount_guard: MountGuard, tmp_path: Path) -> None:
    """Out-of-range layers and native ``--layer``: one line, exit 1, nothing left."""
    target = str(tmp_path / "t")
    line = ckfs.fails("mount", *flags("fuse"), "--layer", str(LAYERS + 1), image, target)
    assert line == f"ckfs: layer {LAYERS + 1} out of range: {image} has {LAYERS} layers"
    line = ckfs.fails("mount", *flags("overlayfs"), "--upto", "0", image, target)
    assert "layer 0 out of range" in line
    line = ckfs.fails("mount", *flags("native"), "--layer", "2", image, target)
    assert "--layer needs the overlayfs or fuse snapshotter" in line
    line = ckfs.fails("shell", *flags("fuse"), "--upto", "9", image, "true")
    assert "layer 9 out of range" in line
    proc = ckfs.run("mount", "--layer", "1", "--upto", "2", image, target, check=False)
    assert proc.returncode == 2 and "exclude each other" in proc.stderr
    for snapshotter in ("fuse", "overlayfs", "native"):
        assert_clean(ckfs, mount_guard, snapshotter)
    assert not os.path.exists(target)
