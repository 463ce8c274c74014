"""
The relay on real loopback TCP connections, where plain legs are spliced
by the kernel (L{mailproxy._relay._Splicer}) instead of passing through
Python.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, ISSLTransport, ITCPTransport
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mailproxy import _relay, _tcp
from mailproxy._outcomes import EndReason
from mailproxy._relay import Relay
from mailproxy._tls import TLSLayerFactory, makeSelfSigned

from .test_backend_roundtrips import unackedSegments


class Collector(Protocol):
    """
    An outer peer: records what it receives and when it is closed.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: Deferred[None] = Deferred()
        self.ready: Deferred[Collector] = Deferred()

    def connectionMade(self) -> None:
        self.ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


@implementer(IHalfCloseableProtocol)
class HalfClosingCollector(Collector):
    """
    An outer peer that may go on sending after its peer half-closed.

    @ivar readClosed: the peer half-closed.
    """

    readClosed = False

    def readConnectionLost(self) -> None:
        self.readClosed = True

    def writeConnectionLost(self) -> None:
        pass


class LogoutPeer(HalfClosingCollector):
    """
    An outer backend that answers a client's half-close: once the proxy
    tells it nothing more comes, it says goodbye and closes.
    """

    def readConnectionLost(self) -> None:
        self.transport.write(b"* BYE Logging out\r\nb OK Logout completed.\r\n")
        self.transport.loseConnection()


class ByeOnLogout(HalfClosingCollector):
    """
    An outer backend that answers C{b LOGOUT} with its goodbye and closes,
    as Dovecot does.
    """

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if bytes(self.received).endswith(b"b LOGOUT\r\n"):
            self.transport.write(LOGOUT_REPLY)
            self.transport.loseConnection()


