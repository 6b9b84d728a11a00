"""containerd drives ckfs: the real ckfsd as the proxy snapshotter of a real containerd.

Debian's containerd 1.6 and ``ctr`` pull the example image from the real
docker-registry with ``--snapshotter ckfs``: the layers land in ckfs's
overlayfs snapshots through ckfsd's Snapshots service, a container runs on
them, and containerd's gc removes them from ckfs again. Layers ``ckfs pull``
unpacked are adopted by containerd, not unpacked a second time, and
containerd's gc leaves them to ckfs. The wire itself takes 200 concurrent
calls and refuses malformed ones with INVALID_ARGUMENT.

What ``ctr`` 1.6 does not do: its ``images pull`` and ``run`` unpack
through ``rootfs.ApplyLayerWithOpts`` without the
``containerd.io/snapshot.ref`` label, so containerd never asks a proxy
snapshotter whether it has a layer, and an ALREADY_EXISTS without that
label is an error to containerd's metadata layer. The adoption test
therefore pulls through CRI (enabled on that containerd only), the client
that unpacks through containerd's unpacker, which labels every layer;
``ctr run`` then runs the adopted image. A plain ``ctr images pull`` of an
image ckfs holds unpacks it again, under containerd's own keys
(`test_ctr_pull_of_a_ckfs_image_unpacks_again`).
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from ckfs.api.services.snapshots.v1 import snapshots_pb2 as pb
from ckfs.api.services.snapshots.v1 import snapshots_pb2_grpc
from ckfs.labels import ADOPTED_BY, CONTAINERD, SNAPSHOT_REF
from integration.conftest import Ckfs
from integration.containerd import PROXY, Containerd, cri_pull
from integration.daemon import Daemon, channel, ckfsd_fixture  # noqa: F401 (fixture ckfsd)
from integration.mounts import MountGuard
from integration.registry import EXAMPLE_REPO, Registry

#: ckfs's snapshotter named directly: ckfs's own view of the store.
DIRECT = "overlayfs"

#: What the example image's /etc/os-release says (scripts/example-image.sh).
OS_RELEASE = 'NAME="ckfs example"\nID=ckfs-example\nPRETTY_NAME="ckfs example (busybox)"\n'

#: Layers in the example image, hence committed snapshots per unpack.
EXAMPLE_LAYERS = 3


@pytest.fixture
def stub(ckfsd: Daemon) -> Iterator[snapshots_pb2_grpc.SnapshotsStub]:
    with channel(ckfsd) as ch:
        yield snapshots_pb2_grpc.SnapshotsStub(ch)


@pytest.fixture
def make_containerd(
    ckfsd: Daemon,
    tmp_path: Path,
    mount_guard: MountGuard,
) -> Iterator[Callable[..., Containerd]]:
    """Start containerds proxying to the test's ckfsd; all stopped (by PID) at teardown.

    Depends on ``mount_guard``, so whatever a failed run left mounted under
    containerd's state is detached after containerd stopped.
    """
    started = 0

    def make(*, cri: bool = False, plain_http: str = "") -> Containerd:
        nonlocal started
        c = Containerd(tmp_path / f"containerd{started}", str(ckfsd.socket), cri=cri)
        started += 1
        stack.callback(c.stop)  # every one stopped, even when another's stop raises
        if plain_http:
            c.certs_d.mkdir(parents=True)
            c.plain_http(plain_http)
        return c.start()

    with contextlib.ExitStack() as stack:
        yield make


def ckfs_snapshots(stub: snapshots_pb2_grpc.SnapshotsStub) -> dict[str, pb.Info]:
    """Every snapshot in ckfs's overlayfs snapshotter, by name, through ckfsd."""
    request = pb.ListSnapshotsRequest(snapshotter=DIRECT)
    return {i.name: i for r in stub.List(request, timeout=60) for i in r.info}


def committed(snaps: dict[str, pb.Info]) -> set[str]:
    return {name for name, info in snaps.items() if info.kind == pb.COMMITTED}


