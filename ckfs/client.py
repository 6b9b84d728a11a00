"""The CLI's side of ckfsd: find a daemon, call it, raise what the local path raises.

The client runs in a short-lived ``ckfs`` process, so it stays light: grpc,
the generated ``_pb2`` modules, `ckfs.errors`, `ckfs.descriptor` and
`ckfs.mount` (for the Mount records it performs), and nothing that opens a
store or starts an event loop (no trio, httpx, sqlite3, content or snapshot
modules); ``tests/test_client.py`` checks that in a fresh interpreter.

Finding a daemon (`discover`):

- an explicit address (``--address`` / ``CKFS_ADDRESS``) must answer, or the
  command fails with `Unavailable` saying where it looked: a user who named
  a daemon does not want a silent local fallback; with a root named too,
  the daemon must serve that root (`Client.check_root`);
- otherwise the root's socket is probed: for the default state root the
  default socket (`ckfs.address`), for a root named by ``--root`` /
  ``CKFS_ROOT`` the socket ``ckfsd --root`` listens on without
  ``--address`` (`root_address`, ``<root>/ckfsd.sock``, the default socket
  for `ckfs.address.system_root`); only if the socket file exists
  (so a machine without ckfsd pays no grpc import at all), with a short
  connect timeout; no answer, or a daemon serving another root (told by
  the root's UUID, `Client.check_root`), means the local path.

Starting a daemon (`start_daemon`): ``ckfs mount`` of a lazy image wants a
long-lived process behind its mount (the serving process is detached
anyway, but indexes, caches and containerd's calls belong to ckfsd), so
when none answers for the root it starts one in the background, logging to
``<root>/ckfsd.log`` and listening on the root's socket, and goes on
through it once it answers.

Errors: a gRPC status comes back as the `ckfs.errors` class of its code
(`ckfs.errors.from_grpc_code`) with the server's one-line message, so
``ckfs`` prints the same line and exits the same way with or without ckfsd.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ckfs.errors import CkfsError, Unavailable, from_grpc_code

if TYPE_CHECKING:
    import grpc

    from ckfs.api.v1 import ckfs_pb2
    from ckfs.mount import Mount
    from ckfs.progress import BlobProgress

__all__ = [
    "CONNECT_TIMEOUT",
    "PROBE_TIMEOUT",
    "Client",
    "discover",
    "pull_options",
    "root_address",
    "rpc_errors",
    "start_daemon",
    "stop_daemon",
    "summary_json",
]

#: How long an explicitly named daemon may take to accept the connection:
#: a local socket answers in milliseconds, a daemon still starting in well
#: under a second; longer means it is wedged and the user should hear so.
CONNECT_TIMEOUT = 5.0

#: How long the default socket is probed when no daemon was named. A live
#: ckfsd answers a local connect in ~1 ms; a stale socket file is refused at
#: once. The bound only matters for a daemon that accepts but never answers,
#: and then the local path is the better choice anyway.
PROBE_TIMEOUT = 0.5

#: The containerd namespace every request carries: ckfs has one. (The
#: bridge's DEFAULT_NAMESPACE and NAMESPACE_KEY; that module loads trio.)
NAMESPACE = "default"
NAMESPACE_KEY = "containerd-namespace"

#: Seconds a ckfsd started by `start_daemon` may take to answer: interpreter
#: start and grpc import take about a second, the recovery of a root with
#: lazy mounts (starting the FUSE server) a few more on a loaded machine.
START_TIMEOUT = 60.0

#: The socket's name in a root, for a ckfsd started on a root named by
#: ``--root`` / ``CKFS_ROOT``.
ROOT_SOCKET = "ckfsd.sock"

#: The log of a ckfsd started by `start_daemon`, in its root.
ROOT_LOG = "ckfsd.log"

#: Longest unix socket path (``sun_path`` less its NUL), less the room
#: ckfsd's atomic bind needs for its temporary name beside it
#: (``.<name>.<pid>.tmp``).
_SOCKET_PATH_MAX = 107 - 20

_T = TypeVar("_T")


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """Re-raise a failed RPC as the ckfs error its status code names.

    The message is the server's details (already the one line the local
    path would print); a status without details names the code instead.
    """
    import grpc

    try:
        yield
    except grpc.RpcError as e:
        # Every RpcError grpc raises is also a grpc.Call, which says the status.
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = (e.details() if hasattr(e, "details") else None) or ""
        ok = code is grpc.StatusCode.OK
        cls = CkfsError if ok else from_grpc_code(code.name, details)
        raise cls(details or f"ckfsd answered {code.name}") from None


def _target(address: str) -> str:
    """*address* as grpc spells it: a bare path becomes ``unix://PATH``."""
    if "://" in address or address.startswith("unix:"):
        return address
    return f"unix://{os.path.abspath(address)}"


