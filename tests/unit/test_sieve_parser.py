"""
Tests for L{mailproxy.sieve._parser}.
"""

from __future__ import annotations

from typing import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from mailproxy.sieve._parser import (
    MAX_LIST_DEPTH,
    Atom,
    BadLine,
    Event,
    Fatal,
    Line,
    LineParser,
    SieveValue,
    clientString,
    formatValues,
    quoteString,
)


def drive(chunks: Iterable[bytes], parser: LineParser | None = None) -> list[Event]:
    """
    Feed C{chunks} one by one, pulling every event after each.

    @return: all events, in order, up to and including a L{Fatal}.
    """
    if parser is None:
        parser = LineParser()
    events: list[Event] = []
    for chunk in chunks:
        parser.feed(chunk)
        while True:
            event = parser.next()
            if event is None:
                break
            events.append(event)
            if isinstance(event, Fatal):
                return events
    return events


def plain(events: Iterable[Event | None]) -> list[tuple[object, ...]]:
    """
    Events as plain tuples, so that a failed comparison shows the values
    that L{Line}'s C{repr} hides.
    """
    result: list[tuple[object, ...]] = []
    for event in events:
        if isinstance(event, Line):
            result.append(("Line", *event.values))
        else:
            result.append((event,))
    return result


def line(*values: SieveValue) -> tuple[object, ...]:
    """
    The plain form of a L{Line} event.
    """
    return ("Line", *values)


def bad(reason: str) -> tuple[object, ...]:
    """
    The plain form of a L{BadLine} event.
    """
    return (BadLine(reason),)


def fatal(reason: str) -> tuple[object, ...]:
    """
    The plain form of a L{Fatal} event.
    """
    return (Fatal(reason),)


def parse(data: bytes, parser: LineParser | None = None) -> list[tuple[object, ...]]:
    """
    Parse C{data} fed at once; the plain events.
    """
    return plain(drive([data], parser))


A = Atom


class AtomTests(SynchronousTestCase):
    """
    Atoms, separators and line ends.
    """

    def test_commandWithoutArguments(self) -> None:
        """
        A bare command name is a line of one atom, case preserved.
        """
        self.assertEqual(parse(b"CapaBility\r\n"), [line(A(b"CapaBility"))])

    def test_atomCharacters(self) -> None:
        """
        Every RFC 5804 ATOM-CHAR may appear in an atom, including C{*},
        C{[}, C{]}, C{%}, C{/} and C{=}.
        """
        atom = b"!#$%&'*+,-./09:;<=>?@AZ[]^_`az|}~"
        self.assertEqual(parse(b"X " + atom + b"\r\n"), [line(A(b"X"), A(atom))])

    def test_invalidAtomCharacters(self) -> None:
        """
        A backslash, an 8-bit octet or a control character inside an atom
        makes the line bad, and the next line is read normally.
        """
        for octets in (b"a\\b", b"caf\xc3\xa9", b"a\x01b", b"a\rb", b'abc"d"', b"a{1+}\r\nx"):
            self.assertEqual(
                parse(b"NOOP " + octets + b"\r\nNOOP\r\n"),
                [bad("Invalid characters in atom."), line(A(b"NOOP"))],
                octets,
            )

    def test_emptyLine(self) -> None:
        """
        An empty line (or one of only spaces) is a line without values; the
        caller decides what that means.
        """
        self.assertEqual(parse(b"\r\n   \r\n"), [line(), line()])

    def test_spaces(self) -> None:
        """
        Leading, trailing and repeated spaces separate values and are
        otherwise ignored.
        """
        self.assertEqual(
            parse(b'  AUTHENTICATE   "PLAIN"  "x"  \r\n'),
            [line(A(b"AUTHENTICATE"), b"PLAIN", b"x")],
        )

    def test_missingSpace(self) -> None:
        """
        Two values with nothing between them make the line bad.
        """
        for data in (b'NOOP "a""b"\r\n', b'NOOP "a"b\r\n', b'NOOP {1+}\r\nx"y"\r\n'):
            self.assertEqual(parse(data), [bad("Missing space between arguments.")], data)

    def test_bareLF(self) -> None:
        """
        A bare LF ends a line as CRLF does.
        """
        self.assertEqual(parse(b"NOOP\nLOGOUT\r\n"), [line(A(b"NOOP")), line(A(b"LOGOUT"))])

    def test_reprHidesValues(self) -> None:
        """
        A L{Line}'s C{repr} does not show its values, which may be a
        password.
        """
        [event] = drive([b'AUTHENTICATE "PLAIN" "c2VjcmV0"\r\n'])
        self.assertNotIn("c2VjcmV0", repr(event))
        self.assertIn("3 values", repr(event))


