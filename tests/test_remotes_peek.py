"""The re-pull peek (`ckfs.remotes.peek.tag_digest`) against tiny servers on 127.0.0.1.

The peek speaks ``http.client`` over real sockets, so an httpx mock cannot
stand in; each server here is a stdlib ``http.server`` in a daemon thread,
answering what the test scripts, recording what it was asked, stopped at
teardown. The real registry's side is in integration/test_repull.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ckfs import mediatypes as mt
from ckfs.digest import from_bytes
from ckfs.reference import parse
from ckfs.remotes import peek
from ckfs.remotes.credentials import Credentials
from ckfs.remotes.hosts import RegistryHost

Answer = Callable[[BaseHTTPRequestHandler], None]

DIGEST = from_bytes(b"the manifest")
OTHER = from_bytes(b"another manifest")

#: Generous wall-time bound for a peek against a hostile server; the
#: deadline is patched to `DEADLINE` so the bound is not the 5 s default.
DEADLINE = 0.5
BOUND = 4.0


class Server:
    """One scripted HTTP/1.1 server; `seen` lists (method, path, headers) asked."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                self.serve()

            def do_GET(self) -> None:
                self.serve()

            def serve(self) -> None:
                owner.seen.append((self.command, self.path, dict(self.headers)))
                owner.answer(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # the client hanging up on a hostile answer is the point

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], Server]]:
    servers: list[Server] = []

    def start(answer: Answer) -> Server:
        servers.append(Server(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(autouse=True)
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peek, "PEEK_DEADLINE", DEADLINE)
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def nocreds(tmp_path: Path) -> Credentials:
    return Credentials(config_file=tmp_path / "no-config.json", env={"PATH": ""})


def reply(
    status: int, headers: dict[str, str] | None = None, body: bytes = b""
) -> Callable[[BaseHTTPRequestHandler], None]:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    return answer


def manifest(digest: str) -> Answer:
    return reply(200, {"Content-Type": mt.OCI_MANIFEST, "Docker-Content-Digest": digest})


def host(server: Server, **kwargs: object) -> RegistryHost:
    return RegistryHost(host=server.host, scheme="http", **kwargs)  # type: ignore[arg-type]


def test_pull_only_mirror_is_never_asked_for_a_tag(
    serve: Callable[[Answer], Server], nocreds: Credentials
) -> None:
    """A mirror without ``resolve`` cannot repoint a tag: the peek skips it, as the client does."""
    mirror = serve(manifest(OTHER))
    upstream = serve(manifest(DIGEST))
    hosts = [host(mirror, capabilities=frozenset({"pull"})), host(upstream)]
    ref = parse(f"{upstream.host}/library/app:1")
    assert peek.tag_digest(ref, hosts, nocreds) == DIGEST
    assert mirror.seen == []
    assert [(m, p) for m, p, _ in upstream.seen] == [("HEAD", "/v2/library/app/manifests/1")]


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
def test_anonymous_token_round_trip(
    serve: Callable[[Answer], Server], nocreds: Credentials, connection: str
) -> None:
    """Also when the token server closes after answering: the body, arriving later, is read."""

    def token(h: BaseHTTPRequestHandler) -> None:
        body = b'{"token": "anon"}'
        h.send_response(200)
        h.send_header("Connection", connection)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.flush()
        time.sleep(0.05)
        h.wfile.write(body)

    auth = serve(token)

    def registry(h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("Authorization") == "Bearer anon":
            manifest(DIGEST)(h)
        else:
            challenge = f'Bearer realm="http://{auth.host}/token",service="reg"'
            reply(401, {"WWW-Authenticate": challenge})(h)

    upstream = serve(registry)
    ref = parse(f"{upstream.host}/library/app:1")
    assert peek.tag_digest(ref, [host(upstream)], nocreds) == DIGEST
    (_, path, headers), = auth.seen  # fmt: skip
    assert path == "/token?service=reg&scope=repository%3Alibrary%2Fapp%3Apull"
    assert "Authorization" not in headers


def test_configured_credentials_leave_it_to_the_full_client(
    serve: Callable[[Answer], Server], tmp_path: Path
) -> None:
    auth = serve(reply(200, {}, b'{"token": "t"}'))
    challenge = f'Bearer realm="http://{auth.host}/token"'
    upstream = serve(reply(401, {"WWW-Authenticate": challenge}))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {upstream.host: {"auth": "dTpw"}}}))
    creds = Credentials(config_file=config, env={"PATH": ""})
    ref = parse(f"{upstream.host}/library/app:1")
    assert peek.tag_digest(ref, [host(upstream)], creds) is None
    assert auth.seen == []
    assert all("Authorization" not in h for _, _, h in upstream.seen)


