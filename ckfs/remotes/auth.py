"""Registry authentication: who we are (`Credentials`) and how we prove it (`Authorizer`).

Registries speak the Docker token protocol (distribution's ``spec/auth``):
a request without acceptable credentials gets ``401`` with a challenge::

    WWW-Authenticate: Bearer realm="https://auth.example/token",
                      service="registry.example",scope="repository:library/alpine:pull"

The client then asks the *realm* for a token for that *service* and
*scope*, anonymously or with the user's credentials, and repeats the request
with ``Authorization: Bearer <token>``. Some registries (htpasswd setups)
challenge ``Basic`` instead and take the username and password directly.

`Credentials` finds the user's secrets the way ``docker`` does, from
``config.json`` (inline ``auths``, ``credsStore``, ``credHelpers``), or takes
an explicit ``user:pass``. `Authorizer` turns challenges into
``Authorization`` header values, caching one bearer token per (host, scope)
until shortly before it expires so a pull of fifty layers costs one token
request, not fifty, and so concurrent fetches wait for one token request
instead of each starting their own.

Secrets stay secret: no repr, log line or error message here contains a
password, identity token or bearer token. Messages name the registry, the
token server and the repository.

Credential shape: ``(username, secret)``. An empty username means the
secret is an *identity token* (an OAuth2 refresh token, what ``docker
login`` stores as ``identitytoken`` and helpers return with the username
``<token>``), exchanged at the realm with a ``refresh_token`` grant; this
is containerd's convention.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from ckfs.errors import FailedPrecondition, InvalidArgument, Unauthorized, Unavailable
from ckfs.remotes.hosts import RegistryHost

__all__ = [
    "DEFAULT_TOKEN_LIFETIME",
    "Authorizer",
    "Challenge",
    "Credentials",
    "docker_config_path",
    "parse_challenges",
    "pull_scope",
]

_log = logging.getLogger(__name__)

#: Seconds a token lives when the token server does not say (distribution's
#: token spec: "When omitted, this defaults to 60 seconds").
DEFAULT_TOKEN_LIFETIME = 60

#: Fraction of a token's lifetime after which it is fetched anew instead of
#: reused: a token sent in its last moments can expire while a long blob
#: request is still being authorized, and a 401 mid-pull costs a round trip.
TOKEN_REUSE_FRACTION = 0.9

#: The key Docker stores Docker Hub credentials under, a relic of the v1 API.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"

#: Names Docker Hub is reached or stored under; all share one credential.
_DOCKER_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

#: What credential helpers print when they have nothing for a server
#: (docker-credential-helpers ``credentials.errCredentialsNotFound``).
_HELPER_NOT_FOUND = "credentials not found"

#: Username credential helpers return with an identity token as the secret.
_HELPER_TOKEN_USER = "<token>"

#: The OAuth2 client_id ckfs presents to token servers (they log it).
CLIENT_ID = "ckfs"

#: Token responses are a few hundred bytes; more is a broken or hostile server.
MAX_TOKEN_RESPONSE = 1 << 20

#: Statuses after which a refresh-token POST is retried as a GET: registries
#: that only implement the GET endpoint answer these (containerd lists GCR
#: 404, Artifactory 401, ACR 400, and 405 for POST not allowed).
_OAUTH_POST_UNSUPPORTED = frozenset({400, 401, 404, 405})


def pull_scope(repository: str) -> str:
    """The token scope for pulling *repository* (``repository:<name>:pull``)."""
    return f"repository:{repository}:pull"


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    """Docker's ``config.json``: ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``."""
    env = os.environ if env is None else env
    if directory := env.get("DOCKER_CONFIG"):
        return Path(directory) / "config.json"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".docker" / "config.json"


# -- challenges ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a lower-case scheme and its parameters."""

    scheme: str
    params: Mapping[str, str]


#: RFC 7230 ``tchar``: what a token (scheme, parameter name, bare value) is made of.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68 = _TCHAR | frozenset("/=")

#: Preference among schemes we understand; the first present is used.
_SCHEME_ORDER = ("bearer", "basic")


