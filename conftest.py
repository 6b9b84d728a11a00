"""Suite-wide pytest configuration.

- Fixture plugins register here: pytest accepts ``pytest_plugins`` only in
  the top-level conftest (a nested one breaks ``pytest .``).
- A FUSE serving process or a background ckfsd a test started (a root
  under its ``tmp_path``) is stopped by its PID when the test ends, also on
  failure.
- Tests that feed the layer applier hostile archives as root run confined
  (see `tests.confine`): everything but the temp directory is read-only for
  them, so a containment bug fails the test instead of damaging the machine.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = [
    "integration.mounts",
    "integration.registry",
    "integration.estargz",
    "integration.inspect_images",
]

REPO = Path(__file__).resolve().parent

#: Test files whose tests run confined.
CONFINED = ("test_archive_", "test_hostile")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "confined: runs in a mount namespace where only temp dirs are writable"
    )


#: The hostile suite's summary reads what every other hostile case recorded
#: and runs the cases it does not find itself: run anywhere but last, it would
#: run the cases of the files named after it, and they would run twice.
LAST = "test_hostile_suite_summary"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name.startswith(CONFINED):
            item.add_marker(pytest.mark.confined)
    items.sort(key=lambda item: item.name == LAST)  # stable: the rest keep their order


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Any:
    if pyfuncitem.get_closest_marker("confined") is None:
        return None
    fn = pyfuncitem.obj
    if inspect.iscoroutinefunction(fn):
        return None
    from tests.confine import confined

    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    writable = [Path(tempfile.gettempdir()), REPO / ".hypothesis"]
    (REPO / ".hypothesis").mkdir(exist_ok=True)
    confined(writable, fn, **args)
    return True


#: Where a state root under a test's tmp_path keeps its FUSE server's lock.
_SERVER_LOCKS = ("fuse/server.lock", "*/fuse/server.lock", "*/*/fuse/server.lock")


#: Where a state root under a test's tmp_path keeps its ckfsd's lock (PID inside).
_DAEMON_LOCKS = ("locks/ckfsd", "*/locks/ckfsd", "*/*/locks/ckfsd")


@pytest.fixture(autouse=True)
def _no_fuse_server_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Stop the ckfsds and FUSE servers a test's ckfs roots started, by their lock files' PIDs.

    A lazy mount starts a serving process (and ``ckfs mount`` a ckfsd) that
    outlives its starter on purpose; in a test it must not outlive the test.
    """
    # Asked for before the test (not after): tmp_path is then torn down after
    # this fixture, not before it.
    if "tmp_path" not in request.fixturenames:
        yield
        return
    tmp: Path = request.getfixturevalue("tmp_path")
    yield
    # ckfsds ``ckfs mount`` started in the background (ckfs.client.start_daemon) first.
    daemons = [lock for pattern in _DAEMON_LOCKS for lock in tmp.glob(pattern)]
    if daemons:
        from ckfs.client import stop_daemon

        for lock in daemons:
            stop_daemon(lock.parent.parent)
    locks = [lock for pattern in _SERVER_LOCKS for lock in tmp.glob(pattern)]
    if locks:
        from snapshotters.fuse.process import stop_server

        for lock in locks:
            stop_server(lock.parent.parent)
