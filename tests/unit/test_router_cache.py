"""
Tests for L{mailproxy.routers.cache}: TTLs on a fake clock, the size bound,
collapsed lookups, stale answers while the router fails, invalidation, and
keys that keep one password's answer from serving another.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailproxy.config import ConfigError, Table
from mailproxy.interfaces import IReloadable, IRouteCache, IRouter
from mailproxy.model import Backend, ClientInfo, Credentials, Rejection, Route, RouteRequest, TLSInfo
from mailproxy.routers.cache import CachingRouter, buildCache
from mailproxy.testing import FakeRouter

from .routerhelpers import CLIENT, result

OLD = Backend(name="old", host="10.0.0.1", ports={"imap": 143})
ROUTE = Route(backend=OLD, rule="test")
WRONG = Rejection("Authentication failed.")
DOWN = Rejection("Service temporarily unavailable.", temporary=True)


def login(user: str = "alice@example.org", password: bytes = b"secret", **kwargs: Any) -> RouteRequest:
    """
    A plain login request.
    """
    kwargs.setdefault("protocol", "imap")
    kwargs.setdefault("client", CLIENT)
    return RouteRequest(credentials=Credentials("LOGIN", user, password=password), **kwargs)


class ScriptedRouter:
    """
    A router whose answers the test gives: canned by password, or later
    through the Deferreds it hands out.

    @ivar asked: how many questions it got.
    """

    def __init__(self) -> None:
        self.answers: dict[bytes | None, Any] = {}
        self.manual = False
        self.pending: list[Deferred[Any]] = []
        self.asked = 0
        self.reloaded = 0

    def route(self, request: RouteRequest) -> Any:
        self.asked += 1
        if self.manual:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d
        assert request.credentials is not None
        answer = self.answers.get(request.credentials.password, WRONG)
        if isinstance(answer, Exception):
            return fail(answer)
        return answer


class CacheTests(SynchronousTestCase):
    """
    Tests for L{CachingRouter}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.inner = ScriptedRouter()
        self.inner.answers[b"secret"] = ROUTE

    def cache(self, **kwargs: Any) -> CachingRouter:
        """
        A cache on L{clock} around L{inner}.
        """
        kwargs.setdefault("ttl", 60)
        kwargs.setdefault("negativeTTL", 10)
        return CachingRouter(self.inner, reactor=self.clock, **kwargs)

    def test_interfaces(self) -> None:
        """
        The cache is a router, reloadable, and declares itself a route
        cache with everything L{IRouteCache} names: the management
        endpoint finds it by that declaration.
        """
        cache = self.cache()
        self.assertTrue(verifyObject(IRouter, cache))
        self.assertTrue(verifyObject(IReloadable, cache))
        self.assertTrue(verifyObject(IRouteCache, cache))
        self.assertIs(cache.wrapped, self.inner)

    def test_positiveTTL(self) -> None:
        """
        A route is reused for C{ttl} seconds, then asked for again.
        """
        cache = self.cache()
        self.assertIs(result(cache.route(login())), ROUTE)
        self.clock.advance(59.9)
        self.assertIs(result(cache.route(login())), ROUTE)
        self.assertEqual(self.inner.asked, 1)
        self.clock.advance(0.1)
        result(cache.route(login()))
        self.assertEqual(self.inner.asked, 2)
        self.assertEqual(cache.stats["hits"], 1)
        self.assertEqual(cache.stats["misses"], 2)

    def test_negativeTTL(self) -> None:
        """
        A refusal is reused for C{negative_ttl} seconds.
        """
        cache = self.cache()
        self.assertEqual(result(cache.route(login(password=b"bad"))), WRONG)
        self.clock.advance(9)
        self.assertEqual(result(cache.route(login(password=b"bad"))), WRONG)
        self.assertEqual(self.inner.asked, 1)
        self.clock.advance(1)
        result(cache.route(login(password=b"bad")))
        self.assertEqual(self.inner.asked, 2)

    def test_zeroTTLCachesNothing(self) -> None:
        """
        A TTL of 0 turns that kind of answer's caching off.
        """
        cache = self.cache(ttl=0, negativeTTL=0)
        for password in (b"secret", b"secret", b"bad", b"bad"):
            result(cache.route(login(password=password)))
        self.assertEqual(self.inner.asked, 4)
        self.assertEqual(len(cache), 0)

    def test_otherPasswordNotServed(self) -> None:
        """
        A cached success for one password never answers another: a wrong
        password is asked about (and refused), and a cached refusal does not
        block the right password.
        """
        cache = self.cache()
        self.assertIs(result(cache.route(login())), ROUTE)
        self.assertEqual(result(cache.route(login(password=b"guess"))), WRONG)
        self.assertEqual(result(cache.route(login(password=b"guess"))), WRONG)
        self.assertIs(result(cache.route(login())), ROUTE)
        self.assertEqual(self.inner.asked, 2)

    def test_keyHoldsNoPassword(self) -> None:
        """
        The key holds a keyed hash of the password, not the password, and
        two caches (two processes) hash differently.
        """
        first, second = self.cache(), self.cache()
        key = first.keyFor(login(password=b"hunter2"))
        self.assertNotIn("hunter2", repr(key))
        self.assertNotEqual(key, second.keyFor(login(password=b"hunter2")))
        self.assertNotEqual(key, first.keyFor(login(password=b"hunter3")))

    def test_keyHoldsToken(self) -> None:
        """
        An OAuth login's key holds a keyed hash of its token: another
        token for the same user is another key (a validating router's
        answer for one token is never reused for another), and the token
        is not in the key.
        """
        cache = self.cache()

        def oauth(token: bytes) -> RouteRequest:
            return RouteRequest(protocol="imap", credentials=Credentials("OAUTHBEARER", "alice@example.org", token=token), client=CLIENT)

        key = cache.keyFor(oauth(b"token-one"))
        self.assertNotIn("token-one", repr(key))
        self.assertEqual(key, cache.keyFor(oauth(b"token-one")))
        self.assertNotEqual(key, cache.keyFor(oauth(b"token-two")))

    def test_keyParts(self) -> None:
        """
        The protocol, the user, the authorization identity, the SMTP
        recipient and the mechanism class are part of the key; the client's
        address and port are not, unless asked for with C{vary}.
        """
        cache = self.cache()
        base = cache.keyFor(login())
        self.assertNotEqual(base, cache.keyFor(login(protocol="pop3")))
        self.assertNotEqual(base, cache.keyFor(login("bob@example.org")))
        self.assertNotEqual(
            base,
            cache.keyFor(RouteRequest(protocol="imap", credentials=Credentials("PLAIN", "alice@example.org", password=b"secret", authzid="x"), client=CLIENT)),
        )
        self.assertEqual(
            base,
            cache.keyFor(RouteRequest(protocol="imap", credentials=Credentials("PLAIN", "alice@example.org", password=b"secret"), client=CLIENT)),
        )
        other = ClientInfo(sessionId="t", address="198.51.100.1", port=2, localAddress="192.0.2.1", localPort=993)
        self.assertEqual(base, cache.keyFor(login(client=other)))
        varying = self.cache(vary=["client_address"])
        self.assertNotEqual(varying.keyFor(login()), varying.keyFor(login(client=other)))
        mx = RouteRequest(protocol="smtp", credentials=None, client=CLIENT, rcptTo="a@example.org")
        self.assertNotEqual(cache.keyFor(mx), cache.keyFor(RouteRequest(protocol="smtp", credentials=None, client=CLIENT, rcptTo="b@example.org")))

    def test_varyFields(self) -> None:
        """
        Every C{vary} field changes the key when its fact changes.
        """
        tlsClient = ClientInfo(
            sessionId="t", address="192.0.2.8", port=2, localAddress="192.0.2.2", localPort=993, tls=TLSInfo("TLSv1.3", "X", "a.example")
        )
        changed = {
            "client_address": login(client=tlsClient),
            "local_address": login(client=tlsClient),
            "local_port": login(client=tlsClient),
            "tls": login(client=tlsClient),
            "server_name": login(client=tlsClient),
            "attempt": login(attempt=2),
            "helo": login(helo="x"),
            "mail_from": login(mailFrom="x@y"),
            "client_id": login(clientID=(("name", "x"),)),
        }
        for name, request in changed.items():
            cache = self.cache(vary=[name])
            self.assertNotEqual(cache.keyFor(login()), cache.keyFor(request), name)
        self.assertRaises(ValueError, self.cache, vary=["colour"])

    def test_digestMechanisms(self) -> None:
        """
        For digest mechanisms the challenge and response are in the key.
        """
        cache = self.cache()

        def cram(challenge: bytes, response: bytes) -> RouteRequest:
            return RouteRequest(
                protocol="imap",
                credentials=Credentials("CRAM-MD5", "alice@example.org", challenge=challenge, response=response),
                client=CLIENT,
            )

        self.assertEqual(cache.keyFor(cram(b"<1@h>", b"ab")), cache.keyFor(cram(b"<1@h>", b"ab")))
        self.assertNotEqual(cache.keyFor(cram(b"<1@h>", b"ab")), cache.keyFor(cram(b"<2@h>", b"ab")))
        self.assertNotEqual(cache.keyFor(cram(b"<1@h>", b"ab")), cache.keyFor(cram(b"<1@h>a", b"b")))

    def test_sizeBound(self) -> None:
        """
        The cache keeps at most C{size} entries, dropping the least recently
        used first.
        """
        cache = self.cache(size=2)
        for user in ("a", "b"):
            result(cache.route(login(user)))
        result(cache.route(login("a")))  # a is now the most recently used
        result(cache.route(login("c")))
        self.assertEqual(len(cache), 2)
        asked = self.inner.asked
        result(cache.route(login("a")))
        self.assertEqual(self.inner.asked, asked)
        result(cache.route(login("b")))
        self.assertEqual(self.inner.asked, asked + 1)

    def test_concurrentCollapsed(self) -> None:
        """
        Questions with the same key asked while the first is pending wait
        for its answer instead of asking again.
        """
        self.inner.manual = True
        cache = self.cache()
        first, second, third = (cache.route(login()) for _ in range(3))
        other = cache.route(login(password=b"other"))
        self.assertEqual(self.inner.asked, 2)
        self.assertEqual(cache.stats["collapsed"], 2)
        self.assertNoResult(first)
        self.inner.pending[0].callback(ROUTE)
        self.assertEqual([result(d) for d in (first, second, third)], [ROUTE] * 3)
        self.assertNoResult(other)

    def test_cancelledWaiterOnly(self) -> None:
        """
        A caller that gives up (its session closed) does not cancel the
        question for the others.
        """
        self.inner.manual = True
        cache = self.cache()
        first, second = cache.route(login()), cache.route(login())
        first.cancel()
        self.failureResultOf(first)
        self.inner.pending[0].callback(ROUTE)
        self.assertIs(result(second), ROUTE)

    def test_temporaryNotCached(self) -> None:
        """
        A temporary failure is passed on and never cached.
        """
        self.inner.answers[b"secret"] = DOWN
        cache = self.cache()
        self.assertEqual(result(cache.route(login())), DOWN)
        self.assertEqual(len(cache), 0)

    def test_staleOnFailure(self) -> None:
        """
        With C{serve_stale}, an expired answer is served while the router
        fails (temporarily or with an exception), for up to that many
        seconds past its expiry; then the failure comes through.
        """
        cache = self.cache(serveStale=300)
        result(cache.route(login()))
        self.clock.advance(61)
        self.inner.answers[b"secret"] = DOWN
        self.assertIs(result(cache.route(login())), ROUTE)
        self.inner.answers[b"secret"] = RuntimeError("directory on fire")
        self.assertIs(result(cache.route(login())), ROUTE)
        self.assertEqual(cache.stats["stale"], 2)
        self.clock.advance(300)
        self.assertRaises(RuntimeError, result, cache.route(login()))

    def test_staleOffByDefault(self) -> None:
        """
        Without C{serve_stale}, a failure after expiry is the answer.
        """
        cache = self.cache()
        result(cache.route(login()))
        self.clock.advance(61)
        self.inner.answers[b"secret"] = DOWN
        self.assertEqual(result(cache.route(login())), DOWN)

    def test_staleNeverForOtherPassword(self) -> None:
        """
        A stale answer is served only for the same key: a different
        password during the outage gets the failure.
        """
        cache = self.cache(serveStale=300)
        result(cache.route(login()))
        self.clock.advance(61)
        self.inner.answers[b"guess"] = DOWN
        self.assertEqual(result(cache.route(login(password=b"guess"))), DOWN)

    def test_freshAnswerReplacesStale(self) -> None:
        """
        When the router works again, its answer replaces the stale one.
        """
        cache = self.cache(serveStale=300)
        result(cache.route(login()))
        self.clock.advance(61)
        newer = Route(backend=OLD, rule="newer")
        self.inner.answers[b"secret"] = newer
        self.assertIs(result(cache.route(login())), newer)
        self.assertIs(result(cache.route(login())), newer)

    def test_invalidateUser(self) -> None:
        """
        L{CachingRouter.invalidate} with a user drops that user's entries
        (any case, any protocol), and only those.
        """
        cache = self.cache()
        result(cache.route(login()))
        result(cache.route(login(protocol="pop3")))
        result(cache.route(login("bob@example.org")))
        self.assertEqual(cache.invalidate("ALICE@example.org"), 2)
        asked = self.inner.asked
        result(cache.route(login()))
        result(cache.route(login("bob@example.org")))
        self.assertEqual(self.inner.asked, asked + 1)

    def test_invalidateDomain(self) -> None:
        """
        A key without C{@} (a route table's domain) drops every login in
        that domain, and a login name equal to it.
        """
        cache = self.cache()
        for user in ("alice@example.org", "bob@EXAMPLE.org", "carol@example.net", "example.org"):
            result(cache.route(login(user)))
        self.assertEqual(cache.invalidate("example.org"), 3)
        self.assertEqual(len(cache), 1)

    def test_invalidateMany(self) -> None:
        """
        L{CachingRouter.invalidateMany} drops the entries of every login
        name (any case) and domain given, and only those.
        """
        cache = self.cache()
        for user in ("alice@example.org", "bob@EXAMPLE.org", "carol@example.net", "dave@example.com", "erin@example.com"):
            result(cache.route(login(user)))
        self.assertEqual(cache.invalidateMany(["ALICE@example.org", "example.net", "dave@example.com"]), 3)
        asked = self.inner.asked
        for user in ("bob@EXAMPLE.org", "erin@example.com"):
            result(cache.route(login(user)))
        self.assertEqual(self.inner.asked, asked)
        result(cache.route(login("carol@example.net")))
        self.assertEqual(self.inner.asked, asked + 1)

    def test_walkable(self) -> None:
        """
        Tools that walk composed routers find the wrapped router as
        C{wrapped} and the counters as C{hits} and C{misses}.
        """
        cache = self.cache()
        result(cache.route(login()))
        result(cache.route(login()))
        self.assertIs(cache.wrapped, self.inner)
        self.assertEqual((cache.hits, cache.misses), (1, 1))

    def test_invalidateAll(self) -> None:
        """
        L{CachingRouter.invalidate} without a user empties the cache.
        """
        cache = self.cache()
        result(cache.route(login()))
        result(cache.route(login("bob@example.org")))
        self.assertEqual(cache.invalidate(), 2)
        self.assertEqual(len(cache), 0)

    def test_invalidateDuringLookup(self) -> None:
        """
        An answer to a question asked before an invalidation is delivered
        but not stored: it may predate the change that caused it.
        """
        self.inner.manual = True
        cache = self.cache()
        d = cache.route(login())
        cache.invalidate("alice@example.org")
        self.inner.pending[0].callback(ROUTE)
        self.assertIs(result(d), ROUTE)
        self.assertEqual(len(cache), 0)

    def test_reload(self) -> None:
        """
        L{CachingRouter.reload} reloads a reloadable router and forgets
        every answer; watching is passed on.
        """
        static = FakeRouter(default=ROUTE)
        calls: list[str] = []
        static.reload = lambda: calls.append("reload")  # type: ignore[attr-defined]
        static.startWatching = lambda: calls.append("start")  # type: ignore[attr-defined]
        static.stopWatching = lambda: calls.append("stop")  # type: ignore[attr-defined]
        from zope.interface import alsoProvides

        from mailproxy.interfaces import IReloadable

        alsoProvides(static, IReloadable)
        cache = CachingRouter(static, reactor=self.clock)
        result(cache.route(login()))
        cache.startWatching()
        cache.reload()
        cache.stopWatching()
        self.assertEqual(calls, ["start", "reload", "stop"])
        self.assertEqual(len(cache), 0)


