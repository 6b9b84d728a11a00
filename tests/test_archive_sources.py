"""Hostile local archives: special files, sparse documents, links and ``..``,
broken tars. Each case must end at once in one `CkfsError` with a one-line
message, with nothing registered and no blob or ingest left behind.

The file name puts these tests under `tests.confine` (conftest's CONFINED),
so they are synchronous and run the import with `trio.run` in the confined
child. A case that hangs (a FIFO opened blocking) is killed by an alarm
instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from ckfs import safetext, transfer
from ckfs.errors import CkfsError, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from ckfs.remotes import archives
from ckfs.remotes.archives import open_source
from ckfs.state import State
from ckfs.transfer import import_source
from tests.layouts import Layout, docker_save, layer_tar

NAME = "docker.io/stevvooe/foo:latest"

#: Wall time any case may take; a blocking open would take forever.
BOUND = 10.0

#: The CLI of this environment.
CKFS = str(Path(sys.executable).parent / "ckfs")

#: Peak RSS any case may reach (the issue's bound for the hostile suite).
MAX_RSS = 200 << 20

#: Starts a command from a small process, so its peak RSS is its own.
LAUNCH = Path(__file__).parent.parent / "integration" / "hostile_launch.py"


def peak() -> int:
    """This process's peak RSS in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> int:
    """Measure peak RSS from now on; return the bytes resident now.

    A confined case runs in a child forked from pytest, resident at pytest's
    size (a full run holds over 200 MB): only the growth from here is the
    case's own. Writing 5 to ``clear_refs`` lowers the high-water mark to
    the current RSS.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return peak()


@contextlib.contextmanager
def deadline(seconds: float = 3 * BOUND) -> Iterator[None]:
    """Kill the (confined, forked) test process if it hangs."""
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)


def do_import(root: Path, archive: Path, name: str | None = NAME) -> None:
    state = State(root)
    try:
        source = open_source(archive)
        try:
            trio.run(lambda: import_source(source, state.content, state.images, name=name))
        finally:
            source.close()
    finally:
        state.close()


def assert_untouched(root: Path) -> None:
    state = State(root)
    try:
        assert state.images.list() == []
        assert list(state.content.walk()) == []
        assert state.content.list_statuses() == []
    finally:
        state.close()


def refused(
    root: Path, archive: Path, error: type[CkfsError], words: str, name: str | None = NAME
) -> str:
    """Import *archive*: it must fail with *error* saying *words*, quickly, cleanly."""
    started = time.monotonic()
    with deadline(), pytest.raises(error) as info:
        do_import(root, archive, name)
    assert time.monotonic() - started < BOUND
    text = str(info.value)
    assert words in text, text
    assert "\n" not in safetext.message(text)
    assert_untouched(root)
    return text


def layout_with_image(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "layout")
    layout.image([{"etc/hello": b"hello\n"}, {"srv/data": b"x" * 10_000}])
    return layout


def top_layer(layout: Layout) -> Path:
    return layout.blob_path(layout.manifest()["layers"][-1]["digest"])


def replace(path: Path, make: Callable[[Path], None]) -> None:
    path.unlink()
    make(path)


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_zero_device(path: Path) -> None:
    # /dev/zero's numbers: endless, so reading it would never end either.
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))


def make_socket(path: Path) -> None:
    # Bound at a short name (sun_path holds 108 bytes), then moved into place.
    short = f"/tmp/ckfs-sock-{os.getpid()}"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(short)
    os.rename(short, path)


def make_dir(path: Path) -> None:
    path.mkdir()


SPECIAL = [
    ("FIFO", make_fifo),
    ("character device", make_zero_device),
    ("socket", make_socket),
    ("directory", make_dir),
]


# -- OCI layout directories ------------------------------------------------------


@pytest.mark.parametrize(("kind", "make"), SPECIAL, ids=[s[0] for s in SPECIAL])
def test_special_file_as_layer_blob_is_refused_by_name(
    tmp_path: Path, kind: str, make: Callable[[Path], None]
) -> None:
    layout = layout_with_image(tmp_path)
    blob = top_layer(layout)
    replace(blob, make)
    text = refused(tmp_path / "root", layout.root, InvalidArgument, f"not a regular file ({kind})")
    assert f"blobs/sha256/{blob.name}" in text


@pytest.mark.parametrize("document", ["index.json", "oci-layout"])
def test_fifo_as_layout_document_is_refused(tmp_path: Path, document: str) -> None:
    layout = layout_with_image(tmp_path)
    replace(layout.root / document, make_fifo)
    refused(tmp_path / "root", layout.root, InvalidArgument, f"{document}: not a regular file")


def test_fifo_as_the_archive_itself_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "archive.tar")
    refused(tmp_path / "root", tmp_path / "archive.tar", InvalidArgument, "(FIFO)")


def test_a_directory_that_cannot_be_rooted_is_closed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller closes the archive's descriptor when a source fails to open;
    closed twice, the second close hid the real error (or closed another
    thread's file)."""
    layout = layout_with_image(tmp_path)

    def no_root(path: str) -> None:
        raise OSError(errno.EMFILE, "Too many open files", path)

    monkeypatch.setattr(archives, "RootDir", no_root)
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as raised:
        open_source(layout.root)
    assert raised.value.errno == errno.EMFILE
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_sparse_index_is_refused_by_size_before_reading(tmp_path: Path) -> None:
    base = reset_peak()
    layout = layout_with_image(tmp_path)
    with open(layout.root / "index.json", "r+b") as f:
        f.truncate(3 << 30)
    text = refused(tmp_path / "root", layout.root, InvalidArgument, "index.json")
    assert str(archives.MAX_INDEX_SIZE) in text
    assert peak() - base < MAX_RSS


