"""
TLS session resumption on real loopback sockets: clients resume their
sessions with the proxy's listeners (session tickets), and the proxy
resumes its sessions with a TLS backend, without giving up certificate
verification, SNI certificate selection or the listener's ALPN check.
"""

from __future__ import annotations

import os
import socket
import ssl

from OpenSSL import SSL
from OpenSSL._util import lib

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from mailproxy import _tls
from mailproxy._backend import BackendFailure, BackendProtocol, LoginJob, connectBackend
from mailproxy._lifecycle import ReloadableServerTLS
from mailproxy._session import ProxyContext
from mailproxy._tls import CertificateSource, clientOptions, makeSelfSigned, serverOptions
from mailproxy.config import Limits, Listener
from mailproxy.model import Backend, ClientInfo, Credentials, Route
from mailproxy.tap import listenerFactory
from mailproxy.testing import FakeRouter


def _certificate(case: TestCase, *names: str) -> CertificateSource:
    """
    A self-signed certificate for C{names} in a directory of its own.
    """
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    certificate, key = makeSelfSigned(directory, names)
    return CertificateSource(certificate, key, names=names)


def _sessionReused(connection: SSL.Connection) -> bool:
    """
    Whether C{connection}'s handshake resumed a session (pyOpenSSL has no
    method for C{SSL_session_reused}).
    """
    return bool(lib.SSL_session_reused(connection._ssl))


def _readLine(sock: ssl.SSLSocket | socket.socket, prefix: bytes) -> bytes:
    """
    Read lines from C{sock} until one starts with C{prefix}.
    """
    buffered = b""
    while True:
        while b"\r\n" in buffered:
            line, buffered = buffered.split(b"\r\n", 1)
            if line.startswith(prefix):
                return line
        data = sock.recv(4096)
        if not data:
            raise EOFError(f"closed before {prefix!r}")
        buffered += data


