"""
Tests for L{mailproxy._workers}: the channel between the parent and its
workers, counting per client address across workers, supervision, the
parent's reload, log events relayed to the parent, and the workers'
counters summed (L{mailproxy._stats.mergeStates}); and for
L{mailproxy._shared}.  The processes themselves run in
tests.integration.test_workers.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import socket
import sys
from types import SimpleNamespace
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import LogLevel, LogPublisher, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides, implementer

from mailproxy._logs import EventLogService, _FileObserver, _InfoAndAbove, jsonLine, twistdLogObserver
from mailproxy._safetext import logQuote
from mailproxy._shared import FAILURE_MEMORY, MAX_FAILURES_COUNTED, LocalFailures
from mailproxy._stats import ProxyStats, mergeStates, metricsText, snapshot, statsState
from mailproxy._tcp import DirectReactor
from mailproxy import _workers
from mailproxy._workers import (
    LOG_BATCH,
    MAX_BACKOFF,
    STABLE,
    WORKER_ANSWER_TIMEOUT,
    CallError,
    Channel,
    LogBatch,
    Machine,
    WorkerConnections,
    _eventForParent,
    _eventFromWorker,
    _shortEvent,
)
from mailproxy.config import ConfigError, LogConfig, parseConfig, workerCount
from mailproxy.interfaces import IRouteCache, IRouter
from mailproxy.model import Rejection
from mailproxy.settings import Limits

from .opsfixtures import ProxyHarness


def channels(parentHandlers: dict[str, Any], workerHandlers: dict[str, Any]) -> tuple[Channel, Channel, Any]:
    """
    A parent's and a worker's channel connected in memory, and the pump
    that moves their bytes.
    """
    parent, worker = Channel(parentHandlers), Channel(workerHandlers)
    pump = connect(worker, makeFakeServer(worker), parent, makeFakeClient(parent))
    return parent, worker, pump


class ChannelTests(SynchronousTestCase):
    """
    Calls by name over AMP, with JSON of any size.
    """

    def test_largeArgumentAndAnswer(self) -> None:
        """
        An argument and an answer far larger than one AMP value (65,535
        octets) arrive whole.
        """
        sessions = [{"session": f"s{n:06d}", "account": f"user{n}@example.org"} for n in range(5000)]
        parent, worker, pump = channels({}, {"echo": lambda argument: {"got": argument}})
        answers: list[Any] = []
        parent.call("echo", sessions).addCallback(answers.append)
        pump.flush()
        self.assertEqual(answers, [{"got": sessions}])

    def test_deferredAnswer(self) -> None:
        """
        A handler may answer later, with a Deferred.
        """
        later: Deferred[int] = Deferred()
        parent, worker, pump = channels({}, {"later": lambda _: later})
        answers: list[Any] = []
        parent.call("later").addCallback(answers.append)
        pump.flush()
        self.assertEqual(answers, [])
        later.callback(7)
        pump.flush()
        self.assertEqual(answers, [7])

    def test_answerAfterCancel(self) -> None:
        """
        An answer that comes after its caller gave up (a timeout cancelled
        the call) is taken and dropped, not kept: a large one would stay
        for the channel's life.
        """
        later: Deferred[Any] = Deferred()
        parent, worker, pump = channels({}, {"later": lambda _: later})
        failures: list[Failure] = []
        parent.call("later").addErrback(failures.append).cancel()
        pump.flush()
        later.callback([{"session": f"s{n}"} for n in range(5000)])
        pump.flush()
        self.assertEqual(len(failures), 1)
        failures[0].trap(CancelledError)
        self.assertEqual(parent._parts, {})

    def test_unknownMethod(self) -> None:
        """
        A call of a method the other side does not have fails with
        L{CallError}, and the channel goes on.
        """
        parent, worker, pump = channels({}, {"known": lambda _: 1})
        failures: list[Failure] = []
        answers: list[Any] = []
        parent.call("unknown").addErrback(failures.append)
        parent.call("known").addCallback(answers.append)
        pump.flush()
        self.assertEqual(len(failures), 1)
        failures[0].trap(CallError)
        self.assertEqual(answers, [1])

    def test_notify(self) -> None:
        """
        A notification reaches its handler; nothing answers it.
        """
        heard: list[Any] = []
        parent, worker, pump = channels({"log": heard.append}, {})
        worker.notify("log", {"a": 1})
        pump.flush()
        self.assertEqual(heard, [{"a": 1}])


class FakeChannel:
    """
    Records notifications.
    """

    def __init__(self) -> None:
        self.notified: list[tuple[str, Any]] = []

    def notify(self, method: str, argument: Any) -> None:
        self.notified.append((method, argument))


class WorkerConnectionsTests(SynchronousTestCase):
    """
    A worker's count of connections per address.
    """

    def test_ownLimit(self) -> None:
        """
        A worker refuses an address at the limit by its own count.
        """
        clock, channel = Clock(), FakeChannel()
        tracker = WorkerConnections(2, channel, clock)  # type: ignore[arg-type]
        self.assertEqual([tracker.add("192.0.2.1") for _ in range(3)], [True, True, False])
        tracker.remove("192.0.2.1")
        self.assertTrue(tracker.add("192.0.2.1"))

    def test_blockedByParent(self) -> None:
        """
        An address the parent says is at the limit (counting every worker)
        is refused, until it says it is not.
        """
        tracker = WorkerConnections(5, FakeChannel(), Clock())  # type: ignore[arg-type]
        tracker.blocked.add("192.0.2.1")
        self.assertFalse(tracker.add("192.0.2.1"))
        self.assertTrue(tracker.add("192.0.2.2"))
        tracker.blocked.discard("192.0.2.1")
        self.assertTrue(tracker.add("192.0.2.1"))

    def test_noLimit(self) -> None:
        """
        With no limit (0) nothing is refused.
        """
        tracker = WorkerConnections(0, FakeChannel(), Clock())  # type: ignore[arg-type]
        tracker.blocked.add("192.0.2.1")
        self.assertTrue(tracker.add("192.0.2.1"))

    def test_reportedOncePerTurn(self) -> None:
        """
        What one turn of the reactor counted goes to the parent in one
        message, changes that cancel out left out.
        """
        clock, channel = Clock(), FakeChannel()
        tracker = WorkerConnections(5, channel, clock)  # type: ignore[arg-type]
        tracker.add("192.0.2.1")
        tracker.add("192.0.2.1")
        tracker.add("192.0.2.2")
        tracker.remove("192.0.2.2")
        self.assertEqual(channel.notified, [])
        clock.advance(0)
        self.assertEqual(channel.notified, [("connections", {"192.0.2.1": 2})])

    def test_noLimitTellsNothing(self) -> None:
        """
        With no limit (0, the default) the parent is told nothing: no
        message, and no wake-up of the parent, per connection.
        """
        clock, channel = Clock(), FakeChannel()
        tracker = WorkerConnections(0, channel, clock)  # type: ignore[arg-type]
        tracker.add("192.0.2.1")
        tracker.add("192.0.2.2")
        tracker.remove("192.0.2.2")
        clock.advance(0)
        self.assertEqual(channel.notified, [])
        self.assertEqual(clock.getDelayedCalls(), [])

CONFIG = """\
[proxy]
hostname = "proxy.example.org"
workers = 2
[limits]
connections_per_address = 3
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
"""


def configFile(case: SynchronousTestCase, text: str = CONFIG) -> str:
    """
    Write a configuration (C{text}, L{CONFIG} unless given) and the route
    table it names into a new directory of C{case}'s; the configuration
    file's path.
    """
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    with open(os.path.join(directory, "routes.toml"), "w") as f:
        f.write('default = "old"\n')
    path = os.path.join(directory, "config.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


class MachineTests(SynchronousTestCase):
    """
    The parent: counting across workers, supervision, reload.
    """

    def setUp(self) -> None:
        self.path = configFile(self)
        self.clock = Clock()
        self.machine = Machine(parseConfig(CONFIG, self.path), 2, self.clock, [])
        self.told: list[tuple[str, Any]] = []
        self.machine.tellWorkers = lambda method, argument: self.told.append((method, argument))  # type: ignore[method-assign]
        self.one, self.two = self.machine.workers

    def test_limitAcrossWorkers(self) -> None:
        """
        Every worker hears when an address reaches the limit counting all
        workers' connections, and when it drops below.
        """
        self.machine._connections(self.one, {"192.0.2.1": 2})
        self.assertEqual(self.told, [])
        self.machine._connections(self.two, {"192.0.2.1": 1})
        self.assertEqual(self.told, [("block", {"address": "192.0.2.1", "blocked": True})])
        self.machine._connections(self.two, {"192.0.2.1": -1})
        self.assertEqual(self.told[1:], [("block", {"address": "192.0.2.1", "blocked": False})])

    def test_limitSetByReload(self) -> None:
        """
        A reload that sets a limit has each worker tell the parent every
        connection it has open (counted while nothing was told), so the
        parent blocks an address as soon as all workers' connections reach
        the limit; a reload that removes it takes them back, and setting it
        again counts them once, not twice.
        """
        trackers = []
        for worker in self.machine.workers:
            channel = FakeChannel()
            channel.notify = lambda method, deltas, worker=worker: self.machine._connections(worker, deltas)  # type: ignore[method-assign]
            trackers.append(WorkerConnections(0, channel, self.clock))  # type: ignore[arg-type]
        one, two = trackers
        one.add("192.0.2.1")
        one.add("192.0.2.1")
        two.add("192.0.2.1")
        two.add("192.0.2.2")
        self.clock.advance(0)
        self.assertEqual(dict(self.machine.connections), {})
        # The reload: the parent's limit is 3 already; now each worker's.
        for tracker in trackers:
            tracker.limit = 3
        self.clock.advance(0)
        self.assertEqual(dict(self.machine.connections), {"192.0.2.1": 3, "192.0.2.2": 1})
        self.assertEqual(self.told, [("block", {"address": "192.0.2.1", "blocked": True})])
        one.remove("192.0.2.1")
        self.clock.advance(0)
        self.assertEqual(self.told[1:], [("block", {"address": "192.0.2.1", "blocked": False})])
        for tracker in trackers:
            tracker.limit = 0
        two.remove("192.0.2.2")
        two.add("192.0.2.3")
        self.clock.advance(0)
        self.assertEqual(dict(self.machine.connections), {})
        for tracker in trackers:
            tracker.limit = 3
        self.clock.advance(0)
        self.assertEqual(dict(self.machine.connections), {"192.0.2.1": 2, "192.0.2.3": 1})

    def test_deadWorkerUncounted(self) -> None:
        """
        The connections of a worker that died are no longer counted.
        """
        self.machine._connections(self.one, {"192.0.2.1": 2})
        self.machine._connections(self.two, {"192.0.2.1": 1})
        self.machine.running = False
        self.machine.workerEnded(self.one, "was killed by signal 9")
        self.assertEqual(self.told[-1], ("block", {"address": "192.0.2.1", "blocked": False}))
        self.assertEqual(dict(self.machine.connections), {"192.0.2.1": 1})

    def test_workerHealth(self) -> None:
        """
        The parent counts the workers that serve: none before they are
        ready, and one fewer from a worker's death until its replacement
        is ready.
        """
        self.assertEqual(self.machine.workerHealth(), {"configured": 2, "serving": 0})
        for worker in self.machine.workers:
            self.machine._ready(worker)
        self.assertEqual(self.machine.workerHealth(), {"configured": 2, "serving": 2})
        self.one.ended(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(self.machine.workerHealth(), {"configured": 2, "serving": 1})

    def test_backOff(self) -> None:
        """
        A worker that dies soon after its start is started again after a
        wait that doubles each time, up to L{MAX_BACKOFF}; once one ran
        L{STABLE} seconds, the next starts at once.
        """
        self.machine.running = True
        waits = []
        for _ in range(8):
            self.one.started = self.clock.seconds()
            self.machine.workerEnded(self.one, "exited with status 1")
            (call,) = self.clock.getDelayedCalls()
            waits.append(call.getTime() - self.clock.seconds())
            call.cancel()
        self.assertEqual(waits, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, MAX_BACKOFF, MAX_BACKOFF])
        self.clock.advance(STABLE)
        self.machine.workerEnded(self.one, "exited with status 1")
        (call,) = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), self.clock.seconds())

    def test_hungWorker(self) -> None:
        """
        A worker that does not answer within L{WORKER_ANSWER_TIMEOUT} is
        left out of the answers and logged, so what asked goes on; a
        reload it did not confirm is reported as not done.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for worker in self.machine.workers:
            worker.ready = True
        self.one.call = lambda method, argument=None: succeed({"ok": True})  # type: ignore[method-assign]
        self.two.call = lambda method, argument=None: Deferred()  # type: ignore[method-assign]
        answers: list[Any] = []
        self.machine.askWorkers("sessions", {}).addCallback(answers.append)
        self.clock.advance(WORKER_ANSWER_TIMEOUT - 1)
        self.assertEqual(answers, [])
        self.clock.advance(1)
        self.assertEqual(answers, [[(self.one, {"ok": True})]])
        self.assertIn(
            "worker 2 did not answer sessions: no answer within 30 s", [formatEvent(event) for event in events]
        )
        outcomes: list[dict[str, Any]] = []
        self.machine.reload().addCallback(outcomes.append)
        self.clock.advance(WORKER_ANSWER_TIMEOUT)
        self.assertEqual((outcomes[0]["ok"], outcomes[0]["error"]), (False, "worker 2: did not answer"))

    def test_brokenReload(self) -> None:
        """
        A reload of a broken file answers why, and tells no worker.
        """
        with open(self.path, "w") as f:
            f.write(CONFIG.replace('type = "static"', 'type = "nonesuch"'))
        asked: list[str] = []
        self.machine.askWorkers = lambda method, argument=None: asked.append(method)  # type: ignore[assignment, method-assign, misc, return-value]
        outcomes: list[dict[str, Any]] = []
        self.machine.reload().addCallback(outcomes.append)
        self.assertEqual(len(outcomes), 1)
        self.assertFalse(outcomes[0]["ok"])
        self.assertIn("nonesuch", outcomes[0]["error"])
        self.assertEqual((asked, self.told), ([], []))

    def answering(self, answers: dict[str, list[Any]]) -> list[tuple[str, Any]]:
        """
        Make the workers answer calls by method, worker 1's answer first;
        return the calls made.
        """
        asked: list[tuple[str, Any]] = []

        def askWorkers(method: str, argument: Any = None) -> Deferred[list[tuple[Any, Any]]]:
            asked.append((method, argument))
            return succeed(list(zip((self.one, self.two), answers[method])))

        self.machine.askWorkers = askWorkers  # type: ignore[method-assign]
        return asked

    def test_reloadTellsCheckedText(self) -> None:
        """
        A reload of a good file sends every worker the text the parent
        checked; a worker's refusal makes the outcome a failure naming it.
        """
        with open(self.path, "w") as f:
            f.write(CONFIG.replace("proxy.example.org", "new.example.org"))
        asked = self.answering({"reload": [{"ok": True}, {"ok": False, "error": "no certificate"}]})
        outcomes: list[dict[str, Any]] = []
        self.machine.reload().addCallback(outcomes.append)
        self.assertEqual(asked, [("reload", CONFIG.replace("proxy.example.org", "new.example.org"))])
        self.assertEqual(outcomes, [{"ok": False, "path": self.path, "error": "worker 2: no certificate"}])
        self.assertEqual(self.machine.config.hostname, "new.example.org")

    def test_sessionsOfEveryWorker(self) -> None:
        """
        The sessions listed are every worker's, each with its worker; a
        drop's answer names every worker's dropped sessions.
        """
        asked = self.answering(
            {"sessions": [[{"session": "a"}], [{"session": "b"}, {"session": "c"}]], "drop": [["a"], ["c"]]}
        )
        listed: list[Any] = []
        self.machine.describeSessions(account="x@example.org").addCallback(listed.append)
        self.assertEqual(listed, [[{"session": "a", "worker": 1}, {"session": "b", "worker": 2}, {"session": "c", "worker": 2}]])
        dropped: list[Any] = []
        self.machine.dropSessions("x@example.org", None, None, "Bye.").addCallback(dropped.append)
        self.assertEqual(dropped, [["a", "c"]])
        self.assertEqual(
            asked,
            [
                ("sessions", {"account": "x@example.org", "backend": None, "domain": None}),
                ("drop", {"account": "x@example.org", "backend": None, "session": None, "reason": "Bye."}),
            ],
        )

    def test_holdInEveryWorker(self) -> None:
        """
        A move's hold is told to every worker, and its end; a worker that
        starts meanwhile learns of the hold in effect.
        """
        release = self.machine.gate.hold(["a@example.org"], ["example.net"])
        self.assertEqual(
            self.told, [("hold", {"id": 1, "accounts": ["a@example.org"], "domains": ["example.net"], "mail": False})]
        )
        self.assertEqual(self.machine._hello(self.one)["holds"], [self.told[0][1]])
        release()
        self.assertEqual(self.told[1:], [("release", {"id": 1})])
        self.assertEqual(self.machine._hello(self.one)["holds"], [])

    def test_mailHoldInEveryWorker(self) -> None:
        """
        A migration's hold (C{mail=True}: MX recipients wait too), which
        the parent's migration engine makes, is told to every worker with
        its C{mail}.
        """
        self.machine.gate.hold(["a@example.org"], [], mail=True)
        self.assertEqual(self.told, [("hold", {"id": 1, "accounts": ["a@example.org"], "domains": [], "mail": True})])

    def test_failuresTold(self) -> None:
        """
        A failed login a worker reports is counted for its address and the
        count told to every worker.
        """
        self.machine._failed("192.0.2.1")
        self.machine._failed("192.0.2.1")
        self.assertEqual(self.told, [("failures", {"address": "192.0.2.1", "count": n}) for n in (1, 2)])

    def test_forgivenTold(self) -> None:
        """
        Failures a worker forgives come off its address's count here, and
        every worker is told the count left.
        """
        for _ in range(3):
            self.machine._failed("192.0.2.1")
        self.machine._forgive("192.0.2.1", 2)
        self.assertEqual(self.machine.failures.recent("192.0.2.1"), 1)
        self.assertEqual(self.told[-1], ("lower", {"address": "192.0.2.1", "count": 1}))


