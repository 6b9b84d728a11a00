"""An image with known contents for the layer-debugging commands (issue 11).

Shared by the tests of ``ckfs layers``, ``which``, ``ls``, ``cat``,
``diff``, ``space``, ``shell`` and ``explore``. The layer tars are written
entry by entry (`tests.tarbuild`): umoci's diff never writes an opaque
directory, and the cases must be exact. What each layer does is in
`LAYERS`; `EXPECT` says what the final tree must show.

- layer 1: the base: files, a hardlink pair, symlinks (one absolute, one
  through a ``usr/lib`` link), a file with a user xattr, a directory
  tree, a binary file, 1 MiB of random bytes (several eStargz chunks);
- layer 2: ``etc/motd`` rewritten, ``gone`` whited out, ``opt/app`` made
  opaque with a new file;
- layer 3: ``etc/motd`` rewritten again, ``var/lib/data`` (a directory)
  replaced by a file, ``etc/hosts`` re-added with another mode only;
- layer 4: ``etc/os-release`` whited out, ``usr/bin/tool`` rewritten
  (wasting layer 1's copy).

The config's history interleaves empty-layer entries (ENV, CMD), so
``created_by`` must skip them to match layers.

`layout` writes the image as an OCI layout in one encoding: ``gzip``
(pulled whole), ``tar`` (uncompressed: a lazy pull indexes it by range),
``estargz`` (upstream's converter; lazily recorded) or ``zstd`` (nothing
indexes it lazily: "eager"). The ``inspect_images`` fixture pushes all
four to one registry behind a counting proxy (`integration.faultproxy`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from integration.faultproxy import FaultProxy
from tests.tarbuild import D, Entry, F, H, L, W, tar

__all__ = [
    "BIG",
    "EXPECT",
    "HISTORY",
    "LAYERS",
    "REPO",
    "VARIANTS",
    "InspectImages",
    "big_content",
    "collect",
    "golden",
    "inspect_images",
    "layer_tars",
    "layout",
]

#: Where the image lives in the fixture's registry (``inspect/<variant>:latest``).
REPO = "inspect"

#: Golden JSON outputs, reviewed by hand: regenerate with ``CKFS_UPDATE_GOLDEN=1``
#: and read the diff.
GOLDEN = Path(__file__).resolve().parent / "golden"

#: The encodings `layout` writes (module docstring).
VARIANTS = ("gzip", "tar", "estargz", "zstd")

#: Incompressible bytes of ``opt/big.bin``: several eStargz chunks and tar
#: spans, so reading one small file is measured against a layer of some size.
BIG = 1 << 20

#: An ELF-looking head with NULs: ``ckfs cat`` must call it binary.
TOOL_V1 = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 64
TOOL_V2 = b"\x7fELF\x02\x01\x01\x00" + bytes(range(255, -1, -1)) * 80


def big_content() -> bytes:
    """opt/big.bin's bytes: random (nothing compresses them), the same every run."""
    return random.Random(11).randbytes(BIG)


#: (created_by, entries) per layer, bottom first.
LAYERS: list[tuple[str, list[Entry]]] = [
    (
        "ADD rootfs.tar /",
        [
            D("etc"),
            F("etc/motd", b"motd v1\n"),
            F("etc/hosts", b"127.0.0.1 localhost\n"),
            F("etc/os-release", b"ID=inspect\n"),
            F("etc/secret", b"s3cret\n", mode=0o600, xattrs={"user.note": b"kept"}),
            L("etc/motd.link", "motd"),
            L("etc/abs.link", "/etc/hosts"),
            D("usr/lib"),
            F("usr/lib/libc.so", b"libc\n"),
            L("lib", "usr/lib"),
            D("usr/bin"),
            F("usr/bin/tool", TOOL_V1, mode=0o755),
            H("usr/bin/tool-hardlink", "usr/bin/tool"),
            D("opt/app"),
            F("opt/app/old", b"old\n"),
            F("opt/app/keep", b"keep\n"),
            F("opt/big.bin", big_content()),
            D("var/lib/data"),
            F("var/lib/data/db", b"db\n"),
            F("gone", b"to be deleted\n"),
        ],
    ),
    (
        "RUN echo 'motd v2' > /etc/motd && rm /gone && rm -rf /opt/app/* && touch /opt/app/new",
        [
            F("etc/motd", b"motd v2\n"),
            W(".wh.gone"),
            D("opt/app"),
            F("opt/app/.wh..wh..opq"),
            F("opt/app/new", b"new\n"),
        ],
    ),
    (
        "RUN echo 'motd v3' > /etc/motd && rm -rf /var/lib/data && echo x > /var/lib/data",
        [
            F("etc/motd", b"motd v3\n"),
            F("etc/hosts", b"127.0.0.1 localhost\n", mode=0o600),
            F("var/lib/data", b"now a file\n"),
        ],
    ),
    (
        "RUN rm /etc/os-release && cp tool2 /usr/bin/tool",
        [
            W("etc/.wh.os-release"),
            F("usr/bin/tool", TOOL_V2, mode=0o755),
        ],
    ),
]

