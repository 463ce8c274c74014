"""
The ESMTP wire syntax the proxy reads and writes.

Nothing here does I/O: a L{LineReader} splits client input into command
lines (chunk-independent, with a length limit); L{parseCommand},
L{parseMailFrom}, L{parseRcptTo}, L{parseBDAT} take a line apart;
L{ReplyReader} assembles a server's (multi-line) replies; L{DataScanner}
finds the end of a C{DATA} message in a stream; L{xtextEncode} and
L{xtextDecode} implement RFC 3461 xtext; L{reply} writes a reply.

Nothing here logs or echoes argument contents: they may hold passwords.
"""

from __future__ import annotations

import re
from typing import Union

from attrs import field, frozen

#: The command line limit of RFC 5321 §4.5.3.1.4, CRLF included.
COMMAND_LINE = 512
#: The reply line limit of RFC 5321 §4.5.3.1.5, CRLF included; servers
#: exceed it in practice, so replies are read up to L{MAX_REPLY_LINE}.
MAX_REPLY_LINE = 16384
#: Lines of one multi-line reply accepted from a server.
MAX_REPLY_LINES = 200
#: Parameters accepted on one MAIL or RCPT command.
MAX_PARAMETERS = 16


@frozen
class TooLong:
    """
    A line exceeded the limit; all of it (up to its LF) has been consumed.
    """


@frozen
class Command:
    """
    One command line.

    @ivar verb: the command word, upper-cased, e.g. C{b"MAIL"}.
    @ivar argument: everything after the verb and one space, as sent;
        hidden from C{repr} because C{AUTH} carries credentials.
    """

    verb: bytes
    argument: bytes = field(repr=lambda value: f"<{len(value)} octets>")


class SMTPSyntaxError(Exception):
    """
    A command's arguments are wrong.

    @ivar code: the basic reply code, e.g. C{501}.
    @ivar enhanced: the enhanced status code, e.g. C{"5.5.4"}.
    @ivar text: text for the client; contains no client data.
    """

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(code, enhanced, text)
        self.code = code
        self.enhanced = enhanced
        self.text = text


@frozen
class Path:
    """
    The argument of C{MAIL FROM} or C{RCPT TO}.

    @ivar address: the mailbox without brackets and without a source route,
        as text (non-UTF-8 octets survive as surrogates); C{""} for the null
        sender C{<>}.
    @ivar raw: the mailbox octets as the client wrote them, without the
        brackets, for replaying the command.
    @ivar parameters: the ESMTP parameters in order, as C{(KEYWORD, value)}
        with the keyword upper-cased and L{None} for a parameter without
        C{=value}.
    """

    address: str
    raw: bytes
    parameters: tuple[tuple[bytes, bytes | None], ...] = ()

    def parameter(self, keyword: bytes) -> bytes | None:
        """
        The value of parameter C{keyword} (upper case), or L{None}.
        """
        for name, value in self.parameters:
            if name == keyword:
                return value
        return None

    def has(self, keyword: bytes) -> bool:
        """
        Whether parameter C{keyword} (upper case) was given.
        """
        return any(name == keyword for name, _ in self.parameters)

    def parameterText(self) -> bytes:
        """
        The parameters as they go on a command line, with a leading space,
        or C{b""}.
        """
        return b"".join(
            b" " + name + (b"" if value is None else b"=" + value) for name, value in self.parameters
        )


@frozen
class Reply:
    """
    One complete server reply.

    @ivar code: the three-digit code.
    @ivar lines: the text of each line, after C{"250-"} or C{"250 "}.
    @ivar raw: the reply exactly as received, line endings included.
    """

    code: int
    lines: tuple[bytes, ...]
    raw: bytes

    @property
    def positive(self) -> bool:
        """
        A 2xx reply.
        """
        return 200 <= self.code < 300

    @property
    def text(self) -> bytes:
        """
        The lines joined with spaces, for logs.
        """
        return b" ".join(self.lines)


class ReplyError(Exception):
    """
    A server sent something that is not an SMTP reply.
    """


LineEvent = Union[bytes, TooLong]


