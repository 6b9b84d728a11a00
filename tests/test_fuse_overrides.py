"""Implied directories of lazy layers show what the layers below give them.

`snapshotters.fuse.overrides` resolves them down a chain (indexes and
unpacked directories), the FUSE tree serves a layer's variant with the
resolved attributes, and the fuse snapshotter's attach links the variant
only when a chain needs one. Real indexes (`IndexWriter`), no FUSE; where
the serving process would serve a directory, a plain one stands in (as in
``tests/test_snapshotters_fuse.py``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ckfs import errors
from ckfs.archive.entry import Entry, Kind
from ckfs.digest import Digest
from ckfs.layerindex.model import FIRST_FINO, LayerIndex
from ckfs.layerindex.store import IndexStore, dirname
from snapshotters.fuse.overrides import (
    IMPLIED,
    DirAttrs,
    DirLower,
    IndexLower,
    Lower,
    Probe,
    Record,
    implied_paths,
    join_name,
    read_record,
    record_path,
    resolve,
    salted_ino,
    split_name,
    write_record,
)
from snapshotters.fuse.snapshotter import RECORD_GRACE, FuseSnapshotter
from snapshotters.fuse.tree import ROOT_INO, Tree
from tests.suites.snapshotter import commit_with
from tests.test_fuse_tree import MTIME, d, f, layer, listing, walk, write_view
from tests.test_snapshotters_fuse import sn as sn_fixture
from tests.test_snapshotters_fuse import state as state_fixture

#: The fuse snapshotter on a fresh state root (`tests.test_snapshotters_fuse`'s fixtures).
state, sn = state_fixture, sn_fixture

#: What the lower layers give ``etc``: none of it the defaults.
ETC = DirAttrs(0o750, 5, 6, MTIME, (("user.dir", b"etc"),))


def etc_entry(path: str = "etc") -> Entry:
    return d(path, mode=ETC.mode, uid=ETC.uid, gid=ETC.gid, xattrs=ETC.xattrs)


@pytest.fixture
def store(tmp_path: Path) -> IndexStore:
    return IndexStore(tmp_path / "root")


@pytest.fixture
def opened(store: IndexStore) -> Iterator[list[LayerIndex]]:
    """Indexes a test opens, closed after it."""
    held: list[LayerIndex] = []
    yield held
    for index in held:
        index.close()


def lowers(store: IndexStore, held: list[LayerIndex], *layers: Digest) -> list[Lower]:
    found: list[Lower] = []
    for digest in layers:
        index = store.get(digest)
        assert index is not None
        held.append(index)
        found.append(IndexLower(index))
    return found


def paths_of(store: IndexStore, held: list[LayerIndex], digest: Digest) -> list[str]:
    index = store.get(digest)
    assert index is not None
    held.append(index)
    return implied_paths(index)


def test_the_first_lower_holding_the_directory_gives_its_attributes(
    store: IndexStore, opened: list[LayerIndex]
) -> None:
    bottom = layer(store, "bottom", [etc_entry(), d("usr", mode=0o700), d("usr/lib")])
    middle = layer(store, "middle", [f("srv/x")])  # no etc or usr: the bottom decides
    top = layer(store, "top", [f("etc/passwd"), f("usr/lib/libc.so"), d("usr", mode=0o711)])
    paths = paths_of(store, opened, top)
    assert paths == ["etc", "usr/lib"]
    found = resolve(paths, lowers(store, opened, middle, bottom))
    # usr/lib's lower is 0755 0:0 mtime MTIME: differs from the defaults by its mtime only.
    assert found == {"etc": ETC, "usr/lib": DirAttrs(0o755, 0, 0, MTIME)}
    # Nothing below: the defaults, no record needed.
    assert resolve(paths, []) == {}


@pytest.mark.parametrize(
    "hiding",
    [
        [Entry("etc", Kind.WHITEOUT)],
        [f("etc")],
        [Entry("etc", Kind.SYMLINK, link="/srv")],
        [d("etc"), Entry("etc", Kind.OPAQUE)],  # its own attributes: the defaults but mtime
    ],
    ids=["whiteout", "file", "symlink", "opaque-self"],
)
def test_what_hides_the_lower_directory_ends_the_search(
    store: IndexStore, opened: list[LayerIndex], hiding: list[Entry]
) -> None:
    bottom = layer(store, "bottom", [etc_entry(), d("etc/sub", mode=0o700)])
    middle = layer(store, "middle", hiding)
    top = layer(store, "top", [f("etc/sub/x")])
    found = resolve(paths_of(store, opened, top), lowers(store, opened, middle, bottom))
    if hiding[0].kind == Kind.DIR:
        # An opaque etc still is the directory etc/sub's search goes through:
        # it has no sub, and being opaque hides the bottom's.
        assert found == {"etc": DirAttrs(0o755, 0, 0, MTIME)}
    else:
        assert found == {}


def test_an_implied_lower_gives_what_its_own_record_says(
    store: IndexStore, opened: list[LayerIndex]
) -> None:
    middle = layer(store, "middle", [f("etc/hosts")])
    top = layer(store, "top", [f("etc/passwd")])
    index = store.get(middle)
    assert index is not None
    opened.append(index)
    record = Record(middle, {"etc": ETC})
    paths = paths_of(store, opened, top)
    assert resolve(paths, [IndexLower(index, record)]) == {"etc": ETC}
    # A middle layer attached with the defaults (no record) gives them.
    assert IndexLower(index).probe("etc") == IMPLIED
    assert resolve(paths, [IndexLower(index), *lowers(store, opened, middle)]) == {}


def test_implied_directories_under_this_layers_opaque_ones_keep_the_defaults(
    store: IndexStore, opened: list[LayerIndex]
) -> None:
    top = layer(
        store,
        "top",
        [
            Entry("etc", Kind.WHITEOUT),
            f("etc/passwd"),  # etc: implied, opaque (it replaced the whiteout)
            d("usr"),
            Entry("usr", Kind.OPAQUE),
            f("usr/lib/x"),  # usr/lib: implied below an opaque directory
            f("var/lib/y"),
        ],
    )
    assert paths_of(store, opened, top) == ["var", "var/lib"]


def test_an_unpacked_lower_is_read_from_its_files(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    (fs / "etc").mkdir(parents=True)
    os.chmod(fs / "etc", ETC.mode)
    os.setxattr(fs / "etc", "user.dir", b"etc")
    os.utime(fs / "etc", ns=(MTIME, MTIME))
    (fs / "file").write_text("x")
    os.symlink("etc", fs / "link")
    lower = DirLower(fs)
    st = os.stat(fs / "etc")
    assert lower.probe("etc") == DirAttrs(ETC.mode, st.st_uid, st.st_gid, MTIME, ETC.xattrs)
    assert lower.probe("etc/missing") is Probe.ABSENT
    assert lower.probe("missing/below") is Probe.ABSENT
    assert lower.probe("file") is Probe.HIDDEN
    assert lower.probe("file/below") is Probe.HIDDEN
    # Never through a link: the link hides what is below it.
    assert lower.probe("link") is Probe.HIDDEN
    assert lower.probe("link/x") is Probe.HIDDEN
    assert DirLower(tmp_path / "gone").probe("etc") is Probe.HIDDEN


@pytest.mark.root
def test_an_unpacked_lowers_whiteouts_and_opaque_directories_hide(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    (fs / "usr").mkdir(parents=True)
    os.mknod(fs / "etc", stat.S_IFCHR, os.makedev(0, 0))
    os.setxattr(fs / "usr", "trusted.overlay.opaque", b"y")
    os.setxattr(fs / "usr", "trusted.overlay.origin", b"kept out")
    lower = DirLower(fs)
    assert lower.probe("etc") is Probe.HIDDEN
    assert lower.probe("usr/lib") is Probe.HIDDEN
    usr = lower.probe("usr")
    assert isinstance(usr, DirAttrs) and usr.xattrs == ()


def test_records_round_trip_under_their_content_key(tmp_path: Path) -> None:
    digest = layer(IndexStore(tmp_path / "root"), "top", [f("etc/passwd")])
    record = Record(digest, {"etc": ETC, "": DirAttrs(0o700, mtime_ns=-5)})
    assert record.name == f"{dirname(digest)}.{record.key}" and len(record.key) == 32
    assert ":" not in record.name and "," not in record.name
    assert split_name(record.name) == (digest, record.key)
    assert split_name(dirname(digest)) == (digest, None) == split_name(join_name(digest, None))
    for bad in (f"{dirname(digest)}.", f"{dirname(digest)}.xyz", f"{dirname(digest)}.{'A' * 32}"):
        with pytest.raises(errors.InvalidArgument):
            split_name(bad)
    chains = tmp_path / "chains"
    path = write_record(chains, record)
    assert path == record_path(chains, record.name)
    assert read_record(chains, record.name) == record
    assert Record(digest, {"": record.dirs[""], "etc": ETC}).key == record.key  # canonical
    assert read_record(chains, f"{dirname(digest)}.{'0' * 32}") is None
    # A file under another variant's name, or not a record at all, is refused.
    other = record_path(chains, f"{dirname(digest)}.{'0' * 32}")
    other.write_bytes(path.read_bytes())
    path.write_text('{"layer": "sha256:00", "dirs": {}}')
    for name in (other.name[: -len(".json")], record.name):
        with pytest.raises(errors.InvalidArgument):
            read_record(chains, name)


def test_salted_inode_numbers_are_stable_and_apart() -> None:
    fino = FIRST_FINO + 12345
    a, b = salted_ino(fino, "a" * 32), salted_ino(fino, "b" * 32)
    assert a == salted_ino(fino, "a" * 32)
    assert len({a, b, fino}) == 3
    assert all(FIRST_FINO <= i < 1 << 63 for i in (a, b))


# -- the tree ---------------------------------------------------------------------


def two_layers(store: IndexStore) -> tuple[Digest, Digest]:
    bottom = layer(store, "bottom", [etc_entry(), f("etc/hosts")])
    top = layer(store, "top", [f("etc/passwd", mode=0o600), d("srv")])
    return bottom, top


def test_a_variant_is_the_layer_with_its_records_attributes(
    store: IndexStore, tmp_path: Path
) -> None:
    _, top = two_layers(store)
    chains = tmp_path / "chains"
    record = Record(top, {"etc": ETC, "srv": ETC, "nowhere": ETC})  # only etc is implied
    write_record(chains, record)
    tree = Tree(store, tmp_path / "views", chains)
    assert record.name in [n for _, n in listing(tree, ROOT_INO)]

    shared_etc = walk(tree, f"{dirname(top)}/etc")
    etc = walk(tree, f"{record.name}/etc")
    assert (shared_etc.attr.mode, shared_etc.attr.mtime_ns) == (stat.S_IFDIR | 0o755, 0)
    assert tree.xattrs(shared_etc.ino) == {}
    assert etc.attr.mode == stat.S_IFDIR | ETC.mode
    assert (etc.attr.uid, etc.attr.gid, etc.attr.mtime_ns) == (ETC.uid, ETC.gid, ETC.mtime_ns)
    assert tree.xattrs(etc.ino) == dict(ETC.xattrs)
    assert tree.xattr(etc.ino, "user.dir") == b"etc"
    srv = walk(tree, f"{record.name}/srv")  # explicit: the record cannot change it
    assert (srv.attr.mode, srv.attr.mtime_ns) == (stat.S_IFDIR | 0o755, MTIME)

    # Every inode of the variant has its own number, stable, the same by
    # lookup and by listing; the files' attributes are the layer's.
    passwd, shared_passwd = walk(tree, "passwd", etc.ino), walk(tree, "passwd", shared_etc.ino)
    assert etc.ino != shared_etc.ino and passwd.ino != shared_passwd.ino
    assert passwd.attr.mode == shared_passwd.attr.mode == stat.S_IFREG | 0o600
    entries = {e.name: e.inode.ino for _, e in tree.opendir(etc.ino).entries(0)}
    assert entries == {"passwd": passwd.ino}
    again = Tree(store, tmp_path / "views", chains)
    assert walk(again, f"{record.name}/etc/passwd").ino == passwd.ino


def test_variants_without_a_good_record_are_not_served(store: IndexStore, tmp_path: Path) -> None:
    _, top = two_layers(store)
    chains = tmp_path / "chains"
    record = Record(top, {"etc": ETC})
    tree = Tree(store, tmp_path / "views", chains)
    with pytest.raises(errors.NotFound):
        tree.lookup(ROOT_INO, record.name)  # no record (yet)
    chains.mkdir()
    record_path(chains, record.name).write_text("{broken")
    with pytest.raises(errors.NotFound):
        tree.lookup(ROOT_INO, record.name)
    with pytest.raises(errors.NotFound):
        Tree(store, tmp_path / "views").lookup(ROOT_INO, record.name)  # no chains directory


def test_a_merged_views_implied_directory_shows_the_one_below(
    store: IndexStore, tmp_path: Path
) -> None:
    bottom, top = two_layers(store)
    views = tmp_path / "views"
    views.mkdir()
    write_view(views, "img", [bottom, top])
    tree = Tree(store, views)
    etc = walk(tree, "merged/img/etc")
    assert etc.attr.mode == stat.S_IFDIR | ETC.mode and etc.attr.mtime_ns == MTIME
    assert tree.xattrs(etc.ino) == dict(ETC.xattrs)
    assert sorted(e.name for _, e in tree.opendir(etc.ino).entries(0)) == ["hosts", "passwd"]


# -- the snapshotter's attach -------------------------------------------------------


def serve(sn: FuseSnapshotter, name: str) -> Path:
    """A plain directory where the serving process would serve *name*."""
    path = sn.server.mnt / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def linked(sn: FuseSnapshotter, name: str) -> str:
    return os.path.basename(os.readlink(sn._fs(sn._store.snapshot(name).id)))


def attach_chain(sn: FuseSnapshotter, layers: Sequence[Digest]) -> None:
    parent = ""
    for i, digest in enumerate(layers):
        serve(sn, dirname(digest))
        sn.attach(f"chain-{i}", digest, parent)
        parent = f"chain-{i}"


def test_attach_links_a_variant_only_where_the_chain_needs_one(sn: FuseSnapshotter) -> None:
    store = IndexStore(sn.server.root)
    bottom, top = two_layers(store)
    attach_chain(sn, [bottom])
    variant = Record(top, {"etc": ETC}).name
    serve(sn, variant)
    serve(sn, dirname(top))
    sn.attach("on-bottom", top, "chain-0")
    assert linked(sn, "on-bottom") == variant
    assert read_record(sn.server.chains, variant) == Record(top, {"etc": ETC})
    assert sn.layer("on-bottom") == top
    assert sn.attached_layers() == {bottom, top}
    # Alone, or on a layer deleting etc: the shared directory.
    sn.attach("alone", top)
    assert linked(sn, "alone") == dirname(top)
    gone = layer(store, "gone", [Entry("etc", Kind.WHITEOUT)])
    serve(sn, dirname(gone))
    sn.attach("deleted", gone, "chain-0")
    sn.attach("on-deleted", top, "deleted")
    assert linked(sn, "on-deleted") == dirname(top)
    # A variant the server does not show cannot be linked.
    sn.attach("again", bottom)
    os.rmdir(sn.server.mnt / variant)
    with pytest.raises(errors.FailedPrecondition, match="is not served"):
        sn.attach("on-again", top, "again")


def test_attach_resolves_through_attached_variants_and_unpacked_layers(
    sn: FuseSnapshotter,
) -> None:
    store = IndexStore(sn.server.root)
    bottom, top = two_layers(store)
    middle = layer(store, "middle", [f("etc/motd")])  # implies etc too
    attach_chain(sn, [bottom])
    serve(sn, dirname(middle))
    serve(sn, Record(middle, {"etc": ETC}).name)
    sn.attach("middle", middle, "chain-0")
    assert linked(sn, "middle") == Record(middle, {"etc": ETC}).name
    serve(sn, dirname(top))
    serve(sn, Record(top, {"etc": ETC}).name)
    sn.attach("top", top, "middle")
    assert linked(sn, "top") == Record(top, {"etc": ETC}).name

    commit_with(sn, "unpacked", files={"etc/issue": "hello"})
    fs = sn._fs(sn._store.snapshot("unpacked").id)
    os.chmod(fs / "etc", 0o711)
    os.utime(fs / "etc", ns=(MTIME, MTIME))
    st = os.stat(fs / "etc")
    expected = Record(top, {"etc": DirAttrs(0o711, st.st_uid, st.st_gid, MTIME)})
    serve(sn, expected.name)
    sn.attach("on-unpacked", top, "unpacked")
    assert linked(sn, "on-unpacked") == expected.name


def test_cleanup_removes_the_records_nothing_links(sn: FuseSnapshotter) -> None:
    store = IndexStore(sn.server.root)
    bottom, top = two_layers(store)
    attach_chain(sn, [bottom])
    serve(sn, dirname(top))
    used = Record(top, {"etc": ETC})
    serve(sn, used.name)
    sn.attach("on-bottom", top, "chain-0")
    stale = write_record(sn.server.chains, Record(top, {"etc": IMPLIED}))
    young = write_record(sn.server.chains, Record(top, {"etc": DirAttrs(0o700)}))
    old = os.stat(stale).st_mtime - RECORD_GRACE - 60
    for path in (stale, record_path(sn.server.chains, used.name)):
        os.utime(path, (old, old))
    assert sn.cleanup() == [str(stale)]
    assert sorted(p.name for p in sn.server.chains.iterdir()) == sorted(
        [record_path(sn.server.chains, used.name).name, young.name]
    )
    # Once its snapshot goes, the used one goes too.
    sn.remove("on-bottom")
    assert str(record_path(sn.server.chains, used.name)) in sn.cleanup()
