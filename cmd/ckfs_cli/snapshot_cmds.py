"""``ckfs snapshots``: the snapshotter API by hand, shaped like ``ctr snapshots``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ckfs_cli.app import (
    App,
    for_each,
    human_size,
    labels_json,
    labels_text,
    print_json,
    print_mounts,
    print_table,
)
from ckfs_cli.options import snapshotter_option

if TYPE_CHECKING:
    from ckfs.snapshots import Info, Snapshotter


class _Ctx:
    def __init__(self, app: App, name: str) -> None:
        self.app = app
        self.name = name

    @property
    def sn(self) -> Snapshotter:
        return self.app.snapshotter(self.name)


pass_ctx = click.make_pass_decorator(_Ctx)


@click.group()
@snapshotter_option
@click.pass_context
def snapshots(ctx: click.Context, snapshotter: str) -> None:
    """Manage snapshots: list, inspect, prepare, view, commit, remove."""
    ctx.obj = _Ctx(ctx.find_object(App), snapshotter)  # type: ignore[arg-type]


def info_json(i: Info) -> dict[str, Any]:
    return {
        "name": i.name,
        "parent": i.parent,
        "kind": i.kind.value,
        "labels": labels_json(i.labels),
        "created_at": i.created_at.isoformat(),
        "updated_at": i.updated_at.isoformat(),
    }


@snapshots.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.argument("filters", nargs=-1)
@pass_ctx
def ls(ctx: _Ctx, as_json: bool, filters: tuple[str, ...]) -> None:
    """List snapshots, optionally matching containerd-style FILTERS."""
    infos = sorted(ctx.sn.walk(list(filters)), key=lambda i: i.name)
    if as_json:
        print_json([info_json(i) for i in infos])
        return
    print_table(
        ["KEY", "PARENT", "KIND", "LABELS"],
        [[i.name, i.parent or "-", i.kind.value, labels_text(i.labels)] for i in infos],
    )


@snapshots.command("tree")
@pass_ctx
def tree(ctx: _Ctx) -> None:
    """Show snapshots as a tree of parents and children."""
    from ckfs.safetext import escape

    infos = {i.name: i for i in ctx.sn.walk()}
    children: dict[str, list[str]] = {}
    for i in infos.values():
        children.setdefault(i.parent, []).append(i.name)

    # Depth first with an explicit stack: a native snapshotter stacks an
    # image of thousands of layers, deeper than Python's recursion limit.
    stack = [(root, 0) for root in sorted(children.get("", []), reverse=True)]
    while stack:
        name, depth = stack.pop()
        line = escape(name)  # keys are as escaped as in `ls`'s table
        click.echo(f"{'  ' * depth}\\_ {line} ({infos[name].kind.value})" if depth else line)
        stack.extend((c, depth + 1) for c in sorted(children.get(name, []), reverse=True))


@snapshots.command("info")
@click.argument("key")
@pass_ctx
def info(ctx: _Ctx, key: str) -> None:
    """Show one snapshot as JSON."""
    print_json(info_json(ctx.sn.stat(key)))


@snapshots.command("mounts")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.argument("key")
@pass_ctx
def mounts(ctx: _Ctx, as_json: bool, key: str) -> None:
    """Print the Mount records of an active or view snapshot."""
    print_mounts(ctx.sn.mounts(key), as_json)


@snapshots.command("usage")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.argument("keys", nargs=-1)
@pass_ctx
def usage(ctx: _Ctx, as_json: bool, keys: tuple[str, ...]) -> None:
    """Disk used by snapshots themselves (not their parents).

    A snapshot whose tree cannot be walked (an I/O error in what a container
    wrote) is listed with "(error)" (with --json, an "error" field) and one
    line on stderr; the others are measured. Listing every snapshot exits 0
    regardless, like ``images ls``; naming KEYS exits 1 if one failed.
    """
    from ckfs.errors import CkfsError
    from ckfs.safetext import printable
    from ckfs_cli.main import describe

    names = list(keys) or sorted(i.name for i in ctx.sn.walk())
    rows: list[dict[str, str | int]] = []
    table: list[list[str]] = []
    for n in names:
        try:
            u = ctx.sn.usage(n)
        except (CkfsError, OSError) as e:
            error = describe(e)
            click.echo(f"ckfs: snapshot {printable(n)}: {error}", err=True)
            rows.append({"key": n, "error": error})
            table.append([n, "(error)", "-"])
        else:
            rows.append({"key": n, "size": u.size, "inodes": u.inodes})
            table.append([n, human_size(u.size), str(u.inodes)])
    if as_json:
        print_json(rows)
    else:
        print_table(["KEY", "SIZE", "INODES"], table)
    if keys and any("error" in r for r in rows):
        raise SystemExit(1)


@snapshots.command("rm")
@click.argument("keys", nargs=-1, required=True)
@pass_ctx
def rm(ctx: _Ctx, keys: tuple[str, ...]) -> None:
    """Remove snapshots (a parent with children cannot be removed)."""
    for_each(keys, ctx.sn.remove)


@snapshots.command("prepare")
@click.option("--json", "as_json", is_flag=True, help="Print the Mount records as JSON.")
@click.argument("key")
@click.argument("parent", default="")
@pass_ctx
def prepare(ctx: _Ctx, as_json: bool, key: str, parent: str) -> None:
    """Create a writable snapshot KEY on PARENT; print its Mount records."""
    print_mounts(ctx.sn.prepare(key, parent), as_json)


@snapshots.command("view")
@click.option("--json", "as_json", is_flag=True, help="Print the Mount records as JSON.")
@click.argument("key")
@click.argument("parent", default="")
@pass_ctx
def view(ctx: _Ctx, as_json: bool, key: str, parent: str) -> None:
    """Create a read-only snapshot KEY of PARENT; print its Mount records."""
    print_mounts(ctx.sn.view(key, parent), as_json)


@snapshots.command("commit")
@click.argument("name")
@click.argument("key")
@pass_ctx
def commit(ctx: _Ctx, name: str, key: str) -> None:
    """Commit the active snapshot KEY as NAME (KEY is gone afterwards)."""
    ctx.sn.commit(name, key)
    click.echo(name)
