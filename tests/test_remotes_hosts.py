"""hosts.toml lookup and parsing: containerd's semantics on tmp certs.d trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckfs.errors import InvalidArgument
from ckfs.remotes.hosts import (
    DEFAULT_CAPABILITIES,
    RegistryHost,
    default_hosts_dirs,
    is_localhost,
    load_hosts,
)


def write(root: Path, name: str, toml: str | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    if toml is not None:
        (d / "hosts.toml").write_text(toml)
    return d


def brief(hosts: list[RegistryHost]) -> list[tuple[str, str, str]]:
    return [(h.scheme, h.host, h.path) for h in hosts]


# -- defaults without any configuration ----------------------------------------

DEFAULTS = [
    ("docker.io", False, [("https", "registry-1.docker.io", "/v2")], False),
    ("docker.io", True, [("https", "registry-1.docker.io", "/v2")], False),
    ("quay.io", False, [("https", "quay.io", "/v2")], False),
    ("quay.io", True, [("http", "quay.io", "/v2")], False),
    ("registry.example:5000", False, [("https", "registry.example:5000", "/v2")], False),
    ("127.0.0.1:5000", False, [("http", "127.0.0.1:5000", "/v2")], False),
    ("localhost:5000", False, [("http", "localhost:5000", "/v2")], False),
    ("[::1]:5000", False, [("http", "[::1]:5000", "/v2")], False),
    ("127.0.0.2:80", False, [("http", "127.0.0.2:80", "/v2")], False),
    # Loopback without a port or on 443: HTTPS, certificate not verified.
    ("localhost", False, [("https", "localhost", "/v2")], True),
    ("127.0.0.1:443", False, [("https", "127.0.0.1:443", "/v2")], True),
]


@pytest.mark.parametrize(("registry", "plain_http", "want", "skip_verify"), DEFAULTS)
def test_defaults(
    tmp_path: Path,
    registry: str,
    plain_http: bool,
    want: list[tuple[str, str, str]],
    skip_verify: bool,
) -> None:
    hosts = load_hosts(registry, hosts_dirs=[tmp_path / "missing"], plain_http=plain_http)
    assert brief(hosts) == want
    assert hosts[0].skip_verify is skip_verify
    assert hosts[0].capabilities == DEFAULT_CAPABILITIES
    assert hosts[0].mirror_of is None  # docker.io → registry-1 is not a mirror


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1", True),
        ("127.1.2.3:5000", True),
        ("[::1]:5000", True),
        ("::1", True),
        ("10.0.0.1:5000", False),
        ("localhost.example", False),
        ("docker.io", False),
    ],
)
def test_is_localhost(name: str, local: bool) -> None:
    assert is_localhost(name) is local


def test_default_hosts_dirs(tmp_path: Path) -> None:
    assert default_hosts_dirs(tmp_path) == [tmp_path / "certs.d", Path("/etc/containerd/certs.d")]


# -- lookup order -----------------------------------------------------------------


LOOKUP = [
    # (directories present, registry, the directory that must be used)
    (
        ["reg.example_5000_", "reg.example:5000", "_default"],
        "reg.example:5000",
        "reg.example_5000_",
    ),
    (["reg.example:5000", "_default"], "reg.example:5000", "reg.example:5000"),
    (["reg.example", "_default"], "reg.example:5000", "_default"),
    (["reg.example", "_default"], "reg.example", "reg.example"),
    (["_default"], "anything.example", "_default"),
    (["other.example"], "reg.example", None),
]


@pytest.mark.parametrize(("present", "registry", "chosen"), LOOKUP)
def test_lookup_order(
    tmp_path: Path, present: list[str], registry: str, chosen: str | None
) -> None:
    for name in present:
        write(tmp_path, name, f'server = "https://{name.strip("_")}.served"\n')
    hosts = load_hosts(registry, hosts_dirs=[tmp_path])
    if chosen is None:
        assert brief(hosts) == [("https", registry, "/v2")]
    else:
        assert hosts[-1].host == f"{chosen.strip('_')}.served"


def test_first_hosts_dir_wins_even_with_default(tmp_path: Path) -> None:
    """Like containerd's CRI config_path list: each root is searched fully in turn."""
    first, second = tmp_path / "first", tmp_path / "second"
    write(first, "_default", 'server = "https://first.example"\n')
    write(second, "reg.example", 'server = "https://second.example"\n')
    assert load_hosts("reg.example", hosts_dirs=[first, second])[0].host == "first.example"
    assert load_hosts("reg.example", hosts_dirs=[second, first])[0].host == "second.example"


# -- hosts.toml ---------------------------------------------------------------------

MIRRORS = """
server = "https://registry-1.docker.io"

[host."https://mirror-b.example"]
  capabilities = ["pull"]

[host."http://mirror-a.example:5000/some/prefix"]
  capabilities = ["pull", "resolve"]
  skip_verify = true

[host."https://mirror-b.example".header]
  x-custom = "1"
"""


def test_mirrors_in_file_order_then_server(tmp_path: Path) -> None:
    d = write(tmp_path, "docker.io", MIRRORS)
    hosts = load_hosts("docker.io", hosts_dirs=[tmp_path])
    assert brief(hosts) == [
        ("https", "mirror-b.example", "/v2"),
        ("http", "mirror-a.example:5000", "/some/prefix/v2"),
        ("https", "registry-1.docker.io", "/v2"),
    ]
    assert hosts[0].capabilities == {"pull"}
    assert hosts[0].headers == {"x-custom": ("1",)}
    assert hosts[1].capabilities == {"pull", "resolve"}
    assert hosts[1].skip_verify
    assert [h.mirror_of for h in hosts] == ["docker.io", "docker.io", None]
    assert hosts[2].capabilities == DEFAULT_CAPABILITIES
    assert d.exists()


