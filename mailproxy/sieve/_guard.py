"""
What a ManageSieve client may not say to its backend after login.

Pigeonhole's login process takes C{XCLIENT} from the proxy's address; its
after-login process refuses it, but a backend's after-login behaviour is no
safe bound. L{SieveGuard} answers these itself, with C{NO}:

    - C{XCLIENT} (only the proxy may say it);
    - C{AUTHENTICATE}, C{UNAUTHENTICATE} (a new login at the backend would
      bypass the router);
    - C{STARTTLS} (TLS from the client to the backend through the relay
      would hide every later command from the guard);
    - a command line over L{GUARDED_LINE} octets.

A command may carry literals (C{{n}} or C{{n+}} at the end of a line, then
n octets: the script of C{PUTSCRIPT}); their octets are never read as
commands. Since a backend could disagree about where a literal is (it may
refuse a command before reading its literal), a line inside a literal, or
after one, that starts with C{XCLIENT} ends the session. (The others are
not identity forwarding, and Pigeonhole's after-login process knows none of
them; a script line may well start with such a word.)

Its answers come in order among the backend's responses, which it counts:
a response ends with a line starting C{OK}, C{NO} or C{BYE}, and server
literals are skipped (C{GETSCRIPT}).
"""

from __future__ import annotations

import re

from .._guard import CommandGuard, commandVerb

#: The longest command line forwarded after login, CRLF included, literals
#: not counted.
GUARDED_LINE = 8192

_REFUSED = {
    b"XCLIENT": b'NO "Insufficient authorization."\r\n',
    b"AUTHENTICATE": b'NO "Already authenticated."\r\n',
    b"UNAUTHENTICATE": b'NO "Not allowed through this proxy."\r\n',
    b"STARTTLS": b'NO "TLS is not available after login."\r\n',
}
_LITERAL = re.compile(rb"\{([0-9]{1,10})\+?\}\r?\Z")
_HIDDEN = b'BYE "XCLIENT is not allowed."\r\n'
_HEAD = 64


def _startsXCLIENT(buffer: bytes, position: int) -> bool | None:
    """
    Whether the line starting at C{position} is an C{XCLIENT} command to a
    server that took it for one (however spaced); L{None} if more octets
    must tell.
    """
    head = buffer[position : position + _HEAD]
    lineEnd = head.find(b"\n")
    if lineEnd >= 0:
        head = head[:lineEnd]
    verb = commandVerb(head)
    if lineEnd >= 0 or b"\0" in head or len(head.lstrip()) > len(verb) or len(head) == _HEAD:
        return verb == b"XCLIENT"
    return None if b"XCLIENT".startswith(verb) else False


def _endsResponse(head: bytes) -> bool:
    """
    Whether a server line starting with C{head} ends a response.
    """
    head = head.upper()
    for word in (b"OK", b"NO", b"BYE"):
        if head.startswith(word) and head[len(word) : len(word) + 1] in (b"", b" ", b"\r", b"\n", b"("):
            return True
    return False


class SieveGuard(CommandGuard):
    """
    Guards a ManageSieve session after login (see the module).
    """

    refusals = _REFUSED

    def __init__(self, lineLimit: int = GUARDED_LINE) -> None:
        super().__init__(lineLimit)
        self._inCommand = False
        self._refusal: bytes | None = None
        self._literalLeft = 0
        self._lineStart = True
        # The backend's side.
        self._serverLiteral = 0
        self._head = b""
        self._tail = b""
        self._continued = False

    # The client's side

    def step(self, buffer: bytes, position: int) -> tuple[int, bool] | None:
        if position >= len(buffer):
            return None
        if self._literalLeft:
            return self._literal(buffer, position)
        if self._inCommand and self._lineStart:
            # A line that continues a command after a literal.
            smuggled = _startsXCLIENT(buffer, position)
            if smuggled is None:
                return None
            if smuggled:
                self.close(_HIDDEN, "XCLIENT inside a command")
                return None
        consumed = self.lineStep(buffer, position)
        if consumed is not None:
            self._lineStart = buffer[consumed[0] - 1 : consumed[0]] == b"\n"
        return consumed

    def _literal(self, buffer: bytes, position: int) -> tuple[int, bool] | None:
        end = min(len(buffer), position + self._literalLeft)
        scan = position
        while scan < end:
            if self._lineStart:
                smuggled = _startsXCLIENT(buffer, scan)
                if smuggled is None:
                    break
                if smuggled:
                    self.close(_HIDDEN, "XCLIENT inside a literal")
                    return None
                self._lineStart = False
            found = buffer.find(b"\n", scan, end)
            if found < 0:
                scan = end
                break
            scan = found + 1
            self._lineStart = True
        if scan == position:
            return None
        self._literalLeft -= scan - position
        return scan, self._refusal is None

    def command(self, line: bytes) -> bool:
        if not self._inCommand:
            self._inCommand = True
            self._refusal = self.refusals.get(commandVerb(line))
        literal = _LITERAL.search(line)
        if literal is not None:
            self._literalLeft = int(literal.group(1))
            return self._refusal is None
        self._inCommand = False
        refusal, self._refusal = self._refusal, None
        if refusal is not None:
            self.refuse(refusal)
            return False
        self.outstanding += 1
        return True

    def tooLong(self) -> bytes:
        self._inCommand = False
        self._refusal = None
        return b'NO "Line too long."\r\n'

    # The backend's side

    def countReplies(self, data: bytes) -> int:
        count = start = 0
        while start < len(data):
            if self._serverLiteral:
                taken = min(self._serverLiteral, len(data) - start)
                self._serverLiteral -= taken
                start += taken
                continue
            end = data.find(b"\n", start)
            stop = len(data) if end < 0 else end
            if not self._continued and len(self._head) < 4:
                self._head += data[start : min(stop, start + 4 - len(self._head))]
            self._tail = (self._tail + data[max(start, stop - 16) : stop])[-16:]
            if end < 0:
                return count
            start = end + 1
            literal = _LITERAL.search(self._tail)
            self._tail = b""
            if literal is not None:
                self._serverLiteral = int(literal.group(1))
                self._continued = True
                continue
            if _endsResponse(self._head):
                count += 1
            self._head = b""
            self._continued = False
        return count
