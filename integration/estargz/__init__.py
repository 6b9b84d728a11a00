"""eStargz test images made by the upstream ``estargz`` Go library, not by ckfs.

`esgzconv` builds the converter in ``esgzconv/`` once per source and Go
version (offline, from Debian's packaged sources: golang-go,
golang-github-containerd-stargz-snapshotter-dev) into a cache directory
and returns it; `convert` runs it on one layer tar; `estargz_layout`
writes an OCI layout whose layers are eStargz blobs, each annotated with
its TOC digest (and uncompressed size) as ``ctr-remote``/``nerdctl`` do,
the config's diff IDs rewritten (the TOC and landmark entries change the
uncompressed tar).

Fixtures (registered for the whole suite by ``pytest_plugins`` in the
top-level conftest):

- ``estargz_image``: a three-layer image covering what the lazy path must
  serve exactly (directories with owners and times, a multi-chunk file,
  setuid and setgid files, a file capability, user xattrs, hardlinks,
  symlinks, character and block devices, a fifo, whiteouts, an opaque
  directory, a directory turned into a file), pushed to the session's
  ``registry`` with ``skopeo copy`` from its OCI layout.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.layerindex.estargz import TOC_DIGEST_ANNOTATION
from integration.conftest import need
from integration.registry import Registry
from tests.tarbuild import B, C, D, F, H, L, P, W, tar

__all__ = [
    "ESTARGZ_REPO",
    "UNCOMPRESSED_SIZE_ANNOTATION",
    "Converted",
    "EstargzImage",
    "convert",
    "esgzconv",
    "estargz_image",
    "estargz_layout",
    "write_layout",
]

#: Where `estargz_image` lives in the session's registry.
ESTARGZ_REPO = "ckfs/estargz:latest"

#: Upstream's annotation of the layer's uncompressed size (for pullers that
#: size their downloads).
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"

_SOURCE = Path(__file__).resolve().parent / "esgzconv"

#: Chunk size the test images use: small enough that a few hundred
#: kilobytes make several chunks (upstream's default is 4 MiB).
CHUNK_SIZE = 64 << 10


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ckfs-test"


def esgzconv() -> Path:
    """The converter binary, built on first use (and after its source changes).

    Built in GOPATH mode from Debian's sources, never from the network
    (``GOPROXY=off``); concurrent first uses each build and the last rename
    wins, which is the same binary.
    """
    need("go")
    version = subprocess.run(["go", "version"], capture_output=True, text=True, check=True)
    key = hashlib.sha256((_SOURCE / "main.go").read_bytes() + version.stdout.encode())
    binary = _cache_dir() / f"esgzconv-{key.hexdigest()[:16]}"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="esgzconv-") as work:
        src = Path(work) / "gopath" / "src" / "esgzconv"
        shutil.copytree(_SOURCE, src)
        env = {
            **os.environ,
            "GO111MODULE": "off",
            "GOPROXY": "off",
            "GOFLAGS": "",
            "GOPATH": f"/usr/share/gocode:{Path(work) / 'gopath'}",
        }
        out = Path(work) / "esgzconv"
        build = subprocess.run(
            ["go", "build", "-o", str(out), "."], cwd=src, env=env, capture_output=True, text=True
        )
        if build.returncode != 0:
            raise RuntimeError(f"building esgzconv failed:\n{build.stderr[-3000:]}")
        staged = binary.with_name(f".{binary.name}.{os.getpid()}")
        shutil.copy2(out, staged)
        os.replace(staged, binary)
    return binary


@dataclass(frozen=True)
class Converted:
    """One layer as upstream's ``estargz.Build`` wrote it."""

    blob: bytes
    toc_digest: str
    diff_id: str
    uncompressed_size: int

    def descriptor(self) -> Descriptor:
        return Descriptor(
            mt.OCI_LAYER_GZIP,
            Digest("sha256:" + hashlib.sha256(self.blob).hexdigest()),
            len(self.blob),
            annotations={
                TOC_DIGEST_ANNOTATION: self.toc_digest,
                UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size),
            },
        )


