"""
Tests for L{mailproxy._lifecycle} (reload, drain on shutdown), the service
tree L{mailproxy.tap.serviceFromConfig} builds around it, and the event log
of L{mailproxy._logs}.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time

from twisted.application.service import Application, Service
from twisted.internet.defer import Deferred

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    formatEventAsClassicLogText,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy._lifecycle import SHUTDOWN, ProxyService, ReloadableServerTLS
from mailproxy._logs import ClassicText, EventLogService, TwistdLog, _InfoAndAbove, jsonLine, processLogObserver, twistdLogObserver
from mailproxy._safetext import MAX_LOG_TEXT, logQuote
from mailproxy._tls import makeSelfSigned
from mailproxy.config import LogConfig, loadConfig
from mailproxy.routers.static import StaticRouter
from mailproxy.tap import serviceFromConfig
from mailproxy.model import Route
from mailproxy.testing import makeBackend, makeRequest

from .opsfixtures import ProxyHarness
from .test_router_threads import poolThreads

CONFIG = """\
[proxy]
hostname = "proxy.example.org"

[limits]
shutdown_grace = 10

[tls]
certificate = "cert.pem"
key = "key.pem"

[[listener]]
protocol = "imap"
endpoint = "tcp:10993:interface=127.0.0.1"
tls = "implicit"

[router]
type = "static"
path = "routes.toml"

[backend.old]
host = "127.0.0.1"
ports = { imap = 143 }

[backend.new]
host = "127.0.0.1"
ports = { imap = 1143 }

[admin]
endpoint = "tcp:19443"
token_file = "admin.token"

[log]
format = "json"
path = "events.jsonl"
"""


class ServiceTreeTestsMixin:
    """
    A configuration directory with certificates, a route table and a token.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(self.directory)
        certificate, key = makeSelfSigned(self.directory)
        os.rename(certificate, os.path.join(self.directory, "cert.pem"))
        os.rename(key, os.path.join(self.directory, "key.pem"))
        self.write("routes.toml", 'default = "old"\n')
        self.write("admin.token", "t" * 40 + "\n")
        self.path = self.write("mailproxy.toml", CONFIG)
        self.reactor = MemoryReactorClock()
        self.service = serviceFromConfig(loadConfig(self.path), self.reactor)

    def write(self, name: str, text: str) -> str:
        """
        Write C{text} to C{name} in the configuration directory.
        """
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path


class ServiceTreeTests(ServiceTreeTestsMixin, SynchronousTestCase):
    """
    What L{serviceFromConfig} builds.
    """

    def test_children(self) -> None:
        """
        The proxy service holds the event log first, then the listeners and
        the management endpoint; listener TLS can be reloaded.
        """
        self.assertIsInstance(self.service, ProxyService)
        self.assertEqual([child.name for child in self.service], ["log", "listener-0", "admin"])
        self.assertIsInstance(self.service.context.serverTLS, ReloadableServerTLS)
        self.assertEqual(self.service.context.routerName, "static")
        self.assertIsNotNone(self.service.admin)

    def test_certificateProblemNamedOnce(self) -> None:
        """
        A key that does not match its certificate stops the build with the
        problem as check reports it: the file and the setting, once.
        """
        from mailproxy.config import ConfigError

        other = os.path.join(self.directory, "other")
        os.makedirs(other)
        _, key = makeSelfSigned(other)
        os.replace(key, os.path.join(self.directory, "key.pem"))
        error = self.assertRaises(ConfigError, serviceFromConfig, loadConfig(self.path), self.reactor)
        self.assertTrue(str(error).startswith(f"{self.path}: tls.key: "), str(error))
        self.assertEqual(str(error).count(self.path), 1, str(error))

    def test_adminListensOnLoopback(self) -> None:
        """
        Started, the management endpoint listens on 127.0.0.1 at its port.
        """
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        ports = {(port, interface) for port, _, _, interface in self.reactor.tcpServers}
        self.assertIn((19443, "127.0.0.1"), ports)
        self.assertIn((10993, "127.0.0.1"), ports)