#: The config's history: the layers' entries with empty-layer steps between.
HISTORY: list[dict[str, Any]] = [
    {"created_by": LAYERS[0][0]},
    {"created_by": "ENV PATH=/usr/bin", "empty_layer": True},
    {"created_by": LAYERS[1][0]},
    {"created_by": LAYERS[2][0]},
    {"created_by": 'CMD ["/bin/sh"]', "empty_layer": True},
    {"created_by": LAYERS[3][0]},
]

#: What the final tree must show (index paths).
EXPECT = {
    "motd": ("etc/motd", 3, b"motd v3\n"),  # modified in three layers
    "whiteout": ("gone", 2),
    "opaque": ("opt/app/old", 2),  # hidden by layer 2's opaque opt/app
    "replaced_parent": ("var/lib/data/db", 3),
    "deleted_late": ("etc/os-release", 4),
}


def layer_tars() -> list[bytes]:
    """The layers' uncompressed tars, bottom first (the same bytes every run)."""
    return [tar(*entries) for _, entries in LAYERS]


def layout(root: Path, variant: str) -> Path:
    """Write the image as an OCI layout at *root* in *variant* (`VARIANTS`); tag ``latest``."""
    tars = layer_tars()
    if variant == "estargz":
        from integration.estargz import convert

        converted = [convert(t, root.parent / f"conv{i}") for i, t in enumerate(tars)]
        return _write(root, [(c.descriptor(), c.blob, c.diff_id) for c in converted])
    layers = []
    for raw in tars:
        blob, media_type = _encode(raw, variant)
        digest = Digest("sha256:" + hashlib.sha256(blob).hexdigest())
        diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
        layers.append((Descriptor(media_type, digest, len(blob)), blob, diff_id))
    return _write(root, layers)


def _encode(raw: bytes, variant: str) -> tuple[bytes, str]:
    if variant == "gzip":
        return gzip.compress(raw, mtime=0), mt.OCI_LAYER_GZIP
    if variant == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(raw), mt.OCI_LAYER_ZSTD
    if variant == "tar":
        return raw, mt.OCI_LAYER
    raise ValueError(f"unknown variant {variant!r}")


