"""
Tests for L{mailproxy.imap._parser}.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from mailproxy.imap import _parser
from mailproxy.imap._parser import (
    MAX_LIST_DEPTH,
    Atom,
    BadCommand,
    Command,
    CommandParser,
    Event,
    Fatal,
    IMAPValue,
    LiteralRequest,
    RawLine,
)

Decide = Callable[[LiteralRequest], bool]


def acceptAll(request: LiteralRequest) -> bool:
    """
    A literal policy that accepts every synchronizing literal.
    """
    return True


def drive(
    chunks: Iterable[bytes], parser: CommandParser | None = None, decide: Decide = acceptAll
) -> list[Event]:
    """
    Feed C{chunks} one by one, pulling every event after each, and answer
    each L{LiteralRequest} as C{decide} says.

    @return: all events, in order.
    """
    if parser is None:
        parser = CommandParser()
    events: list[Event] = []
    for chunk in chunks:
        parser.feed(chunk)
        while True:
            event = parser.next()
            if event is None:
                break
            events.append(event)
            if isinstance(event, LiteralRequest):
                if decide(event):
                    parser.acceptLiteral()
                else:
                    parser.rejectLiteral()
            if isinstance(event, Fatal):
                return events
    return events


def plain(events: Iterable[Event | RawLine | None]) -> list[tuple[object, ...]]:
    """
    Events as plain tuples, so that a failed comparison shows the
    arguments that L{Command}'s C{repr} hides.
    """
    result: list[tuple[object, ...]] = []
    for event in events:
        if event is None:
            result.append((None,))
        elif isinstance(event, Command):
            result.append(("Command", event.tag, event.name, event.args))
        elif isinstance(event, RawLine):
            result.append(("RawLine", event.data))
        else:
            result.append((event,))
    return result


def parseAll(data: bytes, decide: Decide = acceptAll, **limits: int) -> list[tuple[object, ...]]:
    """
    Parse C{data} fed in one piece; see L{drive} and L{plain}.
    """
    return plain(drive([data], CommandParser(**limits), decide))


def command(tag: bytes, name: bytes, *args: IMAPValue) -> tuple[object, ...]:
    """
    The L{plain} form of a L{Command}.
    """
    return ("Command", tag, name, args)


def bad(tag: bytes | None, reason: str, code: str | None = None) -> tuple[object, ...]:
    """
    The L{plain} form of a L{BadCommand}.
    """
    return (BadCommand(tag, reason, code),)


def literalRequest(tag: bytes, size: int) -> tuple[object, ...]:
    """
    The L{plain} form of a L{LiteralRequest}.
    """
    return (LiteralRequest(tag, size),)


def fatal(reason: str) -> tuple[object, ...]:
    """
    The L{plain} form of a L{Fatal}.
    """
    return (Fatal(reason),)


NIL = Atom(b"NIL")


class AtomTests(SynchronousTestCase):
    """
    Commands, tags and atoms.
    """

    def test_noArguments(self) -> None:
        """
        A command without arguments gives a L{Command} with an empty
        C{args}; the name is upper-cased, the tag kept as sent.
        """
        self.assertEqual(parseAll(b"A001 noop\r\n"), [command(b"A001", b"NOOP")])

    def test_atoms(self) -> None:
        """
        Atoms become L{Atom} values with their case kept; C{]} and C{[} are
        allowed in them.
        """
        self.assertEqual(
            parseAll(b"a LOGIN User]x p[ss\r\n"),
            [command(b"a", b"LOGIN", Atom(b"User]x"), Atom(b"p[ss"))],
        )

    def test_nil(self) -> None:
        """
        C{NIL} is an atom like any other; a quoted C{"NIL"} is a string.
        """
        self.assertEqual(
            parseAll(b'a ID NIL\r\nb ID "NIL"\r\n'),
            [command(b"a", b"ID", NIL), command(b"b", b"ID", b"NIL")],
        )

    def test_tagChars(self) -> None:
        """
        A tag may hold any astring character but C{+}, including C{]}.
        """
        self.assertEqual(
            parseAll(b"a]1.x-y NOOP\r\n"), [command(b"a]1.x-y", b"NOOP")]
        )

    def test_invalidAtomChars(self) -> None:
        """
        C{%}, C{*}, C{\\}, control characters and 8-bit octets are not atom
        characters; the command is rejected with its tag and the session
        goes on.
        """
        for arg in [b"a%b", b"a*", b"\\Seen", b"a\x01b", b"a\x7f", b"j\xc3\xb6rg", b'a"b"']:
            self.assertEqual(
                parseAll(b"t LOGIN " + arg + b" pass\r\nu NOOP\r\n"),
                [bad(b"t", "Invalid characters in atom"), command(b"u", b"NOOP")],
                arg,
            )

    def test_invalidCommandName(self) -> None:
        """
        A command name that is not an atom, or runs into something else
        than a space, is rejected with the tag.
        """
        self.assertEqual(
            parseAll(b'a "LOGIN" x y\r\nb NO%OP\r\nc LOGIN"u" p\r\n'),
            [
                bad(b"a", "Invalid command name"),
                bad(b"b", "Invalid command name"),
                bad(b"c", "Invalid command name"),
            ],
        )

    def test_missingTag(self) -> None:
        """
        A line that does not start with a valid tag is rejected without
        one: a leading space, a C{+} or C{*} tag, or a special character.
        """
        for line in [b" a NOOP", b"+ NOOP", b"* NOOP", b"a+b NOOP", b"(a) NOOP", b"\xc3\xa9 NOOP"]:
            self.assertEqual(
                parseAll(line + b"\r\n"), [bad(None, "Invalid tag")], line
            )

    def test_missingCommand(self) -> None:
        """
        A tag alone, with or without trailing spaces, is a missing command.
        """
        self.assertEqual(
            parseAll(b"LOGIN\r\nabc  \r\n"),
            [bad(b"LOGIN", "Missing command"), bad(b"abc", "Missing command")],
        )

    def test_emptyLine(self) -> None:
        """
        An empty line is rejected without a tag; the next line is parsed.
        """
        self.assertEqual(
            parseAll(b"\r\n\na NOOP\r\n"),
            [bad(None, "Empty command line"), bad(None, "Empty command line"), command(b"a", b"NOOP")],
        )

    def test_spaces(self) -> None:
        """
        Runs of spaces separate tokens; spaces next to parentheses and at
        the end of the line are ignored.
        """
        self.assertEqual(
            parseAll(b'a   ID  (  "k"   "v"  )  \r\nb LOGIN  u   p \r\n'),
            [command(b"a", b"ID", (b"k", b"v")), command(b"b", b"LOGIN", Atom(b"u"), Atom(b"p"))],
        )

    def test_missingSpace(self) -> None:
        """
        Two values with nothing between them are an error.
        """
        for line in [b'a LOGIN "u""p"', b'a LOGIN "u"p', b"a ID (a)(b)", b"a ID (a)b"]:
            self.assertEqual(
                parseAll(line + b"\r\n"),
                [bad(b"a", "Missing space between arguments")],
                line,
            )

    def test_bareLF(self) -> None:
        """
        A bare LF ends a line like CRLF does, also after a literal's size.
        """
        self.assertEqual(
            parseAll(b"a NOOP\nb LOGIN {1}\nu p\n"),
            [
                command(b"a", b"NOOP"),
                literalRequest(b"b", 1),
                command(b"b", b"LOGIN", b"u", Atom(b"p")),
            ],
        )

    def test_bareCR(self) -> None:
        """
        A CR that is not followed by LF is a control character, not a line
        end.
        """
        self.assertEqual(
            parseAll(b"a LOGIN u\rp x\r\n"), [bad(b"a", "Invalid characters in atom")]
        )

    def test_reprHidesArguments(self) -> None:
        """
        The C{repr} of a L{Command} and of a L{RawLine} does not show the
        arguments or the line, which may hold a password.
        """
        cmd = Command(b"a", b"LOGIN", (Atom(b"user"), b"sekrit"))
        self.assertNotIn("sekrit", repr(cmd))
        self.assertIn("LOGIN", repr(cmd))
        self.assertNotIn("sekrit", repr(RawLine(b"sekrit")))


class QuotedTests(SynchronousTestCase):
    """
    Quoted strings.
    """

    def test_quoted(self) -> None:
        """
        A quoted string becomes L{bytes}; C{\\"} and C{\\\\} are unescaped;
        spaces, parentheses and braces inside are plain characters.
        """
        self.assertEqual(
            parseAll(b'a LOGIN "us er" "p\\"a\\\\s(s){3}"\r\n'),
            [command(b"a", b"LOGIN", b"us er", b'p"a\\s(s){3}')],
        )

    def test_empty(self) -> None:
        """
        C{""} is the empty string.
        """
        self.assertEqual(parseAll(b'a LOGIN "" ""\r\n'), [command(b"a", b"LOGIN", b"", b"")])

    def test_utf8(self) -> None:
        """
        8-bit octets (UTF-8) are accepted in quoted strings as they are.
        """
        user = "jörg@exämple.org".encode()
        password = "pässwörd€".encode()
        self.assertEqual(
            parseAll(b'a LOGIN "' + user + b'" "' + password + b'"\r\n'),
            [command(b"a", b"LOGIN", user, password)],
        )

    def test_controlCharacters(self) -> None:
        """
        Control characters other than CR, LF and NUL are accepted, as in
        RFC 3501's QUOTED-CHAR.
        """
        self.assertEqual(
            parseAll(b'a LOGIN "u\tx\x01\x7f" p\r\n'),
            [command(b"a", b"LOGIN", b"u\tx\x01\x7f", Atom(b"p"))],
        )

    def test_badEscape(self) -> None:
        """
        A backslash before anything but C{"} or C{\\} is rejected, also at
        the end of the line.
        """
        for quoted in [b'"a\\nb"', b'"\\x"', b'"ab\\']:
            self.assertEqual(
                parseAll(b"a LOGIN " + quoted + b" p\r\nb NOOP\r\n"),
                [bad(b"a", "Invalid escape in quoted string"), command(b"b", b"NOOP")],
                quoted,
            )

    def test_forbiddenOctets(self) -> None:
        """
        NUL and a bare CR inside a quoted string are rejected.
        """
        for quoted in [b'"a\x00b"', b'"a\rb"']:
            self.assertEqual(
                parseAll(b"a LOGIN " + quoted + b" p\r\n"),
                [bad(b"a", "Invalid character in quoted string")],
                quoted,
            )

    def test_unterminated(self) -> None:
        """
        A quoted string does not run over the end of the line.
        """
        self.assertEqual(
            parseAll(b'a LOGIN "user pass\r\nb NOOP "x"\r\n'),
            [bad(b"a", "Missing closing quote"), command(b"b", b"NOOP", b"x")],
        )


class LiteralTests(SynchronousTestCase):
    """
    Synchronizing and non-synchronizing literals.
    """

    def test_synchronizingRequest(self) -> None:
        """
        A synchronizing literal gives a L{LiteralRequest} as soon as its
        line is complete, and nothing more until the caller answers it;
        after L{CommandParser.acceptLiteral} the octets and the rest of the
        line follow.
        """
        parser = CommandParser()
        parser.feed(b"a LOGIN {4}\r\n")
        self.assertEqual(parser.next(), LiteralRequest(b"a", 4))
        self.assertRaises(RuntimeError, parser.next)
        parser.acceptLiteral()
        self.assertIsNone(parser.next())
        parser.feed(b"us")
        self.assertIsNone(parser.next())
        parser.feed(b"er pass\r\n")
        self.assertEqual(
            plain([parser.next()]),
            [command(b"a", b"LOGIN", b"user", Atom(b"pass"))],
        )
        self.assertIsNone(parser.next())
        self.assertEqual(parser.buffered, 0)

    def test_answerWithoutRequest(self) -> None:
        """
        Accepting or rejecting a literal that was not requested is a
        programming error.
        """
        parser = CommandParser()
        self.assertRaises(RuntimeError, parser.acceptLiteral)
        self.assertRaises(RuntimeError, parser.rejectLiteral)

    def test_positions(self) -> None:
        """
        A literal may be the first, a middle or the last argument, and
        inside a list; octets may be anything but NUL, CR and LF included.
        """
        self.assertEqual(
            parseAll(
                b"a LOGIN {2}\r\nu\r {1}\r\np\r\n"
                b'b ID ("k" {2}\r\nv\n "k2" "v2")\r\n'
                b"c LOGIN u {3}\r\n( )\r\n"
            ),
            [
                literalRequest(b"a", 2),
                literalRequest(b"a", 1),
                command(b"a", b"LOGIN", b"u\r", b"p"),
                literalRequest(b"b", 2),
                command(b"b", b"ID", (b"k", b"v\n", b"k2", b"v2")),
                literalRequest(b"c", 3),
                command(b"c", b"LOGIN", Atom(b"u"), b"( )"),
            ],
        )

    def test_nonSynchronizing(self) -> None:
        """
        A non-synchronizing literal's octets follow at once, without a
        L{LiteralRequest}, at any position and mixed with synchronizing
        ones.
        """
        self.assertEqual(
            parseAll(
                b"a LOGIN {4+}\r\nuser {4+}\r\npass\r\n"
                b'b ID ("k" {1+}\r\nv)\r\n'
                b"c LOGIN {1}\r\nu {1+}\r\np\r\n"
            ),
            [
                command(b"a", b"LOGIN", b"user", b"pass"),
                command(b"b", b"ID", (b"k", b"v")),
                literalRequest(b"c", 1),
                command(b"c", b"LOGIN", b"u", b"p"),
            ],
        )

    def test_empty(self) -> None:
        """
        C{{0}} and C{{0+}} are empty strings; the synchronizing one is still
        announced.
        """
        self.assertEqual(
            parseAll(b"a LOGIN {0}\r\n {0+}\r\n\r\n"),
            [literalRequest(b"a", 0), command(b"a", b"LOGIN", b"", b"")],
        )

    def test_leadingZeros(self) -> None:
        """
        A size with leading zeros is read as a number.
        """
        self.assertEqual(
            parseAll(b"a LOGIN {0003+}\r\nabc x\r\n"),
            [command(b"a", b"LOGIN", b"abc", Atom(b"x"))],
        )

    def test_reject(self) -> None:
        """
        After L{CommandParser.rejectLiteral} the command is dropped and what
        follows is a new command.
        """
        self.assertEqual(
            parseAll(b"a LOGIN {4}\r\nb NOOP\r\n", decide=lambda request: False),
            [literalRequest(b"a", 4), command(b"b", b"NOOP")],
        )

    def test_rejectSecond(self) -> None:
        """
        Rejecting the second literal of a command drops the whole command,
        including the first literal.
        """
        answers = iter([True, False])
        self.assertEqual(
            parseAll(
                b"a LOGIN {4}\r\nuser {4}\r\nb NOOP\r\n",
                decide=lambda request: next(answers),
            ),
            [literalRequest(b"a", 4), literalRequest(b"a", 4), command(b"b", b"NOOP")],
        )

    def test_nul(self) -> None:
        """
        A NUL octet in a literal makes the command bad; the rest of its line
        is consumed.
        """
        self.assertEqual(
            parseAll(b"a LOGIN {3+}\r\nu\x00v p {2+}\r\nxy\r\nb NOOP\r\n"),
            [bad(b"a", "NUL octet in literal"), command(b"b", b"NOOP")],
        )

    def test_notAtEndOfLine(self) -> None:
        """
        A literal's size must be the last thing on its line.
        """
        self.assertEqual(
            parseAll(b"a LOGIN {4} x\r\nb NOOP\r\n"),
            [bad(b"a", "Literal must end the line"), command(b"b", b"NOOP")],
        )

    def test_invalidSize(self) -> None:
        """
        A brace without a valid size is rejected.
        """
        for line in [b"a LOGIN {}", b"a LOGIN {x}", b"a LOGIN {-1}", b"a LOGIN {1", b"a LOGIN {1++}"]:
            self.assertEqual(parseAll(line + b"\r\n"), [bad(b"a", "Invalid literal")], line)

    def test_tooBigSynchronizing(self) -> None:
        """
        A synchronizing literal over C{maxLiteralSize} is rejected with
        C{TOOBIG}, without asking the caller; the client sends no octets,
        so the next line is a new command. Exactly the limit is fine.
        """
        self.assertEqual(
            parseAll(
                b"a LOGIN {11}\r\nb LOGIN {10}\r\n0123456789 p\r\n",
                maxLiteralSize=10,
            ),
            [
                bad(b"a", "Literal too big", "TOOBIG"),
                literalRequest(b"b", 10),
                command(b"b", b"LOGIN", b"0123456789", Atom(b"p")),
            ],
        )

    def test_tooBigTotal(self) -> None:
        """
        The literals of one command share C{maxLiteralSize}.
        """
        self.assertEqual(
            parseAll(b"a LOGIN {6}\r\nuser12 {5}\r\nb NOOP\r\n", maxLiteralSize=10),
            [
                literalRequest(b"a", 6),
                bad(b"a", "Literal too big", "TOOBIG"),
                command(b"b", b"NOOP"),
            ],
        )

    def test_tooBigNonSynchronizing(self) -> None:
        """
        A non-synchronizing literal over C{maxLiteralSize} is fatal: its
        octets are already on the way and cannot be told from commands.
        After that, input is ignored and the same L{Fatal} is repeated.
        """
        parser = CommandParser(maxLiteralSize=10)
        parser.feed(b"a NOOP\r\nb LOGIN {11+}\r\n0123456789x p\r\n")
        self.assertEqual(plain([parser.next()]), [command(b"a", b"NOOP")])
        self.assertEqual(parser.next(), Fatal("Literal too big"))
        self.assertEqual(parser.buffered, 0)
        parser.feed(b"c NOOP\r\n")
        self.assertEqual(parser.buffered, 0)
        self.assertEqual(parser.next(), Fatal("Literal too big"))

    def test_absurdSize(self) -> None:
        """
        A size with very many digits is simply too big, for both kinds.
        """
        digits = b"9" * 30
        self.assertEqual(
            parseAll(b"a LOGIN {" + digits + b"}\r\nb LOGIN {" + digits + b"+}\r\n"),
            [bad(b"a", "Literal too big", "TOOBIG"), fatal("Literal too big")],
        )

    def test_absurdZeros(self) -> None:
        """
        Many leading zeros do not make a small size too big.
        """
        self.assertEqual(
            parseAll(b"a LOGIN {" + b"0" * 40 + b"2+}\r\nab c\r\n"),
            [command(b"a", b"LOGIN", b"ab", Atom(b"c"))],
        )


class BadCommandTests(SynchronousTestCase):
    """
    A bad command is consumed whole, literals included.
    """

    def test_skipsNonSynchronizingLiterals(self) -> None:
        """
        The octets of non-synchronizing literals that follow a syntax error
        are skipped, not parsed as commands, even if they look like some.
        """
        self.assertEqual(
            parseAll(b"a LOGIN % {8+}\r\nb NOOP\r\n {10+}\r\nc LOGOUT\r\n\r\nd NOOP\r\n"),
            [bad(b"a", "Invalid characters in atom"), command(b"d", b"NOOP")],
        )

    def test_stopsAtSynchronizingLiteral(self) -> None:
        """
        A bad command whose line ends in a synchronizing literal is
        reported without a L{LiteralRequest}: the client then sends nothing
        more of it.
        """
        self.assertEqual(
            parseAll(b"a LOGIN % {8}\r\nb NOOP\r\n"),
            [bad(b"a", "Invalid characters in atom"), command(b"b", b"NOOP")],
        )

    def test_tooBigWhileSkipping(self) -> None:
        """
        An over-size non-synchronizing literal is fatal in a bad command too.
        """
        self.assertEqual(
            parseAll(b"a LOGIN % {11+}\r\n", maxLiteralSize=10),
            [fatal("Literal too big")],
        )


class ListTests(SynchronousTestCase):
    """
    Parenthesised lists, as ID uses them.
    """

    def test_id(self) -> None:
        """
        ID's list of pairs becomes a tuple; C{NIL} values are atoms.
        """
        self.assertEqual(
            parseAll(b'a ID ("name" "Thunderbird" "version" NIL)\r\n'),
            [command(b"a", b"ID", (b"name", b"Thunderbird", b"version", NIL))],
        )

    def test_emptyAndNested(self) -> None:
        """
        Lists may be empty and nested.
        """
        self.assertEqual(
            parseAll(b"a X () ((a) (b ())) c\r\n"),
            [command(b"a", b"X", (), ((Atom(b"a"),), (Atom(b"b"), ())), Atom(b"c"))],
        )

    def test_depthLimit(self) -> None:
        """
        Lists may nest L{MAX_LIST_DEPTH} deep, not deeper.
        """
        deepest = b"(" * MAX_LIST_DEPTH + b")" * MAX_LIST_DEPTH
        value: IMAPValue = ()
        for _ in range(MAX_LIST_DEPTH - 1):
            value = (value,)
        self.assertEqual(
            parseAll(b"a ID " + deepest + b"\r\nb ID (" + deepest + b")\r\n"),
            [command(b"a", b"ID", value), bad(b"b", "Lists nested too deeply")],
        )

    def test_unbalanced(self) -> None:
        """
        A list must be closed on its line, and a C{)} must close one.
        """
        self.assertEqual(
            parseAll(b'a ID ("k" "v"\r\nb ID "k")\r\nc ID )\r\n'),
            [
                bad(b"a", "Missing ')'"),
                bad(b"b", "Unexpected ')'"),
                bad(b"c", "Unexpected ')'"),
            ],
        )


class LimitTests(SynchronousTestCase):
    """
    Line length limits and what the parser holds.
    """

    def test_exactLimit(self) -> None:
        """
        A line of exactly C{maxLineLength} octets (terminator excluded) is
        accepted.
        """
        line = b"a LOGIN u " + b"p" * 10
        self.assertEqual(
            parseAll(line + b"\r\n", maxLineLength=len(line)),
            [command(b"a", b"LOGIN", Atom(b"u"), Atom(b"p" * 10))],
        )

    def test_longLineFatalBeforeCRLF(self) -> None:
        """
        As soon as the buffered part of a line is longer than
        C{maxLineLength}, L{CommandParser.next} answers L{Fatal}, without
        waiting for a CRLF that may never come; the buffer is dropped.
        """
        parser = CommandParser(maxLineLength=20)
        parser.feed(b"a LOGIN u " + b"p" * 10)
        self.assertIsNone(parser.next())
        parser.feed(b"\r")
        self.assertIsNone(parser.next())
        parser.feed(b"p")
        self.assertEqual(parser.next(), Fatal("Input buffer full"))
        self.assertEqual(parser.buffered, 0)

    def test_segmentsCountTogether(self) -> None:
        """
        The line segments of one command count together against
        C{maxLineLength}; literal octets and terminators do not.
        """
        first = b"a LOGIN {10+}"
        events = parseAll(
            first + b"\r\n" + b"x" * 10 + b" " + b"p" * (19 - len(first)) + b"\r\n",
            maxLineLength=20,
        )
        self.assertEqual(events, [command(b"a", b"LOGIN", b"x" * 10, Atom(b"p" * (19 - len(first))))])
        events = parseAll(
            first + b"\r\n" + b"x" * 10 + b" " + b"p" * (20 - len(first)),
            maxLineLength=20,
        )
        self.assertEqual(events, [fatal("Input buffer full")])

    def test_boundedBuffer(self) -> None:
        """
        Fed one octet at a time with a command that never ends, the parser
        never holds more than C{maxLineLength + maxLiteralSize} octets and
        ends with L{Fatal}.
        """
        parser = CommandParser(maxLineLength=100, maxLiteralSize=50)
        stream = b"a LOGIN {50+}\r\n" + b"x" * 50 + (b" {0+}\r\n" * 20) + b"y" * 200
        largest = 0
        result = None
        for i in range(len(stream)):
            parser.feed(stream[i : i + 1])
            largest = max(largest, parser.buffered)
            result = parser.next()
            if result is not None:
                break
        self.assertEqual(result, Fatal("Input buffer full"))
        self.assertLessEqual(largest, 150)

    def test_longBadLine(self) -> None:
        """
        The limit holds for a command already known to be bad.
        """
        self.assertEqual(
            parseAll(b"a LOGIN % {1+}\r\nx" + b"y" * 30, maxLineLength=20),
            [fatal("Input buffer full")],
        )


class RawLineTests(SynchronousTestCase):
    """
    L{CommandParser.nextLine}, for SASL responses.
    """

    def test_lines(self) -> None:
        """
        Raw lines come back without their terminator, CRLF or bare LF, and
        unparsed; commands after them are parsed again.
        """
        parser = CommandParser()
        parser.feed(b'a AUTHENTICATE PLAIN\r\nAHVzZXIAcGFzcw==\r\n\n* "x\r\nb NOOP\r\n')
        events: list[Event | RawLine | None] = [parser.next()]
        events += [parser.nextLine(100) for _ in range(3)]
        events.append(parser.next())
        self.assertEqual(
            plain(events),
            [
                command(b"a", b"AUTHENTICATE", Atom(b"PLAIN")),
                ("RawLine", b"AHVzZXIAcGFzcw=="),
                ("RawLine", b""),
                ("RawLine", b'* "x'),
                command(b"b", b"NOOP"),
            ],
        )

    def test_incomplete(self) -> None:
        """
        Without a line end, L{CommandParser.nextLine} needs more data.
        """
        parser = CommandParser()
        parser.feed(b"AHVz")
        self.assertIsNone(parser.nextLine(100))
        parser.feed(b"ZXI=\r")
        self.assertIsNone(parser.nextLine(100))
        parser.feed(b"\n")
        self.assertEqual(parser.nextLine(100), RawLine(b"AHVzZXI="))

    def test_tooLong(self) -> None:
        """
        A raw line longer than C{maxLength} is fatal as soon as that is
        known; exactly C{maxLength} is fine.
        """
        parser = CommandParser()
        parser.feed(b"x" * 10 + b"\r\n")
        self.assertEqual(parser.nextLine(10), RawLine(b"x" * 10))
        parser.feed(b"y" * 11)
        self.assertEqual(parser.nextLine(10), Fatal("Input buffer full"))
        self.assertEqual(parser.buffered, 0)

    def test_ownLimit(self) -> None:
        """
        C{maxLength} applies instead of C{maxLineLength}, so SASL lines may
        be longer than command lines.
        """
        parser = CommandParser(maxLineLength=10)
        parser.feed(b"z" * 30 + b"\r\n")
        self.assertEqual(parser.nextLine(30), RawLine(b"z" * 30))

    def test_midCommand(self) -> None:
        """
        Raw lines cannot be read while a command is in progress.
        """
        parser = CommandParser()
        parser.feed(b"a LOGIN {4}\r\n")
        parser.next()
        self.assertRaises(RuntimeError, parser.nextLine, 100)


class ClearTests(SynchronousTestCase):
    """
    L{CommandParser.clear}, the STARTTLS injection defence.
    """

    def test_dropsPipelined(self) -> None:
        """
        Commands buffered behind the one just parsed are dropped.
        """
        parser = CommandParser()
        parser.feed(b"a STARTTLS\r\nb LOGIN evil pass\r\n")
        self.assertEqual(plain([parser.next()]), [command(b"a", b"STARTTLS")])
        parser.clear()
        self.assertEqual(parser.buffered, 0)
        self.assertIsNone(parser.next())

    def test_midCommand(self) -> None:
        """
        A partial command, in its first line or after a literal, is dropped;
        the next input is a new command.
        """
        parser = CommandParser()
        parser.feed(b"a LOGIN us")
        self.assertIsNone(parser.next())
        parser.clear()
        parser.feed(b"b NOOP\r\n")
        self.assertEqual(plain([parser.next()]), [command(b"b", b"NOOP")])
        parser.feed(b"c LOGIN {3+}\r\nabc (x")
        self.assertIsNone(parser.next())
        parser.clear()
        parser.feed(b"d NOOP\r\n")
        self.assertEqual(plain([parser.next()]), [command(b"d", b"NOOP")])

    def test_pendingLiteral(self) -> None:
        """
        A L{LiteralRequest} left unanswered is forgotten.
        """
        parser = CommandParser()
        parser.feed(b"a LOGIN {3}\r\n")
        self.assertEqual(parser.next(), LiteralRequest(b"a", 3))
        parser.clear()
        self.assertRaises(RuntimeError, parser.acceptLiteral)
        parser.feed(b"b NOOP\r\n")
        self.assertEqual(plain([parser.next()]), [command(b"b", b"NOOP")])


class TakeRemainingTests(SynchronousTestCase):
    """
    L{CommandParser.takeRemaining}, for the hand-over to a backend.
    """

    def test_takesUnparsed(self) -> None:
        """
        The input after the last command pulled comes back unparsed, and
        the parser is left empty.
        """
        parser = CommandParser()
        parser.feed(b"a LOGIN u p\r\nb SELECT {5+}\r\nINBOX\r\nc NO")
        self.assertEqual(plain([parser.next()]), [command(b"a", b"LOGIN", Atom(b"u"), Atom(b"p"))])
        self.assertEqual(parser.takeRemaining(), b"b SELECT {5+}\r\nINBOX\r\nc NO")
        self.assertEqual(parser.buffered, 0)
        self.assertIsNone(parser.next())

    def test_midCommand(self) -> None:
        """
        Input cannot be taken while a command is in progress.
        """
        parser = CommandParser()
        parser.feed(b"a LOGIN {1+}\r\n")
        self.assertIsNone(parser.next())
        self.assertRaises(RuntimeError, parser.takeRemaining)


SESSION = (
    b'A1 ID ("name" "Thunder\\"bird" "version" NIL ("x" {2+}\r\nab))\r\n'
    b"A2 CAPABILITY\n"
    b"\r\n"
    b"A3 LOGIN {4}\r\n"
    b"user {8}\r\n"
    b"p\x00ss word\r\n"
    b"A4 LOGIN {4}\r\n"
    b"A5 LOGIN {5+}\r\nj\xc3\xb6rg {0}\r\n \r\n"
    b'A6 LOGIN "j\xc3\xb6rg" "pa\\ss"\r\n'
    b"A7 LOGIN % {3+}\r\nx\r\n {2}\r\n"
    b"A8 LOGIN {9999}\r\n"
    b'A9 LOGIN "user" {4+}\r\npass\r\n'
    b"* NOOP\r\n"
    b"A10 AUTHENTICATE PLAIN\r\n"
    b"AHVzZXIAcGFzcw==\r\n"
    b"A11 LOGOUT\r\n"
)
"""
A session with most kinds of events. The literal of C{A4} is rejected (see
L{rejectA4}), so C{A5} is the next command. The line after C{A10} is a raw
line.
"""


def rejectA4(request: LiteralRequest) -> bool:
    """
    Reject the literal of C{A4}, accept all others.
    """
    return request.tag != b"A4"


def driveSession(chunks: Iterable[bytes], limit: int = 8192) -> list[tuple[object, ...]]:
    """
    Feed C{chunks} of L{SESSION} (or any input) and pull everything,
    answering literals with L{rejectA4} and reading one raw line after an
    C{AUTHENTICATE} command.
    """
    parser = CommandParser(maxLineLength=limit, maxLiteralSize=limit)
    events: list[Event | RawLine] = []
    rawMode = False
    for chunk in chunks:
        parser.feed(chunk)
        while True:
            event: Event | RawLine | None
            if rawMode:
                event = parser.nextLine(limit)
                rawMode = event is None
            else:
                event = parser.next()
            if event is None:
                break
            events.append(event)
            if isinstance(event, Command) and event.name == b"AUTHENTICATE":
                rawMode = True
            elif isinstance(event, LiteralRequest):
                if rejectA4(event):
                    parser.acceptLiteral()
                else:
                    parser.rejectLiteral()
            elif isinstance(event, Fatal):
                return plain(events)
    return plain(events)


class ChunkingTests(SynchronousTestCase):
    """
    The events do not depend on how the input is split.
    """

    def test_sessionWhole(self) -> None:
        """
        L{SESSION} fed in one piece gives the expected events.
        """
        self.assertEqual(
            driveSession([SESSION]),
            [
                command(
                    b"A1",
                    b"ID",
                    (b"name", b'Thunder"bird', b"version", NIL, (b"x", b"ab")),
                ),
                command(b"A2", b"CAPABILITY"),
                bad(None, "Empty command line"),
                literalRequest(b"A3", 4),
                literalRequest(b"A3", 8),
                bad(b"A3", "NUL octet in literal"),
                literalRequest(b"A4", 4),
                literalRequest(b"A5", 0),
                command(b"A5", b"LOGIN", "jörg".encode(), b""),
                bad(b"A6", "Invalid escape in quoted string"),
                bad(b"A7", "Invalid characters in atom"),
                bad(b"A8", "Literal too big", "TOOBIG"),
                command(b"A9", b"LOGIN", b"user", b"pass"),
                bad(None, "Invalid tag"),
                command(b"A10", b"AUTHENTICATE", Atom(b"PLAIN")),
                ("RawLine", b"AHVzZXIAcGFzcw=="),
                command(b"A11", b"LOGOUT"),
            ],
        )

    def test_everySplit(self) -> None:
        """
        L{SESSION} split in two at every byte boundary gives the same events
        as fed whole.
        """
        expected = driveSession([SESSION])
        for i in range(len(SESSION) + 1):
            self.assertEqual(driveSession([SESSION[:i], SESSION[i:]]), expected, i)

    def test_everyTwoSplits(self) -> None:
        """
        L{SESSION} split in three at every pair of byte boundaries around
        its literals gives the same events as fed whole.
        """
        expected = driveSession([SESSION])
        start = SESSION.index(b"A3")
        end = SESSION.index(b"A8")
        for i in range(start, end):
            for j in range(i, end):
                self.assertEqual(
                    driveSession([SESSION[:i], SESSION[i:j], SESSION[j:]]), expected, (i, j)
                )

    def test_byteByByte(self) -> None:
        """
        L{SESSION} fed one octet at a time gives the same events as fed
        whole.
        """
        self.assertEqual(
            driveSession([SESSION[i : i + 1] for i in range(len(SESSION))]),
            driveSession([SESSION]),
        )

    def test_fatalEverySplit(self) -> None:
        """
        A session that ends in an over-long line gives the same events,
        ending in L{Fatal}, however it is split.
        """
        stream = SESSION + b"B1 LOGIN {3+}\r\nabc " + b"x" * 60 + b"\r\nB2 NOOP\r\n"
        expected = driveSession([stream], limit=60)
        self.assertEqual(expected[-1], fatal("Input buffer full"))
        self.assertEqual(len(expected), len(driveSession([SESSION], limit=60)) + 1)
        for i in range(len(stream) + 1):
            self.assertEqual(driveSession([stream[:i], stream[i:]], limit=60), expected, i)
        self.assertEqual(
            driveSession([stream[i : i + 1] for i in range(len(stream))], limit=60), expected
        )


def quote(value: bytes) -> bytes:
    """
    Encode C{value} as a quoted string.
    """
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def encode(value: bytes, how: str) -> tuple[bytes, IMAPValue, int | None]:
    """
    Encode C{value} as an IMAP string.

    @param how: C{"atom"} (if C{value} is a valid atom other than NIL),
        C{"quoted"}, C{"sync"} or C{"nonsync"}.
    @return: the wire form, the value the parser should give, and the size
        of the L{LiteralRequest} it causes, if any.
    """
    if how == "atom":
        if value and value.upper() != b"NIL" and all(
            0x20 < c < 0x7F and c not in b'(){%*"\\' for c in value
        ):
            return value, Atom(value), None
        how = "quoted"
    if how == "quoted":
        return quote(value), value, None
    if how == "sync":
        return b"{%d}\r\n" % (len(value),) + value, value, len(value)
    return b"{%d+}\r\n" % (len(value),) + value, value, None


safeBytes = st.binary(max_size=40).map(lambda b: b.translate(None, b"\r\n\x00"))
encodings = st.sampled_from(["atom", "quoted", "sync", "nonsync"])
tags = st.from_regex(rb"\A[A-Za-z0-9.\]-]{1,8}\Z")


@st.composite
def logins(draw: st.DrawFn) -> tuple[bytes, list[tuple[object, ...]]]:
    """
    One LOGIN command with random arguments in random encodings, and the
    events it should give.
    """
    tag = draw(tags)
    wire = tag + b" login"
    expected: list[tuple[object, ...]] = []
    args: list[IMAPValue] = []
    for _ in range(2):
        encoded, value, request = encode(draw(safeBytes), draw(encodings))
        wire += b" " + encoded
        args.append(value)
        if request is not None:
            expected.append(literalRequest(tag, request))
    wire += draw(st.sampled_from([b"\r\n", b"\n"]))
    expected.append(command(tag, b"LOGIN", *args))
    return wire, expected


class RoundTripTests(SynchronousTestCase):
    """
    Arbitrary credentials survive encoding and parsing, however the input
    is split.
    """

    @settings(max_examples=300, deadline=None)
    @given(st.lists(logins(), min_size=1, max_size=4), st.data())
    def test_loginRoundTrip(
        self, commands: list[tuple[bytes, list[tuple[object, ...]]]], data: st.DataObject
    ) -> None:
        """
        LOGIN commands whose arguments are arbitrary octet strings (no CR,
        LF or NUL) as atoms, quoted strings or literals of both kinds parse
        back to the same strings, whatever the chunk boundaries.
        """
        stream = b"".join(wire for wire, _ in commands)
        expected = [event for _, events in commands for event in events]
        cuts = sorted(
            data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts")
        )
        bounds = [0, *cuts, len(stream)]
        chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
        self.assertEqual(plain(drive(chunks)), expected)


#: Arguments the whole-line match takes or could be mistaken to take
#: (quoted strings with escapes), and others it must leave to the general
#: parser (lists, literals, stray octets).
_SIMPLE_PIECES = [b"a", b"LOGIN", b"NIL", b"x]y", b'"pw"', b'""', b'"a b"', b'"\xc3\xa9"', b'"\\""', b'"\\\\"', b'"a\\\\b"']
_OTHER_PIECES = [
    b"*", b"+", b"b%", b"\xc3\xa9", b"\x01", b'"open', b'"x"y', b"(", b")", b'("name" "x")', b"{3}", b"{3+}", b"{",
    b"\\", b"\r",
]


class SimpleCommandTests(SynchronousTestCase):
    """
    A command line of a tag, a name, atoms and quoted strings without
    escapes (most logins) is matched whole by one regular expression:
    every line parses to the same events as through the general parser.
    """

    @staticmethod
    def general(line: bytes) -> list[tuple[object, ...]]:
        """
        C{line} parsed with the whole-line match turned off.
        """
        parser = CommandParser()
        original = _parser._SIMPLE_COMMAND
        _parser._SIMPLE_COMMAND = re.compile(rb"(?!)")
        try:
            return plain(drive([line], parser))
        finally:
            _parser._SIMPLE_COMMAND = original

    def test_login(self) -> None:
        """
        A login of an atom and a quoted string, and one with trailing
        spaces, parse as the general parser has them.
        """
        for line in (b'a LOGIN bench0 "pw"\r\n', b'tag login "" x]y   \r\n', b"a NOOP\n"):
            self.assertEqual(parseAll(line), self.general(line))
        self.assertEqual(parseAll(b'a LOGIN bench0 "pw"\r\n'), [command(b"a", b"LOGIN", Atom(b"bench0"), b"pw")])

    @settings(max_examples=1000, deadline=None)
    @given(
        st.sampled_from([b"a", b"a1", b"x]y", b"*", b"+", b"", b"\x01"]),
        st.sampled_from([b"LOGIN", b"login", b"ID", b"NOOP", b"(", b'"x"', b"\xc3\xa9"]),
        st.lists(
            st.tuples(
                st.sampled_from([b" ", b"  ", b""]),
                st.one_of(st.sampled_from(_SIMPLE_PIECES), st.sampled_from(_SIMPLE_PIECES), st.sampled_from(_OTHER_PIECES)),
            ),
            max_size=5,
        ),
        st.sampled_from([b"", b" ", b"   "]),
        st.sampled_from([b"\r\n", b"\n"]),
    )
    def test_sameEvents(
        self, tag: bytes, name: bytes, arguments: list[tuple[bytes, bytes]], trailing: bytes, end: bytes
    ) -> None:
        """
        Any line made of such pieces gives the same events either way.
        """
        line = tag + b" " + name + b"".join(space + piece for space, piece in arguments) + trailing + end
        self.assertEqual(parseAll(line), self.general(line))
