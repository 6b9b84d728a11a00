"""The hostile local archive suite: ``ckfs import`` of layouts and docker-save archives
crafted by an adversary.

Every row of `ROWS` builds one archive in the test's temp directory (FIFOs
and character devices where files belong, sparse multi-GiB files made with
``truncate`` so no real gigabyte is written, symlinks and ``..`` names, JSON
nested a hundred thousand deep, duplicate tar entries, wrong types) and
imports it. Each must fail cleanly, in bounded time and memory, and leave
the store as it was (`integration.hostile`): an import is all-or-nothing.
The few rows an honest importer may accept (`Row.registers`) must leave a
store that still lists, inspects and collects what they added.

Runs confined (the file name starts with ``test_hostile``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from integration.hostile import (
    MARKS,
    Outcome,
    check_failure,
    check_store,
    check_success,
    neighbour_template,
    nothing_changes_outside,
    recorded,
    run,
    with_neighbour,
)
from integration.hostile_registry import (
    EVIL,
    LONG_CONFIG,
    PARSEABLE_DEEP,
    crafted,
    deep_json,
    setting,
    sha256,
)
from tests.layouts import DockerSave, Layout, docker_save

pytestmark = MARKS


@pytest.fixture(scope="session")
def neighbour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return neighbour_template(tmp_path_factory.getbasetemp())


#: Size of the sparse files standing in for multi-GiB documents.
SPARSE = 3 << 30

#: A string that keeps index.json (4 MiB) just inside its size limit.
LONG_INDEX = "x" * ((4 << 20) - 4096)

#: How a refusal of a special file by name reads (issue 8: "refuse the rest by name").
SPECIAL = "regular file|FIFO|character device|special file"

#: The annotation that names an image in a layout.
REF = "org.opencontainers.image.ref.name"

#: ``/dev/zero``: a character device that never ends.
DEV_ZERO = os.makedev(1, 5)

Build = Callable[[Path], Path]


@dataclasses.dataclass(frozen=True)
class Row:
    """One crafted archive: how it is built and what the error must name.

    *registers* is set where importing may succeed without harm: a tar's
    ``../`` member names are only lookup keys (nothing is extracted), so
    reading them as GNU tar does (leading ``../`` dropped) is fine, as
    long as nothing lands outside the root.
    """

    name: str
    build: Build
    match: str | None = None
    registers: str | None = None


# -- building blocks ---------------------------------------------------------------


def layout(work: Path) -> Layout:
    """A good one-image OCI layout under *work*."""
    lay = Layout(work / "layout")
    lay.image([{"hello": b"hi\n"}], ref="hostile:1")
    return lay


def manifest_blob(lay: Layout) -> Path:
    return lay.blob_path(lay.manifests[0]["digest"])


def config_blob(lay: Layout) -> Path:
    return lay.blob_path(lay.manifest()["config"]["digest"])


def layer_blob(lay: Layout) -> Path:
    return lay.blob_path(lay.manifest()["layers"][0]["digest"])


def fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def chardev(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mknod(path, 0o600 | stat.S_IFCHR, DEV_ZERO)


def sparse(path: Path, size: int = SPARSE) -> None:
    with open(path, "ab") as f:
        f.truncate(size)


def symlink(path: Path, target: str | Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def replace_index(lay: Layout, body: bytes) -> Path:
    (lay.root / "index.json").write_bytes(body)
    return lay.root


def replace_blob(lay: Layout, body: bytes, key: str) -> Path:
    """Put *body* in the layout as a new blob and point the manifest's *key* at it."""
    digest = lay.blob(body)
    manifest = lay.manifest()
    target = manifest[key] if key == "config" else manifest[key][0]
    target.update(digest=digest, size=len(body))
    data = json.dumps(manifest).encode()
    lay.manifests[0].update(digest=lay.blob(data), size=len(data))
    lay.write_index()
    return lay.root


def docker(work: Path, *, config_name: str | None = None) -> DockerSave:
    """A good docker-save directory under *work* (`tests.layouts.docker_save`)."""
    return docker_save(work / "docker", config_name=config_name)


def docker_config(save: DockerSave) -> Path:
    return save.root / save.config


Entry = tuple[tarfile.TarInfo, bytes | None]


def as_tar(src: Path, out: Path, extra: list[Entry] | None = None) -> Path:
    """*src*'s files in a tar, then *extra* entries (duplicates, special files)."""
    with tarfile.open(out, "w") as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(src)), recursive=False)
        for info, data in extra or []:
            add(tar, info, data)
    return out


