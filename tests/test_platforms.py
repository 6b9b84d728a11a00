"""Platform normalization, parsing, matching and selection (ckfs.images.platforms).

Normalization cases follow containerd's ``platforms`` package so ckfs picks
the manifest ``ctr`` would.
"""

from __future__ import annotations

import os

import pytest

from ckfs import mediatypes as mt
from ckfs.descriptor import Descriptor, Platform
from ckfs.digest import from_bytes
from ckfs.errors import InvalidArgument
from ckfs.images import platforms


def P(os_: str, arch: str, variant: str = "") -> Platform:
    return Platform(os=os_, architecture=arch, variant=variant)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (P("linux", "amd64"), P("linux", "amd64")),
        (P("Linux", "x86_64"), P("linux", "amd64")),
        (P("linux", "x86-64"), P("linux", "amd64")),
        (P("linux", "amd64", "v1"), P("linux", "amd64")),
        (P("linux", "amd64", "v3"), P("linux", "amd64", "v3")),
        (P("linux", "aarch64"), P("linux", "arm64")),
        (P("linux", "arm64", "v8"), P("linux", "arm64")),
        (P("linux", "arm64", "8"), P("linux", "arm64")),
        (P("linux", "arm64", "v8.0"), P("linux", "arm64")),
        (P("linux", "arm64", "9"), P("linux", "arm64", "v9")),
        (P("linux", "arm64", "v8.2"), P("linux", "arm64", "v8.2")),
        (P("linux", "armhf"), P("linux", "arm", "v7")),
        (P("linux", "armel"), P("linux", "arm", "v6")),
        (P("linux", "arm"), P("linux", "arm", "v7")),
        (P("linux", "arm", "7"), P("linux", "arm", "v7")),
        (P("linux", "arm", "6"), P("linux", "arm", "v6")),
        (P("linux", "ARM", "V5"), P("linux", "arm", "v5")),
        (P("linux", "armv7l"), P("linux", "arm", "v7")),
        (P("linux", "armv6l"), P("linux", "arm", "v6")),
        (P("linux", "i386"), P("linux", "386")),
        (P("linux", "i686"), P("linux", "386")),
        (P("linux", "386"), P("linux", "386")),
        (P("linux", "ppc64le"), P("linux", "ppc64le")),
        (P("linux", "s390x"), P("linux", "s390x")),
        (P("linux", "riscv64"), P("linux", "riscv64")),
        (P("macos", "arm64"), P("darwin", "arm64")),
        (P("", "amd64"), P("linux", "amd64")),
    ],
    ids=str,
)
def test_normalize(given: Platform, expected: Platform) -> None:
    assert platforms.normalize(given) == expected
    assert platforms.normalize(expected) == expected  # idempotent


def test_normalize_keeps_os_version_and_features() -> None:
    p = Platform("windows", "AMD64", "", "10.0.17763.1", ("win32k",))
    assert platforms.normalize(p) == Platform("windows", "amd64", "", "10.0.17763.1", ("win32k",))


HOST = platforms.default()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("linux/amd64", P("linux", "amd64")),
        ("linux/arm64/v8", P("linux", "arm64")),
        ("linux/arm64", P("linux", "arm64")),
        ("linux/arm/v6", P("linux", "arm", "v6")),
        ("linux/arm", P("linux", "arm", "v7")),
        ("Linux/X86_64", P("linux", "amd64")),
        ("windows/amd64", P("windows", "amd64")),
        ("amd64", P("linux", "amd64")),
        ("aarch64", P("linux", "arm64")),
        ("armhf", P("linux", "arm", "v7")),
        ("linux", HOST),
        ("darwin", Platform("darwin", HOST.architecture, HOST.variant)),
    ],
)
def test_parse(spec: str, expected: Platform) -> None:
    assert platforms.parse(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["", "linux/", "/amd64", "linux/*", "linux/amd64/v8/extra", "plan10", "linux/amd 64", "a:b"],
)
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid platform"):
        platforms.parse(spec)


def test_default_is_normalized_uname() -> None:
    expected = platforms.normalize(Platform("linux", os.uname().machine))
    assert platforms.default() == expected
    assert platforms.default().os == "linux"
    assert platforms.normalize(platforms.default()) == platforms.default()


@pytest.mark.parametrize(
    ("want", "have", "ok"),
    [
        (P("linux", "amd64"), P("linux", "amd64"), True),
        (P("linux", "amd64"), P("linux", "x86_64"), True),
        (P("linux", "amd64"), P("linux", "arm64"), False),
        (P("linux", "amd64"), P("windows", "amd64"), False),
        (P("linux", "amd64"), P("linux", "386"), False),  # no containerd-style fallback
        (P("linux", "arm64"), P("linux", "arm64", "v8"), True),
        (P("linux", "arm64", "v8"), P("linux", "aarch64"), True),
        (P("linux", "arm64"), P("linux", "arm", "v8"), False),
        (P("linux", "arm", "v7"), P("linux", "arm"), True),  # empty = default variant
        (P("linux", "arm"), P("linux", "arm", "v7"), True),
        (P("linux", "arm", "v7"), P("linux", "arm", "v6"), False),
        (P("linux", "arm", "v6"), P("linux", "arm"), False),
        (P("linux", "amd64", "v3"), P("linux", "amd64"), False),
    ],
    ids=lambda v: str(v) if isinstance(v, Platform) else None,
)
def test_matches(want: Platform, have: Platform, ok: bool) -> None:
    assert platforms.matches(want, have) is ok


def test_matches_os_features_must_be_offered() -> None:
    have = Platform("windows", "amd64", os_features=("win32k",))
    assert not platforms.matches(P("windows", "amd64"), have)
    assert platforms.matches(Platform("windows", "amd64", os_features=("win32k",)), have)


def _entry(name: str, platform: Platform | None) -> Descriptor:
    data = name.encode()
    return Descriptor(mt.OCI_MANIFEST, from_bytes(data), len(data), platform=platform)


def test_select_orders_exact_variant_first_and_skips_unknown() -> None:
    arm = _entry("arm", P("linux", "arm"))
    armv7 = _entry("armv7", P("linux", "arm", "v7"))
    armv6 = _entry("armv6", P("linux", "arm", "v6"))
    amd = _entry("amd64", P("linux", "amd64"))
    attestation = _entry("att", None)
    index = [attestation, arm, amd, armv6, armv7]
    assert platforms.select(index, P("linux", "arm", "v7")) == [armv7, arm]
    assert platforms.select(index, P("linux", "arm", "v6")) == [armv6]
    assert platforms.select(index, P("linux", "x86_64")) == [amd]
    assert platforms.select(index, P("linux", "s390x")) == []


def test_select_arm64_prefers_plain_then_v8_and_keeps_order() -> None:
    v8 = _entry("v8", P("linux", "arm64", "v8"))
    plain = _entry("plain", P("linux", "arm64"))
    plain2 = _entry("plain2", P("linux", "aarch64"))
    assert platforms.select([v8, plain, plain2], P("linux", "arm64")) == [plain, plain2, v8]
    # Asking for arm64/v8 normalizes to arm64: same answer.
    assert platforms.select([v8, plain], platforms.parse("linux/arm64/v8")) == [plain, v8]
