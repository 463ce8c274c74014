"""
What both SMTP front ends share: the command loop of an ESMTP server.

L{SMTPFrontend} writes replies with enhanced status codes, greets, answers
EHLO/HELO with the extensions every backend has, STARTTLS (the core
decides, L{SMTPFrontend.answerStartTLS} words it), NOOP, RSET, HELP, VRFY
and QUIT, refuses the rest, answers pipelined commands in order
(L{SMTPFrontend.wait}), reads a BDAT chunk's octets
(L{SMTPFrontend.receiveChunk}) and words the goodbye for each
L{EndReason}. It logs nobody in: it is a
L{mailproxy._commandloop.CommandLoop}, and the two front ends are siblings
on it, L{mailproxy.smtp._frontend.SubmissionFrontend} (ports 587/465: AUTH
through the core's login, then the client talks to its backend) and
L{mailproxy.smtp._mx.MXFrontend} (port 25: every recipient routed, every
command read by the proxy).

Commands are dispatched through an explicit table, never by name lookup on
the object.
"""

from __future__ import annotations

from enum import Enum
from functools import lru_cache
from typing import Any, Callable, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._backend import BackendProtocol, LoginJob
from .._commandloop import CommandLoop, LoopState
from .._contract import IProtocolFrontend
from .._outcomes import EndReason, StartTLSRefusal
from .._safetext import oneLine
from .._session import ProxyContext, newSessionId
from ..model import Backend, ClientInfo, Route
from ..settings import Listener
from ._backend import SMTPBackend
from ._ehlo import BackendExtensions, Extensions
from ._parser import COMMAND_LINE, Command, LineReader, SMTPSyntaxError, TooLong, parseBDAT, parseCommand, parseHelo, reply

#: Longest command line unless C{line_length} says otherwise: above
#: Postfix's C{line_length_limit} (2048) and RFC 5321's 512, yet small for
#: an MX that takes connections from the whole Internet.
LINE_LENGTH = 8192
#: Seconds to wait for the backend's reply to the end of the message
#: (RFC 5321 §4.5.3.2.6); a session dropped while waiting for it is closed
#: only after it, at the latest this long after the message's end.
DATA_END_TIMEOUT = 600.0
#: Errors after which the connection is closed (Postfix's hard limit).
MAX_ERRORS = 20
#: Verbs of other protocols: a browser or proxy request sent to the SMTP
#: port (cross-protocol attacks); the connection is closed at once.
_FOREIGN_VERBS = frozenset([b"GET", b"POST", b"PUT", b"HEAD", b"CONNECT", b"OPTIONS"])

_Dialogue = TypeVar("_Dialogue", bound=BackendProtocol)

#: The last words after a bug in answering a command.
INTERNAL_ERROR_GOODBYE = "Internal error, closing connection"

#: The enhanced status code of the C{421} goodbye by why the session ends
#: (C{4.7.0} for the others).
_GOODBYE_CODES = {
    EndReason.PREAUTH_TIMEOUT: "4.4.2",
    EndReason.IDLE_TIMEOUT: "4.4.2",
    EndReason.TIMEOUT: "4.4.2",
    EndReason.SHUTDOWN: "4.3.2",
    EndReason.INTERNAL_ERROR: "4.3.0",
}
#: The goodbye's words by why the session ends, where SMTP has its own
#: (Postfix's) rather than the core's.
_GOODBYE_TEXTS = {
    EndReason.TOO_MANY_FAILED_LOGINS: "Error: too many failed authentication attempts",
}
#: The answer to a refused STARTTLS, by why the core refused it.
_STARTTLS_REFUSALS = {
    StartTLSRefusal.ARGUMENTS: (501, "5.5.4", "Syntax: STARTTLS"),
    StartTLSRefusal.ACTIVE: (554, "5.5.1", "Error: TLS already active"),
    StartTLSRefusal.UNAVAILABLE: (502, "5.5.1", "Error: command not implemented"),
    StartTLSRefusal.TRANSACTION: (503, "5.5.1", "Error: MAIL transaction in progress"),
}


class SMTPState(str, Enum):
    """
    The states of an SMTP command loop besides those of L{LoopState}: what
    follows a command that is not a command.
    """

    #: The octets of a BDAT chunk (see L{SMTPFrontend.receiveChunk}).
    CHUNK = "chunk"
    #: A DATA message streaming to the backend (MX).
    DATA = "data"

    def __str__(self) -> str:
        return self.value


@lru_cache(maxsize=8)
def hostBytes(hostname: str) -> bytes:
    """
    The proxy's name as replies write it (IDNA): the same for every reply
    of every session with this name, so worked out once.
    """
    return hostname.encode("idna")


