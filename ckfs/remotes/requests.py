"""The request engine under `ckfs.remotes.registry`: authenticated, retried, bounded.

Every request `RegistryClient` sends (resolve, manifest, blob stream,
range read) goes through one `Engine`: it owns the httpx client (so the
connection pool), the `Authorizer` (tokens cached per host and scope), the
counters behind `RegistryClient.statistics`, and the rules below, so that
a FUSE range read and a whole-layer download fail, wait and authenticate
alike. What a request's body means is the caller's business
(`ckfs.remotes.registry` for manifests, `ckfs.remotes.blobs` for blobs).

Failure handling, per request, before any byte of a body is handed out:

- 401 from the registry itself → the `Authorizer` learns the challenge and
  the request is repeated with new credentials, until it has nothing new
  to offer (`Unauthorized`). A 401 from a host a redirect led to (object
  storage) is never taken for the registry's challenge: it is `Unavailable`
  and no credential or token request goes its way.
- connection errors, 408, 5xx → retried with exponential backoff and
  jitter, but only on the last host: a failing mirror is skipped at once
  (containerd's policy), the upstream is worth waiting for.
- 429 → retried on any host after ``Retry-After`` or backoff.
- waits: one request waits at most `MAX_RETRY_AFTER` seconds in all; a
  ``Retry-After`` beyond that, or a wait that would end after the enclosing
  trio deadline (the caller's budget), fails at once naming the
  delay instead of sleeping.
- time: each attempt must have its response headers, and any small body
  read with them (manifest, error or token body), within
  ``request_timeout`` seconds, however the bytes trickle; past it the
  attempt is `Unavailable` and not repeated (a server that slow has had
  its chance), nor is one silent for a whole ``read_timeout``.
- redirect loops, redirects to URLs httpx cannot follow, and other answers
  httpx refuses → `InvalidArgument`, not retried.
- any other failure on a mirror → the next host; the last host's error is
  the one raised, since the upstream's answer is authoritative.

Redirects are followed (registries send blob GETs to object storage);
httpx drops ``Authorization`` when a redirect leaves the origin, so the
registry's token never reaches the storage host. Every request asks for
``Accept-Encoding: identity``: digests cover the stored bytes, and a server
or CDN that compressed them in transit would break both verification and
byte ranges.
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import httpcore
import httpx
import trio

from ckfs.errors import CkfsError, DataLoss, InvalidArgument, NotFound, Unauthorized, Unavailable
from ckfs.jsondoc import parse_json
from ckfs.remotes.auth import Authorizer, Credentials
from ckfs.remotes.bounds import (
    MAX_REDIRECTS,
    Deadline,
    TooSlow,
    http_failure,
    read_capped,
    wait_to_retry,
)
from ckfs.remotes.hosts import USER_AGENT, RegistryHost, ssl_context
from ckfs.safetext import printable

__all__ = [
    "HTTP_READ_SIZE",
    "MAX_RETRY_AFTER",
    "Engine",
    "content_length",
    "read_limited",
]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: First retry delay in seconds; doubled each attempt up to `MAX_BACKOFF`.
#: Short because most transient failures are a dropped keep-alive connection.
BACKOFF_BASE = 0.1

#: Longest wait between two attempts of one request, in seconds.
MAX_BACKOFF = 10.0

#: Longest wait, in seconds, between the attempts of one request in all
#: (``Retry-After`` included): a registry asking for an hour should fail the
#: pull at once with a clear error rather than hang it, and retries of a
#: request must not add up to minutes before the caller's resumes multiply them.
MAX_RETRY_AFTER = 60.0

#: A request is repeated at most this many times for authentication (no
#: credentials → token → refreshed token); beyond that something loops.
MAX_AUTH_ROUNDS = 3

#: Error bodies are read only this far for their message.
MAX_ERROR_BODY = 64 << 10

#: Bytes httpcore asks the socket for per read. Its default (64 KiB) makes
#: every read cost a trio wakeup, an h11 event and a Python-level chunk:
#: measured here against a local docker-registry, httpx on trio moved about
#: 270 MB/s with 64 KiB reads and 1.1 GB/s with 1 MiB (curl: 1.3 GB/s).
#: httpcore keeps the value as a class attribute of its HTTP/1.1
#: connection, so it is raised process-wide (never lowered) when the first
#: registry client is made; a read returns what the socket has, so small
#: responses are not delayed by it.
HTTP_READ_SIZE = 1 << 20

#: Statuses worth retrying on the upstream host: the server is overloaded,
#: restarting or behind a failing proxy.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

#: Seconds an idle connection is kept for the next request. Lazy (FUSE)
#: reads come in bursts seconds apart; httpx's 5 s default made each burst
#: pay a new connection (a TCP and TLS handshake: tens of ms to a remote
#: registry, more than the read). Half of the shortest idle timeout common
#: in front of registries (60 s, cloud load balancers), so the server rarely
#: closes one first; when it does, httpcore sees the socket closed before
#: reusing it, and a request lost in that race is retried like any
#: dropped connection.
KEEPALIVE_EXPIRY = 30.0

#: A header's decimal number (``str.isdigit`` would accept "²", which int() refuses).
_NUMBER = re.compile(r"[0-9]{1,18}")

#: httpx's connection limits (100 at once, 20 kept idle) with `KEEPALIVE_EXPIRY`.
_LIMITS = httpx.Limits(
    max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_EXPIRY
)

#: Where `Engine.request` leaves an attempt's `Deadline` on its response, so the
#: body read with it shares the budget of its headers.
_DEADLINE = "ckfs.deadline"


class Engine:
    """Authenticated, retried requests to the hosts of one registry.

    Args:
        ref_domain: The registry as references name it, for messages.
        hosts: Where to send requests, in order (`load_hosts`).
        credentials, transport, connect_timeout, read_timeout, retries,
            request_timeout: As for `ckfs.remotes.registry.RegistryClient`.

    Attributes:
        hosts: The hosts, in order.
        authorizer: Credentials and tokens, per host and scope.
        stats: Requests made so far, by kind (`RegistryClient.statistics`).

    Raises:
        InvalidArgument: a host's CA or client certificate cannot be loaded.
    """

    def __init__(
        self,
        ref_domain: str,
        *,
        hosts: Sequence[RegistryHost],
        credentials: Credentials,
        transport: httpx.AsyncBaseTransport | None,
        connect_timeout: float,
        read_timeout: float,
        retries: int,
        request_timeout: float,
    ) -> None:
        self.ref_domain = ref_domain
        self.hosts = tuple(hosts)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._retries = max(0, retries)
        self._request_timeout = request_timeout
        self.stats: Counter[str] = Counter()
        self._random = random.Random()
        _raise_read_size()
        mounts: dict[str, httpx.AsyncBaseTransport | None] | None = None
        if transport is None:
            mounts = {}
            for host in self.hosts:
                if host.has_tls_config:
                    mounts[f"https://{host.host}"] = httpx.AsyncHTTPTransport(
                        verify=ssl_context(host), limits=_LIMITS
                    )
        self._trust = _SystemTrust()
        self._client = httpx.AsyncClient(
            transport=transport,
            mounts=mounts,
            verify=self._trust.context,
            event_hooks={"request": [self._trust.before]},
            timeout=self._timeout(None),
            limits=_LIMITS,
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )
        self.authorizer = Authorizer(
            credentials, self._client, on_request=self.count, request_timeout=request_timeout
        )

    async def aclose(self) -> None:
        """Close all connections. The engine cannot be used afterwards."""
        await self._client.aclose()

    def count(self, kind: str) -> None:
        self.stats[kind] += 1

    def count_bytes(self, n: int) -> None:
        self.stats["blob_bytes"] += n

    def _timeout(self, host: RegistryHost | None) -> httpx.Timeout:
        connect = self._connect_timeout
        if host is not None and host.dial_timeout is not None:
            connect = host.dial_timeout
        # No pool timeout: waiting for a free connection is what a parallel
        # pull does by design, and trio cancellation bounds it if needed.
        return httpx.Timeout(
            connect=connect, read=self._read_timeout, write=self._read_timeout, pool=None
        )

    async def on_hosts(
        self,
        capability: str,
        what: str,
        attempt: Callable[[RegistryHost, bool], Awaitable[_T]],
    ) -> _T:
        """Run *attempt* on each host able to *capability* until one succeeds."""
        hosts = [h for h in self.hosts if h.can(capability)]
        if not hosts:
            raise NotFound(
                f"cannot {what}: no host configured for registry {self.ref_domain} "
                f"has the {capability!r} capability"
            )
        for i, host in enumerate(hosts):
            last = i == len(hosts) - 1
            try:
                return await attempt(host, last)
            except CkfsError as e:
                if last:
                    raise
                _log.info("%s: %s; trying the next host", what, e)
        raise AssertionError("unreachable")  # the last host's error was raised

    async def request(
        self,
        host: RegistryHost,
        method: str,
        path: str,
        *,
        kind: str,
        scope: str,
        headers: dict[str, str],
        last: bool,
        what: str,
        ok: frozenset[int] = frozenset({200, 206}),
    ) -> httpx.Response:
        """Send one API request with authentication and retries.

        Returns:
            A response whose status is in *ok*, body not yet read; the
            caller closes it.

        Raises:
            The mapped error for any other final status (see `_status_error`)
            or for a transport failure.
        """
        url = f"{host.base_url}/{path}"
        params = {"ns": host.mirror_of} if host.mirror_of else None
        request_headers = host.header_fields()
        request_headers.update(headers)
        timeout = self._timeout(host)
        attempt = 0
        auth_rounds = 0
        waited = 0.0
        sent: str | None = None
        while True:
            try:
                sent = await self.authorizer.authorization(host, scope)
                self.count(kind)
                request, response = await self.send(
                    f"registry {host.host}",
                    what,
                    method,
                    url,
                    headers=request_headers,
                    params=params,
                    authorization=sent,
                    timeout=timeout,
                )
            except Unavailable as e:
                if not last or attempt >= self._retries or isinstance(e, TooSlow):
                    raise
                attempt += 1
                waited = await self._wait(self._backoff(attempt), waited, str(e), attempt)
                continue
            if response.history:
                self.stats["redirect"] += len(response.history)
            status = response.status_code
            if _log.isEnabledFor(logging.DEBUG):  # rebuilding the URL costs a range read ~10 %
                _log.debug("%s %s -> %d", method, _safe_url(response.url), status)
            if status in ok:
                return response
            same_origin = _origin(response.url) == _origin(request.url)
            if status == 401 and same_origin and auth_rounds < MAX_AUTH_ROUNDS:
                await response.aclose()
                auth_rounds += 1
                self.count("auth")
                # reauthorize raises Unauthorized when nothing new is left to try;
                # its fresh header is taken from the cache on the next round.
                await self.authorizer.reauthorize(
                    host, scope, response, sent, fresh=auth_rounds > 1
                )
                continue
            retryable = status in _RETRY_STATUSES and (last or status == 429)
            if retryable and attempt < self._retries:
                attempt += 1
                hinted = _retry_after(response) if status in (429, 503) else None
                await response.aclose()
                if hinted is None:
                    why = f"{what}: HTTP {status} from registry {host.host}"
                else:
                    why = f"{what}: registry {host.host} asks to retry after {hinted:.0f} s"
                    why += f" (HTTP {status})"
                waited = await self._wait(hinted or self._backoff(attempt), waited, why, attempt)
                continue
            raise await _status_error(host, response, what, same_origin)

    async def send(
        self,
        server: str,
        what: str,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        params: dict[str, str] | None = None,
        authorization: str | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> tuple[httpx.Request, httpx.Response]:
        """One attempt at *what* from *server* ("registry X"), up to its response headers.

        The headers must come within `request_timeout`; the attempt's
        `Deadline` travels on the response (`_DEADLINE`) for the body read
        with it. A non-distributable layer's URLs go through here too, so
        every request the client sends has the same bound.

        Raises:
            CkfsError: the `http_failure` for httpx's error, or `TooSlow`.
        """
        deadline = Deadline.after(self._request_timeout)
        try:
            request = self._client.build_request(
                method, url, params=params, headers=headers, timeout=timeout or self._timeout(None)
            )
            if authorization is not None:
                request.headers["Authorization"] = authorization
            with deadline.enforce(f"{what}: response headers from {server}"):
                response = await self._client.send(request, stream=True)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise http_failure(e, server, what) from None
        response.extensions[_DEADLINE] = deadline
        return request, response

    async def _wait(self, delay: float, waited: float, why: str, attempt: int) -> float:
        """Sleep *delay* before retry *attempt*, within the request's `MAX_RETRY_AFTER`.

        Returns:
            The seconds waited for this request so far, this wait included.

        Raises:
            Unavailable: the wait would take the request's waits past
                `MAX_RETRY_AFTER` or end after the enclosing deadline; at
                once, *why* naming what failed.
        """
        if waited + delay > MAX_RETRY_AFTER:
            so_far = f", after {waited:.3g} s of waiting" if waited else ""
            raise Unavailable(
                f"{why}; ckfs waits at most {MAX_RETRY_AFTER:g} s per request{so_far}"
            )
        _log.debug("%s; retry %d in %.2fs", why, attempt, delay)
        self.count("retry")
        await wait_to_retry(delay, why)
        return waited + delay

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: many clients do not retry in step."""
        ceiling = min(MAX_BACKOFF, BACKOFF_BASE * 2 ** (attempt - 1))
        return self._random.uniform(ceiling / 2, ceiling)