class LineReader:
    """
    Splits a byte stream into lines.

    A line ends with LF; a CR before it is removed too. A line longer than
    the limit is consumed whole and reported once as L{TooLong}, without
    ever holding more than the limit in memory. Taking a line from the
    front and looking for the next LF where the last look stopped keep a
    read of many pipelined commands (or one octet at a time) linear.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0
        self._skipping = False

    def feed(self, data: bytes) -> None:
        """
        Add input.
        """
        self._buffer += data

    def nextLine(self, limit: int) -> LineEvent | None:
        """
        The next line without its line ending, L{TooLong}, or L{None} until
        more input arrives.

        @param limit: the longest line accepted, line ending included.
        """
        buffer = self._buffer
        end = buffer.find(b"\n", self._scanned)
        if end < 0:
            if self._skipping or len(buffer) >= limit:
                self.clear()
                self._skipping = True
            else:
                self._scanned = len(buffer)
            return None
        self._scanned = 0
        if self._skipping or end + 1 > limit:
            del buffer[: end + 1]
            self._skipping = False
            return TooLong()
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line

    def startsWith(self, prefix: bytes) -> bool:
        """
        Whether the buffered input starts with C{prefix} (upper case), in
        any case: a command whose line may be longer than others.
        """
        return bytes(self._buffer[: len(prefix)]).upper() == prefix

    def take(self, size: int) -> bytes:
        """
        Up to C{size} raw octets from the front of the buffer (a BDAT
        chunk).
        """
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._scanned = 0
        return data

    def unfinished(self) -> bool:
        """
        Whether a line is read in part (or the rest of an overlong one is
        still being skipped).
        """
        return bool(self._buffer) or self._skipping

    def takeRemaining(self) -> bytes:
        """
        Everything buffered, unparsed; the reader is empty afterwards.
        """
        data = bytes(self._buffer)
        self.clear()
        return data

    def clear(self) -> None:
        """
        Forget all buffered input (after STARTTLS).
        """
        self._buffer.clear()
        self._scanned = 0
        self._skipping = False

    def __len__(self) -> int:
        return len(self._buffer)


_VERB = re.compile(rb"[A-Za-z][A-Za-z0-9-]{0,19}\Z")


def parseCommand(line: bytes) -> Command | None:
    """
    Split a command line into verb and argument.

    @return: the L{Command}, or L{None} if the line has no valid verb
        (empty, control characters, 8-bit octets).
    """
    verb, _, argument = line.partition(b" ")
    if not _VERB.match(verb):
        return None
    return Command(verb.upper(), argument)


_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*\Z")
# esmtp-value (RFC 5321 §4.1.2): any printable but "=" and space; RFC 6531
# adds UTF-8.
_VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e\x80-\xff]+\Z")
_DOT_STRING = re.compile(rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\x80-\xff-]+\Z")
_QUOTED_CONTENT = re.compile(rb"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\x20-\x7e])*\Z")
_DOMAIN = re.compile(rb"(?:\[[\x21-\x5a\x5e-\x7e]+\]|[A-Za-z0-9\x80-\xff](?:[A-Za-z0-9.\x80-\xff-]*[A-Za-z0-9\x80-\xff])?)\Z")
_SOURCE_ROUTE = re.compile(rb"@[^,:]+(?:,@[^,:]+)*:")


def _splitPath(argument: bytes, keyword: bytes, what: str, enhanced: str) -> tuple[bytes, bytes]:
    """
    Take C{KEYWORD:<mailbox> params} apart into the mailbox octets (between
    the brackets) and the parameter text.
    """
    prefix = keyword + b":"
    if argument[: len(prefix)].upper() != prefix:
        raise SMTPSyntaxError(501, "5.5.4", f"Syntax: {keyword.decode()}:<address>")
    rest = argument[len(prefix) :].lstrip(b" ")
    if not rest.startswith(b"<"):
        raise SMTPSyntaxError(501, enhanced, f"Bad {what} address syntax")
    # A quoted local part may hold ">": find the closing bracket outside quotes.
    position, quoted = 1, False
    while position < len(rest):
        octet = rest[position : position + 1]
        if quoted and octet == b"\\":
            position += 2
            continue
        if octet == b'"':
            quoted = not quoted
        elif octet == b">" and not quoted:
            break
        position += 1
    else:
        raise SMTPSyntaxError(501, enhanced, f"Bad {what} address syntax")
    return rest[1:position], rest[position + 1 :]


def _checkMailbox(mailbox: bytes, what: str, enhanced: str, localOnlyAllowed: bool) -> bytes:
    """
    Check C{mailbox} (after any source route) and return it.
    """
    if mailbox.startswith(b'"'):
        close = 1
        while close < len(mailbox):
            if mailbox[close : close + 1] == b"\\":
                close += 2
                continue
            if mailbox[close : close + 1] == b'"':
                break
            close += 1
        local, rest = mailbox[: close + 1], mailbox[close + 1 :]
        if not _QUOTED_CONTENT.match(local[1:-1]) or len(local) < 2 or not local.endswith(b'"'):
            raise SMTPSyntaxError(501, enhanced, f"Bad {what} address syntax")
        if rest and not rest.startswith(b"@"):
            raise SMTPSyntaxError(501, enhanced, f"Bad {what} address syntax")
        domain = rest[1:] if rest else None
    else:
        local, at, domain_ = mailbox.rpartition(b"@")
        if not at:
            local, domain = mailbox, None
        else:
            domain = domain_
        if not _DOT_STRING.match(local) or local.startswith(b".") or local.endswith(b".") or b".." in local:
            raise SMTPSyntaxError(501, enhanced, f"Bad {what} address syntax")
    if domain is None:
        if not localOnlyAllowed:
            raise SMTPSyntaxError(501, enhanced, f"Bad {what} address syntax")
    elif not _DOMAIN.match(domain) or len(domain) > 255:
        raise SMTPSyntaxError(501, enhanced, f"Bad {what} address syntax")
    if len(mailbox) > 512:
        raise SMTPSyntaxError(501, enhanced, f"Bad {what} address syntax")
    return mailbox


def _parseParameters(text: bytes) -> tuple[tuple[bytes, bytes | None], ...]:
    parameters = []
    for word in text.split(b" "):
        if not word:
            continue
        name, equals, value = word.partition(b"=")
        if not _KEYWORD.match(name) or (equals and not _VALUE.match(value)):
            raise SMTPSyntaxError(501, "5.5.4", "Bad parameter syntax")
        parameters.append((name.upper(), value if equals else None))
    if len(parameters) > MAX_PARAMETERS:
        raise SMTPSyntaxError(501, "5.5.4", "Too many parameters")
    return tuple(parameters)


def _decode(octets: bytes) -> str:
    return octets.decode("utf-8", "surrogateescape")


def parseMailFrom(argument: bytes) -> Path:
    """
    Parse the argument of C{MAIL}: C{FROM:<reverse-path> [parameters]}.

    @raise SMTPSyntaxError: with the reply to give.
    """
    inside, rest = _splitPath(argument, b"FROM", "sender", "5.1.7")
    parameters = _parseParameters(rest)
    if inside == b"":
        return Path("", b"", parameters)
    match = _SOURCE_ROUTE.match(inside)
    mailbox = inside[match.end() :] if match else inside
    _checkMailbox(mailbox, "sender", "5.1.7", localOnlyAllowed=False)
    return Path(_decode(mailbox), mailbox, parameters)


def parseRcptTo(argument: bytes) -> Path:
    """
    Parse the argument of C{RCPT}: C{TO:<forward-path> [parameters]}.

    C{<postmaster>} without a domain is accepted (RFC 5321 §4.1.1.3).

    @raise SMTPSyntaxError: with the reply to give.
    """
    inside, rest = _splitPath(argument, b"TO", "recipient", "5.1.3")
    parameters = _parseParameters(rest)
    match = _SOURCE_ROUTE.match(inside)
    mailbox = inside[match.end() :] if match else inside
    if b"@" not in mailbox and mailbox.lower() != b"postmaster":
        raise SMTPSyntaxError(501, "5.1.3", "Bad recipient address syntax")
    _checkMailbox(mailbox, "recipient", "5.1.3", localOnlyAllowed=True)
    return Path(_decode(mailbox), mailbox, parameters)


_BDAT = re.compile(rb"([0-9]{1,15})(?: +(LAST))? *\Z", re.IGNORECASE)


def parseBDAT(argument: bytes) -> tuple[int, bool]:
    """
    Parse the argument of C{BDAT}: C{<size> [LAST]}.

    @return: the chunk size and whether it is the last chunk.
    @raise SMTPSyntaxError: if it does not parse (the caller cannot know
        how many octets follow and must end the session).
    """
    match = _BDAT.match(argument)
    if match is None:
        raise SMTPSyntaxError(501, "5.5.4", "Syntax: BDAT size [LAST]")
    return int(match.group(1)), match.group(2) is not None


_HELO_NAME = re.compile(rb"[\x21-\x7e\x80-\xff]{1,255}\Z")


def parseHelo(argument: bytes) -> str | None:
    """
    The client's name from C{EHLO}/C{HELO}, or L{None} if it is missing or
    unusable (spaces, control characters, over 255 octets).
    """
    name = argument.strip(b" ")
    if not _HELO_NAME.match(name):
        return None
    return _decode(name)


_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|\Z)")


class ReplyReader:
    """
    Assembles a server's replies from a byte stream.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._start = 0
        self._lines: list[bytes] = []
        self._code: bytes | None = None

    def feed(self, data: bytes) -> None:
        """
        Add input.
        """
        self._buffer += data

    def next(self) -> Reply | None:
        """
        The next complete reply, or L{None} until more input arrives.

        @raise ReplyError: the input is no SMTP reply (a line without a
            code, codes that change within a reply, a line or reply too
            long).
        """
        while True:
            end = self._buffer.find(b"\n", self._start)
            if end < 0:
                if len(self._buffer) - self._start > MAX_REPLY_LINE:
                    raise ReplyError("reply line too long")
                return None
            line = self._buffer[self._start : end].rstrip(b"\r")
            self._start = end + 1
            match = _REPLY_LINE.match(line)
            if match is None or (self._code is not None and match.group(1) != self._code):
                raise ReplyError("not an SMTP reply line")
            self._code = match.group(1)
            self._lines.append(line[4:])
            if len(self._lines) > MAX_REPLY_LINES:
                raise ReplyError("reply has too many lines")
            if match.group(2) != b"-":
                reply = Reply(int(self._code), tuple(self._lines), self._buffer[: self._start])
                self._buffer = self._buffer[self._start :]
                self._start = 0
                self._lines = []
                self._code = None
                return reply

    def takeRemaining(self) -> bytes:
        """
        Everything buffered past the last complete reply.
        """
        data, self._buffer = self._buffer, b""
        self._start = 0
        self._lines = []
        self._code = None
        return data

    def __len__(self) -> int:
        return len(self._buffer)