class Client:
    """One channel to ckfsd and the calls the CLI makes over it.

    Every method raises the `ckfs.errors` class of the status it got back
    (see `rpc_errors`); `Unavailable` when the daemon went away mid-call.
    """

    def __init__(self, channel: grpc.Channel, address: str) -> None:
        self.channel = channel
        self.address = address
        self._metadata = ((NAMESPACE_KEY, NAMESPACE),)
        self._uuid: str | None = None

    @classmethod
    def connect(
        cls, address: str, *, timeout: float = CONNECT_TIMEOUT, probe: bool = True
    ) -> Client:
        """A client for the ckfsd at *address*, once it answers.

        Without *probe*, a unix socket that accepts a connection is enough:
        the command's own RPC is the first call, and a re-pull of a present
        image does not pay a round trip (and the Introspection modules) that
        asked nothing it uses. Any other address is always probed, as
        nothing else has reached it.

        The readiness probe is an RPC with a deadline, the one `check_root`
        needs anyway (`server_uuid`), not `grpc.channel_ready_future`:
        that leaves grpc polling the channel's state in a thread, which
        closing the channel then waits out (~0.2 s), and costs a
        connection handshake before the first real call pays it again.

        Raises:
            Unavailable: the socket is missing or refuses, or the daemon did
                not answer within *timeout*.
        """
        unix = address.startswith("unix:") or "://" not in address
        if unix:
            _check_accepts(address)
        import grpc

        client = cls(grpc.insecure_channel(_target(address), options=_CHANNEL_OPTIONS), address)
        if unix and not probe:
            return client
        try:
            client.server_uuid(timeout=timeout)
        except Unavailable:
            client.close()
            raise Unavailable(f"ckfsd at {address} does not answer") from None
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        self.channel.close()

    def call_options(self) -> dict[str, Any]:
        """Keyword arguments every stub call takes: the namespace metadata."""
        return {"metadata": self._metadata}

    def call(self, rpc: Callable[..., _T], request: object) -> _T:
        """One unary *rpc* in the namespace, a failure raised as its ckfs error (`rpc_errors`)."""
        with rpc_errors():
            return rpc(request, **self.call_options())

    def stream(self, rpc: Callable[..., Iterator[_T]], request: object) -> list[_T]:
        """A server-streaming *rpc* read to its end: a stream fails while it is read."""
        with rpc_errors():
            return list(rpc(request, **self.call_options()))

    def server_uuid(self, *, timeout: float | None = None) -> str:
        """The UUID of the state root the daemon serves (Introspection.Server), asked once.

        Raises:
            Unavailable: no answer (within *timeout*, if given).
        """
        if self._uuid is None:
            from google.protobuf import empty_pb2

            from ckfs.api.services.introspection.v1 import introspection_pb2_grpc

            stub = introspection_pb2_grpc.IntrospectionStub(self.channel)
            with rpc_errors():  # DEADLINE_EXCEEDED comes back as Unavailable
                answer = stub.Server(
                    empty_pb2.Empty(), timeout=timeout, wait_for_ready=True, **self.call_options()
                )
            self._uuid = answer.uuid
        return self._uuid

    def check_root(self, root: Path) -> None:
        """Refuse a daemon that serves a state root other than *root*.

        Roots are told apart by the UUID a daemon keeps in its root
        (`ckfs.services.introspection.server_uuid`): asked first, so the
        daemon writes it if it never had, then read from *root* here. A root
        this process cannot read is taken on trust.

        Raises:
            FailedPrecondition: *root* has no UUID or another one.
        """
        from ckfs.address import UUID_FILE
        from ckfs.errors import FailedPrecondition

        theirs = self.server_uuid()
        try:
            ours = (root / UUID_FILE).read_text().strip()
        except FileNotFoundError:
            ours = ""
        except OSError:
            return
        if ours != theirs:
            raise FailedPrecondition(
                f"ckfsd at {self.address} serves another state root than {root} "
                "(give the root it serves, or --no-daemon)"
            )

    @property
    def _ckfs(self) -> Any:
        from ckfs.api.v1 import ckfs_pb2_grpc

        return ckfs_pb2_grpc.CkfsStub(self.channel)

    def pull(
        self,
        ref: str,
        *,
        register: bool,
        options: ckfs_pb2.PullOptions,
        on_event: Callable[[BlobProgress], None],
    ) -> dict[str, Any]:
        """Pull *ref* through ckfsd, telling *on_event* about each blob as the daemon does.

        Each blob is one `ckfs.progress.BlobProgress` updated in place, as
        the local fetcher's are, so the CLI's displays draw both alike: the
        daemon's progress ticks update its bytes between state changes
        without calling *on_event*, as the local fetcher does.

        Returns:
            The summary, as `ckfs.pull.PullReport.to_json` gives it.

        Raises:
            As `ckfs.pull.pull`, with the daemon's message.
        """
        from ckfs.api.v1 import ckfs_pb2

        request = ckfs_pb2.PullRequest(ref=ref, register=register, options=options)
        blobs: dict[tuple[str, str], BlobProgress] = {}
        summary: dict[str, Any] | None = None
        with rpc_errors():
            # Read to the stream's end, not just to the summary: leaving
            # earlier cancels the call, and ckfsd logs the pull as CANCELLED.
            for event in self._ckfs.Pull(request, **self.call_options()):
                if event.HasField("summary"):
                    summary = summary_json(event.summary)
                    continue
                p = _progress(blobs, event.blob)
                if not event.blob.progress_only:  # a tick only moves the bars
                    on_event(p)
        if summary is None:
            what = f"ckfsd at {self.address} ended the pull of {ref} without a summary"
            raise Unavailable(what)
        return summary

    def mounts(
        self,
        ref: str,
        key: str,
        *,
        snapshotter: str,
        readonly: bool,
        options: ckfs_pb2.PullOptions,
    ) -> list[Mount]:
        """A new snapshot *key* on the image *ref*, made by ckfsd: its Mount records.

        Raises:
            As `ckfs.provide.ensure_rootfs`.
        """
        from ckfs.api.convert_types import mounts_from_proto
        from ckfs.api.v1 import ckfs_pb2

        request = ckfs_pb2.MountsRequest(
            ref=ref, key=key, readonly=readonly, snapshotter=snapshotter, options=options
        )
        return mounts_from_proto(self.call(self._ckfs.Mounts, request).mounts)

    def unmount(self, key: str, snapshotter: str = "") -> None:
        """Remove the snapshot *key* (from every snapshotter holding it, if none is named).

        Raises:
            NotFound: no snapshotter has it.
            FailedPrecondition: it has children.
        """
        from ckfs.api.v1 import ckfs_pb2

        self.call(self._ckfs.Unmount, ckfs_pb2.UnmountRequest(key=key, snapshotter=snapshotter))

    def gc(self, *, dry_run: bool, ingest_expiry: float | None) -> dict[str, Any]:
        """Collect through ckfsd; what ``ckfs gc --json`` prints."""
        from ckfs.api.v1 import ckfs_pb2

        request = ckfs_pb2.GCRequest(dry_run=dry_run, ingest_expiry=ingest_expiry)
        r = self.call(self._ckfs.GC, request)
        return {
            "dry_run": dry_run,
            "blobs": list(r.blobs),
            "bytes": r.bytes,
            "snapshots": {n: list(keys.keys) for n, keys in sorted(r.snapshots.items())},
            "directories": list(r.directories),
            "ingests": list(r.ingests),
            "ingest_bytes": r.ingest_bytes,
            "layers": list(r.layers),
            "errors": list(r.errors),
        }


