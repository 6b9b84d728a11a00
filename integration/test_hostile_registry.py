"""The hostile registry suite: ckfs against a registry written by an adversary.

Every row of `ROWS` is one case: a behaviour of `integration.hostile_registry`
(chosen by the repository name) and the ckfs command pointed at it. Each
must fail cleanly (`integration.hostile.check_failure`), in bounded time and
memory, and leave the store as usable as before (`check_store`). Rows that
make the registry slow pass ``--timeout`` so the case takes seconds, not the
default budget's minutes.

Runs confined (the file name starts with ``test_hostile``): a ckfs that
wrote outside its root would fail with EROFS instead of changing the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import select
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.hostile import (
    BUDGET,
    MARKS,
    REPO,
    Outcome,
    check_failure,
    check_store,
    check_success,
    image_names,
    neighbour_template,
    nothing_changes_outside,
    recorded,
    release,
    results,
    run,
    with_neighbour,
    write_layout,
)
from integration.hostile_registry import (
    CASES,
    CONFIG_CHANGES,
    INDEX_CHANGES,
    MANIFEST_CHANGES,
    OCI_INDEX,
    USER,
    Image,
)
from snapshotters.fuse.process import stop_server

pytestmark = MARKS


@pytest.fixture(scope="session")
def neighbour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return neighbour_template(tmp_path_factory.getbasetemp())


#: Seconds the server lives at most; the session's fixture stops it sooner.
SERVER_LIFETIME = 900


@dataclasses.dataclass(frozen=True)
class Server:
    port: int
    storage_port: int

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ref(self, case: str) -> str:
        return f"{self.host}/{case}/img:latest"

    def log(self, case: str) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://{self.host}/_log/{case}", timeout=10) as f:
            seen: list[dict[str, Any]] = json.loads(f.read())
        return seen


@pytest.fixture(scope="session")
def hostile_server() -> Iterator[Server]:
    """The hostile registry as a process of its own, stopped by its PID."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "integration.hostile_registry", "--lifetime", str(SERVER_LIFETIME)],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the hostile registry did not start"
        port, storage = proc.stdout.readline().split()
        yield Server(int(port), int(storage))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclasses.dataclass(frozen=True)
class Row:
    """One case: the server behaviour and what ckfs is asked.

    Attributes:
        case: The `integration.hostile_registry.CASES` entry.
        command: ckfs's command (``pull``, ``fetch``, ``mount``, ``rootfs``).
        extra: More options (``{budget}`` is `BUDGET`).
        match: A regex the error line must contain (what the issue says it names).
        ingests: ``none`` or ``bounded`` (see `check_store`); by default
            as `_ingests` says.
        layer_gets: Most GETs of layer blobs allowed (refusals before download: 0).
        no_credentials_out: The registry's credentials must reach neither the
            storage port nor any realm it names.
        present: Import the case's image under its name first (re-pull cases).
        codes: Exit statuses allowed (0 only where the issue lets the command
            succeed, e.g. a pull of an image whose config is hostile).
        registers: The case may leave its name registered (see `check_store`).
        id: The test id (default: the case).
    """

    case: str
    command: str = "pull"
    extra: tuple[str, ...] = ()
    match: str | None = None
    ingests: str = ""
    layer_gets: int | None = None
    no_credentials_out: bool = False
    present: bool = False
    codes: tuple[int, ...] = (1,)
    registers: bool = False
    id: str = ""

    @property
    def name(self) -> str:
        return self.id or (self.case if self.command == "pull" else f"{self.case}-{self.command}")