def trickle_headers(h: BaseHTTPRequestHandler) -> None:
    h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(200):  # 20 s at most, unless the client hangs up first
        h.wfile.write(b"a")
        h.wfile.flush()
        time.sleep(0.1)


def trickle_body(h: BaseHTTPRequestHandler) -> None:
    h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    trickle_headers(h)


def endless_body(h: BaseHTTPRequestHandler) -> None:
    h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n{")
    chunk = b'"a": 1, ' * 8192
    for _ in range(4096):
        h.wfile.write(chunk)


HOSTILE_REGISTRY: dict[str, Answer] = {
    "trickled headers": trickle_headers,
    "redirect": reply(307, {"Location": "http://127.0.0.1:1/elsewhere"}),
    "digest not a digest": reply(200, {"Content-Type": mt.OCI_MANIFEST,
                                       "Docker-Content-Digest": "sha256:nope"}),
    "not a manifest": reply(200, {"Content-Type": "text/html", "Docker-Content-Digest": DIGEST}),
    "too many headers": reply(200, {f"X-{i}": "x" for i in range(200)}),
    "error": reply(500),
}  # fmt: skip

HOSTILE_TOKEN: dict[str, Answer | str] = {
    "trickled token headers": trickle_headers,
    "trickled token body": trickle_body,
    "endless token body": endless_body,
    "deep token": reply(200, {}, b"[" * 100_000 + b"]" * 100_000),
    "token with a NUL": reply(200, {}, b'{"token": "a\\u0000b"}'),
    "token not JSON": reply(200, {}, b"<html>"),
    "realm not http": "ftp://auth.test/token",
    "realm not a URL": "http://[::1/token",
    "realm on a closed port": "http://127.0.0.1:1/token",
}


@pytest.mark.parametrize("answer", HOSTILE_REGISTRY.values(), ids=HOSTILE_REGISTRY.keys())
def test_hostile_registry_means_none_quickly(
    serve: Callable[[Answer], Server], nocreds: Credentials, answer: Answer
) -> None:
    upstream = serve(answer)
    start = time.monotonic()
    assert (
        peek.tag_digest(parse(f"{upstream.host}/library/app:1"), [host(upstream)], nocreds) is None
    )
    assert time.monotonic() - start < BOUND


@pytest.mark.parametrize("token", HOSTILE_TOKEN.values(), ids=HOSTILE_TOKEN.keys())
def test_hostile_token_server_means_none_quickly(
    serve: Callable[[Answer], Server], nocreds: Credentials, token: Answer | str
) -> None:
    realm = token if isinstance(token, str) else f"http://{serve(token).host}/token"
    upstream = serve(reply(401, {"WWW-Authenticate": f'Bearer realm="{realm}"'}))
    start = time.monotonic()
    assert (
        peek.tag_digest(parse(f"{upstream.host}/library/app:1"), [host(upstream)], nocreds) is None
    )
    assert time.monotonic() - start < BOUND


def test_a_shorter_pull_timeout_shortens_the_peek(
    serve: Callable[[Answer], Server], nocreds: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peek, "PEEK_DEADLINE", 30.0)  # the default would not end the test
    upstream = serve(trickle_headers)
    start = time.monotonic()
    ref = parse(f"{upstream.host}/library/app:1")
    assert peek.tag_digest(ref, [host(upstream)], nocreds, within=DEADLINE) is None
    assert time.monotonic() - start < BOUND
