"""A hostile registry: crafted answers for faults no real registry produces on demand.

The hostile suite (``integration/test_hostile_*.py``) needs a registry that
sends JSON nested a hundred thousand deep, bodies that never end, one byte
a second, redirect loops, a storage host that answers 401, lying sizes and
digests. docker-registry cannot be made to do any of that, so this module
is a small HTTP/1.1 server of the project's own, on the wire like
`integration.faultproxy`: raw sockets, so a status line can trickle byte
by byte and a header can be whatever bytes a test wants.

Each behaviour is a *case*, chosen by the first path component of the
repository: ``127.0.0.1:PORT/<case>/img:latest`` is served by `CASES[case]`.
Routing by name keeps the server stateless across tests, which matters
because confined tests run in a forked child that cannot reconfigure a
server started by the parent: the server is one process for the session,
started by the fixture in `integration.test_hostile_registry` and stopped
by its PID.

Ports: the *main* one is the registry (``/v2/...``, token realms under
``/token/<case>``); the *storage* one stands in for object storage that
blob downloads are redirected to (``/s/<case>/...``). ``GET /_log/<case>``
on the main port answers what the server saw for that case (method, port,
path, whether an ``Authorization`` header came), so a test can check that
nothing was downloaded, or that no credential reached the storage host.

Bounded, so a ckfs that never gives up cannot keep it busy: every
connection ends after `MAX_CONNECTION_SECONDS`, at most `MAX_CONNECTIONS`
are served at once, and the process exits by itself after ``--lifetime``
seconds. Every answer closes its connection (``Connection: close``).

Run: ``python -m integration.hostile_registry [--lifetime SECONDS]``; it
prints ``<main port> <storage port>`` on stdout once listening.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import select
import socket
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

__all__ = ["CASES", "Case", "Image", "main"]

#: Seconds between two bytes of a trickle: slow enough that any sane
#: overall deadline trips, fast enough that a per-read timeout never does.
TRICKLE_GAP = 1.0

#: A connection is closed after this long whatever it is doing, so a stall
#: or an endless body ends even if ckfs never gives up.
MAX_CONNECTION_SECONDS = 60.0

#: Connections served at once; more wait in the listen backlog.
MAX_CONNECTIONS = 64

#: Request heads larger than this are refused (a 900 KiB token fits).
MAX_REQUEST_HEAD = 2 << 20

#: Nesting of the "deep" JSON documents: far past any recursion limit.
DEEP = 100_000

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

#: A terminal-title injection and a C1 control (CSI as one byte): what a
#: hostile string carries to see whether ckfs prints it raw.
EVIL = "\x1b]0;pwned\x07\x9b31m"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


#: Nesting Python's json module still parses (its C scanner recurses to
#: about 1,000 levels): only ckfs's own depth limit refuses it.
PARSEABLE_DEEP = 900


def deep_json(prefix: bytes = b'{"a":', suffix: bytes = b"}", depth: int = DEEP) -> bytes:
    """Valid JSON nested *depth* levels: ``{"a":[[[...]]]}``."""
    return prefix + b"[" * depth + b"]" * depth + suffix


def tiny_tar(name: str = "hello", data: bytes = b"hello\n") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tree_tar(dirs: list[str], leaf: str = "leaf") -> bytes:
    """A layer of nested directories *dirs* with a file at the bottom (PAX names, any length)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        path = ""
        for d in dirs:
            path = f"{path}{d}/"
            info = tarfile.TarInfo(path.rstrip("/"))
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        info = tarfile.TarInfo(path + leaf)
        info.size = 3
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(b"end"))
    return buf.getvalue()


def desc(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


@dataclasses.dataclass
class Image:
    """What a case serves: documents by digest, blobs by digest, the tag's target."""

    top: str
    manifests: dict[str, tuple[str, bytes]]
    blobs: dict[str, bytes]

    def add_manifest(self, media_type: str, body: bytes) -> str:
        digest = sha256(body)
        self.manifests[digest] = (media_type, body)
        return digest


def config_of(layers: list[bytes]) -> dict[str, Any]:
    """A good linux/amd64 config for uncompressed *layers*."""
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(x) for x in layers]},
    }


def image(
    *,
    config: bytes | None = None,
    layers: list[bytes] | None = None,
    layer_descs: list[dict[str, Any]] | None = None,
    config_desc: dict[str, Any] | None = None,
    manifest: bytes | None = None,
) -> Image:
    """A one-platform image; any part may be replaced by crafted bytes or descriptors."""
    layers = [tiny_tar()] if layers is None else layers
    if config is None:
        config = json.dumps(config_of(layers)).encode()
    blobs = {sha256(b): b for b in [config, *layers]}
    if manifest is None:
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config_desc or desc(OCI_CONFIG, config),
                "layers": layer_descs or [desc(OCI_LAYER, x) for x in layers],
            }
        ).encode()
    img = Image(top="", manifests={}, blobs=blobs)
    img.top = img.add_manifest(OCI_MANIFEST, manifest)
    return img


