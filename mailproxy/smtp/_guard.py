"""
What a submission client may not say to its backend after login.

Postfix trusts C{XCLIENT} and C{XFORWARD} from the proxy's address, and
C{XCLIENT LOGIN=} makes the session belong to any user: relayed from a
logged-in client, it would send mail as someone else. L{SMTPGuard} reads
the client's commands after login and answers these itself:

    - C{XCLIENT}, C{XFORWARD}: C{550 5.7.0} (only the proxy may say them);
    - C{AUTH}: C{503 5.5.1} (the session is logged in; a second login at
      the backend would bypass the router);
    - C{STARTTLS}: C{502 5.5.1} (TLS from the client to the backend
      through the relay would hide every later command from the guard);
    - C{TURN}, C{ATRN}: C{502 5.5.1} (they reverse the roles of the
      connection);
    - a command line over L{GUARDED_LINE} octets: C{500 5.5.2};
    - C{BDAT} without a size the proxy can read: C{501 5.5.4}.

Message content is never read as commands, and only the backend says when
it starts: after C{DATA}, client input waits for the backend's reply, and
only C{354} starts content (a refused C{DATA} followed by C{XCLIENT} in the
same packet stays a command). Content ends at the line C{.}; a bare CR or
LF in it ends the session before it reaches the backend, since a backend
that ends data at C{LF . LF} would read what follows as commands the guard
took for content. C{BDAT n} is followed by n octets of content whatever the
backend answers (RFC 3030), if the backend offered C{CHUNKING}; to one that
did not, C{BDAT} is just an unknown command and what follows is read as
commands, as that backend reads it.

The guard also knows when a message's end (its final dot, its last
C{BDAT}) awaits the backend's reply (L{SMTPGuard.awaitingMessageReply}): a
session dropped then is closed only after that reply reached the client.
"""

from __future__ import annotations

from typing import Callable

from .._guard import CommandGuard, commandVerb
from ._parser import DataScanner, SMTPSyntaxError, parseBDAT, reply

#: The longest command line forwarded after login, CRLF included: Postfix's
#: own C{line_length_limit}, so that no line reaches it that it would cut.
GUARDED_LINE = 2048

_REFUSED = {
    b"XCLIENT": reply(550, "5.7.0", "Error: insufficient authorization"),
    b"XFORWARD": reply(550, "5.7.0", "Error: insufficient authorization"),
    b"AUTH": reply(503, "5.5.1", "Error: already authenticated"),
    b"STARTTLS": reply(502, "5.5.1", "Error: command not implemented"),
    b"TURN": reply(502, "5.5.1", "Error: command not implemented"),
    b"ATRN": reply(502, "5.5.1", "Error: command not implemented"),
}
_TOO_LONG = reply(500, "5.5.2", "Error: line too long")
_BARE_LINE_ENDING = reply(554, "5.6.0", "Message refused: bare CR or LF in message data; end lines with CRLF")


class SMTPGuard(CommandGuard):
    """
    Guards a submission session after login (see the module).

    @ivar lastCode: the code of the backend's latest complete reply.
    @ivar chunking: the backend offered C{CHUNKING}, so it takes the octets
        after C{BDAT n} as content.
    """

    refusals = _REFUSED

    def __init__(self, lineLimit: int = GUARDED_LINE, chunking: bool = True) -> None:
        super().__init__(lineLimit)
        self.chunking = chunking
        self.lastCode = b""
        self._head = b""
        self._scanner: DataScanner | None = None
        self._chunkLeft = 0
        # Replies owed and received since login, and how many must have come
        # for the latest message's end (its final dot, its last BDAT) to be
        # answered: a session waiting for that reply is not cut (see
        # awaitingMessageReply).
        self._owed = 0
        self._received = 0
        self._messageEnd = 0
        # The reply that will answer a message's end once the last BDAT
        # chunk under way has all gone to the backend (0: none).
        self._lastChunkReply = 0
        self._whenAnswered: list[Callable[[], None]] = []

    def step(self, buffer: bytes, position: int) -> tuple[int, bool] | None:
        if position >= len(buffer):
            return None
        if self._chunkLeft:
            end = min(len(buffer), position + self._chunkLeft)
            self._chunkLeft -= end - position
            if not self._chunkLeft and self._lastChunkReply:
                # The message's end is with the backend now.
                self._messageEnd, self._lastChunkReply = self._lastChunkReply, 0
            return end, True
        if self._scanner is not None:
            return self._content(buffer, position)
        return self.lineStep(buffer, position)

    def tooLong(self) -> bytes:
        return _TOO_LONG

    @property
    def awaitingMessageReply(self) -> bool:
        """
        A message's end went to the backend, which has not answered it yet
        (it may already have queued the message).
        """
        return self._received < self._messageEnd

    def whenMessageAnswered(self, action: Callable[[], None]) -> None:
        """
        Call C{action} once the backend's reply to the latest message's end
        has been passed to the client (at once if it has).
        """
        if self.awaitingMessageReply:
            self._whenAnswered.append(action)
        else:
            action()

    def _owe(self, messageEnd: bool = False) -> None:
        # One more reply is owed for what is forwarded.
        self.outstanding += 1
        self._owed += 1
        if messageEnd:
            self._messageEnd = self._owed

    def fromBackend(self, data: bytes) -> None:
        super().fromBackend(data)
        if self._whenAnswered and not self.awaitingMessageReply:
            actions, self._whenAnswered = self._whenAnswered, []
            for action in actions:
                action()

    def command(self, line: bytes) -> bool:
        verb = commandVerb(line)
        if self.refuseListed(verb):
            return False
        last = False
        if verb == b"BDAT" and self.chunking:
            argument = line.lstrip(b" \t")[4:].strip(b" \t\r")
            try:
                size, last = parseBDAT(argument)
            except SMTPSyntaxError as e:
                self.refuse(reply(e.code, e.enhanced, e.text))
                return False
            self._chunkLeft = size
        if last and self._chunkLeft:
            # Not the message's end until its octets have all gone on.
            self._owe()
            self._lastChunkReply = self._owed
        else:
            self._owe(messageEnd=last)
        if verb == b"DATA":
            self.afterReplies(self._dataAnswered)
        return True

    def _dataAnswered(self) -> None:
        if self.lastCode == b"354":
            self._scanner = DataScanner()

    def _content(self, buffer: bytes, position: int) -> tuple[int, bool] | None:
        scanner = self._scanner
        assert scanner is not None
        found = scanner.feed(buffer[position:] if position else buffer)
        if scanner.bareLineEnding:
            # What the backend has is an unfinished message: closing the
            # connection discards it.
            self.close(_BARE_LINE_ENDING, "bare CR or LF in message data")
            return None
        if found is None:
            return len(buffer), True
        self._scanner = None
        self._owe(messageEnd=True)
        return position + found, True

    def countReplies(self, data: bytes) -> int:
        count = self._countReplies(data)
        self._received += count
        return count

    def _countReplies(self, data: bytes) -> int:
        # A reply's last line has no "-" after its code.
        count = start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                if len(self._head) < 4:
                    self._head += data[start : start + 4 - len(self._head)]
                return count
            head = self._head + data[start : min(end, start + 4 - len(self._head))] if len(self._head) < 4 else self._head
            self._head = b""
            if head[3:4] != b"-":
                count += 1
                self.lastCode = head[:3]
            start = end + 1
