"""One bad record never breaks the store: listing, inspecting, gc and rm.

A store holds a good image next to records a hostile registry or a
corrupted disk can leave: a config or manifest nested 100,000 deep, a target
that is missing, a target whose media type lies. ``images ls`` lists them
all (the bad ones with their error, exit 0), ``images inspect`` of a bad one
exits 1 with one line, ``gc`` reports each record it cannot follow and still
collects the rest (exit 1). ``rm`` of several names removes the good ones
and exits 1 if any failed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ckfs.content import ContentStore
from ckfs.descriptor import Descriptor
from ckfs.digest import Digest, from_bytes
from ckfs.images.store import Image
from ckfs.state import State
from ckfs_cli.main import main
from tests.layouts import OCI_CONFIG, OCI_MANIFEST, Layout

GOOD = "example.local/good:1"
DEEP_CONFIG = "example.local/deep-config:1"
DEEP_MANIFEST = "example.local/deep-manifest:1"
MISSING = "example.local/missing:1"
WRONG_TYPE = "example.local/wrong-type:1"
BAD = [DEEP_CONFIG, DEEP_MANIFEST, MISSING, WRONG_TYPE]

#: Nested far past what Python's parser survives (RecursionError before
#: jsondoc's limit).
DEEP = b"[" * 100_000 + b"]" * 100_000

#: Longest line the CLI prints for an error (safetext.MAX_MESSAGE plus a prefix).
MAX_LINE = 1200


def run(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["--root", str(root), *args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def put(content: ContentStore, data: bytes) -> Descriptor:
    digest = from_bytes(data)
    with content.writer(f"test-{digest}", total=len(data), expected=digest) as w:
        w.write(data)
        w.commit(len(data), digest)
    return Descriptor(OCI_MANIFEST, digest, len(data))


def manifest_of(config: Descriptor) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": str(config.digest), "size": config.size},
            "layers": [],
        }
    ).encode()


@pytest.fixture
def root(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Path:
    """A store with one good image (imported, GC-labelled) and four bad records."""
    layout = Layout(tmp_path / "layout")
    layout.image([{"etc/hello": b"hello\n"}])
    root = tmp_path / "root"
    assert run(capsys, root, "import", "--name", GOOD, str(layout.root))[0] == 0
    state = State(root)
    try:
        content, images = state.content, state.images
        config = put(content, DEEP)
        images.create(Image.new(DEEP_CONFIG, put(content, manifest_of(config))))
        deep = b'{"schemaVersion":2,"mediaType":"%s","layers":%s}' % (OCI_MANIFEST.encode(), DEEP)
        images.create(Image.new(DEEP_MANIFEST, put(content, deep)))
        images.create(Image.new(MISSING, Descriptor(OCI_MANIFEST, from_bytes(b"gone"), 4)))
        good = images.get(GOOD).target
        images.create(Image.new(WRONG_TYPE, dataclasses.replace(good, media_type=OCI_CONFIG)))
    finally:
        state.close()
    return root


def blobs(root: Path) -> set[Digest]:
    state = State(root)
    try:
        return {i.digest for i in state.content.walk()}
    finally:
        state.close()


def lines(err: str) -> list[str]:
    found = err.splitlines()
    assert all(len(line) < MAX_LINE and line.startswith("ckfs: ") for line in found), found
    return found


def gc_errors(err: str) -> list[str]:
    """gc's error lines (its summary goes to stderr too)."""
    return lines(
        "".join(
            f"{line}\n"
            for line in err.splitlines()
            if "would" not in line and "removed" not in line
        )
    )