# -- helpers --------------------------------------------------------------------


class _SystemTrust:
    """The system's CA certificates for hosts without TLS settings, loaded when first needed.

    Loading the store costs 30-50 ms on a small machine, a tenth of a
    re-pull, and a plain-HTTP registry (every loopback one) never uses it,
    unless it redirects a blob to HTTPS storage: httpx runs `before` for
    every request, redirects included, so the certificates are in place
    before the first handshake. The store is the system's (Debian's
    ca-certificates, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``), as for
    containerd, rather than the certifi bundle httpx would load.
    """

    def __init__(self) -> None:
        # Verifies certificates and host names, as create_default_context would.
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._loaded = False
        self._lock = trio.Lock()

    async def before(self, request: httpx.Request) -> None:
        if request.url.scheme != "https" or self._loaded:
            return
        async with self._lock:
            if not self._loaded:
                await trio.to_thread.run_sync(self.context.load_default_certs)
                self._loaded = True


def _raise_read_size() -> None:
    """Apply `HTTP_READ_SIZE` to httpcore's HTTP/1.1 connections if it has the knob."""
    connection = getattr(httpcore, "AsyncHTTP11Connection", None)
    current = getattr(connection, "READ_NUM_BYTES", None)
    if isinstance(current, int) and current < HTTP_READ_SIZE:
        connection.READ_NUM_BYTES = HTTP_READ_SIZE  # type: ignore[union-attr]


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return (url.scheme, url.host, url.port)


