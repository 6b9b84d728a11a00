"""`ckfs pull` against real registries (docker-registry, skopeo-pushed umoci
images), with a fault proxy on the wire to count what is asked and to break
the network in the ways real ones break."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from ckfs.state import State
from integration.conftest import BOTH_FACES, Ckfs
from integration.faultproxy import Fault, FaultProxy
from integration.registry import (
    AUTH_PASSWORD,
    AUTH_USER,
    BIG_REPO,
    EXAMPLE_REPO,
    Registry,
    free_port,
    recompressed_layout,
)

pytestmark = BOTH_FACES


def layout_blobs(layout: Path) -> dict[str, bytes]:
    return {f"sha256:{p.name}": p.read_bytes() for p in (layout / "blobs/sha256").iterdir()}


def manifest_of(layout: Path) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    return json.loads(layout_blobs(layout)[digest])  # type: ignore[no-any-return]


def biggest_layer(layout: Path) -> dict[str, Any]:
    return max(manifest_of(layout)["layers"], key=lambda d: d["size"])  # type: ignore[no-any-return]


def pull_json(ckfs: Ckfs, *args: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``ckfs pull --json``; return the blob events and the summary."""
    out = ckfs.run("pull", "--json", *args).stdout.splitlines()
    objs = [json.loads(line) for line in out]
    assert objs[-1]["event"] == "summary"
    return objs[:-1], objs[-1]


def content_digests(ckfs: Ckfs) -> set[str]:
    return set(ckfs.run("content", "ls", "-q").stdout.split())


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host).running() as p:
        yield p


def test_pull_then_repull_asks_only_one_head(
    ckfs: Ckfs, proxy: FaultProxy, example_layout: Path
) -> None:
    ref = f"{proxy.host}/{EXAMPLE_REPO}"
    events, summary = pull_json(ckfs, ref)
    blobs = layout_blobs(example_layout)
    assert summary["name"] == ref and summary["network"] is True
    assert summary["fetched_blobs"] == len(blobs) == summary["blobs"]
    assert summary["fetched_bytes"] == sum(len(b) for b in blobs.values())
    assert content_digests(ckfs) == set(blobs)
    assert {e["state"] for e in events} == {"downloading", "verified"}
    assert ckfs.run("images", "ls", "-q").stdout.split() == [ref]
    info = json.loads(ckfs.run("images", "inspect", "--json", ref).stdout)
    assert info["cmd"] == ["/bin/sh", "-c", "cat /etc/os-release"]
    labels = json.loads(ckfs.run("content", "ls", "--json").stdout)
    manifest = next(i for i in labels if i["digest"] == summary["target"]["digest"])
    assert "containerd.io/gc.ref.content.l.0" in manifest["labels"]

    proxy.clear()
    events, summary = pull_json(ckfs, ref)
    assert summary["fetched_blobs"] == 0 and summary["fetched_bytes"] == 0
    assert summary["skipped_blobs"] == len(blobs)
    assert {e["state"] for e in events} == {"exists"}
    assert [(s.method, "/manifests/" in s.path) for s in proxy.seen] == [("HEAD", True)]


def test_fetch_stores_content_without_a_name(
    ckfs: Ckfs, proxy: FaultProxy, example_layout: Path
) -> None:
    out = ckfs.run("fetch", f"{proxy.host}/{EXAMPLE_REPO}")
    assert out.stdout.split()[0] == f"{proxy.host}/{EXAMPLE_REPO}"
    assert content_digests(ckfs) == set(layout_blobs(example_layout))
    assert ckfs.run("images", "ls", "-q").stdout == ""


