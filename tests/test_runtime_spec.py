"""Runtime specs from image configs: argv, env, user resolution inside the image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckfs.errors import InvalidArgument
from ckfs.images.config import parse_config
from ckfs.runtime_spec import DEFAULT_PATH, build_spec, resolve_user


def config(**cfg: object) -> bytes:
    return json.dumps(
        {
            "os": "linux",
            "architecture": "amd64",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": []},
        }
    ).encode()


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    etc = tmp_path / "rootfs/etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\napp:x:1001:\nwheel:x:10:app,bob\nstaff:x:50:app\n")
    return tmp_path / "rootfs"


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", (0, 0, [])),
        ("0", (0, 0, [])),
        ("1000", (1000, 1001, [])),
        ("4242", (4242, 0, [])),
        ("4242:7", (4242, 7, [])),
        ("app", (1000, 1001, [10, 50])),
        ("app:wheel", (1000, 10, [50])),
        ("app:99", (1000, 99, [10, 50])),
    ],
)
def test_resolve_user(rootfs: Path, user: str, expected: tuple[int, int, list[int]]) -> None:
    assert resolve_user(user, rootfs) == expected


@pytest.mark.parametrize("user", ["nobody", "app:nogroup"])
def test_unknown_names_are_refused(rootfs: Path, user: str) -> None:
    with pytest.raises(InvalidArgument):
        resolve_user(user, rootfs)


@pytest.mark.parametrize("link", ["etc/passwd", "etc"])
def test_symlinks_out_of_rootfs_are_not_followed(rootfs: Path, link: str) -> None:
    target = rootfs / link
    if target.is_dir():
        for p in target.iterdir():
            p.unlink()
        target.rmdir()
    else:
        target.unlink()
    target.symlink_to("/" + link)
    with pytest.raises(InvalidArgument):
        resolve_user("root", rootfs)


def test_spec_takes_entrypoint_cmd_env_cwd(rootfs: Path) -> None:
    cfg = parse_config(
        config(
            Entrypoint=["/bin/app"], Cmd=["--serve"], Env=["A=1"], WorkingDir="/srv", User="app"
        ),
        where="test",
    )
    spec = build_spec(cfg, rootfs=rootfs)
    assert spec["process"]["args"] == ["/bin/app", "--serve"]
    assert spec["process"]["env"] == [f"PATH={DEFAULT_PATH}", "A=1"]
    assert spec["process"]["cwd"] == "/srv"
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [10, 50]}
    assert build_spec(cfg, rootfs=rootfs, args=["x"])["process"]["args"] == ["/bin/app", "x"]


def test_nothing_to_run_is_an_error(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="no entrypoint or cmd"):
        build_spec(parse_config(config(), where="test"), rootfs=rootfs)
