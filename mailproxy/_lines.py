"""
Lines of values with literals: the syntax several mail protocols share.

A line is read in segments: a segment that ends in a literal's announcement
(C{{n}} or C{{n+}}) is followed by that many raw octets, then by the next
segment of the same line. Between the literals stand atoms, quoted strings
and parenthesised lists, separated by spaces.

L{SegmentBuffer} holds the input and hands out segments and literal octets;
L{ValueSyntax} parses the values of one segment. The protocol's parser
keeps its own state machine, events and texts on top of them.

The texts of L{LineSyntaxError} are safe to show a client: they never
contain client data.
"""

from __future__ import annotations

import re
from typing import Union

from attrs import frozen

__all__ = [
    "Atom",
    "LINE_LITERAL",
    "LineSyntaxError",
    "LiteralAnnouncement",
    "SegmentBuffer",
    "SegmentTooLong",
    "TRAILING_LITERAL",
    "Value",
    "ValueSyntax",
    "literalSize",
    "skip",
]


@frozen
class Atom:
    """
    An atom: an unquoted word, such as a command name, C{NIL}, C{OK} or a
    response code.

    @ivar value: the atom's octets, as sent (not upper-cased).
    """

    value: bytes


Value = Union[Atom, bytes, tuple["Value", ...]]
"""
One value of a line: an L{Atom}; L{bytes} for a quoted string or a literal
(escapes already removed); a L{tuple} of values for a parenthesised list.
"""

#: A literal's announcement: C{{n}} (synchronizing) or C{{n+}}.
LINE_LITERAL = re.compile(rb"\{([0-9]+)(\+?)\}")
#: A literal's announcement at the end of a segment.
TRAILING_LITERAL = re.compile(rb"\{([0-9]+)(\+?)\}\Z")

# More digits than this is over any sane limit; compared before int() so a
# hostile size never turns into a huge integer.
_MAX_SIZE_DIGITS = 10

_SP = 0x20
_OPEN = 0x28
_CLOSE = 0x29
_DQUOTE = 0x22
_BACKSLASH = 0x5C
_LBRACE = 0x7B

_ATOM_EXTENT = re.compile(rb"[^ ()]*")
_SPACES = re.compile(rb" +")
_QUOTED_RUN = re.compile(rb"[^\"\\\x00\r\n]*")


class LineSyntaxError(Exception):
    """
    A line's syntax is wrong; the text (with no final full stop) is safe to
    show the client.
    """


class SegmentTooLong(Exception):
    """
    A segment is, or is known to become, longer than the room it was given.
    """


def skip(pattern: re.Pattern[bytes], line: bytes, position: int) -> int:
    """
    The position after C{pattern}'s match at C{position}, or C{position}.
    """
    match = pattern.match(line, position)
    return position if match is None else match.end()


def literalSize(digits: bytes) -> int | None:
    """
    The value of a literal's size digits, or L{None} if absurdly large.
    """
    significant = digits.lstrip(b"0")
    if len(significant) > _MAX_SIZE_DIGITS:
        return None
    return int(significant or b"0")


