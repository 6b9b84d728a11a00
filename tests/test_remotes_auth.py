"""Challenge parsing and Docker-style credential lookup (config.json, helpers).

Token flows through the registry client (caching, refresh, Basic, identity
tokens) are in test_remotes_registry.py, against its scripted registry.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from pathlib import Path

import pytest

from ckfs.errors import FailedPrecondition, InvalidArgument
from ckfs.remotes.auth import (
    DOCKER_HUB_AUTH_KEY,
    Challenge,
    Credentials,
    docker_config_path,
    parse_challenges,
    pull_scope,
)
from ckfs.remotes.challenge import MAX_CHALLENGE_HEADER, MAX_CHALLENGE_PARAMS, MAX_CHALLENGES

# -- WWW-Authenticate ------------------------------------------------------------------

CHALLENGES: list[tuple[list[str], list[Challenge]]] = [
    (
        ['Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'],
        [Challenge("bearer", {"realm": "https://auth.docker.io/token",
                              "service": "registry.docker.io"})],
    ),
    (   # quoted commas, equals signs and escaped quotes inside values
        ['Bearer realm="https://a.example/t?x=1,2",scope="repository:a/b:pull,push",'
         'error="say \\"hi\\""'],
        [Challenge("bearer", {"realm": "https://a.example/t?x=1,2",
                              "scope": "repository:a/b:pull,push", "error": 'say "hi"'})],
    ),
    (   # two challenges in one header: bearer preferred although listed second
        ['Basic realm="reg", Bearer realm="https://t.example/token", service=reg'],
        [Challenge("bearer", {"realm": "https://t.example/token", "service": "reg"}),
         Challenge("basic", {"realm": "reg"})],
    ),
    (   # two headers; unknown schemes kept last; token68 skipped
        ["Negotiate abc123==", 'basic realm="Registry Realm"'],
        [Challenge("basic", {"realm": "Registry Realm"}), Challenge("negotiate", {})],
    ),
    (   # case-insensitive scheme and parameter names, spaces around '='
        ['BEARER Realm = "https://t.example" , Service="s"'],
        [Challenge("bearer", {"realm": "https://t.example", "service": "s"})],
    ),
    (   # a scheme alone, then another challenge
        ["Basic, Bearer realm=x"],
        [Challenge("bearer", {"realm": "x"}), Challenge("basic", {})],
    ),
    (   # malformed: unterminated quote; what came before survives
        ['Bearer realm="https://t.example",service="oops'],
        [Challenge("bearer", {"realm": "https://t.example"})],
    ),
    ([""], []),
    (['"garbage'], []),
]  # fmt: skip


@pytest.mark.parametrize(("headers", "want"), CHALLENGES)
def test_parse_challenges(headers: list[str], want: list[Challenge]) -> None:
    got = parse_challenges(headers)
    assert [(c.scheme, dict(c.params)) for c in got] == [(c.scheme, dict(c.params)) for c in want]


BEARER = 'Bearer realm="https://t.example/token",service="reg"'

HOSTILE_CHALLENGES = {
    "one long value": ["Bearer realm=" + "a" * (1 << 20)],
    "many challenges": [", ".join(["Basic"] * 200_000) + ", " + BEARER],
    "many params": ["Bearer " + ",".join(f"p{i}=v" for i in range(100_000))],
    "backslashes": ['Bearer realm="' + "\\" * 300_000],
    "quotes": ['Bearer a="' + '\\"' * 200_000 + '"'],
    "many headers": ["Basic"] * 100_000 + [BEARER],
    "nothing but commas": ["," * (1 << 20), BEARER],
    "many short challenges": [", ".join(["Basic"] * 2000)],
    "many short params": ["Bearer " + ",".join(f"p{i}=v" for i in range(2000))],
}


@pytest.mark.parametrize("headers", HOSTILE_CHALLENGES.values(), ids=HOSTILE_CHALLENGES.keys())
def test_hostile_challenges_cost_bounded_work(headers: list[str]) -> None:
    """Megabytes of WWW-Authenticate parse at once into a bounded list (here 1 s is generous)."""
    start = time.monotonic()
    found = parse_challenges(headers)
    assert time.monotonic() - start < 1
    assert len(found) <= MAX_CHALLENGES
    assert all(len(c.params) <= MAX_CHALLENGE_PARAMS for c in found)
    assert sum(len(v) for c in found for v in c.params.values()) <= MAX_CHALLENGE_HEADER


def test_sane_challenges_survive_the_bounds() -> None:
    found = parse_challenges(["Negotiate abc==", "Basic", BEARER])
    assert found[0] == Challenge("bearer", {"realm": "https://t.example/token", "service": "reg"})


def test_pull_scope() -> None:
    assert pull_scope("library/alpine") == "repository:library/alpine:pull"


# -- config.json ------------------------------------------------------------------------


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def write_config(tmp_path: Path, config: dict[str, object]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def creds(path: Path, bindir: Path | None = None, **kw: str) -> Credentials:
    env = {"PATH": f"{bindir}:/usr/bin:/bin" if bindir else "/usr/bin:/bin", **kw}
    return Credentials(config_file=path, env=env)


def test_docker_config_path() -> None:
    assert docker_config_path({"DOCKER_CONFIG": "/d"}) == Path("/d/config.json")
    assert docker_config_path({"HOME": "/h"}) == Path("/h/.docker/config.json")


async def test_config_from_docker_config_env(tmp_path: Path) -> None:
    write_config(tmp_path, {"auths": {"r.example": {"auth": b64("u:p")}}})
    c = Credentials(env={"DOCKER_CONFIG": str(tmp_path), "PATH": ""})
    assert await c.get("r.example") == ("u", "p")


AUTHS = [
    # (auths entry, host asked, expected)
    ({"r.example:5000": {"auth": b64("u:p:w:c")}}, "r.example:5000", ("u", "p:w:c")),
    ({"https://r.example:5000/v1/": {"auth": b64("u:p")}}, "r.example:5000", ("u", "p")),
    ({"http://r.example": {"username": "u", "password": "p"}}, "r.example", ("u", "p")),
    ({"r.example": {"identitytoken": "idtok", "auth": b64("u:p")}}, "r.example", ("", "idtok")),
    ({DOCKER_HUB_AUTH_KEY: {"auth": b64("hub:pw")}}, "registry-1.docker.io", ("hub", "pw")),
    ({"docker.io": {"auth": b64("hub:pw")}}, "registry-1.docker.io", ("hub", "pw")),
    ({"r.example": {"auth": b64("u:p")}}, "r.example:5000", None),
    ({"r.example": {}}, "r.example", None),
    ({}, "r.example", None),
]  # fmt: skip


@pytest.mark.parametrize(("auths", "host", "want"), AUTHS)
async def test_auths_entries(
    tmp_path: Path,
    auths: dict[str, dict[str, str]],
    host: str,
    want: tuple[str, str] | None,
) -> None:
    c = creds(write_config(tmp_path, {"auths": auths}))
    assert await c.get(host) == want


async def test_missing_config_means_anonymous(tmp_path: Path) -> None:
    assert await creds(tmp_path / "nope.json").get("r.example") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[" * 100_000, "nested deeper than"),
        ("[]", "expected an object"),
        (json.dumps({"auths": {"r.example": {"auth": "!!notbase64"}}}), "not base64"),
        (json.dumps({"auths": {"r.example": {"auth": b64("nocolon")}}}), "not base64"),
    ],
)
async def test_bad_config_is_invalid_argument(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(InvalidArgument, match=message) as info:
        await creds(path).get("r.example")
    assert str(path) in str(info.value)
    assert "nocolon" not in str(info.value)


async def test_explicit_override() -> None:
    c = Credentials("user:pa:ss", config_file=Path("/nonexistent"))
    assert await c.get("any.example") == ("user", "pa:ss")
    assert "pa:ss" not in repr(c)
    with pytest.raises(InvalidArgument):
        Credentials("no-colon")


# -- credential helpers ---------------------------------------------------------------------

HELPER = """#!/bin/sh
# A docker-credential-helpers lookalike: reads the server URL on stdin.
read server
echo "$server" >> "$HELPER_LOG"
case "$server" in
  helper.example) echo '{"ServerURL":"helper.example","Username":"hu","Secret":"hs3cret"}' ;;
  token.example) echo '{"ServerURL":"token.example","Username":"<token>","Secret":"idtok"}' ;;
  https://index.docker.io/v1/) echo '{"Username":"hub","Secret":"hubpw"}' ;;
  broken.example) echo "keychain locked" >&2; exit 3 ;;
  garbage.example) echo "not json" ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
