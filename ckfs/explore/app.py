"""``ckfs explore``: an image's layers in a terminal UI (textual).

Left, the layers (bottom first, with the command that made each); in the
middle, the merged tree with the layer providing each entry (``L3``), or,
with a layer chosen, only what that layer changed: added (green, ``+``),
modified (yellow, ``~``), deleted (red, ``-``); right, where the
highlighted entry comes from and a preview of its first bytes. ``w``
shows the wasted-space report, ``/`` searches paths, ``s`` opens ``ckfs
shell`` on the stack up to the chosen layer.

Everything the UI shows comes from `ckfs.explore.model.Model` through a
`ckfs.explore.portal.TrioPortal`, in workers: the screen stays live while
indexes load, a directory lists or a file's head arrives by Range. Names
and bytes from the image are escaped before they are drawn
(`ckfs.safetext`), so a file name cannot drive the terminal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, ClassVar

from rich.filesize import decimal
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult, SuspendNotSupported
from textual.binding import Binding, BindingType
from textual.containers import Center, Horizontal, ScrollableContainer, Vertical
from textual.widgets import (
    ContentSwitcher,
    DataTable,
    Footer,
    Header,
    Input,
    LoadingIndicator,
    OptionList,
    ProgressBar,
    Static,
    Tree,
)
from textual.widgets.option_list import Option
from textual.widgets.tree import TreeNode

from ckfs.archive.entry import Kind
from ckfs.errors import CkfsError
from ckfs.explore.model import ADDED, DELETED, MODIFIED, Item, Model
from ckfs.explore.preview import PREVIEW_BYTES, render
from ckfs.safetext import message, printable

if TYPE_CHECKING:
    from ckfs.explore.portal import TrioPortal
    from ckfs.inspect.image import LayerInfo
    from ckfs.inspect.merged import Which

__all__ = ["MAX_CHILDREN", "SEARCH_LIMIT", "SWITCH_DELAY", "ExploreApp", "Opener"]

#: Opens the model, given a callback for (layers indexed, layers in all).
Opener = Callable[[Callable[[int, int], None]], AbstractAsyncContextManager[Model]]

#: Rows one directory shows: a tree of a million rows would take the UI
#: seconds per redraw; the rest is named by a count (search finds them).
MAX_CHILDREN = 2000

#: Matches a search shows, for the same reason.
SEARCH_LIMIT = 500

#: Seconds a highlighted layer must stay highlighted before its changes are
#: listed: stepping through layers (``]]]``) lists only the last.
SWITCH_DELAY = 0.2

#: What a pane's border says while its contents load (not textual's loading
#: overlay: it would take the focus, and so the keys, from the pane).
_BUSY = "loading…"

#: Characters of a layer's ``created_by`` kept in the layer list.
_CREATED_BY = 200

_CHANGE_STYLE = {ADDED: "green", MODIFIED: "yellow", DELETED: "red strike"}
_CHANGE_MARK = {ADDED: "+", MODIFIED: "~", DELETED: "-"}
_KIND_STYLE = {Kind.DIR: "bold blue", Kind.SYMLINK: "cyan"}
_KIND_NAME = {
    Kind.FILE: "file",
    Kind.DIR: "directory",
    Kind.SYMLINK: "symlink",
    Kind.HARDLINK: "hardlink",
    Kind.CHAR: "character device",
    Kind.BLOCK: "block device",
    Kind.FIFO: "fifo",
    Kind.WHITEOUT: "whiteout",
    Kind.OPAQUE: "opaque marker",
}


class ExploreApp(App[None]):
    """The explorer (module docstring).

    Args:
        portal: runs the model's trio calls.
        opener: opens the model (`Model.opened` with a state and a ref).
        shell: runs ``ckfs shell --upto N`` on the terminal and returns its
            exit status; None where no shell can be opened.

    Attributes:
        error: what stopped the image from opening; the app exits with it
            (status 1) and the caller reports it.
    """

    TITLE = "ckfs explore"
    ENABLE_COMMAND_PALETTE = False
    # Where the keys go when the screen is shown (textual's default: the
    # first focusable widget, the layer list).
    AUTO_FOCUS = "#tree"
    CSS = """
    #layers { width: 2fr; height: 1fr; border: round $primary; }
    #middle { width: 3fr; }
    #right { width: 3fr; }
    #tree { border: round $primary; }
    #search { display: none; }
    #search.shown { display: block; }
    #info { height: auto; max-height: 12; border: round $secondary; padding: 0 1; }
    #preview-box { border: round $secondary; padding: 0 1; }
    #preview { width: auto; }
    #loading { align: center middle; height: 1fr; }
    #loading-text { width: 100%; text-align: center; }
    #space-summary { padding: 0 1; }
    #waste, #largest { height: 1fr; border: round $primary; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("slash", "search", "Search"),
        Binding("escape", "clear_search", "Clear search", show=False),
        Binding("left_square_bracket", "step(-1)", "Layer down"),
        Binding("right_square_bracket", "step(1)", "Layer up"),
        Binding("a", "all_layers", "All layers"),
        Binding("w", "space", "Wasted space"),
        Binding("s", "shell", "Shell"),
    ]

    def __init__(
        self,
        portal: TrioPortal,
        opener: Opener,
        *,
        shell: Callable[[int], int] | None = None,
    ) -> None:
        super().__init__()
        self.portal = portal
        self.model: Model | None = None
        self.layer: int | None = None  # the layer shown; None: the merged tree
        self.search: str = ""
        self.error: Exception | None = None
        self._opener = opener
        self._shell = shell
        self._wanted: int | None = None  # the layer highlighted, shown once it settles
        self._view = 0  # bumped by each reload, so a stale load is dropped
        self._filled: set[int] = set()  # tree nodes whose children are loaded
        self._space_asked = False

    def compose(self) -> ComposeResult:
        yield Header()
        with ContentSwitcher(initial="loading", id="views"):
            with Vertical(id="loading"):
                yield Static("opening the image", id="loading-text")
                with Center():
                    yield ProgressBar(id="progress", show_eta=False)
                yield LoadingIndicator()
            with Horizontal(id="browse"):
                yield OptionList(id="layers")
                with Vertical(id="middle"):
                    yield Input(placeholder="search paths: Enter finds, Esc clears", id="search")
                    yield Tree[Item | None]("/", id="tree")
                with Vertical(id="right"):
                    yield Static(id="info")
                    # Both ways: a hex row or a long line is scrolled to, not wrapped.
                    with ScrollableContainer(id="preview-box"):
                        yield Static(id="preview")
            with Vertical(id="space"):
                yield Static(id="space-summary")
                yield DataTable(id="waste", cursor_type="row")
                yield DataTable(id="largest", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#layers").border_title = "layers"
        self.query_one("#tree").border_title = "files"
        self.query_one("#info").border_title = "provenance"
        self.query_one("#preview-box").border_title = "preview"
        self.query_one("#waste").border_title = "wasted space"
        self.query_one("#largest").border_title = "largest files"
        self.run_worker(self._open(), name="open")

    # -- opening ------------------------------------------------------------

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()

        def indexed(done: int, total: int) -> None:
            # From trio, perhaps from one of its worker threads.
            loop.call_soon_threadsafe(self._indexed, done, total)

        try:
            model = await self.portal.enter(self._opener(indexed))
        except Exception as e:  # the caller reports it, as for any command
            self.error = e
            self.exit(return_code=1)
            return
        self.model = model
        self.sub_title = printable(model.name)
        layers = self.query_one("#layers", OptionList)
        layers.add_options(
            [Option("all layers (merged)", id="all")] + [_layer_option(li) for li in model.layers]
        )
        self.query_one("#views", ContentSwitcher).current = "browse"
        self._reload()
        layers.highlighted = 0
        # At once, not later (`focus`): keys typed now must reach the tree.
        self.screen.set_focus(self.query_one(Tree))

    def _indexed(self, done: int, total: int) -> None:
        self.query_one("#progress", ProgressBar).update(total=total, progress=done)
        self.query_one("#loading-text", Static).update(f"indexing layers: {done} of {total}")

    # -- the tree -----------------------------------------------------------

    # A worker made by `work`, not from a coroutine: one replaced before it
    # starts is never made, so nothing is left unawaited.
    @work(group="view", exclusive=True)
    async def _reload(self, delay: float = 0) -> None:
        """Show the wanted view from its root (merged, one layer's changes, or
        matches), after *delay* seconds unless another reload comes first."""
        if delay:
            await asyncio.sleep(delay)
        self.layer = self._wanted
        self._view += 1
        self._filled.clear()
        tree: Tree[Item | None] = self.query_one(Tree)
        tree.reset(self._root_label(), None)
        tree.move_cursor(tree.root)  # a reset keeps the old line, or none at first
        self._filled.add(tree.root.id)
        self.workers.cancel_group(self, "preview")
        self.query_one("#info", Static).update(self._about_view())
        self.query_one("#preview", Static).update("")
        await self._fill(tree.root, self._view)

    def _about_view(self) -> Text:
        """What the provenance pane says until an entry is highlighted: the layer shown."""
        assert self.model is not None
        if self.layer is None:
            return Text(f"{self.model.top} layers, merged: each entry shows the layer providing it")
        layer = self.model.layers[self.layer - 1]
        text = Text(f"layer {layer.number} of {self.model.top}\n", style="bold")
        text.append(f"digest   {layer.desc.digest}\ndiff ID  {layer.diff_id}\n")
        text.append(f"size     {decimal(layer.desc.size)} ({layer.source})\n")
        text.append(printable(layer.created_by, _CREATED_BY) or "(no history entry)", style="dim")
        return text

    def _root_label(self) -> Text:
        where = "all layers" if self.layer is None else f"layer {self.layer}: its changes"
        if self.search:
            return Text(f"matches of {printable(self.search)!r} in {where}")
        return Text(f"/  ({where})")

    async def _fill(self, node: TreeNode[Item | None], view: int) -> None:
        """Load *node*'s children (or the search's matches, at the root) into the tree."""
        assert self.model is not None
        item = node.data
        tree = self.query_one(Tree)
        # A layer's changes or a search take seconds on a large image.
        if item is None:
            tree.border_subtitle = _BUSY
        try:
            if item is None and self.search:
                found = await self.portal.run(
                    self.model.search, self.search, self.layer, SEARCH_LIMIT
                )
            else:
                path = "" if item is None else item.path
                found = await self.portal.run(self.model.children, path, self.layer)
        except CkfsError as e:
            node.add_leaf(Text(message(str(e)), style="red"))
            return
        finally:
            if item is None and view == self._view:
                tree.border_subtitle = ""
        if view != self._view:
            return
        flat = item is None and bool(self.search)
        for child in found[:MAX_CHILDREN]:
            label = _label(child, full_path=flat)
            if child.expandable and not flat:
                node.add(label, child)
            else:
                node.add_leaf(label, child)
        if len(found) > MAX_CHILDREN:
            node.add_leaf(Text(f"… {len(found) - MAX_CHILDREN} more", style="dim"))
        if not found:
            node.add_leaf(Text("(nothing here)", style="dim"))
        node.expand()

    def on_tree_node_expanded(self, event: Tree.NodeExpanded[Item | None]) -> None:
        node = event.node
        if node.id in self._filled:
            return
        self._filled.add(node.id)
        self.run_worker(self._fill(node, self._view), group="expand")

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted[Item | None]) -> None:
        if (item := event.node.data) is not None:
            self.run_worker(self._preview(item), group="preview", exclusive=True)

    # -- the preview --------------------------------------------------------

    async def _preview(self, item: Item) -> None:
        """Say where *item* comes from, then show its head (read in this worker)."""
        assert self.model is not None
        info = self.query_one("#info", Static)
        preview = self.query_one("#preview", Static)
        box = self.query_one("#preview-box")
        info.update(self._describe(item, None))
        preview.update("")
        try:
            info.update(self._describe(item, await self.portal.run(self.model.which, item.path)))
            node = item.node
            if node.kind == Kind.FILE:
                box.border_subtitle = _BUSY
                head = await self.portal.run(self.model.read, item, PREVIEW_BYTES)
                preview.update(render(head, node.size))
            elif node.kind == Kind.SYMLINK:
                preview.update(Text(f"symbolic link to {printable(node.link)}"))
            else:
                kind = _KIND_NAME.get(node.kind, "entry")
                preview.update(Text(f"({kind}: no contents to show)", style="dim"))
        except CkfsError as e:
            preview.update(Text(f"cannot read it: {message(str(e))}", style="red"))
        finally:
            box.border_subtitle = ""

    def _describe(self, item: Item, which: Which | None) -> Text:
        """*item*'s attributes, what its layer did to it, and (once known) its provenance."""
        node = item.node
        text = Text(f"/{printable(item.path)}\n", style="bold")
        text.append(
            f"{_KIND_NAME.get(node.kind, 'entry')}  {node.mode:04o}  {node.uid}:{node.gid}"
            + (f"  {decimal(node.size)}" if node.kind == Kind.FILE else "")
            + "\n"
        )
        if item.change:
            what = item.change + (f" ({', '.join(item.fields)})" if item.fields else "")
            text.append(f"layer {self.layer}: {what}\n", style=_CHANGE_STYLE[item.change])
        if which is None:
            return text
        if which.provider is not None:
            text.append(f"provided by {self._layer_name(which.provider.layer)}\n")
        if which.shadowed:
            text.append("shadows layer " + ", ".join(str(v.layer) for v in which.shadowed) + "\n")
        if (gone := which.deleted_by) is not None:
            where = f"{gone.how} at /{printable(gone.path)}"
            text.append(f"deleted by {self._layer_name(gone.layer)} ({where})\n", style="red")
        return text

    def _layer_name(self, n: int) -> str:
        assert self.model is not None
        created_by = self.model.layers[n - 1].created_by
        return f"layer {n}" + (f": {printable(created_by, 60)}" if created_by else "")

    # -- layers -------------------------------------------------------------

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        layer = None if event.option_id in (None, "all") else int(event.option_id)
        if layer != self._wanted:
            # Stepping through layers shows only the one it stops at: a
            # large layer's changes take seconds to list.
            self._wanted = layer
            self._reload(SWITCH_DELAY)

    def action_step(self, step: int) -> None:
        if self.model is None:
            return
        # From the list's own highlight, set at once: its message (and
        # `_wanted`) lags behind keys typed in a burst.
        layers = self.query_one("#layers", OptionList)
        layers.highlighted = min(max((layers.highlighted or 0) + step, 0), self.model.top)

    def action_all_layers(self) -> None:
        if self.model is not None:
            self.query_one("#layers", OptionList).highlighted = 0

    # -- search -------------------------------------------------------------

    def action_search(self) -> None:
        if self.model is None:
            return
        box = self.query_one("#search", Input)
        box.add_class("shown")
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.search = event.value.strip()
        self._reload()
        self.query_one(Tree).focus()

    def action_clear_search(self) -> None:
        box = self.query_one("#search", Input)
        box.value = ""
        box.remove_class("shown")
        if self.search:
            self.search = ""
            self._reload()
        self.query_one(Tree).focus()

    # -- wasted space -------------------------------------------------------

    def action_space(self) -> None:
        if self.model is None:
            return
        views = self.query_one("#views", ContentSwitcher)
        if views.current == "space":
            views.current = "browse"
            self.query_one(Tree).focus()
            return
        views.current = "space"
        self.query_one("#waste").focus()
        if not self._space_asked:
            self._space_asked = True
            self.run_worker(self._fill_space(), group="space")

    async def _fill_space(self) -> None:
        assert self.model is not None
        summary = self.query_one("#space-summary", Static)
        summary.update(Text(f"adding up every layer's files {_BUSY}", style="dim"))
        try:
            report = await self.portal.run(self.model.space)
        except CkfsError as e:
            summary.update(Text(message(str(e)), style="red"))
            return
        summary.update(
            f"efficiency {report.efficiency:.1%}: {decimal(report.wasted)} wasted "
            f"of {decimal(report.total)}"
        )
        waste = self.query_one("#waste", DataTable)
        waste.add_columns("wasted", "path", "layer", "by layer", "how")
        for w in report.waste:
            waste.add_row(
                decimal(w.size), "/" + printable(w.path), str(w.layer), str(w.by_layer), w.how
            )
        largest = self.query_one("#largest", DataTable)
        largest.add_columns("size", "path", "layer")
        for v in report.largest:
            largest.add_row(decimal(v.node.size), "/" + printable(v.path), str(v.layer))

    # -- shell --------------------------------------------------------------

    def action_shell(self) -> None:
        """``ckfs shell --upto N`` on this terminal, N the chosen layer (the top if none)."""
        if self.model is None or self._shell is None or not self.model.top:
            self.notify("no shell can be opened here", severity="warning")
            return
        n = self.layer or self.model.top
        try:
            with self.suspend():
                status = self._shell(n)
        except SuspendNotSupported:
            self.notify("this terminal cannot be handed to a shell", severity="error")
            return
        if status:
            self.notify(f"ckfs shell --upto {n} exited with status {status}", severity="warning")


def _layer_option(layer: LayerInfo) -> Option:
    text = Text(
        f"{layer.number:>3} {decimal(layer.desc.size):>9}  ", no_wrap=True, overflow="ellipsis"
    )
    text.append(printable(layer.created_by, _CREATED_BY) or "-", style="dim")
    return Option(text, id=str(layer.number))


def _label(item: Item, *, full_path: bool) -> Text:
    """A tree row: change mark, name (or path), link target, size, providing layer."""
    node = item.node
    text = Text(no_wrap=True, overflow="ellipsis")
    if item.change:
        text.append(f"{_CHANGE_MARK[item.change]} ", style=_CHANGE_STYLE[item.change])
    name = "/" + item.path if full_path else item.name
    text.append(
        printable(name), style=_CHANGE_STYLE.get(item.change) or _KIND_STYLE.get(node.kind, "")
    )
    if node.kind == Kind.SYMLINK:
        text.append(f" → {printable(node.link)}", style="cyan")
    if node.kind == Kind.FILE:
        text.append(f"  {decimal(node.size)}", style="dim")
    text.append(f"  L{item.version.layer}", style="dim")
    return text
