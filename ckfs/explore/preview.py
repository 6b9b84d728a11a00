"""A file's first bytes as the explorer shows them: text, or a hex head.

Pure, so what a preview shows is tested without a terminal. The bytes come
from the image and are untrusted: text is escaped line by line
(`ckfs.safetext.escape`), so an escape sequence in a file cannot retitle or
recolour the user's terminal.
"""

from __future__ import annotations

import codecs

from rich.text import Text

from ckfs.safetext import escape

__all__ = ["HEX_BYTES", "PREVIEW_BYTES", "hexdump", "is_binary", "render"]

#: Bytes read for a preview: a few screens of any text file, and a bound on
#: what one highlight can fetch from a registry for a lazily attached layer.
PREVIEW_BYTES = 64 * 1024

#: Bytes of a binary file shown in hex: 32 rows, a screenful.
HEX_BYTES = 512

#: Bytes per hex row, as ``hexdump -C`` prints them.
_ROW = 16

#: Width of a tab stop in text previews.
_TAB = 8


def is_binary(data: bytes) -> bool:
    """Whether *data* (a file's head) is not UTF-8 text.

    A NUL byte, or bytes UTF-8 cannot decode; a character cut by the end
    of the head is not held against it.
    """
    if b"\0" in data:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return True
    return False


def hexdump(data: bytes) -> str:
    """*data* as ``hexdump -C`` rows: offset, 16 bytes in hex, printable ASCII."""
    rows = []
    for offset in range(0, len(data), _ROW):
        row = data[offset : offset + _ROW]
        hexes = " ".join(f"{b:02x}" for b in row)
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        rows.append(f"{offset:08x}  {hexes:<{_ROW * 3 - 1}}  |{text}|")
    return "\n".join(rows)


def render(data: bytes, size: int) -> Text:
    """The preview of a file of *size* bytes whose head is *data*.

    Text is shown up to `PREVIEW_BYTES`, binaries as a `HEX_BYTES` hex head;
    a note says when the file goes on beyond what is shown.
    """
    if is_binary(data):
        shown = data[:HEX_BYTES]
        body = Text(hexdump(shown))
        kind = "binary"
    else:
        shown = data[:PREVIEW_BYTES]
        # final=False: a character the head cuts in two is left out, not garbled.
        text = codecs.getincrementaldecoder("utf-8")("replace").decode(shown, final=False)
        body = Text("\n".join(escape(line.expandtabs(_TAB)) for line in text.split("\n")))
        kind = "text"
    if len(shown) < size:
        body.append(f"\n… {kind}: {len(shown)} of {size} bytes shown", style="dim italic")
    return body