class ListenerResumptionTests(TestCase):
    """
    A client of an IMAP listener that reconnects with the session of its
    previous connection resumes it (no certificate, no signature), on
    implicit TLS and after STARTTLS; what a full handshake checks still
    holds.
    """

    def setUp(self) -> None:
        self.default = _certificate(self, "localhost")
        self.mail = _certificate(self, "mail.example.com")
        self.context = ProxyContext(
            reactor=Clock(),
            router=FakeRouter(),
            limits=Limits(),
            hostname="proxy.test",
            serverTLS=ReloadableServerTLS(serverOptions(self.default, [self.mail])),
        )
        self.client = ssl.create_default_context(cafile=self.default.certificate)
        self.client.load_verify_locations(self.mail.certificate)

    def listen(self, tls: str) -> int:
        """
        An IMAP listener with C{tls} on a free loopback port.
        """
        from twisted.internet import reactor

        listener = Listener(protocol="imap", endpoint="tcp:0", tls=tls)
        port = reactor.listenTCP(0, listenerFactory(self.context, listener), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[no-any-return]

    def connect(
        self, port: int, tls: str, serverName: str = "localhost", session: ssl.SSLSession | None = None
    ) -> defer.Deferred[tuple[ssl.SSLSession, bool, str]]:
        """
        In a thread, connect a Python TLS client (which verifies the
        certificate for C{serverName}) offering C{session}, and wait for a
        server line over TLS (by then a TLS 1.3 client has its tickets).

        @return: fires with the session, whether it was resumed, and the
            common name of the certificate the client holds.
        """

        def run() -> tuple[ssl.SSLSession, bool, str]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                if tls == "starttls":
                    _readLine(sock, b"* OK")
                    sock.sendall(b"a STARTTLS\r\n")
                    _readLine(sock, b"a OK")
                with self.client.wrap_socket(sock, server_hostname=serverName, session=session) as secure:
                    if tls == "starttls":
                        secure.sendall(b"b NOOP\r\n")
                        _readLine(secure, b"b OK")
                    else:
                        _readLine(secure, b"* OK")
                    subject = dict(field[0] for field in secure.getpeercert()["subject"])  # type: ignore[index, arg-type]
                    assert secure.session is not None
                    return secure.session, secure.session_reused, str(subject["commonName"])

        return deferToThread(run)

    @defer.inlineCallbacks
    def test_resumed(self):  # type: ignore[no-untyped-def]
        """
        The second connection with the first one's session is resumed and
        served, on implicit TLS and after STARTTLS.
        """
        for tls in ("implicit", "starttls"):
            port = self.listen(tls)
            session, reused, _ = yield self.connect(port, tls)
            self.assertFalse(reused, tls)
            session, reused, name = yield self.connect(port, tls, session=session)
            self.assertTrue(reused, tls)
            self.assertEqual(name, "localhost", tls)

    @defer.inlineCallbacks
    def test_sniCertificateSelection(self):  # type: ignore[no-untyped-def]
        """
        With sessions resumed for the default name, a client asking for
        another name gets that name's certificate, and resumes a session of
        its own under that name.
        """
        port = self.listen("implicit")
        session, _, _ = yield self.connect(port, "implicit")
        _, reused, _ = yield self.connect(port, "implicit", session=session)
        self.assertTrue(reused)
        mailSession, reused, name = yield self.connect(port, "implicit", "mail.example.com")
        self.assertFalse(reused)
        self.assertEqual(name, "mail.example.com")
        _, reused, name = yield self.connect(port, "implicit", "mail.example.com", session=mailSession)
        self.assertTrue(reused)
        self.assertEqual(name, "mail.example.com")

    @defer.inlineCallbacks
    def test_alpnCheckedOnResumption(self):  # type: ignore[no-untyped-def]
        """
        A resumed session is no way around the listener's ALPN check: a
        client offering only C{h2} with a session of an IMAP connection is
        refused with C{no_application_protocol}.
        """
        port = self.listen("implicit")
        self.client.set_alpn_protocols(["imap"])
        session, _, _ = yield self.connect(port, "implicit")
        _, reused, _ = yield self.connect(port, "implicit", session=session)
        self.assertTrue(reused)
        self.client.set_alpn_protocols(["h2"])
        error = yield self.assertFailure(self.connect(port, "implicit", session=session), ssl.SSLError)
        self.assertIn("no application protocol", str(error).lower())


class _GreetedLogin(BackendProtocol):
    """
    A backend login that is done once the backend's greeting line arrives.
    """

    def dialogueReceived(self, data: bytes) -> None:
        if b"\r\n" in data:
            self.succeed()


class _Greeter(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"* OK ready\r\n")  # type: ignore[union-attr]


class BackendResumptionTests(TestCase):
    """
    The proxy resumes its TLS session with a backend on the next login
    there, and still verifies the certificate whenever the backend does
    not resume.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.addCleanup(clientOptions.cache_clear)
        self.source = _certificate(self, "localhost")
        self.serverTLS = ReloadableServerTLS(serverOptions(self.source))
        factory = TLSMemoryBIOFactory(self.serverTLS, False, Factory.forProtocol(_Greeter))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.backend = Backend(
            name="b",
            host="127.0.0.1",
            ports={"imap": port.getHost().port},
            tls="implicit",
            caFile=self.source.certificate,
            serverName="localhost",
        )

    @defer.inlineCallbacks
    def login(self):  # type: ignore[no-untyped-def]
        """
        Log in to the backend once.

        @return: fires with whether the TLS session was resumed.
        """
        from twisted.internet import reactor

        client = ClientInfo(sessionId="s", address="127.0.0.1", port=1, localAddress="127.0.0.1", localPort=993)
        job = LoginJob(
            route=Route(self.backend),
            protocol="imap",
            client=client,
            credentials=Credentials("LOGIN", "alice", password=b"pw"),
            user="alice",
            password=b"pw",
        )
        protocol = yield connectBackend(reactor, _GreetedLogin(job, reactor, 10))
        self.assertTrue(protocol.tlsActive)
        reused = _sessionReused(protocol.transport.getHandle())
        lost: defer.Deferred[None] = defer.Deferred()
        protocol.onLost = lambda: lost.callback(None)
        protocol.transport.loseConnection()
        yield lost
        return reused

    @defer.inlineCallbacks
    def test_secondLoginResumes(self):  # type: ignore[no-untyped-def]
        """
        The first login does a full handshake; the next ones resume.
        """
        self.assertFalse((yield self.login()))
        self.assertTrue((yield self.login()))
        self.assertTrue((yield self.login()))

    @defer.inlineCallbacks
    def test_notResumedStillVerified(self):  # type: ignore[no-untyped-def]
        """
        A backend that no longer knows the session (new ticket keys, as
        after a restart) gets a full handshake, with its certificate
        verified: a certificate the CA file does not hold fails the login
        although the proxy holds a session; the trusted one resumes again.
        """
        self.assertFalse((yield self.login()))
        self.serverTLS.options = serverOptions(self.source)
        self.assertFalse((yield self.login()))
        self.assertTrue((yield self.login()))
        self.serverTLS.options = serverOptions(_certificate(self, "localhost"))
        failure = yield self.assertFailure(self.login(), BackendFailure)
        self.assertEqual(failure.kind, "unavailable")
        self.assertIn("TLS handshake failed", failure.detail)


class ReleaseBuffersTests(TestCase):
    """
    Idle TLS connections do not keep OpenSSL's read and write buffers, on
    either side of the proxy.
    """

    def assertReleases(self, connection: SSL.Connection) -> None:
        # SSL_set_mode returns the mode after adding the bits given.
        self.assertTrue(lib.SSL_set_mode(connection._ssl, 0) & SSL.MODE_RELEASE_BUFFERS)

    def test_listeners(self) -> None:
        """
        The listeners' connections, with the default and with an SNI
        certificate.
        """
        options = serverOptions(_certificate(self, "localhost"), [_certificate(self, "mail.example.com")])
        self.assertReleases(options.serverConnectionForTLS(None))  # type: ignore[arg-type]
        self.assertReleases(SSL.Connection(options.contextForName(b"mail.example.com"), None))  # type: ignore[attr-defined]

    def test_backends(self) -> None:
        """
        The backends' connections, verified or not.
        """
        self.addCleanup(clientOptions.cache_clear)
        source = _certificate(self, "localhost")
        for verify in (True, False):
            backend = Backend(name="b", host="localhost", caFile=source.certificate, verify=verify)
            options = clientOptions(backend, 993)
            tlsProtocol = TLSMemoryBIOFactory(options, True, Factory.forProtocol(Protocol)).buildProtocol(None)
            self.assertReleases(options.clientConnectionForTLS(tlsProtocol))