def entry(name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if data is not None else 0
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 5
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return info, data


def add(tar: tarfile.TarFile, info: tarfile.TarInfo, data: bytes | None) -> None:
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def write_deep(path: Path) -> None:
    path.write_bytes(deep_json())


def write_deep_list_900(path: Path) -> None:
    path.write_bytes(deep_json(b"[", b"]", depth=PARSEABLE_DEEP))


def write_list(path: Path) -> None:
    path.write_bytes(b"[]")


def write_deep_list(path: Path) -> None:
    path.write_bytes(deep_json(b"[", b"]"))


def tar_with_huge_member(out: Path, name: str, size: int = SPARSE) -> Path:
    """A tar whose one member claims *size* bytes, stored sparse (nothing real written)."""
    info = tarfile.TarInfo(name)
    info.size = size
    with open(out, "wb") as f:
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.truncate(512 + size + (-size % 512) + 1024)
    return out


# -- the cases ---------------------------------------------------------------------


def _layout_special(which: Callable[[Layout], Path], make: Callable[[Path], None]) -> Build:
    def build(work: Path) -> Path:
        lay = layout(work)
        make(which(lay))
        return lay.root

    return build


def _index(lay: Layout) -> Path:
    return lay.root / "index.json"


def _oci_layout(lay: Layout) -> Path:
    return lay.root / "oci-layout"


def layout_deep_blob(key: str) -> Build:
    def build(work: Path) -> Path:
        lay = layout(work)
        if key == "manifest":
            body = deep_json()
            lay.manifests[0].update(digest=lay.blob(body), size=len(body))
            lay.write_index()
            return lay.root
        return replace_blob(lay, deep_json(), key)

    return build


def layout_5000_layers(work: Path) -> Path:
    lay = layout(work)
    manifest = lay.manifest()
    manifest["layers"] = [
        {"mediaType": manifest["layers"][0]["mediaType"], "digest": sha256(b"%d" % i), "size": 10}
        for i in range(5000)
    ]
    data = json.dumps(manifest).encode()
    lay.manifests[0].update(digest=lay.blob(data), size=len(data))
    lay.write_index()
    return lay.root


def layout_ref_name(name: str) -> Build:
    def build(work: Path) -> Path:
        lay = layout(work)
        lay.manifests[0]["annotations"] = {"org.opencontainers.image.ref.name": name}
        lay.write_index()
        return lay.root

    return build


def layout_blob_is_dir(work: Path) -> Path:
    lay = layout(work)
    path = manifest_blob(lay)
    path.unlink()
    path.mkdir()
    return lay.root


def layout_index_is_dir(work: Path) -> Path:
    lay = layout(work)
    (lay.root / "index.json").unlink()
    (lay.root / "index.json").mkdir()
    return lay.root


def layout_index_symlink_fifo(work: Path) -> Path:
    lay = layout(work)
    os.mkfifo(work / "elsewhere.fifo")
    symlink(lay.root / "index.json", work / "elsewhere.fifo")
    return lay.root


def layout_manifest_sparse_claimed(work: Path) -> Path:
    """The index claims a 3 GiB manifest, and the file is that big (sparse)."""
    lay = layout(work)
    sparse(manifest_blob(lay))
    lay.manifests[0]["size"] = SPARSE
    lay.write_index()
    return lay.root


def _docker_special(
    which: Callable[[DockerSave], Path], make: Callable[[Path], None], **kw: str
) -> Build:
    def build(work: Path) -> Path:
        save = docker(work, **kw)
        make(which(save))
        return save.root

    return build


def _docker_manifest(save: DockerSave) -> Path:
    return save.root / "manifest.json"


def _docker_layer(save: DockerSave) -> Path:
    return save.root / save.layers[0]


def docker_layers(names: list[str]) -> Build:
    def build(work: Path) -> Path:
        save = docker(work)
        save.write_manifest(layers=names)
        return save.root

    return build


def docker_config_outside(work: Path) -> Path:
    save = docker(work)
    (work / "outside.json").write_bytes(docker_config(save).read_bytes())
    save.write_manifest(config="../outside.json")
    return save.root


def docker_layer_symlink_outside(work: Path) -> Path:
    save = docker(work)
    (work / "outside.tar").write_bytes(_docker_layer(save).read_bytes())
    symlink(_docker_layer(save), work / "outside.tar")
    return save.root


def put_docker_config(save: DockerSave, body: bytes) -> Path:
    """Make *body* the config of the docker-save directory *save* (named by its digest)."""
    name = f"{sha256(body)[7:]}.json"
    (save.root / name).write_bytes(body)
    save.write_manifest(config=name)
    return save.root


def docker_deep_config(work: Path) -> Path:
    return put_docker_config(docker(work), deep_json())


def tar_of(build: Build) -> Build:
    def make(work: Path) -> Path:
        return as_tar(build(work), work / "archive.tar")

    return make


def tar_dotdot(work: Path) -> Path:
    src = layout(work).root
    out = work / "archive.tar"
    with tarfile.open(out, "w") as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname="../" + str(p.relative_to(src)), recursive=False)
    return out


