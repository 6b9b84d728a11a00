"""Where ckfs keeps its state, and the stores opened on it.

One root directory holds everything: ``metadata.db`` (SQLite), ``content/``
(blobs and ingests) and, later, ``snapshots/``. Opening is lazy so a command
pays only for the stores it touches.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ckfs.content import ContentStore
from ckfs.images import ImageStore
from ckfs.metadata.db import DB

__all__ = ["State", "default_root"]


def default_root() -> Path:
    """``$CKFS_ROOT``; else ``/var/lib/ckfs`` for root, ``$XDG_DATA_HOME/ckfs`` otherwise."""
    if env := os.environ.get("CKFS_ROOT"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/ckfs")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(xdg) / "ckfs"


class State:
    """The stores under one root, opened on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @functools.cached_property
    def db(self) -> DB:
        return DB(self.root / "metadata.db")

    @functools.cached_property
    def content(self) -> ContentStore:
        return ContentStore(self.root / "content", self.db)

    @functools.cached_property
    def images(self) -> ImageStore:
        return ImageStore(self.db)

    def close(self) -> None:
        if "db" in self.__dict__:
            self.db.close()
