"""The image store: names → target descriptors, in SQLite.

An image, to ckfs as to containerd, is nothing but a name pointing at a
descriptor (usually an index or a manifest) plus labels and two times. The
blobs live in the content store; removing a name removes no content (gc does,
once nothing refers to it). Names are stored exactly as given: the CLI
normalizes them with `ckfs.reference` first (``alpine`` →
``docker.io/library/alpine:latest``), the library never guesses.

Every change is one `DB.transaction`, so a crash leaves a name either
pointing at its old target or its new one. Semantics follow containerd's
metadata image store: `update` with field paths replaces only those fields,
a label set to ``""`` is deleted, `create` refuses an existing name.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from ckfs.descriptor import Descriptor
from ckfs.errors import AlreadyExists, InvalidArgument, NotFound
from ckfs.metadata.db import DB, Tx, now_ns
from ckfs.metadata.fields import (
    EPOCH,
    MAX_LABEL_SIZE,
    ns_to_datetime,
    update_labels,
    validate_labels,
)

if TYPE_CHECKING:
    from ckfs.filters import Adaptor

__all__ = ["MAX_LABEL_SIZE", "Image", "ImageStore"]


@dataclasses.dataclass(frozen=True, slots=True)
class Image:
    """A named image: what ``ckfs images ls`` lists."""

    name: str
    target: Descriptor
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: UTC; set by the store, whatever the caller passes.
    created_at: datetime = EPOCH
    updated_at: datetime = EPOCH

    @classmethod
    def new(cls, name: str, target: Descriptor, labels: Mapping[str, str] | None = None) -> Image:
        """An image to hand to `ImageStore.create` or `ImageStore.put`."""
        return cls(name=name, target=target, labels=dict(labels or {}))


class ImageStore:
    """Image names in the ``images`` table of a ckfs metadata database."""

    def __init__(self, db: DB) -> None:
        self.db = db

    def get(self, name: str) -> Image:
        """The image called *name*.

        Raises:
            NotFound: no such image.
        """
        rows = self.db.query("SELECT * FROM images WHERE name = ?", (name,))
        if not rows:
            raise NotFound(f"image {name!r}: not found")
        return _from_row(rows[0])

    def list(self, filters: Sequence[str] = ()) -> list[Image]:
        """All images matching *filters*, sorted by name.

        Filters are containerd's (`ckfs.filters`) over ``name``,
        ``target.digest``, ``target.mediatype``, ``labels.<key>`` and
        ``annotations.<key>`` (the target's annotations); several filters are
        OR'd, none lists everything.

        Raises:
            InvalidArgument: a filter is malformed.
        """
        from ckfs.filters import parse_filters  # its grammar is compiled on first use

        match = parse_filters(filters)
        images = [_from_row(r) for r in self.db.query("SELECT * FROM images ORDER BY name")]
        return [i for i in images if match.match(_adaptor(i))]

    def create(self, image: Image) -> Image:
        """Register a new name; both times are set to now.

        Args:
            image: name, target and labels (empty label values are dropped;
                the given times are ignored).

        Raises:
            InvalidArgument: empty name, a target with size 0 or an empty
                media type, or a label over `MAX_LABEL_SIZE`.
            AlreadyExists: the name is taken (use `update`, `put` or `tag`
                with ``force``).
        """
        with self.db.transaction() as tx:
            return self._create(tx, image)

    def update(self, image: Image, fieldpaths: Sequence[str] = ()) -> Image:
        """Change an existing image; ``updated_at`` becomes now.

        Without *fieldpaths* the target and labels are replaced by
        *image*'s. Otherwise only the paths named change: ``target``,
        ``labels`` (all labels), ``labels.<key>`` (one label; a key absent
        from *image* or set to ``""`` is deleted), ``annotations`` and
        ``annotations.<key>`` (the target's annotations), as containerd.

        Args:
            image: the name to change and the new values.
            fieldpaths: which fields to take from *image*.

        Raises:
            InvalidArgument: an unknown field path, or the result is invalid
                (see `create`).
            NotFound: no image has that name.
        """
        with self.db.transaction() as tx:
            row = _get_row(tx, image.name)
            current = _from_row(row)
            if not fieldpaths:
                updated = dataclasses.replace(current, target=image.target, labels=image.labels)
            else:
                updated = _apply_fieldpaths(current, image, fieldpaths)
            return self._write(tx, updated, created_ns=row["created_at"])

    def delete(self, name: str) -> None:
        """Forget *name*; its content stays until gc.

        Raises:
            NotFound: no such image.
        """
        with self.db.transaction() as tx:
            if tx.execute("DELETE FROM images WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"image {name!r}: not found")

    def put(self, image: Image) -> Image:
        """Point *image.name* at *image.target*, creating the name if needed.

        What import and pull do: the name ends at the target just fetched.
        An existing image keeps its creation time and its labels, except
        those *image* sets.

        Raises:
            InvalidArgument: as `create`.
        """
        with self.db.transaction() as tx:
            try:
                row = _get_row(tx, image.name)
            except NotFound:
                return self._create(tx, image)
            current = _from_row(row)
            labels = {**current.labels, **image.labels}
            updated = dataclasses.replace(current, target=image.target, labels=labels)
            return self._write(tx, updated, created_ns=row["created_at"])

    def tag(self, src: str, dst: str, *, force: bool = False) -> Image:
        """Give the image *src* a second name *dst* (same target and labels).

        Args:
            src: an existing image name.
            dst: the new name.
            force: replace *dst* if it exists (keeping its creation time).

        Raises:
            NotFound: *src* does not exist.
            AlreadyExists: *dst* exists and *force* is false.
            InvalidArgument: *dst* is empty.
        """
        with self.db.transaction() as tx:
            source = _from_row(_get_row(tx, src))
            if src == dst:
                return source
            copy = Image.new(dst, source.target, source.labels)
            try:
                existing = _get_row(tx, dst)
            except NotFound:
                return self._create(tx, copy)
            if not force:
                raise AlreadyExists(f"image {dst!r}: already exists")
            return self._write(tx, copy, created_ns=existing["created_at"])

    # -- helpers ---------------------------------------------------------------

    def _create(self, tx: Tx, image: Image) -> Image:
        if tx.get_row("SELECT 1 FROM images WHERE name = ?", (image.name,)) is not None:
            raise AlreadyExists(f"image {image.name!r}: already exists")
        return self._write(tx, image, created_ns=None)

    def _write(self, tx: Tx, image: Image, *, created_ns: int | None) -> Image:
        """Validate and store *image*: a new row if *created_ns* is None, else an update."""
        labels = {k: v for k, v in image.labels.items() if v != ""}
        _validate(image.name, image.target, labels)
        now = now_ns()
        insert = created_ns is None
        if created_ns is None:
            created_ns = now
        params = (
            json.dumps(image.target.to_json(), sort_keys=True),
            str(image.target.digest),
            json.dumps(labels, sort_keys=True),
            created_ns,
            now,
            image.name,
        )
        if insert:
            tx.execute(
                "INSERT INTO images (target, digest, labels, created_at, updated_at, name) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                params,
            )
        else:
            tx.execute(
                "UPDATE images SET target = ?, digest = ?, labels = ?, created_at = ?, "
                "updated_at = ? WHERE name = ?",
                params,
            )
        return Image(
            name=image.name,
            target=image.target,
            labels=labels,
            created_at=ns_to_datetime(created_ns),
            updated_at=ns_to_datetime(now),
        )


def _get_row(tx: Tx, name: str) -> sqlite3.Row:
    row = tx.get_row("SELECT * FROM images WHERE name = ?", (name,))
    if row is None:
        raise NotFound(f"image {name!r}: not found")
    return row


def _apply_fieldpaths(current: Image, image: Image, fieldpaths: Sequence[str]) -> Image:
    """containerd's field-path update: take only the named fields from *image*."""
    target = current.target
    labels, others = update_labels(current.labels, image.labels, fieldpaths)
    annotations = dict(current.target.annotations)
    for path in others:
        if path.startswith("annotations."):
            key = path.removeprefix("annotations.")
            annotations[key] = image.target.annotations.get(key, "")
        elif path == "target":
            target = image.target
            annotations = dict(image.target.annotations)
        elif path == "annotations":
            annotations = dict(image.target.annotations)
        else:
            raise InvalidArgument(f"cannot update {path!r} field on image {current.name!r}")
    annotations = {k: v for k, v in annotations.items() if v != ""}
    return dataclasses.replace(
        current, target=target.replace(annotations=annotations), labels=labels
    )


def _validate(name: str, target: Descriptor, labels: Mapping[str, str]) -> None:
    if not name:
        raise InvalidArgument("image name must not be empty")
    if target.size <= 0:
        raise InvalidArgument(f"image {name!r}: target size must be greater than zero")
    if not target.media_type:
        raise InvalidArgument(f"image {name!r}: target media type must be set")
    validate_labels(labels, f"image {name!r}")


def _adaptor(image: Image) -> Adaptor:
    """containerd's image adaptor: name, target.digest/mediatype, labels, annotations."""
    fields = {
        "name": image.name,
        "target.digest": str(image.target.digest),
        "target.mediatype": image.target.media_type,
    }

    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if fieldpath and fieldpath[0] in ("labels", "annotations"):
            source = image.labels if fieldpath[0] == "labels" else image.target.annotations
            value = source.get(".".join(fieldpath[1:])) if len(fieldpath) > 1 else None
        else:
            value = fields.get(".".join(fieldpath))
        return ("", False) if value is None else (value, True)

    return adapt


def _from_row(row: sqlite3.Row) -> Image:
    return Image(
        name=row["name"],
        target=Descriptor.from_json(
            json.loads(row["target"]), where=f"image {row['name']!r}: target"
        ),
        labels=json.loads(row["labels"]),
        created_at=ns_to_datetime(row["created_at"]),
        updated_at=ns_to_datetime(row["updated_at"]),
    )
