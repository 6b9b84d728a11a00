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

Every request goes through one `ckfs.remotes.requests.Engine`, which
authenticates it (401 → new credentials), retries it (connection errors,
408, 5xx and 429, with backoff, on the upstream host; mirrors are skipped
at once), bounds its waits and its time, and maps failures to the errors
below; its docstring has the rules.

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

Redirects are followed (registries send blob GETs to object storage)
without the registry's token; every request asks for
``Accept-Encoding: identity`` (`ckfs.remotes.requests`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from types import TracebackType

import httpx

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, Digester
from ckfs.errors import DataLoss, InvalidArgument
from ckfs.images.manifest import MAX_MANIFEST_SIZE, SCHEMA1_HINT, body_media_type
from ckfs.jsondoc import parse_json
from ckfs.reference import Reference
from ckfs.remotes.auth import Credentials, pull_scope
from ckfs.remotes.blobs import MAX_RANGE, RANGE_RESUMES, Blobs, BlobStream
from ckfs.remotes.bounds import LOW_SPEED_TIME, MIN_RATE, REQUEST_TIMEOUT, SpeedLimit
from ckfs.remotes.hosts import RegistryHost
from ckfs.remotes.requests import MAX_RETRY_AFTER, Engine, content_length, read_limited

__all__ = ["MAX_RANGE", "MAX_RETRY_AFTER", "RANGE_RESUMES", "BlobStream", "RegistryClient"]

_log = logging.getLogger(__name__)

_HEADER_DIGEST = "docker-content-digest"


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
        retries: Extra attempts for a failing request (which failures:
            `ckfs.remotes.requests`).
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
        self._engine = Engine(
            ref_domain,
            hosts=hosts,
            credentials=credentials,
            transport=transport,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries=retries,
            request_timeout=request_timeout,
        )
        self._blobs = Blobs(self._engine, SpeedLimit(max(0.0, min_rate), low_speed_time))

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
        await self._engine.aclose()

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
        return dict(self._engine.stats)

    # -- the operations ------------------------------------------------------------

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

        return await self._engine.on_hosts(capability, f"resolve {ref}", on)

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
            response = await self._engine.request(
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
                data = await read_limited(response, desc.size, f"{where} from {host.host}")
            _verify(data, desc, f"{where} from registry {host.host}")
            return data

        return await self._engine.on_hosts("pull", f"fetch {where}", on)

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
        self._check_ref(ref)
        return self._blobs.open(ref, desc, offset, length, allow_urls)

    async def read_range(self, ref: Reference, desc: Descriptor, offset: int, length: int) -> bytes:
        """Bytes *offset* to *offset* + *length* of the blob *desc*: the lazy path's read.

        One ``Range: bytes=<first>-<last>`` GET, read through httpx so its
        connection goes back to the pool (`open_blob` bodies bypass h11 and
        close theirs): a FUSE read pays for a request, not a connection, and
        a cached token is reused. Authentication, retries, backoff, mirrors
        and redirects are those of every blob GET (`ckfs.remotes.requests`).
        A body that breaks off or ends early is asked for again from the
        byte it reached, at most `RANGE_RESUMES` times; a body slower than
        ``min_rate`` is not (`TooSlow`). The caller's cancel scope bounds
        the whole read.

        A server that ignores the range (HTTP 200, the whole blob) is read up
        to the window's end, the bytes before it discarded, and its
        connection closed: correct, but as slow as the window is far into
        the blob; ``range_ignored`` in `statistics` counts these, and the
        first is logged as a warning naming the host. Refusing would leave
        no lazy path at all on such a registry.

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
        return await self._blobs.read_range(ref, desc, offset, length)

    # -- internals -----------------------------------------------------------------

    def _check_ref(self, ref: Reference) -> None:
        if ref.domain != self.ref_domain:
            raise InvalidArgument(
                f"reference {ref} is not on registry {self.ref_domain} (this client's)"
            )

    async def _resolve_on(
        self, host: RegistryHost, ref: Reference, obj: str, last: bool
    ) -> Descriptor:
        path = f"{ref.path}/manifests/{obj}"
        accept = {"Accept": ", ".join(mt.MANIFEST_ACCEPT)}
        what = f"manifest {ref}"
        scope = pull_scope(ref.path)
        response = await self._engine.request(
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
        size = content_length(response)
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
        response = await self._engine.request(
            host, "GET", path, kind="resolve", scope=scope, headers=accept, last=last, what=what
        )
        async with contextlib.aclosing(response):
            data = await read_limited(
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


# -- helpers --------------------------------------------------------------------


def _media_type(response: httpx.Response) -> str:
    value: str = response.headers.get("content-type", "")
    return value.split(";", 1)[0].strip().lower()


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
