"""The fast header decoder must agree with tarfile's own, byte for byte.

`Member.frombuf` takes a shortcut for plain ustar headers and defers to
`tarfile.TarInfo.frombuf` for anything else; these tests feed both real
headers and mutated ones and compare every field (or the exception class).
"""

from __future__ import annotations

import io
import tarfile

from hypothesis import given, settings
from hypothesis import strategies as st

from ckfs.archive.tarstream import Member, TarStream
from tests.tarbuild import B, C, D, F, H, L, P, tar

_FIELDS = (
    "name",
    "mode",
    "uid",
    "gid",
    "size",
    "mtime",
    "chksum",
    "type",
    "linkname",
    "uname",
    "gname",
    "devmajor",
    "devminor",
)


def _decode(cls: type[tarfile.TarInfo], buf: bytes) -> object:
    try:
        info = cls.frombuf(buf, "utf-8", "surrogateescape")
    except Exception as e:  # the class is what must agree
        return type(e).__name__
    return {f: getattr(info, f) for f in _FIELDS}


def _headers() -> list[bytes]:
    blob = tar(
        F("file", b"x", mode=0o4755, uid=1000, gid=100, mtime=1_700_000_000),
        D("dir/sub/"),
        L("link", "target"),
        H("hard", "file"),
        C("dev/null", 1, 3),
        B("dev/sda", 8, 0),
        P("fifo"),
        F("a/" * 45 + "prefixed", b""),  # ustar prefix field
        format=tarfile.USTAR_FORMAT,
    )
    return [blob[i : i + 512] for i in range(0, len(blob), 512) if blob[i : i + 512].strip(b"\0")]


HEADERS = _headers()

#: Field boundaries, where decoders disagree if they ever do.
_EDGES = [0, 1, 98, 99, 100, 101, 106, 107, 108, 115, 116, 123, 124, 125, 134, 135, 136, 147]
_EDGES += [148, 155, 156, 157, 255, 256, 257, 263, 265, 296, 297, 329, 336, 337, 344, 345, 346, 499]


def test_real_headers_decode_the_same() -> None:
    assert len(HEADERS) >= 8
    for buf in HEADERS:
        assert _decode(Member, buf) == _decode(tarfile.TarInfo, buf)


_VALUES = [0, 32, 48, 55, 56, 0x80, 0xFF, ord("/"), ord("_"), ord("-"), 0xE9]


def _with_checksum(buf: bytearray) -> bytes:
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % (sum(buf) & 0o777777)
    return bytes(buf)


def test_every_single_edit_at_field_edges_decodes_the_same() -> None:
    for base in HEADERS:
        for pos in _EDGES:
            for value in _VALUES:
                buf = bytearray(base)
                buf[pos] = value
                for variant in (bytes(buf), _with_checksum(buf)):
                    assert _decode(Member, variant) == _decode(tarfile.TarInfo, variant), (
                        pos,
                        value,
                    )


@settings(max_examples=1000, deadline=None)
@given(
    base=st.sampled_from(HEADERS),
    edits=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(_EDGES), st.integers(0, 511)),
            st.sampled_from(_VALUES),
        ),
        max_size=6,
    ),
    fix_checksum=st.booleans(),
)
def test_mutated_headers_decode_the_same(
    base: bytes, edits: list[tuple[int, int]], fix_checksum: bool
) -> None:
    buf = bytearray(base)
    for pos, value in edits:
        buf[pos] = value
    data = _with_checksum(buf) if fix_checksum else bytes(buf)
    assert _decode(Member, data) == _decode(tarfile.TarInfo, data)


def test_stream_hashes_everything_and_skips_forward() -> None:
    raw = tar(F("a", b"a" * 5000), F("skipped", b"s" * 100_000), F("b", b"b"))
    stream = TarStream(io.BytesIO(raw))
    seen = []
    for m in stream.members():
        seen.append(m.name)
        if m.name != "skipped":
            assert stream.read(m.size) == m.name.encode() * m.size
    assert seen == ["a", "skipped", "b"]
    assert not stream.drain()
    assert stream.size == len(raw)
    import hashlib

    assert stream.digest() == "sha256:" + hashlib.sha256(raw).hexdigest()
