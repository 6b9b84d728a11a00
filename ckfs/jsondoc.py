"""Parsing untrusted JSON documents (manifests, configs, index.json) with
errors that say where: every caller wants the same one-line message."""

from __future__ import annotations

import json
from typing import Any

from ckfs.errors import InvalidArgument

__all__ = ["parse_json", "parse_object"]


def parse_json(data: bytes | str, where: str) -> Any:
    """Decode *data* as JSON.

    Raises:
        InvalidArgument: ``<where>: invalid JSON: <reason>``.
    """
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"{where}: invalid JSON: {e}") from None


def parse_object(data: bytes | str, where: str) -> dict[str, Any]:
    """Decode *data* as a JSON object.

    Raises:
        InvalidArgument: invalid JSON, or valid JSON that is not an object.
    """
    value = parse_json(data, where)
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: invalid JSON: expected an object")
    return value
