"""
Tests for L{mailproxy._fleet}: two proxies (real sessions over in-memory
transports) sharing their state through an in-memory stand-in for Redis
that can go away and come back.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._fleet import HOLD_LIMIT, MAX_RETRY_DELAY, Fleet, joinFleet
from mailproxy._lifecycle import ProxyService
from mailproxy._migrate import MOVED, LoginHold, MoveError
from mailproxy.config import ClusterConfig
from mailproxy.model import ClientInfo, Credentials, RouteRequest
from mailproxy.interfaces import IRouteStore
from mailproxy.model import Route
from mailproxy.routers.static import StaticRouter
from mailproxy.testing import makeBackend
from zope.interface import implementer

from .opsfixtures import ProxyHarness

TABLE = """\
default = "old"

[accounts]
"alice@example.org" = "old"
"""

BACKENDS = {name: makeBackend(name) for name in ("old", "new")}


@implementer(IRouteStore)
class SharedStore:
    """
    A route store every proxy of the fleet reads (as SQL, HTTP or LDAP
    are), in memory.
    """

    def __init__(self) -> None:
        self.entries = {"alice@example.org": "old"}

    def route(self, request: RouteRequest) -> Route:
        user = request.credentials.user.lower() if request.credentials else ""
        return Route(backend=BACKENDS[self.entries.get(user, "old")])

    def routes(self) -> dict[str, str]:
        return dict(self.entries)

    def setRoute(self, key: str, backend: str) -> None:
        self.entries[key] = backend

    def deleteRoute(self, key: str) -> None:
        self.entries.pop(key, None)


class _Transport:
    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def loseConnection(self) -> None:
        self.connection.open = False

    abortConnection = loseConnection


class FakeClient:
    """
    A connection to L{FakeRedis}: the commands the fleet sends, answered
    at once (or failed once the connection is closed).
    """

    def __init__(self, redis: FakeRedis, fleet: Fleet) -> None:
        self.redis = redis
        self.fleet = fleet
        self.open = True
        self.transport = _Transport(self)

    def _answer(self, value: Any) -> Deferred[Any]:
        if not self.open:
            return fail(ConnectionDone("Lost connection"))
        self.redis.commands += 1
        return succeed(value)

    def hset(self, key: str, field: str, value: str) -> Deferred[Any]:
        self.redis.hashes.setdefault(key, {})[field] = value
        return self._answer(1)

    def hmset(self, key: str, mapping: dict[str, str]) -> Deferred[Any]:
        self.redis.hashes.setdefault(key, {}).update(mapping)
        return self._answer("OK")

    def hdel(self, key: str, field: str) -> Deferred[Any]:
        self.redis.hashes.get(key, {}).pop(field, None)
        return self._answer(1)

    def hgetall(self, key: str) -> Deferred[Any]:
        return self._answer(dict(self.redis.hashes.get(key, {})))

    def delete(self, key: str) -> Deferred[Any]:
        self.redis.hashes.pop(key, None)
        self.redis.counters.pop(key, None)
        return self._answer(1)

    def expire(self, key: str, seconds: int) -> Deferred[Any]:
        self.redis.expiries[key] = seconds
        return self._answer(1)

    def zadd(self, key: str, score: float, member: str) -> Deferred[Any]:
        self.redis.zsets.setdefault(key, {})[member] = score
        return self._answer(1)

    def zrem(self, key: str, member: str) -> Deferred[Any]:
        self.redis.zsets.get(key, {}).pop(member, None)
        return self._answer(1)

    def zrangebyscore(self, key: str, low: float, high: str) -> Deferred[Any]:
        return self._answer([member for member, score in self.redis.zsets.get(key, {}).items() if score >= low])

    def incr(self, key: str) -> Deferred[Any]:
        self.redis.counters[key] = self.redis.counters.get(key, 0) + 1
        return self._answer(self.redis.counters[key])

    def decrby(self, key: str, amount: int) -> Deferred[Any]:
        self.redis.counters[key] = self.redis.counters.get(key, 0) - amount
        return self._answer(self.redis.counters[key])

    def publish(self, channel: str, message: str) -> Deferred[Any]:
        if self.open:
            self.redis.published.append(json.loads(message))
            for subscriber in list(self.redis.subscribers):
                if subscriber.open and channel in subscriber.channels:
                    subscriber.fleet.messageReceived(channel, message)
        return self._answer(1)

    def subscribe(self, channel: str) -> Deferred[Any]:
        self.channels = {channel}
        self.redis.subscribers.append(self)
        return self._answer(None)


class FakeRedis:
    """
    What the fleet keeps in Redis, and its connections; L{stop} and
    L{start} take it away and bring it back empty (a Redis restarted
    without persistence).
    """

    def __init__(self) -> None:
        self.up = True
        self.connections: list[FakeClient] = []
        self.subscribers: list[FakeClient] = []
        self.published: list[dict[str, Any]] = []
        self.commands = 0
        self._empty()

    def _empty(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}
        self.zsets: dict[str, dict[str, float]] = {}
        self.counters: dict[str, int] = {}
        self.expiries: dict[str, int] = {}

    def connect(self, fleet: Fleet) -> Deferred[Any]:
        if not self.up:
            return fail(ConnectionRefusedError("Connection was refused by other side: 111: Connection refused."))
        client, subscriber = FakeClient(self, fleet), FakeClient(self, fleet)
        self.connections += [client, subscriber]
        return succeed((client, subscriber))

    def stop(self) -> None:
        self.up = False
        for connection in self.connections:
            if connection.open:
                connection.open = False
                connection.fleet.connectionLost(connection, Failure(ConnectionDone("Connection was closed cleanly.")))
        self.connections = []
        self.subscribers = []
        self._empty()

    def start(self) -> None:
        self.up = True


def settings(name: str, heartbeat: float = 10.0) -> ClusterConfig:
    return ClusterConfig(host="redis.test", port=6379, name=name, heartbeat=heartbeat)


class Member:
    """
    One proxy of the fleet: a L{ProxyHarness} with real sessions, its
    router, and its fleet membership.
    """

    def __init__(self, case: SynchronousTestCase, name: str, redis: FakeRedis, router: Any, clock: Any = None) -> None:
        self.harness = ProxyHarness(router, gate=LoginHold())
        if clock is not None:
            self.harness.clock = self.harness.context.reactor = clock
        self.proxy: Any = SimpleNamespace(context=self.harness.context, migrations=SimpleNamespace(mover=None), fleet=None)
        self.fleet = joinFleet(self.proxy, settings(name), BACKENDS, self.harness.clock, redis.connect)
        self.fleet.startService()
        case.addCleanup(self.fleet.stopService)

    def sessions(self, **filters: Any) -> list[dict[str, Any]]:
        """
        What C{GET /sessions} on this proxy answers.
        """
        filters = {"account": None, "backend": None, "domain": None, **filters}
        answer = ProxyService.describeSessions(self.proxy, **filters)
        return answer if isinstance(answer, list) else self.case.successResultOf(answer)


def request(user: str) -> RouteRequest:
    """
    A login of C{user}, as the gate sees it.
    """
    return RouteRequest(
        protocol="imap",
        credentials=Credentials(user=user, password=b"secret", mechanism="LOGIN"),
        client=ClientInfo(sessionId="s1", address="192.0.2.10", port=50000, localAddress="192.0.2.1", localPort=143),
    )


class FleetTests(SynchronousTestCase):
    """
    Two proxies, C{a} and C{b}, sharing one Redis.
    """

    def setUp(self) -> None:
        self.redis = FakeRedis()
        self.store = SharedStore()
        self.a = Member(self, "a", self.redis, self.store)
        self.b = Member(self, "b", self.redis, self.store, clock=self.a.harness.clock)
        self.clock = self.a.harness.clock
        for member in (self.a, self.b):
            member.case = self  # type: ignore[attr-defined]

    def test_sessionsOfEveryProxy(self) -> None:
        """
        C{/sessions} on either proxy lists the sessions logged in on both,
        each with the name of its proxy; a session that ends leaves the
        list of both.
        """
        alice, _, _ = self.a.harness.login("alice@example.org")
        bob, _, _ = self.b.harness.login("bob@example.org")
        for member in (self.a, self.b):
            listed = {(s["account"], s["proxy"], s["backend"]) for s in member.sessions()}
            self.assertEqual(listed, {("alice@example.org", "a", "old"), ("bob@example.org", "b", "old")})
        self.assertEqual([s["proxy"] for s in self.b.sessions(account="ALICE@example.org")], ["a"])
        # Another proxy's session has the keys of a local one (what only
        # its proxy knows is null), for mailproxy sessions and scripts.
        local, remote = (
            next(s for s in member.sessions() if s["account"] == "alice@example.org") for member in (self.a, self.b)
        )
        self.assertEqual(set(remote), set(local))
        self.assertEqual((remote["port"], remote["bytesFromClient"]), (local["port"], None))
        self.a.harness.close(alice)
        self.assertEqual([s["account"] for s in self.b.sessions()], ["bob@example.org"])

    def test_moveDropsEverywhere(self) -> None:
        """
        A move through C{b} drops the moved account's session on C{a}
        (with the moved goodbye), names it in its result, and leaves the
        other accounts' sessions alone.
        """
        _, aliceClient, _ = self.a.harness.login("alice@example.org")
        _, daveClient, _ = self.a.harness.login("dave@example.org")
        result = self.successResultOf(self.b.proxy.mover.move("new", ["alice@example.org"]))
        self.clock.advance(0)
        self.assertEqual(result.accounts, ("alice@example.org",))
        self.assertEqual(aliceClient.value(), b"* BYE " + MOVED.encode() + b"\r\n")
        self.assertTrue(aliceClient.disconnecting)
        self.assertEqual(daveClient.value(), b"")
        self.assertEqual(self.store.entries["alice@example.org"], "new")

    def migrateAlice(self, alice: Any, aliceClient: Any, turn: float) -> tuple[Any, list[bytes]]:
        """
        Migrate alice to new through C{b}, with scripted tool runs that
        each end on a later turn of the reactor (as a process does; the
        clock moves by C{turn} seconds in between), closing her client's
        connection on C{a} once it is dropped.

        @return: the campaign, and what her client had got as each tool
            run started.
        """
        from mailproxy.migration import MigrationManager, MigrationSettings
        from mailproxy.migration._manager import LOGIN_POLL

        from .test_migration_manager import BACKENDS as MASTERED, OK, ScriptedClients, ScriptedTools, syncRun

        tools = ScriptedTools()
        runs: list[Deferred[Any]] = [Deferred() for _ in range(8)]
        tools.answers = list(runs)
        seen: list[bytes] = []
        tools.onRun = lambda run: seen.append(aliceClient.value())
        manager = MigrationManager(
            reactor=self.clock,
            mover=self.b.proxy.mover,
            router=self.store,
            backends=MASTERED,
            sessions=self.b.harness.context.sessions,
            settings=MigrationSettings(doveadmConfig={"new": "/etc/dovecot/new.conf"}),
            journalPath=None,
            routerName="sql",
            runTool=tools,
            runBlocking=syncRun,
            clients=ScriptedClients(),
        )
        campaign = self.successResultOf(manager.start(["alice@example.org"], "new"))
        steps = [0] + [LOGIN_POLL] * max(1, round(turn / LOGIN_POLL))
        closed = False
        for run in runs:
            self.clock.pump(steps)
            if aliceClient.disconnecting and not closed:
                # The dropped client's connection closes.
                self.a.harness.close(alice)
                closed = True
                self.clock.pump([0, LOGIN_POLL])
            if not run.called:
                run.callback(OK)
        self.clock.pump([0, LOGIN_POLL])
        return campaign, seen

    def test_migrationDropsEverywhere(self) -> None:
        """
        A migration run by C{b} has C{a} drop the account's session at its
        hold (with the moved goodbye), before the final sync, and flips the
        shared route.
        """
        alice, aliceClient, _ = self.a.harness.login("alice@example.org")
        campaign, seen = self.migrateAlice(alice, aliceClient, 0.05)
        self.assertEqual(campaign.state, "done", campaign.describe())
        # The bulk copy (two runs) with the session open, the final sync
        # after its goodbye.
        self.assertEqual(seen[:2], [b"", b""])
        self.assertEqual(seen[2:], [b"* BYE " + MOVED.encode() + b"\r\n"] * (len(seen) - 2))
        self.assertEqual(aliceClient.value(), b"* BYE " + MOVED.encode() + b"\r\n")
        self.assertEqual(self.store.entries["alice@example.org"], "new")

    def test_migrationDropsEverywhereAfterLocalWait(self) -> None:
        """
        A login on C{b} stuck at its backend uses up the wait for local
        logins under way; the account's session on C{a} is dropped all the
        same, before the final sync.
        """
        from mailproxy.settings import Limits

        alice, aliceClient, _ = self.a.harness.login("alice@example.org")
        stuck, _ = self.b.harness.connect()
        stuck.dataReceived(b"a LOGIN alice@example.org secret\r\n")
        self.b.harness.context.limits = Limits(backendTimeout=1.0)
        campaign, seen = self.migrateAlice(alice, aliceClient, 1.25)
        self.assertEqual(campaign.state, "done", campaign.describe())
        self.assertEqual(seen[:2], [b"", b""])
        self.assertEqual(seen[2:], [b"* BYE " + MOVED.encode() + b"\r\n"] * (len(seen) - 2))

    def test_staticTableMoveRefused(self) -> None:
        """
        A move in a fleet whose route table is a static file (each proxy
        its own) is refused with what to do instead; nothing changes.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "routes.toml")
        with open(path, "w") as f:
            f.write(TABLE)
        member = Member(self, "c", self.redis, StaticRouter(path, BACKENDS), clock=self.clock)
        _, client, _ = member.harness.login("alice@example.org")
        error = self.failureResultOf(member.proxy.mover.move("new", ["alice@example.org"]), MoveError).value
        self.assertIn("static route table is this proxy's own file", str(error))
        self.assertIn("a shared route store (the sql router's database)", str(error))
        with open(path) as f:
            self.assertEqual(f.read(), TABLE)
        self.assertEqual(client.value(), b"")

    def test_dropEverywhere(self) -> None:
        """
        C{POST /sessions/drop} on C{b} for an account drops its sessions on
        both proxies, with the reason given, and names them all.
        """
        _, onA, _ = self.a.harness.login("alice@example.org")
        _, onB, _ = self.b.harness.login("alice@example.org")
        _, other, _ = self.a.harness.login("bob@example.org")
        dropped = self.successResultOf(ProxyService.dropSessions(self.b.proxy, "alice@example.org", None, None, "Maintenance."))
        self.clock.advance(0)
        self.assertEqual(len(dropped), 2)
        for client in (onA, onB):
            self.assertEqual(client.value(), b"* BYE Maintenance.\r\n")
        self.assertEqual(other.value(), b"")

    def test_holdEverywhere(self) -> None:
        """
        A hold made on C{a} (a move's) holds the account's logins on C{b}
        until C{a} releases it; other accounts' logins go on.
        """
        release = self.a.harness.context.gate.hold(["alice@example.org"], [])
        waiting = self.b.harness.context.gate.wait(request("Alice@example.org"))
        self.assertIsNotNone(waiting)
        self.assertIsNone(self.b.harness.context.gate.wait(request("bob@example.org")))
        assert waiting is not None
        self.assertNoResult(waiting)
        release()
        self.successResultOf(waiting)
        self.assertIsNone(self.b.harness.context.gate.wait(request("alice@example.org")))

    def test_holdOfAGoneProxyEnds(self) -> None:
        """
        A hold whose proxy never releases it (it died) ends after
        L{HOLD_LIMIT} seconds.
        """
        self.a.harness.context.gate.hold(["alice@example.org"], [])
        self.clock.advance(HOLD_LIMIT - 1)
        waiting = self.b.harness.context.gate.wait(request("alice@example.org"))
        assert waiting is not None
        self.clock.advance(1)
        self.successResultOf(waiting)

    def test_routesForgottenEverywhere(self) -> None:
        """
        A route changed through C{a} is forgotten by the route caches of
        C{b}.
        """
        forgotten: list[tuple[str, ...]] = []
        self.patch(
            __import__("mailproxy._fleet", fromlist=["invalidateCaches"]),
            "invalidateCaches",
            lambda router, *keys: forgotten.append(keys),
        )
        self.a.proxy.mover.invalidate("alice@example.org", "@example.net")
        self.assertEqual(forgotten, [("alice@example.org", "@example.net")])

    def test_failuresCountedByTheFleet(self) -> None:
        """
        Failed logins from one address on both proxies add up: the fifth,
        wherever it happens, counts five, and Redis keeps the count with
        an expiry.
        """
        counts = []
        for member in (self.a, self.b, self.a, self.b, self.b):
            counts.append(member.fleet.failures.failed("198.51.100.7"))
        self.assertEqual(counts, [1, 2, 3, 4, 5])
        self.assertEqual(self.redis.counters["mailproxy:failures:198.51.100.7"], 5)
        self.assertEqual(self.redis.expiries["mailproxy:failures:198.51.100.7"], 900)
        self.assertEqual(self.a.fleet.failures.failed("192.0.2.99"), 1)

    def test_forgivenInTheFleet(self) -> None:
        """
        Failures forgiven on one proxy come off the count in Redis and on
        every proxy; forgiving all of them removes the key, so the next
        failure, anywhere, counts one again.
        """
        for member in (self.a, self.b, self.a):
            member.fleet.failures.failed("198.51.100.7")
        self.b.fleet.failures.forgive("198.51.100.7", 2)
        self.assertEqual(self.redis.counters["mailproxy:failures:198.51.100.7"], 1)
        self.assertEqual((self.a.fleet.failures.recent("198.51.100.7"), self.b.fleet.failures.recent("198.51.100.7")), (1, 1))
        self.a.fleet.failures.forgive("198.51.100.7", 1)
        self.assertNotIn("mailproxy:failures:198.51.100.7", self.redis.counters)
        self.assertEqual(self.b.fleet.failures.recent("198.51.100.7"), 0)
        self.assertEqual(self.b.fleet.failures.failed("198.51.100.7"), 1)

    def test_redisDownLoginsGoOn(self) -> None:
        """
        With Redis gone, logins go on, the health says why, the log says
        so, and the proxy lists its own sessions; it tries again after a
        back-off that doubles, and when Redis is back it registers its
        open sessions again, so the other proxy lists them.
        """
        logged: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.assertEqual(self.a.fleet.health(), {"name": "a", "redis": "ok"})
        self.redis.stop()
        health = self.a.fleet.health()
        self.assertEqual(health["redis"], "unavailable")
        self.assertIn("Redis at redis.test:6379", health["why"])
        self.assertTrue(any("serving with this proxy's own state" in str(e.get("log_format")) for e in logged))
        alice, aliceClient, _ = self.a.harness.login("alice@example.org")
        self.assertEqual([s["account"] for s in self.a.sessions()], ["alice@example.org"])
        self.assertEqual(self.a.fleet.failures.failed("198.51.100.7"), 1)
        # 1, 2, 4, ... seconds, at most MAX_RETRY_DELAY.
        attempts = []
        original = self.redis.connect

        def counting(fleet: Fleet) -> Deferred[Any]:
            attempts.append(self.clock.seconds())
            return original(fleet)

        self.a.fleet.connect = counting
        self.clock.pump([0.5] * 200)
        gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:])]
        self.assertEqual(gaps[:5], [2.0, 4.0, 8.0, 16.0, MAX_RETRY_DELAY])
        self.assertEqual(max(gaps), MAX_RETRY_DELAY)
        self.redis.start()
        self.b.fleet.connect = self.redis.connect
        self.clock.advance(MAX_RETRY_DELAY)
        self.assertEqual(self.a.fleet.health(), {"name": "a", "redis": "ok"})
        self.assertEqual([(s["account"], s["proxy"]) for s in self.b.sessions()], [("alice@example.org", "a")])

    def test_slowRedisIsTrouble(self) -> None:
        """
        A command that fails (the client's time-out closes a connection
        that does not answer) makes the proxy go on alone; it connects
        again afterwards.
        """
        self.a.fleet.trouble(Failure(Exception("Not received Redis response in 2.0 seconds")))
        self.assertIn("Not received Redis response", self.a.fleet.health()["why"])
        self.a.harness.login("alice@example.org")
        self.clock.advance(1)
        self.assertEqual(self.a.fleet.health()["redis"], "ok")
        self.assertEqual([s["proxy"] for s in self.b.sessions()], ["a"])

    def test_subscribeRefused(self) -> None:
        """
        A Redis that refuses the subscription (an ACL, say) is trouble like
        any other: the proxy serves alone, says why, and tries again.
        """
        self.redis.stop()
        self.redis.start()
        original = FakeClient.subscribe
        self.patch(FakeClient, "subscribe", lambda client, channel: fail(Exception("NOPERM this user has no permissions")))
        self.clock.advance(1)
        self.assertIn("NOPERM", self.a.fleet.health()["why"])
        self.patch(FakeClient, "subscribe", original)
        self.clock.advance(2)
        self.assertEqual(self.a.fleet.health()["redis"], "ok")

    def test_heartbeat(self) -> None:
        """
        Each heartbeat renews the proxy's entry (its expiry three
        heartbeats); a proxy whose entry is older is not listed.
        """
        self.a.harness.login("alice@example.org")
        self.assertEqual(self.redis.expiries["mailproxy:sessions:a"], 30)
        self.a.fleet.stopService()
        self.a.fleet.running = True  # gone without saying goodbye
        self.redis.zsets["mailproxy:proxies"]["a"] = self.clock.seconds()
        self.redis.hashes["mailproxy:sessions:a"] = {"x": json.dumps({"session": "x", "account": "z", "since": 0})}
        self.assertEqual(len(self.b.sessions()), 1)
        self.clock.advance(31)
        self.assertEqual(self.b.sessions(), [])

    def test_stopLeaves(self) -> None:
        """
        A proxy that stops removes its entry from the fleet's registry.
        """
        self.a.harness.login("alice@example.org")
        self.a.fleet.stopService()
        self.assertNotIn("mailproxy:sessions:a", self.redis.hashes)
        self.assertNotIn("a", self.redis.zsets["mailproxy:proxies"])