class _Scanner:
    """A cursor over one header value, for the RFC 7235 challenge grammar."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def token(self, chars: frozenset[str] = _TCHAR) -> str:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in chars:
            self.i += 1
        return self.s[start : self.i]

    def quoted(self) -> str:
        """A quoted-string (cursor on the opening quote), unescaping ``\\x``."""
        self.i += 1
        out = []
        while self.i < len(self.s):
            c = self.s[self.i]
            self.i += 1
            if c == "\\" and self.i < len(self.s):
                out.append(self.s[self.i])
                self.i += 1
            elif c == '"':
                return "".join(out)
            else:
                out.append(c)
        raise ValueError("unterminated quoted string")


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values into challenges.

    Handles what registries send in practice and RFC 7235 allows: several
    challenges in one header separated by commas, several headers, quoted
    values containing commas, ``=`` and escaped quotes, unquoted values,
    parameter names in any case, and ``token68`` credentials (skipped).
    A header that cannot be parsed is skipped from the point of the error
    with the challenges before it kept: a registry's odd extra challenge must
    not hide the bearer challenge we can use.

    Returns:
        The challenges in preference order: ``bearer`` first, then
        ``basic``, then other schemes in the order they came.
    """
    found: list[Challenge] = []
    for value in values:
        sc = _Scanner(value)
        try:
            _parse_header(sc, found)
        except ValueError as e:
            _log.debug("ignoring the rest of a malformed WWW-Authenticate header: %s", e)

    def rank(c: Challenge) -> int:
        return _SCHEME_ORDER.index(c.scheme) if c.scheme in _SCHEME_ORDER else len(_SCHEME_ORDER)

    return sorted(found, key=rank)


def _parse_header(sc: _Scanner, found: list[Challenge]) -> None:
    while True:
        sc.skip_ws()
        while sc.peek() == ",":  # empty list elements are allowed
            sc.i += 1
            sc.skip_ws()
        if not sc.peek():
            return
        scheme = sc.token()
        if not scheme:
            raise ValueError(f"expected an auth scheme at offset {sc.i}")
        params: dict[str, str] = {}
        found.append(Challenge(scheme.lower(), params))
        sc.skip_ws()
        # token68 (``Negotiate abc==``): one value, '=' only as padding,
        # followed by the end or the next challenge. We have no use for it.
        save = sc.i
        t68 = sc.token(_TOKEN68)
        sc.skip_ws()
        if t68 and "=" not in t68.rstrip("=") and sc.peek() in ("", ","):
            continue
        sc.i = save
        # auth-params: name "=" (token | quoted-string), comma separated. A
        # comma followed by a token and no "=" starts the next challenge.
        while True:
            sc.skip_ws()
            start = sc.i
            name = sc.token()
            sc.skip_ws()
            if not name or sc.peek() != "=":
                sc.i = start
                break
            sc.i += 1
            sc.skip_ws()
            params[name.lower()] = sc.quoted() if sc.peek() == '"' else sc.token()
            sc.skip_ws()
            if sc.peek() != ",":
                break
            sc.i += 1


