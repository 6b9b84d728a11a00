"""`ckfs snapshots`, shaped like `ctr snapshots`, driven as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import snapshotters
from integration.conftest import BOTH_FACES, Ckfs

pytestmark = BOTH_FACES


@pytest.mark.parametrize("snapshotter", snapshotters.NAMES)
def test_prepare_commit_view_usage_tree_rm(ckfs: Ckfs, snapshotter: str) -> None:
    s = ["snapshots", "--snapshotter", snapshotter]
    mounts = json.loads(ckfs.run(*s, "prepare", "--json", "base-work").stdout)
    assert [m["type"] for m in mounts] == ["bind"]
    (Path(mounts[0]["source"]) / "hello").write_text("hi\n")
    ckfs.run(*s, "commit", "base", "base-work")
    ckfs.run(*s, "prepare", "top-work", "base")
    ckfs.run(*s, "commit", "top", "top-work")
    view = json.loads(ckfs.run(*s, "view", "--json", "v", "top").stdout)
    assert view == json.loads(ckfs.run(*s, "mounts", "--json", "v").stdout)

    listed = {i["name"]: i for i in json.loads(ckfs.run(*s, "ls", "--json").stdout)}
    assert {n: (i["kind"], i["parent"]) for n, i in listed.items()} == {
        "base": ("committed", ""),
        "top": ("committed", "base"),
        "v": ("view", "top"),
    }
    assert json.loads(ckfs.run(*s, "info", "top").stdout)["parent"] == "base"
    usage = {u["key"]: u for u in json.loads(ckfs.run(*s, "usage", "--json").stdout)}
    assert usage["base"]["size"] >= 3 and usage["base"]["inodes"] >= 2
    assert ckfs.run(*s, "tree").stdout.split() == [
        "base",
        "\\_",
        "top",
        "(committed)",
        "\\_",
        "v",
        "(view)",
    ]
    assert ckfs.run(*s, "ls", "kind==view").stdout.count("\n") == 2

    # A parent with children cannot go; the rest of the list still does.
    proc = ckfs.run(*s, "rm", "top", "v", check=False)
    assert proc.returncode == 1 and proc.stdout.split() == ["v"]
    assert "top" in proc.stderr and proc.stderr.count("\n") == 1
    ckfs.run(*s, "rm", "top", "base")
    assert json.loads(ckfs.run(*s, "ls", "--json").stdout) == []


def test_unknown_snapshotter_is_one_line(ckfs: Ckfs) -> None:
    assert "snapshotter" in ckfs.fails("snapshots", "--snapshotter", "zfs", "ls")