class LocalFailuresTests(SynchronousTestCase):
    """
    Failed logins per address.
    """

    def test_countAndForget(self) -> None:
        """
        Failures from one address count up; after L{FAILURE_MEMORY}
        seconds without one, they are forgotten.
        """
        clock = Clock()
        failures = LocalFailures(clock)
        self.assertEqual([failures.failed("192.0.2.1") for _ in range(3)], [1, 2, 3])
        self.assertEqual(failures.failed("192.0.2.2"), 1)
        clock.advance(FAILURE_MEMORY + 1)
        self.assertEqual(failures.failed("192.0.2.1"), 1)

    def test_learn(self) -> None:
        """
        A larger count learned from elsewhere is the count from then on.
        """
        failures = LocalFailures(Clock())
        failures.failed("192.0.2.1")
        failures.learn("192.0.2.1", 4)
        failures.learn("192.0.2.1", 2)
        self.assertEqual(failures.failed("192.0.2.1"), 5)


class LogRelayTests(SynchronousTestCase):
    """
    A worker's log events, as the parent's log writes them.
    """

    def test_textAndFields(self) -> None:
        """
        The parent's event has the worker's text (braces included), level,
        fields, and quoted text in both forms, plus the worker's number.
        """
        event = {
            "log_format": "login {user} {{literal}} {n}",
            "log_level": LogLevel.warn,
            "log_namespace": "mailproxy._session",
            "log_time": 1000.0,
            "user": logQuote('a"b\r\n'),
            "n": 3,
            "event": "login_failed",
            "object": object(),
        }
        relayed = _eventFromWorker(_eventForParent(event, 2))  # type: ignore[arg-type]
        self.assertEqual(formatEvent(relayed), formatEvent(event))
        self.assertEqual(relayed["log_level"], LogLevel.warn)
        self.assertEqual(relayed["worker"], 2)
        self.assertEqual(relayed["log_system"], "worker 2")
        self.assertNotIn("object", relayed)
        line = jsonLine(relayed)
        self.assertIn('"user": "a\\"b\\r\\n"', line)
        self.assertIn('"event": "login_failed"', line)

    def test_tooLarge(self) -> None:
        """
        An event too large for one AMP value is refused by the channel; its
        short form fits, with the start of its text.
        """
        parent, worker, pump = channels({"log": lambda data: None}, {})
        event = {"log_format": "{text}", "log_level": LogLevel.error, "text": "\x01" * 50000}
        data = _eventForParent(event, 1)
        assert data is not None
        self.assertRaises(ValueError, worker.notify, "log", data)
        worker.notify("log", _shortEvent(data))
        self.assertTrue(formatEvent(_eventFromWorker(_shortEvent(data))).endswith(" [cut]"))

    def test_plainFieldsChecked(self) -> None:
        """
        A session's end event, whose fields are mostly plain strings and
        numbers, has them relayed without calling C{isinstance} per field
        and per type (each call costs the worker's every login); subclasses
        of the plain types still go, quoted text in both forms.
        """
        checks: list[object] = []

        def counting(value: object, types: Any) -> bool:
            checks.append(value)
            return isinstance(value, types)

        _workers.isinstance = counting  # type: ignore[attr-defined]
        self.addCleanup(delattr, _workers, "isinstance")
        fields = {f"field{n}": value for n, value in enumerate(["a", 1, 2.5, True, None] * 4)}
        event = {
            "log_format": "{text}", "log_level": LogLevel.info, "log_namespace": "mailproxy._session",
            "log_time": 1000.0, "text": "session s1 end", "user": logQuote("u"), "level": LogLevel.warn, **fields,
        }
        data = _eventForParent(event, 1)
        assert data is not None
        self.assertEqual({key: data[key] for key in fields}, fields)
        self.assertEqual(data["user"], {"quoted": '"u"', "raw": "u"})
        self.assertNotIn("level", data)
        # The failure's, the quoted text's, the level's three.
        self.assertLessEqual(len(checks), 5)

    def test_debugStays(self) -> None:
        """
        Debug events stay in the worker, as the parent's log would drop
        them.
        """
        self.assertIsNone(_eventForParent({"log_format": "x", "log_level": LogLevel.debug}, 1))

    def test_failureTraceback(self) -> None:
        """
        A failure's traceback travels in the text.
        """
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        event = {"log_format": "oops", "log_level": LogLevel.critical, "log_failure": failure}
        text = formatEvent(_eventFromWorker(_eventForParent(event, 1)))  # type: ignore[arg-type]
        self.assertIn("oops", text)
        self.assertIn("ZeroDivisionError", text)


