"""
The HTTP front end: one client connection (L{HTTPFrontend}, a session of
the core like an IMAP one) whose requests are each routed to a backend and
streamed there and back.

The design, and why:

 - The client side is Twisted's own HTTP/1.1 server parser,
   L{twisted.web.http.HTTPChannel}: request line and header parsing with
   its limits, C{chunked} and C{Content-Length} bodies (and the refusal of
   both at once), keep-alive and pipelining, C{Expect: 100-continue}, and
   the response's framing by L{twisted.web.http.Request}.  Its request
   class here (L{_ProxyRequest}) starts the backend request as soon as the
   headers are complete (C{gotLength}) and passes each body chunk on as it
   arrives (C{handleContentChunk}): a body is never gathered in memory or
   in a file, as C{Request} would otherwise do.
 - The backend side is not C{twisted.web.client.Agent}: the identity of
   the client is per client connection (a PROXY header goes first on the
   backend connection, so connections cannot be pooled across clients), a
   C{101} must hand the raw connection over to a byte relay (which Agent
   cannot), and the connection must be made like every other backend's
   (TLS verification, timeouts, the PROXY header: L{mailproxy._backend}).
   So each client connection has at most one backend connection at a time
   (L{HTTPBackend}), kept alive across requests to the same backend, and
   the response's head is parsed by L{ResponseReader}.
 - Backpressure both ways: while the backend's send buffer is full (a
   producer registered on its transport is paused) the client is not read;
   the backend's transport is the response's producer, so a client that
   does not read pauses the backend.  Each side's buffer stays at the
   transports' C{bufferSize}.
 - Credentials go through the core's login (L{FrontendProtocol.login}, a
   L{mailproxy._login.LoginAttempt}): the move gate, the router, the
   failed-login delay and the fail2ban line, the statistics.  A connection
   that sends the same C{Authorization} again reuses its route.
 - After a C{101 Switching Protocols} (a WebSocket), the connection is a
   L{mailproxy._relay.Relay} like a mail session after login.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import weakref
from typing import Any, Callable, cast
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from zope.interface import implementer

from .._backend import BackendFailure, BackendProtocol, LoginJob
from .._login import LoginFailed, authenticationFailed
from .._outcomes import EndReason, FailureKind
from .._relay import Relay
from .._routing import explainRoute
from .._safetext import logQuote
from .._session import FrontendProtocol, ProxyContext, SessionState, Timer
from ..model import Backend, Credentials, Route
from ..settings import HTTPSettings, Listener
from ._backend import HTTPBackend, ResponseHead, ResponseReader
from ._cookie import readCookie, signCookie

__all__ = ["HTTPFrontend"]

#: Request header fields the proxy never passes on: the client's claims of
#: who it is (only the proxy says that; C{X-Client-IP}, C{Client-IP},
#: C{True-Client-IP}, C{X-Cluster-Client-IP}, C{X-Forwarded} and
#: C{Forwarded-For} are the ones other proxies and CDNs set, which "real
#: IP" code in web applications reads), the proxy's own credentials, and
#: the hop-by-hop fields of RFC 9110 section 7.6.1 (the framing is the
#: proxy's own towards the backend).  Names as L{_fieldName} gives them.
_REMOVED = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-client-ip",
        b"client-ip",
        b"true-client-ip",
        b"x-cluster-client-ip",
        b"x-forwarded",
        b"forwarded-for",
        b"authorize-as",
        b"proxy-authorization",
        b"proxy-connection",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"content-length",
        b"upgrade",
        b"expect",
    }
)

#: Response fields not passed to the client: hop-by-hop, the framing,
#: which L{Request} writes for the client's connection, and C{Alt-Svc}
#: (RFC 7838: an alternative the backend serves, on its own port, which the
#: client cannot reach through the proxy; Cyrus offers h2c so).
_RESPONSE_REMOVED = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"alt-svc"}
)

#: Seconds a client is told to wait (C{Retry-After}) when the router or
#: the backend is unavailable.
RETRY_AFTER = 5

#: Body octets read from the client before its backend is ready, past which
#: reading pauses (one read's worth arrives with the headers).
_PENDING_LIMIT = 65536


#: A Host field's value, or the authority of an absolute-form request
#: target (RFC 9110 section 7.2, RFC 3986 section 3.2.2): a bracketed IP
#: literal or a name (an IPv4 address is one), then an optional port.  Not
#: empty, and no user information.
_HOST = re.compile(rb"(\[[0-9A-Za-z:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)(:[0-9]*)?\Z")

#: The scheme and authority of an absolute-form request target.
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)")


def _headProblem(request: Request) -> str | None:
    """
    Why the proxy refuses C{request}'s head with C{400}, if it does, after
    RFC 9112: no Host in HTTP/1.1, several, or an invalid one (section 3.2:
    the backend and the forwarding headers would get a host of the
    client's making); a request target in none of the forms a server
    takes; a transfer coding in HTTP/1.0 (section 6.1: its framing cannot
    be trusted).

    An absolute-form target is made origin-form, its authority the Host
    (section 3.2.2: the target's authority wins), so that the target and
    the Host the backend gets never disagree.
    """
    headers = request.requestHeaders
    version = request.clientproto
    if version != b"HTTP/1.1" and headers.hasHeader(b"transfer-encoding"):
        return "Transfer-Encoding in an HTTP/1.0 request"
    hosts = headers.getRawHeaders(b"host")
    if hosts is None:
        # HTTP/1.0 has Host optional: the backend gets its own address.
        if version == b"HTTP/1.1":
            return "no Host"
    elif len(hosts) > 1:
        return "several Host fields"
    elif _HOST.match(hosts[0]) is None:
        return "invalid Host"
    target = request.uri
    absolute = _ABSOLUTE.match(target)
    if absolute is not None:
        scheme, authority = absolute.groups()
        if scheme.lower() not in (b"http", b"https") or _HOST.match(authority) is None:
            return "invalid request target"
        rest = target[absolute.end() :]
        if not rest.startswith(b"/"):
            # An empty path: "*" for OPTIONS without a query, else "/"
            # (RFC 9112 section 3.2.4).
            rest = b"*" if request.method == b"OPTIONS" and not rest else b"/" + rest
        request.uri = rest
        headers.setRawHeaders(b"Host", [authority])
    elif not target.startswith(b"/") and not (target == b"*" and request.method == b"OPTIONS"):
        # The authority form is CONNECT's, for a tunnel the proxy does not
        # make; anything else is no target at all.
        return "invalid request target"
    return None


def _fieldName(name: bytes) -> bytes:
    """
    A request field's name as the backend may read it: in lower case, with
    C{_} as C{-}.  CGI and WSGI servers (and PHP's C{$_SERVER}) turn both
    into C{_} (C{X_Forwarded_For} and C{X-Forwarded-For} are both
    C{HTTP_X_FORWARDED_FOR}), so a field the proxy removes or sets itself
    is removed in every such spelling, as nginx and Apache drop them.
    """
    return name.lower().replace(b"_", b"-")


def _connectionOptions(request: Request) -> set[bytes]:
    """
    The options of every C{Connection} field of C{request}, in lower case
    (RFC 9110 section 7.6.1: a comma-separated list, in any number of
    fields).  Separated by spaces too: such a list is not one, and naming
    C{close} anywhere in it must still close.
    """
    return {
        option.lower()
        for value in request.requestHeaders.getRawHeaders(b"connection", [])
        for option in value.replace(b",", b" ").split()
    }


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def forwardedFor(address: str, port: int) -> str:
    """
    The RFC 7239 C{for=} node of a client (an IPv6 address in brackets,
    with its port, quoted).
    """
    host = f"[{address}]" if ":" in address else address
    return _quoted(f"{host}:{port}")


@implementer(IPushProducer)
class _UploadPause:
    """
    Registered on the backend's transport while requests go there: its
    full send buffer pauses reading the client (the request body waits in
    the client's and the kernel's buffers, not ours).
    """

    def __init__(self, frontend: HTTPFrontend) -> None:
        self._frontend = frontend

    def pauseProducing(self) -> None:
        self._frontend.holdClient("backend busy")

    def resumeProducing(self) -> None:
        self._frontend.resume("backend busy")

    def stopProducing(self) -> None:
        pass


class _ProxyRequest(Request):
    """
    One request of the client, relayed as it arrives.

    @ivar backend: the backend connection it goes to, once connected.
    @ivar pending: body octets read before the backend was ready.
    @ivar bodyDone: the client sent the whole request.
    @ivar length: the body's length, L{None} for a chunked one.
    @ivar chunkedBody: the body goes to the backend in chunks (the
        client's length is unknown).
    @ivar expectContinue: the client waits for C{100 Continue} before it
        sends its body; it gets it once the backend has the request.
    @ivar finishLater: answered before its (empty) body was read: finished
        once it is.
    @ivar answered: a response (the backend's or the proxy's) began.
    @ivar upgrade: the client asks for a protocol switch (WebSocket).
    @ivar cookie: the routing cookie to set in the response, if any.
    @ivar credentials: what the client authenticated with, if anything.
    @ivar route: the router's answer for them.
    @ivar started: when its headers were complete.
    @ivar authorization: the credential fields it went to the backend with.
    @ivar reused: it went on a backend connection kept from a request
        before.
    @ivar retried: it was sent again on a new connection.
    @ivar loginSeconds: for the first request of a login, how long the
        login took (router and connection): its response says whether the
        backend took the credentials.
    """

    def __init__(self, channel: _Channel, frontend: HTTPFrontend) -> None:
        super().__init__(channel)
        self.frontend = frontend
        self.backend: HTTPBackend | None = None
        self.pending: list[bytes] = []
        self.pendingSize = 0
        self.bodyDone = False
        self.length: int | None = 0
        self.chunkedBody = False
        self.expectContinue = False
        self.finishLater = False
        self.answered = False
        self.upgrade = False
        self.cookie: bytes | None = None
        self.credentials: Credentials | None = None
        self.route: Route | None = None
        self.started = 0.0
        self.authorization: list[tuple[bytes, bytes]] = []
        self.reused = False
        self.retried = False
        self.loginSeconds: float | None = None
        self.content = None

    def gotLength(self, length: int | None) -> None:
        # Not Request's: it would gather the body in memory or a file.
        self.length = length
        self.chunkedBody = length is None
        self.frontend.requestStarted(self)

    def handleContentChunk(self, data: bytes) -> None:
        self.frontend.requestBody(self, data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The body is complete; it was passed on already (nor is it parsed
        # for form arguments, as Request would).
        self.frontend.requestBodyDone(self)

    @property
    def gone(self) -> bool:
        """
        The client's connection is lost, or the response was finished.
        """
        return bool(self._disconnected or self.finished)


class _Channel(HTTPChannel):
    """
    Twisted's HTTP/1.1 server parser, for one L{HTTPFrontend}: its
    requests are L{_ProxyRequest}s, its limits the C{[http]} section's,
    and its refusals and closes go through the session.
    """

    def __init__(self, frontend: HTTPFrontend, settings: HTTPSettings) -> None:
        super().__init__()
        # Weak: the front end holds its channel, and the two would be a
        # reference cycle per connection, left to the garbage collector.
        self._frontend = weakref.ref(frontend)
        self.maxHeaders = settings.maxHeaders
        self.totalHeadersSize = settings.maxHeaderSize
        # One line may be as long as the whole head.
        self.MAX_LENGTH = settings.maxHeaderSize
        # The session's timers apply, not the channel's.
        self.timeOut = None
        # Of the head being read: its lines and its octets as sent.
        self._lines = 0
        self._headSize = 0

    @property
    def frontend(self) -> HTTPFrontend:
        """
        The session this channel parses for.
        """
        return cast(HTTPFrontend, self._frontend())

    # A method, not HTTPChannel's class attribute: each request needs the
    # front end. Not an instance attribute either: a bound method of the
    # channel kept on the channel is a reference cycle per connection.
    def requestFactory(self, channel: object, queued: object = None) -> _ProxyRequest:  # type: ignore[override]
        return _ProxyRequest(self, self.frontend)

    def connectionMade(self) -> None:
        # HTTPChannel registers itself as its transport's producer only if
        # the transport declares IPushProducer, which TLS and the PROXY
        # header reader do not (they have its methods): a client that does
        # not read must pause the backend whatever the layers below.
        transport = cast(Any, self.transport)
        self._networkProducer = transport
        transport.registerProducer(self, True)

    def lineReceived(self, line: bytes) -> None:
        # HTTPChannel answers 400 to every oversized head, and counts its
        # size without the line ends; 431 says which limit it was (RFC
        # 6585), and the size is what the client sent, CRLFs included.
        # The request line counts as a line, as the head's first, and the
        # empty line that ends it does not.
        if not line and not self._lines:
            # Empty lines before a request line (the CRLF some clients send
            # after a body, once or more) are skipped, as nginx does;
            # HTTPChannel would skip one and answer a second with 400.
            return
        if line:
            self._lines += 1
        if self._lines:
            # An empty line before a request line (the CRLF some clients
            # send after a body) is no part of a head.
            self._headSize += len(line) + 2
        if self._headSize > self.totalHeadersSize or self._lines > self.maxHeaders + 1:
            self.frontend.refuse(431, b"Request Header Fields Too Large", "request head too large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.frontend.refuse(431, b"Request Header Fields Too Large", "request head too large")

    def allHeadersReceived(self) -> None:
        self._lines = self._headSize = 0
        request = cast(_ProxyRequest, self.requests[-1])
        # Known to the request only once its body is in; needed now.
        request.method, request.uri, request.clientproto = self._command, self._path, self._version
        problem = _headProblem(request)
        if problem is not None:
            # Never started: the channel's call to complete it finds no
            # current request.
            self.frontend.refuse(400, b"Bad Request", problem)
            return
        request.path = request.uri.split(b"?", 1)[0]
        # The proxy says 100 Continue itself, once the backend has the
        # request (HTTPChannel would say it at once, even before a refusal).
        expect = request.requestHeaders.getRawHeaders(b"expect")
        if expect is not None:
            request.requestHeaders.removeHeader(b"expect")
            request.expectContinue = expect[0].lower() == b"100-continue" and self._version == b"HTTP/1.1"
        super().allHeadersReceived()

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        # HTTPChannel reads only the first Connection field and splits it
        # on spaces: "close, te" or a second "Connection: close" kept the
        # connection open, where RFC 9112 section 9.6 says it must close
        # after the response.
        if version == b"HTTP/1.1" and b"close" not in _connectionOptions(request):
            return True
        if version == b"HTTP/1.1":
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        return False

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.frontend.refuse(400, b"Bad Request", "bad request")

    def loseConnection(self) -> None:
        # The end of a response on a connection that does not persist.
        self.frontend.responsesOver()

    def requestDone(self, request: Request) -> None:
        if request not in self.requests:
            return
        super().requestDone(request)

    @property
    def clientBusy(self) -> bool:
        """
        The client's transport asked to stop writing to it, and has not
        asked to go on.
        """
        return bool(self._waitingForTransport)

    @property
    def inHead(self) -> bool:
        """
        Part of a request head has come, and not all of it.
        """
        return bool((self._headSize or self._buffer) and self.persistent)

    @property
    def buffered(self) -> bytes:
        """
        What the client sent behind the request being answered.
        """
        return b"".join(self._dataBuffer)


class HTTPFrontend(FrontendProtocol):
    """
    One HTTP client connection: each request is routed (a pinned path,
    the credentials through the core's login, the routing cookie, or the
    default backend) and relayed with its body and its response streamed.

    @ivar requests: requests received so far.
    @ivar backend: the backend connection of the latest request, kept
        alive for the next one to the same backend.
    @ivar current: the request being answered.
    """

    protocolName = "http"
    defaultEndReason = EndReason.CLIENT_CLOSED
    # Its backend connection is "logged in" once connected; each request
    # is judged later, by the backend.
    backendChecksLogins = False

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        super().__init__(context, listener)
        settings = listener.http
        if settings is None:
            # A listener built without the configuration (a test's).
            settings = HTTPSettings(cookieSecret=os.urandom(32))
        self.settings = settings
        self.channel = _Channel(self, settings)
        self.requests = 0
        self.backend: HTTPBackend | None = None
        self.current: _ProxyRequest | None = None
        self.bytesFromClient = 0
        self.bytesFromBackend = 0
        self._account: str | None = None
        self._lastBackend: str | None = None
        # The routing cookie this connection's requests carried, and the
        # backend it was found to route to.
        self._cookieRoute: tuple[bytes, Backend | None] | None = None
        self._registered = False
        # A login of this connection was accepted (by the backend's first
        # response).
        self._accepted = False
        # The last Authorization the router accepted, and what it becomes.
        self._auth: tuple[bytes, Route, list[tuple[bytes, bytes]], Credentials] | None = None
        self._held: IDelayedCall | None = None
        self._outgoingAuth: list[tuple[bytes, bytes]] = []
        self._waiting = Timer(context.reactor, self._waitExpired)
        self._waitingForHead = False
        self._responseTimer = Timer(context.reactor, self._responseExpired)
        self._streamTimer = Timer(context.reactor, self._streamIdle)
        self._lastActivity = 0.0

    # Session

    def sessionOpened(self) -> None:
        # No pre-login timeout: a web client may never log in.
        self.channel.makeConnection(self.transport)
        self._awaitRequest()

    def _watchReplies(self) -> None:
        # The channel is the transport's producer and pauses reading while
        # the client does not read.
        pass

    def greet(self) -> None:
        pass

    def frontendDataReceived(self, data: bytes) -> None:
        self.bytesFromClient += len(data)
        if self.current is None and not self._waitingForHead:
            # The next request begins: its head must come in time.
            self._waitingForHead = True
            self._waiting.start(self.settings.headerTimeout)
        elif self.current is not None:
            self._lastActivity = self.context.reactor.seconds()
        self.channel.dataReceived(data)

    def sayGoodbye(self, reason: EndReason, text: str) -> None:
        if self.relay is not None:
            return
        request = self.current
        if request is None or request.gone or request.startedWriting:
            return
        self._writeError(request, 503, b"Service Unavailable", text, retry=True)

    def connectionClosing(self) -> None:
        self._stopTimers()
        # TCP (and TLS) close a connection with a paused producer only
        # once no producer is registered.
        if self.relay is None:
            self.transport.unregisterProducer()
        self._dropBackend()

    def sessionLost(self) -> None:
        super().sessionLost()
        # The timers call the session's methods: closed, they let go of it.
        for timer in (self._waiting, self._responseTimer, self._streamTimer):
            timer.close()
        self._stopTimers()
        if self.relay is None:
            self.channel.connectionLost(Failure(ConnectionDone()))
            self._dropBackend()
            backendName = self.backendName
            if self._counted and backendName is not None:
                self.context.stats.sessionEnded(self.protocolName, backendName, self.bytesFromClient, self.bytesFromBackend)

    def _stopTimers(self) -> None:
        if self._held is not None and self._held.active():
            self._held.cancel()
        self._held = None
        self._waiting.stop()
        self._responseTimer.stop()
        self._streamTimer.stop()

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["requests"] = self.requests
        if self.relay is None:
            described["bytesFromClient"] = self.bytesFromClient
            described["bytesFromBackend"] = self.bytesFromBackend
            if self.backend is not None:
                described["state"] = SessionState.RELAY.value
        return described

    def relayed(self) -> tuple[str, int, int]:
        if self.relay is not None:
            return super().relayed()
        if self.backend is None:
            return "", 0, 0
        return self.backend.job.backend.name, self.bytesFromClient, self.bytesFromBackend

    def sessionFields(self) -> dict[str, Any]:
        return {"requests": self.requests}

    def sessionTraffic(self) -> tuple[str, int, int]:
        if self.relay is not None:
            return super().sessionTraffic()
        result = "ok" if self.backendName is not None else "no-request"
        if self.failures and (self.route is None or not self._accepted):
            # Refused by the router, or by the backend, and never accepted.
            result = "failed"
        return result, self.bytesFromClient, self.bytesFromBackend

    @property
    def backendName(self) -> str | None:
        # Requests without credentials have no route, yet a backend.
        route = self.route
        return route.backend.name if route is not None else self._lastBackend

    def holdClient(self, why: str) -> None:
        """
        Stop reading the client for C{why} (as L{pause}), even if another
        reason holds it already: the channel resumes its transport on its
        own (between requests, when the client drains its replies), and a
        transport asks again on each write over its buffer.
        """
        self.pause(why)
        if not self.closing:
            self.transport.pauseProducing()

    # Timers

    def _awaitRequest(self) -> None:
        self._waitingForHead = False
        self._waiting.start(self.settings.keepaliveTimeout)

    def _waitExpired(self) -> None:
        if self._waitingForHead:
            self.refuse(408, b"Request Timeout", "no complete request head in time", reason=EndReason.TIMEOUT)
        else:
            self.end(EndReason.IDLE_TIMEOUT)

    def _responseExpired(self) -> None:
        request = self.current
        if request is None or request.answered:
            return
        self.log.info(
            "backend {backend} did not answer within {seconds}s: session={session}",
            backend=self.backendName or "-",
            seconds=self.settings.responseTimeout,
            session=self.client.sessionId,
        )
        self._dropBackend()
        self._fail(request, 504, b"Gateway Timeout", "The server did not answer in time.")

    def _streamIdle(self) -> None:
        idle = self.context.reactor.seconds() - self._lastActivity
        if idle < self.limits.idleTimeout:
            self._streamTimer.start(self.limits.idleTimeout - idle)
            return
        self.end(EndReason.IDLE_TIMEOUT)

    # Requests

    def requestStarted(self, request: _ProxyRequest) -> None:
        """
        A request's headers are complete: route it and start it at the
        backend.
        """
        if self.closing:
            # Parsed from what arrived with the input that ended the session.
            return
        self.requests += 1
        self._waiting.stop()
        self._waitingForHead = False
        self.current = request
        self._lastActivity = request.started = self.context.reactor.seconds()
        headers = request.requestHeaders
        # Only a WebSocket is relayed after a 101 (RFC 8887's JMAP push);
        # other upgrades (h2c) are not passed on, so the backend answers
        # in HTTP/1.1 and the next request is routed again.
        request.upgrade = b"upgrade" in _connectionOptions(request) and [
            value.strip().lower() for value in headers.getRawHeaders(b"upgrade", [])
        ] == [b"websocket"]
        # A body that stops coming, like a response that does, ends the
        # connection after the idle timeout.
        self._streamTimer.start(self.limits.idleTimeout)
        # Until the backend is connected and has the head, the body waits
        # in the client's buffers.
        self.pause("routing")
        pinned = self._pinned(request.path)
        authorization = headers.getRawHeaders(b"authorization", [None])[0]
        if pinned is not None:
            if authorization is not None:
                self._backendJudges(request, pinned, authorization)
            self._connect(request, pinned)
        elif authorization is not None:
            self._authenticate(request, authorization)
        else:
            self._routeByCookie(request)

    def requestBody(self, request: _ProxyRequest, data: bytes) -> None:
        """
        Body octets of C{request}: to its backend, or kept until it is
        ready.
        """
        if request is not self.current or request.answered and request.backend is None:
            # Answered by the proxy already: the rest is discarded.
            return
        self._lastActivity = self.context.reactor.seconds()
        backend = request.backend
        if backend is None:
            request.pending.append(data)
            request.pendingSize += len(data)
            if request.pendingSize > _PENDING_LIMIT:
                self.holdClient("routing")
            return
        self._sendBody(request, backend, data)

    def requestBodyDone(self, request: _ProxyRequest) -> None:
        """
        The client sent all of C{request}.
        """
        request.bodyDone = True
        if request is not self.current:
            return
        if request.finishLater:
            self._finish(request)
            return
        backend = request.backend
        if backend is not None and not request.answered:
            self._endBody(request, backend)

    def _sendBody(self, request: _ProxyRequest, backend: HTTPBackend, data: bytes) -> None:
        if request.chunkedBody:
            backend.transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            backend.transport.write(data)

    def _endBody(self, request: _ProxyRequest, backend: HTTPBackend) -> None:
        if request.chunkedBody:
            backend.transport.write(b"0\r\n\r\n")
        self._responseTimer.start(self.settings.responseTimeout)

    def _pinned(self, path: bytes) -> Backend | None:
        normal = normalisedPath(path)
        for prefix, name in self.settings.pins:
            if normal.startswith(prefix.encode("utf-8")):
                return self._backendNamed(name)
        return None

    def _backendNamed(self, name: str) -> Backend | None:
        return self.context.backends.get(name)

    def _routeByCookie(self, request: _ProxyRequest) -> None:
        # A request without credentials goes where its routing cookie says:
        # the backend that served its account's last authenticated request,
        # unless the account's route has changed since (an operator moved
        # it). The router is asked once per connection, as an operator's
        # "mailproxy route explain" asks it; a move drops the connection (its
        # session counts as the account's), so the next one asks again. A
        # router that cannot tell without the password, or cannot answer,
        # leaves the cookie's backend.
        value = request.received_cookies.get(self.settings.cookieName.encode("ascii"))
        found = None if value is None else readCookie(self.settings.cookieSecret, value, self.context.reactor.seconds())
        if value is None or found is None:
            self._connect(request, self._backendNamed(self.settings.defaultBackend))
            return
        backendName, account = found
        if account and self.user is None:
            # The account's session as much as an authenticated one: a
            # move drops it.
            self.user = account
        checked = self._cookieRoute
        if checked is not None and checked[0] == value:
            self._cookieRouted(request, value, checked[1])
            return
        if not account:
            self._cookieRouted(request, value, self._httpBackend(backendName))
            return

        def explained(answer: dict[str, Any]) -> None:
            current = answer["backend"]
            if not answer["explained"] or current == backendName:
                self._cookieRouted(request, value, self._httpBackend(backendName))
                return
            self.log.info(
                "routing cookie names {cookie} for {user}, routed to {backend} now: session={session}",
                cookie=backendName,
                user=logQuote(account),
                backend=current or "-",
                session=self.client.sessionId,
            )
            self._cookieRouted(request, value, self._httpBackend(current) if current else None)

        def unexplained(reason: Failure) -> None:
            self.log.info(
                "routing cookie for {user} not checked, the router failed: session={session} {detail}",
                user=logQuote(account),
                session=self.client.sessionId,
                detail=logQuote(str(reason.value)),
            )
            self._cookieRouted(request, value, self._httpBackend(backendName))

        explainRoute(self.context.router, self.context.routerName, account).addCallbacks(explained, unexplained)

    def _cookieRouted(self, request: _ProxyRequest, value: bytes, backend: Backend | None) -> None:
        if self.closing or request is not self.current:
            # The session ended while the router was asked.
            return
        self._cookieRoute = (value, backend)
        self._connect(request, backend or self._backendNamed(self.settings.defaultBackend))

    def _httpBackend(self, name: str) -> Backend | None:
        backend = self._backendNamed(name)
        return backend if backend is not None and "http" in backend.ports else None

    # Routing without credentials

    def _connect(
        self, request: _ProxyRequest, backend: Backend | None, authorization: list[tuple[bytes, bytes]] = []
    ) -> None:
        if backend is None:
            self._fail(request, 503, b"Service Unavailable", "No server is configured for this request.", retry=True)
            return
        current = self.backend
        if current is not None and not current.gone and current.job.backend.name == backend.name:
            self._ready(request, current, authorization)
            return
        job = LoginJob(
            route=Route(backend), protocol=self.protocolName, client=self.client, credentials=None, user="", password=None
        )
        connection = HTTPBackend(job, self.context.reactor, self.limits.backendTimeout)
        d = self.context.backendConnector(self.context.reactor, connection)

        def connected(result: BackendProtocol) -> None:
            self._ready(request, cast(HTTPBackend, result), authorization)

        def failed(reason: Failure) -> None:
            if reason.trap(BackendFailure, CancelledError) is CancelledError:
                return
            self.log.info(
                "backend {backend} unavailable: session={session} {detail}",
                backend=backend.name,
                session=self.client.sessionId,
                detail=logQuote(str(reason.value)),
            )
            self._fail(request, 503, b"Service Unavailable", "The server is unavailable, try again later.", retry=True)

        d.addCallbacks(connected, failed)

    # Routing with credentials

    def _authenticate(self, request: _ProxyRequest, authorization: bytes) -> None:
        cached = self._auth
        current = self.backend
        if (
            cached is not None
            and current is not None
            and not current.gone
            and hmac.compare_digest(cached[0], authorization)
            and current.job.backend.name == cached[1].backend.name
        ):
            request.credentials, request.route = cached[3], cached[1]
            self._ready(request, current, cached[2])
            return
        credentials = self._credentials(authorization)
        if credentials is None:
            # Another scheme (Digest, Negotiate): the proxy cannot read it;
            # the default backend judges it.
            backend = self._backendNamed(self.settings.defaultBackend)
            self._backendJudges(request, backend, authorization)
            self._connect(request, backend)
            return
        d = self.login(credentials)

        def loggedIn(result: BackendProtocol) -> None:
            backend = cast(HTTPBackend, result)
            route = cast(Route, self.route)
            # The login name, as for the other protocols' sessions (a move
            # names it, and the route store knows it); a token's account is
            # the one the router found.
            account = credentials.user or route.user
            self.user = account or self.user
            self._account = account
            outgoing, self._outgoingAuth = self._outgoingAuth, []
            self._auth = (authorization, route, outgoing, credentials)
            request.credentials, request.route = credentials, route
            request.loginSeconds = self._attempt.seconds() if self._attempt is not None else 0.0
            if self._attempt is not None:
                self._attempt.release()
            # A failed attempt before does not make the session's outcome.
            self.noteOutcome(self.defaultEndReason)
            if account and not self._registered and self in self.context.sessions:
                self._registered = True
                self.context.sessions.loggedIn(self)
            self._ready(request, backend, outgoing, setCookie=True)

        def failed(reason: Failure) -> None:
            if reason.trap(LoginFailed, CancelledError) is CancelledError:
                # The session ended while the login ran.
                return
            failure = cast(LoginFailed, reason.value)
            if failure.close:
                self.channel.persistent = False
            if failure.kind is FailureKind.AUTH:
                challenge = f"Basic realm={_quoted(self.settings.realm)}"
                if credentials.token is not None:
                    challenge = 'Bearer error="invalid_token"'
                self._fail(
                    request,
                    401,
                    b"Unauthorized",
                    "Authentication failed.",
                    headers=[(b"WWW-Authenticate", challenge.encode("latin-1"))],
                )
            else:
                self._fail(request, 503, b"Service Unavailable", "Service temporarily unavailable, try again later.", retry=True)

        d.addCallbacks(loggedIn, failed)

    def routeUnknown(self, credentials: Credentials) -> Route | None:
        # A bearer token that names no account and that the router cannot
        # place (a static table, a directory: they know accounts, not
        # tokens) goes where a request without credentials would: the
        # default backend, which judges the token itself.  A token the
        # router does know and refuses stays refused.
        if credentials.token is None or credentials.user:
            return None
        backend = self._backendNamed(self.settings.defaultBackend)
        if backend is None:
            return None
        return Route(backend, rule="default_backend (token not placed by the router)")

    def _backendJudges(self, request: _ProxyRequest, backend: Backend | None, authorization: bytes) -> None:
        # Credentials the proxy passes on without asking the router (a
        # pinned path, a scheme it cannot read) are still a login: the
        # backend's 401 to them is a failed login like any other (the
        # delay, the fail2ban line, the limit per connection), or a pinned
        # login page would take unlimited password guesses.
        if backend is None:
            return
        request.credentials = self._credentials(authorization) or Credentials(mechanism="HTTP", user="")
        request.route = Route(backend, rule="credentials passed on unrouted")
        request.loginSeconds = 0.0

    def _credentials(self, authorization: bytes) -> Credentials | None:
        scheme, _, value = authorization.strip().partition(b" ")
        value = value.strip()
        if scheme.lower() == b"basic":
            try:
                decoded = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                decoded = b""
            user, _, password = decoded.partition(b":")
            return Credentials(mechanism="LOGIN", user=user.decode("utf-8", "surrogateescape"), password=password)
        if scheme.lower() == b"bearer" and value:
            # The router derives the account from the token.
            return Credentials(mechanism="OAUTHBEARER", user="", token=value)
        return None

    def makeBackendLogin(self, job: LoginJob) -> BackendProtocol:
        # The credentials the backend gets, computed now: the job forgets
        # its passwords once connected.
        self._outgoingAuth = outgoingAuthorization(job)
        return HTTPBackend(job, self.context.reactor, self.limits.backendTimeout)

    # Relaying one request

    def _ready(
        self, request: _ProxyRequest, backend: HTTPBackend, authorization: list[tuple[bytes, bytes]], setCookie: bool = False
    ) -> None:
        if request.gone or request is not self.current or self.closing:
            if backend is not self.backend:
                backend.transport.abortConnection()
            return
        request.reused = backend is self.backend
        request.authorization = authorization
        self._useBackend(backend)
        request.backend = backend
        if setCookie and self._account is not None:
            request.cookie = self._routingCookie(backend.job.backend.name, self._account)
        backend.reader = ResponseReader(_Response(self, request), request.method, self.settings.maxHeaderSize)
        backend.transport.write(self._requestHead(request, backend.job.backend, authorization))
        if request.expectContinue and not request.bodyDone:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        pending, request.pending, request.pendingSize = request.pending, [], 0
        for data in pending:
            self._sendBody(request, backend, data)
        if request.bodyDone:
            self._endBody(request, backend)
        self.resume("routing")

    def _useBackend(self, backend: HTTPBackend) -> None:
        if self.backend is backend:
            return
        self._dropBackend()
        self.backend = backend
        self._lastBackend = backend.job.backend.name
        backend.lost = self._backendLost
        backend.transport.registerProducer(_UploadPause(self), True)

    def _dropBackend(self) -> None:
        backend, self.backend = self.backend, None
        self.resume("backend busy")
        if backend is not None and not backend.gone:
            backend.lost = None
            backend.reader = None
            backend.transport.unregisterProducer()
            backend.transport.loseConnection()

    def _backendLost(self, backend: HTTPBackend) -> None:
        if backend is self.backend:
            self.backend = None
            self.resume("backend busy")

    def _routingCookie(self, backendName: str, account: str) -> bytes:
        value = signCookie(self.settings.cookieSecret, backendName, account, self.context.reactor.seconds())
        return self.settings.cookieName.encode("ascii") + b"=" + value + b"; Path=/; Secure; HttpOnly; SameSite=Lax"

    def _requestHead(self, request: _ProxyRequest, backend: Backend, authorization: list[tuple[bytes, bytes]]) -> bytes:
        headers = request.requestHeaders
        # Fields the client names in Connection are for this hop only;
        # Host never is (RFC 9110, section 7.6.1 forbids naming an
        # end-to-end field): a client that names it keeps its Host.
        named = {_fieldName(option) for option in _connectionOptions(request)} - {b"host"}
        lines = [request.method, b" ", request.uri, b" HTTP/1.1\r\n"]
        host = None
        for name, values in headers.getAllRawHeaders():
            lower = _fieldName(name)
            if lower in _REMOVED or lower.startswith(b"x-forwarded-") or lower in named:
                continue
            if authorization and lower == b"authorization":
                continue
            if lower == b"host":
                host = values[0]
            for value in values:
                lines += [name, b": ", value, b"\r\n"]
        if host is None:
            host = backend.host.encode("idna") if ":" not in backend.host else b"[" + backend.host.encode("ascii") + b"]"
            lines += [b"Host: ", host, b"\r\n"]
        for name, value in authorization:
            lines += [name, b": ", value, b"\r\n"]
        if backend.forward != "none":
            lines += self._forwardingHeaders(host)
        if request.upgrade:
            lines += [b"Connection: Upgrade\r\n"]
            for value in headers.getRawHeaders(b"upgrade", []):
                lines += [b"Upgrade: ", value, b"\r\n"]
        if request.chunkedBody:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            length = headers.getRawHeaders(b"content-length")
            if length is not None:
                lines += [b"Content-Length: ", length[0], b"\r\n"]
        lines.append(b"\r\n")
        return b"".join(lines)

    def _clientProto(self) -> bytes:
        return b"https" if self.client.tls is not None or self.listener.tls == "implicit" else b"http"

    def _forwardingHeaders(self, host: bytes) -> list[bytes]:
        client = self.client
        proto = self._clientProto()
        hostText = host.decode("latin-1")
        forwarded = f"for={forwardedFor(client.address, client.port)};proto={proto.decode()};host={_quoted(hostText)}"
        return [
            b"Forwarded: ",
            forwarded.encode("latin-1"),
            b"\r\nX-Forwarded-For: ",
            client.address.encode("ascii"),
            b"\r\nX-Forwarded-Proto: ",
            proto,
            b"\r\nX-Forwarded-Host: ",
            host,
            b"\r\n",
        ]

    # The backend's response

    def responseHead(self, request: _ProxyRequest, head: ResponseHead, response: _Response) -> None:
        """
        The backend's status line and headers for C{request}.
        """
        self._responseTimer.stop()
        request.answered = True
        if request.gone:
            self._dropBackend()
            return
        credentials, route = request.credentials, request.route
        refused = head.code == 401 and credentials is not None and route is not None and not route.authenticated
        if route is not None and (refused or request.loginSeconds is not None):
            # A login counts as one once the backend judged it, by the
            # first response (or any later refusal).
            stats = self.context.stats
            if refused:
                stats.loginFailed(self.protocolName, route.backend.name, FailureKind.AUTH.value, request.loginSeconds)
            else:
                stats.loginSucceeded(self.protocolName, route.backend.name, request.loginSeconds)
                if credentials is not None:
                    # Not taken as proof of the password, which forgives
                    # failures: a backend may answer a request without
                    # checking it (OPTIONS, a public page).
                    self._accepted = True
        if refused:
            assert credentials is not None
            # The backend judged the credentials and refused them: a failed
            # login as when the router refuses, counted, logged for
            # fail2ban, and answered after the failed-login delay.
            wait = authenticationFailed(self, credentials, self.attempts)
            wait -= self.context.reactor.seconds() - request.started
            self.noteOutcome(EndReason.LOGIN_FAILED, FailureKind.AUTH.value)
            # No routing cookie: it would tell anyone who tries a name
            # where that account lives, signed.
            request.cookie = None
            if self.failures >= self.limits.loginFailures:
                # The last response of the connection says so (RFC 9112
                # section 9.6), as the proxy's own refusals do.
                self.channel.persistent = False
                request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            if wait > 0:
                backend = cast(HTTPBackend, request.backend)
                backend.transport.pauseProducing()
                response.held = []
                self._held = self.context.reactor.callLater(wait, self._release, request, head, response)
                return
        self._startResponse(request, head)

    def _release(self, request: _ProxyRequest, head: ResponseHead, response: _Response) -> None:
        self._held = None
        held, response.held = response.held or [], None
        backend = request.backend
        if backend is not None and not backend.gone:
            backend.transport.resumeProducing()
        if request.gone:
            self._dropBackend()
            return
        self._startResponse(request, head)
        for event in held:
            event()

    def _startResponse(self, request: _ProxyRequest, head: ResponseHead) -> None:
        if head.code == 101:
            if request.upgrade:
                self._upgrade(request, head)
            else:
                self._dropBackend()
                self._fail(request, 502, b"Bad Gateway", "The server answered with a protocol switch nobody asked for.")
            return
        request.setResponseCode(head.code, head.reason)
        named = set(head.tokens(b"connection"))
        # A backend behind the proxy's TLS writes links to itself as http:
        # on the client's host they become https: (nginx's proxy_redirect).
        plain = b"http://" + (request.requestHeaders.getRawHeaders(b"host", [b""])[0]).lower()
        secure = self._clientProto() == b"https"
        # A length beside a transfer coding is not the length of what the
        # client gets (the body is decoded): it would desynchronise it.
        removed = _RESPONSE_REMOVED | named | ({b"content-length"} if head.values(b"transfer-encoding") else set())
        for name, value in head.headers:
            lower = name.lower()
            if lower in removed:
                continue
            if secure and lower in (b"location", b"content-location") and _onHost(value, plain):
                value = b"https" + value[4:]
            request.responseHeaders.addRawHeader(name, value)
        if request.cookie is not None:
            request.responseHeaders.addRawHeader(b"Set-Cookie", request.cookie)
        self.bytesFromBackend += head.size
        backend = cast(HTTPBackend, request.backend)
        request.registerProducer(backend.transport, True)
        if self.channel.clientBusy:
            # The client stopped reading during an earlier response: the
            # channel pauses a producer only when the client's transport
            # says so, which it may not say again (TLS says it once).
            backend.transport.pauseProducing()
        # The head goes out now: an event stream's first event may be long
        # in coming.
        request.write(b"")
        self._lastActivity = self.context.reactor.seconds()
        self._streamTimer.start(self.limits.idleTimeout)

    def responseData(self, request: _ProxyRequest, data: bytes) -> None:
        """
        Body octets of the backend's response to C{request}.
        """
        self.bytesFromBackend += len(data)
        self._lastActivity = self.context.reactor.seconds()
        if not request.gone:
            request.write(data)

    def responseDone(self, request: _ProxyRequest, reusable: bool) -> None:
        """
        The backend's response to C{request} is complete.
        """
        self._streamTimer.stop()
        backend = request.backend
        if request.gone:
            self._dropBackend()
            return
        request.unregisterProducer()
        if backend is not None:
            backend.reader = None
            if reusable:
                # A client slow to read may have paused it as the response
                # ended; the next response must be read.
                backend.transport.resumeProducing()
            else:
                self._dropBackend()
        self._finish(request)

    def responseFailed(self, request: _ProxyRequest, why: str) -> None:
        """
        The backend's response to C{request} broke off or made no sense.
        """
        self._responseTimer.stop()
        self._streamTimer.stop()
        self.log.info(
            "backend {backend} response failed: session={session} {why}",
            backend=self.backendName or "-",
            session=self.client.sessionId,
            why=why,
        )
        backend = request.backend
        self._dropBackend()
        if request.gone:
            return
        if backend is not None and request.reused and not request.retried and request.bodyDone and request.length == 0:
            # A kept-alive connection the backend closed as the request
            # went out (its idle timeout): nothing of the request was lost
            # and nothing answered, so it goes again on a new connection.
            request.retried = True
            request.backend = None
            self._connect(request, backend.job.backend, request.authorization)
            return
        if request.startedWriting:
            # Too late for a status: the client sees the response cut short.
            self.end(EndReason.BACKEND_CLOSED, detail=why)
            return
        request.unregisterProducer()
        self._fail(request, 502, b"Bad Gateway", "The server sent an invalid response.")

    def _finish(self, request: _ProxyRequest) -> None:
        self._streamTimer.stop()
        if not request.bodyDone:
            if request.length == 0:
                # Answered while its head is being read (a synchronous
                # router): the channel completes the request right after.
                request.finishLater = True
                return
            # Answered before the client sent all of its body: the rest
            # cannot be told from a next request, so the connection ends
            # with this response.
            self.current = None
            if request.chunked:
                self.channel.write(b"0\r\n\r\n")
            self.end(self.endReason)
            return
        # The next request may begin (pipelined) inside finish().
        self.current = None
        self._awaitRequest()
        self.resume("routing")
        request.finish()
        if self.current is None and self.channel.inHead:
            # Part of the next one came with this one: the rest of its
            # head has header_timeout, as if it came now.
            self._waitingForHead = True
            self._waiting.start(self.settings.headerTimeout)

    def _fail(
        self,
        request: _ProxyRequest,
        code: int,
        phrase: bytes,
        text: str,
        retry: bool = False,
        headers: list[tuple[bytes, bytes]] = [],
    ) -> None:
        """
        Answer C{request} with the proxy's own error.
        """
        request.answered = True
        if request.backend is not None and request.backend.reader is not None:
            # The backend is in the middle of this request.
            self._dropBackend()
        request.backend = None
        if request.gone or request is not self.current:
            return
        self._writeError(request, code, phrase, text, retry, headers)
        self._finish(request)

    def _writeError(
        self,
        request: _ProxyRequest,
        code: int,
        phrase: bytes,
        text: str,
        retry: bool = False,
        headers: list[tuple[bytes, bytes]] = [],
    ) -> None:
        body = text.encode("utf-8") + b"\r\n"
        request.setResponseCode(code, phrase)
        request.responseHeaders.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
        request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        if retry:
            request.responseHeaders.setRawHeaders(b"Retry-After", [b"%d" % RETRY_AFTER])
        for name, value in headers:
            request.responseHeaders.addRawHeader(name, value)
        if (request.length != 0 and not request.bodyDone) or not self.channel.persistent:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        request.write(body)

    def refuse(self, code: int, phrase: bytes, detail: str, reason: EndReason = EndReason.PROTOCOL_ERROR) -> None:
        """
        Answer input the proxy will not read on with C{code} and close.
        """
        if self.closing:
            return
        request = self.current
        if request is None or (not request.startedWriting and not request.gone):
            body = phrase + b"\r\n"
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (code, phrase, len(body), body)
            )
        self.end(reason, detail=detail)

    def responsesOver(self) -> None:
        """
        The last response of a connection that does not persist was
        written: close it.
        """
        self.end(self.endReason if self.endReason is not self.defaultEndReason else EndReason.CLIENT_CLOSED)

    # After 101 Switching Protocols

    def _upgrade(self, request: _ProxyRequest, head: ResponseHead) -> None:
        backend = cast(HTTPBackend, request.backend)
        reader = backend.reader
        leftover = reader.leftover if reader is not None else b""
        lines = [head.version, b" 101 ", head.reason, b"\r\n"]
        for name, value in head.headers:
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        self.transport.write(b"".join(lines))
        self._stopTimers()
        self.current = None
        toBackend = self.channel.buffered
        # The channel and the upload pause step aside for the relay's own
        # producers.
        self.transport.unregisterProducer()
        backend.transport.unregisterProducer()
        backend.reader = None
        backend.lost = None
        self.backend = None
        self.resume("routing")
        self.resume("backend busy")
        self.transport.resumeProducing()
        self.lifecycle = SessionState.RELAY
        relay = Relay(self.transport, backend.transport, self.context.reactor, self.limits.idleTimeout, onEnd=self._relayEnded)
        self.relay = relay
        self.dataReceived = relay.fromClient  # type: ignore[method-assign]
        backend.dataReceived = relay.fromBackend  # type: ignore[method-assign]
        backend.onLost = relay.backendLost
        backend.onHalfClosed = relay.backendHalfClosed
        relay.start(toClient=leftover, toBackend=toBackend)


def normalisedPath(target: bytes) -> bytes:
    """
    The path of a request target as a backend resolves it, for matching
    pins: without scheme and authority (absolute form), percent-decoded,
    with C{.} and C{..} segments resolved and runs of slashes merged, as
    nginx does before it matches a C{location}. Matching the raw target
    would let C{//login}, C{/%6Cogin} or C{/./login} pass a C{/login} pin
    and still reach the same page on whatever backend the rest of the
    request chose.

    @param target: the request target's path (before any C{?}).
    """
    if not target.startswith(b"/"):
        # Absolute form (scheme://authority/path), or the asterisk form.
        rest = target.partition(b"://")[2]
        slash = rest.find(b"/")
        target = rest[slash:] if slash >= 0 else b"/"
    kept: list[bytes] = []
    trailing = False
    for segment in unquote_to_bytes(target).split(b"/")[1:]:
        trailing = segment in (b"", b".", b"..")
        if segment == b"..":
            if kept:
                kept.pop()
        elif not trailing:
            kept.append(segment)
    return b"/" + b"/".join(kept) + (b"/" if trailing and kept else b"")


class _Response:
    """
    Passes what a L{ResponseReader} reads to the front end, with the
    request it answers.
    """

    def __init__(self, frontend: HTTPFrontend, request: _ProxyRequest) -> None:
        self.frontend = frontend
        self.request = request
        #: While the response waits (the failed-login delay), what came
        #: after its head, in order.
        self.held: list[Callable[[], None]] | None = None

    def responseHead(self, head: ResponseHead) -> None:
        self.frontend.responseHead(self.request, head, self)

    def responseData(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(lambda: self.frontend.responseData(self.request, data))
            return
        self.frontend.responseData(self.request, data)

    def responseDone(self, reusable: bool) -> None:
        if self.held is not None:
            self.held.append(lambda: self.frontend.responseDone(self.request, reusable))
            return
        self.frontend.responseDone(self.request, reusable)

    def responseFailed(self, why: str) -> None:
        if self.held is not None:
            self.held.append(lambda: self.frontend.responseFailed(self.request, why))
            return
        self.frontend.responseFailed(self.request, why)


def _onHost(url: bytes, origin: bytes) -> bool:
    """
    Whether C{url} is on C{origin} (C{http://host[:port]}, lower case).
    """
    start = url[: len(origin)].lower()
    return start == origin and url[len(origin) : len(origin) + 1] in (b"", b"/", b"?", b"#")


def outgoingAuthorization(job: LoginJob) -> list[tuple[bytes, bytes]]:
    """
    The header fields that carry a routed login's credentials to an HTTP
    backend: Basic with the route's user and password; for a master user,
    Basic with the master's and C{Authorize-As} naming the account (Cyrus
    httpd's proxy authorization); a bearer token the router left alone
    goes as it came.
    """
    if job.masterUser is not None:
        pair = job.masterUser.encode("utf-8", "surrogateescape") + b":" + (job.masterPassword or b"")
        return [
            (b"Authorization", b"Basic " + base64.b64encode(pair)),
            (b"Authorize-As", job.user.encode("utf-8", "surrogateescape")),
        ]
    credentials = job.credentials
    if job.password is None and credentials is not None and credentials.token is not None:
        return [(b"Authorization", b"Bearer " + credentials.token)]
    pair = job.user.encode("utf-8", "surrogateescape") + b":" + (job.password or b"")
    return [(b"Authorization", b"Basic " + base64.b64encode(pair))]
