"""RegistryClient against Debian's docker-registry (distribution 2.8) on 127.0.0.1.

Three registries, started once for this module and stopped by PID: a plain
one, one behind htpasswd Basic auth, and one behind token auth issued by
`integration.tokenserver`. Images get there the way users put them there:
``skopeo copy`` of the umoci-built example layout. A large random blob is
uploaded through the API to measure `open_blob` throughput.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import FailedPrecondition, NotFound, Unauthorized, Unavailable
from ckfs.images.manifest import children
from ckfs.reference import Reference, parse
from ckfs.remotes.auth import Credentials
from ckfs.remotes.hosts import load_hosts
from ckfs.remotes.peek import tag_digest
from ckfs.remotes.registry import RegistryClient
from integration.certs import certificate, name
from integration.conftest import need
from integration.faultproxy import Fault, FaultProxy
from integration.registry import Registry, free_port
from integration.tokenserver import TokenServer

pytestmark = pytest.mark.slow

REPO = "test/img"
USER, PASSWORD = "ckfs", "pa55-w0rd"
#: Big enough that connection setup and token work vanish in the timing.
THROUGHPUT_BLOB = 256 << 20


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry-client")


@pytest.fixture(scope="module")
def plain(work: Path, example_layout: Path) -> Iterator[tuple[Registry, Digest]]:
    need("skopeo")
    reg = Registry(work / "plain").start()
    try:
        yield reg, Digest.parse(reg.push(example_layout, f"{REPO}:1"))
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def basic_auth(work: Path, example_layout: Path) -> Iterator[tuple[Registry, Digest]]:
    reg = Registry(work / "basic", auth=(USER, PASSWORD)).start()
    try:
        yield reg, Digest.parse(reg.push(example_layout, f"{REPO}:1"))
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def token_setup(work: Path, example_layout: Path) -> Iterator[tuple[Registry, TokenServer, Digest]]:
    tokens = TokenServer(users={USER: PASSWORD}, refresh_tokens={"identity-tok"}).start()
    reg = Registry(work / "token", extra_config=tokens.registry_config(work / "token-ca.pem"))
    try:
        reg.start()
        digest = Digest.parse(reg.push(example_layout, f"{REPO}:1", creds=(USER, PASSWORD)))
        yield reg, tokens, digest
    finally:
        reg.stop()
        tokens.stop()


@pytest.fixture
def token_auth(
    token_setup: tuple[Registry, TokenServer, Digest],
) -> tuple[Registry, TokenServer, Digest]:
    """The token registry with the token server's knobs and records reset."""
    _reg, tokens, _digest = token_setup
    tokens.requests.clear()
    tokens.anonymous_pull = True
    tokens.expires_in = 300
    tokens.stale_tokens = 0
    return token_setup


def client_for(reg: Registry, credentials: Credentials, **kw: float) -> RegistryClient:
    hosts = load_hosts(reg.host, hosts_dirs=[])
    return RegistryClient(reg.host, hosts=hosts, credentials=credentials, **kw)  # type: ignore[arg-type]


def anonymous(tmp_path: Path) -> Credentials:
    return Credentials(config_file=tmp_path / "none.json", env={"PATH": ""})


async def pull_all(client: RegistryClient, ref: Reference) -> dict[str, bytes]:
    """Resolve, fetch the manifest and every blob; verify each; return them by digest."""
    desc = await client.resolve(ref)
    manifest = await client.fetch_manifest(ref, desc)
    out = {str(desc.digest): manifest}
    for child in children(desc, manifest):
        async with client.open_blob(ref, child) as stream:
            data = b"".join([c async for c in stream.aiter_chunks()])
        assert "sha256:" + hashlib.sha256(data).hexdigest() == child.digest
        out[str(child.digest)] = data
    return out


# -- plain registry ---------------------------------------------------------------------


async def test_resolve_fetch_and_blobs(
    plain: tuple[Registry, Digest], example_layout: Path, tmp_path: Path
) -> None:
    reg, pushed = plain
    ref = parse(f"{reg.host}/{REPO}:1")
    async with client_for(reg, anonymous(tmp_path)) as client:
        desc = await client.resolve(ref)
        assert desc.digest == pushed
        assert desc.media_type == mt.OCI_MANIFEST
        by_digest = await client.resolve(ref.with_tag("").with_digest(pushed))
        assert by_digest == desc
        blobs = await pull_all(client, ref)
        stats = client.statistics()
    # skopeo copied the layout's blobs unchanged: the bytes are the layout's.
    for digest, data in blobs.items():
        assert (example_layout / "blobs/sha256" / digest[7:]).read_bytes() == data
    assert stats["resolve"] == 3 and stats["manifest"] == 1  # HEADs only, no GET fallback
    assert "retry" not in stats and "auth" not in stats


