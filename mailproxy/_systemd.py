"""
Running under systemd: the notification protocol (C{Type=notify}), log
priorities for the journal, and the reload outcome C{mailproxy reload --pid}
waits for.

The notification protocol (sd_notify) is a datagram of C{KEY=value} lines
sent to the C{AF_UNIX} socket named by C{$NOTIFY_SOCKET} (a leading C{@}
names an abstract socket). The proxy sends C{READY=1} once its listeners
listen, C{RELOADING=1} and then C{READY=1} around each reload, C{STOPPING=1}
when it starts to shut down, and a C{STATUS=} line with each.

A reload's outcome goes to systemd only as status text, and C{ExecReload}
must fail when the reload is refused; so the proxy also writes each outcome
to C{$RUNTIME_DIRECTORY/reload.json} (C{RuntimeDirectory=} in the unit),
which L{reloadBySignal} reads back after sending C{SIGHUP}.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import IO, Any, Callable

from twisted.logger import Logger, LogLevel

__all__ = [
    "ServiceNotifier",
    "isJournalStream",
    "passedSocketProblem",
    "syslogPriority",
    "ReloadError",
    "reloadBySignal",
    "RELOAD_STATUS",
]

#: The file in C{$RUNTIME_DIRECTORY} that holds the last reload's outcome.
RELOAD_STATUS = "reload.json"

#: The longest C{STATUS=} text sent: systemd shows one line of it.
_STATUS_LENGTH = 500

#: sd-daemon's priority prefixes (syslog levels) for Twisted's log levels.
_PRIORITIES = {
    LogLevel.critical: 2,
    LogLevel.error: 3,
    LogLevel.warn: 4,
    LogLevel.info: 6,
    LogLevel.debug: 7,
}


def syslogPriority(level: LogLevel | None) -> int:
    """
    The syslog priority (C{2} critical to C{7} debug) of a log level, as the
    journal reads it from a C{<N>} line prefix; C{6} (info) for none.
    """
    return _PRIORITIES.get(level, 6) if level is not None else 6


def isJournalStream(stream: IO[str] | None, environ: Mapping[str, str] | None = None) -> bool:
    """
    Whether C{stream} is connected to the journal: systemd names the
    journal's stream in C{$JOURNAL_STREAM} as C{device:inode}.

    @param environ: by default the process's environment.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    if stream is None or ":" not in value:
        return False
    try:
        status = os.fstat(stream.fileno())
        device, inode = (int(part) for part in value.split(":", 1))
    except (OSError, ValueError, AttributeError):
        return False
    return (status.st_dev, status.st_ino) == (device, inode)


def passedSocketProblem(fileno: int, family: int) -> str | None:
    """
    What is wrong with descriptor C{fileno}, passed by systemd for a TCP
    listener of address family C{family}: L{None} if it is a listening
    stream socket of that family.
    """
    try:
        probe = socket.socket(fileno=os.dup(fileno))
    except OSError as e:
        return f"descriptor {fileno} is no socket ({e.strerror})"
    with probe:
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if probe.type != socket.SOCK_STREAM or not listening:
            return f"descriptor {fileno} is no listening stream socket (ListenStream=)"
        if probe.family != family:
            return f"descriptor {fileno} is an {probe.family.name} socket, not {socket.AddressFamily(family).name}"
    return None


def _status(text: str) -> str:
    # One line: a newline would start another assignment.
    return "STATUS=" + " ".join(text.split())[:_STATUS_LENGTH]


