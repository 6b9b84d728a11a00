"""The local content store's own behaviour, beyond the acceptance suite.

`tests.suites.content` holds what every store promises; these check how the
local one keeps its promises on disk: the ingest layout and its locks across
processes, blob files and modes, expiry of stale ingests, verification of a
blob corrupted in place, recovery from a crash mid-removal, and what a
failure at each step of a commit leaves behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from ckfs.content import ContentStore, write_blob
from ckfs.digest import from_bytes
from ckfs.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from tests.local_stores import content_stores
from tests.suites.content import churn, create_content, desc_of, now

StoreFactory = Callable[[], ContentStore]


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[StoreFactory]:
    with content_stores(tmp_path) as make:
        yield make


@pytest.fixture
def cs(make_store: StoreFactory) -> ContentStore:
    return make_store()


_HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ckfs.content import ContentStore
    from ckfs.metadata.db import DB

    root = Path(sys.argv[1])
    store = ContentStore(root / "content", DB(root / "metadata.db"))
    w = store.writer(sys.argv[2])
    w.write(b"hello")
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def test_ref_locked_across_processes(cs: ContentStore, tmp_path: Path) -> None:
    """Another process's writer locks the ref; killing it frees it, data stays."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path), "proc-ref"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(Unavailable):
            cs.writer("proc-ref")
        with pytest.raises(Unavailable):
            cs.abort("proc-ref")
        assert cs.status("proc-ref").offset == 5
    finally:
        proc.kill()  # a crash: no close(), the kernel drops the lock
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
    with cs.writer("proc-ref") as w:
        assert w.offset == 5
        assert w.digest() == from_bytes(b"hello")
        w.write(b" world")
        w.commit(11, from_bytes(b"hello world"))
    assert cs.read_all(from_bytes(b"hello world")) == b"hello world"


def test_ingest_layout(cs: ContentStore) -> None:
    b, d = create_content(100)
    with cs.writer("layout", total=100, expected=d) as w:
        w.write(b)
        path = cs.root / "ingest" / hashlib.sha256(b"layout").hexdigest()
        names = {p.name for p in path.iterdir()}
        assert {"data", "ref", "total", "expected", "startedat", "lock"} <= names
        assert (path / "ref").read_text() == "layout"
        assert (path / "data").read_bytes() == b
    st = cs.status("layout")
    assert (st.ref, st.offset, st.total, st.expected) == ("layout", 100, 100, d)


def _age(cs: ContentStore, ref: str, seconds: float) -> None:
    """Make the ingest *ref* look last written *seconds* ago (its data's mtime and saved time)."""
    path = cs.root / "ingest" / hashlib.sha256(ref.encode()).hexdigest()
    then = time.time_ns() - int(seconds * 1e9)
    (path / "updatedat").write_text(str(then))
    os.utime(path / "data", ns=(then, then))


def test_expire_ingests(cs: ContentStore) -> None:
    """Stale ingests go; fresh ones and any a live writer holds stay."""
    for ref in ("old", "fresh", "held"):
        with cs.writer(ref) as w:
            w.write(b"some bytes")
    _age(cs, "old", 7200)
    _age(cs, "held", 7200)
    held = cs.writer("held")
    cutoff = now() - timedelta(hours=1)

    assert [s.ref for s in cs.expire_ingests(cutoff, dry_run=True)] == ["old"]
    assert [s.ref for s in cs.list_statuses()] == ["fresh", "held", "old"]
    gone = cs.expire_ingests(cutoff)
    assert [(s.ref, s.offset) for s in gone] == [("old", 10)]
    assert [s.ref for s in cs.list_statuses()] == ["fresh", "held"]

    held.close()  # once its writer lets go, its age counts
    assert [s.ref for s in cs.expire_ingests(cutoff)] == ["held"]
    assert [s.ref for s in cs.expire_ingests(now() + timedelta(seconds=1))] == ["fresh"]
    assert cs.list_statuses() == []