def wait_for(done: Callable[[], bool], timeout: float = 30) -> None:
    """Poll *done* until true: containerd's gc runs soon after a removal, not during it."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not done within {timeout} s"
        time.sleep(0.1)


def container_id() -> str:
    return f"ckfs-test-{random.randrange(1 << 32):08x}"


def os_release(ctd: Containerd, ref: str, namespace: str = "default") -> str:
    """What ``ctr run --rm --snapshotter ckfs`` of *ref* prints for /etc/os-release."""
    run = ["-n", namespace, "run", "--rm", "--snapshotter", PROXY, ref, container_id()]
    return ctd.ctr(*run, "cat", "/etc/os-release").stdout


def image_ref(registry: Registry) -> str:
    return f"{registry.host}/{EXAMPLE_REPO}"


def test_ctr_pull_run_and_gc_through_ckfs(
    make_containerd: Callable[..., Containerd],
    stub: snapshots_pb2_grpc.SnapshotsStub,
    registry: Registry,
) -> None:
    ctd = make_containerd()
    ref = image_ref(registry)
    ctd.ctr("images", "pull", "--snapshotter", PROXY, "--plain-http", ref)

    # The layers are ckfs's overlayfs snapshots, under containerd's keys,
    # each a chain on the one before.
    snaps = ckfs_snapshots(stub)
    assert len(committed(snaps)) == EXAMPLE_LAYERS, snaps.keys()
    assert all(name.startswith("default/") for name in snaps)
    parents = {info.parent for info in snaps.values()}
    assert parents - set(snaps) == {""}
    assert set(ctd.snapshots()) == {name.split("/", 2)[2] for name in snaps}

    assert os_release(ctd, ref) == OS_RELEASE
    # The container's snapshot goes with --rm, once containerd's gc runs.
    wait_for(lambda: ckfs_snapshots(stub).keys() == snaps.keys())

    # containerd's gc, run synchronously by rm --sync, removes them from ckfs,
    # children first.
    ctd.ctr("images", "rm", "--sync", ref)
    assert ctd.snapshots() == []
    assert ckfs_snapshots(stub) == {}


@pytest.mark.parametrize("face", ["local", "ckfsd"])
def test_containerd_adopts_layers_ckfs_unpacked(
    make_containerd: Callable[..., Containerd],
    stub: snapshots_pb2_grpc.SnapshotsStub,
    ckfsd: Daemon,
    registry: Registry,
    face: str,
) -> None:
    # The CLI on ckfsd's root: daemonless, or through the ckfsd containerd uses.
    ckfs = Ckfs(ckfsd.root, ckfsd.address if face == "ckfsd" else None)
    ref = image_ref(registry)
    ckfs.run("pull", "--plain-http", ref)
    key = json.loads(ckfs.run("rootfs", "--plain-http", "--json", "--key", "mine", ref).stdout)
    assert key  # the Mount records of ckfs's own snapshot on the image
    before = ckfs_snapshots(stub)
    assert len(committed(before)) == EXAMPLE_LAYERS
    # On the wire, the remote-snapshot answer containerd's metadata layer needs.
    top = before["mine"].parent
    with pytest.raises(grpc.RpcError) as e:
        stub.Prepare(
            pb.PrepareSnapshotRequest(
                snapshotter=PROXY,
                key=f"default/1/extract-1 {top}",
                parent=before[top].parent,
                labels={SNAPSHOT_REF: top},
            )
        )
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS

    ctd = make_containerd(cri=True, plain_http=registry.host)
    cri_pull(ctd.address, ref)
    # containerd found every layer: nothing was prepared, applied or committed.
    after_pull = ckfs_snapshots(stub)
    assert after_pull.keys() == before.keys()
    assert set(ctd.snapshots("k8s.io")) == committed(before)
    # ...and the adoption is recorded, so ckfs's gc keeps them for containerd.
    assert {after_pull[n].labels.get(ADOPTED_BY) for n in committed(before)} == {CONTAINERD}

    assert os_release(ctd, ref, "k8s.io") == OS_RELEASE
    wait_for(lambda: ckfs_snapshots(stub).keys() == before.keys())

    # containerd's gc forgets the image (CRI named it thrice: tag, repo
    # digest, ID); ckfs's layers (and its own snapshot on them) stay: they
    # are ckfs's to collect.
    names = ctd.ctr("-n", "k8s.io", "images", "ls", "-q").stdout.split()
    assert ref in names
    ctd.ctr("-n", "k8s.io", "images", "rm", "--sync", *names)
    assert ctd.snapshots("k8s.io") == []
    assert ckfs_snapshots(stub).keys() == before.keys()
    assert "failed to remove snapshot" in ctd.tail(200)  # refused, not ignored


def test_ctr_pull_of_a_ckfs_image_unpacks_again(
    make_containerd: Callable[..., Containerd],
    stub: snapshots_pb2_grpc.SnapshotsStub,
    ckfs: Ckfs,
    registry: Registry,
) -> None:
    """ctr 1.6 sends no snapshot.ref label: pinned, so a newer ctr shows up here."""
    ref = image_ref(registry)
    ckfs.run("pull", "--plain-http", ref)
    ckfs.run("rootfs", "--plain-http", "--key", "mine", ref)
    before = committed(ckfs_snapshots(stub))
    ctd = make_containerd()
    ctd.ctr("images", "pull", "--snapshotter", PROXY, "--plain-http", ref)
    made = committed(ckfs_snapshots(stub)) - before
    assert len(made) == EXAMPLE_LAYERS
    assert all(name.startswith("default/") for name in made)
    ctd.ctr("images", "rm", "--sync", ref)
    assert committed(ckfs_snapshots(stub)) == before


def test_200_concurrent_rpcs_all_answered_tree_intact(
    stub: snapshots_pb2_grpc.SnapshotsStub,
) -> None:
    # A base chain, and snapshots to stat and to remove.
    parent = ""
    for n in range(3):
        key = f"default/{n}/extract layer{n}"
        stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=PROXY, key=key, parent=parent))
        parent = f"default/{n}/layer{n}"
        stub.Commit(pb.CommitSnapshotRequest(snapshotter=PROXY, name=parent, key=key))
    top = parent
    doomed = [f"default/1{n:03}/doomed" for n in range(50)]
    kept = [f"default/2{n:03}/kept" for n in range(50)]
    for key in doomed + kept:
        stub.View(pb.ViewSnapshotRequest(snapshotter=PROXY, key=key, parent=top))
    fresh = [f"default/3{n:03}/fresh" for n in range(50)]

    calls: list[Callable[[], object]] = []
    for n in range(50):
        calls += [
            lambda k=fresh[n]: stub.Prepare(
                pb.PrepareSnapshotRequest(snapshotter=PROXY, key=k, parent=top), timeout=120
            ),
            lambda k=doomed[n]: stub.Remove(
                pb.RemoveSnapshotRequest(snapshotter=PROXY, key=k), timeout=120
            ),
            lambda k=kept[n]: stub.Stat(
                pb.StatSnapshotRequest(snapshotter=PROXY, key=k), timeout=120
            ),
            lambda: list(stub.List(pb.ListSnapshotsRequest(snapshotter=PROXY), timeout=120)),
        ]
    random.shuffle(calls)
    start = threading.Barrier(len(calls))

    def call(fn: Callable[[], object]) -> object:
        start.wait()
        return fn()

    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(call, calls))
    assert len(answers) == 200  # every call answered, none failed (it would raise)

    snaps = ckfs_snapshots(stub)
    layers = {f"default/{n}/layer{n}" for n in range(3)}
    assert snaps.keys() == layers | set(kept) | set(fresh)
    assert all(snaps[k].parent == top and snaps[k].kind == pb.VIEW for k in kept)
    assert all(snaps[k].parent == top and snaps[k].kind == pb.ACTIVE for k in fresh)
    assert [snaps[f"default/{n}/layer{n}"].parent for n in range(3)] == [
        "",
        "default/0/layer0",
        "default/1/layer1",
    ]


MALFORMED: dict[str, Callable[[snapshots_pb2_grpc.SnapshotsStub], object]] = {
    "key with ..": lambda s: s.Prepare(
        pb.PrepareSnapshotRequest(snapshotter=PROXY, key="default/1/../../../etc")
    ),
    "key with NUL": lambda s: s.Stat(pb.StatSnapshotRequest(snapshotter=PROXY, key="a\x00b")),
    "4 KiB key": lambda s: s.Prepare(pb.PrepareSnapshotRequest(snapshotter=PROXY, key="k" * 4096)),
    "4 KiB parent": lambda s: s.View(
        pb.ViewSnapshotRequest(snapshotter=PROXY, key="k", parent="p" * 4096)
    ),
    "label set over the limit": lambda s: s.Prepare(
        pb.PrepareSnapshotRequest(
            snapshotter=PROXY, key="k", labels={f"l{n}": "v" * 2000 for n in range(100)}
        )
    ),
    "one label over the limit": lambda s: s.Prepare(
        pb.PrepareSnapshotRequest(snapshotter=PROXY, key="k", labels={"big": "v" * 5000})
    ),
    "4 KiB snapshotter name": lambda s: s.Stat(
        pb.StatSnapshotRequest(snapshotter="x" * 4096, key="k")
    ),
    "bad filter": lambda s: list(
        s.List(pb.ListSnapshotsRequest(snapshotter=PROXY, filters=['labels."unterminated']))
    ),
    "update of the parent": lambda s: s.Update(
        pb.UpdateSnapshotRequest(
            snapshotter=PROXY, info=pb.Info(name="k"), update_mask={"paths": ["parent"]}
        )
    ),
}


@pytest.mark.parametrize("send", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_are_invalid_argument(
    stub: snapshots_pb2_grpc.SnapshotsStub,
    send: Callable[[snapshots_pb2_grpc.SnapshotsStub], object],
) -> None:
    if send is MALFORMED["update of the parent"]:
        stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=PROXY, key="k"))
    with pytest.raises(grpc.RpcError) as e:
        send(stub)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "\x00" not in (e.value.details() or "")
    # Nothing was made, and the daemon still answers.
    assert set(ckfs_snapshots(stub)) <= {"k"}


def test_undecodable_bytes_are_invalid_argument(ckfsd: Daemon) -> None:
    with channel(ckfsd) as ch:
        prepare = ch.unary_unary("/containerd.services.snapshots.v1.Snapshots/Prepare")
        with pytest.raises(grpc.RpcError) as e:
            prepare(b"\x12\xff\xff\xff\xff\x0f", timeout=30)  # key: a 4 GiB length, no bytes
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            prepare(b"\x12\x02\xc3\x28", timeout=30)  # key: invalid UTF-8
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
