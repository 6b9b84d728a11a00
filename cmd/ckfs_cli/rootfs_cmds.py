"""``ckfs rootfs``, ``mount``, ``umount``, ``bundle`` and ``gc``: images become root filesystems.

``mount`` and ``bundle`` name their snapshot after the directory they mount
(``mount:<absolute path>``), so ``umount`` finds it again from the path alone
and ``gc`` sees it as in use. ``mount --upto N`` stacks the image's first N
layers only, ``mount --layer N`` shows layer N alone (`snapshotters.layerview`);
``ckfs shell`` runs a throwaway container over either (``shell_cmds``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ckfs.mount import mount_key
from ckfs_cli.app import App, human_size, print_json, print_mounts, skip_httpx_cli
from ckfs_cli.images_cmds import blobs, normalize
from ckfs_cli.options import (
    DURATION,
    pass_app,
    pull_options,
    registry_options,
    snapshotter_option,
    snapshotter_option_defaulting,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ckfs.descriptor import Descriptor
    from ckfs.digest import Digest
    from ckfs.images.config import ImageConfig
    from ckfs.mount import Mount
    from snapshotters.fuse.snapshotter import FuseSnapshotter


def _rootfs(
    app: App,
    ref: str,
    snapshotter: str,
    key: str,
    readonly: bool,
    flags: dict[str, Any],
    upto: int | None = None,
) -> list[Mount]:
    """A snapshot *key* on the image *ref*: its Mount records (`ckfs.provide.ensure_rootfs`).

    Through ckfsd, the daemon makes the snapshot (its Mounts RPC runs the
    same function) and the caller gets the records to mount itself. A
    partial stack (*upto*) is made here also when ckfsd serves the root:
    that RPC knows whole images only, and the snapshot is the root's
    either way (``umount`` through ckfsd removes it as any other).
    """
    from ckfs import reference

    parsed = reference.parse(ref)
    if (daemon := app.daemon) is not None and upto is None:
        from ckfs.client import pull_options as request_options

        return daemon.mounts(
            str(parsed),
            key,
            snapshotter=snapshotter,
            readonly=readonly,
            options=request_options(**flags),
        )
    from ckfs.provide import ensure_rootfs

    options = pull_options(**flags)
    if snapshotter == "fuse":
        # An image attached before has its snapshots on the FUSE server's
        # directories: served again first if the server stopped (a reboot,
        # `ckfs mounts` stop) or the new snapshot's parent is a dead link.
        # A few ms when it runs.
        fuse_snapshotter(app).serve()
    skip_httpx_cli()  # before an unpack or a pull, if it comes to that, imports httpx
    return ensure_rootfs(
        app.state,
        parsed,
        key,
        snapshotter=snapshotter,
        readonly=readonly,
        options=options,
        upto=upto,
    )


def _remove(app: App, snapshotter: str, key: str) -> None:
    """Remove the snapshot *key*: through ckfsd (Unmount) when one serves, else here."""
    if (daemon := app.daemon) is not None:
        daemon.unmount(key, snapshotter)
    else:
        app.state.snapshotter(snapshotter).remove(key)


def _mount(
    app: App,
    ref: str,
    target: Path,
    snapshotter: str,
    ro: bool,
    flags: dict[str, Any],
    *,
    merged: bool = False,
    part: Part = None,
    scratch: Path | None = None,
) -> str:
    """Pull, unpack (or attach), prepare and mount; returns the snapshot key.

    The mount itself is always this process's: it runs as the caller, in
    the caller's mount namespace, also when ckfsd made the snapshot. A lazy
    mount is labelled with the FUSE server it stands on, so ``ckfs mounts
    recover`` knows to remount it if that server dies; a *merged* one is a
    read-only bind of one FUSE tree of the whole image, no overlay. A
    *part* stacks the layers up to its number, or shows that layer alone
    (read-only; writable over a *scratch* directory, as `ckfs shell` wants:
    `snapshotters.layerview.layer_mounts`).

    Raises:
        FailedPrecondition: *target* is already a mountpoint or has a
            snapshot; *merged* with another snapshotter than fuse, or with a
            layer that could not be attached lazily; a layer alone of a
            snapshotter without layer directories (native).
        InvalidArgument: *part*'s layer is out of range.
    """
    from ckfs import mount as mountlib
    from ckfs.errors import AlreadyExists, FailedPrecondition

    key = mount_key(target)
    upto, alone = part or (None, False)
    if merged and snapshotter != "fuse":
        raise FailedPrecondition("--merged needs the fuse snapshotter")
    if mountlib.is_mountpoint(target):
        raise FailedPrecondition(f"{target} is already a mountpoint; ckfs umount it first")
    try:
        mounts = _rootfs(app, ref, snapshotter, key, ro or merged or alone, flags, upto)
    except AlreadyExists:
        raise FailedPrecondition(
            f"{target} already has a ckfs snapshot ({snapshotter}); run `ckfs umount {target}`"
        ) from None
    try:
        lazy = fuse_snapshotter(app) if snapshotter == "fuse" else None
        if alone:
            mounts = _alone(app, snapshotter, key, scratch)
        elif lazy is not None and merged:
            from snapshotters.fuse.recover import merged_mounts

            mounts = merged_mounts(lazy, key)
        target.mkdir(parents=True, exist_ok=True)
        mountlib.mount_all(mounts, target)
        if lazy is not None:
            from snapshotters.fuse.recover import label_served

            label_served(lazy, key)
    except BaseException:
        undo_mount(app, snapshotter, target, key)
        raise
    if lazy is not None and not (part is None and not merged and _all_attached(mounts)):
        layers = lazy
        say_eager(
            app,
            ref,
            flags,
            lambda _, c: layers.layer(str(c)) is not None,
            "unpacked eagerly",
            upto=upto,
        )
    return key


def _all_attached(mounts: list[Mount]) -> bool:
    """Whether every lower directory of *mounts* is a link into the FUSE tree.

    Then every layer of the image is served lazily and `say_eager` has
    nothing to name, which is told here without opening the image's
    records (a cold mount's client spent ~0.1 s importing and reading
    them). Anything else, escaped paths included, goes the long way.
    """
    lowers = [
        d
        for m in mounts
        for o in m.options
        if o.startswith("lowerdir=")
        for d in o.removeprefix("lowerdir=").split(":")
    ]
    no_escapes = not any("\\" in m for m in lowers)
    return bool(lowers) and no_escapes and all(os.path.islink(d) for d in lowers)


#: Which layers a mount shows (`part_of`): ``(N, False)`` layers 1..N,
#: ``(N, True)`` layer N alone, None all of them.
Part = tuple[int, bool] | None


def part_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--layer N`` and ``--upto N`` (read them with `part_of`): ``mount`` and ``shell``."""
    f = click.option(
        "--upto",
        type=int,
        metavar="N",
        help="Only layers 1..N (bottom first, as `ckfs layers` numbers them).",
    )(f)
    return click.option(
        "--layer",
        type=int,
        metavar="N",
        help="Layer N alone, without the layers below it (overlayfs or fuse snapshotter).",
    )(f)


