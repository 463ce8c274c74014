"""
Accepting PROXY headers from a load balancer (L{mailproxy._proxylistener}).
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._proxylistener import ProxyHeaderFactory, parseNetworks
from mailproxy._proxyproto import encodeV1, encodeV2
from mailproxy.model import Route
from mailproxy.tap import listenerFactory
from mailproxy.config import Listener
from mailproxy.testing import FakeRouter, makeBackend


class Greeter(Protocol):
    """
    Greets on connect, like a mail server, and records what it saw.
    """

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()
        self.host = self.transport.getHost()
        self.received = b""
        self.transport.write(b"* OK hello\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class ProxyHeaderTests(SynchronousTestCase):
    """
    The wrapper reads the header first, from trusted peers, in time.
    """

    def connect(self, peer: str = "10.0.0.5", trusted=("10.0.0.0/24",)):
        self.clock = Clock()
        inner = Factory.forProtocol(Greeter)
        factory = ProxyHeaderFactory(inner, parseNetworks(trusted), self.clock)
        self.protocol = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "10.0.0.1", 143), peerAddress=IPv4Address("TCP", peer, 40000)
        )
        self.protocol.makeConnection(self.transport)
        return self.protocol

    def test_noGreetingBeforeHeader(self) -> None:
        """
        Nothing is written before the header; then the wrapped protocol
        greets and sees the client's addresses, not the balancer's.
        """
        protocol = self.connect()
        self.assertEqual(self.transport.value(), b"")
        protocol.dataReceived(encodeV1(("192.0.2.7", 51000), ("198.51.100.1", 993)))
        self.assertEqual(self.transport.value(), b"* OK hello\r\n")
        greeter = protocol.wrappedProtocol
        self.assertEqual((greeter.peer.host, greeter.peer.port), ("192.0.2.7", 51000))
        self.assertEqual((greeter.host.host, greeter.host.port), ("198.51.100.1", 993))

    def test_fragmentedHeaderAndData(self) -> None:
        """
        A v2 header split over many reads, followed in the same read by the
        client's first bytes, is parsed and the bytes are passed on.
        """
        protocol = self.connect()
        data = encodeV2(("2001:db8::7", 51000), ("2001:db8::1", 993)) + b"a NOOP\r\n"
        for index in range(len(data)):
            protocol.dataReceived(data[index : index + 1])
        greeter = protocol.wrappedProtocol
        self.assertEqual(greeter.peer.host, "2001:db8::7")
        self.assertEqual(greeter.received, b"a NOOP\r\n")

    def test_localCommandKeepsRealAddresses(self) -> None:
        """
        A LOCAL header (a health check) leaves the real addresses.
        """
        protocol = self.connect()
        protocol.dataReceived(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")
        self.assertEqual(protocol.wrappedProtocol.peer.host, "10.0.0.5")

    def test_untrustedPeerRefused(self) -> None:
        """
        A connection from outside the trusted networks is dropped at once.
        """
        self.connect(peer="203.0.113.9")
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.transport.value(), b"")

    def test_garbageRefused(self) -> None:
        """
        Data that is no PROXY header closes the connection without reply.
        """
        protocol = self.connect()
        protocol.dataReceived(b"a LOGIN alice secret\r\n")
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.transport.value(), b"")

    def test_timeout(self) -> None:
        """
        A balancer that sends no header within the timeout is dropped.
        """
        self.connect()
        self.clock.advance(3)
        self.assertTrue(self.transport.disconnected)

    def test_ipv4MappedPeerTrusted(self) -> None:
        """
        A balancer reaching a dual-stack listener over IPv4 is matched as
        IPv4.
        """
        self.connect(peer="::ffff:10.0.0.5")
        self.assertFalse(self.transport.disconnected)


class ListenerWiringTests(SynchronousTestCase):
    """
    The listener option puts the PROXY reader below TLS.
    """

    def test_belowTLS(self) -> None:
        """
        For an implicit TLS listener, the outermost factory reads the PROXY
        header and wraps the TLS factory.
        """
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from mailproxy._session import ProxyContext
        from mailproxy.config import Limits

        from twisted.internet.ssl import CertificateOptions

        context = ProxyContext(
            reactor=Clock(),
            router=FakeRouter({"a": Route(makeBackend())}),
            limits=Limits(),
            hostname="h",
            serverTLS=CertificateOptions(),
        )
        listener = Listener("imap", "tcp:0", "implicit", proxyProtocol=True, proxyTrusted=("10.0.0.0/8",))
        factory = listenerFactory(context, listener)
        self.assertIsInstance(factory, ProxyHeaderFactory)
        self.assertIsInstance(factory.wrappedFactory, TLSMemoryBIOFactory)
