"""containerd's filter syntax, so ``ckfs images ls`` takes the filters ``ctr`` does.

A filter string is a comma-separated list of *selectors*, all of which must
match (AND)::

    name==docker.io/library/alpine:latest,labels."io.example.team"
    labels.env~=/^(prod|stage)$/,target.mediatype!=application/vnd.oci.image.index.v1+json

Several strings given together are alternatives (OR); giving none matches
everything. A selector is ``<fieldpath>[<operator><value>]``:

- ``fieldpath`` is dot-separated fields, each ``[A-Za-z0-9_]+`` or a
  double-quoted string (Go escapes) for keys with dots, slashes or spaces:
  ``labels."io.containerd.image.name"``.
- without an operator the selector tests presence; ``==`` equality; ``!=``
  inequality (an absent field counts as the empty string, as in containerd);
  ``~=`` a regular expression searched anywhere in the value.
- a value is a bare run of printable characters up to ``,`` or whitespace, or
  double-quoted (``name=="a,b"``). For ``~=`` it may also be delimited by
  ``/…/`` or ``|…|``; there a backslash escapes only the delimiter and every
  other backslash reaches the regular expression untouched (``/\\d+/``).

Why a parser of our own rather than ad-hoc ``key=value`` flags: labels are
how gc roots, leases and users tag objects, and one syntax across images,
content and snapshots means one thing to learn and one thing to test.

Differences from containerd, all on the side of accepting more or failing
earlier: a bad regular expression is an error when the filter is parsed (not a
silent non-match later); whitespace may surround separators; a value for
``==``/``!=`` may start with ``/``; a pattern longer than `MAX_PATTERN_SIZE`
is refused.

Regular expressions are RE2 (``google-re2``): the syntax of containerd's Go
``regexp``, and like it, matching in time linear in the value. That matters
because a filter arrives from any client of ckfsd: Python's backtracking
``re`` takes most of a second on ``/^(a+)+$/`` against 25 characters,
doubling with each one more, while holding the GIL, so one List call would
freeze the daemon. RE2 refuses what cannot run in linear time
(backreferences, lookaround); those are parse errors here.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from ckfs.errors import InvalidArgument
from ckfs.safetext import escape

__all__ = [
    "ALWAYS",
    "MAX_PATTERN_SIZE",
    "Adaptor",
    "Filter",
    "Operator",
    "Selector",
    "adaptor_for",
    "parse_filters",
]

#: Looks up a field path (``["name"]``, ``["labels", "io.example.x"]``) on one
#: object and answers ``(value, present)``.
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

#: Longest ``~=`` regular expression, in UTF-8 bytes. RE2's matching is linear
#: in the value, but compiling is not free in the pattern's size, and a filter
#: comes from any client; patterns that select labels, names and digests are
#: tens of bytes, so 1 KiB refuses only abuse.
MAX_PATTERN_SIZE = 1024


class Pattern(Protocol):
    """The part of a compiled RE2 pattern a selector uses (``re2`` ships no types)."""

    def search(self, text: bytes) -> object | None: ...


class Operator(enum.Enum):
    """What a selector tests; the value is the operator as written."""

    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


@dataclasses.dataclass(frozen=True, slots=True)
class Selector:
    """One ``fieldpath[op value]`` test."""

    fieldpath: tuple[str, ...]
    operator: Operator
    value: str = ""
    #: Compiled once at parse time for `Operator.MATCHES`; it searches UTF-8.
    pattern: Pattern | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator is Operator.PRESENT:
            return present
        if self.operator is Operator.EQUAL:
            return present and value == self.value
        if self.operator is Operator.NOT_EQUAL:
            return value != self.value
        assert self.pattern is not None
        # surrogatepass: a label read from JSON may hold a lone surrogate,
        # which cannot match a valid UTF-8 pattern but must not raise either.
        return self.pattern.search(value.encode("utf-8", "surrogatepass")) is not None


@dataclasses.dataclass(frozen=True, slots=True)
class Filter:
    """An OR of ANDs of selectors; an empty AND matches everything."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def match(self, adaptor: Adaptor) -> bool:
        """Whether the object *adaptor* describes passes the filter.

        Args:
            adaptor: answers ``(value, present)`` for a field path; see
                `adaptor_for` for the usual fields-plus-labels case.
        """
        return any(all(s.match(adaptor) for s in alt) for alt in self.alternatives)


