"""
The relay on real loopback TCP connections, where plain legs are spliced
by the kernel (L{mailproxy._relay._Splicer}) instead of passing through
Python.
"""

from __future__ import annotations

import os
import select

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial.unittest import TestCase

from mailproxy import _relay
from mailproxy._relay import Relay


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


class Inner(Protocol):
    """
    The proxy's side of a leg, as the front end and backend protocols are
    after hand-over: data and close go to the relay.
    """

    relay: Relay | None = None
    lost: Deferred[None]

    def connectionMade(self) -> None:
        self.lost = Deferred()
        self.factory.inner.callback(self)

    def dataReceived(self, data: bytes) -> None:
        raise AssertionError("the relay must take over reading")

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class SplicedRelayTests(TestCase):
    """
    Bytes and closes cross a relay of two plain TCP connections.
    """

    @inlineCallbacks
    def leg(self):
        """
        A loopback TCP connection: (outer Collector, inner Inner).
        """
        serverFactory = Factory.forProtocol(Inner)
        serverFactory.inner = Deferred()
        port = reactor.listenTCP(0, serverFactory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        outer = Collector()
        clientFactory = ClientFactory.forProtocol(lambda: outer)
        reactor.connectTCP("127.0.0.1", port.getHost().port, clientFactory)
        yield outer.ready
        inner = yield serverFactory.inner
        self.addCleanup(lambda: outer.transport.abortConnection() if outer.transport.connected else None)
        return outer, inner

    @inlineCallbacks
    def relayed(self, toClient: bytes = b"", toBackend: bytes = b""):
        self.client, self.clientInner = yield self.leg()
        self.backend, self.backendInner = yield self.leg()
        self.ended = []
        self.relay = Relay(
            self.clientInner.transport, self.backendInner.transport, reactor, 60, self.ended.append
        )
        for inner, method in ((self.clientInner, "fromClient"), (self.backendInner, "fromBackend")):
            inner.dataReceived = getattr(self.relay, method)
        self.clientInner.connectionLost = lambda reason=None: (self.relay.clientLost(), Inner.connectionLost(self.clientInner))
        self.backendInner.connectionLost = lambda reason=None: (self.relay.backendLost(), Inner.connectionLost(self.backendInner))
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
        self.assertEqual(self.relay.endReason, "backend closed")
        self.assertEqual(self.relay.bytesFromBackend, len(down) + len(b"* 1 EXISTS\r\n"))
        yield self.clientInner.lost
        yield self.backendInner.lost

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
        self.assertEqual(self.relay.endReason, "client closed")
        yield self.clientInner.lost

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
        self.relay.stop("dropped")
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