"""


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    script = d / "docker-credential-test"
    script.write_text(HELPER)
    script.chmod(0o755)
    return d


def helper_log(tmp_path: Path) -> list[str]:
    log = tmp_path / "helper.log"
    return log.read_text().split() if log.exists() else []


async def test_cred_helper_per_host(tmp_path: Path, bindir: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "credHelpers": {"helper.example": "test", "token.example": "test", "docker.io": "test"},
            "auths": {"other.example": {"auth": b64("o:p")}},
        },
    )
    c = creds(path, bindir, HELPER_LOG=str(tmp_path / "helper.log"))
    assert await c.get("helper.example") == ("hu", "hs3cret")
    assert await c.get("helper.example") == ("hu", "hs3cret")  # cached: helper ran once
    assert await c.get("token.example") == ("", "idtok")  # <token> → identity token
    assert await c.get("registry-1.docker.io") == ("hub", "hubpw")
    assert await c.get("other.example") == ("o", "p")  # no helper for it: auths
    assert helper_log(tmp_path) == ["helper.example", "token.example", DOCKER_HUB_AUTH_KEY]


async def test_creds_store_falls_back_to_auths_when_not_found(tmp_path: Path, bindir: Path) -> None:
    path = write_config(
        tmp_path, {"credsStore": "test", "auths": {"plain.example": {"auth": b64("a:b")}}}
    )
    c = creds(path, bindir, HELPER_LOG=str(tmp_path / "helper.log"))
    assert await c.get("helper.example") == ("hu", "hs3cret")
    assert await c.get("plain.example") == ("a", "b")
    assert await c.get("unknown.example") is None


async def test_cred_helper_failures(
    tmp_path: Path, bindir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = write_config(
        tmp_path,
        {
            "credHelpers": {
                "broken.example": "test",
                "garbage.example": "test",
                "missing.example": "absent",
            }
        },
    )
    c = creds(path, bindir, HELPER_LOG=str(tmp_path / "helper.log"))
    with pytest.raises(FailedPrecondition, match="docker-credential-test failed for broken"):
        await c.get("broken.example")
    with pytest.raises(FailedPrecondition, match="no credentials JSON"):
        await c.get("garbage.example")
    with pytest.raises(FailedPrecondition, match=r"docker-credential-absent .* not on PATH"):
        await c.get("missing.example")
    assert "hs3cret" not in caplog.text


def test_helper_script_is_executable(bindir: Path) -> None:
    assert os.access(bindir / "docker-credential-test", os.X_OK)
