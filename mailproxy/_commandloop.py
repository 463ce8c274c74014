"""
The command loop every front end runs before login, and the decisions it
takes for every protocol.

A front end reads its client's commands one after another and answers
each; a login in between stops the loop until the router and the backend
have answered. L{CommandLoop} holds what every such loop needs: its state
(L{LoopState}), the guard that keeps a command answered at once from
nesting the loop, counting invalid commands, and the STARTTLS policy.
L{CommandFrontend} adds what a loop with a login decides: the SASL
exchange and the answer to a login.  The protocol only phrases the
outcomes (L{mailproxy._contract}).

A client may pipeline commands without reading the replies: the loop then
stops answering as soon as the transport's write buffer is full
(L{Session.repliesUnread}), reading pauses, and the loop goes on where it
stopped once the client has read (L{CommandLoop.repliesRead}).  What was
read meanwhile stays buffered, bounded by one read and the line limits.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Sequence, cast

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from ._backend import BackendProtocol, acknowledgeNow
from ._outcomes import EndReason, FailureKind, SASLRefusal, StartTLSRefusal
from ._sasl import OAUTH_INVALID_TOKEN, OAUTH_MECHANISMS, Challenge, Refused, ServerExchange, Step, decodeBase64, decodeResponse, newChallenge
from ._login import LoginFailed
from ._session import FrontendProtocol, ProxyContext, Session
from .model import Credentials
from .settings import Listener

__all__ = ["CommandFrontend", "CommandLoop", "LoopState"]


class LoopState(str, Enum):
    """
    What a command loop does with client input now.

    A C{str} enum: a protocol may compare it with its old words.
    """

    #: Reading commands.
    COMMAND = "command"
    #: Reading the client's response to a SASL challenge.
    SASL = "sasl"
    #: Waiting for the router and the backend; client input stays buffered.
    LOGIN = "login"
    #: Waiting for something else the answer needs (SMTP's EHLO waits for
    #: what the backends support); client input stays buffered.
    WAITING = "waiting"
    #: Handed over: the relay has the client.
    RELAY = "relay"
    #: The session ended; nothing more is read or answered.
    CLOSED = "closed"

    def __str__(self) -> str:
        return self.value


class _Relayed:
    """
    The input of a session that relays: the relay reads the client now,
    and the protocol's parser (with its buffers) is let go, which an idle
    session would otherwise hold for hours.  Nothing is ever buffered.
    """

    def feed(self, data: bytes) -> None:
        """
        Never called: the relay took over C{dataReceived}.
        """

    def clear(self) -> None:
        """
        Nothing to forget.
        """

    def takeRemaining(self) -> bytes:
        """
        Nothing buffered.
        """
        return b""

    def unfinished(self) -> bool:
        """
        Nothing read.
        """
        return False


#: Shared by every relayed session.
RELAYED_INPUT = _Relayed()


class CommandLoop(Session):
    """
    A L{Session} that reads commands in a loop.

    Subclasses implement L{readCommand} and provide L{input} (see
    L{mailproxy._contract.IProtocolFrontend}), besides what L{Session} asks
    for. The loop (L{processInput}) runs while C{state} lets it and stops
    while L{repliesUnread}.

    @cvar maxBadCommands: invalid commands after which the session ends.
    @cvar badCommandsReason: the L{EndReason} then.
    @cvar badCommandsGoodbye: the last words then.
    @ivar state: the L{LoopState} (a protocol may use states of its own).
    @ivar badCommands: invalid commands so far.
    @ivar input: the protocol's L{IClientInput}.
    """

    maxBadCommands = 10
    badCommandsReason = EndReason.BAD_COMMANDS
    badCommandsGoodbye = "Too many invalid commands."
    #: Provides L{IClientInput}; a protocol gives its own parser's type.
    input: Any

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        super().__init__(context, listener)
        self.state: Enum = LoopState.COMMAND
        self.badCommands = 0
        self._processing = False

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.state = LoopState.CLOSED
        super().connectionLost(reason)

    def sessionEnding(self) -> None:
        self.state = LoopState.CLOSED
        super().sessionEnding()

    def frontendDataReceived(self, data: bytes) -> None:
        self.input.feed(data)
        self.process()
        if self.awaitingInput():
            # Nothing answers this read yet, and the client may hold back
            # the rest until it is acknowledged (a LOGIN's literal written
            # apart from its CRLF): acknowledge it now, not 40 ms later.
            acknowledgeNow(self.transport)

    def awaitingInput(self) -> bool:
        """
        Whether, all buffered input handled, the proxy waits for more of
        what the client is sending: a command read in part.
        """
        return bool(self.input.unfinished())

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
        The loop behind L{process}: read and answer buffered input, one
        command (L{readNext}) at a time, while the client reads the replies
        (not L{repliesUnread}) and there is something to read in the
        current state.  A protocol with input states of its own (SMTP's
        message data) extends it.
        """
        while not self.repliesUnread and self.readNext():
            pass

    def readNext(self) -> bool:
        """
        Read and answer one unit of input in the current state.

        @return: whether the loop goes on: C{False} when nothing complete
            is buffered, or the state reads no input.
        """
        if self.state == LoopState.COMMAND:
            return self.readCommand()
        return False

    def readCommand(self) -> bool:
        """
        See L{mailproxy._contract.IProtocolFrontend.readCommand}.
        """
        raise NotImplementedError

    def repliesRead(self) -> None:
        self.process()

    def countBadCommand(self) -> None:
        """
        An invalid command has been answered; after L{maxBadCommands} of
        them the session ends (L{badCommandsReason}, L{badCommandsGoodbye}).
        """
        self.badCommands += 1
        if self.badCommands >= self.maxBadCommands:
            self.tooManyBadCommands()

    def tooManyBadCommands(self) -> None:
        """
        End the session after one invalid command too many.
        """
        self.end(self.badCommandsReason, self.badCommandsGoodbye)

    # STARTTLS

    def startTLSCommand(self, command: Any, hasArguments: bool, inTransaction: bool = False) -> None:
        """
        The client asked for TLS (STARTTLS, STLS): refuse it, or let the
        protocol say go ahead, then discard the input buffered after the
        command (it arrived in clear and could have been injected,
        CVE-2011-0411), let the protocol forget what it learned before TLS
        and start TLS.

        @param command: the protocol's command, handed back to
            C{answerStartTLS}.
        @param hasArguments: the command came with arguments.
        @param inTransaction: the protocol is in the middle of something
            TLS must not interrupt (an SMTP mail transaction).
        """
        refusal: StartTLSRefusal | None = None
        if hasArguments:
            refusal = StartTLSRefusal.ARGUMENTS
        elif self.tlsActive:
            refusal = StartTLSRefusal.ACTIVE
        elif not self.tlsAvailable:
            refusal = StartTLSRefusal.UNAVAILABLE
        elif inTransaction:
            refusal = StartTLSRefusal.TRANSACTION
        self.answerStartTLS(command, refusal)
        if refusal is not None:
            return
        self.input.clear()
        self.forgetBeforeTLS()
        self.startTLS()

    def answerStartTLS(self, command: Any, refusal: StartTLSRefusal | None) -> None:
        """
        See L{mailproxy._contract.IProtocolFrontend.answerStartTLS}.
        """
        raise NotImplementedError

    def forgetBeforeTLS(self) -> None:
        """
        See L{mailproxy._contract.IProtocolFrontend.forgetBeforeTLS}.
        """


