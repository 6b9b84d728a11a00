"""Which servers to ask for a registry's images: containerd's ``hosts.toml``.

A reference names a registry (``docker.io``, ``127.0.0.1:5000``); the bytes
may come from elsewhere: a pull-through mirror, a server on another port or
path, a host needing its own CA or client certificate. containerd answers
"where do I send requests for registry X?" with a directory per registry
holding ``hosts.toml``; ckfs reads the same files so one configuration serves
``ctr``, ``nerdctl``, the CRI plugin and ckfs alike.

Lookup, as containerd's ``HostDirFromRoot`` (``config_unix.go``): for each
directory of *hosts_dirs* in order, the first of these entries that exists
is the registry's configuration directory, and the first directory holding
any of them wins:

1. ``<host>_<port>_`` (only when the registry has a port; ``:`` is awkward
   in paths on some systems),
2. ``<host>:<port>`` or ``<host>`` as written,
3. ``_default``, which applies to every registry without its own entry.

In that directory, ``hosts.toml`` lists ``[host."<url>"]`` tables, the
mirrors, tried in file order, then the top-level ``server`` (the upstream;
defaulted when absent). Without ``hosts.toml`` the directory is read the
Docker way: ``*.crt`` are CA certificates, ``*.cert`` client certificates
with their ``*.key``.

Defaults, as containerd's ``ConfigureHosts``: ``docker.io`` is served by
``https://registry-1.docker.io``; loopback registries (``localhost``,
``127.0.0.0/8``, ``::1``) use plain HTTP unless their port is 443 or absent,
where containerd tries HTTPS without verification; every other registry uses
HTTPS. ``plain_http`` makes the defaulted server plain HTTP, as
``ctr --plain-http`` does; servers a ``hosts.toml`` names keep their scheme.

Deliberate differences from containerd: a malformed ``hosts.toml`` is an
error naming the file (containerd logs it and silently falls back to the
certificate files, which hides the mistake), and loopback servers get plain
HTTP directly instead of an HTTPS attempt first.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import posixpath
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ckfs import __version__
from ckfs.errors import InvalidArgument
from ckfs.reference import DEFAULT_DOMAIN, DOCKER_HUB_HOST

if TYPE_CHECKING:
    import ssl

__all__ = [
    "CAPABILITIES",
    "DEFAULT_CAPABILITIES",
    "SYSTEM_HOSTS_DIR",
    "USER_AGENT",
    "RegistryHost",
    "default_hosts_dirs",
    "is_localhost",
    "load_hosts",
    "ssl_context",
]

_log = logging.getLogger(__name__)

#: What a host may be asked to do. ``resolve`` (tag → digest) is the one that
#: matters for trust: a mirror without it only serves content by digest, so a
#: stale or hostile mirror cannot make a tag point somewhere else.
#: ``referrers`` is accepted because newer containerd writes it.
CAPABILITIES = frozenset({"pull", "resolve", "push", "referrers"})

#: A host without a ``capabilities`` key may do everything, as in containerd.
DEFAULT_CAPABILITIES = frozenset({"pull", "resolve", "push"})

#: containerd's default configuration directory; shared so one file serves both.
SYSTEM_HOSTS_DIR = Path("/etc/containerd/certs.d")

#: The API root every registry serves under (distribution spec).
API_PATH = "/v2"

_HOSTS_FILE = "hosts.toml"
_DEFAULT_DIR = "_default"

# Go's time.ParseDuration units, for ``dial_timeout``.
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")

#: Sent with every request so registry operators can tell ckfs apart.
USER_AGENT = f"ckfs/{__version__}"


@dataclasses.dataclass(frozen=True)
class RegistryHost:
    """One server to send a registry's requests to, and how.

    Attributes:
        host: ``host[:port]`` to connect to: ``127.0.0.1:5000``,
            ``registry-1.docker.io``.
        scheme: ``https`` or ``http``.
        path: The API root, ``/v2`` unless ``override_path`` gave another
            (possibly empty) one; requests go to ``<path>/<repository>/...``.
        capabilities: What this host may be asked: ``pull`` (fetch by
            digest), ``resolve`` (tag → digest), ``push``.
        skip_verify: Do not verify the server's TLS certificate.
        ca: Extra CA certificate files (PEM) to trust for this host.
        client: Client certificates: (certificate file, key file or None when
            the key is in the certificate file).
        headers: Extra request headers, each with one or more values.
        override_path: ``path`` is the API root as configured, not
            ``.../v2``; for registries that serve the API elsewhere.
        mirror_of: The registry this host stands in for when it is not that
            registry itself; requests then carry ``?ns=<registry>`` so a
            shared mirror knows which upstream namespace is meant.
        dial_timeout: Seconds to wait for a connection (``dial_timeout`` in
            hosts.toml), or None for the client's default.
    """

    host: str
    scheme: str = "https"
    path: str = API_PATH
    capabilities: frozenset[str] = DEFAULT_CAPABILITIES
    skip_verify: bool = False
    ca: tuple[Path, ...] = ()
    client: tuple[tuple[Path, Path | None], ...] = ()
    headers: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    override_path: bool = False
    mirror_of: str | None = None
    dial_timeout: float | None = None

    def __hash__(self) -> int:
        return hash((self.host, self.scheme, self.path))

    @property
    def base_url(self) -> str:
        """``scheme://host/path``, the prefix of every request to this host."""
        return f"{self.scheme}://{self.host}{self.path}"

    @property
    def has_tls_config(self) -> bool:
        """Whether this host needs its own TLS settings (CA, client cert, no verify)."""
        return self.scheme == "https" and bool(self.skip_verify or self.ca or self.client)

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def header_fields(self) -> dict[str, str]:
        """The configured headers as request fields, several values joined by commas.

        They go to the host and to its token server alike, as in containerd
        (``WithAuthHeader``): some proxies need them on every request.
        """
        return {k: ", ".join(v) for k, v in self.headers.items()}


