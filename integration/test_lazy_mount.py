"""Lazy mounts of real images, end to end through the ``ckfs`` CLI (issue 10).

One image, built by umoci (`integration.test_archive_umoci.build_image`:
setuid, ``security.capability`` and ``user.*`` xattrs, hardlinks, symlinks,
a device, a fifo, whiteouts of a file and of a directory, an opaque
directory, directories turned into files; plus a surviving hardlink group,
a static setuid-root program and a few MiB of random bytes), is pushed to a
real docker-registry four ways: plain gzip (as skopeo copies it),
uncompressed tar, zstd, and eStargz converted by upstream's ``estargz``
library (`integration.estargz`). ``ckfs mount`` (fuse, the default) of each
must show exactly the tree ``umoci unpack`` makes of the gzip image, in
overlay mode and with ``--merged``; zstd layers fall back to the eager path
and say so. eStargz mtimes are compared at whole seconds: its TOC records
no finer ones.

Through a counting proxy (`integration.faultproxy`) a cold mount of the
eStargz image plus the read of one small file fetch under 5 % of the
image. Writes through the overlay land in its upper directory, deletions
of lower files are whiteouts there; runc runs a container from a lazy
rootfs, and the image's setuid-root program runs setuid for uid 1234.

A directory a layer implies without a tar entry of its own (``etc/`` of a
layer holding only ``etc/conf.d/.wh.a``) shows what the layers below give
it, as unpacked (`snapshotters.fuse.overrides`): the trees match exactly.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, from_bytes
from ckfs.mount import is_mountpoint, mountinfo
from integration.conftest import BOTH_FACES, Ckfs, need, skopeo
from integration.estargz import CHUNK_SIZE, estargz_layout
from integration.faultproxy import FaultProxy
from integration.mounts import MountGuard
from integration.registry import Registry, recompressed_layout
from integration.test_archive_umoci import build_image, umoci
from integration.test_rootfs_fidelity import add_link_layer, overlay_xattrs
from integration.test_runc import Runc, runc  # noqa: F401 (the fixture)
from tests import treecmp

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, owners, devices")

#: How each variant's layers reach the registry, and the index source each gets.
SOURCES = {"gzip": "gzip-index", "tar": "tar", "zstd": "eager", "estargz": "estargz"}

#: The static setuid-root program in the image: prints its real and effective uid.
SHOWID = "usr/local/bin/showid"
SHOWID_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid());
    return 0;
}
"""

#: Random bytes in the image (incompressible): enough that one small file's
#: fetch is measured against an image of some size, as real ones are.
BIG = 3 << 20

#: Seconds to wait for the FUSE server's counters (it writes them every 2 s).
STATS_WAIT = 10.0

#: Share of the eStargz image a cold mount plus one small read may fetch.
SMALL_READ_SHARE = 0.05


@dataclass(frozen=True)
class Images:
    """The image in four encodings in one registry, and what it must look like."""

    registry: Registry
    proxy: FaultProxy
    #: umoci's rootfs of the gzip image.
    reference: dict[str, treecmp.Node]
    #: Bytes of each variant's layers, summed.
    sizes: dict[str, int]
    layers: int

    def ref(self, variant: str, *, proxied: bool = False) -> str:
        host = self.proxy.host if proxied else self.registry.host
        return f"{host}/lazy/{variant}:latest"


def add_tool_layer(work: Path, image: str) -> None:
    """A layer with `SHOWID` (static, setuid root) and `BIG` random bytes."""
    need("gcc")
    src = work / "tool"
    (src / "usr/local/bin").mkdir(parents=True)
    (src / "opt/big").mkdir(parents=True)
    (work / "showid.c").write_text(SHOWID_C)
    subprocess.run(
        ["gcc", "-static", "-Os", "-o", str(src / SHOWID), str(work / "showid.c")], check=True
    )
    os.chmod(src / SHOWID, 0o4755)
    (src / "opt/big/random.bin").write_bytes(os.urandom(BIG))
    umoci("insert", "--image", image, str(src), "/")


