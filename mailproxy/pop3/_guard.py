"""
What a POP3 client may not say to its backend after login.

Dovecot's POP3 login process takes C{XCLIENT} (and its old alias C{XOIP})
from the proxy's address; its mail process refuses them, but a backend's
after-login behaviour is no safe bound. L{POP3Guard} answers these itself:

    - C{XCLIENT}, C{XOIP}: C{-ERR} (only the proxy may say them);
    - C{USER}, C{PASS}, C{APOP}, C{AUTH}: C{-ERR} (the session is logged
      in; a second login at the backend would bypass the router);
    - C{STLS}: C{-ERR} (TLS from the client to the backend through the
      relay would hide every later command from the guard);
    - a command line over L{GUARDED_LINE} octets: C{-ERR}.

Its answers come in order among the backend's replies, which it counts: a
C{+OK} to C{RETR}, C{TOP}, C{CAPA}, or to C{LIST}/C{UIDL} without an
argument, is followed by lines up to a C{.} line (RFC 1939, RFC 2449).
"""

from __future__ import annotations

from collections import deque

from .._guard import CommandGuard, commandVerb

#: The longest command line forwarded after login, CRLF included (RFC 2449
#: allows 255; Dovecot's XCLIENT line may take 1024).
GUARDED_LINE = 1024

_NOT_AUTHORIZED = b"-ERR Insufficient authorization.\r\n"
_LOGGED_IN = b"-ERR Already logged in.\r\n"
_REFUSED = {
    b"XCLIENT": _NOT_AUTHORIZED,
    b"XOIP": _NOT_AUTHORIZED,
    b"USER": _LOGGED_IN,
    b"PASS": _LOGGED_IN,
    b"APOP": _LOGGED_IN,
    b"AUTH": _LOGGED_IN,
    b"STLS": _LOGGED_IN,
}
#: Commands whose C{+OK} always starts a multi-line response.
_MULTI_LINE = frozenset([b"RETR", b"TOP", b"CAPA"])
#: Commands whose C{+OK} starts one when they have no argument.
_MULTI_LINE_LISTING = frozenset([b"LIST", b"UIDL"])


class POP3Guard(CommandGuard):
    """
    Guards a POP3 session after login (see the module).
    """

    refusals = _REFUSED

    def __init__(self, lineLimit: int = GUARDED_LINE) -> None:
        super().__init__(lineLimit)
        self._multiLine: deque[bool] = deque()
        self._head = b""
        self._inBody = False
        self._tail = b""

    def step(self, buffer: bytes, position: int) -> tuple[int, bool] | None:
        return self.lineStep(buffer, position)

    def tooLong(self) -> bytes:
        return b"-ERR Line too long.\r\n"

    def command(self, line: bytes) -> bool:
        verb = commandVerb(line)
        if self.refuseListed(verb):
            return False
        self.outstanding += 1
        if verb in _MULTI_LINE_LISTING:
            self._multiLine.append(not line.strip(b" \t\r")[len(verb) :].strip(b" \t"))
        else:
            self._multiLine.append(verb in _MULTI_LINE)
        return True

    def countReplies(self, data: bytes) -> int:
        count = start = 0
        while start < len(data):
            if self._inBody:
                # The body ends at a line ".", found across reads by keeping
                # the last octets.
                window = self._tail + data[start:]
                ends = [found for found in (window.find(b"\n.\r\n"), window.find(b"\n.\n")) if found >= 0]
                if not ends:
                    self._tail = window[-3:]
                    return count
                found = min(ends)
                length = 4 if window.startswith(b"\n.\r\n", found) else 3
                start += found + length - len(self._tail)
                self._inBody, self._tail = False, b""
                count += 1
                continue
            end = data.find(b"\n", start)
            if len(self._head) < 3:
                self._head += data[start : start + 3 - len(self._head) if end < 0 else min(end, start + 3 - len(self._head))]
            if end < 0:
                return count
            multiLine = self._multiLine.popleft() if self._multiLine else False
            if multiLine and self._head == b"+OK":
                # The body starts at the beginning of a line.
                self._inBody, self._tail = True, b"\n"
            else:
                count += 1
            self._head = b""
            start = end + 1
        return count
