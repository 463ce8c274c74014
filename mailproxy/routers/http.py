"""
The HTTP router: asks an auth server in nginx's C{auth_http} dialect.

An auth script written for nginx's mail proxy works unchanged.  Each login
is one C{GET} whose headers are those nginx sends, in nginx's order and
spelling and with its escaping (see L{requestHeaders})::

    Host: auth.internal
    Auth-Method: plain
    Auth-User: alice@example.org
    Auth-Pass: secret%20with%20spaces
    Auth-Protocol: imap
    Auth-Login-Attempt: 1
    Client-IP: 192.0.2.7
    Auth-SSL: on
    Auth-SSL-Protocol: TLSv1.3
    Auth-SSL-Cipher: TLS_AES_256_GCM_SHA384
    X-Auth-Key: the configured extra headers

and the answer's headers decide (see L{AuthAnswer}): C{Auth-Status: OK} with
C{Auth-Server} and C{Auth-Port} routes there, with C{Auth-User} and
C{Auth-Pass} replacing the login sent to the backend; any other
C{Auth-Status} text refuses the login with that text, closing the connection
unless C{Auth-Wait} asks to keep it; C{Auth-Status: WAIT} asks again after
C{Auth-Wait} seconds.

Beyond nginx: C{Auth-Server} may be a host name; a keep-alive connection
pool, HTTPS with certificate verification and a timeout; and response
headers for what nginx cannot say (L{EXTENSION_HEADERS}).  The request line
is C{HTTP/1.1} (nginx sends C{HTTP/1.0} and closes the connection after each
answer), which is what lets connections be reused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from attrs import field, frozen
from zope.interface import implementer

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS

from mailproxy import _tls
from mailproxy._endpoints import connectQuietly
from mailproxy._safetext import logQuote
from mailproxy.config import Table
from mailproxy.interfaces import IRouter
from mailproxy.model import Backend, Credentials, Rejection, Route, RouteRequest
from mailproxy.routers._backends import (
    BACKEND_TLS_MODES,
    FORWARDING_MODES,
    BackendResolver,
    UnusableBackend,
    parseBackendDefaults,
    parsePort,
    splitHostPort,
)

__all__ = [
    "EXTENSION_HEADERS",
    "AuthAnswer",
    "HTTPRouter",
    "escapeAuth",
    "unescapeAuth",
    "authMethod",
    "requestHeaders",
    "parseAnswer",
    "buildHTTPRouter",
]

EXTENSION_HEADERS: dict[str, str] = {
    "X-Mailproxy-Backend": "with OK: a configured backend's name; it replaces Auth-Server and Auth-Port",
    "X-Mailproxy-TLS": "with OK: none, starttls or implicit: how to reach Auth-Server",
    "X-Mailproxy-Forward": "with OK: auto, id, xclient, proxy-v1, proxy-v2 or none: how Auth-Server learns the client",
    "X-Mailproxy-Master": "with OK: yes to log in with the backend's master user",
    "X-Mailproxy-Unknown": "with a failure: yes if the account is unknown here (a chain asks its next router)",
    "X-Mailproxy-Temporary": "with a failure: yes for a temporary one (IMAP [UNAVAILABLE], SMTP 454)",
}
"""
The response headers mailproxy understands beyond nginx's, and what they
mean.  nginx ignores them, so one auth script can serve both.
"""

MAX_WAITS = 10
"""
How many C{Auth-Status: WAIT} answers in a row one login may get before it
fails as temporarily unavailable.
"""

_NGINX_METHODS = {
    "LOGIN": b"plain",
    "PLAIN": b"plain",
    "APOP": b"apop",
    "CRAM-MD5": b"cram-md5",
    "EXTERNAL": b"external",
}

# NGX_ESCAPE_MAIL_AUTH (src/core/ngx_string.c): control characters, space
# and "%" only; everything else, UTF-8 included, goes raw.
_ESCAPED = frozenset(range(0x20)) | {0x20, 0x25}
_ESCAPE_TABLE = {byte: b"%%%02X" % byte for byte in _ESCAPED}

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_UNAVAILABLE = "Service temporarily unavailable, try again later."


def escapeAuth(value: bytes) -> bytes:
    """
    Escape an C{Auth-User} or C{Auth-Pass} value the way nginx does: bytes
    0x00-0x1F, space and C{%} become C{%XX} (upper-case hex).
    """
    if not any(byte in _ESCAPED for byte in value):
        return value
    return b"".join(_ESCAPE_TABLE.get(byte, bytes((byte,))) for byte in value)


def unescapeAuth(value: bytes) -> bytes:
    """
    Undo L{escapeAuth}: percent-decoding only (a C{+} stays a C{+}).  For
    auth servers; the result is raw bytes, usually UTF-8.
    """
    return unquote_to_bytes(value)


def authMethod(credentials: Credentials | None) -> bytes:
    """
    The C{Auth-Method} value for C{credentials}: nginx's C{plain},
    C{apop}, C{cram-md5}, C{external}, or C{none} for SMTP without
    authentication; other SASL mechanisms (which nginx does not offer) by
    their lower-case name.
    """
    if credentials is None:
        return b"none"
    return _NGINX_METHODS.get(credentials.mechanism.upper(), credentials.mechanism.lower().encode("ascii", "replace"))


def requestHeaders(
    request: RouteRequest, host: bytes, extra: Sequence[tuple[bytes, bytes]] = ()
) -> list[tuple[bytes, bytes]]:
    """
    The request headers nginx would send for C{request}, in its order.

    nginx sends C{Client-Host} (its resolved name, or C{[UNAVAILABLE]}
    when it resolves no names: on every SMTP question), the
    C{Proxy-Protocol-*} headers only for clients behind a PROXY header, and
    the C{Auth-SSL-Verify}/C{-Subject}/... headers only with client
    certificates; mailproxy does none of these, so it sends none of them.

    @param host: the C{Host} value: the auth URL's host, without the port,
        as nginx sends it.
    @param extra: configured headers (nginx's C{auth_http_header}), last.
    """
    credentials = request.credentials
    user = password = b""
    if credentials is not None:
        user = credentials.user.encode("utf-8", "surrogateescape")
        secret = credentials.password if credentials.password is not None else credentials.response
        if secret is None and credentials.token is not None and not credentials.user:
            # A bearer token that names no user (HTTP's Authorization:
            # Bearer): only the token says whose it is, so the auth server
            # gets it to look the account up (and names it in Auth-User).
            secret = credentials.token
        password = secret or b""
    method = authMethod(credentials)
    headers = [
        (b"Host", host),
        (b"Auth-Method", method),
        (b"Auth-User", escapeAuth(user)),
        (b"Auth-Pass", escapeAuth(password)),
    ]
    if credentials is not None and credentials.password is None and credentials.challenge:
        headers.append((b"Auth-Salt", credentials.challenge))
    headers += [
        (b"Auth-Protocol", request.protocol.encode("ascii")),
        (b"Auth-Login-Attempt", b"%d" % request.attempt),
        (b"Client-IP", request.client.address.encode("ascii", "replace")),
    ]
    if request.lookup == "recipient":
        # nginx's Auth-Method none: the commands, without their parameters
        # (nginx passes SIZE= and the like on; scripts read the address),
        # unescaped: the SMTP parser already refused CR and LF.
        headers += [
            (b"Auth-SMTP-Helo", _raw(request.helo or "")),
            (b"Auth-SMTP-From", b"MAIL FROM:<" + _raw(request.mailFrom or "") + b">"),
            (b"Auth-SMTP-To", b"RCPT TO:<" + _raw(request.rcptTo or "") + b">"),
        ]
    tls = request.client.tls
    if tls is not None:
        headers += [
            (b"Auth-SSL", b"on"),
            (b"Auth-SSL-Protocol", tls.version.encode("ascii", "replace")),
            (b"Auth-SSL-Cipher", tls.cipher.encode("ascii", "replace")),
        ]
    headers += list(extra)
    return headers


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@frozen
class AuthAnswer:
    """
    The headers of an auth server's answer that matter (names are
    case-insensitive; when one comes twice, the last counts, as in nginx).

    @ivar status: C{Auth-Status}: C{b"OK"}, C{b"WAIT"} or the failure text;
        L{None} if absent.
    @ivar server: C{Auth-Server}.
    @ivar port: C{Auth-Port}, as sent.
    @ivar user: C{Auth-User}: the login name for the backend, raw.
    @ivar password: C{Auth-Pass}: the password for the backend, raw (nginx
        does not unescape it either).
    @ivar wait: C{Auth-Wait} in seconds; 0 when absent or not a number.
    @ivar errorCode: C{Auth-Error-Code}, e.g. C{b"451 4.3.0"}.
    @ivar backend: C{X-Mailproxy-Backend}, and so on for the other
        L{EXTENSION_HEADERS}.
    """

    status: bytes | None = None
    server: bytes | None = None
    port: bytes | None = None
    user: bytes | None = None
    password: bytes | None = field(default=None, repr=False)
    wait: int = 0
    errorCode: bytes | None = None
    backend: bytes | None = None
    tls: bytes | None = None
    forward: bytes | None = None
    master: bytes | None = None
    unknown: bytes | None = None
    temporary: bytes | None = None


_ANSWER_FIELDS = {
    b"auth-status": "status",
    b"auth-server": "server",
    b"auth-port": "port",
    b"auth-user": "user",
    b"auth-pass": "password",
    b"auth-wait": "wait",
    b"auth-error-code": "errorCode",
    b"x-mailproxy-backend": "backend",
    b"x-mailproxy-tls": "tls",
    b"x-mailproxy-forward": "forward",
    b"x-mailproxy-master": "master",
    b"x-mailproxy-unknown": "unknown",
    b"x-mailproxy-temporary": "temporary",
}


def parseAnswer(headers: Headers) -> AuthAnswer:
    """
    Pick the headers that matter out of an auth server's answer.
    """
    values: dict[str, Any] = {}
    for name, attribute in _ANSWER_FIELDS.items():
        found = headers.getRawHeaders(name)
        if found:
            values[attribute] = found[-1].strip(b" \t")
    statuses = [status.strip(b" \t") for status in headers.getRawHeaders(b"auth-status", ())]
    refusals = [status for status in statuses if status not in (b"OK", b"WAIT")]
    if refusals:
        # As in nginx, a refusal is not undone by an OK or a WAIT beside it.
        values["status"] = refusals[-1]
    elif b"WAIT" in statuses:
        values["status"] = b"WAIT"
    wait = values.pop("wait", b"")
    # nginx's ngx_atoi: digits only, anything else counts as no wait.
    values["wait"] = int(wait) if wait.isdigit() else 0
    return AuthAnswer(**values)


class _ExactHeaders(Headers):
    """
    Request headers written with exactly the given names, in the given order,
    and no others.

    Twisted writes header names in its own capitalisation (C{Client-Ip},
    C{Auth-Ssl}), and wrapping agents add headers (C{Accept-Encoding}); an
    auth script written for nginx may compare names as nginx spells them.
    """

    __slots__ = ("_pairs", "_spelling")

    def __init__(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        super().__init__()
        self._pairs = tuple(pairs)
        self._spelling = {name.lower(): name for name, _ in self._pairs}
        for name, value in self._pairs:
            self.addRawHeader(name, value)

    def copy(self) -> _ExactHeaders:
        return _ExactHeaders(self._pairs)

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, Sequence[bytes]]]:
        for name, values in super().getAllRawHeaders():
            spelled = self._spelling.get(name.lower())
            if spelled is not None:
                yield spelled, values


@implementer(IPolicyForHTTPS)
class _AuthServerTLS:
    """
    How the router verifies an C{https} auth server: against C{caFile} (or
    the system's CAs), or not at all with C{verify = false}.
    """

    def __init__(self, caFile: str | None, verify: bool) -> None:
        self.caFile = caFile
        self.verify = verify
        # Built once per host (the CA file is read then): the auth server.
        self._options: dict[str, Any] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        name = hostname.decode("ascii")
        options = self._options.get(name)
        if options is None:
            options = self._options[name] = _tls.hostClientOptions(name, self.caFile, self.verify)
        return options


class _Drain(Protocol):
    """
    Reads an answer's body, which nothing uses, so that its connection can
    be used again; a body that has not ended within C{timeout} seconds
    (one without a length on a connection left open, one that trickles)
    is given up, which closes the connection.
    """

    def __init__(self, reactor: Any, timeout: float) -> None:
        self._giveUp = reactor.callLater(timeout, self._stop)

    def dataReceived(self, data: bytes) -> None:
        pass

    def _stop(self) -> None:
        # A response body's transport is its producer: stopping it closes
        # the connection.
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._giveUp.active():
            self._giveUp.cancel()


@implementer(IRouter)
class HTTPRouter:
    """
    Routes logins by asking an auth server in nginx's C{auth_http} dialect.

    A connection failure, a timeout or an answer that makes no sense refuses
    the login as temporarily unavailable (and logs why); the client's
    password is never logged.

    @ivar url: the auth server's URL.
    @ivar timeout: seconds for one question (connect, request, answer).
    """

    log = Logger()

    def __init__(
        self,
        url: str,
        resolver: BackendResolver,
        *,
        reactor: Any,
        client: Any = None,
        timeout: float = 10.0,
        headers: Sequence[tuple[str, str]] = (),
        caFile: str | None = None,
        verify: bool = True,
        connections: int = 10,
    ) -> None:
        """
        @param url: C{http://} or C{https://} URL, or nginx's form without a
            scheme (C{127.0.0.1:9000/auth}).
        @param resolver: turns answers into backends.
        @param reactor: for timers and connections.
        @param client: a treq C{HTTPClient} (or L{treq.testing.StubTreq});
            by default one with a keep-alive pool of C{connections}
            connections.
        @param headers: extra request headers, sent last, in this order.
        """
        self.url = _normalURL(url)
        self.timeout = timeout
        self.resolver = resolver
        self._reactor = reactor
        self._host = _hostHeader(self.url)
        self._extra = tuple((name.encode("ascii"), value.encode("utf-8")) for name, value in headers)
        self._caFile = caFile
        self._verify = verify
        if client is None:
            client = _makeClient(reactor, timeout, caFile, verify, connections)
        self._client = client

    def probe(self, user: str) -> Deferred[str]:
        """
        Connect to the auth server (over https, through the TLS handshake,
        its certificate checked as for a question) and hang up, asking
        nothing (a question without the password would count as a failed
        login there): for C{mailproxy check --probe}.

        @return: fires with what was reached, in words; fails if the
            connection (or handshake) cannot be made within L{timeout}.
        """
        parts = urlsplit(self.url)
        hostname = parts.hostname or ""
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        endpoint: Any = HostnameEndpoint(self._reactor, hostname, port, timeout=max(1, int(self.timeout)))
        if tls:
            endpoint = wrapClientTLS(_tls.hostClientOptions(hostname, self._caFile, self._verify), endpoint)
        probe = _Reach(tls)
        connectQuietly(endpoint, probe).addErrback(probe.failed)
        what = "TLS connections" if tls else "connections"
        return probe.reached.addTimeout(self.timeout, self._reactor).addCallback(
            lambda _: f"the auth server accepts {what} at {hostname}:{port}"
        )

    def route(self, request: RouteRequest) -> Deferred[Route | Rejection]:
        """
        Ask the auth server about C{request}.
        """
        return Deferred.fromCoroutine(self._route(request))

    async def _route(self, request: RouteRequest) -> Route | Rejection:
        headers = requestHeaders(request, self._host, self._extra)
        user = request.credentials.user if request.credentials is not None else ""
        for _ in range(MAX_WAITS + 1):
            try:
                answer = await self._ask(headers)
            except Exception as e:
                self.log.error(
                    "auth_http {url} failed for {user}: {error}",
                    url=self.url,
                    user=logQuote(user),
                    error=logQuote(describeRequestError(e, self.timeout)),
                )
                return Rejection(_UNAVAILABLE, temporary=True)
            if answer.status != b"WAIT":
                return self._decide(answer, request, user)
            await deferLater(self._reactor, answer.wait, lambda: None)
        self.log.error(
            "auth_http {url} said WAIT {count} times for {user}", url=self.url, count=MAX_WAITS + 1, user=logQuote(user)
        )
        return Rejection(_UNAVAILABLE, temporary=True)

    def _ask(self, headers: list[tuple[bytes, bytes]]) -> Deferred[AuthAnswer]:
        d = self._client.get(
            self.url,
            headers=_ExactHeaders(headers),
            allow_redirects=False,
            unbuffered=True,
        )

        def answered(response: Any) -> AuthAnswer:
            # The headers decide at once, as in nginx; the body is ignored,
            # but read (after the answer, and for at most the timeout) so
            # that the connection can be reused.
            response.deliverBody(_Drain(self._reactor, self.timeout))
            return parseAnswer(response.headers)

        d.addCallback(answered)
        return d.addTimeout(self.timeout, self._reactor)

    def _decide(self, answer: AuthAnswer, request: RouteRequest, user: str) -> Route | Rejection:
        if answer.status is None:
            self.log.error("auth_http {url} answered without Auth-Status for {user}", url=self.url, user=logQuote(user))
            return Rejection(_UNAVAILABLE, temporary=True)
        if answer.status != b"OK":
            return self._refusal(answer, user, request.lookup)
        try:
            backend = self._backend(answer, request.port)
        except UnusableBackend as e:
            self.log.error(
                "auth_http {url} routed {user} nowhere: {problem}", url=self.url, user=logQuote(user), problem=logQuote(str(e))
            )
            return Rejection(_UNAVAILABLE, temporary=True)
        useMaster = _yes(answer.master)
        if useMaster and backend.masterUser is None:
            self.log.error(
                "auth_http {url} asked for the master user of {backend}, which has none (user {user})",
                url=self.url,
                backend=backend.name,
                user=logQuote(user),
            )
            return Rejection(_UNAVAILABLE, temporary=True)
        return Route(
            backend=backend,
            user=answer.user.decode("utf-8", "surrogateescape") if answer.user is not None else None,
            password=answer.password,
            useMaster=useMaster,
            authenticated=request.credentials is not None,
            rule=f"auth_http -> {backend.name}",
        )

    def _refusal(self, answer: AuthAnswer, user: str, lookup: str) -> Rejection:
        assert answer.status is not None
        message = answer.status.decode("utf-8", "replace")
        temporary = _yes(answer.temporary) or (answer.errorCode or b"").startswith(b"4")
        self.log.info(
            "auth_http refused {user}: {message} wait={wait} temporary={temporary}",
            user=logQuote(user),
            message=logQuote(message),
            wait=answer.wait,
            temporary=temporary,
        )
        # An MX recipient refused with 5.1.1 is a user unknown in a domain
        # the server serves (SMTP 550 5.1.1, not "relay access denied").
        unknownUser = b"5.1.1" in (answer.errorCode or b"").split()
        # nginx: without Auth-Wait the error is the last thing said. Not
        # for an MX recipient: nginx asks once per session, this router
        # about each recipient, and one refused must not lose the others.
        return Rejection(
            message,
            wait=float(answer.wait),
            temporary=temporary,
            close=answer.wait == 0 and lookup != "recipient",
            unknown=_yes(answer.unknown),
            reason="unknown-user" if unknownUser else "",
        )

    def _backend(self, answer: AuthAnswer, protocol: str) -> Backend:
        if answer.backend is not None:
            return self.resolver.named(answer.backend.decode("utf-8", "replace"), protocol)
        if not answer.server or not answer.port:
            raise UnusableBackend("no Auth-Server and Auth-Port")
        server = answer.server.decode("ascii", "replace")
        try:
            port = parsePort(answer.port.decode("ascii", "replace"))
            host, extraPort = splitHostPort(server)
        except ValueError as e:
            raise UnusableBackend(str(e)) from None
        if extraPort is not None:
            raise UnusableBackend(f"Auth-Server {server!r} must not carry a port")
        tls = _choice(answer.tls, BACKEND_TLS_MODES, "X-Mailproxy-TLS")
        forward = _choice(answer.forward, FORWARDING_MODES, "X-Mailproxy-Forward")
        return self.resolver.at(host, port, protocol, tls=tls, forward=forward)  # type: ignore[arg-type]


def _yes(value: bytes | None) -> bool:
    return value is not None and value.lower() in (b"yes", b"on", b"true", b"1")


def _choice(value: bytes | None, choices: Sequence[str], header: str) -> str | None:
    if value is None:
        return None
    text = value.decode("ascii", "replace").lower()
    if text not in choices:
        raise UnusableBackend(f"{header}: {text!r} is not one of {', '.join(choices)}")
    return text


def _describe(error: BaseException) -> str:
    text = str(error)
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def describeRequestError(error: BaseException, timeout: float) -> str:
    """
    Why a request to an HTTP service (the auth server, a token
    introspection endpoint) got no answer, in words for the log.

    The HTTP client reports a request that its timeout cancelled, or whose
    connection broke, as a list of the failures inside; the log names
    them instead.
    """
    if isinstance(error, (RequestGenerationFailed, RequestTransmissionFailed, ResponseNeverReceived, ResponseFailed)):
        if any(reason.check(CancelledError) for reason in error.reasons):
            return f"no answer within {timeout:g} s"
        inner = "; ".join(_describe(reason.value) for reason in error.reasons)
        return f"no answer: {inner or 'the connection was lost'}"
    if isinstance(error, (TimeoutError, CancelledError)):
        # Cancelled before a connection was made.
        return f"no connection within {timeout:g} s"
    return _describe(error)


@implementer(IHandshakeListener)
class _Reach(Protocol):
    """
    Hangs up as soon as it is connected, and with TLS as soon as the
    handshake is done; L{reached} fires then, or fails with the reason the
    connection or the handshake failed.
    """

    def __init__(self, tls: bool) -> None:
        self.tls = tls
        self.reached: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if not self.tls:
            self._done()

    def handshakeCompleted(self) -> None:
        self._done()

    def _done(self) -> None:
        if not self.reached.called:
            self.reached.callback(None)
        assert self.transport is not None
        self.transport.loseConnection()

    def failed(self, reason: Failure) -> None:
        if not self.reached.called:
            self.reached.errback(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.failed(reason)


def _normalURL(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    return url


def _hostHeader(url: str) -> bytes:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return host.encode("idna") if not host.isascii() else host.encode("ascii")


def _makeClient(reactor: Any, timeout: float, caFile: str | None, verify: bool, connections: int) -> Any:
    from treq.client import HTTPClient
    from treq.cookies import IndexableCookieJar

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = connections
    # Idle connections are closed after a minute; auth servers often close
    # theirs sooner, and a closed one is noticed and replaced.
    pool.cachedConnectionTimeout = 60
    pool.retryAutomatically = True
    agent = Agent(reactor, contextFactory=_AuthServerTLS(caFile, verify), connectTimeout=timeout, pool=pool)
    # Cookies an auth server sets must never travel from one user's
    # question to the next.
    jar = IndexableCookieJar(DefaultCookiePolicy(allowed_domains=[]))
    return HTTPClient(agent, cookiejar=jar)


def buildHTTPRouter(options: Table, backends: Mapping[str, Backend], reactor: Any) -> HTTPRouter:
    """
    Make an L{HTTPRouter} from its C{[router]} options.

    @raise mailproxy.config.ConfigError: naming the key that is wrong.
    """
    options.allow("url", "timeout", "headers", "ca_file", "verify", "connections", "backend_defaults")
    url = options.string("url")
    parts = urlsplit(_normalURL(url))
    if "@" in parts.netloc:
        # Never sent (nor shown: the URL appears in every log line about
        # the auth server), so never taken.
        options.fail(
            "url",
            "must not hold a user name or password; send credentials in a header: "
            'headers = { Authorization = "Basic ..." }',
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        options.fail("url", f"must be an http:// or https:// URL with a host, not {url!r}")
    try:
        parts.port
    except ValueError:
        options.fail("url", f"bad port in {url!r}")
    headers: list[tuple[str, str]] = []
    headerTable = options.table("headers")
    if headerTable is not None:
        reserved = {name.lower() for name in _RESERVED}
        for name, value in headerTable.data.items():
            if not _TOKEN.match(name.encode("utf-8")):
                headerTable.fail(name, "not a valid HTTP header name")
            if name.lower() in reserved:
                headerTable.fail(name, "mailproxy sends this header itself")
            if any(name.lower() == other.lower() for other, _ in headers):
                headerTable.fail(name, "given twice (names are compared without case)")
            text = headerTable.string(name)
            if any(ord(c) < 0x20 and c != "\t" for c in text) or "\x7f" in text:
                headerTable.fail(name, "must not contain control characters")
            headers.append((name, text))
    # Read with collect: a wrong one is noted and the others still read
    # (when the configuration's problems are gathered, as for check).
    caFile = options.collect(lambda: options.path("ca_file", None), None)
    verify = options.collect(lambda: options.boolean("verify", True), True)
    timeout = options.collect(lambda: options.number("timeout", 10.0, positive=True), 10.0)
    connections = options.collect(lambda: options.integer("connections", 10, 1, 1000), 10)
    if parts.scheme == "https":
        try:
            _tls.hostClientOptions(parts.hostname, caFile, verify)
        except _tls.TLSConfigError as e:
            options.fail("ca_file" if caFile else "url", str(e))
    defaults = parseBackendDefaults(options.tableOrEmpty("backend_defaults"))
    return HTTPRouter(
        url,
        BackendResolver(backends, defaults),
        reactor=reactor,
        timeout=timeout,
        headers=headers,
        caFile=caFile,
        verify=verify,
        connections=connections,
    )


_RESERVED = (
    "Host",
    "Auth-Method",
    "Auth-User",
    "Auth-Pass",
    "Auth-Salt",
    "Auth-Protocol",
    "Auth-Login-Attempt",
    "Client-IP",
    "Client-Host",
    "Auth-SMTP-Helo",
    "Auth-SMTP-From",
    "Auth-SMTP-To",
    "Auth-SSL",
    "Auth-SSL-Protocol",
    "Auth-SSL-Cipher",
    "Connection",
    "Content-Length",
    "Transfer-Encoding",
)
