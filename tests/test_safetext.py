"""Untrusted text in messages and listings (ckfs.safetext)."""

from __future__ import annotations

from ckfs.safetext import MAX_MESSAGE, MAX_WORD, escape, message, printable


def test_controls_bidi_and_undecodable_bytes_are_escaped() -> None:
    raw = "a\x1b]0;title\x07b\x9b\u202ec\udcffd\n\t\r\x00"
    assert escape(raw) == "a\\x1b]0;title\\x07b\\x9b\\u202ec\\xffd\\n\\t\\r\\x00"
    assert escape(raw).isprintable()


def test_plain_text_is_unchanged() -> None:
    text = "layer sha256:" + "a" * 64 + ": entry usr/bin/ünïcode ✓ refused"
    assert message(text) == text == printable(text, 1000)


def test_long_words_keep_head_and_tail() -> None:
    path = "/x" * 50_000
    out = message(f"extracting {path}: File name too long")
    assert out.startswith("extracting /x/x") and out.endswith(": File name too long")
    assert "…" in out and len(out) < MAX_WORD + 40


def test_whole_message_is_bounded() -> None:
    out = message(" ".join(["word"] * 10_000))
    assert len(out) == MAX_MESSAGE and "…" in out


def test_printable_limit() -> None:
    assert len(printable("é" * 1000, 50)) == 50
