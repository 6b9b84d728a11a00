"""The Docker token protocol's plain parts: challenges, scopes and token answers.

Shared by the registry client's `ckfs.remotes.auth.Authorizer` and the
loop-free manifest ``HEAD`` of `ckfs.remotes.peek`; nothing here does I/O,
so neither trio nor httpx is needed to use it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

from ckfs.errors import InvalidArgument
from ckfs.jsondoc import parse_object

__all__ = [
    "DEFAULT_TOKEN_LIFETIME",
    "MAX_TOKEN_RESPONSE",
    "SCHEMES",
    "Challenge",
    "parse_challenges",
    "parse_token",
    "pull_scope",
    "token_query",
]

_log = logging.getLogger(__name__)

#: Seconds a token lives when the token server does not say (distribution's
#: token spec: "When omitted, this defaults to 60 seconds").
DEFAULT_TOKEN_LIFETIME = 60

#: Token responses are a few hundred bytes; more is a broken or hostile server.
MAX_TOKEN_RESPONSE = 1 << 20


def pull_scope(repository: str) -> str:
    """The token scope for pulling *repository* (``repository:<name>:pull``)."""
    return f"repository:{repository}:pull"


def token_query(service: str, scopes: Iterable[str]) -> list[tuple[str, str]]:
    """The query of a token ``GET``: the service, then each scope once, sorted."""
    params = [("service", service)] if service else []
    return params + [("scope", s) for s in sorted(set(scopes))]


def parse_token(content: bytes, server: str) -> tuple[str, float]:
    """The ``Authorization`` value and lifetime in seconds from a token server's 2xx body.

    Raises:
        InvalidArgument: the body is too large, not a JSON object, lacks a
            token or holds one with a line break (a header injection).
    """
    if len(content) > MAX_TOKEN_RESPONSE:
        raise InvalidArgument(f"token server {server}: response larger than 1 MiB")
    body = parse_object(content, f"token server {server}: response")
    token = body.get("access_token") or body.get("token")
    if not isinstance(token, str) or not token:
        raise InvalidArgument(f"token server {server}: response has no token")
    if any(c in token for c in "\r\n"):
        raise InvalidArgument(f"token server {server}: token contains a line break")
    lifetime = body.get("expires_in")
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    return f"Bearer {token}", lifetime


@dataclasses.dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a lower-case scheme and its parameters."""

    scheme: str
    params: Mapping[str, str]


#: RFC 7230 ``tchar``: what a token (scheme, parameter name, bare value) is made of.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68 = _TCHAR | frozenset("/=")

#: Schemes ckfs can answer, in order of preference; the first present is used.
SCHEMES = ("bearer", "basic")

#: Bounds on what a registry's ``WWW-Authenticate`` may make us parse and
#: keep. A real challenge is one header of a few hundred bytes with three or
#: four parameters; these leave room for long scope lists and odd extra
#: challenges while a hostile header costs a bounded, linear scan.
MAX_CHALLENGE_HEADER = 16 << 10  # bytes per header value; longer ones are skipped
MAX_CHALLENGE_HEADERS = 16  # header values looked at
MAX_CHALLENGES = 16  # challenges kept, over all values
MAX_CHALLENGE_PARAMS = 32  # parameters per challenge; the rest of that header is skipped


class _Scanner:
    """A cursor over one header value, for the RFC 7235 challenge grammar."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def token(self, chars: frozenset[str] = _TCHAR) -> str:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in chars:
            self.i += 1
        return self.s[start : self.i]

    def quoted(self) -> str:
        """A quoted-string (cursor on the opening quote), unescaping ``\\x``."""
        self.i += 1
        out = []
        while self.i < len(self.s):
            c = self.s[self.i]
            self.i += 1
            if c == "\\" and self.i < len(self.s):
                out.append(self.s[self.i])
                self.i += 1
            elif c == '"':
                return "".join(out)
            else:
                out.append(c)
        raise ValueError("unterminated quoted string")


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values into challenges.

    Handles what registries send in practice and RFC 7235 allows: several
    challenges in one header separated by commas, several headers, quoted
    values containing commas, ``=`` and escaped quotes, unquoted values,
    parameter names in any case, and ``token68`` credentials (skipped).
    A header that cannot be parsed is skipped from the point of the error
    with the challenges before it kept: a registry's odd extra challenge must
    not hide the bearer challenge we can use. Hostile headers cost linear
    time and bounded memory: see `MAX_CHALLENGE_HEADER` and the bounds after it.

    Returns:
        The challenges in preference order: ``bearer`` first, then
        ``basic``, then other schemes in the order they came.
    """
    found: list[Challenge] = []
    for n, value in enumerate(values):
        if n == MAX_CHALLENGE_HEADERS or len(found) >= MAX_CHALLENGES:
            break
        if len(value) > MAX_CHALLENGE_HEADER:
            _log.debug("ignoring a WWW-Authenticate header of %d bytes", len(value))
            continue
        sc = _Scanner(value)
        try:
            _parse_header(sc, found)
        except ValueError as e:
            _log.debug("ignoring the rest of a malformed WWW-Authenticate header: %s", e)

    def rank(c: Challenge) -> int:
        return SCHEMES.index(c.scheme) if c.scheme in SCHEMES else len(SCHEMES)

    return sorted(found, key=rank)


def _parse_header(sc: _Scanner, found: list[Challenge]) -> None:
    while True:
        sc.skip_ws()
        while sc.peek() == ",":  # empty list elements are allowed
            sc.i += 1
            sc.skip_ws()
        if not sc.peek():
            return
        scheme = sc.token()
        if not scheme:
            raise ValueError(f"expected an auth scheme at offset {sc.i}")
        if len(found) >= MAX_CHALLENGES:
            raise ValueError(f"more than {MAX_CHALLENGES} challenges")
        params: dict[str, str] = {}
        found.append(Challenge(scheme.lower(), params))
        sc.skip_ws()
        # token68 (``Negotiate abc==``): one value, '=' only as padding,
        # followed by the end or the next challenge. We have no use for it.
        save = sc.i
        t68 = sc.token(_TOKEN68)
        sc.skip_ws()
        if t68 and "=" not in t68.rstrip("=") and sc.peek() in ("", ","):
            continue
        sc.i = save
        # auth-params: name "=" (token | quoted-string), comma separated. A
        # comma followed by a token and no "=" starts the next challenge.
        while True:
            sc.skip_ws()
            start = sc.i
            name = sc.token()
            sc.skip_ws()
            if not name or sc.peek() != "=":
                sc.i = start
                break
            sc.i += 1
            sc.skip_ws()
            if len(params) >= MAX_CHALLENGE_PARAMS:
                raise ValueError(f"more than {MAX_CHALLENGE_PARAMS} parameters")
            params[name.lower()] = sc.quoted() if sc.peek() == '"' else sc.token()
            sc.skip_ws()
            if sc.peek() != ",":
                break
            sc.i += 1
