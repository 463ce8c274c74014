"""
The TCP transports that send at once (L{mailproxy._tcp}), on real loopback
connections: what the reactor is asked to watch is counted, and what the
peer receives is checked byte for byte.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from typing import Any, Callable

from twisted.internet import error, main, reactor, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger
from twisted.python import log
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.internet.ssl import PrivateCertificate, optionsForClientTLS
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mailproxy import _tcp
from mailproxy._tls import makeSelfSigned


class Peer(Protocol):
    """
    One end of a test connection: writes C{greeting} once connected,
    collects what it receives, and says when it is closed.
    """

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received = bytearray()
        self.ready: Deferred[Peer] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)
        self.ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


@implementer(IHalfCloseableProtocol)
class HalfClosingPeer(Peer):
    """
    A peer that is told of half-closes: it counts its
    C{writeConnectionLost} calls and closes once the other side has
    finished sending too.
    """

    writeLost = 0

    def writeConnectionLost(self) -> None:
        self.writeLost += 1

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()


class OneShotFactory(ClientFactory):
    """
    Hands its one protocol to the first connection and keeps no reference
    to it, so that only the transports could tie a closed connection into
    a reference cycle.
    """

    def __init__(self, peer: Peer) -> None:
        self.peer: Peer | None = peer

    def buildProtocol(self, addr: object) -> Peer | None:
        peer, self.peer = self.peer, None
        return peer


class AtOnceTests(TestCase):
    """
    L{_tcp.AtOnceServer} and L{_tcp.AtOnceClient} send from C{write} when
    nothing is buffered, without asking the reactor to watch the socket
    for writability.
    """

    def setUp(self) -> None:
        self.watched: list[Any] = []
        addWriter = reactor.addWriter

        def counting(selectable: Any) -> None:
            self.watched.append(selectable)
            addWriter(selectable)

        self.patch(reactor, "addWriter", counting)

    def countShutdowns(self, sockets: list[socket.socket], shutdowns: list[int]) -> None:
        """
        For the rest of the test, note in C{shutdowns} the C{how} of every
        shutdown(2) made on a socket in C{sockets}.
        """
        realShutdown = socket.socket.shutdown

        def shutdown(sock: socket.socket, how: int) -> None:
            if sock in sockets:
                shutdowns.append(how)
            realShutdown(sock, how)

        self.patch(socket.socket, "shutdown", shutdown)

    def listen(self, peer: Peer, atOnce: bool = True, tls: Any = None) -> int:
        """
        Listen on loopback with C{peer} as the one server protocol (its
        transport sending at once if C{atOnce}).

        @return: the port number.
        """
        factory: Any = Factory.forProtocol(lambda: peer)
        if tls is not None:
            factory = TLSMemoryBIOFactory(tls, False, factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        if atOnce:
            _tcp.listenAtOnce(port)
        return int(port.getHost().port)

    def connect(self, portNumber: int, peer: Peer, atOnce: bool = False) -> Any:
        """
        Connect C{peer} to C{portNumber} on loopback.
        """
        factory = OneShotFactory(peer)
        if atOnce:
            return _tcp.connectAtOnce(reactor, "127.0.0.1", portNumber, factory, 5)
        return reactor.connectTCP("127.0.0.1", portNumber, factory)

    @inlineCallbacks
    def closeBoth(self, *peers: Peer) -> Any:
        for peer in peers:
            if peer.transport is not None and peer.transport.connected:
                peer.transport.loseConnection()
        for peer in peers:
            yield peer.closed

    @inlineCallbacks
    def waitFor(self, condition: Any) -> Any:
        for _ in range(500):
            if condition():
                return
            yield deferLater(reactor, 0.01)
        self.fail("condition never met")

    @inlineCallbacks
    def test_serverSendsAtOnce(self) -> Any:
        """
        A greeting written by a protocol on an accepted connection reaches
        the client without the reactor being asked to watch the server's
        socket for writability.
        """
        server, client = Peer(b"* OK ready\r\n"), Peer()
        self.connect(self.listen(server), client)
        yield server.ready
        yield self.waitFor(lambda: bytes(client.received) == b"* OK ready\r\n")
        self.assertNotIn(server.transport, self.watched)
        self.assertIsInstance(server.transport, _tcp.AtOnceServer)
        yield self.closeBoth(server, client)

    @inlineCallbacks
    def test_clientSendsAtOnce(self) -> Any:
        """
        A command written on a connection made by L{_tcp.connectAtOnce}
        reaches the server without the reactor watching the client's socket
        for writability after the connection is made.
        """
        server, client = Peer(), Peer(b"a LOGIN alice secret\r\n")
        watchedBefore: list[Any] = []
        client.connectionMade = lambda: (  # type: ignore[method-assign]
            watchedBefore.extend(self.watched),
            Peer.connectionMade(client),
        )
        self.connect(self.listen(server, atOnce=False), client, atOnce=True)
        yield client.ready
        yield self.waitFor(lambda: bytes(server.received) == b"a LOGIN alice secret\r\n")
        self.assertEqual(self.watched, watchedBefore)
        self.assertIsInstance(client.transport, _tcp.AtOnceClient)
        yield self.closeBoth(server, client)

    @inlineCallbacks
    def test_hostFromPort(self) -> Any:
        """
        A connection accepted on a port that listens on one address has
        that address as its own without a C{getsockname(2)} per
        connection; one accepted on a port listening on all addresses
        asks the kernel, and gets the address the client connected to.
        """
        asked: list[socket.socket] = []
        getsockname = socket.socket.getsockname
        self.patch(socket.socket, "getsockname", lambda sock: (asked.append(sock), getsockname(sock))[1])
        for interface, expected in (("127.0.0.1", 0), ("0.0.0.0", 1)):
            server, client = Peer(), Peer()
            port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface=interface)
            self.addCleanup(port.stopListening)
            _tcp.listenAtOnce(port)
            self.connect(port.getHost().port, client)
            yield server.ready
            yield client.ready
            del asked[:]
            host = server.transport.getHost()
            self.assertEqual(len(asked), expected, interface)
            self.assertEqual((host.type, host.host, host.port), ("TCP", "127.0.0.1", port.getHost().port))
            self.assertEqual(host, client.transport.getPeer())
            yield self.closeBoth(server, client)

    @inlineCallbacks
    def test_acceptWithoutLoggers(self) -> Any:
        """
        Accepting connections makes no L{Logger}: Twisted's port made two
        for every accept event (its C{_logger} binds a new one on every
        access); its one logger logs the port's events as before.
        """
        made: list[object] = []
        realInit = Logger.__init__

        def counting(logger: Logger, *args: Any, **kwargs: Any) -> None:
            realInit(logger, *args, **kwargs)
            if logger.source is port:
                made.append(logger)

        server, client = Peer(), Peer()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        _tcp.listenAtOnce(port)
        self.patch(Logger, "__init__", counting)
        self.connect(port.getHost().port, client)
        yield server.ready
        yield client.ready
        self.assertEqual(made, [])
        self.assertIs(port._logger.source, port)
        self.assertEqual(port._logger.namespace, "twisted.internet.tcp.Port")
        yield self.closeBoth(server, client)

    @inlineCallbacks
    def test_acceptWithoutEnums(self) -> Any:
        """
        A port accepts a connection without reading its socket's family
        and type properties (which make an enum member of each, on every
        connection, in Python's C{accept}); the accepted socket has the
        same family and type.
        """
        read: list[str] = []
        for name in ("family", "type"):
            original = getattr(socket.socket, name)
            self.patch(
                socket.socket,
                name,
                property(lambda sock, name=name, original=original: (read.append(name), original.fget(sock))[1]),
            )
        server, client = Peer(b"* OK ready\r\n"), Peer()
        port = self.listen(server)
        read.clear()
        self.connect(port, client)
        yield server.ready
        self.assertEqual(read, [])
        self.assertEqual((server.transport.socket.family, server.transport.socket.type), (socket.AF_INET, socket.SOCK_STREAM))
        yield self.waitFor(lambda: bytes(client.received) == b"* OK ready\r\n")
        yield self.closeBoth(server, client)

    def test_hostNotFromPort(self) -> None:
        """
        A port's address is not taken for its connections' where they may
        differ: a port listening on all addresses, on a link-local one (a
        connection carries its own scope), or transparent (a TPROXY port
        accepts connections to other addresses).
        """

        class FakePort:
            def __init__(self, address: Any, transparent: int = 0) -> None:
                self.address = address
                self.socket = self
                self.transparent = transparent

            def getHost(self) -> Any:
                return self.address

            def getsockopt(self, level: int, option: int) -> int:
                return self.transparent

        loopback = IPv4Address("TCP", "127.0.0.1", 143)
        self.assertIs(_tcp._acceptedHost(FakePort(loopback)), loopback)  # type: ignore[arg-type]
        ipv6 = IPv6Address("TCP", "2001:db8::1", 143)
        self.assertIs(_tcp._acceptedHost(FakePort(ipv6)), ipv6)  # type: ignore[arg-type]
        for address, transparent in (
            (IPv4Address("TCP", "0.0.0.0", 143), 0),
            (IPv6Address("TCP", "::", 143), 0),
            (IPv6Address("TCP", "fe80::1%eth0", 143, 0, 2), 0),
            (IPv4Address("TCP", "192.0.2.1", 143), 1),
            (IPv6Address("TCP", "2001:db8::1", 143), 1),
        ):
            self.assertIsNone(_tcp._acceptedHost(FakePort(address, transparent)), address)  # type: ignore[arg-type]

    @inlineCallbacks
    def test_twistedTransportsWatch(self) -> Any:
        """
        Twisted's own transports (a listening port left alone) buffer the
        write and have the reactor watch the socket: what the two tests
        above count.
        """
        server, client = Peer(b"* OK ready\r\n"), Peer()
        self.connect(self.listen(server, atOnce=False), client)
        yield server.ready
        yield self.waitFor(lambda: bytes(client.received) == b"* OK ready\r\n")
        self.assertIn(server.transport, self.watched)
        yield self.closeBoth(server, client)

    @inlineCallbacks
    def test_fullSendBufferLeftToTwisted(self) -> Any:
        """
        What the kernel does not take at once stays in Twisted's buffer and
        is sent as the peer reads: every byte arrives, in order, across
        writes made while the buffer holds some.
        """
        server, client = Peer(), Peer()
        self.connect(self.listen(server), client)
        yield server.ready
        yield client.ready
        client.transport.pauseProducing()
        chunks = [bytes([65 + i]) * (3 * 1024 * 1024) for i in range(3)]
        for chunk in chunks:
            server.transport.write(chunk)
        server.transport.writeSequence([b"tail", b"\r\n"])
        self.assertIn(server.transport, self.watched)
        client.transport.resumeProducing()
        expected = b"".join(chunks) + b"tail\r\n"
        yield self.waitFor(lambda: len(client.received) == len(expected))
        self.assertEqual(bytes(client.received), expected)
        yield self.closeBoth(server, client)

    @inlineCallbacks
    def overTLS(self) -> Any:
        """
        Connect two peers on loopback and have them start TLS with
        C{startTLS}, the accepted side as the TLS server; then the server
        writes a line, which the client reads.

        @return: a L{Deferred} firing with the server and client peers.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        certificate, key = makeSelfSigned(directory)
        with open(certificate, "rb") as c, open(key, "rb") as k:
            pem = c.read() + k.read()
        server, client = Peer(), Peer()
        self.connect(self.listen(server), client)
        yield server.ready
        yield client.ready
        server.transport.startTLS(PrivateCertificate.loadPEM(pem).options())
        client.transport.startTLS(optionsForClientTLS("localhost", trustRoot=PrivateCertificate.loadPEM(pem)))
        server.transport.write(b"* OK over TLS\r\n")
        yield self.waitFor(lambda: bytes(client.received) == b"* OK over TLS\r\n")
        return server, client

    @inlineCallbacks
    def test_startTLSSendsAtOnce(self) -> Any:
        """
        After C{startTLS} on an accepted connection, the ciphertext of the
        handshake and of what the protocol writes is sent at once too, and
        the client reads the cleartext.
        """
        server, client = yield self.overTLS()
        self.assertNotIn(server.transport, self.watched)
        yield self.closeBoth(server, client)

    @inlineCallbacks
    def test_closeAfterStartTLSAtOnce(self) -> Any:
        """
        Closing a connection that went over to TLS with C{startTLS} (an IMAP
        STARTTLS or POP3 STLS session), with nothing buffered, does not
        have the reactor watch it for writability either, once the TLS
        layer has sent its close_notify: the client reads what was written
        and sees the connection close.
        """
        server, client = yield self.overTLS()
        server.transport.write(b"* BYE\r\n")
        server.transport.loseConnection()
        yield client.closed
        yield server.closed
        self.assertEqual(bytes(client.received), b"* OK over TLS\r\n* BYE\r\n")
        self.assertNotIn(server.transport, self.watched)

    @inlineCallbacks
    def test_closeAtOnce(self) -> Any:
        """
        Closing a connection with nothing buffered does not have the
        reactor watch it for writability (Twisted's own transports close
        through a write event): the peer sees the close, and the protocol
        learns of it once, after loseConnection returned.
        """
        server, client = Peer(), Peer()
        self.connect(self.listen(server), client)
        yield server.ready
        yield client.ready
        lost: list[object] = []
        server.connectionLost = lambda reason=None: (lost.append(reason), Peer.connectionLost(server))  # type: ignore[method-assign]
        server.transport.write(b"* BYE\r\n")
        server.transport.loseConnection()
        self.assertEqual(lost, [])
        yield client.closed
        yield server.closed
        self.assertEqual(bytes(client.received), b"* BYE\r\n")
        self.assertEqual(len(lost), 1)
        self.assertNotIn(server.transport, self.watched)

    @inlineCallbacks
    def test_halfCloseAtOnce(self) -> Any:
        """
        Half-closing a connection with nothing buffered does not have the
        reactor watch it for writability either: the peer gets what was
        written, then the end of the stream, and the protocol its
        C{writeConnectionLost} once, after loseWriteConnection returned.
        """
        server, client = HalfClosingPeer(), Peer()
        self.connect(self.listen(server), client)
        yield server.ready
        yield client.ready
        server.transport.write(b"* BYE\r\n")
        server.transport.loseWriteConnection()
        self.assertEqual(server.writeLost, 0)
        yield client.closed
        yield server.closed
        self.assertEqual(bytes(client.received), b"* BYE\r\n")
        self.assertEqual(server.writeLost, 1)
        self.assertNotIn(server.transport, self.watched)

    @inlineCallbacks
    def test_closeAfterHalfClose(self) -> Any:
        """
        A connection the proxy half-closed and its peer then closed is
        closed with close(2) alone: its FIN went with the half-close, and
        Twisted's shutdown(2) both ways before the close would only fail
        (ENOTCONN). Its protocol learns of the close with the reason every
        connection closed in order gets, one object, not one per
        connection.
        """
        shutdowns: list[int] = []
        sockets: list[socket.socket] = []
        self.countShutdowns(sockets, shutdowns)
        reasons: list[object] = []
        for _ in range(2):
            server, client = HalfClosingPeer(), Peer()
            self.connect(self.listen(server), client)
            yield server.ready
            yield client.ready
            sockets.append(server.transport.socket)
            server.connectionLost = lambda reason=None, server=server: (  # type: ignore[method-assign]
                reasons.append(reason),
                Peer.connectionLost(server),
            )
            server.transport.write(b"* BYE\r\n")
            server.transport.loseWriteConnection()
            yield client.closed
            yield server.closed
            self.assertEqual(bytes(client.received), b"* BYE\r\n")
        self.assertEqual(shutdowns, [socket.SHUT_WR, socket.SHUT_WR])
        self.assertEqual(len(reasons), 2)
        self.assertIs(reasons[0], reasons[1])

    @inlineCallbacks
    def test_readInOneCall(self) -> Any:
        """
        Both transports hand what they read to their protocol from
        C{doRead} itself (Twisted's calls a helper that does), and a
        peer's close still reaches the protocol.
        """
        callers: list[str] = []

        class Reading(Peer):
            def dataReceived(self, data: bytes) -> None:
                callers.append(sys._getframe(1).f_code.co_name)
                Peer.dataReceived(self, data)

        server, client = Reading(b"* OK ready\r\n"), Reading(b"a NOOP\r\n")
        self.connect(self.listen(server), client, atOnce=True)
        yield self.waitFor(lambda: bytes(server.received) == b"a NOOP\r\n" and bytes(client.received) == b"* OK ready\r\n")
        self.assertEqual(callers, ["doRead", "doRead"])
        client.transport.loseConnection()
        yield server.closed
        yield client.closed

    @inlineCallbacks
    def test_writeCallsNothingMore(self) -> Any:
        """
        A write with nothing buffered runs no Python function but the
        transport's C{write} and L{_tcp.sendAtOnce} (every reply and
        relayed chunk of a login is one).
        """
        server, client = Peer(), Peer()
        self.connect(self.listen(server), client)
        yield server.ready
        yield client.ready
        calls: list[str] = []

        def profile(frame: Any, event: str, arg: object) -> None:
            if event == "call":
                calls.append(frame.f_code.co_name)

        sys.setprofile(profile)
        try:
            server.transport.write(b"* OK\r\n")
        finally:
            sys.setprofile(None)
        self.assertEqual(calls, ["write", "sendAtOnce"])
        yield self.waitFor(lambda: bytes(client.received) == b"* OK\r\n")
        yield self.closeBoth(server, client)

    @inlineCallbacks
    def test_closeHalfClosedOnce(self) -> Any:
        """
        Closing a connection the proxy half-closed (once the peer's FIN is
        read, which stops the reading) stops the reactor's watching of it
        once more, as it is lost, not once more before that too.
        """
        removals: list[str] = []
        for name in ("removeReader", "removeWriter"):
            original = getattr(reactor, name)

            def counting(selectable: Any, original: Any = original, name: str = name) -> None:
                if selectable is server.transport:
                    removals.append(name)
                original(selectable)

            self.patch(reactor, name, counting)
        server, client = HalfClosingPeer(), Peer()
        self.connect(self.listen(server), client)
        yield server.ready
        yield client.ready
        server.transport.write(b"* BYE\r\n")
        server.transport.loseWriteConnection()
        yield client.closed
        yield server.closed
        self.assertEqual(bytes(client.received), b"* BYE\r\n")
        self.assertEqual(removals, ["removeReader", "removeReader", "removeWriter"])

    @inlineCallbacks
    def test_closeAfterPeerFIN(self) -> Any:
        """
        A connection whose peer's FIN was read is closed with close(2)
        alone, whether its protocol is half-closeable (it writes its last
        words and closes) or not (Twisted closes it): nothing is left
        unread, so close(2) sends the same FIN after the same octets as
        Twisted's shutdown(2) both ways before it.
        """
        shutdowns: list[int] = []
        sockets: list[socket.socket] = []
        self.countShutdowns(sockets, shutdowns)

        @implementer(IHalfCloseableProtocol)
        class LastWords(HalfClosingPeer):
            def readConnectionLost(self) -> None:
                self.transport.write(b"* BYE\r\n")
                self.transport.loseConnection()

        for server in (LastWords(), Peer()):
            client = Peer()
            self.connect(self.listen(server), client)
            yield server.ready
            yield client.ready
            sockets.append(server.transport.socket)
            client.transport.write(b"a LOGOUT\r\n")
            client.transport.loseWriteConnection()
            yield server.closed
            yield client.closed
            self.assertEqual(bytes(server.received), b"a LOGOUT\r\n")
            self.assertEqual(bytes(client.received), b"* BYE\r\n" if isinstance(server, LastWords) else b"")
        self.assertEqual(shutdowns, [])

    @inlineCallbacks
    def test_unixCloseAfterPeerEOF(self) -> Any:
        """
        A UNIX connection sending at once (L{_tcp.sendAtOnceOn}, the
        channel between the proxy's parent and a worker) is still shut
        down before its close after the peer's end of file: its socket may
        be shared with a child process, whose copy would keep the peer
        from learning of a bare close.
        """
        shutdowns: list[int] = []
        realShutdown = socket.socket.shutdown
        self.patch(socket.socket, "shutdown", lambda sock, how: (shutdowns.append(how), realShutdown(sock, how))[1])
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        server = HalfClosingPeer()
        reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: server))
        ours.close()
        yield server.ready
        _tcp.sendAtOnceOn(server.transport)
        self.assertIsInstance(server.transport, _tcp._AtOnceUnixServer)
        theirs.shutdown(socket.SHUT_WR)
        yield server.closed
        self.assertEqual(shutdowns, [socket.SHUT_WR, socket.SHUT_RDWR])

    @inlineCallbacks
    def test_halfCloseAfterLateWrite(self) -> Any:
        """
        What is written after loseWriteConnection still reaches the peer
        before the end of the stream, even what the kernel does not take
        at once.
        """
        server, client = HalfClosingPeer(), Peer()
        self.connect(self.listen(server), client)
        yield server.ready
        yield client.ready
        client.transport.pauseProducing()
        server.transport.loseWriteConnection()
        late = b"x" * (6 * 1024 * 1024)
        server.transport.write(late)
        yield deferLater(reactor, 0.05)
        client.transport.resumeProducing()
        yield client.closed
        yield server.closed
        self.assertEqual(len(client.received), len(late))
        self.assertEqual(server.writeLost, 1)

    @inlineCallbacks
    def test_closeAfterLateWrite(self) -> Any:
        """
        What is written after loseConnection still reaches the peer before
        the close, even what the kernel does not take at once.
        """
        server, client = Peer(), Peer()
        self.connect(self.listen(server), client)
        yield server.ready
        yield client.ready
        client.transport.pauseProducing()
        server.transport.loseConnection()
        late = b"x" * (6 * 1024 * 1024)
        server.transport.write(late)
        yield deferLater(reactor, 0.05)
        client.transport.resumeProducing()
        yield client.closed
        yield server.closed
        self.assertEqual(len(client.received), len(late))

    @inlineCallbacks
    def test_abortAfterClose(self) -> Any:
        """
        An abort right after a close ends the connection once (Twisted's
        abort closes it on the next turn too).
        """
        server, client = Peer(), Peer()
        self.connect(self.listen(server), client)
        yield server.ready
        yield client.ready
        lost: list[object] = []
        server.connectionLost = lambda reason=None: (lost.append(reason), Peer.connectionLost(server))  # type: ignore[method-assign]
        server.transport.loseConnection()
        server.transport.abortConnection()
        yield server.closed
        yield client.closed
        yield deferLater(reactor, 0.01)
        self.assertEqual(len(lost), 1)

    @inlineCallbacks
    def test_writeAfterAbort(self) -> Any:
        """
        What is written after abortConnection is dropped, as Twisted's own
        transports drop it: the peer sees the connection end and nothing
        of it.
        """
        server, client = Peer(), Peer()
        self.connect(self.listen(server), client)
        yield server.ready
        yield client.ready
        server.transport.abortConnection()
        server.transport.write(b"written after the abort\r\n")
        server.transport.writeSequence([b"and ", b"this\r\n"])
        yield client.closed
        yield server.closed
        self.assertEqual(bytes(client.received), b"")

    @inlineCallbacks
    def test_abortAfterHalfClose(self) -> Any:
        """
        An abort right after a half-close (put off until the current event
        is handled) cancels the half-close: the socket is not shut down for
        writing and its protocol is not told that writing ended.
        """
        shutdowns: list[int] = []
        self.countShutdowns([], shutdowns)
        server, client = HalfClosingPeer(), Peer()
        self.connect(self.listen(server), client)
        yield server.ready
        yield client.ready
        self.countShutdowns([server.transport.socket], shutdowns)
        server.transport.loseWriteConnection()
        server.transport.abortConnection()
        yield server.closed
        yield client.closed
        self.assertEqual(shutdowns, [])
        self.assertEqual(server.writeLost, 0)

    @inlineCallbacks
    def test_connectorLetsGo(self) -> Any:
        """
        A connection made by L{_tcp.connectAtOnce} leaves no reference
        cycle behind once closed: nothing of it is left for the garbage
        collector (Twisted's connector and transport refer to each other).
        """
        server, client = Peer(), Peer()
        portNumber = self.listen(server)
        gc.collect()
        self.addCleanup(gc.set_debug, gc.get_debug())
        self.addCleanup(gc.enable)
        gc.disable()
        connector = self.connect(portNumber, client, atOnce=True)
        yield client.ready
        yield self.closeBoth(server, client)
        del connector, client, self.watched[:]
        yield deferLater(reactor, 0)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (tcp.Client, tcp.Connector))]
        del gc.garbage[:]
        self.assertEqual(left, [])


