"""Container-written hostile trees: what a container leaves in a snapshot is as hostile as a layer.

Each row prepares a snapshot through the CLI, writes into its upper
directory what a container could (a tree 1,500 deep, paths longer than
``PATH_MAX``, names full of control characters and invalid UTF-8, a wide
directory, a file the kernel will not let anyone remove), then commits or
removes it and runs ``gc``. Everything must work, in bounded time and
memory, and any refusal must be one clean line; the store stays usable.

Trees are written fd-relative (no path ever exceeds ``PATH_MAX``), and
whatever ckfs could not remove is removed in teardown with ``rm -rf``
(which walks any depth), so pytest's own recursive cleanup of the temp
directory never meets such a tree.

Runs confined (the file name starts with ``test_hostile``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integration.hostile import (
    MARKS,
    Outcome,
    check_failure,
    check_gc,
    check_store,
    check_success,
    neighbour_template,
    recorded,
    release,
    run,
    run_batch,
    with_neighbour,
)

pytestmark = MARKS


@pytest.fixture(scope="session")
def neighbour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return neighbour_template(tmp_path_factory.getbasetemp())


#: Deeper than Python's recursion limit (1000) with room to spare.
DEPTH = 1500

#: A path component of this length; `LONG_LEVELS` of them make a path far past PATH_MAX.
LONG_NAME = 250
LONG_LEVELS = 24

#: Entries in one directory of the "wide" tree.
WIDE = 5_000

#: Names a container may write: terminal escapes, newlines, invalid UTF-8.
CONTROL_NAMES = [b"\x1b]0;pwned\x07", b"new\nline", b"\xff\xfe\xfd", b"tab\there", b"\x9b31m"]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


@contextlib.contextmanager
def opendir(path: Path | str | bytes, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, _DIR, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def write_file(dir_fd: int, name: str | bytes, data: bytes = b"x") -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def chain(top: Path, names: list[bytes]) -> None:
    """Directories *names* nested in order under *top*, a file at the bottom, fd by fd."""
    fd = os.open(top, _DIR)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            write_file(fd, name + b".f")
            inner = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = inner
        write_file(fd, b"bottom", b"the end\n")
    finally:
        os.close(fd)


def deep(top: Path) -> None:
    chain(top, [b"d"] * DEPTH)


def long_paths(top: Path) -> None:
    chain(top, [bytes([ord("a") + i % 26]) * LONG_NAME for i in range(LONG_LEVELS)])


def control_names(top: Path) -> None:
    with opendir(top) as fd:
        for name in CONTROL_NAMES:
            write_file(fd, name)
            os.mkdir(name + b".d", dir_fd=fd)
            with opendir(name + b".d", fd) as inner:
                write_file(inner, name)
        os.symlink(CONTROL_NAMES[0], b"link" + CONTROL_NAMES[1], dir_fd=fd)


def wide(top: Path) -> None:
    with opendir(top) as fd:
        os.mkdir("wide", dir_fd=fd)
        with opendir("wide", fd) as inner:
            for i in range(WIDE):
                write_file(inner, f"f{i}")


def everything(top: Path) -> None:
    for make, sub in ((deep, "deep"), (long_paths, "long"), (control_names, "ctl")):
        (top / sub).mkdir()
        make(top / sub)


def immutable(top: Path) -> None:
    """A file the kernel refuses to remove, even for root (``chattr +i``)."""
    (top / "stuck").mkdir()
    (top / "stuck" / "file").write_bytes(b"x")
    subprocess.run(["chattr", "+i", str(top / "stuck" / "file")], check=True)


def immutable_far(top: Path) -> None:
    """An immutable file at the end of a path past PATH_MAX, under a name with escapes:
    whatever reports it must cut the path and escape the name."""
    names = [bytes([ord("a") + i % 26]) * LONG_NAME for i in range(LONG_LEVELS)]
    chain(top, [*names, CONTROL_NAMES[0]])
    fd = os.open(top, _DIR)
    try:
        for name in [*names, CONTROL_NAMES[0]]:
            inner = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = inner
        # chattr takes a path; /proc/self/fd names the directory without one.
        subprocess.run(["chattr", "+i", f"/proc/self/fd/{fd}/bottom"], check=True, pass_fds=(fd,))
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Row:
    """One container-written tree and what is done with the snapshot afterwards.

    Attributes:
        commit: Commit it (the usage walk) before removing the committed one.
        snapshotter: ``overlayfs`` or ``native``.
        parent: Prepare on a committed parent (overlay then mounts an overlay
            with an upper directory instead of binding one directory).
        removable: False when the kernel itself refuses removal: then
            ``snapshots rm`` may fail (cleanly), and ``gc`` must still work.
    """

    name: str
    write: Callable[[Path], None]
    commit: bool = False
    snapshotter: str = "overlayfs"
    parent: bool = False
    removable: bool = True


ROWS = [
    Row("deep-rm", deep),
    Row("deep-commit", deep, commit=True),
    Row("deep-rm-native", deep, snapshotter="native"),
    Row("deep-commit-native", deep, commit=True, snapshotter="native"),
    Row("deep-on-parent-rm", deep, parent=True),
    Row("long-rm", long_paths),
    Row("long-commit", long_paths, commit=True),
    Row("long-commit-native", long_paths, commit=True, snapshotter="native"),
    Row("control-names-commit", control_names, commit=True),
    Row("control-names-rm-native", control_names, snapshotter="native"),
    Row("wide-commit", wide, commit=True),
    Row("everything-on-parent-commit", everything, commit=True, parent=True),
    Row("immutable-file-rm", immutable, removable=False),
    Row("immutable-far-rm", immutable_far, removable=False),
    Row("immutable-far-rm-native", immutable_far, snapshotter="native", removable=False),
]


def upper_dir(mounts: list[dict[str, object]]) -> Path:
    """Where the container's writes land, from a snapshot's Mount records."""
    (mount,) = mounts
    options = [str(o) for o in mount["options"]]  # type: ignore[attr-defined]
    for o in options:
        if o.startswith("upperdir="):
            return Path(o.removeprefix("upperdir="))
    return Path(str(mount["source"]))


def ok(o: Outcome) -> Outcome:
    check_success(o)
    return o


def run_case(row: Row, work: Path, seen: list[Outcome], neighbour: Path) -> None:
    root = work / "root"
    before = with_neighbour(root, neighbour)
    sn = ("snapshots", "-s", row.snapshotter)
    parent: tuple[str, ...] = ()
    if row.parent:
        for o in run_batch(root, (*sn, "prepare", "base-key"), (*sn, "commit", "base", "base-key")):
            check_success(o)
        parent = ("base",)
    upper = upper_dir(json.loads(ok(run(root, *sn, "prepare", "--json", "key", *parent)).stdout))
    try:
        row.write(upper)
        name = "key"
        if row.commit:
            commit = run(root, *sn, "commit", "committed", "key")
            seen.append(commit)
            check_success(commit)
            name = "committed"
        usage = run(root, *sn, "usage", "--json", name)
        seen.append(usage)
        check_success(usage)
        assert json.loads(usage.stdout)[0]["inodes"] > 1, usage.stdout
        rm = run(root, *sn, "rm", name)
        seen.append(rm)
        if row.removable:
            check_success(rm)
        elif rm.code != 0:
            check_failure(rm)
        # Garbage beside the tree: gc must carry on past what it cannot remove.
        orphan = run_batch(
            root, (*sn, "prepare", "orphan-key"), (*sn, "commit", "orphan", "orphan-key")
        )
        for o in orphan:
            check_success(o)
        seen.append(check_gc(root, may_report=not row.removable))
        listed = ok(run(root, *sn, "ls", "--json"))
        keys = {i["name"] for i in json.loads(listed.stdout)}
        assert not keys & {name, "key", "orphan"}, keys
        if row.removable:
            assert not os.path.lexists(upper), f"{upper} is still there"
        check_store(root, before, gc_may_report=not row.removable)
    finally:
        release(root, immutable=not row.removable)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_hostile_container_tree(
    row: Row, neighbour: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    recorded(
        tmp_path_factory.getbasetemp(),
        "containers",
        row.name,
        lambda seen: run_case(row, tmp_path / "case", seen, neighbour),
    )
