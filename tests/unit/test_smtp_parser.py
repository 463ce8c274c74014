"""
The ESMTP wire syntax: command lines, paths, replies, xtext and the end of
message data.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.smtp._parser import (
    Command,
    DataScanner,
    LineReader,
    Path,
    Reply,
    ReplyError,
    ReplyReader,
    SMTPSyntaxError,
    TooLong,
    parseBDAT,
    parseCommand,
    parseHelo,
    parseMailFrom,
    parseRcptTo,
    reply,
    xtextDecode,
    xtextEncode,
)


def lines(reader: LineReader, limit: int = 512) -> list[bytes | TooLong]:
    """
    Every line the reader has now.
    """
    found = []
    while (line := reader.nextLine(limit)) is not None:
        found.append(line)
    return found


class LineReaderTests(SynchronousTestCase):
    """
    L{LineReader} splits input into lines, whatever the chunks.
    """

    def test_lineEndings(self) -> None:
        """
        CRLF and bare LF end lines; the ending is removed.
        """
        reader = LineReader()
        reader.feed(b"EHLO a\r\nNOOP\nQUIT\r\npart")
        self.assertEqual(lines(reader), [b"EHLO a", b"NOOP", b"QUIT"])
        self.assertEqual(len(reader), 4)

    def test_everySplit(self) -> None:
        """
        Any split of the input gives the same lines.
        """
        data = b"EHLO client\r\nMAIL FROM:<a@b.example>\r\n\r\nQUIT\r\n"
        for cut in range(len(data) + 1):
            reader = LineReader()
            reader.feed(data[:cut])
            found = lines(reader)
            reader.feed(data[cut:])
            found += lines(reader)
            self.assertEqual(found, [b"EHLO client", b"MAIL FROM:<a@b.example>", b"", b"QUIT"], cut)

    def test_tooLong(self) -> None:
        """
        A line over the limit is reported once, after its end arrived, and
        the next line is read normally; the reader never holds more than
        the limit meanwhile.
        """
        reader = LineReader()
        reader.feed(b"x" * 600)
        self.assertEqual(lines(reader, 512), [])
        self.assertEqual(len(reader), 0)
        reader.feed(b"y" * 10000)
        self.assertEqual(lines(reader, 512), [])
        reader.feed(b"z\r\nNOOP\r\n")
        self.assertEqual(lines(reader, 512), [TooLong(), b"NOOP"])

    def test_tooLongInOneChunk(self) -> None:
        """
        A complete over-long line in one chunk is reported at once.
        """
        reader = LineReader()
        reader.feed(b"x" * 600 + b"\r\nNOOP\r\n")
        self.assertEqual(lines(reader, 512), [TooLong(), b"NOOP"])

    def test_limitIncludesLineEnding(self) -> None:
        """
        The limit counts the line ending: 510 octets and CRLF fit in 512.
        """
        reader = LineReader()
        reader.feed(b"a" * 510 + b"\r\n" + b"b" * 511 + b"\r\n")
        self.assertEqual(lines(reader, 512), [b"a" * 510, TooLong()])

    def test_takeAndRemaining(self) -> None:
        """
        L{LineReader.take} gives raw octets from the front (a BDAT chunk),
        L{LineReader.takeRemaining} everything, L{LineReader.clear} drops it.
        """
        reader = LineReader()
        reader.feed(b"BDAT 3\r\nabcNOOP\r\n")
        self.assertEqual(reader.nextLine(512), b"BDAT 3")
        self.assertEqual(reader.take(3), b"abc")
        self.assertEqual(reader.takeRemaining(), b"NOOP\r\n")
        reader.feed(b"QUIT\r\n")
        reader.clear()
        self.assertEqual(lines(reader), [])


class CommandTests(SynchronousTestCase):
    """
    L{parseCommand}, L{parseHelo} and L{parseBDAT}.
    """

    def test_verbUpperCased(self) -> None:
        """
        The verb is upper-cased; the argument is kept as sent.
        """
        self.assertEqual(parseCommand(b"mail FROM:<a@b>"), Command(b"MAIL", b"FROM:<a@b>"))
        self.assertEqual(parseCommand(b"QUIT"), Command(b"QUIT", b""))

    def test_badVerbs(self) -> None:
        """
        Empty lines, control characters and 8-bit octets are no verbs.
        """
        for line in (b"", b" NOOP", b"NO\x00OP", b"\xc3\xa9HLO x", b"1HLO"):
            self.assertIsNone(parseCommand(line), line)

    def test_argumentHidden(self) -> None:
        """
        A command's repr does not show its argument (AUTH carries
        credentials).
        """
        self.assertNotIn("secret", repr(Command(b"AUTH", b"PLAIN secret")))

    def test_helo(self) -> None:
        """
        A name is one word of printable octets, up to 255.
        """
        self.assertEqual(parseHelo(b"mta.example.org"), "mta.example.org")
        self.assertEqual(parseHelo(b"  [192.0.2.1] "), "[192.0.2.1]")
        for bad in (b"", b"two words", b"x" * 256, b"a\x01b"):
            self.assertIsNone(parseHelo(bad), bad)

    def test_bdat(self) -> None:
        """
        BDAT takes a size and an optional LAST.
        """
        self.assertEqual(parseBDAT(b"100"), (100, False))
        self.assertEqual(parseBDAT(b"0 LAST"), (0, True))
        self.assertEqual(parseBDAT(b"7 last"), (7, True))
        for bad in (b"", b"-1", b"1 FIRST", b"x", b"1" * 16):
            self.assertRaises(SMTPSyntaxError, parseBDAT, bad)


class PathTests(SynchronousTestCase):
    """
    L{parseMailFrom} and L{parseRcptTo}.
    """

    def test_mailFrom(self) -> None:
        """
        The address and parameters; keywords upper-cased, values as sent.
        """
        path = parseMailFrom(b"FROM:<a@b.example> SIZE=1000 body=8BITMIME SMTPUTF8")
        self.assertEqual(path.address, "a@b.example")
        self.assertEqual(path.raw, b"a@b.example")
        self.assertEqual(path.parameters, ((b"SIZE", b"1000"), (b"BODY", b"8BITMIME"), (b"SMTPUTF8", None)))
        self.assertEqual(path.parameter(b"SIZE"), b"1000")
        self.assertTrue(path.has(b"SMTPUTF8"))
        self.assertEqual(path.parameterText(), b" SIZE=1000 BODY=8BITMIME SMTPUTF8")

    def test_nullSender(self) -> None:
        """
        C{<>} is the null sender.
        """
        self.assertEqual(parseMailFrom(b"FROM:<>"), Path("", b"", ()))

    def test_leniency(self) -> None:
        """
        The keyword's case and spaces after the colon do not matter.
        """
        self.assertEqual(parseMailFrom(b"from: <a@b.example>").address, "a@b.example")

    def test_quotedLocalPart(self) -> None:
        """
        A quoted local part may hold spaces, C{>} and escapes.
        """
        path = parseRcptTo(b'TO:<"odd > name\\"x"@b.example> NOTIFY=NEVER')
        self.assertEqual(path.raw, b'"odd > name\\"x"@b.example')
        self.assertEqual(path.parameters, ((b"NOTIFY", b"NEVER"),))

    def test_sourceRouteDropped(self) -> None:
        """
        A source route is ignored (RFC 5321 §3.3).
        """
        self.assertEqual(parseRcptTo(b"TO:<@relay.example,@other.example:u@b.example>").raw, b"u@b.example")

    def test_postmaster(self) -> None:
        """
        C{<postmaster>} needs no domain; other recipients do.
        """
        self.assertEqual(parseRcptTo(b"TO:<Postmaster>").address, "Postmaster")
        error = self.assertRaises(SMTPSyntaxError, parseRcptTo, b"TO:<alice>")
        self.assertEqual((error.code, error.enhanced), (501, "5.1.3"))

    def test_utf8(self) -> None:
        """
        UTF-8 addresses (SMTPUTF8) parse; the text is decoded.
        """
        self.assertEqual(parseRcptTo("TO:<jörg@bücher.example>".encode()).address, "jörg@bücher.example")

    def test_errors(self) -> None:
        """
        Each malformed path gets the reply RFC 3463 names for it.
        """
        cases = [
            (parseMailFrom, b"TO:<a@b>", 501, "5.5.4"),
            (parseMailFrom, b"FROM:a@b.example", 501, "5.1.7"),
            (parseMailFrom, b"FROM:<a@b.example", 501, "5.1.7"),
            (parseMailFrom, b"FROM:<a..b@c.example>", 501, "5.1.7"),
            (parseMailFrom, b"FROM:<a@>", 501, "5.1.7"),
            (parseMailFrom, b"FROM:<a@b.example> =x", 501, "5.5.4"),
            (parseMailFrom, b"FROM:<a@b.example> SIZE=a b=", 501, "5.5.4"),
            (parseRcptTo, b"TO:<a b@c.example>", 501, "5.1.3"),
            (parseRcptTo, b"TO:<>", 501, "5.1.3"),
        ]
        for parse, argument, code, enhanced in cases:
            error = self.assertRaises(SMTPSyntaxError, parse, argument)
            self.assertEqual((error.code, error.enhanced), (code, enhanced), argument)

    def test_tooManyParameters(self) -> None:
        """
        More than 16 parameters are refused.
        """
        self.assertRaises(SMTPSyntaxError, parseMailFrom, b"FROM:<a@b.example>" + b" X=1" * 17)


class ReplyReaderTests(SynchronousTestCase):
    """
    L{ReplyReader} assembles a server's replies.
    """

    def test_singleAndMultiline(self) -> None:
        """
        One-line and multi-line replies, with their raw octets.
        """
        reader = ReplyReader()
        reader.feed(b"220 ready\r\n250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n354\r\nrest")
        self.assertEqual(reader.next(), Reply(220, (b"ready",), b"220 ready\r\n"))
        multi = reader.next()
        assert multi is not None
        self.assertEqual((multi.code, multi.lines), (250, (b"host", b"PIPELINING", b"SIZE 10")))
        self.assertEqual(multi.raw, b"250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n")
        self.assertEqual(reader.next(), Reply(354, (b"",), b"354\r\n"))
        self.assertIsNone(reader.next())
        self.assertEqual(reader.takeRemaining(), b"rest")

    def test_everySplit(self) -> None:
        """
        Any split gives the same replies.
        """
        data = b"250-a\r\n250 b\r\n550 5.1.1 no\r\n"
        for cut in range(len(data) + 1):
            reader = ReplyReader()
            found = []
            for part in (data[:cut], data[cut:]):
                reader.feed(part)
                while (got := reader.next()) is not None:
                    found.append(got.code)
            self.assertEqual(found, [250, 550], cut)

    def test_positive(self) -> None:
        """
        2xx replies are positive.
        """
        self.assertTrue(Reply(250, (), b"").positive)
        self.assertFalse(Reply(354, (), b"").positive)

    def test_garbage(self) -> None:
        """
        Lines without a code, codes changing within a reply and endless
        lines are errors.
        """
        for data in (b"hello\r\n", b"250-a\r\n220 b\r\n", b"600 x\r\n"):
            reader = ReplyReader()
            reader.feed(data)
            self.assertRaises(ReplyError, reader.next)
        reader = ReplyReader()
        reader.feed(b"250 " + b"x" * 20000)
        self.assertRaises(ReplyError, reader.next)


class XtextTests(SynchronousTestCase):
    """
    RFC 3461 xtext, as XCLIENT values are written.
    """

    def test_vectors(self) -> None:
        """
        C{+}, C{=}, spaces, controls and 8-bit octets are hex-escaped;
        other printable ASCII is kept.
        """
        self.assertEqual(xtextEncode(b"alice@example.org"), b"alice@example.org")
        self.assertEqual(xtextEncode(b"a+b=c d"), b"a+2Bb+3Dc+20d")
        self.assertEqual(xtextEncode("jörg\r\n".encode()), b"j+C3+B6rg+0D+0A")
        self.assertEqual(xtextEncode(b"[UNAVAILABLE]"), b"[UNAVAILABLE]")

    def test_decode(self) -> None:
        """
        Decoding reverses encoding; invalid xtext is refused.
        """
        self.assertEqual(xtextDecode(b"a+2Bb+3Dc+20d"), b"a+b=c d")
        for bad in (b"a+2", b"a+zz", b"a=b", b"a b"):
            self.assertRaises(ValueError, xtextDecode, bad)

    @given(st.binary(max_size=300))
    def test_roundTrip(self, value: bytes) -> None:
        """
        Every byte string survives encoding and decoding, and its encoding
        is printable ASCII without C{=} or spaces.
        """
        encoded = xtextEncode(value)
        self.assertEqual(xtextDecode(encoded), value)
        self.assertTrue(all(0x21 <= octet <= 0x7E and octet != ord("=") for octet in encoded))


class ReplyFormatTests(SynchronousTestCase):
    """
    L{reply} writes the proxy's replies.
    """

    def test_formats(self) -> None:
        """
        One line with an enhanced code; several lines continued with C{-};
        no text at all.
        """
        self.assertEqual(reply(250, "2.0.0", "Ok"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(reply(250, None, "host", b"PIPELINING"), b"250-host\r\n250 PIPELINING\r\n")
        self.assertEqual(reply(334, None, b""), b"334 \r\n")


class DataScannerTests(SynchronousTestCase):
    """
    L{DataScanner} finds the strict end of message data and notices bare
    line endings.
    """

    def scan(self, chunks: list[bytes]) -> tuple[int | None, int, DataScanner]:
        """
        Feed C{chunks} until the end is found; return the index of the
        chunk it was found in, the offset, and the scanner.
        """
        scanner = DataScanner()
        for index, chunk in enumerate(chunks):
            end = scanner.feed(chunk)
            if end is not None:
                return index, end, scanner
        return None, -1, scanner

    def test_end(self) -> None:
        """
        The end is just past CRLF . CRLF; what follows is not message data.
        """
        data = b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"
        index, end, scanner = self.scan([data])
        self.assertEqual((index, data[end:]), (0, b"QUIT\r\n"))
        self.assertEqual(scanner.size, end)
        self.assertFalse(scanner.bareLineEnding)

    def test_emptyMessage(self) -> None:
        """
        A dot right at the start ends an empty message.
        """
        self.assertEqual(self.scan([b".\r\nNOOP\r\n"])[:2], (0, 3))

    def test_dotStuffingIsNoEnd(self) -> None:
        """
        Dot-stuffed lines and dots inside lines do not end the message.
        """
        data = b"a\r\n..\r\n.x\r\nb.\r\n.\r\n"
        self.assertEqual(self.scan([data])[:2], (0, len(data)))

    def test_everySplit(self) -> None:
        """
        Wherever the chunks are split, the end is found at the same place.
        """
        data = b"line\r\n..\r\nlast\r\n.\r\nNEXT"
        expected = data.index(b"NEXT")
        for cut in range(1, len(data)):
            index, end, _ = self.scan([data[:cut], data[cut:]])
            position = end if index == 0 else cut + end
            self.assertEqual(position, expected, cut)

    def test_bareLineFeed(self) -> None:
        """
        A bare LF is noticed, and LF . LF is no end.
        """
        index, _, scanner = self.scan([b"a\n.\nMAIL FROM:<x@y>\r\n"])
        self.assertIsNone(index)
        self.assertTrue(scanner.bareLineEnding)

    def test_bareCarriageReturn(self) -> None:
        """
        A bare CR is noticed, even split from what follows it.
        """
        self.assertTrue(self.scan([b"a\rb\r\n.\r\n"])[2].bareLineEnding)
        self.assertTrue(self.scan([b"a\r", b"b\r\n.\r\n"])[2].bareLineEnding)

    def test_crlfAcrossChunks(self) -> None:
        """
        A CRLF split between chunks is no bare line ending.
        """
        for cut in range(1, 12):
            data = b"ab\r\ncd\r\nef\r\n.\r\n"
            scanner = self.scan([data[:cut], data[cut:]])[2]
            self.assertFalse(scanner.bareLineEnding, cut)

    def test_bareAfterEndIgnored(self) -> None:
        """
        Octets after the end (the next commands) are not judged.
        """
        self.assertFalse(self.scan([b"a\r\n.\r\nX\nY\r"])[2].bareLineEnding)

    @given(st.lists(st.binary(max_size=40), max_size=8), st.integers(min_value=1, max_value=50))
    def test_chunkIndependent(self, parts: list[bytes], size: int) -> None:
        """
        For any message, any chunking gives the same end and the same
        verdict on bare line endings as scanning it whole.
        """
        data = b"\r\n".join(parts) + b"\r\n.\r\ntail"
        whole = self.scan([data])
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        index, end, scanner = self.scan(chunks)
        assert index is not None and whole[0] is not None
        self.assertEqual(index * size + end, whole[1])
        self.assertEqual(scanner.bareLineEnding, whole[2].bareLineEnding)
