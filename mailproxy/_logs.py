"""
The proxy's own event log (C{[log] path}): every event of level info and
above, as classic text lines or as one JSON object per line.

JSON lines carry C{time}, C{level}, C{namespace}, C{event} (a stable name
such as C{"session_end"} or C{"login_failed"}, or L{None}), C{message} (the
text line's message), and every field of the event whose value is a string,
number, boolean or null, or a list of those (fields starting with C{log_}
excepted). A field quoted for the text line with
L{mailproxy._safetext.logQuote} is recorded as the text it quotes. Lines are
printable ASCII: whatever a client sent is escaped, so it cannot end a line
for any reader.

In the text format, a line break inside an event's text (a traceback's)
continues on a line that starts with a tab, like twistd's log; text a client
chose is quoted (L{mailproxy._safetext.logQuote}) and never breaks a line.
Should other text carry a control character (a traceback's message), it is
written as an escape (C{\\x1b}), and text UTF-8 cannot encode as
C{\\udcff}: the line is written, and cannot drive a terminal.

Written to the journal (standard output under systemd), every line starts
with its syslog priority, C{<3>} for an error to C{<6>} for info (the
sd-daemon convention): the journal keeps the priority and removes the
prefix.

C{mailproxy run} logs to standard output through L{processLogObserver}: in
the C{[log]} format when C{[log] path = "-"}, so that standard output holds
one format only.
"""

from __future__ import annotations

import codecs
import datetime
import json
import math
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, Mapping, cast

from twisted.application.service import Service
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    Logger,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)
from twisted.python.compat import ioType
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile
from zope.interface import implementer

from ._safetext import LogQuoted
from ._systemd import isJournalStream, syslogPriority
from .config import LogConfig

__all__ = [
    "jsonLine",
    "eventText",
    "ClassicText",
    "classicLines",
    "classicLineText",
    "writeClassicLines",
    "classicWriters",
    "heldWrites",
    "EventLogService",
    "processLogObserver",
    "twistdLogObserver",
    "TwistdLog",
]

_PRIMITIVES = (str, int, float, bool, type(None))
# Fields that repeat others in a form meant only for the text line.
_TEXT_ONLY = frozenset({"text"})
# Controls but the tab and line feed of a continuation line, as escapes.
_TEXT_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if code not in (0x09, 0x0A)}


