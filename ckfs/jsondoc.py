"""Parsing untrusted JSON documents (manifests, configs, index.json, token
and error bodies) with errors that say where: every caller wants the same
one-line message.

This is the one door untrusted JSON comes through, so its limits live here.
Sizes are checked by the callers before the bytes are read (they know the
source); nesting depth is checked here, because Python's parser recurses:
tens of thousands of ``[`` end in `RecursionError`, and a document a few
hundred deep parses but breaks the recursive code that later walks or
re-encodes it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ckfs.errors import InvalidArgument

__all__ = ["MAX_DEPTH", "parse_json", "parse_object"]

#: Deepest nesting of arrays and objects accepted. OCI and Docker documents
#: are at most five or six deep (index → manifests → descriptor → annotations);
#: 64 leaves room for any honest label or extension.
MAX_DEPTH = 64

# Strings may hold brackets; they are blanked out before brackets are
# counted. The document has already parsed, so every string is well formed.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def parse_json(data: bytes | str, where: str) -> Any:
    """Decode *data* as JSON nested at most `MAX_DEPTH` deep.

    Raises:
        InvalidArgument: ``<where>: invalid JSON: <reason>``, also for a
            document nested deeper than `MAX_DEPTH`.
    """
    try:
        value = json.loads(data)
    except ValueError as e:
        # JSONDecodeError and UnicodeDecodeError, and the plain ValueError
        # of a number longer than Python's int digit limit (4300).
        raise InvalidArgument(f"{where}: invalid JSON: {e}") from None
    except RecursionError:
        value = None  # deeper than Python's stack: certainly too deep
    else:
        raw = data.encode() if isinstance(data, str) else data
        if _depth_within(raw, MAX_DEPTH):
            return value
    raise InvalidArgument(f"{where}: invalid JSON: nested deeper than {MAX_DEPTH} levels")


def parse_object(data: bytes | str, where: str) -> dict[str, Any]:
    """Decode *data* as a JSON object.

    Raises:
        InvalidArgument: invalid JSON, too deep, or valid JSON that is not an object.
    """
    value = parse_json(data, where)
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: invalid JSON: expected an object")
    return value


def _depth_within(raw: bytes, limit: int) -> bool:
    """Whether the valid JSON *raw* nests at most *limit* deep.

    Without recursion and in C-speed passes: each pass deletes the innermost
    ``[]``/``{}`` pairs (one level, since `re.sub` does not rescan what it
    joins), so a document is within the limit when *limit* passes empty it.
    Most documents never get that far: fewer openers than the limit settle it.
    """
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    if brackets.count(b"[") + brackets.count(b"{") <= limit:
        return True
    for _ in range(limit):
        brackets = _INNERMOST.sub(b"", brackets)
        if not brackets:
            return True
    return False