class BoxCounter:
    """
    Counts the AMP boxes a channel sends.
    """

    def __init__(self, channel: Channel) -> None:
        self.boxes: list[Any] = []
        send = channel.sendBox

        def counting(box: Any) -> None:
            self.boxes.append(box)
            send(box)

        channel.sendBox = counting  # type: ignore[method-assign]


class LogBatchTests(SynchronousTestCase):
    """
    A worker's log events reach the parent's log in batches, whole and in
    order.
    """

    def setUp(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.patch(_workers, "globalLogPublisher", self.published.append)
        self.parent, self.worker, self.pump = channels(Machine.handlersFor(None, None), {})  # type: ignore[arg-type]
        self.clock = Clock()
        self.batch = LogBatch(self.worker, self.clock, 2)
        self.sent = BoxCounter(self.worker)

    def session(self, n: int, level: LogLevel = LogLevel.info) -> dict[str, Any]:
        """
        A session's end event, as a worker's log has it.
        """
        return {
            "log_format": "session {id} end: user={user} {{braces}}",
            "log_level": level,
            "log_namespace": "mailproxy._session",
            "log_time": 1000.0 + n,
            "id": f"s{n}",
            "user": logQuote(f'u"{n}'),
            "event": "session_end",
        }

    def test_oneMessageForMany(self) -> None:
        """
        The session lines a worker logs within L{LOG_BATCH} seconds go to
        the parent in one message (one wake-up of the parent), and the
        parent's log gets each line whole, in order, with the worker's
        number, as if each had travelled alone.
        """
        events = [self.session(n) for n in range(20)]
        for event in events:
            self.batch(event)
        self.clock.advance(LOG_BATCH / 2)
        self.pump.flush()
        self.assertEqual((self.sent.boxes, self.published), ([], []))
        self.clock.advance(LOG_BATCH / 2)
        self.pump.flush()
        self.assertEqual(len(self.sent.boxes), 1)
        self.assertEqual([formatEvent(e) for e in self.published], [formatEvent(e) for e in events])
        self.assertEqual([jsonLine(e) for e in self.published], [jsonLine(_eventFromWorker(_eventForParent(e, 2))) for e in events])  # type: ignore[arg-type]
        self.assertEqual({e["log_system"] for e in self.published}, {"worker 2"})

    def test_warningAtOnce(self) -> None:
        """
        A warning goes at once, after the lines logged before it.
        """
        self.batch(self.session(1))
        self.batch(self.session(2, LogLevel.warn))
        self.pump.flush()
        self.assertEqual([e["id"] for e in self.published], ["s1", "s2"])
        self.assertEqual(len(self.sent.boxes), 1)

    def test_otherMessagesAfter(self) -> None:
        """
        Whatever else the worker tells the parent leaves after the lines
        logged before it (the parent sees them in the order they happened).
        """
        order: list[str] = []
        self.patch(_workers, "globalLogPublisher", lambda event: order.append(event["id"]))
        self.parent.handlers["failed"] = lambda address: order.append("failed")
        self.batch(self.session(1))
        self.worker.notify("failed", "192.0.2.1")
        self.batch(self.session(2))
        self.clock.advance(LOG_BATCH)
        self.pump.flush()
        self.assertEqual(order, ["s1", "failed", "s2"])

    def test_textTravelsOnce(self) -> None:
        """
        A session's end line, whose format is its field C{text}, crosses the
        channel once (not as the text and again as the field), and the
        parent's event has the worker's format, text and fields: its text
        and JSON lines are the worker's.
        """
        text = "session s1 end: IMAP from 192.0.2.1:1 user=u backend=b result=ok"
        event = {
            "log_format": "{text}", "log_level": LogLevel.info, "log_namespace": "mailproxy._session",
            "log_time": 1000.0, "text": text, "event": "session_end", "user": logQuote("u"),
        }
        self.batch(event)
        self.clock.advance(LOG_BATCH)
        self.pump.flush()
        self.assertEqual(b"".join(value for box in self.sent.boxes for value in box.values()).count(text.encode()), 1)
        [published] = self.published
        self.assertEqual((published["log_format"], published["text"]), ("{text}", text))
        self.assertEqual(formatEvent(published), text)
        self.assertEqual(jsonLine(published), jsonLine(dict(event, log_system="worker 2", worker=2)))

    def test_largeBatchesSplit(self) -> None:
        """
        Lines that would not fit in one channel message go in several,
        every line whole; a line too long for one message alone is cut.
        """
        # About 20,000 characters of JSON each (the text and another
        # field): two fit in one message.
        long = {"log_format": "{text}", "log_level": LogLevel.info, "text": "x" * 10000, "also": "z" * 10000}
        for n in range(7):
            self.batch(dict(long, n=n))
        self.batch({"log_format": "{text}", "log_level": LogLevel.info, "text": "y" * 70000})
        self.clock.advance(LOG_BATCH)
        self.pump.flush()
        texts = [formatEvent(e) for e in self.published]
        self.assertEqual(texts[:7], ["x" * 10000] * 7)
        self.assertTrue(texts[7].startswith("yyy") and texts[7].endswith(" [cut]"))
        self.assertEqual(len(self.sent.boxes), 4)

    def test_notRunningAtOnce(self) -> None:
        """
        Once the reactor no longer runs (the worker exits), each event goes
        at once: nothing waits for a turn that will not come.
        """
        self.clock.running = False  # type: ignore[attr-defined]
        self.batch(self.session(1))
        self.pump.flush()
        self.assertEqual([e["id"] for e in self.published], ["s1"])


class CountingStream(io.StringIO):
    """
    A text stream that counts its writes.
    """

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


class ParentLogLinesTests(SynchronousTestCase):
    """
    The parent writes a worker's batch of log lines to its text logs as
    the worker made them: byte for byte what it wrote for each event, with
    one write per log, without decoding the events. (Twistd's log is
    reached as Twisted's L{FileLogObserver} keeps its file.)
    """

    def setUp(self) -> None:
        self.parent, self.worker, self.pump = channels(Machine.handlersFor(None, None), {})  # type: ignore[arg-type]
        self.clock = Clock()
        self.batch = LogBatch(self.worker, self.clock, 2)
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        base = {"log_level": LogLevel.info, "log_namespace": "mailproxy._session", "log_time": 1700000000.25}
        self.events: list[dict[str, Any]] = [
            dict(base, log_format="{text}", text='session s1 end: IMAP user="u" result=ok', event="session_end", user=logQuote("u")),
            dict(base, log_format="backend {name} said {reply} {{braces}}", name="bé", reply="Grüße ✓ \x1b[31m"),
            dict(base, log_format="", log_time=1700000000.9999996),
            dict(base, log_format="{text}", text="two\nlines\n\tand a tab", log_level=LogLevel.warn, log_time=1700000001.5),
            dict(base, log_format="it broke for {user}", user=logQuote("ü\r\n"), log_failure=failure, log_level=LogLevel.error),
            dict(base, log_format="{text}", text="after the failure", log_time=1700000002.0),
        ]

    def logs(self) -> list[Any]:
        """
        The parent's logs: twistd's log file, the event log in text (with
        and without the journal's priorities) and in JSON.
        """
        return [
            twistdLogObserver({"logfile": os.path.abspath(self.mktemp()), "nodaemon": True}),
            _InfoAndAbove(_FileObserver(CountingStream(), "text")),
            _InfoAndAbove(_FileObserver(CountingStream(), "text", priorities=True)),
            _InfoAndAbove(_FileObserver(CountingStream(), "json")),
        ]

    @staticmethod
    def written(observer: Any) -> str:
        """
        What C{observer} of L{logs} wrote.
        """
        if isinstance(observer, _InfoAndAbove):
            return observer._observer.stream.getvalue()  # type: ignore[attr-defined, no-any-return]
        with open(observer._outFile.path, encoding="utf-8") as f:
            return f.read()

    def relay(self, events: list[dict[str, Any]], observers: list[Any]) -> None:
        """
        Log C{events} in the worker, and let the parent write them to
        C{observers}.
        """
        self.patch(_workers, "globalLogPublisher", LogPublisher(*observers))
        for event in events:
            self.batch(dict(event))
        self.clock.advance(LOG_BATCH)
        self.pump.flush()

    def reference(self, events: list[dict[str, Any]], observers: list[Any]) -> None:
        """
        Write C{events} to C{observers} as the parent did before it took a
        worker's lines: each event from its JSON, one at a time.
        """
        for event in events:
            data = _eventForParent(event, 2)
            assert data is not None
            for observer in observers:
                observer(_eventFromWorker(json.loads(json.dumps(data))))

    def assertSameLogs(self, events: list[dict[str, Any]], logs: list[Any], rounds: int = 2) -> None:
        """
        C{events} relayed to the text logs in C{logs} (and, apart, to all
        of them with the JSON one) are written byte for byte as before.

        @param rounds: 1 for the text logs only.
        """
        for observers in (logs[:3], logs)[:rounds]:
            for observer in observers:
                if not isinstance(observer, _InfoAndAbove):
                    observer._outFile.rotate()
                else:
                    observer._observer.stream = CountingStream()  # type: ignore[attr-defined]
            self.relay(events, observers)
            written = [self.written(o) for o in observers]
            expected = self.logs()[: len(observers)]
            self.reference(events, expected)
            self.assertEqual(written, [self.written(o) for o in expected])

    def test_sameLines(self) -> None:
        """
        A batch with a session's end line, non-ASCII text and a control
        character, an event without text, a line break with a tab, a
        warning among info lines (the journal's priorities change within
        the batch) and a failure's traceback:
        twistd's log, the text event log and the JSON one are written byte
        for byte as when the parent wrote each event itself.
        """
        logs = self.logs()
        self.assertSameLogs(self.events, logs)
        written = self.written(logs[1])
        self.assertIn("bé said Grüße ✓ \\x1b[31m {braces}", written)
        self.assertIn("two\n\tlines\n\t\tand a tab", written)
        self.assertIn("ZeroDivisionError", written)
        self.assertIn("<4>2023", self.written(logs[2]))

    def test_noNamespace(self) -> None:
        """
        An event without a namespace (which twistd's log writes and the
        event log leaves out) is written as before.
        """
        events = [self.events[0], dict(self.events[1], log_namespace=None), self.events[5]]
        self.assertSameLogs(events, self.logs())

    def test_oneWrite(self) -> None:
        """
        A batch of lines is one write to twistd's log file and one to the
        text event log, without decoding the events' JSON.
        """
        twistd, text = self.logs()[:2]
        writes: list[str] = []
        decoded: list[str] = []
        write, loads = twistd._outFile.write, json.loads

        def counted(data: str) -> None:
            writes.append(data)
            write(data)

        def decode(data: str) -> Any:
            decoded.append(data)
            return loads(data)

        self.patch(twistd._outFile, "write", counted)
        self.patch(_workers.json, "loads", decode)
        self.relay([dict(self.events[0], log_time=1700000000.0 + n) for n in range(20)], [twistd, text])
        self.assertEqual((len(writes), text._observer.stream.writes, len(decoded)), (1, 1, 0))
        self.assertEqual(self.written(twistd).count("session s1 end"), 20)

    def test_linesWithoutFields(self) -> None:
        """
        A parent whose logs are all text says so to a starting worker,
        which then sends its lines without the events' fields: no JSON,
        and the logs get the same bytes; an event without a namespace
        still goes with its fields, in its place.
        """
        machine = Machine(parseConfig(CONFIG, configFile(self)), 1, Clock(), [])
        for observers, fields in ((self.logs()[:3], False), (self.logs(), True)):
            self.patch(_workers, "globalLogPublisher", LogPublisher(*observers))
            self.assertIs(machine._hello(machine.workers[0])["logFields"], fields)
        self.batch.sendFields(False)
        sent = BoxCounter(self.worker)
        relayed: list[Any] = []
        self.patch(_workers, "_eventForParent", lambda event, worker: relayed.append(event))
        self.assertSameLogs(self.events, self.logs()[:3], rounds=1)
        self.assertEqual(([box[b"events"] for box in sent.boxes], relayed), ([b""] * len(sent.boxes), []))
        self.patch(_workers, "_eventForParent", _eventForParent)
        events = [self.events[0], dict(self.events[1], log_namespace=None), self.events[5]]
        self.assertSameLogs(events, self.logs()[:3], rounds=1)
        self.assertFalse(self.batch.fields)

    def test_fieldsNeededAgain(self) -> None:
        """
        Lines without fields reaching a parent whose logs no longer all
        take lines are logged with their text and level, and the worker
        sends the fields from then on.
        """
        self.worker.handlers["logFields"] = self.batch.sendFields
        self.batch.sendFields(False)
        jsonLog = self.logs()[3]
        self.relay(self.events[:2], [jsonLog])
        self.assertTrue(self.batch.fields)
        lines = [json.loads(line) for line in self.written(jsonLog).splitlines()]
        self.assertEqual([(line["message"], line["level"]) for line in lines], [(formatEvent(e), "info") for e in self.events[:2]])
        self.relay(self.events[3:4], [jsonLog])
        self.assertEqual(self.written(jsonLog).splitlines()[2], jsonLine(_eventFromWorker(_eventForParent(self.events[3], 2))))  # type: ignore[arg-type]

    def test_reopenAndRotate(self) -> None:
        """
        The text event log reopened after its file was moved away (log
        rotation) and twistd's log file rotated (C{SIGUSR1}) get the lines
        of the batches after, in their new files.
        """
        path = os.path.abspath(self.mktemp())
        service = EventLogService(LogConfig("text", path), LogPublisher())
        service.startService()
        self.addCleanup(service.stopService)
        twistd = self.logs()[0]
        observers = [service._filter, twistd]
        self.relay(self.events[:1], observers)
        os.rename(path, path + ".1")
        service.reopen()
        twistd._outFile.rotate()
        self.relay(self.events[5:], observers)
        for name in (path, twistd._outFile.path):
            with open(name) as f, open(name + ".1") as before:
                self.assertEqual(
                    ([line.split("] ", 1)[1] for line in before], [line.split("] ", 1)[1] for line in f]),
                    ([formatEvent(self.events[0]) + "\n"], ["after the failure\n"]),
                )

    def test_eventsWrittenTogether(self) -> None:
        """
        A batch the parent logs as events (its logs include a JSON one) is
        one write to each log.
        """
        twistd, text, _, jsonLog = self.logs()
        writes: list[str] = []
        write = twistd._outFile.write

        def counted(data: str) -> None:
            writes.append(data)
            write(data)

        self.patch(twistd._outFile, "write", counted)
        self.relay([dict(self.events[0], log_time=1700000000.0 + n) for n in range(20)], [twistd, text, jsonLog])
        self.assertEqual((len(writes), text._observer.stream.writes, jsonLog._observer.stream.writes), (1, 1, 1))
        self.assertEqual([len(self.written(o).splitlines()) for o in (twistd, text, jsonLog)], [20, 20, 20])

    def test_lineRefused(self) -> None:
        """
        Of a batch logged as events, a line twistd's log file cannot
        encode (a lone surrogate) is refused as when each line was written
        alone: the lines before and after it are written, and the other
        logs report the observer's error.
        """
        bad = dict(self.events[0], text="bad \udcff line")
        events = [self.events[0], bad, self.events[5]]
        observers = self.logs()[:2]
        self.relay(events, observers)
        expected = self.logs()[:2]
        publisher = LogPublisher(*expected)
        for event in events:
            data = _eventForParent(event, 2)
            assert data is not None
            publisher(_eventFromWorker(json.loads(json.dumps(data))))
        # The same lines, the same error (its traceback names other lines of
        # the observer's call).
        places = re.compile(r"0x[0-9a-f]+|py:[0-9]+:|line [0-9]+")
        written, before = ([places.sub("", self.written(o)) for o in logs] for logs in (observers, expected))
        self.assertEqual(written, before)
        self.assertNotIn("bad", written[0])
        self.assertIn("Temporarily disabling observer", written[1])

    def test_surrogateWrittenAlone(self) -> None:
        """
        Of a batch logged as events, a line that twistd's standard output
        takes only by its error handler (a lone surrogate, written as the
        octet it stands for) is written once, in its place.
        """
        bad = dict(self.events[0], text="bad \udcff line")
        events = [self.events[0], bad, self.events[5]]
        outputs = []
        for write in (self.relay, self.reference):
            out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="surrogateescape")
            self.patch(sys, "stdout", out)
            observers = [twistdLogObserver({"logfile": "-", "nodaemon": True}), self.logs()[3]]
            write(events, observers)
            out.flush()
            outputs.append(out.buffer.getvalue())  # type: ignore[attr-defined]
        self.assertEqual(outputs[0], outputs[1])
        self.assertEqual(outputs[0].count(b"bad \xff line"), 1)

    def test_rotation(self) -> None:
        """
        Twistd's log file, rotated when it reaches its size, rotates
        before the same line as when each line was written alone.
        """
        path = os.path.abspath(self.mktemp())
        os.mkdir(path)
        lines = [dict(self.events[0], log_time=1700000000.0 + n) for n in range(12)]
        for directory, write in (("new", self.relay), ("before", self.reference)):
            os.mkdir(os.path.join(path, directory))
            observer = twistdLogObserver({"logfile": os.path.join(path, directory, "twistd.log"), "nodaemon": True})
            assert observer is not None
            observer._outFile.rotateLength = 300  # type: ignore[attr-defined]
            write(lines, [observer])
            observer._outFile.close()  # type: ignore[attr-defined]
        files: dict[str, dict[str, str]] = {}
        for directory in ("new", "before"):
            files[directory] = {}
            for name in os.listdir(os.path.join(path, directory)):
                with open(os.path.join(path, directory, name)) as f:
                    files[directory][name] = f.read()
        self.assertGreater(len(files["before"]), 2)
        self.assertEqual(files["new"], files["before"])


