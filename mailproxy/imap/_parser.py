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


@frozen
class Atom:
    """
    An IMAP atom, such as a command keyword, a mechanism name or C{NIL}.

    @ivar value: the atom's octets, as sent (not upper-cased).
    """

    value: bytes


IMAPValue = Union[Atom, bytes, tuple["IMAPValue", ...]]
"""
One command argument: an L{Atom}; L{bytes} for a quoted string or a literal
(escapes already removed); a L{tuple} of values for a parenthesised list.
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

# More digits than this is over any sane limit; compared before int() so a
# hostile size never turns into a huge integer.
_MAX_SIZE_DIGITS = 10

_SP = 0x20
_OPEN = 0x28
_CLOSE = 0x29
_DQUOTE = 0x22
_BACKSLASH = 0x5C
_LBRACE = 0x7B

_ATOM = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\]+")
_ATOM_EXTENT = re.compile(rb"[^ ()]*")
_WORD = re.compile(rb"[^ ]*")
_TAG = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\+]+")
_SPACES = re.compile(rb" +")
_QUOTED_RUN = re.compile(rb"[^\"\\\x00\r\n]*")
_LITERAL = re.compile(rb"\{([0-9]+)(\+?)\}")
_TRAILING_LITERAL = re.compile(rb"\{([0-9]+)(\+?)\}\Z")

_INPUT_BUFFER_FULL = "Input buffer full"
_LITERAL_TOO_BIG = "Literal too big"


class _SyntaxError(Exception):
    """
    A command's syntax is wrong; the text is safe to show the client.
    """


def _skip(pattern: re.Pattern[bytes], line: bytes, position: int) -> int:
    """
    The position after C{pattern}'s match at C{position}, or C{position}.
    """
    match = pattern.match(line, position)
    return position if match is None else match.end()


def _literalSize(digits: bytes) -> int | None:
    """
    The value of a literal's size digits, or L{None} if absurdly large.
    """
    significant = digits.lstrip(b"0")
    if len(significant) > _MAX_SIZE_DIGITS:
        return None
    return int(significant or b"0")


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
        self._buffer = bytearray()
        # Where to resume looking for LF, so one-octet feeds stay linear.
        self._scanned = 0
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
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """
        Add input. Nothing is parsed until L{next} or L{nextLine} is called.
        """
        if self._fatal is None:
            self._buffer += data

    def clear(self) -> None:
        """
        Drop all buffered input and any command in progress.

        Used after STARTTLS, so that plaintext pipelined behind it is never
        read as a command. A parser that has reported L{Fatal} stays so.
        """
        self._buffer.clear()
        self._scanned = 0
        if self._fatal is None:
            self._resetCommand()

    def takeRemaining(self) -> bytes:
        """
        Take all buffered input unparsed, leaving the parser empty.

        Used at the hand-over to a backend: what the client pipelined after
        its login belongs to the backend.

        @raise RuntimeError: if a command is in progress.
        """
        if self._state != _State.command:
            raise RuntimeError("a command is in progress")
        remaining = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return remaining

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
        self._buffer.clear()
        self._scanned = 0
        return self._fatal

    def _takeSegment(self, room: int) -> bytes | Fatal | None:
        """
        Consume one line segment (up to and including LF).

        @param room: how many octets the segment may have, terminator
            excluded.
        @return: the segment without its terminator; L{Fatal} as soon as it
            is known to be longer than C{room}; L{None} if incomplete.
        """
        buffer = self._buffer
        end = buffer.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(buffer)
            # A trailing CR may be the start of the terminator.
            length = len(buffer) - (1 if buffer.endswith(b"\r") else 0)
            if length > room:
                return self._die(_INPUT_BUFFER_FULL)
            return None
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        self._scanned = 0
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > room:
            return self._die(_INPUT_BUFFER_FULL)
        return line

    def _readLiteral(self) -> bool:
        """
        Consume literal octets.

        @return: whether the literal is complete.
        """
        buffer = self._buffer
        if self._state == _State.skipLiteral:
            count = min(self._literalSize, len(buffer))
            del buffer[:count]
            self._scanned = 0
            self._literalSize -= count
            if self._literalSize:
                return False
            self._state = _State.skipSegment
            return True
        size = self._literalSize
        if len(buffer) < size:
            return False
        data = bytes(buffer[:size])
        del buffer[:size]
        self._scanned = 0
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
        match = _TRAILING_LITERAL.search(line)
        if match is not None and not match.group(2):
            match = None
        if match is None:
            bad = self._pendingBad
            assert bad is not None
            self._resetCommand()
            return bad
        size = _literalSize(match.group(1))
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
        try:
            position = self._parseHead(line) if first else 0
            return self._parseArguments(line, position)
        except _SyntaxError as e:
            self._pendingBad = BadCommand(self._tag, str(e))
            return self._skipSegment(line)

    def _parseHead(self, line: bytes) -> int:
        """
        Parse the tag and the command name.

        @return: the position after the command name.
        """
        if not line:
            raise _SyntaxError("Empty command line")
        match = _TAG.match(line)
        if match is None or (match.end() < len(line) and line[match.end()] != _SP):
            raise _SyntaxError("Invalid tag")
        self._tag = match.group()
        position = _skip(_SPACES, line, match.end())
        if position == len(line):
            raise _SyntaxError("Missing command")
        extent = _skip(_WORD, line, position)
        if _skip(_ATOM, line, position) != extent:
            raise _SyntaxError("Invalid command name")
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
        stack = self._stack
        end = len(line)
        afterValue = True
        while position < end:
            octet = line[position]
            if octet == _SP:
                position = _skip(_SPACES, line, position)
                afterValue = False
                continue
            if octet == _CLOSE:
                if len(stack) == 1:
                    raise _SyntaxError("Unexpected ')'")
                closed = tuple(stack.pop())
                stack[-1].append(closed)
                position += 1
                afterValue = True
                continue
            if afterValue:
                raise _SyntaxError("Missing space between arguments")
            if octet == _OPEN:
                if len(stack) > MAX_LIST_DEPTH:
                    raise _SyntaxError("Lists nested too deeply")
                stack.append([])
                position += 1
            elif octet == _DQUOTE:
                value, position = self._parseQuoted(line, position + 1)
                stack[-1].append(value)
                afterValue = True
            elif octet == _LBRACE:
                match = _LITERAL.match(line, position)
                if match is None:
                    raise _SyntaxError("Invalid literal")
                if match.end() != end:
                    raise _SyntaxError("Literal must end the line")
                return self._startLiteral(
                    _literalSize(match.group(1)), synchronizing=not match.group(2)
                )
            else:
                extent = _skip(_ATOM_EXTENT, line, position)
                if _skip(_ATOM, line, position) != extent:
                    raise _SyntaxError("Invalid characters in atom")
                stack[-1].append(Atom(line[position:extent]))
                position = extent
                afterValue = True
        if len(stack) > 1:
            raise _SyntaxError("Missing ')'")
        assert self._tag is not None
        command = Command(self._tag, self._name, tuple(stack[0]))
        self._resetCommand()
        return command

    @staticmethod
    def _parseQuoted(line: bytes, position: int) -> tuple[bytes, int]:
        """
        Parse a quoted string's body, from just after its opening quote.

        @return: the unescaped value and the position after the closing
            quote.
        """
        parts = []
        end = len(line)
        while True:
            run = _skip(_QUOTED_RUN, line, position)
            parts.append(line[position:run])
            if run == end:
                raise _SyntaxError("Missing closing quote")
            octet = line[run]
            if octet == _DQUOTE:
                return b"".join(parts), run + 1
            if octet != _BACKSLASH:
                raise _SyntaxError("Invalid character in quoted string")
            if run + 1 == end or line[run + 1] not in (_DQUOTE, _BACKSLASH):
                raise _SyntaxError("Invalid escape in quoted string")
            parts.append(line[run + 1 : run + 2])
            position = run + 2
