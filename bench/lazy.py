"""The lazy FUSE snapshotter against its peers: every benchmark of issue 10, one run.

    .venv/bin/python bench/lazy.py [--only 1,3] [--quick] [--mib 260] [--repeat 3]

Run as root (mounts, runc, ``drop_caches``). Set up once, not timed, and
cached under ``.bench/``: `common.big_layout` with ``runnable`` (busybox
under four data layers of 2,500 files, gzip), the same image converted
layer by layer to eStargz by upstream's ``estargz`` library
(`integration.estargz`, 4 MiB chunks, upstream's default), a one-file
eStargz image (``--file-mib``) and one of ``--entries`` entries. One local
docker-registry serves them all; a counting proxy
(`integration.faultproxy.FaultProxy`) stands in front of it where bytes are
counted (only lazy cases go through it: its cost is charged to them).

Every timed run starts on a fresh state root or fresh daemons, after
``sync`` and ``drop_caches=3``: ckfs's ckfsd and FUSE server are started on
the new root before the caches are dropped, as containerd (and the stargz
grpc server) are (1. also shows ``ckfs mount`` starting them itself); cases take turns
(`common.timed_turns`) and medians of ``--repeat`` are printed with their
ratio to the target.

1. ``ckfs mount`` of the eStargz image to the first read of
   ``/etc/os-release``, vs ``ctr images pull`` (overlayfs) of the gzip
   original from the registry itself: <= 0.05x; blob bytes through the
   proxy for that mount and read: <= 5 % of the image.
2. Container start, ``cat /etc/os-release``: ``ckfs bundle -s fuse`` (mount
   plus config.json) + ``runc run`` vs stargz-snapshotter's ``ctr-remote
   images rpull`` + ``ctr run --rm`` through a minimal
   containerd-stargz-grpc (``bench/stargz/stargzgrpc``, built here; its
   background fetch off, which would only add bytes): <= 1.0x, bytes <=.
3. First mount of the plain gzip image (fetch + gzip index) vs ``ckfs
   mount --snapshotter overlayfs`` (fetch + unpack): <= 0.6x.
4. Sequential read (128 KiB reads) of the one big file through the mount:
   cold from the registry (fresh root, caches dropped): >= 300 MB/s; from
   the chunk cache (the file's pages dropped with ``fadvise(DONTNEED)``, the
   chunk files still in the page cache) vs the same file on tmpfs: >= 0.8x.
   Also shown: the chunk cache after ``drop_caches=3`` (from disk).
5. ``find -printf %s`` (getdents + lstat of every entry) of the big image:
   the lazy mount vs kernel overlayfs over unpacked layers (``ckfs mount -s
   overlayfs``), warm <= 1.5x, cold (``drop_caches=3``) <= 3x.
6. The FUSE serving process's RSS with the ``--entries`` image mounted, after
   a walk of all of it (and its peak): <= 100 MB.

Everything started here (registry, proxy, containerd, stargz grpc, FUSE
servers) is stopped by PID, and everything mounted is unmounted, in
``finally`` blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    CACHE,
    REPO,
    big_layout,
    ckfs_cmd,
    containerd,
    layout_size,
    timed_turns,
)
from ckfs.client import ROOT_LOG, start_daemon, stop_daemon
from ckfs.mount import is_mountpoint, unmount_recursive
from integration.estargz import convert, write_layout
from integration.faultproxy import FaultProxy
from integration.registry import Registry
from snapshotters.fuse.process import ServerPaths, ensure_server, server_pid, stop_server

#: Upstream's default chunk size (``estargz.Build``), what real images carry.
CHUNK = 4 << 20
#: Bytes per read in the sequential reads: a common FUSE request size.
BLOCK = 128 << 10
#: The small file every start-up case reads.
SMALL = "etc/os-release"
STARGZ_SOURCE = REPO / "bench" / "stargz" / "stargzgrpc"
#: stargz-snapshotter's settings: its background fetch (the whole layers,
#: later) would only add bytes; no Prometheus listener to clash with.
STARGZ_CONFIG = "no_background_fetch = true\nno_prometheus = true\n"
REPOS = {"gzip": "bench/gzip:latest", "esgz": "bench/esgz:latest"}
#: ckfsd's log line for a Mounts RPC (`bench.containerd.RPC_LOG`'s format).
MOUNTS_RPC = re.compile(r"/ckfs\.v1\.Ckfs/Mounts OK ([0-9.]+)ms$", re.MULTILINE)


def drop_caches(level: int = 3) -> None:
    """Write back, then drop the page cache (1), dentries and inodes (2) or both (3)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text(f"{level}\n")