#: The octets xtext escapes: those outside C{!}..C{~}, and C{+} and C{=}.
_XTEXT_ESCAPED = re.compile(rb"[^\x21-\x2a\x2c-\x3c\x3e-\x7e]")


def _xtextEscape(match: re.Match[bytes]) -> bytes:
    return b"+%02X" % (match.group()[0],)


def xtextEncode(value: bytes) -> bytes:
    """
    RFC 3461 xtext: octets outside C{!}..C{~}, and C{+} and C{=}, become
    C{+XX} (upper-case hex).
    """
    # One scan in C: a value with nothing to escape (an address, a host
    # name) costs no Python call per octet.
    return _XTEXT_ESCAPED.sub(_xtextEscape, value)


_XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")


def xtextDecode(value: bytes) -> bytes:
    """
    The octets an xtext stands for.

    @raise ValueError: it is not valid xtext.
    """
    if not _XTEXT.match(value):
        raise ValueError("invalid xtext")
    return re.sub(rb"\+([0-9A-F]{2})", lambda m: bytes((int(m.group(1), 16),)), value)


def reply(code: int, enhanced: str | None, *lines: str | bytes) -> bytes:
    """
    A reply for the client, each line with the code (and the enhanced
    status code, if given), continued lines with C{"-"}.
    """
    items = lines or ("",)
    prefix = b"%d" % (code,)
    status = (enhanced.encode("ascii") + b" ") if enhanced else b""
    out = []
    for index, text in enumerate(items):
        body = text if isinstance(text, bytes) else text.encode("utf-8")
        separator = b" " if index == len(items) - 1 else b"-"
        out.append(prefix + separator + status + body + b"\r\n")
    return b"".join(out)


