"""Per-layer changes, image-to-image diffs and the space report, on hand-built layer indexes.

`Stack` is an image made of indexes written through the real `IndexWriter`
(tests/layerindexes.py); its `read` serves bytes the test gives per (layer,
path) and counts what it was asked, so a test sees when a digest answered
and nothing was read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckfs.descriptor import Descriptor
from ckfs.digest import Digest
from ckfs.errors import DataLoss, InvalidArgument
from ckfs.inspect.changes import Change, diff_images, layer_changes, layer_diff
from ckfs.inspect.image import LayerInfo
from ckfs.inspect.space import Waste, space
from ckfs.layerindex.model import Chunk, Node
from tests.layerindexes import D, Entry, F, Item, Kind, L, build

WH = Kind.WHITEOUT


def _digest(seed: str) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(seed.encode()).hexdigest())


class Stack:
    """An image of hand-built layers (bottom first) with file bytes for `read`."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        layers: list[list[Item]],
        contents: dict[tuple[int, str], bytes] | None = None,
        source: str = "tar",
        info_source: str | None = None,
    ) -> None:
        self.name = name
        self.layers: list[LayerInfo] = []
        for n, items in enumerate(layers, 1):
            blob = _digest(f"{name}/{n}/{items!r}")
            index = build(tmp / f"{name}-{n}.db", items, layer=blob, source=source)
            desc = Descriptor("application/vnd.oci.image.layer.v1.tar", blob, 1)
            self.layers.append(LayerInfo(n, desc, blob, "", info_source or source, index))
        self.contents = contents or {}
        self.reads: list[tuple[int, str]] = []

    def layer(self, n: int) -> LayerInfo:
        if not 1 <= n <= len(self.layers):
            raise InvalidArgument(f"layer {n} out of range: {self.name} has {len(self.layers)}")
        return self.layers[n - 1]

    async def read(self, layer: LayerInfo, node: Node, offset: int = 0, size: int = -1) -> bytes:
        path = layer.index.path_of(node.ino)
        self.reads.append((layer.number, path))
        data = self.contents[(layer.number, path)]
        return data[offset:] if size < 0 else data[offset : offset + size]

    def close(self) -> None:
        for info in self.layers:
            info.index.close()


def _table(changes: list[Change]) -> list[tuple[str, str, tuple[str, ...], int, int | None]]:
    return [(c.kind, c.path, c.fields, c.size, c.layer) for c in changes]


def _base() -> list[Item]:
    return [
        D("etc"),
        F("etc/a", 10),
        F("etc/b", 5),
        D("var/cache"),
        F("var/cache/x", 100),
        F("var/cache/y", 50),
        D("d"),
        F("d/f", 7),
        Entry("link", Kind.SYMLINK, link="etc/a", mode=0o777),
        F("keep", 4, xattrs=(("user.k", b"1"),)),
    ]


Make = Callable[..., Stack]


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[Make]:
    """Makes `Stack` images (name, layers, contents, source; *kind*: a subclass),
    closed when the test ends."""
    made: list[Stack] = []

    def make(*args: Any, kind: type[Stack] = Stack, **kw: Any) -> Stack:
        made.append(kind(tmp_path, *args, **kw))
        return made[-1]

    yield make
    for stack in made:
        stack.close()


@pytest.fixture
def image(stacks: Make) -> Stack:
    return stacks(
        "img",
        [
            _base(),
            [
                F("etc/a", 10),  # same size, no digest: undecided
                F("etc/b", 5, mode=0o600),
                Entry("var/cache", WH),
                F("d", 3),  # a directory replaced by a file
                F("new", 3, uid=7),
                Entry("link", Kind.SYMLINK, link="etc/b", mode=0o777),
                F("keep", 4, xattrs=(("user.k", b"2"),)),
            ],
            [
                D("etc"),
                Entry("etc", Kind.OPAQUE),
                F("etc/a", 20),
                F("etc/c", 1),
                Entry("gone", WH),  # deletes nothing
            ],
        ],
        contents={
            **{(n, "etc/a"): b"0123456789" for n in (1, 2)},
            **{(n, "etc/b"): b"bbbbb" for n in (1, 2)},
            **{(n, "keep"): b"kkkk" for n in (1, 2)},
        },
    )


