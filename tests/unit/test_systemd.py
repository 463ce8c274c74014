"""
Tests for L{mailproxy._systemd} (notifications, journal priorities, the
reload outcome), what L{mailproxy._lifecycle.ProxyService} tells systemd,
the journal form of L{mailproxy._logs}, and L{mailproxy._endpoints}.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
from typing import Any

from twisted.internet.endpoints import AdoptedStreamServerEndpoint, TCP6ServerEndpoint, _SystemdParser
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._endpoints import serverEndpoint, splitDescription
from mailproxy._logs import EventLogService, processLogObserver
from mailproxy._systemd import (
    ReloadError,
    ServiceNotifier,
    isJournalStream,
    reloadBySignal,
    syslogPriority,
)
from mailproxy.config import ConfigError, LogConfig, loadConfig
from mailproxy.tap import serviceFromConfig

from .test_admin_lifecycle import ServiceTreeTestsMixin


class RecordingNotifier(ServiceNotifier):
    """
    A notifier that keeps what it would send.

    @ivar sent: each notification's lines.
    """

    def __init__(self, statusDirectory: str | None = None) -> None:
        super().__init__(None, statusDirectory, clock=lambda: 1234)
        self.sent: list[list[str]] = []

    def notify(self, *assignments: str) -> None:
        self.sent.append(list(assignments))


class NotifierTests(SynchronousTestCase):
    """
    L{ServiceNotifier}: the sd_notify protocol.
    """

    def receiver(self) -> tuple[socket.socket, str]:
        """
        An abstract datagram socket and the C{$NOTIFY_SOCKET} naming it.
        """
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        name = f"mailproxy-unit-{os.getpid()}-{id(self)}"
        receiver.bind("\0" + name)
        receiver.setblocking(False)
        return receiver, "@" + name

    def test_fromEnvironment(self) -> None:
        """
        C{$NOTIFY_SOCKET} names a path or, after C{@}, an abstract socket;
        it is taken out of the environment so that no child uses it. The
        status directory is the first C{$RUNTIME_DIRECTORY}.
        """
        environ = {"NOTIFY_SOCKET": "@abc", "RUNTIME_DIRECTORY": "/run/mailproxy:/run/other"}
        notifier = ServiceNotifier.fromEnvironment(environ)
        self.assertEqual((notifier.address, notifier.statusDirectory), (b"\0abc", "/run/mailproxy"))
        self.assertEqual(environ, {"RUNTIME_DIRECTORY": "/run/mailproxy:/run/other"})
        self.assertEqual(ServiceNotifier.fromEnvironment({"NOTIFY_SOCKET": "/run/n"}).address, "/run/n")
        for environ in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}):
            notifier = ServiceNotifier.fromEnvironment(environ)
            self.assertEqual((notifier.address, notifier.statusDirectory), (None, None))

    def test_messages(self) -> None:
        """
        Each state is one datagram of C{KEY=value} lines; a status is one
        line however many the text had.
        """
        receiver, address = self.receiver()
        notifier = ServiceNotifier.fromEnvironment({"NOTIFY_SOCKET": address})
        notifier._clock = lambda: 1234
        notifier.ready("serving")
        notifier.reloading("reloading /etc/m.toml")
        notifier.reloaded({"ok": True, "path": "/etc/m.toml", "restartNeeded": ["listener", "log"]})
        notifier.reloaded({"ok": False, "path": "/etc/m.toml", "error": "/etc/m.toml: bad\nSTOPPING=1"})
        notifier.stopping("stopping: 2 sessions open")
        notifier.status("x" * 600)
        received = [receiver.recv(4096).decode() for _ in range(6)]
        self.assertEqual(
            received,
            [
                "READY=1\nSTATUS=serving",
                "RELOADING=1\nMONOTONIC_USEC=1234\nSTATUS=reloading /etc/m.toml",
                "READY=1\nSTATUS=reloaded /etc/m.toml; these changes need a restart: listener, log",
                "READY=1\nSTATUS=reload failed, keeping the running configuration: /etc/m.toml: bad STOPPING=1",
                "STOPPING=1\nSTATUS=stopping: 2 sessions open",
                "STATUS=" + "x" * 500,
            ],
        )

    def test_nobodyListening(self) -> None:
        """
        A notification socket nobody listens on is logged once, and the
        proxy goes on.
        """
        notifier = ServiceNotifier(b"\0mailproxy-nobody-listens-here")
        with capturedLogs() as events:
            notifier.ready("serving")
            notifier.status("still")
        self.assertEqual([event["log_format"] for event in events], ["cannot notify systemd: {error}"])

    def test_withoutSocket(self) -> None:
        """
        Without C{$NOTIFY_SOCKET} nothing is sent and nothing is logged.
        """
        with capturedLogs() as events:
            ServiceNotifier().ready("serving")
        self.assertEqual(events, [])


class ReloadStatusTests(SynchronousTestCase):
    """
    The reload outcome in C{$RUNTIME_DIRECTORY/reload.json} and
    L{reloadBySignal}, with this process in the proxy's place.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.notifier = RecordingNotifier(self.directory)
        self.outcomes: list[dict[str, Any]] = []
        previous = signal.signal(signal.SIGHUP, self.sighup)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)

    def sighup(self, signum: int, frame: Any) -> None:
        if self.outcomes:
            self.notifier.reloaded(self.outcomes.pop(0))

    def test_outcome(self) -> None:
        """
        L{reloadBySignal} returns the outcome of the reload its SIGHUP
        caused, applied or refused.
        """
        self.notifier.writeStatus(None)
        applied = {"ok": True, "path": "/etc/m.toml", "restartNeeded": []}
        refused = {"ok": False, "path": "/etc/m.toml", "error": "/etc/m.toml: bad"}
        self.outcomes = [applied, refused]
        self.assertEqual(reloadBySignal(os.getpid(), self.directory, timeout=30), applied)
        self.assertEqual(reloadBySignal(os.getpid(), self.directory, timeout=30), refused)
        with open(os.path.join(self.directory, "reload.json")) as f:
            self.assertEqual(json.load(f), {"pid": os.getpid(), "generation": 2, "outcome": refused})

    def test_noOutcome(self) -> None:
        """
        A process that records no outcome for the SIGHUP: L{ReloadError}
        once the time is up.
        """
        self.notifier.writeStatus(None)
        error = self.assertRaises(ReloadError, reloadBySignal, os.getpid(), self.directory, 0.2, 0.01)
        self.assertEqual(str(error), f"no outcome from process {os.getpid()} after 0.2 seconds")

    def test_notRecorded(self) -> None:
        """
        Without C{$RUNTIME_DIRECTORY}, or when the process has not written
        there, no signal is sent.
        """
        self.outcomes = [{"ok": True, "path": "/etc/m.toml", "restartNeeded": []}]
        error = self.assertRaises(ReloadError, reloadBySignal, os.getpid(), None)
        self.assertIn("$RUNTIME_DIRECTORY is not set", str(error))
        error = self.assertRaises(ReloadError, reloadBySignal, os.getpid(), self.directory)
        self.assertIn(f"is not written by process {os.getpid()}", str(error))
        self.assertEqual(len(self.outcomes), 1)


