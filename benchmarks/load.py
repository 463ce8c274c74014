"""
IMAP load generator for the mailproxy benchmarks.

Three tests, each a subcommand that prints one JSON object on stdout:

  - C{logins}: full sessions (connect, greeting, optional STARTTLS, LOGIN,
    LOGOUT, wait for the server to close) at a fixed concurrency for a fixed
    duration or count; reports logins per second and latency percentiles.
    C{--concurrency 1} gives the sequential single-client latency.
  - C{fetch}: one logged-in session fetches a large message
    (C{BODY.PEEK[]}) several times and reports MB/s.
  - C{idle}: opens many sessions, logs each in and puts it in C{IDLE}; once
    all are idling it prints a C{{"ready": ...}} line, waits for a line (or
    EOF) on stdin, then ends every session and prints the result.

Connections are driven by non-blocking sockets and one C{selectors} loop per
worker process (TLS through L{ssl.SSLSocket} directly, no memory BIO in
Python), so one core generates several thousand logins per second;
C{--procs N} splits the work over N forked workers and merges their numbers.

Run it with C{python benchmarks/load.py SUBCOMMAND --help}.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import selectors
import socket
import ssl
import sys
import time
from collections import Counter
from typing import Any, Callable, Generator, Iterable

import attrs

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
#: Yielded by an idle session that is established and waits for release.
PARK = 4

#: What a session generator yields: READ, WRITE or PARK.
Step = Generator[int, None, Any]

FD_LIMIT = 20000


def raiseFileLimit(wanted: int = FD_LIMIT) -> int:
    """
    Raise this process's soft limit on open files as far as C{wanted}
    (and the hard limit) allow.

    @return: the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


@attrs.frozen
class Target:
    """
    Where and how to connect and log in.

    @ivar host: address to connect to.
    @ivar port: TCP port.
    @ivar tls: C{"none"}, C{"starttls"} or C{"implicit"}.
    @ivar users: login names, used round-robin.
    @ivar password: the password of every user.
    @ivar caFile: PEM file of the CA that signed the server certificate.
    @ivar serverName: name to verify the certificate against (and to send
        as SNI when it is not an address).
    """

    host: str
    port: int
    tls: str
    users: tuple[str, ...]
    password: str
    caFile: str | None = None
    serverName: str | None = None

    def clientContext(self) -> ssl.SSLContext | None:
        """
        A verifying client context trusting L{caFile}, or L{None} in plain.
        """
        if self.tls == "none":
            return None
        return _clientContext(self.caFile)

    def family(self) -> int:
        """
        The address family of L{host}.
        """
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def user(self, index: int) -> str:
        """
        The login name for the C{index}-th session.
        """
        return self.users[index % len(self.users)]


@functools.lru_cache(maxsize=None)
def _clientContext(caFile: str | None) -> ssl.SSLContext:
    # One context per CA: building one reads the CA file, far too slow to
    # do per connection.
    return ssl.create_default_context(cafile=caFile)


class ProtocolError(Exception):
    """
    The server answered something the benchmark did not expect.
    """


def quoted(value: str) -> bytes:
    """
    An IMAP quoted string.
    """
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return b'"' + escaped.encode("utf-8") + b'"'


