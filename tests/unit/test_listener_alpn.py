"""
ALPN on the proxy's listeners: each protocol's TLS, implicit or after
STARTTLS, accepts only its own ALPN ids, with the SNI-selected certificate
too.  Real pyOpenSSL contexts on real TCP sockets over loopback (STARTTLS
needs a real transport's C{startTLS}).  The management endpoint's TLS
accepts only HTTP/1.1's id; it is tested in memory.
"""

from __future__ import annotations

import os

from OpenSSL import SSL
from zope.interface import implementer

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import TestCase

from mailproxy._lifecycle import ReloadableServerTLS
from mailproxy._session import ProxyContext
from mailproxy._tls import CertificateSource, makeSelfSigned, serverOptions
from mailproxy.config import Limits, Listener, loadConfig
from mailproxy.tap import listenerFactory, serviceFromConfig
from mailproxy.testing import FakeRouter

#: What a client says and waits for, per protocol, until it may start TLS:
#: (the start of the server line to wait for, what to send then); L{None}
#: as the thing to send means "start TLS now".
_STARTTLS_SCRIPTS: dict[str, list[tuple[bytes, bytes | None]]] = {
    "imap": [(b"* OK", b"a STARTTLS\r\n"), (b"a OK", None)],
    "pop3": [(b"+OK", b"STLS\r\n"), (b"+OK", None)],
    "smtp": [(b"220 ", b"EHLO client.test\r\n"), (b"250 ", b"STARTTLS\r\n"), (b"220 ", None)],
    "sieve": [(b"OK", b"STARTTLS\r\n"), (b"OK", None)],
}

#: The first line of each protocol's greeting.
_GREETINGS = {"imap": b"* OK", "pop3": b"+OK", "smtp": b"220 ", "sieve": b'"IMPLEMENTATION"'}


@implementer(IOpenSSLClientConnectionCreator)
class _ALPNClient:
    """
    A pyOpenSSL client that verifies nothing and offers the given ALPN ids.
    """

    def __init__(self, alpn: list[bytes], serverName: bytes | None) -> None:
        self.serverName = serverName
        self.context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if alpn:
            self.context.set_alpn_protos(alpn)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        if self.serverName is not None:
            connection.set_tlsext_host_name(self.serverName)
        return connection


@implementer(IHandshakeListener)
class _MailClient(Protocol):
    """
    Runs a STARTTLS script (or none, for implicit TLS), then reports the
    first line the server sends over TLS, or why the connection was lost.

    @ivar result: fires with C{("tls", firstLine)} or C{("lost", reason)}.
    """

    def __init__(self, script: list[tuple[bytes, bytes | None]], options: _ALPNClient) -> None:
        self.script = list(script)
        self.options = options
        self.buffer = b""
        self.secure = not script
        self.upgraded = False
        self.negotiated: bytes | None = None
        self.result: defer.Deferred[tuple[str, object]] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if self.secure:
                if not self.result.called:
                    self.result.callback(("tls", line))
                    self.transport.loseConnection()  # type: ignore[union-attr]
                return
            if self.script and line.startswith(self.script[0][0]):
                _, send = self.script.pop(0)
                if send is None:
                    self.buffer = b""
                    self.upgraded = True
                    self.transport.startTLS(self.options)  # type: ignore[union-attr]
                    return
                self.transport.write(send)  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.secure = True
        # After startTLS on TCP, the handle is the OpenSSL connection.
        connection = self.transport.getHandle()  # type: ignore[union-attr]
        self.negotiated = connection.get_alpn_proto_negotiated() or None
        if self.upgraded:
            # After STARTTLS the server speaks only when spoken to.
            self.transport.write(b"NOOP\r\n")  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.result.called:
            self.result.callback(("lost", reason))


class _TrackingFactory(WrappingFactory):
    """
    Tracks the server's connections, so a test can wait until all closed.
    """

    def __init__(self, wrapped: object) -> None:
        super().__init__(wrapped)  # type: ignore[arg-type]
        self.waiting: list[defer.Deferred[None]] = []

    def unregisterProtocol(self, p: object) -> None:
        super().unregisterProtocol(p)  # type: ignore[arg-type]
        if not self.protocols:
            waiting, self.waiting = self.waiting, []
            for d in waiting:
                d.callback(None)

    def allClosed(self) -> defer.Deferred[None]:
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append(d)
        return d


