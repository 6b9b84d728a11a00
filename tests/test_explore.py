"""``ckfs explore`` driven headless with textual's pilot: navigate, switch layer,
search, preview, wasted space, shell; what is shown is asserted, and each view's
screen is compared with its snapshot in tests/explore_snapshots/.

The image is hand-built (`tests.explore_image`). textual runs on asyncio, so
each test runs its own asyncio loop (`asyncio.run`), with the model's trio
calls in a `TrioPortal` on that loop, as ``ckfs explore`` runs them.

Snapshots: ``CKFS_UPDATE_SNAPSHOTS=1`` rewrites them; review the diff.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from ckfs.errors import NotFound
from ckfs.explore.portal import TrioPortal
from tests.explore_image import StubImage, opener, stub_image

SNAPSHOTS = Path(__file__).parent / "explore_snapshots"

#: The terminal the tests draw on: wide enough for three panes.
SIZE = (120, 32)

if TYPE_CHECKING:
    # Not at run time: textual is imported when a test runs, not when the
    # suite is collected, so the suite's other tests never carry its memory
    # (test_archive_sources bounds the peak RSS of the test process).
    from textual.pilot import Pilot

    from ckfs.explore.app import ExploreApp, Opener

Scenario = Callable[["ExploreApp", "Pilot[None]"], Awaitable[None]]


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots draw the same whatever the environment asks of colours."""
    monkeypatch.delenv("NO_COLOR", raising=False)


@pytest.fixture
def image(tmp_path: Path) -> Iterator[StubImage]:
    with stub_image(tmp_path) as img:
        yield img


def explore(image: StubImage | Opener, scenario: Scenario, **kw: object) -> ExploreApp:
    """Run the explorer on *image* (or what *image* opens) headless, play
    *scenario*, return the app."""
    from ckfs.explore.app import ExploreApp

    open_model = opener(image) if isinstance(image, StubImage) else image

    async def main() -> ExploreApp:
        async with TrioPortal() as portal:
            app = ExploreApp(portal, open_model, **kw)  # type: ignore[arg-type]
            app.theme = "textual-dark"  # whatever TEXTUAL_THEME says
            async with app.run_test(size=SIZE) as pilot:
                await settle(pilot)
                await scenario(app, pilot)
            return app

    return asyncio.run(main())


async def settle(pilot: Pilot[None]) -> None:
    """Wait until no worker runs (loads start more loads: a few rounds)."""
    app = pilot.app
    for _ in range(20):
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        if not any(w.is_running for w in app.workers):
            return
    raise AssertionError("the explorer did not settle")


async def press(pilot: Pilot[None], *keys: str) -> None:
    await pilot.press(*keys)
    await settle(pilot)


def screen_text(app: ExploreApp) -> str:
    """The screen as text, one line per row (textual has no public text export)."""
    strips = app.screen._compositor.render_strips()
    return "\n".join(strip.text.rstrip() for strip in strips) + "\n"


def snapshot(app: ExploreApp, name: str, *, svg: bool = False) -> None:
    """Compare the screen with snapshot *name* (text; and SVG, which keeps colours)."""
    shots = {f"{name}.txt": screen_text(app)}
    if svg:
        shots[f"{name}.svg"] = app.export_screenshot(title=name)
    for file, got in shots.items():
        path = SNAPSHOTS / file
        if os.environ.get("CKFS_UPDATE_SNAPSHOTS"):
            SNAPSHOTS.mkdir(exist_ok=True)
            path.write_text(got)
        assert path.exists(), f"no snapshot {path}: run with CKFS_UPDATE_SNAPSHOTS=1"
        assert got == path.read_text(), f"{file} differs:\n{got}"


def tree_rows(app: ExploreApp) -> list[str]:
    """Every row of the tree below its root, indented by depth, as plain text."""
    tree = app.query_one("#tree")
    rows = []

    def walk(node: object, depth: int) -> None:
        for child in node.children:  # type: ignore[attr-defined]
            rows.append("  " * depth + str(child.label))
            if child.is_expanded:
                walk(child, depth + 1)

    walk(tree.root, 0)
    return rows


def text_of(app: ExploreApp, selector: str) -> str:
    return str(app.query_one(selector).render())


def test_merged_tree_shows_each_entry_with_its_layer(image: StubImage) -> None:
    async def scenario(app: ExploreApp, pilot: Pilot[None]) -> None:
        assert app.layer is None
        assert tree_rows(app) == [
            "bin  L1",
            "etc  L1",
            "link → etc/motd  L1",
            "opt  L1",
        ]
        options: Any = app.query_one("#layers")
        assert options.option_count == 4
        snapshot(app, "merged")

    explore(image, scenario)