#: The filter that matches every object.
ALWAYS = Filter(((),))


def parse_filters(filters: Sequence[str]) -> Filter:
    """Parse filter strings into one `Filter`: strings OR'd, selectors AND'd.

    An empty sequence, or an empty string among them, matches everything (as
    ``ctr images ls`` with no filter lists all). A bare ``str`` is taken as a
    single filter rather than iterated character by character.

    Args:
        filters: filter strings in containerd syntax (see the module docstring).

    Raises:
        InvalidArgument: a string is malformed or holds a bad regular
            expression; the message quotes the input with the offending
            character marked ``>|c|<``.
    """
    if isinstance(filters, str):
        filters = [filters]
    if not filters:
        return ALWAYS
    return Filter(tuple(_Parser(s).parse() for s in filters))


def adaptor_for(fields: Mapping[str, str], labels: Mapping[str, str] | None = None) -> Adaptor:
    """An adaptor over plain string fields plus ``labels.<key>``.

    A field is present when its key is in *fields*; callers leave unset
    fields out. Dotted keys address nested paths (``"target.digest"`` answers
    ``target.digest``). Under ``labels`` the rest of the path is joined with
    dots, so ``labels.io.example.x`` and ``labels."io.example.x"`` find the
    same label, as in containerd.

    Args:
        fields: field path (dot-joined) → value.
        labels: the object's labels.
    """
    label_map: Mapping[str, str] = labels if labels is not None else {}

    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        if fieldpath[0] == "labels":
            if len(fieldpath) < 2:
                return "", False
            value = label_map.get(".".join(fieldpath[1:]))
        else:
            value = fields.get(".".join(fieldpath))
        return ("", False) if value is None else (value, True)

    return adapt


_FIELD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_OPERATOR_CHARS = frozenset("=!~")
_OPERATORS = {"==": Operator.EQUAL, "!=": Operator.NOT_EQUAL, "~=": Operator.MATCHES}
_REGEX_QUOTES = frozenset("/|")
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_OCTAL = frozenset("01234567")
_HEX = frozenset("0123456789abcdefABCDEF")


def _reason(error: Exception) -> str:
    """RE2's reason (bytes, quoting the pattern) as one safe line."""
    reason = error.args[0] if error.args else ""
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    return escape(str(reason))


