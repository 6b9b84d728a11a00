"""One manifest ``HEAD`` without the async client: how a re-pull by tag stays cheap.

A pull of a tag whose image is already complete has one question for the
registry: does the tag still point at the digest we hold? Starting trio
and httpx to ask it costs far more than the answer (their imports alone
take 0.3-0.5 s on a small machine); the standard library's ``http.client``
asks it in milliseconds.

This path can only ever say "unchanged". Any other outcome returns None and
the caller does the full pull, whose client handles it properly: the
registry wants credentials the user has (no secret is sent from here), a
redirect, an error status, an unreachable or slow host, a proxy in the
environment, a missing or different digest. The one thing it does beyond a
bare ``HEAD`` is the anonymous bearer-token round trip that public
registries demand even of anonymous clients.

Time is bounded as a whole, not per read: ``http.client``'s timeout applies
to each socket operation, so a server sending a byte a second would hold it
for as long as its headers go on. Every connect, handshake, send and
receive here ends by one deadline, `PEEK_DEADLINE` after the peek began,
and whatever a hostile server answers ends in None, quickly.

Nothing is fetched here and nothing is trusted beyond what the full
client's own ``HEAD`` would trust: the registry's ``Docker-Content-Digest``
for the tag, compared with a digest whose content is already present and
verified.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from ckfs import mediatypes as mt
from ckfs.digest import Digest
from ckfs.errors import CkfsError
from ckfs.reference import Reference
from ckfs.remotes.challenge import (
    MAX_TOKEN_RESPONSE,
    parse_challenges,
    parse_token,
    pull_scope,
    token_query,
)
from ckfs.remotes.credentials import Credentials
from ckfs.remotes.hosts import USER_AGENT, RegistryHost, ssl_context

if TYPE_CHECKING:
    import ssl

__all__ = ["PEEK_DEADLINE", "PEEK_TIMEOUT", "tag_digest"]

_log = logging.getLogger(__name__)

#: Seconds one socket operation (connect, handshake, read) may take. Short
#: on purpose: a host that slow gets the full client, with its retries.
PEEK_TIMEOUT = 2.0

#: Seconds the whole peek may take, all its requests together (a ``HEAD``,
#: and for public registries a token ``GET`` and a second ``HEAD``): a few
#: round trips to a healthy registry take well under one.
PEEK_DEADLINE = 5.0


def tag_digest(
    ref: Reference,
    hosts: Sequence[RegistryHost],
    credentials: Credentials | None = None,
    *,
    within: float = PEEK_DEADLINE,
) -> Digest | None:
    """The digest *ref*'s tag points at, per the first host that may resolve it.

    The whole peek takes at most *within* seconds (`PEEK_DEADLINE`, or a
    pull's shorter ``--timeout``, so that a peek and the full client behind
    it together stay near the time the user allowed).

    A registry that challenges for a bearer token (Docker Hub, GHCR, most
    public registries, even for anonymous pulls) gets the anonymous token
    dance, as the full client would do it: only when *credentials* (default:
    Docker's ``config.json``) hold nothing for the host, so no secret is
    ever sent from here.

    Returns:
        The digest from the registry's ``Docker-Content-Digest`` header on a
        ``200`` for a manifest or index; None for any other outcome (see the
        module docstring), never an exception.
    """
    if ref.tag is None or ref.digest is not None:
        return None
    host = next((h for h in hosts if h.can("resolve")), None)
    if host is None or _proxied(host.scheme):
        return None
    path = f"{host.path}/{ref.path}/manifests/{quote(ref.tag)}"
    if host.mirror_of:
        path += "?" + urlencode({"ns": host.mirror_of})
    headers = host.header_fields()
    headers["User-Agent"] = USER_AGENT
    accept = {**headers, "Accept": ", ".join(mt.MANIFEST_ACCEPT)}
    tls: dict[str, ssl.SSLContext] = {}
    deadline = time.monotonic() + min(within, PEEK_DEADLINE)
    try:
        status, answer, _ = _request(
            host, tls, deadline, host.scheme, host.host, "HEAD", path, accept
        )
        if status == 401:
            credentials = credentials or Credentials()
            if credentials.configured(host.host):
                return None
            challenges = answer.get_all("WWW-Authenticate") or []
            token = _anonymous_token(host, tls, deadline, challenges, ref, headers)
            if token is None:
                return None
            authorized = {**accept, "Authorization": token}
            status, answer, _ = _request(
                host, tls, deadline, host.scheme, host.host, "HEAD", path, authorized
            )
        value = answer.get("Docker-Content-Digest")
        media_type = (answer.get("Content-Type") or "").split(";")[0].strip()
        if status != 200 or not value:
            _log.debug("HEAD %s on %s: %d; asking the full client", ref, host.host, status)
            return None
        if not (mt.is_index(media_type) or mt.is_manifest(media_type)):
            return None
        return Digest.parse(value.strip())
    except (OSError, http.client.HTTPException, ValueError, CkfsError) as e:
        # ValueError: a URL or header value http.client refuses to send.
        _log.debug("HEAD %s on %s: %s; asking the full client", ref, host.host, e)
        return None


def _anonymous_token(
    host: RegistryHost,
    tls: dict[str, ssl.SSLContext],
    deadline: float,
    challenges: list[str],
    ref: Reference,
    headers: dict[str, str],
) -> str | None:
    """An ``Authorization`` value from the realm of a bearer challenge, asked anonymously."""
    bearer = [c for c in parse_challenges(challenges) if c.scheme == "bearer"]
    if not bearer:
        return None  # Basic needs a password, which the full client looks up
    params = bearer[0].params
    realm = urlsplit(params.get("realm", ""))
    if realm.scheme not in ("http", "https") or not realm.netloc:
        return None
    scopes = [pull_scope(ref.path), *params.get("scope", "").split()]
    query = urlencode(token_query(params.get("service", ""), scopes))
    path = f"{realm.path or '/'}?{realm.query + '&' if realm.query else ''}{query}"
    status, _, data = _request(
        host, tls, deadline, realm.scheme, realm.netloc, "GET", path, headers, body=True
    )
    if status != 200:
        return None
    return parse_token(data, realm.netloc)[0]


def _request(
    host: RegistryHost,
    tls: dict[str, ssl.SSLContext],
    deadline: float,
    scheme: str,
    netloc: str,
    method: str,
    path: str,
    headers: dict[str, str],
    *,
    body: bool = False,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh connection: status, headers and, if asked, the (capped) body.

    *tls* keeps the TLS contexts made so far: loading the CA store costs
    30-50 ms, and a token round trip makes three requests.
    """
    conn: http.client.HTTPConnection
    if scheme == "https":
        # The host's own TLS settings for the host; the system's for a token server elsewhere.
        own = netloc == host.host and host.has_tls_config
        key = netloc if own else ""
        if key not in tls:
            tls[key] = ssl_context(host if own else RegistryHost(netloc))
        conn = _BoundedHTTPS(netloc, deadline, context=tls[key])
    else:
        conn = _BoundedHTTP(netloc, deadline)
    try:
        conn.request(method, path, headers=headers)
        with conn.getresponse() as response:
            data = response.read(MAX_TOKEN_RESPONSE + 1) if body else b""
            return response.status, response.msg, data
    finally:
        conn.close()


def _left(deadline: float) -> float:
    """Seconds the next socket operation may take: `PEEK_TIMEOUT`, or less near *deadline*."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no answer within the peek's deadline")
    return min(left, PEEK_TIMEOUT)


class _DeadlineSocket:
    """A connected socket whose every send and receive ends by one deadline.

    Only what ``http.client`` uses: `sendall`, `makefile` for the response
    and `close`. Each call re-arms the socket's timeout with what is left,
    so a trickle of bytes cannot stretch the total. As with a real socket's
    ``makefile``, the descriptor stays open until the connection and every
    reader made from it are closed: a connection that will close hands its
    socket to the response this way.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._users = 1  # the connection

    def sendall(self, data: Any) -> None:
        self._sock.settimeout(_left(self._deadline))
        self._sock.sendall(data)

    def recv_into(self, buffer: Any) -> int:
        self._sock.settimeout(_left(self._deadline))
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        self._users += 1
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._sock.close()


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._sock.close()
        super().close()


class _BoundedHTTP(http.client.HTTPConnection):
    """A connection whose connect, TLS handshake, requests and responses end by *deadline*."""

    def __init__(self, netloc: str, deadline: float, **kwargs: Any) -> None:
        super().__init__(netloc, timeout=PEEK_TIMEOUT, **kwargs)
        self._deadline = deadline
        self._create_connection = self._connect_by_deadline

    def _connect_by_deadline(
        self, address: tuple[str, int], timeout: float, source: Any = None
    ) -> socket.socket:
        sock = socket.create_connection(address, _left(self._deadline), source)
        sock.settimeout(_left(self._deadline))  # what a TLS handshake has left
        return sock

    def connect(self) -> None:
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._deadline)


class _BoundedHTTPS(_BoundedHTTP, http.client.HTTPSConnection):
    pass


def _proxied(scheme: str) -> bool:
    """Whether the environment routes *scheme* through a proxy (httpx would honour it)."""
    names = (f"{scheme}_proxy", "all_proxy")
    return any(os.environ.get(n) or os.environ.get(n.upper()) for n in names)
