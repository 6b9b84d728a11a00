"""Real registries for integration tests: Debian's ``docker-registry`` on 127.0.0.1.

Each `Registry` is one ``docker-registry serve`` process with its own
temporary storage and a free loopback port, filled the way users fill
registries: ``skopeo copy`` of umoci-built OCI layouts. Layouts whose layer
media types skopeo would rewrite (uncompressed, zstd while its blob cache
remembers a gzip twin) go in through the distribution API directly
(`Registry.push_layout_raw`), byte for byte; so do lone blobs
(`Registry.upload_blob`). A registry may demand htpasswd basic auth
(``auth``), serve HTTPS (``tls``) or take any further config.yml lines
(``extra_config``, e.g. a token ``auth:`` section from
`integration.tokenserver.TokenServer.registry_config`).

Fixtures (registered for the whole suite by ``pytest_plugins`` in the
top-level conftest):

- ``registry``: a plain registry holding the example image (session-wide;
  tests never change what it serves, only what they pull from it).
- ``mirror``: a second instance holding the same image, for hosts.toml
  mirror tests.
- ``auth_registry``: one that demands htpasswd basic auth
  (`AUTH_USER`:`AUTH_PASSWORD`).
- ``registry_factory``: fresh registries a test may stop (pulls that must
  work with the registry gone).
- ``big_layout``: an image with a 6 MiB random layer, large enough that a
  download can be interrupted after some megabytes were written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from integration.conftest import need, skopeo

__all__ = [
    "AUTH_PASSWORD",
    "AUTH_USER",
    "BIG_REPO",
    "EXAMPLE_REPO",
    "Registry",
    "auth_registry",
    "big_layout",
    "free_port",
    "mirror",
    "recompressed_layout",
    "registry",
    "registry_factory",
]

#: Where the example image lives in every test registry.
EXAMPLE_REPO = "ckfs/busybox:latest"
#: Where `big_layout` lives in the ``registry`` fixture.
BIG_REPO = "ckfs/big:latest"
AUTH_USER, AUTH_PASSWORD = "puller", "s3cret-pw"

#: Seconds a registry may take to answer ``/v2/`` after start.
_START_TIMEOUT = 15.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks; racy but fine here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bcrypt(password: str) -> str:
    """A bcrypt hash for htpasswd; distribution accepts only bcrypt.

    The standard library's ``crypt`` (deprecated, still in 3.11) reaches
    libxcrypt's bcrypt, which avoids needing apache2-utils' ``htpasswd``;
    the ``bcrypt`` package is the fallback where ``crypt`` is gone (3.13+).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
    except ImportError:
        import bcrypt  # type: ignore[import-not-found, unused-ignore]

        hashed: bytes = bcrypt.hashpw(password.encode(), bcrypt.gensalt())
        return hashed.decode()
    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))


