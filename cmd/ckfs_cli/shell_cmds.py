"""``ckfs shell``: a throwaway container at any layer of an image.

runc runs a ckfs bundle (`ckfs_cli.rootfs_cmds.make_bundle`) made in a
private directory under the root, ``<root>/shells/<random>``: its rootfs is a
writable snapshot of the image's stack or of its first N layers, or one
layer alone under a scratch upper directory in the bundle
(`snapshotters.layerview`), and runc keeps its state in that directory too
(``runc --root``), so none of it outlives the command. At exit, also when
the container fails or the command is interrupted, the container is
deleted, the rootfs unmounted, its snapshot (with everything written
into it) removed and the directory with it. A shell killed outright (SIGKILL)
cannot: the next ``ckfs shell`` on the root removes what it left (`_reap`).

An interrupt (SIGINT, SIGTERM, SIGHUP) is passed to runc, which passes it to
the container; one that does not end within `STOP_GRACE` is killed. With a
terminal on stdin the container gets a terminal of its own (Ctrl-C then
reaches the shell inside as a key, not ckfs as a signal).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ckfs_cli.app import App
from ckfs_cli.options import pass_app, registry_options, snapshotter_option_defaulting
from ckfs_cli.rootfs_cmds import Part, make_bundle, part_of, part_options

if TYPE_CHECKING:
    from types import FrameType

    from ckfs.images.config import ImageConfig

__all__ = ["shell_cmd"]

#: What runs when no COMMAND is given.
DEFAULT_SHELL = ("/bin/sh",)

#: Under the state root: one directory per running ``ckfs shell``.
SHELLS_DIR = "shells"

#: In each shell's directory: locked while its ``ckfs shell`` lives (`_lock`).
LOCK = "lock"

#: Seconds a container has to end after an interrupt before it is killed.
#: A container's PID 1 ignores SIGINT and SIGTERM unless it handles them
#: (sh, cat and sleep do not), so an interrupt alone may never end it.
STOP_GRACE = 3.0

#: Seconds between looks at whether an interrupted container has ended.
POLL = 0.2

#: Signals passed on to the container rather than ending ckfs on the spot.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@click.command("shell")
@snapshotter_option_defaulting("fuse")
@part_options
@registry_options
@click.argument("ref")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_app
def shell_cmd(
    app: App,
    /,
    snapshotter: str,
    layer: int | None,
    upto: int | None,
    ref: str,
    command: tuple[str, ...],
    **opts: Any,
) -> None:
    """Run a shell, or COMMAND, in a throwaway container of REF at any layer.

    The container (runc) runs on a writable snapshot of the image, of its
    layers 1..N with --upto N, or of layer N alone with --layer N (its
    whiteouts then hide themselves, as in any overlay; a layer without
    COMMAND is one line suggesting --upto N). Whatever it writes
    is discarded at exit. It runs as root with the
    image's environment; the image's entrypoint and user are left out (a
    lower layer may not have that user yet). With the fuse snapshotter (the
    default) the layers are attached lazily: only what the container reads
    is fetched. The exit status is COMMAND's; a terminal is given to the
    container when stdin is one. Needs root and runc.

    \b
    Examples:
      ckfs shell docker.io/library/alpine
      ckfs shell docker.io/library/alpine --upto 3 -- cat /etc/os-release
      ckfs shell docker.io/library/alpine -- sh -c 'echo $PATH'

    Options may follow REF: give COMMAND after "--" when it has options of its own.
    """
    import shutil
    import tempfile

    from ckfs.errors import FailedPrecondition

    part = part_of(layer, upto)
    if shutil.which("runc") is None:
        raise FailedPrecondition("ckfs shell needs runc on PATH")
    shells = app.state.root / SHELLS_DIR
    shells.mkdir(parents=True, exist_ok=True)
    bundle = Path(tempfile.mkdtemp(dir=shells))
    lock = _lock(bundle, create=True)
    assert lock is not None  # a new directory: nobody else holds it
    try:
        _reap(app, shells, bundle)
        status = _shell(app, ref, bundle, snapshotter, part, command or DEFAULT_SHELL, opts)
    finally:
        _remove_bundle(bundle)
        os.close(lock)
    raise SystemExit(status)  # click's own Exit would be status 0 here (main runs it unstandalone)


def _shell(
    app: App,
    ref: str,
    bundle: Path,
    snapshotter: str,
    part: Part,
    argv: tuple[str, ...],
    flags: dict[str, Any],
) -> int:
    """Make the bundle, run it, undo it; the container's exit status."""
    from ckfs.mount import mount_key
    from ckfs_cli.rootfs_cmds import undo_mount

    tty = sys.stdin.isatty()

    def spec(config: ImageConfig, rootfs: Path) -> dict[str, Any]:
        return _spec(config, rootfs, argv, tty=tty)

    rootfs = bundle / "rootfs"
    scratch = bundle / "scratch"
    scratch.mkdir()
    make_bundle(app, ref, bundle, snapshotter, flags, spec, part=part, scratch=scratch)
    container = _Container(bundle)
    with _forwarding(container):
        try:
            if part is not None and part[1]:
                _check_layer_has(bundle, ref, part[0])
            return container.run()
        finally:
            container.delete()
            undo_mount(app, snapshotter, rootfs, mount_key(rootfs))


