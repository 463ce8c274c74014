"""
Worker processes: every core of one machine serves mail.

With C{[proxy] workers = N} above 1, the process C{twistd} (or C{mailproxy
run}) starts is the parent: it binds every listener and the management
endpoint once, starts N worker processes that accept on the listeners, and
never accepts a mail connection itself. Each worker is a whole proxy
(L{mailproxy._lifecycle.ProxyService}) built from the same configuration,
without the management endpoint and the event log, which stay in the
parent.

The workers share the parent's listening sockets: each worker inherits
them (as descriptors 4 and up) and adopts them (C{adoptStreamPort}), and
the kernel gives each new connection to one of the workers waiting on the
socket. Not C{SO_REUSEPORT}: a socket systemd passes (C{systemd:}
endpoints) is one socket that only inheriting can share; with one socket
there is one queue, so a worker that is busy, restarting or dead leaves
its connections to the others instead of stranding those the kernel had
hashed to its socket; and nothing else on the host can bind the same port
beside the proxy.

The parent talks to each worker over a Unix socket pair with AMP
(L{Channel}): it tells the workers to reload, hold and release logins,
drop sessions and forget cached routes, asks them for their sessions and
counters, and hears their log events (the parent writes the log, so the
log file, the journal and C{[log] path} have one writer each), their
connection counts per client address and their failed logins
(L{mailproxy._shared}).

The parent supervises: a worker that exits while the proxy runs is
replaced at once, or after a back-off that doubles (up to
L{MAX_BACKOFF}) while workers keep dying within L{STABLE} seconds of
their start; each exit is logged with its status or signal. If the parent
dies, its workers notice the closed channel, drain and exit.

Signals are the parent's: SIGHUP makes it check the new configuration
(everything C{mailproxy check} checks, the router and the certificates
built) and, only if that succeeds, tell every worker to reload; SIGTERM
makes every worker drain for C{[limits] shutdown_grace} seconds, and the
parent exits when the last one has.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple, cast

from attrs import evolve
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, gatherResults, maybeDeferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import ILogObserver, LogLevel, Logger, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _tls
from ._lifecycle import ReloadableServerTLS, ReloadOnHangup, _startRouter, _stopRouter
from ._logs import ClassicText, TwistdLog, classicLines, classicLineText, classicWriters, eventText, heldWrites, writeClassicLines
from ._migrate import Mover, findRouteStore
from ._migrationhooks import OnLoginMigration, StepLog
from ._safetext import LogQuoted
from ._session import SessionState
from ._contract import ISessionObserver
from ._fleet import Fleet, FleetGate, FleetMover, invalidateCaches
from ._shared import IConnectionCounter, LocalFailures
from ._stats import ProxyStats, mergeStates, metricsText, snapshot, statsState
from ._systemd import ServiceNotifier, syslogPriority
from ._tcp import _buffered, sendAtOnceOn
from .config import Config, ConfigError, journalPath, parseConfig
from .migration import MigrationManager
from .routers import buildRouter, closeRouter

__all__ = ["Channel", "LogBatch", "LogMessage", "Machine", "WorkerConnections", "workerMain", "STABLE", "MAX_BACKOFF", "LOG_BATCH"]

#: A worker that ran this many seconds before it exited was healthy: the
#: next one starts at once.
STABLE = 10.0

#: The longest wait, in seconds, before a worker that keeps dying is
#: started again.
MAX_BACKOFF = 30.0

#: Seconds a worker may take to exit after its drain (shutdown_grace) and
#: goodbyes before the parent kills it.
STOP_SLACK = 15.0


def stopDeadline(config: Any) -> float:
    """
    Seconds after SIGTERM before the parent kills a worker still running:
    its drain (C{shutdown_grace}), L{STOP_SLACK} for the goodbyes and, with
    an SMTP listener, the data-reply timeout, which a worker waits for a
    message whose end its backend has (killed, the sender would send the
    message again).
    """
    slack = config.limits.shutdownGrace + STOP_SLACK
    if any(listener.protocol == "smtp" for listener in config.listeners):
        from .smtp._base import DATA_END_TIMEOUT

        slack += DATA_END_TIMEOUT
    return float(slack)


#: The descriptor of a worker's channel to its parent; its listening
#: sockets follow, in the order of the listeners.
CHANNEL_FD = 3

#: Seconds a worker may take to answer the parent (its sessions, its
#: counters, a reload); one that takes longer is taken to be hung, left
#: out of the answers and logged.
WORKER_ANSWER_TIMEOUT = 30.0

#: Characters of JSON per AMP value (AMP allows 65,535 octets; JSON is
#: ASCII here).
_PART = 60000


# The channel


class CallError(Exception):
    """
    The other side could not answer a call; C{str(error)} says why.
    """


class _Call(amp.Command):
    # Call METHOD with the JSON sent in STREAM's parts; the answer's JSON
    # is in the parts of the stream answered.
    arguments = [(b"method", amp.Unicode()), (b"stream", amp.Integer())]
    response = [(b"stream", amp.Integer())]
    errors = {CallError: b"CALL_ERROR"}


class _Part(amp.Command):
    arguments = [(b"stream", amp.Integer()), (b"data", amp.Unicode())]
    requiresAnswer = False


class _Notify(amp.Command):
    # A call whose answer nobody waits for, its JSON in one value.
    arguments = [(b"method", amp.Unicode()), (b"data", amp.Unicode())]
    requiresAnswer = False


class _Log(amp.Command):
    # A worker's log events (LogBatch, LogMessage).
    arguments = [
        (b"events", amp.Unicode()),
        (b"lines", amp.Unicode()),
        (b"priorities", amp.Unicode()),
        (b"whole", amp.Boolean()),
    ]
    requiresAnswer = False


class Channel(amp.AMP):
    """
    One side of the channel between the parent and a worker: calls by
    name with JSON-ready arguments and answers, over AMP.

    AMP values are at most 65,535 octets; a list of tens of thousands of
    sessions is larger, so a call's argument and answer travel as JSON in
    parts (AMP keeps their order on the connection), each named by a
    stream number of the side that sends it.

    @ivar handlers: what this side answers, by method name: a function of
        the argument returning the answer or a Deferred of it.
    @ivar lost: called once when the connection is lost.
    """

    def __init__(self, handlers: dict[str, Callable[[Any], Any]], lost: Callable[[], None] = lambda: None) -> None:
        """
        @param handlers: kept, not copied: what is added later is answered.
        """
        super().__init__()
        self.handlers = handlers
        self.lost = lost
        self.connected = False
        self.beforeSend: Callable[[], None] | None = None
        self._streams = itertools.count(1)
        self._parts: dict[int, list[str]] = {}

    def connectionMade(self) -> None:
        super().connectionMade()
        # What a worker tells its parent (a failed login, say) must leave
        # before the reply the client gets next, which is sent at once.
        sendAtOnceOn(self.transport)
        self.connected = True

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.connected = False
        super().connectionLost(reason)
        self.lost()

    def call(self, method: str, argument: Any = None) -> Deferred[Any]:
        """
        Call C{method} on the other side.

        @return: fires with its answer, or fails (L{CallError}, or the
            connection's loss).
        """
        stream = self._send(argument)
        answered = self.callRemote(_Call, method=method, stream=stream)
        # The answer's parts are taken even if the caller gave up on it (a
        # timeout cancels only the Deferred returned), else they would stay.
        caller: Deferred[Any] = Deferred()
        answered.addCallback(lambda answer: self._take(answer["stream"])).chainDeferred(caller)
        return caller

    def notify(self, method: str, argument: Any) -> None:
        """
        Tell the other side C{argument}, without waiting (small arguments:
        one AMP value).

        @raise ValueError: C{argument} is too large for one AMP value.
        """
        data = json.dumps(argument)
        if len(data) > _PART:
            raise ValueError(f"{method}: {len(data)} characters of JSON, more than {_PART}")
        self.notifyEncoded(method, data)

    def notifyEncoded(self, method: str, data: str) -> None:
        """
        L{notify}, its argument encoded already (JSON of at most L{_PART}
        characters).
        """
        if self.connected:
            self.callRemote(_Notify, method=method, data=data)

    def notifyLog(self, message: LogMessage) -> None:
        """
        Send a worker's log events (L{LogBatch}) to the parent's C{"log"}
        handler.

        @param message: its JSON of at most L{_PART} characters, its lines
            of at most L{_PART} octets of UTF-8.
        """
        if self.connected:
            self.callRemote(_Log, **message._asdict())

    def sendBox(self, box: amp.AmpBox) -> None:
        # Whatever this side says leaves after what beforeSend sends first
        # (a worker's log events waiting for their batch: the order of the
        # worker's messages, log lines included, stays the order of events).
        if self.beforeSend is not None:
            self.beforeSend()
        super().sendBox(box)

    def _send(self, value: Any) -> int:
        text = json.dumps(value)
        stream = next(self._streams)
        for start in range(0, len(text), _PART):
            self.callRemote(_Part, stream=stream, data=text[start : start + _PART])
        return stream

    def _take(self, stream: int) -> Any:
        return json.loads("".join(self._parts.pop(stream, ["null"])))

    @_Part.responder
    def _part(self, stream: int, data: str) -> dict[str, Any]:
        self._parts.setdefault(stream, []).append(data)
        return {}

    @_Call.responder
    def _called(self, method: str, stream: int) -> Deferred[dict[str, int]]:
        argument = self._take(stream)
        handler = self.handlers.get(method)
        if handler is None:
            raise CallError(f"no such method: {method}")

        def failed(reason: Failure) -> Failure:
            Logger().failure("the call {method} failed", reason, method=method)
            return Failure(CallError(f"{method} failed: {reason.getErrorMessage()}"))

        return maybeDeferred(handler, argument).addCallbacks(lambda answer: {"stream": self._send(answer)}, failed)

    @_Notify.responder
    def _notified(self, method: str, data: str) -> dict[str, Any]:
        handler = self.handlers.get(method)
        if handler is not None:
            handler(json.loads(data))
        return {}

    @_Log.responder
    def _logged(self, events: str, lines: str, priorities: str, whole: bool) -> dict[str, Any]:
        # The handler says whether the worker must send the events' fields
        # from now on (LogBatch.fields).
        handler = self.handlers.get("log")
        if handler is not None and handler(LogMessage(events, lines, priorities, whole)):
            self.notify("logFields", True)
        return {}


class _ChannelFactory(Factory):
    # adoptStreamConnection wants a factory; the channel exists already.
    noisy = False

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: object) -> Protocol:
        return self.channel


def _adoptChannel(reactor: Any, fd: int, channel: Channel) -> None:
    # The reactor takes a copy of the descriptor.
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, _ChannelFactory(channel))
    os.close(fd)


# Log events, from the workers to the parent's log

#: The levels a worker's log sends its parent: those the parent's logs
#: keep (info and above).
_RELAYED_LEVELS = frozenset(level for level in LogLevel.iterconstants() if not level < LogLevel.info)
# The types of field JSON carries as they are (and their subclasses).
_PLAIN = (str, int, float, bool, type(None))
_PLAIN_TYPES = frozenset(_PLAIN)


def _relayedText(event: Mapping[str, Any]) -> str:
    """
    A worker's event's text for the parent, with a failure's traceback.
    """
    text = eventText(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        text += "\n" + failure.getTraceback()
    return text


def _eventForParent(event: Mapping[str, Any], worker: int) -> dict[str, Any] | None:
    """
    A worker's log event as JSON-ready data for the parent: its text
    formatted here (with a failure's traceback), the fields JSON can carry
    (text quoted for the log line keeps both forms).
    """
    level: LogLevel | None = event.get("log_level")
    if level is None or level not in _RELAYED_LEVELS:
        return None
    text = _relayedText(event)
    data: dict[str, Any] = {}
    # An event whose format is its field "text" (a session's end) has that
    # field travel once, as the text: the line is most of the event.
    textOnly = event.get("log_format") == "{text}" and event.get("text") == text
    if textOnly:
        data["log_format"] = "{text}"
    for key, value in event.items():
        if key.startswith("log_") or key == "format" or (textOnly and key == "text"):
            continue
        # Most fields are of a plain type exactly: one look-up, not a
        # call of isinstance per type.
        if type(value) in _PLAIN_TYPES:
            data[key] = value
        elif isinstance(value, LogQuoted):
            data[key] = {"quoted": str(value), "raw": value.raw}
        elif isinstance(value, _PLAIN):
            data[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value):
            data[key] = list(value)
    data["log_text"] = text
    data["log_level"] = level.name
    data["log_namespace"] = event.get("log_namespace")
    data["log_time"] = event.get("log_time")
    data["worker"] = worker
    return data


def _shortEvent(data: dict[str, Any]) -> dict[str, Any]:
    """
    An event too large for the channel: its text cut short, without its
    fields.
    """
    short = {key: data[key] for key in ("log_level", "log_namespace", "log_time", "worker")}
    # ASCII escapes make JSON at most six times the text.
    short["log_text"] = data["log_text"][: _PART // 8] + " [cut]"
    return short


def _eventFromWorker(data: dict[str, Any]) -> dict[str, Any]:
    """
    A worker's event as the parent's log publishes it.
    """
    event: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and set(value) == {"quoted", "raw"}:
            quoted = LogQuoted(value["quoted"])
            quoted.raw = value["raw"]
            event[key] = quoted
        else:
            event[key] = value
    # The text is formatted already: the format is that text as a field
    # (braces in it are not fields), which the log writes as it is
    # (mailproxy._logs.eventText); an event that had its text as the field
    # "text" has it there again.
    if event.get("log_format") == "{text}":
        event["text"] = event["log_text"]
    else:
        event["log_format"] = "{log_text}"
    event["log_level"] = LogLevel.levelWithName(event["log_level"])
    event["log_system"] = f"worker {data['worker']}"
    return event


class LogMessage(NamedTuple):
    """
    A worker's batch of log events (L{LogBatch}): their fields, and their
    lines as the parent's text logs write them (L{ClassicText}), so that
    a parent whose logs are all text writes the lines as they are.

    An event's text crosses the channel once: in its line, if it has one,
    else in its fields. A parent that writes lines only tells its workers
    (L{LogBatch.fields}), which then send no fields.

    @ivar events: the events' JSON (L{_eventForParent}); those without
        C{log_text} have their text in their line, in order. Empty for
        lines without fields.
    @ivar lines: the lines.
    @ivar priorities: each line's syslog priority, one digit each.
    @ivar whole: whether every event that has text has its line (not an
        event without a namespace, which the parent's event log leaves
        out, nor a line UTF-8 cannot carry or too long for the channel).
    """

    events: str
    lines: str
    priorities: str
    whole: bool


#: Seconds a worker's info events may wait to go to its parent together
#: (L{LogBatch}).
LOG_BATCH = 0.05


@implementer(ILogObserver)
class LogBatch:
    """
    A worker's log observer: its events go to the parent (L{_eventForParent})
    together, one message at most every L{LOG_BATCH} seconds, instead of a
    message, a wake-up of the parent and a dispatch of a channel message
    per event. A session's end line per login cost the parent about 0.2 ms
    per login that way; in batches, under load, about 0.07 ms.

    With the events go their lines as the parent's text logs write them
    (L{LogMessage}): a parent whose logs are all text writes them as they
    are, with one C{write} per log, without decoding the events; it tells
    its workers so (L{fields}), and they send the lines without the
    events' fields.

    @ivar fields: whether the parent needs the events' fields (a JSON log,
        or any other observer than the proxy's text logs); until it says
        it does not.

    Nothing is lost or reordered within the worker: a warning or an error
    goes at once, with the events before it; so do the events waiting
    before any other message the worker sends (the channel's
    C{beforeSend}: a failed login's count, an answer), and every event
    once the reactor is not running (at exit). An info line reaches the
    log up to L{LOG_BATCH} seconds after it happened, so lines of
    different workers written within that time may be out of time order
    in the log (each has its own time); a worker killed (SIGKILL) loses
    the info lines of its last L{LOG_BATCH} seconds.
    """

    def __init__(self, channel: Channel, clock: Any, worker: int) -> None:
        self.channel = channel
        self.clock = clock
        self.worker = worker
        self._pending: list[str] = []
        self._size = 0
        self._lines: list[str] = []
        self._linesSize = 0
        self._whole = True
        self._priorities: list[str] = []
        self._classicText = ClassicText()
        self._system = f"worker {worker}"
        self.fields = True
        self._call: Any = None
        self._sending = False
        channel.beforeSend = self.flush

    def sendFields(self, fields: bool) -> None:
        """
        Send the events' fields from now on, or only their lines (the
        events waiting go first, as they were to).
        """
        if fields != self.fields:
            self.flush()
            self.fields = fields

    def __call__(self, event: dict[str, Any]) -> None:
        if self._sending:
            # Logged while sending (the channel's own trouble): it would
            # only come back here.
            return
        if not self.fields:
            self._lineOnly(event)
            return
        data = _eventForParent(event, self.worker)
        if data is None:
            return
        line, lineSize = self._line(data["log_namespace"], data["log_text"], data["log_time"])
        # The text goes in its line, if it has one.
        text = self._json(data, line)
        if len(text) > _PART - 2:
            data = _shortEvent(data)
            line, lineSize = self._line(data["log_namespace"], data["log_text"], data["log_time"])
            text = self._json(data, line)
        if self._size + len(text) + 1 > _PART - 2 or self._linesSize + lineSize > _PART:
            self.flush()
        self._pending.append(text)
        self._size += len(text) + 1
        if line:
            self._keepLine(line, lineSize, event["log_level"])
        elif line is None:
            self._whole = False
        self._sendSoon(event["log_level"])

    def _lineOnly(self, event: dict[str, Any]) -> None:
        # The event's line without its fields; an event that cannot go
        # as a line goes alone with them.
        level = event.get("log_level")
        if level is None or level not in _RELAYED_LEVELS:
            return
        line, lineSize = self._line(event.get("log_namespace"), _relayedText(event), event.get("log_time"))
        if line is None:
            self.sendFields(True)
            try:
                self(event)
                self.flush()
            finally:
                self.sendFields(False)
            return
        if self._linesSize + lineSize > _PART:
            self.flush()
        if line:
            self._keepLine(line, lineSize, level)
        self._sendSoon(level)

    def _keepLine(self, line: str, size: int, level: LogLevel) -> None:
        # The line goes with the next batch, with its syslog priority.
        self._lines.append(line)
        self._linesSize += size
        self._priorities.append(str(syslogPriority(level)))

    def _sendSoon(self, level: LogLevel) -> None:
        # A warning or worse goes at once, and everything once the
        # reactor no longer runs; the rest within LOG_BATCH seconds.
        if level >= LogLevel.warn or not getattr(self.clock, "running", True):
            self.flush()
        elif self._call is None:
            self._call = self.clock.callLater(LOG_BATCH, self.flush)

    @staticmethod
    def _json(data: dict[str, Any], line: str | None) -> str:
        # The event's JSON, without its text if that is in its line.
        if not line:
            return json.dumps(data)
        text = data.pop("log_text")
        try:
            return json.dumps(data)
        finally:
            data["log_text"] = text

    def _line(self, namespace: str | None, text: str, when: float | None) -> tuple[str | None, int]:
        """
        The line the parent's text logs write for an event (of the
        C{namespace}, C{text} and time from L{_eventForParent}), empty for
        none, and its size in octets; L{None} if it cannot go as a line
        (see L{LogMessage}).
        """
        if not namespace:
            return None, 0
        event = {"log_format": "{log_text}", "log_text": text, "log_time": when, "log_system": self._system}
        line = self._classicText(event) or ""
        if line.isascii():
            size = len(line)
        else:
            try:
                size = len(line.encode("utf-8"))
            except UnicodeEncodeError:
                return None, 0
        if size > _PART:
            return None, 0
        return line, size

    def flush(self) -> None:
        """
        Send the events waiting, if any, in one message.
        """
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        if not (self._pending or self._lines) or self._sending:
            return
        pending, self._pending, self._size = self._pending, [], 0
        events = "[" + ",".join(pending) + "]" if self.fields else ""
        message = LogMessage(events, "".join(self._lines), "".join(self._priorities), self._whole)
        self._lines, self._linesSize, self._priorities, self._whole = [], 0, [], True
        self._sending = True
        try:
            self.channel.notifyLog(message)
        finally:
            self._sending = False


#: The log levels of the syslog priorities (L{syslogPriority}) a worker
#: sends with its lines.
_PRIORITY_LEVELS = {str(syslogPriority(level)): level for level in _RELAYED_LEVELS}


def _publishFromWorker(message: LogMessage) -> bool:
    """
    Publish a worker's batch of events (L{LogBatch}) in the parent's log,
    in order: as the lines the worker made, if the parent's logs are all
    text (L{writeClassicLines}); else as events.

    Lines sent without their fields, which the parent's logs no longer
    all take as lines (an observer added since the worker was told they
    did, L{needsFields}), are published as events of their text and level
    only, in the namespace of this module, at the time they arrive.

    @return: whether the worker must send the events' fields from now on.
    """
    if message.whole and writeClassicLines(globalLogPublisher, message.lines, message.priorities):
        return False
    if not message.events:
        now = time.time()
        for priority, line in zip(message.priorities, classicLines(message.lines)):
            system = line[line.index(" [") + 2 : line.index("] ")]
            globalLogPublisher(
                {
                    "log_format": "{log_text}", "log_text": classicLineText(line), "log_level": _PRIORITY_LEVELS[priority],
                    "log_namespace": __name__, "log_time": now, "log_system": system,
                }
            )  # fmt: skip
        return True
    lines = iter(classicLines(message.lines))
    with heldWrites(globalLogPublisher):
        for data in json.loads(message.events):
            if "log_text" not in data:
                data["log_text"] = classicLineText(next(lines))
            globalLogPublisher(_eventFromWorker(data))
    return False


def needsFields() -> bool:
    """
    Whether the parent's logs need the fields of a worker's events, not
    only their lines (L{LogBatch.fields}).
    """
    return classicWriters(globalLogPublisher) is None


# The parent


class _RemoteSession:
    """
    A worker's session as a move sees it: its account, backend and id,
    and a drop that the worker carries out.
    """

    class _Client:
        def __init__(self, sessionId: str, address: str = "", port: int = 0) -> None:
            self.sessionId = sessionId
            self.address = address
            self.port = port

    def __init__(self, worker: _Worker, described: Mapping[str, Any]) -> None:
        self.worker = worker
        self.described = described
        self.user = described["account"]
        self.backendName = described["backend"]
        self.protocolName = described.get("protocol", "")
        self.client = self._Client(described["session"], described.get("address", ""), described.get("port", 0))

    def describe(self) -> dict[str, Any]:
        """
        The session as its worker described it (C{Session.describe}).
        """
        return dict(self.described)

    def drop(self, reason: str) -> None:
        self.worker.dropLater(self.client.sessionId, reason)


class _MachineRegistry:
    """
    The workers' logged-in sessions, as their worker told the parent (in
    a fleet: the sessions the parent registers in Redis, and drops when
    another proxy asks).
    """

    log = Logger()

    def __init__(self) -> None:
        self.sessions: dict[str, _RemoteSession] = {}
        self._observers: list[Any] = []

    def observe(self, observer: Any) -> Callable[[], None]:
        """
        Tell C{observer} of every login and end from now on.

        @return: stops the observing.
        """
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers else None

    def loggedIn(self, session: _RemoteSession) -> None:
        """
        A worker's session logged in.
        """
        self.sessions[session.client.sessionId] = session
        self._tell("sessionLoggedIn", session)

    def ended(self, sessionId: str) -> None:
        """
        A worker's session that logged in ended.
        """
        session = self.sessions.pop(sessionId, None)
        if session is not None:
            self._tell("sessionEnded", session)

    def forgetWorker(self, worker: _Worker) -> None:
        """
        C{worker} exited: its sessions ended with it.
        """
        for sessionId, session in list(self.sessions.items()):
            if session.worker is worker:
                self.ended(sessionId)

    def _tell(self, event: str, session: _RemoteSession) -> None:
        for observer in list(self._observers):
            try:
                getattr(observer, event)(session)
            except Exception:
                self.log.failure("session observer {observer!r} failed on {event}", observer=observer, event=event)

    def __iter__(self) -> Iterator[_RemoteSession]:
        return iter(list(self.sessions.values()))


class _FleetContext:
    """
    What the parent's fleet membership (L{mailproxy._fleet.Fleet}) acts
    on: the workers' sessions, the gate that holds in every worker, and
    the parent's router.
    """

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.sessions = machine.registry
        self.gate = machine.gate

    @property
    def router(self) -> Any:
        return self.machine.context.router


class _MachineGate:
    """
    Holds logins in every worker (the parent itself logs nobody in); a
    worker started later gets the holds in effect.
    """

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.holds: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._held: frozenset[str] = frozenset()
        self._asking = False
        # Counts holds and releases: an answer asked before the latest one
        # may name logins that have gone on since, and is not kept.
        self._changes = 0

    def hold(self, accounts: Iterable[str], domains: Iterable[str], mail: bool = False) -> Callable[[], None]:
        holdId = next(self._ids)
        hold = {"id": holdId, "accounts": list(accounts), "domains": list(domains), "mail": mail}
        self.holds[holdId] = hold
        self._changes += 1
        self.machine.tellWorkers("hold", hold)

        def release() -> None:
            if self.holds.pop(holdId, None) is not None:
                self._changes += 1
                self._held = frozenset()
                self.machine.tellWorkers("release", {"id": holdId})

        return release

    def heldSessions(self) -> frozenset[str]:
        """
        The ids of the sessions whose logins wait at a hold in the workers,
        as they last said; each look asks them afresh (the migration engine
        looks every few milliseconds while it waits for the logins under
        way), so the answer is at most one look old.  Until the workers
        have answered, none: a held login then looks under way, and is
        waited for until they have.
        """
        if not self._asking:
            self._asking = True
            asked = self._changes

            def answered(answers: list[tuple[_Worker, Any]]) -> None:
                if asked == self._changes:
                    self._held = frozenset(sessionId for _, held in answers for sessionId in held or ())

            def done(result: object) -> None:
                self._asking = False

            self.machine.askWorkers("held").addCallback(answered).addBoth(done)
        return self._held


class _MachineMover(Mover):
    """
    Moves accounts for every worker: the route store is changed once, by
    the parent; the sessions to drop are those the workers list just
    before; route caches are invalidated in every worker.
    """

    machine: Machine

    async def _movePlan(self, backend: str, accounts: list[str], domain: str | None, includeAccounts: bool) -> Any:
        self.context.sessions = await self.machine.remoteSessions()
        return await super()._movePlan(backend, accounts, domain, includeAccounts)

    def invalidate(self, *keys: str) -> None:
        super().invalidate(*keys)
        if keys:
            self.machine.tellWorkers("routesChanged", list(keys))


class _MachineFleetMover(_MachineMover, FleetMover):
    """
    Moves accounts for every worker and every proxy of the fleet.
    """


class _MachineContext:
    """
    What the parent's management endpoint and mover use of a proxy's
    context: the router (its route store), the login gate, and the
    sessions of a move (the workers', listed when it plans).
    """

    def __init__(self, router: Any, routerName: str, limits: Any, gate: _MachineGate) -> None:
        self.router = router
        self.routerName = routerName
        self.limits = limits
        self.gate = gate
        self.sessions: list[_RemoteSession] = []


class _UnknownSession:
    # Stands for an account's sessions until the workers have said which
    # it has: on an unknown backend, with a login that may be under way
    # (so that the migration engine waits for their answer), and dropping
    # it does nothing.
    user = None
    backendName = ""

    def describe(self) -> dict[str, Any]:
        return {"session": None, "state": SessionState.LOGIN.value, "account": None, "backend": None}

    def drop(self, reason: str) -> None:
        pass


class _MachineSessions:
    """
    The workers' sessions as the migration engine asks for them, at once
    (L{mailproxy.migration.MigrationManager} looks every few seconds
    whether an account's sessions have ended): the workers' latest answer
    for the account, asked afresh at each look. Until the first answer, an
    unknown session stands for them, so that waiting for the account's
    sessions to end waits for the workers to tell.

    @ivar known: the latest answer, by account in lower case.
    """

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.known: dict[str, list[_RemoteSession]] = {}
        self._asking: set[str] = set()

    def find(self, account: str | None = None, backend: str | None = None, domain: str | None = None) -> list[Any]:
        key = (account or "").lower()
        if key not in self._asking:
            self._asking.add(key)

            def answered(answers: list[tuple[_Worker, Any]]) -> None:
                self.known[key] = [
                    _RemoteSession(worker, described) for worker, sessions in answers for described in sessions or ()
                ]

            filters = {"account": account, "backend": None, "domain": domain}
            self.machine.askWorkers("sessions", filters).addCallback(answered).addBoth(lambda _: self._asking.discard(key))
        sessions = self.known.get(key)
        if sessions is None:
            return [_UnknownSession()]
        return [session for session in sessions if backend is None or session.backendName == backend]


class _WorkerProcess(ProcessProtocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def processEnded(self, reason: Failure) -> None:
        self.worker.ended(reason)


class _Worker:
    """
    One worker process, as its parent knows it.

    @ivar number: which worker it is (1 to N); its replacement keeps it.
    @ivar pid: its process id.
    @ivar channel: the channel to it.
    @ivar ready: it serves (its listeners adopted).
    @ivar connections: its open connections per client address.
    """

    log = Logger()

    def __init__(self, machine: Machine, number: int) -> None:
        self.machine = machine
        self.number = number
        self.pid: int | None = None
        self.channel: Channel | None = None
        self.process: Any = None
        self.ready = False
        self.started = 0.0
        self.connections: Counter[str] = Counter()
        self.exited: Deferred[None] | None = None
        self._drops: dict[str, list[str]] = {}
        self._dropCall: Any = None

    def start(self) -> None:
        """
        Start the process, with the listening sockets and its end of the
        channel.
        """
        machine = self.machine
        reactor = machine.reactor
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        childFDs: dict[int, Any] = {0: 0, 1: 1, 2: 2, CHANNEL_FD: theirs.fileno()}
        families = []
        for offset, port in enumerate(machine.ports):
            childFDs[CHANNEL_FD + 1 + offset] = port.fileno()
            families.append(int(port.socket.family))
        self.channel = Channel(machine.handlersFor(self), self.lost)
        self.ready = False
        self.started = reactor.seconds()
        self.exited = Deferred()
        # -P: the worker imports mailproxy from where the parent did (its
        # sys.path, passed as PYTHONPATH), never from the working directory.
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.process = reactor.spawnProcess(
            _WorkerProcess(self),
            sys.executable,
            [sys.executable, "-P", "-c", "from mailproxy.tap import runWorker; runWorker()",
             machine.config.path, str(self.number), json.dumps(families)],
            env=environment,
            childFDs=childFDs,
        )
        theirs.close()
        self.pid = self.process.pid
        _adoptChannel(reactor, ours.detach(), self.channel)
        self.log.info("worker {number} started (pid {pid})", number=self.number, pid=self.pid)

    def lost(self) -> None:
        # The channel closed: the process is ending (or ended).
        self.ready = False

    def ended(self, reason: Failure) -> None:
        """
        The process exited.
        """
        self.ready = False
        self.channel = None
        if isinstance(reason.value, ProcessTerminated) and reason.value.signal is not None:
            how = f"was killed by signal {reason.value.signal}"
        elif isinstance(reason.value, (ProcessDone, ProcessTerminated)):
            how = f"exited with status {reason.value.exitCode}"
        else:
            how = f"ended: {reason.getErrorMessage()}"
        exited, self.exited = self.exited, None
        self.machine.workerEnded(self, how)
        if exited is not None:
            exited.callback(None)

    def call(self, method: str, argument: Any = None) -> Deferred[Any]:
        """
        Call C{method} in this worker.
        """
        if self.channel is None or not self.ready:
            return succeed(None)
        return self.channel.call(method, argument)

    def dropLater(self, sessionId: str, reason: str) -> None:
        """
        Drop a session of this worker; the drops of one turn of the
        reactor go in one message.
        """
        self._drops.setdefault(reason, []).append(sessionId)
        if self._dropCall is None:
            self._dropCall = self.machine.reactor.callLater(0, self._sendDrops)

    def _sendDrops(self) -> None:
        self._dropCall = None
        drops, self._drops = self._drops, {}
        for reason, ids in drops.items():
            self.call("dropIds", {"ids": ids, "reason": reason}).addErrback(
                lambda failure: self.log.warn(
                    "worker {number} did not drop sessions: {why}", number=self.number, why=failure.getErrorMessage()
                )
            )


class Machine(TwistdLog, ReloadOnHangup, MultiService):
    """
    The parent of the worker processes: it holds the listening sockets,
    the management endpoint (a child service named C{admin}), the event
    log, and the workers; it answers the management endpoint for all of
    them (the same methods as L{mailproxy._lifecycle.ProxyService}).

    @ivar config: the configuration in effect.
    @ivar count: how many workers run.
    @ivar ports: the listening ports, in the order of the listeners (not
        reading: the parent accepts nothing).
    @ivar context: the parent's router and login gate (L{_MachineContext}).
    @ivar mover: moves accounts for every worker.
    @ivar draining: shutdown has begun.
    @ivar failures: failed logins per client address, from every worker.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        count: int,
        reactor: Any,
        endpoints: list[Any],
        notifier: ServiceNotifier | None = None,
    ) -> None:
        """
        @param endpoints: the listeners' endpoints, in order; the parent
            listens on each once.
        """
        super().__init__()
        self.config = config
        self.configText = Path(config.path).read_text(encoding="utf-8")
        self.count = count
        self.reactor = reactor
        self.endpoints = endpoints
        # tcp.Port: their descriptors are passed on.
        self.ports: list[Any] = []
        self.notifier = notifier if notifier is not None else ServiceNotifier()
        self.gate = _MachineGate(self)
        self.context = _MachineContext(buildRouter(config, reactor), config.router.type, config.limits, self.gate)
        self.mover = _MachineMover(self.context, config.backends, reactor)
        self.mover.machine = self
        # What the parent counts itself: the migrations it runs.
        self.stats = ProxyStats(reactor)
        self.migrations = MigrationManager(
            reactor=reactor,
            mover=self.mover,
            router=self.context.router,
            backends=dict(config.backends),
            sessions=_MachineSessions(self),
            settings=config.migration,
            journalPath=journalPath(config.path, config.migration.journal),
            routerName=config.router.type,
        )
        self.migrations.addObserver(StepLog(self.stats))
        self._onLogin = OnLoginMigration(self.migrations)
        self.draining = False
        self.admin: Any = None
        self.adminTLS: ReloadableServerTLS | None = None
        self.eventLog: Any = None
        self.workers = [_Worker(self, number) for number in range(1, count + 1)]
        self.failures = LocalFailures(reactor)
        self.registry = _MachineRegistry()
        # In a fleet ([cluster]): the parent is this machine's member.
        self.fleet: Fleet | None = None
        self.connections: Counter[str] = Counter()
        self.blocked: set[str] = set()
        self.started = reactor.seconds()
        self._deaths = 0
        self._announced = False

    @property
    def backends(self) -> dict[str, Any]:
        """
        The configured backends, by name.
        """
        return self.config.backends

    # Start and stop

    def privilegedStartService(self) -> None:
        # Before twistd gives up root (--uid): ports below 1024.
        self._bind()
        super().privilegedStartService()

    def _bind(self) -> None:
        if self.ports:
            return
        for index, endpoint in enumerate(self.endpoints):
            outcome: list[Any] = []
            endpoint.listen(_NoConnections()).addBoth(outcome.append)
            if isinstance(outcome[0], Failure):
                # A listener that cannot bind stops the proxy.
                outcome[0].raiseException()
            port = outcome[0]
            # The workers accept; the parent only holds the socket open.
            port.stopReading()
            # And closes its copy at its stop without shutdown(2), which
            # would end the socket for the workers still draining (their
            # accept failing with EINVAL) and reset the connections queued.
            port._shouldShutdown = False
            self.ports.append(port)

    def startService(self) -> None:
        self._bind()
        super().startService()
        _startRouter(self.context.router)
        for warning in self.config.warnings:
            self.log.warn("configuration: {problem}", problem=warning)
        if self.migrations.journalPath is not None and os.path.exists(self.migrations.journalPath):
            # The parent runs the migrations of every worker.
            self.migrations.resume().addErrback(lambda reason: self.log.failure("resuming migrations", reason))
        self.catchHangup()
        for worker in self.workers:
            worker.start()

    def handlersFor(self, worker: _Worker) -> dict[str, Callable[[Any], Any]]:
        """
        What a worker may call in its parent.
        """
        return {
            "hello": lambda _: self._hello(worker),
            "ready": lambda _: self._ready(worker),
            "log": _publishFromWorker,
            "connections": lambda deltas: self._connections(worker, deltas),
            "failed": lambda address: self._failed(address),
            "forgive": lambda argument: self._forgive(argument["address"], argument["count"]),
            "loggedIn": lambda login: self._loggedIn(worker, login),
            "ended": lambda ended: self.registry.ended(ended["session"]),
        }

    def _loggedIn(self, worker: _Worker, login: Mapping[str, Any]) -> None:
        session = _RemoteSession(worker, login)
        self.registry.loggedIn(session)
        self._onLogin.sessionLoggedIn(session)

    def joinFleet(self, settings: Any, connect: Callable[[Fleet], Deferred[Any]]) -> Fleet:
        """
        Make this machine a member of the fleet of C{settings} (C{[cluster]}):
        the parent registers the workers' sessions, carries out the other
        proxies' holds, drops and route changes in its workers, and counts
        their failed logins with the fleet.

        @return: the fleet service, to start with the parent (a child).
        """
        fleet = Fleet(settings, _FleetContext(self), self.reactor, connect)
        fleet.failures.known.update(self.failures.known)
        self.failures = fleet.failures
        fleet.failures.learned = lambda address, count: self.tellWorkers("failures", {"address": address, "count": count})
        fleet.failures.lowered = lambda address, count: self.tellWorkers("lower", {"address": address, "count": count})

        def forgetRoutes(keys: list[str]) -> None:
            invalidateCaches(self.context.router, *keys)
            self.tellWorkers("routesChanged", keys)

        fleet.forgetRoutes = forgetRoutes
        self.context.gate = FleetGate(self.gate, fleet)  # type: ignore[assignment]
        mover = _MachineFleetMover(self.context, self.config.backends, self.reactor)
        mover.machine = self
        mover.fleet = fleet
        self.mover = self.migrations.mover = mover
        self.fleet = fleet
        return fleet

    def _hello(self, worker: _Worker) -> dict[str, Any]:
        # What a starting worker must know before it accepts: the
        # configuration the parent checked (the file may have been edited
        # since, and not yet reloaded), the holds, the addresses at their
        # limit and those that failed lately.
        return {
            "config": self.configText,
            "holds": list(self.gate.holds.values()),
            "blocked": sorted(self.blocked),
            "failures": {address: count for address, (count, _) in self.failures.known.items()},
            "logFields": needsFields(),
        }

    def _ready(self, worker: _Worker) -> None:
        worker.ready = True
        self.log.info("worker {number} (pid {pid}) serving", number=worker.number, pid=worker.pid)
        if not self._announced and all(w.ready for w in self.workers):
            self._announced = True
            self.notifier.writeStatus(None)
            listeners = len(self.ports)
            self.notifier.ready(
                f"serving: {listeners} listener{'s' if listeners != 1 else ''}, "
                f"{self.count} workers, router {self.context.routerName}"
            )

    def workerEnded(self, worker: _Worker, how: str) -> None:
        """
        A worker exited: forget its connections; unless the proxy is
        stopping, start another in its place.
        """
        for address, count in worker.connections.items():
            self._count(address, -count)
        worker.connections.clear()
        self.registry.forgetWorker(worker)
        if not self.running:
            self.log.info("worker {number} (pid {pid}) {how}", number=worker.number, pid=worker.pid, how=how)
            return
        lived = self.reactor.seconds() - worker.started
        if lived >= STABLE:
            self._deaths = 0
            delay = 0.0
        else:
            self._deaths += 1
            delay = min(MAX_BACKOFF, 0.5 * 2 ** (self._deaths - 1))
        self.log.warn(
            "worker {number} (pid {pid}) {how} after {lived:.1f}s; starting another in {delay:.1f}s",
            number=worker.number, pid=worker.pid, how=how, lived=lived, delay=delay,
        )
        self.reactor.callLater(delay, self._restart, worker)

    def _restart(self, worker: _Worker) -> None:
        if self.running and worker.exited is None:
            worker.start()

    def stopService(self) -> Deferred[None]:
        self.releaseHangup()
        self.running = False
        self.draining = True
        self.notifier.stopping(f"stopping: {self.count} workers draining")
        # Closed here, the sockets stay open in the workers until each
        # stops accepting.
        for port in self.ports:
            port.stopListening()
        running = [worker for worker in self.workers if worker.exited is not None]
        for worker in running:
            self._signal(worker, signal.SIGTERM)
        kill = self.reactor.callLater(stopDeadline(self.config), self._killStragglers)

        def stopped(_: object) -> Deferred[Any]:
            if kill.active():
                kill.cancel()
            _stopRouter(self.context.router)
            return gatherResults([maybeDeferred(child.stopService) for child in reversed(list(self)) if child.running])

        waiting = DeferredList(
            [cast(Deferred[None], worker.exited) for worker in running]
            # Without a campaign there is nothing to stop or to journal.
            + ([self.migrations.stop()] if self.migrations.campaigns() else [])
        )
        return waiting.addCallback(stopped).addCallback(lambda _: None)

    def _killStragglers(self) -> None:
        for worker in self.workers:
            if worker.exited is not None:
                self.log.warn("worker {number} (pid {pid}) did not stop; killing it", number=worker.number, pid=worker.pid)
                self._signal(worker, signal.SIGKILL)

    def _signal(self, worker: _Worker, signum: int) -> None:
        try:
            worker.process.signalProcess(signum)
        except Exception:
            # Exited meanwhile.
            pass

    # Asking the workers

    def workerHealth(self) -> dict[str, int]:
        """
        For C{GET /health}: how many worker processes the configuration
        asks for, and how many serve (started, not ended).
        """
        return {"configured": self.count, "serving": sum(1 for worker in self.workers if worker.ready)}

    def tellWorkers(self, method: str, argument: Any) -> None:
        """
        Tell every worker C{argument}, without waiting.
        """
        for worker in self.workers:
            if worker.channel is None:
                continue
            try:
                worker.channel.notify(method, argument)
            except ValueError:
                # A hold of many accounts: too large for one message, it
                # travels in parts (and in order all the same).
                worker.channel.call(method, argument).addErrback(self._untold, worker, method)

    def _untold(self, reason: Failure, worker: _Worker, method: str) -> None:
        self.log.warn(
            "worker {number} did not take {method}: {why}", number=worker.number, method=method, why=reason.getErrorMessage()
        )

    def askWorkers(self, method: str, argument: Any = None) -> Deferred[list[tuple[_Worker, Any]]]:
        """
        Call C{method} in every worker that serves.

        @return: fires with each worker's answer; a worker that cannot
            answer (it died meanwhile) or does not within
            L{WORKER_ANSWER_TIMEOUT} (it is hung) is left out, and logged.
        """
        workers = [worker for worker in self.workers if worker.ready]

        def answered(results: list[tuple[bool, Any]]) -> list[tuple[_Worker, Any]]:
            answers = []
            for worker, (ok, result) in zip(workers, results):
                if ok:
                    answers.append((worker, result))
                else:
                    why = result.getErrorMessage()
                    if result.check(TimeoutError):
                        why = f"no answer within {WORKER_ANSWER_TIMEOUT:g} s"
                    self.log.warn("worker {number} did not answer {method}: {why}", number=worker.number, method=method, why=why)
            return answers

        calls = [worker.call(method, argument).addTimeout(WORKER_ANSWER_TIMEOUT, self.reactor) for worker in workers]
        return DeferredList(calls, consumeErrors=True).addCallback(answered)

    def remoteSessions(self) -> Deferred[list[_RemoteSession]]:
        """
        Every worker's open sessions, for a move.
        """
        def collect(answers: list[tuple[_Worker, Any]]) -> list[_RemoteSession]:
            return [_RemoteSession(worker, described) for worker, sessions in answers for described in sessions or ()]

        return self.askWorkers("sessions", {}).addCallback(collect)

    # What the management endpoint asks

    def _merged(self, answers: list[tuple[_Worker, Any]]) -> tuple[ProxyStats, Any, Any]:
        # The workers' counters summed, with the parent's uptime and the
        # migrations it runs.
        stats, sessions, cache = mergeStates((state["stats"] for _, state in answers), self.reactor)
        stats.started = self.started
        stats.migrations = self.stats.migrations
        stats.migrationBytes = self.stats.migrationBytes
        stats.migrating = self.stats.migrating
        return stats, sessions, cache

    def statsSnapshot(self) -> Deferred[dict[str, Any]]:
        """
        C{GET /stats}: every worker's counters summed.
        """
        def merged(answers: list[tuple[_Worker, Any]]) -> dict[str, Any]:
            stats, sessions, cache = self._merged(answers)
            answer = snapshot(stats, cast(Any, sessions), cache)
            answer["workers"] = {str(worker.number): {"pid": worker.pid} for worker, _ in answers}
            return answer

        return self.askWorkers("stats").addCallback(merged)

    def metrics(self, health: dict[str, Any]) -> Deferred[bytes]:
        """
        C{GET /metrics}: every worker's counters summed; CPU per worker.
        """
        def merged(answers: list[tuple[_Worker, Any]]) -> bytes:
            stats, sessions, cache = self._merged(answers)
            cpu = {str(worker.number): state["cpu"] for worker, state in answers}
            return metricsText(stats, cast(Any, sessions), cache, health, cpu)

        return self.askWorkers("stats").addCallback(merged)

    def describeSessions(
        self, account: str | None = None, backend: str | None = None, domain: str | None = None
    ) -> Deferred[list[dict[str, Any]]]:
        """
        C{GET /sessions}: every worker's sessions, each with its C{worker}.
        """
        def collect(answers: list[tuple[_Worker, Any]]) -> list[dict[str, Any]]:
            return [dict(described, worker=worker.number) for worker, sessions in answers for described in sessions or ()]

        filters = {"account": account, "backend": backend, "domain": domain}
        listed = self.askWorkers("sessions", filters).addCallback(collect)
        fleet = self.fleet
        if fleet is not None:
            # And the other proxies', each with its proxy.
            listed.addCallback(lambda local: fleet.describeSessions(local, account, backend, domain))
        return listed

    def dropSessions(
        self, account: str | None, backend: str | None, sessionId: str | None, reason: str
    ) -> Deferred[list[str]]:
        """
        C{POST /sessions/drop} in every worker.
        """
        argument = {"account": account, "backend": backend, "session": sessionId, "reason": reason}
        dropped = self.askWorkers("drop", argument).addCallback(
            lambda answers: [sessionId for _, dropped in answers for sessionId in dropped or ()]
        )
        fleet = self.fleet
        if fleet is None:
            return dropped

        def elsewhere(here: list[str]) -> Deferred[list[str]]:
            # The other proxies' sessions, each dropped by its proxy.
            def drop(remote: list[Any]) -> list[str]:
                chosen = [s for s in remote if sessionId is None or s.client.sessionId == sessionId]
                for session in chosen:
                    session.drop(reason)
                return here + [s.client.sessionId for s in chosen]

            return fleet.findRemote(account, backend).addCallback(drop)

        return dropped.addCallback(elsewhere)

    # Reload

    def reload(self) -> Deferred[dict[str, Any]]:
        """
        Check the configuration file; if it is right, apply what the parent
        uses and tell every worker to reload.

        @return: fires with C{{"ok": True, "path": ..., "restartNeeded":
            [keys]}}, or C{{"ok": False, "path": ..., "error": why}} when
            the file (or what it names) is wrong, which changes nothing in
            any process, or when a worker could not reload (it says which).
        """
        self.notifier.reloading(f"reloading {self.config.path}")
        outcome = self._check()
        if not outcome["ok"]:
            self.notifier.reloaded(outcome)
            return succeed(outcome)

        # Each by its channel: one started again meanwhile has the new file.
        asked = {worker: worker.channel for worker in self.workers if worker.ready}

        def workersReloaded(answers: list[tuple[_Worker, Any]]) -> dict[str, Any]:
            problems = [
                f"worker {worker.number}: {answer['error']}" for worker, answer in answers if answer and not answer["ok"]
            ]
            # One that is hung may never take it.
            answering = {worker for worker, _ in answers}
            problems += [
                f"worker {worker.number}: did not answer"
                for worker, channel in asked.items()
                if worker not in answering and worker.channel is channel
            ]
            result = outcome
            if problems:
                result = {"ok": False, "path": outcome["path"], "error": "; ".join(problems)}
            self.notifier.reloaded(result)
            return result

        return self.askWorkers("reload", self.configText).addCallback(workersReloaded)

    def _check(self) -> dict[str, Any]:
        path = self.config.path
        try:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: cannot read: {e}") from None
            config = parseConfig(text, path)
            router = buildRouter(config, self.reactor)
            if config.tls is not None:
                _tls.serverOptions(config.tls, config.sni)
            adminTLS = None
            if config.admin is not None and config.admin.tls is not None:
                adminTLS = _tls.serverOptions(config.admin.tls)
        except (ConfigError, _tls.TLSConfigError) as e:
            self.log.error("reload failed, every worker keeps the running configuration: {error}", error=str(e))
            return {"ok": False, "path": path, "error": str(e)}
        restart = []
        if config.listeners != self.config.listeners or (config.tls is None) != (self.config.tls is None):
            restart.append("listener")
        if (config.admin is None) != (self.config.admin is None) or (
            config.admin is not None and self.config.admin is not None and config.admin.endpoint != self.config.admin.endpoint
        ):
            restart.append("admin.endpoint")
        if config.log != self.config.log:
            restart.append("log")
        if config.workers != self.config.workers:
            restart.append("proxy.workers")
        if config.cluster != self.config.cluster:
            restart.append("cluster")
        old, self.context.router = self.context.router, router
        _stopRouter(old)
        closeRouter(old)
        if self.running:
            _startRouter(router)
        self.context.routerName = config.router.type
        self.context.limits = config.limits
        self.mover.backends = set(config.backends)
        # The running engine keeps its journal where it is until a restart.
        self.migrations.router = router
        self.migrations.routerName = config.router.type
        self.migrations.backends = dict(config.backends)
        self.migrations.settings = evolve(config.migration, journal=self.config.migration.journal)
        if self.admin is not None and config.admin is not None:
            self.admin.guard.token = config.admin.token
            self.admin.healthDetails = config.admin.healthDetails
        if adminTLS is not None and self.adminTLS is not None:
            self.adminTLS.options = adminTLS
        self.configText = text
        self.config = Config(
            path=config.path, hostname=config.hostname, limits=config.limits, tls=config.tls, sni=config.sni,
            listeners=self.config.listeners, router=config.router, backends=config.backends,
            admin=self.config.admin if "admin.endpoint" in restart else config.admin,
            log=self.config.log, workers=self.config.workers, migration=self.migrations.settings,
            cluster=self.config.cluster,
        )
        for address in list(self.connections):
            self._judge(address)
        if restart:
            self.log.warn("reloaded {path}; these changes need a restart: {keys}", path=path, keys=", ".join(restart))
        else:
            self.log.info("reloaded {path}", path=path)
        return {"ok": True, "path": path, "restartNeeded": restart}

    # Counting per client address, for every worker

    def _connections(self, worker: _Worker, deltas: Mapping[str, int]) -> None:
        for address, delta in deltas.items():
            worker.connections[address] += delta
            if worker.connections[address] <= 0:
                del worker.connections[address]
            self._count(address, delta)

    def _count(self, address: str, delta: int) -> None:
        self.connections[address] += delta
        if self.connections[address] <= 0:
            del self.connections[address]
        self._judge(address)

    def _judge(self, address: str) -> None:
        # Tell the workers only when an address reaches or leaves the
        # limit: the counts stay here.
        limit = self.config.limits.connectionsPerAddress
        atLimit = bool(limit) and self.connections[address] >= limit
        if atLimit != (address in self.blocked):
            if atLimit:
                self.blocked.add(address)
            else:
                self.blocked.discard(address)
            self.tellWorkers("block", {"address": address, "blocked": atLimit})

    def _failed(self, address: str) -> None:
        count = self.failures.failed(address)
        self.tellWorkers("failures", {"address": address, "count": count})

    def _forgive(self, address: str, count: int) -> None:
        self.failures.forgive(address, count)
        self.tellWorkers("lower", {"address": address, "count": self.failures.recent(address)})


class _NoConnections(Factory):
    # The parent's listening ports never read: nothing is built.
    noisy = False

    def buildProtocol(self, addr: object) -> None:  # type: ignore[override]
        return None


# The worker


@implementer(IConnectionCounter)
class WorkerConnections:
    """
    A worker's count of open connections per client address: its own
    count, plus the addresses the parent says are at the limit counting
    every worker's. With a limit, what it counts goes to the parent once
    per turn of the reactor; without one (0, the default) the parent has
    nothing to judge and hears nothing, until a reload sets a limit: then
    the worker tells it every connection it has open (and takes them back
    when a reload removes the limit), so the parent's counts are whole.

    Between a connection another worker accepts and the parent's word
    that its address reached the limit, this worker may accept a few
    more: the limit may be passed by the connections that arrive at the
    same moment in different workers, no more.
    """

    def __init__(self, limit: int, channel: Channel, clock: Any) -> None:
        self._limit = limit
        self.channel = channel
        self.clock = clock
        self.blocked: set[str] = set()
        self._open: Counter[str] = Counter()
        self._deltas: Counter[str] = Counter()
        self._flush: Any = None

    @property
    def limit(self) -> int:
        """
        The most connections from one address (0: no limit); a reload sets
        it.
        """
        return self._limit

    @limit.setter
    def limit(self, limit: int) -> None:
        counted, self._limit = bool(self._limit), limit
        if counted != bool(limit):
            # What the parent holds for this worker is what it was told:
            # every open connection while there was a limit, none before.
            sign = 1 if limit else -1
            for address, count in self._open.items():
                self._report(address, sign * count)

    def add(self, address: str) -> bool:
        if self._limit:
            if self._open[address] >= self._limit or address in self.blocked:
                return False
            self._report(address, 1)
        self._open[address] += 1
        return True

    def remove(self, address: str) -> None:
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]
        if self._limit:
            self._report(address, -1)

    def _report(self, address: str, delta: int) -> None:
        self._deltas[address] += delta
        if self._flush is None:
            self._flush = self.clock.callLater(0, self._send)

    def _send(self) -> None:
        self._flush = None
        deltas = {address: delta for address, delta in self._deltas.items() if delta}
        self._deltas.clear()
        items = list(deltas.items())
        # 500 addresses (IPv6 at most 45 characters) fit in one message.
        for start in range(0, len(items), 500):
            self.channel.notify("connections", dict(items[start : start + 500]))


