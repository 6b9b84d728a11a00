"""Local image sources: OCI image layouts (directory or tar) and `docker save` archives.

A `Source` is the local cousin of a registry: it names images and hands out
blob streams by descriptor. Nothing it returns is trusted; the importer
verifies every byte against its digest before committing it, so a source
only has to find bytes, not vouch for them.

Tar archives are read with `tarfile` for their headers only (member name,
size, data offset); blob bytes are read by offset (``pread``) from the one
descriptor of the archive, so several blobs can be copied in parallel
threads and no member is ever extracted to disk.

Everything an archive holds is hostile: only regular files are opened, each
non-blocking and checked by ``fstat``, symlinks resolve inside the archive,
and every document's size is checked before a byte of it is read.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from ckfs import mediatypes as mt
from ckfs.archive.secure import MAX_SYMLINKS, RootDir, SymlinkLoop, clean_parts, join
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, from_bytes
from ckfs.errors import CkfsError, InvalidArgument, NotFound
from ckfs.images.image import MAX_CONFIG_SIZE
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
        InvalidArgument: it is neither an OCI layout nor a docker-save archive,
            or it (or a file it names) is not a regular file or directory.
    """
    what = str(path)
    try:
        # O_NONBLOCK: a FIFO given as the archive must not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{what}: no such file or directory") from None
    except OSError as e:
        raise _os_error(what, None, e) from None
    files: _Files
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            files = _DirFiles(what, fd)
        elif stat.S_ISREG(mode):
            files = _TarFiles(what, fd)
        else:
            raise InvalidArgument(f"{what}: not a regular file or directory ({_kind(mode)})")
    except BaseException:
        os.close(fd)
        raise
    try:
        # docker >= 25 writes both index.json and manifest.json; the OCI
        # index is the richer description, so it wins.
        if _has(files, "index.json"):
            return LayoutSource(files)
        if _has(files, "manifest.json"):
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
#
# Everything an archive names is hostile: a layout directory may hold a FIFO
# or a device where a blob should be (open(2) on a FIFO blocks until a writer
# comes; a device never ends), a 3 GiB sparse file where a config should be,
# symlinks out of the archive, names that climb with ``..``. So files are
# opened non-blocking and without following the last component, checked to
# be regular files by fstat, and their size is known before a byte is read.


class _Files(Protocol):
    what: str

    def open(self, name: str) -> _Blob:
        """*name*'s bytes, size known up front.

        Raises:
            NotFound: no such file.
            InvalidArgument: not a regular file, outside the archive, or cut short.
        """
        ...

    def close(self) -> None: ...


def _has(files: _Files, name: str) -> bool:
    """Whether *name* exists; `InvalidArgument` if it is there but not a regular file."""
    try:
        files.open(name).close()
    except NotFound:
        return False
    return True


_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISLNK, "symlink"),
)


def _kind(mode: int) -> str:
    return next((kind for test, kind in _KINDS if test(mode)), f"mode {mode:o}")


def _check_regular(what: str, name: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise InvalidArgument(f"{what}: {name}: not a regular file ({_kind(mode)})")


def _os_error(what: str, name: str | None, e: OSError) -> CkfsError:
    where = f"{what}: {name}" if name is not None else what
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(f"{where} is missing")
    return InvalidArgument(f"{where}: {e.strerror or e}")


def _parts(what: str, name: str) -> list[str]:
    """*name*'s components; a name that starts above the archive root is refused.

    Names come from our own code (digests, fixed names) or from
    manifest.json, which is untrusted: a name that is absolute or climbs
    with ``..`` is hostile or broken, never a file of the archive.
    """
    if "\0" in name:
        raise InvalidArgument(f"{what}: {name!r}: a file name cannot hold a NUL byte")
    try:
        os.fsencode(name)
    except UnicodeEncodeError:  # a lone surrogate that JSON's \ud800 escapes can spell
        raise InvalidArgument(f"{what}: {name!r} is not a file name") from None
    if name.startswith("/"):
        raise InvalidArgument(f"{what}: {name!r} points outside the archive")
    parts: list[str] = []
    for p in name.split("/"):
        if p == "..":
            if not parts:
                raise InvalidArgument(f"{what}: {name!r} points outside the archive")
            parts.pop()
        elif p and p != ".":
            parts.append(p)
    return parts


class _Blob:
    """A read-only window of *size* bytes at *offset* of an open file, named *what*.

    Reads use pread, so several windows can share one descriptor (a tar's)
    and be read from several threads at once. *owned*: close the
    descriptor with the window (a directory's file).
    """

    def __init__(self, what: str, fd: int, offset: int, size: int, *, owned: bool) -> None:
        self.what = what
        self._fd = fd
        self._owned = owned
        self._start = offset
        self.size = size
        self._pos = 0

    def read(self, n: int = -1, /) -> bytes:
        left = self.size - self._pos
        if n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        try:
            data = os.pread(self._fd, n, self._start + self._pos)
        except OSError as e:  # EIO from a failing disk or network filesystem
            raise _os_error(self.what, None, e) from None
        self._pos += len(data)
        return data

    def readinto(self, buf: memoryview | bytearray, /) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0, /) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> _Blob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: How a file of a layout directory is opened: never blocking (a FIFO), never
