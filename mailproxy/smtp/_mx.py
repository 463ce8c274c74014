"""
The inbound MX front end (port 25): every recipient is routed.

The proxy answers EHLO and MAIL itself. At the first recipient of a
transaction it asks the router, connects that recipient's backend (which
learns the real client by XCLIENT or a PROXY header), replays MAIL FROM
with its parameters and sends the RCPT; the backend's answer is the
client's. Later recipients on the same backend are forwarded; recipients on
another backend get C{452 4.5.3}, which makes the sending MTA deliver them
in a later transaction (RFC 5321 §4.5.3.1.10). Nothing is accepted that no
backend has accepted, and domains the router does not serve are refused:
the proxy is never an open relay.

The message (DATA or BDAT chunks) streams to the backend with backpressure,
never held in memory. The proxy finds where it ends, the strict
C{CRLF . CRLF} or the BDAT octet count, so that the next transaction is
routed anew. A message with a bare CR or LF is refused rather than passed
on: a backend that ends data at C{LF . LF} would otherwise read the rest as
commands the proxy never saw (SMTP smuggling).
"""

from __future__ import annotations

from typing import Any, Callable, cast

import idna

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._backend import BackendFailure, LoginJob
from .._commandloop import LoopState
from .._contract import IProtocolFrontend
from .._outcomes import EndReason
from .._safetext import logQuote
from .._session import ProxyContext, Timer
from .._tls import _normalName
from ..settings import Listener
from ..model import Rejection, Route, RouteRequest
from .._routing import routeLogin
from ._backend import BackendLost, SMTPBackend
from ._base import DATA_END_TIMEOUT, SMTPFrontend, SMTPState
from ._parser import (
    Command,
    DataScanner,
    Path,
    Reply,
    SMTPSyntaxError,
    parseMailFrom,
    parseRcptTo,
    reply,
)

#: Recipients accepted in one transaction (RFC 5321 asks for at least 100).
MAX_RECIPIENTS = 1000
#: Which offered extension each MAIL parameter needs.
_MAIL_PARAMETERS = {b"SIZE": "SIZE", b"BODY": "8BITMIME", b"SMTPUTF8": "SMTPUTF8", b"RET": "DSN", b"ENVID": "DSN"}
#: Which offered extension each RCPT parameter needs.
_RCPT_PARAMETERS = {b"NOTIFY": "DSN", b"ORCPT": "DSN"}

_LOST = (451, "4.4.2", "Lost connection with the mail server, try again later")


def _lacking(backend: SMTPBackend, path: Path, needs: dict[bytes, str]) -> str | None:
    """
    The extension one of C{path}'s parameters needs (by C{needs}) that
    C{backend} did not list, if any.
    """
    extensions = backend.extensions
    if extensions is None:
        return None
    for keyword, _ in path.parameters:
        needed = needs.get(keyword.upper())
        if needed is not None and needed not in extensions:
            return needed
    return None


@implementer(IPushProducer)
class _ClientReading:
    """
    Lets a backend's full send buffer pause reading from the client while
    a message streams to it.
    """

    def __init__(self, frontend: SMTPFrontend) -> None:
        self._frontend = frontend

    def pauseProducing(self) -> None:
        self._frontend.pause("backend buffer full")

    def resumeProducing(self) -> None:
        self._frontend.resume("backend buffer full")

    def stopProducing(self) -> None:
        self._frontend.resume("backend buffer full")


def _lostToNone(reason: Failure) -> None:
    reason.trap(BackendLost)
    return None


