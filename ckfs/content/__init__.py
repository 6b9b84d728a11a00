"""The content store: image blobs addressed by digest.

Writes go through resumable, locked ingests and become blobs only after their
size and digest are verified; see `ContentStore` for the semantics (those of
containerd's local store) and `write_blob` for the common copy-and-commit.
"""

from ckfs.content.reader import ReaderAt
from ckfs.content.store import ContentStore, write_blob
from ckfs.content.types import Info, Status
from ckfs.content.writer import Writer

__all__ = ["ContentStore", "Info", "ReaderAt", "Status", "Writer", "write_blob"]