def test_navigate_and_preview_a_file_with_its_provenance(image: StubImage) -> None:
    async def scenario(app: ExploreApp, pilot: Pilot[None]) -> None:
        await press(pilot, "down", "down", "enter")  # etc, expanded
        assert tree_rows(app)[2:5] == [
            "  ansi  30 bytes  L1",
            "  motd  24 bytes  L3",
            "link → etc/motd  L1",
        ]
        await press(pilot, "down", "down")  # etc/motd
        info = text_of(app, "#info")
        assert "/etc/motd" in info
        assert "provided by layer 3: RUN rm /etc/hosts" in info
        assert "shadows layer 2, 1" in info
        assert text_of(app, "#preview") == "motd three, the longest\n"
        assert image.reads[-1][:2] == (3, "etc/motd")
        snapshot(app, "preview-text")

    explore(image, scenario)


def test_preview_escapes_terminal_controls_and_shows_binaries_in_hex(image: StubImage) -> None:
    async def scenario(app: ExploreApp, pilot: Pilot[None]) -> None:
        await press(pilot, "down", "down", "enter", "down")  # etc/ansi
        shown = text_of(app, "#preview")
        assert "\x1b" not in shown and "\x07" not in shown
        assert shown.startswith("\\x1b]0;retitled\\x07 colour \\x1b[31mred")
        await press(pilot, "up", "up", "enter", "down")  # bin/tool
        shown = text_of(app, "#preview")
        assert shown.splitlines()[0] == (
            "00000000  7f 45 4c 46 02 01 01 00 00 01 02 03 04 05 06 07  |.ELF............|"
        )
        snapshot(app, "preview-binary")

    explore(image, scenario)


def test_a_layer_shows_only_its_changes_colour_coded(image: StubImage) -> None:
    async def scenario(app: ExploreApp, pilot: Pilot[None]) -> None:
        await press(pilot, "right_square_bracket", "right_square_bracket")
        assert app.layer == 2
        assert app.query_one("#layers").highlighted == 2  # type: ignore[attr-defined]
        about = text_of(app, "#info")  # the layer, until an entry is highlighted
        assert about.startswith("layer 2 of 3\ndigest   sha256:" + "02" * 32)
        assert about.endswith("(tar)\nRUN edit motd; rm gone; replace opt/app")
        tree: Any = app.query_one("#tree")
        await press(pilot, "down", "enter", "down", "down", "down", "enter", "down", "enter")
        assert tree_rows(app) == [
            "etc  L2",
            "  ~ motd  9 bytes  L2",
            "- gone  14 bytes  L1",
            "opt  L2",
            "  app  L2",
            "    + new  4 bytes  L2",
            "    - old  4 bytes  L1",
        ]
        styles = {}
        for node in [*tree.root.children[0].children, tree.root.children[1]]:
            label = node.label
            styles[str(label).split()[1]] = str(label.spans[0].style)
        assert styles == {"motd": "yellow", "gone": "red strike"}
        await press(pilot, "down")  # opt/app/new
        assert "layer 2: added" in text_of(app, "#info")
        assert text_of(app, "#preview") == "new\n"
        await press(pilot, "down")  # opt/app/old: the deleted version is shown
        info = text_of(app, "#info")
        assert "layer 2: deleted" in info
        assert (
            "deleted by layer 2: RUN edit motd; rm gone; replace opt/app (opaque at /opt/app)"
            in info
        )
        assert text_of(app, "#preview") == "old\n"
        snapshot(app, "layer", svg=True)
        await press(pilot, "a")
        assert app.layer is None and tree_rows(app)[0] == "bin  L1"

    explore(image, scenario)


def test_search_lists_matching_paths(image: StubImage) -> None:
    async def scenario(app: ExploreApp, pilot: Pilot[None]) -> None:
        await press(pilot, "slash")
        await pilot.press(*"MOTD")
        await press(pilot, "enter")
        assert app.search == "MOTD"
        assert tree_rows(app) == ["/etc/motd  24 bytes  L3"]
        assert "matches of 'MOTD' in all layers" in str(app.query_one("#tree").root.label)  # type: ignore[attr-defined]
        await press(pilot, "down")
        assert text_of(app, "#preview") == "motd three, the longest\n"
        snapshot(app, "search")
        await press(pilot, "escape")
        assert app.search == "" and len(tree_rows(app)) == 4
        # Keys bound in the app are letters in the search box.
        await press(pilot, "slash", *"qwas/[", "enter")
        assert app.is_running and app.search == "qwas/["
        assert tree_rows(app) == ["(nothing here)"]
        await press(pilot, "escape")
        # In one layer, among its changes (deletions too).
        await press(pilot, "right_square_bracket", "right_square_bracket", "right_square_bracket")
        await press(pilot, "slash", "h", "o", "enter")
        assert tree_rows(app) == ["- /etc/hosts  20 bytes  L1"]

    explore(image, scenario)


