"""A lazy pull of a plain gzip image indexes each layer as its blob arrives.

``ckfs pull --lazy`` runs the pull and the indexing at once (each gzip
layer's index starts when its blob is committed). The pull's own rules
still hold, through a real docker-registry behind the fault proxy: a blob
whose bytes are wrong on the wire fails the pull with its own error, and
leaves neither the blob nor an index of it; once the registry behaves,
the same pull indexes every layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from ckfs.digest import Digest
from ckfs.layerindex.store import IndexStore
from integration.conftest import Ckfs
from integration.faultproxy import Fault, FaultProxy
from integration.registry import Registry

pytestmark = [pytest.mark.slow]

REPO = "ckfs/lazy-gzip-pull:latest"


def gzip_layers(layout: Path) -> list[Digest]:
    """The layers of the layout's one manifest, bottom first."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    assert all(d["mediaType"].endswith("tar+gzip") for d in manifest["layers"])
    return [Digest(d["digest"]) for d in manifest["layers"]]


def test_wrong_gzip_blob_fails_the_lazy_pull_and_keeps_no_index(
    example_layout: Path, registry_factory: Callable[..., Registry], ckfs: Ckfs
) -> None:
    registry = registry_factory()
    registry.push(example_layout, REPO)
    layers = gzip_layers(example_layout)
    bad = layers[0]  # the biggest: the others are indexed meanwhile
    store = IndexStore(ckfs.root)
    with FaultProxy(registry.host).running() as proxy:
        proxy.add(Fault("corrupt", path=f"/blobs/{bad}", times=-1))
        ref = f"{proxy.host}/{REPO}"
        proc = ckfs.run("pull", "--lazy", "--plain-http", ref, check=False)
        line = proc.stderr.strip().splitlines()[-1]  # after the progress lines
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert line.startswith("ckfs: ") and str(bad) in line and "wrong content" in line, line
        assert not store.path(bad).exists()
        assert ckfs.run("content", "ls", "-q").stdout.count(bad.hex) == 0
        proxy.clear()
        ckfs.run("pull", "--lazy", "--plain-http", ref)
    for digest in layers:
        index = store.get(digest)
        assert index is not None and index.source == "gzip-index", digest
        index.close()
