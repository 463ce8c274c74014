"""
The path every session takes, whatever its protocol.

L{Session} is a client connection without a login: limits per client
address, the registry of open sessions, pausing and resuming, TLS, the
one way a session ends (L{Session.end}) and its session-end log line.
L{FrontendProtocol} adds the login: the pre-auth timer, a
L{mailproxy._login.LoginAttempt} per login, and the hand-over that joins
the client and the backend in a L{Relay}.

A protocol's front end writes only its wire syntax and the words for each
outcome (L{mailproxy._contract}); the command loop of
L{mailproxy._commandloop} takes the decisions between the two.
"""

from __future__ import annotations

import os
import time
from enum import Enum
from typing import Any, Callable, TypeVar, cast

from attrs import define, evolve, field
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _tls
from ._backend import BackendProtocol, LoginJob, connectBackend
from ._guard import IRelayGuard
from ._login import LoginAttempt, LoginFailed
from ._outcomes import EndReason
from ._registry import ConnectionTracker, SessionRegistry
from ._relay import CLOSE_GRACE, Relay
from ._safetext import logQuote, oneLine
from ._stats import ProxyStats
from ._shared import IFailureCounter, LocalFailures
from ._transport import IProxyTransport
from .interfaces import IRouter
from .model import ClientInfo, Credentials, Route
from .settings import Limits, Listener

# ConnectionTracker and SessionRegistry (of mailproxy._registry) and
# LoginFailed (of mailproxy._login) are known from here too.
__all__ = [
    "CLOSE_GRACE",
    "ConnectionTracker",
    "FrontendFactory",
    "FrontendProtocol",
    "LoginFailed",
    "ProxyContext",
    "Session",
    "SessionRegistry",
    "SessionState",
    "Timer",
]


#: The reason to pause reading while a client does not read its replies
#: (L{FrontendProtocol.repliesUnread}).
REPLIES_UNREAD = "replies unread"

#: The reason to pause while a login runs. Reading stops only once the
#: client sends something meanwhile: most clients wait for their login
#: reply, and stopping and resuming reading costs two C{epoll_ctl} calls
#: per login.
LOGIN_RUNNING = "login"

#: The reasons to pause when there are none: one empty set that every
#: session shares (an empty set of its own costs an idle session 216
#: octets; CPython has no shared empty frozenset).
_NO_PAUSES: frozenset[str] = frozenset()

_T = TypeVar("_T")

#: What L{Session.perListener} worked out, by session class, name,
#: listener (its id: a listener's settings are hashed field by field),
#: TLS state and host name; with the listener, which the id must still be.
_perListener: dict[tuple[type, str, int, bool, str], tuple[Listener, Any]] = {}
#: Entries it keeps at most: a few per listener, more only across reloads
#: of the configuration (each makes new listeners).
_PER_LISTENER_ENTRIES = 256


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
    @ivar tracker: counts open connections per client address
        (L{mailproxy._shared.IConnectionCounter}; a worker's counts those
        of every worker).
    @ivar failures: counts failed logins per client address
        (L{mailproxy._shared.IFailureCounter}; a worker's counts those of
        every worker).
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
    failures: IFailureCounter = field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.tracker is None:
            self.tracker = ConnectionTracker(self.limits.connectionsPerAddress)
        if self.failures is None:
            self.failures = LocalFailures(self.reactor)
        if self.stats is None:
            self.stats = ProxyStats(self.reactor)  # type: ignore[arg-type]


def plainAddress(address: str) -> str:
    """
    An IPv4 client of a dual-stack listener as plain IPv4 (C{::ffff:192.0.2.1}
    becomes C{192.0.2.1}), so routers, logs and backends see one form.
    """
    if address.lower().startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def _hostOf(address: object) -> str:
    """
    The host of a transport's address (L{plainAddress}), or its text if it
    has none; that text is only made then (an address's repr costs more
    than the rest of reading it).
    """
    host = getattr(address, "host", None)
    return plainAddress(host if isinstance(host, str) else str(address))


