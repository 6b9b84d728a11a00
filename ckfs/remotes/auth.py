"""Registry authentication: who we are (`Credentials`) and how we prove it (`Authorizer`).

Registries speak the Docker token protocol (distribution's ``spec/auth``):
a request without acceptable credentials gets ``401`` with a challenge::

    WWW-Authenticate: Bearer realm="https://auth.example/token",
                      service="registry.example",scope="repository:library/alpine:pull"

The client then asks the *realm* for a token for that *service* and
*scope*, anonymously or with the user's credentials, and repeats the request
with ``Authorization: Bearer <token>``. Some registries (htpasswd setups)
challenge ``Basic`` instead and take the username and password directly.

`Credentials` (`ckfs.remotes.credentials`) finds the user's secrets the way
``docker`` does, from ``config.json`` (inline ``auths``, ``credsStore``,
``credHelpers``), or takes an explicit ``user:pass``; the challenge grammar
and token answers are parsed in `ckfs.remotes.challenge`, which the
loop-free re-pull shares. `Authorizer` turns challenges into
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
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import httpx
import trio

from ckfs.errors import InvalidArgument, Unauthorized, Unavailable
from ckfs.remotes.bounds import REQUEST_TIMEOUT, Deadline, http_failure, read_capped
from ckfs.remotes.challenge import (
    MAX_TOKEN_RESPONSE,
    SCHEMES,
    Challenge,
    parse_challenges,
    parse_token,
    pull_scope,
    token_query,
)
from ckfs.remotes.credentials import DOCKER_HUB_AUTH_KEY, Credentials, docker_config_path
from ckfs.remotes.hosts import RegistryHost
from ckfs.safetext import printable

__all__ = [
    "DOCKER_HUB_AUTH_KEY",
    "Authorizer",
    "Challenge",
    "Credentials",
    "docker_config_path",
    "parse_challenges",
    "pull_scope",
]

_log = logging.getLogger(__name__)

#: Fraction of a token's lifetime after which it is fetched anew instead of
#: reused: a token sent in its last moments can expire while a long blob
#: request is still being authorized, and a 401 mid-pull costs a round trip.
TOKEN_REUSE_FRACTION = 0.9

#: The OAuth2 client_id ckfs presents to token servers (they log it).
CLIENT_ID = "ckfs"

#: Statuses after which a refresh-token POST is retried as a GET: registries
#: that only implement the GET endpoint answer these (containerd lists GCR
#: 404, Artifactory 401, ACR 400, and 405 for POST not allowed).
_OAUTH_POST_UNSUPPORTED = frozenset({400, 401, 404, 405})


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
        request_timeout: Seconds a token request may take, answer and body,
            however slowly the bytes come (the body is read with its 1 MiB
            cap as it streams).

    Cancellation: a cancelled token fetch leaves nothing cached; the next
    request fetches again.
    """

    def __init__(
        self,
        credentials: Credentials,
        client: httpx.AsyncClient,
        *,
        on_request: Callable[[str], None] | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self._credentials = credentials
        self._client = client
        self._request_timeout = request_timeout
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
        usable = [c for c in challenges if c.scheme in SCHEMES]
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
            detail = f" ({printable(error, 80)})" if error else ""
            raise Unauthorized(f"registry {host.host} denied access to {what}{detail}: {hint}")
        return new

    async def _fetch_token(self, host: RegistryHost, state: _HostAuth, scope: str) -> _Token:
        scopes = sorted({*([scope] if scope else []), *state.scopes})
        try:
            realm = urlsplit(state.realm)
        except ValueError:
            realm = urlsplit("")
        if realm.scheme not in ("http", "https") or not realm.netloc:
            raise InvalidArgument(
                f"registry {host.host} named token server {printable(state.realm)!r}, "
                "not an http(s) URL"
            )
        creds = await self._credentials.get(host.host)
        if creds is not None and realm.scheme == "http" and host.scheme == "https":
            raise Unauthorized(
                f"refusing to send credentials for {host.host} to plain-HTTP token server "
                f"{realm.netloc}"
            )
        params = token_query(state.service, scopes)
        headers = host.header_fields()
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
            status, body = await self._token_request(
                host, state.realm, "POST", headers=headers, data=form
            )
            if status in _OAUTH_POST_UNSUPPORTED:
                _log.debug("token server %s refused the OAuth2 POST; trying GET", realm.netloc)
                status, body = await self._token_request(
                    host, state.realm, "GET", headers=headers, params=params, basic=creds
                )
        else:
            status, body = await self._token_request(
                host, state.realm, "GET", headers=headers, params=params, basic=creds
            )
        return self._parse_token_response(host, realm.netloc, what, status, body, creds is not None)

    async def _token_request(
        self,
        host: RegistryHost,
        realm: str,
        method: str,
        *,
        headers: dict[str, str],
        params: Sequence[tuple[str, str]] = (),
        data: dict[str, str] | None = None,
        basic: tuple[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """One token request: its status and, for a 2xx, its body.

        The answer and body must come within the request deadline, the body
        within `MAX_TOKEN_RESPONSE` (checked as it streams).
        """
        request_headers = dict(headers)
        if basic is not None:
            request_headers["Authorization"] = _basic(*basic)
        self._on_request("token")
        server = f"token server {urlsplit(realm).netloc}"
        what = f"token for registry {host.host}"
        deadline = Deadline.after(self._request_timeout)
        try:
            request = self._client.build_request(
                method, realm, headers=request_headers, params=tuple(params), data=data
            )
            with deadline.enforce(f"{server} ({what}): answer"):
                response = await self._client.send(request, stream=True)
            async with contextlib.aclosing(response):
                if not 200 <= response.status_code < 300:
                    return response.status_code, b""
                with deadline.enforce(f"{server} ({what}): body"):
                    body = await read_capped(response, MAX_TOKEN_RESPONSE, server)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise http_failure(e, server, what) from None
        return response.status_code, body

    def _parse_token_response(
        self, host: RegistryHost, server: str, what: str, status: int, body: bytes, authed: bool
    ) -> _Token:
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
        header, lifetime = parse_token(body, server)
        return _Token(
            header=header,
            reuse_until=trio.current_time() + lifetime * TOKEN_REUSE_FRACTION,
        )


def _repository_of(scope: str) -> str:
    """``repository:foo/bar:pull`` → ``foo/bar``, for messages."""
    parts = scope.split(":")
    if len(parts) >= 3 and parts[0] == "repository":
        return ":".join(parts[1:-1])
    return scope
