"""What every case of the hostile suite asserts, in one place.

Each case runs the real ``ckfs`` CLI in a subprocess against a fresh
``--root`` and must end cleanly: `run` measures that child alone (its wall
time, and its peak RSS from `os.wait4`, which unlike ``RUSAGE_CHILDREN``
does not mix in other children of the test), `check_failure` holds the
failure to the CLI's contract (exit status, one escaped, bounded line, the
catch-all never reached), and `check_store` proves the store is still
usable afterwards (``images ls`` unchanged, ``content verify`` clean,
``gc`` working, no ingest left where the issue allows none).

Every outcome is also appended to a results file shared by the session, so
`integration.test_hostile_summary` can report peak RSS and wall time per
case and assert over the whole suite that "internal error" never appeared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from integration.hostile_registry import Image, image, tiny_tar

REPO = Path(__file__).resolve().parent.parent

#: Wall time a case may take (generous: the slow ones wait out a --timeout of `BUDGET`).
WALL_BOUND = 20.0

#: A ckfs still running this long is killed (by its PID) so the suite stays short.
HARD_LIMIT = 30.0

#: Peak RSS a ckfs process may reach on any case, in KiB (the issue's ~200 MB).
RSS_BOUND_KIB = 200 * 1024

#: Address space a ckfs child may reserve: a case that would read gigabytes
#: into memory fails with MemoryError (visible as an internal error) instead
#: of swapping a machine others share.
ADDRESS_SPACE_LIMIT = 4 << 30

#: ``--timeout`` given to transfers that the registry makes slow.
BUDGET = "3"

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


def _limit_memory() -> None:  # pragma: no cover - runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run(root: Path, *args: str, hard_limit: float = HARD_LIMIT) -> Outcome:
    """Run ``ckfs --root ROOT ARGS``; its own wall time and peak RSS."""
    work = root.parent
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "COLUMNS": "200",
        # No credentials of this machine's user may reach a hostile registry.
        "DOCKER_CONFIG": str(work / "no-docker-config"),
    }
    with (
        open(work / "ckfs.out", "w+b") as out,
        open(work / "ckfs.err", "w+b") as err,
    ):
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckfs_cli.main", "--root", str(root), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=work,
            preexec_fn=_limit_memory,
        )
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not killed and time.monotonic() - start > hard_limit:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.005)
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Outcome(
            args=args,
            code=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            seconds=seconds,
            rss_kib=usage.ru_maxrss,
            killed=killed,
        )


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


def check_success(o: Outcome) -> None:
    check_bounds(o)
    assert o.code == 0, o.describe()


def image_names(root: Path) -> list[str]:
    o = run(root, "images", "ls", "-q")
    check_success(o)
    return o.stdout.split()


def ingests(root: Path) -> list[dict[str, Any]]:
    o = run(root, "content", "active", "--json")
    check_success(o)
    found: list[dict[str, Any]] = json.loads(o.stdout or "[]")
    return found


def check_store(
    root: Path,
    names_before: list[str],
    *,
    ingests_allowed: str = "none",
    may_register: str | None = None,
) -> None:
    """The store after a hostile case: unchanged names, clean content, gc working.

    Args:
        ingests_allowed: ``none`` (a failure before any blob byte arrived
            leaves no ingest) or ``bounded`` (received bytes may be kept
            for resuming, never past the blob's size).
        may_register: A name the case may have registered (a pull that
            succeeded, or one that ``rootfs`` made before unpacking failed):
            then ``images inspect`` of it must end cleanly too.
    """
    expected = set(names_before)
    names = image_names(root)
    if may_register is not None and may_register in names:
        expected.add(may_register)
        inspect = run(root, "images", "inspect", may_register)
        if inspect.code != 0:
            check_failure(inspect)
    assert set(names) == expected, f"images now {names}, before {names_before}"
    check_success(run(root, "images", "ls"))
    verify = run(root, "content", "verify")
    check_success(verify)
    kept = ingests(root)
    if ingests_allowed == "none":
        assert kept == [], f"ingests left: {kept}"
    for i in kept:
        assert i["total"] and 0 < i["offset"] <= i["total"], f"ingest past its size: {i}"
    check_success(run(root, "gc"))
    after = image_names(root)
    assert set(after) == expected, f"after gc, images {after}, before {names}"
    check_success(run(root, "content", "verify"))


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


def with_neighbour(root: Path) -> list[str]:
    """Import `NEIGHBOUR` into *root*; the names now registered."""
    layout = write_layout(NEIGHBOUR, root.parent / "neighbour")
    check_success(run(root, "import", "--name", NEIGHBOUR_NAME, str(layout)))
    return image_names(root)


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
    for name in ("ckfs.out", "ckfs.err"):
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
    """Run the case *fn* (which puts its main outcome in the list it gets); record it."""
    seen: list[Outcome] = []
    error: str | None = None
    try:
        fn(seen)
    except BaseException as e:
        error = f"{type(e).__name__}: {str(e)[:300]}"
        raise
    finally:
        record(base, suite, case, seen[0] if seen else None, error)


def results(base: Path) -> list[dict[str, Any]]:
    path = base / RESULTS_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]
