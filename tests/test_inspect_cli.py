"""``ckfs layers``, ``which``, ``ls`` and ``cat`` on a local image, in process.

The image is integration/inspect_images.py's, imported from an OCI layout
in each local encoding (gzip: gzip seek index; tar: the blob read in
place; zstd: nothing indexes it lazily, so its blob is streamed). Every
encoding must give the golden answers in integration/golden/ (the
integration suite checks the same files for pulled and lazily recorded
images). Bad input: one line, exit 1, nothing changed in the store.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from ckfs_cli.main import main
from integration.inspect_images import TOOL_V1, TOOL_V2, big_content, collect, golden, layout

NAME = "example.local/inspect/{}:latest"

#: The encodings a local import can hold (eStargz needs Go's converter: integration).
LOCAL = ("gzip", "tar", "zstd")


def run(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["--root", str(root), "--no-daemon", *args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def imported(capsys: pytest.CaptureFixture[str], tmp_path: Path, variant: str) -> tuple[Path, str]:
    root = tmp_path / "root"
    source = layout(tmp_path / variant, variant)
    code, _, err = run(capsys, root, "import", "--name", NAME.format(variant), str(source))
    assert code == 0, err
    return root, NAME.format(variant)


@pytest.fixture(params=LOCAL)
def image(
    request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> tuple[Path, str]:
    return imported(capsys, tmp_path, request.param)


def fails(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> str:
    code, out, err = run(capsys, root, *args)
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1 and lines[0].startswith("ckfs: "), err
    return lines[0]


def test_golden(capsys: pytest.CaptureFixture[str], image: tuple[Path, str]) -> None:
    root, ref = image

    def run_json(args: list[str]) -> Any:
        code, out, err = run(capsys, root, *args, "--json")
        assert code == 0, err
        return json.loads(out)

    for name, found in collect(run_json, ref).items():
        golden(name, found)


def test_layers_are_numbered_with_their_history(
    capsys: pytest.CaptureFixture[str], image: tuple[Path, str]
) -> None:
    root, ref = image
    rows = json.loads(run(capsys, root, "layers", ref, "--json")[1])
    assert [r["number"] for r in rows] == [1, 2, 3, 4]
    # history has ENV and CMD steps between: skipped
    assert rows[3]["created_by"].startswith("RUN rm /etc/os-release")
    assert all(r["local"] and r["fetched_pct"] is None for r in rows)
    assert rows[0]["uncompressed_size"] >= rows[0]["file_bytes"] > 1 << 20
    expect = "eager" if ref.endswith("zstd:latest") else None
    assert expect is None or {r["source"] for r in rows} == {expect}


def test_which_text(capsys: pytest.CaptureFixture[str], image: tuple[Path, str]) -> None:
    root, ref = image
    code, out, _ = run(capsys, root, "which", ref, "/etc/motd")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("/etc/motd: layer 3 (")
    assert [line.split(" (")[0] for line in lines[1:]] == ["  shadows layer 2", "  shadows layer 1"]
    out = run(capsys, root, "which", ref, "var/lib/data/db")[1]
    assert out.startswith("/var/lib/data/db: deleted by layer 3 (replaced-parent at /var/lib/data)")


def test_which_text_says_opaque(
    capsys: pytest.CaptureFixture[str], image: tuple[Path, str]
) -> None:
    """An opaque directory, and a path it deleted, say so in text as JSON does."""
    root, ref = image
    lines = run(capsys, root, "which", ref, "/opt/app")[1].splitlines()
    assert lines[0].startswith("/opt/app: layer 2 (") and "): opaque dir  RUN" in lines[0]
    assert lines[1].startswith("  shadows layer 1 (") and "): dir  ADD" in lines[1]
    assert lines[2:] == ["  opaque: hides what layer(s) 1 have under it"]
    lines = run(capsys, root, "which", ref, "/opt/app/old")[1].splitlines()
    assert lines[0] == "/opt/app/old: deleted by layer 2 (opaque directory at /opt/app)"
    assert lines[1].startswith("  shadows layer 1 (") and len(lines) == 2
    lines = run(capsys, root, "which", ref, "/etc")[1].splitlines()
    assert "opaque" not in "".join(lines)


def test_ls_long_and_layer_alone(
    capsys: pytest.CaptureFixture[str], image: tuple[Path, str]
) -> None:
    root, ref = image
    out = run(capsys, root, "ls", "-l", ref, "/etc")[1]
    assert "-rw-------" in out and "motd.link -> motd" in out
    out = run(capsys, root, "ls", "-R", "--layer", "2", ref)[1].splitlines()
    assert "/gone (whiteout)" in out and "/opt/app/new" in out and "/etc/hosts" not in out
    assert "/opt/app (opaque)" in out and "/etc/motd" in out


def test_plain_ls_marks_whiteouts_and_opaque_dirs(
    capsys: pytest.CaptureFixture[str], image: tuple[Path, str]
) -> None:
    """Without -l a whiteout and an opaque directory do not pass for ordinary entries."""
    root, ref = image
    assert run(capsys, root, "ls", "--layer", "2", ref)[1].splitlines() == [
        "etc",
        "gone (whiteout)",
        "opt",
    ]
    assert run(capsys, root, "ls", "--layer", "4", ref, "/etc")[1] == "os-release (whiteout)\n"
    assert run(capsys, root, "ls", ref, "/opt")[1].splitlines() == ["app (opaque)", "big.bin"]
    long = run(capsys, root, "ls", "-l", "--layer", "2", ref)[1]
    assert "(whiteout)" not in long and "c---------" in long


def test_cat_streams_a_big_binary_file(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    source = layout(tmp_path / "zstd", "zstd")
    with pytest.raises(SystemExit):
        main(["--root", str(root), "--no-daemon", "import", "--name", "x.local/i", str(source)])
    capsysbinary.readouterr()
    for args, expect in [
        (["/usr/bin/tool"], TOOL_V2),
        (["--upto", "3", "/usr/bin/tool"], TOOL_V1),
        (["--layer", "1", "usr/bin/tool-hardlink"], TOOL_V1),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--root", str(root), "--no-daemon", "cat", "x.local/i", *args])
        assert exit_info.value.code in (0, None)
        assert capsysbinary.readouterr().out == expect
    with pytest.raises(SystemExit):
        main(["--root", str(root), "--no-daemon", "cat", "x.local/i", "/opt/big.bin"])
    data = capsysbinary.readouterr().out
    assert len(data) == 1 << 20
    assert hashlib.sha256(data).digest() == hashlib.sha256(big_content()).digest()


def test_binary_to_a_terminal_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, ref = imported(capsys, tmp_path, "gzip")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    line = fails(capsys, root, "cat", ref, "/usr/bin/tool")
    assert "binary" in line and "--force" in line
    code, out, _ = run(capsys, root, "cat", ref, "/etc/motd")
    assert (code, out) == (0, "motd v3\n")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["ls", "example.local/nope"], "not found"),
        (["ls", "--layer", "7", "{ref}"], "layer 7 out of range: {ref} has 4 layers"),
        (["ls", "--upto", "0", "{ref}"], "layer 0 out of range"),
        (["ls", "--layer", "1", "--upto", "2", "{ref}"], "exclude each other"),
        (["ls", "{ref}", "/etc/../etc"], "'..' is not allowed"),
        (["cat", "{ref}", "../../etc/passwd"], "'..' is not allowed"),
        (["cat", "{ref}", "/etc"], "is a dir, not a file"),
        (["cat", "{ref}", "/gone"], "no such file"),
        (["ls", "{ref}", "/nope"], "no such file or directory"),
        (["which", "{ref}", "/nope"], "in no layer"),
        (["which", "{ref}", "/lib/libc.so"], "'/lib' is a symlink: try --follow"),
        (["which", "{ref}", "/etc/motd\0x"], "NUL"),
    ],
)
def test_bad_input_one_line_exit_1_store_unchanged(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], says: str
) -> None:
    root, ref = imported(capsys, tmp_path, "gzip")
    run(capsys, root, "layers", ref)  # indexes built once, before the snapshot
    before = _tree(root)
    line = fails(capsys, root, *[a.format(ref=ref) for a in args])
    assert says.format(ref=ref) in line
    assert _tree(root) == before


def _tree(root: Path) -> dict[str, int]:
    """Every file of the state root but the database (its WAL moves on reads)."""
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith("metadata.db")
    }


def test_a_damaged_index_is_rebuilt(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A layer index is a cache: a truncated one is built again from the blob."""
    root, ref = imported(capsys, tmp_path, "gzip")
    first = run(capsys, root, "which", ref, "/etc/motd", "--json")[1]
    index = max((root / "layers").rglob("index.db"), key=lambda p: p.stat().st_size)
    index.write_bytes(index.read_bytes()[:1000])
    assert run(capsys, root, "which", ref, "/etc/motd", "--json")[1] == first


