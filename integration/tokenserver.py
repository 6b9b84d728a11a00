"""A small Docker token server for integration tests, signing JWTs that
distribution 2.8's ``auth.token`` access controller accepts.

What the registry verifies (``registry/auth/token/token.go`` in
distribution v2.8): ``iss`` equals its configured issuer, ``aud`` its
service, ``exp``/``nbf`` hold within a 60 s leeway, and the signature checks
out under a key it trusts. The key is found from the JWT header: ``x5c`` (a
certificate chain that must verify against ``rootcertbundle``), a ``jwk``, or
a ``kid`` (a libtrust fingerprint). This server uses ``x5c``: a throwaway CA
goes into the bundle, a leaf certificate signed by it carries the RSA key
that signs tokens with RS256. Access is then checked per request against
the token's ``access`` claim (``repository`` / name / actions).

The server speaks the two token endpoints clients use: ``GET /token`` with
``service`` and ``scope`` parameters (optionally HTTP Basic), and the OAuth2
``POST /token`` (``grant_type=password`` or ``refresh_token``). Knobs let a
test make it misbehave the ways real ones do, and it records every request
(scopes asked, user, method) so tests can assert what the client sent. It
runs ``http.server`` in a daemon thread on 127.0.0.1, independent of the
trio loop under test.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from integration.certs import certificate, name

__all__ = ["TokenRequest", "TokenServer"]

#: distribution's clock-skew allowance on ``exp`` and ``nbf``, in seconds.
REGISTRY_LEEWAY = 60


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class TokenRequest:
    """One request the server answered (or refused)."""

    method: str
    user: str | None
    service: str
    scopes: tuple[str, ...]
    grant_type: str
    status: int


def _certificates() -> tuple[rsa.RSAPrivateKey, x509.Certificate, x509.Certificate]:
    """A CA and a leaf certificate for the signing key, valid for a day."""
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = certificate(
        name("ckfs test token CA"),
        ca_key.public_key(),
        ca_key,
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
        ],
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = certificate(
        name("ckfs test tokens"),
        key.public_key(),
        ca_key,
        issuer=ca.subject,
        extensions=[(x509.BasicConstraints(ca=False, path_length=None), True)],
    )
    return key, ca, leaf


@dataclass
class TokenServer:
    """A token issuer on 127.0.0.1 for one registry service.

    Attributes:
        service: The registry's ``auth.token.service`` (the token's ``aud``).
        issuer: The registry's ``auth.token.issuer`` (the token's ``iss``).
        users: Username → password accepted by Basic and the password grant.
        refresh_tokens: Identity tokens accepted by the refresh_token grant.
        anonymous_pull: Give anonymous clients pull access (else 401).
        expires_in: Lifetime reported to clients and written into ``exp``.
        stale_tokens: This many next tokens are issued already expired
            (beyond the registry's leeway but for ``grace`` seconds) while
            still reporting ``expires_in``: a server whose clock is behind.
        grace: Seconds a stale token is still accepted by the registry.
        requests: Every request answered, in order.
    """

    service: str = "ckfs-test-registry"
    issuer: str = "ckfs-test-issuer"
    users: dict[str, str] = field(default_factory=dict)
    refresh_tokens: set[str] = field(default_factory=set)
    anonymous_pull: bool = True
    expires_in: int = 300
    stale_tokens: int = 0
    grace: float = 2.0
    requests: list[TokenRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._key, self._ca, self._leaf = _certificates()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> TokenServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._answer(self, "GET")

            def do_POST(self) -> None:
                server._answer(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                pass  # tests read `requests`, not stderr

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def realm(self) -> str:
        assert self._httpd is not None, "start() first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/token"

    def write_root_bundle(self, path: Path) -> Path:
        """Write the CA certificate the registry must trust (``rootcertbundle``)."""
        path.write_bytes(self._ca.public_bytes(serialization.Encoding.PEM))
        return path

    def registry_config(self, bundle: Path) -> list[str]:
        """The ``auth:`` section of a docker-registry config.yml, as lines."""
        return [
            "auth:",
            "  token:",
            f"    realm: {self.realm}",
            f"    service: {self.service}",
            f"    issuer: {self.issuer}",
            f"    rootcertbundle: {self.write_root_bundle(bundle)}",
        ]

    # -- tokens ---------------------------------------------------------------------

    def sign(self, subject: str, access: list[dict[str, Any]], *, stale: bool = False) -> str:
        """A JWT for *access* that the registry will verify."""
        now = int(time.time())
        exp = now + self.expires_in
        if stale:
            exp = now - REGISTRY_LEEWAY + int(self.grace)
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self._leaf.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": exp,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def _access(self, scopes: tuple[str, ...], user: str | None) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            wanted = actions.split(",")
            granted = wanted if user is not None else [a for a in wanted if a == "pull"]
            access.append({"type": "repository", "name": name, "actions": granted})
        return access

    def _answer(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        params = parse_qs(url.query)
        if method == "POST":
            length = int(handler.headers.get("Content-Length") or 0)
            params = parse_qs(handler.rfile.read(length).decode())
        service = (params.get("service") or [""])[0]
        grant = (params.get("grant_type") or [""])[0]
        if method == "POST":
            scopes = tuple(" ".join(params.get("scope") or []).split())
        else:
            scopes = tuple(params.get("scope") or [])
        user = self._authenticate(handler, method, params, grant)
        status = 200
        if url.path != "/token":
            status = 404
        elif user is False or (user is None and not self.anonymous_pull):
            status = 401
        with self._lock:
            self.requests.append(
                TokenRequest(
                    method=method,
                    user=user if isinstance(user, str) else None,
                    service=service,
                    scopes=scopes,
                    grant_type=grant,
                    status=status,
                )
            )
            stale = status == 200 and self.stale_tokens > 0
            if stale:
                self.stale_tokens -= 1
        if status != 200:
            handler.send_response(status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        name = user if isinstance(user, str) else None
        token = self.sign(name or "anonymous", self._access(scopes, name), stale=stale)
        key = "access_token" if method == "POST" else "token"
        body = json.dumps(
            {
                key: token,
                "expires_in": self.expires_in,
                "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
            }
        ).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _authenticate(
        self,
        handler: BaseHTTPRequestHandler,
        method: str,
        params: dict[str, list[str]],
        grant: str,
    ) -> str | bool | None:
        """The user name, None for anonymous, False for bad credentials."""
        if method == "POST":
            if grant == "refresh_token":
                token = (params.get("refresh_token") or [""])[0]
                return "refresh-user" if token in self.refresh_tokens else False
            if grant == "password":
                user = (params.get("username") or [""])[0]
                password = (params.get("password") or [""])[0]
                return user if self.users.get(user) == password and user else False
            return False
        value = handler.headers.get("Authorization")
        if value is None:
            return None
        scheme, _, encoded = value.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return False
        if user == "" and password in self.refresh_tokens:
            return "refresh-user"
        return user if user and self.users.get(user) == password else False