class SegmentBuffer:
    """
    Input octets, taken as line segments or as literal octets.

    A segment ends with CRLF or with a bare LF. Looking for the LF resumes
    where the last look stopped, so one-octet feeds stay linear.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """
        Add input.
        """
        self._buffer += data

    def clear(self) -> None:
        """
        Drop all input.
        """
        self._buffer.clear()
        self._scanned = 0

    def takeAll(self) -> bytes:
        """
        Take all input, leaving the buffer empty.
        """
        remaining = bytes(self._buffer)
        self.clear()
        return remaining

    def takeSegment(self, room: int) -> bytes | None:
        """
        Consume one line segment (up to and including LF).

        @param room: how many octets the segment may have, terminator
            excluded.
        @return: the segment without its terminator, or L{None} if it is
            incomplete.
        @raise SegmentTooLong: as soon as the segment is known to be longer
            than C{room}.
        """
        buffer = self._buffer
        end = buffer.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(buffer)
            # A trailing CR may be the start of the terminator.
            length = len(buffer) - (1 if buffer.endswith(b"\r") else 0)
            if length > room:
                raise SegmentTooLong()
            return None
        segment = bytes(buffer[:end])
        del buffer[: end + 1]
        self._scanned = 0
        if segment.endswith(b"\r"):
            segment = segment[:-1]
        if len(segment) > room:
            raise SegmentTooLong()
        return segment

    def takeOctets(self, size: int) -> bytes | None:
        """
        Consume a literal's C{size} octets, or nothing (L{None}) until all
        of them are here.
        """
        if len(self._buffer) < size:
            return None
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._scanned = 0
        return data

    def skipOctets(self, size: int) -> int:
        """
        Drop up to C{size} octets of a literal being skipped.

        @return: how many were dropped.
        """
        count = min(size, len(self._buffer))
        del self._buffer[:count]
        self._scanned = 0
        return count


@frozen
class LiteralAnnouncement:
    """
    A segment ended in a literal's announcement; its octets follow.

    @ivar size: the announced number of octets, or L{None} if absurdly
        large.
    @ivar synchronizing: C{{n}} rather than C{{n+}}.
    """

    size: int | None
    synchronizing: bool


@frozen
class ValueSyntax:
    """
    How one protocol writes values.

    @ivar atom: the octets an atom consists of, one or more.
    @ivar maxListDepth: how deeply parenthesised lists may nest.
    @ivar maxQuotedLength: the longest quoted string in octets (after
        unescaping), or L{None} for no limit of its own.
    """

    atom: re.Pattern[bytes]
    maxListDepth: int
    maxQuotedLength: int | None = None

    def parse(self, segment: bytes, position: int, afterValue: bool, stack: list[list[Value]]) -> LiteralAnnouncement | None:
        """
        Parse values from C{position} to the end of C{segment}.

        Values go to C{stack[-1]}; an open list pushes a new list on
        C{stack}, a closing parenthesis pops it into its parent. The stack
        carries a line's open lists from one segment to the next.

        @param afterValue: a value stands just before C{position}, so a
            separator must come first.
        @return: the literal announced at the end of the segment, or
            L{None} once the line is complete (its values in C{stack[0]}).
        @raise LineSyntaxError: the segment breaks the syntax.
        """
        end = len(segment)
        while position < end:
            octet = segment[position]
            if octet == _SP:
                position = skip(_SPACES, segment, position)
                afterValue = False
                continue
            if octet == _CLOSE:
                if len(stack) == 1:
                    raise LineSyntaxError("Unexpected ')'")
                closed = tuple(stack.pop())
                stack[-1].append(closed)
                position += 1
                afterValue = True
                continue
            if afterValue:
                raise LineSyntaxError("Missing space between arguments")
            if octet == _OPEN:
                if len(stack) > self.maxListDepth:
                    raise LineSyntaxError("Lists nested too deeply")
                stack.append([])
                position += 1
            elif octet == _DQUOTE:
                value, position = self._parseQuoted(segment, position + 1)
                stack[-1].append(value)
                afterValue = True
            elif octet == _LBRACE:
                match = LINE_LITERAL.match(segment, position)
                if match is None:
                    raise LineSyntaxError("Invalid literal")
                if match.end() != end:
                    raise LineSyntaxError("Literal must end the line")
                return LiteralAnnouncement(literalSize(match.group(1)), synchronizing=not match.group(2))
            else:
                extent = skip(_ATOM_EXTENT, segment, position)
                if skip(self.atom, segment, position) != extent:
                    raise LineSyntaxError("Invalid characters in atom")
                stack[-1].append(Atom(segment[position:extent]))
                position = extent
                afterValue = True
        if len(stack) > 1:
            raise LineSyntaxError("Missing ')'")
        return None

    def _parseQuoted(self, segment: bytes, position: int) -> tuple[bytes, int]:
        """
        Parse a quoted string's body, from just after its opening quote.

        @return: the unescaped value and the position after the closing
            quote.
        """
        parts = []
        length = 0
        end = len(segment)
        while True:
            run = skip(_QUOTED_RUN, segment, position)
            parts.append(segment[position:run])
            length += run - position
            if run == end:
                raise LineSyntaxError("Missing closing quote")
            octet = segment[run]
            if octet == _DQUOTE:
                if self.maxQuotedLength is not None and length > self.maxQuotedLength:
                    raise LineSyntaxError("Quoted string too long; use a literal")
                return b"".join(parts), run + 1
            if octet != _BACKSLASH:
                raise LineSyntaxError("Invalid character in quoted string")
            if run + 1 == end or segment[run + 1] not in (_DQUOTE, _BACKSLASH):
                raise LineSyntaxError("Invalid escape in quoted string")
            parts.append(segment[run + 1 : run + 2])
            length += 1
            position = run + 2
