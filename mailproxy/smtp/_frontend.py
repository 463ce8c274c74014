"""
The ESMTP front end: what a client sees before the proxy hands it over.

L{SMTPFrontend} is what both kinds of SMTP listener share: the greeting,
EHLO/HELO with the extensions every backend has, STARTTLS, NOOP, RSET,
HELP, VRFY, QUIT, refusing the rest, pipelined commands answered in order,
and enhanced status codes on every reply. L{SubmissionFrontend} (ports
587/465) adds AUTH PLAIN/LOGIN (and CRAM-MD5 with C{digest_auth}); once
the backend accepted the login the client talks to it directly.
After login, L{mailproxy.smtp._guard.SMTPGuard} keeps the client from
saying what only the proxy may say to the backend (XCLIENT, XFORWARD).
L{mailproxy.smtp._mx.MXFrontend} (port 25) routes every recipient and
never hands a session over: it reads every command itself.

Commands are dispatched through an explicit table, never by name lookup on
the object.
"""

from __future__ import annotations

from base64 import b64encode
from typing import Any, Callable, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._backend import BackendProtocol, LoginJob
from .._commandloop import CommandFrontend
from .._outcomes import EndReason
from .._safetext import oneLine
from .._sasl import Challenge, Refused, ServerExchange, Step, decodeResponse, newChallenge
from .._session import LoginFailed, ProxyContext, newSessionId
from ..settings import Listener
from ..model import Backend, ClientInfo, Credentials, Route
from ._backend import SMTPBackend, SMTPBackendLogin
from ._ehlo import PASSED_ON, BackendExtensions, Extensions
from ._guard import SMTPGuard
from ._parser import COMMAND_LINE, Command, LineReader, SMTPSyntaxError, TooLong, parseBDAT, parseCommand, parseHelo, reply

#: Longest AUTH response line (RFC 4954 §4 calls 12288 octets enough).
MAX_SASL_LINE = 12288 + 2
#: Longest command line unless C{line_length} says otherwise: above
#: Postfix's C{line_length_limit} (2048) and RFC 5321's 512, yet small for
#: an MX that takes connections from the whole Internet.
LINE_LENGTH = 8192
#: Errors after which the connection is closed (Postfix's hard limit).
MAX_ERRORS = 20
#: Verbs of other protocols: a browser or proxy request sent to the SMTP
#: port (cross-protocol attacks); the connection is closed at once.
_FOREIGN_VERBS = frozenset([b"GET", b"POST", b"PUT", b"HEAD", b"CONNECT", b"OPTIONS"])

#: The enhanced code of the goodbye for each reason the core gives.
_GOODBYE_CODES = {
    EndReason.PREAUTH_TIMEOUT: "4.4.2",
    EndReason.IDLE_TIMEOUT: "4.4.2",
    EndReason.SHUTDOWN: "4.3.2",
}


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