class CountingPoller:
    """
    An epoll object's stand-in that records the C{epoll_ctl} operations
    (C{register}, C{modify}, C{unregister}) by file descriptor.
    """

    def __init__(self, poller: Any) -> None:
        self.poller = poller
        self.operations: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.poller, name)
        if name not in ("register", "modify", "unregister"):
            return method

        def counted(fd: int, *args: Any) -> Any:
            self.operations.append((name, fd))
            return method(fd, *args)

        return counted


class ConnectTests(TestCase):
    """
    L{_tcp.connectAtOnce} connects with fewer reactor registrations than
    Twisted, and still reports a refused connection as Twisted does.
    """

    @inlineCallbacks
    def test_twoRegistrations(self) -> Any:
        """
        From the connect call to the protocol's C{connectionMade}, the
        client's socket costs two C{epoll_ctl} operations and one
        C{connect}: it is watched for reading and writing with one, and
        stops being watched for writing once connected (Twisted's own
        connect costs five and two: it watches for reading, then for
        writing too, stops watching both, then starts reading again, and
        calls C{connect} again to learn it is connected).
        """
        server, client = Peer(), Peer()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        poller = CountingPoller(reactor._poller)
        self.patch(reactor, "_poller", poller)
        connects: list[object] = []
        realConnect = socket.socket.connect_ex

        def connect_ex(sock: socket.socket, address: Any) -> int:
            connects.append(address)
            return realConnect(sock, address)

        self.patch(socket.socket, "connect_ex", connect_ex)
        seen: list[list[str]] = []
        client.connectionMade = lambda: (  # type: ignore[method-assign]
            seen.append([name for name, fd in poller.operations if fd == client.transport.fileno()]),
            Peer.connectionMade(client),
        )
        _tcp.connectAtOnce(reactor, "127.0.0.1", port.getHost().port, OneShotFactory(client), 5)
        yield client.ready
        self.assertEqual(seen, [["register", "modify"]])
        self.assertEqual(len(connects), 1)
        client.transport.write(b"a NOOP\r\n")
        yield AtOnceTests.waitFor(self, lambda: bytes(server.received) == b"a NOOP\r\n")
        client.transport.loseConnection()
        yield client.closed
        yield server.closed

    @inlineCallbacks
    def test_nonBlockingFromTheStart(self) -> Any:
        """
        The client's socket is made non-blocking by C{socket(2)} itself
        (C{SOCK_NONBLOCK}), and never again after: Twisted makes it
        non-blocking twice, an C{ioctl} each time. It still never blocks.
        """
        server, client = Peer(b"* OK ready\r\n"), Peer()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        modes: list[bool] = []
        realSetBlocking = socket.socket.setblocking
        self.patch(socket.socket, "setblocking", lambda sock, flag: (modes.append(flag), realSetBlocking(sock, flag))[1])
        _tcp.connectAtOnce(reactor, "127.0.0.1", port.getHost().port, OneShotFactory(client), 5)
        yield client.ready
        self.assertEqual(client.transport.socket.gettimeout(), 0.0)
        # The accepted socket is Twisted's, made non-blocking once.
        yield server.ready
        self.assertEqual(modes, [False])
        yield AtOnceTests.waitFor(self, lambda: bytes(client.received) == b"* OK ready\r\n")
        client.transport.loseConnection()
        yield client.closed
        yield server.closed

    @inlineCallbacks
    def test_greetedAtOnce(self) -> Any:
        """
        A server that greets before the proxy's reactor sees the connection
        made (the socket readable as well as writable, as a backend's
        greeting often makes it) costs one C{connect} too, and the greeting
        reaches the protocol; the write event handled with the read finds
        nothing to send and makes no C{send} (Twisted's sends zero octets).
        """
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        listening.settimeout(5)
        accepted: list[socket.socket] = []
        connects: list[object] = []
        realConnect = socket.socket.connect_ex

        def connect_ex(sock: socket.socket, address: Any) -> int:
            connects.append(address)
            result = realConnect(sock, address)
            if not accepted:
                # Loopback: the handshake is done; the greeting arrives
                # before the reactor polls.
                server, _ = listening.accept()
                self.addCleanup(server.close)
                server.sendall(b"* OK ready\r\n")
                accepted.append(server)
            return result

        self.patch(socket.socket, "connect_ex", connect_ex)
        sent: list[bytes] = []
        realSend = socket.socket.send

        def send(sock: socket.socket, data: bytes, *flags: int) -> int:
            sent.append(bytes(data))
            return realSend(sock, data, *flags)

        self.patch(socket.socket, "send", send)
        client = Peer()
        _tcp.connectAtOnce(reactor, "127.0.0.1", listening.getsockname()[1], OneShotFactory(client), 5)
        yield client.ready
        yield AtOnceTests.waitFor(self, lambda: bytes(client.received) == b"* OK ready\r\n")
        self.assertEqual(len(connects), 1)
        self.assertEqual(sent, [])
        accepted[0].close()
        yield client.closed

    @inlineCallbacks
    def test_refused(self) -> Any:
        """
        A connection to a port nobody listens on fails with Twisted's
        C{ConnectionRefusedError}, given to the factory's
        C{clientConnectionFailed}.
        """
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        portNumber = listening.getsockname()[1]
        listening.close()
        failed: Deferred[Any] = Deferred()

        class Refused(ClientFactory):
            def clientConnectionFailed(self, connector: object, reason: Any) -> None:
                failed.callback([reason])

        _tcp.connectAtOnce(reactor, "127.0.0.1", portNumber, Refused(), 5)
        [reason] = yield failed
        self.assertTrue(reason.check(ConnectionRefusedError), reason)


