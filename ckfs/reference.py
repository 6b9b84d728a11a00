"""Image references: ``[domain/]path[:tag][@digest]``, normalized the Docker way.

Why this module follows Docker to the letter: every name ckfs stores, prints or
accepts from containerd has to mean the same image it means to ``docker``,
``ctr``, ``nerdctl`` and ``skopeo``. The image store keys on the normalized
string, so two spellings of one image (``alpine``, ``docker.io/library/alpine``,
``index.docker.io/library/alpine:latest``) must normalize to the same text or
ckfs would fetch and store the same image twice. The rules here are those of
Docker's ``distribution/reference`` (``ParseNormalizedNamed`` followed by
``TagNameOnly``), which containerd uses for the same job.

The grammar::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path
    domain     := host [ ":" port ]
    host       := domain-component ( "." domain-component )*  |  "[" ipv6 "]"
    domain-component := [A-Za-z0-9] | [A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]
    port       := [0-9]+
    path       := path-component ( "/" path-component )*
    path-component := [a-z0-9]+ ( separator [a-z0-9]+ )*
    separator  := "." | "_" | "__" | "-"+
    tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
    digest     := sha256:<64 hex> | sha512:<128 hex>   (see `ckfs.digest`)

Normalization, in Docker's order:

- The first ``/``-separated component is a domain when it contains ``.`` or
  ``:``, is ``localhost``, or has an upper-case letter (repository paths never
  do, so Docker reads it as a host); otherwise the name is on Docker Hub.
- ``index.docker.io`` (the legacy Hub name) becomes ``docker.io``.
- A one-component Docker Hub path gains ``library/`` (official images).
- A reference with neither tag nor digest gains the default tag ``latest``;
  one with a digest gets no tag added, and one with both keeps both.

A whole reference that is 64 hex digits is refused: Docker reads such a
string as an image ID, so accepting it as a name would make it ambiguous.

Every malformed reference raises `InvalidArgument` whose one-line message
names the part that is wrong (domain, repository path, tag, digest, length).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ckfs.digest import Digest
from ckfs.errors import InvalidArgument

__all__ = [
    "DEFAULT_DOMAIN",
    "DEFAULT_TAG",
    "DOCKER_HUB_HOST",
    "NAME_TOTAL_LENGTH_MAX",
    "Reference",
    "parse",
    "parse_repository",
]

#: The domain Docker Hub names normalize to; the image store keys on it.
DEFAULT_DOMAIN = "docker.io"

#: The host actually serving Docker Hub's registry API. ``docker.io`` only
#: names the Hub; requests to it would be redirected or refused.
DOCKER_HUB_HOST = "registry-1.docker.io"

#: The tag a name without tag or digest gets, as in ``docker pull alpine``.
DEFAULT_TAG = "latest"

#: Docker's limit on ``domain/path``; registries reject longer names.
NAME_TOTAL_LENGTH_MAX = 255

#: The legacy Docker Hub domain ("the Docker Index"), still accepted as input.
_LEGACY_DEFAULT_DOMAIN = "index.docker.io"

#: Namespace of Docker Hub's official images (``alpine`` is ``library/alpine``).
_OFFICIAL_PREFIX = "library/"

# Character classes are spelled out instead of \w and \d: Python's are
# Unicode-aware, Go's (which define the grammar) are ASCII only.
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_IDENTIFIER = re.compile(r"[a-f0-9]{64}")


def _q(s: str) -> str:
    """Quote *s* for a message, escaping anything that could break the line.

    json only here, on the error path: a valid reference is parsed on every
    ``ckfs pull``, whose start-up the import would slow.
    """
    import json

    return json.dumps(s)


def _invalid(whole: str, detail: str) -> InvalidArgument:
    return InvalidArgument(f"invalid reference {_q(whole)}: {detail}")


def _check_domain(whole: str, domain: str) -> None:
    if not _DOMAIN.fullmatch(domain):
        raise _invalid(whole, f"invalid domain {_q(domain)}")


def _check_path(whole: str, path: str) -> None:
    """Validate a repository path as written (before ``library/`` is added)."""
    if not path:
        raise _invalid(whole, "missing repository path")
    if path.lower() != path:
        raise _invalid(whole, f"repository name must be lowercase (got {_q(path)})")
    for component in path.split("/"):
        if not component:
            raise _invalid(whole, f"invalid repository path {_q(path)}: empty path component")
        if not _PATH_COMPONENT.fullmatch(component):
            raise _invalid(
                whole,
                f"invalid repository path {_q(path)}: component {_q(component)} must be "
                "lowercase letters and digits joined by '.', '_', '__' or dashes",
            )


def _check_tag(whole: str, tag: str) -> None:
    if not _TAG.fullmatch(tag):
        raise _invalid(
            whole,
            f"invalid tag {_q(tag)}: want 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
        )


def _parse_digest(whole: str, value: str) -> Digest:
    try:
        return Digest.parse(value)
    except InvalidArgument as exc:
        # Digest's own message starts with "invalid digest ..." and says why.
        raise _invalid(whole, str(exc)) from exc


def _check_length(whole: str, name: str) -> None:
    if len(name) > NAME_TOTAL_LENGTH_MAX:
        raise _invalid(
            whole, f"name longer than {NAME_TOTAL_LENGTH_MAX} characters (got {len(name)})"
        )


@dataclass(frozen=True)
class Reference:
    """A validated, normalized image reference.

    Build one with `parse` (or `parse_repository`); the constructor validates
    its fields too, and refuses Docker Hub spellings that `parse` would have
    rewritten, so two equal images always compare equal.

    Attributes:
        domain: Registry name as written, with any port: ``docker.io``,
            ``localhost:5000``, ``[::1]:5000``. May contain upper case.
        path: Repository path inside the registry, ``library/alpine``.
        tag: The tag, or ``""`` for none.
        digest: The pinned manifest digest, or None.

    Raises:
        InvalidArgument: a field is malformed, the name is longer than 255
            characters, or the Docker Hub name is not in normalized form.
    """

    domain: str
    path: str
    tag: str = ""
    digest: Digest | None = None

    def __post_init__(self) -> None:
        whole = self._render(self.domain, self.path)
        _check_domain(whole, self.domain)
        _check_path(whole, self.path)
        if self.domain == _LEGACY_DEFAULT_DOMAIN:
            raise _invalid(whole, f"not normalized: use domain {_q(DEFAULT_DOMAIN)}")
        if self.domain == DEFAULT_DOMAIN and "/" not in self.path:
            raise _invalid(whole, f"not normalized: official images are under {_OFFICIAL_PREFIX}")
        if self.tag:
            _check_tag(whole, self.tag)
        if self.digest is not None:
            # Accept a plain str from callers that skipped Digest.parse.
            object.__setattr__(self, "digest", _parse_digest(whole, self.digest))
        _check_length(whole, self.name)

    def _render(self, domain: str, path: str) -> str:
        out = f"{domain}/{path}" if domain else path
        if self.tag:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    def __str__(self) -> str:
        """The full normalized form: ``docker.io/library/alpine:latest``."""
        return self._render(self.domain, self.path)

    @property
    def name(self) -> str:
        """``domain/path`` without tag or digest: ``docker.io/library/alpine``."""
        return f"{self.domain}/{self.path}"

    @property
    def repository(self) -> str:
        """The repository path inside the registry (same as `path`)."""
        return self.path

    @property
    def locator(self) -> str:
        """containerd's name for `name`: where the object is looked up."""
        return self.name

    @property
    def object(self) -> str:
        """containerd's object part: ``tag``, ``tag@digest`` or ``@digest``."""
        return self.tag + (f"@{self.digest}" if self.digest is not None else "")

    @property
    def registry_host(self) -> str:
        """The host (and port) to send registry API requests to.

        ``docker.io`` maps to ``registry-1.docker.io``, as in containerd's
        resolver; every other domain is contacted as written.
        """
        return DOCKER_HUB_HOST if self.domain == DEFAULT_DOMAIN else self.domain

    def familiar(self) -> str:
        """Docker's short display form: ``alpine:latest``, ``stevvooe/foo``.

        Drops ``docker.io/`` and, for one-level official images, ``library/``.
        Like Docker's, this form is for people: a Hub path whose first
        component looks like a host (``docker.io/localhost/x``) shortens to
        something that parses differently, so store and compare `str` instead.
        """
        if self.domain != DEFAULT_DOMAIN:
            return str(self)
        path = self.path
        if path.startswith(_OFFICIAL_PREFIX):
            rest = path[len(_OFFICIAL_PREFIX) :]
            if "/" not in rest:
                path = rest
        return self._render("", path)

    def with_tag(self, tag: str) -> Reference:
        """The same reference with *tag* (``""`` removes it); the digest is kept.

        Raises:
            InvalidArgument: *tag* is not a valid tag.
        """
        return dataclasses.replace(self, tag=tag)

    def with_digest(self, digest: Digest | str | None) -> Reference:
        """The same reference pinned to *digest* (None unpins); the tag is kept.

        Raises:
            InvalidArgument: *digest* is not a valid sha256/sha512 digest.
        """
        if digest is None:
            return dataclasses.replace(self, digest=None)
        return dataclasses.replace(self, digest=_parse_digest(str(self), digest))