def _write(root: Path, layers: list[tuple[Descriptor, bytes, str]]) -> Path:
    from integration.estargz import write_layout

    run = {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin"]}
    return write_layout(root, layers, config={"config": run, "history": HISTORY})


def golden(name: str, found: Any) -> None:
    """*found* must equal the golden file *name* (written instead when asked)."""
    path = GOLDEN / f"{name}.json"
    if os.environ.get("CKFS_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(found, indent=2) + "\n")
    assert json.loads(path.read_text()) == found


#: The read-only commands' golden outputs: golden file → key → arguments
#: (``{ref}`` is the image). The same for every variant, pulled or lazy.
QUERIES: dict[str, dict[str, list[str]]] = {
    "inspect_which": {
        path: ["which", "{ref}", path]
        for path in (
            "/etc/motd",  # modified in three layers
            "/gone",  # whiteout
            "/opt/app/old",  # opaque directory
            "/opt/app",
            "/var/lib/data",  # a directory replaced by a file
            "/var/lib/data/db",
            "/etc/os-release",  # deleted by the top layer
            "/etc/hosts",  # mode changed only
            "/etc/secret",  # xattrs
            "/usr/bin/tool",
            "/usr/bin/tool-hardlink",  # its lower version's other name
            "/lib",
            "/",
        )
    }
    | {
        "--follow /lib/libc.so": ["which", "--follow", "{ref}", "/lib/libc.so"],
        "--follow /etc/abs.link": ["which", "--follow", "{ref}", "etc/abs.link"],
    },
    "inspect_ls": {
        "-R /": ["ls", "-R", "{ref}"],
        "/etc": ["ls", "{ref}", "/etc"],
        "-R --layer 2": ["ls", "-R", "--layer", "2", "{ref}"],
        "-R --layer 4": ["ls", "-R", "--layer", "4", "{ref}"],
        "-R --upto 2 /var": ["ls", "-R", "--upto", "2", "{ref}", "/var"],
        "/etc/motd": ["ls", "{ref}", "etc/motd"],
    },
    "inspect_cat": {
        "/etc/motd": ["cat", "{ref}", "/etc/motd"],
        "--upto 1 /etc/motd": ["cat", "--upto", "1", "{ref}", "/etc/motd"],
        "--layer 2 /etc/motd": ["cat", "--layer", "2", "{ref}", "/etc/motd"],
        "/etc/motd.link": ["cat", "{ref}", "/etc/motd.link"],
        "/lib/libc.so": ["cat", "{ref}", "/lib/libc.so"],
        "--upto 3 /usr/bin/tool-hardlink": [
            "cat",
            "--upto",
            "3",
            "{ref}",
            "/usr/bin/tool-hardlink",
        ],
        "/usr/bin/tool": ["cat", "{ref}", "/usr/bin/tool"],
        "/opt/big.bin": ["cat", "{ref}", "/opt/big.bin"],
    },
    "inspect_layers": {"layers": ["layers", "{ref}"]},
}

#: `ckfs layers` fields that are the same in every encoding.
_PORTABLE_LAYER_FIELDS = (
    "number",
    "entries",
    "files",
    "file_bytes",
    "added",
    "modified",
    "deleted",
    "created_by",
)


def collect(run_json: Callable[[list[str]], Any], ref: str) -> dict[str, dict[str, Any]]:
    """Every `QUERIES` answer for *ref*, as `golden` compares them.

    *run_json* runs ``ckfs ARGS --json`` and returns the parsed output.
    What differs between encodings is left out: layer digests, the image
    name, the encoding-dependent `ckfs layers` fields; file contents
    longer than a line are reduced to their sha256.
    """
    found: dict[str, dict[str, Any]] = {}
    for name, queries in QUERIES.items():
        found[name] = {
            key: _portable(run_json([a.format(ref=ref) for a in args]))
            for key, args in queries.items()
        }
    return found


def _portable(doc: Any) -> Any:
    if isinstance(doc, list):
        return [_portable(d) for d in doc]
    if not isinstance(doc, dict):
        return doc
    if "diff_id" in doc:  # a `ckfs layers` row
        return {k: doc[k] for k in _PORTABLE_LAYER_FIELDS}
    out = {k: _portable(v) for k, v in doc.items() if k not in ("image", "layer_digest")}
    if "content" in out and len(out["content"]) > 64:
        out["content"] = "sha256:" + hashlib.sha256(out.pop("content").encode()).hexdigest()
    return out


@dataclass(frozen=True)
class InspectImages:
    """The image in every variant in one registry, reachable through a counting proxy."""

    host: str
    proxy: FaultProxy

    def ref(self, variant: str, *, proxied: bool = False) -> str:
        host = self.proxy.host if proxied else self.host
        return f"{host}/{REPO}/{variant}:latest"


@pytest.fixture(scope="session")
def inspect_images(
    registry_factory_session: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InspectImages]:
    """Every variant of the image pushed byte for byte (skopeo would recompress some)."""
    registry = registry_factory_session()
    work = tmp_path_factory.mktemp("inspect")
    for variant in VARIANTS:
        built = layout(work / variant / "layout", variant)
        registry.push_layout_raw(built, f"{REPO}/{variant}:latest")
    with FaultProxy(registry.host).running() as proxy:
        yield InspectImages(registry.host, proxy)