class MergeTests(SynchronousTestCase):
    """
    The workers' counters summed.
    """

    def test_sumEqualsOneProcess(self) -> None:
        """
        What two workers counted, summed, is what one process counting
        the same events shows.
        """
        clock = Clock()
        one, two, both = ProxyStats(clock), ProxyStats(clock), ProxyStats(clock)
        for stats in (one, both):
            stats.connectionAccepted("imap", "0")
            stats.loginSucceeded("imap", "old", 0.02)
            stats.routerAnswered(0.003, "static")
        for stats in (two, both):
            stats.connectionAccepted("imap", "0")
            stats.connectionRefused("imap", "0", "connections_per_address")
            stats.loginFailed("imap", "old", "auth", 0.5)
            stats.routerAnswered(0.2, "static")
            stats.sessionEnded("imap", "old", 10, 20)
        states = [statsState(stats, [], None) for stats in (one, two)]
        merged, sessions, cache = mergeStates(states, clock)
        self.assertEqual(snapshot(merged, sessions, cache), snapshot(both, [], None))  # type: ignore[arg-type]

    def test_cachesSummed(self) -> None:
        """
        The route caches' hits and misses of every worker are summed, in
        C{/stats} and in C{/metrics}.
        """
        clock = Clock()
        caches = [SimpleNamespace(hits=3, misses=1), SimpleNamespace(hits=2, misses=4)]
        states = []
        for counts in caches:
            router = directlyProvides(counts, IRouteCache) or counts
            states.append(statsState(ProxyStats(clock), [], router))
        merged, sessions, cache = mergeStates(states, clock)
        self.assertEqual(snapshot(merged, sessions, cache)["router"]["cache"]["hits"], 5)  # type: ignore[arg-type]
        text = metricsText(merged, sessions, cache).decode()
        self.assertIn("mailproxy_router_cache_hits_total 5.0", text)
        self.assertIn("mailproxy_router_cache_misses_total 5.0", text)


