"""
A pull parser for the lines a POP3 client sends before it is logged in.

Feed it bytes with L{LineParser.feed}, then ask for events with
L{LineParser.nextCommand} (or L{LineParser.nextLine} while a SASL exchange
waits for a response) until it answers L{None}. Each event is a complete
L{Command} or L{RawLine}, or a L{BadLine} that has been (or, for a line
still arriving, will be) consumed in full: the session goes on either way.
Between events the caller may drop all input (L{LineParser.clear}, after
STLS) or take it unparsed (L{LineParser.takeRemaining}, at the hand-over).

The events do not depend on how the input was split into chunks.

Syntax (RFC 1939 section 3, RFC 2449 section 4), with the leniencies chosen
here:

  - A line ends with CRLF or with a bare LF. It may not contain NUL or CR
    (other than the one before its LF): no POP3 argument can, and either
    would let a client split or smuggle a field when its credentials are
    re-encoded for the backend.
  - A command line, terminator included, is at most 1024 octets (RFC
    2449 section 4 says 255 for clients; Dovecot takes about 1 KiB). An
    C{AUTH} line may be as long as a SASL response line:
    clients put long initial responses there although RFC 5034 tells them
    not to, and Dovecot accepts them.
  - The keyword is everything before the first space, compared without
    case; the argument is everything after that space, unchanged (C{PASS}
    takes the rest of the line as the password, spaces included).

Nothing here logs or echoes line contents: they contain passwords.
"""

from __future__ import annotations

from typing import Union

from attrs import field, frozen

#: Longest command line, CRLF included. RFC 2449 section 4 holds clients
#: to 255 octets, but Dovecot's pop3-login takes about 1 KiB (a PASS of
#: 1000 octets): long passwords and tokens that work directly must work
#: through the proxy too.
MAX_COMMAND_LINE = 1024
#: Longest SASL response line (and AUTH line), CRLF included: room for
#: OAuth-sized tokens, as in the IMAP front end.
MAX_SASL_LINE = 12288


@frozen
class Command:
    """
    One complete command line.

    @ivar name: the keyword, upper-cased, e.g. C{b"USER"}.
    @ivar argument: everything after the first space, or L{None} when the
        line has no space; hidden from C{repr} because it may be a password.
    """

    name: bytes
    argument: bytes | None = field(repr=lambda argument: "None" if argument is None else f"<{len(argument)} octets>")

    def arguments(self) -> list[bytes]:
        """
        The argument split at spaces, empty pieces dropped (for commands
        whose arguments are tokens: C{AUTH}, C{APOP}).
        """
        if self.argument is None:
            return []
        return [piece for piece in self.argument.split(b" ") if piece]


@frozen
class RawLine:
    """
    One line read by L{LineParser.nextLine}, such as a SASL response.

    @ivar data: the line without its terminator; hidden from C{repr}.
    """

    data: bytes = field(repr=lambda data: f"<{len(data)} octets>")


@frozen
class BadLine:
    """
    A line that cannot be used; all of it is (or will be) discarded.

    @ivar reason: short text for the client's C{-ERR}; contains no client
        data.
    """

    reason: str


Event = Union[Command, RawLine, BadLine]

TOO_LONG = BadLine("Line too long.")
INVALID = BadLine("Invalid characters in line.")


class LineParser:
    """
    Splits a POP3 client's input into lines and commands.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        # Discarding the rest of a line already reported as too long.
        self._discarding = False

    @property
    def buffered(self) -> int:
        """
        How many octets are waiting to be parsed.
        """
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """
        Add client input.
        """
        if self._discarding:
            end = data.find(b"\n")
            if end < 0:
                return
            self._discarding = False
            data = data[end + 1 :]
        self._buffer += data

    def clear(self) -> None:
        """
        Drop all buffered input, and the rest of a line being discarded.

        Used after STLS, so that plaintext pipelined behind it is never read
        as a command.
        """
        self._buffer.clear()
        self._discarding = False

    def unfinished(self) -> bool:
        """
        Whether a line is read in part (or the rest of an overlong one is
        still being skipped).
        """
        return bool(self._buffer) or self._discarding

    def takeRemaining(self) -> bytes:
        """
        Take all buffered input unparsed, leaving the parser empty.

        Used at the hand-over to a backend: what the client pipelined after
        its login belongs to the backend.

        @raise RuntimeError: if the rest of an overlong line is still being
            discarded (it belongs to no one).
        """
        if self._discarding:
            raise RuntimeError("an overlong line is being discarded")
        remaining = bytes(self._buffer)
        self._buffer.clear()
        return remaining

    def nextCommand(self) -> Command | BadLine | None:
        """
        The next command line, a L{BadLine}, or L{None} if more input is
        needed.
        """
        limit = MAX_SASL_LINE if self._buffer[:5].upper() == b"AUTH " else MAX_COMMAND_LINE
        line = self._take(limit)
        if not isinstance(line, bytes):
            return line
        name, space, argument = line.partition(b" ")
        return Command(name.upper(), argument if space else None)

    def nextLine(self, maxLength: int = MAX_SASL_LINE) -> RawLine | BadLine | None:
        """
        The next raw line (a SASL response), a L{BadLine}, or L{None} if more
        input is needed.

        @param maxLength: the longest line accepted, terminator included.
        """
        line = self._take(maxLength)
        if not isinstance(line, bytes):
            return line
        return RawLine(line)

    def _take(self, limit: int) -> bytes | BadLine | None:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) < limit:
                return None
            # However the line ends, it will be longer than the limit: say
            # so now rather than buffer it, and drop the rest as it comes.
            self._buffer.clear()
            self._discarding = True
            return TOO_LONG
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        if end + 1 > limit:
            return TOO_LONG
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\r" in line or b"\x00" in line:
            return INVALID
        return line
