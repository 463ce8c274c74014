"""
Front ends on real loopback TLS connections: a client that does not read
its replies, and one that never answers the proxy's close alert.

The client is a TCP protocol driving its own OpenSSL connection in memory,
so the test decides what it sends and when it reads; the proxy listens as
it does in production (L{mailproxy.tap.listenerFactory}), with its timers
on a L{Clock} the test advances.
"""

from __future__ import annotations

from socket import IPPROTO_TCP, TCP_NODELAY
from typing import Any

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from mailproxy._relay import socketOf
from mailproxy._session import CLOSE_GRACE, ProxyContext
from mailproxy._tls import CertificateSource, makeSelfSigned, serverOptions
from mailproxy.config import Limits, Listener
from mailproxy.tap import listenerFactory
from mailproxy.testing import FakeRouter

from .test_backend_roundtrips import unackedSegments


class MemoryTLSClient(Protocol):
    """
    A TLS client whose OpenSSL connection runs in memory: it never sends a
    close alert, not even after receiving the server's.

    @ivar received: the application octets received so far.
    @ivar closeAlert: the server's close alert arrived.
    @ivar lost: fires when the TCP connection is gone.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.closeAlert = False
        self.tls: SSL.Connection | None = None
        self.handshakeDone = False
        self.pending: list[bytes] = []
        self.lost: Deferred[None] = Deferred()

    def startTLS(self) -> None:
        """
        Begin the handshake (at once for implicit TLS, after the STARTTLS
        reply otherwise).
        """
        self.tls = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        self.tls.set_connect_state()
        self._handshake()
        self._flush()

    def _handshake(self) -> None:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
        except SSL.WantReadError:
            return
        self.handshakeDone = True
        pending, self.pending = self.pending, []
        for data in pending:
            self.tls.sendall(data)

    def send(self, data: bytes) -> None:
        """
        Write C{data}, through TLS once it is on.
        """
        if self.tls is None:
            self.transport.write(data)
            return
        if not self.handshakeDone:
            self.pending.append(data)
            return
        self.tls.sendall(data)
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        if self.tls is None:
            self.received += data
            return
        self.tls.bio_write(data)
        if not self.handshakeDone:
            self._handshake()
        try:
            while True:
                self.received += self.tls.recv(65536)
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self.closeAlert = True
        self._flush()

    def _flush(self) -> None:
        assert self.tls is not None
        while True:
            try:
                data = self.tls.bio_read(65536)
            except SSL.WantReadError:
                return
            self.transport.write(data)

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class FrontendSocketTests(TestCase):
    """
    Pre-login sessions over real TLS connections.
    """

    @inlineCallbacks
    def connect(self, protocol: str, tls: str, limits: Limits | None = None) -> Any:
        """
        Listen as a proxy's C{protocol} listener in C{tls} mode and connect
        a L{MemoryTLSClient} (its handshake started for implicit TLS).

        @return: a Deferred firing with the client and the server's front
            end.
        """
        certificate, key = makeSelfSigned(_directory(self))
        self.clock = Clock()
        context = ProxyContext(
            reactor=self.clock,
            router=FakeRouter(),
            limits=limits or Limits(),
            hostname="proxy.test",
            serverTLS=serverOptions(CertificateSource(certificate, key)),
        )
        listener = Listener(protocol=protocol, endpoint="tcp:0", tls=tls)
        port = reactor.listenTCP(0, listenerFactory(context, listener), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = MemoryTLSClient()
        connected: Deferred[None] = Deferred()
        client.connectionMade = lambda: connected.callback(None)  # type: ignore[method-assign]
        reactor.connectTCP("127.0.0.1", port.getHost().port, ClientFactory.forProtocol(lambda: client))
        yield connected
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        if tls == "implicit":
            client.startTLS()
        while not context.sessions:
            yield deferLater(reactor, 0.01)
        (frontend,) = list(context.sessions)
        return client, frontend

    @inlineCallbacks
    def waitFor(self, condition: Any) -> Any:
        """
        Let the reactor run until C{condition()} is true.
        """
        while not condition():
            yield deferLater(reactor, 0.01)

    @inlineCallbacks
    def test_implicitTLSCloseAlertUnanswered(self) -> None:
        """
        After LOGOUT on implicit TLS the proxy sends BYE and its close
        alert; a client that keeps writing and never answers the alert has
        its connection ended CLOSE_GRACE seconds later, not at the pre-auth
        timeout.
        """
        client, _ = yield self.connect("imap", "implicit")
        yield self.waitFor(lambda: b"\r\n" in client.received)
        client.send(b"a LOGOUT\r\n")
        yield self.waitFor(lambda: client.closeAlert)
        self.assertIn(b"* BYE Logging out\r\na OK Logout completed.\r\n", bytes(client.received))
        client.send(b"b NOOP\r\n")
        self.assertFalse(client.lost.called)
        self.clock.advance(CLOSE_GRACE)
        yield client.lost

    test_implicitTLSCloseAlertUnanswered.timeout = 30  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_startTLSCloseAlertUnanswered(self) -> None:
        """
        The same after POP3 STLS and too many bad commands.
        """
        client, _ = yield self.connect("pop3", "starttls")
        yield self.waitFor(lambda: b"\r\n" in client.received)
        client.send(b"STLS\r\n")
        yield self.waitFor(lambda: client.received.endswith(b"+OK Begin TLS negotiation now.\r\n"))
        client.received.clear()
        client.startTLS()
        client.send(b"BOGUS\r\n" * 3)
        yield self.waitFor(lambda: client.closeAlert)
        self.assertEqual(bytes(client.received), b"-ERR Unknown command.\r\n" * 3 + b"-ERR Too many invalid commands.\r\n")
        client.send(b"NOOP\r\n")
        self.assertFalse(client.lost.called)
        self.clock.advance(CLOSE_GRACE)
        yield client.lost

    test_startTLSCloseAlertUnanswered.timeout = 30  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_implicitTLSFlood(self) -> None:
        """
        A TLS client that pipelines thousands of commands and does not read
        makes the proxy stop reading with its socket's buffer bounded; once
        it reads, every command is answered, in order.
        """
        client, frontend = yield self.connect("imap", "implicit")
        yield self.waitFor(lambda: b"\r\n" in client.received)
        client.received.clear()
        client.transport.pauseProducing()
        count = 100000
        client.send(b"".join(b"a%d NOOP\r\n" % n for n in range(count)))
        socket = socketOf(frontend.transport)
        assert socket is not None
        # The socket's buffer, and what TLS aggregates into one write.
        bound = socket.bufferSize + 65536

        def unsent() -> int:
            return len(socket.dataBuffer) + socket._tempDataLen

        yield self.waitFor(lambda: socket not in reactor.getReaders() or unsent() > bound)
        self.assertLessEqual(unsent(), bound)
        self.assertNotIn(socket, reactor.getReaders())
        client.transport.resumeProducing()
        last = b"a%d OK NOOP completed.\r\n" % (count - 1)
        yield self.waitFor(lambda: client.received.endswith(last))
        self.assertEqual(bytes(client.received), b"".join(b"a%d OK NOOP completed.\r\n" % n for n in range(count)))

    test_implicitTLSFlood.timeout = 60  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_noDelay(self) -> None:
        """
        Every listener kind sets C{TCP_NODELAY} on the client's connection
        (under the TLS layer too), so a small reply after the TLS handshake
        never waits for the client's delayed ACK, as nginx's do.
        """
        for protocol, tls in (("imap", "none"), ("pop3", "starttls"), ("smtp", "implicit"), ("sieve", "starttls")):
            _, frontend = yield self.connect(protocol, tls)
            descriptor = socketOf(frontend.transport)
            assert descriptor is not None
            noDelay = descriptor.socket.getsockopt(IPPROTO_TCP, TCP_NODELAY)  # type: ignore[attr-defined]
            self.assertTrue(noDelay, (protocol, tls))


    @inlineCallbacks
    def test_partCommandAcknowledged(self) -> None:
        """
        Before login, a read that leaves a command unfinished is
        acknowledged at once: a client under Nagle's algorithm holds the
        rest of a command it writes in parts (a LOGIN's literal apart from
        its CRLF) until that ACK, which Linux otherwise delays by 40 ms on
        a connection that has gone back and forth.
        """
        for protocol, tls, ask, answered in (
            ("imap", "none", b"a%d NOOP\r\n", b"OK NOOP completed.\r\n"),
            ("pop3", "implicit", b"CAPA\r\n", b"\r\n.\r\n"),
        ):
            client, frontend = yield self.connect(protocol, tls)
            yield self.waitFor(lambda: b"\r\n" in client.received)
            # Back and forth: the connection is interactive from then on.
            for n in range(6):
                client.received.clear()
                client.send(ask % n if b"%d" in ask else ask)
                yield self.waitFor(lambda: client.received.endswith(answered))
            unacked: list[int] = []
            read = frontend.dataReceived

            def checked(data: bytes) -> None:
                read(data)
                unacked.append(unackedSegments(client.transport.getHandle()))

            frontend.dataReceived = checked
            client.send(b"a LOGIN alice sec" if protocol == "imap" else b"USER ali")
            yield self.waitFor(lambda: unacked)
            self.assertEqual(unacked, [0], (protocol, tls))


def _directory(case: TestCase) -> str:
    import os

    path = case.mktemp()
    os.makedirs(path)
    return path