class Readable:
    """
    A descriptor for a reactor to watch: counts its read events.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "readable"

    def doRead(self) -> None:
        self.reads += 1
        self.sock.recv(100)

    def connectionLost(self, reason: object) -> None:
        pass


class DirectReactorTests(TestCase):
    """
    L{_tcp.DirectReactor} dispatches events to descriptors without
    Twisted's per-event legacy log context.
    """

    def dispatchOne(self, reactorType: type) -> tuple[int, int]:
        """
        Have a fresh C{reactorType} dispatch one read event.

        @return: the reads the descriptor saw and the calls to
            C{twisted.python.log.callWithLogger} meanwhile.
        """
        calls: list[object] = []
        original = log.callWithLogger

        def counting(logger: object, func: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(logger)
            return original(logger, func, *args, **kwargs)

        self.patch(log, "callWithLogger", counting)
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        loop = reactorType()
        readable = Readable(ours)
        loop.addReader(readable)
        theirs.send(b"x")
        loop.doIteration(0)
        loop.removeAll()
        loop._poller.close()
        for fd in (loop.waker.i, loop.waker.o):
            os.close(fd)
        return readable.reads, len(calls)

    def test_readDispatchedDirectly(self) -> None:
        """
        An input event reaches the descriptor's C{doRead} straight from
        the reactor's poll, without Twisted's dispatch call between; an
        event with more in it (input and the peer's close) still goes
        through Twisted's, which disconnects the descriptor as before,
        and so does an input event whose C{doRead} fails.
        """
        loop = _tcp.DirectReactor()
        self.addCleanup(lambda: (loop.removeAll(), loop._poller.close(), os.close(loop.waker.i), os.close(loop.waker.o)))
        callers: list[str] = []
        lost: list[object] = []

        class Recording(Readable):
            def doRead(self) -> Any:
                callers.append(sys._getframe(1).f_code.co_name)
                data = self.sock.recv(100)
                return None if data else main.CONNECTION_DONE

            def connectionLost(self, reason: Any) -> None:
                lost.append(reason.type)

        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        readable = Recording(ours)
        loop.addReader(readable)
        theirs.send(b"x")
        loop.doIteration(0)
        self.assertEqual((callers, lost), (["doPoll"], []))
        theirs.close()
        loop.doIteration(0)
        self.assertEqual(callers, ["doPoll", "_doReadOrWrite"])
        self.assertEqual(lost, [error.ConnectionDone])
        self.assertNotIn(ours.fileno(), loop._reads)

        class Failing(Readable):
            def doRead(self) -> None:
                raise ValueError("broken")

            def connectionLost(self, reason: Any) -> None:
                lost.append(reason.type)

        ours2, theirs2 = socket.socketpair()
        self.addCleanup(ours2.close)
        self.addCleanup(theirs2.close)
        loop.addReader(Failing(ours2))
        theirs2.send(b"x")
        loop.doIteration(0)
        self.assertEqual(lost, [error.ConnectionDone, ValueError])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertNotIn(ours2.fileno(), loop._reads)

    def test_removeNothingCheaply(self) -> None:
        """
        Removing a descriptor that is not watched (a closing connection
        stops reading and writing, then again as it is lost) does not go
        through Twisted's search; one that is watched is removed, and so
        is one Twisted polls because epoll refuses it (a regular file).
        """
        loop = _tcp.DirectReactor()
        self.addCleanup(lambda: (loop.removeAll(), loop._poller.close(), os.close(loop.waker.i), os.close(loop.waker.o)))
        searches: list[object] = []
        remove = loop._remove
        self.patch(loop, "_remove", lambda xer, *args: (searches.append(xer), remove(xer, *args))[1])
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        readable = Readable(ours)
        loop.removeReader(readable)
        loop.removeWriter(readable)
        self.assertEqual(searches, [])
        loop.addReader(readable)
        loop.addWriter(readable)
        loop.removeWriter(readable)
        loop.removeReader(readable)
        self.assertEqual(searches, [readable, readable])
        self.assertNotIn(ours.fileno(), loop._selectables)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"x")
        with open(path, "rb") as f:
            regular = Readable(f)  # type: ignore[arg-type]
            loop.addReader(regular)
            self.assertTrue(loop._continuousPolling.isReading(regular))
            loop.removeReader(regular)
            self.assertFalse(loop._continuousPolling.isReading(regular))

    def test_noLogContext(self) -> None:
        """
        The event reaches the descriptor, and C{log.callWithLogger} is not
        called (Twisted's epoll reactor calls it for each event).
        """
        self.assertEqual(self.dispatchOne(_tcp.DirectReactor), (1, 0))
        self.assertEqual(self.dispatchOne(EPollReactor), (1, 1))

    def freshReactor(self) -> _tcp.DirectReactor:
        """
        A L{_tcp.DirectReactor} of this test's own, whose poller records
        the timeout of each poll in C{polls}.
        """
        loop = _tcp.DirectReactor()
        polls: list[float] = []
        poller = loop._poller

        class Recording:
            def __getattr__(self, name: str) -> Any:
                return getattr(poller, name)

            def poll(self, timeout: float, *args: Any) -> Any:
                polls.append(timeout)
                return poller.poll(timeout, *args)

        loop._poller = Recording()
        loop.polls = polls  # type: ignore[attr-defined]

        def close() -> None:
            loop.removeAll()
            poller.close()
            for fd in (loop.waker.i, loop.waker.o):
                os.close(fd)

        self.addCleanup(close)
        return loop

    def test_callSoon(self) -> None:
        """
        A call put off with C{callSoon} from an event handler runs in the
        same turn of the loop, once the handler has returned, without a
        timed call; what it puts off in turn runs after the next poll,
        which does not wait; one that raises is logged and the others run.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        loop = self.freshReactor()
        calls: list[str] = []
        readable = Readable(ours)

        def later() -> None:
            calls.append("later")
            loop.callSoon(lambda: calls.append("after the next poll"))

        def fails() -> None:
            raise RuntimeError("boom")

        def read() -> None:
            Readable.doRead(readable)
            loop.callSoon(fails)
            loop.callSoon(later)
            calls.append("handler done")

        readable.doRead = read  # type: ignore[method-assign]
        loop.addReader(readable)
        theirs.send(b"x")
        loop.doIteration(None)
        self.assertEqual(calls, ["handler done", "later"])
        self.assertEqual(loop.getDelayedCalls(), [])
        self.assertEqual([str(f.value) for f in self.flushLoggedErrors(RuntimeError)], ["boom"])
        loop.doIteration(None)
        self.assertEqual(calls[2:], ["after the next poll"])
        self.assertEqual(loop.polls, [-1, 0])

    def test_closeWithoutTimedCall(self) -> None:
        """
        On a L{_tcp.DirectReactor}, a connection closed with nothing
        buffered closes in the same turn of the loop, and no timed call is
        made for it: the peer reads the last words and the end.
        """
        loop = self.freshReactor()
        lost: list[object] = []

        class Goodbye(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"* BYE\r\n")
                self.transport.loseConnection()
                self.transport.loseConnection()

            def connectionLost(self, reason: object = None) -> None:
                lost.append(reason)

        port = _tcp.listenAtOnce(loop.listenTCP(0, Factory.forProtocol(Goodbye), interface="127.0.0.1"))
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        while not loop.getReaders() or len(loop.getReaders()) < 2:
            loop.doIteration(1)
        client.send(b"a LOGOUT\r\n")
        while not lost:
            self.assertEqual(loop.getDelayedCalls(), [])
            loop.doIteration(1)
        self.assertEqual(len(lost), 1)
        self.assertEqual(client.recv(100), b"* BYE\r\n")
        self.assertEqual(client.recv(100), b"")
        stopped = port.stopListening()
        loop.runUntilCurrent()
        self.successResultOf(stopped)

    def connectOnFresh(self, portNumber: int, factory: ClientFactory, done: Callable[[], bool]) -> list[int]:
        """
        Connect to C{portNumber} with L{_tcp.connectAtOnce} on a fresh
        L{_tcp.DirectReactor}, and turn its loop until C{done()}.

        @return: the C{SO_ERROR} look-ups made meanwhile (by descriptor).
        """
        loop = self.freshReactor()
        looked: list[int] = []
        realGetsockopt = socket.socket.getsockopt

        def getsockopt(sock: socket.socket, level: int, option: int, *rest: int) -> Any:
            if (level, option) == (socket.SOL_SOCKET, socket.SO_ERROR):
                looked.append(sock.fileno())
            return realGetsockopt(sock, level, option, *rest)

        self.patch(socket.socket, "getsockopt", getsockopt)
        _tcp.connectAtOnce(loop, "127.0.0.1", portNumber, factory, 5)
        for _ in range(50):
            if done():
                break
            loop.doIteration(0.1)
        self.assertTrue(done())
        return looked

    def test_connectedByPoll(self) -> None:
        """
        On a L{_tcp.DirectReactor}, the poll's event says a backend
        connection is made (no error or hang-up in it): the kernel is not
        asked for the socket's error (C{SO_ERROR}), and the server's
        greeting, there already, reaches the protocol.
        """
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        client = Peer()
        looked = self.connectOnFresh(listening.getsockname()[1], OneShotFactory(client), lambda: client.ready.called)
        self.assertEqual(looked, [])
        server, _ = listening.accept()
        self.addCleanup(server.close)
        server.sendall(b"* OK ready\r\n")
        loop = client.transport.reactor
        for _ in range(50):
            if bytes(client.received) == b"* OK ready\r\n":
                break
            loop.doIteration(0.1)
        self.assertEqual(bytes(client.received), b"* OK ready\r\n")
        client.transport.abortConnection()
        loop.doIteration(0)

    def test_refusedByPoll(self) -> None:
        """
        On a L{_tcp.DirectReactor}, a refused connection still fails with
        Twisted's C{ConnectionRefusedError}: its event carries the error,
        which the kernel is then asked for.
        """
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        portNumber = listening.getsockname()[1]
        listening.close()
        reasons: list[Any] = []

        class Refused(ClientFactory):
            def clientConnectionFailed(self, connector: object, reason: Any) -> None:
                reasons.append(reason)

        looked = self.connectOnFresh(portNumber, Refused(), lambda: bool(reasons))
        self.assertEqual(len(looked), 1)
        self.assertTrue(reasons[0].check(ConnectionRefusedError), reasons[0])

    def test_installed(self) -> None:
        """
        L{_tcp.installReactor} makes a L{_tcp.DirectReactor} the global
        reactor in a process that has none yet, and leaves one installed
        alone.
        """
        script = (
            "from mailproxy import _tcp\n"
            "first = _tcp.installReactor()\n"
            "from twisted.internet import reactor\n"
            "print(first, _tcp.installReactor(), type(reactor).__name__)\n"
        )
        output = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, check=True, cwd=os.path.dirname(os.path.dirname(_tcp.__file__))
        ).stdout
        self.assertEqual(output.split(), [b"True", b"False", b"DirectReactor"])