class Connection:
    """
    A non-blocking client connection whose operations are generators that
    yield the readiness they wait for (L{READ} or L{WRITE}).

    @ivar sock: the socket (replaced by an L{ssl.SSLSocket} on the same file
        descriptor after L{startTLS}).
    @ivar fd: the file descriptor, stable across L{startTLS}.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sock: socket.socket = socket.socket(target.family(), socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.sock.fileno()
        self.buffer = bytearray()

    def close(self) -> None:
        """
        Close the socket.
        """
        self.sock.close()

    def connect(self) -> Step:
        """
        Connect to the target.
        """
        err = self.sock.connect_ex((self.target.host, self.target.port))
        if err not in (0, 115):  # EINPROGRESS
            raise OSError(err, os.strerror(err))
        if err:
            yield WRITE
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))

    def startTLS(self, context: ssl.SSLContext) -> Step:
        """
        Run a TLS client handshake on the connection.
        """
        if self.buffer:
            raise ProtocolError("data pipelined before the TLS handshake")
        name = self.target.serverName or self.target.host
        self.sock = context.wrap_socket(
            self.sock, server_hostname=name, do_handshake_on_connect=False
        )
        while True:
            try:
                self.sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                yield READ
            except ssl.SSLWantWriteError:
                yield WRITE

    def _recv(self) -> Step:
        """
        Read what is available into the buffer, waiting for data if none is.

        @raise ConnectionError: at end of stream.
        """
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                yield READ
                continue
            except ssl.SSLWantWriteError:
                yield WRITE
                continue
            if not data:
                raise ConnectionError("connection closed by server")
            self.buffer += data
            return

    def readLine(self) -> Step:
        """
        Read one CRLF-terminated line (returned without the CRLF).
        """
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            yield from self._recv()

    def readTagged(self, tag: bytes) -> Step:
        """
        Read lines up to the tagged response C{tag} and require it to be OK.

        @return: the tagged line.
        """
        prefix = tag + b" "
        while True:
            line = yield from self.readLine()
            if line.startswith(prefix):
                if line[len(prefix) : len(prefix) + 2].upper() != b"OK":
                    raise ProtocolError(line.decode("utf-8", "replace")[:200])
                return line

    def sendAll(self, data: bytes) -> Step:
        """
        Write all of C{data}.
        """
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError):
                yield WRITE
                continue
            except ssl.SSLWantReadError:
                yield READ
                continue
            view = view[sent:]

    def waitClosed(self) -> Step:
        """
        Read and discard until the server closes the connection.
        """
        while True:
            try:
                yield from self._recv()
            except ConnectionError:
                return
            self.buffer.clear()

    def open(self) -> Step:
        """
        Connect, read the greeting and secure the connection as the target
        says.
        """
        context = self.target.clientContext()
        yield from self.connect()
        if self.target.tls == "implicit":
            assert context is not None
            yield from self.startTLS(context)
        greeting = yield from self.readLine()
        if not greeting.startswith(b"* OK"):
            raise ProtocolError("greeting: " + greeting.decode("utf-8", "replace")[:200])
        if self.target.tls == "starttls":
            assert context is not None
            yield from self.sendAll(b"s STARTTLS\r\n")
            yield from self.readTagged(b"s")
            yield from self.startTLS(context)

    def login(self, user: str) -> Step:
        """
        Log in as C{user}.
        """
        command = b"l LOGIN " + quoted(user) + b" " + quoted(self.target.password) + b"\r\n"
        yield from self.sendAll(command)
        yield from self.readTagged(b"l")

    def logout(self) -> Step:
        """
        Log out and wait for the server to close the connection.
        """
        yield from self.sendAll(b"o LOGOUT\r\n")
        yield from self.readTagged(b"o")
        yield from self.waitClosed()


@attrs.define
class Session:
    """
    One running session in a L{Driver}.
    """

    connection: Connection
    steps: Step
    started: float
    index: int
    registered: int = 0
    parked: bool = False


class Driver:
    """
    Runs session generators over one selector, at most C{concurrency} of
    them at a time in flight (parked sessions do not count).

    @ivar latencies: seconds per successful session, for those recorded.
    @ivar errors: error descriptions and how often each happened.
    """

    def __init__(
        self,
        makeSteps: Callable[[Connection, int], Step],
        target: Target,
        concurrency: int,
        timeout: float = 60.0,
    ) -> None:
        self.makeSteps = makeSteps
        self.target = target
        self.concurrency = concurrency
        self.timeout = timeout
        self.selector = selectors.DefaultSelector()
        self.sessions: dict[int, Session] = {}
        self.inFlight = 0
        self.parked: list[Session] = []
        self.started = 0
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.completed = 0
        self.recordFrom = 0.0
        self.recordUntil = float("inf")
        self.extraReaders: dict[int, Callable[[], None]] = {}

    def start(self) -> None:
        """
        Start one more session.
        """
        index = self.started
        self.started += 1
        self.inFlight += 1
        try:
            connection = Connection(self.target)
        except OSError as e:
            self._fail(None, e)
            return
        session = Session(connection, self.makeSteps(connection, index), time.monotonic(), index)
        self.sessions[connection.fd] = session
        self._step(session)

    def _step(self, session: Session) -> None:
        if session.parked:
            session.parked = False
        try:
            want = next(session.steps)
        except StopIteration:
            self._finish(session, None)
            return
        except Exception as e:
            self._finish(session, e)
            return
        events = want & (READ | WRITE) or READ
        if want & PARK:
            session.parked = True
            if session not in self.parked:
                self.parked.append(session)
                self.inFlight -= 1
        if session.registered != events:
            if session.registered:
                self.selector.modify(session.connection.fd, events, session)
            else:
                self.selector.register(session.connection.fd, events, session)
            session.registered = events

    def _finish(self, session: Session, error: Exception | None) -> None:
        now = time.monotonic()
        if session.registered:
            self.selector.unregister(session.connection.fd)
        del self.sessions[session.connection.fd]
        session.connection.close()
        if session in self.parked:
            self.parked.remove(session)
        else:
            self.inFlight -= 1
        if error is None:
            self.completed += 1
            if self.recordFrom <= now <= self.recordUntil:
                self.latencies.append(now - session.started)
        else:
            self._fail(session, error)

    def _fail(self, session: Session | None, error: Exception) -> None:
        kind = f"{type(error).__name__}: {error}"[:160]
        self.errors[kind] += 1
        if session is None:
            self.inFlight -= 1

    def addReader(self, fd: int, callback: Callable[[], None]) -> None:
        """
        Call C{callback} whenever C{fd} is readable.
        """
        self.extraReaders[fd] = callback
        self.selector.register(fd, READ, None)

    def removeReader(self, fd: int) -> None:
        """
        Stop watching C{fd}.
        """
        del self.extraReaders[fd]
        self.selector.unregister(fd)

    def poll(self, timeout: float) -> None:
        """
        Wait up to C{timeout} seconds for readiness and advance sessions.
        """
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self.extraReaders[key.fd]()
            else:
                self._step(key.data)

    def expire(self) -> None:
        """
        Fail in-flight sessions older than the timeout.
        """
        limit = time.monotonic() - self.timeout
        for session in list(self.sessions.values()):
            if not session.parked and session.started < limit:
                session.steps.close()
                self._finish(session, TimeoutError("session timed out"))

    def releaseParked(self) -> None:
        """
        Resume every parked session (they see the release and end).
        """
        for session in list(self.parked):
            self.parked.remove(session)
            self.inFlight += 1
            self._step(session)


def loginSteps(connection: Connection, index: int) -> Step:
    """
    One full login session.
    """
    yield from connection.open()
    yield from connection.login(connection.target.user(index))
    yield from connection.logout()


@attrs.define
class IdleControl:
    """
    Shared state of the idle sessions of one worker.
    """

    ready: int = 0
    released: bool = False


def idleSteps(control: IdleControl) -> Callable[[Connection, int], Step]:
    """
    Sessions that log in, enter IDLE, park until released, then end IDLE
    and log out.
    """

    def steps(connection: Connection, index: int) -> Step:
        yield from connection.open()
        yield from connection.login(connection.target.user(index))
        yield from connection.sendAll(b"i SELECT INBOX\r\n")
        yield from connection.readTagged(b"i")
        yield from connection.sendAll(b"d IDLE\r\n")
        while True:
            line = yield from connection.readLine()
            if line.startswith(b"+"):
                break
            if line.startswith(b"d "):
                raise ProtocolError("IDLE: " + line.decode("utf-8", "replace")[:200])
        control.ready += 1
        while not control.released:
            yield PARK
            if control.released:
                break
            # Untagged keep-alives ("* OK Still here") while idling.
            yield from connection._recv()
            connection.buffer.clear()
        yield from connection.sendAll(b"DONE\r\n")
        yield from connection.readTagged(b"d")
        yield from connection.logout()

    return steps


def cpuSeconds() -> float:
    """
    User plus system CPU seconds used by this process so far.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def runLogins(
    target: Target,
    concurrency: int,
    duration: float | None,
    count: int | None,
    warmup: float,
    worker: int = 0,
) -> dict[str, Any]:
    """
    Run login sessions for C{warmup} + C{duration} seconds (or C{count}
    sessions) and collect what was recorded after the warm-up.
    """
    driver = Driver(loginSteps, target, concurrency)
    driver.started = worker * 1_000_003
    first = driver.started
    now = time.monotonic()
    driver.recordFrom = now + warmup
    stopAt = now + warmup + duration if duration is not None else float("inf")
    if duration is not None:
        driver.recordUntil = stopAt
    cpuBefore = cpuSeconds()
    while True:
        now = time.monotonic()
        more = now < stopAt and (count is None or driver.started - first < count)
        while more and driver.inFlight < concurrency:
            driver.start()
            more = count is None or driver.started - first < count
        if driver.inFlight == 0 and not more:
            break
        driver.poll(0.2)
        driver.expire()
    window = duration if duration is not None else time.monotonic() - driver.recordFrom
    return {
        "ok": len(driver.latencies),
        "completed": driver.completed,
        "window": window,
        "latencies": driver.latencies,
        "errors": dict(driver.errors),
        "clientCpu": cpuSeconds() - cpuBefore,
    }