@implementer(IRouter)
class RejectAll:
    """
    A router that knows nobody.
    """

    def route(self, request: Any) -> Rejection:
        return Rejection()


class AddressFailureDelayTests(SynchronousTestCase):
    """
    The failed-login delay counts the failures of the client's address in
    every session (L{mailproxy._shared.IFailureCounter}).
    """

    def failAt(self, harness: ProxyHarness, frontend: Any, transport: Any, user: bytes = b"nobody") -> float:
        """
        Send a login of C{user} that fails; return how long its answer took.
        """
        started = harness.clock.seconds()
        frontend.dataReceived(b"a LOGIN " + user + b" x\r\n")
        while not transport.value():
            harness.clock.advance(0.25)
        self.assertIn(b"a NO [AUTHENTICATIONFAILED]", transport.value())
        transport.clear()
        return harness.clock.seconds() - started

    def test_reconnectGainsNothing(self) -> None:
        """
        After two failures in one session, the first failure of a new
        session from the same address waits three delays; another
        address's waits one. The JSON log's C{login_failed} event says how
        many failures the address had.
        """
        harness = ProxyHarness(RejectAll(), Limits(failureDelay=1.0, loginFailures=3))
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        first, firstTransport = harness.connect("192.0.2.7")
        self.assertEqual([self.failAt(harness, first, firstTransport) for _ in range(2)], [1.0, 2.0])
        second, secondTransport = harness.connect("192.0.2.7")
        self.assertEqual(self.failAt(harness, second, secondTransport), 3.0)
        other, otherTransport = harness.connect("192.0.2.8")
        self.assertEqual(self.failAt(harness, other, otherTransport, b"somebody"), 1.0)
        failed = [(e["address"], e["addressFailures"]) for e in events if e.get("event") == "login_failed"]
        self.assertEqual(failed, [("192.0.2.7", 1), ("192.0.2.7", 2), ("192.0.2.7", 3), ("192.0.2.8", 1)])

    def test_otherAddressesGainNothing(self) -> None:
        """
        Failed logins of one account from many addresses count together:
        the fourth address's first failure for the account waits four
        delays, another account's from a fresh address one. The JSON log's
        C{login_failed} event says how many failures the account had.
        """
        harness = ProxyHarness(RejectAll(), Limits(failureDelay=1.0, loginFailures=3))
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        waits = []
        for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"):
            frontend, transport = harness.connect(address)
            waits.append(self.failAt(harness, frontend, transport, b"Alice@example.org"))
        self.assertEqual(waits, [1.0, 2.0, 3.0, 4.0])
        frontend, transport = harness.connect("192.0.2.5")
        self.assertEqual(self.failAt(harness, frontend, transport, b"bob@example.org"), 1.0)
        failed = [e["accountFailures"] for e in events if e.get("event") == "login_failed"]
        self.assertEqual(failed, [1, 2, 3, 4, 1])

    def test_countedFailuresBounded(self) -> None:
        """
        However many failures an address had, a session's first failure
        waits at most L{MAX_FAILURES_COUNTED} delays.
        """
        harness = ProxyHarness(RejectAll(), Limits(failureDelay=1.0, loginFailures=3))
        for _ in range(MAX_FAILURES_COUNTED + 5):
            harness.context.failures.failed("192.0.2.7")
        frontend, transport = harness.connect("192.0.2.7")
        self.assertEqual(self.failAt(harness, frontend, transport), float(MAX_FAILURES_COUNTED))