def ssl_context(host: RegistryHost) -> ssl.SSLContext:
    """The TLS settings *host* asks for: its extra CAs, client certificates, skip_verify.

    Raises:
        InvalidArgument: a CA or client certificate file cannot be loaded.
    """
    import ssl  # only HTTPS hosts pay for it

    ctx = ssl.create_default_context()
    try:
        for ca in host.ca:
            ctx.load_verify_locations(cafile=str(ca))
        for cert, key in host.client:
            ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgument(f"registry host {host.host}: cannot load TLS files: {e}") from None
    if host.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def default_hosts_dirs(root: Path) -> list[Path]:
    """Where ckfs looks for ``certs.d`` trees: its own, then containerd's.

    ckfs's own directory comes first so a user can override the system-wide
    configuration for ckfs alone.
    """
    return [root / "certs.d", SYSTEM_HOSTS_DIR]


def is_localhost(registry: str) -> bool:
    """Whether *registry* (``host[:port]``) is this machine (containerd ``IsLocalhost``)."""
    host, _port = _split_host_port(registry)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_hosts(
    registry: str, *, hosts_dirs: Sequence[Path], plain_http: bool = False
) -> list[RegistryHost]:
    """The servers to try for *registry*, in order: mirrors first, upstream last.

    Args:
        registry: The reference's domain as written: ``docker.io``,
            ``127.0.0.1:5000``, ``[::1]:5000``.
        hosts_dirs: ``certs.d`` directories to search, first match wins (see
            the module docstring for the lookup order within each).
        plain_http: Use plain HTTP for the defaulted upstream server.

    Returns:
        The hosts in the order to try them. It may be empty when a
        ``hosts.toml`` deliberately configures no endpoint.

    Raises:
        InvalidArgument: the registry's ``hosts.toml`` is not valid TOML, has
            a value of the wrong type, an unknown capability, a server URL
            that is not http(s), or a malformed ``dial_timeout``; the message
            names the file.
    """
    hosts: list[RegistryHost] | None = None
    hosts_dir = _find_hosts_dir(registry, hosts_dirs)
    if hosts_dir is not None:
        _log.debug("registry %s: using host directory %s", registry, hosts_dir)
        hosts = _load_hosts_dir(hosts_dir)
    if hosts is None:
        hosts = [RegistryHost(host="")]
    if hosts and not hosts[-1].host:
        hosts[-1] = _default_server(registry, hosts[-1], plain_http=plain_http)
    return [_with_mirror(registry, h) for h in hosts]