class ServiceNotifier:
    """
    Tells the service manager how the proxy is doing: sd_notify messages,
    and the outcome of each reload in a file. Without C{$NOTIFY_SOCKET} (or
    C{$RUNTIME_DIRECTORY}) the corresponding part does nothing.

    @ivar address: the notification socket's address, or L{None}.
    @ivar statusDirectory: where C{reload.json} is written, or L{None}.
    @ivar generation: the number of reloads so far.
    """

    log = Logger()

    def __init__(
        self,
        address: str | bytes | None = None,
        statusDirectory: str | None = None,
        clock: Callable[[], int] = lambda: time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
    ) -> None:
        """
        @param clock: C{CLOCK_MONOTONIC} in microseconds, for the
            C{MONOTONIC_USEC} field systemd wants with C{RELOADING=1}.
        """
        self.address = address
        self.statusDirectory = statusDirectory
        self.generation = 0
        self._clock = clock
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def fromEnvironment(cls, environ: MutableMapping[str, str] | None = None) -> "ServiceNotifier":
        """
        The notifier systemd's environment asks for. C{NOTIFY_SOCKET} is
        removed from C{environ}, so that no child process takes it for its
        own.

        @param environ: by default the process's environment.
        """
        if environ is None:
            environ = os.environ
        address: str | bytes | None = environ.pop("NOTIFY_SOCKET", None) or None
        if isinstance(address, str):
            if address.startswith("@"):
                address = b"\0" + address[1:].encode("utf-8", "surrogateescape")
            elif not address.startswith("/"):
                # vsock: and other transports are not supported.
                address = None
        # systemd lists every RuntimeDirectory= here, separated by colons.
        directory = (environ.get("RUNTIME_DIRECTORY") or "").split(":")[0] or None
        return cls(address, directory)

    def notify(self, *assignments: str) -> None:
        """
        Send one notification, C{KEY=value} lines; never blocks. A failure
        is logged once (systemd may not be listening any more).
        """
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(assignments).encode("utf-8", "replace"), self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                self.log.warn("cannot notify systemd: {error}", error=os.strerror(e.errno or errno.EIO))

    def ready(self, status: str) -> None:
        """
        The proxy listens and serves.
        """
        self.notify("READY=1", _status(status))

    def reloading(self, status: str) -> None:
        """
        A reload begins.
        """
        self.notify("RELOADING=1", f"MONOTONIC_USEC={self._clock()}", _status(status))

    def reloaded(self, outcome: dict[str, Any]) -> None:
        """
        A reload ended: applied, or refused with the running configuration
        kept (still C{READY=1}: the proxy serves on). Record the outcome for
        L{reloadBySignal}.

        @param outcome: what L{mailproxy._lifecycle.ProxyService.reload}
            returns.
        """
        self.generation += 1
        if outcome["ok"]:
            text = f"reloaded {outcome['path']}"
            if outcome["restartNeeded"]:
                text += f"; these changes need a restart: {', '.join(outcome['restartNeeded'])}"
        else:
            text = f"reload failed, keeping the running configuration: {outcome['error']}"
        self.notify("READY=1", _status(text))
        self.writeStatus(outcome)

    def stopping(self, status: str) -> None:
        """
        Shutdown has begun.
        """
        self.notify("STOPPING=1", _status(status))

    def status(self, text: str) -> None:
        """
        Show C{text} as the service's status.
        """
        self.notify(_status(text))

    def writeStatus(self, outcome: dict[str, Any] | None) -> None:
        """
        Write C{reload.json} (pid, generation and outcome of the last
        reload, L{None} before any) into the status directory, replacing it
        whole so that a reader never sees half of it.
        """
        if self.statusDirectory is None:
            return
        # A few hundred octets on the runtime directory's tmpfs: written in
        # the reactor's thread, like the route table a reload reads.
        path = os.path.join(self.statusDirectory, RELOAD_STATUS)
        record = {"pid": os.getpid(), "generation": self.generation, "outcome": outcome}
        try:
            with open(path + ".new", "w", encoding="utf-8") as f:
                json.dump(record, f)
            os.replace(path + ".new", path)
        except OSError as e:
            self.log.warn("cannot write {path}: {error}", path=path, error=e.strerror or str(e))


class ReloadError(Exception):
    """
    L{reloadBySignal} could not learn that a reload was applied.
    """


def _readStatus(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def reloadBySignal(
    pid: int,
    directory: str | None,
    timeout: float = 60.0,
    interval: float = 0.05,
) -> dict[str, Any]:
    """
    Send C{SIGHUP} to the proxy C{pid} and wait until it has recorded the
    outcome of that reload in C{directory}'s C{reload.json}. This blocks:
    it is for the C{mailproxy reload} command, not for the proxy.

    @param directory: the proxy's C{$RUNTIME_DIRECTORY}.
    @return: the outcome, as L{mailproxy._lifecycle.ProxyService.reload}
        returns it (C{ok} false when the proxy refused the reload).
    @raise ReloadError: no such proxy, or no outcome within C{timeout}
        seconds.
    """
    if directory is None:
        raise ReloadError("$RUNTIME_DIRECTORY is not set (RuntimeDirectory= in the unit), so no outcome can be read")
    path = os.path.join(directory, RELOAD_STATUS)
    before = _readStatus(path)
    if before is None or before.get("pid") != pid or not isinstance(before.get("generation"), int):
        raise ReloadError(f"{path} is not written by process {pid}: was it started with this RuntimeDirectory?")
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        raise ReloadError(f"cannot signal process {pid}: {e.strerror}") from None
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(interval)
        record = _readStatus(path)
        if record is not None and record.get("pid") == pid and record.get("generation", 0) > before["generation"]:
            outcome: dict[str, Any] = record["outcome"]
            return outcome
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise ReloadError(f"process {pid} exited during the reload") from None
        except PermissionError:
            pass
        if time.monotonic() > deadline:
            raise ReloadError(f"no outcome from process {pid} after {timeout:g} seconds")
