"""
Tests for L{mailproxy.admin}: the management API over in-memory HTTP
(C{treq.testing.StubTreq}), with in-memory sessions and a real static route
table behind it.
"""

from __future__ import annotations

import json
import os
from io import BytesIO
from typing import Any

from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._lifecycle import ProxyService
from mailproxy._migrate import MOVED, LoginHold, Mover
from mailproxy.admin import MAX_BODY, AdminResource, HealthChecker, TokenGuard, _GreetingProbe, adminSite, greetingProblem
from mailproxy.protocols import protocolForPort
from mailproxy.routers.static import StaticRouter
from mailproxy.testing import TLSStringTransport, makeBackend

from .opsfixtures import ProxyHarness

TOKEN = b"0123456789abcdef0123456789abcdef-token"
AUTH = {b"Authorization": [b"Bearer " + TOKEN]}
BACKENDS = {name: makeBackend(name) for name in ("old", "new")}


class FakeHealth(HealthChecker):
    """
    A health checker whose probes answer from a table instead of the
    network.
    """

    def __init__(self, reactor, backends, answers: dict[tuple[str, str], dict]) -> None:
        super().__init__(reactor, backends)
        self.answers = answers
        self.probed: list[tuple[str, str]] = []

    def probe(self, backend, protocol, port):
        self.probed.append((backend.name, protocol))
        return succeed(self.answers.get((backend.name, protocol), {"ok": True, "seconds": 0.001}))


class Proxy:
    """
    What the API operates on, as L{mailproxy._lifecycle.ProxyService}
    offers it.
    """

    def __init__(self, harness: ProxyHarness) -> None:
        self.context = harness.context
        self.backends = BACKENDS
        self.mover = Mover(harness.context, BACKENDS, harness.clock)
        self.draining = False
        # Not in a fleet (test_clusterDegraded sets one).
        self.fleet: Any = None
        self.reloads: list[dict] = [{"ok": True, "changed": [], "restartNeeded": []}]

    def reload(self) -> dict:
        return self.reloads.pop(0)

    # What the endpoint asks, answered as the proxy itself answers.
    statsSnapshot = ProxyService.statsSnapshot
    metrics = ProxyService.metrics
    describeSessions = ProxyService.describeSessions
    dropSessions = ProxyService.dropSessions


