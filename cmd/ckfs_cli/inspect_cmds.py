"""``ckfs layers``, ``which``, ``ls`` and ``cat``: an image's layers and files, without unpacking.

Everything is answered from the layer indexes (`ckfs.inspect`); ``cat`` reads
one file's bytes, from the local blob or by Range from the registry. No
mount, no root for a local image; docs/debugging.md has the JSON fields.
"""

from __future__ import annotations

import stat
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from ckfs_cli.app import App, human_size, print_json, print_table
from ckfs_cli.options import pass_app, registry_options, with_images

if TYPE_CHECKING:
    from ckfs.inspect import ImageLayers, Merged, Version, Which
    from ckfs.layerindex.model import Node

#: What a file's head is judged by: binary if these bytes hold a NUL or are
#: not UTF-8 (as git and grep decide, on a prefix).
_SNIFF = 8192

#: Bytes ``cat`` reads at a time: a large file is streamed, never held whole.
_PIECE = 1 << 20

#: `Node.kind` names in JSON and tables, and the file type bits for `ls -l`,
#: keyed by `ckfs.archive.entry.Kind` value (an IntEnum that is never
#: renumbered; its ``.name`` costs a property call per entry, and this
#: module stays light to import for ``ckfs --help``).
_TYPES = {
    0: ("file", stat.S_IFREG),
    1: ("dir", stat.S_IFDIR),
    2: ("symlink", stat.S_IFLNK),
    4: ("char", stat.S_IFCHR),
    5: ("block", stat.S_IFBLK),
    6: ("fifo", stat.S_IFIFO),
    7: ("whiteout", stat.S_IFCHR),  # overlayfs's 0/0 character device
}


def _layer_options(f: Any, alone: str = "Layer N alone (1 = bottom).") -> Any:
    f = click.option(
        "--upto", type=int, default=None, metavar="N", help="The stack of layers 1..N."
    )(f)
    return click.option("--layer", "number", type=int, default=None, metavar="N", help=alone)(f)


def _ls_layer_options(f: Any) -> Any:
    return _layer_options(f, "Layer N alone (1 = bottom), whiteouts shown as entries.")


def _tree(image: ImageLayers, number: int | None, upto: int | None) -> Merged:
    """The tree asked for: the whole image, layer *number* alone, or layers 1..*upto*."""
    from ckfs.errors import InvalidArgument
    from ckfs.inspect import Merged

    if number is not None and upto is not None:
        raise InvalidArgument("--layer and --upto exclude each other")
    if number is not None:
        return Merged([image.layer(number)], whiteouts=True)
    return Merged(image.upto(upto) if upto is not None else image.layers)


def _path(path: str) -> str:
    return "/" + path


def _type(node: Node) -> str:
    return _TYPES[node.kind][0]


def entry_json(image: ImageLayers, v: Version) -> dict[str, Any]:
    """One entry with its provenance: the fields ``ls`` and ``which`` print."""
    layer = image.layer(v.layer)
    node = v.node
    return {
        "path": _path(v.path),
        "type": _type(node),
        "mode": node.mode,
        "uid": node.uid,
        "gid": node.gid,
        "size": node.size,
        "mtime_ns": node.mtime_ns,
        "link": node.link,
        "nlink": node.nlink,
        "opaque": node.opaque,
        "xattrs": _xattrs_json(layer.index.xattrs(node.ino)),
        "layer": v.layer,
        "layer_digest": str(layer.desc.digest),
    }


def _xattrs_json(xattrs: dict[str, bytes]) -> dict[str, str]:
    """Values as text when they are UTF-8 without NULs, else ``base64:...``."""
    import base64

    shown = {}
    for name, value in sorted(xattrs.items()):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = "\0"
        shown[name] = text if "\0" not in text else "base64:" + base64.b64encode(value).decode()
    return shown


def _mode_text(node: Node) -> str:
    return stat.filemode(_TYPES[node.kind][1] | node.mode)


def _name_text(v: Version, full: bool) -> str:
    name = _path(v.path) if full else (v.path.rpartition("/")[2] or "/")
    return f"{name} -> {v.node.link}" if v.node.link else name


# -- layers -------------------------------------------------------------------

_LAYER_COLUMNS = (
    *("#", "DIGEST", "SOURCE", "SIZE", "UNCOMPRESSED", "ENTRIES", "+", "~", "-"),
    *("FETCHED", "CREATED BY"),
)


