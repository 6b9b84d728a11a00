"""``make protos`` (cmd/ckfs_protos): placement by package, idempotence, --check."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ckfs_protos.generate import API, ROOT, SUFFIXES, ProtoError, main, package_dir, protos


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the repository's protos, nothing generated yet."""
    for proto in protos(ROOT):
        (tmp_path / proto).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / proto, tmp_path / proto)
    return tmp_path


def generated(root: Path) -> dict[Path, bytes]:
    """The generated modules under *root*; byte-compiled copies (bootstrap makes them) aside."""
    found = (p for s in SUFFIXES for p in (root / API).rglob(f"*{s}"))
    return {p.relative_to(root): p.read_bytes() for p in sorted(found)}


def test_the_committed_modules_are_current() -> None:
    assert main(["--check"]) == 0


def test_generate_twice_changes_nothing(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check", "--root", str(tree)]) == 1
    assert "missing" in capsys.readouterr().err
    assert main(["--root", str(tree)]) == 0
    first = generated(tree)
    assert Path("ckfs/api/types/types_pb2.py") in first
    assert (tree / "ckfs/api/services/content/v1/__init__.py").exists()
    assert first == generated(ROOT)  # same bytes as committed: nothing machine-specific
    capsys.readouterr()
    assert main(["--root", str(tree)]) == 0
    assert capsys.readouterr().out == ""  # nothing written the second time
    assert generated(tree) == first
    assert main(["--check", "--root", str(tree)]) == 0


def test_check_finds_stale_and_orphaned_modules(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["--root", str(tree)])
    capsys.readouterr()
    module = tree / "ckfs/api/types/types_pb2.py"
    module.write_bytes(module.read_bytes() + b"# edited\n")
    orphan = tree / "ckfs/api/types/old_pb2.py"
    orphan.write_text("")
    assert main(["--check", "--root", str(tree)]) == 1
    err = capsys.readouterr().err
    assert "types_pb2.py: differs" in err and "old_pb2.py: generated from no proto" in err
    assert main(["--root", str(tree)]) == 0
    assert not orphan.exists()
    assert main(["--check", "--root", str(tree)]) == 0


def test_package_decides_the_place(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert package_dir("containerd.services.content.v1") == API / "services/content/v1"
    assert package_dir("ckfs.v1") == API / "v1"
    with pytest.raises(ProtoError):
        package_dir("google.protobuf")
    moved = tree / "ckfs/api/v1/types.proto"
    shutil.copyfile(tree / "ckfs/api/types/types.proto", moved)
    assert main(["--root", str(tree)]) == 1
    assert "package containerd.types belongs in ckfs/api/types/" in capsys.readouterr().err
