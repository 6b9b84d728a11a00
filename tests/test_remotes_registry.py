"""RegistryClient protocol edge cases against a scripted registry (httpx.MockTransport).

The fake registry below is the one place mocks are used: it is injected as
the client's transport, so everything above the socket (auth, retries,
mirrors, ranges, redirects, verification) is the real code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, from_bytes
from ckfs.errors import DataLoss, InvalidArgument, NotFound, Unauthorized, Unavailable
from ckfs.images.manifest import MAX_MANIFEST_SIZE
from ckfs.reference import Reference, parse
from ckfs.remotes.auth import Credentials
from ckfs.remotes.hosts import RegistryHost
from ckfs.remotes.registry import MAX_RETRY_AFTER, RegistryClient

REGISTRY = "reg.test"
REALM = "http://auth.test/token"
SERVICE = "reg.test"


def manifest_for(blobs: list[bytes]) -> bytes:
    config, *layers = blobs
    body = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": from_bytes(config), "size": len(config)},
        "layers": [
            {"mediaType": mt.OCI_LAYER_GZIP, "digest": from_bytes(b), "size": len(b)}
            for b in layers
        ],
    }
    return json.dumps(body).encode()


class Body(httpx.AsyncByteStream):
    """A body delivered as a stream, the way a real transport delivers it.

    ``resp(content=...)`` would be pre-read, and the client streams
    raw bytes, which a pre-read response no longer has.
    """

    def __init__(self, data: bytes, chunk: int = 4096) -> None:
        self.data = data
        self.chunk = chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), self.chunk):
            yield self.data[i : i + self.chunk]


def resp(
    status: int,
    *,
    headers: dict[str, str] | None = None,
    content: bytes = b"",
    json_body: object = None,
) -> httpx.Response:
    if json_body is not None:
        content = json.dumps(json_body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    headers = {"Content-Length": str(len(content)), **(headers or {})}
    return httpx.Response(status, headers=headers, stream=Body(content))


class BrokenStream(httpx.AsyncByteStream):
    """A body that delivers *data* and then loses the connection."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset by peer")


