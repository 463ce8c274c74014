"""
Tests for L{mailproxy._migrate}: moving accounts with a real static route
table and in-memory sessions.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._migrate import MOVED, LoginHold, MoveError, Mover, RouteChange, explainRoute
from mailproxy.routers.static import StaticRouter
from mailproxy.testing import FakeRouter, makeBackend

from .opsfixtures import GREETING, LOGGED_IN, ProxyHarness

TABLE = """\
default = "old"

[domains]
"example.net" = "old"

[accounts]
"alice@example.org" = "old"
"carol@example.net" = "old"
"""

BACKENDS = {name: makeBackend(name) for name in ("old", "new")}


class Cache:
    """
    A stand-in route cache: records invalidations.
    """

    def __init__(self, wrapped) -> None:
        self.wrapped = wrapped
        self.invalidated: list[str | None] = []

    def route(self, request):
        return self.wrapped.route(request)

    def invalidate(self, key=None) -> None:
        self.invalidated.append(key)


class MoveTests(SynchronousTestCase):
    """
    L{Mover.move}.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "routes.toml")
        with open(self.path, "w") as f:
            f.write(TABLE)
        self.store = StaticRouter(self.path, BACKENDS)
        self.cache = Cache(self.store)
        self.proxy = ProxyHarness(self.cache, gate=LoginHold())
        self.mover = Mover(self.proxy.context, BACKENDS, self.proxy.clock)

    def read(self) -> str:
        """
        The route table's text now.
        """
        with open(self.path) as f:
            return f.read()

    def test_moveAccounts(self) -> None:
        """
        Moving accounts changes their entries (adding one where needed),
        invalidates the cache, and drops their sessions with a goodbye;
        other sessions go on.
        """
        alice, aliceClient, aliceBackend = self.proxy.login("alice@example.org")
        bob, bobClient, _ = self.proxy.login("bob@example.org")
        dave, daveClient, _ = self.proxy.login("dave@example.org")
        result = self.successResultOf(self.mover.move("new", ["alice@example.org", "Bob@example.org"]))
        self.assertEqual(
            result.changes,
            (RouteChange("alice@example.org", "old", "new"), RouteChange("bob@example.org", None, "new")),
        )
        self.assertEqual(set(result.sessions), {alice.client.sessionId, bob.client.sessionId})
        self.assertEqual(result.accounts, ("alice@example.org", "bob@example.org"))
        self.assertIn('"alice@example.org" = "new"', self.read())
        self.assertIn('"bob@example.org" = "new"', self.read())
        self.assertEqual(self.cache.invalidated, ["alice@example.org", "bob@example.org"])
        self.assertEqual(aliceClient.value(), b"* BYE " + MOVED.encode() + b"\r\n")
        self.assertTrue(aliceClient.disconnecting and aliceBackend.disconnecting)
        self.assertEqual(bobClient.value(), b"* BYE " + MOVED.encode() + b"\r\n")
        self.assertEqual(daveClient.value(), b"")
        self.assertFalse(daveClient.disconnecting)

    def test_reconnectGoesToNewHome(self) -> None:
        """
        After the move, the account's next login is routed to the new
        backend.
        """
        self.proxy.login("alice@example.org")
        self.successResultOf(self.mover.move("new", ["alice@example.org"]))
        again, _, _ = self.proxy.login("alice@example.org")
        self.assertEqual(again.backendName, "new")

    def test_dryRun(self) -> None:
        """
        A dry run reports the changes and the sessions, and changes nothing.
        """
        alice, aliceClient, _ = self.proxy.login("alice@example.org")
        result = self.successResultOf(self.mover.move("new", ["alice@example.org"], dryRun=True))
        self.assertTrue(result.dryRun)
        self.assertEqual(result.changes, (RouteChange("alice@example.org", "old", "new"),))
        self.assertEqual(result.sessions, (alice.client.sessionId,))
        self.assertEqual(self.read(), TABLE)
        self.assertEqual(aliceClient.value(), b"")
        self.assertEqual(self.cache.invalidated, [])

    def test_domain(self) -> None:
        """
        Moving a domain changes its entry and drops the sessions of its
        accounts that have no entry of their own.
        """
        erin, erinClient, _ = self.proxy.login("erin@example.net")
        carol, carolClient, _ = self.proxy.login("carol@example.net")
        result = self.successResultOf(self.mover.move("new", domain="example.net"))
        self.assertEqual(result.changes, (RouteChange("@example.net", "old", "new"),))
        self.assertEqual(result.sessions, (erin.client.sessionId,))
        self.assertIn('"example.net" = "new"', self.read())
        self.assertEqual(carolClient.value(), b"")
        # Caches name a domain without its "@".
        self.assertEqual(self.cache.invalidated, ["example.net"])

    def test_realCache(self) -> None:
        """
        Behind the project's own route cache, a moved account's next login
        is not answered from the cache with the old backend.
        """
        from mailproxy.routers.cache import CachingRouter

        router = CachingRouter(self.store, reactor=self.proxy.clock, ttl=300)
        self.proxy.context.router = router
        self.proxy.login("alice@example.org")
        self.proxy.login("erin@example.net")
        self.successResultOf(self.mover.move("new", ["alice@example.org"], domain="example.net"))
        again, _, _ = self.proxy.login("alice@example.org")
        erin, _, _ = self.proxy.login("erin@example.net")
        self.assertEqual((again.backendName, erin.backendName), ("new", "new"))
        self.assertEqual(router.hits, 0)

    def test_rollback(self) -> None:
        """
        Moving back restores the entry's backend and drops the sessions
        that were on the new backend.
        """
        self.successResultOf(self.mover.move("new", ["alice@example.org"]))
        alice, aliceClient, _ = self.proxy.login("alice@example.org")
        result = self.successResultOf(self.mover.move("old", ["alice@example.org"]))
        self.assertEqual(result.changes, (RouteChange("alice@example.org", "new", "old"),))
        self.assertEqual(result.sessions, (alice.client.sessionId,))
        self.assertEqual(self.read(), TABLE)

    def test_alreadyThere(self) -> None:
        """
        An account already routed to the target changes nothing, but its
        sessions still on another backend are dropped.
        """
        alice, _, _ = self.proxy.login("alice@example.org")
        with open(self.path, "w") as f:
            f.write(TABLE.replace('"alice@example.org" = "old"', '"alice@example.org" = "new"'))
        self.store.reload()
        result = self.successResultOf(self.mover.move("new", ["alice@example.org"]))
        self.assertEqual(result.changes, ())
        self.assertEqual(result.sessions, (alice.client.sessionId,))

    def test_unknownBackend(self) -> None:
        """
        A move to a backend that is not configured is refused.
        """
        failure = self.failureResultOf(self.mover.move("elsewhere", ["alice@example.org"]), MoveError)
        self.assertEqual(str(failure.value), "unknown backend 'elsewhere'; configured backends: new, old")

    def test_nothingNamed(self) -> None:
        """
        A move needs accounts or a domain.
        """
        failure = self.failureResultOf(self.mover.move("new"), MoveError)
        self.assertEqual(str(failure.value), "name at least one account or a domain")

    def test_routerWithoutStore(self) -> None:
        """
        A router that cannot change routes makes the move fail with why.
        """
        proxy = ProxyHarness(FakeRouter(), gate=LoginHold())
        failure = self.failureResultOf(Mover(proxy.context, BACKENDS, proxy.clock).move("new", ["a@b"]), MoveError)
        self.assertEqual(str(failure.value), "the router (fake) cannot change routes")

    def test_hold(self) -> None:
        """
        With a hold, a login of a moving account that starts during the
        move waits until the hold ends, then reaches the new backend; the
        move's result arrives when the hold ends.
        """
        release: Deferred[None] = Deferred()
        original = self.store.setRoutes

        def slowWrite(changes):
            # The store takes its time, like a database would.
            return release.addCallback(lambda _: original(changes))

        self.store.setRoutes = slowWrite  # type: ignore[method-assign]
        moving = self.mover.move("new", ["alice@example.org"], hold=5)
        frontend, client = self.proxy.connect()
        frontend.dataReceived(b"a LOGIN alice@example.org secret\r\n")
        self.assertEqual(self.proxy.connector.protocols, [])
        release.callback(None)
        self.assertEqual(self.proxy.connector.protocols, [])
        self.assertNoResult(moving)
        self.proxy.clock.advance(5)
        self.assertEqual(self.successResultOf(moving).held, 5)
        self.assertEqual(len(self.proxy.connector.protocols), 1)
        self.proxy.connector.protocols[0].dataReceived(GREETING)
        self.proxy.connector.protocols[0].dataReceived(LOGGED_IN)
        self.assertEqual(frontend.backendName, "new")

    def test_holdOnlyTheMovingAccounts(self) -> None:
        """
        Other accounts log in during a hold as usual.
        """
        self.mover.move("new", ["alice@example.org"], hold=5)
        frontend, _ = self.proxy.connect()
        frontend.dataReceived(b"a LOGIN dave@example.org secret\r\n")
        self.assertEqual(len(self.proxy.connector.protocols), 1)

    def test_holdBounded(self) -> None:
        """
        A hold longer than a minute is refused.
        """
        failure = self.failureResultOf(self.mover.move("new", ["alice@example.org"], hold=61), MoveError)
        self.assertEqual(str(failure.value), "hold must be 0 to 60 seconds, not 61")

    def test_noDrop(self) -> None:
        """
        Without dropping, the sessions go on and are not reported.
        """
        alice, aliceClient, _ = self.proxy.login("alice@example.org")
        result = self.successResultOf(self.mover.move("new", ["alice@example.org"], drop=False))
        self.assertEqual(result.sessions, ())
        self.assertEqual(aliceClient.value(), b"")