def runIdle(
    target: Target,
    sessions: int,
    concurrency: int,
    report: Callable[[dict[str, Any]], None],
    waitRelease: Callable[[Driver, Callable[[], None]], None],
    worker: int = 0,
) -> dict[str, Any]:
    """
    Establish C{sessions} idling sessions, C{report} once all are up (or
    failed), wait for the release, then end them all.
    """
    control = IdleControl()
    driver = Driver(idleSteps(control), target, concurrency, timeout=120.0)
    driver.started = worker * 1_000_003
    first = driver.started
    t0 = time.monotonic()
    while driver.started - first < sessions or driver.inFlight:
        while driver.started - first < sessions and driver.inFlight < concurrency:
            driver.start()
        driver.poll(0.2)
        driver.expire()
    established = time.monotonic() - t0
    report({"ready": control.ready, "errors": dict(driver.errors), "setupSeconds": established})

    released = []

    def release() -> None:
        released.append(True)

    waitRelease(driver, release)
    while not released:
        driver.poll(1.0)
    control.released = True
    ready = control.ready
    driver.releaseParked()
    t1 = time.monotonic()
    while driver.sessions:
        driver.poll(0.2)
        driver.expire()
    return {
        "ready": ready,
        "closed": driver.completed,
        "errors": dict(driver.errors),
        "setupSeconds": established,
        "teardownSeconds": time.monotonic() - t1,
    }