class _Parser:
    """Recursive descent over one filter string; errors carry positions."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> tuple[Selector, ...]:
        if self.text == "":
            return ()
        selectors = [self._selector()]
        while True:
            self._skip_space()
            ch = self._peek()
            if ch == "":
                return tuple(selectors)
            if ch != ",":
                raise self._error(self.pos, f"unexpected input: {ch}")
            self.pos += 1
            selectors.append(self._selector())

    # --- grammar -----------------------------------------------------------

    def _selector(self) -> Selector:
        fieldpath = self._fieldpath()
        self._skip_space()
        if self._peek() in ("", ","):
            return Selector(fieldpath, Operator.PRESENT)
        op = self._operator()
        self._skip_space()
        start = self.pos
        value = self._value(op)
        if op is not Operator.MATCHES:
            return Selector(fieldpath, op, value)
        return Selector(fieldpath, op, value, self._compile(start, value))

    def _compile(self, start: int, value: str) -> Pattern:
        """*value* as an RE2 pattern; `re2` is imported on the first ``~=`` only."""
        import re2

        source = value.encode("utf-8", "surrogatepass")
        if len(source) > MAX_PATTERN_SIZE:
            raise self._error(
                start,
                f"regular expression is {len(source)} bytes, over the limit of {MAX_PATTERN_SIZE}",
            )
        options = re2.Options()
        options.log_errors = False  # the error is raised, not written to the daemon's stderr
        options.never_capture = True  # only "does it match" is asked
        try:
            pattern: Pattern = re2.compile(source, options)
        except re2.error as e:
            reason = _reason(e)
            raise self._error(start, f"invalid regular expression {value!r}: {reason}") from None
        return pattern

    def _fieldpath(self) -> tuple[str, ...]:
        fields = [self._field()]
        while self._peek() == ".":
            self.pos += 1
            fields.append(self._field())
        return tuple(fields)

    def _field(self) -> str:
        self._skip_space()
        ch = self._peek()
        if ch == '"':
            return self._quoted()
        if ch in _FIELD_CHARS:
            start = self.pos
            while self._peek() in _FIELD_CHARS:
                self.pos += 1
            return self.text[start : self.pos]
        raise self._error(self.pos, 'expected a field name or a "quoted" field')

    def _operator(self) -> Operator:
        start = self.pos
        while self._peek() in _OPERATOR_CHARS:
            self.pos += 1
        op = self.text[start : self.pos]
        if not op:
            raise self._error(start, 'expected an operator ("=="|"!="|"~=")')
        if op not in _OPERATORS:
            raise self._error(start, f"unsupported operator {op!r}")
        return _OPERATORS[op]

    def _value(self, op: Operator) -> str:
        ch = self._peek()
        if ch == '"':
            return self._quoted()
        if ch in _REGEX_QUOTES and op is Operator.MATCHES:
            return self._regex_quoted()
        start = self.pos
        while True:
            ch = self._peek()
            if ch == "" or ch == "," or ch.isspace() or not ch.isprintable():
                break
            self.pos += 1
        if self.pos == start:
            raise self._error(start, "expected a value or a quoted value")
        return self.text[start : self.pos]

    # --- quoting -----------------------------------------------------------

    def _quoted(self) -> str:
        """A Go-style double-quoted string, returned unescaped."""
        start = self.pos
        self.pos += 1
        out = bytearray()
        while True:
            ch = self._peek()
            if ch in ("", "\n"):
                raise self._error(start, "quoted literal not terminated")
            self.pos += 1
            if ch == '"':
                break
            if ch != "\\":
                out += ch.encode()
                continue
            out += self._escape()
        try:
            return out.decode()
        except UnicodeDecodeError:
            raise self._error(start, "quoted literal is not valid UTF-8") from None

    def _escape(self) -> bytes:
        """Decode one escape; `pos` is just after the backslash."""
        at = self.pos - 1
        ch = self._peek()
        self.pos += 1
        if ch in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[ch].encode()
        if ch in _HEX_ESCAPES:
            n = _HEX_ESCAPES[ch]
            digits = self.text[self.pos : self.pos + n]
            if len(digits) != n or not all(c in _HEX for c in digits):
                raise self._error(at, "illegal numeric escape sequence")
            self.pos += n
            value = int(digits, 16)
            if ch == "x":
                return bytes([value])
            if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                raise self._error(at, "escaped code point out of range")
            return chr(value).encode()
        if ch in _OCTAL:
            digits = self.text[self.pos - 1 : self.pos + 2]
            if len(digits) != 3 or not all(c in _OCTAL for c in digits):
                raise self._error(at, "illegal numeric escape sequence")
            value = int(digits, 8)
            if value > 0xFF:
                raise self._error(at, "octal escape value > 255")
            self.pos += 2
            return bytes([value])
        raise self._error(at, "illegal escape sequence")

    def _regex_quoted(self) -> str:
        """``/re/`` or ``|re|``: only the delimiter can be escaped."""
        start = self.pos
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while True:
            ch = self._peek()
            if ch in ("", "\n"):
                raise self._error(start, "quoted literal not terminated")
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch == "\\" and self._peek() == quote:
                self.pos += 1
                out.append(quote)
            elif ch == "\\" and self._peek() != "":
                out.append(ch + self.text[self.pos])
                self.pos += 1
            else:
                out.append(ch)

    # --- scanning helpers --------------------------------------------------

    def _peek(self) -> str:
        """The next character, or ``""`` at the end (never in a set, so tests stay simple)."""
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _error(self, pos: int, msg: str) -> InvalidArgument:
        """containerd's error layout: ``[before >|c|< after]: msg``."""
        text = self.text
        if pos < len(text):
            where = f"[{text[:pos]} >|{text[pos]}|< {text[pos + 1 :]}]"
        else:
            where = f"[{text}]"
        return InvalidArgument(f"filters: parse error: {where}: {msg}")