def layer_blobs(layout: Path) -> list[Path]:
    """The layer blobs of *layout*'s first image, bottom first."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    return [blobs / layer["digest"].split(":")[1] for layer in manifest["layers"]]


@pytest.fixture(scope="module")
def images(
    registry_factory_session: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Images]:
    need("umoci", "skopeo")
    work = tmp_path_factory.mktemp("lazy")
    _, image = build_image(work)
    add_link_layer(work, image)
    add_tool_layer(work, image)
    gz = work / "gzip"
    skopeo("copy", "-q", f"oci:{image}", f"oci:{gz}:latest")
    umoci("unpack", "--image", f"{gz}:latest", str(work / "bundle"))
    reference = treecmp.snapshot(work / "bundle/rootfs")
    tars = [gzip.decompress(p.read_bytes()) for p in layer_blobs(gz)]
    layouts = {
        "gzip": gz,
        "tar": recompressed_layout(gz, work / "tar", "none"),
        "zstd": recompressed_layout(gz, work / "zstd", "zstd"),
        "estargz": estargz_layout(work / "estargz" / "layout", tars)[0],
    }
    registry = registry_factory_session()
    for variant, layout in layouts.items():
        if variant in ("tar", "zstd"):  # skopeo would recompress them
            registry.push_layout_raw(layout, f"lazy/{variant}:latest")
        else:
            registry.push(layout, f"lazy/{variant}:latest")
    sizes = {v: sum(p.stat().st_size for p in layer_blobs(lay)) for v, lay in layouts.items()}
    with FaultProxy(registry.host).running() as proxy:
        yield Images(registry, proxy, reference, sizes, len(tars))


@pytest.fixture(scope="module")
def reference(images: Images) -> dict[str, treecmp.Node]:
    """umoci's rootfs, checked to hold what the tests are about."""
    tree = images.reference
    assert tree["usr/bin/tool"].mode == 0o4755 and tree["usr/bin/tool"].uid == 1000
    assert tree[SHOWID].mode == 0o4755 and tree[SHOWID].uid == 0
    assert tree["usr/share"].kind == "file" and tree["opt/empty"].kind == "file"
    assert sorted(p for p in tree if p.startswith("etc/conf.d/")) == ["etc/conf.d/c"]
    assert "var/data" not in tree and tree["dev/null"].rdev == (1, 3)
    assert tree["srv/links/b"].link_group == "srv/links/a"
    assert any(tree[p].xattrs for p in tree)
    return tree


def whole_seconds(tree: dict[str, treecmp.Node]) -> dict[str, treecmp.Node]:
    return {p: replace(n, mtime_ns=n.mtime_ns - n.mtime_ns % 10**9) for p, n in tree.items()}


def assert_lazy_tree(
    images: Images,
    reference: dict[str, treecmp.Node],
    mounted: dict[str, treecmp.Node],
    *,
    fresh_root: bool,
    seconds: bool = False,
) -> None:
    """*mounted* equals *reference*, every field.

    Args:
        fresh_root: the root is a fresh overlay upper directory: its mtime is the mount's.
        seconds: compare mtimes at whole seconds (eStargz).
    """
    assert overlay_xattrs(mounted) == []
    if seconds:
        reference, mounted = whole_seconds(reference), whole_seconds(mounted)

    treecmp.assert_same(reference, mounted, ignore=(), paths=lambda p: p != ".")
    ignore_root = ("mtime_ns",) if fresh_root else ()
    treecmp.assert_same(reference, mounted, ignore=ignore_root, paths=lambda p: p == ".")


def mounts_ls(ckfs: Ckfs) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(ckfs.run("mounts", "ls", "--json").stdout)
    return found


def sources(ckfs: Ckfs, target: Path) -> list[str]:
    """Each layer's index source under the mount at *target*, as ``ckfs mounts ls`` says."""
    (mount,) = [m for m in mounts_ls(ckfs) if m["target"] == str(target)]
    assert mount["state"] == "mounted", mount
    return [layer["source"] for layer in mount["layers"]]


def umount(ckfs: Ckfs, target: Path, guard: MountGuard) -> None:
    ckfs.run("umount", str(target))
    assert not is_mountpoint(target)
    # The FUSE server's own mount stays (served layers outlive mounts); the
    # autouse fixture stops the server.
    assert guard.leftovers() == [str(ckfs.root / "fuse/mnt")]


def walk(
    ckfs: Ckfs, guard: MountGuard, ref: str, tmp_path: Path, *flags: str
) -> tuple[str, list[str], dict[str, treecmp.Node]]:
    """``ckfs mount`` *ref*, then its stderr, its layers' sources and its tree; unmounted."""
    target = tmp_path / "rootfs"
    proc = ckfs.run("mount", *flags, ref, str(target))
    try:
        assert is_mountpoint(target)
        return proc.stderr, sources(ckfs, target), treecmp.snapshot(target)
    finally:
        umount(ckfs, target, guard)


@pytest.mark.parametrize("mode", ["overlay", "merged"])
@pytest.mark.parametrize("variant", ["gzip", "tar", "estargz"])
def test_lazy_tree_equals_umoci_unpack(
    variant: str,
    mode: str,
    ckfs: Ckfs,
    images: Images,
    reference: dict[str, treecmp.Node],
    mount_guard: MountGuard,
    tmp_path: Path,
) -> None:
    merged = ["--merged"] if mode == "merged" else []
    said, layers, mounted = walk(ckfs, mount_guard, images.ref(variant), tmp_path, *merged)
    assert "eagerly" not in said and layers == [SOURCES[variant]] * images.layers, said
    assert_lazy_tree(
        images, reference, mounted, fresh_root=mode == "overlay", seconds=variant == "estargz"
    )


