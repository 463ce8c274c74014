"""
The command loop every front end runs before login.

A front end reads its client's commands one after another and answers
each; a login in between stops the loop until the router and the backend
have answered. L{CommandFrontend} holds what every such loop needs: its
state, the guard that keeps a login answered at once from nesting the
loop, counting invalid commands, and closing the session.

A client may pipeline commands without reading the replies: the loop then
stops answering as soon as the transport's write buffer is full
(L{FrontendProtocol.repliesUnread}), reading pauses, and the loop goes on
where it stopped once the client has read (L{CommandFrontend.repliesRead}).
What was read meanwhile stays buffered, bounded by one read and the line
limits.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from ._session import FrontendProtocol, ProxyContext
from .settings import Listener


class CommandFrontend(FrontendProtocol):
    """
    A L{FrontendProtocol} that reads commands in a loop.

    Subclasses implement L{processInput}, besides what L{FrontendProtocol}
    asks for, and call L{process} when input arrives or a login failed.
    Their loops stop while L{repliesUnread}.

    States (subclasses add their own): C{"command"} (reading commands),
    C{"login"} (waiting for the router and the backend; client input stays
    buffered), C{"relay"} (handed over), C{"closed"}.

    @cvar maxBadCommands: invalid commands after which the connection is
        closed.
    @cvar badCommandsGoodbye: the last words then.
    @cvar internalErrorGoodbye: the last words after a bug in login handling.
    @ivar badCommands: invalid commands so far.
    """

    maxBadCommands = 10
    badCommandsGoodbye = "Too many invalid commands."
    internalErrorGoodbye = "Internal error."

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        super().__init__(context, listener)
        self.state = "command"
        self.badCommands = 0
        self._processing = False

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.state = "closed"
        super().connectionLost(reason)

    def sendLine(self, line: bytes) -> None:
        """
        Write one response line.
        """
        self.transport.write(line + b"\r\n")

    def process(self) -> None:
        """
        Answer every complete command buffered, in order, until a command
        must wait.
        """
        # A command answered at once (a login refused without delay) may
        # come back here from inside the loop: the running loop goes on,
        # rather than one more nested per command.
        if self._processing:
            return
        self._processing = True
        try:
            self.processInput()
        finally:
            self._processing = False

    def processInput(self) -> None:
        """
        The loop behind L{process}: read and answer buffered input while
        the state allows and the client reads the replies (not
        L{repliesUnread}).
        """
        raise NotImplementedError

    def repliesRead(self) -> None:
        self.process()

    def countBadCommand(self) -> None:
        """
        An invalid command has been answered; after L{maxBadCommands} of
        them the session ends with L{tooManyBadCommands}.
        """
        self.badCommands += 1
        if self.badCommands >= self.maxBadCommands:
            self.tooManyBadCommands()

    def tooManyBadCommands(self) -> None:
        """
        End the session after one invalid command too many.
        """
        self.result = "too many invalid commands"
        self.closeWith(self.badCommandsGoodbye)

    def fatal(self, reason: str) -> None:
        """
        The input cannot be read any further: say C{reason} and close.
        """
        self.result = "protocol error: " + reason
        self.closeWith(reason)

    def loginHandlingFailed(self, reason: Failure) -> None:
        """
        The last errback of a login: anything that reaches it is a bug in
        answering the login. Log it and end the session, unless the session
        ended first (its login was cancelled).
        """
        if self.state == "closed" or reason.check(CancelledError):
            return
        self.log.failure("{protocol} login handling failed", reason, protocol=self.protocolName)
        self.result = "internal error"
        self.closeWith(self.internalErrorGoodbye)

    def closeAfterLoginFailure(self) -> None:
        """
        Close after a failed login that ends the session, saying why.
        """
        if self.failures >= self.limits.loginFailures:
            self.closeWith("Too many invalid authentication attempts.")
        else:
            self.closeWith("Closing connection.")

    def closeWith(self, goodbye: str | None = None) -> None:
        """
        Read no more commands and close the connection once what was
        written is sent, after the protocol's goodbye with C{goodbye} if
        one is given.
        """
        self.state = "closed"
        if goodbye is not None:
            self.sayGoodbye(goodbye)
        self.closeConnection()
