"""Digests are the trust boundary: only exact sha256/sha512 pass."""

from __future__ import annotations

import hashlib
import io

import pytest

from ckfs.digest import Digest, Digester, VerifyingReader, from_bytes, from_file
from ckfs.errors import DataLoss, InvalidArgument

HEX256 = hashlib.sha256(b"x").hexdigest()
HEX512 = hashlib.sha512(b"x").hexdigest()


@pytest.mark.parametrize("value", [f"sha256:{HEX256}", f"sha512:{HEX512}"])
def test_valid(value: str) -> None:
    d = Digest.parse(value)
    assert d == value and d.algorithm == value.split(":")[0] and d.hex == value.split(":")[1]
    assert isinstance(d, str)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "expected <algorithm>:<hex>"),
        (HEX256, "expected <algorithm>:<hex>"),
        (f"md5:{hashlib.md5(b'x').hexdigest()}", "unsupported algorithm"),
        (f"sha384:{hashlib.sha384(b'x').hexdigest()}", "unsupported algorithm"),
        (f"sha256:{HEX256[:-1]}", "64 lowercase hex"),
        (f"sha256:{HEX256}0", "64 lowercase hex"),
        (f"sha256:{HEX256.upper()}", "64 lowercase hex"),
        (f"sha256:{HEX256[:-1]}g", "64 lowercase hex"),
        (f"sha512:{HEX256}", "128 lowercase hex"),
        (f"SHA256:{HEX256}", "unsupported algorithm"),
        (f"sha256: {HEX256[1:]}", "64 lowercase hex"),
    ],
)
def test_invalid(value: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        Digest.parse(value)


def test_from_bytes_and_file_agree() -> None:
    data = b"abc" * 100_000
    assert from_bytes(data) == f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert from_file(io.BytesIO(data), "sha512") == (
        f"sha512:{hashlib.sha512(data).hexdigest()}",
        len(data),
    )
    d = Digester()
    d.update(data[:5])
    clone = d.copy()
    d.update(data[5:])
    assert d.digest() == from_bytes(data) and clone.digest() == from_bytes(data[:5])


def test_verifying_reader_accepts_exact_bytes() -> None:
    data = b"layer" * 1000
    r = VerifyingReader(io.BytesIO(data), from_bytes(data), len(data))
    assert r.read() == data
    assert r.read() == b""
    r.verify()


@pytest.mark.parametrize(
    ("data", "size", "words"),
    [
        (b"evil", 4, "digest mismatch"),
        (b"good", 3, "more than the expected 3 bytes"),
        (b"goo", 4, "size 3 does not match expected 4"),
    ],
)
def test_verifying_reader_rejects(data: bytes, size: int, words: str) -> None:
    r = VerifyingReader(io.BytesIO(data), from_bytes(b"good"), size, what="blob X")
    with pytest.raises(DataLoss, match=words):
        r.verify()
