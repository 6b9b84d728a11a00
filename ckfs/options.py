"""What a pull may do, as one value every face passes on unchanged.

The CLI's registry flags and ckfsd's Pull and Mounts requests both become a
`PullOptions`, which `ckfs.provide`, `ckfs.pull` and `ckfs.unpack` take as
is: an option added here reaches every path at once. This module imports
nothing beyond the standard library, so a client that only forwards options
to ckfsd stays light.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ckfs.remotes import DEFAULT_CONCURRENCY, DEFAULT_MAX_BLOB_SIZE

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from ckfs.descriptor import Platform

__all__ = [
    "DAEMON_HOSTS_DIRS",
    "DEFAULTS",
    "MAX_CONCURRENT",
    "PullOptions",
    "parse_quantity",
    "parse_size",
]

#: Why ckfsd refuses a request that names hosts directories, and the CLI a
#: ``--hosts-dir`` on the way to ckfsd: root's daemon reading a hosts.toml a
#: caller chose would read the CA, certificate and key paths in it for
#: anyone who can reach its socket. ckfsd reads its own configuration only.
DAEMON_HOSTS_DIRS = (
    "hosts directories: ckfsd uses its own registry configuration "
    "(<its root>/certs.d, /etc/containerd/certs.d); --no-daemon reads others"
)

#: The most transfers one pull may run at once. Each holds a connection, an
#: open ingest with its lock and a buffer in ckfsd for as long as it runs,
#: and the wire's uint32 would let one request ask for billions; past a few
#: dozen a registry only throttles more (the default is 6). The CLI's
#: ``--max-concurrent`` has the same bound, so both faces refuse alike.
MAX_CONCURRENT = 64


@dataclasses.dataclass(frozen=True, slots=True)
class PullOptions:
    """How a pull reaches the registry and how much it may take.

    Attributes:
        platform: the manifest to take from an index; None for this host.
        all_platforms: fetch every manifest of an index (``ckfs pull`` only;
            an unpack needs one).
        offline: never contact the registry; everything must be present.
        hosts_dirs: ``certs.d`` directories for mirrors and TLS
            (`ckfs.remotes.hosts.load_hosts`). Empty means the state root's
            defaults (`ckfs.remotes.hosts.default_hosts_dirs`) in
            `ckfs.provide`; `ckfs.pull.pull`, which knows no root, reads
            only those given. Never from a ckfsd client (`DAEMON_HOSTS_DIRS`).
        plain_http: plain HTTP when no hosts.toml says otherwise.
        user: ``user:password``, overriding Docker's ``config.json``. Left
            out of the repr, so a logged request never shows it.
        max_concurrent: layers transferred at once (ckfsd takes at most
            `MAX_CONCURRENT`).
        timeout: seconds the resolve, and each manifest and blob, may take
            with all retries and resumes; None for `ckfs.remotes.time_budget`.
        max_blob_size: refuse a blob whose descriptor claims more bytes,
            before downloading it.
        lazy: ``ckfs pull --lazy``: fetch no layer that can be read by
            range (eStargz, uncompressed tar) and index every layer
            (`ckfs.lazy.pull_lazy`); mounts with the ``fuse`` snapshotter
            are lazy whatever this says.
    """

    platform: Platform | None = None
    all_platforms: bool = False
    offline: bool = False
    hosts_dirs: tuple[Path, ...] = ()
    plain_http: bool = False
    user: str | None = dataclasses.field(default=None, repr=False)
    max_concurrent: int = DEFAULT_CONCURRENCY
    timeout: float | None = None
    max_blob_size: int = DEFAULT_MAX_BLOB_SIZE
    lazy: bool = False


#: Every option at its default: a pull of this host's platform, online.
#: Frozen, so one value serves as every function's default argument.
DEFAULTS = PullOptions()


def _byte_units() -> dict[str, int]:
    """``kB``/``MB``/``GB``/``TB`` (and bare ``k``..``t``) 1000-based, ``KiB``.. 1024-based."""
    units = {"": 1, "b": 1}
    for power, letter in enumerate("kmgt", 1):
        units[letter] = units[f"{letter}b"] = 1000**power
        units[f"{letter}i"] = units[f"{letter}ib"] = 1024**power
    return units


_BYTE_UNITS = _byte_units()


def parse_size(text: str) -> int:
    """Bytes from *text*: a number with an optional unit (``500MB``, ``8GiB``, ``1.5G``).

    One spelling for every face: the CLI's ``--max-blob-size``, ckfsd's
    ``--cache-max`` and ``CKFS_CACHE_MAX``.

    Raises:
        ValueError: not a non-negative finite number with a known unit.
    """
    try:
        return int(parse_quantity(text, _BYTE_UNITS))
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a size (bytes, or e.g. 500MB, 8GiB)") from None


def parse_quantity(text: str, units: Mapping[str, int]) -> float:
    """*text*, a non-negative number with an optional unit suffix (a key of
    *units*, lower case), in base units: sizes (`parse_size`) and the CLI's
    durations read alike.

    Raises:
        ValueError: not a non-negative finite number, or an unknown unit.
    """
    text = text.strip()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = text[len(number) :].lower()
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in units or not 0 <= amount < float("inf"):
        raise ValueError(f"{text!r}: not a number with a known unit")
    return amount * units[unit]
