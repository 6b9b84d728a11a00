"""What one answer from a registry or token server may cost: time, bytes and waits.

A per-read timeout does not bound a request: a server sending one byte
every 20 s never trips a 60 s read timeout and holds the request for as
long as it likes. So every request here also has an overall `Deadline`
(response headers plus any small body read with them), blob streams have a
minimum rate (`SpeedLimit`, curl's ``--speed-limit``/``--speed-time``),
bodies are read with their size cap while they stream (`read_capped`), and a
wait before a retry that would end after the enclosing trio deadline fails
at once instead of sleeping into it (`wait_to_retry`).

Everything cooperates with cancel scopes the caller opens (a `Deadline`
around a whole blob, in `ckfs.remotes.fetch`): each scope turns only its
own expiry into an error; an enclosing cancellation passes through
untouched.

`http_failure` is the one place httpx's exceptions become `CkfsError`: a
transport failure is weather (`Unavailable`, worth a retry), a redirect
loop or a URL the client cannot follow is the server's answer
(`InvalidArgument`), and a certificate that does not verify is
configuration (`FailedPrecondition`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import trio

from ckfs.errors import CkfsError, FailedPrecondition, InvalidArgument, Unavailable
from ckfs.safetext import printable

if TYPE_CHECKING:
    # Imported where used: `ckfs.remotes.fetch` budgets with `Deadline` and
    # must not load httpx (80 ms) for an unpack of images already present.
    import httpx

__all__ = [
    "LOW_SPEED_TIME",
    "MAX_REDIRECTS",
    "MIN_RATE",
    "REQUEST_TIMEOUT",
    "Deadline",
    "SpeedLimit",
    "TooSlow",
    "certificate_error",
    "describe",
    "http_failure",
    "read_capped",
    "wait_to_retry",
]

#: Redirect hops followed before giving up (Go's net/http, and so containerd,
#: stop after 10 too); a loop costs ten requests, not a hang.
MAX_REDIRECTS = 10

#: Default seconds for one attempt's response headers plus a small body
#: (manifest, error, token): far beyond any healthy registry, even a busy
#: one, and still a bound on a server trickling a byte at a time.
REQUEST_TIMEOUT = 60.0

#: Default slowest blob stream kept, in bytes/s averaged over
#: `LOW_SPEED_TIME`: 1 KiB/s is a fiftieth of dial-up, so no working link
#: falls below it for that long, while a stuck or trickling connection is cut
#: within 30 s instead of the hours a byte every few seconds would take. A
#: false cut costs one reconnect: the caller resumes at the byte reached.
MIN_RATE = 1024

#: Default seconds over which `MIN_RATE` is averaged (curl's --speed-time).
LOW_SPEED_TIME = 30.0

#: Longest exception text kept in a message: httpx quotes whole URLs.
_MAX_DETAIL = 300


class TooSlow(Unavailable):
    """A request's `Deadline` or read timeout passed: not retried, the server had its chance."""


@dataclasses.dataclass(frozen=True, slots=True)
class Deadline:
    """The trio time by which one request's answer, or one blob, must be complete.

    Attributes:
        at: The deadline, in `trio.current_time` terms.
        seconds: The budget it was made from, for messages.
    """

    at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(trio.current_time() + seconds, seconds)

    def passed(self) -> bool:
        return trio.current_time() >= self.at

    def enforce(self, what: str) -> AbstractContextManager[None]:
        """Run the body until the deadline; then raise ``TooSlow(what ...)``.

        *what* names the server and what was being read ("manifest X from
        registry Y: response headers").
        """
        return self.raising(lambda: TooSlow(f"{what} not complete within {self.seconds:g} s"))

    @contextlib.contextmanager
    def raising(self, error: Callable[[], CkfsError]) -> Iterator[None]:
        """Run the body until the deadline; then raise *error()*.

        *error* is called only then, so its message can say how far the body
        got. A cancel scope rather than a timeout per request: everything
        inside (retries, ``Retry-After`` waits, token round trips) sees the
        deadline through `trio.current_effective_deadline` and shares it.
        """
        with trio.CancelScope(deadline=self.at) as scope:
            yield
        if scope.cancelled_caught:
            raise error()


@dataclasses.dataclass(frozen=True, slots=True)
class SpeedLimit:
    """A stream must move `min_rate` bytes/s on average over every `window` seconds.

    Checked per window: from its start the stream must deliver
    ``min_rate * window`` bytes within *window* seconds, and a new window
    starts once it has. A stall is caught the same way, since the window's
    end is a deadline on the next read. ``min_rate`` 0 turns the check off.
    """

    min_rate: float
    window: float

    @property
    def quota(self) -> float:
        return self.min_rate * self.window

    def deadline(self) -> float:
        """The end of a window starting now."""
        return trio.current_time() + self.window if self.min_rate > 0 else float("inf")


async def read_capped(response: httpx.Response, limit: int, where: str) -> bytes:
    """The body as it streams, stopping once it passes *limit* bytes.

    More than *limit* bytes returned means the body is too large; the rest
    is never read, so memory stays within *limit* plus one network read.

    Raises:
        Unavailable: the connection broke (``<where>: connection lost ...``).
    """
    import httpx

    parts: list[bytes] = []
    n = 0
    try:
        async for chunk in response.aiter_raw():
            parts.append(chunk)
            n += len(chunk)
            if n > limit:
                break
    except httpx.TransportError as e:
        raise Unavailable(f"{where}: connection lost after {n} bytes: {describe(e)}") from None
    return b"".join(parts)


async def wait_to_retry(delay: float, why: str) -> None:
    """Sleep *delay* seconds before a retry, unless that passes the enclosing deadline.

    Raises:
        Unavailable: ``<why>; a retry in N s would pass the deadline``, at
            once, instead of sleeping into a cancellation that would hide why.
    """
    if trio.current_time() + delay > trio.current_effective_deadline():
        raise Unavailable(f"{why}; a retry in {delay:.3g} s would pass the deadline")
    await trio.sleep(delay)


def certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a transport error, if that is what it is."""
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 10:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return None


def describe(exc: BaseException) -> str:
    """A short one-line description of an httpx failure, naming certificate failures."""
    if (cert := certificate_error(exc)) is not None:
        return f"TLS certificate verification failed: {cert.verify_message}"
    text = printable(str(exc).strip(), _MAX_DETAIL)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def http_failure(exc: httpx.HTTPError | httpx.InvalidURL, server: str, what: str) -> CkfsError:
    """The `CkfsError` for an httpx failure while asking *server* ("registry X") for *what*.

    Only `Unavailable` other than `TooSlow` is worth retrying: the others
    would say the same thing the next time, or make the caller wait as long
    again.
    """
    import httpx

    if isinstance(exc, httpx.TooManyRedirects):
        return InvalidArgument(
            f"{what}: {server} redirects in a loop (more than {MAX_REDIRECTS} hops)"
        )
    if certificate_error(exc) is not None:
        return FailedPrecondition(
            f"{server} ({what}): {describe(exc)}; trust its CA with 'ca' in its hosts.toml"
        )
    if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):
        # Silence for a whole read timeout: asking again would only repeat the wait.
        return TooSlow(f"{server} stopped answering ({what}): {describe(exc)}")
    unusable = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)
    if isinstance(exc, httpx.TransportError) and not isinstance(exc, unusable):
        return Unavailable(f"{server} is unreachable ({what}): {describe(exc)}")
    return InvalidArgument(f"{what}: cannot use the answer of {server}: {describe(exc)}")
