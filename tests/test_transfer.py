"""Import/export against layouts written byte by byte: every bad input fails
cleanly and leaves the stores exactly as they were."""

from __future__ import annotations

import gzip
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from ckfs.errors import CkfsError, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from ckfs.remotes.archives import open_source
from ckfs.state import State
from ckfs.transfer import export_images, import_source
from tests.layouts import Layout, docker_save, layer_tar

NAME = "docker.io/stevvooe/foo:latest"


@pytest.fixture
def state(tmp_path: Path) -> State:
    s = State(tmp_path / "root")
    yield s  # type: ignore[misc]
    s.close()


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "layout")


def two_layers(layout: Layout) -> dict[str, object]:
    return layout.image([{"etc/hello": b"hello\n"}, {"srv/data": b"x" * 100_000}])


async def do_import(state: State, path: Path, name: str | None = NAME) -> object:
    source = open_source(path)
    try:
        return await import_source(source, state.content, state.images, name=name)
    finally:
        source.close()


def assert_untouched(state: State) -> None:
    assert state.images.list() == []
    assert list(state.content.walk()) == []
    assert state.content.list_statuses() == []


async def test_import_registers_name_and_every_blob(state: State, layout: Layout) -> None:
    entry = two_layers(layout)
    report = await do_import(state, layout.root, "stevvooe/foo")
    assert [i.name for i in report.images] == [NAME]  # type: ignore[attr-defined]
    image = state.images.get(NAME)
    assert image.target.digest == entry["digest"]
    assert report.new_blobs == 4  # type: ignore[attr-defined]
    assert sorted(i.digest for i in state.content.walk()) == sorted(
        "sha256:" + p.name for p in (layout.root / "blobs/sha256").iterdir()
    )


async def test_manifest_carries_gc_labels(state: State, layout: Layout) -> None:
    entry = two_layers(layout)
    await do_import(state, layout.root)
    labels = state.content.info(entry["digest"]).labels  # type: ignore[arg-type]
    m = layout.manifest()
    assert labels["containerd.io/gc.ref.content.config"] == m["config"]["digest"]
    assert labels["containerd.io/gc.ref.content.l.1"] == m["layers"][1]["digest"]


async def test_second_import_copies_nothing(state: State, layout: Layout) -> None:
    two_layers(layout)
    await do_import(state, layout.root)
    report = await do_import(state, layout.root)
    assert report.new_blobs == 0  # type: ignore[attr-defined]


async def test_import_from_tar(state: State, layout: Layout, tmp_path: Path) -> None:
    two_layers(layout)
    await do_import(state, layout.tar(tmp_path / "l.tar"))
    assert state.images.get(NAME)


async def test_bare_tag_needs_a_name(state: State, layout: Layout) -> None:
    two_layers(layout)
    with pytest.raises(InvalidArgument, match="--name"):
        await do_import(state, layout.root, None)
    assert_untouched(state)


async def test_several_images_take_their_tags(state: State, layout: Layout) -> None:
    layout.image([{"a": b"1"}], ref="v1")
    layout.image([{"a": b"2"}], ref="v2")
    await do_import(state, layout.root, "localhost:5000/app")
    assert [i.name for i in state.images.list()] == [
        "localhost:5000/app:v1",
        "localhost:5000/app:v2",
    ]


async def test_full_reference_in_layout_is_used(state: State, layout: Layout) -> None:
    layout.image([{"a": b"1"}], ref="quay.io/org/app:1.0")
    await do_import(state, layout.root, None)
    assert state.images.get("quay.io/org/app:1.0")


def _missing_layer(layout: Layout) -> None:
    layout.blob_path(layout.manifest()["layers"][1]["digest"]).unlink()


def _corrupt_layer(layout: Layout) -> None:
    p = layout.blob_path(layout.manifest()["layers"][-1]["digest"])
    data = bytearray(p.read_bytes())
    data[-20] ^= 0xFF
    p.write_bytes(bytes(data))


def _rewrite_manifest(layout: Layout, change: Callable[[dict[str, object]], None]) -> None:
    m = layout.manifest()
    change(m)
    body = json.dumps(m).encode()
    layout.manifests[0] = {**layout.manifests[0], "digest": layout.blob(body), "size": len(body)}
    layout.write_index()


def _wrong_size(layout: Layout) -> None:
    def grow(m: dict[str, object]) -> None:
        m["layers"][0]["size"] += 1  # type: ignore[index]

    _rewrite_manifest(layout, grow)


def _unknown_media_type(layout: Layout) -> None:
    def odd(m: dict[str, object]) -> None:
        m["layers"][0]["mediaType"] = "application/x-not-a-layer"  # type: ignore[index]

    _rewrite_manifest(layout, odd)


def _invalid_manifest_json(layout: Layout) -> None:
    body = b'{"schemaVersion": 2, "config": '
    layout.manifests[0] = {**layout.manifests[0], "digest": layout.blob(body), "size": len(body)}
    layout.write_index()


def _invalid_index_json(layout: Layout) -> None:
    (layout.root / "index.json").write_text("{not json")