class QuotedTests(SynchronousTestCase):
    """
    Quoted strings.
    """

    def test_quoted(self) -> None:
        """
        A quoted string's value is its body with C{\\"} and C{\\\\}
        unescaped.
        """
        self.assertEqual(
            parse(b'NOOP "a \\"b\\" \\\\ c"\r\n'), [line(A(b"NOOP"), b'a "b" \\ c')]
        )

    def test_empty(self) -> None:
        """
        C{""} is the empty string.
        """
        self.assertEqual(parse(b'X ""\r\n'), [line(A(b"X"), b"")])

    def test_utf8(self) -> None:
        """
        UTF-8 octets pass through unchanged.
        """
        self.assertEqual(parse('X "Grüße ✓"\r\n'.encode()), [line(A(b"X"), "Grüße ✓".encode())])

    def test_badEscape(self) -> None:
        """
        A backslash before anything but a quote or a backslash, or at the
        end of the line, makes the line bad.
        """
        self.assertEqual(parse(b'X "a\\nb"\r\n'), [bad("Invalid escape in quoted string.")])
        self.assertEqual(parse(b'X "a\\\r\n'), [bad("Invalid escape in quoted string.")])

    def test_nul(self) -> None:
        """
        A NUL octet inside a quoted string makes the line bad.
        """
        self.assertEqual(parse(b'X "a\x00b"\r\n'), [bad("Invalid character in quoted string.")])

    def test_unterminated(self) -> None:
        """
        A quoted string still open at the end of the line makes it bad.
        """
        self.assertEqual(parse(b'X "abc\r\nNOOP\r\n'), [bad("Missing closing quote."), line(A(b"NOOP"))])

    def test_lengthLimit(self) -> None:
        """
        A quoted string of 1024 octets (after unescaping) is accepted; one
        of 1025 makes the line bad.
        """
        body = b"x" * 1022 + b'\\"'
        self.assertEqual(parse(b'X "' + body + b'"\r\n'), [line(A(b"X"), b"x" * 1022 + b'"')])
        self.assertEqual(
            parse(b'X "' + b"x" * 1025 + b'"\r\n'), [bad("Quoted string too long; use a literal.")]
        )

    def test_ownLengthLimit(self) -> None:
        """
        The quoted-string limit is a parameter (backends get a larger one).
        """
        parser = LineParser(maxQuotedLength=4)
        self.assertEqual(
            parse(b'X "abcd" "abcde"\r\n', parser), [bad("Quoted string too long; use a literal.")]
        )