T = ("--timeout", "{budget}")
DEEP = "nested deeper"
ROWS = [
    # Deep JSON: every document ckfs parses from a registry.
    Row("deep-manifest", match=DEEP),
    Row("deep-manifest", "fetch", match=DEEP),
    Row("deep-manifest", "mount", match=DEEP),
    Row("deep-manifest-sniffed", match=DEEP),
    Row("deep-index", match=DEEP),
    Row("deep-config", "rootfs", match=DEEP, registers=True),
    Row("deep-config", codes=(0, 1), registers=True),
    Row("deep-token", match=DEEP),
    Row("deep-manifest-900", match=DEEP),
    Row("deep-config-900", "rootfs", match=DEEP, registers=True),
    Row("deep-token-900", match=DEEP),
    Row("deep-error-manifest"),
    Row("deep-error-blob"),
    Row("deep-error-token"),
    # Redirect loops on manifests, blobs and the token realm; broken redirects.
    Row("loop-head", match="redirect"),
    Row("loop-manifest-get", match="redirect"),
    Row("loop-blob", match="redirect"),
    Row("loop-token", match="redirect"),
    Row("loop-cross-host", match="redirect"),
    Row("redirect-bad-scheme"),
    Row("redirect-bad-url", extra=T),
    Row("redirect-no-location"),
    # A storage host's 401 is not the registry's challenge: refused, no credential leaves.
    Row("storage-401-basic", extra=("-u", USER), match="storage host", no_credentials_out=True),
    Row("storage-401-bearer", extra=("-u", USER), match="storage host", no_credentials_out=True),
    # Challenges and token answers written by an adversary.
    Row("auth-header-200k", extra=T),
    Row("auth-realm-60k"),
    Row("auth-params-5000"),
    Row("auth-realm-file"),
    Row("auth-no-realm"),
    Row("auth-unterminated"),
    Row("auth-realm-evil"),
    Row("auth-unknown-scheme"),
    Row("token-endless"),
    Row("token-endless", "fetch"),
    Row("token-1gib"),
    Row("token-trickle", extra=T),
    Row("token-stall", extra=T),
    Row("token-not-json"),
    Row("token-wrong-type"),
    Row("token-crlf"),
    Row("token-900k"),
    Row("token-rejected"),
    # Token lifetimes that break date arithmetic; URLs no client can use.
    Row("token-expires-huge", codes=(0, 1), registers=True),
    Row("token-expires-negative", codes=(0, 1), registers=True),
    Row("token-issued-far", codes=(0, 1), registers=True),
    Row("token-issued-garbage", codes=(0, 1), registers=True),
    Row("auth-realm-bad-port"),
    Row("auth-realm-bad-ipv6"),
    Row("redirect-bad-port"),
    Row("retry-after-negative", extra=T),
    Row("retry-after-year-9999", extra=T),
    # Endless and oversized bodies.
    Row("manifest-endless"),
    Row("manifest-declared-huge"),
    Row("manifest-head-huge"),
    Row("error-endless"),
    Row("blob-endless"),
    Row("blob-longer"),
    Row("error-evil"),
    # Trickles and stalls: an overall deadline, not a per-read timeout, ends them.
    Row("trickle-head", extra=T),
    Row("trickle-manifest", extra=T),
    Row("trickle-blob", extra=T),
    Row("trickle-blob", "fetch", extra=T),
    Row("trickle-peek", extra=T, present=True),
    Row("stall-head", extra=T),
    Row("stall-head", "mount", extra=T),
    Row("stall-blob", extra=T),
    # Retry-After beyond the cap fails at once and names the delay asked for.
    Row("retry-after-3600-429", match="3600"),
    Row("retry-after-3600-503", match="3600"),
    Row("retry-after-date", extra=T),
    Row("retry-after-30", extra=T),
    Row("retry-after-huge", extra=T),
    Row("always-503", extra=T),
    # Lying sizes and digests.
    Row("head-digest-lie"),
    Row("manifest-length-lie"),
    Row("blob-wrong-bytes"),
    Row("blob-short", extra=T),
    Row("blob-bad-range"),
    Row("layer-size-huge", layer_gets=0),
    Row(
        "layer-size-16tib",
        extra=("--max-blob-size", str(1 << 50)),
        match="free",
        layer_gets=0,
    ),
    Row("layer-size-4k", extra=("--max-blob-size", "1024"), match="1024", layer_gets=0),
    Row("config-size-huge"),
    Row("index-child-huge"),
    # Index cycles faked by wrong bytes; chains of nested indexes.
    Row("index-cycle"),
    Row("index-cycle-unlabelled"),
    Row("index-chain-300"),
    # More layers than the snapshotter can stack: refused before fetching.
    Row("layers-5000", "rootfs", match="layer", layer_gets=0, registers=True),
    # Not HTTP, or HTTP no client accepts.
    Row("garbage"),
    Row("bad-content-length", extra=T),
    Row("headers-100k", extra=T),
    Row("digest-header-evil"),
    Row("manifest-bad-digests"),
]