def test_type_names_follow_kind() -> None:
    from ckfs.archive.entry import Kind
    from ckfs_cli.inspect_cmds import _TYPES

    shown = {k for k in Kind if k not in (Kind.HARDLINK, Kind.OPAQUE)}  # never a node's kind
    assert {_TYPES[k][0] for k in shown} == {k.name.lower() for k in shown}


def test_a_blob_listed_twice(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Old images repeat a layer blob (the empty layer): indexed once, numbered twice."""
    from tests.layouts import Layout

    source = Layout(tmp_path / "layout")
    source.image([{"a": b"1\n"}, {"b": b"2\n"}, {"a": b"1\n"}])
    root = tmp_path / "root"
    assert run(capsys, root, "import", "--name", "x.local/twice", str(source.root))[0] == 0
    rows = json.loads(run(capsys, root, "layers", "x.local/twice", "--json")[1])
    assert [r["number"] for r in rows] == [1, 2, 3] and rows[0]["digest"] == rows[2]["digest"]
    found = json.loads(run(capsys, root, "which", "x.local/twice", "/a", "--json")[1])
    assert found["provider"]["layer"] == 3
    assert [v["layer"] for v in found["shadowed"]] == [1]


def test_a_tampered_index_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """An index that opens but whose pages are garbage fails the command with one line
    naming it; nothing in the store changes (removing the index has it rebuilt)."""
    root, ref = imported(capsys, tmp_path, "gzip")
    run(capsys, root, "layers", ref)
    index = max((root / "layers").rglob("index.db"), key=lambda p: p.stat().st_size)
    data = bytearray(index.read_bytes())
    data[8192:] = b"Z" * (len(data) - 8192)  # keep the header and the schema page
    index.write_bytes(bytes(data))
    before = _tree(root)
    line = fails(capsys, root, "ls", "-R", ref)
    assert "layer index" in line and str(index) in line
    assert _tree(root) == before