def convert(layer_tar: bytes, work: Path, *, chunk_size: int = CHUNK_SIZE) -> Converted:
    """Convert one layer tar (plain or gzip) with the upstream library."""
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "in.tar", work / "out.tar.gz"
    src.write_bytes(layer_tar)
    run = subprocess.run(
        [str(esgzconv()), str(src), str(dst), str(chunk_size)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode != 0:
        raise RuntimeError(f"esgzconv failed: {run.stderr.strip()}")
    fields = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    blob = dst.read_bytes()
    src.unlink()
    dst.unlink()
    return Converted(blob, fields["toc.digest"], fields["diffID"], len(gzip.decompress(blob)))


def estargz_layout(
    root: Path, layers: list[bytes], *, chunk_size: int = CHUNK_SIZE
) -> tuple[Path, list[Converted]]:
    """An OCI layout at *root* of one image (tag ``latest``) of *layers*
    (tars) converted to eStargz; returns it and the converted layers."""
    converted = [
        convert(t, root.parent / f"conv{i}", chunk_size=chunk_size) for i, t in enumerate(layers)
    ]
    write_layout(root, [(c.descriptor(), c.blob, c.diff_id) for c in converted])
    return root, converted


def write_layout(
    root: Path,
    layers: list[tuple[Descriptor, bytes, str]],
    *,
    config: dict[str, Any] | None = None,
) -> Path:
    """An OCI layout at *root* of one image (tag ``latest``) of *layers*:
    (descriptor, blob, diff ID) each, bottom first, written as given.
    *config* adds to (or replaces) the image config's top-level fields."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    for _, blob, _ in layers:
        put(blob)
    body = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id for _, _, diff_id in layers]},
            **(config or {}),
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, **put(body)},
            "layers": [desc.to_json() for desc, _, _ in layers],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": mt.OCI_MANIFEST,
                **put(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    return root


#: A v2 ``security.capability`` granting cap_net_raw (bit 13), effective.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def image_layers() -> list[bytes]:
    """The tars of `estargz_image`, bottom first."""
    big = hashlib.shake_256(b"ckfs estargz").digest(5 * CHUNK_SIZE + 321)
    base = tar(
        D("etc", mtime=1_600_000_000),
        F("etc/os-release", b'NAME="ckfs test"\nID=ckfs\n', mtime=1_600_000_001),
        D("home/user", uid=1000, gid=1000, mode=0o750),
        F("home/user/notes", b"mine\n", uid=1000, gid=1000, mode=0o600),
        F("usr/bin/su", b"\x7fELF su", mode=0o4755),
        F("usr/bin/wall", b"\x7fELF wall", mode=0o2755, gid=5),
        F("usr/bin/ping", b"\x7fELF ping", mode=0o755, xattrs={"security.capability": CAPABILITY}),
        F("usr/share/big.bin", big),
        F("usr/share/empty"),
        F("usr/share/noted", b"xattrs\n", xattrs={"user.note": b"hello", "user.bin": b"\xff\x00"}),
        H("usr/bin/su-again", "usr/bin/su"),
        L("bin", "usr/bin"),
        L("etc/dangling", "/nowhere"),
        C("dev/null", 1, 3),
        B("dev/loop0", 7, 0),
        P("run/fifo"),
        D("tmp", mode=0o1777),
        D("olddir"),
        F("olddir/old", b"old\n"),
        D("becomes"),
        F("becomes/child", b"child\n"),
        F("willgo", b"gone soon\n"),
    )
    middle = tar(
        W(".wh.willgo"),
        F("olddir/.wh..wh..opq"),
        F("olddir/new", b"new\n"),
        F("becomes", b"now a file\n"),
        F("etc/os-release", b'NAME="ckfs test"\nID=ckfs\nVERSION=2\n'),
    )
    top = tar(D("app"), F("app/run.sh", b"#!/bin/sh\necho hi\n", mode=0o755))
    return [base, middle, top]


@dataclass(frozen=True)
class EstargzImage:
    """`estargz_image`: where it is and what it was made of."""

    registry: Registry
    repo_tag: str
    layout: Path
    tars: list[bytes]
    layers: list[Converted]

    @property
    def ref(self) -> str:
        return f"{self.registry.host}/{self.repo_tag}"


@pytest.fixture(scope="session")
def estargz_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> EstargzImage:
    need("skopeo")
    work = tmp_path_factory.mktemp("estargz")
    tars = image_layers()
    layout, converted = estargz_layout(work / "layout", tars)
    registry.push(layout, ESTARGZ_REPO)
    return EstargzImage(registry, ESTARGZ_REPO, layout, tars, converted)
