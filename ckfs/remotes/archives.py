"""Local image sources: OCI image layouts (directory or tar) and `docker save` archives.

A `Source` is the local cousin of a registry: it names images and hands out
blob streams by descriptor. Nothing it returns is trusted; the importer
verifies every byte against its digest before committing it, so a source
only has to find bytes, not vouch for them.

Tar archives are read with `tarfile` for their headers only (member name,
size, data offset); blob bytes are read by offset through a fresh file
handle per blob, so several blobs can be copied in parallel threads and no
member is ever extracted to disk.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, from_bytes
from ckfs.errors import InvalidArgument, NotFound
from ckfs.jsondoc import parse_json

__all__ = ["ImageEntry", "Source", "open_source"]

#: The annotation OCI layouts use to name an image (often a bare tag).
REF_NAME = "org.opencontainers.image.ref.name"
#: containerd's annotation for the full image name in an exported layout.
CONTAINERD_IMAGE_NAME = "io.containerd.image.name"

#: index.json and manifest.json are tiny; a larger one is hostile or broken.
MAX_INDEX_SIZE = 4 << 20

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """One image a source offers: its names (may be empty) and target."""

    names: tuple[str, ...]
    target: Descriptor


class Source(Protocol):
    """Where an import reads from."""

    #: What to call this source in messages (its path).
    what: str

    def images(self) -> list[ImageEntry]:
        """The images the source names, in the order it lists them."""
        ...

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        """A stream of *desc*'s bytes (unverified).

        Raises:
            NotFound: the source has no such blob.
        """
        ...

    def close(self) -> None: ...


def open_source(path: Path) -> Source:
    """Open *path* as whichever archive kind it is.

    Raises:
        NotFound: *path* does not exist.
        InvalidArgument: it is neither an OCI layout nor a docker-save archive.
    """
    if not path.exists():
        raise NotFound(f"{path}: no such file or directory")
    files: _Files = _DirFiles(path) if path.is_dir() else _TarFiles(path)
    try:
        # docker >= 25 writes both index.json and manifest.json; the OCI
        # index is the richer description, so it wins.
        if files.has("index.json"):
            return LayoutSource(files)
        if files.has("manifest.json"):
            return DockerArchiveSource(files)
    except BaseException:
        files.close()
        raise
    files.close()
    raise InvalidArgument(
        f"{path}: not an OCI image layout (no index.json) nor a docker-save archive "
        "(no manifest.json)"
    )


# -- file access: directory or tar, same interface ---------------------------


class _Files(Protocol):
    what: str

    def has(self, name: str) -> bool: ...
    def size(self, name: str) -> int: ...
    def open(self, name: str) -> BinaryIO: ...
    def close(self) -> None: ...


class _DirFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.what = str(root)

    def _path(self, name: str) -> Path:
        # Names come from our own code (digests, fixed names) or from
        # manifest.json, which is untrusted: stay inside the directory.
        p = (self.root / name).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise InvalidArgument(f"{self.what}: {name!r} points outside the archive")
        return p

    def has(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"{self.what}: {name} is missing") from None

    def open(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"{self.what}: {name} is missing") from None

    def close(self) -> None:
        pass


class _Section:
    """A read-only window onto a file, by offset; each instance has its own fd."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._start = offset
        self._size = size
        self._pos = 0

    def read(self, n: int = -1, /) -> bytes:
        left = self._size - self._pos
        if n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._start + self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buf: memoryview | bytearray, /) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0, /) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> _Section:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TarFiles:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.what = str(path)
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(path, "r:") as tf:
                for m in tf:
                    if m.isfile():
                        self._members[os.path.normpath(m.name).lstrip("/")] = m
        except (tarfile.TarError, EOFError) as e:
            raise InvalidArgument(f"{path}: not a readable tar archive: {e}") from None
        except OSError as e:
            raise InvalidArgument(f"{path}: {e.strerror or e}") from None
        self._file_size = path.stat().st_size

    def has(self, name: str) -> bool:
        return os.path.normpath(name) in self._members

    def _member(self, name: str) -> tarfile.TarInfo:
        try:
            return self._members[os.path.normpath(name)]
        except KeyError:
            raise NotFound(f"{self.what}: {name} is missing") from None

    def size(self, name: str) -> int:
        return self._member(name).size

    def open(self, name: str) -> BinaryIO:
        m = self._member(name)
        if m.offset_data + m.size > self._file_size:
            # tarfile lists a member whose data the file does not hold.
            raise InvalidArgument(f"{self.what}: truncated archive: {name} is cut short")
        return _Section(self.path, m.offset_data, m.size)  # type: ignore[return-value]

    def close(self) -> None:
        pass


def _read_json(files: _Files, name: str) -> Any:
    if files.size(name) > MAX_INDEX_SIZE:
        raise InvalidArgument(f"{files.what}: {name} is larger than {MAX_INDEX_SIZE} bytes")
    with files.open(name) as f:
        data = f.read()
    return parse_json(data, f"{files.what}: {name}")


def _blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