#: following the last component (symlinks are resolved by hand, inside root).
_O_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


class _DirFiles:
    """Files of an archive directory, resolved as if it were ``/`` of a chroot.

    Symlinks are followed (``docker save`` links repeated layers to their
    first copy with ``../<id>/layer.tar``), but only inside the archive: an
    absolute target is re-rooted at the archive, ``..`` stops at it (see
    `ckfs.archive.secure`). A symlink to ``/etc/shadow`` therefore names
    the archive's own ``etc/shadow``, which is missing.
    """

    def __init__(self, what: str, fd: int) -> None:
        """Take *fd*, the directory, once this succeeds (its caller closes it otherwise)."""
        self.what = what
        self._root = RootDir(f"/proc/self/fd/{fd}")
        os.close(fd)  # the root holds its own descriptor

    def _open_fd(self, name: str) -> int:
        """Open *name* for reading; a symlink is followed inside root.

        The entry is looked at (lstat) before it is opened, so a socket or
        device is named as such rather than by what opening it does; the
        open cannot block or follow a link swapped in since, and the caller
        checks what it opened with fstat.
        """
        parts = _parts(self.what, name)
        try:
            for _ in range(MAX_SYMLINKS + 1):
                if not parts:
                    return os.open(".", _O_READ, dir_fd=self._root.fd)
                dir_fd, real = self._root.open_dir(parts[:-1])
                try:
                    mode = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False).st_mode
                    if not stat.S_ISLNK(mode):
                        _check_regular(self.what, name, mode)
                        return os.open(parts[-1], _O_READ, dir_fd=dir_fd)
                    target = os.readlink(parts[-1], dir_fd=dir_fd)
                finally:
                    os.close(dir_fd)
                parts = clean_parts(target if target.startswith("/") else join(real, target))
            raise SymlinkLoop(name)
        except OSError as e:
            raise _os_error(self.what, name, e) from None

    def open(self, name: str) -> _Blob:
        fd = self._open_fd(name)
        try:
            st = os.fstat(fd)
            _check_regular(self.what, name, st.st_mode)
        except BaseException:
            os.close(fd)
            raise
        return _Blob(f"{self.what}: {name}", fd, 0, st.st_size, owned=True)

    def close(self) -> None:
        self._root.close()


#: Most members a tar archive may have. A layout holds a few files per
#: image (manifest, config, layers); 65,536 is hundreds of large images,
#: while the member index stays a few megabytes.
MAX_MEMBERS = 1 << 16

#: Largest tar extension header (PAX records, GNU long names) read: tarfile
#: reads one whole into memory, so a sparse archive claiming a 10 GiB PAX
#: header would otherwise cost 10 GiB. Honest ones are a few hundred bytes.
MAX_TAR_HEADER = 1 << 20

#: All header bytes read from one archive, extension headers included.
MAX_TAR_HEADERS = 64 << 20


class _HeaderReader:
    """The file object tarfile parses: positioned reads of a descriptor, bounded.

    tarfile only reads headers here (member data is skipped by seeking), so
    every byte read counts against `MAX_TAR_HEADERS` and no single read may
    exceed `MAX_TAR_HEADER`.
    """

    def __init__(self, what: str, fd: int) -> None:
        self.what = what
        self._fd = fd
        self._pos = 0
        self._budget = MAX_TAR_HEADERS

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > MAX_TAR_HEADER or n > self._budget:
            raise InvalidArgument(
                f"{self.what}: tar headers larger than {MAX_TAR_HEADER} bytes each or "
                f"{MAX_TAR_HEADERS} in all"
            )
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        self._budget -= len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos}[whence] + pos
        return self._pos

    def tell(self) -> int:
        return self._pos


@dataclass(frozen=True, slots=True)
class _Member:
    """What the index keeps of a tar member (not tarfile's whole header)."""

    kind: str  # "file", "symlink", "hardlink" or another type's name
    offset: int = 0
    size: int = 0
    link: str = ""


def _member(m: tarfile.TarInfo) -> _Member:
    if m.isreg():
        return _Member("file", m.offset_data, m.size)
    if m.issym():
        return _Member("symlink", link=m.linkname)
    if m.islnk():
        return _Member("hardlink", link=m.linkname)
    kinds = {
        tarfile.DIRTYPE: "directory",
        tarfile.FIFOTYPE: "FIFO",
        tarfile.CHRTYPE: "character device",
    }
    return _Member(kinds.get(m.type, "block device" if m.isblk() else f"type {m.type!r}"))