class BuildTests(SynchronousTestCase):
    """
    Tests for L{buildCache}.
    """

    def build(self, **options: Any) -> CachingRouter:
        """
        Build from C{options} as C{[router.cache]}.
        """
        return buildCache(Table("/etc/mp.toml", ("router", "cache"), options, "/etc"), FakeRouter(), Clock())

    def test_defaults(self) -> None:
        """
        Defaults: 60 s, 10 s, 10000 entries, no stale answers.
        """
        cache = self.build()
        self.assertEqual((cache.ttl, cache.negativeTTL, cache.size, cache.serveStale, cache.vary), (60.0, 10.0, 10000, 0.0, ()))

    def test_options(self) -> None:
        """
        Every option is read.
        """
        cache = self.build(ttl=5, negative_ttl=0, size=3, serve_stale=3600, vary=["client_address"])
        self.assertEqual((cache.ttl, cache.negativeTTL, cache.size, cache.serveStale, cache.vary), (5.0, 0.0, 3, 3600.0, ("client_address",)))

    def test_emptyVary(self) -> None:
        """
        C{vary = []}, the default written out, adds no fact to the key.
        """
        self.assertEqual(self.build(vary=[]).vary, ())

    def test_badOptions(self) -> None:
        """
        Bad values name their key.
        """
        for options, key in (
            ({"ttl": -1}, "router.cache.ttl"),
            ({"vary": "client_address"}, "router.cache.vary"),
            ({"vary": [""]}, "router.cache.vary"),
            ({"size": 0}, "router.cache.size"),
            ({"vary": ["colour"]}, "router.cache.vary"),
            ({"colour": 1}, "router.cache.colour"),
        ):
            error = self.assertRaises(ConfigError, self.build, **options)
            self.assertTrue(str(error).startswith(f"/etc/mp.toml: {key}: "), str(error))
