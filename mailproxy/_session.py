"""
The path every session takes, whatever its protocol.

A protocol's front end subclasses L{FrontendProtocol} and writes only its
wire syntax: the greeting, commands, and how each outcome is phrased. This
module owns the rest: connection limits per client address, the pre-auth
timer, STARTTLS, asking the router, slowing failed logins, connecting the
backend, and joining the two connections in a L{Relay}.
"""

from __future__ import annotations

import base64
import os
import time
from collections import Counter
from typing import Callable

from attrs import define, field
from twisted.internet.defer import Deferred, CancelledError
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _tls
from ._backend import BackendFailure, BackendProtocol, LoginJob, connectBackend
from ._relay import Relay
from .config import Limits, Listener
from .model import ClientInfo, Credentials, Rejection, Route, RouteRequest
from .routers import callRouter


class ConnectionTracker:
    """
    Counts open connections per client address, across all listeners.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    def add(self, address: str) -> bool:
        """
        Count a new connection from C{address}.

        @return: C{False} (and nothing counted) if the address is at its limit.
        """
        if self.limit and self._open[address] >= self.limit:
            return False
        self._open[address] += 1
        return True

    def remove(self, address: str) -> None:
        """
        A connection from C{address} closed.
        """
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]


@define
class ProxyContext:
    """
    What every session of one proxy shares.

    @ivar backendConnector: how a backend login protocol gets connected;
        tests replace it to script backends in memory.
    """

    reactor: object
    router: object
    limits: Limits
    hostname: str
    serverTLS: object | None = None
    tracker: ConnectionTracker = field(default=None)
    backendConnector: Callable[[object, BackendProtocol], Deferred] = connectBackend
    sessions: set = field(factory=set)

    def __attrs_post_init__(self) -> None:
        if self.tracker is None:
            self.tracker = ConnectionTracker(self.limits.connectionsPerAddress)


class LoginFailed(Exception):
    """
    A login attempt did not lead to a backend session; the front end phrases
    the refusal.

    @ivar kind: C{"auth"} (bad credentials, unknown account),
        C{"unavailable"} (router or backend trouble, try later) or
        C{"refused"} (the backend's own coded refusal, in C{clientText}).
    @ivar message: the router's text, if it gave one.
    @ivar close: the connection is to be closed after the reply.
    """

    def __init__(self, kind: str, message: str = "", clientText: str = "", close: bool = False) -> None:
        super().__init__(kind)
        self.kind = kind
        self.message = message
        self.clientText = clientText
        self.close = close


def plainAddress(address: str) -> str:
    """
    An IPv4 client of a dual-stack listener as plain IPv4 (C{::ffff:192.0.2.1}
    becomes C{192.0.2.1}), so routers, logs and backends see one form.
    """
    if address.lower().startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def newSessionId() -> str:
    """
    A short random session id, safe in any protocol's syntax.
    """
    return base64.b32encode(os.urandom(10)).decode("ascii").lower()


@implementer(IHandshakeListener)
class FrontendProtocol(Protocol):
    """
    The shared half of a client connection before and after login.

    Subclasses implement L{greet}, L{sayGoodbye}, L{frontendDataReceived}
    and L{makeBackendLogin}.

    @cvar protocolName: C{"imap"}, C{"pop3"}, ...
    @ivar client: the client's addresses and TLS facts.
    @ivar tlsActive: the connection is (or is becoming) TLS.
    @ivar relay: the L{Relay} once logged in.
    """

    protocolName = ""
    log = Logger()

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        self.context = context
        self.listener = listener
        self.limits = context.limits
        self.tlsActive = listener.tls == "implicit"
        self.relay: Relay | None = None
        self.attempts = 0
        self.failures = 0
        self.user: str | None = None
        self.route: Route | None = None
        self.result = "disconnected before login"
        self._counted = False
        self._preauthTimer = None
        self._pending: Deferred | None = None
        self._backend: BackendProtocol | None = None
        self._started = time.monotonic()
        self.client = ClientInfo(sessionId=newSessionId(), address="", port=0, localAddress="", localPort=0)

    # Life cycle

    def connectionMade(self) -> None:
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self.client = ClientInfo(
            sessionId=self.client.sessionId,
            address=plainAddress(getattr(peer, "host", str(peer))),
            port=getattr(peer, "port", 0),
            localAddress=plainAddress(getattr(host, "host", str(host))),
            localPort=getattr(host, "port", 0),
        )
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        if not self.context.tracker.add(self.client.address):
            self.result = "too many connections"
            self.sayGoodbye("Too many connections from your address.")
            self.transport.loseConnection()
            return
        self._counted = True
        self.context.sessions.add(self)
        self._preauthTimer = self.context.reactor.callLater(self.limits.preauthTimeout, self._preauthExpired)
        self.greet()

    def handshakeCompleted(self) -> None:
        self.client = ClientInfo(
            sessionId=self.client.sessionId,
            address=self.client.address,
            port=self.client.port,
            localAddress=self.client.localAddress,
            localPort=self.client.localPort,
            tls=_tls.tlsInfo(self.transport),
        )

    def dataReceived(self, data: bytes) -> None:
        self.frontendDataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._preauthTimer is not None and self._preauthTimer.active():
            self._preauthTimer.cancel()
        self._preauthTimer = None
        if self._pending is not None:
            self._pending.cancel()
        if self._backend is not None and self.relay is None:
            self._backend.abandon()
        if self.relay is not None:
            self.relay.clientLost()
        if self._counted:
            self._counted = False
            self.context.tracker.remove(self.client.address)
            self.context.sessions.discard(self)
            self._logEnd()

    def _preauthExpired(self) -> None:
        self._preauthTimer = None
        self.result = "pre-auth timeout"
        self.sayGoodbye("Disconnected for inactivity.")
        self.transport.loseConnection()

    def _logEnd(self) -> None:
        relay = self.relay
        self.log.info(
            "session {session} end: {protocol} from {address}:{port} user={user} "
            "backend={backend} result={result} duration={duration:.3f}s "
            "in={bytesIn} out={bytesOut}",
            session=self.client.sessionId,
            protocol=self.protocolName,
            address=self.client.address,
            port=self.client.port,
            tls=self.client.tls.version if self.client.tls else None,
            sni=self.client.tls.serverName if self.client.tls else None,
            user=self.user,
            backend=self.route.backend.name if self.route else None,
            result=relay.endReason if relay and relay.endReason else self.result,
            duration=time.monotonic() - self._started,
            bytesIn=relay.bytesFromClient if relay else 0,
            bytesOut=relay.bytesFromBackend if relay else 0,
        )

    # Services for the protocol modules

    def startTLS(self) -> None:
        """
        Turn the connection into TLS now (after the STARTTLS reply was
        written). The caller must discard any input already buffered.
        """
        self.tlsActive = True
        self.transport.startTLS(self.context.serverTLS)

    @property
    def tlsAvailable(self) -> bool:
        """
        STARTTLS can be offered: the listener does it and TLS is not up yet.
        """
        return self.listener.tls in ("starttls", "starttls-required") and not self.tlsActive

    @property
    def plaintextLoginAllowed(self) -> bool:
        """
        Whether credentials may be accepted on this connection now.
        """
        return self.tlsActive or self.listener.tls != "starttls-required"

    def login(self, credentials: Credentials, clientID: tuple[tuple[str, str], ...] = ()) -> Deferred[BackendProtocol]:
        """
        Route C{credentials}, connect the backend and log in there.

        Reading from the client pauses until the outcome is known. A
        failure is delivered only after the failed-login delay.

        @return: fires with the logged-in L{BackendProtocol}, to be passed
            to L{handOver} once the client has its reply; or fails with
            L{LoginFailed}.
        """
        self.attempts += 1
        self.user = credentials.user
        self.transport.pauseProducing()
        request = RouteRequest(
            protocol=self.protocolName,  # type: ignore[arg-type]
            credentials=credentials,
            client=self.client,
            attempt=self.attempts,
            clientID=clientID,
        )
        d = callRouter(self.context.router, request)
        d.addCallbacks(self._routed, self._routerFailed, callbackArgs=(credentials, clientID))
        d.addErrback(self._delayFailure)
        d.addBoth(self._loginDone)
        self._pending = d
        return d

    def _routerFailed(self, reason: Failure) -> None:
        reason.trap(Exception)
        self.log.failure("router failed for session {session}", reason, session=self.client.sessionId)
        raise LoginFailed("unavailable")

    def _routed(self, answer, credentials: Credentials, clientID) -> Deferred:
        if isinstance(answer, Rejection):
            self.log.info(
                "login refused by router: session={session} user={user} temporary={temporary}",
                session=self.client.sessionId,
                user=credentials.user,
                temporary=answer.temporary,
            )
            raise _Rejected(answer)
        if not isinstance(answer, Route):
            raise TypeError(f"router returned {type(answer).__name__}, not Route or Rejection")
        self.route = answer
        backend = answer.backend
        user = answer.user if answer.user is not None else credentials.user
        password = answer.password if answer.password is not None else credentials.password
        masterUser = masterPassword = None
        if answer.useMaster:
            if backend.masterUser is None:
                raise LoginFailed("unavailable")
            masterUser, masterPassword, password = backend.masterUser, backend.masterPassword, None
        elif password is None:
            # A digest mechanism and a router that gave no password: nothing
            # to log in with at the backend.
            self.log.warn(
                "route for {user} has no password for the backend ({mechanism})",
                user=credentials.user,
                mechanism=credentials.mechanism,
            )
            raise LoginFailed("unavailable")
        job = LoginJob(
            route=answer,
            protocol=self.protocolName,
            client=self.client,
            credentials=credentials,
            user=user,
            password=password,
            masterUser=masterUser,
            masterPassword=masterPassword,
            clientID=clientID,
        )
        self._backend = self.makeBackendLogin(job)
        d = self.context.backendConnector(self.context.reactor, self._backend)
        d.addErrback(self._backendFailed)
        return d

    def _backendFailed(self, reason: Failure) -> None:
        reason.trap(BackendFailure)
        failure: BackendFailure = reason.value
        self._backend = None
        self.log.info(
            "backend login failed: session={session} user={user} backend={backend} {kind}: {detail}",
            session=self.client.sessionId,
            user=self.user,
            backend=self.route.backend.name if self.route else None,
            kind=failure.kind,
            detail=failure.detail,
        )
        raise LoginFailed(failure.kind, clientText=failure.clientText)

    def _delayFailure(self, reason: Failure) -> Deferred:
        if reason.check(CancelledError):
            return reason
        if reason.check(_Rejected):
            rejection: Rejection = reason.value.rejection
            failure = LoginFailed(
                "unavailable" if rejection.temporary else "auth",
                message=rejection.message,
                close=rejection.close,
            )
            wait = rejection.wait
        elif reason.check(LoginFailed):
            failure = reason.value
            wait = 0.0
        else:
            self.log.failure("login failed unexpectedly", reason)
            failure, wait = LoginFailed("unavailable"), 0.0
        if failure.kind == "auth":
            self.failures += 1
            wait += self.failures * self.limits.failureDelay
            self.log.info(
                "authentication failed: session={session} address={address} user={user} attempt={attempt}",
                session=self.client.sessionId,
                address=self.client.address,
                user=self.user,
                attempt=self.attempts,
            )
        if self.failures >= self.limits.loginFailures:
            failure.close = True
        self.result = "login failed: " + failure.kind

        def deliver(_: object) -> None:
            raise failure

        if wait <= 0:
            raise failure
        delayed: Deferred = Deferred(lambda d: call.cancel())
        call = self.context.reactor.callLater(wait, delayed.callback, None)
        return delayed.addCallback(deliver)

    def _loginDone(self, result):
        self._pending = None
        if not isinstance(result, Failure) or not result.check(CancelledError):
            self.transport.resumeProducing()
        return result

    def handOver(self, backend: BackendProtocol, toBackend: bytes = b"") -> None:
        """
        The client has its login reply: from now on relay bytes.

        @param toBackend: client octets already read past the login command.
        """
        if self._preauthTimer is not None and self._preauthTimer.active():
            self._preauthTimer.cancel()
        self._preauthTimer = None
        self.result = "logged in"
        relay = Relay(
            self.transport,
            backend.transport,
            self.context.reactor,
            self.limits.idleTimeout,
            onEnd=self._relayEnded,
        )
        self.relay = relay
        self._backend = None
        self.dataReceived = relay.fromClient  # type: ignore[method-assign]
        backend.dataReceived = relay.fromBackend  # type: ignore[method-assign]
        backend.onLost = relay.backendLost
        self.log.info(
            "session {session} logged in: user={user} backend={backend} rule={rule}",
            session=self.client.sessionId,
            user=self.user,
            backend=backend.job.backend.name,
            rule=backend.job.route.rule,
        )
        relay.start(toClient=backend.leftover, toBackend=toBackend)

    def _relayEnded(self, relay: Relay) -> None:
        if relay.endReason == "idle timeout":
            # The client sees a goodbye only from us; the backend's own
            # connection is closed under it.
            self.sayGoodbye("Idle timeout.")

    # For subclasses

    def greet(self) -> None:
        """
        Write the protocol's greeting.
        """
        raise NotImplementedError

    def sayGoodbye(self, reason: str) -> None:
        """
        Write the protocol's last words before the proxy closes the
        connection (IMAP C{* BYE}, POP3 C{-ERR}, SMTP C{421}).
        """
        raise NotImplementedError

    def frontendDataReceived(self, data: bytes) -> None:
        """
        Handle client octets before hand-over.
        """
        raise NotImplementedError

    def makeBackendLogin(self, job: LoginJob) -> BackendProtocol:
        """
        The protocol module's backend login dialogue for C{job}.
        """
        raise NotImplementedError


class _Rejected(Exception):
    def __init__(self, rejection: Rejection) -> None:
        super().__init__("rejected")
        self.rejection = rejection


class FrontendFactory(Factory):
    noisy = False  # one log line per listener start is enough

    """
    Builds a front-end protocol for each connection to one listener.
    """

    def __init__(self, protocolClass: type[FrontendProtocol], context: ProxyContext, listener: Listener) -> None:
        self.protocolClass = protocolClass
        self.context = context
        self.listener = listener

    def buildProtocol(self, addr) -> FrontendProtocol:
        return self.protocolClass(self.context, self.listener)