def _safe_url(url: httpx.URL) -> str:
    """The URL without its query: object-storage redirects carry signatures there."""
    return str(url.copy_with(query=None))


def content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "").strip()
    return int(value) if _NUMBER.fullmatch(value) else None


def response_deadline(response: httpx.Response) -> Deadline:
    """The `Deadline` `Engine.send` gave the response's attempt."""
    deadline = response.extensions.get(_DEADLINE)
    return deadline if isinstance(deadline, Deadline) else Deadline(float("inf"), float("inf"))


async def read_limited(
    response: httpx.Response, limit: int, where: str, *, oversize: bool = False
) -> bytes:
    """Read a body of at most *limit* bytes, refusing more while it streams.

    Args:
        oversize: More than *limit* is `InvalidArgument` (a manifest over the
            4 MiB cap) instead of `DataLoss` (more than the descriptor said).
    """
    announced = content_length(response)
    if announced is not None and announced > limit:
        raise _too_big(where, announced, limit, oversize)
    with response_deadline(response).enforce(f"{where}: body"):
        data = await read_capped(response, limit, where)
    if len(data) > limit:
        raise _too_big(where, len(data), limit, oversize)
    return data


def _too_big(where: str, n: int, limit: int, oversize: bool) -> CkfsError:
    if oversize:
        return InvalidArgument(f"{where}: more than the {limit} byte manifest limit")
    return DataLoss(f"{where}: {n} bytes, more than the expected {limit}")


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta or HTTP date), as asked: the caller caps it."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
            seconds = when.timestamp() - time.time()
        except (TypeError, ValueError, OverflowError, IndexError):
            return None
    return max(0.0, min(seconds, 1e9))


