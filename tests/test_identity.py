"""Chain IDs (ckfs.identity) against independently computed vectors."""

from __future__ import annotations

import hashlib

import pytest

from ckfs.digest import Digest
from ckfs.errors import InvalidArgument
from ckfs.identity import chain_id, chain_ids


def _sha256(text: str) -> Digest:
    return Digest("sha256:" + hashlib.sha256(text.encode()).hexdigest())


# DiffIDs: sha256 of b"a", b"b", b"c". The chain IDs were computed with
# coreutils, not Python:  printf '%s %s' "$A" "$B" | sha256sum
A = Digest("sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb")
B = Digest("sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d")
C = Digest("sha256:2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6")
AB = "sha256:51c0c8ace48498d6f5fee6b0592cc06f2da0f3cbe09c5a34a97dce85c3889676"
ABC = "sha256:2fce7f8ce91bcf0a1428b36e1024639fdbd9469eea762dba98aa749631885106"


@pytest.mark.parametrize(
    ("diff_ids", "expected"),
    [
        pytest.param([A], [A], id="one-layer-is-its-diff-id"),
        pytest.param([A, B], [A, AB], id="two"),
        pytest.param([A, B, C], [A, AB, ABC], id="three"),
        pytest.param([B, A], [B, _sha256(f"{B} {A}")], id="order-matters"),
    ],
)
def test_chain_ids_vectors(diff_ids: list[Digest], expected: list[str]) -> None:
    assert chain_ids(diff_ids) == expected
    assert chain_id(diff_ids) == expected[-1]
    assert all(isinstance(d, Digest) for d in chain_ids(diff_ids))


def test_image_spec_expansion() -> None:
    # image-spec config.md, "Layer ChainID":
    #   ChainID(A|B|C) = Digest(Digest(DiffID(A) + " " + DiffID(B)) + " " + DiffID(C))
    assert chain_id([A, B, C]) == _sha256(_sha256(f"{A} {B}") + " " + C)
    # ... and ChainID(C) != ChainID(A|B|C): the base case is the DiffID itself.
    assert chain_id([C]) == C != chain_id([A, B, C])


def test_image_spec_go_test_structure() -> None:
    # The image-spec's identity/chainid_test.go uses placeholder digests
    # ("sha256:a"), which ckfs refuses; the same recursion with real ones:
    ids = [A, B, C]
    ab = _sha256(f"{ids[0]} {ids[1]}")
    abc = _sha256(f"{ab} {ids[2]}")
    assert chain_ids(ids) == [A, ab, abc]
    assert ids == [A, B, C]  # input left alone


def test_chain_is_sha256_even_for_sha512_diff_ids() -> None:
    d512 = Digest("sha512:" + hashlib.sha512(b"x").hexdigest())
    out = chain_ids([d512, A])
    assert out[0] == d512
    assert out[1] == _sha256(f"{d512} {A}")


def test_accepts_plain_strings_and_validates_them() -> None:
    assert chain_ids([str(A), str(B)]) == [A, AB]
    with pytest.raises(InvalidArgument, match=r"diff_ids\[1\]"):
        chain_ids([A, "sha256:b"])


@pytest.mark.parametrize("bad", [[], (), str(A)])
def test_empty_or_not_a_sequence(bad: list[Digest]) -> None:
    with pytest.raises(InvalidArgument):
        chain_ids(bad)
    with pytest.raises(InvalidArgument):
        chain_id(bad)
