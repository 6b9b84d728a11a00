"""A pull's progress, blob by blob: the events every face reports.

The fetcher updates a `BlobProgress` per blob and calls ``on_event`` at each
change of its `BlobState`; ``ckfs pull`` draws them, ``--json`` prints
`BlobProgress.to_json`, and ckfsd streams the same states to a client,
which rebuilds `BlobProgress` objects to draw them the same way. Nothing
here imports the stores, trio or httpx, so such a client stays light.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

from ckfs.descriptor import Descriptor

__all__ = ["BlobProgress", "BlobState", "OnEvent"]


class BlobState(enum.StrEnum):
    """Where one blob stands; every change is reported to ``on_event``."""

    #: Not looked at yet.
    QUEUED = "queued"
    #: Already in the content store; nothing to do.
    EXISTS = "exists"
    #: Another writer (usually another ckfs process) holds its ref; waiting.
    WAITING = "waiting"
    #: Continuing an ingest from `BlobProgress.offset` with a Range request.
    RESUMING = "resuming"
    #: Transferring from the start.
    DOWNLOADING = "downloading"
    #: Committed: size and digest checked.
    VERIFIED = "verified"
    #: Deliberately not fetched (non-distributable layer); see the note.
    SKIPPED = "skipped"
    #: The fetch of this blob failed; the note says why.
    FAILED = "failed"


@dataclasses.dataclass(slots=True, eq=False)
class BlobProgress:
    """Live progress of one blob, updated by the fetcher as it works.

    Displays read these fields whenever they redraw; ``on_event`` is called
    with the object right after each change of `state`, on the trio thread.
    Copy what you need: the same object keeps changing.

    Attributes:
        desc: the blob.
        kind: ``index``, ``manifest``, ``config``, ``layer`` or ``blob``.
        state: see `BlobState`.
        offset: bytes in the ingest (or the blob, once verified).
        fetched: bytes received from the registry by this fetch.
        started: `time.monotonic` when the current transfer began (for rates).
        note: why it was skipped or failed, or what a resume did.
        source: the host that served its bytes (a mirror, say), once known.
    """

    desc: Descriptor
    kind: str
    state: BlobState = BlobState.QUEUED
    offset: int = 0
    fetched: int = 0
    started: float = 0.0
    note: str = ""
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        """This state change as one event: what ``--json`` prints and ckfsd streams."""
        out: dict[str, Any] = {
            "event": "blob",
            "state": str(self.state),
            "kind": self.kind,
            "digest": str(self.desc.digest),
            "media_type": self.desc.media_type,
            "size": self.desc.size,
            "offset": self.offset,
            "fetched": self.fetched,
        }
        if self.note:
            out["note"] = self.note
        return out


#: Told about a blob right after each change of its state.
OnEvent = Callable[[BlobProgress], None]
