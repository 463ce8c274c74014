"""
Tests for L{mailproxy.routers.http}: the nginx C{auth_http} dialect.

The request is checked byte for byte on an in-memory connection (the
router's own HTTP client writing into a L{StringTransport}); answers come
from a L{twisted.web} resource through L{treq.testing.StubTreq}.
"""

from __future__ import annotations

import os
from typing import Any

from treq.testing import StubTreq

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mailproxy.config import ConfigError, Table
from mailproxy.model import Backend, ClientInfo, Credentials, Rejection, Route, RouteRequest, TLSInfo
from mailproxy.routers._backends import BackendDefaults, BackendResolver, parseBackendDefaults
from mailproxy.routers.http import (
    HTTPRouter,
    authMethod,
    buildHTTPRouter,
    escapeAuth,
    requestHeaders,
    unescapeAuth,
)

from .routerhelpers import result

OLD = Backend(name="old", host="10.0.0.1", ports={"imap": 143, "pop3": 110}, tls="starttls", forward="id")
NEW = Backend(
    name="new",
    host="10.0.0.2",
    ports={"imap": 143},
    masterUser="proxy",
    masterPassword=b"master-secret",
)
BACKENDS = {"old": OLD, "new": NEW}

CLIENT = ClientInfo(sessionId="s1", address="192.0.2.7", port=50123, localAddress="192.0.2.1", localPort=143)
TLS_CLIENT = ClientInfo(
    sessionId="s2",
    address="2001:db8::7",
    port=50124,
    localAddress="2001:db8::1",
    localPort=993,
    tls=TLSInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", serverName="mail.example.org"),
)


def login(user: str = "alice@example.org", password: bytes = b"secret", **kwargs: Any) -> RouteRequest:
    """
    A plain login request (IMAP LOGIN) from L{CLIENT}.
    """
    kwargs.setdefault("protocol", "imap")
    kwargs.setdefault("client", CLIENT)
    return RouteRequest(credentials=Credentials("LOGIN", user, password=password), **kwargs)


class EscapingTests(SynchronousTestCase):
    """
    Tests for L{escapeAuth} and L{unescapeAuth}.
    """

    def test_escapedBytes(self) -> None:
        """
        Control characters, space and C{%} become upper-case C{%XX}; nothing
        else does, not even C{+}, DEL or UTF-8.
        """
        self.assertEqual(escapeAuth(b"a b%c\x00\x1f\r\n"), b"a%20b%25c%00%1F%0D%0A")
        self.assertEqual(escapeAuth(b"+\x7f\xc3\xa9:/?&="), b"+\x7f\xc3\xa9:/?&=")

    def test_unchangedIsSame(self) -> None:
        """
        A value without anything to escape is returned as it is.
        """
        value = b"alice@example.org"
        self.assertIs(escapeAuth(value), value)

    def test_roundTrip(self) -> None:
        """
        L{unescapeAuth} undoes L{escapeAuth} for every byte, and never turns
        C{+} into a space.
        """
        every = bytes(range(256))
        self.assertEqual(unescapeAuth(escapeAuth(every)), every)
        self.assertEqual(unescapeAuth(b"a+b%2B"), b"a+b+")

    def test_methods(self) -> None:
        """
        Mechanisms map to nginx's C{Auth-Method} values; no credentials is
        C{none}; others are passed by their lower-case name.
        """
        self.assertEqual(authMethod(Credentials("LOGIN", "u", password=b"p")), b"plain")
        self.assertEqual(authMethod(Credentials("PLAIN", "u", password=b"p")), b"plain")
        self.assertEqual(authMethod(Credentials("APOP", "u", challenge=b"<1@h>", response=b"ab")), b"apop")
        self.assertEqual(authMethod(Credentials("CRAM-MD5", "u", challenge=b"<1@h>", response=b"ab")), b"cram-md5")
        self.assertEqual(authMethod(Credentials("EXTERNAL", "u")), b"external")
        self.assertEqual(authMethod(Credentials("XOAUTH2", "u", password=b"t")), b"xoauth2")
        self.assertEqual(authMethod(None), b"none")