# Honest but extreme layers unpack, and the store stays usable; a tree deeper
# than the layer applier's limit is refused by it, cleanly.
ROWS += [
    Row("layer-long-path", "rootfs", codes=(0,), registers=True),
    Row("layer-deep-500", "rootfs", codes=(0,), registers=True),
    Row("layer-deep-tree", "rootfs", match="nested too deep", registers=True),
]

# Documents at their size limit made of one long string: memory stays bounded.
ROWS += [
    Row("manifest-long-string", codes=(0, 1), registers=True),
    Row("config-long-string", "rootfs", codes=(0, 1), registers=True),
    Row("token-long-string"),
]

# The re-pull of a present image: its peek (one HEAD, through the standard
# library, and the token round trip) meets the same hostility first.
ROWS += [
    Row(case, extra=T, present=True, id=f"{case}-repull")
    for case in (
        "deep-token",
        "token-endless",
        "token-1gib",
        "token-trickle",
        "loop-head",
        "loop-token",
        "retry-after-3600-429",
        "stall-head",
        "garbage",
        "headers-100k",
        "auth-header-200k",
        "auth-realm-file",
        "head-digest-lie",
        "manifest-head-huge",
        "digest-header-evil",
    )
]

# Type confusion and odd values in manifests, indexes and configs: a clean
# refusal, or (where a lenient reading is fair) a pull that works and a
# store that still lists, inspects and collects the image.
ROWS += [
    Row(name, codes=(0, 1) if lenient else (1,), registers=lenient)
    for name, _, lenient in MANIFEST_CHANGES + INDEX_CHANGES
]
ROWS += [
    Row(name, "pull", codes=(0, 1), registers=True)
    if lenient
    else Row(name, "rootfs", registers=True)
    for name, _, lenient in CONFIG_CHANGES
]

#: Commands that unpack layers into snapshots.
_UNPACKS = {"rootfs", "mount"}

#: Commands whose progress goes to stderr unless quiet.
_QUIET = {"pull", "fetch"}


def command(row: Row, server: Server, work: Path) -> list[str]:
    args = [row.command]
    if row.command in _QUIET:
        args.append("-q")
    args += ["--plain-http", *(a.replace("{budget}", BUDGET) for a in row.extra)]
    args.append(server.ref(row.case))
    if row.command == "mount":
        args.append(str(work / "mnt"))
    return args


def _layer_digests(img: Image) -> set[str]:
    media_type, body = img.manifests[img.top]
    if media_type == OCI_INDEX:
        return set()
    doc = json.loads(body)
    return {str(d.get("digest")) for d in doc.get("layers", [])}


def _ingests(row: Row) -> str:
    """What a failing case may leave: blobs fetched beside the failing one (a
    blob-stage fault, or an unpack whose config fails while layers arrive)
    may keep what they received."""
    if row.ingests:
        return row.ingests
    case = CASES[row.case]
    return "bounded" if case.blob or case.storage or row.command in _UNPACKS else "none"


def check_server_side(row: Row, server: Server) -> None:
    seen = server.log(row.case)
    if row.layer_gets is not None:
        layers = _layer_digests(CASES[row.case].image)
        gets = [s for s in seen if s["method"] == "GET" and s["path"].split("/")[-1] in layers]
        assert len(gets) <= row.layer_gets, gets[:5]
    if row.no_credentials_out:
        leaked = [s for s in seen if s["port"] == "storage" and s["authorization"]]
        assert leaked == [], leaked
        realm = [s for s in seen if s["path"].endswith("/token") and s["port"] == "storage"]
        assert realm == [], realm


