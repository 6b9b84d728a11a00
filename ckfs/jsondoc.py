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
import sys
from collections.abc import Iterator
from typing import Any

from ckfs.errors import InvalidArgument

__all__ = ["MAX_DEPTH", "parse_json", "parse_object"]

#: Deepest nesting of arrays and objects accepted. OCI and Docker documents
#: are at most five or six deep (index → manifests → descriptor → annotations);
#: 64 leaves room for any honest label or extension.
MAX_DEPTH = 64


def parse_json(data: bytes | str, where: str) -> Any:
    """Decode *data* as JSON nested at most `MAX_DEPTH` deep.

    Raises:
        InvalidArgument: ``<where>: invalid JSON: <reason>``, also for a
            document nested deeper than `MAX_DEPTH`.
    """
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"{where}: invalid JSON: {e}") from None
    except ValueError:
        # The only other ValueError: an integer past Python's digit limit,
        # whose message suggests raising the limit, which is not the user's fix.
        limit = sys.get_int_max_str_digits()
        raise InvalidArgument(
            f"{where}: invalid JSON: a number longer than {limit} digits"
        ) from None
    except RecursionError:
        value = None  # deeper than Python's stack: certainly too deep
    else:
        if _depth_within(data, value, MAX_DEPTH):
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


def _depth_within(data: bytes | str, value: Any, limit: int) -> bool:
    """Whether the parsed document *value* nests at most *limit* deep.

    Most documents have fewer openers than the limit in their text, which
    settles it at C speed. The rest are walked depth first with one iterator
    per open level: no recursion, memory bounded by the limit rather than
    the document (a pass over the text would need its strings blanked out,
    and the regular expressions that do that cost a hundred times a hostile
    document's size).
    """
    opens = ("[", "{") if isinstance(data, str) else (b"[", b"{")
    if data.count(opens[0]) + data.count(opens[1]) <= limit:  # type: ignore[arg-type]
        return True
    stack: list[Iterator[Any]] = [_children(value)]
    while stack:
        for child in stack[-1]:
            if isinstance(child, dict | list):
                if len(stack) >= limit:
                    return False
                stack.append(_children(child))
                break
        else:
            stack.pop()
    return True


def _children(value: Any) -> Iterator[Any]:
    return iter(value.values()) if isinstance(value, dict) else iter(value)