class ListenerALPNTests(TestCase):
    """
    Each listener refuses a TLS client whose ALPN offer lacks the
    listener's protocol (a browser's C{h2}, ALPACA-style), and serves one
    that offers it or offers no ALPN at all.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "default"))
        os.makedirs(os.path.join(directory, "mail"))
        default = CertificateSource(*makeSelfSigned(os.path.join(directory, "default")))
        mail = CertificateSource(
            *makeSelfSigned(os.path.join(directory, "mail"), ["mail.example.com"]),
            names=("mail.example.com",),
        )
        self.context = ProxyContext(
            reactor=Clock(),
            router=FakeRouter(),
            limits=Limits(),
            hostname="proxy.test",
            serverTLS=ReloadableServerTLS(serverOptions(default, [mail])),
        )

    def connect(
        self, protocol: str, tls: str, alpn: list[bytes], serverName: bytes | None = None
    ) -> defer.Deferred[tuple[str, object, bytes | None]]:
        """
        Listen for C{protocol} with C{tls} on a free loopback port, connect
        a client offering C{alpn}, and wait until both sides closed.

        @return: fires with C{("tls", first line over TLS, negotiated ALPN)}
            or C{("lost", reason, None)}.
        """
        from twisted.internet import reactor

        listener = Listener(
            protocol=protocol,
            endpoint="tcp:0",
            tls=tls,
            mode="submission" if protocol == "smtp" else None,
        )
        # The listener's name in the metrics is its TLS mode here.
        factory = _TrackingFactory(listenerFactory(self.context, listener, tls))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        options = _ALPNClient(alpn, serverName)
        client = _MailClient(_STARTTLS_SCRIPTS[protocol] if tls == "starttls" else [], options)
        clientFactory = ClientFactory.forProtocol(lambda: client)  # type: ignore[arg-type]
        if tls == "implicit":
            clientFactory = TLSMemoryBIOFactory(options, True, clientFactory)  # type: ignore[assignment]
        reactor.connectTCP("127.0.0.1", port.getHost().port, clientFactory)  # type: ignore[attr-defined]

        def closed(result: tuple[str, object]) -> defer.Deferred[tuple[str, object, bytes | None]]:
            if client.transport is not None and client.transport.connected:  # type: ignore[attr-defined]
                client.transport.abortConnection()  # type: ignore[attr-defined]
            return factory.allClosed().addCallback(lambda _: (*result, client.negotiated))

        return client.result.addCallback(closed)

    @defer.inlineCallbacks
    def test_refusedWithoutTheProtocolsId(self):  # type: ignore[no-untyped-def]
        """
        A client offering only C{h2} fails the handshake on every
        protocol's listener, implicit TLS and STARTTLS, with the default
        certificate and with the one SNI selects; the metrics count each
        failed handshake for its listener.
        """
        for protocol in ("imap", "pop3", "smtp", "sieve"):
            for tls in ("implicit", "starttls"):
                for serverName in (None, b"mail.example.com"):
                    kind, detail, negotiated = yield self.connect(protocol, tls, [b"h2"], serverName)
                    where = f"{protocol} {tls} SNI={serverName!r}"
                    self.assertEqual(kind, "lost", where)
                    self.assertIn("alert no application protocol", str(detail.value), where)
        self.assertEqual(
            dict(self.context.stats.tlsFailures),
            {(protocol, tls): 2 for protocol in ("imap", "pop3", "smtp", "sieve") for tls in ("implicit", "starttls")},
        )

    @defer.inlineCallbacks
    def test_refusedWithHTTP(self):  # type: ignore[no-untyped-def]
        """
        A client offering only C{http/1.1} (a browser steered to a mail
        port) fails the handshake on an IMAP listener, implicit TLS and
        STARTTLS, and never sees a line over TLS.
        """
        for tls in ("implicit", "starttls"):
            kind, detail, negotiated = yield self.connect("imap", tls, [b"http/1.1"])
            self.assertEqual(kind, "lost", tls)
            self.assertIn("alert no application protocol", str(detail.value), tls)
            self.assertIsNone(negotiated, tls)

    @defer.inlineCallbacks
    def test_servedWithTheProtocolsIdOrNone(self):  # type: ignore[no-untyped-def]
        """
        A client offering the protocol's ALPN id (among others) negotiates
        it and is served over TLS; a client offering no ALPN is served too.
        No handshake counts as failed.
        """
        ids = {"imap": b"imap", "pop3": b"pop3", "smtp": b"smtp", "sieve": b"managesieve"}
        for protocol, alpnId in ids.items():
            for tls in ("implicit", "starttls"):
                for alpn, expected in (([b"h2", alpnId], alpnId), ([], None)):
                    kind, line, negotiated = yield self.connect(protocol, tls, alpn, b"mail.example.com")
                    where = f"{protocol} {tls} ALPN={alpn!r}"
                    self.assertEqual(kind, "tls", where)
                    self.assertEqual(negotiated, expected, where)
                    if tls == "implicit":
                        self.assertTrue(line.startswith(_GREETINGS[protocol]), (where, line))
                    else:
                        self.assertNotEqual(line, b"", where)
        self.assertEqual(dict(self.context.stats.tlsFailures), {})
        self.assertEqual(sum(self.context.stats.accepted.values()), 16)


_ADMIN_CONFIG = """\
[tls]
certificate = "cert.pem"
key = "key.pem"