class CommandFrontend(CommandLoop, FrontendProtocol):
    """
    A command loop whose client logs in: the core of the login-capable
    front ends (L{mailproxy._contract.ILoginFrontend}).

    It runs the SASL exchange (L{authenticate}, L{saslResponse}) and the
    login (L{loginWith}), and answers through the protocol's phrasing
    methods; after a successful login it hands the session over with what
    the client pipelined behind its login.

    @cvar internalErrorGoodbye: the last words after a bug in login handling.
    @cvar saslLoneEquals: a lone C{=} stands for an empty response (RFC
        4954, 5034, 4959); ManageSieve has quoted strings instead.
    @cvar saslLoginUserRequired: LOGIN refuses an empty user name.
    @cvar loginFailureReason: the L{EndReason} when the last failed login
        the limit allows ends the session (other refusals that close end it
        with L{EndReason.LOGIN_FAILED}, logged with the failure kind).
    @ivar clientID: what the client said about itself (IMAP ID), for the
        router and the backend.
    """

    internalErrorGoodbye = "Internal error."
    saslLoneEquals = True
    saslLoginUserRequired = False
    loginFailureReason = EndReason.LOGIN_FAILED

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        super().__init__(context, listener)
        self.clientID: tuple[tuple[str, str], ...] = ()
        self._exchange: ServerExchange | None = None
        self._saslCommand: Any = None
        # An OAuth login's refusal, held while the client answers the error
        # challenge (RFC 7628 section 3.2.2).
        self._oauthLogin = False
        self._heldFailure: LoginFailed | None = None

    def offeredMechanisms(self) -> list[str]:
        """
        The SASL mechanisms a client may use on this connection now: none
        before TLS where the listener asks for TLS first.
        """
        return list(self.saslMechanisms()) if self.plaintextLoginAllowed else []

    # SASL

    def authenticate(
        self, command: Any, mechanism: str, initialResponse: bytes | None = None, badInitialResponse: bool = False
    ) -> None:
        """
        The client starts a SASL exchange (AUTH, AUTHENTICATE).

        Refuses a mechanism not supported, credentials before TLS where
        the listener asks for TLS first, an initial response that is not
        base64 (or given to CRAM-MD5); otherwise sends the first challenge
        or, with an initial response that completes the exchange, logs in.

        @param mechanism: the name the client gave (ASCII; any case).
        @param initialResponse: the client's initial response, still base64.
        @param badInitialResponse: the client gave an initial response that
            is not a string in the protocol's syntax.
        """
        mechanism = mechanism.upper()
        if mechanism not in self.saslMechanisms():
            self.answerSASLRefusal(command, SASLRefusal.UNSUPPORTED, mechanism)
            return
        if not self.plaintextLoginAllowed:
            self.answerSASLRefusal(command, SASLRefusal.PRIVACY_REQUIRED, mechanism)
            return
        if badInitialResponse:
            self.answerSASLRefusal(command, SASLRefusal.BAD_INITIAL_RESPONSE, mechanism)
            return
        initial: bytes | None = None
        if initialResponse is not None:
            initial = self._decodeSASL(initialResponse)
            if initial is None:
                self.answerSASLRefusal(command, SASLRefusal.BAD_BASE64, mechanism)
                return
        challenge = b""
        if mechanism == "CRAM-MD5":
            if initial is not None:
                # CRAM-MD5 starts with the server's challenge.
                self.answerSASLRefusal(command, SASLRefusal.NO_INITIAL_RESPONSE, mechanism)
                return
            challenge = newChallenge(self.context.reactor.seconds(), self.context.hostname)
        self._saslCommand = command
        self._exchange = ServerExchange(mechanism, challenge, loginUserRequired=self.saslLoginUserRequired)
        self._nextSASLStep(self._exchange.start(initial))

    def saslResponse(self, response: bytes) -> None:
        """
        The client's response to the latest challenge, as the protocol read
        it (still base64; C{*} cancels).
        """
        self.state = LoopState.COMMAND
        command, exchange = self._saslCommand, self._exchange
        if self._heldFailure is not None:
            # The client's answer to the error challenge (a dummy ^A, an
            # empty line, or *): whatever it is, the refusal follows, in
            # the words of a cancelled exchange for * (IMAP: BAD).
            failure, self._heldFailure = self._heldFailure, None
            cancelled = exchange.mechanism if response == b"*" and exchange is not None else None
            self._answerRefusal(command, failure, cancelled)
            return
        assert exchange is not None
        if response == b"*":
            self.answerSASLRefusal(command, SASLRefusal.ABORTED, exchange.mechanism)
            return
        decoded = self._decodeSASL(response)
        if decoded is None:
            self.answerSASLRefusal(command, SASLRefusal.BAD_BASE64, exchange.mechanism)
            return
        self._nextSASLStep(exchange.respond(decoded))

    def readNext(self) -> bool:
        if self.state == LoopState.SASL:
            return self.readSASLResponse()
        return super().readNext()

    def readSASLResponse(self) -> bool:
        """
        See L{mailproxy._contract.ILoginFrontend.readSASLResponse}.
        """
        raise NotImplementedError

    def abandonSASL(self) -> None:
        """
        The client's response could not be read (the protocol answered it
        in its own words): the exchange ends, commands are read again.
        """
        self.state = LoopState.COMMAND

    def _decodeSASL(self, data: bytes) -> bytes | None:
        return decodeResponse(data) if self.saslLoneEquals else decodeBase64(data)

    def _nextSASLStep(self, step: Step) -> None:
        command = self._saslCommand
        if isinstance(step, Challenge):
            self.saslChallenge(command, step.data)
            self.state = LoopState.SASL
        elif isinstance(step, Refused):
            refusal = SASLRefusal.AUTHORIZATION if step.reason == "authorization" else SASLRefusal.BAD_RESPONSE
            self.answerSASLRefusal(command, refusal, step.mechanism)
        else:
            self.loginWith(command, step)

    # Login

    def loginWith(self, command: Any, credentials: Credentials) -> None:
        """
        Log in with C{credentials} (with L{clientID}) and answer C{command}
        once the router and the backend have: the success reply and the
        hand-over, or the refusal and then the next command or the end of
        the session.
        """
        self.state = LoopState.LOGIN
        self._oauthLogin = credentials.mechanism in OAUTH_MECHANISMS
        d = self.login(credentials, self.clientID)
        d.addCallbacks(self._loginSucceeded, self._loginRefused, callbackArgs=(command,), errbackArgs=(command,))
        d.addErrback(self.loginHandlingFailed)

    def _loginSucceeded(self, backend: BackendProtocol, command: Any) -> None:
        guard = self.answerLogin(command, backend)
        # The SASL exchange is over (it may hold the client's password).
        self._exchange = self._saslCommand = None
        self.state = LoopState.RELAY
        toBackend = self.input.takeRemaining()
        self.input = RELAYED_INPUT
        self.handOver(backend, toBackend=toBackend, guard=guard)

    def _loginRefused(self, reason: Failure, command: Any) -> None:
        reason.trap(LoginFailed)
        failure = cast(LoginFailed, reason.value)
        if self._oauthLogin and failure.kind is FailureKind.AUTH:
            # RFC 7628: a refused token gets an error challenge first (the
            # backend's, or the generic one when the router refused), and
            # the refusal once the client has answered it.
            self._saslCommand = command
            self._heldFailure = failure
            self.saslChallenge(command, failure.saslError or OAUTH_INVALID_TOKEN)
            self.state = LoopState.SASL
            self.process()
            return
        self._answerRefusal(command, failure)

    def _answerRefusal(self, command: Any, failure: LoginFailed, cancelled: str | None = None) -> None:
        """
        Answer a refused login, then end the session or read on.

        @param cancelled: the mechanism, if the client cancelled its SASL
            exchange (after an error challenge): the answer is the
            protocol's to a cancelled exchange.
        """
        if cancelled is not None:
            self.answerSASLRefusal(command, SASLRefusal.ABORTED, cancelled)
        else:
            self.answerLoginFailure(command, failure)
        if failure.close:
            endReason, goodbye = EndReason.LOGIN_FAILED, "Closing connection."
            if self.failures >= self.limits.loginFailures:
                endReason, goodbye = self.loginFailureReason, "Too many invalid authentication attempts."
            detail = failure.kind.value if endReason is EndReason.LOGIN_FAILED else ""
            self.end(endReason, goodbye, detail)
            return
        self.state = LoopState.COMMAND
        self.process()

    def loginHandlingFailed(self, reason: Failure) -> None:
        """
        The last errback of a login: anything that reaches it is a bug in
        answering the login. Log it and end the session, unless the session
        ended first (its login was cancelled).
        """
        if self.state == LoopState.CLOSED or reason.check(CancelledError):
            return
        self.log.failure("{protocol} login handling failed", reason, protocol=self.protocolName)
        self.end(EndReason.INTERNAL_ERROR, self.internalErrorGoodbye)

    # For subclasses (see mailproxy._contract.ILoginFrontend)

    def saslMechanisms(self) -> Sequence[str]:
        """
        See L{mailproxy._contract.ILoginFrontend.saslMechanisms}.

        The same list for every protocol: PLAIN and LOGIN, CRAM-MD5 where
        the listener offers digest mechanisms (C{digest_auth}), and
        OAUTHBEARER and XOAUTH2 where it offers OAuth (C{oauth}) and TLS is
        active: a bearer token is a password anyone who reads it can use.
        The configuration allows each switch only for protocols whose
        registry entry says so.  A protocol overrides it only to offer
        less.
        """
        mechanisms = ["PLAIN", "LOGIN"] + (["CRAM-MD5"] if self.listener.digestAuth else [])
        if self.listener.oauth and self.tlsActive:
            mechanisms += OAUTH_MECHANISMS
        return mechanisms

    def saslChallenge(self, command: Any, data: bytes) -> None:
        """
        See L{mailproxy._contract.ILoginFrontend.saslChallenge}.
        """
        raise NotImplementedError

    def answerSASLRefusal(self, command: Any, refusal: SASLRefusal, mechanism: str) -> None:
        """
        See L{mailproxy._contract.ILoginFrontend.answerSASLRefusal}.
        """
        raise NotImplementedError

    def answerLogin(self, command: Any, backend: BackendProtocol) -> Any:
        """
        See L{mailproxy._contract.ILoginFrontend.answerLogin}.
        """
        raise NotImplementedError

    def answerLoginFailure(self, command: Any, failure: LoginFailed) -> None:
        """
        See L{mailproxy._contract.ILoginFrontend.answerLoginFailure}.
        """
        raise NotImplementedError