class ProxyServiceNotifyTests(ServiceTreeTestsMixin, SynchronousTestCase):
    """
    What the proxy tells systemd as it starts, reloads and stops.
    """

    def test_lifecycle(self) -> None:
        """
        Ready with the listeners after start; reloading, then ready with
        the outcome for each reload (a refused one too); stopping, with the
        sessions left.
        """
        notifier = RecordingNotifier(self.directory)
        service = serviceFromConfig(loadConfig(self.path), self.reactor, notifier)
        service.startService()
        self.assertEqual(notifier.sent, [["READY=1", "STATUS=serving: 1 listener, router static"]])
        with open(os.path.join(self.directory, "reload.json")) as f:
            self.assertEqual(json.load(f), {"pid": os.getpid(), "generation": 0, "outcome": None})
        del notifier.sent[:]

        service.reload()
        with open(self.path, "a") as f:
            f.write("[router]\n")
        service.reload()
        self.assertEqual(
            notifier.sent[:2],
            [
                ["RELOADING=1", "MONOTONIC_USEC=1234", f"STATUS=reloading {self.path}"],
                ["READY=1", f"STATUS=reloaded {self.path}"],
            ],
        )
        self.assertEqual(notifier.sent[2][0], "RELOADING=1")
        self.assertEqual(notifier.sent[3][0], "READY=1")
        self.assertTrue(
            notifier.sent[3][1].startswith(f"STATUS=reload failed, keeping the running configuration: {self.path}: ")
        )
        del notifier.sent[:]

        service.stopService()
        self.assertEqual(notifier.sent, [["STOPPING=1", "STATUS=stopping: 0 sessions open"]])