def test_server_defaults_when_only_mirrors_are_configured(tmp_path: Path) -> None:
    write(tmp_path, "127.0.0.1:5000", '[host."http://127.0.0.1:6000"]\ncapabilities=["pull"]\n')
    hosts = load_hosts("127.0.0.1:5000", hosts_dirs=[tmp_path])
    assert brief(hosts) == [("http", "127.0.0.1:6000", "/v2"), ("http", "127.0.0.1:5000", "/v2")]
    assert hosts[0].mirror_of == "127.0.0.1:5000"
    assert hosts[1].mirror_of is None


SERVERS = [
    # (server line, override_path, (scheme, host, path))
    ('"registry.example"', False, ("https", "registry.example", "/v2")),
    ('"http://registry.example:8080"', False, ("http", "registry.example:8080", "/v2")),
    ('"https://registry.example/v2"', False, ("https", "registry.example", "/v2")),
    ('"https://registry.example/v2/"', False, ("https", "registry.example", "/v2")),
    ('"https://registry.example/proxy"', False, ("https", "registry.example", "/proxy/v2")),
    ('"https://registry.example/api/v2/proj"', True, ("https", "registry.example", "/api/v2/proj")),
    ('"https://registry.example"', True, ("https", "registry.example", "")),
]


@pytest.mark.parametrize(("server", "override", "want"), SERVERS)
def test_server_url_and_override_path(
    tmp_path: Path, server: str, override: bool, want: tuple[str, str, str]
) -> None:
    write(tmp_path, "r.example", f"server = {server}\noverride_path = {str(override).lower()}\n")
    (host,) = load_hosts("r.example", hosts_dirs=[tmp_path])
    assert (host.scheme, host.host, host.path) == want
    assert host.override_path is override
    assert host.mirror_of == "r.example"


def test_tls_files_headers_and_timeout(tmp_path: Path) -> None:
    d = write(
        tmp_path,
        "r.example",
        """
server = "https://r.example"
ca = "ca.pem"
client = [["/abs/client.cert", "client.key"], "both.pem"]
skip_verify = false
dial_timeout = "1m30s"
capabilities = ["PULL", "Resolve"]
[header]
  authorization-extra = ["a", "b"]
  x-one = "1"
""",
    )
    (host,) = load_hosts("r.example", hosts_dirs=[tmp_path])
    assert host.ca == (d / "ca.pem",)
    assert host.client == ((Path("/abs/client.cert"), d / "client.key"), (d / "both.pem", None))
    assert host.headers == {"authorization-extra": ("a", "b"), "x-one": ("1",)}
    assert host.dial_timeout == 90.0
    assert host.capabilities == {"pull", "resolve"}
    assert host.has_tls_config
    assert host.base_url == "https://r.example/v2"


def test_docker_cert_files_without_hosts_toml(tmp_path: Path) -> None:
    d = write(tmp_path, "r.example:5000")
    for name in ("ca.crt", "client.cert", "client.key", "lonely.cert", "ignored.txt"):
        (d / name).write_text("x")
    (host,) = load_hosts("r.example:5000", hosts_dirs=[tmp_path])
    assert (host.scheme, host.host) == ("https", "r.example:5000")
    assert host.ca == (d / "ca.crt",)
    assert host.client == ((d / "client.cert", d / "client.key"), (d / "lonely.cert", None))


def test_empty_hosts_toml_reads_cert_files(tmp_path: Path) -> None:
    d = write(tmp_path, "r.example", "")
    (d / "extra.crt").write_text("x")
    (host,) = load_hosts("r.example", hosts_dirs=[tmp_path])
    assert host.ca == (d / "extra.crt",)


def test_plain_http_leaves_configured_servers_alone(tmp_path: Path) -> None:
    write(tmp_path, "r.example", 'server = "https://r.example"\n')
    (host,) = load_hosts("r.example", hosts_dirs=[tmp_path], plain_http=True)
    assert host.scheme == "https"
    write(tmp_path, "s.example", '[host."https://m.example"]\n')
    hosts = load_hosts("s.example", hosts_dirs=[tmp_path], plain_http=True)
    assert brief(hosts) == [("https", "m.example", "/v2"), ("http", "s.example", "/v2")]


BAD = [
    ("server = [", "invalid TOML"),
    ('capabilities = ["pull", "fly"]', "unknown capability 'fly'"),
    ('capabilities = "pull"', "capabilities must be a list of strings"),
    ("skip_verify = 1", "skip_verify must be true or false"),
    ("ca = 3", "ca must be a string or a list of strings"),
    ("client = [[1, 2]]", "client entries"),
    ('dial_timeout = "soon"', "invalid dial_timeout"),
    ('server = "ftp://r.example"', "not an http(s) URL"),
    ("host = 1", "[host] must be a table"),
    ('[header]\nx = "a\\nb"', "line break"),
]


@pytest.mark.parametrize(("toml", "message"), BAD)
def test_malformed_hosts_toml_names_the_file(tmp_path: Path, toml: str, message: str) -> None:
    d = write(tmp_path, "r.example", toml + "\n")
    with pytest.raises(InvalidArgument) as info:
        load_hosts("r.example", hosts_dirs=[tmp_path])
    assert str(d / "hosts.toml") in str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