def test_plain_and_quiet_output(ckfs: Ckfs, proxy: FaultProxy) -> None:
    ref = f"{proxy.host}/{EXAMPLE_REPO}"
    out = ckfs.run("pull", ref)
    name, digest = out.stdout.split()
    assert name == ref and digest.startswith("sha256:")
    lines = out.stderr.splitlines()
    assert any(line.startswith("downloading layer") for line in lines)
    assert any(line.startswith("verified    layer") for line in lines)
    assert lines[-1].startswith("fetched 5 of 5 blobs")
    quiet = ckfs.run("pull", "--quiet", ref)
    assert quiet.stdout == quiet.stderr == ""


def test_mirror_from_hosts_toml_serves_the_blobs(
    ckfs: Ckfs, registry: Registry, mirror: Registry, tmp_path: Path
) -> None:
    with (
        FaultProxy(registry.host).running() as upstream,
        FaultProxy(mirror.host).running() as mirrored,
    ):
        # ckfsd reads only its own configuration (its root's certs.d); the
        # CLI on its own reads the --hosts-dir it is given.
        certs = tmp_path / "certs.d" if ckfs.address is None else ckfs.root / "certs.d"
        hosts = certs / f"127.0.0.1_{upstream.port}_"
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(
            f'server = "http://{upstream.host}"\n\n'
            f'[host."http://{mirrored.host}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
        flags = ["--hosts-dir", str(certs)] if ckfs.address is None else []
        _, summary = pull_json(ckfs, *flags, f"{upstream.host}/{EXAMPLE_REPO}")
    assert summary["fetched_blobs"] == 5
    blob_requests = mirrored.requests("/blobs/")
    assert len(blob_requests) == 4  # config and three layers
    assert all(parse_qs(s.query) == {"ns": [upstream.host]} for s in blob_requests)
    assert mirrored.requests("/manifests/", method="HEAD")
    assert upstream.seen == []


def test_cut_connection_resumes_in_process_by_range(
    ckfs: Ckfs, proxy: FaultProxy, example_layout: Path
) -> None:
    layer = biggest_layer(example_layout)
    proxy.add(Fault("cut", path=layer["digest"], after=300_000))
    events, summary = pull_json(ckfs, f"{proxy.host}/{EXAMPLE_REPO}")
    asked = proxy.requests(layer["digest"])
    assert [s.headers.get("range") for s in asked] == [None, "bytes=300000-"]
    assert [s.status for s in asked] == [200, 206]
    assert proxy.body_bytes(layer["digest"]) == layer["size"]
    assert any(e["state"] == "resuming" and e["offset"] == 300_000 for e in events)
    assert summary["fetched_blobs"] == 5


def test_killed_pull_resumes_where_it_stopped(
    ckfs: Ckfs, proxy: FaultProxy, big_layout: Path
) -> None:
    ref = f"{proxy.host}/{BIG_REPO}"
    layer = biggest_layer(big_layout)
    proxy.add(Fault("stall", path=layer["digest"], after=4 << 20))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckfs_cli.main", "--root", str(ckfs.root), "pull", "-q", ref]
    )
    try:
        assert proxy.stalled.wait(60), "the pull never reached the stall"
        # Wait for the received megabytes to be written to the ingest.
        state = State(ckfs.root)
        try:
            ingest_ref = f"layer-{layer['digest']}"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                statuses = state.content.list_statuses()
                kept = next((s.offset for s in statuses if s.ref == ingest_ref), 0)
                if kept >= 3 << 20:
                    break
                time.sleep(0.05)
        finally:
            state.close()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    # Read again once the pull is dead: it may have written more between the
    # offset seen above and the kill, and the resume starts from what is kept.
    state = State(ckfs.root)
    try:
        kept = next(s.offset for s in state.content.list_statuses() if s.ref == ingest_ref)
    finally:
        state.close()
    assert kept >= 3 << 20

    proxy.clear()
    events, summary = pull_json(ckfs, ref)
    asked = proxy.requests(layer["digest"])
    assert [s.headers.get("range") for s in asked] == [f"bytes={kept}-"]
    assert proxy.body_bytes(layer["digest"]) == layer["size"] - kept
    assert any(e["state"] == "resuming" and e["offset"] == kept for e in events)
    assert summary["fetched_bytes"] <= layer["size"] - kept + 10_000  # + manifest, config
    assert layer["digest"] in content_digests(ckfs)


