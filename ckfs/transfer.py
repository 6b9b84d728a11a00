"""Import images from local archives into the stores, and export them back.

Import is all-or-nothing, the way a careful user of ``ctr import`` wants it:

1. Manifests and configs are read from the source, verified against their
   digests and parsed, so malformed input fails before anything is written.
2. Every blob the content store lacks is streamed into an ingest and checked
   (size and digest) while the writer still holds it; blobs are copied in
   worker threads, two at a time, since hashing releases the GIL.
3. Only when every blob verified are the ingests committed, and only then are
   names registered. A failure aborts all ingests: no image record, no blob.

Export walks an image's tree in the content store and writes an OCI image
layout tar that skopeo, umoci and containerd read.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio

from ckfs import mediatypes as mt
from ckfs import reference
from ckfs.content import ContentStore, Writer
from ckfs.descriptor import Descriptor
from ckfs.digest import CHUNK, Digest
from ckfs.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    unwrap_groups,
)
from ckfs.images import ImageStore
from ckfs.images import manifest as manifests
from ckfs.images.config import parse_config
from ckfs.images.image import MAX_CONFIG_SIZE
from ckfs.images.image import tree as image_tree
from ckfs.images.store import Image
from ckfs.remotes.archives import CONTAINERD_IMAGE_NAME, REF_NAME, ImageEntry, Source
from ckfs.remotes.fetch import LOCK_WAIT
from ckfs.remotes.walk import ensure_gc_labels, is_parent, megabytes

__all__ = ["ImportReport", "export_images", "import_source"]

#: Blobs copied at once. Two workers keep both cores hashing; more only adds
#: seeks on the same disk.
IMPORT_WORKERS = 2

#: Manifests, indexes and configs of one import held in memory at once
#: (they are verified and parsed before anything is written). An image's
#: are tens of kilobytes; 64 MiB is thousands of images, while a hostile
#: archive listing endless distinct multi-megabyte manifests stops here
#: instead of at the machine's memory.
MAX_DOCUMENTS = 64 << 20

_TAG = re.compile(r"[\w][\w.-]{0,127}")


@dataclass
class ImportReport:
    """What an import did, for the CLI's summary line and JSON output."""

    images: list[Image] = field(default_factory=list)
    blobs: int = 0
    new_blobs: int = 0
    new_bytes: int = 0
    seconds: float = 0.0


def resolve_names(entries: Sequence[ImageEntry], name: str | None, what: str) -> list[list[str]]:
    """Decide the normalized name(s) each entry is registered under.

    A layout's ``ref.name`` is often a bare tag (``latest``, as umoci and
    skopeo write it); a bare tag says nothing about the repository, so it
    needs ``--name``. With one image, ``--name`` names it; with several,
    ``--name`` is the repository and each entry's tag is appended.

    Raises:
        InvalidArgument: an entry would be left without a name, or a name is
            not a valid reference.
    """
    if name is not None and len(entries) == 1:
        return [[str(reference.parse(name))]]
    repo = reference.parse_repository(name) if name is not None else None
    out: list[list[str]] = []
    for i, entry in enumerate(entries):
        tags = [n for n in entry.names if _TAG.fullmatch(n)]
        full = [str(reference.parse(n)) for n in entry.names if n not in tags]
        if repo is not None and tags:
            names = [str(repo.with_tag(t)) for t in tags]
        elif full:
            # containerd's exports carry the full name beside the bare tag.
            names = full
        elif tags:
            raise InvalidArgument(
                f"{what}: image {i} is named only by the tag {tags[0]!r}; "
                "give the repository with --name"
            )
        else:
            raise InvalidArgument(f"{what}: image {i} has no name; give one with --name")
        out.append(list(dict.fromkeys(names)))
    return out


@dataclass
class _Walk:
    """The verified JSON blobs of an import and every descriptor reached."""

    blobs: dict[Digest, Descriptor] = field(default_factory=dict)
    json: dict[Digest, bytes] = field(default_factory=dict)