@dataclass
class Registry:
    """One ``docker-registry`` process on 127.0.0.1 with private storage.

    Attributes:
        auth: User and password for htpasswd basic auth (none: open).
        tls: Certificate and key files: serve HTTPS instead of HTTP.
        extra_config: Further top-level config.yml lines, such as a token
            ``auth:`` section (then leave ``auth`` unset).
    """

    root: Path
    port: int = field(default_factory=free_port)
    auth: tuple[str, str] | None = None
    tls: tuple[Path, Path] | None = None
    extra_config: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self) -> Registry:
        need("docker-registry")
        self.root.mkdir(parents=True, exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.root / 'data'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
        ]
        if self.tls is not None:
            lines += ["  tls:", f"    certificate: {self.tls[0]}", f"    key: {self.tls[1]}"]
        if self.auth is not None:
            htpasswd = self.root / "htpasswd"
            htpasswd.write_text(f"{self.auth[0]}:{_bcrypt(self.auth[1])}\n")
            lines += ["auth:", "  htpasswd:", "    realm: ckfs-test", f"    path: {htpasswd}"]
        lines += self.extra_config
        config = self.root / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        log = open(self.root / "registry.log", "ab")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"docker-registry exited {self.proc.returncode}: "
                    + (self.root / "registry.log").read_text()[-2000:]
                )
            with contextlib.suppress(httpx.TransportError):
                answer = httpx.get(f"{self.url}/v2/", timeout=1, verify=False)
                if answer.status_code in (200, 401):
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry on {self.host} did not answer /v2/")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop our process (by its PID, never by name)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _client(self) -> httpx.Client:
        """An API client at ``/v2/`` with our basic auth; certificates unchecked."""
        return httpx.Client(base_url=f"{self.url}/v2/", auth=self.auth, timeout=120, verify=False)

    def push(
        self,
        layout: Path,
        repo_tag: str,
        *,
        all_images: bool = False,
        creds: tuple[str, str] | None = None,
    ) -> str:
        """``skopeo copy oci:LAYOUT docker://HOST/REPO:TAG``; returns the manifest digest.

        Logs in as *creds*, else as ``auth`` (token registries need *creds*).
        """
        src = f"oci:{layout}" if all_images else f"oci:{layout}:latest"
        digest_file = self.root / "pushed-digest"
        login = creds or self.auth
        skopeo(
            "copy",
            "-q",
            "--dest-tls-verify=false",
            *(["--dest-creds", f"{login[0]}:{login[1]}"] if login else []),
            *(["--all"] if all_images else []),
            "--digestfile",
            str(digest_file),
            src,
            f"docker://{self.host}/{repo_tag}",
        )
        return digest_file.read_text().strip()

    def push_layout_raw(self, layout: Path, repo_tag: str) -> str:
        """Upload an OCI layout's first image through the API exactly as stored.

        For media types skopeo would convert on the way (it compresses
        uncompressed layers for registries). Returns the manifest digest.
        """
        repo, _, tag = repo_tag.rpartition(":")
        index = json.loads((layout / "index.json").read_text())
        target = index["manifests"][0]
        blobs = layout / "blobs" / "sha256"
        manifest = (blobs / target["digest"].split(":", 1)[1]).read_bytes()
        body = json.loads(manifest)
        for d in [body["config"], *body["layers"]]:
            self.upload_blob(repo, (blobs / d["digest"].split(":", 1)[1]).read_bytes())
        with self._client() as client:
            client.put(
                f"{repo}/manifests/{tag}",
                content=manifest,
                headers={"Content-Type": target["mediaType"]},
            ).raise_for_status()
        return str(target["digest"])

    def upload_blob(self, repo: str, data: bytes, media_type: str = mt.OCI_LAYER) -> Descriptor:
        """A monolithic blob upload to *repo* through the API (no manifest needed to read it)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self._client() as client:
            start = client.post(f"{repo}/blobs/uploads/")
            start.raise_for_status()
            # The upload URL carries state in its query; add to it, keep it.
            location = httpx.URL(start.headers["location"]).copy_add_param("digest", digest)
            client.put(
                location,
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            ).raise_for_status()
        return Descriptor(media_type, Digest.parse(digest), len(data))


@pytest.fixture(scope="session")
def registry_factory_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Registry]]:
    started: list[Registry] = []

    def make(*, auth: tuple[str, str] | None = None) -> Registry:
        r = Registry(tmp_path_factory.mktemp("registry"), auth=auth).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """Start registries that live only for this test (and may be stopped by it)."""
    started: list[Registry] = []

    def make(*, auth: tuple[str, str] | None = None) -> Registry:
        r = Registry(tmp_path / f"registry{len(started)}", auth=auth).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


@pytest.fixture(scope="session")
def registry(
    registry_factory_session: Callable[..., Registry], example_layout: Path, big_layout: Path
) -> Registry:
    r = registry_factory_session()
    r.push(example_layout, EXAMPLE_REPO)
    r.push(big_layout, BIG_REPO)
    return r


@pytest.fixture(scope="session")
def mirror(registry_factory_session: Callable[..., Registry], example_layout: Path) -> Registry:
    r = registry_factory_session()
    r.push(example_layout, EXAMPLE_REPO)
    return r


@pytest.fixture(scope="session")
def auth_registry(
    registry_factory_session: Callable[..., Registry], example_layout: Path
) -> Registry:
    r = registry_factory_session(auth=(AUTH_USER, AUTH_PASSWORD))
    r.push(example_layout, EXAMPLE_REPO)
    return r


@pytest.fixture(scope="session")
def big_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image whose one layer is 6 MiB of random bytes (gzip cannot shrink it)."""
    need("umoci")
    work = tmp_path_factory.mktemp("big")
    layout, src = work / "layout", work / "src"
    (src / "data").mkdir(parents=True)
    (src / "data" / "random.bin").write_bytes(os.urandom(6 << 20))
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    for cmd in (
        ["umoci", "init", "--layout", str(layout)],
        ["umoci", "new", "--image", f"{layout}:latest"],
        ["umoci", "insert", *rootless, "--image", f"{layout}:latest", str(src), "/"],
    ):
        subprocess.run(cmd, check=True, capture_output=True)
    shutil.rmtree(src)
    return layout


def recompressed_layout(src: Path, dst: Path, compression: str) -> Path:
    """A copy of the OCI layout *src* with its gzip layers as *compression*.

    *compression* is ``none`` (plain tar) or ``zstd``. The config is
    unchanged: diff IDs name the uncompressed tars, which are the same.
    """
    import gzip

    import zstandard

    media_types = {"none": mt.OCI_LAYER, "zstd": mt.OCI_LAYER_ZSTD}
    blobs = dst / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (dst / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def read(digest: str) -> bytes:
        return (src / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()

    def write(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    index = json.loads((src / "index.json").read_text())
    entry = index["manifests"][0]
    manifest = json.loads(read(entry["digest"]))
    write(read(manifest["config"]["digest"]))
    for layer in manifest["layers"]:
        tar = gzip.decompress(read(layer["digest"]))
        data = tar if compression == "none" else zstandard.ZstdCompressor().compress(tar)
        layer.update(mediaType=media_types[compression], digest=write(data), size=len(data))
    body = json.dumps(manifest).encode()
    index["manifests"] = [{**entry, "digest": write(body), "size": len(body)}]
    (dst / "index.json").write_text(json.dumps(index))
    return dst