def test_first_layer_is_all_added(image: Stack) -> None:
    changes = layer_changes(image, 1)
    assert {c.kind for c in changes} == {"added"}
    assert [c.path for c in changes] == [
        "d",
        "d/f",
        "etc",
        "etc/a",
        "etc/b",
        "keep",
        "link",
        "var",
        "var/cache",
        "var/cache/x",
        "var/cache/y",
    ]
    assert {c.path: c.size for c in changes}["var/cache/x"] == 100


def test_layer_changes_from_indexes_alone(image: Stack) -> None:
    assert _table(layer_changes(image, 2)) == [
        ("modified", "d", ("type", "mode"), 3, 2),
        ("deleted", "d/f", (), 7, 2),
        ("modified", "etc/a", (), 10, 2),  # undecided: not read here
        ("modified", "etc/b", ("mode",), 5, 2),
        ("modified", "keep", ("xattrs",), 4, 2),
        ("modified", "link", ("link",), 0, 2),
        ("added", "new", (), 3, 2),
        ("deleted", "var/cache", (), 0, 2),
        ("deleted", "var/cache/x", (), 100, 2),
        ("deleted", "var/cache/y", (), 50, 2),
    ]
    assert image.reads == []


def test_opaque_directory_deletes_what_it_does_not_put_back(image: Stack) -> None:
    assert _table(layer_changes(image, 3)) == [
        ("modified", "etc/a", ("content",), 20, 3),
        ("deleted", "etc/b", (), 5, 3),
        ("added", "etc/c", (), 1, 3),
    ]


@pytest.mark.trio
async def test_layer_diff_reads_only_undecided_files(image: Stack) -> None:
    changes = await layer_diff(image, 2)
    assert ("modified", "etc/a", (), 10, 2) in _table(changes)  # read: same bytes
    # The same sizes with no digest: etc/a, etc/b (mode changed) and keep.
    assert sorted(image.reads) == sorted((n, p) for p in ("etc/a", "etc/b", "keep") for n in (1, 2))
    image.contents[(2, "etc/a")] = b"0123456780"
    image.reads.clear()
    changes = await layer_diff(image, 2)
    assert ("modified", "etc/a", ("content",), 10, 2) in _table(changes)


def test_layer_out_of_range(image: Stack) -> None:
    with pytest.raises(InvalidArgument, match="layer 4 out of range"):
        layer_changes(image, 4)


def test_implied_directory_is_no_change_but_an_opaque_one_deletes(stacks: Make) -> None:
    stack = stacks(
        "implied",
        [
            [D("a", mode=0o700), F("a/old", 2), D("b", mode=0o700), F("b/old", 2)],
            [F("a/new", 1), Entry("b", Kind.OPAQUE), F("b/new", 1)],
        ],
    )
    assert _table(layer_changes(stack, 2)) == [
        ("added", "a/new", (), 1, 2),
        ("added", "b/new", (), 1, 2),
        ("deleted", "b/old", (), 2, 2),
    ]


def test_under_an_opaque_directory_lower_subdirectories_are_hidden(stacks: Make) -> None:
    stack = stacks(
        "deep",
        [
            [F("o/e/g", 2), F("o/h", 1)],
            [D("o"), Entry("o", Kind.OPAQUE), D("o/e"), F("o/e/new", 1)],
        ],
    )
    assert _table(layer_changes(stack, 2)) == [
        ("deleted", "o/e/g", (), 2, 2),
        ("added", "o/e/new", (), 1, 2),
        ("deleted", "o/h", (), 1, 2),
    ]


def _chunked(path: str, digests: list[str]) -> tuple[Entry, list[Chunk]]:
    chunks = [Chunk(4 * i, 4, 100 * i, 0, d) for i, d in enumerate(digests)]
    return F(path, 4 * len(digests)), chunks