class ExplainTests(SynchronousTestCase):
    """
    L{explainRoute}.
    """

    def test_static(self) -> None:
        """
        The static router behind a cache says which rule and backend decide.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "routes.toml")
        with open(path, "w") as f:
            f.write(TABLE)
        router = Cache(StaticRouter(path, BACKENDS))
        self.assertEqual(
            self.successResultOf(explainRoute(router, "static", "erin@example.net")),
            {
                "account": "erin@example.net",
                "router": "static",
                "chain": ["Cache", "StaticRouter"],
                "rule": "domains['example.net']",
                "backend": "old",
                "explained": True,
            },
        )

    def test_chain(self) -> None:
        """
        In a chain, the routers are asked in order: a route table without a
        rule passes on, and a router that decides only at login ends the
        search without an answer.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "moved.toml")
        with open(path, "w") as f:
            f.write('[accounts]\n"alice@example.org" = "new"\n')

        class Chain:
            def __init__(self, *routers):
                self.routers = routers

            def route(self, request):
                raise AssertionError("not asked")

        router = Chain(Cache(StaticRouter(path, BACKENDS)), FakeRouter())
        alice = self.successResultOf(explainRoute(router, "chain", "alice@example.org"))
        self.assertEqual((alice["explained"], alice["rule"], alice["backend"]), (True, "accounts['alice@example.org']", "new"))
        self.assertEqual(alice["chain"], ["Chain", "Cache", "StaticRouter", "FakeRouter"])
        bob = self.successResultOf(explainRoute(router, "chain", "bob@example.org"))
        self.assertEqual((bob["explained"], bob["rule"], bob["backend"]), (False, None, None))

    def test_cannotTell(self) -> None:
        """
        A router that decides only at login says so.
        """
        answer = self.successResultOf(explainRoute(FakeRouter(), "python:x.Y", "a@b"))
        self.assertEqual((answer["explained"], answer["backend"]), (False, None))
