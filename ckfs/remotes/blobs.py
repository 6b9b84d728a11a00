"""Blob bytes from a registry: streams for whole layers, ranges for lazy reads.

Two ways to read a blob, both through the `ckfs.remotes.requests.Engine`
(so with its authentication, retries, backoff, mirrors and redirects) and
neither verified here:

- `Blobs.open` → `BlobStream`: a whole layer (or its rest, from an
  offset) for ``ckfs pull``. The caller hashes the bytes while writing
  them and resumes a broken stream itself at `BlobStream.position`. A
  plain-HTTP body is read from the socket past h11 (`_raw_body`), which
  costs the connection: it is closed, not pooled.
- `Blobs.read_range` → bytes: one window, for the lazy (FUSE) path. One
  closed ``Range`` GET read through httpx, so its connection goes back to
  the pool and the next read pays for a request, not a connection; a body
  that breaks off is asked for again from the byte it reached. A range
  cannot be checked against the blob's digest: the caller (the layer
  index) checks the bytes against what it trusts before serving or
  caching them.

A server that ignores a range (HTTP 200) is taken at its word: a stream
starts at 0 (`BlobStream.offset` says so), a range read cuts its window out
of the whole blob and closes the connection before the rest. A 206 must
start where asked and agree with the descriptor's size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import cast
from urllib.parse import urlsplit

import httpx
import trio

from ckfs.descriptor import Descriptor
from ckfs.errors import CkfsError, DataLoss, InvalidArgument, Unavailable
from ckfs.reference import Reference
from ckfs.remotes.auth import pull_scope
from ckfs.remotes.bounds import SpeedLimit, TooSlow, describe
from ckfs.remotes.hosts import RegistryHost
from ckfs.remotes.requests import HTTP_READ_SIZE, Engine, content_length

__all__ = ["MAX_RANGE", "RANGE_RESUMES", "BlobStream", "Blobs"]

_log = logging.getLogger(__name__)

#: Longest window one `RegistryClient.read_range` returns: it is held in
#: memory whole. The lazy path reads chunks and spans of a few MiB (an
#: eStargz TOC is larger but still far below this); a longer read is a bug
#: or a hostile index, and `open_blob` streams anything that big anyway.
MAX_RANGE = 64 << 20

#: Times one `RegistryClient.read_range` asks again for the rest of a body
#: that broke off or ended early, from the byte it reached. A request that
#: fails before its body is retried by `Engine.request` instead; this bounds
#: connections that keep dropping mid-body, which a FUSE read waits on.
RANGE_RESUMES = 3

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)", re.ASCII)


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

    *pooled* reads the body through httpx, so the connection goes back to
    the pool (range reads: a small window wants its connection again);
    otherwise a plain-HTTP body is read from the socket (`_raw_body`:
    cheaper for a whole layer, and the connection is closed).
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


class Blobs:
    """The blob half of `ckfs.remotes.registry.RegistryClient`.

    Args:
        engine: Sends every request.
        speed: The slowest body kept (`ckfs.remotes.bounds.SpeedLimit`).
    """

    def __init__(self, engine: Engine, speed: SpeedLimit) -> None:
        self._engine = engine
        self._speed = speed

    @contextlib.asynccontextmanager
    async def open(
        self,
        ref: Reference,
        desc: Descriptor,
        offset: int,
        length: int | None,
        allow_urls: bool,
    ) -> AsyncIterator[BlobStream]:
        """A download of *desc* from *offset*: `RegistryClient.open_blob`."""
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
                on_bytes=self._engine.count_bytes,
                speed=self._speed,
            )
            return
        headers = {}
        if offset > 0 or end < desc.size:
            headers["Range"] = (
                f"bytes={offset}-{end - 1}" if end < desc.size else f"bytes={offset}-"
            )

        async def on(host: RegistryHost, last: bool) -> BlobStream:
            response = await self._get(
                host, last, ref, desc, "blob", headers, f"{where} of {ref.path}"
            )
            try:
                return self._stream(response, desc, offset, end, host.host)
            except BaseException:
                await response.aclose()
                raise

        stream = None
        if allow_urls and desc.urls:
            stream = await self._open_urls(desc, headers, offset, end)
        if stream is None:
            stream = await self._engine.on_hosts("pull", f"fetch {where}", on)
        try:
            yield stream
        finally:
            if stream._response is not None:
                await stream._response.aclose()

    async def read_range(self, ref: Reference, desc: Descriptor, offset: int, length: int) -> bytes:
        """Exactly *length* bytes of *desc* from *offset*: `RegistryClient.read_range`."""
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
            headers = {"Range": f"bytes={start}-{end - 1}"}
            what = f"{where} of {ref.path} (bytes {start}-{end - 1})"
            response = await self._get(host, last, ref, desc, "range", headers, what)
            async with contextlib.aclosing(response):
                stream = self._stream(response, desc, start, end, host.host, pooled=True)
                if response.status_code == 200:
                    self._ignored_range(host)
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
                await self._engine.on_hosts("pull", f"read {where}", on)
            except _BrokenOff as e:
                if resumes >= RANGE_RESUMES:
                    raise Unavailable(f"{e} (gave up after {resumes} resumes)") from None
                resumes += 1
                self._engine.count("resume")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _ignored_range(self, host: RegistryHost) -> None:
        """Count a range answered with the whole blob; say so once, it makes lazy reads slow."""
        self._engine.count("range_ignored")
        if self._engine.stats["range_ignored"] == 1:
            _log.warning(
                "registry host %s ignores Range requests: each lazy read downloads "
                "its blob from the start up to the bytes it needs",
                host.host,
            )

    async def _get(
        self,
        host: RegistryHost,
        last: bool,
        ref: Reference,
        desc: Descriptor,
        kind: str,
        headers: dict[str, str],
        what: str,
    ) -> httpx.Response:
        """The registry's answer to a GET of *desc* on *host*, body unread."""
        return await self._engine.request(
            host,
            "GET",
            f"{ref.path}/blobs/{desc.digest}",
            kind=kind,
            scope=pull_scope(ref.path),
            headers=headers,
            last=last,
            what=what,
        )

    def _stream(
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
        length = content_length(response)
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
            on_bytes=self._engine.count_bytes,
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
            self._engine.count("url")
            try:
                _, response = await self._engine.send(
                    parts.netloc, f"blob {desc.digest}", "GET", url, headers=headers
                )
            except CkfsError as e:
                _log.info("%s", e)
                continue
            if response.status_code in (200, 206):
                try:
                    return self._stream(response, desc, offset, end, parts.netloc)
                except CkfsError as e:
                    await response.aclose()
                    _log.info("%s", e)
                    continue
            _log.info(
                "blob %s: %s answered HTTP %d", desc.digest, parts.netloc, response.status_code
            )
            await response.aclose()
        return None


class _BrokenOff(Unavailable):
    """A range body broke off or ended early; `RegistryClient.read_range` resumes it."""


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
        left = (content_length(response) or 0) - len(first)
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
    if content_length(response) is None:
        return None
    stream = response.extensions.get("network_stream")
    if stream is None or stream.get_extra_info("ssl_object") is not None:
        return None
    sock = stream.get_extra_info("socket")
    return sock if isinstance(sock, trio.socket.SocketType) else None