@pytest.mark.trio
async def test_diff_images_by_digest_without_reading(stacks: Make) -> None:
    one, two = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    a = stacks(
        "a",
        [[_chunked("same", [one, two]), _chunked("changed", [one, two]), F("only-a", 3)]],
        source="estargz",
    )
    b = stacks(
        "b",
        [
            [_chunked("same", [one, two]), _chunked("changed", [one, one])],
            [F("only-b", 2), Entry("d", Kind.SYMLINK, link="x")],
        ],
        source="estargz",
    )
    assert _table(await diff_images(a, b)) == [
        ("modified", "changed", ("content",), 8, None),
        ("added", "d", (), 0, None),
        ("deleted", "only-a", (), 3, None),
        ("added", "only-b", (), 2, None),
    ]
    assert a.reads == b.reads == []


@pytest.mark.trio
async def test_diff_of_an_image_with_itself_is_empty_and_reads_nothing(image: Stack) -> None:
    assert await diff_images(image, image) == []
    assert image.reads == []


@pytest.mark.trio
async def test_diff_images_reads_equal_size_files_to_decide(stacks: Make) -> None:
    a = stacks("a", [[F("f", 4), F("g", 4)]], {(1, "f"): b"abcd", (1, "g"): b"abcd"})
    b = stacks("b", [[F("f", 4), F("g", 4)]], {(1, "f"): b"abcd", (1, "g"): b"abce"})
    assert _table(await diff_images(a, b)) == [("modified", "g", ("content",), 4, None)]
    assert sorted(a.reads) == sorted(b.reads) == [(1, "f"), (1, "g")]


@pytest.mark.trio
async def test_a_digest_on_one_side_has_only_the_other_read(stacks: Make) -> None:
    """eStargz chunk digests on one side: the other side alone is read and hashed."""
    sha = "sha256:" + hashlib.sha256(b"abcd").hexdigest()
    a = stacks("a", [[_chunked("f", [sha]), _chunked("g", [sha])]], source="estargz")
    b = stacks("b", [[F("f", 4), F("g", 4)]], {(1, "f"): b"abcd", (1, "g"): b"abce"})
    assert _table(await diff_images(a, b)) == [("modified", "g", ("content",), 4, None)]
    assert _table(await diff_images(b, a)) == [("modified", "g", ("content",), 4, None)]
    assert a.reads == []
    assert sorted(b.reads) == [(1, "f"), (1, "f"), (1, "g"), (1, "g")]


def test_change_json_field_names() -> None:
    assert Change("etc/a", "modified", ("content", "mode"), 3, 2).to_json() == {
        "path": "/etc/a",
        "kind": "modified",
        "fields": ["content", "mode"],
        "size": 3,
        "layer": 2,
    }


# -- space ---------------------------------------------------------------------


def test_space_waste_and_dive_efficiency(image: Stack) -> None:
    report = space(image)
    assert report.waste == [
        Waste("var/cache/x", 100, 1, 2, "deleted"),
        Waste("var/cache/y", 50, 1, 2, "deleted"),
        Waste("etc/a", 10, 1, 2, "overwritten"),
        Waste("etc/a", 10, 2, 3, "overwritten"),
        Waste("d/f", 7, 1, 2, "deleted"),
        Waste("etc/b", 5, 1, 2, "overwritten"),
        Waste("etc/b", 5, 2, 3, "deleted"),
        Waste("keep", 4, 1, 2, "overwritten"),
    ]
    assert report.wasted == 191
    # Stored: layer 1: 10+5+100+50+7+4 = 176; layer 2: 10+5+3+3+4 = 25; layer 3: 21.
    assert report.total == 222
    # Smallest version per path: etc/a 10 (of 40), etc/b 0 (of 10), x 0, y 0,
    # d/f 0, keep 4 (of 8); d 3, new 3, etc/c 1 once each.
    assert report.efficiency == pytest.approx((10 + 4 + 3 + 3 + 1) / 222)
    assert [(v.path, v.node.size, v.layer) for v in report.largest] == [
        ("etc/a", 20, 3),
        ("keep", 4, 2),
        ("d", 3, 2),
        ("new", 3, 2),
        ("etc/c", 1, 3),
    ]
    assert [v.path for v in space(image, top=2).largest] == ["etc/a", "keep"]


