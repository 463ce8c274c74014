"""
A pull parser for the IMAP4 commands a client sends before it is logged in.

Feed it bytes with L{CommandParser.feed}, then ask for events with
L{CommandParser.next} until it answers L{None}. Each event is a complete
L{Command}, a L{LiteralRequest} the caller must answer, a L{BadCommand} (the
session goes on) or a L{Fatal} (the session must end). Between events the
caller may switch to reading raw lines (L{CommandParser.nextLine}, for SASL
responses), drop all input (L{CommandParser.clear}, after STARTTLS) or
take it unparsed (L{CommandParser.takeRemaining}, at the hand-over).

The events do not depend on how the input was split into chunks.

Grammar notes (RFC 3501/9051 section 9, with the leniencies chosen here):

  - A line ends with CRLF or with a bare LF.
  - Tokens are separated by one or more spaces; spaces next to a
    parenthesis and before the end of the line are ignored. Two values
    with no space between them are an error. The tag must start the line.
  - An atom may contain C{]} (as an astring may); it may not contain
    8-bit octets, C{%}, C{*} or C{\\}.
  - A literal's octets must not contain NUL.
  - The octets of all the literals of one command together must fit in
    C{maxLiteralSize}; the line segments of one command together must fit
    in C{maxLineLength}.

Nothing here logs or echoes argument contents: they contain passwords.
"""

from __future__ import annotations

import re
from typing import Union

from attrs import field, frozen

from .._lines import (
    TRAILING_LITERAL,
    Atom,
    LineSyntaxError,
    SegmentBuffer,
    SegmentTooLong,
    Value,
    ValueSyntax,
    literalSize,
    skip,
)

__all__ = [
    "MAX_LIST_DEPTH",
    "Atom",
    "BadCommand",
    "Command",
    "CommandParser",
    "Event",
    "Fatal",
    "IMAPValue",
    "LiteralRequest",
    "RawLine",
]

IMAPValue = Value
"""
One command argument: an L{Atom} (such as a command keyword, a mechanism
name or C{NIL}); L{bytes} for a quoted string or a literal (escapes already
removed); a L{tuple} of values for a parenthesised list.
"""


@frozen
class Command:
    """
    One complete command.

    @ivar tag: the client's tag, to be echoed in the tagged reply.
    @ivar name: the command name, upper-cased, e.g. C{b"LOGIN"}.
    @ivar args: the arguments; hidden from C{repr} because they may hold a
        password.
    """

    tag: bytes
    name: bytes
    args: tuple[IMAPValue, ...] = field(repr=lambda args: f"<{len(args)} values>")


@frozen
class LiteralRequest:
    """
    The client announced a synchronizing literal C{{size}} and waits.

    The caller answers with L{CommandParser.acceptLiteral} (after writing a
    C{+} continuation) or L{CommandParser.rejectLiteral} (after writing a
    tagged C{BAD} or C{NO}).

    @ivar tag: the tag of the command the literal belongs to.
    @ivar size: the announced number of octets.
    """

    tag: bytes
    size: int


@frozen
class BadCommand:
    """
    A command that could not be parsed; all of it has been consumed.

    @ivar tag: the command's tag, or L{None} if there was no valid tag (then
        the reply is C{* BAD}).
    @ivar reason: short text for the client; contains no client data.
    @ivar code: a response code for the reply, e.g. C{"TOOBIG"}, or L{None}.
    """

    tag: bytes | None
    reason: str
    code: str | None = None


@frozen
class Fatal:
    """
    The input cannot be parsed any further; the session must end.

    @ivar reason: text for C{* BYE <reason>}.
    """

    reason: str


@frozen
class RawLine:
    """
    One line read by L{CommandParser.nextLine}.

    @ivar data: the line without its CRLF (or LF); hidden from C{repr}
        because it may be a SASL response carrying a password.
    """

    data: bytes = field(repr=lambda data: f"<{len(data)} octets>")


