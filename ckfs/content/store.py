"""The local content store: blobs addressed by digest, written through ingests.

Layout under the store's root (``<ckfs root>/content``)::

    blobs/<alg>/<hex>      committed blobs, read-only (0444), immutable
    ingest/<sha256(ref)>/  writes in progress (see `ckfs.content.ingest`)

The blob file is the truth for presence and size; labels and their update
time live in the ``content`` table of the metadata database. Semantics follow
containerd's local store: writes go to an ingest named by the caller's *ref*,
one writer per ref at a time (across threads and processes), resumable after
a crash; a blob appears under its digest only after its size and digest were
checked, by an atomic rename.

Every method is synchronous and thread-safe. Hashing and file I/O release
the GIL, so trio code runs the heavy ones (`write_blob`, `verify`, commits of
large blobs) in `trio.to_thread.run_sync` workers.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from ckfs.content import ingest
from ckfs.content.fsutil import fsync_dir, hash_fd
from ckfs.content.reader import ReaderAt
from ckfs.content.types import Info, Status, ns_to_datetime, validate_labels
from ckfs.content.writer import Writer
from ckfs.descriptor import Descriptor
from ckfs.digest import ALGORITHMS, CHUNK, Digest
from ckfs.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from ckfs.metadata.db import DB, Tx, now_ns
from ckfs.metadata.fields import update_labels

__all__ = ["ContentStore", "blob_file", "write_blob"]

_HEX = re.compile(r"[0-9a-f]+")

#: ``(fieldpath) -> (value, present)``: how a filter looks at one object.
_Adaptor = Callable[[Sequence[str]], tuple[str, bool]]
_Matcher = Callable[[_Adaptor], bool]


class ContentStore:
    """Blobs by digest, labels in SQLite, resumable locked ingests.

    Args:
        root: the store's directory (``<ckfs root>/content``); created if
            missing.
        db: the root's metadata database (for labels).
    """

    def __init__(self, root: Path, db: DB) -> None:
        self.root = Path(root)
        self._db = db
        self._blobs = self.root / "blobs"
        self._ingest = self.root / "ingest"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._ingest.mkdir(parents=True, exist_ok=True)
        ingest.sweep_tombstones(self._ingest)

    def __repr__(self) -> str:
        return f"ContentStore({str(self.root)!r})"

    # -- writing ----------------------------------------------------------------

    def writer(
        self, ref: str, *, total: int | None = None, expected: Digest | None = None
    ) -> Writer:
        """Open, or resume, the ingest named *ref*.

        The writer holds *ref*'s lock until closed. If the ingest already has
        data (an earlier writer closed or crashed), the writer continues at
        its end: `Writer.offset` says where, and the running digest is rebuilt
        by hashing the existing bytes.

        Args:
            ref: the caller's name for this write, unique per blob it means to
                write (``"layer-" + digest`` is typical); any non-empty string.
            total: the expected size, if known (reported in `Status`).
            expected: the expected digest, if known. Also picks the hash
                algorithm, and lets an existing blob short-circuit the write.

        Raises:
            AlreadyExists: *expected* is given and that blob is present; no
                ingest is created. Usually success in disguise.
            Unavailable: another writer (thread or process) holds *ref*.
            FailedPrecondition: the existing ingest was started with another
                *total* or *expected*; abort it first.
            InvalidArgument: empty *ref*, negative *total*, malformed *expected*.
        """
        ingest.check_ref(ref)
        if total is not None and total < 0:
            raise InvalidArgument(f"ref {ref}: total size {total} is negative")
        if expected is not None:
            expected = Digest.parse(expected)
            if self.exists(expected):
                raise AlreadyExists(f"content {expected}: already exists")
        return Writer(
            self, ref, ingest.ingest_dir(self._ingest, ref), total=total, expected=expected
        )

    def _install(self, src: Path, dgst: Digest, labels: Mapping[str, str], commit_ns: int) -> None:
        """Rename a verified ingest file to its blob path and record its labels.

        The existence check, the label row and the rename share one write
        transaction: SQLite's write lock serializes commits of the same blob
        across processes, so exactly one wins and the others see
        `AlreadyExists`; and the labels are there the moment the blob is.
        """
        target = self._blob_path(dgst)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._db.transaction() as tx:
            if os.path.lexists(target):
                raise AlreadyExists(f"content {dgst}: already exists")
            _set_labels(tx, dgst, labels, commit_ns, keep_empty=False)
            os.rename(src, target)
        fsync_dir(target.parent)

    # -- blobs --------------------------------------------------------------------

    def exists(self, dgst: Digest) -> bool:
        """Whether the blob *dgst* is committed.

        Raises:
            InvalidArgument: *dgst* is not a valid digest.
        """
        return self._blob_path(dgst).is_file()

    def path(self, dgst: Digest) -> Path:
        """The blob's file, for zero-copy use (``sendfile``, ``mmap``, overlay).

        The file is read-only and must stay unmodified; it may be deleted by
        `delete` or GC at any time, so open it promptly.

        Raises:
            NotFound: the blob is absent.
        """
        p = self._blob_path(dgst)
        if not p.is_file():
            raise NotFound(f"content {dgst}: not found")
        return p

    def info(self, dgst: Digest) -> Info:
        """Size, times and labels of the blob *dgst*.

        Raises:
            NotFound: the blob is absent.
            InvalidArgument: *dgst* is not a valid digest.
        """
        d = Digest.parse(dgst)
        try:
            st = os.stat(self._blob_path(d))
        except FileNotFoundError:
            raise NotFound(f"content {d}: not found") from None
        rows = self._db.query("SELECT labels, updated_at FROM content WHERE digest = ?", (str(d),))
        if rows:
            return _make_info(d, st, json.loads(rows[0]["labels"]), rows[0]["updated_at"])
        return _make_info(d, st, {}, 0)

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change the labels of the blob ``info.digest``; return the new `Info`.

        Only labels are mutable (size and digest are the blob itself).

        Args:
            info: carries the digest and the new label values.
            fieldpaths: what to change. Empty or ``"labels"``: replace all
                labels with ``info.labels``. ``"labels.<key>"``: set just that
                key from ``info.labels``, deleting it when absent there. A
                value of ``""`` always means "delete this label".

        Raises:
            NotFound: the blob is absent.
            InvalidArgument: a field path other than the above, or an invalid
                label.
        """
        d = Digest.parse(info.digest)
        path = self._blob_path(d)
        now = now_ns()
        with self._db.transaction() as tx:
            # Checked inside the transaction so a concurrent delete (which
            # drops the row in its own transaction) cannot leave an orphan.
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise NotFound(f"content {d}: not found") from None
            row = tx.get_row("SELECT labels FROM content WHERE digest = ?", (str(d),))
            current = json.loads(row["labels"]) if row is not None else {}
            labels, others = update_labels(current, info.labels, fieldpaths)
            if others:
                raise InvalidArgument(f"cannot update {others[0]!r} field on content info {d}")
            validate_labels(labels)
            _set_labels(tx, d, labels, now, keep_empty=True)
        return _make_info(d, st, labels, now)

    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        """Every committed blob matching *filters*, in digest order.

        The filters are parsed now (so a malformed one fails at the call);
        the blobs are listed lazily. Labels are read once, at the first
        item; a blob committed or deleted during the walk may or may not show.

        Args:
            filters: containerd filter strings over ``digest``, ``size`` and
                ``labels.<key>``; several are alternatives; none matches all.

        Raises:
            InvalidArgument: a malformed filter.
        """
        matcher = _compile_filters(filters)
        return self._walk(matcher)

    def _walk(self, matcher: _Matcher | None) -> Iterator[Info]:
        rows = {
            r["digest"]: (r["labels"], r["updated_at"])
            for r in self._db.query("SELECT digest, labels, updated_at FROM content")
        }
        for alg, hexlen in ALGORITHMS.items():
            try:
                names = sorted(os.listdir(self._blobs / alg))
            except FileNotFoundError:
                continue
            for name in names:
                if len(name) != hexlen or not _HEX.fullmatch(name):
                    continue  # not a blob (a stray temporary file, say)
                try:
                    st = os.stat(self._blobs / alg / name)
                except FileNotFoundError:
                    continue  # deleted since the listing
                if not stat.S_ISREG(st.st_mode):
                    continue
                d = Digest.from_hex(alg, name)
                labels_json, updated = rows.get(str(d), ("{}", 0))
                info = _make_info(d, st, json.loads(labels_json), updated)
                if matcher is None or matcher(_info_adaptor(info)):
                    yield info

    def delete(self, dgst: Digest) -> None:
        """Remove the blob *dgst* and its labels.

        Readers that already opened it keep reading the old file.

        Raises:
            NotFound: the blob is absent.
        """
        d = Digest.parse(dgst)
        path = self._blob_path(d)
        with self._db.transaction() as tx:
            tx.execute("DELETE FROM content WHERE digest = ?", (str(d),))
            try:
                os.unlink(path)
            except FileNotFoundError:
                raise NotFound(f"content {d}: not found") from None  # rolls back

    def reader(self, dgst: Digest) -> ReaderAt:
        """Open the blob *dgst* for reading (a context manager).

        Raises:
            NotFound: the blob is absent.
        """
        d = Digest.parse(dgst)
        return ReaderAt(self._blob_path(d), what=str(d))

    def read_all(self, dgst: Digest, *, limit: int | None = None) -> bytes:
        """The whole blob *dgst* in memory, for manifests, indexes and configs.

        Args:
            limit: refuse blobs larger than this many bytes, before reading
                any of it. A manifest is attacker-supplied input; callers pass
                the format's bound (4 MiB for manifests) so a hostile one
                cannot exhaust memory.

        Raises:
            NotFound: the blob is absent.
            InvalidArgument: the blob is larger than *limit*.
            DataLoss: the file is shorter than it was when opened.
        """
        with self.reader(dgst) as r:
            if limit is not None and r.size > limit:
                raise InvalidArgument(
                    f"content {dgst}: {r.size} bytes exceeds the limit of {limit} bytes"
                )
            data = r.read_at(0, r.size)
        if len(data) != r.size:
            raise DataLoss(f"content {dgst}: read {len(data)} of {r.size} bytes")
        return data

    def verify(self, dgst: Digest) -> None:
        """Re-hash the blob *dgst* and check it still matches its name.

        Commit already verified it; this is for fsck-style checks after a
        disk error or a suspected manual edit.

        Raises:
            NotFound: the blob is absent.
            DataLoss: its bytes hash to something else; the message names the
                blob. The caller decides whether to delete and re-fetch it.
        """
        d = Digest.parse(dgst)
        with self.reader(d) as r:
            actual = hash_fd(r.fileno(), d.algorithm)[0].digest()
        if actual != d:
            raise DataLoss(f"blob {d} is corrupt: its content hashes to {actual}")

    # -- ingests ------------------------------------------------------------------

    def status(self, ref: str) -> Status:
        """Progress of the ingest *ref*, live or abandoned (no lock needed).

        Raises:
            NotFound: no such ingest.
        """
        ingest.check_ref(ref)
        st = ingest.read_status(ingest.ingest_dir(self._ingest, ref))
        if st.ref != ref:  # a hash collision of refs; cannot happen with sha256
            raise NotFound(f"ingest ref {ref}: not found")
        return st

    def list_statuses(self, filters: Sequence[str] = ()) -> list[Status]:
        """All ingests matching *filters*, sorted by ref.

        Args:
            filters: containerd filter strings over ``ref`` and ``expected``.

        Raises:
            InvalidArgument: a malformed filter.
        """
        matcher = _compile_filters(filters)
        out: list[Status] = []
        try:
            names = os.listdir(self._ingest)
        except FileNotFoundError:
            return out
        for name in names:
            if not ingest.is_ingest_name(name):
                continue
            try:
                st = ingest.read_status(self._ingest / name)
            except (NotFound, FileNotFoundError):
                continue  # removed (committed, aborted) while we looked
            if matcher is None or matcher(_status_adaptor(st)):
                out.append(st)
        out.sort(key=lambda s: s.ref)
        return out

    def abort(self, ref: str) -> None:
        """Delete the ingest *ref* and its data.

        Raises:
            NotFound: no such ingest.
            Unavailable: a live writer holds it; close that writer first.
        """
        ingest.check_ref(ref)
        path = ingest.ingest_dir(self._ingest, ref)
        with ingest.held(path, ref):
            ingest.remove(path)

    def expire_ingests(self, before: datetime, *, dry_run: bool = False) -> list[Status]:
        """Remove the ingests last written before *before*; return what went.

        An interrupted pull keeps its ingests so the next one resumes, but
        nothing else ever removes one whose pull is never repeated: this is
        what ``ckfs gc`` calls with its expiry. An ingest a live writer holds
        is skipped whatever its age (its writer may be waiting on a slow
        registry), and the age is read again under the ref's lock, so an
        ingest written to between the listing and the removal stays.

        Args:
            before: ingests updated at or after this moment are kept.
            dry_run: only report what would be removed.

        Returns:
            The `Status` of every ingest removed (or, dry, due for removal),
            sorted by ref.
        """
        gone: list[Status] = []
        for st in self.list_statuses():
            if st.updated_at >= before:
                continue
            path = ingest.ingest_dir(self._ingest, st.ref)
            try:
                with ingest.held(path, st.ref):
                    current = ingest.read_status(path)
                    if current.updated_at < before:
                        if not dry_run:
                            ingest.remove(path)
                        gone.append(current)
            except (NotFound, Unavailable):
                continue  # gone meanwhile, or a live writer holds it
        return gone

    def free_bytes(self) -> int | None:
        """Bytes an unprivileged writer may still use on the store's filesystem.

        ``f_bavail``, not ``f_bfree``: the blocks a filesystem reserves for
        root are what keeps the rest of the system (logs, the daemon's own
        database) working when a pull would otherwise fill the disk. None
        when the filesystem cannot say: the writes will find out.
        """
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    # -- helpers ------------------------------------------------------------------

    def _blob_path(self, dgst: Digest) -> Path:
        # parse() again: a plain str that slipped through must not become a
        # path outside blobs/ (``sha256:../../x``).
        d = Digest.parse(dgst)
        return self._blobs / d.algorithm / d.hex


