"""An HTTP proxy on the wire between ckfs and a registry, misbehaving on request.

Integration tests need to see what ckfs asks a registry (how many blob
requests, with which Range, how many body bytes went out) and to make the
network fail in the ways real ones do: a connection cut halfway through a
layer, bytes that are not what the digest promises, ``500`` and ``429``
answers, a redirect of blob downloads to another host (object storage),
a stall that leaves time to kill the client mid-download.

`FaultProxy` listens on two free 127.0.0.1 ports: the main one forwards to
the upstream registry; the *redirect* one stands in for object storage
(requests redirected there are forwarded upstream with the proxy's own
credentials, like a presigned URL, and whether an ``Authorization`` header
arrived is recorded). It runs its own trio loop in a daemon thread so
synchronous tests (which run ``ckfs`` as a subprocess) can use it.

The downstream side speaks HTTP/1.1 through h11, keep-alive included, so a
cut really is a TCP connection closing mid-body; upstream requests go
through an httpx client without redirects or decompression.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Literal

import h11
import httpx
import trio

__all__ = ["Fault", "FaultProxy", "Seen"]

FaultKind = Literal[
    "cut", "stall", "corrupt", "replace", "status", "ignore_range", "redirect", "delay", "trickle"
]

#: Headers that describe one hop, not the message; never forwarded.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)

_REDIRECT_PREFIX = "/redirected"


@dataclasses.dataclass
class Fault:
    """One misbehaviour for the next *times* requests whose path contains *path*.

    Kinds:
        cut: send the headers and *after* body bytes, then close the connection.
        stall: send *after* body bytes, then stop sending (until the proxy stops);
            `FaultProxy.stalled` is set when it happens.
        corrupt: flip one byte of the body (same length, wrong digest).
        replace: send *body* instead of the body's first ``len(body)`` bytes
            (same length: well-formed bytes with the wrong content, such as
            a valid gzip member of other data).
        status: answer *status* (with ``Retry-After: retry_after`` if given)
            instead of forwarding.
        ignore_range: forward without the Range header, so the registry
            answers 200 with the whole blob.
        redirect: answer 307 to the same path on the redirect port.
        delay: wait *seconds* before forwarding (a slow registry: lets a
            second client arrive while the first is still downloading).
        trickle: send *after* body bytes, then the rest one byte every
            *seconds* (a server that never stalls long enough for a read
            timeout yet never finishes).

    *times* < 0 means every matching request.
    """

    kind: FaultKind
    path: str = "/blobs/"
    method: str = "GET"
    times: int = 1
    after: int = 0
    status: int = 500
    retry_after: str | None = None
    seconds: float = 0.0
    body: bytes = b""


@dataclasses.dataclass
class Seen:
    """A request as the proxy saw it, and what it answered."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    redirected: bool
    status: int = 0
    #: Body bytes sent back to the client.
    body_bytes: int = 0
    fault: FaultKind | None = None


