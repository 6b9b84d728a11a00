"""``ckfs diff`` and ``ckfs space``: what layers change, and where an image's bytes go."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ckfs_cli.app import App, human_size, print_json, print_table
from ckfs_cli.options import pass_app, registry_options, with_images

if TYPE_CHECKING:
    from ckfs.inspect import ImageLayers
    from ckfs.inspect.changes import Change
    from ckfs.inspect.space import SpaceReport


@click.command("diff")
@click.option(
    "--layer",
    "number",
    type=int,
    default=None,
    metavar="N",
    help="Only layer N's changes (1 = bottom) [default: every layer's, bottom first].",
)
@click.option(
    "--no-read",
    is_flag=True,
    help="Never read file bytes: compare contents by sizes and digests only.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@registry_options
@click.argument("refs", nargs=-1, required=True)
@pass_app
def diff_cmd(
    app: App,
    /,
    number: int | None,
    no_read: bool,
    as_json: bool,
    refs: tuple[str, ...],
    **flags: Any,
) -> None:
    """Entries added, modified and deleted: by each layer of REF, or from REF1 to REF2.

    \b
    ckfs diff REF [--layer N]   what layer N (or each layer) changes over the layers below it
    ckfs diff REF1 REF2         how REF2's merged tree differs from REF1's

    A layer's change is judged against the stack below it: "modified"
    means the layer writes a path that was there (FIELDS says what differs:
    type, content, mode, owner, xattrs, link; none: rewritten unchanged,
    e.g. only its mtime); "deleted" lists every path a whiteout, an opaque
    directory or a directory replaced by a file hides, directories with all
    under them. Between two images, equal entries are not listed.

    Contents are compared without downloading when something answers: the
    same layer blob and path, different sizes, or the eStargz chunk digests
    of both sides; with digests on one side only, only the other side is
    read, and hashed. A file of the same size on both sides with no digest
    is read, both versions, up to the first difference: for a lazily
    recorded image that fetches those files' bytes (not whole layers).
    --no-read never reads: such a file is listed without "content" in
    FIELDS (between images: as modified with no FIELDS, not compared).

    \b
    --json: {"image": REF, "layer": N or null, "changes": [...]}, or
    {"from": REF1, "to": REF2, "changes": [...]}; each change is
    {"path": "/etc/passwd", "kind": "added"|"modified"|"deleted",
     "fields": [...], "size": bytes (new, or deleted), "layer": N or null}.
    """
    if len(refs) > 2:
        raise click.UsageError("diff takes one image (and --layer) or two images")
    if len(refs) == 2 and number is not None:
        raise click.UsageError("--layer compares a layer with those below it: give one image")
    if len(refs) == 2:
        doc = with_images(app, refs, flags, lambda a, b: _image_diff(a, b, no_read))
    else:
        doc = with_images(app, refs, flags, lambda image: _layers_diff(image, number, no_read))
    changes: list[Change] = doc.pop("changes")
    if as_json:
        print_json({**doc, "changes": [c.to_json() for c in changes]})
        return
    with_layer = len(refs) == 1
    columns = (["LAYER"] if with_layer else []) + ["CHANGE", "PATH", "SIZE", "FIELDS"]
    rows = [
        ([str(c.layer)] if with_layer else [])
        + [c.kind, "/" + c.path, human_size(c.size), ",".join(c.fields) or "-"]
        for c in changes
    ]
    print_table(columns, rows)


async def _layers_diff(image: ImageLayers, number: int | None, no_read: bool) -> dict[str, Any]:
    import trio

    from ckfs.inspect.changes import layer_changes, layer_diff

    numbers = (
        [image.layer(number).number] if number is not None else range(1, len(image.layers) + 1)
    )
    changes: list[Change] = []
    for n in numbers:
        if no_read:
            changes.extend(await trio.to_thread.run_sync(layer_changes, image, n))
        else:
            changes.extend(await layer_diff(image, n))
    return {"image": image.name, "layer": number, "changes": changes}


async def _image_diff(a: ImageLayers, b: ImageLayers, no_read: bool) -> dict[str, Any]:
    from ckfs.inspect.changes import diff_images

    changes = await diff_images(a, b, read=not no_read)
    return {"from": a.name, "to": b.name, "changes": changes}


@click.command("space")
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="How many wasted versions and largest files to list (0: all).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@registry_options
@click.argument("ref")
@pass_app
def space_cmd(app: App, /, top: int, as_json: bool, ref: str, **flags: Any) -> None:
    """Where REF's bytes go: wasted space, the largest files, dive's efficiency score.

    Wasted: file versions a later layer overwrites or deletes; their bytes
    are still in the image (every pull downloads them). Each is listed with
    the layer storing it and the layer making it dead. A hardlinked file is
    wasted once all its names are gone. From the layer indexes alone: no
    file is read.

    Efficiency is dive's score (github.com/wagoodman/dive): every path any
    layer writes or deletes has one version per layer that touches it, of
    the size that layer gives it (a file's size; a link, a device, a
    deletion or a directory put in its place: 0; directories themselves are
    not scored); the score is the sum over paths of each path's smallest
    version divided by the sum of all versions. 1.0: no byte stored twice
    or deleted. Unlike dive, a hardlink's bytes count once, and deleting a
    directory counts as deleting each file under it.

    \b
    --json: {"image", "total" (bytes the layers store), "wasted",
    "efficiency" (0..1), "waste": [{"path", "size", "layer", "by_layer",
    "how": "overwritten"|"deleted"}], "largest": [{"path", "size", "layer"}]},
    both lists largest first and cut at --top.
    """
    from ckfs.inspect.space import space

    async def report(image: ImageLayers) -> tuple[str, SpaceReport]:
        import trio

        return image.name, await trio.to_thread.run_sync(lambda: space(image, top=top or _ALL))

    name, found = with_images(app, (ref,), flags, report)
    cut = top or None
    if as_json:
        print_json({"image": name, **found.to_json(cut)})
        return
    share = f" ({_percent(found.wasted / found.total)})" if found.total else ""
    click.echo(
        f"{name}: {human_size(found.total)} stored, {human_size(found.wasted)} wasted{share}, "
        f"efficiency {_percent(found.efficiency)}"
    )
    if found.waste:
        click.echo()
        print_table(
            ["WASTED", "PATH", "LAYER", "BY LAYER", "HOW"],
            [
                [human_size(w.size), "/" + w.path, str(w.layer), str(w.by_layer), w.how]
                for w in found.waste[:cut]
            ],
        )
        _more(len(found.waste) - len(found.waste[:cut]), "wasted versions")
    if found.largest:
        click.echo()
        print_table(
            ["SIZE", "LARGEST FILES", "LAYER"],
            [[human_size(v.node.size), "/" + v.path, str(v.layer)] for v in found.largest[:cut]],
        )


def _more(left: int, what: str) -> None:
    if left > 0:
        click.echo(f"({left} more {what}: --top 0 lists all)")


#: `space`'s *top* when ``--top 0`` asks for every file.
_ALL = 1 << 62


def _percent(share: float) -> str:
    """*share* (0..1) as a percentage that is never rounded to 0 % or 100 % it does not reach.

    8 wasted bytes of a 100 MB image are waste, and its score is not perfect.
    """
    if 0 < share < 0.0001:
        return "< 0.01%"
    if 0.9999 < share < 1:
        return "> 99.99%"
    return f"{share:.2%}"
