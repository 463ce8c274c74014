"""
Reaching a backend: TCP, the PROXY header, TLS, and the login dialogue's
shared plumbing.

A protocol module writes its backend login as a subclass of
L{BackendProtocol}: it only speaks its wire syntax (greeting, capabilities,
identity forwarding, login), moves through the L{LoginState}s and reports
the outcome with L{succeed} or L{fail}. Connecting, the PROXY header,
implicit TLS, STARTTLS (the request, the check that nothing came in clear
behind the reply, the handshake with certificate verification before any
credential is written), the dialogue's timeout and the classification of
failures live here.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, cast

from attrs import evolve, field, frozen
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IConnector, IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _proxyproto, _tls
from ._outcomes import FailureKind
from ._relay import socketOf
from ._sasl import oauthResponse, plainResponse
from ._tcp import connectAtOnce, quickAck
from ._transport import IProxyTransport
from .model import Backend, ClientInfo, Credentials, Route

#: Octets a backend may send from its greeting to the end of the login
#: dialogue. A real server's greeting, capabilities and login reply take a
#: few KiB; a hostile one that keeps sending (endless untagged lines, a
#: capability list without end) fails the login as temporary here instead of
#: growing what the dialogue collects.
MAX_LOGIN_DIALOGUE = 256 * 1024

#: The hop count a backend is told with the client's identity (IMAP ID
#: C{x-proxy-ttl}, XCLIENT C{TTL}). A proxy that forwards the session
#: again passes on a lower count and refuses at zero, so that proxies
#: routed at each other stop. This proxy is always the first hop: it
#: takes no forwarded identity from its clients.
PROXY_TTL = 5


class LoginState(Enum):
    """
    Where a backend login dialogue stands. Each protocol passes through
    those its dialogue has, in about this order; SMTP asks for the
    capabilities again after TLS and after XCLIENT, ManageSieve reads a
    second greeting after TLS.
    """

    #: Connected (with implicit TLS, handshaking): the greeting is awaited.
    GREETING = "greeting"
    #: The capabilities were asked for (IMAP CAPABILITY, POP3 CAPA, SMTP
    #: EHLO).
    CAPABILITIES = "capabilities"
    #: STARTTLS (POP3: STLS) was sent; its reply is awaited.
    STARTTLS = "starttls"
    #: The server accepted STARTTLS: the handshake runs, and nothing may
    #: arrive in clear.
    HANDSHAKE = "handshake"
    #: The client's identity was sent on its own (XCLIENT); the server's
    #: answer is awaited.
    IDENTITY = "identity"
    #: The login was sent (with any identity forwarding pipelined before
    #: it); its outcome is awaited.
    LOGIN = "login"
    #: No login to do (an SMTP relay): the front end drives the connection.
    SESSION = "session"


class BackendFailure(Exception):
    """
    The backend did not give us a logged-in session.

    @ivar kind: L{FailureKind.AUTH}: it refused the credentials (the client
        sees the generic authentication failure);
        L{FailureKind.UNAVAILABLE}: it could not be reached, timed out,
        failed TLS or spoke nonsense (the client sees a temporary failure);
        L{FailureKind.REFUSED}: it refused for a reason worth passing on
        (C{clientText} is safe to show, e.g. an IMAP C{[LIMIT]} code).
    @ivar detail: what happened, for the log (never a credential).
    @ivar clientText: for L{FailureKind.REFUSED}, the protocol-specific
        reply text.
    @ivar saslError: for an OAuth login passed through, the error the
        backend sent as its last challenge (RFC 7628's JSON, decoded),
        for the client; empty if none.
    """

    def __init__(self, kind: FailureKind, detail: str, clientText: str = "", saslError: bytes = b"") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail
        self.clientText = clientText
        self.saslError = saslError

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@frozen
class LoginJob:
    """
    Everything a backend login dialogue needs to know.

    @ivar user: the login name for the backend (after any rewrite).
    @ivar password: the password for the backend, or L{None} with a master
        user.
    @ivar masterUser: log in as this master user on C{user}'s behalf.
    @ivar clientID: IMAP ID pairs the client sent, to pass on.
    @ivar portName: the key of the backend's C{ports} to connect to, when
        it is not C{protocol} (SMTP MX sessions use C{"mx"}).
    """

    route: Route
    protocol: str
    client: ClientInfo
    credentials: Credentials | None
    user: str
    password: bytes | None = field(repr=False)
    masterUser: str | None = None
    masterPassword: bytes | None = field(default=None, repr=False)
    clientID: tuple[tuple[str, str], ...] = ()
    portName: str | None = None

    @property
    def backend(self) -> Backend:
        """
        The backend this job logs in to.
        """
        return self.route.backend

    @property
    def tls(self) -> str:
        """
        How to reach the backend on the port this job connects to: C{"none"},
        C{"starttls"} or C{"implicit"}.
        """
        return self.route.backend.tlsFor(self.portName or self.protocol)

    def withoutSecrets(self) -> LoginJob:
        """
        This job with no password left in it: neither the backend's nor
        the master user's, nor the client's credentials' (a digest's
        response and an OAuth token included), nor the route's.
        """
        # Copied only where a secret is: a router's route seldom holds a
        # password. The job and the credentials, copied at every login
        # between the backend's reply and the client's, are built field by
        # field: attrs' evolve looks every field up by name first, some
        # microseconds each (tests.unit.test_backend checks no field is
        # left out).
        credentials, route = self.credentials, self.route
        if credentials is not None and (credentials.password, credentials.response, credentials.token) != (None, None, None):
            credentials = Credentials(
                mechanism=credentials.mechanism,
                user=credentials.user,
                authzid=credentials.authzid,
                challenge=credentials.challenge,
            )
        if route.password is not None:
            route = evolve(route, password=None)
        return LoginJob(
            route=route,
            protocol=self.protocol,
            client=self.client,
            credentials=credentials,
            user=self.user,
            password=None,
            masterUser=self.masterUser,
            masterPassword=None,
            clientID=self.clientID,
            portName=self.portName,
        )

    @property
    def passesToken(self) -> bool:
        """
        The backend gets the client's OAuth mechanism and token (the
        router gave neither a password nor the master user): the backend
        validates the token.
        """
        credentials = self.credentials
        return self.masterUser is None and self.password is None and credentials is not None and credentials.token is not None

    def saslLogin(self) -> tuple[bytes, bytes]:
        """
        The SASL mechanism to log in with and its initial response (base64):
        the client's OAuth mechanism and token where L{passesToken}, else
        PLAIN with L{saslIdentities}.
        """
        credentials = self.credentials
        if self.passesToken and credentials is not None and credentials.token is not None:
            user = self.user.encode("utf-8", "surrogateescape")
            return credentials.mechanism.encode("ascii"), oauthResponse(credentials.mechanism, user, credentials.token)
        return b"PLAIN", plainResponse(*self.saslIdentities())

    def saslIdentities(self) -> tuple[bytes, bytes, bytes]:
        """
        The SASL authorization identity, authentication identity and
        password to log in with, the names as UTF-8 (with
        C{surrogateescape}). A master user authenticates as itself on
        C{user}'s behalf; otherwise the authorization identity is empty.
        """
        if self.masterUser is not None:
            authzid, authcid, password = self.user, self.masterUser, self.masterPassword or b""
        else:
            authzid, authcid, password = "", self.user, self.password or b""
        return authzid.encode("utf-8", "surrogateescape"), authcid.encode("utf-8", "surrogateescape"), password


@implementer(IHandshakeListener)
class BackendProtocol(Protocol):
    """
    The client side of a connection to a backend, until login.

    Subclasses implement L{dialogueReceived} (bytes before hand-over) and
    L{buffered}, call L{askForTLS} and L{tlsAnswered} for STARTTLS, continue
    in L{tlsReady}, and end with L{succeed} or L{fail}. After L{succeed},
    the relay replaces C{dataReceived} and the subclass is done.

    @ivar result: fires with this protocol once logged in, or fails with
        L{BackendFailure}.
    @ivar state: where the dialogue stands.
    @ivar leftover: octets read past the end of the login dialogue.
    @ivar tlsActive: TLS is up (implicit, or after STARTTLS) and verified.
    @cvar startTLSCommand: the protocol's name for STARTTLS, for logs.
    """

    # The base's attributes in slots: a subclass and Twisted add theirs to
    # the instance dictionary, and with all of them there (about 30) the
    # dictionary of a logged-in connection became a full-size one of its
    # own, about 1.5 KiB per idle session (CPython 3.11).
    __slots__ = (
        "job", "result", "state", "stopConnecting", "leftover", "tlsActive", "onLost", "onHalfClosed",
        "_clock", "_timeout", "_timer", "_done", "_awaitingHandshake", "_tlsOptions", "_received", "_connectExpired",
        "_answered",
    )  # fmt: skip

    log = Logger()
    startTLSCommand = "STARTTLS"
    # None until connected: the dialogue runs on a connection, and what may
    # run before one (fail, abandon, cancelling) checks.
    transport: IProxyTransport

    def __init__(self, job: LoginJob, clock: IReactorTime, timeout: float) -> None:
        self.job = job
        self.result: Deferred[BackendProtocol] = Deferred(lambda d: self._cancelled())
        self.state = LoginState.GREETING
        #: Abandons a connection attempt still under way.
        self.stopConnecting: Callable[[], object] | None = None
        self.leftover = b""
        self.tlsActive = False
        self._clock = clock
        self._timeout = timeout
        self._timer: IDelayedCall | None = None
        # What the timer does if it expires before the connection is made
        # (timeConnect).
        self._connectExpired: Callable[[], object] | None = None
        self._done = False
        self._awaitingHandshake = False
        self._tlsOptions: _tls.ResumingClientOptions | None = None
        self._received = 0
        self._answered = False
        self.onLost: Callable[[], None] | None = None
        self.onHalfClosed: Callable[[], None] | None = None

    # Connection lifecycle

    def connectionMade(self) -> None:
        # Connected: nothing to abandon any more (and the connector, which
        # refers to this protocol, need not be kept alive by it).
        self.stopConnecting = None
        backend = self.job.backend
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        self._connectExpired = None
        if self._timer is not None:
            # It timed the connection attempt: from now on, the dialogue.
            self._timer.reset(self._timeout)
        else:
            self._timer = self._clock.callLater(self._timeout, self._timedOut)
        header = proxyHeader(backend, self.job.client, self.job.protocol)
        if header:
            self.transport.write(header)
        if self.job.tls == "implicit":
            self.startTLS()

    def dataReceived(self, data: bytes) -> None:
        if not self._done:
            self._received += len(data)
            if self._received > MAX_LOGIN_DIALOGUE:
                self.fail(FailureKind.UNAVAILABLE, f"backend sent more than {MAX_LOGIN_DIALOGUE} octets during login")
                return
        if self._awaitingHandshake and not self.tlsActive:
            # Bytes the server sent before the TLS handshake finished can only
            # be plaintext injected after its STARTTLS reply.
            self.fail(FailureKind.UNAVAILABLE, "backend sent data before the TLS handshake")
            return
        self._answered = False
        self.dialogueReceived(data)
        if not self._done and not self._answered:
            # Nothing written in reply carried the ACK of what was read.
            acknowledgeNow(self.transport)

    def send(self, data: bytes) -> None:
        """
        Write C{data} to the backend during the login dialogue. A write made
        while handling what the backend sent acknowledges it (the ACK goes
        with the data), so no separate ACK (L{acknowledgeNow}) follows that
        read: one system call less per command the dialogue answers with.
        """
        self._answered = True
        self.transport.write(data)

    def dialogueReceived(self, data: bytes) -> None:
        """
        Handle backend octets during the login dialogue.
        """
        raise NotImplementedError(type(self).__name__ + " must handle the dialogue")

    def buffered(self) -> int:
        """
        How many octets the backend sent that the dialogue has read but not
        handled yet.
        """
        raise NotImplementedError(type(self).__name__ + " must say what it holds unread")

    # STARTTLS: the protocol words the command and judges the reply; the
    # rest is the same for all.

    def askForTLS(self, line: bytes, offered: bool = True) -> None:
        """
        Send the protocol's STARTTLS command; the protocol passes the reply
        to L{tlsAnswered}.

        @param line: the command line without CRLF (an IMAP tag included).
        @param offered: whether the server's capabilities allow it (if
            they are unknown, try); if not, the login fails as temporary,
            since the backend is configured for STARTTLS.
        """
        if not offered:
            self.fail(FailureKind.UNAVAILABLE, "backend does not offer " + self.startTLSCommand)
            return
        self.state = LoginState.STARTTLS
        self.send(line + b"\r\n")

    def tlsAnswered(self, accepted: bool, reply: str | None = None) -> None:
        """
        The backend replied to STARTTLS: go on with TLS if C{accepted} (the
        reply means "go on" in the protocol's terms), else fail.

        Call it once the reply is consumed, so that L{buffered} counts only
        what followed it.

        @param reply: the reply as a log shows it, if the log should.
        """
        if not accepted:
            shown = "" if reply is None else ": " + reply
            self.fail(FailureKind.UNAVAILABLE, f"backend refused {self.startTLSCommand}{shown}")
            return
        if self.buffered():
            # They came in clear behind the reply, so anyone on the path
            # could have written them; read after the handshake, they would
            # pass for protected (command injection).
            self.fail(FailureKind.UNAVAILABLE, f"backend sent data after its {self.startTLSCommand} reply")
            return
        self.state = LoginState.HANDSHAKE
        self.startTLS()

    def startTLS(self) -> None:
        """
        Start TLS towards the backend (for implicit TLS, at once; after
        STARTTLS, from L{tlsAnswered}); after STARTTLS, L{tlsReady} runs
        once the handshake has finished and the certificate has been
        verified.
        """
        self._awaitingHandshake = True
        job = self.job
        self._tlsOptions = _tls.clientOptions(job.backend, job.backend.ports.get(job.portName or job.protocol))
        self.transport.startTLS(self._tlsOptions)

    def handshakeCompleted(self) -> None:
        self.tlsActive = True
        self._awaitingHandshake = False
        if self.state is LoginState.HANDSHAKE:
            self.tlsReady()

    def tlsReady(self) -> None:
        """
        TLS to the backend is up and verified after STARTTLS; subclasses
        continue their dialogue here (what the server said in clear is to
        be forgotten). Not called for implicit TLS, where the greeting
        follows.
        """

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancelTimer()
        if not self._done:
            detail = "connection closed during login"
            if self._awaitingHandshake:
                detail = "TLS handshake failed: " + _describe(reason)
            self.fail(FailureKind.UNAVAILABLE, detail)
        elif self.onLost is not None:
            self.onLost()

    def readConnectionLost(self) -> None:
        """
        The backend half-closed (only reported once relaying, see
        L{mailproxy._relay.allowHalfClose}).
        """
        if self.onHalfClosed is not None:
            self.onHalfClosed()

    def writeConnectionLost(self) -> None:
        """
        The relay half-closed the backend after the client's last words;
        the backend's own close follows.
        """

    # Outcome

    def succeed(self, leftover: bytes = b"") -> None:
        """
        The backend accepted the login; hand this connection over.
        """
        if self._done or self.result.called:
            return
        self._over()
        if self._tlsOptions is not None:
            # The backend has answered since the handshake: its tickets are in.
            self._tlsOptions.keepSession(self.transport)
        self.leftover = leftover
        self.result.callback(self)

    def handedOver(self) -> None:
        """
        The session relays this connection now: forget what only the login
        dialogue needed, which an idle session would otherwise hold for
        hours. A subclass drops its own dialogue state too (what the
        server said, what it was asked).
        """
        self.leftover = b""

    def fail(self, kind: FailureKind, detail: str, clientText: str = "", saslError: bytes = b"") -> None:
        """
        The login did not succeed; close the connection and report why.

        @param saslError: see L{BackendFailure.saslError}.
        """
        if self._done or self.result.called:
            return
        self._over()
        if self.transport is not None:
            if kind == FailureKind.UNAVAILABLE:
                self.transport.abortConnection()
            else:
                # The server answered cleanly; leave it cleanly.
                self.transport.loseConnection()
        self.result.errback(Failure(BackendFailure(kind, detail, clientText, saslError)))

    def abandon(self) -> None:
        """
        The client went away before the login finished: close quietly.
        """
        if not self._done:
            self._over()
            if not self.result.called:
                self.result.addErrback(lambda f: None)
                self.result.errback(Failure(BackendFailure(FailureKind.UNAVAILABLE, "client left")))
        if self.transport is not None:
            self.transport.abortConnection()

    def _cancelled(self) -> None:
        # The session gave up on this login (its client left).
        self._over()
        if self.transport is not None:
            self.transport.abortConnection()
        elif self.stopConnecting is not None:
            self.stopConnecting()

    def _over(self) -> None:
        """
        The dialogue is over (logged in, failed or given up): no timer
        runs, no other outcome follows, and no password stays in a
        connection that may now be relayed for hours.
        """
        self._done = True
        self._cancelTimer()
        self.forgetSecrets()

    def forgetSecrets(self) -> None:
        """
        Drop every password the login held. A subclass that keeps one
        elsewhere (a callback made with the job in hand) drops that too.
        """
        self.job = self.job.withoutSecrets()

    def timeConnect(self, seconds: float, expired: Callable[[], object]) -> None:
        """
        Time the connection attempt too, with the timer that then times
        the dialogue: one timed call per login, not two.

        @param expired: called if the connection is not made within
            C{seconds}; it is to fail the attempt.
        """
        self._connectExpired = expired
        self._timer = self._clock.callLater(seconds, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        expired, self._connectExpired = self._connectExpired, None
        if expired is not None:
            expired()
            return
        self.fail(FailureKind.UNAVAILABLE, f"no login reply within {self._timeout:.0f}s")

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def forwardedIdentity(client: ClientInfo) -> dict[str, str]:
    """
    What identity forwarding tells a backend about C{client}, under
    XCLIENT's attribute names: C{ADDR}, C{PORT}, C{DESTADDR},
    C{DESTPORT}, C{SESSION}, C{TTL}, C{CLIENT-TRANSPORT}, and
    C{DESTNAME} when the client named the server (SNI). Each protocol
    picks, orders, names and encodes them its own way.
    """
    identity = {
        "ADDR": client.address,
        "PORT": str(client.port),
        "DESTADDR": client.localAddress,
        "DESTPORT": str(client.localPort),
        "SESSION": client.sessionId,
        "TTL": str(PROXY_TTL),
        "CLIENT-TRANSPORT": "TLS" if client.tls else "insecure",
    }
    if client.tls and client.tls.serverName:
        identity["DESTNAME"] = client.tls.serverName
    return identity


def acknowledgeNow(transport: object) -> None:
    """
    Acknowledge what the peer of C{transport} sent at once, instead of
    after the kernel's delayed-ACK wait (L{quickAck}).

    A login dialogue pipelines commands (XCLIENT and the login, ID and the
    login) and then reads their replies without writing anything, and a
    server under Nagle's algorithm (Dovecot's pop3 process, say) holds its
    next small reply until the ACK of the first: every login would wait
    40 ms for nothing. So the dialogue acknowledges each read it does not
    answer (a command written in reply carries the ACK:
    L{BackendProtocol.send}). A front end does the same for a client's
    command read in part.
    """
    quickAck(getattr(socketOf(transport), "socket", None))


def _describe(reason: Failure | None) -> str:
    if reason is None:
        return "connection lost"
    return reason.getErrorMessage() or cast("type[BaseException]", reason.type).__name__


def proxyHeader(backend: Backend, client: ClientInfo, protocol: str) -> bytes:
    """
    The PROXY protocol header to send first on a connection to C{backend},
    or C{b""} when the backend does not take one.
    """
    source = (client.address, client.port)
    destination = (client.localAddress, client.localPort)
    if backend.forward == "proxy-v1":
        return _proxyproto.encodeV1(source, destination)
    if backend.forward == "proxy-v2":
        return _proxyproto.encodeV2(
            source,
            destination,
            authority=client.tls.serverName if client.tls else None,
            alpn=protocol.encode("ascii"),
            tls=client.tls,
            uniqueId=client.sessionId.encode("ascii"),
        )
    return b""


class _OneBackendFactory(ClientFactory):
    """
    Hands one prepared L{BackendProtocol} to one connection.

    Twisted's C{connectProtocol} would do, but it defines a factory class
    per call (and logs its start and stop): too much for every login.
    """

    noisy = False

    def __init__(self, protocol: BackendProtocol, failed: Callable[[Failure], None]) -> None:
        self.backendProtocol: BackendProtocol | None = protocol
        self.failed: Callable[[Failure], None] | None = failed

    def buildProtocol(self, addr: object) -> BackendProtocol | None:
        # Handed over once, and connected: the connector keeps this factory
        # as long as the connection lasts, which need keep neither the
        # protocol nor the failure callback (which refers to it): the
        # transport refers to the connector, and these would close a
        # reference cycle per login.
        protocol, self.backendProtocol, self.failed = self.backendProtocol, None, None
        return protocol

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        if self.failed is not None:
            self.failed(reason)


def _timedOutConnecting(connector: IConnector) -> None:
    # What Twisted's connector does when its own timeout expires.
    transport = getattr(connector, "transport", None)
    if transport is not None:
        transport.failIfNotConnected(error.TimeoutError())


def connectBackend(reactor, protocol: BackendProtocol) -> Deferred[BackendProtocol]:
    """
    Connect C{protocol} to its job's backend and run its login dialogue.

    Backends named by address are connected directly; host names go through
    L{HostnameEndpoint} (resolution in a thread, then the addresses raced).

    @return: L{BackendProtocol.result}: the logged-in protocol, or a
        L{BackendFailure}.
    """
    job = protocol.job
    backend = job.backend
    try:
        port = backend.port(job.portName or job.protocol)
    except KeyError:
        protocol.result.errback(
            Failure(BackendFailure(FailureKind.UNAVAILABLE, f"backend {backend.name} has no {job.portName or job.protocol} port"))
        )
        return protocol.result

    def connectFailed(reason: Failure) -> None:
        protocol.stopConnecting = None
        if protocol.result.called or protocol._done:
            # Done already, or the session cancelled (stopping the attempt
            # lands here): the result is not ours to fire.
            return
        protocol._over()
        protocol.result.errback(
            Failure(BackendFailure(FailureKind.UNAVAILABLE, f"cannot connect to {backend.name}: {_describe(reason)}"))
        )

    factory = _OneBackendFactory(protocol, connectFailed)
    if isIPAddress(backend.host) or isIPv6Address(backend.host):
        # The protocol's timer times the attempt, not one of the
        # connector's own; when it expires, the attempt fails as the
        # connector's would have (TimeoutError).
        connector = connectAtOnce(reactor, backend.host, port, factory, None)
        protocol.stopConnecting = connector.stopConnecting
        protocol.timeConnect(backend.connectTimeout, lambda: _timedOutConnecting(connector))
    else:
        endpoint = HostnameEndpoint(reactor, backend.host, port, timeout=backend.connectTimeout)
        connecting = endpoint.connect(factory)
        connecting.addErrback(connectFailed)
        protocol.stopConnecting = connecting.cancel
    return protocol.result