class SystemdListenerTests(ServiceTreeTestsMixin, SynchronousTestCase):
    """
    A C{systemd:} listener and the socket systemd passed, or did not.
    """

    def useEndpoint(self, endpoint: str) -> None:
        """
        Make the configuration's listener use C{endpoint}.
        """
        with open(self.path) as f:
            text = f.read().replace("tcp:10993:interface=127.0.0.1", endpoint)
        with open(self.path, "w") as f:
            f.write(text)

    def passSocket(self, family: int, kind: int = socket.SOCK_STREAM, listen: bool = True) -> None:
        """
        Pretend systemd passed one socket, named C{imap}.
        """
        passed = socket.socket(family, kind)
        self.addCleanup(passed.close)
        passed.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        if listen:
            passed.listen(5)
        self.patch(_SystemdParser, "_sddaemon", ListenFDs([passed.fileno()], ("imap",)))

    def test_passedSocket(self) -> None:
        """
        The listener adopts the socket of its name.
        """
        self.useEndpoint("systemd:domain=INET6:name=imap")
        self.passSocket(socket.AF_INET6)
        service = serviceFromConfig(loadConfig(self.path), MemoryReactor())
        endpoint = service.getServiceNamed("listener-0").endpoint.endpoint  # type: ignore[attr-defined]
        self.assertIsInstance(endpoint, AdoptedStreamServerEndpoint)

    def test_wrongSocket(self) -> None:
        """
        A socket of another address family than the endpoint's domain, or
        one that does not listen for streams, stops the start, saying so.
        """
        self.useEndpoint("systemd:domain=INET:name=imap")
        for family, kind, listen, why in [
            (socket.AF_INET6, socket.SOCK_STREAM, True, "is an AF_INET6 socket, not AF_INET"),
            (socket.AF_INET, socket.SOCK_STREAM, False, "is no listening stream socket (ListenStream=)"),
            (socket.AF_INET, socket.SOCK_DGRAM, False, "is no listening stream socket (ListenStream=)"),
        ]:
            self.passSocket(family, kind, listen)
            error = self.assertRaises(ConfigError, serviceFromConfig, loadConfig(self.path), MemoryReactor())
            self.assertIn(f"listener[0]: endpoint: 'systemd:domain=INET:name=imap': descriptor ", str(error))
            self.assertTrue(str(error).endswith(why), str(error))

    def test_noSocket(self) -> None:
        """
        The proxy is not built: the error names the listener and the
        endpoint.
        """
        self.useEndpoint("systemd:domain=INET:name=nothing-passed")
        error = self.assertRaises(ConfigError, serviceFromConfig, loadConfig(self.path), MemoryReactor())
        self.assertEqual(
            str(error),
            f"{self.path}: listener[0]: endpoint: systemd passed no such socket (the socket unit's "
            "ListenStream= and FileDescriptorName=, or the service's Sockets=): "
            "'systemd:domain=INET:name=nothing-passed'",
        )