class SMTPFrontend(CommandFrontend):
    """
    What submission and MX sessions share.

    States: C{"command"} (reading commands), C{"waiting"} (a command is
    being answered asynchronously; client input stays buffered and reading
    pauses), C{"closed"}; subclasses add their own.

    @ivar helo: the client's EHLO/HELO name, L{None} before it gave one
        (and again after STARTTLS).
    @ivar esmtp: it greeted with EHLO.
    @ivar offered: the extensions offered in the EHLO reply (empty after
        HELO).
    """

    protocolName = "smtp"
    maxBadCommands = MAX_ERRORS
    log = Logger()

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        super().__init__(context, listener)
        self.reader = LineReader()
        self.helo: str | None = None
        self.esmtp = False
        self.offered = Extensions()
        self._commands: dict[bytes, Callable[[Command], None]] = {
            b"EHLO": self.do_EHLO,
            b"HELO": self.do_HELO,
            b"STARTTLS": self.do_STARTTLS,
            b"NOOP": self.do_NOOP,
            b"RSET": self.do_RSET,
            b"QUIT": self.do_QUIT,
            b"HELP": self.do_HELP,
            b"VRFY": self.do_VRFY,
            b"EXPN": self.notImplemented,
            b"ETRN": self.notImplemented,
            b"TURN": self.notImplemented,
            b"ATRN": self.notImplemented,
            b"XCLIENT": self.notAuthorized,
            b"XFORWARD": self.notAuthorized,
        }

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

    # Writing

    def send(self, code: int, enhanced: str | None, *lines: str | bytes) -> None:
        """
        Write a reply.
        """
        self.transport.write(reply(code, enhanced, *lines))

    # FrontendProtocol

    def greet(self) -> None:
        self.send(220, None, self.context.hostname.encode("idna") + b" ESMTP mailproxy")

    def sayGoodbye(self, reason: EndReason, text: str) -> None:
        enhanced = _GOODBYE_CODES.get(reason, "4.7.0")
        self.send(421, enhanced, self.context.hostname.encode("idna") + b" " + text.encode("utf-8"))

    def frontendDataReceived(self, data: bytes) -> None:
        self.reader.feed(data)
        self.process()

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
            if self.state == "closed":
                return
            self.state = "command"
            self.resume("waiting")
            self._then(then, result)
            self.process()

        d.addBoth(done)
        if early:
            # Answered at once: nothing to pause, no order to keep.
            self._then(then, early[0])
            return
        waiting = True
        self.state = "waiting"
        self.pause("waiting")

    def _then(self, then: Callable[[Any], None], result: Any) -> None:
        if isinstance(result, Failure):
            self._internalError(result)
            return
        try:
            then(result)
        except Exception:
            self._internalError(Failure())

    def _internalError(self, reason: Failure) -> None:
        if reason.check(CancelledError) or self.state == "closed":
            return
        self.log.failure("SMTP session {session} failed", reason, session=self.client.sessionId)
        self.result = "internal error"
        self.close(421, "4.3.0", "Internal error, closing connection")

    # The command loop

    def lineLimit(self) -> int:
        """
        The longest command line accepted now.
        """
        return max(COMMAND_LINE, self.limits.lineLengthFor(LINE_LENGTH))

    def processInput(self) -> None:
        """
        Answer command lines; a subclass with input states of its own (SASL
        lines, message data) extends it.
        """
        while self.state == "command" and not self.repliesUnread:
            line = self.reader.nextLine(self.lineLimit())
            if line is None:
                return
            if isinstance(line, TooLong):
                self.error(500, "5.5.2", "Error: line too long")
                continue
            self.command(line)

    def command(self, line: bytes) -> None:
        """
        Dispatch one command line.
        """
        command = parseCommand(line)
        if command is None:
            self.error(500, "5.5.2", "Error: bad syntax")
            return
        if command.verb in _FOREIGN_VERBS:
            self.result = "protocol error: not SMTP"
            self.close(521, "5.5.1", "Protocol error")
            return
        handler = self._commands.get(command.verb)
        if handler is None:
            self.error(500, "5.5.2", "Error: command not recognized")
            return
        handler(command)

    def error(self, code: int, enhanced: str, text: str) -> None:
        """
        Answer a command that was wrong; too many of them end the session.
        """
        self.send(code, enhanced, text)
        self.countBadCommand()

    def tooManyBadCommands(self) -> None:
        self.result = "too many errors"
        self.close(421, "4.7.0", self.context.hostname + " Error: too many errors")

    def syntaxError(self, error: SMTPSyntaxError) -> None:
        """
        Answer a command whose arguments did not parse.
        """
        self.error(error.code, error.enhanced, error.text)

    def close(self, code: int, enhanced: str, text: str) -> None:
        """
        Write a last reply and close the connection.
        """
        self.state = "closed"
        self.send(code, enhanced, text)
        self.closeConnection()

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

    def do_EHLO(self, command: Command) -> None:
        name = parseHelo(command.argument)
        if name is None:
            self.error(501, "5.5.4", "Syntax: EHLO hostname")
            return
        self.resetTransaction()

        def answer(extensions: Extensions) -> None:
            self.helo, self.esmtp, self.offered = name, True, extensions
            passed = [
                keyword + (" " + extensions.keywords[keyword] if extensions.keywords[keyword] else "")
                for keyword in PASSED_ON
                if keyword in extensions
            ]
            # The proxy's own keywords go where servers usually list them:
            # after PIPELINING, SIZE and 8BITMIME.
            split = sum(1 for keyword in ("PIPELINING", "SIZE", "8BITMIME") if keyword in extensions)
            lines: list[str | bytes] = [self.context.hostname.encode("idna")]
            lines += passed[:split] + self.ownKeywords() + passed[split:]
            self.send(250, None, *lines)

        self.wait(self.knowledge.current(), answer)

    def do_HELO(self, command: Command) -> None:
        name = parseHelo(command.argument)
        if name is None:
            self.error(501, "5.5.4", "Syntax: HELO hostname")
            return
        self.resetTransaction()
        self.helo, self.esmtp, self.offered = name, False, Extensions()
        self.send(250, None, self.context.hostname.encode("idna"))

    def do_STARTTLS(self, command: Command) -> None:
        if command.argument.strip(b" "):
            self.error(501, "5.5.4", "Syntax: STARTTLS")
            return
        if self.tlsActive:
            self.error(554, "5.5.1", "Error: TLS already active")
            return
        if not self.tlsAvailable:
            self.error(502, "5.5.1", "Error: command not implemented")
            return
        if self.inTransaction():
            self.error(503, "5.5.1", "Error: MAIL transaction in progress")
            return
        self.send(220, "2.0.0", "Ready to start TLS")
        # Anything pipelined behind STARTTLS arrived in clear and could have
        # been injected (CVE-2011-0411); what was learned before TLS is
        # forgotten (RFC 3207 §4.2).
        self.reader.clear()
        self.helo, self.esmtp, self.offered = None, False, Extensions()
        self.startTLS()

    def do_NOOP(self, command: Command) -> None:
        self.send(250, "2.0.0", "Ok")

    def do_RSET(self, command: Command) -> None:
        if command.argument.strip(b" "):
            self.error(501, "5.5.4", "Syntax: RSET")
            return
        self.resetTransaction()
        self.send(250, "2.0.0", "Ok")

    def do_QUIT(self, command: Command) -> None:
        self.result = "quit"
        self.close(221, "2.0.0", "Bye")

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