class _TarFiles:
    """Files of a tar archive, by member name; bytes read by offset, never extracted.

    Only headers are parsed, through `_HeaderReader`; the index keeps a small
    record per member. A later member of the same name replaces an earlier
    one, as extraction would. Symlink and hard-link members are followed
    within the archive's names (``docker save`` tars link repeated layers).
    """

    def __init__(self, what: str, fd: int) -> None:
        self.what = what
        self._fd = fd
        self._file_size = os.fstat(fd).st_size
        self._members: dict[str, _Member] = {}
        try:
            with tarfile.open(fileobj=_HeaderReader(what, fd), mode="r:") as tf:  # type: ignore[call-overload]
                while (m := tf.next()) is not None:
                    tf.members.clear()  # tarfile keeps every header; the index is enough
                    if len(self._members) >= MAX_MEMBERS:
                        raise InvalidArgument(f"{what}: more than {MAX_MEMBERS} tar members")
                    self._members["/".join(clean_parts(m.name))] = _member(m)
        except (tarfile.TarError, EOFError) as e:
            raise InvalidArgument(f"{what}: not a readable tar archive: {e}") from None
        except OSError as e:
            raise _os_error(what, None, e) from None

    def _find(self, name: str) -> _Member:
        key = "/".join(_parts(self.what, name))
        for _ in range(MAX_SYMLINKS + 1):
            m = self._members.get(key)
            if m is None:
                raise NotFound(f"{self.what}: {name} is missing")
            if m.kind == "symlink":
                base = "" if m.link.startswith("/") else key.rpartition("/")[0]
                key = "/".join(clean_parts(join(base, m.link)))
            elif m.kind == "hardlink":
                key = "/".join(clean_parts(m.link))
            else:
                return m
        raise InvalidArgument(f"{self.what}: {name}: too many levels of links")

    def open(self, name: str) -> _Blob:
        m = self._find(name)
        if m.kind != "file":
            raise InvalidArgument(f"{self.what}: {name}: not a regular file ({m.kind})")
        if m.offset + m.size > self._file_size:
            # tarfile lists a member whose data the file does not hold.
            raise InvalidArgument(f"{self.what}: truncated archive: {name} is cut short")
        return _Blob(f"{self.what}: {name}", self._fd, m.offset, m.size, owned=False)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read_file(files: _Files, name: str, limit: int) -> bytes:
    """The bytes of *name*, refused by its size before a byte is read."""
    with files.open(name) as f:
        if f.size > limit:
            raise InvalidArgument(
                f"{files.what}: {name} is {f.size} bytes, more than the limit of {limit}"
            )
        return f.read(limit)


def _read_json(files: _Files, name: str, limit: int = MAX_INDEX_SIZE) -> Any:
    return parse_json(_read_file(files, name, limit), f"{files.what}: {name}")


def _blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


# -- OCI image layout ---------------------------------------------------------


class LayoutSource:
    """An OCI image layout: ``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``."""

    def __init__(self, files: _Files) -> None:
        self._files = files
        self.what = files.what
        if _has(files, "oci-layout"):
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
            return cast(BinaryIO, self._files.open(_blob_name(desc.digest)))
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
        self._configs: dict[str, tuple[Descriptor, list[Digest]]] = {}
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
            config, diff_ids = self._config(config_name, where)
            if len(diff_ids) != len(layer_names):
                raise InvalidArgument(
                    f"{where}: {len(layer_names)} layers but the config lists "
                    f"{len(diff_ids)} diff IDs"
                )
            layers = []
            for name, diff_id in zip(layer_names, diff_ids, strict=True):
                if not isinstance(name, str):
                    raise InvalidArgument(f"{where}: layer names must be strings")
                with self._files.open(name) as f:
                    layers.append(Descriptor(mt.DOCKER_LAYER, diff_id, f.size))
                self._paths[diff_id] = name
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

    def _config(self, name: str, where: str) -> tuple[Descriptor, list[Digest]]:
        """The config *name*'s descriptor and diff IDs (read once per name).

        The config is read here only to learn which layer file is which; the
        importer reads it again through `open_blob` and verifies it.
        """
        if name in self._configs:
            return self._configs[name]
        data = _read_file(self._files, name, MAX_CONFIG_SIZE)
        stem = os.path.basename(name).removesuffix(".json")
        # docker >= 1.10 names configs by digest; hash anything else.
        digest = Digest.from_hex("sha256", stem) if _HEX64.fullmatch(stem) else from_bytes(data)
        self._paths[digest] = name
        config = parse_json(data, f"{self.what}: {name}")
        rootfs = config.get("rootfs") if isinstance(config, dict) else None
        ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(ids, list):
            raise InvalidArgument(f"{where}: {name}: missing rootfs.diff_ids")
        try:
            diff_ids = [Digest.parse(d) for d in ids]
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}: {name}: {e}") from None
        found = Descriptor(mt.DOCKER_CONFIG, digest, len(data)), diff_ids
        self._configs[name] = found
        return found

    def images(self) -> list[ImageEntry]:
        return self._entries

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        if desc.digest in self._synth:
            return io.BytesIO(self._synth[desc.digest])
        try:
            return cast(BinaryIO, self._files.open(self._paths[desc.digest]))
        except KeyError:
            raise NotFound(f"{self.what}: blob {desc.digest} is missing") from None

    def close(self) -> None:
        self._files.close()
