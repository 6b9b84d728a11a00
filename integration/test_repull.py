"""Asking again for a present image: `ckfs.pull.pull_local` and `ckfs.remotes.peek`.

A re-pull must cost what the question costs: by digest or offline nothing
is asked; by tag one manifest ``HEAD``, sent without starting trio or
httpx. Whatever that one request cannot settle (credentials, a moved tag, a
registry that is gone, a proxy) must end in the full pull, unchanged in
behaviour. Checked against docker-registry behind the counting fault proxy.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from ckfs import mediatypes as mt
from ckfs.digest import Digest
from ckfs.reference import parse
from ckfs.remotes.hosts import RegistryHost, load_hosts
from ckfs.remotes.peek import tag_digest
from integration.conftest import Ckfs
from integration.faultproxy import FaultProxy
from integration.registry import (
    AUTH_PASSWORD,
    AUTH_USER,
    EXAMPLE_REPO,
    Registry,
    free_port,
)

pytestmark = pytest.mark.slow


def summary_of(ckfs: Ckfs, *args: str) -> dict[str, object]:
    out = ckfs.run("pull", "--json", *args).stdout.splitlines()
    summary: dict[str, object] = json.loads(out[-1])
    return summary


@pytest.fixture
def pushed(
    registry_factory: Callable[..., Registry], example_layout: Path
) -> Iterator[tuple[FaultProxy, Digest]]:
    """A fresh registry holding the example image, behind a counting proxy."""
    r = registry_factory()
    digest = Digest.parse(r.push(example_layout, EXAMPLE_REPO))
    with FaultProxy(r.host).running() as proxy:
        yield proxy, digest


def hosts_of(proxy: FaultProxy) -> list[RegistryHost]:
    return load_hosts(proxy.host, hosts_dirs=[])


def test_tag_digest_is_one_head_with_the_manifest_accept_list(
    pushed: tuple[FaultProxy, Digest],
) -> None:
    proxy, digest = pushed
    ref = parse(f"{proxy.host}/{EXAMPLE_REPO}")
    assert tag_digest(ref, hosts_of(proxy)) == digest
    [head] = proxy.seen
    assert head.method == "HEAD" and head.path.endswith(f"/manifests/{ref.tag}")
    headers = {k.lower(): v for k, v in head.headers.items()}
    assert all(t in headers["accept"] for t in mt.MANIFEST_ACCEPT)
    assert "authorization" not in headers


def test_tag_digest_says_none_for_whatever_it_cannot_settle(
    pushed: tuple[FaultProxy, Digest], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, digest = pushed
    hosts = hosts_of(proxy)
    repo = EXAMPLE_REPO.split(":")[0]
    assert tag_digest(parse(f"{proxy.host}/{repo}:no-such-tag"), hosts) is None
    # Pinned references are never sent: they need no resolving.
    proxy.clear()
    assert tag_digest(parse(f"{proxy.host}/{repo}@{digest}"), hosts) is None
    assert proxy.seen == []
    # A proxy in the environment is the full client's business (httpx honours it).
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    assert tag_digest(parse(f"{proxy.host}/{EXAMPLE_REPO}"), hosts) is None
    assert proxy.seen == []
    monkeypatch.delenv("HTTP_PROXY")
    # Nobody listening.
    gone = f"127.0.0.1:{free_port()}"
    assert tag_digest(parse(f"{gone}/{EXAMPLE_REPO}"), load_hosts(gone, hosts_dirs=[])) is None


def test_tag_digest_asks_a_resolving_mirror_with_ns(
    pushed: tuple[FaultProxy, Digest], tmp_path: Path
) -> None:
    proxy, digest = pushed
    upstream = f"127.0.0.1:{free_port()}"  # never asked: the mirror resolves
    hosts_dir = tmp_path / "certs.d" / f"{upstream.replace(':', '_')}_"
    hosts_dir.mkdir(parents=True)
    (hosts_dir / "hosts.toml").write_text(
        f'[host."http://{proxy.host}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    hosts = load_hosts(upstream, hosts_dirs=[tmp_path / "certs.d"])
    assert tag_digest(parse(f"{upstream}/{EXAMPLE_REPO}"), hosts) == digest
    [head] = proxy.seen
    assert parse_qs(head.query) == {"ns": [upstream]}


def test_tag_digest_leaves_an_authenticating_registry_to_the_full_client(
    auth_registry: Registry,
) -> None:
    ref = parse(f"{auth_registry.host}/{EXAMPLE_REPO}")
    assert tag_digest(ref, load_hosts(auth_registry.host, hosts_dirs=[])) is None


def test_repull_by_tag_starts_no_event_loop_and_sends_one_head(
    ckfs: Ckfs, pushed: tuple[FaultProxy, Digest]
) -> None:
    proxy, digest = pushed
    ref = f"{proxy.host}/{EXAMPLE_REPO}"
    ckfs.run("pull", "-q", ref)
    proxy.clear()
    probe = (
        "import sys\n"
        "from ckfs_cli.main import cli\n"
        f"cli.main(['--root', {str(ckfs.root)!r}, 'pull', '-q', {ref!r}], standalone_mode=False)\n"
        "loaded = {'trio', 'httpx'} & set(sys.modules)\n"
        "assert not loaded, f'{loaded} imported'\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
    assert [(s.method, "/manifests/" in s.path) for s in proxy.seen] == [("HEAD", True)]
    summary = summary_of(ckfs, ref)
    assert summary["network"] is True and summary["fetched_blobs"] == 0
    assert summary["target"]["digest"] == str(digest)  # type: ignore[index]


def test_a_moved_tag_is_pulled_again(
    ckfs: Ckfs, registry_factory: Callable[..., Registry], example_layout: Path, big_layout: Path
) -> None:
    r = registry_factory()
    ref = f"{r.host}/ckfs/moving:1"
    first = r.push(example_layout, "ckfs/moving:1")
    assert summary_of(ckfs, ref)["target"]["digest"] == first  # type: ignore[index]
    second = r.push(big_layout, "ckfs/moving:1")
    summary = summary_of(ckfs, ref)
    assert summary["target"]["digest"] == second != first  # type: ignore[index]
    assert summary["fetched_blobs"] != 0
    info = json.loads(ckfs.run("images", "ls", "--json").stdout)
    assert [i["target"]["digest"] for i in info] == [second]


def test_repull_with_docker_config_credentials_uses_the_full_client(
    ckfs: Ckfs, auth_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    config = tmp_path / "docker"
    config.mkdir()
    (config / "config.json").write_text(
        json.dumps({"auths": {auth_registry.host: {"auth": secret}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    ref = f"{auth_registry.host}/{EXAMPLE_REPO}"
    assert summary_of(ckfs, ref)["fetched_blobs"] != 0
    again = summary_of(ckfs, ref)
    assert again["fetched_blobs"] == 0 and again["network"] is True
