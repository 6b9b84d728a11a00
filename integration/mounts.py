"""Mount hygiene for tests that mount: nothing a test mounts outlives it.

A test that fails between ``mount_all`` and its unmount would otherwise leave
an overlay (or a FUSE mount) behind, which breaks pytest's removal of old
temporary directories and every later run's view of ``/proc/self/mounts``.
The `mount_guard` fixture records what a test mounts and, at teardown,
lazily unmounts everything still mounted under the test's own ``tmp_path``
(deepest first) — and nothing outside it, so tests running beside it, or
the machine's own mounts, are never touched.

Registered for ``integration/`` by ``pytest_plugins`` in its conftest; a unit
test module that mounts imports the fixture by name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ckfs.mount import Mount, mount_all, mounts_under, unmount, unmount_all

__all__ = ["MountGuard", "mount_guard"]

log = logging.getLogger(__name__)


class MountGuard:
    """Mounts for one test, all below *base*, undone at teardown.

    Args:
        base: the test's private directory (its ``tmp_path``).
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        #: Targets mounted through this guard, in order.
        self.mounted: list[Path] = []

    def mount(self, mounts: Sequence[Mount], target: Path) -> Path:
        """`ckfs.mount.mount_all` on *target* (created if missing), recorded.

        Raises:
            ValueError: *target* is outside the guarded directory.
        """
        self._check(target)
        target.mkdir(parents=True, exist_ok=True)
        mount_all(mounts, target)
        self.mounted.append(target)
        return target

    def unmount(self, target: Path) -> None:
        """Unmount everything stacked on *target* (the test's own, normal unmount)."""
        self._check(target)
        unmount_all(target)

    def leftovers(self) -> list[str]:
        """Mount points still mounted under the guarded directory."""
        return [m.mountpoint for m in mounts_under(self.base)]

    def release(self) -> list[str]:
        """Lazily detach whatever is still mounted under the guarded directory.

        Returns:
            The mount points detached (repeated once per stacked mount).
        """
        detached: list[str] = []
        # Each round detaches the current deepest-first list; a lazy detach
        # of a parent takes its children with it, so rounds end quickly.
        for _ in range(100):
            left = mounts_under(self.base)
            if not left:
                break
            for m in left:
                try:
                    unmount(m.mountpoint, lazy=True)
                except Exception as e:  # keep going: the rest must still go
                    log.warning("mount_guard: cannot detach %s: %s", m.mountpoint, e)
                else:
                    detached.append(m.mountpoint)
        return detached

    def _check(self, target: Path) -> None:
        if not target.resolve().is_relative_to(self.base.resolve()):
            raise ValueError(f"{target} is outside the guarded {self.base}")


@pytest.fixture
def mount_guard(tmp_path: Path) -> Iterator[MountGuard]:
    """A `MountGuard` for this test's ``tmp_path``; teardown detaches leftovers."""
    guard = MountGuard(tmp_path)
    yield guard
    detached = guard.release()
    if detached:
        log.info("mount_guard: detached leftovers %s", detached)
