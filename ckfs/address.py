"""Where ckfs keeps its state and where ckfsd listens, by default: one answer
for the daemon, the CLI and ckfsd's clients.

Light on purpose (``os`` only): the CLI asks it on every command to find a
warm daemon and to tell whether that daemon serves the default root
(`UUID_FILE`), without opening any store.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "SYSTEM_SOCKET",
    "UUID_FILE",
    "default_address",
    "default_root",
    "default_socket",
    "socket_path",
    "system_root",
]

#: root's daemon, beside containerd's /run/containerd/containerd.sock.
SYSTEM_SOCKET = Path("/run/ckfs/ckfsd.sock")

#: A state root's identity, as containerd keeps ``<root>/uuid``: what ckfsd
#: answers in Introspection.Server, so a client tells which root it serves.
UUID_FILE = "uuid"


def default_root() -> Path:
    """``$CKFS_ROOT``; else `system_root`."""
    if env := os.environ.get("CKFS_ROOT"):
        return Path(env)
    return system_root()


def system_root() -> Path:
    """The root nobody has to name: ``/var/lib/ckfs`` for root, ``$XDG_DATA_HOME/ckfs`` otherwise.

    Its daemon listens on `default_socket` (containerd's way: one well-known
    socket per host); any other root's in that root (``ckfs.client.root_address``).
    """
    if os.geteuid() == 0:
        return Path("/var/lib/ckfs")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(xdg) / "ckfs"


def default_socket() -> Path:
    """The socket path of this user's default ckfsd.

    root uses `SYSTEM_SOCKET`; anyone else ``$XDG_RUNTIME_DIR/ckfs/ckfsd.sock``
    (their private runtime directory), or, without one (a session without
    logind), ``$XDG_STATE_HOME/ckfs/ckfsd.sock``: private too, where a
    directory named after the uid in /tmp could be made first by someone
    else.
    """
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("XDG_STATE_HOME")
    base = Path(runtime) if runtime else Path.home() / ".local" / "state"
    return base / "ckfs" / "ckfsd.sock"


def default_address() -> str:
    """`default_socket` as a gRPC address, ``unix:///…``."""
    return f"unix://{default_socket()}"


def socket_path(address: str) -> Path:
    """The socket path of a ``unix:`` *address* (or of a bare path).

    Raises:
        ValueError: *address* names another transport (``tcp://``, ...).
    """
    for prefix in ("unix://", "unix:"):
        if address.startswith(prefix):
            return Path(address.removeprefix(prefix))
    if "://" in address:
        raise ValueError(f"{address}: ckfsd listens on unix sockets only")
    return Path(address)