def jsonLine(event: dict[str, Any]) -> str:
    """
    One log event as a JSON object on one line (without the line end).
    """
    when = datetime.datetime.fromtimestamp(event.get("log_time", 0), datetime.timezone.utc)
    level = event.get("log_level")
    data: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level.name if level is not None else None,
        "namespace": event.get("log_namespace"),
        "event": event.get("event") if isinstance(event.get("event"), str) else None,
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in data or key in _TEXT_ONLY or key == "format":
            continue
        if isinstance(value, LogQuoted):
            value = value.raw
        if isinstance(value, _PRIMITIVES):
            data[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(item, _PRIMITIVES) for item in value):
            data[key] = [item.raw if isinstance(item, LogQuoted) else item for item in value]
    failure = event.get("log_failure")
    if failure is not None:
        data["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
    # ASCII: a client's lone surrogate (from non-UTF-8 octets) could not be
    # written at all, and U+2028 or NEL would end the line for some readers.
    line = json.dumps(data, default=str)
    if "\\udc" in line:
        line = _ESCAPES.sub(_octetEscape, line)
    return line


# In JSON text: an escaped backslash, a surrogate pair (a character beyond
# the BMP), or a lone low surrogate of U+DC80-U+DCFF, which is how Python
# keeps an octet that is not UTF-8 (a client's non-UTF-8 name).
_ESCAPES = re.compile(r"\\\\|\\ud[89ab][0-9a-f]{2}\\udc[0-9a-f]{2}|\\udc([89a-f][0-9a-f])")


def _octetEscape(match: re.Match[str]) -> str:
    # A lone surrogate is valid JSON syntax, yet strict readers (Rust's
    # serde_json, so log shippers built on it) refuse the whole line: a
    # client could hide its failed logins from them with one such octet.
    # It is written as the text \xNN instead.
    octet = match.group(1)
    return match.group(0) if octet is None else "\\\\x" + octet


# Formats that are one field holding the whole message, by that field.
_TEXT_FORMATS = {"{text}": "text", "{log_text}": "log_text"}


def eventText(event: Mapping[str, Any]) -> str:
    """
    An event's message, as L{formatEvent} gives it; for an event whose
    format is one field of text (C{"{text}"}: a session's end, whose line
    the session composed; C{"{log_text}"}: a worker's event, formatted in
    the worker), that text, without a format string to parse.
    """
    field = _TEXT_FORMATS.get(event.get("log_format"))  # type: ignore[arg-type]
    if field is not None:
        text = event.get(field)
        if type(text) is str:
            return text
    return formatEvent(dict(event))


class ClassicText:
    """
    Formats events as twistd's classic text lines, exactly as
    L{formatEventAsClassicLogText} does, at a fraction of its cost: the
    timestamp (which has no fraction of a second) is formatted once per
    second, not per event (L{formatTime} converts to the local time zone and
    calls C{strftime} each time), and the text of an event whose format
    is one field of text is taken as it is (L{eventText}).
    """

    def __init__(self) -> None:
        self._second: float | None = None
        self._stamp = ""

    def _timeStamp(self, when: float) -> str:
        fraction, second = math.modf(when)
        # Past 0.9999995 the microseconds round up into the next second
        # (datetime.fromtimestamp), which the cached stamp is not.
        if fraction < 0 or fraction * 1e6 >= 999999.5:
            return formatTime(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(when)
        return self._stamp

    def __call__(self, event: dict[str, Any]) -> str | None:
        """
        The event as a text line (with its line end; a line break inside
        continues on a tab-indented line), or L{None} for no text.
        """
        if "log_failure" in event:
            return formatEventAsClassicLogText(event)
        text = eventText(event)
        if not text:
            return None
        when = event.get("log_time")
        stamp = "-" if when is None else self._timeStamp(when)
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        else:
            try:
                system = str(system)
            except Exception:
                system = "UNFORMATTABLE"
        return f"{stamp} [{system}] {text}".replace("\n", "\n\t") + "\n"


#: What writes lines of L{ClassicText}'s, given as one text and their
#: syslog priorities (see L{writeClassicLines}).
ClassicWriter = Callable[[str, str], None]

# Where one line of L{ClassicText}'s ends and the next starts: a line
# break inside a line is followed by a tab, a line's start never is.
_LINE_STARTS = re.compile(r"(?<=\n)(?!\t)")


def classicLines(lines: str) -> list[str]:
    """
    The lines of L{ClassicText}'s in C{lines}, each with its line end.
    """
    return _LINE_STARTS.split(lines)[:-1]


def classicLineText(line: str) -> str:
    """
    The text of an event with a system (C{log_system}) from its line of
    L{ClassicText}'s.
    """
    return line[line.index("] ") + 2 : -1].replace("\n\t", "\n")


def _journalLines(text: str, priority: object) -> str:
    """
    C{text} (ending with a line break) with the syslog C{priority} in front
    of each of its lines, as the journal reads them from standard output:
    each line of a traceback is an entry of its own.
    """
    prefix = f"<{priority}>"
    return prefix + text[:-1].replace("\n", "\n" + prefix) + "\n"


def _writesUTF8(stream: object) -> bool:
    # Whether text written to the stream is encoded as UTF-8 (strictly, or
    # with errors that a valid text never meets): lines written together
    # then fail or not as each would have alone.
    if isinstance(stream, LogFile) or ioType(stream) is bytes:
        return True
    encoding = getattr(stream, "encoding", None)
    try:
        return encoding is None or codecs.lookup(encoding).name == "utf-8"
    except (LookupError, TypeError):
        return False


def _classicWriter(observer: object) -> ClassicWriter | None:
    # The observer's writer of classic lines, if it has one.
    writer = getattr(observer, "classicWriter", None)
    return writer() if writer is not None else None


def writeClassicLines(publisher: object, lines: str, priorities: str) -> bool:
    """
    Write C{lines}, each one L{ClassicText} made of an event of level info
    or above that names its namespace, to every observer of C{publisher}
    (a L{twisted.logger.LogPublisher}) as it would write their events: if
    each of them is one of this module's text logs, which then writes
    them with one C{write}, without the events (a worker's log lines in
    the parent: the worker formatted them).

    @param priorities: each non-empty line's syslog priority, one digit
        per line (C{"6"} for info).
    @return: whether it wrote them; if not (an observer that needs the
        events, such as a JSON log), nothing was written.
    """
    writers = classicWriters(publisher)
    if writers is None:
        return False
    for writer in writers:
        writer(lines, priorities)
    return True


def classicWriters(publisher: object) -> list[ClassicWriter] | None:
    """
    The writers of classic lines of the observers of C{publisher} (see
    L{writeClassicLines}), or L{None} if one of them has none.
    """
    observers = getattr(publisher, "_observers", None)
    if type(observers) is not list:
        return None
    writers = []
    for observer in observers:
        writer = _classicWriter(observer)
        if writer is None:
            return None
        writers.append(writer)
    return writers


@contextmanager
def heldWrites(publisher: object) -> Iterator[None]:
    """
    While in this context, the observers of C{publisher} (a
    L{twisted.logger.LogPublisher}) that are this module's logs keep the
    lines of the events they get, and write them with one C{write} each
    at its end (the events of a worker's batch in the parent).
    """
    held = [observer for observer in getattr(publisher, "_observers", ()) if hasattr(observer, "holdWrites")]
    for observer in held:
        observer.holdWrites()
    try:
        yield
    finally:
        for observer in held:
            try:
                observer.releaseWrites()
            except Exception:
                # As the publisher reports an observer that raised.
                Logger(observer=publisher).failure(  # type: ignore[arg-type]
                    "Temporarily disabling observer {observer} due to exception", observer=observer
                )


#: The levels the proxy's logs keep: info and above.
_KEPT_LEVELS = frozenset(level for level in LogLevel.iterconstants() if not level < LogLevel.info)


@implementer(ILogObserver)
class _InfoAndAbove:
    """
    Passes on to its observer the events of level info and above that
    name a namespace: what C{FilteringLogObserver(observer,
    [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)])} passes
    (with the same entry in a traced event's C{log_trace}), in one call.
    Twisted's filter works out the level of the event's namespace and
    compares the two levels in Python: some 2.5 us per event (a session's
    end line), for each log that filters.
    """

    def __init__(self, observer: ILogObserver) -> None:
        self._observer = observer

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") in _KEPT_LEVELS and event.get("log_namespace"):
            if "log_trace" in event:
                event["log_trace"].append((self, self._observer))
            self._observer(event)

    def classicWriter(self) -> ClassicWriter | None:
        """
        Its observer's writer of classic lines (lines of info and above
        with a namespace, which it passes on all).
        """
        return _classicWriter(self._observer)

    def holdWrites(self) -> None:
        """
        Its observer's L{_FileObserver.holdWrites}.
        """
        self._observer.holdWrites()  # type: ignore[attr-defined]

    def releaseWrites(self) -> None:
        """
        Its observer's L{_FileObserver.releaseWrites}.
        """
        self._observer.releaseWrites()  # type: ignore[attr-defined]


@implementer(ILogObserver)
class _FileObserver:
    """
    Writes events to a stream in one of the formats.

    @ivar priorities: start each line with the event's syslog priority
        (C{<6>}), for the journal.
    """

    def __init__(self, stream: IO[str], format: str, priorities: bool = False) -> None:
        self.stream = stream
        self.format = format
        self.priorities = priorities
        self._classicText = ClassicText()
        self._held: list[str] | None = None
        self._together = _writesUTF8(stream)

    def __call__(self, event: dict[str, Any]) -> None:
        if self.format == "json":
            line = jsonLine(event) + "\n"
        else:
            line = self._classicText(event) or ""
            if not (line.isascii() and line[:-1].replace("\n\t", "").isprintable()):
                line = line.translate(_TEXT_ESCAPES).encode("utf-8", "backslashreplace").decode("utf-8")
        if line and self.priorities:
            line = _journalLines(line, syslogPriority(event.get("log_level")))
        if not line:
            return
        if self._held is not None:
            self._held.append(line)
        else:
            self.stream.write(line)
            self.stream.flush()

    def holdWrites(self) -> None:
        """
        Keep the lines of the events from now on (L{heldWrites}), if its
        stream is UTF-8 (lines written together to another could fail
        together).
        """
        if self._together:
            self._held = []

    def releaseWrites(self) -> None:
        """
        Write the lines kept, with one C{write}, and no longer keep them.
        """
        held, self._held = self._held, None
        if held:
            self.stream.write("".join(held))
            self.stream.flush()

    def classicWriter(self) -> ClassicWriter | None:
        """
        L{_writeClassic} for the text format to a UTF-8 stream; none for
        JSON, which needs the events.
        """
        return self._writeClassic if self.format != "json" and self._together else None

    def _writeClassic(self, lines: str, priorities: str) -> None:
        # What __call__ writes for each line, for all of them at once: the
        # escapes change one character at a time, and leave line breaks
        # and tabs alone.
        if not (lines.isascii() and lines.replace("\n", "").replace("\t", "").isprintable()):
            lines = lines.translate(_TEXT_ESCAPES).encode("utf-8", "backslashreplace").decode("utf-8")
        if not lines:
            return
        if self.priorities:
            if len(set(priorities)) == 1:
                lines = _journalLines(lines, priorities[0])
            else:
                lines = "".join(
                    _journalLines(line, priority) for priority, line in zip(priorities, classicLines(lines))
                )
        self.stream.write(lines)
        self.stream.flush()


class EventLogService(Service):
    """
    While running, writes the process's log events to C{config.path}.
    """

    def __init__(self, config: LogConfig, publisher: Any = globalLogPublisher) -> None:
        self.config = config
        self.publisher = publisher
        self._stream: IO[str] | None = None
        self._observer: _FileObserver | None = None
        self._filter: _InfoAndAbove | None = None

    def _open(self) -> IO[str]:
        if self.config.path == "-":
            # twistd may have replaced sys.stdout with a logger: writing a
            # log line there would log it again.
            # None only for a process started without a console (pythonw).
            return cast(IO[str], sys.__stdout__)
        assert self.config.path is not None
        return open(self.config.path, "a", encoding="utf-8")

    def privilegedStartService(self) -> None:
        # The listeners bind, and log where, in their privileged start:
        # first among the proxy's children, this one observes by then.
        super().privilegedStartService()
        self._observe()

    def startService(self) -> None:
        super().startService()
        self._observe()

    def _observe(self) -> None:
        if self._filter is not None:
            return
        self._stream = self._open()
        self._observer = _FileObserver(
            self._stream, self.config.format, self.config.path == "-" and isJournalStream(self._stream)
        )
        self._filter = _InfoAndAbove(self._observer)
        self.publisher.addObserver(self._filter)

    def reopen(self) -> None:
        """
        Open the file again (after logrotate moved it away).
        """
        if self._observer is None or self.config.path == "-":
            return
        stream = self._open()
        old, self._stream = self._stream, stream
        self._observer.stream = stream
        if old is not None:
            old.close()

    def stopService(self) -> None:
        if self._filter is not None:
            self.publisher.removeObserver(self._filter)
            self._filter = None
        if self._stream is not None and self._stream is not sys.__stdout__:
            self._stream.close()
        self._stream = None
        self._observer = None
        return super().stopService()


def processLogObserver(config: LogConfig, stream: IO[str] | None = None) -> ILogObserver:
    """
    The observer of C{mailproxy run}'s own log on standard output: events
    of level info and above, in the C{[log]} format if C{[log] path} is
    C{"-"} (then the L{EventLogService} adds no second writer), else as
    text; with priorities when standard output is the journal.

    @param stream: by default the process's standard output.
    """
    stream = stream if stream is not None else cast(IO[str], sys.__stdout__)
    format = config.format if config.path == "-" else "text"
    return _InfoAndAbove(_FileObserver(stream, format, isJournalStream(stream)))


def twistdLogObserver(options: Mapping[str, Any]) -> ILogObserver | None:
    """
    The log twistd would write for its C{options} (C{--logfile}: that file,
    rotated on C{SIGUSR1} as twistd does; C{--nodaemon} without it or with
    C{-}: standard output), with the same lines, formatted by
    L{ClassicText}; L{None} where twistd logs otherwise (C{--syslog}, a
    C{--logger}) or refuses to (C{-} for a daemon), which is left to it.
    """
    if options.get("syslog") or options.get("logger"):
        return None
    path = options.get("logfile") or ""
    if path == "-" or (not path and options.get("nodaemon")):
        if not options.get("nodaemon"):
            return None
        return _ClassicFileObserver(sys.stdout)
    logFile = LogFile.fromFullPath(path or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(logFile.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return _ClassicFileObserver(logFile)


class _ClassicFileObserver(FileLogObserver):
    """
    Twistd's log: a L{FileLogObserver} of L{ClassicText}'s lines, which also
    writes lines formatted already (L{writeClassicLines}) with one C{write}.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream, ClassicText())
        self.stream = stream
        self._binary = ioType(stream) is not str
        self._held: list[str] | None = None
        self._together = _writesUTF8(stream)

    def __call__(self, event: dict[str, Any]) -> None:
        if self._held is None:
            super().__call__(event)
            return
        text = self.formatEvent(event)
        if text:
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    # The lines kept go first; then this one alone, which
                    # the file refuses as it did when each line went alone.
                    self.releaseWrites()
                    self.holdWrites()
                    super().__call__(event)
                    return
            self._held.append(text)

    def holdWrites(self) -> None:
        """
        Keep the lines of the events from now on (L{heldWrites}), if its
        stream is UTF-8.
        """
        if self._together:
            self._held = []

    def releaseWrites(self) -> None:
        """
        Write the lines kept as one (as L{_writeClassic} does), and no
        longer keep them.
        """
        held, self._held = self._held, None
        if held:
            self._writeClassic("".join(held), "")

    def classicWriter(self) -> ClassicWriter | None:
        """
        L{_writeClassic}, if its stream is UTF-8.
        """
        return self._writeClassic if self._together else None

    def _writeClassic(self, lines: str, priorities: str) -> None:
        if not lines:
            return
        stream = self.stream
        if isinstance(stream, LogFile) and stream.rotateLength and stream.size + len(lines) > stream.rotateLength:
            # The file rotates before the line that finds it full: written
            # one at a time, each line goes to the same file as before.
            for line in classicLines(lines):
                stream.write(line)
        else:
            stream.write(lines.encode("utf-8") if self._binary else lines)
        stream.flush()


class TwistdLog:
    """
    A service that, made by twistd's plugin, has twistd write its log
    through L{twistdLog}: twistd reads its application's L{ILogObserver}
    component when it starts logging, after the service joined the
    application.

    @ivar twistdLog: the observer, or L{None} for twistd's own.
    """

    twistdLog: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        """
        Join C{parent}; if it is twistd's application and logs through no
        observer of its own yet, through L{twistdLog}.
        """
        if self.twistdLog is not None and isinstance(parent, Componentized):
            if parent.getComponent(ILogObserver) is None:
                parent.setComponent(ILogObserver, self.twistdLog)
        super().setServiceParent(parent)  # type: ignore[misc]