# -- lookup --------------------------------------------------------------------


def _split_host_port(registry: str) -> tuple[str, str]:
    """Split ``host[:port]`` / ``[v6]:port`` into host (without brackets) and port."""
    if registry.startswith("["):
        end = registry.find("]")
        if end != -1:
            rest = registry[end + 1 :]
            return registry[1:end], rest[1:] if rest.startswith(":") else ""
    host, sep, port = registry.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, port
    return registry, ""


def _host_directory(registry: str) -> str:
    """containerd's ``hostDirectory``: ``host:port`` → ``host_port_``."""
    idx = registry.rfind(":")
    if idx > 0:
        return f"{registry[:idx]}_{registry[idx + 1 :]}_"
    return registry


def _candidates(registry: str) -> list[str]:
    names = []
    mangled = _host_directory(registry)
    if mangled != registry:
        names.append(mangled)
    names += [registry, _DEFAULT_DIR]
    return names


def _find_hosts_dir(registry: str, hosts_dirs: Sequence[Path]) -> Path | None:
    for root in hosts_dirs:
        for name in _candidates(registry):
            candidate = root / name
            if candidate.exists():
                return candidate
    return None


def _load_hosts_dir(hosts_dir: Path) -> list[RegistryHost]:
    hosts_file = hosts_dir / _HOSTS_FILE
    try:
        data = hosts_file.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as e:
        raise InvalidArgument(f"{hosts_file}: cannot read: {e.strerror}") from None
    if not data:
        return [_load_cert_files(hosts_dir)]
    return _parse_hosts_file(hosts_file, data)


def _load_cert_files(hosts_dir: Path) -> RegistryHost:
    """Docker's ``certs.d`` layout: ``*.crt`` CAs, ``*.cert`` + ``*.key`` pairs."""
    ca: list[Path] = []
    client: list[tuple[Path, Path | None]] = []
    if hosts_dir.is_dir():
        for entry in sorted(hosts_dir.iterdir()):
            if entry.is_dir():
                continue
            if entry.name.endswith(".crt"):
                ca.append(entry)
            elif entry.name.endswith(".cert"):
                key = entry.with_name(entry.name[: -len(".cert")] + ".key")
                client.append((entry, key if key.exists() else None))
    return RegistryHost(host="", ca=tuple(ca), client=tuple(client))


# -- hosts.toml ------------------------------------------------------------------


def _parse_hosts_file(hosts_file: Path, data: bytes) -> list[RegistryHost]:
    where = str(hosts_file)
    import tomllib  # only when a hosts.toml exists

    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"{where}: invalid TOML: {e}") from None
    mirrors = doc.get("host", {})
    if not isinstance(mirrors, dict):
        raise InvalidArgument(f"{where}: [host] must be a table of hosts")
    base = hosts_file.parent
    hosts = []
    # tomllib keeps tables in the order they first appear, which is the
    # order containerd's getSortedHosts reads them: mirrors are tried so.
    for url, table in mirrors.items():
        if not isinstance(table, dict):
            raise InvalidArgument(f"{where}: host {url!r} must be a table")
        hosts.append(_parse_host(f"{where}: host {url!r}", url, base, table))
    server = doc.get("server", "")
    if not isinstance(server, str):
        raise InvalidArgument(f"{where}: server must be a string")
    top = {k: v for k, v in doc.items() if k not in ("host", "server")}
    hosts.append(_parse_host(where, server, base, top))
    return hosts


