"""
Tests for L{mailproxy._safetext}: foreign text quoted for a log line.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from mailproxy._safetext import MAX_LOG_TEXT, logQuote, oneLine


class LogQuoteTests(SynchronousTestCase):
    """
    L{logQuote} writes a text as a JSON string in printable ASCII.
    """

    def test_asJSONWritesIt(self) -> None:
        """
        The quoted form is what C{json.dumps} writes, for quotes, controls,
        line breaks, non-ASCII and undecodable octets (kept as surrogates);
        a text over L{MAX_LOG_TEXT} characters is cut and ends in C{...};
        L{None} is C{-}; the original text stays in C{raw}.
        """
        texts = ["alice", 'a"b\\c', "x\r\nuser=root\x00\x1b[2J", "\u00e9\u20ac\U0001f600\u202e", "bad\udcff"]
        for text in texts:
            quoted = logQuote(text)
            self.assertEqual((quoted, quoted.raw), (json.dumps(text), text))  # type: ignore[attr-defined]
        long = "y" * (MAX_LOG_TEXT + 5)
        self.assertEqual(logQuote(long), json.dumps("y" * MAX_LOG_TEXT) + "...")
        self.assertEqual(logQuote(None), "-")

    def test_noEncoderPerText(self) -> None:
        """
        Quoting (several times per login, for its log lines) calls
        C{json.dumps} not once: that builds its way to the C encoder
        through an encoder object each time.
        """
        calls: list[object] = []
        dumps = json.dumps

        def counting(*args: object, **kwargs: object) -> str:
            calls.append(args)
            return dumps(*args, **kwargs)  # type: ignore[arg-type]

        self.patch(json, "dumps", counting)
        self.assertEqual((logQuote("alice"), logQuote("z" * (MAX_LOG_TEXT + 1))[-3:]), ('"alice"', "..."))
        self.assertEqual(calls, [])


class OneLineTests(SynchronousTestCase):
    """
    L{oneLine} makes foreign text one safe line for a client.
    """

    def test_asciiOnly(self) -> None:
        """
        With C{ascii}, the line is 7-bit: marks are taken off letters,
        compatibility forms become their ASCII letters, the rest C{?}; a
        line already ASCII is unchanged, and the limit still holds.
        """
        self.assertEqual(oneLine("Gr\u00fc\u00dfe \ufb01le \u65e5\r\nx", ascii=True), "Gru?e file ? x")
        self.assertEqual(oneLine("plain text", ascii=True), "plain text")
        self.assertEqual(len(oneLine("\u00e9" * 300, limit=10, ascii=True)), 10)
        self.assertEqual(oneLine("\u00e9t\u00e9"), "\u00e9t\u00e9")