def part_of(layer: int | None, upto: int | None) -> Part:
    """The `Part` ``--layer`` and ``--upto`` ask for.

    Raises:
        click.UsageError: both are given.
    """
    if layer is not None and upto is not None:
        raise click.UsageError("--layer and --upto exclude each other")
    if layer is not None:
        return (layer, True)
    return None if upto is None else (upto, False)


def _alone(app: App, snapshotter: str, key: str, scratch: Path | None) -> list[Mount]:
    """The mount of the layer under the view *key* alone, *key* labelled to say so."""
    from snapshotters.layerview import layer_mounts, mark_layer_only

    sn = app.state.snapshotter(snapshotter)
    mounts = layer_mounts(sn, key, scratch)
    mark_layer_only(sn, key)
    return mounts


def undo_mount(app: App, snapshotter: str, target: Path, key: str) -> None:
    """Unmount *target* if it is mounted and remove its snapshot *key*."""
    from ckfs import mount as mountlib

    if mountlib.is_mountpoint(target):
        mountlib.unmount_all(target)
    _remove(app, snapshotter, key)


def say_eager(
    app: App,
    ref: str,
    flags: dict[str, Any],
    lazy: Callable[[Descriptor, Digest], bool],
    what: str,
    *,
    upto: int | None = None,
) -> None:
    """Name on stderr each layer of *ref* that *lazy* says is not lazy, never silently.

    Read from the root's own records after the command, so every mount (or
    lazy pull) says it, not only the one that decided, also through ckfsd.

    Args:
        lazy: whether a layer (descriptor, chain ID) is served lazily.
        what: what happens to the others, ``unpacked eagerly`` or so.
        upto: only layers 1..*upto* (a partial mount attaches no more).
    """
    from ckfs.layerindex.sources import EAGER, source_of
    from ckfs.rootfs import image_chain

    image = app.state.images.get(normalize(ref))
    manifest, _, chain = image_chain(
        app.state.content, image.target, pull_options(**flags).platform
    )
    for desc, chain_id in list(zip(manifest.layers, chain, strict=True))[:upto]:
        if lazy(desc, chain_id):
            continue
        why = "cannot be read lazily" if source_of(desc) == EAGER else "cannot be served lazily"
        click.echo(f"ckfs: layer {desc.digest} ({desc.media_type}) {why}: {what}", err=True)


