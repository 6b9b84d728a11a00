"""One manifest ``HEAD`` without the async client: how a re-pull by tag stays cheap.

A pull of a tag whose image is already complete has one question for the
registry: does the tag still point at the digest we hold? Starting trio
and httpx to ask it costs far more than the answer (their imports alone
take 0.3-0.5 s on a small machine); the standard library's ``http.client``
asks it in milliseconds.

This path can only ever say "unchanged". Any other outcome returns None and
the caller does the full pull, whose client handles it properly: the
registry wants credentials (no secret is sent from here), a redirect, an
error status, an unreachable or slow host, a proxy in the environment, a
missing or different digest. Nothing is fetched here and nothing is trusted
beyond what the full client's own ``HEAD`` would trust: the registry's
``Docker-Content-Digest`` for the tag, compared with a digest whose content
is already present and verified.
"""

from __future__ import annotations

import http.client
import logging
import os
from collections.abc import Sequence
from urllib.parse import quote, urlencode

from ckfs import mediatypes as mt
from ckfs.digest import Digest
from ckfs.errors import CkfsError
from ckfs.reference import Reference
from ckfs.remotes.hosts import USER_AGENT, RegistryHost, ssl_context

__all__ = ["PEEK_TIMEOUT", "tag_digest"]

_log = logging.getLogger(__name__)

#: Seconds the one request may take, connecting or reading. Short on
#: purpose: a host that slow gets the full client, with its retries.
PEEK_TIMEOUT = 2.0


def tag_digest(ref: Reference, hosts: Sequence[RegistryHost]) -> Digest | None:
    """The digest *ref*'s tag points at, per the first host that may resolve it.

    Returns:
        The digest from the registry's ``Docker-Content-Digest`` header on a
        ``200`` for a manifest or index; None for any other outcome (see the
        module docstring), never an exception.
    """
    if ref.tag is None or ref.digest is not None:
        return None
    host = next((h for h in hosts if h.can("resolve")), None)
    if host is None or _proxied(host.scheme):
        return None
    path = f"{host.path}/{ref.path}/manifests/{quote(ref.tag)}"
    if host.mirror_of:
        path += "?" + urlencode({"ns": host.mirror_of})
    headers = {k: ", ".join(v) for k, v in host.headers.items()}
    headers.update({"Accept": ", ".join(mt.MANIFEST_ACCEPT), "User-Agent": USER_AGENT})
    conn: http.client.HTTPConnection
    try:
        if host.scheme == "https":
            conn = http.client.HTTPSConnection(
                host.host, timeout=PEEK_TIMEOUT, context=ssl_context(host)
            )
        else:
            conn = http.client.HTTPConnection(host.host, timeout=PEEK_TIMEOUT)
        try:
            conn.request("HEAD", path, headers=headers)
            response = conn.getresponse()
            media_type = (response.getheader("Content-Type") or "").split(";")[0].strip()
            value = response.getheader("Docker-Content-Digest")
        finally:
            conn.close()
        if response.status != 200 or not value:
            _log.debug("HEAD %s on %s: %d; asking the full client", ref, host.host, response.status)
            return None
        if not (mt.is_index(media_type) or mt.is_manifest(media_type)):
            return None
        return Digest.parse(value.strip())
    except (OSError, http.client.HTTPException, CkfsError) as e:
        _log.debug("HEAD %s on %s: %s; asking the full client", ref, host.host, e)
        return None


def _proxied(scheme: str) -> bool:
    """Whether the environment routes *scheme* through a proxy (httpx would honour it)."""
    names = (f"{scheme}_proxy", "all_proxy")
    return any(os.environ.get(n) or os.environ.get(n.upper()) for n in names)
