"""``ckfs explore`` on the inspect image (integration/inspect_images.py), for real.

The image is recorded lazily (``pull --lazy``: tar is indexed by range,
eStargz by its TOC) or pulled whole (gzip, and zstd, which only an "eager"
inspection index reads) from a real docker-registry behind the counting
proxy, and the explorer runs on it with textual's pilot, as in
tests/test_explore.py but on `ckfs.inspect.ImageLayers` over the real store,
showing the same in every encoding:

- it opens and shows the tree, the layers and provenance with no layer
  data fetched;
- a preview fetches that file's bytes only: its chunk (eStargz) or the
  span holding it (tar), never the whole layer;
- a layer's view and the wasted-space panel come from the indexes alone.

And the command itself in a pseudo-terminal: it draws, ``q`` quits with
status 0; an unknown image is one error line and status 1.
"""

from __future__ import annotations

import fcntl
import functools
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pytest

from ckfs.explore.model import opened
from ckfs.layerindex.tarindex import SPAN
from ckfs.state import State
from integration.conftest import Ckfs, need
from integration.inspect_images import VARIANTS, InspectImages
from integration.mounts import MountGuard
from integration.test_partial import assert_clean, image, layout
from tests.test_explore import explore, press, text_of, tree_rows

if TYPE_CHECKING:  # textual when a test runs, not when the suite is collected
    from textual.pilot import Pilot

    from ckfs.explore.app import ExploreApp

__all__ = ["image", "layout"]  # fixtures, used by name

pytestmark = pytest.mark.slow

#: The most one small file's preview may fetch: its eStargz chunk (a gzip
#: member of a few hundred bytes) or the tar span holding it; layer 1 holds
#: more than `BIG` bytes.
PREVIEW_FETCH = {"estargz": 64 << 10, "tar": SPAN}

#: Encodings ``pull --lazy`` records without fetching their layers; the
#: others are pulled whole (zstd is indexed for inspection from its blob).
LAZY = ("tar", "estargz")


def select_path(app: ExploreApp, path: str) -> None:
    """Move the tree's cursor to the loaded row of *path*."""
    tree: Any = app.query_one("#tree")
    for line in range(tree.last_line + 1):
        node = tree.get_node_at_line(line)
        if node is not None and node.data is not None and node.data.path == path:
            tree.move_cursor(node)
            return
    raise AssertionError(f"{path} is not in the tree: {tree_rows(app)}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_explore_a_lazily_recorded_image(
    ckfs: Ckfs, inspect_images: InspectImages, variant: str
) -> None:
    ref = inspect_images.ref(variant, proxied=True)
    ckfs.run("pull", *(["--lazy"] if variant in LAZY else []), ref)
    proxy = inspect_images.proxy
    proxy.clear()

    async def scenario(app: ExploreApp, pilot: Pilot[None]) -> None:
        assert tree_rows(app) == ["etc  L1", "lib → usr/lib  L1", "opt  L1", "usr  L1", "var  L1"]
        assert app.model is not None and len(app.model.layers) == 4
        assert proxy.body_bytes() == 0, "opening fetched layer data"
        await press(pilot, "down", "enter")  # etc
        assert "os-release" not in " ".join(tree_rows(app))  # deleted by layer 4
        select_path(app, "etc/motd")
        await press(pilot)
        assert text_of(app, "#preview") == "motd v3\n"
        assert "shadows layer 2, 1" in text_of(app, "#info")
        motd = proxy.body_bytes()
        assert (0 < motd <= PREVIEW_FETCH[variant]) if variant in LAZY else motd == 0, motd
        select_path(app, "etc/secret")  # layer 1's: more than BIG bytes in all
        await press(pilot)
        assert text_of(app, "#preview") == "s3cret\n"
        fetched = proxy.body_bytes()
        if variant in LAZY:
            assert 0 < fetched - motd <= PREVIEW_FETCH[variant], fetched - motd
        await press(pilot, *["right_square_bracket"] * 4)
        await press(pilot, "down", "enter")  # once layer 4's tree is there
        assert tree_rows(app) == ["etc  L4", "  - os-release  11 bytes  L1", "usr  L4"]
        await press(pilot, "w")
        assert text_of(app, "#space-summary").startswith("efficiency ")
        assert proxy.body_bytes() == fetched, "a layer's view or the space report fetched"

    state = State(ckfs.root)
    try:
        explore(functools.partial(opened, state, ref), scenario)
    finally:
        state.close()


#: One step of a terminal session: once the output since the last step
#: shows this (text, escapes removed; or raw bytes), type those keys.
Step = tuple[str | bytes, bytes]


def in_terminal(
    ckfs: Ckfs, *args: str, steps: Sequence[Step], timeout: float = 60
) -> tuple[int, str]:
    """Run ``ckfs ARGS`` on a pseudo-terminal, playing *steps*; return its exit
    status and its whole output with escapes removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckfs_cli.main", "--root", str(ckfs.root), *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm-256color"},
        start_new_session=True,
    )
    os.close(slave)
    out = b""
    since = 0  # where the output the next step looks at starts
    todo = list(steps)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            if todo:
                wanted, keys = todo[0]
                seen = out[since:] if isinstance(wanted, bytes) else _plain(out[since:])
                if wanted in seen:  # type: ignore[operator]
                    os.write(master, keys)
                    since = len(out)
                    todo.pop(0)
            if proc.poll() is not None and not ready:
                break
        assert not todo, f"never saw {todo[0][0]!r}:\n{_plain(out[since:])[-3000:]}"
        status = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return status, _plain(out)


def _plain(raw: bytes) -> str:
    """Terminal output without its escape sequences."""
    text = raw.decode("utf-8", "replace")
    return re.sub(r"\x1b(\[[0-9;?<>=]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])", "", text)


def test_explore_command_in_a_terminal(ckfs: Ckfs, inspect_images: InspectImages) -> None:
    ref = inspect_images.ref("tar")
    ckfs.run("pull", "--lazy", ref)
    # Layer 4's created_by, in the layer list: the image is open and drawn.
    status, shown = in_terminal(ckfs, "explore", ref, steps=[("tool2 /usr/bin/tool", b"q")])
    assert status == 0, shown
    assert "tool2 /usr/bin/tool" in shown, shown

    status, shown = in_terminal(ckfs, "explore", "127.0.0.1:1/nope:1", steps=[])
    assert status == 1
    last = shown.rstrip().splitlines()[-1]  # printed once the terminal is given back
    assert re.search(r"ckfs: image .*nope:1.*not found$", last), last


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, runc")
def test_shell_key_opens_ckfs_shell_at_the_chosen_layer(
    ckfs: Ckfs, image: str, mount_guard: MountGuard
) -> None:
    """The explorer hands its terminal to ``ckfs shell --upto 6`` and takes it back.

    The image is test_partial's: /data/file says "version 6" in layer 6.
    """
    need("runc")
    ckfs.run("pull", "--plain-http", "--lazy", image)
    status, shown = in_terminal(
        ckfs,
        *("explore", "--plain-http", image),
        steps=[
            ("all layers (merged)", b"]" * 6),
            ("layer 6: its changes", b"s"),
            (b"\x1b[?1049l", b"cat /data/file; exit 3\n"),  # the explorer left the screen
            ("Enter returns to the explorer", b"\n"),
            ("exited with status 3", b"q"),
        ],
        timeout=90,
    )
    assert status == 0, shown
    assert "version 6" in shown
    assert_clean(ckfs, mount_guard, "fuse")
