"""Patient text made inert for every surface that shows it: terminal, HTML, Markdown (Streamlit) and PDF."""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Any

# Characters that reorder or hide text (Unicode format characters: bidi controls, zero-width characters, BOM),
# line/paragraph separators and control characters (NUL, ESC for terminal escapes, C1) are shown as a visible
# marker, so "lm 0001" written with U+202E cannot pass for "1000 ml"; the marker names the code point.
_MARKED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_KEEP = frozenset("\n\t")
# Markdown and Streamlit syntax is made of ASCII punctuation: each such character becomes a numeric character
# reference, which CommonMark turns back into the literal character without giving it a meaning (no emphasis,
# links, images, HTML, math, `:badge[...]` directives, `:material/icon:` or emoji shortcodes). Punctuation with no
# meaning inside a line (, . / ' " ( ) ? ; % @ -) stays readable; at the start of a line "-", "1." or "1)" would
# open a list, so the first character is escaped there.
_MD_PUNCT = re.compile(r"[!#$&*+:<=>\[\\\]^_`{|}~]")
_MD_LINE_START = re.compile(r"^(\s*)([-+]|\d+(?=[.)]))", re.MULTILINE)
# GFM turns bare URLs and e-mail addresses into links even from literal text; a word joiner (invisible, and ours,
# added after the text was made inert) breaks the pattern without changing what is displayed.
_AUTOLINK = re.compile(r"(?i)(?<=[a-z0-9])(?=://)|(?<=\bwww)(?=\.)|(?=@)")
WORD_JOINER = "\u2060"


def visible_marker(ch: str) -> str:
    return f"\u27e8U+{ord(ch):04X}\u27e9"


def inert_text(value: Any) -> str:
    """Plain text safe for a terminal or any plain-text widget: controls and bidi/invisible characters are
    replaced by a visible marker like ⟨U+202E⟩; tab and newline are kept."""
    text = "" if value is None else str(value)
    if text.isascii() and text.isprintable():
        return text
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(
        visible_marker(ch) if ch not in _KEEP and unicodedata.category(ch) in _MARKED_CATEGORIES else ch
        for ch in text
    )


def one_line(value: Any) -> str:
    """inert_text on one line: newlines and tabs become spaces (table cells, labels, headings)."""
    return " ".join(inert_text(value).split())


def html_text(value: Any, *, multiline: bool = False) -> str:
    """Text for an HTML page: inert, then every markup character escaped (quotes too, for attributes)."""
    text = inert_text(value) if multiline else one_line(value)
    escaped = html.escape(text, quote=True)
    return escaped.replace("\n", "<br>") if multiline else escaped


def markdown_text(value: Any, *, multiline: bool = False, links: bool = False) -> str:
    """Text for Markdown (Streamlit st.markdown, captions, button/expander/tab/metric labels): inert, with all
    ASCII punctuation as character references and autolinks broken, so it displays as written and means nothing."""
    text = inert_text(value) if multiline else one_line(value)
    if not links:  # links=True only for text that is not chart data (e.g. the signed-in user's e-mail)
        text = _AUTOLINK.sub(WORD_JOINER, text)
    escaped = _MD_PUNCT.sub(lambda m: f"&#{ord(m.group())};", text)
    escaped = _MD_LINE_START.sub(lambda m: m.group(1) + "".join(f"&#{ord(c)};" for c in m.group(2)), escaped)
    if multiline:
        # A hard line break per line; leading spaces kept literal (no indented code blocks from data).
        escaped = "  \n".join(line.lstrip(" ") for line in escaped.split("\n"))
    return escaped