def pull_options(
    *,
    platform: str | None = None,
    hosts_dirs: Sequence[os.PathLike[str] | str] = (),
    user: str | None = None,
    timeout: float | None = None,
    **flags: Any,
) -> ckfs_pb2.PullOptions:
    """The CLI's registry flags as the request's options, as `ckfs_cli.options.pull_options`.

    The platform travels as typed (the daemon parses it, with the local
    path's message). ``--hosts-dir`` is refused here with ckfsd's own words
    (`ckfs.options.DAEMON_HOSTS_DIRS`): the daemon reads only its own
    registry configuration.

    Raises:
        InvalidArgument: *hosts_dirs* were given.
    """
    from ckfs.api.v1 import ckfs_pb2

    if hosts_dirs:
        from ckfs.errors import InvalidArgument
        from ckfs.options import DAEMON_HOSTS_DIRS

        raise InvalidArgument(DAEMON_HOSTS_DIRS)
    return ckfs_pb2.PullOptions(
        platform=platform or "",
        user=user or "",
        timeout=timeout,
        **flags,
    )


def summary_json(s: ckfs_pb2.PullSummary) -> dict[str, Any]:
    """A Pull's last event as `ckfs.pull.PullReport.to_json` gives it."""
    from ckfs.api.convert_types import descriptor_from_proto

    return {
        "event": "summary",
        "reference": s.reference,
        "name": s.name if s.HasField("name") else None,
        "target": descriptor_from_proto(s.target, where="pull target").to_json(),
        "blobs": s.blobs,
        "fetched_blobs": s.fetched_blobs,
        "fetched_bytes": s.fetched_bytes,
        "skipped_blobs": s.skipped_blobs,
        "nondistributable": list(s.nondistributable),
        "network": s.network,
        "seconds": s.seconds,
    }