def _read_verified(source: Source, desc: Descriptor, limit: int) -> bytes:
    if desc.size > limit:
        raise InvalidArgument(f"{source.what}: blob {desc.digest} is larger than {limit} bytes")
    with source.open_blob(desc) as f:
        data = f.read(desc.size + 1)
    _check(source, desc, len(data), _digest_of(desc, data))
    return data


def _digest_of(desc: Descriptor, data: bytes) -> Digest:
    d = desc.digest.digester()
    d.update(data)
    return d.digest()


def _check(source: Source, desc: Descriptor, size: int, digest: Digest) -> None:
    if size != desc.size:
        raise DataLoss(
            f"{source.what}: blob {desc.digest}: size {size} does not match expected {desc.size}"
        )
    if digest != desc.digest:
        raise DataLoss(f"{source.what}: blob {desc.digest}: digest mismatch, got {digest}")


def _walk(source: Source, roots: Iterable[Descriptor]) -> _Walk:
    """Read, verify and parse every index, manifest and config under *roots*."""
    walk = _Walk()
    todo = list(roots)
    held = 0
    while todo:
        desc = todo.pop()
        if desc.digest in walk.blobs:
            continue
        walk.blobs[desc.digest] = desc
        kind = desc.media_type
        if mt.is_index(kind) or mt.is_manifest(kind) or kind in mt.SCHEMA1:
            limit = manifests.MAX_MANIFEST_SIZE
        elif mt.is_config(kind):
            limit = MAX_CONFIG_SIZE
        elif mt.is_layer(kind) or kind == mt.OCI_EMPTY:
            continue
        else:
            raise InvalidArgument(
                f"{source.what}: blob {desc.digest} has unknown media type {kind!r}"
            )
        data = _read_verified(source, desc, limit)
        held += len(data)
        if held > MAX_DOCUMENTS:
            raise InvalidArgument(
                f"{source.what}: manifests and configs add up to more than {MAX_DOCUMENTS} "
                "bytes; import fewer images at a time"
            )
        walk.json[desc.digest] = data
        if mt.is_config(kind):
            parse_config(data, where=f"{source.what}: config {desc.digest}")
        else:
            todo.extend(manifests.children(desc, data))
    return walk


def _open_writer(store: ContentStore, desc: Descriptor, ref: str) -> Writer | None:
    """A writer for *desc*, or None when the blob is (or becomes) present.

    Another process importing or pulling the same blob holds its ref lock; we
    wait for it rather than download twice, then find the blob present.
    """
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            return store.writer(ref, total=desc.size, expected=desc.digest)
        except AlreadyExists:
            return None
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _stage(
    store: ContentStore, source: Source, desc: Descriptor, data: bytes | None
) -> Writer | None:
    """Copy *desc* into an ingest and verify it, leaving it uncommitted.

    Runs in a worker thread.
    """
    writer = _open_writer(store, desc, f"import-{desc.digest}")
    if writer is None:
        return None
    try:
        if writer.offset:
            writer.truncate(0)
        src: BinaryIO
        with contextlib.ExitStack() as stack:
            src = (
                io.BytesIO(data)
                if data is not None
                else stack.enter_context(source.open_blob(desc))
            )
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                writer.write(chunk)
                if writer.offset > desc.size:
                    break
        _check(source, desc, writer.offset, writer.digest())
    except BaseException:
        writer.close()
        with contextlib.suppress(NotFound, Unavailable):
            store.abort(writer.ref)
        raise
    return writer


