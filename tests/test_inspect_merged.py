"""`ckfs.inspect.merged`: the stack's rules and provenance, on hand-built indexes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ckfs.digest import Digest
from ckfs.errors import InvalidArgument, NotFound
from ckfs.inspect import LayerInfo, Merged, user_path
from ckfs.inspect.merged import MAX_LINKS, Deletion
from ckfs.layerindex.model import Node
from tests.layerindexes import D, Entry, F, Item, Kind, build


def W(path: str) -> Entry:
    return Entry(path, Kind.WHITEOUT)


def O(path: str) -> Entry:  # noqa: E743 - the opaque marker, as the other one-letter builders
    return Entry(path, Kind.OPAQUE)


def S(path: str, target: str) -> Entry:
    return Entry(path, Kind.SYMLINK, mode=0o777, link=target)


def stack(tmp_path: Path, *layers: Sequence[Item]) -> list[LayerInfo]:
    """LayerInfos numbered from 1 over indexes of *layers* (bottom first)."""
    infos = []
    for n, items in enumerate(layers, 1):
        digest = Digest.parse("sha256:" + f"{n:02x}" * 32)
        index = build(tmp_path / f"{n}.db", items, layer=digest)
        infos.append(LayerInfo(n, None, digest, f"step {n}", "tar", index))  # type: ignore[arg-type]
    return infos


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[list[LayerInfo]]:
    """Five layers exercising every rule (comments: what each layer does)."""
    infos = stack(
        tmp_path,
        # 1: the base
        [
            D("etc"),
            F("etc/motd", 10),
            F("etc/hosts", 3),
            D("opt/app"),
            F("opt/app/old", 5),
            D("var/lib"),
            F("var/lib/x", 1),
            F("gone", 2),
            S("link", "etc/motd"),
            S("abs", "/etc"),
            S("loop", "loop"),
        ],
        # 2: modify motd; whiteout "gone"; make opt/app opaque with a new file
        [F("etc/motd", 20), W("gone"), O("opt/app"), F("opt/app/new", 6)],
        # 3: modify motd again; replace var/lib (a dir) by a file
        [F("etc/motd", 30), F("var/lib", 7)],
        # 4: delete etc/hosts; put back "gone"
        [W("etc/hosts"), F("gone", 4)],
        # 5: nothing but a new dir
        [D("srv")],
    )
    yield infos
    for info in infos:
        info.index.close()


def names(versions: Sequence[object]) -> list[tuple[str, int]]:
    return [(v.path, v.layer) for v in versions]  # type: ignore[attr-defined]


def test_a_file_modified_in_three_layers(layers: list[LayerInfo]) -> None:
    w = Merged(layers).which("etc/motd")
    assert w.provider is not None and (w.provider.layer, w.provider.node.size) == (3, 30)
    assert [(v.layer, v.node.size) for v in w.shadowed] == [(2, 20), (1, 10)]
    assert w.deleted_by is None


def test_whiteout_deletes(layers: list[LayerInfo]) -> None:
    w = Merged(layers).which("etc/hosts")
    assert w.provider is None
    assert w.deleted_by == Deletion(4, "whiteout", "etc/hosts")
    assert names(w.shadowed) == [("etc/hosts", 1)]
    assert Merged(layers).resolve("etc/hosts") is None
    # below layer 4 it is still there
    assert Merged(layers[:3]).resolve("etc/hosts") is not None


def test_put_back_after_a_whiteout_shadows_nothing_deleted(layers: list[LayerInfo]) -> None:
    w = Merged(layers).which("gone")
    assert w.provider is not None and w.provider.layer == 4
    assert w.shadowed == [] and w.deleted_by is None
    assert Merged(layers[:3]).which("gone").deleted_by == Deletion(2, "whiteout", "gone")


def test_opaque_directory(layers: list[LayerInfo]) -> None:
    m = Merged(layers)
    assert names(m.listdir("opt/app")) == [("opt/app/new", 2)]
    w = m.which("opt/app/old")
    assert w.provider is None and w.deleted_by == Deletion(2, "opaque", "opt/app")
    assert m.which("opt/app").provider.layer == 2  # type: ignore[union-attr]


def test_directory_replaced_by_a_file(layers: list[LayerInfo]) -> None:
    m = Merged(layers)
    w = m.which("var/lib/x")
    assert w.provider is None and w.deleted_by == Deletion(3, "replaced-parent", "var/lib")
    lib = m.which("var/lib")
    assert lib.provider is not None and lib.provider.node.kind == Kind.FILE
    assert names(lib.shadowed) == [("var/lib", 1)]
    with pytest.raises(InvalidArgument, match="not a directory"):
        m.listdir("var/lib")
    assert names(Merged(layers[:2]).listdir("var/lib")) == [("var/lib/x", 1)]


def test_never_existed_is_not_a_deletion(layers: list[LayerInfo]) -> None:
    m = Merged(layers)
    assert m.which("nope") == m.which("nope").__class__("nope", None, [], None)
    # below a file: gone by nobody's doing
    assert m.which("etc/motd/x").deleted_by is None
    with pytest.raises(NotFound):
        m.listdir("nope")


def test_listdir_and_walk(layers: list[LayerInfo]) -> None:
    m = Merged(layers)
    assert names(m.listdir("")) == [
        ("abs", 1),
        ("etc", 1),
        ("gone", 4),
        ("link", 1),
        ("loop", 1),
        ("opt", 1),  # implied by layers 1 and 2: where it first appeared
        ("srv", 5),
        ("var", 1),
    ]
    assert names(m.listdir("etc")) == [("etc/motd", 3)]
    assert m.which("etc").provider.layer == 1  # type: ignore[union-attr]  # implied above
    walked = names(m.walk())
    assert walked[:4] == [("abs", 1), ("etc", 1), ("etc/motd", 3), ("gone", 4)]
    assert ("opt/app/old", 1) not in walked and ("opt/app/new", 2) in walked
    assert ("var/lib", 3) in walked and ("var/lib/x", 1) not in walked
    assert walked == names([v for v in _slow_walk(m, "")])


def _slow_walk(m: Merged, path: str) -> Iterator[object]:
    for v in m.listdir(path):
        yield v
        if v.node.kind == Kind.DIR:
            yield from _slow_walk(m, v.path)


def test_follow_stays_in_the_image(layers: list[LayerInfo]) -> None:
    m = Merged(layers)
    assert m.follow("link") == "etc/motd"
    assert m.follow("abs/motd") == "etc/motd"
    assert m.follow("etc/motd") == "etc/motd"
    assert m.follow("nope/x") == "nope/x"
    with pytest.raises(InvalidArgument, match="too many levels"):
        m.follow("loop")
    assert MAX_LINKS == 40


def test_follow_clamps_dotdot_at_the_root(tmp_path: Path) -> None:
    infos = stack(tmp_path, [S("up", "../../../etc"), D("etc"), F("etc/passwd", 1)])
    try:
        assert Merged(infos).follow("up/passwd") == "etc/passwd"
    finally:
        infos[0].index.close()


def test_root(layers: list[LayerInfo]) -> None:
    w = Merged(layers).which("")
    assert w.provider is not None and w.provider.layer == 5
    assert isinstance(w.provider.node, Node) and w.provider.node.kind == Kind.DIR


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("/etc/passwd", "etc/passwd"),
        ("etc/passwd", "etc/passwd"),
        ("./etc//passwd/", "etc/passwd"),
        ("/", ""),
        ("", ""),
        (".", ""),
    ],
)
def test_user_path(text: str, path: str) -> None:
    assert user_path(text) == path


@pytest.mark.parametrize("text", ["../etc", "/etc/../passwd", "a/..", "a\0b"])
def test_user_path_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument):
        user_path(text)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "."])
def test_a_tampered_name_is_one_error(tmp_path: Path, name: str) -> None:
    """A name no tar gives (an index edited by hand) fails listings; never a false path."""
    import sqlite3

    from ckfs.errors import DataLoss
    from ckfs.layerindex.model import LayerIndex

    infos = stack(tmp_path, [D("etc"), F("etc/x", 1)])
    path = infos[0].index.path
    infos[0].index.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE nodes SET name = ? WHERE name = ?", (name.encode(), b"x"))
    index = LayerIndex.open(path)
    try:
        m = Merged([LayerInfo(1, None, infos[0].diff_id, "", "tar", index)])  # type: ignore[arg-type]
        with pytest.raises(DataLoss, match="bad name"):
            m.listdir("etc")
        with pytest.raises(DataLoss, match="bad name"):
            list(m.walk())
    finally:
        index.close()