def check_run(cmd: list[str], **kw: object) -> str:
    """Run *cmd*; its stdout; its stderr's tail in the error if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed: {proc.stderr.strip()[-2000:]}")
    return str(proc.stdout)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# -- images -------------------------------------------------------------------------


def layers_of(layout: Path) -> list[bytes]:
    """The layer blobs of *layout*'s first image, bottom first."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    return [(blobs / d["digest"][7:]).read_bytes() for d in manifest["layers"]]


def esgz_layout(name: str, layers: Callable[[], list[bytes]]) -> Path:
    """An eStargz image of the tars *layers* gives (each converted by
    upstream's library), made once and cached as ``.bench/NAME``."""
    out = CACHE / name
    if (out / "index.json").exists():
        return out
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    try:
        conv = [convert(t, tmp / f"c{i}", chunk_size=CHUNK) for i, t in enumerate(layers())]
        write_layout(tmp / "layout", [(c.descriptor(), c.blob, c.diff_id) for c in conv])
        os.rename(tmp / "layout", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def one_file_tar(size: int) -> bytes:
    """A layer of the one file ``big``, content like `bench.layerreader`'s."""
    import io

    from bench.layerreader import content

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("big")
        info.size, info.mode, info.mtime = size, 0o644, 1_000_000
        t.addfile(info, io.BytesIO(content(size)))
    return buf.getvalue()


def stargzgrpc() -> Path:
    """The minimal containerd-stargz-grpc, built once per source and Go version."""
    version = check_run(["go", "version"])
    key = hashlib.sha256((STARGZ_SOURCE / "main.go").read_bytes() + version.encode())
    binary = CACHE / f"stargzgrpc-{key.hexdigest()[:16]}"
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory(prefix="stargzgrpc-") as work:
        src = Path(work) / "gopath" / "src" / "stargzgrpc"
        shutil.copytree(STARGZ_SOURCE, src)
        env = {**os.environ, "GO111MODULE": "off", "GOPROXY": "off", "GOFLAGS": ""}
        env["GOPATH"] = f"/usr/share/gocode:{Path(work) / 'gopath'}"
        check_run(["go", "build", "-o", str(Path(work) / "out"), "."], cwd=src, env=env)
        shutil.copy2(Path(work) / "out", binary.with_suffix(".tmp"))
        os.replace(binary.with_suffix(".tmp"), binary)
    return binary


# -- the parts under test -----------------------------------------------------------


class Ckfs:
    """ckfs on fresh state roots (each its own ckfsd and FUSE server), undone on `clear`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.count = itertools.count()
        self.roots: list[Path] = []
        self.targets: list[tuple[Path, Path]] = []

    @property
    def root(self) -> Path:
        """The root `fresh` made last."""
        return self.roots[-1]

    def fresh(self, *, daemons: bool = True) -> Path:
        """A new state root; with *daemons*, its ckfsd and FUSE server started
        (as containerd is before its timed runs); else the first ``ckfs
        mount`` starts ckfsd, which starts the FUSE server."""
        root = self.work / f"ckfs{next(self.count)}"
        self.roots.append(root)
        if daemons:
            client = start_daemon(root)
            if client is not None:
                client.close()
            ensure_server(root)
        return root

    def __call__(self, root: Path, *args: str) -> str:
        return check_run(ckfs_cmd(root, *args))

    def mount(self, root: Path, ref: str, target: Path, *options: str) -> Path:
        """``ckfs mount --plain-http [OPTIONS] REF TARGET`` on *root*."""
        self.targets.append((root, target))
        self(root, "mount", "--plain-http", *options, ref, str(target))
        return target

    def bundle(self, root: Path, ref: str, directory: Path, *command: str) -> Path:
        """``ckfs bundle -s fuse`` of *ref* at *directory* running *command*."""
        self.targets.append((root, directory / "rootfs"))
        self(root, "bundle", "-s", "fuse", "--plain-http", ref, str(directory), *command)
        return directory

    def clear(self) -> None:
        """Unmount every target, stop every root's ckfsd and FUSE server (by
        their PIDs), remove the roots."""
        for root, target in reversed(self.targets):
            if is_mountpoint(target):
                subprocess.run(ckfs_cmd(root, "umount", str(target)), capture_output=True)
        self.targets.clear()
        for root in self.roots:
            stop_daemon(root)
            stop_server(root)
            unmount_recursive(root, lazy=True)
            shutil.rmtree(root, ignore_errors=True)
        self.roots.clear()


class Containerd:
    """containerd (and stargz-snapshotter's grpc server) on empty roots, on demand."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.stack = contextlib.ExitStack()
        self.ctr: list[str] = []
        self.count = itertools.count()

    def fresh(self, stargz: Path | None = None) -> list[str]:
        """Both restarted on empty roots; *stargz* (the binary) serves ``stargz``."""
        self.close()
        for d in ("containerd", "stargz"):
            shutil.rmtree(self.work / d, ignore_errors=True)
        proxy = ""
        if stargz is not None:
            proxy = str(self.stack.enter_context(self._stargz(stargz, self.work / "stargz")))
        sock = self.stack.enter_context(containerd(self.work / "containerd", proxy, "stargz"))
        self.ctr = ["ctr", "--address", str(sock)]
        return self.ctr

    @contextlib.contextmanager
    def _stargz(self, binary: Path, root: Path) -> Iterator[Path]:
        """The stargz grpc server; stopped by SIGINT (it unmounts its layers then)."""
        root.mkdir(parents=True)
        sock, config = root / "grpc.sock", root / "config.toml"
        config.write_text(STARGZ_CONFIG)
        log = open(root / "log", "ab")  # noqa: SIM115 (handed to the child)
        args = ["-address", str(sock), "-root", str(root / "lib"), "-config", str(config)]
        proc = subprocess.Popen([str(binary), *args, "-log-level", "warn"], stdout=log, stderr=log)
        log.close()
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"stargz grpc did not start; see {root / 'log'}")
                time.sleep(0.05)
            yield sock
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            unmount_recursive(root, lazy=True)

    def close(self) -> None:
        """Tasks killed, then containerd and the grpc server stopped by PID."""
        if self.ctr:
            ls = subprocess.run([*self.ctr, "tasks", "ls", "-q"], capture_output=True, text=True)
            for task in ls.stdout.split():
                subprocess.run([*self.ctr, "tasks", "kill", "-s", "SIGKILL", task], check=False)
                subprocess.run([*self.ctr, "tasks", "delete", "-f", task], check=False)
        self.ctr = []
        self.stack.close()
        unmount_recursive(self.work / "containerd", lazy=True)

    def cid(self) -> str:
        return f"bench-{os.getpid()}-{next(self.count)}"


