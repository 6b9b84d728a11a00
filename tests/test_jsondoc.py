"""The one door for untrusted JSON: depth and error messages (ckfs.jsondoc)."""

from __future__ import annotations

import json

import pytest

from ckfs.errors import InvalidArgument
from ckfs.jsondoc import MAX_DEPTH, parse_json, parse_object


@pytest.mark.parametrize(
    "doc",
    [
        b"[" * 100_000 + b"]" * 100_000,  # past Python's recursion limit
        b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
        b'{"a":' * 900 + b"1" + b"}" * 900,  # parses, but too deep to walk safely
        b'{"k": [' + b"{}," * 1000 + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"]}",
    ],
    ids=["100k", "limit+1", "900-objects", "deep-branch"],
)
def test_too_deep_is_invalid_argument(doc: bytes) -> None:
    with pytest.raises(
        InvalidArgument, match=rf"^manifest x: invalid JSON: nested deeper than {MAX_DEPTH}"
    ):
        parse_json(doc, "manifest x")


def test_limit_itself_is_accepted() -> None:
    assert parse_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, "x") is not None


def test_brackets_inside_strings_do_not_count() -> None:
    doc = json.dumps({"a": "[" * 10_000, "b": ['{"' * 500, '\\"]']}).encode()
    assert parse_object(doc, "x")["a"] == "[" * 10_000


def test_wide_documents_are_fine() -> None:
    doc = json.dumps({"layers": [{"a": {"b": [1, {"c": "x"}]}} for _ in range(20_000)]})
    assert len(parse_object(doc, "x")["layers"]) == 20_000


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (b"\xff", "utf-8"),
        (b"{", "Expecting"),
        (b"[" + b"9" * 5000 + b"]", "a number longer than 4300 digits$"),
        (b"[1]", "expected an object"),
    ],
)
def test_malformed(doc: bytes, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^where: invalid JSON: .*{reason}"):
        parse_object(doc, "where")
