"""The ingest writer: hash while writing, verify, then commit atomically.

A `Writer` owns one ingest (see `ckfs.content.ingest` for the directory
layout) for as long as it is open: it holds the ref's lock, appends to
``data`` while feeding a running digester, and on `Writer.commit` checks
size and digest before the bytes become visible as a blob. Until then the
bytes exist only under the ingest, never under their digest, which is what
lets every reader of ``blobs/`` trust what it finds.

Lifecycle::

    w = store.writer(ref, total=..., expected=...)   # lock; resume if data exists
    w.write(...) ...                                  # w.offset grows
    w.commit(size, expected, labels)                  # verify, rename, forget ingest
    w.close()                                         # (or: leave it resumable)

`close` without `commit` keeps the ingest so a later writer on the same ref
resumes at `Writer.offset`; `abort` (or `ContentStore.abort`) throws it away.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from ckfs.content import ingest
from ckfs.content.fsutil import hash_fd, start_writeback
from ckfs.content.types import Status, ns_to_datetime, validate_labels
from ckfs.digest import Digest, Digester
from ckfs.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument
from ckfs.metadata.db import now_ns

if TYPE_CHECKING:
    from ckfs.content.store import ContentStore

__all__ = ["Writer"]

#: Default algorithm when the caller does not say what digest to expect.
DEFAULT_ALGORITHM = "sha256"

#: Bytes written between two requests to the kernel to start writing them to
#: disk (`fsutil.start_writeback`), so that a large blob's commit does not
#: wait for all of it at once. Small blobs never reach it.
WRITEBACK_BYTES = 8 << 20


class Writer:
    """Writes one blob through its ingest; made by `ContentStore.writer`.

    A writer is not itself thread-safe: use it from one thread at a time
    (handing it from a worker thread to another thread between calls is
    fine). Different writers are independent and may run in parallel;
    hashing and writing release the GIL.

    Attributes:
        ref: the ingest's name, as given to `ContentStore.writer`.
    """

    def __init__(
        self,
        store: ContentStore,
        ref: str,
        path: Path,
        *,
        total: int | None,
        expected: Digest | None,
    ) -> None:
        """Lock *ref*'s ingest at *path* and open or resume it.

        Not for direct use: `ContentStore.writer` checks its arguments first.

        Raises:
            Unavailable: another writer holds the ref.
            FailedPrecondition: the existing ingest was started for a different
                total size or expected digest.
        """
        self._store = store
        self.ref = ref
        self._path = path
        self._fd = -1
        self._lock_fd = -1
        self._lock_fd = ingest.acquire(path, ref, create=True)
        try:
            self._open(total, expected)
        except BaseException:
            self._release()
            raise

    def _open(self, total: int | None, expected: Digest | None) -> None:
        data = self._path / ingest.DATA
        try:
            fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        if fd < 0:
            # New ingest: metadata first, data last (data marks it complete).
            now = now_ns()
            try:
                ingest.write_meta(self._path, ingest.REF, self.ref)
                for name, value in ((ingest.TOTAL, total), (ingest.EXPECTED, expected)):
                    if value:
                        ingest.write_meta(self._path, name, str(value))
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self._path / name)
                ingest.write_meta(self._path, ingest.STARTED_AT, str(now))
                ingest.write_meta(self._path, ingest.UPDATED_AT, str(now))
                flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                self._fd = os.open(data, flags, 0o644)
            except BaseException:
                # A half-made ingest (a full disk, say) holds no bytes worth
                # resuming: leave nothing behind.
                ingest.remove(self._path)
                raise
            self._total = total or 0
            self._expected = expected
            self._started_ns = self._updated_ns = now
            self._digester = Digester(expected.algorithm if expected else DEFAULT_ALGORITHM)
            self._offset = self._written_back = 0
            return

        self._fd = fd
        stored_total = ingest.read_int(self._path, ingest.TOTAL) or 0
        stored_expected = ingest.read_expected(self._path)
        if total and stored_total and total != stored_total:
            raise FailedPrecondition(
                f"ref {self.ref}: ingest was started for {stored_total} bytes, not {total}"
            )
        if expected and stored_expected and expected != stored_expected:
            raise FailedPrecondition(
                f"ref {self.ref}: ingest was started for {stored_expected}, not {expected}"
            )
        if total and not stored_total:
            ingest.write_meta(self._path, ingest.TOTAL, str(total))
        if expected and not stored_expected:
            ingest.write_meta(self._path, ingest.EXPECTED, str(expected))
        if ingest.read_meta(self._path, ingest.REF) != self.ref:
            ingest.write_meta(self._path, ingest.REF, self.ref)
        self._total = total or stored_total
        self._expected = expected or stored_expected
        st = os.fstat(fd)
        self._started_ns = ingest.read_int(self._path, ingest.STARTED_AT) or st.st_mtime_ns
        # A writer that crashed never saved updatedat; data's mtime still
        # tells when bytes last arrived.
        saved = ingest.read_int(self._path, ingest.UPDATED_AT) or self._started_ns
        self._updated_ns = max(saved, st.st_mtime_ns)
        # Resuming: rebuild the running digest from what is already there.
        algorithm = self._expected.algorithm if self._expected else DEFAULT_ALGORITHM
        self._digester, self._offset = hash_fd(fd, algorithm)
        self._written_back = self._offset
        os.lseek(fd, self._offset, os.SEEK_SET)

    # -- state ------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Bytes written so far, including those of a resumed ingest."""
        return self._offset

    @property
    def closed(self) -> bool:
        """Whether the writer let go of its ingest (closed, committed or aborted)."""
        return self._lock_fd < 0

    def digest(self) -> Digest:
        """Digest of the bytes written so far (not a promise they are complete)."""
        return self._digester.digest()

    def status(self) -> Status:
        """The ingest's progress as this writer sees it (no disk access)."""
        return Status(
            ref=self.ref,
            offset=self._offset,
            total=self._total,
            expected=self._expected,
            started_at=ns_to_datetime(self._started_ns),
            updated_at=ns_to_datetime(self._updated_ns),
        )

    # -- writing ----------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append *data* to the ingest and the running digest.

        Each call is one ``write(2)`` plus one hash update with no copying, so
        callers should pass large chunks (1 MiB is good).

        An ingest with a known total never grows past it: the bytes that
        would are refused before any of them is written, so a source that
        sends more than it promised cannot fill the disk under a ref.

        Returns:
            ``len(data)``: everything is written or an exception is raised.

        Raises:
            DataLoss: the ingest has a total and *data* would take it past
                that; nothing of *data* was written.
            FailedPrecondition: the writer is closed.
            OSError: the disk refused (ENOSPC, EIO); the ingest is left as it
                was before the call, so the write can be retried.
        """
        self._check_open()
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if self._total and self._offset + n > self._total:
            raise DataLoss(
                f"ref {self.ref}: {self._offset + n} bytes would pass the expected "
                f"total of {self._total}; the extra {n} bytes were not written"
            )
        try:
            written = os.write(self._fd, data)
            if written != n:
                try:
                    view = memoryview(data).cast("B")
                    while written < n:
                        written += os.write(self._fd, view[written:])
                except BaseException:
                    # Keep file and digest in step: drop the partial tail.
                    os.ftruncate(self._fd, self._offset)
                    os.lseek(self._fd, self._offset, os.SEEK_SET)
                    raise
        except OSError as e:
            raise ingest.named(e, self._path / ingest.DATA) from e
        self._digester.update(data)
        self._offset += n
        self._updated_ns = now_ns()
        if self._offset - self._written_back >= WRITEBACK_BYTES:
            start_writeback(self._fd, self._written_back, self._offset - self._written_back)
            self._written_back = self._offset
        return n

    def truncate(self, size: int) -> None:
        """Cut the ingest back to *size* bytes and continue writing from there.

        ``truncate(0)`` (start over, say because the source cannot seek to
        `offset`) is immediate; other sizes re-hash the first *size* bytes.

        Raises:
            InvalidArgument: *size* is negative or beyond `offset`.
            FailedPrecondition: the writer is closed.
        """
        self._check_open()
        if size < 0 or size > self._offset:
            raise InvalidArgument(
                f"ref {self.ref}: cannot truncate to {size}, have {self._offset} bytes"
            )
        os.ftruncate(self._fd, size)
        if size == 0:
            self._digester = Digester(self._digester.algorithm)
        else:
            self._digester, _ = hash_fd(self._fd, self._digester.algorithm, size)
        os.lseek(self._fd, size, os.SEEK_SET)
        self._offset = size
        self._written_back = min(self._written_back, size)
        self._updated_ns = now_ns()

    def commit(
        self,
        size: int,
        expected: Digest | None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Verify the ingest and make it the blob *expected*, with *labels*.

        Size and digest are checked first; then the data is made read-only,
        fsynced and renamed into ``blobs/<alg>/<hex>``, the directory is
        fsynced and the ingest removed.
        The existence check, the rename and the label row happen in one
        database transaction, so two processes committing the same blob
        cannot both win, and a blob never appears without its labels.
        On success the writer is closed.

        Args:
            size: the size the blob must have; 0 means unknown, no check.
            expected: the digest it must have; None means no check (the
                blob is then stored under the digest of what was written).
            labels: the blob's labels, replacing any recorded for it; empty
                values are dropped.

        Raises:
            FailedPrecondition: *size* is given and differs from `offset`
                ("unexpected commit size"), or the writer is closed. The
                ingest is kept: truncate and rewrite, or abort.
            DataLoss: the digest differs from *expected*, or the ingest file
                changed under the writer. The ingest is kept, as above.
            AlreadyExists: the blob is already present (another ref won the
                race); the ingest is discarded and the writer closed. Callers
                usually treat this as success.
            InvalidArgument: *size* is negative or a label is invalid.
        """
        self._check_open()
        if size < 0:
            raise InvalidArgument(f"ref {self.ref}: commit size {size} is negative")
        on_disk = os.fstat(self._fd).st_size
        if on_disk != self._offset:
            raise DataLoss(
                f"ref {self.ref}: ingest data changed under the writer "
                f"({on_disk} bytes on disk, {self._offset} written)"
            )
        if size and size != self._offset:
            raise FailedPrecondition(
                f"ref {self.ref}: unexpected commit size {self._offset}, expected {size}"
            )
        if expected is not None:
            expected = Digest.parse(expected)
            if expected.algorithm == self._digester.algorithm:
                actual = self._digester.digest()
            else:
                actual = hash_fd(self._fd, expected.algorithm)[0].digest()
            if actual != expected:
                raise DataLoss(
                    f"ref {self.ref}: unexpected commit digest {actual}, expected {expected}"
                )
        else:
            actual = self._digester.digest()
        clean = {k: v for k, v in (labels or {}).items() if v}
        validate_labels(clean)

        data = self._path / ingest.DATA
        # The commit time becomes the blob's mtime, which Info reports as
        # created_at; set it before the fsync so it is durable too.
        commit_ns = now_ns()
        os.utime(self._fd, ns=(commit_ns, commit_ns))
        os.fchmod(self._fd, 0o444)
        try:
            os.fsync(self._fd)
            self._store._install(data, actual, clean, commit_ns)
        except AlreadyExists:
            self._discard()
            raise
        except BaseException:
            if _same_file(self._fd, data):
                # Still in the ingest: keep it writable for a retry.
                with contextlib.suppress(OSError):
                    os.fchmod(self._fd, 0o644)
            else:
                # Already renamed into blobs/ (a later step failed): this
                # descriptor now points at a published blob and must never
                # be written through again.
                self._discard()
            raise
        self._discard()

    # -- ending -------------------------------------------------------------------

    def abort(self) -> None:
        """Throw the ingest away and close the writer.

        Raises:
            FailedPrecondition: the writer is already closed (use
                `ContentStore.abort` for an ingest nobody holds).
        """
        self._check_open()
        self._discard()

    def close(self) -> None:
        """Release the ref, keeping the ingest so a later writer resumes it.

        Idempotent; a no-op after commit or abort.
        """
        if self._lock_fd < 0:
            return
        try:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    ingest.write_meta(self._path, ingest.UPDATED_AT, str(self._updated_ns))
        finally:
            self._release()

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten writer must not keep its ref locked until process exit.
        with contextlib.suppress(Exception):
            self._release()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"offset={self._offset}"
        return f"<Writer ref={self.ref!r} {state}>"

    def _discard(self) -> None:
        """Remove the ingest (we hold its lock) and close."""
        try:
            ingest.remove(self._path)
        finally:
            self._release()

    def _release(self) -> None:
        fd, self._fd = self._fd, -1
        lock_fd, self._lock_fd = self._lock_fd, -1
        try:
            if fd >= 0:
                os.close(fd)
        finally:
            if lock_fd >= 0:
                ingest.release(lock_fd)

    def _check_open(self) -> None:
        if self._lock_fd < 0:
            raise FailedPrecondition(f"ref {self.ref}: writer is closed")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
