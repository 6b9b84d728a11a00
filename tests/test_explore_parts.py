"""The explorer's parts without its screen: previews, tree labels, the model's
change trees and searches, and the trio portal's lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from ckfs.archive.entry import Kind
from ckfs.explore.model import DELETED, Item, Model
from ckfs.explore.portal import TrioPortal
from ckfs.explore.preview import HEX_BYTES, PREVIEW_BYTES, hexdump, is_binary, render
from ckfs.inspect import Version
from ckfs.layerindex.model import Node
from tests.explore_image import StubImage, stub_image
from tests.test_explore import explore, press, tree_rows

# -- previews -------------------------------------------------------------------


def test_text_is_shown_escaped_and_binaries_in_hex() -> None:
    assert str(render(b"a\tb\nc\n", 6)) == "a       b\nc\n"
    csi = "\x1b[2J\u009b\n".encode()  # ESC, and a C1 CSI in UTF-8
    assert str(render(csi, len(csi))) == "\\x1b[2J\\x9b\n"
    assert is_binary(b"text\0more") and is_binary(b"\xff\xfe")
    assert not is_binary("é".encode()[:1])  # a character cut by the head's end
    shown = str(render(b"\0" * 1000, 1000)).splitlines()
    assert len(shown) == HEX_BYTES // 16 + 1
    assert shown[-1] == f"… binary: {HEX_BYTES} of 1000 bytes shown"
    assert hexdump(b"AB\n") == "00000000  41 42 0a" + " " * 39 + "  |AB.|"


def test_a_long_text_says_how_much_is_shown() -> None:
    data = b"x" * (PREVIEW_BYTES + 10)
    shown = str(render(data, 10 << 20))
    assert shown.endswith(f"… text: {PREVIEW_BYTES} of {10 << 20} bytes shown")
    # A head cut inside a character loses that character, not the text.
    assert str(render("aé".encode()[:2], 3)).startswith("a\n…")


def node(name: str, kind: Kind = Kind.FILE, **kw: object) -> Node:
    fields: dict[str, object] = dict(
        ino=2, parent=1, name=name, kind=kind, mode=0o644, uid=0, gid=0, size=0, mtime_ns=0
    )
    fields.update(rdev=0, link="", nlink=1, fino=1 << 20, data=-1, opaque=False)
    fields.update(kw)
    return Node(**fields)  # type: ignore[arg-type]


def test_tree_labels_escape_names_and_targets_from_the_image() -> None:
    from ckfs.explore import app as explore_app  # textual: when run (tests.test_explore)

    evil = node("\x1b]0;title\x07", Kind.SYMLINK, link="\x1b[31m")
    label = explore_app._label(Item(Version(2, "d/\x1b]0;title\x07", evil)), full_path=False)
    assert str(label) == "\\x1b]0;title\\x07 → \\x1b[31m  L2"
    gone = Item(Version(1, "d/f", node("f", size=5)), DELETED)
    label = explore_app._label(gone, full_path=True)
    assert str(label) == "- /d/f  5 bytes  L1"
    assert {str(s.style) for s in label.spans} == {"red strike", "dim"}


# -- the model ----------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Iterator[StubImage]:
    with stub_image(tmp_path) as img:
        yield img


def rows(items: list[Item]) -> list[tuple[str, str, int]]:
    return [(i.path, i.change, i.version.layer) for i in items]


async def test_a_layers_changes_come_with_the_directories_leading_to_them(
    image: StubImage,
) -> None:
    model = Model(image)
    assert rows(await model.children("", 2)) == [
        ("etc", "", 2),
        ("gone", DELETED, 1),
        ("opt", "", 2),
    ]
    assert rows(await model.children("opt/app", 2)) == [
        ("opt/app/new", "added", 2),
        ("opt/app/old", DELETED, 1),
    ]
    assert rows(await model.children("etc", 3)) == [
        ("etc/hosts", DELETED, 1),
        ("etc/motd", "modified", 3),
    ]
    # Layer 1 changes everything it has: all added.
    assert {i.change for i in await model.search("", 1)} == {"added"}


async def test_search_is_case_insensitive_and_bounded(image: StubImage) -> None:
    model = Model(image)
    assert rows(await model.search("MoTd")) == [("etc/motd", "", 3)]
    assert len(await model.search("", limit=3)) == 3
    assert rows(await model.search("hosts", 3)) == [("etc/hosts", DELETED, 1)]
    assert await model.search("hosts") == []  # gone from the merged tree


def test_a_directory_shows_a_bounded_number_of_rows(
    image: StubImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckfs.explore import app as explore_app

    monkeypatch.setattr(explore_app, "MAX_CHILDREN", 2)

    async def scenario(app: explore_app.ExploreApp, pilot: object) -> None:
        assert tree_rows(app) == ["bin  L1", "etc  L1", "… 2 more"]
        await press(pilot, "down", "down", "down")  # type: ignore[arg-type]
        assert app.query_one("#tree").cursor_node.data is None  # type: ignore[attr-defined]  # the count: nothing to preview

    explore(image, scenario)  # type: ignore[arg-type]


# -- the portal ---------------------------------------------------------------


def test_portal_runs_trio_calls_and_passes_their_errors() -> None:
    async def main() -> None:
        async with TrioPortal() as portal:
            assert await portal.run(trio.to_thread.run_sync, lambda: 6 * 7) == 42
            with pytest.raises(ValueError):
                await portal.run(trio.sleep, -1)

    asyncio.run(main())


def test_a_caller_giving_up_cancels_its_trio_call() -> None:
    cancelled = []

    async def forever() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise

    async def main() -> None:
        async with TrioPortal() as portal:
            call = asyncio.ensure_future(portal.run(forever))
            await asyncio.sleep(0.05)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await portal.run(trio.sleep, 0)  # the cancellation has reached trio by now
            assert cancelled == [True]

    asyncio.run(main())


def test_contexts_close_with_the_portal_uncancelled_and_entering_stops() -> None:
    log: list[str] = []

    @contextlib.asynccontextmanager
    async def resource(name: str, enter_for: float) -> AsyncIterator[str]:
        await trio.sleep(enter_for)
        log.append(f"in {name}")
        try:
            yield name
        finally:
            await trio.sleep(0.01)  # an aclose that awaits: not cancelled
            log.append(f"out {name}")

    async def main() -> None:
        async with TrioPortal() as portal:
            assert await portal.enter(resource("image", 0)) == "image"
            slow = asyncio.ensure_future(portal.enter(resource("slow", 3600)))
            pending = asyncio.ensure_future(portal.run(trio.sleep_forever))
            await asyncio.sleep(0.05)
        assert slow.cancelled() and pending.cancelled()

    asyncio.run(main())
    assert log == ["in image", "out image"]
