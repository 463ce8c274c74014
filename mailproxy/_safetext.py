"""
Text from elsewhere (an operator, a router, a backend) made fit for one line
of a client's protocol.

A protocol line ends at CRLF, and many clients also break at a bare CR or
LF; control characters confuse terminals and logs; invisible format
characters (bidirectional overrides) make a text read other than it is.
L{oneLine} removes all of them and bounds the length, so such text can never
add a line of its own to what a client reads.
"""

from __future__ import annotations

import unicodedata

__all__ = ["oneLine", "MAX_LINE_TEXT"]

#: The most octets (UTF-8) of foreign text put on one client line.
MAX_LINE_TEXT = 200

# Line and paragraph separators, controls (CR, LF, NUL, ESC ...) and lone
# surrogates (which UTF-8 cannot encode) become spaces; format characters go.
_AS_SPACE = frozenset({"Cc", "Cs", "Zl", "Zp"})
_REMOVED = frozenset({"Cf"})


def oneLine(text: str, limit: int = MAX_LINE_TEXT) -> str:
    """
    C{text} as one line: line breaks, controls and unencodable characters
    become spaces, format characters are removed, runs of white space
    become one space, and the result is cut to at most C{limit} octets of
    UTF-8 without splitting a character.

    @return: the cleaned text, possibly empty.
    """
    # Enough to fill the limit even if every character took four octets.
    text = text[: 4 * limit + 1]
    if not (text.isascii() and text.isprintable()):
        kept = []
        for character in text:
            category = unicodedata.category(character)
            if category in _AS_SPACE:
                kept.append(" ")
            elif category not in _REMOVED:
                kept.append(character)
        text = "".join(kept)
    text = " ".join(text.split())
    encoded = text.encode("utf-8")
    if len(encoded) > limit:
        text = encoded[:limit].decode("utf-8", "ignore").rstrip()
    return text