def _progress(
    blobs: dict[tuple[str, str], BlobProgress], event: ckfs_pb2.BlobEvent
) -> BlobProgress:
    """The blob *event* is about, updated to it: one object per blob, as the fetcher keeps.

    Raises:
        InvalidArgument: a malformed descriptor or a state this client does not know.
    """
    from ckfs.api.convert_types import descriptor_from_proto
    from ckfs.api.v1 import ckfs_pb2
    from ckfs.errors import InvalidArgument
    from ckfs.progress import BlobProgress, BlobState

    desc = descriptor_from_proto(event.descriptor, where="pull event")
    try:
        state = BlobState(ckfs_pb2.BlobState.Name(event.state).lower())
    except ValueError:
        what = f"pull event for {desc.digest}: unknown state {event.state}"
        raise InvalidArgument(what) from None
    key = (str(desc.digest), event.kind)
    p = blobs.get(key)
    if p is None:
        p = blobs[key] = BlobProgress(desc=desc, kind=event.kind)
    p.state = state
    p.offset, p.fetched, p.note = event.offset, event.fetched, event.note
    return p


#: The client sends and receives what the CLI handles in memory anyway;
#: gRPC's default 4 MiB receive limit would cut a long `snapshots ls`.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    # A unix socket has no proxy; without this grpc reads proxy variables.
    ("grpc.enable_http_proxy", 0),
    # A connection that never completes its handshake fails the call after
    # CONNECT_TIMEOUT rather than grpc's 20 s: an unprobed command's first
    # RPC (`Client.connect`) is what meets a daemon that accepts but is wedged.
    ("grpc.min_reconnect_backoff_ms", int(CONNECT_TIMEOUT * 1000)),
]