#: Each octet as one of the 32 letters and digits of base32 (lower case),
#: by its low five bits: 256 octets map evenly onto them.
_ID_LETTERS = bytes.maketrans(bytes(range(256)), bytes(b"abcdefghijklmnopqrstuvwxyz234567"[i % 32] for i in range(256)))


def newSessionId() -> str:
    """
    A short random session id, safe in any protocol's syntax: 16 letters
    and digits of lower-case base32, 80 random bits. Each random octet
    gives one character (the standard library's base32 is pure Python,
    some 3 us per session).
    """
    return os.urandom(16).translate(_ID_LETTERS).decode("ascii")


def _nothing() -> None:
    pass


class Timer:
    """
    One deadline on a clock: L{start} (or restart) it, L{stop} it; when it
    expires it calls its function once.

    Every timer of a session is one of these: the pre-auth timeout, the
    close grace, a protocol's own idle timeout.
    """

    def __init__(self, clock: IReactorTime, expired: Callable[[], None]) -> None:
        self._clock = clock
        self._expired = expired
        self._call: IDelayedCall | None = None

    def start(self, seconds: float) -> None:
        """
        Expire C{seconds} from now (instead of any time set before).
        """
        self.stop()
        self._call = self._clock.callLater(seconds, self._expire)

    def stop(self) -> None:
        """
        Do not expire (again).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def moveTo(self, seconds: float, expired: Callable[[], None]) -> IDelayedCall:
        """
        Give this timer's timed call to another deadline: C{expired} is
        called C{seconds} from now, instead of this timer's function. A
        running call is moved to a later deadline (C{reset}), not cancelled
        and made anew: a session's timed calls follow one another, and each
        new one costs a little at every login. The caller owns the call
        from now on (and cancels it if need be); this timer is not used
        again.

        @return: the timed call.
        """
        call, self._call = self._call, None
        self._expired = expired
        if call is not None and call.active():
            if call.getTime() <= self._clock.seconds() + seconds:
                call.reset(seconds)
                return call
            # Sooner: Twisted's reset then looks the call up in the
            # reactor's list of every timed call (one or two per session),
            # where a new call costs a heap insertion.
            call.cancel()
        return self._clock.callLater(seconds, self._expire)

    def close(self) -> None:
        """
        Stop for good, letting go of the function: a session's timer calls
        one of the session's methods, and the two would otherwise form a
        reference cycle that only the garbage collector frees.
        """
        self.stop()
        self._expired = _nothing

    @property
    def running(self) -> bool:
        """
        The timer was started and has neither expired nor been stopped.
        """
        return self._call is not None

    def _expire(self) -> None:
        self._call = None
        self._expired()


#: What a relaying session has for the pre-authentication timer it no
#: longer needs: one stopped timer for all (never started again).
_NO_PREAUTH = Timer(cast(IReactorTime, None), _nothing)


class SessionState(Enum):
    """
    Where a session is in its life; its values are what the management
    endpoint shows (L{Session.describe}).
    """

    #: Open, before a login (or without one).
    PREAUTH = "pre-auth"
    #: A login is running: the router or the backend has it.
    LOGIN = "login"
    #: Handed over: the client and the backend talk through a L{Relay}.
    RELAY = "relay"
    #: The proxy is closing the connection (its last words are being
    #: sent), or the relay ended.
    CLOSING = "closing"
    #: The connection is gone.
    CLOSED = "closed"


@implementer(IHandshakeListener)
class Session(Protocol):
    """
    A client connection, with or without a login: the bookkeeping every
    protocol shares.

    Subclasses implement L{greet}, L{sayGoodbye} and
    L{frontendDataReceived}; a session ends through L{end}.

    @cvar protocolName: C{"imap"}, C{"pop3"}, ...
    @cvar defaultEndReason: what the session-end line says if the client
        leaves before anything else happened.
    @ivar client: the client's addresses and TLS facts.
    @ivar tlsActive: the connection is (or is becoming) TLS.
    @ivar lifecycle: the L{SessionState}.
    @ivar relay: the L{Relay} once logged in (never, without a login).
    @ivar user: the login name of the latest login attempt.
    @ivar mechanism: the mechanism of the latest login attempt.
    @ivar route: the router's answer to the latest login attempt (or
        recipient), once it gave one.
    @ivar attempts: login attempts so far.
    @ivar listenerName: how metrics name this connection's listener (its
        position in the configuration), set by L{FrontendFactory}.
    """

    protocolName = ""
    listenerName = ""
    defaultEndReason = EndReason.DISCONNECTED
    log = Logger()
    transport: IProxyTransport
    relay: Relay | None = None
    attempts = 0

    # What every session sets, in slots: an idle session is mostly this
    # object, and with the subclasses' attributes in the instance
    # dictionary as well, there are more than CPython shares between the
    # instances of a class (30), so each session would carry a whole
    # dictionary of its own (about 1.5 KiB).
    __slots__ = (
        "context", "listener", "limits", "tlsActive", "lifecycle", "user", "mechanism", "route",
        "_endReason", "_endDetail", "_counted", "_closeGrace", "_pauses", "_readingPaused", "_watchingReplies", "_started", "client",
    )  # fmt: skip

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        self.context = context
        self.listener = listener
        self.limits = context.limits
        self.tlsActive = listener.tls == "implicit"
        self.lifecycle = SessionState.PREAUTH
        self.user: str | None = None
        self.mechanism: str | None = None
        self.route: Route | None = None
        self._endReason = self.defaultEndReason
        self._endDetail = ""
        self._counted = False
        self._closeGrace = Timer(context.reactor, self._closeGraceExpired)
        self._pauses: frozenset[str] = _NO_PAUSES
        # The transport was asked to stop reading (see LOGIN_RUNNING).
        self._readingPaused = False
        self._watchingReplies = False
        self._started = time.monotonic()
        self.client = ClientInfo(sessionId=newSessionId(), address="", port=0, localAddress="", localPort=0)

    # Life cycle

    def connectionMade(self) -> None:
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self.client = ClientInfo(
            sessionId=self.client.sessionId,
            address=_hostOf(peer),
            port=getattr(peer, "port", 0),
            localAddress=_hostOf(host),
            localPort=getattr(host, "port", 0),
        )
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        if not self.context.tracker.add(self.client.address):
            self.context.stats.connectionRefused(self.protocolName, self.listenerName, "connections_per_address")
            self.end(EndReason.TOO_MANY_CONNECTIONS, "Too many connections from your address.")
            return
        self._counted = True
        self.context.stats.connectionAccepted(self.protocolName, self.listenerName)
        self.context.sessions.add(self)
        self.sessionOpened()
        if not self.tlsActive:
            self._watchReplies()
        self.greet()

    def sessionOpened(self) -> None:
        """
        The connection was accepted and registered; the greeting follows.
        Subclasses start their timers here.
        """

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
        if not self.closing and not getattr(self.transport, "disconnecting", False):
            if self._pauses and not self._readingPaused:
                # Input while a login runs: now reading stops.
                self._pauseReading()
            self.frontendDataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.tlsActive and self.client.tls is None and reason is not None and reason.check(SSL.Error):
            # The TLS layer reports its failure here; after the handshake
            # the client's TLS facts are known.
            self.context.stats.tlsHandshakeFailed(self.protocolName, self.listenerName)
        self.lifecycle = SessionState.CLOSED
        self._watchingReplies = False
        self._closeGrace.close()
        self.sessionLost()
        if self._counted:
            self._counted = False
            self.context.tracker.remove(self.client.address)
            self.context.sessions.discard(self)
            self._logEnd()

    def sessionLost(self) -> None:
        """
        The connection is gone, before it leaves the registry: subclasses
        stop their timers and give up what they hold.
        """

    @property
    def closing(self) -> bool:
        """
        The proxy is closing the connection, or it is gone: no more input
        is read.
        """
        return self.lifecycle in (SessionState.CLOSING, SessionState.CLOSED)

    def end(self, reason: EndReason, goodbye: str | None = None, detail: str = "") -> None:
        """
        End the session: the one way a session the proxy closes ends.

        Notes C{reason} (with C{detail}) for the session-end line, says
        the protocol's goodbye with C{goodbye} if one is given
        (L{sayGoodbye}), and closes the connection once what was written is
        sent, aborting it if it is still open L{CLOSE_GRACE} seconds later.
        A session already closing is left alone.

        @param goodbye: the words for the client, or L{None} when the
            protocol wrote its last reply itself (a LOGOUT's C{OK}).
        """
        if self.closing:
            return
        self.noteOutcome(reason, detail)
        self.lifecycle = SessionState.CLOSING
        self.sessionEnding()
        if goodbye is not None:
            self.sayGoodbye(reason, goodbye)
        self._closeConnection()

    def noteOutcome(self, reason: EndReason, detail: str = "") -> None:
        """
        What the session-end line says (C{reason=}) unless something else
        happens first: a failed login, an MX session's messages.
        """
        self._endReason, self._endDetail = reason, detail

    @property
    def endReason(self) -> EndReason:
        """
        The L{EndReason} the session-end line gives so far.
        """
        return self._endReason

    @property
    def result(self) -> str:
        """
        The session-end line's C{reason=} words so far (before hand-over;
        after it the relay's reason is logged).
        """
        return self._endReason.words(self._endDetail)

    def sessionEnding(self) -> None:
        """
        L{end} is closing the session, before its goodbye: subclasses stop
        their timers and what must not go on (a login still running must
        not hand over after the goodbye).
        """

    def _closeConnection(self) -> None:
        # Close once what was written is sent (after the protocol's last
        # words), reading no more input, and abort if still open
        # CLOSE_GRACE seconds later: a TLS peer may never answer the close
        # alert, or keep writing without reading.
        self._stopWatchingReplies()
        self.connectionClosing()
        self.transport.loseConnection()
        if self.lifecycle is not SessionState.CLOSED:
            self._closeGrace.start(CLOSE_GRACE)

    def connectionClosing(self) -> None:
        """
        The proxy started closing the connection (after the goodbye):
        subclasses stop the timers that would close it again.
        """

    def _closeGraceExpired(self) -> None:
        # Closed already, yet still here: the peer holds the connection
        # open (TLS waits for its close alert as long as it likes).
        self.transport.abortConnection()

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

    def sessionTraffic(self) -> tuple[str, int, int]:
        """
        The session-end line's C{result=} and the octets from the client
        and from the backend.  A protocol that relays in its own way (HTTP,
        request by request) counts its own.
        """
        relay = self.relay
        if relay is not None:
            return "ok", relay.bytesFromClient, relay.bytesFromBackend
        return ("failed" if self.attempts else "no-login"), 0, 0

    def relayed(self) -> tuple[str, int, int]:
        """
        For the open-session metrics: the backend this session relays to
        (C{""} before it does) and the octets relayed so far each way.
        """
        relay, route = self.relay, self.route
        if relay is None or route is None:
            return "", 0, 0
        return route.backend.name, relay.bytesFromClient, relay.bytesFromBackend

    def sessionFields(self) -> dict[str, Any]:
        """
        What a protocol adds to its C{session_end} event (HTTP: the
        requests counted).
        """
        return {}

    def _logEnd(self) -> None:
        relay = self.relay
        result, bytesIn, bytesOut = self.sessionTraffic()
        reason = relay.endReason.words(relay.endDetail) if relay and relay.endReason else self.result
        route = self.route
        backend = self.backendName
        duration = time.monotonic() - self._started
        client = self.client
        # The line is composed here with an f-string: the logging system's
        # own formatter is pure Python and costs more than the whole rest of
        # a login's bookkeeping. The fields stay in the event for JSON.
        text = (
            f"session {client.sessionId} end: {self.protocolName} from {client.address}:{client.port} "
            f"user={logQuote(self.user)} backend={backend or '-'} result={result} reason={logQuote(reason)} "
            f"duration={duration:.3f}s in={bytesIn} out={bytesOut}"
        )
        log = self.log
        event = dict(
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
            rule=route.rule if route else None,
            backend=backend,
            result=result,
            reason=reason,
            duration=duration,
            bytesIn=bytesIn,
            bytesOut=bytesOut,
            **self.sessionFields(),
        )
        # The event Twisted's Logger.info makes, given to the logger's
        # observer as Logger.emit does, without emit's check that the level
        # is one of LogLevel's (it sorts them all for that, on every event):
        # a fifth of what this line costs a worker.
        event.update(
            log_logger=log,
            log_level=LogLevel.info,
            log_namespace=log.namespace,
            log_source=log.source,
            log_format="{text}",
            log_time=time.time(),
        )
        log.observer(event)

    # Operations

    @property
    def backendName(self) -> str | None:
        """
        The name of the backend this session's latest login was routed to,
        or L{None} before a route is known.
        """
        route = self.route
        return route.backend.name if route is not None else None

    @property
    def finishing(self) -> float:
        """
        Seconds this session, asked to L{drop}, may still take to finish
        what must not be cut (an SMTP message whose end was sent, waiting
        for the backend's reply: cut, the sender would send it again);
        0 when it closes at once.
        """
        return 0.0

    def drop(self, reason: str, why: EndReason = EndReason.DROPPED) -> None:
        """
        End this session from outside (an operator, a move, shutdown): say
        the protocol's goodbye with C{reason} and close both connections.

        @param reason: for the client; made one line of bounded length
            here (it may come from the management endpoint).
        @param why: L{EndReason.DROPPED}, or L{EndReason.SHUTDOWN} when the
            proxy stops; the log says C{dropped: } and C{reason} for both.
        """
        reason = oneLine(reason) or "Disconnected."
        if self._counted:
            self.end(why, reason, detail=reason)

    def describe(self) -> dict[str, Any]:
        """
        This session as JSON-ready data, for the management endpoint.
        """
        relay = self.relay
        if relay is not None:
            state = SessionState.RELAY
        elif self.loginRunning:
            state = SessionState.LOGIN
        else:
            state = SessionState.PREAUTH
        return {
            "session": self.client.sessionId,
            "protocol": self.protocolName,
            "state": state.value,
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

    @property
    def loginRunning(self) -> bool:
        """
        A login is waiting for the router or the backend.
        """
        return False

    # Services for the protocol modules

    def pause(self, why: str) -> None:
        """
        Stop reading from the client until L{resume} is called with the
        same C{why}; reasons add up, so that one reason ending (a login
        answered) does not resume reading another still holds (replies the
        client has not read).
        """
        self._pauses |= {why}
        if why != LOGIN_RUNNING and not self._readingPaused:
            self._pauseReading()

    def _pauseReading(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.pauseProducing()
            self._readingPaused = True

    def resume(self, why: str) -> None:
        """
        Withdraw one reason to pause; reading goes on when none is left.
        """
        if why not in self._pauses:
            return
        self._pauses = self._pauses - {why} or _NO_PAUSES
        if not self._pauses and self._readingPaused:
            self._readingPaused = False
            if self.transport is not None and not self.closing:
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
        if not self._watchingReplies and not self.closing and self.relay is None:
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

    def perListener(self, name: str, make: Callable[[], _T]) -> _T:
        """
        What C{make()} returns for this session, worked out once for every
        session of this class on the same listener, in the same TLS state
        and under the same host name, and kept: C{make} may depend on
        nothing else (a pre-login capability list, a greeting).

        @param name: what is made, to tell it from the class's other such
            values.
        """
        listener, hostname = self.listener, self.context.hostname
        key = (type(self), name, id(listener), self.tlsActive, hostname)
        known = _perListener.get(key)
        if known is not None and known[0] is listener:
            return cast(_T, known[1])
        value = make()
        if len(_perListener) >= _PER_LISTENER_ENTRIES:
            _perListener.clear()
        _perListener[key] = (listener, value)
        return value

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

    # For subclasses

    def greet(self) -> None:
        """
        Write the protocol's greeting.
        """
        raise NotImplementedError

    def sayGoodbye(self, reason: EndReason, text: str) -> None:
        """
        Write the protocol's last words before the proxy closes the
        connection (see L{mailproxy._contract.IProtocolFrontend.sayGoodbye}).
        """
        raise NotImplementedError

    def frontendDataReceived(self, data: bytes) -> None:
        """
        Handle client octets before hand-over.
        """
        raise NotImplementedError


class FrontendProtocol(Session):
    """
    A session whose client logs in: until the hand-over it is timed by the
    pre-auth timeout; each login is a L{LoginAttempt}; once the backend
    accepted it, the client and the backend are joined in a L{Relay}.

    Subclasses implement L{makeBackendLogin} besides what L{Session} asks.

    @cvar backendChecksLogins: the backend's acceptance of a login proves
        its password (its login dialogue checks it), which forgives the
        failures of the account from the client's address.
    @ivar failures: logins refused for their credentials so far.
    """

    backendChecksLogins = True

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        super().__init__(context, listener)
        self.relay = None
        self.attempts = 0
        self.failures = 0
        self._attempt: LoginAttempt | None = None
        self._pending: Deferred[BackendProtocol] | None = None
        self._goodbye: tuple[EndReason, str] | None = None
        self._preauth = Timer(context.reactor, self._preauthExpired)

    @property
    def loginRunning(self) -> bool:
        return self._pending is not None

    # Life cycle

    def sessionOpened(self) -> None:
        self._preauth.start(self.limits.preauthTimeout)

    def sessionEnding(self) -> None:
        self._preauth.stop()
        if self._pending is not None:
            # A login still running must not hand over after the goodbye.
            self._pending.cancel()

    def sessionLost(self) -> None:
        self._preauth.close()
        if self._pending is not None:
            self._pending.cancel()
        if self._attempt is not None:
            backend = self._attempt.release()
            if backend is not None and self.relay is None:
                backend.abandon()
            # The attempt refers to the session.
            self._attempt = None
        if self.relay is not None:
            self.relay.clientLost()
            if self._counted and self.route is not None:
                self.context.stats.sessionEnded(
                    self.protocolName, self.route.backend.name, self.relay.bytesFromClient, self.relay.bytesFromBackend
                )

    def _preauthExpired(self) -> None:
        if self.closing or getattr(self.transport, "disconnecting", False):
            # Closed already (not through end()), yet still here: the peer
            # holds the connection open.
            self.transport.abortConnection()
            return
        self.end(EndReason.PREAUTH_TIMEOUT, "Disconnected for inactivity.")

    # Login

    def routeUnknown(self, credentials: Credentials) -> Route | None:
        """
        Where a login goes that the router refused as unknown (it does not
        know the account at all): L{None}, refused like any failed login.
        A front end with a backend of its own for such logins returns its
        route; that backend then judges the credentials.
        """
        return None

    def login(self, credentials: Credentials, clientID: tuple[tuple[str, str], ...] = ()) -> Deferred[BackendProtocol]:
        """
        Route C{credentials}, connect the backend and log in there (a
        L{LoginAttempt}).

        Reading from the client pauses until the outcome is known. A
        failure is delivered only after the failed-login delay.

        @return: fires with the logged-in L{BackendProtocol}, to be passed
            to L{handOver} once the client has its reply; or fails with
            L{LoginFailed}.
        """
        self.attempts += 1
        self.user = credentials.user
        self.mechanism = credentials.mechanism
        self.route = None
        self.lifecycle = SessionState.LOGIN
        self._attempt = LoginAttempt(self, credentials, clientID)
        self.pause(LOGIN_RUNNING)
        # Pending before its callback is added: an outcome known at once
        # (a refusal with no delay) runs it now, and the login is over.
        self._pending = d = self._attempt.run()
        d.addBoth(self._loginDone)
        return d

    def _loginDone(self, result: object) -> object:
        self._pending = None
        if self.lifecycle is SessionState.LOGIN:
            self.lifecycle = SessionState.PREAUTH
        self.resume(LOGIN_RUNNING)
        return result

    def handOver(self, backend: BackendProtocol, toBackend: bytes = b"", guard: IRelayGuard | None = None) -> None:
        """
        The client has its login reply: from now on relay bytes.

        @param toBackend: client octets already read past the login command.
        @param guard: what keeps the client from saying what only the proxy
            may say to this backend (identity forwarding), if anything can.
        """
        # The pre-authentication timer's timed call goes on as the relay's
        # idle timeout; the session itself holds no timer while relaying
        # (an idle session would hold it and its bound method for hours).
        preauth, self._preauth = self._preauth, _NO_PREAUTH
        self._stopWatchingReplies()
        self.lifecycle = SessionState.RELAY
        self.noteOutcome(EndReason.LOGGED_IN)
        seconds = self._attempt.seconds() if self._attempt is not None else None
        self.context.stats.loginSucceeded(self.protocolName, backend.job.backend.name, seconds)
        relay = Relay(
            self.transport,
            backend.transport,
            self.context.reactor,
            self.limits.idleTimeout,
            onEnd=self._relayEnded,
            guard=guard,
        )
        self.relay = relay
        if self._attempt is not None:
            self._attempt.release()
            # The attempt holds the client's credentials: a relayed session
            # may last for hours, and needs neither them nor the attempt.
            self._attempt = None
        if self.route is not None and self.route.password is not None:
            self.route = evolve(self.route, password=None)
        self.dataReceived = relay.fromClient  # type: ignore[method-assign]
        backend.dataReceived = relay.fromBackend  # type: ignore[method-assign]
        backend.onLost = relay.backendLost
        backend.onHalfClosed = relay.backendHalfClosed
        relay.start(toClient=backend.leftover, toBackend=toBackend, schedule=preauth.moveTo)
        if preauth.running:
            # The relay has no idle timeout: it took no timed call.
            preauth.close()
        backend.handedOver()
        if self in self.context.sessions:
            self.context.sessions.loggedIn(self)

    def drop(self, reason: str, why: EndReason = EndReason.DROPPED) -> None:
        if self.relay is None:
            super().drop(reason, why)
            return
        reason = oneLine(reason) or "Disconnected."
        if self.relay.endReason is None:
            self._goodbye = (why, reason)
            self.relay.stop(why, reason)

    def _relayEnded(self, relay: Relay) -> None:
        # The client sees a goodbye only from us; the backend's own
        # connection is closed under it.
        if relay.endReason is EndReason.IDLE_TIMEOUT:
            self.sayGoodbye(EndReason.IDLE_TIMEOUT, "Idle timeout.")
        elif self._goodbye is not None:
            self.sayGoodbye(*self._goodbye)
        if not relay.clientGone:
            # The relay closes the client: cut it if it never finishes.
            self.lifecycle = SessionState.CLOSING
            self._closeGrace.start(CLOSE_GRACE)

    # For subclasses

    def makeBackendLogin(self, job: LoginJob) -> BackendProtocol:
        """
        The protocol's backend login dialogue for C{job}: the registry's
        C{backendLogin} of this listener's protocol, given the job, the
        reactor and the backend timeout.  A protocol whose dialogue needs
        more (SMTP's knowledge of the backends' extensions) overrides this.
        """
        dialogue = self.listener.descriptor.backendLoginFactory()
        return cast(BackendProtocol, dialogue(job, self.context.reactor, self.limits.backendTimeout))


@implementer(IPushProducer)
class _RepliesReader:
    """
    The producer a front end registers on its client's transport before
    the hand-over: the transport pauses it when its write buffer holds more
    than the transport's C{bufferSize} (64 KiB with Twisted's TCP), and
    resumes it once the buffer is sent.
    """

    def __init__(self, frontend: Session) -> None:
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


class FrontendFactory(Factory):
    """
    Builds a front-end protocol for each connection to one listener.
    """

    noisy = False  # one log line per listener start is enough

    def __init__(
        self, protocolClass: type[Session], context: ProxyContext, listener: Listener, name: str = ""
    ) -> None:
        """
        @param name: how metrics name the listener.
        """
        self.protocolClass = protocolClass
        self.context = context
        self.listener = listener
        self.name = name

    def buildProtocol(self, addr) -> Session:
        protocol = self.protocolClass(self.context, self.listener)
        protocol.listenerName = self.name
        return protocol