class ReloadTests(ServiceTreeTestsMixin, SynchronousTestCase):
    """
    L{ProxyService.reload}.
    """

    def test_appliesWhatCanChange(self) -> None:
        """
        A reload builds a new router from the new files and applies limits,
        host name, certificates, token and health details at once.
        """
        context = self.service.context
        oldRouter, oldOptions = context.router, context.serverTLS.options
        self.assertFalse(self.service.admin.healthDetails)
        self.write("routes.toml", 'default = "new"\n')
        self.write("admin.token", "u" * 40 + "\n")
        self.write(
            "mailproxy.toml",
            CONFIG.replace("shutdown_grace = 10", "shutdown_grace = 3")
            .replace("proxy.example.org", "mail.example.org")
            .replace('token_file = "admin.token"\n', 'token_file = "admin.token"\nhealth_details = true\n'),
        )
        outcome = self.service.reload()
        self.assertEqual(outcome, {"ok": True, "path": self.path, "restartNeeded": []})
        self.assertIsNot(context.router, oldRouter)
        self.assertEqual(context.router.explainRoute("x@y"), ("default", "new"))
        self.assertEqual(context.limits.shutdownGrace, 3)
        self.assertEqual(context.hostname, "mail.example.org")
        self.assertIsNot(context.serverTLS.options, oldOptions)
        self.assertEqual(self.service.admin.guard.token, b"u" * 40)
        self.assertTrue(self.service.admin.healthDetails)

    def test_brokenFileKeepsRunningConfiguration(self) -> None:
        """
        A file that does not parse changes nothing; the outcome and the log
        say why.
        """
        events: list[dict] = []
        publisher = LogPublisher(events.append)
        self.patch(ProxyService, "log", Logger(observer=publisher))
        router = self.service.context.router
        self.write("mailproxy.toml", CONFIG + "[limits\n")
        outcome = self.service.reload()
        self.assertFalse(outcome["ok"])
        self.assertTrue(outcome["error"].startswith(f"{self.path}: line "), outcome["error"])
        self.assertIs(self.service.context.router, router)
        self.assertEqual(self.service.context.limits.shutdownGrace, 10)
        (event,) = events
        self.assertEqual(event["error"], outcome["error"])
        self.assertIn("keeping the running configuration", event["log_format"])

    def test_brokenRouteTable(self) -> None:
        """
        A route table naming an unknown backend keeps the old configuration
        too, with the route table's name in the error.
        """
        self.write("routes.toml", 'default = "elsewhere"\n')
        outcome = self.service.reload()
        self.assertFalse(outcome["ok"])
        self.assertIn("routes.toml: default: unknown backend 'elsewhere'", outcome["error"])

    def test_restartNeeded(self) -> None:
        """
        Changed listeners, management endpoint or log settings are reported
        as needing a restart, and are not taken as applied.
        """
        self.write(
            "mailproxy.toml",
            CONFIG.replace("tcp:10993", "tcp:10994").replace("tcp:19443", "tcp:19444").replace('"json"', '"text"'),
        )
        self.assertEqual(self.service.reload()["restartNeeded"], ["listener", "admin.endpoint", "log"])
        self.assertEqual(self.service.reload()["restartNeeded"], ["listener", "admin.endpoint", "log"])


SQL_CONFIG = """\
[proxy]
hostname = "proxy.example.org"

[[listener]]
protocol = "imap"
endpoint = "tcp:10143:interface=127.0.0.1"
tls = "none"

[router]
type = "chain"

[[router.routers]]
type = "sql"
driver = "sqlite3"
database = "accounts.sqlite"
query = "SELECT backend FROM accounts WHERE address = :user"
pool_size = 2
[router.routers.cache]
ttl = 60

[backend.old]
host = "127.0.0.1"
ports = { imap = 143 }
"""