def test_space_hardlinks_count_once_and_waste_when_all_names_go(stacks: Make) -> None:
    stack = stacks(
        "links",
        [
            [F("a", 10), L("b", "a"), F("c", 6), L("e", "c")],
            [Entry("a", WH), Entry("c", WH), Entry("e", WH)],
        ],
    )
    report = space(stack)
    assert report.total == 16
    assert report.waste == [Waste("e", 6, 1, 2, "deleted")]  # b still holds a's bytes
    assert report.largest[0].path in ("b",)


def test_space_of_a_lean_image_is_fully_efficient(stacks: Make) -> None:
    stack = stacks("lean", [[F("a", 3)], [F("b", 4)], [D("empty")]])
    report = space(stack)
    assert (report.total, report.wasted, report.efficiency, report.waste) == (7, 0, 1.0, [])
    empty = stacks("none", [[D("x")]])
    assert space(empty).efficiency == 1.0


def test_space_json_field_names(image: Stack) -> None:
    doc = space(image).to_json(top=1)
    assert list(doc) == ["total", "wasted", "efficiency", "waste", "largest"]
    assert doc["waste"] == [
        {"path": "/var/cache/x", "size": 100, "layer": 1, "by_layer": 2, "how": "deleted"}
    ]
    assert doc["largest"] == [{"path": "/etc/a", "size": 20, "layer": 3}]


@pytest.mark.trio
async def test_a_failed_read_is_the_error_not_a_group(stacks: Make) -> None:
    class Broken(Stack):
        async def read(
            self, layer: LayerInfo, node: Node, offset: int = 0, size: int = -1
        ) -> bytes:
            raise DataLoss(f"layer {layer.number}: chunk digest mismatch")

    a = stacks("a", [[F("f", 4)]], kind=Broken)
    b = stacks("b", [[F("f", 4)]], kind=Broken)
    with pytest.raises(DataLoss, match="digest mismatch"):
        await diff_images(a, b)
    assert await diff_images(a, b, read=False) == [Change("f", "modified", (), 4, None)]


def test_listing_lower_directories_gives_what_resolving_gives(
    image: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckfs.inspect import changes

    resolved = [layer_changes(image, n) for n in (1, 2, 3)]
    monkeypatch.setattr(changes, "_RESOLVE_MAX", 0)  # list every lower directory
    assert [layer_changes(image, n) for n in (1, 2, 3)] == resolved


@pytest.mark.trio
async def test_eager_layers_are_compared_one_file_after_another_in_path_order(
    stacks: Make,
) -> None:
    names = ["a", "b", "c", "d", "e", "f"]
    layer = [F(n, 2) for n in reversed(names)]
    a = stacks("a", [layer], {(1, n): b"xx" for n in names}, info_source="eager")
    b = stacks("b", [layer], {(1, n): b"xy" for n in names})
    assert [c.path for c in await diff_images(a, b)] == names
    assert a.reads == b.reads == [(1, n) for n in names]


def test_an_opaque_root_hides_every_lower_entry_it_does_not_put_back(stacks: Make) -> None:
    stack = stacks(
        "root",
        [
            [Entry("", Kind.OPAQUE), F("a", 1)],
            [F("a", 2), D("b"), F("b/c", 3)],
            [Entry("", Kind.OPAQUE), D("b")],
        ],
    )
    assert _table(layer_changes(stack, 1)) == [("added", "a", (), 1, 1)]
    assert _table(layer_changes(stack, 3)) == [
        ("deleted", "a", (), 2, 3),
        ("deleted", "b/c", (), 3, 3),
    ]
