"""``ckfs mount`` tells "every layer is lazy" from its Mount records alone."""

from __future__ import annotations

from pathlib import Path

from ckfs.mount import Mount
from ckfs_cli.rootfs_cmds import _all_attached


def _overlay(*lowers: Path) -> list[Mount]:
    lowerdir = ":".join(map(str, lowers))
    return [Mount("overlay", "overlay", options=("index=off", f"lowerdir={lowerdir}"))]


def test_only_links_into_the_fuse_tree_count_as_attached(tmp_path: Path) -> None:
    served = tmp_path / "fuse" / "layer"
    served.mkdir(parents=True)
    links = []
    for i in range(2):
        (tmp_path / f"s{i}").symlink_to(served)
        links.append(tmp_path / f"s{i}")
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    assert _all_attached(_overlay(*links))
    assert not _all_attached(_overlay(links[0], unpacked))  # an eager layer: said
    assert not _all_attached([Mount("bind", str(links[0]), options=("rbind", "ro"))])
    escaped = tmp_path / "a:b"
    escaped.symlink_to(served)
    assert not _all_attached(_overlay(Path(str(escaped).replace(":", "\\:"))))