class LiteralTests(SynchronousTestCase):
    """
    Literals: C{{n+}} and C{{n}}, both followed by their octets at once.
    """

    def test_nonSynchronizing(self) -> None:
        """
        C{{n+}} is followed by exactly n octets, which may hold CR, LF,
        quotes and NUL.
        """
        self.assertEqual(
            parse(b'AUTHENTICATE "PLAIN" {7+}\r\na"\r\n\x00\\b\r\n'),
            [line(A(b"AUTHENTICATE"), b"PLAIN", b'a"\r\n\x00\\b')],
        )

    def test_serverForm(self) -> None:
        """
        C{{n}} works the same way: ManageSieve has no continuation request.
        """
        self.assertEqual(parse(b"X {3}\r\nabc\r\n"), [line(A(b"X"), b"abc")])

    def test_valuesAfterLiteral(self) -> None:
        """
        The line goes on after a literal: more values, more literals.
        """
        self.assertEqual(
            parse(b'PUTSCRIPT {3+}\r\nfoo {4+}\r\nkeep "x"\r\n'),
            [line(A(b"PUTSCRIPT"), b"foo", b"keep", b"x")],
        )

    def test_empty(self) -> None:
        """
        C{{0+}} is the empty string.
        """
        self.assertEqual(parse(b"X {0+}\r\n\r\n"), [line(A(b"X"), b"")])

    def test_leadingZeros(self) -> None:
        """
        Leading zeros in the size are harmless.
        """
        self.assertEqual(parse(b"X {0003+}\r\nabc\r\n"), [line(A(b"X"), b"abc")])

    def test_notAtEndOfLine(self) -> None:
        """
        A literal announcement must end its line segment.
        """
        self.assertEqual(parse(b"X {3+} y\r\n"), [bad("Literal must end the line.")])

    def test_invalid(self) -> None:
        """
        A brace that does not start a well-formed literal makes the line bad.
        """
        for data in (b"X {abc}\r\n", b"X {}\r\n", b"X {3-}\r\n", b"X {3\r\n"):
            self.assertEqual(parse(data), [bad("Invalid literal.")], data)

    def test_tooBig(self) -> None:
        """
        A literal over the limit is fatal: its octets are already on their
        way and cannot be told from commands.
        """
        parser = LineParser(maxLiteralSize=10)
        self.assertEqual(parse(b"X {10+}\r\n0123456789\r\n", parser), [line(A(b"X"), b"0123456789")])
        self.assertEqual(parse(b"X {11+}\r\n", parser), [fatal("Literal too big.")])

    def test_tooBigTogether(self) -> None:
        """
        The limit holds for all the literals of one line together.
        """
        parser = LineParser(maxLiteralSize=10)
        self.assertEqual(
            parse(b"X {6+}\r\nabcdef {5+}\r\nabcde\r\n", parser), [fatal("Literal too big.")]
        )

    def test_absurdSize(self) -> None:
        """
        A size with very many digits is fatal without being converted.
        """
        self.assertEqual(parse(b"X {" + b"9" * 5000 + b"+}\r\n"), [fatal("Literal too big.")])
        self.assertEqual(parse(b"X {" + b"0" * 5000 + b"1+}\r\nz\r\n"), [line(A(b"X"), b"z")])


class BadLineTests(SynchronousTestCase):
    """
    Recovering after a bad line.
    """

    def test_skipsLiteralOctets(self) -> None:
        """
        The literals of a bad line are skipped, so their octets are never
        read as commands.
        """
        self.assertEqual(
            parse(b'X \\ {13+}\r\nLOGOUT\r\nFOO\r\n tail\r\nNOOP\r\n'),
            [bad("Invalid characters in atom."), line(A(b"NOOP"))],
        )

    def test_tooBigWhileSkipping(self) -> None:
        """
        A too-big literal in a bad line is fatal too.
        """
        parser = LineParser(maxLiteralSize=10)
        self.assertEqual(parse(b"X \\ {11+}\r\n", parser), [fatal("Literal too big.")])

    def test_errorAfterLiteral(self) -> None:
        """
        An error in a segment after a literal is reported once the line
        ends.
        """
        self.assertEqual(
            parse(b'X {3+}\r\nabc "open {2+}\r\nxy\r\nNOOP\r\n'),
            [bad("Missing closing quote."), line(A(b"NOOP"))],
        )


class ListTests(SynchronousTestCase):
    """
    Parenthesised lists, as in response codes.
    """

    def test_responseCode(self) -> None:
        """
        C{OK (TAG "x") "Done"} has a list for its code.
        """
        self.assertEqual(
            parse(b'OK (TAG "x") "Done"\r\n'), [line(A(b"OK"), (A(b"TAG"), b"x"), b"Done")]
        )

    def test_literalInList(self) -> None:
        """
        A list may hold a literal.
        """
        self.assertEqual(
            parse(b'OK (TAG {3}\r\nabc) "Done"\r\n'), [line(A(b"OK"), (A(b"TAG"), b"abc"), b"Done")]
        )

    def test_depthLimit(self) -> None:
        """
        Lists nest at most L{MAX_LIST_DEPTH} deep.
        """
        nested = b"(" * MAX_LIST_DEPTH + b")" * MAX_LIST_DEPTH
        self.assertEqual(parse(b"X " + nested + b"\r\n"), [line(A(b"X"), ((),))])
        self.assertEqual(parse(b"X (" + nested + b")\r\n"), [bad("Lists nested too deeply.")])

    def test_unbalanced(self) -> None:
        """
        A stray C{)} or an unclosed C{(} makes the line bad.
        """
        self.assertEqual(parse(b"X )\r\n"), [bad("Unexpected ')'.")])
        self.assertEqual(parse(b"X (a\r\n"), [bad("Missing ')'.")])