def _parse_host(where: str, server: str, base: Path, table: dict[str, Any]) -> RegistryHost:
    override_path = table.get("override_path", False)
    if not isinstance(override_path, bool):
        raise InvalidArgument(f"{where}: override_path must be true or false")
    scheme, host, path = "", "", API_PATH
    if server:
        if "://" not in server:
            server = "https://" + server
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidArgument(f"{where}: server {server!r} is not an http(s) URL")
        scheme, host = parts.scheme, parts.netloc
        if parts.path:
            path = posixpath.normpath(parts.path)
            if path == "/":
                path = ""
            if not path.endswith(API_PATH) and not override_path:
                path += API_PATH
        elif override_path:
            path = ""

    skip_verify = table.get("skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise InvalidArgument(f"{where}: skip_verify must be true or false")

    return RegistryHost(
        host=host,
        scheme=scheme or "https",
        path=path,
        capabilities=_capabilities(where, table.get("capabilities")),
        skip_verify=skip_verify,
        ca=tuple(_abs(base, p) for p in _strings(where, "ca", table.get("ca"))),
        client=_client_pairs(where, base, table.get("client")),
        headers=_headers(where, table.get("header")),
        override_path=override_path,
        dial_timeout=_duration(where, table.get("dial_timeout")),
    )


def _capabilities(where: str, value: Any) -> frozenset[str]:
    if value is None:
        return DEFAULT_CAPABILITIES
    caps = _strings(where, "capabilities", value, allow_single=False)
    if not caps:
        return DEFAULT_CAPABILITIES
    lowered = frozenset(c.lower() for c in caps)
    unknown = sorted(lowered - CAPABILITIES)
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown capability {unknown[0]!r} (known: {', '.join(sorted(CAPABILITIES))})"
        )
    return lowered


def _strings(where: str, key: str, value: Any, *, allow_single: bool = True) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) and allow_single:
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    want = "a string or a list of strings" if allow_single else "a list of strings"
    raise InvalidArgument(f"{where}: {key} must be {want}")


def _client_pairs(where: str, base: Path, value: Any) -> tuple[tuple[Path, Path | None], ...]:
    """``client``: a file, a list of files, or a list of [cert, key] pairs."""
    if value is None:
        return ()
    if isinstance(value, str):
        return ((_abs(base, value), None),)
    if not isinstance(value, list):
        raise InvalidArgument(f"{where}: client must be a string or a list")
    pairs: list[tuple[Path, Path | None]] = []
    for item in value:
        if isinstance(item, str):
            pairs.append((_abs(base, item), None))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item):
            pairs.append((_abs(base, item[0]), _abs(base, item[1])))
        else:
            raise InvalidArgument(f"{where}: client entries must be a file or a [cert, key] pair")
    return tuple(pairs)


def _headers(where: str, value: Any) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: header must be a table")
    out: dict[str, tuple[str, ...]] = {}
    for key, v in value.items():
        values = _strings(where, f"header {key!r}", v)
        if any("\n" in s or "\r" in s for s in values):
            raise InvalidArgument(f"{where}: header {key!r} contains a line break")
        out[key] = tuple(values)
    return out


def _duration(where: str, value: Any) -> float | None:
    """Go ``time.ParseDuration`` for ``dial_timeout`` (``"5s"``, ``"1m30s"``)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: dial_timeout must be a duration string like '5s'")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(value):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(value) or pos == 0:
        raise InvalidArgument(f"{where}: invalid dial_timeout {value!r}: want a duration like '5s'")
    return total


def _abs(base: Path, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else base / path


# -- defaults --------------------------------------------------------------------


def _default_server(registry: str, host: RegistryHost, *, plain_http: bool) -> RegistryHost:
    """Fill in the upstream server a configuration left unnamed (containerd's rules)."""
    changes: dict[str, Any] = {"path": API_PATH, "capabilities": DEFAULT_CAPABILITIES}
    if registry == DEFAULT_DOMAIN:
        changes |= {"host": DOCKER_HUB_HOST, "scheme": "https"}
    elif plain_http:
        changes |= {"host": registry, "scheme": "http"}
    elif is_localhost(registry):
        _host, port = _split_host_port(registry)
        # A loopback registry on an explicit port is nearly always plain HTTP
        # (``docker run -p 5000:5000 registry``); on 443 or no port it is
        # HTTPS with a self-signed certificate, as containerd assumes.
        if port in ("", "443"):
            changes |= {"host": registry, "scheme": "https", "skip_verify": True}
        else:
            changes |= {"host": registry, "scheme": "http"}
    else:
        changes |= {"host": registry, "scheme": "https"}
    return dataclasses.replace(host, **changes)


def _with_mirror(registry: str, host: RegistryHost) -> RegistryHost:
    """Mark hosts that serve *registry* under another name (containerd ``isProxy``)."""
    is_self = host.host == registry or (registry == DEFAULT_DOMAIN and host.host == DOCKER_HUB_HOST)
    return host if is_self else dataclasses.replace(host, mirror_of=registry)