async def _error_detail(response: httpx.Response) -> str:
    """The registry's own error code and message, one short line, if any."""
    body = b""
    try:
        with response_deadline(response).enforce("error body"):
            body = await read_capped(response, MAX_ERROR_BODY, "error body")
    except (Unavailable, httpx.StreamError):
        pass  # the status alone still says what went wrong
    finally:
        await response.aclose()
    try:
        errors = parse_json(body, "error body").get("errors")
        first = errors[0]
        code, message = str(first.get("code", "")), str(first.get("message", ""))
    except (CkfsError, AttributeError, TypeError, IndexError, KeyError):
        return ""
    text = (f"{code}: {message}" if code else message).strip()
    return f" ({printable(text)})" if text else ""


async def _status_error(
    host: RegistryHost, response: httpx.Response, what: str, same_origin: bool
) -> CkfsError:
    status = response.status_code
    detail = await _error_detail(response)
    server = f"registry {host.host}" if same_origin else f"storage host {response.url.host}"
    if not same_origin and status in (401, 403, 404):
        # A redirect target (object storage) refused: its signed URL expired
        # or the bucket is misconfigured; a fresh redirect may work.
        return Unavailable(f"{what}: {server} answered HTTP {status} after a redirect{detail}")
    if status == 404:
        return NotFound(f"{what}: not found on {server}{detail}")
    if status in (401, 403):
        return Unauthorized(f"{what}: {server} denied access (HTTP {status}){detail}")
    if status == 429:
        return Unavailable(f"{what}: {server} is rate limiting requests (HTTP 429){detail}")
    if status >= 500 or status == 408:
        return Unavailable(f"{what}: {server} answered HTTP {status}{detail}")
    return InvalidArgument(f"{what}: {server} answered HTTP {status}{detail}")
