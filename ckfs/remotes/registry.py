"""The OCI distribution client: resolve names, fetch manifests, stream blobs.

`RegistryClient` speaks the read half of the distribution API (``/v2``) to
the hosts `ckfs.remotes.hosts.load_hosts` chose for one registry, mirrors
first. It knows nothing of the content store: it hands out verified
manifest bytes and *unverified* blob streams; the caller hashes blobs while
writing them (the content store refuses a commit whose digest differs).

The operations and what each trusts::

    resolve(ref)               tag/digest → Descriptor      hosts with "resolve"
                                                              (with "pull" for digests)
    fetch_manifest(ref, desc)  → bytes, digest verified     hosts with "pull"
    open_blob(ref, desc, ...)  → BlobStream, not verified   hosts with "pull"
    read_range(ref, desc, o, n) → bytes, not verified       hosts with "pull"

Resolving a tag is the one moment a registry is trusted: the digest it
reports becomes the image's identity. That is why only hosts with the
``resolve`` capability are asked (a pull-through mirror without it serves
content by digest only and cannot repoint a tag), and why a ``HEAD`` that
lacks ``Docker-Content-Digest`` or ``Content-Length`` is followed by a
``GET`` whose bytes ckfs hashes itself.

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

Once a blob stream has started nothing is retried here: a broken
connection, or one slower than ``min_rate`` bytes/s over
``low_speed_time`` seconds (`TooSlow`), raises `Unavailable` from
`BlobStream.aiter_chunks`, and the caller resumes with a new `open_blob`
at the offset it reached (`BlobStream.position`). `read_range` returns
bytes, not a stream, so it resumes a broken body itself.

Errors (`ckfs.errors`, plus `ckfs.errors.Unauthorized`), each one
line naming what and which registry host: `NotFound` (404), `Unauthorized`
(401/403 after authentication), `Unavailable` (unreachable, 5xx, 429, a
stream cut short), `InvalidArgument` (Docker schema 1, malformed or
oversized answers), `DataLoss` (bytes that do not match their digest),
`FailedPrecondition` (the server's TLS certificate does not verify: a
configuration problem, so it is not retried).

Redirects are followed (registries send blob GETs to object storage);
httpx drops ``Authorization`` when a redirect leaves the origin, so the
registry's token never reaches the storage host. Every request asks for
``Accept-Encoding: identity``: digests cover the stored bytes, and a server
or CDN that compressed them in transit would break both verification and
byte ranges.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import math
import random
import re
import ssl
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TypeVar, cast
from urllib.parse import urlsplit

import httpcore
import httpx
import trio

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, Digester
from ckfs.errors import (
    CkfsError,
    DataLoss,
    InvalidArgument,
    NotFound,
    Unauthorized,
    Unavailable,
)
from ckfs.images.manifest import MAX_MANIFEST_SIZE, SCHEMA1_HINT, body_media_type
from ckfs.jsondoc import parse_json
from ckfs.reference import Reference
from ckfs.remotes.auth import Authorizer, Credentials, pull_scope
from ckfs.remotes.bounds import (
    LOW_SPEED_TIME,
    MAX_REDIRECTS,
    MIN_RATE,
    REQUEST_TIMEOUT,
    Deadline,
    SpeedLimit,
    TooSlow,
    describe,
    http_failure,
    read_capped,
    wait_to_retry,
)
from ckfs.remotes.hosts import USER_AGENT, RegistryHost, ssl_context
from ckfs.safetext import printable

__all__ = ["BlobStream", "RegistryClient"]

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

#: Longest window one `RegistryClient.read_range` returns: it is held in
#: memory whole. The lazy path reads chunks and spans of a few MiB (an
#: eStargz TOC is larger but still far below this); a longer read is a bug
#: or a hostile index, and `open_blob` streams anything that big anyway.
MAX_RANGE = 64 << 20

#: Times one `RegistryClient.read_range` asks again for the rest of a body
#: that broke off or ended early, from the byte it reached. A request that
#: fails before its body is retried by `_request` instead; this bounds
#: connections that keep dropping mid-body, which a FUSE read waits on.
RANGE_RESUMES = 3

#: Statuses worth retrying on the upstream host: the server is overloaded,
#: restarting or behind a failing proxy.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

_HEADER_DIGEST = "docker-content-digest"

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)", re.ASCII)

#: A header's decimal number (``str.isdigit`` would accept "²", which int() refuses).
_NUMBER = re.compile(r"[0-9]{1,18}")

#: Where `_request` leaves an attempt's `Deadline` on its response, so the
#: body read with it shares the budget of its headers.
_DEADLINE = "ckfs.deadline"


class BlobStream:
    """An open blob download: where it starts, how long the blob is, its bytes.

    The bytes are *not* verified here; the caller hashes them from offset 0.

    Attributes:
        offset: Where this stream really starts in the blob: the offset
            asked for, or 0 when the server ignored the range (HTTP 200);
            the caller then discards or rehashes from the start.
        total: The blob's full size (the descriptor's).
        end: The offset one past the last byte this stream will deliver.
        host: The host serving it (``host:port``), for messages.
        position: The offset of the next byte `aiter_chunks` will yield.
    """

    def __init__(
        self,
        response: httpx.Response | None,
        *,
        desc: Descriptor,
        offset: int,
        end: int,
        host: str,
        on_bytes: Callable[[int], None],
        speed: SpeedLimit,
        pooled: bool = False,
    ) -> None:
        self._response = response
        self._pooled = pooled
        self._desc = desc
        self.offset = offset
        self.total = desc.size
        self.end = end
        self.host = host
        self.position = offset
        self._on_bytes = on_bytes
        self._speed = speed

    def __repr__(self) -> str:
        return (
            f"BlobStream({self._desc.digest} from {self.host}, "
            f"{self.offset}-{self.end} of {self.total}, at {self.position})"
        )

    async def aiter_chunks(self) -> AsyncGenerator[bytes, None]:
        """Yield the stream's bytes as they arrive, in network-sized chunks.

        Each read waits at most until the end of the current speed window
        (`SpeedLimit`); the cancel scope covers the read alone, never the
        caller's code between chunks.

        Raises:
            Unavailable: the connection broke, stalled beyond the read
                timeout, fell below the minimum rate, or ended before `end`;
                `position` says where to resume.
            DataLoss: the server sent more bytes than the blob has.
        """
        what = f"blob {self._desc.digest} from {self.host}"
        if self._response is None:
            return
        chunks = self._response.aiter_raw() if self._pooled else _raw_body(self._response)
        window_end, window_start = self._speed.deadline(), self.position
        try:
            while True:
                with trio.CancelScope(deadline=window_end) as scope:
                    chunk = await anext(chunks, None)
                if scope.cancelled_caught:
                    raise TooSlow(
                        f"{what}: slower than {self._speed.min_rate:g} bytes/s for "
                        f"{self._speed.window:g} s at byte {self.position} of {self.total}"
                    )
                if chunk is None:
                    break
                self.position += len(chunk)
                if self.position > self.end:
                    raise DataLoss(f"{what}: more than the expected {self.total} bytes")
                if self.position - window_start >= self._speed.quota:
                    window_end, window_start = self._speed.deadline(), self.position
                self._on_bytes(len(chunk))
                yield chunk
        except httpx.TransportError as e:
            raise Unavailable(
                f"{what}: connection lost at byte {self.position} of {self.total}: {describe(e)}"
            ) from None
        if self.position < self.end:
            raise Unavailable(f"{what}: stream ended at byte {self.position} of {self.total}")


class RegistryClient:
    """Read images from one registry through its configured hosts.

    Use as an async context manager (or call `aclose`); one client serves
    any number of concurrent requests and shares connections and tokens
    among them.

    Args:
        ref_domain: The registry as references name it (``docker.io``,
            ``127.0.0.1:5000``); references passed in must have this domain.
        hosts: Where to send requests, in order (`load_hosts`).
        credentials: Where secrets come from.
        transport: An httpx transport for every request (tests inject
            `httpx.MockTransport`); default: real connections, with each
            host's TLS settings (CA, client certificate, skip_verify).
        connect_timeout: Seconds to wait for a connection (a host's
            ``dial_timeout`` overrides it).
        read_timeout: Seconds a read may stall before the request fails
            (httpx's 5 s default is too short for a busy registry's blobs).
        retries: Extra attempts for a failing request (see the module
            docstring for which failures).
        request_timeout: Seconds one attempt may take for its response
            headers plus a small body read with them (manifest, error body,
            token), however slowly the bytes come; `REQUEST_TIMEOUT`.
        min_rate: Slowest blob stream kept, in bytes/s averaged over
            *low_speed_time* seconds (curl's ``--speed-limit``); 0 turns the
            check off; `MIN_RATE`.
        low_speed_time: Seconds over which *min_rate* is averaged (curl's
            ``--speed-time``); `LOW_SPEED_TIME`.

    Raises:
        InvalidArgument: a host's CA or client certificate cannot be loaded.
    """

    def __init__(
        self,
        ref_domain: str,
        *,
        hosts: Sequence[RegistryHost],
        credentials: Credentials,
        transport: httpx.AsyncBaseTransport | None = None,
        connect_timeout: float = 10,
        read_timeout: float = 60,
        retries: int = 5,
        request_timeout: float = REQUEST_TIMEOUT,
        min_rate: float = MIN_RATE,
        low_speed_time: float = LOW_SPEED_TIME,
    ) -> None:
        self.ref_domain = ref_domain
        self.hosts = tuple(hosts)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._retries = max(0, retries)
        self._request_timeout = request_timeout
        self._speed = SpeedLimit(max(0.0, min_rate), low_speed_time)
        self._stats: Counter[str] = Counter()
        self._random = random.Random()
        _raise_read_size()
        mounts: dict[str, httpx.AsyncBaseTransport | None] | None = None
        if transport is None:
            mounts = {}
            for host in self.hosts:
                if host.has_tls_config:
                    mounts[f"https://{host.host}"] = httpx.AsyncHTTPTransport(
                        verify=ssl_context(host)
                    )
        self._trust = _SystemTrust()
        self._client = httpx.AsyncClient(
            transport=transport,
            mounts=mounts,
            verify=self._trust.context,
            event_hooks={"request": [self._trust.before]},
            timeout=self._timeout(None),
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )
        self._authorizer = Authorizer(
            credentials, self._client, on_request=self._count, request_timeout=request_timeout
        )

    def __repr__(self) -> str:
        return f"RegistryClient({self.ref_domain!r}, hosts={[h.host for h in self.hosts]})"

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close all connections. The client cannot be used afterwards."""
        await self._client.aclose()

    def statistics(self) -> dict[str, int]:
        """Requests made so far, by kind.

        Kinds: ``resolve`` (HEAD/GET of a tag or digest), ``manifest``,
        ``blob``, ``token`` (token server), ``url`` (a layer's external
        URL), ``range`` (`read_range` GETs); plus ``retry`` (repeats after
        failures), ``auth`` (repeats after a 401), ``redirect`` (hops
        followed), ``resume`` (range bodies asked for again after breaking
        off), ``range_ignored`` (range GETs answered with the whole blob) and
        ``blob_bytes`` (blob and range bytes received).
        """
        return dict(self._stats)

    # -- the three operations ---------------------------------------------------

    async def resolve(self, ref: Reference) -> Descriptor:
        """The descriptor of the manifest or index *ref* names.

        A tag is resolved by hosts with the ``resolve`` capability; a digest
        by any host with ``pull``. ``HEAD`` is tried first; when it lacks the
        digest or size (or the registry refuses HEAD), the manifest is
        fetched and hashed.

        Args:
            ref: A reference of this client's registry with a tag or digest.

        Raises:
            NotFound: the registry has no such tag, digest or repository.
            Unauthorized: access was refused after authenticating.
            Unavailable: no host could be reached or all failed.
            FailedPrecondition: the host's TLS certificate does not verify.
            InvalidArgument: *ref* has neither tag nor digest or another
                domain; the manifest is Docker schema 1, of an unknown media
                type, or larger than 4 MiB.
            DataLoss: a pinned digest disagrees with what the registry sent.
        """
        self._check_ref(ref)
        obj = str(ref.digest) if ref.digest is not None else ref.tag
        if not obj:
            raise InvalidArgument(f"cannot resolve {ref}: it has neither tag nor digest")
        capability = "pull" if ref.digest is not None else "resolve"

        async def on(host: RegistryHost, last: bool) -> Descriptor:
            return await self._resolve_on(host, ref, obj, last)

        return await self._on_hosts(capability, f"resolve {ref}", on)

    async def fetch_manifest(self, ref: Reference, desc: Descriptor) -> bytes:
        """The bytes of the manifest or index *desc* describes, verified.

        Args:
            ref: The reference it belongs to (for the repository).
            desc: Its descriptor (from `resolve` or a parent index).

        Raises:
            InvalidArgument: *desc* is Docker schema 1 or larger than
                `MAX_MANIFEST_SIZE`, or the registry sent more than that.
            DataLoss: the bytes do not match *desc*'s digest or size, or the
                registry's ``Docker-Content-Digest`` contradicts it.
            NotFound, Unauthorized, Unavailable: as for `resolve`.
        """
        self._check_ref(ref)
        where = f"manifest {desc.digest}"
        if desc.media_type in mt.SCHEMA1:
            raise InvalidArgument(f"{where} of {ref.name}: {SCHEMA1_HINT}")
        if desc.size > MAX_MANIFEST_SIZE:
            raise InvalidArgument(
                f"{where} of {ref.name}: {desc.size} bytes exceeds the "
                f"{MAX_MANIFEST_SIZE} byte limit"
            )

        async def on(host: RegistryHost, last: bool) -> bytes:
            accept = ", ".join(dict.fromkeys([desc.media_type, *mt.MANIFEST_ACCEPT]))
            response = await self._request(
                host,
                "GET",
                f"{ref.path}/manifests/{desc.digest}",
                kind="manifest",
                scope=pull_scope(ref.path),
                headers={"Accept": accept},
                last=last,
                what=f"{where} of {ref.path}",
            )
            async with contextlib.aclosing(response):
                _check_header_digest(response, desc.digest, f"{where} from {host.host}")
                data = await _read_limited(response, desc.size, f"{where} from {host.host}")
            _verify(data, desc, f"{where} from registry {host.host}")
            return data

        return await self._on_hosts("pull", f"fetch {where}", on)

    def open_blob(
        self,
        ref: Reference,
        desc: Descriptor,
        *,
        offset: int = 0,
        length: int | None = None,
        allow_urls: bool = False,
    ) -> contextlib.AbstractAsyncContextManager[BlobStream]:
        """Open a download of the blob *desc* describes, from *offset* on.

        Usage::

            async with client.open_blob(ref, layer, offset=n) as stream:
                async for chunk in stream.aiter_chunks():
                    ...

        Args:
            ref: The reference the blob belongs to (for the repository).
            desc: The blob's descriptor.
            offset: First byte wanted; sends ``Range: bytes=<offset>-``.
            length: Bytes wanted from *offset* (None: to the end); sends a
                closed range, for reading a part of a layer.
            allow_urls: For a layer with ``urls`` (non-distributable), try
                those first, without the registry's credentials. Off by
                default: such URLs point outside the registry, and whether to
                fetch from them is the caller's decision.

        Raises:
            InvalidArgument: *offset* or *length* outside the blob; the
                server answered a different range than asked.
            NotFound, Unauthorized, Unavailable: as for `resolve`, on open.
        """
        return self._open_blob(ref, desc, offset, length, allow_urls)

    @contextlib.asynccontextmanager
    async def _open_blob(
        self,
        ref: Reference,
        desc: Descriptor,
        offset: int,
        length: int | None,
        allow_urls: bool,
    ) -> AsyncIterator[BlobStream]:
        self._check_ref(ref)
        where = f"blob {desc.digest}"
        if not 0 <= offset <= desc.size:
            raise InvalidArgument(f"{where}: offset {offset} outside its {desc.size} bytes")
        end = desc.size if length is None else offset + length
        if length is not None and (length < 0 or end > desc.size):
            raise InvalidArgument(f"{where}: range {offset}+{length} outside its {desc.size} bytes")
        if offset == end:
            yield BlobStream(
                None,
                desc=desc,
                offset=offset,
                end=end,
                host="-",
                on_bytes=self._count_bytes,
                speed=self._speed,
            )
            return
        headers = {}
        if offset > 0 or end < desc.size:
            headers["Range"] = (
                f"bytes={offset}-{end - 1}" if end < desc.size else f"bytes={offset}-"
            )

        async def on(host: RegistryHost, last: bool) -> BlobStream:
            response = await self._request(
                host,
                "GET",
                f"{ref.path}/blobs/{desc.digest}",
                kind="blob",
                scope=pull_scope(ref.path),
                headers=headers,
                last=last,
                what=f"{where} of {ref.path}",
            )
            try:
                return self._blob_stream(response, desc, offset, end, host.host)
            except BaseException:
                await response.aclose()
                raise

        stream = None
        if allow_urls and desc.urls:
            stream = await self._open_urls(desc, headers, offset, end)
        if stream is None:
            stream = await self._on_hosts("pull", f"fetch {where}", on)
        try:
            yield stream
        finally:
            if stream._response is not None:
                await stream._response.aclose()

    async def read_range(self, ref: Reference, desc: Descriptor, offset: int, length: int) -> bytes:
        """Bytes *offset* to *offset* + *length* of the blob *desc*: the lazy path's read.

        One ``Range: bytes=<first>-<last>`` GET, read through httpx so its
        connection goes back to the pool (`open_blob` bodies bypass h11 and
        close theirs): a FUSE read pays for a request, not a connection, and
        a cached token is reused. Authentication, retries, backoff, mirrors
        and redirects are those of every blob GET (module docstring). A body
        that breaks off or ends early is asked for again from the byte it
        reached, at most `RANGE_RESUMES` times; a body slower than
        ``min_rate`` is not (`TooSlow`). The caller's cancel scope bounds the
        whole read.

        A server that ignores the range (HTTP 200, the whole blob) is read up
        to the window's end, the bytes before it discarded, and its
        connection closed: correct, but as slow as the window is far into
        the blob; ``range_ignored`` in `statistics` counts these. Refusing
        would leave no lazy path at all on such a registry.

        The bytes are *not* verified: a range cannot be checked against the
        blob's digest. The caller checks them against what it trusts (an
        eStargz chunk digest, a layer index span's sha256) before it serves
        or caches them.

        Args:
            ref: The reference the blob belongs to (for the repository).
            desc: The blob's descriptor; its size bounds the range.
            offset: First byte wanted.
            length: Bytes wanted, at most `MAX_RANGE`; 0 returns ``b""``
                without a request.

        Returns:
            Exactly *length* bytes.

        Raises:
            InvalidArgument: the range is negative, outside the blob or
                longer than `MAX_RANGE`; the server answered another range.
            DataLoss: the server sent more than asked, or says the blob has
                another size.
            NotFound, Unauthorized, FailedPrecondition: as for `resolve`.
            Unavailable: as for `resolve`; also a body that kept breaking
                off, or one slower than ``min_rate`` (`TooSlow`).
        """
        self._check_ref(ref)
        where = f"blob {desc.digest}"
        end = offset + length
        if offset < 0 or length < 0 or end > desc.size:
            raise InvalidArgument(f"{where}: range {offset}+{length} outside its {desc.size} bytes")
        if length > MAX_RANGE:
            raise InvalidArgument(
                f"{where}: range {offset}+{length} longer than the {MAX_RANGE} byte limit of a read"
            )
        parts: list[bytes] = []
        got = 0

        async def on(host: RegistryHost, last: bool) -> None:
            nonlocal got
            start = offset + got
            response = await self._request(
                host,
                "GET",
                f"{ref.path}/blobs/{desc.digest}",
                kind="range",
                scope=pull_scope(ref.path),
                headers={"Range": f"bytes={start}-{end - 1}"},
                last=last,
                what=f"{where} of {ref.path} (bytes {start}-{end - 1})",
            )
            async with contextlib.aclosing(response):
                stream = self._blob_stream(response, desc, start, end, host.host, pooled=True)
                if response.status_code == 200:
                    self._count("range_ignored")
                chunks = stream.aiter_chunks()
                try:
                    async with contextlib.aclosing(chunks):
                        async for chunk in chunks:
                            # The chunk holds bytes [first, position) of the blob.
                            first = stream.position - len(chunk)
                            want = offset + got
                            if stream.position > want:
                                kept = chunk[max(0, want - first) : end - first]
                                parts.append(kept)
                                got += len(kept)
                            if stream.position >= end and stream.end > end:
                                break  # the whole blob came: stop at the window's end
                except TooSlow:
                    raise
                except Unavailable as e:
                    raise _BrokenOff(str(e)) from None

        resumes = 0
        while got < length:
            try:
                await self._on_hosts("pull", f"read {where}", on)
            except _BrokenOff as e:
                if resumes >= RANGE_RESUMES:
                    raise Unavailable(f"{e} (gave up after {resumes} resumes)") from None
                resumes += 1
                self._count("resume")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- internals -----------------------------------------------------------------

    def _check_ref(self, ref: Reference) -> None:
        if ref.domain != self.ref_domain:
            raise InvalidArgument(
                f"reference {ref} is not on registry {self.ref_domain} (this client's)"
            )

    def _count(self, kind: str) -> None:
        self._stats[kind] += 1

    def _count_bytes(self, n: int) -> None:
        self._stats["blob_bytes"] += n

    def _timeout(self, host: RegistryHost | None) -> httpx.Timeout:
        connect = self._connect_timeout
        if host is not None and host.dial_timeout is not None:
            connect = host.dial_timeout
        # No pool timeout: waiting for a free connection is what a parallel
        # pull does by design, and trio cancellation bounds it if needed.
        return httpx.Timeout(
            connect=connect, read=self._read_timeout, write=self._read_timeout, pool=None
        )

    async def _on_hosts(
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

    async def _request(
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
                sent = await self._authorizer.authorization(host, scope)
                self._count(kind)
                request, response = await self._send(
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
                self._stats["redirect"] += len(response.history)
            status = response.status_code
            if _log.isEnabledFor(logging.DEBUG):  # rebuilding the URL costs a range read ~10 %
                _log.debug("%s %s -> %d", method, _safe_url(response.url), status)
            if status in ok:
                return response
            same_origin = _origin(response.url) == _origin(request.url)
            if status == 401 and same_origin and auth_rounds < MAX_AUTH_ROUNDS:
                await response.aclose()
                auth_rounds += 1
                self._count("auth")
                # reauthorize raises Unauthorized when nothing new is left to try;
                # its fresh header is taken from the cache on the next round.
                await self._authorizer.reauthorize(
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

    async def _send(
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
        self._count("retry")
        await wait_to_retry(delay, why)
        return waited + delay

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: many clients do not retry in step."""
        ceiling = min(MAX_BACKOFF, BACKOFF_BASE * 2 ** (attempt - 1))
        return self._random.uniform(ceiling / 2, ceiling)

    async def _resolve_on(
        self, host: RegistryHost, ref: Reference, obj: str, last: bool
    ) -> Descriptor:
        path = f"{ref.path}/manifests/{obj}"
        accept = {"Accept": ", ".join(mt.MANIFEST_ACCEPT)}
        what = f"manifest {ref}"
        scope = pull_scope(ref.path)
        response = await self._request(
            host,
            "HEAD",
            path,
            kind="resolve",
            scope=scope,
            headers=accept,
            last=last,
            what=what,
            ok=frozenset({200, 405}),
        )
        await response.aclose()
        media_type = _media_type(response)
        size = _content_length(response)
        header_digest = _header_digest(response, f"{what} from {host.host}")
        if response.status_code == 200 and media_type in mt.SCHEMA1:
            raise InvalidArgument(f"{what} on registry {host.host}: {SCHEMA1_HINT}")
        digest = ref.digest
        if digest is not None and header_digest is not None:
            if header_digest.algorithm == digest.algorithm and header_digest != digest:
                raise DataLoss(
                    f"{what}: registry {host.host} reports digest {header_digest} for it"
                )
        elif digest is None:
            digest = header_digest
        known = mt.is_index(media_type) or mt.is_manifest(media_type)
        # A zero length is what some proxies put on every HEAD; no manifest is empty.
        if response.status_code == 200 and digest is not None and size and known:
            if size > MAX_MANIFEST_SIZE:
                raise InvalidArgument(
                    f"{what} on registry {host.host}: {size} bytes exceeds the "
                    f"{MAX_MANIFEST_SIZE} byte limit"
                )
            return Descriptor(media_type=media_type, digest=digest, size=size)

        # HEAD was refused or incomplete: fetch the body and hash it ourselves.
        _log.debug("%s: HEAD gave no digest, size or media type; fetching it", what)
        response = await self._request(
            host, "GET", path, kind="resolve", scope=scope, headers=accept, last=last, what=what
        )
        async with contextlib.aclosing(response):
            data = await _read_limited(
                response, MAX_MANIFEST_SIZE, f"{what} from {host.host}", oversize=True
            )
            media_type = _media_type(response)
            get_digest = _header_digest(response, f"{what} from {host.host}")
        algorithm = ref.digest.algorithm if ref.digest is not None else "sha256"
        hasher = Digester(algorithm)
        hasher.update(data)
        actual = hasher.digest()
        if ref.digest is not None and actual != ref.digest:
            raise DataLoss(f"{what} from registry {host.host}: digest mismatch, got {actual}")
        if get_digest is not None and get_digest.algorithm == algorithm and get_digest != actual:
            raise DataLoss(
                f"{what} from registry {host.host}: Docker-Content-Digest {get_digest} "
                f"does not match the body's {actual}"
            )
        media_type = _sniff_media_type(media_type, data, f"{what} on registry {host.host}")
        return Descriptor(media_type=media_type, digest=actual, size=len(data))

    def _blob_stream(
        self,
        response: httpx.Response,
        desc: Descriptor,
        offset: int,
        end: int,
        host: str,
        *,
        pooled: bool = False,
    ) -> BlobStream:
        where = f"blob {desc.digest} from {host}"
        start = 0
        if response.status_code == 206:
            m = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
            if m is None or int(m.group(1)) != offset:
                got = response.headers.get("content-range", "none")
                raise InvalidArgument(f"{where}: asked for bytes from {offset}, got range {got!r}")
            if m.group(3) != "*" and int(m.group(3)) != desc.size:
                raise DataLoss(
                    f"{where}: server says the blob has {m.group(3)} bytes, not {desc.size}"
                )
            start = offset
        else:
            if offset:
                _log.debug("%s: server ignored the range; streaming from 0", where)
            end = desc.size
        length = _content_length(response)
        if length is not None and start + length > desc.size:
            raise DataLoss(
                f"{where}: server announces {start + length} bytes, blob has {desc.size}"
            )
        return BlobStream(
            response,
            desc=desc,
            offset=start,
            end=end,
            host=host,
            on_bytes=self._count_bytes,
            speed=self._speed,
            pooled=pooled,
        )

    async def _open_urls(
        self, desc: Descriptor, headers: dict[str, str], offset: int, end: int
    ) -> BlobStream | None:
        """Try a non-distributable layer's external URLs; None if none served it."""
        for url in desc.urls:
            try:
                parts = urlsplit(url)
            except ValueError:
                continue
            if parts.scheme not in ("http", "https"):
                continue
            self._count("url")
            try:
                _, response = await self._send(
                    parts.netloc, f"blob {desc.digest}", "GET", url, headers=headers
                )
            except CkfsError as e:
                _log.info("%s", e)
                continue
            if response.status_code in (200, 206):
                try:
                    return self._blob_stream(response, desc, offset, end, parts.netloc)
                except CkfsError as e:
                    await response.aclose()
                    _log.info("%s", e)
                    continue
            _log.info(
                "blob %s: %s answered HTTP %d", desc.digest, parts.netloc, response.status_code
            )
            await response.aclose()
        return None


# -- helpers --------------------------------------------------------------------


class _BrokenOff(Unavailable):
    """A range body broke off or ended early; `RegistryClient.read_range` resumes it."""


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


async def _raw_body(response: httpx.Response) -> AsyncIterator[bytes]:
    """*response*'s body as it arrives, read past h11 when that is safe.

    Why: on its way out of httpx a body byte is copied four times on the
    event loop's thread (into h11's buffer, two slices of it, then
    ``bytes``), the thread that receives every blob of a pull: for a 234 MB
    image from a local registry that was more than half of the thread's CPU
    time (0.24 of 0.43 s of the whole process's). A plain-TCP HTTP/1.1 body
    of stated length needs no parsing, so once the first chunk has come
    through httpx (a body event takes everything h11 holds, up to the body's
    end) the rest is read from the socket straight, never past the stated
    length, under the request's read timeout. h11 then never sees the body
    end, so the connection is closed with the response instead of going back
    to the pool: one new connection per blob. TLS, chunked, HTTP/2, an
    unstated length and transports without a socket (tests' mock transports)
    keep httpx's path throughout.
    """
    # httpx types it as an iterator; it is an async generator, closed below.
    raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
    try:
        first = await anext(raw, None)
        if first is None:
            return
        yield first
        sock = _plain_socket(response)
        if sock is None:
            async for chunk in raw:
                yield chunk
            return
        left = (_content_length(response) or 0) - len(first)
        timeout = response.request.extensions.get("timeout", {}).get("read")
        while left > 0:
            try:
                with trio.fail_after(math.inf if timeout is None else timeout):
                    chunk = await sock.recv(min(left, HTTP_READ_SIZE))
            except trio.TooSlowError:
                raise httpx.ReadTimeout("timed out", request=response.request) from None
            except OSError as e:
                raise httpx.ReadError(str(e), request=response.request) from None
            if not chunk:
                return  # the caller names the early end
            left -= len(chunk)
            yield chunk
    finally:
        await raw.aclose()


def _plain_socket(response: httpx.Response) -> trio.socket.SocketType | None:
    """The socket under *response* if its body can be read from it unparsed, else None."""
    if response.http_version != "HTTP/1.1" or "transfer-encoding" in response.headers:
        return None
    if _content_length(response) is None:
        return None
    stream = response.extensions.get("network_stream")
    if stream is None or stream.get_extra_info("ssl_object") is not None:
        return None
    sock = stream.get_extra_info("socket")
    return sock if isinstance(sock, trio.socket.SocketType) else None


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


def _media_type(response: httpx.Response) -> str:
    value: str = response.headers.get("content-type", "")
    return value.split(";", 1)[0].strip().lower()


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "").strip()
    return int(value) if _NUMBER.fullmatch(value) else None


def _header_digest(response: httpx.Response, where: str) -> Digest | None:
    value = response.headers.get(_HEADER_DIGEST)
    if not value:
        return None
    try:
        return Digest.parse(value.strip())
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: bad Docker-Content-Digest header: {e}") from None


def _check_header_digest(response: httpx.Response, expected: Digest, where: str) -> None:
    got = _header_digest(response, where)
    if got is not None and got.algorithm == expected.algorithm and got != expected:
        raise DataLoss(f"{where}: Docker-Content-Digest {got} does not match {expected}")


def _deadline(response: httpx.Response) -> Deadline:
    """The `Deadline` `RegistryClient._send` gave the response's attempt."""
    deadline = response.extensions.get(_DEADLINE)
    return deadline if isinstance(deadline, Deadline) else Deadline(float("inf"), float("inf"))


async def _read_limited(
    response: httpx.Response, limit: int, where: str, *, oversize: bool = False
) -> bytes:
    """Read a body of at most *limit* bytes, refusing more while it streams.

    Args:
        oversize: More than *limit* is `InvalidArgument` (a manifest over the
            4 MiB cap) instead of `DataLoss` (more than the descriptor said).
    """
    announced = _content_length(response)
    if announced is not None and announced > limit:
        raise _too_big(where, announced, limit, oversize)
    with _deadline(response).enforce(f"{where}: body"):
        data = await read_capped(response, limit, where)
    if len(data) > limit:
        raise _too_big(where, len(data), limit, oversize)
    return data


def _too_big(where: str, n: int, limit: int, oversize: bool) -> CkfsError:
    if oversize:
        return InvalidArgument(f"{where}: more than the {limit} byte manifest limit")
    return DataLoss(f"{where}: {n} bytes, more than the expected {limit}")


def _verify(data: bytes, desc: Descriptor, where: str) -> None:
    if len(data) != desc.size:
        raise DataLoss(f"{where}: size {len(data)} does not match expected {desc.size}")
    hasher = desc.digest.digester()
    hasher.update(data)
    actual = hasher.digest()
    if actual != desc.digest:
        raise DataLoss(f"{where}: digest mismatch, got {actual}")


def _sniff_media_type(declared: str, data: bytes, where: str) -> str:
    """The manifest's media type: the header's, else the body's ``mediaType`` or shape."""
    if declared in mt.SCHEMA1:
        raise InvalidArgument(f"{where}: {SCHEMA1_HINT}")
    if mt.is_index(declared) or mt.is_manifest(declared):
        return declared
    body = parse_json(data, f"{where} (Content-Type {declared or 'none'})")
    if not isinstance(body, dict):
        raise InvalidArgument(f"{where}: not a JSON object")
    media_type = body_media_type(body, where)
    if media_type is None:
        shown = body.get("mediaType") or declared or "none"
        raise InvalidArgument(
            f"{where}: unknown media type {shown!r}, not an image manifest or index"
        )
    return media_type


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
        with _deadline(response).enforce("error body"):
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