MACHINE = """\
[proxy]
hostname = "proxy.example.org"
workers = 2
[[listener]]
protocol = "imap"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"
[router]
type = "static"
path = "routes.toml"
[backend.old]
host = "127.0.0.1"
ports = { imap = 143 }
[backend.new]
host = "127.0.0.1"
ports = { imap = 144 }
[cluster]
redis = "redis://redis.test"
name = "m"
"""


class MachineInFleetTests(SynchronousTestCase):
    """
    The parent of two worker processes (L{mailproxy._workers.Machine},
    its workers stood in for) as the machine's member of a fleet, beside
    a one-process proxy C{a}.
    """

    def setUp(self) -> None:
        from mailproxy._workers import Machine
        from mailproxy.config import parseConfig

        from tests.unit.test_workers import configFile

        path = configFile(self, MACHINE)
        self.redis = FakeRedis()
        self.store = SharedStore()
        self.a = Member(self, "a", self.redis, self.store)
        self.a.case = self  # type: ignore[attr-defined]
        self.clock = self.a.harness.clock
        config = parseConfig(MACHINE, path)
        self.machine = Machine(config, 2, self.clock, [])
        # The route store the fleet shares (a static file would refuse moves).
        self.machine.context.router = self.store
        self.told: list[tuple[str, Any]] = []
        self.machine.tellWorkers = lambda method, argument: self.told.append((method, argument))  # type: ignore[method-assign]
        assert config.cluster is not None
        self.fleet = self.machine.joinFleet(config.cluster, self.redis.connect)
        self.fleet.startService()
        self.addCleanup(self.fleet.stopService)
        self.one, self.two = self.machine.workers
        self.drops: list[tuple[int, str, str]] = []
        for worker in (self.one, self.two):
            worker.dropLater = lambda sessionId, reason, worker=worker: self.drops.append((worker.number, sessionId, reason))  # type: ignore[method-assign]
        self.handlers = {worker.number: self.machine.handlersFor(worker) for worker in (self.one, self.two)}

    def login(self, worker: int, sessionId: str, account: str) -> None:
        """
        Worker C{worker} tells the parent of a login.
        """
        self.handlers[worker]["loggedIn"](
            {"account": account, "backend": "old", "session": sessionId, "protocol": "imap", "address": "192.0.2.9", "port": 4000}
        )

    def test_workersSessionsInTheFleet(self) -> None:
        """
        The workers' logins, told to the parent, are the machine's sessions
        in the fleet: C{a} lists them with the machine's name; a session's
        end, or its worker's death, takes it out.
        """
        self.login(1, "w1", "alice@example.org")
        self.login(2, "w2", "bob@example.org")
        listed = {(s["session"], s["account"], s["proxy"]) for s in self.a.sessions()}
        self.assertEqual(listed, {("w1", "alice@example.org", "m"), ("w2", "bob@example.org", "m")})
        self.handlers[1]["ended"]({"session": "w1"})
        self.assertEqual([s["session"] for s in self.a.sessions()], ["w2"])
        self.machine.running = False
        self.machine.workerEnded(self.two, "was killed by signal 9")
        self.assertEqual(self.a.sessions(), [])

    def test_moveThroughAnotherProxy(self) -> None:
        """
        A move through C{a} holds the logins in every worker (and then
        releases them), drops the account's session in its worker, and
        makes every worker forget the changed route.
        """
        self.login(2, "w2", "alice@example.org")
        self.login(1, "w1", "bob@example.org")
        moving = self.a.proxy.mover.move("new", ["alice@example.org"], hold=1.0)
        self.clock.advance(0)
        self.assertEqual(self.drops, [(2, "w2", MOVED)])
        self.assertEqual(self.told[0][0], "hold")
        self.assertEqual(self.told[0][1]["accounts"], ["alice@example.org"])
        self.assertIn(("routesChanged", ["alice@example.org"]), self.told)
        self.assertNotIn("release", [method for method, _ in self.told])
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(moving).sessions, ("w2",))
        self.assertEqual(self.told[-1][0], "release")

    def test_moveThroughTheMachine(self) -> None:
        """
        A move through the machine drops the account's sessions on C{a}
        too, and the machine lists C{a}'s sessions.
        """
        _, client, _ = self.a.harness.login("alice@example.org")
        listed: list[Any] = []
        self.machine.askWorkers = lambda method, argument=None: succeed([(self.one, []), (self.two, [])])  # type: ignore[method-assign]
        self.machine.describeSessions().addCallback(listed.append)
        self.assertEqual([(s["account"], s["proxy"]) for s in listed[0]], [("alice@example.org", "a")])
        result = self.successResultOf(self.machine.mover.move("new", ["alice@example.org"]))
        self.clock.advance(0)
        self.assertEqual(len(result.sessions), 1)
        self.assertEqual(client.value(), b"* BYE " + MOVED.encode() + b"\r\n")

    def test_failuresLearnedAreToldToWorkers(self) -> None:
        """
        Failed logins counted on C{a} reach the machine's workers; a
        failure in a worker counts with them.
        """
        self.a.fleet.failures.failed("198.51.100.7")
        self.a.fleet.failures.failed("198.51.100.7")
        self.assertIn(("failures", {"address": "198.51.100.7", "count": 2}), self.told)
        self.handlers[1]["failed"]("198.51.100.7")
        self.assertEqual(self.redis.counters["mailproxy:failures:198.51.100.7"], 3)
        self.assertEqual(self.told[-1], ("failures", {"address": "198.51.100.7", "count": 3}))

    def test_forgivenForWorkers(self) -> None:
        """
        Failures a worker forgives come off the fleet's count, and every
        worker is told the count left; so are those another proxy forgives.
        """
        self.a.fleet.failures.failed("198.51.100.7")
        self.a.fleet.failures.failed("198.51.100.7")
        self.handlers[1]["forgive"]({"address": "198.51.100.7", "count": 1})
        self.assertEqual(self.redis.counters["mailproxy:failures:198.51.100.7"], 1)
        self.assertEqual(self.told[-1], ("lower", {"address": "198.51.100.7", "count": 1}))
        self.a.fleet.failures.failed("198.51.100.8")
        self.a.fleet.failures.forgive("198.51.100.8", 1)
        self.assertEqual(self.told[-1], ("lower", {"address": "198.51.100.8", "count": 0}))
        self.assertEqual(self.fleet.failures.recent("198.51.100.8"), 0)