def test_images_ls_lists_every_record_the_bad_ones_with_their_error(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    code, out, err = run(capsys, root, "images", "ls")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert sorted(rows) == sorted([GOOD, *BAD])
    assert "linux/amd64" in rows[GOOD] and "(" not in rows[GOOD]
    assert "(incomplete)" in rows[MISSING]
    assert all("(error)" in rows[n] for n in (DEEP_CONFIG, DEEP_MANIFEST, WRONG_TYPE))
    reported = {line.split()[2].rstrip(":"): line for line in lines(err)}
    assert sorted(reported) == sorted(BAD)
    assert "nested deeper" in reported[DEEP_CONFIG] and "nested deeper" in reported[DEEP_MANIFEST]

    code, out, _ = run(capsys, root, "images", "ls", "--json")
    assert code == 0
    listed = {i["name"]: i for i in json.loads(out)}
    assert "error" not in listed[GOOD] and listed[GOOD]["size"] > 0
    assert listed[GOOD]["platforms"] == ["linux/amd64"]
    assert all(listed[n]["error"] and listed[n]["size"] is None for n in BAD)

    assert run(capsys, root, "images", "ls", "-q")[:2] == (
        0,
        "".join(f"{n}\n" for n in sorted(rows)),
    )


@pytest.mark.parametrize("name", BAD)
def test_images_inspect_of_a_bad_record_shows_it_and_exits_1(
    capsys: pytest.CaptureFixture[str], root: Path, name: str
) -> None:
    code, out, err = run(capsys, root, "images", "inspect", "--json", name)
    assert code == 1
    shown = json.loads(out)
    assert shown["name"] == name and shown["error"]
    assert lines(err) == [f"ckfs: {shown['error']}"]
    code, out, err = run(capsys, root, "images", "inspect", name)
    assert code == 1 and out.startswith("name:") and len(lines(err)) == 1


def test_images_inspect_of_the_good_one_still_works(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    code, out, err = run(capsys, root, "images", "inspect", "--json", GOOD)
    assert (code, err) == (0, "")
    assert json.loads(out)["platform"] == "linux/amd64"


def test_gc_reports_each_record_it_cannot_follow_and_collects_the_rest(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    state = State(root)
    try:
        orphan = put(state.content, b"nobody refers to me").digest
    finally:
        state.close()
    before = blobs(root)

    code, out, err = run(capsys, root, "gc", "--dry-run")
    assert code == 1 and f"would remove blob {orphan}" in out
    reported = gc_errors(err)
    assert blobs(root) == before

    code, out, err = run(capsys, root, "gc", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["blobs"] == [str(orphan)]
    assert gc_errors(err) == reported == [f"ckfs: gc: {e}" for e in report["errors"]]
    # The deep manifest is unreadable; the lying target is reported but kept
    # with what its body names. Configs are not gc's to parse.
    assert len(reported) == 2
    assert any(DEEP_MANIFEST in e and "nested deeper" in e for e in reported)
    assert any(WRONG_TYPE in e and "media type" in e for e in reported)
    assert blobs(root) == before - {orphan}
    assert run(capsys, root, "content", "verify")[0] == 0

    # Once the bad records are gone, gc is clean again.
    assert run(capsys, root, "images", "rm", *BAD)[0] == 0
    code, _, err = run(capsys, root, "gc")
    assert (code, err.count("ckfs: gc:")) == (0, 0)
    assert run(capsys, root, "images", "inspect", GOOD)[0] == 0


def test_gc_follows_manifests_whose_blobs_carry_no_gc_labels(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    """Images imported before GC labels existed: the parsed manifest is the truth."""
    assert run(capsys, root, "images", "rm", *BAD)[0] == 0
    assert run(capsys, root, "gc")[0] == 0
    state = State(root)
    try:
        for info in list(state.content.walk()):
            state.content.update(dataclasses.replace(info, labels={}), ["labels"])
        assert all(not i.labels for i in state.content.walk())
    finally:
        state.close()
    before = blobs(root)
    assert len(before) == 3  # manifest, config, layer

    code, out, _ = run(capsys, root, "gc", "--json")
    assert code == 0 and json.loads(out)["blobs"] == []
    assert blobs(root) == before

    assert run(capsys, root, "images", "rm", GOOD)[0] == 0
    code, out, _ = run(capsys, root, "gc", "--json")
    assert code == 0 and len(json.loads(out)["blobs"]) == 3 and blobs(root) == set()


def test_a_partly_failing_images_rm_removes_the_rest_and_exits_1(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    code, out, err = run(capsys, root, "images", "rm", DEEP_CONFIG, "example.local/nope:1", GOOD)
    assert code == 1
    assert out.split() == [DEEP_CONFIG, GOOD]
    [line] = lines(err)
    assert "example.local/nope:1" in line and "not found" in line
    code, out, _ = run(capsys, root, "images", "ls", "-q")
    assert sorted(out.split()) == sorted([DEEP_MANIFEST, MISSING, WRONG_TYPE])


@pytest.mark.parametrize("snapshotter", ["overlayfs", "native"])
def test_a_partly_failing_snapshots_rm_removes_the_rest_and_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, snapshotter: str
) -> None:
    s = ("snapshots", "--snapshotter", snapshotter)
    assert run(capsys, tmp_path, *s, "prepare", "base")[0] == 0
    assert run(capsys, tmp_path, *s, "commit", "base-done", "base")[0] == 0
    assert run(capsys, tmp_path, *s, "prepare", "child", "base-done")[0] == 0
    assert run(capsys, tmp_path, *s, "prepare", "other")[0] == 0

    code, out, err = run(capsys, tmp_path, *s, "rm", "other", "base-done", "nope")
    assert code == 1 and out.split() == ["other"]
    assert len(lines(err)) == 2 and "parent" in err and "nope" in err
    code, out, _ = run(capsys, tmp_path, *s, "ls", "--json")
    assert sorted(i["name"] for i in json.loads(out)) == ["base-done", "child"]