class LimitTests(SynchronousTestCase):
    """
    The line length limit.
    """

    def test_exactLimit(self) -> None:
        """
        A line of exactly the limit is accepted.
        """
        parser = LineParser(maxLineLength=10)
        self.assertEqual(parse(b"X 12345678\r\n", parser), [line(A(b"X"), A(b"12345678"))])

    def test_longLineFatalBeforeEnd(self) -> None:
        """
        A line longer than the limit is fatal as soon as the excess
        arrives, without waiting for its end; later input is ignored.
        """
        parser = LineParser(maxLineLength=10)
        self.assertEqual(drive([b"X 123456789"], parser), [Fatal("Input buffer full.")])
        parser.feed(b"\r\nNOOP\r\n")
        self.assertEqual(parser.next(), Fatal("Input buffer full."))
        self.assertEqual(parser.buffered, 0)

    def test_trailingCR(self) -> None:
        """
        A CR at the very end does not count: it may be the start of CRLF.
        """
        parser = LineParser(maxLineLength=10)
        self.assertEqual(drive([b"X 12345678\r"], parser), [])
        self.assertEqual(plain(drive([b"\n"], parser)), [line(A(b"X"), A(b"12345678"))])

    def test_segmentsCountTogether(self) -> None:
        """
        All segments of a line count against the limit, literals excluded.
        """
        parser = LineParser(maxLineLength=12)
        self.assertEqual(
            parse(b"X {20+}\r\n" + b"z" * 20 + b" abc\r\n", parser), [line(A(b"X"), b"z" * 20, A(b"abc"))]
        )
        self.assertEqual(parse(b"X {2+}\r\nzz abcdefgh\r\n", parser), [fatal("Input buffer full.")])


class ClearAndTakeTests(SynchronousTestCase):
    """
    L{LineParser.clear} and L{LineParser.takeRemaining}.
    """

    def test_clearDropsPipelined(self) -> None:
        """
        C{clear} drops everything buffered, including a line in progress.
        """
        parser = LineParser()
        parser.feed(b"STARTTLS\r\nAUTHENTICATE {10+}\r\nab")
        self.assertEqual(plain([parser.next()]), [line(A(b"STARTTLS"))])
        parser.feed(b"")
        parser.clear()
        self.assertEqual(parser.buffered, 0)
        self.assertEqual(parse(b"NOOP\r\n", parser), [line(A(b"NOOP"))])

    def test_clearMidLiteral(self) -> None:
        """
        C{clear} during a literal forgets it: what follows is a new line.
        """
        parser = LineParser()
        self.assertEqual(drive([b"X {10+}\r\nabc"], parser), [])
        parser.clear()
        self.assertEqual(parse(b"NOOP\r\n", parser), [line(A(b"NOOP"))])

    def test_takeRemaining(self) -> None:
        """
        C{takeRemaining} hands over the unparsed input.
        """
        parser = LineParser()
        parser.feed(b'AUTHENTICATE "PLAIN" "x"\r\nLISTSCRIPTS\r\nGETSCR')
        parser.next()
        self.assertEqual(parser.takeRemaining(), b"LISTSCRIPTS\r\nGETSCR")
        self.assertEqual(parser.buffered, 0)

    def test_takeRemainingMidLine(self) -> None:
        """
        C{takeRemaining} refuses while a line is half parsed.
        """
        parser = LineParser()
        drive([b"X {5+}\r\nab"], parser)
        self.assertRaises(RuntimeError, parser.takeRemaining)


class WriterTests(SynchronousTestCase):
    """
    L{quoteString}, L{clientString} and L{formatValues}.
    """

    def test_quoteString(self) -> None:
        """
        Short strings are quoted with escapes; long ones or ones with CR,
        LF or NUL become C{{n}} literals.
        """
        self.assertEqual(quoteString(b'a"b\\c'), b'"a\\"b\\\\c"')
        self.assertEqual(quoteString(b"x" * 1024), b'"' + b"x" * 1024 + b'"')
        self.assertEqual(quoteString(b"x" * 1025), b"{1025}\r\n" + b"x" * 1025)
        self.assertEqual(quoteString(b"a\r\nb"), b"{4}\r\na\r\nb")
        self.assertEqual(quoteString(b"a\x00"), b"{2}\r\na\x00")

    def test_clientString(self) -> None:
        """
        A client sends long strings as C{{n+}} literals.
        """
        self.assertEqual(clientString(b"abc"), b'"abc"')
        self.assertEqual(clientString(b"x" * 1025), b"{1025+}\r\n" + b"x" * 1025)

    def test_formatValues(self) -> None:
        """
        Parsed values are written back in canonical syntax.
        """
        self.assertEqual(
            formatValues((A(b"OK"), (A(b"SASL"), b"abc="), b'Logged "in".')),
            b'OK (SASL "abc=") "Logged \\"in\\"."',
        )
        self.assertEqual(formatValues((A(b"OK"), b"a\nb")), b"OK {3}\r\na\nb")


