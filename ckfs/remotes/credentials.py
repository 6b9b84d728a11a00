"""Who we are to a registry: credentials found the way ``docker`` finds them.

`Credentials` reads Docker's ``config.json`` (inline ``auths``,
``credsStore``, ``credHelpers``) or takes an explicit ``user:pass``; it is
what `ckfs.remotes.auth.Authorizer` answers challenges with. Secrets stay
secret: no repr, log line or error message here contains one.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckfs.errors import FailedPrecondition, InvalidArgument
from ckfs.jsondoc import parse_object

if TYPE_CHECKING:
    import trio

__all__ = ["DOCKER_HUB_AUTH_KEY", "Credentials", "docker_config_path"]

_log = logging.getLogger(__name__)

#: The key Docker stores Docker Hub credentials under, a relic of the v1 API.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"

#: Names Docker Hub is reached or stored under; all share one credential.
_DOCKER_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

#: What credential helpers print when they have nothing for a server
#: (docker-credential-helpers ``credentials.errCredentialsNotFound``).
_HELPER_NOT_FOUND = "credentials not found"

#: Username credential helpers return with an identity token as the secret.
_HELPER_TOKEN_USER = "<token>"


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    """Docker's ``config.json``: ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``."""
    env = os.environ if env is None else env
    if directory := env.get("DOCKER_CONFIG"):
        return Path(directory) / "config.json"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".docker" / "config.json"