class ReloadReleasesRouterTests(TestCase):
    """
    A reload lets the replaced router's threads and connections go (on the
    real reactor, with an SQLite router in a chain and a cache).
    """

    def test_threadsStayFlat(self) -> None:
        """
        After five reloads, each followed by a lookup on the new router,
        only the current router's pool thread is alive: the old pools
        stopped (before, each reload left one more).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        import sqlite3

        with sqlite3.connect(os.path.join(directory, "accounts.sqlite")) as db:
            db.execute("CREATE TABLE accounts (address TEXT, backend TEXT)")
            db.execute("INSERT INTO accounts VALUES ('alice@example.org', 'old')")
        path = os.path.join(directory, "mailproxy.toml")
        with open(path, "w") as f:
            f.write(SQL_CONFIG)
        from twisted.internet import reactor

        service = serviceFromConfig(loadConfig(path), reactor)
        self.addCleanup(lambda: service.context.router.close())
        name = "mailproxy-sql-sqlite3"

        async def reloads() -> None:
            for _ in range(6):
                answer = await service.context.router.route(makeRequest("alice@example.org"))
                self.assertIsInstance(answer, Route)
                self.assertEqual(len(poolThreads(name)), 1)
                self.assertTrue(service.reload()["ok"])
            self.assertEqual(poolThreads(name), [])

        return Deferred.fromCoroutine(reloads())


class DrainTests(SynchronousTestCase):
    """
    L{ProxyService.stopService}: stop accepting, drain, then goodbye.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "routes.toml")
        with open(path, "w") as f:
            f.write('default = "old"\n')
        from mailproxy.config import Limits

        self.harness = ProxyHarness(None, limits=Limits(shutdownGrace=10))
        self.harness.context.router = StaticRouter(path, {"old": makeBackend("old")}, reactor=self.harness.clock)
        config = loadConfigStub(path)
        self.service = ProxyService(config, self.harness.context, self.harness.clock)
        self.listener = StoppingService()
        self.listener.setName("listener-0")
        self.listener.setServiceParent(self.service)
        self.service.startService()

    def test_noSessions(self) -> None:
        """
        Without sessions, stopping is immediate once the listeners stopped.
        """
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        self.listener.stopped.callback(None)
        self.successResultOf(stopped)

    def test_sessionsEndingInTime(self) -> None:
        """
        Sessions that end within the grace period end on their own: nobody
        gets a goodbye.
        """
        alice, client, _ = self.harness.login("alice@example.org")
        stopped = self.service.stopService()
        self.listener.stopped.callback(None)
        self.assertTrue(self.service.draining)
        self.harness.clock.advance(9)
        self.assertNoResult(stopped)
        self.harness.close(alice)
        self.successResultOf(stopped)
        self.assertEqual(client.value(), b"")

    def test_goodbyeAfterGrace(self) -> None:
        """
        Sessions still open after the grace period get the protocol's
        goodbye and are closed; stopping completes when they are gone.
        """
        alice, aliceClient, aliceBackend = self.harness.login("alice@example.org")
        waiting, waitingClient = self.harness.connect()
        stopped = self.service.stopService()
        self.listener.stopped.callback(None)
        self.harness.clock.advance(9.9)
        self.assertEqual(aliceClient.value(), b"")
        self.harness.clock.advance(0.1)
        self.assertEqual(aliceClient.value(), b"* BYE " + SHUTDOWN.encode() + b"\r\n")
        self.assertEqual(waitingClient.value(), b"* BYE " + SHUTDOWN.encode() + b"\r\n")
        self.assertTrue(aliceClient.disconnecting and aliceBackend.disconnecting)
        self.assertNoResult(stopped)
        self.harness.close(alice)
        self.harness.close(waiting)
        self.successResultOf(stopped)

    def test_slowCloseBounded(self) -> None:
        """
        Connections that do not close after the goodbye hold up the
        shutdown for a few seconds at most.
        """
        self.harness.login("alice@example.org")
        stopped = self.service.stopService()
        self.listener.stopped.callback(None)
        self.harness.clock.advance(10)
        self.assertNoResult(stopped)
        self.harness.clock.advance(5)
        self.successResultOf(stopped)

    def test_finishingSessionAwaited(self) -> None:
        """
        A session that, dropped, still has something to finish (an MX
        message awaiting its backend's reply) holds up the shutdown for as
        long as it says, not only the few seconds of the goodbyes; it ends
        as soon as it closes.
        """
        alice, _, _ = self.harness.login("alice@example.org")
        self.patch(type(alice), "finishing", property(lambda session: 100.0))
        stopped = self.service.stopService()
        self.listener.stopped.callback(None)
        self.harness.clock.advance(10 + 5)
        self.assertNoResult(stopped)
        self.harness.clock.advance(50)
        self.assertNoResult(stopped)
        self.harness.close(alice)
        self.successResultOf(stopped)

    def test_listenersFirst(self) -> None:
        """
        Draining begins only once the listeners have stopped accepting.
        """
        alice, client, _ = self.harness.login("alice@example.org")
        self.service.stopService()
        self.harness.clock.advance(100)
        self.assertEqual(client.value(), b"")
        self.listener.stopped.callback(None)
        self.harness.clock.advance(10)
        self.assertEqual(client.value(), b"* BYE " + SHUTDOWN.encode() + b"\r\n")


