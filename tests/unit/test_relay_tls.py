"""
A relay with a TLS leg, in memory: when what it writes reaches the peer.
"""

from __future__ import annotations

import os

from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._relay import Relay
from mailproxy._tls import makeSelfSigned


class _Socket(FileDescriptor):
    """
    The TCP connection under a TLS layer, as the proxy's own connections
    are: what is written is sent at once (here: kept in L{sent}).
    """

    def __init__(self) -> None:
        super().__init__(MemoryReactorClock())
        self.connected = 1
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data

    def take(self) -> bytes:
        """
        What was sent since the last call.
        """
        data, self.sent = self.sent, b""
        return data


class _Received(Protocol):
    """
    The application above a TLS layer: keeps what it reads.
    """

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def _tlsLayer(options: object, isClient: bool, clock: Clock) -> tuple[TLSMemoryBIOProtocol, _Socket, _Received]:
    """
    A TLS layer on a L{_Socket}, with a L{_Received} above it.
    """
    app = _Received()
    layer = TLSMemoryBIOFactory(options, isClient, Factory.forProtocol(lambda: app), clock=clock).buildProtocol(None)  # type: ignore[arg-type]
    socket = _Socket()
    socket.protocol = layer  # type: ignore[attr-defined]
    layer.makeConnection(socket)
    return layer, socket, app


class TLSClientLegTests(SynchronousTestCase):
    """
    A relay whose client leg is TLS (Twisted's TLS layer, which gathers the
    writes of one turn of the event loop and sends them in the next).
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        certificate, key = makeSelfSigned(directory)
        with open(certificate) as c, open(key) as k:
            serverOptions = PrivateCertificate.loadPEM(c.read() + k.read()).options()
        self.clock = Clock()
        self.proxySide, self.proxySocket, _ = _tlsLayer(serverOptions, False, self.clock)
        self.client, self.clientSocket, self.clientApp = _tlsLayer(CertificateOptions(), True, self.clock)
        self.pump()
        self.clock.advance(0)
        self.pump()

    def pump(self) -> None:
        """
        Carry what each side sent to the other until neither sends more,
        without letting the event loop turn (the clock stays).
        """
        while True:
            toProxy, toClient = self.clientSocket.take(), self.proxySocket.take()
            if not toProxy and not toClient:
                return
            if toProxy:
                self.proxySide.dataReceived(toProxy)
            if toClient:
                self.client.dataReceived(toClient)

    def test_relayedAtOnce(self) -> None:
        """
        What the relay writes to a TLS client, the login reply written
        just before the hand-over and each relayed chunk, reaches the
        client at once, not a turn of the event loop later.
        """
        self.proxySide.write(b"235 2.7.0 Authentication successful\r\n")
        relay = Relay(self.proxySide, StringTransport(), self.clock, 60, lambda relay: None)
        relay.start()
        self.pump()
        self.assertEqual(self.clientApp.received, b"235 2.7.0 Authentication successful\r\n")
        relay.fromBackend(b"250 2.1.0 Ok\r\n")
        self.pump()
        self.assertEqual(self.clientApp.received, b"235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n")