def _hostname(key: str) -> str:
    """Docker's ``ConvertToHostname``: ``https://host:5000/v1/`` → ``host:5000``."""
    for prefix in ("http://", "https://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key.split("/", 1)[0]


def _is_docker_hub(host: str) -> bool:
    return _hostname(host) in _DOCKER_HUB_NAMES


class Credentials:
    """The user's registry credentials, found the way ``docker`` finds them.

    Sources, first match wins:

    1. an explicit ``user:pass`` given to the constructor (``--creds``),
       used for every host;
    2. ``credHelpers[<host>]`` in ``config.json``: run
       ``docker-credential-<name> get`` with the server on stdin;
    3. ``credsStore``: the same with the default helper;
    4. ``auths[<host>]``: ``identitytoken``, else ``auth`` (base64
       ``user:pass``), else ``username`` / ``password``.

    Docker Hub is looked up under ``https://index.docker.io/v1/`` (Docker's
    key for it) whichever of its names is asked. Keys of ``auths`` may be
    URLs; they match by host name, as in Docker. A helper that answers
    "credentials not found" falls through to ``auths``. Results are cached
    for the object's lifetime so a helper runs at most once per host.

    Args:
        explicit: ``user:pass`` to use for every host; ``:token`` gives an
            identity token.
        config_file: The ``config.json`` to read; default
            `docker_config_path`. A missing file means no credentials.
        env: Environment for finding ``config.json`` and helpers on
            ``PATH``; default ``os.environ``.

    Raises:
        InvalidArgument: *explicit* has no ``:``.
    """

    def __init__(
        self,
        explicit: str | None = None,
        *,
        config_file: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._env = dict(os.environ if env is None else env)
        self._config_file = config_file or docker_config_path(self._env)
        self._explicit: tuple[str, str] | None = None
        if explicit is not None:
            user, sep, secret = explicit.partition(":")
            if not sep:
                raise InvalidArgument("credentials must be given as user:password")
            self._explicit = (user, secret)
        self._config: dict[str, Any] | None = None
        self._cache: dict[str, tuple[str, str] | None] = {}
        self._lock: trio.Lock | None = None  # made on first use, inside trio

    def __repr__(self) -> str:
        source = "explicit" if self._explicit else str(self._config_file)
        return f"Credentials(<{source}>)"

    async def get(self, host: str) -> tuple[str, str] | None:
        """The ``(username, secret)`` for *host* (``host[:port]``), or None.

        Raises:
            InvalidArgument: ``config.json`` is not valid JSON, or an
                ``auth`` entry is not base64 ``user:pass``; the message names
                the file and host, never the value.
            FailedPrecondition: a configured credential helper is not on
                ``PATH``, fails, or prints something other than its JSON.
        """
        if self._explicit is not None:
            return self._explicit
        if self._lock is None:
            import trio

            self._lock = trio.Lock()
        async with self._lock:
            if host not in self._cache:
                self._cache[host] = await self._lookup(host)
            return self._cache[host]

    def configured(self, host: str) -> bool:
        """Whether any source may hold credentials for *host*, without running a helper.

        True for explicit credentials, a ``credHelpers`` entry or a
        ``credsStore`` (a helper might answer), and an ``auths`` entry.

        Raises:
            InvalidArgument, FailedPrecondition: ``config.json`` is unreadable
                or not a JSON object.
        """
        if self._explicit is not None:
            return True
        config = self._load_config()
        return bool(
            self._find(config.get("credHelpers"), host)
            or (isinstance(config.get("credsStore"), str) and config["credsStore"])
            or self._find(config.get("auths"), host)
        )

    def _load_config(self) -> dict[str, Any]:
        if self._config is None:
            try:
                raw = self._config_file.read_bytes()
            except FileNotFoundError:
                raw = b"{}"
            except OSError as e:
                raise FailedPrecondition(
                    f"{self._config_file}: cannot read: {e.strerror}"
                ) from None
            # parse_object: a file nested thousands deep is a clear error, not a RecursionError.
            self._config = parse_object(raw or b"{}", str(self._config_file))
        return self._config

    def _keys_for(self, host: str) -> list[str]:
        """The names *host* may be stored under, best first."""
        if _is_docker_hub(host):
            return [DOCKER_HUB_AUTH_KEY, "index.docker.io", "docker.io", "registry-1.docker.io"]
        return [host]

    def _find(self, table: Any, host: str) -> tuple[str, Any] | None:
        if not isinstance(table, dict):
            return None
        wanted = self._keys_for(host)
        for key in wanted:
            if key in table:
                return key, table[key]
        hostnames = {_hostname(k) for k in wanted}
        for key, value in table.items():
            if isinstance(key, str) and _hostname(key) in hostnames:
                return key, value
        return None

    async def _lookup(self, host: str) -> tuple[str, str] | None:
        config = self._load_config()
        server = DOCKER_HUB_AUTH_KEY if _is_docker_hub(host) else host
        helper = None
        if found := self._find(config.get("credHelpers"), host):
            helper = found[1]
        elif isinstance(config.get("credsStore"), str) and config["credsStore"]:
            helper = config["credsStore"]
        if isinstance(helper, str) and helper:
            creds = await self._run_helper(helper, server, host)
            if creds is not None:
                return creds
        found = self._find(config.get("auths"), host)
        if found is None:
            return None
        return self._from_auth_entry(found[1], host)

    def _from_auth_entry(self, entry: Any, host: str) -> tuple[str, str] | None:
        if not isinstance(entry, dict):
            return None
        where = f"{self._config_file}: auths entry for {host}"
        if token := entry.get("identitytoken"):
            return ("", str(token))
        if auth := entry.get("auth"):
            try:
                decoded = base64.b64decode(str(auth), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidArgument(f"{where}: auth is not base64 user:password") from None
            user, sep, secret = decoded.partition(":")
            if not sep:
                raise InvalidArgument(f"{where}: auth is not base64 user:password")
            return (user, secret)
        username, password = entry.get("username"), entry.get("password")
        if isinstance(username, str) and isinstance(password, str) and username:
            return (username, password)
        return None

    async def _run_helper(self, name: str, server: str, host: str) -> tuple[str, str] | None:
        program = f"docker-credential-{name}"
        path = shutil.which(program, path=self._env.get("PATH", os.defpath))
        if path is None:
            raise FailedPrecondition(
                f"credential helper {program} for {host} is not on PATH (configured in "
                f"{self._config_file})"
            )
        _log.debug("asking %s for credentials for %s", program, host)
        import trio

        result = await trio.run_process(
            [path, "get"],
            stdin=server.encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=self._env,
        )
        out = result.stdout.decode(errors="replace").strip()
        if result.returncode != 0:
            if _HELPER_NOT_FOUND in out.lower() or _HELPER_NOT_FOUND in (
                result.stderr.decode(errors="replace").lower()
            ):
                return None
            # What a helper prints on failure is its own error text, but it
            # is cut short and kept to one line in case it echoes anything.
            detail = (result.stderr or result.stdout).decode(errors="replace").strip()
            detail = detail.splitlines()[0][:120] if detail else f"exit status {result.returncode}"
            raise FailedPrecondition(f"credential helper {program} failed for {host}: {detail}")
        try:
            answer = parse_object(out, f"credential helper {program}")
            user, secret = answer["Username"], answer["Secret"]
        except (InvalidArgument, KeyError):
            raise FailedPrecondition(
                f"credential helper {program} printed no credentials JSON for {host}"
            ) from None
        if not isinstance(user, str) or not isinstance(secret, str):
            raise FailedPrecondition(f"credential helper {program} gave non-string credentials")
        if not secret:
            return None
        return ("" if user == _HELPER_TOKEN_USER else user, secret)