class WorkersSettingTests(SynchronousTestCase):
    """
    C{[proxy] workers}.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "routes.toml"), "w") as f:
            f.write('default = "old"\n')
        self.path = os.path.join(directory, "config.toml")

    def test_default(self) -> None:
        """
        Without the key, one worker per CPU this process may run on.
        """
        config = parseConfig(CONFIG.replace("workers = 2\n", ""), self.path)
        self.assertIsNone(config.workers)
        self.assertEqual(workerCount(config), len(os.sched_getaffinity(0)))

    def test_given(self) -> None:
        """
        A number given is the count.
        """
        self.assertEqual(workerCount(parseConfig(CONFIG, self.path)), 2)

    def test_wrong(self) -> None:
        """
        0, more than 256 and what is not an integer are refused, naming
        the key.
        """
        for value, why in (("0", "at least 1"), ("257", "at most 256"), ('"auto"', "must be an integer")):
            with self.assertRaises(ConfigError) as raised:
                parseConfig(CONFIG.replace("workers = 2", f"workers = {value}"), self.path)
            self.assertIn("proxy.workers", str(raised.exception))
            self.assertIn(why, str(raised.exception))


class TellWorkersTests(SynchronousTestCase):
    """
    What the parent tells every worker.
    """

    def test_largeHold(self) -> None:
        """
        A hold of more accounts than one message holds reaches the worker
        whole.
        """
        path = configFile(self)
        machine = Machine(parseConfig(CONFIG, path), 1, Clock(), [])
        held: list[Any] = []
        parent, worker, pump = channels(machine.handlersFor(machine.workers[0]), {"hold": held.append})
        machine.workers[0].channel = parent
        accounts = [f"user{n:05d}@example.org" for n in range(3000)]
        release = machine.gate.hold(accounts, [])
        pump.flush()
        self.assertEqual(held, [{"id": 1, "accounts": accounts, "domains": [], "mail": False}])
        del release


class MigrationsInParentTests(SynchronousTestCase):
    """
    With workers, the parent runs the migrations: it asks the workers for
    an account's sessions, hears of their logins, and counts the
    migrations in C{/stats}.
    """

    def setUp(self) -> None:
        self.path = configFile(self)
        self.machine = Machine(parseConfig(CONFIG, self.path), 2, Clock(), [])
        self.one, self.two = self.machine.workers
        self.asked: list[tuple[str, Any, Deferred[Any]]] = []

        def askWorkers(method: str, argument: Any = None) -> Deferred[Any]:
            answer: Deferred[Any] = Deferred()
            self.asked.append((method, argument, answer))
            return answer

        self.machine.askWorkers = askWorkers  # type: ignore[method-assign]

    def test_sessionsUnknownUntilAnswered(self) -> None:
        """
        Until the workers answer, an account has one session on an unknown
        backend (so a wait for its sessions to end goes on); then the
        workers' sessions; each look asks again, never twice at once.
        """
        sessions = self.machine.migrations.sessions
        found = sessions.find(account="A@example.org")
        self.assertEqual([s.backendName for s in found], [""])
        sessions.find(account="a@example.org")
        self.assertEqual(len(self.asked), 1)
        method, argument, answer = self.asked[0]
        self.assertEqual((method, argument["account"]), ("sessions", "A@example.org"))
        answer.callback([(self.one, [{"account": "a@example.org", "backend": "old", "session": "s1"}]), (self.two, [])])
        found = sessions.find(account="a@example.org")
        self.assertEqual([(s.backendName, s.client.sessionId, s.worker) for s in found], [("old", "s1", self.one)])
        self.assertEqual(len(self.asked), 2)
        self.asked[1][2].callback([(self.one, []), (self.two, [])])
        self.assertEqual(sessions.find(account="a@example.org"), [])

    def test_sessionsDescribed(self) -> None:
        """
        The migration engine reads a session's state and id from its
        description: a worker's session gives what its worker said; the
        stand-in before the answer is a login that may be under way.
        """
        sessions = self.machine.migrations.sessions
        (unknown,) = sessions.find(account="a@example.org")
        self.assertEqual((unknown.describe()["state"], unknown.describe()["session"]), ("login", None))
        described = {"account": "a@example.org", "backend": "old", "session": "s1", "state": "relay", "worker": 1}
        self.asked[0][2].callback([(self.one, [described])])
        (session,) = sessions.find(account="a@example.org")
        self.assertEqual(session.describe(), described)

    def test_heldSessions(self) -> None:
        """
        The sessions whose logins wait at a hold are those the workers
        last named, asked afresh at each look; an answer asked before a
        hold was released is not kept (its logins have gone on since).
        """
        gate = self.machine.gate
        release = gate.hold(["a@example.org"], [])
        self.assertEqual(gate.heldSessions(), frozenset())
        gate.heldSessions()
        self.assertEqual([method for method, _, _ in self.asked], ["held"])
        self.asked[0][2].callback([(self.one, ["s1"]), (self.two, ["s2"])])
        self.assertEqual(gate.heldSessions(), frozenset({"s1", "s2"}))
        release()
        self.assertEqual(gate.heldSessions(), frozenset())
        self.asked[1][2].callback([(self.one, ["s1"])])
        self.assertEqual(gate.heldSessions(), frozenset())

    def test_workerNamesHeldSessions(self) -> None:
        """
        A worker answers the parent's C{held} with the sessions whose
        logins wait at its gate.
        """
        from types import SimpleNamespace

        from mailproxy._migrate import LoginHold
        from mailproxy.model import Credentials

        gate = LoginHold()
        gate.hold(["a@example.org"], [])
        request = SimpleNamespace(credentials=Credentials(mechanism="LOGIN", user="A@example.org", password=b"secret"), client=SimpleNamespace(sessionId="s7"))
        self.assertIsNotNone(gate.wait(request))
        side = _workers._WorkerSide(Clock(), 1, SimpleNamespace(context=SimpleNamespace(gate=gate)), None)  # type: ignore[arg-type]
        self.assertEqual(side.handlers()["held"](None), ["s7"])

    def test_migrationsCounted(self) -> None:
        """
        C{/stats} has the migrations the parent ran beside the workers'
        counters.
        """
        self.machine.stats.migrationEnded("c", "a@example.org", "done", 1234)
        answers: list[Any] = []
        self.machine.statsSnapshot().addCallback(answers.append)
        state = statsState(ProxyStats(Clock()), [], None)
        self.asked[0][2].callback([(self.one, {"stats": state, "cpu": 0.5})])
        self.assertEqual(answers[0]["migrations"], {"inFlight": 0, "ended": {"done": 1}, "bytes": 1234})

    def test_workerRunsNoMigrations(self) -> None:
        """
        A worker's proxy neither queues migrations on login nor resumes
        the journal: its parent does.
        """
        from mailproxy.tap import serviceFromConfig

        config = parseConfig(CONFIG, self.path)
        service = serviceFromConfig(config, Clock(), adopted=[(-1, 2)])
        self.assertFalse(service.migrating)
        self.assertEqual(service.context.sessions._observers, [])
        self.assertTrue(serviceFromConfig(config, Clock()).migrating)


def epollFlags(reactor: Any, fd: int) -> int | None:
    """
    The events C{reactor}'s epoll instance watches C{fd} for, as the
    kernel holds them (C{/proc/self/fdinfo}; in, out and exclusive only:
    the kernel adds error and hang-up), or L{None} if it does not.
    """
    with open(f"/proc/self/fdinfo/{reactor._poller.fileno()}") as f:
        for line in f:
            fields = line.split()
            if fields[:1] == ["tfd:"] and int(fields[1]) == fd:
                return int(fields[3], 16) & (select.EPOLLIN | select.EPOLLOUT | select.EPOLLEXCLUSIVE)
    return None


class ListeningWakeupTests(SynchronousTestCase):
    """
    A worker's reactor (L{_tcp.DirectReactor}) watches the listening socket
    it shares with the other workers so that a connection wakes one of
    them, not all.
    """

    def reactor(self) -> DirectReactor:
        reactor = DirectReactor()

        def close() -> None:
            reactor.removeAll()
            reactor._poller.close()
            for fd in (reactor.waker.i, reactor.waker.o):
                os.close(fd)

        self.addCleanup(close)
        return reactor

    def test_adoptedPortExclusive(self) -> None:
        """
        The listening socket a worker adopts from its parent is in its
        epoll set with C{EPOLLEXCLUSIVE}; once it stops listening it is out
        of the set, and listening again adds it the same way.
        """
        shared = socket.socket()
        self.addCleanup(shared.close)
        shared.bind(("127.0.0.1", 0))
        shared.listen(5)
        shared.setblocking(False)
        reactor = self.reactor()
        port = reactor.adoptStreamPort(shared.fileno(), socket.AF_INET, Factory())
        flags = epollFlags(reactor, port.fileno())
        self.assertEqual(flags, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        port.stopReading()
        self.assertIsNone(epollFlags(reactor, port.fileno()))
        port.startReading()
        self.assertEqual(epollFlags(reactor, port.fileno()), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        port.stopListening()

    def test_connectionsNotExclusive(self) -> None:
        """
        A connection's socket, which is watched for writing too (and
        modified), is watched as Twisted does, without the flag.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        reactor = self.reactor()
        reader = FileDescriptor(reactor)
        reader.fileno = ours.fileno  # type: ignore[method-assign]
        reactor.addReader(reader)
        reactor.addWriter(reader)
        self.assertEqual(epollFlags(reactor, ours.fileno()), select.EPOLLIN | select.EPOLLOUT)