# -- credentials -----------------------------------------------------------------


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
        self._lock = trio.Lock()

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
        async with self._lock:
            if host not in self._cache:
                self._cache[host] = await self._lookup(host)
            return self._cache[host]

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
            try:
                config = json.loads(raw or b"{}")
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise InvalidArgument(f"{self._config_file}: not valid JSON") from None
            if not isinstance(config, dict):
                raise InvalidArgument(f"{self._config_file}: expected a JSON object")
            self._config = config
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
            answer = json.loads(out)
            user, secret = answer["Username"], answer["Secret"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FailedPrecondition(
                f"credential helper {program} printed no credentials JSON for {host}"
            ) from None
        if not isinstance(user, str) or not isinstance(secret, str):
            raise FailedPrecondition(f"credential helper {program} gave non-string credentials")
        if not secret:
            return None
        return ("" if user == _HELPER_TOKEN_USER else user, secret)


# -- authorizer ------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Token:
    header: str = dataclasses.field(repr=False)
    reuse_until: float


@dataclasses.dataclass(slots=True)
class _HostAuth:
    """What a host's last challenge told us: its scheme and where tokens come from."""

    scheme: str
    realm: str = ""
    service: str = ""
    scopes: tuple[str, ...] = ()


def _basic(user: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


class Authorizer:
    """Turns registry challenges into ``Authorization`` header values.

    The registry client asks `authorization` before each request (None
    until the host has challenged: the first request goes anonymous, as in
    containerd, since many registries and mirrors need nothing) and
    `reauthorize` after each 401. Per host it remembers the last challenge;
    per (host, scope) it caches bearer tokens until
    `TOKEN_REUSE_FRACTION` of their lifetime has passed. A 401 for a cached
    token drops it; if the header we would send next equals the one just
    refused, nothing new is left to try and `reauthorize` raises.

    Bearer tokens come from the realm: anonymously (``GET``), with
    ``user:pass`` as HTTP Basic on a ``GET`` (what ``docker`` does; every
    token server implements it), or for an identity token with an OAuth2
    ``POST`` ``grant_type=refresh_token``, falling back to ``GET`` where the
    server lacks the POST endpoint.

    Args:
        credentials: Where usernames and secrets come from.
        client: The HTTP client for token requests (the registry client's,
            so tests inject one transport for both).
        on_request: Called with ``"token"`` for each token request, for the
            registry client's statistics.

    Cancellation: a cancelled token fetch leaves nothing cached; the next
    request fetches again.
    """

    def __init__(
        self,
        credentials: Credentials,
        client: httpx.AsyncClient,
        *,
        on_request: Callable[[str], None] | None = None,
    ) -> None:
        self._credentials = credentials
        self._client = client
        self._on_request = on_request or (lambda kind: None)
        self._hosts: dict[str, _HostAuth] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._locks: dict[tuple[str, str], trio.Lock] = {}

    def __repr__(self) -> str:
        return f"Authorizer(hosts={sorted(self._hosts)}, tokens={len(self._tokens)})"

    async def authorization(self, host: RegistryHost, scope: str) -> str | None:
        """The ``Authorization`` value to send to *host* for *scope*, or None.

        Args:
            host: The registry host the request goes to.
            scope: The token scope the request needs (`pull_scope`).

        Raises:
            Unauthorized: the host requires credentials we do not have, or
                the token server refused ours.
            Unavailable: the token server is unreachable or failing.
            InvalidArgument: the token server's answer is malformed.
        """
        state = self._hosts.get(host.host)
        if state is None:
            return None
        if state.scheme == "basic":
            creds = await self._credentials.get(host.host)
            if creds is None or not creds[0]:
                raise Unauthorized(
                    f"registry {host.host} requires a username and password "
                    f"and none is configured for it"
                )
            return _basic(*creds)
        key = (host.host, scope)
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            token = self._tokens.get(key)
            if token is not None and trio.current_time() < token.reuse_until:
                return token.header
            self._tokens.pop(key, None)
            token = await self._fetch_token(host, state, scope)
            self._tokens[key] = token
            return token.header

    async def reauthorize(
        self,
        host: RegistryHost,
        scope: str,
        response: httpx.Response,
        sent: str | None,
        *,
        fresh: bool = False,
    ) -> str:
        """Learn from *response* (a 401) and return the next ``Authorization`` to try.

        Args:
            host: The host that answered.
            scope: The scope the request needed.
            response: The 401 response, for its ``WWW-Authenticate`` headers.
            sent: The ``Authorization`` value the refused request carried.
            fresh: *sent* was obtained for this very request after an earlier
                401: it is refused as it stands, so nothing is left to try
                (containerd stops at the same point), and asking the token
                server again would only repeat the refusal.

        Raises:
            Unauthorized: no challenge we can answer; *fresh*; or the value
                we would send next is the one just refused (wrong password,
                no access to the repository, token without the needed scope).
            Unavailable, InvalidArgument: as for `authorization`.
        """
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        usable = [c for c in challenges if c.scheme in _SCHEME_ORDER]
        what = _repository_of(scope) or "the registry"
        if not usable:
            raise Unauthorized(
                f"registry {host.host} refused access to {what} (HTTP 401) without a "
                "challenge ckfs can answer (want Bearer or Basic)"
            )
        challenge = usable[0]
        if challenge.scheme == "bearer":
            realm = challenge.params.get("realm", "")
            if not realm:
                raise Unauthorized(f"registry {host.host} sent a Bearer challenge without a realm")
            extra = tuple(challenge.params.get("scope", "").split())
            self._hosts[host.host] = _HostAuth(
                "bearer", realm=realm, service=challenge.params.get("service", ""), scopes=extra
            )
        else:
            self._hosts[host.host] = _HostAuth("basic")
        cached = self._tokens.get((host.host, scope))
        if cached is not None and cached.header == sent:
            # Only the refused token is dropped: a concurrent request may
            # already have replaced it with a fresh one worth trying.
            del self._tokens[(host.host, scope)]
        new = None if fresh else await self.authorization(host, scope)
        if new is None or new == sent:
            creds = await self._credentials.get(host.host)
            hint = (
                "check the credentials and access to the repository"
                if creds
                else "the repository may not exist or may require a login"
            )
            error = challenge.params.get("error")
            detail = f" ({error})" if error else ""
            raise Unauthorized(f"registry {host.host} denied access to {what}{detail}: {hint}")
        return new

    async def _fetch_token(self, host: RegistryHost, state: _HostAuth, scope: str) -> _Token:
        scopes = sorted({*([scope] if scope else []), *state.scopes})
        realm = urlsplit(state.realm)
        if realm.scheme not in ("http", "https") or not realm.netloc:
            raise InvalidArgument(
                f"registry {host.host} named token server {state.realm!r}, not an http(s) URL"
            )
        creds = await self._credentials.get(host.host)
        if creds is not None and realm.scheme == "http" and host.scheme == "https":
            raise Unauthorized(
                f"refusing to send credentials for {host.host} to plain-HTTP token server "
                f"{realm.netloc}"
            )
        params: list[tuple[str, str | int | float | bool | None]] = []
        if state.service:
            params.append(("service", state.service))
        params += [("scope", s) for s in scopes]
        headers = _host_headers(host)
        what = _repository_of(scope) or "the registry"
        _log.debug(
            "fetching %s token for %s from %s",
            "anonymous" if creds is None else "authenticated",
            what,
            realm.netloc,
        )
        if creds is not None and creds[0] == "":
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds[1],
                "client_id": CLIENT_ID,
                "service": state.service,
            }
            if scopes:
                form["scope"] = " ".join(scopes)
            response = await self._token_request(
                host, state.realm, "POST", headers=headers, data=form
            )
            if response.status_code in _OAUTH_POST_UNSUPPORTED:
                _log.debug("token server %s refused the OAuth2 POST; trying GET", realm.netloc)
                response = await self._token_request(
                    host, state.realm, "GET", headers=headers, params=params, basic=creds
                )
        else:
            response = await self._token_request(
                host, state.realm, "GET", headers=headers, params=params, basic=creds
            )
        return self._parse_token_response(host, realm.netloc, what, response, creds is not None)

    async def _token_request(
        self,
        host: RegistryHost,
        realm: str,
        method: str,
        *,
        headers: dict[str, str],
        params: list[tuple[str, str | int | float | bool | None]] | None = None,
        data: dict[str, str] | None = None,
        basic: tuple[str, str] | None = None,
    ) -> httpx.Response:
        request_headers = dict(headers)
        if basic is not None:
            request_headers["Authorization"] = _basic(*basic)
        self._on_request("token")
        try:
            response = await self._client.request(
                method, realm, headers=request_headers, params=params, data=data
            )
        except httpx.TransportError as e:
            raise Unavailable(
                f"token server {urlsplit(realm).netloc} for registry {host.host} is "
                f"unreachable: {type(e).__name__}: {e}"
            ) from None
        return response

    def _parse_token_response(
        self, host: RegistryHost, server: str, what: str, response: httpx.Response, authed: bool
    ) -> _Token:
        status = response.status_code
        if status in (401, 403):
            how = "the configured credentials" if authed else "an anonymous token"
            raise Unauthorized(
                f"token server {server} refused {how} for {what} on registry {host.host} "
                f"(HTTP {status})"
            )
        if status == 429 or status >= 500:
            raise Unavailable(
                f"token server {server} for registry {host.host} answered HTTP {status}"
            )
        if not 200 <= status < 300:
            raise Unauthorized(
                f"token server {server} answered HTTP {status} for {what} on registry {host.host}"
            )
        if len(response.content) > MAX_TOKEN_RESPONSE:
            raise InvalidArgument(f"token server {server}: response larger than 1 MiB")
        try:
            body = json.loads(response.content)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidArgument(f"token server {server}: response is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidArgument(f"token server {server}: response is not a JSON object")
        token = body.get("access_token") or body.get("token")
        if not isinstance(token, str) or not token:
            raise InvalidArgument(f"token server {server}: response has no token")
        if any(c in token for c in "\r\n"):
            raise InvalidArgument(f"token server {server}: token contains a line break")
        lifetime = body.get("expires_in")
        if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        return _Token(
            header=f"Bearer {token}",
            reuse_until=trio.current_time() + lifetime * TOKEN_REUSE_FRACTION,
        )


def _host_headers(host: RegistryHost) -> dict[str, str]:
    # hosts.toml headers go to the token server too, as in containerd
    # (WithAuthHeader): some proxies need them on every request.
    return {k: ", ".join(v) for k, v in host.headers.items()}


def _repository_of(scope: str) -> str:
    """``repository:foo/bar:pull`` → ``foo/bar``, for messages."""
    parts = scope.split(":")
    if len(parts) >= 3 and parts[0] == "repository":
        return ":".join(parts[1:-1])
    return scope