def blob_file(root: Path, dgst: Digest) -> Path:
    """Where the content store of the ckfs root *root* (`ckfs.state.State.content`)
    keeps *dgst*, present or not.

    For readers that look without opening the store and its database: the
    FUSE server's (`ckfs.layerindex.readers`) and ``ckfs cat``'s.
    """
    d = Digest.parse(dgst)  # as _blob_path: a plain str must not escape blobs/
    return root / "content" / "blobs" / d.algorithm / d.hex


def write_blob(
    store: ContentStore,
    ref: str,
    src: BinaryIO,
    desc: Descriptor,
    *,
    labels: Mapping[str, str] | None = None,
) -> bool:
    """Copy *src* into the store as the blob *desc* (containerd's WriteBlob).

    Resumes what an earlier attempt on *ref* left: if the ingest holds N
    bytes and *src* can seek, it is positioned at absolute offset N and only
    the rest is copied; if it cannot, the ingest restarts from zero. The
    copy uses 1 MiB chunks and checks the size as it goes, so a source that
    sends more than ``desc.size`` is cut off early.

    Synchronous and blocking; from trio, run it in a worker thread.

    Args:
        store: where the blob goes.
        ref: the ingest name (``"layer-" + desc.digest``, say).
        src: the bytes, from the start of the blob (or seekable).
        desc: the blob's size and digest, both checked before commit.
        labels: labels recorded with the blob.

    Returns:
        True if the blob was written, False if it was already present.

    Raises:
        DataLoss: the bytes do not match ``desc.digest`` or ``desc.size``; the
            ingest is deleted (its bytes are wrong, resuming would not help)
            and no blob is created.
        Unavailable: another writer holds *ref*.
        OSError: reading *src* or writing the ingest failed; the ingest is
            kept for a resume.
    """
    what = f"blob {desc.digest}"
    try:
        w = store.writer(ref, total=desc.size, expected=desc.digest)
    except AlreadyExists:
        return False
    with w:
        if w.offset:
            if w.offset <= desc.size and _seekable(src):
                src.seek(w.offset, os.SEEK_SET)
            else:
                w.truncate(0)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        readinto = getattr(src, "readinto", None)
        try:
            while True:
                if readinto is not None:
                    n = readinto(view)
                    if not n:
                        break
                    w.write(view[:n])
                else:
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    w.write(chunk)
                if w.offset > desc.size:
                    raise DataLoss(f"source sent more than the expected {desc.size} bytes")
            w.commit(desc.size, desc.digest, labels)
        except AlreadyExists:
            return False
        except (DataLoss, FailedPrecondition) as e:
            if not w.closed:
                w.abort()
            raise DataLoss(f"{what} (ref {ref}): {e}") from e
    return True


