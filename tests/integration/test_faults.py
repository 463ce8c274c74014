"""
The fault matrix: the proxy as a subprocess in front of fake IMAP backends
that misbehave in every way a real one can (refuse, never greet, stall in
the login, send an endless line or endless untagged responses, drop after
the login command, answer with the wrong tag, show a certificate for
another name, reset the connection mid-transfer), POP3, ManageSieve and
SMTP backends that never greet or never end their capability lists, a real
Dovecot whose certificate names another host, clients that misbehave
(reset mid-transfer or in the TLS handshake, half-close, never read, ignore
the TLS close), routers that are down, slow or broken, and a reload under
load.

Each row checks what a user sees (the documented reply, within
C{backend_timeout}: the client's socket timeout is only a guard against a
hang) and what an operator sees afterwards: the session gone from
C{GET /sessions}, no traceback in the proxy's log, and no file descriptor
or thread left over in the proxy process.

The fake backends are plain sockets served by threads of the test process,
on free loopback ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import struct
import threading
import time
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from mailproxy._relay import _pipes
from mailproxy._session import CLOSE_GRACE

from .common import tomlTable, tomlValue
from .servers import Dovecot, Proxy, TestCA, fixtureDirectory, freePort, openDescriptors, requireServer, sharedFixture

if TYPE_CHECKING:
    MixinBase = SynchronousTestCase
else:
    MixinBase = object

#: The proxy's backend_timeout in these tests, in seconds.
BACKEND_TIMEOUT = 2.0
#: The client's guard against a hang: a bit above what any reply may take.
CLIENT_TIMEOUT = BACKEND_TIMEOUT + 3
#: Seconds to wait for the proxy to tidy up after a session: a close it
#: started may take CLOSE_GRACE to finish when the client does not help.
SETTLE = CLOSE_GRACE + 3
TOKEN = "faults-token-0123456789abcdef0123456789abcdef"
PASSWORD = b"fault-secret"
#: Empty splice pipes the relay keeps for later sessions.
PIPE_POOL = _pipes.keep
#: How far the proxy's memory (KiB) may rise while one client or backend
#: floods it: a few reads' worth, far below what holding the flood takes.
MEMORY_BOUND = 8 * 1024
#: The relayed FETCH answer of the well-behaved backend, in octets.
FETCH_SIZE = 128 * 1024 * 1024

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] fake backend ready\r\n"
UNAVAILABLE = re.compile(rb"a NO \[UNAVAILABLE\] [^\r\n]*\r\n\Z")


def _readLine(connection: socket.socket, buffer: bytearray) -> bytes | None:
    """
    The next line from C{connection} (CRLF removed), or L{None} at its end.

    @raise TimeoutError: nothing complete arrived within the connection's
        timeout.
    """
    while b"\n" not in buffer:
        try:
            data = connection.recv(65536)
        except ConnectionError:
            return None
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\n")
    line = bytes(buffer[:end]).rstrip(b"\r")
    del buffer[: end + 1]
    return line


def _reset(connection: socket.socket) -> None:
    """
    Close C{connection} with a TCP RST instead of a FIN.
    """
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


class FakeBackend:
    """
    A loopback TCP server whose connections C{behaviour} serves, each in
    a thread of its own.

    @ivar port: the port it listens on.
    @ivar received: per connection, what the proxy sent.
    """

    def __init__(
        self,
        behaviour: Callable[[FakeBackend, socket.socket, bytearray], None],
        tls: ssl.SSLContext | None = None,
        port: int = 0,
    ) -> None:
        self.behaviour = behaviour
        self.tls = tls
        self.received: list[bytearray] = []
        #: Octets of FETCH answers sent so far.
        self.fetched = 0
        self.stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            record = bytearray()
            self.received.append(record)
            threading.Thread(target=self._serve, args=(connection, record), daemon=True).start()

    def _serve(self, connection: socket.socket, record: bytearray) -> None:
        try:
            if self.tls is not None:
                try:
                    connection = self.tls.wrap_socket(connection, server_side=True)
                except (OSError, ssl.SSLError):
                    # The proxy refused the certificate.
                    connection.close()
                    return
            self.behaviour(self, connection, record)
        except OSError:
            pass
        finally:
            try:
                connection.close()
            except OSError:
                pass

    def flood(self, connection: socket.socket, chunk: bytes) -> None:
        """
        Send C{chunk} on C{connection} again and again until L{stop} (or
        until the proxy closes it).
        """
        while not self.stopping.is_set():
            connection.sendall(chunk)

    def stop(self) -> None:
        """
        Stop accepting; connections in progress end on their own.
        """
        self.stopping.set()
        # Closing alone would not wake the thread blocked in accept().
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()


class _Recording:
    """
    Reads lines from a connection, keeping a copy of everything read.
    """

    def __init__(self, connection: socket.socket, record: bytearray) -> None:
        self.connection = connection
        self.record = record
        self.buffer = bytearray()

    def line(self) -> bytes | None:
        line = _readLine(self.connection, self.buffer)
        if line is not None:
            self.record += line + b"\r\n"
        return line


def _login(connection: socket.socket, reader: _Recording) -> bytes | None:
    """
    Greet and read the proxy's login command; the tag of it, or L{None} if
    the proxy went away.
    """
    connection.sendall(GREETING)
    line = reader.line()
    if line is None:
        return None
    return line.split(b" ", 1)[0]


def wellBehaved(backend: FakeBackend, connection: socket.socket, record: bytearray) -> None:
    """
    A backend that logs in anyone and serves NOOP, FETCH (a large literal)
    and LOGOUT.
    """
    reader = _Recording(connection, record)
    tag = _login(connection, reader)
    if tag is None:
        return
    connection.sendall(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
    while (line := reader.line()) is not None:
        tag, _, command = line.partition(b" ")
        verb = command.split(b" ", 1)[0].upper()
        if verb == b"FETCH":
            connection.sendall(b"* 1 FETCH (BODY[] {%d}\r\n" % FETCH_SIZE)
            chunk = b"x" * 65535 + b"\n"
            for _ in range(FETCH_SIZE // len(chunk)):
                connection.sendall(chunk)
                backend.fetched += len(chunk)
            connection.sendall(b")\r\n" + tag + b" OK Fetch completed.\r\n")
        elif verb == b"LOGOUT":
            connection.sendall(b"* BYE Logging out\r\n" + tag + b" OK Logout completed.\r\n")
            return
        else:
            connection.sendall(tag + b" OK " + verb + b" completed.\r\n")


def neverGreets(backend: FakeBackend, connection: socket.socket, record: bytearray) -> None:
    """
    Accepts and says nothing, until the proxy goes away.
    """
    _Recording(connection, record).line()


def stallsInLogin(backend: FakeBackend, connection: socket.socket, record: bytearray) -> None:
    """
    Greets, reads the login command, never answers it.
    """
    reader = _Recording(connection, record)
    if _login(connection, reader) is not None:
        reader.line()


def endlessLine(backend: FakeBackend, connection: socket.socket, record: bytearray) -> None:
    """
    Greets, then answers the login with one line that never ends.
    """
    reader = _Recording(connection, record)
    if _login(connection, reader) is None:
        return
    connection.sendall(b"* OK ")
    backend.flood(connection, b"x" * 65536)


def endlessUntagged(backend: FakeBackend, connection: socket.socket, record: bytearray) -> None:
    """
    Greets, then answers the login with untagged responses that never end.
    """
    reader = _Recording(connection, record)
    if _login(connection, reader) is None:
        return
    backend.flood(connection, b"* OK [ALERT] still here\r\n" * 2048)


def dropsAfterLogin(backend: FakeBackend, connection: socket.socket, record: bytearray) -> None:
    """
    Greets, reads the login command and closes.
    """
    _login(connection, _Recording(connection, record))


def wrongTag(backend: FakeBackend, connection: socket.socket, record: bytearray) -> None:
    """
    Greets and answers the login command with another tag's OK.
    """
    reader = _Recording(connection, record)
    tag = _login(connection, reader)
    if tag is None:
        return
    connection.sendall(b"zz" + tag + b" OK Logged in\r\n")
    reader.line()


def resetsMidTransfer(backend: FakeBackend, connection: socket.socket, record: bytearray) -> None:
    """
    Logs in, then answers FETCH with part of a literal and a TCP RST.
    """
    reader = _Recording(connection, record)
    tag = _login(connection, reader)
    if tag is None:
        return
    connection.sendall(tag + b" OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    if reader.line() is not None:
        connection.sendall(b"* 1 FETCH (BODY[] {%d}\r\n" % FETCH_SIZE + b"y" * 300000)
        _reset(connection)


def _floodsFirstReply(
    greeting: bytes, chunk: bytes, first: bytes = b""
) -> Callable[[FakeBackend, socket.socket, bytearray], None]:
    """
    A server that sends C{greeting}, reads one command and answers it with
    C{first}, then C{chunk} again and again.
    """

    def behaviour(backend: FakeBackend, connection: socket.socket, record: bytearray) -> None:
        reader = _Recording(connection, record)
        connection.sendall(greeting)
        if reader.line() is None:
            return
        connection.sendall(first)
        backend.flood(connection, chunk)

    return behaviour


endlessPOP3Capa = _floodsFirstReply(b"+OK fake POP3 ready\r\n", b"X-CAPABILITY\r\n" * 4096, first=b"+OK\r\n")
"""
A POP3 server whose CAPA list never ends.
"""


def endlessSieveGreeting(backend: FakeBackend, connection: socket.socket, record: bytearray) -> None:
    """
    A ManageSieve server whose capability greeting never ends.
    """
    number = 0
    while not backend.stopping.is_set():
        connection.sendall(b"".join(b'"X-%d" "value"\r\n' % (n,) for n in range(number, number + 4096)))
        number += 4096


endlessEHLO = _floodsFirstReply(b"220 fake ESMTP ready\r\n", b"250-X-EXTENSION\r\n" * 4096)
"""
An SMTP server whose EHLO reply never ends.
"""


class FaultServers:
    """
    One fake backend per fault, the proxy in front of them (an IMAP
    listener in plain and one with implicit TLS, the static router, the
    management endpoint, short timeouts), and the test CA.
    """

    BEHAVIOURS = {
        "good": wellBehaved,
        "silent": neverGreets,
        "stall": stallsInLogin,
        "endless": endlessLine,
        "untagged": endlessUntagged,
        "drops": dropsAfterLogin,
        "wrongtag": wrongTag,
        "reset": resetsMidTransfer,
    }

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.ca = TestCA(str(self.directory / "ca"))
        self.backends = {name: FakeBackend(behaviour) for name, behaviour in self.BEHAVIOURS.items()}
        # A backend with a certificate for another name than the one the
        # proxy connects to.
        certificate, key = self.ca.issue("elsewhere", names=("elsewhere.example",), ips=())
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certificate, key)
        self.backends["badcert"] = FakeBackend(wellBehaved, tls=context)
        # Per protocol, a backend whose capability list never ends.
        self.capa = {
            "pop3": FakeBackend(endlessPOP3Capa),
            "sieve": FakeBackend(endlessSieveGreeting),
            "smtp": FakeBackend(endlessEHLO),
        }
        # A real Dovecot, reached by a name its certificate does not carry.
        self.dovecot = Dovecot(
            str(self.directory / "dovecot"), "faults", {"dovecot@example.org": PASSWORD.decode()}, ca=self.ca
        )
        # Nothing listens on the "refuses" backend's port.
        self.refusingPort = freePort()
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(freePort())
        self.imap, self.imaps, self.admin = sorted(ports)
        self.ports = {"imap": self.imap}
        for protocol in ("pop3", "sieve", "smtp"):
            port = freePort()
            while port in ports:
                port = freePort()
            ports.add(port)
            self.ports[protocol] = port
        proxyCertificate, proxyKey = self.ca.issue("proxy")
        tables = {
            name: {"host": "127.0.0.1", "ports": {"imap": backend.port}, "tls": "none", "forward": "none", "connect_timeout": BACKEND_TIMEOUT}
            for name, backend in self.backends.items()
        }
        tables["badcert"].update(tls="implicit", ca_file=self.ca.caPath)
        silent = self.backends["silent"].port
        tables["silent"]["ports"] = {"imap": silent, "pop3": silent, "sieve": silent, "smtp": silent}
        tables["capa"] = {
            "host": "127.0.0.1",
            "ports": {protocol: backend.port for protocol, backend in self.capa.items()},
            "forward": "none",
        }
        tables["dovecot"] = {
            "host": "127.0.0.1",
            "ports": {"imap": 0},
            "tls": "implicit",
            "ca_file": self.ca.caPath,
            "server_name": "mail.elsewhere.example",
            "forward": "none",
        }
        tables["refuses"] = {"host": "127.0.0.1", "ports": {"imap": self.refusingPort}, "forward": "none"}
        config = (
            tomlTable("proxy", {"hostname": "proxy.example.org"})
            + tomlTable("limits", {"failure_delay": 0.1, "backend_timeout": BACKEND_TIMEOUT, "preauth_timeout": 30, "idle_timeout": 60})
            + tomlTable("tls", {"certificate": proxyCertificate, "key": proxyKey})
            + f'[[listener]]\nprotocol = "imap"\nendpoint = "tcp:{self.imap}:interface=127.0.0.1"\ntls = "none"\n'
            + f'[[listener]]\nprotocol = "imap"\nendpoint = "tcp:{self.imaps}:interface=127.0.0.1"\ntls = "implicit"\n'
            + "".join(
                f'[[listener]]\nprotocol = "{protocol}"\nendpoint = "tcp:{self.ports[protocol]}:interface=127.0.0.1"\ntls = "none"\n'
                + ('mode = "submission"\n' if protocol == "smtp" else "")
                for protocol in ("pop3", "sieve", "smtp")
            )
            + tomlTable("router", {"type": "static", "path": "routes.toml"})
            + "".join(tomlTable(f"backend.{name}", values) for name, values in tables.items())
            + tomlTable("admin", {"endpoint": f"tcp:{self.admin}:interface=127.0.0.1", "token_file": "admin.token"})
        )
        self.config = config
        self.proxy = Proxy(str(self.directory / "proxy"), config)
        (self.proxy.directory / "admin.token").write_text(TOKEN + "\n")
        routes = "".join(f"{tomlValue(name + '@example.org')} = {tomlValue(name)}\n" for name in tables)
        (self.proxy.directory / "routes.toml").write_text("[accounts]\n" + routes)

    @classmethod
    def start(cls) -> FaultServers:
        """
        Start the proxy in front of the fake backends.
        """
        requireServer("openssl", "dovecot")
        servers = cls(fixtureDirectory("faults"))
        try:
            servers.dovecot.start()
            # Its port is known now.
            servers.proxy.configPath.write_text(
                servers.config.replace('"ports" = { "imap" = 0 }', f'"ports" = {{ "imap" = {servers.dovecot.imaps} }}')
            )
            servers.proxy.start([*servers.ports.values(), servers.imaps, servers.admin])
            warmUp(servers.imap)
        except BaseException:
            servers.stop()
            raise
        return servers

    def stop(self) -> None:
        """
        Stop the proxy and the fake backends.
        """
        self.proxy.stop()
        self.dovecot.stop()
        for backend in [*self.backends.values(), *self.capa.values()]:
            backend.stop()


class Client:
    """
    A bare IMAP client of the proxy.
    """

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        connection = socket.create_connection(("127.0.0.1", port), CLIENT_TIMEOUT)
        if context is not None:
            connection = context.wrap_socket(connection, server_hostname="localhost")
        self.connection = connection
        self.buffer = bytearray()
        self.greeting = self.line()

    def line(self) -> bytes:
        """
        The next line, CRLF included.

        @raise EOFError: the proxy closed the connection.
        """
        line = _readLine(self.connection, self.buffer)
        if line is None:
            raise EOFError(bytes(self.buffer))
        return line + b"\r\n"

    def command(self, tag: bytes, command: bytes) -> bytes:
        """
        Send a command; the reply lines up to the tagged one.
        """
        self.connection.sendall(tag + b" " + command + b"\r\n")
        lines = [self.line()]
        while not lines[-1].startswith(tag + b" "):
            lines.append(self.line())
        return b"".join(lines)

    def login(self, account: str) -> bytes:
        """
        LOGIN as C{account}@example.org; the reply.
        """
        return self.command(b"a", b"LOGIN " + account.encode() + b"@example.org " + PASSWORD)

    def rest(self) -> bytes:
        """
        Everything until the proxy closes the connection.
        """
        data = bytes(self.buffer)
        self.buffer.clear()
        while True:
            try:
                chunk = self.connection.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk

    def reset(self) -> None:
        """
        Close with a TCP RST.
        """
        _reset(self.connection)

    def close(self) -> None:
        self.connection.close()


#: Per protocol (other than IMAP): how a login goes, how the proxy answers a
#: backend that fails, and a command that shows the session still works.
OTHER_PROTOCOLS: dict[str, dict[str, Any]] = {
    "pop3": dict(
        greeting=rb"\+OK ",
        login=[b"USER {user}", b"PASS " + PASSWORD],
        unavailable=rb"-ERR \[SYS/TEMP\] [^\r\n]*\r\n\Z",
        probe=b"CAPA",
        probed=rb"\+OK",
    ),
    "sieve": dict(
        greeting=rb"OK",
        login=[b'AUTHENTICATE "PLAIN" "{plain}"'],
        unavailable=rb'NO \(TRYLATER\) "[^\r\n]*"\r\n\Z',
        probe=b"NOOP",
        probed=rb'OK "NOOP completed\."',
    ),
    "smtp": dict(
        greeting=rb"220 ",
        login=[b"EHLO client.example", b"AUTH PLAIN {plain}"],
        unavailable=rb"454 4\.7\.0 [^\r\n]*\r\n\Z",
        probe=b"NOOP",
        probed=rb"250 ",
    ),
}


class OtherClient:
    """
    A bare client of the proxy's POP3, ManageSieve or SMTP listener.
    """

    def __init__(self, protocol: str, port: int) -> None:
        self.protocol = protocol
        self.spec = OTHER_PROTOCOLS[protocol]
        self.connection = socket.create_connection(("127.0.0.1", port), CLIENT_TIMEOUT)
        self.buffer = bytearray()
        self.greeting = self.reply()

    def reply(self) -> bytes:
        """
        The next reply: one line, or the lines of a multi-line one
        (ManageSieve's up to its OK, SMTP's up to the last).
        """
        lines: list[bytes] = []
        while True:
            line = _readLine(self.connection, self.buffer)
            if line is None:
                raise EOFError(b"".join(lines))
            lines.append(line + b"\r\n")
            if self.protocol == "sieve" and line.startswith(b'"'):
                continue
            if self.protocol == "smtp" and line[3:4] == b"-":
                continue
            return b"".join(lines)

    def command(self, line: bytes) -> bytes:
        """
        Send C{line}; the reply.
        """
        self.connection.sendall(line + b"\r\n")
        return self.reply()

    def login(self, account: str) -> bytes:
        """
        Log in as C{account}@example.org; the last reply.
        """
        user = account.encode() + b"@example.org"
        plain = b64encode(b"\x00" + user + b"\x00" + PASSWORD)
        for line in self.spec["login"]:
            reply = self.command(line.replace(b"{user}", user).replace(b"{plain}", plain))
        return reply

    def close(self) -> None:
        self.connection.close()


def warmUp(port: int) -> None:
    """
    Log in once through the proxy on C{port} (as C{good}, relayed), so that
    what the proxy starts on first use and keeps (the name resolver's
    thread, the relay's spare pipes) is in every test's baseline.
    """
    client = Client(port)
    try:
        reply = client.login("good")
        if not reply.startswith(b"a OK "):
            raise RuntimeError(f"the warm-up login failed: {reply!r}")
        client.command(b"b", b"LOGOUT")
    finally:
        client.close()


def _processFacts(pid: int) -> tuple[int, int, int, int]:
    """
    The proxy's open file descriptors other than pipes, its pipe ends, its
    threads and its resident memory (KiB).
    """
    targets = openDescriptors(pid).values()
    pipes = sum(target.startswith("pipe:") for target in targets)
    fds = len(targets) - pipes
    threads = len(os.listdir(f"/proc/{pid}/task"))
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return fds, pipes, threads, rss


def _resetPeakMemory(pid: int) -> None:
    """
    Start measuring the proxy's peak resident memory afresh.
    """
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _memoryGrowth(pid: int, before: int) -> int:
    """
    How far the proxy's resident memory rose above C{before} (KiB) since
    L{_resetPeakMemory}, in KiB.
    """
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) - before  # type: ignore[union-attr]


def _openFiles(pid: int) -> list[str]:
    """
    What the proxy's file descriptors refer to, for failure messages.
    """
    return [f"{fd}: {target}" for fd, target in openDescriptors(pid).items()]


class TidyMixin(MixinBase):
    """
    A proxy under test with a management endpoint, its IMAP clients, and
    the check that a fault left nothing over.

    @ivar servers: the fixture, with C{proxy}, C{imap}, C{admin} (ports)
        and possibly C{imaps} and C{ca}.
    """

    servers: Any

    def startServers(self) -> Any:
        """
        The fixture the tests run against.
        """
        raise NotImplementedError

    def setUp(self) -> None:
        self.servers = self.startServers()
        self.proxy = self.servers.proxy
        self.clients: list[Client] = []
        self.addCleanup(self._closeClients)
        self.waitIdle()
        self.logMark = len(self.proxy.logText())
        self.fds, self.pipes, self.threads, self.rss = _processFacts(self.proxy.pid)
        _resetPeakMemory(self.proxy.pid)

    def _closeClients(self) -> None:
        for client in self.clients:
            client.close()

    def connect(self, tls: bool = False) -> Client:
        """
        A new client of the proxy's plain (or implicit-TLS) IMAP listener.
        """
        if tls:
            context = ssl.create_default_context(cafile=self.servers.ca.caPath)
            client = Client(self.servers.imaps, context)
        else:
            client = Client(self.servers.imap)
        self.clients.append(client)
        self.assertTrue(client.greeting.startswith(b"* OK "), client.greeting)
        return client

    def sessions(self) -> list[dict]:
        """
        The proxy's open sessions, from its management endpoint.
        """
        request = urllib.request.Request(f"http://127.0.0.1:{self.servers.admin}/sessions")
        request.add_header("Authorization", "Bearer " + TOKEN)
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT) as response:
            return json.loads(response.read())["sessions"]  # type: ignore[no-any-return]

    def waitIdle(self) -> None:
        """
        Wait until the proxy has no session open.
        """
        deadline = time.monotonic() + SETTLE
        while (open_ := self.sessions()):
            if time.monotonic() > deadline:
                self.fail(f"sessions still open: {open_}")
            time.sleep(0.05)

    def assertTidy(self) -> None:
        """
        The session is gone from C{/sessions}, the log since the test began
        has no traceback, and the proxy holds no more file descriptors or
        threads than before.
        """
        self.waitIdle()
        deadline = time.monotonic() + SETTLE
        while True:
            fds, pipes, threads, _ = _processFacts(self.proxy.pid)
            # The relay keeps up to PIPE_POOL empty splice pipes for later
            # sessions: a cache, not a leak.
            if fds <= self.fds and pipes <= self.pipes + 2 * PIPE_POOL and threads <= self.threads:
                break
            if time.monotonic() > deadline:
                self.fail(
                    f"left over: {fds - self.fds} fds, {pipes - self.pipes} pipe ends, {threads - self.threads} threads;"
                    f" open: {_openFiles(self.proxy.pid)}"
                )
            time.sleep(0.05)
        added = self.proxy.logText()[self.logMark :]
        self.assertNotIn("Traceback", added)
        self.assertNotIn("Unhandled", added)
        self.assertTrue(self.proxy.running())



class FaultMatrixTests(TidyMixin, SynchronousTestCase):
    """
    Each backend and client fault against the proxy; after each, nothing
    is left over.
    """

    def startServers(self) -> FaultServers:
        return sharedFixture("faults", "faults", FaultServers.start)

    def assertUnavailable(self, account: str) -> bytes:
        """
        A login routed to C{account}'s backend gets IMAP's temporary
        failure; the connection stays usable; then everything is tidy.

        @return: what the backend received.
        """
        backend = self.servers.backends.get(account)
        received = len(backend.received) if backend else 0
        client = self.connect()
        self.assertRegex(client.login(account), UNAVAILABLE)
        self.assertEqual(client.command(b"b", b"NOOP"), b"b OK NOOP completed.\r\n")
        client.close()
        self.assertTidy()
        return b"".join(backend.received[received:]) if backend else b""

    # Backend faults

    def test_backendRefuses(self) -> None:
        """
        A backend port that refuses connections: C{NO [UNAVAILABLE]}.
        """
        self.assertUnavailable("refuses")

    def test_backendNeverGreets(self) -> None:
        """
        A backend that accepts and never greets: C{NO [UNAVAILABLE]} once
        C{backend_timeout} has passed.
        """
        self.assertUnavailable("silent")

    def test_backendStallsInLogin(self) -> None:
        """
        A backend that never answers the login command: C{NO
        [UNAVAILABLE]}.
        """
        self.assertUnavailable("stall")

    def test_backendEndlessLine(self) -> None:
        """
        A backend that answers the login with a line that never ends:
        C{NO [UNAVAILABLE]}, and the proxy does not hold the line.
        """
        self.assertUnavailable("endless")
        self.assertLess(_memoryGrowth(self.proxy.pid, self.rss), MEMORY_BOUND)

    def test_backendEndlessUntagged(self) -> None:
        """
        A backend that answers the login with untagged responses without
        end: C{NO [UNAVAILABLE]}, and the proxy does not collect them
        without bound.
        """
        self.assertUnavailable("untagged")
        self.assertLess(_memoryGrowth(self.proxy.pid, self.rss), MEMORY_BOUND)

    def test_backendDropsAfterLogin(self) -> None:
        """
        A backend that closes after reading the login command: C{NO
        [UNAVAILABLE]}.
        """
        self.assertUnavailable("drops")

    def test_backendWrongTag(self) -> None:
        """
        A backend that answers the login with another tag: C{NO
        [UNAVAILABLE]}, not a login.
        """
        self.assertUnavailable("wrongtag")

    def test_backendWrongCertificateName(self) -> None:
        """
        A TLS backend whose certificate names another host: C{NO
        [UNAVAILABLE]}, and the backend never receives the credentials.
        """
        backend = self.servers.backends["badcert"]
        connections = len(backend.received)
        received = self.assertUnavailable("badcert")
        # The proxy did connect, and broke off in the handshake.
        self.assertEqual(len(backend.received), connections + 1)
        self.assertEqual(received, b"")
        self.assertNotIn(PASSWORD.decode(), self.proxy.logText())

    def test_dovecotWrongCertificateName(self) -> None:
        """
        A real Dovecot reached by a name its certificate does not carry:
        C{NO [UNAVAILABLE]}, and Dovecot sees no login attempt.
        """
        mark = len(self.servers.dovecot.logText())
        self.assertUnavailable("dovecot")
        # Dovecot logs the connection the proxy broke off in the handshake.
        deadline = time.monotonic() + SETTLE
        while "TLS handshaking" not in (added := self.servers.dovecot.logText()[mark:]):
            if time.monotonic() > deadline:
                self.fail(f"Dovecot logged no broken handshake:\n{added}")
            time.sleep(0.05)
        self.assertIn("no auth attempts", added)
        self.assertNotIn("dovecot@example.org", added)
        self.assertNotIn("Login:", added)

    def test_backendResetsMidTransfer(self) -> None:
        """
        A backend that resets the connection in the middle of a FETCH: the
        client gets what was relayed, then the connection closes.
        """
        client = self.connect()
        reply = client.login("reset")
        self.assertTrue(reply.startswith(b"a OK "), reply)
        client.connection.sendall(b"f FETCH 1 BODY[]\r\n")
        data = client.rest()
        self.assertTrue(data.startswith(b"* 1 FETCH (BODY[] {"), data[:100])
        self.assertLessEqual(len(data), FETCH_SIZE)
        self.assertTidy()

    def assertOtherUnavailable(self, protocol: str, account: str) -> None:
        """
        A login over C{protocol} routed to C{account}'s backend gets that
        protocol's temporary failure; the session still works; then
        everything is tidy.
        """
        client = OtherClient(protocol, self.servers.ports[protocol])
        self.clients.append(client)  # type: ignore[arg-type]
        self.assertRegex(client.greeting, client.spec["greeting"])
        self.assertRegex(client.login(account), client.spec["unavailable"])
        self.assertRegex(client.command(client.spec["probe"]), client.spec["probed"])
        client.close()
        self.assertTidy()

    def test_otherProtocolsBackendNeverGreets(self) -> None:
        """
        POP3, ManageSieve and SMTP logins to a backend that never greets:
        each protocol's temporary failure.
        """
        for protocol in OTHER_PROTOCOLS:
            self.assertOtherUnavailable(protocol, "silent")

    def test_otherProtocolsEndlessCapabilities(self) -> None:
        """
        POP3, ManageSieve and SMTP logins to a backend whose capability
        list (CAPA, the greeting, the EHLO reply) never ends: each
        protocol's temporary failure, and the proxy does not collect the
        list without bound.
        """
        for protocol in OTHER_PROTOCOLS:
            self.assertOtherUnavailable(protocol, "capa")
        self.assertLess(_memoryGrowth(self.proxy.pid, self.rss), MEMORY_BOUND)

    # Client faults

    def test_clientResetsMidTransfer(self) -> None:
        """
        A client that resets its connection in the middle of a large FETCH:
        the session ends.
        """
        client = self.connect()
        self.assertTrue(client.login("good").startswith(b"a OK "))
        client.connection.sendall(b"f FETCH 1 BODY[]\r\n")
        self.assertTrue(client.line().startswith(b"* 1 FETCH"))
        client.connection.recv(100000)
        client.reset()
        self.assertTidy()

    def assertLastRepliesAfterHalfClose(self, client: Client) -> None:
        """
        C{client} sends C{NOOP} and C{LOGOUT} and half-closes: it gets
        both replies before the connection closes; then everything is tidy.
        """
        client.connection.sendall(b"b NOOP\r\nc LOGOUT\r\n")
        client.connection.shutdown(socket.SHUT_WR)
        self.assertEqual(
            client.rest(), b"b OK NOOP completed.\r\n* BYE Logging out\r\nc OK Logout completed.\r\n"
        )
        self.assertTidy()

    def test_clientHalfCloseAfterLogin(self) -> None:
        """
        A client that sends its last commands and half-closes gets every
        reply before the connection closes.
        """
        client = self.connect()
        self.assertTrue(client.login("good").startswith(b"a OK "))
        self.assertLastRepliesAfterHalfClose(client)

    def test_clientHalfCloseBeforeLogin(self) -> None:
        """
        A client that sends commands before login and half-closes gets
        every reply before the connection closes.
        """
        client = self.connect()
        self.assertLastRepliesAfterHalfClose(client)

    def test_clientNeverReadsAfterLogin(self) -> None:
        """
        A client that asks for a large FETCH and never reads: the proxy
        stops reading the backend instead of buffering the message, and
        tidies up once the client goes away.
        """
        client = self.connect()
        self.assertTrue(client.login("good").startswith(b"a OK "))
        backend = self.servers.backends["good"]
        backend.fetched = 0
        client.connection.sendall(b"f FETCH 1 BODY[]\r\n")
        time.sleep(3)
        # The kernel's socket buffers on the way take what they may (on
        # loopback, autotuned up to tcp_rmem's maximum, 32 MiB here); then
        # the flow stops for good, and the proxy's own memory stays flat.
        fetched = backend.fetched
        time.sleep(1)
        self.assertEqual(backend.fetched, fetched)
        self.assertLess(fetched, FETCH_SIZE)
        self.assertLess(_memoryGrowth(self.proxy.pid, self.rss), MEMORY_BOUND)
        client.reset()
        self.assertTidy()

    def test_clientNeverReadsBeforeLogin(self) -> None:
        """
        A client that sends commands without end and never reads the
        replies: the proxy stops reading (or closes) rather than buffer the
        replies without bound.
        """
        client = self.connect()
        client.connection.setblocking(False)
        command = b"a CAPABILITY\r\n" * 4096
        sent, deadline = 0, time.monotonic() + 3
        while time.monotonic() < deadline and sent < 64 * 1024 * 1024:
            try:
                sent += client.connection.send(command)
            except (ssl.SSLWantWriteError, BlockingIOError):
                time.sleep(0.01)
            except OSError:
                break
        # The socket buffers on the way hold a few MiB of commands; a proxy
        # that keeps reading takes them all (and buffers ten times as much
        # in replies).
        self.assertLess(sent, 24 * 1024 * 1024)
        self.assertLess(_memoryGrowth(self.proxy.pid, self.rss), MEMORY_BOUND)
        client.connection.setblocking(True)
        client.reset()
        self.assertTidy()

    def test_clientResetsInTLSHandshake(self) -> None:
        """
        A client that resets the connection before its TLS handshake ends:
        the session ends.
        """
        connection = socket.create_connection(("127.0.0.1", self.servers.imaps), CLIENT_TIMEOUT)
        connection.sendall(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00")
        _reset(connection)
        self.assertTidy()

    def test_clientIgnoresTLSClose(self) -> None:
        """
        A TLS client that logs out and then neither answers the proxy's
        close alert nor closes: the proxy finishes the close on its own, in
        bounded time rather than at the pre-auth timeout.
        """
        client = self.connect(tls=True)
        client.connection.settimeout(SETTLE)
        self.assertEqual(client.command(b"a", b"LOGOUT"), b"* BYE Logging out\r\na OK Logout completed.\r\n")
        self.assertEqual(client.rest(), b"")
        # The client holds its end open, silent, while the proxy tidies up.
        self.assertTidy()

    # Reload under load

    def test_reloadUnderLoad(self) -> None:
        """
        Reloading (SIGHUP) while sessions are relaying and logins arrive
        drops no session: each answers every command, and all are tidy
        afterwards.
        """
        clients = [self.connect() for _ in range(8)]
        for client in clients[:4]:
            self.assertTrue(client.login("good").startswith(b"a OK "))
        for round in range(3):
            os.kill(self.proxy.pid, signal.SIGHUP)
            for index, client in enumerate(clients):
                tag = b"n%d" % (round,)
                if index >= 4 and round == 0:
                    self.assertTrue(client.login("good").startswith(b"a OK "))
                self.assertEqual(client.command(tag, b"NOOP"), tag + b" OK NOOP completed.\r\n")
        self.assertEqual(len(self.sessions()), 8)
        for client in clients:
            client.close()
        self.assertTidy()


def authServer(server: FakeBackend, connection: socket.socket, record: bytearray) -> None:
    """
    An nginx-style auth server: routes C{good@...} to the "good" backend,
    never answers C{slow@...}, and breaks off its answer about
    C{raising@...} with a TCP RST.
    """
    request = bytearray()
    while b"\r\n\r\n" not in request:
        data = connection.recv(65536)
        if not data:
            return
        request += data
    record += request
    user = re.search(rb"(?im)^Auth-User: ([^\r\n]*)", bytes(request))
    name = user.group(1) if user else b""
    if name.startswith(b"slow@"):
        server.stopping.wait(60)
    elif name.startswith(b"raising@"):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nAuth-Sta")
        _reset(connection)
    else:
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nX-Mailproxy-Backend: good\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        )


class RouterFaultServers:
    """
    The proxy with the C{http} router asking an auth server in the test
    process, in front of a well-behaved backend.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.backend = FakeBackend(wellBehaved)
        self.auth = FakeBackend(authServer)
        ports: set[int] = set()
        while len(ports) < 2:
            ports.add(freePort())
        self.imap, self.admin = sorted(ports)
        config = (
            tomlTable("proxy", {"hostname": "proxy.example.org"})
            + tomlTable("limits", {"failure_delay": 0.1, "backend_timeout": BACKEND_TIMEOUT, "preauth_timeout": 30})
            + f'[[listener]]\nprotocol = "imap"\nendpoint = "tcp:{self.imap}:interface=127.0.0.1"\ntls = "none"\n'
            + tomlTable("router", {"type": "http", "url": f"http://127.0.0.1:{self.auth.port}/auth", "timeout": BACKEND_TIMEOUT})
            + tomlTable("backend.good", {"host": "127.0.0.1", "ports": {"imap": self.backend.port}, "forward": "none"})
            + tomlTable("admin", {"endpoint": f"tcp:{self.admin}:interface=127.0.0.1", "token_file": "admin.token"})
        )
        self.proxy = Proxy(str(self.directory / "proxy"), config)
        (self.proxy.directory / "admin.token").write_text(TOKEN + "\n")

    @classmethod
    def start(cls) -> RouterFaultServers:
        """
        Start the proxy, the auth server and the backend.
        """
        servers = cls(fixtureDirectory("router-faults"))
        try:
            servers.proxy.start([servers.imap, servers.admin])
            warmUp(servers.imap)
        except BaseException:
            servers.stop()
            raise
        return servers

    def stop(self) -> None:
        """
        Stop the proxy, the auth server and the backend.
        """
        self.proxy.stop()
        self.backend.stop()
        self.auth.stop()


class RouterFaultTests(TidyMixin, SynchronousTestCase):
    """
    A router that is down, slow or breaks off its answer: the login is a
    temporary failure, and nothing is left over.
    """

    def startServers(self) -> RouterFaultServers:
        return sharedFixture("router-faults", "router-faults", RouterFaultServers.start)

    def routerUnavailable(self, account: str) -> None:
        """
        A login as C{account} gets IMAP's temporary failure; the connection
        stays usable; then everything is tidy.
        """
        client = self.connect()
        self.assertRegex(client.login(account), UNAVAILABLE)
        self.assertEqual(client.command(b"b", b"NOOP"), b"b OK NOOP completed.\r\n")
        client.close()
        self.assertTidy()

    def test_routerWorks(self) -> None:
        """
        The auth server routes C{good} to the backend: the login works
        (the other rows fail for their fault, not for the set-up).
        """
        client = self.connect()
        self.assertTrue(client.login("good").startswith(b"a OK "))
        client.close()
        self.assertTidy()

    def test_routerSlow(self) -> None:
        """
        An auth server that never answers: C{NO [UNAVAILABLE]} after the
        router's timeout.
        """
        self.routerUnavailable("slow")

    def test_routerRaising(self) -> None:
        """
        An auth server that breaks off its answer with a reset (the
        router's HTTP client raises): C{NO [UNAVAILABLE]}.
        """
        self.routerUnavailable("raising")

    def test_routerDown(self) -> None:
        """
        An auth server that is down (nothing listens): C{NO
        [UNAVAILABLE]}.
        """
        auth = self.servers.auth
        auth.stop()
        try:
            self.routerUnavailable("good")
        finally:
            self.servers.auth = FakeBackend(authServer, port=auth.port)
