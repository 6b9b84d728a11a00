"""What every case of the hostile suite asserts, in one place.

Each case runs the real ``ckfs`` CLI in a subprocess against a fresh
``--root`` and must end cleanly: `run` measures that child alone (its wall
time, and its peak RSS from `os.wait4` in a small launcher, which unlike
``RUSAGE_CHILDREN`` does not mix in other children of the test, nor the
size of the pytest process it would otherwise be forked from), `check_failure` holds the
failure to the CLI's contract (exit status, one escaped, bounded line, the
catch-all never reached), and `check_store` proves the store is still
usable afterwards (``images ls`` unchanged, ``content verify`` clean,
``gc`` working, no ingest left where the issue allows none).

Every outcome is also appended to a results file shared by the session, so
the summary (``test_hostile_suite_summary`` in
`integration.test_hostile_registry`) can report peak RSS and wall time per
case and assert over the whole suite that "internal error" never appeared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.hostile_registry import Image, image, tiny_tar

REPO = Path(__file__).resolve().parent.parent

#: Marks for every hostile suite: slow, and root only. As root each case runs
#: confined (`tests.confine`); without root there would be no confinement, and
#: device nodes, ``chattr`` and unpacking need root anyway.
MARKS = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: confinement, device nodes, chattr"),
]

#: Wall time a case may take (generous: the slow ones wait out a --timeout of `BUDGET`).
WALL_BOUND = 20.0

#: A ckfs still running this long is killed (by its PID) so the suite stays short.
HARD_LIMIT = 30.0

#: Peak RSS a ckfs process may reach on any case, in KiB (the issue's ~200 MB).
RSS_BOUND_KIB = 200 * 1024

#: Starts each ckfs and measures it (see its docstring for why not pytest itself).
LAUNCHER = Path(__file__).resolve().parent / "hostile_launch.py"

#: Address space a ckfs child may reserve: a case that would read gigabytes
#: into memory fails with MemoryError (visible as an internal error) instead
#: of swapping a machine others share.
ADDRESS_SPACE_LIMIT = 4 << 30

#: ``--timeout`` given to transfers that the registry makes slow.
BUDGET = "1"

#: An error line longer than this is not "bounded" (messages cut long values).
MAX_MESSAGE = 1200

#: C0 and C1 controls and DEL: what must never reach a terminal raw.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

#: The results file, one JSON object per line, under the session's base temp dir.
RESULTS_NAME = "hostile-results.jsonl"


@dataclasses.dataclass
class Outcome:
    """One finished ckfs process."""

    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str
    seconds: float
    rss_kib: int
    killed: bool

    @property
    def message(self) -> str:
        lines = self.stderr.splitlines()
        return lines[-1] if lines else ""

    def describe(self) -> str:
        return (
            f"ckfs {' '.join(a[:80] for a in self.args)}: exit {self.code} in "
            f"{self.seconds:.1f}s, {self.rss_kib // 1024} MiB"
            f"{' (killed)' if self.killed else ''}\nstdout: {self.stdout[-1500:]}"
            f"\nstderr: {self.stderr[-1500:]!r}"
        )


def run(root: Path, *args: str) -> Outcome:
    """Run ``ckfs --root ROOT ARGS`` as its own process (output files beside
    *root*) through `integration.hostile_launch`, which measures the command's
    own peak RSS and wall time and kills it by its PID after `HARD_LIMIT`.

    ``--no-daemon``: the work must happen in the measured, limited process, not
    in a ckfsd a lazy ``mount`` would start in the background."""
    argv = [sys.executable, "-m", "ckfs_cli.main", "--root", str(root), "--no-daemon", *args]
    work = root.parent
    work.mkdir(parents=True, exist_ok=True)
    report = work / "ckfs.rusage"
    report.unlink(missing_ok=True)  # a launcher that dies must not leave an earlier run's report
    env = {
        **os.environ,
        "COLUMNS": "200",
        # No credentials of this machine's user may reach a hostile registry.
        "DOCKER_CONFIG": str(work / "no-docker-config"),
    }
    # -S: the launcher needs no site-packages, and starts in half the time.
    launch = [sys.executable, "-S", str(LAUNCHER), str(HARD_LIMIT), str(report)]
    with (
        open(work / "ckfs.out", "w+b") as out,
        open(work / "ckfs.err", "w+b") as err,
    ):
        proc = subprocess.Popen(
            [*launch, str(ADDRESS_SPACE_LIMIT), "--", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=work,
            start_new_session=True,
        )
        try:
            proc.wait(HARD_LIMIT + 10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own group, launcher and command
            proc.wait()
        outcome = json.loads(report.read_text())
        out.seek(0)
        err.seek(0)
        return Outcome(
            args=("--root", str(root), *args),
            code=outcome["code"],
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            seconds=outcome["seconds"],
            rss_kib=outcome["rss_kib"],
            killed=outcome["killed"],
        )


def run_batch(root: Path, *commands: tuple[str, ...]) -> list[Outcome]:
    """Run the checks around a case (listing, verifying, collecting) on *root* in this process.

    They are not what a case measures, so they skip the interpreter start a
    subprocess costs (most of a quick case's time); each still goes through
    the CLI's own entry, `ckfs_cli.main._run`, exit status and error line
    included. Confined tests run in a forked child, so nothing a command
    leaves in this process outlives the test.
    """
    from ckfs_cli.main import _run

    done = []
    env = {"COLUMNS": "200", "DOCKER_CONFIG": str(root.parent / "no-docker-config")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for args in commands:
            out, err = io.StringIO(), io.StringIO()
            start = time.monotonic()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = _run(["--root", str(root), "--no-daemon", *args])
            done.append(
                Outcome(
                    args=args,
                    code=code,
                    stdout=out.getvalue(),
                    stderr=err.getvalue(),
                    seconds=time.monotonic() - start,
                    rss_kib=0,  # not measured: the checks share this process
                    killed=False,
                )
            )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return done


def check_bounds(o: Outcome) -> None:
    """Time, memory and the catch-all, for any ckfs run of the suite."""
    assert "internal error" not in o.stderr, o.describe()
    assert "Traceback" not in o.stderr, o.describe()
    assert not o.killed and o.seconds < WALL_BOUND, o.describe()
    assert o.rss_kib < RSS_BOUND_KIB, o.describe()


def check_failure(o: Outcome, match: str | None = None) -> str:
    """A clean failure: exit 1, one escaped bounded ``ckfs: `` line; the line."""
    check_bounds(o)
    assert o.code == 1, o.describe()
    lines = o.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckfs: "), o.describe()
    line = lines[0]
    assert not _CONTROL.search(line), f"unescaped control character: {line!r}"
    assert len(line) < MAX_MESSAGE, f"{len(line)} chars: {line[:300]!r}..."
    if match is not None:
        assert re.search(match, line, re.IGNORECASE), f"{match!r} not in {line!r}"
    return line


def check_escaped(listing: str) -> None:
    """A listing shows untrusted strings escaped: no control character but newlines."""
    found = _CONTROL.search(listing.replace("\n", ""))
    assert found is None, f"unescaped {found.group()!r} in {listing[:500]!r}"


def check_success(o: Outcome) -> None:
    check_bounds(o)
    assert o.code == 0, o.describe()


def image_names(root: Path) -> list[str]:
    o = run(root, "images", "ls", "-q")
    check_success(o)
    return o.stdout.split()


def check_store(
    root: Path,
    names_before: list[str],
    *,
    ingests_allowed: str = "none",
    may_register: str | None = None,
    gc_may_report: bool = False,
) -> None:
    """The store after a hostile case: unchanged names, clean content, gc working.

    Args:
        ingests_allowed: ``none`` (a failure before any blob byte arrived
            leaves no ingest) or ``bounded`` (received bytes may be kept
            for resuming, never past the blob's size).
        may_register: A name the case may have registered (a pull that
            succeeded, or one that ``rootfs`` made before unpacking failed):
            then ``images inspect`` of it must end cleanly too.
        gc_may_report: ``gc`` may meet a record it cannot handle (see `check_gc`).
    """
    inspect = [("images", "inspect", may_register)] if may_register else []
    names, table, blobs, verify, active, *rest = run_batch(
        root,
        ("images", "ls", "-q"),
        ("images", "ls"),
        ("content", "ls"),
        ("content", "verify"),
        ("content", "active", "--json"),
        *inspect,
        ("gc",),
        ("images", "ls", "-q"),
        ("content", "verify"),
    )
    for o in (names, table, blobs, verify, active, *rest[-2:]):
        check_success(o)
    for listed in (table, blobs):
        check_escaped(listed.stdout)
    expected = set(names_before)
    if may_register is not None and may_register in names.stdout.split():
        expected.add(may_register)
        if rest[0].code != 0:
            check_failure(rest[0])
        check_escaped(rest[0].stdout)
    assert set(names.stdout.split()) == expected, f"images {names.stdout!r}, before {names_before}"
    kept: list[dict[str, Any]] = json.loads(active.stdout or "[]")
    if ingests_allowed == "none":
        assert kept == [], f"ingests left: {kept}"
    for i in kept:
        assert i["total"] and 0 < i["offset"] <= i["total"], f"ingest past its size: {i}"
    if kept:
        check_ingests_go(root, kept)
    gc_check(rest[-3], may_report=gc_may_report)
    after = rest[-2].stdout.split()
    assert set(after) == expected, f"after gc, images {after}, before {names.stdout!r}"


#: A good image in every case's store, sharing no blob with any case: one bad
#: record must not break the others.
NEIGHBOUR = image(layers=[tiny_tar("neighbour", b"next door\n")])
NEIGHBOUR_NAME = "example.local/hostile/neighbour:latest"


def write_layout(img: Image, out: Path) -> Path:
    """*img* as an OCI layout directory."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    for digest, data in [*img.blobs.items(), *((d, b) for d, (_, b) in img.manifests.items())]:
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
    media_type, body = img.manifests[img.top]
    entry = {"mediaType": media_type, "digest": img.top, "size": len(body)}
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return out


def check_ingests_go(root: Path, kept: list[dict[str, Any]]) -> None:
    """Kept ingests survive a gc while fresh; ``content abort REF`` removes one,
    ``gc --ingest-expiry 0`` the rest, and ``content abort --all`` finds none left."""
    first = kept[0]["ref"]
    steps = run_batch(
        root,
        ("gc", "--ingest-expiry", "1h"),
        ("content", "active", "--json"),
        ("content", "abort", first),
        ("content", "active", "--json"),
        ("gc", "--ingest-expiry", "0"),
        ("content", "active", "--json"),
        ("content", "abort", "--all"),
    )
    for o in steps:
        check_success(o)
    active = [[i["ref"] for i in json.loads(o.stdout or "[]")] for o in steps[1:6:2]]
    assert active[0] == [i["ref"] for i in kept], f"gc took fresh ingests: {active[0]}"
    assert first not in active[1], f"content abort {first} left it"
    assert active[2] == [], f"gc --ingest-expiry 0 left {active[2]}"


def neighbour_template(base: Path) -> Path:
    """A root holding only `NEIGHBOUR`, made once under *base* and copied into each case.

    Copying a root costs milliseconds where an import costs a process; the
    template is made the same way either time, so a race between two makers
    only wastes one of them.
    """
    template = base / "hostile-neighbour-root"
    if template.exists():
        return template
    work = base / f"hostile-neighbour-{os.getpid()}"
    layout = write_layout(NEIGHBOUR, work / "layout")
    check_success(run(work / "root", "import", "--name", NEIGHBOUR_NAME, str(layout)))
    # The same commands the checks run, once here in the session's process:
    # forked (confined) tests then find ckfs's modules imported.
    for o in run_batch(work / "root", *_WARM):
        check_success(o)
    with contextlib.suppress(OSError):  # another maker was first
        (work / "root").rename(template)
    return template


#: Commands whose modules `neighbour_template` imports ahead of the tests.
_WARM = (
    ("images", "ls"),
    ("images", "inspect", NEIGHBOUR_NAME),
    ("content", "ls"),
    ("content", "verify"),
    ("content", "active", "--json"),
    ("snapshots", "ls"),
    ("gc", "--dry-run"),
)


def with_neighbour(root: Path, template: Path) -> list[str]:
    """Make *root* a copy of the `neighbour_template`; the names it holds."""
    shutil.copytree(template, root, symlinks=True)
    return [NEIGHBOUR_NAME]


def check_gc(root: Path, *, may_report: bool = False) -> Outcome:
    """Run ``gc`` as its own process and hold it to `gc_check`."""
    return gc_check(run(root, "gc"), may_report=may_report)


def gc_check(gc: Outcome, *, may_report: bool = False) -> Outcome:
    """``gc`` succeeded, or (with *may_report*) carried on past what it could not
    handle and said so, one clean ``ckfs: `` line per record, exit 1."""
    check_bounds(gc)
    if gc.code == 0 or not may_report:
        check_success(gc)
        return gc
    assert gc.code == 1, gc.describe()
    errors = [line for line in gc.stderr.splitlines() if line.startswith("ckfs: ")]
    assert errors, gc.describe()
    for line in errors:
        assert not _CONTROL.search(line), f"unescaped control character: {line!r}"
        assert len(line) < MAX_MESSAGE, f"{len(line)} chars: {line[:300]!r}..."
    return gc


def release(root: Path, *, immutable: bool = False) -> None:
    """Remove *root* whatever ckfs left in it: trees of any depth, immutable files.

    Python's own tree walkers recurse (3.11) and fail on a tree 1,500 deep,
    pytest's clean-up of old temp dirs included, which would then fail every
    later session; ``chattr`` and ``rm`` do not recurse on the stack.
    """
    if immutable:
        # -execdir names each file relative to its own directory, so a path
        # past PATH_MAX is no obstacle (chattr -R would take whole paths).
        subprocess.run(
            ["find", str(root), "-xdev", "-type", "f", "-execdir", "chattr", "-i", "{}", "+"],
            check=False,
            capture_output=True,
        )
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def listing(top: Path, skip: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under *top* but *skip*: (mode, size, mtime) without following links."""
    seen: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = here / name
            if p == skip:
                continue
            st = p.lstat()
            seen[str(p.relative_to(top))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return seen


@contextlib.contextmanager
def nothing_changes_outside(top: Path, root: Path) -> Iterator[None]:
    """Assert that nothing under *top* but *root* (and our own output files) changes."""
    before = listing(top, root)
    yield
    after = listing(top, root)
    for name in ("ckfs.out", "ckfs.err", "ckfs.rusage"):
        before.pop(name, None)
        after.pop(name, None)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:10]


def record(base: Path, suite: str, case: str, o: Outcome | None, error: str | None) -> None:
    """Append one case's outcome to the session's results file."""
    entry = {
        "suite": suite,
        "case": case,
        "code": o.code if o else None,
        "seconds": round(o.seconds, 2) if o else None,
        "rss_mib": round(o.rss_kib / 1024, 1) if o else None,
        "internal": bool(o and "internal error" in o.stderr),
        "message": o.message[:300] if o else "",
        "failed": error,
    }
    with open(base / RESULTS_NAME, "a") as f:
        f.write(json.dumps(entry) + "\n")


def recorded(base: Path, suite: str, case: str, fn: Callable[[list[Outcome]], None]) -> None:
    """Run the case *fn*, which puts the outcomes it measures in the list it gets;
    record the slowest."""
    seen: list[Outcome] = []
    error: str | None = None
    try:
        fn(seen)
    except BaseException as e:
        error = f"{type(e).__name__}: {str(e)[:300]}"
        raise
    finally:
        slowest = max(seen, key=lambda o: o.seconds, default=None)
        record(base, suite, case, slowest, error)


def results(base: Path) -> list[dict[str, Any]]:
    path = base / RESULTS_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]