def _seekable(src: BinaryIO) -> bool:
    try:
        return bool(src.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _set_labels(
    tx: Tx, dgst: Digest, labels: Mapping[str, str], when: int, *, keep_empty: bool
) -> None:
    """Record *labels* as the blob's labels (the whole set).

    With no labels and not *keep_empty*, the row is dropped instead: the
    schema keeps rows only for blobs with labels or explicit updates.
    """
    if not labels and not keep_empty:
        tx.execute("DELETE FROM content WHERE digest = ?", (str(dgst),))
        return
    tx.execute(
        "INSERT INTO content (digest, labels, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (digest) DO UPDATE SET labels = excluded.labels, "
        "updated_at = excluded.updated_at",
        (str(dgst), json.dumps(dict(labels), sort_keys=True), when),
    )


def _make_info(d: Digest, st: os.stat_result, labels: Mapping[str, str], updated: int) -> Info:
    created = st.st_mtime_ns
    return Info(
        digest=d,
        size=st.st_size,
        created_at=ns_to_datetime(created),
        updated_at=ns_to_datetime(max(created, updated)),
        labels=dict(labels),
    )


def _compile_filters(filters: Sequence[str]) -> _Matcher | None:
    """Parse containerd filter strings; None when there are none (match all).

    ``ckfs.filters`` is imported only when a filter is given, so listing
    everything never depends on the parser.
    """
    if isinstance(filters, str):
        filters = [filters]  # a lone string, not its characters
    if not filters:
        return None
    from ckfs.filters import parse_filters  # type: ignore[import-not-found,unused-ignore]

    parsed = parse_filters(list(filters))

    def match(adaptor: _Adaptor) -> bool:
        return bool(parsed.match(adaptor))

    return match


def _lookup_map(rest: Sequence[str], m: Mapping[str, str]) -> tuple[str, bool]:
    # containerd joins the remaining path with dots: labels."a.b" and
    # labels.a.b name the same key.
    if not rest:
        return "", False
    v = m.get(".".join(rest))
    return (v, True) if v is not None else ("", False)


def _info_adaptor(info: Info) -> _Adaptor:
    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "digest":
            return str(info.digest), True
        if head == "size":
            return str(info.size), True
        if head == "labels":
            return _lookup_map(fieldpath[1:], info.labels)
        return "", False

    return adapt


def _status_adaptor(st: Status) -> _Adaptor:
    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "ref":
            return st.ref, True
        if head == "expected":
            return (str(st.expected), True) if st.expected is not None else ("", False)
        return "", False

    return adapt