class StoppingService(Service):
    """
    A listener stand-in whose stop the test completes.
    """

    def __init__(self) -> None:
        self.stopped: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stopped


def loadConfigStub(routes: str):
    """
    A minimal configuration whose router reads C{routes}.
    """
    directory = os.path.dirname(routes)
    path = os.path.join(directory, "mailproxy.toml")
    with open(path, "w") as f:
        f.write(
            '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:1143"\ntls = "none"\n'
            '[router]\ntype = "static"\npath = "routes.toml"\n'
            '[backend.old]\nhost = "127.0.0.1"\nports = { imap = 143 }\n'
        )
    return loadConfig(path)


class ClassicTextTests(SynchronousTestCase):
    """
    L{ClassicText} writes what Twisted's L{formatEventAsClassicLogText}
    writes, byte for byte.
    """

    def setUp(self) -> None:
        # A zone with summer time, so that a line's offset can change.
        self.addCleanup(self._restoreZone, os.environ.get("TZ"))
        os.environ["TZ"] = "Europe/Berlin"
        time.tzset()

    @staticmethod
    def _restoreZone(zone: str | None) -> None:
        if zone is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = zone
        time.tzset()

    def test_sameLines(self) -> None:
        """
        For events of every shape (a C{"{text}"} line, a worker's
        C{"{log_text}"} one, another format, a system, no level or namespace, line breaks, a failure, no text), at
        times within one second, across the start of summer time, and just
        before a second's end (which rounds up to the next one), in an
        order where a cached timestamp would show, each line is Twisted's.
        """
        summer = 1774746000  # 2026-03-29T01:00:00Z: Berlin moves to +0200
        times = [
            summer - 1.5, summer - 1.25, summer - 0.0000001, summer - 0.5, summer, summer + 0.75,
            1700000000.9999996, 1700000000.2, 1700000001.0, 0.0, None,
        ]
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        events: list[dict[str, object]] = [
            {"log_format": "{text}", "text": "session abc end: imap", "log_namespace": "mailproxy.x", "log_level": LogLevel.info},
            {"log_format": "login {user} failed\nnext", "user": "bob", "log_namespace": "n", "log_level": LogLevel.warn},
            {"log_format": "{text}", "text": 3, "log_system": "worker 1"},
            {"log_format": "{log_text}", "log_text": "from a worker {not a field}", "log_system": "worker 2"},
            {"log_format": "{text}", "text": "two\nlines", "log_level": LogLevel.error},
            {"log_format": "it broke", "log_failure": failure, "log_namespace": "n", "log_level": LogLevel.critical},
            {"log_format": "", "log_namespace": "n", "log_level": LogLevel.info},
            {"log_format": "{text}", "text": "", "log_namespace": "n", "log_level": LogLevel.info},
            {"log_format": None, "log_io": "from stdio", "log_namespace": "n"},
        ]
        classic = ClassicText()
        for when in times:
            for event in events:
                timed = dict(event) if when is None else {**event, "log_time": when}
                self.assertEqual(classic(timed), formatEventAsClassicLogText(timed), (when, event))