def test_wrong_bytes_are_rejected_and_nothing_is_committed(
    ckfs: Ckfs, proxy: FaultProxy, example_layout: Path
) -> None:
    layer = biggest_layer(example_layout)
    proxy.add(Fault("corrupt", path=layer["digest"]))
    message = ckfs.fails("pull", "-q", f"{proxy.host}/{EXAMPLE_REPO}")
    assert layer["digest"] in message and proxy.host in message
    assert layer["digest"] not in content_digests(ckfs)
    assert ckfs.run("images", "ls", "-q").stdout == ""
    state = State(ckfs.root)
    try:
        assert all(s.ref != f"layer-{layer['digest']}" for s in state.content.list_statuses())
    finally:
        state.close()


def test_500_and_429_are_retried(ckfs: Ckfs, proxy: FaultProxy, example_layout: Path) -> None:
    layer = biggest_layer(example_layout)
    proxy.add(Fault("status", path="/manifests/", method="HEAD", status=500, times=2))
    proxy.add(Fault("status", path=layer["digest"], status=429, retry_after="1"))
    _, summary = pull_json(ckfs, f"{proxy.host}/{EXAMPLE_REPO}")
    assert summary["fetched_blobs"] == 5
    assert [s.status for s in proxy.requests("/manifests/", method="HEAD")] == [500, 500, 200]
    assert [s.status for s in proxy.requests(layer["digest"])] == [429, 200]
    assert summary["seconds"] >= 0.9  # Retry-After: 1 was honoured


def test_redirected_blobs_get_no_authorization(
    ckfs: Ckfs, auth_registry: Registry, example_layout: Path
) -> None:
    with FaultProxy(auth_registry.host, upstream_auth=(AUTH_USER, AUTH_PASSWORD)).running() as p:
        ref = f"{p.host}/{EXAMPLE_REPO}"
        refused = ckfs.fails("pull", "-q", ref)
        assert AUTH_USER not in refused and p.host in refused
        p.add(Fault("redirect", path="/blobs/", times=-1))
        _, summary = pull_json(ckfs, "--user", f"{AUTH_USER}:{AUTH_PASSWORD}", ref)
        assert summary["fetched_blobs"] == 5
        direct = [s for s in p.requests("/blobs/") if not s.redirected]
        redirected = [s for s in p.requests("/blobs/") if s.redirected]
    assert [s.status for s in direct] == [307] * 4
    assert all(s.headers.get("authorization", "").startswith("Basic ") for s in direct)
    assert len(redirected) == 4 and all(s.status == 200 for s in redirected)
    assert not any("authorization" in s.headers for s in redirected)