def _split(s: str) -> tuple[str, str, str | None, str | None]:
    """Split *s* into (domain, path as written, tag, digest) and validate.

    Tag and digest are None when absent (``""`` when present but empty).
    The domain is normalized; the path is not yet prefixed with ``library/``.
    """
    if not s:
        raise _invalid(s, "empty reference")
    if _IDENTIFIER.fullmatch(s):
        raise _invalid(s, "cannot specify 64-byte hexadecimal strings (ambiguous with an image ID)")

    first, slash, rest = s.partition("/")
    if slash and (
        first == "localhost"
        or first == _LEGACY_DEFAULT_DOMAIN
        or "." in first
        or ":" in first
        or first.lower() != first
    ):
        domain, remainder = first, rest
        if domain == _LEGACY_DEFAULT_DOMAIN:
            domain = DEFAULT_DOMAIN
    else:
        domain, remainder = DEFAULT_DOMAIN, s

    # Neither a tag nor a path contains "@", and a path contains no ":", so
    # the first "@" starts the digest and the first ":" before it the tag.
    named, at, digest = remainder.partition("@")
    path, colon, tag = named.partition(":")

    _check_domain(s, domain)
    _check_path(s, path)
    if colon:
        _check_tag(s, tag)
    return domain, path, tag if colon else None, digest if at else None


