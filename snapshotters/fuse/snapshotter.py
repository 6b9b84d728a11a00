"""The lazy snapshotter: overlay snapshots whose lower layers may be FUSE directories.

Everything an overlay snapshotter does, this one does the same way (it is
`snapshotters.overlay.OverlaySnapshotter` under another name and directory,
``<root>/snapshots/fuse``), so a layer that cannot be served lazily is
pulled and unpacked into it as ever and stacks with the lazy ones. What it
adds is `FuseSnapshotter.attach`: a committed snapshot whose content is a
layer directory of the one FUSE mount of this root,
``<root>/fuse/mnt/<algo>-<hex>``, served from the layer's index and fetched
as it is read. Nothing of the layer is copied or unpacked.

An attached snapshot's ``fs`` is a symlink to its layer directory, and its
mounts name the symlink, not the directory:

- the overlay mounts stay exactly overlay's (``lowerdir`` entries
  ``<id>/fs`` once `ckfs.mount` makes them relative), so as many layers fit
  one page of options as with overlay (`max_layers`); the FUSE directory
  names, 71 characters each for sha256, would fit about 55;
- the kernel follows the symlink (overlayfs looks ``lowerdir`` paths up,
  as mount(2) does a bind's source, following links), and so does
  `ckfs.archive.secure.RootDir`, which unpack opens `lower_dirs` with;
- removal unlinks the symlink and never follows it
  (`snapshotters.storage.remove_dir`): the layer directory belongs to the
  serving process and other images may share it;
- the snapshot says which layer it is by itself, in the directory the
  metastore already keeps consistent (`layer`), rather than in a label a
  caller may change.

Merged views (``ckfs mount --merged``) are the serving process's too: a
view is ``<root>/fuse/views/<name>.json`` naming the layers bottom to top,
which it serves, whiteouts applied, as ``<root>/fuse/mnt/merged/<name>``.
`FuseSnapshotter.write_view` writes one for a chain of attached snapshots.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self

from ckfs.digest import Digest
from ckfs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ckfs.labels import SNAPSHOT_REF
from ckfs.metadata.db import DB
from ckfs.mount import Mount
from ckfs.snapshots import Info, Kind
from snapshotters.fuse.process import ServerPaths, ensure_server
from snapshotters.overlay import OverlaySnapshotter

if TYPE_CHECKING:
    from ckfs.snapshots import CleanupError, InitContext
    from snapshotters.fuse.overrides import Lower

__all__ = ["LAYER_DIGEST", "VIEW_NAME", "FuseSnapshotter"]

log = logging.getLogger(__name__)

#: A merged view's name: one path component of the FUSE mount's ``merged/``
#: directory and of a file name, so no separator, no dot first (no ``.``,
#: ``..`` or hidden temporary file), and short enough for any file system.
VIEW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

#: A merged view's file in the views directory: ``<name>.json``.
VIEW_SUFFIX = ".json"

#: Snapshot label the CRI puts on an extract snapshot beside `SNAPSHOT_REF`:
#: the digest of the layer to be committed (stargz-snapshotter's protocol),
#: which names the layer's index and FUSE directory.
LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"

#: Prefix of an attach's short-lived active snapshot, before its commit.
ATTACH_PREFIX = "attach-"

#: Seconds an override record nothing links yet is kept by `FuseSnapshotter.cleanup`:
#: far longer than an attach takes from writing it to committing the snapshot.
RECORD_GRACE = 3600.0


class FuseSnapshotter(OverlaySnapshotter):
    """Overlay snapshots under ``<root>/snapshots/fuse``, layers attachable lazily.

    Args:
        root: the ckfs state root.
        db: its metadata database.
        cache_max: the chunk cache's bound in bytes for a server this
            snapshotter starts (`ensure_server`); None: its share of the disk.
    """

    name = "fuse"

    def __init__(self, root: Path, db: DB, *, cache_max: int | None = None) -> None:
        super().__init__(root, db)
        #: The serving process's files: its mountpoint (one directory per
        #: layer) and the merged views' JSON files among them.
        self.server = ServerPaths(Path(os.path.abspath(root)))
        self.cache_max = cache_max

    @classmethod
    def from_context(cls, context: InitContext) -> Self:
        """The registry's factory; option ``cache_max``: a size (`ckfs.options.parse_size`).

        Raises:
            InvalidArgument: ``cache_max`` is not a size.
        """
        from ckfs.options import parse_size

        text = context.options.get("cache_max")
        try:
            cache_max = None if text is None else parse_size(text)
        except ValueError as e:
            raise InvalidArgument(f"fuse snapshotter cache_max: {e}") from None
        return cls(context.root, context.db, cache_max=cache_max)

    def serve(self) -> None:
        """Make sure this root's FUSE server runs (`ckfs.lazy.Attacher`): adopt or start it.

        Raises:
            Unavailable: it did not come up (the message quotes its log).
        """
        ensure_server(self.server.root, cache_max=self.cache_max)

    def layer_dir(self, layer: str) -> Path:
        """The FUSE directory serving *layer* (a digest).

        Raises:
            InvalidArgument: *layer* is not a digest.
        """
        # Here: the index format's module (sqlite, xxhash, the archive's entry
        # rules) costs ~40 ms to load, which listing or removing snapshots
        # never needs.
        from ckfs.layerindex import dirname

        return self.server.mnt / dirname(Digest.parse(layer))

    def attach(
        self,
        name: str,
        layer: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> Info:
        """Commit *name* on *parent* as the lazily served *layer*, nothing copied.

        The layer's directory must already be served (its index built and
        the serving process running), so a snapshot that exists can be
        mounted. When directories the layer only implies get other
        attributes from the layers of *parent* (`snapshotters.fuse.overrides`),
        the snapshot links a variant directory showing those instead. The
        commit goes the way every commit does, through a short-lived active
        snapshot ``attach-<random> <name>`` (a crash in
        between leaves that behind for gc, as an interrupted unpack leaves
        its extract snapshot); of two racing attaches of one name, one
        commits and the other gets `AlreadyExists` and leaves nothing.

        Args:
            name: the committed snapshot's name, the layer's chain ID.
            layer: the layer's digest (the compressed blob's, which names
                its index and directory).
            parent: the committed snapshot below it, or ``""``.
            labels: kept on the committed snapshot (containerd's
                ``containerd.io/snapshot.ref`` among them).

        Returns:
            The committed snapshot.

        Raises:
            AlreadyExists: *name* is taken.
            NotFound: *parent* does not exist.
            InvalidArgument: *layer* is not a digest, *parent* not committed,
                *name* empty, a label too large.
            FailedPrecondition: the layer's directory is not served.
        """
        if not name:
            raise InvalidArgument("committed snapshot name must not be empty")
        try:
            self.stat(name)
        except NotFound:
            pass
        else:
            raise AlreadyExists(f"snapshot {name!r}: already exists")  # before any work
        digest = Digest.parse(layer)
        lower = self._served(digest)
        if lower is None:
            raise FailedPrecondition(
                f"layer {digest}: not served at {self.layer_dir(digest)} "
                "(no index, or the FUSE server is not running)"
            )
        lower = self._variant(digest, parent) or lower
        key = f"{ATTACH_PREFIX}{secrets.token_hex(8)} {name}"

        def link(path: Path, kind: Kind, parent_ids: tuple[int, ...]) -> None:
            os.symlink(lower, path / "fs")

        self._store.create(Kind.ACTIVE, key, parent, None, link)
        try:
            self._store.commit(name, key, labels)
        except BaseException:
            self._store.remove(key)
            raise
        return self.stat(name)

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """`Snapshotter.prepare`, or `AlreadyExists` once the layer is attached lazily.

        containerd's remote snapshotter protocol: an unpacker prepares each
        layer's extract snapshot with `SNAPSHOT_REF` naming the chain ID it
        will commit, and the CRI adds the layer's digest (`LAYER_DIGEST`).
        When that layer is served, it is attached under the chain ID (the
        labels kept) and the prepare answers AlreadyExists, so the unpacker
        neither downloads nor applies it (`ckfs.unpack.provided` checks the
        chain ID is committed). Without both labels, or for a layer not
        served, this is overlay's prepare.

        Raises:
            AlreadyExists: *key* is taken, or the layer is now attached.
            FailedPrecondition: the FUSE mount answers with an error.
            (and what overlay's prepare raises)
        """
        lazy = self._lazy_layer(labels, parent)
        if lazy is None:
            return super().prepare(key, parent, labels)
        name, layer = lazy
        # Attached by an earlier prepare: present all the same.
        with contextlib.suppress(AlreadyExists):
            self.attach(name, layer, parent, labels)
        raise AlreadyExists(f"snapshot {name!r}: already exists (layer {layer}, lazily)")

    def layer(self, key: str) -> Digest | None:
        """The layer *key* was attached as, or None for a snapshot of its own files.

        Raises:
            NotFound: no such snapshot.
        """
        fs = self._fs(self._store.snapshot(key).id)
        try:
            target = os.readlink(fs)
        except OSError:  # EINVAL: a directory, the usual snapshot
            return None
        from snapshotters.fuse.overrides import split_name  # as ckfs.layerindex in layer_dir

        return split_name(os.path.basename(target))[0]

    def attached_layers(self) -> set[Digest]:
        """Every layer a snapshot directory here links: what gc must keep indexed.

        Read from the directories, not the rows, so a directory a crash left
        without its row counts too until `cleanup` removes it: keeping an
        index a little long is harmless, dropping one a mount still reads
        is not.
        """
        from snapshotters.fuse.overrides import split_name  # as ckfs.layerindex in layer_dir

        return {split_name(name)[0] for name in self._linked()}

    def _linked(self) -> set[str]:
        """The names of the FUSE directories the snapshot directories here link."""
        names: set[str] = set()
        for entry in os.listdir(self._store.root):
            try:
                target = os.readlink(self._store.root / entry / "fs")
            except OSError:
                continue  # a snapshot of its own files
            names.add(os.path.basename(target))
        return names

    def chain_layers(self, parent: str) -> list[Digest]:
        """The layers of *parent* and its ancestors, bottom first: a merged view's list.

        Raises:
            NotFound: no such snapshot.
            FailedPrecondition: a snapshot in the chain is not attached
                (its files are on this disk, not in the FUSE tree).
        """
        layers: list[Digest] = []
        key = parent
        while key:
            layer = self.layer(key)
            if layer is None:
                raise FailedPrecondition(
                    f"snapshot {key!r}: not a lazily attached layer; a merged view "
                    f"needs every layer of {parent!r} attached"
                )
            layers.append(layer)
            key = self.stat(key).parent
        return layers[::-1]

    def write_view(self, name: str, layers: Sequence[str]) -> Path:
        """Publish *layers* (bottom first) as merged view *name*; where it is served.

        The JSON file is replaced atomically, so the serving process reads
        either the old list or the new one. The returned directory appears
        once the serving process picks the file up.

        Raises:
            InvalidArgument: a bad view name or layer digest, or no layers.
        """
        path = self._view_file(name)
        if not layers:
            raise InvalidArgument(f"merged view {name!r}: no layers")
        body = json.dumps({"layers": [Digest.parse(d) for d in layers]}, indent=1) + "\n"
        self.server.views.mkdir(parents=True, exist_ok=True)
        # Durable like the mount records that name it, so a view a reboot
        # interrupts is still there to serve when the mount is recovered.
        from ckfs.content.fsutil import replace_file
        from snapshotters.fuse.tree import MERGED  # as ckfs.layerindex in layer_dir

        replace_file(path, body.encode())
        return self.server.mnt / MERGED / name

    def remove_view(self, name: str) -> None:
        """Withdraw merged view *name*.

        Raises:
            InvalidArgument: a bad view name.
            NotFound: no such view.
        """
        try:
            os.unlink(self._view_file(name))
        except FileNotFoundError:
            raise NotFound(f"merged view {name!r}: not found") from None

    def views(self) -> list[str]:
        """The names of the merged views written, sorted."""
        try:
            names = os.listdir(self.server.views)
        except FileNotFoundError:
            return []
        stems = (n.removesuffix(VIEW_SUFFIX) for n in names if n.endswith(VIEW_SUFFIX))
        return sorted(s for s in stems if VIEW_NAME.fullmatch(s))

    def cleanup(self, on_error: CleanupError | None = None) -> list[str]:
        """`Cleaner.cleanup`, and the override records no snapshot links any more.

        A record written in the last `RECORD_GRACE` seconds stays: an
        attach writes it before it creates the snapshot that links it.
        """
        removed = super().cleanup(on_error)
        from snapshotters.fuse.overrides import record_path  # as ckfs.layerindex in layer_dir

        linked = {record_path(self.server.chains, n).name for n in self._linked()}
        try:
            records = os.listdir(self.server.chains)
        except FileNotFoundError:
            return removed
        young = time.time() - RECORD_GRACE
        for name in sorted(set(records) - linked):
            path = self.server.chains / name
            try:
                if path.lstat().st_mtime > young:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as e:
                if on_error is None:
                    log.warning("cleanup: cannot remove %s: %s", path, e)
                else:
                    on_error(path, e)
                continue
            removed.append(str(path))
        return removed

    # -- helpers ---------------------------------------------------------------

    def _variant(self, layer: Digest, parent: str) -> Path | None:
        """The variant directory *layer* is to be read through on *parent*, if any.

        None when every implied directory of the layer keeps the defaults
        on that chain: the shared directory is right.

        Raises:
            FailedPrecondition: the variant is not served (the FUSE mount
                answers with an error).
        """
        from ckfs.layerindex.store import IndexStore
        from snapshotters.fuse import overrides

        if not parent:
            return None
        index = IndexStore(self.server.root).get(layer)
        if index is None:
            return None  # served, so indexed: a race with gc at worst
        with contextlib.ExitStack() as stack:
            stack.callback(index.close)
            paths = overrides.implied_paths(index)
            if not paths:
                return None
            dirs = overrides.resolve(paths, self._lowers(parent, stack))
        if not dirs:
            return None
        record = overrides.Record(layer, dirs)
        overrides.write_record(self.server.chains, record)
        path = self.server.mnt / record.name
        try:
            if path.is_dir():
                return path
        except OSError as e:
            raise FailedPrecondition(f"layer {layer}: {path}: {e.strerror}") from e
        raise FailedPrecondition(f"layer {layer}: variant {path} is not served")

    def _lowers(self, parent: str, stack: contextlib.ExitStack) -> list[Lower]:
        """The layers of *parent* and its ancestors, top first, to resolve against.

        An attached layer without an index (removed under it) ends the
        list: what it hid is unknown, so the defaults stay.
        """
        from ckfs.layerindex.store import IndexStore
        from snapshotters.fuse import overrides

        store = IndexStore(self.server.root)
        lowers: list[Lower] = []
        key = parent
        while key:
            fs = self._fs(self._store.snapshot(key).id)
            try:
                name = os.path.basename(os.readlink(fs))
            except OSError:
                lowers.append(overrides.DirLower(fs))  # unpacked: its own files
            else:
                digest, variant = overrides.split_name(name)
                index = store.get(digest)
                if index is None:
                    log.warning("snapshot %r: layer %s has no index", key, digest)
                    break
                stack.callback(index.close)
                record = overrides.read_record(self.server.chains, name) if variant else None
                lowers.append(overrides.IndexLower(index, record))
            key = self.stat(key).parent
        return lowers

    def _served(self, layer: Digest) -> Path | None:
        """*layer*'s FUSE directory if it is one now, else None.

        Raises:
            FailedPrecondition: the mount answers with an error (ENOTCONN:
                the serving process died and must be recovered).
        """
        path = self.layer_dir(layer)
        try:
            return path if path.is_dir() else None
        except OSError as e:
            raise FailedPrecondition(f"layer {layer}: {path}: {e.strerror}") from e

    def _lazy_layer(
        self, labels: Mapping[str, str] | None, parent: str
    ) -> tuple[str, Digest] | None:
        """The chain ID and served layer an extract snapshot's labels name, if any.

        The layer is the CRI's `LAYER_DIGEST` label, or, without it (containerd's
        unpacker elsewhere labels the chain ID only), the layer an indexed image
        recorded for that chain ID on the same parent (`ckfs.lazy.chain_layer`).
        """
        name, layer = (labels or {}).get(SNAPSHOT_REF), (labels or {}).get(LAYER_DIGEST)
        if not name:
            return None
        if not layer:
            from ckfs.lazy import chain_layer  # only on this path: it loads trio

            known = chain_layer(self.server.root, name)
            if known is None or known[1] != parent:
                return None
            layer = str(known[0])
        try:
            digest = Digest.parse(layer)
        except InvalidArgument:
            return None  # no layer ckfs could serve: an ordinary prepare
        self._serve_indexed(digest)
        return (name, digest) if self._served(digest) else None

    def _serve_indexed(self, layer: Digest) -> None:
        """Start the FUSE server if *layer* has an index but nothing serves it yet.

        ``ckfs pull --lazy`` indexes an image without starting the server;
        containerd's first prepare of one of its layers does. A server that
        cannot start leaves the prepare an ordinary one (logged).
        """
        from ckfs.errors import Unavailable
        from ckfs.layerindex.store import IndexStore

        # A dead server's mount raises here (FailedPrecondition), as ever:
        # recovering it is `ckfs mounts recover`'s, which remounts its overlays too.
        if self._served(layer) or not IndexStore(self.server.root).path(layer).is_file():
            return
        try:
            self.serve()
        except Unavailable as e:
            log.warning("layer %s: not attached lazily, the FUSE server fails: %s", layer, e)

    def _view_file(self, name: str) -> Path:
        if not VIEW_NAME.fullmatch(name):
            raise InvalidArgument(
                f"merged view name {name!r}: letters, digits, '_', '.', '-' only, "
                "not starting with '.', '_' or '-', at most 128"
            )
        return self.server.views / f"{name}{VIEW_SUFFIX}"