@implementer(IHandshakeListener)
class Inner(Protocol):
    """
    The proxy's side of a leg, as the front end and backend protocols are
    after hand-over: data, half-close and close go to the relay.
    """

    relay: Relay | None = None
    lost: Deferred[None]
    handshake: Deferred[None]

    def connectionMade(self) -> None:
        self.lost = Deferred()
        self.handshake = Deferred()
        self.factory.inner.callback(self)

    def handshakeCompleted(self) -> None:
        self.handshake.callback(None)

    def halfClosed(self) -> None:
        raise AssertionError("not relaying")

    def readConnectionLost(self) -> None:
        self.halfClosed()

    def writeConnectionLost(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        raise AssertionError("the relay must take over reading")

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


@inlineCallbacks
def tlsBackendLeg(port: int):  # type: ignore[no-untyped-def]
    """
    The proxy's leg to the TLS backend listening on C{port}, once the
    proxy's side of the handshake is done.
    """
    factory = ClientFactory.forProtocol(Inner)
    factory.inner = Deferred()
    reactor.connectTCP("127.0.0.1", port, factory)
    inner = yield factory.inner
    inner.transport.startTLS(CertificateOptions())
    yield inner.handshake
    return inner


class SplicedRelayTests(TestCase):
    """
    Bytes and closes cross a relay of two plain TCP connections.
    """

    def setUp(self) -> None:
        # About the splicer itself: splice from the start.
        self.patch(_relay, "SPLICE_AFTER", 0)

    @inlineCallbacks
    def leg(self, outer: Collector | None = None, atOnce: bool = False):
        """
        A loopback TCP connection: (outer C{outer} or a new Collector,
        inner Inner); the inner one on the proxy's transport if C{atOnce}
        (L{_tcp.listenAtOnce}).
        """
        serverFactory = Factory.forProtocol(Inner)
        serverFactory.inner = Deferred()
        port = reactor.listenTCP(0, serverFactory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        if atOnce:
            _tcp.listenAtOnce(port)
        outer = outer or Collector()
        clientFactory = ClientFactory.forProtocol(lambda: outer)
        reactor.connectTCP("127.0.0.1", port.getHost().port, clientFactory)
        yield outer.ready
        inner = yield serverFactory.inner
        self.addCleanup(lambda: outer.transport.abortConnection() if outer.transport.connected else None)
        return outer, inner

    @inlineCallbacks
    def relayed(
        self, toClient: bytes = b"", toBackend: bytes = b"", backend: Collector | None = None, client: Collector | None = None
    ):
        self.client, self.clientInner = yield self.leg(client)
        self.backend, self.backendInner = yield self.leg(backend)
        self.join(toClient, toBackend)

    def join(
        self,
        toClient: bytes = b"",
        toBackend: bytes = b"",
        clock: object = reactor,
        onEnd: Callable[[Relay], None] | None = None,
        idleTimeout: float = 60,
    ) -> None:
        """
        Relay L{clientInner} and L{backendInner} as a session does after
        its login reply, with C{clock} for its timers and C{idleTimeout};
        C{onEnd} (by default L{ended}'s C{append}) is told of the end.
        """
        self.ended = []
        self.relay = Relay(
            self.clientInner.transport, self.backendInner.transport, clock, idleTimeout, onEnd or self.ended.append
        )
        for inner, method in ((self.clientInner, "fromClient"), (self.backendInner, "fromBackend")):
            inner.dataReceived = getattr(self.relay, method)
        self.clientInner.connectionLost = lambda reason=None: (self.relay.clientLost(), Inner.connectionLost(self.clientInner))
        self.backendInner.connectionLost = lambda reason=None: (self.relay.backendLost(), Inner.connectionLost(self.backendInner))
        self.clientInner.halfClosed = self.relay.clientHalfClosed
        self.backendInner.halfClosed = self.relay.backendHalfClosed
        # As after a login: the proxy's reply is still in Twisted's buffer.
        self.clientInner.transport.write(b"a OK Logged in\r\n")
        self.relay.start(toClient=toClient, toBackend=toBackend)

    @inlineCallbacks
    def test_bulkBothWays(self) -> None:
        """
        Several megabytes each way arrive intact and in order, after the
        login reply and the early bytes, and are counted.
        """
        yield self.relayed(toClient=b"* 1 EXISTS\r\n", toBackend=b"b SELECT INBOX\r\n")
        self.assertIsNotNone(self.relay._splicer, "plain legs should be spliced")
        down = os.urandom(3 * 1024 * 1024)
        up = os.urandom(2 * 1024 * 1024)
        self.backend.transport.write(down)
        self.client.transport.write(up)
        while len(self.backend.received) < len(b"b SELECT INBOX\r\n" + up):
            yield deferLater(reactor, 0.01)
        self.assertEqual(bytes(self.backend.received), b"b SELECT INBOX\r\n" + up)
        # Closed once the client has sent everything: closing a socket with
        # unread input resets it, and a reset can destroy what the peer had
        # received but not yet read.
        self.backend.transport.loseConnection()
        yield self.client.closed
        self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\n* 1 EXISTS\r\n" + down)
        yield self.clientInner.lost
        yield self.backendInner.lost
        self.assertEqual(self.relay.endReason, "backend closed")
        self.assertEqual(self.relay.bytesFromBackend, len(down) + len(b"* 1 EXISTS\r\n"))

    @inlineCallbacks
    def test_clientCloseClosesBackend(self) -> None:
        """
        When the client closes, what it sent reaches the backend, and the
        backend connection is closed.
        """
        yield self.relayed()
        self.client.transport.write(b"z LOGOUT\r\n")
        self.client.transport.loseConnection()
        yield self.backend.closed
        self.assertEqual(bytes(self.backend.received), b"z LOGOUT\r\n")
        yield self.clientInner.lost
        self.assertEqual(self.relay.endReason, "client closed")

    @inlineCallbacks
    def test_stopFromOutside(self) -> None:
        """
        Stopping the relay (a dropped session) gives the sockets back to
        Twisted, so a goodbye written afterwards still reaches the client.
        """
        yield self.relayed()

        def goodbye(relay: Relay) -> None:
            self.clientInner.transport.write(b"* BYE moved\r\n")

        self.relay._onEnd = goodbye
        self.relay.stop(EndReason.DROPPED)
        yield self.client.closed
        yield self.backend.closed
        self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\n* BYE moved\r\n")


class SpliceHandOverTests(TestCase):
    """
    The hand-over from Twisted to the splicer, and back, in the cases that
    do not fit the common path.
    """

    timeout = 15
    leg = SplicedRelayTests.leg
    relayed = SplicedRelayTests.relayed
    join = SplicedRelayTests.join
    setUp = SplicedRelayTests.setUp

    @inlineCallbacks
    def test_largeEarlyBytes(self) -> None:
        """
        With more early bytes than the splicer takes at once, the relay
        stays in Python and nothing Twisted had not yet written is lost:
        the login reply still reaches the client first.
        """
        pipelined = b"b APPEND INBOX {40000+}\r\n" + b"x" * 40000 + b"\r\n"
        yield self.relayed(toBackend=pipelined)
        self.backend.transport.write(b"b OK appended\r\n")
        while len(self.backend.received) < len(pipelined):
            yield deferLater(reactor, 0.01)
        self.backend.transport.loseConnection()
        yield self.client.closed
        self.assertEqual(bytes(self.backend.received), pipelined)
        self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\nb OK appended\r\n")

    @inlineCallbacks
    def test_smallPipes(self) -> None:
        """
        Pipes smaller than the early bytes (an unprivileged process past
        C{/proc/sys/fs/pipe-user-pages-soft} gets 8 KiB pipes) lose nothing.
        """
        self.patch(_relay, "SPLICE_PIPE_SIZE", 4096)
        self.patch(_relay, "_pipes", _relay._PipePool())
        pipelined = b"b NOOP\r\n" * 1250
        yield self.relayed(toBackend=pipelined)
        while len(self.backend.received) < len(pipelined):
            yield deferLater(reactor, 0.01)
        self.backend.transport.write(b"b OK done\r\n")
        self.backend.transport.loseConnection()
        yield self.client.closed
        self.assertEqual(bytes(self.backend.received), pipelined)
        self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\nb OK done\r\n")

    @inlineCallbacks
    def test_clientResetBeforeHandOver(self) -> None:
        """
        A client that reset its connection while its login ran (reading was
        paused, so nobody noticed) ends the relay at the hand-over: both
        connections close and the pipes are closed.
        """
        self.client, self.clientInner = yield self.leg()
        self.backend, self.backendInner = yield self.leg()
        # Reading from the client pauses during a login.
        self.clientInner.transport.pauseProducing()
        self.client.transport.abortConnection()
        fd = self.clientInner.transport.fileno()
        while not select.select([fd], [], [], 0)[0]:
            yield deferLater(reactor, 0.01)
        # A pool of its own: pipes pooled by earlier tests would be reused.
        self.patch(_relay, "_pipes", _relay._PipePool())
        ended: list[Relay] = []
        relay = Relay(self.clientInner.transport, self.backendInner.transport, reactor, 60, ended.append)
        self.clientInner.connectionLost = lambda reason=None: (relay.clientLost(), Inner.connectionLost(self.clientInner))
        self.backendInner.connectionLost = lambda reason=None: (relay.backendLost(), Inner.connectionLost(self.backendInner))
        self.clientInner.transport.write(b"a OK Logged in\r\n")
        pipes: list[int] = []
        realPipe = os.pipe2

        def pipe2(flags: int) -> tuple[int, int]:
            ends = realPipe(flags)
            pipes.extend(ends)
            return ends

        self.patch(os, "pipe2", pipe2)
        relay.start()
        yield self.clientInner.lost
        yield self.backendInner.lost
        self.assertEqual(relay.endReason, "connection reset")
        # Every pipe made is closed, or empty and back in the shared pool.
        pooled = {fd for pipe in _relay._pipes._free for fd in (pipe.read, pipe.write)}
        self.assertTrue(pipes)
        for end in pipes:
            if end not in pooled:
                self.assertRaises(OSError, os.fstat, end)

    @inlineCallbacks
    def test_clientClosingAtHandOver(self) -> None:
        """
        A client connection already being closed (the session was dropped
        while its login ran) is not taken over: it still closes, and the
        backend with it.
        """
        self.client, self.clientInner = yield self.leg()
        self.backend, self.backendInner = yield self.leg()
        relay = Relay(self.clientInner.transport, self.backendInner.transport, reactor, 60, lambda relay: None)
        self.clientInner.dataReceived = relay.fromClient
        self.backendInner.dataReceived = relay.fromBackend
        self.clientInner.connectionLost = lambda reason=None: (relay.clientLost(), Inner.connectionLost(self.clientInner))
        self.backendInner.connectionLost = lambda reason=None: (relay.backendLost(), Inner.connectionLost(self.backendInner))
        self.clientInner.transport.write(b"* BYE dropped\r\n")
        self.clientInner.transport.loseConnection()
        self.clientInner.transport.write(b"a OK Logged in\r\n")
        relay.start()
        yield self.clientInner.lost
        yield self.backendInner.lost
        yield self.client.closed
        self.assertEqual(bytes(self.client.received), b"* BYE dropped\r\na OK Logged in\r\n")


LOGOUT_REPLY = b"* BYE Logging out\r\nb OK Logout completed.\r\n"


class DeferredSpliceTests(TestCase):
    """
    A plain session is relayed in Python until it has moved
    L{_relay.SPLICE_AFTER} octets, then spliced.
    """

    timeout = 20
    leg = SplicedRelayTests.leg
    relayed = SplicedRelayTests.relayed
    join = SplicedRelayTests.join

    def countSplices(self) -> list[int]:
        """
        Count the C{splice(2)} calls from now on.

        @return: a list that gets one entry per call.
        """
        calls: list[int] = []
        realSplice = os.splice

        def splice(*args: object, **kwargs: object) -> int:
            calls.append(1)
            return realSplice(*args, **kwargs)

        self.patch(os, "splice", splice)
        return calls

    @inlineCallbacks
    def test_shortSessionNotSpliced(self) -> None:
        """
        A logout (a few dozen octets each way) is relayed without a single
        C{splice(2)} call, and the client gets the login reply, then the
        backend's reply, then the close.
        """
        _relay._spliceWorks()
        splices = self.countSplices()
        yield self.relayed(backend=LogoutPeer())
        yield HalfCloseTests.plainClientLogsOut(self)
        self.assertEqual(bytes(self.backend.received), b"b LOGOUT\r\n")
        self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\n" + LOGOUT_REPLY)
        self.assertEqual(self.relay.endReason, "client closed")
        self.assertEqual(len(splices), 0)

    @inlineCallbacks
    def test_longSessionSpliced(self) -> None:
        """
        A session that moves more than L{_relay.SPLICE_AFTER} octets is then
        spliced, and what Twisted held unsent for the client at the switch
        (a client slow to read) reaches it in order, before the rest.
        """
        yield self.relayed(toClient=b"* 1 EXISTS\r\n")
        self.assertIsNone(self.relay._splicer)
        # The client does not read and the proxy's socket towards it takes
        # little: Twisted holds most of what the relay writes to it.
        self.client.transport.pauseProducing()
        self.clientInner.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        taken: list[int] = []
        realTake = _relay._takeUnsent

        def takeUnsent(connection: object) -> bytes:
            data = realTake(connection)
            taken.append(len(data))
            return data

        self.patch(_relay, "_takeUnsent", takeUnsent)
        splices = self.countSplices()
        down = os.urandom(3 * 1024 * 1024)
        self.backend.transport.write(down)
        while self.relay._splicer is None:
            yield deferLater(reactor, 0.01)
        self.assertGreater(sum(taken), 0)
        self.client.transport.resumeProducing()
        self.client.transport.write(b"b LOGOUT\r\n")
        while len(self.backend.received) < len(b"b LOGOUT\r\n"):
            yield deferLater(reactor, 0.01)
        self.backend.transport.loseConnection()
        yield self.client.closed
        self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\n* 1 EXISTS\r\n" + down)
        self.assertEqual(bytes(self.backend.received), b"b LOGOUT\r\n")
        self.assertGreater(len(splices), 0)
        self.assertEqual(self.relay.bytesFromBackend, len(b"* 1 EXISTS\r\n") + len(down))


class BlockingTLS:
    """
    TLS over a blocking socket, in a thread of its own, with Python's own
    TLS (not the code under test): it can send its close_notify and go on
    reading, as a half-closing client or server does.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, serverSide: bool, serverName: str | None = None) -> None:
        sock.settimeout(10)
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=serverSide, server_hostname=serverName)

    def _send(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _step(self, operation):
        while True:
            try:
                result = operation()
            except ssl.SSLWantReadError:
                self._send()
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError()
                self.incoming.write(data)
            else:
                self._send()
                return result

    def handshake(self) -> None:
        self._step(self.tls.do_handshake)

    def write(self, data: bytes) -> None:
        self._step(lambda: self.tls.write(data))

    def closeNotify(self) -> None:
        """
        Send our close_notify without waiting for the peer's.
        """
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self._send()

    def read(self) -> bytes:
        """
        What the peer sent next; C{b""} once it sent its close_notify or
        the connection ended.
        """
        try:
            return self._step(lambda: self.tls.read(65536))
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError, EOFError, ConnectionResetError):
            return b""

    def readAll(self) -> bytes:
        """
        Everything until the peer's close_notify or the connection's end.
        """
        received = b""
        while chunk := self.read():
            received += chunk
        return received


class HalfCloseTests(TestCase):
    """
    A side that half-closes (a client's C{b LOGOUT} then C{shutdown(SHUT_WR)}
    or TLS close_notify) still gets the other side's last words, on
    spliced, plain and TLS legs.
    """

    timeout = 20
    leg = SplicedRelayTests.leg
    relayed = SplicedRelayTests.relayed
    join = SplicedRelayTests.join

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        certificate, key = makeSelfSigned(directory)
        with open(certificate) as c, open(key) as k:
            self.serverOptions = PrivateCertificate.loadPEM(c.read() + k.read()).options()
        self.serverContext = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.serverContext.load_cert_chain(certificate, key)
        self.clientContext = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.clientContext.check_hostname = False
        self.clientContext.verify_mode = ssl.CERT_NONE

    @inlineCallbacks
    def plainClientLogsOut(self, alreadySent: bool = False):
        """
        The client sends C{b LOGOUT} and half-closes (unless it did
        already); wait for its connection to end, and for the relay's.
        """
        if not alreadySent:
            self.client.transport.write(b"b LOGOUT\r\n")
            self.client.transport.loseWriteConnection()
        yield self.client.closed
        yield self.clientInner.lost
        yield self.backendInner.lost

    @inlineCallbacks
    def tlsClientLeg(self, talk: Callable[[BlockingTLS], bytes]):
        """
        A blocking TLS client, in a thread, connected to a listening TLS
        port (with the TLS layer of the proxy's listeners); wait for its handshake (L{clientInner} is then the proxy's
        side). The client waits for C{go} before it calls C{talk}, so that
        the relay is joined first.

        @return: (C{go}, a Deferred that fires with what C{talk} returns).
        """
        serverFactory = Factory.forProtocol(Inner)
        serverFactory.inner = Deferred()
        port = reactor.listenTCP(0, TLSLayerFactory(self.serverOptions, False, serverFactory), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        go = threading.Event()
        self.addCleanup(go.set)

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", port.getHost().port)) as sock:
                tls = BlockingTLS(sock, self.clientContext, serverSide=False)
                tls.handshake()
                go.wait(10)
                return talk(tls)

        received = deferToThread(client)
        self.clientInner = yield serverFactory.inner
        yield self.clientInner.handshake
        return go, received

    @inlineCallbacks
    def test_spliced(self) -> None:
        """
        On spliced legs, the backend learns of the client's half-close
        after its LOGOUT, and its reply reaches the client before the
        close.
        """
        self.patch(_relay, "SPLICE_AFTER", 0)
        yield self.relayed(backend=LogoutPeer())
        self.assertIsNotNone(self.relay._splicer)
        yield self.plainClientLogsOut()
        self.assertEqual(bytes(self.backend.received), b"b LOGOUT\r\n")
        self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\n" + LOGOUT_REPLY)
        self.assertEqual(self.relay.endReason, "client closed")

    @inlineCallbacks
    def test_plainNotSpliced(self) -> None:
        """
        The same on plain legs relayed by Twisted (no splice).
        """
        self.patch(_relay, "_spliceChecked", False)
        yield self.relayed(backend=LogoutPeer())
        self.assertIsNone(self.relay._splicer)
        yield self.plainClientLogsOut()
        self.assertEqual(bytes(self.backend.received), b"b LOGOUT\r\n")
        self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\n" + LOGOUT_REPLY)
        self.assertEqual(self.relay.endReason, "client closed")

    @inlineCallbacks
    def test_halfCloseableByClass(self) -> None:
        """
        At hand-over both legs' protocols become half-closeable through
        their class (one subclass per protocol class, of the same name),
        not through a declaration made for each: a relayed session, idle
        for hours maybe, holds no interface declaration of its own.
        """
        self.patch(_relay, "_spliceChecked", False)
        classes = set()
        for _ in range(2):
            yield self.relayed(backend=LogoutPeer())
            for inner in (self.clientInner, self.backendInner):
                self.assertTrue(IHalfCloseableProtocol.providedBy(inner))
                self.assertNotIn("__provides__", vars(inner))
                self.assertIsInstance(inner, Inner)
                self.assertEqual(type(inner).__name__, "Inner")
                classes.add(type(inner))
            yield self.plainClientLogsOut()
            self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\n" + LOGOUT_REPLY)
        self.assertEqual(len(classes), 1)

    @inlineCallbacks
    def test_legsLookedUpOnce(self) -> None:
        """
        Starting a relay finds each leg's socket under its wrappers once
        (for the TLS layers' flush, the splice check, the half-close and
        the read size together), and asks zope whether a protocol class is
        half-closeable only the first time it meets the class.
        """
        self.patch(_relay, "_spliceChecked", False)
        lookups: list[object] = []
        socketOf = _relay.socketOf

        def counting(transport: object) -> object:
            lookups.append(transport)
            return socketOf(transport)

        self.patch(_relay, "socketOf", counting)
        # The class is met once before, by another relay.
        yield self.relayed(backend=LogoutPeer())
        yield self.plainClientLogsOut()
        asked: list[type] = []
        implementedBy = IHalfCloseableProtocol.implementedBy
        self.patch(IHalfCloseableProtocol, "implementedBy", lambda cls: asked.append(cls) or implementedBy(cls))
        self.client, self.clientInner = yield self.leg()
        self.backend, self.backendInner = yield self.leg(LogoutPeer())
        del lookups[:]
        self.join()
        self.assertEqual(lookups, [self.clientInner.transport, self.backendInner.transport])
        self.assertEqual(asked, [])
        yield self.plainClientLogsOut()
        self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\n" + LOGOUT_REPLY)

    @inlineCallbacks
    def test_endedAfterBothClosed(self) -> None:
        """
        Once both sides have half-closed (the backend's goodbye and FIN,
        then the client's FIN), both connections are closed before the
        relay reports its end: a plain client is gone by then, and a
        session has no close of its own to see through (no timer).
        """
        self.patch(_relay, "_spliceChecked", False)
        self.client, self.clientInner = yield self.leg(HalfClosingCollector(), atOnce=True)
        self.backend, self.backendInner = yield self.leg(HalfClosingCollector())
        clientGone: list[bool] = []
        self.join(onEnd=lambda relay: clientGone.append(relay.clientGone))
        self.backend.transport.write(b"* BYE Logging out\r\n")
        self.backend.transport.loseWriteConnection()
        while not self.client.readClosed:
            yield deferLater(reactor, 0.01)
        self.client.transport.loseWriteConnection()
        yield self.clientInner.lost
        yield self.backendInner.lost
        self.assertEqual(clientGone, [True])
        self.assertEqual(self.relay.endReason, "backend closed")
        self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\n* BYE Logging out\r\n")

    @inlineCallbacks
    def test_backendHalfCloses(self) -> None:
        """
        A backend that says goodbye and half-closes still gets what the
        client sends afterwards, spliced or not.
        """
        self.patch(_relay, "SPLICE_AFTER", 0)
        for splice in (None, False):
            self.patch(_relay, "_spliceChecked", splice)
            yield self.relayed(client=HalfClosingCollector())
            self.backend.transport.write(b"* BYE going away\r\n")
            self.backend.transport.loseWriteConnection()
            while not self.client.readClosed:
                yield deferLater(reactor, 0.01)
            self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\n* BYE going away\r\n")
            self.client.transport.write(b"c LOGOUT\r\n")
            self.client.transport.loseConnection()
            yield self.backend.closed
            yield self.backendInner.lost
            self.assertEqual(bytes(self.backend.received), b"c LOGOUT\r\n")
            self.assertEqual(self.relay.endReason, "backend closed")

    @inlineCallbacks
    def test_tlsClient(self) -> None:
        """
        A TLS client that sends C{b LOGOUT} and its close_notify gets the
        backend's reply, then the proxy's close_notify.
        """

        def talk(tls: BlockingTLS) -> bytes:
            tls.write(b"b LOGOUT\r\n")
            tls.closeNotify()
            return tls.readAll()

        go, received = yield self.tlsClientLeg(talk)
        self.backend, self.backendInner = yield self.leg(LogoutPeer())
        self.join()
        go.set()
        received = yield received
        self.assertEqual(received, b"a OK Logged in\r\n" + LOGOUT_REPLY)
        self.assertEqual(bytes(self.backend.received), b"b LOGOUT\r\n")
        yield self.clientInner.lost
        yield self.backendInner.lost
        self.assertEqual(self.relay.endReason, "client closed")

    @inlineCallbacks
    def test_tlsDeclaredOncePerKind(self) -> None:
        """
        At hand-over a TLS layer, whose interfaces are declared on the
        instance (those of its transport), provides the half-close too,
        with the same declaration for every connection of its kind, worked
        out once: the second session's relay does not run zope's
        declaration machinery again. Both still get the backend's reply.
        """
        self.patch(_relay, "_halfCloseableDeclarations", {})
        declared: list[object] = []
        alsoProvides = _relay.alsoProvides
        self.patch(_relay, "alsoProvides", lambda *args: (declared.append(args[0]), alsoProvides(*args)))

        def talk(tls: BlockingTLS) -> bytes:
            tls.write(b"b LOGOUT\r\n")
            tls.closeNotify()
            return tls.readAll()

        layers = []
        for _ in range(2):
            go, received = yield self.tlsClientLeg(talk)
            self.backend, self.backendInner = yield self.leg(LogoutPeer())
            self.join()
            layer = self.clientInner.transport
            self.assertTrue(IHalfCloseableProtocol.providedBy(layer))
            self.assertTrue(ISSLTransport.providedBy(layer))
            self.assertTrue(ITCPTransport.providedBy(layer))
            layers.append(layer)
            go.set()
            self.assertEqual((yield received), b"a OK Logged in\r\n" + LOGOUT_REPLY)
            yield self.clientInner.lost
            yield self.backendInner.lost
        self.assertEqual(len(declared), 1)
        self.assertIs(vars(layers[0])["__provides__"], vars(layers[1])["__provides__"])

    @inlineCallbacks
    def test_backendClosesToTLSClient(self) -> None:
        """
        A backend that closes after its goodbye has that passed on to a TLS
        client at once (no timer needed): a client that waits for the
        server's close after its LOGOUT is not kept waiting.
        """

        def talk(tls: BlockingTLS) -> bytes:
            tls.write(b"b LOGOUT\r\n")
            try:
                return tls.readAll()
            except socket.timeout:
                return b"(no close within the socket timeout)"

        go, received = yield self.tlsClientLeg(talk)
        self.backend, self.backendInner = yield self.leg(ByeOnLogout())
        # A clock that never moves: nothing may wait for a timer.
        self.join(clock=Clock())
        go.set()
        received = yield received
        self.assertEqual(received, b"a OK Logged in\r\n" + LOGOUT_REPLY)
        yield self.clientInner.lost
        yield self.backendInner.lost

    @inlineCallbacks
    def test_tlsBackend(self) -> None:
        """
        A plain client's half-close reaches a TLS backend as a close_notify
        after the client's LOGOUT, L{_relay.TLS_HALF_CLOSE_DELAY} later,
        and the backend's reply (sent after it) still reaches the client.
        """
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)

        def backend() -> bytes:
            sock, _ = listener.accept()
            with sock:
                tls = BlockingTLS(sock, self.serverContext, serverSide=True)
                tls.handshake()
                received = tls.readAll()
                tls.write(LOGOUT_REPLY)
                tls.closeNotify()
                return received

        backendReceived = deferToThread(backend)
        self.client, self.clientInner = yield self.leg()
        self.backendInner = yield tlsBackendLeg(listener.getsockname()[1])
        clock = Clock()
        self.join(clock=clock)
        self.client.transport.write(b"b LOGOUT\r\n")
        self.client.transport.loseWriteConnection()
        while len(clock.getDelayedCalls()) < 3:
            yield deferLater(reactor, 0.01)
        # The half-close waits for its delay (beside the idle check and the
        # release of the TLS buffers).
        delays = sorted(call.getTime() for call in clock.getDelayedCalls())
        self.assertEqual(delays, [_relay.TLS_HALF_CLOSE_DELAY, _relay.TLS_BUFFERS_QUIET, 60])
        clock.advance(_relay.TLS_HALF_CLOSE_DELAY)
        yield self.plainClientLogsOut(alreadySent=True)
        self.assertEqual((yield backendReceived), b"b LOGOUT\r\n")
        self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\n" + LOGOUT_REPLY)
        self.assertEqual(self.relay.endReason, "client closed")


class Answerer(Collector):
    """
    An outer backend that answers every complete line at once.
    """

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        while b"\n" in self.received:
            line, _, rest = bytes(self.received).partition(b"\n")
            self.received[:] = rest
            self.transport.write(line.split(b" ", 1)[0] + b" OK done\r\n")


class PartialCommandTests(TestCase):
    """
    The relay acknowledges each client read at once, so that a client
    under Nagle's algorithm that writes a command in parts (Python's
    imaplib sends an APPEND's literal and its final CRLF apart) never
    waits for the kernel's delayed ACK: the backend answers nothing before
    the command's end, and the client would hold that end for 40 ms.
    """

    timeout = 20
    leg = SplicedRelayTests.leg
    relayed = SplicedRelayTests.relayed
    join = SplicedRelayTests.join

    @inlineCallbacks
    def exchange(self, count: int):
        """
        C{count} commands and answers, which makes the proxy's socket
        towards the client interactive: Linux then delays its ACKs.
        """
        for n in range(count):
            answer = b"a%d OK done\r\n" % n
            self.client.transport.write(b"a%d NOOP\r\n" % n)
            while not bytes(self.client.received).endswith(answer):
                yield deferLater(reactor, 0.001)

    @inlineCallbacks
    def assertAcknowledged(self, hook: Callable[[Callable[[], None]], None]):
        """
        Send the first part of a command; C{hook} is given what checks,
        right after the proxy's read of it, that the client's socket has
        nothing unacknowledged.
        """
        unacked: list[int] = []
        hook(lambda: unacked.append(unackedSegments(self.client.transport.getHandle())))
        self.client.transport.write(b"b APPEND INBOX {6}\r\nSubjec")
        while not unacked:
            yield deferLater(reactor, 0.001)
        self.assertEqual(unacked, [0])
        self.client.transport.write(b"t\r\n")
        while not bytes(self.client.received).endswith(b"b OK done\r\n"):
            yield deferLater(reactor, 0.001)

    @inlineCallbacks
    def test_python(self) -> None:
        """
        Relayed in Python (a short session, before any splice).
        """
        yield self.relayed(backend=Answerer())
        yield self.exchange(6)
        self.assertIsNone(self.relay._splicer)

        def hook(check: Callable[[], None]) -> None:
            def fromClient(data: bytes) -> None:
                self.relay.fromClient(data)
                check()

            self.clientInner.dataReceived = fromClient

        yield self.assertAcknowledged(hook)

    @inlineCallbacks
    def test_spliced(self) -> None:
        """
        Relayed by the kernel (splice).
        """
        self.patch(_relay, "SPLICE_AFTER", 0)
        yield self.relayed(backend=Answerer())
        yield self.exchange(6)
        splicer = self.relay._splicer
        assert splicer is not None

        def hook(check: Callable[[], None]) -> None:
            readable = splicer.readable

            def checked(end: object) -> None:
                readable(end)  # type: ignore[arg-type]
                if end is splicer.client:
                    check()

            splicer.readable = checked  # type: ignore[method-assign]

        yield self.assertAcknowledged(hook)


class AfterEndTests(TestCase):
    """
    Once a relay has ended (a drop, the idle timeout, a side's close),
    nothing more crosses it, and the connections it closes are gone in
    bounded time.
    """

    timeout = 20
    leg = SplicedRelayTests.leg
    join = SplicedRelayTests.join
    setUp = HalfCloseTests.setUp
    tlsClientLeg = HalfCloseTests.tlsClientLeg

    @inlineCallbacks
    def test_tlsClientAfterDrop(self) -> None:
        """
        A TLS client is still read after the relay was stopped (its
        connection waits for the client's close_notify), but what it says
        then does not reach the backend, and no timer of the relay is
        started again.
        """
        self.patch(_relay, "_spliceChecked", False)
        dropped = threading.Event()

        def talk(tls: BlockingTLS) -> bytes:
            tls.write(b"a APPEND INBOX {100000}\r\n" + b"m" * 100000 + b"\r\n")
            dropped.wait(10)
            tls.write(b"z DELETE INBOX\r\n")
            return tls.readAll()

        go, received = yield self.tlsClientLeg(talk)
        self.backend, self.backendInner = yield self.leg()
        # The backend reads slowly: the backend's connection is still open,
        # its buffer not sent, when the client's next command comes.
        self.backend.transport.pauseProducing()
        self.backend.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.backendInner.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        clock = Clock()
        self.join(clock=clock)
        go.set()
        while self.relay.bytesFromClient < 100000:
            yield deferLater(reactor, 0.01)
        self.relay.stop(EndReason.DROPPED, "account moved")
        dropped.set()
        # The client's command was read before its connection's end.
        yield received
        yield self.clientInner.lost
        self.backend.transport.resumeProducing()
        yield self.backend.closed
        got = bytes(self.backend.received)
        self.assertTrue(got.startswith(b"a APPEND INBOX {100000}\r\n"))
        self.assertNotIn(b"z DELETE INBOX", got)
        self.assertNotIn(self.relay._releaseBuffers, [call.func for call in clock.getDelayedCalls()])

    @inlineCallbacks
    def halfClosedSilence(self, splice: bool):
        """
        A client that says C{b LOGOUT} and half-closes, to a backend that
        neither answers nor closes, with an idle timeout of half an hour;
        relayed in Python, or spliced if C{splice}. The relay's clock
        then moves L{_relay.HALF_CLOSED_IDLE} on: both connections must
        be closed (the client sees its end).
        """
        if splice:
            self.patch(_relay, "SPLICE_AFTER", 0)
        else:
            self.patch(_relay, "_spliceChecked", False)
        self.client, self.clientInner = yield self.leg(atOnce=True)
        # Told of the client's half-close, it does not close.
        self.backend, self.backendInner = yield self.leg(HalfClosingCollector())
        clock = Clock()
        self.join(clock=clock, idleTimeout=1800)
        self.assertEqual(self.relay._splicer is not None, splice)
        self.client.transport.write(b"b LOGOUT\r\n")
        self.client.transport.loseWriteConnection()
        while not self.backend.readClosed:
            yield deferLater(reactor, 0.01)
        clock.advance(_relay.HALF_CLOSED_IDLE)
        self.assertEqual(self.relay.endReason, "idle timeout")
        yield self.client.closed
        # The backend had its FIN: the proxy's close shows on the wire
        # only when it writes; the proxy's connection is gone.
        yield self.backendInner.lost
        self.assertEqual(bytes(self.backend.received), b"b LOGOUT\r\n")

    def test_halfClosedSilencePython(self) -> None:
        """
        Relayed in Python, a half-closed session whose other side is
        silent ends after L{_relay.HALF_CLOSED_IDLE}, not the idle timeout.
        """
        return self.halfClosedSilence(False)

    def test_halfClosedSilenceSpliced(self) -> None:
        """
        The same when spliced: the splicer's half-close shortens the idle
        timeout too.
        """
        return self.halfClosedSilence(True)

    @inlineCallbacks
    def test_backendNotReadingAborted(self) -> None:
        """
        A backend that does not read keeps what the relay wrote to it
        unsent, and with it the connection the relay closed when it ended:
        that connection is aborted L{_relay.CLOSE_GRACE} seconds later, and
        the backend then sees its end without the rest.
        """
        self.patch(_relay, "_spliceChecked", False)
        self.client, self.clientInner = yield self.leg(atOnce=True)
        self.backend, self.backendInner = yield self.leg()
        self.backend.transport.pauseProducing()
        self.backend.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        clock = Clock()
        self.join(clock=clock)
        upload = b"x" * (4 * 1024 * 1024)
        self.client.transport.write(upload)
        while not _relay._unsentSize(self.backendInner.transport):
            yield deferLater(reactor, 0.01)
        clock.advance(60)
        self.assertEqual(self.relay.endReason, "idle timeout")
        yield self.client.closed
        clock.advance(_relay.CLOSE_GRACE)
        yield self.backendInner.lost
        self.backend.transport.resumeProducing()
        yield self.backend.closed
        self.assertLess(len(self.backend.received), len(upload))
        self.assertEqual(clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_backendClosedInTimeNotAborted(self) -> None:
        """
        A backend whose connection closes within L{_relay.CLOSE_GRACE}
        gets everything, and the relay's abort is called off.
        """
        self.patch(_relay, "_spliceChecked", False)
        self.client, self.clientInner = yield self.leg(atOnce=True)
        self.backend, self.backendInner = yield self.leg()
        clock = Clock()
        self.join(clock=clock)
        self.client.transport.write(b"z LOGOUT\r\n")
        self.client.transport.loseConnection()
        yield self.backendInner.lost
        yield self.backend.closed
        self.assertEqual(bytes(self.backend.received), b"z LOGOUT\r\n")
        self.assertEqual(self.relay.endReason, "client closed")
        self.assertEqual(clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_hungTLSBackendAborted(self) -> None:
        """
        A TLS backend that neither answers nor closes: the idle timeout
        ends the relay, the relay closes the backend's connection (its
        close_notify), and the backend's never comes. The connection is
        aborted L{_relay.CLOSE_GRACE} seconds later: the backend sees it
        end.
        """
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        release = threading.Event()
        self.addCleanup(release.set)
        handshaken = threading.Event()

        def backend() -> bool:
            sock, _ = listener.accept()
            with sock:
                tls = BlockingTLS(sock, self.serverContext, serverSide=True)
                tls.handshake()
                handshaken.set()
                # Hung: reads nothing, sends nothing, until the test is
                # done with the proxy's side; then whether the connection
                # ends (after the proxy's close_notify).
                release.wait(15)
                try:
                    while sock.recv(65536):
                        pass
                except socket.timeout:
                    return False
                except OSError:
                    pass  # reset
                return True

        done = deferToThread(backend)
        self.client, self.clientInner = yield self.leg()
        self.backendInner = yield tlsBackendLeg(listener.getsockname()[1])
        # Its side of the handshake done too (with TLS 1.3 it sends its
        # session tickets after the proxy's side is done).
        while not handshaken.is_set():
            yield deferLater(reactor, 0.01)
        clock = Clock()
        self.join(clock=clock)
        clock.advance(60)
        self.assertEqual(self.relay.endReason, "idle timeout")
        yield self.client.closed
        clock.advance(_relay.CLOSE_GRACE)
        yield self.backendInner.lost
        release.set()
        self.assertTrue((yield done))

    @inlineCallbacks
    def backendResetsWhileClientSlow(self, splice: bool):
        """
        The backend sends a large answer to a client that does not read
        for now, then resets its connection; the client then sends a
        command (which meets the reset) and reads again. It must get
        everything the proxy read from the backend.
        """
        if splice:
            self.patch(_relay, "SPLICE_AFTER", 0)
        else:
            self.patch(_relay, "_spliceChecked", False)
        self.client, self.clientInner = yield self.leg(atOnce=True)
        self.backend, self.backendInner = yield self.leg()
        self.client.transport.pauseProducing()
        self.client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        # What the proxy holds for the client stays in the proxy (Twisted's
        # buffer, or the pipe), not in the kernel.
        self.clientInner.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.join()
        self.assertEqual(self.relay._splicer is not None, splice)
        self.backend.transport.write(b"y" * (3 * 1024 * 1024))
        # The proxy holds some of it, and reads no more for now.
        held = self.clientInner.transport
        while not (_relay._unsentSize(held) or (self.relay._splicer and self.relay._splicer.toClient.pending)):
            yield deferLater(reactor, 0.01)
        # The backend goes away with a reset, seen by the proxy's socket.
        self.backend.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        self.backend.transport.abortConnection()
        fd = self.backendInner.transport.fileno()
        while not select.select([fd], [], [], 0)[0]:
            yield deferLater(reactor, 0.01)
        self.client.transport.write(b"c NOOP\r\n")
        self.client.transport.resumeProducing()
        yield self.client.closed
        self.assertEqual(self.relay.endReason, "connection reset" if splice else "backend closed")
        self.assertGreater(self.relay.bytesFromBackend, 0)
        self.assertEqual(bytes(self.client.received), b"a OK Logged in\r\n" + b"y" * self.relay.bytesFromBackend)

    def test_backendResetPython(self) -> None:
        """
        Relayed in Python, what the proxy read from a backend that then
        reset still reaches the client.
        """
        return self.backendResetsWhileClientSlow(False)

    def test_backendResetSpliced(self) -> None:
        """
        Spliced, too: what the pipe holds reaches the client before the
        close.
        """
        return self.backendResetsWhileClientSlow(True)