@click.command("mount")
@snapshotter_option_defaulting("fuse")
@click.option("--ro", is_flag=True, help="Mount a read-only view.")
@click.option(
    "--merged",
    is_flag=True,
    help="One read-only FUSE tree of the whole image, whiteouts applied by ckfs "
    "(no overlayfs; fuse only).",
)
@part_options
@registry_options
@click.argument("ref")
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@pass_app
def mount_cmd(
    app: App,
    /,
    snapshotter: str,
    ro: bool,
    merged: bool,
    layer: int | None,
    upto: int | None,
    ref: str,
    target: Path,
    **opts: Any,
) -> None:
    """Mount the image REF at TARGET: fetch only what is missing, lazily by default.

    With the fuse snapshotter (the default) the layers are attached, not
    unpacked: file contents are fetched as they are read, and a ckfsd is
    started in the background for the root if none answers (its log:
    ROOT/ckfsd.log; not with --no-daemon). overlayfs and native pull and
    unpack the whole image first.

    --upto N mounts the stack of layers 1..N (writable unless --ro), --layer
    N that layer alone, read-only, as its snapshot holds it: its whiteouts
    are 0/0 character devices, its opaque directories carry the xattr
    trusted.overlay.opaque=y. `ckfs umount` removes either as usual.

    \b
    Examples:
      ckfs mount docker.io/stevvooe/foo /mnt/rootfs
      ckfs mount --merged docker.io/stevvooe/foo /mnt/debug
      ckfs mount --ro --snapshotter native example.local/ckfs/busybox /mnt/x
      ckfs mount --upto 3 docker.io/stevvooe/foo /mnt/three
      ckfs mount --layer 2 docker.io/stevvooe/foo /mnt/second
    """
    part = part_of(layer, upto)
    if merged and layer is not None:
        raise click.UsageError("--merged and --layer exclude each other")
    if snapshotter == "fuse":
        app.start_daemon()  # a lazy mount wants ckfsd behind it (ckfs.client.start_daemon)
    key = _mount(app, ref, target, snapshotter, ro, opts, merged=merged, part=part)
    click.echo(f"mounted {ref} at {target} ({snapshotter} snapshot {key!r})", err=True)


@click.command("umount")
@click.option("--keep", is_flag=True, help="Keep the snapshot (and its changes).")
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@pass_app
def umount_cmd(app: App, keep: bool, target: Path) -> None:
    """Unmount TARGET and remove its snapshot unless --keep."""
    from ckfs.errors import NotFound

    if not unmount_target(app, target, keep=keep):
        raise NotFound(f"{target}: not mounted by ckfs")