async def test_blob_ranges(plain: tuple[Registry, Digest], tmp_path: Path) -> None:
    reg, _ = plain
    ref = parse(f"{reg.host}/{REPO}:1")
    async with client_for(reg, anonymous(tmp_path)) as client:
        desc = await client.resolve(ref)
        layer = children(desc, await client.fetch_manifest(ref, desc))[1]
        async with client.open_blob(ref, layer) as stream:
            whole = b"".join([c async for c in stream.aiter_chunks()])
        for offset, length in [(1, None), (layer.size // 2, None), (100, 1000), (layer.size, None)]:
            async with client.open_blob(ref, layer, offset=offset, length=length) as stream:
                assert stream.offset == offset  # distribution honours Range with 206
                part = b"".join([c async for c in stream.aiter_chunks()])
            end = layer.size if length is None else offset + length
            assert part == whole[offset:end]


async def test_not_found_names_ref_and_registry(
    plain: tuple[Registry, Digest], tmp_path: Path
) -> None:
    reg, _ = plain
    async with client_for(reg, anonymous(tmp_path)) as client:
        for ref in (f"{reg.host}/{REPO}:nope", f"{reg.host}/no/such:1"):
            with pytest.raises(NotFound) as info:
                await client.resolve(parse(ref))
            assert ref in str(info.value) and reg.host in str(info.value)
        missing = Descriptor(mt.OCI_LAYER, Digest.parse("sha256:" + "0" * 64), 10)
        with pytest.raises(NotFound, match="BLOB_UNKNOWN"):
            async with client.open_blob(parse(f"{reg.host}/{REPO}:1"), missing):
                pass


async def test_unreachable_is_unavailable(tmp_path: Path) -> None:
    host = f"127.0.0.1:{free_port()}"
    client = RegistryClient(
        host, hosts=load_hosts(host, hosts_dirs=[]), credentials=anonymous(tmp_path), retries=2
    )
    async with client:
        with pytest.raises(Unavailable, match=f"registry {host} is unreachable"):
            await client.resolve(parse(f"{host}/x/y:1"))
        assert client.statistics() == {"resolve": 3, "retry": 2}


async def test_open_blob_throughput(
    plain: tuple[Registry, Digest], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg, _ = plain
    data = os.urandom(THROUGHPUT_BLOB)
    desc = reg.upload_blob(REPO, data)
    ref = parse(f"{reg.host}/{REPO}:1")
    rates = []
    async with client_for(reg, anonymous(tmp_path)) as client:
        for _ in range(3):
            start = time.perf_counter()
            hasher = hashlib.sha256()
            async with client.open_blob(ref, desc) as stream:
                async for chunk in stream.aiter_chunks():
                    hasher.update(chunk)
            elapsed = time.perf_counter() - start
            assert "sha256:" + hasher.hexdigest() == desc.digest
            rates.append(desc.size / elapsed / 1e6)
        # Reading without hashing: the transport alone.
        start = time.perf_counter()
        n = 0
        async with client.open_blob(ref, desc, offset=desc.size // 2) as stream:
            async for chunk in stream.aiter_chunks():
                n += len(chunk)
        raw_rate = n / (time.perf_counter() - start) / 1e6
        assert n == desc.size - desc.size // 2
    with capsys.disabled():
        print(
            f"\nopen_blob from docker-registry: {THROUGHPUT_BLOB >> 20} MiB with sha256: "
            f"{', '.join(f'{r:.0f}' for r in rates)} MB/s; half without hashing {raw_rate:.0f} MB/s"
        )
    assert max(rates) > 50, "an order of magnitude below what this machine does"


# -- htpasswd (Basic) ---------------------------------------------------------------------


async def test_basic_auth(basic_auth: tuple[Registry, Digest], tmp_path: Path) -> None:
    reg, pushed = basic_auth
    ref = parse(f"{reg.host}/{REPO}:1")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {reg.host: {"username": USER, "password": PASSWORD}}}))
    async with client_for(reg, Credentials(config_file=config, env={"PATH": ""})) as client:
        assert (await client.resolve(ref)).digest == pushed
        await pull_all(client, ref)
        assert client.statistics()["auth"] == 1  # one 401, then Basic up front


async def test_basic_auth_refusals_name_registry_not_secret(
    basic_auth: tuple[Registry, Digest], tmp_path: Path
) -> None:
    reg, _ = basic_auth
    ref = parse(f"{reg.host}/{REPO}:1")
    async with client_for(reg, Credentials(f"{USER}:wrong-Pa55")) as client:
        with pytest.raises(Unauthorized) as info:
            await client.resolve(ref)
    message = str(info.value)
    assert reg.host in message and REPO in message
    assert "wrong-Pa55" not in message and PASSWORD not in message
    async with client_for(reg, anonymous(tmp_path)) as client:
        with pytest.raises(Unauthorized, match="none is configured"):
            await client.resolve(ref)


# -- token auth ------------------------------------------------------------------------------


async def test_token_auth_anonymous_pull(
    token_auth: tuple[Registry, TokenServer, Digest], tmp_path: Path
) -> None:
    reg, tokens, pushed = token_auth
    ref = parse(f"{reg.host}/{REPO}:1")
    async with client_for(reg, anonymous(tmp_path)) as client:
        assert (await client.resolve(ref)).digest == pushed
        await pull_all(client, ref)
        assert client.statistics()["token"] == 1
    (request,) = tokens.requests
    assert request.method == "GET" and request.user is None
    assert request.service == tokens.service
    assert request.scopes == (f"repository:{REPO}:pull",)


def test_peek_does_the_anonymous_token_round_trip_and_sends_no_secret(
    token_auth: tuple[Registry, TokenServer, Digest], tmp_path: Path
) -> None:
    """The loop-free HEAD of a re-pull (`ckfs.remotes.peek`) behind token auth."""
    reg, tokens, pushed = token_auth
    ref = parse(f"{reg.host}/{REPO}:1")
    hosts = load_hosts(reg.host, hosts_dirs=[])
    assert tag_digest(ref, hosts, anonymous(tmp_path)) == pushed
    (request,) = tokens.requests
    assert request.method == "GET" and request.user is None
    assert request.scopes == (f"repository:{REPO}:pull",)
    # No anonymous access: the full client takes over (and says what is wrong).
    tokens.requests.clear()
    tokens.anonymous_pull = False
    assert tag_digest(ref, hosts, anonymous(tmp_path)) is None
    # Credentials are the full client's to send: the token server hears nothing.
    tokens.requests.clear()
    assert tag_digest(ref, hosts, Credentials(f"{USER}:{PASSWORD}")) is None
    assert tokens.requests == []


async def test_token_auth_with_password_and_identity_token(
    token_auth: tuple[Registry, TokenServer, Digest], tmp_path: Path
) -> None:
    reg, tokens, pushed = token_auth
    tokens.anonymous_pull = False
    ref = parse(f"{reg.host}/{REPO}:1")
    async with client_for(reg, anonymous(tmp_path)) as client:
        with pytest.raises(Unauthorized, match="refused an anonymous token"):
            await client.resolve(ref)
    async with client_for(reg, Credentials(f"{USER}:{PASSWORD}")) as client:
        assert (await client.resolve(ref)).digest == pushed
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {reg.host: {"identitytoken": "identity-tok"}}}))
    async with client_for(reg, Credentials(config_file=config, env={"PATH": ""})) as client:
        assert (await client.resolve(ref)).digest == pushed
    assert [(r.method, r.user, r.grant_type, r.status) for r in tokens.requests] == [
        ("GET", None, "", 401),
        ("GET", USER, "", 200),
        ("POST", "refresh-user", "refresh_token", 200),
    ]
    assert all(r.scopes == (f"repository:{REPO}:pull",) for r in tokens.requests)