SESSION = (
    b'CAPABILITY\r\n'
    b'NOOP "tag \\"1\\""\r\n'
    b'X \\ {5+}\r\nLOGOU T\r\n'
    b'AUTHENTICATE "PLAIN" {12+}\r\nAGEAc2VjcmV0\r\n'
    b'"c2VjcmV0"\r\n'
    b'{4}\r\n\r\n\r\n\r\n'
    b'OK (TAG {2}\r\nab) "Done"\n'
    b'\r\n'
    b'LOGOUT\r\n'
)

SESSION_EVENTS = [
    line(A(b"CAPABILITY")),
    line(A(b"NOOP"), b'tag "1"'),
    bad("Invalid characters in atom."),
    line(A(b"AUTHENTICATE"), b"PLAIN", b"AGEAc2VjcmV0"),
    line(b"c2VjcmV0"),
    line(b"\r\n\r\n"),
    line(A(b"OK"), (A(b"TAG"), b"ab"), b"Done"),
    line(),
    line(A(b"LOGOUT")),
]


def splits(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """
    C{data} cut at the positions C{cuts} (sorted).
    """
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


class ChunkingTests(SynchronousTestCase):
    """
    The events do not depend on how the input is split.
    """

    def test_sessionWhole(self) -> None:
        """
        A session with every kind of value parses as expected in one piece.
        """
        self.assertEqual(parse(SESSION), SESSION_EVENTS)

    def test_everySplit(self) -> None:
        """
        Cut at any one position, the session gives the same events.
        """
        for cut in range(len(SESSION) + 1):
            self.assertEqual(plain(drive(splits(SESSION, [cut]))), SESSION_EVENTS, cut)

    def test_everyTwoSplits(self) -> None:
        """
        Cut at any two positions, the session gives the same events.
        """
        for first in range(len(SESSION) + 1):
            for second in range(first, len(SESSION) + 1):
                self.assertEqual(
                    plain(drive(splits(SESSION, [first, second]))), SESSION_EVENTS, (first, second)
                )

    def test_byteByByte(self) -> None:
        """
        One octet at a time, the session gives the same events.
        """
        self.assertEqual(plain(drive([bytes([b]) for b in SESSION])), SESSION_EVENTS)

    def test_fatalEverySplit(self) -> None:
        """
        A line that is too long is fatal wherever the input is cut, after
        the same events.
        """
        data = b'NOOP "x"\r\nX {3+}\r\nabc ' + b"y" * 40 + b"\r\n"
        expected = [line(A(b"NOOP"), b"x"), fatal("Input buffer full.")]
        for cut in range(len(data) + 1):
            parser = LineParser(maxLineLength=30)
            self.assertEqual(plain(drive(splits(data, [cut]), parser)), expected, cut)


anyBytes = st.binary(max_size=1100)


class RoundTripTests(SynchronousTestCase):
    """
    Arbitrary octet strings survive writing and parsing, however the input
    is split.
    """

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(anyBytes, st.booleans()), min_size=1, max_size=3), st.data())
    def test_stringsRoundTrip(self, strings: list[tuple[bytes, bool]], data: st.DataObject) -> None:
        """
        Any octets, written as the client (L{clientString}) or the server
        (L{quoteString}) would, parse back to themselves as one line.
        """
        wire = b"X"
        for value, asClient in strings:
            wire += b" " + (clientString(value) if asClient else quoteString(value))
        wire += b"\r\n"
        cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8), label="cuts"))
        parser = LineParser(maxLiteralSize=4000)
        self.assertEqual(
            plain(drive(splits(wire, cuts), parser)), [line(A(b"X"), *(value for value, _ in strings))]
        )
