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
from typing import Any, Callable, Iterator, cast

from attrs import define, field
from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _tls
from ._backend import BackendFailure, BackendProtocol, LoginJob, connectBackend
from ._guard import IRelayGuard
from ._relay import Relay
from ._safetext import logQuote, oneLine
from ._stats import ProxyStats
from ._transport import IProxyTransport
from .settings import Limits, Listener
from .interfaces import IRouter
from .model import ClientInfo, Credentials, Rejection, Route, RouteRequest
from ._routing import callRouter


#: Seconds a connection the proxy closed may take to finish closing before it
#: is aborted: a TLS peer may never answer the close alert (one that is still
#: writing does not), and a peer that does not read never takes the last
#: words. A few seconds are plenty for a goodbye of a few hundred octets.
CLOSE_GRACE = 5.0

#: The reason to pause reading while a client does not read its replies
#: (L{FrontendProtocol.repliesUnread}).
REPLIES_UNREAD = "replies unread"


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


class SessionRegistry:
    """
    The open sessions of one proxy, to find them by account or backend.

    A session is in the registry from its first byte to its close, before
    and after login.
    """

    def __init__(self) -> None:
        self._sessions: set[FrontendProtocol] = set()
        self._emptyWaiters: list[Deferred[None]] = []

    def add(self, session: FrontendProtocol) -> None:
        """
        A session opened.
        """
        self._sessions.add(session)

    def discard(self, session: FrontendProtocol) -> None:
        """
        A session closed.
        """
        self._sessions.discard(session)
        if not self._sessions:
            waiters, self._emptyWaiters = self._emptyWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[FrontendProtocol]:
        # A copy: callers drop sessions while they iterate.
        return iter(list(self._sessions))

    def __contains__(self, session: object) -> bool:
        return session in self._sessions

    def find(
        self,
        account: str | None = None,
        backend: str | None = None,
        domain: str | None = None,
    ) -> list[FrontendProtocol]:
        """
        The sessions matching every filter given.

        @param account: the login name the client gave, without case.
        @param backend: the name of the backend the session is relayed to;
            sessions not logged in have none.
        @param domain: the part of the login name after the last C{@},
            without case.
        """
        found = []
        for session in self._sessions:
            user = (session.user or "").lower()
            if account is not None and (not session.user or user != account.lower()):
                continue
            if domain is not None and (not session.user or user.rpartition("@")[2] != domain.lower() or "@" not in user):
                continue
            if backend is not None and session.backendName != backend:
                continue
            found.append(session)
        return found

    def whenEmpty(self) -> Deferred[None]:
        """
        A Deferred that fires once no session is open (at once if none is).
        """
        if not self._sessions:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._emptyWaiters.append(waiter)
        return waiter