def _spec(config: ImageConfig, rootfs: Path, argv: tuple[str, ...], *, tty: bool) -> dict[str, Any]:
    """The bundle's ``config.json``: *argv* as root, with a terminal if *tty*."""
    import dataclasses

    from ckfs.runtime_spec import build_spec

    # The entrypoint would wrap the shell; the user may not exist yet at a
    # lower layer (runc makes a missing working directory).
    bare = dataclasses.replace(config, entrypoint=None, cmd=None, user="")
    spec = build_spec(bare, rootfs=rootfs, args=argv, hostname="ckfs-shell")
    process = spec["process"]
    process["terminal"] = tty
    if tty and not any(e.startswith("TERM=") for e in process["env"]):
        process["env"].append(f"TERM={os.environ.get('TERM') or 'xterm'}")
    return spec


def _check_layer_has(bundle: Path, ref: str, number: int) -> None:
    """Fail in one line, with the way out, when layer *number* alone (the
    bundle's rootfs) lacks the program the bundle runs: runc's own error
    would be a log line about exec, not about the layers.

    Raises:
        NotFound: the program (a path, or a name looked up in the
            container's PATH as runc does) is no file of the layer.
    """
    from ckfs.errors import NotFound
    from ckfs.safetext import printable

    process = json.loads((bundle / "config.json").read_text())["process"]
    program = process["args"][0]
    if "/" in program:
        candidates = [program if program.startswith("/") else f"{process['cwd']}/{program}"]
    else:
        path = next((e[5:] for e in process["env"] if e.startswith("PATH=")), "")
        candidates = [f"{d}/{program}" for d in path.split(":") if d.startswith("/")]
    if not any(_is_file_in(bundle / "rootfs", c) for c in candidates):
        raise NotFound(
            f"layer {number} of {ref} alone has no {printable(program)!r}: "
            f"try --upto {number} (layers 1..{number})"
        )


def _is_file_in(root: Path, path: str) -> bool:
    """Whether *path*, its symlinks resolved inside *root* (never onto the host:
    `ckfs.inspect.merged.follow_links`), is a regular file under *root*."""
    from ckfs.errors import InvalidArgument
    from ckfs.inspect.merged import follow_links

    def look(at: str) -> tuple[bool, str | None]:
        try:
            mode = os.lstat(root / at).st_mode
            return True, os.readlink(root / at) if stat.S_ISLNK(mode) else None
        except OSError:
            return False, None

    try:
        return stat.S_ISREG(os.lstat(root / follow_links(path.lstrip("/"), look)).st_mode)
    except (OSError, InvalidArgument):  # a loop of links: runc would fail too
        return False


