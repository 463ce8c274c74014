"""
A relayed TLS session gives back the memory its TLS connections grew once
it has been quiet: a big transfer must not cost an idle session for as
long as it lasts.
"""

from __future__ import annotations

import ctypes
import gc
import os

from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import _relay, _tls
from mailproxy._relay import RELAY_READ_SIZE, TLS_BUFFERS_QUIET, Relay
from mailproxy._tls import CertificateSource, makeSelfSigned, serverOptions


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def _allocated() -> int:
    """
    Octets the C library's allocator has handed out and not had back
    (glibc's C{mallinfo2}): OpenSSL's memory, which tracemalloc does not
    see.
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class _Handle(StringTransport):
    """
    A transport whose handle is a TLS connection, as Twisted's TLS
    transport's is.
    """

    def __init__(self, connection: SSL.Connection) -> None:
        super().__init__()
        self.connection = connection

    def getHandle(self) -> SSL.Connection:
        return self.connection


def _move(source: SSL.Connection, target: SSL.Connection) -> int:
    """
    Move what C{source} wrote to its memory BIO into C{target}, the way
    Twisted's TLS layer drains it (32 KiB at a time).
    """
    moved = 0
    while True:
        try:
            data = source.bio_read(2**15)
        except SSL.WantReadError:
            return moved
        target.bio_write(data)
        moved += len(data)


def _receive(connection: SSL.Connection) -> bytes:
    received = b""
    while True:
        try:
            received += connection.recv(2**15)
        except SSL.WantReadError:
            return received


class ReleaseBuffersTests(SynchronousTestCase):
    """
    L{_tls.releaseBuffers} on a server connection of the proxy's own TLS
    context, over memory BIOs as Twisted runs them.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        certificate, key = makeSelfSigned(directory, ["localhost"])
        self.options = serverOptions(CertificateSource(certificate, key, names=("localhost",)), [])
        self.clientContext = SSL.Context(SSL.TLS_METHOD)
        # As the proxy's own client contexts (towards backends) do.
        self.clientContext.set_mode(SSL.MODE_RELEASE_BUFFERS)

    def pair(self) -> tuple[SSL.Connection, SSL.Connection]:
        """
        A server connection of the proxy and a client, handshaken.
        """
        server = self.options.serverConnectionForTLS(None)
        server.set_accept_state()
        client = SSL.Connection(self.clientContext, None)
        client.set_connect_state()
        for _ in range(10):
            for connection in (client, server):
                try:
                    connection.do_handshake()
                except SSL.WantReadError:
                    pass
            _move(client, server)
            _move(server, client)
        self.assertEqual((_receive(client), _receive(server)), (b"", b""))
        return server, client

    def test_bigTransferGivenBack(self) -> None:
        """
        After a 1 MB transfer each way, a pair of connections (the proxy's
        and its peer's, both over memory BIOs) keeps more than 2 MB in its
        BIOs; once they are released, less than 16 KiB more than right
        after the handshake, and the connections still carry data both
        ways.
        """
        count = 10
        pairs = [self.pair() for _ in range(count)]
        gc.collect()
        handshaken = _allocated()
        payload = b"x" * 1_000_000
        for server, client in pairs:
            # As the relay writes: what one read of a socket brought.
            for offset in range(0, len(payload), RELAY_READ_SIZE):
                client.sendall(payload[offset : offset + RELAY_READ_SIZE])
                _move(client, server)
                server.sendall(payload[offset : offset + RELAY_READ_SIZE])
                _move(server, client)
            self.assertEqual((len(_receive(server)), len(_receive(client))), (len(payload), len(payload)))
        del payload
        grown = (_allocated() - handshaken) / count
        self.assertGreater(grown, 2_000_000)
        released = [_tls.releaseBuffers(_Handle(connection)) for pair in pairs for connection in pair]
        gc.collect()
        kept = (_allocated() - handshaken) / count
        self.assertEqual(released, [True] * 2 * count)
        self.assertLess(kept, 16 * 1024)
        for server, client in pairs:
            server.sendall(b"* OK still here\r\n")
            _move(server, client)
            client.sendall(b"a NOOP\r\n")
            _move(client, server)
            self.assertEqual((_receive(client), _receive(server)), (b"* OK still here\r\n", b"a NOOP\r\n"))

    def test_pendingBytesKept(self) -> None:
        """
        While a BIO holds bytes not yet sent, nothing is released and the
        bytes still arrive.
        """
        server, client = self.pair()
        server.sendall(b"* 1 EXISTS\r\n")
        self.assertFalse(_tls.releaseBuffers(_Handle(server)))
        _move(server, client)
        self.assertEqual(_receive(client), b"* 1 EXISTS\r\n")

    def test_notTLS(self) -> None:
        """
        A transport without TLS has nothing to release.
        """
        self.assertFalse(_tls.releaseBuffers(StringTransport()))


class RelayReleaseTests(SynchronousTestCase):
    """
    The relay releases its TLS legs' buffers after L{TLS_BUFFERS_QUIET}
    seconds without traffic, once per quiet spell.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.released: list[object] = []
        self.patch(_relay._tls, "isTLS", lambda transport: True)
        self.patch(_relay._tls, "releaseBuffers", self.released.append)
        self.client, self.backend = StringTransport(), StringTransport()
        self.relay = Relay(self.client, self.backend, self.clock, 1800.0, onEnd=lambda relay: None)
        self.relay.start()

    def test_afterLogin(self) -> None:
        """
        The login's buffers go once the session is quiet after the
        hand-over, both legs, and only once.
        """
        self.clock.advance(TLS_BUFFERS_QUIET - 1)
        self.assertEqual(self.released, [])
        self.clock.advance(1)
        self.assertEqual(self.released, [self.client, self.backend])
        self.clock.advance(10 * TLS_BUFFERS_QUIET)
        self.assertEqual(len(self.released), 2)

    def test_notWhileBusy(self) -> None:
        """
        Traffic more often than every L{TLS_BUFFERS_QUIET} seconds keeps
        the buffers; the first quiet spell after it releases them again.
        """
        self.clock.advance(TLS_BUFFERS_QUIET)
        del self.released[:]
        for _ in range(5):
            self.relay.fromBackend(b"* 1 EXISTS\r\n")
            self.clock.advance(TLS_BUFFERS_QUIET / 2)
            self.relay.fromClient(b"a NOOP\r\n")
            self.clock.advance(TLS_BUFFERS_QUIET / 2)
        self.assertEqual(self.released, [])
        self.clock.advance(TLS_BUFFERS_QUIET)
        self.assertEqual(self.released, [self.client, self.backend])
        self.assertEqual(self.backend.value(), b"a NOOP\r\n" * 5)

    def test_endedRelease(self) -> None:
        """
        A relay that ended releases nothing later (its timer is gone).
        """
        self.relay.stop()
        self.clock.advance(TLS_BUFFERS_QUIET)
        self.assertEqual(self.released, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
