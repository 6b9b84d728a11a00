"""The CLI face, in-process: output shapes and the one-line error rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckfs.content import ContentStore
from ckfs.metadata.db import DB
from ckfs_cli.main import main


def run(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["--root", str(root), *args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_empty_store_lists_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(capsys, tmp_path, "images", "ls", "--json") == (0, "[]\n", "")
    assert run(capsys, tmp_path, "images", "ls", "-q") == (0, "", "")
    code, out, _ = run(capsys, tmp_path, "content", "ls")
    assert code == 0 and out.split() == ["DIGEST", "SIZE", "AGE", "LABELS"]


def test_interrupted_ingest_is_listed_as_active(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = DB(tmp_path / "metadata.db")
    with ContentStore(tmp_path / "content", db).writer("layer-x", total=10) as w:
        w.write(b"abc")
    db.close()
    code, out, _ = run(capsys, tmp_path, "content", "active", "--json")
    assert code == 0
    [status] = json.loads(out)
    assert (status["ref"], status["offset"], status["total"]) == ("layer-x", 3, 10)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["images", "inspect", "Not/Valid"], "invalid reference"),
        (["images", "inspect", "alpine"], "not found"),
        (["content", "get", "sha256:abc"], "invalid digest"),
        (["images", "ls", "name=="], "filters"),
    ],
)
def test_errors_are_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], words: str
) -> None:
    code, out, err = run(capsys, tmp_path, *args)
    assert code == 1 and out == ""
    assert err.startswith("ckfs: ") and err.count("\n") == 1 and words in err