class _WorkerFailures(LocalFailures):
    """
    A worker's failed logins per address: what every worker counted, as
    the parent tells; each failure counted here is told to the parent.
    """

    def __init__(self, clock: Any, channel: Channel) -> None:
        super().__init__(clock)
        self.channel = channel

    def failed(self, address: str) -> int:
        count = super().failed(address)
        self.channel.notify("failed", address)
        return count

    def forgive(self, address: str, count: int) -> None:
        super().forgive(address, count)
        self.channel.notify("forgive", {"address": address, "count": count})


@implementer(ISessionObserver)
class _LoginsToParent:
    """
    Tells the parent of every login (C{[migration] on_login}: the parent
    runs the migrations, and queues the account's).
    """

    def __init__(self, channel: Channel, ends: bool = False) -> None:
        """
        @param ends: tell the parent of each end too (in a fleet, the
            parent registers the sessions).
        """
        self.channel = channel
        self.ends = ends
        self._told: set[str] = set()

    def sessionLoggedIn(self, session: Any) -> None:
        if session.user and session.backendName is not None:
            sessionId = session.client.sessionId
            self.channel.notify(
                "loggedIn",
                {
                    "account": session.user, "backend": session.backendName, "session": sessionId,
                    "protocol": session.protocolName, "address": session.client.address, "port": session.client.port,
                },
            )
            if self.ends:
                self._told.add(sessionId)

    def sessionEnded(self, session: Any) -> None:
        if self.ends and session.client.sessionId in self._told:
            self._told.discard(session.client.sessionId)
            self.channel.notify("ended", {"session": session.client.sessionId})


