"""``ckfs images``: list, inspect, tag and remove image names."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import click

from ckfs_cli.app import (
    App,
    for_each,
    human_size,
    labels_json,
    labels_text,
    print_json,
    print_table,
)
from ckfs_cli.options import pass_app

if TYPE_CHECKING:
    from ckfs.content import ContentStore
    from ckfs.descriptor import Descriptor
    from ckfs.images.store import Image


def normalize(name: str) -> str:
    """The stored form of a user-typed name (``alpine`` → ``docker.io/library/alpine:latest``)."""
    from ckfs import reference

    return str(reference.parse(name))


@click.group()
def images() -> None:
    """Manage image names (name → target descriptor)."""


@images.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only names.")
@click.argument("filters", nargs=-1)
@pass_app
def ls(app: App, as_json: bool, quiet: bool, filters: tuple[str, ...]) -> None:
    """List images, optionally matching containerd-style FILTERS.

    An image whose content cannot be read (a blob missing, a manifest or
    config that does not parse) is still listed: SIZE says "(incomplete)"
    or "(error)" (with --json, an "error" field) and stderr has one line
    saying why. The others are listed as usual and the exit status stays 0:
    the listing itself worked.

    \b
    Examples:
      ckfs images ls
      ckfs images ls 'name~=alpine' 'labels."env"==prod'
    """
    from ckfs.safetext import printable

    found = app.images.list(list(filters))
    if quiet:
        for i in found:
            click.echo(i.name)
        return
    listed = [(i, _contents(app, i)) for i in found]
    if as_json:
        print_json([{**image_json(i), **c.to_json()} for i, c in listed])
    else:
        rows = [
            [
                i.name,
                _short_type(i.target.media_type),
                str(i.target.digest),
                c.size_text(),
                ",".join(c.platforms) or "-",
                labels_text(i.labels),
            ]
            for i, c in listed
        ]
        print_table(["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"], rows)
    for i, c in listed:
        if c.error is not None:
            click.echo(f"ckfs: image {printable(i.name)}: {c.error}", err=True)


class _Contents:
    """What ``images ls`` reads of one image's content, or why it could not."""

    def __init__(
        self,
        size: int | None,
        platforms: list[str],
        error: str | None,
        missing: bool,
        lazy: int = 0,
    ):
        self.size = size
        self.platforms = platforms
        self.error = error
        self.missing = missing
        #: Layers here only as indexes (``ckfs pull --lazy``, lazy mounts).
        self.lazy = lazy

    def size_text(self) -> str:
        if self.size is not None:
            return human_size(self.size) + (f" ({self.lazy} lazy)" if self.lazy else "")
        return "(incomplete)" if self.missing else "(error)"

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"size": self.size, "platforms": self.platforms}
        if self.lazy:
            out["lazy_layers"] = self.lazy
        if self.error is not None:
            out["error"] = self.error
        return out


def _contents(app: App, image: Image) -> _Contents:
    """Size and platforms of *image*; a bad record gives its one-line error instead."""
    from ckfs.errors import CkfsError, NotFound
    from ckfs.images import image as img
    from ckfs_cli.main import describe

    try:
        store = blobs(app)
        missing: list[Descriptor] = []
        size = sum(d.size for d in img.tree(store, image.target, missing_layers=missing))
        plats = [str(p) for p in img.platforms_of(store, image.target)]
        if unindexed := [d for d in missing if not indexed(app, d)]:
            raise NotFound(
                f"image {image.name}: blob {unindexed[0].digest} "
                f"({unindexed[0].media_type}) is missing"
            )
    except (CkfsError, OSError) as e:
        return _Contents(None, [], describe(e), isinstance(e, NotFound))
    return _Contents(size, plats, None, False, lazy=len(missing))


def indexed(app: App, layer: Descriptor) -> bool:
    """Whether *layer* has a layer index on the root (lazy: its blob is not needed)."""
    from ckfs.layerindex.store import IndexStore

    return IndexStore(app.state.root).path(layer.digest).is_file()


