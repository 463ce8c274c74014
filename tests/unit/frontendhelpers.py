"""
What the front-end tests of every protocol share: a front end with a router
and in-memory backends, and both sides of its conversation.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address

from mailproxy._backend import MAX_LOGIN_DIALOGUE
from mailproxy._session import FrontendProtocol
from mailproxy.config import Limits
from mailproxy.model import Route
from mailproxy.testing import FakeRouter, MemoryConnector, TLSStringTransport, makeBackend, makeFrontend


class FrontendTestsMixin:
    """
    Helpers for a test case of one protocol's front end.

    @cvar protocol: the listener protocol of the front end under test.
    @ivar greeting: what the front end said when the client connected.
    """

    protocol = ""

    def build(self, tls: str = "none", limits: Limits | None = None, backend=None, **routeArgs: Any) -> None:
        """
        A connected front end on a listener with C{tls}, whose router sends
        "alice" to C{backend} (by default one called "old") with
        C{routeArgs}; its greeting is cleared.
        """
        self.backend = backend or makeBackend("old")
        self.connect(FakeRouter({"alice": Route(self.backend, **routeArgs)}), tls=tls, limits=limits)

    def connect(self, router: object, **options: Any) -> None:
        """
        A connected front end asking C{router}, with in-memory backends;
        its greeting is kept in L{greeting} and cleared from the client.

        @param options: the listener's C{tls}, the C{limits} and other
            options, as L{makeFrontend} takes them.
        """
        self.router = router
        self.connector = MemoryConnector()
        self.frontend, self.client, self.clock = makeFrontend(self.protocol, router, self.connector, **options)
        self.greeting = self.client.value()
        self.client.clear()

    def connectAgain(self) -> tuple[FrontendProtocol, TLSStringTransport]:
        """
        A second connection from the client's address to the same listener.

        @return: its front end and its client transport.
        """
        second = type(self.frontend)(self.frontend.context, self.frontend.listener)
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 50001))
        second.makeConnection(transport)
        return second, transport

    def send(self, data: bytes) -> bytes:
        """
        Send C{data} as the client; return what the proxy answered.
        """
        self.client.clear()
        self.frontend.dataReceived(data)
        return self.client.value()

    def backendSays(self, data: bytes, index: int = -1) -> bytes:
        """
        Send C{data} as backend connection C{index}; return what the proxy
        wrote to it.
        """
        transport = self.connector.transports[index]
        transport.clear()
        self.connector.protocols[index].dataReceived(data)
        return transport.value()

    def floodBackend(self, line: bytes, limit: int = 4 * MAX_LOGIN_DIALOGUE) -> int:
        """
        Send C{line} over and over (64 at a time) as the latest backend
        connection, until the client hears something or C{limit} octets
        went.

        @return: how many octets were sent.
        """
        chunk = line * 64
        sent = 0
        while not self.client.value() and sent < limit:
            self.connector.protocols[-1].dataReceived(chunk)
            sent += len(chunk)
        return sent

    def assertFloodBounded(self, sent: int, line: bytes, reply: bytes) -> None:
        """
        The flood of C{line} that made C{sent} octets got the client
        C{reply} once at most L{MAX_LOGIN_DIALOGUE} octets (and a chunk)
        had come, and the backend connection was closed.
        """
        self.assertEqual(self.client.value(), reply)
        self.assertLessEqual(sent, MAX_LOGIN_DIALOGUE + 64 * len(line))
        self.assertTrue(self.connector.transports[-1].disconnecting)