class JournalTests(SynchronousTestCase):
    """
    Log lines for the journal: C{<N>} priorities.
    """

    def test_priorities(self) -> None:
        """
        Twisted's levels map to syslog's priorities.
        """
        self.assertEqual(
            [syslogPriority(level) for level in (LogLevel.critical, LogLevel.error, LogLevel.warn, LogLevel.info, LogLevel.debug, None)],
            [2, 3, 4, 6, 7, 6],
        )

    def test_isJournalStream(self) -> None:
        """
        A stream is the journal's when C{$JOURNAL_STREAM} names its device
        and inode.
        """
        path = self.mktemp()
        with open(path, "w") as stream, open(__file__) as other:
            status = os.fstat(stream.fileno())
            environ = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
            self.assertTrue(isJournalStream(stream, environ))
            self.assertFalse(isJournalStream(other, environ))
            self.assertFalse(isJournalStream(stream, {}))
            self.assertFalse(isJournalStream(stream, {"JOURNAL_STREAM": "x:y"}))
            self.assertFalse(isJournalStream(io.StringIO(), environ))

    def test_processLog(self) -> None:
        """
        On the journal, each line of C{mailproxy run}'s log starts with its
        priority, a traceback's lines too; below info nothing is written.
        """
        path = self.mktemp()
        with open(path, "w") as stream:
            status = os.fstat(stream.fileno())
            self.patch(os, "environ", {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"})
            observer = processLogObserver(LogConfig(), stream)
            for level, text in ((LogLevel.info, "hello"), (LogLevel.warn, "careful"), (LogLevel.debug, "noise")):
                observer({"log_level": level, "log_format": text, "log_time": 0, "log_namespace": "t"})
            try:
                1 / 0
            except ZeroDivisionError:
                failure = Failure()
            observer(
                {"log_level": LogLevel.critical, "log_format": "oops", "log_time": 0, "log_namespace": "t", "log_failure": failure}
            )
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual([line[:3] for line in lines[:2]], ["<6>", "<4>"])
        self.assertTrue(lines[0].endswith(" [t#info] hello"))
        self.assertTrue(lines[2].endswith(" [t#critical] oops"))
        self.assertGreater(len(lines), 4)
        self.assertEqual([line[:3] for line in lines[2:]], ["<2>"] * (len(lines) - 2))
        self.assertIn("<2>\tbuiltins.ZeroDivisionError: division by zero", lines)

    def test_processLogJSON(self) -> None:
        """
        With C{[log] path = "-"}, C{mailproxy run}'s log has the C{[log]}
        format; without the journal, no priorities.
        """
        stream = io.StringIO()
        observer = processLogObserver(LogConfig(format="json", path="-"), stream)
        observer({"log_level": LogLevel.info, "log_format": "hello {who}", "who": "you", "log_time": 0, "log_namespace": "t"})
        event = json.loads(stream.getvalue())
        self.assertEqual((event["message"], event["who"]), ("hello you", "you"))
        stream = io.StringIO()
        processLogObserver(LogConfig(format="json", path="/var/log/x"), stream)(
            {"log_level": LogLevel.info, "log_format": "hello", "log_time": 0, "log_namespace": "t"}
        )
        self.assertTrue(stream.getvalue().endswith(" [t#info] hello\n"))

    def test_eventLogOnStandardOutput(self) -> None:
        """
        When C{mailproxy run} writes the C{[log]} lines to standard output
        itself, C{[log] path = "-"} adds no second writer; under twistd it
        does.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "routes.toml"), "w") as f:
            f.write('default = "old"\n')
        path = os.path.join(directory, "m.toml")
        with open(path, "w") as f:
            f.write(
                '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:0"\ntls = "none"\n'
                '[router]\ntype = "static"\npath = "routes.toml"\n'
                '[backend.old]\nhost = "127.0.0.1"\nports = { imap = 143 }\ntls = "none"\n'
                '[log]\npath = "-"\nformat = "json"\n'
            )
        config = loadConfig(path)
        self.assertIsInstance(serviceFromConfig(config, MemoryReactor()).eventLog, EventLogService)
        self.assertIsNone(serviceFromConfig(config, MemoryReactor(), eventLogOnStandardOutput=True).eventLog)


class EndpointTests(SynchronousTestCase):
    """
    L{mailproxy._endpoints}: endpoint strings without Twisted's plugin
    search.
    """

    def test_split(self) -> None:
        """
        Colons separate, the first C{=} makes a keyword, a backslash escapes.
        """
        self.assertEqual(
            splitDescription("tcp6:993:interface=\\:\\:1:backlog=5"),
            (["tcp6", "993"], {"interface": "::1", "backlog": "5"}),
        )
        self.assertEqual(splitDescription("systemd:domain=INET:name=a=b"), (["systemd"], {"domain": "INET", "name": "a=b"}))
        self.assertEqual(splitDescription("tcp"), (["tcp"], {}))

    def test_tcp6(self) -> None:
        """
        A C{tcp6:} string gives Twisted's TCP6 endpoint, with its port,
        backlog and interface.
        """
        reactor = MemoryReactor()
        endpoint = serverEndpoint(reactor, "TCP6:993:interface=\\:\\:1:backlog=7")
        self.assertIsInstance(endpoint, TCP6ServerEndpoint)
        endpoint.listen(object())  # type: ignore[arg-type]
        self.assertEqual([(port, backlog, interface) for port, _, backlog, interface in reactor.tcpServers], [(993, 7, "::1")])
