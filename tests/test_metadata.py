"""The SQLite layer: WAL, forward-only migrations, all-or-nothing transactions."""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import pytest

from ckfs import errors
from ckfs import mediatypes as mt
from ckfs.content.store import ContentStore, write_blob
from ckfs.content.types import Info as ContentInfo
from ckfs.descriptor import Descriptor
from ckfs.digest import from_bytes
from ckfs.images import Image, ImageStore
from ckfs.metadata.db import DB
from ckfs.metadata.fields import EPOCH, MAX_LABEL_SIZE, update_labels
from ckfs.metadata.schema import MIGRATIONS
from ckfs.snapshots import Info as SnapshotInfo
from ckfs.snapshots import Kind
from snapshotters.native import NativeSnapshotter


def test_new_database_is_wal_and_current(tmp_path: Path) -> None:
    db = DB(tmp_path / "m.db")
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"
    assert db.query("PRAGMA user_version")[0][0] == len(MIGRATIONS)
    db.close()
    # Reopening migrates nothing and keeps data.
    db = DB(tmp_path / "m.db")
    assert db.query("PRAGMA user_version")[0][0] == len(MIGRATIONS)
    db.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db")
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(errors.FailedPrecondition, match="newer"):
        DB(tmp_path / "m.db")


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    db = DB(tmp_path / "m.db")
    with pytest.raises(RuntimeError), db.transaction() as tx:
        tx.execute("INSERT INTO content (digest, labels, updated_at) VALUES ('d', '{}', 1)")
        raise RuntimeError("boom")
    assert db.query("SELECT count(*) FROM content")[0][0] == 0
    with db.transaction() as tx, db.transaction() as inner:
        # Nested use joins the outer transaction.
        inner.execute("INSERT INTO content (digest, labels, updated_at) VALUES ('d', '{}', 1)")
        assert tx.get_row("SELECT digest FROM content")[0] == "d"  # type: ignore[index]
    assert db.query("SELECT count(*) FROM content")[0][0] == 1
    db.close()


# -- Label field paths: one rule for content, images and snapshots ------------------

#: ``(current, new, fieldpaths, expected)``: containerd's update of labels.
LABEL_UPDATES: list[tuple[dict[str, str], dict[str, str], list[str], dict[str, str]]] = [
    ({"a": "1", "b": "2"}, {"c": "3"}, [], {"c": "3"}),  # no paths: replace all
    ({"a": "1", "b": "2"}, {"c": "3"}, ["labels"], {"c": "3"}),
    ({"a": "1"}, {"b": "2", "c": ""}, ["labels"], {"b": "2"}),  # "" is never stored
    ({"a": "1", "b": "2"}, {"a": "9", "c": "3"}, ["labels.a"], {"a": "9", "b": "2"}),
    ({"a": "1", "b": "2"}, {}, ["labels.a"], {"b": "2"}),  # absent deletes
    ({"a": "1", "b": "2"}, {"a": ""}, ["labels.a"], {"b": "2"}),  # empty deletes
    ({"a": "1"}, {}, ["labels.gone"], {"a": "1"}),
    ({"a": "1"}, {"x.y": "z"}, ["labels.x.y"], {"a": "1", "x.y": "z"}),  # dots in the key
    ({"a": "1"}, {"b": "2"}, ["labels.a", "labels.b"], {"b": "2"}),
    ({"a": "1"}, {"b": "2"}, ["labels", "labels.a"], {"b": "2"}),
]

#: Paths no store accepts: ``labels.`` names the empty key, which no label has.
BAD_LABEL_PATHS = ["labels.", "labelsx", "label", "size", "bogus"]


class _LabelledStore(Protocol):
    def labels(self) -> Mapping[str, str]: ...
    def update(self, new: Mapping[str, str], fieldpaths: list[str]) -> None: ...