class WireTests(SynchronousTestCase):
    """
    The request as it goes over the wire: nginx's headers, in nginx's order
    and spelling, and nothing else; only the request line differs
    (C{HTTP/1.1}, for keep-alive).
    """

    def ask(self, request: RouteRequest, url: str = "http://auth.internal:9000/auth?x=1", **kwargs: Any) -> tuple[bytes, Any, Deferred[Any]]:
        """
        Route C{request} through a real HTTP client on a memory reactor.

        @return: the bytes the router sent, the client protocol (to feed an
            answer to) and the route Deferred.
        """
        reactor = self.reactor = MemoryReactorClock()
        from treq.client import HTTPClient

        router = HTTPRouter(
            url,
            BackendResolver(BACKENDS, BackendDefaults()),
            reactor=reactor,
            client=HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True))),
            **kwargs,
        )
        d = router.route(request)
        _, port, factory, _, _ = reactor.tcpClients[0]
        self.assertEqual(port, 9000)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return transport.value(), protocol, d

    def test_noAnswer(self) -> None:
        """
        An auth server that takes the request and never answers fails the
        login as temporary after C{timeout} seconds, and the log says so in
        words, not as the HTTP client's list of inner failures.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        _, _, d = self.ask(login(), timeout=4.0)
        self.reactor.advance(4)
        self.assertTrue(result(d).temporary)
        [line] = [formatEvent(event) for event in events if "failed for" in formatEvent(event)]
        self.assertEqual(line, 'auth_http http://auth.internal:9000/auth?x=1 failed for "alice@example.org": "no answer within 4 s"')

    def test_connectionBroken(self) -> None:
        """
        An auth server that closes the connection without an answer is
        logged with the reason the connection ended.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        _, protocol, d = self.ask(login())
        protocol.connectionLost(Failure(ConnectionLost("reset by peer")))
        self.assertTrue(result(d).temporary)
        [line] = [formatEvent(event) for event in events if "failed for" in formatEvent(event)]
        self.assertIn('failed for "alice@example.org": "no answer: ConnectionLost: ', line)
        self.assertNotIn("Failure", line)

    def test_plainLogin(self) -> None:
        """
        An IMAP LOGIN is asked with exactly nginx's headers; the password's
        space and percent sign are escaped; the configured extra headers come
        last, spelled as configured.
        """
        sent, _, _ = self.ask(
            login(password=b"pass word%", attempt=2),
            headers=[("X-Auth-Key", "s3cret"), ("x-lower", "v")],
        )
        self.assertEqual(
            sent,
            b"GET /auth?x=1 HTTP/1.1\r\n"
            b"Host: auth.internal\r\n"
            b"Auth-Method: plain\r\n"
            b"Auth-User: alice@example.org\r\n"
            b"Auth-Pass: pass%20word%25\r\n"
            b"Auth-Protocol: imap\r\n"
            b"Auth-Login-Attempt: 2\r\n"
            b"Client-IP: 192.0.2.7\r\n"
            b"X-Auth-Key: s3cret\r\n"
            b"x-lower: v\r\n"
            b"\r\n",
        )

    def test_tlsClient(self) -> None:
        """
        A client on TLS adds C{Auth-SSL: on} with the protocol version and
        cipher (nginx 1.21.2 and later); an IPv6 client address is sent
        bare; UTF-8 in the user name is sent raw.
        """
        request = login("j\u00fcrgen@example.org", b"pw", protocol="pop3", client=TLS_CLIENT)
        sent, _, _ = self.ask(request, url="http://127.0.0.1:9000/auth")
        self.assertEqual(
            sent,
            b"GET /auth HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n"
            b"Auth-Method: plain\r\n"
            b"Auth-User: j\xc3\xbcrgen@example.org\r\n"
            b"Auth-Pass: pw\r\n"
            b"Auth-Protocol: pop3\r\n"
            b"Auth-Login-Attempt: 1\r\n"
            b"Client-IP: 2001:db8::7\r\n"
            b"Auth-SSL: on\r\n"
            b"Auth-SSL-Protocol: TLSv1.3\r\n"
            b"Auth-SSL-Cipher: TLS_AES_256_GCM_SHA384\r\n"
            b"\r\n",
        )

    def test_cramMD5(self) -> None:
        """
        For CRAM-MD5 the client's digest goes in C{Auth-Pass} and the
        challenge in C{Auth-Salt}, right after it.
        """
        credentials = Credentials(
            "CRAM-MD5", "alice@example.org", challenge=b"<17.42@mail.example.org>", response=b"b913a602c7eda7a495b4e6e7334d3890"
        )
        sent, _, _ = self.ask(RouteRequest(protocol="imap", credentials=credentials, client=CLIENT))
        self.assertIn(
            b"Auth-Method: cram-md5\r\n"
            b"Auth-User: alice@example.org\r\n"
            b"Auth-Pass: b913a602c7eda7a495b4e6e7334d3890\r\n"
            b"Auth-Salt: <17.42@mail.example.org>\r\n"
            b"Auth-Protocol: imap\r\n",
            sent,
        )

    def test_smtpWithoutAuthentication(self) -> None:
        """
        An SMTP session without login asks with C{Auth-Method: none}, empty
        user and password, and the HELO name and the envelope as command
        lines.
        """
        request = RouteRequest(
            protocol="smtp",
            credentials=None,
            client=CLIENT,
            helo="client.example.net",
            mailFrom="",
            rcptTo="bob@example.org",
        )
        sent, _, _ = self.ask(request)
        self.assertIn(
            b"Auth-Method: none\r\n"
            b"Auth-User: \r\n"
            b"Auth-Pass: \r\n"
            b"Auth-Protocol: smtp\r\n"
            b"Auth-Login-Attempt: 1\r\n"
            b"Client-IP: 192.0.2.7\r\n"
            b"Auth-SMTP-Helo: client.example.net\r\n"
            b"Auth-SMTP-From: MAIL FROM:<>\r\n"
            b"Auth-SMTP-To: RCPT TO:<bob@example.org>\r\n"
            b"\r\n",
            sent,
        )

    def test_answerOnTheWire(self) -> None:
        """
        An HTTP/1.0 answer (what nginx-era scripts send) with lower-case
        header names routes the login.
        """
        _, protocol, d = self.ask(login())
        protocol.dataReceived(
            b"HTTP/1.0 200 OK\r\nauth-status: OK\r\nauth-server: 10.0.0.9\r\nauth-port: 1143\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        route = result(d)
        self.assertEqual(route.backend.name, "10.0.0.9:1143")
        self.assertEqual((route.backend.host, route.backend.ports), ("10.0.0.9", {"imap": 1143}))

    def test_answerBeforeItsBody(self) -> None:
        """
        The answer's headers decide as soon as they are in: a body that
        comes late, or never (no length, the connection left open), does
        not hold the login, and is drained within the timeout.
        """
        for answer in (
            b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 10.0.0.9\r\nAuth-Port: 1143\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 10.0.0.9\r\nAuth-Port: 1143\r\n\r\n",
        ):
            _, protocol, d = self.ask(login(), timeout=4.0)
            protocol.dataReceived(answer)
            self.assertEqual(result(d).backend.name, "10.0.0.9:1143")
            transport = protocol.transport
            self.assertEqual(transport.producerState, "producing")
            self.reactor.advance(4)
            self.assertEqual(transport.producerState, "stopped")

    def test_hostHeader(self) -> None:
        """
        C{Host} is the URL's host without the port, as nginx sends it; an
        IPv6 literal keeps its brackets.
        """
        for url, host in (
            ("http://[::1]:9000/auth", b"[::1]"),
            ("https://Auth.Internal/auth", b"auth.internal"),
            ("10.1.2.3:8080/a", b"10.1.2.3"),
        ):
            router = HTTPRouter(url, BackendResolver({}, BackendDefaults()), reactor=Clock(), client=object())
            self.assertEqual(router._host, host)

    def test_bareBearerToken(self) -> None:
        """
        A bearer token that names no user (HTTP) goes to the auth server
        in Auth-Pass, so that it can name the account; a token login that
        names its user (OAUTHBEARER over IMAP) still sends no token.
        """
        bare = RouteRequest(protocol="http", credentials=Credentials("OAUTHBEARER", "", token=b"tok en"), client=CLIENT)
        headers = dict(requestHeaders(bare, b"auth"))
        self.assertEqual((headers[b"Auth-Method"], headers[b"Auth-User"], headers[b"Auth-Pass"]), (b"oauthbearer", b"", b"tok%20en"))
        self.assertEqual(headers[b"Auth-Protocol"], b"http")
        named = RouteRequest(protocol="imap", credentials=Credentials("OAUTHBEARER", "alice", token=b"tok"), client=CLIENT)
        self.assertEqual(dict(requestHeaders(named, b"auth"))[b"Auth-Pass"], b"")

    def test_requestHeadersFunction(self) -> None:
        """
        L{requestHeaders} gives the list the router sends, for tools that
        want to show or compare it.
        """
        headers = requestHeaders(login(), b"auth")
        self.assertEqual([name for name, _ in headers][:4], [b"Host", b"Auth-Method", b"Auth-User", b"Auth-Pass"])


class AuthServer(Resource):
    """
    An auth server for the tests: answers with the headers a test set for
    each user, and records every request's headers.

    @ivar answers: user name to a list of (header, value) pairs, or to a
        list of such lists for successive questions.
    @ivar requests: the request header lists seen, lower-case names.
    @ivar delayed: with C{delay}, requests whose answer is not sent yet.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Any] = {}
        self.requests: list[dict[str, str]] = []
        self.delay = False
        self.delayed: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        headers = {name.decode().lower(): values[-1].decode("utf-8") for name, values in request.requestHeaders.getAllRawHeaders()}
        self.requests.append(headers)
        answer = self.answers.get(headers.get("auth-user", ""), [("Auth-Status", "Invalid login or password")])
        if answer and isinstance(answer[0], list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        for name, value in answer:
            request.responseHeaders.addRawHeader(name.encode(), value.encode("utf-8") if isinstance(value, str) else value)
        if self.delay:
            self.delayed.append(request)
            return NOT_DONE_YET
        return b"ignored body"


class ResponseTests(SynchronousTestCase):
    """
    How the answer's headers turn into a L{Route} or L{Rejection}.
    """

    def setUp(self) -> None:
        self.server = AuthServer()
        self.clock = Clock()
        self.defaults = BackendDefaults()
        self.logged: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def router(self, **kwargs: Any) -> HTTPRouter:
        """
        A router asking L{server} through L{StubTreq}.
        """
        self.stub = StubTreq(self.server)
        return HTTPRouter(
            "http://auth.internal/auth",
            BackendResolver(BACKENDS, kwargs.pop("defaults", self.defaults)),
            reactor=self.clock,
            client=self.stub,
            **kwargs,
        )

    def answer(self, headers: list[tuple[str, str]], request: RouteRequest | None = None) -> Route | Rejection:
        """
        Route C{request} (alice's login by default) while the server
        answers with C{headers}.
        """
        request = request or login()
        user = request.credentials.user if request.credentials else ""
        self.server.answers[user] = headers
        return result(self.router().route(request))  # type: ignore[no-any-return]

    def logText(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(event) for event in self.logged)

    def test_okAddress(self) -> None:
        """
        C{Auth-Status: OK} with an IP address and port routes to an ad-hoc
        backend named C{host:port} with the default settings; the router
        counts as having authenticated the client.
        """
        route = self.answer([("Auth-Status", "OK"), ("Auth-Server", "192.0.2.50"), ("Auth-Port", "1143")])
        assert isinstance(route, Route)
        self.assertEqual(route.backend, Backend(name="192.0.2.50:1143", host="192.0.2.50", ports={"imap": 1143}))
        self.assertEqual((route.user, route.password, route.useMaster, route.authenticated), (None, None, False, True))
        self.assertEqual(route.rule, "auth_http -> 192.0.2.50:1143")

    def test_okHostName(self) -> None:
        """
        Unlike nginx, C{Auth-Server} may be a host name, and an IPv6 literal
        is named in brackets.
        """
        route = self.answer([("Auth-Status", "OK"), ("Auth-Server", "imap3.internal"), ("Auth-Port", "143")])
        self.assertEqual(route.backend.host, "imap3.internal")
        route = self.answer([("Auth-Status", "OK"), ("Auth-Server", "2001:db8::5"), ("Auth-Port", "143")])
        self.assertEqual((route.backend.host, route.backend.name), ("2001:db8::5", "[2001:db8::5]:143"))

    def test_okConfiguredAddress(self) -> None:
        """
        An address and port that a configured backend has for the protocol
        is that backend, with all its settings (TLS, forwarding).
        """
        route = self.answer([("Auth-Status", "OK"), ("Auth-Server", "10.0.0.1"), ("Auth-Port", "143")])
        self.assertIs(route.backend, OLD)
        route = self.answer(
            [("Auth-Status", "OK"), ("Auth-Server", "10.0.0.1"), ("Auth-Port", "110")],
            login(protocol="pop3"),
        )
        self.assertIs(route.backend, OLD)

    def test_mxPorts(self) -> None:
        """
        For SMTP without login (MX) the answer's port is matched against
        configured backends' C{mx} port, and an ad-hoc backend serves it as
        both C{mx} and C{smtp}.
        """
        mx = Backend(name="mx1", host="10.0.0.5", ports={"smtp": 587, "mx": 25})
        self.addCleanup(BACKENDS.pop, "mx1")
        BACKENDS["mx1"] = mx
        request = RouteRequest(protocol="smtp", credentials=None, client=CLIENT, helo="h", mailFrom="", rcptTo="a@b")
        self.server.answers[""] = [("Auth-Status", "OK"), ("Auth-Server", "10.0.0.5"), ("Auth-Port", "25")]
        self.assertIs(result(self.router().route(request)).backend, mx)
        self.server.answers[""] = [("Auth-Status", "OK"), ("Auth-Server", "10.0.0.6"), ("Auth-Port", "2525")]
        self.assertEqual(result(self.router().route(request)).backend.ports, {"mx": 2525, "smtp": 2525})
        self.server.answers[""] = [("Auth-Status", "OK"), ("X-Mailproxy-Backend", "old")]
        self.assertTrue(result(self.router().route(request)).temporary)
        self.assertIn("backend 'old' has no mx port", self.logText())

    def test_backendDefaults(self) -> None:
        """
        Ad-hoc backends take the router's C{backend_defaults}.
        """
        self.defaults = BackendDefaults(tls="implicit", verify=False, forward="proxy-v2", caFile="/ca.pem")
        route = self.answer([("Auth-Status", "OK"), ("Auth-Server", "192.0.2.50"), ("Auth-Port", "993")])
        backend = route.backend
        self.assertEqual((backend.tls, backend.verify, backend.forward, backend.caFile), ("implicit", False, "proxy-v2", "/ca.pem"))

    def test_backendDefaultsPortTLS(self) -> None:
        """
        C{backend_defaults.port_tls} reaches single ports of ad-hoc backends
        otherwise than their C{tls}; an answer that says how to reach the
        backend (C{X-Mailproxy-TLS}) overrides it.
        """
        table = Table("/etc/mp.toml", ("router", "backend_defaults"), {"tls": "starttls", "port_tls": {"mx": "none"}}, "/etc")
        self.defaults = parseBackendDefaults(table)
        route = self.answer([("Auth-Status", "OK"), ("Auth-Server", "192.0.2.50"), ("Auth-Port", "25")])
        self.assertEqual([route.backend.tlsFor(name) for name in ("imap", "mx")], ["starttls", "none"])
        route = self.answer(
            [("Auth-Status", "OK"), ("Auth-Server", "192.0.2.50"), ("Auth-Port", "25"), ("X-Mailproxy-TLS", "implicit")]
        )
        self.assertEqual(route.backend.tlsFor("mx"), "implicit")
        table = Table("/etc/mp.toml", ("router", "backend_defaults"), {"port_tls": {"mx": "plain"}}, "/etc")
        error = self.assertRaises(ConfigError, parseBackendDefaults, table)
        self.assertIn("router.backend_defaults.port_tls.mx: must be one of none, starttls, implicit", str(error))

    def test_extensionBackend(self) -> None:
        """
        C{X-Mailproxy-Backend} names a configured backend; C{Auth-Server}
        and C{Auth-Port} are then not needed.
        """
        route = self.answer([("Auth-Status", "OK"), ("X-Mailproxy-Backend", "new")])
        self.assertIs(route.backend, NEW)

    def test_extensionBackendUnknown(self) -> None:
        """
        An unknown backend name is a temporary failure, logged.
        """
        rejection = self.answer([("Auth-Status", "OK"), ("X-Mailproxy-Backend", "nowhere")])
        self.assertEqual(rejection, Rejection("Service temporarily unavailable, try again later.", temporary=True))
        self.assertIn("no configured backend is named 'nowhere'", self.logText())

    def test_extensionTLSAndForward(self) -> None:
        """
        C{X-Mailproxy-TLS} and C{X-Mailproxy-Forward} set how the ad-hoc
        backend is reached, even at a configured backend's address.
        """
        route = self.answer(
            [
                ("Auth-Status", "OK"),
                ("Auth-Server", "10.0.0.1"),
                ("Auth-Port", "143"),
                ("X-Mailproxy-TLS", "starttls"),
                ("X-Mailproxy-Forward", "proxy-v1"),
            ]
        )
        self.assertEqual((route.backend.name, route.backend.tls, route.backend.forward), ("10.0.0.1:143", "starttls", "proxy-v1"))

    def test_extensionBadValue(self) -> None:
        """
        A value outside the allowed ones is a temporary failure.
        """
        rejection = self.answer(
            [("Auth-Status", "OK"), ("Auth-Server", "10.0.0.1"), ("Auth-Port", "143"), ("X-Mailproxy-TLS", "maybe")]
        )
        self.assertTrue(rejection.temporary)
        self.assertIn("X-Mailproxy-TLS: 'maybe' is not one of none, starttls, implicit", self.logText())

    def test_extensionMaster(self) -> None:
        """
        C{X-Mailproxy-Master: yes} logs in with the backend's master user;
        for a backend without one it is a temporary failure.
        """
        route = self.answer([("Auth-Status", "OK"), ("X-Mailproxy-Backend", "new"), ("X-Mailproxy-Master", "yes")])
        self.assertTrue(route.useMaster)
        rejection = self.answer([("Auth-Status", "OK"), ("X-Mailproxy-Backend", "old"), ("X-Mailproxy-Master", "yes")])
        self.assertTrue(rejection.temporary)

    def test_rewriteLogin(self) -> None:
        """
        C{Auth-User} and C{Auth-Pass} replace the login sent to the backend;
        C{Auth-Pass} is taken raw (nginx does not unescape it either).
        """
        route = self.answer(
            [
                ("Auth-Status", "OK"),
                ("Auth-Server", "10.0.0.1"),
                ("Auth-Port", "143"),
                ("Auth-User", "alice"),
                ("Auth-Pass", "new%20pass"),
            ]
        )
        self.assertEqual((route.user, route.password), ("alice", b"new%20pass"))

    def test_failureCloses(self) -> None:
        """
        Any other C{Auth-Status} refuses with its text, and without
        C{Auth-Wait} the connection is closed after it, as nginx does.
        """
        rejection = self.answer([("Auth-Status", "Invalid login or password")])
        self.assertEqual(rejection, Rejection("Invalid login or password", close=True))

    def test_failureWaits(self) -> None:
        """
        With C{Auth-Wait}, the refusal is delayed that many seconds and the
        session stays open for another try; C{Auth-Wait: 0} or a value that
        is no number closes it.
        """
        rejection = self.answer([("Auth-Status", "Invalid login or password"), ("Auth-Wait", "3")])
        self.assertEqual(rejection, Rejection("Invalid login or password", wait=3.0))
        for wait in ("0", "soon", "-1"):
            rejection = self.answer([("Auth-Status", "No"), ("Auth-Wait", wait)])
            self.assertEqual(rejection, Rejection("No", close=True))

    def test_errorCodeTemporary(self) -> None:
        """
        An SMTP C{Auth-Error-Code} in the 4xx class makes the refusal
        temporary; a 5xx one does not.
        """
        rejection = self.answer([("Auth-Status", "Try later"), ("Auth-Error-Code", "451 4.3.0"), ("Auth-Wait", "1")])
        self.assertEqual(rejection, Rejection("Try later", wait=1.0, temporary=True))
        rejection = self.answer([("Auth-Status", "No"), ("Auth-Error-Code", "535 5.7.8"), ("Auth-Wait", "1")])
        self.assertFalse(rejection.temporary)

    def test_unknownRecipient(self) -> None:
        """
        An C{Auth-Error-Code} with C{5.1.1} marks the refusal as an unknown
        user (SMTP MX answers C{550 5.1.1} instead of relay denied).
        """
        rejection = self.answer([("Auth-Status", "No such user"), ("Auth-Error-Code", "550 5.1.1"), ("Auth-Wait", "1")])
        self.assertEqual(rejection, Rejection("No such user", wait=1.0, reason="unknown-user"))

    def test_recipientRefusalKeepsSession(self) -> None:
        """
        A refused MX recipient does not end the session, with or without
        C{Auth-Wait}: the router asks about every recipient (nginx asks once
        per session, so its close after a refusal ends only that), and the
        sender goes on with the others.
        """
        request = RouteRequest(protocol="smtp", credentials=None, client=CLIENT, rcptTo="zed@example.org", lookup="recipient")
        self.server.answers[""] = [("Auth-Status", "User unknown"), ("Auth-Error-Code", "550 5.1.1")]
        rejection = result(self.router().route(request))
        self.assertEqual(rejection, Rejection("User unknown", reason="unknown-user"))

    def test_extensionFailureFlags(self) -> None:
        """
        C{X-Mailproxy-Unknown} and C{X-Mailproxy-Temporary} mark a refusal.
        """
        rejection = self.answer(
            [("Auth-Status", "No such user"), ("X-Mailproxy-Unknown", "yes"), ("Auth-Wait", "1")]
        )
        self.assertEqual(rejection, Rejection("No such user", wait=1.0, unknown=True))
        rejection = self.answer([("Auth-Status", "LDAP down"), ("X-Mailproxy-Temporary", "yes")])
        self.assertEqual(rejection, Rejection("LDAP down", temporary=True, close=True))

    def test_lastHeaderCounts(self) -> None:
        """
        When a header comes twice, the last one counts, as in nginx; header
        names are compared without case.  Not for C{Auth-Status}: as in
        nginx, a refusal anywhere among them refuses, even before an C{OK}
        (an auth script that adds an OK to a refusal must not let a wrong
        password in).
        """
        rejection = self.answer(
            [("Auth-Status", "Invalid login or password"), ("Auth-Server", "10.0.0.7"), ("Auth-Port", "1"), ("Auth-Status", "OK")]
        )
        self.assertEqual(rejection, Rejection("Invalid login or password", close=True))
        for statuses in (("Invalid login", "WAIT"), ("WAIT", "Invalid login")):
            rejection = self.answer([("Auth-Status", status) for status in statuses])
            self.assertEqual(rejection, Rejection("Invalid login", close=True), statuses)
        route = self.answer(
            [
                ("AUTH-STATUS", "OK"),
                ("auth-status", "OK"),
                ("Auth-Server", "10.0.0.7"),
                ("Auth-Port", "1"),
                ("auth-port", "2"),
            ]
        )
        self.assertEqual(route.backend.name, "10.0.0.7:2")

    def test_missingServerOrPort(self) -> None:
        """
        C{OK} without C{Auth-Server} or C{Auth-Port}, or with a bad port, is
        a temporary failure (nginx: internal server error).
        """
        for headers in (
            [("Auth-Status", "OK"), ("Auth-Port", "143")],
            [("Auth-Status", "OK"), ("Auth-Server", "10.0.0.1")],
            [("Auth-Status", "OK"), ("Auth-Server", "10.0.0.1"), ("Auth-Port", "70000")],
            [("Auth-Status", "OK"), ("Auth-Server", "10.0.0.1"), ("Auth-Port", "+143")],
            [("Auth-Status", "OK"), ("Auth-Server", "bad host!"), ("Auth-Port", "143")],
            [("Auth-Status", "OK"), ("Auth-Server", "10.0.0.1:25"), ("Auth-Port", "143")],
        ):
            rejection = self.answer(headers)
            self.assertEqual(rejection, Rejection("Service temporarily unavailable, try again later.", temporary=True), headers)

    def test_missingStatus(self) -> None:
        """
        An answer without C{Auth-Status} (an error page from something in
        between) is a temporary failure, even with a server and port.
        """
        rejection = self.answer([("Auth-Server", "10.0.0.1"), ("Auth-Port", "143")])
        self.assertTrue(rejection.temporary)
        self.assertIn("without Auth-Status", self.logText())

    def test_waitAsksAgain(self) -> None:
        """
        C{Auth-Status: WAIT} asks the same question again after
        C{Auth-Wait} seconds.
        """
        self.server.answers["alice@example.org"] = [
            [("Auth-Status", "WAIT"), ("Auth-Wait", "2")],
            [("Auth-Status", "OK"), ("Auth-Server", "10.0.0.1"), ("Auth-Port", "143")],
        ]
        d = self.router().route(login())
        self.assertNoResult(d)
        self.assertEqual(len(self.server.requests), 1)
        self.clock.advance(2)
        self.assertIs(result(d).backend, OLD)
        self.assertEqual(len(self.server.requests), 2)
        self.assertEqual(self.server.requests[0], self.server.requests[1])

    def test_waitForever(self) -> None:
        """
        An auth server that keeps saying C{WAIT} gets a bounded number of
        questions; then the login fails as temporary.
        """
        self.server.answers["alice@example.org"] = [("Auth-Status", "WAIT")]
        d = self.router().route(login())
        for _ in range(20):
            self.clock.advance(0)
        self.assertTrue(result(d).temporary)
        self.assertEqual(len(self.server.requests), 11)

    def test_timeout(self) -> None:
        """
        An auth server that does not answer within C{timeout} seconds gives
        a temporary failure, logged.
        """
        self.server.delay = True
        d = self.router(timeout=4.0).route(login())
        self.clock.advance(3.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertTrue(result(d).temporary)
        self.assertIn('auth_http http://auth.internal/auth failed for "alice@example.org"', self.logText())

    def test_connectionFailure(self) -> None:
        """
        A failing HTTP client gives a temporary failure; the password is in
        no log line.
        """

        class Failing:
            def get(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                d.errback(ConnectionRefusedError("refused"))
                return d

        router = HTTPRouter(
            "http://auth.internal/auth", BackendResolver({}, BackendDefaults()), reactor=self.clock, client=Failing()
        )
        rejection = result(router.route(login(password=b"hunter2-secret")))
        self.assertEqual(rejection, Rejection("Service temporarily unavailable, try again later.", temporary=True))
        self.assertIn("ConnectionRefusedError", self.logText())
        self.assertNotIn("hunter2", self.logText())

    def test_requestSeenByServer(self) -> None:
        """
        The server sees the escaped values, which it decodes with
        L{unescapeAuth}.
        """
        self.answer([("Auth-Status", "No")], login(password=b"a b"))
        seen = self.server.requests[-1]
        self.assertEqual(seen["auth-pass"], "a%20b")
        self.assertEqual(unescapeAuth(seen["auth-pass"].encode()), b"a b")


class BuildTests(SynchronousTestCase):
    """
    Tests for L{buildHTTPRouter}: options and their errors.
    """

    def build(self, **options: Any) -> HTTPRouter:
        """
        Build from C{options} as the C{[router]} table of C{/etc/mp.toml}.
        """
        return buildHTTPRouter(Table("/etc/mp.toml", ("router",), options, "/etc"), BACKENDS, Clock())

    def assertFails(self, key: str, fragment: str, **options: Any) -> None:
        """
        Building from C{options} fails naming C{key} with C{fragment}.
        """
        error = self.assertRaises(ConfigError, self.build, **options)
        self.assertTrue(str(error).startswith(f"/etc/mp.toml: {key}: "), str(error))
        self.assertIn(fragment, str(error))

    def test_defaults(self) -> None:
        """
        Only C{url} is required; nginx's form without scheme is accepted.
        """
        router = self.build(url="127.0.0.1:9000/auth")
        self.assertEqual((router.url, router.timeout), ("http://127.0.0.1:9000/auth", 10.0))

    def test_options(self) -> None:
        """
        Every option is read.
        """
        router = self.build(
            url="http://auth/x",
            timeout=2,
            headers={"X-Key": "k"},
            connections=3,
            backend_defaults={"tls": "starttls", "ports": {"imap": 1143}},
        )
        self.assertEqual(router.timeout, 2.0)
        self.assertEqual(router.resolver.defaults.tls, "starttls")
        self.assertEqual(router.resolver.defaults.ports["imap"], 1143)
        self.assertEqual(router._extra, ((b"X-Key", b"k"),))

    def test_badOptions(self) -> None:
        """
        Wrong options name their key.
        """
        self.assertFails("router.url", "http:// or https://", url="ftp://x/")
        self.assertFails("router.url", "required")
        self.assertFails("router.colour", "unknown key", url="http://a/", colour=1)
        self.assertFails("router.headers.\"X Bad\"", "not a valid HTTP header name", url="http://a/", headers={"X Bad": "v"})
        self.assertFails("router.headers.Auth-User", "sends this header itself", url="http://a/", headers={"Auth-User": "v"})
        self.assertFails("router.headers.X-A", "control characters", url="http://a/", headers={"X-A": "a\r\nb"})
        self.assertFails("router.timeout", "greater than 0", url="http://a/", timeout=0)
        self.assertFails("router.backend_defaults.tls", "must be one of", url="http://a/", backend_defaults={"tls": "yes"})
        self.assertFails("router.ca_file", "cannot read", url="https://a/", ca_file="/nonexistent/ca.pem")

    def test_credentialsInURL(self) -> None:
        """
        A URL with a user name and password is refused, the password not
        repeated: it would not be sent, and every log line about the auth
        server names the URL. The message says where credentials go.
        """
        for url in ("http://mp:s3cretPw@127.0.0.1:9000/auth", "mp:s3cretPw@127.0.0.1:9000/auth", "https://mp@a/x"):
            error = self.assertRaises(ConfigError, self.build, url=url)
            self.assertTrue(str(error).startswith("/etc/mp.toml: router.url: must not hold a user name"), str(error))
            self.assertIn("headers = { Authorization", str(error))
            self.assertNotIn("s3cretPw", str(error))

    def test_httpsWithCA(self) -> None:
        """
        An C{https} URL with a readable CA file builds.
        """
        from mailproxy._tls import makeSelfSigned

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        certificate, _ = makeSelfSigned(directory, names=("auth.internal",))
        router = self.build(url="https://auth.internal/auth", ca_file=certificate)
        self.assertTrue(router.url.startswith("https://"))