def discover(address: str | None, *, root_given: bool, root: Path | None = None) -> Client | None:
    """The ckfsd this command should use, or None for the local path.

    Args:
        address: ``--address`` / ``CKFS_ADDRESS``, if the user gave one.
        root_given: the user chose a state root (``--root`` /
            ``CKFS_ROOT``). The default socket serves the default root, so
            a command on another root never goes to it unasked.
        root: that root, with *address*: the daemon must serve it
            (`Client.check_root`), or the command would act on another.

    Raises:
        Unavailable: *address* was given and does not answer.
        FailedPrecondition: the daemon at *address* serves a root other than *root*.
    """
    if address:
        # Nothing to ask the daemon before the command without a root to check.
        client = Client.connect(address, probe=root is not None)
        return client if root is None else _serving(client, root)
    from ckfs.address import default_address, default_root

    if root_given:
        return None if root is None else _probe(root_address(root), root)
    return _probe(default_address(), default_root())


def _probe(address: str, root: Path) -> Client | None:
    """The ckfsd at *address* if it answers and serves *root*, else None."""
    from ckfs.errors import FailedPrecondition

    if not _accepts(address):
        return None
    try:
        client = Client.connect(address, timeout=PROBE_TIMEOUT)
    except Unavailable:
        return None
    try:
        client.check_root(root)
    except (FailedPrecondition, Unavailable):
        client.close()  # another root's daemon: never act on it unasked
        return None
    except BaseException:
        client.close()
        raise
    return client


def root_address(root: Path) -> str:
    """Where the ckfsd of the root *root* listens unless told ``--address``.

    ``<root>/ckfsd.sock``: found from the root alone, by every command on
    it and by ``ckfsd --root`` started by hand or by `start_daemon`. The
    root nobody has to name (`ckfs.address.system_root`) keeps the default
    socket, where containerd's configuration points. A root whose path
    leaves no room for a socket name (unix socket paths are short) gets one
    named after its path's hash instead, beside this user's default socket.
    """
    import hashlib

    from ckfs.address import default_address, default_socket, system_root

    if os.path.abspath(root) == os.path.abspath(system_root()):
        return default_address()
    path = Path(os.path.abspath(root)) / ROOT_SOCKET
    if len(os.fsencode(path)) > _SOCKET_PATH_MAX:
        name = hashlib.sha256(os.fsencode(path.parent)).hexdigest()[:16]
        path = default_socket().parent / "roots" / f"{name}.sock"
    return f"unix://{path}"