class TwistdLogTests(SynchronousTestCase):
    """
    Under twistd, the proxy writes twistd's log itself (L{twistdLogObserver},
    L{TwistdLog}): the same destination and lines as twistd's own.
    """

    event = {
        "log_format": "{text}",
        "text": "session abc end: imap",
        "log_namespace": "mailproxy.x",
        "log_level": LogLevel.info,
        "log_time": 1700000000.25,
    }

    def setUp(self) -> None:
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def test_logFile(self) -> None:
        """
        With C{--logfile}, the lines go to that file, as twistd writes them,
        and C{SIGUSR1} is caught (to rotate it, as twistd does).
        """
        path = os.path.abspath(self.mktemp())
        observer = twistdLogObserver({"logfile": path, "nodaemon": True, "syslog": False})
        assert observer is not None
        observer(dict(self.event))
        with open(path) as f:
            self.assertEqual(f.read(), formatEventAsClassicLogText(self.event))
        self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))

    def test_standardOutput(self) -> None:
        """
        In the foreground without a log file, or with C{-}, the lines go
        to standard output.
        """
        for logfile in ("", "-"):
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            observer = twistdLogObserver({"logfile": logfile, "nodaemon": True})
            assert observer is not None
            observer(dict(self.event))
            self.assertEqual(out.getvalue(), formatEventAsClassicLogText(self.event))

    def test_leftToTwistd(self) -> None:
        """
        twistd keeps its own log for syslog, a logger of the command line's
        and a daemon told to log to standard output (which it refuses).
        """
        self.assertIsNone(twistdLogObserver({"syslog": True, "nodaemon": True}))
        self.assertIsNone(twistdLogObserver({"logger": "x.y", "nodaemon": True}))
        self.assertIsNone(twistdLogObserver({"logfile": "-", "nodaemon": False}))

    def test_application(self) -> None:
        """
        Joining twistd's application, the service makes its observer the
        application's log observer, which twistd then logs through; one
        the application has already is kept.
        """

        class Root(TwistdLog, Service):
            pass

        root = Root()
        root.twistdLog = LogPublisher()
        application = Application("mailproxy")
        root.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), root.twistdLog)
        other = Root()
        other.twistdLog = LogPublisher()
        other.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), root.twistdLog)
        plain = Application("mailproxy")
        Root().setServiceParent(plain)
        self.assertIsNone(plain.getComponent(ILogObserver))


class InfoAndAboveTests(SynchronousTestCase):
    """
    L{_InfoAndAbove}, the level filter of the proxy's logs.
    """

    def test_sameAsTwisted(self) -> None:
        """
        It passes on the events Twisted's filter for level info passes on,
        and only those: by level, and without a level or a namespace.
        """
        events: list[dict[str, object]] = []
        for level in (*LogLevel.iterconstants(), None):
            for namespace in ("mailproxy._session.FrontendProtocol", "x", "", None):
                event: dict[str, object] = {"log_format": "{text}", "text": "t"}
                if level is not None:
                    event["log_level"] = level
                if namespace is not None:
                    event["log_namespace"] = namespace
                events.append(event)
        ours: list[object] = []
        theirs: list[object] = []
        twisted = FilteringLogObserver(theirs.append, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)])
        filtered = _InfoAndAbove(ours.append)
        for event in events:
            twisted(event)
            filtered(event)
        self.assertEqual(ours, theirs)
        self.assertEqual(len(ours), 8)

    def test_oneCall(self) -> None:
        """
        An event is judged without another Python call (Twisted's filter
        makes several for each event: every session's end line goes
        through it, once for each log that filters).
        """
        received: list[object] = []
        filtered = _InfoAndAbove(received.append)
        event = {"log_level": LogLevel.info, "log_namespace": "mailproxy._session.FrontendProtocol", "log_format": ""}
        calls: list[str] = []

        def profile(frame: object, kind: str, arg: object) -> None:
            if kind == "call":
                calls.append(getattr(frame, "f_code").co_name)

        sys.setprofile(profile)
        try:
            filtered(event)
        finally:
            sys.setprofile(None)
        self.assertEqual(calls, ["__call__"])
        self.assertEqual(received, [event])

    def test_serviceAndProcessFilter(self) -> None:
        """
        The event log and C{mailproxy run}'s own log keep info and above.
        """
        path = os.path.abspath(self.mktemp())
        publisher = LogPublisher()
        service = EventLogService(LogConfig("text", path), publisher)
        service.startService()
        stream = io.StringIO()
        process = processLogObserver(LogConfig("text", path), stream)
        publisher.addObserver(process)
        log = Logger(namespace="mailproxy.test", observer=publisher)
        log.debug("hidden")
        log.info("shown")
        service.stopService()
        with open(path) as f:
            self.assertEqual([line.split("] ", 1)[1] for line in f], ["shown\n"])
        self.assertEqual([line.split("] ", 1)[1] for line in stream.getvalue().splitlines()], ["shown"])


    def test_startLinesInTheFile(self) -> None:
        """
        What is logged while the listeners bind (the privileged start,
        before the services start) reaches the file: where each listener
        listens.
        """
        path = os.path.abspath(self.mktemp())
        publisher = LogPublisher()
        service = EventLogService(LogConfig("text", path), publisher)
        service.privilegedStartService()
        Logger(namespace="mailproxy.test", observer=publisher).info("listening on 993")
        service.startService()
        Logger(namespace="mailproxy.test", observer=publisher).info("serving")
        service.stopService()
        with open(path) as f:
            self.assertEqual([line.split("] ", 1)[1] for line in f], ["listening on 993\n", "serving\n"])