class Bench:
    """The images in one registry (and its counting proxy), and the parts under test."""

    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work, self.args = work, args
        self.registry = Registry(work / "registry")
        self.proxy = FaultProxy("")
        self.ckfs = Ckfs(work)
        self.daemons = Containerd(work)
        self.runc_state = work / "runc"
        self.cids: list[str] = []
        self.sizes: dict[str, int] = {}

    def start(self, images: dict[str, Path]) -> None:
        self.registry.start()
        self.proxy.upstream = self.registry.host
        self.proxy.start()
        for name, layout in images.items():
            self.registry.push(layout, REPOS.get(name, f"bench/{name}:latest"))
            self.sizes[name] = layout_size(layout)

    def registry_pid(self) -> int | None:
        return self.registry.proc.pid if self.registry.proc else None

    def ref(self, name: str, *, counted: bool = False) -> str:
        """The image *name* in the registry, or through the counting proxy."""
        host = self.proxy.host if counted else self.registry.host
        return f"{host}/{REPOS.get(name, f'bench/{name}:latest')}"

    def close(self) -> None:
        for cid in self.cids:
            subprocess.run(
                ["runc", "--root", str(self.runc_state), "delete", "-f", cid],
                capture_output=True,
                check=False,
            )
        try:
            self.daemons.close()
        finally:
            try:
                self.ckfs.clear()
            finally:
                self.proxy.stop()
                self.registry.stop()
                unmount_recursive(self.work, lazy=True)


