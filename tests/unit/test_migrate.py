"""
Tests for L{mailproxy._migrate}: moving accounts with a real static route
table and in-memory sessions.
"""

from __future__ import annotations

import os
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import alsoProvides, implementer

from mailproxy._migrate import MOVED, LoginHold, MoveError, MoveResult, Mover, RouteChange
from mailproxy._routing import explainRoute
from mailproxy.interfaces import IRouteCache, IRouteStore
from mailproxy.routers import static
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


@implementer(IRouteCache)
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

    def test_domainReportsKept(self) -> None:
        """
        A domain move says which of the domain's accounts keep an entry of
        their own on another backend (so do not move), in the dry run too;
        their sessions go on.  An account whose own entry already names
        the target is not among them.
        """
        with open(self.path, "w") as f:
            f.write(TABLE + '"dora@example.net" = "new"\n"frank@example.org" = "old"\n')
        self.store.reload()
        carol, carolClient, _ = self.proxy.login("carol@example.net")
        dry = self.successResultOf(self.mover.move("new", domain="example.net", dryRun=True))
        self.assertEqual(dry.kept, ("carol@example.net",))
        self.assertEqual((dry.asJSON()["kept"], dry.asJSON()["keptAccounts"]), (1, ["carol@example.net"]))
        result = self.successResultOf(self.mover.move("new", domain="example.net"))
        self.assertEqual(result.changes, (RouteChange("@example.net", "old", "new"),))
        self.assertEqual(result.kept, ("carol@example.net",))
        self.assertIn('"carol@example.net" = "old"', self.read())
        self.assertEqual(carolClient.value(), b"")

    def test_domainIncludeAccounts(self) -> None:
        """
        With C{includeAccounts}, a domain move also moves the domain's
        accounts that have an entry of their own, drops their sessions,
        and keeps none behind.
        """
        carol, carolClient, _ = self.proxy.login("carol@example.net")
        result = self.successResultOf(self.mover.move("new", domain="example.net", includeAccounts=True))
        self.assertEqual(
            result.changes,
            (RouteChange("carol@example.net", "old", "new"), RouteChange("@example.net", "old", "new")),
        )
        self.assertEqual(result.kept, ())
        self.assertEqual(result.sessions, (carol.client.sessionId,))
        self.assertIn('"carol@example.net" = "new"', self.read())
        self.assertEqual(carolClient.value(), b"* BYE " + MOVED.encode() + b"\r\n")
        self.assertEqual(self.cache.invalidated, ["carol@example.net", "example.net"])

    def test_cacheInvalidatedOnce(self) -> None:
        """
        A cache that can forget many names at once is asked once for the
        whole move (one pass over its entries), not once per account.
        """
        calls: list[list[str]] = []
        self.cache.invalidateMany = calls.append  # type: ignore[attr-defined]
        accounts = [f"user{i}@example.org" for i in range(50)]
        self.successResultOf(self.mover.move("new", accounts, domain="example.net"))
        self.assertEqual(calls, [[*accounts, "example.net"]])
        self.assertEqual(self.cache.invalidated, [])

    def test_storeKeysCompared(self) -> None:
        """
        A store that lists keys with capitals (a database's rows as
        written) has them matched without case: the change says what the
        entry named before, and a domain move names the account as kept.
        """
        class Store:
            def routes(self) -> dict[str, str]:
                return {"Alice@Example.ORG": "old", "@example.org": "old", "Zed@Example.net": "old"}

            def setRoutes(self, changes: dict[str, str]) -> None:
                pass

        alsoProvides(store := Store(), IRouteStore)
        proxy = ProxyHarness(store, gate=LoginHold())
        mover = Mover(proxy.context, BACKENDS, proxy.clock)
        result = self.successResultOf(mover.move("new", ["alice@example.org"], domain="example.net", dryRun=True))
        self.assertEqual(
            result.changes, (RouteChange("alice@example.org", "old", "new"), RouteChange("@example.net", None, "new"))
        )
        self.assertEqual(result.kept, ("zed@example.net",))

    def test_includeAccountsNeedsDomain(self) -> None:
        """
        C{includeAccounts} without a domain is refused.
        """
        failure = self.failureResultOf(self.mover.move("new", ["alice@example.org"], includeAccounts=True), MoveError)
        self.assertEqual(str(failure.value), "include_accounts needs a domain")

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


class BulkMoveTests(TestCase):
    """
    A move of many accounts with the proxy's own reactor: the route table
    is edited in a thread while the reactor goes on.
    """

    def test_reactorTurnsDuringMove(self) -> None:
        """
        A move of 1,000 accounts in a 20,000-entry table writes the file in
        another thread, and while it does, the reactor keeps running: a
        LoopingCall runs three times before the move is done (the thread
        waits for them before it replaces the file).  The moved accounts'
        sessions are dropped and their next logins go to the new backend.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "routes.toml")
        with open(path, "w") as f:
            f.write('default = "old"\n[accounts]\n' + "".join(f'"user{i}@x" = "old"\n' for i in range(20000)))
        store = StaticRouter(path, BACKENDS, reactor=reactor)
        self.addCleanup(store.close)
        proxy = ProxyHarness(store, gate=LoginHold())
        mover = Mover(proxy.context, BACKENDS, reactor)
        _, movedClient, _ = proxy.login("user20@x")
        _, stayingClient, _ = proxy.login("user21@x")

        main = threading.get_ident()
        writers: list[int] = []
        turned = threading.Event()
        original = static.replaceFile

        def replaceFile(path: str, text: str) -> None:
            writers.append(threading.get_ident())
            # Bounded, so that a reactor that does not turn fails the test
            # below instead of hanging it.
            turned.wait(10)
            original(path, text)

        self.patch(static, "replaceFile", replaceFile)
        done: list[bool] = []
        moving = mover.move("new", [f"user{i}@x" for i in range(0, 20000, 20)])
        moving.addBoth(lambda result: done.append(True) or result)
        duringMove: list[bool] = []

        def tick() -> None:
            duringMove.append(not done)
            if len(duringMove) == 3:
                turned.set()

        probe = LoopingCall(tick)
        probe.start(0.001)

        def moved(result: MoveResult) -> None:
            probe.stop()
            self.assertEqual(len(writers), 1)
            self.assertNotEqual(writers[0], main)
            self.assertEqual(duringMove[:3], [True, True, True])
            self.assertEqual(len(result.changes), 1000)
            self.assertEqual(movedClient.value(), b"* BYE " + MOVED.encode() + b"\r\n")
            self.assertEqual(stayingClient.value(), b"")
            self.assertEqual(proxy.login("user20@x")[0].backendName, "new")
            self.assertEqual(proxy.login("user21@x")[0].backendName, "old")

        return moving.addCallback(moved)


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
