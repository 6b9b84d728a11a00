"""The CLI face, in-process: output shapes and the one-line error rule.

Every test runs twice: on the state root directly, and through a real
ckfsd serving the same root (``CKFS_ADDRESS``), which must print the same
and exit the same. The daemon runs are slow (a process per test) and
marked so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckfs.content import ContentStore
from ckfs.metadata.db import DB
from ckfs_cli.main import main


@pytest.fixture(autouse=True, params=["local", pytest.param("ckfsd", marks=pytest.mark.slow)])
def face(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """Which way the CLI reaches the root *tmp_path*: ``local``, or through ``ckfsd``."""
    monkeypatch.delenv("CKFS_ADDRESS", raising=False)
    if request.param == "local":
        yield request.param
        return
    from integration.daemon import running_ckfsd

    with running_ckfsd(tmp_path) as daemon:
        monkeypatch.setenv("CKFS_ADDRESS", daemon.address)
        yield request.param


def run(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["--root", str(root), *args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_empty_store_lists_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(capsys, tmp_path, "images", "ls", "--json") == (0, "[]\n", "")
    assert run(capsys, tmp_path, "images", "ls", "-q") == (0, "", "")
    code, out, _ = run(capsys, tmp_path, "content", "ls")
    assert code == 0 and out.split() == ["DIGEST", "SIZE", "AGE", "LABELS"]


def test_interrupted_ingest_is_listed_as_active(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = DB(tmp_path / "metadata.db")
    with ContentStore(tmp_path / "content", db).writer("layer-x", total=10) as w:
        w.write(b"abc")
    db.close()
    code, out, _ = run(capsys, tmp_path, "content", "active", "--json")
    assert code == 0
    [status] = json.loads(out)
    assert (status["ref"], status["offset"], status["total"]) == ("layer-x", 3, 10)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["images", "inspect", "Not/Valid"], "invalid reference"),
        (["images", "inspect", "alpine"], "not found"),
        (["content", "get", "sha256:abc"], "invalid digest"),
        (["images", "ls", "name=="], "filters"),
    ],
)
def test_errors_are_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], words: str
) -> None:
    code, out, err = run(capsys, tmp_path, *args)
    assert code == 1 and out == ""
    assert err.startswith("ckfs: ") and err.count("\n") == 1 and words in err


def _ingests(root: Path, *refs: str) -> None:
    db = DB(root / "metadata.db")
    store = ContentStore(root / "content", db)
    for ref in refs:
        with store.writer(ref, total=10) as w:
            w.write(b"abc")
    db.close()


def test_content_abort_removes_ingests_at_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _ingests(tmp_path, "layer-a", "layer-b", "layer-c")
    assert run(capsys, tmp_path, "content", "abort", "layer-a") == (0, "layer-a\n", "")
    code, out, err = run(capsys, tmp_path, "content", "abort", "layer-b", "layer-x")
    assert (code, out) == (1, "layer-b\n") and "layer-x" in err and err.count("\n") == 1
    assert run(capsys, tmp_path, "content", "abort", "--all") == (0, "layer-c\n", "")
    assert run(capsys, tmp_path, "content", "active", "--json")[1] == "[]\n"
    code, _, err = run(capsys, tmp_path, "content", "abort")
    assert code == 2 and "--all" in err


def test_gc_expires_stale_ingests(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _ingests(tmp_path, "layer-a")
    code, out, _ = run(capsys, tmp_path, "gc", "--json")
    assert code == 0 and json.loads(out)["ingests"] == []  # a fresh one stays (24 h)
    code, out, _ = run(capsys, tmp_path, "gc", "--dry-run", "--ingest-expiry", "0", "--json")
    assert (json.loads(out)["ingests"], json.loads(out)["ingest_bytes"]) == (["layer-a"], 3)
    code, out, err = run(capsys, tmp_path, "gc", "--ingest-expiry", "0s")
    assert code == 0 and "removed ingest layer-a" in out and "1 stale ingests" in err
    assert run(capsys, tmp_path, "content", "active", "--json")[1] == "[]\n"
    code, _, err = run(capsys, tmp_path, "gc", "--ingest-expiry", "soon")
    assert code == 2 and "not a duration" in err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--timeout", "0"], "timeout must be a positive"),
        (["--timeout", "5 fortnights"], "not a duration"),
        (["--max-blob-size", "8 GB please"], "not a size"),
        (["--max-blob-size", "0"], "max blob size must be at least 1 byte, not 0"),
    ],
)
def test_pull_limits_are_checked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], words: str
) -> None:
    code, _, err = run(capsys, tmp_path, "pull", *args, "registry.invalid/x:1")
    assert code in (1, 2) and words in err


def test_rootfs_passes_the_limits_to_its_pull(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The same options reach the pull behind rootfs, mount and bundle."""
    code, out, err = run(capsys, tmp_path, "rootfs", "--timeout", "0", "registry.invalid/x:1")
    assert (code, out) == (1, "") and "timeout must be a positive" in err


def test_snapshots_tree_shows_chains_deeper_than_the_recursion_limit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from ckfs.state import State

    depth = 1_100  # a native snapshotter stacks an image of thousands of layers
    state = State(tmp_path)
    try:
        sn = state.snapshotter("native")
        parent = ""
        for i in range(depth):
            sn.prepare(f"a{i}", parent)
            sn.commit(f"c{i}", f"a{i}")
            parent = f"c{i}"
    finally:
        state.close()
    code, out, err = run(capsys, tmp_path, "snapshots", "-s", "native", "tree")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == depth and lines[0] == "c0"
    assert lines[-1] == f"{'  ' * (depth - 1)}\\_ c{depth - 1} (committed)"


def test_snapshots_usage_lists_what_it_can(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import shutil

    from ckfs.state import State

    state = State(tmp_path)
    try:
        sn = state.snapshotter("native")
        sn.prepare("good", "")
        sn.prepare("bad", "")
        (source,) = {m.source for m in sn.mounts("bad")}
    finally:
        state.close()
    shutil.rmtree(source)  # the tree is gone from under its record

    code, out, err = run(capsys, tmp_path, "snapshots", "-s", "native", "usage", "--json")
    rows = {r["key"]: r for r in json.loads(out)}
    assert code == 0 and rows["good"]["inodes"] >= 1 and "error" in rows["bad"]
    assert err.startswith("ckfs: snapshot bad: ") and err.count("\n") == 1

    code, out, err = run(capsys, tmp_path, "snapshots", "-s", "native", "usage", "good", "nope")
    assert code == 1 and "(error)" in out and "good" in out
    assert err.startswith("ckfs: snapshot nope: ") and err.count("\n") == 1


def test_a_reader_leaving_early_is_not_an_error(tmp_path: Path, face: str) -> None:
    """``ckfs content get X | head``: the closed pipe ends ckfs with status 0, silently."""
    import io
    import subprocess
    import sys

    from ckfs.content.store import write_blob
    from ckfs.descriptor import Descriptor
    from ckfs.digest import from_bytes

    data = b"x" * (4 << 20)  # well past a pipe's buffer
    desc = Descriptor("application/octet-stream", from_bytes(data), len(data))
    db = DB(tmp_path / "metadata.db")
    try:
        write_blob(ContentStore(tmp_path / "content", db), "big", io.BytesIO(data), desc)
    finally:
        db.close()
    ckfs = Path(sys.executable).parent / "ckfs"
    script = f'"{ckfs}" --root "{tmp_path}" content get {desc.digest} | head -c 1 >/dev/null'
    script += '; echo "${PIPESTATUS[0]}"'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert (proc.stdout.strip(), proc.stderr) == ("0", "")
