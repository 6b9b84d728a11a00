"""``ckfs mounts``: the root filesystems ckfs has mounted, and bringing them back.

Every ``ckfs mount`` is a snapshot named after its target
(`ckfs.mount.mount_key`), so the mounts are listed from the snapshotters'
records, not from the kernel's table: a mount that is gone (a reboot, a
FUSE server that died) is still listed, and ``recover`` mounts it again.
Both read the root directly (its metadata, layer indexes and the FUSE
server's counters), also when ckfsd serves it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ckfs_cli.app import App, human_size, print_json, print_table
from ckfs_cli.options import pass_app
from ckfs_cli.rootfs_cmds import fuse_snapshotter

if TYPE_CHECKING:
    from ckfs.snapshots import Info, Snapshotter
    from snapshotters.fuse.process import ServerPaths


@click.group("mounts")
def mounts() -> None:
    """List ckfs's mounts, with each layer's source and fetch counters; recover them."""


@mounts.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def ls_cmd(app: App, as_json: bool) -> None:
    """Every mount: target, image, state, and per layer its index source and bytes fetched.

    \b
    Sources: estargz (TOC by range), gzip-index (seek index over the local
    blob), tar (uncompressed, by range), eager (unpacked: nothing indexes it).
    """
    found = _mounts(app)
    if as_json:
        print_json(found)
        return
    rows = []
    for m in found:
        layers = m["layers"]
        lazy = sum(1 for layer in layers if layer["source"] != "eager")
        fetched = sum(layer.get("fetched", 0) for layer in layers)
        size = sum(layer.get("size", 0) for layer in layers if layer["source"] != "eager")
        rows.append(
            [
                m["target"],
                m["snapshotter"],
                m["image"],
                m["state"],
                f"{lazy}/{len(layers)}" if m["snapshotter"] == "fuse" else "-",
                f"{human_size(fetched)}/{human_size(size)}" if lazy else "-",
            ]
        )
    print_table(["TARGET", "SNAPSHOTTER", "IMAGE", "STATE", "LAZY", "FETCHED"], rows)


@mounts.command("recover")
@pass_app
def recover_cmd(app: App) -> None:
    """Mount again what a dead FUSE server or a reboot took down.

    Starts the FUSE server if none runs (detaching a dead one's mount), then
    remounts every lazy mount made on another server, and every mount that
    is not mounted, at its target.
    """
    from snapshotters.fuse.recover import recover

    report = recover(fuse_snapshotter(app))
    if report.started:
        click.echo("started the FUSE server", err=True)
    for target in report.remounted:
        click.echo(f"remounted {target}", err=True)
    for target, why in report.failed:
        click.echo(f"ckfs: cannot remount {target}: {why}", err=True)
    if report.failed:
        raise SystemExit(1)


def _mounts(app: App) -> list[dict[str, Any]]:
    """Every mount snapshot of every snapshotter, as ``ls --json`` prints it."""
    import snapshotters
    from ckfs.mount import mount_target
    from ckfs.provide import IMAGE_LABEL
    from snapshotters.fuse.process import ServerPaths
    from snapshotters.fuse.recover import server_identity

    paths = ServerPaths(app.state.root)
    server, stats = server_identity(paths), _server_stats(paths)
    found = []
    for name in snapshotters.NAMES:
        sn = app.state.snapshotter(name)
        for info in sn.walk():
            target = mount_target(info.name)
            if target is None:
                continue
            found.append(
                {
                    "target": str(target),
                    "snapshotter": name,
                    "key": info.name,
                    "image": info.labels.get(IMAGE_LABEL, ""),
                    "state": _state(target, info, server),
                    "layers": _layers(app, sn, info, stats) if name == "fuse" else [],
                }
            )
    return sorted(found, key=lambda m: m["target"])


def _state(target: Path, info: Info, server: str | None) -> str:
    """``mounted``; ``stale`` (made on a FUSE server that is gone: recover); ``unmounted``."""
    from ckfs.mount import is_mountpoint, is_stale
    from snapshotters.fuse.recover import SERVED_BY

    try:
        if is_stale(target):
            return "stale"
        if not is_mountpoint(target):
            return "unmounted"
    except OSError:
        return "stale"
    served_by = info.labels.get(SERVED_BY)
    return "stale" if served_by is not None and served_by != server else "mounted"


def _layers(
    app: App, sn: Snapshotter, info: Info, stats: dict[str, dict[str, int]]
) -> list[dict[str, Any]]:
    """The layers under mount snapshot *info*, bottom first, with their sources and counters."""
    from ckfs.layerindex.store import IndexStore

    assert hasattr(sn, "layer")
    store = IndexStore(app.state.root)
    layers: list[dict[str, Any]] = []
    key = info.parent
    while key:
        digest = sn.layer(key)
        layer: dict[str, Any] = {"chain_id": key, "digest": str(digest or ""), "source": "eager"}
        if digest is not None:
            index = store.get(digest)
            if index is not None:
                layer.update(source=index.source, size=index.blob_size)
                index.close()
            layer.update(stats.get(str(digest), {}))
        layers.append(layer)
        key = sn.stat(key).parent
    return layers[::-1]


def _server_stats(paths: ServerPaths) -> dict[str, dict[str, int]]:
    """The FUSE server's per-layer counters (`ServerPaths.stats`), if it wrote any."""
    try:
        data = json.loads(paths.stats.read_text())
    except (OSError, ValueError):
        return {}
    layers = data.get("layers", {}) if isinstance(data, dict) else {}
    return {
        str(k): {f: int(v[f]) for f in ("fetched", "hits", "misses") if f in v}
        for k, v in layers.items()
        if isinstance(v, dict)
    }
