"""Layers written by umoci, applied by ckfs, compared with umoci's own unpack.

umoci builds a multi-layer image (files, a setuid binary, capabilities,
xattrs, hardlinks, symlinks, devices, whiteouts of a file and of a
directory, a directory replaced by a file, an opaque directory). ckfs
applies the layers in ``delete`` form into one directory and, if overlayfs
can be mounted here, in ``overlay`` form into per-layer upper directories
stacked by the kernel; both trees must equal ``umoci unpack``'s rootfs in
path, type, mode, owner, size, content, symlink target, device numbers,
xattrs and hardlink groups.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ckfs.archive import ApplyOptions, apply_layer
from ckfs.digest import Digest
from integration.conftest import need
from tests import treecmp

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: owners, devices, capabilities"),
]

CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")


def umoci(*args: str) -> None:
    subprocess.run(["umoci", *args], check=True, capture_output=True, text=True)


def build_image(work: Path) -> tuple[Path, str]:
    """An OCI layout with image "img" of seven umoci-written layers."""
    need("umoci")
    layout = work / "layout"
    image = f"{layout}:img"
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", image)

    s1 = work / "s1"
    for d in (
        "usr/bin",
        "usr/lib",
        "usr/share/doc",
        "etc/conf.d",
        "var/data/y",
        "opt/empty",
        "dev",
        "run",
    ):
        (s1 / d).mkdir(parents=True)
    (s1 / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chown(s1 / "usr/bin/tool", 1000, 1000)
    os.chmod(s1 / "usr/bin/tool", 0o4755)
    (s1 / "usr/bin/ping").write_bytes(b"\x7fELF ping")
    os.chmod(s1 / "usr/bin/ping", 0o755)
    os.setxattr(s1 / "usr/bin/ping", "security.capability", CAPABILITY)
    (s1 / "usr/lib/libx.so").write_bytes(os.urandom(200_000))
    os.link(s1 / "usr/lib/libx.so", s1 / "usr/lib/libx.so.1")
    os.link(s1 / "usr/lib/libx.so", s1 / "usr/lib/libx.so.1.2")
    os.symlink("libx.so", s1 / "usr/lib/libx.so.link")
    os.symlink("/usr/share/doc", s1 / "usr/doc")
    (s1 / "usr/share/doc/README").write_bytes(b"read me")
    (s1 / "etc/app.conf").write_bytes(b"conf")
    os.setxattr(s1 / "etc/app.conf", "user.origin", b"umoci")
    os.setxattr(s1 / "etc", "user.dir", b"etc")
    for name in ("a", "b"):
        (s1 / "etc/conf.d" / name).write_bytes(name.encode())
    (s1 / "var/data/x").write_bytes(b"x")
    (s1 / "var/data/y/z").write_bytes(b"z")
    os.chmod(s1 / "opt/empty", 0o700)
    os.chown(s1 / "opt/empty", 33, 33)
    os.mknod(s1 / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    os.mkfifo(s1 / "run/fifo", 0o600)
    umoci("insert", "--image", image, str(s1), "/")

    umoci("insert", "--image", image, "--whiteout", "/etc/conf.d/a")
    umoci("insert", "--image", image, "--whiteout", "/var/data")

    f = work / "share-file"
    f.write_bytes(b"share is a file now")
    umoci("insert", "--image", image, str(f), "/usr/share")

    s5 = work / "s5"
    s5.mkdir()
    (s5 / "c").write_bytes(b"c")
    umoci("insert", "--image", image, "--opaque", str(s5), "/etc/conf.d")

    s6 = work / "s6"
    (s6 / "usr/lib").mkdir(parents=True)
    (s6 / "usr/lib/libx.so.link").write_bytes(b"no longer a symlink")
    (s6 / "usr/lib/libx.so.1").write_bytes(b"replaced: leaves its hardlink group")
    (s6 / "opt").mkdir()
    (s6 / "opt/empty").write_bytes(b"dir became a file")
    umoci("insert", "--image", image, str(s6), "/")

    umoci("insert", "--image", image, "--whiteout", "/usr/lib/libx.so")
    return layout, image


def layers(layout: Path) -> list[tuple[Path, str, Digest]]:
    """(blob path, media type, diff ID) of each layer of "img", bottom first."""
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == "img"
    ]

    def blob(digest: str) -> Path:
        alg, hexpart = digest.split(":")
        return layout / "blobs" / alg / hexpart

    manifest = json.loads(blob(desc["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    diff_ids = config["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(manifest["layers"]) == 7
    return [
        (blob(layer["digest"]), layer["mediaType"], Digest.parse(d))
        for layer, d in zip(manifest["layers"], diff_ids, strict=True)
    ]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The layout, and umoci's unpacked rootfs of it."""
    work = tmp_path_factory.mktemp("umoci")
    layout, ref = build_image(work)
    bundle = work / "bundle"
    umoci("unpack", "--image", ref, str(bundle))
    return layout, bundle / "rootfs"


def test_delete_mode_matches_umoci_unpack(image: tuple[Path, Path], tmp_path: Path) -> None:
    layout, reference = image
    root = tmp_path / "rootfs"
    root.mkdir()
    for path, media_type, diff_id in layers(layout):
        with open(path, "rb") as f:
            result = apply_layer(
                root,
                f,
                media_type=media_type,
                diff_id=diff_id,
                options=ApplyOptions(whiteouts="delete"),
            )
        assert result.diff_id == diff_id
    ours, theirs = treecmp.snapshot(root), treecmp.snapshot(reference)
    treecmp.assert_same(theirs, ours)
    # The image really has what it is meant to exercise.
    assert theirs["usr/bin/tool"].mode == 0o4755 and theirs["usr/bin/tool"].uid == 1000
    assert ("security.capability", CAPABILITY) in theirs["usr/bin/ping"].xattrs
    assert theirs["usr/lib/libx.so.1.2"].link_group is None  # its partner was whited out
    assert theirs["usr/share"].kind == "file" and theirs["opt/empty"].kind == "file"
    assert sorted(p for p in theirs if p.startswith("etc/conf.d/")) == ["etc/conf.d/c"]
    assert "var/data" not in theirs and theirs["dev/null"].rdev == (1, 3)


def test_overlay_mode_mounts_like_umoci_unpack(image: tuple[Path, Path], tmp_path: Path) -> None:
    layout, reference = image
    uppers: list[Path] = []
    for i, (path, media_type, diff_id) in enumerate(layers(layout)):
        upper = tmp_path / f"layer{i}"
        upper.mkdir()
        opts = ApplyOptions(whiteouts="overlay", lowers=list(reversed(uppers)))
        with open(path, "rb") as f:
            apply_layer(upper, f, media_type=media_type, diff_id=diff_id, options=opts)
        uppers.append(upper)
    merged = tmp_path / "merged"
    merged.mkdir()
    lowerdir = ":".join(str(u) for u in reversed(uppers))
    mount = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowerdir}", str(merged)],
        capture_output=True,
        text=True,
    )
    assert mount.returncode == 0, f"mount -t overlay: {mount.stderr.strip()}"
    try:
        ours = treecmp.snapshot(merged)
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    # overlayfs reports a copied-up hardlink group only within one layer;
    # umoci's tree has the same groups, checked in delete mode above.
    treecmp.assert_same(treecmp.snapshot(reference), ours, ignore=("mtime_ns",))