@click.command("layers")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@registry_options
@click.argument("ref")
@pass_app
def layers_cmd(app: App, /, as_json: bool, ref: str, **flags: Any) -> None:
    """One row per layer of REF, bottom (1) to top.

    Sizes: the blob as stored and its uncompressed tar (when known); entries
    and the added / modified / deleted counts come from the layer indexes
    (`ckfs diff --layer N` lists them). CREATED BY is the config history's
    step that made the layer (empty-layer steps such as ENV skipped).
    SOURCE is what indexes it (estargz, gzip-index, tar; eager: streamed
    from the local blob); FETCHED, for a layer read by range, is its share
    in the chunk cache (approximate: cache files against its size).
    No layer data is fetched; missing indexes are built.

    \b
    --json: [{"number", "digest", "diff_id", "media_type", "size",
    "uncompressed_size" (null if unknown), "entries", "files", "file_bytes",
    "added", "modified", "deleted", "created_by", "source", "local" (blob in
    the content store), "cached_bytes", "fetched_pct" (null when local)}]
    """

    async def rows(image: ImageLayers) -> list[dict[str, Any]]:
        import trio

        return await trio.to_thread.run_sync(_layer_rows, app, image)

    found = with_images(app, (ref,), flags, rows)
    if as_json:
        print_json(found)
        return
    print_table(
        _LAYER_COLUMNS,
        [
            [
                str(r["number"]),
                r["digest"][7:19],
                r["source"],
                human_size(r["size"]),
                "-" if r["uncompressed_size"] is None else human_size(r["uncompressed_size"]),
                str(r["entries"]),
                str(r["added"]),
                str(r["modified"]),
                str(r["deleted"]),
                "local" if r["local"] else f"{r['fetched_pct']:.0f}%",
                r["created_by"],
            ]
            for r in found
        ],
    )


def _layer_rows(app: App, image: ImageLayers) -> list[dict[str, Any]]:
    """Every layer's row; blocking (walks each index)."""
    from ckfs.inspect.changes import layer_changes
    from ckfs.inspect.image import layer_stats
    from ckfs.layerindex.cache import ChunkCache

    cache = ChunkCache(app.state.cache_dir)
    rows = []
    for layer in image.layers:
        stats = layer_stats(layer)
        kinds = [c.kind for c in layer_changes(image, layer.number)]
        local = app.state.content.exists(layer.desc.digest)
        cached = cache.usage(layer.desc.digest).size
        whole = stats.uncompressed_size or layer.desc.size
        rows.append(
            {
                "number": layer.number,
                "digest": str(layer.desc.digest),
                "diff_id": str(layer.diff_id),
                "media_type": layer.desc.media_type,
                "size": layer.desc.size,
                "uncompressed_size": stats.uncompressed_size,
                "entries": stats.entries,
                "files": stats.files,
                "file_bytes": stats.file_bytes,
                "added": kinds.count("added"),
                "modified": kinds.count("modified"),
                "deleted": kinds.count("deleted"),
                "created_by": layer.created_by,
                "source": layer.source,
                "local": local,
                "cached_bytes": cached,
                "fetched_pct": None if local else round(min(100.0, 100 * cached / whole), 1),
            }
        )
    return rows


# -- which --------------------------------------------------------------------


