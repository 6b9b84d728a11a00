"""Partial root filesystems without mounting: ``--upto N`` stacks and ``--layer N`` alone.

`ckfs.rootfs.snapshot_on` and `ckfs.provide.ensure_rootfs` with ``upto``,
`snapshotters.layerview.layer_mounts` and the CLI's `part_of`, on images
written by `tests.layouts` (the integration tests mount them for real:
integration/test_partial.py); ``ckfs shell``'s spec and bundle lock.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import pytest
import trio

from ckfs import reference
from ckfs.errors import FailedPrecondition, InvalidArgument, NotFound
from ckfs.images.config import ImageConfig
from ckfs.mount import Mount
from ckfs.provide import ensure_rootfs
from ckfs.rootfs import snapshot_on
from ckfs.snapshots import LayerDirs
from ckfs_cli import shell_cmds
from ckfs_cli.rootfs_cmds import part_of
from snapshotters.layerview import LAYER_ONLY, layer_mounts, mark_layer_only
from tests import test_unpack
from tests.confine import confined
from tests.test_unpack import APP, BASE, OTHER, Env, chain_of, files_in

env = test_unpack.env  # the fixture: a root with one snapshotter, overlayfs or native

NAME = "example.local/partial/app:1"
LAYERS = [BASE, APP, OTHER]


async def test_upto_stacks_the_first_layers(env: Env) -> None:
    target = await env.add(NAME, LAYERS)
    await env.unpack(target)
    chain = chain_of(LAYERS)
    for n in (1, 2, 3):
        mounts = snapshot_on(env.state.content, env.sn, target, f"v{n}", readonly=True, upto=n)
        assert env.sn.stat(f"v{n}").parent == chain[n - 1]
        want = {k: v for layer in LAYERS[:n] for k, v in layer.items()}
        assert files_in(mounts) == want


@pytest.mark.parametrize("upto", [0, 4, -1])
async def test_upto_out_of_range_is_refused_and_makes_nothing(env: Env, upto: int) -> None:
    target = await env.add(NAME, LAYERS)
    await env.unpack(target)
    before = env.names()
    with pytest.raises(InvalidArgument) as e:
        snapshot_on(env.state.content, env.sn, target, "v", upto=upto, name=NAME)
    assert str(e.value) == f"layer {upto} out of range: {NAME} has 3 layers"
    assert env.names() == before


async def test_ensure_rootfs_upto_unpacks_and_stacks(env: Env) -> None:
    await env.add(NAME, LAYERS)
    ref = reference.parse(NAME)
    mounts = await trio.to_thread.run_sync(
        lambda: ensure_rootfs(env.state, ref, "rw", snapshotter=env.name, upto=2)
    )
    assert env.sn.stat("rw").parent == chain_of(LAYERS)[1]
    assert len(mounts) == 1


async def test_layer_mounts_bind_one_layer_read_only(env: Env, tmp_path: Path) -> None:
    target = await env.add(NAME, LAYERS)
    await env.unpack(target)
    snapshot_on(env.state.content, env.sn, target, "alone", readonly=True, upto=2)
    if not isinstance(env.sn, LayerDirs):  # native: one whole tree per snapshot
        with pytest.raises(FailedPrecondition, match="--layer needs the overlayfs or fuse"):
            layer_mounts(env.sn, "alone")
        return
    (bind,) = layer_mounts(env.sn, "alone")
    assert bind == Mount(
        "bind", str(env.sn.upper_dir(chain_of(LAYERS)[1])), options=("ro", "rbind")
    )
    assert files_in([bind]) == APP  # the layer's own files only

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (overlay,) = layer_mounts(env.sn, "alone", scratch)
    assert overlay.type == "overlay"
    assert overlay.options[:3] == (
        f"lowerdir={bind.source}",
        f"upperdir={scratch / 'fs'}",
        f"workdir={scratch / 'work'}",
    )
    assert (scratch / "fs").is_dir() and (scratch / "work").is_dir()

    mark_layer_only(env.sn, "alone")
    assert env.sn.stat("alone").labels[LAYER_ONLY] == "true"


async def test_layer_mounts_need_a_parent(env: Env) -> None:
    env.sn.prepare("bare")
    with pytest.raises(FailedPrecondition, match="stands on no layer"):
        layer_mounts(env.sn, "bare")


def test_part_of() -> None:
    assert part_of(None, None) is None
    assert part_of(3, None) == (3, True)
    assert part_of(None, 3) == (3, False)
    with pytest.raises(click.UsageError, match="exclude each other"):
        part_of(1, 2)


def test_shell_spec_runs_the_command_as_root_with_a_terminal_only_if_asked(
    tmp_path: Path,
) -> None:
    config = ImageConfig(
        "amd64",
        "linux",
        (),
        entrypoint=("/entry",),
        cmd=("serve",),
        user="app",
        env=("A=1",),
        working_dir="/srv",
    )
    spec = shell_cmds._spec(config, tmp_path, ("cat", "/f"), tty=False)
    process = spec["process"]
    assert process["args"] == ["cat", "/f"]  # no entrypoint around it
    assert process["user"] == {"uid": 0, "gid": 0}  # "app" need not exist at that layer
    assert process["terminal"] is False and not any(e.startswith("TERM=") for e in process["env"])
    assert "A=1" in process["env"] and process["cwd"] == "/srv"
    process = shell_cmds._spec(config, tmp_path, ("sh",), tty=True)["process"]
    assert process["terminal"] is True and any(e.startswith("TERM=") for e in process["env"])


def test_shell_lock_tells_a_live_shell_from_a_leftover(tmp_path: Path) -> None:
    assert shell_cmds._lock(tmp_path) is None  # no lock file yet: a shell starting
    held = shell_cmds._lock(tmp_path, create=True)
    assert held is not None
    assert shell_cmds._lock(tmp_path) is None  # a live shell holds it
    os.close(held)  # its ckfs ended, however
    again = shell_cmds._lock(tmp_path)
    assert again is not None  # a leftover: the next shell may remove it
    os.close(again)


def _layer_lacks(bundle: Path, program: str) -> str | None:
    """`shell_cmds._check_layer_has` on *bundle* running *program*: its error, or None."""
    process = {"args": [program], "cwd": "/", "env": ["PATH=/usr/bin:/bin"]}
    (bundle / "config.json").write_text(json.dumps({"process": process}))
    try:
        shell_cmds._check_layer_has(bundle, "example.local/x:1", 5)
    except NotFound as e:
        return str(e)
    return None


def test_shell_at_a_layer_without_the_program_says_try_upto(tmp_path: Path) -> None:
    """``ckfs shell --layer 5`` on a layer lacking the program: one line naming
    ``--upto 5``. Links resolve inside the rootfs, never onto the host (where
    /etc/passwd exists): checked confined, as the links are hostile."""
    bundle = tmp_path / "bundle"
    root = bundle / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "bin/busybox").write_bytes(b"")
    links = {
        "bin/sh": "busybox",
        "usr/bin/env": "/bin/busybox",
        "bin/abs": "/bin/sh",
        "bin/escape": "/etc/passwd",
        "bin/up": "../../../../../../../../etc/passwd",
        "bin/loop": "loop",
    }
    for path, target in links.items():
        (root / path).symlink_to(target)

    def lacks(program: str) -> str | None:
        return confined(tmp_path, _layer_lacks, bundle, program)

    for found in ("/bin/sh", "sh", "env", "/bin/abs", "bin/busybox", "/usr/../bin/sh"):
        assert lacks(found) is None, found
    line = "layer 5 of example.local/x:1 alone has no {!r}: try --upto 5 (layers 1..5)"
    for missing in ("/bin/escape", "/bin/up", "/bin/loop", "passwd", "bash", "/bin", "/bin/sh/x"):
        assert lacks(missing) == line.format(missing), missing
