"""
Test doubles for mailproxy and for the routers its users write.

Everything here runs in memory: no sockets, no real time. A test builds a
front end with L{makeFrontend}, plays the client by calling
C{protocol.dataReceived} and reading C{transport.value()}, answers router
questions through L{FakeRouter}, and plays the backend through
L{MemoryConnector}, whose connections are L{StringTransport}s too.

    router = FakeRouter({"alice": Route(backend)})
    connector = MemoryConnector()
    frontend, client, clock = makeFrontend("imap", router, connector)
    frontend.dataReceived(b"a LOGIN alice secret\\r\\n")
    server = connector.transports[0]   # the proxy's connection to the backend
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from ._backend import BackendProtocol
from ._session import FrontendProtocol, ProxyContext
from .settings import Limits, Listener
from .interfaces import IRouter
from .model import Backend, ClientInfo, Credentials, Rejection, Route, RouteRequest
from .protocols import PROTOCOLS


@implementer(IRouter)
class FakeRouter:
    """
    A router with canned answers, or with answers the test gives later.

    @ivar requests: every L{RouteRequest} received, in order.
    @ivar pending: in manual mode, the L{Deferred}s handed out, for the test
        to fire.
    """

    def __init__(self, answers: dict[str, Route | Rejection] | None = None, default: Route | Rejection | None = None, manual: bool = False) -> None:
        self.answers = dict(answers or {})
        self.default = default if default is not None else Rejection()
        self.manual = manual
        self.requests: list[RouteRequest] = []
        self.pending: list[Deferred] = []

    def route(self, request: RouteRequest) -> Route | Rejection | Deferred:
        self.requests.append(request)
        if self.manual:
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        user = request.credentials.user if request.credentials else ""
        return self.answers.get(user, self.default)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that records C{startTLS} instead of doing it.

    @ivar tlsOptions: what C{startTLS} was called with, or L{None}.
    @ivar writtenBeforeTLS: the octets written before C{startTLS}.
    @ivar noDelay: what C{setTcpNoDelay} set.
    @ivar keepAlive: what C{setTcpKeepAlive} set.
    @ivar writeClosed: C{loseWriteConnection} was called.
    """

    tlsOptions: Any = None
    writtenBeforeTLS: bytes | None = None
    noDelay = False
    keepAlive = False
    writeClosed = False

    def startTLS(self, options: Any, normal: bool = True) -> None:
        self.tlsOptions = options
        self.writtenBeforeTLS = self.value()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.noDelay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepAlive = enabled

    def getTcpKeepAlive(self) -> bool:
        return self.keepAlive

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


class SocketBufferTransport(TLSStringTransport):
    """
    A L{TLSStringTransport} whose written octets wait, unread, in a buffer
    like a TCP transport's: once more than C{bufferSize} of them wait, the
    registered streaming producer is paused, as Twisted's TCP transport
    does; L{read} plays the client reading them all and resumes it.

    @ivar producerPaused: the registered producer is paused.
    """

    bufferSize = 65536
    producerPaused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming and not self.producerPaused and self.unread() > self.bufferSize:
            self.producerPaused = True
            self.producer.pauseProducing()

    def unread(self) -> int:
        """
        How many octets wait in the buffer.
        """
        return self.io.tell()

    def read(self) -> bytes:
        """
        Take everything written so far, as the client reading it; a paused
        producer is resumed.
        """
        data = self.value()
        self.clear()
        if self.producer is not None and self.producerPaused:
            self.producerPaused = False
            self.producer.resumeProducing()
        return data


class MemoryConnector:
    """
    Stands in for L{mailproxy._backend.connectBackend}: each backend login
    protocol is connected to a L{TLSStringTransport} at once, or refused.

    @ivar protocols: the backend login protocols, in connection order.
    @ivar transports: their transports; the test reads what the proxy sent
        with C{value()} and answers with C{protocols[i].dataReceived(...)}.
    @ivar refuse: when true, connections fail as if nothing listened.
    """

    def __init__(self) -> None:
        self.protocols: list[BackendProtocol] = []
        self.transports: list[TLSStringTransport] = []
        self.refuse = False

    def __call__(self, reactor: Any, protocol: BackendProtocol) -> Deferred:
        from twisted.python.failure import Failure

        from ._backend import BackendFailure
        from ._outcomes import FailureKind

        self.protocols.append(protocol)
        if self.refuse:
            protocol.result.errback(Failure(BackendFailure(FailureKind.UNAVAILABLE, "connection refused")))
            return protocol.result
        transport = TLSStringTransport()
        self.transports.append(transport)
        protocol.makeConnection(transport)
        return protocol.result


def makeBackend(name: str = "backend", **kwargs: Any) -> Backend:
    """
    A L{Backend} for tests, serving every protocol's logins on its standard
    port (at a documentation address, so nothing is reached).
    """
    kwargs.setdefault("host", "192.0.2.1")
    kwargs.setdefault("ports", {protocol.ownPort: protocol.ports[protocol.ownPort] for protocol in PROTOCOLS})
    return Backend(name=name, **kwargs)


def makeRequest(user: str = "alice@example.org", password: bytes = b"secret", protocol: str = "imap", **kwargs: Any) -> RouteRequest:
    """
    A L{RouteRequest} for testing a router.
    """
    client = kwargs.pop("client", None) or ClientInfo(
        sessionId="test", address="192.0.2.10", port=50000, localAddress="192.0.2.1", localPort=993
    )
    return RouteRequest(
        protocol=protocol,  # type: ignore[arg-type]
        credentials=Credentials("LOGIN", user, password=password),
        client=client,
        **kwargs,
    )


def makeFrontend(
    protocol: str,
    router: Any,
    connector: MemoryConnector | None = None,
    *,
    tls: str = "none",
    limits: Limits | None = None,
    clock: Clock | None = None,
    peer: tuple[str, int] = ("192.0.2.10", 50000),
    transportClass: type[TLSStringTransport] = TLSStringTransport,
    **listenerOptions: Any,
) -> tuple[FrontendProtocol, TLSStringTransport, Clock]:
    """
    A connected front end of C{protocol} on an in-memory transport.

    @param tls: the listener's TLS mode; C{"implicit"} pretends the TLS layer
        is already there.
    @param transportClass: the client transport's class, e.g.
        L{SocketBufferTransport}.
    @param listenerOptions: more L{Listener} attributes, e.g.
        C{digestAuth=True}.
    @return: the protocol, its client transport and the clock it uses.
    """
    from twisted.internet.address import IPv4Address

    clock = clock if clock is not None else Clock()
    context = ProxyContext(
        reactor=clock,
        router=router,
        limits=limits if limits is not None else Limits(),
        hostname="proxy.test",
        # A stand-in: TLSStringTransport only records what startTLS gets.
        serverTLS=cast(IOpenSSLServerConnectionCreator, object()),
        backendConnector=connector if connector is not None else MemoryConnector(),
    )
    listener = Listener(protocol=protocol, endpoint="tcp:0", tls=tls, **listenerOptions)
    frontend = listener.descriptor.frontendFactory(listener.mode)(context, listener)
    transport = transportClass(
        hostAddress=IPv4Address("TCP", "192.0.2.1", 993 if tls == "implicit" else 143),
        peerAddress=IPv4Address("TCP", *peer),
    )
    frontend.makeConnection(transport)
    return frontend, transport, clock