def blobs(app: App) -> ContentStore:
    """The content an image's manifests are read from, local or ckfsd's.

    `ckfs.images.image` reads through ``exists`` and ``read_all`` only,
    which ckfsd's store (`ckfs.remote_content`) answers as the local one does.
    """
    return cast("ContentStore", app.content)


def _short_type(media_type: str) -> str:
    from ckfs import mediatypes as mt

    return {
        mt.OCI_INDEX: "oci index",
        mt.OCI_MANIFEST: "oci manifest",
        mt.DOCKER_MANIFEST_LIST: "docker list",
        mt.DOCKER_MANIFEST: "docker manifest",
    }.get(media_type, media_type)


def image_json(i: object) -> dict[str, object]:
    from ckfs.images.store import Image

    assert isinstance(i, Image)
    return {
        "name": i.name,
        "target": i.target.to_json(),
        "labels": labels_json(i.labels),
        "created_at": i.created_at.isoformat(),
        "updated_at": i.updated_at.isoformat(),
    }


@images.command("inspect")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--platform", default=None, help="Platform to show (default: this host).")
@click.argument("name")
@pass_app
def inspect(app: App, as_json: bool, platform: str | None, name: str) -> None:
    """Show an image: target, manifest and config for a platform, chain IDs.

    If the manifest or config cannot be read (missing, or not parsing),
    what the name holds is still shown, with an "error" field, and the exit
    status is 1 after the one-line error on stderr.
    """
    from ckfs.errors import CkfsError
    from ckfs.identity import chain_ids
    from ckfs.images import image as img
    from ckfs.images import platforms
    from ckfs_cli.main import describe

    image = app.images.get(normalize(name))
    out = image_json(image)
    plat = platforms.parse(platform) if platform else None
    try:
        store = blobs(app)
        mdesc, manifest = img.manifest(store, image.target, plat)
        cfg = img.read_config(store, manifest)
    except (CkfsError, OSError) as e:
        out["error"] = describe(e)
    else:
        out["manifest"] = mdesc.to_json()
        out["config"] = manifest.config.to_json()
        out["layers"] = [d.to_json() for d in manifest.layers]
        out["platform"] = str(cfg.platform())
        out["diff_ids"] = list(cfg.diff_ids)
        out["chain_ids"] = [str(c) for c in chain_ids(cfg.diff_ids)] if cfg.diff_ids else []
        out["entrypoint"] = list(cfg.entrypoint or [])
        out["cmd"] = list(cfg.cmd or [])
        out["env"] = list(cfg.env)
        out["working_dir"] = cfg.working_dir
        out["user"] = cfg.user
    if as_json:
        print_json(out)
    else:
        width = max(len(k) for k in out)
        for key, value in out.items():
            if isinstance(value, list):
                click.echo(f"{key + ':':<{width + 1}}")
                for v in value:
                    click.echo(f"  {_one_line(v)}")
            else:
                click.echo(f"{key + ':':<{width + 1}} {_one_line(value)}")
    if "error" in out:
        click.echo(f"ckfs: {out['error']}", err=True)
        raise SystemExit(1)


def _one_line(v: object) -> str:
    """A value of the image (its config is untrusted) as one escaped line."""
    from ckfs.safetext import escape

    if isinstance(v, dict) and "digest" in v:
        text = f"{v['digest']} {v.get('mediaType', '')} {v.get('size', '')}".rstrip()
    else:
        text = labels_text(v) if isinstance(v, dict) else str(v)
    return escape(text)


@images.command("tag")
@click.option("-f", "--force", is_flag=True, help="Replace DST if it exists.")
@click.argument("src")
@click.argument("dst")
@pass_app
def tag(app: App, force: bool, src: str, dst: str) -> None:
    """Give the image SRC another name DST."""
    created = app.images.tag(normalize(src), normalize(dst), force=force)
    click.echo(created.name)


@images.command("rm")
@click.argument("names", nargs=-1, required=True)
@pass_app
def rm(app: App, names: tuple[str, ...]) -> None:
    """Remove image names (their content stays until gc)."""

    def delete(name: str) -> str:
        ref = normalize(name)
        app.images.delete(ref)
        return ref

    for_each(names, delete)