async def import_source(
    source: Source,
    content: ContentStore,
    images: ImageStore,
    *,
    name: str | None = None,
    on_blob: Callable[[Descriptor, bool], None] | None = None,
) -> ImportReport:
    """Import every image *source* offers; all of it, or nothing.

    Args:
        source: an opened archive (see `ckfs.remotes.archives.open_source`).
        content: where blobs go.
        images: where names go.
        name: ``--name``: the image's name, or with several images the
            repository their tags are appended to.
        on_blob: called with each blob's descriptor and whether it was new,
            after the import is committed.

    Raises:
        InvalidArgument: malformed index, manifest or config; unknown media type.
        DataLoss: a blob's bytes do not match its digest or size.
        NotFound: a blob is missing from the source.
        FailedPrecondition: the blobs to copy need more than the free space.

    Cancellation: staged ingests are aborted; nothing is registered.
    """
    started = time.monotonic()
    entries = source.images()
    if not entries:
        raise InvalidArgument(f"{source.what}: the archive holds no images")
    names = resolve_names(entries, name, source.what)
    walk = await trio.to_thread.run_sync(_walk, source, [e.target for e in entries])

    missing = [d for d in walk.blobs.values() if not content.exists(d.digest)]
    # Sizes are the source's own (a sparse file's too): refuse what cannot
    # fit before filling the disk with it.
    need, free = sum(d.size for d in missing), content.free_bytes()
    if free is not None and need > free:
        raise FailedPrecondition(
            f"{source.what}: the import needs {megabytes(need)}, "
            f"{megabytes(free)} free on {content.root}"
        )
    staged: list[tuple[Writer, Descriptor]] = []
    limiter = trio.CapacityLimiter(IMPORT_WORKERS)

    async def stage(desc: Descriptor) -> None:
        w = await trio.to_thread.run_sync(
            _stage, content, source, desc, walk.json.get(desc.digest), limiter=limiter
        )
        if w is not None:
            staged.append((w, desc))

    try:
        with unwrap_groups():
            async with trio.open_nursery() as nursery:
                # Largest first, so the long copies overlap the short ones.
                for desc in sorted(missing, key=lambda d: -d.size):
                    nursery.start_soon(stage, desc)
        for w, d in staged:
            labels = manifests.gc_labels(d, walk.json[d.digest]) if is_parent(d) else None
            with contextlib.suppress(AlreadyExists):
                w.commit(d.size, d.digest, labels=labels)
    except BaseException:
        for w, _ in staged:
            w.close()
            with contextlib.suppress(NotFound, Unavailable):
                content.abort(w.ref)
        raise
    finally:
        for w, _ in staged:
            w.close()

    # Parents already present (from an earlier pull, say) get their labels too.
    for digest, data in walk.json.items():
        d = walk.blobs[digest]
        if is_parent(d):
            ensure_gc_labels(content, d, data)

    report = ImportReport(
        blobs=len(walk.blobs), new_blobs=len(staged), new_bytes=sum(d.size for _, d in staged)
    )
    for entry, entry_names in zip(entries, names, strict=True):
        target = entry.target.replace(annotations={})
        for n in entry_names:
            report.images.append(images.put(Image.new(n, target)))
    if on_blob is not None:
        new = {d.digest for _, d in staged}
        for d in walk.blobs.values():
            on_blob(d, d.digest in new)
    report.seconds = time.monotonic() - started
    return report


# -- export -------------------------------------------------------------------


def export_images(
    content: ContentStore, images: ImageStore, names: Sequence[str], out: Path
) -> int:
    """Write *names* as one OCI image layout tar at *out*; returns bytes written.

    The archive is written beside *out* under a temporary name and renamed at
    the end, so a failed export leaves no partial file.

    Raises:
        NotFound: an image or one of its required blobs is missing.
    """
    index = []
    blobs: dict[Digest, Descriptor] = {}
    for n in names:
        image = images.get(n)
        for d in image_tree(content, image.target, name=n):
            blobs.setdefault(d.digest, d)
        ref = reference.parse(n)
        annotations = {CONTAINERD_IMAGE_NAME: n}
        if ref.tag:
            annotations[REF_NAME] = ref.tag
        index.append(image.target.replace(annotations=annotations).to_json())

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with (
            open(tmp, "wb") as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            for alg in sorted({d.algorithm for d in blobs}):
                _add_dir(tar, "blobs")
                _add_dir(tar, f"blobs/{alg}")
            for digest in sorted(blobs):
                with content.reader(digest) as r:
                    info = tarfile.TarInfo(f"blobs/{digest.algorithm}/{digest.hex}")
                    info.size = r.size
                    info.mode = 0o444
                    info.mtime = 0
                    tar.addfile(info, r)
            body = json.dumps(
                {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": index},
                separators=(",", ":"),
            ).encode()
            _add_bytes(tar, "index.json", body)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out.stat().st_size


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    if name in tar.getnames():
        return
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)
