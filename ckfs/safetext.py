"""Untrusted strings made safe to print: escaped and bounded.

File names from layers, registry error bodies, labels and paths a container
wrote reach messages and listings. Printed raw, an escape or bell byte
retitles or recolours the user's terminal, a bidi override reorders what
they read, and a 100 kB path buries the message it is part of. So the few
places that print (the CLI's error line and its tables) pass text through
`printable` or `message`; the full value goes to ``--debug`` logs.
"""

from __future__ import annotations

import re

__all__ = ["MAX_MESSAGE", "MAX_WORD", "escape", "message", "printable"]

#: Longest run of non-blank characters kept whole in a message; longer ones
#: (paths, names, bodies) keep their head and tail around an ellipsis.
MAX_WORD = 160

#: Longest message printed, in characters, after escaping.
MAX_MESSAGE = 1000

# C0 controls, DEL, C1 controls, line/paragraph separators, bidi embeddings,
# overrides and isolates, and lone surrogates (undecodable bytes of a file
# name read with surrogateescape).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_LONG_WORD = re.compile(rf"\S{{{MAX_WORD + 1},}}")


def _escaped(match: re.Match[str]) -> str:
    c = ord(match.group())
    if 0xDC80 <= c <= 0xDCFF:  # a byte surrogateescape could not decode
        return f"\\x{c - 0xDC00:02x}"
    if c == 0x0A:
        return "\\n"
    if c == 0x09:
        return "\\t"
    if c == 0x0D:
        return "\\r"
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def escape(text: str) -> str:
    """*text* with every control, bidi or undecodable character as an escape."""
    return _UNSAFE.sub(_escaped, text)


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[: limit - tail - 1]}…{text[-tail:]}"


def printable(text: str, limit: int = MAX_WORD) -> str:
    """*text* escaped and cut in the middle to at most *limit* characters."""
    return _shorten(escape(text), limit)


def message(text: str) -> str:
    """A one-line message safe to print: escaped, long words and the whole bounded.

    Each long run of non-blank characters is cut in its middle, so the "what"
    and "where" of ``what: where`` both survive a 100 kB path.
    """
    text = _LONG_WORD.sub(lambda m: _shorten(m.group(), MAX_WORD), escape(text))
    return _shorten(text, MAX_MESSAGE)