Event = Union[Command, LiteralRequest, BadCommand, Fatal]

MAX_LIST_DEPTH = 8
"""How deeply parenthesised lists may nest (ID needs one level)."""

_SP = 0x20

_ATOM = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\]+")
_WORD = re.compile(rb"[^ ]*")
_TAG = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\+]+")
_SPACES = re.compile(rb" +")

_SYNTAX = ValueSyntax(atom=_ATOM, maxListDepth=MAX_LIST_DEPTH)

# A whole command line of the commonest kind (a login's): a tag, a command
# name, and atoms and quoted strings without escapes, each after one or
# more spaces. Such a line means the same to the general parser; matched
# at once, its arguments are then read with _SIMPLE_ARGUMENT.
_ATOM_OCTETS = rb"[^\x00-\x20\x7f-\xff(){%*\"\\]+"
_QUOTED_SIMPLE = rb'"[^"\\\x00\r\n]*"'
_SIMPLE_COMMAND = re.compile(
    rb"(" + _TAG.pattern + rb") +(" + _ATOM_OCTETS + rb")((?: +(?:" + _ATOM_OCTETS + rb"|" + _QUOTED_SIMPLE + rb"))*) *\Z"
)
_SIMPLE_ARGUMENT = re.compile(rb" +(?:(" + _ATOM_OCTETS + rb')|"([^"\\\x00\r\n]*)")')

_INPUT_BUFFER_FULL = "Input buffer full"
_LITERAL_TOO_BIG = "Literal too big"


class _State:
    """
    Where the parser is. Names only, for readability.

    @cvar command: at the start of a command (between events).
    @cvar segment: inside a command, after a literal: the next line segment
        continues it.
    @cvar decide: a synchronizing literal was announced; waiting for
        L{CommandParser.acceptLiteral} or L{CommandParser.rejectLiteral}.
    @cvar literal: reading a literal's octets.
    @cvar skipSegment: a syntax error was found; consuming the rest of the
        command before reporting it.
    @cvar skipLiteral: as C{skipSegment}, inside a non-synchronizing
        literal.
    @cvar fatal: input ended for good.
    """

    command = "command"
    segment = "segment"
    decide = "decide"
    literal = "literal"
    skipSegment = "skipSegment"
    skipLiteral = "skipLiteral"
    fatal = "fatal"