def test_verify_detects_corruption(cs: ContentStore) -> None:
    b, d = create_content(5000)
    assert write_blob(cs, "v", io.BytesIO(b), desc_of(b, d))
    cs.verify(d)
    p = cs.path(d)
    p.chmod(0o644)
    with open(p, "r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    with pytest.raises(DataLoss):
        cs.verify(d)
    with pytest.raises(NotFound):
        cs.verify(create_content(1)[1])


def test_interrupted_removal_is_swept(make_store: StoreFactory) -> None:
    """A crash between an ingest's rename-away and its deletion leaves no litter."""
    cs = make_store()
    tomb = cs.root / "ingest" / ".del-0123-crashed"
    tomb.mkdir()
    (tomb / "data").write_bytes(b"x" * 1000)
    make_store()
    assert not tomb.exists()


def test_commit_failure_before_rename_keeps_ingest(
    cs: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckfs.content.store as store_mod

    b, d = create_content(1000)
    w = cs.writer("cf")
    w.write(b)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("database went away")

    monkeypatch.setattr(store_mod, "_set_labels", broken)
    with pytest.raises(OSError, match="database"):
        w.commit(len(b), d)
    monkeypatch.undo()
    assert not cs.exists(d)
    assert not w.closed
    data = cs.root / "ingest" / hashlib.sha256(b"cf").hexdigest() / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o644
    w.commit(len(b), d)
    assert cs.read_all(d) == b


def test_commit_failure_after_rename_closes_writer(
    cs: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckfs.content.store as store_mod

    b, d = create_content(1000)
    w = cs.writer("cf2")
    w.write(b)

    def broken(path: Path) -> None:
        raise OSError("EIO")

    monkeypatch.setattr(store_mod, "fsync_dir", broken)
    with pytest.raises(OSError, match="EIO"):
        w.commit(len(b), d)
    assert w.closed  # never write through a descriptor of a published blob
    with pytest.raises(FailedPrecondition):
        w.write(b"more")
    assert cs.read_all(d) == b


def test_blob_files_are_read_only(cs: ContentStore) -> None:
    b, d = create_content(1000)
    assert write_blob(cs, "m", io.BytesIO(b), desc_of(b, d))
    assert cs.path(d).read_bytes() == b
    assert stat.S_IMODE(cs.path(d).stat().st_mode) == 0o444


def test_nothing_under_blobs_before_commit(cs: ContentStore) -> None:
    b, d = create_content(2048)
    with cs.writer("pending", total=len(b), expected=d) as w:
        w.write(b)
        with pytest.raises(NotFound):
            cs.path(d)
        assert not any((cs.root / "blobs").rglob("*"))
        w.commit(len(b), d)
    assert cs.path(d).is_file()


def test_open_readers_keep_a_deleted_blob(cs: ContentStore) -> None:
    b, d = create_content(100)
    assert write_blob(cs, "del", io.BytesIO(b), desc_of(b, d))
    with cs.reader(d) as r:
        cs.delete(d)
        assert r.read() == b
    assert not cs.exists(d)


def test_strays_under_blobs_are_not_blobs(cs: ContentStore) -> None:
    b, d = create_content(10)
    assert write_blob(cs, "s", io.BytesIO(b), desc_of(b, d))
    (cs.root / "blobs" / "sha256" / "junk.tmp").write_bytes(b"x")
    assert [i.digest for i in cs.walk()] == [d]


def test_blobs_live_under_their_algorithm(cs: ContentStore) -> None:
    b = b"stored as sha512"
    d512 = from_bytes(b, "sha512")
    with cs.writer("t512") as w:
        w.write(b)
        w.commit(len(b), d512)
    assert (cs.root / "blobs" / "sha512" / d512.hex).is_file()


def test_labels_are_one_json_row(make_store: StoreFactory) -> None:
    cs = make_store()
    b, d = create_content(64)
    assert write_blob(cs, "p", io.BytesIO(b), desc_of(b, d), labels={"k": "v"})
    row = make_store()._db.query("SELECT labels FROM content WHERE digest = ?", (str(d),))
    assert json.loads(row[0]["labels"]) == {"k": "v"}


def test_churn_leaves_no_removal_debris(cs: ContentStore) -> None:
    churn(cs, "churn")
    assert not [p for p in (cs.root / "ingest").iterdir() if p.name.startswith(".del-")]


def test_truncate_anywhere(cs: ContentStore) -> None:
    """Locally an ingest can be cut at any length within it (the wire can only restart it)."""
    b, d = create_content(10_000)
    with cs.writer("t") as w:
        w.write(b[:7000])
        w.write(b"garbage")
        w.truncate(7000)
        assert w.digest() == from_bytes(b[:7000])
        with pytest.raises(InvalidArgument):
            w.truncate(7001)
        w.write(b[7000:])
        w.commit(len(b), d)
    assert cs.read_all(d) == b