class EventLogTests(SynchronousTestCase):
    """
    L{EventLogService} and L{jsonLine}.
    """

    def emit(self, logFormat: str, user: str = "a\nb") -> str:
        """
        Run the event log service in C{logFormat} on its own publisher, log
        a session end of C{user} and a failure, and return the file's text.
        """
        path = os.path.abspath(self.mktemp())
        publisher = LogPublisher()
        service = EventLogService(LogConfig(logFormat, path), publisher)
        service.startService()
        log = Logger(namespace="mailproxy.test", observer=publisher)
        log.info(
            "session {session} end: user={user}",
            event="session_end", session="abc", user=logQuote(user), bytesIn=3, keys=("x", "y"),
            credentials=object(),
        )
        log.debug("not written")
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke")
        service.stopService()
        with open(path) as f:
            return f.read()

    def test_jsonLines(self) -> None:
        """
        In JSON, each event is one object per line, with its stable name and
        its plain fields, and without objects or debug events.
        """
        lines = self.emit("json").splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(
            {k: first[k] for k in ("level", "namespace", "event", "message", "session", "user", "bytesIn", "keys")},
            {
                "level": "info",
                "namespace": "mailproxy.test",
                "event": "session_end",
                "message": 'session abc end: user="a\\nb"',
                "session": "abc",
                "user": "a\nb",
                "bytesIn": 3,
                "keys": ["x", "y"],
            },
        )
        self.assertNotIn("credentials", first)
        self.assertTrue(first["time"].endswith("Z"))
        self.assertEqual((second["level"], second["error"]), ("critical", "ZeroDivisionError: division by zero"))

    def test_jsonLinesASCII(self) -> None:
        """
        A client's text that some readers take for a line end (U+2028,
        NEL) is escaped: each event is one printable ASCII line, which
        reads back as the text the client sent, characters beyond the BMP
        included. An octet that is not UTF-8 (a lone surrogate in Python)
        reads back as the text C{\\xNN}: strict JSON readers refuse a lone
        surrogate, and with it the whole line.
        """
        user = "a\udcff\u2028b\x85c\x1b[2J\rd\U0001f600"
        text = self.emit("json", user)
        self.assertTrue(text.isascii())
        lines = text.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(all(line.isprintable() for line in lines))
        first = json.loads(lines[0])
        self.assertEqual(first["user"], "a\\xff\u2028b\x85c\x1b[2J\rd\U0001f600")
        # Every string of the line is Unicode a strict reader takes.
        json.dumps(first, ensure_ascii=False).encode("utf-8")
        # The text line quotes the client's octet as \udcff: kept as it is.
        self.assertEqual(first["message"], "session abc end: user=" + json.dumps(user))

    def test_textOneLine(self) -> None:
        """
        In text, a client's text quoted with L{logQuote} stays on its line,
        in printable ASCII, whatever it holds.
        """
        text = self.emit("text", "x\n[mailproxy.test#info] forged\r\x00\x1b\udcff\u2028")
        (line,) = [line for line in text.split("\n") if "session abc end" in line]
        self.assertTrue(line.isascii() and line.isprintable(), line)
        self.assertNotIn("\n[mailproxy.test#info] forged", text)

    def test_longTextCut(self) -> None:
        """
        A client's text longer than L{MAX_LOG_TEXT} characters is cut in
        the text line (which ends in C{...}), so that 8 KiB of control
        characters (6 octets each, escaped) cannot make a line the journal
        splits; the JSON line keeps the whole text.
        """
        user = "\x01" * 8192
        text = self.emit("text", user)
        (line,) = [line for line in text.split("\n") if "session abc end" in line]
        self.assertTrue(line.endswith("user=" + json.dumps("\x01" * MAX_LOG_TEXT) + "..."), line[-80:])
        self.assertLess(len(line), 7 * MAX_LOG_TEXT)
        first = json.loads(self.emit("json", user).splitlines()[0])
        self.assertEqual(first["user"], user)

    def test_textControlsEscaped(self) -> None:
        """
        In text, control characters that reach an entry unquoted (in a
        traceback's message) are written as escapes, and text UTF-8 cannot
        encode does not lose the entry: only the tab-indented continuation
        lines of the traceback remain.
        """
        path = os.path.abspath(self.mktemp())
        publisher = LogPublisher()
        service = EventLogService(LogConfig("text", path), publisher)
        service.startService()
        log = Logger(namespace="mailproxy.test", observer=publisher)
        try:
            raise ValueError("bad name x\r\x1b[2J\x00\udcff")
        except ValueError:
            log.failure("router failed")
        service.stopService()
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.assertIn("ValueError: bad name x\\x0d\\x1b[2J\\x00\\udcff\n", text)
        for line in text.splitlines():
            self.assertTrue(line.replace("\t", " ").isprintable(), line)

    def test_text(self) -> None:
        """
        In text, events are classic log lines: time, namespace and level,
        message.
        """
        text = self.emit("text")
        self.assertIn(' [mailproxy.test#info] session abc end: user="a\\nb"\n', text)

    def test_reopen(self) -> None:
        """
        After the file is moved away (log rotation), L{reopen} writes to a
        new file at the configured path.
        """
        path = os.path.abspath(self.mktemp())
        publisher = LogPublisher()
        service = EventLogService(LogConfig("json", path), publisher)
        service.startService()
        log = Logger(namespace="t", observer=publisher)
        log.info("one")
        os.rename(path, path + ".1")
        service.reopen()
        log.info("two")
        service.stopService()
        with open(path) as f:
            self.assertEqual([json.loads(line)["message"] for line in f], ["two"])

    def test_jsonLineWithoutFields(self) -> None:
        """
        An event with nothing but a format still gives a complete object.
        """
        self.assertEqual(
            json.loads(jsonLine({"log_format": "hello", "log_time": 0})),
            {"time": "1970-01-01T00:00:00.000Z", "level": None, "namespace": None, "event": None, "message": "hello"},
        )