def parse(s: str, *, default_tag: str = DEFAULT_TAG) -> Reference:
    """Parse and normalize an image reference as ``docker pull`` would.

    ``alpine`` becomes ``docker.io/library/alpine:latest``; a name with a
    digest and no tag stays untagged; a name with both keeps both (unlike
    containerd's ``ParseDockerRef``, which drops the tag).

    Args:
        s: The reference as a user typed it.
        default_tag: Tag added when *s* has neither tag nor digest; ``""``
            adds none and returns a bare name.

    Raises:
        InvalidArgument: *s* is empty, is a bare 64-hex image ID, has a bad
            domain, a repository path that is not lowercase or not made of
            valid components, a bad tag or digest, or a ``domain/path``
            longer than 255 characters. The message names the part.
    """
    domain, path, tag, digest_text = _split(s)
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = _OFFICIAL_PREFIX + path
    digest = None if digest_text is None else _parse_digest(s, digest_text)
    if tag is None:
        tag = default_tag if digest is None else ""
        if tag:
            _check_tag(s, tag)
    _check_length(s, f"{domain}/{path}")
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def parse_repository(s: str) -> Reference:
    """Parse a repository name: a reference without tag or digest.

    The name is normalized like `parse` (``alpine`` becomes
    ``docker.io/library/alpine``) but gets no default tag.

    Raises:
        InvalidArgument: *s* carries a tag or digest, or is not a valid name
            for any of the reasons `parse` gives.
    """
    _domain, _path, tag, digest_text = _split(s)
    if tag is not None:
        raise _invalid(s, f"unexpected tag {_q(tag)}: a repository name has no tag")
    if digest_text is not None:
        raise _invalid(s, f"unexpected digest {_q(digest_text)}: a repository name has no digest")
    return parse(s, default_tag="")