def run_case(row: Row, work: Path, seen: list[Outcome], neighbour: Path, *, server: Server) -> None:
    """Run *row* in *work* (fresh root) and assert everything the suite demands.

    The main command's outcome goes to *seen* before anything is asserted,
    so the summary has it even when the case fails.
    """
    root = work / "root"
    work.mkdir(parents=True, exist_ok=True)
    before = with_neighbour(root, neighbour)
    if row.present:
        layout = write_layout(CASES[row.case].image, work / "present")
        check_success(run(root, "import", "--name", server.ref(row.case), str(layout)))
        before.append(server.ref(row.case))
    try:
        with nothing_changes_outside(work, root):
            o = run(root, *command(row, server, work))
            seen.append(o)
            assert o.code in row.codes, o.describe()
            if o.code == 0:
                check_success(o)
            else:
                check_failure(o, row.match)
            check_store(
                root,
                before,
                ingests_allowed=_ingests(row),
                may_register=server.ref(row.case) if row.registers else None,
            )
    finally:
        if row.command in _UNPACKS:
            # A lazy mount's FUSE server outlives ckfs on purpose: stopped by its PID
            # before release() removes the lock and pid files that name it.
            stop_server(root)
            release(root)  # unpacked layers may hold trees deeper than pytest can remove
    check_server_side(row, server)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_hostile_registry(
    row: Row,
    neighbour: Path,
    hostile_server: Server,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    recorded(
        tmp_path_factory.getbasetemp(),
        "registry",
        row.name,
        lambda seen: run_case(row, tmp_path / "case", seen, neighbour, server=hostile_server),
    )


def test_controls_pull_cleanly(hostile_server: Server, tmp_path: Path) -> None:
    """The server's faithful cases pull: a hostile case fails by its own doing."""
    for case, extra in (("good", ()), ("good-bearer", ()), ("good-storage", ("-u", USER))):
        root = tmp_path / case / "root"
        check_success(run(root, "pull", "-q", "--plain-http", *extra, hostile_server.ref(case)))
        assert image_names(root) == [hostile_server.ref(case)]
    seen = hostile_server.log("good-storage")
    assert any(s["port"] == "storage" for s in seen)
    assert not any(s["port"] == "storage" and s["authorization"] for s in seen)


def test_enough_cases() -> None:
    assert len(ROWS) >= 60
    assert {r.case for r in ROWS} <= set(CASES)
    assert len({r.name for r in ROWS}) == len(ROWS)


def test_hostile_suite_summary(
    hostile_server: Server,
    neighbour: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The whole hostile suite: the catch-all never fired; peak RSS and wall time per case.

    Runs last (conftest's ``LAST``, whatever order the files are named in)
    and reads what the cases recorded; any case not run in this session (a
    run of one file alone) is run here first.
    """
    from integration import test_hostile_archives as archives
    from integration import test_hostile_containers as containers

    base = tmp_path_factory.getbasetemp()
    done = {(r["suite"], r["case"]) for r in results(base)}
    suites: list[tuple[str, list[Any], Callable[[Any, Path, list[Outcome], Path], None]]] = [
        ("archives", archives.ROWS, archives.run_case),
        ("containers", containers.ROWS, containers.run_case),
        ("registry", ROWS, functools.partial(run_case, server=hostile_server)),
    ]
    for suite, rows, run_one in suites:
        for row in rows:
            if (suite, row.name) in done:
                continue
            with contextlib.suppress(Exception):  # the case's own failure is in the record
                work = tmp_path / suite / row.name
                case = functools.partial(run_one, row, work, neighbour=neighbour)
                recorded(base, suite, row.name, case)
    everything = results(base)
    print(f"\n{'suite':10} {'case':34} {'exit':>4} {'seconds':>7} {'MiB':>6}  outcome")
    for r in everything:
        outcome = "ok" if r["failed"] is None else f"FAILED {r['failed'][:90]!r}"
        print(
            f"{r['suite']:10} {r['case']:34} {r['code']!s:>4} {r['seconds']!s:>7} "
            f"{r['rss_mib']!s:>6}  {outcome}"
        )
    measured = [r for r in everything if r["seconds"] is not None]
    slowest = max(measured, key=lambda r: r["seconds"])
    biggest = max(measured, key=lambda r: r["rss_mib"])
    failed = [r["case"] for r in everything if r["failed"] is not None]
    print(
        f"{len(everything)} cases, {len(failed)} failed; slowest {slowest['case']} "
        f"{slowest['seconds']} s; peak RSS {biggest['case']} {biggest['rss_mib']} MiB"
    )
    expected = sum(len(rows) for _, rows, _ in suites)
    assert len({(r["suite"], r["case"]) for r in everything}) >= expected >= 60
    internal = [(r["case"], r["message"]) for r in everything if r["internal"]]
    assert internal == [], f"the catch-all fired: {internal}"
