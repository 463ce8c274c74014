"""
An in-memory proxy with many sessions sharing one context, for the tests of
the operations features (statistics, the management endpoint, moves).

Sessions are IMAP front ends on L{TLSStringTransport}s; their backends are
L{MemoryConnector} transports answered in Dovecot's dialect.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from mailproxy._session import FrontendFactory, FrontendProtocol, ProxyContext
from mailproxy.config import Limits, Listener
from mailproxy.imap._frontend import IMAPFrontend
from mailproxy.testing import MemoryConnector, TLSStringTransport

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID IDLE AUTH=PLAIN] Dovecot ready.\r\n"
LOGGED_IN = b"P1 OK\r\nP2 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"


class ProxyHarness:
    """
    One proxy context and the sessions opened on it.

    @ivar clock: the context's reactor.
    @ivar connector: where the sessions' backend connections go.
    @ivar context: the shared L{ProxyContext}.
    """

    def __init__(self, router: Any, limits: Limits | None = None, **contextArgs: Any) -> None:
        self.clock = Clock()
        self.connector = MemoryConnector()
        self.context = ProxyContext(
            reactor=self.clock,
            router=router,
            limits=limits if limits is not None else Limits(failureDelay=1.0),
            hostname="proxy.test",
            serverTLS=object(),
            backendConnector=self.connector,
            routerName="fake",
            **contextArgs,
        )
        self._ports = 50000

    def connect(self, address: str = "192.0.2.10", listener: str = "0") -> tuple[FrontendProtocol, TLSStringTransport]:
        """
        A new client connection to the plaintext IMAP listener named
        C{listener}; its greeting is cleared.
        """
        self._ports += 1
        factory = FrontendFactory(IMAPFrontend, self.context, Listener(protocol="imap", endpoint="tcp:0", tls="none"), listener)
        frontend = factory.buildProtocol(None)
        transport = TLSStringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 143),
            peerAddress=IPv4Address("TCP", address, self._ports),
        )
        frontend.makeConnection(transport)
        transport.clear()
        return frontend, transport

    def login(self, user: str, password: str = "secret") -> tuple[FrontendProtocol, TLSStringTransport, TLSStringTransport]:
        """
        Connect and log in as C{user}; the router must route it and the
        backend accepts.

        @return: the session, its client transport (cleared) and its
            backend transport (cleared).
        """
        frontend, transport = self.connect()
        frontend.dataReceived(f"a LOGIN {user} {password}\r\n".encode())
        protocol = self.connector.protocols[-1]
        backend = self.connector.transports[-1]
        protocol.dataReceived(GREETING)
        protocol.dataReceived(LOGGED_IN)
        assert frontend.relay is not None, transport.value()
        transport.clear()
        backend.clear()
        return frontend, transport, backend

    def close(self, frontend: FrontendProtocol) -> None:
        """
        The client of C{frontend} goes away.
        """
        frontend.connectionLost(None)
