"""A real containerd (Debian's 1.6) for tests, with ckfsd as its proxy snapshotter.

Each `Containerd` is one ``containerd`` process with its own root, state,
sockets and ``config.toml`` under the test's directory, so it shares nothing
with a containerd the machine may run: ``[proxy_plugins.ckfs]`` points at the
ckfsd socket the test started, and the plugins the tests never use (CRI,
the other snapshotters, tracing) are disabled, so it is ready in a moment.
`Containerd.ctr` runs the real ``ctr`` against it. `Containerd.stop` kills
what its tasks left running, then containerd itself, by PID.

containerd's sockets live in a short directory of their own under ``/tmp``:
a unix socket path may have at most 107 bytes, and a test's ``tmp_path``
plus containerd's names can be longer.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from integration.conftest import need

__all__ = ["LAZY_PROXY", "PROXY", "Containerd", "cri_pull"]

#: The proxy plugin's name: what ``ctr --snapshotter`` takes and what
#: containerd sends ckfsd in every request's ``snapshotter`` field.
PROXY = "ckfs"

#: The second proxy plugin on the same ckfsd: its lazy snapshotter (fuse).
LAZY_PROXY = "ckfs-lazy"

#: Seconds containerd may take to answer ``ctr version`` after start.
_START_TIMEOUT = 30.0
#: Seconds it may take to exit after SIGTERM before it is killed.
_STOP_TIMEOUT = 15.0

#: Plugins the tests never use: CRI alone takes seconds to start and wants
#: CNI; the other snapshotters probe filesystems ckfs's tests do not have.
_CRI = "io.containerd.grpc.v1.cri"
_DISABLED = (
    _CRI,
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


def _toml_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


class Containerd:
    """One containerd with its own root and state below *base*.

    Args:
        base: a directory of the test's own; containerd's root, state,
            config and log go there.
        proxy_address: the ckfsd socket (a path) serving ckfs's Snapshots.
    """

    def __init__(
        self, base: Path, proxy_address: str, *, cri: bool = False, cri_snapshotter: str = PROXY
    ) -> None:
        self.base = base
        self.cri = cri
        self.cri_snapshotter = cri_snapshotter
        self.proxy_address = proxy_address.removeprefix("unix://")
        self.sockets = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
        self.address = str(self.sockets / "containerd.sock")
        self.config = base / "config.toml"
        self.log = base / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        root, state = self.base / "root", self.base / "state"
        disabled = tuple(p for p in _DISABLED if not (self.cri and p == _CRI))
        self.config.write_text(
            f"""version = 2
root = "{root}"
state = "{state}"
disabled_plugins = {_toml_list(disabled)}

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.address}.ttrpc"

[debug]
  address = "{self.sockets / "debug.sock"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.base / "opt"}"

[proxy_plugins]
  [proxy_plugins.{PROXY}]
    type = "snapshot"
    address = "{self.proxy_address}"
  [proxy_plugins.{LAZY_PROXY}]
    type = "snapshot"
    address = "{self.proxy_address}"
"""
            + (self._cri_config() if self.cri else "")
        )

    def _cri_config(self) -> str:
        """CRI pulling into ckfs, registries from our own certs.d, no host CNI."""
        return f"""
[plugins."{_CRI}"]
  [plugins."{_CRI}".containerd]
    snapshotter = "{self.cri_snapshotter}"
  [plugins."{_CRI}".registry]
    config_path = "{self.certs_d}"
  [plugins."{_CRI}".cni]
    bin_dir = "{self.base / "cni-bin"}"
    conf_dir = "{self.base / "cni-conf"}"
"""

    @property
    def certs_d(self) -> Path:
        """containerd's hosts.toml directory (CRI only; ``ctr`` takes --plain-http)."""
        return self.base / "certs.d"

    def plain_http(self, host: str) -> None:
        """Tell CRI to reach registry *host* (``127.0.0.1:PORT``) over plain HTTP."""
        d = self.certs_d / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(
            f'server = "http://{host}"\n'
            f'[host."http://{host}"]\n  capabilities = ["pull", "resolve"]\n'
        )

    def start(self) -> Containerd:
        """Start containerd and wait until ``ctr version`` answers."""
        need("containerd", "ctr", "runc", "containerd-shim-runc-v2")
        self.base.mkdir(parents=True, exist_ok=True)
        self.write_config()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.config), "--log-level", "debug"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # a hung `ctr version` raises too: leave no containerd behind
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"containerd exited {self.proc.returncode}:\n{self.tail()}")
            if self.ctr("version", check=False, timeout=5).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"containerd not ready in {_START_TIMEOUT} s:\n{self.tail()}")
            time.sleep(0.1)

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <ours> <args>``; with *check*, fail on a non-zero exit."""
        proc = subprocess.run(
            ["ctr", "--address", self.address, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
                f"\n--- containerd log (tail) ---\n{self.tail()}"
            )
        return proc

    def snapshots(self, namespace: str = "default") -> list[str]:
        """The keys ``ctr snapshots --snapshotter ckfs ls`` lists (containerd's view)."""
        out = self.ctr("-n", namespace, "snapshots", "--snapshotter", PROXY, "ls").stdout
        return sorted(line.split()[0] for line in out.splitlines()[1:] if line.strip())

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """Kill what tasks left running, then containerd (by PID); remove the sockets."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self._kill_tasks()  # a hung ctr raises: containerd must still stop
                finally:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(_STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
        finally:
            shutil.rmtree(self.sockets, ignore_errors=True)

    def _kill_tasks(self) -> None:
        """Delete every task a failed test left, so no shim outlives containerd."""
        out = self.ctr("tasks", "ls", "-q", check=False, timeout=30).stdout
        for task in out.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=30)
            for _ in range(50):
                if self.ctr("tasks", "delete", task, check=False, timeout=30).returncode == 0:
                    break
                time.sleep(0.1)
        for container in self.ctr("containers", "ls", "-q", check=False, timeout=30).stdout.split():
            self.ctr("containers", "rm", container, check=False, timeout=30)


def cri_pull(address: str, image: str, timeout: float = 120) -> str:
    """Pull *image* through containerd's CRI ImageService; answer the image ref.

    CRI is the client that unpacks through containerd's own unpacker, which
    labels each layer with ``containerd.io/snapshot.ref`` so a proxy
    snapshotter may provide it (``ctr`` 1.6 unpacks without the label). The
    two messages are encoded by hand: CRI's protos are not ckfs's to carry.
    """
    import grpc

    def field(number: int, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload

    request = field(1, field(1, image.encode()))  # PullImageRequest{image: ImageSpec{image}}
    with grpc.insecure_channel(f"unix://{address}") as channel:
        pull = channel.unary_unary("/runtime.v1.ImageService/PullImage")
        reply: bytes = pull(request, timeout=timeout)
    # PullImageResponse{image_ref = 1}: a "sha256:<hex>" fits a one-byte length.
    assert reply[:1] == b"\x0a" and reply[1] == len(reply) - 2, reply
    return reply[2:].decode()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)