def lazy_read(bench: Bench, ref: str, rec: dict[str, float]) -> Callable[[], None]:
    """A body: ``ckfs mount`` of *ref* on the fresh root, then the first read of
    `SMALL`; the split and the bytes through the proxy go to *rec*."""

    def body() -> None:
        b0 = bench.proxy.body_bytes()
        root = bench.ckfs.root
        t0 = time.perf_counter()
        target = bench.ckfs.mount(root, ref, root / "mnt")
        t1 = time.perf_counter()
        assert b"NAME=" in (target / SMALL).read_bytes()
        rec["mount"], rec["read"] = t1 - t0, time.perf_counter() - t1
        rec["rpc"] = mounts_rpc(root)
        rec["bytes"] = bench.proxy.body_bytes() - b0

    return body


def mounts_rpc(root: Path) -> float:
    """Seconds of the last Mounts RPC in *root*'s ckfsd log (0 if none)."""
    found = MOUNTS_RPC.findall((root / ROOT_LOG).read_text(errors="replace"))
    return float(found[-1]) / 1e3 if found else 0.0


def cold(clear: Callable[[], object]) -> Callable[[], None]:
    """A setup: *clear* what the last run left, then drop every cache."""

    def setup() -> None:
        clear()
        drop_caches()

    return setup


def cold_ckfs(bench: Bench, *, daemons: bool = True) -> Callable[[], None]:
    """A setup: the last run's roots gone, a fresh one (`Ckfs.fresh`), caches dropped."""

    def renew() -> None:
        bench.ckfs.clear()
        bench.ckfs.fresh(daemons=daemons)

    return cold(renew)


# -- the measures -------------------------------------------------------------------


def m1_first_read(bench: Bench) -> None:
    rec: dict[str, float] = {}
    gzip_ref, esgz_ref = bench.ref("gzip"), bench.ref("esgz", counted=True)

    def ctr_pull() -> None:
        ctr = bench.daemons.ctr
        check_run([*ctr, "images", "pull", "--plain-http", "--snapshotter", "overlayfs", gzip_ref])

    times = timed_turns(
        {
            "ckfs": (cold_ckfs(bench), lazy_read(bench, esgz_ref, rec)),
            "ckfs, no daemons": (cold_ckfs(bench, daemons=False), lazy_read(bench, esgz_ref, {})),
            "ctr": (cold(bench.daemons.fresh), ctr_pull),
        },
        bench.args.repeat,
    )
    bench.daemons.close()
    bench.ckfs.clear()
    ratio, share = times["ckfs"] / times["ctr"], rec["bytes"] / bench.sizes["esgz"]
    print(f"1. ckfs mount -> first read of /{SMALL}, {bench.sizes['esgz'] / 1e6:.0f} MB eStargz")
    print(
        f"   ckfs mount + read (eStargz)        {times['ckfs']:8.3f} s"
        f"   (last: mount {rec['mount']:.3f} s, of which ckfsd's Mounts RPC"
        f" {rec['rpc']:.3f} s; first read {rec['read']:.3f} s)"
    )
    print(f"   ctr images pull (overlayfs, gzip)  {times['ctr']:8.3f} s")
    print(f"   ratio {ratio:.3f}x  target <= 0.05x  {verdict(ratio <= 0.05)}")
    print(
        f"   (no daemons running yet: ckfs mount starts ckfsd, ckfsd the FUSE server:"
        f" {times['ckfs, no daemons']:.3f} s, {times['ckfs, no daemons'] / times['ctr']:.3f}x)"
    )
    print(
        f"   blob bytes fetched {rec['bytes']:,} of {bench.sizes['esgz']:,} = {share:.2%}"
        f"  target <= 5 %  {verdict(share <= 0.05)}"
    )


