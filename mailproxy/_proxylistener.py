"""
Accepting the PROXY protocol from a load balancer in front of the proxy.

Twisted ships C{twisted.protocols.haproxy} and the C{haproxy:} endpoint, but
they fall short for a mail proxy: the wrapped protocol's C{connectionMade}
runs before the header is read (so the greeting goes out early and
C{getPeer()} is the balancer's address), a header split over two reads is
dropped, there is no list of trusted balancers and no timeout, and with
implicit TLS the header is expected inside TLS, where no balancer puts it.

L{ProxyHeaderFactory} wraps a listener's factory *below* TLS: the header is
read first, from trusted peers only and within a time limit, and only then
is the wrapped protocol (TLS, then the front end) connected, seeing the real
client's addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from ._proxyproto import ProxyHeaderError, parseHeader

#: A v2 header with TLVs is rarely more than a few hundred octets; anything
#: longer before a header is complete is refused.
MAX_HEADER = 4096
#: The PROXY specification asks receivers to wait at least 3 seconds.
DEFAULT_TIMEOUT = 3.0

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parseNetworks(texts: Sequence[str]) -> tuple[_Network, ...]:
    """
    Parse addresses and CIDR networks (C{"10.0.0.0/8"}, C{"::1"}).

    @raise ValueError: for anything else.
    """
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


@implementer(IHandshakeListener)
class ProxyHeaderProtocol(ProtocolWrapper):
    """
    Reads a PROXY header, then behaves as the wrapped protocol's transport
    with the addresses the header gave.
    """

    log = Logger()
    factory: ProxyHeaderFactory
    transport: ITCPTransport

    def __init__(self, factory: ProxyHeaderFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer = b""
        self._ready = False
        self._timer: IDelayedCall | None = None
        self._peer: Any = None
        self._host: Any = None

    def makeConnection(self, transport: Any) -> None:
        # Unlike ProtocolWrapper, do not connect the wrapped protocol yet:
        # it must not greet, nor see an address, before the header.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        if not self.factory.trusts(getattr(peer, "host", "")):
            self.log.warn("PROXY header refused from untrusted {peer}", peer=getattr(peer, "host", peer))
            self.transport.abortConnection()
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        if self._ready:
            self.wrappedProtocol.dataReceived(data)
            return
        self._buffer += data
        try:
            header, rest = parseHeader(self._buffer)
        except ProxyHeaderError as e:
            self._refuse(str(e))
            return
        if header is None:
            if len(self._buffer) > MAX_HEADER:
                self._refuse("PROXY header too long")
            return
        self._buffer = b""
        self._cancelTimer()
        if header.command == "PROXY" and header.source and header.destination:
            self._peer = _address(*header.source)
            self._host = _address(*header.destination)
        self._ready = True
        # makeConnection made this wrapper provide its transport's interfaces.
        self.wrappedProtocol.makeConnection(cast(ITransport, self))
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def getPeer(self) -> Any:
        return self._peer or self.transport.getPeer()

    def getHost(self) -> Any:
        return self._host or self.transport.getHost()

    def handshakeCompleted(self) -> None:
        # TLS started under us (STARTTLS): tell the front end.
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def readConnectionLost(self) -> None:
        # Reported only once the relay made the layers half-closeable.
        cast(IHalfCloseableProtocol, self.wrappedProtocol).readConnectionLost()

    def writeConnectionLost(self) -> None:
        cast(IHalfCloseableProtocol, self.wrappedProtocol).writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelTimer()
        self.factory.unregisterProtocol(self)
        if self._ready:
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None  # type: ignore[assignment]  # released; nothing uses it after the loss

    def _refuse(self, why: str) -> None:
        self._cancelTimer()
        self.log.warn("bad PROXY header from {peer}: {why}", peer=getattr(self.transport.getPeer(), "host", "?"), why=why)
        self.transport.abortConnection()

    def _timedOut(self) -> None:
        self._timer = None
        self._refuse(f"no PROXY header within {self.factory.timeout:g}s")

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class ProxyHeaderFactory(WrappingFactory[ProxyHeaderProtocol]):
    """
    Wraps a listener's factory so that each connection starts with a PROXY
    header from a trusted balancer.

    @ivar trusted: the networks balancers connect from.
    """

    protocol = ProxyHeaderProtocol
    noisy = False

    def __init__(
        self,
        wrappedFactory: Any,
        trusted: Sequence[_Network],
        clock: IReactorTime,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(wrappedFactory)
        self.trusted = tuple(trusted)
        self.clock = clock
        self.timeout = timeout

    def trusts(self, host: str) -> bool:
        """
        Whether C{host} may send a PROXY header.
        """
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)