class _Container:
    """The bundle's one container, runc's state kept in the bundle (``runc --root``)."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self.id = f"ckfs-shell-{bundle.name}"
        self.proc: subprocess.Popen[bytes] | None = None
        #: When the first interrupt not yet acted on arrived (`time.monotonic`).
        self.interrupted: float | None = None

    def run(self) -> int:
        """``runc run`` on this terminal; its exit status (the container's)."""
        self.proc = subprocess.Popen(self._runc("run", "--bundle", str(self.bundle), self.id))
        while True:
            try:
                status = self.proc.wait(timeout=POLL)
            except subprocess.TimeoutExpired:
                self._kill_if_overdue()
                continue
            return status if status >= 0 else 128 - status  # -N: runc died of signal N

    def forward(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: pass *signum* to runc (which passes it to the container)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
            if self.interrupted is None:
                self.interrupted = time.monotonic()

    def delete(self) -> None:
        """Remove the container if runc left it (it removes it itself when it ends)."""
        if (self.bundle / "runc" / self.id).exists():
            self._quiet("delete", "--force", self.id)

    def _kill_if_overdue(self) -> None:
        if self.interrupted is not None and time.monotonic() - self.interrupted > STOP_GRACE:
            self.interrupted = None  # the next interrupt gives it another grace
            self._quiet("kill", self.id, "KILL")

    def _quiet(self, *args: str) -> None:
        subprocess.run(
            self._runc(*args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )

    def _runc(self, *args: str) -> list[str]:
        return ["runc", "--root", str(self.bundle / "runc"), *args]


@contextlib.contextmanager
def _forwarding(container: _Container) -> Iterator[None]:
    """Pass interrupts to *container* instead of ending here, until the cleanup is done."""
    previous = {s: signal.signal(s, container.forward) for s in FORWARDED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _lock(bundle: Path, *, create: bool = False) -> int | None:
    """*bundle*'s `LOCK` file, open and locked; None while a live shell holds it.

    Also None when it has none (yet: a shell makes it right after its
    directory). The lock is the open file's and is never inherited (runc
    gets no copy), so it goes with the ``ckfs shell`` holding it, however
    that process ends.
    """
    from ckfs.locks import try_lock

    return try_lock(bundle / LOCK, create=create)


def _reap(app: App, shells: Path, own: Path) -> None:
    """Remove what shells that ended without cleaning up (killed outright) left in *shells*.

    A bundle whose lock nobody holds is such a leftover: its container is
    deleted (runc outlives a killed ckfs), its rootfs unmounted and its
    snapshot removed as ``ckfs umount`` does, then the directory. A
    leftover that will not go is one line on stderr; this shell goes on.
    """
    from ckfs.errors import CkfsError
    from ckfs.safetext import message
    from ckfs_cli.rootfs_cmds import unmount_target

    for bundle in sorted(shells.iterdir()):
        if bundle == own or (fd := _lock(bundle)) is None:
            continue
        try:
            _Container(bundle).delete()
            unmount_target(app, bundle / "rootfs")
            _remove_bundle(bundle)
        except (CkfsError, OSError) as e:
            click.echo(f"ckfs: shell leftovers in {bundle}: {message(str(e))}", err=True)
        finally:
            os.close(fd)


def _remove_bundle(bundle: Path) -> None:
    """Remove *bundle*, unless its rootfs is still mounted (then say so and keep it)."""
    import shutil

    from ckfs.mount import is_mountpoint

    rootfs = bundle / "rootfs"
    if is_mountpoint(rootfs):  # never descend into a mounted image
        click.echo(f"ckfs: {rootfs} is still mounted; run `ckfs umount {rootfs}`", err=True)
        return
    shutil.rmtree(bundle, ignore_errors=True)