def start_daemon(root: Path, *, timeout: float = START_TIMEOUT) -> Client | None:
    """Start a ckfsd for *root* in the background and connect to it once it answers.

    The daemon runs in a session of its own (it outlives this command, as
    the FUSE server does), its output appended to ``<root>/ckfsd.log``; it
    listens on the root's socket (`root_address`). It says it is
    ready on a pipe (``--ready-fd``). If another command started one at the
    same moment, ours exits (the root is taken) and theirs is used. If a
    ckfsd serves the root on another socket (one the user started with its
    own ``--address``, not named to this command), None: the local path,
    as without any daemon.

    Raises:
        Unavailable: no daemon answered within *timeout* (the message
            quotes the log's last line).
    """
    import select
    import subprocess
    import sys
    import time

    address = root_address(root)
    root.mkdir(parents=True, exist_ok=True)
    log = root / ROOT_LOG
    deadline = time.monotonic() + timeout
    read_fd, write_fd = os.pipe()
    try:
        with log.open("ab") as out:
            command = [sys.executable, "-m", "ckfsd", "--root", str(root), "--address", address]
            daemon = subprocess.Popen(
                [*command, "--ready-fd", str(write_fd)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(write_fd,),
                start_new_session=True,
                cwd="/",
            )
        os.close(write_fd)
        write_fd = -1
        ready = select.select([read_fd], [], [], timeout)[0] and os.read(read_fd, 64)
        if not ready:  # reaped, so its PID in the locks it held reads as gone
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(timeout=5)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    while True:
        try:
            client = Client.connect(address, timeout=max(deadline - time.monotonic(), 0.1))
        except Unavailable:
            # Ours failed. Another daemon holding the root and this socket is
            # one a racing command started: wait for it. One holding the
            # root only listens elsewhere: not ours to find.
            if not ready and _held(root / "locks" / "ckfsd"):
                if not _held(_socket_lock(address)):
                    return None
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
            raise Unavailable(
                f"ckfsd for {root} did not start: {_last_line(log)} (see {log})"
            ) from None
        return _serving(client, root)


def _serving(client: Client, root: Path) -> Client:
    """*client*, once it says it serves *root* (`Client.check_root`); closed if not."""
    try:
        client.check_root(root)
    except BaseException:
        client.close()
        raise
    return client


def stop_daemon(root: Path, *, grace: float = 15.0) -> bool:
    """Stop the ckfsd serving *root* (started by `start_daemon` or by hand), by its PID.

    The PID is the one in the root's ``locks/ckfsd``, which the daemon holds
    while it runs: SIGTERM (it finishes its RPCs), SIGKILL after *grace*.

    Returns:
        Whether a daemon was running.
    """
    import signal
    import time

    from ckfs.locks import try_lock

    lock = root / "locks" / "ckfsd"
    if not lock.exists():
        return False
    fd = try_lock(lock)
    if fd is not None:  # nobody holds it: no daemon
        os.close(fd)
        return False
    deadline = time.monotonic() + grace
    while not (text := lock.read_text().strip()):  # locked, PID not yet written
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    pid = int(text)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (fd := try_lock(lock)) is None:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline += grace
        time.sleep(0.05)
    os.close(fd)
    return True


def _held(lock: Path) -> bool:
    """Whether a live process holds the ckfsd lock *lock*, by the PID in it.

    Read, not tried: taking the lock even for a moment could refuse the
    very daemon being waited for.
    """
    try:
        pid = int(lock.read_text())
    except (OSError, ValueError):
        return False
    return pid > 0 and os.path.exists(f"/proc/{pid}")


def _socket_lock(address: str) -> Path:
    """The lock a ckfsd listening on *address* holds (``ckfsd.listen.socket_lock``)."""
    from ckfs.address import socket_path

    path = socket_path(address)
    return path.with_name(f".{path.name}.lock")


def _last_line(path: Path) -> str:
    """The last line of the log *path*, for an error message."""
    try:
        lines = path.read_bytes()[-4096:].decode(errors="replace").strip().splitlines()
    except OSError as e:
        return e.strerror or str(e)
    return lines[-1] if lines else "no output"


def _accepts(address: str) -> bool:
    """Whether the unix socket *address* accepts a connection (`_check_accepts`)."""
    try:
        _check_accepts(address)
    except Unavailable:
        return False
    return True


def _check_accepts(address: str) -> None:
    """Connect to the unix socket *address* once, without grpc.

    A missing or stale socket (a daemon that died) is refused at once,
    where a grpc channel would retry with backoff until its timeout; and a
    machine without ckfsd never imports grpc at all.

    Raises:
        Unavailable: the socket is missing or refuses, saying which and why.
    """
    import socket

    from ckfs.address import socket_path

    path = socket_path(address)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(PROBE_TIMEOUT)
        try:
            s.connect(str(path))
        except OSError as e:
            raise Unavailable(f"ckfsd at {address} does not answer: {e.strerror or e}") from None