class DataScanner:
    """
    Finds the end of a C{DATA} message, C{CRLF . CRLF}, in a stream of
    chunks, and notices bare CR and bare LF before it.

    Only the strict sequence ends the message. A bare LF or CR is what lets
    a server that ends the data at C{LF . LF} disagree with the proxy about
    where the message ends (SMTP smuggling), so the proxy refuses such
    messages instead of forwarding them whole.

    @ivar bareLineEnding: a bare CR or LF was seen in the message.
    @ivar size: octets of message data seen so far, the end marker included.
    """

    _END = b"\r\n.\r\n"

    def __init__(self) -> None:
        # The message starts at the beginning of a line: as if after CRLF.
        self._tail = b"\r\n"
        self.bareLineEnding = False
        self.size = 0

    def feed(self, chunk: bytes) -> int | None:
        """
        Scan the next chunk.

        @return: the offset in C{chunk} just past the end marker if the
            message ends in it (octets from there on are the next
            commands), else L{None}.
        """
        window = self._tail + chunk
        found = window.find(self._END)
        end = None if found < 0 else found + len(self._END) - len(self._tail)
        data = chunk if end is None else chunk[:end]
        if not self.bareLineEnding:
            self.bareLineEnding = self._hasBare(data)
        self.size += len(data)
        self._tail = (self._tail + data)[-4:]
        return end

    def _hasBare(self, data: bytes) -> bool:
        if not data:
            return False
        previous = self._tail[-1:]
        crlf = data.count(b"\r\n") + (1 if previous == b"\r" and data[:1] == b"\n" else 0)
        if data.count(b"\n") != crlf:
            return True
        # A CR at the very end may yet be followed by LF; one left over
        # from the previous chunk is judged now.
        crs = data.count(b"\r") - (1 if data.endswith(b"\r") else 0) + (1 if previous == b"\r" else 0)
        return crs != crlf