class BlockingReader:
    """
    Buffered reading of lines and counted octets from a blocking socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.chunk = bytearray(1 << 20)
        self.view = memoryview(self.chunk)

    def _fill(self) -> None:
        n = self.sock.recv_into(self.view)
        if not n:
            raise ConnectionError("connection closed by server")
        self.buffer += self.view[:n]

    def readLine(self) -> bytes:
        """
        One line without its CRLF.
        """
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            self._fill()

    def skip(self, count: int) -> None:
        """
        Consume C{count} octets without keeping them.
        """
        take = min(count, len(self.buffer))
        del self.buffer[:take]
        count -= take
        while count > 0:
            n = self.sock.recv_into(self.view, min(count, len(self.chunk)))
            if not n:
                raise ConnectionError("connection closed by server")
            count -= n

    def readTagged(self, tag: bytes) -> bytes:
        """
        Read up to the tagged response C{tag}, which must be OK.
        """
        prefix = tag + b" "
        while True:
            line = self.readLine()
            if line.startswith(prefix):
                if line[len(prefix) : len(prefix) + 2].upper() != b"OK":
                    raise ProtocolError(line.decode("utf-8", "replace")[:200])
                return line


def runFetch(target: Target, user: str, message: int, repeat: int) -> dict[str, Any]:
    """
    Log in once, fetch message C{message} of INBOX once to warm caches, then
    C{repeat} more times, timing each from sending the command to the
    tagged OK.
    """
    sock = socket.create_connection((target.host, target.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    context = target.clientContext()
    name = target.serverName or target.host
    if target.tls == "implicit":
        assert context is not None
        sock = context.wrap_socket(sock, server_hostname=name)
    reader = BlockingReader(sock)
    reader.readLine()
    if target.tls == "starttls":
        assert context is not None
        sock.sendall(b"s STARTTLS\r\n")
        reader.readTagged(b"s")
        sock = context.wrap_socket(sock, server_hostname=name)
        reader = BlockingReader(sock)
    version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
    sock.sendall(b"l LOGIN " + quoted(user) + b" " + quoted(target.password) + b"\r\n")
    reader.readTagged(b"l")
    sock.sendall(b"x SELECT INBOX\r\n")
    reader.readTagged(b"x")
    cpuBefore = cpuSeconds()
    seconds: list[float] = []
    size = 0
    for attempt in range(repeat + 1):
        tag = b"f%d" % attempt
        t0 = time.perf_counter()
        sock.sendall(tag + b" FETCH %d BODY.PEEK[]\r\n" % message)
        while True:
            line = reader.readLine()
            if line.endswith(b"}") and b"{" in line:
                size = int(line[line.rindex(b"{") + 1 : -1])
                reader.skip(size)
                continue
            if line.startswith(tag + b" "):
                if b" OK" not in line[: len(tag) + 4]:
                    raise ProtocolError(line.decode("utf-8", "replace")[:200])
                break
        if attempt:
            seconds.append(time.perf_counter() - t0)
    clientCpu = cpuSeconds() - cpuBefore
    sock.sendall(b"o LOGOUT\r\n")
    reader.readTagged(b"o")
    sock.close()
    return {
        "size": size,
        "tlsVersion": version,
        "seconds": seconds,
        "mbPerSecond": [size / s / 1e6 for s in seconds],
        "clientCpu": clientCpu,
    }


def percentile(values: list[float], fraction: float) -> float | None:
    """
    The C{fraction} percentile (nearest rank) of C{values}, or L{None}.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def summarizeLogins(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """
    Merge the results of login workers into one summary.
    """
    parts = list(parts)
    latencies = [x for part in parts for x in part["latencies"]]
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part["errors"])
    window = max(part["window"] for part in parts)
    ok = len(latencies)
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {
        "ok": ok,
        "completed": sum(part["completed"] for part in parts),
        "errors": sum(errors.values()),
        "errorKinds": dict(errors.most_common(5)),
        "seconds": round(window, 3),
        "perSecond": round(ok / window, 1) if window > 0 else None,
        "p50ms": ms(percentile(latencies, 0.50)),
        "p90ms": ms(percentile(latencies, 0.90)),
        "p99ms": ms(percentile(latencies, 0.99)),
        "clientCpu": round(sum(part["clientCpu"] for part in parts), 3),
    }