def index_of(img: Image, children: list[dict[str, Any]] | None = None) -> Image:
    """*img* behind an OCI index (for linux/amd64), or an index of *children*."""
    media_type, body = img.manifests[img.top]
    entries = children or [
        desc(media_type, body, platform={"architecture": "amd64", "os": "linux"})
    ]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    img.top = img.add_manifest(OCI_INDEX, index)
    return img


# -- the wire -------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    port: str  # "main" or "storage"
    case: str
    rest: list[str]  # path components after the case (and ``img``)


class Conn:
    """One client connection: raw writes, trickles, stalls, endless bodies."""

    def __init__(self, sock: socket.socket, server: Server) -> None:
        self.sock = sock
        self.server = server
        self.deadline = time.monotonic() + MAX_CONNECTION_SECONDS

    def alive(self) -> bool:
        """Whether the client is still there (and the connection's time is not up)."""
        if time.monotonic() >= self.deadline or self.server.stopping.is_set():
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if readable and not self.sock.recv(4096, socket.MSG_PEEK):
                return False
        except OSError:
            return False
        return True

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def trickle(self, data: bytes, gap: float = TRICKLE_GAP) -> None:
        for i in range(len(data)):
            if not self.alive():
                return
            self.send(data[i : i + 1])
            self.wait(gap)

    def wait(self, seconds: float) -> None:
        """Sleep up to *seconds*, returning early when the client leaves."""
        end = min(time.monotonic() + seconds, self.deadline)
        while time.monotonic() < end and self.alive():
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    def stall(self) -> None:
        self.wait(MAX_CONNECTION_SECONDS)

    @staticmethod
    def head(status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} Hostile", *(f"{k}: {v}" for k, v in headers)]
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def respond(
        self,
        req: Request,
        status: int,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        *,
        length: int | None = None,
        trickle: str | None = None,
    ) -> None:
        """Answer with *body*; *length* may lie; *trickle* is ``all`` or ``body``."""
        headers = list(headers or [])
        headers.append(("Content-Length", str(len(body) if length is None else length)))
        payload = b"" if req.method == "HEAD" else body
        head = self.head(status, headers)
        if trickle == "all":
            self.trickle(head + payload)
        elif trickle == "body":
            self.send(head)
            self.trickle(payload)
        else:
            self.send(head + payload)

    def endless(
        self, req: Request, status: int, headers: list[tuple[str, str]], first: bytes, fill: bytes
    ) -> None:
        """*first*, then *fill* repeated until the client leaves (close-delimited)."""
        self.send(self.head(status, headers))
        if req.method == "HEAD":
            return
        self.send(first)
        chunk = fill * max(1, (64 << 10) // len(fill))
        while self.alive():
            self.send(chunk)


Handler = Callable[["Server", Request, Conn, "Case"], None]


@dataclasses.dataclass
class Case:
    """How one case answers; a None handler serves its `Image` faithfully.

    Attributes:
        image: What is served by default.
        manifest: Answers manifest requests (HEAD and GET, tag or digest).
        blob: Answers blob requests on the main port.
        token: Answers the token realm ``/token/<case>``.
        storage: Answers requests on the storage port.
        auth: ``bearer`` or ``basic``: answer 401 with `challenge` until the
            request carries `TOKEN` (bearer) or `BASIC` credentials.
        challenge: The ``WWW-Authenticate`` value (default: a Bearer
            challenge naming this case's token realm).
    """

    image: Image = dataclasses.field(default_factory=image)
    manifest: Handler | None = None
    blob: Handler | None = None
    token: Handler | None = None
    storage: Handler | None = None
    auth: str | None = None
    challenge: str | None = None


TOKEN = "hostile-token"
#: ``-u hostile:s3cret`` as the registry expects it.
BASIC = "Basic aG9zdGlsZTpzM2NyZXQ="
USER = "hostile:s3cret"


class Server:
    """The two listening sockets and the bookkeeping; see the module docstring."""

    def __init__(self, lifetime: float) -> None:
        self.main = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.storage = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.main.getsockname()[1]
        self.storage_port = self.storage.getsockname()[1]
        self.lifetime = lifetime
        self.stopping = threading.Event()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.log: dict[str, list[dict[str, Any]]] = {}
        self.lock = threading.Lock()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage_host(self) -> str:
        return f"127.0.0.1:{self.storage_port}"

    def serve(self) -> None:
        for sock, port in ((self.main, "main"), (self.storage, "storage")):
            threading.Thread(target=self._accept, args=(sock, port), daemon=True).start()
        self.stopping.wait(self.lifetime)
        self.stopping.set()

    def _accept(self, listener: socket.socket, port: str) -> None:
        listener.settimeout(0.5)
        while not self.stopping.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.slots.acquire()
            threading.Thread(target=self._connection, args=(sock, port), daemon=True).start()

    def _connection(self, sock: socket.socket, port: str) -> None:
        try:
            sock.settimeout(MAX_CONNECTION_SECONDS)
            req = self._read_request(sock, port)
            if req is not None:
                self._dispatch(req, Conn(sock, self))
        except OSError:
            pass  # the client left: what most hostile cases end with
        finally:
            sock.close()
            self.slots.release()

    def _read_request(self, sock: socket.socket, port: str) -> Request | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
            if len(data) > MAX_REQUEST_HEAD:
                sock.sendall(Conn.head(431, [("Content-Length", "0")]))
                return None
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        first, *lines = head.split("\r\n")
        method, target, _ = first.split(" ", 2)
        headers = {}
        for line in lines:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        url = urlsplit(target)
        parts = [p for p in url.path.split("/") if p]
        if parts[:1] in (["v2"], ["token"], ["s"], ["_log"]):
            parts = parts[1:]
        case = parts[0] if parts else ""
        rest = parts[1:]
        if rest[:1] == ["img"]:
            rest = rest[1:]
        req = Request(method, url.path, url.query, headers, port, case, rest)
        with self.lock:
            self.log.setdefault(case, []).append(
                {
                    "method": method,
                    "port": port,
                    "path": url.path,
                    "authorization": "authorization" in headers,
                }
            )
        return req

    def _dispatch(self, req: Request, conn: Conn) -> None:
        if req.path.startswith("/_log/"):
            with self.lock:
                seen = [r for r in self.log.get(req.case, []) if not r["path"].startswith("/_log")]
            conn.respond(req, 200, json.dumps(seen).encode())
            return
        if req.path == "/v2/" or req.path == "/v2":
            conn.respond(req, 200, b"{}")
            return
        case = CASES.get(req.case)
        if case is None:
            conn.respond(req, 404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')
            return
        if req.port == "storage":
            (case.storage or serve_blob)(self, req, conn, case)
        elif req.path.startswith("/token/"):
            (case.token or serve_token)(self, req, conn, case)
        elif not self._authorized(req, conn, case):
            return
        elif req.rest[:1] == ["manifests"]:
            (case.manifest or serve_manifest)(self, req, conn, case)
        elif req.rest[:1] == ["blobs"]:
            (case.blob or serve_blob)(self, req, conn, case)
        else:
            conn.respond(req, 404)

    def _authorized(self, req: Request, conn: Conn, case: Case) -> bool:
        if case.auth is None:
            return True
        wanted = BASIC if case.auth == "basic" else f"Bearer {TOKEN}"
        if req.headers.get("authorization") == wanted:
            return True
        challenge = case.challenge or bearer_challenge(self, req.case)
        if case.auth == "basic" and case.challenge is None:
            challenge = 'Basic realm="hostile"'
        conn.respond(req, 401, b"", [("WWW-Authenticate", challenge)])
        return False


def bearer_challenge(server: Server, case: str, realm: str | None = None) -> str:
    realm = realm or f"http://{server.host}/token/{case}"
    return f'Bearer realm="{realm}",service="hostile",scope="repository:{case}/img:pull"'


# -- faithful answers (what a case falls back to) -------------------------------


def serve_manifest(server: Server, req: Request, conn: Conn, case: Case) -> None:
    ref = req.rest[1] if len(req.rest) > 1 else ""
    digest = case.image.top if ":" not in ref else ref
    found = case.image.manifests.get(digest)
    if found is None:
        conn.respond(req, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
        return
    media_type, body = found
    conn.respond(req, 200, body, [("Content-Type", media_type), ("Docker-Content-Digest", digest)])


def serve_blob(server: Server, req: Request, conn: Conn, case: Case) -> None:
    digest = req.rest[-1] if req.rest else ""
    body = case.image.blobs.get(digest)
    if body is None:
        conn.respond(req, 404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
        return
    start = _range_start(req)
    if start:
        conn.respond(
            req,
            206,
            body[start:],
            [("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")],
        )
        return
    conn.respond(req, 200, body, [("Content-Type", "application/octet-stream")])


def serve_token(server: Server, req: Request, conn: Conn, case: Case) -> None:
    conn.respond(req, 200, json.dumps({"token": TOKEN}).encode(), JSON)


def _range_start(req: Request) -> int:
    value = req.headers.get("range", "")
    if value.startswith("bytes="):
        return int(value[6:].split("-", 1)[0] or 0)
    return 0


JSON = [("Content-Type", "application/json")]


# -- hostile answers ------------------------------------------------------------


def status(code: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> Handler:
    def handle(server: Server, req: Request, conn: Conn, case: Case) -> None:
        conn.respond(req, code, body, (headers or []) + JSON)

    return handle


def trickled(part: str, inner: Handler | None = None) -> Handler:
    """The faithful answer (or *inner*'s), one byte per `TRICKLE_GAP`."""

    def handle(server: Server, req: Request, conn: Conn, case: Case) -> None:
        real_respond = conn.respond

        def slow(*args: Any, **kwargs: Any) -> None:
            real_respond(*args, **{**kwargs, "trickle": part})

        conn.respond = slow  # type: ignore[method-assign]
        (inner or _faithful(req))(server, req, conn, case)

    return handle


def _faithful(req: Request) -> Handler:
    if req.path.startswith("/token/"):
        return serve_token
    return serve_manifest if req.rest[:1] == ["manifests"] else serve_blob


def stall(server: Server, req: Request, conn: Conn, case: Case) -> None:
    conn.stall()


def stall_midway(server: Server, req: Request, conn: Conn, case: Case) -> None:
    """Headers and half the body, then nothing."""
    body = case.image.blobs.get(req.rest[-1], b"")
    start = _range_start(req)
    head = [("Content-Length", str(len(body) - start))]
    if start:
        head.append(("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}"))
    conn.send(conn.head(206 if start else 200, head))
    conn.send(body[start : start + max(1, (len(body) - start) // 2)])
    conn.stall()


def endless(first: bytes, fill: bytes, code: int = 200) -> Handler:
    def handle(server: Server, req: Request, conn: Conn, case: Case) -> None:
        conn.endless(req, code, JSON, first, fill)

    return handle


def declared(size: int, first: bytes, fill: bytes, code: int = 200) -> Handler:
    """A ``Content-Length`` of *size*, then *first* and *fill* until the client leaves."""

    def handle(server: Server, req: Request, conn: Conn, case: Case) -> None:
        conn.endless(req, code, [*JSON, ("Content-Length", str(size))], first, fill)

    return handle


def redirect(to: Callable[[Server, Request], str], code: int = 307) -> Handler:
    def handle(server: Server, req: Request, conn: Conn, case: Case) -> None:
        conn.respond(req, code, b"", [("Location", to(server, req))])

    return handle


def _self(server: Server, req: Request) -> str:
    return f"http://{server.host}{req.path}"


def _to_storage(server: Server, req: Request) -> str:
    return f"http://{server.storage_host}/s/{req.case}/{'/'.join(req.rest)}"


def _to_main(server: Server, req: Request) -> str:
    return f"http://{server.host}/v2/{req.case}/img/{'/'.join(req.rest)}"


def only_blob(digest_of: Callable[[Case], str], handler: Handler) -> Handler:
    """*handler* for one blob (chosen from the case), the faithful answer for the rest."""

    def handle(server: Server, req: Request, conn: Conn, case: Case) -> None:
        if req.rest[-1:] == [digest_of(case)]:
            handler(server, req, conn, case)
        else:
            serve_blob(server, req, conn, case)

    return handle


def layer0(case: Case) -> str:
    body = json.loads(case.image.manifests[case.image.top][1])
    return str(body["layers"][0]["digest"])


def head_without_digest(inner: Handler) -> Handler:
    """HEAD answers 405 (so the client GETs the tag); GET goes to *inner*."""

    def handle(server: Server, req: Request, conn: Conn, case: Case) -> None:
        if req.method == "HEAD":
            conn.respond(req, 405)
        else:
            inner(server, req, conn, case)

    return handle


def manifest_bytes(body: bytes, media_type: str = OCI_MANIFEST, *, lie: int = 0) -> Handler:
    """Serve *body* as the manifest, its digest honest, its length off by *lie*."""

    def handle(server: Server, req: Request, conn: Conn, case: Case) -> None:
        digest = sha256(body)
        conn.respond(
            req,
            200,
            body,
            [("Content-Type", media_type), ("Docker-Content-Digest", digest)],
            length=len(body) + lie,
        )

    return handle


def raw(data: bytes) -> Handler:
    def handle(server: Server, req: Request, conn: Conn, case: Case) -> None:
        conn.send(data)

    return handle


def error_body(message: str, code: int = 403) -> Handler:
    body = json.dumps({"errors": [{"code": "DENIED", "message": message}]}).encode()
    return status(code, body)


def manifests_serving(body: bytes, media_type: str, *, digest_header: bool = True) -> Handler:
    """Any manifest request answers *body* (with its true digest in the header, if any)."""

    def handle(server: Server, req: Request, conn: Conn, case: Case) -> None:
        headers = [("Content-Type", media_type)]
        if digest_header:
            headers.append(("Docker-Content-Digest", sha256(body)))
        conn.respond(req, 200, body, headers)

    return handle


def index_chain(depth: int) -> Image:
    """Indexes nested *depth* deep, the innermost one empty: each is a distinct, valid document."""
    img = Image(top="", manifests={}, blobs={})
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    digest = img.add_manifest(OCI_INDEX, body)
    for _ in range(depth):
        entry = {
            "mediaType": OCI_INDEX,
            "digest": digest,
            "size": len(body),
            "platform": {"architecture": "amd64", "os": "linux"},
        }
        body = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        ).encode()
        digest = img.add_manifest(OCI_INDEX, body)
    img.top = digest
    return img


def many_layers(n: int) -> Image:
    """A manifest of *n* distinct layers; never meant to be fetched, so not even tars."""
    return image(layers=[b"layer %d" % i for i in range(n)])


def self_listing_index() -> bytes:
    """An index whose one child has the index's own size and a digest it cannot have.

    Serving these bytes for the child fakes a cycle: a client that did not
    verify digests would walk it forever.
    """
    size = 0
    while True:
        entry = {
            "mediaType": OCI_INDEX,
            "digest": "sha256:" + "cd" * 32,
            "size": size,
            "platform": {"architecture": "amd64", "os": "linux"},
        }
        body = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        ).encode()
        if len(body) == size:
            return body
        size = len(body)


def storage_bearer_401(server: Server, req: Request, conn: Conn, case: Case) -> None:
    """A storage host challenging with a realm of its own (which must never be asked)."""
    realm = f"http://{server.storage_host}/s/{req.case}/token"
    challenge = bearer_challenge(server, req.case, realm)
    conn.respond(req, 401, b"", [("WWW-Authenticate", challenge)])


def head_lies_digest(server: Server, req: Request, conn: Conn, case: Case) -> None:
    """HEAD names a digest the body does not have; a GET of it serves the true body."""
    body = case.image.manifests[case.image.top][1]
    lie = "sha256:" + "ab" * 32
    headers = [("Content-Type", OCI_MANIFEST), ("Docker-Content-Digest", lie)]
    conn.respond(req, 200, body, headers)


def head_huge(server: Server, req: Request, conn: Conn, case: Case) -> None:
    headers = [("Content-Type", OCI_MANIFEST), ("Docker-Content-Digest", "sha256:" + "ab" * 32)]
    conn.respond(req, 200, b"", headers, length=5 << 30)


def digest_header_evil(server: Server, req: Request, conn: Conn, case: Case) -> None:
    body = case.image.manifests[case.image.top][1]
    headers = [
        ("Content-Type", OCI_MANIFEST),
        ("Docker-Content-Digest", "sha256:\x9b31m" + "f" * 60),
    ]
    conn.respond(req, 200, body, headers)


def wrong_bytes(server: Server, req: Request, conn: Conn, case: Case) -> None:
    conn.respond(req, 200, b"\0" * len(case.image.blobs[req.rest[-1]]))


def cut_short(server: Server, req: Request, conn: Conn, case: Case) -> None:
    """Promise the whole blob, send 100 bytes, close: every resume the same."""
    size = len(case.image.blobs[req.rest[-1]])
    conn.send(conn.head(200, [("Content-Length", str(size))]) + b"\0" * 100)


def bad_range(server: Server, req: Request, conn: Conn, case: Case) -> None:
    conn.respond(req, 206, b"x", [("Content-Range", "bytes 99-99/100")])


def peek_trickle(server: Server, req: Request, conn: Conn, case: Case) -> None:
    """The tag's HEAD (the re-pull peek) trickles; the rest is served."""
    (trickled("all") if req.method == "HEAD" else serve_manifest)(server, req, conn, case)


#: String lengths that keep a manifest (4 MiB), a config (16 MiB) and a
#: token answer (1 MiB) just inside ckfs's size limits.
LONG_MANIFEST = (4 << 20) - 4096
LONG_CONFIG = (16 << 20) - 4096
LONG_TOKEN = (1 << 20) - 64

#: An integer past Python's 4300-digit int/str conversion limit.
BIG_INT = b"1" + b"0" * 5000

Path_ = tuple[str | int, ...]


def setting(path: Path_, value: Any) -> Callable[[Any], None]:
    """A change to a JSON document: the value at *path* becomes *value* (``BIG`` for `BIG_INT`)."""

    def change(doc: Any) -> None:
        *parents, last = path
        for key in parents:
            doc = doc[key]
        doc[last] = value

    return change


def crafted(doc: Any, change: Callable[[Any], None] | None) -> bytes:
    """*doc* after *change*, as bytes; NaN and Infinity as Python's json writes them."""
    doc = json.loads(json.dumps(doc))
    if change is not None:
        change(doc)
    return json.dumps(doc).encode().replace(b'"BIG"', BIG_INT)


def _good_manifest() -> dict[str, Any]:
    img = image()
    return dict(json.loads(img.manifests[img.top][1]))


def _good_index() -> dict[str, Any]:
    img = index_of(image())
    return dict(json.loads(img.manifests[img.top][1]))


#: Type confusion and odd values in a manifest: (case, change, whether a
#: lenient reading may accept it).
MANIFEST_CHANGES: list[tuple[str, Callable[[Any], None], bool]] = [
    ("m-layers-object", setting(("layers",), {}), False),
    ("m-layers-null", setting(("layers",), None), True),  # Go reads null as no layers
    ("m-config-list", setting(("config",), []), False),
    ("m-size-string", setting(("layers", 0, "size"), "10"), False),
    ("m-size-negative", setting(("layers", 0, "size"), -1), False),
    ("m-size-float", setting(("layers", 0, "size"), 10.5), False),
    ("m-size-infinity", setting(("layers", 0, "size"), float("inf")), False),
    ("m-size-nan", setting(("layers", 0, "size"), float("nan")), False),
    ("m-size-5000-digits", setting(("layers", 0, "size"), "BIG"), False),
    ("m-size-bool", setting(("layers", 0, "size"), True), False),
    ("m-digest-number", setting(("layers", 0, "digest"), 5), False),
    ("m-digest-bad-algorithm", setting(("layers", 0, "digest"), "md5:" + "0" * 32), False),
    ("m-media-type-number", setting(("layers", 0, "mediaType"), 5), False),
    ("m-urls-string", setting(("layers", 0, "urls"), "http://127.0.0.1:9/x"), True),
    ("m-annotations-list", setting(("annotations",), []), True),
    ("m-layer-annotations-evil", setting(("layers", 0, "annotations"), {EVIL: EVIL}), True),
    ("m-schema-string", setting(("schemaVersion",), "2"), True),
    ("m-schema-1", setting(("schemaVersion",), 1), False),
    ("m-top-list", lambda doc: None, False),
]

#: The same for an index (its one child is a good manifest).
INDEX_CHANGES: list[tuple[str, Callable[[Any], None], bool]] = [
    ("i-manifests-string", setting(("manifests",), "x"), False),
    ("i-entry-string", setting(("manifests", 0), "x"), False),
    ("i-platform-list", setting(("manifests", 0, "platform"), []), False),
    ("i-os-features-int", setting(("manifests", 0, "platform", "os.features"), 5), True),
    ("i-variant-object", setting(("manifests", 0, "platform", "variant"), {}), True),
    ("i-architecture-null", setting(("manifests", 0, "platform", "architecture"), None), False),
    ("i-size-5000-digits", setting(("manifests", 0, "size"), "BIG"), False),
]

#: And for an image config, which ``rootfs`` (unpacking) and ``images inspect`` read.
CONFIG_CHANGES: list[tuple[str, Callable[[Any], None], bool]] = [
    ("c-diff-ids-string", setting(("rootfs", "diff_ids"), "x"), False),
    ("c-diff-ids-numbers", setting(("rootfs", "diff_ids"), [5]), False),
    ("c-rootfs-list", setting(("rootfs",), []), False),
    ("c-env-int", setting(("config", "Env"), 5), True),
    ("c-cmd-evil", setting(("config", "Cmd"), [EVIL * 1000]), True),
    ("c-os-number", setting(("os",), 5), True),
]


def _cases() -> Iterator[tuple[str, Case]]:
    manifest = _good_manifest()
    for name, change, _ in MANIFEST_CHANGES:
        body = b"[]" if name == "m-top-list" else crafted(manifest, change)
        yield name, Case(image=image(manifest=body))
    index = _good_index()
    for name, change, _ in INDEX_CHANGES:
        img = index_of(image())
        img.top = img.add_manifest(OCI_INDEX, crafted(index, change))
        yield name, Case(image=img)
    config = config_of([tiny_tar()])
    for name, change, _ in CONFIG_CHANGES:
        yield name, Case(image=image(config=crafted(config, change)))
    # Layers an honest image may carry: a path of ~4,030 bytes, a tree 500 deep
    # (just inside the layer applier's 512 levels); and one 1,500 deep, past it.
    yield "layer-long-path", Case(image=image(layers=[tree_tar(["p" * 250] * 16)]))
    yield "layer-deep-500", Case(image=image(layers=[tree_tar(["d"] * 500)]))
    yield "layer-deep-tree", Case(image=image(layers=[tree_tar(["d"] * 1500)]))
    # Long strings: a document at its size limit made of one string.
    yield (
        "manifest-long-string",
        Case(
            image=image(
                manifest=crafted(manifest, setting(("annotations",), {"a": "x" * LONG_MANIFEST}))
            )
        ),
    )
    yield (
        "config-long-string",
        Case(image=image(config=crafted(config, setting(("config", "Cmd"), ["x" * LONG_CONFIG])))),
    )
    yield (
        "token-long-string",
        Case(auth="bearer", token=status(200, json.dumps({"token": "t" * LONG_TOKEN}).encode())),
    )
    yield from _hostile_cases()


def _hostile_cases() -> Iterator[tuple[str, Case]]:
    good = image()
    good_manifest = good.manifests[good.top][1]
    # Controls: a faithful registry, so a failing hostile case is the case's doing.
    yield "good", Case()
    yield "good-bearer", Case(auth="bearer")
    yield "good-storage", Case(auth="basic", blob=redirect(_to_storage))
    manifest_head = b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","x":'
    deep_manifest = deep_json(manifest_head)
    deep_index = deep_json(b'{"schemaVersion":2,"mediaType":"' + OCI_INDEX.encode() + b'","x":')
    # Deep JSON everywhere a document is parsed.
    yield "deep-manifest", Case(manifest=manifests_serving(deep_manifest, OCI_MANIFEST))
    yield (
        "deep-manifest-sniffed",
        Case(manifest=head_without_digest(manifest_bytes(deep_manifest, ""))),
    )
    yield "deep-index", Case(manifest=manifests_serving(deep_index, OCI_INDEX))
    yield "deep-config", Case(image=image(config=deep_json()))
    deep_manifest_900 = deep_json(manifest_head, depth=PARSEABLE_DEEP)
    yield "deep-manifest-900", Case(manifest=manifests_serving(deep_manifest_900, OCI_MANIFEST))
    yield "deep-config-900", Case(image=image(config=deep_json(depth=PARSEABLE_DEEP)))
    yield (
        "deep-token-900",
        Case(
            auth="bearer", token=status(200, deep_json(b'{"token":"x","a":', depth=PARSEABLE_DEEP))
        ),
    )
    yield "deep-token", Case(auth="bearer", token=status(200, deep_json(b'{"token":"x","a":')))
    yield "deep-error-manifest", Case(manifest=head_without_digest(status(400, deep_json())))
    yield "deep-error-blob", Case(blob=status(404, deep_json(b'{"errors":')))
    yield "deep-error-token", Case(auth="bearer", token=status(400, deep_json(b'{"errors":')))
    # Redirect loops, on every kind of request, and across hosts.
    yield "loop-head", Case(manifest=redirect(_self))
    yield "loop-manifest-get", Case(manifest=head_without_digest(redirect(_self, 302)))
    yield "loop-blob", Case(blob=redirect(_self))
    yield "loop-token", Case(auth="bearer", token=redirect(_self))
    yield "loop-cross-host", Case(blob=redirect(_to_storage), storage=redirect(_to_main, 302))
    yield "redirect-bad-scheme", Case(blob=redirect(lambda s, r: "ftp://127.0.0.1/blob"))
    yield "redirect-bad-url", Case(blob=redirect(lambda s, r: "http://[::1/x"))
    yield "redirect-no-location", Case(blob=status(302))
    # A storage host's 401 after a blob redirect: never the registry's challenge.
    storage_401 = status(
        401,
        b"",
        [("WWW-Authenticate", 'Basic realm="storage"')],
    )
    yield "storage-401-basic", Case(auth="basic", blob=redirect(_to_storage), storage=storage_401)
    yield (
        "storage-401-bearer",
        Case(auth="bearer", blob=redirect(_to_storage), storage=storage_bearer_401),
    )
    # WWW-Authenticate and token bodies an adversary writes.
    yield (
        "auth-header-200k",
        Case(auth="bearer", challenge='Bearer realm="' + "x" * (200 << 10) + '"'),
    )
    yield (
        "auth-realm-60k",
        Case(auth="bearer", challenge='Bearer realm="http://127.0.0.1:9/' + "r" * (60 << 10) + '"'),
    )
    yield (
        "auth-params-5000",
        Case(
            auth="bearer",
            challenge='Bearer realm="http://127.0.0.1:9/t",'
            + ",".join(f'p{i}="v"' for i in range(5000)),
        ),
    )
    yield (
        "auth-realm-file",
        Case(auth="bearer", challenge='Bearer realm="file:///etc/shadow",service="x"'),
    )
    yield "auth-no-realm", Case(auth="bearer", challenge='Bearer service="x",scope="y"')
    yield "auth-unterminated", Case(auth="bearer", challenge='Bearer realm="http://127.0.0.1:9/t')
    yield (
        "auth-realm-evil",
        Case(auth="bearer", challenge='Bearer realm="http://127.0.0.1:9/\x9b31m\x9d0;pwned"'),
    )
    yield "auth-unknown-scheme", Case(auth="bearer", challenge="Negotiate abc, NTLM")
    yield "token-endless", Case(auth="bearer", token=endless(b'{"token":"', b"a"))
    yield "token-1gib", Case(auth="bearer", token=declared(1 << 30, b'{"token":"', b"a"))
    yield "token-trickle", Case(auth="bearer", token=trickled("body"))
    yield "token-stall", Case(auth="bearer", token=stall)
    yield (
        "token-not-json",
        Case(auth="bearer", token=status(200, b"<html>" + EVIL.encode() + b"</html>")),
    )
    yield (
        "token-wrong-type",
        Case(auth="bearer", token=status(200, b'{"token":123,"expires_in":"x"}')),
    )
    yield "token-crlf", Case(auth="bearer", token=status(200, b'{"token":"a\\r\\nX-Evil: 1"}'))
    yield (
        "token-900k",
        Case(auth="bearer", token=status(200, json.dumps({"token": "t" * (900 << 10)}).encode())),
    )
    yield (
        "token-rejected",
        Case(auth="bearer", token=status(200, json.dumps({"token": "never-accepted"}).encode())),
    )
    # Token answers whose lifetimes break date arithmetic (the token itself is good).
    for name, extra in (
        ("token-expires-huge", {"expires_in": 1e308}),
        ("token-expires-negative", {"expires_in": -100}),
        ("token-issued-far", {"expires_in": 3600, "issued_at": "9999-12-31T23:59:59Z"}),
        ("token-issued-garbage", {"issued_at": EVIL}),
    ):
        body = json.dumps({"token": TOKEN, **extra}).encode()
        yield name, Case(auth="bearer", token=status(200, body))
    # URLs no client can use.
    yield (
        "auth-realm-bad-port",
        Case(auth="bearer", challenge='Bearer realm="http://127.0.0.1:99999/t"'),
    )
    yield "auth-realm-bad-ipv6", Case(auth="bearer", challenge='Bearer realm="http://[::1/t"')
    yield "redirect-bad-port", Case(blob=redirect(lambda s, r: "http://127.0.0.1:99999/x"))
    yield "retry-after-negative", Case(manifest=status(503, b"", [("Retry-After", "-5")]))
    yield (
        "retry-after-year-9999",
        Case(manifest=status(429, b"", [("Retry-After", "Fri, 31 Dec 9999 23:59:59 GMT")])),
    )
    # Endless and oversized bodies.
    yield "manifest-endless", Case(manifest=head_without_digest(endless(b'{"a":"', b"a")))
    yield (
        "manifest-declared-huge",
        Case(manifest=head_without_digest(declared(10 << 30, b'{"a":"', b"a"))),
    )
    yield "manifest-head-huge", Case(manifest=head_huge)
    yield "error-endless", Case(blob=endless(b'{"errors":[{"message":"', b"e", code=400))
    yield "blob-endless", Case(blob=only_blob(layer0, endless(b"", b"\0")))
    yield "blob-longer", Case(blob=only_blob(layer0, declared(1 << 30, b"", b"\0")))
    yield "error-evil", Case(blob=error_body(EVIL + "A" * 100_000))
    # Trickles and stalls: one byte a second is never a read timeout.
    yield "trickle-head", Case(manifest=trickled("all"))
    yield "trickle-manifest", Case(manifest=head_without_digest(trickled("body")))
    yield "trickle-blob", Case(blob=only_blob(layer0, trickled("body")))
    yield "trickle-peek", Case(manifest=peek_trickle)
    yield "stall-head", Case(manifest=stall)
    yield "stall-blob", Case(blob=only_blob(layer0, stall_midway))
    # Retry-After beyond any cap, and retry storms.
    yield "retry-after-3600-429", Case(manifest=status(429, b"", [("Retry-After", "3600")]))
    yield (
        "retry-after-3600-503",
        Case(blob=only_blob(layer0, status(503, b"", [("Retry-After", "3600")]))),
    )
    yield (
        "retry-after-date",
        Case(blob=status(503, b"", [("Retry-After", "Fri, 31 Dec 2099 23:59:59 GMT")])),
    )
    yield "retry-after-30", Case(manifest=status(429, b"", [("Retry-After", "30")]))
    yield "retry-after-huge", Case(manifest=status(429, b"", [("Retry-After", "9" * 400)]))
    yield "always-503", Case(blob=status(503))
    # Lying sizes and digests.
    yield "head-digest-lie", Case(manifest=head_lies_digest)
    yield "manifest-length-lie", Case(manifest=manifest_bytes(good_manifest, lie=+100))
    yield "blob-wrong-bytes", Case(blob=only_blob(layer0, wrong_bytes))
    yield "blob-short", Case(blob=only_blob(layer0, cut_short))
    yield "blob-bad-range", Case(blob=only_blob(layer0, bad_range))
    tar = tiny_tar()
    yield (
        "layer-size-huge",
        Case(image=image(layer_descs=[desc(OCI_LAYER, tar, size=1 << 60)], layers=[tar])),
    )
    yield (
        "layer-size-16tib",
        Case(image=image(layer_descs=[desc(OCI_LAYER, tar, size=1 << 44)], layers=[tar])),
    )
    yield "layer-size-4k", Case(image=image(layers=[tiny_tar(data=b"x" * 4000)]))
    cfg = b'{"os":"linux","architecture":"amd64","rootfs":{"type":"layers","diff_ids":[]}}'
    yield (
        "config-size-huge",
        Case(image=image(config=cfg, layers=[], config_desc=desc(OCI_CONFIG, cfg, size=1 << 40))),
    )
    yield (
        "index-child-huge",
        Case(
            image=index_of(
                image(),
                [
                    desc(
                        OCI_MANIFEST,
                        good_manifest,
                        size=1 << 30,
                        platform={"architecture": "amd64", "os": "linux"},
                    )
                ],
            )
        ),
    )
    # Index cycles, faked by serving the index's own bytes for its child.
    yield "index-cycle", Case(manifest=manifests_serving(self_listing_index(), OCI_INDEX))
    yield (
        "index-cycle-unlabelled",
        Case(manifest=manifests_serving(self_listing_index(), OCI_INDEX, digest_header=False)),
    )
    yield "index-chain-300", Case(image=index_chain(300))
    yield "layers-5000", Case(image=many_layers(5000))
    # Not HTTP at all, or HTTP no client accepts.
    yield "garbage", Case(manifest=raw(b"\x16\x03\x01 this is not http\r\n\r\n"))
    yield (
        "bad-content-length",
        Case(manifest=raw(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n")),
    )
    yield (
        "headers-100k",
        Case(
            manifest=raw(
                b"HTTP/1.1 200 OK\r\n"
                + b"".join(b"X-%d: y\r\n" % i for i in range(100_000))
                + b"\r\n"
            )
        ),
    )
    yield "digest-header-evil", Case(manifest=digest_header_evil)
    yield (
        "manifest-bad-digests",
        Case(
            image=image(
                layer_descs=[
                    {"mediaType": OCI_LAYER, "digest": "sha256:../../../etc/passwd", "size": 10}
                ]
            )
        ),
    )


CASES: dict[str, Case] = dict(_cases())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lifetime", type=float, default=900.0, help="seconds until it exits")
    args = parser.parse_args(argv)
    server = Server(args.lifetime)
    print(server.port, server.storage_port, flush=True)
    server.serve()
    os._exit(0)  # daemon threads may be mid-stall; the process ends regardless


if __name__ == "__main__":
    main(sys.argv[1:])
