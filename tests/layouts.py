"""Build small OCI image layouts in Python for fast tests.

Real-tool layouts (umoci, skopeo) are used by the integration suite; these
let unit tests reach every malformed-input case precisely, by writing the
exact bytes wanted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Layout:
    """An OCI layout being written: blobs by digest, index entries."""

    root: Path
    manifests: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob(self, data: bytes) -> str:
        digest = sha256(data)
        (self.root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return digest

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.split(":", 1)[1]

    def image(
        self,
        layers: list[dict[str, bytes]],
        *,
        ref: str | None = "latest",
        layer_media_type: str = OCI_LAYER_GZIP,
        manifest_override: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Add an image with one layer per dict; return its index entry."""
        diff_ids, descs = [], []
        for files in layers:
            tar = layer_tar(files)
            diff_ids.append(sha256(tar))
            data = gzip.compress(tar, mtime=0) if layer_media_type.endswith("gzip") else tar
            descs.append(
                {"mediaType": layer_media_type, "digest": self.blob(data), "size": len(data)}
            )
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        ).encode()
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": self.blob(config), "size": len(config)},
            "layers": descs,
        }
        manifest.update(manifest_override or {})
        body = json.dumps(manifest).encode()
        entry: dict[str, Any] = {
            "mediaType": OCI_MANIFEST,
            "digest": self.blob(body),
            "size": len(body),
        }
        if ref is not None:
            entry["annotations"] = {"org.opencontainers.image.ref.name": ref}
        self.manifests.append(entry)
        self.write_index()
        return entry

    def manifest(self, n: int = 0) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.blob_path(self.manifests[n]["digest"]).read_bytes())
        return data

    def write_index(self) -> None:
        (self.root / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": self.manifests})
        )

    def tar(self, out: Path) -> Path:
        with tarfile.open(out, "w") as tar:
            for p in sorted(self.root.rglob("*")):
                tar.add(p, arcname=str(p.relative_to(self.root)), recursive=False)
        return out


@dataclass
class DockerSave:
    """A ``docker save`` directory of two layers, as legacy docker writes it."""

    root: Path
    config: str
    layers: list[str]

    def write_manifest(self, config: str | None = None, layers: list[str] | None = None) -> None:
        """Write manifest.json naming *config* and *layers* (default: the real ones)."""
        item = {
            "Config": self.config if config is None else config,
            "RepoTags": ["busybox:1"],
            "Layers": self.layers if layers is None else layers,
        }
        (self.root / "manifest.json").write_text(json.dumps([item]))


def docker_save(root: Path, *, config_name: str | None = None) -> DockerSave:
    """Write a docker-save directory at *root*: config (named by digest unless
    *config_name*), ``l0/layer.tar``, ``l1/layer.tar`` and manifest.json."""
    layers = [layer_tar({"a": b"1"}), layer_tar({"b": b"2"})]
    config = json.dumps(
        {
            "os": "linux",
            "architecture": "amd64",
            "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in layers]},
        }
    ).encode()
    root.mkdir()
    save = DockerSave(root, config_name or f"{sha256(config)[7:]}.json", [])
    (root / save.config).write_bytes(config)
    for i, t in enumerate(layers):
        (root / f"l{i}").mkdir()
        (root / f"l{i}/layer.tar").write_bytes(t)
        save.layers.append(f"l{i}/layer.tar")
    save.write_manifest()
    return save