def unmount_target(app: App, target: Path, *, keep: bool = False) -> bool:
    """Unmount *target* and remove its snapshot (and merged view) unless *keep*.

    Returns:
        Whether there was anything: a mount at *target* or a snapshot of it.
    """
    import snapshotters
    from ckfs import mount as mountlib
    from ckfs.errors import NotFound

    key = mount_key(target)
    was_mounted = mountlib.is_mountpoint(target)
    if was_mounted:
        mountlib.unmount_all(target)
    if not keep:
        _remove_view(app, key)
    owned = False
    if (daemon := app.daemon) is not None and not keep:
        try:
            daemon.unmount(key)  # from every snapshotter that has it, in one call
            owned = True
        except NotFound:
            pass
    else:
        for name in snapshotters.NAMES:
            sn = app.snapshotter(name)
            try:
                sn.stat(key)
            except NotFound:
                continue
            owned = True
            if not keep:
                sn.remove(key)
    return was_mounted or owned


def fuse_snapshotter(app: App) -> FuseSnapshotter:
    """The root's fuse snapshotter, opened here also when ckfsd serves the root.

    Merged views and the served-by labels are files and labels of the
    root this process can reach itself (the mount is this process's too).
    """
    from snapshotters.fuse.snapshotter import FuseSnapshotter

    sn = app.state.snapshotter("fuse")
    assert isinstance(sn, FuseSnapshotter)
    return sn


def _remove_view(app: App, key: str) -> None:
    """Withdraw the merged view of the mount *key*, if it had one (``mount --merged``)."""
    from snapshotters.fuse.recover import view_name

    sn = fuse_snapshotter(app)
    if view_name(key) in sn.views():
        sn.remove_view(view_name(key))


@click.command("rootfs")
@snapshotter_option
@click.option("--key", default=None, help="Snapshot key [default: a new unique one].")
@click.option("--ro", is_flag=True, help="A read-only view instead of a writable snapshot.")
@click.option("--json", "as_json", is_flag=True, help="Print the Mount records as JSON.")
@registry_options
@click.argument("ref")
@pass_app
def rootfs_cmd(
    app: App, /, snapshotter: str, key: str | None, ro: bool, as_json: bool, ref: str, **opts: Any
) -> None:
    """Prepare a snapshot of REF and print its Mount records, without mounting.

    The records are what runc's ``config.json`` root and containerd expect:
    mount them (in order) on one target to get the root filesystem.
    """
    if not key:
        import secrets  # ~10 ms of imports every other command need not pay

        key = f"rootfs-{time.time_ns()}-{secrets.token_hex(4)}"
    mounts = _rootfs(app, ref, snapshotter, key, ro, opts)
    if as_json:
        print_json(
            {"key": key, "snapshotter": snapshotter, "mounts": [m.to_json() for m in mounts]}
        )
        return
    click.echo(f"key: {key}")
    print_mounts(mounts)


@click.command("bundle")
@snapshotter_option_defaulting("fuse")
@click.option("--ro", is_flag=True, help="Read-only root filesystem.")
@click.option(
    "--no-new-privileges",
    is_flag=True,
    help="Setuid binaries in the image gain no privileges (off by default, as in "
    "containerd and Docker; `runc spec` turns it on).",
)
@registry_options
@click.argument("ref")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("args", nargs=-1)
@pass_app
def bundle_cmd(
    app: App,
    /,
    snapshotter: str,
    ro: bool,
    no_new_privileges: bool,
    ref: str,
    directory: Path,
    args: tuple[str, ...],
    **opts: Any,
) -> None:
    """Make DIRECTORY an OCI runtime bundle of REF that `runc run -b DIRECTORY ID` runs.

    The root filesystem is mounted at DIRECTORY/rootfs; ARGS replace the
    image's command. Clean up with `ckfs umount DIRECTORY/rootfs`.
    """
    from ckfs.runtime_spec import build_spec

    def spec(config: ImageConfig, rootfs: Path) -> dict[str, Any]:
        return build_spec(
            config, rootfs=rootfs, args=args, readonly=ro, no_new_privileges=no_new_privileges
        )

    make_bundle(app, ref, directory, snapshotter, opts, spec, ro=ro)
    rootfs = directory / "rootfs"
    click.echo(str(directory))
    click.echo(f"run it: runc run -b {directory} <id>; clean up: ckfs umount {rootfs}", err=True)


