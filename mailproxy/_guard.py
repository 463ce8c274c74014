"""
Post-login guards: what a relayed client may not say to its backend.

A backend trusts some commands only because they come from the proxy's
address: identity forwarding (SMTP C{XCLIENT} and C{XFORWARD}, POP3 and
ManageSieve C{XCLIENT}). Relayed untouched after login, such a command from
the client would let it pose as another address or, with C{XCLIENT LOGIN},
as another user. So a protocol whose backends take such commands hands the
relay a guard: it reads the client's commands after login (the contents of
a message or a literal are never read as commands), forwards everything but
the forbidden ones, and answers those itself.

Its answers keep their place among the backend's replies to pipelined
commands: at a refused command the guard stops reading the client until
the backend has answered every command forwarded before it. The guard holds
at most what one read from the client brought, besides one command line
(bounded): while it waits, reading from the client pauses.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Mapping

from zope.interface import Interface, implementer

from ._outcomes import EndReason


class IRelayLink(Interface):
    """
    What a relay offers its guard.
    """

    def forward(data: bytes) -> None:
        """
        Write client octets to the backend.
        """

    def answer(data: bytes) -> None:
        """
        Write the proxy's own reply to the client.
        """

    def holdClient() -> None:
        """
        Stop reading from the client until L{releaseClient}.
        """

    def releaseClient() -> None:
        """
        Read from the client again (unless something else pauses it).
        """

    def close(reason: EndReason, detail: str = "") -> None:
        """
        End the session: both connections are closed, after what was
        written; the session-end log gives C{reason} with C{detail}.
        """


class IRelayGuard(Interface):
    """
    Sees the client's octets before the backend does, and the backend's
    replies; decides what reaches the backend.
    """

    def attach(link: IRelayLink) -> None:
        """
        The relay starts: C{link} is how the guard forwards and answers.
        """

    def fromClient(data: bytes) -> None:
        """
        The client sent C{data}.
        """

    def fromBackend(data: bytes) -> None:
        """
        The backend sent C{data}; it has already been passed to the client.
        """

    def whenDrained(action: Callable[[], None]) -> None:
        """
        The client has stopped sending: run C{action} once every command it
        sent that the guard still holds has been forwarded or answered (at
        once if none is held). An unfinished command line is dropped.
        """


@implementer(IRelayGuard)
class CommandGuard:
    """
    The machinery every protocol's guard shares: a buffer of client input,
    the count of replies the backend owes, and actions that wait for that
    count to reach zero (a refusal in order, a decision on the reply to
    C{DATA}).

    Subclasses implement L{step} (consume the next piece of client input;
    L{lineStep} reads a command line and asks L{command}) and
    L{countReplies} (complete replies in a piece of backend output).

    @cvar refusals: the command words (upper-case) answered instead of
        forwarded, and each one's reply.
    @ivar link: the relay, once attached.
    @ivar outstanding: replies the backend owes for what was forwarded.
    @ivar lineLimit: the longest command line forwarded, line end included.
    """

    refusals: ClassVar[Mapping[bytes, bytes]] = {}

    def __init__(self, lineLimit: int) -> None:
        self.link: IRelayLink | None = None
        self.lineLimit = lineLimit
        self.outstanding = 0
        self.closed = False
        self._buffer = b""
        self._held = False
        self._then: Callable[[], None] | None = None
        self._skipping = False
        self._drained: Callable[[], None] | None = None

    # IRelayGuard

    def attach(self, link: IRelayLink) -> None:
        self.link = link

    def fromClient(self, data: bytes) -> None:
        if self.closed:
            return
        self._buffer = self._buffer + data if self._buffer else data
        self._run()

    def fromBackend(self, data: bytes) -> None:
        if self.closed:
            return
        # A reply nobody asked for (a 421 before closing) owes nothing.
        self.outstanding = max(0, self.outstanding - self.countReplies(data))
        if self._held and self.outstanding == 0:
            self._held = False
            assert self.link is not None
            self.link.releaseClient()
            self._run()

    def whenDrained(self, action: Callable[[], None]) -> None:
        self._drained = action
        self._checkDrained()

    def _checkDrained(self) -> None:
        if self._drained is not None and self._then is None and not self.closed:
            action, self._drained = self._drained, None
            # What is left is no whole command: it never reaches the backend.
            self._buffer = b""
            action()

    # For subclasses

    def step(self, buffer: bytes, position: int) -> tuple[int, bool] | None:
        """
        Consume the next piece of client input from C{buffer[position:]}.

        @return: where the piece ends and whether it goes to the backend
            (a refused command does not: the subclass called L{refuse});
            or L{None} until more input arrives.
        """
        raise NotImplementedError

    def countReplies(self, data: bytes) -> int:
        """
        How many replies end in this piece of backend output.
        """
        raise NotImplementedError

    def command(self, line: bytes) -> bool:
        """
        Judge one command line (without its LF) read by L{lineStep}.

        @return: whether it goes to the backend; if not, the subclass
            called L{refuse}.
        """
        raise NotImplementedError

    def tooLong(self) -> bytes:
        """
        The reply to a command line over L{lineLimit}.
        """
        raise NotImplementedError

    def lineStep(self, buffer: bytes, position: int) -> tuple[int, bool] | None:
        """
        A L{step} that reads one command line and lets L{command} judge it.
        A line over L{lineLimit} is dropped as it arrives (never more than
        a line is held) and answered with L{tooLong}.
        """
        end = buffer.find(b"\n", position)
        if self._skipping:
            if end < 0:
                return (len(buffer), False) if position < len(buffer) else None
            self._skipping = False
            self.refuse(self.tooLong())
            return end + 1, False
        if end < 0:
            if len(buffer) - position >= self.lineLimit:
                self._skipping = True
                return len(buffer), False
            return None
        if end + 1 - position > self.lineLimit:
            self.refuse(self.tooLong())
            return end + 1, False
        return end + 1, self.command(buffer[position:end])

    def afterReplies(self, action: Callable[[], None]) -> None:
        """
        Run C{action} once the backend has answered everything forwarded
        so far; no client input is read before.
        """
        self._then = action

    def refuseListed(self, verb: bytes) -> bool:
        """
        Refuse a command whose word L{refusals} lists, with its reply.

        @return: whether it was refused.
        """
        refusal = self.refusals.get(verb)
        if refusal is None:
            return False
        self.refuse(refusal)
        return True

    def refuse(self, reply: bytes) -> None:
        """
        Answer a command that is not forwarded, in its place among the
        backend's replies.
        """
        self.afterReplies(lambda: self._answer(reply))

    def close(self, reply: bytes, problem: str) -> None:
        """
        Say C{reply} and end the session as a protocol error; nothing more
        is forwarded.

        @param problem: what the session-end log says after
            C{protocol error:}.
        """
        assert self.link is not None
        self.closed = True
        self.link.answer(reply)
        self.link.close(EndReason.PROTOCOL_ERROR, problem)

    # The loop

    def _answer(self, reply: bytes) -> None:
        assert self.link is not None
        self.link.answer(reply)

    def _run(self) -> None:
        link = self.link
        assert link is not None
        buffer = self._buffer
        position = start = 0  # bytes from start to position go to the backend
        while not self.closed:
            if self._then is not None:
                if self.outstanding:
                    # The backend must have the commands it is to answer.
                    self._held = True
                    link.holdClient()
                    break
                action, self._then = self._then, None
                action()
                continue
            consumed = self.step(buffer, position)
            if consumed is None:
                break
            end, forward = consumed
            if not forward:
                if start < position:
                    link.forward(buffer[start:position])
                start = end
            position = end
        if self.closed:
            self._buffer = b""
            return
        if start < position:
            link.forward(buffer[start:position] if start or position < len(buffer) else buffer)
        self._buffer = buffer[position:] if position else buffer
        self._checkDrained()


def commandVerb(line: bytes) -> bytes:
    """
    The command word of C{line}, upper-cased, read as leniently as any
    server might: leading white space skipped and the word ended by white
    space, as Postfix's tokenizer reads it (space, tab, CR, LF, vertical
    tab, form feed: C{XCLIENT\\x0bLOGIN=...} is an XCLIENT to Postfix), or by
    a NUL (where a C string ends).
    """
    words = line.split(b"\0", 1)[0].split(None, 1)
    return words[0].upper() if words else b""