class FaultProxy:
    """A fault-injecting HTTP proxy in front of *upstream* (``host:port``).

    Args:
        upstream: the registry to forward to.
        upstream_auth: ``(user, password)`` the redirect port adds when it
            forwards (the main port forwards the client's own header).
    """

    def __init__(self, upstream: str, *, upstream_auth: tuple[str, str] | None = None) -> None:
        self.upstream = upstream
        self.port = 0
        self.redirect_port = 0
        self.seen: list[Seen] = []
        self.stalled = threading.Event()
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._auth = (
            "Basic " + base64.b64encode(f"{upstream_auth[0]}:{upstream_auth[1]}".encode()).decode()
            if upstream_auth
            else None
        )
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- control (from the test's thread) -------------------------------------------

    def add(self, fault: Fault) -> FaultProxy:
        with self._lock:
            self._faults.append(fault)
        return self

    def clear(self) -> None:
        """Drop all faults and the request log."""
        with self._lock:
            self._faults.clear()
            self.seen.clear()
        self.stalled.clear()

    def requests(self, path: str = "/blobs/", method: str = "GET") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.method == method and path in s.path]

    def body_bytes(self, path: str = "/blobs/") -> int:
        return sum(s.body_bytes for s in self.requests(path))

    def start(self) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                trio.run(self._main, ready)
            except BaseException as e:  # report start-up failures to start()
                failure.append(e)
                ready.set()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError(f"fault proxy did not start: {failure}")
        return self

    def stop(self) -> None:
        if self._thread is None or self._token is None or self._cancel is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(10)
        self._thread = None

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultProxy]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # -- the proxy (in its own trio thread) -----------------------------------------

    async def _main(self, ready: threading.Event) -> None:
        self._token = trio.lowlevel.current_trio_token()
        main = await trio.open_tcp_listeners(0, host="127.0.0.1")
        side = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = main[0].socket.getsockname()[1]
        self.redirect_port = side[0].socket.getsockname()[1]
        async with (
            httpx.AsyncClient(
                base_url=f"http://{self.upstream}", timeout=60, follow_redirects=False
            ) as client,
            trio.open_nursery() as nursery,
        ):
            self._cancel = nursery.cancel_scope
            nursery.start_soon(trio.serve_listeners, self._handler(client, False), main)
            nursery.start_soon(trio.serve_listeners, self._handler(client, True), side)
            ready.set()

    def _handler(
        self, client: httpx.AsyncClient, redirected: bool
    ) -> Callable[[trio.SocketStream], Awaitable[None]]:
        async def handle(stream: trio.SocketStream) -> None:
            await self._serve(client, redirected, stream)

        return handle

    def _take(self, method: str, path: str, redirected: bool) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.method != method or f.path not in path or f.times == 0:
                    continue
                if redirected and f.kind == "redirect":
                    continue
                if f.times > 0:
                    f.times -= 1
                return f
        return None

    async def _serve(
        self, client: httpx.AsyncClient, redirected: bool, stream: trio.SocketStream
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next_event(conn, stream)
                if not isinstance(event, h11.Request):
                    return
                body = b""
                while True:
                    part = await _next_event(conn, stream)
                    if isinstance(part, h11.Data):
                        body += bytes(part.data)
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return
                keep = await self._handle(conn, stream, client, event, body, redirected)
                if not keep or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()

    async def _handle(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        client: httpx.AsyncClient,
        request: h11.Request,
        body: bytes,
        redirected: bool,
    ) -> bool:
        """Answer one request; False when the connection must end (a cut)."""
        method = request.method.decode()
        target = request.target.decode()
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        path, _, query = target.partition("?")
        if redirected:
            path = path.removeprefix(_REDIRECT_PREFIX)
            target = target.removeprefix(_REDIRECT_PREFIX)
        seen = Seen(method, path, query, headers, redirected)
        fault = self._take(method, path, redirected)
        seen.fault = fault.kind if fault else None
        with self._lock:
            self.seen.append(seen)

        async def send(event: h11.Event) -> None:
            await stream.send_all(conn.send(event) or b"")

        if fault is not None and fault.kind in ("status", "redirect"):
            extra: list[tuple[str, str]] = []
            if fault.kind == "redirect":
                seen.status = 307
                location = f"http://127.0.0.1:{self.redirect_port}{_REDIRECT_PREFIX}{target}"
                extra.append(("Location", location))
            else:
                seen.status = fault.status
                if fault.retry_after is not None:
                    extra.append(("Retry-After", fault.retry_after))
            payload = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by faultproxy"}]}'
            await send(
                h11.Response(
                    status_code=seen.status,
                    headers=[
                        ("Content-Type", "application/json"),
                        ("Content-Length", str(len(payload) if method != "HEAD" else 0)),
                        *extra,
                    ],
                )
            )
            if method != "HEAD":
                await send(h11.Data(data=payload))
            await send(h11.EndOfMessage())
            return True

        if fault is not None and fault.kind == "delay":
            await trio.sleep(fault.seconds)
        forward = {k: v for k, v in headers.items() if k not in _HOP}
        if fault is not None and fault.kind == "ignore_range":
            forward.pop("range", None)
        if redirected and self._auth is not None:
            forward["authorization"] = self._auth
        upstream = client.build_request(method, target, headers=forward, content=body or None)
        response = await client.send(upstream, stream=True)
        try:
            seen.status = response.status_code
            out = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _HOP]
            await send(h11.Response(status_code=response.status_code, headers=out))
            limit = fault.after if fault is not None and fault.kind in ("cut", "stall") else None
            flip = fault is not None and fault.kind == "corrupt"
            patch = fault.body if fault is not None and fault.kind == "replace" else b""
            if fault is not None and fault.kind == "trickle":
                await self._trickle(send, response, fault, seen)
                return True
            async for chunk in response.aiter_raw():
                if flip and chunk:
                    mutable = bytearray(chunk)
                    mutable[len(mutable) // 2] ^= 0xFF
                    chunk, flip = bytes(mutable), False
                if seen.body_bytes < len(patch):
                    over = patch[seen.body_bytes : seen.body_bytes + len(chunk)]
                    chunk = over + chunk[len(over) :]
                if limit is not None and seen.body_bytes + len(chunk) >= limit:
                    rest = chunk[: limit - seen.body_bytes]
                    seen.body_bytes += len(rest)  # before the send: see below
                    if rest:
                        await send(h11.Data(data=rest))
                    if fault is not None and fault.kind == "stall":
                        self.stalled.set()
                        await trio.sleep_forever()
                    return False  # _serve closes the connection mid-body
                # Counted before it is sent: once a client has a byte, the count
                # has it too (counted after, a test could read it a moment short).
                seen.body_bytes += len(chunk)
                await send(h11.Data(data=chunk))
            await send(h11.EndOfMessage())
        finally:
            await response.aclose()
        return True

    @staticmethod
    async def _trickle(
        send: Callable[[h11.Event], Awaitable[None]],
        response: httpx.Response,
        fault: Fault,
        seen: Seen,
    ) -> None:
        body = await response.aread()
        await send(h11.Data(data=body[: fault.after]))
        seen.body_bytes = min(fault.after, len(body))
        for i in range(fault.after, len(body)):
            await trio.sleep(fault.seconds)
            await send(h11.Data(data=body[i : i + 1]))
            seen.body_bytes += 1
        await send(h11.EndOfMessage())


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> h11.Event | type:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        return event