def test_parallel_pulls_download_each_blob_once(
    ckfs: Ckfs, proxy: FaultProxy, big_layout: Path
) -> None:
    ref = f"{proxy.host}/{BIG_REPO}"
    layer = biggest_layer(big_layout)
    # A slow layer keeps the first puller on it (holding its ingest's ref
    # lock) while the second one starts.
    proxy.add(Fault("delay", path=layer["digest"], seconds=3.0, times=-1))
    cmd = [sys.executable, "-m", "ckfs_cli.main", "--root", str(ckfs.root), "pull", "--json", ref]
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 60
        while not proxy.requests(layer["digest"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:  # only a failed test finds one still running
            if p.poll() is None:
                p.kill()
                p.communicate()
    first, second = procs
    assert [p.returncode for p in (first, second)] == [0, 0]

    per_digest: dict[str, int] = {}
    for s in proxy.requests("/blobs/"):
        digest = s.path.rsplit("/", 1)[1]
        per_digest[digest] = per_digest.get(digest, 0) + 1
    assert per_digest and set(per_digest.values()) == {1}, per_digest
    assert len(proxy.requests("/manifests/sha256:")) == 1
    second_events = [json.loads(line) for line in outs[1].splitlines()]
    waited = {e["digest"] for e in second_events if e.get("state") == "waiting"}
    assert layer["digest"] in waited, "the second pull never waited on the first"
    assert layer["digest"] in content_digests(ckfs)


def test_by_digest_and_offline_need_no_registry(
    ckfs: Ckfs, registry_factory: Callable[..., Registry], example_layout: Path
) -> None:
    r = registry_factory()
    digest = r.push(example_layout, EXAMPLE_REPO)
    by_tag = f"{r.host}/{EXAMPLE_REPO}"
    by_digest = f"{r.host}/{EXAMPLE_REPO.split(':')[0]}@{digest}"
    ckfs.run("pull", by_tag)
    r.stop()

    _, summary = pull_json(ckfs, by_digest)
    assert summary["network"] is False and summary["name"] == by_digest
    _, summary = pull_json(ckfs, "--offline", by_tag)
    assert summary["network"] is False and summary["target"]["digest"] == digest
    assert r.host in ckfs.fails("pull", "-q", by_tag)  # a tag needs the (gone) registry

    # Not even the HTTP library is loaded for these.
    probe = (
        "import sys\n"
        "from ckfs_cli.main import cli\n"
        f"cli.main(['--root', {str(ckfs.root)!r}, 'pull', '-q', {by_digest!r}],"
        " standalone_mode=False)\n"
        "assert 'httpx' not in sys.modules, 'httpx was imported'\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)

    missing = ckfs.fails("pull", "-q", "--offline", f"{r.host}/ckfs/other:1")
    assert "offline" in missing


def test_zstd_and_uncompressed_layers(
    ckfs: Ckfs, registry: Registry, example_layout: Path, tmp_path: Path
) -> None:
    for compression, media_type in (
        ("zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
        ("none", "application/vnd.oci.image.layer.v1.tar"),
    ):
        layout = recompressed_layout(example_layout, tmp_path / compression, compression)
        repo = f"ckfs/busybox-{compression}:latest"
        registry.push_layout_raw(layout, repo)
        ref = f"{registry.host}/{repo}"
        _, summary = pull_json(ckfs, ref)
        assert summary["fetched_blobs"] >= 4  # the config is shared with the gzip image
        info = json.loads(ckfs.run("images", "inspect", "--json", ref).stdout)
        assert {layer["mediaType"] for layer in info["layers"]} == {media_type}
        assert set(layout_blobs(layout)) <= content_digests(ckfs)


def _two_platform_layout(example_layout: Path, dst: Path) -> dict[str, str]:
    """The example image for linux/amd64 and, same layers, for linux/arm64."""
    import hashlib

    blobs = layout_blobs(example_layout)
    out = dst / "blobs" / "sha256"
    out.mkdir(parents=True)
    (dst / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def write(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (out / digest[7:]).write_bytes(data)
        return digest

    for data in blobs.values():
        write(data)
    manifest = manifest_of(example_layout)
    entries, digests = [], {}
    for arch in ("amd64", "arm64"):
        config = json.loads(blobs[manifest["config"]["digest"]])
        config["architecture"] = arch
        cbody = json.dumps(config).encode()
        m = {
            **manifest,
            "config": {**manifest["config"], "digest": write(cbody), "size": len(cbody)},
        }
        mbody = json.dumps(m).encode()
        digests[arch] = write(mbody)
        digests[f"{arch}-config"] = m["config"]["digest"]
        entries.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digests[arch],
                "size": len(mbody),
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    ibody = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }
    ).encode()
    digests["index"] = write(ibody)
    (dst / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "digest": digests["index"],
                        "size": len(ibody),
                        "annotations": {"org.opencontainers.image.ref.name": "latest"},
                    }
                ],
            }
        )
    )
    return digests