@pytest.mark.parametrize(
    "target", ["/etc/passwd", "../../../../../../etc/passwd", "/proc/self/environ"]
)
def test_symlink_out_of_the_layout_resolves_inside_it(tmp_path: Path, target: str) -> None:
    layout = layout_with_image(tmp_path)
    blob = top_layer(layout)
    blob.unlink()
    blob.symlink_to(target)
    refused(tmp_path / "root", layout.root, NotFound, "is missing")


def test_symlink_inside_the_layout_is_followed(tmp_path: Path) -> None:
    layout = layout_with_image(tmp_path)
    blob = top_layer(layout)
    (layout.root / "elsewhere").mkdir()
    blob.rename(layout.root / "elsewhere" / "blob")
    # Absolute targets are rooted at the archive, like a chroot's.
    blob.symlink_to("/elsewhere/blob")
    with deadline():
        do_import(tmp_path / "root", layout.root)


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    layout = layout_with_image(tmp_path)
    blob = top_layer(layout)
    blob.unlink()
    blob.symlink_to(blob.name)
    refused(tmp_path / "root", layout.root, InvalidArgument, "symbolic links")


def test_deep_json_index_is_invalid_argument(tmp_path: Path) -> None:
    layout = layout_with_image(tmp_path)
    (layout.root / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(tmp_path / "root", layout.root, InvalidArgument, "nested deeper")


def test_documents_held_at_once_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "MAX_DOCUMENTS", 1000)
    layout = Layout(tmp_path / "layout")
    for i in range(5):
        layout.image([{"a": str(i).encode()}], ref=f"v{i}")
    refused(tmp_path / "root", layout.root, InvalidArgument, "more than 1000 bytes", "foo")


def index_entry_with(layout: Layout, **fields: object) -> None:
    layout.manifests[0] = {**layout.manifests[0], **fields}
    layout.write_index()


def huge_size_in_index(layout: Layout, digits: str) -> None:
    """A size longer than Python's int digit limit (json.dumps cannot write one)."""
    index_entry_with(layout, size=-12345)
    path = layout.root / "index.json"
    path.write_text(path.read_text().replace("-12345", digits))


