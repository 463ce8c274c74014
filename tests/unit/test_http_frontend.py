"""
The HTTP front end over in-memory transports: routing by each method, the
routing cookie, the forwarding headers, the refusals, backpressure both
ways, the WebSocket relay, drops, and hostile input.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._backend import BackendProtocol
from mailproxy.http._cookie import readCookie, signCookie
from mailproxy.http._frontend import HTTPFrontend
from mailproxy.interfaces import RouteStoreError
from mailproxy.model import Rejection, Route
from mailproxy.routers.static import StaticRouter
from mailproxy.settings import HTTPSettings, Limits
from mailproxy.testing import FakeRouter, MemoryConnector, TLSStringTransport, makeBackend, makeFrontend

SECRET = b"cookie key"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def head(data: bytes) -> tuple[bytes, dict[bytes, list[bytes]]]:
    """
    The first line and the header fields (names in lower case) of the
    message at the start of C{data}.
    """
    top = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    fields: dict[bytes, list[bytes]] = {}
    for line in top[1:]:
        name, _, value = line.partition(b":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    return top[0], fields


class _ManualConnector(MemoryConnector):
    """
    A connector whose connections are made only when the test says so.
    """

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[BackendProtocol] = []

    def __call__(self, reactor: Any, protocol: BackendProtocol) -> Deferred:
        self.waiting.append(protocol)
        return protocol.result

    def connectNext(self) -> None:
        protocol = self.waiting.pop(0)
        super().__call__(None, protocol)


class HTTPFrontendTestCase(SynchronousTestCase):
    """
    A front end with two backends, "old" (the default) and "new", and a
    router that sends alice to new.
    """

    def setUp(self) -> None:
        self.old = makeBackend("old")
        self.new = makeBackend("new")
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def connect(
        self,
        router: Any = None,
        connector: MemoryConnector | None = None,
        limits: Limits | None = None,
        **settings: Any,
    ) -> None:
        self.router = router if router is not None else FakeRouter({"alice": Route(self.new)})
        self.connector = connector if connector is not None else MemoryConnector()
        settings.setdefault("defaultBackend", "old")
        self.settings = HTTPSettings(cookieSecret=SECRET, **settings)
        frontend, self.client, self.clock = makeFrontend(
            "http", self.router, self.connector, limits=limits or Limits(failureDelay=0), http=self.settings
        )
        assert isinstance(frontend, HTTPFrontend)
        self.frontend = frontend
        frontend.context.backends.update({"old": self.old, "new": self.new})

    def send(self, data: bytes) -> bytes:
        self.client.clear()
        self.frontend.dataReceived(data)
        return self.client.value()

    def backendSays(self, data: bytes, index: int = -1) -> bytes:
        self.client.clear()
        self.connector.protocols[index].dataReceived(data)
        return self.client.value()

    def backendGot(self, index: int = -1) -> bytes:
        return self.connector.transports[index].value()


class RoutingTests(HTTPFrontendTestCase):
    """
    Each request goes where its pinned path, its credentials, its cookie or
    the default say.
    """

    def test_basicRewritten(self) -> None:
        """
        Basic credentials go to the router as a login; the request goes to
        the routed backend with the user and password the route says, and
        its response (with a signed, HttpOnly, Secure, SameSite=Lax cookie)
        to the client.
        """
        self.connect(FakeRouter({"alice": Route(self.new, user="alice@new", password=b"other")}))
        self.send(b"GET /jmap/session HTTP/1.1\r\nHost: mail.example\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n")
        request = self.router.requests[0]
        self.assertEqual((request.protocol, request.port, request.lookup), ("http", "http", "login"))
        self.assertEqual((request.credentials.user, request.credentials.password), ("alice", b"pw"))
        self.assertEqual(self.connector.protocols[0].job.backend.name, "new")
        line, fields = head(self.backendGot())
        self.assertEqual(line, b"GET /jmap/session HTTP/1.1")
        self.assertEqual(fields[b"authorization"], [basic("alice@new", "other")])
        self.assertEqual(fields[b"host"], [b"mail.example"])
        answer = self.backendSays(OK)
        line, fields = head(answer)
        self.assertEqual(line, b"HTTP/1.1 200 OK")
        self.assertTrue(answer.endswith(b"\r\n\r\nhello"))
        (cookie,) = fields[b"set-cookie"]
        value, _, attributes = cookie.partition(b";")
        self.assertEqual(attributes, b" Path=/; Secure; HttpOnly; SameSite=Lax")
        name, _, signed = value.partition(b"=")
        self.assertEqual(name, b"mailproxy_backend")
        # The account it names is the login name, as a move names it.
        self.assertEqual(readCookie(SECRET, signed, self.clock.seconds()), ("new", "alice"))
        self.assertEqual(self.frontend.user, "alice")

    def test_sameCredentialsReuseRoute(self) -> None:
        """
        A keep-alive connection that sends the same credentials again is
        not routed again and keeps its backend connection; the cookie is
        set only on the first response.
        """
        self.connect()
        request = b"GET /a HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n"
        self.send(request)
        self.backendSays(OK)
        self.connector.transports[0].clear()
        self.send(request)
        self.assertEqual(len(self.router.requests), 1)
        self.assertEqual(len(self.connector.protocols), 1)
        self.assertTrue(self.backendGot().startswith(b"GET /a HTTP/1.1\r\n"))
        self.assertNotIn(b"set-cookie", head(self.backendSays(OK))[1])
        self.assertEqual(self.frontend.requests, 2)

    def test_backend401Untouched(self) -> None:
        """
        A locating router's route is taken; the backend's 401 reaches the
        client as the backend worded it.
        """
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "wrong") + b"\r\n\r\n")
        answer = self.backendSays(
            b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="cyrus"\r\nContent-Length: 9\r\n\r\nNo, no.\r\n'
        )
        line, fields = head(answer)
        self.assertEqual(line, b"HTTP/1.1 401 Unauthorized")
        self.assertEqual(fields[b"www-authenticate"], [b'Basic realm="cyrus"'])
        self.assertTrue(answer.endswith(b"\r\n\r\nNo, no.\r\n"))

    def test_backend401Delayed(self) -> None:
        """
        The backend's 401 to routed credentials is a failed login: logged
        for fail2ban, counted, and passed on (untouched) only after the
        failed-login delay, as the router's refusal would be, without the
        routing cookie; the backend is not read meanwhile.
        """
        self.connect(limits=Limits(failureDelay=2.0))
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "wrong-pw") + b"\r\n\r\n")
        self.clock.advance(0.5)
        refusal = b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="cyrus"\r\nContent-Length: 4\r\n\r\nNo.\n'
        self.assertEqual(self.backendSays(refusal), b"")
        self.assertEqual(self.connector.transports[0].producerState, "paused")
        self.clock.advance(1.4)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(0.1)
        answer = self.client.value()
        self.assertEqual(head(answer)[0], b"HTTP/1.1 401 Unauthorized")
        self.assertTrue(answer.endswith(b"\r\n\r\nNo.\n"))
        # No routing cookie naming where alice lives.
        self.assertNotIn(b"set-cookie", head(answer)[1])
        self.assertEqual(self.connector.transports[0].producerState, "producing")
        failed = [event for event in self.events if event.get("event") == "login_failed"]
        self.assertEqual([(event["protocol"], event["user"]) for event in failed], [("http", '"alice"')])
        self.assertNotIn("wrong-pw", repr(self.events))
        self.assertEqual(self.frontend.failures, 1)
        self.assertEqual(dict(self.frontend.context.stats.logins), {("http", "new", "auth"): 1})
        # Its session ends as one whose login failed, as after the
        # router's refusal.
        self.frontend.connectionLost(Failure(Exception("gone")))
        (end,) = [event for event in self.events if event.get("event") == "session_end"]
        self.assertEqual(end["result"], "failed")

    def test_responseForgivesNothing(self) -> None:
        """
        A backend's answer other than 401 is no proof of the password (a
        backend may answer a request without checking it): it forgives no
        failed login of the address or the account.
        """
        from mailproxy._shared import accountKey, pairKey

        self.connect(limits=Limits(failureDelay=1.0))
        failures = self.frontend.context.failures
        address = self.frontend.client.address
        for key in (address, accountKey("alice"), pairKey(address, "alice")):
            failures.failed(key)
        self.send(b"OPTIONS / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "wrong") + b"\r\n\r\n")
        self.clock.advance(1.0)
        self.assertEqual(head(self.backendSays(OK))[0], b"HTTP/1.1 200 OK")
        self.assertEqual([failures.recent(key) for key in (address, accountKey("alice"), pairKey(address, "alice"))], [1, 1, 1])

    def test_rightPasswordAfterFailureWaits(self) -> None:
        """
        After a failed login, the next login's request goes to the backend
        only once a wrong password's refusal would have been answered: a
        client that drops the connection when no answer came at once
        learns nothing about its guess before the delay.
        """
        self.connect(limits=Limits(failureDelay=2.0))
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "wrong-pw") + b"\r\n\r\n")
        self.backendSays(b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="x"\r\nContent-Length: 0\r\n\r\n')
        self.clock.advance(2.0)
        self.assertEqual(head(self.client.value())[0], b"HTTP/1.1 401 Unauthorized")
        connections = len(self.connector.transports)
        self.send(b"GET /inbox HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n")
        self.clock.advance(1.9)
        self.assertFalse(any(b"GET /inbox" in transport.value() for transport in self.connector.transports))
        self.clock.advance(0.1)
        self.assertEqual(len(self.connector.transports), connections + 1)
        self.assertIn(b"GET /inbox HTTP/1.1\r\n", self.connector.transports[-1].value())

    def test_loginCountedByResponse(self) -> None:
        """
        A routed login counts as accepted once the backend answered its
        first request with anything but 401; later requests of the login
        count no more.
        """
        self.connect()
        request = b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n"
        self.send(request)
        self.assertEqual(dict(self.frontend.context.stats.logins), {})
        self.backendSays(OK)
        self.send(request)
        self.backendSays(OK)
        self.assertEqual(dict(self.frontend.context.stats.logins), {("http", "new", "ok"): 1})

    def test_routerRefusal(self) -> None:
        """
        An authenticating router's refusal is the proxy's 401 with its
        Basic challenge, after the failed-login delay, for an unknown user
        as for a wrong password; the fail2ban line is logged without the
        password.
        """
        self.connect(FakeRouter({}), limits=Limits(failureDelay=2.0))
        answer = self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("mallory", "s3cret-pw") + b"\r\n\r\n")
        self.assertEqual(answer, b"")
        self.clock.advance(1.9)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(0.1)
        line, fields = head(self.client.value())
        self.assertEqual(line, b"HTTP/1.1 401 Unauthorized")
        self.assertEqual(fields[b"www-authenticate"], [b'Basic realm="mail"'])
        self.assertEqual(self.connector.protocols, [])
        failed = [event for event in self.events if event.get("event") == "login_failed"]
        self.assertEqual([(event["protocol"], event["user"]) for event in failed], [("http", '"mallory"')])
        self.assertNotIn("s3cret-pw", repr(self.events))

    def test_tooManyFailures(self) -> None:
        """
        After login_failures refusals on one connection, the 401 closes
        it, as a mail session ends.
        """
        self.connect(FakeRouter({}), limits=Limits(failureDelay=0, loginFailures=2))
        request = b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("mallory", "x") + b"\r\n\r\n"
        self.assertTrue(self.send(request).startswith(b"HTTP/1.1 401 "))
        self.assertFalse(self.client.disconnecting)
        line, fields = head(self.send(request))
        self.assertEqual((line, fields[b"connection"]), (b"HTTP/1.1 401 Unauthorized", [b"close"]))
        self.assertTrue(self.client.disconnecting)

    def test_routerDown(self) -> None:
        """
        A router that fails answers 503 with Retry-After at once.
        """

        class Broken:
            def route(self, request: object) -> Deferred:
                return fail(RuntimeError("database down"))

        self.connect(Broken())
        line, fields = head(self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n"))
        self.assertEqual(line, b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(fields[b"retry-after"], [b"5"])
        self.flushLoggedErrors(RuntimeError)

    def test_deadBackend(self) -> None:
        """
        A backend that cannot be reached answers 503 with Retry-After at
        once, with credentials or without.
        """
        connector = MemoryConnector()
        connector.refuse = True
        self.connect(connector=connector)
        line, fields = head(self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n"))
        self.assertEqual((line, fields[b"retry-after"]), (b"HTTP/1.1 503 Service Unavailable", [b"5"]))
        line, fields = head(self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
        self.assertEqual((line, fields[b"retry-after"]), (b"HTTP/1.1 503 Service Unavailable", [b"5"]))

    def test_pinnedCredentialsRefusedCount(self) -> None:
        """
        Credentials sent to a pinned path go to the pinned backend as
        they are, and its 401 to them is a failed login: after
        C{login_failures} of them the connection is closed, so a pinned
        login page takes no unlimited guesses on one connection.
        """
        self.connect(pins=(("/login", "old"),), limits=Limits(failureDelay=0, loginFailures=2))
        refusal = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nWWW-Authenticate: Basic realm=x\r\n\r\n"
        answers = []
        for _ in range(2):
            self.send(b"GET /login HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "guess") + b"\r\n\r\n")
            self.assertEqual(head(self.backendGot())[1][b"authorization"], [basic("alice", "guess")])
            answers.append(self.backendSays(refusal))
            self.assertEqual(answers[-1][: len(b"HTTP/1.1 401")], b"HTTP/1.1 401")
        self.assertEqual(self.frontend.failures, 2)
        self.assertTrue(self.client.disconnecting)
        # The last response says the connection closes (RFC 9112 9.6).
        self.assertNotIn(b"connection", head(answers[0])[1])
        self.assertEqual(head(answers[1])[1][b"connection"], [b"close"])

    def test_bearerUnplacedGoesToDefault(self) -> None:
        """
        A bearer token the router does not know (a table of accounts,
        which cannot place tokens) goes to the default backend unchanged,
        which judges it; no failed login is counted for it.
        """
        self.connect(FakeRouter({"alice": Route(self.new)}, default=Rejection(unknown=True)))
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer tok-x\r\n\r\n")
        self.assertEqual(self.connector.protocols[-1].job.backend.name, "old")
        self.assertEqual(head(self.backendGot())[1][b"authorization"], [b"Bearer tok-x"])
        self.assertEqual(self.frontend.failures, 0)
        self.assertEqual(self.backendSays(OK)[: len(b"HTTP/1.1 200")], b"HTTP/1.1 200")

    def test_bearerRefusedStaysRefused(self) -> None:
        """
        A token the router knows and refuses (not "unknown") gets the
        proxy's 401, and no backend is asked.
        """

        class Refusing:
            def route(self, request: Any) -> Rejection:
                return Rejection()

        self.connect(Refusing())
        line, fields = head(self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer tok-x\r\n\r\n"))
        self.assertEqual((line, fields[b"www-authenticate"]), (b"HTTP/1.1 401 Unauthorized", [b'Bearer error="invalid_token"']))
        self.assertEqual(self.connector.protocols, [])

    def test_bearer(self) -> None:
        """
        A bearer token goes to the router (no user named); the account the
        route names is the session's, and the token goes to the backend
        unchanged.
        """

        class ByToken:
            def __init__(self, backend: Any) -> None:
                self.backend = backend
                self.requests: list[Any] = []

            def route(self, request: Any) -> Route | Rejection:
                self.requests.append(request)
                if request.credentials.token == b"tok-bob":
                    return Route(self.backend, user="bob@example.org")
                return Rejection()

        self.connect(ByToken(self.new))
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer tok-bob\r\n\r\n")
        credentials = self.router.requests[0].credentials
        self.assertEqual((credentials.mechanism, credentials.user, credentials.token), ("OAUTHBEARER", "", b"tok-bob"))
        self.assertEqual(head(self.backendGot())[1][b"authorization"], [b"Bearer tok-bob"])
        self.assertEqual(self.frontend.user, "bob@example.org")
        self.assertEqual(self.frontend.context.sessions.find(account="bob@example.org"), [self.frontend])
        self.backendSays(OK)
        line, fields = head(self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer tok-eve\r\n\r\n"))
        self.assertEqual((line, fields[b"www-authenticate"]), (b"HTTP/1.1 401 Unauthorized", [b'Bearer error="invalid_token"']))

    def test_masterUser(self) -> None:
        """
        A route through the master user sends the master's credentials and
        names the account in Authorize-As; the client cannot send its own
        Authorize-As.
        """
        master = makeBackend("new", masterUser="proxy", masterPassword=b"mpw")
        self.connect(FakeRouter({"alice": Route(master, useMaster=True)}))
        self.send(
            b"GET / HTTP/1.1\r\nHost: h\r\nAuthorize-As: admin\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n"
        )
        fields = head(self.backendGot())[1]
        self.assertEqual(fields[b"authorization"], [basic("proxy", "mpw")])
        self.assertEqual(fields[b"authorize-as"], [b"alice"])

    def test_noCredentialsDefault(self) -> None:
        """
        A request without credentials or cookie goes to the default backend;
        the router is not asked.
        """
        self.connect()
        self.send(b"GET /.well-known/jmap HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(self.router.requests, [])
        self.assertEqual(self.connector.protocols[0].job.backend.name, "old")

    def test_pinnedPath(self) -> None:
        """
        A pinned path prefix goes to its backend, credentials or not, and
        the longest prefix wins; other paths are routed as usual.
        """
        self.connect(pins=(("/login/new", "new"), ("/login", "old")))
        self.send(b"GET /login/form HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n")
        self.assertEqual(self.router.requests, [])
        self.assertEqual(self.connector.protocols[-1].job.backend.name, "old")
        self.backendSays(OK)
        self.send(b"GET /login/new/x HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(self.connector.protocols[-1].job.backend.name, "new")

    def test_pinnedPathNormalised(self) -> None:
        """
        A pin matches the path as a backend resolves it: doubled slashes,
        dot segments, percent-encoding and the absolute form all reach the
        pinned backend, and a path that only looks like the prefix before
        it is resolved does not.
        """
        self.connect(pins=(("/login", "old"),))
        for target in (b"//login", b"/%6Cogin", b"/./login/form", b"/x/../login", b"http://h/login", b"/LOGIN/../login"):
            self.send(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n")
            self.assertEqual((target, self.connector.protocols[-1].job.backend.name), (target, "old"))
            self.assertEqual(self.router.requests, [])
            self.backendSays(OK)
        self.send(b"GET /login/../inbox HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n")
        self.assertEqual(len(self.router.requests), 1)

    def test_cookieRoutes(self) -> None:
        """
        The cookie set on an authenticated response sends a later request
        without credentials, on another connection, to the same backend,
        and that session counts as the account's.
        """
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n")
        cookie = head(self.backendSays(OK))[1][b"set-cookie"][0].split(b";")[0]
        self.connect()
        self.send(b"GET /ui HTTP/1.1\r\nHost: h\r\nCookie: theme=dark; " + cookie + b"\r\n\r\n")
        self.assertEqual(self.connector.protocols[0].job.backend.name, "new")
        self.assertEqual(self.router.requests, [])
        self.assertEqual(self.frontend.context.sessions.find(account="alice"), [self.frontend])

    def test_forgedCookie(self) -> None:
        """
        A cookie not signed with the proxy's key, altered, or too old is
        ignored: the default backend gets the request.
        """
        now = 1_000_000.0
        forged = signCookie(b"another key", "new", "alice", now)
        genuine = signCookie(SECRET, "new", "alice", now)
        altered = genuine.replace(b"bmV3", b"b2xk")
        for value, advance in ((forged, 0.0), (altered, 0.0), (genuine, 8 * 86400.0)):
            self.connect(keepaliveTimeout=1e9)
            self.clock.advance(now + advance)
            self.send(b"GET / HTTP/1.1\r\nHost: h\r\nCookie: mailproxy_backend=" + value + b"\r\n\r\n")
            self.assertEqual(self.connector.protocols[0].job.backend.name, "old", value)
        self.connect(keepaliveTimeout=1e9)
        self.clock.advance(now)
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nCookie: mailproxy_backend=" + genuine + b"\r\n\r\n")
        self.assertEqual(self.connector.protocols[0].job.backend.name, "new")


class CookieMoveTests(HTTPFrontendTestCase):
    """
    A routing cookie routes to its account's backend as the router places
    the account now: an operator's move is not undone by a cookie issued
    before it.
    """

    def staticRouter(self) -> StaticRouter:
        """
        A static route table (alice on new, the rest on old) that changes
        as a move changes it.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('default = "old"\n[accounts]\n"alice" = "new"\n')
        self.clock = Clock()
        return StaticRouter(path, {"old": self.old, "new": self.new}, reactor=self.clock)

    def cookieFor(self, router: Any) -> bytes:
        """
        Log alice in on a first connection; the routing cookie her
        response sets (name=value).
        """
        self.connect(router, keepaliveTimeout=1e9)
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n")
        self.assertEqual(self.connector.protocols[-1].job.backend.name, "new")
        cookie: bytes = head(self.backendSays(OK))[1][b"set-cookie"][0].split(b";")[0]
        return cookie

    def test_cookieFollowsMove(self) -> None:
        """
        After alice is moved from new to old, a request that carries only
        the cookie issued before the move goes to old, and the log says
        why; one on the route the cookie names still goes there.
        """
        router = self.staticRouter()
        cookie = self.cookieFor(router)
        self.successResultOf(router.setRoute("alice", "old"))
        self.connect(router, keepaliveTimeout=1e9)
        self.events.clear()
        self.send(b"GET /mail HTTP/1.1\r\nHost: h\r\nCookie: " + cookie + b"\r\n\r\n")
        self.assertEqual([p.job.backend.name for p in self.connector.protocols], ["old"])
        self.assertEqual(self.frontend.user, "alice")
        self.assertIn(
            'routing cookie names new for "alice", routed to old now',
            [formatEvent(event).partition(":")[0] for event in self.events],
        )
        self.successResultOf(router.setRoute("alice", "new"))
        self.connect(router, keepaliveTimeout=1e9)
        self.send(b"GET /mail HTTP/1.1\r\nHost: h\r\nCookie: " + cookie + b"\r\n\r\n")
        self.assertEqual([p.job.backend.name for p in self.connector.protocols], ["new"])

    def test_askedOncePerConnection(self) -> None:
        """
        The router is asked about the cookie's account once per connection:
        the next request with the same cookie keeps the answer and the
        backend connection.
        """
        router = self.staticRouter()
        cookie = self.cookieFor(router)
        asked: list[str] = []
        explain = router.explainRoute

        def counted(user: str) -> tuple[str, str] | None:
            asked.append(user)
            return explain(user)

        router.explainRoute = counted  # type: ignore[method-assign]
        self.connect(router, keepaliveTimeout=1e9)
        for _ in range(3):
            self.send(b"GET /mail HTTP/1.1\r\nHost: h\r\nCookie: " + cookie + b"\r\n\r\n")
            self.backendSays(OK)
        self.assertEqual(asked, ["alice"])
        self.assertEqual([p.job.backend.name for p in self.connector.protocols], ["new"])

    def test_routerCannotTell(self) -> None:
        """
        A router that cannot place an account without its password, or
        that fails, leaves the cookie's backend.
        """
        cookie = self.cookieFor(FakeRouter({"alice": Route(self.new)}))

        class Failing(FakeRouter):
            def explainRoute(self, user: str) -> Deferred[None]:
                return fail(RouteStoreError("SQL: the lookup failed: the database is gone"))

        for router in (FakeRouter({"alice": Route(self.new)}), Failing({"alice": Route(self.new)})):
            self.connect(router, keepaliveTimeout=1e9)
            self.send(b"GET / HTTP/1.1\r\nHost: h\r\nCookie: " + cookie + b"\r\n\r\n")
            self.assertEqual([p.job.backend.name for p in self.connector.protocols], ["new"])

    def test_sessionEndsWhileAsked(self) -> None:
        """
        A client that goes away while the router is asked about its cookie
        gets no backend connection.
        """
        cookie = self.cookieFor(FakeRouter({"alice": Route(self.new)}))
        answer: Deferred[tuple[str, str]] = Deferred()

        class Slow(FakeRouter):
            def explainRoute(self, user: str) -> Deferred[tuple[str, str]]:
                return answer

        self.connect(Slow(), keepaliveTimeout=1e9)
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nCookie: " + cookie + b"\r\n\r\n")
        self.frontend.connectionLost(Failure(ConnectionDone()))
        answer.callback(("accounts['alice']", "new"))
        self.assertEqual(self.connector.protocols, [])


