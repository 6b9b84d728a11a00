"""Where ckfs keeps its state, and the stores opened on it.

One root directory holds everything: ``metadata.db`` (SQLite), ``content/``
(blobs and ingests), ``snapshots/<snapshotter>/`` and ``locks/``. Opening is
lazy so a command pays only for the stores it touches.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ckfs.metadata.db import DB

if TYPE_CHECKING:
    from ckfs.content import ContentStore
    from ckfs.images import ImageStore
    from ckfs.snapshots import InitContext, Snapshotter

__all__ = ["CACHE_MAX_ENV", "State"]


#: The chunk cache's bound, for whoever starts the root's FUSE server (a
#: size, as ``ckfsd --cache-max``; `ckfs.options.parse_size`).
CACHE_MAX_ENV = "CKFS_CACHE_MAX"


class State:
    """The stores under one root, opened on first use.

    Args:
        root: the state root.
        options: snapshotter settings (`ckfs.snapshots.InitContext.options`),
            over those the environment gives (`CACHE_MAX_ENV` as ``cache_max``).
    """

    def __init__(self, root: Path, *, options: Mapping[str, str] | None = None) -> None:
        self.root = root
        self._options = dict(options or {})
        self._snapshotters: dict[str, Snapshotter] = {}

    @functools.cached_property
    def db(self) -> DB:
        return DB(self.root / "metadata.db")

    @functools.cached_property
    def content(self) -> ContentStore:
        from ckfs.content import ContentStore  # here: snapshot commands never load it

        return ContentStore(self.root / "content", self.db)

    @functools.cached_property
    def images(self) -> ImageStore:
        from ckfs.images import ImageStore

        return ImageStore(self.db)

    @property
    def lock_dir(self) -> Path:
        return self.root / "locks"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def snapshotter(self, name: str) -> Snapshotter:
        """The snapshotter *name* on this root (InvalidArgument if unknown)."""
        if name not in self._snapshotters:
            import snapshotters

            self._snapshotters[name] = snapshotters.get(name, self._init_context())
        return self._snapshotters[name]

    def _init_context(self) -> InitContext:
        """What a snapshotter factory gets: the one place it is built.

        The registry options are the root's defaults, as `ckfs.provide`
        pulls with: a snapshotter reading registries lazily reaches them
        the way a pull on this root would.
        """
        import dataclasses

        from ckfs.options import DEFAULTS
        from ckfs.remotes.hosts import default_hosts_dirs
        from ckfs.snapshots import InitContext

        registry = dataclasses.replace(DEFAULTS, hosts_dirs=tuple(default_hosts_dirs(self.root)))
        return InitContext(
            root=self.root,
            db=self.db,
            content=lambda: self.content,
            registry=registry,
            cache_dir=self.cache_dir,
            options=self._snapshotter_options(),
        )

    def _snapshotter_options(self) -> dict[str, str]:
        from_env = {"cache_max": os.environ.get(CACHE_MAX_ENV, "")}
        return {k: v for k, v in {**from_env, **self._options}.items() if v}

    @contextlib.contextmanager
    def gc_lock(self, *, exclusive: bool = False) -> Iterator[None]:
        """Hold the collector's lock: shared for writers, exclusive for gc.

        A writer (import, pull, unpack, mount) commits blobs and snapshots
        before they become reachable from an image; holding this shared for
        the whole operation keeps gc from collecting them in between.
        """
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_dir / "gc", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def close(self) -> None:
        for sn in self._snapshotters.values():
            sn.close()
        if "db" in self.__dict__:
            self.db.close()
