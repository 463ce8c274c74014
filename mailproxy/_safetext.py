"""
Text from elsewhere made fit for one line: of a client's protocol (text
from an operator, a router, a backend) or of the proxy's log (text a client,
a router or a backend chose).

A protocol line ends at CRLF, and many clients also break at a bare CR or
LF; control characters confuse terminals and logs; invisible format
characters (bidirectional overrides) make a text read other than it is.
L{oneLine} removes all of them and bounds the length, so such text can never
add a line of its own to what a client reads.

A log line must keep such text whole (an operator wants to see what was
sent) yet never let it break the line or pose as another field or line: a
forged "authentication failed" line would make fail2ban ban someone else.
L{logQuote} writes it as a JSON string literal in printable ASCII.
"""

from __future__ import annotations

import json
import unicodedata

__all__ = ["oneLine", "MAX_LINE_TEXT", "logQuote", "LogQuoted", "MAX_LOG_TEXT"]

#: The most octets (UTF-8) of foreign text put on one client line.
MAX_LINE_TEXT = 200

# Line and paragraph separators, controls (CR, LF, NUL, ESC ...) and lone
# surrogates (which UTF-8 cannot encode) become spaces; format characters go.
_AS_SPACE = frozenset({"Cc", "Cs", "Zl", "Zp"})
_REMOVED = frozenset({"Cf"})


def oneLine(text: str, limit: int = MAX_LINE_TEXT, ascii: bool = False) -> str:
    """
    C{text} as one line: line breaks, controls and unencodable characters
    become spaces, format characters are removed, runs of white space
    become one space, and the result is cut to at most C{limit} octets of
    UTF-8 without splitting a character.

    @param ascii: make the line 7-bit (L{sevenBit}).

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
    if ascii:
        text = sevenBit(text)
    encoded = text.encode("utf-8")
    if len(encoded) > limit:
        text = encoded[:limit].decode("utf-8", "ignore").rstrip()
    return text


def sevenBit(text: str) -> str:
    """
    C{text} in 7-bit ASCII, for a protocol whose texts are (IMAP's
    resp-text, POP3's and SMTP's replies): letters lose their marks
    (C{\u00fc} becomes C{u}), compatibility forms become their letters
    (C{\ufb01} becomes C{fi}), and every other character becomes C{?}.
    """
    if text.isascii():
        return text
    return "".join(
        character if character.isascii() else "?"
        for character in unicodedata.normalize("NFKD", text)
        if unicodedata.category(character) != "Mn"
    )


class LogQuoted(str):
    """
    Foreign text quoted for a log line by L{logQuote}: the string itself is
    the quoted form, for the text log; C{raw} is the text as it came (or
    L{None}), which the JSON event log records instead, since JSON escapes
    it on its own.

    @ivar raw: the text before quoting.
    """

    raw: str | None


#: The most characters of one foreign text a text log line carries; the rest
#: is cut (the quoted form then ends in C{...}). Escaped, a text may grow
#: sixfold: a line must stay short enough that the journal (48 KiB per line)
#: keeps it whole, and the fail2ban filter, anchored at the line's end, sees it.
MAX_LOG_TEXT = 1024

#: A string as C{json.dumps} writes it (printable ASCII, the rest escaped),
#: called without C{dumps}' detour through an encoder object: several log
#: lines of every login quote their texts.
_jsonString = json.encoder.encode_basestring_ascii


def logQuote(text: str | None) -> str:
    """
    C{text} as a JSON string in printable ASCII (C{"-"} for L{None}), for
    every log line that carries text a client, a router or a backend chose:
    line breaks, controls and non-ASCII characters become escapes, so the
    text can neither break the line nor pose as another field.

    Pass the result as the event's field (C{user=logQuote(user)}) and write
    C{{user}} in the format: the text log shows the quoted form and the
    JSON event log the original text (see L{LogQuoted}).
    """
    if text is None:
        quoted = LogQuoted("-")
    elif len(text) > MAX_LOG_TEXT:
        quoted = LogQuoted(_jsonString(text[:MAX_LOG_TEXT]) + "...")
    else:
        quoted = LogQuoted(_jsonString(text))
    quoted.raw = text
    return quoted