@BOTH_FACES
def test_zstd_layers_fall_back_loudly(
    ckfs: Ckfs,
    images: Images,
    reference: dict[str, treecmp.Node],
    mount_guard: MountGuard,
    tmp_path: Path,
) -> None:
    """No index for zstd: each layer is unpacked eagerly, said on stderr and by ``mounts ls``."""
    said, layers, mounted = walk(ckfs, mount_guard, images.ref("zstd"), tmp_path)
    eager = [line for line in said.splitlines() if "unpacked eagerly" in line]
    assert len(eager) == images.layers and all("zstd" in line for line in eager), said
    assert layers == ["eager"] * images.layers
    assert_lazy_tree(images, reference, mounted, fresh_root=True)

    # A merged view is one FUSE tree: it cannot hold unpacked layers.
    target = tmp_path / "rootfs"
    refused = ckfs.fails("mount", "--merged", images.ref("zstd"), str(target))
    assert "merged view" in refused, refused
    assert not is_mountpoint(target) and mounts_ls(ckfs) == []


def push_usrmerge(registry: Registry, tmp_path: Path) -> tuple[str, Digest]:
    """An image of a zstd base holding ``lib -> usr/lib`` and a gzip layer
    holding ``lib/x.so`` with no ``lib/`` entry; its ref and the gzip layer."""
    from integration.estargz import write_layout
    from tests.tarbuild import D, F, L, compress, tar

    layers = []
    for blob in (
        compress(tar(D("usr"), D("usr/lib"), L("lib", "usr/lib")), "zstd"),
        compress(tar(F("lib/x.so", b"x\n")), "gzip"),
    ):
        desc = Descriptor(blob.media_type, from_bytes(blob.data), len(blob.data))
        layers.append((desc, blob.data, str(blob.diff_id)))
    registry.push_layout_raw(write_layout(tmp_path / "layout", layers), "lazy/usrmerge:latest")
    return f"{registry.host}/lazy/usrmerge:latest", layers[1][0].digest


@BOTH_FACES
def test_a_lazy_layer_through_an_eager_lower_link_is_unpacked_too(
    ckfs: Ckfs, registry_factory_session: Any, mount_guard: MountGuard, tmp_path: Path
) -> None:
    """Stacked lazily, the gzip layer's implied ``lib/`` would hide the zstd
    base's link: ckfs reads the base's blob, sees the link, and unpacks the
    gzip layer too (`ckfs.lazy._through_links`), saying so."""
    ref, upper = push_usrmerge(registry_factory_session(), tmp_path)
    target = tmp_path / "rootfs"
    proc = ckfs.run("mount", ref, str(target))
    try:
        said = f"layer {upper} ({mt.OCI_LAYER_GZIP}) cannot be served lazily"
        assert said in proc.stderr, proc.stderr
        assert sources(ckfs, target) == ["eager", "eager"]
    finally:
        umount(ckfs, target, mount_guard)


def test_an_eager_layer_over_a_lower_link_lands_through_it(
    registry_factory_session: Any, mount_guard: MountGuard, tmp_path: Path
) -> None:
    """Unpacked into its own upper, the gzip layer's ``lib/x.so`` follows the
    base's ``lib -> usr/lib`` as the mount resolves it (native mode, umoci and
    containerd's mounted apply do the same), so the link still shows."""
    ckfs = Ckfs(tmp_path / "root")
    ref, _ = push_usrmerge(registry_factory_session(), tmp_path)
    target = tmp_path / "rootfs"
    ckfs.run("mount", ref, str(target))
    try:
        assert os.path.islink(target / "lib")
        assert (target / "usr/lib/x.so").read_bytes() == b"x\n"
    finally:
        umount(ckfs, target, mount_guard)


@BOTH_FACES
def test_estargz_small_read_fetches_little(
    ckfs: Ckfs,
    images: Images,
    reference: dict[str, treecmp.Node],
    mount_guard: MountGuard,
    tmp_path: Path,
) -> None:
    """A cold mount and one small read fetch < 5 % of the image; then everything reads right."""
    proxy = images.proxy
    proxy.clear()
    target = tmp_path / "rootfs"
    ckfs.run("mount", images.ref("estargz", proxied=True), str(target))
    at_mount = sent(proxy)
    assert (target / "etc/app.conf").read_bytes() == b"conf"
    fetched = sent(proxy)
    size = images.sizes["estargz"]
    assert fetched < SMALL_READ_SHARE * size, (at_mount, fetched, size)
    assert 0 < fetched - at_mount < CHUNK_SIZE  # the file's own (compressed) chunk
    assert sources(ckfs, target) == ["estargz"] * images.layers
    try:
        mounted = treecmp.snapshot(target)
        # After the mount every blob byte the proxy sent was fetched by the
        # FUSE server's reads, and its counters (``mounts ls``) say so.
        counted, served = served_fetched(ckfs, target, lambda: sent(proxy) - at_mount)
    finally:
        umount(ckfs, target, mount_guard)
    assert counted == served
    assert_lazy_tree(images, reference, mounted, fresh_root=True, seconds=True)


