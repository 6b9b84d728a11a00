"""`ckfs import` / `ckfs export` with layouts made by umoci and skopeo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from integration.conftest import BOTH_FACES, EXAMPLE_NAME, REPO, Ckfs, skopeo


def blobs_of(layout: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (layout / "blobs/sha256").iterdir()}


@BOTH_FACES
def test_import_umoci_layout_then_list_and_inspect(ckfs: Ckfs, example_layout: Path) -> None:
    out = ckfs.run("import", "--json", "--name", EXAMPLE_NAME, str(example_layout))
    report = json.loads(out.stdout)
    assert report["images"][0]["name"] == EXAMPLE_NAME
    assert report["new_blobs"] == len(blobs_of(example_layout))

    listed = json.loads(ckfs.run("images", "ls", "--json").stdout)
    assert [i["name"] for i in listed] == [EXAMPLE_NAME]
    assert ckfs.run("images", "ls", "-q").stdout.split() == [EXAMPLE_NAME]
    table = ckfs.run("images", "ls").stdout
    assert EXAMPLE_NAME in table and "linux/" in table

    info = json.loads(ckfs.run("images", "inspect", "--json", EXAMPLE_NAME).stdout)
    manifest = json.loads(
        (example_layout / "blobs/sha256" / info["target"]["digest"][7:]).read_text()
    )
    config = json.loads(
        (example_layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_text()
    )
    assert info["diff_ids"] == config["rootfs"]["diff_ids"]
    assert info["chain_ids"][0] == config["rootfs"]["diff_ids"][0]
    assert info["cmd"] == ["/bin/sh", "-c", "cat /etc/os-release"]
    assert {
        i["digest"] for i in json.loads(ckfs.run("content", "ls", "--json").stdout)
    } == blobs_of(example_layout)


def test_reimport_copies_nothing(ckfs: Ckfs, example_layout: Path) -> None:
    ckfs.run("import", "--name", EXAMPLE_NAME, str(example_layout))
    again = json.loads(
        ckfs.run("import", "--json", "--name", EXAMPLE_NAME, str(example_layout)).stdout
    )
    assert again["new_blobs"] == 0


def test_import_skopeo_oci_archive_and_docker_archive(
    ckfs: Ckfs, example_layout: Path, tmp_path: Path
) -> None:
    skopeo("copy", f"oci:{example_layout}:latest", f"oci-archive:{tmp_path}/a.tar:latest")
    ckfs.run("import", "--name", "localhost/a:1", str(tmp_path / "a.tar"))
    skopeo(
        "copy", f"oci:{example_layout}:latest", f"docker-archive:{tmp_path}/d.tar:saved/busybox:2"
    )
    ckfs.run("import", str(tmp_path / "d.tar"))
    names = ckfs.run("images", "ls", "-q").stdout.split()
    assert names == ["docker.io/saved/busybox:2", "localhost/a:1"]
    # Both carry the same layers: the docker archive's diff IDs are the
    # uncompressed digests of the very same tars.
    a = json.loads(ckfs.run("images", "inspect", "--json", "localhost/a:1").stdout)
    d = json.loads(ckfs.run("images", "inspect", "--json", "saved/busybox:2").stdout)
    assert a["diff_ids"] == d["diff_ids"]


def test_export_is_read_by_skopeo(ckfs: Ckfs, example_layout: Path, tmp_path: Path) -> None:
    ckfs.run("import", "--name", EXAMPLE_NAME, str(example_layout))
    out = tmp_path / "out.tar"
    ckfs.run("export", EXAMPLE_NAME, str(out))
    inspected = json.loads(skopeo("inspect", f"oci-archive:{out}").stdout)
    src = json.loads(skopeo("inspect", f"oci:{example_layout}:latest").stdout)
    assert inspected["Layers"] == src["Layers"]
    assert inspected["Digest"] == src["Digest"]
    skopeo("copy", f"oci-archive:{out}", f"oci:{tmp_path}/copy:latest")
    assert blobs_of(tmp_path / "copy") == blobs_of(example_layout)


@BOTH_FACES
def test_content_get_rm_verify(ckfs: Ckfs, example_layout: Path) -> None:
    ckfs.run("import", "--name", EXAMPLE_NAME, str(example_layout))
    digest = sorted(blobs_of(example_layout))[0]
    got = subprocess.run(
        [sys.executable, "-m", "ckfs_cli.main", "--root", str(ckfs.root), "content", "get", digest],
        capture_output=True,
        check=True,
    ).stdout
    assert got == (example_layout / "blobs/sha256" / digest[7:]).read_bytes()
    assert "0 corrupt" in ckfs.run("content", "verify").stdout

    blob = ckfs.root / "content/blobs/sha256" / digest[7:]
    blob.chmod(0o644)
    blob.write_bytes(b"rot" + got[3:])
    proc = ckfs.run("content", "verify", check=False)
    assert proc.returncode == 1 and digest in proc.stderr

    ckfs.run("content", "rm", digest)
    assert digest not in ckfs.run("content", "ls", "-q").stdout
    line = ckfs.fails("content", "get", digest)
    assert digest in line


@BOTH_FACES
def test_images_tag_and_rm(ckfs: Ckfs, example_layout: Path) -> None:
    ckfs.run("import", "--name", EXAMPLE_NAME, str(example_layout))
    ckfs.run("images", "tag", EXAMPLE_NAME, "stevvooe/foo")
    assert "docker.io/stevvooe/foo:latest" in ckfs.run("images", "ls", "-q").stdout
    ckfs.fails("images", "tag", EXAMPLE_NAME, "stevvooe/foo")
    ckfs.run("images", "tag", "--force", EXAMPLE_NAME, "stevvooe/foo")
    ckfs.run("images", "rm", "docker.io/stevvooe/foo:latest")
    assert ckfs.run("images", "ls", "-q").stdout.split() == [EXAMPLE_NAME]
    assert "not found" in ckfs.run("images", "rm", "nope", check=False).stderr.lower()


def _spoil_layer(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(
        (layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text()
    )
    return str(manifest["layers"][0]["digest"])


@BOTH_FACES
def test_bad_inputs_exit_1_with_one_line_and_store_unchanged(
    ckfs: Ckfs, layout_copy: Path, tmp_path: Path
) -> None:
    layer = _spoil_layer(layout_copy)
    path = layout_copy / "blobs/sha256" / layer[7:]
    good = path.read_bytes()

    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert layer in ckfs.fails("import", "--name", "x", str(layout_copy))

    path.unlink()
    assert "missing" in ckfs.fails("import", "--name", "x", str(layout_copy))

    path.write_bytes(good)
    archive = tmp_path / "cut.tar"
    skopeo("copy", f"oci:{layout_copy}:latest", f"oci-archive:{archive}:latest")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    ckfs.fails("import", "--name", "x", str(archive))

    (layout_copy / "index.json").write_text("{")
    assert "index.json" in ckfs.fails("import", "--name", "x", str(layout_copy))

    assert "no such file" in ckfs.fails("import", str(tmp_path / "nothing-here"))
    assert ckfs.run("images", "ls", "-q").stdout == ""
    assert ckfs.run("content", "ls", "-q").stdout == ""
    assert not any((ckfs.root / "content/ingest").glob("*"))


def test_debug_adds_traceback(ckfs: Ckfs, tmp_path: Path) -> None:
    proc = ckfs.run("--debug", "import", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr


def test_startup_imports_no_fuse_grpc_or_http(ckfs: Ckfs) -> None:
    probe = (
        "import sys\n"
        "from ckfs_cli.main import main\n"
        "try:\n"
        f"    main(['--root', {str(ckfs.root)!r}] + sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('pyfuse3', 'grpc', 'httpx', 'httpcore', 'trio', 'h11', 'ssl')]\n"
        "print(sorted(heavy), file=sys.stderr)\n"
    )
    for args in (["--help"], ["images", "ls"], ["content", "ls"]):
        proc = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True
        )
        assert proc.stderr.strip().splitlines()[-1] == "[]", (args, proc.stderr)


def test_stdlib_cmd_is_not_shadowed() -> None:
    # pdb imports the standard library's `cmd`; the repo's cmd/ must not win,
    # even when the repository root is the current directory.
    proc = subprocess.run(
        [sys.executable, "-c", "import cmd, pdb; print(cmd.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert not proc.stdout.strip().startswith(str(REPO))