def m2_container_start(bench: Bench) -> None:
    rec: dict[str, float] = {}
    ref = bench.ref("esgz", counted=True)
    binary = stargzgrpc()
    command = ("/bin/cat", f"/{SMALL}")

    def ckfs_run() -> None:
        b0 = bench.proxy.body_bytes()
        root = bench.ckfs.root
        bundle = bench.ckfs.bundle(root, ref, root / "bundle", *command)
        cid = bench.daemons.cid()
        bench.cids.append(cid)
        out = check_run(
            ["runc", "--root", str(bench.runc_state), "run", "-b", str(bundle), cid],
            stdin=subprocess.DEVNULL,
        )
        assert "NAME=" in out, out
        rec["ckfs"] = bench.proxy.body_bytes() - b0

    def stargz_run() -> None:
        b0 = bench.proxy.body_bytes()
        ctr = bench.daemons.ctr
        check_run(
            [
                "ctr-remote",
                *ctr[1:],
                "images",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "stargz",
                ref,
            ]
        )
        out = check_run(
            [*ctr, "run", "--rm", "--snapshotter", "stargz", ref, bench.daemons.cid(), *command],
            stdin=subprocess.DEVNULL,
        )
        assert "NAME=" in out, out
        rec["stargz"] = bench.proxy.body_bytes() - b0

    times = timed_turns(
        {
            "ckfs": (cold_ckfs(bench), ckfs_run),
            "stargz": (cold(lambda: bench.daemons.fresh(binary)), stargz_run),
        },
        bench.args.repeat,
    )
    bench.daemons.close()
    ratio = times["ckfs"] / times["stargz"]
    print(f"2. container start, cat /{SMALL}, same eStargz image")
    print(
        f"   ckfs bundle -s fuse + runc run        {times['ckfs']:8.3f} s"
        f"   {rec['ckfs']:>12,} blob bytes"
    )
    print(
        f"   ctr-remote rpull + ctr run (stargz)   {times['stargz']:8.3f} s"
        f"   {rec['stargz']:>12,} blob bytes"
    )
    print(
        f"   ratio {ratio:.2f}x  target <= 1.0x  {verdict(ratio <= 1.0)};"
        f" bytes {verdict(rec['ckfs'] <= rec['stargz'])}"
    )


def m3_gzip_mount(bench: Bench) -> None:
    ref = bench.ref("gzip")

    def mount(*options: str) -> Callable[[], None]:
        def body() -> None:
            root = bench.ckfs.root
            target = bench.ckfs.mount(root, ref, root / "mnt", *options)
            assert b"NAME=" in (target / SMALL).read_bytes()

        return body

    times = timed_turns(
        {
            "fuse": (cold_ckfs(bench), mount()),
            "overlayfs": (cold_ckfs(bench), mount("--snapshotter", "overlayfs")),
        },
        bench.args.repeat,
    )
    bench.ckfs.clear()
    ratio = times["fuse"] / times["overlayfs"]
    print(f"3. first mount of the plain gzip image ({bench.sizes['gzip'] / 1e6:.0f} MB)")
    print(f"   ckfs mount (fuse: fetch + gzip index)        {times['fuse']:8.3f} s")
    print(f"   ckfs mount -s overlayfs (fetch + unpack)     {times['overlayfs']:8.3f} s")
    print(f"   ratio {ratio:.2f}x  target <= 0.6x  {verdict(ratio <= 0.6)}")