def tar_special_blob(kind: bytes) -> Build:
    def build(work: Path) -> Path:
        lay = layout(work)
        blob = manifest_blob(lay)
        name = str(blob.relative_to(lay.root))
        blob.unlink()
        return as_tar(lay.root, work / "archive.tar", [entry(name, None, kind)])

    return build


def tar_many_entries(work: Path) -> Path:
    out = work / "archive.tar"
    with tarfile.open(out, "w") as tar:
        for i in range(30_000):
            add(tar, *entry(f"junk/{i}", b""))
    return out


def tar_huge_docker_config(work: Path) -> Path:
    """A docker-save tar whose config (not named by digest, so hashed) claims 3 GiB."""
    out = work / "archive.tar"
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [], "Layers": []}]).encode()
    info = tarfile.TarInfo("config.json")
    info.size = SPARSE
    with open(out, "wb") as f:
        head = io.BytesIO()
        with tarfile.open(fileobj=head, mode="w", format=tarfile.GNU_FORMAT) as tar:
            add(tar, *entry("manifest.json", manifest))
        f.write(_members_only(head.getvalue()))
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.truncate(f.tell() + SPARSE + 1024)
    return out


def _members_only(tar_bytes: bytes) -> bytes:
    """A tar's bytes without its end-of-archive blocks and padding (to append members)."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + last.size
    return tar_bytes[: end + (-end % 512)]


def archive_special(make: Callable[[Path], None]) -> Build:
    def build(work: Path) -> Path:
        path = work / "archive.tar"
        make(path)
        return path

    return build


def tar_truncated(work: Path) -> Path:
    src = layout(work).root
    out = as_tar(src, work / "archive.tar")
    with open(out, "r+b") as f:
        f.truncate(os.path.getsize(out) // 2)
    return out


def tar_duplicate_index(work: Path) -> Path:
    lay = layout(work)
    (lay.root / "index.json").write_bytes(deep_json())
    return as_tar(
        lay.root, work / "archive.tar", [entry("index.json", b"not json" + EVIL.encode())]
    )


def tar_duplicate_docker_manifest(work: Path) -> Path:
    root = docker(work).root
    (root / "manifest.json").write_bytes(deep_json(b"[", b"]"))
    return as_tar(root, work / "archive.tar", [entry("manifest.json", b'{"not": "a list"}')])


def layout_index(change: Callable[[Any], None]) -> Build:
    """A good layout whose index.json is changed by *change* (see `crafted`)."""

    def build(work: Path) -> Path:
        lay = layout(work)
        body = json.loads((lay.root / "index.json").read_bytes())
        return replace_index(lay, crafted(body, change))

    return build


def docker_manifest(change: Callable[[Any], None]) -> Build:
    def build(work: Path) -> Path:
        root = docker(work).root
        body = json.loads((root / "manifest.json").read_bytes())
        (root / "manifest.json").write_bytes(crafted(body, change))
        return root

    return build


def docker_config_changed(change: Callable[[Any], None]) -> Build:
    def build(work: Path) -> Path:
        save = docker(work)
        return put_docker_config(
            save, crafted(json.loads(docker_config(save).read_bytes()), change)
        )

    return build


ROWS = [
    # Special files where an OCI layout has regular ones: refused by name, never opened blocking.
    Row("layout-index-fifo", _layout_special(_index, fifo), match=SPECIAL),
    Row("layout-oci-layout-fifo", _layout_special(_oci_layout, fifo), match=SPECIAL),
    Row("layout-manifest-fifo", _layout_special(manifest_blob, fifo), match=SPECIAL),
    Row("layout-config-fifo", _layout_special(config_blob, fifo), match=SPECIAL),
    Row("layout-layer-fifo", _layout_special(layer_blob, fifo), match=SPECIAL),
    Row("layout-index-chardev", _layout_special(_index, chardev), match=SPECIAL),
    Row("layout-manifest-chardev", _layout_special(manifest_blob, chardev), match=SPECIAL),
    Row("layout-layer-chardev", _layout_special(layer_blob, chardev), match=SPECIAL),
    Row("layout-index-symlink-fifo", layout_index_symlink_fifo),
    Row(
        "layout-layer-symlink-devzero",
        _layout_special(layer_blob, lambda p: symlink(p, "/dev/zero")),
    ),
    Row(
        "layout-manifest-symlink-outside",
        _layout_special(manifest_blob, lambda p: symlink(p, "/etc/passwd")),
    ),
    Row("layout-index-is-dir", layout_index_is_dir),
    Row("layout-blob-is-dir", layout_blob_is_dir),
    # Sparse multi-GiB documents: checked by size before a byte is read.
    Row("layout-index-sparse", _layout_special(_index, sparse), match="index.json"),
    Row("layout-oci-layout-sparse", _layout_special(_oci_layout, sparse)),
    Row("layout-manifest-sparse", _layout_special(manifest_blob, sparse)),
    Row("layout-manifest-sparse-claimed", layout_manifest_sparse_claimed),
    Row("layout-config-sparse", _layout_special(config_blob, sparse)),
    # Deep JSON in every document of a layout.
    Row(
        "layout-index-deep", lambda w: replace_index(layout(w), deep_json()), match="nested deeper"
    ),
    Row(
        "layout-oci-layout-deep",
        _layout_special(_oci_layout, write_deep),
        match="nested deeper",
    ),
    Row("layout-manifest-deep", layout_deep_blob("manifest"), match="nested deeper"),
    Row("layout-config-deep", layout_deep_blob("config"), match="nested deeper"),
    Row(
        "layout-index-deep-900",
        lambda w: replace_index(layout(w), deep_json(depth=PARSEABLE_DEEP)),
        match="nested deeper",
    ),
    Row(
        "docker-manifest-deep-900",
        _docker_special(_docker_manifest, write_deep_list_900),
        match="nested deeper",
    ),
    # Impossible images and hostile names.
    Row("layout-5000-layers", layout_5000_layers),
    Row("layout-ref-evil", layout_ref_name("hostile" + EVIL + ":1")),
    Row("layout-ref-100k", layout_ref_name("h/" * 50_000 + "x:1")),
    # docker-save directories.
    Row("docker-manifest-fifo", _docker_special(_docker_manifest, fifo), match=SPECIAL),
    Row("docker-config-fifo", _docker_special(docker_config, fifo), match=SPECIAL),
    Row(
        "docker-config-fifo-named",
        _docker_special(docker_config, fifo, config_name="config.json"),
        match=SPECIAL,
    ),
    Row("docker-config-chardev", _docker_special(docker_config, chardev), match=SPECIAL),
    Row(
        "docker-config-chardev-named",
        _docker_special(docker_config, chardev, config_name="config.json"),
        match=SPECIAL,
    ),
    Row("docker-layer-fifo", _docker_special(_docker_layer, fifo), match=SPECIAL),
    Row("docker-layer-chardev", _docker_special(_docker_layer, chardev), match=SPECIAL),
    Row("docker-manifest-sparse", _docker_special(_docker_manifest, sparse), match="manifest.json"),
    Row("docker-config-sparse", _docker_special(docker_config, sparse)),
    Row(
        "docker-config-sparse-named",
        _docker_special(docker_config, sparse, config_name="config.json"),
    ),
    Row(
        "docker-manifest-deep",
        _docker_special(_docker_manifest, write_deep_list),
        match="nested deeper",
    ),
    Row("docker-config-deep", docker_deep_config, match="nested deeper"),
    Row("docker-layer-dotdot", docker_layers(["../../../../etc/passwd"])),
    Row("docker-layer-absolute", docker_layers(["/etc/passwd"])),
    Row("docker-config-outside", docker_config_outside),
    Row("docker-layer-symlink-outside", docker_layer_symlink_outside),
    Row("docker-layer-name-evil", docker_layers(["layer" + EVIL + ".tar"])),
    Row("docker-layer-name-100k", docker_layers(["l/" * 50_000 + "layer.tar"])),
    # Tars: duplicates, special and traversing entries, lying and sparse sizes.
    Row("tar-duplicate-index", tar_duplicate_index),
    Row("tar-duplicate-docker-manifest", tar_duplicate_docker_manifest),
    Row("tar-blob-chardev-entry", tar_special_blob(tarfile.CHRTYPE), match=SPECIAL),
    Row("tar-blob-fifo-entry", tar_special_blob(tarfile.FIFOTYPE), match=SPECIAL),
    Row("tar-blob-symlink-entry", tar_special_blob(tarfile.SYMTYPE)),
    Row("tar-dotdot-names", tar_dotdot, registers="docker.io/library/hostile:1"),
    Row("tar-truncated", tar_truncated),
    Row(
        "tar-index-sparse",
        lambda w: tar_with_huge_member(w / "archive.tar", "index.json"),
        match="index.json",
    ),
    Row("tar-docker-config-sparse", tar_huge_docker_config),
    Row(
        "tar-layout-deep",
        tar_of(lambda w: replace_index(layout(w), deep_json())),
        match="nested deeper",
    ),
    Row("tar-30000-entries", tar_many_entries),
    # Type confusion and odd values in the archive's own documents.
    Row("layout-entry-string", layout_index(setting(("manifests", 0), "x"))),
    Row("layout-manifests-object", layout_index(setting(("manifests",), {}))),
    Row("layout-size-5000-digits", layout_index(setting(("manifests", 0, "size"), "BIG"))),
    Row("layout-size-nan", layout_index(setting(("manifests", 0, "size"), float("nan")))),
    Row(
        "layout-ref-surrogate",
        layout_index(setting(("manifests", 0, "annotations"), {REF: "h\ud800:1"})),
    ),
    Row("layout-annotations-list", layout_index(setting(("manifests", 0, "annotations"), []))),
    Row("layout-platform-string", layout_index(setting(("manifests", 0, "platform"), "linux"))),
    Row("layout-oci-layout-list", _layout_special(_oci_layout, write_list)),
    Row("docker-manifest-object", docker_manifest(lambda doc: doc.append(5))),
    Row("docker-repotags-int", docker_manifest(setting((0, "RepoTags"), 5))),
    Row("docker-repotag-evil", docker_manifest(setting((0, "RepoTags"), [EVIL + ":1"]))),
    Row("docker-layers-ints", docker_manifest(setting((0, "Layers"), [5]))),
    Row("docker-config-int", docker_manifest(setting((0, "Config"), 5))),
    Row("docker-diff-ids-ints", docker_config_changed(setting(("rootfs", "diff_ids"), [5]))),
    Row("docker-diff-ids-object", docker_config_changed(setting(("rootfs", "diff_ids"), {}))),
    # Documents at their size limit made of one long string.
    Row(
        "layout-index-long-string",
        layout_index(setting(("annotations",), {"a": LONG_INDEX})),
        registers="docker.io/library/hostile:1",
    ),
    Row(
        "docker-config-long-string",
        docker_config_changed(setting(("config",), {"Cmd": [LONG_CONFIG * "x"]})),
        registers="docker.io/library/busybox:1",
    ),
    # The archive itself a special file.
    Row("archive-is-fifo", archive_special(os.mkfifo), match=SPECIAL),
    Row("archive-is-chardev", archive_special(chardev), match=SPECIAL),
    Row("archive-is-sparse", archive_special(sparse)),
]


def run_case(row: Row, work: Path, seen: list[Outcome], neighbour: Path) -> None:
    """Build *row*'s archive in *work*, import it into a fresh root, assert the suite's demands."""
    root = work / "root"
    before = with_neighbour(root, neighbour)
    (work / "in").mkdir()
    path = row.build(work / "in")
    with nothing_changes_outside(work, root):
        o = run(root, "import", str(path))
        seen.append(o)
        if o.code == 0 and row.registers:
            check_success(o)
        else:
            check_failure(o, row.match)
        check_store(root, before, may_register=row.registers)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_hostile_archive(
    row: Row, neighbour: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    recorded(
        tmp_path_factory.getbasetemp(),
        "archives",
        row.name,
        lambda seen: run_case(row, tmp_path / "case", seen, neighbour),
    )


def test_enough_cases() -> None:
    assert len({r.name for r in ROWS}) == len(ROWS) >= 40