@pytest.mark.parametrize(
    ("spoil", "words"),
    [
        pytest.param(
            lambda lay: huge_size_in_index(lay, "9" * 5000),
            "JSON",
            id="number of 5000 digits",
        ),
        pytest.param(
            lambda lay: index_entry_with(
                lay, platform={"os": "linux", "architecture": "amd64", "os.features": 1}
            ),
            "platform",
            id="os.features not a list",
        ),
        (lambda lay: index_entry_with(lay, size=-1), "size"),
        (lambda lay: index_entry_with(lay, annotations={"a": 1}), "annotations"),
        (lambda lay: index_entry_with(lay, digest="sha256:" + "0" * 63), "digest"),
    ],
)
def test_odd_values_in_index_json_are_invalid_argument(
    tmp_path: Path, spoil: Callable[[Layout], None], words: str
) -> None:
    layout = layout_with_image(tmp_path)
    spoil(layout)
    refused(tmp_path / "root", layout.root, InvalidArgument, words)


# -- docker save directories -----------------------------------------------------


def test_sparse_config_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    base = reset_peak()
    # Not named by a digest, so the config used to be read whole to hash it.
    save = docker_save(tmp_path / "save", config_name="config.json")
    root, config = save.root, save.config
    with open(root / config, "r+b") as f:
        f.truncate(3 << 30)
    text = refused(tmp_path / "root", root, InvalidArgument, "config.json", None)
    assert "more than the limit of" in text
    assert peak() - base < MAX_RSS


def test_sparse_layer_larger_than_the_free_space_is_refused_before_copying(
    tmp_path: Path,
) -> None:
    save = docker_save(tmp_path / "save")
    with open(save.root / save.layers[1], "r+b") as f:
        f.truncate(1 << 40)  # a terabyte of holes: it would fill the disk with zeros
    refused(tmp_path / "root", save.root, FailedPrecondition, "the import needs", None)


@pytest.mark.parametrize(("kind", "make"), SPECIAL, ids=[s[0] for s in SPECIAL])
def test_special_file_as_docker_config_or_layer_is_refused(
    tmp_path: Path, kind: str, make: Callable[[Path], None]
) -> None:
    save = docker_save(tmp_path / "save")
    root, config, layers = save.root, save.config, save.layers
    replace(root / config, make)
    refused(
        tmp_path / "root", root, InvalidArgument, f"{config}: not a regular file ({kind})", None
    )
    replace(root / layers[1], make)
    refused(tmp_path / "root", root, InvalidArgument, f"not a regular file ({kind})", None)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../outside.json", "outside the archive"),
        ("/etc/passwd", "outside the archive"),
        ("l0/../../outside.json", "outside the archive"),
        ("a\0b", "NUL"),
        ("\ud800.json", "not a file name"),
    ],
)
def test_docker_config_name_outside_the_archive_is_refused(
    tmp_path: Path, name: str, words: str
) -> None:
    (tmp_path / "outside.json").write_text("{}")
    save = docker_save(tmp_path / "save")
    save.write_manifest(config=name)
    refused(tmp_path / "root", save.root, InvalidArgument, words, None)


def test_docker_layer_name_climbing_is_refused(tmp_path: Path) -> None:
    save = docker_save(tmp_path / "save")
    save.write_manifest(layers=[save.layers[0], "../save/" + save.layers[1]])
    refused(tmp_path / "root", save.root, InvalidArgument, "outside the archive", None)


def test_docker_layer_name_too_long_is_one_line(tmp_path: Path) -> None:
    save = docker_save(tmp_path / "save")
    save.write_manifest(layers=[save.layers[0], "x" * 100_000])
    text = refused(tmp_path / "root", save.root, InvalidArgument, "too long", None)
    assert len(safetext.message(text)) <= safetext.MAX_MESSAGE


def test_docker_relative_symlink_to_a_repeated_layer_is_followed(tmp_path: Path) -> None:
    # What legacy `docker save` writes for a layer it already saved.
    root = docker_save(tmp_path / "save").root
    data = (root / "l1/layer.tar").read_bytes()
    (root / "l0/layer.tar").unlink()
    (root / "l1/layer.tar").unlink()
    (root / "l2").mkdir()
    (root / "l2/layer.tar").write_bytes(layer_tar({"a": b"1"}))
    (root / "l0/layer.tar").symlink_to("../l2/layer.tar")
    (root / "l1/layer.tar").write_bytes(data)
    with deadline():
        do_import(tmp_path / "root", root, None)