def read_seq(path: Path, *, drop_file: bool = False) -> tuple[int, float]:
    """Bytes and seconds of a sequential read of *path* in `BLOCK` reads; with
    *drop_file*, the file's own pages are dropped first (untimed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop_file:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(BLOCK)
        off = 0
        t0 = time.perf_counter()
        while n := os.preadv(fd, [buf], off):
            off += n
        return off, time.perf_counter() - t0
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def m4_sequential(bench: Bench, size: int) -> None:
    shm = Path(tempfile.mkdtemp(prefix="ckfs-bench-lazy-", dir="/dev/shm"))
    try:
        from bench.layerreader import content

        (shm / "big").write_bytes(content(size))
        want = sha256_of(shm / "big")
        secs: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        for _ in range(bench.args.repeat):
            bench.ckfs.clear()
            root = bench.ckfs.fresh()
            target = bench.ckfs.mount(root, bench.ref("file"), root / "mnt")
            pids = {"FUSE server": server_pid(ServerPaths(root)), "registry": bench.registry_pid()}
            rounds = [
                ("tmpfs", shm / "big", 0, False),
                ("cold, registry", target / "big", 3, False),
                ("page cache", target / "big", 0, False),
                ("chunk cache", target / "big", 0, True),
                ("chunk cache, drop_caches=3", target / "big", 3, False),
            ]
            for name, path, level, drop_file in rounds:
                if level:
                    drop_caches(level)
                before = {k: cpu_seconds(pid) for k, pid in pids.items()}
                n, dt = read_seq(path, drop_file=drop_file)
                assert n == size, (name, n)
                secs.setdefault(name, []).append(dt)
                if name == "cold, registry":
                    for k, pid in pids.items():
                        cpu.setdefault(k, []).append(cpu_seconds(pid) - before[k])
            assert sha256_of(target / "big") == want, "the lazy file's bytes differ"
        bench.ckfs.clear()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    mbs = {k: size / statistics.median(v) / 1e6 for k, v in secs.items()}
    print(f"4. sequential read of a {size >> 20} MiB file, {BLOCK >> 10} KiB reads, MB/s")
    for k, v in mbs.items():
        print(f"   {k:<30} {v:8.0f}")
    ratio = mbs["chunk cache"] / mbs["tmpfs"]
    print(f"   chunk cache / tmpfs {ratio:.2f}x  target >= 0.8x  {verdict(ratio >= 0.8)}")
    cold_mbs = mbs["cold, registry"]
    print(
        f"   cold from the registry {cold_mbs:.0f} MB/s  target >= 300 MB/s"
        f"  {verdict(cold_mbs >= 300)}"
    )
    spent = ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in cpu.items())
    print(f"   CPU in the cold read ({statistics.median(secs['cold, registry']):.2f} s): {spent}")


def walk(top: Path) -> tuple[int, float]:
    """Entries and seconds of ``find -printf %s`` (getdents + lstat of each) over *top*."""
    t0 = time.perf_counter()
    out = check_run(["find", str(top), "-printf", "%s\n"])
    return len(out.splitlines()), time.perf_counter() - t0


def m5_walk(bench: Bench) -> None:
    root = bench.ckfs.fresh()
    lazy = bench.ckfs.mount(root, bench.ref("esgz"), root / "lazy")
    eager = bench.ckfs.mount(root, bench.ref("gzip"), root / "eager", "-s", "overlayfs")
    secs: dict[str, list[float]] = {}
    entries = {}
    for _ in range(max(bench.args.repeat, 3)):
        for name, top in (("lazy", lazy), ("overlayfs", eager)):
            for kind, level in (("cold", 3), ("warm", 0)):
                if level:
                    drop_caches(level)
                entries[name], dt = walk(top)
                secs.setdefault(f"{name} {kind}", []).append(dt)
    bench.ckfs.clear()
    med = {k: statistics.median(v) for k, v in secs.items()}
    print(f"5. find + lstat of every entry ({entries['lazy']} lazy, {entries['overlayfs']} eager)")
    for kind, target in (("warm", 1.5), ("cold", 3.0)):
        a, b = med[f"lazy {kind}"], med[f"overlayfs {kind}"]
        print(
            f"   {kind}: lazy {a * 1000:8.1f} ms  overlayfs over unpacked {b * 1000:8.1f} ms"
            f"  ratio {a / b:.2f}x  target <= {target}x  {verdict(a / b <= target)}"
        )


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds process *pid* has used (0 if unknown)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mib(pid: int, field: str) -> float:
    """A ``/proc/PID/status`` size field (VmRSS, VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


def m6_memory(bench: Bench) -> None:
    root = bench.ckfs.fresh()
    target = bench.ckfs.mount(root, bench.ref("many"), root / "mnt")
    pid = server_pid(ServerPaths(root))
    assert pid
    attached = proc_mib(pid, "VmRSS")
    entries, dt = walk(target)
    walked = proc_mib(pid, "VmRSS")
    drop_caches(2)
    time.sleep(1)
    forgot, peak = proc_mib(pid, "VmRSS"), proc_mib(pid, "VmHWM")
    bench.ckfs.clear()
    print(f"6. FUSE server RSS, a {entries - 1}-entry image mounted (walk {dt:.1f} s), MiB")
    print(
        f"   attached {attached:.0f}  after the walk {walked:.0f}"
        f"  after the kernel forgot {forgot:.0f}  peak {peak:.0f}"
    )
    rss = max(attached, walked) * (1 << 20) / 1e6
    print(f"   RSS {rss:.0f} MB  target <= 100 MB  {verdict(rss <= 100)}")


# -- main ---------------------------------------------------------------------------


def images(args: argparse.Namespace, only: set[int]) -> dict[str, Path]:
    """The layouts the chosen measures need, built or taken from the cache."""
    out: dict[str, Path] = {}
    if only & {1, 2, 3, 5}:
        gz = big_layout(args.mib, runnable=True)
        out["gzip"] = gz
        if only & {1, 2, 5}:
            out["esgz"] = esgz_layout(f"{gz.name}-esgz", lambda: layers_of(gz))
    if 4 in only:
        mib = args.file_mib
        out["file"] = esgz_layout(f"esgz-file-{mib}m", lambda: [one_file_tar(mib << 20)])
    if 6 in only:
        from bench.fuse_server import layer_tar

        n = args.entries
        out["many"] = esgz_layout(f"esgz-entries-{n}", lambda: [layer_tar(n)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default="1,2,3,4,5,6", help="measures to run, e.g. 1,3")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a quick check: --mib 20 --file-mib 64 --entries 20000, --repeat 1 unless given",
    )
    ap.add_argument("--mib", type=int, default=260, help="big image size before compression")
    ap.add_argument("--file-mib", type=int, default=256, help="the sequentially read file")
    ap.add_argument("--entries", type=int, default=100_000, help="entries of the memory image")
    ap.add_argument("--repeat", type=int, help="timed runs; the median is shown [default: 3]")
    args = ap.parse_args()
    if args.quick:
        args.mib, args.file_mib, args.entries = 20, 64, 20_000
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    only = {int(x) for x in args.only.split(",")}
    if os.geteuid() != 0:
        sys.exit("bench/lazy.py: run as root (mounts, runc, drop_caches)")
    CACHE.mkdir(exist_ok=True)
    layouts = images(args, only)
    work = Path(tempfile.mkdtemp(prefix="ckfs-bench-lazy-", dir=CACHE))
    bench = Bench(work, args)
    measures: dict[int, Callable[[], None]] = {
        1: lambda: m1_first_read(bench),
        2: lambda: m2_container_start(bench),
        3: lambda: m3_gzip_mount(bench),
        4: lambda: m4_sequential(bench, args.file_mib << 20),
        5: lambda: m5_walk(bench),
        6: lambda: m6_memory(bench),
    }
    try:
        bench.start(layouts)
        sizes = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in bench.sizes.items())
        print(
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs;"
            f" median of {args.repeat}; images: {sizes}"
        )
        for n in sorted(only):
            measures[n]()
            sys.stdout.flush()
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