class CommandParser:
    """
    Parse IMAP4 commands from a byte stream, one event at a time.

    The parser holds at most about C{maxLineLength + maxLiteralSize} octets
    for the command in progress. Input fed but not yet pulled is held too:
    the caller drains it with L{next} after each L{feed}, or pauses the
    transport while it does not.

    @ivar maxLineLength: the longest command line accepted, counting all
        line segments of one command (literal octets and line terminators
        excluded).
    @ivar maxLiteralSize: the most literal octets one command may carry.
    """

    def __init__(self, maxLineLength: int = 8192, maxLiteralSize: int = 8192) -> None:
        self.maxLineLength = maxLineLength
        self.maxLiteralSize = maxLiteralSize
        self._input = SegmentBuffer()
        self._fatal: Fatal | None = None
        self._resetCommand()

    def _resetCommand(self) -> None:
        """
        Forget the command in progress.
        """
        self._state = _State.command
        self._tag: bytes | None = None
        self._name = b""
        self._stack: list[list[IMAPValue]] = [[]]
        self._lineUsed = 0
        self._literalUsed = 0
        self._literalSize = 0
        self._pendingBad: BadCommand | None = None

    @property
    def buffered(self) -> int:
        """
        The number of input octets held and not yet consumed.
        """
        return len(self._input)

    def feed(self, data: bytes) -> None:
        """
        Add input. Nothing is parsed until L{next} or L{nextLine} is called.
        """
        if self._fatal is None:
            self._input.feed(data)

    def clear(self) -> None:
        """
        Drop all buffered input and any command in progress.

        Used after STARTTLS, so that plaintext pipelined behind it is never
        read as a command. A parser that has reported L{Fatal} stays so.
        """
        self._input.clear()
        if self._fatal is None:
            self._resetCommand()

    def unfinished(self) -> bool:
        """
        Whether a command is read in part: octets of it are buffered, or
        its first line segments or literals are consumed.
        """
        return bool(self._input) or self._state not in (_State.command, _State.fatal)

    def takeRemaining(self) -> bytes:
        """
        Take all buffered input unparsed, leaving the parser empty.

        Used at the hand-over to a backend: what the client pipelined after
        its login belongs to the backend.

        @raise RuntimeError: if a command is in progress.
        """
        if self._state != _State.command:
            raise RuntimeError("a command is in progress")
        return self._input.takeAll()

    def acceptLiteral(self) -> None:
        """
        Go on after a L{LiteralRequest}: the literal's octets will follow.

        @raise RuntimeError: if no L{LiteralRequest} is waiting for an answer.
        """
        self._expectDecision()
        self._state = _State.literal

    def rejectLiteral(self) -> None:
        """
        Drop the command of a L{LiteralRequest}: the client sends nothing
        more of it.

        @raise RuntimeError: if no L{LiteralRequest} is waiting for an answer.
        """
        self._expectDecision()
        self._resetCommand()

    def _expectDecision(self) -> None:
        """
        Check that a L{LiteralRequest} is waiting for an answer.
        """
        if self._state != _State.decide:
            raise RuntimeError("no literal request is waiting for an answer")

    def next(self) -> Event | None:
        """
        Parse as far as the buffered input allows.

        @return: the next event, or L{None} if more input is needed.
        @raise RuntimeError: if a L{LiteralRequest} has not been answered.
        """
        if self._fatal is not None:
            return self._fatal
        while True:
            state = self._state
            if state == _State.decide:
                raise RuntimeError("answer the literal request first")
            if state in (_State.literal, _State.skipLiteral):
                if not self._readLiteral():
                    return None
                continue
            line = self._takeSegment(self.maxLineLength - self._lineUsed)
            if line is None:
                return None
            if isinstance(line, Fatal):
                return line
            self._lineUsed += len(line)
            if state == _State.skipSegment:
                event = self._skipSegment(line)
            else:
                event = self._parseSegment(line)
            if event is not None:
                return event

    def nextLine(self, maxLength: int) -> RawLine | Fatal | None:
        """
        Read one raw line, such as a SASL response, instead of a command.

        Only valid between commands.

        @param maxLength: the longest line accepted, terminator excluded.
        @return: the line, L{Fatal} if it is or will be longer than
            C{maxLength}, or L{None} if more input is needed.
        @raise RuntimeError: if a command is in progress.
        """
        if self._fatal is not None:
            return self._fatal
        if self._state != _State.command:
            raise RuntimeError("a command is in progress")
        line = self._takeSegment(maxLength)
        if line is None or isinstance(line, Fatal):
            return line
        return RawLine(line)

    def _die(self, reason: str) -> Fatal:
        """
        Stop for good: report C{reason} now and on every later call.
        """
        self._fatal = Fatal(reason)
        self._state = _State.fatal
        self._input.clear()
        return self._fatal

    def _takeSegment(self, room: int) -> bytes | Fatal | None:
        """
        Consume one line segment (up to and including LF).

        @param room: how many octets the segment may have, terminator
            excluded.
        @return: the segment without its terminator; L{Fatal} as soon as it
            is known to be longer than C{room}; L{None} if incomplete.
        """
        try:
            return self._input.takeSegment(room)
        except SegmentTooLong:
            return self._die(_INPUT_BUFFER_FULL)

    def _readLiteral(self) -> bool:
        """
        Consume literal octets.

        @return: whether the literal is complete.
        """
        if self._state == _State.skipLiteral:
            self._literalSize -= self._input.skipOctets(self._literalSize)
            if self._literalSize:
                return False
            self._state = _State.skipSegment
            return True
        data = self._input.takeOctets(self._literalSize)
        if data is None:
            return False
        if b"\x00" in data:
            # The rest of the command follows on the same line as usual.
            self._pendingBad = BadCommand(self._tag, "NUL octet in literal")
            self._state = _State.skipSegment
            return True
        self._stack[-1].append(data)
        self._state = _State.segment
        return True

    def _startLiteral(self, size: int | None, synchronizing: bool) -> Event | None:
        """
        Handle a literal announced at the end of a line segment.
        """
        if size is None or size > self.maxLiteralSize - self._literalUsed:
            if not synchronizing:
                return self._die(_LITERAL_TOO_BIG)
            tag = self._tag
            self._resetCommand()
            return BadCommand(tag, _LITERAL_TOO_BIG, code="TOOBIG")
        self._literalUsed += size
        self._literalSize = size
        if synchronizing:
            self._state = _State.decide
            assert self._tag is not None
            return LiteralRequest(self._tag, size)
        self._state = _State.literal
        return None

    def _skipSegment(self, line: bytes) -> Event | None:
        """
        Consume one more segment of a bad command; report the command when
        its last segment is gone.

        A segment that ends in a non-synchronizing literal is followed by
        octets that must be skipped too. One that ends in a synchronizing
        literal ends the command: the client waits for a continuation that
        does not come.
        """
        match = TRAILING_LITERAL.search(line)
        if match is not None and not match.group(2):
            match = None
        if match is None:
            bad = self._pendingBad
            assert bad is not None
            self._resetCommand()
            return bad
        size = literalSize(match.group(1))
        if size is None or size > self.maxLiteralSize - self._literalUsed:
            return self._die(_LITERAL_TOO_BIG)
        self._literalUsed += size
        self._literalSize = size
        self._state = _State.skipLiteral
        return None

    def _parseSegment(self, line: bytes) -> Event | None:
        """
        Parse one line segment of a command.
        """
        first = self._state == _State.command
        if first:
            simple = _SIMPLE_COMMAND.match(line)
            if simple is not None:
                # The parser's state is untouched but for the line's length.
                self._lineUsed = 0
                arguments = tuple(Atom(atom) if atom else quoted for atom, quoted in _SIMPLE_ARGUMENT.findall(simple[3]))
                return Command(simple[1], simple[2].upper(), arguments)
        try:
            position = self._parseHead(line) if first else 0
            return self._parseArguments(line, position)
        except LineSyntaxError as e:
            self._pendingBad = BadCommand(self._tag, str(e))
            return self._skipSegment(line)

    def _parseHead(self, line: bytes) -> int:
        """
        Parse the tag and the command name.

        @return: the position after the command name.
        """
        if not line:
            raise LineSyntaxError("Empty command line")
        match = _TAG.match(line)
        if match is None or (match.end() < len(line) and line[match.end()] != _SP):
            raise LineSyntaxError("Invalid tag")
        self._tag = match.group()
        position = skip(_SPACES, line, match.end())
        if position == len(line):
            raise LineSyntaxError("Missing command")
        extent = skip(_WORD, line, position)
        if skip(_ATOM, line, position) != extent:
            raise LineSyntaxError("Invalid command name")
        self._name = line[position:extent].upper()
        return extent

    def _parseArguments(self, line: bytes, position: int) -> Event | None:
        """
        Parse arguments from C{position} to the end of the segment.

        A value (the command name, or a literal) always comes just before
        C{position}, so a separator is needed first.

        @return: the L{Command} if the segment completes it, the event (if
            any) of a literal that ends the segment.
        """
        literal = _SYNTAX.parse(line, position, True, self._stack)
        if literal is not None:
            return self._startLiteral(literal.size, literal.synchronizing)
        assert self._tag is not None
        command = Command(self._tag, self._name, tuple(self._stack[0]))
        self._resetCommand()
        return command