def _loginWorker(
    conn: multiprocessing.connection.Connection, target: Target, args: dict[str, Any], worker: int
) -> None:
    raiseFileLimit()
    conn.send(runLogins(target, worker=worker, **args))
    conn.close()


def _idleWorker(
    conn: multiprocessing.connection.Connection,
    target: Target,
    sessions: int,
    concurrency: int,
    worker: int,
) -> None:
    raiseFileLimit()

    def waitRelease(driver: Driver, release: Callable[[], None]) -> None:
        def readable() -> None:
            conn.recv()
            driver.removeReader(conn.fileno())
            release()

        driver.addReader(conn.fileno(), readable)

    result = runIdle(target, sessions, concurrency, conn.send, waitRelease, worker=worker)
    conn.send(result)
    conn.close()


def split(total: int, parts: int) -> list[int]:
    """
    C{total} split into C{parts} near-equal shares.
    """
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def commandLogins(target: Target, options: argparse.Namespace) -> dict[str, Any]:
    """
    The C{logins} subcommand.
    """
    procs = max(1, options.procs)
    context = multiprocessing.get_context("fork")
    pipes = []
    concurrencies = split(options.concurrency, procs)
    counts = split(options.count, procs) if options.count else [None] * procs
    for worker in range(procs):
        if not concurrencies[worker]:
            continue
        parent, child = context.Pipe()
        args = {
            "concurrency": concurrencies[worker],
            "duration": options.duration if not options.count else None,
            "count": counts[worker],
            "warmup": options.warmup,
        }
        process = context.Process(target=_loginWorker, args=(child, target, args, worker))
        process.start()
        child.close()
        pipes.append((process, parent))
    results = []
    for process, parent in pipes:
        results.append(parent.recv())
        process.join()
    summary = summarizeLogins(results)
    summary.update(test="logins", tls=target.tls, concurrency=options.concurrency, procs=procs)
    return summary


