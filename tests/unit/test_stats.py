"""
Tests for L{mailproxy._stats} and the session path's hooks for operations:
the session registry, dropping a session, the login gate, the counters,
and the log events at session end and for failed logins.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Callable

import twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailproxy import __version__
from mailproxy._stats import LOGIN_BUCKETS, LatencyHistogram, ProxyStats, metricsText, routerChain, snapshot
from mailproxy._tls import CertificateSource, makeSelfSigned, serverOptions
from mailproxy.config import Limits, Listener
from mailproxy.interfaces import IRouteCache
from mailproxy.model import Rejection, Route
from mailproxy.tap import listenerFactory
from mailproxy.testing import FakeRouter, makeBackend

from .opsfixtures import GREETING, LOGGED_IN, ProxyHarness

OLD = makeBackend("old")
NEW = makeBackend("new")


def harness(**kwargs) -> ProxyHarness:
    """
    A proxy routing alice and bob to old, carol to new.
    """
    router = FakeRouter(
        {
            "alice@example.org": Route(OLD, rule="accounts -> old"),
            "bob@example.net": Route(OLD),
            "carol@example.org": Route(NEW),
        }
    )
    return ProxyHarness(router, **kwargs)


def captureEvents(testCase: SynchronousTestCase) -> list[dict]:
    """
    Collect the log events emitted during the test.
    """
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    testCase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


class RegistryTests(SynchronousTestCase):
    """
    L{mailproxy._session.SessionRegistry}.
    """

    def test_findByAccountBackendDomain(self) -> None:
        """
        Sessions are found by account (without case), by backend and by
        domain; a session not logged in has no backend.
        """
        proxy = harness()
        alice, _, _ = proxy.login("alice@example.org")
        bob, _, _ = proxy.login("bob@example.net")
        carol, _, _ = proxy.login("carol@example.org")
        waiting, _ = proxy.connect()
        sessions = proxy.context.sessions
        self.assertEqual(len(sessions), 4)
        self.assertEqual(sessions.find(account="ALICE@example.org"), [alice])
        self.assertEqual(set(sessions.find(backend="old")), {alice, bob})
        self.assertEqual(set(sessions.find(domain="Example.ORG")), {alice, carol})
        self.assertEqual(sessions.find(domain="example.org", backend="new"), [carol])
        self.assertEqual(set(sessions.find()), {alice, bob, carol, waiting})
        self.assertIsNone(waiting.backendName)

    def test_closedSessionsLeave(self) -> None:
        """
        A closed session leaves the registry, and L{whenEmpty} fires when
        the last one is gone.
        """
        proxy = harness()
        alice, _, _ = proxy.login("alice@example.org")
        other, _ = proxy.connect()
        empty = proxy.context.sessions.whenEmpty()
        proxy.close(alice)
        self.assertNotIn(alice, proxy.context.sessions)
        self.assertNoResult(empty)
        proxy.close(other)
        self.assertIsNone(self.successResultOf(empty))
        self.assertIsNone(self.successResultOf(proxy.context.sessions.whenEmpty()))


class DropTests(SynchronousTestCase):
    """
    L{FrontendProtocol.drop}.
    """

    def test_dropRelayed(self) -> None:
        """
        A relayed session gets the protocol's goodbye and both its
        connections are closed; the session end says it was dropped.
        """
        events = captureEvents(self)
        proxy = harness()
        alice, client, backend = proxy.login("alice@example.org")
        alice.drop("Account moved, please reconnect.")
        self.assertEqual(client.value(), b"* BYE Account moved, please reconnect.\r\n")
        self.assertTrue(client.disconnecting)
        self.assertTrue(backend.disconnecting)
        proxy.close(alice)
        (end,) = [e for e in events if e.get("event") == "session_end"]
        self.assertEqual(end["reason"], "dropped: Account moved, please reconnect.")
        self.assertEqual(end["result"], "ok")

    def test_endEventAsLoggerMakesIt(self) -> None:
        """
        The session-end event carries what Twisted's C{Logger.info} puts in
        an event: the session's logger, level, namespace and source, the
        format of its one line, and the time; the line reads as it did.
        """
        events = captureEvents(self)
        proxy = harness()
        alice, client, _ = proxy.login("alice@example.org")
        before = time.time()
        proxy.close(alice)
        (end,) = [e for e in events if e.get("event") == "session_end"]
        self.assertEqual(end["log_level"], LogLevel.info)
        self.assertEqual(end["log_namespace"], f"{type(alice).__module__}.{type(alice).__name__}")
        self.assertIs(end["log_source"], alice)
        self.assertEqual(end["log_logger"].namespace, end["log_namespace"])
        self.assertEqual(end["log_format"], "{text}")
        self.assertGreaterEqual(end["log_time"], before)
        self.assertEqual(formatEvent(end), end["text"])
        self.assertTrue(end["text"].startswith(f"session {alice.client.sessionId} end: imap from "))

    def test_dropTwice(self) -> None:
        """
        Dropping a session that is already ending writes nothing more.
        """
        proxy = harness()
        alice, client, _ = proxy.login("alice@example.org")
        alice.drop("first")
        client.clear()
        alice.drop("second")
        self.assertEqual(client.value(), b"")

    def test_dropBeforeLogin(self) -> None:
        """
        A session not logged in gets the goodbye and is closed.
        """
        proxy = harness()
        frontend, client = proxy.connect()
        frontend.drop("Server shutting down.")
        self.assertEqual(client.value(), b"* BYE Server shutting down.\r\n")
        self.assertTrue(client.disconnecting)

    def test_dropDuringLogin(self) -> None:
        """
        A session whose login is on its way to the backend is dropped too:
        the login is abandoned, so it never hands over after the goodbye,
        and the backend connection goes with the client's.
        """
        proxy = harness()
        frontend, client = proxy.connect()
        frontend.dataReceived(b"a LOGIN alice@example.org secret\r\n")
        self.assertEqual(frontend.backendName, "old")
        frontend.drop("Account moved, please reconnect.")
        self.assertEqual(client.value(), b"* BYE Account moved, please reconnect.\r\n")
        self.assertTrue(client.disconnecting)
        self.assertTrue(proxy.connector.transports[-1].disconnecting)
        proxy.connector.protocols[-1].dataReceived(GREETING)
        self.assertIsNone(frontend.relay)
        self.assertEqual(client.value(), b"* BYE Account moved, please reconnect.\r\n")

    def test_idleTimeoutStillSaysSo(self) -> None:
        """
        The idle timeout's own goodbye is unchanged.
        """
        proxy = harness()
        alice, client, _ = proxy.login("alice@example.org")
        proxy.clock.advance(proxy.context.limits.idleTimeout + 1)
        self.assertEqual(client.value(), b"* BYE Idle timeout.\r\n")


class GateTests(SynchronousTestCase):
    """
    The login gate: a hook asked before each login is routed.
    """

    def test_heldUntilReleased(self) -> None:
        """
        A login the gate holds does not reach the router until the gate's
        Deferred fires; then it goes on as usual.
        """
        released: Deferred[None] = Deferred()
        asked = []

        class Gate:
            def wait(self, request):
                asked.append(request.credentials.user)
                return released

        proxy = harness(gate=Gate())
        frontend, client = proxy.connect()
        frontend.dataReceived(b"a LOGIN alice@example.org secret\r\n")
        self.assertEqual(asked, ["alice@example.org"])
        self.assertEqual(proxy.context.router.requests, [])
        self.assertEqual(proxy.connector.protocols, [])
        released.callback(None)
        self.assertEqual(len(proxy.context.router.requests), 1)
        self.assertEqual(len(proxy.connector.protocols), 1)

    def test_notHeld(self) -> None:
        """
        A gate that answers L{None} lets the login go on at once.
        """

        class Gate:
            def wait(self, request):
                return None

        proxy = harness(gate=Gate())
        frontend, _ = proxy.connect()
        frontend.dataReceived(b"a LOGIN alice@example.org secret\r\n")
        self.assertEqual(len(proxy.connector.protocols), 1)


class CounterTests(SynchronousTestCase):
    """
    What the session path reports to L{ProxyStats}.
    """

    def test_loginsAndBytes(self) -> None:
        """
        Logins are counted by protocol, backend and result; bytes of open
        sessions are read live, and kept when the session ends.
        """
        proxy = harness()
        alice, client, backend = proxy.login("alice@example.org")
        proxy.login("carol@example.org")
        alice.dataReceived(b"b NOOP\r\n")
        proxy.connector.protocols[0].dataReceived(b"b OK NOOP done\r\n")
        data = snapshot(proxy.context.stats, proxy.context.sessions, proxy.context.router)
        self.assertEqual(data["sessions"], {"open": 2, "byBackend": {"imap": {"old": 1, "new": 1}}})
        self.assertEqual(data["logins"], {"imap": {"old": {"ok": 1}, "new": {"ok": 1}}})
        self.assertEqual(data["bytes"]["fromClient"], 8)
        self.assertEqual(data["bytes"]["fromBackend"], 16)
        proxy.close(alice)
        data = snapshot(proxy.context.stats, proxy.context.sessions, proxy.context.router)
        self.assertEqual(data["sessions"], {"open": 1, "byBackend": {"imap": {"new": 1}}})
        self.assertEqual(data["sessionsEnded"], {"imap": {"old": 1}})
        self.assertEqual(data["bytes"]["fromClient"], 8)
        self.assertEqual(data["bytes"]["fromBackendByBackend"], {"imap": {"old": 16}})

    def test_failures(self) -> None:
        """
        A router refusal counts as an auth failure without backend; a
        backend's refusal counts with it; an unreachable backend counts as
        unavailable.
        """
        proxy = harness()
        frontend, _ = proxy.connect()
        frontend.dataReceived(b"a LOGIN nobody secret\r\n")
        proxy.clock.advance(1)
        frontend.dataReceived(b"b LOGIN alice@example.org wrong\r\n")
        # After a failure the next login waits a delay before its routing.
        proxy.clock.advance(1)
        proxy.connector.protocols[-1].dataReceived(GREETING)
        proxy.connector.protocols[-1].dataReceived(b"P1 OK\r\nP2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        proxy.clock.advance(2)
        proxy.connector.refuse = True
        other, _ = proxy.connect()
        other.dataReceived(b"a LOGIN carol@example.org secret\r\n")
        # Routed once the address's two failures' wait has passed.
        proxy.clock.advance(2)
        self.assertEqual(
            dict(proxy.context.stats.logins),
            {("imap", "", "auth"): 1, ("imap", "old", "auth"): 1, ("imap", "new", "unavailable"): 1},
        )

    def test_routerLatency(self) -> None:
        """
        The time from asking the router to its answer is measured on the
        context's clock.
        """
        router = FakeRouter(manual=True)
        proxy = ProxyHarness(router)
        frontend, _ = proxy.connect()
        frontend.dataReceived(b"a LOGIN alice secret\r\n")
        proxy.clock.advance(0.03)
        router.pending[0].callback(Rejection())
        (latency,) = proxy.context.stats.routerLatency.values()
        self.assertEqual(latency.count, 1)
        self.assertAlmostEqual(latency.total, 0.03)
        self.assertEqual(latency.counts[:5], [0, 0, 0, 0, 0])
        self.assertEqual(latency.counts[5:], [1] * 9)

    def test_connectionsPerListener(self) -> None:
        """
        Connections are counted per listener as accepted, or refused with
        the limit that refused them (C{connections_per_address}), whose
        connection is closed.
        """
        proxy = harness(limits=Limits(connectionsPerAddress=1))
        proxy.connect("192.0.2.10", listener="0")
        _, refused = proxy.connect("192.0.2.10", listener="0")
        proxy.connect("192.0.2.11", listener="1")
        self.assertTrue(refused.disconnecting)
        stats = proxy.context.stats
        self.assertEqual(dict(stats.accepted), {("imap", "0"): 1, ("imap", "1"): 1})
        self.assertEqual(dict(stats.refused), {("imap", "0", "connections_per_address"): 1})
        data = snapshot(stats, proxy.context.sessions, proxy.context.router)
        self.assertEqual(data["connections"]["refused"], {"imap": {"0": {"connections_per_address": 1}}})

    def test_tlsHandshakeFailure(self) -> None:
        """
        A client of an implicit-TLS listener that sends no TLS ClientHello
        fails the handshake, which is counted for its listener; a client
        that leaves without a word is not counted.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        proxy = harness()
        proxy.context.serverTLS = serverOptions(CertificateSource(*makeSelfSigned(directory)))
        factory = listenerFactory(proxy.context, Listener(protocol="imap", endpoint="tcp:0", tls="implicit"), "1")

        def connect() -> tuple[object, StringTransport]:
            protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.10", 50000))
            transport = StringTransport(
                hostAddress=IPv4Address("TCP", "192.0.2.1", 993), peerAddress=IPv4Address("TCP", "192.0.2.10", 50000)
            )
            protocol.makeConnection(transport)
            return protocol, transport

        garbage, transport = connect()
        garbage.dataReceived(b"a LOGIN alice@example.org secret\r\n")  # type: ignore[attr-defined]
        self.assertTrue(transport.disconnecting)
        garbage.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
        silent, _ = connect()
        silent.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
        stats = proxy.context.stats
        self.assertEqual(dict(stats.tlsFailures), {("imap", "1"): 1})
        self.assertEqual(dict(stats.accepted), {("imap", "1"): 2})

    def test_loginLatency(self) -> None:
        """
        A login is timed from the client's credentials to its outcome, and
        the backend's part from connecting it to its answer, on the
        context's clock; the router's time is labelled with its name.
        """
        router = FakeRouter(manual=True)
        proxy = ProxyHarness(router)
        frontend, client = proxy.connect()
        frontend.dataReceived(b"a LOGIN alice@example.org secret\r\n")
        proxy.clock.advance(0.03)
        router.pending[0].callback(Route(OLD))
        proxy.clock.advance(0.2)
        proxy.connector.protocols[0].dataReceived(GREETING)
        proxy.connector.protocols[0].dataReceived(LOGGED_IN)
        self.assertIsNotNone(frontend.relay, client.value())
        stats = proxy.context.stats
        self.assertEqual(list(stats.loginLatency), [("imap", "ok")])
        self.assertAlmostEqual(stats.loginLatency["imap", "ok"].total, 0.23)
        self.assertEqual(list(stats.backendLoginLatency), [("imap", "old", "ok")])
        self.assertAlmostEqual(stats.backendLoginLatency["imap", "old", "ok"].total, 0.2)
        self.assertAlmostEqual(stats.routerLatency["fake"].total, 0.03)
        # Cumulative buckets: 0.23 s is above 0.1 and within 0.25.
        self.assertEqual(stats.loginLatency["imap", "ok"].counts, [0] * 5 + [1] * 9)
        self.assertEqual(len(LOGIN_BUCKETS), 14)

    def test_histogramComparesFew(self) -> None:
        """
        A duration is counted with a binary search of the buckets (four
        comparisons of 14 bounds), not a comparison with every bound (a
        login counts three durations). The counts stay cumulative, the
        bounds inclusive.
        """
        comparisons: list[object] = []

        def noting(name: str) -> Callable[[float, object], bool]:
            def compare(self: float, other: object) -> bool:
                comparisons.append(other)
                return bool(getattr(float(self), name)(other))

            return compare

        # A subclass's reflected comparison goes first: every comparison
        # with a bound is noted, whichever side the bound is on.
        Seconds = type("Seconds", (float,), {name: noting(name) for name in ("__lt__", "__le__", "__gt__", "__ge__")})
        histogram = LatencyHistogram(LOGIN_BUCKETS)
        histogram.observe(Seconds(0.25))
        histogram.observe(Seconds(0.01))
        self.assertLessEqual(len(comparisons), 8)
        self.assertEqual(histogram.counts, [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2])
        self.assertEqual((histogram.count, histogram.total), (2, 0.26))

    def test_failedLoginLatency(self) -> None:
        """
        A failed login is timed up to the failure, without the delay that
        slows its answer; the backend's refusal and an unreachable backend
        are timed with their kind, a router's refusal has no backend time.
        """
        proxy = harness()
        frontend, client = proxy.connect()
        frontend.dataReceived(b"a LOGIN alice@example.org wrong\r\n")
        proxy.clock.advance(0.5)
        proxy.connector.protocols[-1].dataReceived(GREETING)
        proxy.connector.protocols[-1].dataReceived(b"P1 OK\r\nP2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        proxy.clock.advance(1)
        self.assertIn(b"a NO", client.value())
        frontend.dataReceived(b"b LOGIN nobody secret\r\n")
        # Routed after the wait one failure earns (not timed), refused.
        proxy.clock.advance(1)
        proxy.clock.advance(1)
        proxy.connector.refuse = True
        other, _ = proxy.connect()
        other.dataReceived(b"a LOGIN carol@example.org secret\r\n")
        # The address has two failures: routed two delays later.
        proxy.clock.advance(2)
        stats = proxy.context.stats
        self.assertEqual(stats.loginLatency["imap", "auth"].count, 2)
        self.assertAlmostEqual(stats.loginLatency["imap", "auth"].total, 0.5)
        self.assertEqual(stats.loginLatency["imap", "unavailable"].count, 1)
        self.assertEqual(
            {key: (h.count, h.total) for key, h in stats.backendLoginLatency.items()},
            {("imap", "old", "auth"): (1, 0.5), ("imap", "new", "unavailable"): (1, 0.0)},
        )

    def test_cacheHitRate(self) -> None:
        """
        A cache in the router chain (an L{IRouteCache}, reached through
        C{wrapped} or C{routers}) shows up as a hit rate.
        """

        @implementer(IRouteCache)
        class Cache:
            hits, misses = 3, 1

            def __init__(self, wrapped):
                self.wrapped = wrapped

        class Chain:
            def __init__(self, *routers):
                self.routers = routers

        inner = FakeRouter()
        router = Chain(Cache(inner), FakeRouter())
        self.assertEqual(len(list(routerChain(router))), 4)
        data = snapshot(ProxyStats(), [], router)
        self.assertEqual(data["router"]["cache"], {"hits": 3, "misses": 1, "hitRate": 0.75})
        self.assertIsNone(snapshot(ProxyStats(), [], inner)["router"]["cache"])

    def test_onlyCachesCounted(self) -> None:
        """
        A router that counts C{hits} and C{misses} of its own but is no
        L{IRouteCache} (an authenticating router counting its directory's
        answers, say) is not reported as a route cache.
        """

        class CountingRouter(FakeRouter):
            hits, misses = 5, 5

        self.assertIsNone(snapshot(ProxyStats(), [], CountingRouter())["router"]["cache"])


class MetricsTests(SynchronousTestCase):
    """
    The Prometheus exposition.
    """

    def metrics(self, proxy: ProxyHarness, health: dict | None = None) -> dict:
        """
        Parse the proxy's metrics with prometheus_client's own parser.

        @param health: the backends' states from the health probes.
        @return: C{{(sample name, labels as sorted tuple): value}}.
        """
        text = metricsText(proxy.context.stats, proxy.context.sessions, proxy.context.router, health).decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return samples

    def test_sessionsAndLogins(self) -> None:
        """
        Sessions open and logins per backend appear with their labels, and
        the text parses.
        """
        proxy = harness()
        proxy.login("alice@example.org")
        proxy.login("bob@example.net")
        proxy.login("carol@example.org")
        proxy.connect()
        samples = self.metrics(proxy)
        self.assertEqual(samples["mailproxy_sessions_open", (("backend", "old"), ("protocol", "imap"))], 2)
        self.assertEqual(samples["mailproxy_sessions_open", (("backend", "new"), ("protocol", "imap"))], 1)
        self.assertEqual(samples["mailproxy_sessions_open", (("backend", ""), ("protocol", "imap"))], 1)
        self.assertEqual(
            samples["mailproxy_logins_total", (("backend", "old"), ("protocol", "imap"), ("result", "ok"))], 2
        )
        self.assertEqual(samples["mailproxy_router_latency_seconds_count", (("router", "fake"),)], 3)
        self.assertEqual(samples["mailproxy_router_latency_seconds_bucket", (("le", "+Inf"), ("router", "fake"))], 3)

    def test_bytes(self) -> None:
        """
        Relayed bytes are counted per direction.
        """
        proxy = harness()
        alice, _, _ = proxy.login("alice@example.org")
        alice.dataReceived(b"b NOOP\r\n")
        samples = self.metrics(proxy)
        self.assertEqual(
            samples[
                "mailproxy_relayed_bytes_total",
                (("backend", "old"), ("direction", "from_client"), ("protocol", "imap")),
            ],
            8,
        )

    def test_connectionsAndLatencies(self) -> None:
        """
        Connections per listener, login and backend login latency and the
        router's latency appear with their labels.
        """
        proxy = harness(limits=Limits(connectionsPerAddress=1))
        proxy.login("alice@example.org")
        proxy.connect(listener="0")
        samples = self.metrics(proxy)
        self.assertEqual(samples["mailproxy_connections_accepted_total", (("listener", "0"), ("protocol", "imap"))], 1)
        self.assertEqual(
            samples[
                "mailproxy_connections_refused_total",
                (("listener", "0"), ("protocol", "imap"), ("reason", "connections_per_address")),
            ],
            1,
        )
        self.assertEqual(
            samples["mailproxy_login_latency_seconds_bucket", (("le", "0.005"), ("protocol", "imap"), ("result", "ok"))], 1
        )
        self.assertEqual(
            samples["mailproxy_login_latency_seconds_count", (("protocol", "imap"), ("result", "ok"))], 1
        )
        self.assertEqual(
            samples[
                "mailproxy_backend_login_latency_seconds_bucket",
                (("backend", "old"), ("le", "60.0"), ("protocol", "imap"), ("result", "ok")),
            ],
            1,
        )
        self.assertEqual(samples["mailproxy_router_latency_seconds_sum", (("router", "fake"),)], 0)

    def test_backendUp(self) -> None:
        """
        Each backend port's health probe gives C{mailproxy_backend_up}, 1 or
        0; without probes the metric is left out.
        """
        proxy = harness()
        context = proxy.context
        health = {"old": {"imap": {"ok": True, "seconds": 0.01}}, "new": {"imap": {"ok": False, "error": "refused"}}}
        samples = self.metrics(proxy, health)
        self.assertEqual(samples["mailproxy_backend_up", (("backend", "old"), ("port", "imap"))], 1)
        self.assertEqual(samples["mailproxy_backend_up", (("backend", "new"), ("port", "imap"))], 0)
        text = metricsText(context.stats, context.sessions, context.router).decode()
        self.assertNotIn("mailproxy_backend_up", text)

    def test_buildAndProcess(self) -> None:
        """
        C{mailproxy_build_info} names the versions of mailproxy, Python,
        Twisted and OpenSSL; the process's own metrics are there too.
        """
        samples = self.metrics(harness())
        (labels,) = [dict(labels) for name, labels in samples if name == "mailproxy_build_info"]
        self.assertEqual(
            {key: labels[key] for key in ("version", "python", "twisted")},
            {"version": __version__, "python": platform.python_version(), "twisted": twisted.__version__},
        )
        self.assertTrue(labels["openssl"].startswith("OpenSSL "), labels)
        self.assertGreater(samples["process_resident_memory_bytes", ()], 0)
        self.assertGreater(samples["process_open_fds", ()], 0)
        self.assertIn(("process_cpu_seconds_total", ()), samples)

    def test_oneRegistryPerProxy(self) -> None:
        """
        Two proxies in one process have their own counters.
        """
        one, two = harness(), harness()
        one.login("alice@example.org")
        self.assertNotIn(
            ("mailproxy_logins_total", (("backend", "old"), ("protocol", "imap"), ("result", "ok"))),
            self.metrics(two),
        )


class LogEventTests(SynchronousTestCase):
    """
    The structured events at session end and for failed logins.
    """

    def test_sessionEnd(self) -> None:
        """
        One event per session end carries every field the operator needs,
        and never the password.
        """
        events = captureEvents(self)
        proxy = harness()
        alice, _, _ = proxy.login("alice@example.org", password="Pa55word-x")
        alice.dataReceived(b"b NOOP\r\n")
        proxy.close(alice)
        (end,) = [e for e in events if e.get("event") == "session_end"]
        fields = {
            key: end[key]
            for key in (
                "session", "protocol", "address", "port", "tls", "sni", "user", "mechanism",
                "router", "rule", "backend", "result", "reason", "bytesIn", "bytesOut",
            )
        }
        self.assertEqual(
            fields,
            {
                "session": alice.client.sessionId,
                "protocol": "imap",
                "address": "192.0.2.10",
                "port": 50001,
                "tls": None,
                "sni": None,
                "user": "alice@example.org",
                "mechanism": "LOGIN",
                "router": "fake",
                "rule": "accounts -> old",
                "backend": "old",
                "result": "ok",
                "reason": "client closed",
                "bytesIn": 8,
                "bytesOut": 0,
            },
        )
        self.assertIsInstance(end["duration"], float)
        for event in events:
            self.assertNotIn("Pa55word-x", repr(event))

    def test_failedLoginLine(self) -> None:
        """
        A failed login gives one line in the stable format fail2ban reads:
        the address before anything the client chose, the user quoted.
        """
        from twisted.logger import formatEvent

        events = captureEvents(self)
        proxy = harness()
        frontend, _ = proxy.connect(address="198.51.100.7")
        frontend.dataReceived(b'a LOGIN "x address=192.0.2.99" secret\r\n')
        (failed,) = [e for e in events if e.get("event") == "login_failed"]
        self.assertEqual(
            formatEvent(failed),
            f"authentication failed: session={frontend.client.sessionId} address=198.51.100.7 "
            'protocol=imap user="x address=192.0.2.99" attempt=1',
        )

    def test_sessionEndLineWithoutBackend(self) -> None:
        """
        A session that ends before a login reads C{user=- backend=-} in the
        text line, as every absent value does there (never Python's
        C{None}); the JSON event keeps L{None}.
        """
        from twisted.logger import formatEvent

        events = captureEvents(self)
        proxy = harness()
        frontend, _ = proxy.connect(address="198.51.100.7")
        proxy.close(frontend)
        (end,) = [e for e in events if e.get("event") == "session_end"]
        self.assertIsNone(end["backend"])
        text = formatEvent(end)
        self.assertIn(
            f"session {frontend.client.sessionId} end: imap from 198.51.100.7:{frontend.client.port} "
            "user=- backend=- result=no-login ",
            text,
        )

    def test_userCannotBreakTheLine(self) -> None:
        """
        A login name with a line break (sent as a literal) stays on one
        line in the session end and the failure lines.
        """
        from twisted.logger import formatEvent

        events = captureEvents(self)
        proxy = harness()
        frontend, _ = proxy.connect()
        frontend.dataReceived(b"a LOGIN {5+}\r\nx\r\ny\n secret\r\n")
        proxy.close(frontend)
        for event in events:
            if event.get("event") in ("login_failed", "session_end"):
                text = formatEvent(event)
                self.assertNotIn("\n", text)
                self.assertIn(json.dumps("x\r\ny\n"), text)