class _WorkerSide:
    """
    The worker's side: its proxy and what the parent may ask of it.
    """

    log = Logger()

    def __init__(self, reactor: Any, number: int, service: Any, channel: Channel) -> None:
        self.reactor = reactor
        self.number = number
        self.service = service
        self.channel = channel
        self.holds: dict[int, Callable[[], None]] = {}

    def handlers(self) -> dict[str, Callable[[Any], Any]]:
        return {
            "sessions": lambda filters: self.service.describeSessions(**(filters or {})),
            "held": lambda _: sorted(self.service.context.gate.heldSessions()),
            "drop": self._drop,
            "dropIds": self._dropIds,
            "stats": self._stats,
            "reload": lambda text: self.service.reload(text),
            "hold": self._hold,
            "release": lambda argument: self.holds.pop(argument["id"], lambda: None)(),
            "routesChanged": self._routesChanged,
            "block": self._block,
            "failures": lambda argument: self.service.context.failures.learn(argument["address"], argument["count"]),
            "lower": lambda argument: self.service.context.failures.lower(argument["address"], argument["count"]),
        }

    def _routesChanged(self, keys: list[str]) -> None:
        # The parent changed the route store. A store each process reads
        # into memory (the static router's file) is read again now, not at
        # its next look at the file: the clients a move drops reconnect at
        # once, and the drops come after this on the channel. A shared
        # store (SQL, LDAP, HTTP) is asked afresh once the caches forget.
        store = findRouteStore(self.service.context.router)
        reload = getattr(store, "reload", None)
        if callable(reload):
            reload()
        self.service.mover.invalidate(*keys)

    def _drop(self, argument: dict[str, Any]) -> list[str]:
        return cast(
            "list[str]",
            self.service.dropSessions(argument["account"], argument["backend"], argument["session"], argument["reason"]),
        )

    def _dropIds(self, argument: dict[str, Any]) -> list[str]:
        ids = set(argument["ids"])
        sessions = [session for session in self.service.context.sessions if session.client.sessionId in ids]
        for session in sessions:
            session.drop(argument["reason"])
        return [session.client.sessionId for session in sessions]

    def _stats(self, _: object) -> dict[str, Any]:
        context = self.service.context
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "stats": statsState(context.stats, context.sessions, context.router),
            "cpu": usage.ru_utime + usage.ru_stime,
        }

    def _hold(self, hold: dict[str, Any]) -> None:
        self.holds[hold["id"]] = self.service.context.gate.hold(hold["accounts"], hold["domains"], hold.get("mail", False))

    def _block(self, argument: dict[str, Any]) -> None:
        tracker = self.service.context.tracker
        if argument["blocked"]:
            tracker.blocked.add(argument["address"])
        else:
            tracker.blocked.discard(argument["address"])