@define
class ProxyContext:
    """
    What every session of one proxy shares.

    @ivar backendConnector: how a backend login protocol gets connected;
        tests replace it to script backends in memory.
    @ivar backends: the configured backends by name (for front ends that
        must know all of them, e.g. to offer only what every one supports).
    @ivar shared: state a protocol module shares between its sessions
        (what it learned about the backends), under keys of its own.
    @ivar sessions: the open sessions.
    @ivar stats: what the sessions count.
    @ivar gate: if set, its C{wait(request)} is asked before each login is
        routed; it answers L{None} (go on) or a Deferred that fires when the
        login may go on (an operator holds an account while it moves).
    @ivar routerName: how logs name the router (the configured type).
    """

    reactor: IReactorTime
    router: IRouter
    limits: Limits
    hostname: str
    serverTLS: IOpenSSLServerConnectionCreator | None = None
    tracker: ConnectionTracker = field(default=None)
    backendConnector: Callable[[object, BackendProtocol], Deferred] = connectBackend
    backends: dict = field(factory=dict)
    shared: dict = field(factory=dict)
    sessions: SessionRegistry = field(factory=SessionRegistry)
    stats: ProxyStats = field(default=None)
    gate: Any = None
    routerName: str = ""

    def __attrs_post_init__(self) -> None:
        if self.tracker is None:
            self.tracker = ConnectionTracker(self.limits.connectionsPerAddress)
        if self.stats is None:
            self.stats = ProxyStats(self.reactor)  # type: ignore[arg-type]


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
    @ivar user: the login name of the latest login attempt.
    @ivar mechanism: the mechanism of the latest login attempt.
    @ivar route: the router's answer to the latest login attempt, once it
        gave one.
    @ivar listenerName: how metrics name this connection's listener (its
        position in the configuration), set by L{FrontendFactory}.
    """

    protocolName = ""
    listenerName = ""
    log = Logger()
    transport: IProxyTransport

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        self.context = context
        self.listener = listener
        self.limits = context.limits
        self.tlsActive = listener.tls == "implicit"
        self.relay: Relay | None = None
        self.attempts = 0
        self.failures = 0
        self.user: str | None = None
        self.mechanism: str | None = None
        self.route: Route | None = None
        self.result = "disconnected before login"
        self._goodbye: str | None = None
        self._counted = False
        self._closing = False
        self._preauthTimer: IDelayedCall | None = None
        self._lost = False
        self._pauses: set[str] = set()
        self._watchingReplies = False
        self._pending: Deferred | None = None
        self._backend: BackendProtocol | None = None
        self._started = time.monotonic()
        self._loginStarted: float | None = None
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
            self.context.stats.connectionRefused(self.protocolName, self.listenerName, "connections_per_address")
            self.result = "too many connections"
            self.sayGoodbye("Too many connections from your address.")
            self.closeConnection()
            return
        self._counted = True
        self.context.stats.connectionAccepted(self.protocolName, self.listenerName)
        self.context.sessions.add(self)
        self._preauthTimer = self.context.reactor.callLater(self.limits.preauthTimeout, self._preauthExpired)
        if not self.tlsActive:
            self._watchReplies()
        self.greet()

    def handshakeCompleted(self) -> None:
        self._watchReplies()
        self.client = ClientInfo(
            sessionId=self.client.sessionId,
            address=self.client.address,
            port=self.client.port,
            localAddress=self.client.localAddress,
            localPort=self.client.localPort,
            tls=_tls.tlsInfo(self.transport),
        )

    def dataReceived(self, data: bytes) -> None:
        # Once the proxy is closing the connection, input is not read: TLS
        # (and a PROXY header reader) still deliver what arrives while they
        # wait for the peer, and a refused or timed-out client must not go
        # on logging in.
        if not self._closing and not getattr(self.transport, "disconnecting", False):
            self.frontendDataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.tlsActive and self.client.tls is None and reason is not None and reason.check(SSL.Error):
            # The TLS layer reports its failure here; after the handshake
            # the client's TLS facts are known.
            self.context.stats.tlsHandshakeFailed(self.protocolName, self.listenerName)
        self._closing = True
        self._lost = True
        self._watchingReplies = False
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
            if self.relay is not None and self.route is not None:
                self.context.stats.sessionEnded(
                    self.protocolName, self.route.backend.name, self.relay.bytesFromClient, self.relay.bytesFromBackend
                )
            self.context.sessions.discard(self)
            self._logEnd()

    def readConnectionLost(self) -> None:
        """
        The client half-closed (only reported once relaying, see
        L{mailproxy._relay.allowHalfClose}): the relay passes it on.
        """
        if self.relay is not None:
            self.relay.clientHalfClosed()

    def writeConnectionLost(self) -> None:
        """
        The relay half-closed the client after the backend's last words;
        the client's own close follows.
        """

    def _preauthExpired(self) -> None:
        self._preauthTimer = None
        if self._closing or getattr(self.transport, "disconnecting", False):
            # Closed already, yet still here: the peer holds the connection
            # open (TLS waits for its close alert as long as it likes).
            self.transport.abortConnection()
            return
        self._closeBeforeLogin("pre-auth timeout", "Disconnected for inactivity.")

    def _closeBeforeLogin(self, result: str, goodbye: str) -> None:
        self._closing = True
        self.result = result
        if self._preauthTimer is not None and self._preauthTimer.active():
            self._preauthTimer.cancel()
        if self._pending is not None:
            # A login still running must not hand over after the goodbye.
            self._pending.cancel()
        self.sayGoodbye(goodbye)
        self.closeConnection()

    def _logEnd(self) -> None:
        relay = self.relay
        if relay is not None:
            result = "ok"
        elif self.attempts:
            result = "failed"
        else:
            result = "no-login"
        reason = relay.endReason if relay and relay.endReason else self.result
        backend = self.route.backend.name if self.route else None
        duration = time.monotonic() - self._started
        bytesIn = relay.bytesFromClient if relay else 0
        bytesOut = relay.bytesFromBackend if relay else 0
        client = self.client
        # The line is composed here with an f-string: the logging system's
        # own formatter is pure Python and costs more than the whole rest of
        # a login's bookkeeping. The fields stay in the event for JSON.
        text = (
            f"session {client.sessionId} end: {self.protocolName} from {client.address}:{client.port} "
            f"user={logQuote(self.user)} backend={backend or '-'} result={result} reason={logQuote(reason)} "
            f"duration={duration:.3f}s in={bytesIn} out={bytesOut}"
        )
        self.log.info(
            "{text}",
            text=text,
            event="session_end",
            session=client.sessionId,
            protocol=self.protocolName,
            address=client.address,
            port=client.port,
            tls=client.tls.version if client.tls else None,
            sni=client.tls.serverName if client.tls else None,
            user=self.user,
            mechanism=self.mechanism,
            router=self.context.routerName,
            rule=self.route.rule if self.route else None,
            backend=backend,
            result=result,
            reason=reason,
            duration=duration,
            bytesIn=bytesIn,
            bytesOut=bytesOut,
        )

    # Operations

    @property
    def backendName(self) -> str | None:
        """
        The name of the backend this session's latest login was routed to,
        or L{None} before a route is known.
        """
        return self.route.backend.name if self.route is not None else None

    def drop(self, reason: str) -> None:
        """
        End this session from outside (an operator, a move, shutdown): say
        the protocol's goodbye with C{reason} and close both connections.

        @param reason: for the client; made one line of bounded length
            here (it may come from the management endpoint).
        """
        reason = oneLine(reason) or "Disconnected."
        if self.relay is not None:
            if self.relay.endReason is None:
                self._goodbye = reason
                self.relay.stop("dropped: " + reason)
            return
        if self._counted and not self._closing:
            self._closeBeforeLogin("dropped: " + reason, reason)

    def describe(self) -> dict[str, Any]:
        """
        This session as JSON-ready data, for the management endpoint.
        """
        relay = self.relay
        if relay is not None:
            state = "relay"
        elif self._pending is not None:
            state = "login"
        else:
            state = "pre-auth"
        return {
            "session": self.client.sessionId,
            "protocol": self.protocolName,
            "state": state,
            "account": self.user,
            "backend": self.backendName,
            "address": self.client.address,
            "port": self.client.port,
            "tls": self.client.tls.version if self.client.tls else None,
            "sni": self.client.tls.serverName if self.client.tls else None,
            "seconds": round(time.monotonic() - self._started, 3),
            "bytesFromClient": relay.bytesFromClient if relay else 0,
            "bytesFromBackend": relay.bytesFromBackend if relay else 0,
        }

    # Services for the protocol modules

    def pause(self, why: str) -> None:
        """
        Stop reading from the client until L{resume} is called with the
        same C{why}; reasons add up, so that one reason ending (a login
        answered) does not resume reading another still holds (replies the
        client has not read).
        """
        if not self._pauses and self.transport is not None and not self._closing:
            self.transport.pauseProducing()
        self._pauses.add(why)

    def resume(self, why: str) -> None:
        """
        Withdraw one reason to pause; reading goes on when none is left.
        """
        if why not in self._pauses:
            return
        self._pauses.discard(why)
        if not self._pauses and self.transport is not None and not self._closing:
            self.transport.resumeProducing()

    @property
    def repliesUnread(self) -> bool:
        """
        The client is not reading: more replies than the transport's write
        buffer holds wait to be sent. Command loops stop answering until
        they are sent (L{repliesRead}), leaving the rest of the input
        buffered.
        """
        return REPLIES_UNREAD in self._pauses

    def repliesRead(self) -> None:
        """
        The client has read the replies that piled up: go on answering.
        Front ends with a command loop override this.
        """

    def _watchReplies(self) -> None:
        # Until the hand-over the proxy writes only replies to the client's
        # commands: a client that sends commands and never reads them must
        # not make them pile up in memory. With TLS, only once the handshake
        # is done: TLS holds what is written during the handshake and pauses
        # the producer meanwhile, which must not stop the reading the
        # handshake needs.
        if not self._watchingReplies and not self._closing and self.relay is None:
            self.transport.registerProducer(_RepliesReader(self), True)
            self._watchingReplies = True

    def _stopWatchingReplies(self) -> None:
        # The relay registers producers of its own on the transport; TLS
        # sends its close alert, and TCP closes a connection whose producer
        # is paused, only once no producer is registered.
        if self._watchingReplies:
            self._watchingReplies = False
            self.transport.unregisterProducer()
        self.resume(REPLIES_UNREAD)

    def startTLS(self) -> None:
        """
        Turn the connection into TLS now (after the STARTTLS reply was
        written). The caller must discard any input already buffered.
        """
        self.tlsActive = True
        self._stopWatchingReplies()
        # The configuration refuses a STARTTLS listener without [tls].
        options = cast(IOpenSSLServerConnectionCreator, self.context.serverTLS)
        self.transport.startTLS(_tls.ApplicationProtocolOptions(options, self.listener.applicationProtocols))

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
        self._loginStarted = self.context.reactor.seconds()
        self.user = credentials.user
        self.mechanism = credentials.mechanism
        self.route = None
        self.pause("login")
        request = RouteRequest(
            protocol=self.protocolName,  # type: ignore[arg-type]
            credentials=credentials,
            client=self.client,
            attempt=self.attempts,
            clientID=clientID,
        )
        gate = self.context.gate
        waiting = gate.wait(request) if gate is not None else None
        if waiting is None:
            d = self._callRouter(request)
        else:
            d = waiting.addCallback(lambda _: self._callRouter(request))
        d.addCallbacks(self._routed, self._routerFailed, callbackArgs=(credentials, clientID))
        d.addErrback(self._delayFailure, self.context.reactor.seconds())
        d.addBoth(self._loginDone)
        self._pending = d
        return d

    def _callRouter(self, request: RouteRequest) -> Deferred:
        clock = self.context.reactor
        started = clock.seconds()

        def answered(result: object) -> object:
            self.context.stats.routerAnswered(clock.seconds() - started, self.context.routerName)
            return result

        return callRouter(self.context.router, request).addBoth(answered)

    def _routerFailed(self, reason: Failure) -> Failure:
        if reason.check(CancelledError) and self._closing:
            # The session ended while the router (or a move's hold) had the
            # login: it is abandoned, not failed, and must not be answered.
            return reason
        reason.trap(Exception)
        self.log.failure("router failed for session {session}", reason, session=self.client.sessionId)
        raise LoginFailed("unavailable")

    def _routed(self, answer, credentials: Credentials, clientID) -> Deferred:
        if isinstance(answer, Rejection):
            self.log.info(
                "login refused by router: session={session} user={user} temporary={temporary}",
                session=self.client.sessionId,
                user=logQuote(credentials.user),
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
                user=logQuote(credentials.user),
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
        clock = self.context.reactor
        started = clock.seconds()

        def timed(result: object) -> object:
            kind: str = "ok"
            if isinstance(result, Failure):
                if not result.check(BackendFailure):
                    # Abandoned (the client left), not an outcome.
                    return result
                kind = cast(BackendFailure, result.value).kind
            self.context.stats.backendLoginDone(self.protocolName, backend.name, kind, clock.seconds() - started)
            return result

        d = self.context.backendConnector(clock, self._backend)
        d.addBoth(timed)
        d.addErrback(self._backendFailed)
        return d

    def _backendFailed(self, reason: Failure) -> None:
        reason.trap(BackendFailure)
        failure = cast(BackendFailure, reason.value)
        self._backend = None
        self.log.info(
            "backend login failed: session={session} user={user} backend={backend} {kind}: {detail}",
            session=self.client.sessionId,
            user=logQuote(self.user),
            backend=self.route.backend.name if self.route else None,
            kind=failure.kind,
            # The backend's words, which may repeat the client's.
            detail=logQuote(failure.detail),
        )
        raise LoginFailed(failure.kind, clientText=failure.clientText)

    def _delayFailure(self, reason: Failure, started: float) -> Deferred[None] | Failure:
        # The delay runs from the start of the attempt, not from the
        # router's or the backend's answer: an unknown user (refused by the
        # router) and a wrong password (refused by the backend, later) are
        # answered at the same moment.
        if reason.check(CancelledError):
            return reason
        if reason.check(_Rejected):
            rejection = cast(_Rejected, reason.value).rejection
            failure = LoginFailed(
                "unavailable" if rejection.temporary else "auth",
                message=rejection.message,
                close=rejection.close,
            )
            wait = rejection.wait
        elif reason.check(LoginFailed):
            failure = cast(LoginFailed, reason.value)
            wait = 0.0
        else:
            self.log.failure("login failed unexpectedly", reason)
            failure, wait = LoginFailed("unavailable"), 0.0
        self.context.stats.loginFailed(self.protocolName, self.backendName or "", failure.kind, self._loginSeconds())
        if failure.kind == "auth":
            self.failures += 1
            wait += self.failures * self.limits.failureDelay
            # A stable line for fail2ban (examples/fail2ban): the address
            # comes before anything the client chose.
            self.log.info(
                "authentication failed: session={session} address={address} protocol={protocol} "
                "user={user} attempt={attempt}",
                event="login_failed",
                session=self.client.sessionId,
                address=self.client.address,
                port=self.client.port,
                protocol=self.protocolName,
                user=logQuote(self.user),
                mechanism=self.mechanism,
                attempt=self.attempts,
            )
        if self.failures >= self.limits.loginFailures:
            failure.close = True
        self.result = "login failed: " + failure.kind

        def deliver(_: object) -> None:
            raise failure

        wait -= self.context.reactor.seconds() - started
        if wait <= 0:
            raise failure
        delayed: Deferred = Deferred(lambda d: call.cancel())
        call = self.context.reactor.callLater(wait, delayed.callback, None)
        return delayed.addCallback(deliver)

    def _loginSeconds(self) -> float | None:
        # The latest login's time so far, on the context's clock.
        if self._loginStarted is None:
            return None
        return self.context.reactor.seconds() - self._loginStarted

    def _loginDone(self, result):
        self._pending = None
        self.resume("login")
        return result

    def closeConnection(self) -> None:
        """
        Close the client connection once what was written is sent (after
        the protocol's last words), reading no more input, and abort it if
        it is still open L{CLOSE_GRACE} seconds later: a TLS peer may never
        answer the close alert, or keep writing without reading.  This
        replaces the pre-auth timer.  Every close a front end starts before
        the hand-over comes here.
        """
        self._stopWatchingReplies()
        self._closing = True
        if self._preauthTimer is not None and self._preauthTimer.active():
            self._preauthTimer.cancel()
        self._preauthTimer = None
        self.transport.loseConnection()
        if not self._lost:
            self._preauthTimer = self.context.reactor.callLater(CLOSE_GRACE, self._preauthExpired)

    def stopPreauthTimer(self) -> None:
        """
        Stop the pre-auth timer of a session that never logs in (SMTP MX,
        served by the proxy from start to end): its front end applies
        timeouts of its own.
        """
        if self._preauthTimer is not None and self._preauthTimer.active():
            self._preauthTimer.cancel()
        self._preauthTimer = None

    def handOver(self, backend: BackendProtocol, toBackend: bytes = b"", guard: IRelayGuard | None = None) -> None:
        """
        The client has its login reply: from now on relay bytes.

        @param toBackend: client octets already read past the login command.
        @param guard: what keeps the client from saying what only the proxy
            may say to this backend (identity forwarding), if anything can.
        """
        if self._preauthTimer is not None and self._preauthTimer.active():
            self._preauthTimer.cancel()
        self._preauthTimer = None
        self._stopWatchingReplies()
        self.result = "logged in"
        self.context.stats.loginSucceeded(self.protocolName, backend.job.backend.name, self._loginSeconds())
        relay = Relay(
            self.transport,
            backend.transport,
            self.context.reactor,
            self.limits.idleTimeout,
            onEnd=self._relayEnded,
            guard=guard,
        )
        self.relay = relay
        self._backend = None
        self.dataReceived = relay.fromClient  # type: ignore[method-assign]
        backend.dataReceived = relay.fromBackend  # type: ignore[method-assign]
        backend.onLost = relay.backendLost
        backend.onHalfClosed = relay.backendHalfClosed
        relay.start(toClient=backend.leftover, toBackend=toBackend)

    def _relayEnded(self, relay: Relay) -> None:
        # The client sees a goodbye only from us; the backend's own
        # connection is closed under it.
        if relay.endReason == "idle timeout":
            self.sayGoodbye("Idle timeout.")
        elif self._goodbye is not None:
            self.sayGoodbye(self._goodbye)
        if not relay.clientGone:
            # The relay closes the client: cut it if it never finishes.
            self._closing = True
            self._preauthTimer = self.context.reactor.callLater(CLOSE_GRACE, self._preauthExpired)

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


@implementer(IPushProducer)
class _RepliesReader:
    """
    The producer a front end registers on its client's transport before
    the hand-over: the transport pauses it when its write buffer holds more
    than the transport's C{bufferSize} (64 KiB with Twisted's TCP), and
    resumes it once the buffer is sent.
    """

    def __init__(self, frontend: FrontendProtocol) -> None:
        self._frontend = frontend

    def pauseProducing(self) -> None:
        self._frontend.pause(REPLIES_UNREAD)

    def resumeProducing(self) -> None:
        frontend = self._frontend
        if frontend.repliesUnread:
            frontend.resume(REPLIES_UNREAD)
            frontend.repliesRead()

    def stopProducing(self) -> None:
        pass


class _Rejected(Exception):
    def __init__(self, rejection: Rejection) -> None:
        super().__init__("rejected")
        self.rejection = rejection


class FrontendFactory(Factory):
    """
    Builds a front-end protocol for each connection to one listener.
    """

    noisy = False  # one log line per listener start is enough

    def __init__(
        self, protocolClass: type[FrontendProtocol], context: ProxyContext, listener: Listener, name: str = ""
    ) -> None:
        """
        @param name: how metrics name the listener.
        """
        self.protocolClass = protocolClass
        self.context = context
        self.listener = listener
        self.name = name

    def buildProtocol(self, addr) -> FrontendProtocol:
        protocol = self.protocolClass(self.context, self.listener)
        protocol.listenerName = self.name
        return protocol
