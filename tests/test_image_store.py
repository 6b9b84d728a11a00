"""The SQLite image store (ckfs.images.store), with containerd's semantics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, from_bytes
from ckfs.errors import AlreadyExists, InvalidArgument, NotFound
from ckfs.images import Image, ImageStore
from ckfs.metadata.db import DB

FOO = "docker.io/stevvooe/foo:latest"


def _target(seed: bytes, media_type: str = mt.OCI_INDEX) -> Descriptor:
    return Descriptor(media_type, from_bytes(seed), 1234)


T1 = _target(b"one")
T2 = _target(b"two", mt.DOCKER_MANIFEST)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[DB]:
    d = DB(tmp_path / "metadata.db")
    yield d
    d.close()


@pytest.fixture
def store(db: DB) -> ImageStore:
    return ImageStore(db)


def test_seed_example(store: ImageStore) -> None:
    # The design's first example: register a name, get it back, list it.
    digest = Digest.parse("sha256:" + "4" * 64)
    target = Descriptor(mt.OCI_INDEX, digest, 1024)
    before = datetime.now(UTC)
    created = store.create(Image.new(FOO, target, {"team": "x"}))
    assert created.name == FOO and created.target == target
    assert created.created_at == created.updated_at
    assert created.created_at.tzinfo is UTC
    assert before.replace(microsecond=0) <= created.created_at <= datetime.now(UTC)

    got = store.get(FOO)
    assert got == created
    assert store.list() == [got]
    assert store.list([f"name=={FOO}"]) == [got]
    assert store.list([f"target.digest=={digest}"]) == [got]
    assert store.list(["labels.team==x"]) == [got]
    assert store.list(["name~=^docker.io/stevvooe/"]) == [got]
    assert store.list(["name==other"]) == []


def test_get_missing(store: ImageStore) -> None:
    with pytest.raises(NotFound):
        store.get("nope")


def test_list_sorted_and_filters(store: ImageStore) -> None:
    store.create(Image.new("b", T1, {"env": "prod"}))
    store.create(Image.new("a", T2, {"env": "dev", "io.example.x": "1"}))
    store.create(Image.new("c", T1.replace(annotations={"org.opencontainers.image.ref.name": "1"})))

    def names(*filters: str) -> list[str]:
        return [i.name for i in store.list(filters)]

    assert names() == ["a", "b", "c"]
    assert names("labels.env") == ["a", "b"]
    assert names("labels.env==prod") == ["b"]
    assert names("labels.env!=prod") == ["a", "c"]
    assert names('labels."io.example.x"') == ["a"]
    assert names(f"target.mediatype=={mt.DOCKER_MANIFEST}") == ["a"]
    assert names(f"target.digest=={T1.digest}") == ["b", "c"]
    assert names("annotations.org.opencontainers.image.ref.name==1") == ["c"]
    assert names("name==a", "name==c") == ["a", "c"]  # OR
    assert names("name==a,labels.env==prod") == []  # AND
    with pytest.raises(InvalidArgument):
        store.list(["name=a"])


def test_create_exists_and_validation(store: ImageStore) -> None:
    store.create(Image.new("x", T1))
    with pytest.raises(AlreadyExists):
        store.create(Image.new("x", T2))
    assert store.get("x").target == T1  # the failed create changed nothing
    with pytest.raises(InvalidArgument):
        store.create(Image.new("", T1))
    with pytest.raises(InvalidArgument):
        store.create(Image.new("y", T1.replace(size=0)))
    with pytest.raises(InvalidArgument):
        store.create(Image.new("y", T1, {"k": "v" * 5000}))
    with pytest.raises(NotFound):
        store.get("y")


def test_create_drops_empty_labels_and_ignores_given_times(store: ImageStore) -> None:
    old = datetime(2001, 1, 1, tzinfo=UTC)
    img = Image("x", T1, {"a": "1", "b": ""}, created_at=old, updated_at=old)
    created = store.create(img)
    assert created.labels == {"a": "1"}
    assert created.created_at > old


def test_update_without_fieldpaths_replaces_target_and_labels(store: ImageStore) -> None:
    created = store.create(Image.new("x", T1, {"a": "1", "b": "2"}))
    time.sleep(0.002)
    updated = store.update(Image.new("x", T2, {"c": "3"}))
    assert updated.target == T2
    assert updated.labels == {"c": "3"}
    assert updated.created_at == created.created_at
    assert updated.updated_at > created.updated_at
    assert store.get("x") == updated


@pytest.mark.parametrize(
    ("fieldpaths", "target", "labels"),
    [
        pytest.param(["target"], T2, {"a": "1", "b": "2"}, id="target-only"),
        pytest.param(["labels"], T1, {"b": "20", "c": "3"}, id="labels-replaced"),
        pytest.param(["labels.b"], T1, {"a": "1", "b": "20"}, id="one-label"),
        pytest.param(["labels.a"], T1, {"b": "2"}, id="absent-label-deletes"),
        pytest.param(["labels.c", "target"], T2, {"a": "1", "b": "2", "c": "3"}, id="mixed"),
    ],
)
def test_update_fieldpaths(
    store: ImageStore, fieldpaths: list[str], target: Descriptor, labels: dict[str, str]
) -> None:
    store.create(Image.new("x", T1, {"a": "1", "b": "2"}))
    updated = store.update(Image.new("x", T2, {"b": "20", "c": "3"}), fieldpaths)
    assert updated.target == target
    assert updated.labels == labels
    assert store.get("x") == updated


def test_update_empty_label_value_deletes(store: ImageStore) -> None:
    store.create(Image.new("x", T1, {"a": "1", "b": "2"}))
    assert store.update(Image.new("x", T1, {"a": ""}), ["labels.a"]).labels == {"b": "2"}


def test_update_annotations(store: ImageStore) -> None:
    store.create(Image.new("x", T1.replace(annotations={"k": "v", "gone": "x"})))
    new = Image.new("x", T1.replace(annotations={"k": "w"}))
    assert store.update(new, ["annotations.k", "annotations.gone"]).target.annotations == {"k": "w"}


def test_update_errors(store: ImageStore) -> None:
    with pytest.raises(NotFound):
        store.update(Image.new("x", T1))
    store.create(Image.new("x", T1))
    with pytest.raises(InvalidArgument, match="cannot update 'name'"):
        store.update(Image.new("x", T2), ["name"])
    with pytest.raises(InvalidArgument):
        store.update(Image.new("x", T2.replace(size=0)), ["target"])
    assert store.get("x").target == T1


def test_delete(store: ImageStore) -> None:
    store.create(Image.new("x", T1))
    store.delete("x")
    with pytest.raises(NotFound):
        store.get("x")
    with pytest.raises(NotFound):
        store.delete("x")


def test_put_creates_then_moves_target_keeping_labels(store: ImageStore) -> None:
    first = store.put(Image.new("x", T1, {"keep": "1"}))
    assert first.target == T1
    time.sleep(0.002)
    second = store.put(Image.new("x", T2, {"new": "2"}))
    assert second.target == T2
    assert second.labels == {"keep": "1", "new": "2"}
    assert second.created_at == first.created_at
    assert second.updated_at > first.updated_at
    assert store.get("x") == second


def test_tag(store: ImageStore) -> None:
    store.create(Image.new("src", T1, {"a": "1"}))
    tagged = store.tag("src", "dst")
    assert (tagged.name, tagged.target, tagged.labels) == ("dst", T1, {"a": "1"})
    assert [i.name for i in store.list()] == ["dst", "src"]

    store.update(Image.new("src", T2), ["target"])
    with pytest.raises(AlreadyExists):
        store.tag("src", "dst")
    assert store.get("dst").target == T1
    forced = store.tag("src", "dst", force=True)
    assert forced.target == T2
    assert forced.created_at == tagged.created_at

    with pytest.raises(NotFound):
        store.tag("missing", "other")
    assert store.tag("src", "src") == store.get("src")


def test_persists_across_connections(tmp_path: Path) -> None:
    db = DB(tmp_path / "m.db")
    created = ImageStore(db).create(Image.new(FOO, T1, {"a": "1"}))
    db.close()
    db2 = DB(tmp_path / "m.db")
    try:
        assert ImageStore(db2).get(FOO) == created
        row = db2.query("SELECT digest, created_at FROM images WHERE name = ?", (FOO,))[0]
        assert row["digest"] == T1.digest  # the indexed column stays in step
        assert isinstance(row["created_at"], int)
    finally:
        db2.close()


def test_failed_change_rolls_back(store: ImageStore, db: DB) -> None:
    store.create(Image.new("x", T1))
    with pytest.raises(RuntimeError), db.transaction():
        store.put(Image.new("x", T2))
        raise RuntimeError("crash mid-transaction")
    assert store.get("x").target == T1
