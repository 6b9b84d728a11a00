"""Image references parse and normalize exactly as Docker's distribution/reference.

The tables are the specification: each valid row states every derived form,
each invalid row the part of the message that names what is wrong.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ckfs.digest import Digest
from ckfs.errors import InvalidArgument
from ckfs.reference import (
    DEFAULT_DOMAIN,
    NAME_TOTAL_LENGTH_MAX,
    Reference,
    parse,
    parse_repository,
)

D256 = "sha256:" + hashlib.sha256(b"").hexdigest()
D512 = "sha512:" + hashlib.sha512(b"").hexdigest()
HUB = "registry-1.docker.io"
TAG128 = "t" + "a" * 127
LONG_OFFICIAL = "a" * (NAME_TOTAL_LENGTH_MAX - len("docker.io/library/"))
LONG_EXAMPLE = "b" * (NAME_TOTAL_LENGTH_MAX - len("example.com/"))
HEX64 = "0123456789abcdef" * 4


class Case(NamedTuple):
    text: str
    normalized: str
    domain: str
    path: str
    tag: str
    digest: str | None
    familiar: str
    host: str


VALID = [
    # Docker Hub official images, every spelling.
    Case(
        "alpine",
        "docker.io/library/alpine:latest",
        "docker.io",
        "library/alpine",
        "latest",
        None,
        "alpine:latest",
        HUB,
    ),
    Case(
        "alpine:3.19",
        "docker.io/library/alpine:3.19",
        "docker.io",
        "library/alpine",
        "3.19",
        None,
        "alpine:3.19",
        HUB,
    ),
    Case(
        "library/alpine",
        "docker.io/library/alpine:latest",
        "docker.io",
        "library/alpine",
        "latest",
        None,
        "alpine:latest",
        HUB,
    ),
    Case(
        "docker.io/alpine",
        "docker.io/library/alpine:latest",
        "docker.io",
        "library/alpine",
        "latest",
        None,
        "alpine:latest",
        HUB,
    ),
    Case(
        "docker.io/library/alpine:edge",
        "docker.io/library/alpine:edge",
        "docker.io",
        "library/alpine",
        "edge",
        None,
        "alpine:edge",
        HUB,
    ),
    Case(
        "docker.io/library/alpine:latest",
        "docker.io/library/alpine:latest",
        "docker.io",
        "library/alpine",
        "latest",
        None,
        "alpine:latest",
        HUB,
    ),
    Case(
        "index.docker.io/alpine",
        "docker.io/library/alpine:latest",
        "docker.io",
        "library/alpine",
        "latest",
        None,
        "alpine:latest",
        HUB,
    ),
    Case(
        "index.docker.io/library/redis:7",
        "docker.io/library/redis:7",
        "docker.io",
        "library/redis",
        "7",
        None,
        "redis:7",
        HUB,
    ),
    # Docker Hub user images.
    Case(
        "docker.io/stevvooe/foo",
        "docker.io/stevvooe/foo:latest",
        "docker.io",
        "stevvooe/foo",
        "latest",
        None,
        "stevvooe/foo:latest",
        HUB,
    ),
    Case(
        "stevvooe/foo:v2",
        "docker.io/stevvooe/foo:v2",
        "docker.io",
        "stevvooe/foo",
        "v2",
        None,
        "stevvooe/foo:v2",
        HUB,
    ),
    Case(
        "index.docker.io/stevvooe/foo",
        "docker.io/stevvooe/foo:latest",
        "docker.io",
        "stevvooe/foo",
        "latest",
        None,
        "stevvooe/foo:latest",
        HUB,
    ),
    # library/ is only dropped from one-level official names.
    Case(
        "docker.io/library/a/b",
        "docker.io/library/a/b:latest",
        "docker.io",
        "library/a/b",
        "latest",
        None,
        "library/a/b:latest",
        HUB,
    ),
    Case(
        "a/b/c/d",
        "docker.io/a/b/c/d:latest",
        "docker.io",
        "a/b/c/d",
        "latest",
        None,
        "a/b/c/d:latest",
        HUB,
    ),
    # Other registries: domain has a dot, a port, or is localhost.
    Case(
        "example.com/foo",
        "example.com/foo:latest",
        "example.com",
        "foo",
        "latest",
        None,
        "example.com/foo:latest",
        "example.com",
    ),
    Case(
        "example.com:5000/foo/bar:1.0",
        "example.com:5000/foo/bar:1.0",
        "example.com:5000",
        "foo/bar",
        "1.0",
        None,
        "example.com:5000/foo/bar:1.0",
        "example.com:5000",
    ),
    Case(
        "gcr.io/a/b/c/d:v1",
        "gcr.io/a/b/c/d:v1",
        "gcr.io",
        "a/b/c/d",
        "v1",
        None,
        "gcr.io/a/b/c/d:v1",
        "gcr.io",
    ),
    Case(
        "my-registry.local:8080/ns/img",
        "my-registry.local:8080/ns/img:latest",
        "my-registry.local:8080",
        "ns/img",
        "latest",
        None,
        "my-registry.local:8080/ns/img:latest",
        "my-registry.local:8080",
    ),
    Case(
        "registry:5000/app",
        "registry:5000/app:latest",
        "registry:5000",
        "app",
        "latest",
        None,
        "registry:5000/app:latest",
        "registry:5000",
    ),
    Case(
        "localhost/foo",
        "localhost/foo:latest",
        "localhost",
        "foo",
        "latest",
        None,
        "localhost/foo:latest",
        "localhost",
    ),
    Case(
        "localhost:5000/foo:v1",
        "localhost:5000/foo:v1",
        "localhost:5000",
        "foo",
        "v1",
        None,
        "localhost:5000/foo:v1",
        "localhost:5000",
    ),
    Case(
        "127.0.0.1:5000/foo",
        "127.0.0.1:5000/foo:latest",
        "127.0.0.1:5000",
        "foo",
        "latest",
        None,
        "127.0.0.1:5000/foo:latest",
        "127.0.0.1:5000",
    ),
    Case(
        "192.168.1.1/foo/bar",
        "192.168.1.1/foo/bar:latest",
        "192.168.1.1",
        "foo/bar",
        "latest",
        None,
        "192.168.1.1/foo/bar:latest",
        "192.168.1.1",
    ),
    Case(
        "[::1]:5000/x",
        "[::1]:5000/x:latest",
        "[::1]:5000",
        "x",
        "latest",
        None,
        "[::1]:5000/x:latest",
        "[::1]:5000",
    ),
    Case(
        "[2001:db8::1]/x",
        "[2001:db8::1]/x:latest",
        "[2001:db8::1]",
        "x",
        "latest",
        None,
        "[2001:db8::1]/x:latest",
        "[2001:db8::1]",
    ),
    Case(
        "[2001:DB8::1]:443/x/y:tag",
        "[2001:DB8::1]:443/x/y:tag",
        "[2001:DB8::1]:443",
        "x/y",
        "tag",
        None,
        "[2001:DB8::1]:443/x/y:tag",
        "[2001:DB8::1]:443",
    ),
    # The domain may be upper case; an upper-case first component is a domain.
    Case(
        "Registry.Example.com/bar",
        "Registry.Example.com/bar:latest",
        "Registry.Example.com",
        "bar",
        "latest",
        None,
        "Registry.Example.com/bar:latest",
        "Registry.Example.com",
    ),
    Case(
        "Foo/bar",
        "Foo/bar:latest",
        "Foo",
        "bar",
        "latest",
        None,
        "Foo/bar:latest",
        "Foo",
    ),
    # Only exactly "docker.io" is Docker Hub.
    Case(
        "Docker.io/foo",
        "Docker.io/foo:latest",
        "Docker.io",
        "foo",
        "latest",
        None,
        "Docker.io/foo:latest",
        "Docker.io",
    ),
    # A single component is always a Hub name, even when it looks like a host.
    Case(
        "localhost",
        "docker.io/library/localhost:latest",
        "docker.io",
        "library/localhost",
        "latest",
        None,
        "localhost:latest",
        HUB,
    ),
    Case(
        "localhost:5000",
        "docker.io/library/localhost:5000",
        "docker.io",
        "library/localhost",
        "5000",
        None,
        "localhost:5000",
        HUB,
    ),
    Case(
        "foo.bar",
        "docker.io/library/foo.bar:latest",
        "docker.io",
        "library/foo.bar",
        "latest",
        None,
        "foo.bar:latest",
        HUB,
    ),
    # Separators.
    Case(
        "foo__bar",
        "docker.io/library/foo__bar:latest",
        "docker.io",
        "library/foo__bar",
        "latest",
        None,
        "foo__bar:latest",
        HUB,
    ),
    Case(
        "foo---bar",
        "docker.io/library/foo---bar:latest",
        "docker.io",
        "library/foo---bar",
        "latest",
        None,
        "foo---bar:latest",
        HUB,
    ),
    Case(
        "foo_bar/baz.qux",
        "docker.io/foo_bar/baz.qux:latest",
        "docker.io",
        "foo_bar/baz.qux",
        "latest",
        None,
        "foo_bar/baz.qux:latest",
        HUB,
    ),
    Case(
        "ab-c_d__e/f0-9.x",
        "docker.io/ab-c_d__e/f0-9.x:latest",
        "docker.io",
        "ab-c_d__e/f0-9.x",
        "latest",
        None,
        "ab-c_d__e/f0-9.x:latest",
        HUB,
    ),
    Case(
        "0", "docker.io/library/0:latest", "docker.io", "library/0", "latest", None, "0:latest", HUB
    ),
    # Tags.
    Case(
        "alpine:v1.2.3-rc.1",
        "docker.io/library/alpine:v1.2.3-rc.1",
        "docker.io",
        "library/alpine",
        "v1.2.3-rc.1",
        None,
        "alpine:v1.2.3-rc.1",
        HUB,
    ),
    Case(
        "alpine:_x",
        "docker.io/library/alpine:_x",
        "docker.io",
        "library/alpine",
        "_x",
        None,
        "alpine:_x",
        HUB,
    ),
    Case(
        "alpine:UPPER_Tag",
        "docker.io/library/alpine:UPPER_Tag",
        "docker.io",
        "library/alpine",
        "UPPER_Tag",
        None,
        "alpine:UPPER_Tag",
        HUB,
    ),
    Case(
        f"alpine:{TAG128}",
        f"docker.io/library/alpine:{TAG128}",
        "docker.io",
        "library/alpine",
        TAG128,
        None,
        f"alpine:{TAG128}",
        HUB,
    ),
    # Digests: no default tag when pinned; tag and digest together keep both.
    Case(
        f"alpine@{D256}",
        f"docker.io/library/alpine@{D256}",
        "docker.io",
        "library/alpine",
        "",
        D256,
        f"alpine@{D256}",
        HUB,
    ),
    Case(
        f"alpine:3.19@{D256}",
        f"docker.io/library/alpine:3.19@{D256}",
        "docker.io",
        "library/alpine",
        "3.19",
        D256,
        f"alpine:3.19@{D256}",
        HUB,
    ),
    Case(
        f"alpine@{D512}",
        f"docker.io/library/alpine@{D512}",
        "docker.io",
        "library/alpine",
        "",
        D512,
        f"alpine@{D512}",
        HUB,
    ),
    Case(
        f"example.com/foo@{D256}",
        f"example.com/foo@{D256}",
        "example.com",
        "foo",
        "",
        D256,
        f"example.com/foo@{D256}",
        "example.com",
    ),
    Case(
        f"localhost:5000/foo:v1@{D512}",
        f"localhost:5000/foo:v1@{D512}",
        "localhost:5000",
        "foo",
        "v1",
        D512,
        f"localhost:5000/foo:v1@{D512}",
        "localhost:5000",
    ),
    # Length limit: domain/path of exactly 255 characters is fine.
    Case(
        LONG_OFFICIAL,
        f"docker.io/library/{LONG_OFFICIAL}:latest",
        "docker.io",
        f"library/{LONG_OFFICIAL}",
        "latest",
        None,
        f"{LONG_OFFICIAL}:latest",
        HUB,
    ),
    Case(
        f"example.com/{LONG_EXAMPLE}",
        f"example.com/{LONG_EXAMPLE}:latest",
        "example.com",
        LONG_EXAMPLE,
        "latest",
        None,
        f"example.com/{LONG_EXAMPLE}:latest",
        "example.com",
    ),
    # Only a bare 64-hex string is ambiguous; with a tag it is a name.
    Case(
        f"{HEX64}:v1",
        f"docker.io/library/{HEX64}:v1",
        "docker.io",
        f"library/{HEX64}",
        "v1",
        None,
        f"{HEX64}:v1",
        HUB,
    ),
    Case(
        HEX64[:63],
        f"docker.io/library/{HEX64[:63]}:latest",
        "docker.io",
        f"library/{HEX64[:63]}",
        "latest",
        None,
        f"{HEX64[:63]}:latest",
        HUB,
    ),
]


def _short(text: str) -> str:
    return (text if len(text) <= 40 else text[:37] + "...") or "<empty>"


def _case_id(case: Case) -> str:
    return _short(case.text)


@pytest.mark.parametrize("case", VALID, ids=_case_id)
def test_valid(case: Case) -> None:
    ref = parse(case.text)
    assert str(ref) == case.normalized
    assert ref.domain == case.domain
    assert ref.path == case.path
    assert ref.repository == case.path
    assert ref.tag == case.tag
    assert ref.digest == case.digest
    if case.digest is not None:
        assert isinstance(ref.digest, Digest)
    assert ref.familiar() == case.familiar
    assert ref.registry_host == case.host
    assert ref.name == f"{case.domain}/{case.path}"
    assert ref.locator == ref.name
    # The normalized string is a fixed point.
    assert parse(case.normalized) == ref
    assert str(parse(case.normalized)) == case.normalized


INVALID = [
    ("", "empty reference"),
    # Upper case in the repository path.
    ("Foo", "repository name must be lowercase"),
    ("ALPINE:latest", "repository name must be lowercase"),
    ("foo/Bar", "repository name must be lowercase"),
    ("docker.io/Foo/bar", "repository name must be lowercase"),
    ("index.docker.io/Foo", "repository name must be lowercase"),
    ("localhost:5000/Foo", "repository name must be lowercase"),
    # Path structure.
    ("foo/", "empty path component"),
    ("foo//bar", "empty path component"),
    ("/foo", "empty path component"),
    ("example.com/foo/", "empty path component"),
    ("localhost/", "missing repository path"),
    ("example.com/", "missing repository path"),
    (f"example.com/@{D256}", "missing repository path"),
    (":latest", "missing repository path"),
    ("-foo", 'component "-foo"'),
    (".foo", 'component ".foo"'),
    ("_foo", 'component "_foo"'),
    ("foo/-bar", 'component "-bar"'),
    ("foo-", 'component "foo-"'),
    ("foo_.bar", 'component "foo_.bar"'),
    ("foo___bar", 'component "foo___bar"'),
    ("foo..bar", 'component "foo..bar"'),
    ("alpine latest", "invalid repository path"),
    ("alpine\n", "invalid repository path"),
    ("caf\u00e9", "invalid repository path"),
    # Domains.
    ("exa_mple.com/foo", 'invalid domain "exa_mple.com"'),
    ("-example.com/foo", 'invalid domain "-example.com"'),
    ("example-.com/foo", 'invalid domain "example-.com"'),
    ("example..com/foo", 'invalid domain "example..com"'),
    ("example.com:abc/foo", 'invalid domain "example.com:abc"'),
    ("example.com:/foo", 'invalid domain "example.com:"'),
    ("[::1/foo", 'invalid domain "[::1"'),
    ("[fe80::1%eth0]/foo", 'invalid domain "[fe80::1%eth0]"'),
    ("Foo_bar/x", 'invalid domain "Foo_bar"'),
    # A dot makes the first component a domain, where "_" is not allowed.
    ("foo_bar.baz/x", 'invalid domain "foo_bar.baz"'),
    ("alpine:a/b", 'invalid domain "alpine:a"'),
    # Tags.
    ("alpine:", 'invalid tag ""'),
    ("alpine:-x", 'invalid tag "-x"'),
    ("alpine:.x", 'invalid tag ".x"'),
    (f"alpine:{TAG128}b", f'invalid tag "{TAG128}b"'),
    ("alpine:caf\u00e9", "invalid tag"),
    ("alpine:a+b", 'invalid tag "a+b"'),
    ("foo:bar:baz", 'invalid tag "bar:baz"'),
    (f"localhost:5000/foo:@{D256}", 'invalid tag ""'),
    # Digests.
    ("alpine@md5:" + "0" * 32, "unsupported algorithm 'md5'"),
    ("alpine@sha256:abc", "invalid digest"),
    ("alpine@" + D256[:-1], "invalid digest"),
    ("alpine@" + D256 + "0", "invalid digest"),
    ("alpine@" + D256.upper().replace("SHA256", "sha256"), "invalid digest"),
    ("alpine@" + D512[:-2], "invalid digest"),
    ("alpine@", "invalid digest"),
    ("alpine@" + D256.split(":")[1], "invalid digest"),
    (f"alpine@{D256}@{D256}", "invalid digest"),
    (f"alpine:v1@{D256}:v2", "invalid digest"),
    # Length and ambiguity.
    (LONG_OFFICIAL + "a", "name longer than 255 characters"),
    (f"example.com/{LONG_EXAMPLE}b", "name longer than 255 characters"),
    (f"example.com/{LONG_EXAMPLE}b:v1@{D256}", "name longer than 255 characters"),
    (HEX64, "cannot specify 64-byte hexadecimal strings"),
]


@pytest.mark.parametrize(("text", "message"), INVALID, ids=[_short(t) for t, _ in INVALID])
def test_invalid(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse(text)
    got = str(info.value)
    assert message in got
    assert got.startswith("invalid reference ")
    assert "\n" not in got


def test_invalid_default_tag() -> None:
    with pytest.raises(InvalidArgument, match='invalid tag "-bad"'):
        parse("alpine", default_tag="-bad")


def test_default_tag_option() -> None:
    assert str(parse("alpine", default_tag="edge")) == "docker.io/library/alpine:edge"
    assert str(parse("alpine:3", default_tag="edge")) == "docker.io/library/alpine:3"
    bare = parse("alpine", default_tag="")
    assert str(bare) == "docker.io/library/alpine"
    assert bare.tag == "" and bare.digest is None
    assert bare.familiar() == "alpine"


def test_with_tag() -> None:
    ref = parse("docker.io/stevvooe/foo")
    assert str(ref.with_tag("v2")) == "docker.io/stevvooe/foo:v2"
    assert str(ref.with_tag("")) == "docker.io/stevvooe/foo"
    assert ref.with_tag("latest") == ref
    pinned = parse(f"alpine@{D256}")
    both = pinned.with_tag("3.19")
    assert str(both) == f"docker.io/library/alpine:3.19@{D256}"
    assert both == parse(f"alpine:3.19@{D256}")
    for bad in ("-x", "a" * 129, "a/b", "caf\u00e9"):
        with pytest.raises(InvalidArgument, match="invalid tag"):
            ref.with_tag(bad)


def test_with_digest() -> None:
    ref = parse("alpine:3.19")
    both = ref.with_digest(D256)
    assert str(both) == f"docker.io/library/alpine:3.19@{D256}"
    assert isinstance(both.digest, Digest)
    assert both.with_digest(Digest.parse(D512)).digest == D512
    assert both.with_digest(None) == ref
    assert str(parse("alpine", default_tag="").with_digest(D256)) == (
        f"docker.io/library/alpine@{D256}"
    )
    with pytest.raises(InvalidArgument, match="unsupported algorithm"):
        ref.with_digest("md5:" + "0" * 32)
    with pytest.raises(InvalidArgument, match="invalid digest"):
        ref.with_digest("sha256:abc")


def test_object_part() -> None:
    assert parse("alpine").object == "latest"
    assert parse(f"alpine@{D256}").object == f"@{D256}"
    assert parse(f"alpine:3@{D256}").object == f"3@{D256}"


def test_frozen_and_hashable() -> None:
    a = parse("alpine")
    b = parse("index.docker.io/library/alpine:latest")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, parse("docker.io/alpine")}) == 1
    with pytest.raises(AttributeError):
        a.tag = "x"  # type: ignore[misc]


def test_constructor_validates() -> None:
    ok = Reference("example.com", "foo", "v1", Digest.parse(D256))
    assert str(ok) == f"example.com/foo:v1@{D256}"
    # A plain str digest is validated and upgraded.
    assert isinstance(Reference("example.com", "foo", digest=D256).digest, Digest)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="not normalized"):
        Reference(DEFAULT_DOMAIN, "alpine")
    with pytest.raises(InvalidArgument, match="not normalized"):
        Reference("index.docker.io", "library/alpine")
    with pytest.raises(InvalidArgument, match="invalid domain"):
        Reference("", "foo")
    with pytest.raises(InvalidArgument, match="must be lowercase"):
        Reference("example.com", "Foo")
    with pytest.raises(InvalidArgument, match="invalid tag"):
        Reference("example.com", "foo", "-x")
    with pytest.raises(InvalidArgument, match="invalid digest"):
        Reference("example.com", "foo", digest="sha256:0")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="name longer than 255"):
        Reference("example.com", "a" * 244)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", "docker.io/library/alpine"),
        ("index.docker.io/library/alpine", "docker.io/library/alpine"),
        ("docker.io/stevvooe/foo", "docker.io/stevvooe/foo"),
        ("localhost:5000/foo", "localhost:5000/foo"),
        ("[::1]:5000/x", "[::1]:5000/x"),
    ],
)
def test_parse_repository(text: str, expected: str) -> None:
    ref = parse_repository(text)
    assert str(ref) == expected
    assert ref.tag == "" and ref.digest is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alpine:3", 'unexpected tag "3"'),
        ("localhost:5000", 'unexpected tag "5000"'),
        (f"alpine@{D256}", "unexpected digest"),
        (f"alpine:3@{D256}", "unexpected tag"),
        ("Alpine", "must be lowercase"),
        ("", "empty reference"),
        (HEX64, "64-byte hexadecimal"),
        ("alpine:", 'invalid tag ""'),
    ],
)
def test_parse_repository_invalid(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_repository(text)


# --- property tests -------------------------------------------------------

_component = st.from_regex(r"[a-z0-9]{1,5}(?:(?:[._]|__|-{1,3})[a-z0-9]{1,5}){0,2}", fullmatch=True)
_path = st.lists(_component, min_size=1, max_size=4).map("/".join)
_domain_component = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?", fullmatch=True)
_port = st.integers(min_value=0, max_value=65535).map(lambda p: f":{p}")
_host = st.one_of(
    st.sampled_from(["docker.io", "index.docker.io", "localhost", "[::1]", "[2001:db8::1]"]),
    st.builds(
        lambda parts, tld: ".".join([*parts, tld]),
        st.lists(_domain_component, min_size=1, max_size=3),
        st.sampled_from(["com", "io", "local", "0"]),
    ),
)
# A domain is recognised only by a dot, a colon, "localhost" or upper case, so
# a plain one-component host is generated with a port.
_domain = st.one_of(
    st.just(""),
    st.builds(lambda host, port: host + port, _host, st.one_of(st.just(""), _port)),
    st.builds(lambda host, port: host + port, _domain_component, _port),
)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_digest = st.sampled_from([D256, D512])


@st.composite
def _references(draw: st.DrawFn) -> str:
    domain = draw(_domain)
    path = draw(_path)
    if not domain:
        # Without a domain, a first component with a dot would be read as one.
        first = path.split("/", 1)[0]
        assume("." not in first and first != "localhost")
    text = f"{domain}/{path}" if domain else path
    if draw(st.booleans()):
        text += ":" + draw(_tag)
    if draw(st.booleans()):
        text += "@" + draw(_digest)
    return text


@given(_references())
def test_roundtrip(text: str) -> None:
    ref = parse(text)
    again = parse(str(ref))
    assert again == ref
    assert str(again) == str(ref)
    assert parse(str(ref), default_tag="other") == ref
    assert ref.tag or ref.digest is not None


@given(_references())
def test_familiar_roundtrip(text: str) -> None:
    ref = parse(text)
    # Docker's familiar form drops docker.io/, so a Hub path whose first
    # component looks like a host would be read back as that host.
    first = ref.path.split("/", 1)[0]
    assume(ref.domain != DEFAULT_DOMAIN or ("." not in first and first != "localhost"))
    assert parse(ref.familiar()) == ref


@given(st.text(max_size=80))
def test_arbitrary_text_is_refused_cleanly(text: str) -> None:
    try:
        ref = parse(text)
    except InvalidArgument as exc:
        assert len(str(exc).splitlines()) == 1
    else:
        assert parse(str(ref)) == ref
