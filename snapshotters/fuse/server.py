"""The FUSE serving process of one state root.

    python -m snapshotters.fuse.server --root R [--detach] [--cache-max BYTES]

Mounts ``<root>/fuse/mnt`` read-only with every indexed layer as a top-level
directory and the merged views under ``merged/`` (`snapshotters.fuse.tree`),
and serves it until SIGTERM or SIGINT, when it unmounts and exits. It holds
``<root>/fuse/server.lock`` for its whole life and writes its PID next to it
(`snapshotters.fuse.process` documents the files); it logs to
``<root>/fuse/server.log``. ``--detach`` forks into a new session first, so
the process that started it can exit without taking it down. The chunk
cache's files are bounded by ``--cache-max`` bytes, by default
`ckfs.layerindex.cache.DISK_SHARE` of its filesystem (least recently used
chunks are evicted, and fetched again when read).

Mount options: ``allow_other`` (containers running as other users must reach
the files), ``default_permissions`` (the kernel enforces the image's modes,
so they read what the modes allow and nothing more), ``ro``, and ``suid``
and ``dev`` (libfuse mounts ``nosuid,nodev`` otherwise): a ``--merged``
rootfs is a bind of a directory in this mount and must run the image's
setuid binaries and use its device nodes as an overlay rootfs does. Never
``max_read``: pyfuse3 3.5 fails the mount with it. The process never touches
its own mountpoint from the event loop: a stat there would wait on itself.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

import pyfuse3
import trio

from ckfs.digest import Digest
from ckfs.layerindex.cache import DISK_SHARE, ChunkCache
from ckfs.layerindex.readers import Readers
from ckfs.layerindex.store import IndexStore
from ckfs.locks import try_lock
from ckfs.state import State
from snapshotters.fuse.ops import Ops
from snapshotters.fuse.process import ServerPaths, clean_mount
from snapshotters.fuse.tree import Tree

__all__ = ["OPTIONS", "main"]

log = logging.getLogger("snapshotters.fuse.server")

#: Seconds between writes of the layers' read counters (for ``ckfs mounts
#: ls``) while they change: often enough for a person watching, rare enough
#: to cost nothing.
STATS_INTERVAL = 2.0

#: The mount's read-ahead in KiB (its bdi's ``read_ahead_kb``, which FUSE
#: starts at 128): the kernel turns a sequential reader's reads into read-ahead
#: requests of up to this size, split at the connection's largest request
#: (libfuse negotiates 1 MiB). With several 1 MiB requests in flight instead
#: of one 128 KiB request at a time, the server's work overlaps the reader's
#: and the next chunk's fetch starts early: 256 MiB read 1.2 to 1.3x faster
#: from the chunk cache, 1.3 to 1.8x cold, here. 16 MiB gained nothing more.
READ_AHEAD_KB = 4096

#: Modules a remote layer's first read needs (`ckfs.layerindex.readers`
#: makes its registry client then): imported while the server starts, in a
#: worker thread, they cost that read nothing (0.2 s of a 1.3 to 1.6 s
#: mount-to-first-read here), for about 8 MiB of memory.
PRELOAD = ("ckfs.remotes.registry", "ckfs.remotes.auth", "ckfs.remotes.hosts")

#: Mount options (module docstring); fsname and subtype name the mount in
#: /proc/self/mountinfo as ``ckfs`` of type ``fuse.ckfs``.
OPTIONS = frozenset(
    {"fsname=ckfs", "subtype=ckfs", "allow_other", "default_permissions", "ro", "suid", "dev"}
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapshotters.fuse.server")
    parser.add_argument("--root", required=True, type=Path, help="the ckfs state root")
    parser.add_argument("--detach", action="store_true", help="fork into a new session first")
    parser.add_argument(
        "--cache-max", type=int, metavar="BYTES", help="bound on the chunk cache's files"
    )
    args = parser.parse_args(argv)
    paths = ServerPaths(args.root.absolute())
    for d in (paths.dir, paths.mnt, paths.views):
        d.mkdir(parents=True, exist_ok=True)
    if args.detach:
        _detach()
    # Until the loop listens for it, SIGTERM still unmounts on its way out.
    signal.signal(signal.SIGTERM, _exit)
    lock = try_lock(paths.lock)
    if lock is None:
        print(f"ckfs fuse server: {paths.root} is served by another process", file=sys.stderr)
        return 1
    try:
        _log_to(paths.log)
        _write_pid(paths.pid)
        clean_mount(paths)
        _serve(paths, args.cache_max)
        # Only a clean exit removes the PID: a failed one leaves it, which
        # tells a waiting starter that the server came and went.
        paths.pid.unlink(missing_ok=True)
        return 0
    except Exception:
        log.exception("fuse server for %s failed", paths.root)
        return 1
    finally:
        os.close(lock)


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(f"{signal.Signals(signum).name} while starting")


def _detach() -> None:
    """Fork; the parent exits, the child starts a new session.

    The starter's child exits at once, so the server is re-parented to init,
    which reaps it whenever it dies.
    """
    if os.fork() > 0:
        os._exit(0)
    os.setsid()


def _log_to(path: Path) -> None:
    logging.basicConfig(
        filename=path,
        level=logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )


def _write_pid(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _serve(paths: ServerPaths, cache_max: int | None) -> None:
    tree = Tree(IndexStore(paths.root), paths.views, paths.chains)
    cache = ChunkCache(State(paths.root).cache_dir, max_bytes=cache_max, disk_share=DISK_SHARE)
    readers = Readers(paths.root, cache=cache)
    ops = Ops(tree, readers)
    pyfuse3.init(ops, str(paths.mnt), set(OPTIONS))
    log.info("serving %s", paths.mnt)
    try:
        trio.run(_run, paths, readers, ops, cache)
    finally:
        log.info("requests served: %s", dict(ops.requests.most_common()))
        # Unmount even after a crash of the loop: a mount without its server
        # answers ENOTCONN to everyone until someone detaches it.
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", paths.mnt)


async def _raise_read_ahead(mnt: Path, initialized: trio.Event) -> None:
    """Set the mount's bdi read-ahead to `READ_AHEAD_KB` (the kernel's
    128 KiB default makes sequential reads cost one request per 128 KiB).

    Only after the kernel's INIT is answered: its reply can only lower the
    value (to what the kernel offered, 128 KiB). Before the loop reads the
    next request, so before anything is opened here: a file takes its
    read-ahead size from the bdi when it is opened. The bdi is named by the
    mount's device number from /proc/self/mountinfo: a stat of the
    mountpoint would wait on this very loop. Failing (no sysfs, not root)
    costs speed only: logged.
    """
    await initialized.wait()
    try:
        device = _device_of(Path(os.path.realpath(mnt.parent), mnt.name))
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{READ_AHEAD_KB}\n")
    except (OSError, LookupError) as e:
        log.warning("%s: read-ahead left at the kernel's default: %s", mnt, e)
    else:
        log.info("%s: read-ahead %d KiB (bdi %s)", mnt, READ_AHEAD_KB, device)


async def _preload() -> None:
    """Import `PRELOAD` off the loop; a read needing them meanwhile waits
    for the import under way (Python's module locks), not a second one."""
    for name in PRELOAD:
        await trio.to_thread.run_sync(importlib.import_module, name, abandon_on_cancel=True)


async def _count(cache: ChunkCache) -> None:
    """Count the chunk cache's files now, not in the first fetch's write."""
    await trio.to_thread.run_sync(cache.count, abandon_on_cancel=True)
    log.info("chunk cache %s: %s bytes at most", cache.root, cache.max_bytes)


def _device_of(mnt: Path) -> str:
    """``major:minor`` of the last mount on *mnt* (mountinfo's third field).

    Raises:
        LookupError: nothing is mounted there.
    """
    # The kernel writes space, tab, newline and backslash as \ooo.
    where = "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in str(mnt))
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    found = [f[2] for f in (line.split(" ") for line in lines) if len(f) > 4 and f[4] == where]
    if not found:
        raise LookupError(f"{mnt} is not in /proc/self/mountinfo")
    return found[-1]


async def _run(paths: ServerPaths, readers: Readers, ops: Ops, cache: ChunkCache) -> None:
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_raise_read_ahead, paths.mnt, ops.initialized)
            nursery.start_soon(_preload)
            nursery.start_soon(_count, cache)
            nursery.start_soon(_stop_on_signal)
            nursery.start_soon(_keep_stats, paths, readers)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await readers.aclose()
            await trio.to_thread.run_sync(_write_stats, paths.stats, readers.statistics())


async def _keep_stats(paths: ServerPaths, readers: Readers) -> None:
    """Write the layers' read counters to `ServerPaths.stats` when they change."""
    written: object = None
    while True:
        await trio.sleep(STATS_INTERVAL)
        now = readers.statistics()
        if now != written:
            await trio.to_thread.run_sync(_write_stats, paths.stats, now)
            written = now


def _write_stats(path: Path, layers: dict[Digest, dict[str, int]]) -> None:
    """``{"layers": {digest: {"fetched", "hits", "misses", ...}}}``, atomically."""
    doc = {
        "layers": {
            str(digest): {"fetched": c.get("fetched_bytes", 0), **c} for digest, c in layers.items()
        }
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc, sort_keys=True))
    os.replace(tmp, path)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: stopping", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


if __name__ == "__main__":
    sys.exit(main())