def make_bundle(
    app: App,
    ref: str,
    directory: Path,
    snapshotter: str,
    flags: dict[str, Any],
    spec_for: Callable[[ImageConfig, Path], dict[str, Any]],
    *,
    ro: bool = False,
    part: Part = None,
    scratch: Path | None = None,
) -> str:
    """Mount *ref* at DIRECTORY/rootfs and write ``spec_for(config, rootfs)`` as its
    ``config.json``; the rootfs snapshot's key. Undone if the spec cannot be made.
    *part* and *scratch* as `_mount`'s.

    Raises:
        As `_mount`, and what *spec_for* raises.
    """
    from ckfs.images import image as img

    options = pull_options(**flags)
    directory.mkdir(parents=True, exist_ok=True)
    rootfs = directory / "rootfs"
    key = _mount(app, ref, rootfs, snapshotter, ro, flags, part=part, scratch=scratch)
    try:
        image = app.images.get(normalize(ref))
        config = img.config(blobs(app), image.target, options.platform)
        tmp = directory / "config.json.tmp"
        tmp.write_text(json.dumps(spec_for(config, rootfs), indent=2) + "\n")
        tmp.replace(directory / "config.json")
    except BaseException:
        undo_mount(app, snapshotter, rootfs, key)
        raise
    return key


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@click.option(
    "--ingest-expiry",
    type=DURATION,
    default=None,
    metavar="DURATION",
    help="Remove partial downloads (ingests) not written to for this long (e.g. 12h, 0 for "
    "all); those a running pull holds stay [default: 24h, as containerd's pull leases: a "
    "pull interrupted today still resumes tomorrow].",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def gc_cmd(app: App, dry_run: bool, ingest_expiry: float | None, as_json: bool) -> None:
    """Remove content and snapshots no image, mount or snapshot needs.

    A record gc cannot handle (an image whose manifest does not parse, a
    directory that will not go) is one line on stderr; everything else is
    still collected, and the exit status is 1.
    """
    from ckfs.safetext import message

    if (daemon := app.daemon) is not None:
        report = daemon.gc(dry_run=dry_run, ingest_expiry=ingest_expiry)
    else:
        report = _collect_here(app, dry_run, ingest_expiry)
    if as_json:
        print_json(report)
    else:
        _print_gc(report)
    for line in report["errors"]:
        click.echo(f"ckfs: gc: {message(line)}", err=True)
    if report["errors"]:
        raise SystemExit(1)


def _collect_here(app: App, dry_run: bool, ingest_expiry: float | None) -> dict[str, Any]:
    """Collect on the root in this process; what ``--json`` prints (as ckfsd's GC answers)."""
    import snapshotters
    from ckfs.gc import collect

    state = app.state
    with state.gc_lock(exclusive=True):
        report = collect(
            state.content,
            state.images,
            {n: state.snapshotter(n) for n in snapshotters.NAMES},
            dry_run=dry_run,
            layer_root=state.root,
            **({} if ingest_expiry is None else {"ingest_expiry": ingest_expiry}),
        )
    return report.to_json(dry_run=dry_run)


def _print_gc(report: dict[str, Any]) -> None:
    from ckfs.safetext import escape

    verb = "would remove" if report["dry_run"] else "removed"
    for d in report["blobs"]:
        click.echo(f"{verb} blob {d}")
    for sn, names in report["snapshots"].items():
        for n in names:
            click.echo(f"{verb} snapshot {sn}/{escape(n)}")
    for ref in report["ingests"]:
        click.echo(f"{verb} ingest {escape(ref)}")
    for d in report["layers"]:
        click.echo(f"{verb} layer index {d}")
    if ingests := report["ingests"]:
        size = human_size(report["ingest_bytes"])
        click.echo(f"{verb} {len(ingests)} stale ingests ({size})", err=True)
    n_snapshots = sum(len(v) for v in report["snapshots"].values())
    size = human_size(report["bytes"])
    click.echo(
        f"{verb} {len(report['blobs'])} blobs ({size}) and {n_snapshots} snapshots", err=True
    )
