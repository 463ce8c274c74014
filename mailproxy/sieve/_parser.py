"""
A pull parser for ManageSieve (RFC 5804) lines: the commands a client sends
before it is logged in, and the responses a backend sends during the
proxy's login.

Feed it bytes with L{LineParser.feed}, then ask for events with
L{LineParser.next} until it answers L{None}. Each event is a complete
L{Line} (the values of one line, literals included), a L{BadLine} (the line
was consumed and the session goes on) or a L{Fatal} (the session must end).
Between events the caller may drop all input (L{LineParser.clear}, after
STARTTLS) or take it unparsed (L{LineParser.takeRemaining}, at the
hand-over).

The events do not depend on how the input was split into chunks.

Grammar notes (RFC 5804 section 4, with the leniencies chosen here):

  - A line ends with CRLF or with a bare LF.
  - Values are separated by one or more spaces; spaces at the start and
    end of a line and next to a parenthesis are ignored. Two values with
    no space between them are an error.
  - An atom is made of RFC 5804 ATOM-CHARs: printable ASCII except
    C{"}, C{(}, C{)}, C{\\} and C{{}.
  - A quoted string holds at most C{maxQuotedLength} octets (1024 by the
    RFC) after unescaping; C{\\"} and C{\\\\} are its only escapes, and it
    may not contain NUL, CR or LF. Other octets, UTF-8 included, pass as
    they are.
  - A literal is C{{n+}} (RFC 5804's literal-c2s) or C{{n}} (the server's
    form, which Pigeonhole also accepts from clients); either way its
    octets follow at once, since ManageSieve has no continuation request.
    It must end its line segment. The octets of all the literals of one
    line together must fit in C{maxLiteralSize}; one that does not is
    fatal, because its octets are on their way.
  - Parenthesised lists (response codes) nest at most L{MAX_LIST_DEPTH}
    deep.

Nothing here logs or echoes values: they may hold a password.
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
)

__all__ = [
    "MAX_LIST_DEPTH",
    "MAX_QUOTED_LENGTH",
    "Atom",
    "BadLine",
    "Event",
    "Fatal",
    "Line",
    "LineParser",
    "SieveValue",
    "clientString",
    "formatValues",
    "quoteString",
]

SieveValue = Value
"""
One value of a line: an L{Atom} (such as a command name, C{OK} or a
response code); L{bytes} for a quoted string or a literal (escapes already
removed); a L{tuple} of values for a parenthesised list.
"""


@frozen
class Line:
    """
    One complete line.

    @ivar values: its values in order; hidden from C{repr} because they may
        hold a password.
    """

    values: tuple[SieveValue, ...] = field(repr=lambda values: f"<{len(values)} values>")


@frozen
class BadLine:
    """
    A line that could not be parsed; all of it has been consumed.

    @ivar reason: short text for the client; contains no client data.
    """

    reason: str


@frozen
class Fatal:
    """
    The input cannot be parsed any further; the session must end.

    @ivar reason: text for the client's C{BYE}.
    """

    reason: str


Event = Union[Line, BadLine, Fatal]

MAX_QUOTED_LENGTH = 1024
"""The longest quoted string RFC 5804 allows, in octets."""

MAX_LIST_DEPTH = 2
"""How deeply parenthesised lists may nest (a response code needs one)."""

_ATOM = re.compile(rb"[!#-'*-\[\]-z|-~]+")

_INPUT_BUFFER_FULL = "Input buffer full."
_LITERAL_TOO_BIG = "Literal too big."


class _State:
    """
    Where the parser is. Names only, for readability.

    @cvar line: at the start of a line (between events).
    @cvar segment: inside a line, after a literal: the next line segment
        continues it.
    @cvar literal: reading a literal's octets.
    @cvar skipSegment: a syntax error was found; consuming the rest of the
        line before reporting it.
    @cvar skipLiteral: as C{skipSegment}, inside a literal.
    @cvar fatal: input ended for good.
    """

    line = "line"
    segment = "segment"
    literal = "literal"
    skipSegment = "skipSegment"
    skipLiteral = "skipLiteral"
    fatal = "fatal"


class LineParser:
    """
    Parse ManageSieve lines from a byte stream, one event at a time.

    The parser holds at most about C{maxLineLength + maxLiteralSize} octets
    for the line in progress. Input fed but not yet pulled is held too: the
    caller drains it with L{next} after each L{feed}, or pauses the
    transport while it does not.

    @ivar maxLineLength: the longest line accepted, counting all line
        segments of one line (literal octets and line terminators excluded).
    @ivar maxLiteralSize: the most literal octets one line may carry.
    @ivar maxQuotedLength: the longest quoted string, in octets.
    """

    def __init__(
        self,
        maxLineLength: int = 8192,
        maxLiteralSize: int = 8192,
        maxQuotedLength: int = MAX_QUOTED_LENGTH,
    ) -> None:
        self.maxLineLength = maxLineLength
        self.maxLiteralSize = maxLiteralSize
        self.maxQuotedLength = maxQuotedLength
        self._syntax = ValueSyntax(atom=_ATOM, maxListDepth=MAX_LIST_DEPTH, maxQuotedLength=maxQuotedLength)
        self._input = SegmentBuffer()
        self._fatal: Fatal | None = None
        self._resetLine()

    def _resetLine(self) -> None:
        """
        Forget the line in progress.
        """
        self._state = _State.line
        self._stack: list[list[SieveValue]] = [[]]
        self._lineUsed = 0
        self._literalUsed = 0
        self._literalSize = 0
        self._pendingBad: BadLine | None = None

    @property
    def buffered(self) -> int:
        """
        The number of input octets held and not yet consumed.
        """
        return len(self._input)

    def feed(self, data: bytes) -> None:
        """
        Add input. Nothing is parsed until L{next} is called.
        """
        if self._fatal is None:
            self._input.feed(data)

    def clear(self) -> None:
        """
        Drop all buffered input and any line in progress.

        Used after STARTTLS, so that plaintext pipelined behind it is never
        read as a command. A parser that has reported L{Fatal} stays so.
        """
        self._input.clear()
        if self._fatal is None:
            self._resetLine()

    def unfinished(self) -> bool:
        """
        Whether a line is read in part: octets of it are buffered, or its
        first segments or literals are consumed.
        """
        return bool(self._input) or self._state not in (_State.line, _State.fatal)

    def takeRemaining(self) -> bytes:
        """
        Take all buffered input unparsed, leaving the parser empty.

        Used at the hand-over: what the client pipelined after its login
        belongs to the backend, and what a backend sent after its login
        reply belongs to the client.

        @raise RuntimeError: if a line is in progress.
        """
        if self._state != _State.line:
            raise RuntimeError("a line is in progress")
        return self._input.takeAll()

    def next(self) -> Event | None:
        """
        Parse as far as the buffered input allows.

        @return: the next event, or L{None} if more input is needed.
        """
        if self._fatal is not None:
            return self._fatal
        while True:
            state = self._state
            if state in (_State.literal, _State.skipLiteral):
                if not self._readLiteral():
                    return None
                continue
            segment = self._takeSegment(self.maxLineLength - self._lineUsed)
            if segment is None:
                return None
            if isinstance(segment, Fatal):
                return segment
            self._lineUsed += len(segment)
            if state == _State.skipSegment:
                event = self._skipSegment(segment)
            else:
                event = self._parseSegment(segment)
            if event is not None:
                return event

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
        self._stack[-1].append(data)
        self._state = _State.segment
        return True

    def _announceLiteral(self, size: int | None, skipping: bool) -> Fatal | None:
        """
        A literal of C{size} octets follows the current segment.

        @return: L{Fatal} if it does not fit in the line's literal budget.
        """
        if size is None or size > self.maxLiteralSize - self._literalUsed:
            return self._die(_LITERAL_TOO_BIG)
        self._literalUsed += size
        self._literalSize = size
        self._state = _State.skipLiteral if skipping else _State.literal
        return None

    def _skipSegment(self, segment: bytes) -> Event | None:
        """
        Consume one more segment of a bad line; report the line when its
        last segment is gone.

        A segment that ends in a literal announcement is followed by octets
        that must be skipped too.
        """
        match = TRAILING_LITERAL.search(segment)
        if match is None:
            bad = self._pendingBad
            assert bad is not None
            self._resetLine()
            return bad
        return self._announceLiteral(literalSize(match.group(1)), skipping=True)

    def _parseSegment(self, segment: bytes) -> Event | None:
        """
        Parse one line segment.

        @return: the L{Line} if the segment completes it, L{Fatal} if it
            announces a literal that is too big, else L{None} (a literal
            follows).
        """
        # After a literal, a separator must come before the next value.
        afterValue = self._state == _State.segment
        try:
            literal = self._syntax.parse(segment, 0, afterValue, self._stack)
        except LineSyntaxError as e:
            self._pendingBad = BadLine(str(e) + ".")
            self._state = _State.skipSegment
            return self._skipSegment(segment)
        if literal is not None:
            return self._announceLiteral(literal.size, skipping=False)
        line = Line(tuple(self._stack[0]))
        self._resetLine()
        return line


def quoteString(value: bytes) -> bytes:
    """
    C{value} as a ManageSieve string: quoted when it may be (at most 1024
    octets, no NUL, CR or LF), otherwise as a literal in the server's
    C{{n}} form.
    """
    if len(value) <= MAX_QUOTED_LENGTH and not re.search(rb"[\x00\r\n]", value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % (len(value),) + value


def clientString(value: bytes) -> bytes:
    """
    C{value} as a string a client sends: quoted when it may be, otherwise
    as a non-synchronizing literal C{{n+}}.
    """
    quoted = quoteString(value)
    if quoted.startswith(b'"'):
        return quoted
    return b"{%d+}\r\n" % (len(value),) + value


def formatValues(values: tuple[SieveValue, ...]) -> bytes:
    """
    Write parsed values back in ManageSieve syntax, as a server would:
    atoms as they are, strings quoted or as C{{n}} literals, lists in
    parentheses. Parsing the result gives C{values} again.
    """
    words = []
    for value in values:
        if isinstance(value, Atom):
            words.append(value.value)
        elif isinstance(value, tuple):
            words.append(b"(" + formatValues(value) + b")")
        else:
            words.append(quoteString(value))
    return b" ".join(words)