def _index_digest_invalid(layout: Layout) -> None:
    layout.manifests[0]["digest"] = "md5:abc"
    layout.write_index()


def _schema1(layout: Layout) -> None:
    body = json.dumps({"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}).encode()
    media_type = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    layout.manifests[0] = {"mediaType": media_type, "digest": layout.blob(body), "size": len(body)}
    layout.write_index()


def _config_not_json(layout: Layout) -> None:
    def bad_config(m: dict[str, object]) -> None:
        data = b"\x00garbage"
        m["config"] = {  # type: ignore[index]
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": layout.blob(data),
            "size": len(data),
        }

    _rewrite_manifest(layout, bad_config)


BAD_INPUTS: list[tuple[str, Callable[[Layout], None], type[CkfsError], str]] = [
    ("missing blob", _missing_layer, NotFound, "is missing"),
    ("wrong digest", _corrupt_layer, DataLoss, "digest mismatch"),
    ("wrong size", _wrong_size, DataLoss, "size"),
    ("unknown media type", _unknown_media_type, InvalidArgument, "application/x-not-a-layer"),
    ("invalid manifest JSON", _invalid_manifest_json, InvalidArgument, "JSON"),
    ("invalid index.json", _invalid_index_json, InvalidArgument, "index.json"),
    ("invalid digest", _index_digest_invalid, InvalidArgument, "md5"),
    ("schema 1", _schema1, InvalidArgument, "schema 1"),
    ("config not JSON", _config_not_json, InvalidArgument, "config"),
]


@pytest.mark.parametrize(
    ("spoil", "error", "words"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
async def test_bad_input_changes_nothing(
    state: State,
    layout: Layout,
    spoil: Callable[[Layout], None],
    error: type[CkfsError],
    words: str,
) -> None:
    two_layers(layout)
    spoil(layout)
    with pytest.raises(error, match=words) as info:
        await do_import(state, layout.root)
    assert "\n" not in str(info.value)
    assert_untouched(state)


async def test_import_that_cannot_fit_fails_before_writing(
    state: State, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    two_layers(layout)
    monkeypatch.setattr(state.content, "free_bytes", lambda: 10)
    with pytest.raises(FailedPrecondition, match=r"the import needs .* MB free on"):
        await do_import(state, layout.root)
    assert_untouched(state)


async def test_truncated_tar(state: State, layout: Layout, tmp_path: Path) -> None:
    two_layers(layout)
    archive = layout.tar(tmp_path / "l.tar")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises((InvalidArgument, DataLoss, NotFound)):
        await do_import(state, archive)
    assert_untouched(state)


async def test_bad_input_keeps_earlier_images(state: State, layout: Layout, tmp_path: Path) -> None:
    two_layers(layout)
    await do_import(state, layout.root)
    before = sorted(i.digest for i in state.content.walk())
    other = Layout(tmp_path / "other")
    other.image([{"x": b"y"}])
    _corrupt_layer(other)
    with pytest.raises(DataLoss):
        await do_import(state, other.root, "other")
    assert [i.name for i in state.images.list()] == [NAME]
    assert sorted(i.digest for i in state.content.walk()) == before


async def test_docker_save_archive(state: State, tmp_path: Path) -> None:
    root = docker_save(tmp_path / "save").root
    await do_import(state, root, None)
    image = state.images.get("docker.io/library/busybox:1")
    assert image.target.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    # A layer that is not what the config's diff ID says is refused.
    (root / "l1/layer.tar").write_bytes(layer_tar({"b": b"evil"}))
    fresh = State(tmp_path / "fresh")
    with pytest.raises(DataLoss):
        await do_import(fresh, root, "other:1")
    assert_untouched(fresh)
    fresh.close()


async def test_export_round_trip(state: State, layout: Layout, tmp_path: Path) -> None:
    entry = two_layers(layout)
    await do_import(state, layout.root)
    out = tmp_path / "out.tar"
    export_images(state.content, state.images, [NAME], out)
    with tarfile.open(out) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        names = set(tar.getnames())
    assert index["manifests"][0]["digest"] == entry["digest"]
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "latest"
    assert {f"blobs/sha256/{p.name}" for p in (layout.root / "blobs/sha256").iterdir()} <= names
    again = State(tmp_path / "again")
    await do_import(again, out, None)
    assert again.images.get(NAME).target.digest == entry["digest"]
    again.close()


async def test_export_of_incomplete_image_fails_and_leaves_no_file(
    state: State, layout: Layout, tmp_path: Path
) -> None:
    two_layers(layout)
    await do_import(state, layout.root)
    state.content.delete(layout.manifest()["layers"][0]["digest"])
    out = tmp_path / "out.tar"
    with pytest.raises(NotFound, match="missing"):
        export_images(state.content, state.images, [NAME], out)
    assert list(tmp_path.glob("*out.tar*")) == []


def test_gzip_is_deterministic() -> None:
    # The layouts above rely on it: the same files give the same digest.
    first, again = layer_tar({"a": b"1"}), layer_tar({"a": b"1"})
    assert gzip.compress(first, mtime=0) == gzip.compress(again, mtime=0)
