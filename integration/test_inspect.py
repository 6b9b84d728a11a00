"""``ckfs layers``, ``which``, ``ls`` and ``cat`` on pulled and lazily recorded images.

The inspect image (integration/inspect_images.py) is pushed in four
encodings to a real docker-registry behind a counting proxy: gzip and zstd
are pulled whole, tar and eStargz recorded lazily (``pull --lazy``). Every
encoding must give the golden answers in integration/golden/ (the fast
suite checks the same files on local imports).

Through the proxy: on a lazily recorded image ``layers``, ``which`` and
``ls`` fetch no layer data, and ``cat`` fetches only the file's own
chunks (eStargz) or span (tar); with its indexes gone, eStargz ones are
built again from the TOC alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from typing import Any

import pytest

from integration.conftest import Ckfs
from integration.estargz import CHUNK_SIZE
from integration.inspect_images import (
    BIG,
    VARIANTS,
    InspectImages,
    collect,
    golden,
)
from integration.test_lazy_mount import sent

#: Encodings ``pull --lazy`` records without fetching their layers.
LAZY = ("tar", "estargz")

#: A tar layer is read by verified spans (`ckfs.layerindex.tarindex.SPAN`).
TAR_SPAN = 1 << 20


def pull(ckfs: Ckfs, images: InspectImages, variant: str) -> str:
    ref = images.ref(variant, proxied=True)
    ckfs.run("pull", *(["--lazy"] if variant in LAZY else []), ref)
    return ref


def run_json(ckfs: Ckfs, args: list[str]) -> Any:
    return json.loads(ckfs.run(*args, "--json").stdout)


@pytest.mark.parametrize("variant", VARIANTS)
def test_golden_pulled_or_lazy(ckfs: Ckfs, inspect_images: InspectImages, variant: str) -> None:
    ref = pull(ckfs, inspect_images, variant)
    for name, found in collect(lambda args: run_json(ckfs, args), ref).items():
        golden(name, found)
    rows = run_json(ckfs, ["layers", ref])
    assert [r["local"] for r in rows] == [variant not in LAZY] * 4
    expect = {"gzip": "gzip-index", "zstd": "eager", "tar": "tar", "estargz": "estargz"}
    assert {r["source"] for r in rows} == {expect[variant]}


def blob_bytes(images: InspectImages) -> int:
    """Body bytes the proxy has sent so far: after the pull, only layer data
    (the commands read manifests and configs from the content store)."""
    return sent(images.proxy)


@pytest.mark.parametrize("variant", LAZY)
def test_lazy_reads_fetch_only_what_they_show(
    ckfs: Ckfs, inspect_images: InspectImages, variant: str
) -> None:
    ref = pull(ckfs, inspect_images, variant)
    before = blob_bytes(inspect_images)
    ckfs.run("layers", ref)
    ckfs.run("which", ref, "/etc/motd")
    ckfs.run("ls", "-lR", ref)
    ckfs.run("ls", "-R", "--layer", "1", ref)
    assert blob_bytes(inspect_images) == before

    out = ckfs.run("cat", ref, "/etc/secret").stdout
    assert out == "s3cret\n"
    fetched = blob_bytes(inspect_images) - before
    bound = 2 * CHUNK_SIZE if variant == "estargz" else TAR_SPAN
    assert 0 < fetched <= bound, fetched

    before = blob_bytes(inspect_images)
    big = run_json(ckfs, ["cat", ref, "/opt/big.bin"])
    assert big["size"] == BIG
    fetched = blob_bytes(inspect_images) - before
    assert fetched < 2 * BIG  # that file, not the rest of the image
    if variant == "estargz":  # (a tar's first span held most of it already)
        assert fetched > BIG // 2
    (row,) = [r for r in run_json(ckfs, ["layers", ref]) if r["number"] == 1]
    assert row["fetched_pct"] > 50
    again = blob_bytes(inspect_images)
    assert ckfs.run("cat", ref, "/etc/secret").stdout == "s3cret\n"
    assert blob_bytes(inspect_images) == again  # from the chunk cache


def test_estargz_indexes_rebuilt_from_the_toc(ckfs: Ckfs, inspect_images: InspectImages) -> None:
    ref = pull(ckfs, inspect_images, "estargz")
    expect = run_json(ckfs, ["which", ref, "/etc/motd"])
    shutil.rmtree(ckfs.root / "layers")
    before = blob_bytes(inspect_images)
    assert run_json(ckfs, ["which", ref, "/etc/motd"]) == expect
    fetched = blob_bytes(inspect_images) - before
    sizes = sum(r["size"] for r in run_json(ckfs, ["layers", ref]))
    assert 0 < fetched < sizes / 4, (fetched, sizes)  # footers and TOCs, not layers


def test_cat_gives_each_layers_version(ckfs: Ckfs, inspect_images: InspectImages) -> None:
    ref = pull(ckfs, inspect_images, "estargz")
    for n, text in [(1, "motd v1\n"), (2, "motd v2\n"), (3, "motd v3\n")]:
        assert ckfs.run("cat", "--upto", str(n), ref, "/etc/motd").stdout == text
    line = ckfs.fails("cat", "--layer", "4", ref, "/etc/motd")
    assert "no such file" in line
    digest = hashlib.sha256(ckfs.run("cat", ref, "/etc/hosts").stdout.encode()).hexdigest()
    assert digest == hashlib.sha256(b"127.0.0.1 localhost\n").hexdigest()


def test_tar_index_rebuilt_by_streaming_says_so(ckfs: Ckfs, inspect_images: InspectImages) -> None:
    """An uncompressed layer has no TOC: rebuilding its index reads it whole, with a warning."""
    ref = pull(ckfs, inspect_images, "tar")
    expect = run_json(ckfs, ["ls", "-R", ref])
    shutil.rmtree(ckfs.root / "layers")
    proc = ckfs.run("ls", "-R", ref, "--json")
    assert json.loads(proc.stdout) == expect
    assert "reads all of it" in proc.stderr
    assert ckfs.run("ls", "-R", ref).stderr == ""  # stored: once only


@pytest.mark.parametrize("ckfs", ["ckfsd"], indirect=True)
def test_with_a_ckfsd_serving_the_root(ckfs: Ckfs, inspect_images: InspectImages) -> None:
    """The commands read the root's indexes and blobs themselves, beside a running ckfsd."""
    ref = pull(ckfs, inspect_images, "estargz")
    assert ckfs.run("cat", "--upto", "2", ref, "/etc/motd").stdout == "motd v2\n"
    found = run_json(ckfs, ["which", ref, "/gone"])
    assert found["deleted_by"] == {"layer": 2, "how": "whiteout", "path": "/gone"}
