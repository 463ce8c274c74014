"""
Tests for L{mailproxy.pop3._parser}: commands, raw lines, limits, bad input,
and independence from how the input is split into chunks.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.pop3._parser import (
    INVALID,
    MAX_COMMAND_LINE,
    MAX_SASL_LINE,
    TOO_LONG,
    BadLine,
    Command,
    LineParser,
    RawLine,
)


def commands(*chunks: bytes) -> list[Command | BadLine]:
    """
    Feed C{chunks} one by one, reading every command after each; return
    all events.
    """
    parser = LineParser()
    events: list[Command | BadLine] = []
    for chunk in chunks:
        parser.feed(chunk)
        while (event := parser.nextCommand()) is not None:
            events.append(event)
    return events


def everySplit(data: bytes) -> list[list[Command | BadLine]]:
    """
    The events for C{data} fed whole, byte by byte, and split in two at
    every position.
    """
    results = [commands(data), commands(*(data[i : i + 1] for i in range(len(data))))]
    results += [commands(data[:i], data[i:]) for i in range(1, len(data))]
    return results


class CommandTests(SynchronousTestCase):
    """
    Command lines become L{Command}s.
    """

    def test_keywordAndArgument(self) -> None:
        """
        The keyword is upper-cased; the argument is everything after the
        first space, spaces and 8-bit octets kept.
        """
        self.assertEqual(
            commands(b"user alice@example.org\r\npass  s3 cr\xc3\xa9t \r\n"),
            [Command(b"USER", b"alice@example.org"), Command(b"PASS", b" s3 cr\xc3\xa9t ")],
        )

    def test_noArgument(self) -> None:
        """
        A line without a space has no argument; a line ending in a space has
        an empty one.
        """
        self.assertEqual(commands(b"CAPA\r\nPASS \r\n"), [Command(b"CAPA", None), Command(b"PASS", b"")])

    def test_bareLF(self) -> None:
        """
        A line may end with a bare LF.
        """
        self.assertEqual(commands(b"NOOP\nQUIT\n"), [Command(b"NOOP", None), Command(b"QUIT", None)])

    def test_emptyLine(self) -> None:
        """
        An empty line is a command with an empty keyword (unknown to
        everyone).
        """
        self.assertEqual(commands(b"\r\n"), [Command(b"", None)])

    def test_arguments(self) -> None:
        """
        L{Command.arguments} splits at spaces and drops empty pieces.
        """
        self.assertEqual(Command(b"AUTH", b"PLAIN  AGFh ").arguments(), [b"PLAIN", b"AGFh"])
        self.assertEqual(Command(b"AUTH", None).arguments(), [])
        self.assertEqual(Command(b"AUTH", b"").arguments(), [])

    def test_reprHidesArgument(self) -> None:
        """
        The argument (a password, maybe) is not in the repr.
        """
        text = repr(Command(b"PASS", b"Sup3rSecret"))
        self.assertNotIn("Sup3rSecret", text)
        self.assertIn("11 octets", text)
        self.assertNotIn("Sup3rSecret", repr(RawLine(b"Sup3rSecret")))

    def test_incomplete(self) -> None:
        """
        Nothing is reported until the line is complete.
        """
        parser = LineParser()
        parser.feed(b"USER alice")
        self.assertIsNone(parser.nextCommand())
        self.assertEqual(parser.buffered, 10)
        parser.feed(b"\r")
        self.assertIsNone(parser.nextCommand())
        parser.feed(b"\n")
        self.assertEqual(parser.nextCommand(), Command(b"USER", b"alice"))
        self.assertIsNone(parser.nextCommand())

    def test_chunking(self) -> None:
        """
        The events are the same however the input is split.
        """
        data = b"CAPA\r\nUSER a b\r\nPASS  x \nAUTH PLAIN =\r\nQ\x00IT\r\n" + b"X" * 1100 + b"\r\nNOOP\r\n"
        results = everySplit(data)
        self.assertEqual(
            results[0],
            [
                Command(b"CAPA", None),
                Command(b"USER", b"a b"),
                Command(b"PASS", b" x "),
                Command(b"AUTH", b"PLAIN ="),
                INVALID,
                TOO_LONG,
                Command(b"NOOP", None),
            ],
        )
        for result in results[1:]:
            self.assertEqual(result, results[0])

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.binary(max_size=60).filter(lambda b: not set(b) & {0, 10, 13}), max_size=6),
        st.lists(st.integers(min_value=0, max_value=400), max_size=5),
    )
    def test_roundTrip(self, lines: list[bytes], cuts: list[int]) -> None:
        """
        Any lines without CR, LF and NUL come back as the commands they
        spell, wherever the input is cut.
        """
        data = b"".join(line + b"\r\n" for line in lines)
        points = sorted({min(cut, len(data)) for cut in cuts})
        chunks = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
        expected = []
        for line in lines:
            name, space, argument = line.partition(b" ")
            expected.append(Command(name.upper(), argument if space else None))
        self.assertEqual(commands(*chunks), expected)


class LimitTests(SynchronousTestCase):
    """
    Lines longer than the limits are refused without being buffered.
    """

    def test_commandLimit(self) -> None:
        """
        A command line of 1024 octets with its CRLF is accepted; one of
        1025 is refused, and the next line is read normally.
        """
        longest = b"USER " + b"a" * (MAX_COMMAND_LINE - 7) + b"\r\n"
        self.assertEqual(len(longest), 1024)
        self.assertEqual(commands(longest), [Command(b"USER", b"a" * 1017)])
        for result in everySplit(b"USER " + b"a" * 1018 + b"\r\nNOOP\r\n"):
            self.assertEqual(result, [TOO_LONG, Command(b"NOOP", None)])

    def test_reportedBeforeTheEnd(self) -> None:
        """
        A line is refused as soon as 1024 octets without LF are buffered,
        and its rest is discarded as it arrives, however long.
        """
        parser = LineParser()
        parser.feed(b"x" * 1023)
        self.assertIsNone(parser.nextCommand())
        parser.feed(b"x")
        self.assertEqual(parser.nextCommand(), TOO_LONG)
        self.assertEqual(parser.buffered, 0)
        for _ in range(100):
            parser.feed(b"y" * 1000)
            self.assertIsNone(parser.nextCommand())
            self.assertEqual(parser.buffered, 0)
        parser.feed(b"yy\r\nNOOP\r\n")
        self.assertEqual(parser.nextCommand(), Command(b"NOOP", None))

    def test_authLineMayBeLonger(self) -> None:
        """
        An AUTH line may be as long as a SASL response line; longer, it is
        refused.
        """
        response = b"A" * (MAX_SASL_LINE - len(b"AUTH PLAIN \r\n"))
        self.assertEqual(commands(b"auth PLAIN " + response + b"\r\n"), [Command(b"AUTH", b"PLAIN " + response)])
        self.assertEqual(commands(b"AUTH PLAIN " + response + b"A\r\n"), [TOO_LONG])
        # Only AUTH: another keyword of the same length is held to 1024.
        self.assertEqual(commands(b"AUTO PLAIN " + b"A" * 1100 + b"\r\n"), [TOO_LONG])

    def test_rawLineLimit(self) -> None:
        """
        L{LineParser.nextLine} applies its own limit, terminator included.
        """
        parser = LineParser()
        parser.feed(b"abc\r\nabcd\r\nab\n")
        self.assertEqual(parser.nextLine(5), RawLine(b"abc"))
        self.assertEqual(parser.nextLine(5), TOO_LONG)
        self.assertEqual(parser.nextLine(5), RawLine(b"ab"))
        self.assertIsNone(parser.nextLine(5))


class BadInputTests(SynchronousTestCase):
    """
    Octets no POP3 line may carry.
    """

    def test_nul(self) -> None:
        """
        A line with a NUL is refused whole.
        """
        self.assertEqual(commands(b"PASS a\x00b\r\nNOOP\r\n"), [INVALID, Command(b"NOOP", None)])

    def test_innerCR(self) -> None:
        """
        A CR anywhere but before the LF is refused; so is a line ending in
        two CRs.
        """
        self.assertEqual(commands(b"USER a\rb\r\n"), [INVALID])
        self.assertEqual(commands(b"USER a\r\r\n"), [INVALID])

    def test_rawLineChecked(self) -> None:
        """
        Raw lines get the same checks.
        """
        parser = LineParser()
        parser.feed(b"YQ\x00==\r\n")
        self.assertEqual(parser.nextLine(), INVALID)


class ClearAndTakeTests(SynchronousTestCase):
    """
    Dropping input after STLS and handing it over after login.
    """

    def test_clear(self) -> None:
        """
        L{LineParser.clear} drops everything buffered.
        """
        parser = LineParser()
        parser.feed(b"USER evil\r\nPASS x\r\n")
        parser.clear()
        self.assertIsNone(parser.nextCommand())
        parser.feed(b"CAPA\r\n")
        self.assertEqual(parser.nextCommand(), Command(b"CAPA", None))

    def test_clearEndsDiscarding(self) -> None:
        """
        After L{LineParser.clear}, the rest of an overlong line is no longer
        being discarded: the next input is read from its start.
        """
        parser = LineParser()
        parser.feed(b"x" * 1100)
        self.assertEqual(parser.nextCommand(), TOO_LONG)
        parser.clear()
        parser.feed(b"NOOP\r\n")
        self.assertEqual(parser.nextCommand(), Command(b"NOOP", None))

    def test_takeRemaining(self) -> None:
        """
        L{LineParser.takeRemaining} returns the unparsed input, partial
        lines included, and empties the parser.
        """
        parser = LineParser()
        parser.feed(b"PASS x\r\nSTAT\r\nLIST")
        self.assertEqual(parser.nextCommand(), Command(b"PASS", b"x"))
        self.assertEqual(parser.takeRemaining(), b"STAT\r\nLIST")
        self.assertEqual(parser.buffered, 0)

    def test_takeRemainingWhileDiscarding(self) -> None:
        """
        The rest of an overlong line belongs to no one: taking the input
        then is an error.
        """
        parser = LineParser()
        parser.feed(b"x" * 1100)
        parser.nextCommand()
        self.assertRaises(RuntimeError, parser.takeRemaining)