def commandIdle(target: Target, options: argparse.Namespace) -> dict[str, Any]:
    """
    The C{idle} subcommand: ready line on stdout, wait for stdin, result.
    """
    procs = max(1, options.procs)
    context = multiprocessing.get_context("fork")
    pipes = []
    for worker, (sessions, concurrency) in enumerate(
        zip(split(options.sessions, procs), split(options.concurrency, procs))
    ):
        if not sessions:
            continue
        parent, child = context.Pipe()
        process = context.Process(
            target=_idleWorker, args=(child, target, sessions, max(1, concurrency), worker)
        )
        process.start()
        child.close()
        pipes.append((process, parent))
    ready = [parent.recv() for _, parent in pipes]
    errors: Counter[str] = Counter()
    for part in ready:
        errors.update(part["errors"])
    print(
        json.dumps(
            {
                "ready": sum(part["ready"] for part in ready),
                "errors": sum(errors.values()),
                "errorKinds": dict(errors.most_common(5)),
                "setupSeconds": round(max(part["setupSeconds"] for part in ready), 3),
            }
        ),
        flush=True,
    )
    sys.stdin.readline()
    for _, parent in pipes:
        parent.send("release")
    results = []
    for process, parent in pipes:
        results.append(parent.recv())
        process.join()
    errors = Counter()
    for part in results:
        errors.update(part["errors"])
    return {
        "test": "idle",
        "tls": target.tls,
        "sessions": options.sessions,
        "ready": sum(part["ready"] for part in results),
        "closed": sum(part["closed"] for part in results),
        "errors": sum(errors.values()),
        "errorKinds": dict(errors.most_common(5)),
        "setupSeconds": round(max(part["setupSeconds"] for part in results), 3),
        "teardownSeconds": round(max(part["teardownSeconds"] for part in results), 3),
    }


def commandFetch(target: Target, options: argparse.Namespace) -> dict[str, Any]:
    """
    The C{fetch} subcommand.
    """
    result = runFetch(target, options.user, options.message, options.repeat)
    rates = sorted(result["mbPerSecond"])
    total = sum(result["seconds"])
    result.update(
        test="fetch",
        tls=target.tls,
        medianMBps=round(rates[len(rates) // 2], 1),
        bestMBps=round(rates[-1], 1),
        meanMBps=round(result["size"] * len(rates) / total / 1e6, 1),
        repeat=options.repeat,
    )
    result["seconds"] = [round(s, 5) for s in result["seconds"]]
    result["mbPerSecond"] = [round(r, 1) for r in result["mbPerSecond"]]
    return result


def buildParser() -> argparse.ArgumentParser:
    """
    The command line parser.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--tls", choices=("none", "starttls", "implicit"), default="none")
        p.add_argument("--ca", help="PEM file of the CA to trust")
        p.add_argument("--server-name", help="name to verify the certificate against")
        p.add_argument("--password", default="pw")

    logins = sub.add_parser("logins", help="full login sessions at a fixed concurrency")
    common(logins)
    logins.add_argument("--user-format", default="bench{}", help="login name; {} is 0..users-1")
    logins.add_argument("--users", type=int, default=50)
    logins.add_argument("--concurrency", type=int, default=20)
    logins.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    logins.add_argument("--count", type=int, help="run this many sessions instead of a duration")
    logins.add_argument("--warmup", type=float, default=1.0, help="seconds not measured first")
    logins.add_argument("--procs", type=int, default=1, help="worker processes")

    idle = sub.add_parser("idle", help="hold many sessions in IDLE until stdin says so")
    common(idle)
    idle.add_argument("--user-format", default="bench{}")
    idle.add_argument("--users", type=int, default=50)
    idle.add_argument("--sessions", type=int, default=2000)
    idle.add_argument("--concurrency", type=int, default=50, help="sessions being set up at once")
    idle.add_argument("--procs", type=int, default=1)

    fetch = sub.add_parser("fetch", help="MB/s of a large message FETCH")
    common(fetch)
    fetch.add_argument("--user", default="benchbig")
    fetch.add_argument("--message", type=int, default=1, help="sequence number in INBOX")
    fetch.add_argument("--repeat", type=int, default=5)
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    Run one subcommand and print its JSON result.
    """
    options = buildParser().parse_args(argv)
    raiseFileLimit()
    if options.command == "fetch":
        users: tuple[str, ...] = (options.user,)
    else:
        users = tuple(options.user_format.format(i) for i in range(options.users))
    target = Target(
        host=options.host,
        port=options.port,
        tls=options.tls,
        users=users,
        password=options.password,
        caFile=options.ca,
        serverName=options.server_name,
    )
    commands = {"logins": commandLogins, "idle": commandIdle, "fetch": commandFetch}
    result = commands[options.command](target, options)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