class ParentPortTests(SynchronousTestCase):
    """
    The listening sockets the parent binds for its workers.
    """

    def test_stopKeepsWorkersListening(self) -> None:
        """
        When the parent stops, it closes its copy of a listening socket
        without shutting the socket down: a worker's copy (inherited) still
        listens, and accepts the connections queued.
        """
        from twisted.internet import reactor

        from mailproxy._endpoints import serverEndpoint

        path = configFile(self)
        endpoint = serverEndpoint(reactor, "tcp:0:interface=127.0.0.1")
        machine = Machine(parseConfig(CONFIG, path), 2, Clock(), [endpoint])
        machine._bind()
        [port] = machine.ports
        worker = socket.socket(fileno=os.dup(port.fileno()))
        self.addCleanup(worker.close)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        port.stopListening()
        reactor.runUntilCurrent()  # type: ignore[attr-defined]
        self.assertEqual(worker.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 1)
        accepted, _ = worker.accept()
        accepted.close()


class StopDeadlineTests(SynchronousTestCase):
    """
    L{_workers.stopDeadline}: how long the parent lets a worker stop.
    """

    def test_withoutMX(self) -> None:
        """
        Without an SMTP listener: the drain and the slack for goodbyes.
        """
        config = parseConfig(CONFIG, configFile(self))
        self.assertEqual(_workers.stopDeadline(config), config.limits.shutdownGrace + _workers.STOP_SLACK)

    def test_withMX(self) -> None:
        """
        With an SMTP listener, also the data-reply timeout: a worker waiting
        for the reply to a message's end is not killed before it (the
        sender would send the message again).
        """
        from mailproxy.smtp._base import DATA_END_TIMEOUT

        text = CONFIG.replace("ports = { imap = 143 }", "ports = { imap = 143, mx = 25 }") + (
            '[[listener]]\nprotocol = "smtp"\nmode = "mx"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
        )
        config = parseConfig(text, configFile(self, text))
        self.assertEqual(
            _workers.stopDeadline(config), config.limits.shutdownGrace + _workers.STOP_SLACK + DATA_END_TIMEOUT
        )