def test_wasted_space_panel(image: StubImage) -> None:
    async def scenario(app: ExploreApp, pilot: Pilot[None]) -> None:
        await press(pilot, "w")
        summary = text_of(app, "#space-summary")
        assert summary == "efficiency 61.8%: 56 bytes wasted of 186 bytes"
        waste: Any = app.query_one("#waste")
        assert [[str(c) for c in waste.get_row_at(i)] for i in range(waste.row_count)] == [
            ["20 bytes", "/etc/hosts", "1", "3", "deleted"],
            ["14 bytes", "/gone", "1", "2", "deleted"],
            ["9 bytes", "/etc/motd", "1", "2", "overwritten"],
            ["9 bytes", "/etc/motd", "2", "3", "overwritten"],
            ["4 bytes", "/opt/app/old", "1", "2", "deleted"],
        ]
        largest: Any = app.query_one("#largest")
        assert [str(c) for c in largest.get_row_at(0)] == ["72 bytes", "/bin/tool", "1"]
        snapshot(app, "space")
        await press(pilot, "w")
        assert app.query_one("#tree").has_focus

    explore(image, scenario)


def test_shell_key_opens_ckfs_shell_at_the_chosen_layer(image: StubImage) -> None:
    shells: list[int] = []

    def shell(n: int) -> int:
        shells.append(n)
        return 3

    async def scenario(app: ExploreApp, pilot: Pilot[None]) -> None:
        # The headless driver cannot hand its terminal over; a real one can.
        app.suspend = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        await press(pilot, "s")
        await press(pilot, "right_square_bracket")
        await press(pilot, "s")
        assert shells == [3, 1]
        assert "exited with status 3" in str(list(app._notifications)[-1].message)

    explore(image, scenario, shell=shell)


def test_progress_shows_while_the_indexes_load(image: StubImage) -> None:
    gate = trio.Event()

    async def main() -> None:
        from ckfs.explore.app import ExploreApp

        async with TrioPortal() as portal:
            app = ExploreApp(portal, opener(image, gate))
            async with app.run_test(size=SIZE) as pilot:
                await pilot.pause()
                assert app.query_one("#views").current == "loading"  # type: ignore[attr-defined]
                assert text_of(app, "#loading-text") == "indexing layers: 0 of 3"
                assert app.query_one("#progress").total == 3  # type: ignore[attr-defined]
                await pilot.press("w", "slash", "s")  # nothing to act on yet: ignored
                snapshot(app, "loading")  # text only: the indicator's colours move
                await portal.run(_set, gate)
                await settle(pilot)
                assert app.query_one("#views").current == "browse"  # type: ignore[attr-defined]
                assert text_of(app, "#loading-text") == "indexing layers: 3 of 3"

    asyncio.run(main())


async def _set(event: trio.Event) -> None:
    event.set()


def test_an_image_that_does_not_open_ends_the_app_with_its_error(image: StubImage) -> None:
    @contextlib.asynccontextmanager
    async def missing(on_indexed: object) -> AsyncIterator[object]:
        raise NotFound("image example.com/nope:1 not found")
        yield

    async def main() -> ExploreApp:
        from ckfs.explore.app import ExploreApp

        async with TrioPortal() as portal:
            app = ExploreApp(portal, missing)  # type: ignore[arg-type]
            async with app.run_test(size=SIZE) as pilot:
                await pilot.pause()
            return app

    app = asyncio.run(main())
    assert isinstance(app.error, NotFound) and app.return_code == 1


def test_stepping_through_layers_lists_only_the_one_it_stops_at(image: StubImage) -> None:
    async def scenario(app: ExploreApp, pilot: Pilot[None]) -> None:
        await press(pilot, "right_square_bracket", "right_square_bracket", "right_square_bracket")
        assert app.layer == 3
        assert app.query_one("#tree").has_focus  # loading a view takes no focus away
        assert app.model is not None and list(app.model._changes) == [3]
        await press(pilot, "left_square_bracket", "a")
        assert app.layer is None and list(app.model._changes) == [3]
        for _ in range(3):  # keys in one burst, before any highlight message is handled
            app.action_step(1)
        await press(pilot)
        assert app.layer == 3

    explore(image, scenario)