# -- tar archives ----------------------------------------------------------------


def tar_of(out: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def layout_members(layout: Layout) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The layout's files as tar members, in order."""
    out: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for p in sorted(layout.root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            info = tarfile.TarInfo(str(p.relative_to(layout.root)))
            info.size = len(data)
            out.append((info, data))
    return out


def special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, None


def with_member(
    layout: Layout, name: str, member: tuple[tarfile.TarInfo, bytes | None]
) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [member if m[0].name == name else m for m in layout_members(layout)]


TAR_SPECIAL = [
    ("FIFO", tarfile.FIFOTYPE),
    ("character device", tarfile.CHRTYPE),
    ("directory", tarfile.DIRTYPE),
]


@pytest.mark.parametrize(("kind", "type_"), TAR_SPECIAL, ids=[s[0] for s in TAR_SPECIAL])
def test_tar_member_that_is_not_a_file_is_refused(tmp_path: Path, kind: str, type_: bytes) -> None:
    layout = layout_with_image(tmp_path)
    name = str(top_layer(layout).relative_to(layout.root))
    archive = tar_of(tmp_path / "l.tar", with_member(layout, name, special(name, type_)))
    refused(tmp_path / "root", archive, InvalidArgument, f"{name}: not a regular file ({kind})")


def test_tar_directory_where_index_is_expected(tmp_path: Path) -> None:
    layout = layout_with_image(tmp_path)
    members = with_member(layout, "index.json", special("index.json", tarfile.DIRTYPE))
    archive = tar_of(tmp_path / "l.tar", members)
    refused(tmp_path / "root", archive, InvalidArgument, "index.json: not a regular file")


@pytest.mark.parametrize(("type_", "how"), [(tarfile.SYMTYPE, "sym"), (tarfile.LNKTYPE, "hard")])
def test_tar_links_are_followed_within_the_archive(tmp_path: Path, type_: bytes, how: str) -> None:
    layout = layout_with_image(tmp_path)
    name = str(top_layer(layout).relative_to(layout.root))
    data = top_layer(layout).read_bytes()
    moved = tarfile.TarInfo("elsewhere/blob")
    moved.size = len(data)
    target = "../../elsewhere/blob" if how == "sym" else "elsewhere/blob"
    members = [(moved, data), *with_member(layout, name, special(name, type_, target))]
    with deadline():
        do_import(tmp_path / "root", tar_of(tmp_path / "l.tar", members))


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../../etc/passwd"])
def test_tar_symlink_out_of_the_archive_is_missing(tmp_path: Path, target: str) -> None:
    layout = layout_with_image(tmp_path)
    name = str(top_layer(layout).relative_to(layout.root))
    members = with_member(layout, name, special(name, tarfile.SYMTYPE, target))
    refused(tmp_path / "root", tar_of(tmp_path / "l.tar", members), NotFound, "missing")


def test_tar_symlink_loop_is_refused(tmp_path: Path) -> None:
    layout = layout_with_image(tmp_path)
    name = str(top_layer(layout).relative_to(layout.root))
    members = with_member(layout, name, special(name, tarfile.SYMTYPE, name.rpartition("/")[2]))
    refused(tmp_path / "root", tar_of(tmp_path / "l.tar", members), InvalidArgument, "links")


def test_tar_duplicate_member_the_last_wins(tmp_path: Path) -> None:
    layout = layout_with_image(tmp_path)
    name = str(top_layer(layout).relative_to(layout.root))
    bad = tarfile.TarInfo(name)
    bad.size = 5
    good = layout_members(layout)
    # A bad copy before the good one is harmless; after it, the import fails.
    with deadline():
        do_import(tmp_path / "root", tar_of(tmp_path / "a.tar", [(bad, b"evil!"), *good]))
    refused(
        tmp_path / "root2", tar_of(tmp_path / "b.tar", [*good, (bad, b"evil!")]), DataLoss, "size"
    )


def test_tar_member_names_not_utf8(tmp_path: Path) -> None:
    layout = layout_with_image(tmp_path)
    odd = tarfile.TarInfo("blobs/\udcff\udcfe\x1b]0;title\x07")
    odd.size = 3
    members = [(odd, b"abc"), *layout_members(layout)]
    archive = tmp_path / "l.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    with deadline():
        do_import(tmp_path / "root", archive)


def test_tar_member_claiming_an_absurd_size(tmp_path: Path) -> None:
    layout = layout_with_image(tmp_path)
    members = layout_members(layout)
    archive = tar_of(tmp_path / "l.tar", members)
    data = bytearray(archive.read_bytes())
    # Rewrite the first member's size field (base-256) to 2**60 bytes.
    header = data.index(b"ustar") - 257
    while data[header + 156 : header + 157] != b"0":  # skip PAX headers
        size = int(data[header + 124 : header + 136].strip(b"\0 ") or b"0", 8)
        header += 512 + -(-size // 512) * 512
    data[header + 124 : header + 136] = b"\x80" + (1 << 60).to_bytes(11, "big")
    # The header checksum covers the size field.
    data[header + 148 : header + 156] = b" " * 8
    checksum = sum(data[header : header + 512])
    data[header + 148 : header + 156] = b"%06o\0 " % checksum
    archive.write_bytes(bytes(data))
    refused(tmp_path / "root", archive, InvalidArgument, "tar")


def test_tar_pax_header_claiming_gigabytes_is_refused_unread(tmp_path: Path) -> None:
    base = reset_peak()
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 4 << 30
    archive = tmp_path / "l.tar"
    with open(archive, "wb") as f:
        f.write(header.tobuf(tarfile.USTAR_FORMAT))
        f.truncate(512 + (4 << 30) + 1024)  # sparse: the "header" reads as zeros
    refused(tmp_path / "root", archive, InvalidArgument, "tar headers larger")
    assert peak() - base < MAX_RSS


def test_tar_with_too_many_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archives, "MAX_MEMBERS", 5)
    layout = layout_with_image(tmp_path)
    extra = [(tarfile.TarInfo(f"junk/{i}"), b"") for i in range(5)]
    archive = tar_of(tmp_path / "l.tar", [*extra, *layout_members(layout)])
    refused(tmp_path / "root", archive, InvalidArgument, "more than 5 tar members")


def test_truncated_tar_at_every_cut(tmp_path: Path) -> None:
    layout = layout_with_image(tmp_path)
    data = tar_of(tmp_path / "full.tar", layout_members(layout)).read_bytes()
    archive = tmp_path / "cut.tar"
    for cut in range(0, len(data), 1531):
        archive.write_bytes(data[:cut])
        root = tmp_path / f"root-{cut}"
        try:
            with deadline():
                do_import(root, archive)
        except CkfsError:
            assert_untouched(root)
        else:
            # Cut only in the end-of-archive blocks: everything is there.
            assert cut > len(data) - 2 * tarfile.RECORDSIZE


# -- the CLI: one line, exit 1, bounded memory -----------------------------------


def test_cli_refuses_a_fifo_layer_in_one_line_with_bounded_memory(tmp_path: Path) -> None:
    layout = layout_with_image(tmp_path)
    replace(top_layer(layout), make_fifo)
    report = tmp_path / "report.json"
    argv = [CKFS, "--root", str(tmp_path / "root"), "import", "--name", NAME, str(layout.root)]
    launcher = [sys.executable, str(LAUNCH), str(BOUND), str(report), str(4 << 30), "--"]
    proc = subprocess.run([*launcher, *argv], capture_output=True, text=True, timeout=3 * BOUND)
    outcome = json.loads(report.read_text())
    assert not outcome["killed"] and outcome["code"] == 1, (outcome, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "not a regular file (FIFO)" in proc.stderr
    assert "internal error" not in proc.stderr
    assert outcome["rss_kib"] * 1024 < MAX_RSS
    assert_untouched(tmp_path / "root")