def test_platforms_of_an_index(
    registry: Registry, example_layout: Path, tmp_path: Path, ckfs: Ckfs
) -> None:
    if os.uname().machine not in ("x86_64", "amd64"):
        pytest.skip("the index offers amd64 and arm64; the default-platform check wants amd64")
    digests = _two_platform_layout(example_layout, tmp_path / "multi")
    registry.push(tmp_path / "multi", "ckfs/multi:latest", all_images=True)
    ref = f"{registry.host}/ckfs/multi:latest"

    _, summary = pull_json(ckfs, ref)
    have = content_digests(ckfs)
    assert summary["target"]["digest"] == digests["index"]
    assert {digests["amd64"], digests["amd64-config"]} <= have
    assert not {digests["arm64"], digests["arm64-config"]} & have

    _, summary = pull_json(ckfs, "--platform", "linux/arm64", ref)
    assert {digests["arm64"], digests["arm64-config"]} <= content_digests(ckfs)
    assert summary["fetched_blobs"] == 2  # the layers are shared

    other = Ckfs(tmp_path / "other")
    _, summary = pull_json(other, "--all-platforms", ref)
    assert {digests["amd64"], digests["arm64"]} <= content_digests(other)

    assert "no manifest for platform linux/s390x" in ckfs.fails(
        "pull", "-q", "--platform", "linux/s390x", ref
    )


def test_unreachable_registry_is_one_line(ckfs: Ckfs) -> None:
    host = f"127.0.0.1:{free_port()}"
    message = ckfs.fails("pull", "-q", f"{host}/nothing/here:1")
    assert host in message and "unreachable" in message


def _statuses(ckfs: Ckfs) -> dict[str, int]:
    state = State(ckfs.root)
    try:
        return {s.ref: s.offset for s in state.content.list_statuses()}
    finally:
        state.close()


def test_timeout_gives_up_on_a_stalled_layer_and_the_next_pull_resumes(
    ckfs: Ckfs, proxy: FaultProxy, example_layout: Path
) -> None:
    ref = f"{proxy.host}/{EXAMPLE_REPO}"
    layer = biggest_layer(example_layout)
    proxy.add(Fault("stall", path=layer["digest"], after=300_000))
    started = time.monotonic()
    message = ckfs.fails("pull", "-q", "--timeout", "3", ref)
    assert time.monotonic() - started < 30
    assert f"layer {layer['digest']}" in message and "gave up after 3 s" in message
    assert "--timeout" in message and "next pull resumes" in message
    kept = _statuses(ckfs)[f"layer-{layer['digest']}"]
    assert kept == 300_000  # every byte that arrived, none lost with the budget
    assert ckfs.run("images", "ls", "-q").stdout == ""

    proxy.clear()
    _, summary = pull_json(ckfs, ref)
    assert [s.headers.get("range") for s in proxy.requests(layer["digest"])] == [f"bytes={kept}-"]
    assert summary["name"] == ref and _statuses(ckfs) == {}


def test_a_failing_manifest_leaves_no_ingest(ckfs: Ckfs, proxy: FaultProxy) -> None:
    proxy.add(Fault("status", path="/manifests/sha256:", status=500, times=-1))
    message = ckfs.fails("pull", "-q", "--timeout", "5", f"{proxy.host}/{EXAMPLE_REPO}")
    assert "HTTP 500" in message or "gave up after 5 s" in message
    assert _statuses(ckfs) == {}


def test_max_blob_size_refuses_before_any_blob_is_asked(
    ckfs: Ckfs, proxy: FaultProxy, example_layout: Path
) -> None:
    layer = biggest_layer(example_layout)
    message = ckfs.fails("pull", "-q", "--max-blob-size", "1kB", f"{proxy.host}/{EXAMPLE_REPO}")
    assert f"claims {layer['size']} bytes" in message and "--max-blob-size" in message
    assert proxy.requests("/blobs/") == []
    assert _statuses(ckfs) == {} and ckfs.run("images", "ls", "-q").stdout == ""
