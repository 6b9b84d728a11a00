"""containerd pulls lazily through ckfsd: remote snapshots by chain ID.

``ckfs pull --lazy`` records an eStargz image (manifests, config, layer
indexes; no layer bytes) and, for each chain ID, the layer that completes
it (`ckfs.lazy.record_chains`). containerd, with ckfsd as its proxy
snapshotter under the lazy name (``ckfs-lazy`` → ckfs's ``fuse``), then
pulls the same image through CRI: containerd's unpacker prepares each layer
with only ``containerd.io/snapshot.ref=<chainID>`` (containerd 1.6's CRI
sends no layer-digest labels by default, and ``ctr`` 1.6's own pull sends
no label at all, see ``test_containerd_proxy``), ckfs attaches the recorded
layer and answers ALREADY_EXISTS, so containerd downloads no layer.
``ctr run`` of the image prints /etc/os-release from the lazy rootfs. All
registry traffic (ckfs's, the FUSE server's and containerd's) goes through
a counting proxy (`integration.faultproxy`): the image's blobs fetched are
a small fraction of it.

The image: the README's example (busybox, built by umoci) converted to
eStargz by upstream's library, plus a layer of 32 MiB that is never read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ckfs.api.services.snapshots.v1 import snapshots_pb2 as pb
from ckfs.api.services.snapshots.v1 import snapshots_pb2_grpc
from ckfs.labels import SNAPSHOT_REF
from integration.conftest import Ckfs
from integration.containerd import LAZY_PROXY, Containerd, cri_pull
from integration.daemon import (  # noqa: F401 (fixture ckfsd)
    Daemon,
    channel,
    ckfsd_fixture,
    start,
    stop,
)
from integration.estargz import estargz_layout
from integration.faultproxy import FaultProxy
from integration.mounts import MountGuard
from integration.registry import Registry
from tests.tarbuild import F, tar

pytestmark = pytest.mark.slow

#: What the example image's /etc/os-release says (scripts/example-image.sh).
OS_RELEASE = 'NAME="ckfs example"\nID=ckfs-example\nPRETTY_NAME="ckfs example (busybox)"\n'

#: Where the eStargz image is pushed.
REPO = "ckfs/lazy-busybox:latest"

#: Bytes of the layer nothing reads: the image is mostly what a container
#: running ``cat`` never touches, as real images are.
UNREAD = 32 << 20

#: The issue's bound on the share of the image a small read may fetch.
SHARE = 0.05


def layout_layer_tars(layout: Path) -> list[bytes]:
    """The uncompressed layer tars of the OCI layout's image, bottom first."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    return [
        gzip.decompress((blobs / layer["digest"].split(":")[1]).read_bytes())
        for layer in manifest["layers"]
    ]


@pytest.fixture(scope="module")
def lazy_image(
    registry: Registry, example_layout: Path, tmp_path_factory: pytest.TempPathFactory
) -> int:
    """The example image plus an unread layer, as eStargz, pushed; its layers' total size."""
    unread = hashlib.shake_256(b"ckfs unread").digest(UNREAD)
    tars = [*layout_layer_tars(example_layout), tar(F("opt/unread.bin", unread))]
    layout, converted = estargz_layout(tmp_path_factory.mktemp("lazy-busybox") / "layout", tars)
    registry.push(layout, REPO)
    return sum(len(c.blob) for c in converted)


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host).running() as p:
        yield p


@pytest.fixture
def containerd(
    ckfsd: Daemon, tmp_path: Path, proxy: FaultProxy, mount_guard: MountGuard
) -> Iterator[Containerd]:
    """containerd with CRI pulling into ``ckfs-lazy``, stopped by PID at teardown."""
    c = Containerd(tmp_path / "containerd", str(ckfsd.socket), cri=True, cri_snapshotter=LAZY_PROXY)
    c.certs_d.mkdir(parents=True)
    c.plain_http(proxy.host)
    try:
        yield c.start()
    finally:
        c.stop()


def fuse_snapshots(ckfsd: Daemon) -> dict[str, pb.Info]:
    """ckfs's own view of its fuse snapshotter, through ckfsd."""
    with channel(ckfsd) as ch:
        stub = snapshots_pb2_grpc.SnapshotsStub(ch)
        request = pb.ListSnapshotsRequest(snapshotter="fuse")
        return {i.name: i for r in stub.List(request, timeout=60) for i in r.info}


