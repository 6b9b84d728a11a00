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

snapshots
    id          snapshot identifier, never reused (AUTOINCREMENT): it names the
                snapshot's directory ``snapshots/<snapshotter>/<id>``, so an old
                directory whose removal failed can never be mistaken for a new
                snapshot's
    snapshotter which snapshotter owns the row (``overlayfs``, ``native``, ...);
                each has its own key space
    key         the active or view snapshot's key, or the committed snapshot's
                name: keys and names share one space, (snapshotter, key) is unique
    parent_id   id of the committed parent, NULL for none; a parent with
                children cannot be deleted (the foreign key backs the check)
    kind        ``view``, ``active`` or ``committed``
    labels      JSON object of string labels (``{}`` when none)
    size        bytes used by the snapshot's own directory, measured at commit;
                NULL while active or view (those are measured on demand)
    inodes      inodes used likewise; NULL while active or view
    created_at  creation, or the commit for a committed snapshot (as containerd)
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
    # 2: snapshots of every snapshotter
    """
    CREATE TABLE snapshots (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        snapshotter TEXT NOT NULL,
        key         TEXT NOT NULL,
        parent_id   INTEGER REFERENCES snapshots (id),
        kind        TEXT NOT NULL CHECK (kind IN ('view', 'active', 'committed')),
        labels      TEXT NOT NULL DEFAULT '{}',
        size        INTEGER,
        inodes      INTEGER,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        UNIQUE (snapshotter, key)
    );
    CREATE INDEX snapshots_parent ON snapshots (parent_id);
    """,
)