class ConfigurationWarningTests(ServiceTreeTestsMixin, SynchronousTestCase):
    """
    The warnings of a configuration (L{mailproxy.config.Config.warnings})
    are logged when the proxy starts and when it reloads.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict] = []
        self.patch(ProxyService, "log", Logger(observer=LogPublisher(self.events.append)))

    def warnings(self) -> list[str]:
        """
        The warnings logged so far.
        """
        return [event["problem"] for event in self.events if "problem" in event]

    def test_tokenFileAtStart(self) -> None:
        """
        A token file others can read is named in a warning at start.
        """
        os.chmod(os.path.join(self.directory, "admin.token"), 0o644)
        self.service = serviceFromConfig(loadConfig(self.path), self.reactor)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        (warning,) = self.warnings()
        self.assertIn("admin.token_file:", warning)
        self.assertIn("chmod 600", warning)

    def test_tokenFileOnReload(self) -> None:
        """
        A reload that finds the token file opened up warns; a private one
        gives no warning.
        """
        token = os.path.join(self.directory, "admin.token")
        os.chmod(token, 0o600)
        self.assertTrue(self.service.reload()["ok"])
        self.assertEqual(self.warnings(), [])
        os.chmod(token, 0o604)
        self.assertTrue(self.service.reload()["ok"])
        (warning,) = self.warnings()
        self.assertIn("mode 0604", warning)