def test_containerd_pulls_and_runs_a_ckfs_indexed_image_lazily(
    lazy_image: int, ckfsd: Daemon, proxy: FaultProxy, containerd: Containerd
) -> None:
    ref = f"{proxy.host}/{REPO}"
    Ckfs(ckfsd.root, ckfsd.address).run("pull", "--lazy", ref)
    at_pull = proxy.body_bytes("/blobs/")
    assert fuse_snapshots(ckfsd) == {}  # indexed only: nothing attached yet

    cri_pull(containerd.address, ref)
    # containerd's unpacker found every layer attached by its chain ID alone.
    snaps = fuse_snapshots(ckfsd)
    chain = {n: i for n, i in snaps.items() if i.kind == pb.COMMITTED}
    assert len(chain) == 4, snaps.keys()
    assert all(i.labels.get(SNAPSHOT_REF) == n for n, i in chain.items())
    assert not any(n.startswith("k8s.io/") for n in snaps), "containerd unpacked a layer"
    assert '"containerd.io/snapshot/cri.layer-digest"' not in containerd.tail(10_000)

    run = ["-n", "k8s.io", "run", "--rm", "--snapshotter", LAZY_PROXY, ref]
    name = f"ckfs-lazy-{random.randrange(1 << 32):08x}"
    out = containerd.ctr(*run, name, "cat", "/etc/os-release").stdout
    assert out == OS_RELEASE

    fetched = proxy.body_bytes("/blobs/")
    print(f"blob bytes fetched: {at_pull} at ckfs pull --lazy, {fetched} in all, of {lazy_image}")
    assert fetched < SHARE * lazy_image, (at_pull, fetched, lazy_image)


def test_a_chain_id_ckfs_does_not_know_is_an_ordinary_prepare(ckfsd: Daemon) -> None:
    """No record, no layer digest: the lazy proxy prepares as overlay does."""
    chain_id = "sha256:" + "ab" * 32
    with channel(ckfsd) as ch:
        stub = snapshots_pb2_grpc.SnapshotsStub(ch)
        request = pb.PrepareSnapshotRequest(
            snapshotter=LAZY_PROXY,
            key=f"default/1/extract-1 {chain_id}",
            labels={SNAPSHOT_REF: chain_id},
        )
        mounts = stub.Prepare(request, timeout=60).mounts
        assert [m.type for m in mounts] == ["bind"]
        with pytest.raises(grpc.RpcError) as e:
            stub.Stat(pb.StatSnapshotRequest(snapshotter=LAZY_PROXY, key=chain_id), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


#: The container's script: read a little of the unread file, wait for the
#: test (ckfsd is killed meanwhile), then read all of it, which the FUSE
#: server fetches alone, and a file not looked up before.
WAIT_THEN_READ = (
    "busybox head -c 65536 /opt/unread.bin | busybox wc -c; "
    "while [ ! -e /tmp/go ]; do sleep 0.1; done; "
    "busybox sha256sum /opt/unread.bin; cat /etc/os-release"
)


def test_a_container_keeps_reading_while_ckfsd_is_killed(
    lazy_image: int, ckfsd: Daemon, proxy: FaultProxy, containerd: Containerd
) -> None:
    ref = f"{proxy.host}/{REPO}"
    Ckfs(ckfsd.root, ckfsd.address).run("pull", "--lazy", ref)
    cri_pull(containerd.address, ref)
    name = f"ckfs-lazy-{random.randrange(1 << 32):08x}"
    run = ["ctr", "--address", containerd.address, "-n", "k8s.io", "run", "--rm"]
    task = subprocess.Popen(
        [*run, "--snapshotter", LAZY_PROXY, ref, name, "sh", "-c", WAIT_THEN_READ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    again: Daemon | None = None
    try:
        assert task.stdout is not None
        assert task.stdout.readline().strip() == "65536"
        ckfsd.process.send_signal(signal.SIGKILL)
        ckfsd.process.wait(timeout=30)
        exec_ = ["-n", "k8s.io", "tasks", "exec", "--exec-id", "go", name]
        containerd.ctr(*exec_, "busybox", "touch", "/tmp/go")
        out, err = task.communicate(timeout=120)
        unread = hashlib.sha256(hashlib.shake_256(b"ckfs unread").digest(UNREAD)).hexdigest()
        assert out.splitlines() == [f"{unread}  /opt/unread.bin", *OS_RELEASE.splitlines()], err
        # A ckfsd again on the same root and socket adopts the FUSE server.
        again = start(ckfsd.root, ckfsd.socket, ckfsd.log)
        assert "remounted" not in again.log_text()
    finally:
        if task.poll() is None:
            task.kill()
            task.wait()
        if again is not None:
            stop(again.process)