class SubmissionFrontend(SMTPFrontend):
    """
    Message submission (RFC 6409): the client logs in with AUTH, then talks
    to its backend directly.

    More states: C{"sasl"} (reading an AUTH response line), C{"login"}
    (waiting for the router and the backend), C{"discard"} (skipping a BDAT
    chunk sent before AUTH), C{"relay"}.
    """

    log = Logger()

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        super().__init__(context, listener)
        self._exchange: ServerExchange | None = None
        self._discard = 0
        self._commands.update(
            {
                b"AUTH": self.do_AUTH,
                b"MAIL": self.authenticationRequired,
                b"RCPT": self.authenticationRequired,
                b"DATA": self.authenticationRequired,
                b"BDAT": self.do_BDAT,
            }
        )

    def mechanisms(self) -> list[str]:
        """
        The SASL mechanisms offered.
        """
        return ["PLAIN", "LOGIN"] + (["CRAM-MD5"] if self.listener.digestAuth else [])

    def ownKeywords(self) -> list[str]:
        own = super().ownKeywords()
        if self.plaintextLoginAllowed:
            own.append("AUTH " + " ".join(self.mechanisms()))
        return own

    def makeBackendLogin(self, job: LoginJob) -> BackendProtocol:
        knowledge = self.knowledge
        return SMTPBackendLogin(
            job,
            self.context.reactor,
            self.limits.backendTimeout,
            hostname=self.context.hostname,
            helo=self.helo,
            esmtp=self.esmtp,
            learn=lambda extensions: knowledge.learn(job.backend.name, extensions),
        )

    def processInput(self) -> None:
        while not self.repliesUnread:
            if self.state == "discard":
                self._discard -= len(self.reader.take(self._discard))
                if self._discard:
                    return
                self.state = "command"
                self.error(530, "5.7.0", "Authentication required")
                continue
            if self.state == "sasl":
                line = self.reader.nextLine(MAX_SASL_LINE)
                if line is None:
                    return
                self.state = "command"
                if isinstance(line, TooLong):
                    self.error(500, "5.5.6", "Authentication Exchange line is too long")
                    continue
                self._saslLine(line)
                continue
            if self.state != "command":
                return
            super().processInput()
            if self.state not in ("discard", "sasl"):
                return

    # Commands

    def authenticationRequired(self, command: Command) -> None:
        """
        Mail commands before AUTH (RFC 6409 §4.3).
        """
        self.error(530, "5.7.0", "Authentication required")

    def do_BDAT(self, command: Command) -> None:
        try:
            size, _ = parseBDAT(command.argument)
        except SMTPSyntaxError:
            # Without a size nobody can tell where the chunk ends.
            self.result = "protocol error: bad BDAT"
            self.close(421, "4.7.0", self.context.hostname + " Error: bad BDAT syntax, closing connection")
            return
        # The chunk follows at once: skip it, then refuse.
        self._discard = size
        self.state = "discard"

    def do_AUTH(self, command: Command) -> None:
        if self.helo is None:
            self.error(503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if not self.plaintextLoginAllowed:
            self.error(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        words = command.argument.strip(b" ").split(b" ")
        if not words[0] or len(words) > 2:
            self.error(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = words[0].upper().decode("ascii", "replace")
        if mechanism not in self.mechanisms():
            self.error(504, "5.5.4", "Unrecognized authentication type")
            return
        initial = None
        if len(words) == 2:
            initial = self._decode(words[1])
            if initial is None:
                return
        challenge = b""
        if mechanism == "CRAM-MD5":
            if initial is not None:
                self.error(501, "5.5.4", "CRAM-MD5 takes no initial response")
                return
            challenge = newChallenge(self.context.reactor.seconds(), self.context.hostname)
        self._exchange = ServerExchange(mechanism, challenge, loginUserRequired=True)
        self._saslStep(self._exchange.start(initial))

    # SASL

    def _decode(self, raw: bytes) -> bytes | None:
        decoded = decodeResponse(raw)
        if decoded is None:
            self.error(501, "5.5.2", "Cannot decode response")
        return decoded

    def _saslLine(self, line: bytes) -> None:
        if line.strip(b" ") == b"*":
            self.error(501, "5.7.0", "Authentication aborted")
            return
        decoded = self._decode(line.strip(b" "))
        if decoded is not None and self._exchange is not None:
            self._saslStep(self._exchange.respond(decoded))

    def _saslStep(self, step: Step) -> None:
        if isinstance(step, Challenge):
            self.send(334, None, b64encode(step.data))
            self.state = "sasl"
        elif isinstance(step, Refused) and step.reason == "authorization":
            self.error(535, "5.7.8", "Authorization identity not supported")
        elif isinstance(step, Refused):
            self.error(501, "5.5.2", "Invalid " + step.mechanism + " response")
        else:
            self._login(step)

    # Login

    def _login(self, credentials: Credentials) -> None:
        self.state = "login"
        d = self.login(credentials)
        d.addCallbacks(self._loggedIn, self._loginFailed)
        d.addErrback(self._internalError)

    def _loggedIn(self, backend: SMTPBackendLogin) -> None:
        self.send(235, "2.7.0", "Authentication successful")
        self.state = "relay"
        chunking = backend.extensions is not None and "CHUNKING" in backend.extensions
        self.handOver(backend, toBackend=self.reader.takeRemaining(), guard=SMTPGuard(chunking=chunking))

    def _loginFailed(self, reason: Failure) -> None:
        reason.trap(LoginFailed)
        failure = cast(LoginFailed, reason.value)
        if failure.kind == "refused" and failure.clientText:
            self.sendLine(oneLine(failure.clientText).encode("utf-8"))
        elif failure.kind == "auth":
            self.send(535, "5.7.8", "Authentication credentials invalid")
        else:
            self.send(454, "4.7.0", oneLine(failure.message) or "Temporary authentication failure")
        if failure.close:
            self.result = "too many failed logins"
            self.close(421, "4.7.0", self.context.hostname + " Error: too many failed authentication attempts")
            return
        self.state = "command"
        self.process()


def buildFrontend(context: ProxyContext, listener: Listener) -> SMTPFrontend:
    """
    The front end for one connection to an SMTP listener, by its C{mode}.
    """
    from ._mx import MXFrontend

    if getattr(listener, "mode", None) == "mx":
        return MXFrontend(context, listener)
    return SubmissionFrontend(context, listener)
