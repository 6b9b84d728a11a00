"""The SQLite schema, as an ordered list of migrations.

``PRAGMA user_version`` records how many migrations a database has seen; a
new version only ever appends to `MIGRATIONS`, never edits a shipped entry,
so every existing ``metadata.db`` can be brought forward in place.

Columns (times are UTC nanoseconds since the epoch, like containerd's; JSON
columns hold the exact OCI field names):

images
    name        normalized reference, the primary key (``docker.io/library/alpine:latest``)
    target      JSON descriptor the name points at (mediaType, digest, size,
                annotations, platform, urls)
    digest      the target's digest again, so "which names point here?" is an index lookup
    labels      JSON object of string labels (``{}`` when none)
    created_at  when the name was first registered
    updated_at  last change of target or labels

content
    digest      blob digest; a row exists only while the blob has labels or
                was touched through `update`. The blob itself is the file
                under ``content/blobs``; the file is the truth for presence.
    labels      JSON object of labels (GC references live here:
                ``containerd.io/gc.ref.content.*``)
    updated_at  last label change
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: images and content labels
    """
    CREATE TABLE images (
        name       TEXT PRIMARY KEY NOT NULL,
        target     TEXT NOT NULL,
        digest     TEXT NOT NULL,
        labels     TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX images_digest ON images (digest);
    CREATE TABLE content (
        digest     TEXT PRIMARY KEY NOT NULL,
        labels     TEXT NOT NULL DEFAULT '{}',
        updated_at INTEGER NOT NULL
    );
    """,
)