@implementer(IProtocolFrontend)
class MXFrontend(SMTPFrontend):
    """
    One inbound SMTP session: a session without a login, timed by client
    silence (C{preauth_timeout}) rather than by a pre-auth deadline.

    One more state: C{"data"} (a DATA message streams to the backend); a
    BDAT chunk streams to the backend, or is skipped when it is refused.

    @ivar mailFrom: the transaction's sender, once MAIL was accepted.
    @ivar accepted: recipients the backend accepted in this transaction.
    @ivar bound: the name of the backend the transaction goes to, once a
        recipient was accepted.
    @ivar backend: the current backend connection, if any.
    @ivar messages: messages the backends accepted in this session.
    """

    refusedWhileNoBackendKnown = True

    defaultEndReason = EndReason.NO_MAIL
    log = Logger()
    _commands = {
        **SMTPFrontend._commands,
        b"MAIL": "do_MAIL",
        b"RCPT": "do_RCPT",
        b"DATA": "do_DATA",
        b"BDAT": "do_BDAT",
        b"AUTH": "do_AUTH",
    }

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        super().__init__(context, listener)
        self.mailFrom: Path | None = None
        self.accepted = 0
        self.recipients = 0
        self.bound: str | None = None
        self.backend: SMTPBackend | None = None
        self.messages = 0
        self._backendName: str | None = None
        # What the session-end line and the metrics count: the octets the
        # client sent, those its backends sent (the connections left so
        # far), and the last backend it reached.
        self.bytesFromClient = 0
        self._fromBackends = 0
        self._lastBackend: str | None = None
        self._connecting: SMTPBackend | None = None
        self._mailSent = False
        self._broken = False
        self._scanner: DataScanner | None = None
        self._dataProblem: str | None = None
        self._streaming = False
        self._lastActivity = 0.0
        self._idle = Timer(context.reactor, self._checkIdle)
        # When the reply to a message's end (its final dot or last BDAT)
        # is due at the latest, while it is awaited: the backend may have
        # taken the message, so the session is not cut before it (see
        # drop).
        self._replyDue: float | None = None
        # The octets of the transaction's BDAT chunks so far (the message's
        # size for the log, as DATA's is counted by its scanner).
        self._chunked = 0
        # A drop that waits for that reply: its words and reason.
        self._dropAfterReply: tuple[str, EndReason] | None = None

    @property
    def portName(self) -> str:
        return "mx"

    # Life cycle

    def sessionOpened(self) -> None:
        # No login ends a pre-auth phase here: the session is timed by
        # client silence, so a long message never hits a deadline.
        self._lastActivity = self.context.reactor.seconds()
        self._idle.start(self.limits.preauthTimeout)

    def connectionClosing(self) -> None:
        self._idle.stop()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # Before the loop takes the state to CLOSED: a message the client
        # was still sending is cut off (the backend is aborted, see
        # _dropBackend). The idle timer, closed, lets go of the session.
        self._idle.close()
        self._stopStreaming()
        if self._connecting is not None:
            self._connecting.abandon()
            self._connecting = None
        self._dropBackend(abort=self.state in (SMTPState.DATA, SMTPState.CHUNK))
        if self._counted and self._lastBackend is not None:
            self.context.stats.sessionEnded(self.protocolName, self._lastBackend, self.bytesFromClient, self._fromBackends)
        super().connectionLost(reason)

    @property
    def finishing(self) -> float:
        if self._dropAfterReply is None or self._replyDue is None:
            return 0.0
        return max(0.0, self._replyDue - self.context.reactor.seconds())

    def drop(self, reason: str, why: EndReason = EndReason.DROPPED) -> None:
        if self._replyDue is not None and not self.closing:
            # The backend may already have queued the message: cut now, the
            # client would never hear it and send the message again. The
            # reply is bounded by DATA_END_TIMEOUT; the session ends after it.
            self._dropAfterReply = (reason, why)
            return
        super().drop(reason, why)

    def _awaitMessageReply(self) -> None:
        """
        The message's end went to the backend: its reply is awaited.
        """
        self._replyDue = self.context.reactor.seconds() + DATA_END_TIMEOUT

    def _checkIdle(self) -> None:
        now = self.context.reactor.seconds()
        if self.state is LoopState.WAITING:
            # The proxy is the one waiting (for a backend, which has
            # timeouts of its own): the client is not idle.
            self._lastActivity = now
        idle = now - self._lastActivity
        limit = self.limits.preauthTimeout
        if idle >= limit:
            self.end(EndReason.TIMEOUT, "Error: timeout exceeded")
            return
        self._idle.start(limit - idle)

    def frontendDataReceived(self, data: bytes) -> None:
        self._lastActivity = self.context.reactor.seconds()
        self.bytesFromClient += len(data)
        super().frontendDataReceived(data)

    # What the session moved: not a relay's count, the proxy speaks for
    # the client; "ok" once a backend was reached.

    @property
    def backendName(self) -> str | None:
        return self._lastBackend

    def _fromBackendsNow(self) -> int:
        backend = self.backend
        return self._fromBackends + (backend.octetsReceived if backend is not None else 0)

    def sessionTraffic(self) -> tuple[str, int, int]:
        result = "ok" if self._lastBackend is not None else "no-login"
        return result, self.bytesFromClient, self._fromBackendsNow()

    def relayed(self) -> tuple[str, int, int]:
        return self._backendName or "", self.bytesFromClient, self._fromBackendsNow()

    def awaitingInput(self) -> bool:
        # A message's data is streamed on as it comes, and nothing answers
        # it before its end.
        return self.state is SMTPState.DATA or super().awaitingInput()

    def readNext(self) -> bool:
        if self.state is SMTPState.DATA:
            return self._readData()
        return super().readNext()

    def _readData(self) -> bool:
        # What arrives of a DATA message.
        pending = self.input.takeRemaining()
        if not pending:
            return False
        self._streamData(pending)
        return True

    # Transactions

    def inTransaction(self) -> bool:
        return self.mailFrom is not None

    def resetTransaction(self) -> None:
        if self._mailSent and self.backend is not None and not self.backend.lost:
            self.backend.command(b"RSET").addErrback(lambda f: None)
        self._endTransaction()

    def _endTransaction(self) -> None:
        self._chunked = 0
        self.mailFrom = None
        self.accepted = 0
        self.recipients = 0
        self.bound = None
        self._mailSent = False
        self._broken = False

    def _dropBackend(self, abort: bool = False) -> None:
        """
        Leave the current backend connection: with QUIT, or by aborting it
        when a message is half sent (so that the backend discards it).
        """
        backend, self.backend = self.backend, None
        self._backendName = None
        self._mailSent = False
        if backend is not None:
            self._fromBackends += backend.octetsReceived
            backend.onLost = None
            if abort and backend.transport is not None:
                backend.transport.abortConnection()
            else:
                backend.quit()

    def _backendLost(self, backend: SMTPBackend) -> None:
        if backend is not self.backend:
            return
        self._fromBackends += backend.octetsReceived
        self.backend = None
        self._backendName = None
        if self._mailSent or self.accepted:
            # Recipients it accepted are gone with it: the client must not
            # believe this transaction can still deliver to them.
            self._broken = True
        self._mailSent = False
        if self.state in (SMTPState.DATA, SMTPState.CHUNK) and self._dataProblem is None:
            self._dataProblem = "lost"
            self._stopStreaming()

    # Commands

    def do_AUTH(self, command: Command) -> None:
        self.error(503, "5.5.1", "Error: authentication not enabled")

    def do_MAIL(self, command: Command) -> None:
        if self.helo is None:
            self.error(503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if self.listener.tls == "starttls-required" and not self.tlsActive:
            self.error(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        if self.mailFrom is not None:
            self.error(503, "5.5.1", "Error: nested MAIL command")
            return
        path = self._path(parseMailFrom, command, _MAIL_PARAMETERS)
        if path is None:
            return
        size = path.parameter(b"SIZE")
        if size is not None:
            if not size.isdigit() or len(size) > 15:
                self.error(501, "5.5.4", "Bad SIZE parameter")
                return
            limit = self.offered.sizeLimit
            if limit is not None and int(size) > limit:
                self.error(552, "5.3.4", "Message size exceeds fixed limit")
                return
        body = path.parameter(b"BODY")
        if body is not None:
            allowed = [b"7BIT", b"8BITMIME"] + ([b"BINARYMIME"] if "BINARYMIME" in self.offered else [])
            if body.upper() not in allowed:
                self.error(501, "5.5.4", "Bad BODY parameter")
                return
        self._endTransaction()
        self.mailFrom = path
        self.send(250, "2.1.0", "Ok")

    def _path(self, parse: Callable[[bytes], Path], command: Command, allowed: dict[bytes, str]) -> Path | None:
        """
        The path of a MAIL or RCPT command, with only parameters of offered
        extensions (C{allowed} says which extension each needs); L{None}
        once a wrong one is answered.
        """
        try:
            path = parse(command.argument)
            for name, _ in path.parameters:
                needs = allowed.get(name)
                if needs is None or needs not in self.offered:
                    raise SMTPSyntaxError(555, "5.5.4", "Unsupported option: " + name.decode("ascii"))
        except SMTPSyntaxError as e:
            self.syntaxError(e)
            return None
        return path

    def do_RCPT(self, command: Command) -> None:
        if self.mailFrom is None:
            self.error(503, "5.5.1", "Error: need MAIL command")
            return
        path = self._path(parseRcptTo, command, _RCPT_PARAMETERS)
        if path is None:
            return
        if self.recipients >= MAX_RECIPIENTS:
            self.send(452, "4.5.3", "Error: too many recipients")
            return
        self.recipients += 1
        if self._broken:
            self.send(*_LOST)
            return
        request = RouteRequest(
            protocol="smtp",
            credentials=None,
            client=self.client,
            helo=self.helo,
            mailFrom=self.mailFrom.address,
            rcptTo=path.address,
            lookup="recipient",
            port=self.portName,
        )
        # A recipient lookup is not a login: the router's time is not
        # counted with the logins'.
        d = routeLogin(self.context.router, request, self.context.reactor, gate=self.context.gate)
        d.addCallbacks(self._recipientRouted, self._lookupFailed, callbackArgs=(path,), errbackArgs=(path,))
        self.wait(d, self._answerRecipient)

    def _lookupFailed(self, reason: Failure, path: Path) -> tuple[bytes, bool]:
        self.log.failure("router failed for session {session}", reason, session=self.client.sessionId)
        return reply(451, "4.3.0", f"<{path.address}>: Temporary lookup failure"), False

    def _recipientRouted(self, answer: Route | Rejection, path: Path) -> Deferred[Any] | tuple[bytes, bool]:
        address = path.address
        if isinstance(answer, Rejection):
            if answer.temporary:
                refusal = reply(451, "4.3.0", f"<{address}>: Temporary lookup failure")
            elif answer.reason == "unknown-user" or self._isLocal(address):
                refusal = reply(550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown")
            else:
                refusal = reply(550, "5.7.1", f"<{address}>: Relay access denied")
            self.log.info(
                "recipient refused: session={session} from={sender} to={recipient} reason={reason} temporary={temporary}",
                session=self.client.sessionId,
                sender=logQuote(self.mailFrom.address if self.mailFrom else None),
                recipient=logQuote(address),
                reason=answer.reason or "-",
                temporary=answer.temporary,
            )
            if answer.wait > 0:
                return deferLater(self.context.reactor, answer.wait, lambda: (refusal, answer.close))
            return refusal, answer.close
        self.route = answer
        name = answer.backend.name
        if self.bound is not None and name != self.bound:
            return reply(452, "4.5.3", f"<{address}>: Too many recipients for this transaction, send the rest in another"), False
        if self.accepted == 0 and self.backend is not None and self._backendName != name:
            # Nothing accepted yet: the transaction may still move (QUIT
            # discards what the old backend has of it).
            self._dropBackend()
        d = self._connection(answer)
        d.addCallback(self._sendRecipient, path)
        return d

    def _isLocal(self, address: str) -> bool:
        """
        Whether C{address} is in one of the listener's C{local_domains}: a
        recipient there that the router refuses is an unknown user, whatever
        the router knows of domains.
        """
        try:
            domain = _normalName(address.rpartition("@")[2])
        except idna.IDNAError:
            return False
        return domain in self.listener.localDomains

    def _connection(self, route: Route) -> Deferred[Any]:
        if self.backend is not None and not self.backend.lost:
            return succeed(self.backend)
        name = route.backend.name
        job = LoginJob(
            route=route,
            protocol="smtp",
            client=self.client,
            credentials=None,
            user="",
            password=None,
            portName=self.portName,
        )
        protocol = self.backendFor(SMTPBackend, job, purpose="relay")
        self._connecting = protocol

        def connected(backend: SMTPBackend) -> SMTPBackend:
            self._connecting = None
            self.backend = backend
            self._backendName = self._lastBackend = name
            self._mailSent = False
            backend.onLost = lambda: self._backendLost(backend)
            return backend

        def failed(reason: Failure) -> BackendFailure:
            self._connecting = None
            reason.trap(BackendFailure)
            failure = cast(BackendFailure, reason.value)
            self.log.info(
                "backend {backend} unavailable for session {session}: {kind}: {detail}",
                backend=name,
                session=self.client.sessionId,
                kind=failure.kind,
                detail=logQuote(failure.detail),
            )
            return failure

        return self.context.backendConnector(self.context.reactor, protocol).addCallbacks(connected, failed)

    def _sendRecipient(self, backend: SMTPBackend | BackendFailure, path: Path) -> Deferred[Any] | tuple[bytes, bool]:
        address = path.address
        if isinstance(backend, BackendFailure):
            if backend.kind == "refused" and backend.clientText:
                # The backend, told who the client is, refused it.
                return backend.clientText.encode("utf-8", "replace") + b"\r\n", False
            return reply(451, "4.4.1", f"<{address}>: Mail server temporarily unavailable, try again later"), False
        assert self.mailFrom is not None
        lacking = _lacking(backend, self.mailFrom, _MAIL_PARAMETERS) or _lacking(backend, path, _RCPT_PARAMETERS)
        if lacking is not None:
            # Offered while this backend was unknown (see _ehlo), but it does
            # not have it: a temporary answer, and the EHLO of later sessions
            # no longer offers it (the dialogue told the knowledge), so the
            # sender's retry goes without it or is refused for good.
            return (
                reply(451, "4.3.0", f"<{address}>: Mail server does not offer {lacking} now, try again later"),
                False,
            )
        rcpt = b"RCPT TO:<" + path.raw + b">" + path.parameterText()
        if self._mailSent:
            return backend.command(rcpt).addCallbacks(self._recipientReply, _lostToNone).addCallback(self._orLost, address)
        mail = backend.command(b"MAIL FROM:<" + self.mailFrom.raw + b">" + self.mailFrom.parameterText())
        if backend.pipelining:
            pipelined = backend.command(rcpt)
            pipelined.addErrback(lambda f: None)

            def mailAnswered(mailReply: Reply) -> Any:
                if not mailReply.positive:
                    return _mailRefused(mailReply)
                self._mailSent = True
                return pipelined.addCallback(self._recipientReply)
        else:

            def mailAnswered(mailReply: Reply) -> Any:
                if not mailReply.positive:
                    return _mailRefused(mailReply)
                self._mailSent = True
                return backend.command(rcpt).addCallbacks(self._recipientReply, _lostToNone)

        def _mailRefused(mailReply: Reply) -> tuple[bytes, bool]:
            # The backend refused the sender: that is this recipient's answer.
            return mailReply.raw, False

        return mail.addCallbacks(mailAnswered, _lostToNone).addCallback(self._orLost, address)

    def _recipientReply(self, rcptReply: Reply | None) -> tuple[bytes, bool] | None:
        if rcptReply is None:
            return None
        if rcptReply.positive:
            self.accepted += 1
            self.bound = self._backendName
        return rcptReply.raw, False

    def _orLost(self, answer: tuple[bytes, bool] | None, address: str) -> tuple[bytes, bool]:
        if answer is None:
            return reply(_LOST[0], _LOST[1], f"<{address}>: {_LOST[2]}"), False
        return answer

    def _answerRecipient(self, answer: tuple[bytes, bool]) -> None:
        text, close = answer
        self.transport.write(text)
        if close:
            self.end(EndReason.CLOSED_BY_ROUTER, "Closing connection")

    def do_DATA(self, command: Command) -> None:
        if command.argument.strip(b" "):
            self.error(501, "5.5.4", "Syntax: DATA")
            return
        if self.mailFrom is None:
            self.error(503, "5.5.1", "Error: need MAIL command")
            return
        if self._broken or (self.accepted and (self.backend is None or self.backend.lost)):
            self.send(*_LOST)
            return
        if not self.accepted or self.backend is None:
            self.error(554, "5.5.1", "Error: no valid recipients")
            return
        self.wait(self.backend.command(b"DATA").addErrback(_lostToNone), self._dataReply)

    def _dataReply(self, dataReply: Reply | None) -> None:
        if dataReply is None:
            self.send(*_LOST)
            self._endTransaction()
            return
        self.transport.write(dataReply.raw)
        if dataReply.code != 354:
            return
        self.state = SMTPState.DATA
        self._scanner = DataScanner()
        self._dataProblem = None
        self._startStreaming()

    def _startStreaming(self) -> None:
        if self.backend is not None and not self._streaming:
            self._streaming = True
            self.backend.transport.registerProducer(_ClientReading(self), True)

    def _stopStreaming(self) -> None:
        if self._streaming:
            self._streaming = False
            if self.backend is not None and self.backend.transport is not None:
                try:
                    self.backend.transport.unregisterProducer()
                except Exception:
                    pass
        self.resume("backend buffer full")

    def _streamData(self, data: bytes) -> None:
        scanner = self._scanner
        assert scanner is not None
        end = scanner.feed(data)
        part = data if end is None else data[:end]
        if self._dataProblem is None and scanner.bareLineEnding:
            # Whatever the backend already has must never become a message:
            # the connection goes, without the final dot.
            self._dataProblem = "bare line ending"
            self._stopStreaming()
            self._dropBackend(abort=True)
        if self._dataProblem is None and self.backend is not None:
            self.backend.writeData(part)
        if end is not None:
            self.input.feed(data[end:])
            self._endOfData(scanner.size)

    def _endOfData(self, size: int) -> None:
        self._stopStreaming()
        self._scanner = None
        self.state = LoopState.COMMAND
        problem, self._dataProblem = self._dataProblem, None
        if problem == "bare line ending":
            self.log.info(
                "message refused: session={session} bare CR or LF in the message data",
                session=self.client.sessionId,
            )
            self.send(550, "5.6.0", "Message refused: bare CR or LF in message data; end lines with CRLF")
            self._endTransaction()
            return
        if problem is not None or self.backend is None:
            self.send(*_LOST)
            self._endTransaction()
            return
        self._awaitMessageReply()
        d = self.backend.expectReply(DATA_END_TIMEOUT).addErrback(_lostToNone)
        self.wait(d, lambda messageReply: self._messageDone(messageReply, size))

    def _messageDone(self, messageReply: Reply | None, size: int) -> None:
        self._replyDue = None
        try:
            self._answerMessage(messageReply, size)
        finally:
            dropped, self._dropAfterReply = self._dropAfterReply, None
            if dropped is not None:
                self.drop(*dropped)

    def _answerMessage(self, messageReply: Reply | None, size: int) -> None:
        if messageReply is None:
            self.send(*_LOST)
        else:
            self.transport.write(messageReply.raw)
            if messageReply.positive:
                self.messages += 1
                self.noteOutcome(EndReason.MESSAGES_ACCEPTED, str(self.messages))
        self.log.info(
            "message: session={session} from={sender} recipients={recipients} backend={backend} size={size} reply={reply}",
            session=self.client.sessionId,
            sender=logQuote(self.mailFrom.address if self.mailFrom else None),
            recipients=self.accepted,
            backend=self.bound,
            size=size,
            # What the client got: the backend's code, or 451 for a lost
            # backend (the proxy's own answer).
            reply=messageReply.code if messageReply is not None else _LOST[0],
        )
        if messageReply is None or not messageReply.positive:
            # Start the next transaction on a fresh connection rather than
            # guess what state the backend kept.
            self._dropBackend()
        self._endTransaction()

    def do_BDAT(self, command: Command) -> None:
        chunk = self.chunkSize(command)
        if chunk is None:
            return
        size, last = chunk
        refusal: tuple[int, str, str] | None = None
        if "CHUNKING" not in self.offered:
            refusal = (502, "5.5.1", "Error: command not implemented")
        elif self.mailFrom is None:
            refusal = (503, "5.5.1", "Error: need MAIL command")
        elif self._broken or (self.accepted and (self.backend is None or self.backend.lost)):
            refusal = _LOST
        elif not self.accepted or self.backend is None:
            refusal = (554, "5.5.1", "Error: no valid recipients")
        self._dataProblem = None
        if refusal is not None:
            self.receiveChunk(size, None, lambda: self.error(*refusal))
            return
        assert self.backend is not None
        self._chunked += size
        line = b"BDAT %d%s" % (size, b" LAST" if last else b"")
        chunkReply = self.backend.command(line, DATA_END_TIMEOUT).addErrback(_lostToNone)
        self._startStreaming()
        self.receiveChunk(size, self._chunkData, lambda: self._chunkSent(chunkReply, last))

    def _chunkData(self, data: bytes) -> None:
        if self._dataProblem is None and self.backend is not None:
            self.backend.writeData(data)

    def _chunkSent(self, chunkReply: Deferred[Reply | None], last: bool) -> None:
        self._stopStreaming()
        if self._dataProblem is not None:
            self._dataProblem = None
            self.send(*_LOST)
            self._endTransaction()
            return
        if last:
            self._awaitMessageReply()
        self.wait(chunkReply, lambda answer: self._chunkDone(answer, last))

    def _chunkDone(self, chunkReply: Reply | None, last: bool) -> None:
        if last:
            # The message's end, answered (or lost) as DATA's is.
            self._messageDone(chunkReply, self._chunked)
            return
        if chunkReply is None:
            self.send(*_LOST)
            self._broken = True
            return
        self.transport.write(chunkReply.raw)