def sent(proxy: FaultProxy) -> int:
    """Body bytes the proxy sent, once settled (it counts a piece just after
    sending it, so a client may have it a moment before it is counted)."""
    last = -1
    for _ in range(100):  # 5 s: only a client still downloading keeps it moving
        now = sum(s.body_bytes for s in proxy.seen)
        if now == last:
            break
        last = now
        time.sleep(0.05)
    return last


def served_fetched(ckfs: Ckfs, target: Path, proxy_sent: Callable[[], int]) -> tuple[int, int]:
    """What the FUSE server says it fetched for the mount at *target*, and *proxy_sent*,
    once they agree or `STATS_WAIT` seconds passed (the server writes its
    counters every `snapshotters.fuse.server.STATS_INTERVAL` seconds)."""
    deadline = time.monotonic() + STATS_WAIT
    while True:
        (mount,) = [m for m in mounts_ls(ckfs) if m["target"] == str(target)]
        fetched = int(sum(layer.get("fetched", 0) for layer in mount["layers"]))
        expect = proxy_sent()
        if fetched == expect or time.monotonic() > deadline:
            return fetched, expect
        time.sleep(0.2)


def _upper(target: Path) -> Path:
    (info,) = [m for m in mountinfo() if m.mountpoint == str(target)]
    (upper,) = [o for o in info.super_options.split(",") if o.startswith("upperdir=")]
    return Path(upper.removeprefix("upperdir="))


def _is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_overlay_writes_land_in_upper_and_deletions_hold(
    ckfs: Ckfs, images: Images, mount_guard: MountGuard, tmp_path: Path
) -> None:
    target = tmp_path / "rootfs"
    ref = images.ref("estargz")
    ckfs.run("mount", ref, str(target))
    upper = _upper(target)
    (target / "new.txt").write_bytes(b"new")
    (target / "etc/app.conf").write_bytes(b"changed")
    (target / "usr/bin/ping").unlink()
    for p in sorted((target / "usr/lib").iterdir()):
        p.unlink()
    (target / "usr/lib").rmdir()

    assert (upper / "new.txt").read_bytes() == b"new"
    assert (upper / "etc/app.conf").read_bytes() == b"changed"
    assert _is_whiteout(upper / "usr/bin/ping") and _is_whiteout(upper / "usr/lib")
    assert not (target / "usr/bin/ping").exists() and not (target / "usr/lib").exists()
    assert sorted(os.listdir(target / "usr/bin")) == ["tool"]
    served = [d for d in (ckfs.root / "fuse/mnt").iterdir() if (d / "usr/bin/ping").exists()]
    assert len(served) == 1  # the first layer's, still there
    umount(ckfs, target, mount_guard)

    # The served layers were not written through: a new mount is pristine.
    ckfs.run("mount", ref, str(target))
    assert (target / "etc/app.conf").read_bytes() == b"conf"
    assert (target / "usr/bin/ping").is_file() and (target / "usr/lib/libx.so.1.2").is_file()
    assert not (target / "new.txt").exists()
    umount(ckfs, target, mount_guard)


def test_runc_runs_setuid_from_lazy_rootfs(
    runc: Runc,  # noqa: F811 (the fixture imported above)
    images: Images,
    reference: dict[str, treecmp.Node],
    tmp_path: Path,
) -> None:
    """runc runs `SHOWID` from a lazy eStargz rootfs as uid 1234: it runs setuid root."""
    bundle = runc.bundle(
        images.ref("estargz"), tmp_path / "bundle", options=["-s", "fuse"], command=["/" + SHOWID]
    )
    config = json.loads((bundle / "config.json").read_text())
    # ckfs bundle leaves no_new_privs off, as containerd and Docker do.
    assert config["process"]["noNewPrivileges"] is False
    config["process"].update(user={"uid": 1234, "gid": 1234})
    (bundle / "config.json").write_text(json.dumps(config))
    proc = runc.run(bundle)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.split() == ["uid=1234", "euid=0"]
    runc.ckfs.run("umount", str(bundle / "rootfs"))
    assert not is_mountpoint(bundle / "rootfs")