# -- OCI image layout ---------------------------------------------------------


class LayoutSource:
    """An OCI image layout: ``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``."""

    def __init__(self, files: _Files) -> None:
        self._files = files
        self.what = files.what
        if files.has("oci-layout"):
            layout = _read_json(files, "oci-layout")
            version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
            if version != "1.0.0":
                raise InvalidArgument(
                    f"{self.what}: oci-layout: unsupported imageLayoutVersion {version!r}"
                )
        self._index = _read_json(files, "index.json")

    def images(self) -> list[ImageEntry]:
        index = self._index
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise InvalidArgument(f"{self.what}: index.json: missing manifests list")
        out = []
        for i, raw in enumerate(index["manifests"]):
            desc = Descriptor.from_json(raw, where=f"{self.what}: index.json: manifests[{i}]")
            names = [
                n
                for n in (
                    desc.annotations.get(CONTAINERD_IMAGE_NAME),
                    desc.annotations.get(REF_NAME),
                )
                if n
            ]
            out.append(ImageEntry(tuple(names), desc))
        return out

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        try:
            return self._files.open(_blob_name(desc.digest))
        except NotFound:
            raise NotFound(f"{self.what}: blob {desc.digest} is missing") from None

    def close(self) -> None:
        self._files.close()


# -- docker save --------------------------------------------------------------


class DockerArchiveSource:
    """A `docker save` archive: ``manifest.json`` naming config and layer files.

    Docker's legacy format has no registry manifest, so one is synthesized
    (schema2, uncompressed layers). Layer files are not named by digest; their
    expected digest is the matching diff ID from the config, which the
    importer verifies like any other digest, so nothing here is trusted.
    """

    def __init__(self, files: _Files) -> None:
        self._files = files
        self.what = files.what
        self._synth: dict[Digest, bytes] = {}
        self._paths: dict[Digest, str] = {}
        self._entries = self._load()

    def _load(self) -> list[ImageEntry]:
        manifest = _read_json(self._files, "manifest.json")
        if not isinstance(manifest, list):
            raise InvalidArgument(f"{self.what}: manifest.json: expected a list")
        entries = []
        for i, item in enumerate(manifest):
            where = f"{self.what}: manifest.json[{i}]"
            if not isinstance(item, dict):
                raise InvalidArgument(f"{where}: expected an object")
            config_name, layer_names = item.get("Config"), item.get("Layers")
            if not isinstance(config_name, str) or not isinstance(layer_names, list):
                raise InvalidArgument(f"{where}: needs Config and Layers")
            config = self._config(config_name)
            diff_ids = self._diff_ids(config_name, where)
            if len(diff_ids) != len(layer_names):
                raise InvalidArgument(
                    f"{where}: {len(layer_names)} layers but the config lists "
                    f"{len(diff_ids)} diff IDs"
                )
            layers = []
            for name, diff_id in zip(layer_names, diff_ids, strict=True):
                if not isinstance(name, str):
                    raise InvalidArgument(f"{where}: layer names must be strings")
                self._paths[diff_id] = name
                size = self._files.size(name)
                layers.append(Descriptor(mt.DOCKER_LAYER, diff_id, size))
            body = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": mt.DOCKER_MANIFEST,
                    "config": config.to_json(),
                    "layers": [d.to_json() for d in layers],
                },
                separators=(",", ":"),
            ).encode()
            digest = from_bytes(body)
            self._synth[digest] = body
            tags = item.get("RepoTags") or []
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise InvalidArgument(f"{where}: RepoTags must be a list of strings")
            entries.append(
                ImageEntry(tuple(tags), Descriptor(mt.DOCKER_MANIFEST, digest, len(body)))
            )
        return entries

    def _config(self, name: str) -> Descriptor:
        stem = os.path.basename(name).removesuffix(".json")
        if _HEX64.fullmatch(stem):
            digest = Digest.from_hex("sha256", stem)
        else:
            # docker >= 1.10 names configs by digest; hash anything else.
            with self._files.open(name) as f:
                digest = from_bytes(f.read())
        self._paths[digest] = name
        return Descriptor(mt.DOCKER_CONFIG, digest, self._files.size(name))

    def _diff_ids(self, config_name: str, where: str) -> list[Digest]:
        # The config is read here only to learn which layer file is which;
        # the importer reads it again through open_blob and verifies it.
        config = _read_json(self._files, config_name)
        rootfs = config.get("rootfs") if isinstance(config, dict) else None
        ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(ids, list):
            raise InvalidArgument(f"{where}: {config_name}: missing rootfs.diff_ids")
        try:
            return [Digest.parse(d) for d in ids]
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}: {config_name}: {e}") from None

    def images(self) -> list[ImageEntry]:
        return self._entries

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        if desc.digest in self._synth:
            return io.BytesIO(self._synth[desc.digest])
        try:
            return self._files.open(self._paths[desc.digest])
        except KeyError:
            raise NotFound(f"{self.what}: blob {desc.digest} is missing") from None

    def close(self) -> None:
        self._files.close()