def _probeClient() -> ClientInfo:
    """
    Who a probe says it is in a PROXY header: the proxy itself.
    """
    return ClientInfo(
        sessionId="probe-" + newSessionId(), address="127.0.0.1", port=0, localAddress="127.0.0.1", localPort=0
    )


def backendExtensions(context: ProxyContext, portName: str) -> BackendExtensions:
    """
    The extension knowledge the sessions of C{context} share about the
    backends with a C{portName} port.

    A new configuration (a reload) with other backends starts new
    knowledge, keeping what was learned about backends that did not
    change.
    """
    key = ("smtp-extensions", portName)
    backends = tuple(backend for _, backend in sorted(context.backends.items()) if portName in backend.ports)
    entry = context.shared.get(key)
    if entry is not None and entry[0] == backends:
        return entry[1]  # type: ignore[no-any-return]

    def probe(backend: Backend) -> Deferred[Extensions]:
        job = LoginJob(
            route=Route(backend, rule="EHLO probe"),
            protocol="smtp",
            client=_probeClient(),
            credentials=None,
            user="",
            password=None,
            portName=portName,
        )
        protocol = SMTPBackend(
            job, context.reactor, context.limits.backendTimeout, hostname=context.hostname, purpose="probe"
        )

        def probed(result: SMTPBackend) -> Extensions:
            if result.transport is not None:
                result.transport.loseConnection()
            assert result.extensions is not None
            return result.extensions

        return context.backendConnector(context.reactor, protocol).addCallback(probed)

    knowledge = BackendExtensions(context.reactor, backends, probe)
    if entry is not None:
        previous: BackendExtensions = entry[1]
        for backend in backends:
            if backend in entry[0]:
                known = previous.extensionsOf(backend.name)
                if known is not None:
                    knowledge.learn(backend.name, known)
    context.shared[key] = (backends, knowledge)
    return knowledge