[[listener]]
protocol = "imap"
endpoint = "tcp:10993:interface=127.0.0.1"
tls = "implicit"

[router]
type = "static"
path = "routes.toml"

[backend.old]
host = "127.0.0.1"
ports = { imap = 143 }

[admin]
endpoint = "tcp:19443:interface=127.0.0.1"
token_file = "admin.token"
certificate = "cert.pem"
key = "key.pem"
"""


@implementer(IHandshakeListener)
class _HTTPSClient(Protocol):
    """
    Sends one request once the TLS handshake is done and keeps what comes
    back, or why the connection was lost.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.negotiated: bytes | None = None
        self.lostReason: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.negotiated = self.transport.negotiatedProtocol  # type: ignore[union-attr]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lostReason = reason


class AdminALPNTests(TestCase):
    """
    The management endpoint over TLS accepts only HTTP/1.1's ALPN id, as
    the mail listeners accept only theirs: a mail client (or a cross-protocol
    attacker) offering C{imap} is refused during the handshake.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        certificate, key = makeSelfSigned(directory)
        os.rename(certificate, os.path.join(directory, "cert.pem"))
        os.rename(key, os.path.join(directory, "key.pem"))
        self.token = b"t" * 40
        for name, text in (
            ("routes.toml", b'default = "old"\n'),
            ("admin.token", self.token + b"\n"),
            ("mailproxy.toml", _ADMIN_CONFIG.encode("ascii")),
        ):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(text)
        self.reactor = MemoryReactorClock()
        service = serviceFromConfig(loadConfig(os.path.join(directory, "mailproxy.toml")), self.reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        [self.factory] = [factory for port, factory, _, _ in self.reactor.tcpServers if port == 19443]

    def request(self, alpn: list[bytes]) -> _HTTPSClient:
        """
        Connect a TLS client offering C{alpn} to the management endpoint in
        memory and have it ask for C{/stats} with the token.
        """
        # With "Connection: close" the answer is flushed as the connection
        # closes; a kept-alive answer waits for the global reactor's TLS flush.
        client = _HTTPSClient(
            b"GET /stats HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
            b"Authorization: Bearer " + self.token + b"\r\n\r\n"
        )
        options = _ALPNClient(alpn, None)
        clientFactory = TLSMemoryBIOFactory(options, True, Factory.forProtocol(lambda: client), clock=self.reactor)  # type: ignore[arg-type]
        _, _, pump = connectedServerAndClient(
            lambda: self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000)),
            lambda: clientFactory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 19443)),
            clock=self.reactor,
        )
        pump.flush()
        return client

    def test_refusedWithAMailProtocolsId(self) -> None:
        """
        A client offering only C{imap} fails the handshake with the
        C{no_application_protocol} alert and gets no HTTP answer.
        """
        client = self.request([b"imap"])
        self.assertEqual(client.received, b"")
        self.assertIsNotNone(client.lostReason)
        self.assertIn("alert no application protocol", str(client.lostReason.value))  # type: ignore[union-attr]

    def test_servedWithHTTPOrNone(self) -> None:
        """
        A client offering C{http/1.1} (among others) negotiates it and gets
        its answer; a client offering no ALPN gets its answer too.
        """
        for alpn, expected in (([b"h2", b"http/1.1"], b"http/1.1"), ([], None)):
            client = self.request(alpn)
            self.assertEqual(client.negotiated, expected, alpn)
            self.assertTrue(client.received.startswith(b"HTTP/1.1 200 OK\r\n"), (alpn, client.received[:100]))