async def test_token_refreshed_before_expiry(
    token_auth: tuple[Registry, TokenServer, Digest], tmp_path: Path
) -> None:
    reg, tokens, _ = token_auth
    tokens.expires_in = 2
    ref = parse(f"{reg.host}/{REPO}:1")
    async with client_for(reg, anonymous(tmp_path)) as client:
        await client.resolve(ref)
        await client.resolve(ref)
        assert len(tokens.requests) == 1
        await trio.sleep(2)
        await client.resolve(ref)
        # A new token was fetched on the client's own clock, with no new 401.
        assert len(tokens.requests) == 2
        assert client.statistics()["auth"] == 1


async def test_expired_token_refreshed_on_401(
    token_auth: tuple[Registry, TokenServer, Digest], tmp_path: Path
) -> None:
    reg, tokens, _ = token_auth
    tokens.stale_tokens = 1  # the first token dies at the registry long before expires_in
    ref = parse(f"{reg.host}/{REPO}:1")
    async with client_for(reg, anonymous(tmp_path)) as client:
        await client.resolve(ref)
        await trio.sleep(tokens.grace + 1)
        await pull_all(client, ref)  # the registry refuses the cached token once
        stats = client.statistics()
    assert len(tokens.requests) == 2
    assert stats["auth"] == 2