@click.command("which")
@click.option("--follow", is_flag=True, help="Resolve symlinks (inside the image root).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@registry_options
@click.argument("ref")
@click.argument("path")
@pass_app
def which_cmd(app: App, /, follow: bool, as_json: bool, ref: str, path: str, **flags: Any) -> None:
    """Which layer of REF provides PATH, which versions it shadows, or who deleted it.

    A path that is gone names the layer that deleted it and how: a
    whiteout, an opaque directory, or a parent replaced by a non-directory
    ("replaced-parent"). Symlinks are followed only with --follow, inside
    the image (an absolute target starts at the image root, ".." stops
    there). A path no layer ever had is an error. No file data is fetched.
    A directory that is opaque in its providing layer is an "opaque dir",
    followed by the layers whose contents under it it hides.

    \b
    --json: {"image", "path", "resolved" (after --follow), "provider": ENTRY
    or null, "shadowed": [ENTRY...] (top first), "deleted_by": {"layer",
    "how", "path"} or null}; ENTRY as in `ckfs ls --json`, plus "created_by".
    """
    from ckfs.errors import NotFound
    from ckfs.inspect import Merged, user_path
    from ckfs.safetext import printable

    asked = user_path(path)

    async def answer(image: ImageLayers) -> dict[str, Any]:
        tree = Merged(image.layers)
        resolved = tree.follow(asked) if follow else asked
        found = tree.which(resolved)
        if found.provider is None and found.deleted_by is None:
            raise NotFound(
                f"{printable(_path(resolved))!r} is in no layer of {image.name}"
                + _through_link(tree, resolved)
            )
        return _which_json(image, asked, resolved, found)

    found = with_images(app, (ref,), flags, answer)
    if as_json:
        print_json(found)
        return
    _print_which(found)


def _through_link(tree: Merged, path: str) -> str:
    """A hint when a parent of *path* is a symlink (``which`` does not follow it)."""
    from ckfs.archive.entry import Kind
    from ckfs.safetext import printable

    parts = path.split("/")
    for n in range(1, len(parts)):
        v = tree.resolve("/".join(parts[:n]))
        if v is None:
            break
        if v.node.kind == Kind.SYMLINK:
            return f" ({printable(_path(v.path))!r} is a symlink: try --follow)"
    return ""


def _which_json(image: ImageLayers, asked: str, resolved: str, w: Which) -> dict[str, Any]:
    def entry(v: Version) -> dict[str, Any]:
        return {**entry_json(image, v), "created_by": image.layer(v.layer).created_by}

    gone = w.deleted_by
    return {
        "image": image.name,
        "path": _path(asked),
        "resolved": _path(resolved),
        "provider": entry(w.provider) if w.provider else None,
        "shadowed": [entry(v) for v in w.shadowed],
        "deleted_by": (
            {"layer": gone.layer, "how": gone.how, "path": _path(gone.path)} if gone else None
        ),
    }


def _print_which(found: dict[str, Any]) -> None:
    from ckfs.safetext import escape

    def line(e: dict[str, Any]) -> str:
        size = f" {human_size(e['size'])}" if e["type"] == "file" else ""
        link = f" -> {e['link']}" if e["link"] else ""
        kind = "opaque dir" if e["opaque"] else e["type"]
        return escape(
            f"layer {e['layer']} ({e['layer_digest'][7:19]}): {kind}{size}{link}  {e['created_by']}"
        )

    head = found["resolved"]
    if found["resolved"] != found["path"]:
        head = f"{found['path']} -> {head}"
    head = escape(head)
    top = found["provider"]
    if top is not None:
        click.echo(f"{head}: {line(top)}")
    else:
        gone = found["deleted_by"]
        how = escape(f"{_HOW_TEXT.get(gone['how'], gone['how'])} at {gone['path']}")
        click.echo(f"{head}: deleted by layer {gone['layer']} ({how})")
    for e in found["shadowed"]:
        click.echo(f"  shadows {line(e)}")
    if top is not None and top["opaque"] and found["shadowed"]:
        below = ", ".join(str(e["layer"]) for e in found["shadowed"] if e["type"] == "dir")
        if below:
            click.echo(f"  opaque: hides what layer(s) {below} have under it")


#: How ``which`` text names a deletion (`ckfs.inspect.merged.DELETIONS`;
#: JSON keeps the short names).
_HOW_TEXT = {"opaque": "opaque directory"}


# -- ls -----------------------------------------------------------------------


@click.command("ls")
@_ls_layer_options
@click.option("-l", "long", is_flag=True, help="Long listing: type, mode, owner, size, layer.")
@click.option("-R", "recursive", is_flag=True, help="Everything below PATH.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@registry_options
@click.argument("ref")
@click.argument("path", default="/")
@pass_app
def ls_cmd(
    app: App,
    /,
    number: int | None,
    upto: int | None,
    long: bool,
    recursive: bool,
    as_json: bool,
    ref: str,
    path: str,
    **flags: Any,
) -> None:
    """List PATH (default /) of REF's merged tree, of layer N alone, or of layers 1..N.

    Each entry says which layer provides it (LAYER). With --layer N,
    whiteouts are listed as entries of type "whiteout". Plain output marks
    a whiteout " (whiteout)" and an opaque directory (one hiding what the
    layers below have under it) " (opaque)" after its name; -l shows them
    in MODE (c--------- and "+o"). Symlinks are not followed; PATH naming a
    non-directory lists that entry. No file data is fetched.

    \b
    --json: [{"path", "type" (file, dir, symlink, char, block, fifo,
    whiteout), "mode" (permission bits), "uid", "gid", "size", "mtime_ns",
    "link", "nlink", "opaque", "xattrs" ({name: value}; a value that is not
    text as "base64:..."), "layer", "layer_digest"}]
    """
    from ckfs.inspect import user_path

    asked = user_path(path)

    async def listing(image: ImageLayers) -> tuple[list[dict[str, Any]], list[Version]]:
        found = _list(_tree(image, number, upto), asked, recursive)
        return ([entry_json(image, v) for v in found] if as_json else []), found

    docs, found = with_images(app, (ref,), flags, listing)
    if as_json:
        print_json(docs)
    elif long:
        _print_long(found, recursive)
    else:
        from ckfs.safetext import escape

        sys.stdout.writelines(escape(_marked(v, recursive)) + "\n" for v in found)


def _list(tree: Merged, path: str, recursive: bool) -> list[Version]:
    from ckfs.archive.entry import Kind
    from ckfs.errors import NotFound
    from ckfs.safetext import printable

    v = tree.resolve(path)
    if v is None:
        raise NotFound(f"{printable(_path(path))!r}: no such file or directory")
    if v.node.kind != Kind.DIR:
        return [v]
    return list(tree.walk(path)) if recursive else tree.listdir(path)


#: What plain ``ls`` puts after an entry that is not what it seems (``-l``
#: shows it in the mode column instead): a whiteout is listed by
#: ``--layer N`` as the deletion it is, an opaque directory hides what the
#: layers below it have under it.
_WHITEOUT_MARK, _OPAQUE_MARK = " (whiteout)", " (opaque)"


def _marked(v: Version, full: bool) -> str:
    """The name plain ``ls`` prints: `_name_text` with its whiteout or opaque mark."""
    mark = _WHITEOUT_MARK if _type(v.node) == "whiteout" else ""
    return _name_text(v, full) + mark + (_OPAQUE_MARK if v.node.opaque else "")


def _print_long(found: Sequence[Version], full: bool) -> None:
    import time

    def when(ns: int) -> str:
        try:
            return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ns // 10**9))
        except (OverflowError, OSError, ValueError):
            return "?"

    print_table(
        ["MODE", "UID", "GID", "SIZE", "MODIFIED", "LAYER", "NAME"],
        [
            [
                _mode_text(v.node) + ("+o" if v.node.opaque else ""),
                str(v.node.uid),
                str(v.node.gid),
                str(v.node.size),
                when(v.node.mtime_ns),
                str(v.layer),
                _name_text(v, full),
            ]
            for v in found
        ],
    )


# -- cat ----------------------------------------------------------------------


@click.command("cat")
@_layer_options
@click.option("--force", is_flag=True, help="Write a binary file to a terminal anyway.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the content as text or base64).")
@registry_options
@click.argument("ref")
@click.argument("path")
@pass_app
def cat_cmd(
    app: App,
    /,
    number: int | None,
    upto: int | None,
    force: bool,
    as_json: bool,
    ref: str,
    path: str,
    **flags: Any,
) -> None:
    """Write file PATH of REF (merged, layer N alone, or layers 1..N) to stdout.

    Symlinks are followed inside the image. Only the file's bytes are
    read: from the local blob, the chunk cache, or by Range from the
    registry (a lazily recorded layer), verified before they are written.
    A binary file (a NUL or non-UTF-8 in its first 8 KiB) is refused on a
    terminal unless --force.

    \b
    --json: {"image", "path", "resolved", "layer", "size", "encoding":
    "utf-8" or "base64", "content"}
    """
    from ckfs.inspect import user_path

    asked = user_path(path)
    tty = sys.stdout.isatty()

    async def write(image: ImageLayers) -> None:
        tree = _tree(image, number, upto)
        resolved = tree.follow(asked)
        v = _file(tree, resolved, asked)
        layer = image.layer(v.layer)
        head = await image.read(layer, v.node, 0, _SNIFF)
        binary = _binary(head, whole=len(head) >= v.node.size)
        if as_json:
            data = head + await image.read(layer, v.node, len(head))
            print_json(_cat_json(image, asked, resolved, v, data))
            return
        if binary and tty and not force:
            from ckfs.errors import InvalidArgument

            raise InvalidArgument(f"{_path(asked)} is a binary file: use --force to print it")
        out = sys.stdout.buffer
        out.write(head)
        offset = len(head)
        while offset < v.node.size:
            piece = await image.read(layer, v.node, offset, _PIECE)
            out.write(piece)
            offset += len(piece)
        out.flush()

    with_images(app, (ref,), flags, write)


def _file(tree: Merged, resolved: str, asked: str) -> Version:
    from ckfs.archive.entry import Kind
    from ckfs.errors import InvalidArgument, NotFound
    from ckfs.safetext import printable

    v = tree.resolve(resolved)
    if v is None:
        raise NotFound(f"{printable(_path(asked))!r}: no such file")
    if v.node.kind != Kind.FILE:
        raise InvalidArgument(f"{printable(_path(asked))!r} is a {_type(v.node)}, not a file")
    return v


def _binary(head: bytes, *, whole: bool = False) -> bool:
    """Whether *head* (the first bytes; *whole*: all of the file) looks binary."""
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # A character cut at the sniff's end is fine; at the file's end it is not.
        return whole or e.start < len(head) - 3
    return False


def _cat_json(
    image: ImageLayers, asked: str, resolved: str, v: Version, data: bytes
) -> dict[str, Any]:
    import base64

    try:
        text: str | None = None if b"\0" in data else data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "image": image.name,
        "path": _path(asked),
        "resolved": _path(resolved),
        "layer": v.layer,
        "size": len(data),
        "encoding": "utf-8" if text is not None else "base64",
        "content": text if text is not None else base64.b64encode(data).decode(),
    }
