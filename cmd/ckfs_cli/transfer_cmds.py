"""``ckfs import`` and ``ckfs export``: images in and out of local archives."""

from __future__ import annotations

from pathlib import Path

import click

from ckfs_cli.app import App, human_size, print_json
from ckfs_cli.options import pass_app


@click.command("import")
@click.option(
    "--name",
    default=None,
    help="Name for the image; with several images, the repository their tags join.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.argument("path", type=click.Path(path_type=Path))
@pass_app
def import_cmd(app: App, name: str | None, as_json: bool, path: Path) -> None:
    """Import an OCI image layout (directory or tar) or a `docker save` archive.

    Every blob is verified against its digest; nothing is registered unless
    all of it verified.
    """
    import trio

    from ckfs.remotes.archives import open_source
    from ckfs.transfer import import_source

    source = open_source(path)
    try:
        report = trio.run(
            lambda: import_source(source, app.state.content, app.state.images, name=name)
        )
    finally:
        source.close()
    if as_json:
        print_json(
            {
                "images": [{"name": i.name, "digest": str(i.target.digest)} for i in report.images],
                "blobs": report.blobs,
                "new_blobs": report.new_blobs,
                "new_bytes": report.new_bytes,
                "seconds": round(report.seconds, 3),
            }
        )
        return
    for i in report.images:
        click.echo(f"{i.name}  {i.target.digest}")
    click.echo(
        f"imported {report.new_blobs} of {report.blobs} blobs "
        f"({human_size(report.new_bytes)}) in {report.seconds:.2f}s",
        err=True,
    )


@click.command("export")
@click.argument("name")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@pass_app
def export_cmd(app: App, name: str, out: Path) -> None:
    """Write the image NAME to OUT as an OCI image layout tar."""
    from ckfs.transfer import export_images
    from ckfs_cli.images_cmds import normalize

    ref = normalize(name)
    size = export_images(app.state.content, app.state.images, [ref], out)
    click.echo(f"exported {ref} to {out} ({human_size(size)})", err=True)