@implementer(IProtocolFrontend)
class SMTPFrontend(CommandLoop):
    """
    What submission and MX sessions share.

    States: those of L{LoopState} (C{WAITING}: a command is being answered
    asynchronously, see L{wait}) and L{SMTPState}.

    @ivar helo: the client's EHLO/HELO name, L{None} before it gave one
        (and again after STARTTLS).
    @ivar esmtp: it greeted with EHLO.
    @ivar offered: the extensions offered in the EHLO reply (empty after
        HELO).
    """

    protocolName = "smtp"
    maxBadCommands = MAX_ERRORS
    badCommandsReason = EndReason.TOO_MANY_ERRORS
    badCommandsGoodbye = "Error: too many errors"
    log = Logger()
    #: Whether EHLO is refused (421) while no backend's extensions are
    #: known: on MX, where a sending MTA told no SMTPUTF8 bounces such mail
    #: for good. Submission then offers its own keywords (AUTH), and a
    #: login gets the backend's temporary failure.
    refusedWhileNoBackendKnown = False
    #: The method answering each command, by verb: one table for every
    #: session (a table of bound methods would cost each session its own);
    #: subclasses extend it.
    _commands = {
        b"EHLO": "do_EHLO",
        b"HELO": "do_HELO",
        b"STARTTLS": "do_STARTTLS",
        b"NOOP": "do_NOOP",
        b"RSET": "do_RSET",
        b"QUIT": "do_QUIT",
        b"HELP": "do_HELP",
        b"VRFY": "do_VRFY",
        b"EXPN": "notImplemented",
        b"ETRN": "notImplemented",
        b"TURN": "notImplemented",
        b"ATRN": "notImplemented",
        b"XCLIENT": "notAuthorized",
        b"XFORWARD": "notAuthorized",
    }

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        super().__init__(context, listener)
        self.input = LineReader()
        self.helo: str | None = None
        self.esmtp = False
        self.offered = Extensions()
        self._chunkLeft = 0
        self._chunkSink: Callable[[bytes], None] | None = None
        self._chunkThen: Callable[[], None] = lambda: None

    @property
    def portName(self) -> str:
        """
        The key of a backend's C{ports} this listener's sessions reach.
        """
        return "smtp"

    @property
    def knowledge(self) -> BackendExtensions:
        """
        What the backends behind this listener support.
        """
        return backendExtensions(self.context, self.portName)

    def backendFor(self, dialogue: Callable[..., _Dialogue], job: LoginJob, **options: Any) -> _Dialogue:
        """
        A connection to C{job}'s backend that greets it as the client
        greeted the proxy (EHLO or HELO, with the client's name), tells
        L{knowledge} the extensions it finds, and sends XCLIENT without
        asking first where L{knowledge} knows the backend offers it.

        @param dialogue: the client: C{SMTPBackendLogin} (submission's
            login) or L{SMTPBackend} (MX's relay).
        @param options: more arguments of C{dialogue} (the purpose of an
            L{SMTPBackend}).
        """
        knowledge = self.knowledge
        name = job.backend.name
        return dialogue(
            job,
            self.context.reactor,
            self.limits.backendTimeout,
            hostname=self.context.hostname,
            helo=self.helo,
            esmtp=self.esmtp,
            learn=lambda extensions: knowledge.learn(name, extensions),
            knownXCLIENT=knowledge.xclientOf(name),
            rememberXCLIENT=lambda attributes: knowledge.learnXCLIENT(name, attributes),
            knownExtensions=knowledge.extensionsOf(name),
            **options,
        )

    # Writing

    def send(self, code: int, enhanced: str | None, *lines: str | bytes) -> None:
        """
        Write a reply.
        """
        self.transport.write(reply(code, enhanced, *lines))

    # The contract (IProtocolFrontend)

    def greet(self) -> None:
        self.send(220, None, hostBytes(self.context.hostname) + b" ESMTP mailproxy")

    def sayGoodbye(self, reason: EndReason, text: str) -> None:
        enhanced = _GOODBYE_CODES.get(reason, "4.7.0")
        text = oneLine(_GOODBYE_TEXTS.get(reason, text), ascii=True)
        if reason is EndReason.INTERNAL_ERROR:
            # The one goodbye that has always gone without the host name.
            self.send(421, enhanced, text)
        else:
            self.send(421, enhanced, hostBytes(self.context.hostname) + b" " + text.encode("utf-8"))

    def answerStartTLS(self, command: Command, refusal: StartTLSRefusal | None) -> None:
        if refusal is not None:
            self.error(*_STARTTLS_REFUSALS[refusal])
        else:
            self.send(220, "2.0.0", "Ready to start TLS")

    def forgetBeforeTLS(self) -> None:
        # What was learned before TLS is forgotten (RFC 3207 §4.2).
        self.helo, self.esmtp, self.offered = None, False, Extensions()

    # Waiting

    def wait(self, d: Deferred[Any], then: Callable[[Any], None]) -> None:
        """
        Answer the current command once C{d} fires: no other command is
        read meanwhile, so replies keep the order of the commands.
        """
        early: list[Any] = []
        waiting = False

        def done(result: Any) -> None:
            if not waiting:
                early.append(result)
                return
            if self.state is LoopState.CLOSED:
                return
            self.state = LoopState.COMMAND
            self.resume("waiting")
            self._then(then, result)
            self.process()

        d.addBoth(done)
        if early:
            # Answered at once: nothing to pause, no order to keep.
            self._then(then, early[0])
            return
        waiting = True
        self.state = LoopState.WAITING
        self.pause("waiting")

    def _then(self, then: Callable[[Any], None], result: Any) -> None:
        if isinstance(result, Failure):
            self.internalError(result)
            return
        try:
            then(result)
        except Exception:
            self.internalError(Failure())

    def internalError(self, reason: Failure) -> None:
        """
        Answering a command failed (a bug): log it and end the session,
        unless it ended first.
        """
        if reason.check(CancelledError) or self.state is LoopState.CLOSED:
            return
        self.log.failure("SMTP session {session} failed", reason, session=self.client.sessionId)
        self.end(EndReason.INTERNAL_ERROR, INTERNAL_ERROR_GOODBYE)

    # The command loop

    def lineLimit(self) -> int:
        """
        The longest command line accepted now.
        """
        return max(COMMAND_LINE, self.limits.lineLengthFor(LINE_LENGTH))

    def readNext(self) -> bool:
        if self.state is SMTPState.CHUNK:
            return self._readChunk()
        return super().readNext()

    def readCommand(self) -> bool:
        line = self.input.nextLine(self.lineLimit())
        if line is None:
            return False
        if isinstance(line, TooLong):
            self.error(500, "5.5.2", "Error: line too long")
        else:
            self.command(line)
        return True

    def command(self, line: bytes) -> None:
        """
        Dispatch one command line.
        """
        command = parseCommand(line)
        if command is None:
            self.error(500, "5.5.2", "Error: bad syntax")
            return
        if command.verb in _FOREIGN_VERBS:
            self.send(521, "5.5.1", "Protocol error")
            self.end(EndReason.PROTOCOL_ERROR, detail="not SMTP")
            return
        handler = self._commands.get(command.verb)
        if handler is None:
            self.error(500, "5.5.2", "Error: command not recognized")
            return
        getattr(self, handler)(command)

    def error(self, code: int, enhanced: str, text: str) -> None:
        """
        Answer a command that was wrong; too many of them end the session.
        """
        self.send(code, enhanced, text)
        self.countBadCommand()

    def syntaxError(self, error: SMTPSyntaxError) -> None:
        """
        Answer a command whose arguments did not parse.
        """
        self.error(error.code, error.enhanced, error.text)

    # BDAT chunks

    def chunkSize(self, command: Command) -> tuple[int, bool] | None:
        """
        The size of the chunk a BDAT command announces and whether it is
        the last; L{None} if it has no size, after closing the session:
        without one nobody can tell where the chunk ends.
        """
        try:
            return parseBDAT(command.argument)
        except SMTPSyntaxError:
            self.end(EndReason.PROTOCOL_ERROR, "Error: bad BDAT syntax, closing connection", "bad BDAT")
            return None

    def receiveChunk(self, size: int, sink: Callable[[bytes], None] | None, end: Callable[[], None]) -> None:
        """
        Read the C{size} octets of a BDAT chunk, which follow its command
        at once, as they arrive: pass them to C{sink} (or skip them if it
        is L{None}), then go back to reading commands and call C{end}.
        """
        self._chunkLeft = size
        self._chunkSink = sink
        self._chunkThen = end
        self.state = SMTPState.CHUNK

    def _readChunk(self) -> bool:
        if self._chunkLeft and not len(self.input):
            return False
        data = self.input.take(self._chunkLeft)
        self._chunkLeft -= len(data)
        if self._chunkSink is not None:
            self._chunkSink(data)
        if self._chunkLeft > 0:
            return True
        self.state = LoopState.COMMAND
        self._chunkSink = None
        self._chunkThen()
        return True

    # Hooks for subclasses

    def ownKeywords(self) -> list[str]:
        """
        The EHLO keywords the proxy itself implements on this connection
        now (STARTTLS, AUTH).
        """
        return ["STARTTLS"] if self.tlsAvailable else []

    def resetTransaction(self) -> None:
        """
        Forget the mail transaction (RSET, EHLO, HELO).
        """

    def inTransaction(self) -> bool:
        """
        A mail transaction is open (between MAIL and its end).
        """
        return False

    # Commands

    def _clientName(self, command: Command) -> str | None:
        # EHLO and HELO: the name the client gives; the transaction is
        # forgotten.
        name = parseHelo(command.argument)
        if name is None:
            self.error(501, "5.5.4", "Syntax: " + command.verb.decode("ascii") + " hostname")
            return None
        self.resetTransaction()
        return name

    def do_EHLO(self, command: Command) -> None:
        name = self._clientName(command)
        if name is None:
            return

        def answer(extensions: Extensions | None) -> None:
            if extensions is None and self.refusedWhileNoBackendKnown:
                # No backend could be asked: whatever the proxy offered
                # would be a guess, and a sender told there is no SMTPUTF8
                # bounces such mail for good. 421 makes it try later.
                self.send(421, "4.3.0", hostBytes(self.context.hostname) + b" Service not available, try again later")
                self.end(EndReason.BACKENDS_UNKNOWN)
                return
            if extensions is None:
                extensions = Extensions()
            self.helo, self.esmtp, self.offered = name, True, extensions
            before, after = extensions.passedOn
            self.send(250, None, hostBytes(self.context.hostname), *before, *self.ownKeywords(), *after)

        knowledge = self.knowledge
        known = knowledge.known()
        if known is not None:
            # Every backend is known (the usual case): answered at once.
            self._then(answer, known)
        else:
            self.wait(knowledge.current(), answer)

    def do_HELO(self, command: Command) -> None:
        name = self._clientName(command)
        if name is None:
            return
        self.helo, self.esmtp, self.offered = name, False, Extensions()
        self.send(250, None, hostBytes(self.context.hostname))

    def do_STARTTLS(self, command: Command) -> None:
        self.startTLSCommand(command, bool(command.argument.strip(b" ")), self.inTransaction())

    def do_NOOP(self, command: Command) -> None:
        self.send(250, "2.0.0", "Ok")

    def do_RSET(self, command: Command) -> None:
        if command.argument.strip(b" "):
            self.error(501, "5.5.4", "Syntax: RSET")
            return
        self.resetTransaction()
        self.send(250, "2.0.0", "Ok")

    def do_QUIT(self, command: Command) -> None:
        self.send(221, "2.0.0", "Bye")
        self.end(EndReason.QUIT)

    def do_HELP(self, command: Command) -> None:
        self.send(214, "2.0.0", "See RFC 5321")

    def do_VRFY(self, command: Command) -> None:
        self.send(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def notImplemented(self, command: Command) -> None:
        """
        Commands the proxy never offers.
        """
        self.error(502, "5.5.1", "Error: command not implemented")

    def notAuthorized(self, command: Command) -> None:
        """
        Identity commands (XCLIENT, XFORWARD) are the proxy's to send, never
        a client's: a backend trusts them from the proxy's address, so a
        relayed one would let the client pose as another address or user.
        """
        self.error(550, "5.7.0", "Error: insufficient authorization")