def _linesSent(result: object, service: Any, forward: LogBatch, channel: Channel, reactor: Any) -> Deferred[object]:
    """
    Once a stopping worker's proxy has stopped, have the sessions it left
    open (clients that did not close within its wait) end now, and send
    every log line the worker holds: the parent writes the log, and what
    is still with the worker when its reactor stops (which would cut those
    sessions and the channel alike) never reaches it.  A second at most
    for each.

    @return: fires with C{result}.
    """
    done: Deferred[object] = Deferred()
    sessions = service.context.sessions

    def closeRest(_: object) -> None:
        for session in list(sessions):
            transport = session.transport
            if transport is not None:
                transport.abortConnection()
        reactor.callLater(0, drain, reactor.seconds() + 1.0)

    def drain(deadline: float) -> None:
        forward.flush()
        transport: Any = channel.transport
        if transport is None or not transport.connected or not _buffered(transport) or reactor.seconds() > deadline:
            done.callback(result)
        else:
            reactor.callLater(0.01, drain, deadline)

    sessions.whenEmpty().addTimeout(1.0, reactor).addBoth(closeRest)
    return done


def workerMain(
    buildService: Callable[..., Any], prepareProcess: Callable[[], None], argv: list[str] | None = None
) -> None:
    """
    A worker process: C{CONFIG NUMBER FAMILIES} (the listening sockets'
    address families as JSON, their descriptors following the channel's).

    The worker's proxy is built as the single process's is, by the
    service tree's builder, which this module is given rather than imports
    (the builder is the one that imports this module to start workers).

    @param buildService: makes the proxy's service from a configuration:
        C{buildService(config, reactor, adopted=[(fd, family), ...])}.
    @param prepareProcess: what the process does before it serves (raise
        the descriptor limit).
    """
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    path, number, families = (sys.argv[1:] if argv is None else argv)[:3]
    worker = int(number)
    handlers: dict[str, Callable[[Any], Any]] = {}
    stopping: list[bool] = []

    def parentGone() -> None:
        # Without its parent nobody supervises or logs: drain and exit.
        if not stopping:
            stopping.append(True)
            reactor.stop()  # type: ignore[attr-defined]

    channel = Channel(handlers, parentGone)
    _adoptChannel(reactor, CHANNEL_FD, channel)

    forward = LogBatch(channel, reactor, worker)
    handlers["logFields"] = forward.sendFields
    globalLogBeginner.beginLoggingTo([forward], redirectStandardIO=False, discardBuffer=True)
    # What is logged while the reactor stops leaves before the process ends.
    reactor.addSystemEventTrigger("after", "shutdown", forward.flush)  # type: ignore[attr-defined]
    prepareProcess()

    async def start() -> None:
        state = await channel.call("hello")
        forward.sendFields(state.get("logFields", True))
        try:
            config = parseConfig(state["config"], path)
            adopted = [(CHANNEL_FD + 1 + index, family) for index, family in enumerate(json.loads(families))]
            service = buildService(config, reactor, adopted=adopted)
        except (ConfigError, ValueError) as e:
            Logger().error("worker {number} cannot start: {error}", number=worker, error=str(e))
            stopping.append(False)
            reactor.stop()  # type: ignore[attr-defined]
            return
        context = service.context
        context.tracker = WorkerConnections(config.limits.connectionsPerAddress, channel, reactor)
        context.failures = _WorkerFailures(reactor, channel)
        if config.migration.onLogin is not None or config.cluster is not None:
            context.sessions.observe(_LoginsToParent(channel, ends=config.cluster is not None))
        side = _WorkerSide(reactor, worker, service, channel)
        handlers.update(side.handlers())
        for hold in state["holds"]:
            side._hold(hold)
        context.tracker.blocked.update(state["blocked"])
        for address, count in state["failures"].items():
            context.failures.learn(address, count)
        service.startService()
        # The parent's signal: a SIGHUP to the process group reloads once.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
            "before", "shutdown", lambda: maybeDeferred(service.stopService).addBoth(_linesSent, service, forward, channel, reactor)
        )
        channel.notify("ready", None)

    def failed(reason: Failure) -> None:
        Logger().failure("worker {number} cannot start", reason, number=worker)
        stopping.append(False)
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(start()).addErrback(failed))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    forward.flush()
    if False in stopping:
        # The parent's log says "exited with status 1", and backs off.
        sys.exit(1)