class AdminTestsMixin:
    """
    A management API in front of an in-memory proxy with a route table.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(directory)
        self.routesPath = os.path.join(directory, "routes.toml")
        with open(self.routesPath, "w") as f:
            f.write('default = "old"\n\n[accounts]\n"alice@example.org" = "old"\n')
        self.harness = ProxyHarness(StaticRouter(self.routesPath, BACKENDS), gate=LoginHold())
        self.harness.context.routerName = "static"
        self.clock = self.harness.clock
        self.proxy = Proxy(self.harness)
        self.health = FakeHealth(self.clock, lambda: BACKENDS, {})
        self.guard = TokenGuard(TOKEN, self.clock)
        self.resource = AdminResource(self.proxy, self.guard, self.health)
        self.http = StubTreq(self.resource)

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = AUTH) -> tuple[int, Any]:
        """
        Make a request and return its status and decoded body (JSON when
        it is JSON).
        """
        data = json.dumps(body).encode() if body is not None else None
        d = self.http.request(method, "http://admin.test" + path, data=data, headers=headers)
        self.http.flush()
        response = self.successResultOf(d)  # type: ignore[attr-defined]
        content = self.successResultOf(self.http.content(response))  # type: ignore[attr-defined]
        if response.headers.getRawHeaders(b"content-type") == [b"application/json"]:
            return response.code, json.loads(content)
        return response.code, content


class TokenTests(AdminTestsMixin, SynchronousTestCase):
    """
    The bearer token.
    """

    def test_required(self) -> None:
        """
        Without a token, a request is refused with 401 and a
        C{WWW-Authenticate} challenge, after the failure delay.
        """
        d = self.http.get("http://admin.test/stats")
        self.http.flush()
        self.assertNoResult(d)
        self.clock.advance(1)
        self.http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="mailproxy"'])
        body = json.loads(self.successResultOf(self.http.content(response)))
        self.assertEqual(body, {"error": "a valid bearer token is required"})

    def test_wrongTokensSlowedMore(self) -> None:
        """
        Each wrong token from the same address waits one second longer than
        the one before; the right token answers at once and resets the count.
        """
        wrong = {b"Authorization": [b"Bearer " + TOKEN[:-1] + b"X"]}
        for failures in (1, 2, 3):
            d = self.http.get("http://admin.test/stats", headers=wrong)
            self.http.flush()
            self.clock.advance(failures - 0.5)
            self.http.flush()
            self.assertNoResult(d)
            self.clock.advance(0.5)
            self.http.flush()
            self.assertEqual(self.successResultOf(d).code, 401)
        status, _ = self.request("GET", "/stats")
        self.assertEqual(status, 200)
        self.assertEqual(self.guard.failed("127.0.0.1"), 1.0)

    def test_delayBounded(self) -> None:
        """
        The delay grows to at most ten seconds.
        """
        for _ in range(20):
            delay = self.guard.failed("192.0.2.1")
        self.assertEqual(delay, 10.0)

    def test_otherSchemes(self) -> None:
        """
        Only the C{Bearer} scheme with the exact token passes.
        """
        self.assertTrue(self.guard.check(b"Bearer " + TOKEN))
        self.assertTrue(self.guard.check(b"bearer  " + TOKEN + b" "))
        self.assertFalse(self.guard.check(b"Basic " + TOKEN))
        self.assertFalse(self.guard.check(b"Bearer " + TOKEN + b"x"))
        self.assertFalse(self.guard.check(b"Bearer"))
        self.assertFalse(self.guard.check(None))

    def test_healthNeedsNoToken(self) -> None:
        """
        C{GET /health} answers without a token.
        """
        status, body = self.request("GET", "/health", headers=None)
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "ok")

    def test_healthWrongToken(self) -> None:
        """
        C{GET /health} with a wrong token is refused like any request, after
        the failure delay: it cannot be used to try tokens faster.
        """
        d = self.http.get("http://admin.test/health", headers={b"Authorization": [b"Bearer wrong"]})
        self.http.flush()
        self.assertNoResult(d)
        self.clock.advance(1)
        self.http.flush()
        self.assertEqual(self.successResultOf(d).code, 401)


class HealthTests(AdminTestsMixin, SynchronousTestCase):
    """
    C{GET /health}.
    """

    def test_allWell(self) -> None:
        """
        Every backend port is probed; all answering gives 200, with each
        port's state for a client with the token.
        """
        status, body = self.request("GET", "/health")
        self.assertEqual(status, 200)
        self.assertEqual(set(self.health.probed), {(n, p) for n in BACKENDS for p in ("imap", "pop3", "smtp", "sieve", "http")})
        self.assertEqual(body["backends"]["old"]["imap"], {"ok": True, "seconds": 0.001})

    def test_backendDown(self) -> None:
        """
        A backend port that does not answer gives 503 and says which.
        """
        self.health.answers[("new", "imap")] = {"ok": False, "error": "Connection was refused by other side: 111: Connection refused."}
        status, body = self.request("GET", "/health")
        self.assertEqual(status, 503)
        self.assertEqual(body["status"], "degraded")
        self.assertFalse(body["backends"]["new"]["imap"]["ok"])

    def test_statusOnlyWithoutToken(self) -> None:
        """
        Without a token, health says only its status (and the status code):
        backend names and their errors are for those with the token.
        """
        self.assertEqual(self.request("GET", "/health", headers=None), (200, {"status": "ok"}))
        self.clock.advance(2)
        self.health.answers[("new", "imap")] = {"ok": False, "error": "Connection refused"}
        self.assertEqual(self.request("GET", "/health", headers=None), (503, {"status": "degraded"}))

    def test_detailsForEveryone(self) -> None:
        """
        With C{health_details}, health names every backend port and its
        error without a token too.
        """
        self.resource.healthDetails = True
        self.health.answers[("new", "imap")] = {"ok": False, "error": "Connection refused"}
        status, body = self.request("GET", "/health", headers=None)
        self.assertEqual(status, 503)
        self.assertEqual(body["backends"]["new"]["imap"], {"ok": False, "error": "Connection refused"})

    def test_draining(self) -> None:
        """
        While the proxy drains for shutdown, health says so with 503, so a
        load balancer sends no new clients.
        """
        self.proxy.draining = True
        status, body = self.request("GET", "/health", headers=None)
        self.assertEqual((status, body["status"]), (503, "draining"))

    def test_workersMissing(self) -> None:
        """
        With worker processes, health says how many serve: all of them is
        C{ok}; one dead (being started again) is C{degraded} with 200, as
        the others serve; none is 503.
        """
        counts = {"configured": 2, "serving": 2}
        self.proxy.workerHealth = lambda: dict(counts)
        status, body = self.request("GET", "/health")
        self.assertEqual((status, body["status"], body["workers"]), (200, "ok", {"configured": 2, "serving": 2}))
        counts["serving"] = 1
        self.clock.advance(2)
        status, body = self.request("GET", "/health")
        self.assertEqual((status, body["status"], body["workers"]), (200, "degraded", {"configured": 2, "serving": 1}))
        counts["serving"] = 0
        self.assertEqual(self.request("GET", "/health", headers=None), (503, {"status": "degraded"}))

    def test_clusterDegraded(self) -> None:
        """
        A proxy of a fleet whose Redis is unavailable says C{degraded}, and
        with the token why; it answers 200 all the same (it serves every
        login), so a load balancer checking health keeps sending clients.
        """
        from mailproxy._fleet import Fleet
        from mailproxy.config import ClusterConfig

        fleet = Fleet(ClusterConfig(host="redis.test", name="proxy-a"), self.harness.context, self.clock, lambda _: Deferred())
        fleet.problem = "Redis at redis.test:6379: Connection refused"
        self.proxy.fleet = fleet
        self.assertEqual(self.request("GET", "/health", headers=None), (200, {"status": "degraded"}))
        self.clock.advance(2)
        status, body = self.request("GET", "/health")
        self.assertEqual((status, body["status"]), (200, "degraded"))
        self.assertEqual(
            body["cluster"],
            {"name": "proxy-a", "redis": "unavailable", "why": "Redis at redis.test:6379: Connection refused"},
        )
        fleet.problem = None
        self.clock.advance(2)
        status, body = self.request("GET", "/health")
        self.assertEqual((status, body["status"], body["cluster"]), (200, "ok", {"name": "proxy-a", "redis": "ok"}))

    def test_answersKept(self) -> None:
        """
        Probes run at most once per two seconds, whatever the request rate.
        """
        self.request("GET", "/health", headers=None)
        self.request("GET", "/health", headers=None)
        self.assertEqual(len(self.health.probed), 10)
        self.clock.advance(2)
        self.request("GET", "/health", headers=None)
        self.assertEqual(len(self.health.probed), 20)

    def test_concurrentChecksShareProbes(self) -> None:
        """
        Requests that arrive while probes run wait for the same probes.
        """
        pending: list[Deferred] = []

        class Slow(HealthChecker):
            def probe(self, backend, protocol, port):
                d: Deferred = Deferred()
                pending.append(d)
                return d

        checker = Slow(self.clock, lambda: {"old": makeBackend("old", ports={"imap": 143})})
        first, second = checker.check(), checker.check()
        self.assertEqual(len(pending), 1)
        pending[0].callback({"ok": True})
        self.assertEqual(self.successResultOf(first), {"old": {"imap": {"ok": True}}})
        self.assertEqual(self.successResultOf(second), {"old": {"imap": {"ok": True}}})


    def test_probeThatCannotStart(self) -> None:
        """
        A probe that raises as it starts (a backend's CA file unreadable
        just now) is that port's failure; the check answers, and the next
        check probes again instead of waiting for the first for ever.
        """

        class Broken(HealthChecker):
            def probe(self, backend, protocol, port):
                if backend.name == "bad":
                    raise OSError("cannot read CA file")
                return succeed({"ok": True})

        backends = {"bad": makeBackend("bad", ports={"imap": 143}), "good": makeBackend("good", ports={"imap": 143})}
        checker = Broken(self.clock, lambda: backends)
        expected = {"bad": {"imap": {"ok": False, "error": "cannot read CA file"}}, "good": {"imap": {"ok": True}}}
        self.assertEqual(self.successResultOf(checker.check()), expected)
        self.clock.advance(checker.keep)
        self.assertEqual(self.successResultOf(checker.check()), expected)


class GreetingProbeTests(SynchronousTestCase):
    """
    L{_GreetingProbe}, the protocol a health probe speaks.
    """

    def probe(self, header: bytes = b"", port: str = "imap", starttls: bool = False) -> tuple[_GreetingProbe, TLSStringTransport]:
        """
        A probe of the backend C{ports} key C{port} (through STARTTLS if
        C{starttls}), connected to a transport that records C{startTLS}.
        """
        steps = protocolForPort(port).startTLS if starttls else ()
        probe = _GreetingProbe(
            header, lambda line: greetingProblem(port, line), steps, "the options" if starttls else None, b"proxy.test"
        )
        transport = TLSStringTransport()
        probe.makeConnection(transport)
        return probe, transport

    def test_readsFirstLine(self) -> None:
        """
        The first line is judged, in pieces or not, and the probe hangs up.
        """
        probe, transport = self.probe()
        probe.dataReceived(b"* OK Dove")
        self.assertNoResult(probe.outcome)
        probe.dataReceived(b"cot ready.\r\n* more")
        self.assertIsNone(self.successResultOf(probe.outcome))
        self.assertTrue(transport.disconnecting)
        probe, _ = self.probe()
        probe.dataReceived(b"220 smtp.example ESMTP\r\n")
        self.assertEqual(self.successResultOf(probe.outcome), "unexpected greeting: 220 smtp.example ESMTP")

    def test_proxyHeaderFirst(self) -> None:
        """
        For a backend that requires a PROXY header, the probe sends a LOCAL
        one first.
        """
        _, transport = self.probe(b"PROXY UNKNOWN\r\n")
        self.assertEqual(transport.value(), b"PROXY UNKNOWN\r\n")

    def test_closedEarly(self) -> None:
        """
        A server that closes without greeting fails the probe.
        """
        probe, _ = self.probe()
        probe.connectionLost(None)
        self.failureResultOf(probe.outcome, ConnectionError)

    def test_startTLS(self) -> None:
        """
        On a STARTTLS port the probe goes on, in each protocol's words, to
        the server's go-ahead, starts TLS (with the backend's options) and
        is done once the handshake is.
        """
        dialogues = {
            "imap": [(b"* OK ready\r\n", b"P STARTTLS\r\n"), (b"* BYE not this\r\nP OK Begin TLS\r\n", b"")],
            "pop3": [(b"+OK ready\r\n", b"STLS\r\n"), (b"+OK Begin TLS\r\n", b"")],
            "smtp": [
                # A greeting of two lines: EHLO only after its last.
                (b"220-mx ESMTP\r\n", b""),
                (b"220 welcome\r\n", b"EHLO proxy.test\r\n"),
                (b"250-mx\r\n250-STARTTLS\r\n", b""),
                (b"250 8BITMIME\r\n", b"STARTTLS\r\n"),
                (b"220 2.0.0 Ready\r\n", b""),
            ],
            "sieve": [
                (b'"IMPLEMENTATION" "Pigeonhole"\r\n', b""),
                (b'"STARTTLS"\r\nOK "Ready"\r\n', b"STARTTLS\r\n"),
                (b'OK "Begin TLS"\r\n', b""),
            ],
        }
        for port, dialogue in dialogues.items():
            probe, transport = self.probe(port=port, starttls=True)
            for server, sent in dialogue:
                self.assertIsNone(transport.tlsOptions, port)
                transport.clear()
                probe.dataReceived(server)
                self.assertEqual(transport.value(), sent, port)
            self.assertEqual(transport.tlsOptions, "the options", port)
            self.assertNoResult(probe.outcome)
            probe.handshakeCompleted()
            self.assertIsNone(self.successResultOf(probe.outcome), port)
            self.assertTrue(transport.disconnecting, port)

    def test_implicitTLSGreetingJudged(self) -> None:
        """
        On an implicit-TLS port the handshake, done before the server
        greets, ends nothing: the greeting is still read and judged.
        """
        probe, transport = self.probe()
        probe.handshakeCompleted()
        self.assertNoResult(probe.outcome)
        self.assertFalse(transport.disconnecting)
        probe.dataReceived(b"* BYE go away\r\n")
        self.assertEqual(self.successResultOf(probe.outcome), "unexpected greeting: * BYE go away")

    def test_startTLSRefused(self) -> None:
        """
        A refused STARTTLS, or a handshake that fails (a certificate the
        backend's C{ca_file} does not vouch for), fails the probe, saying
        so; TLS is not started after a refusal.
        """
        probe, transport = self.probe(port="pop3", starttls=True)
        probe.dataReceived(b"+OK ready\r\n-ERR TLS not available\r\n")
        self.assertEqual(self.successResultOf(probe.outcome), "STARTTLS refused: -ERR TLS not available")
        self.assertIsNone(transport.tlsOptions)
        probe, transport = self.probe(port="imap", starttls=True)
        probe.dataReceived(b"* OK ready\r\nP OK go\r\n")
        probe.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
        self.assertEqual(
            self.successResultOf(probe.outcome),
            "TLS handshake failed: [('SSL routines', '', 'certificate verify failed')]",
        )


class StatsAndMetricsTests(AdminTestsMixin, SynchronousTestCase):
    """
    C{GET /stats} and C{GET /metrics}.
    """

    def test_stats(self) -> None:
        """
        The JSON counters show the sessions per backend and the logins.
        """
        self.harness.login("alice@example.org")
        status, body = self.request("GET", "/stats")
        self.assertEqual(status, 200)
        self.assertEqual(body["sessions"], {"open": 1, "byBackend": {"imap": {"old": 1}}})
        self.assertEqual(body["logins"], {"imap": {"old": {"ok": 1}}})

    def test_metrics(self) -> None:
        """
        The Prometheus exposition parses with prometheus_client's parser
        and carries the session gauge.
        """
        self.harness.login("alice@example.org")
        status, text = self.request("GET", "/metrics")
        self.assertEqual(status, 200)
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        (sample,) = families["mailproxy_sessions_open"].samples
        self.assertEqual((sample.labels, sample.value), ({"protocol": "imap", "backend": "old"}, 1))
        self.assertIn("mailproxy_logins", families)

    def test_metricsBackendUp(self) -> None:
        """
        C{/metrics} runs the health probes (or reuses their answers of the
        last two seconds, as C{/health} does) and shows each backend port
        as up (1) or down (0).
        """
        self.health.answers[("new", "imap")] = {"ok": False, "error": "Connection refused"}
        status, text = self.request("GET", "/metrics")
        self.assertEqual(status, 200)
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        up = {(s.labels["backend"], s.labels["port"]): s.value for s in families["mailproxy_backend_up"].samples}
        self.assertEqual(up, {(n, p): 1 for n in BACKENDS for p in ("imap", "pop3", "smtp", "sieve", "http")} | {("new", "imap"): 0})
        self.request("GET", "/health")
        self.assertEqual(len(self.health.probed), 10)


class SessionTests(AdminTestsMixin, SynchronousTestCase):
    """
    C{GET /sessions} and C{POST /sessions/drop}.
    """

    def test_list(self) -> None:
        """
        Sessions are listed with their account, backend and state, and
        filtered by account or backend.
        """
        alice, _, _ = self.harness.login("alice@example.org")
        self.harness.login("bob@example.org")
        self.harness.connect()
        status, body = self.request("GET", "/sessions")
        self.assertEqual((status, body["count"]), (200, 3))
        status, body = self.request("GET", "/sessions?account=ALICE%40example.org")
        (session,) = body["sessions"]
        self.assertEqual(
            {k: session[k] for k in ("session", "protocol", "state", "account", "backend", "address")},
            {
                "session": alice.client.sessionId,
                "protocol": "imap",
                "state": "relay",
                "account": "alice@example.org",
                "backend": "old",
                "address": "192.0.2.10",
            },
        )
        status, body = self.request("GET", "/sessions?backend=new")
        self.assertEqual(body["count"], 0)

    def test_drop(self) -> None:
        """
        Dropping an account's sessions says goodbye to its clients only.
        """
        alice, aliceClient, _ = self.harness.login("alice@example.org")
        bob, bobClient, _ = self.harness.login("bob@example.org")
        status, body = self.request("POST", "/sessions/drop", {"account": "alice@example.org"})
        self.assertEqual((status, body), (200, {"dropped": 1, "sessions": [alice.client.sessionId]}))
        self.assertEqual(aliceClient.value(), b"* BYE Disconnected by the administrator.\r\n")
        self.assertEqual(bobClient.value(), b"")

    def test_dropNeedsFilter(self) -> None:
        """
        Dropping everything needs at least a filter.
        """
        status, body = self.request("POST", "/sessions/drop", {})
        self.assertEqual((status, body), (400, {"error": "name an account, a backend or a session"}))

    def test_badBodies(self) -> None:
        """
        Bodies that are not a JSON object, or too large, are refused.
        """
        d = self.http.post("http://admin.test/sessions/drop", data=b"[1]", headers=AUTH)
        self.http.flush()
        self.assertEqual(self.successResultOf(d).code, 400)
        d = self.http.post("http://admin.test/sessions/drop", data=b"{" + b" " * 70000 + b"}", headers=AUTH)
        self.http.flush()
        self.assertEqual(self.successResultOf(d).code, 413)

    def test_deeplyNestedBody(self) -> None:
        """
        JSON nested deeper than the parser can follow is a bad request
        (400), not an internal error with a traceback in the log.
        """
        for body in (b"[" * 30000 + b"]" * 30000, b'{"a":' * 10000 + b"1" + b"}" * 10000):
            d = self.http.post("http://admin.test/sessions/drop", data=body, headers=AUTH)
            self.http.flush()
            response = self.successResultOf(d)
            self.assertEqual(response.code, 400)
            self.assertEqual(json.loads(self.successResultOf(self.http.content(response))), {"error": "the body is nested too deeply"})


class RouteTests(AdminTestsMixin, SynchronousTestCase):
    """
    The route table, explain, move and reload.
    """

    def test_readSetDelete(self) -> None:
        """
        Entries are read, set and deleted through C{/routes}.
        """
        self.assertEqual(
            self.request("GET", "/routes"), (200, {"routes": {"*": "old", "alice@example.org": "old"}})
        )
        self.assertEqual(
            self.request("PUT", "/routes/bob%40example.org", {"backend": "new"}),
            (200, {"key": "bob@example.org", "backend": "new"}),
        )
        self.assertEqual(
            self.request("DELETE", "/routes/alice@example.org"),
            (200, {"key": "alice@example.org", "deleted": True}),
        )
        self.assertEqual(
            self.request("GET", "/routes"), (200, {"routes": {"*": "old", "bob@example.org": "new"}})
        )

    def test_setUnknownBackend(self) -> None:
        """
        A store's refusal is a 409 with its reason.
        """
        self.assertEqual(
            self.request("PUT", "/routes/bob@example.org", {"backend": "elsewhere"}),
            (409, {"error": "unknown backend 'elsewhere'; configured backends: new, old"}),
        )

    def test_explain(self) -> None:
        """
        C{/explain} names the router, rule and backend.
        """
        status, body = self.request("GET", "/explain?account=alice@example.org")
        self.assertEqual(status, 200)
        self.assertEqual(
            (body["router"], body["rule"], body["backend"]),
            ("static", "accounts['alice@example.org']", "old"),
        )

    def test_move(self) -> None:
        """
        C{POST /move} moves accounts and drops their sessions; a dry run
        first says what would happen.
        """
        alice, aliceClient, _ = self.harness.login("alice@example.org")
        status, body = self.request("POST", "/move", {"backend": "new", "accounts": ["alice@example.org"], "dry_run": True})
        self.assertEqual(status, 200)
        self.assertEqual(body["changes"], [{"key": "alice@example.org", "from": "old", "to": "new"}])
        self.assertEqual((body["sessions"], body["dryRun"]), (1, True))
        self.assertEqual(aliceClient.value(), b"")
        status, body = self.request("POST", "/move", {"backend": "new", "accounts": ["alice@example.org"]})
        self.assertEqual((status, body["sessions"], body["dryRun"]), (200, 1, False))
        self.assertEqual(aliceClient.value(), b"* BYE " + MOVED.encode() + b"\r\n")

    def test_moveDomainKept(self) -> None:
        """
        A domain move answers with the domain's accounts that keep their
        own entry (C{kept}, C{keptAccounts}); with C{include_accounts} they
        move too and their sessions are dropped.
        """
        _, aliceClient, _ = self.harness.login("alice@example.org")
        status, body = self.request("POST", "/move", {"backend": "new", "domain": "example.org", "dry_run": True})
        self.assertEqual((status, body["kept"], body["keptAccounts"]), (200, 1, ["alice@example.org"]))
        self.assertEqual(body["changes"], [{"key": "@example.org", "from": None, "to": "new"}])
        status, body = self.request(
            "POST", "/move", {"backend": "new", "domain": "example.org", "include_accounts": True}
        )
        self.assertEqual((status, body["kept"], body["sessions"]), (200, 0, 1))
        self.assertEqual(
            body["changes"],
            [{"key": "alice@example.org", "from": "old", "to": "new"}, {"key": "@example.org", "from": None, "to": "new"}],
        )
        self.assertEqual(aliceClient.value(), b"* BYE " + MOVED.encode() + b"\r\n")
        self.assertEqual(
            self.request("POST", "/move", {"backend": "new", "domain": "example.org", "include_accounts": "yes"}),
            (400, {"error": "dry_run, drop and include_accounts must be true or false"}),
        )

    def test_moveRefused(self) -> None:
        """
        A refused move is a 409 with the reason; a malformed one a 400.
        """
        self.assertEqual(
            self.request("POST", "/move", {"backend": "elsewhere", "accounts": ["a@b"]}),
            (409, {"error": "unknown backend 'elsewhere'; configured backends: new, old"}),
        )
        self.assertEqual(
            self.request("POST", "/move", {"backend": "new", "accounts": "a@b"}),
            (400, {"error": "accounts must be a list of strings"}),
        )

    def test_reload(self) -> None:
        """
        C{POST /reload} answers with the reload's outcome: 200 when it
        worked, 409 with the reason when the old configuration was kept.
        """
        self.proxy.reloads.append({"ok": False, "error": "broken.toml: line 1: oops"})
        self.assertEqual(self.request("POST", "/reload"), (200, {"ok": True, "changed": [], "restartNeeded": []}))
        self.assertEqual(self.request("POST", "/reload"), (409, {"ok": False, "error": "broken.toml: line 1: oops"}))

    def test_unknownPaths(self) -> None:
        """
        Unknown paths are 404, known paths with the wrong method 405.
        """
        self.assertEqual(self.request("GET", "/nothing")[0], 404)
        self.assertEqual(self.request("GET", "/move")[0], 405)


class BodyTests(AdminTestsMixin, SynchronousTestCase):
    """
    The management site reads a request's body only after its headers
    passed: the token, and the declared length. Driven through
    twisted.web's own HTTP channel on an in-memory transport, so what the
    client would see on the wire is asserted, byte for byte.
    """

    def setUp(self) -> None:
        super().setUp()
        site, resource = adminSite(self.proxy, TOKEN, self.clock)
        self.guard = resource.guard
        self.requests: list[Any] = []
        makeRequest = site.requestFactory

        def recordRequest(*args: Any) -> Any:
            self.requests.append(makeRequest(*args))
            return self.requests[-1]

        site.requestFactory = recordRequest
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.channel.makeConnection(self.transport)

    def send(self, head: bytes, body: bytes = b"") -> None:
        """
        Send a request head (request line and headers, CRLF after each)
        and the start of a body.
        """
        self.channel.dataReceived(head.replace(b"\n", b"\r\n") + b"\r\n" + body)

    def stored(self) -> bytes:
        """
        What the request has stored of its body.
        """
        content = self.requests[-1].content
        self.assertIsInstance(content, BytesIO)
        return content.getvalue()

    def test_unauthenticatedBodyNotRead(self) -> None:
        """
        A POST without the token that declares a huge body is answered 401
        (after the failure delay) and closed: no C{100 Continue}, no more
        reading from the connection, and none of the body stored.
        """
        self.send(
            b"POST /move HTTP/1.1\nHost: admin\nContent-Type: application/json\n"
            b"Content-Length: 330301440\nExpect: 100-continue\n",
            b"x" * 5000,
        )
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(self.stored(), b"")
        self.clock.advance(1)
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.1 401 Unauthorized")
        self.assertIn(b'WWW-Authenticate: Bearer realm="mailproxy"', lines)
        self.assertIn(b"Connection: close", lines)
        self.assertEqual(json.loads(body), {"error": "a valid bearer token is required"})
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.stored(), b"")

    def test_unauthenticatedCounted(self) -> None:
        """
        A refused body counts as a wrong token: the next one waits longer.
        """
        self.send(b"POST /reload HTTP/1.1\nHost: admin\nAuthorization: Bearer wrong\nContent-Length: 2\n", b"{}")
        self.assertEqual(self.guard.failed("127.0.0.1"), 2.0)

    def test_declaredTooLarge(self) -> None:
        """
        With the token, a body declared larger than 64 KiB is answered 413
        at once and closed, without a C{100 Continue} and unread.
        """
        self.send(
            b"POST /move HTTP/1.1\nHost: admin\nAuthorization: Bearer " + TOKEN + b"\n"
            b"Content-Length: %d\nExpect: 100-continue\n" % (MAX_BODY + 1,),
        )
        self.clock.advance(0)
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        self.assertEqual(head.split(b"\r\n")[0], b"HTTP/1.1 413 Request Entity Too Large")
        self.assertEqual(json.loads(body), {"error": "the body is larger than 65536 bytes"})
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.stored(), b"")

    def test_chunkedTooLarge(self) -> None:
        """
        A chunked body is cut off with 413 as soon as it passes 64 KiB:
        what was stored never exceeds the limit.
        """
        self.send(b"POST /move HTTP/1.1\nHost: admin\nAuthorization: Bearer " + TOKEN + b"\nTransfer-Encoding: chunked\n")
        chunk = b"%x\r\n%s\r\n" % (16384, b" " * 16384)
        for _ in range(5):
            self.channel.dataReceived(chunk)
        self.clock.advance(0)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n"))
        self.assertTrue(self.transport.disconnecting)
        self.assertLessEqual(len(self.stored()), MAX_BODY)

    def test_acceptedBody(self) -> None:
        """
        With the token and a body within the limit, the request goes on as
        usual: C{100 Continue} if asked, then the answer, on a connection
        that stays open.
        """
        self.harness.login("alice@example.org")
        body = json.dumps({"account": "alice@example.org"}).encode()
        self.send(
            b"POST /sessions/drop HTTP/1.1\nHost: admin\nAuthorization: Bearer " + TOKEN + b"\n"
            b"Content-Length: %d\nExpect: 100-continue\n" % (len(body),),
        )
        self.assertEqual(self.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.transport.clear()
        self.channel.dataReceived(body)
        head, _, answer = self.transport.value().partition(b"\r\n\r\n")
        self.assertEqual(head.split(b"\r\n")[0], b"HTTP/1.1 200 OK")
        self.assertIn(b'"dropped": 1', answer)
        self.assertFalse(self.transport.disconnecting)
