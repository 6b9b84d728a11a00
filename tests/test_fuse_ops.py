"""The pyfuse3 shell (`snapshotters.fuse.ops`), called directly: no mount.

What a handler answers (attributes, errnos) and that nothing but
`pyfuse3.FUSEError` ever leaves one: pyfuse3 would end its main loop on any
other exception and leave a dead mount.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from ckfs.archive.entry import Entry, Kind
from ckfs.errors import Unavailable
from ckfs.layerindex.model import LayerIndex, Node
from ckfs.layerindex.readers import Reader, Unserved
from ckfs.layerindex.store import IndexStore, dirname
from snapshotters.fuse.ops import ROOT_ATTR_TIMEOUT, TIMEOUT, Ops
from snapshotters.fuse.tree import ROOT_INO, Tree
from tests.test_fuse_tree import MTIME, d, f, layer

CTX: Any = None  # the handlers never look at the request context


class Serving:
    """A reader serving each file as its name repeated."""

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        data = node.name.encode() * (node.size // max(1, len(node.name)) + 1)
        return data[offset : offset + size]


def ops_over(tmp_path: Path, reader: Reader) -> tuple[Ops, str]:
    store = IndexStore(tmp_path / "root")
    digest = layer(
        store,
        "ops",
        [
            d("dir", mode=0o2755, uid=3, gid=4),
            Entry("dir", Kind.OPAQUE),
            f("dir/file", size=10, mode=0o4711),
            Entry("link", Kind.SYMLINK, link="dir/file", mtime_ns=MTIME),
        ],
    )

    def make(index: LayerIndex) -> Reader:
        return reader

    return Ops(Tree(store, tmp_path / "views"), make), dirname(digest)


async def look(ops: Ops, path: str) -> pyfuse3.EntryAttributes:
    ino = ROOT_INO
    for part in path.split("/"):
        attrs = await ops.lookup(ino, os.fsencode(part), CTX)
        ino = attrs.st_ino
    return attrs


async def test_attributes_and_timeouts(tmp_path: Path) -> None:
    ops, top = ops_over(tmp_path, Serving())
    a = await look(ops, f"{top}/dir/file")
    assert (a.st_mode, a.st_size, a.st_blocks, a.st_mtime_ns) == (
        stat.S_IFREG | 0o4711,
        10,
        1,
        MTIME,
    )
    assert a.entry_timeout == a.attr_timeout == TIMEOUT
    assert (await ops.getattr(a.st_ino, CTX)).st_ino == a.st_ino
    root = await ops.getattr(ROOT_INO, CTX)
    assert root.attr_timeout == ROOT_ATTR_TIMEOUT and stat.S_ISDIR(root.st_mode)
    dir_attrs = await look(ops, f"{top}/dir")
    assert (dir_attrs.st_mode, dir_attrs.st_uid, dir_attrs.st_gid) == (stat.S_IFDIR | 0o2755, 3, 4)
    link = await look(ops, f"{top}/link")
    assert await ops.readlink(link.st_ino, CTX) == b"dir/file"
    fi = await ops.open(a.st_ino, os.O_RDONLY, CTX)
    assert fi.keep_cache
    assert await ops.read(fi.fh, 2, 100) == b"lefilefi"
    assert await ops.read(fi.fh, 10, 100) == b""
    await ops.release(fi.fh)


async def test_errnos(tmp_path: Path) -> None:
    ops, top = ops_over(tmp_path, Serving())

    async def fails(code: int, call: Any) -> None:
        with pytest.raises(pyfuse3.FUSEError) as e:
            await call
        assert e.value.errno == code

    await fails(errno.ENOENT, ops.lookup(ROOT_INO, b"nothing", CTX))
    await fails(errno.ENOENT, ops.getattr(123456789, CTX))
    file = await look(ops, f"{top}/dir/file")
    dir_ino = (await look(ops, f"{top}/dir")).st_ino
    await fails(errno.EINVAL, ops.readlink(file.st_ino, CTX))
    await fails(pyfuse3.ENOATTR, ops.getxattr(file.st_ino, b"user.none", CTX))
    assert await ops.getxattr(dir_ino, b"trusted.overlay.opaque", CTX) == b"y"
    assert await ops.listxattr(dir_ino, CTX) == [b"trusted.overlay.opaque"]
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        await fails(errno.EROFS, ops.open(file.st_ino, flags, CTX))
    await fails(errno.EROFS, ops.unlink(dir_ino, b"file", CTX))
    await fails(errno.EROFS, ops.setxattr(file.st_ino, b"user.x", b"1", CTX))
    await fails(errno.EINVAL, ops.opendir(file.st_ino, CTX))
    s = await ops.statfs(CTX)
    assert (s.f_bsize, s.f_namemax, s.f_bavail) == (4096, 255, 0)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RuntimeError("a bug"), "unexpected error"),
        (Unavailable("registry down"), "registry down"),
    ],
)
async def test_a_failing_read_is_eio_and_logged_with_layer_and_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception, message: str
) -> None:
    ops, top = ops_over(tmp_path, Unserved(error))
    file = await look(ops, f"{top}/dir/file")
    fi = await ops.open(file.st_ino, os.O_RDONLY, CTX)
    with caplog.at_level(logging.WARNING), pytest.raises(pyfuse3.FUSEError) as e:
        await ops.read(fi.fh, 0, 10)
    assert e.value.errno == errno.EIO
    digest = top.replace("-", ":", 1)
    assert f"read layer {digest} path /dir/file: {message}" in caplog.text


async def test_a_bug_anywhere_is_eio(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops, top = ops_over(tmp_path, Serving())
    dir_attrs = await look(ops, f"{top}/dir")
    inode = ops.tree.inode(dir_attrs.st_ino)
    assert inode.layer is not None

    def bug(*args: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(inode.layer.index, "lookup", bug)
    with caplog.at_level(logging.WARNING), pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(dir_attrs.st_ino, b"file", CTX)
    assert e.value.errno == errno.EIO
    assert f"lookup layer {top.replace('-', ':', 1)} path /dir: unexpected error" in caplog.text
    # An index closed under the tree fails its queries: EIO too.
    monkeypatch.undo()
    inode.layer.index.close()
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(dir_attrs.st_ino, b"file", CTX)
    assert e.value.errno == errno.EIO
    # forget has no reply: it never raises, whatever happens.
    await ops.forget([(dir_attrs.st_ino, 1), (424242, 3)])