def _content_store(root: Path, db: DB, seed: Mapping[str, str]) -> _LabelledStore:
    data = b"labelled blob"
    d = from_bytes(data)
    cs = ContentStore(root / "content", db)
    write_blob(cs, "r", io.BytesIO(data), Descriptor("application/octet-stream", d, len(data)))
    cs.update(ContentInfo(d, len(data), EPOCH, EPOCH, seed))

    class Adapter:
        def labels(self) -> Mapping[str, str]:
            return cs.info(d).labels

        def update(self, new: Mapping[str, str], fieldpaths: list[str]) -> None:
            cs.update(ContentInfo(d, len(data), EPOCH, EPOCH, new), fieldpaths)

    return Adapter()


def _image_store(root: Path, db: DB, seed: Mapping[str, str]) -> _LabelledStore:
    target = Descriptor(mt.OCI_INDEX, from_bytes(b"index"), 100)
    images = ImageStore(db)
    images.create(Image.new("x", target, seed))

    class Adapter:
        def labels(self) -> Mapping[str, str]:
            return images.get("x").labels

        def update(self, new: Mapping[str, str], fieldpaths: list[str]) -> None:
            images.update(Image.new("x", target, new), fieldpaths)

    return Adapter()


def _snapshot_store(root: Path, db: DB, seed: Mapping[str, str]) -> _LabelledStore:
    sn = NativeSnapshotter(root / "root", db)  # no mounts: metadata only
    sn.prepare("k", labels=seed)

    class Adapter:
        def labels(self) -> Mapping[str, str]:
            return sn.stat("k").labels

        def update(self, new: Mapping[str, str], fieldpaths: list[str]) -> None:
            sn.update(SnapshotInfo(kind=Kind.ACTIVE, name="k", labels=new), fieldpaths)

    return Adapter()


LABELLED_STORES = {"content": _content_store, "images": _image_store, "snapshots": _snapshot_store}


@pytest.fixture(params=list(LABELLED_STORES))
def labelled(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[Mapping[str, str]], _LabelledStore]]:
    """A factory of one store's object, seeded with the labels given."""
    db = DB(tmp_path / "metadata.db")
    yield lambda seed: LABELLED_STORES[request.param](tmp_path, db, seed)
    db.close()


@pytest.mark.parametrize(("current", "new", "fieldpaths", "expected"), LABEL_UPDATES)
def test_label_fieldpaths_agree_across_stores(
    labelled: Callable[[Mapping[str, str]], _LabelledStore],
    current: dict[str, str],
    new: dict[str, str],
    fieldpaths: list[str],
    expected: dict[str, str],
) -> None:
    assert update_labels(current, new, fieldpaths) == (expected, [])
    store = labelled(current)
    store.update(new, fieldpaths)
    assert dict(store.labels()) == expected


@pytest.mark.parametrize("path", BAD_LABEL_PATHS)
def test_label_fieldpaths_refused_alike(
    labelled: Callable[[Mapping[str, str]], _LabelledStore], path: str
) -> None:
    store = labelled({"a": "1"})
    with pytest.raises(errors.InvalidArgument, match=f"cannot update {path!r} field"):
        store.update({"": "x", "a": "2"}, ["labels.a", path])
    assert dict(store.labels()) == {"a": "1"}  # all or nothing


def test_label_too_large_changes_nothing(
    labelled: Callable[[Mapping[str, str]], _LabelledStore],
) -> None:
    store = labelled({"a": "1"})
    with pytest.raises(errors.InvalidArgument):
        store.update({"b": "x" * MAX_LABEL_SIZE}, ["labels.b"])
    assert dict(store.labels()) == {"a": "1"}


def test_update_labels_hands_back_other_paths_in_order() -> None:
    labels, others = update_labels(
        {"a": "1"}, {"a": "2"}, ["target", "labels.a", "annotations.k", "labels."]
    )
    assert labels == {"a": "2"}
    assert others == ["target", "annotations.k", "labels."]