# -- TLS and stalls -----------------------------------------------------------------------------


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate(
        name("ckfs test CA"),
        ca_key.public_key(),
        ca_key,
        extensions=[(x509.BasicConstraints(ca=True, path_length=0), True)],
    )
    key = ec.generate_private_key(ec.SECP256R1())
    address = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    cert = certificate(
        name("127.0.0.1"),
        key.public_key(),
        ca_key,
        issuer=ca.subject,
        extensions=[(x509.SubjectAlternativeName([address]), False)],
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture(scope="module")
def tls_registry(work: Path, example_layout: Path) -> Iterator[tuple[Registry, Path, Digest]]:
    ca, cert, key = _tls_files(work / "tls")
    reg = Registry(work / "tls-registry", tls=(cert, key)).start()
    try:
        yield reg, ca, Digest.parse(reg.push(example_layout, f"{REPO}:1"))
    finally:
        reg.stop()


@pytest.mark.parametrize("trust", ["ca", "skip_verify", "none", "system"])
async def test_tls_hosts_toml(
    tls_registry: tuple[Registry, Path, Digest],
    tmp_path: Path,
    trust: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host's own CA or skip_verify; else the system store, loaded at the first handshake."""
    reg, ca, pushed = tls_registry
    if trust == "system":
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    certs_d = tmp_path / "certs.d"
    # "127.0.0.1_<port>_": the mangled name containerd looks up first.
    hosts_dir = certs_d / (reg.host.replace(":", "_") + "_")
    hosts_dir.mkdir(parents=True)
    lines = [f'server = "https://{reg.host}"']
    if trust == "ca":
        (hosts_dir / "ca.pem").write_bytes(ca.read_bytes())
        lines.append('ca = "ca.pem"')
    elif trust == "skip_verify":
        lines.append("skip_verify = true")
    (hosts_dir / "hosts.toml").write_text("\n".join(lines) + "\n")
    hosts = load_hosts(reg.host, hosts_dirs=[certs_d])
    assert hosts[0].scheme == "https"
    ref = parse(f"{reg.host}/{REPO}:1")
    client = RegistryClient(reg.host, hosts=hosts, credentials=anonymous(tmp_path))
    async with client:
        if trust == "none":
            with pytest.raises(FailedPrecondition, match="certificate verification failed"):
                await client.resolve(ref)
            assert "retry" not in client.statistics()
        else:
            assert (await client.resolve(ref)).digest == pushed
            await pull_all(client, ref)


async def test_stalled_read_times_out(tmp_path: Path) -> None:
    """A server that accepts the connection and then says nothing."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes handshakes; nobody answers
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        client = RegistryClient(
            host,
            hosts=load_hosts(host, hosts_dirs=[]),
            credentials=anonymous(tmp_path),
            read_timeout=0.5,
            retries=1,
        )
        async with client:
            start = trio.current_time()
            with pytest.raises(Unavailable, match=r"stopped answering .*ReadTimeout"):
                await client.resolve(parse(f"{host}/x/y:1"))
            assert 0.5 <= trio.current_time() - start < 3
            assert "retry" not in client.statistics()  # the silence is not waited out again


# -- bounded time on real sockets --------------------------------------------------------


@pytest.fixture
def proxy(plain: tuple[Registry, Digest]) -> Iterator[FaultProxy]:
    """The plain registry behind a fault proxy (started here: its stop blocks, trio must not)."""
    with FaultProxy(plain[0].host).running() as p:
        yield p


async def test_deadlines_and_minimum_rate_on_real_connections(
    proxy: FaultProxy, tmp_path: Path
) -> None:
    """Slow headers, a trickled manifest and a trickled blob each end within their bound.

    Real httpcore connections under trio cancellation: after each cut the
    same client goes on working (the pool is not left with a half-read
    connection), and the blob resumes from the byte the cut reported.
    """
    hosts = load_hosts(proxy.host, hosts_dirs=[])
    ref = parse(f"{proxy.host}/{REPO}:1")
    client = RegistryClient(
        proxy.host,
        hosts=hosts,
        credentials=anonymous(tmp_path),
        request_timeout=1,
        min_rate=2000,
        low_speed_time=1,
    )
    async with client:
        proxy.add(Fault("delay", path="/manifests/", method="HEAD", seconds=20))
        start = trio.current_time()
        with pytest.raises(Unavailable, match=r"response headers from registry .* within 1 s"):
            await client.resolve(ref)
        assert trio.current_time() - start < 3
        desc = await client.resolve(ref)

        proxy.add(Fault("trickle", path="/manifests/", after=10, seconds=0.2))
        start = trio.current_time()
        with pytest.raises(Unavailable, match="body not complete within 1 s"):
            await client.fetch_manifest(ref, desc)
        assert trio.current_time() - start < 3
        layer = children(desc, await client.fetch_manifest(ref, desc))[1]

        proxy.add(Fault("trickle", path="/blobs/", after=5000, seconds=0.2))
        got = b""
        start = trio.current_time()
        async with client.open_blob(ref, layer) as stream:
            with pytest.raises(Unavailable, match="slower than 2000 bytes/s for 1 s"):
                async for chunk in stream.aiter_chunks():
                    got += chunk
            position = stream.position
        assert trio.current_time() - start < 4
        assert position == len(got) >= 5000
        async with client.open_blob(ref, layer, offset=position) as stream:
            got += b"".join([c async for c in stream.aiter_chunks()])
        assert "sha256:" + hashlib.sha256(got).hexdigest() == layer.digest


async def test_plain_blob_body_read_from_the_socket(
    plain: tuple[Registry, Digest],
    proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plain HTTP/1.1 body read past h11 is the same bytes, cuts and stalls included.

    Through the fault proxy (real sockets, Content-Length framing): whole,
    from an offset, cut mid-body (the position says where to resume) and
    stalled mid-body (the request's read timeout still applies); the client
    keeps working after each, since such a connection is closed, not pooled.
    """
    from ckfs.remotes import blobs

    direct: list[bool] = []
    plain_socket = blobs._plain_socket

    def recording(response: object) -> object:
        sock = plain_socket(response)  # type: ignore[arg-type]
        direct.append(sock is not None)
        return sock

    monkeypatch.setattr(blobs, "_plain_socket", recording)
    data = os.urandom(6 << 20)
    layer = plain[0].upload_blob(REPO, data)
    ref = parse(f"{proxy.host}/{REPO}:1")
    client = RegistryClient(
        proxy.host,
        hosts=load_hosts(proxy.host, hosts_dirs=[]),
        credentials=anonymous(tmp_path),
        read_timeout=0.5,
        min_rate=0,
    )
    async with client:
        async with client.open_blob(ref, layer) as stream:
            assert b"".join([c async for c in stream.aiter_chunks()]) == data
        assert direct == [True]
        async with client.open_blob(ref, layer, offset=12345) as stream:
            assert b"".join([c async for c in stream.aiter_chunks()]) == data[12345:]

        proxy.add(Fault("cut", after=(3 << 20) + 7))
        got = b""
        async with client.open_blob(ref, layer) as stream:
            with pytest.raises(Unavailable, match="stream ended at byte"):
                async for chunk in stream.aiter_chunks():
                    got += chunk
            assert stream.position == len(got) == (3 << 20) + 7
        async with client.open_blob(ref, layer, offset=len(got)) as stream:
            got += b"".join([c async for c in stream.aiter_chunks()])
        assert got == data

        proxy.add(Fault("stall", after=(2 << 20) + 3))
        start = trio.current_time()
        async with client.open_blob(ref, layer) as stream:
            with pytest.raises(Unavailable, match="ReadTimeout"):
                async for _ in stream.aiter_chunks():
                    pass
        assert trio.current_time() - start < 3
        desc = await client.resolve(ref)
        assert children(desc, await client.fetch_manifest(ref, desc))
    assert direct and all(direct)