class ForwardingTests(HTTPFrontendTestCase):
    """
    The backend learns the client from the proxy only.
    """

    def test_headersReplaced(self) -> None:
        """
        Forwarded, X-Forwarded-* and X-Real-IP from the client are removed;
        the proxy's Forwarded and X-Forwarded-For/-Proto/-Host name the
        client it saw.
        """
        self.connect()
        self.send(
            b"GET / HTTP/1.1\r\nHost: mail.example\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n"
            b"X-Real-IP: 6.6.6.6\r\nx-forwarded-host: evil\r\nX-Forwarded-Proto: https\r\n\r\n"
        )
        sent = self.backendGot()
        self.assertNotIn(b"6.6.6.6", sent)
        self.assertNotIn(b"evil", sent)
        fields = head(sent)[1]
        self.assertEqual(fields[b"forwarded"], [b'for="192.0.2.10:50000";proto=http;host="mail.example"'])
        self.assertEqual(fields[b"x-forwarded-for"], [b"192.0.2.10"])
        self.assertEqual(fields[b"x-forwarded-proto"], [b"http"])
        self.assertEqual(fields[b"x-forwarded-host"], [b"mail.example"])
        self.assertNotIn(b"x-real-ip", fields)

    def test_underscoreSpellingsRemoved(self) -> None:
        """
        A field the proxy removes or sets, spelled with underscores, is
        removed too (a CGI or WSGI backend reads C{X_Forwarded_For} as
        C{HTTP_X_FORWARDED_FOR}), as are the client-IP fields other proxies
        set; a field that collides with none of them passes.
        """
        self.connect()
        self.send(
            b"GET / HTTP/1.1\r\nHost: mail.example\r\nX_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\n"
            b"X-Real_IP: 6.6.6.6\r\nx_forwarded_host: evil\r\nFORWARDED: for=6.6.6.6\r\nAuthorize_As: bob\r\n"
            b"X-Client-IP: 6.6.6.6\r\nClient_IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\n"
            b"X-Cluster-Client-IP: 6.6.6.6\r\nX-Forwarded: for=6.6.6.6\r\nForwarded_For: 6.6.6.6\r\n"
            b"Content_Length: 7\r\nTransfer_Encoding: chunked\r\n"
            b"Connection: x_hop\r\nX-Hop: 1\r\nMy_Field: kept\r\n\r\n"
        )
        sent = self.backendGot()
        self.assertNotIn(b"6.6.6.6", sent)
        self.assertNotIn(b"evil", sent)
        fields = head(sent)[1]
        self.assertEqual(fields[b"x-forwarded-for"], [b"192.0.2.10"])
        self.assertEqual(fields[b"x-forwarded-host"], [b"mail.example"])
        self.assertEqual(fields[b"my_field"], [b"kept"])
        spelled = {name.replace(b"_", b"-") for name in fields}
        self.assertFalse(spelled & {b"x-real-ip", b"authorize-as", b"content-length", b"transfer-encoding", b"x-hop"})

    def test_absoluteForm(self) -> None:
        """
        An absolute-form target goes to the backend in origin form, its
        authority the Host whatever Host the client sent (RFC 9112 section
        3.2.2): the target, the Host and the forwarding headers never
        disagree.
        """
        self.connect()
        self.send(b"GET http://evil.example/login?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        top, fields = head(self.backendGot())
        self.assertEqual(top, b"GET /login?x=1 HTTP/1.1")
        self.assertEqual(fields[b"host"], [b"evil.example"])
        self.assertEqual(fields[b"x-forwarded-host"], [b"evil.example"])
        self.assertIn(b'host="evil.example"', fields[b"forwarded"][0])
        for target, sent in (
            (b"HTTPS://mail.example:8443?q", b"GET /?q"),
            (b"http://mail.example", b"GET /"),
        ):
            self.connect()
            self.send(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            top, fields = head(self.backendGot())
            self.assertEqual(top, sent + b" HTTP/1.1")
            self.assertEqual(fields[b"host"], [target.split(b"//")[1].split(b"?")[0]])
        self.connect()
        self.send(b"OPTIONS http://mail.example HTTP/1.1\r\nHost: mail.example\r\n\r\n")
        self.assertEqual(head(self.backendGot())[0], b"OPTIONS * HTTP/1.1")

    def test_absoluteFormPinned(self) -> None:
        """
        A pin applies to the path of an absolute-form target.
        """
        self.connect(pins=[("/login", "new")])
        self.send(b"GET http://mail.example//login HTTP/1.1\r\nHost: mail.example\r\n\r\n")
        self.assertEqual(self.connector.protocols[0].job.backend.name, "new")
        self.assertEqual(head(self.backendGot())[0], b"GET //login HTTP/1.1")

    def test_connectionNamesHost(self) -> None:
        """
        A field the client names in Connection is not passed on, but Host
        is never one of them: the backend gets the client's Host.
        """
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: mail.example\r\nConnection: host, x-hop\r\nX-Hop: 1\r\n\r\n")
        fields = head(self.backendGot())[1]
        self.assertEqual(fields[b"host"], [b"mail.example"])
        self.assertNotIn(b"x-hop", fields)

    def test_forwardNone(self) -> None:
        """
        A backend with forward = "none" learns nothing of the client, and
        still gets none of the client's claims.
        """
        self.old = makeBackend("old", forward="none")
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        fields = head(self.backendGot())[1]
        self.assertFalse({b"forwarded", b"x-forwarded-for"} & set(fields))

    def test_proxyHeader(self) -> None:
        """
        A backend with forward = "proxy-v1" gets the PROXY header first,
        then the request with the forwarding headers.
        """
        self.old = makeBackend("old", forward="proxy-v1")
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        sent = self.backendGot()
        self.assertTrue(sent.startswith(b"PROXY TCP4 192.0.2.10 192.0.2.1 50000 143\r\nGET / HTTP/1.1\r\n"))
        self.assertEqual(head(sent.split(b"\r\n", 1)[1])[1][b"x-forwarded-for"], [b"192.0.2.10"])


class StreamingTests(HTTPFrontendTestCase):
    """
    Bodies are passed on as they come, and each side's full buffer pauses
    the other.
    """

    def test_uploadStreamed(self) -> None:
        """
        A request body is written to the backend chunk by chunk as it
        arrives, the framing kept: Content-Length as is, chunked re-chunked.
        """
        self.connect()
        self.send(b"PUT /blob HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n01234")
        self.assertTrue(self.backendGot().endswith(b"Content-Length: 10\r\n\r\n01234"))
        self.send(b"56789")
        self.assertTrue(self.backendGot().endswith(b"\r\n\r\n0123456789"))
        self.backendSays(OK)
        self.connector.transports[0].clear()
        self.send(b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.assertTrue(self.backendGot().endswith(b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"))
        self.send(b"0\r\n\r\n")
        self.assertTrue(self.backendGot().endswith(b"3\r\nabc\r\n0\r\n\r\n"))

    def test_uploadBackpressure(self) -> None:
        """
        While the backend's send buffer is full the client is not read;
        reading resumes once the backend's buffer drains.
        """
        self.connect()
        self.send(b"PUT /blob HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        backend = self.connector.transports[0]
        self.assertEqual(self.client.producerState, "producing")
        backend.producer.pauseProducing()
        self.assertEqual(self.client.producerState, "paused")
        backend.producer.resumeProducing()
        self.assertEqual(self.client.producerState, "producing")

    def test_uploadPausedAgain(self) -> None:
        """
        A client resumed by something else (the channel, between its
        replies) while the backend's buffer is still full is paused again
        when the backend's transport says so again.
        """
        self.connect()
        self.send(b"PUT /blob HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        backend = self.connector.transports[0]
        backend.producer.pauseProducing()
        self.client.resumeProducing()
        self.send(b"x" * 1000)
        backend.producer.pauseProducing()
        self.assertEqual(self.client.producerState, "paused")

    def test_nextResponseWhileClientBusy(self) -> None:
        """
        A response that starts while the client is still not reading the
        one before does not read its backend until the client drains.
        """
        self.connect()
        self.send(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = self.connector.transports[0]
        self.backendSays(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
        self.client.producer.pauseProducing()
        self.backendSays(b"abc")
        self.send(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
        self.backendSays(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        self.assertEqual(backend.producerState, "paused")
        self.client.producer.resumeProducing()
        self.assertEqual(backend.producerState, "producing")

    def test_bodyBeforeBackendBounded(self) -> None:
        """
        Body octets that arrive before the backend is connected are kept
        only up to a bound: past it the client is not read; all of them
        reach the backend once it is connected.
        """
        connector = _ManualConnector()
        self.connect(connector=connector)
        self.send(b"PUT /blob HTTP/1.1\r\nHost: h\r\nContent-Length: 200000\r\n\r\n" + b"a" * 40000)
        self.assertEqual(self.client.producerState, "paused")
        self.send(b"b" * 40000)
        connector.connectNext()
        self.assertTrue(self.backendGot().endswith(b"\r\n\r\n" + b"a" * 40000 + b"b" * 40000))
        self.assertEqual(self.client.producerState, "producing")

    def test_downloadBackpressure(self) -> None:
        """
        While the client does not read, the backend is not read; its
        response body is passed on as it comes, never gathered.
        """
        self.connect()
        self.send(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = self.connector.transports[0]
        answer = self.backendSays(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"y" * 1000)
        self.assertTrue(answer.endswith(b"\r\n\r\n" + b"y" * 1000))
        self.client.producer.pauseProducing()
        self.assertEqual(backend.producerState, "paused")
        self.client.producer.resumeProducing()
        self.assertEqual(backend.producerState, "producing")
        self.assertEqual(self.backendSays(b"z" * 5000), b"z" * 5000)

    def test_pausedAtEndOfResponse(self) -> None:
        """
        A response that ends while the client is not reading leaves the
        kept-alive backend connection readable for the next response.
        """
        self.connect()
        self.send(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = self.connector.transports[0]
        self.backendSays(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        self.client.producer.pauseProducing()
        self.backendSays(b"67890")
        self.send(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(len(self.connector.transports), 1)
        self.assertEqual(backend.producerState, "producing")

    def test_chunkedResponse(self) -> None:
        """
        A chunked (or close-delimited) response reaches an HTTP/1.1 client
        chunked, decoded and re-framed; the connection goes on.
        """
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        answer = self.backendSays(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ndata\r\n0\r\n\r\n")
        self.assertTrue(answer.endswith(b"\r\n\r\n4\r\ndata\r\n0\r\n\r\n"), answer)
        self.assertEqual(head(answer)[1][b"transfer-encoding"], [b"chunked"])
        self.assertFalse(self.client.disconnecting)

    def test_altSvcNotPassed(self) -> None:
        """
        The backend's Alt-Svc (Cyrus offers h2c on its own port) does not
        reach the client: the proxy serves no such alternative, and it
        would name the backend's port; other fields pass.
        """
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        answer = self.backendSays(b'HTTP/1.1 200 OK\r\nAlt-Svc: h2c=":56433"\r\nX-Other: y\r\nContent-Length: 0\r\n\r\n')
        self.assertNotIn(b"alt-svc", head(answer)[1])
        self.assertEqual(head(answer)[1][b"x-other"], [b"y"])

    def test_lengthBesideChunked(self) -> None:
        """
        A backend response with both Content-Length and chunked coding
        reaches the client chunked, without the length (which would no
        longer frame it).
        """
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        answer = self.backendSays(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        fields = head(answer)[1]
        self.assertNotIn(b"content-length", fields)
        self.assertTrue(answer.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), answer)

    def test_eventStream(self) -> None:
        """
        An event stream's head reaches the client at once, and each event
        as it comes.
        """
        self.connect()
        self.send(b"GET /jmap/eventsource HTTP/1.1\r\nHost: h\r\nAccept: text/event-stream\r\n\r\n")
        answer = self.backendSays(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        self.assertEqual(head(answer)[0], b"HTTP/1.1 200 OK")
        self.assertEqual(self.backendSays(b"event: state\ndata: {}\n\n"), b"17\r\nevent: state\ndata: {}\n\n\r\n")


class UpgradeTests(HTTPFrontendTestCase):
    """
    A WebSocket upgrade becomes a byte relay.
    """

    def test_websocket(self) -> None:
        """
        Upgrade: websocket is passed on; after the backend's 101, bytes go
        both ways unchanged, including those either side sent right behind
        the heads.
        """
        self.connect()
        self.send(
            b"GET /jmap/ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: k\r\nSec-WebSocket-Protocol: jmap\r\n\r\n"
        )
        fields = head(self.backendGot())[1]
        self.assertEqual((fields[b"connection"], fields[b"upgrade"]), ([b"Upgrade"], [b"websocket"]))
        self.connector.transports[0].clear()
        answer = self.backendSays(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi"
        )
        self.assertEqual(
            answer, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi"
        )
        self.assertIsNotNone(self.frontend.relay)
        self.send(b"\x81\x82\x00\x00\x00\x00ok GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(self.backendGot(), b"\x81\x82\x00\x00\x00\x00ok GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(self.backendSays(b"\x88\x00"), b"\x88\x00")

    def test_otherUpgradesNotPassed(self) -> None:
        """
        An upgrade to anything but a WebSocket (h2c) is not passed on: the
        backend answers in HTTP/1.1.
        """
        self.connect()
        self.send(
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
        fields = head(self.backendGot())[1]
        self.assertFalse({b"upgrade", b"connection", b"http2-settings"} & set(fields))

    def test_unaskedSwitch(self) -> None:
        """
        A 101 to a request that asked for no upgrade is the backend's
        error: 502.
        """
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(head(self.backendSays(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"))[0], b"HTTP/1.1 502 Bad Gateway")


class SessionTests(HTTPFrontendTestCase):
    """
    An HTTP connection is a session of the core: listed, counted, dropped.
    """

    def test_dropOnMove(self) -> None:
        """
        Dropping the account's sessions (what a move does) closes an
        authenticated connection in the middle of an event stream.
        """
        self.connect()
        self.send(b"GET /events HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n")
        self.backendSays(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        (session,) = self.frontend.context.sessions.find(account="alice")
        session.drop("Moved.")
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.connector.transports[0].disconnecting)

    def test_dropWebSocket(self) -> None:
        """
        A drop closes a WebSocket relay too.
        """
        self.connect()
        self.send(
            b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nAuthorization: "
            + basic("alice", "pw")
            + b"\r\n\r\n"
        )
        self.backendSays(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        self.frontend.context.sessions.find(account="alice")[0].drop("Moved.")
        self.assertTrue(self.client.disconnecting)

    def test_dropWaitingRequest(self) -> None:
        """
        A drop while a request waits for its backend answers it 503.
        """
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n")
        self.client.clear()
        self.frontend.drop("Moved.")
        self.assertEqual(head(self.client.value())[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertTrue(self.client.disconnecting)

    def test_describedAndLogged(self) -> None:
        """
        /sessions shows the account, backend and requests; the session-end
        event says protocol http, the account, the backend and the
        requests counted.
        """
        self.connect()
        for _ in range(2):
            self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n")
            self.backendSays(OK)
        described = self.frontend.describe()
        self.assertEqual(
            (described["protocol"], described["account"], described["backend"], described["requests"]),
            ("http", "alice", "new", 2),
        )
        self.frontend.connectionLost(Failure(Exception("gone")))
        (end,) = [event for event in self.events if event.get("event") == "session_end"]
        self.assertEqual(
            (end["protocol"], end["user"], end["backend"], end["requests"], end["result"]), ("http", "alice", "new", 2, "ok")
        )
        self.assertTrue(self.connector.transports[0].disconnecting)


class HostileInputTests(HTTPFrontendTestCase):
    """
    Bad input gets its status and a close, never a hang.
    """

    def test_headTooLarge(self) -> None:
        """
        A head longer than max_header_size is answered 431 and closed,
        whether in one line or many.
        """
        for data in (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n", b"GET / HTTP/1.1\r\n" + b"X-A: aaaaaaaaaa\r\n" * 200):
            self.connect(maxHeaderSize=1024)
            self.assertEqual(head(self.send(data))[0], b"HTTP/1.1 431 Request Header Fields Too Large")
            self.assertTrue(self.client.disconnecting)
            self.assertEqual(self.connector.protocols, [])

    def test_tooManyHeaders(self) -> None:
        """
        More header fields than max_headers: 431 and closed.
        """
        self.connect(maxHeaders=10)
        answer = self.send(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(11)) + b"\r\n")
        self.assertEqual(head(answer)[0], b"HTTP/1.1 431 Request Header Fields Too Large")
        self.assertTrue(self.client.disconnecting)

    def test_asManyHeadersAsAllowed(self) -> None:
        """
        Exactly max_headers header fields pass.
        """
        self.connect(maxHeaders=10)
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(9)) + b"\r\n")
        self.assertIn(b"GET / HTTP/1.1\r\n", self.backendGot())
        self.assertFalse(self.client.disconnecting)

    def test_badRequests(self) -> None:
        """
        A malformed request line, a header without a colon, both framings
        at once, a bad length, and bad chunking get 400 and a close; what
        follows a bad header is not read (no backend is asked).
        """
        for data in (
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nHost: h\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\nHost: h\r\n\r\n",
        ):
            self.connect()
            answer = self.send(data)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data)
            self.assertEqual(answer.count(b"HTTP/1.1"), 1, data)
            self.assertTrue(self.client.disconnecting, data)
            self.assertEqual(self.connector.protocols, [], data)
            self.assertEqual(self.frontend.requests, 0, data)
        self.connect()
        answer = self.send(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        self.assertEqual(answer, b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
                         b"Connection: close\r\n\r\nBad Request\r\n")
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.connector.transports[0].disconnecting)

    def test_badHost(self) -> None:
        """
        An HTTP/1.1 request without Host, any request with two Host fields
        or a Host that is no host name (RFC 9112 section 3.2), and a target
        in none of the forms a server takes get 400 and a close; no backend
        is asked.
        """
        for data in (
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: user@h\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h:x\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a b/c\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET http://user@h/ HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET http:///x HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET ftp://h/x HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET http://h/ HTTP/1.1\r\n\r\n",
            b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
            b"GET * HTTP/1.1\r\nHost: h\r\n\r\n",
        ):
            self.connect()
            answer = self.send(data + b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data)
            self.assertEqual(answer.count(b"HTTP/1.1"), 1, data)
            self.assertTrue(self.client.disconnecting, data)
            self.assertEqual(self.connector.protocols, [], data)
            self.assertEqual(self.frontend.requests, 0, data)
        for host in (b"mail.example", b"mail.example:8443", b"192.0.2.1", b"[2001:db8::1]:443", b"xn--bcher-kva.example"):
            self.connect()
            self.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            self.assertEqual(head(self.backendGot())[1][b"host"], [host])

    def test_chunkedHTTP10(self) -> None:
        """
        A transfer coding in an HTTP/1.0 request (RFC 9112 section 6.1:
        its framing is faulty) gets 400 and a close; its body is not taken
        for a next request.
        """
        self.connect()
        answer = self.send(
            b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1a\r\nGET /smuggled HTTP/1.1\r\n\r\n\r\n0\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer)
        self.assertEqual(answer.count(b"HTTP/1.1"), 1)
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.connector.protocols, [])

    def test_slowHead(self) -> None:
        """
        A head that does not complete within header_timeout gets 408 and
        a close (slowloris).
        """
        self.connect(headerTimeout=30.0)
        for _ in range(5):
            self.send(b"X")
            self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(head(self.client.value())[0], b"HTTP/1.1 408 Request Timeout")
        self.assertTrue(self.client.disconnecting)

    def test_slowPipelinedHead(self) -> None:
        """
        A partial request sent behind a complete one has header_timeout to
        complete once the first is answered, not keepalive_timeout, and
        gets 408.
        """
        self.connect(headerTimeout=30.0, keepaliveTimeout=75.0)
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /next HTTP/1.1\r\nHo")
        self.backendSays(OK)
        self.client.clear()
        self.clock.advance(30)
        self.assertEqual(head(self.client.value())[0], b"HTTP/1.1 408 Request Timeout")
        self.assertTrue(self.client.disconnecting)

    def test_strayCRLFIsNoHead(self) -> None:
        """
        The empty line some clients send after a request's body is no
        next request: the connection waits keepalive_timeout, quietly.
        """
        self.connect(headerTimeout=30.0, keepaliveTimeout=75.0)
        self.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi\r\n")
        self.backendSays(OK)
        self.client.clear()
        self.clock.advance(31)
        self.assertEqual((self.client.value(), self.client.disconnecting), (b"", False))
        self.clock.advance(44)
        self.assertEqual((self.client.value(), self.client.disconnecting), (b"", True))

    def test_emptyLinesBetweenRequests(self) -> None:
        """
        Any number of empty lines before a request line are skipped, as
        nginx does: the request behind them is answered.
        """
        self.connect()
        self.send(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n\r\n\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(head(self.backendSays(OK))[0], b"HTTP/1.1 200 OK")
        self.assertIn(b"GET /b HTTP/1.1\r\n", self.backendGot())
        self.assertNotIn(b"400", self.client.value())

    def test_headSizeCountsLineEnds(self) -> None:
        """
        max_header_size counts the head's octets as sent, line ends
        included: a head of exactly the limit passes, one octet more is
        refused with 431.
        """
        request = b"GET / HTTP/1.1\r\nHost: h\r\nX-A: " + b"a" * 60 + b"\r\n\r\n"
        self.connect(maxHeaderSize=len(request))
        self.send(request)
        self.assertIn(b"GET / HTTP/1.1\r\n", self.backendGot())
        self.connect(maxHeaderSize=len(request) - 1)
        self.assertEqual(head(self.send(request))[0], b"HTTP/1.1 431 Request Header Fields Too Large")

    def test_idleKeepAlive(self) -> None:
        """
        A connection idle for keepalive_timeout between requests is closed
        without a word; after the close grace it is aborted.
        """
        self.connect(keepaliveTimeout=75.0)
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.backendSays(OK)
        self.client.clear()
        self.clock.advance(74)
        self.assertFalse(self.client.disconnecting)
        self.clock.advance(1)
        self.assertEqual(self.client.value(), b"")
        self.assertTrue(self.client.disconnecting)
        self.clock.advance(10)
        self.assertTrue(self.client.disconnected)

    def test_stalledUpload(self) -> None:
        """
        A request body that stops coming ends the connection after the
        idle timeout (each chunk that comes restarts it).
        """
        self.connect(limits=Limits(failureDelay=0, idleTimeout=100.0))
        self.send(b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
        self.clock.advance(90)
        self.send(b"def")
        self.clock.advance(90)
        self.assertFalse(self.client.disconnecting)
        self.clock.advance(10)
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.connector.transports[0].disconnecting)

    def test_leftDuringRouting(self) -> None:
        """
        A client that leaves while the router has its request is not
        answered, and the router's late answer connects nothing.
        """
        self.connect(FakeRouter(manual=True))
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n")
        self.frontend.connectionLost(Failure(Exception("reset")))
        self.router.pending[0].callback(Route(self.new))
        self.assertEqual(self.connector.protocols, [])
        self.assertEqual(self.client.value(), b"")

    def test_backendSilent(self) -> None:
        """
        A backend that does not start its response within response_timeout
        gives 504; its connection is closed.
        """
        self.connect(responseTimeout=60.0)
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.clock.advance(60)
        self.assertEqual(head(self.client.value())[0], b"HTTP/1.1 504 Gateway Timeout")
        self.assertTrue(self.connector.transports[0].disconnecting)

    def test_backendGarbage(self) -> None:
        """
        A backend that answers nonsense, an endless head, or a head with a
        bare CR, LF or NUL gives 502.
        """
        for data in (
            b"SPAM\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 10000,
            # A reason phrase that would start a header of its own at the
            # client, and a NUL in a field.
            b"HTTP/1.1 200 OK\nSet-Cookie: x=1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\rSet-Cookie: x=1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\0b\r\nContent-Length: 0\r\n\r\n",
        ):
            self.connect(maxHeaderSize=4096)
            self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            self.assertEqual(head(self.backendSays(data))[0], b"HTTP/1.1 502 Bad Gateway")
            self.assertTrue(self.connector.transports[0].disconnecting)

    def test_keptConnectionClosed(self) -> None:
        """
        A request without a body sent on a kept-alive backend connection
        that the backend closes before answering goes again, once, on a new
        connection, with the same credentials; the client sees only the
        answer.
        """
        self.connect()
        request = b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice", "pw") + b"\r\n\r\n"
        self.send(request)
        self.backendSays(OK)
        self.client.clear()
        self.send(request)
        self.connector.protocols[0].connectionLost(Failure(Exception("closed")))
        self.assertEqual(len(self.connector.protocols), 2)
        self.assertEqual(head(self.backendGot())[1][b"authorization"], [basic("alice", "pw")])
        self.assertEqual(self.client.value(), b"")
        self.assertTrue(self.backendSays(OK).endswith(b"hello"))
        self.assertEqual(len(self.router.requests), 1)
        self.send(request)
        self.connector.protocols[1].connectionLost(Failure(Exception("closed")))
        self.send(b"")
        self.assertEqual(len(self.connector.protocols), 3)
        self.connector.protocols[2].connectionLost(Failure(Exception("closed")))
        self.assertEqual(head(self.client.value())[0], b"HTTP/1.1 502 Bad Gateway")

    def test_backendVanishes(self) -> None:
        """
        A backend that closes in the middle of a response cuts the client's
        connection (it sees the response short), and the session ends.
        """
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.backendSays(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        self.connector.protocols[0].connectionLost(Failure(Exception("reset")))
        self.assertTrue(self.client.disconnecting)

    def test_clientVanishes(self) -> None:
        """
        A client that leaves in the middle of a request closes its backend
        connection and leaves the registry.
        """
        self.connect()
        self.send(b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
        self.frontend.connectionLost(Failure(Exception("reset")))
        self.assertTrue(self.connector.transports[0].disconnecting)
        self.assertEqual(len(self.frontend.context.sessions), 0)

    def test_answeredBeforeBody(self) -> None:
        """
        A refusal before the client sent its body closes the connection
        after the answer (what follows could not be told from a request);
        an Expect: 100-continue client is not told to go on.
        """
        self.connect(FakeRouter({}))
        answer = self.send(
            b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\nAuthorization: "
            + basic("mallory", "x")
            + b"\r\n\r\n"
        )
        self.assertNotIn(b"100 Continue", answer)
        line, fields = head(answer)
        self.assertEqual((line, fields[b"connection"]), (b"HTTP/1.1 401 Unauthorized", [b"close"]))
        self.assertTrue(self.client.disconnecting)

    def test_expectContinue(self) -> None:
        """
        An Expect: 100-continue client is told to go on once its backend
        has the request; the backend is not asked to say it again.
        """
        self.connect()
        answer = self.send(b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(answer, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertNotIn(b"expect", head(self.backendGot())[1])


class TLSListenerTests(HTTPFrontendTestCase):
    """
    Behind TLS, the client is told https.
    """

    def test_redirectsOnHostSecured(self) -> None:
        """
        On a TLS listener, a backend's Location (and Content-Location) to
        http: on the client's own host becomes https:; to other hosts, or
        on a plain listener, it stays.
        """
        self.router = FakeRouter({})
        self.connector = MemoryConnector()
        frontend, self.client, self.clock = makeFrontend(
            "http", self.router, self.connector, tls="implicit", http=HTTPSettings(cookieSecret=SECRET, defaultBackend="old")
        )
        frontend.context.backends["old"] = self.old
        self.frontend = frontend  # type: ignore[assignment]
        cases = [
            (b"http://Mail.example:8443/jmap/", b"https://Mail.example:8443/jmap/"),
            (b"http://mail.example:8443", b"https://mail.example:8443"),
            (b"http://mail.example:84430/x", b"http://mail.example:84430/x"),
            (b"http://other.example/x", b"http://other.example/x"),
            (b"/relative", b"/relative"),
        ]
        for sent, expected in cases:
            self.send(b"GET /.well-known/jmap HTTP/1.1\r\nHost: mail.example:8443\r\n\r\n")
            answer = self.backendSays(
                b"HTTP/1.1 301 Moved Permanently\r\nLocation: " + sent + b"\r\nContent-Location: " + sent
                + b"\r\nContent-Length: 0\r\n\r\n"
            )
            fields = head(answer)[1]
            self.assertEqual((fields[b"location"], fields[b"content-location"]), ([expected], [expected]))
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: mail.example\r\n\r\n")
        answer = self.backendSays(b"HTTP/1.1 302 Found\r\nLocation: http://mail.example/\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(head(answer)[1][b"location"], [b"http://mail.example/"])

    def test_proto(self) -> None:
        """
        On an implicit TLS listener, the backend is told proto=https.
        """
        self.router = FakeRouter({})
        self.connector = MemoryConnector()
        frontend, self.client, self.clock = makeFrontend(
            "http", self.router, self.connector, tls="implicit", http=HTTPSettings(cookieSecret=SECRET, defaultBackend="old")
        )
        frontend.context.backends["old"] = self.old
        self.frontend = frontend  # type: ignore[assignment]
        self.assertIsInstance(self.client, TLSStringTransport)
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(head(self.backendGot())[1][b"x-forwarded-proto"], [b"https"])


class ExchangeTests(HTTPFrontendTestCase):
    """
    The framing of responses that are not plain bodies, and of requests
    that come several at once.
    """

    def test_head(self) -> None:
        """
        The response to HEAD has no body whatever its Content-Length says;
        the next request on the connection is answered.
        """
        self.connect()
        self.send(b"HEAD /blob HTTP/1.1\r\nHost: h\r\n\r\n")
        answer = self.backendSays(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        self.assertTrue(answer.endswith(b"Content-Length: 1000\r\n\r\n"), answer)
        self.connector.transports[0].clear()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(self.backendGot().startswith(b"GET / HTTP/1.1\r\n"))
        self.assertTrue(self.backendSays(OK).endswith(b"hello"))

    def test_pipelined(self) -> None:
        """
        Requests sent together are answered one after the other, in order,
        each sent to the backend once the one before is answered.
        """
        self.connect()
        self.send(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertNotIn(b"GET /2", self.backendGot())
        self.connector.transports[0].clear()
        first = self.backendSays(OK)
        self.assertTrue(self.backendGot().startswith(b"GET /2 HTTP/1.1\r\n"))
        second = self.backendSays(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 200 OK"))
        self.assertTrue(second.startswith(b"HTTP/1.1 204 No Content"))
        self.assertEqual(self.frontend.requests, 2)

    def test_http10(self) -> None:
        """
        An HTTP/1.0 client gets a close-delimited body and the connection
        closed after it.
        """
        self.connect()
        self.send(b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(head(self.backendGot())[1][b"host"], [b"192.0.2.1"])
        answer = self.backendSays(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.0 200 OK\r\n"))
        self.assertTrue(answer.endswith(b"\r\n\r\nabc"))
        self.assertTrue(self.client.disconnecting)

    def test_connectionClose(self) -> None:
        """
        A client's C{Connection: close} closes its connection after the
        response however it is written: among other options, in any order,
        or in a second field (RFC 9112 section 9.6); without it the
        connection stays open.
        """
        for fields in (
            b"Connection: close,foo\r\n",
            b"Connection: close, te\r\n",
            b"Connection: te,close\r\n",
            b"Connection: te\r\nConnection: Close\r\n",
        ):
            self.connect()
            self.send(b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n")
            answer = self.backendSays(OK)
            self.assertTrue(answer.endswith(b"hello"), fields)
            self.assertEqual(head(answer)[1][b"connection"], [b"close"], fields)
            self.assertTrue(self.client.disconnecting, fields)
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: te, closed\r\n\r\n")
        self.assertNotIn(b"connection", head(self.backendSays(OK))[1])
        self.assertFalse(self.client.disconnecting)

    def test_backendClosesAfter(self) -> None:
        """
        A backend that says Connection: close gets a new connection for
        the next request; the client's connection goes on.
        """
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.backendSays(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(self.connector.transports[0].disconnecting)
        self.assertFalse(self.client.disconnecting)
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(len(self.connector.transports), 2)

    def test_backendTLS(self) -> None:
        """
        A backend reached with TLS gets the request only once its handshake
        is done (and its certificate verified).
        """
        self.old = makeBackend("old", tls="implicit")
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(self.backendGot(), b"")
        self.assertIsNotNone(self.connector.transports[0].tlsOptions)
        self.connector.protocols[0].handshakeCompleted()
        self.assertTrue(self.backendGot().startswith(b"GET / HTTP/1.1\r\n"))

    def test_unauthenticatedLogged(self) -> None:
        """
        A session of requests without credentials is logged with the
        backend that served them, and found by it.
        """
        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.backendSays(OK)
        self.assertEqual(self.frontend.context.sessions.find(backend="old"), [self.frontend])
        self.frontend.connectionLost(Failure(Exception("gone")))
        (end,) = [event for event in self.events if event.get("event") == "session_end"]
        self.assertEqual((end["user"], end["backend"], end["result"], end["requests"]), (None, "old", "ok", 1))

    def test_metrics(self) -> None:
        """
        The open-session metrics count an HTTP session under its backend,
        with the octets it moved.
        """
        from mailproxy._stats import _openSessions

        self.connect()
        self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.backendSays(OK)
        open_, fromClient, fromBackend = _openSessions([self.frontend])
        self.assertEqual(open_, {("http", "old"): 1})
        self.assertEqual(fromClient[("http", "old")], len(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
        self.assertGreater(fromBackend[("http", "old")], 5)

    def test_healthProbe(self) -> None:
        """
        The health probe of a backend's http port asks OPTIONS * and takes
        any status line as alive.
        """
        from mailproxy.admin import _probeRequest, greetingProblem

        self.assertTrue(_probeRequest("http").startswith(b"OPTIONS * HTTP/1.1\r\n"))
        self.assertIsNone(greetingProblem("http", b"HTTP/1.1 405 Method Not Allowed"))
        self.assertIsNotNone(greetingProblem("http", b"* OK IMAP"))