@dataclass
class FakeRegistry:
    """A scripted distribution registry plus token server and object storage.

    Attributes mirror knobs a test turns; ``requests`` records every request
    (including token requests and redirected storage requests).
    """

    auth: str = "none"  # "none" | "basic" | "bearer"
    users: dict[str, str] = field(default_factory=dict)  # user → password
    refresh_tokens: set[str] = field(default_factory=set)
    oauth_post: bool = True  # token server implements POST
    anonymous_tokens: bool = True
    expires_in: int | None = 300
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    head_digest: bool = True  # HEAD sends Docker-Content-Digest
    head_length: bool = True
    head_allowed: bool = True
    manifest_content_type: str | None = None  # overrides the stored one
    tamper_manifest: bool = False
    ignore_range: bool = False
    redirect_blobs: bool = False
    script: list[httpx.Response] = field(default_factory=list)  # answered first, in order
    cut_blob_at: int | None = None
    requests: list[httpx.Request] = field(default_factory=list)
    tokens: dict[str, tuple[str, ...]] = field(default_factory=dict)  # token → scopes
    revoked: set[str] = field(default_factory=set)
    token_counter: int = 0
    grant_access: bool = True  # issued tokens carry the scopes asked for

    def push(self, repo: str, tag: str, blobs: list[bytes]) -> Descriptor:
        for b in blobs:
            self.blobs[from_bytes(b)] = b
        data = manifest_for(blobs)
        desc = Descriptor(mt.OCI_MANIFEST, from_bytes(data), len(data))
        self.manifests[(repo, tag)] = (mt.OCI_MANIFEST, data)
        self.manifests[(repo, str(desc.digest))] = (mt.OCI_MANIFEST, data)
        return desc

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # -- handlers ------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        host = request.url.host
        if host == "auth.test":
            return self.token(request)
        if host == "storage.test":
            return self.storage(request)
        if self.script:
            return self.script.pop(0)
        if not self.authorized(request):
            return self.challenge()
        path = request.url.path
        prefix = "/v2/"
        if not path.startswith(prefix):
            return resp(404)
        repo, kind, obj = path[len(prefix) :].rsplit("/", 2)
        if kind == "manifests":
            return self.manifest(request, repo, obj)
        if kind == "blobs":
            if self.redirect_blobs:
                return resp(307, headers={"Location": f"http://storage.test/b/{obj}?sig=xyz"})
            return self.blob(request, obj)
        return resp(404)

    def authorized(self, request: httpx.Request) -> bool:
        value = request.headers.get("authorization", "")
        if self.auth == "none":
            return True
        if self.auth == "basic":
            if not value.startswith("Basic "):
                return False
            user, _, password = base64.b64decode(value[6:]).decode().partition(":")
            return self.users.get(user) == password
        if not value.startswith("Bearer "):
            return False
        token = value[7:]
        repo = request.url.path.split("/v2/", 1)[1].rsplit("/", 2)[0]
        scopes = self.tokens.get(token)
        return (
            token not in self.revoked and scopes is not None and f"repository:{repo}:pull" in scopes
        )

    def challenge(self) -> httpx.Response:
        if self.auth == "basic":
            header = 'Basic realm="fake"'
        else:
            header = f'Bearer realm="{REALM}",service="{SERVICE}",error="invalid_token"'
        return resp(
            401,
            headers={"WWW-Authenticate": header},
            json_body={"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
        )

    def token(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            if not self.oauth_post:
                return resp(404)
            form = dict(httpx.QueryParams(request.content.decode()))
            if form.get("grant_type") != "refresh_token" or form.get("refresh_token") not in (
                self.refresh_tokens
            ):
                return resp(401)
            scopes = tuple(form.get("scope", "").split())
            return self.issue(scopes, key="access_token")
        params = request.url.params
        value = request.headers.get("authorization")
        if value is None:
            if not self.anonymous_tokens:
                return resp(401)
        else:
            user, _, secret = base64.b64decode(value.split(" ", 1)[1]).decode().partition(":")
            ok = self.users.get(user) == secret or (user == "" and secret in self.refresh_tokens)
            if not ok:
                return resp(401)
        return self.issue(tuple(params.get_list("scope")), key="token")

    def issue(self, scopes: tuple[str, ...], *, key: str) -> httpx.Response:
        self.token_counter += 1
        token = f"tok-{self.token_counter}-secret"
        self.tokens[token] = scopes if self.grant_access else ()
        body: dict[str, object] = {key: token}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return resp(200, json_body=body)

    def manifest(self, request: httpx.Request, repo: str, obj: str) -> httpx.Response:
        found = self.manifests.get((repo, obj))
        if found is None:
            return resp(
                404,
                json_body={"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]},
            )
        media_type, data = found
        if request.method == "HEAD" and not self.head_allowed:
            return resp(405)
        headers = {"Content-Type": self.manifest_content_type or media_type}
        if request.method == "HEAD":
            if self.head_digest:
                headers["Docker-Content-Digest"] = from_bytes(data)
            if self.head_length:
                headers["Content-Length"] = str(len(data))
            return httpx.Response(200, headers=headers)
        headers["Docker-Content-Digest"] = from_bytes(data)
        if self.tamper_manifest:
            data = data.replace(b"schemaVersion", b"schemaversion")
        return resp(200, headers=headers, content=data)

    def blob(self, request: httpx.Request, digest: str) -> httpx.Response:
        data = self.blobs.get(digest)
        if data is None:
            return resp(404, json_body={"errors": [{"code": "BLOB_UNKNOWN"}]})
        rng = request.headers.get("range")
        if rng and not self.ignore_range:
            start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
            start = int(start_s)
            end = int(end_s) if end_s else len(data) - 1
            part = data[start : end + 1]
            return resp(
                206,
                headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"},
                content=part,
            )
        if self.cut_blob_at is not None:
            return httpx.Response(
                200,
                headers={"Content-Length": str(len(data))},
                stream=BrokenStream(data[: self.cut_blob_at]),
            )
        return resp(200, content=data)

    def storage(self, request: httpx.Request) -> httpx.Response:
        assert "authorization" not in request.headers, "registry credentials leaked to storage"
        return self.blob(request, request.url.path.rsplit("/", 1)[1])

    # -- views --------------------------------------------------------------------

    def seen(self, host: str | None = None) -> list[str]:
        return [
            f"{r.method} {r.url.host}{r.url.path}"
            for r in self.requests
            if host is None or r.url.host == host
        ]


Image = tuple[Reference, Descriptor, list[bytes]]


def nocreds(tmp_path: Path) -> Credentials:
    return Credentials(config_file=tmp_path / "no-config.json", env={"PATH": ""})


def client_for(
    fake: FakeRegistry,
    credentials: Credentials,
    hosts: list[RegistryHost] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    **kwargs: float,
) -> RegistryClient:
    return RegistryClient(
        REGISTRY,
        hosts=hosts or [RegistryHost(host=REGISTRY, scheme="http")],
        credentials=credentials,
        transport=transport or fake.transport(),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def image(fake: FakeRegistry) -> tuple[Reference, Descriptor, list[bytes]]:
    blobs = [b'{"config": true}', b"layer-one" * 1000, b"layer-two" * 37]
    desc = fake.push("library/app", "1", blobs)
    return parse(f"{REGISTRY}/library/app:1"), desc, blobs


async def read_all(
    client: RegistryClient,
    ref: Reference,
    desc: Descriptor,
    *,
    offset: int = 0,
    length: int | None = None,
) -> bytes:
    async with client.open_blob(ref, desc, offset=offset, length=length) as stream:
        return b"".join([c async for c in stream.aiter_chunks()])


# -- resolve ------------------------------------------------------------------------


async def test_resolve_tag_with_head(fake: FakeRegistry, image: Image, tmp_path: Path) -> None:
    ref, desc, _ = image
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.resolve(ref) == desc
        assert client.statistics() == {"resolve": 1}
    (request,) = fake.requests
    assert request.method == "HEAD"
    assert request.headers["accept"] == ", ".join(mt.MANIFEST_ACCEPT)
    assert request.headers["accept-encoding"] == "identity"
    assert request.headers["user-agent"].startswith("ckfs/")


@pytest.mark.parametrize("knob", ["head_digest", "head_length", "head_allowed"])
async def test_resolve_falls_back_to_get_and_hashes(
    fake: FakeRegistry, image: Image, tmp_path: Path, knob: str
) -> None:
    ref, desc, _ = image
    setattr(fake, knob, False)
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.resolve(ref) == desc
    assert [r.method for r in fake.requests] == ["HEAD", "GET"]


async def test_resolve_digest_ref(fake: FakeRegistry, image: Image, tmp_path: Path) -> None:
    ref, desc, _ = image
    pinned = ref.with_tag("").with_digest(desc.digest)
    fake.head_digest = False
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.resolve(pinned) == desc
    # A digest reference with a size from HEAD needs no GET: the digest is ours.
    assert [r.method for r in fake.requests] == ["HEAD"]


async def test_resolve_sniffs_media_type_from_body(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, desc, _ = image
    fake.manifest_content_type = "application/octet-stream"
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.resolve(ref) == desc


async def test_resolve_not_found_names_ref_and_registry(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, _, _ = image
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(NotFound) as info:
            await client.resolve(ref.with_tag("nope"))
    message = str(info.value)
    assert "reg.test/library/app:nope" in message and "registry reg.test" in message
    # HEAD has no body; the GET's registry error is not needed to say "not found".


@pytest.mark.parametrize("media_type", sorted(mt.SCHEMA1))
async def test_resolve_refuses_schema1(fake: FakeRegistry, tmp_path: Path, media_type: str) -> None:
    body = json.dumps({"schemaVersion": 1, "name": "old", "fsLayers": []}).encode()
    fake.manifests[("old/img", "1")] = (media_type, body)
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument, match="schema 1"):
            await client.resolve(parse(f"{REGISTRY}/old/img:1"))
        fake.head_allowed = False  # the GET path refuses it too
        with pytest.raises(InvalidArgument, match="schema 1"):
            await client.resolve(parse(f"{REGISTRY}/old/img:1"))


async def test_resolve_refuses_schema1_by_body(fake: FakeRegistry, tmp_path: Path) -> None:
    body = json.dumps({"schemaVersion": 1, "fsLayers": []}).encode()
    fake.manifests[("old/img", "1")] = ("application/json", body)
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument, match="schema 1"):
            await client.resolve(parse(f"{REGISTRY}/old/img:1"))


async def test_resolve_refuses_huge_manifest(fake: FakeRegistry, tmp_path: Path) -> None:
    big = b"{" + b" " * MAX_MANIFEST_SIZE + b"}"
    fake.manifests[("big/img", "1")] = (mt.OCI_MANIFEST, big)
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument, match="byte limit"):
            await client.resolve(parse(f"{REGISTRY}/big/img:1"))
        fake.head_digest = False  # streamed GET: refused while reading
        with pytest.raises(InvalidArgument, match="manifest limit"):
            await client.resolve(parse(f"{REGISTRY}/big/img:1"))


async def test_resolve_other_registry_refused(fake: FakeRegistry, tmp_path: Path) -> None:
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument, match=r"not on registry reg\.test"):
            await client.resolve(parse("other.test/x:1"))


# -- fetch_manifest -------------------------------------------------------------------


async def test_fetch_manifest_verified(fake: FakeRegistry, image: Image, tmp_path: Path) -> None:
    ref, desc, blobs = image
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.fetch_manifest(ref, desc) == manifest_for(blobs)
    assert fake.requests[0].url.path == f"/v2/library/app/manifests/{desc.digest}"


async def test_fetch_manifest_digest_mismatch(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, desc, _ = image
    fake.tamper_manifest = True
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(DataLoss) as info:
            await client.fetch_manifest(ref, desc)
    assert str(desc.digest) in str(info.value) and "reg.test" in str(info.value)


async def test_fetch_manifest_header_digest_contradicts(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, desc, _ = image
    other = Descriptor(desc.media_type, from_bytes(b"other"), desc.size)
    fake.manifests[("library/app", str(other.digest))] = fake.manifests[("library/app", "1")]
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(DataLoss, match="Docker-Content-Digest"):
            await client.fetch_manifest(ref, other)


async def test_fetch_manifest_too_large_or_longer_than_described(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, desc, _ = image
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument, match="byte limit"):
            await client.fetch_manifest(ref, desc.replace(size=MAX_MANIFEST_SIZE + 1))
        with pytest.raises(DataLoss, match="more than the expected 10"):
            await client.fetch_manifest(ref, desc.replace(size=10))
        with pytest.raises(InvalidArgument, match="schema 1"):
            await client.fetch_manifest(ref, desc.replace(media_type=mt.DOCKER_SCHEMA1_SIGNED))


# -- blobs ---------------------------------------------------------------------------


async def test_open_blob_whole_and_ranges(fake: FakeRegistry, image: Image, tmp_path: Path) -> None:
    ref, _, blobs = image
    layer = blobs[1]
    desc = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(layer), len(layer))
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await read_all(client, ref, desc) == layer
        async with client.open_blob(ref, desc, offset=100) as stream:
            assert (stream.offset, stream.total) == (100, len(layer))
            assert b"".join([c async for c in stream.aiter_chunks()]) == layer[100:]
        assert await read_all(client, ref, desc, offset=10, length=5) == layer[10:15]
        assert await read_all(client, ref, desc, offset=len(layer)) == b""
        with pytest.raises(InvalidArgument):
            await read_all(client, ref, desc, offset=len(layer) + 1)
        assert client.statistics()["blob_bytes"] == len(layer) * 2 - 100 + 5
    ranges = [r.headers.get("range") for r in fake.requests]
    assert ranges == [None, "bytes=100-", "bytes=10-14"]


async def test_open_blob_range_ignored_starts_at_zero(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, _, blobs = image
    layer = blobs[1]
    desc = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(layer), len(layer))
    fake.ignore_range = True
    client = client_for(fake, nocreds(tmp_path))
    async with client, client.open_blob(ref, desc, offset=100) as stream:
        assert stream.offset == 0
        assert b"".join([c async for c in stream.aiter_chunks()]) == layer


async def test_open_blob_wrong_range_refused(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, _, blobs = image
    desc = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(blobs[1]), len(blobs[1]))
    fake.script = [resp(206, headers={"Content-Range": "bytes 0-9/9000"}, content=b"x")]
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument, match="asked for bytes from 50"):
            await read_all(client, ref, desc, offset=50)


async def test_open_blob_connection_lost_mid_stream(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, _, blobs = image
    layer = blobs[1]
    desc = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(layer), len(layer))
    fake.cut_blob_at = 1234
    got = bytearray()
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(Unavailable, match="connection lost at byte 1234"):
            async with client.open_blob(ref, desc) as stream:
                async for chunk in stream.aiter_chunks():
                    got += chunk
        # The caller resumes where it was, with a range request.
        fake.cut_blob_at = None
        got += await read_all(client, ref, desc, offset=len(got))
    assert bytes(got) == layer


async def test_open_blob_not_found(fake: FakeRegistry, image: Image, tmp_path: Path) -> None:
    ref, _, _ = image
    desc = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(b"missing"), 7)
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(NotFound) as info:
            await read_all(client, ref, desc)
    assert "BLOB_UNKNOWN" in str(info.value) and "reg.test" in str(info.value)


async def test_redirect_to_storage_drops_authorization(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, _, blobs = image
    layer = blobs[1]
    desc = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(layer), len(layer))
    fake.auth = "bearer"
    fake.redirect_blobs = True
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await read_all(client, ref, desc, offset=3) == layer[3:]
        assert client.statistics()["redirect"] == 1
    to_registry = [r for r in fake.requests if r.url.host == REGISTRY]
    to_storage = [r for r in fake.requests if r.url.host == "storage.test"]
    assert to_registry[-1].headers["authorization"].startswith("Bearer ")
    assert len(to_storage) == 1
    assert "authorization" not in to_storage[0].headers  # httpx strips it cross-origin
    assert to_storage[0].headers["range"] == "bytes=3-"  # the range survives the hop


async def test_nondistributable_urls_only_when_allowed(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, _, blobs = image
    layer = blobs[1]
    desc = Descriptor(
        mt.OCI_LAYER_ND_GZIP,
        from_bytes(layer),
        len(layer),
        urls=(f"http://storage.test/b/{from_bytes(layer)}",),
    )
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await read_all(client, ref, desc) == layer
        assert fake.seen("storage.test") == []
        async with client.open_blob(ref, desc, allow_urls=True) as stream:
            assert stream.host == "storage.test"
            assert b"".join([c async for c in stream.aiter_chunks()]) == layer
        assert client.statistics()["url"] == 1


async def test_failing_nondistributable_urls_fall_through_to_the_next(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """An unreachable URL, a URL slow to answer: each is skipped, bounded, for the next."""
    ref, _, blobs = image
    layer = blobs[1]

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down.test":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == "slow.test":
            await trio.sleep_forever()
        return fake.handle(request)

    urls = (
        "http://down.test/b",
        "http://slow.test/b",
        f"http://storage.test/b/{from_bytes(layer)}",
    )
    desc = Descriptor(mt.OCI_LAYER_ND_GZIP, from_bytes(layer), len(layer), urls=urls)
    transport = httpx.MockTransport(handle)
    async with client_for(
        fake, nocreds(tmp_path), transport=transport, request_timeout=1
    ) as client:
        async with client.open_blob(ref, desc, allow_urls=True) as stream:
            assert stream.host == "storage.test"
            assert b"".join([c async for c in stream.aiter_chunks()]) == layer
        assert trio.current_time() == pytest.approx(1)
        assert client.statistics()["url"] == 3
        assert "retry" not in client.statistics()


# -- retries ---------------------------------------------------------------------------


async def test_retries_500_then_succeeds(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, desc, _ = image
    fake.script = [resp(500), resp(502), resp(503)]
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.resolve(ref) == desc
        assert client.statistics() == {"resolve": 4, "retry": 3}


async def test_retry_after_is_honoured_within_the_cap(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, desc, _ = image
    fake.script = [
        resp(429, headers={"Retry-After": "7"}),
        resp(503, headers={"Retry-After": f"{MAX_RETRY_AFTER - 7:g}"}),
    ]
    async with client_for(fake, nocreds(tmp_path)) as client:
        start = trio.current_time()
        assert await client.resolve(ref) == desc
        assert trio.current_time() - start == pytest.approx(MAX_RETRY_AFTER)


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_beyond_the_cap_fails_at_once(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock, status: int
) -> None:
    ref, _, _ = image
    fake.script = [resp(status, headers={"Retry-After": "3600"})] * 3
    async with client_for(fake, nocreds(tmp_path)) as client:
        start = trio.current_time()
        with pytest.raises(Unavailable) as info:
            await client.resolve(ref)
        assert trio.current_time() == start
        assert client.statistics() == {"resolve": 1}
    assert f"registry reg.test asks to retry after 3600 s (HTTP {status})" in str(info.value)


async def test_retry_waits_of_one_request_add_up_to_the_cap(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Each wait is under the cap, their sum is not: the request gives up, never 5 x 40 s."""
    ref, _, _ = image
    fake.script = [resp(429, headers={"Retry-After": "40"}) for _ in range(6)]
    async with client_for(fake, nocreds(tmp_path)) as client:
        start = trio.current_time()
        with pytest.raises(Unavailable, match=r"asks to retry after 40 s.*after 40 s of waiting"):
            await client.resolve(ref)
        assert trio.current_time() - start == pytest.approx(40)
        assert client.statistics() == {"resolve": 2, "retry": 1}


async def test_retry_wait_past_the_enclosing_deadline_fails_at_once(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The caller's fail_after is a budget: a wait that would overrun it is not started."""
    ref, _, _ = image
    fake.script = [resp(429, headers={"Retry-After": "20"})]
    async with client_for(fake, nocreds(tmp_path)) as client:
        with trio.fail_after(10):
            with pytest.raises(Unavailable, match="retry in 20 s would pass the deadline"):
                await client.resolve(ref)
            assert trio.current_time() == 0


@pytest.mark.parametrize("value", ["²", "Wed, 21 Oct 99999 07:28:00 GMT", "soon", "-5", "1e9"])
async def test_unusable_retry_after_falls_back_to_backoff(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock, value: str
) -> None:
    ref, desc, _ = image
    raw = [(b"Retry-After", value.encode()), (b"Content-Length", "²".encode())]
    fake.script = [httpx.Response(429, headers=raw, stream=Body(b""))]
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.resolve(ref) == desc
        assert trio.current_time() < 1


async def test_non_ascii_digits_in_content_length_are_no_length(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    """ "²" is a digit to str.isdigit and not to int(): the HEAD just lacks a size."""
    ref, desc, _ = image
    raw = [
        (b"Content-Type", desc.media_type.encode()),
        (b"Docker-Content-Digest", str(desc.digest).encode()),
        (b"Content-Length", "²".encode()),
    ]
    fake.script = [httpx.Response(200, headers=raw)]
    async with client_for(fake, nocreds(tmp_path)) as client:
        assert await client.resolve(ref) == desc
    assert [r.method for r in fake.requests] == ["HEAD", "GET"]


async def test_retries_give_up_with_unavailable(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, _, _ = image
    fake.script = [resp(503)] * 10
    async with client_for(fake, nocreds(tmp_path), retries=2) as client:
        with pytest.raises(Unavailable, match="HTTP 503"):
            await client.resolve(ref)
        assert client.statistics()["resolve"] == 3


async def test_connection_errors_retried_then_unavailable(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    calls = 0

    def refuse(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("connection refused")

    client = RegistryClient(
        REGISTRY,
        hosts=[RegistryHost(host=REGISTRY, scheme="http")],
        credentials=nocreds(tmp_path),
        transport=httpx.MockTransport(refuse),
        retries=3,
    )
    async with client:
        with pytest.raises(Unavailable) as info:
            await client.resolve(parse(f"{REGISTRY}/x/y:1"))
    assert calls == 4
    assert "registry reg.test is unreachable" in str(info.value)
    assert "connection refused" in str(info.value)


async def test_client_errors_not_retried(fake: FakeRegistry, image: Image, tmp_path: Path) -> None:
    ref, _, _ = image
    fake.script = [resp(400, json_body={"errors": [{"code": "NAME_INVALID", "message": "x"}]})]
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument, match="NAME_INVALID"):
            await client.resolve(ref)
        assert client.statistics() == {"resolve": 1}


async def test_error_detail_escaped_and_bounded(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, _, _ = image
    message = "\x1b]0;pwned\x07\nsecond line " + "A" * 10_000
    fake.script = [resp(400, json_body={"errors": [{"code": "DENIED", "message": message}]})]
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument) as info:
            await client.resolve(ref)
    text = str(info.value)
    assert "\\x1b]0;pwned\\x07\\nsecond line" in text
    assert not any(c < " " for c in text)
    assert len(text) < 400


# -- mirrors ---------------------------------------------------------------------------


def mirrored_hosts() -> list[RegistryHost]:
    return [
        RegistryHost(host="mirror.test", scheme="http", capabilities=frozenset({"pull"}),
                     mirror_of=REGISTRY),
        RegistryHost(host="mirror2.test", scheme="http", mirror_of=REGISTRY),
        RegistryHost(host=REGISTRY, scheme="http"),
    ]  # fmt: skip


async def test_mirror_without_resolve_never_resolves_tags(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, desc, _ = image
    async with client_for(fake, nocreds(tmp_path), hosts=mirrored_hosts()) as client:
        assert await client.resolve(ref) == desc
        assert await client.fetch_manifest(ref, desc)
    # mirror.test (pull only) was skipped for the tag, asked for the digest.
    assert fake.seen() == [
        "HEAD mirror2.test/v2/library/app/manifests/1",
        f"GET mirror.test/v2/library/app/manifests/{desc.digest}",
    ]
    assert all(r.url.params["ns"] == REGISTRY for r in fake.requests)


async def test_mirror_failures_fall_through_to_upstream(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, _, blobs = image
    layer = blobs[2]
    desc = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(layer), len(layer))
    fake.script = [resp(503), resp(404)]  # mirror, mirror2
    async with client_for(fake, nocreds(tmp_path), hosts=mirrored_hosts()) as client:
        assert await read_all(client, ref, desc) == layer
        assert "retry" not in client.statistics()  # mirrors are not retried
    assert [r.url.host for r in fake.requests] == ["mirror.test", "mirror2.test", REGISTRY]
    assert "ns" not in fake.requests[-1].url.params


async def test_last_hosts_error_is_reported(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, _, _ = image
    fake.script = [resp(503)]
    async with client_for(fake, nocreds(tmp_path), hosts=mirrored_hosts()) as client:
        with pytest.raises(NotFound, match=r"registry reg\.test"):
            await client.resolve(ref.with_tag("missing"))


async def test_no_host_with_capability(tmp_path: Path, fake: FakeRegistry) -> None:
    hosts = [RegistryHost(host="mirror.test", scheme="http", capabilities=frozenset({"pull"}))]
    async with client_for(fake, nocreds(tmp_path), hosts=hosts) as client:
        with pytest.raises(NotFound, match="'resolve' capability"):
            await client.resolve(parse(f"{REGISTRY}/x/y:1"))


async def test_host_headers_are_sent(fake: FakeRegistry, image: Image, tmp_path: Path) -> None:
    ref, _, _ = image
    hosts = [RegistryHost(host=REGISTRY, scheme="http", headers={"X-Tenant": ("a", "b")})]
    async with client_for(fake, nocreds(tmp_path), hosts=hosts) as client:
        await client.resolve(ref)
    assert fake.requests[0].headers["x-tenant"] == "a, b"


async def test_override_path(fake: FakeRegistry, tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return resp(404)

    hosts = [RegistryHost(host=REGISTRY, scheme="http", path="/api/proj", override_path=True)]
    client = RegistryClient(
        REGISTRY, hosts=hosts, credentials=nocreds(tmp_path), transport=httpx.MockTransport(handler)
    )
    async with client:
        with pytest.raises(NotFound):
            await client.resolve(parse(f"{REGISTRY}/x/y:1"))
    assert seen == ["/api/proj/x/y/manifests/1"]


# -- authentication through the client ---------------------------------------------------


def creds_file(tmp_path: Path, auths: dict[str, dict[str, str]]) -> Credentials:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return Credentials(config_file=path, env={"PATH": ""})


def basic(user: str, secret: str) -> str:
    return base64.b64encode(f"{user}:{secret}".encode()).decode()


async def test_anonymous_bearer_token_cached_per_scope(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, desc, blobs = image
    fake.auth = "bearer"
    fake.push("other/repo", "2", [b"{}", b"x"])
    async with client_for(fake, nocreds(tmp_path)) as client:
        await client.resolve(ref)
        await client.fetch_manifest(ref, desc)
        for b in blobs:
            await read_all(client, ref, Descriptor(mt.OCI_LAYER, from_bytes(b), len(b)))
        await client.resolve(parse(f"{REGISTRY}/other/repo:2"))
        stats = client.statistics()
    # One 401 for the first request, then one token per repository scope.
    assert stats["token"] == 2 and stats["auth"] == 1
    token_requests = [r for r in fake.requests if r.url.host == "auth.test"]
    assert [r.url.params.get_list("scope") for r in token_requests] == [
        ["repository:library/app:pull"],
        ["repository:other/repo:pull"],
    ]
    assert all(r.url.params["service"] == SERVICE for r in token_requests)
    assert all("authorization" not in r.headers for r in token_requests)


async def test_token_refreshed_after_expiry(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, _, _ = image
    fake.auth = "bearer"
    fake.expires_in = 60
    async with client_for(fake, nocreds(tmp_path)) as client:
        await client.resolve(ref)
        await trio.sleep(30)
        await client.resolve(ref)
        assert client.statistics()["token"] == 1
        await trio.sleep(30)  # past 90 % of the lifetime: fetched anew, no 401 needed
        await client.resolve(ref)
        assert client.statistics()["token"] == 2
        assert client.statistics()["auth"] == 1


async def test_default_lifetime_when_server_omits_expires_in(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, _, _ = image
    fake.auth = "bearer"
    fake.expires_in = None
    async with client_for(fake, nocreds(tmp_path)) as client:
        await client.resolve(ref)
        await trio.sleep(50)
        await client.resolve(ref)
        assert client.statistics()["token"] == 1
        await trio.sleep(10)
        await client.resolve(ref)
        assert client.statistics()["token"] == 2


async def test_revoked_token_refreshed_on_401(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, _, _ = image
    fake.auth = "bearer"
    async with client_for(fake, nocreds(tmp_path)) as client:
        await client.resolve(ref)
        fake.revoked.update(fake.tokens)
        await client.resolve(ref)
        assert client.statistics()["token"] == 2
        assert client.statistics()["auth"] == 2


async def test_bearer_with_password(fake: FakeRegistry, image: Image, tmp_path: Path) -> None:
    ref, desc, _ = image
    fake.auth = "bearer"
    fake.anonymous_tokens = False
    fake.users = {"alice": "pa:ss"}
    creds = creds_file(tmp_path, {REGISTRY: {"auth": basic("alice", "pa:ss")}})
    async with client_for(fake, creds) as client:
        assert await client.resolve(ref) == desc
    (token_request,) = [r for r in fake.requests if r.url.host == "auth.test"]
    assert token_request.method == "GET"
    assert token_request.headers["authorization"] == "Basic " + basic("alice", "pa:ss")


async def test_identity_token_uses_oauth_post(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, desc, _ = image
    fake.auth = "bearer"
    fake.anonymous_tokens = False
    fake.refresh_tokens = {"refresh-me"}
    creds = creds_file(tmp_path, {f"https://{REGISTRY}/v1/": {"identitytoken": "refresh-me"}})
    async with client_for(fake, creds) as client:
        assert await client.resolve(ref) == desc
    (token_request,) = [r for r in fake.requests if r.url.host == "auth.test"]
    assert token_request.method == "POST"
    form = dict(httpx.QueryParams(token_request.content.decode()))
    assert form == {
        "grant_type": "refresh_token",
        "refresh_token": "refresh-me",
        "client_id": "ckfs",
        "service": SERVICE,
        "scope": "repository:library/app:pull",
    }


async def test_identity_token_falls_back_to_get(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, desc, _ = image
    fake.auth = "bearer"
    fake.anonymous_tokens = False
    fake.oauth_post = False
    fake.refresh_tokens = {"refresh-me"}
    creds = creds_file(tmp_path, {REGISTRY: {"identitytoken": "refresh-me"}})
    async with client_for(fake, creds) as client:
        assert await client.resolve(ref) == desc
    assert [r.method for r in fake.requests if r.url.host == "auth.test"] == ["POST", "GET"]


async def test_basic_auth(fake: FakeRegistry, image: Image, tmp_path: Path) -> None:
    ref, desc, _ = image
    fake.auth = "basic"
    fake.users = {"bob": "hunter2"}
    creds = creds_file(tmp_path, {REGISTRY: {"username": "bob", "password": "hunter2"}})
    async with client_for(fake, creds) as client:
        assert await client.resolve(ref) == desc
        await client.fetch_manifest(ref, desc)
        # Basic is sent up front once the host has asked for it.
        assert client.statistics() == {"resolve": 2, "manifest": 1, "auth": 1}


SECRETS = ("hunter2-wrong", "tok-", "refresh-me")


async def test_wrong_password_is_unauthorized_without_secrets(
    fake: FakeRegistry, image: Image, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref, _, _ = image
    caplog.set_level(logging.DEBUG)
    fake.auth = "basic"
    fake.users = {"bob": "hunter2"}
    creds = creds_file(tmp_path, {REGISTRY: {"auth": basic("bob", "hunter2-wrong")}})
    async with client_for(fake, creds) as client:
        with pytest.raises(Unauthorized) as info:
            await client.resolve(ref)
        assert client.statistics()["resolve"] == 2  # anonymous, then once with the password
    message = str(info.value)
    assert "reg.test" in message and "library/app" in message and "\n" not in message
    for secret in (*SECRETS, basic("bob", "hunter2-wrong")):
        assert secret not in message
        assert secret not in caplog.text
        assert secret not in repr(creds) and secret not in repr(client)


async def test_bearer_denied_without_secrets(
    fake: FakeRegistry, image: Image, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref, _, _ = image
    caplog.set_level(logging.DEBUG)
    fake.auth = "bearer"
    fake.anonymous_tokens = False
    fake.refresh_tokens = {"refresh-me"}
    fake.users = {"alice": "right"}
    creds = creds_file(tmp_path, {REGISTRY: {"auth": basic("alice", "hunter2-wrong")}})
    async with client_for(fake, creds) as client:
        with pytest.raises(Unauthorized, match=r"token server auth\.test refused") as info:
            await client.resolve(ref)
    for secret in SECRETS:
        assert secret not in str(info.value) and secret not in caplog.text


async def test_token_scope_without_access_is_unauthorized(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    """A token server that hands out tokens the registry keeps refusing."""
    ref, _, _ = image
    fake.auth = "bearer"
    async with client_for(fake, nocreds(tmp_path)) as client:
        await client.resolve(ref)
        fake.tokens.clear()
        fake.grant_access = False  # tokens keep coming, none opens the repository
        with pytest.raises(Unauthorized, match="denied access to library/app"):
            await client.resolve(ref)
        # The stale token is refused, one new one is fetched and refused too,
        # and then the client stops instead of asking the token server again.
        assert client.statistics()["token"] == 2
        assert client.statistics()["auth"] == 3
        assert client.statistics()["resolve"] == 2 + 2


async def test_registry_without_usable_challenge(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.script = [resp(401, headers={"WWW-Authenticate": "Negotiate abc=="})]
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(Unauthorized, match="without a challenge"):
            await client.resolve(parse(f"{REGISTRY}/x/y:1"))


async def test_forbidden_is_unauthorized(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.script = [resp(403, json_body={"errors": [{"code": "DENIED", "message": "no"}]})]
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(Unauthorized, match=r"denied access \(HTTP 403\) \(DENIED: no\)"):
            await client.resolve(parse(f"{REGISTRY}/x/y:1"))


async def test_credentials_for_https_registry_never_go_to_http_realm(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    fake.auth = "bearer"
    fake.push("x/y", "1", [b"{}"])
    creds = creds_file(tmp_path, {REGISTRY: {"auth": basic("alice", "pw")}})
    hosts = [RegistryHost(host=REGISTRY, scheme="https")]
    async with client_for(fake, creds, hosts=hosts) as client:
        with pytest.raises(Unauthorized, match="plain-HTTP token server"):
            await client.resolve(parse(f"{REGISTRY}/x/y:1"))
    assert fake.seen("auth.test") == []


async def test_concurrent_requests_share_one_token(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, _, blobs = image
    fake.auth = "bearer"
    async with client_for(fake, nocreds(tmp_path)) as client:
        await client.resolve(ref)  # learn the challenge
        client._engine.authorizer._tokens.clear()
        async with trio.open_nursery() as nursery:
            for b in blobs * 3:
                d = Descriptor(mt.OCI_LAYER, from_bytes(b), len(b))
                nursery.start_soon(read_all, client, ref, d)
        assert client.statistics()["token"] == 2


def test_digest_helper_sanity() -> None:
    # The fake registry's digests are the client's digests.
    assert from_bytes(b"x") == Digest.parse("sha256:" + hashlib.sha256(b"x").hexdigest())


# -- bounded time ------------------------------------------------------------------------


class Trickle(httpx.AsyncByteStream):
    """A body of *data* (endless ``x`` when None), one byte every *every* seconds."""

    def __init__(self, data: bytes | None = None, every: float = 20) -> None:
        self.data = data
        self.every = every

    async def __aiter__(self) -> AsyncIterator[bytes]:
        i = 0
        while self.data is None or i < len(self.data):
            yield b"x" if self.data is None else self.data[i : i + 1]
            i += 1
            await trio.sleep(self.every)


def slowly(fake: FakeRegistry, delay: float = 20) -> httpx.MockTransport:
    """The fake registry, each answer's headers *delay* seconds late."""

    async def handle(request: httpx.Request) -> httpx.Response:
        await trio.sleep(delay)
        return fake.handle(request)

    return httpx.MockTransport(handle)


async def test_slow_headers_fail_within_the_request_timeout(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, _, _ = image
    async with client_for(
        fake, nocreds(tmp_path), transport=slowly(fake), request_timeout=1
    ) as client:
        with pytest.raises(Unavailable) as info:
            await client.resolve(ref)
        assert trio.current_time() == pytest.approx(1)
        assert client.statistics() == {"resolve": 1}  # a server that slow is not asked again
    message = str(info.value)
    assert "response headers from registry reg.test not complete within 1 s" in message


async def test_enclosing_deadline_passes_through(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The caller's cancel scope wins when it is the earlier one: never swallowed or renamed."""
    ref, _, _ = image
    async with client_for(
        fake, nocreds(tmp_path), transport=slowly(fake), request_timeout=5
    ) as client:
        with trio.move_on_after(2) as outer:
            await client.resolve(ref)
        assert outer.cancelled_caught


async def test_trickled_manifest_body_fails_within_the_request_timeout(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, desc, _ = image
    data = fake.manifests[("library/app", "1")][1]
    fake.script = [
        httpx.Response(200, headers={"Content-Length": str(len(data))}, stream=Trickle(data))
    ]
    async with client_for(fake, nocreds(tmp_path), request_timeout=1) as client:
        with pytest.raises(Unavailable) as info:
            await client.fetch_manifest(ref, desc)
        assert trio.current_time() == pytest.approx(1)
    assert f"manifest {desc.digest} from reg.test: body not complete within 1 s" in str(info.value)


async def test_trickled_error_body_keeps_the_status(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, _, _ = image
    fake.script = [httpx.Response(404, stream=Trickle())]
    async with client_for(fake, nocreds(tmp_path), request_timeout=1) as client:
        with pytest.raises(NotFound, match=r"not found on registry reg\.test"):
            await client.resolve(ref)
        assert trio.current_time() == pytest.approx(1)


@pytest.mark.parametrize("body", ["trickle", "endless"])
async def test_token_body_is_bounded_in_time_and_memory(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock, body: str
) -> None:
    """A token server trickling, or sending a body without end, fails fast: never read whole."""
    ref, _, _ = image
    fake.auth = "bearer"
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        """Endless to the client; 64 MiB in fact, so a regression fails instead of hanging."""
        nonlocal sent
        while sent < 64 << 20:
            sent += 64 << 10
            yield b" " * (64 << 10)

    stream = Trickle(b'{"token": "t"}') if body == "trickle" else httpx.ByteStream(b"")
    if body == "endless":
        stream = Stream(endless())
    token = fake.token
    fake.token = lambda request: httpx.Response(200, stream=stream)  # type: ignore[method-assign]
    async with client_for(fake, nocreds(tmp_path), request_timeout=1) as client:
        error = Unavailable if body == "trickle" else InvalidArgument
        with pytest.raises(error, match=r"token server auth\.test") as info:
            await client.resolve(ref)
        assert trio.current_time() <= 1
    fake.token = token  # type: ignore[method-assign]
    if body == "endless":
        assert "larger than 1 MiB" in str(info.value)
        assert sent <= 2 << 20  # read as it streamed, stopped just past the cap
    else:
        assert "not complete within 1 s" in str(info.value)


class Stream(httpx.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.chunks:
            yield chunk


async def test_slow_blob_stream_stops_at_the_position_reached(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, _, blobs = image
    layer = blobs[1]
    desc = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(layer), len(layer))
    fake.script = [
        httpx.Response(200, headers={"Content-Length": str(len(layer))}, stream=Trickle(layer, 1))
    ]
    async with client_for(fake, nocreds(tmp_path), min_rate=100, low_speed_time=5) as client:
        got = b""
        async with client.open_blob(ref, desc) as stream:
            with pytest.raises(Unavailable) as info:
                async for chunk in stream.aiter_chunks():
                    got += chunk
            assert stream.position == len(got) == 5
    assert got == layer[:5]
    assert f"slower than 100 bytes/s for 5 s at byte 5 of {len(layer)}" in str(info.value)


async def test_stalled_blob_stream_is_cut_and_steady_slow_one_kept(
    fake: FakeRegistry, image: Image, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    ref, _, blobs = image
    layer = blobs[1]
    desc = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(layer), len(layer))

    async def stall() -> AsyncIterator[bytes]:
        yield layer[:1000]
        await trio.sleep_forever()

    async def steady() -> AsyncIterator[bytes]:
        for i in range(0, len(layer), 500):  # 500 bytes/s, just above the limit
            yield layer[i : i + 500]
            await trio.sleep(1)

    length = {"Content-Length": str(len(layer))}
    fake.script = [
        httpx.Response(200, headers=length, stream=Stream(stall())),
        httpx.Response(200, headers=length, stream=Stream(steady())),
    ]
    async with client_for(fake, nocreds(tmp_path), min_rate=400, low_speed_time=5) as client:
        with pytest.raises(Unavailable, match=f"at byte 1000 of {len(layer)}"):
            await read_all(client, ref, desc)
        assert trio.current_time() == pytest.approx(5)
        assert await read_all(client, ref, desc) == layer


# -- redirects and httpx's own failures ---------------------------------------------------


async def test_redirect_loops_are_one_line_errors(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, desc, blobs = image
    layer = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(blobs[1]), len(blobs[1]))
    loop = {"Location": f"http://{REGISTRY}/v2/loop"}
    async with client_for(fake, nocreds(tmp_path)) as client:
        for call in (
            lambda: client.resolve(ref),
            lambda: client.fetch_manifest(ref, desc),
            lambda: read_all(client, ref, layer),
        ):
            fake.script = [resp(307, headers=loop) for _ in range(20)]
            with pytest.raises(InvalidArgument, match=r"registry reg\.test redirects in a loop"):
                await call()
            assert "retry" not in client.statistics()


async def test_token_realm_redirect_loop_is_refused_by_name(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    ref, _, _ = image
    fake.auth = "bearer"
    fake.token = lambda request: resp(302, headers={"Location": REALM})  # type: ignore[method-assign]
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument, match=r"token server auth\.test redirects in a loop"):
            await client.resolve(ref)


@pytest.mark.parametrize(
    ("failure", "expected", "attempts"),
    [
        (httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'."),
         InvalidArgument, 1),
        (httpx.LocalProtocolError("Illegal header value"), InvalidArgument, 1),
        (httpx.DecodingError("Error -3 while decompressing data"), InvalidArgument, 1),
        (httpx.InvalidURL("Invalid non-printable ASCII character in URL"), InvalidArgument, 1),
        (httpx.RemoteProtocolError("Server disconnected"), Unavailable, 6),
        (httpx.ReadTimeout("timed out"), Unavailable, 1),  # silence is not waited out again
    ],
)  # fmt: skip
async def test_every_httpx_failure_is_a_ckfs_error(
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    failure: Exception,
    expected: type[Exception],
    attempts: int,
) -> None:
    calls = 0

    def fail(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise failure

    async with client_for(
        FakeRegistry(), nocreds(tmp_path), transport=httpx.MockTransport(fail)
    ) as client:
        with pytest.raises(expected) as info:
            await client.resolve(parse(f"{REGISTRY}/x/y:1"))
    assert "reg.test" in str(info.value) and "\n" not in str(info.value)
    assert calls == attempts


async def test_storage_401_is_unavailable_and_never_gets_credentials(
    fake: FakeRegistry, image: Image, tmp_path: Path
) -> None:
    """A redirect target's challenge is not the registry's: nothing is sent to it or its realm.

    A credential leak if it regresses: the storage host would be handed the
    registry's token, or its realm the user's password.
    """
    ref, _, blobs = image
    layer = blobs[1]
    desc = Descriptor(mt.OCI_LAYER_GZIP, from_bytes(layer), len(layer))
    fake.auth = "bearer"
    fake.users = {"alice": "s3cret"}
    fake.anonymous_tokens = False
    fake.redirect_blobs = True
    evil_realm = "http://evil.test/token"
    fake.storage = lambda request: resp(  # type: ignore[method-assign]
        401, headers={"WWW-Authenticate": f'Bearer realm="{evil_realm}",service="storage"'}
    )
    credentials = creds_file(tmp_path, {REGISTRY: {"username": "alice", "password": "s3cret"}})
    async with client_for(fake, credentials) as client:
        with pytest.raises(Unavailable) as info:
            await read_all(client, ref, desc)
    assert "storage host storage.test answered HTTP 401 after a redirect" in str(info.value)
    assert fake.seen("evil.test") == []
    to_registry = [r for r in fake.requests if r.url.host == REGISTRY]
    assert to_registry[-1].headers["authorization"].startswith("Bearer ")  # it had a token
    to_storage = [r for r in fake.requests if r.url.host == "storage.test"]
    assert to_storage and all("authorization" not in r.headers for r in to_storage)
    secrets = (basic("alice", "s3cret"), "s3cret", "tok-")
    for r in fake.requests:
        if r.url.host != "auth.test" and r.url.host != REGISTRY:
            assert not any(s in str(r.headers) + str(r.url) for s in secrets)


@pytest.mark.parametrize("realm", ["ftp://auth.test/token", "http://[::1/token", "/token"])
async def test_unusable_realm_is_refused_by_name(
    fake: FakeRegistry, image: Image, tmp_path: Path, realm: str
) -> None:
    ref, _, _ = image
    fake.script = [resp(401, headers={"WWW-Authenticate": f'Bearer realm="{realm}"'})]
    async with client_for(fake, nocreds(tmp_path)) as client:
        with pytest.raises(InvalidArgument) as info:
            await client.resolve(ref)
    assert f"registry reg.test named token server {realm!r}, not an http(s) URL" in str(info.value)
    assert fake.seen("auth.test") == []
